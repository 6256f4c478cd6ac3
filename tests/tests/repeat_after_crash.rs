//! Finding 5 of issue 22: a client repeats `submit_as` after the
//! coordinator crashed between phase 1 and the decision. The Submit record
//! is not forced, so after the restart the gtid can be new again and phase
//! 1 is sent a second time; the participant's barrier refuses the repeated
//! prepare (a try is not repeated) while the first prepare's work is still
//! held. The coordinator must release that work itself: the participant's
//! in-doubt resolver is off here, so nobody else would.

use std::time::Duration;

use tandem_sdk::Code;
use tandem_sdk::barrier::SledBarrier;
use tandem_sdk::{Branch, Error, Gtid, Mode, Outcome, ParticipantServer, TransactionClient};
use tandem_tests::process::Serve;
use tandem_tests::{Scripted, eventually, spawn};

/// One run: prepare reaches the participant, the coordinator dies at
/// `after-phase-one`, restarts on the same sled directory, and the client
/// repeats `submit_as` with the same gtid and branches. Returns `false`
/// when the crash did not lose the Submit record (sled's own periodic
/// flush wrote it in time): then recovery, not the repeat, aborts the
/// transaction, and the run says nothing about the repeat.
async fn repeat_after_crash(mode: Mode) -> bool {
    let data = tempfile::tempdir().expect("data dir");
    let barrier_dir = tempfile::tempdir().expect("barrier dir");
    let serve = Serve::start_with(data.path(), &[], &[("TANDEM_FAILPOINT", "after-phase-one")]);
    let addr = serve.addr().to_string();
    let p = Scripted::yes("p");
    // Durable barrier, no in-doubt resolution.
    let server =
        ParticipantServer::new().barrier(SledBarrier::open(barrier_dir.path()).expect("barrier"));
    let participant = spawn(if mode == Mode::Tcc {
        server.tcc("r", p.clone())
    } else {
        server.two_phase("r", p.clone())
    })
    .await;
    let client = TransactionClient::connect(&serve.url)
        .await
        .expect("connect");
    let gtid = Gtid::now_v7();
    let branches = vec![Branch::new(participant.url(), "r", "x")];
    let timeout = Some(Duration::from_secs(5));
    let first = client
        .submit_as(gtid, mode, branches.clone(), timeout)
        .await;
    assert!(first.is_err(), "{mode:?}: the coordinator should have died");
    let status = tokio::task::spawn_blocking(move || serve.wait())
        .await
        .expect("wait");
    assert!(!status.success(), "exit status {status}");
    assert_eq!(
        p.held_count(),
        1,
        "{mode:?}: the first prepare holds its work"
    );

    let serve = Serve::start_on(data.path(), &addr, &[], &[]);
    let lost = match client.get(gtid).await {
        Err(Error::Invalid {
            code: Code::NotFound,
            ..
        }) => true,
        Ok(_) => false,
        Err(e) => panic!("{mode:?}: get after restart: {e}"),
    };

    // The repeat: an answer, never a commit (the first prepare's vote was
    // never recorded, so the participant refuses the repeated phase 1).
    let repeat = client.submit_as(gtid, mode, branches, timeout).await;
    match &repeat {
        Err(Error::Aborted { .. }) => {}
        other => panic!("{mode:?}: the repeat should abort, got {other:?}"),
    }
    // With the resolver off, only the coordinator's own rollback / cancel
    // can release the first prepare.
    eventually(
        &format!("{mode:?} (record lost: {lost}): the first prepare's work is released"),
        || p.held_count() == 0,
    )
    .await;
    let (prepares, commits, rollbacks) = p.counts();
    assert_eq!(
        (prepares, commits, rollbacks),
        (1, 0, 1),
        "{mode:?}: the handler prepared once (the repeat was refused by the barrier) and rolled back once"
    );
    // One outcome everywhere: the client was told abort, the coordinator
    // answers abort, its record is ABORTED.
    assert_eq!(client.outcome(gtid).await.expect("outcome"), Outcome::Abort);
    let mut state = 0;
    for _ in 0..500 {
        state = client.get(gtid).await.expect("get").state;
        if state == tandem_sdk::proto::TxState::Aborted as i32 {
            drop(serve);
            return lost;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{mode:?}: the record ends in state {state}, not ABORTED");
}

// Rule: a branch that may hold work is always released or committed by the
// coordinator itself. A 2PC no vote does not prove that nothing is held —
// the barrier's no to a repeated prepare means "already prepared" — so the
// coordinator rolls back every branch that voted no (DESIGN.md, rule 3).
// The Submit record is lost in the crash in nearly every run (sled's
// periodic flush comes every 500 ms); a run where it survived is repeated,
// so that the lost case is the one checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_submit_after_a_crash_releases_the_first_prepare() {
    for mode in [Mode::TwoPhase, Mode::Tcc] {
        let mut lost = false;
        for _ in 0..5 {
            if repeat_after_crash(mode).await {
                lost = true;
                break;
            }
        }
        assert!(lost, "{mode:?}: the crash never lost the Submit record");
    }
}

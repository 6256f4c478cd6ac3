//! Crash tests: the coordinator process dies at a named failpoint (cargo
//! feature `failpoints`, selected by `TANDEM_FAILPOINT`), is restarted on
//! the same data directory, and recovery must bring every participant to
//! the same outcome — the decision, if one was forced; abort otherwise.

use std::time::Duration;

use tandem_sdk::{Branch, Mode, TransactionClient};
use tandem_tests::process::{Serve, tandem};
use tandem_tests::{Scripted, eventually};

/// Runs one transaction into failpoint `point` under `mode`, restarts the
/// coordinator, and checks both participants end in `expect_commit`.
async fn crash_at(point: &str, mode: Mode, expect_commit: bool) {
    let data = tempfile::tempdir().expect("data dir");
    let serve = Serve::start_with(data.path(), &[], &[("TANDEM_FAILPOINT", point)]);
    let (a, b) = (Scripted::yes("a"), Scripted::yes("b"));
    // Participants resolve branches in doubt by asking the coordinator: a
    // one-shot record that never reached the disk is presumed aborted.
    let tcc = mode == Mode::Tcc;
    let (pa, pb) = (
        a.serve_resolving(tcc, &serve.url).await,
        b.serve_resolving(tcc, &serve.url).await,
    );
    let addr = serve.addr().to_string();
    let client = TransactionClient::connect(&serve.url)
        .await
        .expect("connect");
    let branches = vec![
        Branch::new(pa.url(), "r", "x"),
        Branch::new(pb.url(), "r", "y"),
    ];
    let interactive = point == "after-branch-recorded";
    let outcome = if interactive {
        // The interactive path: the branch is forced before its try.
        let gtid = client.begin(mode).await.expect("begin");
        client.enlist(gtid, branches[0].clone()).await.map(drop)
    } else {
        client.submit(mode, branches).await.map(drop)
    };
    assert!(
        outcome.is_err(),
        "{point}: the coordinator should have died mid-call"
    );
    let status = tokio::task::spawn_blocking(move || serve.wait())
        .await
        .expect("wait");
    assert!(!status.success(), "{point}: exit status {status}");

    let serve = Serve::start_on(data.path(), &addr, &[], &[]);
    let done = |s: &Scripted| {
        let (_, commits, rollbacks) = s.counts();
        s.held_count() == 0
            && if expect_commit {
                commits == 1 && rollbacks == 0
            } else {
                commits == 0
            }
    };
    eventually(
        &format!("{point} {mode:?}: participants reach the outcome"),
        || done(&a) && done(&b),
    )
    .await;
    // The log agrees: nothing unfinished; a commit is recorded as such; an
    // abort is recorded as such, or the record never reached the disk
    // (presumed abort: the participants asked and were told to abort).
    let want = if expect_commit {
        "COMMITTED"
    } else {
        "ABORTED"
    };
    let mut states = Vec::new();
    for _ in 0..250 {
        let listed = tandem(&[
            "tx",
            "list",
            "--output",
            "json",
            "--coordinator",
            &serve.url,
        ]);
        assert!(listed.ok, "{}", listed.stderr);
        let rows: serde_json::Value = serde_json::from_str(&listed.stdout).expect("json");
        states = rows
            .as_array()
            .expect("array")
            .iter()
            .filter_map(|r| r["state"].as_str().map(str::to_string))
            .collect();
        let settled = states.iter().all(|s| s == want)
            && (states.len() == 1 || (!expect_commit && states.is_empty()));
        if settled {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{point} {mode:?}: log shows {states:?}, expected {want}");
}

// Rule: a crash before a decision is recorded ends in abort everywhere;
// a crash after the commit decision is forced ends in commit everywhere.
// Every failpoint, for 2PC and for TCC.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_failpoint_ends_in_one_outcome_for_both_protocols() {
    let cases = [
        ("after-branch-recorded", false),
        ("after-phase-one", false),
        ("after-decision-forced", true),
        ("between-phase-two", true),
    ];
    let mut cycles = 0;
    for (point, commit) in cases {
        for mode in [Mode::TwoPhase, Mode::Tcc] {
            crash_at(point, mode, commit).await;
            cycles += 1;
        }
    }
    assert_eq!(cycles, 2 * tandem_coordinator::failpoint::POINTS.len());
}

//! Saga end to end: a coordinator and scripted saga participants on
//! loopback (real tonic servers), with the SDK's barrier in front of every
//! handler. Steps run one at a time; a failure compensates the steps that
//! ran, newest first, each once.

use std::sync::Arc;
use std::time::Duration;

use tandem_coordinator::log::SledLog;
use tandem_proto::v1 as pb;
use tandem_proto::v1::admin_client::AdminClient;
use tandem_sdk::{Branch, Error, Mode, ParticipantServer, TransactionClient};
use tandem_tests::{
    Journal, Script, Scripted, eventually, eventually_async, spawn, start_coordinator,
};

async fn client(coord: &tandem_coordinator::RunningCoordinator) -> TransactionClient {
    TransactionClient::connect(coord.url())
        .await
        .expect("connect")
}

async fn coordinator() -> (tandem_coordinator::RunningCoordinator, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("dir");
    let log = Arc::new(SledLog::open(dir.path()).expect("log"));
    (start_coordinator(log).await, dir)
}

/// Steps named s1..sn sharing `journal`, each with its script.
async fn steps(
    journal: &Journal,
    scripts: Vec<Script>,
) -> (Vec<Arc<Scripted>>, Vec<tandem_sdk::RunningParticipant>) {
    let mut steps = Vec::new();
    let mut running = Vec::new();
    for (i, script) in scripts.into_iter().enumerate() {
        let s = Scripted::new(&format!("s{}", i + 1), script, Some(journal.clone()));
        running.push(s.serve_saga().await);
        steps.push(s);
    }
    (steps, running)
}

fn branches(running: &[tandem_sdk::RunningParticipant]) -> Vec<Branch> {
    running
        .iter()
        .enumerate()
        .map(|(i, p)| Branch::new(p.url(), "r", format!("step {}", i + 1)))
        .collect()
}

/// The gtid of a saga the coordinator answered ABORTED.
fn aborted(err: Error) -> tandem_sdk::Gtid {
    let Error::Aborted { gtid, .. } = err else {
        panic!("{err:?}");
    };
    gtid.expect("gtid")
}

/// Waits until `gtid` is in `state`.
async fn reaches(client: &TransactionClient, gtid: tandem_sdk::Gtid, state: pb::TxState) {
    eventually_async(&format!("{state:?}"), || async {
        client.get(gtid).await.expect("get").state() == state
    })
    .await;
}

fn states(info: &pb::TransactionInfo) -> Vec<pb::BranchState> {
    info.branches.iter().map(|b| b.state()).collect()
}

fn no(reason: &str) -> Script {
    Script {
        vote_no: Some(reason.into()),
        ..Script::default()
    }
}

// All steps succeed: each action after the one before answered (the first
// is slow, the second still comes after it), none is compensated, and
// every step ends CONFIRMED.
#[tokio::test]
async fn all_steps_run_in_order_and_none_is_compensated() {
    let (coord, _dir) = coordinator().await;
    let journal = Journal::default();
    let slow = Script {
        prepare_delay: Duration::from_millis(150),
        ..Script::default()
    };
    let (steps, running) = steps(&journal, vec![slow, Script::default(), Script::default()]).await;
    let client = client(&coord).await;
    let done = client
        .submit(Mode::Saga, branches(&running))
        .await
        .expect("saga");
    assert_eq!(done.replies, vec!["ok from s1", "ok from s2", "ok from s3"]);
    assert_eq!(
        journal.entries(),
        vec!["prepare:s1", "prepare:s2", "prepare:s3"]
    );
    let info = client.get(done.gtid).await.expect("get");
    assert_eq!(info.state(), pb::TxState::Committed);
    assert_eq!(states(&info), vec![pb::BranchState::Confirmed; 3]);
    for s in &steps {
        assert_eq!(s.counts().2, 0, "nothing compensated");
    }
}

// Step 3 of 4 says no: steps 2 and 1 are compensated in that order, each
// once; step 3 did nothing (its no), so the barrier answers its
// compensation without the handler; step 4 is never called.
#[tokio::test]
async fn a_failed_step_compensates_the_steps_before_it_newest_first() {
    let (coord, _dir) = coordinator().await;
    let journal = Journal::default();
    let scripts = vec![
        Script::default(),
        Script::default(),
        no("card declined"),
        Script::default(),
    ];
    let (steps, running) = steps(&journal, scripts).await;
    let client = client(&coord).await;
    let err = client
        .submit(Mode::Saga, branches(&running))
        .await
        .expect_err("aborts");
    let Error::Aborted { gtid, reason, .. } = err else {
        panic!("{err:?}");
    };
    assert!(reason.contains("card declined"), "{reason}");
    let gtid = gtid.expect("gtid");
    reaches(&client, gtid, pb::TxState::Aborted).await;
    assert_eq!(
        journal.entries(),
        vec![
            "prepare:s1",
            "prepare:s2",
            "prepare:s3",
            "rollback:s2",
            "rollback:s1"
        ]
    );
    assert_eq!(steps[3].counts(), (0, 0, 0), "step 4 never called");
    let info = client.get(gtid).await.expect("get");
    assert_eq!(states(&info), vec![pb::BranchState::Cancelled; 4]);
}

// Step 2's action outlives its call every time (the call times out, the
// action then completes): retried forward until the saga's deadline, then
// it is compensated, before step 1, each once.
#[tokio::test]
async fn a_timed_out_action_that_ran_late_is_compensated_first() {
    let (coord, _dir) = coordinator().await;
    let journal = Journal::default();
    let late = Script {
        prepare_delay: Duration::from_millis(800), // call timeout: 500 ms
        ..Script::default()
    };
    let (steps, running) = steps(&journal, vec![Script::default(), late]).await;
    let client = client(&coord).await;
    let err = client
        .submit_with_timeout(Mode::Saga, branches(&running), Some(Duration::from_secs(2)))
        .await
        .expect_err("aborts");
    // The deadline aborted it, the step never said no.
    assert_eq!(err.abort_cause(), Some(pb::AbortCause::Deadline), "{err:?}");
    assert!(
        steps[1].prepares.load(std::sync::atomic::Ordering::SeqCst) >= 2,
        "the action was retried forward"
    );
    eventually("both compensated", || {
        steps[0].counts().2 == 1 && steps[1].counts().2 == 1
    })
    .await;
    let entries = journal.entries();
    let at = |e: &str| {
        journal
            .position(e)
            .unwrap_or_else(|| panic!("{e} in {entries:?}"))
    };
    assert!(at("rollback:s2") < at("rollback:s1"), "{entries:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        (steps[0].counts().2, steps[1].counts().2),
        (1, 1),
        "once each"
    );
}

// A compensation that will never succeed: the saga is STUCK with the older
// step not compensated (the walk stops there), the operator settles the
// step by hand, and a retry compensates the older one.
#[tokio::test]
async fn a_compensation_that_never_succeeds_is_stuck_until_an_operator_resolves_it() {
    let (coord, _dir) = coordinator().await;
    let journal = Journal::default();
    let broken = Script {
        phase_two_never: Some("refund API retired".into()),
        ..Script::default()
    };
    let (steps, running) = steps(&journal, vec![Script::default(), broken, no("sold out")]).await;
    let client = client(&coord).await;
    let err = client
        .submit(Mode::Saga, branches(&running))
        .await
        .expect_err("aborts");
    let gtid = aborted(err);
    reaches(&client, gtid, pb::TxState::Stuck).await;
    let info = client.get(gtid).await.expect("get");
    assert!(
        info.branches[1].last_error.contains("refund API retired"),
        "{:?}",
        info.branches[1]
    );
    assert_eq!(steps[0].counts().2, 0, "step 1 waits behind step 2");

    let mut admin = AdminClient::connect(coord.url()).await.expect("admin");
    admin
        .resolve_branch(pb::ResolveBranchRequest {
            gtid: gtid.to_string(),
            branch_id: 2,
            outcome: pb::Decision::Abort as i32,
            reason: "refunded by hand, INC-7".into(),
        })
        .await
        .expect("resolve");
    admin
        .retry_transaction(pb::RetryTransactionRequest {
            gtid: gtid.to_string(),
        })
        .await
        .expect("retry");
    reaches(&client, gtid, pb::TxState::Aborted).await;
    assert_eq!(steps[0].counts().2, 1, "step 1 compensated after the retry");
}

// A saga holds saga steps only: a TCC branch in a saga, or a saga step in
// a TCC transaction, is refused before anything runs.
#[tokio::test]
async fn a_saga_refuses_other_modes_and_other_modes_refuse_saga_steps() {
    let (coord, _dir) = coordinator().await;
    let journal = Journal::default();
    let (steps, running) = steps(&journal, vec![Script::default(), Script::default()]).await;
    let client = client(&coord).await;
    let mut mixed = branches(&running);
    mixed[1] = mixed[1].clone().mode(Mode::Tcc);
    let err = client.submit(Mode::Saga, mixed).await.expect_err("mixed");
    assert!(format!("{err}").contains("saga"), "{err}");
    let mut mixed = branches(&running);
    mixed[0] = mixed[0].clone().mode(Mode::Saga);
    let err = client.submit(Mode::Tcc, mixed).await.expect_err("mixed");
    assert!(format!("{err}").contains("saga"), "{err}");
    assert_eq!(
        (steps[0].counts(), steps[1].counts()),
        ((0, 0, 0), (0, 0, 0))
    );
}

// A participant resolving branches in doubt (GetOutcome says ABORT) leaves
// a saga step's compensation to the coordinator: compensating it there
// would undo step 1 under a step 2 that still stands (STUCK).
#[tokio::test]
async fn in_doubt_resolution_never_compensates_a_saga_step() {
    let dir = tempfile::tempdir().expect("dir");
    let coord = start_coordinator(Arc::new(SledLog::open(dir.path()).expect("log"))).await;
    let journal = Journal::default();
    let s1 = Scripted::new("s1", Script::default(), Some(journal.clone()));
    let s2 = Scripted::new(
        "s2",
        Script {
            phase_two_never: Some("refund API retired".into()),
            ..Script::default()
        },
        Some(journal.clone()),
    );
    let s3 = Scripted::new(
        "s3",
        Script {
            vote_no: Some("sold out".into()),
            ..Script::default()
        },
        Some(journal.clone()),
    );
    // Step 1's participant resolves branches in doubt: it must leave the
    // compensation to the coordinator, which is stopped at step 2.
    let p1 = spawn(
        ParticipantServer::new()
            .resolve_in_doubt(coord.url(), Duration::from_millis(300))
            .saga("r", s1.clone()),
    )
    .await;
    let p2 = s2.serve_saga().await;
    let p3 = s3.serve_saga().await;
    let client = TransactionClient::connect(coord.url())
        .await
        .expect("connect");
    let branches = vec![
        Branch::new(p1.url(), "r", "step 1"),
        Branch::new(p2.url(), "r", "step 2"),
        Branch::new(p3.url(), "r", "step 3"),
    ];
    let err = client
        .submit(Mode::Saga, branches)
        .await
        .expect_err("aborts");
    let gtid = aborted(err);
    reaches(&client, gtid, pb::TxState::Stuck).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        s1.counts().2,
        0,
        "step 1 compensated while step 2 still stands uncompensated (STUCK): {:?}",
        journal.entries()
    );
}

// A graph: steps 2 and 3 both run after step 1, in parallel. Step 3 says
// no after step 2 finished: step 2 (the sibling) is compensated, then
// step 1; each once.
#[tokio::test]
async fn a_parallel_step_failing_after_its_sibling_finished_compensates_the_sibling() {
    let (coord, _dir) = coordinator().await;
    let journal = Journal::default();
    let slow_no = Script {
        prepare_delay: Duration::from_millis(300),
        vote_no: Some("no courier free".into()),
        ..Script::default()
    };
    let (steps, running) = steps(
        &journal,
        vec![Script::default(), Script::default(), slow_no],
    )
    .await;
    let client = client(&coord).await;
    let mut graph = branches(&running);
    graph[1] = graph[1].clone().after(&[1]);
    graph[2] = graph[2].clone().after(&[1]);
    let err = client.submit(Mode::Saga, graph).await.expect_err("aborts");
    let gtid = aborted(err);
    reaches(&client, gtid, pb::TxState::Aborted).await;
    assert_eq!(
        journal.entries(),
        vec![
            "prepare:s1",
            "prepare:s2",
            "prepare:s3",
            "rollback:s2",
            "rollback:s1"
        ],
        "2 ran beside 3 (before 3's slow no), and was undone before 1"
    );
    assert_eq!(steps[1].counts(), (1, 0, 1));
}

// A step may only name earlier steps, and only in a saga.
#[tokio::test]
async fn a_step_naming_a_later_step_or_outside_a_saga_is_refused() {
    let (coord, _dir) = coordinator().await;
    let journal = Journal::default();
    let (steps, running) = steps(&journal, vec![Script::default(), Script::default()]).await;
    let client = client(&coord).await;
    let mut bad = branches(&running);
    bad[0] = bad[0].clone().after(&[2]);
    let err = client
        .submit(Mode::Saga, bad)
        .await
        .expect_err("later step");
    assert!(format!("{err}").contains("not an earlier step"), "{err}");
    let mut bad = branches(&running);
    bad[1] = bad[1].clone().after(&[1]);
    let err = client.submit(Mode::Tcc, bad).await.expect_err("not a saga");
    assert!(format!("{err}").contains("only a saga"), "{err}");
    assert_eq!(
        (steps[0].counts(), steps[1].counts()),
        ((0, 0, 0), (0, 0, 0))
    );
}

// A repeated Submit of a saga must name the same order: the same steps in
// another graph are another transaction, refused (ALREADY_EXISTS); the
// same request (or the default sequence spelled out) is answered with the
// first one's outcome.
#[tokio::test]
async fn a_repeated_saga_submit_with_another_order_is_refused() {
    let (coord, _dir) = coordinator().await;
    let journal = Journal::default();
    let scripts = vec![Script::default(), Script::default(), Script::default()];
    let (steps, running) = steps(&journal, scripts).await;
    let client = client(&coord).await;
    let gtid = tandem_sdk::Gtid::now_v7();
    let timeout = Some(Duration::from_secs(5));
    client
        .submit_as(gtid, Mode::Saga, branches(&running), timeout)
        .await
        .expect("first");
    let mut spelled = branches(&running);
    spelled[1] = spelled[1].clone().after(&[1]);
    spelled[2] = spelled[2].clone().after(&[2]);
    let again = client
        .submit_as(gtid, Mode::Saga, spelled, timeout)
        .await
        .expect("the default sequence spelled out is the same saga");
    assert_eq!(again.gtid, gtid);
    let mut graph = branches(&running);
    graph[1] = graph[1].clone().after(&[1]);
    graph[2] = graph[2].clone().after(&[1]);
    let err = client
        .submit_as(gtid, Mode::Saga, graph, timeout)
        .await
        .expect_err("another order");
    assert!(format!("{err}").contains("already exists"), "{err}");
    for s in &steps {
        assert_eq!(s.counts().0, 1, "each step ran once");
    }
}

// Step 2's action fails twice with an error that may pass (its service
// is briefly down): it is retried forward with backoff, the third call
// goes through, and the saga commits with nothing compensated.
#[tokio::test]
async fn a_failing_action_is_retried_forward_and_the_saga_commits() {
    let (coord, _dir) = coordinator().await;
    let journal = Journal::default();
    let flaky = Script {
        phase_one_failures: std::sync::atomic::AtomicU32::new(2),
        ..Script::default()
    };
    let (steps, running) = steps(&journal, vec![Script::default(), flaky]).await;
    let client = client(&coord).await;
    let done = client
        .submit(Mode::Saga, branches(&running))
        .await
        .expect("commits");
    assert_eq!(
        journal.entries(),
        vec![
            "prepare:s1",
            "prepare-failed:s2",
            "prepare-failed:s2",
            "prepare:s2"
        ]
    );
    // Answered once every step completed (the decision came from a timer's
    // round, not the Submit's): COMMITTED, not COMMITTING.
    assert!(done.complete, "Submit answered before the steps completed");
    reaches(&client, done.gtid, pb::TxState::Committed).await;
    for s in &steps {
        assert_eq!(s.counts().2, 0, "nothing compensated");
    }
}

//! Routing among several `tandem serve` processes on one PostgreSQL store:
//! a request for a transaction another live instance runs is redirected
//! there (the SDK follows by itself), a request for one whose owner died
//! is taken over by the instance it reached, and a client given several
//! coordinators fails over between them.

use std::time::{Duration, Instant};

use tandem_proto::v1 as pb;
use tandem_proto::v1::coordinator_client::CoordinatorClient;
use tandem_sdk::{Branch, ClientOptions, Error, Mode, TransactionClient};
use tandem_tests::Scripted;
use tandem_tests::pg::PgServer;
use tandem_tests::process::{Serve, tandem};

/// `tandem tx show GTID --output json` at `coordinator`.
fn show(coordinator: &str, gtid: &str) -> serde_json::Value {
    let ran = tandem(&[
        "tx",
        "show",
        gtid,
        "--coordinator",
        coordinator,
        "--output",
        "json",
    ]);
    assert!(ran.ok, "tx show failed: {}", ran.stderr);
    serde_json::from_str(&ran.stdout).expect("json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_for_another_instances_transaction_is_redirected_to_it() {
    let pg = PgServer::start();
    let url = pg.create_database("routing").await;
    let data = tempfile::tempdir().expect("dir");
    let a = Serve::start_store(data.path(), &url, "a", "127.0.0.1:0", "1s");
    let b = Serve::start_store(data.path(), &url, "b", "127.0.0.1:0", "1s");
    let scripted = Scripted::yes("p");
    let p = scripted.serve().await;
    let branch = || Branch::new(p.url(), "r", "x");

    let at_a = TransactionClient::connect(&a.url).await.expect("a");
    let gtid = at_a.begin(Mode::TwoPhase).await.expect("begin at a");

    // A plain gRPC client sent to b learns where the transaction runs.
    let mut raw = CoordinatorClient::connect(b.url.clone()).await.expect("b");
    let refused = raw
        .enlist(pb::EnlistRequest {
            gtid: gtid.to_string(),
            branch: Some(pb::BranchSpec {
                endpoint: p.url().to_string(),
                resource: "r".into(),
                payload: "x".into(),
                mode: 0,
                after: Vec::new(),
            }),
        })
        .await
        .expect_err("b does not run it");
    assert_eq!(refused.code(), tonic::Code::Unavailable);
    assert_eq!(
        tandem_proto::rpc::moved_to(&refused).as_deref(),
        Some(a.url.as_str()),
        "{refused:?}"
    );
    assert!(refused.message().contains("coordinator a"), "{refused:?}");
    assert_eq!(scripted.counts().0, 0, "b ran nothing of it");

    // The SDK client given only b follows the redirect, for every call.
    let at_b = TransactionClient::connect(&b.url).await.expect("b");
    at_b.enlist(gtid, branch()).await.expect("enlist via b");
    at_b.enlist(gtid, branch()).await.expect("enlist via b");
    let done = at_b.commit(gtid).await.expect("commit via b");
    assert!(done.complete);
    assert_eq!(scripted.counts(), (2, 2, 0));

    // Either instance shows it, with its owner and epoch (another instance
    // shows the store's copy: at most one flush behind the owner's).
    for coordinator in [&a.url, &b.url] {
        let deadline = Instant::now() + Duration::from_secs(5);
        let t = loop {
            let t = show(coordinator, &gtid.to_string());
            if t["state"] == "COMMITTED" || Instant::now() > deadline {
                break t;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(t["state"], "COMMITTED", "{t}");
        assert_eq!(t["owner"], "a", "{t}");
        assert_eq!(t["owner_address"], a.url.as_str(), "{t}");
        assert_eq!(t["epoch"], 1, "{t}");
    }
    // And either lists it: the list reads the shared store.
    let listed = tandem(&["tx", "list", "--coordinator", &b.url]);
    assert!(listed.ok && listed.stdout.contains(&gtid.to_string()));

    // A repeated Submit that reaches the other instance waits for the
    // first one's outcome there: it never runs twice.
    let one = tandem_sdk::Gtid::now_v7();
    let (first, repeat) = tokio::join!(
        at_a.submit_as(one, Mode::TwoPhase, vec![branch()], None),
        async {
            tokio::time::sleep(Duration::from_millis(5)).await;
            at_b.submit_as(one, Mode::TwoPhase, vec![branch()], None)
                .await
        }
    );
    let (first, repeat) = (first.expect("first"), repeat.expect("repeat"));
    assert_eq!(first.gtid, repeat.gtid);
    assert_eq!(scripted.counts(), (3, 3, 0), "the repeat ran nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_owners_transaction_is_taken_over_by_the_instance_a_request_reaches() {
    let pg = PgServer::start();
    let url = pg.create_database("orphans").await;
    let data = tempfile::tempdir().expect("dir");
    let a = Serve::start_store(data.path(), &url, "a", "127.0.0.1:0", "1s");
    let b = Serve::start_store(data.path(), &url, "b", "127.0.0.1:0", "1s");
    let scripted = Scripted::phase_two_down("p");
    let p = scripted.serve().await;
    let branch = || Branch::new(p.url(), "r", "x");
    let a_url = a.url.clone();

    let at_a = TransactionClient::connect(&a.url).await.expect("a");
    // Undecided: prepared, never committed.
    let open = at_a.begin(Mode::TwoPhase).await.expect("begin");
    at_a.enlist(open, branch()).await.expect("enlist");
    // Decided: commit acknowledged, phase 2 still failing.
    let decided = at_a.begin(Mode::TwoPhase).await.expect("begin");
    at_a.enlist(decided, branch()).await.expect("enlist");
    let c = at_a.commit(decided).await.expect("commit");
    assert!(!c.complete);
    a.kill();
    let killed = Instant::now();

    // A client that knows both fails over to b; b redirects to a while a's
    // lease runs, then takes the transaction over for the request.
    let both = TransactionClient::connect_many(
        [a_url.as_str(), b.url.as_str()],
        &ClientOptions::default(),
    )
    .expect("client");
    let outcome = loop {
        match both.commit(open).await {
            Err(Error::Unavailable { .. }) if killed.elapsed() < Duration::from_secs(10) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => break other,
        }
    };
    let took = killed.elapsed();
    println!("undecided transaction answered by b {took:?} after its owner was killed");
    match outcome {
        Err(Error::Aborted { .. }) => {}
        Err(Error::Invalid { message, .. }) if message.contains("its outcome is abort") => {}
        other => panic!("an undecided transaction of a dead owner aborts, got {other:?}"),
    }
    assert!(
        took < Duration::from_secs(3),
        "took {took:?} with a 1 s lease"
    );
    let t = show(&b.url, &open.to_string());
    assert_eq!(t["owner"], "b", "{t}");
    assert_eq!(t["epoch"], 2, "{t}");

    // The decided one: b finishes its commit once the participant is back.
    scripted
        .script
        .phase_two_failures
        .store(0, std::sync::atomic::Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let t = show(&b.url, &decided.to_string());
        if t["state"] == "COMMITTED" {
            assert_eq!(t["owner"], "b", "{t}");
            assert_eq!(t["epoch"], 2, "{t}");
            break;
        }
        assert!(Instant::now() < deadline, "never committed: {t}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(scripted.counts().1, 1, "one commit for the decided branch");
    // The undecided one's rollback runs after its answer, and may be
    // waiting out a retry from while the participant failed phase 2.
    let deadline = Instant::now() + Duration::from_secs(15);
    while scripted.counts().2 == 0 {
        assert!(
            Instant::now() < deadline,
            "the undecided branch never rolled back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        scripted.counts().2,
        1,
        "one rollback for the undecided branch"
    );
    assert_eq!(scripted.held_count(), 0);

    // New work goes through b while a is down.
    let s = both
        .submit(Mode::TwoPhase, vec![branch()])
        .await
        .expect("submit fails over to b");
    assert!(s.complete);
}

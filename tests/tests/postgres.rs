//! PostgreSQL participants end to end: a real PostgreSQL server started by
//! each test, bank shards as `bank-postgres` processes on two databases, a
//! `tandem serve` coordinator process, and real kills.

use std::time::Duration;

use tandem_examples::bank::Leg;
use tandem_proto::v1 as pb;
use tandem_sdk::{Branch, Error, Mode, TransactionClient};
use tandem_tests::eventually_async;
use tandem_tests::pg::{PgServer, Shard, balance, prepared_xacts};
use tandem_tests::process::Serve;

/// Two shard databases on one server: `shard1` holds alice and bob,
/// `shard2` holds carol and dave.
struct Bank {
    pg: PgServer,
    db1: String,
    db2: String,
}

impl Bank {
    async fn new() -> Bank {
        let pg = PgServer::start();
        let db1 = pg.create_database("shard1").await;
        let db2 = pg.create_database("shard2").await;
        Bank { pg, db1, db2 }
    }

    fn shard1(&self, coordinator: Option<&str>, extra: &[&str]) -> Shard {
        Shard::start(&self.db1, &["alice", "bob"], coordinator, extra)
    }

    fn shard2(&self, coordinator: Option<&str>, extra: &[&str]) -> Shard {
        Shard::start(&self.db2, &["carol", "dave"], coordinator, extra)
    }

    /// (alice, carol) balances.
    async fn balances(&self) -> (i64, i64) {
        let (c1, c2) = (
            self.pg.connect("shard1").await,
            self.pg.connect("shard2").await,
        );
        (balance(&c1, "alice").await, balance(&c2, "carol").await)
    }

    /// Prepared transactions left in both databases.
    async fn prepared(&self) -> Vec<String> {
        let mut all = prepared_xacts(&self.pg.connect("shard1").await).await;
        all.extend(prepared_xacts(&self.pg.connect("shard2").await).await);
        all
    }
}

/// A business-service client of `coord`.
async fn client(coord: &Serve) -> TransactionClient {
    TransactionClient::connect(&coord.url)
        .await
        .expect("connect")
}

/// alice (shard 1) pays carol (shard 2) `amount`.
fn transfer(s1: &Shard, s2: &Shard, amount: i64, tcc: bool) -> Vec<Branch> {
    let resource = if tcc { "accounts-tcc" } else { "accounts" };
    vec![
        Branch::new(&s1.url, resource, Leg::debit("alice", amount).encode()),
        Branch::new(&s2.url, resource, Leg::credit("carol", amount).encode()),
    ]
}

/// A coordinator with quick retries (or none within a test's time, with
/// `slow_retries`, so that only participants can resolve).
fn coordinator(data: &std::path::Path, slow_retries: bool) -> Serve {
    let retry: &[&str] = if slow_retries {
        &["--retry-initial", "10m", "--retry-max", "10m"]
    } else {
        &["--retry-initial", "50ms", "--retry-max", "500ms"]
    };
    Serve::start_with(data, retry, &[])
}

// A 2PC transfer across two databases commits on both; a vote no
// (insufficient funds) leaves both unchanged and nothing prepared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pc_transfer_across_databases_commits_on_both_or_neither() {
    let bank = Bank::new().await;
    let data = tempfile::tempdir().expect("data");
    let coord = coordinator(data.path(), false);
    let (s1, s2) = (bank.shard1(None, &[]), bank.shard2(None, &[]));
    let client = client(&coord).await;

    let done = client
        .submit(Mode::TwoPhase, transfer(&s1, &s2, 300, false))
        .await
        .expect("transfer commits");
    eventually_async("both branches committed", || async {
        bank.prepared().await.is_empty() && bank.balances().await == (700, 1300)
    })
    .await;
    let info = client.get(done.gtid).await.expect("get");
    assert_eq!(info.state, pb::TxState::Committed as i32);

    let refused = client
        .submit(Mode::TwoPhase, transfer(&s1, &s2, 5000, false))
        .await;
    match refused {
        Err(Error::Aborted { reason, .. }) => {
            assert!(reason.contains("insufficient funds"), "{reason}")
        }
        other => panic!("expected an abort, got {other:?}"),
    }
    eventually_async("rollback reached both", || async {
        bank.prepared().await.is_empty()
    })
    .await;
    assert_eq!(bank.balances().await, (700, 1300), "unchanged by the no");
}

/// Kills shard 2 at `point` of a 2PC transfer of 100 from alice to carol,
/// restarts it, and waits for its prepared transaction to be finished the
/// coordinator's way: `commit` or not. The coordinator's own retries are
/// slowed to minutes, so the restarted shard's resolver is what finishes it.
async fn participant_crash_is_resolved(point: &str, commit: bool) {
    let bank = Bank::new().await;
    let data = tempfile::tempdir().expect("data");
    let coord = coordinator(data.path(), true);
    let s1 = bank.shard1(Some(&coord.url), &[]);
    let mut s2 = bank.shard2(Some(&coord.url), &["--crash-at", point]);
    let client = client(&coord).await;

    let outcome = client
        .submit(Mode::TwoPhase, transfer(&s1, &s2, 100, false))
        .await;
    // After prepare the vote is lost (abort); before commit it was decided.
    assert_eq!(outcome.is_ok(), commit, "{point}: {outcome:?}");
    assert!(!s2.wait().success());
    let left = prepared_xacts(&bank.pg.connect("shard2").await).await;
    assert_eq!(
        left.len(),
        1,
        "{point}: the crash left carol's credit prepared: {left:?}"
    );

    s2.restart(&[]);
    let expected = if commit { (900, 1100) } else { (1000, 1000) };
    eventually_async("the prepared transaction is finished", || async {
        bank.prepared().await.is_empty() && bank.balances().await == expected
    })
    .await;
}

// A participant killed right after PREPARE TRANSACTION (its yes vote never
// sent, so the coordinator aborts) rolls the prepared transaction back
// after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn participant_killed_after_prepare_follows_the_abort_on_restart() {
    participant_crash_is_resolved("after-prepare", false).await;
}

// A participant killed when the commit arrives, before COMMIT PREPARED,
// commits after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn participant_killed_before_commit_prepared_commits_on_restart() {
    participant_crash_is_resolved("before-commit", true).await;
}

// The coordinator dies right after forcing a commit decision, before any
// COMMIT PREPARED; restarted on its log, recovery commits both prepared
// transactions (the shards do not ask: only the coordinator can finish).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_killed_after_the_decision_commits_prepared_on_restart() {
    let bank = Bank::new().await;
    let data = tempfile::tempdir().expect("data");
    let coord = Serve::start_with(
        data.path(),
        &["--retry-initial", "50ms"],
        &[("TANDEM_FAILPOINT", "after-decision-forced")],
    );
    let addr = coord.addr().to_string();
    let (s1, s2) = (bank.shard1(None, &[]), bank.shard2(None, &[]));
    let client = client(&coord).await;
    let outcome = client
        .submit(Mode::TwoPhase, transfer(&s1, &s2, 250, false))
        .await;
    assert!(outcome.is_err(), "the coordinator died mid-call");
    let status = tokio::task::spawn_blocking(move || coord.wait())
        .await
        .expect("wait");
    assert!(!status.success());
    assert_eq!(bank.prepared().await.len(), 2, "both branches prepared");
    assert_eq!(bank.balances().await, (1000, 1000), "nothing visible yet");

    let _coord = Serve::start_on(data.path(), &addr, &["--retry-initial", "50ms"], &[]);
    eventually_async("recovery commits both", || async {
        bank.prepared().await.is_empty() && bank.balances().await == (750, 1250)
    })
    .await;
}

// TCC: the participant dies after its confirm (business change and
// barrier record, one transaction) committed but before answering. The
// coordinator repeats the confirm after the restart; the barrier finds
// Confirmed and the credit is not applied twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcc_confirm_repeated_after_a_crash_is_a_no_op() {
    let bank = Bank::new().await;
    let data = tempfile::tempdir().expect("data");
    let coord = coordinator(data.path(), false);
    let s1 = bank.shard1(None, &[]);
    let mut s2 = bank.shard2(None, &["--crash-at", "after-confirm"]);
    let client = client(&coord).await;

    let submitted = client
        .submit(Mode::Tcc, transfer(&s1, &s2, 40, true))
        .await
        .expect("decided commit");
    assert!(!s2.wait().success());
    assert_eq!(bank.balances().await.1, 1040, "the confirm committed");
    s2.restart(&[]);
    eventually_async("the repeated confirm is acknowledged", || async {
        client
            .get(submitted.gtid)
            .await
            .is_ok_and(|i| i.state == pb::TxState::Committed as i32)
    })
    .await;
    let info = client.get(submitted.gtid).await.expect("get");
    let carol = info
        .branches
        .iter()
        .find(|b| b.branch_id == 2)
        .expect("branch 2");
    assert!(carol.attempts >= 2, "confirm was repeated: {carol:?}");
    assert_eq!(bank.balances().await, (960, 1040), "credited once");
    let c2 = bank.pg.connect("shard2").await;
    let (holds, frozen): (i64, i64) = {
        let row = c2
            .query_one(
                "SELECT (SELECT count(*) FROM bank_holds), (SELECT sum(frozen)::bigint FROM bank_accounts)",
                &[],
            )
            .await
            .expect("query");
        (row.get(0), row.get(1))
    };
    assert_eq!((holds, frozen), (0, 0));
}

// TCC on PostgreSQL: a cancel with no try is an empty rollback (recorded),
// and a try arriving after it is refused without reserving anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcc_empty_rollback_and_late_try_on_postgres() {
    let bank = Bank::new().await;
    let s1 = bank.shard1(None, &[]);
    let mut rpc = pb::participant_client::ParticipantClient::connect(s1.url.clone())
        .await
        .expect("connect");
    let gtid = uuid::Uuid::now_v7();
    let req = |attempt| pb::BranchRequest {
        gtid: gtid.to_string(),
        branch_id: 1,
        resource: "accounts-tcc".into(),
        payload: Leg::debit("alice", 500).encode(),
        attempt,
        epoch: 1,
        mode: 0,
    };
    rpc.cancel(req(1)).await.expect("empty cancel is OK");
    let vote = rpc.r#try(req(1)).await.expect("try").into_inner();
    assert!(!vote.yes, "late try refused");
    assert!(
        vote.reason.contains("cancelled before the try"),
        "{}",
        vote.reason
    );

    let c1 = bank.pg.connect("shard1").await;
    let row = c1
        .query_one(
            "SELECT (SELECT mark FROM tandem_barrier WHERE gtid = $1),
                    (SELECT count(*) FROM bank_holds),
                    (SELECT frozen FROM bank_accounts WHERE id = 'alice')",
            &[&gtid],
        )
        .await
        .expect("query");
    let (mark, holds, frozen): (i16, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(
        (mark, holds, frozen),
        (5, 0, 0),
        "EmptyCancelled, nothing held"
    );
}

// The database goes away. A prepare cannot run: the transfer aborts with
// the driver's reason and nothing is prepared. A commit decided while the
// database is down is retried until it is back, then applied on both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_database_aborts_prepare_and_delays_commit() {
    let bank = Bank::new().await;
    let data = tempfile::tempdir().expect("data");
    let coord = coordinator(data.path(), false);
    let (s1, s2) = (bank.shard1(None, &[]), bank.shard2(None, &[]));
    let client = client(&coord).await;

    bank.pg.stop();
    let refused = client
        .submit(Mode::TwoPhase, transfer(&s1, &s2, 10, false))
        .await;
    match refused {
        Err(Error::Aborted { reason, .. }) => {
            eprintln!("abort reason with the database down: {reason}");
            assert!(
                reason.contains("postgres") || reason.contains("connection"),
                "reason names the database: {reason}"
            )
        }
        other => panic!("expected an abort, got {other:?}"),
    }
    bank.pg.restart();
    assert!(bank.prepared().await.is_empty(), "nothing prepared");
    assert_eq!(bank.balances().await, (1000, 1000));

    // Both prepared, then the database stops before the commit.
    let gtid = client.begin(Mode::TwoPhase).await.expect("begin");
    for branch in transfer(&s1, &s2, 10, false) {
        client.enlist(gtid, branch).await.expect("prepared");
    }
    bank.pg.stop();
    let outcome = client.commit(gtid).await.expect("the decision is commit");
    assert!(
        !outcome.complete,
        "phase 2 cannot finish without the database"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    bank.pg.restart();
    eventually_async("the commit is retried until applied", || async {
        bank.prepared().await.is_empty() && bank.balances().await == (990, 1010)
    })
    .await;
}

// A saga transfer on PostgreSQL: each leg moves the money at once, in its
// barrier transaction. Credit to an account the shard does not have: the
// credit says no and the debit is compensated (alice back to her
// balance); then a transfer that goes through moves the money.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saga_transfer_moves_the_money_or_moves_it_back() {
    let bank = Bank::new().await;
    let data = tempfile::tempdir().expect("data");
    let coord = coordinator(data.path(), false);
    let (s1, s2) = (bank.shard1(None, &[]), bank.shard2(None, &[]));
    let client = client(&coord).await;
    let legs = |to: &str, amount: i64| {
        vec![
            Branch::new(
                &s1.url,
                "accounts-saga",
                Leg::debit("alice", amount).encode(),
            ),
            Branch::new(&s2.url, "accounts-saga", Leg::credit(to, amount).encode()),
        ]
    };
    let refused = client.submit(Mode::Saga, legs("mallory", 300)).await;
    match refused {
        Err(Error::Aborted { reason, .. }) => {
            assert!(reason.contains("unknown account"), "{reason}")
        }
        other => panic!("the credit must say no: {other:?}"),
    }
    eventually_async("alice's debit compensated", || async {
        bank.balances().await == (1000, 1000)
    })
    .await;
    client
        .submit(Mode::Saga, legs("carol", 300))
        .await
        .expect("the saga completes");
    assert_eq!(bank.balances().await, (700, 1300));
}

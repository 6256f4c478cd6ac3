//! A transactional message dropped on an operator's word (STUCK,
//! undecided: its back-check kept failing), on a PostgreSQL store shared
//! by instances; retention (an instance whose clock is half an hour on)
//! removes it. The business service's late SubmitMessage (its local
//! transaction committed after all) still hears ABORTED at every instance,
//! as before the purge: a dropped message keeps a tombstone, and a Submit
//! of a gtid the log no longer has is answered from it (never NOT_FOUND,
//! which `PgMessages::send` would take for "the check delivers it").

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tandem_coordinator::config::RetryPolicy;
use tandem_coordinator::engine::NewBranch;
use tandem_coordinator::error::CoordError;
use tandem_coordinator::log::{PgLog, PgOptions};
use tandem_coordinator::model::{Gtid, Mode, TraceContext, TxState, now_ms};
use tandem_coordinator::runtime::{CallFuture, Clock, Environment, Transport};
use tandem_coordinator::{Coordinator, CoordinatorConfig};
use tandem_proto::v1::{BranchRequest, VoteResponse};
use tandem_tests::pg::PgServer;

const MINUTE_MS: i64 = 60_000;

/// The back-check never answers (its database hung); deliveries succeed.
#[derive(Debug, Default)]
struct CheckDown;

impl Transport for CheckDown {
    fn phase_one(
        &self,
        _: &str,
        _: Mode,
        _: BranchRequest,
        _: Option<TraceContext>,
        _: Duration,
    ) -> CallFuture<'_, VoteResponse> {
        Box::pin(async { Err("check: lock timeout".into()) })
    }

    fn phase_two(
        &self,
        _: &str,
        _: Mode,
        _: bool,
        _: BranchRequest,
        _: Option<TraceContext>,
        _: Duration,
    ) -> CallFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
}

fn instance(url: &str, name: &str, skew_ms: i64) -> Coordinator {
    let mut o = PgOptions::new(url, name);
    o.lease = Duration::from_secs(2);
    o.store_timeout = Duration::from_secs(5);
    let log = Arc::new(PgLog::open(o).expect("open the store"));
    let config = CoordinatorConfig {
        retention: Duration::from_secs(120),
        decision_retention: Some(Duration::from_secs(3600)),
        retry: RetryPolicy {
            initial: Duration::from_millis(10),
            max: Duration::from_millis(20),
            max_attempts: Some(1),
            max_duration: None,
        },
        ..CoordinatorConfig::default()
    };
    let env = Environment {
        transport: Some(Arc::new(CheckDown)),
        clock: Clock::tokio(now_ms().saturating_add_signed(skew_ms)),
        ..Environment::default()
    };
    Coordinator::with_environment(config, log, env).expect("coordinator")
}

fn branch(endpoint: &str, resource: &str) -> NewBranch {
    NewBranch {
        endpoint: endpoint.into(),
        resource: resource.into(),
        payload: Bytes::from_static(b"ship order 7"),
        mode: None,
        after: Vec::new(),
    }
}

async fn stuck_message(a: &Coordinator) -> Gtid {
    let gtid = Gtid::now_v7();
    a.prepare_message(
        gtid,
        branch("http://shop:1", "orders"),
        vec![branch("http://inbox:1", "inbox")],
        Some(Duration::from_millis(100)),
        Vec::new(),
        None,
    )
    .await
    .expect("prepare");
    for _ in 0..300 {
        if a.get(gtid).expect("get").state == TxState::Stuck {
            return gtid;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never STUCK: {:?}", a.get(gtid));
}

async fn after_purge(a: &Coordinator, b: &Coordinator, gtid: Gtid, url: &str) {
    let sweeper = instance(url, "sweeper", 30 * MINUTE_MS);
    sweeper.start_recovery().await.expect("start sweeper");
    assert!(sweeper.sweep_now().await.expect("sweep") >= 1, "purged");
    for (name, at) in [("a", a), ("b", b)] {
        let late = at.submit_message(gtid).await;
        println!("late SubmitMessage at {name}: {late:?}");
        println!("GetOutcome at {name}: {:?}", at.outcome(gtid));
        assert!(
            matches!(late, Err(CoordError::Aborted { .. })),
            "a dropped message's late Submit at {name} is not ABORTED after retention: \
             {late:?} (PgMessages::send reports this as success)"
        );
    }
}

// Dropped by `tandem tx abort` once STUCK: every branch ROLLED_BACK, no
// resolution, so retention keeps no tombstone.
#[tokio::test]
async fn a_message_aborted_by_an_operator_is_still_dropped_after_retention() {
    let pg = PgServer::start();
    let url = pg.create_database("msg_abort").await;
    let a = instance(&url, "a", 0);
    a.start_recovery().await.expect("start a");
    let b = instance(&url, "b", 0);
    b.start_recovery().await.expect("start b");
    let gtid = stuck_message(&a).await;
    let before = b.submit_message(gtid).await;
    println!("Submit at b while STUCK (redirect expected): {before:?}");
    let state = a
        .abort(gtid, "INC-7: the shop's database is gone".into())
        .await
        .expect("abort");
    assert_eq!(state, TxState::Aborted);
    assert!(
        matches!(
            a.submit_message(gtid).await,
            Err(CoordError::Aborted { .. })
        ),
        "before retention: ABORTED"
    );
    after_purge(&a, &b, gtid, &url).await;
}

// Dropped by `tandem tx resolve --branch 1 --as rolled-back`: a
// tombstone (ABORT) is kept.
#[tokio::test]
async fn a_message_resolved_rolled_back_is_still_dropped_after_retention() {
    let pg = PgServer::start();
    let url = pg.create_database("msg_resolve").await;
    let a = instance(&url, "a", 0);
    a.start_recovery().await.expect("start a");
    let b = instance(&url, "b", 0);
    b.start_recovery().await.expect("start b");
    let gtid = stuck_message(&a).await;
    let state = a
        .resolve(gtid, 1, false, "ops".into(), "INC-8: not committed".into())
        .await
        .expect("resolve");
    println!("resolved: {state:?}");
    assert!(
        matches!(
            a.submit_message(gtid).await,
            Err(CoordError::Aborted { .. })
        ),
        "before retention: ABORTED"
    );
    after_purge(&a, &b, gtid, &url).await;
}

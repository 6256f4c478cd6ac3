//! What retention may forget, on one real PostgreSQL store shared by
//! several coordinator instances (DESIGN.md, "What retention may forget"):
//! a tombstone one instance keeps answers at every other, and the horizon
//! one raises refuses a repeated gtid at every other, whatever their
//! clocks. Instances' clocks are set apart by hand (`Clock::tokio` with
//! another base) to play clock skew.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tandem_coordinator::config::RetryPolicy;
use tandem_coordinator::engine::NewBranch;
use tandem_coordinator::error::CoordError;
use tandem_coordinator::log::{PgLog, PgOptions};
use tandem_coordinator::model::{Decision, Gtid, Mode, TxState, now_ms};
use tandem_coordinator::runtime::{Clock, Environment};
use tandem_coordinator::{Coordinator, CoordinatorConfig};
use tandem_tests::down_net::{DOWN, DownNet as Net};
use tandem_tests::pg::PgServer;

const MINUTE_MS: i64 = 60_000;

/// Instance `name` on the store at `url`, its clock `skew_ms` off.
fn instance(url: &str, name: &str, net: &Arc<Net>, skew_ms: i64) -> Coordinator {
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
        transport: Some(net.clone()),
        clock: Clock::tokio(now_ms().saturating_add_signed(skew_ms)),
        ..Environment::default()
    };
    Coordinator::with_environment(config, log, env).expect("coordinator")
}

fn branches() -> Vec<NewBranch> {
    [("http://a:1", "a"), (DOWN, "b")]
        .map(|(endpoint, resource)| NewBranch {
            endpoint: endpoint.into(),
            resource: resource.into(),
            payload: Bytes::from_static(b"x"),
            mode: None,
            after: Vec::new(),
        })
        .to_vec()
}

// Rule: no gtid ever decided COMMIT is answered ABORT, whatever retention
// removed, at any instance of a shared store. Instance `a` commits a
// transaction whose second branch goes STUCK and is settled by hand;
// instance `sweeper` (its clock half an hour ahead, so retention is due)
// removes the record, keeping a tombstone; instance `b`, asked by that
// branch's participant, answers COMMIT and shows the compacted record; a
// repeat of the client's gtid at `b` is refused, not started again,
// though to `b`'s clock the gtid is seconds old.
#[tokio::test]
async fn a_commit_settled_by_hand_is_commit_at_every_instance_after_retention() {
    let pg = PgServer::start();
    let url = pg.create_database("tombstones").await;
    let net = Arc::new(Net {
        phase_one: AtomicUsize::new(0),
        down: AtomicBool::new(true),
    });
    let gtid = Gtid::now_v7();
    let a = instance(&url, "a", &net, 0);
    a.start_recovery().await.expect("start a");
    let out = a
        .submit(
            Mode::TwoPhase,
            None,
            branches(),
            Some(gtid),
            Vec::new(),
            None,
        )
        .await
        .expect("submit");
    assert_eq!(out.state, TxState::Committing, "{out:?}");
    for _ in 0..300 {
        if a.get(gtid).expect("get").state == TxState::Stuck {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let state = a
        .resolve(gtid, 2, true, "ops".into(), "INC-1: applied by hand".into())
        .await
        .expect("resolve");
    assert_eq!(state, TxState::Committed);
    assert_eq!(net.phase_one.load(Ordering::SeqCst), 2);

    let sweeper = instance(&url, "sweeper", &net, 30 * MINUTE_MS);
    sweeper.start_recovery().await.expect("start sweeper");
    assert_eq!(sweeper.sweep_now().await.expect("sweep"), 1);

    let b = instance(&url, "b", &net, 0);
    b.start_recovery().await.expect("start b");
    for at in [&a, &b, &sweeper] {
        assert_eq!(
            at.outcome(gtid).expect("outcome"),
            Some(Decision::Commit),
            "the participant of the branch settled by hand would roll it back"
        );
        let shown = at.get(gtid).expect("compacted, still shown");
        assert!(shown.compacted, "{shown:?}");
        assert_eq!(shown.decision, Some(Decision::Commit));
    }
    assert_eq!(
        b.outcome(Gtid::now_v7()).expect("outcome"),
        Some(Decision::Abort),
        "a gtid never seen is still presumed abort"
    );

    net.down.store(false, Ordering::SeqCst);
    let again = b
        .submit(
            Mode::TwoPhase,
            None,
            branches(),
            Some(gtid),
            Vec::new(),
            None,
        )
        .await;
    assert_eq!(
        net.phase_one.load(Ordering::SeqCst),
        2,
        "the purged gtid was started a second time: {again:?}"
    );
    assert!(
        matches!(&again, Err(CoordError::InvalidArgument(m)) if m.contains("retention")),
        "{again:?}"
    );
}

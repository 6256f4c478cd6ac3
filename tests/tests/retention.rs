//! Retention, on paused tokio time (the coordinator's clock is tokio's, so
//! minutes pass instantly): finished records are removed, STUCK ones kept,
//! and a client-chosen gtid can never start a second transaction once its
//! record is gone.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tandem_coordinator::config::RetryPolicy;
use tandem_coordinator::engine::NewBranch;
use tandem_coordinator::error::CoordError;
use tandem_coordinator::log::MemLog;
use tandem_coordinator::model::{Gtid, Mode, TxState, now_ms};
use tandem_coordinator::runtime::{CallFuture, Clock, Environment, Transport};
use tandem_coordinator::{Coordinator, CoordinatorConfig};
use tandem_proto::v1::{BranchRequest, VoteResponse};

/// The shortest retention the configuration accepts.
const RETENTION: Duration = Duration::from_secs(120);

/// Participants in this process: every phase 1 votes yes; phase 2 fails at
/// the endpoint `DOWN` and succeeds elsewhere.
#[derive(Default)]
struct Net {
    tries: AtomicUsize,
}

const DOWN: &str = "http://down:1";

impl Transport for Net {
    fn phase_one(
        &self,
        _: &str,
        _: Mode,
        _: BranchRequest,
        _trace: Option<tandem_coordinator::model::TraceContext>,
        _: Duration,
    ) -> CallFuture<'_, VoteResponse> {
        self.tries.fetch_add(1, Ordering::SeqCst);
        Box::pin(async {
            Ok(VoteResponse {
                yes: true,
                ..Default::default()
            })
        })
    }
    fn phase_two(
        &self,
        endpoint: &str,
        _: Mode,
        _: bool,
        _: BranchRequest,
        _trace: Option<tandem_coordinator::model::TraceContext>,
        _: Duration,
    ) -> CallFuture<'_, ()> {
        let down = endpoint == DOWN;
        Box::pin(async move {
            if down {
                Err("down for maintenance".into())
            } else {
                Ok(())
            }
        })
    }
}

fn coordinator(net: &Arc<Net>) -> Coordinator {
    let config = CoordinatorConfig {
        retention: RETENTION,
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
        clock: Clock::tokio(now_ms()),
        ..Environment::default()
    };
    let coord =
        Coordinator::with_environment(config, Arc::new(MemLog::new()), env).expect("coordinator");
    coord.start_retention();
    coord
}

fn branch(endpoint: &str) -> NewBranch {
    NewBranch {
        endpoint: endpoint.into(),
        resource: "r".into(),
        payload: Bytes::from_static(b"x"),
        mode: None,
        after: Vec::new(),
    }
}

fn pair(second: &str) -> Vec<NewBranch> {
    vec![branch("http://a:1"), branch(second)]
}

// Rule (retention): finished records are removed from the log after the
// retention period, in the background; a STUCK one is kept.
#[tokio::test(start_paused = true)]
async fn retention_removes_finished_records_and_keeps_stuck_ones() {
    let net = Arc::new(Net::default());
    let coord = coordinator(&net);
    coord.start_recovery().await.expect("start");
    let mut finished = Vec::new();
    for _ in 0..5 {
        let out = coord
            .submit(
                Mode::TwoPhase,
                None,
                pair("http://b:1"),
                None,
                Vec::new(),
                None,
            )
            .await
            .expect("submit");
        assert_eq!(out.state, TxState::Committed);
        finished.push(out.gtid);
    }
    let stuck = coord
        .submit(Mode::TwoPhase, None, pair(DOWN), None, Vec::new(), None)
        .await
        .expect("submit")
        .gtid;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(coord.get(stuck).expect("get").state, TxState::Stuck);

    tokio::time::sleep(RETENTION - Duration::from_secs(5)).await;
    assert!(
        finished.iter().all(|g| coord.get(*g).is_ok()),
        "kept until due"
    );
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(
        finished.iter().all(|g| coord.get(*g).is_err()),
        "finished records removed"
    );
    assert_eq!(coord.purged(), 5);
    assert_eq!(coord.get(stuck).expect("kept").state, TxState::Stuck);
}

// A client's gtid may be up to a minute ahead of the coordinator's clock.
// Such a transaction, finished and removed by retention, must not be
// started again by a late repeat: a gtid is taken as new only while no
// record with it can have been removed yet (its age at most
// min(1 h, retention) less that minute).
#[tokio::test(start_paused = true)]
async fn a_repeat_after_retention_never_starts_the_gtid_again() {
    let net = Arc::new(Net::default());
    let coord = coordinator(&net);
    coord.start_recovery().await.expect("start");
    let ahead = now_ms() + 59_000;
    let gtid: Gtid = uuid::Builder::from_unix_timestamp_millis(ahead, &[7; 10]).into_uuid();
    let first = coord
        .submit(
            Mode::Tcc,
            None,
            pair("http://b:1"),
            Some(gtid),
            Vec::new(),
            None,
        )
        .await
        .expect("submit");
    assert_eq!(first.state, TxState::Committed);
    assert_eq!(net.tries.load(Ordering::SeqCst), 2);

    // Retention removes the record (sweeps every 12 s).
    tokio::time::sleep(RETENTION + Duration::from_secs(13)).await;
    assert!(coord.get(gtid).is_err(), "removed by retention");

    let again = coord
        .submit(
            Mode::Tcc,
            None,
            pair("http://b:1"),
            Some(gtid),
            Vec::new(),
            None,
        )
        .await;
    assert_eq!(
        net.tries.load(Ordering::SeqCst),
        2,
        "the gtid was started a second time: {again:?}"
    );
    assert!(
        matches!(again, Err(CoordError::InvalidArgument(_))),
        "{again:?}"
    );
}

// Retention below two minutes is refused: with a client gtid up to a
// minute ahead, shorter retention leaves no window in which a repeat is
// told apart from a new transaction.
#[test]
fn retention_below_two_minutes_is_refused() {
    let config = CoordinatorConfig {
        retention: Duration::from_secs(119),
        ..CoordinatorConfig::default()
    };
    let err = Coordinator::new(config, Arc::new(MemLog::new())).err();
    assert!(
        err.as_ref()
            .is_some_and(|e| e.to_string().contains("retention")),
        "{:?}",
        err.map(|e| e.to_string())
    );
}

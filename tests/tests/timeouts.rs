//! Timeouts and the retry policy, one rule per test. The deadline test runs
//! on paused tokio time: no sleeping, no flakiness.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tandem_coordinator::config::RetryPolicy;
use tandem_coordinator::log::MemLog;
use tandem_coordinator::model::{Mode, TxState};
use tandem_coordinator::{Coordinator, RunningCoordinator};
use tandem_sdk::TransactionClient;
use tandem_tests::{Scripted, eventually, pair, test_config};

// Rule: an ACTIVE transaction past its deadline aborts by itself, and one
// still within it does not. Paused time: the minute passes instantly.
#[tokio::test(start_paused = true)]
async fn an_active_transaction_past_its_deadline_aborts() {
    let coord = Coordinator::new(test_config(), Arc::new(MemLog::new())).expect("coordinator");
    let gtid = coord
        .begin(
            Mode::Tcc,
            Some(Duration::from_secs(60)),
            None,
            Vec::new(),
            None,
        )
        .await
        .expect("begin");
    tokio::time::sleep(Duration::from_secs(59)).await;
    assert_eq!(coord.get(gtid).expect("get").state, TxState::Active);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rec = coord.get(gtid).expect("get");
    assert_eq!(rec.state, TxState::Aborted);
    assert!(rec.reason.contains("deadline"), "{}", rec.reason);
    assert_eq!(coord.live_count(), 0, "finished transactions are forgotten");
}

// Rule: a participant down during phase 2 is retried with growing
// intervals (capped exponential backoff), each attempt's error and the
// next attempt's time kept in the record; once the policy is exhausted the
// transaction is STUCK with its decision, and nothing more is sent.
#[tokio::test]
async fn phase_two_retries_back_off_then_stop_at_stuck() {
    let config = tandem_coordinator::CoordinatorConfig {
        retry: RetryPolicy {
            initial: Duration::from_millis(40),
            max: Duration::from_secs(1),
            max_attempts: Some(4),
            max_duration: None,
        },
        ..test_config()
    };
    let coord = RunningCoordinator::start(config, Arc::new(MemLog::new()))
        .await
        .expect("start");
    let ok = Scripted::yes("ok");
    let down = Scripted::phase_two_down("down");
    let (p_ok, p_down) = (ok.serve().await, down.serve().await);
    let client = TransactionClient::connect(coord.url())
        .await
        .expect("connect");
    let done = client
        .submit(tandem_sdk::Mode::TwoPhase, pair(&p_ok, &p_down))
        .await
        .expect("submit");
    let gtid = done.gtid;
    eventually("four failed attempts", || {
        down.failed_calls.load(Ordering::SeqCst) == 4
    })
    .await;
    eventually("STUCK", || {
        coord.coordinator.get(gtid).expect("get").state == TxState::Stuck
    })
    .await;
    let times = down.failed_at.lock().expect("times").clone();
    let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
    // Delays are drawn from [20, 40], [40, 80], [80, 160] ms.
    assert!(gaps[0] >= Duration::from_millis(20), "{gaps:?}");
    assert!(gaps[2] > gaps[0], "intervals must grow: {gaps:?}");
    let rec = coord.coordinator.get(gtid).expect("get");
    assert_eq!(
        rec.decision,
        Some(tandem_coordinator::model::Decision::Commit)
    );
    let b = &rec.branches[1];
    assert_eq!(b.attempts, 4);
    assert_eq!(b.next_attempt_ms, 0, "no retry scheduled once STUCK");
    assert!(
        b.last_error.contains("down for maintenance"),
        "{}",
        b.last_error
    );
    assert_eq!(coord.coordinator.live_count(), 0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        down.failed_calls.load(Ordering::SeqCst),
        4,
        "nothing sent after STUCK"
    );
}

//! An instance's clock against the shared store's (DESIGN.md, "What
//! retention may forget"): retention removes by the sweeper's clock and
//! the horizon is in gtid time, so an instance far behind would make
//! gtids the horizon already covers and have its new transactions fenced.
//! Every instance's clock must stay within `MAX_CLOCK_OFFSET` of the
//! store's: one further off refuses to start and says why, and at the
//! largest offsets allowed (one instance ahead, one behind) a sweep by
//! the one ahead never fences the one behind.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use tandem_coordinator::config::MAX_CLOCK_OFFSET;
use tandem_coordinator::error::CoordError;
use tandem_coordinator::log::{SharedMemLog, SharedStore};
use tandem_coordinator::model::Mode;
use tandem_coordinator::runtime::{Clock, Environment};
use tandem_coordinator::{Coordinator, CoordinatorConfig};

const BASE_MS: u64 = 1_700_000_000_000;

fn store() -> Arc<SharedStore> {
    let start = tokio::time::Instant::now();
    SharedStore::new(
        Arc::new(move || BASE_MS + start.elapsed().as_millis() as u64),
        Duration::from_secs(3600),
    )
}

fn instance(store: &Arc<SharedStore>, name: &str, offset_ms: i64) -> Coordinator {
    let log = SharedMemLog::open(store.clone(), name, name);
    let config = CoordinatorConfig {
        retention: Duration::from_secs(120),
        ..CoordinatorConfig::default()
    };
    let env = Environment {
        clock: Clock::tokio(BASE_MS.saturating_add_signed(offset_ms)),
        ..Environment::default()
    };
    Coordinator::with_environment(config, log, env).expect("coordinator")
}

// Without the check, this instance starts, and its first new transaction
// after the other's sweep is fenced as a stale write and halts it.
#[tokio::test(start_paused = true)]
async fn an_instance_whose_clock_is_far_behind_the_stores_refuses_to_start() {
    let store = store();
    let slow = instance(&store, "c", -130_000);
    match slow.start_recovery().await {
        Err(CoordError::Unavailable(why)) => {
            assert!(
                why.contains("130000 ms behind") && why.contains("clock"),
                "the refusal names the offset: {why}"
            );
        }
        other => panic!("an instance 130 s behind the store started: {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn at_the_largest_offsets_allowed_a_sweep_never_fences_a_new_transaction() {
    let store = store();
    let edge = MAX_CLOCK_OFFSET.as_millis() as i64 - 500;
    let sweeper = instance(&store, "s", edge);
    sweeper
        .start_recovery()
        .await
        .expect("recovery")
        .await
        .expect("join")
        .expect("recovered");
    let slow = instance(&store, "c", -edge);
    slow.start_recovery()
        .await
        .expect("recovery")
        .await
        .expect("join")
        .expect("recovered");

    for _ in 0..3 {
        let old = sweeper
            .begin(Mode::TwoPhase, None, None, Vec::new(), None)
            .await
            .expect("begin");
        sweeper
            .rollback(old, "done".into())
            .await
            .expect("rollback");
        tokio::time::sleep(Duration::from_secs(121)).await;
        assert!(
            sweeper.sweep_now().await.expect("sweep") >= 1,
            "the sweep removed nothing"
        );
        let fresh = slow
            .begin(Mode::TwoPhase, None, None, Vec::new(), None)
            .await;
        assert!(
            fresh.is_ok() && !slow.is_halted(),
            "a new transaction {} s behind a sweeper {} s ahead: {fresh:?}; halted: {}",
            edge / 1000,
            edge / 1000,
            slow.is_halted()
        );
        slow.rollback(fresh.unwrap(), "done".into())
            .await
            .expect("rollback");
    }
}

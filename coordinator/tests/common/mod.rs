//! Set-up shared by the tests of instances on a shared store in memory,
//! on Tokio's (paused) clock.

#![allow(dead_code, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use tandem_coordinator::log::{SharedMemLog, SharedStore};
use tandem_coordinator::runtime::{Clock, Environment};
use tandem_coordinator::{Coordinator, CoordinatorConfig};

/// The wall-clock time at the test's start, in milliseconds.
pub(crate) const BASE_MS: u64 = 1_700_000_000_000;

/// A store whose clock is Tokio's time since now, from [`BASE_MS`].
pub(crate) fn store(lease: Duration) -> Arc<SharedStore> {
    let start = tokio::time::Instant::now();
    SharedStore::new(
        Arc::new(move || BASE_MS + start.elapsed().as_millis() as u64),
        lease,
    )
}

/// A coordinator over `log` with the default configuration, on Tokio's
/// clock from [`BASE_MS`].
pub(crate) fn coordinator(log: &Arc<SharedMemLog>) -> Coordinator {
    let env = Environment {
        clock: Clock::tokio(BASE_MS),
        ..Environment::default()
    };
    Coordinator::with_environment(CoordinatorConfig::default(), log.clone(), env)
        .expect("coordinator")
}

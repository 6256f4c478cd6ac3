//! Where the runtime reads the time and takes new gtids from.
//!
//! In production both come from the machine ([`Clock::Wall`]). The seeded
//! simulation uses [`Clock::tokio`]: time is tokio's (paused, so it moves
//! only when every task waits) and gtids come from a counter, so a seed
//! replays exactly.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::model::{Gtid, now_ms};

/// The runtime's source of time and of new gtids.
#[derive(Clone, Debug, Default)]
pub enum Clock {
    /// The wall clock and random UUID v7 gtids.
    #[default]
    Wall,
    /// tokio's clock, counted from `base_ms` at `start`; gtids are UUID v7
    /// whose random bits are a counter.
    Tokio {
        /// Milliseconds since the Unix epoch at `start`.
        base_ms: u64,
        /// tokio's instant that corresponds to `base_ms`.
        start: tokio::time::Instant,
        /// Gtids handed out so far (shared by clones, so restarted
        /// coordinators of one simulation never reuse a gtid).
        issued: Arc<AtomicU64>,
    },
}

impl Clock {
    /// A tokio-driven clock reading `base_ms` now.
    pub fn tokio(base_ms: u64) -> Clock {
        Clock::Tokio {
            base_ms,
            start: tokio::time::Instant::now(),
            issued: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> u64 {
        match self {
            Clock::Wall => now_ms(),
            Clock::Tokio { base_ms, start, .. } => base_ms + start.elapsed().as_millis() as u64,
        }
    }

    /// A new gtid: a UUID v7 of the current time.
    pub fn new_gtid(&self) -> Gtid {
        match self {
            Clock::Wall => Gtid::now_v7(),
            Clock::Tokio { issued, .. } => {
                let n = issued.fetch_add(1, Ordering::Relaxed) + 1;
                let mut random = [0u8; 10];
                random[2..].copy_from_slice(&n.to_be_bytes());
                uuid::Builder::from_unix_timestamp_millis(self.now_ms(), &random).into_uuid()
            }
        }
    }
}

//! This instance's clock against a shared store's.
//!
//! Retention removes by the sweeping instance's clock, the purge horizon
//! is in gtid time, and a first write under the horizon is fenced
//! (DESIGN.md, "What retention may forget"). With every clock within
//! [`MAX_CLOCK_OFFSET`] of the store's, a gtid made here can fall under
//! the horizon only if retention were at most twice that offset, which
//! [`MIN_RETENTION`](crate::config::MIN_RETENTION) rules out. An instance
//! whose clock is further off refuses to start, naming the offset. One
//! whose clock drifts off while it runs says so in an ERROR line every
//! check: correctness does not rest on it (the store fences a first write
//! under the horizon, and the writer latches), but a restart loop with no
//! word about the clock would leave the operator guessing.

use std::sync::Arc;

use super::Inner;
use crate::config::MAX_CLOCK_OFFSET;
use crate::error::CoordError;
use crate::log::LogError;

impl Inner {
    /// How far this instance's clock is ahead of (positive) or behind the
    /// store's, in ms; `None` on a log only this instance uses.
    pub(super) fn clock_offset_ms(&self) -> Result<Option<i64>, LogError> {
        let before = self.now();
        let Some(store) = self.log.store_now_ms()? else {
            return Ok(None);
        };
        let after = self.now();
        // The store read its clock somewhere between the two readings.
        let here = before / 2 + after / 2;
        Ok(Some(here as i64 - store as i64))
    }

    /// Fails when this instance's clock is more than [`MAX_CLOCK_OFFSET`]
    /// from the store's.
    pub(super) fn check_clock(&self) -> Result<(), CoordError> {
        let Some(offset) = self.clock_offset_ms()? else {
            return Ok(());
        };
        if offset > MAX_CLOCK_OFFSET.as_millis() as i64 {
            // Ahead: retention here removes early, which the first-write
            // fence still covers; said, not refused.
            tracing::error!(
                offset_ms = offset,
                "this coordinator's clock is ahead of the shared store's"
            );
            return Ok(());
        }
        if offset.unsigned_abs() > MAX_CLOCK_OFFSET.as_millis() as u64 {
            return Err(CoordError::Unavailable(format!(
                "this coordinator's clock is {} ms {} the shared store's; at most {} ms is \
                 allowed (retention and the purge horizon rely on it): synchronise the clock \
                 (NTP) and start again",
                offset.unsigned_abs(),
                if offset > 0 { "ahead of" } else { "behind" },
                MAX_CLOCK_OFFSET.as_millis()
            )));
        }
        Ok(())
    }

    /// [`check_clock`](Inner::check_clock) while serving: an ERROR line
    /// when the clock went off.
    pub(super) fn watch_clock(self: &Arc<Self>) {
        match self.check_clock() {
            Ok(()) => {}
            Err(CoordError::Unavailable(reason)) => tracing::error!(%reason, "clock offset"),
            Err(e) => tracing::warn!(error = %e, "cannot read the store's clock"),
        }
    }
}

//! A head count of transactions for operators (the console's overview,
//! the metrics' gauges): how many are live, in doubt (decided, phase 2
//! not done) and STUCK, and the oldest of each. Live ones are counted in
//! memory (this instance's); STUCK ones are read from the log (every
//! instance's, on a shared store), up to [`STUCK_COUNT_MAX`]. A count is
//! reused for [`CENSUS_TTL`], so frequent scrapes cost one count.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::error::CoordError;
use crate::model::{Gtid, TxState};

use super::Coordinator;

/// STUCK records counted at most (one log read).
pub const STUCK_COUNT_MAX: usize = 10_000;
/// How long a count is reused.
pub const CENSUS_TTL: Duration = Duration::from_secs(1);

/// The oldest transaction of a kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Oldest {
    /// Its id.
    pub gtid: Gtid,
    /// When it was created, ms since the Unix epoch.
    pub created_ms: u64,
}

/// One head count.
#[derive(Clone, Debug, Default)]
pub struct Census {
    /// Held in memory: not terminal, not STUCK.
    pub live: u64,
    /// Live and decided (COMMITTING / ABORTING): participants wait in doubt.
    pub in_doubt: u64,
    /// STUCK records in the log (at most [`STUCK_COUNT_MAX`]).
    pub stuck: u64,
    /// More STUCK records than were counted.
    pub stuck_capped: bool,
    /// Live and STUCK ones by state.
    pub by_state: BTreeMap<&'static str, u64>,
    /// The oldest live one.
    pub oldest_live: Option<Oldest>,
    /// The oldest in doubt.
    pub oldest_in_doubt: Option<Oldest>,
    /// The oldest STUCK.
    pub oldest_stuck: Option<Oldest>,
}

fn older(a: Option<Oldest>, b: Oldest) -> Option<Oldest> {
    match a {
        Some(a) if a.created_ms <= b.created_ms => Some(a),
        _ => Some(b),
    }
}

impl Coordinator {
    /// The current head count (at most [`CENSUS_TTL`] old).
    ///
    /// # Errors
    ///
    /// The log could not be read.
    pub fn census(&self) -> Result<Census, CoordError> {
        let mut cached = self.inner.census.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, c)) = cached.as_ref()
            && at.elapsed() < CENSUS_TTL
        {
            return Ok(c.clone());
        }
        let census = self.count()?;
        *cached = Some((Instant::now(), census.clone()));
        Ok(census)
    }

    fn count(&self) -> Result<Census, CoordError> {
        let mut c = Census::default();
        let entries: Vec<_> = self.inner.live_table().values().cloned().collect();
        for entry in entries {
            let txn = entry.lock();
            let rec = txn.visible_record();
            if rec.state.is_terminal() || rec.state == TxState::Stuck {
                continue;
            }
            let one = Oldest {
                gtid: rec.gtid,
                created_ms: rec.created_ms,
            };
            c.live += 1;
            *c.by_state.entry(rec.state.name()).or_default() += 1;
            c.oldest_live = older(c.oldest_live, one);
            if matches!(rec.state, TxState::Committing | TxState::Aborting) {
                c.in_doubt += 1;
                c.oldest_in_doubt = older(c.oldest_in_doubt, one);
            }
        }
        let stuck = self
            .inner
            .log
            .scan(None, &[TxState::Stuck], STUCK_COUNT_MAX + 1)?;
        c.stuck_capped = stuck.len() > STUCK_COUNT_MAX;
        c.stuck = stuck.len().min(STUCK_COUNT_MAX) as u64;
        if c.stuck > 0 {
            c.by_state.insert(TxState::Stuck.name(), c.stuck);
        }
        c.oldest_stuck = stuck
            .iter()
            .map(|r| Oldest {
                gtid: r.gtid,
                created_ms: r.created_ms,
            })
            .min_by_key(|o| o.created_ms);
        Ok(c)
    }
}

//! The gtids of a sled log's unfinished records, kept in memory so that
//! recovery's scan, the census of STUCK transactions and `tx list --state
//! active` read only those records, not every one the log retains (ten
//! million finished ones took 14 s to skip).
//!
//! Built at open by the check that decodes every record anyway, then kept
//! by [`super::SledLog`]'s writes. Its size is the number of unfinished
//! transactions, which admission bounds.
//!
//! Invariant: every record in the log whose state is not terminal has its
//! gtid here (the set may also hold gtids whose record has since finished
//! or gone for a moment; readers check each record). So a write adds the
//! gtid before the record and drops it only after a terminal record, and
//! writes of one gtid hold its stripe lock throughout (two writers of one
//! gtid, one terminal and one not, could otherwise leave the record
//! unfinished and the set without it). A set built from a log the check
//! could not read to the end is incomplete: scans then read every record,
//! as before.

use std::collections::BTreeSet;
use std::ops::Bound;
use std::sync::Mutex;

use crate::model::{Gtid, TxState};

/// The set; see the module docs.
#[derive(Debug)]
pub(super) struct Unfinished {
    gtids: Mutex<BTreeSet<Gtid>>,
    /// Whether the check read every record (else scans do not use the set).
    complete: bool,
    /// Writes of one gtid, serialized (by a stripe of the gtid's bytes).
    stripes: [Mutex<()>; STRIPES],
}

const STRIPES: usize = 64;

impl Default for Unfinished {
    fn default() -> Self {
        Unfinished::new(BTreeSet::new(), true)
    }
}

impl Unfinished {
    pub(super) fn new(gtids: BTreeSet<Gtid>, complete: bool) -> Self {
        Unfinished {
            gtids: Mutex::new(gtids),
            complete,
            stripes: std::array::from_fn(|_| Mutex::new(())),
        }
    }

    /// Whether scans may read the set: the check at open read every record.
    pub(super) fn complete(&self) -> bool {
        self.complete
    }

    /// Held across one write or removal of `gtid` (the set's change and
    /// the record's).
    pub(super) fn writing(&self, gtid: &Gtid) -> std::sync::MutexGuard<'_, ()> {
        let b = gtid.as_bytes();
        let stripe = usize::from(b[15] ^ b[7]) % STRIPES;
        self.stripes[stripe]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn set(&self) -> std::sync::MutexGuard<'_, BTreeSet<Gtid>> {
        // A panic while holding the lock leaves the set whole (each
        // operation is one insert or remove).
        self.gtids
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether a scan for `states` may read the set instead of every
    /// record: only when every state asked for is unfinished.
    pub(super) fn covers(states: &[TxState]) -> bool {
        !states.is_empty() && states.iter().all(|s| !s.is_terminal())
    }

    /// Before `gtid`'s record in `state` is written.
    pub(super) fn before_write(&self, gtid: Gtid, state: TxState) {
        if !state.is_terminal() {
            self.set().insert(gtid);
        }
    }

    /// After `gtid`'s record in `state` was written.
    pub(super) fn after_write(&self, gtid: &Gtid, state: TxState) {
        if state.is_terminal() {
            self.set().remove(gtid);
        }
    }

    /// After `gtid`'s record was removed.
    pub(super) fn removed(&self, gtid: &Gtid) {
        self.set().remove(gtid);
    }

    /// Up to `max` gtids after `from` (ascending) or before it
    /// (descending, `back`), in that order.
    pub(super) fn page(&self, from: Option<&Gtid>, back: bool, max: usize) -> Vec<Gtid> {
        let set = self.set();
        let edge = from.map_or(Bound::Unbounded, Bound::Excluded);
        if back {
            set.range((Bound::Unbounded, edge))
                .rev()
                .take(max)
                .copied()
                .collect()
        } else {
            set.range((edge, Bound::Unbounded))
                .take(max)
                .copied()
                .collect()
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.set().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(n: u128) -> Gtid {
        Gtid::from_u128(n)
    }

    #[test]
    fn a_gtid_stays_until_its_record_is_terminal_or_removed() {
        let u = Unfinished::default();
        u.before_write(g(1), TxState::Active);
        u.after_write(&g(1), TxState::Active);
        u.before_write(g(2), TxState::Committed);
        u.after_write(&g(2), TxState::Committed);
        assert_eq!(u.page(None, false, 10), vec![g(1)]);
        u.before_write(g(1), TxState::Aborted);
        assert_eq!(u.len(), 1, "kept until the terminal record is written");
        u.after_write(&g(1), TxState::Aborted);
        assert_eq!(u.len(), 0);
        u.before_write(g(3), TxState::Stuck);
        u.removed(&g(3));
        assert_eq!(u.len(), 0);
    }

    #[test]
    fn pages_both_ways_from_a_cursor() {
        let u = Unfinished::new((1..=5).map(g).collect(), true);
        assert_eq!(u.page(Some(&g(2)), false, 2), vec![g(3), g(4)]);
        assert_eq!(u.page(Some(&g(4)), true, 10), vec![g(3), g(2), g(1)]);
        assert_eq!(u.page(None, true, 1), vec![g(5)]);
    }

    #[test]
    fn only_unfinished_states_are_covered() {
        assert!(Unfinished::covers(&[TxState::Active, TxState::Stuck]));
        assert!(!Unfinished::covers(&[]));
        assert!(!Unfinished::covers(&[TxState::Active, TxState::Committed]));
    }
}

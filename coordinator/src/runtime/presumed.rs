//! The record a shared store keeps for a gtid it was asked about before
//! any coordinator had written it: "no record, so abort", made durable
//! before anyone is told (DESIGN.md, "One forced write per transaction").

use super::starts::MAX_GTID_AHEAD;
use crate::config::MAX_CLOCK_OFFSET;
use crate::model::{AbortCause, AbortInfo, Decision, Gtid, Mode, TxState, TxnRecord};

/// Why a presumed-abort record aborted (its `abort.detail`): what tells it
/// from a transaction that ran.
const DETAIL: &str = "presumed abort: asked about before any coordinator had recorded it \
                      (the coordinator that began it stopped, or had not decided yet)";

/// What a question about a gtid with no record may be answered, on a
/// shared store.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Unwritten {
    /// Not a UUID v7: no coordinator makes or accepts one, so nothing can
    /// be running it; ABORT, nothing written.
    Never,
    /// A UUID v7 no later than a start accepts: written as a presumed
    /// abort, then answered.
    Possible,
    /// A UUID v7 later than that, on this clock: a coordinator whose clock
    /// is further ahead (clocks are checked against the store's, not
    /// bounded by it) could be running it; "not decided" for now, nothing
    /// written (a row for it would be the last retention removes, and
    /// would raise its horizon past every new gtid once removed).
    Ahead,
}

/// Which of [`Unwritten`] `gtid` is at `now_ms`: a start accepts a gtid
/// [`MAX_GTID_AHEAD`] ahead of its coordinator's clock, which may be
/// [`MAX_CLOCK_OFFSET`] ahead of the store's, as this one may be behind.
pub(super) fn unwritten(gtid: &Gtid, now_ms: u64) -> Unwritten {
    let lead = (MAX_GTID_AHEAD + 2 * MAX_CLOCK_OFFSET).as_millis() as u64;
    match crate::log::gtid_ms(gtid).filter(|_| gtid.get_version_num() == 7) {
        None => Unwritten::Never,
        Some(ms) if ms <= now_ms.saturating_add(lead) => Unwritten::Possible,
        Some(_) => Unwritten::Ahead,
    }
}

/// The aborted record written for `gtid`: no branches, epoch 1, created
/// at the gtid's time (no later than `now_ms`), so retention orders and
/// removes it as the transaction it stands for.
pub(super) fn marker(gtid: Gtid, now_ms: u64) -> TxnRecord {
    let at = crate::log::gtid_ms(&gtid).map_or(now_ms, |ms| ms.min(now_ms));
    let mut rec = TxnRecord::new(gtid, Mode::TwoPhase, TxState::Aborted, at, at);
    let why = AbortInfo::new(AbortCause::CoordinatorRestart, DETAIL);
    rec.decision = Some(Decision::Abort);
    rec.reason = why.text();
    rec.abort = Some(why);
    rec
}

/// Whether `rec` is such a record: a repeated start of its gtid, of any
/// mode and branches, is told it aborted.
pub(super) fn is_marker(rec: &TxnRecord) -> bool {
    rec.state == TxState::Aborted
        && rec.branches.is_empty()
        && rec
            .abort
            .as_ref()
            .is_some_and(|a| a.cause == AbortCause::CoordinatorRestart && a.detail == DETAIL)
}

impl super::Inner {
    /// Whether the store holds a presumed abort for `gtid` (read when this
    /// coordinator's first write of it was refused).
    pub(super) fn presumed_aborted(&self, gtid: &Gtid) -> bool {
        matches!(self.log.get(gtid), Ok(Some(rec)) if is_marker(&rec))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_v7_gtid_no_later_than_a_start_accepts_is_written() {
        let now = crate::log::gtid_ms(&Gtid::now_v7()).expect("v7");
        assert_eq!(unwritten(&Gtid::now_v7(), now), Unwritten::Possible);
        // Not v7: no coordinator makes or accepts it.
        let v4 = Gtid::from_u128(0x0123_4567_89ab_4def_8123_4567_89ab_cdef);
        assert_eq!(unwritten(&v4, now), Unwritten::Never);
        assert_eq!(unwritten(&Gtid::nil(), now), Unwritten::Never);
        // An hour ahead: not written, and not answered ABORT either.
        let ts = uuid::Timestamp::from_unix(uuid::NoContext, (now / 1000) + 3600, 0);
        assert_eq!(unwritten(&Gtid::new_v7(ts), now), Unwritten::Ahead);
        // Old ones may be (a paused owner), and are written.
        let ts = uuid::Timestamp::from_unix(uuid::NoContext, (now / 1000) - 3600, 0);
        assert_eq!(unwritten(&Gtid::new_v7(ts), now), Unwritten::Possible);
    }

    #[test]
    fn a_marker_is_aborted_with_no_branches_and_known_as_one() {
        let gtid = Gtid::now_v7();
        let m = marker(gtid, u64::MAX);
        assert_eq!(
            Some(m.created_ms),
            crate::log::gtid_ms(&gtid),
            "stamped with the gtid's time"
        );
        assert_eq!(
            (m.gtid, m.state, m.decision),
            (gtid, TxState::Aborted, Some(Decision::Abort))
        );
        assert!(m.branches.is_empty() && m.epoch == 1);
        assert!(is_marker(&m));
        // A transaction that ran and aborted at a restart is not one.
        let mut ran = m.clone();
        ran.abort = Some(AbortInfo::new(AbortCause::CoordinatorRestart, "restart"));
        assert!(!is_marker(&ran));
    }
}

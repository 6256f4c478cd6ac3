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

/// Whether a coordinator may be running `gtid` with nothing written yet:
/// only a UUID v7 no later than a start accepts (its clock
/// [`MAX_GTID_AHEAD`] ahead of the coordinator's, which may itself be
/// [`MAX_CLOCK_OFFSET`] ahead of this one). Anything else is never written
/// as a presumed abort: a question about an arbitrary id must not leave a
/// row that retention would sort first or raise its horizon to.
pub(super) fn may_be_unwritten(gtid: &Gtid, now_ms: u64) -> bool {
    let lead = (MAX_GTID_AHEAD + MAX_CLOCK_OFFSET).as_millis() as u64;
    gtid.get_version_num() == 7
        && crate::log::gtid_ms(gtid).is_some_and(|ms| ms <= now_ms.saturating_add(lead))
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
    fn only_a_v7_gtid_no_later_than_a_start_accepts_may_be_unwritten() {
        let now = crate::log::gtid_ms(&Gtid::now_v7()).expect("v7");
        assert!(may_be_unwritten(&Gtid::now_v7(), now));
        // Not v7: no coordinator makes or accepts it.
        assert!(!may_be_unwritten(
            &Gtid::from_u128(0x0123_4567_89ab_4def_8123_4567_89ab_cdef),
            now
        ));
        assert!(!may_be_unwritten(&Gtid::nil(), now));
        // Far in the future: refused by every start.
        let ts = uuid::Timestamp::from_unix(uuid::NoContext, (now / 1000) + 3600, 0);
        assert!(!may_be_unwritten(&Gtid::new_v7(ts), now));
        // Old ones may be (a paused owner), and are written.
        let ts = uuid::Timestamp::from_unix(uuid::NoContext, (now / 1000) - 3600, 0);
        assert!(may_be_unwritten(&Gtid::new_v7(ts), now));
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

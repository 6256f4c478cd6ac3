//! What retention keeps of what it removes: a [`Tombstone`] per finished
//! transaction whose outcome some participant may still ask about, and the
//! [`Horizon`] below which gtids may have been removed or forgotten.
//!
//! Why (DESIGN.md, "What retention may forget"): presumed abort answers
//! ABORT for a gtid with no record, which is right only for a gtid no
//! record ever covered. A transaction with a branch an operator settled by
//! hand (`tandem tx resolve`) finished without that participant's
//! acknowledgement: when it comes back and asks, the answer must still be
//! the decision. Retention therefore compacts such a record into a
//! tombstone (a few dozen bytes, kept `--decision-retention`); it records
//! in the horizon what it removed, so that a removed gtid is never started
//! again, and a removed gtid without a tombstone (every branch had
//! acknowledged) or with an expired one is answered "no longer known",
//! never ABORT: it may have committed.

use crate::model::{BranchState, Decision, Gtid, Mode, TxState, TxnRecord};

/// A finished transaction's decision, kept after retention removed its
/// record, while a participant may still ask ([`Tombstone::needed_for`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tombstone {
    /// The transaction.
    pub gtid: Gtid,
    /// Its decision.
    pub decision: Decision,
    /// Its protocol.
    pub mode: Mode,
    /// Its creation time, ms since the Unix epoch.
    pub created_ms: u64,
    /// When it finished (its record's last change), ms since the Unix epoch;
    /// `--decision-retention` counts from here.
    pub finished_ms: u64,
    /// How many branches it had.
    pub branches: u32,
    /// How many of them an operator settled by hand.
    pub resolved: u32,
}

impl Tombstone {
    /// The tombstone retention must keep when it removes `rec`, if any: a
    /// finished transaction with a branch its participant never
    /// acknowledged (settled by an operator, or for any other reason not
    /// COMMITTED / ROLLED_BACK by the participant's own answer), or a
    /// dropped transactional message. That participant (that business
    /// service) may still ask; every other gtid retention removes is
    /// answered "no longer known", never presumed ABORT.
    pub fn needed_for(rec: &TxnRecord) -> Option<Tombstone> {
        let decision = rec.decision?;
        let acknowledged = match decision {
            Decision::Commit => BranchState::Committed,
            Decision::Abort => BranchState::RolledBack,
        };
        let unacknowledged =
            |b: &crate::model::BranchRecord| b.resolution.is_some() || b.state != acknowledged;
        // A message an operator dropped: its business service may still
        // come with its Submit (a local transaction that committed after
        // all), and must hear ABORTED, not "unknown". (Dropped by its
        // check's no or its own Rollback, its local transaction cannot or
        // did not commit: no Submit follows.)
        let dropped_message = rec.mode == crate::model::Mode::Msg
            && decision == Decision::Abort
            && rec
                .abort
                .as_ref()
                .is_some_and(|a| a.cause == crate::model::AbortCause::OperatorAbort);
        if !dropped_message && !rec.branches.iter().any(unacknowledged) {
            return None;
        }
        Some(Tombstone {
            gtid: rec.gtid,
            decision,
            mode: rec.mode,
            created_ms: rec.created_ms,
            finished_ms: rec.updated_ms,
            branches: rec.branches.len() as u32,
            resolved: rec
                .branches
                .iter()
                .filter(|b| b.resolution.is_some())
                .count() as u32,
        })
    }

    /// The record `tandem tx show` and `GetTransaction` show for a
    /// compacted transaction: its state and decision, its times, no
    /// branches, marked [`TxnRecord::compacted`].
    pub fn to_record(&self) -> TxnRecord {
        let state = match self.decision {
            Decision::Commit => TxState::Committed,
            Decision::Abort => TxState::Aborted,
        };
        // No deadline: it was decided long ago.
        let mut rec = TxnRecord::new(self.gtid, self.mode, state, self.created_ms, 0);
        rec.decision = Some(self.decision);
        rec.updated_ms = self.finished_ms;
        rec.compacted = true;
        rec
    }
}

/// How far retention has forgotten, as gtid times (the UUID v7 timestamp,
/// ms since the Unix epoch): the gtid's own clock, never an instance's, so
/// it means the same on every instance however their clocks differ.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Horizon {
    /// The newest gtid time of any record retention removed: a gtid at or
    /// before it with no record may be one that was removed, so it is never
    /// started again.
    pub purged_ms: u64,
    /// The newest gtid time of any tombstone that expired: a gtid at or
    /// before it with neither record nor tombstone may have committed, so
    /// its outcome is not known (never presumed ABORT).
    pub forgotten_ms: u64,
}

impl Horizon {
    /// Each bound the larger of the two.
    pub fn max(self, other: Horizon) -> Horizon {
        Horizon {
            purged_ms: self.purged_ms.max(other.purged_ms),
            forgotten_ms: self.forgotten_ms.max(other.forgotten_ms),
        }
    }

    /// Whether a record with `gtid` may have been removed by retention.
    pub fn may_have_purged(&self, gtid: &Gtid) -> bool {
        gtid_ms(gtid).is_some_and(|ms| ms <= self.purged_ms)
    }

    /// Whether a tombstone for `gtid` may have expired.
    pub fn may_have_forgotten(&self, gtid: &Gtid) -> bool {
        gtid_ms(gtid).is_some_and(|ms| ms <= self.forgotten_ms)
    }

    pub(super) fn encode(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[..8].copy_from_slice(&self.purged_ms.to_be_bytes());
        out[8..].copy_from_slice(&self.forgotten_ms.to_be_bytes());
        out
    }

    pub(super) fn decode(bytes: &[u8]) -> Option<Horizon> {
        let purged_ms = u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?);
        let forgotten_ms = u64::from_be_bytes(bytes.get(8..16)?.try_into().ok()?);
        Some(Horizon {
            purged_ms,
            forgotten_ms,
        })
    }
}

/// What a start with a client-chosen gtid finds in the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// The gtid's record.
    Record(Box<TxnRecord>),
    /// No record, and retention may have removed one with this gtid.
    Purged,
    /// No record, and none was ever removed: the gtid is new.
    Unknown,
}

/// One record retention removes, with the tombstone kept in its place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Purge {
    /// The record's gtid.
    pub gtid: Gtid,
    /// The tombstone to keep, if its decision must outlive it.
    pub tombstone: Option<Tombstone>,
}

/// A gtid's time (its UUID v7 timestamp), ms since the Unix epoch; `None`
/// for a gtid that is not a UUID v7 (no coordinator made or accepted one).
pub fn gtid_ms(gtid: &Gtid) -> Option<u64> {
    if gtid.get_version_num() != 7 {
        return None;
    }
    let (secs, nanos) = gtid.get_timestamp()?.to_unix();
    Some(secs * 1000 + u64::from(nanos) / 1_000_000)
}

/// The horizon that covers removing `purges` (their newest gtid time).
pub(super) fn purged_horizon(purges: &[Purge]) -> Horizon {
    Horizon {
        purged_ms: purges
            .iter()
            .filter_map(|p| gtid_ms(&p.gtid))
            .max()
            .unwrap_or(0),
        forgotten_ms: 0,
    }
}

const TOMBSTONE_VERSION: u8 = 1;

/// A tombstone's stored form (sled; the gtid is the key): version,
/// decision, mode, created, finished, branches, resolved.
pub(super) fn encode(t: &Tombstone) -> Vec<u8> {
    let mut out = Vec::with_capacity(27);
    out.push(TOMBSTONE_VERSION);
    out.push(decision_code(t.decision) as u8);
    out.push(mode_code(t.mode) as u8);
    out.extend_from_slice(&t.created_ms.to_be_bytes());
    out.extend_from_slice(&t.finished_ms.to_be_bytes());
    out.extend_from_slice(&t.branches.to_be_bytes());
    out.extend_from_slice(&t.resolved.to_be_bytes());
    out
}

/// The tombstone of `gtid` from its stored form; `None` if it does not
/// decode.
pub(super) fn decode(gtid: Gtid, b: &[u8]) -> Option<Tombstone> {
    if b.len() != 27 || b[0] != TOMBSTONE_VERSION {
        return None;
    }
    let u64_at = |i: usize| b.get(i..i + 8)?.try_into().ok().map(u64::from_be_bytes);
    let u32_at = |i: usize| b.get(i..i + 4)?.try_into().ok().map(u32::from_be_bytes);
    Some(Tombstone {
        gtid,
        decision: decision_from(i16::from(b[1]))?,
        mode: mode_from(i16::from(b[2]))?,
        created_ms: u64_at(3)?,
        finished_ms: u64_at(11)?,
        branches: u32_at(19)?,
        resolved: u32_at(23)?,
    })
}

/// A decision as stored (also the PostgreSQL `decision` column's code).
pub(super) fn decision_code(d: Decision) -> i16 {
    match d {
        Decision::Commit => 1,
        Decision::Abort => 2,
    }
}

pub(super) fn decision_from(code: i16) -> Option<Decision> {
    match code {
        1 => Some(Decision::Commit),
        2 => Some(Decision::Abort),
        _ => None,
    }
}

pub(super) fn mode_code(m: Mode) -> i16 {
    match m {
        Mode::TwoPhase => 1,
        Mode::Tcc => 2,
        Mode::Saga => 3,
        Mode::Msg => 4,
    }
}

pub(super) fn mode_from(code: i16) -> Option<Mode> {
    match code {
        1 => Some(Mode::TwoPhase),
        2 => Some(Mode::Tcc),
        3 => Some(Mode::Saga),
        4 => Some(Mode::Msg),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // A message an operator dropped keeps its decision (its business
    // service may still submit); one its check or its client dropped does
    // not, nor a delivered one whose every branch acknowledged, nor an
    // abort of another mode every branch acknowledged.
    #[test]
    fn a_message_an_operator_dropped_keeps_a_tombstone() {
        use crate::model::{AbortCause, AbortInfo, Mode};
        let record = |mode: Mode, decision: Decision, state: BranchState| {
            let mut rec = crate::conformance::sample_record(mode, 1);
            rec.decision = Some(decision);
            rec.branches[0].mode = mode;
            rec.branches[0].state = state;
            rec
        };
        let mut dropped = record(Mode::Msg, Decision::Abort, BranchState::RolledBack);
        dropped.abort = Some(AbortInfo::new(AbortCause::OperatorAbort, "ops"));
        assert_eq!(
            Tombstone::needed_for(&dropped).map(|t| t.decision),
            Some(Decision::Abort)
        );
        for cause in [AbortCause::VotedNo, AbortCause::ClientRollback] {
            dropped.abort = Some(AbortInfo::new(cause, ""));
            assert!(Tombstone::needed_for(&dropped).is_none(), "{cause:?}");
        }
        let delivered = record(Mode::Msg, Decision::Commit, BranchState::Committed);
        assert!(Tombstone::needed_for(&delivered).is_none());
        let aborted = record(Mode::Tcc, Decision::Abort, BranchState::RolledBack);
        assert!(Tombstone::needed_for(&aborted).is_none());
    }

    #[test]
    fn tombstone_round_trips() {
        let t = Tombstone {
            gtid: Gtid::now_v7(),
            decision: Decision::Commit,
            mode: Mode::Tcc,
            created_ms: 1,
            finished_ms: u64::MAX,
            branches: 3,
            resolved: 1,
        };
        assert_eq!(decode(t.gtid, &encode(&t)), Some(t.clone()));
        assert_eq!(decode(t.gtid, &encode(&t)[..26]), None);
    }

    #[test]
    fn horizon_uses_the_gtid_time() {
        let gtid = uuid::Builder::from_unix_timestamp_millis(5_000, &[1; 10]).into_uuid();
        let h = Horizon {
            purged_ms: 5_000,
            forgotten_ms: 4_999,
        };
        assert!(h.may_have_purged(&gtid));
        assert!(!h.may_have_forgotten(&gtid));
        assert!(!h.may_have_purged(&uuid::Uuid::nil()), "not a v7");
    }
}

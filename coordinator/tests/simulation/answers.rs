//! Every outcome any instance ever told anyone (a client's reply, a
//! participant's GetOutcome, a GetTransaction), with when and by whom, so
//! the invariants can check that no two answers for one gtid disagree and
//! that none contradicts the store's decision, whatever retention removed
//! since.

use std::sync::Mutex;

use tandem_coordinator::model::{Decision, Gtid, TxState, TxnRecord};

/// One definite answer.
#[derive(Clone, Debug)]
pub struct Answer {
    /// True time, ms.
    pub at_ms: u64,
    pub instance: String,
    pub gtid: Gtid,
    pub commit: bool,
    /// Which request answered it.
    pub how: &'static str,
}

#[derive(Default)]
pub struct Answers {
    pub list: Mutex<Vec<Answer>>,
}

impl Answers {
    pub fn record(&self, instance: &str, gtid: Gtid, commit: bool, how: &'static str) {
        self.list.lock().unwrap().push(Answer {
            at_ms: crate::instance::true_ms(),
            instance: instance.to_string(),
            gtid,
            commit,
            how,
        });
    }

    /// A state reported to a client, if it says how the transaction ends.
    pub fn state(&self, instance: &str, gtid: Gtid, state: TxState, how: &'static str) {
        match state {
            TxState::Committed | TxState::Committing => self.record(instance, gtid, true, how),
            TxState::Aborted | TxState::Aborting => self.record(instance, gtid, false, how),
            _ => {}
        }
    }

    /// A decision told to a participant.
    pub fn decision(&self, instance: &str, gtid: Gtid, d: Option<Decision>, how: &'static str) {
        if let Some(d) = d {
            self.record(instance, gtid, d == Decision::Commit, how);
        }
    }

    /// A record shown by GetTransaction: its decision, if any.
    pub fn shown(&self, instance: &str, rec: &TxnRecord) {
        self.decision(instance, rec.gtid, rec.decision, "GetTransaction");
    }

    pub fn all(&self) -> Vec<Answer> {
        self.list.lock().unwrap().clone()
    }
}

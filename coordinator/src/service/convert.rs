//! Conversions between the wire types of `tandem-proto` and the model.

use std::time::Duration;

use tandem_proto::v1 as pb;
use tonic::Status;

use crate::engine::NewBranch;
use crate::model::{BranchState, Decision, Mode, TxState, TxnRecord};

pub(super) fn mode_from_wire(mode: i32) -> Result<Mode, Status> {
    match pb::Mode::try_from(mode) {
        Ok(pb::Mode::TwoPhase) => Ok(Mode::TwoPhase),
        Ok(pb::Mode::Tcc) => Ok(Mode::Tcc),
        Ok(pb::Mode::Saga) => Ok(Mode::Saga),
        Ok(pb::Mode::Msg) => Ok(Mode::Msg),
        _ => Err(Status::invalid_argument(
            "mode must be MODE_TWO_PHASE, MODE_TCC, MODE_SAGA or MODE_MSG",
        )),
    }
}

pub(crate) fn mode_to_wire(mode: Mode) -> pb::Mode {
    match mode {
        Mode::TwoPhase => pb::Mode::TwoPhase,
        Mode::Tcc => pb::Mode::Tcc,
        Mode::Saga => pb::Mode::Saga,
        Mode::Msg => pb::Mode::Msg,
    }
}

pub(super) fn timeout_from_wire(ms: u64) -> Option<Duration> {
    (ms > 0).then(|| Duration::from_millis(ms))
}

/// Steps one saga step may name in `BranchSpec.after`.
const MAX_AFTER: usize = 64;

pub(super) fn branch_from_wire(b: Option<pb::BranchSpec>) -> Result<NewBranch, Status> {
    let b = b.ok_or_else(|| Status::invalid_argument("branch is missing"))?;
    let mode = match pb::Mode::try_from(b.mode) {
        Ok(pb::Mode::Unspecified) => None,
        Ok(pb::Mode::TwoPhase) => Some(Mode::TwoPhase),
        Ok(pb::Mode::Tcc) => Some(Mode::Tcc),
        Ok(pb::Mode::Saga) => Some(Mode::Saga),
        Ok(pb::Mode::Msg) => Some(Mode::Msg),
        Err(_) => {
            return Err(Status::invalid_argument(
                "branch mode must be MODE_TWO_PHASE, MODE_TCC, MODE_SAGA, MODE_MSG or unset (the transaction's)",
            ));
        }
    };
    if b.after.len() > MAX_AFTER {
        return Err(Status::invalid_argument(format!(
            "a step names {} steps to run after; at most {MAX_AFTER}",
            b.after.len()
        )));
    }
    Ok(NewBranch {
        endpoint: b.endpoint,
        resource: b.resource,
        payload: b.payload,
        mode,
        after: b.after,
    })
}

pub(super) fn state_to_wire(s: TxState) -> pb::TxState {
    match s {
        TxState::Active => pb::TxState::Active,
        TxState::Preparing => pb::TxState::Preparing,
        TxState::Committing => pb::TxState::Committing,
        TxState::Committed => pb::TxState::Committed,
        TxState::Aborting => pb::TxState::Aborting,
        TxState::Aborted => pb::TxState::Aborted,
        TxState::Stuck => pb::TxState::Stuck,
    }
}

pub(super) fn state_from_wire(s: i32) -> Result<TxState, Status> {
    let state = pb::TxState::try_from(s)
        .map_err(|_| Status::invalid_argument(format!("unknown state {s}")))?;
    TxState::ALL
        .into_iter()
        .find(|t| state_to_wire(*t) == state)
        .ok_or_else(|| Status::invalid_argument("state must be set"))
}

fn branch_state_to_wire(s: BranchState, mode: Mode) -> pb::BranchState {
    use pb::BranchState as W;
    match (s, mode) {
        (BranchState::Registered, _) => W::Registered,
        (BranchState::Prepared, Mode::TwoPhase) => W::Prepared,
        (BranchState::Prepared, Mode::Tcc | Mode::Saga | Mode::Msg) => W::Tried,
        (BranchState::Refused | BranchState::Failed, Mode::TwoPhase) => W::VotedNo,
        (BranchState::Refused | BranchState::Failed, Mode::Tcc | Mode::Saga | Mode::Msg) => {
            W::TryFailed
        }
        (BranchState::Committed, Mode::TwoPhase) => W::Committed,
        (BranchState::Committed, Mode::Tcc | Mode::Saga | Mode::Msg) => W::Confirmed,
        (BranchState::RolledBack, Mode::TwoPhase) => W::RolledBack,
        (BranchState::RolledBack, Mode::Tcc | Mode::Saga | Mode::Msg) => W::Cancelled,
    }
}

pub(super) fn record_to_wire(r: &TxnRecord) -> pb::TransactionInfo {
    pb::TransactionInfo {
        gtid: r.gtid.to_string(),
        mode: mode_to_wire(r.mode) as i32,
        state: state_to_wire(r.state) as i32,
        reason: r.reason.clone(),
        created_at_ms: r.created_ms,
        updated_at_ms: r.updated_ms,
        deadline_ms: r.deadline_ms,
        decision: match r.decision {
            None => pb::Decision::None,
            Some(Decision::Commit) => pb::Decision::Commit,
            Some(Decision::Abort) => pb::Decision::Abort,
        } as i32,
        abort: r.abort.as_ref().map(super::abort_detail::to_wire),
        epoch: r.epoch,
        owner: String::new(),
        owner_address: String::new(),
        labels: crate::labels::to_wire(&r.labels),
        compacted: r.compacted,
        branches: r
            .branches
            .iter()
            .map(|b| pb::BranchInfo {
                branch_id: b.id,
                endpoint: b.endpoint.clone(),
                resource: b.resource.clone(),
                state: branch_state_to_wire(b.state, b.mode) as i32,
                mode: mode_to_wire(b.mode) as i32,
                resolution: b.resolution.as_ref().map(|r| pb::Resolution {
                    by: r.by.clone(),
                    reason: r.reason.clone(),
                    at_ms: r.at_ms,
                }),
                attempts: b.attempts,
                last_error: b.last_error.clone(),
                updated_at_ms: b.updated_ms,
                payload_len: b.payload.len() as u32,
                next_attempt_at_ms: b.next_attempt_ms,
            })
            .collect(),
    }
}

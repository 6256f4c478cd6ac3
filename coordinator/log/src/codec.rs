//! How records are laid out on disk: protobuf messages (prost derive), so a
//! later version can add fields and still read old logs. A payload of at
//! most [`INLINE_PAYLOAD_MAX`] bytes travels inside the record (rewriting a
//! few bytes beats a second tree's write, lookup and removal); a larger one
//! is stored apart, once (see `SledLog`).

use bytes::Bytes;
use prost::Message;

use super::LogError;
use crate::labels::Label;
use crate::model::{
    AbortCause, AbortInfo, BranchRecord, BranchState, Decision, Gtid, Mode, Resolution,
    TraceContext, TxState, TxnRecord,
};

/// Format version written in every record.
const VERSION: u32 = 1;

#[derive(Clone, PartialEq, prost::Message)]
struct StoredTxn {
    #[prost(uint32, tag = "1")]
    version: u32,
    #[prost(uint32, tag = "2")]
    mode: u32,
    #[prost(uint32, tag = "3")]
    state: u32,
    #[prost(string, tag = "4")]
    reason: String,
    #[prost(uint64, tag = "5")]
    created_ms: u64,
    #[prost(uint64, tag = "6")]
    updated_ms: u64,
    #[prost(uint64, tag = "7")]
    deadline_ms: u64,
    #[prost(message, repeated, tag = "8")]
    branches: Vec<StoredBranch>,
    /// 0 none, 1 commit, 2 abort.
    #[prost(uint32, tag = "9")]
    decision: u32,
    /// Why it aborted, as fields (absent in records of older versions:
    /// added fields need no new format version, old readers skip them).
    #[prost(message, optional, tag = "10")]
    abort: Option<StoredAbort>,
    /// The owner's epoch; 0 (absent, records of older versions): 1.
    #[prost(uint64, tag = "11")]
    epoch: u64,
    /// Caller labels (absent in records of older versions: none).
    #[prost(message, repeated, tag = "12")]
    labels: Vec<StoredLabel>,
    /// The trace context of the call that started it.
    #[prost(message, optional, tag = "13")]
    trace: Option<StoredTrace>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct StoredLabel {
    #[prost(string, tag = "1")]
    key: String,
    #[prost(string, tag = "2")]
    value: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct StoredTrace {
    /// The W3C `traceparent` header.
    #[prost(string, tag = "1")]
    traceparent: String,
    /// The W3C `tracestate` header; empty for none.
    #[prost(string, tag = "2")]
    tracestate: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct StoredAbort {
    /// See [`abort_code`].
    #[prost(uint32, tag = "1")]
    cause: u32,
    #[prost(uint32, tag = "2")]
    branch: u32,
    #[prost(string, tag = "3")]
    resource: String,
    #[prost(string, tag = "4")]
    detail: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct StoredBranch {
    #[prost(string, tag = "1")]
    endpoint: String,
    #[prost(string, tag = "2")]
    resource: String,
    #[prost(uint32, tag = "3")]
    state: u32,
    #[prost(uint32, tag = "4")]
    attempts: u32,
    #[prost(string, tag = "5")]
    last_error: String,
    #[prost(uint64, tag = "6")]
    updated_ms: u64,
    #[prost(uint64, tag = "7")]
    next_attempt_ms: u64,
    /// The payload, when small enough to travel with the record.
    #[prost(bytes = "bytes", optional, tag = "8")]
    inline_payload: Option<Bytes>,
    /// The phase-1 reply of a yes vote (empty otherwise).
    #[prost(bytes = "bytes", tag = "9")]
    reply: Bytes,
    /// The branch's mode when it differs from the transaction's; 0 (and
    /// in records of older versions, absent): the transaction's.
    #[prost(uint32, tag = "10")]
    mode: u32,
    /// An operator's settling of the branch, if any.
    #[prost(message, optional, tag = "11")]
    resolution: Option<StoredResolution>,
    /// A saga step's dependencies (absent: none).
    #[prost(uint32, repeated, tag = "12")]
    after: Vec<u32>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct StoredResolution {
    #[prost(string, tag = "1")]
    by: String,
    #[prost(string, tag = "2")]
    reason: String,
    #[prost(uint64, tag = "3")]
    at_ms: u64,
}

/// Largest payload kept inside the record.
pub(super) const INLINE_PAYLOAD_MAX: usize = 512;

/// Whether a branch's payload is stored apart from the record.
pub(super) fn stored_apart(payload: &[u8]) -> bool {
    payload.len() > INLINE_PAYLOAD_MAX
}

fn mode_code(mode: Mode) -> u32 {
    match mode {
        Mode::TwoPhase => 1,
        Mode::Tcc => 2,
        Mode::Saga => 3,
        Mode::Msg => 4,
    }
}

const ABORT_CAUSES: [AbortCause; 6] = [
    AbortCause::VotedNo,
    AbortCause::PhaseOneFailed,
    AbortCause::Deadline,
    AbortCause::ClientRollback,
    AbortCause::OperatorAbort,
    AbortCause::CoordinatorRestart,
];

fn abort_code(cause: AbortCause) -> u32 {
    match cause {
        AbortCause::VotedNo => 1,
        AbortCause::PhaseOneFailed => 2,
        AbortCause::Deadline => 3,
        AbortCause::ClientRollback => 4,
        AbortCause::OperatorAbort => 5,
        AbortCause::CoordinatorRestart => 6,
    }
}

pub(super) fn state_code(state: TxState) -> u32 {
    match state {
        TxState::Active => 1,
        TxState::Preparing => 2,
        TxState::Committing => 3,
        TxState::Committed => 4,
        TxState::Aborting => 5,
        TxState::Aborted => 6,
        TxState::Stuck => 7,
    }
}

fn branch_code(state: BranchState) -> u32 {
    match state {
        BranchState::Registered => 1,
        BranchState::Prepared => 2,
        BranchState::Refused => 3,
        BranchState::Failed => 4,
        BranchState::Committed => 5,
        BranchState::RolledBack => 6,
    }
}

/// Encodes a record with its small payloads.
pub(super) fn encode(rec: &TxnRecord) -> Vec<u8> {
    StoredTxn {
        version: VERSION,
        mode: mode_code(rec.mode),
        state: state_code(rec.state),
        reason: rec.reason.clone(),
        created_ms: rec.created_ms,
        updated_ms: rec.updated_ms,
        deadline_ms: rec.deadline_ms,
        decision: match rec.decision {
            None => 0,
            Some(Decision::Commit) => 1,
            Some(Decision::Abort) => 2,
        },
        epoch: rec.epoch,
        labels: rec
            .labels
            .iter()
            .map(|l| StoredLabel {
                key: l.key.clone(),
                value: l.value.clone(),
            })
            .collect(),
        trace: rec.traceparent.as_ref().map(|t| StoredTrace {
            traceparent: t.parent.to_string(),
            tracestate: t.state.clone().unwrap_or_default(),
        }),
        abort: rec.abort.as_ref().map(|a| StoredAbort {
            cause: abort_code(a.cause),
            branch: a.branch,
            resource: a.resource.clone(),
            detail: a.detail.clone(),
        }),
        branches: rec
            .branches
            .iter()
            .map(|b| StoredBranch {
                mode: if b.mode == rec.mode {
                    0
                } else {
                    mode_code(b.mode)
                },
                endpoint: b.endpoint.clone(),
                resource: b.resource.clone(),
                state: branch_code(b.state),
                attempts: b.attempts,
                last_error: b.last_error.clone(),
                updated_ms: b.updated_ms,
                resolution: b.resolution.as_ref().map(|r| StoredResolution {
                    by: r.by.clone(),
                    reason: r.reason.clone(),
                    at_ms: r.at_ms,
                }),
                next_attempt_ms: b.next_attempt_ms,
                inline_payload: (!stored_apart(&b.payload)).then(|| b.payload.clone()),
                reply: b.reply.clone(),
                after: b.after.clone(),
            })
            .collect(),
    }
    .encode_to_vec()
}

/// Decodes a record; `payload(branch_id)` supplies each payload stored
/// apart (`None` when there is none: the record is corrupt then, since it
/// names a payload that is not there).
pub(super) fn decode(
    gtid: Gtid,
    bytes: &[u8],
    mut payload: impl FnMut(u32) -> Result<Option<Bytes>, LogError>,
) -> Result<TxnRecord, LogError> {
    let corrupt = |detail: String| LogError::Corrupt {
        gtid: gtid.to_string(),
        detail,
    };
    let stored = StoredTxn::decode(bytes).map_err(|e| corrupt(e.to_string()))?;
    if stored.version != VERSION {
        return Err(corrupt(format!(
            "unknown format version {}",
            stored.version
        )));
    }
    let mode = match stored.mode {
        1 => Mode::TwoPhase,
        2 => Mode::Tcc,
        3 => Mode::Saga,
        4 => Mode::Msg,
        m => return Err(corrupt(format!("unknown mode {m}"))),
    };
    let state = TxState::ALL
        .into_iter()
        .find(|s| state_code(*s) == stored.state)
        .ok_or_else(|| corrupt(format!("unknown state {}", stored.state)))?;
    let mut branches = Vec::with_capacity(stored.branches.len());
    for (i, b) in stored.branches.into_iter().enumerate() {
        let id = i as u32 + 1;
        let state = [
            BranchState::Registered,
            BranchState::Prepared,
            BranchState::Refused,
            BranchState::Failed,
            BranchState::Committed,
            BranchState::RolledBack,
        ]
        .into_iter()
        .find(|s| branch_code(*s) == b.state)
        .ok_or_else(|| corrupt(format!("branch {id}: unknown state {}", b.state)))?;
        branches.push(BranchRecord {
            id,
            mode: match b.mode {
                0 => mode,
                1 => Mode::TwoPhase,
                2 => Mode::Tcc,
                3 => Mode::Saga,
                4 => Mode::Msg,
                m => return Err(corrupt(format!("branch {id}: unknown mode {m}"))),
            },
            endpoint: b.endpoint,
            resource: b.resource,
            payload: match b.inline_payload {
                Some(p) => p,
                None => payload(id)?.ok_or_else(|| {
                    corrupt(format!(
                        "branch {id}: its payload, stored apart, is missing"
                    ))
                })?,
            },
            reply: b.reply,
            state,
            attempts: b.attempts,
            last_error: b.last_error,
            next_attempt_ms: b.next_attempt_ms,
            updated_ms: b.updated_ms,
            after: b.after,
            resolution: b.resolution.map(|r| Resolution {
                by: r.by,
                reason: r.reason,
                at_ms: r.at_ms,
            }),
        });
    }
    let decision = match stored.decision {
        1 => Some(Decision::Commit),
        2 => Some(Decision::Abort),
        0 => None,
        d => return Err(corrupt(format!("unknown decision {d}"))),
    };
    let abort = match stored.abort {
        None => None,
        Some(a) => Some(AbortInfo {
            cause: ABORT_CAUSES
                .into_iter()
                .find(|c| abort_code(*c) == a.cause)
                .ok_or_else(|| corrupt(format!("unknown abort cause {}", a.cause)))?,
            branch: a.branch,
            resource: a.resource,
            detail: a.detail,
        }),
    };
    Ok(TxnRecord {
        gtid,
        mode,
        state,
        decision,
        reason: stored.reason,
        abort,
        created_ms: stored.created_ms,
        updated_ms: stored.updated_ms,
        deadline_ms: stored.deadline_ms,
        branches,
        epoch: stored.epoch.max(1),
        labels: stored
            .labels
            .into_iter()
            .map(|l| Label {
                key: l.key,
                value: l.value,
            })
            .collect(),
        // Tracing is never a reason to refuse a record: one that does not
        // parse is dropped.
        traceparent: stored.trace.and_then(|t| {
            TraceContext::from_headers(
                &t.traceparent,
                Some(t.tracestate.as_str()).filter(|s| !s.is_empty()),
            )
        }),
        compacted: false,
    })
}

/// Only the state of a stored record: decoding it skips the branches and
/// payloads, so filtering by state does not decode whole records.
#[derive(Clone, PartialEq, prost::Message)]
struct StoredState {
    #[prost(uint32, tag = "3")]
    state: u32,
}

/// The state of an encoded record, if it reads.
pub(super) fn peek_state(bytes: &[u8]) -> Option<TxState> {
    let code = StoredState::decode(bytes).ok()?.state;
    TxState::ALL.into_iter().find(|s| state_code(*s) == code)
}

/// Whether an encoded record has a payload stored apart (so removing it
/// must remove those too).
pub(super) fn has_payloads_apart(bytes: &[u8]) -> bool {
    StoredTxn::decode(bytes).map_or(true, |t| {
        t.branches.iter().any(|b| b.inline_payload.is_none())
    })
}

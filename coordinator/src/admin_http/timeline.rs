//! A transaction's timeline for the console's detail page: the record's
//! timestamps in order.

use serde::Serialize;
use tandem_proto::v1 as pb;

/// One moment of a transaction's life.
#[derive(Serialize)]
pub(super) struct Moment {
    /// When, ms since the Unix epoch; `null` when the record does not keep
    /// the time (the decision: placed before its phase 2).
    at_ms: Option<u64>,
    what: String,
}

/// The record's timestamps in order: created, each branch's last change,
/// the decision, the deadline, the last change.
pub(super) fn timeline(t: &pb::TransactionInfo) -> Vec<Moment> {
    let mut moments: Vec<(u64, Moment)> = Vec::new();
    let mut at = |key: u64, at_ms: Option<u64>, what: String| {
        moments.push((key, Moment { at_ms, what }));
    };
    let mode = match t.mode() {
        pb::Mode::Tcc => "TCC",
        pb::Mode::Saga => "saga",
        pb::Mode::Msg => "msg",
        _ => "2PC",
    };
    at(
        t.created_at_ms,
        Some(t.created_at_ms),
        format!("created ({mode}, {} branches)", t.branches.len()),
    );
    let decision = t.decision();
    if decision != pb::Decision::None {
        // Not timed in the record: before the first phase-2 acknowledgement.
        let phase_two = t
            .branches
            .iter()
            .filter(|b| {
                matches!(
                    b.state(),
                    pb::BranchState::Committed | pb::BranchState::RolledBack
                )
            })
            .map(|b| b.updated_at_ms)
            .min()
            .unwrap_or(t.updated_at_ms);
        let name = decision.as_str_name();
        at(
            phase_two,
            None,
            format!("decided {}", name.strip_prefix("DECISION_").unwrap_or(name)),
        );
    }
    for b in &t.branches {
        let state = b.state().as_str_name();
        let mut what = format!(
            "branch #{} {} at {}: {}",
            b.branch_id,
            b.resource,
            b.endpoint,
            state.strip_prefix("BRANCH_STATE_").unwrap_or(state)
        );
        if b.attempts > 0 {
            what.push_str(&format!(" after {} phase-2 attempts", b.attempts));
        }
        if !b.last_error.is_empty() {
            what.push_str(&format!(
                "; last error: {}",
                crate::model::cap_text(&b.last_error, 300)
            ));
        }
        at(b.updated_at_ms, Some(b.updated_at_ms), what);
        if let Some(r) = &b.resolution {
            at(
                r.at_ms,
                Some(r.at_ms),
                format!(
                    "branch #{} settled by hand by {}: {}",
                    b.branch_id, r.by, r.reason
                ),
            );
        }
        if b.next_attempt_at_ms > 0 {
            at(
                b.next_attempt_at_ms,
                Some(b.next_attempt_at_ms),
                format!("branch #{}: next attempt due", b.branch_id),
            );
        }
    }
    if t.compacted {
        at(
            t.updated_at_ms,
            Some(t.updated_at_ms),
            "compacted by retention: only its decision is kept (a branch was settled by hand)"
                .into(),
        );
    }
    if t.deadline_ms > 0 {
        at(
            t.deadline_ms,
            Some(t.deadline_ms),
            "deadline (undecided past it means abort)".into(),
        );
    }
    let state = state_name(t.state());
    at(
        t.updated_at_ms,
        Some(t.updated_at_ms),
        format!("last change: {state}"),
    );
    moments.sort_by_key(|(k, _)| *k);
    moments.into_iter().map(|(_, m)| m).collect()
}

/// A state's name as the API shows it (`COMMITTED`, not `TX_STATE_COMMITTED`).
fn state_name(s: pb::TxState) -> String {
    let name = s.as_str_name();
    name.strip_prefix("TX_STATE_").unwrap_or(name).to_string()
}

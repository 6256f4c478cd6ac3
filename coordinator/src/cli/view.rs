//! How `tandem tx` shows transactions: the view of one (the admin HTTP
//! API answers in the same shape), the list table and the detail page.

use std::fmt::Write as _;

use serde::Serialize;
use tandem_proto::v1 as pb;

use super::Output;
use crate::model::now_ms;

/// A transaction as the CLI shows it (and as its JSON reads); the admin
/// HTTP API answers in the same shape.
#[derive(Serialize)]
pub struct TxView {
    gtid: String,
    mode: &'static str,
    state: String,
    decision: String,
    reason: String,
    /// What made it abort ("VOTED_NO", …); empty when not aborted.
    #[serde(skip_serializing_if = "String::is_empty")]
    abort_cause: String,
    /// The branch that made it abort; 0 when none did.
    #[serde(skip_serializing_if = "is_zero")]
    abort_branch: u32,
    created_at_ms: u64,
    updated_at_ms: u64,
    deadline_ms: u64,
    /// 1, one more per takeover by another coordinator.
    epoch: u64,
    /// On a shared store: the coordinator that drives it, and its address.
    #[serde(skip_serializing_if = "String::is_empty")]
    owner: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    owner_address: String,
    /// Caller labels, by key.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    labels: std::collections::BTreeMap<String, String>,
    age_ms: u64,
    attempts: u32,
    /// Retention kept only its decision (a branch settled by hand).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    compacted: bool,
    branches: Vec<BranchView>,
}

#[derive(Serialize)]
struct BranchView {
    branch_id: u32,
    mode: &'static str,
    endpoint: String,
    resource: String,
    state: String,
    attempts: u32,
    last_error: String,
    updated_at_ms: u64,
    next_attempt_at_ms: u64,
    payload_len: u32,
    /// Who settled it by hand, and why; absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    resolution: Option<ResolutionView>,
}

#[derive(Serialize)]
struct ResolutionView {
    by: String,
    reason: String,
    at_ms: u64,
}

fn mode_name(mode: pb::Mode) -> &'static str {
    match mode {
        pb::Mode::Tcc => "TCC",
        pb::Mode::Saga => "SAGA",
        pb::Mode::Msg => "MSG",
        _ => "2PC",
    }
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// `TX_STATE_COMMITTED` → `COMMITTED`.
fn short(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix).unwrap_or(name).to_string()
}

impl From<pb::TransactionInfo> for TxView {
    fn from(mut t: pb::TransactionInfo) -> Self {
        let (mode, state, decision) = (t.mode(), t.state(), t.decision());
        let branches: Vec<BranchView> = std::mem::take(&mut t.branches)
            .into_iter()
            .map(|b| BranchView {
                state: short(b.state().as_str_name(), "BRANCH_STATE_"),
                branch_id: b.branch_id,
                mode: mode_name(b.mode()),
                endpoint: b.endpoint,
                resource: b.resource,
                attempts: b.attempts,
                last_error: b.last_error,
                updated_at_ms: b.updated_at_ms,
                next_attempt_at_ms: b.next_attempt_at_ms,
                payload_len: b.payload_len,
                resolution: b.resolution.map(|r| ResolutionView {
                    by: r.by,
                    reason: r.reason,
                    at_ms: r.at_ms,
                }),
            })
            .collect();
        TxView {
            mode: mode_name(mode),
            state: short(state.as_str_name(), "TX_STATE_"),
            decision: short(decision.as_str_name(), "DECISION_"),
            reason: t.reason,
            abort_cause: t.abort.as_ref().map_or(String::new(), |a| {
                short(a.cause().as_str_name(), "ABORT_CAUSE_")
            }),
            abort_branch: t.abort.as_ref().map_or(0, |a| a.branch_id),
            age_ms: now_ms().saturating_sub(t.created_at_ms),
            created_at_ms: t.created_at_ms,
            updated_at_ms: t.updated_at_ms,
            deadline_ms: t.deadline_ms,
            epoch: t.epoch.max(1),
            owner: t.owner,
            owner_address: t.owner_address,
            labels: t.labels.into_iter().collect(),
            attempts: branches.iter().map(|b| b.attempts).sum(),
            compacted: t.compacted,
            branches,
            gtid: t.gtid,
        }
    }
}

pub(super) fn json<T: Serialize>(value: &T) -> String {
    serde_json::to_string_pretty(value).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

/// `1h5m`, `3m12s`, `4.2s`, `350ms`.
pub(super) fn human(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0 => format!("{ms}ms"),
        1..=59 => format!("{:.1}s", ms as f64 / 1000.0),
        60..=3599 => format!("{}m{}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{}h", s / 86_400, (s % 86_400) / 3600),
    }
}

/// Text a participant, a client or the store wrote, made safe to print:
/// control and invisible formatting characters (a terminal's escape
/// sequences, a line break that fakes a field, a bidi override) are shown
/// escaped, not sent to the operator's terminal.
pub(super) fn shown(text: &str) -> String {
    if crate::labels::printable(text) {
        return text.to_string();
    }
    text.chars()
        .map(|c| {
            if c.is_control() || crate::labels::invisible(c) {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

pub(super) fn clip(text: &str, max: usize) -> String {
    let one_line = shown(&text.replace('\n', " "));
    if one_line.chars().count() <= max {
        return one_line;
    }
    let cut: String = one_line.chars().take(max.saturating_sub(1)).collect();
    format!("{cut}…")
}

/// What a row shows as its last error: the newest branch error still
/// recorded, or else, for an aborted transaction, why it aborted (a TCC
/// branch that voted no is cancelled, and a cancel that succeeds clears
/// the branch's error, so the cause lives only in the reason).
fn last_error(t: &TxView) -> String {
    t.branches
        .iter()
        .rev()
        .find(|b| !b.last_error.is_empty())
        .map(|b| format!("#{}: {}", b.branch_id, b.last_error))
        .or_else(|| (!t.abort_cause.is_empty()).then(|| t.reason.clone()))
        .unwrap_or_default()
}

fn labels_text(labels: &std::collections::BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

pub(super) fn list_table(rows: &[TxView]) -> String {
    let mut out = format!(
        "{:<36}  {:<4}  {:<10}  {:>7}  {:>8}  {:>8}  {:<24}  LAST ERROR\n",
        "GTID", "MODE", "STATE", "AGE", "BRANCHES", "ATTEMPTS", "LABELS"
    );
    for t in rows {
        let _ = writeln!(
            out,
            "{:<36}  {:<4}  {:<10}  {:>7}  {:>8}  {:>8}  {:<24}  {}",
            t.gtid,
            t.mode,
            t.state,
            human(t.age_ms),
            t.branches.len(),
            t.attempts,
            clip(&labels_text(&t.labels), 24),
            clip(&last_error(t), 60)
        );
    }
    let _ = write!(out, "({} transactions)", rows.len());
    out
}

pub(super) fn render_one(t: TxView, output: Output) -> String {
    if output == Output::Json {
        return json(&t);
    }
    let now = now_ms();
    let mut out = String::new();
    let _ = writeln!(out, "transaction {}", t.gtid);
    let _ = writeln!(out, "  mode       {}", t.mode);
    let _ = writeln!(out, "  state      {}", t.state);
    let _ = writeln!(out, "  decision   {}", t.decision);
    if !t.reason.is_empty() {
        let _ = writeln!(out, "  reason     {}", shown(&t.reason));
    }
    match (t.abort_cause.as_str(), t.abort_branch) {
        ("", _) => {}
        (cause, 0) => {
            let _ = writeln!(out, "  cause      {cause}");
        }
        (cause, b) => {
            let _ = writeln!(out, "  cause      {cause} (branch {b})");
        }
    }
    let _ = writeln!(
        out,
        "  created    {} ago ({} ms)",
        human(t.age_ms),
        t.created_at_ms
    );
    let _ = writeln!(
        out,
        "  updated    {} ago ({} ms)",
        human(now.saturating_sub(t.updated_at_ms)),
        t.updated_at_ms
    );
    if t.compacted {
        let _ = write!(
            out,
            "  compacted  retention removed its record and keeps only its decision, for \
             --decision-retention: a branch was settled by hand, and its participant is \
             still told {} if it asks",
            t.decision
        );
        return out;
    }
    let deadline = if t.deadline_ms > now {
        format!("in {}", human(t.deadline_ms - now))
    } else {
        format!("{} ago", human(now - t.deadline_ms))
    };
    let _ = writeln!(out, "  deadline   {deadline} ({} ms)", t.deadline_ms);
    if !t.labels.is_empty() {
        let _ = writeln!(out, "  labels     {}", shown(&labels_text(&t.labels)));
    }
    if !t.owner.is_empty() {
        let _ = writeln!(
            out,
            "  owner      {} at {} (epoch {})",
            shown(&t.owner),
            shown(&t.owner_address),
            t.epoch
        );
    } else if t.epoch > 1 {
        let _ = writeln!(out, "  epoch      {}", t.epoch);
    }
    let _ = write!(out, "  branches   {}", t.branches.len());
    for b in &t.branches {
        // A branch's own protocol is named when it is not the transaction's.
        let own = if b.mode == t.mode {
            String::new()
        } else {
            format!(" ({})", b.mode)
        };
        let _ = write!(
            out,
            "\n  #{}{own} {} {} at {}\n      attempts {}, updated {} ago, payload {} bytes",
            b.branch_id,
            b.state,
            shown(&b.resource),
            shown(&b.endpoint),
            b.attempts,
            human(now.saturating_sub(b.updated_at_ms)),
            b.payload_len
        );
        if b.next_attempt_at_ms > 0 {
            let _ = write!(
                out,
                ", next attempt in {}",
                human(b.next_attempt_at_ms.saturating_sub(now))
            );
        }
        if !b.last_error.is_empty() {
            let _ = write!(out, "\n      last error: {}", shown(&b.last_error));
        }
        if let Some(r) = &b.resolution {
            let _ = write!(
                out,
                "\n      settled by hand by {} {} ago: {}",
                shown(&r.by),
                human(now.saturating_sub(r.at_ms)),
                shown(&r.reason)
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    // A participant's reason or error with a terminal's escape sequence,
    // a line break faking a field or a bidi override is printed escaped.
    #[test]
    fn text_from_outside_is_shown_escaped() {
        assert_eq!(shown("insufficient funds"), "insufficient funds");
        let hostile = "\u{1b}[2Jok\n  state      COMMITTED\u{202e}";
        let s = shown(hostile);
        assert!(
            !s.chars()
                .any(|c| c.is_control() || crate::labels::invisible(c)),
            "{s:?}"
        );
        assert_eq!(s, "\\u{1b}[2Jok\\u{a}  state      COMMITTED\\u{202e}");
        assert!(!clip(hostile, 60).contains('\u{1b}'));
    }
}

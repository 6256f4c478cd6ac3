//! `tandem tx list|show|retry|abort|resolve`: the operator's view of a running
//! coordinator, through its Admin gRPC service. Each verb returns the text
//! to print (a table or JSON); errors are one line, ready for stderr.

use std::fmt::Write as _;
use std::time::Duration;

use tandem_common::security::BearerToken;
use tandem_common::security::ClientOptions;
use tandem_proto::v1 as pb;
use tandem_proto::v1::admin_client::AdminClient;
use tonic::codegen::InterceptedService;
use tonic::transport::Channel;

mod view;

use crate::model::now_ms;

pub use view::TxView;
use view::{json, list_table, render_one};

/// How results are printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// Aligned text for people.
    Table,
    /// One JSON document for scripts.
    Json,
}

/// A failed verb: the one line to print.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CliError(pub String);

/// Connects to the Admin service at `endpoint` (`http://host:port`).
///
/// # Errors
///
/// The endpoint is malformed or nothing answers there.
pub async fn connect(endpoint: &str, options: &ClientOptions) -> Result<Admin, CliError> {
    let channel = tandem_common::security::endpoint(endpoint, options.tls.as_ref())
        .map_err(|e| CliError(format!("coordinator {endpoint:?}: {e}")))?
        .connect_timeout(Duration::from_secs(3))
        .connect()
        .await
        .map_err(|e| {
            CliError(format!(
                "coordinator at {endpoint} is unreachable: {}",
                source_chain(&e)
            ))
        })?;
    Ok(
        AdminClient::with_interceptor(channel, options.token.clone())
            .max_decoding_message_size(64 * 1024 * 1024),
    )
}

/// An Admin client sending the operator's token.
pub type Admin = AdminClient<InterceptedService<Channel, BearerToken>>;

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let _ = write!(out, ": {s}");
        source = s.source();
    }
    out
}

fn rpc_error(gtid: Option<&str>, status: tonic::Status) -> CliError {
    if let Some(source) = std::error::Error::source(&status) {
        // A connection that failed under the call: say why, and what
        // usually causes it.
        return CliError(format!(
            "cannot talk to the coordinator: {}: {} (plaintext to a TLS port or the reverse? \
             an https:// coordinator needs --ca; one that requires client certificates needs \
             --cert and --key)",
            status.message(),
            source_chain(source)
        ));
    }
    match (status.code(), gtid) {
        (tonic::Code::NotFound, Some(g)) => CliError(format!("no transaction {g}")),
        (tonic::Code::FailedPrecondition, _) => CliError(format!("refused: {}", status.message())),
        (tonic::Code::InvalidArgument, _) => CliError(format!("invalid: {}", status.message())),
        (tonic::Code::Unavailable, _) => {
            CliError(format!("coordinator unavailable: {}", status.message()))
        }
        (code, _) => CliError(format!("{code:?}: {}", status.message())),
    }
}

/// Parses a state name (`stuck`, `COMMITTING`, `tx_state_active`).
///
/// # Errors
///
/// The name is not a state.
pub fn parse_state(s: &str) -> Result<pb::TxState, String> {
    let upper = s.trim().to_ascii_uppercase();
    let name = upper.strip_prefix("TX_STATE_").unwrap_or(&upper);
    pb::TxState::from_str_name(&format!("TX_STATE_{name}"))
        .filter(|s| *s != pb::TxState::Unspecified)
        .ok_or_else(|| {
            format!(
                "unknown state {s:?}; use active, preparing, committing, committed, aborting, aborted or stuck"
            )
        })
}

/// What `tandem tx list` looks for.
#[derive(Clone, Debug, Default)]
pub struct ListFilter {
    /// Only these states (any when empty).
    pub states: Vec<pb::TxState>,
    /// Only created longer ago than this.
    pub older_than: Option<Duration>,
    /// Only carrying every one of these caller labels.
    pub labels: Vec<(String, String)>,
    /// Only with a branch of this resource.
    pub resource: Option<String>,
    /// Only with a branch calling this endpoint.
    pub endpoint: Option<String>,
    /// Only of this protocol.
    pub mode: Option<pb::Mode>,
    /// Only gtids starting with this.
    pub gtid_prefix: Option<String>,
    /// Newest first.
    pub newest_first: bool,
}

/// Parses a `key=value` label.
///
/// # Errors
///
/// No `=`, or an empty key.
pub fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!("label {s:?}: expected key=value")),
    }
}

/// `tandem tx stats`: the coordinator's counters (Admin GetStats).
///
/// # Errors
///
/// The coordinator refused or could not be reached.
pub async fn stats(client: &mut Admin, output: Output) -> Result<String, CliError> {
    let s = client
        .get_stats(pb::GetStatsRequest {})
        .await
        .map_err(|s| rpc_error(None, s))?
        .into_inner();
    let batch = if s.flushes == 0 {
        0.0
    } else {
        s.forces as f64 / s.flushes as f64
    };
    Ok(match output {
        Output::Json => json(&serde_json::json!({
            "forces": s.forces,
            "flushes": s.flushes,
            "forces_per_flush": batch,
            "live": s.live,
            "purged": s.purged,
        })),
        Output::Table => format!(
            "live transactions      {}\n\
             forced writes          {}\n\
             flushes (fdatasync)    {}\n\
             forces per flush       {batch:.2}\n\
             purged by retention    {}",
            s.live, s.forces, s.flushes, s.purged
        ),
    })
}

/// `tandem tx list`.
///
/// # Errors
///
/// The coordinator refused or could not be reached.
pub async fn list(
    client: &mut Admin,
    filter: &ListFilter,
    limit: usize,
    output: Output,
) -> Result<String, CliError> {
    let created_before_ms = filter
        .older_than
        .map_or(0, |d| now_ms().saturating_sub(d.as_millis() as u64));
    let mut rows = Vec::new();
    let mut page_token = String::new();
    while rows.len() < limit {
        let page = client
            .list_transactions(pb::ListTransactionsRequest {
                states: filter.states.iter().map(|s| *s as i32).collect(),
                page_size: (limit - rows.len()).min(1000) as u32,
                page_token,
                created_before_ms,
                labels: filter.labels.iter().cloned().collect(),
                resource: filter.resource.clone().unwrap_or_default(),
                endpoint: filter.endpoint.clone().unwrap_or_default(),
                newest_first: filter.newest_first,
                mode: filter.mode.map_or(0, |m| m as i32),
                gtid_prefix: filter.gtid_prefix.clone().unwrap_or_default(),
            })
            .await
            .map_err(|s| rpc_error(None, s))?
            .into_inner();
        rows.extend(page.transactions.into_iter().map(TxView::from));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    rows.truncate(limit);
    Ok(match output {
        Output::Json => json(&rows),
        Output::Table => list_table(&rows),
    })
}

/// `tandem tx show GTID`.
///
/// # Errors
///
/// Unknown gtid, or the coordinator could not be reached.
pub async fn show(client: &mut Admin, gtid: &str, output: Output) -> Result<String, CliError> {
    let reply = client
        .get_transaction(pb::AdminGetTransactionRequest {
            gtid: gtid.to_string(),
        })
        .await;
    one(gtid, reply, output)
}

/// Renders the record a verb on one transaction returned.
fn one(
    gtid: &str,
    reply: Result<tonic::Response<pb::TransactionInfo>, tonic::Status>,
    output: Output,
) -> Result<String, CliError> {
    let info = reply.map_err(|s| rpc_error(Some(gtid), s))?.into_inner();
    Ok(render_one(TxView::from(info), output))
}

/// `tandem tx retry GTID`.
///
/// # Errors
///
/// Unknown gtid, refused (undecided within its deadline), or unreachable.
pub async fn retry(client: &mut Admin, gtid: &str, output: Output) -> Result<String, CliError> {
    let reply = client
        .retry_transaction(pb::RetryTransactionRequest {
            gtid: gtid.to_string(),
        })
        .await;
    one(gtid, reply, output)
}

/// `tandem tx abort GTID`.
///
/// # Errors
///
/// Unknown gtid, refused (a commit decision), or unreachable.
pub async fn abort(
    client: &mut Admin,
    gtid: &str,
    reason: &str,
    output: Output,
) -> Result<String, CliError> {
    let reply = client
        .abort_transaction(pb::AbortTransactionRequest {
            gtid: gtid.to_string(),
            reason: reason.to_string(),
        })
        .await;
    one(gtid, reply, output)
}

/// How `tandem tx resolve` settles a branch: committed (`true`) or rolled
/// back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settled(pub bool);

/// `--as committed|rolled-back` of `tandem tx resolve` (TCC words too).
///
/// # Errors
///
/// Any other word.
pub fn parse_settled(s: &str) -> Result<Settled, String> {
    match s.to_ascii_lowercase().as_str() {
        "committed" | "confirmed" | "commit" => Ok(Settled(true)),
        "rolled-back" | "rolledback" | "rolled_back" | "cancelled" | "rollback" => {
            Ok(Settled(false))
        }
        _ => Err(format!(
            "unknown outcome {s:?}; use committed or rolled-back (confirmed / cancelled for TCC)"
        )),
    }
}

/// `tandem tx resolve GTID --branch N --as committed|rolled-back --reason …`.
///
/// # Errors
///
/// Unknown gtid, refused (not STUCK, branch settled, or against the
/// decision), or unreachable.
pub async fn resolve(
    client: &mut Admin,
    gtid: &str,
    branch: u32,
    commit: bool,
    reason: &str,
    output: Output,
) -> Result<String, CliError> {
    let outcome = if commit {
        pb::Decision::Commit
    } else {
        pb::Decision::Abort
    };
    let reply = client
        .resolve_branch(pb::ResolveBranchRequest {
            gtid: gtid.to_string(),
            branch_id: branch,
            outcome: outcome as i32,
            reason: reason.to_string(),
        })
        .await;
    let text = one(gtid, reply, output)?;
    if output == Output::Json {
        return Ok(text);
    }
    let what = if commit { "committed" } else { "rolled back" };
    Ok(format!(
        "WARNING: branch {branch} is now recorded as {what} on your word; the coordinator will \
         not call its participant again. Whatever that participant holds for it is now yours \
         to make consistent.\n{text}"
    ))
}

/// Parses `250ms`, `5s`, `2m`, `1h`, or a bare number of milliseconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 250ms, 5s, 2m, 1h or 90d"))?;
    let ms = match unit {
        "" | "ms" => n,
        "s" => n.saturating_mul(1000),
        "m" => n.saturating_mul(60_000),
        "h" => n.saturating_mul(3_600_000),
        "d" => n.saturating_mul(86_400_000),
        _ => {
            return Err(format!(
                "unknown unit {unit:?} in {s:?}; use ms, s, m, h or d"
            ));
        }
    };
    Ok(Duration::from_millis(ms))
}

#[cfg(test)]
mod tests {
    use super::view::{clip, human};
    use super::*;

    #[test]
    fn states_parse_in_any_case_and_garbage_is_refused() {
        assert_eq!(parse_state("stuck"), Ok(pb::TxState::Stuck));
        assert_eq!(parse_state("COMMITTING"), Ok(pb::TxState::Committing));
        assert_eq!(parse_state("tx_state_active"), Ok(pb::TxState::Active));
        assert!(parse_state("unspecified").is_err());
        assert!(parse_state("done").is_err());
    }

    #[test]
    fn ages_read_like_a_person_would_write_them() {
        assert_eq!(human(350), "350ms");
        assert_eq!(human(4_200), "4.2s");
        assert_eq!(human(192_000), "3m12s");
        assert_eq!(human(3_900_000), "1h5m");
        assert_eq!(human(90_000_000), "1d1h");
        assert_eq!(clip("abcdef", 4), "abc…");
    }
}

//! The JSON API under `/api/`, answered by the Admin gRPC service in
//! process ([`AdminService`]'s methods, called directly) in the shape of
//! `tandem tx --output json` ([`TxView`]).
//!
//! - `GET /api/overview`: counters, counts by state, oldest ages.
//! - `GET /api/transactions?state=&mode=&resource=&min_age=&gtid=&page_token=&page_size=&newest_first=`
//! - `GET /api/transactions/{gtid}`: the record, a timeline, its labels.
//! - `POST /api/transactions/{gtid}/retry`, `POST …/abort` (`{"reason": …}`).
//!
//! Filters the Admin service does not take (mode, resource, gtid prefix,
//! newest first) are applied here over pages of its list, with a bounded
//! number of records read per request; a page cut short by that bound
//! still carries a `next_page_token` to go on from.

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Extension, Path, RawQuery, State};
use axum::response::Response;
use axum::routing::{get, post};
use http::StatusCode;
use serde::Serialize;
use tandem_proto::v1 as pb;
use tandem_proto::v1::admin_server::Admin as _;
use tonic::Request;

use super::timeline::{Moment, timeline};
use super::{AdminCaller, AppState, error, json, query};
use crate::cli::{TxView, parse_duration, parse_state};
use crate::model::now_ms;

/// Default and largest page of `GET /api/transactions`.
const DEFAULT_PAGE: usize = 50;
const MAX_PAGE: usize = 200;
/// Longest abort reason (as the Admin service).
const MAX_REASON_BYTES: usize = 1024;
/// Largest request body (an abort reason with room for JSON escapes).
const MAX_BODY_BYTES: usize = 8 * 1024;
/// Longest resource filter.
const MAX_RESOURCE_BYTES: usize = 256;

/// The `/api` routes.
pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/overview", get(overview))
        .route("/transactions", get(list))
        .route("/transactions/{gtid}", get(detail))
        .route("/transactions/{gtid}/retry", post(retry))
        .route("/transactions/{gtid}/abort", post(abort))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
}

/// A gRPC status as an HTTP answer with its message.
fn from_status(s: &tonic::Status) -> Response {
    use tonic::Code;
    let code = match s.code() {
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::FailedPrecondition | Code::Aborted | Code::AlreadyExists => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(code, s.message())
}

fn bad(message: impl AsRef<str>) -> Response {
    error(StatusCode::BAD_REQUEST, message.as_ref())
}

/// `GET /api/overview`.
#[derive(Serialize)]
struct Overview {
    /// The coordinator's instance name (or its gRPC address).
    instance: String,
    /// Transactions held in memory (not terminal, not STUCK).
    live: u64,
    /// Live and STUCK transactions by state name.
    counts: std::collections::BTreeMap<String, u64>,
    /// More STUCK records than were counted.
    counts_partial: bool,
    /// Decided but not finished: COMMITTING + ABORTING.
    in_doubt: u64,
    stuck: u64,
    /// Age of the oldest unfinished (not STUCK) transaction; 0 when none.
    oldest_live_age_ms: u64,
    oldest_live_gtid: String,
    /// Age of the oldest STUCK transaction; 0 when none.
    oldest_stuck_age_ms: u64,
    oldest_stuck_gtid: String,
    /// Age of the oldest decided but unfinished transaction; 0 when none.
    oldest_in_doubt_age_ms: u64,
    oldest_in_doubt_gtid: String,
    forces: u64,
    flushes: u64,
    purged: u64,
    /// Unfinished transactions found at start not yet taken up.
    recovery_backlog: u64,
    /// Stopped deciding after a log failure.
    halted: bool,
    /// Shutting down: no new transactions.
    draining: bool,
    now_ms: u64,
}

async fn overview(State(s): State<AppState>) -> Response {
    let stats = match s
        .admin
        .get_stats(Request::new(pb::GetStatsRequest {}))
        .await
    {
        Ok(r) => r.into_inner(),
        Err(e) => return from_status(&e),
    };
    let census = match s.coord.census() {
        Ok(c) => c,
        Err(e) => return from_status(&tonic::Status::from(e)),
    };
    let now = now_ms();
    let age = |o: Option<crate::runtime::Oldest>| {
        o.map_or((String::new(), 0), |o| {
            (o.gtid.to_string(), now.saturating_sub(o.created_ms))
        })
    };
    let (oldest_live_gtid, oldest_live_age_ms) = age(census.oldest_live);
    let (oldest_stuck_gtid, oldest_stuck_age_ms) = age(census.oldest_stuck);
    let (oldest_in_doubt_gtid, oldest_in_doubt_age_ms) = age(census.oldest_in_doubt);
    let body = Overview {
        instance: s.instance.clone(),
        live: census.live,
        in_doubt: census.in_doubt,
        stuck: census.stuck,
        counts_partial: census.stuck_capped,
        oldest_live_age_ms,
        oldest_live_gtid,
        oldest_stuck_age_ms,
        oldest_stuck_gtid,
        oldest_in_doubt_age_ms,
        oldest_in_doubt_gtid,
        forces: stats.forces,
        flushes: stats.flushes,
        purged: stats.purged,
        recovery_backlog: s.coord.recovery_backlog() as u64,
        halted: s.coord.is_halted(),
        draining: s.coord.is_draining(),
        now_ms: now,
        counts: census
            .by_state
            .iter()
            .map(|(st, n)| (st.to_string(), *n))
            .collect(),
    };
    json(StatusCode::OK, &body)
}

/// The filters of `GET /api/transactions`.
#[derive(Debug, Default)]
struct ListQuery {
    states: Vec<pb::TxState>,
    mode: Option<pb::Mode>,
    resource: Option<String>,
    min_age_ms: Option<u64>,
    gtid: Option<String>,
    labels: Vec<(String, String)>,
    endpoint: Option<String>,
    page_token: String,
    page_size: usize,
    newest_first: bool,
}

impl ListQuery {
    fn parse(raw: Option<&str>) -> Result<ListQuery, String> {
        let mut q = ListQuery {
            page_size: DEFAULT_PAGE,
            ..ListQuery::default()
        };
        for (k, v) in query::pairs(raw)? {
            let v = v.trim();
            if v.is_empty() {
                continue;
            }
            match k.as_str() {
                "state" => {
                    for one in v.split(',').filter(|s| !s.trim().is_empty()) {
                        let st = parse_state(one)?;
                        if !q.states.contains(&st) {
                            q.states.push(st);
                        }
                    }
                }
                "mode" => {
                    q.mode = Some(match v.to_ascii_lowercase().as_str() {
                        "2pc" => pb::Mode::TwoPhase,
                        "tcc" => pb::Mode::Tcc,
                        "saga" => pb::Mode::Saga,
                        "msg" => pb::Mode::Msg,
                        _ => {
                            return Err(format!(
                                "unknown mode {:?}; use 2pc, tcc, saga or msg",
                                clip(v)
                            ));
                        }
                    });
                }
                "resource" => {
                    if v.len() > MAX_RESOURCE_BYTES {
                        return Err(format!(
                            "resource is longer than {MAX_RESOURCE_BYTES} bytes"
                        ));
                    }
                    q.resource = Some(v.to_string());
                }
                "min_age" => {
                    let d = parse_duration(v)?;
                    q.min_age_ms = Some(u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
                }
                "gtid" => q.gtid = Some(gtid_search(v)?),
                "label" => {
                    if q.labels.len() == crate::labels::MAX_LABELS {
                        return Err("too many label filters".into());
                    }
                    match v.split_once('=') {
                        Some((k, _)) if q.labels.iter().any(|(have, _)| have == k.trim()) => {
                            // Two values of one key would match nothing.
                            return Err(format!("label {:?} given twice", clip(k.trim())));
                        }
                        Some((k, val)) if !k.trim().is_empty() => {
                            q.labels.push((k.trim().to_string(), val.to_string()));
                        }
                        _ => return Err(format!("label {:?}: expected key=value", clip(v))),
                    }
                }
                "endpoint" => {
                    if v.len() > 1024 {
                        return Err("endpoint is longer than 1024 bytes".into());
                    }
                    q.endpoint = Some(v.to_string());
                }
                "page_token" => {
                    if uuid::Uuid::parse_str(v).is_err() {
                        return Err("bad page_token".into());
                    }
                    q.page_token = v.to_ascii_lowercase();
                }
                "page_size" => {
                    let n: usize = v
                        .parse()
                        .map_err(|_| format!("page_size {:?} is not a number", clip(v)))?;
                    q.page_size = n.clamp(1, MAX_PAGE);
                }
                "newest_first" => q.newest_first = matches!(v, "1" | "true" | "yes" | "on"),
                _ => return Err(format!("unknown parameter {:?}", clip(&k))),
            }
        }
        Ok(q)
    }

    /// The Admin list request: every filter is applied by the coordinator.
    fn request(&self) -> pb::ListTransactionsRequest {
        pb::ListTransactionsRequest {
            states: self.states.iter().map(|s| *s as i32).collect(),
            page_size: self.page_size as u32,
            page_token: self.page_token.clone(),
            created_before_ms: self
                .min_age_ms
                .map_or(0, |a| now_ms().saturating_sub(a).max(1)),
            labels: self.labels.iter().cloned().collect(),
            resource: self.resource.clone().unwrap_or_default(),
            endpoint: self.endpoint.clone().unwrap_or_default(),
            newest_first: self.newest_first,
            mode: self.mode.map_or(0, |m| m as i32),
            gtid_prefix: self.gtid.clone().unwrap_or_default(),
        }
    }
}

fn clip(s: &str) -> String {
    crate::model::cap_text(s, 64)
}

/// A whole gtid or its start, lower case (hex digits and hyphens where a
/// gtid has them).
fn gtid_search(v: &str) -> Result<String, String> {
    let v = v.to_ascii_lowercase();
    const TEMPLATE: &str = "00000000-0000-0000-0000-000000000000";
    let ok = v.len() <= TEMPLATE.len()
        && v.bytes().zip(TEMPLATE.bytes()).all(|(c, t)| {
            if t == b'-' {
                c == b'-'
            } else {
                c.is_ascii_hexdigit()
            }
        });
    if !ok {
        return Err(format!(
            "gtid {:?}: give a whole gtid or its start (hex digits and hyphens, as in {TEMPLATE})",
            clip(&v)
        ));
    }
    Ok(v)
}

/// `GET /api/transactions`.
#[derive(Serialize)]
struct Page {
    transactions: Vec<TxView>,
    /// Pass as `page_token` for the next page (older ones when
    /// `newest_first`); empty on the last.
    next_page_token: String,
    /// Fewer than a page was found in the records the coordinator reads
    /// per request, and more remain: go on with `next_page_token`.
    partial: bool,
}

async fn list(State(s): State<AppState>, RawQuery(raw): RawQuery) -> Response {
    let q = match ListQuery::parse(raw.as_deref()) {
        Ok(q) => q,
        Err(e) => return bad(e),
    };
    let got = s.admin.list_transactions(Request::new(q.request())).await;
    match got {
        Ok(page) => {
            let page = page.into_inner();
            let partial = !page.next_page_token.is_empty() && page.transactions.len() < q.page_size;
            let page = Page {
                transactions: page.transactions.into_iter().map(TxView::from).collect(),
                next_page_token: page.next_page_token,
                partial,
            };
            json(StatusCode::OK, &page)
        }
        Err(e) => from_status(&e),
    }
}

/// `GET /api/transactions/{gtid}`.
#[derive(Serialize)]
struct Detail {
    #[serde(flatten)]
    tx: TxView,
    timeline: Vec<Moment>,
}

async fn detail(State(s): State<AppState>, Path(gtid): Path<String>) -> Response {
    match s
        .admin
        .get_transaction(Request::new(pb::AdminGetTransactionRequest { gtid }))
        .await
    {
        Ok(t) => {
            let t = t.into_inner();
            let timeline = timeline(&t);
            json(
                StatusCode::OK,
                &Detail {
                    tx: TxView::from(t),
                    timeline,
                },
            )
        }
        Err(e) => from_status(&e),
    }
}

async fn retry(
    State(s): State<AppState>,
    caller: Option<Extension<AdminCaller>>,
    Path(gtid): Path<String>,
) -> Response {
    let by = caller.map_or_else(|| "anonymous".into(), |c| c.0.0);
    let got = s
        .admin
        .retry_transaction(Request::new(pb::RetryTransactionRequest {
            gtid: gtid.clone(),
        }))
        .await;
    match got {
        Ok(t) => {
            tracing::info!(gtid = %clip(&gtid), by = %by, "console: retry");
            json(StatusCode::OK, &TxView::from(t.into_inner()))
        }
        Err(e) => from_status(&e),
    }
}

/// The body of `POST …/abort`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AbortBody {
    #[serde(default)]
    reason: String,
}

async fn abort(
    State(s): State<AppState>,
    caller: Option<Extension<AdminCaller>>,
    Path(gtid): Path<String>,
    body: Bytes,
) -> Response {
    let by = caller.map_or_else(|| "anonymous".into(), |c| c.0.0);
    let reason = if body.iter().all(u8::is_ascii_whitespace) {
        String::new()
    } else {
        match serde_json::from_slice::<AbortBody>(&body) {
            Ok(b) => b.reason,
            Err(e) => return bad(format!("the body must be {{\"reason\": \"…\"}}: {e}")),
        }
    };
    if reason.len() > MAX_REASON_BYTES {
        return bad(format!(
            "the reason is {} bytes; at most {MAX_REASON_BYTES}",
            reason.len()
        ));
    }
    let reason = if reason.trim().is_empty() {
        format!("aborted from the console by {by}")
    } else {
        reason
    };
    let got = s
        .admin
        .abort_transaction(Request::new(pb::AbortTransactionRequest {
            gtid: gtid.clone(),
            reason,
        }))
        .await;
    match got {
        Ok(t) => {
            tracing::info!(gtid = %clip(&gtid), by = %by, "console: abort");
            json(StatusCode::OK, &TxView::from(t.into_inner()))
        }
        Err(e) => from_status(&e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_queries_parse_and_garbage_is_refused() {
        let q = ListQuery::parse(Some(
            "state=stuck,ACTIVE&state=stuck&mode=TCC&resource=r&min_age=5s&gtid=0199AB&page_size=9999&newest_first=1",
        ))
        .expect("parses");
        assert_eq!(q.states, vec![pb::TxState::Stuck, pb::TxState::Active]);
        assert_eq!(q.mode, Some(pb::Mode::Tcc));
        assert_eq!(q.min_age_ms, Some(5000));
        assert_eq!(q.gtid, Some("0199ab".into()));
        assert_eq!(q.page_size, MAX_PAGE);
        assert!(q.newest_first);
        for bad in [
            "state=done",
            "mode=3pc",
            "min_age=5 parsecs",
            "gtid=xyz",
            "gtid=0199ab-",
            "page_token=nope",
            "page_size=-1",
            "colour=blue",
        ] {
            assert!(ListQuery::parse(Some(bad)).is_err(), "{bad}");
        }
        let long = format!("resource={}", "r".repeat(MAX_RESOURCE_BYTES + 1));
        assert!(ListQuery::parse(Some(&long)).is_err());
    }

    #[test]
    fn label_and_endpoint_filters_parse() {
        let q = ListQuery::parse(Some(
            "label=order_id%3DA-1&label=tenant=acme&endpoint=http://h:1",
        ))
        .expect("parses");
        assert_eq!(q.labels.len(), 2);
        assert_eq!(q.endpoint.as_deref(), Some("http://h:1"));
        assert!(ListQuery::parse(Some("label=novalue")).is_err());
        let g = "0199ab12-3456-7000-8000-000000000000";
        assert_eq!(gtid_search(g), Ok(g.to_string()));
    }
}

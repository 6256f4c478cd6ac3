//! The tonic services: [`CoordinatorService`] for business services and
//! [`AdminService`] for operators. They validate and convert at the edge and
//! map every error to a status through `From<CoordError> for Status`.
//! Beside them, `health` (`grpc.health.v1`) and `reflection` (gRPC server
//! reflection), which need no credential.

pub mod abort_detail;
mod admin;
mod auth;
pub(crate) mod convert;
mod coordinator;
mod health;
mod limit;
mod malformed;
mod reflection;

pub use admin::AdminService;
pub use auth::{Auth, AuthLayer, Caller, SharedAccess, required_role};
pub use coordinator::CoordinatorService;
pub use health::health_service;
pub use limit::{ConcurrencyLimit, ConcurrencyLimitLayer};
pub use malformed::{MalformedRequest, MalformedRequestLayer};
pub use reflection::reflection_services;

use tonic::Status;

use crate::model::Gtid;

/// Parses a gtid from the wire; a bad one is INVALID_ARGUMENT.
fn parse_gtid(s: &str) -> Result<Gtid, Status> {
    if s.is_empty() {
        return Err(Status::invalid_argument("gtid is empty"));
    }
    Gtid::parse_str(s).map_err(|e| {
        // Echo only the start of what was sent: a status is a header.
        let shown = crate::model::cap_text(s, 64);
        Status::invalid_argument(format!(
            "gtid {shown:?} ({} bytes) is not a UUID: {e}",
            s.len()
        ))
    })
}

/// The W3C trace context a request carries (an invalid one is ignored),
/// recorded on the request's span as `trace_id` and made its parent when
/// OpenTelemetry is on.
fn request_trace(metadata: &tonic::metadata::MetadataMap) -> Option<crate::model::TraceContext> {
    let trace = crate::model::TraceContext::from_metadata(metadata)?;
    let span = tracing::Span::current();
    span.record(
        "trace_id",
        tracing::field::display(trace.parent.trace_id_hex()),
    );
    trace.adopt(&span);
    Some(trace)
}

/// A gtid the client may leave empty (Begin, Submit).
fn optional_gtid(s: &str) -> Result<Option<Gtid>, Status> {
    if s.is_empty() {
        return Ok(None);
    }
    parse_gtid(s).map(Some)
}

//! The coordinator's error type and its one mapping to gRPC status codes.

use tonic::{Code, Status};

use crate::engine::EngineError;
use crate::log::LogError;
use crate::model::{AbortInfo, Gtid, cap_text};
use crate::service::abort_detail;

/// Longest message put in a gRPC status: status messages travel in HTTP/2
/// headers, and clients (grpcio, grpc-java: 8 KiB) reject large ones.
pub const MAX_STATUS_TEXT: usize = 1024;

/// Why a coordinator request failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CoordError {
    /// The request is malformed; nothing changed.
    #[error("{0}")]
    InvalidArgument(String),
    /// No transaction with this gtid.
    #[error("no transaction {0}")]
    NotFound(Gtid),
    /// A client-chosen gtid names a different transaction; nothing changed.
    #[error("{0}")]
    AlreadyExists(String),
    /// The request names something the coordinator's policy forbids (a
    /// participant endpoint outside the allowlist); nothing changed.
    #[error("{0}")]
    PermissionDenied(String),
    /// The request does not fit the transaction's state; nothing changed.
    #[error(transparent)]
    WrongState(#[from] EngineError),
    /// The transaction aborted (vote no, failure, deadline).
    #[error("transaction {gtid} aborted: {reason}")]
    Aborted {
        /// Which transaction.
        gtid: Gtid,
        /// Why, for people.
        reason: String,
        /// Why, as fields (sent as a status detail); `None` for a record
        /// written by a version that did not keep it.
        abort: Option<AbortInfo>,
    },
    /// The coordinator stopped deciding after a log failure, or is stopping.
    #[error("coordinator unavailable: {0}")]
    Unavailable(String),
    /// Another coordinator of the cluster runs this transaction; the
    /// client should send the request there (nothing changed here).
    #[error(
        "transaction {gtid} is run by coordinator {owner} at {address}; send this request there"
    )]
    Moved {
        /// Which transaction.
        gtid: Gtid,
        /// The owner's instance name.
        owner: String,
        /// Where it serves.
        address: String,
    },
    /// The outcome of this gtid is no longer known: it has no record nor
    /// tombstone, and retention may have removed one (every branch had
    /// acknowledged its phase 2), or a decision tombstone that may have
    /// been its expired (`--decision-retention`). Never presumed ABORT: it
    /// may have committed.
    #[error(
        "the outcome of transaction {0} is no longer known: retention removed its record \
         after every branch acknowledged its phase 2, or its decision expired \
         (--decision-retention); it may have committed. Settle the branch by hand from the \
         other branches' state"
    )]
    Forgotten(Gtid),
    /// The log failed on a read; see [`LogError`].
    #[error(transparent)]
    Log(#[from] LogError),
}

impl From<CoordError> for Status {
    fn from(e: CoordError) -> Status {
        let code = match &e {
            CoordError::InvalidArgument(_) => Code::InvalidArgument,
            CoordError::NotFound(_) => Code::NotFound,
            CoordError::AlreadyExists(_) => Code::AlreadyExists,
            CoordError::PermissionDenied(_) => Code::PermissionDenied,
            CoordError::WrongState(_) | CoordError::Forgotten(_) => Code::FailedPrecondition,
            CoordError::Aborted { .. } => Code::Aborted,
            CoordError::Unavailable(_) | CoordError::Moved { .. } => Code::Unavailable,
            CoordError::Log(LogError::Corrupt { .. }) => Code::DataLoss,
            CoordError::Log(_) => Code::Unavailable,
        };
        let message = cap_text(&e.to_string(), MAX_STATUS_TEXT);
        if let CoordError::Moved {
            gtid,
            owner,
            address,
        } = &e
        {
            return tandem_proto::rpc::moved(
                message,
                &gtid.to_string(),
                &cap_text(owner, 256),
                &cap_text(address, 512),
            );
        }
        if let CoordError::Aborted {
            gtid,
            abort: Some(abort),
            ..
        } = &e
        {
            let details = abort_detail::status_details(code as i32, &message, *gtid, abort);
            return Status::with_details(code, message, details.into());
        }
        Status::new(code, message)
    }
}

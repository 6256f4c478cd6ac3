//! Typed errors of [`crate::TransactionClient`].

use tonic::{Code, Status};

use crate::Gtid;

/// Why a transaction call failed. Match on it to decide what to do next:
/// `Aborted` is a business outcome (show the reason), `Unavailable` and
/// `TimedOut` may succeed later, `Invalid` is a bug in the caller.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The transaction aborted: a participant voted no or failed, its
    /// deadline passed, or it was rolled back. Every branch is (or is being)
    /// rolled back.
    #[error("transaction {gtid} aborted: {reason}", gtid = gtid.map(|g| g.to_string()).unwrap_or_default())]
    Aborted {
        /// The transaction, when the coordinator named it.
        gtid: Option<Gtid>,
        /// Why.
        reason: String,
    },
    /// No answer within the deadline; the outcome is unknown to the caller.
    /// A `begin` / `submit` that picked its own gtid reports
    /// [`Error::OutcomeUnknown`] instead, naming it.
    #[error("timed out: {0}")]
    TimedOut(String),
    /// `begin` / `submit` got no answer (deadline, lost connection, the
    /// coordinator restarting or stopping): the transaction `gtid` may or
    /// may not have started. Repeat the call with the same gtid
    /// ([`TransactionClient::submit_as`](crate::TransactionClient::submit_as)
    /// / [`begin_as`](crate::TransactionClient::begin_as)): it never starts
    /// a second transaction, and returns the first one's outcome.
    #[error("outcome of transaction {gtid} unknown, repeat with the same gtid: {cause}")]
    OutcomeUnknown {
        /// The gtid the call used.
        gtid: Gtid,
        /// Why no answer came.
        cause: String,
    },
    /// The coordinator could not be reached or is not deciding (stopping, or
    /// halted after a storage failure). Retrying later may succeed.
    #[error("coordinator unavailable: {0}")]
    Unavailable(String),
    /// The request was refused and changed nothing: bad argument, unknown
    /// gtid, or wrong state (e.g. commit after rollback).
    #[error("invalid request ({code:?}): {message}")]
    Invalid {
        /// INVALID_ARGUMENT, NOT_FOUND or FAILED_PRECONDITION.
        code: Code,
        /// The coordinator's explanation.
        message: String,
    },
    /// Any other gRPC failure.
    #[error("rpc failed: {0}")]
    Rpc(Status),
}

impl From<Status> for Error {
    fn from(s: Status) -> Self {
        match s.code() {
            Code::Aborted => Error::Aborted {
                gtid: None,
                reason: s.message().to_string(),
            },
            Code::DeadlineExceeded => Error::TimedOut(s.message().to_string()),
            Code::Unavailable => Error::Unavailable(s.message().to_string()),
            Code::InvalidArgument
            | Code::AlreadyExists
            | Code::NotFound
            | Code::FailedPrecondition
            | Code::OutOfRange => Error::Invalid {
                code: s.code(),
                message: s.message().to_string(),
            },
            _ => Error::Rpc(s),
        }
    }
}

impl Error {
    /// A failure of a start call that may have started `gtid` anyway (no
    /// answer) becomes [`Error::OutcomeUnknown`]; answers pass through.
    pub(crate) fn unknown_outcome(self, gtid: Gtid) -> Error {
        match self {
            Error::TimedOut(cause) | Error::Unavailable(cause) => {
                Error::OutcomeUnknown { gtid, cause }
            }
            // A refusal before anything ran (RESOURCE_EXHAUSTED, …) stays
            // as it is; a call cut off midway may have started it.
            Error::Rpc(s)
                if matches!(s.code(), Code::Cancelled | Code::Unknown | Code::Internal) =>
            {
                Error::OutcomeUnknown {
                    gtid,
                    cause: s.to_string(),
                }
            }
            e => e,
        }
    }
}

impl From<tonic::transport::Error> for Error {
    fn from(e: tonic::transport::Error) -> Self {
        Error::Unavailable(e.to_string())
    }
}

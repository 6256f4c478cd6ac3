//! Typed errors of [`crate::TransactionClient`].

use tonic::{Code, Status, TimeoutExpired};

use crate::Gtid;
use tandem_proto::v1::{AbortCause, AbortInfo};

/// Why a transaction call failed. Match on it to decide what to do next:
/// `Aborted` is a business outcome (show the reason), `Unavailable` and
/// `TimedOut` may succeed later, `Invalid` is a bug in the caller.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The transaction aborted: a participant voted no or failed, its
    /// deadline passed, or it was rolled back. Every branch is (or is being)
    /// rolled back.
    #[error("transaction{} aborted: {reason}", gtid.map(|g| format!(" {g}")).unwrap_or_default())]
    Aborted {
        /// The transaction, when the coordinator named it.
        gtid: Option<Gtid>,
        /// Why, for people.
        reason: String,
        /// Why, as fields: the cause (`VOTED_NO`, `DEADLINE`, …), the
        /// branch and resource that caused it, the participant's own
        /// reason. Branch on this, not on `reason`. `None` from a
        /// coordinator too old to send it.
        abort: Option<AbortInfo>,
    },
    /// No answer within the deadline; the outcome is unknown to the caller.
    /// `gtid` names the transaction when the call was about a known one
    /// (`submit_as` / `begin_as`, `enlist`, `commit`, `rollback`): ask the
    /// coordinator about it ([`TransactionClient::get`](crate::TransactionClient::get),
    /// `tandem tx show <gtid>`) or repeat the call. A `begin` / `submit`
    /// that picked its own gtid reports [`Error::OutcomeUnknown`] instead.
    #[error("timed out: {cause}{}", ask(gtid))]
    TimedOut {
        /// The transaction the call was about, when there is one.
        gtid: Option<Gtid>,
        /// The transport's or coordinator's explanation.
        cause: String,
    },
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
    /// halted after a storage failure). Retrying later may succeed. `gtid`
    /// as for [`Error::TimedOut`]: a call about a known transaction may
    /// have reached the coordinator before the connection failed.
    #[error("coordinator unavailable: {cause}{}", ask(gtid))]
    Unavailable {
        /// The transaction the call was about, when there is one.
        gtid: Option<Gtid>,
        /// The transport's or coordinator's explanation.
        cause: String,
    },
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
                abort: tandem_proto::rpc::abort_info(&s),
            },
            // A client-side deadline (`Endpoint::timeout`) ends the call
            // with CANCELLED "Timeout expired" in tonic.
            Code::Cancelled if s.message() == TimeoutExpired(()).to_string() => Error::TimedOut {
                gtid: None,
                cause: s.message().to_string(),
            },
            Code::DeadlineExceeded => Error::TimedOut {
                gtid: None,
                cause: s.message().to_string(),
            },
            Code::Unavailable => Error::Unavailable {
                gtid: None,
                cause: s.message().to_string(),
            },
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
            Error::TimedOut { cause, .. } | Error::Unavailable { cause, .. } => {
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

impl Error {
    /// What made an [`Error::Aborted`] abort (`None` for other errors, or
    /// from a coordinator too old to say).
    pub fn abort_cause(&self) -> Option<AbortCause> {
        match self {
            Error::Aborted { abort: Some(a), .. } => AbortCause::try_from(a.cause).ok(),
            _ => None,
        }
    }

    /// Names `gtid` in the errors that leave its outcome unknown to the
    /// caller (`TimedOut`, `Unavailable`) and in `Aborted`.
    pub(crate) fn about(self, gtid: Gtid) -> Error {
        match self {
            Error::Aborted { reason, abort, .. } => Error::Aborted {
                gtid: Some(gtid),
                reason,
                abort,
            },
            Error::TimedOut { cause, .. } => Error::TimedOut {
                gtid: Some(gtid),
                cause,
            },
            Error::Unavailable { cause, .. } => Error::Unavailable {
                gtid: Some(gtid),
                cause,
            },
            e => e,
        }
    }
}

/// The advice of an ambiguous error about `gtid`.
fn ask(gtid: &Option<Gtid>) -> String {
    match gtid {
        Some(g) => format!(
            "; the outcome is unknown here: ask the coordinator with gtid {g} \
             (TransactionClient::get, or `tandem tx show {g}`)"
        ),
        None => String::new(),
    }
}

impl From<tonic::transport::Error> for Error {
    fn from(e: tonic::transport::Error) -> Self {
        Error::Unavailable {
            gtid: None,
            cause: e.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The ambiguous errors say which transaction to ask about, when known.
    #[test]
    fn ambiguous_errors_name_their_gtid() {
        let gtid = Gtid::now_v7();
        let timed_out = Error::from(Status::deadline_exceeded("slow")).about(gtid);
        assert!(
            timed_out
                .to_string()
                .contains(&format!("ask the coordinator with gtid {gtid}")),
            "{timed_out}"
        );
        let unavailable = Error::from(Status::unavailable("down")).about(gtid);
        assert!(matches!(unavailable, Error::Unavailable { gtid: Some(g), .. } if g == gtid));
        let anonymous = Error::from(Status::unavailable("down"));
        assert_eq!(anonymous.to_string(), "coordinator unavailable: down");
    }

    // tonic reports a client-side deadline (`Endpoint::timeout`) as
    // CANCELLED "Timeout expired": that is a timeout, not an RPC failure.
    #[test]
    fn a_client_side_deadline_is_a_timeout() {
        let e = Error::from(Status::cancelled(TimeoutExpired(()).to_string()));
        assert!(matches!(e, Error::TimedOut { gtid: None, .. }), "{e:?}");
        let other = Error::from(Status::cancelled("the caller went away"));
        assert!(matches!(other, Error::Rpc(_)), "{other:?}");
    }

    #[test]
    fn an_abort_without_gtid_reads_well() {
        let e = Error::from(Status::aborted("no funds"));
        assert_eq!(e.to_string(), "transaction aborted: no funds");
    }
}

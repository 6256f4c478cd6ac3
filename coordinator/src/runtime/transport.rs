//! How the runtime reaches participants: the [`Transport`] trait. The
//! production transport is the pool of gRPC channels
//! (`participants::ParticipantPool`); the seeded simulation plugs in
//! participants that live in the same process and misbehave on purpose.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tandem_proto::v1::{BranchRequest, VoteResponse};

use super::participants::ParticipantPool;
use crate::model::{Mode, TraceContext};

/// A boxed call future.
pub type CallFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, CallError>> + Send + 'a>>;

/// A participant call that did not succeed: what was seen, and what it
/// proves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallError {
    /// What was seen (a status code and message, a transport error).
    pub message: String,
    /// What it proves about the participant.
    pub kind: Failure,
}

/// What a failed call proves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// Nothing: the participant may or may not have run the call. Phase 2
    /// retries it.
    Unknown,
    /// The request never left the coordinator (its connection was refused,
    /// or the policy stopped it before dialling): the participant cannot
    /// have run it.
    NotDelivered,
    /// The participant does not implement the call (`UNIMPLEMENTED`): a
    /// participant must not answer so after doing any work
    /// (docs/participant-protocol.md §5), so it did not run, and retrying
    /// cannot help.
    Unimplemented,
    /// The participant answered that this call will never succeed
    /// (`FAILED_PRECONDITION` with the `PERMANENT` ErrorInfo detail): it
    /// may have run part of it, and retrying cannot help.
    Permanent,
}

impl CallError {
    /// A failure of the given kind.
    pub fn new(kind: Failure, message: impl Into<String>) -> Self {
        CallError {
            message: message.into(),
            kind,
        }
    }
}

impl From<String> for CallError {
    fn from(message: String) -> Self {
        CallError::new(Failure::Unknown, message)
    }
}

impl From<&str> for CallError {
    fn from(message: &str) -> Self {
        CallError::new(Failure::Unknown, message)
    }
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Participant calls. `Err` says what failed and what that proves (see
/// [`Failure`]). The runtime also bounds every call by `timeout` itself,
/// so an implementation may ignore it. `trace`, when the transaction has
/// one, is the W3C trace context to send with the call (the transaction's
/// trace, the coordinator's call span as the parent).
pub trait Transport: Send + Sync + 'static {
    /// Prepare (2PC) or try (TCC).
    fn phase_one(
        &self,
        endpoint: &str,
        mode: Mode,
        req: BranchRequest,
        trace: Option<TraceContext>,
        timeout: Duration,
    ) -> CallFuture<'_, VoteResponse>;

    /// Commit / rollback (2PC) or confirm / cancel (TCC).
    fn phase_two(
        &self,
        endpoint: &str,
        mode: Mode,
        commit: bool,
        req: BranchRequest,
        trace: Option<TraceContext>,
        timeout: Duration,
    ) -> CallFuture<'_, ()>;
}

impl Transport for ParticipantPool {
    fn phase_one(
        &self,
        endpoint: &str,
        mode: Mode,
        req: BranchRequest,
        trace: Option<TraceContext>,
        timeout: Duration,
    ) -> CallFuture<'_, VoteResponse> {
        let endpoint = endpoint.to_string();
        Box::pin(async move {
            ParticipantPool::phase_one(self, &endpoint, mode, req, trace, timeout).await
        })
    }

    fn phase_two(
        &self,
        endpoint: &str,
        mode: Mode,
        commit: bool,
        req: BranchRequest,
        trace: Option<TraceContext>,
        timeout: Duration,
    ) -> CallFuture<'_, ()> {
        let endpoint = endpoint.to_string();
        Box::pin(async move {
            ParticipantPool::phase_two(self, &endpoint, mode, commit, req, trace, timeout).await
        })
    }
}

/// Awaits `call` for at most `timeout`; a call still out then is a failure
/// ("no reply within …"), whatever the transport does.
pub(super) async fn bounded<T>(
    timeout: Duration,
    call: impl Future<Output = Result<T, CallError>>,
) -> Result<T, CallError> {
    match tokio::time::timeout(timeout, call).await {
        Ok(result) => result,
        Err(_) => Err(format!("no reply within {} ms", timeout.as_millis()).into()),
    }
}

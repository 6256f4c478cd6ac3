//! How the runtime reaches participants: the [`Transport`] trait. The
//! production transport is the pool of gRPC channels
//! (`participants::ParticipantPool`); the seeded simulation plugs in
//! participants that live in the same process and misbehave on purpose.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tandem_proto::v1::{BranchRequest, VoteResponse};

use super::participants::ParticipantPool;
use crate::model::Mode;

/// A boxed call future.
pub type CallFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, String>> + Send + 'a>>;

/// Participant calls. `Err` carries a description of the failure: the
/// participant may or may not have run the call. The runtime also bounds
/// every call by `timeout` itself, so an implementation may ignore it.
pub trait Transport: Send + Sync + 'static {
    /// Prepare (2PC) or try (TCC).
    fn phase_one(
        &self,
        endpoint: &str,
        mode: Mode,
        req: BranchRequest,
        timeout: Duration,
    ) -> CallFuture<'_, VoteResponse>;

    /// Commit / rollback (2PC) or confirm / cancel (TCC).
    fn phase_two(
        &self,
        endpoint: &str,
        mode: Mode,
        commit: bool,
        req: BranchRequest,
        timeout: Duration,
    ) -> CallFuture<'_, ()>;
}

impl Transport for ParticipantPool {
    fn phase_one(
        &self,
        endpoint: &str,
        mode: Mode,
        req: BranchRequest,
        timeout: Duration,
    ) -> CallFuture<'_, VoteResponse> {
        let endpoint = endpoint.to_string();
        Box::pin(
            async move { ParticipantPool::phase_one(self, &endpoint, mode, req, timeout).await },
        )
    }

    fn phase_two(
        &self,
        endpoint: &str,
        mode: Mode,
        commit: bool,
        req: BranchRequest,
        timeout: Duration,
    ) -> CallFuture<'_, ()> {
        let endpoint = endpoint.to_string();
        Box::pin(async move {
            ParticipantPool::phase_two(self, &endpoint, mode, commit, req, timeout).await
        })
    }
}

/// Awaits `call` for at most `timeout`; a call still out then is a failure
/// ("no reply within …"), whatever the transport does.
pub(super) async fn bounded<T>(
    timeout: Duration,
    call: impl Future<Output = Result<T, String>>,
) -> Result<T, String> {
    match tokio::time::timeout(timeout, call).await {
        Ok(result) => result,
        Err(_) => Err(format!("no reply within {} ms", timeout.as_millis())),
    }
}

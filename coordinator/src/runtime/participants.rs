//! Calls to participants: one lazily connected, reused gRPC channel per
//! endpoint, and every call bounded by a deadline.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tandem_proto::v1::participant_client::ParticipantClient;
use tandem_proto::v1::{BranchRequest, VoteResponse};
use tonic::transport::{Channel, Endpoint};

use crate::model::Mode;

/// Cache of participant clients, keyed by endpoint string.
#[derive(Default)]
pub(crate) struct ParticipantPool {
    clients: Mutex<HashMap<String, ParticipantClient<Channel>>>,
}

/// Checks that `endpoint` is something the pool can dial.
pub(crate) fn validate_endpoint(endpoint: &str) -> Result<(), String> {
    let uri: tonic::transport::Uri = endpoint
        .parse()
        .map_err(|e| format!("endpoint {endpoint:?} is not a URI: {e}"))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => {
            return Err(format!(
                "endpoint {endpoint:?} must start with http:// or https://"
            ));
        }
    }
    if uri
        .authority()
        .is_none_or(|a| a.port_u16().is_none() && a.host().is_empty())
    {
        return Err(format!("endpoint {endpoint:?} has no host"));
    }
    Ok(())
}

/// Awaits `call` for at most `timeout`. The participant sees the same
/// deadline in its `grpc-timeout` header, and tonic's server ends an expired
/// call with `Cancelled: Timeout expired`, which can arrive before the local
/// timer fires: either way the caller learns "no reply within".
async fn bounded<T>(
    timeout: Duration,
    call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, String> {
    let no_reply = || format!("no reply within {} ms", timeout.as_millis());
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(resp)) => Ok(resp.into_inner()),
        Ok(Err(status)) if is_deadline(&status) => Err(no_reply()),
        Ok(Err(status)) => Err(format!("{:?}: {}", status.code(), status.message())),
        Err(_) => Err(no_reply()),
    }
}

fn is_deadline(status: &tonic::Status) -> bool {
    match status.code() {
        tonic::Code::DeadlineExceeded => true,
        tonic::Code::Cancelled => status.message() == "Timeout expired",
        _ => false,
    }
}

impl ParticipantPool {
    /// Channels held now.
    pub(crate) fn len(&self) -> usize {
        self.clients.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    fn client(&self, endpoint: &str) -> Result<ParticipantClient<Channel>, String> {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(endpoint) {
            return Ok(c.clone());
        }
        let channel = Endpoint::from_shared(endpoint.to_string())
            .map_err(|e| format!("bad endpoint {endpoint:?}: {e}"))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .connect_lazy();
        let client = ParticipantClient::new(channel)
            .max_decoding_message_size(64 * 1024 * 1024)
            .max_encoding_message_size(64 * 1024 * 1024);
        clients.insert(endpoint.to_string(), client.clone());
        Ok(client)
    }

    /// Prepare (2PC) or try (TCC). `Err` carries a description of the
    /// failure: the participant may or may not have run the call.
    pub(crate) async fn phase_one(
        &self,
        endpoint: &str,
        mode: Mode,
        req: BranchRequest,
        timeout: Duration,
    ) -> Result<VoteResponse, String> {
        let mut client = self.client(endpoint)?;
        let mut request = tonic::Request::new(req);
        request.set_timeout(timeout);
        let call = async {
            match mode {
                Mode::TwoPhase => client.prepare(request).await,
                Mode::Tcc => client.r#try(request).await,
            }
        };
        bounded(timeout, call).await
    }

    /// Commit / rollback (2PC) or confirm / cancel (TCC).
    pub(crate) async fn phase_two(
        &self,
        endpoint: &str,
        mode: Mode,
        commit: bool,
        req: BranchRequest,
        timeout: Duration,
    ) -> Result<(), String> {
        let mut client = self.client(endpoint)?;
        let mut request = tonic::Request::new(req);
        request.set_timeout(timeout);
        let call = async {
            match (mode, commit) {
                (Mode::TwoPhase, true) => client.commit(request).await,
                (Mode::TwoPhase, false) => client.rollback(request).await,
                (Mode::Tcc, true) => client.confirm(request).await,
                (Mode::Tcc, false) => client.cancel(request).await,
            }
        };
        bounded(timeout, call).await.map(drop)
    }
}

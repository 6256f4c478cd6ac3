//! Calls to participants: one lazily connected, reused gRPC channel per
//! endpoint, and every call bounded by a deadline.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_common::security::BearerToken;
use tandem_proto::v1::participant_client::ParticipantClient;
use tandem_proto::v1::{BranchRequest, VoteResponse};
use tonic::codegen::InterceptedService;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::security::ParticipantAccess;

use super::transport::{CallError, Failure};
use crate::model::{MAX_STORED_TEXT, Mode, TraceContext, cap_text};
use tandem_proto::rpc;

/// Most channels held at once; past it the least recently used idle one
/// is closed, and with none idle a call fails (phase 2 is retried).
const MAX_CHANNELS: usize = 1024;
/// A channel unused this long is closed when the pool next grows.
const IDLE_AFTER: Duration = Duration::from_secs(300);
/// Largest reply accepted from a participant: a reply payload, at most the
/// log's largest payload, plus room for the envelope.
const MAX_REPLY_BYTES: usize = crate::log::SledLog::MAX_PAYLOAD_BYTES + 64 * 1024;

/// Cache of participant clients, one per participant address (scheme,
/// host, port: paths and letter case do not make new channels), bounded in
/// number, idle ones closed.
#[derive(Default)]
pub(crate) struct ParticipantPool {
    clients: Mutex<HashMap<String, Slot>>,
    access: Mutex<Outgoing>,
}

/// TLS and token of new channels.
#[derive(Default)]
struct Outgoing {
    tls: Option<ClientTlsConfig>,
    token: BearerToken,
}

type Client = ParticipantClient<InterceptedService<Channel, BearerToken>>;

struct Slot {
    client: Client,
    last_used: Instant,
    /// Cloned by every call in flight: a slot whose count is 1 is idle.
    in_use: Arc<()>,
}

/// `scheme://host:port` of an endpoint, lower-cased, with the scheme's
/// default port when none is given: what identifies a participant.
pub(crate) fn channel_key(endpoint: &str) -> Result<String, String> {
    let (scheme, host, port) = endpoint_parts(endpoint)?;
    Ok(format!("{scheme}://{host}:{port}"))
}

/// Scheme, host and port of an endpoint, lower case, the port explicit.
pub(crate) fn endpoint_parts(endpoint: &str) -> Result<(String, String, u16), String> {
    let uri: tonic::transport::Uri = endpoint
        .parse()
        .map_err(|e| format!("endpoint is not a URI: {e}"))?;
    let scheme = uri.scheme_str().unwrap_or("http").to_ascii_lowercase();
    let authority = uri.authority().ok_or("endpoint has no host")?;
    let port = authority
        .port_u16()
        .unwrap_or(if scheme == "https" { 443 } else { 80 });
    Ok((scheme, authority.host().to_ascii_lowercase(), port))
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
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(format!(
            "endpoint {endpoint:?} has a path or query; a participant endpoint is \
             scheme://host[:port] (gRPC adds the method's path)"
        ));
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
) -> Result<T, CallError> {
    let no_reply = || CallError::from(format!("no reply within {} ms", timeout.as_millis()));
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(resp)) => Ok(resp.into_inner()),
        Ok(Err(status)) if is_deadline(&status) => Err(no_reply()),
        Ok(Err(status)) => Err(CallError::new(
            failure_of(&status),
            cap_text(
                &format!("{:?}: {}", status.code(), status.message()),
                MAX_STORED_TEXT,
            ),
        )),
        Err(_) => Err(no_reply()),
    }
}

/// A participant call's request: its deadline, and the trace context when
/// there is one.
fn call_request(
    req: BranchRequest,
    trace: Option<&TraceContext>,
    timeout: Duration,
) -> tonic::Request<BranchRequest> {
    let mut request = tonic::Request::new(req);
    request.set_timeout(timeout);
    if let Some(t) = trace {
        t.inject(request.metadata_mut());
    }
    request
}

/// What a call's error status proves (see [`Failure`]).
fn failure_of(status: &tonic::Status) -> Failure {
    match status.code() {
        tonic::Code::Unimplemented => Failure::Unimplemented,
        tonic::Code::FailedPrecondition if rpc::is_permanent(status) => Failure::Permanent,
        tonic::Code::Unavailable if connection_refused(status) => Failure::NotDelivered,
        _ => Failure::Unknown,
    }
}

/// The connection to the participant was refused: nothing was sent on it.
fn connection_refused(status: &tonic::Status) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::ConnectionRefused
        {
            return true;
        }
        source = e.source();
    }
    false
}

fn is_deadline(status: &tonic::Status) -> bool {
    match status.code() {
        tonic::Code::DeadlineExceeded => true,
        tonic::Code::Cancelled => status.message() == "Timeout expired",
        _ => false,
    }
}

impl ParticipantPool {
    /// A pool calling participants as `access` says.
    ///
    /// # Errors
    ///
    /// Its TLS files cannot be used.
    pub(crate) fn new(access: &ParticipantAccess) -> Result<ParticipantPool, String> {
        let pool = ParticipantPool::default();
        pool.set_access(access)?;
        Ok(pool)
    }

    /// Uses `access` for channels made from now on (calls in flight keep
    /// theirs) and closes the channels held.
    ///
    /// # Errors
    ///
    /// Its TLS files cannot be used; nothing changes then.
    pub(crate) fn set_access(&self, access: &ParticipantAccess) -> Result<(), String> {
        let tls = access
            .tls
            .as_ref()
            .map(|t| t.config())
            .transpose()
            .map_err(|e| e.to_string())?;
        *self.access.lock().unwrap_or_else(|p| p.into_inner()) = Outgoing {
            tls,
            token: access.token.clone(),
        };
        self.clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        Ok(())
    }

    /// Channels held now.
    pub(crate) fn len(&self) -> usize {
        self.clients.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// The client for `endpoint`'s participant and a guard marking it in
    /// use until dropped.
    fn client(&self, endpoint: &str) -> Result<(Client, Arc<()>), String> {
        self.client_within(endpoint, MAX_CHANNELS, IDLE_AFTER)
    }

    fn client_within(
        &self,
        endpoint: &str,
        max: usize,
        idle_after: Duration,
    ) -> Result<(Client, Arc<()>), String> {
        let key = channel_key(endpoint)?;
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if let Some(slot) = clients.get_mut(&key) {
            slot.last_used = now;
            return Ok((slot.client.clone(), slot.in_use.clone()));
        }
        // Growing: close what is idle, then make room if still full.
        let idle = |s: &Slot| Arc::strong_count(&s.in_use) == 1;
        clients.retain(|_, s| !(idle(s) && now.duration_since(s.last_used) >= idle_after));
        if clients.len() >= max {
            let lru = clients
                .iter()
                .filter(|(_, s)| idle(s))
                .min_by_key(|(_, s)| s.last_used)
                .map(|(k, _)| k.clone());
            match lru {
                Some(k) => drop(clients.remove(&k)),
                None => {
                    return Err(format!(
                        "{max} participant channels are busy; no room for another participant"
                    ));
                }
            }
        }
        let (channel, token) = self.channel(&key)?;
        let client = ParticipantClient::with_interceptor(channel, token)
            .max_decoding_message_size(MAX_REPLY_BYTES)
            .max_encoding_message_size(MAX_REPLY_BYTES);
        let in_use = Arc::new(());
        clients.insert(
            key,
            Slot {
                client: client.clone(),
                last_used: now,
                in_use: in_use.clone(),
            },
        );
        Ok((client, in_use))
    }

    /// A lazily connected channel to `key` (`scheme://host:port`): TLS for
    /// https, never cleartext; and the token to send.
    fn channel(&self, key: &str) -> Result<(Channel, BearerToken), String> {
        let access = self.access.lock().unwrap_or_else(|p| p.into_inner());
        let mut endpoint = Endpoint::from_shared(key.to_string())
            .map_err(|e| format!("bad endpoint: {e}"))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true);
        if key.starts_with("https://") {
            let tls = access
                .tls
                .clone()
                .unwrap_or_else(|| ClientTlsConfig::new().with_native_roots());
            endpoint = endpoint.tls_config(tls).map_err(|e| format!("TLS: {e}"))?;
        }
        Ok((endpoint.connect_lazy(), access.token.clone()))
    }

    /// Prepare (2PC) or try (TCC). `Err` carries a description of the
    /// failure: the participant may or may not have run the call.
    pub(crate) async fn phase_one(
        &self,
        endpoint: &str,
        mode: Mode,
        req: BranchRequest,
        trace: Option<TraceContext>,
        timeout: Duration,
    ) -> Result<VoteResponse, CallError> {
        // No channel, no call: the request never left.
        let (mut client, _in_use) = self
            .client(endpoint)
            .map_err(|e| CallError::new(Failure::NotDelivered, e))?;
        let request = call_request(req, trace.as_ref(), timeout);
        let call = async {
            match mode {
                Mode::TwoPhase => client.prepare(request).await,
                Mode::Tcc | Mode::Saga => client.r#try(request).await,
                // A message's phase 1 is its back-check (branch 1 only).
                Mode::Msg => client.check(request).await,
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
        trace: Option<TraceContext>,
        timeout: Duration,
    ) -> Result<(), CallError> {
        let (mut client, _in_use) = self
            .client(endpoint)
            .map_err(|e| CallError::new(Failure::NotDelivered, e))?;
        let request = call_request(req, trace.as_ref(), timeout);
        let call = async {
            match (mode, commit) {
                (Mode::TwoPhase, true) => client.commit(request).await,
                (Mode::TwoPhase, false) => client.rollback(request).await,
                (Mode::Tcc | Mode::Saga, true) => client.confirm(request).await,
                (Mode::Tcc | Mode::Saga, false) => client.cancel(request).await,
                (Mode::Msg, true) => client.deliver(request).await,
                // A dropped message's branches are settled without a call.
                (Mode::Msg, false) => Ok(tonic::Response::new(Default::default())),
            }
        };
        bounded(timeout, call).await.map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Rule: one channel per participant address, whatever the path or the
    // letter case; the default port counts as given.
    #[tokio::test]
    async fn endpoints_share_a_channel_per_address() {
        let pool = ParticipantPool::default();
        for e in [
            "http://127.0.0.1:9001/u1",
            "http://127.0.0.1:9001/u2",
            "HTTP://127.0.0.1:9001",
            "http://LOCALHOST/a",
            "http://localhost:80/b",
        ] {
            let _ = pool.client(e).expect("client");
        }
        assert_eq!(pool.len(), 2);
    }

    // Rule: the pool never holds more than its cap: an idle channel makes
    // room; with every channel busy the call fails instead.
    #[tokio::test]
    async fn the_pool_is_capped_and_evicts_idle_channels() {
        let pool = ParticipantPool::default();
        let long = Duration::from_secs(3600);
        let (_, busy) = pool.client_within("http://a:1", 2, long).expect("a");
        let (_, idle) = pool.client_within("http://b:1", 2, long).expect("b");
        drop(idle);
        let (_, busy_c) = pool
            .client_within("http://c:1", 2, long)
            .expect("c evicts b");
        assert_eq!(pool.len(), 2);
        let err = pool.client_within("http://d:1", 2, long).unwrap_err();
        assert!(err.contains("busy"), "{err}");
        drop((busy, busy_c));
        // Idle past the idle time: closed as soon as the pool grows.
        std::thread::sleep(Duration::from_millis(5));
        let _ = pool
            .client_within("http://e:1", 10, Duration::from_millis(1))
            .expect("e");
        assert_eq!(pool.len(), 1);
    }
}

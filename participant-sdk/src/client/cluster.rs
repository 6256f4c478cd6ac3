//! Several coordinators behind one [`TransactionClient`](super::TransactionClient):
//! which one to call, failing over to the next when one cannot be
//! reached, and following a coordinator's redirect (`MOVED`, with the
//! address of the coordinator that runs the transaction).
//!
//! A request is sent again elsewhere only when that cannot run it twice:
//! either it never reached a coordinator (the connection was refused), or
//! it is idempotent by the contract — `Begin` and `Submit` with the
//! client's gtid, `Commit`, `Rollback`, `PrepareMessage`,
//! `SubmitMessage` and the reads. An `Enlist` whose
//! answer was lost is not repeated (it would add a second branch).

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tandem_proto::v1::coordinator_client::CoordinatorClient;
use tonic::codegen::InterceptedService;
use tonic::transport::Channel;

use super::ClientOptions;
use crate::security::BearerToken;

pub(super) type Rpc = CoordinatorClient<InterceptedService<Channel, BearerToken>>;

/// Redirects followed for one request (an owner that moved again).
const MAX_REDIRECTS: usize = 3;
/// Addresses learnt from redirects kept connected; beyond that the table
/// starts over (coordinators are few; this only bounds a hostile answer).
const MAX_LEARNT: usize = 64;

/// Whether a request may be sent again to another coordinator after an
/// answer that did not settle it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Repeat {
    /// Idempotent: any `UNAVAILABLE` moves on to the next coordinator.
    Safe,
    /// Only when it never reached a coordinator.
    Undelivered,
}

#[derive(Debug)]
pub(super) struct Cluster {
    /// The configured coordinators, in order.
    endpoints: Vec<(String, Rpc)>,
    /// The one to call first.
    current: AtomicUsize,
    /// Owners learnt from redirects, by address.
    learnt: Mutex<HashMap<String, Rpc>>,
    options: ClientOptions,
}

pub(super) fn rpc(channel: Channel, token: BearerToken) -> Rpc {
    CoordinatorClient::with_interceptor(channel, token).max_decoding_message_size(64 * 1024 * 1024)
}

impl Cluster {
    pub(super) fn new(endpoints: Vec<(String, Rpc)>, options: ClientOptions) -> Self {
        Cluster {
            endpoints,
            current: AtomicUsize::new(0),
            learnt: Mutex::new(HashMap::new()),
            options,
        }
    }

    /// The configured addresses.
    pub(super) fn addresses(&self) -> Vec<String> {
        self.endpoints.iter().map(|(a, _)| a.clone()).collect()
    }

    /// A client for `address`: a configured one, or one learnt from a
    /// redirect (connected lazily, with this client's TLS and token; an
    /// `http://` address is refused when TLS is configured).
    fn to(&self, address: &str) -> Result<Rpc, String> {
        if let Some((_, rpc)) = self.endpoints.iter().find(|(a, _)| a == address) {
            return Ok(rpc.clone());
        }
        self.may_follow(address)?;
        let mut learnt = self.learnt.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(rpc) = learnt.get(address) {
            return Ok(rpc.clone());
        }
        let channel = crate::security::endpoint(address, self.options.tls.as_ref())?
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .connect_lazy();
        let client = rpc(channel, self.options.token.clone());
        if learnt.len() >= MAX_LEARNT {
            learnt.clear();
        }
        learnt.insert(address.to_string(), client.clone());
        Ok(client)
    }

    /// Whether a redirect to `address`, which is not one of the configured
    /// coordinators, may be followed: never to another scheme than the
    /// configured ones (no downgrade to cleartext); over `https://` only
    /// with a CA of the client's own (a private CA certifies the cluster's
    /// members; with the system's roots any public certificate would do,
    /// and the token would go to whoever holds one); over `http://` only
    /// without a token. Otherwise the caller gets the redirect as an error
    /// and can list every coordinator instead.
    fn may_follow(&self, address: &str) -> Result<(), String> {
        let scheme = |a: &str| {
            a.split("://")
                .next()
                .unwrap_or_default()
                .to_ascii_lowercase()
        };
        let wanted = scheme(&self.endpoints[0].0);
        let refuse = |why: &str| Err(format!("not following a redirect to {address:?}: {why}"));
        if scheme(address) != wanted {
            return refuse("another scheme than the configured coordinators'");
        }
        match wanted.as_str() {
            "https" if self.options.tls.as_ref().is_some_and(|t| t.ca.is_some()) => Ok(()),
            "https" => {
                refuse("a coordinator not listed, and no CA of the client's own to check it by")
            }
            "http" if !self.options.token.is_set() => Ok(()),
            _ => refuse("a coordinator not listed would receive the token in cleartext"),
        }
    }

    /// Sends `call` to the current coordinator; follows redirects, and
    /// moves on to the next coordinator as `repeat` allows.
    pub(super) async fn call<T, F, Fut>(&self, repeat: Repeat, call: F) -> Result<T, tonic::Status>
    where
        F: Fn(Rpc) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let n = self.endpoints.len();
        let first = self.current.load(Ordering::Relaxed) % n;
        let mut tried = 1;
        let mut redirects = 0;
        let mut target = self.endpoints[first].1.clone();
        loop {
            let status = match call(target.clone()).await {
                Ok(response) => return Ok(response.into_inner()),
                Err(status) => status,
            };
            if let Some(address) = tandem_proto::rpc::moved_to(&status) {
                if redirects >= MAX_REDIRECTS {
                    return Err(status);
                }
                redirects += 1;
                match self.to(&address) {
                    Ok(next) => {
                        tracing::debug!(%address, "coordinator redirected the request to the transaction's owner");
                        target = next;
                        continue;
                    }
                    Err(why) => {
                        tracing::warn!(%address, error = %why, "cannot follow a coordinator's redirect");
                        return Err(status);
                    }
                }
            }
            let move_on = match repeat {
                Repeat::Safe => status.code() == tonic::Code::Unavailable,
                Repeat::Undelivered => not_delivered(&status),
            };
            if !move_on || tried >= n {
                return Err(status);
            }
            let next = (first + tried) % n;
            tried += 1;
            tracing::debug!(from = %self.endpoints[(next + n - 1) % n].0, to = %self.endpoints[next].0,
                error = %status.message(), "coordinator unavailable; trying the next");
            self.current.store(next, Ordering::Relaxed);
            target = self.endpoints[next].1.clone();
        }
    }
}

/// The request never reached a coordinator: no connection could be made.
fn not_delivered(status: &tonic::Status) -> bool {
    if status.code() != tonic::Code::Unavailable {
        return false;
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused
                    | std::io::ErrorKind::NotConnected
                    | std::io::ErrorKind::AddrNotAvailable
            );
        }
        source = e.source();
    }
    false
}

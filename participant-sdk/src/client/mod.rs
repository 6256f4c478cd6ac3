//! [`TransactionClient`]: run global transactions from a business service.

mod cluster;
mod message;
mod outcome;
mod types;

use std::sync::Arc;
use std::time::Duration;

use tandem_proto::v1 as pb;
use tonic::transport::Channel;

use cluster::{Cluster, Repeat};
pub use outcome::Outcome;
#[cfg(feature = "participant")]
pub(crate) use outcome::background_client;
pub use types::{Branch, CommitOutcome, Enlisted, Mode, Submitted};

// Shared with the coordinator's own clients (`tandem tx`, `tandem bench`).
use crate::security::BearerToken;
pub use crate::security::ClientOptions;
use crate::trace::TraceContext;
use crate::{Error, Gtid};

/// Connection to a coordinator; cheap to clone, safe to share.
///
/// # Examples
///
/// Interactive: begin, enlist branch after branch (each runs its prepare
/// now), then commit.
///
/// ```no_run
/// use tandem_sdk::{Branch, Error, Mode, TransactionClient};
///
/// # async fn transfer() -> Result<(), Error> {
/// let client = TransactionClient::connect("http://127.0.0.1:7070").await?;
/// let gtid = client.begin(Mode::TwoPhase).await?;
/// let debit = Branch::new("http://127.0.0.1:9001", "accounts", "alice:-100");
/// match client.enlist(gtid, debit).await {
///     Ok(_) => {}
///     // A no vote aborted the whole transaction; the reason says why.
///     Err(Error::Aborted { reason, .. }) => { println!("refused: {reason}"); return Ok(()); }
///     Err(e) => return Err(e),
/// }
/// client.enlist(gtid, Branch::new("http://127.0.0.1:9002", "accounts", "bob:100")).await?;
/// client.commit(gtid).await?;
/// # Ok(()) }
/// ```
///
/// Several coordinators sharing one store ([`connect_many`]): the client
/// calls one, moves on to the next when it cannot be reached, and follows
/// a coordinator's redirect to the one that runs the transaction.
///
/// [`connect_many`]: TransactionClient::connect_many
///
/// Tracing: each call carries a W3C `traceparent` (see [`crate::trace`]):
/// the one given to [`with_traceparent`](Self::with_traceparent), else
/// the current `tracing` span's when the application installed an
/// OpenTelemetry layer, else none.
#[derive(Clone, Debug)]
pub struct TransactionClient {
    cluster: Arc<Cluster>,
    /// Sent on every call instead of the current span's context.
    trace: Option<TraceContext>,
}

fn gtid_from_wire(s: &str) -> Result<Gtid, Error> {
    Gtid::parse_str(s).map_err(|e| {
        Error::Rpc(tonic::Status::internal(format!(
            "coordinator sent a bad gtid {s:?}: {e}"
        )))
    })
}

fn timeout_ms(timeout: Option<Duration>) -> u64 {
    timeout.map_or(0, |t| t.as_millis().max(1) as u64)
}

impl TransactionClient {
    /// Connects to the coordinator at `endpoint` (e.g. `http://127.0.0.1:7070`).
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] for a malformed endpoint, [`Error::Unavailable`]
    /// when nothing answers there.
    pub async fn connect(endpoint: impl Into<String>) -> Result<Self, Error> {
        Self::connect_with(endpoint, &ClientOptions::default()).await
    }

    /// Connects with TLS and a token (see [`ClientOptions`]). An `https://`
    /// address is only ever called over TLS.
    ///
    /// # Errors
    ///
    /// As [`connect`](Self::connect), and [`Error::Invalid`] for TLS files
    /// that cannot be used.
    pub async fn connect_with(
        endpoint: impl Into<String>,
        options: &ClientOptions,
    ) -> Result<Self, Error> {
        let endpoint = endpoint.into();
        let channel = crate::security::endpoint(&endpoint, options.tls.as_ref())
            .map_err(|message| Error::Invalid {
                code: tonic::Code::InvalidArgument,
                message,
            })?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await?;
        Ok(Self::single(endpoint, channel, options))
    }

    /// Several coordinators sharing one store (`tandem serve --store
    /// postgres://…`), tried in order: a request goes to the first that
    /// answers, and a request for a transaction another one runs is
    /// redirected there. Connections are made on first use, so a
    /// coordinator that is down now does not fail this call.
    ///
    /// A request is sent to the next coordinator only when that cannot run
    /// it twice: it never reached one, or it is idempotent (`begin_as`,
    /// `submit_as` — and so `begin` and `submit`, whose gtid the client
    /// makes —, `commit`, `rollback`, `prepare_message`,
    /// `submit_message`, the reads). An `enlist` whose answer
    /// was lost is not repeated; the transaction then aborts at its
    /// deadline, or by `rollback`.
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] for no endpoint, a malformed one, or TLS files
    /// that cannot be used.
    pub fn connect_many<I, S>(endpoints: I, options: &ClientOptions) -> Result<Self, Error>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let invalid = |message: String| Error::Invalid {
            code: tonic::Code::InvalidArgument,
            message,
        };
        let mut all = Vec::new();
        for endpoint in endpoints {
            let endpoint = endpoint.into();
            let channel = crate::security::endpoint(&endpoint, options.tls.as_ref())
                .map_err(invalid)?
                .connect_timeout(Duration::from_secs(5))
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(5))
                .connect_lazy();
            all.push((endpoint, cluster::rpc(channel, options.token.clone())));
        }
        if all.is_empty() {
            return Err(invalid("no coordinator endpoint given".into()));
        }
        Ok(TransactionClient {
            cluster: Arc::new(Cluster::new(all, options.clone())),
            trace: None,
        })
    }

    /// The coordinators this client calls, in order.
    pub fn endpoints(&self) -> Vec<String> {
        self.cluster.addresses()
    }

    fn single(address: String, channel: Channel, options: &ClientOptions) -> Self {
        let rpc = cluster::rpc(channel, options.token.clone());
        TransactionClient {
            cluster: Arc::new(Cluster::new(vec![(address, rpc)], options.clone())),
            trace: None,
        }
    }

    /// Uses an existing channel (TLS, custom timeouts, load balancing).
    pub fn from_channel(channel: Channel) -> Self {
        Self::from_channel_with(channel, BearerToken::none())
    }

    /// Uses an existing channel, sending `token` with every call.
    pub fn from_channel_with(channel: Channel, token: BearerToken) -> Self {
        let options = ClientOptions { tls: None, token };
        Self::single(String::new(), channel, &options)
    }

    /// A client sharing this one's connections that sends `trace` (a
    /// [`TraceParent`](crate::TraceParent) or a [`TraceContext`] with
    /// `tracestate`) with every call, instead of the current span's
    /// context. The coordinator keeps the trace of the `begin` / `submit`
    /// that starts a transaction and passes it to every participant call,
    /// so each handler's span is part of this trace.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use tandem_sdk::{Branch, Error, Mode, TraceParent, TransactionClient};
    ///
    /// # async fn run(client: TransactionClient, incoming: &str, b: Vec<Branch>) -> Result<(), Error> {
    /// // The traceparent of the request this service is handling, if valid.
    /// let client = match TraceParent::parse(incoming) {
    ///     Some(tp) => client.with_traceparent(tp),
    ///     None => client,
    /// };
    /// client.submit(Mode::TwoPhase, b).await?;
    /// # Ok(()) }
    /// ```
    pub fn with_traceparent(&self, trace: impl Into<TraceContext>) -> TransactionClient {
        TransactionClient {
            cluster: self.cluster.clone(),
            trace: Some(trace.into()),
        }
    }

    /// The trace context a call made now carries.
    fn outgoing_trace(&self) -> Option<TraceContext> {
        self.trace.clone().or_else(current_span_trace)
    }

    /// Starts an interactive transaction with the coordinator's default
    /// deadline.
    ///
    /// # Errors
    ///
    /// [`Error::Unavailable`] when the coordinator is not deciding.
    pub async fn begin(&self, mode: Mode) -> Result<Gtid, Error> {
        self.begin_with_timeout(mode, None).await
    }

    /// Starts an interactive transaction that aborts if not decided within
    /// `timeout` (`None`: the coordinator's default).
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] for a timeout above the coordinator's maximum.
    pub async fn begin_with_timeout(
        &self,
        mode: Mode,
        timeout: Option<Duration>,
    ) -> Result<Gtid, Error> {
        let gtid = Gtid::now_v7();
        self.begin_as(gtid, mode, timeout)
            .await
            .map_err(|e| e.unknown_outcome(gtid))
    }

    /// Starts an interactive transaction with the id `gtid` (a UUID v7
    /// made now, e.g. `Gtid::now_v7()`). A repeat with the same gtid and
    /// mode returns the same transaction, so a `begin` whose reply was lost
    /// can be repeated safely.
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] with ALREADY_EXISTS when `gtid` names a
    /// transaction of another mode, or INVALID_ARGUMENT for a gtid that is
    /// not a recent UUID v7.
    pub async fn begin_as(
        &self,
        gtid: Gtid,
        mode: Mode,
        timeout: Option<Duration>,
    ) -> Result<Gtid, Error> {
        self.begin_labeled(gtid, mode, timeout, &[]).await
    }

    /// As [`begin_as`](Self::begin_as), with caller labels kept in the
    /// transaction's record (`("order_id", "A-42")`), to find it later with
    /// `tandem tx list --label order_id=A-42` or in the console. At most 8;
    /// keys are letters, digits, `_ - . /` starting with a letter (at most
    /// 64 bytes); values printable, at most 256 bytes.
    ///
    /// # Errors
    ///
    /// As [`begin_as`](Self::begin_as); [`Error::Invalid`] naming the key
    /// of a label the coordinator refuses.
    pub async fn begin_labeled(
        &self,
        gtid: Gtid,
        mode: Mode,
        timeout: Option<Duration>,
        labels: &[(&str, &str)],
    ) -> Result<Gtid, Error> {
        let req = pb::BeginRequest {
            mode: mode.wire(),
            timeout_ms: timeout_ms(timeout),
            gtid: gtid.to_string(),
            labels: wire_labels(labels),
        };
        let trace = self.outgoing_trace();
        let resp = self
            .cluster
            .call(Repeat::Safe, |mut rpc| {
                let req = traced(req.clone(), trace.as_ref());
                async move { rpc.begin(req).await }
            })
            .await
            .map_err(|s| with_gtid(s, gtid))?;
        gtid_from_wire(&resp.gtid)
    }

    /// Adds a branch; the coordinator records it and runs its prepare now.
    ///
    /// # Errors
    ///
    /// [`Error::Aborted`] when the participant voted no or failed: the whole
    /// transaction is rolled back. [`Error::Invalid`] for a bad branch, an
    /// unknown gtid, or a transaction no longer active.
    pub async fn enlist(&self, gtid: Gtid, branch: Branch) -> Result<Enlisted, Error> {
        let req = pb::EnlistRequest {
            gtid: gtid.to_string(),
            branch: Some(branch.wire()),
        };
        let trace = self.outgoing_trace();
        let resp = self
            .cluster
            .call(Repeat::Undelivered, |mut rpc| {
                let req = traced(req.clone(), trace.as_ref());
                async move { rpc.enlist(req).await }
            })
            .await
            .map_err(|s| with_gtid(s, gtid))?;
        Ok(Enlisted {
            branch_id: resp.branch_id,
            reply: resp.reply,
        })
    }

    /// Commits: the coordinator forces the decision to disk, then commits
    /// every branch.
    ///
    /// # Errors
    ///
    /// [`Error::Aborted`] if the deadline passed first; [`Error::Invalid`]
    /// if the transaction was rolled back or aborted already.
    pub async fn commit(&self, gtid: Gtid) -> Result<CommitOutcome, Error> {
        let req = pb::CommitRequest {
            gtid: gtid.to_string(),
        };
        let trace = self.outgoing_trace();
        let resp = self
            .cluster
            .call(Repeat::Safe, |mut rpc| {
                let req = traced(req.clone(), trace.as_ref());
                async move { rpc.commit(req).await }
            })
            .await
            .map_err(|s| with_gtid(s, gtid))?;
        Ok(CommitOutcome {
            complete: resp.state == pb::TxState::Committed as i32,
        })
    }

    /// Rolls back every branch enlisted so far. Rolling back twice is fine.
    ///
    /// Also drops a transactional message that was prepared
    /// ([`prepare_message`](Self::prepare_message)) and not submitted:
    /// call it when the local transaction failed, so that nothing waits
    /// for the message's timeout and check.
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] if the transaction is already decided commit (a
    /// message: submitted, or its check answered yes).
    pub async fn rollback(&self, gtid: Gtid, reason: &str) -> Result<(), Error> {
        let req = pb::RollbackRequest {
            gtid: gtid.to_string(),
            reason: reason.to_string(),
        };
        let trace = self.outgoing_trace();
        self.cluster
            .call(Repeat::Safe, |mut rpc| {
                let req = traced(req.clone(), trace.as_ref());
                async move { rpc.rollback(req).await }
            })
            .await
            .map_err(|s| with_gtid(s, gtid))?;
        Ok(())
    }

    /// Runs a whole transaction in one call: prepare on every branch in
    /// parallel, then commit (all voted yes) or rollback.
    ///
    /// The client picks the gtid, so a call whose reply is lost can be
    /// repeated safely: see [`Error::OutcomeUnknown`].
    ///
    /// # Errors
    ///
    /// [`Error::Aborted`] with the gtid and reason when it aborted;
    /// [`Error::Invalid`] for a bad request (nothing was started);
    /// [`Error::OutcomeUnknown`] with the gtid when no answer came (the
    /// coordinator may or may not have started it): repeat with
    /// [`submit_as`](Self::submit_as) and that gtid to learn the outcome.
    pub async fn submit(&self, mode: Mode, branches: Vec<Branch>) -> Result<Submitted, Error> {
        self.submit_with_timeout(mode, branches, None).await
    }

    /// As [`submit`](Self::submit), aborting if undecided after `timeout`.
    ///
    /// # Errors
    ///
    /// As [`submit`](Self::submit).
    pub async fn submit_with_timeout(
        &self,
        mode: Mode,
        branches: Vec<Branch>,
        timeout: Option<Duration>,
    ) -> Result<Submitted, Error> {
        let gtid = Gtid::now_v7();
        self.submit_as(gtid, mode, branches, timeout)
            .await
            .map_err(|e| e.unknown_outcome(gtid))
    }

    /// Runs a whole transaction with the id `gtid` (a UUID v7 made now,
    /// e.g. `Gtid::now_v7()`). Repeating it with the same gtid, mode and
    /// branches never runs the transaction twice: a repeat waits for the
    /// transaction the first call started and returns its outcome (for as
    /// long as the coordinator retains its record; 24 h by default). This
    /// is how to find out what happened to a call that timed out.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use tandem_sdk::{Branch, Error, Gtid, Mode, TransactionClient};
    ///
    /// # async fn pay(client: TransactionClient, branches: Vec<Branch>) -> Result<(), Error> {
    /// let gtid = Gtid::now_v7();
    /// let outcome = loop {
    ///     match client.submit_as(gtid, Mode::TwoPhase, branches.clone(), None).await {
    ///         // No answer: the same gtid again is safe.
    ///         Err(Error::TimedOut { .. } | Error::Unavailable { .. }) => continue,
    ///         other => break other,
    ///     }
    /// };
    /// # outcome.map(drop) }
    /// ```
    ///
    /// # Errors
    ///
    /// As [`submit`](Self::submit) (without the `OutcomeUnknown` wrapping),
    /// and [`Error::Invalid`] with ALREADY_EXISTS when `gtid` names a
    /// transaction with other branches or mode.
    pub async fn submit_as(
        &self,
        gtid: Gtid,
        mode: Mode,
        branches: Vec<Branch>,
        timeout: Option<Duration>,
    ) -> Result<Submitted, Error> {
        self.submit_labeled(gtid, mode, branches, timeout, &[])
            .await
    }

    /// As [`submit_as`](Self::submit_as), with caller labels kept in the
    /// transaction's record (see [`begin_labeled`](Self::begin_labeled)).
    /// A repeat with the same gtid keeps the first call's labels.
    ///
    /// # Errors
    ///
    /// As [`submit_as`](Self::submit_as); [`Error::Invalid`] naming the
    /// key of a label the coordinator refuses.
    pub async fn submit_labeled(
        &self,
        gtid: Gtid,
        mode: Mode,
        branches: Vec<Branch>,
        timeout: Option<Duration>,
        labels: &[(&str, &str)],
    ) -> Result<Submitted, Error> {
        let req = pb::SubmitRequest {
            mode: mode.wire(),
            timeout_ms: timeout_ms(timeout),
            branches: branches.into_iter().map(Branch::wire).collect(),
            gtid: gtid.to_string(),
            labels: wire_labels(labels),
        };
        let trace = self.outgoing_trace();
        let resp = self
            .cluster
            .call(Repeat::Safe, |mut rpc| {
                let req = traced(req.clone(), trace.as_ref());
                async move { rpc.submit(req).await }
            })
            .await
            .map_err(|s| with_gtid(s, gtid))?;
        let gtid = gtid_from_wire(&resp.gtid)?;
        let state = resp.state;
        if state == pb::TxState::Committed as i32 || state == pb::TxState::Committing as i32 {
            Ok(Submitted {
                gtid,
                replies: resp.replies,
                complete: state == pb::TxState::Committed as i32,
            })
        } else {
            Err(Error::Aborted {
                gtid: Some(gtid),
                reason: resp.reason,
                abort: resp.abort,
            })
        }
    }

    /// The coordinator's record of a transaction (state, branches, attempts,
    /// last errors).
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] with NOT_FOUND for an unknown gtid.
    pub async fn get(&self, gtid: Gtid) -> Result<pb::TransactionInfo, Error> {
        let req = pb::GetTransactionRequest {
            gtid: gtid.to_string(),
        };
        Ok(self
            .cluster
            .call(Repeat::Safe, |mut rpc| {
                let req = req.clone();
                async move { rpc.get_transaction(req).await }
            })
            .await?)
    }
}

fn with_gtid(s: tonic::Status, gtid: Gtid) -> Error {
    Error::from(s).about(gtid)
}

/// Caller labels as the wire's map.
fn wire_labels(labels: &[(&str, &str)]) -> std::collections::HashMap<String, String> {
    labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The trace context of the current OpenTelemetry span, if a layer
/// records it.
#[cfg(feature = "otel")]
fn current_span_trace() -> Option<TraceContext> {
    TraceContext::of_span(&tracing::Span::current())
}

/// Without feature `otel` no span has an OpenTelemetry context.
#[cfg(not(feature = "otel"))]
fn current_span_trace() -> Option<TraceContext> {
    None
}

/// `msg` as a request carrying `trace`, if any.
fn traced<T>(msg: T, trace: Option<&TraceContext>) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    if let Some(t) = trace {
        t.inject(req.metadata_mut());
    }
    req
}

//! Dispatch of `Participant` calls: each call is routed to the handler
//! registered for its resource and protocol, and runs through the barrier
//! in a task of its own, so a coordinator that gives up on a call never
//! cuts a handler off halfway. With metrics on, the handler is timed and
//! the call counted by how it ended, or by what the barrier answered. A
//! transactional message's back-check (`Check`) is the one call that does
//! not pass the barrier: it reads the business service's own record.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use tandem_proto::v1 as pb;
use tandem_proto::v1::participant_server::Participant;
use tonic::{Request, Response, Status};
use tracing::Instrument;
use tracing::instrument;

#[cfg(not(feature = "metrics"))]
use super::no_metrics::{self as metrics, ParticipantMetrics};
use crate::Gtid;
use crate::barrier::{self, BarrierStore, InDoubt, Phase};
use crate::handler::{BranchContext, DynHandler, Vote};
#[cfg(feature = "metrics")]
use crate::metrics::{self, ParticipantMetrics};
use crate::trace::TraceContext;

/// Which protocol a resource speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Protocol {
    /// Two-phase commit: prepare, commit, rollback.
    TwoPhase,
    /// Try-confirm-cancel (and saga steps: action, compensation).
    Tcc,
    /// A transactional message's delivery.
    Message,
    /// A transactional message's back-check, served by the business
    /// service that prepared it.
    Check,
}

impl Protocol {
    pub(super) fn name(self) -> &'static str {
        match self {
            Protocol::TwoPhase => "2PC",
            Protocol::Tcc => "TCC",
            Protocol::Message => "MSG",
            Protocol::Check => "CHECK",
        }
    }
}

/// Handlers by resource name, with the protocol each speaks.
pub(super) type Handlers = HashMap<String, (Protocol, Arc<dyn DynHandler>)>;

/// The `Participant` gRPC service over registered handlers. Built by
/// [`ParticipantServer::into_service`](super::ParticipantServer::into_service).
#[derive(Clone)]
pub struct ParticipantService {
    pub(super) handlers: Arc<Handlers>,
    pub(super) barrier: Arc<dyn BarrierStore>,
    /// `None`: metrics off, nothing recorded.
    pub(super) metrics: Option<ParticipantMetrics>,
}

/// Longest text this server puts in a status (statuses travel in HTTP/2
/// headers; gRPC clients reject large ones). Input is echoed shorter still.
pub(crate) const MAX_STATUS_TEXT: usize = 1024;

/// `text` cut to at most `max` bytes on a character boundary, marked.
pub(crate) fn cap(text: &str, max: usize) -> String {
    const MARK: &str = "… (truncated)";
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max.saturating_sub(MARK.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{MARK}", &text[..end])
}

fn context(
    req: &pb::BranchRequest,
    phase: Phase,
    trace: Option<&crate::TraceContext>,
) -> Result<BranchContext, Status> {
    let gtid = Gtid::parse_str(&req.gtid).map_err(|e| {
        Status::invalid_argument(format!("gtid {:?} is not a UUID: {e}", cap(&req.gtid, 64)))
    })?;
    if gtid.is_nil() {
        // No coordinator makes it: a call for it is not one of theirs.
        return Err(Status::invalid_argument("gtid is the nil UUID"));
    }
    Ok(BranchContext {
        gtid,
        branch_id: req.branch_id,
        resource: req.resource.clone(),
        attempt: req.attempt,
        phase,
        epoch: req.epoch,
        traceparent: trace.map(|t| t.parent),
    })
}

fn vote_response(vote: Vote) -> pb::VoteResponse {
    match vote {
        Vote::Yes { reply } => pb::VoteResponse {
            yes: true,
            reason: String::new(),
            reply,
        },
        Vote::No { reason } => pb::VoteResponse {
            yes: false,
            reason,
            reply: Default::default(),
        },
    }
}

impl ParticipantService {
    pub(crate) fn barrier(&self) -> &dyn BarrierStore {
        self.barrier.as_ref()
    }

    /// Whether `resource`'s handler is a saga step's (in-doubt resolution
    /// leaves its compensation to the coordinator).
    pub(crate) fn is_saga(&self, resource: &str) -> bool {
        self.handlers
            .get(resource)
            .is_some_and(|(_, handler)| handler.is_saga())
    }

    /// Whether `resource`'s handler takes message deliveries (in-doubt
    /// resolution never cancels one).
    pub(crate) fn is_message(&self, resource: &str) -> bool {
        self.handlers
            .get(resource)
            .is_some_and(|(_, handler)| handler.is_message())
    }

    /// Confirms (`commit`) or cancels a branch found in doubt, through the
    /// barrier, as if the coordinator had called.
    pub(crate) async fn finish(&self, d: &InDoubt, commit: bool) -> Result<(), Status> {
        let Some((protocol, handler)) = self.handlers.get(&d.resource) else {
            return Err(Status::not_found(format!(
                "no handler registered for resource {:?}",
                d.resource
            )));
        };
        let (phase, verb) = match (protocol, commit) {
            (Protocol::TwoPhase, true) => (Phase::Confirm, "commit"),
            (Protocol::TwoPhase, false) => (Phase::Cancel, "rollback"),
            (Protocol::Tcc, true) => (Phase::Confirm, "confirm"),
            (Protocol::Tcc, false) => (Phase::Cancel, "cancel"),
            // A delivery that started and did not finish, of a message
            // decided (deliveries come only after the decision).
            (Protocol::Message, true) => (Phase::Deliver, "deliver"),
            (Protocol::Message, false) => {
                return Err(Status::failed_precondition(
                    "a message delivery is never cancelled: it runs only after its message \
                     is decided",
                ));
            }
            (Protocol::Check, _) => {
                return Err(Status::failed_precondition(
                    "a message's back-check keeps no barrier record to finish",
                ));
            }
        };
        let ctx = BranchContext {
            gtid: d.key.gtid,
            branch_id: d.key.branch_id,
            resource: d.resource.clone(),
            attempt: 0,
            phase,
            // In-doubt resolution acts on the coordinator's durable answer:
            // never refused for its epoch, and it raises none.
            epoch: 0,
            traceparent: None,
        };
        let call = PhaseTwo {
            handler: handler.clone(),
            barrier: self.barrier.clone(),
            metrics: self.metrics.clone(),
            ctx,
            payload: d.payload.clone(),
            commit,
            verb,
        };
        call.run().await
    }

    fn handler(&self, resource: &str, protocol: Protocol) -> Result<&Arc<dyn DynHandler>, Status> {
        match self.handlers.get(resource) {
            Some((p, h)) if *p == protocol => Ok(h),
            // The resource does not implement this protocol's calls: like
            // a method a server does not serve, and before anything ran,
            // so UNIMPLEMENTED (a phase 1 answered so needs no rollback).
            Some((p, _)) => Err(Status::unimplemented(format!(
                "resource {:?} is registered as {}, but was called with {}",
                cap(resource, 256),
                p.name(),
                protocol.name()
            ))),
            None => Err(Status::not_found(format!(
                "no {} handler registered for resource {:?}",
                protocol.name(),
                cap(resource, 256)
            ))),
        }
    }

    async fn phase_one(
        &self,
        req: Request<pb::BranchRequest>,
        protocol: Protocol,
        verb: &'static str,
    ) -> Result<Response<pb::VoteResponse>, Status> {
        let trace = crate::TraceContext::from_metadata(req.metadata());
        let req = req.into_inner();
        let ctx = context(&req, Phase::Try, trace.as_ref())?;
        let span = handler_span(&ctx, trace.as_ref(), verb);
        let handler = self.handler(&req.resource, protocol)?;
        // A saga step's action commits at once; a TCC transaction would
        // never compensate it (its in-doubt resolution and its abort
        // cancel a reservation, and this resource holds none). Refused
        // before it runs, as a call this resource does not serve.
        if req.mode == pb::Mode::Tcc as i32 && handler.is_saga() {
            return Err(Status::unimplemented(format!(
                "resource {:?} takes saga steps, not a TCC transaction's try",
                cap(&req.resource, 256)
            )));
        }
        let call = PhaseOne {
            handler: handler.clone(),
            barrier: self.barrier.clone(),
            metrics: self.metrics.clone(),
            ctx,
            payload: req.payload,
            verb,
        };
        Ok(Response::new(vote_response(
            call.run().instrument(span).await?,
        )))
    }

    /// A phase-2 call (`phase` is [`Phase::Confirm`], [`Phase::Cancel`] or
    /// [`Phase::Deliver`]) through the barrier.
    async fn phase_two(
        &self,
        req: Request<pb::BranchRequest>,
        protocol: Protocol,
        phase: Phase,
        verb: &'static str,
    ) -> Result<Response<pb::AckResponse>, Status> {
        let trace = crate::TraceContext::from_metadata(req.metadata());
        let req = req.into_inner();
        let commit = phase != Phase::Cancel;
        let ctx = context(&req, phase, trace.as_ref())?;
        let span = handler_span(&ctx, trace.as_ref(), verb);
        let call = PhaseTwo {
            handler: self.handler(&req.resource, protocol)?.clone(),
            barrier: self.barrier.clone(),
            metrics: self.metrics.clone(),
            ctx,
            payload: req.payload,
            commit,
            verb,
        };
        call.run().instrument(span).await?;
        Ok(Response::new(pb::AckResponse {}))
    }

    /// A message's back-check: the handler is asked directly, without the
    /// barrier (it reads the business service's own record, and keeps
    /// none of the barrier's).
    async fn check(
        &self,
        req: Request<pb::BranchRequest>,
    ) -> Result<Response<pb::VoteResponse>, Status> {
        const VERB: &str = "check";
        let trace = crate::TraceContext::from_metadata(req.metadata());
        let req = req.into_inner();
        let ctx = context(&req, Phase::Try, trace.as_ref())?;
        let span = handler_span(&ctx, trace.as_ref(), VERB);
        let call = Check {
            handler: self.handler(&req.resource, Protocol::Check)?.clone(),
            metrics: self.metrics.clone(),
            ctx,
            payload: req.payload,
        };
        Ok(Response::new(vote_response(
            call.run().instrument(span).await?,
        )))
    }
}

/// A try / prepare call with everything it needs, owned, so that it can run
/// in a task of its own.
struct PhaseOne {
    handler: Arc<dyn DynHandler>,
    barrier: Arc<dyn BarrierStore>,
    metrics: Option<ParticipantMetrics>,
    ctx: BranchContext,
    payload: Bytes,
    verb: &'static str,
}

impl PhaseOne {
    /// Runs the call (barrier and handler) to completion in a spawned task
    /// and waits for it. Dropping the returned future (the coordinator's
    /// deadline passed, it disconnected) leaves the task running, so a
    /// handler is never cut off halfway and its barrier record is written.
    async fn run(self) -> Result<Vote, Status> {
        let verb = self.verb;
        let count_panic = panic_counter(self.metrics.as_ref(), &self.ctx);
        let task = tokio::spawn(
            async move {
                let mut call = self.handler.phase_one(&self.ctx, &self.payload);
                if let Some(m) = &self.metrics {
                    call = m.time_handler(&self.ctx.resource, verb, call, metrics::vote_result);
                }
                let (store, ctx, payload) = (self.barrier.as_ref(), &self.ctx, &self.payload);
                let gated = if self.handler.is_saga() {
                    barrier::gate::saga_action(store, ctx, payload, verb, call).await
                } else {
                    barrier::gate::phase_one(store, ctx, payload, verb, call).await
                };
                if let Some(m) = &self.metrics {
                    m.passed(&self.ctx.resource, verb, gated.passage);
                }
                gated.result
            }
            .in_current_span(),
        );
        task.await
            .unwrap_or_else(|e| Err(panicked(verb, count_panic, e)))
    }
}

/// A confirm / cancel (commit / rollback) call, owned; see [`PhaseOne`].
struct PhaseTwo {
    handler: Arc<dyn DynHandler>,
    barrier: Arc<dyn BarrierStore>,
    metrics: Option<ParticipantMetrics>,
    ctx: BranchContext,
    payload: Bytes,
    commit: bool,
    verb: &'static str,
}

impl PhaseTwo {
    /// As [`PhaseOne::run`].
    async fn run(self) -> Result<(), Status> {
        let verb = self.verb;
        let count_panic = panic_counter(self.metrics.as_ref(), &self.ctx);
        let task = tokio::spawn(
            async move {
                let mut call = self
                    .handler
                    .phase_two(&self.ctx, &self.payload, self.commit);
                if let Some(m) = &self.metrics {
                    call = m.time_handler(&self.ctx.resource, verb, call, metrics::ack_result);
                }
                let gated = barrier::gate::phase_two(
                    self.barrier.as_ref(),
                    &self.ctx,
                    &self.payload,
                    verb,
                    call,
                )
                .await;
                if let Some(m) = &self.metrics {
                    m.passed(&self.ctx.resource, verb, gated.passage);
                }
                gated.result
            }
            .in_current_span(),
        );
        task.await
            .unwrap_or_else(|e| Err(panicked(verb, count_panic, e)))
    }
}

/// A message's back-check, owned; see [`PhaseOne`]. No barrier.
struct Check {
    handler: Arc<dyn DynHandler>,
    metrics: Option<ParticipantMetrics>,
    ctx: BranchContext,
    payload: Bytes,
}

impl Check {
    /// As [`PhaseOne::run`], without the barrier. A handler error is
    /// UNAVAILABLE: the answer is not known yet, and the coordinator asks
    /// again (a no vote would drop the message).
    async fn run(self) -> Result<Vote, Status> {
        const VERB: &str = "check";
        let count_panic = panic_counter(self.metrics.as_ref(), &self.ctx);
        let task = tokio::spawn(
            async move {
                let mut call = self.handler.phase_one(&self.ctx, &self.payload);
                if let Some(m) = &self.metrics {
                    call = m.time_handler(&self.ctx.resource, VERB, call, metrics::vote_result);
                }
                call.await.map_err(|e| {
                    Status::unavailable(cap(&format!("{VERB} failed: {e}"), MAX_STATUS_TEXT))
                })
            }
            .in_current_span(),
        );
        task.await.unwrap_or_else(|e| {
            // Not known: asked again, never taken for a no.
            let status = panicked(VERB, count_panic, e);
            Err(Status::unavailable(status.message()))
        })
    }
}

/// The span a handler runs in: `tandem.branch` (named after the call for
/// OpenTelemetry), with `trace_id`, `gtid`, `branch_id`, `resource` and
/// `phase`, the child of the coordinator's span when the call carried a
/// trace context.
fn handler_span(
    ctx: &BranchContext,
    sent: Option<&TraceContext>,
    verb: &'static str,
) -> tracing::Span {
    let span = tracing::info_span!(
        "tandem.branch",
        otel.name = verb,
        trace_id = tracing::field::Empty,
        gtid = %ctx.gtid,
        branch_id = ctx.branch_id,
        resource = %ctx.resource,
        phase = ?ctx.phase,
    );
    if let Some(sent) = sent {
        span.record(
            "trace_id",
            tracing::field::display(sent.parent.trace_id_hex()),
        );
        #[cfg(feature = "otel")]
        sent.adopt(&span);
    }
    span
}

/// What counts a panicked call, kept outside the call's task; only with
/// metrics on, so a server without them copies nothing.
fn panic_counter(
    metrics: Option<&ParticipantMetrics>,
    ctx: &BranchContext,
) -> Option<(ParticipantMetrics, String)> {
    metrics.map(|m| (m.clone(), ctx.resource.clone()))
}

/// A handler task that panicked (the branch's barrier lock is released as
/// it unwinds): reported as INTERNAL, like a handler error, and counted as
/// a failed call.
fn panicked(
    verb: &'static str,
    metrics: Option<(ParticipantMetrics, String)>,
    e: tokio::task::JoinError,
) -> Status {
    tracing::error!(error = %e, "{verb} handler panicked");
    if let Some((m, resource)) = metrics {
        m.panicked(&resource, verb);
    }
    Status::internal(format!("{verb} failed: the handler panicked"))
}

#[tonic::async_trait]
impl Participant for ParticipantService {
    #[instrument(level = "debug", skip_all, fields(gtid = %req.get_ref().gtid, branch = req.get_ref().branch_id))]
    async fn prepare(
        &self,
        req: Request<pb::BranchRequest>,
    ) -> Result<Response<pb::VoteResponse>, Status> {
        self.phase_one(req, Protocol::TwoPhase, "prepare").await
    }

    #[instrument(level = "debug", skip_all, fields(gtid = %req.get_ref().gtid, branch = req.get_ref().branch_id))]
    async fn commit(
        &self,
        req: Request<pb::BranchRequest>,
    ) -> Result<Response<pb::AckResponse>, Status> {
        self.phase_two(req, Protocol::TwoPhase, Phase::Confirm, "commit")
            .await
    }

    #[instrument(level = "debug", skip_all, fields(gtid = %req.get_ref().gtid, branch = req.get_ref().branch_id))]
    async fn rollback(
        &self,
        req: Request<pb::BranchRequest>,
    ) -> Result<Response<pb::AckResponse>, Status> {
        self.phase_two(req, Protocol::TwoPhase, Phase::Cancel, "rollback")
            .await
    }

    #[instrument(level = "debug", skip_all, fields(gtid = %req.get_ref().gtid, branch = req.get_ref().branch_id))]
    async fn r#try(
        &self,
        req: Request<pb::BranchRequest>,
    ) -> Result<Response<pb::VoteResponse>, Status> {
        self.phase_one(req, Protocol::Tcc, "try").await
    }

    #[instrument(level = "debug", skip_all, fields(gtid = %req.get_ref().gtid, branch = req.get_ref().branch_id))]
    async fn confirm(
        &self,
        req: Request<pb::BranchRequest>,
    ) -> Result<Response<pb::AckResponse>, Status> {
        self.phase_two(req, Protocol::Tcc, Phase::Confirm, "confirm")
            .await
    }

    #[instrument(level = "debug", skip_all, fields(gtid = %req.get_ref().gtid, branch = req.get_ref().branch_id))]
    async fn cancel(
        &self,
        req: Request<pb::BranchRequest>,
    ) -> Result<Response<pb::AckResponse>, Status> {
        self.phase_two(req, Protocol::Tcc, Phase::Cancel, "cancel")
            .await
    }

    #[instrument(level = "debug", skip_all, fields(gtid = %req.get_ref().gtid, branch = req.get_ref().branch_id))]
    async fn deliver(
        &self,
        req: Request<pb::BranchRequest>,
    ) -> Result<Response<pb::AckResponse>, Status> {
        self.phase_two(req, Protocol::Message, Phase::Deliver, "deliver")
            .await
    }

    #[instrument(level = "debug", skip_all, fields(gtid = %req.get_ref().gtid, branch = req.get_ref().branch_id))]
    async fn check(
        &self,
        req: Request<pb::BranchRequest>,
    ) -> Result<Response<pb::VoteResponse>, Status> {
        ParticipantService::check(self, req).await
    }
}

//! [`ParticipantServer`]: serves registered handlers as the `Participant`
//! gRPC service.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tandem_proto::v1 as pb;
use tandem_proto::v1::participant_server::{
    Participant, ParticipantServer as ParticipantRpcServer,
};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};
use tracing::Instrument;
use tracing::instrument;

use crate::Gtid;
use crate::barrier::{self, BarrierStore, InDoubt, MemBarrier, Phase, Retention};
use crate::client::ClientOptions;
use crate::handler::{BranchContext, DynHandler, Tcc, TccHandler, TwoPhase, TwoPhaseHandler, Vote};
use crate::security::{AccessList, Role, ServerTls};

/// Which protocol a resource speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Protocol {
    TwoPhase,
    Tcc,
}

impl Protocol {
    fn name(self) -> &'static str {
        match self {
            Protocol::TwoPhase => "2PC",
            Protocol::Tcc => "TCC",
        }
    }
}

type Handlers = HashMap<String, (Protocol, Arc<dyn DynHandler>)>;

/// Registers handlers by resource name and serves them.
///
/// Every call goes through the barrier (see [`crate::barrier`]), kept in
/// memory unless [`barrier`](ParticipantServer::barrier) names a durable
/// store; while serving, finished barrier records are removed after the
/// [`retention`](ParticipantServer::retention) period.
///
/// # Examples
///
/// ```no_run
/// # use tandem_sdk::{BranchContext, HandlerError, ParticipantServer, TwoPhase, Vote};
/// # struct Ledger;
/// # impl TwoPhase for Ledger {
/// #   async fn prepare(&self, _: &BranchContext, _: &[u8]) -> Result<Vote, HandlerError> { Ok(Vote::yes()) }
/// #   async fn commit(&self, _: &BranchContext, _: &[u8]) -> Result<(), HandlerError> { Ok(()) }
/// #   async fn rollback(&self, _: &BranchContext, _: &[u8]) -> Result<(), HandlerError> { Ok(()) }
/// # }
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// // Serve until the process stops:
/// ParticipantServer::new()
///     .two_phase("ledger", Ledger)
///     .serve("0.0.0.0:9001".parse()?)
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct ParticipantServer {
    handlers: Handlers,
    barrier: Arc<dyn BarrierStore>,
    retention: Retention,
    in_doubt: Option<(String, Duration, ClientOptions)>,
    tls: Option<ServerTls>,
    coordinators: Option<AccessList>,
    /// A resource registered more than once (the first such name, its
    /// first and second protocol): refused when the server is built.
    duplicate: Option<(String, &'static str, &'static str)>,
}

impl Default for ParticipantServer {
    fn default() -> Self {
        ParticipantServer {
            handlers: HashMap::new(),
            barrier: Arc::new(MemBarrier::new()),
            retention: Retention::default(),
            in_doubt: None,
            tls: None,
            coordinators: None,
            duplicate: None,
        }
    }
}

/// Why [`ParticipantServer::serve`] stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The address could not be bound.
    #[error("cannot listen on {0}: {1}")]
    Bind(SocketAddr, #[source] std::io::Error),
    /// The gRPC transport failed.
    #[error("participant server: {0}")]
    Transport(#[source] tonic::transport::Error),
    /// The server's task panicked or was cancelled.
    #[error("participant server task: {0}")]
    Task(#[source] tokio::task::JoinError),
    /// Two handlers were registered under one resource name: a resource
    /// speaks one protocol through one handler, so the server refuses to
    /// start rather than silently pick one.
    #[error(
        "resource {resource:?} has two handlers: registered as {first}, then again as {second}; \
         give each handler its own resource name"
    )]
    DuplicateResource {
        /// The resource name.
        resource: String,
        /// The protocol of the first registration (`2PC` or `TCC`).
        first: &'static str,
        /// The protocol of the second registration.
        second: &'static str,
    },
}

impl ParticipantServer {
    /// A server with no handlers and an in-memory barrier.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `handler` for 2PC branches enlisted with `resource`.
    ///
    /// A resource name takes one handler: registering it again (2PC or
    /// TCC) makes [`serve`](Self::serve), [`spawn`](Self::spawn) and
    /// [`into_service`](Self::into_service) fail with
    /// [`ServeError::DuplicateResource`].
    pub fn two_phase(self, resource: impl Into<String>, handler: impl TwoPhase) -> Self {
        self.register(
            resource.into(),
            Protocol::TwoPhase,
            Arc::new(TwoPhaseHandler(handler)),
        )
    }

    /// Registers `handler` for TCC branches enlisted with `resource`.
    ///
    /// A resource name takes one handler; see [`two_phase`](Self::two_phase).
    pub fn tcc(self, resource: impl Into<String>, handler: impl Tcc) -> Self {
        self.register(
            resource.into(),
            Protocol::Tcc,
            Arc::new(TccHandler(handler)),
        )
    }

    fn register(
        mut self,
        resource: String,
        protocol: Protocol,
        handler: Arc<dyn DynHandler>,
    ) -> Self {
        match self.handlers.get(&resource) {
            Some((first, _)) => {
                if self.duplicate.is_none() {
                    self.duplicate = Some((resource, first.name(), protocol.name()));
                }
            }
            None => {
                self.handlers.insert(resource, (protocol, handler));
            }
        }
        self
    }

    /// The registration error, if any.
    fn check(&self) -> Result<(), ServeError> {
        match &self.duplicate {
            Some((resource, first, second)) => Err(ServeError::DuplicateResource {
                resource: resource.clone(),
                first,
                second,
            }),
            None => Ok(()),
        }
    }

    /// Keeps barrier records in `store` instead of memory. Use a durable
    /// store (such as [`SledBarrier`](crate::barrier::SledBarrier)) whenever
    /// the handlers' state outlives the process.
    pub fn barrier(mut self, store: impl BarrierStore) -> Self {
        self.barrier = Arc::new(store);
        self
    }

    /// The barrier store calls go through (for running
    /// [`spawn_retention`](crate::barrier::spawn_retention) next to
    /// [`into_service`](ParticipantServer::into_service)).
    pub fn barrier_store(&self) -> Arc<dyn BarrierStore> {
        self.barrier.clone()
    }

    /// How long finished barrier records are kept; see [`Retention`].
    pub fn retention(mut self, retention: Retention) -> Self {
        self.retention = retention;
        self
    }

    /// Resolves branches left in doubt: a branch whose try / prepare ran
    /// and that has heard nothing for `after` asks the coordinator at
    /// `coordinator` (`http://host:port`) for the outcome and confirms or
    /// cancels itself through the barrier. A gtid the coordinator never
    /// recorded is cancelled (presumed abort). Without this, such a branch
    /// stays reserved until the coordinator calls it. Keep `after` above
    /// your transactions' usual duration.
    pub fn resolve_in_doubt(self, coordinator: impl Into<String>, after: Duration) -> Self {
        self.resolve_in_doubt_with(coordinator, after, ClientOptions::default())
    }

    /// As [`resolve_in_doubt`](Self::resolve_in_doubt), reaching the
    /// coordinator with TLS and a token (a credential with the
    /// `participant` role on the coordinator).
    pub fn resolve_in_doubt_with(
        mut self,
        coordinator: impl Into<String>,
        after: Duration,
        options: ClientOptions,
    ) -> Self {
        self.in_doubt = Some((coordinator.into(), after, options));
        self
    }

    /// Serves over TLS (see [`ServerTls`]); with a client CA, the
    /// coordinator's certificate is verified. Plaintext connections are
    /// refused.
    pub fn tls(mut self, tls: ServerTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Obeys only callers granted the `coordinator` role in `access` (a
    /// bearer token or a client certificate name): any other call to
    /// Prepare/Commit/Rollback/Try/Confirm/Cancel is refused with
    /// UNAUTHENTICATED or PERMISSION_DENIED before the barrier or a
    /// handler sees it.
    pub fn only_coordinators(mut self, access: AccessList) -> Self {
        self.coordinators = Some(access);
        self
    }

    /// The tonic service, to add to your own `tonic::transport::Server`.
    /// Barrier retention and in-doubt resolution are not started; run
    /// [`spawn_retention`](crate::barrier::spawn_retention) alongside.
    ///
    /// # Errors
    ///
    /// [`ServeError::DuplicateResource`] when a resource name was
    /// registered twice.
    pub fn into_service(self) -> Result<ParticipantGrpcService, ServeError> {
        self.check()?;
        Ok(self.grpc_service())
    }

    fn grpc_service(&self) -> ParticipantGrpcService {
        let check = CallerCheck(self.coordinators.clone());
        InterceptedService::new(
            ParticipantRpcServer::new(self.service()).max_decoding_message_size(64 * 1024 * 1024),
            check,
        )
    }

    fn service(&self) -> ParticipantService {
        ParticipantService {
            handlers: Arc::new(self.handlers.clone()),
            barrier: self.barrier.clone(),
        }
    }

    /// Starts the background work of a serving participant: barrier
    /// retention, and in-doubt resolution when configured.
    fn start_background(&self) -> Background {
        let mut tasks = vec![barrier::spawn_retention(
            self.barrier.clone(),
            self.retention,
        )];
        if let Some((coordinator, after, options)) = &self.in_doubt {
            tasks.push(crate::in_doubt::spawn(
                self.service(),
                coordinator.clone(),
                *after,
                options.clone(),
            ));
        }
        Background(tasks)
    }

    /// Serves on `addr` until the process stops.
    ///
    /// # Errors
    ///
    /// A resource was registered twice, the address cannot be bound, or
    /// the transport fails.
    pub async fn serve(self, addr: SocketAddr) -> Result<(), ServeError> {
        self.check()?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| ServeError::Bind(addr, e))?;
        self.serve_with_shutdown(listener, std::future::pending())
            .await
    }

    /// Serves on an already bound `listener` until `shutdown` resolves, then
    /// lets in-flight calls finish.
    ///
    /// # Errors
    ///
    /// A resource was registered twice, or the transport fails.
    pub async fn serve_with_shutdown(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ServeError> {
        self.check()?;
        let background = self.start_background();
        let watch = self.tls.as_ref().map(|t| t.watch(Duration::from_secs(10)));
        let mut builder = tonic::transport::Server::builder();
        let served = match self.tls.clone() {
            Some(tls) => {
                builder
                    .add_service(self.grpc_service())
                    .serve_with_incoming_shutdown(tls.incoming(listener), shutdown)
                    .await
            }
            None => {
                builder
                    .add_service(self.grpc_service())
                    .serve_with_incoming_shutdown(
                        // Without nodelay a reply's trailers wait for the peer's delayed ACK.
                        TcpIncoming::from(listener).with_nodelay(Some(true)),
                        shutdown,
                    )
                    .await
            }
        };
        if let Some(w) = watch {
            w.abort();
        }
        background.stop().await;
        served.map_err(ServeError::Transport)
    }

    /// Binds `addr` (port 0 picks a free port) and serves in a background
    /// task; the returned handle tells the address and stops it.
    ///
    /// # Errors
    ///
    /// A resource was registered twice, or the address cannot be bound.
    pub async fn spawn(self, addr: SocketAddr) -> Result<RunningParticipant, ServeError> {
        self.check()?;
        let bind = |e| ServeError::Bind(addr, e);
        let listener = TcpListener::bind(addr).await.map_err(bind)?;
        let addr = listener.local_addr().map_err(bind)?;
        let tls = self.tls.is_some();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(self.serve_with_shutdown(listener, async move {
            let _ = stopped.await;
        }));
        Ok(RunningParticipant {
            addr,
            tls,
            stop: Some(stop),
            task,
        })
    }
}

/// A participant server running in the background of this process.
pub struct RunningParticipant {
    /// Where it listens.
    pub addr: SocketAddr,
    tls: bool,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), ServeError>>,
}

impl RunningParticipant {
    /// `http://addr` (`https://` when serving TLS): the endpoint to
    /// enlist branches with.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Stops accepting calls and waits for in-flight ones.
    ///
    /// # Errors
    ///
    /// The server task failed.
    pub async fn shutdown(mut self) -> Result<(), ServeError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await.map_err(ServeError::Task)?
    }
}

/// Background tasks, stopped when dropped, or with [`Background::stop`],
/// which also waits until they (and what they hold) are gone.
struct Background(Vec<JoinHandle<()>>);

impl Background {
    async fn stop(mut self) {
        for task in std::mem::take(&mut self.0) {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// What [`ParticipantServer::into_service`] returns: the `Participant`
/// gRPC service behind the caller check, ready for
/// `tonic::transport::Server::add_service`.
pub type ParticipantGrpcService =
    InterceptedService<ParticipantRpcServer<ParticipantService>, CallerCheck>;

/// The `Participant` gRPC service over registered handlers. Built by
/// [`ParticipantServer::into_service`].
#[derive(Clone)]
pub struct ParticipantService {
    handlers: Arc<Handlers>,
    barrier: Arc<dyn BarrierStore>,
}

/// Refuses a caller that is not an allowed coordinator (when
/// [`ParticipantServer::only_coordinators`] is set) on the request's
/// headers, before its message is read.
#[derive(Clone)]
pub struct CallerCheck(Option<AccessList>);

impl tonic::service::Interceptor for CallerCheck {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(access) = &self.0 else {
            return Ok(req);
        };
        let auth = req.metadata().get("authorization").map(|v| v.as_bytes());
        let certs = req.peer_certs();
        match access.check(
            auth,
            certs.as_deref().map(|c| c.as_slice()),
            Role::Coordinator,
        ) {
            Ok(_) => Ok(req),
            Err(r) => {
                tracing::warn!(refused = %r, "participant call refused");
                Err(Status::from(r))
            }
        }
    }
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

    /// Confirms (`commit`) or cancels a branch found in doubt, through the
    /// barrier, as if the coordinator had called.
    pub(crate) async fn finish(&self, d: &InDoubt, commit: bool) -> Result<(), Status> {
        let Some((protocol, handler)) = self.handlers.get(&d.resource) else {
            return Err(Status::not_found(format!(
                "no handler registered for resource {:?}",
                d.resource
            )));
        };
        let ctx = BranchContext {
            gtid: d.key.gtid,
            branch_id: d.key.branch_id,
            resource: d.resource.clone(),
            attempt: 0,
            phase: if commit {
                Phase::Confirm
            } else {
                Phase::Cancel
            },
            // In-doubt resolution acts on the coordinator's durable answer:
            // never refused for its epoch, and it raises none.
            epoch: 0,
            traceparent: None,
        };
        let verb = match (protocol, commit) {
            (Protocol::TwoPhase, true) => "commit",
            (Protocol::TwoPhase, false) => "rollback",
            (Protocol::Tcc, true) => "confirm",
            (Protocol::Tcc, false) => "cancel",
        };
        let call = PhaseTwo {
            handler: handler.clone(),
            barrier: self.barrier.clone(),
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
        let span = crate::trace::handler_span(&ctx, trace.as_ref(), verb);
        let call = PhaseOne {
            handler: self.handler(&req.resource, protocol)?.clone(),
            barrier: self.barrier.clone(),
            ctx,
            payload: req.payload,
            verb,
        };
        Ok(Response::new(vote_response(
            call.run().instrument(span).await?,
        )))
    }

    async fn phase_two(
        &self,
        req: Request<pb::BranchRequest>,
        protocol: Protocol,
        commit: bool,
        verb: &'static str,
    ) -> Result<Response<pb::AckResponse>, Status> {
        let trace = crate::TraceContext::from_metadata(req.metadata());
        let req = req.into_inner();
        let phase = if commit {
            Phase::Confirm
        } else {
            Phase::Cancel
        };
        let ctx = context(&req, phase, trace.as_ref())?;
        let span = crate::trace::handler_span(&ctx, trace.as_ref(), verb);
        let call = PhaseTwo {
            handler: self.handler(&req.resource, protocol)?.clone(),
            barrier: self.barrier.clone(),
            ctx,
            payload: req.payload,
            commit,
            verb,
        };
        call.run().instrument(span).await?;
        Ok(Response::new(pb::AckResponse {}))
    }
}

/// A try / prepare call with everything it needs, owned, so that it can run
/// in a task of its own.
struct PhaseOne {
    handler: Arc<dyn DynHandler>,
    barrier: Arc<dyn BarrierStore>,
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
        let task = tokio::spawn(
            async move {
                let call = self.handler.phase_one(&self.ctx, &self.payload);
                barrier::gate::phase_one(
                    self.barrier.as_ref(),
                    &self.ctx,
                    &self.payload,
                    self.verb,
                    call,
                )
                .await
            }
            .in_current_span(),
        );
        task.await.unwrap_or_else(|e| Err(panicked(verb, e)))
    }
}

/// A confirm / cancel (commit / rollback) call, owned; see [`PhaseOne`].
struct PhaseTwo {
    handler: Arc<dyn DynHandler>,
    barrier: Arc<dyn BarrierStore>,
    ctx: BranchContext,
    payload: Bytes,
    commit: bool,
    verb: &'static str,
}

impl PhaseTwo {
    /// As [`PhaseOne::run`].
    async fn run(self) -> Result<(), Status> {
        let verb = self.verb;
        let task = tokio::spawn(
            async move {
                let call = self
                    .handler
                    .phase_two(&self.ctx, &self.payload, self.commit);
                barrier::gate::phase_two(self.barrier.as_ref(), &self.ctx, self.verb, call).await
            }
            .in_current_span(),
        );
        task.await.unwrap_or_else(|e| Err(panicked(verb, e)))
    }
}

/// A handler task that panicked (the branch's barrier lock is released as
/// it unwinds): reported as INTERNAL, like a handler error.
fn panicked(verb: &str, e: tokio::task::JoinError) -> Status {
    tracing::error!(error = %e, "{verb} handler panicked");
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
        self.phase_two(req, Protocol::TwoPhase, true, "commit")
            .await
    }

    #[instrument(level = "debug", skip_all, fields(gtid = %req.get_ref().gtid, branch = req.get_ref().branch_id))]
    async fn rollback(
        &self,
        req: Request<pb::BranchRequest>,
    ) -> Result<Response<pb::AckResponse>, Status> {
        self.phase_two(req, Protocol::TwoPhase, false, "rollback")
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
        self.phase_two(req, Protocol::Tcc, true, "confirm").await
    }

    #[instrument(level = "debug", skip_all, fields(gtid = %req.get_ref().gtid, branch = req.get_ref().branch_id))]
    async fn cancel(
        &self,
        req: Request<pb::BranchRequest>,
    ) -> Result<Response<pb::AckResponse>, Status> {
        self.phase_two(req, Protocol::Tcc, false, "cancel").await
    }
}

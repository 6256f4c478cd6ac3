//! [`ParticipantServer`]: serves registered handlers as the `Participant`
//! gRPC service, with `grpc.health.v1` beside it.
//!
//! - `mod.rs`: the builder, serving and stopping;
//! - `dispatch`: [`ParticipantService`], routing each call to its handler
//!   through the barrier;
//! - `caller`: [`CallerCheck`], only allowed coordinators drive branches
//!   (feature `tls`: the access list lives with TLS);
//! - `no_metrics`: what dispatch records without feature `metrics`
//!   (nothing);
//! - `tests`: dispatch of the transactional-message calls;
//! - [`health`]: health checks that turn NOT_SERVING on shutdown.

mod caller;
mod dispatch;
#[cfg(not(feature = "metrics"))]
mod no_metrics;
#[cfg(test)]
mod tests;
pub use tandem_common::health;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tandem_proto::v1::participant_server::ParticipantServer as ParticipantRpcServer;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::server::NamedService;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;

pub use caller::CallerCheck;
pub use dispatch::ParticipantService;
use dispatch::{Handlers, Protocol};
pub(crate) use dispatch::{MAX_STATUS_TEXT, cap};
use health::ServerHealth;

use crate::barrier::{self, BarrierStore, MemBarrier, Retention};
use crate::client::ClientOptions;
use crate::handler::{
    CheckHandler, DynHandler, Message, MessageCheck, MessageHandler, Saga, SagaHandler, Tcc,
    TccHandler, TwoPhase, TwoPhaseHandler,
};
#[cfg(feature = "metrics")]
use crate::metrics::ParticipantMetrics;
#[cfg(feature = "tls")]
use crate::security::{AccessList, ServerTls};
#[cfg(not(feature = "metrics"))]
use no_metrics::ParticipantMetrics;

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
    #[cfg(feature = "tls")]
    tls: Option<ServerTls>,
    #[cfg(feature = "tls")]
    coordinators: Option<AccessList>,
    metrics: Option<ParticipantMetrics>,
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
            #[cfg(feature = "tls")]
            tls: None,
            #[cfg(feature = "tls")]
            coordinators: None,
            metrics: None,
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
        /// The protocol of the first registration (`2PC`, `TCC` — sagas
        /// too —, `MSG` or `CHECK`).
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

    /// Registers `handler` for saga steps enlisted with `resource`.
    ///
    /// A resource name takes one handler; see [`two_phase`](Self::two_phase).
    pub fn saga(self, resource: impl Into<String>, handler: impl Saga) -> Self {
        self.register(
            resource.into(),
            Protocol::Tcc,
            Arc::new(SagaHandler(handler)),
        )
    }

    /// Registers `handler` for the deliveries of transactional messages
    /// enlisted with `resource` (see [`Message`]): each is delivered at
    /// least once, and a repeat is absorbed by the barrier.
    ///
    /// A resource name takes one handler; see [`two_phase`](Self::two_phase).
    pub fn message(self, resource: impl Into<String>, handler: impl Message) -> Self {
        self.register(
            resource.into(),
            Protocol::Message,
            Arc::new(MessageHandler(handler)),
        )
    }

    /// Registers `handler` as the back-check named `resource`, for the
    /// transactional messages this (business) service prepares: the
    /// coordinator asks it whether the local transaction of a message that
    /// was not submitted in time committed (see [`MessageCheck`]). Give the
    /// coordinator this server's endpoint and `resource` as the message's
    /// `check` branch.
    ///
    /// A resource name takes one handler; see [`two_phase`](Self::two_phase).
    pub fn check(self, resource: impl Into<String>, handler: impl MessageCheck) -> Self {
        self.register(
            resource.into(),
            Protocol::Check,
            Arc::new(CheckHandler(handler)),
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
    fn registered(&self) -> Result<(), ServeError> {
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
    #[cfg(feature = "tls")]
    pub fn tls(mut self, tls: ServerTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Obeys only callers granted the `coordinator` role in `access` (a
    /// bearer token or a client certificate name): any other call to
    /// Prepare/Commit/Rollback/Try/Confirm/Cancel/Deliver/Check is refused with
    /// UNAUTHENTICATED or PERMISSION_DENIED before the barrier or a
    /// handler sees it.
    #[cfg(feature = "tls")]
    pub fn only_coordinators(mut self, access: AccessList) -> Self {
        self.coordinators = Some(access);
        self
    }

    /// Records handler latency, call results and barrier outcomes in
    /// `metrics` (the names are in [`crate::metrics`]): pass a clone, and
    /// serve the original's [`encode`](ParticipantMetrics::encode) on your
    /// HTTP server. Several servers may share one. Off by default, and
    /// then nothing is recorded.
    #[cfg(feature = "metrics")]
    pub fn with_metrics(mut self, metrics: ParticipantMetrics) -> Self {
        self.metrics = Some(metrics);
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
        self.registered()?;
        Ok(self.grpc_service())
    }

    /// The participant service without gRPC: its calls (through the
    /// [`Participant`](tandem_proto::v1::participant_server::Participant)
    /// trait) run through the barrier and the handlers exactly as served
    /// calls do. For participants living in the caller's process: the
    /// coordinator's seeded simulation runs several replicas of one
    /// participant this way, sharing one barrier store. Nothing in the
    /// background is started.
    ///
    /// # Errors
    ///
    /// [`ServeError::DuplicateResource`] when a resource name was
    /// registered twice.
    pub fn into_participant(self) -> Result<ParticipantService, ServeError> {
        self.registered()?;
        Ok(self.service())
    }

    fn grpc_service(&self) -> ParticipantGrpcService {
        #[cfg(feature = "tls")]
        let check = CallerCheck(self.coordinators.clone());
        #[cfg(not(feature = "tls"))]
        let check = CallerCheck;
        InterceptedService::new(
            ParticipantRpcServer::new(self.service()).max_decoding_message_size(64 * 1024 * 1024),
            check,
        )
    }

    fn service(&self) -> ParticipantService {
        ParticipantService {
            handlers: Arc::new(self.handlers.clone()),
            barrier: self.barrier.clone(),
            metrics: self.metrics.clone(),
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
        self.registered()?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| ServeError::Bind(addr, e))?;
        self.serve_with_shutdown(listener, std::future::pending())
            .await
    }

    /// Serves on an already bound `listener` until `shutdown` resolves, then
    /// lets in-flight calls finish. `grpc.health.v1` is served beside the
    /// `Participant` service: SERVING (for "" and `tandem.v1.Participant`)
    /// until `shutdown` resolves, NOT_SERVING from then on, and health
    /// `Watch` streams end so that they do not hold the shutdown up.
    ///
    /// # Errors
    ///
    /// A resource was registered twice, or the transport fails.
    pub async fn serve_with_shutdown(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ServeError> {
        self.registered()?;
        let background = self.start_background();
        #[cfg(feature = "tls")]
        let watch = self.tls.as_ref().map(|t| t.watch(Duration::from_secs(10)));
        let (health, health_service) = ServerHealth::new(&[PARTICIPANT_SERVICE], true).await;
        let shutdown = async move {
            shutdown.await;
            health.stop().await;
        };
        let mut builder = tonic::transport::Server::builder();
        let router = builder
            .add_service(health_service)
            .add_service(self.grpc_service());
        let served = match self.server_tls() {
            #[cfg(feature = "tls")]
            Some(tls) => {
                router
                    .serve_with_incoming_shutdown(tls.incoming(listener), shutdown)
                    .await
            }
            None => {
                router
                    .serve_with_incoming_shutdown(
                        // Without nodelay a reply's trailers wait for the peer's delayed ACK.
                        TcpIncoming::from(listener).with_nodelay(Some(true)),
                        shutdown,
                    )
                    .await
            }
        };
        #[cfg(feature = "tls")]
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
        self.registered()?;
        let bind = |e| ServeError::Bind(addr, e);
        let listener = TcpListener::bind(addr).await.map_err(bind)?;
        let addr = listener.local_addr().map_err(bind)?;
        let tls = self.server_tls().is_some();
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

    /// The TLS this server speaks, if any.
    #[cfg(feature = "tls")]
    fn server_tls(&self) -> Option<ServerTls> {
        self.tls.clone()
    }

    /// No TLS in a build without feature `tls`.
    #[cfg(not(feature = "tls"))]
    fn server_tls(&self) -> Option<std::convert::Infallible> {
        None
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

/// The name health checks report the `Participant` service under.
const PARTICIPANT_SERVICE: &str = <ParticipantRpcServer<ParticipantService> as NamedService>::NAME;

/// What [`ParticipantServer::into_service`] returns: the `Participant`
/// gRPC service behind the caller check, ready for
/// `tonic::transport::Server::add_service`.
pub type ParticipantGrpcService =
    InterceptedService<ParticipantRpcServer<ParticipantService>, CallerCheck>;

//! Starting and stopping a coordinator server: both gRPC services (with
//! health and reflection) on one listener, recovery before serving,
//! graceful shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tandem_proto::v1::admin_server::AdminServer;
use tandem_proto::v1::coordinator_server::CoordinatorServer;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;

pub use crate::admin_http::AdminListener;
use crate::config::CoordinatorConfig;
use crate::log::TxnLog;
use crate::runtime::Coordinator;
use crate::runtime::Environment;
use crate::security::{RELOAD_EVERY, ServerSecurity};
use crate::service::{
    AdminService, AuthLayer, ConcurrencyLimitLayer, CoordinatorService, MalformedRequestLayer,
    health_service, reflection_services,
};

/// Largest gRPC message accepted: room for many branches of maximum payload.
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
/// HTTP/2 streams one client connection may have open at once.
const MAX_STREAMS_PER_CONNECTION: u32 = 256;

/// Serves the Coordinator and Admin services on `listener` until `shutdown`
/// resolves. Recovery of in-flight transactions runs in the background while
/// new ones are served. On shutdown no new transaction is taken, calls in
/// flight finish (their decisions reach the disk), and what is left is
/// recovered at the next start.
///
/// # Errors
///
/// The transport failed.
pub async fn serve(
    coord: Coordinator,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    serve_with(coord, listener, ServerSecurity::default(), shutdown).await
}

/// As [`serve`], with TLS and authentication as `security` says.
/// Certificate and access files that change are picked up every
/// [`RELOAD_EVERY`] (connections already open keep their certificates).
///
/// # Errors
///
/// The transport failed.
pub async fn serve_with(
    coord: Coordinator,
    listener: TcpListener,
    security: ServerSecurity,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    serve_with_admin(coord, listener, None, security, shutdown).await
}

/// As [`serve_with`], with the admin HTTP listener (JSON API, web console,
/// `/metrics`) on `admin` when given, under the same TLS and access list
/// and stopped by the same shutdown.
///
/// # Errors
///
/// The transport failed.
pub async fn serve_with_admin(
    coord: Coordinator,
    listener: TcpListener,
    admin: Option<AdminListener>,
    security: ServerSecurity,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    // Takes stock of the log and forces it before the first request is
    // served.
    let _recovery = coord.start_recovery().await?;
    let _retention = coord.start_retention();
    let _takeover = coord.start_takeover(coord.config().takeover_every);
    let finishing = coord.clone();
    let draining = coord.clone();
    let stopping = CancellationToken::new();
    let admin_http = admin.map(|admin| {
        tokio::spawn(crate::admin_http::serve(
            coord.clone(),
            admin,
            security.clone(),
            stopping.clone(),
        ))
    });
    let stop_admin = stopping.clone();
    // NOT_SERVING until recovery is done, once halted and once draining.
    let (health_state, health, following) = health_service(&coord).await;
    let (reflection, reflection_alpha) = reflection_services()?;
    let shutdown = async move {
        shutdown.await;
        stop_admin.cancel();
        draining.drain();
        // Health watchers hear NOT_SERVING, then their streams end (an
        // open one would hold the graceful shutdown up).
        health_state.stop().await;
    };
    let reload = security.clone();
    let reloading = tokio::spawn(async move {
        loop {
            tokio::time::sleep(RELOAD_EVERY).await;
            reload.reload(false);
        }
    });
    if security.access.is_none() {
        tracing::warn!(
            "AUTHENTICATION IS OFF: anyone who can reach this port can start, inspect and abort \
             transactions (give --auth-file; see docs/book/src/security.md)"
        );
    }
    let coordinator = CoordinatorServer::new(CoordinatorService::new(coord.clone()))
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let limit = ConcurrencyLimitLayer::new(coord.config().max_concurrent_requests);
    let auth = security.access.as_ref().map(|a| AuthLayer::new(a.shared()));
    let admin = AdminServer::new(AdminService::new(coord));
    // Callers are authenticated before they take a request slot.
    let layers = tower::ServiceBuilder::new()
        .layer(crate::otel::sampling::TraceScopeLayer)
        .layer(MalformedRequestLayer)
        .option_layer(auth)
        .layer(limit);
    let router = tonic::transport::Server::builder()
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .layer(layers)
        .add_service(coordinator)
        .add_service(admin)
        // No credential needed for these two (see `required_role`).
        .add_service(health)
        .add_service(reflection)
        .add_service(reflection_alpha);
    let served = match &security.tls {
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
    reloading.abort();
    stopping.cancel();
    if let Some(admin_http) = admin_http {
        let _ = admin_http.await;
    }
    following.abort();
    served?;
    // Rounds of calls in flight finish (their decisions reach the log);
    // sleeping timers, recovery and retention stop.
    finishing.drain();
    let grace = finishing.config().call_timeout * 2;
    finishing.finish(grace).await;
    Ok(())
}

/// A coordinator serving in the background of this process (tests, demo).
pub struct RunningCoordinator {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The coordinator itself, for direct inspection.
    pub coordinator: Coordinator,
    tls: bool,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl RunningCoordinator {
    /// Binds `config.listen` (use port 0 for any free port) and serves `log`.
    ///
    /// # Errors
    ///
    /// Invalid configuration or the address cannot be bound.
    pub async fn start(config: CoordinatorConfig, log: Arc<dyn TxnLog>) -> anyhow::Result<Self> {
        Self::start_with(
            config,
            log,
            Environment::default(),
            ServerSecurity::default(),
        )
        .await
    }

    /// As [`start`](Self::start), in `env` (how participants are called)
    /// and with `security` on the listener.
    ///
    /// # Errors
    ///
    /// Invalid configuration or the address cannot be bound.
    pub async fn start_with(
        config: CoordinatorConfig,
        log: Arc<dyn TxnLog>,
        env: Environment,
        security: ServerSecurity,
    ) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(config.listen).await?;
        let addr = listener.local_addr()?;
        let coordinator = Coordinator::with_environment(config, log, env)?;
        let tls = security.tls.is_some();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve_with(
            coordinator.clone(),
            listener,
            security,
            async move {
                let _ = stopped.await;
            },
        ));
        Ok(RunningCoordinator {
            addr,
            coordinator,
            tls,
            stop: Some(stop),
            task,
        })
    }

    /// `http://addr` (`https://` when serving TLS), for clients.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Stops accepting calls, waits for in-flight ones, and returns.
    ///
    /// # Errors
    ///
    /// The server task failed.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await?
    }
}

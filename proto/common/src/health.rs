//! `grpc.health.v1` for a server that stops gracefully: the statuses of
//! [`tonic_health`], and health `Watch` streams that end once the server
//! shuts down. A `Watch` stream never ends by itself, and a graceful
//! shutdown waits for every open stream: without this, one load balancer
//! watching health would hold a stopping server up forever.
//!
//! The SDK's `ParticipantServer` serves it (as `tandem_sdk::server::health`);
//! the coordinator uses it too. A service built with
//! `ParticipantServer::into_service` can add it to its own `tonic` server
//! the same way.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::Stream;
use tokio::sync::{Mutex, watch};
use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_health::server::{HealthReporter, HealthService};

/// Sets the health of a server's services; see the [module](self) docs.
#[derive(Clone, Debug)]
pub struct ServerHealth {
    reporter: HealthReporter,
    /// The services reported besides "" (the whole server).
    services: Vec<String>,
    /// What was reported last; held while reporting, so that concurrent
    /// reports are applied in turn and a repeat tells watchers nothing.
    reported: Arc<Mutex<Option<bool>>>,
    /// Becomes true on [`ServerHealth::stop`]: `Watch` streams end.
    stop: watch::Sender<bool>,
}

impl ServerHealth {
    /// Health for `services` (full gRPC names, e.g. `tandem.v1.Participant`)
    /// and "" (the whole server), all starting SERVING or NOT_SERVING as
    /// `serving` says; and the `grpc.health.v1.Health` service to add to
    /// the server. Other names are answered NOT_FOUND.
    pub async fn new(
        services: &[&str],
        serving: bool,
    ) -> (ServerHealth, HealthServer<StoppingHealth>) {
        let reporter = HealthReporter::new();
        let (stop, stopped) = watch::channel(false);
        let health = ServerHealth {
            reporter: reporter.clone(),
            services: services.iter().map(|s| s.to_string()).collect(),
            reported: Arc::new(Mutex::new(None)),
            stop,
        };
        health.set_serving(serving).await;
        let service = StoppingHealth {
            inner: HealthService::from_health_reporter(reporter),
            stopped,
        };
        (health, HealthServer::new(service))
    }

    /// Reports the server and each of its services SERVING or NOT_SERVING.
    /// Watchers hear only of a change (tonic-health's reporter tells them
    /// of every report, a repeat included).
    pub async fn set_serving(&self, serving: bool) {
        let mut reported = self.reported.lock().await;
        if *reported == Some(serving) {
            return;
        }
        *reported = Some(serving);
        let status = if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        for name in std::iter::once("").chain(self.services.iter().map(String::as_str)) {
            self.reporter.set_service_status(name, status).await;
        }
    }

    /// Shutdown: everything NOT_SERVING, then every `Watch` stream ends
    /// after telling its watcher so (new ones answer NOT_SERVING and end).
    /// `Check` keeps answering NOT_SERVING while connections drain.
    pub async fn stop(&self) {
        self.set_serving(false).await;
        self.stop.send_replace(true);
    }
}

/// The `grpc.health.v1.Health` service of a [`ServerHealth`]: tonic-health's
/// own, with `Watch` streams that end on [`ServerHealth::stop`].
#[derive(Debug)]
pub struct StoppingHealth {
    inner: HealthService,
    stopped: watch::Receiver<bool>,
}

/// A health `Watch` stream: statuses as they change, until the server stops.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Health for StoppingHealth {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        self.inner.check(request).await
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let statuses = self.inner.watch(request).await?.into_inner();
        let mut stopped = self.stopped.clone();
        let stop = async move {
            // A dropped sender means the server is gone: end as well.
            let _ = stopped.wait_for(|s| *s).await;
        };
        Ok(Response::new(Box::pin(UntilStopped {
            statuses: Box::pin(statuses),
            stop: Box::pin(stop),
        })))
    }
}

/// Yields `statuses` until `stop` resolves and no status is left to tell:
/// the last status sent (NOT_SERVING, set before the stop) always reaches
/// the watcher before the stream ends.
struct UntilStopped {
    statuses: Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>,
    stop: Pin<Box<dyn Future<Output = ()> + Send>>,
}

impl Stream for UntilStopped {
    type Item = Result<HealthCheckResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.statuses.as_mut().poll_next(cx) {
            Poll::Ready(item) => Poll::Ready(item),
            Poll::Pending => self.stop.as_mut().poll(cx).map(|()| None),
        }
    }
}

//! `grpc.health.v1` on the coordinator, for load balancers and Kubernetes
//! probes: the whole server ("") and `tandem.v1.Coordinator` are SERVING
//! only while the coordinator takes new work, NOT_SERVING while it
//! recovers the transactions found in the log, once it halted after a log
//! failure, and once shutdown began. It follows the runtime's
//! [`Readiness`](crate::runtime::Readiness) channel: no polling.
//!
//! Health calls need no credential, even with `--auth-file`
//! ([`required_role`](super::required_role) names no role for them), so a
//! probe works without a token.

use tandem_common::health::{ServerHealth, StoppingHealth};
use tandem_proto::v1::coordinator_server::CoordinatorServer;
use tokio::task::JoinHandle;
use tonic::server::NamedService;
use tonic_health::pb::health_server::HealthServer;

use super::CoordinatorService;
use crate::runtime::Coordinator;

/// The coordinator's health, its `grpc.health.v1.Health` service, and the
/// task that keeps the first in step with the coordinator (abort it when
/// the server stops). Call [`ServerHealth::stop`] on shutdown so that
/// health `Watch` streams end instead of holding the server up.
pub async fn health_service(
    coord: &Coordinator,
) -> (ServerHealth, HealthServer<StoppingHealth>, JoinHandle<()>) {
    const COORDINATOR: &str = <CoordinatorServer<CoordinatorService> as NamedService>::NAME;
    let mut readiness = coord.readiness();
    let now = *readiness.borrow_and_update();
    let (health, service) = ServerHealth::new(&[COORDINATOR], now.serving()).await;
    let following = health.clone();
    let task = tokio::spawn(async move {
        let mut serving = now.serving();
        // The coordinator keeps the sender: this ends with the server.
        while readiness.changed().await.is_ok() {
            let now = *readiness.borrow_and_update();
            if now.serving() != serving {
                serving = now.serving();
                tracing::info!(serving, reason = now.reason(), "health changed");
                following.set_serving(serving).await;
            }
        }
    });
    (health, service, task)
}

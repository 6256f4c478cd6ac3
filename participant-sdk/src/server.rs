//! [`ParticipantServer`]: serves registered handlers as the `Participant`
//! gRPC service.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tandem_proto::v1 as pb;
use tandem_proto::v1::participant_server::{
    Participant, ParticipantServer as ParticipantRpcServer,
};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};
use tracing::instrument;

use crate::Gtid;
use crate::handler::{BranchContext, DynTwoPhase, TwoPhase, Vote};

/// Registers handlers by resource name and serves them.
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
#[derive(Default, Clone)]
pub struct ParticipantServer {
    two_phase: HashMap<String, Arc<dyn DynTwoPhase>>,
}

impl ParticipantServer {
    /// A server with no handlers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `handler` for 2PC branches enlisted with `resource`.
    /// Registering a name twice keeps the last handler.
    pub fn two_phase(mut self, resource: impl Into<String>, handler: impl TwoPhase) -> Self {
        self.two_phase.insert(resource.into(), Arc::new(handler));
        self
    }

    /// The tonic service, to add to your own `tonic::transport::Server`.
    pub fn into_service(self) -> ParticipantRpcServer<ParticipantService> {
        ParticipantRpcServer::new(ParticipantService {
            two_phase: Arc::new(self.two_phase),
        })
        .max_decoding_message_size(64 * 1024 * 1024)
    }

    /// Serves on `addr` until the process stops.
    ///
    /// # Errors
    ///
    /// The address cannot be bound or the transport fails.
    pub async fn serve(self, addr: SocketAddr) -> Result<(), tonic::transport::Error> {
        tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .add_service(self.into_service())
            .serve(addr)
            .await
    }

    /// Serves on an already bound `listener` until `shutdown` resolves, then
    /// lets in-flight calls finish.
    ///
    /// # Errors
    ///
    /// The transport fails.
    pub async fn serve_with_shutdown(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), tonic::transport::Error> {
        tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .add_service(self.into_service())
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
            .await
    }

    /// Binds `addr` (port 0 picks a free port) and serves in a background
    /// task; the returned handle tells the address and stops it.
    ///
    /// # Errors
    ///
    /// The address cannot be bound.
    pub async fn spawn(self, addr: SocketAddr) -> std::io::Result<RunningParticipant> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(self.serve_with_shutdown(listener, async move {
            let _ = stopped.await;
        }));
        Ok(RunningParticipant {
            addr,
            stop: Some(stop),
            task,
        })
    }
}

/// A participant server running in the background of this process.
pub struct RunningParticipant {
    /// Where it listens.
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl RunningParticipant {
    /// `http://addr`: the endpoint to enlist branches with.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting calls and waits for in-flight ones.
    ///
    /// # Errors
    ///
    /// The server task failed.
    pub async fn shutdown(mut self) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await??;
        Ok(())
    }
}

/// The `Participant` gRPC service over registered handlers. Built by
/// [`ParticipantServer::into_service`].
pub struct ParticipantService {
    two_phase: Arc<HashMap<String, Arc<dyn DynTwoPhase>>>,
}

fn context(req: &pb::BranchRequest) -> Result<BranchContext, Status> {
    let gtid = Gtid::parse_str(&req.gtid)
        .map_err(|e| Status::invalid_argument(format!("gtid {:?} is not a UUID: {e}", req.gtid)))?;
    Ok(BranchContext {
        gtid,
        branch_id: req.branch_id,
        resource: req.resource.clone(),
        attempt: req.attempt,
    })
}

impl ParticipantService {
    fn handler(&self, resource: &str) -> Result<&Arc<dyn DynTwoPhase>, Status> {
        self.two_phase.get(resource).ok_or_else(|| {
            Status::not_found(format!(
                "no 2PC handler registered for resource {resource:?}"
            ))
        })
    }

    fn no_tcc(&self, req: &pb::BranchRequest) -> Status {
        Status::not_found(format!(
            "no TCC handler registered for resource {:?}",
            req.resource
        ))
    }
}

#[tonic::async_trait]
impl Participant for ParticipantService {
    #[instrument(skip_all, fields(gtid = %req.get_ref().gtid, branch = req.get_ref().branch_id))]
    async fn prepare(
        &self,
        req: Request<pb::BranchRequest>,
    ) -> Result<Response<pb::VoteResponse>, Status> {
        let req = req.into_inner();
        let ctx = context(&req)?;
        let vote = self
            .handler(&req.resource)?
            .prepare(&ctx, &req.payload)
            .await
            .map_err(|e| Status::internal(format!("prepare failed: {e}")))?;
        Ok(Response::new(match vote {
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
        }))
    }

    #[instrument(skip_all, fields(gtid = %req.get_ref().gtid, branch = req.get_ref().branch_id))]
    async fn commit(
        &self,
        req: Request<pb::BranchRequest>,
    ) -> Result<Response<pb::AckResponse>, Status> {
        let req = req.into_inner();
        let ctx = context(&req)?;
        self.handler(&req.resource)?
            .commit(&ctx, &req.payload)
            .await
            .map_err(|e| Status::unavailable(format!("commit failed: {e}")))?;
        Ok(Response::new(pb::AckResponse {}))
    }

    #[instrument(skip_all, fields(gtid = %req.get_ref().gtid, branch = req.get_ref().branch_id))]
    async fn rollback(
        &self,
        req: Request<pb::BranchRequest>,
    ) -> Result<Response<pb::AckResponse>, Status> {
        let req = req.into_inner();
        let ctx = context(&req)?;
        self.handler(&req.resource)?
            .rollback(&ctx, &req.payload)
            .await
            .map_err(|e| Status::unavailable(format!("rollback failed: {e}")))?;
        Ok(Response::new(pb::AckResponse {}))
    }

    async fn r#try(
        &self,
        req: Request<pb::BranchRequest>,
    ) -> Result<Response<pb::VoteResponse>, Status> {
        Err(self.no_tcc(req.get_ref()))
    }

    async fn confirm(
        &self,
        req: Request<pb::BranchRequest>,
    ) -> Result<Response<pb::AckResponse>, Status> {
        Err(self.no_tcc(req.get_ref()))
    }

    async fn cancel(
        &self,
        req: Request<pb::BranchRequest>,
    ) -> Result<Response<pb::AckResponse>, Status> {
        Err(self.no_tcc(req.get_ref()))
    }
}

//! `tandem bench-participant`: a no-op participant process for the bench.
//! It serves resource `noop` for 2PC and `noop-tcc` for TCC (always yes,
//! counting calls; a saga's steps use `noop-tcc` too), `noop-msg` for
//! message deliveries (counted as commits) and `noop-check` for the
//! back-check of a message (always committed), plus the `BenchParticipant` service: an echo for the
//! RPC floor, counters for verification, and a switch that makes phase 2
//! fail (to pile up transactions for the recovery measurement).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tandem_proto::bench::v1 as pb;
use tandem_proto::bench::v1::bench_participant_server::{BenchParticipant, BenchParticipantServer};
use tandem_sdk::barrier::Retention;
use tandem_sdk::security::{AccessList, ServerTls, ServerTlsFiles};
use tandem_sdk::{
    BranchContext, HandlerError, Message, MessageCheck, ParticipantServer, Tcc, TwoPhase, Vote,
};
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

/// The bench's 2PC resource.
pub const RESOURCE_2PC: &str = "noop";
/// The bench's TCC resource.
pub const RESOURCE_TCC: &str = "noop-tcc";
/// The bench's message deliveries.
pub const RESOURCE_MSG: &str = "noop-msg";
/// The bench's back-check (a bench message is always submitted).
pub const RESOURCE_CHECK: &str = "noop-check";

#[derive(Default)]
struct Counters {
    phase_one: AtomicU64,
    commits: AtomicU64,
    rollbacks: AtomicU64,
    echoes: AtomicU64,
    fail_phase_two: AtomicBool,
}

impl Counters {
    fn snapshot(&self) -> pb::CountsResponse {
        pb::CountsResponse {
            phase_one: self.phase_one.load(Ordering::Relaxed),
            commits: self.commits.load(Ordering::Relaxed),
            rollbacks: self.rollbacks.load(Ordering::Relaxed),
            echoes: self.echoes.load(Ordering::Relaxed),
        }
    }

    fn phase_two(&self, counter: &AtomicU64) -> Result<(), HandlerError> {
        if self.fail_phase_two.load(Ordering::Relaxed) {
            return Err(HandlerError::new("bench participant told to fail phase 2"));
        }
        counter.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// The no-op handler, for both protocols.
#[derive(Clone)]
struct Noop(Arc<Counters>);

impl TwoPhase for Noop {
    async fn prepare(&self, _: &BranchContext, _: &[u8]) -> Result<Vote, HandlerError> {
        self.0.phase_one.fetch_add(1, Ordering::Relaxed);
        Ok(Vote::yes())
    }
    async fn commit(&self, _: &BranchContext, _: &[u8]) -> Result<(), HandlerError> {
        self.0.phase_two(&self.0.commits)
    }
    async fn rollback(&self, _: &BranchContext, _: &[u8]) -> Result<(), HandlerError> {
        self.0.phase_two(&self.0.rollbacks)
    }
}

impl Tcc for Noop {
    async fn try_(&self, ctx: &BranchContext, payload: &[u8]) -> Result<Vote, HandlerError> {
        TwoPhase::prepare(self, ctx, payload).await
    }
    async fn confirm(&self, ctx: &BranchContext, payload: &[u8]) -> Result<(), HandlerError> {
        TwoPhase::commit(self, ctx, payload).await
    }
    async fn cancel(&self, ctx: &BranchContext, payload: &[u8]) -> Result<(), HandlerError> {
        TwoPhase::rollback(self, ctx, payload).await
    }
}

impl Message for Noop {
    async fn deliver(&self, _: &BranchContext, _: &[u8]) -> Result<(), HandlerError> {
        self.0.phase_two(&self.0.commits)
    }
}

impl MessageCheck for Noop {
    async fn check(&self, _: &BranchContext, _: &[u8]) -> Result<bool, HandlerError> {
        Ok(true)
    }
}

struct BenchService(Arc<Counters>);

#[tonic::async_trait]
impl BenchParticipant for BenchService {
    async fn echo(
        &self,
        req: Request<pb::EchoMessage>,
    ) -> Result<Response<pb::EchoMessage>, Status> {
        self.0.echoes.fetch_add(1, Ordering::Relaxed);
        Ok(Response::new(req.into_inner()))
    }

    async fn counts(
        &self,
        _: Request<pb::CountsRequest>,
    ) -> Result<Response<pb::CountsResponse>, Status> {
        Ok(Response::new(self.0.snapshot()))
    }

    async fn set_fail_phase_two(
        &self,
        req: Request<pb::SetFailPhaseTwoRequest>,
    ) -> Result<Response<pb::CountsResponse>, Status> {
        self.0
            .fail_phase_two
            .store(req.into_inner().fail, Ordering::Relaxed);
        Ok(Response::new(self.0.snapshot()))
    }
}

/// Serves a bench participant on `listen` until Ctrl-C / SIGTERM; prints
/// `listening on ADDR` once bound.
///
/// # Errors
///
/// The address cannot be bound or the transport fails.
pub async fn serve(listen: SocketAddr, secure_dir: Option<&std::path::Path>) -> anyhow::Result<()> {
    let counters = Arc::new(Counters::default());
    let noop = Noop(counters.clone());
    // Barrier records (in memory) of finished branches are kept 10 s: the
    // barrier does its real work while memory stays flat in long runs.
    let mut participant = ParticipantServer::new()
        .two_phase(RESOURCE_2PC, noop.clone())
        .tcc(RESOURCE_TCC, noop.clone())
        .message(RESOURCE_MSG, noop.clone())
        .check(RESOURCE_CHECK, noop);
    // --secure: TLS with the coordinator's certificate required, and only
    // the coordinator obeyed (development files of `tandem certs dev`).
    let tls = match secure_dir {
        Some(dir) => {
            let tls = ServerTls::load(ServerTlsFiles {
                cert: dir.join("participant.pem"),
                key: dir.join("participant-key.pem"),
                client_ca: Some(dir.join("ca.pem")),
                require_client_cert: true,
            })?;
            let access = AccessList::load(&dir.join("participant-access.txt"))
                .map_err(anyhow::Error::msg)?;
            participant = participant.only_coordinators(access);
            Some(tls)
        }
        None => None,
    };
    let retention = tandem_sdk::barrier::spawn_retention(
        participant.barrier_store(),
        Retention {
            keep: Duration::from_secs(10),
            interval: Duration::from_secs(1),
            batch: 1024,
        },
    );
    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!("listening on {}", listener.local_addr()?);
    let router = tonic::transport::Server::builder()
        .add_service(participant.into_service()?)
        .add_service(BenchParticipantServer::new(BenchService(counters)));
    let stop = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    match tls {
        Some(tls) => {
            router
                .serve_with_incoming_shutdown(tls.incoming(listener), stop)
                .await?
        }
        None => {
            router
                .serve_with_incoming_shutdown(
                    // Without nodelay a reply's trailers wait for the peer's delayed ACK.
                    TcpIncoming::from(listener).with_nodelay(Some(true)),
                    stop,
                )
                .await?
        }
    }
    retention.abort();
    Ok(())
}

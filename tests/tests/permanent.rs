//! A participant can say "this will never succeed", and an operator has a
//! way out: real coordinator on a sled log, a real tonic participant (the
//! raw `tandem.v1.Participant` service, as a participant in another
//! language would serve it), the real Admin service.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tandem_coordinator::RunningCoordinator;
use tandem_coordinator::log::SledLog;
use tandem_proto::v1 as pb;
use tandem_proto::v1::admin_client::AdminClient;
use tandem_proto::v1::coordinator_client::CoordinatorClient;
use tandem_proto::v1::participant_server::{Participant, ParticipantServer};
use tandem_tests::{eventually_async, test_config};
use tonic::{Request, Response, Status};

/// How the participant answers phase 2.
#[derive(Clone, Copy)]
enum Answer {
    /// `UNIMPLEMENTED` (only the 2PC methods exist; TCC's phase 2 does not).
    Unimplemented,
    /// `FAILED_PRECONDITION` with the PERMANENT ErrorInfo.
    Permanent,
    /// Plain `FAILED_PRECONDITION`: may be transient, so retried.
    Precondition,
}

struct Raw {
    answer: Answer,
    phase_two_calls: Arc<AtomicUsize>,
}

impl Raw {
    fn phase_two(&self) -> Result<Response<pb::AckResponse>, Status> {
        self.phase_two_calls.fetch_add(1, Ordering::SeqCst);
        Err(match self.answer {
            Answer::Unimplemented => Status::unimplemented("this participant does not do TCC"),
            Answer::Permanent => tandem_proto::rpc::permanent("account 7 was closed"),
            Answer::Precondition => Status::failed_precondition("not yet"),
        })
    }
}

fn yes() -> Result<Response<pb::VoteResponse>, Status> {
    Ok(Response::new(pb::VoteResponse {
        yes: true,
        ..Default::default()
    }))
}

#[tonic::async_trait]
impl Participant for Raw {
    async fn prepare(
        &self,
        _: Request<pb::BranchRequest>,
    ) -> Result<Response<pb::VoteResponse>, Status> {
        yes()
    }
    async fn commit(
        &self,
        _: Request<pb::BranchRequest>,
    ) -> Result<Response<pb::AckResponse>, Status> {
        self.phase_two()
    }
    async fn rollback(
        &self,
        _: Request<pb::BranchRequest>,
    ) -> Result<Response<pb::AckResponse>, Status> {
        self.phase_two()
    }
    async fn r#try(
        &self,
        _: Request<pb::BranchRequest>,
    ) -> Result<Response<pb::VoteResponse>, Status> {
        yes()
    }
    async fn confirm(
        &self,
        _: Request<pb::BranchRequest>,
    ) -> Result<Response<pb::AckResponse>, Status> {
        self.phase_two()
    }
    async fn cancel(
        &self,
        _: Request<pb::BranchRequest>,
    ) -> Result<Response<pb::AckResponse>, Status> {
        self.phase_two()
    }
    async fn deliver(
        &self,
        _: Request<pb::BranchRequest>,
    ) -> Result<Response<pb::AckResponse>, Status> {
        self.phase_two()
    }
    async fn check(
        &self,
        _: Request<pb::BranchRequest>,
    ) -> Result<Response<pb::VoteResponse>, Status> {
        Err(Status::unimplemented("no messages here"))
    }
}

/// Serves `answer` on 127.0.0.1:0; its URL and phase-2 call counter.
async fn raw_participant(answer: Answer) -> (String, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let service = ParticipantServer::new(Raw {
        answer,
        phase_two_calls: calls.clone(),
    });
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (format!("http://{addr}"), calls)
}

async fn start(dir: &std::path::Path) -> RunningCoordinator {
    let log = Arc::new(SledLog::open(dir).expect("log"));
    RunningCoordinator::start(test_config(), log)
        .await
        .expect("start")
}

async fn submit(coord: &RunningCoordinator, mode: pb::Mode, url: &str) -> pb::SubmitResponse {
    let mut rpc = CoordinatorClient::connect(coord.url())
        .await
        .expect("connect");
    rpc.submit(pb::SubmitRequest {
        mode: mode as i32,
        branches: vec![pb::BranchSpec {
            endpoint: url.to_string(),
            resource: "r".into(),
            ..Default::default()
        }],
        ..Default::default()
    })
    .await
    .expect("submit")
    .into_inner()
}

async fn get(coord: &RunningCoordinator, gtid: &str) -> pb::TransactionInfo {
    let mut admin = AdminClient::connect(coord.url()).await.expect("admin");
    admin
        .get_transaction(pb::AdminGetTransactionRequest {
            gtid: gtid.to_string(),
        })
        .await
        .expect("get")
        .into_inner()
}

async fn stuck_within(coord: &RunningCoordinator, gtid: &str, limit: Duration) {
    let started = Instant::now();
    eventually_async("STUCK", || async {
        get(coord, gtid).await.state == pb::TxState::Stuck as i32
    })
    .await;
    assert!(
        started.elapsed() < limit,
        "STUCK only after {:?}",
        started.elapsed()
    );
}

// A participant that does not implement TCC's Confirm: the transaction is
// STUCK at once with the reason (not retried for an hour), an operator
// settles the branch by hand, and the settling survives a restart.
#[tokio::test]
async fn unimplemented_is_stuck_at_once_and_an_operator_settles_it() {
    let dir = tempfile::tempdir().expect("dir");
    let (url, calls) = raw_participant(Answer::Unimplemented).await;
    let coord = start(dir.path()).await;
    let out = submit(&coord, pb::Mode::Tcc, &url).await;
    stuck_within(&coord, &out.gtid, Duration::from_secs(2)).await;
    let info = get(&coord, &out.gtid).await;
    assert_eq!(info.decision, pb::Decision::Commit as i32);
    let b = &info.branches[0];
    assert!(
        b.last_error.contains("will not succeed") && b.last_error.contains("does not do TCC"),
        "the operator sees why: {}",
        b.last_error
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(calls.load(Ordering::SeqCst), 1, "not retried");

    let mut admin = AdminClient::connect(coord.url()).await.expect("admin");
    let resolve = |outcome: pb::Decision, reason: &str| pb::ResolveBranchRequest {
        gtid: out.gtid.clone(),
        branch_id: 1,
        outcome: outcome as i32,
        reason: reason.into(),
    };
    // Against the decision, or without a reason: refused, nothing changes.
    let err = admin
        .resolve_branch(resolve(pb::Decision::Abort, "wrong"))
        .await
        .expect_err("against the decision");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    let err = admin
        .resolve_branch(resolve(pb::Decision::Commit, " "))
        .await
        .expect_err("no reason");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert_eq!(
        get(&coord, &out.gtid).await.state,
        pb::TxState::Stuck as i32
    );

    let info = admin
        .resolve_branch(resolve(pb::Decision::Commit, "INC-42: confirmed by hand"))
        .await
        .expect("resolve")
        .into_inner();
    assert_eq!(info.state, pb::TxState::Committed as i32);
    let r = info.branches[0].resolution.clone().expect("resolution");
    assert_eq!(
        (r.by.as_str(), r.reason.as_str()),
        ("anonymous", "INC-42: confirmed by hand")
    );
    assert_eq!(info.branches[0].last_error, "");
    // A second settling is refused: the transaction is finished.
    let err = admin
        .resolve_branch(resolve(pb::Decision::Commit, "again"))
        .await
        .expect_err("finished");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");

    coord.shutdown().await.expect("shutdown");
    let coord = start(dir.path()).await;
    let info = get(&coord, &out.gtid).await;
    assert_eq!(info.state, pb::TxState::Committed as i32);
    assert_eq!(
        info.branches[0].resolution,
        Some(r),
        "kept across a restart"
    );
}

// FAILED_PRECONDITION with the PERMANENT detail is final; without it, it
// is retried like any other error.
#[tokio::test]
async fn only_the_permanent_detail_makes_failed_precondition_final() {
    let dir = tempfile::tempdir().expect("dir");
    let coord = start(dir.path()).await;
    let (permanent, permanent_calls) = raw_participant(Answer::Permanent).await;
    let out = submit(&coord, pb::Mode::TwoPhase, &permanent).await;
    stuck_within(&coord, &out.gtid, Duration::from_secs(2)).await;
    assert!(
        get(&coord, &out.gtid).await.branches[0]
            .last_error
            .contains("account 7 was closed")
    );
    assert_eq!(permanent_calls.load(Ordering::SeqCst), 1);

    let (plain, plain_calls) = raw_participant(Answer::Precondition).await;
    let out = submit(&coord, pb::Mode::TwoPhase, &plain).await;
    eventually_async("retried", || async {
        plain_calls.load(Ordering::SeqCst) >= 3
    })
    .await;
    assert_eq!(
        get(&coord, &out.gtid).await.state,
        pb::TxState::Committing as i32
    );
}

/// A TCC resource whose confirm finds the account gone.
struct Closed;

impl tandem_sdk::Tcc for Closed {
    async fn try_(
        &self,
        _: &tandem_sdk::BranchContext,
        _: &[u8],
    ) -> Result<tandem_sdk::Vote, tandem_sdk::HandlerError> {
        Ok(tandem_sdk::Vote::yes())
    }
    async fn confirm(
        &self,
        _: &tandem_sdk::BranchContext,
        _: &[u8],
    ) -> Result<(), tandem_sdk::HandlerError> {
        Err(tandem_sdk::HandlerError::permanent("account 7 is closed"))
    }
    async fn cancel(
        &self,
        _: &tandem_sdk::BranchContext,
        _: &[u8],
    ) -> Result<(), tandem_sdk::HandlerError> {
        Ok(())
    }
}

// The Rust SDK's way to say it: HandlerError::permanent.
#[tokio::test]
async fn an_sdk_handler_can_say_permanent() {
    let dir = tempfile::tempdir().expect("dir");
    let coord = start(dir.path()).await;
    let p =
        tandem_tests::spawn(tandem_sdk::ParticipantServer::new().tcc("r", Arc::new(Closed))).await;
    let out = submit(&coord, pb::Mode::Tcc, &p.url()).await;
    stuck_within(&coord, &out.gtid, Duration::from_secs(2)).await;
    let info = get(&coord, &out.gtid).await;
    assert!(
        info.branches[0].last_error.contains("account 7 is closed"),
        "{}",
        info.branches[0].last_error
    );
}

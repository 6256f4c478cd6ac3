//! Security of transactional messages and sagas: roles, the participant
//! allowlist and the participant's caller check for PrepareMessage /
//! SubmitMessage, Deliver / Check and saga steps, against a real `tandem
//! serve` with mutual TLS, tokens and roles.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tandem_cli::certs::write_dev;
use tandem_proto::v1 as pb;
use tandem_proto::v1::coordinator_client::CoordinatorClient;
use tandem_proto::v1::participant_client::ParticipantClient;
use tandem_sdk::security::{AccessList, BearerToken, ClientTls, ServerTls, ServerTlsFiles};
use tandem_sdk::{
    BranchContext, ClientOptions, HandlerError, Message, MessageCheck, ParticipantServer, Saga,
    Vote,
};
use tandem_tests::process::Serve;
use tandem_tests::spawn;

#[derive(Default)]
struct Counting {
    delivered: AtomicUsize,
    checked: AtomicUsize,
    actions: AtomicUsize,
    compensations: AtomicUsize,
    /// What the check answers.
    committed: std::sync::atomic::AtomicBool,
}

impl Message for Counting {
    async fn deliver(&self, _: &BranchContext, _: &[u8]) -> Result<(), HandlerError> {
        self.delivered.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

impl MessageCheck for Counting {
    async fn check(&self, _: &BranchContext, _: &[u8]) -> Result<bool, HandlerError> {
        self.checked.fetch_add(1, Ordering::SeqCst);
        Ok(self.committed.load(Ordering::SeqCst))
    }
}

impl Saga for Counting {
    async fn action(&self, _: &BranchContext, _: &[u8]) -> Result<Vote, HandlerError> {
        self.actions.fetch_add(1, Ordering::SeqCst);
        Ok(Vote::yes())
    }
    async fn compensate(&self, _: &BranchContext, _: &[u8]) -> Result<(), HandlerError> {
        self.compensations.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

impl Counting {
    fn total(&self) -> usize {
        self.delivered.load(Ordering::SeqCst)
            + self.checked.load(Ordering::SeqCst)
            + self.actions.load(Ordering::SeqCst)
            + self.compensations.load(Ordering::SeqCst)
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    certs: PathBuf,
    serve: Serve,
    part: tandem_sdk::RunningParticipant,
    h: Arc<Counting>,
}

fn tls(certs: &Path, party: Option<&str>) -> ClientTls {
    ClientTls {
        ca: Some(certs.join("ca.pem")),
        cert: party.map(|p| certs.join(format!("{p}.pem"))),
        key: party.map(|p| certs.join(format!("{p}-key.pem"))),
        domain: None,
    }
}

fn token(certs: &Path, party: &str) -> BearerToken {
    BearerToken::from_file(&certs.join(format!("{party}.token"))).expect("token")
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("dir");
    let certs = dir.path().join("certs");
    write_dev(&certs).expect("dev certs");
    let f = |name: &str| certs.join(name).to_string_lossy().into_owned();
    let serve = Serve::start_with(
        &dir.path().join("data"),
        &[
            "--tls-cert",
            &f("coordinator.pem"),
            "--tls-key",
            &f("coordinator-key.pem"),
            "--tls-client-ca",
            &f("ca.pem"),
            "--require-client-cert",
            "--auth-file",
            &f("coordinator-access.txt"),
            "--require-tls",
            "--allow-participant",
            "https://127.0.0.1:*",
            "--participant-ca",
            &f("ca.pem"),
            "--participant-cert",
            &f("coordinator.pem"),
            "--participant-key",
            &f("coordinator-key.pem"),
            "--participant-token-file",
            &f("coordinator.token"),
            "--retry-max",
            "200ms",
        ],
        &[],
    );
    let h = Arc::new(Counting::default());
    let part = spawn(
        ParticipantServer::new()
            .tls(
                ServerTls::load(ServerTlsFiles {
                    cert: certs.join("participant.pem"),
                    key: certs.join("participant-key.pem"),
                    client_ca: Some(certs.join("ca.pem")),
                    require_client_cert: false,
                })
                .expect("tls"),
            )
            .only_coordinators(
                AccessList::load(&certs.join("participant-access.txt")).expect("access"),
            )
            .message("inbox", h.clone())
            .check("orders", h.clone())
            .saga("s", h.clone()),
    )
    .await;
    Setup {
        _dir: dir,
        certs,
        serve,
        part,
        h,
    }
}

type Coord = CoordinatorClient<
    tonic::service::interceptor::InterceptedService<tandem_sdk::Channel, BearerToken>,
>;

async fn coord(s: &Setup, cert: Option<&str>, tok: BearerToken) -> Coord {
    let url = format!("https://{}", s.serve.addr());
    let channel = tandem_sdk::security::endpoint(&url, Some(&tls(&s.certs, cert)))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    CoordinatorClient::with_interceptor(channel, tok)
}

fn spec(endpoint: &str, resource: &str) -> pb::BranchSpec {
    pb::BranchSpec {
        endpoint: endpoint.into(),
        resource: resource.into(),
        payload: b"x".to_vec().into(),
        mode: 0,
        after: vec![],
    }
}

fn prepare(gtid: &str, check: &str, delivery: &str) -> pb::PrepareMessageRequest {
    pb::PrepareMessageRequest {
        gtid: gtid.into(),
        check: Some(spec(check, "orders")),
        branches: vec![spec(delivery, "inbox")],
        timeout_ms: 60_000,
        labels: Default::default(),
    }
}

fn saga(endpoints: &[&str]) -> pb::SubmitRequest {
    pb::SubmitRequest {
        mode: pb::Mode::Saga as i32,
        timeout_ms: 0,
        branches: endpoints.iter().map(|e| spec(e, "s")).collect(),
        gtid: String::new(),
        labels: Default::default(),
    }
}

// Roles: PrepareMessage, SubmitMessage and a MODE_SAGA Submit need the
// client role; the participant and admin roles, and a certificate the
// access list does not name, are refused before any participant is called.
// A client credential cannot use Admin's retry, abort or resolve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_rpcs_need_the_client_role() {
    let s = setup().await;
    let url = s.part.url();
    // A message prepared by the client, to submit as the others.
    let mut client = coord(&s, Some("client"), token(&s.certs, "client")).await;
    let g = uuid::Uuid::now_v7().to_string();
    client
        .prepare_message(prepare(&g, &url, &url))
        .await
        .expect("client prepares");
    for (who, cert, tok, want) in [
        (
            "participant",
            "participant",
            token(&s.certs, "participant"),
            tonic::Code::PermissionDenied,
        ),
        (
            "admin",
            "admin",
            token(&s.certs, "admin"),
            tonic::Code::PermissionDenied,
        ),
        (
            "an unnamed certificate, no token",
            "coordinator",
            BearerToken::none(),
            tonic::Code::Unauthenticated,
        ),
    ] {
        let mut c = coord(&s, Some(cert), tok).await;
        let fresh = uuid::Uuid::now_v7().to_string();
        let got = [
            (
                "PrepareMessage",
                c.prepare_message(prepare(&fresh, &url, &url))
                    .await
                    .map(drop),
            ),
            (
                "SubmitMessage",
                c.submit_message(pb::SubmitMessageRequest { gtid: g.clone() })
                    .await
                    .map(drop),
            ),
            ("Submit saga", c.submit(saga(&[&url, &url])).await.map(drop)),
        ];
        for (rpc, r) in got {
            let code = r.err().map(|s| s.code());
            assert_eq!(code, Some(want), "{who}: {rpc}");
        }
    }
    assert_eq!(s.h.total(), 0, "a refused call reached the participant");

    // The client on Admin: retry, abort, resolve all refused.
    let options = ClientOptions {
        tls: Some(tls(&s.certs, Some("client"))),
        token: token(&s.certs, "client"),
    };
    let mut admin =
        tandem_coordinator::cli::connect(&format!("https://{}", s.serve.addr()), &options)
            .await
            .expect("connect");
    let codes = [
        admin
            .retry_transaction(pb::RetryTransactionRequest { gtid: g.clone() })
            .await
            .map(drop)
            .map_err(|e| e.code()),
        admin
            .abort_transaction(pb::AbortTransactionRequest {
                gtid: g.clone(),
                reason: "x".into(),
            })
            .await
            .map(drop)
            .map_err(|e| e.code()),
        admin
            .resolve_branch(pb::ResolveBranchRequest {
                gtid: g.clone(),
                branch_id: 1,
                outcome: pb::Decision::Abort as i32,
                reason: "x".into(),
            })
            .await
            .map(drop)
            .map_err(|e| e.code()),
    ];
    for c in codes {
        assert_eq!(c, Err(tonic::Code::PermissionDenied));
    }
    // Still undecided: nothing was delivered or checked.
    assert_eq!(s.h.total(), 0);
}

/// A loopback listener that counts connections (nothing answers).
async fn counting_listener() -> (u16, Arc<AtomicUsize>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = l.local_addr().expect("addr").port();
    let n = Arc::new(AtomicUsize::new(0));
    let seen = n.clone();
    tokio::spawn(async move {
        while let Ok((c, _)) = l.accept().await {
            seen.fetch_add(1, Ordering::SeqCst);
            drop(c);
        }
    });
    (port, n)
}

// The allowlist (and --require-tls) apply to a message's check endpoint,
// to its deliveries and to saga steps: PERMISSION_DENIED, nothing dialled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_allowlist_covers_checks_deliveries_and_saga_steps() {
    let s = setup().await;
    let good = s.part.url();
    let (port, dialled) = counting_listener().await;
    let outside = [
        format!("https://localhost:{port}"),
        format!("http://127.0.0.1:{port}"),
    ];
    let mut c = coord(&s, Some("client"), token(&s.certs, "client")).await;
    for bad in &outside {
        let g = || uuid::Uuid::now_v7().to_string();
        let results = [
            (
                "check outside",
                c.prepare_message(prepare(&g(), bad, &good)).await.map(drop),
            ),
            (
                "delivery outside",
                c.prepare_message(prepare(&g(), &good, bad)).await.map(drop),
            ),
            (
                "saga step outside",
                c.submit(saga(&[&good, bad])).await.map(drop),
            ),
        ];
        for (what, r) in results {
            assert_eq!(
                r.err().map(|e| e.code()),
                Some(tonic::Code::PermissionDenied),
                "{what}: {bad}"
            );
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        dialled.load(Ordering::SeqCst),
        0,
        "an endpoint outside the policy was dialled"
    );
    assert_eq!(s.h.total(), 0, "the first step of the refused saga ran");
}

// The participant's caller check covers Deliver and Check as it covers
// Prepare / Try: nobody but the coordinator makes a delivery run or a
// check answer (a PgMessages check writes a 'not committed' row).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn participants_obey_only_the_coordinator_for_deliver_and_check() {
    let s = setup().await;
    let req = pb::BranchRequest {
        gtid: uuid::Uuid::now_v7().to_string(),
        branch_id: 1,
        resource: "orders".into(),
        payload: b"x".to_vec().into(),
        attempt: 1,
        epoch: 1,
        mode: 0,
    };
    for (who, cert, tok) in [
        ("nobody", None, BearerToken::none()),
        ("client token", None, token(&s.certs, "client")),
        ("client cert", Some("client"), BearerToken::none()),
        (
            "participant cert+token",
            Some("participant"),
            token(&s.certs, "participant"),
        ),
        ("admin token", Some("admin"), token(&s.certs, "admin")),
    ] {
        let channel = tandem_sdk::security::endpoint(&s.part.url(), Some(&tls(&s.certs, cert)))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect");
        let mut rpc = ParticipantClient::with_interceptor(channel, tok);
        let check = rpc.check(req.clone()).await.map(drop).map_err(|e| e.code());
        let mut d = req.clone();
        d.resource = "inbox".into();
        d.branch_id = 2;
        let deliver = rpc.deliver(d).await.map(drop).map_err(|e| e.code());
        let mut t = req.clone();
        t.resource = "s".into();
        let action = rpc.r#try(t.clone()).await.map(drop).map_err(|e| e.code());
        let comp = rpc.cancel(t).await.map(drop).map_err(|e| e.code());
        for (rpc, r) in [
            ("check", check),
            ("deliver", deliver),
            ("saga action", action),
            ("compensate", comp),
        ] {
            assert!(
                matches!(
                    r,
                    Err(tonic::Code::Unauthenticated | tonic::Code::PermissionDenied)
                ),
                "{who}: {rpc}: {r:?}"
            );
        }
    }
    assert_eq!(s.h.total(), 0, "a stranger's call ran a handler");
}

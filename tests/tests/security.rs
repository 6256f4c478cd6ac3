//! Security at every hop, with real TLS handshakes and certificates made
//! here: who may call the coordinator, who a participant obeys, which
//! endpoints the coordinator dials, and certificates replaced while
//! transactions are in flight.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tandem_cli::certs::{DevCa, party_names, write_dev};
use tandem_coordinator::RunningCoordinator;
use tandem_coordinator::log::MemLog;
use tandem_coordinator::runtime::Environment;
use tandem_coordinator::security::{
    AccessControl, ParticipantAccess, ServeSecurityArgs, ServerSecurity,
};
use tandem_proto::v1 as pb;
use tandem_proto::v1::participant_client::ParticipantClient;
use tandem_sdk::security::{AccessList, BearerToken, ClientTls, ServerTls, ServerTlsFiles};
use tandem_sdk::{Branch, ClientOptions, Error, Mode, ParticipantServer, TransactionClient};
use tandem_tests::{Scripted, spawn, test_config};

/// Development files (CA, certificates, tokens, access lists) in a temp dir.
struct Dev {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl Dev {
    fn new() -> Dev {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("certs");
        write_dev(&path).expect("dev certs");
        Dev { _dir: dir, path }
    }

    fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    fn token(&self, party: &str) -> String {
        std::fs::read_to_string(self.file(&format!("{party}.token")))
            .expect("token")
            .trim()
            .to_string()
    }

    fn server_files(&self, party: &str, require_client_cert: bool) -> ServerTlsFiles {
        ServerTlsFiles {
            cert: self.file(&format!("{party}.pem")),
            key: self.file(&format!("{party}-key.pem")),
            client_ca: Some(self.file("ca.pem")),
            require_client_cert,
        }
    }

    /// Client TLS of `party` (mutual TLS), or CA only.
    fn client_tls(&self, party: Option<&str>) -> ClientTls {
        ClientTls {
            ca: Some(self.file("ca.pem")),
            cert: party.map(|p| self.file(&format!("{p}.pem"))),
            key: party.map(|p| self.file(&format!("{p}-key.pem"))),
            domain: None,
        }
    }

    fn options(&self, cert_of: Option<&str>, token_of: Option<&str>) -> ClientOptions {
        ClientOptions {
            tls: Some(self.client_tls(cert_of)),
            token: token_of
                .map(|p| BearerToken::new(&self.token(p)).expect("token"))
                .unwrap_or_default(),
        }
    }

    /// How the coordinator calls participants: its certificate and token.
    fn participant_access(&self) -> ParticipantAccess {
        ParticipantAccess {
            tls: Some(self.client_tls(Some("coordinator"))),
            token: BearerToken::new(&self.token("coordinator")).expect("token"),
            token_file: None,
        }
    }

    fn coordinator_security(&self, require_client_cert: bool) -> ServerSecurity {
        ServerSecurity {
            tls: Some(
                ServerTls::load(self.server_files("coordinator", require_client_cert))
                    .expect("tls"),
            ),
            access: Some(
                AccessControl::load(&self.file("coordinator-access.txt")).expect("access"),
            ),
        }
    }

    /// A participant serving TLS that obeys only the coordinator.
    async fn participant(
        &self,
        scripted: &Arc<Scripted>,
        tcc: bool,
    ) -> tandem_sdk::RunningParticipant {
        let server = ParticipantServer::new()
            .tls(ServerTls::load(self.server_files("participant", false)).expect("tls"))
            .only_coordinators(
                AccessList::load(&self.file("participant-access.txt")).expect("access"),
            );
        let server = if tcc {
            server.tcc("r", scripted.clone())
        } else {
            server.two_phase("r", scripted.clone())
        };
        spawn(server).await
    }

    async fn coordinator(&self, require_client_cert: bool) -> RunningCoordinator {
        let env = Environment {
            participants: self.participant_access(),
            ..Environment::default()
        };
        RunningCoordinator::start_with(
            secure_config(),
            Arc::new(MemLog::new()),
            env,
            self.coordinator_security(require_client_cert),
        )
        .await
        .expect("start coordinator")
    }
}

/// [`test_config`] calling only TLS participants on loopback: the
/// allowlist a coordinator holding a participant token needs.
fn secure_config() -> tandem_coordinator::config::CoordinatorConfig {
    let mut config = test_config();
    config.allowed_endpoints = vec!["https://127.0.0.1:*".parse().expect("pattern")];
    config
}

fn code(e: &Error) -> Option<tonic::Code> {
    match e {
        Error::Rpc(s) => Some(s.code()),
        Error::Invalid { code, .. } => Some(*code),
        _ => None,
    }
}

// Rule: a plaintext client gets nothing from a TLS coordinator; a client
// certificate from another CA is refused in the handshake.
#[tokio::test]
async fn plaintext_and_foreign_certificates_are_refused() {
    let dev = Dev::new();
    let coord = dev.coordinator(true).await;
    let plain = format!("http://{}", coord.addr);
    let c = TransactionClient::connect(&plain).await;
    let refused = match c {
        Err(_) => true,
        Ok(c) => c.submit(Mode::TwoPhase, vec![]).await.is_err(),
    };
    assert!(refused, "a plaintext client was served");

    // Another CA's certificate, named like the real client.
    let other = tempfile::tempdir().expect("tempdir");
    let ca = DevCa::new("another CA").expect("ca");
    let issued = ca.issue(&["client.tandem.local"]).expect("issue");
    std::fs::write(other.path().join("c.pem"), issued.cert_pem).expect("write");
    std::fs::write(other.path().join("k.pem"), issued.key_pem).expect("write");
    let options = ClientOptions {
        tls: Some(ClientTls {
            ca: Some(dev.file("ca.pem")),
            cert: Some(other.path().join("c.pem")),
            key: Some(other.path().join("k.pem")),
            domain: None,
        }),
        token: BearerToken::none(),
    };
    let r = match TransactionClient::connect_with(coord.url(), &options).await {
        Err(e) => Err(e),
        Ok(c) => c.get(uuid::Uuid::now_v7()).await.map(drop),
    };
    assert!(r.is_err(), "a certificate from another CA was accepted");

    // The right certificate is served (NOT_FOUND: it got to the service).
    let c = TransactionClient::connect_with(coord.url(), &dev.options(Some("client"), None))
        .await
        .expect("connect");
    let e = c.get(uuid::Uuid::now_v7()).await.expect_err("unknown gtid");
    assert_eq!(code(&e), Some(tonic::Code::NotFound), "{e:?}");
}

// Rule: no token, an unknown token, or an expired one is UNAUTHENTICATED;
// a client credential on Admin is PERMISSION_DENIED; nothing is started.
#[tokio::test]
async fn tokens_and_roles_are_checked() {
    let dev = Dev::new();
    // Client certificates optional: tokens alone authenticate.
    let mut access = std::fs::read_to_string(dev.file("coordinator-access.txt")).expect("read");
    access.push_str(&format!(
        "client old token-sha256:{} expires=2020-01-01\n",
        tandem_sdk::security::auth::token_digest_hex("tdm_old")
    ));
    std::fs::write(dev.file("coordinator-access.txt"), access).expect("write");
    let coord = dev.coordinator(false).await;
    let p = Scripted::yes("p");
    let part = dev.participant(&p, false).await;
    let branch = || vec![Branch::new(part.url(), "r", "x")];

    for (token, why) in [
        (None, "no token"),
        (Some("tdm_wrong"), "wrong"),
        (Some("tdm_old"), "expired"),
    ] {
        let options = ClientOptions {
            tls: Some(dev.client_tls(None)),
            token: token
                .map(|t| BearerToken::new(t).expect("t"))
                .unwrap_or_default(),
        };
        let c = TransactionClient::connect_with(coord.url(), &options)
            .await
            .expect("connect");
        let e = c.submit(Mode::TwoPhase, branch()).await.expect_err(why);
        assert_eq!(code(&e), Some(tonic::Code::Unauthenticated), "{why}: {e:?}");
    }
    assert_eq!(
        p.counts(),
        (0, 0, 0),
        "a refused call reached a participant"
    );

    // A client token on Admin: denied. The admin token: served.
    for (party, want) in [
        ("client", Err(tonic::Code::PermissionDenied)),
        ("admin", Ok(())),
    ] {
        let options = dev.options(None, Some(party));
        let mut admin = tandem_coordinator::cli::connect(&coord.url(), &options)
            .await
            .expect("connect");
        let got = admin
            .list_transactions(pb::ListTransactionsRequest::default())
            .await
            .map(drop)
            .map_err(|s| s.code());
        assert_eq!(got, want, "{party} on Admin");
    }

    // The participant role may ask outcomes, not start transactions.
    let c = TransactionClient::connect_with(coord.url(), &dev.options(None, Some("participant")))
        .await
        .expect("connect");
    let e = c
        .submit(Mode::TwoPhase, branch())
        .await
        .expect_err("denied");
    assert_eq!(code(&e), Some(tonic::Code::PermissionDenied), "{e:?}");
    c.outcome(uuid::Uuid::now_v7())
        .await
        .expect("participant may ask outcomes");

    // And the client commits through TLS participants that check the
    // coordinator's credential.
    let c = TransactionClient::connect_with(coord.url(), &dev.options(None, Some("client")))
        .await
        .expect("connect");
    c.submit(Mode::TwoPhase, branch()).await.expect("submit");
    assert_eq!(p.counts(), (1, 1, 0));
}

// Rule: a participant obeys only its coordinator: a Commit or Cancel from
// anyone else (no credential, a client's token, a client certificate) is
// refused before the barrier, and the branch does not change.
#[tokio::test]
async fn participants_refuse_calls_not_from_their_coordinator() {
    let dev = Dev::new();
    let coord = dev.coordinator(false).await;
    let p = Scripted::yes("p");
    let part = dev.participant(&p, true).await;
    let client = TransactionClient::connect_with(coord.url(), &dev.options(Some("client"), None))
        .await
        .expect("connect");
    let gtid = client.begin(Mode::Tcc).await.expect("begin");
    client
        .enlist(gtid, Branch::new(part.url(), "r", "x"))
        .await
        .expect("try");
    assert_eq!(p.held_count(), 1);

    let req = pb::BranchRequest {
        gtid: gtid.to_string(),
        branch_id: 1,
        resource: "r".into(),
        payload: b"x".to_vec().into(),
        attempt: 1,
        epoch: 1,
    };
    for (who, options) in [
        ("nobody", dev.options(None, None)),
        ("a client token", dev.options(None, Some("client"))),
        ("a client certificate", dev.options(Some("client"), None)),
    ] {
        let channel = tandem_sdk::security::endpoint(&part.url(), options.tls.as_ref())
            .expect("endpoint")
            .connect()
            .await
            .expect("connect");
        let mut rpc = ParticipantClient::with_interceptor(channel, options.token.clone());
        let cancel = rpc.cancel(req.clone()).await.expect_err(who).code();
        let confirm = rpc.confirm(req.clone()).await.expect_err(who).code();
        for c in [cancel, confirm] {
            assert!(
                matches!(
                    c,
                    tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
                ),
                "{who}: {c:?}"
            );
        }
    }
    assert_eq!(p.counts(), (1, 0, 0), "the branch changed");
    assert_eq!(p.held_count(), 1);
    // Its coordinator still finishes it.
    client.commit(gtid).await.expect("commit");
    assert_eq!(p.counts(), (1, 1, 0));
}

/// A listener that counts the connections it accepts (and drops them).
async fn counting_listener() -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepts = Arc::new(AtomicUsize::new(0));
    let counted = accepts.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            drop(s);
        }
    });
    (addr.to_string(), accepts)
}

// Rule: a branch outside the participant allowlist is PERMISSION_DENIED
// before any connection is opened, and the refusal does not echo the
// address; with --require-tls an http:// endpoint is refused the same way.
#[tokio::test]
async fn endpoints_outside_the_policy_are_never_dialled() {
    let (addr, accepts) = counting_listener().await;
    let mut config = test_config();
    config.allowed_endpoints = vec!["https://*.bank.internal:*".parse().expect("pattern")];
    let coord = RunningCoordinator::start(config, Arc::new(MemLog::new()))
        .await
        .expect("start");
    let client = TransactionClient::connect(coord.url())
        .await
        .expect("connect");
    for endpoint in [format!("http://{addr}"), format!("https://{addr}")] {
        let e = client
            .submit(
                Mode::TwoPhase,
                vec![Branch::new(endpoint.clone(), "r", "x")],
            )
            .await
            .expect_err("outside the policy");
        assert_eq!(code(&e), Some(tonic::Code::PermissionDenied), "{e:?}");
        assert!(!e.to_string().contains(&addr), "echoed the address: {e}");
        let gtid = client.begin(Mode::Tcc).await.expect("begin");
        let e = client
            .enlist(gtid, Branch::new(endpoint, "r", "x"))
            .await
            .expect_err("outside the policy");
        assert_eq!(code(&e), Some(tonic::Code::PermissionDenied), "{e:?}");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(accepts.load(Ordering::SeqCst), 0, "the coordinator dialled");

    // --require-tls: no http:// participant, whatever the allowlist.
    let mut config = test_config();
    config.require_tls = true;
    let coord = RunningCoordinator::start(config, Arc::new(MemLog::new()))
        .await
        .expect("start");
    let client = TransactionClient::connect(coord.url())
        .await
        .expect("connect");
    let e = client
        .submit(
            Mode::TwoPhase,
            vec![Branch::new(format!("http://{addr}"), "r", "x")],
        )
        .await
        .expect_err("plaintext participant");
    assert_eq!(code(&e), Some(tonic::Code::PermissionDenied), "{e:?}");
    assert_eq!(accepts.load(Ordering::SeqCst), 0);
}

// Rule: an https:// endpoint whose server speaks plaintext is never
// called in cleartext: the call fails, the participant sees no request.
#[tokio::test]
async fn an_https_endpoint_is_never_called_in_cleartext() {
    let dev = Dev::new();
    let coord = dev.coordinator(false).await;
    let p = Scripted::yes("p");
    let plain = p.serve().await; // plaintext participant
    let client = TransactionClient::connect_with(coord.url(), &dev.options(None, Some("client")))
        .await
        .expect("connect");
    let endpoint = format!("https://{}", plain.addr);
    let out = client
        .submit(Mode::TwoPhase, vec![Branch::new(endpoint, "r", "x")])
        .await;
    assert!(
        matches!(out, Err(Error::Aborted { .. })),
        "expected an abort, got {out:?}"
    );
    assert_eq!(
        p.counts(),
        (0, 0, 0),
        "the participant was called in cleartext"
    );
}

fn copy(from: &Path, to: &Path) {
    std::fs::copy(from, to).expect("copy");
}

// Rule: replacing the coordinator's certificate (SIGHUP or a changed file)
// serves new connections with the new one while a transaction in flight
// on an old connection finishes; an expired certificate is refused at
// start and on reload, keeping the one in use.
#[tokio::test]
async fn certificates_reload_without_dropping_transactions() {
    let dev = Dev::new();
    let live = tempfile::tempdir().expect("tempdir");
    let (cert, key) = (live.path().join("c.pem"), live.path().join("k.pem"));
    copy(&dev.file("coordinator.pem"), &cert);
    copy(&dev.file("coordinator-key.pem"), &key);
    let tls = ServerTls::load(ServerTlsFiles {
        cert: cert.clone(),
        key: key.clone(),
        client_ca: Some(dev.file("ca.pem")),
        require_client_cert: false,
    })
    .expect("tls");
    let security = ServerSecurity {
        tls: Some(tls.clone()),
        access: Some(AccessControl::load(&dev.file("coordinator-access.txt")).expect("access")),
    };
    let env = Environment {
        participants: dev.participant_access(),
        ..Environment::default()
    };
    let mut config = secure_config();
    config.call_timeout = Duration::from_secs(5);
    let coord = RunningCoordinator::start_with(config, Arc::new(MemLog::new()), env, security)
        .await
        .expect("start");
    // A participant slow to vote keeps a transaction in flight.
    let slow = Scripted::new(
        "slow",
        tandem_tests::Script {
            prepare_delay: Duration::from_millis(800),
            ..tandem_tests::Script::default()
        },
        None,
    );
    let part = dev.participant(&slow, false).await;
    let old = TransactionClient::connect_with(coord.url(), &dev.options(None, Some("client")))
        .await
        .expect("connect");
    let in_flight = {
        let old = old.clone();
        let branch = Branch::new(part.url(), "r", "x");
        tokio::spawn(async move { old.submit(Mode::TwoPhase, vec![branch]).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;

    // A new CA and certificate replace the old ones.
    let new_dir = tempfile::tempdir().expect("tempdir");
    let ca2 = DevCa::new("second CA").expect("ca");
    let names = party_names("coordinator");
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let issued = ca2.issue(&names).expect("issue");
    std::fs::write(new_dir.path().join("ca.pem"), ca2.pem()).expect("write");
    std::fs::write(&cert, issued.cert_pem).expect("write");
    std::fs::write(&key, issued.key_pem).expect("write");
    tls.reload().expect("reload");

    let submitted = in_flight.await.expect("join").expect("in-flight submit");
    assert!(
        submitted.complete,
        "the in-flight transaction did not finish"
    );
    // New connections: the old CA no longer verifies, the new one does.
    let stale =
        TransactionClient::connect_with(coord.url(), &dev.options(None, Some("client"))).await;
    let stale_ok = match stale {
        Err(_) => false,
        Ok(c) => c.get(uuid::Uuid::now_v7()).await.is_ok(),
    };
    assert!(!stale_ok, "a new connection still got the old certificate");
    let options = ClientOptions {
        tls: Some(ClientTls {
            ca: Some(new_dir.path().join("ca.pem")),
            ..ClientTls::default()
        }),
        token: BearerToken::new(&dev.token("client")).expect("token"),
    };
    let fresh = TransactionClient::connect_with(coord.url(), &options)
        .await
        .expect("connect with the new CA");
    let e = fresh.get(uuid::Uuid::now_v7()).await.expect_err("unknown");
    assert_eq!(code(&e), Some(tonic::Code::NotFound), "{e:?}");

    // An expired certificate: refused on reload (the current one stays)
    // and at start, with the date in the message.
    let now = time::OffsetDateTime::now_utc();
    let expired = ca2
        .issue_between(
            &names,
            now - Duration::from_secs(3 * 86400),
            now - Duration::from_secs(86400),
        )
        .expect("issue");
    std::fs::write(&cert, expired.cert_pem).expect("write");
    std::fs::write(&key, expired.key_pem).expect("write");
    let e = tls.reload().expect_err("expired");
    assert!(e.to_string().contains("expired"), "{e}");
    fresh
        .get(uuid::Uuid::now_v7())
        .await
        .expect_err("still served (NOT_FOUND)");
    let args = ServeSecurityArgs {
        tls_cert: Some(cert.clone()),
        tls_key: Some(key.clone()),
        ..ServeSecurityArgs::default()
    };
    let e = args.load().err().expect("expired at start");
    assert!(e.contains("expired"), "{e}");
    drop(coord);
}

// Rule: the whole bank demo runs with mutual TLS and tokens on every hop
// (coordinator, both shards, the client), by 2PC and by TCC, and
// conserves the money.
#[tokio::test]
async fn the_bank_demo_runs_with_mutual_tls_and_tokens() {
    for mode in [Mode::TwoPhase, Mode::Tcc] {
        let report = tandem_cli::demo::run(tandem_cli::demo::DemoOptions {
            mode,
            transfers: 120,
            concurrency: 16,
            secure: true,
            ..tandem_cli::demo::DemoOptions::default()
        })
        .await
        .expect("demo");
        assert!(report.ok(), "{report}");
        assert!(report.committed > 0, "{report}");
        assert!(report.coordinator.starts_with("https://"), "{report}");
        assert!(report.shards.iter().all(|s| s.starts_with("https://")));
    }
}

/// A plaintext server that answers as a participant voting yes and
/// records the `authorization` header of every call it gets: what an
/// endpoint a client names would learn from the coordinator.
async fn recording_participant() -> (String, Arc<std::sync::Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = {
        let seen = seen.clone();
        move |req: tonic::Request<()>| {
            if let Some(v) = req.metadata().get("authorization") {
                let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
                seen.lock().expect("seen").push(v);
            }
            Ok(req)
        }
    };
    let participant = ParticipantServer::new().two_phase("r", Scripted::yes("evil"));
    tokio::spawn(
        tonic::transport::Server::builder()
            .layer(tonic::service::InterceptorLayer::new(record))
            .add_service(
                participant
                    .into_service()
                    .expect("one handler per resource"),
            )
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    (format!("http://{addr}"), seen)
}

// Rule: the coordinator's participant token is a credential every
// participant obeys; it goes only to the participants the allowlist
// names. A coordinator holding one does not start without an allowlist,
// so a client cannot name its own endpoint and collect the token.
#[tokio::test]
async fn the_participant_token_never_reaches_an_endpoint_a_client_names() {
    let dev = Dev::new();
    let (evil, seen) = recording_participant().await;
    let env = Environment {
        participants: dev.participant_access(),
        ..Environment::default()
    };
    let started = RunningCoordinator::start_with(
        test_config(),
        Arc::new(MemLog::new()),
        env,
        dev.coordinator_security(false),
    )
    .await;
    let coord = match started {
        Err(e) => {
            assert!(e.to_string().contains("allow"), "{e}");
            return;
        }
        Ok(coord) => coord,
    };
    // Had it started: any client names its own endpoint...
    let client = TransactionClient::connect_with(coord.url(), &dev.options(None, Some("client")))
        .await
        .expect("connect");
    let _ = client
        .submit(Mode::TwoPhase, vec![Branch::new(evil, "r", "x")])
        .await;
    let token = dev.token("coordinator");
    let leaked = seen
        .lock()
        .expect("seen")
        .iter()
        .any(|v| v.contains(&token));
    assert!(
        !leaked,
        "the coordinator sent its participant token to an endpoint a client named"
    );
}

// Rule: a participant that obeys only its coordinator refuses anyone else
// on the request's headers, before reading its message: a stranger cannot
// make it wait for (and buffer) a message of up to 64 MiB per call.
#[tokio::test]
async fn participants_refuse_strangers_before_reading_their_message() {
    let dev = Dev::new();
    let p = Scripted::yes("p");
    let part = spawn(
        ParticipantServer::new()
            .two_phase("r", p.clone())
            .only_coordinators(
                AccessList::load(&dev.file("participant-access.txt")).expect("access"),
            ),
    )
    .await;
    let channel = tonic::transport::Endpoint::from_shared(part.url())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    // The call's headers go out; its message never comes.
    let never = tonic::Request::new(tokio_stream::pending::<pb::BranchRequest>());
    let codec = tonic_prost::ProstCodec::<pb::BranchRequest, pb::AckResponse>::default();
    let path =
        tonic::codegen::http::uri::PathAndQuery::from_static("/tandem.v1.Participant/Commit");
    let answer = tokio::time::timeout(
        Duration::from_secs(3),
        grpc.client_streaming(never, path, codec),
    )
    .await
    .expect("no answer: the participant waits for the message of a caller it refuses");
    assert_eq!(
        answer.map(drop).map_err(|s| s.code()),
        Err(tonic::Code::Unauthenticated)
    );
    assert_eq!(p.counts(), (0, 0, 0));
}

// Rule: an access file that cannot be used when reloaded — a bad line, or
// one granting nothing (say, truncated while being rewritten) — leaves the
// list in use in force, as at start, where both are refused.
#[test]
fn a_bad_access_file_on_reload_keeps_the_list_in_use() {
    let dev = Dev::new();
    let path = dev.file("coordinator-access.txt");
    let access = AccessControl::load(&path).expect("load");
    let security = ServerSecurity {
        tls: None,
        access: Some(access.clone()),
    };
    let bearer = format!("Bearer {}", dev.token("admin"));
    let admin = || {
        access.shared().read().expect("list").check(
            Some(bearer.as_bytes()),
            None,
            tandem_sdk::security::Role::Admin,
        )
    };
    for bad in ["client x\n", "", "# nothing granted yet\n"] {
        std::fs::write(&path, bad).expect("write");
        assert!(AccessControl::load(&path).is_err(), "{bad:?} at start");
        security.reload(true);
        assert_eq!(admin(), Ok("admin".into()), "after reloading {bad:?}");
    }
}

// Rule: TLS settings with an http:// address are refused rather than
// ignored: the call would go, token included, in cleartext.
#[tokio::test]
async fn tls_settings_with_an_http_address_are_refused() {
    let dev = Dev::new();
    let coord = RunningCoordinator::start(test_config(), Arc::new(MemLog::new()))
        .await
        .expect("start");
    let options = dev.options(Some("client"), Some("client"));
    let plain = format!("http://{}", coord.addr);
    let e = TransactionClient::connect_with(&plain, &options)
        .await
        .expect_err("TLS settings for an http:// address were ignored");
    assert_eq!(code(&e), Some(tonic::Code::InvalidArgument), "{e:?}");
    let e = tandem_coordinator::cli::connect(&plain, &options)
        .await
        .expect_err("tandem tx ignored its TLS flags for an http:// address");
    assert!(e.to_string().contains("https://"), "{e}");
}

// Rule: one host holding connections open without ever finishing a TLS
// handshake takes only its share of the handshake slots: a client from
// another host still connects and is served.
#[tokio::test]
async fn one_host_cannot_take_every_tls_handshake_slot() {
    let dev = Dev::new();
    let tls = ServerTls::load(dev.server_files("participant", false))
        .expect("tls")
        .handshake_limits(16, 4);
    let p = Scripted::yes("p");
    let part = spawn(ParticipantServer::new().tls(tls).two_phase("r", p.clone())).await;
    // From 127.0.0.2: connections that never send a byte.
    let mut idle = Vec::new();
    for _ in 0..20 {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind("127.0.0.2:0".parse().expect("addr"))
            .expect("bind 127.0.0.2");
        idle.push(socket.connect(part.addr).await.expect("connect"));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // From 127.0.0.1: a client completes its handshake and is answered.
    let channel = tandem_sdk::security::endpoint(&part.url(), Some(&dev.client_tls(None)))
        .expect("endpoint")
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .expect("a client from another host could not connect");
    let vote = ParticipantClient::new(channel)
        .prepare(pb::BranchRequest {
            gtid: uuid::Uuid::now_v7().to_string(),
            branch_id: 1,
            resource: "r".into(),
            payload: b"x".to_vec().into(),
            attempt: 1,
            epoch: 1,
        })
        .await
        .expect("prepare");
    assert!(vote.into_inner().yes);
    drop(idle);
}

// Rule: `tandem serve` says so when bearer tokens would cross the network
// in cleartext: an access file without TLS on its listener, and a
// participant token allowed to go to http:// participants.
#[test]
fn serving_tokens_in_cleartext_is_warned() {
    use std::io::{BufRead, BufReader, Read};
    let dev = Dev::new();
    let data = tempfile::tempdir().expect("data dir");
    let path = |p: &Path| p.to_string_lossy().into_owned();
    let (data_dir, auth, token) = (
        path(data.path()),
        path(&dev.file("coordinator-access.txt")),
        path(&dev.file("coordinator.token")),
    );
    let mut child = std::process::Command::new(tandem_tests::process::tandem_bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir", &data_dir])
        .args(["--auth-file", &auth, "--participant-token-file", &token])
        .args(["--allow-participant", "http://127.0.0.1:*"])
        .env("RUST_LOG", "warn")
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn tandem serve");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read");
    child.kill().expect("kill");
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("read stderr");
    let _ = child.wait();
    assert!(line.starts_with("listening on"), "{line}\n{stderr}");
    assert!(
        stderr.contains("--auth-file without --tls-cert"),
        "no warning about client tokens in cleartext:\n{stderr}"
    );
    assert!(
        stderr.contains("participant token") && stderr.contains("http://"),
        "no warning about the participant token in cleartext:\n{stderr}"
    );
    assert!(!stderr.contains(&dev.token("coordinator")), "{stderr}");
}

// Rule: the participant policy holds for transactions already in the log:
// after a restart with an allowlist, recovery does not call (nor send the
// participant token to) an endpoint a branch named before it.
#[tokio::test]
async fn recovery_does_not_call_endpoints_outside_the_policy() {
    let dev = Dev::new();
    let (evil, seen) = recording_participant().await;
    let log: Arc<MemLog> = Arc::new(MemLog::new());
    // Before: no allowlist, no token; a transaction enlists `evil` and
    // stays undecided.
    let before = RunningCoordinator::start(test_config(), log.clone())
        .await
        .expect("start");
    let client = TransactionClient::connect(before.url())
        .await
        .expect("connect");
    let gtid = client.begin(Mode::TwoPhase).await.expect("begin");
    client
        .enlist(gtid, Branch::new(evil, "r", "x"))
        .await
        .expect("prepare");
    before.shutdown().await.expect("shutdown");
    // After: an allowlist and a participant token. Recovery aborts the
    // transaction; its rollback must not go to `evil`.
    let env = Environment {
        participants: dev.participant_access(),
        ..Environment::default()
    };
    let after = RunningCoordinator::start_with(
        secure_config(),
        log.clone(),
        env,
        ServerSecurity::default(),
    )
    .await
    .expect("restart");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let token = dev.token("coordinator");
    let leaked = seen
        .lock()
        .expect("seen")
        .iter()
        .any(|v| v.contains(&token));
    assert!(
        !leaked,
        "recovery sent the participant token to an endpoint outside the allowlist"
    );
    let record = after.coordinator.get(gtid).expect("record");
    assert!(
        record
            .branches
            .iter()
            .any(|b| b.last_error.contains("allowed")),
        "{record:?}"
    );
}

// Rule: `tandem certs dev` leaves keys and tokens readable by their owner
// only, even over files already there, and never writes through a link
// planted in the directory.
#[test]
fn dev_keys_and_tokens_are_private_even_over_existing_files() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("certs");
    std::fs::create_dir(&out).expect("mkdir");
    let open = std::fs::Permissions::from_mode(0o644);
    for name in ["admin-key.pem", "admin.token"] {
        std::fs::write(out.join(name), "old").expect("write");
        std::fs::set_permissions(out.join(name), open.clone()).expect("chmod");
    }
    let elsewhere = dir.path().join("elsewhere");
    std::fs::write(&elsewhere, "untouched").expect("write");
    std::os::unix::fs::symlink(&elsewhere, out.join("client.token")).expect("symlink");
    write_dev(&out).expect("dev certs");
    for name in ["admin-key.pem", "admin.token", "client.token"] {
        let meta = std::fs::symlink_metadata(out.join(name)).expect("meta");
        assert!(meta.is_file(), "{name} is not a plain file");
        assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{name}");
    }
    assert_eq!(
        std::fs::read_to_string(&elsewhere).expect("read"),
        "untouched"
    );
}

// Rule: `tandem serve` with a participant token and no allowlist stops
// before it listens, saying why.
#[test]
fn serve_refuses_a_participant_token_without_an_allowlist() {
    let dev = Dev::new();
    let data = tempfile::tempdir().expect("data dir");
    let data_dir = data.path().to_string_lossy().into_owned();
    let token = dev.file("coordinator.token").to_string_lossy().into_owned();
    let ran = tandem_tests::process::tandem(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        &data_dir,
        "--participant-token-file",
        &token,
    ]);
    assert!(!ran.ok, "served: {}", ran.stdout);
    assert!(!ran.stdout.contains("listening on"), "{}", ran.stdout);
    assert!(ran.stderr.contains("--allow-participant"), "{}", ran.stderr);
}

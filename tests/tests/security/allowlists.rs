//! The participant policy: which endpoints the coordinator dials (and
//! sends its participant token to), at the call and in recovery.

use super::*;

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

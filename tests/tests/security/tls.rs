//! TLS on every hop: handshakes refused to plaintext and foreign
//! certificates, https never downgraded, certificates reloaded under load,
//! handshake slots shared fairly, development keys kept private.

use super::*;

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
// (coordinator, both shards, the client), by 2PC, by TCC, by saga and by
// transactional message (the back-check over TLS too), and conserves the
// money.
#[tokio::test]
async fn the_bank_demo_runs_with_mutual_tls_and_tokens() {
    for mode in [Mode::TwoPhase, Mode::Tcc, Mode::Saga, Mode::Msg] {
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
            mode: 0,
        })
        .await
        .expect("prepare");
    assert!(vote.into_inner().yes);
    drop(idle);
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

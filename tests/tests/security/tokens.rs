//! Tokens and roles: who may call the coordinator, and who a participant
//! obeys; access files reloaded safely; cleartext tokens warned about.

use super::*;

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
        mode: 0,
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

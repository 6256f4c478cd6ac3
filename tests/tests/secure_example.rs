//! The example participant users copy, `bank-participant`, run with its
//! security flags as the book's secured local setup runs it
//! (docs/book/src/security.md, "A secured local setup, by hand"): it serves a
//! real `tandem serve` over mutual TLS with tokens, and refuses a plaintext
//! caller, a caller without a client certificate, and any caller that is
//! not its coordinator (no token, or a client's certificate or token).

use std::path::{Path, PathBuf};
use std::process::Child;

use tandem_cli::certs::write_dev;
use tandem_proto::v1 as pb;
use tandem_proto::v1::participant_client::ParticipantClient;
use tandem_sdk::security::{BearerToken, ClientTls};
use tandem_sdk::{Branch, ClientOptions, Mode, TransactionClient};
use tandem_tests::process::{Serve, spawn_listening, workspace_bin};

/// `bank-participant` with the walkthrough's flags; killed when dropped.
struct Shard(Child, String);

impl Shard {
    fn start(certs: &Path, accounts: &str, coordinator: &str) -> Shard {
        let f = |name: &str| certs.join(name).to_string_lossy().into_owned();
        let (child, addr) = spawn_listening(
            &workspace_bin("bank-participant"),
            &[
                "--listen",
                "127.0.0.1:0",
                "--accounts",
                accounts,
                "--tls-cert",
                &f("participant.pem"),
                "--tls-key",
                &f("participant-key.pem"),
                "--tls-client-ca",
                &f("ca.pem"),
                "--require-client-cert",
                "--only-coordinators",
                &f("participant-access.txt"),
                "--coordinator",
                coordinator,
                "--coordinator-ca",
                &f("ca.pem"),
                "--coordinator-token-file",
                &f("participant.token"),
            ],
            &[],
        );
        Shard(child, format!("https://{addr}"))
    }
}

impl Drop for Shard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn token(certs: &Path, party: &str) -> BearerToken {
    BearerToken::from_file(&certs.join(format!("{party}.token"))).expect("token")
}

fn tls(certs: &Path, party: Option<&str>) -> ClientTls {
    ClientTls {
        ca: Some(certs.join("ca.pem")),
        cert: party.map(|p| certs.join(format!("{p}.pem"))),
        key: party.map(|p| certs.join(format!("{p}-key.pem"))),
        domain: None,
    }
}

/// One Cancel sent to `url` as `tls` (none: plaintext) and `token` say:
/// the gRPC code it got (a refused connection is `Unavailable`).
async fn cancel_as(
    url: &str,
    tls: Option<ClientTls>,
    token: BearerToken,
    gtid: &str,
) -> tonic::Code {
    let url = match tls {
        Some(_) => url.to_string(),
        None => url.replacen("https://", "http://", 1),
    };
    let channel = match tandem_sdk::security::endpoint(&url, tls.as_ref())
        .expect("endpoint")
        .connect()
        .await
    {
        Ok(c) => c,
        Err(_) => return tonic::Code::Unavailable,
    };
    let mut rpc = ParticipantClient::with_interceptor(channel, token);
    let req = pb::BranchRequest {
        gtid: gtid.to_string(),
        branch_id: 1,
        resource: "accounts-tcc".into(),
        payload: b"alice:-100".to_vec().into(),
        attempt: 1,
        epoch: 1,
        mode: 0,
    };
    match rpc.cancel(req).await {
        Ok(_) => tonic::Code::Ok,
        Err(status) => status.code(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_secure_bank_participant_serves_only_its_coordinator() {
    let dir = tempfile::tempdir().expect("dir");
    let certs: PathBuf = dir.path().join("certs");
    write_dev(&certs).expect("dev certs");
    let f = |name: &str| certs.join(name).to_string_lossy().into_owned();
    // The coordinator as the secured local setup (docs/book/src/security.md)
    // runs it.
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
        ],
        &[],
    );
    let coordinator = format!("https://{}", serve.addr());
    let (a, b) = (
        Shard::start(&certs, "alice", &coordinator),
        Shard::start(&certs, "bob", &coordinator),
    );
    let client = TransactionClient::connect_with(
        coordinator.clone(),
        &ClientOptions {
            tls: Some(tls(&certs, Some("client"))),
            token: token(&certs, "client"),
        },
    )
    .await
    .expect("connect");

    // The walkthrough's transfer, by the example business service over mutual TLS
    // with its token.
    let transfer = std::process::Command::new(workspace_bin("transfer"))
        .args(["--coordinator", &coordinator, "--ca", &f("ca.pem")])
        .args(["--cert", &f("client.pem"), "--key", &f("client-key.pem")])
        .args(["--token-file", &f("client.token")])
        .args([
            "--from",
            &format!("{}/alice", a.1),
            "--to",
            &format!("{}/bob", b.1),
        ])
        .args(["--amount", "100"])
        .output()
        .expect("run transfer");
    let said = String::from_utf8_lossy(&transfer.stdout);
    assert!(
        transfer.status.success() && said.starts_with("committed "),
        "{said}{}",
        String::from_utf8_lossy(&transfer.stderr)
    );

    // A 2PC transfer through the coordinator commits on both shards.
    let done = client
        .submit(
            Mode::TwoPhase,
            vec![
                Branch::new(a.1.clone(), "accounts", "alice:-100"),
                Branch::new(b.1.clone(), "accounts", "bob:100"),
            ],
        )
        .await
        .expect("2PC transfer");
    assert!(done.complete, "{done:?}");

    // A TCC transfer left tried: strangers cannot cancel it.
    let gtid = client.begin(Mode::Tcc).await.expect("begin");
    client
        .enlist(gtid, Branch::new(a.1.clone(), "accounts-tcc", "alice:-100"))
        .await
        .expect("try alice");
    client
        .enlist(gtid, Branch::new(b.1.clone(), "accounts-tcc", "bob:100"))
        .await
        .expect("try bob");
    let g = gtid.to_string();
    for (who, tls, token, refused) in [
        ("plaintext", None, BearerToken::none(), &[][..]),
        (
            "TLS without a client certificate",
            Some(tls(&certs, None)),
            token(&certs, "coordinator"),
            &[][..],
        ),
        (
            "a client certificate, no token",
            Some(tls(&certs, Some("client"))),
            BearerToken::none(),
            &[tonic::Code::Unauthenticated, tonic::Code::PermissionDenied][..],
        ),
        (
            "a client certificate and token",
            Some(tls(&certs, Some("client"))),
            token(&certs, "client"),
            &[tonic::Code::Unauthenticated, tonic::Code::PermissionDenied][..],
        ),
        (
            "the participant's certificate and token",
            Some(tls(&certs, Some("participant"))),
            token(&certs, "participant"),
            &[tonic::Code::Unauthenticated, tonic::Code::PermissionDenied][..],
        ),
    ] {
        let code = cancel_as(&a.1, tls, token, &g).await;
        // No TLS session at all (empty list): any transport error; else
        // the caller check's own codes.
        let ok = if refused.is_empty() {
            code != tonic::Code::Ok
        } else {
            refused.contains(&code)
        };
        assert!(
            ok,
            "{who}: {code:?}, wanted an error, one of {refused:?} if given"
        );
    }
    // Nothing was cancelled: the coordinator confirms both tries.
    let outcome = client.commit(gtid).await.expect("TCC commit");
    assert!(outcome.complete, "a branch did not confirm");
    drop((a, b));
    let status = tokio::task::spawn_blocking(move || serve.terminate())
        .await
        .expect("stop");
    assert!(status.success(), "{status:?}");
}

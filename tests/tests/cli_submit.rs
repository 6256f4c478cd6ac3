//! A transaction from the command line: `tandem tx submit`, also against a
//! coordinator that requires mutual TLS and a token (with the same flags as
//! the other `tandem tx` verbs), `tandem bench --coordinator` against such
//! a coordinator, and what `tandem tx list` shows for a TCC transfer
//! aborted by a no vote.

use std::sync::Arc;

use tandem_tests::process::{Serve, tandem};
use tandem_tests::{Script, Scripted};

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

fn votes_no(reason: &str) -> Arc<Scripted> {
    let script = Script {
        vote_no: Some(reason.to_string()),
        ..Script::default()
    };
    Scripted::new("no", script, None)
}

// `tx submit` prints the gtid and the outcome: exit code 0 on commit, 1 on
// abort with the reason; a given --gtid is used, and repeating it answers
// the first outcome without running the branches again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tx_submit_prints_the_outcome_and_fails_on_abort() {
    let data = tempfile::tempdir().expect("data dir");
    let serve = Serve::start(data.path());
    let (ok, no) = (Scripted::yes("ok"), votes_no("only 3 seats left"));
    let (p_ok, p_no) = (ok.serve().await, no.serve().await);
    let url = serve.url.clone();
    let (ok_branch, no_branch) = (format!("{}/r/2", p_ok.url()), format!("{}/r/9", p_no.url()));
    let gtid = tandem_sdk::Gtid::now_v7().to_string();

    let committed = tokio::task::spawn_blocking({
        let (url, ok_branch, gtid) = (url.clone(), ok_branch.clone(), gtid.clone());
        move || {
            let args = ["tx", "submit", "--coordinator", &url, "--gtid", &gtid];
            let args = [&args[..], &["--branch", &ok_branch, "--output", "json"]].concat();
            (tandem(&args), tandem(&args))
        }
    })
    .await
    .expect("run");
    for ran in [&committed.0, &committed.1] {
        assert!(ran.ok, "{}", ran.stderr);
        let doc = json(&ran.stdout);
        assert_eq!(doc["outcome"], "committed", "{doc}");
        assert_eq!(doc["gtid"], gtid.as_str(), "{doc}");
    }
    assert_eq!(ok.counts(), (1, 1, 0), "the repeat ran nothing again");

    let aborted = tokio::task::spawn_blocking(move || {
        tandem(&[
            "tx",
            "submit",
            "--coordinator",
            &url,
            "--branch",
            &ok_branch,
            "--branch",
            &no_branch,
        ])
    })
    .await
    .expect("run");
    assert!(!aborted.ok, "an abort exits non-zero: {}", aborted.stdout);
    assert!(
        aborted.stdout.contains(" aborted: ") && aborted.stdout.contains("only 3 seats left"),
        "{}",
        aborted.stdout
    );

    let bad = tandem(&["tx", "submit", "--branch", "127.0.0.1:9001/r/x"]);
    assert!(!bad.ok);
    assert!(
        bad.stderr.contains("ENDPOINT/RESOURCE/PAYLOAD"),
        "{}",
        bad.stderr
    );
}

// A TCC branch that votes no is cancelled, and a cancel that succeeds
// clears the branch's error: `tx list` shows why the transaction aborted
// instead of an empty LAST ERROR.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tx_list_shows_why_a_tcc_transfer_aborted() {
    let data = tempfile::tempdir().expect("data dir");
    let serve = Serve::start(data.path());
    let (ok, no) = (Scripted::yes("ok"), votes_no("insufficient funds"));
    let (p_ok, p_no) = (ok.serve_tcc().await, no.serve_tcc().await);
    let url = serve.url.clone();
    let ran = tokio::task::spawn_blocking(move || {
        let submit = tandem(&[
            "tx",
            "submit",
            "--mode",
            "tcc",
            "--coordinator",
            &url,
            "--branch",
            &format!("{}/r/alice:-100", p_no.url()),
            "--branch",
            &format!("{}/r/bob:100", p_ok.url()),
        ]);
        (submit, tandem(&["tx", "list", "--coordinator", &url]))
    })
    .await
    .expect("run");
    let (submit, list) = ran;
    assert!(!submit.ok, "{}", submit.stdout);
    assert!(list.ok, "{}", list.stderr);
    let row = list
        .stdout
        .lines()
        .find(|l| l.contains("ABORTED"))
        .unwrap_or_else(|| panic!("no aborted row:\n{}", list.stdout));
    assert!(
        row.contains("voted no: insufficient funds"),
        "LAST ERROR: {row}"
    );
}

// Against a coordinator requiring mutual TLS and tokens: `tx submit` and
// `bench --coordinator` work with --ca/--cert/--key/--token-file, and
// `tx submit` without them is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tx_submit_and_bench_reach_a_secured_coordinator() {
    let dir = tempfile::tempdir().expect("dir");
    let certs = dir.path().join("certs");
    tandem_cli::certs::write_dev(&certs).expect("dev certs");
    let f = |n: &str| certs.join(n).to_string_lossy().into_owned();
    // The bench reads the coordinator's counters: the client may, too.
    let access = f("coordinator-access.txt");
    let mut text = std::fs::read_to_string(&access).expect("access file");
    text.push_str("admin client cert:client.tandem.local\n");
    std::fs::write(&access, text).expect("access file");
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
            &access,
        ],
        &[],
    );
    let url = serve.url.replace("http://", "https://");
    let ok = Scripted::yes("ok");
    let p_ok = ok.serve().await;
    let branch = format!("{}/r/x", p_ok.url());
    let secured = [
        "--ca",
        &f("ca.pem"),
        "--cert",
        &f("client.pem"),
        "--key",
        &f("client-key.pem"),
        "--token-file",
        &f("client.token"),
    ]
    .map(String::from);
    let (with, without, bench) = tokio::task::spawn_blocking(move || {
        let submit = ["tx", "submit", "--coordinator", &url, "--branch", &branch];
        let mut with: Vec<&str> = submit.to_vec();
        with.extend(secured.iter().map(String::as_str));
        let bench_participant = tandem_tests::process::spawn_listening(
            &tandem_tests::process::tandem_bin(),
            &["bench-participant", "--listen", "127.0.0.1:0"],
            &[],
        );
        let participant = format!("http://{}", bench_participant.1);
        let mut bench: Vec<&str> = vec![
            "bench",
            "--coordinator",
            &url,
            "--participant",
            &participant,
            "--duration",
            "1s",
            "--floor-duration",
            "200ms",
            "--concurrency",
            "4",
            "--output",
            "json",
        ];
        bench.extend(secured.iter().map(String::as_str));
        let ran = (tandem(&with), tandem(&submit), tandem(&bench));
        let mut child = bench_participant.0;
        let _ = child.kill();
        let _ = child.wait();
        ran
    })
    .await
    .expect("run");
    assert!(with.ok, "{}", with.stderr);
    assert!(with.stdout.contains(" committed"), "{}", with.stdout);
    assert!(!without.ok, "no certificate, no token: refused");
    assert!(bench.ok, "{}", bench.stderr);
    let report = json(&bench.stdout);
    assert!(
        report["run"]["committed"].as_u64().is_some_and(|n| n > 0),
        "{report}"
    );
    assert_eq!(ok.counts(), (1, 1, 0));
}

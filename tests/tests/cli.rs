//! `tandem tx list|show|retry|abort|resolve` against a real `tandem serve` process,
//! with participants in this test process. Tables for people, JSON for
//! scripts, and a one-line error with a non-zero exit code on failure.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tandem_sdk::{Branch, Mode, TransactionClient};
use tandem_tests::process::{Serve, tandem};
use tandem_tests::{Scripted, eventually};

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

// A participant down during phase 2 makes the transaction STUCK once the
// retry policy is exhausted; `tx list --state stuck` finds it, `tx show`
// explains it, `tx abort` is refused (commit decided), and `tx retry` after
// the participant is back completes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stuck_transaction_is_listed_shown_refused_and_retried() {
    let data = tempfile::tempdir().expect("data dir");
    let serve = Serve::start_with(
        data.path(),
        &[
            "--retry-initial",
            "10ms",
            "--retry-max",
            "20ms",
            "--retry-max-attempts",
            "3",
        ],
        &[],
    );
    let url = serve.url.as_str();
    let ok = Scripted::yes("ok");
    let down = Scripted::phase_two_down("down");
    let (p_ok, p_down) = (ok.serve_tcc().await, down.serve_tcc().await);
    let client = TransactionClient::connect(url).await.expect("connect");
    let done = client
        .submit(
            Mode::Tcc,
            vec![
                Branch::new(p_ok.url(), "r", "x"),
                Branch::new(p_down.url(), "r", "y"),
            ],
        )
        .await
        .expect("submit");
    assert!(!done.complete, "a branch is failing: not complete");
    let gtid = done.gtid.to_string();

    let stuck = tokio::task::spawn_blocking({
        let (url, gtid) = (url.to_string(), gtid.clone());
        move || {
            for _ in 0..500 {
                let ran = tandem(&[
                    "tx",
                    "list",
                    "--state",
                    "stuck",
                    "--output",
                    "json",
                    "--coordinator",
                    &url,
                ]);
                assert!(ran.ok, "{}", ran.stderr);
                if ran.stdout.contains(&gtid) {
                    return json(&ran.stdout);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            panic!("never became STUCK");
        }
    })
    .await
    .expect("poll");
    let row = &stuck[0];
    assert_eq!(row["state"], "STUCK");
    assert_eq!(row["decision"], "COMMIT");
    assert_eq!(row["branches"][1]["attempts"], 3);
    assert!(
        row["branches"][1]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("down for maintenance"))
    );
    assert_eq!(down.failed_calls.load(Ordering::SeqCst), 3);

    let table = tandem(&["tx", "list", "--coordinator", url]);
    assert!(table.ok, "{}", table.stderr);
    assert!(table.stdout.starts_with("GTID"), "{}", table.stdout);
    let line = table
        .stdout
        .lines()
        .find(|l| l.contains(&gtid))
        .expect("row");
    assert!(
        line.contains("TCC") && line.contains("STUCK") && line.contains("#2: "),
        "{line}"
    );

    let show = tandem(&["tx", "show", &gtid, "--coordinator", url]);
    assert!(show.ok, "{}", show.stderr);
    for needle in [
        "state      STUCK",
        "decision   COMMIT",
        "#2 TRIED r at ",
        "last error: ",
        &p_down.url(),
    ] {
        assert!(
            show.stdout.contains(needle),
            "{needle:?} missing:\n{}",
            show.stdout
        );
    }

    let refused = tandem(&["tx", "abort", &gtid, "--coordinator", url]);
    assert!(!refused.ok);
    assert_eq!(refused.stderr.lines().count(), 1, "{}", refused.stderr);
    assert!(
        refused.stderr.contains("never reversed"),
        "{}",
        refused.stderr
    );

    down.script.phase_two_failures.store(0, Ordering::SeqCst);
    let retried = tandem(&[
        "tx",
        "retry",
        &gtid,
        "--output",
        "json",
        "--coordinator",
        url,
    ]);
    assert!(retried.ok, "{}", retried.stderr);
    assert_eq!(json(&retried.stdout)["state"], "COMMITTED");
    assert_eq!((ok.counts(), down.counts()), ((1, 1, 0), (1, 1, 0)));
}

// `tx resolve` settles a STUCK branch by hand: refused against the
// decision and without a reason; accepted as the decision says, with a
// warning, and `tx show` says who settled it and why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_branch_is_settled_by_hand() {
    let data = tempfile::tempdir().expect("data dir");
    let serve = Serve::start_with(
        data.path(),
        &[
            "--retry-initial",
            "10ms",
            "--retry-max",
            "20ms",
            "--retry-max-attempts",
            "2",
        ],
        &[],
    );
    let url = serve.url.as_str();
    let down = Scripted::phase_two_down("down");
    let p_down = down.serve().await;
    let client = TransactionClient::connect(url).await.expect("connect");
    let done = client
        .submit(Mode::TwoPhase, vec![Branch::new(p_down.url(), "r", "y")])
        .await
        .expect("submit");
    let gtid = done.gtid.to_string();
    eventually("STUCK", || {
        let ran = tandem(&["tx", "show", &gtid, "--coordinator", url]);
        ran.stdout.contains("state      STUCK")
    })
    .await;
    let resolve = |outcome: &str, reason: &str| {
        tandem(&[
            "tx",
            "resolve",
            &gtid,
            "--branch",
            "1",
            "--as",
            outcome,
            "--reason",
            reason,
            "--coordinator",
            url,
        ])
    };
    let against = resolve("rolled-back", "wrong way");
    assert!(
        !against.ok && against.stderr.contains("never reversed"),
        "{}",
        against.stderr
    );
    let garbage = resolve("maybe", "x");
    assert!(
        !garbage.ok && garbage.stderr.contains("committed or rolled-back"),
        "{}",
        garbage.stderr
    );
    let settled = resolve("committed", "INC-9: applied by hand");
    assert!(settled.ok, "{}", settled.stderr);
    assert!(
        settled.stdout.starts_with("WARNING: branch 1"),
        "{}",
        settled.stdout
    );
    assert!(
        settled.stdout.contains("state      COMMITTED"),
        "{}",
        settled.stdout
    );
    let show = tandem(&["tx", "show", &gtid, "--coordinator", url]);
    assert!(
        show.stdout.contains("settled by hand by anonymous") && show.stdout.contains("INC-9"),
        "{}",
        show.stdout
    );
    let json_show = tandem(&[
        "tx",
        "show",
        &gtid,
        "--output",
        "json",
        "--coordinator",
        url,
    ]);
    assert_eq!(
        json(&json_show.stdout)["branches"][0]["resolution"]["reason"],
        "INC-9: applied by hand"
    );
}

// The verbs on undecided transactions and the error paths: abort of an
// ACTIVE one works; retry of one within its deadline is refused; unknown
// gtid, malformed gtid, a coordinator that is down: one line, exit 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecided_transactions_and_error_paths() {
    let data = tempfile::tempdir().expect("data dir");
    let serve = Serve::start(data.path());
    let url = &serve.url.clone();
    let a = Scripted::yes("a");
    let pa = a.serve_tcc().await;
    let client = TransactionClient::connect(url).await.expect("connect");
    let gtid = client.begin(Mode::Tcc).await.expect("begin");
    client
        .enlist(gtid, Branch::new(pa.url(), "r", "x"))
        .await
        .expect("enlist");
    let gtid = gtid.to_string();

    let early = tandem(&["tx", "retry", &gtid, "--coordinator", url]);
    assert!(!early.ok);
    assert!(
        early.stderr.contains("within its deadline"),
        "{}",
        early.stderr
    );

    let young = tandem(&[
        "tx",
        "list",
        "--older-than",
        "1h",
        "--output",
        "json",
        "--coordinator",
        url,
    ]);
    assert!(young.ok, "{}", young.stderr);
    assert_eq!(json(&young.stdout), serde_json::json!([]));

    let aborted = tandem(&[
        "tx",
        "abort",
        &gtid,
        "--reason",
        "stuck client",
        "--coordinator",
        url,
    ]);
    assert!(aborted.ok, "{}", aborted.stderr);
    assert!(
        aborted.stdout.contains("state      ABORTED"),
        "{}",
        aborted.stdout
    );
    assert!(
        aborted.stdout.contains("operator: stuck client"),
        "{}",
        aborted.stdout
    );
    eventually("the try was cancelled", || a.counts() == (1, 0, 1)).await;
    // Aborting again is fine; retrying a finished one does nothing.
    assert!(tandem(&["tx", "abort", &gtid, "--coordinator", url]).ok);
    assert!(tandem(&["tx", "retry", &gtid, "--coordinator", url]).ok);

    let unknown = uuid::Uuid::now_v7().to_string();
    let missing = tandem(&["tx", "show", &unknown, "--coordinator", url]);
    assert!(!missing.ok);
    assert_eq!(
        missing.stderr.trim(),
        format!("tandem: no transaction {unknown}")
    );
    let garbage = tandem(&["tx", "show", "not-a-gtid", "--coordinator", url]);
    assert!(
        !garbage.ok && garbage.stderr.contains("invalid"),
        "{}",
        garbage.stderr
    );
    let bad_state = tandem(&["tx", "list", "--state", "done"]);
    assert!(
        !bad_state.ok && bad_state.stderr.contains("unknown state"),
        "{}",
        bad_state.stderr
    );

    drop(serve);
    let down = tandem(&["tx", "list", "--coordinator", url]);
    assert!(!down.ok);
    assert_eq!(down.stderr.lines().count(), 1, "{}", down.stderr);
    assert!(down.stderr.contains("unreachable"), "{}", down.stderr);
}

/// Runs `tandem serve` with stderr piped (not a terminal) until it printed
/// `listening on ADDR`, stops it, and returns (first stdout line, stderr).
fn serve_logs(extra: &[&str]) -> (String, String) {
    use std::io::{BufRead, BufReader, Read};
    let data = tempfile::tempdir().expect("data dir");
    let dir = data.path().to_str().expect("utf-8");
    let mut args = extra.to_vec();
    args.extend(["serve", "--listen", "127.0.0.1:0", "--data-dir", dir]);
    let mut child = std::process::Command::new(tandem_tests::process::tandem_bin())
        .args(&args)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn tandem serve");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read");
    let _ = child.kill();
    let _ = child.wait();
    let mut err = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err)
        .expect("read stderr");
    (line, err)
}

// Rule: `listening on ADDR` is the first stdout line (scripts read it); logs
// in a pipe carry no colour codes; --log-format json gives one object per
// line with level and message.
#[test]
fn logs_are_plain_in_a_pipe_and_json_on_request() {
    let (first, text) = serve_logs(&[]);
    assert!(first.starts_with("listening on 127.0.0.1:"), "{first:?}");
    assert!(text.contains("tandem coordinator serving"), "{text}");
    assert!(!text.contains('\u{1b}'), "colour codes in a pipe: {text:?}");

    let (first, json_lines) = serve_logs(&["--log-format", "json"]);
    assert!(first.starts_with("listening on 127.0.0.1:"), "{first:?}");
    let lines: Vec<serde_json::Value> = json_lines
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(json)
        .collect();
    assert!(
        lines.iter().any(|l| l["fields"]["message"] == "tandem coordinator serving"
            && l["level"] == "INFO"),
        "{json_lines}"
    );
    let bad = tandem(&["--log-format", "xml", "tx", "list"]);
    assert!(!bad.ok && bad.stderr.contains("xml"), "{}", bad.stderr);
}

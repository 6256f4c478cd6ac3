//! No secret in any log line, at any level: a real `tandem serve` at
//! `RUST_LOG=trace` whose OTLP collector, alert webhook and store fail (or
//! work) never prints the password of a URL, a webhook's path or query (a
//! Slack-style hook's secret), or a connection string's password: not in
//! its own lines, not in the errors libraries hand it, not in the error it
//! exits with.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tandem_sdk::{Mode, TransactionClient};
use tandem_tests::pg::PgServer;
use tandem_tests::process::{free_addr, tandem_bin};
use tandem_tests::{Scripted, pair};

/// Every secret below contains this; none may appear in any output.
const SECRET: &str = "s3cret";

/// A `tandem` process at `RUST_LOG=trace`, its stdout and stderr going to
/// files (read while it runs); killed when dropped.
struct Traced {
    child: Child,
    out: PathBuf,
    err: PathBuf,
}

impl Traced {
    /// `tandem --log-format FORMAT serve --listen 127.0.0.1:0 --data-dir
    /// DIR/data ARGS…`, its output in `dir`.
    fn serve(dir: &Path, args: &[&str], format: &str) -> Traced {
        let out = dir.join("stdout");
        let err = dir.join("stderr");
        let file = |p: &Path| std::fs::File::create(p).expect("log file");
        let child = Command::new(tandem_bin())
            .args(["--log-format", format, "serve", "--listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args(args)
            .env("RUST_LOG", "trace")
            .stdin(Stdio::null())
            .stdout(file(&out))
            .stderr(file(&err))
            .spawn()
            .expect("spawn tandem");
        Traced { child, out, err }
    }

    /// Everything written so far, stdout then stderr.
    fn output(&self) -> String {
        let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
        format!("{}{}", read(&self.out), read(&self.err))
    }

    /// Waits (up to `within`) until the output contains `what`.
    fn wait_for(&self, what: &str, within: Duration) {
        let start = Instant::now();
        while !self.output().contains(what) {
            assert!(
                start.elapsed() < within,
                "no {what:?} within {within:?}; output:\n{}",
                tail(&self.output())
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `http://ADDR` from the `listening on ADDR` line.
    fn url(&self) -> String {
        self.wait_for("listening on ", Duration::from_secs(30));
        let out = std::fs::read_to_string(&self.out).expect("stdout");
        let addr = out
            .lines()
            .find_map(|l| l.strip_prefix("listening on "))
            .expect("address line");
        format!("http://{}", addr.trim())
    }

    /// SIGTERM, then the exit.
    fn terminate(mut self) -> String {
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(sent.success());
        self.child.wait().expect("wait");
        self.output()
    }
}

impl Drop for Traced {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The last lines of `output`, for a failure message.
fn tail(output: &str) -> String {
    let lines: Vec<&str> = output.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Fails naming every line that holds a secret.
fn assert_no_secret(output: &str) {
    let leaks: Vec<&str> = output.lines().filter(|l| l.contains(SECRET)).collect();
    assert!(
        leaks.is_empty(),
        "{} line(s) hold a secret, e.g.:\n{}",
        leaks.len(),
        leaks.iter().take(5).copied().collect::<Vec<_>>().join("\n")
    );
}

// The OTLP collector and the alert webhook are unreachable (closed ports):
// the export failure, the failed POSTs and everything the gRPC and HTTP
// clients trace while failing name neither the endpoint's password nor
// the webhook's path or query; in both log formats.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_export_and_webhook_log_no_secret() {
    for format in ["text", "json"] {
        let dir = tempfile::tempdir().expect("dir");
        let otlp = format!("http://tandem:otlp-{SECRET}@{}", free_addr());
        let webhook = format!(
            "http://{}/services/T0/B0/hook-{SECRET}?sig=q-{SECRET}",
            free_addr()
        );
        let serve = Traced::serve(
            dir.path(),
            &[
                "--otlp-endpoint",
                &otlp,
                "--alert-webhook",
                &webhook,
                "--alert-after-attempts",
                "1",
                "--retry-initial",
                "20ms",
            ],
            format,
        );
        let url = serve.url();
        let (ok, down) = (Scripted::yes("ok"), Scripted::phase_two_down("down"));
        let (p_ok, p_down) = (ok.serve().await, down.serve().await);
        let client = TransactionClient::connect(url).await.expect("connect");
        client
            .submit(Mode::TwoPhase, pair(&p_ok, &p_down))
            .await
            .expect("submit");
        // A POST failed (and is retried), an export failed.
        serve.wait_for("alert not delivered; retrying", Duration::from_secs(20));
        serve.wait_for("OTLP export failed", Duration::from_secs(20));
        let output = tokio::task::spawn_blocking(move || serve.terminate())
            .await
            .expect("stop");
        assert!(
            output.lines().filter(|l| l.contains("TRACE")).count() > 10,
            "not a trace-level log:\n{}",
            tail(&output)
        );
        assert_no_secret(&output);
        // What failed is still named, without its secret.
        assert!(output.contains("127.0.0.1"), "{}", tail(&output));
    }
}

// A webhook URL refused at start (credentials in it, a scheme not http)
// is named by its host only in the error `tandem serve` exits with.
#[test]
fn refused_webhook_is_named_without_its_secret() {
    for webhook in [
        format!("http://ops:hook-{SECRET}@127.0.0.1:9/services/p-{SECRET}"),
        format!("ftp://127.0.0.1:9/services/p-{SECRET}?sig={SECRET}"),
    ] {
        let dir = tempfile::tempdir().expect("dir");
        let mut serve = Traced::serve(dir.path(), &["--alert-webhook", &webhook], "text");
        let status = serve.child.wait().expect("exit");
        assert!(!status.success());
        let output = serve.output();
        assert!(output.contains("alert webhook: "), "{output}");
        assert!(output.contains("127.0.0.1:9/***"), "{output}");
        assert_no_secret(&output);
    }
}

// An unreachable store given as a URL and as a libpq string: the retries'
// warnings and the error `tandem serve` exits with name no password.
#[test]
fn unreachable_store_logs_no_password() {
    let closed = free_addr();
    let (host, port) = closed.split_once(':').expect("host:port");
    for store in [
        format!("postgres://tandem:pg-{SECRET}@{closed}/tandem"),
        format!("host={host} port={port} user=tandem password=pg-{SECRET} dbname=tandem"),
    ] {
        let dir = tempfile::tempdir().expect("dir");
        let serve = Traced::serve(dir.path(), &["--store", &store], "text");
        serve.wait_for("store unavailable, retrying", Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(500));
        let output = serve.terminate();
        assert_no_secret(&output);
    }
    // A store URL that does not parse is refused at once, naming no
    // password either.
    let dir = tempfile::tempdir().expect("dir");
    let bad = format!("postgres://tandem:pg-{SECRET}@{closed}/tandem?sslmode=bogus");
    let mut serve = Traced::serve(dir.path(), &["--store", &bad], "text");
    let status = serve.child.wait().expect("exit");
    assert!(!status.success());
    let output = serve.output();
    assert!(output.contains("tandem:"), "{output}");
    assert_no_secret(&output);
}

// A reachable store with a password (the test server trusts loopback, so
// any password is accepted): a transaction through it, traced end to end,
// prints no password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn working_store_logs_no_password() {
    let pg = PgServer::start();
    let store = format!(
        "{} password=pg-{SECRET}",
        pg.create_database("secrets").await
    );
    let dir = tempfile::tempdir().expect("dir");
    let serve = Traced::serve(dir.path(), &["--store", &store], "text");
    let url = serve.url();
    let (a, b) = (Scripted::yes("a"), Scripted::yes("b"));
    let (pa, pb) = (a.serve().await, b.serve().await);
    let client = TransactionClient::connect(url).await.expect("connect");
    let done = client
        .submit(Mode::TwoPhase, pair(&pa, &pb))
        .await
        .expect("submit");
    assert!(done.complete);
    let output = tokio::task::spawn_blocking(move || serve.terminate())
        .await
        .expect("stop");
    assert!(
        output.contains("transaction log on PostgreSQL"),
        "{}",
        tail(&output)
    );
    assert_no_secret(&output);
}

// Errors that quote the URL they were given (the client's connection
// error, the OTLP exporter's refusal of its endpoint) are printed without
// its password when `tandem` exits with them.
#[test]
fn errors_quoting_a_url_name_no_password() {
    let closed = free_addr();
    for args in [
        vec![
            "tx".to_string(),
            "--coordinator".into(),
            format!("http://ops:tx-{SECRET}@{closed}"),
            "list".into(),
        ],
        vec![
            "serve".to_string(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--otlp-endpoint".into(),
            format!("http://ops:otlp-{SECRET}@[::1"),
        ],
    ] {
        let out = Command::new(tandem_bin())
            .args(&args)
            .env("RUST_LOG", "trace")
            .output()
            .expect("run tandem");
        assert!(!out.status.success(), "{args:?}");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("ops:***@"), "{text}");
        assert_no_secret(&text);
    }
}

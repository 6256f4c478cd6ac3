//! What an operator sees of coordinators on one PostgreSQL store: `tandem
//! cluster status` marks an instance whose lease ran out, and `tandem
//! serve --store` logs neither a data dir it does not use nor PostgreSQL's
//! NOTICEs about a schema that already exists.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tandem_tests::pg::PgServer;
use tandem_tests::process::{tandem, tandem_bin};

/// `tandem serve --store url` at RUST_LOG=info (stderr into `log`), once it
/// listens.
fn serve_on_store(url: &str, name: &str, data_dir: &Path, log: &Path) -> Child {
    let data = data_dir.to_string_lossy();
    let mut child = Command::new(tandem_bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir", &data])
        .args(["--store", url, "--instance-name", name, "--lease", "1s"])
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).expect("log file"))
        .spawn()
        .expect("spawn tandem serve");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read");
    assert!(line.starts_with("listening on "), "{line:?}");
    child
}

// A SIGKILLed instance stops renewing its lease: once the lease is older
// than its length, `cluster status` marks it EXPIRED (table) /
// `lease_expired: true` (JSON), and the live one not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_status_marks_an_instance_whose_lease_expired() {
    let pg = PgServer::start();
    let url = pg.create_database("tandem").await;
    let dir = tempfile::tempdir().expect("dir");
    let mut dead = serve_on_store(&url, "dead", dir.path(), &dir.path().join("dead.log"));
    let mut live = serve_on_store(&url, "live", dir.path(), &dir.path().join("live.log"));
    dead.kill().expect("SIGKILL");
    dead.wait().expect("reaped");
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let json = tandem(&["cluster", "status", "--store", &url, "--output", "json"]);
    assert!(json.ok, "{}", json.stderr);
    let doc: serde_json::Value = serde_json::from_str(&json.stdout).expect("json");
    let expired = |name: &str| {
        doc["instances"]
            .as_array()
            .expect("instances")
            .iter()
            .find(|i| i["name"] == name)
            .unwrap_or_else(|| panic!("{name} missing: {doc}"))["lease_expired"]
            .as_bool()
    };
    assert_eq!(expired("dead"), Some(true), "{doc}");
    assert_eq!(expired("live"), Some(false), "{doc}");

    let table = tandem(&["cluster", "status", "--store", &url]);
    assert!(table.ok, "{}", table.stderr);
    let row = |name: &str| {
        table
            .stdout
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name} missing:\n{}", table.stdout))
            .to_string()
    };
    assert!(row("dead").contains("EXPIRED"), "{}", table.stdout);
    assert!(!row("live").contains("EXPIRED"), "{}", table.stdout);
    let _ = live.kill();
    let _ = live.wait();
}

// On a store, the start line names the store, not --data-dir (unused);
// a second start on a store already set up logs no NOTICE of PostgreSQL's
// `CREATE … IF NOT EXISTS`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_on_a_store_logs_no_data_dir_and_no_notice() {
    let pg = PgServer::start();
    let url = pg.create_database("tandem").await;
    let dir = tempfile::tempdir().expect("dir");
    let mut logs = Vec::new();
    for name in ["first", "second"] {
        let log = dir.path().join(format!("{name}.log"));
        let mut child = serve_on_store(&url, name, dir.path(), &log);
        let _ = child.kill();
        let _ = child.wait();
        logs.push(std::fs::read_to_string(&log).expect("log"));
    }
    for log in &logs {
        assert!(log.contains("tandem coordinator serving"), "{log}");
        assert!(!log.contains("data_dir"), "--data-dir is not used: {log}");
        assert!(!log.contains("NOTICE"), "{log}");
    }
}

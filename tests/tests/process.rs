//! The `tandem serve` binary as a real process: a participant and a business
//! service written as the book shows (docs/book/src/participants.md,
//! docs/book/src/clients.md) work against it, and a commit it acknowledged
//! survives SIGKILL and a restart on the same data directory.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use tandem_examples::bank::{Bank, Leg};
use tandem_proto::v1 as pb;
use tandem_sdk::{Branch, Error, Mode, ParticipantServer, TransactionClient};
use tandem_tests::process::{Serve, tandem_bin};

// Rule: a commit the coordinator acknowledged is on disk — the process is
// killed with SIGKILL right after, and the restarted coordinator still
// finishes it as COMMITTED without applying it twice. An abort is reported with its reason.
#[tokio::test]
async fn acknowledged_commit_survives_sigkill_and_restart() {
    let data = tempfile::tempdir().expect("data dir");
    let serve = Serve::start(data.path());

    let east = Arc::new(Bank::new([("alice".to_string(), 100)]));
    let west = Arc::new(Bank::new([("bob".to_string(), 0)]));
    let pe = ParticipantServer::new()
        .two_phase("accounts", east.clone())
        .spawn("127.0.0.1:0".parse().expect("a"))
        .await
        .expect("east");
    let pw = ParticipantServer::new()
        .two_phase("accounts", west.clone())
        .spawn("127.0.0.1:0".parse().expect("a"))
        .await
        .expect("west");

    let client = TransactionClient::connect(&serve.url)
        .await
        .expect("connect");
    let transfer = |amount: i64| {
        vec![
            Branch::new(pe.url(), "accounts", Leg::debit("alice", amount).encode()),
            Branch::new(pw.url(), "accounts", Leg::credit("bob", amount).encode()),
        ]
    };
    let done = client
        .submit(Mode::TwoPhase, transfer(60))
        .await
        .expect("transfer 60");
    assert!(done.complete);
    let refused = client
        .submit(Mode::TwoPhase, transfer(60))
        .await
        .expect_err("only 40 left");
    let Error::Aborted {
        gtid: Some(aborted),
        reason,
        ..
    } = refused
    else {
        panic!("{refused:?}")
    };
    assert!(reason.contains("insufficient funds"), "{reason}");
    assert_eq!(
        (east.balance("alice"), west.balance("bob")),
        (Some(40), Some(60))
    );

    serve.kill();
    let serve = Serve::start(data.path());
    let client = TransactionClient::connect(&serve.url)
        .await
        .expect("reconnect");
    // Only the decision was forced; the final COMMITTED write may be lost
    // with the process. Then the record says COMMITTING and recovery sends
    // commit again, which the participant absorbs (no double transfer).
    let info = client.get(done.gtid).await.expect("record after restart");
    assert!(
        info.state == pb::TxState::Committed as i32 || info.state == pb::TxState::Committing as i32,
        "decision lost: {info:?}"
    );
    let mut state = info.state;
    for _ in 0..500 {
        if state == pb::TxState::Committed as i32 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        state = client.get(done.gtid).await.expect("get").state;
    }
    assert_eq!(
        state,
        pb::TxState::Committed as i32,
        "recovery did not finish the commit"
    );
    assert_eq!(
        (east.balance("alice"), west.balance("bob")),
        (Some(40), Some(60))
    );
    // The abort was never forced (presumed abort); if its record survived,
    // it must still say aborted — never anything else.
    match client.get(aborted).await {
        Ok(info) => assert!(
            info.state == pb::TxState::Aborted as i32 || info.state == pb::TxState::Aborting as i32,
            "{info:?}"
        ),
        Err(Error::Invalid {
            code: tonic::Code::NotFound,
            ..
        }) => {}
        Err(e) => panic!("{e:?}"),
    }
    // The restarted coordinator runs new transactions.
    client
        .submit(Mode::TwoPhase, transfer(40))
        .await
        .expect("transfer 40");
    assert_eq!(
        (east.balance("alice"), west.balance("bob")),
        (Some(0), Some(100))
    );
    drop(serve);
    let _ = tokio::time::timeout(Duration::from_secs(5), pe.shutdown()).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), pw.shutdown()).await;
}

// Rule: bad configuration is refused at start with a message naming the
// setting, and the process exits non-zero without touching anything.
#[test]
fn serve_refuses_bad_configuration() {
    let data = tempfile::tempdir().expect("data dir");
    let out = Command::new(tandem_bin())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--max-payload-bytes",
            "999999999",
            "--data-dir",
        ])
        .arg(data.path().join("never"))
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("max payload"), "{err}");
    assert!(
        !data.path().join("never").exists(),
        "created the data dir anyway"
    );
}

// Rule (graceful shutdown): on SIGTERM the coordinator takes no new
// transaction, lets the one in flight finish its decision and phase 2, and
// exits 0; after a restart the record is there and finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_work_and_refuses_new() {
    use std::sync::atomic::Ordering;
    use tandem_tests::{Script, Scripted};

    let data = tempfile::tempdir().expect("data dir");
    let serve = Serve::start(data.path());
    let slow = Scripted::new(
        "slow",
        Script {
            phase_two_delay: Duration::from_millis(800),
            ..Script::default()
        },
        None,
    );
    let fast = Scripted::yes("fast");
    let (ps, pf) = (slow.serve().await, fast.serve().await);
    let client = TransactionClient::connect(&serve.url)
        .await
        .expect("connect");
    let in_flight = tokio::spawn({
        let client = client.clone();
        let branches = tandem_tests::pair(&ps, &pf);
        async move { client.submit(Mode::TwoPhase, branches).await }
    });
    tandem_tests::eventually("phase 2 under way", || {
        fast.commits.load(Ordering::SeqCst) == 1
    })
    .await;
    serve.signal_terminate();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let refused = client.begin(Mode::TwoPhase).await;
    assert!(
        refused.is_err(),
        "a new transaction was accepted while stopping"
    );
    let done = in_flight
        .await
        .expect("task")
        .expect("the in-flight commit finished");
    assert!(done.complete);
    assert_eq!(slow.counts(), (1, 1, 0));
    let status = tokio::task::spawn_blocking(move || serve.wait())
        .await
        .expect("wait");
    assert!(status.success(), "graceful stop exits 0: {status}");

    let serve = Serve::start(data.path());
    let client = TransactionClient::connect(&serve.url)
        .await
        .expect("reconnect");
    let info = client.get(done.gtid).await.expect("record survives");
    assert!(
        info.state == pb::TxState::Committed as i32 || info.state == pb::TxState::Committing as i32,
        "{info:?}"
    );
    assert_eq!(slow.counts(), (1, 1, 0));
}

// The bench smoke test: `tandem bench` starts its own coordinator and
// participant processes, runs a couple of seconds of each mode, and every
// transaction it counted is verified complete at the participants, and
// the floor's parts and the per-transaction costs are reported. No timing
// is asserted (shared machines vary).
/// `tandem bench ARGS --output json`, which must succeed: its report.
fn bench_json(args: &[&str]) -> serde_json::Value {
    let out = Command::new(tandem_bin())
        .arg("bench")
        .args(args)
        .args(["--output", "json"])
        .env("RUST_LOG", "warn")
        .output()
        .expect("run bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{args:?}: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&stdout).expect("json")
}

#[test]
fn bench_smoke_verifies_every_counted_transaction() {
    for mode in ["2pc", "tcc"] {
        let report = bench_json(&[
            "--mode",
            mode,
            "--duration",
            "1500ms",
            "--floor-duration",
            "300ms",
            "--concurrency",
            "8",
        ]);
        assert_eq!(report["verified"], true, "{report}");
        assert_eq!(report["run"]["errors"], 0, "{report}");
        let committed = report["run"]["committed"].as_u64().expect("committed");
        assert!(committed > 0, "{report}");
        assert_eq!(
            report["participant_commits"].as_u64(),
            Some(committed * 2),
            "{report}"
        );
        assert!(report["forces_per_tx"].as_f64().is_some_and(|f| f > 0.0));
        // The latency floor's parts, the floor and p50's ratio to it, and
        // the coordinator's cost per transaction are measured and positive.
        let positive = |v: &serde_json::Value| v.as_f64().is_some_and(|f| f > 0.0);
        for part in ["client_rtt_us", "participant_rtt_us", "fsync_us"] {
            assert!(positive(&report["floor_parts"][part]), "{part}: {report}");
        }
        for field in [
            "p50_floor_us",
            "p50_floor_ratio",
            "ctx_switches_per_tx",
            "coordinator_cpu_ms_per_tx",
        ] {
            assert!(positive(&report[field]), "{field}: {report}");
        }
    }
}

// `tandem bench --retained M --live N`: the records are written, the
// coordinator starts on them, the live transactions are begun and after a
// SIGKILL and a restart every one of them is finished; the memory and
// start-up figures are measured (a positive resident size at each step).
#[test]
fn bench_scale_measures_memory_start_up_and_listing() {
    let report = bench_json(&["--retained", "3000", "--live", "200"]);
    assert_eq!(report["retained"], 3000, "{report}");
    assert_eq!(report["live"], 200, "{report}");
    let positive = |v: &serde_json::Value| v.as_f64().is_some_and(|f| f > 0.0);
    for field in [
        "fill_s",
        "data_dir_mb",
        "startup_empty_s",
        "startup_s",
        "rss_empty_kb",
        "rss_started_kb",
        "rss_live_kb",
        "list_all_ms",
        "list_active_ms",
        "restart_s",
        "restart_settled_s",
        "rss_restarted_kb",
    ] {
        assert!(positive(&report[field]), "{field}: {report}");
    }
}

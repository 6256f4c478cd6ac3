//! A damaged log stops `tandem serve` instead of being served with fewer
//! records (sled itself stops reading at the first bad checksum and says
//! nothing). Each case damages a copy of a real log written through
//! `SledLog`, then runs the real binary on it.

use std::path::Path;

use bytes::Bytes;
use tandem_coordinator::log::conformance::sample_record;
use tandem_coordinator::log::{SledLog, TxnLog};
use tandem_coordinator::model::{Decision, Gtid, Mode, TxState};
use tandem_tests::process::{Serve, tandem};

const RECORDS: usize = 3000;

/// A log of `RECORDS` records, one forced round per 10 writes: most
/// committed, every 100th still COMMITTING (recovery's work), one in
/// twenty with a payload stored apart.
fn build_log(dir: &Path) -> Vec<Gtid> {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let log = SledLog::open(dir).expect("open");
    let mut gtids = Vec::new();
    for i in 0..RECORDS {
        let mut rec = sample_record(Mode::TwoPhase, 2);
        rec.state = if i % 100 == 0 {
            TxState::Committing
        } else {
            TxState::Committed
        };
        rec.decision = Some(Decision::Commit);
        rec.reason = "x".repeat(200);
        if i % 20 == 0 {
            rec.branches[0].payload = Bytes::from(vec![7u8; 2000]);
        }
        log.write(&rec).expect("write");
        gtids.push(rec.gtid);
        if i % 10 == 9 {
            rt.block_on(log.force()).expect("force");
        }
    }
    drop(log);
    gtids
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

fn damaged_copy(original: &Path, damage: impl FnOnce(&Path)) -> tempfile::TempDir {
    let copy = tempfile::tempdir().expect("tempdir");
    copy_dir(original, copy.path());
    damage(&copy.path().join("db"));
    copy
}

/// `tandem serve` on `dir` must exit non-zero at once, saying what is
/// wrong and how to go on.
fn assert_serve_refuses(dir: &Path, what: &str) {
    let ran = tandem(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        dir.to_str().expect("utf-8"),
    ]);
    assert!(!ran.ok, "{what}: serve started on a damaged log");
    assert!(
        ran.stderr.contains("is damaged") && ran.stderr.contains("--accept-log-damage"),
        "{what}: unclear refusal: {}",
        ran.stderr
    );
    let check = tandem(&["log", "check", "--data-dir", dir.to_str().expect("utf-8")]);
    assert!(
        !check.ok,
        "{what}: log check called it healthy: {}",
        check.stdout
    );
    assert!(check.stdout.contains("DAMAGED"), "{what}: {}", check.stdout);
}

// Rule: a log with garbage in the middle of sled's data file, truncated,
// or emptied is refused at start (and by `tandem log check`); the intact
// original starts.
#[test]
fn serve_refuses_a_damaged_data_file() {
    let original = tempfile::tempdir().expect("tempdir");
    build_log(original.path());
    let check = tandem(&[
        "log",
        "check",
        "--data-dir",
        original.path().to_str().expect("utf-8"),
    ]);
    assert!(
        check.ok,
        "healthy log reported damaged: {}{}",
        check.stdout, check.stderr
    );
    assert!(check.stdout.contains("healthy"), "{}", check.stdout);

    let len = std::fs::metadata(original.path().join("db"))
        .expect("db")
        .len();
    let garbage = damaged_copy(original.path(), |db| {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(db)
            .expect("open db");
        f.write_all_at(&[0xA5; 4096], len / 2).expect("garbage");
    });
    assert_serve_refuses(garbage.path(), "garbage in the middle");

    let truncated = damaged_copy(original.path(), |db| {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(db)
            .expect("open db");
        f.set_len(len / 2).expect("truncate");
    });
    assert_serve_refuses(truncated.path(), "truncated to half");

    let empty = damaged_copy(original.path(), |db| {
        std::fs::File::create(db).expect("empty db");
    });
    assert_serve_refuses(empty.path(), "zero-length db");

    // The intact original serves.
    let serve = Serve::start(original.path());
    drop(serve);
}

/// Plants a record of an unknown format version (as a newer Tandem would
/// leave after a downgrade) straight into sled.
fn plant_undecodable(dir: &Path) -> Gtid {
    // The log's flush thread may still hold sled's file lock for a moment
    // after the log was dropped.
    let mut tries = 0;
    let db = loop {
        match sled::Config::new()
            .path(dir)
            .segment_size(8 * 1024 * 1024)
            .open()
        {
            Ok(db) => break db,
            Err(e) if tries < 100 && e.to_string().contains("lock") => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(e) => panic!("open sled: {e}"),
        }
    };
    let txns = db.open_tree("txns").expect("txns");
    let gtid = Gtid::now_v7();
    // Protobuf: field 1 (version), varint 99.
    txns.insert(gtid.as_bytes(), &[0x08, 99][..])
        .expect("plant");
    db.flush().expect("flush");
    gtid
}

// Rule: one undecodable record stops the start with its gtid named; with
// --accept-log-damage it is quarantined, every other record is served and
// recovery finishes the unfinished ones.
#[test]
fn an_undecodable_record_is_refused_then_quarantined_on_request() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gtids = build_log(dir.path());
    let bad = plant_undecodable(dir.path());
    let path = dir.path().to_str().expect("utf-8");

    let ran = tandem(&["serve", "--listen", "127.0.0.1:0", "--data-dir", path]);
    assert!(!ran.ok, "served a log with an undecodable record");
    assert!(
        ran.stderr.contains(&bad.to_string()),
        "gtid not named: {}",
        ran.stderr
    );
    assert!(
        ran.stderr.contains("unknown format version 99"),
        "{}",
        ran.stderr
    );
    let check = tandem(&["log", "check", "--data-dir", path, "--output", "json"]);
    let report: serde_json::Value = serde_json::from_str(&check.stdout).expect("json");
    assert_eq!(report["undecodable"][0]["gtid"], bad.to_string());
    assert_eq!(report["counts"]["COMMITTED"], RECORDS - RECORDS / 100);

    let serve = Serve::start_with(dir.path(), &["--accept-log-damage"], &[]);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let client = tandem_sdk::TransactionClient::connect(serve.url.clone())
            .await
            .expect("connect");
        // Every readable record is there; the unfinished ones get finished
        // (their participants are unreachable: they stay COMMITTING with
        // attempts counting, which shows recovery took them over).
        for g in gtids.iter().step_by(97) {
            let info = client.get(*g).await.expect("record served");
            assert_eq!(info.decision, tandem_proto::v1::Decision::Commit as i32);
        }
        let unfinished = gtids[100];
        tandem_tests::eventually_async("recovery took the unfinished one over", || {
            let client = client.clone();
            async move {
                let info = client.get(unfinished).await.expect("get");
                info.branches.iter().any(|b| b.attempts > 0)
            }
        })
        .await;
        assert!(
            client.get(bad).await.is_err(),
            "the quarantined record is served"
        );
    });
    drop(serve);
    let check = tandem(&["log", "check", "--data-dir", path]);
    assert!(check.ok, "still damaged after quarantine: {}", check.stdout);
    assert!(check.stdout.contains("quarantined 1"), "{}", check.stdout);
}

// Rule: a record whose payload, stored apart, is gone is damage, not an
// empty payload: the start is refused with its gtid named, and `tandem log
// check` reports it (a phase-2 call with an empty payload could apply
// nothing, or the wrong thing).
#[test]
fn a_record_whose_payload_is_missing_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rec = sample_record(Mode::Tcc, 2);
    rec.state = TxState::Committing;
    rec.decision = Some(Decision::Commit);
    rec.branches[1].payload = Bytes::from(vec![7u8; 2000]);
    {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let log = SledLog::open(dir.path()).expect("open");
        log.write(&rec).expect("write");
        rt.block_on(log.force()).expect("force");
    }
    {
        let db = sled::Config::new()
            .path(dir.path())
            .segment_size(8 * 1024 * 1024)
            .open()
            .expect("open sled");
        let payloads = db.open_tree("payloads").expect("payloads");
        let mut key = rec.gtid.as_bytes().to_vec();
        key.extend_from_slice(&2u32.to_be_bytes());
        assert!(
            payloads.remove(key).expect("remove").is_some(),
            "stored apart"
        );
        db.flush().expect("flush");
    }
    let refused = SledLog::open(dir.path()).err().expect("refused");
    let refused = refused.to_string();
    assert!(
        refused.contains(&rec.gtid.to_string()) && refused.contains("payload"),
        "{refused}"
    );
    let report = tandem_coordinator::log::check_dir(dir.path()).expect("check");
    assert_eq!(report.undecodable.len(), 1, "{:?}", report.problems());
}

// Rule: a log whose forced mark file is gone, though sled has counted
// forced rounds, cannot be checked for lost writes: it is refused like a
// damaged one, and --accept-log-damage resets the mark and goes on. (A new
// directory has neither, and opens.)
#[test]
fn a_missing_mark_is_damage_once_sled_has_forced_rounds() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let log = SledLog::open(dir.path()).expect("a new directory opens");
        for _ in 0..3 {
            log.write(&sample_record(Mode::Tcc, 1)).expect("write");
            rt.block_on(log.force()).expect("force");
        }
    }
    let mark = dir.path().join(tandem_coordinator::log::mark::MARK_FILE);
    std::fs::remove_file(&mark).expect("remove the mark");

    let refused = SledLog::open(dir.path()).err().expect("refused");
    assert!(
        refused.to_string().contains("mark") && refused.to_string().contains("missing"),
        "{refused}"
    );
    let report = tandem_coordinator::log::check_dir(dir.path()).expect("check");
    assert!(report.is_damaged(), "{report:?}");

    let (log, report) = SledLog::open_with(dir.path(), true).expect("accepted");
    assert!(report.is_damaged());
    drop(log);
    assert!(mark.exists(), "the mark is written again");
    SledLog::open(dir.path()).expect("healthy again");
}

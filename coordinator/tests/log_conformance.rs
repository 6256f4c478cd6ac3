//! The `TxnLog` conformance suite against every implementation, plus the
//! checks only a real disk can answer.

use std::sync::Arc;

use bytes::Bytes;
use tandem_coordinator::log::{MemLog, SledLog, TxnLog, conformance};
use tandem_coordinator::model::{Mode, TxState};

#[tokio::test]
async fn mem_log_conforms() {
    conformance::run_all(MemLog::new).await;
}

#[tokio::test]
async fn sled_log_conforms() {
    let dirs = std::sync::Mutex::new(Vec::new());
    conformance::run_all(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = SledLog::open(dir.path()).expect("open sled log");
        dirs.lock().expect("dirs").push(dir);
        log
    })
    .await;
}

// Durability: what was forced is there after the log is dropped and reopened.
#[tokio::test]
async fn sled_log_keeps_forced_records_across_reopen() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut rec = conformance::sample_record(Mode::TwoPhase, 3);
    {
        let log = SledLog::open(dir.path()).expect("open");
        log.write(&rec).expect("write");
        rec.state = TxState::Committing;
        rec.branches[0].attempts = 2;
        log.write(&rec).expect("write");
        log.force().await.expect("force");
    }
    let log = SledLog::open(dir.path()).expect("reopen");
    assert_eq!(log.get(&rec.gtid).expect("get"), Some(rec));
}

// The unfinished records are found again after a reopen (the set recovery
// and `tx list --state active` read is rebuilt from the records at open).
#[tokio::test]
async fn sled_log_finds_unfinished_records_after_reopen() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut want = Vec::new();
    {
        let log = SledLog::open(dir.path()).expect("open");
        for (i, state) in [
            TxState::Committed,
            TxState::Active,
            TxState::Stuck,
            TxState::Aborted,
        ]
        .into_iter()
        .cycle()
        .take(40)
        .enumerate()
        {
            let mut rec = conformance::sample_record(Mode::TwoPhase, 1);
            rec.state = state;
            log.write(&rec).expect("write");
            if i % 8 == 1 {
                rec.state = TxState::Committed;
                log.write(&rec).expect("finish");
            }
            if !rec.state.is_terminal() {
                want.push(rec.gtid);
            }
        }
        log.force().await.expect("force");
    }
    want.sort();
    // sled's lock file may outlive the dropped log for a moment.
    let log = reopen(dir.path()).await;
    let got: Vec<_> = log
        .scan(None, &[TxState::Active, TxState::Stuck], 100)
        .expect("scan")
        .into_iter()
        .map(|r| r.gtid)
        .collect();
    assert_eq!(got, want);
}

async fn reopen(dir: &std::path::Path) -> SledLog {
    let mut tries = 0;
    loop {
        match SledLog::open(dir) {
            Ok(log) => return log,
            Err(e) if tries < 50 => {
                tries += 1;
                let _ = e;
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Err(e) => panic!("reopen: {e}"),
        }
    }
}

// Payloads up to the configured maximum survive a reopen, including the ones
// sled moves to separate blob files (the group commit syncs those too).
#[tokio::test]
async fn max_size_payloads_survive_reopen() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut written = Vec::new();
    {
        let log = Arc::new(SledLog::open(dir.path()).expect("open"));
        for _ in 0..4 {
            let mut rec = conformance::sample_record(Mode::TwoPhase, 3);
            for b in &mut rec.branches {
                b.payload = Bytes::from(vec![b.id as u8; 1024 * 1024]);
            }
            log.write(&rec).expect("write");
            log.force().await.expect("force");
            written.push(rec);
        }
    }
    let log = SledLog::open(dir.path()).expect("reopen");
    for rec in written {
        assert_eq!(log.get(&rec.gtid).expect("get").as_ref(), Some(&rec));
    }
}

// A second coordinator cannot open a directory in use: sled's lock refuses it
// with a clear error rather than two writers sharing one log.
#[test]
fn sled_log_refuses_a_directory_in_use() {
    let dir = tempfile::tempdir().expect("temp dir");
    let _first = SledLog::open(dir.path()).expect("open");
    let second = SledLog::open(dir.path());
    assert!(second.is_err(), "two logs opened one directory");
}

//! `tandem serve --accept-log-damage` moves an undecodable record to the
//! quarantine tree. Its gtid then has no record and no tombstone; it may
//! have held a durable COMMIT that participants still ask about, so
//! GetOutcome answers "no longer known" (FAILED_PRECONDITION), never
//! presumed ABORT: the quarantine raises the horizon over it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use tandem_coordinator::log::conformance::sample_record;
use tandem_coordinator::log::{SledLog, TxnLog};
use tandem_coordinator::model::{Decision, Mode, TxState};
use tandem_coordinator::{Coordinator, CoordinatorConfig};

// Rule: a quarantined record's gtid is never presumed ABORT.
#[tokio::test]
async fn a_quarantined_commit_is_not_presumed_abort() {
    let dir = tempfile::tempdir().expect("dir");
    let mut rec = sample_record(Mode::TwoPhase, 1);
    rec.state = TxState::Committing;
    rec.decision = Some(Decision::Commit);
    let gtid = rec.gtid;
    {
        let log = SledLog::open(dir.path()).expect("open");
        log.write(&rec).expect("write");
        log.force().await.expect("force");
    }
    // The record's bytes are damaged on disk (same key, garbage value).
    {
        let db = sled::Config::new()
            .path(dir.path())
            .segment_size(8 * 1024 * 1024)
            .mode(sled::Mode::LowSpace)
            .open()
            .expect("sled");
        let txns = db.open_tree("txns").expect("txns");
        txns.insert(gtid.as_bytes(), &b"\xffdamaged"[..])
            .expect("damage");
        db.flush().expect("flush");
    }
    let (log, report) = SledLog::open_with(dir.path(), true).expect("accept damage");
    assert!(report.is_damaged(), "{report:?}");
    let coord = Coordinator::new(CoordinatorConfig::default(), Arc::new(log)).expect("coord");
    let _recovery = coord.start_recovery().await.expect("recovery");
    let answer = coord.outcome(gtid);
    assert!(
        !matches!(answer, Ok(Some(Decision::Abort))),
        "GetOutcome of a quarantined COMMITTING transaction: {answer:?}"
    );
}

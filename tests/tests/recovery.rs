//! Recovery after a restart, in process: a log holding what a crashed
//! coordinator left, participants that answer at once.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tandem_coordinator::log::conformance::sample_record;
use tandem_coordinator::log::{ForceFuture, LogError, MemLog, TxnLog};
use tandem_coordinator::model::{BranchState, Decision, Gtid, Mode, TxState, TxnRecord};
use tandem_coordinator::runtime::{CallFuture, Environment, Transport};
use tandem_coordinator::{Coordinator, CoordinatorConfig};
use tandem_proto::v1::{BranchRequest, VoteResponse};
use tandem_tests::eventually;

/// A [`MemLog`] on which reading one record fails (a damaged record, as
/// sled would report it).
struct OneBadRecord {
    inner: MemLog,
    bad: Gtid,
}

impl TxnLog for OneBadRecord {
    fn write(&self, r: &TxnRecord) -> Result<(), LogError> {
        self.inner.write(r)
    }
    fn force(&self) -> ForceFuture {
        self.inner.force()
    }
    fn get(&self, g: &Gtid) -> Result<Option<TxnRecord>, LogError> {
        if *g == self.bad {
            return Err(LogError::Corrupt {
                gtid: g.to_string(),
                detail: "unknown format version 99".into(),
            });
        }
        self.inner.get(g)
    }
    fn scan(
        &self,
        after: Option<&Gtid>,
        states: &[TxState],
        limit: usize,
    ) -> Result<Vec<TxnRecord>, LogError> {
        self.inner.scan(after, states, limit)
    }
    fn remove(&self, g: &Gtid) -> Result<(), LogError> {
        self.inner.remove(g)
    }
}

/// Participants that acknowledge every phase-2 call and note which gtid
/// it was for.
#[derive(Default)]
struct Acks(Mutex<Vec<(String, bool)>>);

impl Transport for Acks {
    fn phase_one(
        &self,
        _: &str,
        _: Mode,
        _: BranchRequest,
        _trace: Option<tandem_coordinator::model::TraceContext>,
        _: Duration,
    ) -> CallFuture<'_, VoteResponse> {
        Box::pin(async { Err("no phase 1 in this test".into()) })
    }
    fn phase_two(
        &self,
        _: &str,
        _: Mode,
        commit: bool,
        req: BranchRequest,
        _trace: Option<tandem_coordinator::model::TraceContext>,
        _: Duration,
    ) -> CallFuture<'_, ()> {
        self.0.lock().expect("acks").push((req.gtid, commit));
        Box::pin(async { Ok(()) })
    }
}

fn committing() -> TxnRecord {
    let mut rec = sample_record(Mode::Tcc, 1);
    rec.state = TxState::Committing;
    rec.decision = Some(Decision::Commit);
    rec.branches[0].state = BranchState::Prepared;
    rec.branches[0].payload = Bytes::from_static(b"p");
    rec
}

// Rule 5: one record that cannot be read back does not stop recovery: it
// is logged and counted, and every other unfinished transaction is still
// finished in the background.
#[tokio::test]
async fn recovery_goes_on_past_a_record_it_cannot_read() {
    // Recovery goes in gtid order: the bad one is first.
    let mut recs = vec![committing(), committing(), committing()];
    recs.sort_by_key(|r| r.gtid);
    let bad = recs.remove(0);
    let good = recs;
    let log = Arc::new(OneBadRecord {
        inner: MemLog::new(),
        bad: bad.gtid,
    });
    for r in std::iter::once(&bad).chain(&good) {
        log.write(r).expect("write");
    }
    let acks = Arc::new(Acks::default());
    let env = Environment {
        transport: Some(acks.clone()),
        ..Environment::default()
    };
    let coord =
        Coordinator::with_environment(CoordinatorConfig::default(), log, env).expect("coordinator");
    let report = coord
        .start_recovery()
        .await
        .expect("start")
        .await
        .expect("join")
        .expect("recovery went on");
    assert_eq!((report.committing, report.failed), (3, 1));
    eventually("the readable ones are committed", || {
        good.iter().all(|r| {
            coord
                .get(r.gtid)
                .is_ok_and(|r| r.state == TxState::Committed)
        })
    })
    .await;
    let acks = acks.0.lock().expect("acks").clone();
    assert_eq!(acks.len(), 2, "{acks:?}");
    assert!(
        acks.iter()
            .all(|(g, commit)| *commit && *g != bad.gtid.to_string())
    );
}

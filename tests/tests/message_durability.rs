//! Transactional messages: PrepareMessage's promise is "the
//! message is durable when this returns" (the business service commits its
//! local transaction on the strength of that answer). These tests hold the
//! log's forces at a gate, so the window between the record's write and its
//! force is entered on purpose, and look at what a repeat of PrepareMessage
//! (a client whose first call timed out: the SDK repeats on UNAVAILABLE, an
//! application repeats after its deadline) is told meanwhile.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tandem_coordinator::engine::NewBranch;
use tandem_coordinator::log::{ForceFuture, LogError, MemLog, TxnLog};
use tandem_coordinator::model::{Gtid, Mode, TxState, TxnRecord};
use tandem_coordinator::runtime::{CallFuture, Environment, Transport};
use tandem_coordinator::{Coordinator, CoordinatorConfig};
use tandem_proto::v1::{BranchRequest, VoteResponse};
use tandem_tests::{Journal, eventually};
use tokio::sync::Semaphore;

/// A [`MemLog`] whose forces wait for a permit of `gate`, then fail if
/// `failing` is set by then (a disk that filled up meanwhile).
struct GateLog {
    inner: MemLog,
    gate: Arc<Semaphore>,
    failing: Arc<AtomicBool>,
    journal: Journal,
}

impl TxnLog for GateLog {
    fn write(&self, r: &TxnRecord) -> Result<(), LogError> {
        self.inner.write(r)
    }
    fn force(&self) -> ForceFuture {
        let (gate, journal, failing) = (
            self.gate.clone(),
            self.journal.clone(),
            self.failing.clone(),
        );
        journal.push("force asked");
        Box::pin(async move {
            gate.acquire().await.expect("gate").forget();
            if failing.load(Ordering::SeqCst) {
                journal.push("force failed");
                return Err(LogError::Storage("no space left on device".into()));
            }
            journal.push("forced");
            Ok(())
        })
    }
    fn get(&self, g: &Gtid) -> Result<Option<TxnRecord>, LogError> {
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

/// Participants that are never reached in these tests (a check or a
/// delivery would be journalled).
struct Net(Journal);

impl Transport for Net {
    fn phase_one(
        &self,
        _: &str,
        _: Mode,
        _: BranchRequest,
        _trace: Option<tandem_coordinator::model::TraceContext>,
        _: Duration,
    ) -> CallFuture<'_, VoteResponse> {
        self.0.push("check");
        Box::pin(async {
            Ok(VoteResponse {
                yes: true,
                ..Default::default()
            })
        })
    }
    fn phase_two(
        &self,
        _: &str,
        _: Mode,
        commit: bool,
        _: BranchRequest,
        _trace: Option<tandem_coordinator::model::TraceContext>,
        _: Duration,
    ) -> CallFuture<'_, ()> {
        self.0.push(format!("deliver commit={commit}"));
        Box::pin(async { Ok(()) })
    }
}

const OPEN: usize = 1 << 20;

struct Setup {
    coord: Coordinator,
    gate: Arc<Semaphore>,
    failing: Arc<AtomicBool>,
    journal: Journal,
}

impl Setup {
    async fn new() -> Setup {
        let journal = Journal::default();
        let gate = Arc::new(Semaphore::new(OPEN));
        let failing = Arc::new(AtomicBool::new(false));
        let log = Arc::new(GateLog {
            inner: MemLog::new(),
            gate: gate.clone(),
            failing: failing.clone(),
            journal: journal.clone(),
        });
        let env = Environment {
            transport: Some(Arc::new(Net(journal.clone()))),
            ..Environment::default()
        };
        let coord = Coordinator::with_environment(CoordinatorConfig::default(), log, env)
            .expect("coordinator");
        coord.start_recovery().await.expect("recovery");
        Setup {
            coord,
            gate,
            failing,
            journal,
        }
    }

    fn close(&self) {
        let n = self.gate.available_permits() as u32;
        self.gate.try_acquire_many(n).expect("close").forget();
    }

    fn open(&self) {
        self.gate.add_permits(OPEN);
    }

    fn count(&self, entry: &str) -> usize {
        self.journal
            .entries()
            .iter()
            .filter(|e| *e == entry)
            .count()
    }
}

fn branch(endpoint: &str, resource: &str) -> NewBranch {
    NewBranch {
        endpoint: endpoint.into(),
        resource: resource.into(),
        payload: Bytes::from_static(b"x"),
        mode: None,
        after: Vec::new(),
    }
}

async fn prepare(coord: &Coordinator, gtid: Gtid) -> Result<Gtid, String> {
    coord
        .prepare_message(
            gtid,
            branch("http://shop:1", "orders"),
            vec![branch("http://inbox:1", "inbox")],
            Some(Duration::from_secs(30)),
            Vec::new(),
            None,
        )
        .await
        .map_err(|e| e.to_string())
}

// The first PrepareMessage's record is written and its force is on the
// way (a slow disk); the client's call timed out and it repeats it. The
// repeat must not be answered before the record is durable: on that answer
// the business service commits its local transaction, and a crash now
// loses the message (no record: the restarted coordinator knows nothing,
// SubmitMessage is NOT_FOUND, and nothing ever delivers it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_prepare_is_not_answered_before_the_record_is_durable() {
    let s = Setup::new().await;
    let (asked, forced) = (s.count("force asked"), s.count("forced"));
    s.close();
    let gtid = Gtid::now_v7();
    let c = s.coord.clone();
    let first = tokio::spawn(async move { prepare(&c, gtid).await });
    eventually("the first prepare's force is asked", || {
        s.count("force asked") > asked
    })
    .await;
    // The repeat (the first call's client gave up on it).
    let repeat = tokio::time::timeout(Duration::from_millis(500), prepare(&s.coord, gtid)).await;
    let forced_before_answer = s.count("forced") > forced;
    s.open();
    let _ = first.await;
    if let Ok(Ok(_)) = &repeat {
        assert!(
            forced_before_answer,
            "the repeated PrepareMessage answered success while the message's record was not \
             yet durable (journal: {:?})",
            s.journal.entries()
        );
    }
}

// Same window, and then the disk fails: the first call gets an error and
// the coordinator halts. A client must never have been told the message is
// recorded: the repeat's success was a lie, and the business service that
// committed on it has a committed local transaction whose message exists
// nowhere durable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prepare_whose_force_fails_is_never_answered_success() {
    let s = Setup::new().await;
    let (asked, forced) = (s.count("force asked"), s.count("forced"));
    s.close();
    let gtid = Gtid::now_v7();
    let c = s.coord.clone();
    let first = tokio::spawn(async move { prepare(&c, gtid).await });
    eventually("the first prepare's force is asked", || {
        s.count("force asked") > asked
    })
    .await;
    let c = s.coord.clone();
    let repeat = tokio::spawn(async move { prepare(&c, gtid).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The disk fills up: the pending force fails.
    s.failing.store(true, Ordering::SeqCst);
    s.open();
    let _ = forced;
    let first = first.await.expect("task");
    let repeat = repeat.await.expect("task");
    assert!(first.is_err(), "the first prepare must fail: {first:?}");
    assert!(s.coord.is_halted(), "a failed force halts the coordinator");
    assert!(
        repeat.is_err(),
        "the repeated PrepareMessage answered success ({repeat:?}) for a message whose record \
         was never made durable (journal: {:?})",
        s.journal.entries()
    );
}

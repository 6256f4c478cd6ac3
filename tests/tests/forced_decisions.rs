//! A decision that must be forced (a commit; an abort of a client-chosen
//! gtid) is invisible until its force completes: no phase-2 call, no answer
//! and no refusal reveals it before. The log's forces are held at a gate
//! and participants answer phase 1 when the test says, so each window is
//! entered on purpose rather than by timing.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tandem_coordinator::engine::NewBranch;
use tandem_coordinator::log::{ForceFuture, LogError, MemLog, TxnLog};
use tandem_coordinator::model::{
    BranchRecord, BranchState, Decision, Gtid, Mode, TxState, TxnRecord, now_ms,
};
use tandem_coordinator::runtime::{CallFuture, Environment, Transport};
use tandem_coordinator::{Coordinator, CoordinatorConfig};
use tandem_proto::v1::{BranchRequest, VoteResponse};
use tandem_tests::{Journal, eventually};
use tokio::sync::Semaphore;

/// A [`MemLog`] whose forces wait for a permit of `gate` (and fail while
/// `failing`); it journals "force asked" and "forced".
struct GateLog {
    inner: MemLog,
    gate: Arc<Semaphore>,
    failing: AtomicBool,
    journal: Journal,
}

impl TxnLog for GateLog {
    fn write(&self, r: &TxnRecord) -> Result<(), LogError> {
        self.inner.write(r)
    }
    fn force(&self) -> ForceFuture {
        let (gate, journal) = (self.gate.clone(), self.journal.clone());
        journal.push("force asked");
        if self.failing.load(Ordering::SeqCst) {
            let e = LogError::Storage("no space left on device".into());
            return Box::pin(async move { Err(e) });
        }
        Box::pin(async move {
            gate.acquire().await.expect("gate").forget();
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

/// Participants in this process: phase 1 journals "phase1", waits for a
/// permit of `votes`, then votes yes; phase 2 journals "phase2".
struct Net {
    votes: Arc<Semaphore>,
    journal: Journal,
}

impl Transport for Net {
    fn phase_one(
        &self,
        _: &str,
        _: Mode,
        _: BranchRequest,
        _trace: Option<tandem_coordinator::model::TraceContext>,
        _: Duration,
    ) -> CallFuture<'_, VoteResponse> {
        self.journal.push("phase1");
        let votes = self.votes.clone();
        Box::pin(async move {
            votes.acquire().await.expect("votes").forget();
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
        self.journal.push(format!("phase2 commit={commit}"));
        Box::pin(async { Ok(()) })
    }
}

/// Permits of an open gate.
const OPEN: usize = 1 << 20;

struct Setup {
    coord: Coordinator,
    log: Arc<GateLog>,
    /// Forces complete while this has permits.
    gate: Arc<Semaphore>,
    /// Each permit lets one phase-1 call answer yes.
    votes: Arc<Semaphore>,
    journal: Journal,
}

impl Setup {
    async fn new() -> Setup {
        let s = Setup::unstarted(&[]);
        s.coord.start_recovery().await.expect("recovery");
        s
    }

    /// A coordinator over a log holding `records` (as a crashed process
    /// left them), its recovery not started.
    fn unstarted(records: &[TxnRecord]) -> Setup {
        let journal = Journal::default();
        let gate = Arc::new(Semaphore::new(OPEN));
        let votes = Arc::new(Semaphore::new(0));
        let log = Arc::new(GateLog {
            inner: MemLog::new(),
            gate: gate.clone(),
            failing: AtomicBool::new(false),
            journal: journal.clone(),
        });
        for r in records {
            log.write(r).expect("write");
        }
        let net = Arc::new(Net {
            votes: votes.clone(),
            journal: journal.clone(),
        });
        let env = Environment {
            transport: Some(net),
            ..Environment::default()
        };
        let coord = Coordinator::with_environment(CoordinatorConfig::default(), log.clone(), env)
            .expect("coordinator");
        Setup {
            coord,
            log,
            gate,
            votes,
            journal,
        }
    }

    /// From now on forces hang until [`Setup::open`].
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

fn branch() -> NewBranch {
    NewBranch {
        endpoint: "http://p1:1".into(),
        resource: "r".into(),
        payload: Bytes::new(),
        mode: None,
        after: Vec::new(),
    }
}

// Rule 1 (client-chosen gtid): a rollback decides abort while the branch's
// try is out; the try's reply arrives while that abort is being forced.
// The cancel waits for the force, and nobody learns of the abort before
// it is on disk (a crash would lose it, and a repeated Submit start the
// gtid again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_abort_is_invisible_and_sends_nothing_until_durable() {
    let s = Setup::new().await;
    let gtid = Gtid::now_v7();
    let c = s.coord.clone();
    let submit = tokio::spawn(async move {
        c.submit(
            Mode::Tcc,
            None,
            vec![branch()],
            Some(gtid),
            Vec::new(),
            None,
        )
        .await
    });
    eventually("the try is out", || s.count("phase1") == 1).await;
    s.close();
    // What happened before (the start's force) does not count.
    let before = s.journal.entries().len();
    let c = s.coord.clone();
    let rollback = tokio::spawn(async move { c.rollback(gtid, String::new()).await });
    eventually("the abort is being forced", || {
        s.journal.entries()[before..].contains(&"force asked".to_string())
    })
    .await;
    s.votes.add_permits(1);
    eventually("the try's reply is taken", || {
        s.coord.get(gtid).expect("get").branches[0].state != BranchState::Registered
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;

    let journal = s.journal.entries().split_off(before);
    assert!(!journal.contains(&"forced".to_string()));
    assert!(
        !journal.iter().any(|e| e.starts_with("phase2")),
        "a cancel went out before the abort was durable: {journal:?}"
    );
    assert_eq!(s.coord.outcome(gtid).expect("outcome"), None);
    let seen = s.coord.get(gtid).expect("get");
    assert_eq!((seen.state, seen.decision), (TxState::Preparing, None));
    assert!(!rollback.is_finished() && !submit.is_finished());

    s.open();
    let outcome = submit.await.expect("join").expect("submit");
    assert!(matches!(
        outcome.state,
        TxState::Aborted | TxState::Aborting
    ));
    let state = rollback.await.expect("join").expect("rollback").state;
    assert!(matches!(state, TxState::Aborted | TxState::Aborting));
    let journal = s.journal.entries().split_off(before);
    let forced = journal.iter().position(|e| e == "forced").expect("forced");
    let cancel = journal
        .iter()
        .position(|e| e == "phase2 commit=false")
        .expect("cancelled");
    assert!(forced < cancel, "{journal:?}");
    assert_eq!(
        s.coord.outcome(gtid).expect("outcome"),
        Some(Decision::Abort)
    );
}

/// An interactive transaction with one tried branch, its commit decision
/// made and hanging in the force.
async fn commit_being_forced(s: &Setup) -> (Gtid, tokio::task::JoinHandle<()>) {
    let gtid = s
        .coord
        .begin(Mode::Tcc, None, None, Vec::new(), None)
        .await
        .expect("begin");
    s.votes.add_permits(1);
    s.coord.enlist(gtid, branch()).await.expect("enlist");
    s.close();
    let asked = s.count("force asked");
    let c = s.coord.clone();
    let commit = tokio::spawn(async move {
        let state = c.commit(gtid).await.expect("commit");
        assert!(matches!(state, TxState::Committed | TxState::Committing));
    });
    eventually("the commit is being forced", || {
        s.count("force asked") > asked
    })
    .await;
    (gtid, commit)
}

// Rule 2: a refusal names the state others may see. An Enlist during the
// commit's force is refused without telling that a commit was decided
// (a crash now reads back as undecided, and aborts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_during_a_commit_force_does_not_reveal_it() {
    let s = Setup::new().await;
    let (gtid, commit) = commit_being_forced(&s).await;
    let err = s.coord.enlist(gtid, branch()).await.expect_err("refused");
    let err = err.to_string();
    assert!(!err.contains("COMMITTING"), "decision leaked: {err}");
    assert_eq!(s.coord.get(gtid).expect("get").state, TxState::Active);
    assert_eq!(s.coord.outcome(gtid).expect("outcome"), None);
    // A rollback is answered once the decision is durable, never before.
    let c = s.coord.clone();
    let rollback = tokio::spawn(async move { c.rollback(gtid, String::new()).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !rollback.is_finished(),
        "rollback answered before the force"
    );
    s.open();
    commit.await.expect("commit");
    let err = rollback.await.expect("join").expect_err("refused");
    assert!(err.to_string().contains("COMMITT"), "{err}");
}

/// A record a crashed coordinator left: decided commit, one tried branch.
fn committing_record() -> TxnRecord {
    let now = now_ms();
    let mut rec = TxnRecord::new(
        Gtid::now_v7(),
        Mode::Tcc,
        TxState::Committing,
        now,
        now + 60_000,
    );
    rec.decision = Some(Decision::Commit);
    let b = branch();
    rec.branches.push(BranchRecord {
        id: 1,
        mode: Mode::TwoPhase,
        endpoint: b.endpoint,
        resource: b.resource,
        payload: b.payload,
        reply: Bytes::new(),
        state: BranchState::Prepared,
        attempts: 0,
        last_error: String::new(),
        next_attempt_ms: 0,
        updated_ms: now,
        resolution: None,
        after: Vec::new(),
    });
    rec
}

// Rule 5: what a crashed process wrote may read back without being on
// disk (sled's writes reach the OS before they are synced). A COMMITTING
// record read back is acted on (commit calls) and told only after the
// start has forced the log: a power cut before that could undo it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_forces_what_it_read_back_before_acting_on_it() {
    let rec = committing_record();
    let s = Setup::unstarted(std::slice::from_ref(&rec));
    s.close();
    let c = s.coord.clone();
    let start = tokio::spawn(async move { c.start_recovery().await.map(drop) });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let journal = s.journal.entries();
    assert!(
        !journal.iter().any(|e| e.starts_with("phase2")),
        "commit sent on a record not known to be durable: {journal:?}"
    );
    assert!(!start.is_finished(), "served before the log was forced");

    s.open();
    start.await.expect("join").expect("started");
    eventually("the commit is sent", || s.count("phase2 commit=true") == 1).await;
    let journal = s.journal.entries();
    let forced = journal.iter().position(|e| e == "forced").expect("forced");
    let commit = journal.iter().position(|e| e == "phase2 commit=true");
    assert!(commit.is_some_and(|c| forced < c), "{journal:?}");
}

// A start whose force fails serves nothing: the coordinator halts (fails
// closed) instead of acting on records that may not be durable.
#[tokio::test]
async fn a_start_whose_force_fails_halts() {
    let s = Setup::unstarted(&[committing_record()]);
    s.log.failing.store(true, Ordering::SeqCst);
    let err = s.coord.start_recovery().await.expect_err("halted");
    assert!(err.to_string().contains("no space left"), "{err}");
    assert!(s.coord.is_halted());
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(s.count("phase1") + s.count("phase2 commit=true"), 0);
}

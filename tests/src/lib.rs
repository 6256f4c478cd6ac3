//! Test support for Tandem's workspace integration tests: a coordinator on
//! `127.0.0.1:0`, scripted participants that vote no, hang, fail phase 2 or
//! vanish, and a journal shared by a recording log and the participants so
//! tests can check the order of events across both.

pub mod access;
pub mod down_net;
pub mod pg;
pub mod process;
pub mod webdriver;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tandem_coordinator::RunningCoordinator;
use tandem_coordinator::config::{CoordinatorConfig, RetryPolicy};
use tandem_coordinator::log::{ForceFuture, LogError, LogStats, MemLog, TxnLog};
use tandem_coordinator::model::{Gtid, TxState, TxnRecord};
use tandem_sdk::{
    Branch, BranchContext, HandlerError, ParticipantServer, RunningParticipant, Saga, Tcc,
    TwoPhase, Vote,
};

/// An ordered list of what happened, shared across log and participants.
#[derive(Clone, Default)]
pub struct Journal(Arc<Mutex<Vec<String>>>);

impl Journal {
    /// Appends one entry.
    pub fn push(&self, entry: impl Into<String>) {
        self.0.lock().expect("journal").push(entry.into());
    }

    /// Everything so far.
    pub fn entries(&self) -> Vec<String> {
        self.0.lock().expect("journal").clone()
    }

    /// Index of the first entry equal to `entry`.
    pub fn position(&self, entry: &str) -> Option<usize> {
        self.entries().iter().position(|e| e == entry)
    }
}

/// A coordinator config for tests: any port, short deadlines and retries.
pub fn test_config() -> CoordinatorConfig {
    CoordinatorConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        call_timeout: Duration::from_millis(500),
        retry: RetryPolicy {
            initial: Duration::from_millis(10),
            max: Duration::from_millis(50),
            ..RetryPolicy::default()
        },
        ..CoordinatorConfig::default()
    }
}

/// Starts a coordinator over `log` with [`test_config`].
pub async fn start_coordinator(log: Arc<dyn TxnLog>) -> RunningCoordinator {
    RunningCoordinator::start(test_config(), log)
        .await
        .expect("start coordinator")
}

/// How a [`Scripted`] participant behaves.
#[derive(Default)]
pub struct Script {
    /// Vote no with this reason.
    pub vote_no: Option<String>,
    /// Sleep this long in prepare (longer than the call timeout = "hangs").
    pub prepare_delay: Duration,
    /// Fail prepare / try with this error (after doing nothing).
    pub fail_phase_one: Option<String>,
    /// Fail this many prepare / try calls first (after doing nothing),
    /// with an error that may pass.
    pub phase_one_failures: AtomicU32,
    /// Sleep this long in each commit / rollback call.
    pub phase_two_delay: Duration,
    /// Fail this many commit / rollback calls before succeeding.
    pub phase_two_failures: AtomicU32,
    /// Answer every commit / rollback call that this will never succeed.
    pub phase_two_never: Option<String>,
}

/// A participant whose behaviour is set by a [`Script`] and which counts
/// every call (and journals it, if given a journal). It serves as a 2PC
/// resource or as a TCC one (prepare = try, commit = confirm, rollback =
/// cancel), and keeps the branches whose phase 1 said yes as "held" until
/// their phase 2.
pub struct Scripted {
    /// The script.
    pub script: Script,
    /// Prepare / try calls received.
    pub prepares: AtomicUsize,
    /// Commit / confirm calls that succeeded.
    pub commits: AtomicUsize,
    /// Rollback / cancel calls that succeeded.
    pub rollbacks: AtomicUsize,
    /// Branches reserved by a yes and not yet confirmed or cancelled.
    pub held: Mutex<HashSet<(Gtid, u32)>>,
    /// Phase-2 calls failed on purpose.
    pub failed_calls: AtomicUsize,
    /// When each of those failures happened.
    pub failed_at: Mutex<Vec<std::time::Instant>>,
    name: String,
    journal: Option<Journal>,
}

impl Scripted {
    /// A participant named `name` (used in journal entries).
    pub fn new(name: &str, script: Script, journal: Option<Journal>) -> Arc<Self> {
        Arc::new(Scripted {
            script,
            prepares: AtomicUsize::new(0),
            commits: AtomicUsize::new(0),
            rollbacks: AtomicUsize::new(0),
            held: Mutex::new(HashSet::new()),
            failed_calls: AtomicUsize::new(0),
            failed_at: Mutex::new(Vec::new()),
            name: name.to_string(),
            journal,
        })
    }

    /// A participant that votes yes and acknowledges everything.
    pub fn yes(name: &str) -> Arc<Self> {
        Self::new(name, Script::default(), None)
    }

    /// A participant that votes yes but fails every phase-2 call until the
    /// test sets `script.phase_two_failures` back to 0.
    pub fn phase_two_down(name: &str) -> Arc<Self> {
        let script = Script {
            phase_two_failures: u32::MAX.into(),
            ..Script::default()
        };
        Self::new(name, script, None)
    }

    /// (prepares, commits, rollbacks).
    pub fn counts(&self) -> (usize, usize, usize) {
        (
            self.prepares.load(Ordering::SeqCst),
            self.commits.load(Ordering::SeqCst),
            self.rollbacks.load(Ordering::SeqCst),
        )
    }

    /// Branches held right now.
    pub fn held_count(&self) -> usize {
        self.held.lock().expect("held").len()
    }

    /// Serves it as 2PC resource "r" on `127.0.0.1:0`.
    pub async fn serve(self: &Arc<Self>) -> RunningParticipant {
        spawn(ParticipantServer::new().two_phase("r", self.clone())).await
    }

    /// Serves it as TCC resource "r" on `127.0.0.1:0`.
    pub async fn serve_tcc(self: &Arc<Self>) -> RunningParticipant {
        spawn(ParticipantServer::new().tcc("r", self.clone())).await
    }

    /// Serves it as saga resource "r" on `127.0.0.1:0` (action = prepare,
    /// compensation = rollback in the counts and the journal).
    pub async fn serve_saga(self: &Arc<Self>) -> RunningParticipant {
        spawn(ParticipantServer::new().saga("r", self.clone())).await
    }

    /// Serves it as resource "r" (TCC when `tcc`, else 2PC), resolving
    /// branches in doubt for 300 ms with the coordinator at `coordinator`.
    pub async fn serve_resolving(
        self: &Arc<Self>,
        tcc: bool,
        coordinator: &str,
    ) -> RunningParticipant {
        let server =
            ParticipantServer::new().resolve_in_doubt(coordinator, Duration::from_millis(300));
        spawn(if tcc {
            server.tcc("r", self.clone())
        } else {
            server.two_phase("r", self.clone())
        })
        .await
    }

    async fn phase_one(&self, ctx: &BranchContext) -> Result<Vote, HandlerError> {
        self.prepares.fetch_add(1, Ordering::SeqCst);
        if !self.script.prepare_delay.is_zero() {
            tokio::time::sleep(self.script.prepare_delay).await;
        }
        if self
            .script
            .phase_one_failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            self.note("prepare-failed");
            return Err(HandlerError::new(format!("{} is briefly down", self.name)));
        }
        self.note("prepare");
        if let Some(error) = &self.script.fail_phase_one {
            return Err(HandlerError::new(error.clone()));
        }
        Ok(match &self.script.vote_no {
            Some(reason) => Vote::no(reason.clone()),
            None => {
                self.held
                    .lock()
                    .expect("held")
                    .insert((ctx.gtid, ctx.branch_id));
                Vote::yes_with(format!("ok from {}", self.name))
            }
        })
    }

    fn note(&self, what: &str) {
        if let Some(j) = &self.journal {
            j.push(format!("{what}:{}", self.name));
        }
    }

    async fn phase_two(
        &self,
        ctx: &BranchContext,
        what: &str,
        counter: &AtomicUsize,
    ) -> Result<(), HandlerError> {
        if !self.script.phase_two_delay.is_zero() {
            tokio::time::sleep(self.script.phase_two_delay).await;
        }
        if let Some(why) = &self.script.phase_two_never {
            self.failed_calls.fetch_add(1, Ordering::SeqCst);
            return Err(HandlerError::permanent(why.clone()));
        }
        let left = self.script.phase_two_failures.load(Ordering::SeqCst);
        if left > 0 {
            self.script
                .phase_two_failures
                .store(left - 1, Ordering::SeqCst);
            self.failed_calls.fetch_add(1, Ordering::SeqCst);
            self.failed_at
                .lock()
                .expect("failed_at")
                .push(std::time::Instant::now());
            return Err(HandlerError::new(format!(
                "{} is down for maintenance",
                self.name
            )));
        }
        self.note(what);
        counter.fetch_add(1, Ordering::SeqCst);
        self.held
            .lock()
            .expect("held")
            .remove(&(ctx.gtid, ctx.branch_id));
        Ok(())
    }
}

impl TwoPhase for Scripted {
    async fn prepare(&self, ctx: &BranchContext, _payload: &[u8]) -> Result<Vote, HandlerError> {
        self.phase_one(ctx).await
    }

    async fn commit(&self, ctx: &BranchContext, _payload: &[u8]) -> Result<(), HandlerError> {
        self.phase_two(ctx, "commit", &self.commits).await
    }

    async fn rollback(&self, ctx: &BranchContext, _payload: &[u8]) -> Result<(), HandlerError> {
        self.phase_two(ctx, "rollback", &self.rollbacks).await
    }
}

impl Tcc for Scripted {
    async fn try_(&self, ctx: &BranchContext, _payload: &[u8]) -> Result<Vote, HandlerError> {
        self.phase_one(ctx).await
    }

    async fn confirm(&self, ctx: &BranchContext, _payload: &[u8]) -> Result<(), HandlerError> {
        self.phase_two(ctx, "commit", &self.commits).await
    }

    async fn cancel(&self, ctx: &BranchContext, _payload: &[u8]) -> Result<(), HandlerError> {
        self.phase_two(ctx, "rollback", &self.rollbacks).await
    }
}

impl Saga for Scripted {
    async fn action(&self, ctx: &BranchContext, _payload: &[u8]) -> Result<Vote, HandlerError> {
        self.phase_one(ctx).await
    }

    async fn compensate(&self, ctx: &BranchContext, _payload: &[u8]) -> Result<(), HandlerError> {
        self.phase_two(ctx, "rollback", &self.rollbacks).await
    }
}

/// Spawns `server` on `127.0.0.1:0`.
pub async fn spawn(server: ParticipantServer) -> RunningParticipant {
    server
        .spawn("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("start participant")
}

/// A [`MemLog`] that journals each write's state and each completed force,
/// so tests can see whether the decision was durable before phase 2.
pub struct RecordingLog {
    inner: MemLog,
    journal: Journal,
}

impl RecordingLog {
    /// A recording log writing to `journal`.
    pub fn new(journal: Journal) -> Self {
        RecordingLog {
            inner: MemLog::new(),
            journal,
        }
    }
}

impl TxnLog for RecordingLog {
    fn write(&self, record: &TxnRecord) -> Result<(), LogError> {
        self.journal.push(format!("write:{}", record.state));
        self.inner.write(record)
    }

    fn force(&self) -> ForceFuture {
        let (journal, fut) = (self.journal.clone(), self.inner.force());
        Box::pin(async move {
            // Let other tasks run first: a coordinator that did not await the
            // force would get its phase-2 calls out ahead of this entry.
            tokio::time::sleep(Duration::from_millis(20)).await;
            let r = fut.await;
            journal.push("forced");
            r
        })
    }

    fn may_have_lost_starts(&self) -> bool {
        self.inner.may_have_lost_starts()
    }

    fn get(&self, gtid: &Gtid) -> Result<Option<TxnRecord>, LogError> {
        self.inner.get(gtid)
    }

    fn remove(&self, gtid: &Gtid) -> Result<(), LogError> {
        self.inner.remove(gtid)
    }

    fn scan(
        &self,
        after: Option<&Gtid>,
        states: &[TxState],
        limit: usize,
    ) -> Result<Vec<TxnRecord>, LogError> {
        self.inner.scan(after, states, limit)
    }

    fn stats(&self) -> LogStats {
        self.inner.stats()
    }
}

/// Two branches on resource "r" with payloads "x" and "y": the transaction
/// most tests run.
pub fn pair(a: &RunningParticipant, b: &RunningParticipant) -> Vec<Branch> {
    vec![
        Branch::new(a.url(), "r", "x"),
        Branch::new(b.url(), "r", "y"),
    ]
}

/// Polls `f` every 10 ms until it returns true or 10 s pass.
pub async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for: {what}");
}

/// Like [`eventually`], for a check that must await.
pub async fn eventually_async<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..1000 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for: {what}");
}

/// The README's Rust examples, compiled as doctests so they stay true.
#[doc = include_str!("../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

/// The book's Rust examples (docs/book/src), one item per chapter with Rust
/// code, compiled as doctests so they stay true. A chapter that gains its
/// first Rust block gets a line here.
#[cfg(doctest)]
pub mod book {
    #[doc = include_str!("../../docs/book/src/participants.md")]
    pub struct Participants;
    #[doc = include_str!("../../docs/book/src/postgres.md")]
    pub struct Postgres;
    #[doc = include_str!("../../docs/book/src/clients.md")]
    pub struct Clients;
    #[doc = include_str!("../../docs/book/src/cluster.md")]
    pub struct Cluster;
    #[doc = include_str!("../../docs/book/src/security.md")]
    pub struct Security;
    #[doc = include_str!("../../docs/book/src/metrics.md")]
    pub struct Metrics;
    #[doc = include_str!("../../docs/book/src/transactions.md")]
    pub struct Transactions;
    #[doc = include_str!("../../docs/book/src/runbook.md")]
    pub struct Runbook;
    #[doc = include_str!("../../docs/book/src/saga.md")]
    pub struct Saga;
    #[doc = include_str!("../../docs/book/src/messages.md")]
    pub struct Messages;
}

/// xorshift64*: enough randomness for picking transfers and kill moments,
/// reproducible from the seed a test prints.
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

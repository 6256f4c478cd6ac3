//! Simulated participant services, each run by two replicas through the
//! SDK's own dispatch and barrier gate (`ParticipantServer::into_participant`).
//!
//! The replicas of one service share ONE barrier store (the SDK's
//! `MemBarrier`: its per-branch lock is held by the gate for the whole
//! step, handler included, as `PgBarrier`'s row lock is in the handler's
//! transaction) and one business state (the holds): repeated, reordered
//! and concurrent calls of one branch race between replicas exactly as
//! they would between two processes on one database. The business state
//! notes every effect, and who asked for it (the coordinator, or in-doubt
//! resolution / an operator, which call with epoch 0), so the invariants
//! can compare what happened with what was decided.
//!
//! Transactional messages: every service also takes deliveries (the
//! SDK's `Message`, behind the same barrier gate) and serves the business
//! service's back-check (`MessageCheck`) over one [`Orders`] database of
//! the world, whose rule is `PgMessages`': a local transaction commits
//! only if no row exists for its gtid, and a check closes a gtid with no
//! row (inserts `false`) before answering.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tandem_coordinator::model::Gtid;
use tandem_coordinator::runtime::Clock;
use tandem_sdk::barrier::MemBarrier;
use tandem_sdk::server::ParticipantService;
use tandem_sdk::{
    BranchContext, HandlerError, Message, MessageCheck, ParticipantServer, Saga, Tcc, TwoPhase,
    Vote,
};

use crate::rng::Rng;

/// A branch: (gtid, branch id).
pub type Key = (Gtid, u32);

/// One saga action (a try of the saga resource), from start to answer.
#[derive(Clone, Debug)]
pub struct SagaAction {
    pub gtid: Gtid,
    pub branch: u32,
    pub started: u64,
    /// When it answered yes (`None`: no, failed, or still running).
    pub done: Option<u64>,
    /// The steps it runs after, as the engine orders them.
    pub after: Vec<u32>,
}

/// A one-shot saga step's payload: its index and the steps it runs after
/// (a bit each), behind a marker.
pub fn saga_payload(i: usize, after: &[u32]) -> bytes::Bytes {
    let mask = after.iter().fold(0u8, |m, d| m | (1 << d));
    bytes::Bytes::from(vec![i as u8, mask, SAGA_GRAPH_MARK, 0, 0, 0, 0, 0])
}

const SAGA_GRAPH_MARK: u8 = 0xA5;

/// The steps saga step `branch` runs after: from its payload when the
/// client named them, else the step before (an interactive saga's steps
/// run in the order they were enlisted).
fn saga_after(branch: u32, payload: &[u8]) -> Vec<u32> {
    match payload {
        [_, mask, SAGA_GRAPH_MARK, ..] => (1..8).filter(|d| mask & (1 << d) != 0).collect(),
        _ => (branch > 1).then_some(branch - 1).into_iter().collect(),
    }
}

/// One phase-2 effect a handler applied.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Applied {
    pub gtid: Gtid,
    pub branch: u32,
    /// Its place in the run's order of handler events.
    pub seq: u64,
    /// A saga step's (the saga resource).
    pub saga: bool,
    pub commit: bool,
    /// Asked by the coordinator (epoch ≥ 1); else by in-doubt resolution
    /// or an operator's hand (epoch 0).
    pub by_coordinator: bool,
    /// A reservation was there to use or release.
    pub had_hold: bool,
}

/// One message delivery a handler applied.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Delivered {
    pub gtid: Gtid,
    pub branch: u32,
    /// Its place in the run's order of handler events.
    pub seq: u64,
    /// Asked by the coordinator (epoch ≥ 1); else by in-doubt resolution
    /// or an operator's hand (epoch 0).
    pub by_coordinator: bool,
}

/// The business service's database for the local transactions of its
/// transactional messages, with `PgMessages`' rule: one row per message
/// gtid, `true` once its local transaction committed, `false` once a
/// back-check closed it first. The simulation runs on one thread: each
/// method is one atomic transaction.
#[derive(Default)]
pub struct Orders {
    rows: Mutex<BTreeMap<Gtid, bool>>,
    /// Until when (simulated ms) the database is unreachable: local
    /// transactions and back-checks fail.
    pub down_until: AtomicU64,
    /// Back-checks answered (for the report).
    pub checks: AtomicU64,
    /// Gtids a back-check (or the operator) closed before any local
    /// commit (for the report).
    pub closed: AtomicU64,
}

impl Orders {
    /// Whether the database is unreachable at `now_ms`.
    pub fn down(&self, now_ms: u64) -> bool {
        now_ms < self.down_until.load(Ordering::SeqCst)
    }

    /// The local transaction of message `gtid` commits (writing its row):
    /// only if no row exists for the gtid, else it fails (a back-check
    /// closed it, or it committed already).
    pub fn commit(&self, gtid: Gtid) -> bool {
        match self.rows.lock().unwrap().entry(gtid) {
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert(true);
                true
            }
            std::collections::btree_map::Entry::Occupied(_) => false,
        }
    }

    /// The back-check of message `gtid`: a gtid with no row is closed
    /// (`false`: its local transaction can no longer commit), then the
    /// row's value is the answer.
    pub fn check(&self, gtid: Gtid) -> bool {
        *self.rows.lock().unwrap().entry(gtid).or_insert_with(|| {
            self.closed.fetch_add(1, Ordering::Relaxed);
            false
        })
    }

    /// Whether message `gtid`'s local transaction committed (the truth, for
    /// the invariants and the operator).
    pub fn committed(&self, gtid: &Gtid) -> bool {
        self.rows.lock().unwrap().get(gtid) == Some(&true)
    }

    /// The row of `gtid`, if any (for reports).
    pub fn row(&self, gtid: &Gtid) -> Option<bool> {
        self.rows.lock().unwrap().get(gtid).copied()
    }

    /// How many local transactions committed.
    pub fn commits(&self) -> usize {
        self.rows.lock().unwrap().values().filter(|v| **v).count()
    }
}

/// The business state of one participant service, shared by its replicas
/// (one database).
#[derive(Default)]
pub struct Business {
    /// Reservations held, since when (simulated ms).
    pub holds: Mutex<BTreeMap<Key, u64>>,
    /// When each branch's first try started (for in-doubt resolution).
    pub tried_at: Mutex<BTreeMap<Key, u64>>,
    /// Every phase-2 effect, in order.
    pub applied: Mutex<Vec<Applied>>,
    /// Every saga action.
    pub saga_actions: Mutex<Vec<SagaAction>>,
    /// When each message delivery was first asked for (for in-doubt
    /// resolution).
    pub delivery_started: Mutex<BTreeMap<Key, u64>>,
    /// Every message delivery applied, in order.
    pub delivered: Mutex<Vec<Delivered>>,
    /// Broken rules seen here (a second try ran, confirm with nothing held,
    /// a phase-2 call the barrier refused as contradicting an earlier one).
    pub violations: Mutex<Vec<String>>,
    /// Until when (simulated ms) phase 2 fails permanently (a ledger
    /// closed for repair): the coordinator marks the branch STUCK.
    pub broken_until: AtomicU64,
}

impl Business {
    pub fn violation(&self, v: String) {
        self.violations.lock().unwrap().push(v);
    }
}

/// The handler each replica runs: one for both protocols.
struct Ledger {
    business: Arc<Business>,
    rng: Arc<Mutex<Rng>>,
    clock: Clock,
    faults_on: Arc<AtomicBool>,
    /// The world's order of handler events (across participants).
    seq: Arc<AtomicU64>,
}

impl Ledger {
    fn draw<T>(&self, f: impl FnOnce(&mut Rng) -> T) -> T {
        f(&mut self.rng.lock().unwrap())
    }

    /// The next place in the world's order of handler events.
    fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::SeqCst)
    }

    async fn reserve(&self, ctx: &BranchContext, payload: &[u8]) -> Result<Vote, HandlerError> {
        let saga = ctx.resource == SAGA_RESOURCE;
        let started = self.next_seq();
        let vote = self.reserve_inner(ctx).await;
        if saga {
            let done = matches!(vote, Ok(Vote::Yes { .. })).then(|| self.next_seq());
            self.business.saga_actions.lock().unwrap().push(SagaAction {
                gtid: ctx.gtid,
                branch: ctx.branch_id,
                started,
                done,
                after: saga_after(ctx.branch_id, payload),
            });
        }
        vote
    }

    async fn reserve_inner(&self, ctx: &BranchContext) -> Result<Vote, HandlerError> {
        let key = (ctx.gtid, ctx.branch_id);
        let now = self.clock.now_ms();
        self.business
            .tried_at
            .lock()
            .unwrap()
            .entry(key)
            .or_insert(now);
        let on = self.faults_on.load(Ordering::SeqCst);
        // A saga step says no more often: its compensations (in the
        // graph's reverse) are what the saga invariants look at.
        let no_chance = if ctx.resource == SAGA_RESOURCE {
            0.15
        } else {
            0.05
        };
        let (work, no, fail_before, fail_after) = self.draw(|r| {
            (
                r.ms(0, 8),
                r.chance(no_chance),
                on && r.chance(0.01),
                on && r.chance(0.02),
            )
        });
        // The work takes time, under the barrier's lock for this branch.
        tokio::time::sleep(work).await;
        if fail_before {
            return Err(HandlerError::new("database unavailable (simulated)"));
        }
        if ctx.resource == SAGA_RESOURCE && self.business.holds.lock().unwrap().contains_key(&key) {
            // A saga action run again (a forward retry after an error or a
            // lost answer) answers from what its first run committed, as
            // the `Saga` contract asks: nothing is done twice.
            return Ok(Vote::yes_with(format!("hold-{}", ctx.branch_id)));
        }
        if no {
            return Ok(Vote::no("insufficient funds"));
        }
        let again = self
            .business
            .holds
            .lock()
            .unwrap()
            .insert(key, now)
            .is_some();
        if again {
            self.business.violation(format!(
                "{} branch {}: a second try reserved again (the barrier let two tries run)",
                ctx.gtid, ctx.branch_id
            ));
        }
        if fail_after {
            return Err(HandlerError::new(
                "connection lost after reserving (simulated)",
            ));
        }
        Ok(Vote::yes_with(format!("hold-{}", ctx.branch_id)))
    }

    /// A phase-2 call's (or a delivery's) work and faults: it takes time,
    /// is refused for good while the service is closed for repair (the
    /// coordinator's calls only), and fails now and then in a way that
    /// passes.
    async fn phase_two_faults(&self, ctx: &BranchContext, what: &str) -> Result<(), HandlerError> {
        let on = self.faults_on.load(Ordering::SeqCst);
        let (work, fail) = self.draw(|r| (r.ms(0, 8), on && r.chance(0.03)));
        tokio::time::sleep(work).await;
        let by_coordinator = ctx.epoch != 0;
        if by_coordinator && self.clock.now_ms() < self.business.broken_until.load(Ordering::SeqCst)
        {
            return Err(HandlerError::permanent(format!(
                "{what} closed for repair (simulated)"
            )));
        }
        if fail {
            return Err(HandlerError::new("database unavailable (simulated)"));
        }
        Ok(())
    }

    async fn settle(&self, ctx: &BranchContext, commit: bool) -> Result<(), HandlerError> {
        self.phase_two_faults(ctx, "ledger").await?;
        let by_coordinator = ctx.epoch != 0;
        let key = (ctx.gtid, ctx.branch_id);
        let had_hold = self.business.holds.lock().unwrap().remove(&key).is_some();
        if commit && !had_hold {
            self.business.violation(format!(
                "{} branch {}: confirm ran with nothing reserved",
                ctx.gtid, ctx.branch_id
            ));
        }
        self.business.applied.lock().unwrap().push(Applied {
            gtid: ctx.gtid,
            branch: ctx.branch_id,
            seq: self.next_seq(),
            saga: ctx.resource == SAGA_RESOURCE,
            commit,
            by_coordinator,
            had_hold,
        });
        Ok(())
    }
}

impl Ledger {
    /// Applies a message delivery (called through the barrier gate, which
    /// stored `Tried` first): fails before applying anything, or applies
    /// it and succeeds. A handler that failed after applying would deliver
    /// again on the retry (the SDK's `Message` says so), which is not the
    /// coordinator's to prevent.
    async fn deliver_inner(&self, ctx: &BranchContext) -> Result<(), HandlerError> {
        let key = (ctx.gtid, ctx.branch_id);
        self.business
            .delivery_started
            .lock()
            .unwrap()
            .entry(key)
            .or_insert(self.clock.now_ms());
        self.phase_two_faults(ctx, "inbox").await?;
        self.business.delivered.lock().unwrap().push(Delivered {
            gtid: ctx.gtid,
            branch: ctx.branch_id,
            seq: self.next_seq(),
            by_coordinator: ctx.epoch != 0,
        });
        Ok(())
    }
}

impl Message for Ledger {
    async fn deliver(&self, ctx: &BranchContext, _: &[u8]) -> Result<(), HandlerError> {
        self.deliver_inner(ctx).await
    }
}

/// The business service's back-check, served by every service's replicas
/// over the world's one [`Orders`] database (the business service runs
/// beside each): it fails while the database is down, or now and then
/// while faults last, and otherwise answers (atomically) what
/// [`Orders::check`] does.
struct OrdersCheck {
    orders: Arc<Orders>,
    rng: Arc<Mutex<Rng>>,
    clock: Clock,
    faults_on: Arc<AtomicBool>,
}

impl MessageCheck for OrdersCheck {
    async fn check(&self, ctx: &BranchContext, _: &[u8]) -> Result<bool, HandlerError> {
        let on = self.faults_on.load(Ordering::SeqCst);
        let (work, fail) = {
            let mut r = self.rng.lock().unwrap();
            (r.ms(0, 8), on && r.chance(0.03))
        };
        tokio::time::sleep(work).await;
        if fail || self.orders.down(self.clock.now_ms()) {
            return Err(HandlerError::new("orders database unavailable (simulated)"));
        }
        self.orders.checks.fetch_add(1, Ordering::Relaxed);
        Ok(self.orders.check(ctx.gtid))
    }
}

impl Tcc for Ledger {
    async fn try_(&self, ctx: &BranchContext, payload: &[u8]) -> Result<Vote, HandlerError> {
        self.reserve(ctx, payload).await
    }
    async fn confirm(&self, ctx: &BranchContext, _: &[u8]) -> Result<(), HandlerError> {
        self.settle(ctx, true).await
    }
    async fn cancel(&self, ctx: &BranchContext, _: &[u8]) -> Result<(), HandlerError> {
        self.settle(ctx, false).await
    }
}

/// A saga step through the SDK's saga handler (its in-doubt resolution
/// leaves compensations to the coordinator): the action reserves, the
/// compensation releases, and a completed saga uses the reservation.
impl Saga for Ledger {
    async fn action(&self, ctx: &BranchContext, payload: &[u8]) -> Result<Vote, HandlerError> {
        self.reserve(ctx, payload).await
    }
    async fn compensate(&self, ctx: &BranchContext, _: &[u8]) -> Result<(), HandlerError> {
        self.settle(ctx, false).await
    }
    async fn complete(&self, ctx: &BranchContext, _: &[u8]) -> Result<(), HandlerError> {
        self.settle(ctx, true).await
    }
}

impl TwoPhase for Ledger {
    async fn prepare(&self, ctx: &BranchContext, payload: &[u8]) -> Result<Vote, HandlerError> {
        self.reserve(ctx, payload).await
    }
    async fn commit(&self, ctx: &BranchContext, _: &[u8]) -> Result<(), HandlerError> {
        self.settle(ctx, true).await
    }
    async fn rollback(&self, ctx: &BranchContext, _: &[u8]) -> Result<(), HandlerError> {
        self.settle(ctx, false).await
    }
}

/// The resource a branch of protocol `tcc` names at a participant.
pub fn resource(tcc: bool) -> &'static str {
    if tcc { "tcc" } else { "2pc" }
}

/// The resource of saga steps (the same ledger behind the SDK's saga
/// handler; a saga step is called with TCC's RPCs), so that the
/// participant tells a saga's calls apart for the saga invariants.
pub const SAGA_RESOURCE: &str = "saga";

/// The resource of message deliveries.
pub const DELIVERY_RESOURCE: &str = "inbox";

/// The resource of the business service's back-check (a message's
/// branch 1).
pub const CHECK_RESOURCE: &str = "orders";

/// The resource a branch of `mode` names.
pub fn resource_of(mode: tandem_coordinator::model::Mode) -> &'static str {
    use tandem_coordinator::model::Mode;
    match mode {
        Mode::TwoPhase => resource(false),
        Mode::Tcc => resource(true),
        Mode::Saga => SAGA_RESOURCE,
        Mode::Msg => DELIVERY_RESOURCE,
    }
}

/// One participant service: its replicas, their shared barrier store and
/// business state.
pub struct SimParticipant {
    pub business: Arc<Business>,
    pub barrier: MemBarrier,
    pub replicas: Vec<ParticipantService>,
    /// Calls sent to both replicas at once (a duplicate racing the first).
    pub races: AtomicU64,
}

impl SimParticipant {
    pub fn new(
        replicas: usize,
        rng: Arc<Mutex<Rng>>,
        clock: Clock,
        faults_on: Arc<AtomicBool>,
        seq: Arc<AtomicU64>,
        orders: Arc<Orders>,
    ) -> SimParticipant {
        let business = Arc::new(Business::default());
        let barrier = MemBarrier::new();
        let replicas = (0..replicas)
            .map(|_| {
                let ledger = || Ledger {
                    business: business.clone(),
                    rng: rng.clone(),
                    clock: clock.clone(),
                    faults_on: faults_on.clone(),
                    seq: seq.clone(),
                };
                ParticipantServer::new()
                    .tcc(resource(true), ledger())
                    .saga(SAGA_RESOURCE, ledger())
                    .two_phase(resource(false), ledger())
                    .message(DELIVERY_RESOURCE, ledger())
                    .check(
                        CHECK_RESOURCE,
                        OrdersCheck {
                            orders: orders.clone(),
                            rng: rng.clone(),
                            clock: clock.clone(),
                            faults_on: faults_on.clone(),
                        },
                    )
                    .barrier(barrier.clone())
                    .into_participant()
                    .expect("distinct resources")
            })
            .collect();
        SimParticipant {
            business,
            barrier,
            replicas,
            races: AtomicU64::new(0),
        }
    }

    /// Branches whose try (or delivery) started before `before` (ms) and
    /// whose barrier record is still `Tried`: what in-doubt resolution
    /// asks about.
    pub async fn in_doubt(&self, before: u64) -> Vec<(Key, String)> {
        use tandem_sdk::barrier::BarrierStore;
        let mut tried = self.business.tried_at.lock().unwrap().clone();
        tried.extend(self.business.delivery_started.lock().unwrap().clone());
        let found = self
            .barrier
            .in_doubt(u64::MAX, None, usize::MAX)
            .await
            .unwrap_or_default();
        found
            .into_iter()
            .map(|d| ((d.key.gtid, d.key.branch_id), d.resource))
            .filter(|(k, _)| tried.get(k).is_none_or(|t| *t < before))
            .collect()
    }
}

/// How long a retry of an in-doubt round waits: the SDK's own default.
pub const IN_DOUBT_AFTER: Duration = Duration::from_secs(3);

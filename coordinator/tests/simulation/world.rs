//! The world of one seed and its run: coordinator instances (one on a
//! local log that crashes, or two or three on a shared store, with clock
//! skew, pauses past the lease and past retention, kills and restarts),
//! participants of two replicas each, clients that follow redirects (and
//! send transactional messages, over a business database of their own), an
//! operator, and in-doubt resolution on in some seeds and off in others.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tandem_coordinator::Coordinator;
use tandem_coordinator::log::SharedStore;
use tandem_coordinator::model::{Decision, Gtid};
use tandem_coordinator::runtime::Clock;

use crate::answers::Answers;
use crate::instance::{self, Instance, LEASE, Setup};
use crate::log::{Disk, LogFaults};
use crate::net::SimNet;
use crate::participants::{Orders, SimParticipant};
use crate::rng::Rng;
use crate::store::Store;

/// How long faults last, simulated.
pub const FAULT_PHASE: Duration = Duration::from_secs(20);
/// Once faults stop, everything must be finished within this (longer
/// than retention, so finished records are removed during the run).
pub const QUIET_PHASE: Duration = Duration::from_secs(300);
pub const CLIENTS: usize = 3;
pub const PARTICIPANTS: usize = 3;
pub const REPLICAS: usize = 2;

/// Counts for the report.
#[derive(Default)]
pub struct Counts {
    pub restarts: AtomicU64,
    pub pauses: AtomicU64,
    pub purges: AtomicU64,
    pub resolves: AtomicU64,
    pub operator: AtomicU64,
    /// Messages checked back in vain (STUCK, undecided) the operator
    /// settled from the business database.
    pub messages_settled: AtomicU64,
    pub reported_commits: AtomicU64,
}

/// A transactional message a client prepared (or tried to).
#[derive(Clone, Debug)]
pub struct SentMessage {
    /// Its delivery branches: 2 to `deliveries + 1`.
    pub deliveries: u32,
}

/// The world of one seed.
pub struct World {
    pub rng: Arc<Mutex<Rng>>,
    pub store: Store,
    pub net: Arc<SimNet>,
    pub instances: Vec<Mutex<Arc<Instance>>>,
    pub issued: Arc<AtomicU64>,
    /// Participants resolve branches in doubt through GetOutcome.
    pub resolver_on: bool,
    pub log_faults: Arc<LogFaults>,
    pub faults_on: Arc<AtomicBool>,
    pub clients_on: AtomicBool,
    /// No more random crashes or pauses (restarts after a log failure go on).
    pub calm: AtomicBool,
    pub answers: Answers,
    /// The business service's database of message local transactions.
    pub orders: Arc<Orders>,
    /// Every message a client asked to prepare, by gtid.
    pub messages: Mutex<std::collections::BTreeMap<Gtid, SentMessage>>,
    /// Commits reported (client replies, GetOutcome) that were not durable.
    pub violations: Mutex<Vec<String>>,
    /// Unfinished rows a live instance owned and did not drive (monitor).
    pub undriven: Mutex<Vec<String>>,
    pub counts: Counts,
    /// The highest epoch each gtid's row was seen with (takeovers).
    pub epochs: Mutex<std::collections::BTreeMap<Gtid, u64>>,
    /// The last version of each record the monitor saw (for reports of
    /// failures about records removed since).
    pub last_seen: Mutex<std::collections::BTreeMap<Gtid, tandem_coordinator::model::TxnRecord>>,
    /// When an instance was killed (a crash or a restart after a halt),
    /// on its own clock: what may lose a transaction written only with
    /// its decision.
    pub kills: Mutex<Vec<u64>>,
    /// Held through a restart: one restart of an instance at a time.
    restarting: tokio::sync::Mutex<()>,
}

impl World {
    async fn new(seed: u64) -> Arc<World> {
        instance::reset_start();
        let rng = Arc::new(Mutex::new(Rng::new(seed)));
        let draw = |f: &dyn Fn(&mut Rng) -> u64| f(&mut rng.lock().unwrap());
        // A third of the seeds run one instance on a local log (its crash
        // and durability faults); the rest two or three on a shared store.
        let n = match draw(&|r| r.below(3)) {
            0 => 1,
            1 => 2,
            _ => 3,
        };
        let resolver_on = draw(&|r| r.below(2)) == 0;
        let faults_on = Arc::new(AtomicBool::new(true));
        let clock = Clock::tokio(instance::EPOCH_MS);
        // One order of handler events for the participants of this world.
        let seq = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let orders = Arc::new(Orders::default());
        let net = Arc::new(SimNet {
            participants: (0..PARTICIPANTS)
                .map(|_| {
                    Arc::new(SimParticipant::new(
                        REPLICAS,
                        rng.clone(),
                        clock.clone(),
                        faults_on.clone(),
                        seq.clone(),
                        orders.clone(),
                    ))
                })
                .collect(),
            faults_on: faults_on.clone(),
            rng: rng.clone(),
            modes: Mutex::default(),
            violations: Mutex::default(),
            unreachable_until: Arc::default(),
        });
        let log_faults = Arc::new(LogFaults::default());
        log_faults.on.store(true, Ordering::SeqCst);
        log_faults
            .fail_permille
            .store(draw(&|r| r.below(8)), Ordering::SeqCst);
        log_faults
            .stall_permille
            .store(draw(&|r| r.below(100)), Ordering::SeqCst);
        let store = if n == 1 {
            Store::Local {
                disk: Arc::new(Disk::default()),
                faults: log_faults.clone(),
                rng: rng.clone(),
            }
        } else {
            Store::Shared(SharedStore::new(Arc::new(instance::true_ms), LEASE))
        };
        let issued = Arc::new(AtomicU64::new(0));
        // Tombstones expire during the run in half the seeds, but never
        // before a participant's longest outage ends (a participant away
        // longer than the decision retention cannot learn a forgotten
        // outcome: the operator's case, which the docs name).
        let decision_retention = if draw(&|r| r.below(2)) == 0 {
            Duration::from_secs(290)
        } else {
            tandem_coordinator::config::DEFAULT_DECISION_RETENTION
        };
        let mut instances = Vec::new();
        for i in 0..n {
            let setup = Setup {
                name: format!("c{i}"),
                address: format!("http://c{i}:7000"),
                // Clocks within ±1.5 s of true time.
                skew_ms: if n == 1 {
                    0
                } else {
                    draw(&|r| r.below(3001)) as i64 - 1500
                },
                recovery_concurrency: 1usize << draw(&|r| r.below(8)),
                // Some seeds give phase 2 a budget: branches that fail
                // longer end STUCK, for the operator.
                retry_budget: (draw(&|r| r.below(2)) == 0).then(|| Duration::from_secs(8)),
                decision_retention,
            };
            let inst = Instance::start(setup, &store, &net, &issued).await;
            instances.push(Mutex::new(Arc::new(inst)));
        }
        Arc::new(World {
            rng,
            store,
            net,
            instances,
            issued,
            resolver_on,
            log_faults,
            faults_on,
            clients_on: AtomicBool::new(true),
            calm: AtomicBool::new(false),
            answers: Answers::default(),
            orders,
            messages: Mutex::default(),
            kills: Mutex::new(Vec::new()),
            violations: Mutex::new(Vec::new()),
            undriven: Mutex::new(Vec::new()),
            counts: Counts::default(),
            epochs: Mutex::default(),
            last_seen: Mutex::default(),
            restarting: tokio::sync::Mutex::new(()),
        })
    }

    pub fn draw<T>(&self, f: impl FnOnce(&mut Rng) -> T) -> T {
        f(&mut self.rng.lock().unwrap())
    }

    pub fn instance(&self, i: usize) -> Arc<Instance> {
        self.instances[i].lock().unwrap().clone()
    }

    pub fn all(&self) -> Vec<Arc<Instance>> {
        (0..self.instances.len())
            .map(|i| self.instance(i))
            .collect()
    }

    /// The instance serving at `address`.
    pub fn by_address(&self, address: &str) -> Option<usize> {
        (0..self.instances.len()).find(|i| self.instance(*i).setup.address == address)
    }

    /// A random instance's index.
    pub fn any(&self) -> usize {
        self.draw(|r| r.below(self.instances.len() as u64)) as usize
    }

    /// Instance `i`'s coordinator once it is not paused (a request to a
    /// paused process waits), with its name.
    pub async fn reach(&self, i: usize) -> (Coordinator, String) {
        loop {
            let inst = self.instance(i);
            if !inst.paused.is_set() {
                return (inst.coord.clone(), inst.setup.name.clone());
            }
            // Resumed, or killed and replaced (looked at again each second).
            let _ = tokio::time::timeout(Duration::from_secs(1), inst.paused.cleared()).await;
        }
    }

    /// Kills instance `i` (a crash: only its store survives) and starts a
    /// new incarnation under the same name, which recovers (and, on a
    /// shared store, claims its name's rows) while clients keep calling.
    /// With `only_if_halted`, only an instance that halted is restarted.
    pub async fn restart(&self, i: usize, only_if_halted: bool) {
        let _one = self.restarting.lock().await;
        let old = self.instance(i);
        if only_if_halted && !old.coord.is_halted() {
            return;
        }
        self.counts
            .purges
            .fetch_add(old.coord.purged(), Ordering::Relaxed);
        self.kills.lock().unwrap().push(old.clock.now_ms());
        old.kill();
        let inst = Instance::start(old.setup.clone(), &self.store, &self.net, &self.issued).await;
        *self.instances[i].lock().unwrap() = Arc::new(inst);
        self.counts.restarts.fetch_add(1, Ordering::SeqCst);
    }

    /// Whether an instance was killed at or after `gtid`'s time (on its
    /// own clock): only then can a transaction with that gtid have been
    /// lost before anything of it was written.
    pub fn killed_since(&self, gtid: &Gtid) -> bool {
        let Some(ms) = tandem_coordinator::log::gtid_ms(gtid) else {
            return true;
        };
        self.kills.lock().unwrap().iter().any(|&k| k >= ms)
    }

    /// A commit was reported for `gtid` by instance `by`: it must be
    /// durable now.
    pub fn reported_commit(&self, gtid: Gtid, by: &str, how: &'static str) {
        self.counts.reported_commits.fetch_add(1, Ordering::SeqCst);
        self.answers.record(by, gtid, true, how);
        let durable = self.store.decision(&gtid);
        if durable != Some(Decision::Commit) {
            self.violations.lock().unwrap().push(format!(
                "{by} reported commit of {gtid} ({how}), durable decision {durable:?}"
            ));
        }
    }
}

/// Crashes instances at random while faults last, pauses them (past the
/// lease, and in some seeds past retention), and restarts any that a log
/// failure halted.
async fn supervisor(world: Arc<World>) {
    // Some seeds crash often, some rarely (long recoveries beside traffic).
    let every = world.draw(|r| 3000 + r.below(20_000));
    let mut next_crash = world.draw(|r| r.ms(1000, every));
    let mut next_pause = world.draw(|r| r.ms(1000, 15_000));
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let tick = Duration::from_millis(200);
        next_crash = next_crash.saturating_sub(tick);
        next_pause = next_pause.saturating_sub(tick);
        let faults = world.faults_on.load(Ordering::SeqCst) && !world.calm.load(Ordering::SeqCst);
        for i in 0..world.instances.len() {
            if world.instance(i).coord.is_halted() {
                world.restart(i, true).await;
            }
        }
        if faults && next_crash.is_zero() {
            let i = world.any();
            // Half the crashes come with a participant cut off for a few
            // seconds (a rack losing power): the clients' repeats reach a
            // restarted coordinator whose phase-1 calls are refused.
            if let Some((p, d)) = world.draw(|r| {
                r.chance(0.5)
                    .then(|| (r.below(PARTICIPANTS as u64) as usize, r.ms(500, 6000)))
            }) {
                world.net.cut_off(p, d);
            }
            world.restart(i, false).await;
            next_crash = world.draw(|r| r.ms(1000, every));
        }
        if faults && world.store.shared() && world.draw(|r| r.chance(0.005)) {
            let i = world.any();
            world.instance(i).log.fail_next_force();
        }
        if faults && next_pause.is_zero() && world.store.shared() {
            tokio::spawn(pause(world.clone()));
            next_pause = world.draw(|r| r.ms(5000, 30_000));
        }
    }
}

/// Pauses one instance: past its lease (others take its transactions
/// over), and one time in three past retention too (what it decided may
/// be removed by the time it resumes and flushes). Half the pauses stop
/// it as its next flush starts, its writes (a decision, say) unsent.
async fn pause(world: Arc<World>) {
    let i = world.any();
    let long = world.draw(|r| r.chance(0.33));
    let d = if long {
        world.draw(|r| r.ms(150_000, 260_000))
    } else {
        world.draw(|r| r.ms(2_000, 12_000))
    };
    let at_flush = world.draw(|r| r.chance(0.5));
    let inst = world.instance(i);
    if inst.is_paused() {
        return;
    }
    if at_flush {
        inst.log.pause_at_next_flush(true);
        for _ in 0..100 {
            if inst.log.paused() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        inst.log.pause_at_next_flush(false);
        if !inst.log.paused() {
            return; // it flushed nothing for 5 s
        }
    }
    world.counts.pauses.fetch_add(1, Ordering::Relaxed);
    inst.set_paused(true);
    tokio::time::sleep(d).await;
    inst.set_paused(false);
}

/// What one seed did, for the report and the replay check.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub instances: usize,
    pub resolver_off: bool,
    pub transactions: usize,
    pub committed: usize,
    pub restarts: u64,
    pub pauses: u64,
    pub takeovers: u64,
    pub purges: u64,
    pub resolves: u64,
    pub operator: u64,
    pub races: u64,
    /// Messages prepared, those whose local transaction committed, the
    /// back-checks answered, the gtids a check closed, and the messages
    /// an operator settled from the business database.
    pub messages: usize,
    pub local_commits: usize,
    pub checks: u64,
    pub closed: u64,
    pub messages_settled: u64,
    pub reported_commits: u64,
    pub digest: u64,
}

/// Runs one seed to the end of the quiet phase and checks the invariants.
pub async fn run(seed: u64) -> Result<Summary, String> {
    let world = World::new(seed).await;
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        tasks.push(tokio::spawn(crate::clients::client(world.clone())));
    }
    let clients = tasks.len();
    if world.resolver_on {
        for p in 0..PARTICIPANTS {
            tasks.push(tokio::spawn(crate::roles::resolver(world.clone(), p)));
        }
    }
    tasks.push(tokio::spawn(crate::roles::operator(world.clone())));
    tasks.push(tokio::spawn(crate::roles::outages(world.clone())));
    tasks.push(tokio::spawn(crate::roles::monitor(world.clone())));
    tasks.push(tokio::spawn(supervisor(world.clone())));
    if let Some(n) = world.draw(|r| r.chance(0.12).then(|| 1600 + r.below(1000) as usize)) {
        tasks.push(tokio::spawn(crate::clients::hoarder(world.clone(), n)));
    }
    tokio::time::sleep(FAULT_PHASE).await;
    // Faults stop; clients stop starting transactions (those mid-call are
    // dropped, like clients that went away).
    world.clients_on.store(false, Ordering::SeqCst);
    world.faults_on.store(false, Ordering::SeqCst);
    world.log_faults.on.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(10)).await;
    for t in &tasks[..clients] {
        t.abort();
    }
    if world.draw(|r| r.chance(0.5)) {
        // One more crash, so recovery runs with nothing else.
        let i = world.any();
        world.restart(i, false).await;
    }
    world.calm.store(true, Ordering::SeqCst);
    // Pauses still under way end by themselves (the longest is shorter
    // than the quiet phase).
    tokio::time::sleep(QUIET_PHASE).await;
    let result = crate::invariants::check(&world).await;
    for t in tasks {
        t.abort();
    }
    result?;
    Ok(crate::invariants::summary(&world))
}

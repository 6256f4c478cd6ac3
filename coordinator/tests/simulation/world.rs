//! One simulated run: a coordinator (restarted at random, over a log that
//! fails and stalls), participants that misbehave, clients that give up at
//! random points, and participants resolving their branches in doubt.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tandem_coordinator::Coordinator;
use tandem_coordinator::config::{CoordinatorConfig, RetryPolicy};
use tandem_coordinator::engine::NewBranch;
use tandem_coordinator::model::{Decision, Gtid, Mode, TxState};
use tandem_coordinator::runtime::{Clock, Environment};

use crate::log::{Disk, LogFaults, SimLog};
use crate::net::{Participant, SimNet};
use crate::rng::Rng;

/// How long faults last, simulated.
const FAULT_PHASE: Duration = Duration::from_secs(20);
/// Once faults stop, everything must be finished within this.
const QUIET_PHASE: Duration = Duration::from_secs(300);
const CLIENTS: usize = 3;
const PARTICIPANTS: usize = 3;

/// The world of one seed.
pub struct World {
    pub rng: Arc<Mutex<Rng>>,
    pub disk: Arc<Disk>,
    pub log: Mutex<Arc<SimLog>>,
    pub coord: Mutex<Coordinator>,
    pub net: Arc<SimNet>,
    pub clock: Clock,
    pub log_faults: Arc<LogFaults>,
    pub faults_on: Arc<AtomicBool>,
    pub clients_on: AtomicBool,
    /// No more random crashes (restarts after a log failure go on).
    pub calm: AtomicBool,
    /// Commits reported (client replies, GetOutcome) that were not durable.
    pub violations: Mutex<Vec<String>>,
    pub restarts: AtomicU64,
    pub reported_commits: AtomicU64,
    /// Held through a restart: a new coordinator takes stock and forces
    /// its log before it is served, and one restart happens at a time.
    restarting: tokio::sync::Mutex<()>,
}

fn config(recovery_concurrency: usize) -> CoordinatorConfig {
    CoordinatorConfig {
        recovery_concurrency,
        call_timeout: Duration::from_secs(1),
        default_timeout: Duration::from_secs(5),
        retry: RetryPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(5),
            max_attempts: None,
            max_duration: None,
        },
        ..CoordinatorConfig::default()
    }
}

impl World {
    async fn new(seed: u64) -> Arc<World> {
        let rng = Arc::new(Mutex::new(Rng::new(seed)));
        let faults_on = Arc::new(AtomicBool::new(true));
        let clock = Clock::tokio(1_800_000_000_000);
        let net = Arc::new(SimNet {
            participants: (0..PARTICIPANTS)
                .map(|_| Arc::new(Participant::default()))
                .collect(),
            faults_on: faults_on.clone(),
            rng: rng.clone(),
            clock: clock.clone(),
        });
        let log_faults = Arc::new(LogFaults::default());
        log_faults.on.store(true, Ordering::SeqCst);
        {
            let mut r = rng.lock().unwrap();
            log_faults.fail_permille.store(r.below(8), Ordering::SeqCst);
            log_faults
                .stall_permille
                .store(r.below(100), Ordering::SeqCst);
        }
        let disk = Arc::new(Disk::default());
        let log = SimLog::open(disk.clone(), log_faults.clone(), rng.clone());
        let coord = Self::coordinator(&log, &net, &clock, &rng).await;
        Arc::new(World {
            rng,
            disk,
            log: Mutex::new(log),
            coord: Mutex::new(coord),
            net,
            clock,
            log_faults,
            faults_on,
            clients_on: AtomicBool::new(true),
            calm: AtomicBool::new(false),
            violations: Mutex::new(Vec::new()),
            restarts: AtomicU64::new(0),
            reported_commits: AtomicU64::new(0),
            restarting: tokio::sync::Mutex::new(()),
        })
    }

    async fn coordinator(
        log: &Arc<SimLog>,
        net: &Arc<SimNet>,
        clock: &Clock,
        rng: &Mutex<Rng>,
    ) -> Coordinator {
        // Few recovery slots: recovery then overlaps new traffic for long.
        let recovery_concurrency = 1usize << rng.lock().unwrap().below(8);
        let env = Environment {
            transport: Some(net.clone()),
            clock: clock.clone(),
            ..Environment::default()
        };
        let coord = Coordinator::with_environment(config(recovery_concurrency), log.clone(), env)
            .expect("config");
        // Recovery takes stock of the log and forces it before the
        // coordinator is served, then works beside new traffic. (A failed
        // force halts it; the supervisor restarts it.)
        let _ = coord.start_recovery().await;
        coord
    }

    pub fn coord(&self) -> Coordinator {
        self.coord.lock().unwrap().clone()
    }

    pub fn log(&self) -> Arc<SimLog> {
        self.log.lock().unwrap().clone()
    }

    fn draw<T>(&self, f: impl FnOnce(&mut Rng) -> T) -> T {
        f(&mut self.rng.lock().unwrap())
    }

    /// Kills the coordinator (a crash: only the disk survives) and starts
    /// a new one, which recovers while clients keep calling. With
    /// `only_if_halted`, only a coordinator that halted is restarted.
    async fn restart(&self, only_if_halted: bool) {
        let _one = self.restarting.lock().await;
        if only_if_halted && !self.coord().is_halted() {
            return;
        }
        self.coord().kill();
        let old = self.log();
        old.crash();
        let log = SimLog::open(self.disk.clone(), self.log_faults.clone(), self.rng.clone());
        let coord = Self::coordinator(&log, &self.net, &self.clock, &self.rng).await;
        *self.log.lock().unwrap() = log;
        *self.coord.lock().unwrap() = coord;
        self.restarts.fetch_add(1, Ordering::SeqCst);
    }

    /// A commit was reported for `gtid`: it must be durable now.
    pub fn reported_commit(&self, gtid: Gtid, by: &str) {
        self.reported_commits.fetch_add(1, Ordering::SeqCst);
        let durable = self.disk.get(&gtid).and_then(|r| r.decision);
        if durable != Some(Decision::Commit) {
            self.violations.lock().unwrap().push(format!(
                "{by} reported commit of {gtid}, durable decision {durable:?}"
            ));
        }
    }
}

/// Awaits `fut`, or gives up after `cancel` (dropping it, as tonic drops a
/// handler whose client went away).
async fn maybe_cancel<T>(cancel: Option<Duration>, fut: impl Future<Output = T>) -> Option<T> {
    match cancel {
        Some(d) => tokio::time::timeout(d, fut).await.ok(),
        None => Some(fut.await),
    }
}

fn is_commit(state: TxState) -> bool {
    matches!(state, TxState::Committed | TxState::Committing)
}

async fn client(world: Arc<World>) {
    while world.clients_on.load(Ordering::SeqCst) {
        let (mode, interactive, n, timeout) = world.draw(|r| {
            let mode = if r.chance(0.5) {
                Mode::TwoPhase
            } else {
                Mode::Tcc
            };
            (
                mode,
                r.chance(0.4),
                1 + r.below(3) as usize,
                r.ms(1000, 8000),
            )
        });
        // A third of the branches name their own protocol (mixed-mode
        // transactions); the rest run the transaction's.
        let branches: Vec<NewBranch> = (0..n)
            .map(|i| NewBranch {
                endpoint: SimNet::endpoint(world.draw(|r| r.below(PARTICIPANTS as u64)) as usize),
                resource: "acct".into(),
                payload: Bytes::from(vec![i as u8; 8]),
                mode: world.draw(|r| {
                    r.chance(0.33).then(|| {
                        if r.chance(0.5) {
                            Mode::TwoPhase
                        } else {
                            Mode::Tcc
                        }
                    })
                }),
            })
            .collect();
        if interactive {
            interactive_txn(&world, mode, timeout, branches).await;
        } else {
            one_shot(&world, mode, timeout, branches).await;
        }
        let pause = world.draw(|r| r.ms(0, 300));
        tokio::time::sleep(pause).await;
    }
}

fn cancel_point(world: &World) -> Option<Duration> {
    world.draw(|r| r.chance(0.25).then(|| r.ms(0, 1500)))
}

async fn one_shot(world: &Arc<World>, mode: Mode, timeout: Duration, branches: Vec<NewBranch>) {
    let chosen = world
        .draw(|r| r.chance(0.5))
        .then(|| world.clock.new_gtid());
    let mut tries = 0;
    loop {
        tries += 1;
        let coord = world.coord();
        let call = coord.submit(
            mode,
            Some(timeout),
            branches.clone(),
            chosen,
            Vec::new(),
            None,
        );
        match maybe_cancel(cancel_point(world), call).await {
            Some(Ok(out)) => {
                if is_commit(out.state) {
                    world.reported_commit(out.gtid, "submit");
                }
                return;
            }
            // No answer: with its own gtid the client may safely ask again.
            _ if chosen.is_some() && tries < 4 => {
                let wait = world.draw(|r| r.ms(50, 1000));
                tokio::time::sleep(wait).await;
            }
            _ => return,
        }
    }
}

async fn interactive_txn(
    world: &Arc<World>,
    mode: Mode,
    timeout: Duration,
    branches: Vec<NewBranch>,
) {
    let coord = world.coord();
    let Some(Ok(gtid)) = maybe_cancel(
        cancel_point(world),
        coord.begin(mode, Some(timeout), None, Vec::new(), None),
    )
    .await
    else {
        return;
    };
    for b in branches {
        let coord = world.coord();
        match maybe_cancel(cancel_point(world), coord.enlist(gtid, b)).await {
            Some(Ok(_)) => {}
            Some(Err(_)) => return,
            None => break, // gave up on this call; decide anyway
        }
    }
    let choice = world.draw(|r| r.below(10));
    let coord = world.coord();
    match choice {
        0 => {} // walk away: the deadline aborts it
        1 => {
            let _ = maybe_cancel(
                cancel_point(world),
                coord.rollback(gtid, "changed mind".into()),
            )
            .await;
        }
        _ => {
            for _ in 0..3 {
                let coord = world.coord();
                match maybe_cancel(cancel_point(world), coord.commit(gtid)).await {
                    Some(Ok(state)) => {
                        if is_commit(state) {
                            world.reported_commit(gtid, "commit");
                        }
                        return;
                    }
                    Some(Err(_)) => return,
                    None => {} // cancelled: ask again (a repeat waits for the same force)
                }
            }
        }
    }
}

/// A client that opens many interactive transactions, enlists one branch
/// in each and walks away (their long deadlines outlive a crash), so that
/// recovery has a backlog to work through beside live traffic.
async fn hoarder(world: Arc<World>, n: usize) {
    world.calm.store(true, Ordering::SeqCst);
    let parts: Vec<_> = (0..50)
        .map(|k| tokio::spawn(hoard(world.clone(), k, n / 50)))
        .collect();
    for p in parts {
        let _ = p.await;
    }
    // Crash with the backlog in the log, then leave recovery to work
    // through it beside the clients' traffic.
    world.restart(false).await;
}

async fn hoard(world: Arc<World>, k: usize, n: usize) {
    for i in k..k + n {
        let coord = world.coord();
        let Ok(gtid) = coord
            .begin(
                Mode::Tcc,
                Some(Duration::from_secs(120)),
                None,
                Vec::new(),
                None,
            )
            .await
        else {
            continue;
        };
        let b = NewBranch {
            endpoint: SimNet::endpoint(i % PARTICIPANTS),
            resource: "hold".into(),
            payload: Bytes::new(),
            mode: None,
        };
        let _ = coord.enlist(gtid, b).await;
    }
}

/// A participant resolving its branches in doubt through `GetOutcome`.
async fn resolver(world: Arc<World>, p: Arc<Participant>) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let before = world.clock.now_ms().saturating_sub(3000);
        for (gtid, branch) in p.tried_before(before) {
            let coord = world.coord();
            match coord.outcome(gtid) {
                Ok(Some(Decision::Commit)) => {
                    world.reported_commit(gtid, "GetOutcome");
                    let _ = p.finish((gtid, branch), true, "in-doubt resolver");
                }
                Ok(Some(Decision::Abort)) => {
                    let _ = p.finish((gtid, branch), false, "in-doubt resolver");
                }
                _ => {}
            }
        }
    }
}

/// Crashes the coordinator at random while faults last, and restarts it
/// whenever a log failure halted it.
async fn supervisor(world: Arc<World>) {
    // Some seeds crash often, some rarely (long recoveries beside traffic).
    let every = world.draw(|r| 3000 + r.below(20_000));
    let mut next_crash = world.draw(|r| r.ms(1000, every));
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        next_crash = next_crash.saturating_sub(Duration::from_millis(200));
        let faults = world.faults_on.load(Ordering::SeqCst) && !world.calm.load(Ordering::SeqCst);
        if world.coord().is_halted() || (faults && next_crash.is_zero()) {
            world.restart(!(faults && next_crash.is_zero())).await;
            next_crash = world.draw(|r| r.ms(1000, every));
        }
    }
}

/// What one seed did, for the report and the replay check.
#[derive(Debug, PartialEq, Eq)]
pub struct Summary {
    pub transactions: usize,
    pub committed: usize,
    pub restarts: u64,
    pub reported_commits: u64,
    pub digest: u64,
}

/// Runs one seed to the end of the quiet phase and checks the invariants.
pub async fn run(seed: u64) -> Result<Summary, String> {
    let world = World::new(seed).await;
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        tasks.push(tokio::spawn(client(world.clone())));
    }
    for p in &world.net.participants {
        tasks.push(tokio::spawn(resolver(world.clone(), p.clone())));
    }
    tasks.push(tokio::spawn(supervisor(world.clone())));
    if let Some(n) = world.draw(|r| r.chance(0.12).then(|| 1600 + r.below(1000) as usize)) {
        tasks.push(tokio::spawn(hoarder(world.clone(), n)));
    }
    tokio::time::sleep(FAULT_PHASE).await;
    // Faults stop; clients stop starting transactions (those mid-call are
    // dropped, like clients that went away).
    world.clients_on.store(false, Ordering::SeqCst);
    world.faults_on.store(false, Ordering::SeqCst);
    world.log_faults.on.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(10)).await;
    for t in &tasks[..CLIENTS] {
        t.abort();
    }
    if world.draw(|r| r.chance(0.5)) {
        world.restart(false).await; // one more crash, so recovery runs with nothing else
    }
    tokio::time::sleep(QUIET_PHASE).await;
    let result = crate::invariants::check(&world);
    for t in tasks {
        t.abort();
    }
    result?;
    Ok(crate::invariants::summary(&world))
}

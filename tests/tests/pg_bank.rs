//! The bank test, after Jepsen's bank workload: concurrent transfers
//! between accounts in two PostgreSQL databases, by 2PC and by TCC, while
//! the coordinator and both shard processes are killed (SIGKILL) and
//! restarted at random. Afterwards, once everything in flight has been
//! finished, the sum over all accounts equals the initial sum, no balance
//! is negative, and nothing is left held: no prepared transaction, no TCC
//! hold, no frozen funds.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tandem_examples::bank::Leg;
use tandem_examples::pg_bank::{Audit, audit};
use tandem_sdk::{Branch, Error, Mode, TransactionClient};
use tandem_tests::Rng;
use tandem_tests::pg::{PgServer, Shard};
use tandem_tests::process::Serve;

const ACCOUNTS: usize = 5;
const OPENING: i64 = 1000;
const WORKERS: usize = 6;
const RUN_FOR: Duration = Duration::from_secs(20);

#[derive(Default)]
struct Tally {
    committed: AtomicUsize,
    aborted: AtomicUsize,
    failed: AtomicUsize,
}

/// The processes under test, owned by the chaos thread.
struct Cluster {
    coordinator: Option<Serve>,
    coordinator_data: tempfile::TempDir,
    coordinator_addr: String,
    shards: Vec<Shard>,
}

/// Phase-2 retries start at 1 s, so that a restarted shard's own resolver
/// usually finishes what the kill left before the coordinator retries:
/// both paths are exercised.
const COORDINATOR_FLAGS: &[&str] = &[
    "--retry-initial",
    "1s",
    "--retry-max",
    "2s",
    "--call-timeout",
    "2s",
];

impl Cluster {
    fn restart_coordinator(&mut self) {
        if let Some(c) = self.coordinator.take() {
            c.kill();
        }
        self.coordinator = Some(Serve::start_on(
            self.coordinator_data.path(),
            &self.coordinator_addr,
            COORDINATOR_FLAGS,
            &[],
        ));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bank_invariants_hold_across_kills_of_coordinator_and_participants() {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos() as u64
        | 1;
    eprintln!("bank test seed {seed}");
    let pg = PgServer::start();
    let dbs = [
        pg.create_database("bank1").await,
        pg.create_database("bank2").await,
    ];
    let names: [Vec<String>; 2] = [
        (0..ACCOUNTS).map(|i| format!("a{i}")).collect(),
        (0..ACCOUNTS).map(|i| format!("b{i}")).collect(),
    ];
    let initial = 2 * ACCOUNTS as i64 * OPENING;

    let coordinator_data = tempfile::tempdir().expect("data");
    let first = Serve::start_with(coordinator_data.path(), COORDINATOR_FLAGS, &[]);
    let coordinator_addr = first.addr().to_string();
    let coordinator_url = first.url.clone();
    let shards: Vec<Shard> = (0..2)
        .map(|i| {
            let accounts: Vec<&str> = names[i].iter().map(String::as_str).collect();
            Shard::start(
                &dbs[i],
                &accounts,
                Some(&coordinator_url),
                &["--in-doubt-after-ms", "2000"],
            )
        })
        .collect();
    let urls: Vec<String> = shards.iter().map(|s| s.url.clone()).collect();
    let mut cluster = Cluster {
        coordinator: Some(first),
        coordinator_data,
        coordinator_addr,
        shards,
    };

    // Chaos: every 1-2.5 s, SIGKILL one process, restart it 0.1-0.5 s later.
    let stop = Arc::new(AtomicBool::new(false));
    let chaos = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut rng = Rng(seed ^ 0x9E37_79B9_7F4A_7C15);
            let mut kills = [0usize; 3];
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(1000 + rng.below(1500)));
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let victim = rng.below(3) as usize;
                let down = Duration::from_millis(100 + rng.below(400));
                match victim {
                    0 => {
                        if let Some(c) = cluster.coordinator.take() {
                            c.kill();
                        }
                        std::thread::sleep(down);
                        cluster.restart_coordinator();
                    }
                    i => {
                        cluster.shards[i - 1].kill();
                        std::thread::sleep(down);
                        cluster.shards[i - 1].restart(&["--in-doubt-after-ms", "2000"]);
                    }
                }
                kills[victim] += 1;
            }
            (cluster, kills)
        })
    };

    // The workload: transfers in both directions, 2PC and TCC.
    let tally = Arc::new(Tally::default());
    let deadline = Instant::now() + RUN_FOR;
    let mut workers = Vec::new();
    for w in 0..WORKERS {
        let (tally, urls, names) = (tally.clone(), urls.clone(), names.clone());
        let coordinator_url = coordinator_url.clone();
        workers.push(tokio::spawn(async move {
            let mut rng = Rng(seed.wrapping_add(w as u64 + 1).wrapping_mul(0x9E37_79B9));
            let client = TransactionClient::from_channel(
                tonic::transport::Endpoint::from_shared(coordinator_url)
                    .expect("endpoint")
                    .connect_timeout(Duration::from_secs(1))
                    .connect_lazy(),
            );
            while Instant::now() < deadline {
                let from = rng.below(2) as usize;
                let to = 1 - from;
                let amount = 1 + rng.below(300) as i64;
                let (mode, resource) = if rng.below(2) == 0 {
                    (Mode::TwoPhase, "accounts")
                } else {
                    (Mode::Tcc, "accounts-tcc")
                };
                let debit = &names[from][rng.below(ACCOUNTS as u64) as usize];
                let credit = &names[to][rng.below(ACCOUNTS as u64) as usize];
                let branches = vec![
                    Branch::new(&urls[from], resource, Leg::debit(debit, amount).encode()),
                    Branch::new(&urls[to], resource, Leg::credit(credit, amount).encode()),
                ];
                let submitted = tokio::time::timeout(
                    Duration::from_secs(10),
                    client.submit_with_timeout(mode, branches, Some(Duration::from_secs(5))),
                )
                .await;
                let counter = match submitted {
                    Ok(Ok(_)) => &tally.committed,
                    Ok(Err(Error::Aborted { .. })) => &tally.aborted,
                    // Coordinator down, or the call cut by a kill: the
                    // outcome is unknown to the client, and the invariant
                    // must hold either way.
                    Ok(Err(_)) | Err(_) => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        &tally.failed
                    }
                };
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for w in workers {
        w.await.expect("worker");
    }
    stop.store(true, Ordering::SeqCst);
    let (cluster, kills) = tokio::task::spawn_blocking(move || chaos.join().expect("chaos"))
        .await
        .expect("join");

    // Everything in flight is finished by coordinator recovery, phase-2
    // retries and the shards' resolvers; wait for nothing to be held.
    let started = Instant::now();
    let mut last = Audit::default();
    while started.elapsed() < Duration::from_secs(90) {
        last = audit(&dbs).await.expect("audit");
        if last.prepared.is_empty() && last.holds == 0 && last.frozen == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (c, a, f) = (
        tally.committed.load(Ordering::Relaxed),
        tally.aborted.load(Ordering::Relaxed),
        tally.failed.load(Ordering::Relaxed),
    );
    eprintln!(
        "bank test: {c} committed, {a} aborted, {f} with unknown outcome; kills: coordinator {}, shard1 {}, shard2 {}; \
         settled in {:.1} s; audit {last:?}",
        kills[0],
        kills[1],
        kills[2],
        started.elapsed().as_secs_f64()
    );
    assert!(
        last.prepared.is_empty(),
        "prepared transactions left: {:?}",
        last.prepared
    );
    assert_eq!((last.holds, last.frozen), (0, 0), "TCC holds left");
    assert_eq!(last.accounts, 2 * ACCOUNTS);
    assert_eq!(last.total, initial, "money created or destroyed");
    assert!(
        last.negative.is_empty(),
        "negative balances: {:?}",
        last.negative
    );
    assert!(kills.iter().sum::<usize>() >= 5, "too few kills: {kills:?}");
    assert!(c > 0, "no transfer committed");
    drop(cluster);
}

//! Failover under load with the bank: three `tandem serve` instances on one
//! PostgreSQL store, two PostgreSQL bank shards, transfers by 2PC and TCC,
//! one-shot and interactive, spread over the three instances by clients
//! that know all of them; instances are SIGKILLed at random and restarted
//! under their name. Afterwards: the sum over all accounts is unchanged,
//! nothing is prepared or held, every transaction in the store is
//! terminal, every acknowledged commit is committed, and each branch's
//! barrier record at its shard agrees with the store's decision (so no
//! branch was confirmed of a transaction that aborted, or the reverse).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_examples::bank::Leg;
use tandem_examples::pg_bank::{Audit, audit};
use tandem_sdk::{Branch, ClientOptions, Error, Gtid, Mode, TransactionClient};
use tandem_tests::Rng;
use tandem_tests::pg::{PgServer, Shard};
use tandem_tests::process::Serve;

const ACCOUNTS: usize = 5;
const OPENING: i64 = 1000;
const WORKERS: usize = 6;
const RUN_FOR: Duration = Duration::from_secs(15);

fn coordinator(data: &std::path::Path, listen: &str, store: &str, name: &str) -> Serve {
    Serve::start_on(
        data,
        listen,
        &[
            "--store",
            store,
            "--instance-name",
            name,
            "--lease",
            "1s",
            "--retry-initial",
            "200ms",
            "--retry-max",
            "1s",
            "--call-timeout",
            "2s",
        ],
        &[],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bank_invariants_hold_while_coordinators_of_one_store_are_killed() {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos() as u64
        | 1;
    eprintln!("cluster bank test seed {seed}");
    let pg = PgServer::start();
    let store = pg.create_database("store").await;
    let dbs = [
        pg.create_database("bank1").await,
        pg.create_database("bank2").await,
    ];
    let names: [Vec<String>; 2] = [
        (0..ACCOUNTS).map(|i| format!("a{i}")).collect(),
        (0..ACCOUNTS).map(|i| format!("b{i}")).collect(),
    ];
    let initial = 2 * ACCOUNTS as i64 * OPENING;

    let data = tempfile::tempdir().expect("data");
    let mut instances: Vec<Option<Serve>> = ["a", "b", "c"]
        .iter()
        .map(|n| Some(coordinator(data.path(), "127.0.0.1:0", &store, n)))
        .collect();
    let urls: Vec<String> = instances
        .iter()
        .map(|s| s.as_ref().expect("up").url.clone())
        .collect();
    // The shards ask any instance about branches in doubt.
    let all = urls.join(",");
    let shards: Vec<Shard> = (0..2)
        .map(|i| {
            let accounts: Vec<&str> = names[i].iter().map(String::as_str).collect();
            Shard::start(
                &dbs[i],
                &accounts,
                Some(&all),
                &["--in-doubt-after-ms", "2000"],
            )
        })
        .collect();
    let shard_urls: Vec<String> = shards.iter().map(|s| s.url.clone()).collect();

    // Chaos: every 1-2.5 s, SIGKILL one instance, restart it (same name,
    // same address) 0.1-1.5 s later.
    let stop = Arc::new(AtomicBool::new(false));
    let chaos = {
        let (stop, store, urls) = (stop.clone(), store.clone(), urls.clone());
        let dir = data.path().to_path_buf();
        std::thread::spawn(move || {
            let mut rng = Rng(seed ^ 0x9E37_79B9_7F4A_7C15);
            let mut kills = 0;
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(1000 + rng.below(1500)));
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let victim = rng.below(3) as usize;
                if let Some(s) = instances[victim].take() {
                    s.kill();
                }
                kills += 1;
                std::thread::sleep(Duration::from_millis(100 + rng.below(1400)));
                let name = ["a", "b", "c"][victim];
                let addr = urls[victim].trim_start_matches("http://");
                instances[victim] = Some(coordinator(&dir, addr, &store, name));
            }
            (instances, kills)
        })
    };

    let acked: Arc<Mutex<HashSet<Gtid>>> = Arc::default();
    let (aborted, unknown) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let deadline = Instant::now() + RUN_FOR;
    let mut workers = Vec::new();
    for w in 0..WORKERS {
        let (acked, aborted, unknown) = (acked.clone(), aborted.clone(), unknown.clone());
        let (shard_urls, names) = (shard_urls.clone(), names.clone());
        // Each worker lists the instances in its own order.
        let mut order = urls.clone();
        order.rotate_left(w % 3);
        workers.push(tokio::spawn(async move {
            let mut rng = Rng(seed.wrapping_add(w as u64 + 1).wrapping_mul(0x9E37_79B9));
            let client =
                TransactionClient::connect_many(order, &ClientOptions::default()).expect("client");
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
                    Branch::new(
                        &shard_urls[from],
                        resource,
                        Leg::debit(debit, amount).encode(),
                    ),
                    Branch::new(
                        &shard_urls[to],
                        resource,
                        Leg::credit(credit, amount).encode(),
                    ),
                ];
                let gtid = Gtid::now_v7();
                let timeout = Some(Duration::from_secs(5));
                let outcome = if w % 2 == 0 {
                    // One-shot, repeated with the same gtid until answered
                    // (a repeat never runs it twice).
                    let mut outcome = Err(Error::Unavailable {
                        cause: "not tried".into(),
                        gtid: None,
                    });
                    for _ in 0..40 {
                        outcome = client
                            .submit_as(gtid, mode, branches.clone(), timeout)
                            .await
                            .map(drop);
                        match &outcome {
                            Ok(()) | Err(Error::Aborted { .. }) => break,
                            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                        }
                    }
                    outcome
                } else {
                    // Interactive: begin, enlist both, commit (repeated).
                    let mut run = async {
                        client.begin_as(gtid, mode, timeout).await?;
                        for b in branches.clone() {
                            client.enlist(gtid, b).await?;
                        }
                        Ok::<(), Error>(())
                    }
                    .await;
                    if run.is_ok() {
                        for _ in 0..40 {
                            run = client.commit(gtid).await.map(drop);
                            match &run {
                                Ok(()) | Err(Error::Aborted { .. } | Error::Invalid { .. }) => {
                                    break;
                                }
                                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                            }
                        }
                    } else {
                        let _ = client.rollback(gtid, "enlist failed").await;
                    }
                    run
                };
                match outcome {
                    Ok(()) => {
                        acked.lock().expect("acked").insert(gtid);
                    }
                    Err(Error::Aborted { .. } | Error::Invalid { .. }) => {
                        aborted.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        unknown.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for w in workers {
        w.await.expect("worker");
    }
    stop.store(true, Ordering::SeqCst);
    let (instances, kills) = tokio::task::spawn_blocking(move || chaos.join().expect("chaos"))
        .await
        .expect("join");

    // Everything in flight is finished by the instances (takeover, phase-2
    // retries) and the shards' resolvers.
    let sql = pg.connect("store").await;
    let started = Instant::now();
    let mut last = Audit::default();
    let mut unfinished = -1i64;
    while started.elapsed() < Duration::from_secs(90) {
        last = audit(&dbs).await.expect("audit");
        unfinished = sql
            .query_one(
                "SELECT count(*) FROM tandem_txns WHERE state IN (1, 2, 3, 5, 7)",
                &[],
            )
            .await
            .expect("count")
            .get(0);
        if last.prepared.is_empty() && last.holds == 0 && last.frozen == 0 && unfinished == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let acked = acked.lock().expect("acked").clone();
    eprintln!(
        "cluster bank test: {} committed, {} aborted, {} unknown; {kills} coordinator kills; \
         settled in {:.1} s; audit {last:?}",
        acked.len(),
        aborted.load(Ordering::Relaxed),
        unknown.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64()
    );
    assert_eq!(unfinished, 0, "transactions left unfinished in the store");
    assert!(
        last.prepared.is_empty(),
        "prepared left: {:?}",
        last.prepared
    );
    assert_eq!((last.holds, last.frozen), (0, 0), "TCC holds left");
    assert_eq!(last.total, initial, "money created or destroyed");
    assert!(last.negative.is_empty(), "negative: {:?}", last.negative);
    assert!(kills >= 4, "too few kills: {kills}");
    assert!(!acked.is_empty(), "nothing committed");

    // The store's decisions.
    let states: HashMap<Gtid, i16> = sql
        .query("SELECT gtid, state FROM tandem_txns", &[])
        .await
        .expect("states")
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for gtid in &acked {
        assert_eq!(
            states.get(gtid),
            Some(&4),
            "{gtid} acknowledged, not committed"
        );
    }
    // Each branch's barrier record agrees with the decision: confirmed
    // (3) only for a committed transaction; cancelled, refused or
    // cancelled-empty (2, 4, 5) only for an aborted or unrecorded one
    // (presumed abort); nothing still tried (1).
    let mut checked = 0;
    for db in ["bank1", "bank2"] {
        let shard = pg.connect(db).await;
        for row in shard
            .query("SELECT gtid, branch_id, mark FROM tandem_barrier", &[])
            .await
            .expect("barrier")
        {
            let (gtid, branch, mark): (Gtid, i64, i16) = (row.get(0), row.get(1), row.get(2));
            let state = states.get(&gtid).copied();
            let ok = match mark {
                3 => state == Some(4),
                2 | 4 | 5 => state != Some(4),
                _ => false,
            };
            assert!(
                ok,
                "{db}: branch {branch} of {gtid} has mark {mark}, the store says {state:?}"
            );
            checked += 1;
        }
    }
    eprintln!("{checked} barrier records agree with the store");
    assert!(checked > 0);
    drop(instances);
    drop(shards);
}

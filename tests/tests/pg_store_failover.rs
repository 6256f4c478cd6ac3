//! The store's own failover: two coordinators on a PostgreSQL primary with
//! a synchronous standby, reached through a multi-host connection string
//! with `target_session_attrs=read-write`. The primary is killed
//! (`pg_ctl stop -m immediate`) under load and the standby promoted: the
//! coordinators reconnect and go on, and no acknowledged commit is lost.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_sdk::{Branch, ClientOptions, Error, Gtid, Mode, TransactionClient};
use tandem_tests::Scripted;
use tandem_tests::pg::PgServer;
use tandem_tests::process::Serve;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn coordinators_survive_the_promotion_of_a_synchronous_standby() {
    let primary = PgServer::start();
    primary.create_database("store").await;
    let standby = PgServer::standby_of(&primary);
    primary.require_sync_standby().await;
    let url = format!(
        "host=127.0.0.1,127.0.0.1 port={},{} user=postgres dbname=store \
         target_session_attrs=read-write connect_timeout=2",
        primary.port, standby.port
    );
    let data = tempfile::tempdir().expect("dir");
    let start = |name: &str| Serve::start_store(data.path(), &url, name, "127.0.0.1:0", "2s");
    let (a, b) = (start("a"), start("b"));
    let scripted = Scripted::yes("p");
    let p = scripted.serve().await;
    let client = TransactionClient::connect_many(
        [a.url.as_str(), b.url.as_str()],
        &ClientOptions::default(),
    )
    .expect("client");

    // Workers: one-shot transfers with their own gtid, repeated with the
    // same gtid until they get an answer (a repeat never runs twice).
    let acked = Arc::new(Mutex::new(HashSet::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let errors = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let workers: Vec<_> = (0..8)
        .map(|w| {
            let (client, acked, stop, errors) =
                (client.clone(), acked.clone(), stop.clone(), errors.clone());
            let url = p.url().to_string();
            tokio::spawn(async move {
                let mut n = 0u32;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    n += 1;
                    let gtid = Gtid::now_v7();
                    let mode = if (w + n).is_multiple_of(2) {
                        Mode::TwoPhase
                    } else {
                        Mode::Tcc
                    };
                    let branches = vec![
                        Branch::new(&url, "r", format!("{w}-{n}-a")).mode(Mode::TwoPhase),
                        Branch::new(&url, "r", format!("{w}-{n}-b")).mode(Mode::TwoPhase),
                    ];
                    let given_up = Instant::now() + Duration::from_secs(60);
                    loop {
                        match client.submit_as(gtid, mode, branches.clone(), None).await {
                            Ok(_) => {
                                acked.lock().expect("acked").insert(gtid);
                                break;
                            }
                            Err(Error::Aborted { .. }) => break,
                            Err(e) => {
                                errors.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                                assert!(Instant::now() < given_up, "{gtid} never answered: {e}");
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                        }
                    }
                }
            })
        })
        .collect();

    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = acked.lock().expect("acked").len();
    assert!(before > 0, "nothing committed before the failover");
    primary.kill_immediate();
    let killed = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    standby.promote();
    println!(
        "standby promoted {:?} after the primary was killed",
        killed.elapsed()
    );
    // Commits resume on the promoted standby.
    let resumed = loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = acked.lock().expect("acked").len();
        if now > before + 20 {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "no commit after the promotion ({now} acknowledged, {before} before)"
        );
    };
    println!("commits resumed {resumed:?} after the primary was killed");
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for w in workers {
        w.await.expect("worker");
    }
    let acked = acked.lock().expect("acked").clone();
    println!(
        "{} commits acknowledged, {} errors repeated",
        acked.len(),
        errors.load(std::sync::atomic::Ordering::SeqCst)
    );

    // Every acknowledged commit is committed in the promoted store, and
    // nothing is left unfinished there.
    let sql = standby.connect("store").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let unfinished: i64 = sql
            .query_one(
                "SELECT count(*) FROM tandem_txns WHERE state IN (1, 2, 3, 5, 7)",
                &[],
            )
            .await
            .expect("count")
            .get(0);
        if unfinished == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{unfinished} transactions left unfinished"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let gtids: Vec<Gtid> = acked.iter().copied().collect();
    let committed: HashSet<Gtid> = sql
        .query(
            "SELECT gtid FROM tandem_txns WHERE gtid = ANY($1) AND state = 4",
            &[&gtids],
        )
        .await
        .expect("committed")
        .into_iter()
        .map(|r| r.get(0))
        .collect();
    let lost: Vec<&Gtid> = acked.iter().filter(|g| !committed.contains(g)).collect();
    assert!(
        lost.is_empty(),
        "acknowledged commits lost at failover: {lost:?}"
    );
    // Both coordinators still decide.
    for c in [&a.url, &b.url] {
        let one = TransactionClient::connect(c).await.expect("connect");
        let gtid = one
            .begin(Mode::TwoPhase)
            .await
            .expect("begin after failover");
        one.rollback(gtid, "check").await.expect("rollback");
    }
    assert_eq!(scripted.held_count(), 0, "a branch is still held");
}

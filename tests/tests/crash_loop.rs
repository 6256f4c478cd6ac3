//! The randomized crash loop: a bank workload (2PC, TCC and saga
//! transfers, and transactional messages) across three participant
//! processes holding accounts in sled, while the coordinator process is
//! SIGKILLed and restarted at random moments (and, in the second variant,
//! participants too). At the end every transaction is terminal, every
//! acknowledged commit is confirmed at every participant, no branch is both
//! confirmed and cancelled, nothing is left frozen, and the total balance is
//! what it was.
//!
//! A message transfer is an order of this test's business service: its
//! local transaction debits the business's own account (in this process,
//! with the message's row), and the message credits a shard account. One
//! in four skips its Submit (the service "dies" after its commit), left to
//! the coordinator's back-check. Every order whose local transaction
//! committed must end delivered, exactly once (money conserved), and
//! none other.

use std::collections::HashMap;
use std::path::Path;
use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tandem_coordinator::log::{SledLog, TxnLog};
use tandem_coordinator::model::TxState;
use tandem_examples::bank::{Bank, Leg};
use tandem_examples::sled_bank::SledBank;
use tandem_sdk::barrier::{BarrierStore, BranchKey, Mark};
use tandem_sdk::{Branch, Gtid, Mode, ParticipantServer, TransactionClient};
use tandem_tests::Rng;
use tandem_tests::process::{Serve, free_addr, spawn_listening, workspace_bin};
use tonic::transport::Endpoint;

const SHARDS: usize = 3;
const ACCOUNTS: usize = 4;
const OPENING: i64 = 1000;
const CYCLES: usize = 20;
const WORKERS: usize = 6;
/// The business service's account, debited by its orders' local
/// transactions.
const BUSINESS: &str = "shop";
const BUSINESS_OPENING: i64 = 1_000_000;

/// The business service of the message transfers: its own bank (the
/// local transactions) and its back-check's endpoint.
struct Business {
    bank: Arc<Bank>,
    check: String,
}

struct Shard {
    dir: tempfile::TempDir,
    addr: String,
    accounts: Vec<String>,
    child: Option<Child>,
}

impl Shard {
    fn start(&mut self, coordinator: &str) {
        let data = self.dir.path().to_string_lossy().to_string();
        let accounts = self.accounts.join(",");
        let (child, _) = spawn_listening(
            &workspace_bin("bank-participant"),
            &[
                "--listen",
                &self.addr,
                "--accounts",
                &accounts,
                "--balance",
                &OPENING.to_string(),
                "--data-dir",
                &data,
                "--coordinator",
                coordinator,
                "--in-doubt-after-ms",
                "1000",
            ],
            &[],
        );
        self.child = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Shard {
    fn drop(&mut self) {
        self.kill();
    }
}

fn start_coordinator(dir: &Path, addr: &str) -> Serve {
    let args = [
        "--call-timeout",
        "2s",
        "--retry-initial",
        "20ms",
        "--retry-max",
        "300ms",
    ];
    Serve::start_on(dir, addr, &args, &[])
}

/// An order of the business service: its local debit, and a message
/// crediting `to` once that committed. `Some` once the local transaction
/// committed (the order must then be delivered), whether or not its
/// Submit went out.
async fn order(
    client: &TransactionClient,
    business: &Business,
    to: Branch,
    amount: i64,
    submit: bool,
) -> Option<Gtid> {
    let gtid = Gtid::now_v7();
    let check = Branch::new(business.check.clone(), "accounts-check", "");
    client
        .prepare_message(gtid, check, vec![to], Some(Duration::from_millis(800)))
        .await
        .ok()?;
    if let Err(reason) = business
        .bank
        .local_debit(gtid, &Leg::debit(BUSINESS, amount))
    {
        let _ = client.rollback(gtid, &reason).await;
        return None;
    }
    if submit {
        // A failure here changes nothing: the check delivers it.
        let _ = client.submit_message(gtid).await;
    }
    Some(gtid)
}

/// One transfer between random accounts of two different shards, or an
/// order of the business service crediting one.
async fn transfer(
    client: &TransactionClient,
    shards: &[(String, Vec<String>)],
    business: &Business,
    rng: &mut Rng,
) -> Option<Gtid> {
    if rng.below(4) == 0 {
        let to = rng.below(SHARDS as u64) as usize;
        let account = &shards[to].1[rng.below(ACCOUNTS as u64) as usize];
        let amount = 1 + rng.below(400) as i64;
        let credit = Branch::new(
            shards[to].0.clone(),
            "accounts-msg",
            Leg::credit(account, amount).encode(),
        );
        return order(client, business, credit, amount, rng.below(4) != 0).await;
    }
    let from = rng.below(SHARDS as u64) as usize;
    let to = (from + 1 + rng.below(SHARDS as u64 - 1) as usize) % SHARDS;
    let amount = 1 + rng.below(400) as i64;
    let (mode, resource) = match rng.below(3) {
        0 => (Mode::Tcc, "accounts-tcc"),
        1 => (Mode::Saga, "accounts-saga"),
        _ => (Mode::TwoPhase, "accounts"),
    };
    let pick = |rng: &mut Rng, s: usize| shards[s].1[rng.below(ACCOUNTS as u64) as usize].clone();
    let (a, b) = (pick(rng, from), pick(rng, to));
    let debit = Branch::new(
        shards[from].0.clone(),
        resource,
        Leg::debit(&a, amount).encode(),
    );
    let credit = Branch::new(
        shards[to].0.clone(),
        resource,
        Leg::credit(&b, amount).encode(),
    );
    if rng.below(4) == 0 {
        let gtid = client.begin(mode).await.ok()?;
        client.enlist(gtid, debit).await.ok()?;
        client.enlist(gtid, credit).await.ok()?;
        client.commit(gtid).await.ok()?;
        Some(gtid)
    } else {
        client
            .submit(mode, vec![debit, credit])
            .await
            .ok()
            .map(|s| s.gtid)
    }
}

async fn crash_loop(kill_participants: bool, seed: u64) {
    let coord_dir = tempfile::tempdir().expect("dir");
    let coord_addr = free_addr();
    let coord_url = format!("http://{coord_addr}");
    let mut shards: Vec<Shard> = (0..SHARDS)
        .map(|s| Shard {
            dir: tempfile::tempdir().expect("dir"),
            addr: free_addr(),
            accounts: (0..ACCOUNTS).map(|a| format!("s{s}-a{a}")).collect(),
            child: None,
        })
        .collect();
    for s in &mut shards {
        s.start(&coord_url);
    }
    let mut serve = Some(start_coordinator(coord_dir.path(), &coord_addr));

    let channel = Endpoint::from_shared(coord_url.clone())
        .expect("endpoint")
        .timeout(Duration::from_secs(5))
        .connect_lazy();
    let client = TransactionClient::from_channel(channel);
    let layout: Arc<Vec<(String, Vec<String>)>> = Arc::new(
        shards
            .iter()
            .map(|s| (s.url(), s.accounts.clone()))
            .collect(),
    );
    let bank = Arc::new(Bank::new([(BUSINESS.to_string(), BUSINESS_OPENING)]));
    let checks = ParticipantServer::new()
        .check("accounts-check", bank.clone())
        .spawn("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("business check");
    let business = Arc::new(Business {
        bank: bank.clone(),
        check: checks.url(),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            let (client, layout, stop, failed, business) = (
                client.clone(),
                layout.clone(),
                stop.clone(),
                failed.clone(),
                business.clone(),
            );
            tokio::spawn(async move {
                let mut rng = Rng(seed ^ (w as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
                let mut acked = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    match transfer(&client, &layout, &business, &mut rng).await {
                        Some(gtid) => acked.push(gtid),
                        None => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    }
                }
                acked
            })
        })
        .collect();

    let mut rng = Rng(seed);
    let mut participant_kills = 0;
    for cycle in 0..CYCLES {
        tokio::time::sleep(Duration::from_millis(150 + rng.below(250))).await;
        if let Some(s) = serve.take() {
            s.kill();
        }
        if kill_participants && cycle % 2 == 1 {
            let victim = rng.below(SHARDS as u64) as usize;
            shards[victim].kill();
            shards[victim].start(&coord_url);
            participant_kills += 1;
        }
        serve = Some(start_coordinator(coord_dir.path(), &coord_addr));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    let mut acked = Vec::new();
    for w in workers {
        acked.extend(w.await.expect("worker"));
    }
    assert!(!acked.is_empty(), "no transfer was acknowledged at all");

    // Let recovery and in-doubt resolution finish.
    let mut admin = tandem_proto::v1::admin_client::AdminClient::connect(coord_url.clone())
        .await
        .expect("admin");
    let unfinished = [
        tandem_proto::v1::TxState::Active,
        tandem_proto::v1::TxState::Preparing,
        tandem_proto::v1::TxState::Committing,
        tandem_proto::v1::TxState::Aborting,
        tandem_proto::v1::TxState::Stuck,
    ];
    let mut settled = false;
    let mut left = Vec::new();
    for _ in 0..600 {
        let page = admin
            .list_transactions(tandem_proto::v1::ListTransactionsRequest {
                states: unfinished.iter().map(|s| *s as i32).collect(),
                page_size: 10,
                ..Default::default()
            })
            .await
            .expect("list")
            .into_inner();
        if page.transactions.is_empty() {
            settled = true;
            break;
        }
        left = page.transactions;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        settled,
        "transactions left unfinished after the crash loop (a participant refusing a \
         reversed decision shows here): {left:#?}"
    );
    // In-doubt branches of records the coordinator lost ask after 1 s.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    drop(admin);
    if let Some(s) = serve.take() {
        s.kill();
    }
    for s in &mut shards {
        s.kill();
    }

    // The coordinator's log: everything terminal.
    let log = SledLog::open(coord_dir.path()).expect("reopen log");
    let mut records = Vec::new();
    let mut after = None;
    loop {
        let page = log.scan(after.as_ref(), &[], 1000).expect("scan");
        let Some(last) = page.last() else { break };
        after = Some(last.gtid);
        records.extend(page);
    }
    let by_gtid: HashMap<Gtid, _> = records.iter().map(|r| (r.gtid, r)).collect();
    for r in &records {
        assert!(r.state.is_terminal(), "{} left {}", r.gtid, r.state);
    }

    // Each participant: balance, frozen funds, holds, branches in doubt.
    let mut total = 0;
    let mut marks: HashMap<(String, Gtid, u32), Option<Mark>> = HashMap::new();
    for s in &shards {
        let bank = SledBank::open(s.dir.path(), &[], 0).expect("reopen shard");
        total += bank.total();
        assert_eq!(bank.frozen(), 0, "{}: funds left frozen", s.addr);
        assert_eq!(bank.open_holds(), 0, "{}: holds left", s.addr);
        assert_eq!(bank.open_steps(), 0, "{}: saga steps left open", s.addr);
        let barrier = bank.barrier();
        let doubt = barrier
            .in_doubt(u64::MAX, None, 10)
            .await
            .expect("in_doubt");
        assert!(doubt.is_empty(), "{}: branches in doubt: {doubt:?}", s.addr);
        for r in &records {
            for b in r.branches.iter().filter(|b| b.endpoint == s.url()) {
                let key = BranchKey {
                    gtid: r.gtid,
                    branch_id: b.id,
                };
                let entry = barrier.enter(key).await.expect("enter");
                marks.insert((s.url(), r.gtid, b.id), entry.record().map(|m| m.mark));
            }
        }
    }
    // The business's local debits count too: each order's money is in the
    // business's account or, delivered, in a shard's (once).
    assert_eq!(
        total + bank.total(),
        (SHARDS * ACCOUNTS) as i64 * OPENING + BUSINESS_OPENING,
        "money appeared or vanished"
    );

    // Atomicity per transaction, as the participants recorded it (a
    // message's branch 1 is the business's local transaction).
    for r in &records {
        for b in r.branches.iter().filter(|b| b.endpoint != business.check) {
            let mark = marks[&(b.endpoint.clone(), r.gtid, b.id)];
            match r.state {
                TxState::Committed => assert_eq!(
                    mark,
                    Some(Mark::Confirmed),
                    "{} committed but branch {} is {mark:?}",
                    r.gtid,
                    b.id
                ),
                _ => assert_ne!(
                    mark,
                    Some(Mark::Confirmed),
                    "{} aborted but branch {} confirmed",
                    r.gtid,
                    b.id
                ),
            }
        }
    }
    // Every acknowledged commit is committed (and so confirmed everywhere).
    for gtid in &acked {
        let r = by_gtid
            .get(gtid)
            .unwrap_or_else(|| panic!("acknowledged {gtid} missing from the log"));
        assert_eq!(r.state, TxState::Committed, "acknowledged {gtid}");
    }
    // Every order whose local transaction committed was delivered; no
    // other message was.
    let orders: Vec<&_> = records
        .iter()
        .filter(|r| r.mode == tandem_coordinator::model::Mode::Msg)
        .collect();
    for r in &orders {
        let ordered = bank.message_committed(r.gtid);
        assert_eq!(
            r.state == TxState::Committed,
            ordered,
            "message {} is {} but its local transaction {}",
            r.gtid,
            r.state,
            if ordered { "committed" } else { "did not" }
        );
    }
    let committed = records
        .iter()
        .filter(|r| r.state == TxState::Committed)
        .count();
    println!(
        "crash loop: {CYCLES} coordinator kills, {participant_kills} participant kills; \
         {} records ({committed} committed, {} messages), {} acknowledged, {} calls failed \
         during crashes",
        records.len(),
        orders.len(),
        acked.len(),
        failed.load(Ordering::Relaxed)
    );
}

// Rule: atomicity and durability survive the coordinator being killed at
// random moments, 20 times, under a concurrent bank workload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_killed_at_random_keeps_the_bank_consistent() {
    crash_loop(false, 0x5eed_0001).await;
}

// Rule: the same, with participant processes killed and restarted too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_and_participants_killed_at_random() {
    crash_loop(true, 0x5eed_0002).await;
}

//! Failover under load with the bank: three `tandem serve` instances on one
//! PostgreSQL store drive transfers between two bank shards (`bank-postgres
//! serve`, each over its own database, with a durable PostgreSQL barrier),
//! by 2PC, by TCC and by both in one transaction, one-shot (`submit_as`,
//! repeated with the same gtid after an error) and interactive (begin /
//! enlist / commit). Every client knows all three instances, in its own
//! order. Meanwhile instances are SIGKILLed and restarted under their name
//! and address, again and again.
//!
//! Afterwards, once everything has settled: the money is all there (the
//! sum, and each balance equals its opening plus exactly the transfers the
//! store says committed); no prepared transaction, hold or frozen funds are
//! left; every transaction in the store is terminal; every commit a client
//! was told of is COMMITTED in the store; and the shards' barrier records
//! agree with the store: no branch left Tried, no transaction with one
//! branch confirmed and another cancelled, a committed transaction's
//! branches all confirmed, an aborted one's none.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_examples::pg_bank::audit;
use tandem_sdk::postgres::tokio_postgres::Client as Sql;
use tandem_sdk::{Branch, ClientOptions, Error, Gtid, Mode, TransactionClient};
use tandem_tests::Rng;
use tandem_tests::pg::{PgServer, Shard, incarnation, owned_by, prepared_xacts};
use tandem_tests::process::Serve;

const NAMES: [&str; 3] = ["a", "b", "c"];
const ACCOUNTS: usize = 4;
const OPENING: i64 = 1000;
const WORKERS: usize = 6;
const KILLS: u32 = 6;
const KILL_EVERY: Duration = Duration::from_secs(3);
const LEASE: Duration = Duration::from_secs(1);
/// A call without an answer this long is given up and repeated.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// A repeated request must have its answer within this.
const ANSWER_WITHIN: Duration = Duration::from_secs(20);
/// Each transaction's deadline.
const TXN_TIMEOUT: Duration = Duration::from_secs(5);
/// Transfers per client before a worker makes a new one.
const FRESH_CLIENT_EVERY: u32 = 20;

/// Barrier marks (`tandem_barrier.mark`).
const TRIED: i16 = 1;
const CONFIRMED: i16 = 3;
/// Store states (`tandem_txns.state`).
const COMMITTED: i16 = 4;
const ABORTED: i16 = 6;

async fn unfinished(sql: &Sql) -> i64 {
    sql.query_one(
        "SELECT count(*) FROM tandem_txns WHERE state NOT IN (4, 6)",
        &[],
    )
    .await
    .expect("count unfinished")
    .get(0)
}

async fn tried(shards: &[Sql]) -> i64 {
    let mut n = 0;
    for sql in shards {
        n += sql
            .query_one("SELECT count(*) FROM tandem_barrier WHERE mark = 1", &[])
            .await
            .expect("count tried")
            .get::<_, i64>(0);
    }
    n
}

/// One leg: (shard, account, delta).
type Leg = (usize, String, i64);

/// What the clients saw.
#[derive(Default)]
struct Seen {
    /// Every transfer started, by gtid: debit leg, credit leg.
    transfers: Mutex<HashMap<Gtid, [Leg; 2]>>,
    /// Acknowledged as committed.
    committed: Mutex<HashSet<Gtid>>,
    /// Commits by kind ("one-shot 2pc", "interactive mixed", …).
    by_kind: Mutex<BTreeMap<String, usize>>,
    /// Answered aborted (a no vote, a deadline, taken over undecided).
    aborted: AtomicUsize,
    /// Interactive transactions rolled back by the client after an
    /// enlist without an answer.
    abandoned: AtomicUsize,
    /// Calls repeated after no answer.
    repeats: AtomicUsize,
    /// For requests that needed repeats: from the first call to the answer.
    recoveries: Mutex<Vec<Duration>>,
    /// Requests that never got an answer within `ANSWER_WITHIN`.
    unanswered: Mutex<Vec<String>>,
    /// Answers no transfer should get.
    unexpected: Mutex<Vec<String>>,
}

impl Seen {
    fn unexpected(&self, what: String) {
        eprintln!("unexpected answer: {what}");
        self.unexpected.lock().expect("unexpected").push(what);
    }

    fn committed(&self, gtid: Gtid, kind: String) {
        self.committed.lock().expect("committed").insert(gtid);
        *self.by_kind.lock().expect("kinds").entry(kind).or_default() += 1;
    }
}

/// An error that is no answer: the call may or may not have been run.
fn no_answer(e: &Error) -> bool {
    match e {
        Error::TimedOut { .. }
        | Error::Unavailable { .. }
        | Error::OutcomeUnknown { .. }
        | Error::Rpc(_) => true,
        // A decision in flight at the instance asked: ask again.
        Error::Invalid { message, .. } => message.contains("it is being decided"),
        Error::Aborted { .. } => false,
    }
}

/// Sends `call` until it gets an answer; `None` if none came within
/// `ANSWER_WITHIN` (recorded as unanswered).
async fn answered<T, F, Fut>(
    seen: &Seen,
    what: &str,
    gtid: Gtid,
    call: F,
) -> Option<Result<T, Error>>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<T, Error>>,
{
    let started = Instant::now();
    let mut repeated = false;
    loop {
        let last = match tokio::time::timeout(CALL_TIMEOUT, call()).await {
            Ok(Err(e)) if no_answer(&e) => e.to_string(),
            Ok(answer) => {
                if repeated {
                    seen.recoveries
                        .lock()
                        .expect("recoveries")
                        .push(started.elapsed());
                }
                return Some(answer);
            }
            Err(_) => format!("no answer within {CALL_TIMEOUT:?}"),
        };
        repeated = true;
        seen.repeats.fetch_add(1, Ordering::Relaxed);
        if started.elapsed() > ANSWER_WITHIN {
            let what = format!("{what} {gtid}: no answer in {ANSWER_WITHIN:?}: {last}");
            eprintln!("{what}");
            seen.unanswered.lock().expect("unanswered").push(what);
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn resource(mode: Mode) -> &'static str {
    match mode {
        Mode::TwoPhase => "accounts",
        Mode::Tcc | Mode::Saga => "accounts-tcc",
        Mode::Msg => "accounts-msg",
    }
}

fn account(shard: usize, i: u64) -> String {
    format!("{}{i}", ["x", "y"][shard])
}

/// One-shot: `submit_as` with the client's gtid, repeated until answered.
async fn one_shot(
    client: &TransactionClient,
    gtid: Gtid,
    mode: Mode,
    branches: Vec<Branch>,
    seen: &Seen,
    kind: String,
) {
    let submit = || client.submit_as(gtid, mode, branches.clone(), Some(TXN_TIMEOUT));
    match answered(seen, "submit", gtid, submit).await {
        Some(Ok(_)) => seen.committed(gtid, kind),
        Some(Err(Error::Aborted { .. })) => {
            seen.aborted.fetch_add(1, Ordering::Relaxed);
        }
        Some(Err(e)) => seen.unexpected(format!("submit {gtid}: {e}")),
        None => {}
    }
}

/// Interactive: begin (repeated, with the client's gtid), enlist each
/// branch (not repeated: an enlist without an answer makes the client
/// roll back), commit (repeated until answered).
async fn interactive(
    client: &TransactionClient,
    gtid: Gtid,
    mode: Mode,
    branches: Vec<Branch>,
    seen: &Seen,
    kind: String,
) {
    let begin = || client.begin_as(gtid, mode, Some(TXN_TIMEOUT));
    match answered(seen, "begin", gtid, begin).await {
        Some(Ok(_)) => {}
        Some(Err(e)) => return seen.unexpected(format!("begin {gtid}: {e}")),
        None => return,
    }
    for branch in branches {
        match tokio::time::timeout(CALL_TIMEOUT, client.enlist(gtid, branch)).await {
            Ok(Ok(_)) => {}
            Ok(Err(Error::Aborted { .. })) => {
                seen.aborted.fetch_add(1, Ordering::Relaxed);
                return;
            }
            // No answer, or the transaction ended meanwhile (its owner
            // died and the instance reached took it over): roll it back.
            enlisted => {
                let why = match enlisted {
                    Ok(Err(e)) => e.to_string(),
                    _ => "no answer".to_string(),
                };
                seen.abandoned.fetch_add(1, Ordering::Relaxed);
                let rollback = || client.rollback(gtid, "an enlist got no answer");
                match answered(seen, "rollback", gtid, rollback).await {
                    Some(Ok(())) | Some(Err(Error::Aborted { .. })) | None => {}
                    Some(Err(e)) => {
                        seen.unexpected(format!("rollback {gtid} after enlist ({why}): {e}"))
                    }
                }
                return;
            }
        }
    }
    match answered(seen, "commit", gtid, || client.commit(gtid)).await {
        Some(Ok(_)) => seen.committed(gtid, kind),
        Some(Err(Error::Aborted { .. })) => {
            seen.aborted.fetch_add(1, Ordering::Relaxed);
        }
        // Taken over undecided from a dead owner: aborted.
        Some(Err(Error::Invalid { message, .. })) if message.contains("its outcome is abort") => {
            seen.aborted.fetch_add(1, Ordering::Relaxed);
        }
        Some(Err(e)) => seen.unexpected(format!("commit {gtid}: {e}")),
        None => {}
    }
}

/// Transfers until `stop`: even workers one-shot, odd ones interactive;
/// each transfer 2PC, TCC, or a TCC debit with a 2PC credit. The client
/// knows every instance, starting at `coordinators[0]`; it is made anew
/// every `FRESH_CLIENT_EVERY` transfers, because a client stays with the
/// instance it failed over to, and the load would gather on one.
async fn worker(
    w: usize,
    coordinators: Vec<String>,
    shards: Arc<Vec<String>>,
    seen: Arc<Seen>,
    stop: Arc<AtomicBool>,
    seed: u64,
) {
    let mut rng = Rng(seed.wrapping_add(w as u64 + 1).wrapping_mul(0x9E37_79B9) | 1);
    let connect = || {
        TransactionClient::connect_many(coordinators.clone(), &ClientOptions::default())
            .expect("client")
    };
    let mut client = connect();
    let mut n: u32 = 0;
    while !stop.load(Ordering::SeqCst) {
        n += 1;
        if n.is_multiple_of(FRESH_CLIENT_EVERY) {
            client = connect();
        }
        let from = rng.below(2) as usize;
        let to = 1 - from;
        let amount = 1 + rng.below(100) as i64;
        let debit: Leg = (from, account(from, rng.below(ACCOUNTS as u64)), -amount);
        let credit: Leg = (to, account(to, rng.below(ACCOUNTS as u64)), amount);
        let (mode, modes, label) = match rng.below(3) {
            0 => (Mode::TwoPhase, [Mode::TwoPhase, Mode::TwoPhase], "2pc"),
            1 => (Mode::Tcc, [Mode::Tcc, Mode::Tcc], "tcc"),
            _ => (Mode::TwoPhase, [Mode::Tcc, Mode::TwoPhase], "mixed"),
        };
        let branches: Vec<Branch> = [&debit, &credit]
            .into_iter()
            .zip(modes)
            .map(|((shard, account, delta), m)| {
                Branch::new(&shards[*shard], resource(m), format!("{account}:{delta}")).mode(m)
            })
            .collect();
        let gtid = Gtid::now_v7();
        seen.transfers
            .lock()
            .expect("transfers")
            .insert(gtid, [debit, credit]);
        if w.is_multiple_of(2) {
            let kind = format!("one-shot {label}");
            one_shot(&client, gtid, mode, branches, &seen, kind).await;
        } else {
            let kind = format!("interactive {label}");
            interactive(&client, gtid, mode, branches, &seen, kind).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bank_ledger_and_barriers_agree_with_the_store_across_coordinator_kills() {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos() as u64
        | 1;
    eprintln!("cluster bank test seed {seed}");
    let began = Instant::now();
    let pg = PgServer::start();
    let store = pg.create_database("store").await;
    let dbs = [
        pg.create_database("bank1").await,
        pg.create_database("bank2").await,
    ];
    let sql = pg.connect("store").await;
    let data = tempfile::tempdir().expect("dir");
    let mut servers: Vec<Option<Serve>> = NAMES
        .iter()
        .map(|n| {
            Some(Serve::start_store(
                data.path(),
                &store,
                n,
                "127.0.0.1:0",
                "1s",
            ))
        })
        .collect();
    let addrs: Vec<String> = servers
        .iter()
        .map(|s| s.as_ref().expect("up").addr().to_string())
        .collect();
    let urls: Vec<String> = addrs.iter().map(|a| format!("http://{a}")).collect();
    // The shards ask any of the three about branches left in doubt.
    let coordinators = urls.join(",");
    let shards: Vec<Shard> = (0..2)
        .map(|i| {
            let accounts: Vec<String> = (0..ACCOUNTS as u64).map(|k| account(i, k)).collect();
            let accounts: Vec<&str> = accounts.iter().map(String::as_str).collect();
            Shard::start(
                &dbs[i],
                &accounts,
                Some(&coordinators),
                &["--in-doubt-after-ms", "2000"],
            )
        })
        .collect();
    let shard_sql = [pg.connect("bank1").await, pg.connect("bank2").await];
    let initial = 2 * ACCOUNTS as i64 * OPENING;
    assert_eq!(audit(&dbs).await.expect("audit").total, initial);

    // The workload: every client knows all three, starting at its own.
    let seen = Arc::new(Seen::default());
    let stop = Arc::new(AtomicBool::new(false));
    let shard_urls = Arc::new(shards.iter().map(|s| s.url.clone()).collect::<Vec<_>>());
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            let order: Vec<String> = (0..3).map(|i| urls[(w + i) % 3].clone()).collect();
            tokio::spawn(worker(
                w,
                order,
                shard_urls.clone(),
                seen.clone(),
                stop.clone(),
                seed,
            ))
        })
        .collect();

    // Chaos: every 3 s SIGKILL a random instance; restart it under its name
    // and address at once (every other kill) or only once another instance
    // has taken its transactions over. Failover: from the kill until the
    // killed incarnation owns nothing unfinished.
    let mut rng = Rng(seed ^ 0x5DEE_CE66_D1CE_4E5B);
    let chaos = Instant::now();
    let mut failovers = Vec::new();
    for k in 0..KILLS {
        tokio::time::sleep_until((chaos + KILL_EVERY * (k + 1)).into()).await;
        let victim = rng.below(3) as usize;
        let owner = incarnation(&sql, NAMES[victim]).await;
        let server = servers[victim].take().expect("up");
        tokio::task::block_in_place(|| server.kill());
        let killed = Instant::now();
        let orphaned = owned_by(&sql, owner).await;
        let at_once = k % 2 == 0;
        if at_once {
            servers[victim] = Some(tokio::task::block_in_place(|| {
                Serve::start_store(data.path(), &store, NAMES[victim], &addrs[victim], "1s")
            }));
        }
        let deadline = killed + Duration::from_secs(15);
        while owned_by(&sql, owner).await > 0 {
            assert!(
                Instant::now() < deadline,
                "{}'s transactions were not taken over in 15 s",
                NAMES[victim]
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let took = killed.elapsed();
        println!(
            "kill {k}: {} ({}), {orphaned} unfinished transactions owned: failover {} ms",
            NAMES[victim],
            if at_once {
                "restarted at once"
            } else {
                "left dead until taken over"
            },
            took.as_millis()
        );
        failovers.push((NAMES[victim], at_once, orphaned, took));
        if !at_once {
            servers[victim] = Some(tokio::task::block_in_place(|| {
                Serve::start_store(data.path(), &store, NAMES[victim], &addrs[victim], "1s")
            }));
        }
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.await.expect("worker");
    }
    let ran_for = chaos.elapsed();

    // Quiescence: nothing unfinished in the store, nothing held or in
    // doubt at the shards.
    let settling = Instant::now();
    let mut last;
    loop {
        last = audit(&dbs).await.expect("audit");
        let open = unfinished(&sql).await;
        let in_doubt = tried(&shard_sql).await;
        if open == 0
            && in_doubt == 0
            && last.prepared.is_empty()
            && last.holds == 0
            && last.frozen == 0
        {
            break;
        }
        if settling.elapsed() > Duration::from_secs(30) {
            eprintln!("not settled after 30 s: {open} unfinished, {in_doubt} tried, {last:?}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let settled_in = settling.elapsed();

    // What the store says.
    let states: HashMap<Gtid, i16> = sql
        .query("SELECT gtid, state FROM tandem_txns", &[])
        .await
        .expect("states")
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let transfers = seen.transfers.lock().expect("transfers").clone();
    let acked = seen.committed.lock().expect("committed").clone();
    let mut by_state: BTreeMap<i16, usize> = BTreeMap::new();
    for s in states.values() {
        *by_state.entry(*s).or_default() += 1;
    }
    let recoveries = {
        let mut r = seen.recoveries.lock().expect("recoveries").clone();
        r.sort();
        r
    };
    println!(
        "workload: {} transfers over {:.1} s, {} acknowledged committed {:?}, {} aborted, \
         {} abandoned after an unanswered enlist, {} calls repeated; store states {by_state:?}; \
         settled in {:.1} s; whole test so far {:.1} s",
        transfers.len(),
        ran_for.as_secs_f64(),
        acked.len(),
        seen.by_kind.lock().expect("kinds"),
        seen.aborted.load(Ordering::Relaxed),
        seen.abandoned.load(Ordering::Relaxed),
        seen.repeats.load(Ordering::Relaxed),
        settled_in.as_secs_f64(),
        began.elapsed().as_secs_f64()
    );
    if !recoveries.is_empty() {
        println!(
            "requests answered after repeats: {}, first call to answer: median {} ms, max {} ms",
            recoveries.len(),
            recoveries[recoveries.len() / 2].as_millis(),
            recoveries[recoveries.len() - 1].as_millis()
        );
    }

    // The clients got answers, and only answers a transfer can get.
    let unanswered = seen.unanswered.lock().expect("unanswered").clone();
    assert!(
        unanswered.is_empty(),
        "requests never answered: {unanswered:#?}"
    );
    let unexpected = seen.unexpected.lock().expect("unexpected").clone();
    assert!(unexpected.is_empty(), "unexpected answers: {unexpected:#?}");

    // Nothing held: no prepared transaction on either shard, no TCC hold.
    for (i, shard) in shard_sql.iter().enumerate() {
        let left = prepared_xacts(shard).await;
        assert!(
            left.is_empty(),
            "prepared transactions left on shard {i}: {left:?}"
        );
    }
    assert_eq!(
        (last.holds, last.frozen),
        (0, 0),
        "TCC holds left: {last:?}"
    );

    // Every transaction terminal; every acknowledged commit committed.
    let open: Vec<_> = states
        .iter()
        .filter(|(_, s)| ![COMMITTED, ABORTED].contains(s))
        .collect();
    assert!(
        open.is_empty(),
        "transactions not terminal in the store: {open:?}"
    );
    for gtid in &acked {
        assert_eq!(
            states.get(gtid),
            Some(&COMMITTED),
            "{gtid} acknowledged as committed, not COMMITTED in the store"
        );
    }
    for gtid in states.keys() {
        assert!(
            transfers.contains_key(gtid),
            "{gtid} in the store is no transfer of ours"
        );
    }

    // The money: the sum, and every balance is its opening plus exactly
    // the legs of the transfers the store committed (each applied once).
    assert_eq!(last.accounts, 2 * ACCOUNTS);
    assert_eq!(last.total, initial, "money created or destroyed");
    assert!(
        last.negative.is_empty(),
        "negative balances: {:?}",
        last.negative
    );
    let mut expected: HashMap<String, i64> = HashMap::new();
    for (gtid, legs) in &transfers {
        if states.get(gtid) == Some(&COMMITTED) {
            for (_, account, delta) in legs {
                *expected.entry(account.clone()).or_default() += delta;
            }
        }
    }
    for (i, shard) in shard_sql.iter().enumerate() {
        for k in 0..ACCOUNTS as u64 {
            let account = account(i, k);
            let balance = tandem_tests::pg::balance(shard, &account).await;
            let want = OPENING + expected.get(&account).copied().unwrap_or(0);
            assert_eq!(
                balance, want,
                "{account}: balance {balance}, but the committed transfers make it {want}"
            );
        }
    }

    // The barrier records agree with the store.
    let mut marks: HashMap<Gtid, Vec<(usize, i64, i16)>> = HashMap::new();
    let mut commit_markers: Vec<(usize, Gtid, i64)> = Vec::new();
    for (i, shard) in shard_sql.iter().enumerate() {
        for r in shard
            .query("SELECT gtid, branch_id, mark FROM tandem_barrier", &[])
            .await
            .expect("barrier")
        {
            marks
                .entry(r.get(0))
                .or_default()
                .push((i, r.get(1), r.get(2)));
        }
        for r in shard
            .query("SELECT gtid, branch_id FROM tandem_prepared_commits", &[])
            .await
            .expect("commit markers")
        {
            commit_markers.push((i, r.get(0), r.get(1)));
        }
    }
    let mut confirmed_txns = 0;
    for (gtid, records) in &marks {
        let tried: Vec<_> = records.iter().filter(|r| r.2 == TRIED).collect();
        assert!(
            tried.is_empty(),
            "{gtid}: branches still Tried: {records:?}"
        );
        let confirmed = records.iter().filter(|r| r.2 == CONFIRMED).count();
        assert!(
            confirmed == 0 || confirmed == records.len(),
            "split outcome: {gtid} has branches confirmed and branches cancelled: {records:?}"
        );
        let state = states.get(gtid);
        if confirmed > 0 {
            confirmed_txns += 1;
            assert_eq!(
                state,
                Some(&COMMITTED),
                "{gtid}: branches confirmed, but the store says {state:?}: {records:?}"
            );
        }
        // Each branch's record is at the shard of its leg.
        let legs = transfers.get(gtid).expect("a transfer of ours");
        for (shard, branch, _) in records {
            let leg = usize::try_from(*branch - 1).expect("branch id");
            assert_eq!(
                legs.get(leg).map(|l| l.0),
                Some(*shard),
                "{gtid}: branch {branch} recorded at shard {shard}: {records:?}"
            );
        }
    }
    for (gtid, state) in &states {
        if *state == COMMITTED {
            let records = marks.get(gtid).cloned().unwrap_or_default();
            let confirmed = records.iter().filter(|r| r.2 == CONFIRMED).count();
            assert_eq!(
                confirmed, 2,
                "{gtid} COMMITTED in the store, but its branches are {records:?}"
            );
        }
    }
    // A 2PC branch's commit marker commits with its prepared transaction.
    for (shard, gtid, branch) in &commit_markers {
        assert_eq!(
            states.get(gtid),
            Some(&COMMITTED),
            "branch {branch} of {gtid} committed at shard {shard}, not in the store"
        );
    }
    println!(
        "barrier: {} transactions recorded at the shards, {confirmed_txns} confirmed; \
         {} 2PC commit markers",
        marks.len(),
        commit_markers.len()
    );

    // Failover bounded by the lease: the killed instance's transactions
    // moved on within two lease periods (plus slack for a loaded machine).
    for (name, at_once, orphaned, took) in &failovers {
        assert!(
            *took <= 2 * LEASE + Duration::from_secs(1),
            "failover of {name} ({orphaned} transactions, restarted at once: {at_once}) \
             took {took:?}, more than twice the {LEASE:?} lease"
        );
    }
    assert_eq!(failovers.len(), KILLS as usize);
    assert!(
        acked.len() >= 50,
        "too little committed to mean anything: {}",
        acked.len()
    );
    drop(shards);
    drop(servers);
    println!("whole test {:.1} s", began.elapsed().as_secs_f64());
}

//! Participant replicas on one database: two `bank-postgres serve`
//! processes share one PostgreSQL database (several replicas behind a load
//! balancer, the normal production shape), and a client acting as the
//! coordinator sends each branch's calls to both at nearly the same time:
//! one call to each replica, 0-5 ms apart, in every protocol and every
//! order a network can produce (a cancel overtaking its try, a repeated
//! phase 1, two phase-2 calls at once). It then finishes every branch with
//! phase 2, as the coordinator does, and checks what the barrier promises
//! per branch, across processes:
//!
//! - the barrier's mark agrees with the coordinator's decision (`Confirmed`
//!   for commit, `Cancelled` / `EmptyCancelled` for abort);
//! - nothing stays held: no TCC hold, no frozen funds, no prepared
//!   transaction;
//! - every account's balance is its opening balance plus exactly the legs
//!   decided commit (money neither appears nor vanishes).
//!
//! No resolver runs (the replicas are started without `--coordinator`), so
//! nothing repairs behind the barrier's back. `TANDEM_REPLICA_PAIRS` sets
//! how many raced pairs to send (default 2,000).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_proto::v1::BranchRequest;
use tandem_proto::v1::participant_client::ParticipantClient;
use tandem_sdk::barrier::Mark;
use tandem_sdk::postgres::tokio_postgres;
use tandem_tests::Rng;
use tandem_tests::pg::{PgServer, Shard, connect, prepared_xacts};
use tokio::sync::Semaphore;
use tonic::transport::Channel;
use uuid::Uuid;

/// Half for TCC, half for 2PC: a prepared transaction left behind holds
/// its account's row, and a TCC try (no lock timeout) would wait for it
/// for ever.
const ACCOUNTS: usize = 256;
/// Large enough that no debit is refused for funds: every no vote comes
/// from the barrier or a busy account.
const OPENING: i64 = 1_000_000;
const IN_FLIGHT: usize = 16;
const DEFAULT_PAIRS: usize = 2_000;

/// The race sent for one branch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Kind {
    /// TCC: try to one replica, cancel to the other (the coordinator gave
    /// up on the try).
    TryCancel,
    /// TCC: cancel first, the try arriving late at the other replica.
    CancelLateTry,
    /// TCC: the same try to both (phase 1 sent again).
    TryTry,
    /// TCC: one try, then confirm to both at once.
    ConfirmConfirm,
    /// 2PC: prepare to one replica, rollback to the other.
    PrepareRollback,
    /// 2PC: rollback first, the prepare arriving late.
    RollbackPrepare,
    /// 2PC: the same prepare to both.
    PreparePrepare,
    /// 2PC: one prepare, then commit to both at once.
    CommitCommit,
}

const KINDS: [Kind; 8] = [
    Kind::TryCancel,
    Kind::CancelLateTry,
    Kind::TryTry,
    Kind::ConfirmConfirm,
    Kind::PrepareRollback,
    Kind::RollbackPrepare,
    Kind::PreparePrepare,
    Kind::CommitCommit,
];

impl Kind {
    fn tcc(self) -> bool {
        matches!(
            self,
            Kind::TryCancel | Kind::CancelLateTry | Kind::TryTry | Kind::ConfirmConfirm
        )
    }
}

/// What the "coordinator" did with one branch.
#[derive(Clone, Debug)]
struct Branch {
    kind: Kind,
    gtid: Uuid,
    branch_id: u32,
    account: usize,
    delta: i64,
    commit: bool,
    /// Phase 2 was never acknowledged (the last error).
    unfinished: Option<String>,
}

#[derive(Clone, Copy)]
enum Call {
    One,
    Confirm,
    Cancel,
}

/// Both replicas, as the coordinator reaches them.
#[derive(Clone)]
struct Replicas([Channel; 2]);

impl Replicas {
    /// One call to replica `to`: Ok(Some(yes)) for phase 1, Ok(None) for an
    /// acknowledged phase 2, Err for an error or a timeout.
    async fn call(
        &self,
        to: usize,
        tcc: bool,
        call: Call,
        req: BranchRequest,
    ) -> Result<Option<bool>, String> {
        let mut c = ParticipantClient::new(self.0[to % 2].clone());
        let fut = async {
            let r = match (tcc, call) {
                (true, Call::One) => c.r#try(req).await.map(|r| Some(r.into_inner().yes)),
                (false, Call::One) => c.prepare(req).await.map(|r| Some(r.into_inner().yes)),
                (true, Call::Confirm) => c.confirm(req).await.map(|_| None),
                (false, Call::Confirm) => c.commit(req).await.map(|_| None),
                (true, Call::Cancel) => c.cancel(req).await.map(|_| None),
                (false, Call::Cancel) => c.rollback(req).await.map(|_| None),
            };
            r.map_err(|s| format!("{:?}: {}", s.code(), s.message()))
        };
        match tokio::time::timeout(Duration::from_secs(10), fut).await {
            Ok(r) => r,
            Err(_) => Err("no answer in 10 s".into()),
        }
    }

    /// Phase 2 until acknowledged, alternating replicas, as the
    /// coordinator retries; the last error if it never is.
    async fn finish(
        &self,
        from: usize,
        tcc: bool,
        commit: bool,
        req: &BranchRequest,
    ) -> Option<String> {
        let call = if commit { Call::Confirm } else { Call::Cancel };
        let mut last = String::new();
        for attempt in 0..12 {
            let mut req = req.clone();
            req.attempt = attempt + 2;
            match self.call(from + attempt as usize, tcc, call, req).await {
                Ok(_) => return None,
                Err(e) => last = e,
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        Some(last)
    }
}

/// `first` now and `second` after `gap`, concurrently.
async fn raced<A, B>(
    first: impl Future<Output = A>,
    second: impl Future<Output = B>,
    gap: Duration,
) -> (A, B) {
    tokio::join!(first, async {
        tokio::time::sleep(gap).await;
        second.await
    })
}

/// Sends one branch's race and finishes it; returns what was decided.
async fn run_pair(
    replicas: Replicas,
    db: Arc<tokio_postgres::Client>,
    mut branch: Branch,
    gap: Duration,
    a: usize,
    pick: bool,
) -> Branch {
    let tcc = branch.kind.tcc();
    if matches!(branch.kind, Kind::TryTry | Kind::PreparePrepare) {
        // A debit of more than half what is available: of two tries that
        // both ran, the second votes no for funds while the first holds.
        let available: i64 = db
            .query_one(
                "SELECT balance - frozen FROM bank_accounts WHERE id = $1",
                &[&format!("a{}", branch.account)],
            )
            .await
            .expect("available")
            .get(0);
        branch.delta = -(available / 2 + 1);
    }
    let req = BranchRequest {
        gtid: branch.gtid.to_string(),
        branch_id: branch.branch_id,
        resource: if tcc { "accounts-tcc" } else { "accounts" }.into(),
        payload: format!("a{}:{}", branch.account, branch.delta).into(),
        attempt: 1,
        epoch: 1,
        mode: 0,
    };
    let b = a + 1;
    let r = &replicas;
    let one = |to| r.call(to, tcc, Call::One, req.clone());
    let cancel = |to| r.call(to, tcc, Call::Cancel, req.clone());
    let confirm = |to| r.call(to, tcc, Call::Confirm, req.clone());
    let yes = |v: &Result<Option<bool>, String>| matches!(v, Ok(Some(true)));
    branch.commit = match branch.kind {
        Kind::TryCancel | Kind::PrepareRollback => {
            let _answers = raced(one(a), cancel(b), gap).await;
            false
        }
        Kind::CancelLateTry | Kind::RollbackPrepare => {
            let _answers = raced(cancel(a), one(b), gap).await;
            false
        }
        Kind::TryTry | Kind::PreparePrepare => {
            // The coordinator heard one of the two answers.
            let (x, y) = raced(one(a), one(b), gap).await;
            yes(if pick { &x } else { &y })
        }
        Kind::ConfirmConfirm | Kind::CommitCommit => {
            if yes(&one(a).await) {
                let _answers = raced(confirm(a), confirm(b), gap).await;
                true
            } else {
                false
            }
        }
    };
    branch.unfinished = r.finish(b, tcc, branch.commit, &req).await;
    branch
}

fn pairs_wanted() -> usize {
    std::env::var("TANDEM_REPLICA_PAIRS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_PAIRS)
}

/// One wrong branch: why.
fn wrong(branch: &Branch, mark: Option<Mark>, held: bool, prepared: bool) -> Option<String> {
    let want_ok = matches!(
        (branch.commit, mark),
        (true, Some(Mark::Confirmed)) | (false, Some(Mark::Cancelled | Mark::EmptyCancelled))
    );
    let mut why = Vec::new();
    if !want_ok {
        let decided = if branch.commit { "commit" } else { "abort" };
        why.push(format!("decided {decided}, barrier has {mark:?}"));
    }
    if held {
        why.push("TCC hold left".into());
    }
    if prepared {
        why.push("prepared transaction left".into());
    }
    if let Some(e) = &branch.unfinished {
        why.push(format!("phase 2 never acknowledged: {e}"));
    }
    (!why.is_empty()).then(|| why.join("; "))
}

// Rule: the barrier serialises the calls of one branch across every
// process sharing its database, so raced, repeated and reordered calls
// sent to two replicas end exactly as when sent to one: the mark agrees
// with the decision, nothing stays held, and money is exactly conserved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_one_database_keep_the_barrier_under_raced_calls() {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos() as u64
        | 1;
    let pairs = pairs_wanted();
    eprintln!("replica race: seed {seed}, {pairs} pairs");
    let pg = PgServer::start();
    let db = pg.create_database("replicas").await;
    let names: Vec<String> = (0..ACCOUNTS).map(|i| format!("a{i}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let opening = OPENING.to_string();
    let extra = ["--balance", opening.as_str()];
    let shards = [
        Shard::start(&db, &names, None, &extra),
        Shard::start(&db, &names, None, &extra),
    ];
    let mut channels = Vec::new();
    for s in &shards {
        channels.push(
            Channel::from_shared(s.url.clone())
                .expect("url")
                .connect()
                .await
                .expect("connect"),
        );
    }
    let replicas = Replicas([channels[0].clone(), channels[1].clone()]);
    let checks = Arc::new(connect(&db).await);

    let started = Instant::now();
    let mut rng = Rng(seed);
    let limit = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut tasks = Vec::with_capacity(pairs);
    for i in 0..pairs {
        let kind = KINDS[i % KINDS.len()];
        let half = ACCOUNTS / 2;
        let branch = Branch {
            kind,
            gtid: Uuid::now_v7(),
            branch_id: 1 + rng.below(4) as u32,
            account: rng.below(half as u64) as usize + if kind.tcc() { 0 } else { half },
            delta: if rng.below(2) == 0 { -1 } else { 1 } * (1 + rng.below(100) as i64),
            commit: false,
            unfinished: None,
        };
        let gap = Duration::from_micros(rng.below(5_001));
        let (a, pick) = (rng.below(2) as usize, rng.below(2) == 0);
        let permit = limit.clone().acquire_owned().await.expect("semaphore");
        let (replicas, db) = (replicas.clone(), checks.clone());
        tasks.push(tokio::spawn(async move {
            let done = run_pair(replicas, db, branch, gap, a, pick).await;
            drop(permit);
            done
        }));
    }
    let mut branches = Vec::with_capacity(pairs);
    for t in tasks {
        branches.push(t.await.expect("pair task"));
    }
    let sent_in = started.elapsed();

    // What the database holds, per branch.
    let client = checks;
    let marks: HashMap<(Uuid, i64), i16> = client
        .query("SELECT gtid, branch_id, mark FROM tandem_barrier", &[])
        .await
        .expect("marks")
        .into_iter()
        .map(|r| ((r.get(0), r.get(1)), r.get(2)))
        .collect();
    let holds: HashMap<(Uuid, i64), ()> = client
        .query("SELECT gtid, branch_id FROM bank_holds", &[])
        .await
        .expect("holds")
        .into_iter()
        .map(|r| ((r.get(0), r.get(1)), ()))
        .collect();
    let prepared: Vec<String> = prepared_xacts(&client).await;
    let mut expected = vec![OPENING; ACCOUNTS];
    let mut per_kind: HashMap<Kind, (usize, usize)> = HashMap::new();
    let mut examples = Vec::new();
    for b in &branches {
        let key = (b.gtid, i64::from(b.branch_id));
        if b.commit {
            expected[b.account] += b.delta;
        }
        let mark = marks
            .get(&key)
            .and_then(|&c| u8::try_from(c).ok())
            .and_then(Mark::from_code);
        let gid = format!("tandem:{}:{}", b.gtid, b.branch_id);
        let bad = wrong(b, mark, holds.contains_key(&key), prepared.contains(&gid));
        let tally = per_kind.entry(b.kind).or_default();
        tally.0 += 1;
        if let Some(why) = bad {
            tally.1 += 1;
            if examples.len() < 10 {
                examples.push(format!(
                    "{:?} {} branch {}: {why}",
                    b.kind, b.gtid, b.branch_id
                ));
            }
        }
    }
    let mut off = Vec::new();
    let (mut total, mut want_total, mut frozen) = (0i64, 0i64, 0i64);
    for row in client
        .query("SELECT id, balance, frozen FROM bank_accounts", &[])
        .await
        .expect("accounts")
    {
        let id: String = row.get(0);
        let i: usize = id[1..].parse().expect("account id");
        let (balance, f): (i64, i64) = (row.get(1), row.get(2));
        total += balance;
        want_total += expected[i];
        frozen += f;
        if balance != expected[i] {
            off.push(format!("{id}: {balance}, decided {}", expected[i]));
        }
    }
    let mut kinds: Vec<_> = per_kind.into_iter().collect();
    kinds.sort();
    let wrong_total: usize = kinds.iter().map(|(_, (_, w))| w).sum();
    let commits = branches.iter().filter(|b| b.commit).count();
    eprintln!(
        "replica race: {pairs} pairs in {sent_in:?}, {commits} decided commit; wrong {wrong_total}: {}; \
         holds left {}, prepared left {}, frozen {frozen}, accounts off {}, total {total} (decided {want_total})",
        kinds
            .iter()
            .map(|(k, (n, w))| format!("{k:?} {w}/{n}"))
            .collect::<Vec<_>>()
            .join(", "),
        holds.len(),
        prepared.len(),
        off.len(),
    );
    assert!(
        wrong_total == 0
            && off.is_empty()
            && frozen == 0
            && holds.is_empty()
            && prepared.is_empty(),
        "seed {seed}: {wrong_total} branches wrong, e.g. {examples:#?}; accounts off: {:?}",
        &off[..off.len().min(10)]
    );
    assert!(
        commits > 0,
        "no branch was decided commit: the race checked nothing"
    );
}

// Rule: replicas started at the same moment on a fresh database all come
// up: the example's own tables are created under an advisory lock, as the
// SDK's are (a bare CREATE TABLE IF NOT EXISTS can fail on a race in the
// catalog).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_starting_at_once_on_a_fresh_database_all_come_up() {
    let pg = PgServer::start();
    for round in 0..6 {
        let db = pg.create_database(&format!("fresh_{round}")).await;
        let starts: Vec<_> = (0..3)
            .map(|_| {
                let db = db.clone();
                std::thread::spawn(move || {
                    std::panic::catch_unwind(|| Shard::start(&db, &["alice", "bob"], None, &[]))
                })
            })
            .collect();
        let up = starts
            .into_iter()
            .map(|t| t.join().expect("thread"))
            .filter(Result::is_ok)
            .count();
        assert_eq!(up, 3, "round {round}: only {up} of 3 replicas came up");
    }
}

//! Several `tandem serve` processes on one PostgreSQL store: instances
//! killed under load are taken over by the others (or by their own
//! restart), and a paused owner is fenced. A raw participant records every
//! call it receives, per branch, so the checks see what was *sent*, not
//! only what a barrier let through.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_proto::v1 as pb;
use tandem_proto::v1::participant_server::{Participant, ParticipantServer};
use tandem_sdk::{Branch, Mode, TransactionClient};
use tandem_tests::Rng;
use tandem_tests::pg::{PgServer, incarnation, owned_by};
use tandem_tests::process::Serve;
use tonic::{Request, Response, Status};

/// What one branch received.
#[derive(Clone, Debug, Default)]
struct Calls {
    phase_one: usize,
    commits: usize,
    rollbacks: usize,
    /// The epoch of every phase-2 call, in arrival order.
    phase_two_epochs: Vec<u64>,
}

/// A participant that votes yes, records every call per (gtid, branch),
/// can fail phase 2 on demand, and is slow to prepare resource "slow".
#[derive(Clone, Default)]
struct Ledger {
    calls: Arc<Mutex<HashMap<(String, u32), Calls>>>,
    phase_two_down: Arc<AtomicBool>,
}

impl Ledger {
    fn note(&self, req: &pb::BranchRequest, f: impl FnOnce(&mut Calls)) {
        let mut calls = self.calls.lock().expect("calls");
        f(calls.entry((req.gtid.clone(), req.branch_id)).or_default());
    }

    async fn phase_one(
        &self,
        req: Request<pb::BranchRequest>,
    ) -> Result<Response<pb::VoteResponse>, Status> {
        let req = req.into_inner();
        self.note(&req, |c| c.phase_one += 1);
        if req.resource == "slow" {
            tokio::time::sleep(Duration::from_secs(4)).await;
        }
        Ok(Response::new(pb::VoteResponse {
            yes: true,
            ..Default::default()
        }))
    }

    fn phase_two(
        &self,
        req: Request<pb::BranchRequest>,
        commit: bool,
    ) -> Result<Response<pb::AckResponse>, Status> {
        if self.phase_two_down.load(Ordering::SeqCst) {
            return Err(Status::unavailable("down for maintenance"));
        }
        let req = req.into_inner();
        self.note(&req, |c| {
            c.phase_two_epochs.push(req.epoch);
            if commit {
                c.commits += 1
            } else {
                c.rollbacks += 1
            }
        });
        Ok(Response::new(pb::AckResponse {}))
    }

    fn snapshot(&self) -> HashMap<(String, u32), Calls> {
        self.calls.lock().expect("calls").clone()
    }

    async fn serve(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(ParticipantServer::new(self.clone()))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        format!("http://{addr}")
    }
}

#[tonic::async_trait]
impl Participant for Ledger {
    async fn prepare(
        &self,
        r: Request<pb::BranchRequest>,
    ) -> Result<Response<pb::VoteResponse>, Status> {
        self.phase_one(r).await
    }
    async fn commit(
        &self,
        r: Request<pb::BranchRequest>,
    ) -> Result<Response<pb::AckResponse>, Status> {
        self.phase_two(r, true)
    }
    async fn rollback(
        &self,
        r: Request<pb::BranchRequest>,
    ) -> Result<Response<pb::AckResponse>, Status> {
        self.phase_two(r, false)
    }
    async fn r#try(
        &self,
        r: Request<pb::BranchRequest>,
    ) -> Result<Response<pb::VoteResponse>, Status> {
        self.phase_one(r).await
    }
    async fn confirm(
        &self,
        r: Request<pb::BranchRequest>,
    ) -> Result<Response<pb::AckResponse>, Status> {
        self.phase_two(r, true)
    }
    async fn cancel(
        &self,
        r: Request<pb::BranchRequest>,
    ) -> Result<Response<pb::AckResponse>, Status> {
        self.phase_two(r, false)
    }
    async fn deliver(
        &self,
        _: Request<pb::BranchRequest>,
    ) -> Result<Response<pb::AckResponse>, Status> {
        Err(Status::unimplemented("this ledger takes no messages"))
    }
    async fn check(
        &self,
        _: Request<pb::BranchRequest>,
    ) -> Result<Response<pb::VoteResponse>, Status> {
        Err(Status::unimplemented("this ledger prepares no messages"))
    }
}

const LEASE: Duration = Duration::from_secs(1);

async fn state_of(
    sql: &tandem_sdk::postgres::tokio_postgres::Client,
    gtid: uuid::Uuid,
) -> Option<i16> {
    sql.query_opt("SELECT state FROM tandem_txns WHERE gtid = $1", &[&gtid])
        .await
        .expect("state")
        .map(|r| r.get(0))
}

async fn unfinished(sql: &tandem_sdk::postgres::tokio_postgres::Client) -> i64 {
    sql.query_one(
        "SELECT count(*) FROM tandem_txns WHERE state IN (1, 2, 3, 5, 7)",
        &[],
    )
    .await
    .expect("count")
    .get(0)
}

/// Every branch got at most one kind of phase 2; every acknowledged
/// commit committed every branch; every branch that ran phase 1 was
/// settled, or its transaction never reached the store (a one-shot record
/// lost with its coordinator: presumed abort, which any instance writes
/// and answers to the participant's in-doubt question).
async fn check_ledger(
    ledger: &Ledger,
    acked: &HashSet<String>,
    branches_per_txn: u32,
    sql: &tandem_sdk::postgres::tokio_postgres::Client,
    coordinator: &str,
) {
    let calls = ledger.snapshot();
    let mut rpc = pb::coordinator_client::CoordinatorClient::connect(coordinator.to_string())
        .await
        .expect("connect");
    let mut in_doubt = 0;
    for ((gtid, branch), c) in &calls {
        assert!(
            c.commits == 0 || c.rollbacks == 0,
            "split: branch {branch} of {gtid} got commit and rollback: {c:?}"
        );
        if c.commits + c.rollbacks == 0 && c.phase_one > 0 {
            in_doubt += 1;
            let id: uuid::Uuid = gtid.parse().expect("gtid");
            // A presumed abort (owner nil) the question below wrote for
            // another branch of the same gtid is not a record of it.
            let stored: i64 = sql
                .query_one(
                    "SELECT count(*) FROM tandem_txns WHERE gtid = $1
                     AND owner <> '00000000-0000-0000-0000-000000000000'",
                    &[&id],
                )
                .await
                .expect("count")
                .get(0);
            assert_eq!(
                stored, 0,
                "branch {branch} of {gtid} (in the store) was never settled"
            );
            let outcome = rpc
                .get_outcome(pb::GetOutcomeRequest { gtid: gtid.clone() })
                .await
                .expect("get outcome")
                .into_inner()
                .outcome;
            assert_eq!(
                outcome,
                pb::Outcome::Abort as i32,
                "{gtid}: in doubt, not presumed abort"
            );
        }
    }
    println!("branches in doubt (record lost with its coordinator): {in_doubt}");
    for gtid in acked {
        for branch in 1..=branches_per_txn {
            let c = calls
                .get(&(gtid.clone(), branch))
                .unwrap_or_else(|| panic!("acknowledged {gtid} never reached branch {branch}"));
            assert!(
                c.commits > 0,
                "acknowledged {gtid}: branch {branch} not committed: {c:?}"
            );
        }
    }
}

// Three coordinators on one store under a 2PC + TCC workload spread over
// them; instances are SIGKILLed again and again: sometimes restarted at
// once (their own restart takes their transactions over), sometimes left
// dead (another instance takes over once the lease expires).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_coordinators_are_taken_over_under_load() {
    let pg = PgServer::start();
    let url = pg.create_database("cluster").await;
    let sql = pg.connect("cluster").await;
    let ledger = Ledger::default();
    let part = ledger.serve().await;
    let data = tempfile::tempdir().expect("dir");
    let names = ["a", "b", "c"];
    let mut servers: Vec<Option<Serve>> = names
        .iter()
        .map(|n| {
            Some(Serve::start_store(
                data.path(),
                &url,
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
    let acked = Arc::new(Mutex::new(HashSet::new()));
    let mut rng = Rng(0x7a4d_e11a);
    let mut failovers = Vec::new();
    for round in 0..4 {
        // A workload over every live instance.
        let stop = Arc::new(AtomicBool::new(false));
        let mut clients = Vec::new();
        for (i, addr) in addrs.iter().enumerate() {
            if servers[i].is_none() {
                continue;
            }
            for k in 0..3 {
                let (url, part, stop, acked) = (
                    format!("http://{addr}"),
                    part.clone(),
                    stop.clone(),
                    acked.clone(),
                );
                clients.push(tokio::spawn(async move {
                    let Ok(client) = TransactionClient::connect(&url).await else {
                        return;
                    };
                    let mode = if k % 2 == 0 {
                        Mode::TwoPhase
                    } else {
                        Mode::Tcc
                    };
                    while !stop.load(Ordering::SeqCst) {
                        let branches =
                            vec![Branch::new(&part, "r", "x"), Branch::new(&part, "r", "y")];
                        match client.submit(mode, branches).await {
                            Ok(done) => {
                                acked.lock().expect("acked").insert(done.gtid.to_string());
                            }
                            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                        }
                    }
                }));
            }
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
        let victim = (rng.next_u64() % 3) as usize;
        let restart_at_once = round % 2 == 0;
        let owner = incarnation(&sql, names[victim]).await;
        let killed_at = Instant::now();
        servers[victim].take().expect("up").kill();
        let orphaned = owned_by(&sql, owner).await;
        if restart_at_once {
            servers[victim] = Some(Serve::start_store(
                data.path(),
                &url,
                names[victim],
                &addrs[victim],
                "1s",
            ));
        }
        // Whoever takes it over, the victim's transactions move on.
        let deadline = Instant::now() + Duration::from_secs(20);
        while owned_by(&sql, owner).await > 0 {
            assert!(
                Instant::now() < deadline,
                "{}'s transactions were not taken over",
                names[victim]
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let took = killed_at.elapsed();
        failovers.push((names[victim], restart_at_once, orphaned, took));
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.store(true, Ordering::SeqCst);
        for c in clients {
            let _ = c.await;
        }
        if servers[victim].is_none() {
            servers[victim] = Some(Serve::start_store(
                data.path(),
                &url,
                names[victim],
                &addrs[victim],
                "1s",
            ));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while unfinished(&sql).await > 0 {
        assert!(Instant::now() < deadline, "transactions left unfinished");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let acked = acked.lock().expect("acked").clone();
    assert!(
        acked.len() > 20,
        "the workload ran: {} commits",
        acked.len()
    );
    let any = servers[0].as_ref().expect("up").url.clone();
    check_ledger(&ledger, &acked, 2, &sql, &any).await;
    for (name, restarted, orphaned, took) in &failovers {
        println!(
            "failover of {name} ({}, {orphaned} transactions in flight): {} ms",
            if *restarted {
                "restarted at once"
            } else {
                "left dead"
            },
            took.as_millis()
        );
        assert!(
            *took <= 2 * LEASE + Duration::from_millis(500),
            "failover of {name} took {took:?}, more than twice the {LEASE:?} lease"
        );
    }
    println!("acknowledged commits: {}", acked.len());

    // The operator's view: three live instances, nothing owned, nothing
    // waiting.
    let ran =
        tandem_tests::process::tandem(&["cluster", "status", "--store", &url, "--output", "json"]);
    assert!(ran.ok, "tandem cluster status: {}", ran.stderr);
    let doc: serde_json::Value = serde_json::from_str(&ran.stdout).expect("json");
    let mut names: Vec<&str> = doc["instances"]
        .as_array()
        .expect("instances")
        .iter()
        .map(|i| i["name"].as_str().expect("name"))
        .collect();
    names.sort();
    assert_eq!(names, ["a", "b", "c"], "{doc}");
    assert_eq!(doc["expired_leases"], 0, "{doc}");
}

// An owner paused (SIGSTOP) past its lease while it holds a decided
// transaction (commit forced, phase 2 failing) and an undecided one (a
// prepare in flight): another instance takes both over and finishes them
// (commit; abort). Resumed, the former owner's prepare answer arrives and
// it decides commit: that write is refused, it stops deciding, and no
// participant hears a decision from it that contradicts the new owner's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_owner_is_fenced() {
    let pg = PgServer::start();
    let url = pg.create_database("paused").await;
    let sql = pg.connect("paused").await;
    let ledger = Ledger::default();
    ledger.phase_two_down.store(true, Ordering::SeqCst);
    let part = ledger.serve().await;
    let data = tempfile::tempdir().expect("dir");
    let a = Serve::start_store(data.path(), &url, "a", "127.0.0.1:0", "1s");
    let b = Serve::start_store(data.path(), &url, "b", "127.0.0.1:0", "1s");
    let client = TransactionClient::connect(&a.url).await.expect("connect a");

    // Decided: both yes, commit forced, phase 2 failing.
    let decided = client.begin(Mode::TwoPhase).await.expect("begin");
    client
        .enlist(decided, Branch::new(&part, "r", "x"))
        .await
        .expect("enlist");
    client
        .enlist(decided, Branch::new(&part, "r", "y"))
        .await
        .expect("enlist");
    let committing = {
        let client = client.clone();
        tokio::spawn(async move { client.commit(decided).await })
    };
    // Undecided: a one-shot transaction whose second try takes 4 s; once
    // it answers, its coordinator decides commit on its own.
    let undecided = tandem_sdk::Gtid::now_v7();
    let slow = {
        let client = client.clone();
        let part = part.clone();
        tokio::spawn(async move {
            let branches = vec![
                Branch::new(&part, "r", "x"),
                Branch::new(&part, "slow", "y"),
            ];
            client.submit_as(undecided, Mode::Tcc, branches, None).await
        })
    };
    let state = |gtid: uuid::Uuid| {
        let sql = &sql;
        async move {
            let row = sql
                .query_one(
                    "SELECT state, epoch FROM tandem_txns WHERE gtid = $1",
                    &[&gtid],
                )
                .await
                .expect("row");
            (row.get::<_, i16>(0), row.get::<_, i64>(1))
        }
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while state(decided).await.0 != 3 || state_of(&sql, undecided).await != Some(2) {
        assert!(
            Instant::now() < deadline,
            "the commit decision never reached the store"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    a.signal("STOP");
    let paused_at = Instant::now();
    // B takes both over (epoch 2) once A's lease has expired.
    while state(decided).await.1 < 2 || state(undecided).await.1 < 2 {
        assert!(paused_at.elapsed() < Duration::from_secs(10), "no takeover");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "takeover of a paused owner: {} ms",
        paused_at.elapsed().as_millis()
    );
    ledger.phase_two_down.store(false, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(10);
    while state(decided).await.0 != 4 || state(undecided).await.0 != 6 {
        assert!(
            Instant::now() < deadline,
            "B did not finish: {:?} {:?}",
            state(decided).await,
            state(undecided).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A wakes up: its slow try answers yes, it decides commit.
    a.signal("CONT");
    let answer = slow.await.expect("join");
    assert!(
        answer.is_err(),
        "the paused owner reported a commit: {answer:?}"
    );
    let _ = committing.await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(state(decided).await, (4, 2), "decided: committed by B");
    assert_eq!(state(undecided).await, (6, 2), "undecided: aborted by B");
    let calls = ledger.snapshot();
    for ((gtid, branch), c) in &calls {
        // B's calls carry the epoch of its takeover.
        assert!(
            c.phase_two_epochs.contains(&2),
            "branch {branch} of {gtid} never heard epoch 2: {c:?}"
        );
        if *gtid == undecided.to_string() {
            assert_eq!(
                c.commits, 0,
                "the paused owner's commit reached branch {branch}: {c:?}"
            );
            assert!(c.rollbacks > 0, "branch {branch} never cancelled: {c:?}");
        } else {
            assert_eq!(
                c.rollbacks, 0,
                "the committed transaction was rolled back: {c:?}"
            );
            assert!(c.commits > 0, "branch {branch} never committed: {c:?}");
        }
    }
    // A stopped deciding: it refuses new work rather than act on leases
    // it no longer holds.
    let refused = client.begin(Mode::TwoPhase).await;
    assert!(
        refused.is_err(),
        "the fenced coordinator still starts transactions"
    );
    drop(b);
}

// One client-chosen gtid submitted to two instances at the same moment (a
// hedged request): one of them runs it; the other is refused that
// transaction alone and keeps serving. No branch gets both outcomes, and
// an acknowledged commit is the store's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_gtid_started_at_two_instances_at_once() {
    let pg = PgServer::start();
    let url = pg.create_database("hedged").await;
    let sql = pg.connect("hedged").await;
    let ledger = Ledger::default();
    let part = ledger.serve().await;
    let data = tempfile::tempdir().expect("dir");
    let a = Serve::start_store(data.path(), &url, "a", "127.0.0.1:0", "1s");
    let b = Serve::start_store(data.path(), &url, "b", "127.0.0.1:0", "1s");
    let ca = TransactionClient::connect(&a.url).await.expect("a");
    let cb = TransactionClient::connect(&b.url).await.expect("b");
    let mut refused = 0;
    let mut committed = Vec::new();
    for i in 0..20 {
        let gtid = tandem_sdk::Gtid::now_v7();
        let mode = if i % 2 == 0 {
            Mode::TwoPhase
        } else {
            Mode::Tcc
        };
        let branches = vec![Branch::new(&part, "r", "x"), Branch::new(&part, "r", "y")];
        let (ra, rb) = tokio::join!(
            ca.submit_as(gtid, mode, branches.clone(), None),
            cb.submit_as(gtid, mode, branches, None)
        );
        for r in [&ra, &rb] {
            match r {
                Ok(_) => committed.push(gtid),
                Err(e) if e.to_string().contains("another coordinator") => refused += 1,
                Err(_) => {}
            }
        }
    }
    println!("refused as started elsewhere: {refused} of 40 calls");
    // Both still serve.
    for (name, c) in [("a", &ca), ("b", &cb)] {
        let gtid = c
            .begin(Mode::TwoPhase)
            .await
            .unwrap_or_else(|e| panic!("{name} stopped serving: {e}"));
        c.rollback(gtid, "check").await.expect("rollback");
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while unfinished(&sql).await > 0 {
        assert!(Instant::now() < deadline, "transactions left unfinished");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for gtid in &committed {
        assert_eq!(
            state_of(&sql, *gtid).await,
            Some(4),
            "{gtid} acknowledged, not committed in the store"
        );
    }
    let acked: HashSet<String> = committed.iter().map(|g| g.to_string()).collect();
    check_ledger(&ledger, &acked, 2, &sql, &a.url).await;
}

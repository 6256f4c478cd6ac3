//! The I/O thread of [`super::PgLog`]: its own Tokio runtime, the
//! connection pool, the flusher (group commit), reads, lease renewal and
//! takeover. The log's synchronous methods hand work over a channel and
//! wait for the answer, so they never need the caller's runtime.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use tandem_sdk::postgres::{self, Pool, tokio_postgres};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use super::schema::{self, code, unfinished_codes};
use super::{ClusterStatus, InstanceStatus, Op, Shared};
use crate::log::{LogError, TakeOverFuture, codec};
use crate::model::{Gtid, TxState, TxnRecord};

/// How long a plain write may wait for company before it is flushed.
const LINGER: Duration = Duration::from_millis(20);

type Reply<T> = std::sync::mpsc::SyncSender<Result<T, LogError>>;

enum Job {
    Get(Gtid, Reply<Option<TxnRecord>>),
    Scan {
        after: Option<Gtid>,
        states: Vec<TxState>,
        limit: usize,
        own: bool,
        reply: Reply<Vec<TxnRecord>>,
    },
    TakeOver(usize, oneshot::Sender<Result<Vec<Gtid>, LogError>>),
    Cluster(oneshot::Sender<Result<ClusterStatus, LogError>>),
}

/// The handle's side: a channel to the thread, joined on drop.
pub(super) struct IoHandle {
    jobs: Option<mpsc::UnboundedSender<Job>>,
    stop: Arc<tokio::sync::Notify>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn closed() -> LogError {
    LogError::Halted("the log was closed".into())
}

fn storage(what: &str, e: &dyn std::fmt::Display) -> LogError {
    LogError::Storage(format!("{what}: {e}"))
}

impl IoHandle {
    /// Starts the thread and opens the store on it; returns once the store
    /// is ready (or failed).
    pub(super) fn start(shared: Arc<Shared>) -> Result<Self, LogError> {
        let (jobs_tx, jobs_rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let stop = Arc::new(tokio::sync::Notify::new());
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("tandem-pg-log".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(storage("cannot start the store's runtime", &e)));
                        return;
                    }
                };
                rt.block_on(run(shared, jobs_rx, ready_tx, stop2));
            })
            .map_err(|e| storage("cannot start the store's thread", &e))?;
        let mut handle = IoHandle {
            jobs: Some(jobs_tx),
            stop,
            thread: Some(thread),
        };
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(handle),
            Ok(Err(e)) => {
                handle.shutdown();
                Err(e)
            }
            Err(_) => {
                handle.shutdown();
                Err(storage("the store's thread ended", &"while opening"))
            }
        }
    }

    fn send(&self, job: Job) {
        if let Some(jobs) = &self.jobs {
            let _ = jobs.send(job);
        }
    }

    pub(super) fn get(
        &self,
        gtid: Gtid,
    ) -> std::sync::mpsc::Receiver<Result<Option<TxnRecord>, LogError>> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.send(Job::Get(gtid, tx));
        rx
    }

    pub(super) fn scan(
        &self,
        after: Option<Gtid>,
        states: Vec<TxState>,
        limit: usize,
        own: bool,
    ) -> std::sync::mpsc::Receiver<Result<Vec<TxnRecord>, LogError>> {
        let (reply, rx) = std::sync::mpsc::sync_channel(1);
        self.send(Job::Scan {
            after,
            states,
            limit,
            own,
            reply,
        });
        rx
    }

    pub(super) fn take_over(&self, limit: usize) -> TakeOverFuture {
        let (tx, rx) = oneshot::channel();
        self.send(Job::TakeOver(limit, tx));
        Box::pin(async move { rx.await.unwrap_or_else(|_| Err(closed())) })
    }

    pub(super) async fn cluster(&self) -> Result<ClusterStatus, LogError> {
        let (tx, rx) = oneshot::channel();
        self.send(Job::Cluster(tx));
        rx.await.unwrap_or_else(|_| Err(closed()))
    }

    fn shutdown(&mut self) {
        self.jobs = None;
        self.stop.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for IoHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The thread's main: open, then serve jobs, flush and renew until stopped.
async fn run(
    shared: Arc<Shared>,
    mut jobs: mpsc::UnboundedReceiver<Job>,
    ready: std::sync::mpsc::SyncSender<Result<(), LogError>>,
    stop: Arc<tokio::sync::Notify>,
) {
    let store = match Store::open(shared.clone()).await {
        Ok(s) => Arc::new(s),
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    let flusher = tokio::spawn(store.clone().flush_loop());
    let renewer = tokio::spawn(store.clone().renew_loop());
    loop {
        tokio::select! {
            job = jobs.recv() => match job {
                Some(job) => { tokio::spawn(store.clone().serve(job)); }
                None => break,
            },
            () = stop.notified() => break,
        }
    }
    renewer.abort();
    // A last flush of what was written, as a clean close does.
    store.stopping.store(true, Ordering::SeqCst);
    store.shared.wake.notify_one();
    let _ = tokio::time::timeout(Duration::from_secs(5), flusher).await;
}

/// The store as the I/O thread sees it.
struct Store {
    shared: Arc<Shared>,
    pool: Pool,
    stopping: std::sync::atomic::AtomicBool,
}

/// Whether a store error may go away by itself (connection lost, server
/// restarting or failing over, a deadlock or serialization conflict).
fn transient(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.code() {
        Some(c) => {
            let c = c.code();
            c.starts_with("08") // connection exception
                || c.starts_with("57P") // admin shutdown, crash shutdown, cannot connect now
                || c == "40001" // serialization failure
                || c == "40P01" // deadlock detected
                || c == "25006" // read-only transaction: a standby, until promoted
        }
        // No SQLSTATE: an I/O error on the socket is worth waiting out;
        // anything else (a parameter that does not serialise) is a bug.
        None => io_source(e),
    }
}

fn io_source(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = e.source();
    while let Some(s) = source {
        if s.is::<std::io::Error>() {
            return true;
        }
        source = s.source();
    }
    false
}

/// A store error, or a pool that could not give a connection.
enum Fail {
    Transient(String),
    Fatal(String),
}

impl From<tokio_postgres::Error> for Fail {
    fn from(e: tokio_postgres::Error) -> Self {
        let text = postgres::describe(&e);
        if transient(&e) {
            Fail::Transient(text)
        } else {
            Fail::Fatal(text)
        }
    }
}

impl From<postgres::deadpool_postgres::PoolError> for Fail {
    fn from(e: postgres::deadpool_postgres::PoolError) -> Self {
        use postgres::deadpool_postgres::PoolError;
        match e {
            PoolError::Backend(e) => {
                let mut fail = Fail::from(e);
                let (Fail::Transient(text) | Fail::Fatal(text)) = &mut fail;
                *text = format!("no connection to the store: {text}");
                fail
            }
            // Timeouts: the server cannot be reached (a failover or a
            // restart), worth waiting for.
            e => Fail::Transient(format!("no connection to the store: {e}")),
        }
    }
}

impl Store {
    async fn open(shared: Arc<Shared>) -> Result<Store, LogError> {
        let o = &shared.options;
        let pool =
            postgres::pool(&o.url, o.pool_size).map_err(|e| storage("cannot use the store", &e))?;
        let store = Store {
            shared: shared.clone(),
            pool,
            stopping: std::sync::atomic::AtomicBool::new(false),
        };
        let claimed = store.retry("open the store", || store.register()).await?;
        info!(
            name = %o.name,
            incarnation = %shared.incarnation,
            taken_over = claimed,
            "transaction log on PostgreSQL"
        );
        Ok(store)
    }

    /// Runs `op` until it succeeds, fails for good, or the store timeout
    /// passes.
    async fn retry<T, F, Fut>(&self, what: &str, mut op: F) -> Result<T, LogError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, Fail>>,
    {
        let deadline = tokio::time::Instant::now() + self.shared.options.store_timeout;
        let mut pause = Duration::from_millis(50);
        loop {
            match op().await {
                Ok(v) => return Ok(v),
                Err(Fail::Fatal(e)) => return Err(LogError::Storage(format!("{what}: {e}"))),
                Err(Fail::Transient(e)) => {
                    if tokio::time::Instant::now() + pause > deadline {
                        return Err(LogError::Storage(format!(
                            "{what}: the store did not answer for {:?}: {e}",
                            self.shared.options.store_timeout
                        )));
                    }
                    warn!(error = %e, "{what}: store unavailable, retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    fn lease_ms(&self) -> i64 {
        self.shared.options.lease.as_millis() as i64
    }

    /// Migrates, registers this incarnation, and takes over the unfinished
    /// rows of earlier incarnations of this name. Returns how many.
    async fn register(&self) -> Result<u64, Fail> {
        let mut client = self.pool.get().await?;
        schema::migrate(&mut client).await.map_err(Fail::Fatal)?;
        let o = &self.shared.options;
        let me = self.shared.incarnation;
        let tx = client.transaction().await?;
        tx.execute(
            "INSERT INTO tandem_instances (incarnation, name, address) VALUES ($1, $2, $3)
             ON CONFLICT (incarnation) DO UPDATE SET heartbeat_at = now()",
            &[&me, &o.name, &o.address],
        )
        .await?;
        let claimed = tx
            .execute(
                "UPDATE tandem_txns SET owner = $1, epoch = epoch + 1,
                     lease_until = now() + $3::bigint * interval '1 millisecond'
                 WHERE state = ANY($4) AND owner IN (
                     SELECT incarnation FROM tandem_instances
                     WHERE name = $2 AND incarnation <> $1)",
                &[&me, &o.name, &self.lease_ms(), &unfinished_codes()],
            )
            .await?;
        // Earlier incarnations of this name own nothing unfinished now.
        tx.execute(
            "DELETE FROM tandem_instances WHERE name = $1 AND incarnation <> $2",
            &[&o.name, &me],
        )
        .await?;
        tx.commit().await?;
        Ok(claimed)
    }

    async fn serve(self: Arc<Self>, job: Job) {
        match job {
            Job::Get(gtid, reply) => {
                let r = self.retry("read the log", || self.read_one(gtid)).await;
                let _ = reply.send(r.map_err(|e| self.shared.latch(e)).and_then(|r| r));
            }
            Job::Scan {
                after,
                states,
                limit,
                own,
                reply,
            } => {
                let r = match self.flushed().await {
                    Ok(()) => self
                        .retry("scan the log", || {
                            self.read_many(after, &states, limit, own)
                        })
                        .await
                        .map_err(|e| self.shared.latch(e))
                        .and_then(|r| r),
                    Err(e) => Err(e),
                };
                let _ = reply.send(r);
            }
            Job::TakeOver(limit, reply) => {
                let r = self
                    .retry("take over expired leases", || self.claim_expired(limit))
                    .await;
                let _ = reply.send(r);
            }
            Job::Cluster(reply) => {
                let _ = reply.send(self.retry("read the cluster", || self.cluster()).await);
            }
        }
    }

    /// Waits until everything buffered before the call is in the store.
    async fn flushed(&self) -> Result<(), LogError> {
        self.shared.check()?;
        let (tx, rx) = oneshot::channel();
        self.shared.buffer().waiters.push(tx);
        self.shared.check()?;
        self.shared.wake.notify_one();
        rx.await.unwrap_or_else(|_| Err(closed()))
    }

    fn decode_row(
        gtid: Gtid,
        bytes: &[u8],
        payloads: &HashMap<(Gtid, u32), Bytes>,
    ) -> Result<TxnRecord, LogError> {
        codec::decode(gtid, bytes, |branch| {
            Ok(payloads.get(&(gtid, branch)).cloned())
        })
    }

    async fn payloads_of(
        &self,
        client: &tokio_postgres::Client,
        gtids: &[Gtid],
    ) -> Result<HashMap<(Gtid, u32), Bytes>, Fail> {
        if gtids.is_empty() {
            return Ok(HashMap::new());
        }
        let rows = client
            .query(
                "SELECT gtid, branch, payload FROM tandem_payloads WHERE gtid = ANY($1)",
                &[&gtids],
            )
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let branch: i32 = r.get(1);
                (
                    (r.get(0), branch as u32),
                    Bytes::from(r.get::<_, Vec<u8>>(2)),
                )
            })
            .collect())
    }

    async fn read_one(&self, gtid: Gtid) -> Result<Result<Option<TxnRecord>, LogError>, Fail> {
        let client = self.pool.get().await?;
        let Some(row) = client
            .query_opt("SELECT record FROM tandem_txns WHERE gtid = $1", &[&gtid])
            .await?
        else {
            return Ok(Ok(None));
        };
        let bytes: Vec<u8> = row.get(0);
        let payloads = if codec::has_payloads_apart(&bytes) {
            self.payloads_of(&client, &[gtid]).await?
        } else {
            HashMap::new()
        };
        Ok(Self::decode_row(gtid, &bytes, &payloads).map(Some))
    }

    async fn read_many(
        &self,
        after: Option<Gtid>,
        states: &[TxState],
        limit: usize,
        own: bool,
    ) -> Result<Result<Vec<TxnRecord>, LogError>, Fail> {
        let client = self.pool.get().await?;
        let codes: Vec<i16> = states.iter().map(|s| code(*s)).collect();
        let owner = own.then_some(self.shared.incarnation);
        let rows = client
            .query(
                "SELECT gtid, record FROM tandem_txns
                 WHERE ($1::uuid IS NULL OR gtid > $1)
                   AND (cardinality($2::int2[]) = 0 OR state = ANY($2))
                   AND ($3::uuid IS NULL OR owner = $3)
                 ORDER BY gtid LIMIT $4",
                &[
                    &after,
                    &codes,
                    &owner,
                    &(limit.min(i64::MAX as usize) as i64),
                ],
            )
            .await?;
        let rows: Vec<(Gtid, Vec<u8>)> = rows.into_iter().map(|r| (r.get(0), r.get(1))).collect();
        let apart: Vec<Gtid> = rows
            .iter()
            .filter(|(_, b)| codec::has_payloads_apart(b))
            .map(|(g, _)| *g)
            .collect();
        let payloads = self.payloads_of(&client, &apart).await?;
        Ok(rows
            .into_iter()
            .map(|(g, b)| Self::decode_row(g, &b, &payloads))
            .collect())
    }

    /// Flushes the buffer whenever a force waits, or [`LINGER`] after a
    /// plain write, until the log stops or latches.
    async fn flush_loop(self: Arc<Self>) {
        loop {
            if !self.work().await {
                return;
            }
            let (ops, waiters) = {
                let mut buf = self.shared.buffer();
                let ops = std::mem::take(&mut buf.pending);
                buf.inflight = ops.clone();
                (ops, std::mem::take(&mut buf.waiters))
            };
            if self.shared.halted.get().is_some() {
                return; // the latch answered every waiter
            }
            let result = if ops.is_empty() {
                Ok(())
            } else {
                match self.retry("write the log", || self.write_batch(&ops)).await {
                    Ok(fenced) if fenced.is_empty() => Ok(()),
                    Ok(fenced) => Err(LogError::Fenced(format!(
                        "{} transaction(s) (first {}) were taken over by another coordinator \
                         while this one was paused or cut off from the store past its lease; \
                         this coordinator stops deciding: restart it",
                        fenced.len(),
                        fenced
                            .iter()
                            .next()
                            .map(|g| g.to_string())
                            .unwrap_or_default()
                    ))),
                    Err(e) => Err(e),
                }
            };
            match result {
                Ok(()) => {
                    if !ops.is_empty() {
                        self.shared.flushes.fetch_add(1, Ordering::Relaxed);
                    }
                    self.shared.buffer().inflight.clear();
                    for w in waiters {
                        let _ = w.send(Ok(()));
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "transaction log on PostgreSQL failed");
                    let e = self.shared.latch(e);
                    for w in waiters {
                        let _ = w.send(Err(e.clone()));
                    }
                    return;
                }
            }
        }
    }

    /// Waits until there is something to flush: a force waiting, or a
    /// plain write that has lingered. False when the log is closing with
    /// nothing left, or latched.
    async fn work(&self) -> bool {
        loop {
            if self.shared.halted.get().is_some() {
                return false;
            }
            let (waiting, pending) = {
                let buf = self.shared.buffer();
                (!buf.waiters.is_empty(), !buf.pending.is_empty())
            };
            if waiting {
                return true;
            }
            if self.stopping.load(Ordering::SeqCst) {
                return pending;
            }
            if !pending {
                self.shared.wake.notified().await;
                continue;
            }
            // A plain write waits for company, unless a force comes.
            let until = tokio::time::Instant::now() + LINGER;
            loop {
                if tokio::time::timeout_at(until, self.shared.wake.notified())
                    .await
                    .is_err()
                    || !self.shared.buffer().waiters.is_empty()
                    || self.stopping.load(Ordering::SeqCst)
                {
                    return true;
                }
            }
        }
    }

    /// Writes `ops` in one database transaction; returns the gtids whose
    /// write was refused (owned by another incarnation now, or a decision
    /// that would change).
    async fn write_batch(&self, ops: &BTreeMap<Gtid, Op>) -> Result<HashSet<Gtid>, Fail> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let (mut gtids, mut states, mut decisions, mut records) = (vec![], vec![], vec![], vec![]);
        let (mut pay_g, mut pay_b, mut pay_p) = (vec![], vec![], vec![]);
        let mut removed = vec![];
        for (gtid, op) in ops {
            match op {
                Op::Remove => removed.push(*gtid),
                Op::Write(p) => {
                    gtids.push(*gtid);
                    states.push(code(p.record.state));
                    decisions.push(p.record.decision.map(|d| match d {
                        crate::model::Decision::Commit => 1i16,
                        crate::model::Decision::Abort => 2i16,
                    }));
                    records.push(codec::encode(&p.record));
                    for (branch, payload) in &p.payloads {
                        pay_g.push(*gtid);
                        pay_b.push(*branch as i32);
                        pay_p.push(payload.to_vec());
                    }
                }
            }
        }
        if !removed.is_empty() {
            tx.execute("DELETE FROM tandem_txns WHERE gtid = ANY($1)", &[&removed])
                .await?;
            tx.execute(
                "DELETE FROM tandem_payloads WHERE gtid = ANY($1)",
                &[&removed],
            )
            .await?;
        }
        if !pay_g.is_empty() {
            tx.execute(
                "INSERT INTO tandem_payloads (gtid, branch, payload)
                 SELECT * FROM unnest($1::uuid[], $2::int4[], $3::bytea[])
                 ON CONFLICT (gtid, branch) DO UPDATE SET payload = excluded.payload",
                &[&pay_g, &pay_b, &pay_p],
            )
            .await?;
        }
        let mut fenced = HashSet::new();
        if !gtids.is_empty() {
            let written = tx
                .query(
                    "INSERT INTO tandem_txns AS t
                         (gtid, state, decision, record, owner, epoch, lease_until)
                     SELECT g, s, d, r, $5, 1, now() + $6::bigint * interval '1 millisecond'
                     FROM unnest($1::uuid[], $2::int2[], $3::int2[], $4::bytea[]) AS b(g, s, d, r)
                     ON CONFLICT (gtid) DO UPDATE
                     SET state = excluded.state, decision = excluded.decision,
                         record = excluded.record, updated_at = now()
                     WHERE t.owner = excluded.owner
                       AND (t.decision IS NULL OR t.decision = excluded.decision)
                     RETURNING gtid",
                    &[
                        &gtids,
                        &states,
                        &decisions,
                        &records,
                        &self.shared.incarnation,
                        &self.lease_ms(),
                    ],
                )
                .await?;
            let written: HashSet<Gtid> = written.into_iter().map(|r| r.get(0)).collect();
            fenced = gtids.into_iter().filter(|g| !written.contains(g)).collect();
        }
        if fenced.is_empty() {
            tx.commit().await?;
        }
        // Refused: nothing of this batch lands (the transaction is dropped
        // uncommitted), and the log latches.
        Ok(fenced)
    }

    /// Renews this incarnation's heartbeat and the leases of all it owns,
    /// one statement each, every third of the lease.
    async fn renew_loop(self: Arc<Self>) {
        let period = self.shared.options.lease / 3;
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if self.shared.halted.get().is_some() {
                return;
            }
            match self.renew().await {
                Ok(true) => {}
                Ok(false) => {
                    self.shared.latch(LogError::Fenced(format!(
                        "another process registered as instance {:?}: this one stops deciding",
                        self.shared.options.name
                    )));
                    return;
                }
                Err(Fail::Transient(e) | Fail::Fatal(e)) => {
                    warn!(error = %e, "cannot renew the leases in the store; retrying")
                }
            }
        }
    }

    async fn renew(&self) -> Result<bool, Fail> {
        let client = self.pool.get().await?;
        let me = self.shared.incarnation;
        let alive = client
            .execute(
                "UPDATE tandem_instances SET heartbeat_at = now() WHERE incarnation = $1",
                &[&me],
            )
            .await?;
        client
            .execute(
                "UPDATE tandem_txns SET lease_until = now() + $2::bigint * interval '1 millisecond'
                 WHERE owner = $1 AND state = ANY($3)",
                &[&me, &self.lease_ms(), &unfinished_codes()],
            )
            .await?;
        Ok(alive == 1)
    }

    /// Claims up to `limit` unfinished transactions whose lease expired
    /// (`epoch + 1`), skipping rows another instance is claiming; and
    /// forgets instances long dead that own nothing.
    async fn claim_expired(&self, limit: usize) -> Result<Vec<Gtid>, Fail> {
        let client = self.pool.get().await?;
        let me = self.shared.incarnation;
        let rows = client
            .query(
                "WITH due AS (
                     SELECT gtid FROM tandem_txns
                     WHERE state = ANY($3) AND lease_until < now() AND owner <> $1
                     ORDER BY lease_until LIMIT $4
                     FOR UPDATE SKIP LOCKED)
                 UPDATE tandem_txns t SET owner = $1, epoch = t.epoch + 1,
                     lease_until = now() + $2::bigint * interval '1 millisecond'
                 FROM due WHERE t.gtid = due.gtid
                 RETURNING t.gtid",
                &[&me, &self.lease_ms(), &unfinished_codes(), &(limit as i64)],
            )
            .await?;
        client
            .execute(
                "DELETE FROM tandem_instances i
                 WHERE heartbeat_at < now() - 10 * $1::bigint * interval '1 millisecond'
                   AND NOT EXISTS (SELECT 1 FROM tandem_txns t
                                   WHERE t.owner = i.incarnation AND t.state = ANY($2))",
                &[&self.lease_ms(), &unfinished_codes()],
            )
            .await?;
        Ok(rows.into_iter().map(|r| r.get(0)).collect())
    }

    async fn cluster(&self) -> Result<ClusterStatus, Fail> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT i.name, i.incarnation, i.address,
                        (extract(epoch FROM now() - i.heartbeat_at) * 1000)::bigint,
                        (SELECT count(*) FROM tandem_txns t
                         WHERE t.owner = i.incarnation AND t.state = ANY($1))
                 FROM tandem_instances i ORDER BY i.name, i.started_at",
                &[&unfinished_codes()],
            )
            .await?;
        let expired: i64 = client
            .query_one(
                "SELECT count(*) FROM tandem_txns WHERE state = ANY($1) AND lease_until < now()",
                &[&unfinished_codes()],
            )
            .await?
            .get(0);
        Ok(ClusterStatus {
            instances: rows
                .into_iter()
                .map(|r| InstanceStatus {
                    name: r.get(0),
                    incarnation: r.get(1),
                    address: r.get(2),
                    heartbeat_age_ms: r.get::<_, i64>(3).max(0) as u64,
                    owned: r.get::<_, i64>(4).max(0) as u64,
                })
                .collect(),
            expired: expired.max(0) as u64,
        })
    }
}

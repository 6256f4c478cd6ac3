//! The I/O thread of [`super::PgLog`]: its own Tokio runtime, the
//! connection pool, the flusher (group commit), reads, lease renewal and
//! takeover. The log's synchronous methods hand work over a channel and
//! wait for the answer, so they never need the caller's runtime.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tandem_common::postgres::{self, Pool, tokio_postgres};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use super::{ClusterStatus, Shared};
use crate::Ownership;
use crate::model::{Gtid, TxState, TxnRecord};
use crate::{LogError, TakeOverFuture};

type Reply<T> = std::sync::mpsc::SyncSender<Result<T, LogError>>;
type ReadAnswer = Result<Option<TxnRecord>, LogError>;
type ReadReply = Reply<Option<TxnRecord>>;

/// Batched read queries the log runs at once.
const READS_IN_FLIGHT: usize = 2;
/// Records one read query asks for at most.
const MAX_READ_BATCH: usize = 256;

enum Job {
    Get(Gtid, Reply<Option<TxnRecord>>),
    Scan {
        after: Option<Gtid>,
        states: Vec<TxState>,
        limit: usize,
        own: bool,
        back: bool,
        reply: Reply<Vec<TxnRecord>>,
    },
    TakeOver(
        usize,
        Option<Gtid>,
        oneshot::Sender<Result<Vec<Gtid>, LogError>>,
    ),
    Locate(Gtid, Reply<Option<Ownership>>),
    Cluster(oneshot::Sender<Result<ClusterStatus, LogError>>),
    /// Any other store call (`tombstone.rs`): run on the thread, it
    /// answers through its own channel.
    Call(Call),
}

/// A store call run on the I/O thread.
pub(super) type Call = Box<
    dyn FnOnce(Arc<Store>) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
        + Send,
>;

/// The handle's side: a channel to the thread, joined on drop.
pub(super) struct IoHandle {
    jobs: Option<mpsc::UnboundedSender<Job>>,
    stop: Arc<tokio::sync::Notify>,
    thread: Option<std::thread::JoinHandle<()>>,
}

pub(super) fn closed() -> LogError {
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
        back: bool,
    ) -> std::sync::mpsc::Receiver<Result<Vec<TxnRecord>, LogError>> {
        let (reply, rx) = std::sync::mpsc::sync_channel(1);
        self.send(Job::Scan {
            after,
            states,
            limit,
            own,
            back,
            reply,
        });
        rx
    }

    /// Claims up to `limit` expired leases, or only `only`'s.
    pub(super) fn take_over(&self, limit: usize, only: Option<Gtid>) -> TakeOverFuture {
        let (tx, rx) = oneshot::channel();
        self.send(Job::TakeOver(limit, only, tx));
        Box::pin(async move { rx.await.unwrap_or_else(|_| Err(closed())) })
    }

    pub(super) fn locate(
        &self,
        gtid: Gtid,
    ) -> std::sync::mpsc::Receiver<Result<Option<Ownership>, LogError>> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.send(Job::Locate(gtid, tx));
        rx
    }

    /// Runs `call` on the thread.
    pub(super) fn call(&self, call: Call) {
        self.send(Job::Call(call));
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
    let (reads, read_queue) = mpsc::unbounded_channel();
    let reader = tokio::spawn(store.clone().read_loop(read_queue));
    loop {
        tokio::select! {
            job = jobs.recv() => match job {
                Some(Job::Get(gtid, reply)) => { let _ = reads.send((gtid, reply)); }
                Some(job) => { tokio::spawn(store.clone().serve(job)); }
                None => break,
            },
            () = stop.notified() => break,
        }
    }
    drop(reads);
    reader.abort();
    renewer.abort();
    // A last flush of what was written, as a clean close does.
    store.stopping.store(true, Ordering::SeqCst);
    store.shared.wake.notify_one();
    let _ = tokio::time::timeout(Duration::from_secs(5), flusher).await;
}

/// The store as the I/O thread sees it.
pub(super) struct Store {
    pub(super) shared: Arc<Shared>,
    pub(super) pool: Pool,
    pub(super) stopping: std::sync::atomic::AtomicBool,
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
                || c.starts_with("53") // insufficient resources: too many connections, …
                || c == "57014" // query cancelled (statement_timeout, an operator)
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
pub(super) enum Fail {
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
    pub(super) async fn retry<T, F, Fut>(&self, what: &str, mut op: F) -> Result<T, LogError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, Fail>>,
    {
        let deadline = tokio::time::Instant::now() + self.shared.options.store_timeout;
        let mut pause = Duration::from_millis(50);
        loop {
            // A store that stops answering mid-call (a half-open connection
            // after a failover) is cut at the deadline, not left to TCP.
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let attempt = match tokio::time::timeout(left, op()).await {
                Ok(r) => r,
                Err(_) => Err(Fail::Transient("no answer from the store".into())),
            };
            match attempt {
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

    pub(super) fn lease_ms(&self) -> i64 {
        self.shared.options.lease.as_millis() as i64
    }

    async fn serve(self: Arc<Self>, job: Job) {
        match job {
            Job::Get(gtid, reply) => Self::answer_reads(self.read_batch(vec![(gtid, reply)]).await),
            Job::Scan {
                after,
                states,
                limit,
                own,
                back,
                reply,
            } => {
                let r = match self.flushed().await {
                    Ok(()) => self
                        .retry("scan the log", || {
                            self.read_many(after, &states, limit, own, back)
                        })
                        .await
                        .and_then(|r| r),
                    Err(e) => Err(e),
                };
                let _ = reply.send(r);
            }
            Job::TakeOver(limit, only, reply) => {
                let r = self
                    .retry("take over expired leases", || {
                        self.claim_expired(limit, only)
                    })
                    .await;
                let _ = reply.send(r);
            }
            Job::Locate(gtid, reply) => {
                let r = self.retry("read an owner", || self.owner_of(gtid)).await;
                let _ = reply.send(r);
            }
            Job::Cluster(reply) => {
                let _ = reply.send(self.retry("read the cluster", || self.cluster()).await);
            }
            Job::Call(call) => call(self).await,
        }
    }

    /// Serves single-record reads in batches: one query for every read
    /// that waits, at most [`READS_IN_FLIGHT`] queries at a time, so under
    /// load the store sees one statement per batch, not per request.
    async fn read_loop(self: Arc<Self>, mut queue: mpsc::UnboundedReceiver<(Gtid, ReadReply)>) {
        let in_flight = Arc::new(tokio::sync::Semaphore::new(READS_IN_FLIGHT));
        loop {
            let Ok(permit) = in_flight.clone().acquire_owned().await else {
                return;
            };
            let Some(first) = queue.recv().await else {
                return;
            };
            let mut batch = vec![first];
            while batch.len() < MAX_READ_BATCH {
                match queue.try_recv() {
                    Ok(read) => batch.push(read),
                    Err(_) => break,
                }
            }
            let store = self.clone();
            tokio::spawn(async move {
                Self::answer_reads(store.read_batch(batch).await);
                drop(permit);
            });
        }
    }

    /// Reads the records of `batch` (retried like every store call) and
    /// pairs each reply with its answer.
    async fn read_batch(&self, batch: Vec<(Gtid, ReadReply)>) -> Vec<(ReadReply, ReadAnswer)> {
        let mut gtids: Vec<Gtid> = batch.iter().map(|(g, _)| *g).collect();
        gtids.sort_unstable();
        gtids.dedup();
        // A failed read risks nothing durable: the callers get the error,
        // the log does not latch.
        let found = self.retry("read the log", || self.read_some(&gtids)).await;
        batch
            .into_iter()
            .map(|(gtid, reply)| {
                let answer = match &found {
                    Ok(found) => found.get(&gtid).cloned().unwrap_or(Ok(None)),
                    Err(e) => Err(e.clone()),
                };
                (reply, answer)
            })
            .collect()
    }

    fn answer_reads(answers: Vec<(ReadReply, ReadAnswer)>) {
        for (reply, answer) in answers {
            let _ = reply.send(answer);
        }
    }

    /// Waits until everything buffered before the call is in the store.
    pub(super) async fn flushed(&self) -> Result<(), LogError> {
        self.shared.check()?;
        let (tx, rx) = oneshot::channel();
        self.shared.buffer().waiters.push(tx);
        self.shared.check()?;
        self.shared.wake.notify_one();
        rx.await.unwrap_or_else(|_| Err(closed()))
    }

    async fn cluster(&self) -> Result<ClusterStatus, Fail> {
        let client = self.pool.get().await?;
        super::lease::read_cluster(&client).await
    }
}

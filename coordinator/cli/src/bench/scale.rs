//! `tandem bench --retained M --live N`: memory and start-up at scale.
//!
//! 1. **empty**: `tandem serve` on an empty sled log: its start-up time
//!    (spawn to SERVING) and resident memory, the baseline;
//! 2. **fill**: M finished records (committed, two branches, 16-byte
//!    payloads) written straight into a sled log in a temp dir, through
//!    the coordinator's own [`SledLog`] (its format, its trees), forced
//!    once at the end;
//! 3. **start**: `tandem serve` on it: start-up time (spawn until its
//!    health check says SERVING: the log's open and check, and recovery)
//!    and memory: `(RSS − baseline) ÷ M` per stored record (sled's page
//!    cache is capped, so this falls as M grows: read the slope between
//!    two sizes for what a record costs);
//! 4. **live**: N interactive transactions begun (`Begin`, deadline past
//!    the run) 64 at a time: `ΔRSS ÷ N` per live transaction;
//! 5. **list**: `ListTransactions` timed (medians of [`LIST_CALLS`]): the
//!    first page of everything, and the first page of the ACTIVE ones;
//! 6. **restart**: the coordinator killed (SIGKILL) with the N live and
//!    started again: time to SERVING (recovery done), and until every one
//!    of them is finished (recovery aborts what was undecided at the
//!    crash).
//!
//! Retention is set past the run (a day), so nothing is purged meanwhile.
//! Resident memory is `VmRSS` of `/proc/<pid>/status`.

use std::fmt;
use std::path::Path;

use serde::Serialize;
use tandem_coordinator::log::{SledLog, TxnLog};
use tandem_coordinator::model::{BranchRecord, BranchState, Decision, Gtid, TxState, TxnRecord};

use super::*;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Timed calls per listing (fewer when they take long: see [`list_ms`]).
const LIST_CALLS: usize = 20;
/// A listing stops being repeated after this long (at least three calls).
const LIST_TIME: Duration = Duration::from_secs(5);
/// Begins in flight at once.
const BEGIN_CONCURRENCY: usize = 64;
/// How long a start or a restart may take before the bench gives up.
const SETTLE_LIMIT: Duration = Duration::from_secs(600);
/// Records written between two forces while filling.
const FILL_CHUNK: usize = 100_000;

/// What a scale run measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ScaleReport {
    /// Finished records in the log before the start.
    pub retained: u64,
    /// Live transactions begun after it.
    pub live: u64,
    /// Seconds to write the retained records.
    pub fill_s: f64,
    /// Size of the data dir after the fill, MiB.
    pub data_dir_mb: f64,
    /// Start-up on an empty log, seconds (spawn to SERVING).
    pub startup_empty_s: f64,
    /// Resident memory of a coordinator on an empty log, KiB.
    pub rss_empty_kb: u64,
    /// Start-up with the retained records, seconds.
    pub startup_s: f64,
    /// Resident memory after that start, KiB.
    pub rss_started_kb: u64,
    /// `(rss_started − rss_empty) ÷ retained`, bytes.
    pub rss_per_record_bytes: f64,
    /// Seconds to begin the live transactions.
    pub begin_s: f64,
    /// Resident memory with the live transactions, KiB.
    pub rss_live_kb: u64,
    /// `(rss_live − rss_started) ÷ live`, bytes.
    pub rss_per_live_bytes: f64,
    /// `ListTransactions`, first page (100) of all states: median ms.
    pub list_all_ms: f64,
    /// `ListTransactions`, first page of ACTIVE ones: median ms.
    pub list_active_ms: f64,
    /// After SIGKILL with the live transactions: spawn to SERVING, s.
    pub restart_s: f64,
    /// After SIGKILL: spawn until no unfinished transaction is left, s.
    pub restart_settled_s: f64,
    /// Resident memory after the restart settled, KiB.
    pub rss_restarted_kb: u64,
    /// Peak resident memory of the restarted coordinator, KiB.
    pub peak_rss_restarted_kb: u64,
}

impl fmt::Display for ScaleReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "retained     {} finished records written in {:.1} s ({:.0} MiB of data dir)",
            self.retained, self.fill_s, self.data_dir_mb
        )?;
        writeln!(
            f,
            "start-up     {:.2} s on an empty log, {:.2} s with the retained records",
            self.startup_empty_s, self.startup_s
        )?;
        writeln!(
            f,
            "memory       {} KiB empty, {} KiB with the retained records ({:.1} bytes per record), \
             {} KiB with {} live ({:.0} bytes per live transaction, begun in {:.1} s)",
            self.rss_empty_kb,
            self.rss_started_kb,
            self.rss_per_record_bytes,
            self.rss_live_kb,
            self.live,
            self.rss_per_live_bytes,
            self.begin_s
        )?;
        writeln!(
            f,
            "tx list      {:.1} ms first page of all, {:.1} ms first page of ACTIVE (medians)",
            self.list_all_ms, self.list_active_ms
        )?;
        write!(
            f,
            "restart      after SIGKILL with {} live: serving in {:.2} s, all finished in {:.2} s; \
             {} KiB after, peak {} KiB",
            self.live,
            self.restart_s,
            self.restart_settled_s,
            self.rss_restarted_kb,
            self.peak_rss_restarted_kb
        )
    }
}

fn mode_of(options: &BenchOptions) -> tandem_coordinator::model::Mode {
    match options.mode {
        Mode::TwoPhase => tandem_coordinator::model::Mode::TwoPhase,
        Mode::Tcc => tandem_coordinator::model::Mode::Tcc,
        Mode::Saga => tandem_coordinator::model::Mode::Saga,
        Mode::Msg => tandem_coordinator::model::Mode::Msg,
    }
}

/// A committed record of two branches, as a finished one-shot leaves it.
fn finished(options: &BenchOptions, now_ms: u64) -> TxnRecord {
    let mode = mode_of(options);
    let mut rec = TxnRecord::new(
        Gtid::now_v7(),
        mode,
        TxState::Committed,
        now_ms,
        now_ms + 60_000,
    );
    rec.decision = Some(Decision::Commit);
    for id in 1..=options.branches.max(1) as u32 {
        rec.branches.push(BranchRecord {
            id,
            mode,
            endpoint: format!("http://127.0.0.1:{}", 9000 + id),
            resource: RESOURCE_2PC.to_string(),
            payload: Bytes::from(vec![b'p'; options.payload]),
            reply: Bytes::new(),
            state: BranchState::Committed,
            attempts: 1,
            last_error: String::new(),
            next_attempt_ms: 0,
            updated_ms: now_ms,
            resolution: None,
            after: Vec::new(),
        });
    }
    rec
}

/// Writes `count` finished records into the sled log in `dir`, forcing
/// every `chunk`.
fn fill(dir: &Path, count: u64, chunk: usize, options: &BenchOptions) -> anyhow::Result<()> {
    let log = SledLog::open(dir)?;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64;
    let runtime = tokio::runtime::Builder::new_current_thread().build()?;
    let mut written = 0u64;
    while written < count {
        let chunk = (count - written).min(chunk.max(1) as u64);
        for _ in 0..chunk {
            log.write(&finished(options, now_ms))?;
        }
        runtime.block_on(log.force())?;
        written += chunk;
    }
    Ok(())
}

fn now_s(since: Instant) -> f64 {
    since.elapsed().as_secs_f64()
}

/// Starts a coordinator on `dir` listening on `listen`; its start-up
/// time, seconds: spawn until its health check says SERVING (recovery
/// done).
async fn start(dir: &Path, options: &BenchOptions, listen: &str) -> anyhow::Result<(Proc, f64)> {
    let t0 = Instant::now();
    let p = start_coordinator(dir, listen, options, None, None, 0)?;
    let mut health = HealthClient::new(channel(&p.url(false), None, "client")?);
    loop {
        let serving = health
            .check(HealthCheckRequest::default())
            .await
            .is_ok_and(|r| r.into_inner().status == ServingStatus::Serving as i32);
        if serving {
            return Ok((p, now_s(t0)));
        }
        anyhow::ensure!(
            t0.elapsed() < SETTLE_LIMIT,
            "the coordinator was not serving {} s after its start",
            SETTLE_LIMIT.as_secs()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Median milliseconds of up to [`LIST_CALLS`] listings (at least three,
/// fewer than all once [`LIST_TIME`] has passed).
async fn list_ms(
    admin: &mut tandem_coordinator::cli::Admin,
    states: Vec<i32>,
) -> anyhow::Result<f64> {
    let mut samples = Vec::with_capacity(LIST_CALLS);
    let started = Instant::now();
    for i in 0..LIST_CALLS {
        if i >= 3 && started.elapsed() >= LIST_TIME {
            break;
        }
        let t0 = Instant::now();
        admin
            .list_transactions(pb::ListTransactionsRequest {
                states: states.clone(),
                page_size: 100,
                ..Default::default()
            })
            .await?;
        samples.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    Ok(floor::median(samples))
}

/// Begins `count` interactive transactions, [`BEGIN_CONCURRENCY`] at a time.
async fn begin_all(client: &TransactionClient, mode: Mode, count: u64) -> anyhow::Result<()> {
    let next = Arc::new(AtomicU64::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..BEGIN_CONCURRENCY {
        let (client, next) = (client.clone(), next.clone());
        workers.spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < count {
                client
                    .begin_with_timeout(mode, Some(Duration::from_secs(3600)))
                    .await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = workers.join_next().await {
        done??;
    }
    Ok(())
}

/// Unfinished transactions the coordinator holds (`GetStats`).
async fn live_count(admin: &mut tandem_coordinator::cli::Admin) -> anyhow::Result<u64> {
    Ok(admin
        .get_stats(pb::GetStatsRequest {})
        .await?
        .into_inner()
        .live)
}

/// Runs the scale measurement.
///
/// # Errors
///
/// A coordinator could not be started or reached, or the log written.
pub async fn run(options: BenchOptions, retained: u64, live: u64) -> anyhow::Result<ScaleReport> {
    anyhow::ensure!(
        options.coordinator.is_none() && options.store.is_none() && !options.secure,
        "--retained and --live measure a coordinator the bench starts on a sled log \
         (not with --coordinator, --store or --secure)"
    );
    let options = BenchOptions {
        // Nothing purged during the run.
        retention: options.retention.max(Duration::from_secs(24 * 3600)),
        ..options
    };
    let temp = tempfile::Builder::new()
        .prefix("tandem-bench-scale-")
        .tempdir()?;
    let mut report = ScaleReport {
        retained,
        live,
        ..ScaleReport::default()
    };

    let empty = temp.path().join("empty");
    std::fs::create_dir_all(&empty)?;
    let (p, secs) = start(&empty, &options, "127.0.0.1:0").await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    report.startup_empty_s = secs;
    report.rss_empty_kb = p.stats()?.rss_kb;
    drop(p);

    let dir = temp.path().join("instance-0");
    let t0 = Instant::now();
    let fill_options = options.clone();
    let fill_dir = dir.clone();
    tokio::task::spawn_blocking(move || fill(&fill_dir, retained, FILL_CHUNK, &fill_options))
        .await??;
    report.fill_s = now_s(t0);
    report.data_dir_mb = dir_size(&dir) as f64 / (1024.0 * 1024.0);

    let (p, secs) = start(&dir, &options, "127.0.0.1:0").await?;
    report.startup_s = secs;
    let url = p.url(false);
    let mut admin =
        AdminClient::with_interceptor(channel(&url, None, "admin")?, BearerToken::none());
    let client =
        TransactionClient::from_channel_with(channel(&url, None, "client")?, BearerToken::none());
    tokio::time::sleep(Duration::from_millis(500)).await;
    report.rss_started_kb = p.stats()?.rss_kb;
    report.rss_per_record_bytes = per(report.rss_started_kb, report.rss_empty_kb, retained);

    let t0 = Instant::now();
    begin_all(&client, options.mode, live).await?;
    report.begin_s = now_s(t0);
    report.rss_live_kb = p.stats()?.rss_kb;
    report.rss_per_live_bytes = per(report.rss_live_kb, report.rss_started_kb, live);

    report.list_all_ms = list_ms(&mut admin, Vec::new()).await?;
    report.list_active_ms = list_ms(&mut admin, vec![pb::TxState::Active as i32]).await?;

    // The same port again: the clients above reconnect to it.
    let addr = p.addr().to_string();
    p.kill();
    let t0 = Instant::now();
    let (p, secs) = start(&dir, &options, &addr).await?;
    report.restart_s = secs;
    // Recovery is done once serving; what it claimed is live until it
    // finishes (a call failing while the channel reconnects is asked again).
    while !matches!(live_count(&mut admin).await, Ok(0)) {
        anyhow::ensure!(
            t0.elapsed() < SETTLE_LIMIT,
            "the restarted coordinator did not finish its transactions in {} s",
            SETTLE_LIMIT.as_secs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    report.restart_settled_s = now_s(t0);
    let stats = p.stats()?;
    report.rss_restarted_kb = stats.rss_kb;
    report.peak_rss_restarted_kb = stats.peak_rss_kb;
    drop(p);
    Ok(report)
}

/// `(after − before) KiB ÷ count`, in bytes (0 for no count).
fn per(after_kb: u64, before_kb: u64, count: u64) -> f64 {
    if count == 0 {
        return 0.0;
    }
    (after_kb as f64 - before_kb as f64) * 1024.0 / count as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_item_is_the_growth_in_bytes_over_the_count() {
        assert_eq!(per(2048, 1024, 1024), 1024.0);
        assert_eq!(per(1024, 2048, 1024), -1024.0);
        assert_eq!(per(2048, 1024, 0), 0.0);
    }

    #[test]
    fn a_filled_log_holds_every_record_finished() {
        let dir = tempfile::tempdir().expect("tempdir");
        let options = BenchOptions::default();
        fill(dir.path(), 1_001, 100, &options).expect("fill");
        let log = SledLog::open(dir.path()).expect("open");
        let all = log.scan(None, &[], usize::MAX).expect("scan");
        assert_eq!(all.len(), 1_001);
        assert!(all.iter().all(|r| r.state == TxState::Committed));
        assert!(
            log.scan(None, &[TxState::Active], 10)
                .expect("scan")
                .is_empty()
        );
    }
}

//! The coordinator processes the bench starts, and what it reads from them
//! (log and store counters, CPU and memory, the data dir's size).

use super::*;

/// Forced writes and physical flushes so far, summed over coordinators.
pub(super) async fn log_stats(
    admins: &mut [tandem_coordinator::cli::Admin],
) -> anyhow::Result<(u64, u64)> {
    let mut total = (0, 0);
    for admin in admins {
        let s = admin.get_stats(pb::GetStatsRequest {}).await?.into_inner();
        total.0 += s.forces;
        total.1 += s.flushes;
    }
    Ok(total)
}

/// CPU and context switches summed, peak RSS (the largest) over the
/// coordinators started.
pub(super) fn procs_stats(procs: &[Proc]) -> anyhow::Result<Option<procs::ProcStats>> {
    let mut total: Option<procs::ProcStats> = None;
    for p in procs {
        let s = p.stats()?;
        total = Some(match total {
            None => s,
            Some(t) => procs::ProcStats {
                cpu_s: t.cpu_s + s.cpu_s,
                rss_kb: t.rss_kb.max(s.rss_kb),
                peak_rss_kb: t.peak_rss_kb.max(s.peak_rss_kb),
                ctx_switches: t.ctx_switches + s.ctx_switches,
            },
        });
    }
    Ok(total)
}

/// PostgreSQL's count of committed transactions in the store's database
/// (`pg_stat_database.xact_commit`): what a shared store costs per
/// coordinator transaction.
pub(super) struct StoreCommits {
    pool: tandem_sdk::postgres::Pool,
}

impl StoreCommits {
    pub(super) async fn connect(url: &str) -> anyhow::Result<Self> {
        let pool = tandem_sdk::postgres::pool(url, 1).map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(StoreCommits { pool })
    }

    pub(super) async fn read(&self) -> anyhow::Result<u64> {
        // The statistics reach pg_stat_database when a backend reports
        // them (at most every second): wait that out, then read afresh.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let client = self.pool.get().await.map_err(|e| anyhow::anyhow!("{e}"))?;
        client
            .execute("SELECT pg_stat_clear_snapshot()", &[])
            .await?;
        let row = client
            .query_one(
                "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
                &[],
            )
            .await?;
        Ok(row.get::<_, i64>(0).max(0) as u64)
    }
}
/// Starts `tandem serve` for the bench: the default config, except the
/// retention, and with a recovery measurement retries that wait long (the
/// backlog is built while participants fail, and should not be busy
/// retrying).
pub(super) fn start_coordinator(
    dir: &std::path::Path,
    listen: &str,
    options: &BenchOptions,
    secure: Option<&Secure>,
    otlp: Option<&str>,
    instance: usize,
) -> anyhow::Result<Proc> {
    let data = dir.to_string_lossy().to_string();
    let name = format!("bench-{instance}");
    // On a shared store a one-shot start waits for its decision to be
    // written only when its deadline (60 s by default) comes before
    // retention could reach it (`Inner::defers_start`: deadline + 80 s
    // within the retention): the store's coordinators keep at least 5 min.
    let retention = match options.store {
        Some(_) => options.retention.max(Duration::from_secs(300)),
        None => options.retention,
    };
    let retention = format!("{}ms", retention.as_millis());
    let mut args = vec![
        "serve",
        "--listen",
        listen,
        "--data-dir",
        &data,
        "--retention",
        &retention,
    ];
    if options.recovery.is_some() {
        args.extend([
            "--retry-initial",
            "60s",
            "--retry-max",
            "60s",
            "--retry-max-duration",
            "none",
        ]);
    }
    if let Some(store) = &options.store {
        args.extend(["--store", store, "--instance-name", &name]);
    }
    if options.metrics {
        args.extend(["--admin-listen", "127.0.0.1:0"]);
    }
    let ratio = options.otlp_sample_ratio.to_string();
    if let Some(endpoint) = otlp {
        args.extend(["--otlp-endpoint", endpoint, "--service-name", &name]);
        args.extend(["--otlp-sample-ratio", &ratio]);
    }
    let secure_args = secure.map(Secure::serve_args).unwrap_or_default();
    args.extend(secure_args.iter().map(String::as_str));
    Proc::spawn(&args)
}

/// Bytes of the files under `dir`.
pub(super) fn dir_size(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

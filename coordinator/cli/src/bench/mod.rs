//! `tandem bench`: throughput, latency, durability cost and memory of the
//! coordinator, against the machine's own floor measured in the same run.
//!
//! It starts a coordinator (`tandem serve` on a temp dir) and N no-op
//! participant processes (`tandem bench-participant`) on loopback, or uses
//! the addresses given. Then:
//!
//! 1. **floor**: a plain unary echo RPC against the same participant
//!    processes at the same concurrency (the throughput floor), and the
//!    latency floor's parts one call at a time: a health check of the
//!    coordinator (client RTT), an echo (participant RTT), and an append +
//!    `fdatasync` in the log's data dir ([`floor`]);
//! 2. **run**: global transactions for the given time, each latency taken
//!    from the client's call to the acknowledged decision;
//! 3. **verify**: once phase 2 has drained, every transaction counted must
//!    show up as one commit per branch at the participants;
//! 4. optionally **recovery**: participants fail phase 2 while K
//!    transactions pile up, the coordinator is killed and restarted, and
//!    the time to finish all K is measured.
//!
//! With `--retained M` or `--live N` it measures memory and start-up at
//! scale instead ([`scale`]).
//!
//! `efficiency = tx/s × RPCs per transaction ÷ echo req/s`: 1.0 would mean
//! the coordinator costs no more than the RPCs it must make;
//! `p50_floor_ratio = p50 ÷ (client RTT + 2 × participant RTT + 1 sync)`
//! (one-shot), 1.0 that it adds nothing to the latency of those calls and
//! the forced decision.

mod coordinators;
pub mod floor;
mod observe;
mod participant;
mod procs;
mod report;
pub mod scale;
mod workload;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tandem_proto::bench::v1 as bench_pb;
use tandem_proto::bench::v1::bench_participant_client::BenchParticipantClient;
use tandem_proto::v1 as pb;
use tandem_proto::v1::admin_client::AdminClient;
use tandem_sdk::security::{BearerToken, ClientTls};
use tandem_sdk::{Branch, ClientOptions, Mode, TransactionClient};
use tonic::transport::Channel;

pub use observe::ScrapeStats;
pub use participant::{
    RESOURCE_2PC, RESOURCE_CHECK, RESOURCE_MSG, RESOURCE_TCC, serve as serve_participant,
};
pub use report::{Floor, Recovery, Report, RunStats};

use coordinators::*;
use procs::Proc;
use workload::*;

/// What to run.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// 2PC or TCC.
    pub mode: Mode,
    /// Branches per transaction.
    pub branches: usize,
    /// Transactions (and echo calls) in flight at once.
    pub concurrency: usize,
    /// How long to run transactions.
    pub duration: Duration,
    /// How long to run the echo floor.
    pub floor_duration: Duration,
    /// Payload bytes per branch.
    pub payload: usize,
    /// Begin / Enlist / Commit instead of one-shot Submit.
    pub interactive: bool,
    /// Participant processes to start (when none are given).
    pub participants: usize,
    /// Use this coordinator instead of starting one.
    pub coordinator: Option<String>,
    /// How to reach `coordinator` (TLS, token): the credential needs the
    /// `client` role (transactions) and `admin` (its counters).
    pub coordinator_access: ClientOptions,
    /// Use these participants instead of starting them.
    pub participant_urls: Vec<String>,
    /// After the run, measure recovery of this many in-flight transactions
    /// (needs a coordinator the bench started).
    pub recovery: Option<usize>,
    /// Retention of the coordinator the bench starts: finished records
    /// older than this are purged, so long runs show a bounded data dir
    /// (at least [`tandem_coordinator::config::MIN_RETENTION`]).
    pub retention: Duration,
    /// Mutual TLS and tokens on every hop (development certificates made
    /// in the bench's temp dir; needs processes the bench starts).
    pub secure: bool,
    /// Start the coordinators on this shared PostgreSQL store instead of
    /// a sled log in a temp dir.
    pub store: Option<String>,
    /// Coordinator instances to start on the store (1 without one); the
    /// workers are spread over them.
    pub instances: usize,
    /// Serve `/metrics` on an admin listener and scrape it every second.
    pub metrics: bool,
    /// A `traceparent` on every transaction.
    pub trace: bool,
    /// The coordinator's spans exported over OTLP to a collector the
    /// bench runs.
    pub otlp: bool,
    /// The coordinator's `--otlp-sample-ratio` with `otlp`.
    pub otlp_sample_ratio: f64,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            mode: Mode::TwoPhase,
            branches: 2,
            concurrency: 64,
            duration: Duration::from_secs(10),
            floor_duration: Duration::from_secs(3),
            payload: 16,
            interactive: false,
            participants: 2,
            coordinator: None,
            coordinator_access: ClientOptions::default(),
            participant_urls: Vec::new(),
            recovery: None,
            retention: tandem_coordinator::config::MIN_RETENTION,
            secure: false,
            store: None,
            instances: 1,
            metrics: false,
            trace: false,
            otlp: false,
            otlp_sample_ratio: 1.0,
        }
    }
}

impl BenchOptions {
    /// RPCs one transaction costs: the client's calls and the
    /// coordinator's two calls per branch.
    pub fn rpcs_per_transaction(&self) -> usize {
        if self.mode == Mode::Msg {
            return 2 + self.branches; // prepare, submit; a delivery per branch
        }
        let client = if self.interactive {
            2 + self.branches // begin, enlist × branches, commit
        } else {
            1
        };
        client + 2 * self.branches
    }
}

fn channel(url: &str, secure: Option<&Secure>, party: &str) -> anyhow::Result<Channel> {
    let tls = secure.map(|s| s.client_tls(party));
    Ok(tandem_sdk::security::endpoint(url, tls.as_ref())
        .map_err(anyhow::Error::msg)?
        .timeout(Duration::from_secs(30))
        .connect_lazy())
}

/// Development certificates and tokens of a `--secure` bench.
pub(crate) struct Secure {
    dir: std::path::PathBuf,
}

impl Secure {
    fn file(&self, name: &str) -> String {
        self.dir.join(name).to_string_lossy().into_owned()
    }

    fn client_tls(&self, party: &str) -> ClientTls {
        ClientTls {
            ca: Some(self.dir.join("ca.pem")),
            cert: Some(self.dir.join(format!("{party}.pem"))),
            key: Some(self.dir.join(format!("{party}-key.pem"))),
            domain: None,
        }
    }

    fn token(&self, party: &str) -> anyhow::Result<BearerToken> {
        BearerToken::from_file(&self.dir.join(format!("{party}.token"))).map_err(anyhow::Error::msg)
    }

    /// `tandem serve` flags: mutual TLS required, tokens and roles, TLS to
    /// participants with the coordinator's certificate and token, and only
    /// loopback participants allowed.
    fn serve_args(&self) -> Vec<String> {
        let f = |n: &str| self.file(n);
        [
            ("--tls-cert", f("coordinator.pem")),
            ("--tls-key", f("coordinator-key.pem")),
            ("--tls-client-ca", f("ca.pem")),
            ("--auth-file", f("coordinator-access.txt")),
            ("--participant-ca", f("ca.pem")),
            ("--participant-cert", f("coordinator.pem")),
            ("--participant-key", f("coordinator-key.pem")),
            ("--participant-token-file", f("coordinator.token")),
            ("--allow-participant", "https://127.0.0.1:*".to_string()),
        ]
        .into_iter()
        .flat_map(|(k, v)| [k.to_string(), v])
        .chain(["--require-client-cert".into(), "--require-tls".into()])
        .collect()
    }
}

/// Runs the bench and returns its report.
///
/// # Errors
///
/// A process could not be started, or a service could not be reached.
pub async fn run(options: BenchOptions) -> anyhow::Result<Report> {
    anyhow::ensure!(options.branches >= 1, "--branches must be at least 1");
    anyhow::ensure!(options.concurrency >= 1, "--concurrency must be at least 1");
    let data = tempfile::Builder::new().prefix("tandem-bench-").tempdir()?;
    let certs = tempfile::Builder::new()
        .prefix("tandem-bench-certs-")
        .tempdir()?;
    let secure = if options.secure {
        anyhow::ensure!(
            options.coordinator.is_none() && options.participant_urls.is_empty(),
            "--secure needs a coordinator and participants the bench starts"
        );
        crate::certs::write_dev(certs.path())?;
        Some(Secure {
            dir: certs.path().to_path_buf(),
        })
    } else {
        None
    };
    let mut procs: Vec<Proc> = Vec::new();
    let participant_urls = if options.participant_urls.is_empty() {
        let mut urls = Vec::new();
        for _ in 0..options.participants.max(1) {
            let mut args = vec!["bench-participant", "--listen", "127.0.0.1:0"];
            let dir = certs.path().to_string_lossy().into_owned();
            if secure.is_some() {
                args.extend(["--secure-dir", &dir]);
            }
            let p = Proc::spawn(&args)?;
            urls.push(p.url(secure.is_some()));
            procs.push(p);
        }
        urls
    } else {
        options.participant_urls.clone()
    };
    anyhow::ensure!(options.instances >= 1, "--instances must be at least 1");
    anyhow::ensure!(
        !(options.metrics || options.otlp) || options.coordinator.is_none(),
        "--metrics and --otlp need a coordinator the bench starts"
    );
    anyhow::ensure!(
        !(options.metrics && options.secure),
        "--metrics is measured without --secure (the admin listener would need its own TLS)"
    );
    let collector = match options.otlp {
        true => Some(observe::Collector::start().await?),
        false => None,
    };
    let otlp = collector.as_ref().map(|c| c.endpoint.as_str());
    anyhow::ensure!(
        options.instances == 1 || options.store.is_some(),
        "several --instances need a shared --store"
    );
    anyhow::ensure!(
        options.store.is_none() || (options.coordinator.is_none() && options.recovery.is_none()),
        "--store starts the coordinators: not with --coordinator or --recovery"
    );
    let mut coordinator_procs = Vec::new();
    let coordinator_urls = match &options.coordinator {
        Some(url) => vec![url.clone()],
        None => {
            for i in 0..options.instances {
                let dir = data.path().join(format!("instance-{i}"));
                std::fs::create_dir_all(&dir)?;
                let p = start_coordinator(&dir, "127.0.0.1:0", &options, secure.as_ref(), otlp, i)?;
                coordinator_procs.push(p);
            }
            coordinator_procs
                .iter()
                .map(|p| p.url(secure.is_some()))
                .collect()
        }
    };
    let store_commits = match &options.store {
        Some(url) => Some(StoreCommits::connect(url).await?),
        None => None,
    };

    let benches: Vec<BenchParticipantClient<Channel>> = participant_urls
        .iter()
        .map(|u| channel(u, secure.as_ref(), "coordinator").map(BenchParticipantClient::new))
        .collect::<anyhow::Result<_>>()?;
    let echo_floor = echo_floor(&benches, options.concurrency, options.floor_duration).await?;

    // A coordinator the bench was given is reached with the TLS and token
    // it was given for it (--ca, --cert, --key, --token-file); the ones it
    // starts, with its own development files under --secure.
    let given = &options.coordinator_access;
    let connect = |url: &str, party: &str| -> anyhow::Result<(Channel, BearerToken)> {
        if options.coordinator.is_some() {
            let channel = tandem_sdk::security::endpoint(url, given.tls.as_ref())
                .map_err(anyhow::Error::msg)?
                .timeout(Duration::from_secs(30))
                .connect_lazy();
            return Ok((channel, given.token.clone()));
        }
        let token = match &secure {
            Some(s) => s.token(party)?,
            None => BearerToken::none(),
        };
        Ok((channel(url, secure.as_ref(), party)?, token))
    };
    let clients: Vec<TransactionClient> = coordinator_urls
        .iter()
        .map(|url| {
            let (channel, token) = connect(url, "client")?;
            Ok(TransactionClient::from_channel_with(channel, token))
        })
        .collect::<anyhow::Result<_>>()?;
    let mut admins: Vec<tandem_coordinator::cli::Admin> = coordinator_urls
        .iter()
        .map(|url| {
            let (channel, token) = connect(url, "admin")?;
            Ok(AdminClient::with_interceptor(channel, token))
        })
        .collect::<anyhow::Result<_>>()?;
    // The sync is timed while the echoes run, as the log syncs while the
    // coordinator's runtime is busy: on a VM an otherwise idle CPU can take
    // the I/O completion only at its next timer tick (4 ms on the
    // development VM, against ~0.1–0.4 ms with the CPU awake).
    let fsync = (!coordinator_procs.is_empty() && options.store.is_none()).then(|| {
        // The log's file system: the (first) coordinator's data dir.
        let dir = data.path().join("instance-0");
        tokio::task::spawn_blocking(move || floor::fsync_us(&dir))
    });
    let participant_rtt_us = floor::participant_rtt(&benches).await?;
    let fsync_us = match fsync {
        Some(task) => Some(task.await??),
        None => None,
    };
    let floor_parts = floor::FloorParts {
        client_rtt_us: floor::client_rtt(connect(&coordinator_urls[0], "client")?.0).await?,
        participant_rtt_us,
        fsync_us,
    };
    let before_stats = log_stats(&mut admins).await?;
    let before_store = match &store_commits {
        Some(s) => Some(s.read().await?),
        None => None,
    };
    let before_proc = procs_stats(&coordinator_procs)?;
    let before_counts = counts(&benches).await?;
    let scrapers: Vec<_> = coordinator_procs
        .iter()
        .filter_map(|p| p.admin())
        .map(|admin| observe::Scraper::start(admin.to_string(), None))
        .collect();
    let spans_before = collector.as_ref().map_or(0, observe::Collector::spans);
    let run = transactions(
        &clients,
        &participant_urls,
        &options,
        coordinator_procs.first(),
    )
    .await;
    let after_proc = procs_stats(&coordinator_procs)?;
    let mut scrapes: Option<ScrapeStats> = None;
    for s in scrapers {
        let stats = s.finish().await;
        let all = scrapes.get_or_insert_with(ScrapeStats::default);
        all.scrapes += stats.scrapes;
        all.failed += stats.failed;
        all.last_bytes = stats.last_bytes;
        all.slowest_ms = all.slowest_ms.max(stats.slowest_ms);
    }
    for admin in &mut admins {
        drain(admin).await?;
    }
    let after_stats = log_stats(&mut admins).await?;
    let after_store = match &store_commits {
        Some(s) => Some(s.read().await?),
        None => None,
    };
    let after_counts = counts(&benches).await?;
    let commits = after_counts.commits - before_counts.commits;

    let mut report = Report::new(&options, echo_floor, floor_parts, run);
    report.forces = after_stats.0 - before_stats.0;
    report.flushes = after_stats.1 - before_stats.1;
    if let (Some(b), Some(a)) = (before_store, after_store) {
        report.store_commits_per_tx =
            Some(a.saturating_sub(b) as f64 / report.run.committed.max(1) as f64);
    }
    report.participant_commits = commits;
    report.scrapes = scrapes;
    if let Some(c) = &collector {
        // Let the batch exporter send what the run made (it exports every
        // few seconds).
        tokio::time::sleep(Duration::from_secs(6)).await;
        report.spans_exported = Some(c.spans() - spans_before);
    }
    report.verified = commits == report.run.committed * options.branches as u64;
    report.finish();
    report.data_dir_mb = (!coordinator_procs.is_empty() && options.store.is_none())
        .then(|| dir_size(data.path()) as f64 / (1024.0 * 1024.0));
    if let (Some(b), Some(a)) = (before_proc, after_proc) {
        report.set_coordinator_cost(
            a.cpu_s - b.cpu_s,
            a.ctx_switches.saturating_sub(b.ctx_switches),
        );
        report.coordinator_peak_rss_kb = Some(a.peak_rss_kb);
    }
    let mut coordinator_proc = if coordinator_procs.len() == 1 {
        coordinator_procs.pop()
    } else {
        None
    };
    if let (Some(_), Some(p)) = (options.recovery, coordinator_proc.take()) {
        let dir = data.path().join("instance-0");
        let restart =
            |addr: &str| start_coordinator(&dir, addr, &options, secure.as_ref(), otlp, 0);
        let (recovery, restarted) = recover(
            p,
            restart,
            &clients[0],
            &benches,
            &participant_urls,
            &options,
        )
        .await?;
        report.recovery = Some(recovery);
        coordinator_proc = Some(restarted);
    }
    drop(coordinator_proc);
    drop(coordinator_procs);
    drop(procs);
    Ok(report)
}

//! What `tandem bench` prints: a table for people, JSON for machines.

use std::fmt;
use std::time::Duration;

use serde::Serialize;

use super::BenchOptions;
use super::floor::{self, FloorParts};
use tandem_sdk::Mode;

/// The echo floor.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Floor {
    /// Echo calls per second at the bench's concurrency.
    pub requests_per_s: f64,
}

/// The transaction run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RunStats {
    /// Transactions committed (complete or finishing in the background).
    pub committed: u64,
    /// Of those, returned before every branch acknowledged.
    pub incomplete: u64,
    /// Calls that failed (aborted, unavailable…); not counted.
    pub errors: u64,
    /// The first error's text.
    pub first_error: Option<String>,
    /// Wall time of the run.
    #[serde(serialize_with = "secs")]
    pub elapsed: Duration,
    /// Latency percentiles of complete commits, microseconds.
    pub p50_us: u32,
    /// 99th percentile.
    pub p99_us: u32,
    /// 99.9th percentile.
    pub p999_us: u32,
    /// Coordinator RSS after the first minute, KiB (runs of a minute or more).
    pub rss_after_first_minute_kb: Option<u64>,
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

impl RunStats {
    pub(super) fn set_latencies(&mut self, mut micros: Vec<u32>) {
        micros.sort_unstable();
        let at = |q: f64| {
            if micros.is_empty() {
                return 0;
            }
            micros[((micros.len() as f64 * q) as usize).min(micros.len() - 1)]
        };
        self.p50_us = at(0.50);
        self.p99_us = at(0.99);
        self.p999_us = at(0.999);
    }
}

/// The recovery measurement.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Recovery {
    /// In-flight transactions left at the crash.
    pub transactions: u64,
    /// Seconds spent piling them up.
    pub pile_up_s: f64,
    /// Seconds from the restart until all were finished.
    pub seconds: f64,
    /// Transactions finished per second.
    pub per_s: f64,
}

/// Everything one bench run measured.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// `2pc` or `tcc`.
    pub mode: &'static str,
    /// Branches per transaction.
    pub branches: usize,
    /// Concurrency.
    pub concurrency: usize,
    /// One-shot or interactive.
    pub interactive: bool,
    /// Payload bytes per branch.
    pub payload: usize,
    /// RPCs one transaction costs.
    pub rpcs_per_transaction: usize,
    /// The run.
    pub run: RunStats,
    /// Committed transactions per second.
    pub tx_per_s: f64,
    /// The echo floor.
    pub floor: Floor,
    /// tx/s × RPCs per transaction ÷ echo req/s.
    pub efficiency: f64,
    /// The latency floor's parts, measured before the run.
    pub floor_parts: FloorParts,
    /// The latency floor of one transaction, µs (`bench::floor`: one-shot
    /// = client RTT + 2 × participant RTT + 1 sync).
    pub p50_floor_us: f64,
    /// p50 ÷ the floor: 1.0 would mean the coordinator adds nothing to
    /// the calls and the sync it must wait for.
    pub p50_floor_ratio: f64,
    /// Forced log writes during the run.
    pub forces: u64,
    /// Physical flushes (fdatasync) serving them.
    pub flushes: u64,
    /// Forced writes per committed transaction.
    pub forces_per_tx: f64,
    /// fdatasyncs per committed transaction.
    pub flushes_per_tx: f64,
    /// Forced writes per fdatasync (group-commit batch).
    pub batch: f64,
    /// Coordinator CPU seconds during the run (when the bench started it).
    pub coordinator_cpu_s: Option<f64>,
    /// Coordinator CPU milliseconds per committed transaction.
    pub coordinator_cpu_ms_per_tx: Option<f64>,
    /// Voluntary + involuntary context switches of the coordinator
    /// process(es) during the run (threads alive at the end).
    pub ctx_switches: Option<u64>,
    /// Context switches per committed transaction.
    pub ctx_switches_per_tx: Option<f64>,
    /// Coordinator peak RSS, KiB (when the bench started it).
    pub coordinator_peak_rss_kb: Option<u64>,
    /// Size of the coordinator's data dir at the end, MiB (when the bench
    /// started it).
    pub data_dir_mb: Option<f64>,
    /// Commits the participants counted during the run.
    pub participant_commits: u64,
    /// Every counted transaction shows one commit per branch.
    pub verified: bool,
    /// The recovery measurement, if asked for.
    pub recovery: Option<Recovery>,
    /// Coordinator instances (on one shared store when more than one).
    pub instances: usize,
    /// Whether the store was PostgreSQL (else the coordinator's sled log).
    pub store: &'static str,
    /// PostgreSQL transactions (`pg_stat_database.xact_commit`, reads
    /// included) per coordinator transaction, on a PostgreSQL store.
    pub store_commits_per_tx: Option<f64>,
    /// `/metrics` scrapes during the run (`--metrics`).
    pub scrapes: Option<super::ScrapeStats>,
    /// Spans the bench's OTLP collector received for the run (`--otlp`).
    pub spans_exported: Option<u64>,
    /// Every transaction carried a `traceparent` (`--trace`).
    pub traceparent: bool,
}

impl Report {
    pub(super) fn new(
        options: &BenchOptions,
        floor: Floor,
        floor_parts: FloorParts,
        run: RunStats,
    ) -> Report {
        let tx_per_s = run.committed as f64 / run.elapsed.as_secs_f64().max(1e-9);
        let rpcs = options.rpcs_per_transaction();
        let mode = match options.mode {
            Mode::TwoPhase => "2pc",
            Mode::Tcc => "tcc",
            Mode::Saga => "saga",
            Mode::Msg => "msg",
        };
        let p50_floor_us = floor_parts.floor_us(options.interactive, options.branches, mode);
        Report {
            mode,
            branches: options.branches,
            concurrency: options.concurrency,
            interactive: options.interactive,
            payload: options.payload,
            rpcs_per_transaction: rpcs,
            tx_per_s,
            efficiency: tx_per_s * rpcs as f64 / floor.requests_per_s.max(1e-9),
            floor,
            floor_parts,
            p50_floor_us,
            p50_floor_ratio: floor::ratio(run.p50_us, p50_floor_us),
            run,
            forces: 0,
            flushes: 0,
            forces_per_tx: 0.0,
            flushes_per_tx: 0.0,
            batch: 0.0,
            coordinator_cpu_s: None,
            coordinator_cpu_ms_per_tx: None,
            ctx_switches: None,
            ctx_switches_per_tx: None,
            coordinator_peak_rss_kb: None,
            data_dir_mb: None,
            participant_commits: 0,
            verified: false,
            recovery: None,
            instances: options.instances,
            store: if options.store.is_some() {
                "postgres"
            } else {
                "sled"
            },
            store_commits_per_tx: None,
            scrapes: None,
            spans_exported: None,
            traceparent: options.trace,
        }
    }

    pub(super) fn finish(&mut self) {
        let n = self.run.committed.max(1) as f64;
        self.forces_per_tx = self.forces as f64 / n;
        self.flushes_per_tx = self.flushes as f64 / n;
        self.batch = self.forces as f64 / self.flushes.max(1) as f64;
    }

    /// The coordinators' CPU seconds and context switches over the run.
    pub(super) fn set_coordinator_cost(&mut self, cpu_s: f64, ctx_switches: u64) {
        let n = self.run.committed.max(1) as f64;
        self.coordinator_cpu_s = Some(cpu_s);
        self.coordinator_cpu_ms_per_tx = Some(cpu_s * 1000.0 / n);
        self.ctx_switches = Some(ctx_switches);
        self.ctx_switches_per_tx = Some(ctx_switches as f64 / n);
    }

    /// JSON, one document.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = &self.run;
        let shape = if self.interactive {
            "interactive"
        } else {
            "one-shot"
        };
        writeln!(
            f,
            "tandem bench: {} {}, {} branches, concurrency {}, payload {} B, {:.1} s, \
             {} coordinator(s) on {}",
            self.mode,
            shape,
            self.branches,
            self.concurrency,
            self.payload,
            r.elapsed.as_secs_f64(),
            self.instances,
            self.store
        )?;
        writeln!(
            f,
            "  throughput   {:.0} tx/s ({} committed, {} finishing in background, {} errors)",
            self.tx_per_s, r.committed, r.incomplete, r.errors
        )?;
        if let Some(e) = &r.first_error {
            writeln!(f, "               first error: {e}")?;
        }
        writeln!(
            f,
            "  latency      p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms",
            r.p50_us as f64 / 1000.0,
            r.p99_us as f64 / 1000.0,
            r.p999_us as f64 / 1000.0
        )?;
        let flush = if self.store == "postgres" {
            "PostgreSQL write commits"
        } else {
            "fdatasyncs"
        };
        writeln!(
            f,
            "  durability   {:.3} forced writes/tx, {:.3} {flush}/tx, {:.1} writes per group commit",
            self.forces_per_tx, self.flushes_per_tx, self.batch
        )?;
        if let Some(c) = self.store_commits_per_tx {
            writeln!(
                f,
                "  store        {c:.3} PostgreSQL transactions/tx in all (the writes, the \
                 idempotency read of each start, lease renewals, sweeps)"
            )?;
        }
        match (
            self.coordinator_cpu_ms_per_tx,
            self.ctx_switches_per_tx,
            self.coordinator_peak_rss_kb,
        ) {
            (Some(cpu), Some(switches), Some(rss)) => writeln!(
                f,
                "  coordinator  {cpu:.3} CPU ms/tx, {switches:.1} context switches/tx, \
                 peak RSS {:.1} MiB{}, data dir {:.1} MiB",
                rss as f64 / 1024.0,
                r.rss_after_first_minute_kb
                    .map(|k| format!(" (RSS after 1 min {:.1} MiB)", k as f64 / 1024.0))
                    .unwrap_or_default(),
                self.data_dir_mb.unwrap_or(0.0)
            )?,
            _ => writeln!(f, "  coordinator  (not started by the bench: no CPU / RSS)")?,
        }
        let p = &self.floor_parts;
        let sync = match (p.fsync_us, self.store) {
            (Some(us), _) if matches!(self.mode, "saga" | "msg") => {
                format!(" + 2 × fdatasync {:.3}", us / 1000.0)
            }
            (Some(us), _) => format!(" + fdatasync {:.3}", us / 1000.0),
            (None, "postgres") => " (the store's commit left out)".to_string(),
            (None, _) => " (the sync left out: the bench did not start the coordinator)".into(),
        };
        let (calls, rounds, _) = floor::sequence(self.interactive, self.branches, self.mode);
        writeln!(
            f,
            "  p50 floor    {:.3} ms = {calls} × client RTT {:.3} + {rounds} × participant RTT \
             {:.3}{sync}; p50 is {:.2}× the floor",
            self.p50_floor_us / 1000.0,
            p.client_rtt_us / 1000.0,
            p.participant_rtt_us / 1000.0,
            self.p50_floor_ratio
        )?;
        writeln!(
            f,
            "  echo floor   {:.0} req/s at concurrency {} on the same participants",
            self.floor.requests_per_s, self.concurrency
        )?;
        writeln!(
            f,
            "  efficiency   {:.2} (= {:.0} tx/s × {} RPCs ÷ {:.0} echo/s)",
            self.efficiency, self.tx_per_s, self.rpcs_per_transaction, self.floor.requests_per_s
        )?;
        if let Some(s) = &self.scrapes {
            writeln!(
                f,
                "  metrics      /metrics scraped {} times (1/s, {} failed), {} B each, slowest {:.1} ms",
                s.scrapes, s.failed, s.last_bytes, s.slowest_ms
            )?;
        }
        if self.traceparent {
            writeln!(
                f,
                "  trace        a traceparent on every transaction, carried to every participant call"
            )?;
        }
        if let Some(spans) = self.spans_exported {
            writeln!(
                f,
                "  tracing      {spans} spans exported over OTLP ({:.1} per committed tx)",
                spans as f64 / r.committed.max(1) as f64
            )?;
        }
        if let Some(rec) = &self.recovery {
            writeln!(
                f,
                "  recovery     {} in-flight transactions finished in {:.2} s after restart: {:.0} tx/s",
                rec.transactions, rec.seconds, rec.per_s
            )?;
        }
        write!(
            f,
            "  verified     {} ({} participant commits for {} transactions × {} branches)",
            if self.verified { "yes" } else { "NO" },
            self.participant_commits,
            r.committed,
            self.branches
        )
    }
}

//! Where `tandem serve` keeps its log (`--store`, sled otherwise) and
//! `tandem cluster status`, the view of coordinators sharing a store.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use tandem_coordinator::cli::Output;
use tandem_coordinator::log::{PgLog, PgOptions, SledLog, TxnLog};

/// The store options of `tandem serve`.
#[derive(Args, Clone, Debug)]
pub struct StoreArgs {
    /// Keep the transaction log in PostgreSQL instead of --data-dir
    /// (`postgres://user@host/db?sslmode=verify-full&sslrootcert=ca.pem`;
    /// several hosts with `target_session_attrs=read-write` follow a
    /// promoted standby). Several coordinators may share one store.
    #[arg(long, env = "TANDEM_STORE")]
    pub store: Option<String>,
    /// This coordinator's name in a shared store: unique per instance; a
    /// restart under the same name takes its transactions over at once.
    /// Default: the host name.
    #[arg(long, env = "TANDEM_INSTANCE_NAME")]
    pub instance_name: Option<String>,
    /// The address clients reach this coordinator at (a URL such as
    /// `https://coord-2.internal:7070`): where other coordinators redirect
    /// requests for the transactions this one runs, and what `tandem
    /// cluster status` shows. Default: the listen address (`http://` or
    /// `https://` with `--tls-cert`), right only when it is reachable as is.
    #[arg(long, env = "TANDEM_ADVERTISE")]
    pub advertise: Option<String>,
    /// In a shared store, how long a coordinator's transactions stay its
    /// own without a renewal (renewed every third of it); once it expires,
    /// another coordinator takes them over.
    #[arg(long, env = "TANDEM_LEASE", default_value = "10s", value_parser = tandem_coordinator::cli::parse_duration)]
    pub lease: Duration,
}

impl StoreArgs {
    /// How often to sweep for expired leases: a quarter of the lease.
    pub fn takeover_every(&self) -> Duration {
        (self.lease / 4).clamp(Duration::from_millis(100), Duration::from_secs(5))
    }

    /// Opens the log these arguments name: PostgreSQL, or sled in `data_dir`.
    ///
    /// # Errors
    ///
    /// The log cannot be opened (or is damaged), or the options conflict.
    pub fn open(
        &self,
        data_dir: &std::path::Path,
        listen: SocketAddr,
        tls: bool,
        accept_damage: bool,
    ) -> anyhow::Result<Arc<dyn TxnLog>> {
        let Some(url) = &self.store else {
            let (log, report) = SledLog::open_with(data_dir, accept_damage)?;
            if report.is_damaged() {
                tracing::error!(
                    problems = %report.problems().join("; "),
                    "serving a damaged log (--accept-log-damage)"
                );
            }
            return Ok(Arc::new(log));
        };
        if accept_damage {
            anyhow::bail!("--accept-log-damage is for a sled log; it means nothing with --store");
        }
        let printable = |v: &str, max: usize| {
            !v.is_empty() && v.len() <= max && !v.chars().any(char::is_control)
        };
        if let Some(n) = &self.instance_name
            && !printable(n, 64)
        {
            anyhow::bail!("--instance-name must be 1 to 64 printable characters");
        }
        if let Some(a) = &self.advertise
            && !printable(a, 256)
        {
            anyhow::bail!("--advertise must be 1 to 256 printable characters");
        }
        if let Some(a) = &self.advertise
            && !(a.starts_with("http://") || a.starts_with("https://"))
        {
            anyhow::bail!(
                "--advertise {a:?}: give the URL clients reach this coordinator at, \
                 such as https://coord-1.internal:7070"
            );
        }
        if self.lease < Duration::from_millis(300) {
            anyhow::bail!("--lease must be at least 300ms (it is renewed every third of it)");
        }
        let name = self.instance_name.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .ok()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "tandem".into())
        });
        let mut options = PgOptions::new(url.clone(), name);
        let scheme = if tls { "https" } else { "http" };
        options.address = self
            .advertise
            .clone()
            .unwrap_or_else(|| format!("{scheme}://{listen}"));
        options.lease = self.lease;
        let log = tokio::task::block_in_place(|| PgLog::open(options))?;
        Ok(Arc::new(log))
    }
}

/// `tandem cluster status`: every coordinator registered in the store,
/// its heartbeat, what it owns, and the expired leases waiting.
///
/// # Errors
///
/// The store cannot be read.
pub async fn cluster_status(url: &str, output: Output) -> anyhow::Result<()> {
    let status = tandem_coordinator::log::cluster_status(url).await?;
    match output {
        Output::Json => {
            let doc = serde_json::json!({
                "instances": status.instances.iter().map(|i| serde_json::json!({
                    "name": i.name,
                    "incarnation": i.incarnation.to_string(),
                    "address": i.address,
                    "heartbeat_age_ms": i.heartbeat_age_ms,
                    "lease_expired": i.lease_expired,
                    "owned_unfinished": i.owned,
                })).collect::<Vec<_>>(),
                "expired_leases": status.expired,
            });
            println!("{doc:#}");
        }
        Output::Table => {
            println!(
                "{:<16} {:<36} {:<22} {:>10} {:<8} {:>6}",
                "NAME", "INCARNATION", "ADDRESS", "HEARTBEAT", "LEASE", "OWNED"
            );
            for i in &status.instances {
                // An expired lease: the instance stopped renewing (killed,
                // paused, cut off); its transactions are taken over.
                let lease = if i.lease_expired { "EXPIRED" } else { "live" };
                println!(
                    "{:<16} {:<36} {:<22} {:>9.1}s {:<8} {:>6}",
                    i.name,
                    i.incarnation,
                    i.address,
                    i.heartbeat_age_ms as f64 / 1000.0,
                    lease,
                    i.owned
                );
            }
            println!(
                "expired leases waiting to be taken over: {}",
                status.expired
            );
        }
    }
    Ok(())
}

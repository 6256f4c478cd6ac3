//! `tandem serve`: its flags and running a coordinator with them (the
//! binary only parses the command line, with the `--config` file, and
//! calls [`serve`]).

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use tracing::info;

use tandem_coordinator::alerts::AlertSettings;
use tandem_coordinator::cli::parse_duration;
use tandem_coordinator::config::{CoordinatorConfig, RetryPolicy};
use tandem_coordinator::runtime::Environment;
use tandem_coordinator::security::{ParticipantAccess, ServeSecurityArgs, ServerSecurity};
use tandem_coordinator::{Coordinator, server};

/// The flags of `tandem serve`. Every one can also be given in the
/// `--config` file under its long name (see [`crate::config_file`]).
#[derive(Args)]
pub struct ServeArgs {
    /// Read flags from this TOML file (keys are the flags' long names;
    /// see tandem.example.toml). A flag on the command line or in the
    /// environment wins over the file.
    #[arg(long, env = "TANDEM_CONFIG")]
    pub config: Option<PathBuf>,
    /// Print the configuration in force (each value with where it came
    /// from; secrets redacted) and exit without serving.
    #[arg(long)]
    pub print_config: bool,
    /// Address the gRPC services listen on.
    #[arg(long, env = "TANDEM_LISTEN", default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// Directory of the transaction log (created if missing). Only one
    /// coordinator may use a directory at a time.
    #[arg(long, env = "TANDEM_DATA_DIR", default_value = "./tandem-data")]
    pub data_dir: PathBuf,
    /// Deadline of a transaction whose client sets none (e.g. 30s, 2m);
    /// undecided past it, the transaction aborts.
    #[arg(long, env = "TANDEM_DEFAULT_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub default_timeout: Duration,
    /// Longest deadline a client may ask for.
    #[arg(long, env = "TANDEM_MAX_TIMEOUT", default_value = "24h", value_parser = parse_duration)]
    pub max_timeout: Duration,
    /// Deadline of each call to a participant (prepare, commit, ...).
    #[arg(long, env = "TANDEM_CALL_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub call_timeout: Duration,
    /// Largest branch payload in bytes; larger requests are refused.
    #[arg(long, env = "TANDEM_MAX_PAYLOAD_BYTES", default_value_t = 1024 * 1024)]
    pub max_payload_bytes: usize,
    /// Most branches in one transaction.
    #[arg(long, env = "TANDEM_MAX_BRANCHES", default_value_t = 64)]
    pub max_branches: usize,
    /// First delay before retrying a failed commit / rollback call; doubles
    /// on each failure, with jitter.
    #[arg(long, env = "TANDEM_RETRY_INITIAL", default_value = "100ms", value_parser = parse_duration)]
    pub retry_initial: Duration,
    /// Longest delay between two retries of a commit / rollback call.
    #[arg(long, env = "TANDEM_RETRY_MAX", default_value = "30s", value_parser = parse_duration)]
    pub retry_max: Duration,
    /// Give up on a branch after this many failed commit / rollback calls in
    /// a row; the transaction then becomes STUCK until `tandem tx retry`.
    /// Unset: no limit.
    #[arg(long, env = "TANDEM_RETRY_MAX_ATTEMPTS")]
    pub retry_max_attempts: Option<u32>,
    /// Give up on a branch retried for this long since the decision (or the
    /// last restart or operator retry); the transaction then becomes STUCK.
    /// `none` for no limit.
    #[arg(long, env = "TANDEM_RETRY_MAX_DURATION", default_value = "1h", value_parser = parse_optional_duration)]
    pub retry_max_duration: OptionalDuration,
    /// Finished transactions are removed from the log once unchanged for
    /// this long (`tandem tx show` finds them until then). STUCK and
    /// unfinished ones are never removed. At least 2m.
    #[arg(long, env = "TANDEM_RETENTION", default_value = "24h", value_parser = parse_duration)]
    pub retention: Duration,
    /// A committed transaction one of whose participants never acknowledged
    /// (a branch settled by hand with `tandem tx resolve`) keeps its
    /// decision this long after retention removed its record, so that
    /// participant's GetOutcome is still told COMMIT; past it the outcome
    /// is answered unknown (FAILED_PRECONDITION), never ABORT. `none`:
    /// forever. At least the retention.
    #[arg(long, env = "TANDEM_DECISION_RETENTION", default_value = "90d", value_parser = parse_optional_duration)]
    pub decision_retention: OptionalDuration,
    /// Requests served at once; past it a request is answered
    /// RESOURCE_EXHAUSTED at once instead of queueing.
    #[arg(long, env = "TANDEM_MAX_CONCURRENT_REQUESTS", default_value_t = 1024)]
    pub max_concurrent_requests: usize,
    /// Unfinished transactions recovery drives at once after a restart.
    #[arg(long, env = "TANDEM_RECOVERY_CONCURRENCY", default_value_t = 256)]
    pub recovery_concurrency: usize,
    /// Serve from a damaged log anyway: records that cannot be read are
    /// moved to a quarantine tree (every gtid is logged) and the forced
    /// mark is reset. Without it a damaged log stops the start.
    #[arg(long, env = "TANDEM_ACCEPT_LOG_DAMAGE")]
    pub accept_log_damage: bool,
    /// Where the log is kept.
    #[command(flatten)]
    pub store: crate::store_cli::StoreArgs,
    /// TLS, access list and participant access.
    #[command(flatten)]
    pub security: ServeSecurityArgs,
    /// The alert webhook.
    #[command(flatten)]
    pub alerts: AlertArgs,
    /// Serve the admin HTTP listener here: the web console, its JSON API
    /// and /metrics (admin role needed with --auth-file; HTTPS with
    /// --tls-cert). Unset: none.
    #[arg(long, env = "TANDEM_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    /// Export the coordinator's spans by OTLP/gRPC to this collector
    /// (e.g. http://127.0.0.1:4317); each participant call is a child of
    /// the trace the client sent. Unset: nothing is exported.
    #[arg(long, env = "TANDEM_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// The share of transactions whose spans are exported, 0 to 1, chosen
    /// by trace id (services sampling by the same ratio keep the same
    /// traces whole).
    #[arg(long, env = "TANDEM_OTLP_SAMPLE_RATIO", default_value = "1", value_parser = parse_ratio)]
    pub otlp_sample_ratio: f64,
    /// `service.name` of the exported spans.
    #[arg(
        long,
        env = "TANDEM_SERVICE_NAME",
        default_value = "tandem-coordinator"
    )]
    pub service_name: String,
}

/// Where STUCK transactions and failing branches are reported.
#[derive(Args, Clone, Debug)]
pub struct AlertArgs {
    /// POST a JSON alert to this http:// or https:// URL when a
    /// transaction becomes STUCK or a branch's failed commit / rollback
    /// calls reach --alert-after-attempts (retried, never blocking
    /// transactions).
    #[arg(long, env = "TANDEM_ALERT_WEBHOOK")]
    pub alert_webhook: Option<String>,
    /// CA bundle an https webhook's certificate is verified against
    /// (default: the system's roots).
    #[arg(long, env = "TANDEM_ALERT_CA", requires = "alert_webhook")]
    pub alert_ca: Option<PathBuf>,
    /// File holding a token sent to the webhook as `Authorization: Bearer`.
    #[arg(long, env = "TANDEM_ALERT_TOKEN_FILE", requires = "alert_webhook")]
    pub alert_token_file: Option<PathBuf>,
    /// One alert per branch when its failed commit / rollback calls reach
    /// this many.
    #[arg(long, env = "TANDEM_ALERT_AFTER_ATTEMPTS", default_value_t = 5)]
    pub alert_after_attempts: u32,
}

impl AlertArgs {
    /// The alert settings, if a webhook is given; `instance` names this
    /// coordinator in the alerts.
    ///
    /// # Errors
    ///
    /// The token file cannot be read or is empty.
    pub fn settings(&self, instance: String) -> anyhow::Result<Option<AlertSettings>> {
        let Some(url) = &self.alert_webhook else {
            return Ok(None);
        };
        let mut settings = AlertSettings::new(url.clone(), instance);
        settings.ca = self.alert_ca.clone();
        settings.after_attempts = self.alert_after_attempts;
        if let Some(path) = &self.alert_token_file {
            let token = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("--alert-token-file {}: {e}", path.display()))?;
            let token = token.trim();
            anyhow::ensure!(
                !token.is_empty() && !token.chars().any(char::is_control),
                "--alert-token-file {}: empty or not one line",
                path.display()
            );
            settings.token = Some(token.to_string());
        }
        Ok(Some(settings))
    }
}

/// A duration, or `none` for no limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionalDuration(pub Option<Duration>);

fn parse_optional_duration(s: &str) -> Result<OptionalDuration, String> {
    if s.trim().eq_ignore_ascii_case("none") {
        return Ok(OptionalDuration(None));
    }
    parse_duration(s).map(|d| OptionalDuration(Some(d)))
}

/// Runs a coordinator as `args` say until SIGINT / SIGTERM.
///
/// # Errors
///
/// A setting is invalid, the listen address cannot be bound, or the log
/// cannot be opened.
pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = CoordinatorConfig {
        listen: args.listen,
        data_dir: args.data_dir,
        default_timeout: args.default_timeout,
        max_timeout: args.max_timeout,
        call_timeout: args.call_timeout,
        max_payload_bytes: args.max_payload_bytes,
        max_branches: args.max_branches,
        retry: RetryPolicy {
            initial: args.retry_initial,
            max: args.retry_max,
            max_attempts: args.retry_max_attempts,
            max_duration: args.retry_max_duration.0,
        },
        retention: args.retention,
        decision_retention: args.decision_retention.0,
        max_concurrent_requests: args.max_concurrent_requests,
        recovery_concurrency: args.recovery_concurrency,
        allowed_endpoints: args.security.allow_participant.clone(),
        require_tls: args.security.require_tls,
        takeover_every: args.store.takeover_every(),
    };
    config.validate()?;
    let (security, participants) = args.security.load().map_err(|e| anyhow::anyhow!(e))?;
    if security.access.is_some() && security.tls.is_none() {
        tracing::warn!(
            "TOKENS IN CLEARTEXT: --auth-file without --tls-cert: callers' bearer tokens cross \
             the network unencrypted, for anyone on the path to read and replay (give --tls-cert \
             and --tls-key)"
        );
    }
    if participants.token.is_set()
        && let Some(p) = config
            .allowed_endpoints
            .iter()
            .find(|p| p.to_string().starts_with("http://"))
    {
        tracing::warn!(
            pattern = %p,
            "TOKENS IN CLEARTEXT: the participant token goes unencrypted to http:// participants, \
             for anyone on the path to read and replay (allow only https:// participants)"
        );
    }
    let listen = config.listen;
    // Bound before the log opens: a shared store records the address this
    // instance really serves at (port 0 picks one).
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    let log = args.store.open(
        &config.data_dir,
        listener.local_addr()?,
        security.tls.is_some(),
        args.accept_log_damage,
    )?;
    let any_endpoint = config.allowed_endpoints.is_empty();
    let instance = args.store.instance_name.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "tandem".into())
    });
    let env = Environment {
        participants: participants.clone(),
        alerts: args.alerts.settings(instance)?,
        // Recorded only when someone can read them (the admin listener).
        metrics: args
            .admin_listen
            .map(|_| std::sync::Arc::new(tandem_coordinator::metrics::Metrics::new())),
        ..Environment::default()
    };
    // Before listening: refuses a participant token without an allowlist.
    let coord = Coordinator::with_environment(config, log, env)?;
    match &args.store.store {
        // The log is in the store: --data-dir is not used.
        Some(_) => info!(
            listen = %listener.local_addr()?,
            log = "PostgreSQL store (--store)",
            "tandem coordinator serving"
        ),
        None => info!(
            listen = %listener.local_addr()?,
            data_dir = %coord.config().data_dir.display(),
            "tandem coordinator serving"
        ),
    }
    // Printed for scripts and tests that start us on port 0.
    println!("listening on {}", listener.local_addr()?);
    let admin = match args.admin_listen {
        Some(at) => {
            let admin = tokio::net::TcpListener::bind(at)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {at} (--admin-listen): {e}"))?;
            // Second line for scripts and tests (a closed stdout is no error).
            let _ = writeln!(
                std::io::stdout(),
                "admin listening on {}",
                admin.local_addr()?
            );
            let instance = args.store.instance_name.clone().unwrap_or_else(|| {
                listener
                    .local_addr()
                    .map_or_else(|_| listen.to_string(), |a| a.to_string())
            });
            Some(server::AdminListener {
                listener: admin,
                instance,
            })
        }
        None => None,
    };
    if any_endpoint {
        tracing::warn!(
            "no participant allowlist: a branch may name any host:port (give --allow-participant)"
        );
    }
    let _hup = reload_on_hangup(security.clone(), coord.clone(), participants);
    server::serve_with_admin(coord, listener, admin, security, shutdown_signal()).await?;
    info!("stopped");
    Ok(())
}

/// SIGHUP re-reads every certificate, key, token and access file.
fn reload_on_hangup(
    security: ServerSecurity,
    coord: Coordinator,
    mut participants: ParticipantAccess,
) -> Option<tokio::task::JoinHandle<()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup()).ok()?;
    Some(tokio::spawn(async move {
        while hup.recv().await.is_some() {
            info!("SIGHUP: reloading certificates, tokens and the access file");
            security.reload(true);
            let result = participants
                .reread_token()
                .and_then(|()| coord.set_participant_access(&participants));
            if let Err(e) = result {
                tracing::error!(error = %e, "participant TLS / token not reloaded; keeping the ones in use");
            }
        }
    }))
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    info!("shutdown requested: finishing in-flight calls");
}

/// A ratio from 0 to 1 (`--otlp-sample-ratio`).
pub fn parse_ratio(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("{s:?}: expected a number from 0 to 1 (e.g. 0.1)")),
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::OsString;
    use std::io::Write;

    use clap::{Arg, Command};

    use super::ServeArgs;
    use crate::config_file::parse_layered;

    // tandem.example.toml, with its commented-out keys uncommented, parses
    // and sets every flag of `tandem serve`: the example cannot fall behind
    // the flags.
    #[test]
    fn the_example_file_covers_every_flag() {
        let example = include_str!("../../../tandem.example.toml");
        let uncommented: String = example
            .lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(rest)
                    if rest.split_once(" = ").is_some_and(|(k, _)| {
                        !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '-')
                    }) =>
                {
                    rest
                }
                _ => l,
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        file.write_all(uncommented.as_bytes()).expect("write");
        let serve = <ServeArgs as clap::Args>::augment_args(Command::new("serve"));
        let command = Command::new("tandem")
            .arg(Arg::new("log_format").long("log-format").global(true))
            .subcommand(serve.clone());
        let argv: Vec<OsString> = vec![
            "tandem".into(),
            "serve".into(),
            "--config".into(),
            file.path().into(),
        ];
        let layered = parse_layered(command, argv, "serve").expect("the example parses");
        let shown = layered.render();
        for arg in serve.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if ["config", "print-config"].contains(&long) {
                continue;
            }
            assert!(
                shown
                    .lines()
                    .any(|l| l.starts_with(&format!("{long} = ")) && l.ends_with("# file")),
                "--{long} is missing from tandem.example.toml:\n{shown}"
            );
        }
        // And as shipped (keys without a default commented out) it parses.
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        file.write_all(example.as_bytes()).expect("write");
        let command = Command::new("tandem")
            .arg(Arg::new("log_format").long("log-format").global(true))
            .subcommand(serve);
        let argv: Vec<OsString> = vec![
            "tandem".into(),
            "serve".into(),
            "--config".into(),
            file.path().into(),
        ];
        parse_layered(command, argv, "serve").expect("the example parses as shipped");
    }
}

//! Coordinator configuration: a plain struct with defaults and `validate()`.
//! The command line (clap, `TANDEM_*` env vars) lives in the binary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::log::SledLog;
/// The phase-2 retry policy lives with the engine, which applies it.
pub use tandem_engine::RetryPolicy;

/// Everything `tandem serve` can be told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CoordinatorConfig {
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// Directory of the sled transaction log.
    pub data_dir: PathBuf,
    /// Global deadline of a transaction whose client gave none.
    pub default_timeout: Duration,
    /// Longest global deadline a client may ask for.
    pub max_timeout: Duration,
    /// Deadline of each call to a participant (phase 1 calls are also cut
    /// at the transaction's global deadline).
    pub call_timeout: Duration,
    /// Largest branch payload accepted; larger ones are INVALID_ARGUMENT.
    pub max_payload_bytes: usize,
    /// Most branches in one transaction.
    pub max_branches: usize,
    /// How phase-2 calls are retried.
    pub retry: RetryPolicy,
    /// Finished (COMMITTED / ABORTED) records are removed from the log once
    /// unchanged for this long; STUCK and unfinished ones never are. At
    /// least [`MIN_RETENTION`].
    pub retention: Duration,
    /// How long a decision tombstone is kept after retention removed its
    /// record (a commit some participant never acknowledged: a branch
    /// settled by hand); `None`: forever. At least `retention`. Past it,
    /// `GetOutcome` for that gtid (and any older one without a record) is
    /// FAILED_PRECONDITION, never a presumed abort.
    pub decision_retention: Option<Duration>,
    /// Transactions recovery drives at once after a restart.
    pub recovery_concurrency: usize,
    /// Requests served at once; more are answered RESOURCE_EXHAUSTED.
    pub max_concurrent_requests: usize,
    /// Participant endpoints a branch may name (see [`EndpointPattern`]);
    /// empty: any.
    pub allowed_endpoints: Vec<EndpointPattern>,
    /// Refuse `http://` participant endpoints (and serve only TLS).
    pub require_tls: bool,
    /// How often to look for transactions of other coordinators whose
    /// lease expired in a shared store (a quarter of the lease).
    pub takeover_every: Duration,
}

/// The shortest retention accepted. A new client-chosen gtid is accepted
/// while younger than min(1 h, retention) less the minute it may be ahead
/// of the coordinator's clock (so that no record with it can have been
/// removed yet); two minutes leave that window at least a minute long.
pub const MIN_RETENTION: Duration = Duration::from_secs(120);

/// How far an instance's clock may be from a shared store's before the
/// instance refuses to start (or halts). Retention removes by the
/// sweeping instance's clock and the horizon is in gtid time, so a gtid
/// made here falls under the horizon only if retention ≤ 2 × the offset
/// between two clocks; bounding every clock's offset from the store's to
/// 20 s keeps that impossible for any retention ≥ [`MIN_RETENTION`].
pub const MAX_CLOCK_OFFSET: Duration = Duration::from_secs(20);

/// How long decision tombstones are kept unless configured: 90 days.
pub const DEFAULT_DECISION_RETENTION: Duration = Duration::from_secs(90 * 24 * 3600);

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 7070)),
            data_dir: PathBuf::from("./tandem-data"),
            default_timeout: Duration::from_secs(60),
            max_timeout: Duration::from_secs(24 * 3600),
            call_timeout: Duration::from_secs(5),
            max_payload_bytes: 1024 * 1024,
            max_branches: 64,
            retry: RetryPolicy::default(),
            retention: Duration::from_secs(24 * 3600),
            decision_retention: Some(DEFAULT_DECISION_RETENTION),
            recovery_concurrency: 256,
            max_concurrent_requests: 1024,
            allowed_endpoints: Vec::new(),
            require_tls: false,
            takeover_every: Duration::from_millis(2500),
        }
    }
}

/// A participant endpoint pattern: `scheme://host:port`, where the host
/// may be `*` (any) or start with `*.` (any name under a domain) and the
/// port may be `*`. `https://*.bank.internal:*`, `http://127.0.0.1:9001`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointPattern {
    scheme: String,
    host: String,
    port: Option<u16>,
}

impl std::str::FromStr for EndpointPattern {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let bad = |why: &str| ConfigError(format!("participant pattern {s:?}: {why}"));
        let (scheme, rest) = s
            .split_once("://")
            .ok_or_else(|| bad("expected scheme://host:port"))?;
        let scheme = scheme.to_ascii_lowercase();
        if scheme != "http" && scheme != "https" {
            return Err(bad("the scheme must be http or https"));
        }
        let (host, port) = rest
            .rsplit_once(':')
            .ok_or_else(|| bad("a port (or *) is required"))?;
        let port = match port {
            "*" => None,
            p => Some(
                p.parse()
                    .map_err(|_| bad("the port must be a number or *"))?,
            ),
        };
        let host = host.to_ascii_lowercase();
        let name = host.strip_prefix("*.").unwrap_or(&host);
        if host != "*" && (name.is_empty() || name.contains(['*', '/', '@', '?', '#'])) {
            return Err(bad("the host must be a name, an address, * or *.domain"));
        }
        Ok(EndpointPattern { scheme, host, port })
    }
}

impl EndpointPattern {
    /// Whether the participant `scheme://host:port` (lower case, port
    /// explicit) matches.
    pub fn matches(&self, scheme: &str, host: &str, port: u16) -> bool {
        let host_ok = match self.host.strip_prefix("*.") {
            _ if self.host == "*" => true,
            Some(domain) => host
                .strip_suffix(domain)
                .is_some_and(|sub| sub.len() > 1 && sub.ends_with('.')),
            None => self.host == host,
        };
        self.scheme == scheme && host_ok && self.port.is_none_or(|p| p == port)
    }
}

impl std::fmt::Display for EndpointPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.port {
            Some(p) => write!(f, "{}://{}:{p}", self.scheme, self.host),
            None => write!(f, "{}://{}:*", self.scheme, self.host),
        }
    }
}

/// A configuration value out of range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

impl CoordinatorConfig {
    /// Checks every value; the message names the setting at fault.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming the first bad setting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |s: String| Err(ConfigError(s));
        if self.require_tls
            && let Some(p) = self.allowed_endpoints.iter().find(|p| p.scheme == "http")
        {
            return bad(format!(
                "participant pattern {p} is http://, but TLS is required"
            ));
        }
        if self.default_timeout.is_zero() || self.default_timeout > self.max_timeout {
            return bad(format!(
                "default timeout {:?} must be above zero and at most the max timeout {:?}",
                self.default_timeout, self.max_timeout
            ));
        }
        if self.call_timeout.is_zero() {
            return bad("call timeout must be above zero".into());
        }
        if self.max_payload_bytes > SledLog::MAX_PAYLOAD_BYTES {
            return bad(format!(
                "max payload {} bytes is above the log's limit of {} bytes",
                self.max_payload_bytes,
                SledLog::MAX_PAYLOAD_BYTES
            ));
        }
        if self.max_branches == 0 || self.max_branches > 10_000 {
            return bad(format!(
                "max branches {} must be 1..=10000",
                self.max_branches
            ));
        }
        if self.recovery_concurrency == 0 || self.recovery_concurrency > 65_536 {
            return bad(format!(
                "recovery concurrency {} must be 1..=65536",
                self.recovery_concurrency
            ));
        }
        if self.max_concurrent_requests == 0 {
            return bad("max concurrent requests must be above zero".into());
        }
        if self.retention < MIN_RETENTION {
            return bad(format!(
                "retention {:?} must be at least {:?}: a client-chosen gtid may be a minute \
                 ahead, and a repeat must be told apart from a new transaction for a while",
                self.retention, MIN_RETENTION
            ));
        }
        if let Some(d) = self.decision_retention
            && d < self.retention
        {
            return bad(format!(
                "decision retention {d:?} must be at least the retention {:?}: a tombstone \
                 outlives the record it replaces",
                self.retention
            ));
        }
        validate_retry(&self.retry)
    }
}

/// Checks a retry policy (part of [`CoordinatorConfig::validate`]).
fn validate_retry(policy: &RetryPolicy) -> Result<(), ConfigError> {
    if policy.initial.is_zero() || policy.initial > policy.max {
        return Err(ConfigError(format!(
            "retry initial interval {:?} must be above zero and at most the max interval {:?}",
            policy.initial, policy.max
        )));
    }
    if policy.max_attempts == Some(0) {
        return Err(ConfigError(
            "retry max attempts must be at least 1 (or unset for no limit)".into(),
        ));
    }
    if policy.max_duration.is_some_and(|d| d.is_zero()) {
        return Err(ConfigError(
            "retry max duration must be above zero (or unset for no limit)".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    // Rule: a pattern matches its scheme, its host (or any name under a
    // `*.` domain, never the domain itself or a look-alike) and its port.
    #[test]
    fn endpoint_patterns_match_exactly() {
        let p: EndpointPattern = "https://*.bank.internal:*".parse().expect("pattern");
        assert!(p.matches("https", "a.bank.internal", 443));
        assert!(p.matches("https", "x.y.bank.internal", 9001));
        assert!(!p.matches("https", "bank.internal", 443));
        assert!(!p.matches("https", "evilbank.internal", 443));
        assert!(!p.matches("http", "a.bank.internal", 443));
        let p: EndpointPattern = "http://127.0.0.1:9001".parse().expect("pattern");
        assert!(p.matches("http", "127.0.0.1", 9001));
        assert!(!p.matches("http", "127.0.0.1", 9002));
        for bad in [
            "127.0.0.1:9001",
            "ftp://a:1",
            "http://a",
            "http://a:x",
            "http://a*b:1",
        ] {
            assert!(bad.parse::<EndpointPattern>().is_err(), "{bad}");
        }
    }

    #[test]
    fn validate_names_the_bad_setting() {
        assert!(CoordinatorConfig::default().validate().is_ok());
        let c = CoordinatorConfig {
            max_payload_bytes: 64 * 1024 * 1024,
            ..CoordinatorConfig::default()
        };
        assert!(c.validate().unwrap_err().0.contains("max payload"));
        let c = CoordinatorConfig {
            retry: RetryPolicy {
                initial: Duration::ZERO,
                ..RetryPolicy::default()
            },
            ..CoordinatorConfig::default()
        };
        assert!(c.validate().unwrap_err().0.contains("retry initial"));
        let c = CoordinatorConfig {
            retry: RetryPolicy {
                max_attempts: Some(0),
                ..RetryPolicy::default()
            },
            ..CoordinatorConfig::default()
        };
        assert!(c.validate().unwrap_err().0.contains("max attempts"));
        let c = CoordinatorConfig {
            retention: MIN_RETENTION - Duration::from_millis(1),
            ..CoordinatorConfig::default()
        };
        assert!(c.validate().unwrap_err().0.contains("retention"));
        let c = CoordinatorConfig {
            retention: MIN_RETENTION,
            ..CoordinatorConfig::default()
        };
        assert!(c.validate().is_ok());
    }
}

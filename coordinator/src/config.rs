//! Coordinator configuration: a plain struct with defaults and `validate()`.
//! The command line (clap, `TANDEM_*` env vars) lives in the binary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::log::SledLog;

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
        self.retry.validate()
    }
}

/// Capped exponential backoff with jitter for phase-2 retries, and when to
/// give up: a branch that has failed `max_attempts` times in a row, or has
/// been retried for `max_duration`, is left alone, and once nothing else is
/// in flight the transaction becomes STUCK (its decision kept) until an
/// operator runs `tandem tx retry`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Delay before the first retry.
    pub initial: Duration,
    /// Longest delay between two attempts.
    pub max: Duration,
    /// Give up on a branch after this many failed calls in a row; `None`
    /// for no limit.
    pub max_attempts: Option<u32>,
    /// Give up on a branch once this long has passed since the decision (or
    /// the coordinator's restart, or the operator's last retry); `None` for
    /// no limit.
    pub max_duration: Option<Duration>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(30),
            max_attempts: None,
            max_duration: Some(Duration::from_secs(3600)),
        }
    }
}

impl RetryPolicy {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.initial.is_zero() || self.initial > self.max {
            return Err(ConfigError(format!(
                "retry initial interval {:?} must be above zero and at most the max interval {:?}",
                self.initial, self.max
            )));
        }
        if self.max_attempts == Some(0) {
            return Err(ConfigError(
                "retry max attempts must be at least 1 (or unset for no limit)".into(),
            ));
        }
        if self.max_duration.is_some_and(|d| d.is_zero()) {
            return Err(ConfigError(
                "retry max duration must be above zero (or unset for no limit)".into(),
            ));
        }
        Ok(())
    }

    /// Whether a branch that has failed `failures` times in a row, retried
    /// for `elapsed`, should be given up on.
    pub fn exhausted(&self, failures: u32, elapsed: Duration) -> bool {
        self.max_attempts.is_some_and(|m| failures >= m)
            || self.max_duration.is_some_and(|d| elapsed >= d)
    }

    /// Delay after `failures` failed attempts (1 = the first failure):
    /// `initial × 2^(failures-1)`, capped at `max`, then scaled into
    /// `[½, 1]` of that by `jitter` (any u64; uniform jitter spreads retries
    /// of many transactions apart).
    pub fn delay(&self, failures: u32, jitter: u64) -> Duration {
        let exp = failures.saturating_sub(1).min(32);
        let base = self
            .initial
            .saturating_mul(1u32 << exp.min(31))
            .min(self.max);
        let fraction = 0.5 + (jitter % 1_000_000) as f64 / 2_000_000.0;
        base.mul_f64(fraction)
    }
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

    // Rule: backoff doubles from `initial`, never exceeds `max`, and jitter
    // keeps it within [½, 1] of the capped value.
    #[test]
    fn backoff_doubles_caps_and_jitters() {
        let p = RetryPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
            ..RetryPolicy::default()
        };
        assert_eq!(
            p.delay(1, 999_999),
            Duration::from_micros(99_999) + Duration::from_nanos(950)
        );
        assert_eq!(p.delay(2, 0), Duration::from_millis(100));
        assert_eq!(p.delay(3, 0), Duration::from_millis(200));
        assert_eq!(p.delay(50, 0), Duration::from_millis(500));
        for j in [0, 1, 12345, u64::MAX] {
            let d = p.delay(10, j);
            assert!(d >= Duration::from_millis(500) && d <= Duration::from_secs(1));
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

    // Rule: a branch is given up on at max attempts or max duration,
    // whichever comes first; with neither set, never.
    #[test]
    fn policy_is_exhausted_by_attempts_or_duration() {
        let p = RetryPolicy {
            max_attempts: Some(3),
            max_duration: Some(Duration::from_secs(10)),
            ..RetryPolicy::default()
        };
        assert!(!p.exhausted(2, Duration::from_secs(9)));
        assert!(p.exhausted(3, Duration::ZERO));
        assert!(p.exhausted(1, Duration::from_secs(10)));
        let unlimited = RetryPolicy {
            max_attempts: None,
            max_duration: None,
            ..RetryPolicy::default()
        };
        assert!(!unlimited.exhausted(u32::MAX, Duration::MAX));
    }
}

//! Alerts: a webhook told when a transaction becomes STUCK or a branch's
//! failed phase-2 attempts reach a threshold, so an operator hears of it
//! without watching logs.
//!
//! The runtime calls [`Alerter`] synchronously and cheaply: an alert is put
//! on a bounded queue with `try_send` and, when the queue is full, dropped
//! and counted (a warning at most once a minute). The protocol never waits
//! for a webhook. One delivery task, owned by the coordinator and stopped on
//! shutdown, POSTs the alerts one at a time as JSON, retrying with
//! exponential backoff (see [`webhook`]).

mod webhook;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::model::{BranchId, BranchRecord, BranchState, TxnRecord};

/// Alerts waiting for delivery at most; past it new ones are dropped.
pub const QUEUE: usize = 256;
/// Longest `last_error` sent, in bytes.
pub const MAX_ERROR_BYTES: usize = 1024;

/// Where and how alerts are delivered.
#[derive(Clone)]
pub struct AlertSettings {
    /// `http://` or `https://` URL the alerts are POSTed to.
    pub url: String,
    /// CA bundle an https webhook's certificate is verified against
    /// (default: the system's roots).
    pub ca: Option<PathBuf>,
    /// Sent as `Authorization: Bearer …` (never logged).
    pub token: Option<String>,
    /// A branch alert once its failed phase-2 attempts reach this.
    pub after_attempts: u32,
    /// This coordinator's name, in every alert.
    pub instance: String,
    /// Deadline of one POST.
    pub request_timeout: Duration,
    /// POSTs of one alert before it is given up.
    pub tries: u32,
    /// Wait after the first failed POST; doubles after each.
    pub first_backoff: Duration,
}

impl AlertSettings {
    /// Settings with the default delivery policy: 5 tries, 500 ms backoff
    /// doubling (7.5 s of waits), 5 s per POST: an alert is given up within
    /// about 35 s.
    pub fn new(url: impl Into<String>, instance: impl Into<String>) -> Self {
        AlertSettings {
            url: url.into(),
            ca: None,
            token: None,
            after_attempts: 5,
            instance: instance.into(),
            request_timeout: Duration::from_secs(5),
            tries: 5,
            first_backoff: Duration::from_millis(500),
        }
    }
}

/// Alerting cannot be set up as asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("alert webhook: {0}")]
pub struct AlertError(pub String);

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    /// The retry policy gave up: the transaction waits for an operator.
    Stuck,
    /// A branch's failed phase-2 attempts reached the threshold.
    BranchFailing,
}

/// One alert, as POSTed (JSON).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Alert {
    /// What happened.
    pub kind: AlertKind,
    /// The transaction.
    pub gtid: String,
    /// Its protocol (`2pc`, `tcc`, `saga`, `msg`).
    pub mode: &'static str,
    /// Its state (`stuck`, `committing`, `aborting`).
    pub state: String,
    /// `commit` or `abort`; `none` for a message STUCK undecided (its
    /// back-check never answered).
    pub decision: String,
    /// The failing branch's resource (handler name).
    pub resource: String,
    /// The failing branch's id.
    pub branch_id: BranchId,
    /// Its failed phase-2 attempts.
    pub attempts: u32,
    /// Its last error (at most [`MAX_ERROR_BYTES`]).
    pub last_error: String,
    /// When, ms since the Unix epoch.
    pub at_ms: u64,
    /// Which coordinator.
    pub instance: String,
}

/// The runtime's handle: cheap to clone, never blocks.
#[derive(Clone)]
pub struct Alerter {
    tx: mpsc::Sender<Alert>,
    after_attempts: u32,
    instance: Arc<str>,
    dropped: Arc<AtomicU64>,
    last_warning: Arc<Mutex<Option<Instant>>>,
}

impl Alerter {
    /// Checks `settings` and starts the delivery task, which ends when
    /// `stop` is cancelled.
    ///
    /// # Errors
    ///
    /// The URL is not http(s), the CA cannot be read, or the threshold is 0.
    pub fn start(
        settings: AlertSettings,
        stop: CancellationToken,
    ) -> Result<(Alerter, JoinHandle<()>), AlertError> {
        if settings.after_attempts == 0 {
            return Err(AlertError(
                "--alert-after-attempts must be at least 1".into(),
            ));
        }
        let hook = webhook::Webhook::new(&settings)?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let alerter = Alerter {
            tx,
            after_attempts: settings.after_attempts,
            instance: settings.instance.clone().into(),
            dropped: Arc::default(),
            last_warning: Arc::default(),
        };
        let task = tokio::spawn(webhook::deliver(hook, settings, rx, stop));
        Ok((alerter, task))
    }

    /// Failed attempts after which a branch is reported.
    pub fn after_attempts(&self) -> u32 {
        self.after_attempts
    }

    /// Alerts dropped because the queue was full (or delivery had stopped).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// `rec` just became STUCK: reports its first branch still failing.
    pub fn stuck(&self, rec: &TxnRecord, at_ms: u64) {
        let failing = rec
            .branches
            .iter()
            .find(|b| !settled(b) && !b.last_error.is_empty())
            .or_else(|| rec.branches.iter().find(|b| !settled(b)));
        if let Some(b) = failing {
            self.send(self.alert(AlertKind::Stuck, rec, b, b.attempts, &b.last_error, at_ms));
        }
    }

    /// A phase-2 call of `branch` failed for the `attempt`-th time; reported
    /// once, when `attempt` reaches the threshold.
    pub fn branch_failed(
        &self,
        rec: &TxnRecord,
        branch: BranchId,
        attempt: u32,
        error: &str,
        at_ms: u64,
    ) {
        if attempt != self.after_attempts {
            return;
        }
        if let Some(b) = rec.branch(branch) {
            let alert = self.alert(AlertKind::BranchFailing, rec, b, attempt, error, at_ms);
            self.send(alert);
        }
    }

    fn alert(
        &self,
        kind: AlertKind,
        rec: &TxnRecord,
        b: &BranchRecord,
        attempts: u32,
        error: &str,
        at_ms: u64,
    ) -> Alert {
        Alert {
            kind,
            gtid: rec.gtid.to_string(),
            mode: rec.mode.label(),
            state: rec.state.name().to_ascii_lowercase(),
            decision: rec
                .decision
                .map_or("none", |d| d.name())
                .to_ascii_lowercase(),
            resource: b.resource.clone(),
            branch_id: b.id,
            attempts,
            last_error: bounded(error),
            at_ms,
            instance: self.instance.to_string(),
        }
    }

    /// Queues `alert`, or drops and counts it when the queue is full.
    pub fn send(&self, alert: Alert) {
        if self.tx.try_send(alert).is_ok() {
            return;
        }
        let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        let mut last = self.last_warning.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
            *last = Some(Instant::now());
            tracing::warn!(
                dropped,
                "alert queue full (the webhook is slow or down): alerts dropped"
            );
        }
    }
}

fn settled(b: &BranchRecord) -> bool {
    b.resolution.is_some() || matches!(b.state, BranchState::Committed | BranchState::RolledBack)
}

/// At most [`MAX_ERROR_BYTES`], cut at a character boundary.
fn bounded(s: &str) -> String {
    if s.len() <= MAX_ERROR_BYTES {
        return s.to_string();
    }
    let mut end = MAX_ERROR_BYTES;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_errors_are_cut_at_a_character() {
        let s = "é".repeat(MAX_ERROR_BYTES);
        let b = bounded(&s);
        assert!(b.len() <= MAX_ERROR_BYTES + '…'.len_utf8());
        assert_eq!(bounded("short"), "short");
    }

    // A full queue drops (and counts) instead of waiting.
    #[tokio::test]
    async fn a_full_queue_drops_instead_of_waiting() {
        let stop = CancellationToken::new();
        // Nothing listens on port 9 of this test's delivery: it retries
        // slowly while the queue fills.
        let mut settings = AlertSettings::new("http://127.0.0.1:9/", "t");
        settings.first_backoff = Duration::from_secs(60);
        let (alerter, task) = Alerter::start(settings, stop.clone()).expect("start");
        let alert = Alert {
            kind: AlertKind::Stuck,
            gtid: "g".into(),
            mode: "2pc",
            state: "stuck".into(),
            decision: "commit".into(),
            resource: "r".into(),
            branch_id: 1,
            attempts: 1,
            last_error: "e".into(),
            at_ms: 0,
            instance: "t".into(),
        };
        for _ in 0..QUEUE + 10 {
            alerter.send(alert.clone());
        }
        assert!(alerter.dropped() >= 9, "dropped {}", alerter.dropped());
        stop.cancel();
        task.await.expect("delivery task ends on stop");
    }

    #[test]
    fn settings_are_checked() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let _guard = rt.enter();
        let stop = CancellationToken::new();
        for url in ["ftp://x/", "not a url", "http:///nohost"] {
            let r = Alerter::start(AlertSettings::new(url, "t"), stop.clone());
            assert!(r.is_err(), "{url} accepted");
        }
        let mut s = AlertSettings::new("http://127.0.0.1:1/", "t");
        s.after_attempts = 0;
        assert!(Alerter::start(s, stop).is_err());
    }
}

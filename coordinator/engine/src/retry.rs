//! Phase-2 retries: how long to wait between attempts, and when to give up.

use std::time::Duration;

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

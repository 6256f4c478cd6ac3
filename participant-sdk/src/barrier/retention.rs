//! Removing old barrier records: a background sweep in small batches.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

use super::{BarrierStore, BranchKey, now_ms};

/// How long finished barrier records are kept, and how the sweep runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// A finished record (confirmed, cancelled, refused, empty cancel) is
    /// removed once it is older than this. Keep it longer than a branch's
    /// calls can be delayed or retried: a try delayed past the removal of its
    /// empty-cancel record would no longer be refused. Default 7 days.
    pub keep: Duration,
    /// Pause between sweeps. Default 1 minute.
    pub interval: Duration,
    /// Records visited per batch; the sweep yields between batches so live
    /// calls are not held up. Default 256.
    pub batch: usize,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            keep: Duration::from_secs(7 * 24 * 3600),
            interval: Duration::from_secs(60),
            batch: 256,
        }
    }
}

/// Starts the sweep of `store` in the background: every `interval`, walk
/// all records in batches of `batch`, removing finished ones older than
/// `keep`. Abort the returned task to stop it.
/// [`ParticipantServer`](crate::ParticipantServer) runs one while it serves.
pub fn spawn_retention(store: Arc<dyn BarrierStore>, retention: Retention) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(retention.interval).await;
            sweep(store.as_ref(), retention).await;
        }
    })
}

/// One full pass; returns how many records it removed.
pub(crate) async fn sweep(store: &dyn BarrierStore, retention: Retention) -> usize {
    let before = now_ms().saturating_sub(retention.keep.as_millis() as u64);
    let mut from: Option<BranchKey> = None;
    let mut removed = 0;
    loop {
        match store.purge(from, before, retention.batch).await {
            Ok(page) => {
                removed += page.removed;
                match page.next {
                    Some(next) => from = Some(next),
                    None => break,
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "barrier retention sweep failed; will try again");
                break;
            }
        }
        tokio::task::yield_now().await;
    }
    if removed > 0 {
        tracing::debug!(removed, "barrier retention removed finished records");
    }
    removed
}

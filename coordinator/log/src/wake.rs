//! Wake-ups whose order a seeded run replays.
//!
//! tokio's `watch` channel spreads its receivers over several `Notify`s
//! chosen at random, so the order in which waiters of one change wake
//! differs from run to run; the seeded simulation (`coordinator/tests/
//! simulation`) then cannot replay a seed. These two wake their waiters
//! in the order they started waiting.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::sync::Notify;

/// A counter of changes that tasks wait on ("something happened, look
/// again"). A waiter never misses a change made after it took
/// [`seen`](Changes::seen).
#[derive(Debug, Default)]
pub struct Changes {
    version: AtomicU64,
    notify: Notify,
}

impl Changes {
    /// Announces a change: every waiter wakes.
    pub fn bump(&self) {
        self.version.fetch_add(1, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    /// The current version, to wait for a change after it.
    pub fn seen(&self) -> u64 {
        self.version.load(Ordering::SeqCst)
    }

    /// Waits for a change after `seen`, and moves `seen` to it.
    pub async fn after(&self, seen: &mut u64) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            // Registered before the version is read: a bump in between
            // wakes it.
            notified.as_mut().enable();
            let now = self.seen();
            if now != *seen {
                *seen = now;
                return;
            }
            notified.await;
        }
    }
}

/// A flag tasks wait to see cleared (an instance's pause).
#[derive(Debug, Default)]
pub struct Flag {
    set: AtomicBool,
    notify: Notify,
}

impl Flag {
    /// Sets or clears it; clearing wakes every waiter.
    pub fn store(&self, set: bool) {
        self.set.store(set, Ordering::SeqCst);
        if !set {
            self.notify.notify_waiters();
        }
    }

    /// Whether it is set.
    pub fn is_set(&self) -> bool {
        self.set.load(Ordering::SeqCst)
    }

    /// Returns once it is clear.
    pub async fn cleared(&self) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !self.is_set() {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_change_made_before_waiting_is_not_missed() {
        let c = Changes::default();
        let mut seen = c.seen();
        c.bump();
        tokio::time::timeout(Duration::from_secs(1), c.after(&mut seen))
            .await
            .expect("the change was already there");
        assert!(
            tokio::time::timeout(Duration::from_secs(1), c.after(&mut seen))
                .await
                .is_err(),
            "no second change"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_of_a_flag_wake_when_it_clears() {
        let f = Arc::new(Flag::default());
        f.store(true);
        let waiter = tokio::spawn({
            let f = f.clone();
            async move { f.cleared().await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!waiter.is_finished());
        f.store(false);
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("woken")
            .expect("no panic");
    }
}

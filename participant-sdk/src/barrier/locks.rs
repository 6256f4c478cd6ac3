//! Per-branch locks for stores used by one process: a map from key to an
//! async mutex, holding only keys that someone holds or waits for.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedMutexGuard;

use super::BranchKey;

type Slot = Arc<tokio::sync::Mutex<()>>;

/// The lock table.
#[derive(Clone, Default)]
pub(crate) struct KeyLocks {
    slots: Arc<Mutex<HashMap<BranchKey, Slot>>>,
}

/// Holds one key; dropping it lets the next waiter in.
pub(crate) struct KeyGuard {
    key: BranchKey,
    slots: Arc<Mutex<HashMap<BranchKey, Slot>>>,
    guard: Option<OwnedMutexGuard<()>>,
}

impl KeyLocks {
    /// Waits until no one else holds `key`, then holds it.
    pub(crate) async fn lock(&self, key: BranchKey) -> KeyGuard {
        let slot = self.table().entry(key).or_default().clone();
        let guard = slot.lock_owned().await;
        KeyGuard {
            key,
            slots: self.slots.clone(),
            guard: Some(guard),
        }
    }

    /// Keys currently held or waited for.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.table().len()
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<BranchKey, Slot>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for KeyGuard {
    fn drop(&mut self) {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        drop(self.guard.take());
        // Waiters hold clones of the slot; remove it only when none is left.
        // New waiters clone it under the table lock, which we hold.
        if slots
            .get(&self.key)
            .is_some_and(|slot| Arc::strong_count(slot) == 1)
        {
            slots.remove(&self.key);
        }
    }
}

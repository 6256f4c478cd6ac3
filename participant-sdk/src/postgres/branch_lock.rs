//! The branch lock across processes: a session-level advisory lock keyed
//! on the branch, taken by [`PgBarrier::enter`](crate::barrier::BarrierStore::enter)
//! on one pooled connection that the call then keeps ([`Held`]) until it
//! is over. The handler's own transaction ([`BranchTx`](super::BranchTx))
//! and the 2PC finish run on that same connection ([`Lease`]), so a call
//! uses one connection, and every replica sharing the database waits for
//! the branch while one holds it.
//!
//! Why a session lock and not the barrier row's lock: a call commits more
//! than once while it must stay exclusive (`Tried` is committed before the
//! handler runs, the handler commits its own transaction, the done mark
//! follows), and a 2PC prepare ends with `PREPARE TRANSACTION`, which hands
//! every lock of its transaction to the prepared transaction until
//! `COMMIT` / `ROLLBACK PREPARED`; a row lock taken there would make the
//! rollback wait for the very transaction it has to finish. A session
//! lock survives commits and is not handed over by `PREPARE TRANSACTION`.
//! It is released when the call ends, or when its connection closes (a
//! crashed replica releases its branches with its connections).

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::{ClientWrapper, Object};
use tokio_postgres::SimpleQueryMessage;

use super::PgError;
use crate::barrier::{BarrierError, BarrierRecord, BranchKey, Mark};

/// How long a call waits for a branch another process holds before it
/// fails (answered UNAVAILABLE; the coordinator retries).
pub(super) const BRANCH_LOCK_WAIT: Duration = Duration::from_secs(30);

/// The advisory lock id of a branch: FNV-1a (64 bits) of its 20-byte key.
/// Every replica must compute the same id, so it is part of the on-disk
/// protocol: never a hasher whose output may change between builds.
pub(super) fn lock_id(key: BranchKey) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in key.to_bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash as i64
}

/// A pooled connection that is closed, not returned to the pool, when
/// dropped: it may hold a branch lock (a lock taken by a statement that
/// was then abandoned, or an unlock that did not run), and closing the
/// session is what releases it.
struct Closing(Option<Object>);

impl Closing {
    /// Back to the pool after all: it holds nothing.
    fn keep(mut self) {
        drop(self.0.take());
    }
}

impl Drop for Closing {
    fn drop(&mut self) {
        if let Some(conn) = self.0.take() {
            drop(Object::take(conn));
        }
    }
}

/// Takes `key`'s lock on `conn` (waiting at most [`BRANCH_LOCK_WAIT`]) and
/// reads its record after the lock is held, in one round trip. On error
/// the connection is closed: the lock may have been granted meanwhile.
pub(super) async fn lock_and_read(
    conn: Object,
    key: BranchKey,
) -> Result<(Held, Option<BarrierRecord>), BarrierError> {
    let guard = Closing(Some(conn));
    let id = lock_id(key);
    // Literals are safe here: a UUID's text, and two integers. The record
    // is read by a statement of its own, so with a snapshot taken after
    // the lock was granted.
    let sql = format!(
        "SET LOCAL lock_timeout = '{}ms'; SELECT pg_advisory_lock({id}); \
         SELECT mark, updated_ms, epoch FROM tandem_barrier \
         WHERE gtid = '{}' AND branch_id = {}",
        BRANCH_LOCK_WAIT.as_millis(),
        key.gtid,
        key.branch_id
    );
    let conn = guard
        .0
        .as_ref()
        .ok_or_else(|| BarrierError("no connection".into()))?;
    let messages = conn.simple_query(&sql).await.map_err(|e| {
        let e = PgError::from(e);
        BarrierError(format!(
            "cannot lock branch {} of {} (another replica holds it, or the database failed): {e}",
            key.branch_id, key.gtid
        ))
    })?;
    let mut rows = messages.iter().filter_map(|m| match m {
        SimpleQueryMessage::Row(row) => Some(row),
        _ => None,
    });
    let _locked = rows.next();
    let record = match rows.next() {
        None => None,
        Some(row) => {
            let field = |i: usize| -> Result<i64, BarrierError> {
                row.get(i).and_then(|v| v.parse().ok()).ok_or_else(|| {
                    BarrierError(format!(
                        "record of {} branch {} is malformed",
                        key.gtid, key.branch_id
                    ))
                })
            };
            Some(decode_record(key, field(0)?, field(1)?, field(2)?)?)
        }
    };
    let mut guard = guard;
    let held = Held {
        id,
        state: Mutex::new(HeldState {
            conn: guard.0.take(),
            dirty: false,
            written: None,
        }),
    };
    Ok((held, record))
}

/// A stored record, checked.
pub(super) fn decode_record(
    key: BranchKey,
    code: i64,
    ms: i64,
    epoch: i64,
) -> Result<BarrierRecord, BarrierError> {
    let mark = u8::try_from(code).ok().and_then(Mark::from_code);
    match mark {
        Some(mark) => Ok(BarrierRecord {
            mark,
            updated_ms: ms.max(0) as u64,
            epoch: epoch.max(0) as u64,
        }),
        None => Err(BarrierError(format!(
            "record of {} branch {} has unknown mark {code}",
            key.gtid, key.branch_id
        ))),
    }
}

/// The connection a call holds its branch lock on, shared by the barrier
/// entry and the handler's transaction, one at a time. Dropped (the entry
/// and every lease gone), it unlocks and returns the connection to the
/// pool.
pub(super) struct Held {
    id: i64,
    state: Mutex<HeldState>,
}

struct HeldState {
    /// `None` while a [`Lease`] has it.
    conn: Option<Object>,
    /// A handler's transaction was abandoned on it: roll back before reuse.
    dirty: bool,
    /// The mark and epoch a [`BranchTx`](super::BranchTx) committed, for
    /// the entry to learn (it then has nothing left to write).
    written: Option<(Mark, u64)>,
}

impl Held {
    fn state(&self) -> std::sync::MutexGuard<'_, HeldState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What a handler's transaction committed since the last call.
    pub(super) fn take_written(&self) -> Option<(Mark, u64)> {
        self.state().written.take()
    }

    /// Notes what a handler's transaction committed.
    pub(super) fn set_written(&self, mark: Mark, epoch: u64) {
        self.state().written = Some((mark, epoch));
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let state = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        let Some(conn) = state.conn.take() else {
            return;
        };
        let (dirty, id) = (state.dirty, self.id);
        let guard = Closing(Some(conn));
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return; // closed by the guard: that releases the lock
        };
        rt.spawn(async move {
            let Some(conn) = guard.0.as_ref() else {
                return;
            };
            if dirty && conn.batch_execute("ROLLBACK").await.is_err() {
                return;
            }
            // One round trip (a simple query: the id is an integer
            // literal), where a parameterised one prepares first.
            let unlocked = conn
                .simple_query(&format!("SELECT pg_advisory_unlock({id})"))
                .await
                .map(|messages| {
                    messages.iter().any(
                        |m| matches!(m, SimpleQueryMessage::Row(row) if row.get(0) == Some("t")),
                    )
                });
            // Anything but a clean unlock closes the connection instead.
            if matches!(unlocked, Ok(true)) {
                guard.keep();
            }
        });
    }
}

/// A connection checked out for a call's statements: the call's held one
/// when it has one, else a pooled one. Derefs to the client.
pub(super) struct Lease {
    conn: Option<Object>,
    home: Option<Arc<Held>>,
}

impl Lease {
    /// The held connection; an error if it is out already (a handler
    /// opening a second transaction for its branch before ending the first).
    pub(super) async fn held(home: &Arc<Held>) -> Result<Lease, PgError> {
        let (conn, dirty) = {
            let mut state = home.state();
            let conn = state.conn.take();
            (conn, std::mem::take(&mut state.dirty))
        };
        let conn = conn.ok_or_else(|| {
            PgError(
                "this branch's connection is in use: a transaction for the branch is \
                 already open in this call (end it before beginning another)"
                    .into(),
            )
        })?;
        let lease = Lease {
            conn: Some(conn),
            home: Some(home.clone()),
        };
        if dirty {
            lease.batch_execute("ROLLBACK").await?;
        }
        Ok(lease)
    }

    /// A pooled connection, for calls made outside a barrier entry.
    pub(super) fn pooled(conn: Object) -> Lease {
        Lease {
            conn: Some(conn),
            home: None,
        }
    }

    /// The held connection this came from, if any.
    pub(super) fn home(&self) -> Option<&Arc<Held>> {
        self.home.as_ref()
    }

    /// Gives the connection up in the middle of a transaction: a held one
    /// goes back marked for rollback; a pooled one leaves the pool (closing
    /// it is what rolls back should the spawned rollback never run).
    pub(super) fn abandon(mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        match &self.home {
            Some(home) => {
                let mut state = home.state();
                state.conn = Some(conn);
                state.dirty = true;
            }
            None => {
                let client = Object::take(conn);
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    rt.spawn(async move {
                        let _ = client.batch_execute("ROLLBACK").await;
                    });
                }
            }
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let (Some(conn), Some(home)) = (self.conn.take(), &self.home) {
            home.state().conn = Some(conn);
        }
    }
}

impl Deref for Lease {
    type Target = ClientWrapper;

    #[allow(clippy::expect_used)]
    fn deref(&self) -> &ClientWrapper {
        // `conn` is only taken by `abandon` and `drop`, which consume it.
        self.conn.as_ref().expect("leased connection")
    }
}

impl DerefMut for Lease {
    #[allow(clippy::expect_used)]
    fn deref_mut(&mut self) -> &mut ClientWrapper {
        self.conn.as_mut().expect("leased connection")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Replicas of different builds must agree on a branch's lock id.
    #[test]
    fn lock_ids_are_fixed_by_the_key() {
        let key = BranchKey {
            gtid: crate::Gtid::nil(),
            branch_id: 0,
        };
        // FNV-1a of 20 zero bytes.
        assert_eq!(lock_id(key) as u64, 0xee85_fafd_354b_0935);
        let other = BranchKey {
            branch_id: 1,
            ..key
        };
        assert_ne!(lock_id(key), lock_id(other));
    }
}

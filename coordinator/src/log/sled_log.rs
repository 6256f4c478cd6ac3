//! [`SledLog`]: the default, embedded transaction log on sled 0.34.
//!
//! # How durability is made real
//!
//! Two facts about sled 0.34.7 shape this file (both measured on Linux):
//!
//! - `Tree::flush_async()` called from many tasks at once deadlocks (sled
//!   issue #1308), so only one thread ever flushes.
//! - `Db::flush()` writes its buffers and ends in `sync_file_range`, which
//!   flushes neither the device's write cache nor file metadata: a power loss
//!   can still lose "flushed" data. So after `flush()` this log calls
//!   `fdatasync` on sled's data file (`<dir>/db`).
//!
//! One group-commit thread owns both steps: [`TxnLog::force`] enqueues a
//! waiter; the thread takes every waiter queued so far, runs `flush()` then
//! `fdatasync` once for all of them, and releases the batch. Concurrent
//! decisions therefore share one physical flush. A dedicated thread (rather
//! than `spawn_blocking` per batch) keeps the hot path free of runtime hops
//! and needs no async runtime to open the log.
//!
//! sled also writes items too large for a log segment (a big value, or a
//! consolidated page holding several) to separate files under `blobs/`,
//! which its flush never syncs. So the group commit also `fsync`s every blob
//! file it has not synced before, and the `blobs/` directory, before it
//! releases a batch. Payloads live in their own tree, written once per
//! branch, and segments are 8 MiB, so blobs are rare and the record rewritten
//! on each state change stays small.
//!
//! Layout: tree `txns` maps the 16 gtid bytes to the encoded record (without
//! payloads); tree `payloads` maps gtid ++ branch id (big-endian u32) to the
//! payload, written once when the branch first appears.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;

use bytes::Bytes;
use tokio::sync::oneshot;

use super::{ForceFuture, LogError, LogStats, TxnLog, codec};
use crate::model::{Gtid, TxState, TxnRecord};

type Waiter = oneshot::Sender<Result<(), LogError>>;

/// The sled-backed log. Open one per data directory.
pub struct SledLog {
    db: sled::Db,
    txns: sled::Tree,
    payloads: sled::Tree,
    shared: Arc<Shared>,
    queue: Option<mpsc::Sender<Waiter>>,
    flusher: Option<JoinHandle<()>>,
}

/// State shared with the group-commit thread.
struct Shared {
    /// Set once a storage operation failed; the log refuses everything after.
    halted: Mutex<Option<String>>,
    forces: AtomicU64,
    flushes: AtomicU64,
}

impl Shared {
    fn check(&self) -> Result<(), LogError> {
        match &*self.halted.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(why) => Err(LogError::Halted(why.clone())),
            None => Ok(()),
        }
    }

    fn latch(&self, err: impl std::fmt::Display) -> LogError {
        let mut halted = self.halted.lock().unwrap_or_else(|p| p.into_inner());
        let why = halted.get_or_insert_with(|| err.to_string()).clone();
        tracing::error!(error = %why, "transaction log failed; refusing further writes");
        LogError::Storage(why)
    }
}

impl SledLog {
    /// Largest branch payload this log accepts; the coordinator's
    /// `max_payload_bytes` may not exceed it. Bounded so that a transaction's
    /// payloads fit the 64 MiB gRPC messages the services accept.
    pub const MAX_PAYLOAD_BYTES: usize = 16 * 1024 * 1024;

    const SEGMENT_SIZE: usize = 8 * 1024 * 1024;

    /// Opens (creating if needed) the log in `dir`.
    ///
    /// # Errors
    ///
    /// [`LogError::Storage`] if the directory cannot be created or sled cannot
    /// open it (for example another process holds it).
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, LogError> {
        let dir = dir.as_ref();
        let storage = |what: &str, e: &dyn std::fmt::Display| {
            LogError::Storage(format!("{what} {}: {e}", dir.display()))
        };
        std::fs::create_dir_all(dir).map_err(|e| storage("cannot create", &e))?;
        let db = sled::Config::new()
            .path(dir)
            .segment_size(Self::SEGMENT_SIZE)
            .open()
            .map_err(|e| storage("cannot open sled log in", &e))?;
        let txns = db
            .open_tree("txns")
            .map_err(|e| storage("cannot open", &e))?;
        let payloads = db
            .open_tree("payloads")
            .map_err(|e| storage("cannot open", &e))?;
        let data_file = data_file_path(dir);
        let file = File::options()
            .read(true)
            .write(true)
            .open(&data_file)
            .map_err(|e| storage("cannot open data file in", &e))?;
        let shared = Arc::new(Shared {
            halted: Mutex::new(None),
            forces: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
        });
        let (queue, rx) = mpsc::channel();
        let flusher = std::thread::Builder::new()
            .name("tandem-group-commit".into())
            .spawn({
                let (db, shared) = (db.clone(), shared.clone());
                let blobs = BlobSync::new(dir.join("blobs"));
                move || group_commit(db, file, blobs, shared, rx)
            })
            .map_err(|e| storage("cannot start group-commit thread for", &e))?;
        Ok(SledLog {
            db,
            txns,
            payloads,
            shared,
            queue: Some(queue),
            flusher: Some(flusher),
        })
    }

    fn decode(&self, key: &[u8], value: &[u8]) -> Result<TxnRecord, LogError> {
        let gtid = Gtid::from_slice(key).map_err(|e| LogError::Corrupt {
            gtid: format!("{key:?}"),
            detail: e.to_string(),
        })?;
        codec::decode(gtid, value, |branch| {
            let stored = self
                .payloads
                .get(payload_key(&gtid, branch))
                .map_err(|e| self.shared.latch(e))?;
            Ok(stored
                .map(|v| Bytes::copy_from_slice(&v))
                .unwrap_or_default())
        })
    }
}

/// sled 0.34 keeps everything in one file named `db` inside its directory.
fn data_file_path(dir: &Path) -> PathBuf {
    dir.join("db")
}

fn payload_key(gtid: &Gtid, branch: u32) -> [u8; 20] {
    let mut key = [0u8; 20];
    key[..16].copy_from_slice(gtid.as_bytes());
    key[16..].copy_from_slice(&branch.to_be_bytes());
    key
}

/// Tracks which of sled's blob files are already synced. Blob files are
/// written once and never changed, so each needs one `fsync`.
struct BlobSync {
    dir: PathBuf,
    synced: HashSet<OsString>,
}

impl BlobSync {
    fn new(dir: PathBuf) -> Self {
        BlobSync {
            dir,
            synced: HashSet::new(),
        }
    }

    /// Syncs blob files not synced yet, then the directory that names them.
    fn sync_new(&mut self) -> std::io::Result<()> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let mut present = HashSet::new();
        let mut new = false;
        for entry in entries {
            let name = entry?.file_name();
            if !self.synced.contains(&name) {
                match File::open(self.dir.join(&name)) {
                    Ok(f) => f.sync_all()?,
                    // Removed by sled's blob GC since the listing.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                }
                new = true;
            }
            present.insert(name);
        }
        if new {
            File::open(&self.dir)?.sync_all()?;
        }
        self.synced = present;
        Ok(())
    }
}

/// The group-commit loop: wait for one waiter, take all queued ones, flush and
/// fdatasync once, answer them all. Ends when the log is dropped.
fn group_commit(
    db: sled::Db,
    file: File,
    mut blobs: BlobSync,
    shared: Arc<Shared>,
    rx: mpsc::Receiver<Waiter>,
) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        batch.extend(rx.try_iter());
        let result = shared.check().and_then(|()| {
            db.flush().map_err(|e| shared.latch(e))?;
            blobs.sync_new().map_err(|e| shared.latch(e))?;
            file.sync_data().map_err(|e| shared.latch(e))?;
            shared.flushes.fetch_add(1, Ordering::Relaxed);
            Ok(())
        });
        shared
            .forces
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        for waiter in batch {
            // The waiter may have given up (its request was cancelled).
            let _ = waiter.send(result.clone());
        }
    }
}

impl TxnLog for SledLog {
    fn write(&self, record: &TxnRecord) -> Result<(), LogError> {
        self.shared.check()?;
        for b in &record.branches {
            let key = payload_key(&record.gtid, b.id);
            // Payloads never change; store each once (before the record that
            // names it, so a reader never sees a branch without its payload).
            if !self
                .payloads
                .contains_key(key)
                .map_err(|e| self.shared.latch(e))?
            {
                self.payloads
                    .insert(key, b.payload.as_ref())
                    .map_err(|e| self.shared.latch(e))?;
            }
        }
        self.txns
            .insert(record.gtid.as_bytes(), codec::encode(record))
            .map_err(|e| self.shared.latch(e))?;
        Ok(())
    }

    fn force(&self) -> ForceFuture {
        if let Err(e) = self.shared.check() {
            return Box::pin(std::future::ready(Err(e)));
        }
        let (tx, rx) = oneshot::channel();
        let queued = self.queue.as_ref().is_some_and(|q| q.send(tx).is_ok());
        Box::pin(async move {
            if !queued {
                return Err(LogError::Halted("group-commit thread stopped".into()));
            }
            rx.await
                .unwrap_or_else(|_| Err(LogError::Halted("group-commit thread stopped".into())))
        })
    }

    fn get(&self, gtid: &Gtid) -> Result<Option<TxnRecord>, LogError> {
        self.shared.check()?;
        match self
            .txns
            .get(gtid.as_bytes())
            .map_err(|e| self.shared.latch(e))?
        {
            Some(v) => Ok(Some(self.decode(gtid.as_bytes(), &v)?)),
            None => Ok(None),
        }
    }

    fn scan(
        &self,
        after: Option<&Gtid>,
        states: &[TxState],
        limit: usize,
    ) -> Result<Vec<TxnRecord>, LogError> {
        use std::ops::Bound;
        self.shared.check()?;
        let lower = after.map_or(Bound::Unbounded, |g| Bound::Excluded(g.as_bytes().to_vec()));
        let mut out = Vec::new();
        for item in self.txns.range::<Vec<u8>, _>((lower, Bound::Unbounded)) {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item.map_err(|e| self.shared.latch(e))?;
            let rec = self.decode(&k, &v)?;
            if states.is_empty() || states.contains(&rec.state) {
                out.push(rec);
            }
        }
        Ok(out)
    }

    fn stats(&self) -> LogStats {
        LogStats {
            forces: self.shared.forces.load(Ordering::Relaxed),
            flushes: self.shared.flushes.load(Ordering::Relaxed),
        }
    }
}

impl Drop for SledLog {
    fn drop(&mut self) {
        // Closing the queue ends the group-commit thread; join it so that the
        // directory can be reopened as soon as this value is gone.
        drop(self.queue.take());
        if let Some(t) = self.flusher.take() {
            let _ = t.join();
        }
        if let Err(e) = self.db.flush() {
            tracing::warn!(error = %e, "final flush of the transaction log failed");
        }
    }
}

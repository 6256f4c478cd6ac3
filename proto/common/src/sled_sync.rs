//! [`SledSync`]: makes writes to a sled 0.34 database durable, with group
//! commit. The coordinator's transaction log and the participant barrier
//! (the SDK's `SledBarrier`) both use it, and so can a
//! participant keeping its business state in sled.
//!
//! # Why sled's own flush is not enough
//!
//! Two facts about sled 0.34.7 (both measured on Linux):
//!
//! - `Tree::flush_async()` called from many tasks at once deadlocks (sled
//!   issue #1308), so only one thread ever flushes.
//! - `Db::flush()` writes its buffers and ends in `sync_file_range`, which
//!   flushes neither the device's write cache nor file metadata: a power loss
//!   can still lose "flushed" data. So after `flush()` comes `fdatasync` on
//!   sled's data file (`<dir>/db`).
//!
//! sled also writes items too large for a log segment (a big value, or a
//! consolidated page holding several) to separate files under `blobs/`,
//! which its flush never syncs. So each round also `fsync`s every blob file
//! not synced before, and the `blobs/` directory.
//!
//! One thread owns all of it: [`SledSync::sync`] enqueues a waiter; the
//! thread takes every waiter queued so far, runs one flush + blob sync +
//! `fdatasync` for all of them, and answers the batch. Concurrent callers
//! therefore share one physical flush. A failure latches: every later call
//! fails too, since a disk that failed once cannot be trusted.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;

use tokio::sync::oneshot;

/// A failed or refused sync.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SyncError {
    /// The flush or an fsync failed now.
    #[error("sled storage failed: {0}")]
    Storage(String),
    /// An earlier failure latched this database; nothing is written since.
    #[error("sled storage halted after an earlier failure: {0}")]
    Halted(String),
}

/// Counters, for benchmarks and the demo.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncStats {
    /// Calls to [`SledSync::sync`] answered.
    pub syncs: u64,
    /// Physical flush + `fdatasync` rounds run for them.
    pub flushes: u64,
}

type Waiter = oneshot::Sender<Result<(), SyncError>>;

/// What the owner of a database does around each group-commit round (the
/// coordinator's log keeps its forced high-water mark this way).
pub trait SyncHooks: Send + 'static {
    /// Runs before the flush; whatever it writes to the database is made
    /// durable by this round. An `Err` fails the round and latches.
    fn before_flush(&mut self, db: &sled::Db) -> Result<(), String>;
    /// Runs once the round is durable.
    fn after_sync(&mut self);
}

/// The group-commit thread of one sled database. Dropping it joins the
/// thread.
pub struct SledSync {
    shared: Arc<Shared>,
    queue: Option<mpsc::Sender<Waiter>>,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    halted: Mutex<Option<String>>,
    syncs: AtomicU64,
    flushes: AtomicU64,
}

impl SledSync {
    /// Starts the group-commit thread for `db`, which sled opened at `dir`.
    ///
    /// # Errors
    ///
    /// sled's data file cannot be opened, or the thread cannot start.
    pub fn start(db: &sled::Db, dir: &Path) -> std::io::Result<SledSync> {
        Self::start_with_hooks(db, dir, None)
    }

    /// As [`SledSync::start`], running `hooks` around every round.
    ///
    /// # Errors
    ///
    /// sled's data file cannot be opened, or the thread cannot start.
    pub fn start_with_hooks(
        db: &sled::Db,
        dir: &Path,
        hooks: Option<Box<dyn SyncHooks>>,
    ) -> std::io::Result<SledSync> {
        // sled 0.34 keeps everything in one file named `db` in its directory.
        let file = File::options()
            .read(true)
            .write(true)
            .open(dir.join("db"))?;
        let shared = Arc::new(Shared {
            halted: Mutex::new(None),
            syncs: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
        });
        let (queue, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("tandem-sled-sync".into())
            .spawn({
                let (db, shared) = (db.clone(), shared.clone());
                let blobs = BlobSync::new(dir.join("blobs"));
                move || group_commit(db, file, blobs, shared, rx, hooks)
            })?;
        Ok(SledSync {
            shared,
            queue: Some(queue),
            thread: Some(thread),
        })
    }

    /// Resolves once every write made to the database before this call is on
    /// stable storage.
    pub fn sync(&self) -> impl Future<Output = Result<(), SyncError>> + Send + 'static {
        let checked = self.check();
        let (tx, rx) = oneshot::channel();
        let queued = checked.is_ok() && self.queue.as_ref().is_some_and(|q| q.send(tx).is_ok());
        async move {
            checked?;
            let stopped = || SyncError::Halted("group-commit thread stopped".into());
            if !queued {
                return Err(stopped());
            }
            rx.await.unwrap_or_else(|_| Err(stopped()))
        }
    }

    /// `Err` once a failure latched this database.
    ///
    /// # Errors
    ///
    /// [`SyncError::Halted`] with the first failure.
    pub fn check(&self) -> Result<(), SyncError> {
        self.shared.check()
    }

    /// Latches a failure seen by the caller (a failed sled write, say), so
    /// that nothing more is trusted; returns the error to report.
    pub fn halt(&self, err: impl std::fmt::Display) -> SyncError {
        self.shared.latch(err)
    }

    /// Counters so far.
    pub fn stats(&self) -> SyncStats {
        SyncStats {
            syncs: self.shared.syncs.load(Ordering::Relaxed),
            flushes: self.shared.flushes.load(Ordering::Relaxed),
        }
    }
}

impl Drop for SledSync {
    fn drop(&mut self) {
        // Closing the queue ends the thread; join it so the directory can be
        // reopened as soon as the owner is gone.
        drop(self.queue.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Shared {
    fn check(&self) -> Result<(), SyncError> {
        match &*self.halted.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(why) => Err(SyncError::Halted(why.clone())),
            None => Ok(()),
        }
    }

    fn latch(&self, err: impl std::fmt::Display) -> SyncError {
        let mut halted = self.halted.lock().unwrap_or_else(|p| p.into_inner());
        let why = halted.get_or_insert_with(|| err.to_string()).clone();
        tracing::error!(error = %why, "sled storage failed; refusing further writes");
        SyncError::Storage(why)
    }
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

/// Whether an I/O error is a passing shortage of the process or the
/// machine (file descriptors, memory) rather than a failure of the disk:
/// such errors are retried, never latched.
pub fn is_resource_shortage(e: &std::io::Error) -> bool {
    // EAGAIN 11, ENOMEM 12, ENFILE 23, EMFILE 24 (Linux).
    matches!(e.raw_os_error(), Some(11 | 12 | 23 | 24))
}

/// Syncs new blob files, retrying a resource shortage (EMFILE and the like)
/// with a growing pause rather than latching; other errors latch.
fn sync_blobs(blobs: &mut BlobSync, shared: &Shared) -> Result<(), SyncError> {
    let mut pause = std::time::Duration::from_millis(10);
    loop {
        match blobs.sync_new() {
            Ok(()) => return Ok(()),
            Err(e) if is_resource_shortage(&e) => {
                tracing::warn!(error = %e, "blob sync short of resources; retrying");
                std::thread::sleep(pause);
                pause = (pause * 2).min(std::time::Duration::from_secs(1));
            }
            Err(e) => return Err(shared.latch(e)),
        }
    }
}

/// The loop: wait for one waiter, take all queued ones, flush and fdatasync
/// once, answer them all. Ends when the [`SledSync`] is dropped.
fn group_commit(
    db: sled::Db,
    file: File,
    mut blobs: BlobSync,
    shared: Arc<Shared>,
    rx: mpsc::Receiver<Waiter>,
    mut hooks: Option<Box<dyn SyncHooks>>,
) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        batch.extend(rx.try_iter());
        let result = shared.check().and_then(|()| {
            if let Some(h) = hooks.as_mut() {
                h.before_flush(&db).map_err(|e| shared.latch(e))?;
            }
            db.flush().map_err(|e| shared.latch(e))?;
            sync_blobs(&mut blobs, &shared)?;
            file.sync_data().map_err(|e| shared.latch(e))?;
            shared.flushes.fetch_add(1, Ordering::Relaxed);
            if let Some(h) = hooks.as_mut() {
                h.after_sync();
            }
            Ok(())
        });
        shared
            .syncs
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        for waiter in batch {
            // The waiter may have given up (its request was cancelled).
            let _ = waiter.send(result.clone());
        }
    }
}

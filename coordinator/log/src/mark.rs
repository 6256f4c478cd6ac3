//! The forced high-water mark: how a damaged log is told from a healthy one.
//!
//! sled stops reading its data file at the first bad checksum and says
//! nothing: a log with garbage in the middle, or truncated, or emptied,
//! opens with fewer records. So every group-commit round (every physical
//! force) numbers itself: before the flush it writes its round number into
//! sled (`meta` tree, key `forced_round`), and once the round is durable it
//! writes the same number into a small file beside sled's, `tandem.mark`.
//! The mark is written only after sled's data is on disk, so it is never
//! ahead of a healthy log. At open, sled's round behind the mark means sled
//! lost forced writes. The mark file is a plain write each round (the page
//! cache keeps it across a process crash) and is fsynced at most once a
//! second and on close: after a power loss it may be a little behind,
//! which only weakens the check, never fails a healthy log.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tandem_common::sled_sync::SyncHooks;

/// Name of the mark file in the data directory.
pub const MARK_FILE: &str = "tandem.mark";
/// sled tree and key holding the last round flushed.
pub(super) const META_TREE: &str = "meta";
pub(super) const ROUND_KEY: &[u8] = b"forced_round";

const MAGIC: &[u8; 8] = b"TNDMMRK1";
const LEN: usize = 24;

/// FNV-1a: enough to tell a torn or overwritten mark from a written one.
fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn encode(round: u64) -> [u8; LEN] {
    let mut buf = [0u8; LEN];
    buf[..8].copy_from_slice(MAGIC);
    buf[8..16].copy_from_slice(&round.to_le_bytes());
    let sum = checksum(&buf[..16]);
    buf[16..].copy_from_slice(&sum.to_le_bytes());
    buf
}

/// Reads the mark in `dir`: `Ok(None)` when there is none (a new log, or
/// one from before marks existed: sled holds no round then either; one
/// that does has lost its mark, which the check reports as damage).
///
/// # Errors
///
/// The file exists but cannot be read or is not a mark.
pub fn read(dir: &Path) -> Result<Option<u64>, String> {
    let path = dir.join(MARK_FILE);
    let mut file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let mut buf = Vec::new();
    file.read_to_end(&mut buf)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if buf.len() != LEN || &buf[..8] != MAGIC {
        return Err(format!("{} is not a Tandem mark file", path.display()));
    }
    let sum = u64::from_le_bytes(buf[16..].try_into().unwrap_or_default());
    if sum != checksum(&buf[..16]) {
        return Err(format!("{} is damaged (bad checksum)", path.display()));
    }
    Ok(Some(u64::from_le_bytes(
        buf[8..16].try_into().unwrap_or_default(),
    )))
}

/// Writes `round` as the mark in `dir` and syncs it (used at open).
///
/// # Errors
///
/// The file cannot be written.
pub fn write_synced(dir: &Path, round: u64) -> std::io::Result<()> {
    let file = open_mark(&dir.join(MARK_FILE))?;
    file.write_all_at(&encode(round), 0)?;
    file.sync_all()?;
    if let Ok(d) = File::open(dir) {
        d.sync_all()?;
    }
    Ok(())
}

fn open_mark(path: &PathBuf) -> std::io::Result<File> {
    File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
}

/// sled's last flushed round (0 when it has none).
pub(super) fn sled_round(db: &sled::Db) -> Result<u64, String> {
    let meta = db.open_tree(META_TREE).map_err(|e| e.to_string())?;
    match meta.get(ROUND_KEY).map_err(|e| e.to_string())? {
        None => Ok(0),
        Some(v) => v
            .as_ref()
            .try_into()
            .map(u64::from_be_bytes)
            .map_err(|_| "sled's forced round is malformed".to_string()),
    }
}

/// The group-commit hooks that number the rounds.
pub(super) struct MarkHooks {
    meta: sled::Tree,
    file: File,
    round: u64,
    last_sync: Instant,
    unsynced: bool,
}

impl MarkHooks {
    pub(super) fn new(db: &sled::Db, dir: &Path, round: u64) -> std::io::Result<MarkHooks> {
        let meta = db.open_tree(META_TREE).map_err(std::io::Error::other)?;
        Ok(MarkHooks {
            meta,
            file: open_mark(&dir.join(MARK_FILE))?,
            round,
            last_sync: Instant::now(),
            unsynced: false,
        })
    }
}

impl SyncHooks for MarkHooks {
    fn before_flush(&mut self, _db: &sled::Db) -> Result<(), String> {
        self.meta
            .insert(ROUND_KEY, &(self.round + 1).to_be_bytes())
            .map(drop)
            .map_err(|e| format!("cannot number a forced round: {e}"))
    }

    fn after_sync(&mut self) {
        self.round += 1;
        // A failed mark write only weakens the check; the data is durable.
        if let Err(e) = self.file.write_all_at(&encode(self.round), 0) {
            tracing::warn!(error = %e, "cannot update the log's forced mark");
            return;
        }
        self.unsynced = true;
        if self.last_sync.elapsed() >= Duration::from_secs(1) {
            let _ = self.file.sync_data();
            self.last_sync = Instant::now();
            self.unsynced = false;
        }
    }
}

impl Drop for MarkHooks {
    fn drop(&mut self) {
        if self.unsynced {
            let _ = self.file.sync_data();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // A mark round-trips; a torn or foreign file is reported, not guessed.
    #[test]
    fn mark_file_round_trips_and_rejects_damage() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(read(dir.path()).expect("none"), None);
        write_synced(dir.path(), 42).expect("write");
        assert_eq!(read(dir.path()).expect("read"), Some(42));
        let path = dir.path().join(MARK_FILE);
        let mut bytes = std::fs::read(&path).expect("bytes");
        bytes[9] ^= 0xff;
        std::fs::write(&path, &bytes).expect("damage");
        assert!(read(dir.path()).unwrap_err().contains("bad checksum"));
        std::fs::write(&path, b"hello").expect("foreign");
        assert!(read(dir.path()).unwrap_err().contains("not a Tandem mark"));
    }
}

//! [`SledLog`]: the default, embedded transaction log on sled 0.34.
//!
//! Durability comes from [`SledSync`]: sled's own flush is not enough
//! (`flush_async` deadlocks under concurrency, `flush` ends in
//! `sync_file_range`, oversized items land in unsynced `blob/` files), so a
//! group-commit thread runs `flush()`, syncs new blob files, and
//! `fdatasync`s sled's data file, once for every waiting [`TxnLog::force`].
//! Concurrent decisions therefore share one physical flush. See the
//! `tandem_common::sled_sync` docs for the measurements behind this.
//!
//! Large payloads live in their own tree, written once per branch, and
//! segments are 8 MiB, so blobs are rare and the record rewritten on each
//! state change stays small.
//!
//! Layout: tree `txns` maps the 16 gtid bytes to the encoded record, with
//! payloads of at most 512 bytes inside it; tree `payloads` maps gtid ++
//! branch id (big-endian u32) to each larger payload, written once when the
//! branch first appears. Retention's [`TxnLog::purge`] keeps tombstones in
//! tree `decisions` (gtid → [`super::Tombstone`]) and the [`Horizon`] in
//! tree `horizon`, changed with the removal in one sled transaction (sled
//! recovers a transaction whole or not at all).
//!
//! In memory, [`Unfinished`] holds the gtids of unfinished records, built
//! by the check at open: scans for unfinished states (recovery, the STUCK
//! census, `tx list --state active`) read those records only.

use std::path::Path;

use bytes::Bytes;
use tandem_common::sled_sync::{SledSync, SyncError};

use super::check::{self, LogReport};
use super::mark::{self, MarkHooks};
use super::tombstone::{self, purged_horizon};
use super::unfinished::Unfinished;
use super::{ForceFuture, Horizon, LogError, LogStats, Purge, Tombstone, TxnLog, codec};
use crate::model::{Gtid, TxState, TxnRecord};

/// The sled-backed log. Open one per data directory.
pub struct SledLog {
    db: sled::Db,
    txns: sled::Tree,
    payloads: sled::Tree,
    /// Tombstones of compacted transactions.
    decisions: sled::Tree,
    /// The horizon, under [`HORIZON_KEY`].
    horizon: sled::Tree,
    /// The gtids of unfinished records (recovery, census and listing of
    /// unfinished states read only these).
    unfinished: Unfinished,
    /// `None` only while dropping.
    sync: Option<SledSync>,
}

impl From<SyncError> for LogError {
    fn from(e: SyncError) -> Self {
        match e {
            SyncError::Storage(why) => LogError::Storage(why),
            SyncError::Halted(why) => LogError::Halted(why),
        }
    }
}

impl SledLog {
    /// Decodes up to `limit` records of `range` whose state is in
    /// `states` (all when empty), filtering on the state alone first.
    fn collect(
        &self,
        range: impl Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>,
        states: &[TxState],
        limit: usize,
    ) -> Result<Vec<TxnRecord>, LogError> {
        let mut out = Vec::new();
        for item in range {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item.map_err(|e| self.latch(e))?;
            if !states.is_empty() && codec::peek_state(&v).is_some_and(|s| !states.contains(&s)) {
                continue;
            }
            let rec = self.decode(&k, &v)?;
            if states.is_empty() || states.contains(&rec.state) {
                out.push(rec);
            }
        }
        Ok(out)
    }

    /// As [`SledLog::collect`] for unfinished `states` only: reads the
    /// records the [`Unfinished`] set names, from `from` on (or back).
    fn collect_unfinished(
        &self,
        from: Option<&Gtid>,
        back: bool,
        states: &[TxState],
        limit: usize,
    ) -> Result<Vec<TxnRecord>, LogError> {
        const CHUNK: usize = 256;
        let mut out = Vec::new();
        let mut cursor = from.copied();
        while out.len() < limit {
            let gtids = self.unfinished.page(cursor.as_ref(), back, CHUNK);
            let Some(last) = gtids.last() else { break };
            cursor = Some(*last);
            for gtid in &gtids {
                if out.len() >= limit {
                    break;
                }
                let Some(v) = self.txns.get(gtid.as_bytes()).map_err(|e| self.latch(e))? else {
                    continue;
                };
                if codec::peek_state(&v).is_some_and(|s| !states.contains(&s)) {
                    continue;
                }
                let rec = self.decode(gtid.as_bytes(), &v)?;
                if states.contains(&rec.state) {
                    out.push(rec);
                }
            }
        }
        Ok(out)
    }

    /// Largest branch payload this log accepts; the coordinator's
    /// `max_payload_bytes` may not exceed it. Bounded so that a transaction's
    /// payloads fit the 64 MiB gRPC messages the services accept.
    pub const MAX_PAYLOAD_BYTES: usize = 16 * 1024 * 1024;

    const SEGMENT_SIZE: usize = 8 * 1024 * 1024;
    const CACHE_BYTES: u64 = 16 * 1024 * 1024;

    /// Opens (creating if needed) the log in `dir`, refusing a damaged one.
    ///
    /// # Errors
    ///
    /// [`LogError::Storage`] if the directory cannot be created or sled cannot
    /// open it (for example another process holds it); [`LogError::Damaged`]
    /// when a record does not decode or sled holds fewer forced writes than
    /// the mark says it was given (see [`super::mark`]).
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, LogError> {
        Self::open_with(dir, false).map(|(log, _)| log)
    }

    /// As [`SledLog::open`]; with `accept_damage`, a damaged log is opened
    /// anyway: undecodable records are moved to the `quarantine` tree and
    /// every gtid concerned is logged, and the mark is reset to what sled
    /// holds. Returns what the check found.
    ///
    /// # Errors
    ///
    /// As [`SledLog::open`] (without `Damaged` when `accept_damage`).
    pub fn open_with(
        dir: impl AsRef<Path>,
        accept_damage: bool,
    ) -> Result<(Self, LogReport), LogError> {
        let dir = dir.as_ref();
        let storage = |what: &str, e: &dyn std::fmt::Display| {
            LogError::Storage(format!("{what} {}: {e}", dir.display()))
        };
        std::fs::create_dir_all(dir).map_err(|e| storage("cannot create", &e))?;
        let mut report = LogReport {
            dir: dir.to_path_buf(),
            ..LogReport::default()
        };
        match mark::read(dir) {
            Ok(m) => report.mark = m,
            Err(e) => report.mark_error = Some(e),
        }
        let db = open_sled(dir).map_err(|e| match e {
            sled::Error::Corruption { .. } => LogError::Damaged(format!(
                "the transaction log in {} is damaged: sled cannot open it ({e}). Tandem \
                 will not serve from it: a lost commit decision would be answered ABORT. \
                 Restore the directory from a backup (--accept-log-damage cannot help: \
                 nothing of it can be read)",
                dir.display()
            )),
            e => storage("cannot open sled log in", &e),
        })?;
        let tree = |name: &str| db.open_tree(name).map_err(|e| storage("cannot open", &e));
        let (txns, payloads) = (tree("txns")?, tree("payloads")?);
        let (decisions, horizon) = (tree("decisions")?, tree("horizon")?);
        report.sled_round = mark::sled_round(&db).map_err(LogError::Storage)?;
        let mut unfinished = std::collections::BTreeSet::new();
        check::inspect(&txns, &payloads, &mut report, &mut unfinished);
        if report.is_damaged() {
            if !accept_damage {
                return Err(LogError::Damaged(report.refusal()));
            }
            quarantine(&db, &txns, &report).map_err(|e| storage("cannot quarantine in", &e))?;
            // Durable before anything is served: a crash right after must
            // not bring the undecodable record back.
            db.flush().map_err(|e| storage("cannot flush", &e))?;
        }
        // From here on the mark and sled agree.
        let round = report.sled_round.max(report.mark.unwrap_or(0));
        if report.mark != Some(round) || report.sled_round != round {
            tree(mark::META_TREE)?
                .insert(mark::ROUND_KEY, &round.to_be_bytes())
                .map_err(|e| storage("cannot write the forced round in", &e))?;
            db.flush().map_err(|e| storage("cannot flush", &e))?;
            mark::write_synced(dir, round).map_err(|e| storage("cannot write the mark in", &e))?;
        }
        let hooks =
            MarkHooks::new(&db, dir, round).map_err(|e| storage("cannot open the mark in", &e))?;
        let sync = SledSync::start_with_hooks(&db, dir, Some(Box::new(hooks)))
            .map_err(|e| storage("cannot start the group commit of", &e))?;
        Ok((
            SledLog {
                db,
                txns,
                payloads,
                decisions,
                horizon,
                // A read error the check stopped at (opened anyway with
                // accept_damage) leaves the set partial: scans read all.
                unfinished: Unfinished::new(unfinished, report.read_error.is_none()),
                sync: Some(sync),
            },
            report,
        ))
    }

    /// The sled settings of a Tandem log (also used to open it for a check).
    pub(super) fn sled_config(dir: &Path) -> sled::Config {
        sled::Config::new()
            .path(dir)
            .segment_size(Self::SEGMENT_SIZE)
            // Bounded page cache: memory stays flat however big the log.
            .cache_capacity(Self::CACHE_BYTES)
            // Reclaim the space of removed records eagerly: with retention
            // purging continuously, the data dir must not keep growing.
            .mode(sled::Mode::LowSpace)
    }

    fn sync(&self) -> &SledSync {
        self.sync.as_ref().expect("present until drop")
    }

    fn latch(&self, e: sled::Error) -> LogError {
        self.sync().halt(e).into()
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
                .map_err(|e| self.latch(e))?;
            Ok(stored.map(|v| Bytes::copy_from_slice(&v)))
        })
    }
}

/// Opens sled in `dir`, waiting up to a second for its lock file: a log
/// of this process dropped a moment ago may still hold it while sled's
/// own threads finish (a restart in place, or a test reopening). Another
/// process holding it is refused after that second.
fn open_sled(dir: &Path) -> sled::Result<sled::Db> {
    let mut waited = std::time::Duration::ZERO;
    loop {
        match SledLog::sled_config(dir).open() {
            // sled 0.34 reports its lock as an `Other` error naming it.
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && waited < std::time::Duration::from_secs(1) =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
                waited += std::time::Duration::from_millis(20);
            }
            other => return other,
        }
    }
}

/// Moves every undecodable record to the quarantine tree, logging each,
/// and logs what a log behind its mark lost. The horizon is raised over
/// every quarantined gtid: its outcome is no longer known (GetOutcome
/// answers so, never presumed ABORT: it may have been a commit) and it is
/// never started again.
fn quarantine(db: &sled::Db, txns: &sled::Tree, report: &LogReport) -> sled::Result<()> {
    let aside = db.open_tree(check::QUARANTINE_TREE)?;
    let mut newest = 0u64;
    for (key, why) in &report.undecodable {
        let Ok(gtid) = key.parse::<Gtid>() else {
            tracing::error!(key = %key, why = %why, "log damage: a record with a bad key is left in place");
            continue;
        };
        if let Some(bytes) = txns.get(gtid.as_bytes())? {
            aside.insert(gtid.as_bytes(), bytes)?;
            txns.remove(gtid.as_bytes())?;
        }
        newest = newest.max(tombstone::gtid_ms(&gtid).unwrap_or(0));
        tracing::error!(%gtid, why = %why, "log damage: record quarantined; its participants must be resolved by hand");
    }
    if newest > 0 {
        let tree = db.open_tree("horizon")?;
        let stored = tree
            .get(HORIZON_KEY)?
            .and_then(|b| Horizon::decode(&b))
            .unwrap_or_default();
        let raised = stored.max(Horizon {
            purged_ms: newest,
            forgotten_ms: newest,
        });
        tree.insert(HORIZON_KEY, raised.encode().to_vec())?;
    }
    for problem in report.problems() {
        tracing::error!(%problem, "log damage accepted (--accept-log-damage)");
    }
    Ok(())
}

const HORIZON_KEY: &[u8] = b"horizon";

/// A sled transaction's failure as a log error (the log latches).
fn tx_failed(e: sled::transaction::TransactionError<()>) -> sled::Error {
    match e {
        sled::transaction::TransactionError::Storage(e) => e,
        sled::transaction::TransactionError::Abort(()) => {
            sled::Error::Unsupported("transaction aborted".into())
        }
    }
}

impl SledLog {
    fn stored_horizon(&self) -> Result<Horizon, LogError> {
        let bytes = self.horizon.get(HORIZON_KEY).map_err(|e| self.latch(e))?;
        match bytes {
            None => Ok(Horizon::default()),
            Some(b) => Horizon::decode(&b).ok_or_else(|| LogError::Corrupt {
                gtid: "horizon".into(),
                detail: format!("{} bytes, expected 16", b.len()),
            }),
        }
    }

    /// Removes the payloads of `gtid` stored apart (after its record).
    fn remove_payloads(&self, gtid: &Gtid) -> Result<(), LogError> {
        for item in self.payloads.scan_prefix(gtid.as_bytes()) {
            let (key, _) = item.map_err(|e| self.latch(e))?;
            self.payloads.remove(key).map_err(|e| self.latch(e))?;
        }
        Ok(())
    }
}

fn payload_key(gtid: &Gtid, branch: u32) -> [u8; 20] {
    let mut key = [0u8; 20];
    key[..16].copy_from_slice(gtid.as_bytes());
    key[16..].copy_from_slice(&branch.to_be_bytes());
    key
}

impl TxnLog for SledLog {
    /// Only a database an earlier process wrote can have lost its writes.
    fn may_have_lost_starts(&self) -> bool {
        self.db.was_recovered()
    }

    fn write(&self, record: &TxnRecord) -> Result<(), LogError> {
        self.sync().check()?;
        for b in record
            .branches
            .iter()
            .filter(|b| codec::stored_apart(&b.payload))
        {
            let key = payload_key(&record.gtid, b.id);
            // Payloads never change; store each once (before the record that
            // names it, so a reader never sees a branch without its payload).
            if !self.payloads.contains_key(key).map_err(|e| self.latch(e))? {
                self.payloads
                    .insert(key, b.payload.as_ref())
                    .map_err(|e| self.latch(e))?;
            }
        }
        let _one = self.unfinished.writing(&record.gtid);
        self.unfinished.before_write(record.gtid, record.state);
        self.txns
            .insert(record.gtid.as_bytes(), codec::encode(record))
            .map_err(|e| self.latch(e))?;
        self.unfinished.after_write(&record.gtid, record.state);
        Ok(())
    }

    fn force(&self) -> ForceFuture {
        let synced = self.sync().sync();
        Box::pin(async move { Ok(synced.await?) })
    }

    fn remove(&self, gtid: &Gtid) -> Result<(), LogError> {
        self.sync().check()?;
        // The record first: a reader never sees a branch without its payload.
        let one = self.unfinished.writing(gtid);
        let removed = self
            .txns
            .remove(gtid.as_bytes())
            .map_err(|e| self.latch(e))?;
        self.unfinished.removed(gtid);
        drop(one);
        if removed.is_some_and(|bytes| codec::has_payloads_apart(&bytes)) {
            self.remove_payloads(gtid)?;
        }
        Ok(())
    }

    fn compacts(&self) -> bool {
        true
    }

    fn purge(&self, purges: &[Purge]) -> Result<(), LogError> {
        use sled::Transactional;
        self.sync().check()?;
        let raise = purged_horizon(purges);
        let removed = (&self.txns, &self.decisions, &self.horizon)
            .transaction(|(txns, decisions, horizon)| {
                for p in purges {
                    if let Some(t) = &p.tombstone {
                        decisions.insert(t.gtid.as_bytes(), tombstone::encode(t))?;
                    }
                }
                let old = horizon.get(HORIZON_KEY)?;
                let old = old.and_then(|b| Horizon::decode(&b)).unwrap_or_default();
                horizon.insert(HORIZON_KEY, &old.max(raise).encode()[..])?;
                let mut removed = Vec::new();
                for p in purges {
                    let key = p.gtid.as_bytes();
                    let finished = txns
                        .get(key)?
                        .is_some_and(|v| codec::peek_state(&v).is_some_and(|s| s.is_terminal()));
                    if finished && let Some(bytes) = txns.remove(key)? {
                        removed.push((p.gtid, codec::has_payloads_apart(&bytes)));
                    }
                }
                Ok(removed)
            })
            .map_err(|e| self.latch(tx_failed(e)))?;
        for (gtid, apart) in removed {
            if apart {
                self.remove_payloads(&gtid)?;
            }
        }
        Ok(())
    }

    fn tombstone(&self, gtid: &Gtid) -> Result<Option<Tombstone>, LogError> {
        self.sync().check()?;
        let bytes = self
            .decisions
            .get(gtid.as_bytes())
            .map_err(|e| self.latch(e))?;
        bytes
            .map(|b| {
                tombstone::decode(*gtid, &b).ok_or_else(|| LogError::Corrupt {
                    gtid: gtid.to_string(),
                    detail: "the decision tombstone does not decode".into(),
                })
            })
            .transpose()
    }

    fn horizon(&self) -> Result<Horizon, LogError> {
        self.sync().check()?;
        self.stored_horizon()
    }

    fn expire_tombstones(&self, finished_before_ms: u64, limit: usize) -> Result<usize, LogError> {
        use sled::Transactional;
        self.sync().check()?;
        let mut gone = Vec::new();
        for item in self.decisions.iter() {
            if gone.len() >= limit {
                break;
            }
            let (k, v) = item.map_err(|e| self.latch(e))?;
            let Ok(gtid) = Gtid::from_slice(&k) else {
                continue;
            };
            // One that does not decode is kept (and reported by reads).
            if tombstone::decode(gtid, &v).is_some_and(|t| t.finished_ms < finished_before_ms) {
                gone.push(gtid);
            }
        }
        if gone.is_empty() {
            return Ok(0);
        }
        let forgotten_ms = gone.iter().filter_map(super::gtid_ms).max().unwrap_or(0);
        (&self.decisions, &self.horizon)
            .transaction(|(decisions, horizon)| {
                let old = horizon.get(HORIZON_KEY)?;
                let old = old.and_then(|b| Horizon::decode(&b)).unwrap_or_default();
                let new = old.max(Horizon {
                    purged_ms: 0,
                    forgotten_ms,
                });
                horizon.insert(HORIZON_KEY, &new.encode()[..])?;
                for g in &gone {
                    decisions.remove(g.as_bytes())?;
                }
                Ok(())
            })
            .map_err(|e| self.latch(tx_failed(e)))?;
        Ok(gone.len())
    }

    fn get(&self, gtid: &Gtid) -> Result<Option<TxnRecord>, LogError> {
        self.sync().check()?;
        match self.txns.get(gtid.as_bytes()).map_err(|e| self.latch(e))? {
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
        self.sync().check()?;
        if self.unfinished.complete() && Unfinished::covers(states) {
            return self.collect_unfinished(after, false, states, limit);
        }
        let lower = after.map_or(Bound::Unbounded, |g| Bound::Excluded(g.as_bytes().to_vec()));
        let range = self.txns.range::<Vec<u8>, _>((lower, Bound::Unbounded));
        self.collect(range, states, limit)
    }

    fn scan_back(
        &self,
        before: Option<&Gtid>,
        states: &[TxState],
        limit: usize,
    ) -> Result<Vec<TxnRecord>, LogError> {
        use std::ops::Bound;
        self.sync().check()?;
        if self.unfinished.complete() && Unfinished::covers(states) {
            return self.collect_unfinished(before, true, states, limit);
        }
        let upper = before.map_or(Bound::Unbounded, |g| Bound::Excluded(g.as_bytes().to_vec()));
        let range = self.txns.range::<Vec<u8>, _>((Bound::Unbounded, upper));
        self.collect(range.rev(), states, limit)
    }

    fn stats(&self) -> LogStats {
        let stats = self.sync().stats();
        LogStats {
            forces: stats.syncs,
            flushes: stats.flushes,
            ..LogStats::default()
        }
    }
}

impl Drop for SledLog {
    fn drop(&mut self) {
        // Join the group-commit thread first, so that the directory can be
        // reopened as soon as this value is gone.
        drop(self.sync.take());
        if let Err(e) = self.db.flush() {
            tracing::warn!(error = %e, "final flush of the transaction log failed");
        }
    }
}

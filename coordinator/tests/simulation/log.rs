//! The simulated disk and the log over it.
//!
//! [`Disk`] is what survives a crash; a [`SimLog`] is one coordinator
//! incarnation's view: writes land in its memory and reach the disk only
//! through a `force` that succeeds. Forces can stall (tokio time) and fail
//! (the log latches, as `SledLog` does). At a crash every record keeps
//! either its durable version or, at random, its latest written one — the
//! [`TxnLog`] contract allows both (sled's own periodic flush writes
//! unforced data too).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tandem_coordinator::log::{ForceFuture, LogError, TxnLog};
use tandem_coordinator::model::{Gtid, TxState, TxnRecord};

use crate::rng::Rng;

type Versions = BTreeMap<Gtid, (u64, TxnRecord)>;

/// Durable state: outlives every incarnation.
#[derive(Default)]
pub struct Disk {
    records: Mutex<Versions>,
    /// How many incarnations opened it.
    opened: AtomicU64,
}

impl Disk {
    /// A copy of what is durable now.
    pub fn durable(&self) -> Versions {
        self.records.lock().unwrap().clone()
    }

    /// The durable record of `gtid`.
    pub fn get(&self, gtid: &Gtid) -> Option<TxnRecord> {
        self.records
            .lock()
            .unwrap()
            .get(gtid)
            .map(|(_, r)| r.clone())
    }

    fn merge(&self, newer: &Versions) {
        let mut records = self.records.lock().unwrap();
        for (gtid, (seq, rec)) in newer {
            if records.get(gtid).is_none_or(|(s, _)| s < seq) {
                records.insert(*gtid, (*seq, rec.clone()));
            }
        }
    }
}

/// How the log misbehaves.
#[derive(Default)]
pub struct LogFaults {
    /// Faults happen only while this is set.
    pub on: AtomicBool,
    /// Per-mille chance that a force fails.
    pub fail_permille: AtomicU64,
    /// Per-mille chance that a force stalls (up to 2 s).
    pub stall_permille: AtomicU64,
}

/// One incarnation's log.
pub struct SimLog {
    disk: Arc<Disk>,
    volatile: Mutex<Versions>,
    seq: AtomicU64,
    /// Whether an earlier incarnation used the disk (and may have lost
    /// writes it never forced).
    reopened: bool,
    failed: Arc<Mutex<Option<String>>>,
    crashed: Arc<AtomicBool>,
    faults: Arc<LogFaults>,
    rng: Arc<Mutex<Rng>>,
}

impl SimLog {
    /// A log over `disk`, starting from what is durable.
    pub fn open(disk: Arc<Disk>, faults: Arc<LogFaults>, rng: Arc<Mutex<Rng>>) -> Arc<SimLog> {
        let volatile = disk.durable();
        let seq = volatile.values().map(|(s, _)| *s).max().unwrap_or(0);
        let reopened = disk.opened.fetch_add(1, Ordering::SeqCst) > 0;
        Arc::new(SimLog {
            reopened,
            disk,
            volatile: Mutex::new(volatile),
            seq: AtomicU64::new(seq),
            failed: Arc::new(Mutex::new(None)),
            crashed: Arc::new(AtomicBool::new(false)),
            faults,
            rng,
        })
    }

    /// The process dies: nothing more reaches the disk from this log, and
    /// each record written but not forced survives or not, at random.
    pub fn crash(&self) {
        self.crashed.store(true, Ordering::SeqCst);
        let volatile = self.volatile.lock().unwrap().clone();
        let durable = self.disk.durable();
        let mut rng = self.rng.lock().unwrap();
        let survivors: Versions = volatile
            .into_iter()
            .filter(|(g, (s, _))| durable.get(g).is_none_or(|(d, _)| d < s) && rng.chance(0.5))
            .collect();
        drop(rng);
        self.disk.merge(&survivors);
    }

    /// What `get` / `scan` see now (the incarnation's view).
    pub fn view(&self) -> Versions {
        self.volatile.lock().unwrap().clone()
    }

    fn check(&self) -> Result<(), LogError> {
        match &*self.failed.lock().unwrap() {
            Some(why) => Err(LogError::Halted(why.clone())),
            None => Ok(()),
        }
    }
}

impl TxnLog for SimLog {
    fn may_have_lost_starts(&self) -> bool {
        self.reopened
    }

    fn write(&self, record: &TxnRecord) -> Result<(), LogError> {
        self.check()?;
        let seq = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
        self.volatile
            .lock()
            .unwrap()
            .insert(record.gtid, (seq, record.clone()));
        Ok(())
    }

    fn force(&self) -> ForceFuture {
        let snapshot = self.volatile.lock().unwrap().clone();
        let checked = self.check();
        let on = self.faults.on.load(Ordering::SeqCst);
        let (stall, fail) = {
            let mut rng = self.rng.lock().unwrap();
            let stall = on && rng.below(1000) < self.faults.stall_permille.load(Ordering::SeqCst);
            let stall = stall.then(|| rng.ms(100, 2000));
            let fail = on && rng.below(1000) < self.faults.fail_permille.load(Ordering::SeqCst);
            (stall, fail)
        };
        // The future owns what it touches; the coordinator may drop it.
        let (disk, failed, crashed) =
            (self.disk.clone(), self.failed.clone(), self.crashed.clone());
        Box::pin(async move {
            checked?;
            if let Some(d) = stall {
                tokio::time::sleep(d).await;
            }
            if crashed.load(Ordering::SeqCst) {
                return Err(LogError::Storage("the process crashed".into()));
            }
            if let Some(why) = &*failed.lock().unwrap() {
                return Err(LogError::Halted(why.clone()));
            }
            if fail {
                let why = "no space left on device (simulated)".to_string();
                failed.lock().unwrap().get_or_insert(why.clone());
                return Err(LogError::Storage(why));
            }
            disk.merge(&snapshot);
            Ok(())
        })
    }

    fn get(&self, gtid: &Gtid) -> Result<Option<TxnRecord>, LogError> {
        self.check()?;
        Ok(self
            .volatile
            .lock()
            .unwrap()
            .get(gtid)
            .map(|(_, r)| r.clone()))
    }

    fn scan(
        &self,
        after: Option<&Gtid>,
        states: &[TxState],
        limit: usize,
    ) -> Result<Vec<TxnRecord>, LogError> {
        use std::ops::Bound;
        self.check()?;
        let lower = after.map_or(Bound::Unbounded, |g| Bound::Excluded(*g));
        Ok(self
            .volatile
            .lock()
            .unwrap()
            .range((lower, Bound::Unbounded))
            .map(|(_, (_, r))| r)
            .filter(|r| states.is_empty() || states.contains(&r.state))
            .take(limit)
            .cloned()
            .collect())
    }

    fn remove(&self, gtid: &Gtid) -> Result<(), LogError> {
        self.check()?;
        self.volatile.lock().unwrap().remove(gtid);
        Ok(())
    }
}

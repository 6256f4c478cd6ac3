//! Where the coordinator instances of one seed keep their records: one
//! instance's local [`SimLog`] over a [`Disk`] (crashes keep only what was
//! forced), or the [`SharedStore`] several instances share, with
//! PostgreSQL's rules (first-write-only insert, owner/epoch-fenced updates,
//! the decision written once, leases on the store's own clock, claims,
//! takeover by name at restart, retention's remove).

use std::sync::Arc;
use std::time::Duration;

use tandem_coordinator::log::{SharedMemLog, SharedStore, TxnLog};
use tandem_coordinator::model::{Decision, Gtid, TxnRecord};

use crate::log::{Disk, LogFaults, SimLog};
use crate::rng::Rng;

/// The store of one seed.
pub enum Store {
    /// One instance, on its own log.
    Local {
        disk: Arc<Disk>,
        faults: Arc<LogFaults>,
        rng: Arc<std::sync::Mutex<Rng>>,
    },
    /// Several instances on one shared store.
    Shared(Arc<SharedStore>),
}

/// One incarnation's log.
#[derive(Clone)]
pub enum InstanceLog {
    Local(Arc<SimLog>),
    Shared(Arc<SharedMemLog>),
}

impl Store {
    /// A new incarnation of instance `name`.
    pub fn open(&self, name: &str, address: &str) -> InstanceLog {
        match self {
            Store::Local { disk, faults, rng } => {
                InstanceLog::Local(SimLog::open(disk.clone(), faults.clone(), rng.clone()))
            }
            Store::Shared(store) => {
                InstanceLog::Shared(SharedMemLog::open(store.clone(), name, address))
            }
        }
    }

    pub fn shared(&self) -> bool {
        matches!(self, Store::Shared(_))
    }

    /// Every decision that ever became durable, in order (a gtid may be
    /// listed more than once only with the same decision).
    pub fn decisions(&self) -> Vec<(Gtid, Decision)> {
        match self {
            Store::Local { disk, .. } => disk
                .durable()
                .into_iter()
                .filter_map(|(g, (_, r))| r.decision.map(|d| (g, d)))
                .collect(),
            Store::Shared(store) => store.decisions(),
        }
    }

    /// Whether the coordinator side ever recorded `gtid` durably. On a
    /// local log a one-shot start is not forced: after a crash its branches
    /// may have been called for a gtid the log never kept, which only the
    /// participant's in-doubt resolution can release (presumed abort). On
    /// a shared store a one-shot start is written with its decision: a
    /// crash before it leaves the same (a presumed abort written for it
    /// does not count: it knows no branch).
    pub fn known(&self, gtid: &Gtid) -> bool {
        match self {
            Store::Local { disk, .. } => disk.get(gtid).is_some(),
            Store::Shared(store) => store.recorded(gtid),
        }
    }

    /// Whether retention's horizon on a shared store covers `gtid`: a
    /// question about it with no record and no tombstone is answered
    /// FORGOTTEN (it may have been a commit every branch acknowledged).
    pub fn horizon_covers(&self, gtid: &Gtid) -> bool {
        match self {
            Store::Local { .. } => false,
            Store::Shared(store) => store.horizon().may_have_purged(gtid),
        }
    }

    /// The first durable decision of `gtid`, removed records included.
    pub fn decision(&self, gtid: &Gtid) -> Option<Decision> {
        match self {
            Store::Local { disk, .. } => disk.get(gtid).and_then(|r| r.decision),
            Store::Shared(store) => store
                .decisions()
                .into_iter()
                .find(|(g, _)| g == gtid)
                .map(|(_, d)| d),
        }
    }

    /// The rows the store holds now (a shared store's), or `None` for a
    /// local log (its incarnation's view is the one to read).
    pub fn shared_rows(&self) -> Option<Vec<Row>> {
        match self {
            Store::Local { .. } => None,
            Store::Shared(store) => Some(
                store
                    .rows()
                    .into_iter()
                    .map(|(_, r)| Row {
                        owner: r.owner.to_string(),
                        epoch: r.epoch,
                        record: r.record,
                    })
                    .collect(),
            ),
        }
    }
}

/// One record as the store holds it, with its owner.
#[derive(Clone, Debug)]
pub struct Row {
    /// The incarnation driving it (empty on a local log).
    pub owner: String,
    pub epoch: u64,
    pub record: TxnRecord,
}

impl InstanceLog {
    pub fn txn_log(&self) -> Arc<dyn TxnLog> {
        match self {
            InstanceLog::Local(l) => l.clone(),
            InstanceLog::Shared(l) => l.clone(),
        }
    }

    /// The process dies.
    pub fn crash(&self) {
        match self {
            InstanceLog::Local(l) => l.crash(),
            InstanceLog::Shared(l) => l.crash(),
        }
    }

    /// The process stops (or goes on): its store calls wait meanwhile.
    pub fn set_paused(&self, paused: bool) {
        if let InstanceLog::Shared(l) = self {
            l.set_paused(paused);
        }
    }

    /// Its next flush to the shared store fails (the log latches, the
    /// instance halts and is restarted); a local log has its own faults.
    pub fn fail_next_force(&self) {
        if let InstanceLog::Shared(l) = self {
            l.fail_next_force();
        }
    }

    /// Pauses it when its next flush starts (`true`), or calls that off.
    pub fn pause_at_next_flush(&self, armed: bool) {
        if let InstanceLog::Shared(l) = self {
            l.pause_at_next_flush(armed);
        }
    }

    /// Whether its store calls are paused.
    pub fn paused(&self) -> bool {
        match self {
            InstanceLog::Local(_) => false,
            InstanceLog::Shared(l) => l.paused(),
        }
    }

    /// Renews its leases every third of `lease` (shared stores only).
    pub fn spawn_renewer(&self, lease: Duration) -> Option<tokio::task::JoinHandle<()>> {
        match self {
            InstanceLog::Local(_) => None,
            InstanceLog::Shared(l) => Some(l.spawn_renewer(lease / 3)),
        }
    }

    /// The records this incarnation sees (a local log's view).
    pub fn view(&self) -> Vec<Row> {
        match self {
            InstanceLog::Local(l) => l
                .view()
                .into_values()
                .map(|(_, record)| Row {
                    owner: String::new(),
                    epoch: record.epoch,
                    record,
                })
                .collect(),
            InstanceLog::Shared(_) => Vec::new(),
        }
    }

    /// The incarnation's id on a shared store.
    pub fn incarnation(&self) -> Option<String> {
        match self {
            InstanceLog::Local(_) => None,
            InstanceLog::Shared(l) => Some(l.incarnation().to_string()),
        }
    }
}

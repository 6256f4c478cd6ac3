//! [`SharedStore`]: the table several coordinators share, in memory — the
//! same rules as [`super::PgLog`]'s SQL, one method per rule, for the
//! cluster simulation. [`super::shared_conformance`] checks both against
//! the same scenarios, which is what makes this store the same checked
//! specification as the PostgreSQL one.
//!
//! A row is a transaction: its record, the incarnation that owns it and
//! its epoch (bumped by every claim). An instance is a registered
//! coordinator process (incarnation → name, address, heartbeat, lease).
//! A row's lease is its owner's: one lease per incarnation, on the
//! store's clock (not any coordinator's), renewed by writing the
//! instance alone whatever it owns (PgLog's `tandem_instances.lease_until`,
//! schema version 2). A row whose owner is not registered any more has no
//! lease.

mod retention;

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use uuid::Uuid;

use super::{Horizon, Ownership, Presumed, Tombstone};
use crate::model::{Decision, Gtid, TxState, TxnRecord};

/// The store's clock: milliseconds, read for every lease.
pub type StoreClock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// One row as the store holds it (read accessor for invariants).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowView {
    /// The incarnation driving it.
    pub owner: Uuid,
    /// Bumped by every claim.
    pub epoch: u64,
    /// Until when the owner holds it, on the store's clock (ms): its
    /// owner's lease, 0 when the owner is not registered.
    pub lease_until_ms: u64,
    /// The decision column (written once).
    pub decision: Option<Decision>,
    /// The state column.
    pub state: TxState,
    /// The record as last written (its `epoch` is the row's).
    pub record: TxnRecord,
}

/// One registered coordinator process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceView {
    /// Its process.
    pub incarnation: Uuid,
    /// Its instance name.
    pub name: String,
    /// Where clients reach it.
    pub address: String,
    /// Its last heartbeat on the store's clock (ms).
    pub heartbeat_ms: u64,
    /// Until when it holds its rows, on the store's clock (ms).
    pub lease_until_ms: u64,
}

/// One change in a batch: a record written (`first` for the
/// transaction's first write, the only one that may create its row) or a
/// row removed (retention).
#[derive(Clone, Debug)]
pub(super) enum BatchOp {
    Write { record: Box<TxnRecord>, first: bool },
    Remove,
}

/// Why a batch did not land (nothing of it did).
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Refusals {
    /// Later writes that found no row, another owner, another epoch, or a
    /// decision they would change: the writer is fenced.
    pub fenced: Vec<Gtid>,
    /// First writes of a gtid another coordinator started first.
    pub refused: Vec<Gtid>,
}

/// What the rules say about one write.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Insert,
    Update,
    Refused,
    Fenced,
}

/// A row as stored: no lease of its own.
#[derive(Clone)]
struct Row {
    owner: Uuid,
    epoch: u64,
    record: TxnRecord,
}

#[derive(Default)]
struct Tables {
    rows: BTreeMap<Gtid, Row>,
    instances: BTreeMap<Uuid, InstanceView>,
    /// Every decision that ever landed, rows since removed included.
    decisions: Vec<(Gtid, Decision)>,
    /// Every gtid a coordinator running it ever wrote (presumed aborts
    /// are not), rows since removed included.
    recorded: HashSet<Gtid>,
    /// Decision tombstones retention kept (PgLog's `tandem_decisions`).
    tombstones: BTreeMap<Gtid, Tombstone>,
    /// How far retention has forgotten (PgLog's `tandem_horizon`).
    horizon: Horizon,
}

/// The shared table in memory. See the module docs.
pub struct SharedStore {
    clock: StoreClock,
    lease: Duration,
    tables: Mutex<Tables>,
    /// Incarnations handed out (deterministic ids, so a seed replays).
    incarnations: AtomicU64,
}

impl SharedStore {
    /// An empty store whose leases last `lease` on `store_clock_ms`.
    pub fn new(store_clock_ms: StoreClock, lease: Duration) -> Arc<SharedStore> {
        Arc::new(SharedStore {
            clock: store_clock_ms,
            lease,
            tables: Mutex::new(Tables::default()),
            incarnations: AtomicU64::new(0),
        })
    }

    /// A new incarnation id: a counter, not random, so a simulation seed
    /// replays exactly.
    pub(super) fn next_incarnation(&self) -> Uuid {
        let n = self.incarnations.fetch_add(1, Ordering::Relaxed) + 1;
        Uuid::from_u128((0x7a11_u128 << 112) | u128::from(n))
    }

    /// The store's clock now (ms).
    pub fn now_ms(&self) -> u64 {
        (self.clock)()
    }

    /// How long a lease lasts.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    fn lease_ms(&self) -> u64 {
        self.lease.as_millis().min(u64::MAX as u128) as u64
    }

    fn tables(&self) -> MutexGuard<'_, Tables> {
        // Every operation checks before it changes anything: a panic
        // cannot leave a batch half applied.
        self.tables.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every row, in gtid order.
    pub fn rows(&self) -> Vec<(Gtid, RowView)> {
        let t = self.tables();
        t.rows.iter().map(|(g, r)| (*g, t.view(r))).collect()
    }

    /// One row.
    pub fn row(&self, gtid: &Gtid) -> Option<RowView> {
        let t = self.tables();
        t.rows.get(gtid).map(|r| t.view(r))
    }

    /// Every registered instance.
    pub fn instances(&self) -> Vec<InstanceView> {
        self.tables().instances.values().cloned().collect()
    }

    /// Whether a coordinator running `gtid` ever wrote it (a presumed
    /// abort alone does not count): what a crash cannot have lost.
    pub fn recorded(&self, gtid: &Gtid) -> bool {
        self.tables().recorded.contains(gtid)
    }

    /// Every decision that ever landed in a row, in order, including rows
    /// retention removed since: a gtid listed with two decisions is a
    /// split outcome.
    pub fn decisions(&self) -> Vec<(Gtid, Decision)> {
        self.tables().decisions.clone()
    }

    /// Registers `me` with a fresh lease and claims, at once and whatever
    /// their lease, the unfinished rows of earlier incarnations of `name`
    /// (a restart: the earlier process is gone), epoch + 1 each; the
    /// earlier incarnations are forgotten (so their renewals fail and they
    /// stop). PgLog: `register`.
    pub(super) fn register(&self, me: Uuid, name: &str, address: &str) -> Vec<Gtid> {
        let now = self.now_ms();
        let mut t = self.tables();
        t.instances.insert(
            me,
            InstanceView {
                incarnation: me,
                name: name.to_string(),
                address: address.to_string(),
                heartbeat_ms: now,
                lease_until_ms: now.saturating_add(self.lease_ms()),
            },
        );
        let earlier: HashSet<Uuid> = t
            .instances
            .values()
            .filter(|i| i.name == name && i.incarnation != me)
            .map(|i| i.incarnation)
            .collect();
        let mut claimed = Vec::new();
        for (gtid, row) in t.rows.iter_mut() {
            if !row.record.state.is_terminal() && earlier.contains(&row.owner) {
                claim(row, me);
                claimed.push(*gtid);
            }
        }
        t.instances.retain(|id, _| !earlier.contains(id));
        claimed
    }

    /// What the rules say about `me` writing `record`:
    ///
    /// - a **first write** (`first`) creates the row when there is none.
    ///   When there is one, it is written only if it is `me`'s own at the
    ///   record's epoch with the decision kept (the same batch again); a
    ///   row at epoch 1 of another owner means another coordinator started
    ///   the gtid first: refused, for that transaction alone; any other
    ///   row fences the writer.
    /// - every **later write** is an update conditioned on
    ///   `owner = me AND epoch = record.epoch AND (decision IS NULL OR
    ///   decision = record.decision)`; a later write that finds no row
    ///   (retention removed it) or fails the condition is fenced: it never
    ///   creates the row again.
    fn verdict(t: &Tables, me: Uuid, record: &TxnRecord, first: bool) -> Verdict {
        // A first write of a gtid the horizon covers is never written: its
        // row may be one retention removed (a process paused with the
        // write unsent while another finished the transaction). It is
        // refused as started elsewhere if a row of another is there, and
        // fenced otherwise.
        let purged = first && t.horizon.may_have_purged(&record.gtid);
        let Some(row) = t.rows.get(&record.gtid) else {
            return if first && !purged {
                Verdict::Insert
            } else {
                Verdict::Fenced
            };
        };
        let decision_kept = row.record.decision.is_none() || row.record.decision == record.decision;
        // A presumed abort (owner nil) gives way to the first write of
        // the coordinator that began the gtid when it decides abort too.
        let presumed_kept = first
            && row.owner.is_nil()
            && row.epoch == 1
            && record.decision == Some(Decision::Abort);
        let own = row.owner == me && row.epoch == record.epoch && decision_kept;
        if (own || presumed_kept) && !purged {
            Verdict::Update
        } else if first && row.epoch == 1 && row.owner != me {
            Verdict::Refused
        } else {
            Verdict::Fenced
        }
    }

    /// Applies `batch` for `me` all or nothing (one database transaction
    /// in PgLog: `write_batch`): a removal (retention) removes the row
    /// only if it is finished when it lands; every write follows
    /// [`Self::verdict`]; if any write is refused or fenced, nothing lands
    /// and the refusals say which.
    pub(super) fn apply(&self, me: Uuid, batch: &BTreeMap<Gtid, BatchOp>) -> Result<(), Refusals> {
        let mut t = self.tables();
        let mut refusals = Refusals::default();
        for (gtid, op) in batch {
            if let BatchOp::Write { record, first } = op {
                match Self::verdict(&t, me, record, *first) {
                    Verdict::Insert | Verdict::Update => {}
                    Verdict::Refused => refusals.refused.push(*gtid),
                    Verdict::Fenced => refusals.fenced.push(*gtid),
                }
            }
        }
        if refusals != Refusals::default() {
            return Err(refusals);
        }
        for (gtid, op) in batch {
            match op {
                BatchOp::Remove => {
                    if t.rows
                        .get(gtid)
                        .is_some_and(|r| r.record.state.is_terminal())
                    {
                        t.rows.remove(gtid);
                    }
                }
                BatchOp::Write { record, .. } => {
                    t.recorded.insert(*gtid);
                    let newly_decided = record
                        .decision
                        .filter(|_| t.rows.get(gtid).is_none_or(|r| r.record.decision.is_none()));
                    if let Some(d) = newly_decided {
                        t.decisions.push((*gtid, d));
                    }
                    t.rows.insert(
                        *gtid,
                        Row {
                            owner: me,
                            epoch: record.epoch,
                            record: TxnRecord::clone(record),
                        },
                    );
                }
            }
        }
        Ok(())
    }

    /// Writes `marker` (aborted, epoch 1, owned by nobody: the nil UUID)
    /// unless a row of
    /// its gtid is there (then that row's record) or the horizon covers the
    /// gtid: "no record, so abort" made durable before anyone is told, so
    /// the first write of a coordinator that began the gtid is refused
    /// after it. PgLog: `presume_abort`, one `INSERT … ON CONFLICT DO
    /// NOTHING`.
    pub(super) fn presume_abort(&self, marker: &TxnRecord) -> Presumed {
        let mut t = self.tables();
        if let Some(row) = t.rows.get(&marker.gtid) {
            return Presumed::Found(Box::new(record_at_epoch(row)));
        }
        if t.horizon.may_have_purged(&marker.gtid) {
            return Presumed::Forgotten;
        }
        t.decisions.push((marker.gtid, Decision::Abort));
        t.rows.insert(
            marker.gtid,
            Row {
                owner: Uuid::nil(),
                epoch: 1,
                record: marker.clone(),
            },
        );
        Presumed::Aborted
    }

    /// Renews `me`'s heartbeat and lease (now + lease), which is the lease
    /// of every row it owns: one instance written, whatever it owns. False
    /// when `me` is no longer registered: a later incarnation of its name
    /// took its place, and it must stop. PgLog: `renew`.
    pub(super) fn renew(&self, me: Uuid) -> bool {
        let now = self.now_ms();
        let until = now.saturating_add(self.lease_ms());
        let mut t = self.tables();
        let Some(instance) = t.instances.get_mut(&me) else {
            return false;
        };
        instance.heartbeat_ms = now;
        instance.lease_until_ms = until;
        true
    }

    /// Claims for `me` up to `limit` unfinished rows of other owners whose
    /// lease ran out on the store's clock (`lease_until < now`) or who are
    /// not registered any more, in gtid order, or only `only`'s: owner
    /// `me`, epoch + 1. A sweep (no `only`) also forgets instances whose
    /// heartbeat is older than ten leases and that own nothing unfinished.
    /// PgLog: `claim_expired`.
    pub(super) fn claim_expired(&self, me: Uuid, limit: usize, only: Option<Gtid>) -> Vec<Gtid> {
        let now = self.now_ms();
        let mut t = self.tables();
        let claimed: Vec<Gtid> = t
            .rows
            .iter()
            .filter(|(g, r)| {
                !r.record.state.is_terminal()
                    && r.owner != me
                    && only.is_none_or(|o| o == **g)
                    && !t.holds_lease(r.owner, now)
            })
            .map(|(g, _)| *g)
            .take(limit)
            .collect();
        for gtid in &claimed {
            if let Some(row) = t.rows.get_mut(gtid) {
                claim(row, me);
            }
        }
        if only.is_none() {
            let long_dead = now.saturating_sub(self.lease_ms().saturating_mul(10));
            let owning: HashSet<Uuid> = t
                .rows
                .values()
                .filter(|r| !r.record.state.is_terminal())
                .map(|r| r.owner)
                .collect();
            t.instances
                .retain(|id, i| i.heartbeat_ms >= long_dead || owning.contains(id));
        }
        claimed
    }

    /// Who drives `gtid`, as seen by `me`: the row's owner, whether its
    /// lease still runs on the store's clock (a finished row is always
    /// live: nobody needs to take it over), the owner's name and address
    /// (empty once the instance is forgotten) and the epoch. PgLog:
    /// `owner_of`.
    pub(super) fn locate(&self, me: Uuid, gtid: &Gtid) -> Option<Ownership> {
        let now = self.now_ms();
        let t = self.tables();
        let row = t.rows.get(gtid)?;
        let instance = t.instances.get(&row.owner);
        Some(Ownership {
            here: row.owner == me,
            live: t.holds_lease(row.owner, now) || row.record.state.is_terminal(),
            name: instance.map(|i| i.name.clone()).unwrap_or_default(),
            address: instance.map(|i| i.address.clone()).unwrap_or_default(),
            epoch: row.epoch.max(1),
        })
    }

    /// The record of `gtid`, at the row's epoch (the column is the truth:
    /// a claim raises it without rewriting the record).
    pub(super) fn get(&self, gtid: &Gtid) -> Option<TxnRecord> {
        self.tables().rows.get(gtid).map(record_at_epoch)
    }

    /// Records in gtid order after `after` in `states` (all when empty),
    /// of `owner` only when given, at most `limit`; newest first when
    /// `back` (then strictly before `after`).
    pub(super) fn scan(
        &self,
        after: Option<&Gtid>,
        states: &[TxState],
        owner: Option<Uuid>,
        back: bool,
        limit: usize,
    ) -> Vec<TxnRecord> {
        use std::ops::Bound;
        let t = self.tables();
        let keep = |r: &&Row| {
            (states.is_empty() || states.contains(&r.record.state))
                && owner.is_none_or(|o| o == r.owner)
        };
        let bound = after.map_or(Bound::Unbounded, |g| Bound::Excluded(*g));
        let range: Box<dyn Iterator<Item = &Row>> = if back {
            Box::new(
                t.rows
                    .range((Bound::Unbounded, bound))
                    .rev()
                    .map(|(_, r)| r),
            )
        } else {
            Box::new(t.rows.range((bound, Bound::Unbounded)).map(|(_, r)| r))
        };
        range
            .filter(keep)
            .take(limit)
            .map(record_at_epoch)
            .collect()
    }
}

impl Tables {
    /// Whether `owner` is registered and its lease runs at `now`.
    fn holds_lease(&self, owner: Uuid, now: u64) -> bool {
        self.instances
            .get(&owner)
            .is_some_and(|i| i.lease_until_ms >= now)
    }

    fn view(&self, row: &Row) -> RowView {
        RowView {
            owner: row.owner,
            epoch: row.epoch,
            lease_until_ms: self
                .instances
                .get(&row.owner)
                .map_or(0, |i| i.lease_until_ms),
            decision: row.record.decision,
            state: row.record.state,
            record: record_at_epoch(row),
        }
    }
}

/// A claim: the row is `me`'s now, one epoch later (its lease is `me`'s).
fn claim(row: &mut Row, me: Uuid) {
    row.owner = me;
    row.epoch += 1;
    row.record.epoch = row.epoch;
}

fn record_at_epoch(row: &Row) -> TxnRecord {
    let mut rec = row.record.clone();
    rec.epoch = row.epoch.max(1);
    rec
}

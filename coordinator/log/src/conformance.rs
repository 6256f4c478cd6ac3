//! The conformance suite every [`TxnLog`] implementation must pass.
//!
//! Run it from a test with a factory that returns a fresh, empty log:
//!
//! ```no_run
//! # async fn t() {
//! use tandem_log::{conformance, MemLog};
//! conformance::run_all(|| MemLog::new()).await;
//! # }
//! ```
//!
//! Each check states the part of the durability contract it covers and
//! panics, naming itself, when an implementation breaks it. Checks that need
//! a crash or a reopen are implementation-specific and live next to the
//! implementation's tests.

use bytes::Bytes;

use super::TxnLog;
use crate::model::{BranchRecord, BranchState, Gtid, Mode, TxState, TxnRecord};

/// Runs every check, each on a fresh log from `make`.
pub async fn run_all<L: TxnLog>(make: impl Fn() -> L) {
    get_unknown_is_none(&make());
    write_then_get_round_trips(&make());
    write_replaces_and_keeps_payloads(&make());
    scan_is_ordered_and_pages(&make());
    scan_filters_by_state(&make());
    scan_of_unfinished_states_follows_every_change(&make());
    scan_of_unfinished_states_pages_through_many(&make());
    scan_back_is_newest_first_and_pages(&make());
    force_covers_concurrent_writers(&make()).await;
    remove_forgets_record_and_payloads(&make());
    purge_keeps_tombstones_and_the_horizon(&make());
    expired_tombstones_raise_the_forgotten_horizon(&make());
}

/// A finished record at gtid time `ms`, committed, its first branch
/// settled by hand (so it needs a tombstone).
fn finished_at(ms: u64, state: TxState) -> TxnRecord {
    let mut rec = sample_record(Mode::TwoPhase, 2);
    rec.gtid = uuid::Builder::from_unix_timestamp_millis(ms, &rand_bytes()).into_uuid();
    rec.state = state;
    rec.decision = Some(crate::model::Decision::Commit);
    for b in &mut rec.branches {
        b.state = BranchState::Committed;
        b.payload = Bytes::from(vec![b.id as u8; 4096]);
    }
    rec.branches[0].resolution = Some(crate::model::Resolution {
        by: "ops".into(),
        reason: "applied by hand".into(),
        at_ms: ms,
    });
    rec.updated_ms = ms + 5;
    rec
}

fn rand_bytes() -> [u8; 10] {
    let mut b = [0u8; 10];
    b.copy_from_slice(&Gtid::now_v7().as_bytes()[6..]);
    b
}

/// `purge` (for a log that [`compacts`](TxnLog::compacts)): a finished
/// record is gone, its tombstone readable, and the horizon covers its
/// gtid; an unfinished record named in a purge is left whole; a gtid
/// newer than the horizon is [`Lookup::Unknown`], one at or below it
/// [`Lookup::Purged`], and a stored one is its record. A log that does
/// not compact is not asked (retention removes nothing from it).
pub fn purge_keeps_tombstones_and_the_horizon(log: &impl TxnLog) {
    use super::{Lookup, Purge, Tombstone};
    let name = "purge_keeps_tombstones_and_the_horizon";
    if !log.compacts() {
        return;
    }
    let done = finished_at(10_000, TxState::Committed);
    let plain = {
        let mut r = finished_at(20_000, TxState::Aborted);
        r.decision = Some(crate::model::Decision::Abort);
        for b in &mut r.branches {
            b.state = BranchState::RolledBack;
            b.resolution = None;
        }
        r
    };
    let unfinished = finished_at(30_000, TxState::Stuck);
    for r in [&done, &plain, &unfinished] {
        log.write(r).expect("write");
    }
    let tomb = Tombstone::needed_for(&done).expect("a resolved commit needs a tombstone");
    assert!(
        Tombstone::needed_for(&plain).is_none(),
        "{name}: an abort every branch acknowledged needs none"
    );
    let mut settled_abort = plain.clone();
    settled_abort.branches[1].resolution = done.branches[0].resolution.clone();
    assert!(
        Tombstone::needed_for(&settled_abort)
            .is_some_and(|t| t.decision == crate::model::Decision::Abort),
        "{name}: an abort with a branch settled by hand needs one"
    );
    let purges = [&done, &plain, &unfinished].map(|r| Purge {
        gtid: r.gtid,
        tombstone: Tombstone::needed_for(r).filter(|_| r.gtid == done.gtid),
    });
    log.purge(&purges).expect("purge");
    assert_eq!(log.get(&done.gtid).expect("get"), None, "{name}: removed");
    assert_eq!(log.get(&plain.gtid).expect("get"), None, "{name}: removed");
    assert_eq!(
        log.get(&unfinished.gtid).expect("get").as_ref(),
        Some(&unfinished),
        "{name}: an unfinished record is never purged"
    );
    assert_eq!(
        log.tombstone(&done.gtid).expect("tombstone"),
        Some(tomb.clone()),
        "{name}: tombstone kept"
    );
    assert_eq!(log.tombstone(&plain.gtid).expect("tombstone"), None);
    let h = log.horizon().expect("horizon");
    assert_eq!(
        h.purged_ms, 30_000,
        "{name}: horizon covers every purged gtid"
    );
    assert_eq!(h.forgotten_ms, 0, "{name}: nothing forgotten");
    assert_eq!(
        log.lookup(&done.gtid).expect("lookup"),
        Lookup::Purged,
        "{name}: a purged gtid"
    );
    let older = uuid::Builder::from_unix_timestamp_millis(15_000, &rand_bytes()).into_uuid();
    assert_eq!(log.lookup(&older).expect("lookup"), Lookup::Purged);
    assert_eq!(
        log.lookup(&Gtid::now_v7()).expect("lookup"),
        Lookup::Unknown,
        "{name}: a new gtid"
    );
    assert_eq!(
        log.lookup(&unfinished.gtid).expect("lookup"),
        Lookup::Record(Box::new(unfinished.clone())),
    );
    // Purging again is harmless, and the horizon never goes back.
    log.purge(&purges[..1]).expect("purge again");
    assert_eq!(log.horizon().expect("horizon").purged_ms, 30_000);
    assert_eq!(log.tombstone(&done.gtid).expect("tombstone"), Some(tomb));
}

/// `expire_tombstones` removes only tombstones of transactions finished
/// before the cut, and raises `forgotten_ms` to cover each.
pub fn expired_tombstones_raise_the_forgotten_horizon(log: &impl TxnLog) {
    use super::{Purge, Tombstone};
    let name = "expired_tombstones_raise_the_forgotten_horizon";
    if !log.compacts() {
        return;
    }
    let (old, young) = (
        finished_at(10_000, TxState::Committed),
        finished_at(50_000, TxState::Committed),
    );
    for r in [&old, &young] {
        log.write(r).expect("write");
    }
    let purges = [&old, &young].map(|r| Purge {
        gtid: r.gtid,
        tombstone: Tombstone::needed_for(r),
    });
    log.purge(&purges).expect("purge");
    assert_eq!(
        log.expire_tombstones(20_000, 100).expect("expire"),
        1,
        "{name}: one finished before the cut"
    );
    assert_eq!(log.tombstone(&old.gtid).expect("tombstone"), None);
    assert!(log.tombstone(&young.gtid).expect("tombstone").is_some());
    let h = log.horizon().expect("horizon");
    assert_eq!(h.forgotten_ms, 10_000, "{name}: covers the expired gtid");
    assert!(h.may_have_forgotten(&old.gtid) && !h.may_have_forgotten(&young.gtid));
    assert_eq!(log.expire_tombstones(20_000, 100).expect("expire"), 0);
}

/// `remove` drops a finished record and its payloads (small and large);
/// others stay; removing an unknown gtid is fine.
pub fn remove_forgets_record_and_payloads(log: &impl TxnLog) {
    let (mut a, b) = (
        sample_record(Mode::TwoPhase, 2),
        sample_record(Mode::Tcc, 1),
    );
    a.branches[1].payload = Bytes::from(vec![7u8; 4096]);
    // Retention removes finished records only (a shared store keeps a row
    // someone still drives).
    a.state = TxState::Aborted;
    a.decision = Some(crate::model::Decision::Abort);
    log.write(&a).expect("write a");
    log.write(&b).expect("write b");
    log.remove(&a.gtid).expect("remove a");
    log.remove(&Gtid::now_v7()).expect("remove unknown");
    assert!(
        log.get(&a.gtid).expect("get").is_none(),
        "removed record still read"
    );
    assert_eq!(
        log.get(&b.gtid).expect("get").as_ref(),
        Some(&b),
        "other record changed"
    );
    let all = log.scan(None, &[], 10).expect("scan");
    assert_eq!(all.len(), 1, "scan still lists a removed record");
    // Written again (same gtid), it comes back whole with its new payloads.
    let mut again = a.clone();
    again.branches[0].payload = Bytes::from_static(b"new");
    again.branches[1].payload = Bytes::from(vec![9u8; 4096]);
    log.write(&again).expect("rewrite");
    assert_eq!(log.get(&a.gtid).expect("get"), Some(again));
}

/// A record with `n` branches, for tests. Payload of branch `i` is `i` bytes.
pub fn sample_record(mode: Mode, n: u32) -> TxnRecord {
    let mut rec = TxnRecord::new(Gtid::now_v7(), mode, TxState::Preparing, 1_000, 61_000);
    for id in 1..=n {
        rec.branches.push(BranchRecord {
            id,
            // Every other branch runs the other protocol (a mixed record).
            mode: if id % 2 == 0 { Mode::TwoPhase } else { mode },
            endpoint: format!("http://127.0.0.1:{}", 9000 + id),
            resource: format!("resource-{id}"),
            payload: Bytes::from(vec![id as u8; id as usize]),
            reply: Bytes::from(vec![b'r'; id as usize]),
            state: BranchState::Registered,
            attempts: 0,
            last_error: String::new(),
            next_attempt_ms: 0,
            updated_ms: 1_000,
            resolution: None,
            after: Vec::new(),
        });
    }
    rec
}

/// `get` of a gtid never written returns `None`, not an error.
pub fn get_unknown_is_none(log: &impl TxnLog) {
    let got = log
        .get(&Gtid::now_v7())
        .expect("get_unknown_is_none: get failed");
    assert!(
        got.is_none(),
        "get_unknown_is_none: found a record never written"
    );
}

/// A written record reads back equal, field for field, payloads included.
pub fn write_then_get_round_trips(log: &impl TxnLog) {
    let mut rec = sample_record(Mode::Tcc, 3);
    let why = crate::model::AbortInfo::by_branch(
        crate::model::AbortCause::PhaseOneFailed,
        2,
        "resource-2",
        "deadline",
    );
    rec.reason = why.text();
    rec.abort = Some(why);
    rec.traceparent = crate::model::TraceContext::from_headers(
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        Some("vendor=x"),
    );
    rec.branches[1].state = BranchState::Failed;
    rec.branches[1].last_error = "deadline".into();
    rec.branches[1].next_attempt_ms = 12_345;
    rec.branches[0].resolution = Some(crate::model::Resolution {
        by: "ops-alice".into(),
        reason: "INC-7: applied by hand".into(),
        at_ms: 5_000,
    });
    rec.branches[2].payload = Bytes::new();
    rec.state = TxState::Stuck;
    rec.decision = Some(crate::model::Decision::Abort);
    rec.labels = vec![
        crate::labels::Label {
            key: "order_id".into(),
            value: "A-42".into(),
        },
        crate::labels::Label {
            key: "tenant".into(),
            value: "acme ☂".into(),
        },
    ];
    log.write(&rec)
        .expect("write_then_get_round_trips: write failed");
    let got = log
        .get(&rec.gtid)
        .expect("write_then_get_round_trips: get failed");
    assert_eq!(got.as_ref(), Some(&rec), "write_then_get_round_trips");
}

/// A second write replaces the first; payloads stay as first written.
pub fn write_replaces_and_keeps_payloads(log: &impl TxnLog) {
    let mut rec = sample_record(Mode::TwoPhase, 2);
    log.write(&rec).expect("write_replaces: first write");
    rec.state = TxState::Committing;
    rec.branches[0].state = BranchState::Committed;
    rec.branches[1].attempts = 4;
    rec.branches[1].last_error = "unavailable".into();
    rec.updated_ms = 2_000;
    log.write(&rec).expect("write_replaces: second write");
    let got = log.get(&rec.gtid).expect("write_replaces: get");
    assert_eq!(
        got.as_ref(),
        Some(&rec),
        "write_replaces_and_keeps_payloads"
    );
}

/// `scan` returns records in gtid (creation) order, resumes strictly after
/// `after`, and honours `limit`.
pub fn scan_is_ordered_and_pages(log: &impl TxnLog) {
    let recs: Vec<TxnRecord> = (0..5).map(|_| sample_record(Mode::TwoPhase, 1)).collect();
    for r in recs.iter().rev() {
        log.write(r).expect("scan_is_ordered: write");
    }
    let ids = |v: Vec<TxnRecord>| v.into_iter().map(|r| r.gtid).collect::<Vec<_>>();
    let all = ids(log.scan(None, &[], 100).expect("scan_is_ordered: scan"));
    let want: Vec<Gtid> = recs.iter().map(|r| r.gtid).collect();
    assert_eq!(all, want, "scan_is_ordered_and_pages: order");
    let page1 = ids(log.scan(None, &[], 2).expect("scan"));
    assert_eq!(page1, want[..2], "scan_is_ordered_and_pages: first page");
    let page2 = ids(log.scan(Some(&want[1]), &[], 2).expect("scan"));
    assert_eq!(page2, want[2..4], "scan_is_ordered_and_pages: second page");
    let last = ids(log.scan(Some(&want[4]), &[], 2).expect("scan"));
    assert!(last.is_empty(), "scan_is_ordered_and_pages: past the end");
}

/// `scan_back` returns records newest first, resumes strictly before
/// `before`, honours `limit` and filters by state.
pub fn scan_back_is_newest_first_and_pages(log: &impl TxnLog) {
    let mut recs: Vec<TxnRecord> = (0..5).map(|_| sample_record(Mode::TwoPhase, 1)).collect();
    recs[2].state = TxState::Committed;
    for r in &recs {
        log.write(r).expect("scan_back: write");
    }
    let ids = |v: Vec<TxnRecord>| v.into_iter().map(|r| r.gtid).collect::<Vec<_>>();
    let want: Vec<Gtid> = recs.iter().rev().map(|r| r.gtid).collect();
    let all = ids(log.scan_back(None, &[], 100).expect("scan_back"));
    assert_eq!(all, want, "scan_back_is_newest_first: order");
    let page1 = ids(log.scan_back(None, &[], 2).expect("scan_back"));
    assert_eq!(page1, want[..2], "scan_back_is_newest_first: first page");
    let page2 = ids(log.scan_back(Some(&want[1]), &[], 2).expect("scan_back"));
    assert_eq!(page2, want[2..4], "scan_back_is_newest_first: second page");
    let none = ids(log.scan_back(Some(&want[4]), &[], 2).expect("scan_back"));
    assert!(none.is_empty(), "scan_back_is_newest_first: past the start");
    let committed = ids(log
        .scan_back(None, &[TxState::Committed], 10)
        .expect("scan_back"));
    assert_eq!(
        committed,
        vec![recs[2].gtid],
        "scan_back_is_newest_first: states"
    );
}

/// `scan` with states keeps only records in those states.
pub fn scan_filters_by_state(log: &impl TxnLog) {
    let states = [
        TxState::Active,
        TxState::Committed,
        TxState::Aborting,
        TxState::Committed,
    ];
    let mut want = Vec::new();
    for s in states {
        let mut r = sample_record(Mode::TwoPhase, 1);
        r.state = s;
        log.write(&r).expect("scan_filters_by_state: write");
        if s == TxState::Committed {
            want.push(r.gtid);
        }
    }
    let got: Vec<Gtid> = log
        .scan(None, &[TxState::Committed], 100)
        .expect("scan_filters_by_state: scan")
        .into_iter()
        .map(|r| r.gtid)
        .collect();
    assert_eq!(got, want, "scan_filters_by_state");
    let two = log
        .scan(None, &[TxState::Active, TxState::Aborting], 100)
        .expect("scan");
    assert_eq!(two.len(), 2, "scan_filters_by_state: two states");
}

/// A scan for unfinished states only (what recovery, the STUCK census and
/// `tx list --state active` ask) sees a record from its first write until
/// a terminal write, both ways and across pages.
pub fn scan_of_unfinished_states_follows_every_change(log: &impl TxnLog) {
    const NAME: &str = "scan_of_unfinished_states_follows_every_change";
    let unfinished = [TxState::Active, TxState::Committing, TxState::Stuck];
    let ids = |back: bool, after: Option<&Gtid>, limit: usize| -> Vec<Gtid> {
        let page = if back {
            log.scan_back(after, &unfinished, limit)
        } else {
            log.scan(after, &unfinished, limit)
        };
        page.expect(NAME).into_iter().map(|r| r.gtid).collect()
    };
    let mut recs: Vec<TxnRecord> = [
        TxState::Active,
        TxState::Committed,
        TxState::Committing,
        TxState::Aborting,
        TxState::Stuck,
    ]
    .into_iter()
    .map(|s| {
        let mut r = sample_record(Mode::TwoPhase, 1);
        r.state = s;
        log.write(&r).expect(NAME);
        r
    })
    .collect();
    recs.sort_by_key(|r| r.gtid);
    let want = |recs: &[TxnRecord]| -> Vec<Gtid> {
        recs.iter()
            .filter(|r| unfinished.contains(&r.state))
            .map(|r| r.gtid)
            .collect()
    };
    assert_eq!(ids(false, None, 100), want(&recs), "{NAME}: first scan");
    let mut back = want(&recs);
    back.reverse();
    assert_eq!(ids(true, None, 100), back, "{NAME}: scan_back");
    let first = ids(false, None, 1);
    assert_eq!(
        ids(false, first.first(), 100),
        want(&recs)[1..],
        "{NAME}: second page"
    );
    // Abort one, commit one, decide one: each scan sees the change.
    let active = recs
        .iter()
        .position(|r| r.state == TxState::Active)
        .expect(NAME);
    recs[active].state = TxState::Aborted;
    log.write(&recs[active]).expect(NAME);
    let stuck = recs
        .iter()
        .position(|r| r.state == TxState::Stuck)
        .expect(NAME);
    recs[stuck].state = TxState::Committed;
    log.write(&recs[stuck]).expect(NAME);
    let aborting = recs
        .iter()
        .position(|r| r.state == TxState::Aborting)
        .expect(NAME);
    recs[aborting].state = TxState::Committing;
    log.write(&recs[aborting]).expect(NAME);
    assert_eq!(ids(false, None, 100), want(&recs), "{NAME}: after changes");
}

/// The unfinished-states scan over many records in every unfinished
/// state, one of them finished and then written unfinished again (an
/// operator's retry of a STUCK record goes back to COMMITTING, for one):
/// pages of 1 and of 257 both ways return each exactly once, in order.
pub fn scan_of_unfinished_states_pages_through_many(log: &impl TxnLog) {
    const NAME: &str = "scan_of_unfinished_states_pages_through_many";
    let unfinished = [
        TxState::Active,
        TxState::Preparing,
        TxState::Committing,
        TxState::Aborting,
        TxState::Stuck,
    ];
    let mut want = Vec::new();
    for i in 0..600usize {
        let mut r = sample_record(Mode::TwoPhase, 1);
        r.state = if i % 7 == 3 {
            TxState::Committed
        } else {
            unfinished[i % unfinished.len()]
        };
        log.write(&r).expect(NAME);
        if i == 10 {
            r.state = TxState::Aborted;
            log.write(&r).expect(NAME);
            r.state = TxState::Committing;
            log.write(&r).expect(NAME);
        }
        if !r.state.is_terminal() {
            want.push(r.gtid);
        }
    }
    want.sort();
    let mut back = want.clone();
    back.reverse();
    for (reverse, want) in [(false, &want), (true, &back)] {
        for limit in [1, 257] {
            let mut got: Vec<Gtid> = Vec::new();
            loop {
                let page = if reverse {
                    log.scan_back(got.last(), &unfinished, limit)
                } else {
                    log.scan(got.last(), &unfinished, limit)
                }
                .expect(NAME);
                if page.is_empty() {
                    break;
                }
                assert!(page.len() <= limit, "{NAME}: page longer than its limit");
                got.extend(page.into_iter().map(|r| r.gtid));
            }
            assert_eq!(&got, want, "{NAME}: reverse {reverse}, pages of {limit}");
        }
    }
}

/// Many concurrent writers each followed by `force` all resolve `Ok`, and
/// every record reads back afterwards.
pub async fn force_covers_concurrent_writers(log: &impl TxnLog) {
    let recs: Vec<TxnRecord> = (0..64).map(|_| sample_record(Mode::TwoPhase, 2)).collect();
    let forces = recs.iter().map(|r| {
        log.write(r)
            .expect("force_covers_concurrent_writers: write");
        log.force()
    });
    for r in futures::future::join_all(forces).await {
        r.expect("force_covers_concurrent_writers: force failed");
    }
    for r in &recs {
        let got = log.get(&r.gtid).expect("get");
        assert_eq!(got.as_ref(), Some(r), "force_covers_concurrent_writers");
    }
    let stats = log.stats();
    assert!(
        stats.forces >= 64,
        "force_covers_concurrent_writers: forces counted"
    );
    assert!(
        stats.flushes >= 1 && stats.flushes <= stats.forces,
        "flushes counted"
    );
}

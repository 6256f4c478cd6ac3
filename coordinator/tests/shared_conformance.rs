//! The shared-store rules ([`shared_conformance`]) against the in-memory
//! store of the cluster simulation, and the hooks only the simulation
//! uses (the pause gate, injected failures, the spawned renewer).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tandem_coordinator::log::{
    LogError, SharedMemLog, SharedStore, TxnLog, conformance, shared_conformance,
};
use tandem_coordinator::model::{Decision, Mode, TxState};
use uuid::Uuid;

const LEASE: Duration = Duration::from_millis(600);

/// A store with a hand-driven clock; incarnations renew only when the
/// harness lets a lease pass.
struct MemHarness {
    store: Arc<SharedStore>,
    clock: Arc<AtomicU64>,
    logs: Mutex<Vec<Weak<SharedMemLog>>>,
    expired: Mutex<Vec<Uuid>>,
}

impl MemHarness {
    fn new() -> MemHarness {
        let clock = Arc::new(AtomicU64::new(1_000_000));
        let read = clock.clone();
        MemHarness {
            store: SharedStore::new(Arc::new(move || read.load(Ordering::SeqCst)), LEASE),
            clock,
            logs: Mutex::new(Vec::new()),
            expired: Mutex::new(Vec::new()),
        }
    }

    /// Moves the store's clock by `ms`, then every incarnation not expired
    /// renews.
    fn advance(&self, ms: u64) {
        self.clock.fetch_add(ms, Ordering::SeqCst);
        let expired = self.expired.lock().expect("expired").clone();
        for log in self
            .logs
            .lock()
            .expect("logs")
            .iter()
            .filter_map(Weak::upgrade)
        {
            if !expired.contains(&log.incarnation()) {
                log.renew();
            }
        }
    }
}

impl shared_conformance::SharedHarness for MemHarness {
    type Log = SharedMemLog;

    fn open(&self, name: &str, address: &str) -> Arc<SharedMemLog> {
        let log = SharedMemLog::open(self.store.clone(), name, address);
        self.logs.lock().expect("logs").push(Arc::downgrade(&log));
        log
    }

    async fn pass_lease(&self) {
        let step = LEASE.as_millis() as u64 / 3;
        for _ in 0..6 {
            self.advance(step);
        }
    }

    async fn expire(&self, log: &SharedMemLog) {
        self.expired
            .lock()
            .expect("expired")
            .push(log.incarnation());
        self.advance(LEASE.as_millis() as u64 + 1);
    }
}

#[tokio::test]
async fn shared_mem_log_follows_the_shared_store_rules() {
    shared_conformance::run_all(async || MemHarness::new()).await;
}

// The single-log contract holds too: each incarnation is a `TxnLog`.
#[tokio::test]
async fn shared_mem_log_conforms() {
    conformance::run_all(|| {
        let log = SharedMemLog::open(MemHarness::new().store, "conformance", "");
        Arc::into_inner(log).expect("a new log has one handle")
    })
    .await;
}

// A paused incarnation's force waits, and its buffered write lands when it
// resumes — after a takeover, fenced (what a GC pause past the lease does).
#[tokio::test(start_paused = true)]
async fn a_paused_incarnation_lands_its_writes_on_resume_and_is_fenced() {
    let h = MemHarness::new();
    let a = SharedMemLog::open(h.store.clone(), "a", "a:1");
    let b = SharedMemLog::open(h.store.clone(), "b", "b:1");
    let mut rec = conformance::sample_record(Mode::TwoPhase, 1);
    a.write(&rec).expect("write");
    a.force().await.expect("force");
    a.set_paused(true);
    rec.state = TxState::Committing;
    rec.decision = Some(Decision::Commit);
    a.write(&rec).expect("buffered");
    let forcing = tokio::spawn({
        let a = a.clone();
        async move { a.force().await }
    });
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        !forcing.is_finished(),
        "a paused incarnation's force returned"
    );
    assert_eq!(
        h.store.row(&rec.gtid).expect("row").state,
        TxState::Preparing,
        "a paused incarnation's write reached the store"
    );
    assert!(!a.renew(), "a paused incarnation renewed");
    h.clock
        .fetch_add(LEASE.as_millis() as u64 + 1, Ordering::SeqCst);
    assert_eq!(
        b.take_over_expired(10).await.expect("claim"),
        vec![rec.gtid]
    );
    a.set_paused(false);
    let forced = forcing.await.expect("task");
    assert!(matches!(forced, Err(LogError::Fenced(_))), "{forced:?}");
    let row = h.store.row(&rec.gtid).expect("row");
    assert_eq!(
        (row.owner, row.epoch, row.decision),
        (b.incarnation(), 2, None)
    );
}

// A plain write reaches the store by itself shortly after (as PgLog's
// flusher), not only at the next force.
#[tokio::test(start_paused = true)]
async fn a_plain_write_is_flushed_without_a_force() {
    let h = MemHarness::new();
    let a = SharedMemLog::open(h.store.clone(), "a", "a:1");
    let rec = conformance::sample_record(Mode::Tcc, 1);
    a.write(&rec).expect("write");
    assert!(h.store.row(&rec.gtid).is_none(), "flushed at once");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(h.store.row(&rec.gtid).expect("flushed").record, rec);
}

// An injected store failure fails the force and latches the log; a
// crashed incarnation's unflushed writes never land.
#[tokio::test(start_paused = true)]
async fn injected_failures_latch_and_a_crash_loses_the_buffer() {
    let h = MemHarness::new();
    let a = SharedMemLog::open(h.store.clone(), "a", "a:1");
    let rec = conformance::sample_record(Mode::Tcc, 1);
    a.write(&rec).expect("write");
    a.fail_next_force();
    let err = a.force().await.expect_err("an injected failure");
    assert!(matches!(err, LogError::Storage(_)), "{err:?}");
    assert!(
        a.write(&rec).is_err() && a.halted().is_some(),
        "not latched"
    );
    assert!(h.store.row(&rec.gtid).is_none(), "the failed batch landed");

    let b = SharedMemLog::open(h.store.clone(), "b", "b:1");
    b.write(&rec).expect("write");
    b.crash();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        h.store.row(&rec.gtid).is_none(),
        "a crashed process's write landed"
    );
    assert!(b.force().await.is_err(), "a crashed log forces");
}

// The spawned renewer keeps an incarnation's leases on the store's clock
// (tokio's here); a restart under its name makes the old one stop.
#[tokio::test(start_paused = true)]
async fn the_renewer_keeps_leases_and_stops_on_a_restart() {
    let start = tokio::time::Instant::now();
    let store = SharedStore::new(Arc::new(move || start.elapsed().as_millis() as u64), LEASE);
    let a = SharedMemLog::open(store.clone(), "a", "a:1");
    let b = SharedMemLog::open(store.clone(), "b", "b:1");
    let renewer = a.spawn_renewer(LEASE / 3);
    let rec = conformance::sample_record(Mode::Tcc, 1);
    a.write(&rec).expect("write");
    a.force().await.expect("force");
    tokio::time::sleep(LEASE * 5).await;
    assert!(
        b.take_over_expired(10).await.expect("sweep").is_empty(),
        "a live lease claimed"
    );
    assert!(a.stats().lease_renewals >= 10, "{:?}", a.stats());
    let again = SharedMemLog::open(store.clone(), "a", "a:2");
    tokio::time::sleep(LEASE).await;
    assert!(renewer.is_finished(), "the replaced incarnation renews on");
    assert!(
        matches!(a.force().await, Err(LogError::Halted(_))),
        "not latched"
    );
    assert_eq!(
        store.row(&rec.gtid).expect("row").owner,
        again.incarnation()
    );
}

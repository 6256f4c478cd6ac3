//! The shared-store rules ([`shared_conformance`]) against `PgLog` on a
//! real PostgreSQL: the same scenarios the simulation's in-memory store
//! passes (`coordinator/tests/shared_conformance.rs`), so both follow one
//! checked specification.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tandem_coordinator::log::{PgLog, PgOptions, shared_conformance};
use tandem_tests::pg::PgServer;

const LEASE: Duration = Duration::from_millis(600);

/// One database of the server; leases run out in real time.
struct PgHarness {
    url: String,
}

impl shared_conformance::SharedHarness for PgHarness {
    type Log = PgLog;

    fn open(&self, name: &str, address: &str) -> Arc<PgLog> {
        let mut o = PgOptions::new(&self.url, name);
        o.address = address.to_string();
        o.lease = LEASE;
        o.store_timeout = Duration::from_secs(5);
        o.pool_size = 2;
        Arc::new(PgLog::open(o).expect("open the log"))
    }

    async fn pass_lease(&self) {
        tokio::time::sleep(LEASE * 2).await;
    }

    async fn expire(&self, log: &PgLog) {
        log.pause_renewals(true);
        tokio::time::sleep(LEASE + Duration::from_millis(400)).await;
    }
}

async fn fresh(pg: &PgServer, count: &AtomicUsize) -> PgHarness {
    let n = count.fetch_add(1, Ordering::SeqCst);
    PgHarness {
        url: pg.create_database(&format!("shared{n}")).await,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_log_follows_the_shared_store_rules() {
    let pg = PgServer::start();
    let count = AtomicUsize::new(0);
    shared_conformance::run_all_but_removal(&async || fresh(&pg, &count).await).await;
}

// Issue 22, finding 1: EXPECTED TO FAIL on main until the `store` branch's
// first-write-only fix merges — PgLog's upsert lets a fenced former
// owner's write INSERT a row retention removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_log_fences_a_write_after_retention_removed_the_row() {
    let pg = PgServer::start();
    let count = AtomicUsize::new(0);
    shared_conformance::a_write_after_removal_is_fenced(&fresh(&pg, &count).await).await;
}

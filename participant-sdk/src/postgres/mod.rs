//! PostgreSQL participants (cargo feature `postgres`).
//!
//! - [`pool`]: a connection pool with bounded waits, so an unreachable
//!   database is an error within seconds, not a hang.
//! - [`PgBarrier`]: a [`BarrierStore`](crate::barrier::BarrierStore) in the
//!   participant's own database. [`PgBarrier::begin`] opens a transaction
//!   whose commit also stores the call's barrier record, so the business
//!   change and the record commit together (the TCC rule that a crash
//!   between them must not break idempotency).
//! - [`PgTwoPhase`]: 2PC on PostgreSQL's native two-phase commit. Prepare
//!   runs the handler's SQL and ends with `PREPARE TRANSACTION` under an id
//!   derived from `(gtid, branch)`; commit and rollback are
//!   `COMMIT PREPARED` / `ROLLBACK PREPARED`, idempotent.
//! - [`resolve_prepared`] / [`spawn_prepared_resolver`]: prepared
//!   transactions left behind by a crashed participant are finished by
//!   asking the coordinator (`GetOutcome`), so no lock is held forever.
//! - [`PgMessages`]: transactional messages from a business service:
//!   [`PgMessages::send`] records the message in the local transaction,
//!   and its [`MessageCheck`](crate::MessageCheck) answers the
//!   coordinator's back-check from that record, finally.
//!
//! # TLS
//!
//! The connection string's `sslmode` (`disable`, `allow`, `prefer` — the
//! default —, `require`, `verify-ca`, `verify-full`), `sslrootcert`,
//! `sslcert` and `sslkey` are honoured, through rustls. Every TLS
//! connection verifies the server's certificate and host name (against
//! `sslrootcert`, else the system's roots): `prefer` uses TLS when the
//! server offers it, `require` and the `verify-*` modes refuse a server
//! without it. Unlike libpq, no mode accepts an unverified certificate.
//!
//! The server needs `max_prepared_transactions` above zero for 2PC (it is 0
//! by default); [`PgTwoPhase::new`] checks it. The driver is tokio-postgres
//! (pure Rust, no libpq, the async driver most Rust PostgreSQL crates build
//! on) with deadpool-postgres for pooling.
//!
//! Tables (created on first use, inside an advisory lock so concurrent
//! starts do not race): `tandem_barrier` (one row per branch),
//! `tandem_prepared_commits` (one row per committed prepared transaction,
//! written inside it; how a repeated commit tells "already committed" from
//! "rolled back") and `tandem_messages` (one row per transactional message
//! sent with [`PgMessages`], written by its local transaction, or by its
//! back-check when that transaction did not commit).

mod barrier;
mod branch_lock;
mod branch_tx;
mod message;
mod resolver;
mod two_phase;

pub use barrier::PgBarrier;
pub use branch_tx::BranchTx;
pub use message::{MessageError, PgMessages};
// The connection set-up (pool, TLS, errors) is shared with the coordinator's
// PostgreSQL log.
pub use resolver::{
    ResolveError, Resolved, resolve_prepared, spawn_prepared_resolver, spawn_prepared_resolver_with,
};
pub use tandem_common::postgres::tokio_postgres;
pub use tandem_common::postgres::{PgError, Pool, deadpool_postgres, describe, pool};
pub use two_phase::{PgPrepare, PgTwoPhase};

use crate::barrier::{BarrierError, BranchKey};
use crate::handler::HandlerError;

impl From<PgError> for HandlerError {
    fn from(e: PgError) -> Self {
        HandlerError::new(e.to_string())
    }
}

impl From<PgError> for BarrierError {
    fn from(e: PgError) -> Self {
        BarrierError(e.to_string())
    }
}

/// `?` on driver calls inside handlers.
impl From<tokio_postgres::Error> for HandlerError {
    fn from(e: tokio_postgres::Error) -> Self {
        PgError::from(e).into()
    }
}

/// The prepared-transaction id of a branch: `tandem:<gtid>:<branch>`.
pub fn gid(key: BranchKey) -> String {
    format!("{GID_PREFIX}{}:{}", key.gtid, key.branch_id)
}

const GID_PREFIX: &str = "tandem:";

/// The inverse of [`gid`]; `None` for ids Tandem did not make.
pub fn parse_gid(gid: &str) -> Option<BranchKey> {
    let rest = gid.strip_prefix(GID_PREFIX)?;
    let (gtid, branch) = rest.split_once(':')?;
    Some(BranchKey {
        gtid: crate::Gtid::parse_str(gtid).ok()?,
        branch_id: branch.parse().ok()?,
    })
}

/// Creates Tandem's tables if they are missing.
async fn migrate(pool: &Pool) -> Result<(), PgError> {
    let mut conn = pool.get().await?;
    let tx = conn.transaction().await?;
    // Serialises concurrent first starts: CREATE ... IF NOT EXISTS alone
    // can still fail on a race in the catalog.
    tx.execute("SELECT pg_advisory_xact_lock(7366812)", &[])
        .await?;
    tx.batch_execute(SCHEMA).await?;
    tx.commit().await?;
    Ok(())
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS tandem_barrier (
    gtid uuid NOT NULL,
    branch_id bigint NOT NULL,
    mark smallint NOT NULL,
    updated_ms bigint NOT NULL,
    resource text,
    payload bytea,
    epoch bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (gtid, branch_id)
);
CREATE INDEX IF NOT EXISTS tandem_barrier_tried
    ON tandem_barrier (updated_ms) WHERE mark = 1;
-- The highest coordinator epoch seen per branch, added to tables an earlier
-- version made (their rows at 0). Only when the column is missing: ALTER
-- TABLE takes an ACCESS EXCLUSIVE lock even when it has nothing to do, and
-- would wait for every prepared transaction that read the table
-- (PgTwoPhase), which only this participant, once started, finishes.
DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_attribute
            WHERE attrelid = 'tandem_barrier'::regclass
              AND attname = 'epoch' AND NOT attisdropped) THEN
        ALTER TABLE tandem_barrier ADD COLUMN IF NOT EXISTS epoch bigint NOT NULL DEFAULT 0;
    END IF;
END $$;
CREATE TABLE IF NOT EXISTS tandem_prepared_commits (
    gtid uuid NOT NULL,
    branch_id bigint NOT NULL,
    PRIMARY KEY (gtid, branch_id)
);
-- Transactional messages (PgMessages): true, written by the message's
-- local transaction; false, by its back-check when no committed row was
-- there (a late local transaction then fails on the key).
CREATE TABLE IF NOT EXISTS tandem_messages (
    gtid uuid PRIMARY KEY,
    committed boolean NOT NULL,
    updated_ms bigint NOT NULL
);
CREATE INDEX IF NOT EXISTS tandem_messages_updated ON tandem_messages (updated_ms);
-- How far PgMessages::purge_older_than has removed rows: a check that
-- finds no row for a message that old cannot answer no (its row may have
-- been purged).
CREATE TABLE IF NOT EXISTS tandem_messages_horizon (
    id smallint PRIMARY KEY CHECK (id = 0),
    purged_before_ms bigint NOT NULL
);
";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gid_round_trips_and_rejects_foreign_ids() {
        let key = BranchKey {
            gtid: crate::Gtid::now_v7(),
            branch_id: u32::MAX,
        };
        assert_eq!(parse_gid(&gid(key)), Some(key));
        assert!(gid(key).len() <= 200, "PostgreSQL limits gids to 200 bytes");
        for foreign in [
            "",
            "tandem:",
            "tandem:x:1",
            "other:1:2",
            "tandem:00000000-0000-0000-0000-000000000000",
        ] {
            assert_eq!(parse_gid(foreign), None, "{foreign:?}");
        }
    }
}

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
//! starts do not race): `tandem_barrier` (one row per branch) and
//! `tandem_prepared_commits` (one row per committed prepared transaction,
//! written inside it; how a repeated commit tells "already committed" from
//! "rolled back").

mod barrier;
mod branch_lock;
mod branch_tx;
mod resolver;
mod tls;
mod two_phase;

use std::time::Duration;

pub use barrier::PgBarrier;
pub use branch_tx::BranchTx;
pub use deadpool_postgres::{self, Pool};
pub use resolver::{
    ResolveError, Resolved, resolve_prepared, spawn_prepared_resolver, spawn_prepared_resolver_with,
};
pub use tokio_postgres;
pub use two_phase::{PgPrepare, PgTwoPhase};

use crate::barrier::{BarrierError, BranchKey};
use crate::handler::HandlerError;

/// A PostgreSQL error, with the server's message and SQLSTATE when there is
/// one.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("postgres: {0}")]
pub struct PgError(pub String);

impl From<tokio_postgres::Error> for PgError {
    fn from(e: tokio_postgres::Error) -> Self {
        PgError(describe(&e))
    }
}

impl From<deadpool_postgres::PoolError> for PgError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            deadpool_postgres::PoolError::Backend(e) => e.into(),
            other => PgError(format!("no database connection: {other}")),
        }
    }
}

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

/// The server's message, detail and SQLSTATE, or the driver's error.
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = format!("{} (SQLSTATE {})", db.message(), db.code().code());
            if let Some(detail) = db.detail() {
                s.push_str(": ");
                s.push_str(detail);
            }
            if let Some(hint) = db.hint() {
                s.push_str("; hint: ");
                s.push_str(hint);
            }
            s
        }
        None => {
            let source = std::error::Error::source(e).map(|s| format!(": {s}"));
            format!("{e}{}", source.unwrap_or_default())
        }
    }
}

/// How long a call waits for a connection, and a new connection for the
/// server, before it fails.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A pool of up to `size` connections to `url` (`postgres://user@host:port/db`
/// or `host=… port=… user=… dbname=…`). Connections are made on first use;
/// a call that cannot get one within 5 s fails with a [`PgError`].
///
/// TLS follows libpq's `sslmode`, `sslrootcert`, `sslcert` and `sslkey`
/// (rustls; the server's certificate is always verified, see
/// the module docs): `postgres://app@db/bank?sslmode=verify-full&sslrootcert=/etc/tandem/pg-ca.pem`.
///
/// # Errors
///
/// `url` does not parse, or its TLS files cannot be read.
pub fn pool(url: &str, size: usize) -> Result<Pool, PgError> {
    let (rest, tls) = tls::split(url)?;
    let mut config: tokio_postgres::Config = rest
        .parse()
        .map_err(|e| PgError(format!("bad connection string: {e}")))?;
    config.ssl_mode(tls.ssl_mode()?);
    config.connect_timeout(CONNECT_TIMEOUT);
    if config.get_application_name().is_none() {
        config.application_name("tandem-participant");
    }
    let manager_config = || deadpool_postgres::ManagerConfig {
        recycling_method: deadpool_postgres::RecyclingMethod::Fast,
    };
    let manager = match tls.connector()? {
        Some(tls) => deadpool_postgres::Manager::from_config(config, tls, manager_config()),
        None => {
            deadpool_postgres::Manager::from_config(config, tokio_postgres::NoTls, manager_config())
        }
    };
    Pool::builder(manager)
        .max_size(size.max(1))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .wait_timeout(Some(CONNECT_TIMEOUT))
        .create_timeout(Some(CONNECT_TIMEOUT))
        .recycle_timeout(Some(CONNECT_TIMEOUT))
        .build()
        .map_err(|e| PgError(format!("cannot build the pool: {e}")))
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

    #[test]
    fn bad_connection_strings_are_errors() {
        assert!(pool("postgres://[::1", 2).is_err());
        assert!(pool("host=127.0.0.1 port=5432 user=x", 2).is_ok());
    }
}

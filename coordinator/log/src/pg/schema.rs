//! The PostgreSQL schema of [`super::PgLog`] and the migration that makes it.
//!
//! Tables (all prefixed `tandem_`, so the log can share a database):
//!
//! - `tandem_txns`: one row per transaction. `record` is the same encoding
//!   sled stores; `state` and `decision` are copied out of it for filters
//!   and for the decision's compare-and-set; `owner` (the incarnation of
//!   the coordinator that drives it) and `epoch` (bumped by every
//!   takeover) are the ownership.
//! - `tandem_payloads`: branch payloads over 512 bytes, written once.
//! - `tandem_instances`: one row per running coordinator (its name,
//!   incarnation, address, heartbeat and `lease_until`, on the database's
//!   clock). A transaction's lease is its owner's: renewing it writes this
//!   row alone, however many transactions the owner has.
//! - `tandem_decisions` (migration 3): decision tombstones, one row per
//!   finished transaction retention compacted (see `super::tombstone`).
//! - `tandem_horizon` (migration 3): one row, how far retention has
//!   forgotten (`purged_ms`, `forgotten_ms`, gtid times).
//! - `tandem_schema`: the applied migration versions.

use tandem_common::postgres::deadpool_postgres::Client;

use crate::model::TxState;

use super::super::codec::state_code;

/// The migration, version by version. Only ever append.
const MIGRATIONS: &[(i32, &str)] = &[(1, INITIAL), (2, INSTANCE_LEASES), (3, DECISION_TOMBSTONES)];

/// Version 1: the tables.
const INITIAL: &str = "CREATE TABLE tandem_txns (
        gtid uuid PRIMARY KEY,
        state smallint NOT NULL,
        decision smallint,
        record bytea NOT NULL,
        owner uuid NOT NULL,
        epoch bigint NOT NULL,
        lease_until timestamptz NOT NULL,
        updated_at timestamptz NOT NULL DEFAULT now()
    );
    CREATE INDEX tandem_txns_unfinished_owner ON tandem_txns (owner)
        WHERE state IN (1, 2, 3, 5, 7);
    CREATE INDEX tandem_txns_unfinished_lease ON tandem_txns (lease_until)
        WHERE state IN (1, 2, 3, 5, 7);
    CREATE TABLE tandem_payloads (
        gtid uuid NOT NULL,
        branch integer NOT NULL,
        payload bytea NOT NULL,
        PRIMARY KEY (gtid, branch)
    );
    CREATE TABLE tandem_instances (
        incarnation uuid PRIMARY KEY,
        name text NOT NULL,
        address text NOT NULL,
        started_at timestamptz NOT NULL DEFAULT now(),
        heartbeat_at timestamptz NOT NULL DEFAULT now()
    );
    CREATE INDEX tandem_instances_name ON tandem_instances (name);";

/// Version 2 (issue 22): one lease per incarnation instead of one per row.
/// Renewing a lease rewrote every unfinished row an instance owned, STUCK
/// ones included, every third of the lease, forever; now renewal writes
/// the instance's row alone, and a row's lease is its owner's. Each
/// registered incarnation keeps the longest lease its rows had. An older
/// tandem still running on the store names the dropped column in its
/// writes and claims: it fails there and stops deciding (it is fenced),
/// and its rows are taken over once its lease has run out.
const INSTANCE_LEASES: &str = "
    ALTER TABLE tandem_instances ADD COLUMN lease_until timestamptz;
    UPDATE tandem_instances i SET lease_until = greatest(i.heartbeat_at,
        (SELECT max(t.lease_until) FROM tandem_txns t WHERE t.owner = i.incarnation));
    ALTER TABLE tandem_instances ALTER COLUMN lease_until SET NOT NULL,
        ALTER COLUMN lease_until SET DEFAULT now();
    DROP INDEX tandem_txns_unfinished_lease;
    ALTER TABLE tandem_txns DROP COLUMN lease_until;";

/// Version 3 (issue 22): decision tombstones and the retention horizon.
const DECISION_TOMBSTONES: &str = "CREATE TABLE tandem_decisions (
        gtid uuid PRIMARY KEY,
        decision smallint NOT NULL,
        mode smallint NOT NULL,
        created_ms bigint NOT NULL,
        finished_ms bigint NOT NULL,
        branches integer NOT NULL,
        resolved integer NOT NULL,
        kept_at timestamptz NOT NULL DEFAULT now()
    );
    CREATE INDEX tandem_decisions_finished ON tandem_decisions (finished_ms);
    CREATE TABLE tandem_horizon (
        one boolean PRIMARY KEY DEFAULT true CHECK (one),
        purged_ms bigint NOT NULL DEFAULT 0,
        forgotten_ms bigint NOT NULL DEFAULT 0
    );
    INSERT INTO tandem_horizon DEFAULT VALUES;";

/// The states a transaction is unfinished in (owned, leased, recovered).
pub(super) const UNFINISHED: [TxState; 5] = [
    TxState::Active,
    TxState::Preparing,
    TxState::Committing,
    TxState::Aborting,
    TxState::Stuck,
];

/// `UNFINISHED` as stored codes, for `state = ANY($n)`.
pub(super) fn unfinished_codes() -> Vec<i16> {
    UNFINISHED.iter().map(|s| code(*s)).collect()
}

/// A state as stored in the `state` column.
pub(super) fn code(state: TxState) -> i16 {
    state_code(state) as i16
}

/// Brings the schema up to date, once even when several coordinators
/// start together (a transaction-scoped advisory lock serialises them;
/// nothing else uses one).
pub(super) async fn migrate(client: &mut Client) -> Result<(), String> {
    let tx = client
        .transaction()
        .await
        .map_err(|e| format!("cannot start the migration: {e}"))?;
    // 0x74616e64 = "tand": the lock key of Tandem's migration.
    tx.execute("SELECT pg_advisory_xact_lock(1952542308)", &[])
        .await
        .map_err(|e| format!("cannot lock the migration: {e}"))?;
    // `CREATE … IF NOT EXISTS` on a store already set up answers with a
    // NOTICE ("already exists, skipping"), which the driver would log at
    // INFO on every start: only warnings and errors, for this transaction.
    tx.batch_execute("SET LOCAL client_min_messages = warning")
        .await
        .map_err(|e| format!("cannot set up the migration: {e}"))?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS tandem_schema (
            version integer PRIMARY KEY,
            applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .await
    .map_err(|e| format!("cannot create tandem_schema: {e}"))?;
    let applied: Option<i32> = tx
        .query_one("SELECT max(version) FROM tandem_schema", &[])
        .await
        .map_err(|e| format!("cannot read tandem_schema: {e}"))?
        .get(0);
    let applied = applied.unwrap_or(0);
    let newest = MIGRATIONS.last().map_or(0, |m| m.0);
    if applied > newest {
        return Err(format!(
            "the store's schema is version {applied}, newer than this tandem knows \
             ({newest}): run the newer tandem, or give this one a store of its own"
        ));
    }
    for (version, sql) in MIGRATIONS.iter().filter(|m| m.0 > applied) {
        tx.batch_execute(sql)
            .await
            .map_err(|e| format!("migration {version} failed: {e}"))?;
        tx.execute(
            "INSERT INTO tandem_schema (version) VALUES ($1)",
            &[version],
        )
        .await
        .map_err(|e| format!("cannot record migration {version}: {e}"))?;
    }
    tx.commit()
        .await
        .map_err(|e| format!("cannot commit the migration: {e}"))
}

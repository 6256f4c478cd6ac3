//! PostgreSQL connections (cargo feature `postgres`), as the participant
//! SDK's PostgreSQL stores and the coordinator's PostgreSQL log open them.
//!
//! - [`pool`]: a connection pool with bounded waits, so an unreachable
//!   database is an error within seconds, not a hang.
//! - TLS follows libpq's `sslmode`, `sslrootcert`, `sslcert` and `sslkey`,
//!   through rustls (see [`pool`]).
//!
//! The driver is tokio-postgres (pure Rust, no libpq) with
//! deadpool-postgres for pooling; both are re-exported.

mod tls;

use std::time::Duration;

pub use deadpool_postgres::{self, Pool};
pub use tokio_postgres;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_connection_strings_are_errors() {
        assert!(pool("postgres://[::1", 2).is_err());
        assert!(pool("host=127.0.0.1 port=5432 user=x", 2).is_ok());
    }
}

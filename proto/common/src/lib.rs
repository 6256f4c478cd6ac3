//! What Tandem's two sides share, so that neither depends on the other: the
//! coordinator (`tandem-coordinator` and the crates under `coordinator/`)
//! and the participant SDK (`tandem-sdk`, which re-exports these modules
//! under the same names).
//!
//! - [`security`]: bearer tokens and client endpoints; with feature `tls`,
//!   TLS (server certificates reloaded in place, client TLS), access lists
//!   and roles.
//! - [`health`] (feature `health`): `grpc.health.v1` for a server that
//!   stops gracefully.
//! - [`sled_sync`] (feature `sled`): durable, group-committed writes to a
//!   sled database.
//! - [`postgres`] (feature `postgres`): PostgreSQL connection pools with
//!   libpq-style TLS settings.

#[cfg(feature = "health")]
pub mod health;
#[cfg(feature = "postgres")]
pub mod postgres;
pub mod security;
#[cfg(feature = "sled")]
pub mod sled_sync;

//! Runnable Tandem services to copy.
//!
//! - [`bank`]: a bank shard as a 2PC participant (debit / credit legs, funds
//!   held between prepare and commit).
//! - [`sled_bank`]: the same shard with its accounts in sled, written in the
//!   barrier's own transactions (durable across crashes).
//! - [`pg_bank`]: the shard in PostgreSQL: 2PC on prepared transactions,
//!   TCC with the barrier in the same transaction as the business change.
//! - [`secure`]: the security flags of an example participant (TLS, mutual
//!   TLS, obeying only coordinators, reaching the coordinator securely),
//!   each one call of the SDK's security API.
//! - `src/bin/bank-postgres.rs`: serves one PostgreSQL shard, and audits
//!   shards (sum, negative balances, leftover holds and prepared
//!   transactions).
//! - `src/bin/bank-participant.rs`: serves one bank shard (in memory, or in
//!   sled with `--data-dir`).
//! - `src/bin/transfer.rs`: a business service moving money between two
//!   shards through a coordinator.
//!
//! `tandem demo` runs two bank shards and hundreds of transfers in one
//! process using [`bank`].

pub mod bank;
pub mod pg_bank;
pub mod secure;
pub mod sled_bank;

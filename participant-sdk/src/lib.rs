//! Tandem's SDK: what your services write code against.
//!
//! Module map:
//! - [`handler`]: the [`TwoPhase`], [`Tcc`] and [`Saga`] handler traits a
//!   participant implements for each resource, with [`BranchContext`],
//!   [`Vote`] and [`HandlerError`]; for transactional messages,
//!   [`Message`] (a delivery) and [`MessageCheck`] (the business
//!   service's back-check).
//! - [`barrier`]: what makes handlers safe against repeated and disordered
//!   calls (duplicate confirms, cancel before try, try after cancel); the
//!   [`BarrierStore`](barrier::BarrierStore) trait, [`MemBarrier`](barrier::MemBarrier)
//!   and [`SledBarrier`].
//! - [`server`]: [`ParticipantServer`], which registers handlers by resource
//!   name and serves the `Participant` gRPC service the coordinator calls.
//! - [`client`]: [`TransactionClient`], which a business service uses to run
//!   global transactions (`begin` / `enlist` / `commit` / `rollback`, or
//!   one-shot `submit`) and transactional messages (`prepare_message`,
//!   then `submit_message` after the local commit).
//! - `in_doubt`: resolving branches that heard nothing, by asking the
//!   coordinator ([`ParticipantServer::resolve_in_doubt`]).
//! - [`trace`]: W3C trace context ([`TraceParent`], [`TraceContext`]) carried
//!   from the business client through the coordinator into each handler's
//!   span.
//! - [`metrics`]: [`ParticipantMetrics`], Prometheus metrics of handlers
//!   (latency, results) and of the barrier (duplicates, empty rollbacks,
//!   refused hanging tries).
//! - [`error`]: [`Error`], the typed errors of the client.
//! - [`sled_sync`]: durable writes to a sled database, with group commit.
//! - [`proto`]: the gRPC contract's generated types; [`tonic`], [`bytes`],
//!   [`sled`], [`tokio`], [`uuid`] and [`prometheus_client`] re-exported,
//!   so a service needs no other dependency to use the types in the SDK's
//!   signatures.
//! - `postgres` (feature `postgres`): 2PC on PostgreSQL prepared
//!   transactions, a barrier store in the handler's own transaction,
//!   resolution of prepared transactions a crash left behind, and
//!   transactional messages sent from a PostgreSQL transaction
//!   (`PgMessages`).
//!
//! # Features
//!
//! A service takes the part it uses. The default is everything but
//! PostgreSQL (what the SDK offered before it had features); a slimmer
//! service turns the default off and names its features:
//!
//! | feature | adds | pulls in |
//! |---|---|---|
//! | `client` | [`TransactionClient`] (transactions and transactional messages), [`Error`], [`ClientOptions`] | tonic over plain `http://` |
//! | `participant` | `client`, and [`ParticipantServer`], the handler traits (message deliveries and back-checks too), the barrier in memory ([`barrier::MemBarrier`]), health checks | tonic-health |
//! | `sled` | `participant`, and [`SledBarrier`], [`sled_sync`], the [`sled`] re-export | sled |
//! | `postgres` | `participant` and `tls`, and the `postgres` module (`PgBarrier`, `PgTwoPhase`, `PgMessages`) | tokio-postgres, deadpool-postgres |
//! | `metrics` | `participant`, and [`ParticipantMetrics`] | prometheus-client |
//! | `otel` | handler spans as OpenTelemetry children; the client's traceparent from the current OpenTelemetry span | opentelemetry, tracing-opentelemetry |
//! | `tls` | `https://` addresses ([`security::ClientTls`]), [`ParticipantServer::tls`] and [`ParticipantServer::only_coordinators`] (access lists) | rustls, x509-parser |
//!
//! ```toml
//! # A business service that only starts transactions:
//! tandem-sdk = { version = "0.1", default-features = false, features = ["client"] }
//! # A participant with the in-memory barrier, over TLS:
//! tandem-sdk = { version = "0.1", default-features = false, features = ["participant", "tls"] }
//! # A PostgreSQL participant with metrics:
//! tandem-sdk = { version = "0.1", default-features = false, features = ["postgres", "metrics"] }
//! ```
//!
//! Without `tls`, an `https://` address is refused with an error naming
//! the feature, never called in cleartext. `examples/client_only.rs` and
//! `examples/participant_only.rs` build with `client` and `participant`
//! alone.
//!
//! # Example
//!
//! A participant with one 2PC resource, and a business service submitting a
//! one-shot transaction through a coordinator at `http://127.0.0.1:7070`:
//!
//! ```no_run
//! # #[cfg(feature = "participant")] mod doc {
//! use tandem_sdk::{Branch, BranchContext, HandlerError, Mode, ParticipantServer,
//!                  TransactionClient, TwoPhase, Vote};
//!
//! struct Inventory;
//!
//! impl TwoPhase for Inventory {
//!     async fn prepare(&self, _ctx: &BranchContext, payload: &[u8]) -> Result<Vote, HandlerError> {
//!         // Reserve the items durably, then vote.
//!         if payload.is_empty() { return Ok(Vote::no("nothing to reserve")); }
//!         Ok(Vote::yes())
//!     }
//!     async fn commit(&self, _ctx: &BranchContext, _payload: &[u8]) -> Result<(), HandlerError> {
//!         Ok(()) // make the reservation permanent (idempotent)
//!     }
//!     async fn rollback(&self, _ctx: &BranchContext, _payload: &[u8]) -> Result<(), HandlerError> {
//!         Ok(()) // release the reservation, if any (idempotent)
//!     }
//! }
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! // The participant service.
//! let participant = ParticipantServer::new()
//!     .two_phase("inventory", Inventory)
//!     .spawn("127.0.0.1:9001".parse()?)
//!     .await?;
//!
//! // A business service.
//! let client = TransactionClient::connect("http://127.0.0.1:7070").await?;
//! let done = client
//!     .submit(Mode::TwoPhase, vec![Branch::new(participant.url(), "inventory", "sku-42:1")])
//!     .await?;
//! println!("committed {}", done.gtid);
//! # Ok(()) }
//! # }
//! ```

#[cfg(feature = "participant")]
pub mod barrier;
#[cfg(feature = "client")]
pub mod client;
#[cfg(feature = "client")]
pub mod error;
#[cfg(feature = "participant")]
pub mod handler;
#[cfg(feature = "participant")]
mod in_doubt;
#[cfg(feature = "metrics")]
pub mod metrics;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "participant")]
pub mod server;
// Shared with the coordinator (crates `tandem-common`, `tandem-trace`).
pub use tandem_common::security;
#[cfg(feature = "sled")]
pub use tandem_common::sled_sync;
pub use tandem_trace as trace;

#[cfg(feature = "participant")]
pub use barrier::Phase;
#[cfg(feature = "sled")]
pub use barrier::SledBarrier;
#[cfg(feature = "client")]
pub use client::{
    Branch, ClientOptions, CommitOutcome, Enlisted, Mode, Outcome, Submitted, TransactionClient,
};
#[cfg(feature = "client")]
pub use error::Error;
#[cfg(feature = "participant")]
pub use handler::{BranchContext, HandlerError, Message, MessageCheck, Saga, Tcc, TwoPhase, Vote};
#[cfg(feature = "metrics")]
pub use metrics::ParticipantMetrics;
#[cfg(feature = "participant")]
pub use server::{ParticipantServer, RunningParticipant, ServeError};
pub use tandem_proto::v1::{AbortCause, AbortInfo};
pub use trace::{TraceContext, TraceParent};

/// A global transaction id (UUID v7).
pub type Gtid = uuid::Uuid;

// The crates whose types appear in the SDK's API, re-exported so that a
// service depends on `tandem-sdk` alone and always gets the versions the
// SDK was built with. `tokio` is the runtime the SDK runs on: with
// `tandem_sdk::tokio`, `#[tandem_sdk::tokio::main(crate = "tandem_sdk::tokio")]`
// starts it without a direct dependency.
pub use bytes::{self, Bytes};
/// For [`ParticipantMetrics::register_into`]'s registry.
#[cfg(feature = "metrics")]
pub use prometheus_client;
#[cfg(feature = "sled")]
pub use sled;
pub use tokio;
pub use tonic::transport::{Channel, Endpoint};
pub use tonic::{self, Code, Status};
/// For [`server::health`]'s types (`HealthServer`, `ServingStatus`).
#[cfg(feature = "participant")]
pub use tonic_health;
pub use uuid;

/// The gRPC contract (`tandem.v1`) as generated types: what
/// [`TransactionClient::get`] returns ([`proto::TransactionInfo`], with
/// [`proto::TxState`] and the branches' states), and the raw
/// `Participant` / `Coordinator` clients and servers for anything the SDK
/// does not wrap.
pub use tandem_proto::v1 as proto;

//! Tandem's coordinator: makes a change spanning several services happen
//! everywhere or nowhere, by 2PC or TCC.
//!
//! This crate (`tandem-coordinator`) is the server library: the runtime
//! and services over the engine (crate `tandem-engine`) and the log (crate
//! `tandem-log`), both re-exported here. The `tandem` binary and its
//! commands are the crate `tandem-cli` (`coordinator/cli`); DESIGN.md's
//! "Crates" section draws the graph.
//!
//! Module map:
//! - [`model`]: the transaction record (states, branches); plain data
//!   (`tandem-engine`).
//! - [`labels`]: caller labels (`order_id=42`) kept with a record
//!   (`tandem-engine`).
//! - [`engine`]: the pure per-transaction state machine (events → commands;
//!   the crate `tandem-engine`).
//! - [`log`]: the durable log — the [`log::TxnLog`] contract, [`log::SledLog`],
//!   [`log::MemLog`], `log::PgLog` (feature `postgres`), the shared store in
//!   memory for the cluster simulation ([`log::SharedStore`],
//!   [`log::SharedMemLog`]), and the conformance suites (the crate
//!   `tandem-log`).
//! - [`wake`]: wake-ups in an order a seeded run replays (`tandem-log`).
//! - [`runtime`]: carries out engine commands (log writes, group-committed
//!   forces, participant calls, retries, deadlines).
//! - [`service`]: the tonic Coordinator and Admin services.
//! - [`server`]: serving both services with recovery and graceful shutdown.
//! - [`admin_http`]: the admin HTTP listener: JSON API, web console, `/metrics`.
//! - [`metrics`]: Prometheus metrics (counters, histograms, gauges read at scrape).
//! - [`config`]: [`config::CoordinatorConfig`] with defaults and validation.
//! - [`security`]: TLS, tokens and access files as `tandem serve` and its
//!   clients set them up (the shared parts are the crate `tandem-common`).
//! - [`redact`]: secrets kept out of every printed line (log lines, errors,
//!   `--print-config`).
//! - [`logging`]: log lines on stderr (text or JSON), secrets scrubbed.
//! - [`error`]: [`error::CoordError`] and its mapping to gRPC status codes.
//! - [`failpoint`]: named crash points for crash tests (cargo feature
//!   `failpoints`; no-ops otherwise).
//! - [`alerts`]: the webhook told of STUCK transactions and failing branches.
//! - [`otel`]: OpenTelemetry export of the coordinator's spans
//!   (`--otlp-endpoint`).
//! - [`cli`]: the Admin service's client: `tandem tx list|show|retry|abort`
//!   and the transaction view the admin HTTP API answers in.

pub mod admin_http;
pub mod alerts;
pub mod cli;
pub mod config;
pub mod error;
pub mod failpoint;
pub mod logging;
pub mod metrics;
pub mod otel;
pub mod redact;
pub mod runtime;
pub mod security;
pub mod server;
pub mod service;

// The engine crate: the state machine, the record it works on, caller labels.
pub use tandem_engine::{self as engine, labels, model};
// The log crate: the TxnLog contract and its stores.
pub use tandem_log::{self as log, wake};

pub use config::CoordinatorConfig;
pub use runtime::Coordinator;
pub use server::RunningCoordinator;

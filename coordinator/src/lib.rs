//! Tandem's coordinator: makes a change spanning several services happen
//! everywhere or nowhere, by 2PC or TCC.
//!
//! Module map:
//! - [`model`]: the transaction record (states, branches); plain data.
//! - [`labels`]: caller labels (`order_id=42`) kept with a record.
//! - [`engine`]: the pure per-transaction state machine (events → commands).
//! - [`log`]: the durable log — the [`log::TxnLog`] contract, [`log::SledLog`],
//!   [`log::MemLog`], [`log::PgLog`], the shared store in memory for the
//!   cluster simulation ([`log::SharedStore`], [`log::SharedMemLog`]), and
//!   the conformance suites.
//! - [`runtime`]: carries out engine commands (log writes, group-committed
//!   forces, participant calls, retries, deadlines).
//! - [`service`]: the tonic Coordinator and Admin services.
//! - [`server`]: serving both services with recovery and graceful shutdown.
//! - [`admin_http`]: the admin HTTP listener: JSON API, web console, `/metrics`.
//! - [`metrics`]: Prometheus metrics (counters, histograms, gauges read at scrape).
//! - [`config`]: [`config::CoordinatorConfig`] with defaults and validation.
//! - [`config_file`]: `--config FILE`, any flag of `tandem serve` from TOML.
//! - [`redact`]: secrets kept out of every printed line (log lines, errors,
//!   `--print-config`).
//! - [`serve_cli`]: `tandem serve`'s flags and running a coordinator.
//! - [`error`]: [`error::CoordError`] and its mapping to gRPC status codes.
//! - [`failpoint`]: named crash points for crash tests (cargo feature
//!   `failpoints`; no-ops otherwise).
//! - [`alerts`]: the webhook told of STUCK transactions and failing branches.
//! - [`bench`]: `tandem bench`, throughput / latency / durability cost against
//!   the machine's echo floor.
//! - [`otel`]: OpenTelemetry export of the coordinator's spans
//!   (`--otlp-endpoint`).
//! - [`cli`]: `tandem tx list|show|retry|abort` over the Admin service.
//! - [`log_cli`]: `tandem log check`, the offline report on a log.
//! - [`demo`]: `tandem demo`, bank transfers across two participant services.
//!
//! The `tandem` binary (`src/main.rs`) only parses arguments and calls these.

pub mod admin_http;
pub mod alerts;
pub mod bench;
pub mod certs;
pub mod cli;
pub mod config;
pub mod config_file;
pub mod demo;
pub mod error;
pub mod failpoint;
pub mod log_cli;
pub mod logging;
pub mod metrics;
pub mod otel;
pub mod redact;
pub mod runtime;
pub mod security;
pub mod serve_cli;
pub mod server;
pub mod service;
pub mod store_cli;

// The engine crate: the state machine, the record it works on, caller labels.
pub use tandem_engine::{self as engine, labels, model};
// The log crate: the TxnLog contract and its stores.
pub use tandem_log::{self as log, wake};

pub use config::CoordinatorConfig;
pub use runtime::Coordinator;
pub use server::RunningCoordinator;

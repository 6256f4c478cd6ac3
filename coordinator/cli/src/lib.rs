//! The `tandem` binary's commands, over the coordinator library
//! (`tandem-coordinator`): the binary (`src/main.rs`) only parses
//! arguments and calls these.
//!
//! - [`serve_cli`]: `tandem serve`'s flags and running a coordinator.
//! - [`config_file`]: `--config FILE`, any flag of `tandem serve` from TOML.
//! - [`store_cli`]: `--store` (sled or PostgreSQL) and `tandem cluster status`.
//! - [`log_cli`]: `tandem log check`, the offline report on a log.
//! - [`demo`]: `tandem demo`, bank transfers across two participant services.
//! - [`bench`]: `tandem bench`, throughput / latency / durability cost against
//!   the machine's echo floor.
//! - [`certs`]: `tandem certs dev`, certificates and tokens for development
//!   and tests.
//!
//! - [`tx_submit`]: `tandem tx submit`, one transaction through the SDK's
//!   client.
//!
//! The other `tandem tx` verbs are the coordinator library's Admin client
//! (`tandem_coordinator::cli`).

pub mod bench;
pub mod certs;
pub mod config_file;
pub mod demo;
pub mod demo_order;
pub mod log_cli;
pub mod serve_cli;
pub mod store_cli;
pub mod tx_submit;

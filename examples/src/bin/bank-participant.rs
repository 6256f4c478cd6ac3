//! Serves one bank shard as a Tandem participant: resource `accounts` for
//! 2PC, `accounts-tcc` for TCC (try freezes funds, confirm moves them,
//! cancel unfreezes), `accounts-saga` for saga steps (a leg moves the
//! money at once, its compensation moves it back), `accounts-msg` for
//! transactional message deliveries (a leg, a credit, moves once).
//!
//! ```text
//! cargo run -p tandem-examples --bin bank-participant -- --listen 127.0.0.1:9001 --accounts alice,bob
//! # durable, resolving in-doubt branches with the coordinator:
//! cargo run -p tandem-examples --bin bank-participant -- --listen 127.0.0.1:9001 \
//!     --accounts alice,bob --data-dir ./shard-1 --coordinator http://127.0.0.1:7070
//! ```
//!
//! Secure, as every participant other hosts can reach should run: TLS with
//! the coordinator's certificate required, obeying only the coordinator,
//! and in-doubt resolution over TLS with the participant's token (files of
//! `tandem certs dev --out certs`; see [`tandem_examples::secure`]):
//!
//! ```text
//! cargo run -p tandem-examples --bin bank-participant -- --listen 127.0.0.1:9001 \
//!     --accounts alice,bob --data-dir ./shard-1 \
//!     --tls-cert certs/participant.pem --tls-key certs/participant-key.pem \
//!     --tls-client-ca certs/ca.pem --require-client-cert \
//!     --only-coordinators certs/participant-access.txt \
//!     --coordinator https://127.0.0.1:7070 --coordinator-ca certs/ca.pem \
//!     --coordinator-token-file certs/participant.token
//! ```
//!
//! Prints `listening on ADDR` once it accepts calls. With
//! `--metrics-listen ADDR` it also serves the participant's Prometheus
//! metrics at `http://ADDR/metrics` (handler latency and results, barrier
//! outcomes) and prints `metrics on ADDR` next: how any participant puts
//! [`ParticipantMetrics::encode`] on an HTTP server of its own.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use tandem_examples::bank::Bank;
use tandem_examples::secure::SecureArgs;
use tandem_examples::sled_bank::SledBank;
use tandem_sdk::{ParticipantMetrics, ParticipantServer};
use tokio::net::TcpListener;

/// A bank shard: accounts with opening balances, served as resources
/// "accounts" (2PC), "accounts-tcc" (TCC), "accounts-saga" (saga) and
/// "accounts-msg" (message deliveries).
#[derive(Parser)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9001")]
    listen: SocketAddr,
    /// Comma-separated account names held by this shard.
    #[arg(long, value_delimiter = ',', default_value = "alice,bob")]
    accounts: Vec<String>,
    /// Opening balance of every account (not changed on restart).
    #[arg(long, default_value_t = 1000)]
    balance: i64,
    /// Keep accounts and barrier records in sled here (durable); in memory
    /// when unset.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Coordinator to ask about branches left in doubt.
    #[arg(long, env = "TANDEM_COORDINATOR")]
    coordinator: Option<String>,
    /// How long a tried branch waits before asking the coordinator.
    #[arg(long, default_value_t = 30_000)]
    in_doubt_after_ms: u64,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// TLS, who is obeyed, and how the coordinator is reached.
    #[command(flatten)]
    secure: SecureArgs,
}

/// Serves `GET /metrics` on `listener`: the participant's metrics in the
/// OpenMetrics text format, as Prometheus scrapes them.
async fn serve_metrics(listener: TcpListener, metrics: ParticipantMetrics) -> std::io::Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let body = metrics.encode();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        ParticipantMetrics::CONTENT_TYPE,
                    )],
                    body,
                )
            }
        }),
    );
    axum::serve(listener, app).await
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    let mut server = match &args.data_dir {
        Some(dir) => {
            let bank = SledBank::open(dir, &args.accounts, args.balance)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            ParticipantServer::new()
                .barrier(bank.barrier())
                .two_phase("accounts", bank.clone())
                .tcc("accounts-tcc", bank.clone())
                .saga("accounts-saga", bank.clone())
                .message("accounts-msg", bank)
        }
        None => {
            let bank = Arc::new(Bank::new(
                args.accounts.iter().map(|a| (a.clone(), args.balance)),
            ));
            ParticipantServer::new()
                .two_phase("accounts", bank.clone())
                .tcc("accounts-tcc", bank.clone())
                .saga("accounts-saga", bank.clone())
                .message("accounts-msg", bank.clone())
                .check("accounts-check", bank)
        }
    };
    server = args.secure.apply(server)?;
    if let Some(coordinator) = args.coordinator {
        server = server.resolve_in_doubt_with(
            coordinator,
            Duration::from_millis(args.in_doubt_after_ms),
            args.secure.coordinator_options()?,
        );
    }
    let metrics = args.metrics_listen.map(|_| ParticipantMetrics::new());
    if let Some(metrics) = &metrics {
        server = server.with_metrics(metrics.clone());
    }
    let listener = TcpListener::bind(args.listen).await?;
    println!("listening on {}", listener.local_addr()?);
    if let (Some(addr), Some(metrics)) = (args.metrics_listen, metrics) {
        let metrics_listener = TcpListener::bind(addr).await?;
        println!("metrics on {}", metrics_listener.local_addr()?);
        tokio::spawn(async move {
            if let Err(e) = serve_metrics(metrics_listener, metrics).await {
                tracing::error!(error = %e, "metrics endpoint stopped");
            }
        });
    }
    server
        .serve_with_shutdown(listener, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}

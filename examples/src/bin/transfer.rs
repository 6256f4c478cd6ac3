//! A business service: moves money between two bank shards in one global
//! transaction, by 2PC (default) or TCC (`--tcc`).
//!
//! ```text
//! cargo run -p tandem-examples --bin transfer -- \
//!     --from http://127.0.0.1:9001/alice --to http://127.0.0.1:9002/carol --amount 100
//! # to a coordinator serving mutual TLS with tokens:
//! cargo run -p tandem-examples --bin transfer -- --coordinator https://127.0.0.1:7070 \
//!     --ca certs/ca.pem --cert certs/client.pem --key certs/client-key.pem \
//!     --token-file certs/client.token \
//!     --from https://127.0.0.1:9001/alice --to https://127.0.0.1:9002/bob --amount 100
//! ```

use clap::Parser;
use std::path::PathBuf;
use tandem_examples::bank::Leg;

use tandem_sdk::{Branch, ClientOptions, Error, Mode, TransactionClient};

/// Transfer `amount` from one account to another.
#[derive(Parser)]
struct Args {
    /// Coordinator endpoint.
    #[arg(
        long,
        env = "TANDEM_COORDINATOR",
        default_value = "http://127.0.0.1:7070"
    )]
    coordinator: String,
    /// Source as <participant endpoint>/<account>.
    #[arg(long)]
    from: String,
    /// Destination as <participant endpoint>/<account>.
    #[arg(long)]
    to: String,
    /// Amount to move.
    #[arg(long)]
    amount: i64,
    /// Use TCC (try freezes the funds) instead of 2PC.
    #[arg(long)]
    tcc: bool,
    /// CA bundle the coordinator's certificate is verified against (an
    /// https:// --coordinator; default: the system's roots).
    #[arg(long, env = "TANDEM_CA")]
    ca: Option<PathBuf>,
    /// Client certificate (mutual TLS).
    #[arg(long, env = "TANDEM_CERT", requires = "key")]
    cert: Option<PathBuf>,
    /// The private key of --cert.
    #[arg(long, env = "TANDEM_KEY", requires = "cert")]
    key: Option<PathBuf>,
    /// File holding the bearer token sent to the coordinator (the client
    /// role).
    #[arg(long, env = "TANDEM_TOKEN_FILE")]
    token_file: Option<PathBuf>,
}

fn split(target: &str) -> anyhow::Result<(&str, &str)> {
    target
        .rsplit_once('/')
        .filter(|(e, a)| !e.is_empty() && !a.is_empty())
        .ok_or_else(|| anyhow::anyhow!("{target:?} is not <endpoint>/<account>"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (from_ep, from) = split(&args.from)?;
    let (to_ep, to) = split(&args.to)?;
    let options = ClientOptions::from_files(
        args.ca.as_deref(),
        args.cert.as_deref(),
        args.key.as_deref(),
        args.token_file.as_deref(),
    )
    .map_err(anyhow::Error::msg)?;
    let client = TransactionClient::connect_with(args.coordinator, &options).await?;
    let (mode, resource) = if args.tcc {
        (Mode::Tcc, "accounts-tcc")
    } else {
        (Mode::TwoPhase, "accounts")
    };
    let branches = vec![
        Branch::new(from_ep, resource, Leg::debit(from, args.amount).encode()),
        Branch::new(to_ep, resource, Leg::credit(to, args.amount).encode()),
    ];
    match client.submit(mode, branches).await {
        Ok(done) => println!("committed {}", done.gtid),
        Err(Error::Aborted { gtid, reason, .. }) => {
            println!(
                "aborted {}: {reason}",
                gtid.map(|g| g.to_string()).unwrap_or_default()
            );
            std::process::exit(1);
        }
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

//! A business service: moves money between two bank shards in one global
//! transaction, by 2PC (default) or TCC (`--tcc`).
//!
//! ```text
//! cargo run -p tandem-examples --bin transfer -- \
//!     --from http://127.0.0.1:9001/alice --to http://127.0.0.1:9002/carol --amount 100
//! ```

use clap::Parser;
use tandem_examples::bank::Leg;
use tandem_sdk::{Branch, Error, Mode, TransactionClient};

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
    let client = TransactionClient::connect(args.coordinator).await?;
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

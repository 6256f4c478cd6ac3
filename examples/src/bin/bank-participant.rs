//! Serves one bank shard as a Tandem participant: resource `accounts` for
//! 2PC, `accounts-tcc` for TCC (try freezes funds, confirm moves them,
//! cancel unfreezes).
//!
//! ```text
//! cargo run -p tandem-examples --bin bank-participant -- --listen 127.0.0.1:9001 --accounts alice,bob
//! ```

use std::net::SocketAddr;
use std::sync::Arc;

use clap::Parser;
use tandem_examples::bank::Bank;
use tandem_sdk::ParticipantServer;

/// A bank shard: accounts with opening balances, served as resources
/// "accounts" (2PC) and "accounts-tcc" (TCC).
#[derive(Parser)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9001")]
    listen: SocketAddr,
    /// Comma-separated account names held by this shard.
    #[arg(long, value_delimiter = ',', default_value = "alice,bob")]
    accounts: Vec<String>,
    /// Opening balance of every account.
    #[arg(long, default_value_t = 1000)]
    balance: i64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let args = Args::parse();
    let bank = Arc::new(Bank::new(
        args.accounts.iter().map(|a| (a.clone(), args.balance)),
    ));
    println!(
        "bank shard with {:?} on http://{}",
        args.accounts, args.listen
    );
    ParticipantServer::new()
        .two_phase("accounts", bank.clone())
        .tcc("accounts-tcc", bank)
        .serve(args.listen)
        .await?;
    Ok(())
}

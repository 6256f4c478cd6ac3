//! A bank shard in PostgreSQL, served as a Tandem participant: resource
//! `accounts` for 2PC (prepared transactions), `accounts-tcc` for TCC.
//! Drive it with the `transfer` binary; check shards with `audit`.
//!
//! ```text
//! bank-postgres serve --db "host=127.0.0.1 dbname=shard1 user=postgres" \
//!     --listen 127.0.0.1:9001 --accounts alice,bob --coordinator http://127.0.0.1:7070
//! bank-postgres audit --db "…dbname=shard1…" --db "…dbname=shard2…"
//! ```
//!
//! `serve` prints `listening on ADDR` once it accepts calls.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tandem_examples::pg_bank::{self, CrashAt, PgBank};
use tandem_sdk::ParticipantServer;
use tandem_sdk::postgres::spawn_prepared_resolver;

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve one shard.
    Serve {
        /// The shard's database (`postgres://…` or `host=… dbname=…`).
        #[arg(long)]
        db: String,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:9001")]
        listen: SocketAddr,
        /// Accounts to create if missing, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "alice,bob")]
        accounts: Vec<String>,
        /// Opening balance of an account created now.
        #[arg(long, default_value_t = 1000)]
        balance: i64,
        /// Coordinator to ask about prepared transactions and tried
        /// branches left in doubt (by a crash of this process).
        #[arg(long, env = "TANDEM_COORDINATOR")]
        coordinator: Option<String>,
        /// How long a branch waits for its outcome before asking.
        #[arg(long, default_value_t = 10_000)]
        in_doubt_after_ms: u64,
        /// Exit at this point of the protocol (for crash tests).
        #[arg(long, hide = true)]
        crash_at: Option<CrashAt>,
    },
    /// Check shards: prints the sum of balances, negative accounts, frozen
    /// funds, open holds and prepared transactions; exits 1 if any balance
    /// is negative or anything is still held.
    Audit {
        /// A shard's database; repeat for each shard.
        #[arg(long, required = true)]
        db: Vec<String>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match Args::parse().command {
        Command::Serve {
            db,
            listen,
            accounts,
            balance,
            coordinator,
            in_doubt_after_ms,
            crash_at,
        } => {
            let bank = Arc::new(PgBank::open(&db, &accounts, balance, crash_at).await?);
            let mut server = ParticipantServer::new()
                .barrier(bank.barrier())
                .two_phase("accounts", bank.clone())
                .tcc("accounts-tcc", bank.clone())
                .saga("accounts-saga", bank.clone());
            let after = Duration::from_millis(in_doubt_after_ms);
            let mut resolver = None;
            if let Some(c) = coordinator {
                resolver = Some(spawn_prepared_resolver(bank.barrier(), c.clone(), after));
                server = server.resolve_in_doubt(c, after);
            }
            let listener = tokio::net::TcpListener::bind(listen).await?;
            println!("listening on {}", listener.local_addr()?);
            server
                .serve_with_shutdown(listener, async {
                    let _ = tokio::signal::ctrl_c().await;
                })
                .await?;
            if let Some(r) = resolver {
                r.abort();
            }
        }
        Command::Audit { db } => {
            let a = pg_bank::audit(&db).await?;
            println!(
                "accounts {}, total {}, negative {:?}, frozen {}, holds {}, prepared {}",
                a.accounts,
                a.total,
                a.negative,
                a.frozen,
                a.holds,
                a.prepared.len()
            );
            if !a.negative.is_empty() || a.frozen != 0 || a.holds != 0 || !a.prepared.is_empty() {
                std::process::exit(1);
            }
        }
    }
    Ok(())
}

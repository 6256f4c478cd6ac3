//! A business service that only starts global transactions: what it needs
//! of the SDK is the client (`--no-default-features --features client`),
//! so it compiles no participant server, barrier, sled, metrics or
//! OpenTelemetry. Add feature `tls` for an `https://` coordinator.
//!
//! Run against a coordinator and a participant serving resource `seats`
//! (`tandem demo` starts both):
//!
//! ```text
//! cargo run -p tandem-sdk --no-default-features --features client --example client_only -- \
//!     http://127.0.0.1:7070 http://127.0.0.1:9001
//! ```

use std::time::Duration;

use tandem_sdk::security::BearerToken;
use tandem_sdk::{Branch, ClientOptions, Error, Gtid, Mode, TransactionClient};

#[tandem_sdk::tokio::main(crate = "tandem_sdk::tokio")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let coordinator = args
        .next()
        .unwrap_or_else(|| "http://127.0.0.1:7070".into());
    let participant = args
        .next()
        .unwrap_or_else(|| "http://127.0.0.1:9001".into());
    let token = match std::env::var("TANDEM_TOKEN") {
        Ok(t) => BearerToken::new(&t)?,
        Err(_) => BearerToken::none(),
    };
    let options = ClientOptions { tls: None, token };

    let client = match TransactionClient::connect_with(&coordinator, &options).await {
        Ok(c) => c,
        Err(e @ Error::Unavailable { .. }) => {
            eprintln!("no coordinator at {coordinator}: {e}");
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };

    // One-shot: the coordinator runs both phases and answers with the outcome.
    let gtid = Gtid::now_v7();
    let branches = vec![Branch::new(&participant, "seats", "2")];
    match client
        .submit_as(gtid, Mode::TwoPhase, branches, Some(Duration::from_secs(5)))
        .await
    {
        Ok(done) => println!("committed {}", done.gtid),
        Err(Error::Aborted { reason, .. }) => println!("aborted {gtid}: {reason}"),
        Err(e @ (Error::TimedOut { .. } | Error::Unavailable { .. })) => {
            // The outcome is the coordinator's: ask it again later.
            println!("{e}");
        }
        Err(e) => return Err(e.into()),
    }

    // Step by step: begin, enlist a branch, commit.
    let tx = client
        .begin_with_timeout(Mode::TwoPhase, Some(Duration::from_secs(5)))
        .await?;
    client
        .enlist(tx, Branch::new(&participant, "seats", "1"))
        .await?;
    let outcome = client.commit(tx).await?;
    println!("{tx}: {outcome:?}");
    Ok(())
}

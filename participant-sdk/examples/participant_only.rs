//! A participant service with the in-memory barrier: what it needs of the
//! SDK is `--no-default-features --features participant`, so it compiles
//! no sled, PostgreSQL, metrics or OpenTelemetry. Add `sled` for a durable
//! barrier, `postgres` for PostgreSQL participants, `metrics`, `otel` and
//! `tls` as needed.
//!
//! Run: `cargo run -p tandem-sdk --no-default-features --features participant
//! --example participant_only` (starts the participant on a free port and
//! stops it; `-- 127.0.0.1:9001` serves there until Ctrl-C).

use std::collections::HashMap;
use std::sync::Mutex;

use tandem_sdk::{
    BranchContext, Bytes, Gtid, HandlerError, ParticipantServer, Tcc, TwoPhase, Vote,
};

/// A 2PC resource holding seats in memory: a business "no" is a vote.
#[derive(Default)]
struct Seats {
    held: Mutex<HashMap<Gtid, u32>>,
}

impl TwoPhase for Seats {
    async fn prepare(&self, ctx: &BranchContext, payload: &[u8]) -> Result<Vote, HandlerError> {
        let Some(n) = std::str::from_utf8(payload)
            .ok()
            .and_then(|s| s.parse().ok())
        else {
            return Ok(Vote::no("the payload must be a number of seats"));
        };
        let mut held = self
            .held
            .lock()
            .map_err(|e| HandlerError::new(e.to_string()))?;
        held.insert(ctx.gtid, n);
        Ok(Vote::yes_with(Bytes::from_static(b"held")))
    }
    async fn commit(&self, ctx: &BranchContext, _: &[u8]) -> Result<(), HandlerError> {
        let mut held = self
            .held
            .lock()
            .map_err(|e| HandlerError::new(e.to_string()))?;
        held.remove(&ctx.gtid);
        Ok(())
    }
    async fn rollback(&self, ctx: &BranchContext, _: &[u8]) -> Result<(), HandlerError> {
        let mut held = self
            .held
            .lock()
            .map_err(|e| HandlerError::new(e.to_string()))?;
        held.remove(&ctx.gtid);
        Ok(())
    }
}

/// A TCC resource: the barrier (in memory here) makes a repeated confirm,
/// a cancel without a try and a try after its cancel safe.
struct Wallet;

impl Tcc for Wallet {
    async fn try_(&self, _: &BranchContext, payload: &[u8]) -> Result<Vote, HandlerError> {
        if payload.is_empty() {
            return Ok(Vote::no("nothing to reserve"));
        }
        Ok(Vote::yes())
    }
    async fn confirm(&self, _: &BranchContext, _: &[u8]) -> Result<(), HandlerError> {
        Ok(())
    }
    async fn cancel(&self, _: &BranchContext, _: &[u8]) -> Result<(), HandlerError> {
        Ok(())
    }
}

#[tandem_sdk::tokio::main(crate = "tandem_sdk::tokio")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let server = ParticipantServer::new()
        .two_phase("seats", Seats::default())
        .tcc("wallet", Wallet);
    match std::env::args().nth(1) {
        Some(addr) => {
            let running = server.spawn(addr.parse()?).await?;
            println!("participant at {}; Ctrl-C stops it", running.url());
            tandem_sdk::tokio::signal::ctrl_c().await?;
            running.shutdown().await?;
        }
        None => {
            let running = server.spawn("127.0.0.1:0".parse()?).await?;
            println!("participant at {}", running.url());
            running.shutdown().await?;
        }
    }
    Ok(())
}

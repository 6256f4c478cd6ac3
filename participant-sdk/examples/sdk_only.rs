//! A participant and a business service written against `tandem_sdk::…`
//! paths only: no tokio, tonic, bytes, sled or uuid of their own. Built by
//! `cargo test -p tandem-sdk`, so a type that enters the SDK's API without
//! being re-exported breaks the build here first.
//!
//! Run: `cargo run -p tandem-sdk --example sdk_only` (starts a participant
//! on a free port and stops it; no coordinator needed).

use std::time::Duration;

use tandem_sdk::barrier::{BarrierStore, MemBarrier, Retention, SledBarrier};
use tandem_sdk::security::{AccessList, BearerToken, ClientTls, ServerTls, ServerTlsFiles};
use tandem_sdk::sled::transaction::TransactionalTree;
use tandem_sdk::{
    Branch, BranchContext, Bytes, Channel, ClientOptions, Code, Endpoint, Error, Gtid,
    HandlerError, Mode, ParticipantServer, ServeError, Status, Tcc, TransactionClient, TwoPhase,
    Vote, proto,
};

/// A 2PC resource that refuses empty payloads: a business "no" is a vote.
struct Seats;

impl TwoPhase for Seats {
    async fn prepare(&self, _: &BranchContext, payload: &[u8]) -> Result<Vote, HandlerError> {
        if payload.is_empty() {
            return Ok(Vote::no("no seats asked for"));
        }
        Ok(Vote::yes_with(Bytes::from_static(b"held")))
    }
    async fn commit(&self, _: &BranchContext, _: &[u8]) -> Result<(), HandlerError> {
        Ok(())
    }
    async fn rollback(&self, _: &BranchContext, _: &[u8]) -> Result<(), HandlerError> {
        Ok(())
    }
}

/// A TCC resource keeping its state in sled, in the barrier's transaction.
struct Wallet {
    barrier: SledBarrier,
    accounts: tandem_sdk::sled::Tree,
}

fn balance(t: &TransactionalTree) -> Result<u64, HandlerError> {
    let v = t
        .get("balance")
        .map_err(|e| HandlerError::new(e.to_string()))?;
    Ok(v.map_or(0, |v| {
        u64::from_be_bytes(v.as_ref().try_into().unwrap_or([0; 8]))
    }))
}

impl Tcc for Wallet {
    async fn try_(&self, ctx: &BranchContext, _: &[u8]) -> Result<Vote, HandlerError> {
        self.barrier.transaction(ctx, &self.accounts, |t| {
            if balance(t).unwrap_or(0) < 10 {
                return Ok(Vote::no("insufficient funds"));
            }
            Ok(Vote::yes())
        })
    }
    async fn confirm(&self, ctx: &BranchContext, _: &[u8]) -> Result<(), HandlerError> {
        self.barrier.transaction(ctx, &self.accounts, |_| Ok(()))
    }
    async fn cancel(&self, ctx: &BranchContext, _: &[u8]) -> Result<(), HandlerError> {
        self.barrier.transaction(ctx, &self.accounts, |_| Ok(()))
    }
}

/// What a business service does with the client's answers.
#[allow(dead_code)]
async fn business(client: &TransactionClient, participant: &str) -> Result<(), Error> {
    let gtid = Gtid::now_v7();
    let branches = vec![Branch::new(participant, "seats", "2")];
    match client.submit_as(gtid, Mode::TwoPhase, branches, None).await {
        Ok(done) => println!("committed {}: {:?}", done.gtid, done.replies),
        Err(Error::Aborted { reason, .. }) => println!("refused: {reason}"),
        Err(e @ (Error::TimedOut { .. } | Error::Unavailable { .. })) => {
            // The message names the gtid; so can we.
            let info: proto::TransactionInfo = client.get(gtid).await?;
            println!("{e}; state now {:?}", proto::TxState::try_from(info.state));
        }
        Err(Error::Invalid {
            code: Code::AlreadyExists,
            message,
        }) => println!("gtid reused: {message}"),
        Err(Error::Rpc(status)) => {
            let _: &Status = &status;
            return Err(Error::Rpc(status));
        }
        Err(e) => return Err(e),
    }
    Ok(())
}

/// Building blocks for TLS and tokens, and a client over a custom channel.
#[allow(dead_code)]
fn secured() -> Result<(ParticipantServer, ClientOptions), Box<dyn std::error::Error>> {
    let tls = ServerTls::load(ServerTlsFiles {
        cert: "participant.pem".into(),
        key: "participant-key.pem".into(),
        client_ca: Some("ca.pem".into()),
        require_client_cert: true,
    })?;
    let access = AccessList::load("participant-access.txt".as_ref())?;
    let options = ClientOptions {
        tls: Some(ClientTls {
            ca: Some("ca.pem".into()),
            cert: None,
            key: None,
            domain: None,
        }),
        token: BearerToken::from_file("client.token".as_ref())?,
    };
    let channel: Channel = Endpoint::from_static("http://127.0.0.1:7070")
        .timeout(Duration::from_secs(2))
        .connect_lazy();
    let _client = TransactionClient::from_channel(channel);
    let server = ParticipantServer::new().tls(tls).only_coordinators(access);
    Ok((server, options))
}

#[tandem_sdk::tokio::main(crate = "tandem_sdk::tokio")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("tandem-sdk-only-{}", Gtid::now_v7()));
    let barrier = SledBarrier::open(&dir)?;
    let accounts = barrier.db().open_tree("accounts")?;

    // One handler per resource: a second registration is refused at start.
    let twice = ParticipantServer::new()
        .two_phase("seats", Seats)
        .two_phase("seats", Seats);
    match twice.into_service() {
        Err(e @ ServeError::DuplicateResource { .. }) => println!("refused: {e}"),
        _ => unreachable!("a duplicate resource must be refused"),
    }

    let _in_memory: &dyn BarrierStore = &MemBarrier::new();
    let participant = ParticipantServer::new()
        .barrier(barrier.clone())
        .retention(Retention::default())
        .two_phase("seats", Seats)
        .tcc("wallet", Wallet { barrier, accounts })
        .spawn("127.0.0.1:0".parse()?)
        .await?;
    println!("participant at {}", participant.url());
    participant.shutdown().await?;
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

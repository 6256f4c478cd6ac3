//! Finishing prepared transactions that no call will finish: a participant
//! killed after `PREPARE TRANSACTION` leaves the transaction, and its row
//! locks, in `pg_prepared_xacts`. The coordinator does call phase 2 again,
//! but only while it knows the transaction; the resolver asks it
//! (`GetOutcome`) and commits or rolls back itself, so that locks are never
//! held longer than the coordinator takes to answer.

use std::time::Duration;

use tokio::task::JoinHandle;

use super::two_phase::finish_prepared;
use super::{PgBarrier, PgError, parse_gid};
use crate::barrier::{BarrierStore, Mark};
use crate::client::{ClientOptions, Outcome, TransactionClient};

/// What one [`resolve_prepared`] round did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Resolved {
    /// Prepared transactions committed (the coordinator decided commit).
    pub committed: usize,
    /// Rolled back (decided abort, or a transaction the coordinator never
    /// recorded: presumed abort).
    pub rolled_back: usize,
    /// Left prepared: the coordinator has not decided yet.
    pub pending: usize,
    /// Branches that could not be finished this round (an error with that
    /// branch alone; the round went on past it).
    pub failed: usize,
}

/// Why a round stopped early.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// The database failed.
    #[error(transparent)]
    Pg(#[from] PgError),
    /// The coordinator could not be asked; what was resolved before stays.
    #[error("cannot ask the coordinator: {0}")]
    Coordinator(#[from] crate::Error),
    /// The barrier store failed.
    #[error(transparent)]
    Barrier(#[from] crate::barrier::BarrierError),
}

const LIST: &str = "SELECT gid FROM pg_prepared_xacts
    WHERE database = current_database() AND gid LIKE 'tandem:%'
      AND prepared < now() - make_interval(secs => $1)
    ORDER BY prepared";

/// Asks the coordinator about every Tandem prepared transaction in the
/// barrier's database prepared more than `older_than` ago, and commits or
/// rolls back the decided ones (through the barrier, so its records agree).
///
/// # Errors
///
/// The database or the coordinator failed; transactions handled before
/// that stay handled.
pub async fn resolve_prepared(
    barrier: &PgBarrier,
    coordinator: &TransactionClient,
    older_than: Duration,
) -> Result<Resolved, ResolveError> {
    let gids: Vec<String> = {
        let conn = barrier.pool().get().await.map_err(PgError::from)?;
        conn.query(LIST, &[&older_than.as_secs_f64()])
            .await
            .map_err(PgError::from)?
            .into_iter()
            .map(|row| row.get(0))
            .collect()
    };
    let mut done = Resolved::default();
    for key in gids.iter().filter_map(|g| parse_gid(g)) {
        let commit = match coordinator.outcome(key.gtid).await {
            Ok(Outcome::Pending) => {
                done.pending += 1;
                continue;
            }
            Ok(Outcome::Commit) => true,
            Ok(Outcome::Abort) => false,
            // Unreachable: no point asking about the rest now.
            Err(e @ crate::Error::Unavailable { .. }) => return Err(e.into()),
            Err(e) => {
                tracing::warn!(gtid = %key.gtid, branch = key.branch_id, error = %e, "cannot learn the outcome; skipping this branch");
                done.failed += 1;
                continue;
            }
        };
        if let Err(e) = finish_one(barrier, key, commit).await {
            tracing::warn!(gtid = %key.gtid, branch = key.branch_id, error = %e, "cannot finish the prepared transaction; skipping it this round");
            done.failed += 1;
            continue;
        }
        if commit {
            done.committed += 1;
        } else {
            done.rolled_back += 1;
        }
    }
    Ok(done)
}

/// Finishes one prepared branch through the barrier's branch lock.
async fn finish_one(
    barrier: &PgBarrier,
    key: crate::barrier::BranchKey,
    commit: bool,
) -> Result<(), ResolveError> {
    {
        // Under the branch's lock, as a phase-2 call would run.
        let mut entry = barrier.enter(key).await?;
        finish_prepared(barrier, key, commit).await?;
        if let Some(record) = entry.record().filter(|r| r.mark == Mark::Tried) {
            let done = if commit {
                Mark::Confirmed
            } else {
                Mark::Cancelled
            };
            entry.put(done, record.epoch).await?;
        }
        let outcome = if commit { "commit" } else { "rollback" };
        tracing::info!(gtid = %key.gtid, branch = key.branch_id, outcome, "prepared transaction resolved");
    }
    Ok(())
}

/// Runs [`resolve_prepared`] at once (for what a previous process left) and
/// then every `every`, asking the coordinator at `coordinator`
/// (`http://host:port`) about transactions prepared more than `every` ago.
/// Abort the task to stop it.
pub fn spawn_prepared_resolver(
    barrier: PgBarrier,
    coordinator: String,
    every: Duration,
) -> JoinHandle<()> {
    spawn_prepared_resolver_with(barrier, coordinator, every, ClientOptions::default())
}

/// As [`spawn_prepared_resolver`], reaching the coordinator with TLS and a
/// token (a credential with the `participant` role).
pub fn spawn_prepared_resolver_with(
    barrier: PgBarrier,
    coordinator: String,
    every: Duration,
    options: ClientOptions,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let Some(client) = crate::client::background_client(
            &coordinator,
            "prepared-transaction resolution",
            &options,
        ) else {
            return;
        };
        let mut older_than = Duration::ZERO;
        loop {
            match resolve_prepared(&barrier, &client, older_than).await {
                Ok(r) if r == Resolved::default() => {}
                Ok(r) => tracing::info!(
                    committed = r.committed,
                    rolled_back = r.rolled_back,
                    pending = r.pending,
                    failed = r.failed,
                    "prepared transactions resolved"
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "prepared-transaction resolution failed; retrying")
                }
            }
            older_than = every;
            tokio::time::sleep(every).await;
        }
    })
}

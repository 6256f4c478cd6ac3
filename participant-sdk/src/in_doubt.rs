//! In-doubt resolution: a branch that tried (or prepared) and has heard
//! nothing for a while asks the coordinator what became of its transaction
//! (`Coordinator.GetOutcome`) and finishes itself through the barrier.
//!
//! This covers the coordinator losing a transaction it never forced (a
//! crash right after a one-shot `Submit` reached the participants): the
//! coordinator answers ABORT for a gtid it does not know (presumed abort),
//! and the reservation is released instead of held forever. A PENDING
//! answer (still undecided) is asked again on the next round; an
//! unreachable coordinator too.
//!
//! A message delivery that started and did not finish (its record still
//! `Tried`) is delivered again on a COMMIT answer.

use std::time::Duration;

use tokio::task::JoinHandle;

use crate::barrier::{InDoubt, now_ms};
use crate::client::{ClientOptions, Outcome, TransactionClient};
use crate::server::ParticipantService;

/// Branches looked at per round.
const BATCH: usize = 100;

/// Starts resolving branches in doubt for longer than `after`, asking the
/// coordinator at `coordinator`. Abort the task to stop it.
pub(crate) fn spawn(
    service: ParticipantService,
    coordinator: String,
    after: Duration,
    options: ClientOptions,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let Some(client) =
            crate::client::background_client(&coordinator, "in-doubt resolution", &options)
        else {
            return;
        };
        let pause = (after / 2).clamp(Duration::from_millis(50), Duration::from_secs(30));
        let mut cursor = None;
        loop {
            tokio::time::sleep(pause).await;
            let before = now_ms().saturating_sub(after.as_millis() as u64);
            cursor = round(&service, &client, before, cursor).await;
        }
    })
}

/// One round: every branch in doubt, page by page from `cursor`, so that
/// branches answered PENDING (or failing) never hold up the ones behind
/// them. Returns where to start next time: `None` (from the start) once
/// the round got through, or the last branch asked about when the
/// coordinator could not be reached.
pub(crate) async fn round(
    service: &ParticipantService,
    client: &TransactionClient,
    before: u64,
    mut cursor: Option<crate::barrier::BranchKey>,
) -> Option<crate::barrier::BranchKey> {
    loop {
        let page = match service.barrier().in_doubt(before, cursor, BATCH).await {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "in-doubt resolution: barrier scan failed");
                return cursor;
            }
        };
        let full = page.len() >= BATCH;
        for branch in &page {
            if !resolve(service, client, branch).await {
                return cursor; // coordinator unreachable: resume here next round
            }
            cursor = Some(branch.key);
        }
        if !full {
            return None;
        }
    }
}

/// Asks about one branch and finishes it if decided. False when the
/// coordinator could not be asked. An answer that it cannot tell (the
/// outcome is no longer known, FAILED_PRECONDITION) leaves the branch in
/// doubt for an operator and moves on to the next: it does not change by
/// asking again, and must not hold up the branches behind it.
async fn resolve(service: &ParticipantService, client: &TransactionClient, d: &InDoubt) -> bool {
    let (gtid, branch) = (d.key.gtid, d.key.branch_id);
    let commit = match client.outcome(gtid).await {
        Ok(Outcome::Pending) => return true,
        Ok(Outcome::Commit) => true,
        Ok(Outcome::Abort) => false,
        Err(crate::Error::Invalid { code, message }) => {
            tracing::error!(%gtid, branch, ?code, %message,
                "in-doubt resolution: the coordinator cannot tell this branch's outcome; \
                 it stays in doubt until an operator settles it by hand");
            return true;
        }
        Err(e) => {
            tracing::warn!(%gtid, branch, error = %e, "in-doubt resolution: cannot reach the coordinator");
            return false;
        }
    };
    if !commit && service.is_saga(&d.resource) {
        // Its coordinator compensates a saga's steps, newest first (the
        // start is forced, so it never forgets one): compensating here
        // could undo this step under a newer one that still stands.
        tracing::debug!(%gtid, branch, "in-doubt saga step: its coordinator compensates it");
        return true;
    }
    if !commit && service.is_message(&d.resource) {
        // A delivery starts only once its message is decided, so the
        // coordinator cannot rightly answer abort for it (it would have
        // lost the message's record): left in doubt for an operator,
        // never dropped here.
        tracing::error!(%gtid, branch,
            "in-doubt resolution: the coordinator answers ABORT for a message delivery, \
             which starts only after its message is decided; it stays in doubt until an \
             operator settles it by hand");
        return true;
    }
    let outcome = if commit { "commit" } else { "abort" };
    match service.finish(d, commit).await {
        Ok(()) => tracing::info!(%gtid, branch, outcome, "in-doubt branch resolved"),
        Err(e) => {
            tracing::warn!(%gtid, branch, outcome, error = %e, "in-doubt branch not resolved yet")
        }
    }
    true
}

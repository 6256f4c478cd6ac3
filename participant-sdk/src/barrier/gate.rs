//! The barrier in front of handler calls: one function per phase, applying
//! [`decide`] under the branch's lock and storing the records it implies.

use tonic::Status;

use crate::server::{MAX_STATUS_TEXT, cap};

use super::{BarrierError, BarrierStore, Mark, Phase, Step, decide, stale_epoch};
use crate::handler::{BoxFuture, BranchContext, HandlerError, Vote};

fn unavailable(e: BarrierError) -> Status {
    Status::unavailable(cap(&e.to_string(), MAX_STATUS_TEXT))
}

/// Runs a try / prepare through the barrier. `verb` names the call in errors.
pub(crate) async fn phase_one(
    store: &dyn BarrierStore,
    ctx: &BranchContext,
    payload: &[u8],
    verb: &str,
    call: BoxFuture<'_, Result<Vote, HandlerError>>,
) -> Result<Vote, Status> {
    let mut entry = store.enter(ctx.key()).await.map_err(unavailable)?;
    let seen = entry.record().map_or(0, |r| r.epoch);
    if let Some(why) = stale_epoch(seen, ctx.epoch) {
        return Ok(Vote::no(why));
    }
    let epoch = seen.max(ctx.epoch);
    match decide(entry.record().map(|r| r.mark), Phase::Try) {
        Step::Run => {}
        Step::Refuse(why) => return Ok(Vote::no(why)),
        Step::Skip { .. } => return Ok(Vote::yes()),
    }
    // Stored before the handler runs: whatever the try does, a cancel that
    // follows will reach the handler. Resource and payload are kept so that
    // in-doubt resolution can finish the branch without the coordinator.
    entry
        .put_tried(&ctx.resource, payload, epoch)
        .await
        .map_err(unavailable)?;
    let vote = call
        .await
        .map_err(|e| Status::internal(cap(&format!("{verb} failed: {e}"), MAX_STATUS_TEXT)))?;
    match vote {
        Vote::No { .. } => entry.put(Mark::Refused, epoch).await.map_err(unavailable)?,
        // The reservation must be as durable as the promise: a handler that
        // wrote it in the barrier's store (SledBarrier::transaction) would
        // otherwise vote yes on a write a crash can still take back.
        Vote::Yes { .. } => entry.sync().await.map_err(unavailable)?,
    }
    Ok(vote)
}

/// Runs a confirm / cancel (commit / rollback) through the barrier.
pub(crate) async fn phase_two(
    store: &dyn BarrierStore,
    ctx: &BranchContext,
    verb: &str,
    call: BoxFuture<'_, Result<(), HandlerError>>,
) -> Result<(), Status> {
    let mut entry = store.enter(ctx.key()).await.map_err(unavailable)?;
    let seen = entry.record().map_or(0, |r| r.epoch);
    if let Some(why) = stale_epoch(seen, ctx.epoch) {
        return Err(Status::failed_precondition(cap(&why, MAX_STATUS_TEXT)));
    }
    let epoch = seen.max(ctx.epoch);
    match decide(entry.record().map(|r| r.mark), ctx.phase) {
        Step::Refuse(why) => Err(Status::failed_precondition(cap(&why, MAX_STATUS_TEXT))),
        Step::Skip { record } => {
            // A repeat from a newer owner still raises the epoch seen, so
            // the former owner's calls are refused from now on.
            let mark =
                record.or_else(|| entry.record().filter(|r| epoch > r.epoch).map(|r| r.mark));
            if let Some(mark) = mark {
                entry.put(mark, epoch).await.map_err(unavailable)?;
            }
            Ok(())
        }
        Step::Run => {
            call.await.map_err(|e| {
                let message = cap(&format!("{verb} failed: {e}"), MAX_STATUS_TEXT);
                if e.permanent {
                    tandem_proto::rpc::permanent(message)
                } else {
                    Status::unavailable(message)
                }
            })?;
            if let Some(mark) = ctx.phase.done_mark() {
                entry.put(mark, epoch).await.map_err(unavailable)?;
            }
            Ok(())
        }
    }
}

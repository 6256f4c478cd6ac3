//! The barrier in front of handler calls: one function per phase, applying
//! [`decide`] under the branch's lock and storing the records it implies.
//! Each also says how the call went through ([`Passage`]): whether the
//! handler ran, or what the barrier answered in its place. This is the one
//! place every barrier store's calls pass, so metrics learn the barrier's
//! outcomes here, whatever the store (memory, sled, PostgreSQL).

use tonic::Status;

use crate::server::{MAX_STATUS_TEXT, cap};

use super::{BarrierError, BarrierStore, Mark, Phase, Step, decide, stale_epoch};
use crate::handler::{BoxFuture, BranchContext, HandlerError, Vote};

/// How a call went through the barrier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Passage {
    /// The handler was called: its own result is the call's.
    Ran,
    /// A repeat of a confirm or cancel the branch already had, answered
    /// success from the record without calling the handler.
    Duplicate,
    /// A repeat of a try the branch already had, answered no from the
    /// record without calling the handler (a try is not repeated).
    RepeatedTry,
    /// A cancel / rollback with no try recorded: nothing to release, so
    /// the handler was not called (an empty compensation), and the cancel
    /// is remembered.
    EmptyCancel,
    /// A cancel / rollback after the try voted no: a no holds nothing.
    AfterNo,
    /// A try / prepare arriving after its branch was cancelled, refused so
    /// that nothing stays reserved (anti-hanging).
    HangingTry,
    /// Refused for another reason: a call from a stale coordinator epoch,
    /// a confirm with no try, a cancel after a confirm.
    Refused,
    /// The barrier store failed before the handler could run (answered
    /// UNAVAILABLE, so the coordinator retries).
    Unavailable,
}

impl Passage {
    /// The passage of a `phase` call that [`decide`] answers with `step`
    /// for a branch whose record is `current`.
    pub(crate) fn of(current: Option<Mark>, phase: Phase, step: &Step) -> Passage {
        use Mark::*;
        match (step, phase, current) {
            (Step::Run, ..) => Passage::Ran,
            (Step::Skip { .. }, _, None) => Passage::EmptyCancel,
            (Step::Skip { .. }, _, Some(Refused)) => Passage::AfterNo,
            (Step::Skip { .. }, _, Some(_)) => Passage::Duplicate,
            (Step::Refuse(_), Phase::Try, Some(Cancelled | EmptyCancelled)) => Passage::HangingTry,
            (Step::Refuse(_), Phase::Try, Some(Tried | Refused | Confirmed)) => {
                Passage::RepeatedTry
            }
            (Step::Refuse(_), ..) => Passage::Refused,
        }
    }
}

/// A call's answer, and how it went through the barrier.
#[derive(Debug)]
pub(crate) struct Gated<T> {
    /// Whether the handler ran, or what the barrier answered instead.
    pub(crate) passage: Passage,
    /// The answer to send.
    pub(crate) result: Result<T, Status>,
}

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
) -> Gated<Vote> {
    let mut passage = Passage::Unavailable;
    let result = gate_one(store, ctx, payload, verb, call, &mut passage).await;
    Gated { passage, result }
}

async fn gate_one(
    store: &dyn BarrierStore,
    ctx: &BranchContext,
    payload: &[u8],
    verb: &str,
    call: BoxFuture<'_, Result<Vote, HandlerError>>,
    passage: &mut Passage,
) -> Result<Vote, Status> {
    let mut entry = store.enter(ctx.key()).await.map_err(unavailable)?;
    let seen = entry.record().map_or(0, |r| r.epoch);
    if let Some(why) = stale_epoch(seen, ctx.epoch) {
        *passage = Passage::Refused;
        return Ok(Vote::no(why));
    }
    let epoch = seen.max(ctx.epoch);
    let current = entry.record().map(|r| r.mark);
    let step = decide(current, Phase::Try);
    match &step {
        Step::Run => {}
        Step::Refuse(why) => {
            *passage = Passage::of(current, Phase::Try, &step);
            return Ok(Vote::no(why.clone()));
        }
        Step::Skip { .. } => {
            *passage = Passage::of(current, Phase::Try, &step);
            return Ok(Vote::yes());
        }
    }
    // Stored before the handler runs: whatever the try does, a cancel that
    // follows will reach the handler. Resource and payload are kept so that
    // in-doubt resolution can finish the branch without the coordinator.
    entry
        .put_tried(&ctx.resource, payload, epoch)
        .await
        .map_err(unavailable)?;
    *passage = Passage::Ran;
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
) -> Gated<()> {
    let mut passage = Passage::Unavailable;
    let result = gate_two(store, ctx, verb, call, &mut passage).await;
    Gated { passage, result }
}

async fn gate_two(
    store: &dyn BarrierStore,
    ctx: &BranchContext,
    verb: &str,
    call: BoxFuture<'_, Result<(), HandlerError>>,
    passage: &mut Passage,
) -> Result<(), Status> {
    let mut entry = store.enter(ctx.key()).await.map_err(unavailable)?;
    let seen = entry.record().map_or(0, |r| r.epoch);
    if let Some(why) = stale_epoch(seen, ctx.epoch) {
        *passage = Passage::Refused;
        return Err(Status::failed_precondition(cap(&why, MAX_STATUS_TEXT)));
    }
    let epoch = seen.max(ctx.epoch);
    let current = entry.record().map(|r| r.mark);
    let step = decide(current, ctx.phase);
    let answered = Passage::of(current, ctx.phase, &step);
    match step {
        Step::Refuse(why) => {
            *passage = answered;
            Err(Status::failed_precondition(cap(&why, MAX_STATUS_TEXT)))
        }
        Step::Skip { record } => {
            // A repeat from a newer owner still raises the epoch seen, so
            // the former owner's calls are refused from now on.
            let mark =
                record.or_else(|| entry.record().filter(|r| epoch > r.epoch).map(|r| r.mark));
            if let Some(mark) = mark {
                entry.put(mark, epoch).await.map_err(unavailable)?;
            }
            *passage = answered;
            Ok(())
        }
        Step::Run => {
            *passage = answered;
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

#[cfg(test)]
mod tests {
    use super::*;

    const MARKS: [Option<Mark>; 6] = [
        None,
        Some(Mark::Tried),
        Some(Mark::Refused),
        Some(Mark::Confirmed),
        Some(Mark::Cancelled),
        Some(Mark::EmptyCancelled),
    ];

    // The passage agrees with the table: the handler runs exactly when
    // `decide` says so, a success without the handler is never called a
    // refusal, and a refusal never a success.
    #[test]
    fn passages_agree_with_the_table() {
        for phase in [Phase::Try, Phase::Confirm, Phase::Cancel] {
            for current in MARKS {
                let step = decide(current, phase);
                let passage = Passage::of(current, phase, &step);
                let ok = match step {
                    Step::Run => passage == Passage::Ran,
                    Step::Skip { .. } => matches!(
                        passage,
                        Passage::Duplicate | Passage::EmptyCancel | Passage::AfterNo
                    ),
                    Step::Refuse(_) => matches!(
                        passage,
                        Passage::RepeatedTry | Passage::HangingTry | Passage::Refused
                    ),
                };
                assert!(ok, "{phase:?} on {current:?}: {passage:?}");
            }
        }
    }

    // The three outcomes operators watch, each from its own cell.
    #[test]
    fn duplicates_empty_cancels_and_hanging_tries() {
        let of = |current, phase| Passage::of(current, phase, &decide(current, phase));
        assert_eq!(
            of(Some(Mark::Confirmed), Phase::Confirm),
            Passage::Duplicate
        );
        assert_eq!(of(Some(Mark::Cancelled), Phase::Cancel), Passage::Duplicate);
        assert_eq!(
            of(Some(Mark::EmptyCancelled), Phase::Cancel),
            Passage::Duplicate
        );
        assert_eq!(of(Some(Mark::Tried), Phase::Try), Passage::RepeatedTry);
        assert_eq!(of(None, Phase::Cancel), Passage::EmptyCancel);
        assert_eq!(of(Some(Mark::Refused), Phase::Cancel), Passage::AfterNo);
        assert_eq!(
            of(Some(Mark::EmptyCancelled), Phase::Try),
            Passage::HangingTry
        );
        assert_eq!(of(Some(Mark::Cancelled), Phase::Try), Passage::HangingTry);
        assert_eq!(of(None, Phase::Confirm), Passage::Refused);
        assert_eq!(of(Some(Mark::Confirmed), Phase::Cancel), Passage::Refused);
    }
}

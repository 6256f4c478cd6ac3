//! The barrier gate, the one place the barrier's rules live, for every
//! store (memory, sled, PostgreSQL): the epoch rule ([`stale_epoch`]), the
//! rule table ([`decide`]), what each call writes (`put` / `put_tried` on
//! an entry: the next record over the one read, as one
//! [`compare_and_set`](BarrierEntry::compare_and_set)), and one function
//! per phase applying them under the branch's lock. A store only
//! serialises a branch and persists atomically.
//!
//! Each phase function also says how the call went through ([`Passage`]):
//! whether the handler ran, or what the barrier answered in its place, so
//! metrics learn the barrier's outcomes here, whatever the store.

use tonic::Status;

use crate::server::{MAX_STATUS_TEXT, cap};

use super::{BarrierEntry, BarrierError, BarrierRecord, BarrierStore, Mark, Phase, now_ms};
use crate::handler::{BoxFuture, BranchContext, HandlerError, Vote};

/// The epoch rule, before the table: a call from an older coordinator
/// epoch than the branch has seen comes from a coordinator that no longer
/// owns the transaction (another took it over), and is refused whatever
/// it asks. `seen` is the stored epoch, `call` the call's; epoch 0 (a
/// coordinator that does not number owners, or in-doubt resolution acting
/// on the coordinator's durable answer) is never refused.
pub fn stale_epoch(seen: u64, call: u64) -> Option<String> {
    (call != 0 && call < seen).then(|| {
        format!(
            "barrier: a call from coordinator epoch {call}, but this branch has seen epoch \
             {seen}: it comes from a coordinator that no longer owns the transaction"
        )
    })
}

/// What the barrier does with one call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Call the handler.
    Run,
    /// Answer success without calling the handler, storing `record` first
    /// when given.
    Skip {
        /// The record to store (an empty cancel is remembered).
        record: Option<Mark>,
    },
    /// Do not call the handler; answer with this reason (a no vote for a
    /// try, an error for confirm / cancel).
    Refuse(String),
}

/// The barrier's rule table (see the module docs): what to do with a
/// `phase` call for a branch whose record is `current`.
pub fn decide(current: Option<Mark>, phase: Phase) -> Step {
    use Mark::*;
    let refuse = |why: &str| Step::Refuse(format!("barrier: {why}"));
    match (phase, current) {
        (Phase::Try, None) => Step::Run,
        // A repeat is answered no, never yes on the strength of the first
        // run (see the module docs): the no makes the coordinator abort and
        // roll the branch back, which releases what the first run holds.
        (Phase::Try, Some(Tried)) => refuse(
            "this branch's try already ran and may still hold its work until \
             its rollback; a try is not repeated",
        ),
        (Phase::Try, Some(Refused)) => {
            refuse("this branch's try already ran and voted no; a try is not repeated")
        }
        (Phase::Try, Some(Cancelled | EmptyCancelled)) => refuse(
            "this branch was cancelled before the try arrived; \
             the late try is refused so that nothing stays reserved",
        ),
        (Phase::Try, Some(Confirmed)) => refuse("this branch is already confirmed"),

        (Phase::Confirm, Some(Tried)) => Step::Run,
        (Phase::Confirm, Some(Confirmed)) => Step::Skip { record: None },
        (Phase::Confirm, None) => refuse(
            "no try is recorded for this branch (never tried, or its record was \
             removed by retention); refusing to confirm work that was not reserved",
        ),
        (Phase::Confirm, Some(Refused)) => refuse("this branch's try voted no"),
        (Phase::Confirm, Some(Cancelled | EmptyCancelled)) => {
            refuse("this branch was cancelled; a cancel is never reversed")
        }

        (Phase::Cancel, None) => Step::Skip {
            record: Some(EmptyCancelled),
        },
        (Phase::Cancel, Some(Tried)) => Step::Run,
        (Phase::Cancel, Some(Refused)) => Step::Skip {
            record: Some(Cancelled),
        },
        (Phase::Cancel, Some(Cancelled | EmptyCancelled)) => Step::Skip { record: None },
        (Phase::Cancel, Some(Confirmed)) => {
            refuse("this branch was confirmed; a confirm is never reversed")
        }

        (Phase::Deliver, None) => Step::Run,
        // An earlier delivery started (its `Tried` was stored) but its
        // completion was not: it failed, or its process died. Run it again.
        (Phase::Deliver, Some(Tried)) => Step::Run,
        (Phase::Deliver, Some(Confirmed)) => Step::Skip { record: None },
        (Phase::Deliver, Some(Refused | Cancelled | EmptyCancelled)) => refuse(
            "this branch's record is not a message delivery's (a try voted no, or it was \
             cancelled): the resource or the branch id is shared with another protocol",
        ),
    }
}

/// What the gate writes, the same for every store.
impl dyn BarrierEntry + '_ {
    /// Stores `mark` with `epoch` over the record this entry read (or
    /// wrote, or learned by [`reread`](BarrierEntry::reread)), stamped with
    /// the current time; durable on return. The epoch stored is the higher
    /// of `epoch` and the record's: it is never lowered. A record that is
    /// already `mark` at that epoch (the handler's own transaction wrote
    /// it) is not written again, only made durable. Any other mark than
    /// `Tried` also drops what [`put_tried`](Self::put_tried) kept.
    ///
    /// # Errors
    ///
    /// The store failed, or the record changed under the entry (it is then
    /// not overwritten).
    pub async fn put(&mut self, mark: Mark, epoch: u64) -> Result<(), BarrierError> {
        self.store(mark, epoch, None).await
    }

    /// Stores [`Mark::Tried`] together with the branch's resource and
    /// payload, which in-doubt resolution needs to call the handler's
    /// confirm or cancel without the coordinator; durable on return.
    ///
    /// # Errors
    ///
    /// As [`put`](Self::put).
    pub async fn put_tried(
        &mut self,
        resource: &str,
        payload: &[u8],
        epoch: u64,
    ) -> Result<(), BarrierError> {
        self.store(Mark::Tried, epoch, Some((resource, payload)))
            .await
    }

    async fn store(
        &mut self,
        mark: Mark,
        epoch: u64,
        tried: Option<(&str, &[u8])>,
    ) -> Result<(), BarrierError> {
        let from = self.record();
        if tried.is_none() && from.is_some_and(|r| r.mark == mark && r.epoch >= epoch) {
            return self.sync().await;
        }
        let to = BarrierRecord {
            mark,
            updated_ms: now_ms(),
            epoch: from.map_or(epoch, |r| r.epoch.max(epoch)),
        };
        self.compare_and_set(from.map(|r| r.mark), to, tried).await
    }
}

/// How a call went through the barrier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Passage {
    /// The handler was called: its own result is the call's.
    Ran,
    /// A repeat of a confirm, cancel or delivery the branch already had,
    /// answered success from the record without calling the handler.
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
    /// a confirm with no try, a cancel after a confirm, a delivery on
    /// another protocol's record.
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
            // A delivery is skipped only as a repeat (on `Confirmed`).
            (Step::Skip { .. }, Phase::Deliver, _) => Passage::Duplicate,
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
    let result = gate_one(store, ctx, payload, verb, call, false, &mut passage).await;
    Gated { passage, result }
}

/// Runs a saga step's action through the barrier. Unlike a try, an action
/// that started and did not say no (it failed, or its answer was lost) is
/// run again when the coordinator retries it forward: a saga step's
/// handler keeps what its action did and answers a repeat from that (the
/// [`Saga`](crate::Saga) contract), so the repeat commits nothing twice.
pub(crate) async fn saga_action(
    store: &dyn BarrierStore,
    ctx: &BranchContext,
    payload: &[u8],
    verb: &str,
    call: BoxFuture<'_, Result<Vote, HandlerError>>,
) -> Gated<Vote> {
    let mut passage = Passage::Unavailable;
    let result = gate_one(store, ctx, payload, verb, call, true, &mut passage).await;
    Gated { passage, result }
}

async fn gate_one(
    store: &dyn BarrierStore,
    ctx: &BranchContext,
    payload: &[u8],
    verb: &str,
    call: BoxFuture<'_, Result<Vote, HandlerError>>,
    repeatable: bool,
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
    let step = match current {
        Some(Mark::Tried) if repeatable => Step::Run,
        _ => decide(current, Phase::Try),
    };
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
    // A saga action run again finds it there already.
    if current.is_none() {
        entry
            .put_tried(&ctx.resource, payload, epoch)
            .await
            .map_err(unavailable)?;
    }
    *passage = Passage::Ran;
    let vote = call.await.map_err(|e| {
        let message = cap(&format!("{verb} failed: {e}"), MAX_STATUS_TEXT);
        if e.permanent {
            // Told apart from a failure that may pass (a saga's action is
            // retried forward on those).
            tandem_proto::rpc::permanent(message)
        } else {
            Status::internal(message)
        }
    })?;
    match vote {
        Vote::No { .. } => entry.put(Mark::Refused, epoch).await.map_err(unavailable)?,
        // The reservation must be as durable as the promise: a handler that
        // wrote it in the barrier's store (SledBarrier::transaction) would
        // otherwise vote yes on a write a crash can still take back.
        Vote::Yes { .. } => entry.sync().await.map_err(unavailable)?,
    }
    Ok(vote)
}

/// Runs a confirm / cancel (commit / rollback), or a delivery, through the
/// barrier: `ctx.phase` says which. `payload` is stored with the `Tried`
/// record a first delivery writes before its handler runs (in-doubt
/// resolution needs it to finish the delivery); confirms and cancels
/// store none.
pub(crate) async fn phase_two(
    store: &dyn BarrierStore,
    ctx: &BranchContext,
    payload: &[u8],
    verb: &str,
    call: BoxFuture<'_, Result<(), HandlerError>>,
) -> Gated<()> {
    let mut passage = Passage::Unavailable;
    let result = gate_two(store, ctx, payload, verb, call, &mut passage).await;
    Gated { passage, result }
}

async fn gate_two(
    store: &dyn BarrierStore,
    ctx: &BranchContext,
    payload: &[u8],
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
            if current.is_none() {
                // Only a first delivery runs on no record. Stored before
                // the handler runs, as a try's: a delivery that fails or
                // dies midway leaves `Tried`, and the next one runs again;
                // a handler writing in the barrier's store finds the
                // `Tried` it commits `Confirmed` over.
                entry
                    .put_tried(&ctx.resource, payload, epoch)
                    .await
                    .map_err(unavailable)?;
            }
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
                // The handler may have written it in its own transaction.
                entry.reread().await.map_err(unavailable)?;
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
        for phase in [Phase::Try, Phase::Confirm, Phase::Cancel, Phase::Deliver] {
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
        assert_eq!(
            of(Some(Mark::Confirmed), Phase::Deliver),
            Passage::Duplicate
        );
        assert_eq!(of(None, Phase::Deliver), Passage::Ran);
        assert_eq!(of(Some(Mark::Tried), Phase::Deliver), Passage::Ran);
        assert_eq!(of(Some(Mark::Cancelled), Phase::Deliver), Passage::Refused);
    }
}

//! A bank shard whose accounts live in sled, next to the SDK's barrier
//! records, for 2PC, TCC, sagas and message deliveries. Every change is written with
//! [`SledBarrier::transaction`], in the same sled transaction as the
//! barrier's record, so a crash never leaves one without the other; the
//! server makes both durable before it answers.
//!
//! Tree `accounts`: `bal:<account>` → balance, `frz:<account>` → frozen
//! funds, `hold:<gtid>:<branch>` → the frozen leg, `step:<gtid>:<branch>`
//! → a saga step's leg, done and not yet compensated or completed (i64
//! big-endian values; legs as [`Leg::encode`]).

use std::path::Path;

use sled::transaction::{ConflictableTransactionError, TransactionalTree};
use tandem_sdk::barrier::SledBarrier;
use tandem_sdk::{BranchContext, HandlerError, Message, Saga, Tcc, TwoPhase, Vote};

use crate::bank::Leg;

type TxResult<T> = Result<T, ConflictableTransactionError<HandlerError>>;

/// A durable bank shard.
#[derive(Clone)]
pub struct SledBank {
    barrier: SledBarrier,
    accounts: sled::Tree,
}

fn read(t: &TransactionalTree, key: &str) -> TxResult<i64> {
    Ok(t.get(key)?.map_or(0, |v| {
        i64::from_be_bytes(v.as_ref().try_into().unwrap_or([0; 8]))
    }))
}

fn write(t: &TransactionalTree, key: &str, value: i64) -> TxResult<()> {
    t.insert(key, &value.to_be_bytes())?;
    Ok(())
}

/// Why `leg` cannot be taken now: an unknown account, or a debit its free
/// funds (balance less frozen) do not cover.
fn refusal(t: &TransactionalTree, leg: &Leg) -> TxResult<Option<Vote>> {
    let bal = format!("bal:{}", leg.account);
    if t.get(&bal)?.is_none() {
        return Ok(Some(leg.refusal(None)));
    }
    let available = read(t, &bal)? - read(t, &format!("frz:{}", leg.account))?;
    Ok((leg.delta < 0 && available < -leg.delta).then(|| leg.refusal(Some(available))))
}

fn step_key(ctx: &BranchContext) -> String {
    format!("step:{}:{}", ctx.gtid, ctx.branch_id)
}

fn hold_key(ctx: &BranchContext) -> String {
    format!("hold:{}:{}", ctx.gtid, ctx.branch_id)
}

impl SledBank {
    /// Opens the shard in `dir` (barrier records in the same database).
    /// Accounts not present yet are created with `opening` balance;
    /// existing ones keep theirs.
    ///
    /// # Errors
    ///
    /// The database cannot be opened.
    pub fn open(
        dir: impl AsRef<Path>,
        accounts: &[String],
        opening: i64,
    ) -> Result<SledBank, Box<dyn std::error::Error + Send + Sync>> {
        let barrier = SledBarrier::open(dir)?;
        let tree = barrier.db().open_tree("accounts")?;
        for a in accounts {
            let key = format!("bal:{a}");
            if !tree.contains_key(&key)? {
                tree.insert(key, &opening.to_be_bytes())?;
            }
        }
        barrier.db().flush()?;
        Ok(SledBank {
            barrier,
            accounts: tree,
        })
    }

    /// The barrier store, to register on the participant server.
    pub fn barrier(&self) -> SledBarrier {
        self.barrier.clone()
    }

    fn sum(&self, prefix: &str) -> i64 {
        self.accounts
            .scan_prefix(prefix)
            .filter_map(Result::ok)
            .map(|(_, v)| i64::from_be_bytes(v.as_ref().try_into().unwrap_or([0; 8])))
            .sum()
    }

    /// Sum of all balances.
    pub fn total(&self) -> i64 {
        self.sum("bal:")
    }

    /// Funds frozen across all accounts.
    pub fn frozen(&self) -> i64 {
        self.sum("frz:")
    }

    /// Saga steps done and not yet compensated or completed.
    pub fn open_steps(&self) -> usize {
        self.accounts.scan_prefix("step:").count()
    }

    /// Frozen legs waiting for their outcome.
    pub fn open_holds(&self) -> usize {
        self.accounts.scan_prefix("hold:").count()
    }

    fn hold(&self, ctx: &BranchContext, payload: &[u8]) -> Result<Vote, HandlerError> {
        let leg = match Leg::decode(payload) {
            Ok(leg) => leg,
            Err(e) => return Ok(Vote::no(e)),
        };
        let key = hold_key(ctx);
        self.barrier.transaction(ctx, &self.accounts, |t| {
            if let Some(no) = refusal(t, &leg)? {
                return Ok(no);
            }
            if leg.delta < 0 {
                let frz = format!("frz:{}", leg.account);
                write(t, &frz, read(t, &frz)? - leg.delta)?;
            }
            t.insert(key.as_str(), leg.encode().as_ref())?;
            Ok(Vote::yes())
        })
    }

    /// A saga step's action: moves the leg's money now and records the
    /// step, in the barrier's transaction; run again, it finds the record
    /// and moves nothing.
    fn move_now(&self, ctx: &BranchContext, payload: &[u8]) -> Result<Vote, HandlerError> {
        let leg = match Leg::decode(payload) {
            Ok(leg) => leg,
            Err(e) => return Ok(Vote::no(e)),
        };
        let key = step_key(ctx);
        self.barrier.transaction(ctx, &self.accounts, |t| {
            // Run again (a forward retry): the step's record says it is done.
            if t.get(key.as_str())?.is_some() {
                return Ok(Vote::yes());
            }
            if let Some(no) = refusal(t, &leg)? {
                return Ok(no);
            }
            let bal = format!("bal:{}", leg.account);
            write(t, &bal, read(t, &bal)? + leg.delta)?;
            t.insert(key.as_str(), leg.encode().as_ref())?;
            Ok(Vote::yes())
        })
    }

    /// A saga step's compensation: moves back what the step's record says
    /// the action moved, if it committed (the barrier's `Tried` is written
    /// before the action runs, so it does not prove that).
    fn move_back(&self, ctx: &BranchContext) -> Result<(), HandlerError> {
        let key = step_key(ctx);
        self.barrier.transaction(ctx, &self.accounts, |t| {
            let Some(raw) = t.remove(key.as_str())? else {
                return Ok(()); // the action never committed
            };
            let Ok(leg) = Leg::decode(&raw) else {
                return Ok(());
            };
            let bal = format!("bal:{}", leg.account);
            write(t, &bal, read(t, &bal)? - leg.delta)
        })
    }

    /// A completed saga's step: its record is no longer needed.
    fn forget_step(&self, ctx: &BranchContext) -> Result<(), HandlerError> {
        let key = step_key(ctx);
        self.barrier.transaction(ctx, &self.accounts, |t| {
            t.remove(key.as_str())?;
            Ok(())
        })
    }

    /// Applies (`apply`) or releases the frozen leg, if any.
    fn settle(&self, ctx: &BranchContext, apply: bool) -> Result<(), HandlerError> {
        let key = hold_key(ctx);
        self.barrier.transaction(ctx, &self.accounts, |t| {
            let Some(raw) = t.remove(key.as_str())? else {
                return Ok(()); // the try voted no or failed before freezing
            };
            let Ok(leg) = Leg::decode(&raw) else {
                return Ok(());
            };
            if leg.delta < 0 {
                let frz = format!("frz:{}", leg.account);
                write(t, &frz, read(t, &frz)? + leg.delta)?;
            }
            if apply {
                let bal = format!("bal:{}", leg.account);
                write(t, &bal, read(t, &bal)? + leg.delta)?;
            }
            Ok(())
        })
    }
}

impl TwoPhase for SledBank {
    async fn prepare(&self, ctx: &BranchContext, payload: &[u8]) -> Result<Vote, HandlerError> {
        self.hold(ctx, payload)
    }
    async fn commit(&self, ctx: &BranchContext, _: &[u8]) -> Result<(), HandlerError> {
        self.settle(ctx, true)
    }
    async fn rollback(&self, ctx: &BranchContext, _: &[u8]) -> Result<(), HandlerError> {
        self.settle(ctx, false)
    }
}

impl Tcc for SledBank {
    async fn try_(&self, ctx: &BranchContext, payload: &[u8]) -> Result<Vote, HandlerError> {
        self.hold(ctx, payload)
    }
    async fn confirm(&self, ctx: &BranchContext, _: &[u8]) -> Result<(), HandlerError> {
        self.settle(ctx, true)
    }
    async fn cancel(&self, ctx: &BranchContext, _: &[u8]) -> Result<(), HandlerError> {
        self.settle(ctx, false)
    }
}

impl Saga for SledBank {
    async fn action(&self, ctx: &BranchContext, payload: &[u8]) -> Result<Vote, HandlerError> {
        self.move_now(ctx, payload)
    }
    async fn compensate(&self, ctx: &BranchContext, _: &[u8]) -> Result<(), HandlerError> {
        self.move_back(ctx)
    }
    async fn complete(&self, ctx: &BranchContext, _: &[u8]) -> Result<(), HandlerError> {
        self.forget_step(ctx)
    }
}

/// A message's delivery: the leg's money moves, in the barrier's
/// transaction, so a repeated delivery finds the branch delivered and moves
/// nothing (a debit that does not fit is refused for good: messages carry
/// credits).
impl Message for SledBank {
    async fn deliver(&self, ctx: &BranchContext, payload: &[u8]) -> Result<(), HandlerError> {
        let leg = Leg::decode(payload).map_err(HandlerError::permanent)?;
        self.barrier.transaction(ctx, &self.accounts, |t| {
            if let Some(Vote::No { reason }) = refusal(t, &leg)? {
                return Err(ConflictableTransactionError::Abort(
                    HandlerError::permanent(reason),
                ));
            }
            let bal = format!("bal:{}", leg.account);
            write(t, &bal, read(t, &bal)? + leg.delta)
        })
    }
}

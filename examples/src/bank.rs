//! A bank shard as a participant, for 2PC, TCC and sagas.
//!
//! Each branch is one leg of a transfer: `"<account>:<delta>"`, e.g.
//! `"alice:-100"` (debit) or `"bob:100"` (credit). Prepare (2PC) or try
//! (TCC) of a debit freezes the funds, so two concurrent transfers cannot
//! spend the same money, and votes no when the account cannot cover it;
//! commit / confirm applies the leg; rollback / cancel unfreezes. The SDK's
//! barrier keeps repeats and disorder away from these methods; on top of
//! that the frozen leg, keyed by `(gtid, branch)`, is consumed by the first
//! of commit or rollback, so the bank stays right even without it.
//!
//! As a saga step, a leg moves the money at once (a debit the account
//! cannot cover says no) and is recorded as the step; its compensation
//! moves back what that record says. An action run again (a forward
//! retry) finds the record and moves nothing twice; the barrier keeps a
//! repeated compensation from running twice and refuses an action that
//! arrives after its compensation.
//!
//! As a transactional message, the bank is both ends. The business side:
//! [`Bank::local_debit`] takes a debit in the bank's own "local
//! transaction" (one lock) together with the message's row, and
//! [`MessageCheck`] answers the coordinator's back-check from that row
//! (an unknown message gets a "not committed" row first, so a late local
//! debit of it is refused: the answer is final). The delivery side:
//! [`Message`] applies a leg (a credit) once; the barrier keeps a repeated
//! delivery from applying it twice.
//!
//! State is in memory to keep the example short; a real participant keeps
//! holds in the same durable store as balances, written in prepare.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use bytes::Bytes;
use tandem_sdk::{
    BranchContext, Gtid, HandlerError, Message, MessageCheck, Saga, Tcc, TwoPhase, Vote,
};

/// One leg of a transfer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leg {
    /// Account name.
    pub account: String,
    /// Negative for a debit, positive for a credit.
    pub delta: i64,
}

impl Leg {
    /// A debit of `amount` from `account`.
    pub fn debit(account: &str, amount: i64) -> Leg {
        Leg {
            account: account.to_string(),
            delta: -amount,
        }
    }

    /// A credit of `amount` to `account`.
    pub fn credit(account: &str, amount: i64) -> Leg {
        Leg {
            account: account.to_string(),
            delta: amount,
        }
    }

    /// The no vote for this leg: `available` is what its account has
    /// free (`None`: there is no such account).
    pub fn refusal(&self, available: Option<i64>) -> Vote {
        Vote::no(match available {
            None => format!("unknown account {}", self.account),
            Some(free) => format!(
                "insufficient funds in {}: {free} available, {} needed",
                self.account, -self.delta
            ),
        })
    }

    /// The branch payload: `"<account>:<delta>"`.
    pub fn encode(&self) -> Bytes {
        Bytes::from(format!("{}:{}", self.account, self.delta))
    }

    /// Parses a branch payload.
    ///
    /// # Errors
    ///
    /// A message saying what is malformed.
    pub fn decode(payload: &[u8]) -> Result<Leg, String> {
        let text = std::str::from_utf8(payload).map_err(|_| "payload is not UTF-8".to_string())?;
        let (account, delta) = text
            .rsplit_once(':')
            .ok_or_else(|| format!("payload {text:?} is not <account>:<delta>"))?;
        let delta = delta
            .parse()
            .map_err(|_| format!("amount {delta:?} is not a whole number"))?;
        if account.is_empty() {
            return Err("account is empty".into());
        }
        Ok(Leg {
            account: account.to_string(),
            delta,
        })
    }
}

impl Ledger {
    /// Why `leg` cannot be taken now: an unknown account, or a debit its
    /// free funds (balance less holds) do not cover.
    fn refusal(&self, leg: &Leg) -> Option<Vote> {
        let Some(&balance) = self.balances.get(&leg.account) else {
            return Some(leg.refusal(None));
        };
        let available = balance - self.reserved.get(&leg.account).copied().unwrap_or(0);
        (leg.delta < 0 && available < -leg.delta).then(|| leg.refusal(Some(available)))
    }
}

#[derive(Default)]
struct Ledger {
    balances: BTreeMap<String, i64>,
    /// Prepared legs not yet committed or rolled back.
    held: HashMap<(Gtid, u32), Leg>,
    /// Sum of held debits per account.
    reserved: HashMap<String, i64>,
    /// Saga steps done and not yet compensated or completed.
    steps: HashMap<(Gtid, u32), Leg>,
    /// Transactional messages this bank prepared: whether its local
    /// transaction committed (`false`: a back-check found none, and none
    /// may commit later).
    messages: HashMap<Gtid, bool>,
}

/// A bank shard: some accounts and their balances.
#[derive(Default)]
pub struct Bank {
    ledger: Mutex<Ledger>,
}

impl Bank {
    /// A shard holding `accounts` with their opening balances.
    pub fn new(accounts: impl IntoIterator<Item = (String, i64)>) -> Bank {
        Bank {
            ledger: Mutex::new(Ledger {
                balances: accounts.into_iter().collect(),
                ..Ledger::default()
            }),
        }
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sum of all balances (holds not subtracted).
    pub fn total(&self) -> i64 {
        self.ledger().balances.values().sum()
    }

    /// One account's balance.
    pub fn balance(&self, account: &str) -> Option<i64> {
        self.ledger().balances.get(account).copied()
    }

    /// Frozen legs still waiting for commit / confirm or rollback / cancel.
    pub fn open_holds(&self) -> usize {
        self.ledger().held.len()
    }

    /// Funds frozen across all accounts.
    pub fn frozen(&self) -> i64 {
        self.ledger().reserved.values().sum()
    }

    /// The local transaction of message `gtid`: takes `leg` (a debit) from
    /// its account and records the message as committed, both or neither.
    /// Refused when the account cannot cover it, or when a back-check
    /// already answered that the message's local transaction did not
    /// commit.
    ///
    /// # Errors
    ///
    /// The refusal's reason.
    pub fn local_debit(&self, gtid: Gtid, leg: &Leg) -> Result<(), String> {
        let mut l = self.ledger();
        if l.messages.contains_key(&gtid) {
            return Err(format!(
                "message {gtid} was checked back as not committed; its local transaction is refused"
            ));
        }
        if let Some(Vote::No { reason }) = l.refusal(leg) {
            return Err(reason);
        }
        *l.balances.entry(leg.account.clone()).or_default() += leg.delta;
        l.messages.insert(gtid, true);
        Ok(())
    }

    /// Whether message `gtid`'s local transaction ([`Bank::local_debit`])
    /// committed here.
    pub fn message_committed(&self, gtid: Gtid) -> bool {
        self.ledger().messages.get(&gtid) == Some(&true)
    }

    /// Freezes a debit (or notes a credit) and votes.
    fn hold(&self, ctx: &BranchContext, payload: &[u8]) -> Vote {
        let leg = match Leg::decode(payload) {
            Ok(leg) => leg,
            Err(e) => return Vote::no(e),
        };
        let mut l = self.ledger();
        let key = (ctx.gtid, ctx.branch_id);
        if l.held.contains_key(&key) {
            return Vote::yes(); // a repeated prepare
        }
        if let Some(no) = l.refusal(&leg) {
            return no;
        }
        if leg.delta < 0 {
            *l.reserved.entry(leg.account.clone()).or_default() += -leg.delta;
        }
        l.held.insert(key, leg);
        Vote::yes()
    }

    /// Moves a leg's money now (a saga step's action, or a message's
    /// delivery). A step's is recorded under `key`, so that a repeat (a
    /// forward retry) moves nothing twice and the compensation moves back
    /// exactly that.
    fn move_now(&self, key: Option<(Gtid, u32)>, payload: &[u8]) -> Vote {
        let leg = match Leg::decode(payload) {
            Ok(leg) => leg,
            Err(e) => return Vote::no(e),
        };
        let mut l = self.ledger();
        if key.is_some_and(|k| l.steps.contains_key(&k)) {
            return Vote::yes();
        }
        if let Some(no) = l.refusal(&leg) {
            return no;
        }
        *l.balances.entry(leg.account.clone()).or_default() += leg.delta;
        if let Some(k) = key {
            l.steps.insert(k, leg);
        }
        Vote::yes()
    }

    /// Moves back what a saga step's action moved, if it did (a saga
    /// step's compensation).
    fn move_back(&self, key: (Gtid, u32)) {
        let mut l = self.ledger();
        if let Some(leg) = l.steps.remove(&key) {
            *l.balances.entry(leg.account).or_default() -= leg.delta;
        }
    }

    /// Applies a frozen leg.
    fn apply(&self, ctx: &BranchContext) {
        let mut l = self.ledger();
        // No hold: committed already (a repeat) — nothing to do.
        if let Some(leg) = l.held.remove(&(ctx.gtid, ctx.branch_id)) {
            if leg.delta < 0 {
                *l.reserved.entry(leg.account.clone()).or_default() += leg.delta;
            }
            *l.balances.entry(leg.account).or_default() += leg.delta;
        }
    }

    /// Unfreezes a leg.
    fn release(&self, ctx: &BranchContext) {
        let mut l = self.ledger();
        // No hold: never prepared, voted no, or rolled back already.
        if let Some(leg) = l.held.remove(&(ctx.gtid, ctx.branch_id))
            && leg.delta < 0
        {
            *l.reserved.entry(leg.account).or_default() += leg.delta;
        }
    }
}

impl TwoPhase for Bank {
    async fn prepare(&self, ctx: &BranchContext, payload: &[u8]) -> Result<Vote, HandlerError> {
        Ok(self.hold(ctx, payload))
    }

    async fn commit(&self, ctx: &BranchContext, _payload: &[u8]) -> Result<(), HandlerError> {
        self.apply(ctx);
        Ok(())
    }

    async fn rollback(&self, ctx: &BranchContext, _payload: &[u8]) -> Result<(), HandlerError> {
        self.release(ctx);
        Ok(())
    }
}

/// TCC: try freezes, confirm moves the money, cancel unfreezes.
impl Tcc for Bank {
    async fn try_(&self, ctx: &BranchContext, payload: &[u8]) -> Result<Vote, HandlerError> {
        Ok(self.hold(ctx, payload))
    }

    async fn confirm(&self, ctx: &BranchContext, _payload: &[u8]) -> Result<(), HandlerError> {
        self.apply(ctx);
        Ok(())
    }

    async fn cancel(&self, ctx: &BranchContext, _payload: &[u8]) -> Result<(), HandlerError> {
        self.release(ctx);
        Ok(())
    }
}

/// Saga: the action moves the money, the compensation moves it back.
impl Saga for Bank {
    async fn action(&self, ctx: &BranchContext, payload: &[u8]) -> Result<Vote, HandlerError> {
        Ok(self.move_now(Some((ctx.gtid, ctx.branch_id)), payload))
    }

    async fn compensate(&self, ctx: &BranchContext, _payload: &[u8]) -> Result<(), HandlerError> {
        self.move_back((ctx.gtid, ctx.branch_id));
        Ok(())
    }

    async fn complete(&self, ctx: &BranchContext, _payload: &[u8]) -> Result<(), HandlerError> {
        self.ledger().steps.remove(&(ctx.gtid, ctx.branch_id));
        Ok(())
    }
}

/// A message's delivery: the leg's money moves now (a credit; a debit
/// that does not fit is retried, so messages carry credits).
impl Message for Bank {
    async fn deliver(&self, _ctx: &BranchContext, payload: &[u8]) -> Result<(), HandlerError> {
        match self.move_now(None, payload) {
            Vote::Yes { .. } => Ok(()),
            Vote::No { reason } => Err(HandlerError::permanent(reason)),
        }
    }
}

/// The back-check of a message this bank prepared: committed if its local
/// debit went through; otherwise it is marked not committed first, so the
/// "no" stays true.
impl MessageCheck for Bank {
    async fn check(&self, ctx: &BranchContext, _payload: &[u8]) -> Result<bool, HandlerError> {
        Ok(*self.ledger().messages.entry(ctx.gtid).or_insert(false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legs_round_trip_and_reject_garbage() {
        let leg = Leg::debit("acct:7", 25);
        assert_eq!(Leg::decode(&leg.encode()), Ok(leg));
        assert!(Leg::decode(b"nocolon").is_err());
        assert!(Leg::decode(b"a:ten").is_err());
        assert!(Leg::decode(b":5").is_err());
        assert!(Leg::decode(&[0xff, b':', b'1']).is_err());
    }
}

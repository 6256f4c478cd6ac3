//! A bank shard in PostgreSQL, for 2PC, TCC and sagas.
//!
//! Accounts live in `bank_accounts (id, balance, frozen)`; branch payloads
//! are [`Leg`]s (`"<account>:<delta>"`).
//!
//! - **2PC** (resource `accounts`, through [`PgTwoPhase`]): prepare applies
//!   the leg in a transaction and ends it with `PREPARE TRANSACTION`.
//!   PostgreSQL holds the changed row locked until commit or rollback, so
//!   no one else can spend the money meanwhile.
//! - **TCC** (resource `accounts-tcc`): try freezes a debit (`frozen +=`)
//!   and records the leg in `bank_holds`, keyed by `(gtid, branch)`;
//!   confirm applies the held leg, cancel releases it. Each runs in a
//!   [`BranchTx`], which commits the
//!   barrier record with the change: a confirm repeated after a crash
//!   finds `Confirmed` and does nothing.
//! - **Saga** (resource `accounts-saga`): the action moves the leg's money
//!   at once, the compensation moves it back, each in a [`BranchTx`] (a
//!   compensation runs only where the action committed).
//!
//! A prepare waits at most [`LOCK_WAIT`] for a row another transaction
//! holds, then votes no ("account busy"): two transfers crossing shards in
//! opposite directions would otherwise wait for each other across
//! databases, where PostgreSQL cannot see the deadlock.

use std::time::Duration;

use tandem_sdk::postgres::tokio_postgres::error::SqlState;
use tandem_sdk::postgres::{self, BranchTx, PgBarrier, PgError, PgPrepare, PgTwoPhase, Pool};
use tandem_sdk::{BranchContext, HandlerError, Saga, Tcc, TwoPhase, Vote};

use crate::bank::Leg;

/// How long a 2PC prepare waits for a locked account.
pub const LOCK_WAIT: Duration = Duration::from_millis(500);

/// The advisory lock the bank's tables are created under.
const SCHEMA_LOCK: i64 = 0x7461_6e64_656d_6261; // "tandemba"

/// No CHECK on balances on purpose: that no balance goes negative is the
/// protocol's doing (funds are held before they are spent), and the bank
/// test checks it with [`audit`].
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS bank_accounts (
    id text PRIMARY KEY,
    balance bigint NOT NULL,
    frozen bigint NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS bank_holds (
    gtid uuid NOT NULL,
    branch_id bigint NOT NULL,
    account text NOT NULL,
    delta bigint NOT NULL,
    PRIMARY KEY (gtid, branch_id)
);
-- Saga steps done and not yet compensated or completed: what a
-- compensation undoes (the barrier row says TRIED from before the action
-- ran, so it does not prove the action committed).
CREATE TABLE IF NOT EXISTS bank_saga_steps (
    gtid uuid NOT NULL,
    branch_id bigint NOT NULL,
    account text NOT NULL,
    delta bigint NOT NULL,
    PRIMARY KEY (gtid, branch_id)
);
";

/// Where a test wants the process to die (`bank-postgres serve --crash-at`):
/// it exits at once, as a kill would, with what is committed so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashAt {
    /// 2PC: after `PREPARE TRANSACTION`, before the yes vote is sent.
    AfterPrepare,
    /// 2PC: when a commit arrives, before `COMMIT PREPARED`.
    BeforeCommit,
    /// TCC: after the confirm (and its barrier record) committed, before
    /// the acknowledgement is sent.
    AfterConfirm,
}

impl std::str::FromStr for CrashAt {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "after-prepare" => Ok(CrashAt::AfterPrepare),
            "before-commit" => Ok(CrashAt::BeforeCommit),
            "after-confirm" => Ok(CrashAt::AfterConfirm),
            other => Err(format!(
                "unknown crash point {other:?} (after-prepare, before-commit, after-confirm)"
            )),
        }
    }
}

/// One bank shard: its database, served as `accounts` (2PC) and
/// `accounts-tcc` (TCC).
pub struct PgBank {
    barrier: PgBarrier,
    two_phase: PgTwoPhase<Legs>,
    crash: Option<CrashAt>,
}

/// The 2PC prepare SQL.
struct Legs;

fn crash_if(at: Option<CrashAt>, point: CrashAt) {
    if at == Some(point) {
        eprintln!("crash point {point:?} reached: exiting");
        std::process::exit(86);
    }
}

impl PgBank {
    /// Opens the shard in `url`'s database (creating its tables), with
    /// `accounts` at `balance` each if they do not exist yet.
    ///
    /// # Errors
    ///
    /// The database cannot be reached or set up, or it has prepared
    /// transactions disabled.
    pub async fn open(
        url: &str,
        accounts: &[String],
        balance: i64,
        crash: Option<CrashAt>,
    ) -> Result<PgBank, PgError> {
        let pool = postgres::pool(url, 32)?;
        {
            let mut conn = pool.get().await?;
            let tx = conn.transaction().await?;
            // Replicas of this shard may start at the same moment on a
            // fresh database: CREATE TABLE IF NOT EXISTS alone can then fail
            // on a race in the catalog. The SDK's tables are made the same
            // way, under a lock of their own.
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])
                .await?;
            tx.batch_execute(SCHEMA).await?;
            for id in accounts {
                // Not a bare ON CONFLICT: that waits for a prepared
                // transaction holding the row, which only the resolver
                // started after this can finish.
                tx.execute(
                    "INSERT INTO bank_accounts (id, balance)
                     SELECT $1, $2 WHERE NOT EXISTS (SELECT 1 FROM bank_accounts WHERE id = $1)
                     ON CONFLICT DO NOTHING",
                    &[id, &balance],
                )
                .await?;
            }
            tx.commit().await?;
        }
        let barrier = PgBarrier::open(pool).await?;
        let two_phase = PgTwoPhase::new(barrier.clone(), Legs).await?;
        Ok(PgBank {
            barrier,
            two_phase,
            crash,
        })
    }

    /// The barrier store to serve this bank with.
    pub fn barrier(&self) -> PgBarrier {
        self.barrier.clone()
    }

    /// The pool.
    pub fn pool(&self) -> &Pool {
        self.barrier.pool()
    }
}

fn leg(payload: &[u8]) -> Result<Leg, Vote> {
    Leg::decode(payload).map_err(Vote::no)
}

/// A vote for an account row that was not updated.
async fn refusal(tx: &BranchTx, leg: &Leg) -> Result<Vote, HandlerError> {
    let row = tx
        .query_opt(
            "SELECT balance - frozen FROM bank_accounts WHERE id = $1",
            &[&leg.account],
        )
        .await?;
    Ok(leg.refusal(row.map(|r| r.get::<_, i64>(0))))
}

impl PgPrepare for Legs {
    async fn prepare(
        &self,
        _: &BranchContext,
        payload: &[u8],
        tx: &BranchTx,
    ) -> Result<Vote, HandlerError> {
        let leg = match leg(payload) {
            Ok(leg) => leg,
            Err(no) => return Ok(no),
        };
        tx.batch_execute(&format!(
            "SET LOCAL lock_timeout = {}",
            LOCK_WAIT.as_millis()
        ))
        .await?;
        let updated = tx
            .execute(
                "UPDATE bank_accounts SET balance = balance + $2
                 WHERE id = $1 AND balance - frozen + $2 >= 0",
                &[&leg.account, &leg.delta],
            )
            .await;
        match updated {
            Ok(1) => Ok(Vote::yes()),
            Ok(_) => refusal(tx, &leg).await,
            Err(e) if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => Ok(Vote::no(format!(
                "account {} busy for {} ms",
                leg.account,
                LOCK_WAIT.as_millis()
            ))),
            Err(e) => Err(e.into()),
        }
    }
}

impl TwoPhase for PgBank {
    async fn prepare(&self, ctx: &BranchContext, payload: &[u8]) -> Result<Vote, HandlerError> {
        let vote = self.two_phase.prepare(ctx, payload).await?;
        if matches!(vote, Vote::Yes { .. }) {
            crash_if(self.crash, CrashAt::AfterPrepare);
        }
        Ok(vote)
    }

    async fn commit(&self, ctx: &BranchContext, payload: &[u8]) -> Result<(), HandlerError> {
        crash_if(self.crash, CrashAt::BeforeCommit);
        self.two_phase.commit(ctx, payload).await
    }

    async fn rollback(&self, ctx: &BranchContext, payload: &[u8]) -> Result<(), HandlerError> {
        self.two_phase.rollback(ctx, payload).await
    }
}

/// TCC: try freezes a debit and records the leg, confirm applies it,
/// cancel releases it; each in one transaction with its barrier record.
impl Tcc for PgBank {
    async fn try_(&self, ctx: &BranchContext, payload: &[u8]) -> Result<Vote, HandlerError> {
        let leg = match leg(payload) {
            Ok(leg) => leg,
            Err(no) => return Ok(no),
        };
        let tx = self.barrier.begin(ctx).await?;
        // A debit freezes the funds; a credit only checks the account.
        let frozen = (-leg.delta).max(0);
        let ok = tx
            .execute(
                "UPDATE bank_accounts SET frozen = frozen + $2
                 WHERE id = $1 AND balance - frozen >= $2",
                &[&leg.account, &frozen],
            )
            .await?;
        if ok != 1 {
            let vote = refusal(&tx, &leg).await?;
            tx.rollback().await?;
            return Ok(vote);
        }
        tx.execute(
            "INSERT INTO bank_holds (gtid, branch_id, account, delta) VALUES ($1, $2, $3, $4)",
            &[&ctx.gtid, &(ctx.branch_id as i64), &leg.account, &leg.delta],
        )
        .await?;
        tx.commit().await?;
        Ok(Vote::yes())
    }

    async fn confirm(&self, ctx: &BranchContext, _: &[u8]) -> Result<(), HandlerError> {
        let tx = self.barrier.begin(ctx).await?;
        // The hold is gone only if the try never wrote it, and then the
        // coordinator could not have decided to confirm.
        tx.execute(
            "WITH hold AS (DELETE FROM bank_holds WHERE gtid = $1 AND branch_id = $2
                           RETURNING account, delta)
             UPDATE bank_accounts a SET balance = a.balance + h.delta,
                 frozen = a.frozen - GREATEST(-h.delta, 0)
             FROM hold h WHERE a.id = h.account",
            &[&ctx.gtid, &(ctx.branch_id as i64)],
        )
        .await?;
        tx.commit().await?;
        crash_if(self.crash, CrashAt::AfterConfirm);
        Ok(())
    }

    async fn cancel(&self, ctx: &BranchContext, _: &[u8]) -> Result<(), HandlerError> {
        let tx = self.barrier.begin(ctx).await?;
        // No hold: the try failed or crashed before its commit.
        tx.execute(
            "WITH hold AS (DELETE FROM bank_holds WHERE gtid = $1 AND branch_id = $2
                           RETURNING account, delta)
             UPDATE bank_accounts a SET frozen = a.frozen - GREATEST(-h.delta, 0)
             FROM hold h WHERE a.id = h.account",
            &[&ctx.gtid, &(ctx.branch_id as i64)],
        )
        .await?;
        Ok(tx.commit().await?)
    }
}

/// Saga: a leg moves the money at once (a debit the account cannot cover
/// says no) and records the step in `bank_saga_steps` (an action run
/// again finds it, and moves nothing twice); the compensation
/// moves back what that row says, and removes it (the barrier's TRIED
/// row is written before the action runs, so only this row proves the
/// action committed); each in one transaction with its barrier record.
impl Saga for PgBank {
    async fn action(&self, ctx: &BranchContext, payload: &[u8]) -> Result<Vote, HandlerError> {
        let leg = match leg(payload) {
            Ok(leg) => leg,
            Err(no) => return Ok(no),
        };
        let tx = self.barrier.begin(ctx).await?;
        // Run again (a forward retry after a failure or a lost answer):
        // the step row says whether the first run committed.
        let done = tx
            .query_opt(
                "SELECT 1 FROM bank_saga_steps WHERE gtid = $1 AND branch_id = $2",
                &[&ctx.gtid, &(ctx.branch_id as i64)],
            )
            .await?;
        if done.is_some() {
            tx.rollback().await?;
            return Ok(Vote::yes());
        }
        let ok = tx
            .execute(
                "UPDATE bank_accounts SET balance = balance + $2
                 WHERE id = $1 AND balance - frozen + $2 >= 0",
                &[&leg.account, &leg.delta],
            )
            .await?;
        if ok != 1 {
            let vote = refusal(&tx, &leg).await?;
            tx.rollback().await?;
            return Ok(vote);
        }
        tx.execute(
            "INSERT INTO bank_saga_steps (gtid, branch_id, account, delta) VALUES ($1, $2, $3, $4)",
            &[&ctx.gtid, &(ctx.branch_id as i64), &leg.account, &leg.delta],
        )
        .await?;
        tx.commit().await?;
        Ok(Vote::yes())
    }

    async fn compensate(&self, ctx: &BranchContext, _: &[u8]) -> Result<(), HandlerError> {
        let tx = self.barrier.begin(ctx).await?;
        // No step row: the action never committed (it failed, or its
        // process died first): nothing to move back.
        tx.execute(
            "WITH step AS (DELETE FROM bank_saga_steps WHERE gtid = $1 AND branch_id = $2
                           RETURNING account, delta)
             UPDATE bank_accounts a SET balance = a.balance - s.delta
             FROM step s WHERE a.id = s.account",
            &[&ctx.gtid, &(ctx.branch_id as i64)],
        )
        .await?;
        Ok(tx.commit().await?)
    }

    async fn complete(&self, ctx: &BranchContext, _: &[u8]) -> Result<(), HandlerError> {
        let tx = self.barrier.begin(ctx).await?;
        tx.execute(
            "DELETE FROM bank_saga_steps WHERE gtid = $1 AND branch_id = $2",
            &[&ctx.gtid, &(ctx.branch_id as i64)],
        )
        .await?;
        Ok(tx.commit().await?)
    }
}

/// What [`audit`] found over a set of shards.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Audit {
    /// Accounts in all shards.
    pub accounts: usize,
    /// Sum of all balances.
    pub total: i64,
    /// Accounts with a negative balance.
    pub negative: Vec<String>,
    /// Funds frozen by TCC tries still waiting for confirm or cancel.
    pub frozen: i64,
    /// TCC holds not yet confirmed or cancelled.
    pub holds: usize,
    /// Prepared transactions (2PC) still waiting for commit or rollback.
    pub prepared: Vec<String>,
}

/// Reads every shard's accounts, holds and prepared transactions.
///
/// # Errors
///
/// A database cannot be read.
pub async fn audit(urls: &[String]) -> Result<Audit, PgError> {
    let mut audit = Audit::default();
    for url in urls {
        let pool = postgres::pool(url, 1)?;
        let conn = pool.get().await?;
        for row in conn
            .query(
                "SELECT id, balance, frozen FROM bank_accounts ORDER BY id",
                &[],
            )
            .await?
        {
            let balance: i64 = row.get(1);
            audit.accounts += 1;
            audit.total += balance;
            audit.frozen += row.get::<_, i64>(2);
            if balance < 0 {
                audit.negative.push(row.get(0));
            }
        }
        let holds: i64 = conn
            .query_one("SELECT count(*) FROM bank_holds", &[])
            .await?
            .get(0);
        audit.holds += holds as usize;
        for row in conn
            .query(
                "SELECT gid FROM pg_prepared_xacts WHERE database = current_database()",
                &[],
            )
            .await?
        {
            audit.prepared.push(row.get(0));
        }
    }
    Ok(audit)
}

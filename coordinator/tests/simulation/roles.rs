//! The other actors of a seed: in-doubt resolution at each participant
//! (seeds with the resolver on), participant outages that make phase 2
//! fail permanently (STUCK) and outages of the business database (its
//! back-checks fail: a message checked back in vain is STUCK, undecided),
//! the operator who retries, aborts and settles STUCK transactions by
//! hand, and the monitor that watches the store's rows (takeovers, and
//! whether every owned unfinished row is driven).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tandem_coordinator::Coordinator;
use tandem_coordinator::model::{BranchState, Decision, Gtid, Mode, TxState};
use tandem_proto::v1::BranchRequest;

use crate::clients::{outcome, routed};
use crate::instance::true_ms;
use crate::net::call_two;
use crate::participants::{
    DELIVERY_RESOURCE, IN_DOUBT_AFTER, SAGA_RESOURCE, SimParticipant, resource, resource_of,
};
use crate::store::Row;
use crate::world::World;

/// Finishes branch `key` at a replica of `p` as in-doubt resolution (or an
/// operator's hand) does: through the barrier, with epoch 0.
async fn finish_by_hand(
    world: &World,
    p: &SimParticipant,
    gtid: Gtid,
    branch: u32,
    res: &str,
    commit: bool,
) -> bool {
    let r = world.draw(|r| r.below(p.replicas.len() as u64)) as usize;
    let req = BranchRequest {
        gtid: gtid.to_string(),
        branch_id: branch,
        resource: res.into(),
        payload: Default::default(),
        attempt: 0,
        epoch: 0,
        mode: 0,
    };
    let mode = if res == resource(false) {
        Mode::TwoPhase
    } else if res == DELIVERY_RESOURCE {
        Mode::Msg
    } else {
        Mode::Tcc
    };
    call_two(&p.replicas[r], mode, commit, req).await.is_ok()
}

/// A participant's in-doubt resolution: every second, each branch tried
/// more than [`IN_DOUBT_AFTER`] ago and still `Tried` asks GetOutcome and
/// finishes itself through the barrier.
pub async fn resolver(world: Arc<World>, i: usize) {
    let p = world.net.participants[i].clone();
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = world.instance(0).clock.now_ms();
        if p.business.broken_until.load(Ordering::SeqCst) > now {
            continue; // the participant is down: it asks nothing
        }
        let before = now - IN_DOUBT_AFTER.as_millis() as u64;
        for ((gtid, branch), res) in p.in_doubt(before).await {
            if let Some(d) = outcome(&world, gtid).await {
                if (res == SAGA_RESOURCE || res == DELIVERY_RESOURCE) && d == Decision::Abort {
                    // As the SDK's resolver: a saga step is compensated by
                    // its coordinator alone, newest first; a message
                    // delivery (started only once its message was decided)
                    // is never cancelled.
                    continue;
                }
                finish_by_hand(&world, &p, gtid, branch, &res, d == Decision::Commit).await;
            }
        }
    }
}

/// While faults last, now and then a participant's phase 2 fails
/// permanently for a while (its ledger is closed for repair, its in-doubt
/// resolution stopped): its branches end STUCK. Now and then instead the
/// business database is down for a while: back-checks fail (retried,
/// STUCK past the retry budget) and local transactions cannot commit.
pub async fn outages(world: Arc<World>) {
    while world.faults_on.load(Ordering::SeqCst) {
        let wait = world.draw(|r| r.ms(3000, 30_000));
        tokio::time::sleep(wait).await;
        if !world.faults_on.load(Ordering::SeqCst) {
            return;
        }
        if let Some(len) = world.draw(|r| r.chance(0.3).then(|| r.ms(3000, 30_000))) {
            let until = world.instance(0).clock.now_ms() + len.as_millis() as u64;
            world.orders.down_until.store(until, Ordering::SeqCst);
            continue;
        }
        // One outage in five outlasts retention: the participant comes
        // back, and asks, after its settled transactions were removed.
        let (i, len) = world.draw(|r| {
            let len = if r.chance(0.2) {
                r.ms(150_000, 250_000)
            } else {
                r.ms(3000, 15_000)
            };
            (r.below(world.net.participants.len() as u64), len)
        });
        let until = world.instance(0).clock.now_ms() + len.as_millis() as u64;
        world.net.participants[i as usize]
            .business
            .broken_until
            .store(until, Ordering::SeqCst);
    }
}

/// The records to look at: the shared store's rows, or the one instance's
/// view of its local log.
pub fn rows(world: &World) -> Vec<Row> {
    world
        .store
        .shared_rows()
        .unwrap_or_else(|| world.instance(0).log.view())
}

/// What the operator can learn of message `gtid`'s local transaction:
/// nothing while the business database is down; else what a back-check
/// learns, the same way (a gtid with no row is closed first, so that the
/// answer is final). The operator never guesses.
fn local_outcome(world: &World, gtid: Gtid) -> Option<bool> {
    let now = world.instance(0).clock.now_ms();
    (!world.orders.down(now)).then(|| world.orders.check(gtid))
}

/// The operator's hand on a message that was checked back in vain (STUCK,
/// undecided): checks back again (`tandem tx retry`), or settles branch 1
/// (the local transaction) from the business database
/// (`tandem tx resolve --branch 1`).
async fn settle_message(world: &Arc<World>, gtid: Gtid) {
    let Some(committed) = local_outcome(world, gtid) else {
        return; // the business database is down: nothing to go by
    };
    if world.draw(|r| r.chance(0.5)) {
        let retry = |c: Coordinator| async move { c.retry(gtid).await };
        world.counts.operator.fetch_add(1, Ordering::Relaxed);
        let _ = routed(world, world.any(), retry).await;
        return;
    }
    let resolve = |c: Coordinator| async move {
        c.resolve(
            gtid,
            tandem_coordinator::engine::LOCAL_BRANCH,
            committed,
            "sim-operator".into(),
            "the business database's row".into(),
        )
        .await
    };
    if let Some((Ok(_), _)) = routed(world, world.any(), resolve).await {
        world.counts.resolves.fetch_add(1, Ordering::Relaxed);
        world
            .counts
            .messages_settled
            .fetch_add(1, Ordering::Relaxed);
    }
}

/// The operator: every few seconds, each STUCK transaction is retried
/// once its participant is back, or one of its branches is settled by hand
/// (`tandem tx resolve`); now and then an undecided transaction is aborted
/// (a message only once the business database shows its local transaction
/// did not commit). With the resolver off, a branch is settled only after
/// the operator applied the decision at the participant (nobody else
/// would); with it on, sometimes only in the coordinator, leaving the
/// participant to ask (never a message's delivery, which its participant
/// may never have heard of).
pub async fn operator(world: Arc<World>) {
    loop {
        let wait = world.draw(|r| r.ms(2000, 5000));
        tokio::time::sleep(wait).await;
        for row in rows(&world) {
            let rec = row.record;
            let gtid = rec.gtid;
            if rec.state == TxState::Stuck && rec.mode == Mode::Msg && rec.decision.is_none() {
                settle_message(&world, gtid).await;
            } else if rec.state == TxState::Stuck {
                let back = rec.branches.iter().all(|b| {
                    world.net.participant(&b.endpoint).is_none_or(|p| {
                        p.business.broken_until.load(Ordering::SeqCst)
                            <= world.instance(0).clock.now_ms()
                    })
                });
                if back && world.draw(|r| r.chance(0.7)) {
                    let retry = |c: Coordinator| async move { c.retry(gtid).await };
                    world.counts.operator.fetch_add(1, Ordering::Relaxed);
                    let _ = routed(&world, world.any(), retry).await;
                    continue;
                }
                let commit = rec.decision == Some(Decision::Commit);
                let owed = |b: &&tandem_coordinator::model::BranchRecord| {
                    b.resolution.is_none()
                        && !matches!(b.state, BranchState::Committed | BranchState::RolledBack)
                };
                // A saga's steps are undone newest first, by hand too.
                let owing = if rec.mode == Mode::Saga && !commit {
                    rec.branches.iter().rev().find(owed)
                } else {
                    rec.branches.iter().find(owed)
                };
                let Some(b) = owing else { continue };
                let Some(p) = world.net.participant(&b.endpoint) else {
                    continue;
                };
                // A saga step is never finished by in-doubt resolution (its
                // coordinator alone compensates it), nor a message delivery
                // that never reached its participant: only by hand.
                let by_hand = !world.resolver_on
                    || matches!(rec.mode, Mode::Saga | Mode::Msg)
                    || world.draw(|r| r.chance(0.5));
                if by_hand {
                    let res = resource_of(b.mode);
                    if !finish_by_hand(&world, &p, gtid, b.id, res, commit).await {
                        continue;
                    }
                }
                let id = b.id;
                let resolve = |c: Coordinator| async move {
                    c.resolve(
                        gtid,
                        id,
                        commit,
                        "sim-operator".into(),
                        "settled by hand".into(),
                    )
                    .await
                };
                if let Some((Ok(_), _)) = routed(&world, world.any(), resolve).await {
                    world.counts.resolves.fetch_add(1, Ordering::Relaxed);
                }
            } else if rec.decision.is_none()
                && !rec.state.is_terminal()
                && world.draw(|r| r.chance(0.02))
                && (rec.mode != Mode::Msg || local_outcome(&world, gtid) == Some(false))
            {
                let abort = |c: Coordinator| async move { c.abort(gtid, "operator".into()).await };
                world.counts.operator.fetch_add(1, Ordering::Relaxed);
                if let Some((Ok(state), by)) = routed(&world, world.any(), abort).await {
                    world.answers.state(&by, gtid, state, "operator abort");
                }
            }
        }
    }
}

/// What the monitor last saw of an unfinished row, and since when.
struct Seen {
    state: TxState,
    epoch: u64,
    updated_ms: u64,
    since_ms: u64,
}

/// How long an unfinished row owned by a live instance may sit unchanged
/// once faults stopped.
pub const DRIVEN_WITHIN: Duration = Duration::from_secs(60);

/// Every second: notes each row's epoch (takeovers), and, once faults
/// stopped, flags an unfinished (not STUCK) row that a live, unpaused
/// instance owns and that has not changed for [`DRIVEN_WITHIN`].
pub async fn monitor(world: Arc<World>) {
    let mut seen: BTreeMap<Gtid, Seen> = BTreeMap::new();
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = true_ms();
        let quiet = !world.faults_on.load(Ordering::SeqCst);
        let live: Vec<String> = world
            .all()
            .iter()
            .filter(|i| !i.is_paused() && !i.coord.is_halted())
            .filter_map(|i| i.log.incarnation())
            .collect();
        let mut next = BTreeMap::new();
        for row in rows(&world) {
            let rec = &row.record;
            {
                let mut epochs = world.epochs.lock().unwrap();
                let e = epochs.entry(rec.gtid).or_insert(row.epoch);
                *e = (*e).max(row.epoch);
            }
            world
                .last_seen
                .lock()
                .unwrap()
                .insert(rec.gtid, rec.clone());
            if rec.state.is_terminal() || rec.state == TxState::Stuck {
                continue;
            }
            let since = match seen.remove(&rec.gtid) {
                Some(s)
                    if s.state == rec.state
                        && s.epoch == row.epoch
                        && s.updated_ms == rec.updated_ms =>
                {
                    s.since_ms
                }
                _ => now,
            };
            let owned_live = row.owner.is_empty() || live.contains(&row.owner);
            // An undecided transaction waits for its deadline (a client
            // may still enlist or commit), and an owner that is not live
            // is waited for until its lease expires and someone claims it.
            let since = if rec.decision.is_none() {
                since.max(rec.deadline_ms.saturating_add(1500))
            } else {
                since
            };
            let since = if owned_live { since } else { now };
            if quiet && owned_live && now.saturating_sub(since) > DRIVEN_WITHIN.as_millis() as u64 {
                // What the owner holds, to tell a lost entry from a stalled one.
                let holders: Vec<String> = world
                    .all()
                    .iter()
                    .filter(|i| {
                        row.owner.is_empty() || i.log.incarnation().as_deref() == Some(&row.owner)
                    })
                    .map(|i| {
                        format!(
                            "live {}, recovering {}, tasks {}, get {:?}",
                            i.coord.live_count(),
                            i.coord.recovery_backlog(),
                            i.coord.task_count(),
                            i.coord.get(rec.gtid).map(|r| (r.state, r.epoch))
                        )
                    })
                    .collect();
                world.undriven.lock().unwrap().push(format!(
                    "{} sits {} at epoch {} owned by live instance {:?}, unchanged for {} s: nothing drives it ({})",
                    rec.gtid,
                    rec.state,
                    row.epoch,
                    row.owner,
                    now.saturating_sub(since) / 1000,
                    holders.join("; ")
                ));
            }
            next.insert(
                rec.gtid,
                Seen {
                    state: rec.state,
                    epoch: row.epoch,
                    updated_ms: rec.updated_ms,
                    since_ms: since,
                },
            );
        }
        seen = next;
    }
}

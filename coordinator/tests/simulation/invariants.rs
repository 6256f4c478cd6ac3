//! The properties every seed must keep, one function each.

use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hash, Hasher};

use tandem_coordinator::model::{Decision, Gtid, TxState};

use crate::net::Mark;
use crate::world::{Summary, World};

/// All invariants; the first broken one's message.
pub fn check(world: &World) -> Result<(), String> {
    no_participant_contradiction(world)?;
    no_split_outcome(world)?;
    phase_two_follows_the_durable_decision(world)?;
    nothing_reported_committed_that_was_not_durable(world)?;
    every_transaction_terminal(world)?;
    no_reservation_held(world)?;
    each_branch_called_with_its_own_protocol(world)?;
    nothing_leaks(world)
}

/// Every call of a branch used the branch's recorded protocol (in a
/// transaction mixing 2PC and TCC branches, each keeps its own).
fn each_branch_called_with_its_own_protocol(world: &World) -> Result<(), String> {
    for (gtid, (_, rec)) in world.log().view() {
        for b in &rec.branches {
            for p in &world.net.participants {
                if let Some(seen) = p.modes.lock().unwrap().get(&(gtid, b.id))
                    && *seen != b.mode
                {
                    return Err(format!(
                        "{gtid} branch {} is {:?} but was called with {seen:?}",
                        b.id, b.mode
                    ));
                }
            }
        }
    }
    Ok(())
}

/// No participant saw a phase-2 call contradicting an earlier one (confirm
/// after cancel, confirm without a try, …).
fn no_participant_contradiction(world: &World) -> Result<(), String> {
    for (i, p) in world.net.participants.iter().enumerate() {
        if let Some(v) = p.violations.lock().unwrap().first() {
            return Err(format!("participant {i}: {v}"));
        }
    }
    Ok(())
}

/// What each transaction's branches applied: gtid → set of commit flags.
fn applied(world: &World) -> BTreeMap<Gtid, Vec<bool>> {
    let mut by_gtid: BTreeMap<Gtid, Vec<bool>> = BTreeMap::new();
    for p in &world.net.participants {
        for (gtid, _, commit) in p.applied.lock().unwrap().iter() {
            by_gtid.entry(*gtid).or_default().push(*commit);
        }
    }
    by_gtid
}

/// Atomicity: no transaction has one branch confirmed and another
/// cancelled.
fn no_split_outcome(world: &World) -> Result<(), String> {
    for (gtid, commits) in applied(world) {
        if commits.contains(&true) && commits.contains(&false) {
            return Err(format!(
                "split outcome: {gtid} committed at one branch and rolled back at another"
            ));
        }
    }
    Ok(())
}

/// Every applied phase-2 call agrees with the durable decision: a commit
/// only under a durable commit; a rollback never under one.
fn phase_two_follows_the_durable_decision(world: &World) -> Result<(), String> {
    for (gtid, commits) in applied(world) {
        let durable = world.disk.get(&gtid).and_then(|r| r.decision);
        let committed = durable == Some(Decision::Commit);
        if commits.iter().any(|c| *c != committed) {
            return Err(format!(
                "{gtid}: participants applied commit={} but the durable decision is {durable:?}",
                !committed
            ));
        }
    }
    Ok(())
}

/// Nothing was reported committed (to a client, or through GetOutcome)
/// before the commit decision was durable.
fn nothing_reported_committed_that_was_not_durable(world: &World) -> Result<(), String> {
    match world.violations.lock().unwrap().first() {
        Some(v) => Err(v.clone()),
        None => Ok(()),
    }
}

/// Once faults stop, every transaction is terminal within the quiet phase.
fn every_transaction_terminal(world: &World) -> Result<(), String> {
    for (gtid, (_, rec)) in world.log().view() {
        if !rec.state.is_terminal() {
            return Err(format!(
                "{gtid} is still {} (decision {:?}) after the quiet phase",
                rec.state, rec.decision
            ));
        }
    }
    Ok(())
}

/// No participant still holds a reservation: every try was confirmed or
/// cancelled.
fn no_reservation_held(world: &World) -> Result<(), String> {
    for (i, p) in world.net.participants.iter().enumerate() {
        for ((gtid, branch), mark) in p.marks.lock().unwrap().iter() {
            if let Mark::Tried(_) = mark {
                return Err(format!(
                    "participant {i} still holds {gtid} branch {branch}"
                ));
            }
        }
    }
    Ok(())
}

/// The coordinator holds nothing for finished work: no live transaction,
/// no task, no recovery backlog.
fn nothing_leaks(world: &World) -> Result<(), String> {
    let coord = world.coord();
    let (live, tasks, backlog) = (
        coord.live_count(),
        coord.task_count(),
        coord.recovery_backlog(),
    );
    if live + tasks + backlog > 0 {
        return Err(format!(
            "leak after the quiet phase: {live} live transactions, {tasks} tasks, {backlog} awaiting recovery"
        ));
    }
    Ok(())
}

/// Counts and a digest of the end state (the same seed gives the same).
pub fn summary(world: &World) -> Summary {
    let view = world.log().view();
    let mut h = DefaultHasher::new();
    for (gtid, (_, rec)) in &view {
        gtid.hash(&mut h);
        rec.state.name().hash(&mut h);
        rec.branches.len().hash(&mut h);
    }
    for p in &world.net.participants {
        p.applied.lock().unwrap().hash(&mut h);
    }
    Summary {
        transactions: view.len(),
        committed: view
            .values()
            .filter(|(_, r)| r.state == TxState::Committed)
            .count(),
        restarts: world.restarts.load(std::sync::atomic::Ordering::SeqCst),
        reported_commits: world
            .reported_commits
            .load(std::sync::atomic::Ordering::SeqCst),
        digest: h.finish(),
    }
}

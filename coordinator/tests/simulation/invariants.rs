//! The properties every seed must keep, one function each.

use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::atomic::Ordering;

use tandem_coordinator::model::{Decision, Gtid, TxState};
use tandem_sdk::barrier::{BarrierStore, BranchKey, Mark};

use crate::participants::{Applied, Delivered};
use crate::roles::rows;
use crate::world::{Summary, World};

/// What is known of `gtid`: its answers, its effects, its row.
pub fn history(world: &World, gtid: &Gtid) -> String {
    let answers: Vec<String> = world
        .answers
        .all()
        .into_iter()
        .filter(|a| a.gtid == *gtid)
        .map(|a| {
            format!(
                "{} {} by {} at {} ms",
                a.how,
                if a.commit { "COMMIT" } else { "ABORT" },
                a.instance,
                a.at_ms - crate::instance::EPOCH_MS
            )
        })
        .collect();
    let effects: Vec<Applied> = applied(world).remove(gtid).unwrap_or_default();
    let row = world.last_seen.lock().unwrap().get(gtid).cloned();
    let message = world.messages.lock().unwrap().get(gtid).map(|m| {
        format!(
            "\n    message: {} deliveries, local transaction row {:?}, delivered {:?}",
            m.deliveries,
            world.orders.row(gtid),
            delivered(world).remove(gtid).unwrap_or_default()
        )
    });
    format!(
        "\n    answers: {answers:?}\n    effects: {effects:?}{}\n    decision: {:?}\n    last seen: {:?}",
        message.unwrap_or_default(),
        world.store.decision(gtid),
        row.map(|r| {
            let branches: Vec<_> = r
                .branches
                .iter()
                .map(|b| {
                    (
                        b.id,
                        b.mode,
                        b.endpoint.clone(),
                        b.state,
                        b.last_error.clone(),
                    )
                })
                .collect();
            (r.state, r.epoch, r.reason, branches)
        })
    )
}

/// All invariants; the first broken one's name and message.
pub async fn check(world: &World) -> Result<(), String> {
    check_all(world).await.map_err(|e| {
        // The history of the first gtid the message names, if not there.
        let gtid = e
            .split(|c: char| !(c.is_ascii_hexdigit() || c == '-'))
            .find_map(|w| Gtid::parse_str(w).ok().filter(|_| w.len() == 36));
        match gtid {
            Some(g) if !e.contains("answers:") => format!("{e}{}", history(world, &g)),
            _ => e,
        }
    })
}

async fn check_all(world: &World) -> Result<(), String> {
    let named = |name: &str, r: Result<(), String>| r.map_err(|e| format!("[{name}] {e}"));
    named("no_participant_violation", no_participant_violation(world))?;
    named(
        "store_decision_never_changes",
        store_decision_never_changes(world),
    )?;
    named("message_never_presumed", message_never_presumed(world))?;
    named(
        "message_delivered_at_most_once",
        message_delivered_at_most_once(world),
    )?;
    named(
        "message_delivered_iff_local_commit",
        message_delivered_iff_local_commit(world),
    )?;
    named("no_split_outcome", no_split_outcome(world))?;
    named(
        "applied_follows_the_decision",
        applied_follows_the_decision(world),
    )?;
    named("answers_agree", answers_agree(world))?;
    named("saga_steps_run_in_order", saga_steps_run_in_order(world))?;
    named(
        "saga_compensated_newest_first",
        saga_compensated_newest_first(world),
    )?;
    named(
        "reported_commits_were_durable",
        reported_commits_were_durable(world),
    )?;
    named("owned_rows_are_driven", owned_rows_are_driven(world))?;
    named(
        "every_transaction_finished",
        every_transaction_finished(world),
    )?;
    if !world.resolver_on {
        named(
            "coordinator_delivered_every_branch",
            coordinator_delivered_every_branch(world).await,
        )?;
    }
    named("no_hold_survives", no_hold_survives(world).await)?;
    named("nothing_leaks", nothing_leaks(world))
}

/// No participant saw a broken rule: a second try reserving again, a
/// confirm with nothing reserved, a phase-2 call the barrier refused as
/// contradicting the branch's record, a branch called with two protocols.
fn no_participant_violation(world: &World) -> Result<(), String> {
    if let Some(v) = world.net.violations.lock().unwrap().first() {
        return Err(v.clone());
    }
    for (i, p) in world.net.participants.iter().enumerate() {
        if let Some(v) = p.business.violations.lock().unwrap().first() {
            return Err(format!("participant {i}: {v}"));
        }
    }
    Ok(())
}

/// Every decision that ever landed in the store (removed rows included)
/// is the only one its gtid ever had.
fn store_decision_never_changes(world: &World) -> Result<(), String> {
    let mut first: BTreeMap<Gtid, Decision> = BTreeMap::new();
    for (gtid, d) in world.store.decisions() {
        if let Some(f) = first.insert(gtid, d)
            && f != d
        {
            return Err(format!(
                "{gtid} was decided {f:?} and later {d:?} in the store"
            ));
        }
    }
    Ok(())
}

fn applied(world: &World) -> BTreeMap<Gtid, Vec<Applied>> {
    let mut by_gtid: BTreeMap<Gtid, Vec<Applied>> = BTreeMap::new();
    for p in &world.net.participants {
        for a in p.business.applied.lock().unwrap().iter() {
            by_gtid.entry(a.gtid).or_default().push(a.clone());
        }
    }
    by_gtid
}

fn delivered(world: &World) -> BTreeMap<Gtid, Vec<Delivered>> {
    let mut by_gtid: BTreeMap<Gtid, Vec<Delivered>> = BTreeMap::new();
    for p in &world.net.participants {
        for d in p.business.delivered.lock().unwrap().iter() {
            by_gtid.entry(d.gtid).or_default().push(d.clone());
        }
    }
    by_gtid
}

/// No message whose local transaction committed was decided ABORT (by
/// its deadline, a restart or a takeover presuming it aborted, a failed
/// back-check taken as a no): only a back-check's no, the client's
/// rollback or an operator's word drops a message, and none of them can
/// come after a local commit.
fn message_never_presumed(world: &World) -> Result<(), String> {
    let messages = world.messages.lock().unwrap().clone();
    for gtid in messages.keys().filter(|g| world.orders.committed(g)) {
        if world.store.decision(gtid) == Some(Decision::Abort) {
            let seen = world.last_seen.lock().unwrap().get(gtid).cloned();
            let why = seen.map(|r| (r.abort, r.reason));
            return Err(format!(
                "message {gtid}: its local transaction committed, but it was decided ABORT \
                 (cause, reason: {why:?}){}",
                history(world, gtid)
            ));
        }
    }
    Ok(())
}

/// No delivery of a message was applied twice (the barrier absorbs the
/// coordinator's repeats, duplicates, and in-doubt resolution's or an
/// operator's hand).
fn message_delivered_at_most_once(world: &World) -> Result<(), String> {
    for (gtid, ds) in delivered(world) {
        let mut seen = BTreeMap::new();
        for d in &ds {
            if let Some(first) = seen.insert(d.branch, d) {
                return Err(format!(
                    "message {gtid} branch {}: delivered twice (#{} by coordinator: {}, #{} by \
                     coordinator: {}){}",
                    d.branch,
                    first.seq,
                    first.by_coordinator,
                    d.seq,
                    d.by_coordinator,
                    history(world, &gtid)
                ));
            }
        }
    }
    Ok(())
}

/// After quiescence, every message whose local transaction committed has
/// every delivery applied, and one whose local transaction did not commit
/// has none: whether it was submitted, rolled back, or left to the
/// back-check, through crashes, takeovers and failed checks (an operator
/// settles one checked back in vain from the business database). This
/// holds with in-doubt resolution off too: only the coordinator (or the
/// operator's hand) starts a delivery.
fn message_delivered_iff_local_commit(world: &World) -> Result<(), String> {
    let messages = world.messages.lock().unwrap().clone();
    let mut delivered = delivered(world);
    for (gtid, m) in &messages {
        let committed = world.orders.committed(gtid);
        let done: std::collections::BTreeSet<u32> = delivered
            .remove(gtid)
            .unwrap_or_default()
            .iter()
            .map(|d| d.branch)
            .collect();
        let wanted: std::collections::BTreeSet<u32> = if committed {
            (2..=m.deliveries + 1).collect()
        } else {
            Default::default()
        };
        if done != wanted {
            return Err(format!(
                "message {gtid}: local transaction committed: {committed}, deliveries applied \
                 {done:?}, owed {wanted:?}{}",
                history(world, gtid)
            ));
        }
    }
    if let Some((gtid, _)) = delivered.into_iter().next() {
        return Err(format!("{gtid}: a delivery of no message a client sent"));
    }
    Ok(())
}

/// Atomicity: no transaction has one branch confirmed and another
/// cancelled, whoever asked (coordinator, in-doubt resolution, operator).
fn no_split_outcome(world: &World) -> Result<(), String> {
    for (gtid, effects) in applied(world) {
        let commit = effects.iter().find(|a| a.commit);
        let abort = effects.iter().find(|a| !a.commit && a.had_hold);
        if let (Some(c), Some(a)) = (commit, abort) {
            return Err(format!(
                "split outcome: {gtid} branch {} committed (by coordinator: {}) and branch {} \
                 rolled back a hold (by coordinator: {}){}",
                c.branch,
                c.by_coordinator,
                a.branch,
                a.by_coordinator,
                history(world, &gtid)
            ));
        }
    }
    Ok(())
}

/// Every phase-2 effect agrees with the store's decision: a commit only
/// under a commit decision; a rollback never under one.
fn applied_follows_the_decision(world: &World) -> Result<(), String> {
    for (gtid, effects) in applied(world) {
        let decided = world.store.decision(&gtid);
        let committed = decided == Some(Decision::Commit);
        if let Some(a) = effects.iter().find(|a| a.commit != committed) {
            return Err(format!(
                "{gtid} branch {}: applied commit={} (by coordinator: {}) but the store's \
                 decision is {decided:?}",
                a.branch, a.commit, a.by_coordinator
            ));
        }
    }
    Ok(())
}

/// Every saga action, by gtid.
fn saga_actions(world: &World) -> BTreeMap<Gtid, Vec<crate::participants::SagaAction>> {
    let mut by_gtid: BTreeMap<Gtid, Vec<crate::participants::SagaAction>> = BTreeMap::new();
    for p in &world.net.participants {
        for a in p.business.saga_actions.lock().unwrap().iter() {
            by_gtid.entry(a.gtid).or_default().push(a.clone());
        }
    }
    by_gtid
}

/// A saga step's action starts only after every step it runs after (the
/// one before it in a sequence, the steps it names in a graph) answered
/// yes.
fn saga_steps_run_in_order(world: &World) -> Result<(), String> {
    for (gtid, actions) in saga_actions(world) {
        for a in &actions {
            for d in &a.after {
                let before = actions
                    .iter()
                    .filter(|b| b.branch == *d)
                    .filter_map(|b| b.done)
                    .min();
                if before.is_none_or(|done| done >= a.started) {
                    return Err(format!(
                        "saga {gtid}: step {}'s action started (#{}) before step {d}, which it \
                         runs after, said yes ({before:?})",
                        a.branch, a.started
                    ));
                }
            }
        }
    }
    Ok(())
}

/// The compensations of a saga's steps (those that undid an action),
/// whoever made them (the coordinator, or an operator's hand), came in the
/// reverse of the graph: a step's compensation only after that of every
/// step running after it that was compensated too (newest first in a
/// sequence).
fn saga_compensated_newest_first(world: &World) -> Result<(), String> {
    let actions = saga_actions(world);
    for (gtid, mut effects) in applied(world) {
        effects.retain(|a| a.saga && !a.commit && a.had_hold);
        let Some(steps) = actions.get(&gtid) else {
            continue;
        };
        // Whether step `later` runs after step `earlier`, through the
        // steps between them too.
        let runs_after = |later: u32, earlier: u32| {
            let mut seen = vec![later];
            let mut i = 0;
            while let Some(&step) = seen.get(i) {
                i += 1;
                for s in steps.iter().filter(|s| s.branch == step) {
                    if s.after.contains(&earlier) {
                        return true;
                    }
                    for d in &s.after {
                        if !seen.contains(d) {
                            seen.push(*d);
                        }
                    }
                }
            }
            false
        };
        for e in &effects {
            if let Some(late) = effects
                .iter()
                .find(|l| runs_after(l.branch, e.branch) && l.seq > e.seq)
            {
                return Err(format!(
                    "saga {gtid}: step {} compensated (#{}) before step {} (#{}), which runs \
                     after it",
                    e.branch, e.seq, late.branch, late.seq
                ));
            }
        }
    }
    Ok(())
}

/// Every outcome any instance told anyone, at any time, for one gtid,
/// agrees with every other and with the store's decision (a commit told
/// where the store decided abort or nothing, an abort where it decided
/// commit — after a purge included).
fn answers_agree(world: &World) -> Result<(), String> {
    let mut first: BTreeMap<Gtid, crate::answers::Answer> = BTreeMap::new();
    for a in world.answers.all() {
        let decided = world.store.decision(&a.gtid);
        if decided.is_some_and(|d| (d == Decision::Commit) != a.commit) {
            return Err(format!(
                "{} answered {} for {} ({}, at {} ms) but the store decided {decided:?}",
                a.instance,
                if a.commit { "COMMIT" } else { "ABORT" },
                a.gtid,
                a.how,
                a.at_ms - crate::instance::EPOCH_MS
            ));
        }
        if let Some(f) = first.get(&a.gtid) {
            if f.commit != a.commit {
                return Err(format!(
                    "{} was answered {} by {} ({}, at {} ms) and {} by {} ({}, at {} ms)",
                    a.gtid,
                    if f.commit { "COMMIT" } else { "ABORT" },
                    f.instance,
                    f.how,
                    f.at_ms - crate::instance::EPOCH_MS,
                    if a.commit { "COMMIT" } else { "ABORT" },
                    a.instance,
                    a.how,
                    a.at_ms - crate::instance::EPOCH_MS
                ));
            }
        } else {
            first.insert(a.gtid, a);
        }
    }
    Ok(())
}

/// Nothing was reported committed (to a client, or through GetOutcome)
/// before the commit decision was durable.
fn reported_commits_were_durable(world: &World) -> Result<(), String> {
    match world.violations.lock().unwrap().first() {
        Some(v) => Err(v.clone()),
        None => Ok(()),
    }
}

/// Once faults stopped, no unfinished row owned by a live instance sat
/// unchanged past the bound (the monitor's finding).
fn owned_rows_are_driven(world: &World) -> Result<(), String> {
    match world.undriven.lock().unwrap().first() {
        Some(v) => Err(v.clone()),
        None => Ok(()),
    }
}

/// At the end of the quiet phase every transaction is finished (or STUCK,
/// waiting for an operator).
fn every_transaction_finished(world: &World) -> Result<(), String> {
    for row in rows(world) {
        let rec = row.record;
        if !rec.state.is_terminal() && rec.state != TxState::Stuck {
            return Err(format!(
                "{} is still {} (decision {:?}, epoch {}, owner {:?}) after the quiet phase",
                rec.gtid, rec.state, rec.decision, row.epoch, row.owner
            ));
        }
    }
    Ok(())
}

/// Each branch's barrier record at the end.
async fn marks(world: &World) -> Vec<(usize, BranchKey, Option<Mark>)> {
    let mut out = Vec::new();
    for (i, p) in world.net.participants.iter().enumerate() {
        let keys: Vec<_> = p
            .business
            .tried_at
            .lock()
            .unwrap()
            .keys()
            .copied()
            .collect();
        for (gtid, branch_id) in keys {
            let key = BranchKey { gtid, branch_id };
            let mark = match p.barrier.enter(key).await {
                Ok(entry) => entry.record().map(|r| r.mark),
                Err(_) => None,
            };
            out.push((i, key, mark));
        }
    }
    out
}

/// With in-doubt resolution off, nothing but the coordinator (and the
/// operator's own hand) delivers phase 2: every branch of a decided
/// transaction that a try reached ends confirmed under COMMIT, and
/// cancelled (or voted no) under ABORT or no decision (presumed abort).
async fn coordinator_delivered_every_branch(world: &World) -> Result<(), String> {
    for (i, key, mark) in marks(world).await {
        if !world.store.known(&key.gtid) && world.killed_since(&key.gtid) {
            continue; // never durable, lost in a crash: the participant's to resolve
        }
        let decided = world.store.decision(&key.gtid);
        let ok = match decided {
            Some(Decision::Commit) => mark == Some(Mark::Confirmed),
            _ => matches!(
                mark,
                Some(Mark::Refused | Mark::Cancelled | Mark::EmptyCancelled)
            ),
        };
        if !ok {
            return Err(format!(
                "participant {i}: {} branch {} ends {mark:?} under decision {decided:?}: \
                 the coordinator never delivered its phase 2{}",
                key.gtid,
                key.branch_id,
                history(world, &key.gtid)
            ));
        }
    }
    Ok(())
}

/// No participant still holds a reservation, and no barrier record is
/// still `Tried`: every try was confirmed or cancelled.
async fn no_hold_survives(world: &World) -> Result<(), String> {
    // A branch of a gtid no log ever kept (a local log's unforced start,
    // or a shared store's one-shot start, lost in a crash before its
    // decision was written) is the participant's to release, by design:
    // with in-doubt resolution off nobody does, and with it on a question
    // asked only after retention's horizon passed the gtid is answered
    // FORGOTTEN (an operator's). Those are left out, and only those.
    let exempt = |gtid: &Gtid| {
        !world.store.known(gtid)
            && world.killed_since(gtid)
            && (!world.resolver_on || world.store.horizon_covers(gtid))
    };
    for (i, p) in world.net.participants.iter().enumerate() {
        let holds = p.business.holds.lock().unwrap().clone();
        if let Some(((gtid, branch), _)) = holds.iter().find(|(k, _)| !exempt(&k.0)) {
            return Err(format!(
                "participant {i} still holds {gtid} branch {branch} (decision {:?})",
                world.store.decision(gtid)
            ));
        }
    }
    for (i, key, mark) in marks(world).await {
        if mark == Some(Mark::Tried) && !exempt(&key.gtid) {
            return Err(format!(
                "participant {i}: {} branch {} is still Tried (decision {:?})",
                key.gtid,
                key.branch_id,
                world.store.decision(&key.gtid)
            ));
        }
    }
    Ok(())
}

/// No instance holds anything for finished work: no live transaction, no
/// task beyond its background sweeps, no recovery backlog.
fn nothing_leaks(world: &World) -> Result<(), String> {
    let sweeps = if world.store.shared() { 2 } else { 1 };
    for inst in world.all() {
        let coord = &inst.coord;
        let (live, tasks, backlog) = (
            coord.live_count(),
            coord.task_count().saturating_sub(sweeps),
            coord.recovery_backlog(),
        );
        if live + tasks + backlog > 0
            && !rows(world).iter().any(|r| r.record.state == TxState::Stuck)
        {
            return Err(format!(
                "{}: leak after the quiet phase: {live} live transactions, {tasks} tasks, \
                 {backlog} awaiting recovery",
                inst.setup.name
            ));
        }
    }
    Ok(())
}

/// Counts and a digest of the end state (the same seed gives the same).
pub fn summary(world: &World) -> Summary {
    let rows = rows(world);
    let mut h = DefaultHasher::new();
    for row in &rows {
        row.record.gtid.hash(&mut h);
        row.record.state.name().hash(&mut h);
        row.epoch.hash(&mut h);
    }
    let mut races = 0;
    for p in &world.net.participants {
        p.business.applied.lock().unwrap().hash(&mut h);
        p.business.delivered.lock().unwrap().hash(&mut h);
        races += p.races.load(Ordering::Relaxed);
    }
    let c = &world.counts;
    let purged: u64 = world.all().iter().map(|i| i.coord.purged()).sum();
    Summary {
        instances: world.instances.len(),
        resolver_off: !world.resolver_on,
        transactions: world.issued.load(Ordering::Relaxed) as usize,
        committed: world
            .store
            .decisions()
            .iter()
            .filter(|(_, d)| *d == Decision::Commit)
            .count(),
        restarts: c.restarts.load(Ordering::Relaxed),
        pauses: c.pauses.load(Ordering::Relaxed),
        takeovers: world
            .epochs
            .lock()
            .unwrap()
            .values()
            .map(|e| e.saturating_sub(1))
            .sum(),
        purges: c.purges.load(Ordering::Relaxed) + purged,
        resolves: c.resolves.load(Ordering::Relaxed),
        operator: c.operator.load(Ordering::Relaxed),
        races,
        messages: world.messages.lock().unwrap().len(),
        local_commits: world.orders.commits(),
        checks: world.orders.checks.load(Ordering::Relaxed),
        closed: world.orders.closed.load(Ordering::Relaxed),
        messages_settled: c.messages_settled.load(Ordering::Relaxed),
        reported_commits: c.reported_commits.load(Ordering::Relaxed),
        digest: h.finish(),
    }
}

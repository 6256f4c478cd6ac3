//! Clients: one-shot and interactive transactions of both protocols (and
//! mixed ones), sagas, and transactional messages (prepared, then a local
//! transaction on the business database, then submitted, rolled back, or
//! left to the back-check), sent to a random instance, following `MOVED`
//! redirects to the instance that owns the transaction, giving up at
//! random points and asking again with their own gtid. Every outcome an
//! instance tells them is recorded.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use tandem_coordinator::Coordinator;
use tandem_coordinator::engine::NewBranch;
use tandem_coordinator::error::CoordError;
use tandem_coordinator::model::{Gtid, Mode, TxState};

use crate::net::SimNet;
use crate::participants::{CHECK_RESOURCE, DELIVERY_RESOURCE, resource, resource_of};
use crate::world::{PARTICIPANTS, SentMessage, World};

/// Awaits `fut`, or gives up after `cancel` (dropping it, as tonic drops a
/// handler whose client went away).
async fn maybe_cancel<T>(cancel: Option<Duration>, fut: impl Future<Output = T>) -> Option<T> {
    match cancel {
        Some(d) => tokio::time::timeout(d, fut).await.ok(),
        None => Some(fut.await),
    }
}

/// When the client gives up on a call: a quarter cut short at random, the
/// rest at a client deadline (a call stuck behind a paused instance is
/// abandoned, and a client with its own gtid asks another instance).
fn cancel_point(world: &World) -> Option<Duration> {
    Some(world.draw(|r| {
        if r.chance(0.25) {
            r.ms(0, 1500)
        } else {
            r.ms(8000, 15_000)
        }
    }))
}

/// Sends `call` to instance `first`, following up to three redirects;
/// `None` when the client gave up. Returns the answer and who gave it.
pub async fn routed<T, F, Fut>(
    world: &World,
    first: usize,
    call: F,
) -> Option<(Result<T, CoordError>, String)>
where
    F: Fn(Coordinator) -> Fut,
    Fut: Future<Output = Result<T, CoordError>>,
{
    let mut at = first;
    for _ in 0..4 {
        let cancel = cancel_point(world);
        let attempt = async {
            let (coord, name) = world.reach(at).await;
            (call(coord).await, name)
        };
        let (result, name) = maybe_cancel(cancel, attempt).await?;
        match &result {
            Err(CoordError::Moved { address, .. }) => match world.by_address(address) {
                Some(next) => at = next,
                None => return Some((result, name)),
            },
            _ => return Some((result, name)),
        }
    }
    None
}

fn branch(world: &World, i: usize, mode: Mode) -> NewBranch {
    // A third of the branches name their own protocol (mixed-mode
    // transactions); the rest run the transaction's. A saga's steps are
    // saga steps (the wire's TCC calls).
    let own = world.draw(|r| {
        (mode != Mode::Saga && r.chance(0.33)).then(|| {
            if r.chance(0.5) {
                Mode::TwoPhase
            } else {
                Mode::Tcc
            }
        })
    });
    let effective = own.unwrap_or(mode);
    NewBranch {
        endpoint: SimNet::endpoint(world.draw(|r| r.below(PARTICIPANTS as u64)) as usize),
        resource: resource_of(effective).into(),
        payload: Bytes::from(vec![i as u8; 8]),
        mode: own,
        after: Vec::new(),
    }
}

/// Half the one-shot sagas name the steps each runs after (a graph whose
/// edges point to earlier steps: roots, parallel siblings, joins); the
/// rest are sequences. Each step's payload carries the steps it runs after
/// as the engine orders them (`participants::saga_payload`), for the saga
/// invariants.
fn saga_graph(world: &World, branches: &mut [NewBranch]) {
    if world.draw(|r| r.chance(0.5)) {
        for (i, b) in branches.iter_mut().enumerate().skip(1) {
            b.after = (1..=i as u32)
                .filter(|_| world.draw(|r| r.chance(0.5)))
                .collect();
        }
    }
    let sequence = branches.iter().all(|b| b.after.is_empty());
    for (i, b) in branches.iter_mut().enumerate() {
        let after: Vec<u32> = if sequence {
            (i as u32..=i as u32).filter(|d| *d >= 1).collect()
        } else {
            b.after.clone()
        };
        b.payload = crate::participants::saga_payload(i, &after);
    }
}

pub async fn client(world: Arc<World>) {
    while world.clients_on.load(Ordering::SeqCst) {
        // One transaction in six is a transactional message.
        if world.draw(|r| r.chance(1.0 / 6.0)) {
            message(&world).await;
            let pause = world.draw(|r| r.ms(0, 300));
            tokio::time::sleep(pause).await;
            continue;
        }
        let (mode, interactive, n, timeout) = world.draw(|r| {
            let mode = if r.chance(0.4) {
                Mode::TwoPhase
            } else if r.chance(0.67) {
                Mode::Tcc
            } else {
                Mode::Saga
            };
            (
                mode,
                r.chance(0.4),
                // Sagas up to five steps: room for joins with a step
                // after them.
                1 + r.below(if mode == Mode::Saga { 5 } else { 3 }) as usize,
                r.ms(1000, 8000),
            )
        });
        let mut branches: Vec<NewBranch> = (0..n).map(|i| branch(&world, i, mode)).collect();
        if mode == Mode::Saga && !interactive {
            saga_graph(&world, &mut branches);
        }
        if interactive {
            interactive_txn(&world, mode, timeout, branches).await;
        } else {
            one_shot(&world, mode, timeout, branches).await;
        }
        let pause = world.draw(|r| r.ms(0, 300));
        tokio::time::sleep(pause).await;
    }
}

fn is_commit(state: TxState) -> bool {
    matches!(state, TxState::Committed | TxState::Committing)
}

async fn one_shot(world: &Arc<World>, mode: Mode, timeout: Duration, branches: Vec<NewBranch>) {
    let chosen = world.draw(|r| r.chance(0.5)).then(|| {
        let i = world.any();
        world.instance(i).clock.new_gtid()
    });
    for tries in 1.. {
        let call = |coord: Coordinator| {
            let branches = branches.clone();
            async move {
                coord
                    .submit(mode, Some(timeout), branches, chosen, Vec::new(), None)
                    .await
            }
        };
        match routed(world, world.any(), call).await {
            Some((Ok(out), by)) => {
                if is_commit(out.state) {
                    world.reported_commit(out.gtid, &by, "Submit");
                } else {
                    world.answers.state(&by, out.gtid, out.state, "Submit");
                }
                return;
            }
            // No answer: with its own gtid the client may safely ask again.
            _ if chosen.is_some() && tries < 4 => {
                let wait = world.draw(|r| r.ms(50, 1000));
                tokio::time::sleep(wait).await;
            }
            _ => return,
        }
    }
}

async fn interactive_txn(
    world: &Arc<World>,
    mode: Mode,
    timeout: Duration,
    branches: Vec<NewBranch>,
) {
    let home = world.any();
    let begin = |coord: Coordinator| async move {
        coord
            .begin(mode, Some(timeout), None, Vec::new(), None)
            .await
    };
    let Some((Ok(gtid), _)) = routed(world, home, begin).await else {
        return;
    };
    for b in branches {
        let enlist = |coord: Coordinator| {
            let b = b.clone();
            async move { coord.enlist(gtid, b).await }
        };
        match routed(world, home, enlist).await {
            Some((Ok(_), _)) => {}
            Some((Err(_), _)) => return,
            None => break, // gave up on this call; decide anyway
        }
    }
    match world.draw(|r| r.below(10)) {
        0 => {} // walk away: the deadline aborts it
        1 => {
            let rollback = |coord: Coordinator| async move {
                coord.rollback(gtid, "changed mind".into()).await
            };
            if let Some((Ok(out), by)) = routed(world, home, rollback).await {
                world.answers.state(&by, gtid, out.state, "Rollback");
            }
        }
        _ => {
            for _ in 0..3 {
                let commit = |coord: Coordinator| async move { coord.commit(gtid).await };
                match routed(world, world.any(), commit).await {
                    Some((Ok(state), by)) => {
                        if is_commit(state) {
                            world.reported_commit(gtid, &by, "Commit");
                        }
                        return;
                    }
                    Some((Err(CoordError::Aborted { .. }), by)) => {
                        world.answers.record(&by, gtid, false, "Commit");
                        return;
                    }
                    Some((Err(_), _)) => return,
                    None => {} // gave up: ask again (a repeat waits for the same force)
                }
            }
        }
    }
    // Now and then someone looks the transaction up.
    if world.draw(|r| r.chance(0.3)) {
        let get = |coord: Coordinator| async move { coord.get(gtid) };
        if let Some((Ok(rec), by)) = routed(world, world.any(), get).await {
            world.answers.shown(&by, &rec);
        }
    }
}

/// What a message's client does once its message is prepared.
#[derive(Clone, Copy, Debug)]
enum Local {
    /// Commits its local transaction, then submits the message.
    CommitSubmit,
    /// Commits its local transaction and dies before submitting: the
    /// back-check must find the commit.
    CommitDie,
    /// Rolls its local transaction back, then rolls the message back.
    RollbackRollback,
    /// Rolls its local transaction back and says nothing: the back-check
    /// must find no commit.
    RollbackSilent,
}

/// A transactional message: prepare (the business service's back-check as
/// branch 1, one to three deliveries), the local transaction on the
/// business database (taking a while, sometimes past the deadline, when a
/// back-check may close it first: then it fails), then one of [`Local`].
async fn message(world: &Arc<World>) {
    let (n, timeout, work, choice) = world.draw(|r| {
        let timeout = r.ms(1000, 8000);
        let n = 1 + r.below(3) as u32;
        let work = Duration::from_millis(r.below(timeout.as_millis() as u64 * 3 / 2 + 1));
        let choice = match r.below(10) {
            0..=4 => Local::CommitSubmit,
            5 | 6 => Local::CommitDie,
            7 => Local::RollbackRollback,
            _ => Local::RollbackSilent,
        };
        (n, timeout, work, choice)
    });
    let home = world.any();
    let gtid = world.instance(home).clock.new_gtid();
    let endpoint = || SimNet::endpoint(world.draw(|r| r.below(PARTICIPANTS as u64)) as usize);
    let check = NewBranch {
        endpoint: endpoint(),
        resource: CHECK_RESOURCE.into(),
        payload: Bytes::new(),
        mode: None,
        after: Vec::new(),
    };
    let deliveries: Vec<NewBranch> = (0..n)
        .map(|i| NewBranch {
            endpoint: endpoint(),
            resource: DELIVERY_RESOURCE.into(),
            payload: Bytes::from(vec![i as u8; 8]),
            mode: None,
            after: Vec::new(),
        })
        .collect();
    world
        .messages
        .lock()
        .unwrap()
        .insert(gtid, SentMessage { deliveries: n });
    // Prepared (durable) before anything local; a repeat with the same gtid
    // answers the same message. No answer: the local transaction is never
    // started (the back-check closes the gtid, if the message was kept).
    let mut prepared = false;
    for _ in 0..3 {
        let prepare = |coord: Coordinator| {
            let (check, deliveries) = (check.clone(), deliveries.clone());
            async move {
                coord
                    .prepare_message(gtid, check, deliveries, Some(timeout), Vec::new(), None)
                    .await
            }
        };
        match routed(world, home, prepare).await {
            Some((Ok(_), _)) => {
                prepared = true;
                break;
            }
            Some((Err(_), _)) => break,
            None => {
                let wait = world.draw(|r| r.ms(50, 1000));
                tokio::time::sleep(wait).await;
            }
        }
    }
    if !prepared {
        return;
    }
    tokio::time::sleep(work).await;
    let commit = matches!(choice, Local::CommitSubmit | Local::CommitDie);
    // The local commit fails if the database is down, or a back-check
    // closed the gtid first: then it rolled back.
    let committed = commit
        && !world.orders.down(world.instance(home).clock.now_ms())
        && world.orders.commit(gtid);
    match (choice, committed) {
        (Local::CommitDie, true) | (Local::RollbackSilent, _) => {}
        (Local::CommitSubmit, true) => {
            for _ in 0..3 {
                let submit = |coord: Coordinator| async move { coord.submit_message(gtid).await };
                match routed(world, world.any(), submit).await {
                    Some((Ok(state), by)) => {
                        if is_commit(state) {
                            world.reported_commit(gtid, &by, "SubmitMessage");
                        } else {
                            world.answers.state(&by, gtid, state, "SubmitMessage");
                        }
                        return;
                    }
                    Some((Err(_), _)) => return,
                    None => {} // gave up: submit again (a repeat answers the same)
                }
            }
        }
        // Rolled back (by choice, or the commit failed): half the time the
        // client says so.
        _ => {
            if matches!(choice, Local::RollbackRollback) || world.draw(|r| r.chance(0.5)) {
                let rollback = |coord: Coordinator| async move {
                    coord
                        .rollback(gtid, "local transaction rolled back".into())
                        .await
                };
                if let Some((Ok(out), by)) = routed(world, home, rollback).await {
                    world.answers.state(&by, gtid, out.state, "Rollback");
                }
            }
        }
    }
}

/// A client that opens many interactive transactions, enlists one branch
/// in each and walks away (their long deadlines outlive a crash), so that
/// recovery has a backlog to work through beside live traffic.
pub async fn hoarder(world: Arc<World>, n: usize) {
    world.calm.store(true, Ordering::SeqCst);
    let parts: Vec<_> = (0..50)
        .map(|k| tokio::spawn(hoard(world.clone(), k, n / 50)))
        .collect();
    for p in parts {
        let _ = p.await;
    }
    // Crash with the backlog in the log, then leave recovery to work
    // through it beside the clients' traffic.
    world.restart(0, false).await;
}

async fn hoard(world: Arc<World>, k: usize, n: usize) {
    for i in k..k + n {
        let coord = world.instance(0).coord.clone();
        let Ok(gtid) = coord
            .begin(
                Mode::Tcc,
                Some(Duration::from_secs(120)),
                None,
                Vec::new(),
                None,
            )
            .await
        else {
            continue;
        };
        let b = NewBranch {
            endpoint: SimNet::endpoint(i % PARTICIPANTS),
            resource: resource(true).into(),
            payload: Bytes::new(),
            mode: None,
            after: Vec::new(),
        };
        let _ = coord.enlist(gtid, b).await;
    }
}

/// The gtid's answer from GetOutcome at a random instance, recorded.
pub async fn outcome(world: &World, gtid: Gtid) -> Option<tandem_coordinator::model::Decision> {
    let i = world.any();
    let ask = |coord: Coordinator| async move { coord.outcome(gtid) };
    match routed(world, i, ask).await {
        Some((Ok(d), by)) => {
            if d == Some(tandem_coordinator::model::Decision::Commit) {
                world.reported_commit(gtid, &by, "GetOutcome");
            } else {
                world.answers.decision(&by, gtid, d, "GetOutcome");
            }
            d
        }
        _ => None,
    }
}

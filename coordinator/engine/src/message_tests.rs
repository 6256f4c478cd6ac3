//! Transactional messages: delivered only once the local transaction is
//! known committed (Submit, a back-check's yes, an operator), never
//! aborted for the deadline, dropped without a call.

use super::*;
use crate::model::{BranchState, Resolution};

use bytes::Bytes;

const NOW: u64 = 1_000;
const DEADLINE: u64 = 61_000;

fn branch(n: u32) -> NewBranch {
    NewBranch {
        endpoint: format!("http://127.0.0.1:{}", 9000 + n),
        resource: format!("r{n}"),
        payload: Bytes::from_static(b"p"),
        mode: None,
        after: Vec::new(),
    }
}

/// A message with `n` deliveries, prepared.
fn message(n: u32) -> Txn {
    let (t, cmds) = Txn::prepare_message(
        Gtid::now_v7(),
        NOW,
        DEADLINE,
        branch(0),
        (1..=n).map(branch).collect(),
    );
    assert_eq!(
        cmds,
        vec![Command::Force],
        "the prepare is forced, nothing else"
    );
    assert_eq!(t.record().state, TxState::Preparing);
    t
}

fn on(t: &mut Txn, event: Event, now: u64) -> Vec<Command> {
    t.handle(event, now).expect("event")
}

fn checked(t: &mut Txn, vote: Vote, now: u64) -> Vec<Command> {
    on(
        t,
        Event::PhaseOne {
            branch: LOCAL_BRANCH,
            vote,
        },
        now,
    )
}

fn deliveries(cmds: &[Command]) -> Vec<BranchId> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::PhaseTwo {
                branch,
                commit: true,
                ..
            } => Some(*branch),
            _ => None,
        })
        .collect()
}

fn no_calls(cmds: &[Command]) -> bool {
    !cmds
        .iter()
        .any(|c| matches!(c, Command::PhaseOne { .. } | Command::PhaseTwo { .. }))
}

/// Forces the decision and acknowledges every delivery.
fn deliver_all(t: &mut Txn, cmds: Vec<Command>, now: u64) {
    assert!(cmds.contains(&Command::ForceDecision), "{cmds:?}");
    assert!(deliveries(&cmds).is_empty(), "nothing before the force");
    let cmds = on(t, Event::DecisionDurable, now);
    let ids = deliveries(&cmds);
    assert_eq!(
        ids,
        (2..=t.record().branches.len() as u32).collect::<Vec<_>>()
    );
    for id in ids {
        on(
            t,
            Event::PhaseTwo {
                branch: id,
                result: Ok(()),
            },
            now,
        );
    }
    assert_eq!(t.record().state, TxState::Committed);
    assert!(
        t.record()
            .branches
            .iter()
            .all(|b| b.state == BranchState::Committed)
    );
}

#[test]
fn submit_decides_delivery_forced_then_delivers_to_every_branch() {
    let mut t = message(2);
    let cmds = on(&mut t, Event::Commit, NOW);
    deliver_all(&mut t, cmds, NOW);
    // A repeat changes nothing.
    assert_eq!(on(&mut t, Event::Commit, NOW), Vec::new());
}

#[test]
fn the_deadline_checks_back_instead_of_aborting() {
    let mut t = message(1);
    let cmds = on(&mut t, Event::DeadlinePassed, DEADLINE);
    assert_eq!(
        cmds,
        vec![Command::PhaseOne {
            branch: LOCAL_BRANCH
        }]
    );
    assert_eq!(t.record().state, TxState::Preparing);
    assert_eq!(t.record().decision, None);
    // Asked once while out.
    assert!(on(&mut t, Event::DeadlinePassed, DEADLINE).is_empty());
}

#[test]
fn a_yes_from_the_back_check_delivers() {
    let mut t = message(2);
    on(&mut t, Event::DeadlinePassed, DEADLINE);
    let cmds = checked(&mut t, Vote::Yes(Bytes::new()), DEADLINE);
    deliver_all(&mut t, cmds, DEADLINE);
}

#[test]
fn a_no_from_the_back_check_drops_it_without_a_call() {
    let mut t = message(2);
    on(&mut t, Event::DeadlinePassed, DEADLINE);
    let cmds = checked(&mut t, Vote::No("not committed".into()), DEADLINE);
    assert!(no_calls(&cmds), "{cmds:?}");
    assert_eq!(t.record().state, TxState::Aborted);
    assert_eq!(t.record().decision, Some(Decision::Abort));
    assert!(
        t.record()
            .branches
            .iter()
            .all(|b| b.state == BranchState::RolledBack)
    );
    // A late Submit is refused: the local transaction did not commit.
    assert!(t.handle(Event::Commit, DEADLINE).is_err());
}

#[test]
fn a_rollback_drops_it_without_a_call() {
    let mut t = message(3);
    let cmds = on(
        &mut t,
        Event::Rollback {
            reason: "local transaction failed".into(),
        },
        NOW,
    );
    assert!(no_calls(&cmds), "{cmds:?}");
    assert_eq!(t.record().state, TxState::Aborted);
}

#[test]
fn an_unanswered_back_check_is_asked_again_then_stuck_undecided() {
    let policy = RetryPolicy {
        max_attempts: Some(3),
        ..RetryPolicy::default()
    };
    let mut t = message(1).with_policy(policy);
    let mut now = DEADLINE;
    on(&mut t, Event::DeadlinePassed, now);
    for round in 1..=3 {
        let cmds = checked(&mut t, Vote::Failed("unreachable".into()), now);
        if round < 3 {
            let delay = cmds
                .iter()
                .find_map(|c| match c {
                    Command::RetryLater { branch: 1, delay } => Some(*delay),
                    _ => None,
                })
                .expect("a retry");
            // Nothing happens before it is due.
            assert!(on(&mut t, Event::DeadlinePassed, now).is_empty());
            now += delay.as_millis() as u64;
            let cmds = on(&mut t, Event::RetryDue { branch: 1 }, now);
            assert_eq!(cmds, vec![Command::PhaseOne { branch: 1 }]);
        } else {
            assert!(cmds.contains(&Command::Finished), "{cmds:?}");
        }
    }
    assert_eq!(t.record().state, TxState::Stuck);
    assert_eq!(t.record().decision, None, "never presumed either way");
    assert!(t.record().branches[0].last_error.contains("unreachable"));
    // The operator checks back again: a fresh budget.
    let cmds = on(&mut t, Event::OperatorRetry, now);
    assert!(cmds.contains(&Command::PhaseOne { branch: 1 }), "{cmds:?}");
    let cmds = checked(&mut t, Vote::Yes(Bytes::new()), now);
    deliver_all(&mut t, cmds, now);
}

fn stuck(n: u32) -> Txn {
    let policy = RetryPolicy {
        max_attempts: Some(1),
        ..RetryPolicy::default()
    };
    let mut t = message(n).with_policy(policy);
    on(&mut t, Event::DeadlinePassed, DEADLINE);
    checked(&mut t, Vote::Failed("down".into()), DEADLINE);
    assert_eq!(t.record().state, TxState::Stuck);
    t
}

fn resolution() -> Resolution {
    Resolution {
        by: "ops".into(),
        reason: "checked the orders table".into(),
        at_ms: DEADLINE,
    }
}

#[test]
fn an_operator_settles_the_local_transaction_and_the_deliveries_follow() {
    let mut t = stuck(2);
    // A delivery cannot be settled while the message is undecided.
    assert!(
        t.handle(
            Event::OperatorResolve {
                branch: 2,
                commit: true,
                resolution: resolution()
            },
            DEADLINE
        )
        .is_err()
    );
    let cmds = on(
        &mut t,
        Event::OperatorResolve {
            branch: LOCAL_BRANCH,
            commit: true,
            resolution: resolution(),
        },
        DEADLINE,
    );
    deliver_all(&mut t, cmds, DEADLINE);
    assert!(t.record().branches[0].resolution.is_some());

    let mut t = stuck(1);
    let cmds = on(
        &mut t,
        Event::OperatorResolve {
            branch: LOCAL_BRANCH,
            commit: false,
            resolution: resolution(),
        },
        DEADLINE,
    );
    assert_eq!(cmds, vec![Command::ForceDecision], "forced before told");
    let cmds = on(&mut t, Event::DecisionDurable, DEADLINE);
    assert!(no_calls(&cmds), "{cmds:?}");
    assert_eq!(t.record().state, TxState::Aborted);
}

#[test]
fn a_submit_wins_over_a_check_in_flight_or_scheduled() {
    let mut t = message(1);
    on(&mut t, Event::DeadlinePassed, DEADLINE);
    let cmds = on(&mut t, Event::Commit, DEADLINE);
    // The check's late answer is absorbed, whatever it says.
    assert!(checked(&mut t, Vote::No("late".into()), DEADLINE).is_empty());
    deliver_all(&mut t, cmds, DEADLINE);

    let mut t = message(1);
    on(&mut t, Event::DeadlinePassed, DEADLINE);
    checked(&mut t, Vote::Failed("timeout".into()), DEADLINE);
    let cmds = on(&mut t, Event::Commit, DEADLINE);
    assert!(on(&mut t, Event::RetryDue { branch: 1 }, DEADLINE + 60_000).is_empty());
    deliver_all(&mut t, cmds, DEADLINE);
}

#[test]
fn a_failed_delivery_is_retried_never_dropped() {
    let mut t = message(1);
    on(&mut t, Event::Commit, NOW);
    let cmds = on(&mut t, Event::DecisionDurable, NOW);
    assert_eq!(deliveries(&cmds), vec![2]);
    let cmds = on(
        &mut t,
        Event::PhaseTwo {
            branch: 2,
            result: Err("down".into()),
        },
        NOW,
    );
    assert!(
        cmds.iter()
            .any(|c| matches!(c, Command::RetryLater { branch: 2, .. })),
        "{cmds:?}"
    );
    let cmds = on(&mut t, Event::RetryDue { branch: 2 }, NOW + 10_000);
    assert_eq!(deliveries(&cmds), vec![2]);
    assert_eq!(t.record().state, TxState::Committing);
}

#[test]
fn recovery_checks_back_at_the_deadline_never_presumes_abort() {
    let t = message(1);
    let (r, cmds) = Txn::recover(t.record().clone(), NOW + 5);
    assert!(cmds.is_empty(), "{cmds:?}");
    assert_eq!(r.record().state, TxState::Preparing);
    let (_, cmds) = Txn::recover(t.record().clone(), DEADLINE + 1);
    assert_eq!(cmds, vec![Command::PhaseOne { branch: 1 }]);
    // A decided one delivers again (the barrier absorbs repeats).
    let mut d = message(2);
    on(&mut d, Event::Commit, NOW);
    on(&mut d, Event::DecisionDurable, NOW);
    let (_, cmds) = Txn::recover(d.record().clone(), NOW + 1);
    assert_eq!(deliveries(&cmds), vec![2, 3]);
}

#[test]
fn branches_and_names() {
    let t = message(2);
    let rec = t.record();
    assert_eq!(rec.mode, Mode::Msg);
    assert_eq!(rec.branches[0].state, BranchState::Registered);
    assert_eq!(rec.branches[1].state.name(Mode::Msg), "READY");
    assert_eq!(Mode::Msg.phase_one_verb(), "check");
    assert_eq!(Mode::Msg.phase_two_verb(true), "deliver");
}

#[test]
fn an_operator_retry_checks_back_now_not_at_the_next_backoff() {
    let mut t = message(1);
    on(&mut t, Event::DeadlinePassed, DEADLINE);
    let cmds = checked(&mut t, Vote::Failed("timeout".into()), DEADLINE);
    assert!(
        cmds.iter()
            .any(|c| matches!(c, Command::RetryLater { branch: 1, .. }))
    );
    let cmds = on(&mut t, Event::OperatorRetry, DEADLINE + 1);
    assert!(cmds.contains(&Command::PhaseOne { branch: 1 }), "{cmds:?}");
    // The scheduled check's timer finds nothing to do.
    assert!(on(&mut t, Event::RetryDue { branch: 1 }, DEADLINE + 60_000).is_empty());
    let cmds = checked(&mut t, Vote::Yes(Bytes::new()), DEADLINE + 2);
    deliver_all(&mut t, cmds, DEADLINE + 2);
}

#[test]
fn an_operator_retry_within_the_deadline_is_refused_not_an_early_check() {
    let mut t = message(1);
    assert!(t.handle(Event::OperatorRetry, NOW + 1).is_err());
    assert_eq!(t.record().state, TxState::Preparing);
}

// A message that waited longer than the retry policy's window for its
// Submit still gets its checks retried: the budget starts at the first.
#[test]
fn the_checks_budget_starts_at_the_first_check_not_at_the_prepare() {
    let policy = RetryPolicy {
        max_duration: Some(std::time::Duration::from_secs(2)),
        ..RetryPolicy::default()
    };
    let mut t = message(1).with_policy(policy);
    let late = DEADLINE + 3_600_000;
    on(&mut t, Event::DeadlinePassed, late);
    let cmds = checked(&mut t, Vote::Failed("lock timeout".into()), late);
    assert!(
        cmds.iter()
            .any(|c| matches!(c, Command::RetryLater { branch: 1, .. })),
        "{cmds:?}"
    );
    assert_eq!(t.record().state, TxState::Preparing);
}

// An operator's abort of a message whose check has not given up is
// refused (before the deadline and while the check is out): its local
// transaction may still commit. The business service's own rollback
// drops it; so does an operator's abort once it is STUCK.
#[test]
fn an_operator_aborts_a_message_only_once_its_check_gave_up() {
    let abort = || Event::OperatorAbort {
        reason: "ops".into(),
    };
    let mut t = message(1);
    let refused = t
        .handle(abort(), NOW + 1)
        .expect_err("refused before the deadline");
    assert!(refused.to_string().contains("back-check"), "{refused}");
    assert_eq!(t.record().state, TxState::Preparing);
    on(&mut t, Event::DeadlinePassed, DEADLINE);
    assert!(
        t.handle(abort(), DEADLINE).is_err(),
        "refused while checked back"
    );
    assert_eq!(t.record().decision, None);

    let mut t = stuck(1);
    on(&mut t, abort(), DEADLINE);
    assert_eq!(t.record().decision, Some(Decision::Abort));

    let mut t = message(1);
    on(
        &mut t,
        Event::Rollback {
            reason: "the local transaction failed".into(),
        },
        NOW + 1,
    );
    assert_eq!(t.record().decision, Some(Decision::Abort));
}

// Past its deadline, with its check still being asked, an operator may
// settle the message's local transaction from the business data (no need
// to wait for STUCK); before the deadline, not.
#[test]
fn an_operator_settles_the_local_transaction_once_past_the_deadline() {
    let resolve = |commit| Event::OperatorResolve {
        branch: LOCAL_BRANCH,
        commit,
        resolution: resolution(),
    };
    let mut t = message(1);
    assert!(
        t.handle(resolve(false), NOW + 1).is_err(),
        "before the deadline"
    );
    on(&mut t, Event::DeadlinePassed, DEADLINE);
    checked(&mut t, Vote::Failed("down".into()), DEADLINE);
    assert_eq!(t.record().state, TxState::Preparing, "still asked");
    on(&mut t, resolve(false), DEADLINE + 1);
    assert_eq!(t.record().decision, Some(Decision::Abort));
    let mut t = message(2);
    on(&mut t, Event::DeadlinePassed, DEADLINE);
    let cmds = on(&mut t, resolve(true), DEADLINE + 1);
    assert_eq!(t.record().decision, Some(Decision::Commit), "{cmds:?}");
}

//! Engine rules, one per test, driven with plain events (no I/O).

use super::*;
use crate::RetryPolicy;
use crate::model::BranchState;

use bytes::Bytes;

const NOW: u64 = 1_000;
const DEADLINE: u64 = 61_000;

fn branch(n: u32) -> NewBranch {
    NewBranch {
        endpoint: format!("http://127.0.0.1:{}", 9000 + n),
        resource: "r".into(),
        payload: Bytes::from_static(b"p"),
        mode: None,
        after: Vec::new(),
    }
}

fn one_shot(mode: Mode, n: u32) -> (Txn, Vec<Command>) {
    Txn::submit(
        Gtid::now_v7(),
        mode,
        NOW,
        DEADLINE,
        (1..=n).map(branch).collect(),
    )
}

fn yes(t: &mut Txn, b: BranchId) -> Vec<Command> {
    t.handle(
        Event::PhaseOne {
            branch: b,
            vote: Vote::Yes(Bytes::new()),
        },
        NOW,
    )
    .expect("phase one")
}

fn phase_two_calls(cmds: &[Command]) -> Vec<(BranchId, bool)> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::PhaseTwo { branch, commit, .. } => Some((*branch, *commit)),
            _ => None,
        })
        .collect()
}

// Rule 3 + rule 2: all yes → commit decided and forced, and no commit call is
// emitted until the force is reported durable.
#[test]
fn all_yes_forces_before_any_commit_call() {
    let (mut t, cmds) = one_shot(Mode::TwoPhase, 2);
    assert_eq!(
        cmds,
        vec![
            Command::Persist,
            Command::PhaseOne { branch: 1 },
            Command::PhaseOne { branch: 2 }
        ]
    );
    // A yes alone is not written: the decision's write carries it.
    assert_eq!(yes(&mut t, 1), vec![]);
    let cmds = yes(&mut t, 2);
    assert_eq!(cmds, vec![Command::ForceDecision]);
    assert_eq!(t.record().state, TxState::Committing);
    let cmds = t.handle(Event::DecisionDurable, NOW).expect("durable");
    assert_eq!(phase_two_calls(&cmds), vec![(1, true), (2, true)]);
}

// Rule 3: one no → abort, and never a commit; rollback goes to the
// prepared branches and to the branch that said no too: a no does not
// prove that nothing is held (finding 5 of issue 22: a participant
// answers no to a repeated prepare whose first run is still held).
#[test]
fn a_no_vote_aborts_and_rolls_back_every_branch_that_may_hold_work() {
    let (mut t, _) = one_shot(Mode::TwoPhase, 3);
    yes(&mut t, 1);
    let cmds = t
        .handle(
            Event::PhaseOne {
                branch: 2,
                vote: Vote::No("broke".into()),
            },
            NOW,
        )
        .expect("no");
    assert_eq!(t.record().state, TxState::Aborting);
    assert!(t.record().reason.contains("broke"));
    // Branch 3 is still in phase 1: its rollback waits for its reply.
    assert_eq!(phase_two_calls(&cmds), vec![(1, false), (2, false)]);
    let cmds = yes(&mut t, 3);
    assert_eq!(phase_two_calls(&cmds), vec![(3, false)]);
}

// In TCC a failed try may have reserved part of the resource: cancel it too.
#[test]
fn tcc_cancels_the_branch_whose_try_failed() {
    let (mut t, _) = one_shot(Mode::Tcc, 2);
    yes(&mut t, 1);
    let cmds = t
        .handle(
            Event::PhaseOne {
                branch: 2,
                vote: Vote::No("no stock".into()),
            },
            NOW,
        )
        .expect("no");
    assert_eq!(phase_two_calls(&cmds), vec![(1, false), (2, false)]);
}

// A phase-1 failure (timeout, unreachable) may have run: roll it back.
#[test]
fn a_failed_prepare_is_rolled_back() {
    let (mut t, _) = one_shot(Mode::TwoPhase, 1);
    let cmds = t
        .handle(
            Event::PhaseOne {
                branch: 1,
                vote: Vote::Failed("no reply within 5 ms".into()),
            },
            NOW,
        )
        .expect("failed");
    assert_eq!(phase_two_calls(&cmds), vec![(1, false)]);
}

// Rule 4: a failed phase-2 call is retried; attempts and the error are kept;
// the transaction finishes only when every branch acknowledged.
#[test]
fn phase_two_failures_are_retried_until_acknowledged() {
    let (mut t, _) = one_shot(Mode::TwoPhase, 1);
    yes(&mut t, 1);
    t.handle(Event::DecisionDurable, NOW).expect("durable");
    let cmds = t
        .handle(
            Event::PhaseTwo {
                branch: 1,
                result: Err("down".into()),
            },
            NOW,
        )
        .expect("fail");
    let [Command::Persist, Command::RetryLater { branch: 1, delay }] = cmds.as_slice() else {
        panic!("expected a persisted retry: {cmds:?}");
    };
    // First retry: within [½, 1] of the initial interval.
    let initial = RetryPolicy::default().initial;
    assert!(*delay >= initial / 2 && *delay <= initial, "{delay:?}");
    let b = &t.record().branches[0];
    assert_eq!(b.last_error, "down");
    assert_eq!(b.next_attempt_ms, NOW + delay.as_millis() as u64);
    let cmds = t.handle(Event::RetryDue { branch: 1 }, NOW).expect("retry");
    assert_eq!(
        cmds,
        vec![Command::PhaseTwo {
            branch: 1,
            commit: true,
            attempt: 2
        }]
    );
    let cmds = t
        .handle(
            Event::PhaseTwo {
                branch: 1,
                result: Ok(()),
            },
            NOW,
        )
        .expect("ack");
    assert_eq!(cmds, vec![Command::Persist, Command::Finished]);
    assert_eq!(t.record().state, TxState::Committed);
    assert_eq!(t.record().branches[0].attempts, 2);
    assert_eq!(
        t.record().branches[0].last_error,
        "",
        "an acknowledged branch shows no error"
    );
}

// Rule 2: a decision never changes — rollback after commit is refused and
// changes nothing; commit after rollback likewise.
#[test]
fn a_decision_never_changes() {
    let (mut t, _) = Txn::begin(Gtid::now_v7(), Mode::TwoPhase, NOW, DEADLINE);
    t.handle(Event::Commit, NOW).expect("commit");
    t.handle(Event::DecisionDurable, NOW).expect("durable");
    let before = t.record().clone();
    let err = t
        .handle(
            Event::Rollback {
                reason: String::new(),
            },
            NOW,
        )
        .unwrap_err();
    assert!(err.to_string().contains("never reversed"), "{err}");
    assert_eq!(t.record(), &before);

    let (mut t, _) = Txn::begin(Gtid::now_v7(), Mode::TwoPhase, NOW, DEADLINE);
    t.handle(
        Event::Rollback {
            reason: "changed my mind".into(),
        },
        NOW,
    )
    .expect("rollback");
    let before = t.record().clone();
    assert!(matches!(
        t.handle(Event::Commit, NOW),
        Err(EngineError::WrongState { .. })
    ));
    assert_eq!(t.record(), &before);
    // A repeated rollback is fine and changes nothing.
    assert_eq!(
        t.handle(
            Event::Rollback {
                reason: String::new()
            },
            NOW
        ),
        Ok(vec![])
    );
}

// Commit is refused while a branch's prepare has not answered.
#[test]
fn commit_waits_for_phase_one_replies() {
    let (mut t, _) = Txn::begin(Gtid::now_v7(), Mode::TwoPhase, NOW, DEADLINE);
    t.handle(Event::Enlist(branch(1)), NOW).expect("enlist");
    assert!(matches!(
        t.handle(Event::Commit, NOW),
        Err(EngineError::BranchInFlight { branch: 1, .. })
    ));
    yes(&mut t, 1);
    assert_eq!(
        t.handle(Event::Commit, NOW),
        Ok(vec![Command::ForceDecision])
    );
}

// An undecided transaction past its deadline aborts; a decided one ignores it.
#[test]
fn deadline_aborts_only_undecided_transactions() {
    let (mut t, _) = Txn::begin(Gtid::now_v7(), Mode::TwoPhase, NOW, DEADLINE);
    t.handle(Event::Enlist(branch(1)), NOW).expect("enlist");
    yes(&mut t, 1);
    let cmds = t.handle(Event::DeadlinePassed, DEADLINE).expect("deadline");
    assert_eq!(t.record().state, TxState::Aborting);
    assert_eq!(phase_two_calls(&cmds), vec![(1, false)]);

    let (mut t, _) = one_shot(Mode::TwoPhase, 1);
    yes(&mut t, 1);
    assert_eq!(t.handle(Event::DeadlinePassed, DEADLINE), Ok(vec![]));
    assert_eq!(t.record().state, TxState::Committing);
    // Commit after the deadline of an interactive transaction aborts it.
    let (mut t, _) = Txn::begin(Gtid::now_v7(), Mode::TwoPhase, NOW, DEADLINE);
    t.handle(Event::Commit, DEADLINE).expect("late commit");
    // No branches: nothing to roll back, so the abort is finished at once.
    assert_eq!(t.record().state, TxState::Aborted);
    assert!(t.record().reason.contains("deadline"));
}

// Rule 5: after a restart, undecided → abort (rollback to every branch that
// may hold work); decided commit → commit again to unacknowledged branches.
#[test]
fn recovery_aborts_undecided_and_finishes_decided() {
    let (mut t, _) = one_shot(Mode::TwoPhase, 2);
    yes(&mut t, 1);
    let (r, cmds) = Txn::recover(t.record().clone(), NOW);
    assert_eq!(r.record().state, TxState::Aborting);
    assert_eq!(phase_two_calls(&cmds), vec![(1, false), (2, false)]);

    let (mut t, _) = one_shot(Mode::TwoPhase, 2);
    yes(&mut t, 1);
    yes(&mut t, 2);
    t.handle(Event::DecisionDurable, NOW).expect("durable");
    t.handle(
        Event::PhaseTwo {
            branch: 1,
            result: Ok(()),
        },
        NOW,
    )
    .expect("ack");
    let (r, cmds) = Txn::recover(t.record().clone(), NOW);
    assert_eq!(r.record().state, TxState::Committing);
    assert_eq!(phase_two_calls(&cmds), vec![(2, true)]);
}

// Late and repeated participant replies are absorbed.
#[test]
fn stray_replies_change_nothing() {
    let (mut t, _) = one_shot(Mode::TwoPhase, 1);
    yes(&mut t, 1);
    let before = t.record().clone();
    assert_eq!(yes(&mut t, 1), vec![]);
    assert_eq!(
        t.handle(
            Event::PhaseTwo {
                branch: 9,
                result: Ok(())
            },
            NOW
        ),
        Ok(vec![])
    );
    assert_eq!(t.record(), &before);
}

// An enlisted branch is forced before its phase-1 call, in both modes: a
// coordinator crash after the call still leaves a record to recover from.
#[test]
fn enlist_forces_the_branch_before_calling_it() {
    for mode in [Mode::TwoPhase, Mode::Tcc] {
        let (mut t, _) = Txn::begin(Gtid::now_v7(), mode, NOW, DEADLINE);
        let cmds = t.handle(Event::Enlist(branch(1)), NOW).expect("enlist");
        assert_eq!(cmds, vec![Command::Force, Command::PhaseOne { branch: 1 }]);
    }
}

// TCC: a rollback cancels every enlisted branch, those that tried yes and
// the one whose try is still out (once that try returns, so the two calls
// do not race), and confirms none.
#[test]
fn tcc_rollback_cancels_every_enlisted_branch() {
    let (mut t, _) = Txn::begin(Gtid::now_v7(), Mode::Tcc, NOW, DEADLINE);
    for n in 1..=3 {
        t.handle(Event::Enlist(branch(n)), NOW).expect("enlist");
    }
    yes(&mut t, 1);
    t.handle(
        Event::PhaseOne {
            branch: 2,
            vote: Vote::No("sold out".into()),
        },
        NOW,
    )
    .expect("no");
    // The no aborted the transaction: cancel to 1 and 2, none yet to 3.
    assert_eq!(t.record().state, TxState::Aborting);
    let cmds = t
        .handle(
            Event::PhaseOne {
                branch: 3,
                vote: Vote::Failed("no reply within 500 ms".into()),
            },
            NOW,
        )
        .expect("late try");
    assert_eq!(phase_two_calls(&cmds), vec![(3, false)]);
    for b in 1..=3 {
        t.handle(
            Event::PhaseTwo {
                branch: b,
                result: Ok(()),
            },
            NOW,
        )
        .expect("cancelled");
    }
    assert_eq!(t.record().state, TxState::Aborted);
    assert!(
        t.record()
            .branches
            .iter()
            .all(|b| b.state == BranchState::RolledBack)
    );
}

fn fail(t: &mut Txn, b: BranchId, now: u64) -> Vec<Command> {
    t.handle(
        Event::PhaseTwo {
            branch: b,
            result: Err(format!("down at {now}")),
        },
        now,
    )
    .expect("phase two")
}

/// A committed two-branch transaction whose branch 2 acknowledged, under a
/// policy giving up after `max_attempts` failures; branch 1 not yet called
/// back.
fn committing_with_one_ack(mode: Mode, max_attempts: u32) -> Txn {
    let (t, _) = one_shot(mode, 2);
    let mut t = t.with_policy(RetryPolicy {
        max_attempts: Some(max_attempts),
        ..RetryPolicy::default()
    });
    yes(&mut t, 1);
    yes(&mut t, 2);
    t.handle(Event::DecisionDurable, NOW).expect("durable");
    t.handle(
        Event::PhaseTwo {
            branch: 2,
            result: Ok(()),
        },
        NOW,
    )
    .expect("ack");
    t
}

// Retry policy: a branch that fails `max_attempts` times in a row is given
// up on; once nothing else is in flight the transaction is STUCK with its
// decision kept, and is forgotten by the runtime (Finished) until an
// operator retries it.
#[test]
fn exhausted_retries_leave_the_transaction_stuck_with_its_decision() {
    // Branch 2 acknowledged; branch 1 fails twice.
    let mut t = committing_with_one_ack(Mode::TwoPhase, 2);
    assert!(matches!(
        fail(&mut t, 1, NOW)[..],
        [Command::Persist, Command::RetryLater { .. }]
    ));
    t.handle(Event::RetryDue { branch: 1 }, NOW).expect("retry");
    let cmds = fail(&mut t, 1, NOW + 1);
    assert_eq!(cmds, vec![Command::Persist, Command::Finished]);
    let rec = t.record();
    assert_eq!(rec.state, TxState::Stuck);
    assert_eq!(rec.decision, Some(Decision::Commit));
    assert_eq!(rec.branches[0].last_error, format!("down at {}", NOW + 1));
    assert_eq!(rec.branches[0].next_attempt_ms, 0);
    // STUCK is not a decision change: rollback is still refused.
    assert!(
        t.handle(
            Event::Rollback {
                reason: String::new()
            },
            NOW
        )
        .is_err()
    );
    // After a restart STUCK stays put: no calls until an operator asks.
    let (t2, cmds) = Txn::recover(t.record().clone(), NOW + 2);
    assert!(cmds.is_empty());
    assert_eq!(t2.record().state, TxState::Stuck);
}

// Operator retry: a STUCK transaction goes back to its decision's phase 2
// with a fresh budget, calling only the branches not yet acknowledged.
#[test]
fn operator_retry_drives_a_stuck_transaction_to_its_decision() {
    let mut t = committing_with_one_ack(Mode::Tcc, 1);
    fail(&mut t, 1, NOW);
    assert_eq!(t.record().state, TxState::Stuck);

    let (t, _) = Txn::recover(t.record().clone(), NOW + 10);
    let mut t = t.with_policy(RetryPolicy {
        max_attempts: Some(1),
        ..RetryPolicy::default()
    });
    let cmds = t.handle(Event::OperatorRetry, NOW + 10).expect("retry");
    assert_eq!(t.record().state, TxState::Committing);
    assert_eq!(phase_two_calls(&cmds), vec![(1, true)]);
    t.handle(
        Event::PhaseTwo {
            branch: 1,
            result: Ok(()),
        },
        NOW + 11,
    )
    .expect("ack");
    assert_eq!(t.record().state, TxState::Committed);
}

// Operator retry of a transaction still retrying runs the waiting retries
// now; of an undecided one it aborts only past the deadline; of a finished
// one it does nothing.
#[test]
fn operator_retry_on_other_states() {
    let (mut t, _) = one_shot(Mode::TwoPhase, 1);
    yes(&mut t, 1);
    t.handle(Event::DecisionDurable, NOW).expect("durable");
    fail(&mut t, 1, NOW);
    let cmds = t.handle(Event::OperatorRetry, NOW).expect("retry now");
    assert_eq!(phase_two_calls(&cmds), vec![(1, true)]);
    // The timer that was waiting finds nothing to do.
    assert_eq!(t.handle(Event::RetryDue { branch: 1 }, NOW), Ok(vec![]));

    let (mut t, _) = Txn::begin(Gtid::now_v7(), Mode::Tcc, NOW, DEADLINE);
    assert!(matches!(
        t.handle(Event::OperatorRetry, NOW),
        Err(EngineError::WrongState { .. })
    ));
    t.handle(Event::OperatorRetry, DEADLINE)
        .expect("past deadline");
    assert_eq!(t.record().state, TxState::Aborted);
    assert_eq!(t.handle(Event::OperatorRetry, DEADLINE), Ok(vec![]));
}

// Operator abort: undecided → abort with the operator's reason; a commit
// decision is refused with a message saying it is never reversed.
#[test]
fn operator_abort_only_undecided() {
    let (mut t, _) = one_shot(Mode::TwoPhase, 1);
    let cmds = t
        .handle(
            Event::OperatorAbort {
                reason: "hung participant".into(),
            },
            NOW,
        )
        .expect("abort");
    assert_eq!(t.record().state, TxState::Aborting);
    assert_eq!(t.record().decision, Some(Decision::Abort));
    assert!(t.record().reason.contains("operator: hung participant"));
    assert!(cmds.contains(&Command::Persist));

    let (mut t, _) = one_shot(Mode::TwoPhase, 1);
    yes(&mut t, 1);
    t.handle(Event::DecisionDurable, NOW).expect("durable");
    let err = t
        .handle(
            Event::OperatorAbort {
                reason: String::new(),
            },
            NOW,
        )
        .expect_err("commit decided");
    assert!(err.to_string().contains("never reversed"), "{err}");
}

// The write budget of a one-shot commit: the record before phase 1, the
// forced decision, the final state; votes and acks ride along with those.
#[test]
fn a_one_shot_commit_writes_the_record_three_times() {
    let writes = |cmds: &[Command]| {
        cmds.iter()
            .filter(|c| {
                matches!(
                    c,
                    Command::Persist | Command::Force | Command::ForceDecision
                )
            })
            .count()
    };
    let (mut t, cmds) = one_shot(Mode::Tcc, 3);
    let mut total = writes(&cmds);
    for b in 1..=3 {
        total += writes(&yes(&mut t, b));
    }
    total += writes(&t.handle(Event::DecisionDurable, NOW).expect("durable"));
    for b in 1..=3 {
        let cmds = t
            .handle(
                Event::PhaseTwo {
                    branch: b,
                    result: Ok(()),
                },
                NOW,
            )
            .expect("ack");
        total += writes(&cmds);
    }
    assert_eq!(t.record().state, TxState::Committed);
    assert_eq!(total, 3);
}

//! What will never succeed is not retried, a call that never ran needs no
//! rollback, and an operator can settle a STUCK branch by hand.

use super::*;
use crate::model::BranchState;
use crate::model::Resolution;

use bytes::Bytes;

const NOW: u64 = 1_000;
const DEADLINE: u64 = 61_000;

fn one_shot(mode: Mode, n: u32) -> Txn {
    let branches = (1..=n)
        .map(|i| NewBranch {
            endpoint: format!("http://127.0.0.1:{}", 9000 + i),
            resource: "r".into(),
            payload: Bytes::from_static(b"p"),
            mode: None,
            after: Vec::new(),
        })
        .collect();
    Txn::submit(Gtid::now_v7(), mode, NOW, DEADLINE, branches).0
}

fn vote(t: &mut Txn, branch: BranchId, vote: Vote) -> Vec<Command> {
    t.handle(Event::PhaseOne { branch, vote }, NOW)
        .expect("phase one")
}

fn phase_two(cmds: &[Command]) -> Vec<(BranchId, bool)> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::PhaseTwo { branch, commit, .. } => Some((*branch, *commit)),
            _ => None,
        })
        .collect()
}

/// Committing, both branches' commit calls out.
fn committing() -> Txn {
    let mut t = one_shot(Mode::Tcc, 2);
    vote(&mut t, 1, Vote::Yes(Bytes::new()));
    vote(&mut t, 2, Vote::Yes(Bytes::new()));
    t.handle(Event::DecisionDurable, NOW).expect("durable");
    t
}

fn refused(t: &mut Txn, branch: BranchId) -> Vec<Command> {
    t.handle(
        Event::PhaseTwoRefused {
            branch,
            error: "Unimplemented: no Confirm here".into(),
        },
        NOW,
    )
    .expect("refused")
}

fn ack(t: &mut Txn, branch: BranchId) -> Vec<Command> {
    t.handle(
        Event::PhaseTwo {
            branch,
            result: Ok(()),
        },
        NOW,
    )
    .expect("ack")
}

fn resolve(t: &mut Txn, branch: BranchId, commit: bool) -> Result<Vec<Command>, EngineError> {
    t.handle(
        Event::OperatorResolve {
            branch,
            commit,
            resolution: Resolution {
                by: "ops".into(),
                reason: "INC-1".into(),
                at_ms: NOW,
            },
        },
        NOW,
    )
}

#[test]
fn a_permanent_answer_is_not_retried_and_ends_stuck_with_the_reason() {
    let mut t = committing();
    let cmds = refused(&mut t, 2);
    assert!(
        !cmds.iter().any(|c| matches!(c, Command::RetryLater { .. })),
        "{cmds:?}"
    );
    assert_eq!(t.record().state, TxState::Committing, "branch 1 still out");
    let cmds = ack(&mut t, 1);
    assert!(cmds.contains(&Command::Finished), "{cmds:?}");
    assert_eq!(t.record().state, TxState::Stuck);
    assert!(
        t.record().branches[1]
            .last_error
            .contains("no Confirm here"),
        "the operator sees why"
    );
    assert_eq!(t.record().branches[0].last_error, "");
}

#[test]
fn a_phase_one_that_never_ran_needs_no_rollback() {
    let mut t = one_shot(Mode::Tcc, 2);
    vote(&mut t, 1, Vote::Yes(Bytes::new()));
    let cmds = vote(&mut t, 2, Vote::NotRun("connection refused".into()));
    assert_eq!(phase_two(&cmds), vec![(1, false)], "only the tried branch");
    assert_eq!(t.record().branches[1].state, BranchState::RolledBack);
    let abort = t.record().abort.clone().expect("abort");
    assert_eq!((abort.cause, abort.branch), (AbortCause::PhaseOneFailed, 2));
    ack(&mut t, 1);
    assert_eq!(t.record().state, TxState::Aborted);
}

#[test]
fn an_operator_settles_a_stuck_branch_and_the_transaction_finishes() {
    let mut t = committing();
    refused(&mut t, 2);
    ack(&mut t, 1);
    let cmds = resolve(&mut t, 2, true).expect("resolve");
    assert_eq!(cmds, vec![Command::Force, Command::Finished]);
    assert_eq!(t.record().state, TxState::Committed);
    let b = &t.record().branches[1];
    assert_eq!(b.state, BranchState::Committed);
    assert_eq!(b.resolution.as_ref().map(|r| r.by.as_str()), Some("ops"));
    assert_eq!(b.last_error, "");
}

#[test]
fn settling_by_hand_is_refused_unless_stuck_against_the_decision_or_twice() {
    let mut t = committing();
    let err = resolve(&mut t, 1, true).expect_err("not stuck");
    assert!(err.to_string().contains("STUCK"), "{err}");
    refused(&mut t, 2);
    ack(&mut t, 1);
    let before = t.record().clone();
    let err = resolve(&mut t, 2, false).expect_err("against the decision");
    assert!(err.to_string().contains("never reversed"), "{err}");
    let err = resolve(&mut t, 1, true).expect_err("branch 1 is done");
    assert!(err.to_string().contains("needs no phase 2"), "{err}");
    let err = resolve(&mut t, 9, true).expect_err("no branch 9");
    assert!(err.to_string().contains("no branch 9"), "{err}");
    assert_eq!(t.record(), &before, "refusals change nothing");
}

#[test]
fn a_stuck_abort_is_settled_as_rolled_back_after_a_restart() {
    let mut t = one_shot(Mode::TwoPhase, 1);
    vote(&mut t, 1, Vote::Failed("timeout".into()));
    refused(&mut t, 1);
    assert_eq!(t.record().state, TxState::Stuck);
    // Read back after a restart: the parked set is gone, the record stays.
    let (mut t, cmds) = Txn::recover(t.record().clone(), NOW);
    assert!(cmds.is_empty());
    resolve(&mut t, 1, false).expect("resolve");
    assert_eq!(t.record().state, TxState::Aborted);
    assert_eq!(t.record().branches[0].state, BranchState::RolledBack);
}

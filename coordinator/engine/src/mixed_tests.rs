//! One transaction, 2PC and TCC branches: each branch keeps its own
//! protocol's rules, the transaction one decision.

use super::*;
use crate::model::BranchState;

use bytes::Bytes;

const NOW: u64 = 1_000;
const DEADLINE: u64 = 61_000;

fn branch(n: u32, mode: Option<Mode>) -> NewBranch {
    NewBranch {
        endpoint: format!("http://127.0.0.1:{}", 9000 + n),
        resource: format!("r{n}"),
        payload: Bytes::from_static(b"p"),
        mode,
        after: Vec::new(),
    }
}

/// A TCC transaction with branch 1 TCC (the default), branch 2 2PC.
fn mixed() -> Txn {
    let branches = vec![branch(1, None), branch(2, Some(Mode::TwoPhase))];
    Txn::submit(Gtid::now_v7(), Mode::Tcc, NOW, DEADLINE, branches).0
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

#[test]
fn each_branch_records_its_own_mode() {
    let t = mixed();
    let modes: Vec<Mode> = t.record().branches.iter().map(|b| b.mode).collect();
    assert_eq!(modes, vec![Mode::Tcc, Mode::TwoPhase]);
    assert_eq!(t.record().mode, Mode::Tcc);
}

// A 2PC no-voter gets its rollback (a no does not prove that nothing is
// held, no_vote_tests.rs); the TCC branch that tried gets its cancel.
#[test]
fn a_two_phase_no_cancels_the_tcc_branch_and_rolls_itself_back() {
    let mut t = mixed();
    vote(&mut t, 1, Vote::Yes(Bytes::new()));
    let cmds = vote(&mut t, 2, Vote::No("declined".into()));
    assert_eq!(phase_two(&cmds), vec![(1, false), (2, false)]);
    assert_eq!(t.record().state, TxState::Aborting);
}

// A TCC branch whose try was refused still gets its cancel (it may have
// reserved part of the resource), in a 2PC transaction too.
#[test]
fn a_refused_tcc_try_is_cancelled_beside_a_prepared_two_phase_branch() {
    let branches = vec![branch(1, None), branch(2, Some(Mode::Tcc))];
    let mut t = Txn::submit(Gtid::now_v7(), Mode::TwoPhase, NOW, DEADLINE, branches).0;
    vote(&mut t, 1, Vote::Yes(Bytes::new()));
    let cmds = vote(&mut t, 2, Vote::No("out of stock".into()));
    let mut calls = phase_two(&cmds);
    calls.sort();
    assert_eq!(calls, vec![(1, false), (2, false)]);
}

// A failed 2PC prepare is rolled back, like in a 2PC transaction.
#[test]
fn a_failed_two_phase_prepare_is_rolled_back_in_a_tcc_transaction() {
    let mut t = mixed();
    let cmds = vote(&mut t, 2, Vote::Failed("timeout".into()));
    assert_eq!(phase_two(&cmds), vec![(2, false)]);
    // The TCC branch's try answers later: it is cancelled then.
    let cmds = vote(&mut t, 1, Vote::Yes(Bytes::new()));
    assert_eq!(phase_two(&cmds), vec![(1, false)]);
}

// All yes: one decision, forced once, then commit to the 2PC branch and
// confirm to the TCC one (the runtime picks the call from the branch's
// mode).
#[test]
fn all_yes_commits_every_branch_after_one_force() {
    let mut t = mixed();
    vote(&mut t, 1, Vote::Yes(Bytes::new()));
    let cmds = vote(&mut t, 2, Vote::Yes(Bytes::new()));
    assert_eq!(cmds, vec![Command::ForceDecision]);
    let cmds = t.handle(Event::DecisionDurable, NOW).expect("durable");
    assert_eq!(phase_two(&cmds), vec![(1, true), (2, true)]);
}

// After a restart the record's per-branch modes drive recovery: an
// undecided mixed transaction cancels its TCC no-voter and rolls back its
// 2PC no-voter and its prepared branch (the runtime picks Cancel or
// Rollback from each branch's recorded mode).
#[test]
fn recovery_keeps_each_branch_mode() {
    let branches = vec![
        branch(1, Some(Mode::Tcc)),
        branch(2, Some(Mode::TwoPhase)),
        branch(3, None),
    ];
    let (mut t, _) = Txn::begin(Gtid::now_v7(), Mode::TwoPhase, NOW, DEADLINE);
    for b in branches {
        t.handle(Event::Enlist(b), NOW).expect("enlist");
    }
    let mut rec = t.record().clone();
    rec.branches[0].state = BranchState::Refused;
    rec.branches[1].state = BranchState::Refused;
    rec.branches[2].state = BranchState::Prepared;
    let (_, cmds) = Txn::recover(rec, NOW);
    let mut calls = phase_two(&cmds);
    calls.sort();
    assert_eq!(calls, vec![(1, false), (2, false), (3, false)]);
}

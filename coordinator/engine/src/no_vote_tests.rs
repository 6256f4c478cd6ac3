//! Finding 5 of issue 22: a 2PC no vote does not prove that nothing is
//! held, so the coordinator rolls back every branch that voted no.

use super::*;
use crate::model::BranchState;

use bytes::Bytes;

const NOW: u64 = 1_000;
const DEADLINE: u64 = 61_000;

fn one_shot(mode: Mode, n: u32) -> Txn {
    let branches = (1..=n)
        .map(|n| NewBranch {
            endpoint: format!("http://127.0.0.1:{}", 9000 + n),
            resource: "r".into(),
            payload: Bytes::from_static(b"p"),
            mode: None,
            after: Vec::new(),
        })
        .collect();
    Txn::submit(Gtid::now_v7(), mode, NOW, DEADLINE, branches).0
}

fn phase_two_calls(cmds: &[Command]) -> Vec<(BranchId, bool)> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::PhaseTwo { branch, commit, .. } => Some((*branch, *commit)),
            _ => None,
        })
        .collect()
}

// The phase_two rule of finding 5, on its own: a 2PC branch that voted no
// is not finished until its rollback is acknowledged, live and after a
// restart (a record whose no was written with its abort, or an undecided
// one read back with the no), and the transaction ends ABORTED only then.
#[test]
fn a_two_phase_no_voter_is_rolled_back_by_the_coordinator_itself() {
    let mut t = one_shot(Mode::TwoPhase, 1);
    let cmds = t
        .handle(
            Event::PhaseOne {
                branch: 1,
                vote: Vote::No("barrier: this branch's try already ran".into()),
            },
            NOW,
        )
        .expect("no");
    assert_eq!(phase_two_calls(&cmds), vec![(1, false)]);
    assert!(!cmds.contains(&Command::Finished), "{cmds:?}");
    assert_eq!(t.record().state, TxState::Aborting);
    let cmds = t
        .handle(
            Event::PhaseTwo {
                branch: 1,
                result: Ok(()),
            },
            NOW,
        )
        .expect("ack");
    assert!(cmds.contains(&Command::Finished), "{cmds:?}");
    assert_eq!(t.record().state, TxState::Aborted);
    assert_eq!(t.record().branches[0].state, BranchState::RolledBack);

    for state in [TxState::Preparing, TxState::Aborting] {
        let mut rec = one_shot(Mode::TwoPhase, 2).record().clone();
        rec.state = state;
        rec.branches[0].state = BranchState::Refused;
        rec.branches[1].state = BranchState::RolledBack;
        if state == TxState::Aborting {
            rec.decision = Some(Decision::Abort);
        }
        let (t, cmds) = Txn::recover(rec, NOW);
        assert_eq!(phase_two_calls(&cmds), vec![(1, false)], "{state:?}");
        assert_eq!(t.record().state, TxState::Aborting, "{state:?}");
    }
}

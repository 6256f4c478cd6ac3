//! Saga: actions one at a time in step order; compensations one at a
//! time, newest first, only of steps that ran or may have run.

use super::*;
use crate::model::BranchState;

use bytes::Bytes;

const NOW: u64 = 1_000;
const DEADLINE: u64 = 61_000;

fn step(n: u32) -> NewBranch {
    NewBranch {
        endpoint: format!("http://127.0.0.1:{}", 9000 + n),
        resource: format!("s{n}"),
        payload: Bytes::from_static(b"p"),
        mode: None,
        after: Vec::new(),
    }
}

fn saga(n: u32) -> (Txn, Vec<Command>) {
    Txn::submit(
        Gtid::now_v7(),
        Mode::Saga,
        NOW,
        DEADLINE,
        (1..=n).map(step).collect(),
    )
}

fn on(t: &mut Txn, event: Event) -> Vec<Command> {
    t.handle(event, NOW).expect("event")
}

fn yes(t: &mut Txn, branch: BranchId) -> Vec<Command> {
    on(
        t,
        Event::PhaseOne {
            branch,
            vote: Vote::Yes(Bytes::new()),
        },
    )
}

fn no(t: &mut Txn, branch: BranchId) -> Vec<Command> {
    on(
        t,
        Event::PhaseOne {
            branch,
            vote: Vote::No("declined".into()),
        },
    )
}

fn acked(t: &mut Txn, branch: BranchId) -> Vec<Command> {
    on(
        t,
        Event::PhaseTwo {
            branch,
            result: Ok(()),
        },
    )
}

fn actions(cmds: &[Command]) -> Vec<BranchId> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::PhaseOne { branch } => Some(*branch),
            _ => None,
        })
        .collect()
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
fn the_start_is_forced_before_the_first_action_alone() {
    let (_, cmds) = saga(3);
    assert_eq!(cmds.first(), Some(&Command::Force));
    assert_eq!(actions(&cmds), vec![1]);
}

#[test]
fn each_action_waits_for_the_one_before_and_all_done_confirms_every_step() {
    let (mut t, _) = saga(3);
    assert_eq!(actions(&yes(&mut t, 1)), vec![2]);
    assert_eq!(actions(&yes(&mut t, 2)), vec![3]);
    let cmds = yes(&mut t, 3);
    assert_eq!(cmds, vec![Command::ForceDecision]);
    let mut confirms = phase_two(&on(&mut t, Event::DecisionDurable));
    confirms.sort();
    assert_eq!(confirms, vec![(1, true), (2, true), (3, true)]);
}

// Step 3 of 4 says no: 3, then 2, then 1 are compensated, one at a time;
// step 4 never ran and is never called.
#[test]
fn a_no_compensates_the_steps_before_newest_first_one_at_a_time() {
    let (mut t, _) = saga(4);
    yes(&mut t, 1);
    yes(&mut t, 2);
    let cmds = no(&mut t, 3);
    assert_eq!(t.record().state, TxState::Aborting);
    assert_eq!(phase_two(&cmds), vec![(3, false)]);
    assert_eq!(
        t.record().branches[3].state,
        BranchState::RolledBack,
        "never started"
    );
    assert_eq!(phase_two(&acked(&mut t, 3)), vec![(2, false)]);
    assert_eq!(phase_two(&acked(&mut t, 2)), vec![(1, false)]);
    let last = acked(&mut t, 1);
    assert!(last.contains(&Command::Finished));
    assert_eq!(t.record().state, TxState::Aborted);
}

// The deadline passes while step 2's action is out: nothing is
// compensated until it answers (it may have run: it is the newest), then
// 2 before 1.
#[test]
fn compensation_waits_for_an_action_still_out() {
    let (mut t, _) = saga(3);
    yes(&mut t, 1);
    let cmds = on(&mut t, Event::DeadlinePassed);
    assert!(phase_two(&cmds).is_empty(), "{cmds:?}");
    let cmds = on(
        &mut t,
        Event::PhaseOne {
            branch: 2,
            vote: Vote::Failed("timed out".into()),
        },
    );
    assert_eq!(phase_two(&cmds), vec![(2, false)]);
    assert_eq!(phase_two(&acked(&mut t, 2)), vec![(1, false)]);
}

// A compensation that will never succeed stops the walk: STUCK, the older
// step untouched; resolving it and retrying goes on.
#[test]
fn a_refused_compensation_leaves_the_saga_stuck_and_a_retry_goes_on() {
    let (mut t, _) = saga(3);
    yes(&mut t, 1);
    yes(&mut t, 2);
    no(&mut t, 3);
    let cmds = on(
        &mut t,
        Event::PhaseTwoRefused {
            branch: 3,
            error: "gone".into(),
        },
    );
    assert!(phase_two(&cmds).is_empty());
    assert_eq!(t.record().state, TxState::Stuck);
    let resolution = crate::model::Resolution {
        by: "ops".into(),
        reason: "by hand".into(),
        at_ms: NOW,
    };
    on(
        &mut t,
        Event::OperatorResolve {
            branch: 3,
            commit: false,
            resolution,
        },
    );
    assert_eq!(t.record().state, TxState::Stuck, "steps 1 and 2 still owed");
    assert_eq!(
        phase_two(&on(&mut t, Event::OperatorRetry)),
        vec![(2, false)]
    );
    assert_eq!(phase_two(&acked(&mut t, 2)), vec![(1, false)]);
}

// Read back after a crash, undecided: which actions went out is not
// known, so every step not compensated gets its compensation, newest
// first.
#[test]
fn after_a_restart_every_step_is_compensated_newest_first() {
    let (mut t, _) = saga(3);
    yes(&mut t, 1);
    let rec = t.record().clone();
    let (mut t, cmds) = Txn::recover(rec, NOW);
    assert_eq!(phase_two(&cmds), vec![(3, false)]);
    assert_eq!(phase_two(&acked(&mut t, 3)), vec![(2, false)]);
    assert_eq!(phase_two(&acked(&mut t, 2)), vec![(1, false)]);
}

#[test]
fn an_interactive_saga_takes_one_step_at_a_time_and_saga_steps_only() {
    let (mut t, _) = Txn::begin(Gtid::now_v7(), Mode::Saga, NOW, DEADLINE);
    on(&mut t, Event::Enlist(step(1)));
    let err = t
        .handle(Event::Enlist(step(2)), NOW)
        .expect_err("one at a time");
    assert!(
        matches!(err, EngineError::BranchInFlight { branch: 1, .. }),
        "{err}"
    );
    yes(&mut t, 1);
    let mut tcc = step(2);
    tcc.mode = Some(Mode::Tcc);
    assert!(
        t.handle(Event::Enlist(tcc), NOW).is_err(),
        "a TCC branch in a saga"
    );
    on(&mut t, Event::Enlist(step(2)));
    yes(&mut t, 2);
    let cmds = on(
        &mut t,
        Event::Rollback {
            reason: String::new(),
        },
    );
    assert_eq!(phase_two(&cmds), vec![(2, false)]);
}

// the retry budget (max_duration) starts at the abort decision and
// is shared by the whole walk: step 3's compensation may use it all up, and
// step 2's compensation is then given up on at its first failure.
#[test]
fn each_compensation_gets_its_own_retry_budget() {
    let policy = RetryPolicy {
        max_attempts: None,
        max_duration: Some(std::time::Duration::from_secs(10)),
        ..RetryPolicy::default()
    };
    let (t, _) = saga(3);
    let mut t = t.with_policy(policy);
    yes(&mut t, 1);
    yes(&mut t, 2);
    t.handle(
        Event::PhaseOne {
            branch: 3,
            vote: Vote::No("no".into()),
        },
        NOW,
    )
    .unwrap();
    // Step 3's compensation fails for 9.9 s, then succeeds.
    let c = t
        .handle(
            Event::PhaseTwo {
                branch: 3,
                result: Err("down".into()),
            },
            NOW + 1_000,
        )
        .unwrap();
    assert!(c.iter().any(|c| matches!(c, Command::RetryLater { .. })));
    t.handle(Event::RetryDue { branch: 3 }, NOW + 9_000)
        .unwrap();
    let c = t
        .handle(
            Event::PhaseTwo {
                branch: 3,
                result: Ok(()),
            },
            NOW + 9_900,
        )
        .unwrap();
    assert_eq!(phase_two(&c), vec![(2, false)]);
    // Step 2's compensation: ONE transient failure, 0.2 s after it started.
    let c = t
        .handle(
            Event::PhaseTwo {
                branch: 2,
                result: Err("blip".into()),
            },
            NOW + 10_100,
        )
        .unwrap();
    assert_eq!(
        t.record().state,
        TxState::Aborting,
        "one blip of a compensation started 0.2 s ago made the saga STUCK: {c:?}"
    );
}

// An operator settles a saga's steps newest first too: an older step is
// refused while a newer one is owed.
#[test]
fn an_older_step_is_not_settled_by_hand_while_a_newer_one_is_owed() {
    let (mut t, _) = saga(3);
    yes(&mut t, 1);
    yes(&mut t, 2);
    no(&mut t, 3);
    on(
        &mut t,
        Event::PhaseTwoRefused {
            branch: 3,
            error: "gone".into(),
        },
    );
    assert_eq!(t.record().state, TxState::Stuck);
    let resolution = crate::model::Resolution {
        by: "ops".into(),
        reason: "x".into(),
        at_ms: NOW,
    };
    let r = t.handle(
        Event::OperatorResolve {
            branch: 1,
            commit: false,
            resolution,
        },
        NOW,
    );
    assert!(
        r.is_err(),
        "step 1 settled by hand while step 3 (newer) is not compensated: {r:?}"
    );
}

// A step's yes that comes in past the deadline (before the timer's
// event) starts no further action: the saga aborts.
#[test]
fn no_next_action_past_the_deadline() {
    let (mut t, _) = saga(3);
    let cmds = t
        .handle(
            Event::PhaseOne {
                branch: 1,
                vote: Vote::Yes(Bytes::new()),
            },
            DEADLINE + 5,
        )
        .unwrap();
    assert!(
        actions(&cmds).is_empty(),
        "action 2 started past the deadline: {cmds:?}"
    );
}

/// Steps 1; 2 and 3 after 1; 4 after 2 and 3.
fn diamond() -> (Txn, Vec<Command>) {
    let mut steps: Vec<NewBranch> = (1..=4).map(step).collect();
    steps[1].after = vec![1];
    steps[2].after = vec![1];
    steps[3].after = vec![2, 3];
    Txn::submit(Gtid::now_v7(), Mode::Saga, NOW, DEADLINE, steps)
}

// A graph: independent steps' actions go out together, a step's once all
// the steps it runs after are done.
#[test]
fn a_graph_runs_each_step_once_the_steps_before_it_are_done() {
    let (mut t, cmds) = diamond();
    assert_eq!(actions(&cmds), vec![1]);
    let mut both = actions(&yes(&mut t, 1));
    both.sort_unstable();
    assert_eq!(both, vec![2, 3]);
    assert!(actions(&yes(&mut t, 3)).is_empty(), "4 waits for 2");
    assert_eq!(actions(&yes(&mut t, 2)), vec![4]);
    assert_eq!(yes(&mut t, 4), vec![Command::ForceDecision]);
}

// Step 3 fails for good after its sibling 2 finished: 2 and 3 are
// compensated (they depend on nothing still standing), then 1 once both
// are undone; step 4 never ran.
#[test]
fn a_sibling_that_finished_is_compensated_when_the_other_fails() {
    let (mut t, _) = diamond();
    yes(&mut t, 1);
    yes(&mut t, 2);
    let cmds = on(
        &mut t,
        Event::PhaseOne {
            branch: 3,
            vote: Vote::Permanent("card processor: account closed".into()),
        },
    );
    let mut first = phase_two(&cmds);
    first.sort_unstable();
    assert_eq!(first, vec![(2, false), (3, false)]);
    assert_eq!(
        t.record().branches[3].state,
        BranchState::RolledBack,
        "never started"
    );
    assert!(phase_two(&acked(&mut t, 3)).is_empty(), "1 waits for 2");
    assert_eq!(phase_two(&acked(&mut t, 2)), vec![(1, false)]);
}

// Steps name only earlier steps; without any name the saga is a sequence.
#[test]
fn a_saga_without_names_is_a_sequence_and_bad_names_are_dropped() {
    let mut steps: Vec<NewBranch> = (1..=3).map(step).collect();
    Txn::saga_order(&mut steps);
    let after: Vec<Vec<BranchId>> = steps.iter().map(|b| b.after.clone()).collect();
    assert_eq!(after, vec![vec![], vec![1], vec![2]]);
    let mut steps: Vec<NewBranch> = (1..=3).map(step).collect();
    steps[1].after = vec![2, 0, 9, 1, 1];
    Txn::saga_order(&mut steps);
    assert_eq!(steps[1].after, vec![1]);
    assert!(steps[2].after.is_empty(), "a root of the graph");
}

// A saga record without step order (written before steps named theirs)
// is read back as a sequence: after a restart its steps are still
// compensated newest first, one at a time.
#[test]
fn a_record_without_step_order_is_read_as_a_sequence() {
    let (mut t, _) = saga(3);
    yes(&mut t, 1);
    let mut rec = t.record().clone();
    for b in &mut rec.branches {
        b.after.clear();
    }
    let (mut t, cmds) = Txn::recover(rec, NOW);
    assert_eq!(phase_two(&cmds), vec![(3, false)]);
    assert_eq!(phase_two(&acked(&mut t, 3)), vec![(2, false)]);
}

fn retry_of(cmds: &[Command], branch: BranchId) -> Option<std::time::Duration> {
    cmds.iter().find_map(|c| match c {
        Command::RetryLater { branch: b, delay } | Command::ActionLater { branch: b, delay }
            if *b == branch =>
        {
            Some(*delay)
        }
        _ => None,
    })
}

fn vote(t: &mut Txn, branch: BranchId, v: Vote, now: u64) -> Vec<Command> {
    t.handle(Event::PhaseOne { branch, vote: v }, now)
        .expect("vote")
}

// A step whose first action may have committed (its answer lost), retried
// and refused at the connection after the abort: it still gets its
// compensation (it was taken for never run, and left applied).
#[test]
fn a_retry_refused_after_the_abort_keeps_a_step_that_may_have_run() {
    let (mut t, _) = saga(2);
    yes(&mut t, 1);
    let cmds = vote(&mut t, 2, Vote::Failed("timed out".into()), NOW);
    let d = retry_of(&cmds, 2).expect("retry").as_millis() as u64;
    let cmds = t
        .handle(Event::ActionDue { branch: 2 }, NOW + d)
        .expect("due");
    assert_eq!(actions(&cmds), vec![2]);
    let cmds = t.handle(Event::DeadlinePassed, DEADLINE).expect("deadline");
    assert!(phase_two(&cmds).is_empty(), "{cmds:?}");
    let cmds = vote(
        &mut t,
        2,
        Vote::Unreachable("connection refused".into()),
        DEADLINE,
    );
    assert_eq!(phase_two(&cmds), vec![(2, false)]);

    // The same with no abort yet: refused at the deadline.
    let (mut t, _) = saga(2);
    yes(&mut t, 1);
    let cmds = vote(&mut t, 2, Vote::Failed("timed out".into()), NOW);
    let d = retry_of(&cmds, 2).expect("retry").as_millis() as u64;
    t.handle(Event::ActionDue { branch: 2 }, NOW + d)
        .expect("due");
    let cmds = vote(
        &mut t,
        2,
        Vote::Unreachable("connection refused".into()),
        DEADLINE,
    );
    assert_eq!(phase_two(&cmds), vec![(2, false)]);
}

// Failed attempts of an action do not spend its confirm's retry budget,
// and the error is gone once it went through.
#[test]
fn an_action_retried_then_done_gets_a_fresh_phase_two_budget() {
    let (t, _) = saga(2);
    let mut t = t.with_policy(RetryPolicy {
        max_attempts: Some(3),
        ..RetryPolicy::default()
    });
    yes(&mut t, 1);
    let mut now = NOW;
    for _ in 0..3 {
        let cmds = vote(&mut t, 2, Vote::Failed("503".into()), now);
        now += retry_of(&cmds, 2).expect("retry").as_millis() as u64;
        t.handle(Event::ActionDue { branch: 2 }, now).expect("due");
    }
    assert_eq!(
        vote(&mut t, 2, Vote::Yes(Bytes::new()), now),
        vec![Command::ForceDecision]
    );
    assert!(t.record().branches[1].last_error.is_empty());
    assert_eq!(
        phase_two(&t.handle(Event::DecisionDurable, now).expect("durable")).len(),
        2
    );
    let c2 = t
        .handle(
            Event::PhaseTwo {
                branch: 2,
                result: Err("x".into()),
            },
            now,
        )
        .expect("failed confirm");
    assert!(retry_of(&c2, 2).is_some(), "{c2:?}");
}

// An action's retry timer left over after the abort does not resend a
// compensation that waits for its own backoff.
#[test]
fn a_stale_action_timer_does_not_hurry_a_compensation() {
    let (mut t, _) = saga(2);
    yes(&mut t, 1);
    vote(&mut t, 2, Vote::Failed("timed out".into()), NOW);
    assert_eq!(
        phase_two(&on(
            &mut t,
            Event::Rollback {
                reason: String::new()
            }
        )),
        vec![(2, false)]
    );
    let cmds = on(
        &mut t,
        Event::PhaseTwo {
            branch: 2,
            result: Err("down".into()),
        },
    );
    assert!(retry_of(&cmds, 2).is_some());
    let cmds = t
        .handle(Event::ActionDue { branch: 2 }, NOW + 1)
        .expect("stale");
    assert!(cmds.is_empty(), "{cmds:?}");
}

// An answer that cannot change (the participant does not implement the
// call, or the policy stops it) is not retried: the saga aborts at once.
#[test]
fn a_step_that_can_never_run_is_not_retried() {
    let (mut t, _) = saga(2);
    yes(&mut t, 1);
    let cmds = vote(&mut t, 2, Vote::NotRun("UNIMPLEMENTED".into()), NOW);
    assert!(retry_of(&cmds, 2).is_none());
    assert_eq!(phase_two(&cmds), vec![(1, false)]);
}

// An action that fails in a way that may pass (an error, a timeout) is
// sent again after a backoff, not compensated; once it says yes the saga
// goes on. The error shows on the step while it waits.
#[test]
fn a_failed_action_is_retried_forward_then_the_saga_goes_on() {
    let (mut t, _) = saga(2);
    yes(&mut t, 1);
    let cmds = on(
        &mut t,
        Event::PhaseOne {
            branch: 2,
            vote: Vote::Failed("payments: 503".into()),
        },
    );
    let delay = retry_of(&cmds, 2).expect("a forward retry");
    assert!(phase_two(&cmds).is_empty(), "nothing compensated: {cmds:?}");
    assert_eq!(t.record().state, TxState::Preparing);
    let b = &t.record().branches[1];
    assert_eq!(b.state, BranchState::Failed, "it may have run");
    assert!(b.last_error.contains("503"), "{b:?}");
    let later = NOW + delay.as_millis() as u64;
    let cmds = t
        .handle(Event::ActionDue { branch: 2 }, later)
        .expect("due");
    assert_eq!(actions(&cmds), vec![2]);
    let cmds = t
        .handle(
            Event::PhaseOne {
                branch: 2,
                vote: Vote::Yes(Bytes::new()),
            },
            later,
        )
        .expect("yes");
    assert_eq!(cmds, vec![Command::ForceDecision]);
}

// A participant that cannot be reached is retried too (nothing ran
// there); past the deadline the saga aborts: the unreached step is not
// compensated, the steps before it are.
#[test]
fn an_unreachable_step_is_retried_until_the_deadline_then_the_saga_compensates() {
    let (mut t, _) = saga(2);
    yes(&mut t, 1);
    let cmds = on(
        &mut t,
        Event::PhaseOne {
            branch: 2,
            vote: Vote::Unreachable("connection refused".into()),
        },
    );
    assert!(retry_of(&cmds, 2).is_some());
    assert_eq!(t.record().branches[1].state, BranchState::Registered);
    let cmds = t.handle(Event::DeadlinePassed, DEADLINE).expect("deadline");
    assert_eq!(phase_two(&cmds), vec![(1, false)]);
    assert_eq!(t.record().branches[1].state, BranchState::RolledBack);
    // The retry's timer then finds nothing to do.
    let cmds = t
        .handle(Event::ActionDue { branch: 2 }, DEADLINE + 1)
        .expect("late timer");
    assert!(actions(&cmds).is_empty() && phase_two(&cmds).is_empty());
}

// A step that failed (it may have run) and is still failing at the
// deadline is compensated, newest first, before the step before it.
#[test]
fn a_step_still_failing_at_the_deadline_is_compensated_first() {
    let (mut t, _) = saga(3);
    yes(&mut t, 1);
    on(
        &mut t,
        Event::PhaseOne {
            branch: 2,
            vote: Vote::Failed("timed out".into()),
        },
    );
    let cmds = t.handle(Event::DeadlinePassed, DEADLINE).expect("deadline");
    assert_eq!(phase_two(&cmds), vec![(2, false)]);
    assert_eq!(
        phase_two(
            &t.handle(
                Event::PhaseTwo {
                    branch: 2,
                    result: Ok(())
                },
                DEADLINE
            )
            .expect("ack")
        ),
        vec![(1, false)]
    );
    assert_eq!(
        t.record().branches[2].state,
        BranchState::RolledBack,
        "3 never started"
    );
}

// A failure the participant calls permanent is not retried: the saga
// aborts and compensates at once.
#[test]
fn a_permanent_failure_is_not_retried() {
    let (mut t, _) = saga(2);
    yes(&mut t, 1);
    let cmds = on(
        &mut t,
        Event::PhaseOne {
            branch: 2,
            vote: Vote::Permanent("card expired".into()),
        },
    );
    assert!(retry_of(&cmds, 2).is_none());
    assert_eq!(phase_two(&cmds), vec![(2, false)]);
}

// A long saga (up to the configurable branch limit) walks back newest
// first, one compensation per acknowledgement, each once: each step of
// the walk looks at the graph once (it looked at every step's dependents
// for every step: the whole walk grew with the cube of its length).
#[test]
fn a_long_saga_is_compensated_newest_first_each_once() {
    let n = 2_000;
    let (mut t, mut cmds) = saga(n);
    for id in 1..n {
        assert_eq!(actions(&cmds), vec![id]);
        cmds = yes(&mut t, id);
    }
    cmds = no(&mut t, n);
    let mut walked = Vec::new();
    while let [(id, false)] = phase_two(&cmds)[..] {
        walked.push(id);
        cmds = acked(&mut t, id);
    }
    let expected: Vec<BranchId> = (1..=n).rev().collect();
    assert_eq!(walked, expected);
    assert_eq!(t.record().state, TxState::Aborted);
}

// Two independent chains compensated side by side: each compensation's
// time budget runs from its own turn. Another chain moving on (its next
// compensation starting) does not give a compensation that keeps failing
// more time.
#[test]
fn a_compensations_time_budget_is_its_own_not_reset_by_another_chain() {
    let mut steps: Vec<NewBranch> = (1..=4).map(step).collect();
    steps[2].after = vec![2];
    steps[3].after = vec![3];
    let policy = crate::RetryPolicy {
        max_attempts: None,
        max_duration: Some(std::time::Duration::from_secs(10)),
        ..crate::RetryPolicy::default()
    };
    let (t, _) = Txn::submit(Gtid::now_v7(), Mode::Saga, NOW, DEADLINE, steps);
    let mut t = t.with_policy(policy);
    yes(&mut t, 1);
    yes(&mut t, 2);
    yes(&mut t, 3);
    let mut first = phase_two(&no(&mut t, 4));
    first.sort_unstable();
    assert_eq!(
        first,
        vec![(1, false), (4, false)],
        "the two chains' newest"
    );
    let at = |s: u64| NOW + s * 1000;
    let fail = |t: &mut Txn, branch: BranchId, now: u64| {
        t.handle(
            Event::PhaseTwo {
                branch,
                result: Err("ledger down".into()),
            },
            now,
        )
        .expect("failure")
    };
    assert!(retry_of(&fail(&mut t, 1, at(1)), 1).is_some());
    t.handle(Event::RetryDue { branch: 1 }, at(5)).expect("due");
    // The other chain moves on: 4 acknowledged, 3's turn.
    let next = t
        .handle(
            Event::PhaseTwo {
                branch: 4,
                result: Ok(()),
            },
            at(6),
        )
        .expect("ack");
    assert_eq!(phase_two(&next), vec![(3, false)]);
    // Step 1 has failed for 11 s since its turn: given up on.
    let cmds = fail(&mut t, 1, at(11));
    assert_eq!(retry_of(&cmds, 1), None, "{cmds:?}");
}

// A step's action still failing (an error that may pass) when the saga's
// deadline comes: the deadline aborted the saga, not the step (its call
// returned at the deadline, before the deadline's timer fired).
#[test]
fn an_action_failing_at_the_deadline_aborts_it_for_the_deadline() {
    let (mut t, _) = saga(2);
    yes(&mut t, 1);
    vote(
        &mut t,
        2,
        Vote::Failed("no reply within 426 ms".into()),
        DEADLINE,
    );
    let rec = t.record();
    assert_eq!(rec.state, TxState::Aborting);
    let abort = rec.abort.as_ref().expect("why");
    assert_eq!(abort.cause, crate::model::AbortCause::Deadline, "{abort:?}");
    assert_eq!(abort.branch, 2);
}

// A step whose action went through after retries has its completion
// numbered from 1 (`attempts` counts phase-2 calls).
#[test]
fn a_step_retried_forward_completes_with_attempt_one() {
    let (mut t, _) = saga(1);
    let cmds = vote(&mut t, 1, Vote::Failed("down".into()), NOW);
    assert!(retry_of(&cmds, 1).is_some());
    t.handle(Event::ActionDue { branch: 1 }, NOW + 500)
        .expect("due");
    assert_eq!(
        vote(&mut t, 1, Vote::Yes(Bytes::new()), NOW + 600),
        vec![Command::ForceDecision]
    );
    let cmds = t
        .handle(Event::DecisionDurable, NOW + 600)
        .expect("durable");
    assert!(
        cmds.contains(&Command::PhaseTwo {
            branch: 1,
            commit: true,
            attempt: 1
        }),
        "{cmds:?}"
    );
}

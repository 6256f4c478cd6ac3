//! What readers may see of a transaction: a commit decision only once it
//! is durable. One rule per test.

use bytes::Bytes;

use super::*;
use crate::model::MAX_STORED_TEXT;

const NOW: u64 = 1_000;
const DEADLINE: u64 = 61_000;

fn decided_not_forced(mode: Mode) -> Txn {
    let b = NewBranch {
        endpoint: "http://127.0.0.1:9001".into(),
        resource: "r".into(),
        payload: Bytes::from_static(b"p"),
        mode: None,
        after: Vec::new(),
    };
    let (mut t, _) = Txn::submit(Gtid::now_v7(), mode, NOW, DEADLINE, vec![b]);
    let vote = Vote::Yes(Bytes::from_static(b"hold-1"));
    let cmds = t
        .handle(Event::PhaseOne { branch: 1, vote }, NOW)
        .expect("vote");
    assert_eq!(cmds, vec![Command::ForceDecision]);
    t
}

// While the commit decision is being forced, readers see the transaction as
// undecided: a crash now reads back as undecided and aborts.
#[test]
fn a_commit_decision_is_hidden_until_durable() {
    let mut t = decided_not_forced(Mode::TwoPhase);
    assert_eq!(t.record().decision, Some(Decision::Commit)); // what is written
    let seen = t.visible_record();
    assert_eq!((seen.state, seen.decision), (TxState::Preparing, None));
    assert_eq!(t.durable_decision(), None);
    assert!(t.decision_pending() && !t.settled());
    t.handle(Event::DecisionDurable, NOW).expect("durable");
    let seen = t.visible_record();
    assert_eq!(
        (seen.state, seen.decision),
        (TxState::Committing, Some(Decision::Commit))
    );
    assert_eq!(t.durable_decision(), Some(Decision::Commit));
    assert!(t.settled());
}

// An operator's retry while the decision is being forced sends nothing
// (it is told to ask again): phase 2 starts only once the decision is on
// disk.
#[test]
fn operator_retry_never_starts_phase_two_before_the_force() {
    let mut t = decided_not_forced(Mode::Tcc);
    let gtid = t.record().gtid;
    let refused = t.handle(Event::OperatorRetry, NOW);
    assert_eq!(refused, Err(EngineError::DecisionPending { gtid }));
    let cmds = t.handle(Event::DecisionDurable, NOW).expect("durable");
    assert!(
        cmds.iter()
            .any(|c| matches!(c, Command::PhaseTwo { commit: true, .. }))
    );
}

// While a commit decision is being forced, a request whose answer depends
// on it is told to ask again (the runtime does, once it is durable), and a
// refusal names the state others may see: the decision does not leak
// before a crash could no longer undo it.
#[test]
fn requests_are_not_answered_from_a_decision_being_forced() {
    let (mut t, _) = Txn::begin(Gtid::now_v7(), Mode::Tcc, NOW, DEADLINE);
    let gtid = t.record().gtid;
    let b = NewBranch {
        endpoint: "http://127.0.0.1:9001".into(),
        resource: "r".into(),
        payload: Bytes::new(),
        mode: None,
        after: Vec::new(),
    };
    t.handle(Event::Enlist(b.clone()), NOW).expect("enlist");
    let vote = Vote::Yes(Bytes::new());
    t.handle(Event::PhaseOne { branch: 1, vote }, NOW)
        .expect("vote");
    assert_eq!(
        t.handle(Event::Commit, NOW).expect("commit"),
        vec![Command::ForceDecision]
    );
    let written = t.record().clone();
    for event in [
        Event::Commit,
        Event::Rollback {
            reason: String::new(),
        },
        Event::OperatorAbort {
            reason: String::new(),
        },
        Event::OperatorRetry,
    ] {
        let answer = t.handle(event.clone(), NOW);
        assert_eq!(
            answer,
            Err(EngineError::DecisionPending { gtid }),
            "{event:?}"
        );
    }
    assert_eq!(t.record(), &written, "nothing changed");
    let refused = t.handle(Event::Enlist(b), NOW).expect_err("refused");
    let EngineError::WrongState { state, .. } = &refused else {
        panic!("{refused:?}");
    };
    assert_eq!(*state, TxState::Active, "{refused}");
    assert!(!refused.to_string().contains("COMMIT"), "{refused}");

    t.handle(Event::DecisionDurable, NOW).expect("durable");
    let refused = t
        .handle(
            Event::Rollback {
                reason: String::new(),
            },
            NOW,
        )
        .expect_err("never reversed");
    assert!(refused.to_string().contains("COMMITTING"), "{refused}");
}

// An abort needs no force (presumed abort): it is visible at once.
#[test]
fn an_abort_is_visible_at_once() {
    let (mut t, _) = Txn::begin(Gtid::now_v7(), Mode::TwoPhase, NOW, DEADLINE);
    t.handle(
        Event::Rollback {
            reason: String::new(),
        },
        NOW,
    )
    .expect("rollback");
    assert_eq!(t.durable_decision(), Some(Decision::Abort));
    assert_eq!(t.visible_record().decision, Some(Decision::Abort));
}

// A yes vote's reply is kept in the record (a repeated Submit answers with
// it); a participant's long reason is cut to MAX_STORED_TEXT.
#[test]
fn replies_are_kept_and_reasons_capped() {
    let t = decided_not_forced(Mode::TwoPhase);
    assert_eq!(t.record().branches[0].reply, Bytes::from_static(b"hold-1"));
    let b = NewBranch {
        endpoint: "http://127.0.0.1:9001".into(),
        resource: "r".into(),
        payload: Bytes::new(),
        mode: None,
        after: Vec::new(),
    };
    let (mut t, _) = Txn::submit(Gtid::now_v7(), Mode::TwoPhase, NOW, DEADLINE, vec![b]);
    let vote = Vote::No("x".repeat(20_000));
    t.handle(Event::PhaseOne { branch: 1, vote }, NOW)
        .expect("vote");
    assert!(t.record().branches[0].last_error.len() <= MAX_STORED_TEXT);
    assert!(t.record().reason.len() <= MAX_STORED_TEXT + 100);
}

// Rule 1 (client-chosen gtids): the abort is forced like a commit. Until
// it is durable nothing of it shows and nothing goes out, whatever else
// happens meanwhile (a late phase-1 reply, the deadline, an operator's
// retry): a crash would lose it, and a repeat would start the gtid again.
#[test]
fn a_forced_abort_sends_and_shows_nothing_until_durable() {
    let b = |n: u16| NewBranch {
        endpoint: format!("http://127.0.0.1:{n}"),
        resource: "r".into(),
        payload: Bytes::new(),
        mode: None,
        after: Vec::new(),
    };
    let (t, _) = Txn::submit(Gtid::now_v7(), Mode::Tcc, NOW, DEADLINE, vec![b(1), b(2)]);
    let mut t = t.with_forced_abort();
    let vote = Vote::Failed("refused".into());
    let cmds = t
        .handle(Event::PhaseOne { branch: 1, vote }, NOW)
        .expect("vote");
    assert_eq!(cmds, vec![Command::ForceDecision]);
    assert_eq!(t.record().decision, Some(Decision::Abort)); // what is written
    let vote = Vote::Yes(Bytes::new());
    let late = t
        .handle(Event::PhaseOne { branch: 2, vote }, NOW)
        .expect("late yes");
    assert_eq!(late, vec![Command::Persist], "nothing may go out yet");
    let timer = t.handle(Event::DeadlinePassed, DEADLINE).expect("deadline");
    assert!(timer.is_empty(), "{timer:?}");
    assert_eq!(t.durable_decision(), None);
    let seen = t.visible_record();
    assert_eq!((seen.state, seen.decision), (TxState::Preparing, None));
    assert!(seen.reason.is_empty());
    assert!(t.decision_pending() && !t.settled());

    let cmds = t.handle(Event::DecisionDurable, NOW).expect("durable");
    let cancels: Vec<_> = cmds
        .iter()
        .filter(|c| matches!(c, Command::PhaseTwo { commit: false, .. }))
        .collect();
    assert_eq!(cancels.len(), 2, "{cmds:?}");
    assert_eq!(t.durable_decision(), Some(Decision::Abort));
    assert_eq!(t.visible_record().state, TxState::Aborting);
    assert!(t.settled());
}

// Without a client-chosen gtid an abort is not forced (presumed abort): a
// lost abort reads back as undecided or unknown, which is abort too.
#[test]
fn an_unforced_abort_starts_its_rollbacks_at_once() {
    let b = NewBranch {
        endpoint: "http://127.0.0.1:9001".into(),
        resource: "r".into(),
        payload: Bytes::new(),
        mode: None,
        after: Vec::new(),
    };
    let (mut t, _) = Txn::submit(Gtid::now_v7(), Mode::Tcc, NOW, DEADLINE, vec![b]);
    let vote = Vote::Failed("refused".into());
    let cmds = t
        .handle(Event::PhaseOne { branch: 1, vote }, NOW)
        .expect("vote");
    assert_eq!(cmds[0], Command::Persist);
    assert!(!cmds.contains(&Command::ForceDecision) && !cmds.contains(&Command::Force));
    assert!(
        cmds.iter()
            .any(|c| matches!(c, Command::PhaseTwo { commit: false, .. }))
    );
}

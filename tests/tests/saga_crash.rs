//! A saga's coordinator SIGKILLed (a failpoint ends the `tandem serve`
//! process) at each point of its run, then restarted on the same sled
//! directory: it resumes in the right direction. The participants' in-doubt
//! resolvers are off, so nothing but the coordinator finishes the saga.

use std::time::Duration;

use tandem_proto::v1 as pb;
use tandem_sdk::{Branch, Gtid, Mode, TransactionClient};
use tandem_tests::process::Serve;
use tandem_tests::{Script, Scripted};

struct Run {
    state: pb::TxState,
    /// (actions, compensations) per step, as the handlers saw them.
    counts: Vec<(usize, usize)>,
    /// Steps whose action ran and was not compensated.
    held: Vec<usize>,
}

/// Steps s1..s3 (s3 says no when `third_says_no`); the coordinator dies
/// at `failpoint` and is restarted; returns what the saga ended as.
async fn crash_at(failpoint: &str, third_says_no: bool) -> Run {
    let data = tempfile::tempdir().expect("data dir");
    let serve = Serve::start_with(data.path(), &[], &[("TANDEM_FAILPOINT", failpoint)]);
    let addr = serve.addr().to_string();
    let steps: Vec<_> = (1..=3)
        .map(|i| {
            let script = Script {
                vote_no: (third_says_no && i == 3).then(|| "sold out".to_string()),
                ..Script::default()
            };
            Scripted::new(&format!("s{i}"), script, None)
        })
        .collect();
    let mut running = Vec::new();
    for s in &steps {
        running.push(s.serve_saga().await);
    }
    let branches: Vec<Branch> = running
        .iter()
        .map(|p| Branch::new(p.url(), "r", "x"))
        .collect();
    let client = TransactionClient::connect(&serve.url)
        .await
        .expect("connect");
    let gtid = Gtid::now_v7();
    let timeout = Some(Duration::from_secs(10));
    let first = client.submit_as(gtid, Mode::Saga, branches, timeout).await;
    assert!(
        first.is_err(),
        "{failpoint}: the coordinator should have died: {first:?}"
    );
    let status = tokio::task::spawn_blocking(move || serve.wait())
        .await
        .expect("wait");
    assert!(!status.success(), "{failpoint}: exit status {status}");

    let serve = Serve::start_on(data.path(), &addr, &[], &[]);
    let mut state = pb::TxState::Unspecified;
    for _ in 0..1000 {
        if let Ok(info) = client.get(gtid).await {
            state = info.state();
            if matches!(state, pb::TxState::Committed | pb::TxState::Aborted) {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(serve);
    Run {
        state,
        counts: steps
            .iter()
            .map(|s| {
                let (a, _, c) = s.counts();
                (a, c)
            })
            .collect(),
        held: steps
            .iter()
            .enumerate()
            .filter(|(_, s)| s.held_count() > 0)
            .map(|(i, _)| i + 1)
            .collect(),
    }
}

// Killed after the start is forced, before or after step 1's action:
// undecided, so aborted; every step that ran is compensated, once; none is
// left holding its action.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_before_the_decision_the_saga_is_compensated() {
    for failpoint in ["after-branch-recorded", "after-phase-one"] {
        let run = crash_at(failpoint, false).await;
        assert_eq!(run.state, pb::TxState::Aborted, "{failpoint}");
        assert!(
            run.held.is_empty(),
            "{failpoint}: steps {:?} left done",
            run.held
        );
        for (i, (actions, compensations)) in run.counts.iter().enumerate() {
            assert!(
                *actions <= 1 && *compensations <= *actions,
                "{failpoint}: step {}: {:?}",
                i + 1,
                run.counts
            );
        }
        if failpoint == "after-phase-one" {
            assert_eq!(
                run.counts[0],
                (1, 1),
                "{failpoint}: step 1 ran and is compensated"
            );
            assert_eq!(run.counts[2], (0, 0), "{failpoint}: step 3 never ran");
        }
    }
}

// Killed once the commit is forced: the restart confirms; nothing is
// compensated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_after_the_decision_the_saga_completes() {
    let run = crash_at("after-decision-forced", false).await;
    assert_eq!(run.state, pb::TxState::Committed);
    assert_eq!(run.counts, vec![(1, 0); 3]);
}

// Killed after the first compensation was acknowledged (step 3 said no):
// the restart compensates steps 2 and 1, each once in all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_while_compensating_the_saga_goes_on_compensating() {
    let run = crash_at("between-phase-two", true).await;
    assert_eq!(run.state, pb::TxState::Aborted);
    assert_eq!(run.counts, vec![(1, 1), (1, 1), (1, 0)]);
    assert!(run.held.is_empty(), "steps {:?} left done", run.held);
}

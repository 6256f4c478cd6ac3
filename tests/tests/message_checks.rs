//! Transactional messages: the back-check's retry budget, and
//! what a SubmitMessage leaves behind on a STUCK transaction. Real tonic
//! servers on loopback (coordinator, delivery participant, business
//! service's check), as tests/message.rs runs them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tandem_coordinator::config::CoordinatorConfig;
use tandem_coordinator::log::SledLog;
use tandem_coordinator::server::RunningCoordinator;
use tandem_proto::v1 as pb;
use tandem_sdk::{
    Branch, BranchContext, Gtid, HandlerError, Message, MessageCheck, ParticipantServer,
    TransactionClient,
};
use tandem_tests::process::free_addr;
use tandem_tests::{eventually_async, spawn, test_config};

#[derive(Default)]
struct Inbox {
    applied: Mutex<HashMap<Gtid, usize>>,
}

impl Inbox {
    fn applied(&self, gtid: Gtid) -> usize {
        self.applied
            .lock()
            .expect("lock")
            .get(&gtid)
            .copied()
            .unwrap_or(0)
    }
}

impl Message for Inbox {
    async fn deliver(&self, ctx: &BranchContext, _payload: &[u8]) -> Result<(), HandlerError> {
        *self
            .applied
            .lock()
            .expect("lock")
            .entry(ctx.gtid)
            .or_default() += 1;
        Ok(())
    }
}

/// A back-check that fails its first `failures` calls (the orders database
/// briefly unreachable, or a local transaction still holding the row past
/// the check's lock timeout), then answers "committed".
#[derive(Default)]
struct Flaky {
    failures: AtomicUsize,
    calls: AtomicUsize,
}

impl MessageCheck for Flaky {
    async fn check(&self, _ctx: &BranchContext, _payload: &[u8]) -> Result<bool, HandlerError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self
            .failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(HandlerError::new("orders db briefly unreachable"));
        }
        Ok(true)
    }
}

async fn coordinator(config: CoordinatorConfig) -> (RunningCoordinator, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("dir");
    let log = Arc::new(SledLog::open(dir.path()).expect("log"));
    let coord = RunningCoordinator::start(config, log)
        .await
        .expect("coordinator");
    (coord, dir)
}

async fn reaches(
    client: &TransactionClient,
    gtid: Gtid,
    states: &[pb::TxState],
) -> pb::TransactionInfo {
    eventually_async(&format!("{gtid} {states:?}"), || async {
        client
            .get(gtid)
            .await
            .is_ok_and(|info| states.contains(&info.state()))
    })
    .await;
    client.get(gtid).await.expect("get")
}

// The retry policy gives a failing branch `max_duration` of retries. A
// message's back-check is first asked at its deadline; its budget must
// start then. It starts at PrepareMessage instead (the record's
// `updated_ms`), so a message whose timeout is longer than the policy's
// duration (default: 1 h of retries, timeouts up to 24 h) is STUCK, for an
// operator, after its first failed check: never asked again.
#[tokio::test]
async fn a_long_message_gets_its_check_retried_not_stuck_after_one_failure() {
    let mut config = test_config();
    config.retry.max_attempts = None;
    config.retry.max_duration = Some(Duration::from_secs(2));
    let (coord, _dir) = coordinator(config).await;
    let inbox = Arc::new(Inbox::default());
    let pa = spawn(ParticipantServer::new().message("inbox", inbox.clone())).await;
    let checks = Arc::new(Flaky::default());
    checks.failures.store(1, Ordering::SeqCst);
    let business = spawn(ParticipantServer::new().check("orders", checks.clone())).await;
    let client = TransactionClient::connect(coord.url())
        .await
        .expect("connect");
    let gtid = Gtid::now_v7();
    client
        .prepare_message(
            gtid,
            Branch::new(business.url(), "orders", ""),
            vec![Branch::new(pa.url(), "inbox", "sms")],
            // Longer than the retry policy's duration.
            Some(Duration::from_secs(3)),
        )
        .await
        .expect("prepare");
    // No Submit: the business service died after its local commit.
    let info = reaches(&client, gtid, &[pb::TxState::Committed, pb::TxState::Stuck]).await;
    assert_eq!(
        info.state(),
        pb::TxState::Committed,
        "one failed back-check made the message STUCK (checks asked: {}; branch 1: {:?})",
        checks.calls.load(Ordering::SeqCst),
        info.branches[0]
    );
    assert_eq!(inbox.applied(gtid), 1);
}

// SubmitMessage of a gtid that is not live and STUCK in the log adopts
// the record (the undecided-message case: the client's word decides it).
// For a STUCK 2PC transaction it then refuses (not a message), and for a
// STUCK message whose deliveries exhausted their retries it answers
// COMMITTING with nothing to do: the adopted STUCK entry is left in the
// live table with nothing driving it (the operator calls drop such an
// entry again: `forget_if_stuck`).
#[tokio::test]
async fn submit_message_does_not_leave_a_stuck_transaction_live() {
    let mut config = test_config();
    config.retry.max_attempts = Some(2);
    let (coord, _dir) = coordinator(config).await;
    let business = spawn(ParticipantServer::new().check("orders", Flaky::default())).await;
    let client = TransactionClient::connect(coord.url())
        .await
        .expect("connect");
    let down = format!("http://{}", free_addr());

    // A message whose only delivery is down: delivered = decided, then
    // STUCK (commit) once its retries are exhausted.
    let gtid = Gtid::now_v7();
    client
        .prepare_message(
            gtid,
            Branch::new(business.url(), "orders", ""),
            vec![Branch::new(down.clone(), "inbox", "sms")],
            None,
        )
        .await
        .expect("prepare");
    let _ = client.submit_message(gtid).await;
    reaches(&client, gtid, &[pb::TxState::Stuck]).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(coord.coordinator.live_count(), 0, "STUCK: not live");
    let again = client.submit_message(gtid).await;
    assert!(again.is_ok(), "{again:?}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        coord.coordinator.live_count(),
        0,
        "a repeated SubmitMessage of a STUCK message left it live, with nothing driving it"
    );
}

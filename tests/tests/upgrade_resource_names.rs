//! A transaction recorded before resource names with control or
//! invisible characters were refused (an upgrade): its client's repeated
//! Submit (the SDK's documented way to learn an outcome it lost) is
//! answered from its record; only what is started now is refused.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tandem_coordinator::log::conformance::sample_record;
use tandem_coordinator::log::{SledLog, TxnLog};
use tandem_coordinator::model::{BranchState, Decision, Mode as LogMode, TxState};
use tandem_sdk::{Branch, Mode, TransactionClient};
use tandem_tests::start_coordinator;

#[tokio::test]
async fn repeat_submit_of_pre_upgrade_record_with_tab_in_resource() {
    let dir = tempfile::tempdir().expect("dir");
    let mut rec = sample_record(LogMode::TwoPhase, 1);
    rec.state = TxState::Committed;
    rec.decision = Some(Decision::Commit);
    rec.branches[0].resource = "ledger\tEU".into();
    rec.branches[0].state = BranchState::Committed;
    rec.branches[0].payload = Bytes::from_static(b"p");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    rec.created_ms = now;
    rec.updated_ms = now;
    rec.deadline_ms = now + 60_000;
    {
        let log = SledLog::open(dir.path()).expect("log");
        log.write(&rec).expect("write");
        log.force().await.expect("force");
    }
    let coord = start_coordinator(Arc::new(SledLog::open(dir.path()).expect("reopen"))).await;
    let client = TransactionClient::connect(coord.url())
        .await
        .expect("connect");
    let endpoint = rec.branches[0].endpoint.clone();
    let info = client.get(rec.gtid).await.expect("get");
    eprintln!("recorded state: {:?}", info.state());
    let again = client
        .submit_as(
            rec.gtid,
            Mode::TwoPhase,
            vec![
                Branch::new(endpoint, "ledger\tEU", Bytes::from_static(b"p")).mode(Mode::TwoPhase),
            ],
            Some(Duration::from_secs(5)),
        )
        .await;
    eprintln!("repeated submit: {again:?}");
    assert!(
        again.as_ref().is_ok_and(|s| s.complete),
        "the repeat must answer the recorded outcome (COMMITTED): {again:?}"
    );
}

//! Transactional messages: hostile input to a participant's
//! Check and Deliver (real tonic server on loopback). Each is refused with
//! a clear error, runs no handler and changes nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tandem_proto::v1 as pb;
use tandem_proto::v1::participant_client::ParticipantClient;
use tandem_sdk::{
    BranchContext, Gtid, HandlerError, Message, MessageCheck, ParticipantServer, Tcc, Vote,
};
use tandem_tests::spawn;

#[derive(Default)]
struct Counting(AtomicUsize);

impl Message for Counting {
    async fn deliver(&self, _: &BranchContext, _: &[u8]) -> Result<(), HandlerError> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

impl MessageCheck for Counting {
    async fn check(&self, _: &BranchContext, _: &[u8]) -> Result<bool, HandlerError> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(false)
    }
}

impl Tcc for Counting {
    async fn try_(&self, _: &BranchContext, _: &[u8]) -> Result<Vote, HandlerError> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(Vote::yes())
    }
    async fn confirm(&self, _: &BranchContext, _: &[u8]) -> Result<(), HandlerError> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    async fn cancel(&self, _: &BranchContext, _: &[u8]) -> Result<(), HandlerError> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

fn req(gtid: &str, branch_id: u32, resource: &str) -> pb::BranchRequest {
    pb::BranchRequest {
        gtid: gtid.into(),
        branch_id,
        resource: resource.into(),
        payload: b"p".to_vec().into(),
        attempt: 1,
        epoch: 1,
        mode: 0,
    }
}

#[tokio::test]
async fn hostile_checks_and_deliveries_are_refused_without_running_anything() {
    let inbox = Arc::new(Counting::default());
    let check = Arc::new(Counting::default());
    let tcc = Arc::new(Counting::default());
    let p = spawn(
        ParticipantServer::new()
            .message("inbox", inbox.clone())
            .check("orders", check.clone())
            .tcc("hold", tcc.clone()),
    )
    .await;
    let mut rpc = ParticipantClient::connect(p.url()).await.expect("connect");
    let g = Gtid::now_v7().to_string();
    let mut outcomes = Vec::new();
    for (what, r) in [
        ("bad gtid", req("not-a-uuid", 2, "inbox")),
        ("nil gtid", req(&Gtid::nil().to_string(), 2, "inbox")),
        ("unknown resource", req(&g, 2, "nope")),
        ("deliver to a check", req(&g, 2, "orders")),
        ("deliver to a tcc", req(&g, 2, "hold")),
        ("empty resource", req(&g, 2, "")),
    ] {
        let r = rpc.deliver(r).await;
        outcomes.push((format!("deliver {what}"), r.map(drop)));
    }
    for (what, r) in [
        ("bad gtid", req("not-a-uuid", 1, "orders")),
        ("unknown resource", req(&g, 1, "nope")),
        ("check a delivery", req(&g, 1, "inbox")),
        ("check a tcc", req(&g, 1, "hold")),
    ] {
        let r = rpc.check(r).await;
        outcomes.push((format!("check {what}"), r.map(drop)));
    }
    let accepted: Vec<&String> = outcomes
        .iter()
        .filter(|(_, r)| r.is_ok())
        .map(|(w, _)| w)
        .collect();
    assert!(
        accepted.is_empty(),
        "accepted: {accepted:?} (the inbox handler ran {} times: a delivery applied for the \
         nil gtid, which no coordinator makes)",
        inbox.0.load(Ordering::SeqCst)
    );
    for (what, r) in &outcomes {
        let Err(status) = r else {
            panic!("{what}: accepted");
        };
        assert!(
            matches!(
                status.code(),
                tonic::Code::InvalidArgument
                    | tonic::Code::NotFound
                    | tonic::Code::FailedPrecondition
                    | tonic::Code::Unimplemented
            ),
            "{what}: {status:?}"
        );
        assert!(!status.message().is_empty(), "{what}");
    }
    assert_eq!(inbox.0.load(Ordering::SeqCst), 0);
    assert_eq!(check.0.load(Ordering::SeqCst), 0);
    assert_eq!(tcc.0.load(Ordering::SeqCst), 0);
}

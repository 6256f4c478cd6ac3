//! Trace context end to end: a W3C `traceparent` sent by the business
//! client reaches every participant handler's context, in every phase,
//! with the coordinator's span in between — phase 2 driven by recovery
//! after a crash too; an invalid one is ignored.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tandem_coordinator::log::MemLog;
use tandem_proto::v1 as pb;
use tandem_sdk::{
    Branch, BranchContext, HandlerError, Mode, ParticipantServer, RunningParticipant, Tcc,
    TraceParent, TransactionClient, TwoPhase, Vote,
};
use tandem_tests::process::Serve;
use tandem_tests::{eventually, spawn, start_coordinator};

const SENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// A call's name and the trace context its handler was given.
type Seen = (String, Option<TraceParent>);

/// A participant that writes down the trace context of every call.
#[derive(Clone, Default)]
struct Recorder {
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Recorder {
    fn note(&self, verb: &str, ctx: &BranchContext) {
        let mut seen = self.seen.lock().expect("lock");
        seen.push((verb.to_string(), ctx.traceparent().copied()));
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("lock").clone()
    }

    fn verbs(&self) -> Vec<String> {
        self.seen().into_iter().map(|(v, _)| v).collect()
    }

    async fn serve_2pc(&self) -> RunningParticipant {
        spawn(ParticipantServer::new().two_phase("r", self.clone())).await
    }

    async fn serve_tcc(&self) -> RunningParticipant {
        spawn(ParticipantServer::new().tcc("r", self.clone())).await
    }
}

impl TwoPhase for Recorder {
    async fn prepare(&self, ctx: &BranchContext, _: &[u8]) -> Result<Vote, HandlerError> {
        self.note("prepare", ctx);
        Ok(Vote::yes())
    }
    async fn commit(&self, ctx: &BranchContext, _: &[u8]) -> Result<(), HandlerError> {
        self.note("commit", ctx);
        Ok(())
    }
    async fn rollback(&self, ctx: &BranchContext, _: &[u8]) -> Result<(), HandlerError> {
        self.note("rollback", ctx);
        Ok(())
    }
}

impl Tcc for Recorder {
    async fn try_(&self, ctx: &BranchContext, _: &[u8]) -> Result<Vote, HandlerError> {
        self.note("try", ctx);
        Ok(Vote::yes())
    }
    async fn confirm(&self, ctx: &BranchContext, _: &[u8]) -> Result<(), HandlerError> {
        self.note("confirm", ctx);
        Ok(())
    }
    async fn cancel(&self, ctx: &BranchContext, _: &[u8]) -> Result<(), HandlerError> {
        self.note("cancel", ctx);
        Ok(())
    }
}

/// Every call `r` saw carried the trace sent, with another parent id.
fn all_in_trace(r: &Recorder, sent: &TraceParent) {
    let seen = r.seen();
    assert!(!seen.is_empty(), "no call recorded");
    for (verb, tp) in seen {
        let tp = tp.unwrap_or_else(|| panic!("{verb}: no traceparent in the handler's context"));
        assert_eq!(tp.trace_id, sent.trace_id, "{verb}: another trace");
        assert_ne!(
            tp.parent_id, sent.parent_id,
            "{verb}: the parent is the client's span, not the coordinator's"
        );
        assert_eq!(tp.flags, sent.flags, "{verb}: flags changed");
    }
}

// Rule: a traceparent sent on Submit (2PC, two branches) reaches both
// handlers in prepare and in commit, with the coordinator as the parent.
#[tokio::test]
async fn submit_carries_the_trace_into_every_phase() {
    let coord = start_coordinator(Arc::new(MemLog::new())).await;
    let (a, b) = (Recorder::default(), Recorder::default());
    let (pa, pb_) = (a.serve_2pc().await, b.serve_2pc().await);
    let sent = TraceParent::parse(SENT).expect("valid");
    let client = TransactionClient::connect(coord.url())
        .await
        .expect("connect")
        .with_traceparent(sent);
    let done = client
        .submit(
            Mode::TwoPhase,
            vec![
                Branch::new(pa.url(), "r", "x"),
                Branch::new(pb_.url(), "r", "y"),
            ],
        )
        .await
        .expect("submit");
    assert!(done.complete);
    for r in [&a, &b] {
        assert_eq!(r.verbs(), ["prepare", "commit"]);
        all_in_trace(r, &sent);
    }
}

// Rule: an interactive TCC transaction (Begin, Enlist, Commit) carries the
// trace of its Begin into try and confirm.
#[tokio::test]
async fn an_interactive_transaction_carries_the_trace_of_its_begin() {
    let coord = start_coordinator(Arc::new(MemLog::new())).await;
    let (a, b) = (Recorder::default(), Recorder::default());
    let (pa, pb_) = (a.serve_tcc().await, b.serve_tcc().await);
    let sent = TraceParent::parse(SENT).expect("valid");
    let client = TransactionClient::connect(coord.url())
        .await
        .expect("connect")
        .with_traceparent(sent);
    let gtid = client.begin(Mode::Tcc).await.expect("begin");
    // Enlist and commit without a trace of their own: the transaction's
    // is the one of its Begin.
    let plain = TransactionClient::connect(coord.url())
        .await
        .expect("connect");
    plain
        .enlist(gtid, Branch::new(pa.url(), "r", "x"))
        .await
        .expect("enlist a");
    plain
        .enlist(gtid, Branch::new(pb_.url(), "r", "y"))
        .await
        .expect("enlist b");
    plain.commit(gtid).await.expect("commit");
    for r in [&a, &b] {
        assert_eq!(r.verbs(), ["try", "confirm"]);
        all_in_trace(r, &sent);
    }
}

// Rule: an invalid traceparent is ignored: the transaction commits and the
// handlers see no trace context.
#[tokio::test]
async fn an_invalid_traceparent_is_ignored() {
    let coord = start_coordinator(Arc::new(MemLog::new())).await;
    let a = Recorder::default();
    let pa = a.serve_2pc().await;
    let mut rpc = pb::coordinator_client::CoordinatorClient::connect(coord.url())
        .await
        .expect("connect");
    for bad in [
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "garbage",
    ] {
        let mut req = tonic::Request::new(pb::SubmitRequest {
            mode: pb::Mode::TwoPhase as i32,
            branches: vec![pb::BranchSpec {
                endpoint: pa.url(),
                resource: "r".into(),
                payload: "x".into(),
                ..Default::default()
            }],
            ..Default::default()
        });
        req.metadata_mut()
            .insert("traceparent", bad.parse().expect("ascii"));
        let resp = rpc.submit(req).await.expect("submit").into_inner();
        assert_eq!(resp.state, pb::TxState::Committed as i32, "{bad}");
    }
    let seen = a.seen();
    assert_eq!(seen.len(), 6);
    assert!(
        seen.iter().all(|(_, tp)| tp.is_none()),
        "an invalid traceparent reached a handler: {seen:?}"
    );
}

// Rule: the trace is kept with the transaction: phase 2 driven by recovery,
// after the coordinator died between the forced decision and phase 2,
// still carries it.
#[tokio::test]
async fn phase_two_after_a_crash_carries_the_trace() {
    let data = tempfile::tempdir().expect("data dir");
    let serve = Serve::start_with(
        data.path(),
        &["--call-timeout", "1s", "--retry-initial", "20ms"],
        &[("TANDEM_FAILPOINT", "after-decision-forced")],
    );
    let (a, b) = (Recorder::default(), Recorder::default());
    let (pa, pb_) = (a.serve_2pc().await, b.serve_2pc().await);
    let addr = serve.addr().to_string();
    let sent = TraceParent::parse(SENT).expect("valid");
    let client = TransactionClient::connect(&serve.url)
        .await
        .expect("connect")
        .with_traceparent(sent);
    let died = client
        .submit(
            Mode::TwoPhase,
            vec![
                Branch::new(pa.url(), "r", "x"),
                Branch::new(pb_.url(), "r", "y"),
            ],
        )
        .await;
    assert!(died.is_err(), "the coordinator should have died mid-call");
    let status = tokio::task::spawn_blocking(move || serve.wait())
        .await
        .expect("wait");
    assert!(!status.success(), "exit status {status}");
    for r in [&a, &b] {
        assert_eq!(r.verbs(), ["prepare"], "no phase 2 before the restart");
    }

    // Restarted with OpenTelemetry on (a collector that is not there):
    // the participant calls are children of the coordinator's exported
    // spans, in the same trace, and a failing export changes nothing.
    let _serve = Serve::start_on(
        data.path(),
        &addr,
        &[
            "--retry-initial",
            "20ms",
            "--otlp-endpoint",
            "http://127.0.0.1:9",
        ],
        &[],
    );
    eventually("recovery commits both branches", || {
        a.verbs().len() == 2 && b.verbs().len() == 2
    })
    .await;
    for r in [&a, &b] {
        assert_eq!(r.verbs(), ["prepare", "commit"]);
        all_in_trace(r, &sent);
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
}

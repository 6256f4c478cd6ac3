//! The participant SDK's Prometheus metrics, read from
//! `ParticipantMetrics::encode` after driving a participant as a
//! misbehaving network would (repeats, cancel before try, a late try), by
//! calling its gRPC service directly; and once through a real coordinator.
//! The same calls give the same counts on every barrier store: the barrier
//! reports its outcomes where it decides, not per store.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tandem_coordinator::log::MemLog;
use tandem_proto::v1::participant_client::ParticipantClient;
use tandem_proto::v1::{BranchRequest, VoteResponse};
use tandem_sdk::barrier::{BarrierStore, MemBarrier, SledBarrier};
use tandem_sdk::postgres::PgBarrier;
use tandem_sdk::{
    Branch, BranchContext, HandlerError, Mode, ParticipantMetrics, ParticipantServer, Tcc,
    TransactionClient, TwoPhase, Vote,
};
use tandem_tests::pg::PgServer;
use tandem_tests::{eventually, spawn, start_coordinator};
use tonic::transport::Channel;
use uuid::Uuid;

/// A handler told what to do by its payload: `no` votes no, `fail` fails,
/// `panic` panics, anything else succeeds. Counts the calls it gets.
#[derive(Default)]
struct Told {
    phase_one: AtomicUsize,
    phase_two: AtomicUsize,
}

impl Told {
    async fn phase_one(&self, payload: &[u8]) -> Result<Vote, HandlerError> {
        self.phase_one.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(1)).await;
        match payload {
            b"no" => Ok(Vote::no("told to")),
            b"fail" => Err(HandlerError::new("told to fail")),
            b"panic" => panic!("told to panic"),
            _ => Ok(Vote::yes()),
        }
    }

    async fn phase_two(&self, payload: &[u8]) -> Result<(), HandlerError> {
        self.phase_two.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(1)).await;
        match payload {
            b"fail" => Err(HandlerError::new("told to fail")),
            _ => Ok(()),
        }
    }
}

impl TwoPhase for Told {
    async fn prepare(&self, _: &BranchContext, payload: &[u8]) -> Result<Vote, HandlerError> {
        self.phase_one(payload).await
    }
    async fn commit(&self, _: &BranchContext, payload: &[u8]) -> Result<(), HandlerError> {
        self.phase_two(payload).await
    }
    async fn rollback(&self, _: &BranchContext, payload: &[u8]) -> Result<(), HandlerError> {
        self.phase_two(payload).await
    }
}

impl Tcc for Told {
    async fn try_(&self, _: &BranchContext, payload: &[u8]) -> Result<Vote, HandlerError> {
        self.phase_one(payload).await
    }
    async fn confirm(&self, _: &BranchContext, payload: &[u8]) -> Result<(), HandlerError> {
        self.phase_two(payload).await
    }
    async fn cancel(&self, _: &BranchContext, payload: &[u8]) -> Result<(), HandlerError> {
        self.phase_two(payload).await
    }
}

/// One sample of the text format: metric name and labels.
type Series = (String, BTreeMap<String, String>);

/// Every sample in `text` (OpenMetrics, as `encode` writes it).
fn samples(text: &str) -> HashMap<Series, f64> {
    let mut out = HashMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = line.rsplit_once(' ').expect("a sample line");
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (name, rest.strip_suffix('}').expect("closing brace")),
            None => (series, ""),
        };
        let labels = labels
            .split(',')
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (k, v) = l.split_once('=').expect("label=value");
                (k.to_string(), v.trim_matches('"').to_string())
            })
            .collect();
        out.insert((name.to_string(), labels), value.parse().expect("a number"));
    }
    out
}

/// The samples of metric `name`, as label values in `keys`' order → value.
fn family(all: &HashMap<Series, f64>, name: &str, keys: &[&str]) -> BTreeMap<Vec<String>, f64> {
    all.iter()
        .filter(|((n, _), _)| n == name)
        .map(|((_, labels), v)| {
            assert_eq!(labels.len(), keys.len(), "{name} labels {labels:?}");
            (keys.iter().map(|k| labels[*k].clone()).collect(), *v)
        })
        .collect()
}

/// `[(label values..., value)]` as [`family`] returns them.
fn expect(rows: &[(&[&str], f64)]) -> BTreeMap<Vec<String>, f64> {
    rows.iter()
        .map(|(k, v)| (k.iter().map(|s| s.to_string()).collect(), *v))
        .collect()
}

/// The call's error code; `None` for success.
fn code<T>(answer: Result<tonic::Response<T>, tonic::Status>) -> Option<tonic::Code> {
    answer.err().map(|e| e.code())
}

/// Whether a phase-one call voted yes.
fn yes(answer: Result<tonic::Response<VoteResponse>, tonic::Status>) -> bool {
    answer.expect("a vote").into_inner().yes
}

fn req(gtid: Uuid, resource: &str, payload: &str) -> BranchRequest {
    BranchRequest {
        gtid: gtid.to_string(),
        branch_id: 1,
        resource: resource.into(),
        payload: payload.to_string().into(),
        attempt: 1,
        epoch: 1,
        mode: 0,
    }
}

/// Drives a participant serving 2PC resource `ledger` and TCC resource
/// `wallet` over `store`, then checks every counter and histogram count.
async fn disorder_is_counted(store: impl BarrierStore) {
    let told = Arc::new(Told::default());
    let metrics = ParticipantMetrics::new();
    let p = spawn(
        ParticipantServer::new()
            .barrier(store)
            .two_phase("ledger", told.clone())
            .tcc("wallet", told.clone())
            .with_metrics(metrics.clone()),
    )
    .await;
    let mut d: ParticipantClient<Channel> =
        ParticipantClient::connect(p.url()).await.expect("connect");

    // 2PC, resource "ledger".
    let g1 = Uuid::now_v7(); // prepared, committed, committed again (duplicate)
    assert!(yes(d.prepare(req(g1, "ledger", "x")).await));
    assert_eq!(code(d.commit(req(g1, "ledger", "x")).await), None);
    assert_eq!(code(d.commit(req(g1, "ledger", "x")).await), None);
    let g2 = Uuid::now_v7(); // rolled back before its prepare (empty), then the late prepare
    assert_eq!(code(d.rollback(req(g2, "ledger", "x")).await), None);
    assert!(!yes(d.prepare(req(g2, "ledger", "x")).await));
    let g3 = Uuid::now_v7(); // votes no, then rolled back (nothing held: not run)
    assert!(!yes(d.prepare(req(g3, "ledger", "no")).await));
    assert_eq!(code(d.rollback(req(g3, "ledger", "no")).await), None);
    let g4 = Uuid::now_v7(); // a commit that fails once, then succeeds
    assert!(yes(d.prepare(req(g4, "ledger", "x")).await));
    assert_eq!(
        code(d.commit(req(g4, "ledger", "fail")).await),
        Some(tonic::Code::Unavailable)
    );
    assert_eq!(code(d.commit(req(g4, "ledger", "x")).await), None);
    let g5 = Uuid::now_v7(); // a commit with no prepare: refused
    assert_eq!(
        code(d.commit(req(g5, "ledger", "x")).await),
        Some(tonic::Code::FailedPrecondition)
    );
    let g6 = Uuid::now_v7(); // a prepare whose handler panics
    assert_eq!(
        code(d.prepare(req(g6, "ledger", "panic")).await),
        Some(tonic::Code::Internal)
    );

    // TCC, resource "wallet".
    let t1 = Uuid::now_v7(); // tried, cancelled twice, then a late repeat of the try
    assert!(yes(d.r#try(req(t1, "wallet", "x")).await));
    assert_eq!(code(d.cancel(req(t1, "wallet", "x")).await), None);
    assert_eq!(code(d.cancel(req(t1, "wallet", "x")).await), None);
    assert!(!yes(d.r#try(req(t1, "wallet", "x")).await));
    let t2 = Uuid::now_v7(); // cancelled before the try (empty), twice, then the hanging try
    assert_eq!(code(d.cancel(req(t2, "wallet", "x")).await), None);
    assert_eq!(code(d.cancel(req(t2, "wallet", "x")).await), None);
    assert!(!yes(d.r#try(req(t2, "wallet", "x")).await));
    let t3 = Uuid::now_v7(); // tried, confirmed three times, tried again
    assert!(yes(d.r#try(req(t3, "wallet", "x")).await));
    for _ in 0..3 {
        assert_eq!(code(d.confirm(req(t3, "wallet", "x")).await), None);
    }
    assert!(!yes(d.r#try(req(t3, "wallet", "x")).await));

    // The handler ran 4 + 2 phase-one calls (g1, g3, g4, g6's panic; t1,
    // t3) and 3 + 2 phase-two calls (g1, g4 twice; t1, t3).
    assert_eq!(told.phase_one.load(Ordering::SeqCst), 6);
    assert_eq!(told.phase_two.load(Ordering::SeqCst), 5);

    let all = samples(&metrics.encode());
    let calls = family(
        &all,
        "tandem_participant_handler_calls_total",
        &["resource", "phase", "result"],
    );
    assert_eq!(
        calls,
        expect(&[
            (&["ledger", "prepare", "ok"], 2.0),       // g1, g4
            (&["ledger", "prepare", "no"], 1.0),       // g3
            (&["ledger", "prepare", "refused"], 1.0),  // g2's late prepare
            (&["ledger", "prepare", "failed"], 1.0),   // g6 panicked
            (&["ledger", "commit", "ok"], 2.0),        // g1, g4
            (&["ledger", "commit", "skipped"], 1.0),   // g1's repeat
            (&["ledger", "commit", "failed"], 1.0),    // g4's first
            (&["ledger", "commit", "refused"], 1.0),   // g5
            (&["ledger", "rollback", "skipped"], 2.0), // g2 (empty), g3 (after no)
            (&["wallet", "try", "ok"], 2.0),           // t1, t3
            (&["wallet", "try", "refused"], 3.0),      // t1 late, t2 hanging, t3 repeat
            (&["wallet", "cancel", "ok"], 1.0),        // t1
            (&["wallet", "cancel", "skipped"], 3.0),   // t1 repeat, t2 empty, t2 repeat
            (&["wallet", "confirm", "ok"], 1.0),       // t3
            (&["wallet", "confirm", "skipped"], 2.0),  // t3 repeats
        ])
    );
    let outcomes = family(
        &all,
        "tandem_participant_barrier_outcomes_total",
        &["resource", "outcome"],
    );
    assert_eq!(
        outcomes,
        expect(&[
            (&["ledger", "duplicate"], 1.0),           // g1's second commit
            (&["ledger", "empty_rollback"], 1.0),      // g2
            (&["ledger", "hanging_try_refused"], 1.0), // g2's late prepare
            (&["wallet", "duplicate"], 5.0), // t1 cancel, t2 cancel, t3 confirm x2, t3 try
            (&["wallet", "empty_rollback"], 1.0), // t2
            (&["wallet", "hanging_try_refused"], 2.0), // t1's and t2's late tries
        ])
    );
    // Observed once per handler run that returned (not g6's panic).
    let counts = family(
        &all,
        "tandem_participant_handler_seconds_count",
        &["resource", "phase"],
    );
    assert_eq!(
        counts,
        expect(&[
            (&["ledger", "prepare"], 3.0),
            (&["ledger", "commit"], 3.0),
            (&["wallet", "try"], 2.0),
            (&["wallet", "cancel"], 1.0),
            (&["wallet", "confirm"], 1.0),
        ])
    );
    for ((name, labels), value) in &all {
        if name == "tandem_participant_handler_seconds_sum" {
            // Every handler slept for a millisecond.
            let runs = counts[&vec![labels["resource"].clone(), labels["phase"].clone()]];
            assert!(*value >= runs * 0.001, "{labels:?} sum {value}");
        }
        if name == "tandem_participant_handler_seconds_bucket" && labels["le"] == "+Inf" {
            let key = vec![labels["resource"].clone(), labels["phase"].clone()];
            assert_eq!(*value, counts[&key], "+Inf bucket of {key:?}");
        }
    }
    p.shutdown().await.expect("shutdown");
}

// Rule: every call is counted once, by the handler's result when it ran and
// by the barrier's answer when it did not; duplicates, empty rollbacks and
// refused hanging tries are counted as barrier outcomes. In memory.
#[tokio::test]
async fn barrier_outcomes_and_handler_calls_are_counted_in_memory() {
    disorder_is_counted(MemBarrier::new()).await;
}

// The same on sled.
#[tokio::test]
async fn barrier_outcomes_and_handler_calls_are_counted_on_sled() {
    let dir = tempfile::tempdir().expect("tempdir");
    let barrier = SledBarrier::open(dir.path()).expect("open sled barrier");
    disorder_is_counted(barrier).await;
}

// The same on PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn barrier_outcomes_and_handler_calls_are_counted_on_postgres() {
    let pg = PgServer::start();
    pg.create_database("metrics").await;
    let barrier = PgBarrier::open(pg.pool("metrics")).await.expect("open");
    disorder_is_counted(barrier).await;
}

// Rule: a transaction committed through a real coordinator shows as one
// timed, successful call per branch and phase, and no barrier outcome.
#[tokio::test]
async fn a_committed_transaction_counts_its_calls() {
    let coord = start_coordinator(Arc::new(MemLog::new())).await;
    let metrics = ParticipantMetrics::new();
    let told = Arc::new(Told::default());
    let p = spawn(
        ParticipantServer::new()
            .tcc("wallet", told.clone())
            .with_metrics(metrics.clone()),
    )
    .await;
    let client = TransactionClient::connect(coord.url())
        .await
        .expect("client");
    client
        .submit(
            Mode::Tcc,
            vec![
                Branch::new(p.url(), "wallet", "a"),
                Branch::new(p.url(), "wallet", "b"),
            ],
        )
        .await
        .expect("committed");
    let confirmed = |m: &ParticipantMetrics| {
        samples(&m.encode())
            .get(&(
                "tandem_participant_handler_calls_total".to_string(),
                [
                    ("resource", "wallet"),
                    ("phase", "confirm"),
                    ("result", "ok"),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ))
            .copied()
    };
    eventually("both confirms counted", || confirmed(&metrics) == Some(2.0)).await;

    let all = samples(&metrics.encode());
    assert_eq!(
        family(
            &all,
            "tandem_participant_handler_calls_total",
            &["resource", "phase", "result"]
        ),
        expect(&[
            (&["wallet", "try", "ok"], 2.0),
            (&["wallet", "confirm", "ok"], 2.0),
        ])
    );
    assert_eq!(
        family(
            &all,
            "tandem_participant_handler_seconds_count",
            &["resource", "phase"]
        ),
        expect(&[(&["wallet", "try"], 2.0), (&["wallet", "confirm"], 2.0)])
    );
    assert!(
        family(
            &all,
            "tandem_participant_barrier_outcomes_total",
            &["resource", "outcome"]
        )
        .is_empty()
    );
    p.shutdown().await.expect("shutdown");
}

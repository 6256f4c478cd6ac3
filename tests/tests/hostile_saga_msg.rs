//! Hostile input to transactional messages and sagas: PrepareMessage,
//! SubmitMessage, saga Submit with `after`, Enlist of a message branch,
//! hostile text as `tandem tx` shows it, an aborted step's next attempt,
//! and the resource label's bound in /metrics, against a real `tandem
//! serve`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tandem_proto::v1 as pb;
use tandem_proto::v1::coordinator_client::CoordinatorClient;
use tandem_sdk::{
    BranchContext, HandlerError, Message, MessageCheck, ParticipantServer, Saga, Vote,
};
use tandem_tests::process::{Serve, tandem};
use tandem_tests::spawn;

#[derive(Default)]
struct H {
    delivered: AtomicUsize,
    checked: AtomicUsize,
    actions: AtomicUsize,
}

impl Message for H {
    async fn deliver(&self, _: &BranchContext, _: &[u8]) -> Result<(), HandlerError> {
        self.delivered.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}
impl MessageCheck for H {
    async fn check(&self, _: &BranchContext, _: &[u8]) -> Result<bool, HandlerError> {
        self.checked.fetch_add(1, Ordering::SeqCst);
        Ok(true)
    }
}
impl Saga for H {
    async fn action(&self, _: &BranchContext, _: &[u8]) -> Result<Vote, HandlerError> {
        self.actions.fetch_add(1, Ordering::SeqCst);
        Ok(Vote::yes())
    }
    async fn compensate(&self, _: &BranchContext, _: &[u8]) -> Result<(), HandlerError> {
        Ok(())
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    serve: Serve,
    admin: String,
    part: tandem_sdk::RunningParticipant,
    h: Arc<H>,
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("dir");
    let (serve, admin) =
        Serve::start_with_admin(&dir.path().join("data"), &["--retry-max", "200ms"], &[]);
    let h = Arc::new(H::default());
    let part = spawn(
        ParticipantServer::new()
            .message("inbox", h.clone())
            .check("orders", h.clone())
            .saga("s", h.clone()),
    )
    .await;
    Setup {
        _dir: dir,
        serve,
        admin,
        part,
        h,
    }
}

async fn coord(s: &Setup) -> CoordinatorClient<tandem_sdk::Channel> {
    CoordinatorClient::connect(s.serve.url.clone())
        .await
        .expect("connect")
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

fn spec(endpoint: &str, resource: &str) -> pb::BranchSpec {
    pb::BranchSpec {
        endpoint: endpoint.into(),
        resource: resource.into(),
        payload: b"x".to_vec().into(),
        mode: 0,
        after: vec![],
    }
}

fn prepare(
    gtid: &str,
    check: pb::BranchSpec,
    deliveries: Vec<pb::BranchSpec>,
) -> pb::PrepareMessageRequest {
    pb::PrepareMessageRequest {
        gtid: gtid.into(),
        check: Some(check),
        branches: deliveries,
        timeout_ms: 60_000,
        labels: Default::default(),
    }
}

fn saga(steps: Vec<pb::BranchSpec>) -> pb::SubmitRequest {
    pb::SubmitRequest {
        mode: pb::Mode::Saga as i32,
        timeout_ms: 0,
        branches: steps,
        gtid: String::new(),
        labels: Default::default(),
    }
}

/// INVALID_ARGUMENT with a short message.
fn refused<T>(what: &str, r: Result<tonic::Response<T>, tonic::Status>) {
    match r {
        Ok(_) => panic!("{what}: accepted"),
        Err(s) => {
            assert_eq!(s.code(), tonic::Code::InvalidArgument, "{what}: {s:?}");
            assert!(
                s.message().len() <= 1024,
                "{what}: {} bytes of status",
                s.message().len()
            );
            assert!(!s.message().is_empty(), "{what}");
        }
    }
}

fn v7() -> String {
    uuid::Uuid::now_v7().to_string()
}

// Rule (DESIGN "Transactional messages", Nothing mixes): a message branch
// in another transaction is INVALID_ARGUMENT. Submit refuses it; Enlist
// must too. Here a 2PC transaction enlists a MODE_MSG branch: the
// coordinator calls the participant's Check as its prepare and Deliver as
// its commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enlist_refuses_a_message_branch() {
    let s = setup().await;
    let mut c = coord(&s).await;
    let url = s.part.url();
    for mode in [pb::Mode::TwoPhase, pb::Mode::Tcc] {
        let gtid = c
            .begin(pb::BeginRequest {
                mode: mode as i32,
                timeout_ms: 0,
                gtid: String::new(),
                labels: Default::default(),
            })
            .await
            .expect("begin")
            .into_inner()
            .gtid;
        let mut b = spec(&url, "orders");
        b.mode = pb::Mode::Msg as i32;
        let r = c
            .enlist(pb::EnlistRequest {
                gtid: gtid.clone(),
                branch: Some(b),
            })
            .await;
        eprintln!(
            "{mode:?}: enlist MODE_MSG branch -> {:?}; checks run at the participant: {}",
            r.as_ref()
                .map(|_| ())
                .map_err(|e| (e.code(), e.message().to_string())),
            s.h.checked.load(Ordering::SeqCst)
        );
        if r.is_ok() {
            let commit = c.commit(pb::CommitRequest { gtid: gtid.clone() }).await;
            eprintln!(
                "  commit -> {:?}",
                commit
                    .as_ref()
                    .map(|r| r.get_ref().state)
                    .map_err(|e| e.code())
            );
        }
        refused(&format!("{mode:?} enlist of a MODE_MSG branch"), r);
    }
    assert_eq!(
        s.h.checked.load(Ordering::SeqCst),
        0,
        "Check ran as a 2PC/TCC prepare"
    );
}

// Hostile gtids, resources, payloads, `after` lists and delivery counts on
// the new RPCs: INVALID_ARGUMENT, bounded status text, nothing called.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_message_and_saga_requests_are_refused() {
    let s = setup().await;
    let mut c = coord(&s).await;
    let url = s.part.url();
    let check = || spec(&url, "orders");
    let inbox = || spec(&url, "inbox");

    // gtids.
    let huge = "g".repeat(3 << 20);
    let future = {
        // A v7 a day ahead.
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
            + 86_400_000;
        let ts = uuid::Timestamp::from_unix(
            uuid::NoContext,
            ms / 1000,
            ((ms % 1000) * 1_000_000) as u32,
        );
        uuid::Uuid::new_v7(ts).to_string()
    };
    for (what, g) in [
        ("empty", String::new()),
        ("3 MiB", huge.clone()),
        ("control chars", "\u{1b}[31m\u{0}".to_string()),
        ("nil", uuid::Uuid::nil().to_string()),
        ("v4", "0b7c1c4e-9a8b-4c3d-8e2f-1a2b3c4d5e6f".to_string()),
        ("max", uuid::Uuid::max().to_string()),
        ("a day ahead", future),
    ] {
        refused(
            &format!("prepare, gtid {what}"),
            c.prepare_message(prepare(&g, check(), vec![inbox()])).await,
        );
    }
    for (what, g) in [("empty", String::new()), ("3 MiB", huge.clone())] {
        refused(
            &format!("submit message, gtid {what}"),
            c.submit_message(pb::SubmitMessageRequest { gtid: g }).await,
        );
    }

    // Resources, endpoints, payloads.
    let mut empty = check();
    empty.resource = String::new();
    let mut long = check();
    long.resource = "r".repeat(257);
    let mut no_endpoint = inbox();
    no_endpoint.endpoint = String::new();
    let mut bad_scheme = inbox();
    bad_scheme.endpoint = "file:///etc/passwd".into();
    let mut big = inbox();
    big.payload = vec![0u8; (1 << 20) + 1].into();
    let mut with_mode = check();
    with_mode.mode = pb::Mode::Tcc as i32;
    let mut with_after = inbox();
    with_after.after = vec![1];
    let mut bad_mode = inbox();
    bad_mode.mode = 99;
    for (what, chk, del) in [
        ("empty check resource", empty.clone(), vec![inbox()]),
        ("long check resource", long.clone(), vec![inbox()]),
        ("empty delivery resource", check(), vec![empty.clone()]),
        ("long delivery resource", check(), vec![long.clone()]),
        ("no endpoint", check(), vec![no_endpoint]),
        ("file endpoint", check(), vec![bad_scheme]),
        ("payload over 1 MiB", check(), vec![big.clone()]),
        ("check with a mode", with_mode, vec![inbox()]),
        ("delivery with after", check(), vec![with_after]),
        ("unknown mode number", check(), vec![bad_mode]),
        ("no delivery", check(), vec![]),
        (
            "1000 deliveries",
            check(),
            (0..1000).map(|_| inbox()).collect(),
        ),
        (
            "64 deliveries (65 with the check)",
            check(),
            (0..64).map(|_| inbox()).collect(),
        ),
    ] {
        refused(
            &format!("prepare: {what}"),
            c.prepare_message(prepare(&v7(), chk, del)).await,
        );
    }
    // At the limits: accepted.
    let mut at = inbox();
    at.payload = vec![0u8; 1 << 20].into();
    let mut r256 = check();
    r256.resource = "r".repeat(256);
    c.prepare_message(prepare(&v7(), check(), vec![at]))
        .await
        .expect("1 MiB payload");
    c.prepare_message(prepare(&v7(), check(), (0..63).map(|_| inbox()).collect()))
        .await
        .expect("63 deliveries");

    // `after` lists.
    let step = |after: Vec<u32>| {
        let mut b = spec(&url, "s");
        b.after = after;
        b
    };
    for (what, steps) in [
        ("after 0", vec![step(vec![]), step(vec![0])]),
        ("after itself", vec![step(vec![]), step(vec![2])]),
        ("after a later step", vec![step(vec![2]), step(vec![])]),
        ("after u32::MAX", vec![step(vec![]), step(vec![u32::MAX])]),
        ("65 names", vec![step(vec![]), step(vec![1; 65])]),
        (
            "a million names",
            vec![step(vec![]), step(vec![1; 1_000_000])],
        ),
        ("65 steps", (0..65).map(|_| step(vec![])).collect()),
    ] {
        refused(&format!("saga: {what}"), c.submit(saga(steps)).await);
    }
    let before = s.h.actions.load(Ordering::SeqCst);
    assert_eq!(before, 0, "a refused saga ran a step");
    // Repeats are folded: accepted, each step runs once.
    let out = c
        .submit(saga(vec![
            step(vec![]),
            step(vec![1; 64]),
            step(vec![1, 2, 1, 2]),
        ]))
        .await
        .expect("repeats accepted")
        .into_inner();
    assert_eq!(out.state, pb::TxState::Committed as i32, "{out:?}");
    assert_eq!(s.h.actions.load(Ordering::SeqCst), 3);
    assert_eq!(s.h.delivered.load(Ordering::SeqCst), 0);
}

// Hostile text (rollback reasons, resource names) is refused at the edge,
// and what `tandem tx show` and `tandem tx list --mode saga|msg` print
// never carries a terminal escape sequence raw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tx_never_prints_client_text_with_terminal_escapes_raw() {
    let s = setup().await;
    let mut c = coord(&s).await;
    let url = s.part.url();
    let esc = "\u{1b}]0;owned\u{7}\u{1b}[2J\u{1b}[31mFAKE: transaction COMMITTED\u{1b}[0m";
    // A message whose check resource carries escapes, dropped with a
    // reason carrying escapes.
    let g = v7();
    let mut chk = spec(&url, esc);
    chk.payload = b"".to_vec().into();
    let prep = c
        .prepare_message(prepare(&g, chk, vec![spec(&url, "inbox")]))
        .await;
    eprintln!(
        "prepare with an escape in the check resource: {:?}",
        prep.as_ref().map(drop).map_err(|e| e.code())
    );
    let rb = c
        .rollback(pb::RollbackRequest {
            gtid: g.clone(),
            reason: esc.into(),
        })
        .await;
    eprintln!(
        "rollback with an escape in the reason: {:?}",
        rb.as_ref().map(drop).map_err(|e| e.code())
    );
    // A saga step with escapes in its resource (the participant says
    // NOT_FOUND: forward retried until the deadline aborts it).
    let mut sg = saga(vec![spec(&url, esc)]);
    sg.timeout_ms = 500;
    let sr = c.submit(sg).await;
    eprintln!(
        "saga with an escape in the step resource: {:?}",
        sr.as_ref().map(|r| r.get_ref().state).map_err(|e| e.code())
    );

    let show = tandem(&["tx", "--coordinator", &s.serve.url, "show", &g]);
    let list = tandem(&[
        "tx",
        "--coordinator",
        &s.serve.url,
        "list",
        "--mode",
        "saga",
    ]);
    let listm = tandem(&["tx", "--coordinator", &s.serve.url, "list", "--mode", "msg"]);
    eprintln!("tx show: {:?}", show.stdout);
    eprintln!("tx list --mode saga: {:?}", list.stdout);
    eprintln!("tx list --mode msg: {:?}", listm.stdout);
    let raw = |t: &str| t.contains('\u{1b}') || t.contains('\u{7}');
    assert!(
        !raw(&show.stdout) && !raw(&list.stdout) && !raw(&listm.stdout),
        "tandem tx printed a client's terminal escape sequence raw"
    );
}

// Metrics: resource names a client picks for saga steps and message
// checks stay within the label bound (64 names, then `other`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_resource_labels_stay_bounded_for_sagas_and_messages() {
    let s = setup().await;
    let c = coord(&s).await;
    let url = s.part.url();
    let mut tasks = Vec::new();
    for i in 0..100 {
        let (mut c, url) = (c.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let mut sg = saga(vec![spec(&url, &format!("saga-{i}\"\n\\"))]);
            sg.timeout_ms = 300;
            let _ = c.submit(sg).await;
            // A message whose check is at an unknown resource, checked at once.
            let mut p = prepare(
                &v7(),
                spec(&url, &format!("check-{i}")),
                vec![spec(&url, "inbox")],
            );
            p.timeout_ms = 1;
            let _ = c.prepare_message(p).await;
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let body = reqwest_get(&format!("http://{}/metrics", s.admin)).await;
    let mut resources = std::collections::BTreeSet::new();
    for line in body.lines().filter(|l| l.contains("resource=\"")) {
        let start = line.find("resource=\"").unwrap() + 10;
        let rest = &line[start..];
        // Up to the next unescaped quote.
        let mut end = 0;
        let b = rest.as_bytes();
        while end < b.len() && !(b[end] == b'"' && (end == 0 || b[end - 1] != b'\\')) {
            end += 1;
        }
        resources.insert(rest[..end].to_string());
    }
    eprintln!("{} distinct resource label values", resources.len());
    assert!(resources.len() <= 65, "{} resource labels", resources.len());
    assert!(
        body.lines()
            .all(|l| l.is_empty() || l.starts_with('#') || l.split_whitespace().count() >= 2)
    );
}

/// A GET over a raw TCP connection (HTTP/1.1, no client crate in this
/// workspace's tests).
async fn reqwest_get(url: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").expect("http");
    let (host, path) = rest.split_once('/').expect("path");
    let mut conn = tokio::net::TcpStream::connect(host).await.expect("connect");
    conn.write_all(
        format!("GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .expect("write");
    let mut out = Vec::new();
    conn.read_to_end(&mut out).await.expect("read");
    String::from_utf8_lossy(&out).into_owned()
}

// Display: a saga step whose action was forward-retried (participant
// unreachable) and then settled without a call at the deadline's abort
// keeps its next attempt time: the finished record (tandem tx show, the
// console's "Next attempt") announces a retry that never comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_saga_step_shows_no_next_attempt() {
    let s = setup().await;
    let mut c = coord(&s).await;
    let mut sg = saga(vec![spec("http://127.0.0.1:1", "s")]);
    sg.timeout_ms = 1500;
    let out = c.submit(sg).await.expect("submit").into_inner();
    let mut info = None;
    for _ in 0..50 {
        let t = c
            .get_transaction(pb::GetTransactionRequest {
                gtid: out.gtid.clone(),
            })
            .await
            .expect("get")
            .into_inner();
        if t.state == pb::TxState::Aborted as i32 {
            info = Some(t);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let t = info.expect("aborted");
    let b = &t.branches[0];
    eprintln!(
        "step state {:?}, attempts {}, next_attempt_at_ms {}",
        b.state(),
        b.attempts,
        b.next_attempt_at_ms
    );
    assert_eq!(
        b.next_attempt_at_ms, 0,
        "a finished saga's step announces a next attempt"
    );
}

//! The business client's ambiguous errors (no answer: the outcome is
//! unknown to the caller) name the transaction they were about, so the
//! advice they give ("ask the coordinator with gtid X") can be followed.
//! One rule per test.

use std::sync::Arc;
use std::time::Duration;

use tandem_coordinator::log::MemLog;
use tandem_sdk::{Branch, Error, Gtid, Mode, TransactionClient};
use tandem_tests::{Script, Scripted, start_coordinator};
use tonic::transport::Endpoint;

/// A client whose calls give up after 100 ms.
async fn hurried_client(url: &str) -> TransactionClient {
    let channel = Endpoint::from_shared(url.to_string())
        .expect("url")
        .timeout(Duration::from_millis(100))
        .connect()
        .await
        .expect("connect");
    TransactionClient::from_channel(channel)
}

fn assert_names(err: &Error, gtid: Gtid) {
    let text = err.to_string();
    assert!(
        text.contains(&format!("ask the coordinator with gtid {gtid}")),
        "{text}"
    );
}

// Rule: a call about a known gtid that gets no answer in time (Submit with
// a client-chosen gtid, Enlist) is TimedOut naming that gtid.
#[tokio::test]
async fn a_timed_out_call_names_its_gtid() {
    let coord = start_coordinator(Arc::new(MemLog::new())).await;
    let slow = Scripted::new(
        "slow",
        Script {
            prepare_delay: Duration::from_millis(400),
            ..Script::default()
        },
        None,
    );
    let p = slow.serve().await;
    let client = hurried_client(&coord.url()).await;

    let gtid = Gtid::now_v7();
    let branch = Branch::new(p.url(), "r", "x");
    let err = client
        .submit_as(gtid, Mode::TwoPhase, vec![branch.clone()], None)
        .await
        .expect_err("the prepare outlasts the client's deadline");
    match &err {
        Error::TimedOut { gtid: g, .. } => assert_eq!(*g, Some(gtid)),
        e => panic!("expected TimedOut, got {e:?}"),
    }
    assert_names(&err, gtid);

    let patient = TransactionClient::connect(coord.url()).await.unwrap();
    let gtid = patient.begin(Mode::TwoPhase).await.unwrap();
    let err = client
        .enlist(gtid, branch)
        .await
        .expect_err("the prepare outlasts the client's deadline");
    match &err {
        Error::TimedOut { gtid: g, .. } => assert_eq!(*g, Some(gtid)),
        e => panic!("expected TimedOut, got {e:?}"),
    }
    assert_names(&err, gtid);
}

// Rule: a call about a known gtid that cannot reach the coordinator
// (Commit, Rollback, Enlist, Submit with a chosen gtid) is Unavailable
// naming that gtid.
#[tokio::test]
async fn an_unavailable_coordinator_error_names_the_gtid() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    }; // closed again: nothing listens there
    let channel = Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect_lazy();
    let client = TransactionClient::from_channel(channel);
    let gtid = Gtid::now_v7();

    let errors = [
        client.commit(gtid).await.map(drop),
        client.rollback(gtid, "changed my mind").await,
        client
            .enlist(gtid, Branch::new("http://127.0.0.1:1", "r", "x"))
            .await
            .map(drop),
        client
            .submit_as(gtid, Mode::Tcc, vec![], None)
            .await
            .map(drop),
    ];
    for result in errors {
        let err = result.expect_err("nothing listens");
        match &err {
            Error::Unavailable { gtid: g, .. } => assert_eq!(*g, Some(gtid)),
            e => panic!("expected Unavailable, got {e:?}"),
        }
        assert_names(&err, gtid);
    }
}

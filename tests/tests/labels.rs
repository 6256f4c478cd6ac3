//! Finding a transaction: caller labels given to Submit / Begin are kept
//! with the record (across a restart), shown by `tandem tx show`, and
//! filter `tandem tx list` and Admin ListTransactions, with the resource,
//! endpoint, mode and gtid-prefix filters and newest-first order; bad
//! labels are refused naming the key and record nothing. `tandem tx stats`
//! prints the coordinator's counters.

use tandem_proto::v1 as pb;
use tandem_proto::v1::admin_client::AdminClient;
use tandem_sdk::{Branch, Error, Gtid, Mode, ParticipantServer, TransactionClient};
use tandem_tests::process::{Serve, tandem};
use tandem_tests::{Scripted, spawn};

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

fn gtids(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|t| t["gtid"].as_str().expect("gtid").to_string())
        .collect()
}

fn list(url: &str, extra: &[&str]) -> Vec<String> {
    let mut args = vec!["tx", "list", "--output", "json", "--coordinator", url];
    args.extend_from_slice(extra);
    let ran = tandem(&args);
    assert!(ran.ok, "tandem {args:?}: {}", ran.stderr);
    gtids(&json(&ran.stdout))
}

// Rule: labels are part of the record; every filter narrows the list to
// exactly the transactions it names, in the order asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labels_and_filters_find_transactions_across_a_restart() {
    let data = tempfile::tempdir().expect("data dir");
    let serve = Serve::start(data.path());
    let inventory =
        spawn(ParticipantServer::new().two_phase("inventory", Scripted::yes("i"))).await;
    let payments = spawn(ParticipantServer::new().two_phase("payments", Scripted::yes("p"))).await;
    let client = TransactionClient::connect(&serve.url)
        .await
        .expect("connect");

    let inv = |x: &str| Branch::new(inventory.url(), "inventory", x.to_string());
    let pay = |x: &str| Branch::new(payments.url(), "payments", x.to_string());
    let mut made = Vec::new();
    for (i, branches) in [
        vec![inv("a"), pay("a")],
        vec![pay("b")],
        vec![inv("c")],
        vec![pay("d")],
    ]
    .into_iter()
    .enumerate()
    {
        let order = format!("A-{i}");
        let tenant = if i % 2 == 0 { "acme" } else { "globex" };
        let out = client
            .submit_labeled(
                Gtid::now_v7(),
                Mode::TwoPhase,
                branches,
                None,
                &[("order_id", &order), ("tenant", tenant)],
            )
            .await
            .expect("submit");
        made.push(out.gtid.to_string());
    }
    // An interactive one, labelled at Begin.
    let g = client
        .begin_labeled(Gtid::now_v7(), Mode::Tcc, None, &[("order_id", "B-1")])
        .await
        .expect("begin");
    made.push(g.to_string());

    // A bad label: refused, naming the key; nothing recorded.
    let bad = Gtid::now_v7();
    let e = client
        .submit_labeled(
            bad,
            Mode::TwoPhase,
            vec![pay("x")],
            None,
            &[("order id", "1")],
        )
        .await
        .expect_err("a key with a space");
    match &e {
        Error::Invalid { message, .. } => assert!(message.contains("order id"), "{message}"),
        other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
    }
    let too_many: Vec<(String, String)> = (0..9).map(|i| (format!("k{i}"), "v".into())).collect();
    let refs: Vec<(&str, &str)> = too_many
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    client
        .submit_labeled(Gtid::now_v7(), Mode::TwoPhase, vec![pay("x")], None, &refs)
        .await
        .expect_err("nine labels");
    let long = "v".repeat(257);
    client
        .submit_labeled(
            Gtid::now_v7(),
            Mode::TwoPhase,
            vec![pay("x")],
            None,
            &[("k", &long)],
        )
        .await
        .expect_err("a value past 256 bytes");

    let inventory_url = inventory.url();
    let check = |url: &str, restarted: bool| {
        let url = url.to_string();
        let made = made.clone();
        let inventory_url = inventory_url.clone();
        move || {
            assert_eq!(list(&url, &[]), made, "everything, oldest first");
            assert!(
                !list(&url, &[]).contains(&bad.to_string()),
                "the refused one is not recorded"
            );
            let mut newest = made.clone();
            newest.reverse();
            assert_eq!(list(&url, &["--newest-first"]), newest, "newest first");
            assert_eq!(
                list(&url, &["--newest-first", "--limit", "2"]),
                newest[..2],
                "newest first, two"
            );
            assert_eq!(list(&url, &["--label", "order_id=A-2"]), [made[2].clone()]);
            assert_eq!(
                list(&url, &["--label", "tenant=acme"]),
                [made[0].clone(), made[2].clone()]
            );
            assert_eq!(
                list(&url, &["--label", "tenant=acme", "--label", "order_id=A-0"]),
                [made[0].clone()],
                "every label must match"
            );
            assert!(list(&url, &["--label", "tenant=initech"]).is_empty());
            // "What is waiting on inventory?"
            assert_eq!(
                list(&url, &["--resource", "inventory"]),
                [made[0].clone(), made[2].clone()]
            );
            let endpoint = format!("{inventory_url}/");
            assert_eq!(
                list(&url, &["--endpoint", &endpoint]),
                [made[0].clone(), made[2].clone()],
                "endpoint, trailing slash ignored"
            );
            assert_eq!(list(&url, &["--mode", "tcc"]), [made[4].clone()]);
            assert_eq!(
                list(&url, &["--gtid-prefix", &made[3][..30]]),
                [made[3].clone()]
            );
            assert_eq!(
                // Recovery aborts what was ACTIVE at the restart.
                list(
                    &url,
                    &[
                        "--state",
                        if restarted { "aborted" } else { "active" },
                        "--label",
                        "order_id=B-1"
                    ]
                ),
                [made[4].clone()]
            );
            // Shown by `tx show`, as text and JSON.
            let shown = tandem(&["tx", "show", &made[1], "--coordinator", &url]);
            assert!(shown.ok, "{}", shown.stderr);
            assert!(
                shown
                    .stdout
                    .contains("labels     order_id=A-1 tenant=globex"),
                "{}",
                shown.stdout
            );
            let j = tandem(&[
                "tx",
                "show",
                &made[1],
                "--output",
                "json",
                "--coordinator",
                &url,
            ]);
            assert_eq!(json(&j.stdout)["labels"]["order_id"], "A-1");
        }
    };
    tokio::task::spawn_blocking(check(&serve.url, false))
        .await
        .expect("before restart");

    // A restart reads the labels back from the log.
    serve.terminate();
    let serve = Serve::start(data.path());
    tokio::task::spawn_blocking(check(&serve.url, true))
        .await
        .expect("after restart");

    // Bad filters are refused with a clear error.
    let mut admin = AdminClient::connect(serve.url.clone())
        .await
        .expect("admin");
    for req in [
        pb::ListTransactionsRequest {
            gtid_prefix: "zz".into(),
            ..Default::default()
        },
        pb::ListTransactionsRequest {
            resource: "r".repeat(300),
            ..Default::default()
        },
        pb::ListTransactionsRequest {
            labels: [("bad key".to_string(), "v".to_string())].into(),
            ..Default::default()
        },
        pb::ListTransactionsRequest {
            mode: 77,
            ..Default::default()
        },
    ] {
        let e = admin.list_transactions(req).await.expect_err("bad filter");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    }

    // `tandem tx stats`.
    let url = serve.url.clone();
    tokio::task::spawn_blocking(move || {
        let ran = tandem(&["tx", "stats", "--coordinator", &url]);
        assert!(ran.ok, "{}", ran.stderr);
        assert!(ran.stdout.contains("live transactions"), "{}", ran.stdout);
        let j = tandem(&["tx", "stats", "--output", "json", "--coordinator", &url]);
        assert!(j.ok, "{}", j.stderr);
        let v = json(&j.stdout);
        assert!(v["forces"].as_u64().is_some(), "{v}");
        assert!(v["live"].as_u64().is_some(), "{v}");
    })
    .await
    .expect("stats");
}

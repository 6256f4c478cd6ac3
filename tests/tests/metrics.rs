//! `/metrics` on a live `tandem serve`: refused without the admin
//! credential, parses as Prometheus / OpenMetrics text, carries no gtid, and
//! its counters and gauges move as a scripted workload commits, aborts, gets
//! STUCK and is retried to COMMITTED.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use tandem_sdk::{Branch, Mode, ParticipantServer, TransactionClient};
use tandem_tests::access::Access;
use tandem_tests::process::Serve;
use tandem_tests::webdriver::http;
use tandem_tests::{Script, Scripted, eventually, spawn};

/// One scrape: every sample, keyed by `name{labels}` exactly as written.
struct Scrape {
    samples: BTreeMap<String, f64>,
    text: String,
}

impl Scrape {
    /// Parses the text exposition format strictly: `# HELP`, `# TYPE`,
    /// `# UNIT`, a final `# EOF`, and `name{label="value",…} number` lines;
    /// every sample belongs to a family declared by `# TYPE` before it.
    fn parse(text: &str) -> Scrape {
        let mut samples = BTreeMap::new();
        let mut families: Vec<(String, String)> = Vec::new();
        let mut eof = false;
        for line in text.lines() {
            assert!(!eof, "a line after # EOF: {line:?}");
            if line == "# EOF" {
                eof = true;
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
                assert!(
                    ["counter", "gauge", "histogram", "unknown"].contains(&kind),
                    "{line}"
                );
                families.push((name.to_string(), kind.to_string()));
                continue;
            }
            if line.starts_with("# HELP ") || line.starts_with("# UNIT ") {
                continue;
            }
            assert!(!line.starts_with('#'), "unknown comment {line:?}");
            let (series, value) = line.rsplit_once(' ').expect("sample has a value");
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                v => v
                    .parse()
                    .unwrap_or_else(|_| panic!("bad value in {line:?}")),
            };
            let name = series.split('{').next().expect("name");
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
                "bad metric name in {line:?}"
            );
            let labels = &series[name.len()..];
            if !labels.is_empty() {
                assert!(
                    labels.starts_with('{') && labels.ends_with('}'),
                    "bad labels in {line:?}"
                );
                for pair in labels[1..labels.len() - 1].split(',') {
                    let (k, v) = pair.split_once('=').expect("label=value");
                    assert!(!k.is_empty() && v.starts_with('"') && v.ends_with('"'));
                }
            }
            let family = families
                .iter()
                .rev()
                .find(|(f, kind)| {
                    let suffixes: &[&str] = match kind.as_str() {
                        "counter" => &["_total", "_created"],
                        "histogram" => &["_bucket", "_sum", "_count", "_created"],
                        _ => &[""],
                    };
                    suffixes.iter().any(|s| name == format!("{f}{s}"))
                })
                .unwrap_or_else(|| panic!("sample of no declared family: {line:?}"));
            assert!(family.0.starts_with("tandem_"), "{line}");
            samples.insert(series.to_string(), value);
        }
        assert!(eof, "no # EOF at the end");
        Scrape {
            samples,
            text: text.to_string(),
        }
    }

    /// The value of `series` (0 when absent: a family with no sample yet).
    fn get(&self, series: &str) -> f64 {
        self.samples.get(series).copied().unwrap_or(0.0)
    }

    /// The sum over the samples of `name` whose labels include every one
    /// of `labels`.
    fn sum(&self, name: &str, labels: &[&str]) -> f64 {
        self.samples
            .iter()
            .filter(|(s, _)| {
                s.split('{').next() == Some(name) && labels.iter().all(|l| s.contains(l))
            })
            .map(|(_, v)| v)
            .sum()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_with_commits_aborts_and_stuck_transactions() {
    let dir = tempfile::tempdir().expect("dir");
    let access = Access::write(dir.path());
    let (admin_token, client_token) = (access.admin.clone(), access.client.clone());
    let (serve, admin) = Serve::start_with_admin(
        &dir.path().join("data"),
        &[
            "--auth-file",
            &access.path.to_string_lossy(),
            "--retry-max-attempts",
            "2",
            "--retry-initial",
            "50ms",
            "--retry-max",
            "100ms",
        ],
        &[],
    );
    let admin_auth = format!("Bearer {admin_token}");
    let client_auth = format!("Bearer {client_token}");
    let scrape = || {
        let reply = http(
            "GET",
            &admin,
            "/metrics",
            &[("Authorization", admin_auth.as_str())],
            None,
        );
        assert_eq!(reply.status, 200, "{}", reply.body);
        Scrape::parse(&reply.body)
    };

    // No credential, or one without the admin role: refused.
    assert_eq!(http("GET", &admin, "/metrics", &[], None).status, 401);
    let denied = http(
        "GET",
        &admin,
        "/metrics",
        &[("Authorization", client_auth.as_str())],
        None,
    );
    assert_eq!(denied.status, 403, "{}", denied.body);

    // Before any work: every family there, at zero.
    let before = scrape();
    for family in [
        "# TYPE tandem_transactions_started counter",
        "# TYPE tandem_transactions_finished counter",
        "# TYPE tandem_participant_call_seconds histogram",
        "# TYPE tandem_decision_force_seconds histogram",
        "# TYPE tandem_transactions_stuck gauge",
        "# TYPE tandem_transactions_in_doubt gauge",
        "# TYPE tandem_oldest_in_doubt_age_seconds gauge",
        "# TYPE tandem_oldest_stuck_age_seconds gauge",
        "# TYPE tandem_log_forces counter",
        "# TYPE tandem_recovery_backlog gauge",
        "# TYPE tandem_halted gauge",
    ] {
        assert!(
            before.text.contains(family),
            "{family} missing:\n{}",
            before.text
        );
    }
    assert_eq!(before.sum("tandem_transactions_started_total", &[]), 0.0);
    // The known series are there at zero before any transaction.
    assert_eq!(
        before
            .samples
            .get(r#"tandem_transactions_finished_total{mode="2pc",outcome="stuck"}"#),
        Some(&0.0)
    );
    assert_eq!(before.get("tandem_transactions_stuck"), 0.0);
    assert_eq!(before.get("tandem_halted"), 0.0);

    let ok = Scripted::yes("ok");
    let no = Scripted::new(
        "no",
        Script {
            vote_no: Some("insufficient funds".into()),
            ..Script::default()
        },
        None,
    );
    let down = Scripted::phase_two_down("down");
    let p_ok = spawn(ParticipantServer::new().two_phase("accounts", ok.clone())).await;
    let p_tcc = spawn(ParticipantServer::new().tcc("seats", ok.clone())).await;
    let p_no = spawn(ParticipantServer::new().two_phase("ledger", no.clone())).await;
    let p_down = spawn(ParticipantServer::new().two_phase("ledger", down.clone())).await;
    let options = access.client_options();
    let client = TransactionClient::connect_with(serve.url.clone(), &options)
        .await
        .expect("connect");

    // Three 2PC commits, one TCC commit, one abort, one STUCK.
    for n in 0..3 {
        let done = client
            .submit(
                Mode::TwoPhase,
                vec![Branch::new(p_ok.url(), "accounts", format!("debit {n}"))],
            )
            .await
            .expect("submit");
        assert!(done.complete);
    }
    let done = client
        .submit(Mode::Tcc, vec![Branch::new(p_tcc.url(), "seats", "hold 1")])
        .await
        .expect("tcc submit");
    assert!(done.complete);
    let _ = client
        .submit(
            Mode::TwoPhase,
            vec![
                Branch::new(p_ok.url(), "accounts", "debit"),
                Branch::new(p_no.url(), "ledger", "credit"),
            ],
        )
        .await;
    let stuck = client
        .submit(
            Mode::TwoPhase,
            vec![
                Branch::new(p_ok.url(), "accounts", "debit"),
                Branch::new(p_down.url(), "ledger", "credit"),
            ],
        )
        .await
        .expect("submit")
        .gtid
        .to_string();

    let stuck_series = r#"tandem_transactions_finished_total{mode="2pc",outcome="stuck"}"#;
    // Gauges are read from a head count reused for up to a second.
    eventually("the STUCK transaction counted", || {
        let m = scrape();
        m.get(stuck_series) == 1.0 && m.get("tandem_transactions_stuck") == 1.0
    })
    .await;
    let m = scrape();
    assert!(!m.text.contains(&stuck), "a gtid in the metrics");
    assert_eq!(
        m.get(r#"tandem_transactions_started_total{mode="2pc"}"#),
        5.0
    );
    assert_eq!(
        m.get(r#"tandem_transactions_started_total{mode="tcc"}"#),
        1.0
    );
    assert_eq!(
        m.get(r#"tandem_transactions_finished_total{mode="2pc",outcome="committed"}"#),
        3.0
    );
    assert_eq!(
        m.get(r#"tandem_transactions_finished_total{mode="tcc",outcome="committed"}"#),
        1.0
    );
    assert_eq!(
        m.get(r#"tandem_transactions_finished_total{mode="2pc",outcome="aborted"}"#),
        1.0
    );
    assert_eq!(m.get("tandem_transactions_stuck"), 1.0);
    assert!(m.get("tandem_oldest_stuck_age_seconds") >= 0.0);
    // Participant calls by resource, phase and result.
    assert_eq!(
        m.sum(
            "tandem_participant_calls_total",
            &[
                r#"resource="ledger""#,
                r#"phase="commit""#,
                r#"result="failed""#
            ]
        ),
        2.0,
        "{}",
        m.text
    );
    assert_eq!(
        m.sum(
            "tandem_participant_calls_total",
            &[
                r#"resource="ledger""#,
                r#"phase="prepare""#,
                r#"result="no""#
            ]
        ),
        1.0
    );
    assert_eq!(
        m.sum(
            "tandem_participant_calls_total",
            &[
                r#"resource="seats""#,
                r#"phase="confirm""#,
                r#"result="ok""#
            ]
        ),
        1.0
    );
    assert!(m.get("tandem_phase_two_retries_total") >= 1.0);
    // Five decisions made durable (four commits, the STUCK one's commit);
    // the abort needs no force before its rollbacks.
    assert!(
        m.get("tandem_decision_force_seconds_count") >= 5.0,
        "{}",
        m.text
    );
    assert!(m.get("tandem_log_forces_total") >= 5.0);
    assert!(m.get("tandem_log_flushes_total") >= 1.0);
    assert!(m.sum("tandem_participant_call_seconds_count", &[]) >= 10.0);
    assert_eq!(m.get("tandem_halted"), 0.0);

    // The participant is back; a retry from the console API commits it.
    down.script.phase_two_failures.store(0, Ordering::SeqCst);
    let retried = http(
        "POST",
        &admin,
        &format!("/api/transactions/{stuck}/retry"),
        &[("Authorization", admin_auth.as_str())],
        None,
    );
    assert_eq!(retried.status, 200, "{}", retried.body);
    eventually("the retried transaction counted as committed", || {
        let m = scrape();
        m.get(r#"tandem_transactions_finished_total{mode="2pc",outcome="committed"}"#) == 4.0
            && m.get("tandem_transactions_stuck") == 0.0
    })
    .await;
    let after = scrape();
    assert_eq!(after.get("tandem_transactions_stuck"), 0.0);
    assert_eq!(after.get("tandem_transactions_in_doubt"), 0.0);
    assert_eq!(after.get("tandem_oldest_stuck_age_seconds"), 0.0);
    assert_eq!(
        after.sum(
            "tandem_participant_calls_total",
            &[
                r#"resource="ledger""#,
                r#"phase="commit""#,
                r#"result="ok""#
            ]
        ),
        1.0
    );
    // Counters never go down between scrapes.
    for (series, value) in &m.samples {
        if series.contains("_total") {
            assert!(after.get(series) >= *value, "{series} went down");
        }
    }
    drop(serve);
}

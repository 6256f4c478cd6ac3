//! The web console in a real browser: headless Chromium, driven over
//! WebDriver by chromedriver, against a live `tandem serve` with an access
//! file. It signs in with the admin token, lists transactions, filters
//! STUCK, opens one, retries it once its participant is back and sees it
//! COMMITTED; a token without the admin role is refused, in the browser and
//! on the HTTP API. Screenshots go to `target/console-screenshots/` (and to
//! `docs/images/console-*.png` with `TANDEM_UPDATE_SCREENSHOTS=1`).

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::json;
use tandem_sdk::ParticipantServer;
use tandem_sdk::{Branch, Mode, TransactionClient};
use tandem_tests::access::Access;
use tandem_tests::process::{Serve, workspace_bin};
use tandem_tests::webdriver::{Browser, Driver, http};
use tandem_tests::{Script, Scripted, eventually, spawn};

fn screenshots_dir() -> PathBuf {
    let bin = workspace_bin("tandem");
    let dir = bin
        .parent()
        .and_then(|d| d.parent())
        .expect("target dir")
        .join("console-screenshots");
    std::fs::create_dir_all(&dir).expect("screenshot dir");
    dir
}

/// Takes a screenshot named `name` (and copies it into docs/images when
/// asked to).
fn shot(browser: &Browser, dir: &std::path::Path, name: &str) {
    let path = dir.join(format!("console-{name}.png"));
    browser.screenshot(&path);
    if std::env::var("TANDEM_UPDATE_SCREENSHOTS").as_deref() == Ok("1") {
        let docs = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/images");
        std::fs::create_dir_all(&docs).expect("docs/images");
        std::fs::copy(&path, docs.join(format!("console-{name}.png"))).expect("copy screenshot");
    }
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_lists_opens_retries_and_refuses_without_the_admin_role() {
    let dir = tempfile::tempdir().expect("dir");
    let access = Access::write(dir.path());
    let (admin_token, client_token) = (access.admin.clone(), access.client.clone());
    let data = dir.path().join("data");
    let (serve, admin) = Serve::start_with_admin(
        &data,
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

    // Two committed, one aborted (a no vote), two STUCK (commit fails
    // until the test brings the participant back).
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
    let serve_as = |resource: &str, p: &std::sync::Arc<Scripted>| {
        spawn(ParticipantServer::new().two_phase(resource, p.clone()))
    };
    let p_ok = serve_as("accounts", &ok).await;
    let p_no = serve_as("ledger", &no).await;
    let p_down = serve_as("ledger", &down).await;
    let options = access.client_options();
    let client = TransactionClient::connect_with(serve.url.clone(), &options)
        .await
        .expect("connect");
    for n in 0..2 {
        let done = client
            .submit(
                Mode::TwoPhase,
                vec![Branch::new(p_ok.url(), "accounts", format!("debit {n}"))],
            )
            .await
            .expect("submit");
        assert!(done.complete);
    }
    let _ = client
        .submit(
            Mode::TwoPhase,
            vec![
                Branch::new(p_ok.url(), "accounts", "debit"),
                Branch::new(p_no.url(), "ledger", "credit"),
            ],
        )
        .await;
    let mut stuck = Vec::new();
    for n in 0..2 {
        let done = client
            .submit(
                Mode::TwoPhase,
                vec![
                    Branch::new(p_ok.url(), "accounts", format!("debit {n}")),
                    Branch::new(p_down.url(), "ledger", format!("credit {n}")),
                ],
            )
            .await
            .expect("submit");
        stuck.push(done.gtid.to_string());
    }
    let admin_auth = bearer(&admin_token);
    let as_admin = [("Authorization", admin_auth.as_str())];
    eventually("both STUCK", || {
        let page = http(
            "GET",
            &admin,
            "/api/transactions?state=STUCK",
            &as_admin,
            None,
        );
        page.status == 200 && page.json()["transactions"].as_array().map(Vec::len) == Some(2)
    })
    .await;

    // The HTTP API directly: no credential 401, a client token 403, and a
    // console without --auth-file would refuse actions (tested below).
    let client_auth = bearer(&client_token);
    let as_client = [("Authorization", client_auth.as_str())];
    assert_eq!(http("GET", &admin, "/api/overview", &[], None).status, 401);
    assert_eq!(http("GET", &admin, "/metrics", &[], None).status, 401);
    let denied = http("GET", &admin, "/api/overview", &as_client, None);
    assert_eq!(denied.status, 403, "{}", denied.body);
    assert!(denied.json()["error"].is_string());
    let path = format!("/api/transactions/{}/retry", stuck[1]);
    assert_eq!(http("POST", &admin, &path, &as_client, None).status, 403);
    assert_eq!(http("POST", &admin, &path, &[], None).status, 401);
    let metrics = http("GET", &admin, "/metrics", &as_admin, None);
    assert_eq!(metrics.status, 200);
    // The console's files load without a credential.
    let page = http("GET", &admin, "/console/", &[], None);
    assert_eq!(page.status, 200);
    assert!(page.body.contains("Tandem console"));

    let shots = screenshots_dir();
    let driver = Driver::start();
    let admin_addr = admin.clone();
    let stuck_one = stuck[0].clone();
    let stuck_two = stuck[1].clone();
    let down_flip = down.clone();
    let (admin_token2, client_token2, shots2) =
        (admin_token.clone(), client_token.clone(), shots.clone());
    tokio::task::spawn_blocking(move || {
        let browser = driver.session(1280, 800);
        let base = format!("http://{admin_addr}/console/");
        browser.goto(&base);
        browser.wait_text("#signin", "Sign in");
        // A client token cannot sign in.
        browser.type_into("#token", &client_token2);
        browser.click("#signin-button");
        browser.wait_text("#signin-error", "refused");
        browser.type_into("#token", &admin_token2);
        browser.click("#signin-button");
        browser.wait_text("#cards", "STUCK");
        let cards = browser.text("#cards");
        assert!(cards.contains("STUCK\n2"), "{cards}");
        shot(&browser, &shots2, "overview");

        browser.goto(&format!("{base}#/tx"));
        browser.wait_text("#tx-rows", &stuck_one);
        let rows = browser.text("#tx-rows");
        assert!(
            rows.contains("COMMITTED") && rows.contains("ABORTED"),
            "{rows}"
        );
        shot(&browser, &shots2, "list");
        browser.click("#state-chips [data-state=STUCK]");
        eventually_sync("only STUCK rows", || {
            let rows = browser.text("#tx-rows");
            rows.contains(&stuck_one) && !rows.contains("COMMITTED")
        });
        browser.click(&format!("#tx-rows tr[data-gtid='{stuck_one}'] a"));
        browser.wait_text("#d-state", "STUCK");
        browser.wait_text("#d-branches", "ledger");
        let why = browser.wait_text("#abort-why", "decided commit");
        assert!(why.contains("never reversed"), "{why}");
        assert_eq!(
            browser.eval(
                "return document.getElementById('abort').disabled",
                json!([])
            ),
            json!(true)
        );
        assert!(browser.text("#d-timeline").contains("decided COMMIT"));
        shot(&browser, &shots2, "detail-stuck");

        // Phone width.
        browser.resize(390, 844);
        std::thread::sleep(Duration::from_millis(300));
        shot(&browser, &shots2, "phone-detail");
        browser.goto(&format!("{base}#/tx"));
        browser.wait_text("#tx-rows", &stuck_one);
        shot(&browser, &shots2, "phone-list");
        browser.resize(1280, 800);

        // The participant is back: retry, confirm, COMMITTED.
        down_flip
            .script
            .phase_two_failures
            .store(0, Ordering::SeqCst);
        browser.goto(&format!("{base}#/tx/{stuck_one}"));
        browser.wait_text("#d-state", "STUCK");
        browser.click("#retry");
        browser.wait_text("#confirm-text", "a commit decision is never reversed");
        shot(&browser, &shots2, "confirm-retry");
        browser.click("#confirm-ok");
        browser.wait_text("#action-result", "COMMITTED");
        browser.wait_text("#d-state", "COMMITTED");
        shot(&browser, &shots2, "committed");

        // A token that lost the admin role while the page was open: the
        // retry is refused inline and nothing happens.
        browser.goto(&format!("{base}#/tx/{stuck_two}"));
        browser.wait_text("#d-state", "STUCK");
        browser.eval(
            "sessionStorage.setItem('tandem.adminToken', arguments[0])",
            json!([client_token2]),
        );
        browser.click("#retry");
        browser.wait_text("#confirm-text", "never reversed");
        browser.click("#confirm-ok");
        browser.wait_text("#action-result", "refused");
        shot(&browser, &shots2, "refused");

        // Signing out forgets the token: the console asks again.
        browser.click("#signout");
        browser.wait_text("#signin", "Admin token");
        let kept = browser.eval(
            "return sessionStorage.getItem('tandem.adminToken')",
            json!([]),
        );
        assert_eq!(kept, serde_json::Value::Null);
        drop(browser);
        drop(driver);
    })
    .await
    .expect("browser steps");

    let two = http(
        "GET",
        &admin,
        &format!("/api/transactions/{}", stuck[1]),
        &as_admin,
        None,
    );
    assert_eq!(
        two.json()["state"],
        "STUCK",
        "the refused retry did nothing"
    );
    let one = http(
        "GET",
        &admin,
        &format!("/api/transactions/{}", stuck[0]),
        &as_admin,
        None,
    );
    assert_eq!(one.json()["state"], "COMMITTED");
    assert_eq!(
        down.counts().1,
        1,
        "one commit reached the participant that was down"
    );
    println!("console screenshots in {}", shots.display());
}

/// Waits up to 20 s for `f`, from a blocking thread.
fn eventually_sync(what: &str, mut f: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !f() {
        assert!(start.elapsed() < Duration::from_secs(20), "never: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

// Without --auth-file the console reads but never acts: retry and abort
// are refused with a message saying to configure --auth-file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_access_file_reads_are_open_and_actions_refused() {
    let dir = tempfile::tempdir().expect("dir");
    let (_serve, admin) = Serve::start_with_admin(dir.path(), &[], &[]);
    let overview = http("GET", &admin, "/api/overview", &[], None);
    assert_eq!(overview.status, 200, "{}", overview.body);
    assert_eq!(overview.json()["live"], 0);
    let gtid = "01990000-0000-7000-8000-000000000000";
    for verb in ["retry", "abort"] {
        let r = http(
            "POST",
            &admin,
            &format!("/api/transactions/{gtid}/{verb}"),
            &[],
            Some("{}"),
        );
        assert_eq!(r.status, 403, "{}", r.body);
        assert!(
            r.json()["error"]
                .as_str()
                .unwrap_or("")
                .contains("--auth-file")
        );
    }
    // Bad input is a clear 400 / 404, never a crash.
    for (path, status) in [
        ("/api/transactions?state=done", 400),
        ("/api/transactions?page_size=x", 400),
        ("/api/transactions?gtid=zz", 400),
        ("/api/transactions/not-a-gtid", 400),
        (
            "/api/transactions/01990000-0000-7000-8000-000000000000",
            404,
        ),
        ("/api/nothing", 404),
    ] {
        let r = http("GET", &admin, path, &[], None);
        assert_eq!(r.status, status, "{path}: {}", r.body);
        assert!(r.json()["error"].is_string(), "{path}");
    }
    let css = http("GET", &admin, "/console/app.css", &[], None);
    assert_eq!(css.status, 200);
    let page = http("GET", &admin, "/console/", &[], None);
    assert!(page.body.contains("<script src=\"app.js\""));
}

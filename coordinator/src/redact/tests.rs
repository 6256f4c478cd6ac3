use super::*;
use clap::{Arg, ArgAction};

#[test]
fn connection_strings_and_urls_are_redacted() {
    assert_eq!(
        redact("host=db user=t password=s3cret dbname=x"),
        "host=db user=t password=*** dbname=x"
    );
    assert_eq!(redact("password='a b' x=1"), "password=*** x=1");
    assert_eq!(redact("http://127.0.0.1:7070"), "http://127.0.0.1:7070");
    assert_eq!(
        redact("host=db user=tandem password = hunter2 dbname=x"),
        "host=db user=tandem password = *** dbname=x"
    );
    assert_eq!(
        redact("https://h/x?api_key=abc123&sig=deadbeef&n=1"),
        "https://h/x?api_key=***&sig=***&n=1"
    );
    assert_eq!(
        redact("sslkey=/etc/k.pem keys=3"),
        "sslkey=/etc/k.pem keys=3"
    );
    assert_eq!(redact(r"password='it\'s hunter2' x=1"), "password=*** x=1");
    assert_eq!(redact("password=Pa#ss&w0rd x=1"), "password=*** x=1");
    assert_eq!(redact(r"password=a\ b x=1"), "password=*** x=1");
    assert_eq!(
        redact("host=db\npassword=hunter2\tsslpassword=k2 dbname=x"),
        "host=db\npassword=***\tsslpassword=*** dbname=x"
    );
    assert_eq!(redact("PASSWORD=x"), "PASSWORD=***");
    assert_eq!(redact("postgres://u:pa/ss@db/x"), "postgres://u:***@db/x");
    assert_eq!(
        redact("postgres://tandem:hunter2@db/tandem?password=x&sslmode=require"),
        "postgres://tandem:***@db/tandem?password=***&sslmode=require"
    );
    // A key=value inside a URL's password: hidden as one.
    assert_eq!(
        redact("postgres://u:a&token=b@db/x"),
        "postgres://u:***@db/x"
    );
    assert_eq!(
        redact("https://h/x?e=1&x-api-key=k"),
        "https://h/x?e=1&x-api-key=***"
    );
    for hostile in [
        "password=",
        "password='",
        "password=\\",
        "é password = é",
        "=key==",
        "x://:@",
    ] {
        let _ = redact(hostile);
        let _ = redact_url(hostile);
        Secrets::default().add(SecretKind::Connection, hostile);
        Secrets::default().add(SecretKind::Webhook, hostile);
    }
}

#[test]
fn webhook_urls_show_only_their_host() {
    assert_eq!(
        redact_url("https://hooks.slack.com/services/T0/B0/XXXXSECRET?x=1"),
        "https://hooks.slack.com/***"
    );
    assert_eq!(
        redact_url("http://u:p@alerts.internal:9000"),
        "http://alerts.internal:9000/***"
    );
    assert_eq!(
        redact_url("http://alerts.internal:9000"),
        "http://alerts.internal:9000"
    );
}

// What a flag's name says about its value.
#[test]
fn flag_names_give_the_kind() {
    assert_eq!(SecretKind::of_flag("api-token"), SecretKind::Whole);
    assert_eq!(
        SecretKind::of_flag("alert-token-file"),
        SecretKind::Connection
    );
    assert_eq!(SecretKind::of_flag("alert-webhook"), SecretKind::Webhook);
    assert_eq!(SecretKind::of_flag("store"), SecretKind::Connection);
    assert_eq!(SecretKind::Whole.redact("abc"), "***");
}

// Scrubbing hides each secret of a value wherever it appears, in the forms
// a log line shows it in, and leaves the rest alone.
#[test]
fn scrub_hides_known_secrets_anywhere() {
    let mut s = Secrets::default();
    assert!(s.is_empty());
    assert!(matches!(s.scrub("anything"), Cow::Borrowed(_)));
    s.add(
        SecretKind::Connection,
        "postgres://tandem:hun%22ter2@db/x?sslmode=require",
    );
    s.add(
        SecretKind::Webhook,
        "https://u:pw@hooks.slack.com/services/T0/B0/XYZ?sig=1",
    );
    s.add(SecretKind::Webhook, "http://alerts.internal/");
    s.add_value("tok-123\n");
    let line = "error connecting to postgres://tandem:hun%22ter2@db/x as hun\"ter2 \
                {\"password\":\"hun\\\"ter2\"} POST /services/T0/B0/XYZ?sig=1 to u:pw@hooks \
                Bearer tok-123";
    let scrubbed = s.scrub(line);
    for secret in ["hun", "XYZ", "pw@", "tok-123"] {
        assert!(!scrubbed.contains(secret), "{secret} in {scrubbed}");
    }
    assert!(
        scrubbed.contains("postgres://tandem:***@db/x"),
        "{scrubbed}"
    );
    assert!(scrubbed.contains("POST *** to ***@hooks"), "{scrubbed}");
    assert_eq!(
        s.scrub("http://alerts.internal/"),
        "http://alerts.internal/"
    );
}

// The secrets of a parsed command line: of every flag of the subcommand
// given, by kind, and what token files hold.
#[test]
fn command_line_secrets_are_collected() {
    let dir = tempfile::tempdir().expect("dir");
    let token_file = dir.path().join("t.token");
    std::fs::write(&token_file, "file-tok-9\n").expect("write");
    let command = Command::new("tandem").subcommand(
        Command::new("serve")
            .arg(Arg::new("store").long("store"))
            .arg(Arg::new("api_token").long("api-token"))
            .arg(Arg::new("alert_token_file").long("alert-token-file"))
            .arg(Arg::new("allow").long("allow").action(ArgAction::Append))
            .arg(Arg::new("alert_webhook").long("alert-webhook")),
    );
    let matches = command.clone().get_matches_from([
        "tandem",
        "serve",
        "--store",
        "host=db password=pw-1",
        "--api-token",
        "whole-2",
        "--alert-token-file",
        token_file.to_str().expect("utf-8"),
        "--allow",
        "http://h:1",
        "--alert-webhook",
        "https://hooks/p-3",
    ]);
    let s = Secrets::of_command_line(&command, &matches);
    let scrubbed = s.scrub("pw-1 whole-2 file-tok-9 /p-3 db http://h:1 https://hooks");
    assert_eq!(scrubbed, "*** *** *** *** db http://h:1 https://hooks");
}

//! `tandem serve --config FILE`: the file's values take effect, the
//! environment overrides the file and a flag the environment; unknown keys
//! and bad values are refused by name; `--print-config` redacts secrets.

use std::path::Path;
use std::process::Command;

use tandem_tests::process::{Ran, free_addr, spawn_listening, tandem_bin};

fn write(dir: &Path, text: &str) -> String {
    let path = dir.join("tandem.toml");
    std::fs::write(&path, text).expect("write config");
    path.to_string_lossy().into_owned()
}

fn run(args: &[&str], env: &[(&str, &str)]) -> Ran {
    let out = Command::new(tandem_bin())
        .args(args)
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .output()
        .expect("run tandem");
    Ran {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn line<'a>(shown: &'a str, key: &str) -> &'a str {
    shown
        .lines()
        .find(|l| l.starts_with(&format!("{key} = ")))
        .unwrap_or_else(|| panic!("no {key} in:\n{shown}"))
}

// The listen address and data dir come from the file: the coordinator
// serves there.
#[test]
fn the_file_configures_the_server() {
    let dir = tempfile::tempdir().expect("tempdir");
    let addr = free_addr();
    let data = dir.path().join("data");
    let config = write(
        dir.path(),
        &format!(
            "listen = \"{addr}\"\ndata_dir = {:?}\n[retry]\nmax-attempts = 3\n",
            data.to_string_lossy()
        ),
    );
    let (mut child, listening) =
        spawn_listening(&tandem_bin(), &["serve", "--config", &config], &[]);
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(listening, addr);
    assert!(data.exists(), "the data dir of the file was created");

    let ran = run(&["serve", "--config", &config, "--print-config"], &[]);
    assert!(ran.ok, "{}", ran.stderr);
    assert_eq!(
        line(&ran.stdout, "listen"),
        format!("listen = \"{addr}\"  # file")
    );
    assert_eq!(
        line(&ran.stdout, "retry-max-attempts"),
        "retry-max-attempts = 3  # file"
    );
    assert_eq!(
        line(&ran.stdout, "max-branches"),
        "max-branches = 64  # default"
    );
}

// Flag over environment over file.
#[test]
fn environment_overrides_the_file_and_a_flag_the_environment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write(
        dir.path(),
        "max-branches = 7\ncall-timeout = \"9s\"\nretention = \"5m\"\n",
    );
    let env = [("TANDEM_CALL_TIMEOUT", "2s"), ("TANDEM_RETENTION", "10m")];
    let ran = run(
        &[
            "serve",
            "--config",
            &config,
            "--print-config",
            "--retention",
            "1h",
        ],
        &env,
    );
    assert!(ran.ok, "{}", ran.stderr);
    assert_eq!(
        line(&ran.stdout, "max-branches"),
        "max-branches = 7  # file"
    );
    assert_eq!(
        line(&ran.stdout, "call-timeout"),
        "call-timeout = \"2s\"  # env TANDEM_CALL_TIMEOUT"
    );
    assert_eq!(line(&ran.stdout, "retention"), "retention = \"1h\"  # flag");
    // The environment can name the file too.
    let ran = run(&["serve", "--print-config"], &[("TANDEM_CONFIG", &config)]);
    assert!(ran.ok, "{}", ran.stderr);
    assert_eq!(
        line(&ran.stdout, "max-branches"),
        "max-branches = 7  # file"
    );
}

// An unknown key stops the start, named with its line.
#[test]
fn an_unknown_key_is_refused_by_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write(
        dir.path(),
        "listen = \"127.0.0.1:0\"\nretry-max-atempts = 3\n",
    );
    let ran = run(&["serve", "--config", &config], &[]);
    assert!(!ran.ok, "served with an unknown key");
    assert!(ran.stdout.is_empty(), "{}", ran.stdout);
    assert!(
        ran.stderr.contains("unknown key \"retry-max-atempts\"") && ran.stderr.contains("line 2"),
        "{}",
        ran.stderr
    );
    assert!(
        ran.stderr.contains("did you mean \"retry-max-attempts\""),
        "{}",
        ran.stderr
    );
}

// A value the flag refuses names the key; nothing is served.
#[test]
fn a_bad_value_names_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (text, key) in [
        ("call-timeout = \"5 parsecs\"\n", "call-timeout"),
        ("max-branches = \"many\"\n", "max-branches"),
        ("require-tls = \"yes\"\n", "require-tls"),
    ] {
        let config = write(dir.path(), text);
        let ran = run(
            &["serve", "--config", &config, "--listen", "127.0.0.1:0"],
            &[],
        );
        assert!(!ran.ok, "served with {text}");
        assert!(ran.stdout.is_empty(), "{}", ran.stdout);
        assert!(
            ran.stderr.contains(&format!("\"{key}\"")),
            "{text}: {}",
            ran.stderr
        );
    }
}

// The store's password never shows, in URL or key=value form.
#[test]
fn print_config_redacts_the_store_password() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write(
        dir.path(),
        "store = \"postgres://tandem:hunter2@db.internal/tandem?sslmode=require\"\n",
    );
    let ran = run(&["serve", "--config", &config, "--print-config"], &[]);
    assert!(ran.ok, "{}", ran.stderr);
    assert!(!ran.stdout.contains("hunter2"), "{}", ran.stdout);
    assert_eq!(
        line(&ran.stdout, "store"),
        "store = \"postgres://tandem:***@db.internal/tandem?sslmode=require\"  # file"
    );
    let ran = run(
        &["serve", "--print-config"],
        &[(
            "TANDEM_STORE",
            "host=db user=tandem password=hunter2 dbname=t",
        )],
    );
    assert!(ran.ok, "{}", ran.stderr);
    assert!(!ran.stdout.contains("hunter2"), "{}", ran.stdout);
    assert!(
        line(&ran.stdout, "store").contains("password=***"),
        "{}",
        ran.stdout
    );
}

// The example file in the repository is accepted as shipped.
#[test]
fn the_example_file_is_accepted() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tandem.example.toml");
    let example = example.to_string_lossy();
    let ran = run(&["serve", "--config", &example, "--print-config"], &[]);
    assert!(ran.ok, "{}", ran.stderr);
    assert_eq!(
        line(&ran.stdout, "listen"),
        "listen = \"127.0.0.1:7070\"  # file"
    );
}

//! The `tandem` binary starts and lists its commands. Being an integration
//! test of this package, it also makes `cargo test --workspace` build
//! `target/debug/tandem`, which the workspace tests (`tests/`) and
//! `examples/python/run.sh` run as a real process.

use std::process::Command;

// `tandem --help` names every command; an unknown one is refused.
#[test]
fn tandem_lists_its_commands_and_refuses_unknown_ones() {
    let bin = env!("CARGO_BIN_EXE_tandem");
    let help = Command::new(bin).arg("--help").output().expect("run");
    assert!(help.status.success());
    let text = String::from_utf8_lossy(&help.stdout);
    for command in [
        "serve", "tx", "log", "demo", "bench", "certs", "cluster", "auth",
    ] {
        assert!(text.contains(command), "{command} missing from:\n{text}");
    }
    let bad = Command::new(bin).arg("frobnicate").output().expect("run");
    assert!(!bad.status.success());
}

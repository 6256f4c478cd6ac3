//! The example binaries start, refuse bad arguments, and (for the crash
//! tests of the workspace) are built by `cargo test --workspace`.

use std::process::Command;

// A bank participant on a free port prints its address and serves; a bad
// argument is refused before anything starts.
#[test]
fn bank_participant_starts_and_refuses_bad_arguments() {
    let bin = env!("CARGO_BIN_EXE_bank-participant");
    let bad = Command::new(bin)
        .args(["--balance", "lots"])
        .output()
        .expect("run");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--balance"));

    let dir = tempfile::tempdir().expect("dir");
    let mut child = Command::new(bin)
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().expect("stdout")),
        &mut line,
    )
    .expect("read");
    let _ = child.kill();
    let _ = child.wait();
    assert!(line.starts_with("listening on 127.0.0.1:"), "{line}");
}

#[test]
fn transfer_refuses_a_malformed_target() {
    let out = Command::new(env!("CARGO_BIN_EXE_transfer"))
        .args(["--from", "nowhere", "--to", "x/y", "--amount", "1"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not <endpoint>/<account>"));
}

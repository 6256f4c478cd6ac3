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

// With --metrics-listen, a bank participant serves its Prometheus metrics
// over HTTP: GET /metrics answers the OpenMetrics text (what is in it is
// tested in tests/tests/sdk_metrics.rs).
#[test]
fn bank_participant_serves_its_metrics() {
    use std::io::{BufRead, Read, Write};
    let mut child = Command::new(env!("CARGO_BIN_EXE_bank-participant"))
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let (mut listening, mut metrics) = (String::new(), String::new());
    out.read_line(&mut listening).expect("read");
    out.read_line(&mut metrics).expect("read");
    let answer =
        metrics
            .trim()
            .strip_prefix("metrics on ")
            .map(|addr| -> std::io::Result<String> {
                let mut conn = std::net::TcpStream::connect(addr)?;
                conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
                let mut answer = String::new();
                conn.read_to_string(&mut answer)?;
                Ok(answer)
            });
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        listening.starts_with("listening on 127.0.0.1:"),
        "{listening}"
    );
    let answer = answer
        .expect("a `metrics on ADDR` line")
        .expect("GET /metrics");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.contains("content-type: application/openmetrics-text"),
        "{answer}"
    );
    // No call yet: families without samples are left out, the text ends.
    assert!(answer.ends_with("\r\n\r\n# EOF\n"), "{answer}");
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

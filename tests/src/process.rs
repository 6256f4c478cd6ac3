//! Real processes: the `tandem` binary built by `cargo test --workspace`,
//! started on a free port and killed with SIGKILL.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

/// A binary of the workspace built next to the running test (`cargo test
/// --workspace` builds them before running tests).
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "{} missing: run `cargo test --workspace` (it builds the binaries)",
        bin.display()
    );
    bin
}

/// The `tandem` binary.
pub fn tandem_bin() -> PathBuf {
    workspace_bin("tandem")
}

/// Spawns `bin args…` and waits for its first stdout line,
/// `listening on ADDR`; returns the child and ADDR.
pub fn spawn_listening(bin: &Path, args: &[&str], env: &[(&str, &str)]) -> (Child, String) {
    let (child, mut lines) = spawn_lines(bin, args, env, 1);
    let line = lines.remove(0);
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("{}: unexpected first line {line:?}", bin.display()))
        .to_string();
    (child, addr)
}

/// Spawns `bin args…` and returns the child and its first `n` stdout lines.
pub fn spawn_lines(
    bin: &Path,
    args: &[&str],
    env: &[(&str, &str)],
    n: usize,
) -> (Child, Vec<String>) {
    let mut child = Command::new(bin)
        .args(args)
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
    let stdout = child.stdout.take().expect("stdout");
    let mut reader = BufReader::new(stdout);
    let mut lines = Vec::new();
    for _ in 0..n {
        let mut line = String::new();
        reader.read_line(&mut line).expect("read a line");
        lines.push(line);
    }
    (child, lines)
}

/// A free loopback port (bound, then released for a process to take).
pub fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").to_string()
}

/// A `tandem serve` process, killed when dropped.
pub struct Serve {
    child: Child,
    /// `http://addr`.
    pub url: String,
}

impl Serve {
    /// Starts `tandem serve` on a free port over `data_dir`.
    pub fn start(data_dir: &Path) -> Serve {
        Self::start_with(data_dir, &[], &[])
    }

    /// Starts `tandem serve` with extra arguments and environment.
    pub fn start_with(data_dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Serve {
        Self::start_on(data_dir, "127.0.0.1:0", args, env)
    }

    /// Starts `tandem serve` on `listen` (to restart on the same port).
    pub fn start_on(data_dir: &Path, listen: &str, args: &[&str], env: &[(&str, &str)]) -> Serve {
        let data = data_dir.to_string_lossy();
        let mut all = vec!["serve", "--listen", listen, "--data-dir", &data];
        all.extend_from_slice(args);
        let (child, addr) = spawn_listening(&tandem_bin(), &all, env);
        Serve {
            url: format!("http://{addr}"),
            child,
        }
    }

    /// Starts instance `name` of a cluster on the shared store at `store`
    /// (on `listen`, `127.0.0.1:0` for any free port), with a `lease`
    /// ("1s") short enough for takeover tests and retries capped at 200 ms.
    pub fn start_store(
        data_dir: &Path,
        store: &str,
        name: &str,
        listen: &str,
        lease: &str,
    ) -> Serve {
        let args = [
            "--store",
            store,
            "--instance-name",
            name,
            "--lease",
            lease,
            "--retry-max",
            "200ms",
        ];
        Self::start_on(data_dir, listen, &args, &[])
    }

    /// Starts `tandem serve` with `--admin-listen 127.0.0.1:0` and extra
    /// arguments; returns it and the admin listener's address.
    pub fn start_with_admin(
        data_dir: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> (Serve, String) {
        let data = data_dir.to_string_lossy();
        let mut all = vec![
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            &data,
            "--admin-listen",
            "127.0.0.1:0",
        ];
        all.extend_from_slice(args);
        let bin = tandem_bin();
        let (child, lines) = spawn_lines(&bin, &all, env, 2);
        let addr = |line: &str, prefix: &str| {
            line.trim()
                .strip_prefix(prefix)
                .unwrap_or_else(|| panic!("unexpected line {line:?}, wanted {prefix:?}…"))
                .to_string()
        };
        let grpc = addr(&lines[0], "listening on ");
        let admin = addr(&lines[1], "admin listening on ");
        (
            Serve {
                url: format!("http://{grpc}"),
                child,
            },
            admin,
        )
    }

    /// The address it listens on (`127.0.0.1:port`).
    pub fn addr(&self) -> &str {
        self.url.trim_start_matches("http://")
    }

    /// Its process id (to SIGSTOP / SIGCONT it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (`STOP`, `CONT`, …) with kill(1).
    pub fn signal(&self, signal: &str) {
        let sent = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -{signal} failed");
    }

    /// Kills it with SIGKILL and waits for it to be gone.
    pub fn kill(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("wait");
    }

    /// Sends SIGTERM (a graceful stop) and returns the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -TERM failed");
        self.child.wait().expect("wait")
    }

    /// Sends SIGTERM without waiting for the exit.
    pub fn signal_terminate(&self) {
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -TERM failed");
    }

    /// Waits for it to exit by itself (a failpoint); returns its status.
    pub fn wait(mut self) -> std::process::ExitStatus {
        self.child.wait().expect("wait")
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a `tandem …` command printed, and whether it succeeded.
pub struct Ran {
    /// Exit code 0.
    pub ok: bool,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

/// Runs `tandem args…` to completion.
pub fn tandem(args: &[&str]) -> Ran {
    let Output {
        status,
        stdout,
        stderr,
    } = Command::new(tandem_bin())
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run tandem");
    Ran {
        ok: status.success(),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

//! Child processes of the bench (this same binary, other subcommands) and
//! what Linux says about them in `/proc`.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

/// A child process that printed `listening on ADDR`; killed when dropped.
pub(super) struct Proc {
    child: Child,
    addr: String,
    admin: Option<String>,
}

/// CPU and memory of a process.
#[derive(Clone, Copy, Debug)]
pub(super) struct ProcStats {
    /// User + system CPU seconds so far.
    pub(super) cpu_s: f64,
    /// Resident set size now, KiB.
    pub(super) rss_kb: u64,
    /// Peak resident set size, KiB.
    pub(super) peak_rss_kb: u64,
    /// Voluntary + involuntary context switches so far, summed over the
    /// threads alive now (a thread that exited takes its count with it:
    /// Linux keeps a dead thread's switches only for `getrusage` of the
    /// process itself).
    pub(super) ctx_switches: u64,
}

/// Clock ticks per second of `/proc/<pid>/stat` (USER_HZ, 100 on Linux).
const TICKS_PER_S: f64 = 100.0;

impl Proc {
    /// Runs this binary with `args` and waits for its address.
    pub(super) fn spawn(args: &[&str]) -> anyhow::Result<Proc> {
        let exe = std::env::current_exe()?;
        let mut child = Command::new(exe)
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
        let mut out = BufReader::new(stdout);
        let mut line = String::new();
        out.read_line(&mut line)?;
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .ok_or_else(|| anyhow::anyhow!("`tandem {}` did not start: {line:?}", args.join(" ")))?
            .to_string();
        // `serve --admin-listen` prints the admin listener's address next.
        let admin = if args.contains(&"--admin-listen") {
            let mut line = String::new();
            out.read_line(&mut line)?;
            Some(
                line.trim()
                    .strip_prefix("admin listening on ")
                    .ok_or_else(|| anyhow::anyhow!("no admin listener: {line:?}"))?
                    .to_string(),
            )
        } else {
            None
        };
        Ok(Proc { child, addr, admin })
    }

    /// The admin listener's address, when it has one.
    pub(super) fn admin(&self) -> Option<&str> {
        self.admin.as_deref()
    }

    pub(super) fn addr(&self) -> &str {
        &self.addr
    }

    /// `http://addr`, or `https://addr` for a process serving TLS.
    pub(super) fn url(&self, tls: bool) -> String {
        let scheme = if tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Kills it with SIGKILL and waits until it is gone.
    pub(super) fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// CPU and memory so far, from `/proc/<pid>/{stat,status}`.
    pub(super) fn stats(&self) -> anyhow::Result<ProcStats> {
        let pid = self.child.id();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // Fields after the parenthesised command name; utime and stime are
        // the 14th and 15th fields overall.
        let rest = stat
            .rsplit_once(')')
            .map(|(_, r)| r)
            .ok_or_else(|| anyhow::anyhow!("unreadable /proc/{pid}/stat"))?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| -> anyhow::Result<f64> {
            Ok(fields
                .get(i)
                .ok_or_else(|| anyhow::anyhow!("short /proc/{pid}/stat"))?
                .parse::<u64>()? as f64)
        };
        let cpu_s = (ticks(11)? + ticks(12)?) / TICKS_PER_S;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let kb = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        Ok(ProcStats {
            cpu_s,
            rss_kb: kb("VmRSS:"),
            peak_rss_kb: kb("VmHWM:"),
            ctx_switches: thread_ctx_switches(pid)?,
        })
    }
}

/// Context switches of every live thread of `pid`: `/proc/<pid>/status`
/// counts only the main thread's, so each `/proc/<pid>/task/<tid>/status`
/// is read (a thread that exits meanwhile is skipped).
fn thread_ctx_switches(pid: u32) -> anyhow::Result<u64> {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let Ok(status) = std::fs::read_to_string(task?.path().join("status")) else {
            continue;
        };
        total += ctx_switches(&status)
            .ok_or_else(|| anyhow::anyhow!("no context switch counts in /proc/{pid}/task"))?;
    }
    Ok(total)
}

/// `voluntary_ctxt_switches` + `nonvoluntary_ctxt_switches` of a
/// `/proc/.../status` text; `None` if either is missing or unreadable.
pub(super) fn ctx_switches(status: &str) -> Option<u64> {
    let field = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    Some(field("voluntary_ctxt_switches:")? + field("nonvoluntary_ctxt_switches:")?)
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ctx_switches_sums_voluntary_and_involuntary() {
        let status = "Name:\ttandem\nThreads:\t9\nvoluntary_ctxt_switches:\t1200\n\
                      nonvoluntary_ctxt_switches:\t34\n";
        assert_eq!(ctx_switches(status), Some(1234));
    }

    #[test]
    fn ctx_switches_of_a_status_without_both_counts_is_none() {
        assert_eq!(ctx_switches("voluntary_ctxt_switches:\t5\n"), None);
        assert_eq!(
            ctx_switches("voluntary_ctxt_switches:\tx\nnonvoluntary_ctxt_switches:\t1\n"),
            None
        );
    }

    // The live reading of this test process: every thread's counts, at
    // least one switch (the test harness's threads have slept).
    #[test]
    fn thread_ctx_switches_of_this_process_are_counted() {
        std::thread::sleep(std::time::Duration::from_millis(2));
        let n = thread_ctx_switches(std::process::id()).expect("read /proc");
        assert!(n > 0, "{n}");
    }
}

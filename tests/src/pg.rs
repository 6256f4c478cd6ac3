//! A real PostgreSQL server per test: `initdb` into a temp dir and
//! `pg_ctl start` on a free loopback port, stopped when dropped.
//!
//! PostgreSQL refuses to run as root, and CI runs as root: then every
//! server command runs as the `postgres` user (or `nobody`) via `runuser`,
//! over a data directory handed to that user.

use std::path::PathBuf;
use std::process::Command;

use tandem_sdk::postgres::{self, Pool, tokio_postgres};

/// A running server; `pg_ctl stop -m immediate` on drop.
pub struct PgServer {
    /// The loopback port it listens on.
    pub port: u16,
    data: PathBuf,
    run_as: Option<String>,
    _root: tempfile::TempDir,
}

/// Where the server binaries are: on PATH, or Debian's versioned directory.
fn pg_bin(name: &str) -> PathBuf {
    let on_path = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    if let Some(path) = on_path {
        return path;
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin").join(name))
        .filter(|p| p.exists())
        .collect();
    found.sort();
    found.pop().unwrap_or_else(|| {
        panic!("{name} not found on PATH or in /usr/lib/postgresql/*/bin: install PostgreSQL")
    })
}

fn output(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The user to run the server as when we are root.
fn server_user() -> Option<String> {
    if output(Command::new("id").arg("-u")) != "0" {
        return None;
    }
    let exists = |u: &str| {
        Command::new("id")
            .arg(u)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    Some(
        if exists("postgres") {
            "postgres"
        } else {
            "nobody"
        }
        .to_string(),
    )
}

impl PgServer {
    /// initdb + start; panics with the server log if it does not come up.
    pub fn start() -> PgServer {
        let root = tempfile::tempdir().expect("tempdir");
        let data = root.path().join("data");
        std::fs::create_dir(&data).expect("mkdir data");
        let run_as = server_user();
        if let Some(user) = &run_as {
            let uid: u32 = output(Command::new("id").args(["-u", user]))
                .parse()
                .expect("uid");
            let gid: u32 = output(Command::new("id").args(["-g", user]))
                .parse()
                .expect("gid");
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755))
                .expect("chmod");
            std::os::unix::fs::chown(&data, Some(uid), Some(gid)).expect("chown data dir");
        }
        let mut server = PgServer {
            port: 0,
            data,
            run_as,
            _root: root,
        };
        let data = server.data.to_string_lossy().to_string();
        server.run(
            "initdb",
            &[
                "-D",
                &data,
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ],
        );
        // A few tries: the free port can be taken between probe and start.
        for _ in 0..3 {
            server.port = free_port();
            if server.pg_start() {
                return server;
            }
        }
        let log = std::fs::read_to_string(server.data.join("server.log")).unwrap_or_default();
        panic!("PostgreSQL did not start:\n{log}");
    }

    fn command(&self, tool: &str, args: &[&str]) -> Command {
        let bin = pg_bin(tool);
        match &self.run_as {
            Some(user) => {
                let mut cmd = Command::new("runuser");
                cmd.args(["-u", user, "--"]).arg(bin).args(args);
                cmd
            }
            None => {
                let mut cmd = Command::new(bin);
                cmd.args(args);
                cmd
            }
        }
    }

    fn try_run(&self, tool: &str, args: &[&str]) -> bool {
        let out = self
            .command(tool, args)
            .current_dir("/")
            .output()
            .unwrap_or_else(|e| panic!("run {tool}: {e}"));
        if !out.status.success() {
            eprintln!(
                "{tool} failed: {}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        out.status.success()
    }

    fn run(&self, tool: &str, args: &[&str]) {
        assert!(self.try_run(tool, args), "{tool} {args:?} failed");
    }

    /// A connection string for `database`.
    pub fn url(&self, database: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={database}",
            self.port
        )
    }

    /// Creates `database` (empty) and returns its connection string.
    pub async fn create_database(&self, database: &str) -> String {
        let client = self.connect("postgres").await;
        client
            .batch_execute(&format!("CREATE DATABASE {database}"))
            .await
            .unwrap_or_else(|e| panic!("create database {database}: {e}"));
        self.url(database)
    }

    /// A plain connection to `database`, for checks.
    pub async fn connect(&self, database: &str) -> tokio_postgres::Client {
        connect(&self.url(database)).await
    }

    /// A pool on `database`.
    pub fn pool(&self, database: &str) -> Pool {
        postgres::pool(&self.url(database), 8).expect("pool")
    }

    /// Turns TLS on with this certificate and key (PEM) and reloads the
    /// configuration: clients may then use TLS; plaintext stays allowed
    /// (`--auth=trust` over `host`), so `sslmode` decides.
    pub fn enable_tls(&self, cert_pem: &str, key_pem: &str) {
        use std::os::unix::fs::PermissionsExt;
        let (cert, key) = (self.data.join("server.crt"), self.data.join("server.key"));
        std::fs::write(&cert, cert_pem).expect("write server.crt");
        std::fs::write(&key, key_pem).expect("write server.key");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod key");
        if let Some(user) = &self.run_as {
            let id = |flag: &str| -> u32 {
                output(Command::new("id").args([flag, user]))
                    .parse()
                    .expect("id")
            };
            for f in [&cert, &key] {
                std::os::unix::fs::chown(f, Some(id("-u")), Some(id("-g"))).expect("chown");
            }
        }
        let conf = self.data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).expect("read postgresql.conf");
        text.push_str("\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
        std::fs::write(&conf, text).expect("write postgresql.conf");
        let data = self.data.to_string_lossy().to_string();
        self.run("pg_ctl", &["reload", "-D", &data]);
    }

    /// A streaming standby of `primary`, cloned with `pg_basebackup -R`
    /// (replication connections are trusted on loopback by initdb's
    /// defaults) and started on its own port; it connects to the primary
    /// as `application_name = standby1`.
    pub fn standby_of(primary: &PgServer) -> PgServer {
        let root = tempfile::tempdir().expect("tempdir");
        let data = root.path().join("data");
        let run_as = primary.run_as.clone();
        if let Some(user) = &run_as {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o777))
                .expect("chmod");
            let _ = user;
        }
        let server = PgServer {
            port: free_port(),
            data,
            run_as,
            _root: root,
        };
        let data = server.data.to_string_lossy().to_string();
        let source = format!(
            "host=127.0.0.1 port={} user=postgres application_name=standby1",
            primary.port
        );
        server.run(
            "pg_basebackup",
            &[
                "-d",
                &source,
                "-D",
                &data,
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
                "--no-sync",
            ],
        );
        assert!(server.pg_start(), "the standby did not start");
        server
    }

    /// Makes `standby1` this primary's synchronous standby
    /// (`synchronous_standby_names`, `synchronous_commit = on`) and waits
    /// until it streams as `sync`: from then on a commit returns only once
    /// the standby has it.
    pub async fn require_sync_standby(&self) {
        let client = self.connect("postgres").await;
        for sql in [
            "ALTER SYSTEM SET synchronous_standby_names = 'standby1'",
            "ALTER SYSTEM SET synchronous_commit = 'on'",
            "SELECT pg_reload_conf()",
        ] {
            client
                .batch_execute(sql)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let sync = client
                .query(
                    "SELECT 1 FROM pg_stat_replication WHERE application_name = 'standby1' \
                     AND sync_state = 'sync'",
                    &[],
                )
                .await
                .expect("pg_stat_replication");
            if !sync.is_empty() {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "standby1 never became synchronous"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// Kills the server as a crash would (`pg_ctl stop -m immediate`).
    pub fn kill_immediate(&self) {
        let data = self.data.to_string_lossy().to_string();
        self.run("pg_ctl", &["stop", "-m", "immediate", "-w", "-D", &data]);
    }

    /// Promotes a standby to primary and waits until it accepts writes.
    pub fn promote(&self) {
        let data = self.data.to_string_lossy().to_string();
        self.run("pg_ctl", &["promote", "-w", "-D", &data]);
    }

    /// Stops the server (fast shutdown: clients are disconnected).
    pub fn stop(&self) {
        let data = self.data.to_string_lossy().to_string();
        self.run("pg_ctl", &["stop", "-m", "fast", "-w", "-D", &data]);
    }

    /// Starts a stopped server again on the same port.
    pub fn restart(&self) {
        assert!(self.pg_start(), "PostgreSQL did not restart");
    }

    /// `pg_ctl start`, waiting until it accepts connections.
    fn pg_start(&self) -> bool {
        let data = self.data.to_string_lossy().to_string();
        let log = format!("{data}/server.log");
        let options = self.options();
        let args = [
            "start", "-w", "-t", "60", "-D", &data, "-l", &log, "-o", &options,
        ];
        self.try_run("pg_ctl", &args)
    }

    fn options(&self) -> String {
        let data = self.data.to_string_lossy();
        // fsync=off: the tests kill participants and coordinators, never
        // this server, so its own crash safety is not under test.
        format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories={data} \
             -c max_prepared_transactions=100 -c max_connections=300 \
             -c fsync=off -c full_page_writes=off -c shared_buffers=32MB",
            self.port
        )
    }
}

/// A plain connection, its driver task spawned.
pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// The newest incarnation of coordinator instance `name` in a shared store.
pub async fn incarnation(sql: &tokio_postgres::Client, name: &str) -> uuid::Uuid {
    sql.query_one(
        "SELECT incarnation FROM tandem_instances WHERE name = $1 \
         ORDER BY started_at DESC LIMIT 1",
        &[&name],
    )
    .await
    .expect("incarnation")
    .get(0)
}

/// Unfinished transactions `owner` (an incarnation) still owns.
pub async fn owned_by(sql: &tokio_postgres::Client, owner: uuid::Uuid) -> i64 {
    sql.query_one(
        "SELECT count(*) FROM tandem_txns WHERE owner = $1 AND state IN (1, 2, 3, 5)",
        &[&owner],
    )
    .await
    .expect("count owned")
    .get(0)
}

/// Tandem's prepared transactions left in `client`'s database.
pub async fn prepared_xacts(client: &tokio_postgres::Client) -> Vec<String> {
    client
        .query(
            "SELECT gid FROM pg_prepared_xacts WHERE database = current_database() ORDER BY gid",
            &[],
        )
        .await
        .expect("pg_prepared_xacts")
        .into_iter()
        .map(|r| r.get(0))
        .collect()
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let data = self.data.to_string_lossy().to_string();
        let _ = self
            .command("pg_ctl", &["stop", "-m", "immediate", "-w", "-D", &data])
            .current_dir("/")
            .output();
    }
}

/// A `bank-postgres serve` process (one shard), killed when dropped.
pub struct Shard {
    child: Option<std::process::Child>,
    /// `http://addr`: the endpoint to enlist branches with.
    pub url: String,
    args: Vec<String>,
}

impl Shard {
    /// Starts a shard over `db` holding `accounts` (1000 each), resolving
    /// with `coordinator` when given; `extra` are more `serve` flags.
    pub fn start(db: &str, accounts: &[&str], coordinator: Option<&str>, extra: &[&str]) -> Shard {
        let mut args: Vec<String> = ["serve", "--db", db, "--accounts", &accounts.join(",")]
            .iter()
            .map(|s| s.to_string())
            .collect();
        if let Some(c) = coordinator {
            args.extend(["--coordinator".to_string(), c.to_string()]);
        }
        let mut shard = Shard {
            child: None,
            url: String::new(),
            args,
        };
        shard.spawn("127.0.0.1:0", extra);
        shard
    }

    fn spawn(&mut self, listen: &str, extra: &[&str]) {
        let mut args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        args.extend(["--listen", listen]);
        args.extend_from_slice(extra);
        let (child, addr) = crate::process::spawn_listening(
            &crate::process::workspace_bin("bank-postgres"),
            &args,
            &[],
        );
        self.child = Some(child);
        self.url = format!("http://{addr}");
    }

    /// Kills it with SIGKILL (if it still runs) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits until it exits by itself (a crash point); returns its status.
    pub fn wait(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        child.wait().expect("wait")
    }

    /// Starts it again on the same port with the same database, plus `extra`.
    pub fn restart(&mut self, extra: &[&str]) {
        self.kill();
        let addr = self.url.trim_start_matches("http://").to_string();
        self.spawn(&addr, extra);
    }
}

impl Drop for Shard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Balance of `account` in `client`'s database.
pub async fn balance(client: &tokio_postgres::Client, account: &str) -> i64 {
    client
        .query_one(
            "SELECT balance FROM bank_accounts WHERE id = $1",
            &[&account],
        )
        .await
        .unwrap_or_else(|e| panic!("balance of {account}: {e}"))
        .get(0)
}

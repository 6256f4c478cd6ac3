//! `tandem demo`: a coordinator on a sled log in a temp dir, two bank shards
//! (the participant of `tandem-examples`) on loopback ports, and a few hundred
//! concurrent transfers between them, by 2PC or by TCC (try freezes the
//! funds, confirm moves them, cancel unfreezes) — half one-shot (`Submit`),
//! half interactive (`Begin` / `Enlist` / `Commit`). Some transfers ask for
//! more than the account holds, so their debit votes no and they abort. At
//! the end the money across both shards must be what it was at the start,
//! with nothing left frozen.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tandem_examples::bank::{Bank, Leg};
use tandem_sdk::security::{AccessList, BearerToken, ClientTls, ServerTls, ServerTlsFiles};
use tandem_sdk::{Branch, ClientOptions, Error, Mode, ParticipantServer, TransactionClient};

use tandem_coordinator::config::CoordinatorConfig;
use tandem_coordinator::log::SledLog;
use tandem_coordinator::security::{AccessControl, ParticipantAccess, ServerSecurity};
use tandem_coordinator::server::RunningCoordinator;

/// What the demo runs.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// 2PC, TCC or saga.
    pub mode: Mode,
    /// Transfers to run.
    pub transfers: usize,
    /// Transfers in flight at once.
    pub concurrency: usize,
    /// Accounts per shard.
    pub accounts_per_shard: usize,
    /// Opening balance of each account.
    pub opening_balance: i64,
    /// Seed of the transfer generator (same seed, same transfers).
    pub seed: u64,
    /// Mutual TLS and tokens on every hop, with development certificates
    /// (`tandem certs dev`) made in the temp dir.
    pub secure: bool,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            mode: Mode::TwoPhase,
            transfers: 400,
            concurrency: 32,
            accounts_per_shard: 10,
            opening_balance: 1000,
            seed: 7,
            secure: false,
        }
    }
}

/// What the demo saw.
#[derive(Clone, Debug)]
pub struct DemoReport {
    /// Options it ran with.
    pub options: DemoOptions,
    /// Coordinator address.
    pub coordinator: String,
    /// Participant addresses.
    pub shards: Vec<String>,
    /// Transfers committed.
    pub committed: usize,
    /// Transfers aborted because a debit voted no (insufficient funds).
    pub insufficient_funds: usize,
    /// Transfers aborted for another reason.
    pub aborted_other: usize,
    /// Transfers that failed with an error (not an abort).
    pub errors: Vec<String>,
    /// Wall time of the transfers.
    pub elapsed: Duration,
    /// Money across both shards before.
    pub total_before: i64,
    /// Money across both shards after.
    pub total_after: i64,
    /// Frozen legs never committed or rolled back (must be 0).
    pub open_holds: usize,
    /// Funds still frozen at the end (must be 0).
    pub frozen: i64,
    /// Forced log writes: commit decisions and enlisted branches.
    pub forces: u64,
    /// Physical flushes (fdatasync) of the log.
    pub flushes: u64,
}

impl DemoReport {
    /// Balance conserved, nothing left held, no errors.
    pub fn ok(&self) -> bool {
        self.total_before == self.total_after
            && self.open_holds == 0
            && self.frozen == 0
            && self.errors.is_empty()
    }
}

/// The bank's resource name for 2PC branches.
pub const RESOURCE_2PC: &str = "accounts";
/// The bank's resource name for TCC branches.
pub const RESOURCE_TCC: &str = "accounts-tcc";
/// The bank's resource name for saga steps.
pub const RESOURCE_SAGA: &str = "accounts-saga";
/// The bank's resource name for message deliveries.
pub const RESOURCE_MSG: &str = "accounts-msg";
/// The bank's back-check of the messages it prepared.
pub const RESOURCE_CHECK: &str = "accounts-check";

/// How long a demo message waits for its Submit before the coordinator
/// checks back.
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(1);

/// Development certificates and tokens for `--secure`: mutual TLS on
/// every hop, tokens on top, participants obeying only the coordinator.
struct Secure {
    dir: std::path::PathBuf,
}

impl Secure {
    fn new(dir: &std::path::Path) -> anyhow::Result<Secure> {
        crate::certs::write_dev(dir)?;
        Ok(Secure {
            dir: dir.to_path_buf(),
        })
    }

    fn file(&self, name: &str) -> std::path::PathBuf {
        self.dir.join(name)
    }

    fn files(&self, party: &str) -> ServerTlsFiles {
        ServerTlsFiles {
            cert: self.file(&format!("{party}.pem")),
            key: self.file(&format!("{party}-key.pem")),
            client_ca: Some(self.file("ca.pem")),
            require_client_cert: true,
        }
    }

    fn client_tls(&self, party: &str) -> ClientTls {
        ClientTls {
            ca: Some(self.file("ca.pem")),
            cert: Some(self.file(&format!("{party}.pem"))),
            key: Some(self.file(&format!("{party}-key.pem"))),
            domain: None,
        }
    }

    fn token(&self, party: &str) -> anyhow::Result<BearerToken> {
        BearerToken::from_file(&self.file(&format!("{party}.token"))).map_err(anyhow::Error::msg)
    }

    fn coordinator(&self) -> anyhow::Result<ServerSecurity> {
        Ok(ServerSecurity {
            tls: Some(ServerTls::load(self.files("coordinator"))?),
            access: Some(
                AccessControl::load(&self.file("coordinator-access.txt"))
                    .map_err(anyhow::Error::msg)?,
            ),
        })
    }

    fn participant_access(&self) -> anyhow::Result<ParticipantAccess> {
        Ok(ParticipantAccess {
            tls: Some(self.client_tls("coordinator")),
            token: self.token("coordinator")?,
            token_file: None,
        })
    }

    fn participant(&self, server: ParticipantServer) -> anyhow::Result<ParticipantServer> {
        let access =
            AccessList::load(&self.file("participant-access.txt")).map_err(anyhow::Error::msg)?;
        Ok(server
            .tls(ServerTls::load(self.files("participant"))?)
            .only_coordinators(access))
    }

    fn client(&self) -> anyhow::Result<ClientOptions> {
        Ok(ClientOptions {
            tls: Some(self.client_tls("client")),
            token: self.token("client")?,
        })
    }
}

/// splitmix64: a small, good-enough generator for picking transfers.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Runs the demo.
///
/// # Errors
///
/// The temp dir, the log or a server could not be set up.
pub async fn run(options: DemoOptions) -> anyhow::Result<DemoReport> {
    let dir = tempfile::Builder::new().prefix("tandem-demo-").tempdir()?;
    let log = Arc::new(SledLog::open(dir.path())?);
    let mut config = CoordinatorConfig {
        listen: "127.0.0.1:0".parse()?,
        data_dir: dir.path().to_path_buf(),
        ..CoordinatorConfig::default()
    };
    let secure = options
        .secure
        .then(|| Secure::new(&dir.path().join("certs")))
        .transpose()?;
    let coordinator = match &secure {
        None => RunningCoordinator::start(config, log).await?,
        Some(sec) => {
            config.require_tls = true;
            config.allowed_endpoints = vec!["https://127.0.0.1:*".parse()?];
            let env = tandem_coordinator::runtime::Environment {
                participants: sec.participant_access()?,
                ..Default::default()
            };
            RunningCoordinator::start_with(config, log, env, sec.coordinator()?).await?
        }
    };

    let n = options.accounts_per_shard.max(1);
    let names: Vec<String> = (0..2 * n).map(|i| format!("acct-{i:02}")).collect();
    let mut banks = Vec::new();
    let mut shards = Vec::new();
    for s in 0..2 {
        let accounts = names[s * n..(s + 1) * n]
            .iter()
            .map(|a| (a.clone(), options.opening_balance));
        let bank = Arc::new(Bank::new(accounts));
        let mut server = ParticipantServer::new();
        if let Some(sec) = &secure {
            server = sec.participant(server)?;
        }
        let server = server
            .two_phase(RESOURCE_2PC, bank.clone())
            .tcc(RESOURCE_TCC, bank.clone())
            .saga(RESOURCE_SAGA, bank.clone())
            .message(RESOURCE_MSG, bank.clone())
            .check(RESOURCE_CHECK, bank.clone())
            .spawn("127.0.0.1:0".parse()?)
            .await?;
        banks.push(bank);
        shards.push(server);
    }
    let total = |banks: &[Arc<Bank>]| banks.iter().map(|b| b.total()).sum::<i64>();
    let total_before = total(&banks);
    let endpoints: Vec<String> = shards.iter().map(|s| s.url()).collect();

    let client = match &secure {
        None => TransactionClient::connect(coordinator.url()).await?,
        Some(sec) => TransactionClient::connect_with(coordinator.url(), &sec.client()?).await?,
    };
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..options.concurrency.max(1) {
        let (client, next, names, endpoints, options, banks) = (
            client.clone(),
            next.clone(),
            names.clone(),
            endpoints.clone(),
            options.clone(),
            banks.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut results = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= options.transfers {
                    return results;
                }
                let r = mix(options.seed ^ mix(i as u64));
                let from = (r % names.len() as u64) as usize;
                let to = (from + 1 + (r >> 16) as usize % (names.len() - 1)) % names.len();
                // Up to 70% of an opening balance: most fit, some do not.
                let amount = 1 + (r >> 32) as i64 % (options.opening_balance * 7 / 10).max(1);
                let shard = |acct: usize| endpoints[acct / n].clone();
                let resource = match options.mode {
                    Mode::TwoPhase => RESOURCE_2PC,
                    Mode::Tcc => RESOURCE_TCC,
                    Mode::Saga => RESOURCE_SAGA,
                    Mode::Msg => {
                        let order = Order {
                            bank: &banks[from / n],
                            check: Branch::new(shard(from), RESOURCE_CHECK, ""),
                            debit: Leg::debit(&names[from], amount),
                            credit: Branch::new(
                                shard(to),
                                RESOURCE_MSG,
                                Leg::credit(&names[to], amount).encode(),
                            ),
                            // One in eight "crashes" between its local
                            // commit and its Submit: the check delivers it.
                            submit: i % 8 != 3,
                        };
                        results.push(order.run(&client).await);
                        continue;
                    }
                };
                let debit = Branch::new(
                    shard(from),
                    resource,
                    Leg::debit(&names[from], amount).encode(),
                );
                let credit = Branch::new(
                    shard(to),
                    resource,
                    Leg::credit(&names[to], amount).encode(),
                );
                let one_shot = i % 2 == 0;
                results.push(transfer(&client, options.mode, one_shot, debit, credit).await);
            }
        }));
    }
    let mut report = DemoReport {
        options: options.clone(),
        coordinator: coordinator.url(),
        shards: endpoints.clone(),
        committed: 0,
        insufficient_funds: 0,
        aborted_other: 0,
        errors: Vec::new(),
        elapsed: Duration::ZERO,
        total_before,
        total_after: 0,
        open_holds: 0,
        frozen: 0,
        forces: 0,
        flushes: 0,
    };
    for w in workers {
        for result in w.await? {
            match result {
                Ok(()) => report.committed += 1,
                Err(Error::Aborted { reason, .. }) if reason.contains("insufficient funds") => {
                    report.insufficient_funds += 1
                }
                Err(Error::Aborted { .. }) => report.aborted_other += 1,
                Err(e) => report.errors.push(e.to_string()),
            }
        }
    }
    report.elapsed = started.elapsed();
    // Phase 2 normally finished inside each call; wait for stragglers.
    let settle = Instant::now();
    while coordinator.coordinator.live_count() > 0 && settle.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    report.total_after = total(&banks);
    report.open_holds = banks.iter().map(|b| b.open_holds()).sum();
    report.frozen = banks.iter().map(|b| b.frozen()).sum();
    let stats = coordinator.coordinator.log_stats();
    report.forces = stats.forces;
    report.flushes = stats.flushes;
    for s in shards {
        let _ = s.shutdown().await;
    }
    coordinator.shutdown().await?;
    Ok(report)
}

/// A transfer as a transactional message: the debit in the paying bank's
/// local transaction, the credit delivered once it committed.
struct Order<'a> {
    bank: &'a Bank,
    check: Branch,
    debit: Leg,
    credit: Branch,
    submit: bool,
}

impl Order<'_> {
    async fn run(self, client: &TransactionClient) -> Result<(), Error> {
        let gtid = tandem_sdk::Gtid::now_v7();
        client
            .prepare_message(gtid, self.check, vec![self.credit], Some(MESSAGE_TIMEOUT))
            .await?;
        if let Err(reason) = self.bank.local_debit(gtid, &self.debit) {
            // Dropped now; the check would drop it at the timeout anyway.
            client.rollback(gtid, &reason).await?;
            return Err(Error::Aborted {
                gtid: Some(gtid),
                reason,
                abort: None,
            });
        }
        if self.submit {
            client.submit_message(gtid).await?;
        }
        Ok(())
    }
}

/// One transfer: one-shot `submit`, or `begin` / `enlist` ×2 / `commit`.
async fn transfer(
    client: &TransactionClient,
    mode: Mode,
    one_shot: bool,
    debit: Branch,
    credit: Branch,
) -> Result<(), Error> {
    if one_shot {
        client.submit(mode, vec![debit, credit]).await?;
        return Ok(());
    }
    let gtid = client.begin(mode).await?;
    client.enlist(gtid, debit).await?;
    client.enlist(gtid, credit).await?;
    client.commit(gtid).await?;
    Ok(())
}

impl fmt::Display for DemoReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = &self.options;
        let secs = self.elapsed.as_secs_f64();
        let done = self.committed + self.insufficient_funds + self.aborted_other;
        let mode = match o.mode {
            Mode::TwoPhase => "2PC",
            Mode::Tcc => "TCC (try freezes, confirm moves, cancel unfreezes)",
            Mode::Saga => {
                "saga (each leg moves the money at once, a failed transfer moves it back)"
            }
            Mode::Msg => {
                "transactional message (the debit commits in the paying bank's local \
                 transaction, the credit is delivered once it has; one in eight skips its \
                 Submit and is delivered by the coordinator's back-check)"
            }
        };
        writeln!(
            f,
            "tandem demo: {mode} bank transfers across two participant services{}",
            if o.secure {
                ", mutual TLS and tokens on every hop"
            } else {
                ""
            }
        )?;
        writeln!(
            f,
            "  coordinator   {} (sled log in a temp dir)",
            self.coordinator
        )?;
        writeln!(
            f,
            "  participants  {} ({} accounts each, {} per account)",
            self.shards.join(", "),
            o.accounts_per_shard,
            o.opening_balance
        )?;
        let shape = match o.mode {
            Mode::Msg => "PrepareMessage, the local debit, SubmitMessage",
            _ => "half one-shot Submit, half Begin/Enlist/Commit",
        };
        writeln!(
            f,
            "  transfers     {} ({} in flight; {shape})",
            o.transfers, o.concurrency
        )?;
        writeln!(f, "  committed     {}", self.committed)?;
        writeln!(
            f,
            "  aborted       {} (insufficient funds: {}, other: {})",
            self.insufficient_funds + self.aborted_other,
            self.insufficient_funds,
            self.aborted_other
        )?;
        writeln!(f, "  errors        {}", self.errors.len())?;
        for e in self.errors.iter().take(5) {
            writeln!(f, "                {e}")?;
        }
        writeln!(
            f,
            "  throughput    {:.0} transactions/s ({done} in {:.2} s)",
            done as f64 / secs.max(1e-9),
            secs
        )?;
        writeln!(
            f,
            "  durability    {} forced log writes (commit decisions, enlisted branches) in {} fdatasyncs ({:.1} per group commit)",
            self.forces,
            self.flushes,
            self.forces as f64 / self.flushes.max(1) as f64
        )?;
        let verdict = if self.total_before == self.total_after {
            "conserved"
        } else {
            "NOT CONSERVED"
        };
        write!(
            f,
            "  balance       before {}, after {}: {verdict}; open holds: {}, frozen: {}",
            self.total_before, self.total_after, self.open_holds, self.frozen
        )?;
        if matches!(self.options.mode, Mode::Saga | Mode::Msg) {
            write!(
                f,
                "\n  see also      tandem demo --order: a shop's orders, stock and card by saga, \
                 the e-mail by transactional message"
            )?;
        }
        Ok(())
    }
}

//! The `tandem` binary: parses arguments and calls the library.
//!
//! - `tandem serve`: run a coordinator.
//! - `tandem tx list|show|retry|abort`: look at and act on transactions of a
//!   running coordinator; `tandem tx submit` runs one.
//! - `tandem demo`: bank transfers across two participants, end to end.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

mod commands;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use tandem_cli::serve_cli::{self, ServeArgs};
use tandem_cli::tx_submit::{self, BranchSpec};
use tandem_cli::{bench, config_file, log_cli};
use tandem_coordinator::logging::{self, LogFormat};
use tandem_coordinator::security::ClientSecurityArgs;
use tandem_coordinator::{cli, otel};

/// Tandem: a distributed transaction coordinator (2PC and TCC).
#[derive(Parser)]
#[command(name = "tandem", version, about, long_about = None)]
struct Cli {
    /// Log lines on stderr: text (colours only on a terminal) or json (one
    /// object per line)
    #[arg(
        long,
        global = true,
        value_enum,
        default_value_t,
        env = "TANDEM_LOG_FORMAT"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a coordinator: the Coordinator and Admin gRPC services over a
    /// durable sled log. In-flight transactions found in the log are finished.
    Serve(Box<ServeArgs>),
    /// Look at and act on the transactions of a running coordinator.
    Tx(TxArgs),
    /// Look at a coordinator's log offline.
    Log {
        #[command(subcommand)]
        verb: LogVerb,
    },
    /// Run a coordinator, two bank participants and a few hundred concurrent
    /// transfers in this process; print counts, throughput and whether the
    /// total balance was conserved.
    Demo(DemoArgs),
    /// Measure throughput, latency, durability cost, CPU and memory against
    /// the machine's echo floor (starts a coordinator and no-op participant
    /// processes on loopback unless given addresses).
    Bench(BenchArgs),
    /// Make certificates for development and tests.
    Certs {
        #[command(subcommand)]
        verb: CertsVerb,
    },
    /// Look at the coordinators sharing a PostgreSQL store.
    Cluster {
        #[command(subcommand)]
        verb: ClusterVerb,
    },
    /// Make and hash bearer tokens for --auth-file.
    Auth {
        #[command(subcommand)]
        verb: AuthVerb,
    },
    /// A no-op participant process for `tandem bench`.
    #[command(hide = true)]
    BenchParticipant {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// Serve TLS and obey only the coordinator, with the files of
        /// `tandem certs dev` in this directory.
        #[arg(long)]
        secure_dir: Option<PathBuf>,
    },
}

#[derive(Args)]
struct BenchArgs {
    /// 2pc, tcc, saga or msg (a transactional message: prepare, then
    /// submit, delivered to every branch).
    #[arg(long, default_value = "2pc", value_parser = parse_mode)]
    mode: tandem_sdk::Mode,
    /// Branches per transaction.
    #[arg(long, default_value_t = 2)]
    branches: usize,
    /// Transactions in flight at once (and echo calls for the floor).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// How long to run transactions.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// How long to measure the echo floor.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    floor_duration: Duration,
    /// Payload bytes per branch.
    #[arg(long, default_value_t = 16)]
    payload: usize,
    /// Begin / Enlist / Commit instead of one-shot Submit.
    #[arg(long)]
    interactive: bool,
    /// Participant processes to start (default: one per branch).
    #[arg(long)]
    participants: Option<usize>,
    /// Use this coordinator instead of starting one (no CPU / RSS figures).
    #[arg(long)]
    coordinator: Option<String>,
    /// TLS and token for the --coordinator (as `tandem tx` takes them);
    /// its credential needs the client and admin roles.
    #[command(flatten)]
    coordinator_security: ClientSecurityArgs,
    /// Use these bench participants (`tandem bench-participant`) instead of
    /// starting them; repeat or comma-separate.
    #[arg(long, value_delimiter = ',')]
    participant: Vec<String>,
    /// After the run, leave this many transactions in flight, kill the
    /// coordinator, restart it and time how fast it finishes them.
    #[arg(long)]
    recovery: Option<usize>,
    /// Start the coordinators on this shared PostgreSQL store (a
    /// connection string) instead of a sled log in a temp dir.
    #[arg(long)]
    store: Option<String>,
    /// Coordinator instances to start on the --store; the client load is
    /// spread over them.
    #[arg(long, default_value_t = 1)]
    instances: usize,
    /// Retention of the coordinator the bench starts (finished records
    /// older than this are purged; keeps long runs' data dir bounded; at
    /// least 2m; at least 5m on a --store: see `tandem bench` in the book).
    #[arg(long, default_value = "2m", value_parser = parse_duration)]
    retention: Duration,
    /// table or json.
    #[arg(long, default_value = "table", value_parser = parse_output)]
    output: cli::Output,
    /// Mutual TLS and tokens on every hop (development certificates made
    /// in a temp dir), to measure what security costs.
    #[arg(long)]
    secure: bool,
    /// Serve /metrics on an admin listener and scrape it every second
    /// during the run, to measure what metrics cost.
    #[arg(long)]
    metrics: bool,
    /// Send a traceparent with every transaction, to measure what
    /// carrying trace context costs.
    #[arg(long)]
    trace: bool,
    /// Export the coordinator's spans over OTLP to a collector the bench
    /// runs, to measure what exporting traces costs.
    #[arg(long)]
    otlp: bool,
    /// With --otlp: the coordinator's --otlp-sample-ratio (0 to 1).
    #[arg(long, default_value = "1", value_parser = serve_cli::parse_ratio)]
    otlp_sample_ratio: f64,
    /// Measure memory and start-up at scale instead of throughput: write
    /// this many finished records into the log before the coordinator
    /// starts (with --live; either may be 0).
    #[arg(long)]
    retained: Option<u64>,
    /// Measure memory and start-up at scale: begin this many interactive
    /// transactions and keep them live (with --retained).
    #[arg(long)]
    live: Option<u64>,
}

#[derive(Args)]
struct TxArgs {
    /// The coordinator's gRPC address.
    #[arg(
        long,
        global = true,
        env = "TANDEM_COORDINATOR",
        default_value = "http://127.0.0.1:7070"
    )]
    coordinator: String,
    /// table (for people) or json (for scripts).
    #[arg(long, global = true, default_value = "table", value_parser = parse_output)]
    output: cli::Output,
    #[command(flatten)]
    security: ClientSecurityArgs,
    #[command(subcommand)]
    verb: TxVerb,
}

#[derive(Subcommand)]
enum TxVerb {
    /// Run one transaction, as a business service would (the `client`
    /// role): print its gtid and how it ended. Exit code 0 when it
    /// committed, 1 when it aborted or failed.
    Submit {
        /// 2pc, tcc or saga (a message starts with PrepareMessage: see
        /// `tandem demo --mode msg`).
        #[arg(long, default_value = "2pc", value_parser = parse_mode)]
        mode: tandem_sdk::Mode,
        /// A branch as ENDPOINT/RESOURCE/PAYLOAD (e.g.
        /// http://127.0.0.1:9001/accounts/alice:-100); repeat for each.
        #[arg(long = "branch", required = true, value_parser = tx_submit::parse_branch)]
        branches: Vec<BranchSpec>,
        /// The transaction's id (a UUID; default: a new UUID v7). Repeating
        /// a submit with the same gtid never runs it twice: it returns the
        /// first one's outcome.
        #[arg(long)]
        gtid: Option<tandem_sdk::Gtid>,
        /// Abort if still undecided after this long (e.g. 30s; default:
        /// the coordinator's --default-timeout).
        #[arg(long, value_parser = parse_duration)]
        timeout: Option<Duration>,
    },
    #[command(flatten)]
    Admin(AdminVerb),
}

/// The `tandem tx` verbs of the Admin service (the `admin` role).
#[derive(Subcommand)]
enum AdminVerb {
    /// List transactions, oldest first (or --newest-first): gtid, mode,
    /// state, age, branches, attempts, labels, last error.
    List {
        /// Only these states (comma-separated): active, preparing,
        /// committing, committed, aborting, aborted, stuck.
        #[arg(long, value_delimiter = ',', value_parser = cli::parse_state)]
        state: Vec<tandem_proto::v1::TxState>,
        /// Only transactions created longer ago than this (e.g. 5m, 1h).
        #[arg(long, value_parser = parse_duration)]
        older_than: Option<Duration>,
        /// Only transactions carrying this caller label (key=value);
        /// repeat for several (all must match).
        #[arg(long, value_parser = cli::parse_label)]
        label: Vec<(String, String)>,
        /// Only transactions with a branch of this resource ("what is
        /// waiting on inventory?").
        #[arg(long)]
        resource: Option<String>,
        /// Only transactions with a branch calling this participant
        /// endpoint (as given in the branch, e.g. http://10.0.0.7:9001).
        #[arg(long)]
        endpoint: Option<String>,
        /// Only this protocol: 2pc, tcc, saga or msg.
        #[arg(long, value_parser = parse_wire_mode)]
        mode: Option<tandem_proto::v1::Mode>,
        /// Only gtids starting with this.
        #[arg(long)]
        gtid_prefix: Option<String>,
        /// Newest first.
        #[arg(long)]
        newest_first: bool,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// The coordinator's counters: live transactions, forced writes and
    /// flushes (group commit), records purged by retention.
    Stats,
    /// Show one transaction's whole record: branches, endpoints, states,
    /// attempts, last errors, timestamps, decision.
    Show {
        /// Transaction id.
        gtid: String,
    },
    /// Drive a transaction now: phase 2 of a STUCK or retrying one runs at
    /// once (clearing STUCK); an undecided one past its deadline aborts.
    Retry {
        /// Transaction id.
        gtid: String,
    },
    /// Abort an undecided transaction. A decided one is refused: a commit
    /// decision is never reversed.
    Abort {
        /// Transaction id.
        gtid: String,
        /// Why; kept in the record.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Settle one branch of a STUCK transaction by hand, as its decision
    /// says, after making its participant consistent by other means: the
    /// coordinator stops calling it, and that participant's state becomes
    /// your responsibility. Kept in the record with who and why.
    Resolve {
        /// Transaction id.
        gtid: String,
        /// The branch's id (see `tandem tx show`).
        #[arg(long)]
        branch: u32,
        /// How it was settled: committed or rolled-back (must be the
        /// transaction's decision; for branch 1 of a message STUCK
        /// undecided, whether its local transaction committed: the
        /// deliveries follow, or the message is dropped).
        #[arg(long = "as", value_parser = cli::parse_settled)]
        settled: cli::Settled,
        /// Why (required); kept in the record.
        #[arg(long)]
        reason: String,
    },
}

#[derive(Subcommand)]
enum ClusterVerb {
    /// Every coordinator registered in the store: heartbeat, transactions
    /// owned, and the expired leases waiting to be taken over.
    Status {
        /// The store (as `tandem serve --store`).
        #[arg(long, env = "TANDEM_STORE")]
        store: String,
        /// table or json.
        #[arg(long, default_value = "table", value_parser = parse_output)]
        output: cli::Output,
    },
}

#[derive(Subcommand)]
enum CertsVerb {
    /// Write a development CA, certificates, tokens and access files for
    /// the coordinator, a participant, a client and an admin into DIR (for
    /// development only).
    Dev {
        /// Directory to write into.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum AuthVerb {
    /// Print a new random token on stdout and, on stderr, the access-file
    /// line granting it ROLE.
    Token {
        /// client, participant, admin (or coordinator, for a participant's list).
        #[arg(long)]
        role: String,
        /// A name for the caller (shown in logs).
        #[arg(long)]
        name: String,
    },
    /// Read a token on stdin and print its `token-sha256:` credential.
    Hash,
}

#[derive(Subcommand)]
enum LogVerb {
    /// Check a stopped coordinator's log: counts by state, the forced mark,
    /// undecodable records. Exits 0 when healthy, 2 when damaged.
    Check {
        /// The data directory.
        #[arg(long, env = "TANDEM_DATA_DIR", default_value = "./tandem-data")]
        data_dir: PathBuf,
        /// table or json.
        #[arg(long, default_value = "table", value_parser = parse_output)]
        output: cli::Output,
    },
}

#[derive(Args)]
struct DemoArgs {
    /// Protocol of the transfers: 2pc, tcc (try freezes the funds,
    /// confirm moves them, cancel unfreezes) or saga (each leg moves the
    /// money at once; a failed transfer moves it back) or msg (the debit
    /// in the paying bank's local transaction, the credit delivered as a
    /// transactional message once it committed).
    #[arg(long, default_value = "2pc", value_parser = parse_mode)]
    mode: tandem_sdk::Mode,
    /// Transfers to run (orders, with --order).
    #[arg(long, default_value_t = 400)]
    transfers: usize,
    /// A shop's orders instead of bank transfers: each reserves stock and
    /// charges a card by saga, then is confirmed and notified by
    /// transactional message (--mode is not used).
    #[arg(long, conflicts_with_all = ["mode", "secure"])]
    order: bool,
    /// Transfers in flight at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Seed of the transfer generator.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Mutual TLS and bearer tokens on every hop (development certificates
    /// made in the demo's temp dir), participants obeying only the
    /// coordinator.
    #[arg(long)]
    secure: bool,
}

fn parse_output(s: &str) -> Result<cli::Output, String> {
    match s.to_ascii_lowercase().as_str() {
        "table" => Ok(cli::Output::Table),
        "json" => Ok(cli::Output::Json),
        _ => Err(format!("unknown output {s:?}; use table or json")),
    }
}

/// Parses `2pc`, `tcc`, `saga` or `msg` as the wire's mode.
fn parse_wire_mode(s: &str) -> Result<tandem_proto::v1::Mode, String> {
    Ok(match parse_mode(s)? {
        tandem_sdk::Mode::TwoPhase => tandem_proto::v1::Mode::TwoPhase,
        tandem_sdk::Mode::Tcc => tandem_proto::v1::Mode::Tcc,
        tandem_sdk::Mode::Saga => tandem_proto::v1::Mode::Saga,
        tandem_sdk::Mode::Msg => tandem_proto::v1::Mode::Msg,
    })
}

/// Parses `2pc`, `tcc`, `saga` or `msg`.
fn parse_mode(s: &str) -> Result<tandem_sdk::Mode, String> {
    match s.to_ascii_lowercase().as_str() {
        "2pc" => Ok(tandem_sdk::Mode::TwoPhase),
        "tcc" => Ok(tandem_sdk::Mode::Tcc),
        "saga" => Ok(tandem_sdk::Mode::Saga),
        "msg" => Ok(tandem_sdk::Mode::Msg),
        _ => Err(format!("unknown mode {s:?}; use 2pc, tcc, saga or msg")),
    }
}

use tandem_coordinator::cli::parse_duration;

/// mimalloc instead of the system allocator: glibc malloc/free was ~16% of
/// the coordinator's CPU under load (`perf record` during `tandem bench`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    // `tandem serve --config FILE` fills the flags the command line and the
    // environment leave unset.
    let layered =
        match config_file::parse_layered(Cli::command(), std::env::args_os().collect(), "serve") {
            Ok(l) => l,
            Err(e) => {
                eprintln!("tandem: {e}");
                return ExitCode::from(2);
            }
        };
    let cli = Cli::from_arg_matches(&layered.matches).unwrap_or_else(|e| e.exit());
    if let Command::Serve(args) = &cli.command
        && args.print_config
    {
        print!("{}", layered.render());
        return ExitCode::SUCCESS;
    }
    let otlp = match &cli.command {
        Command::Serve(a) => a.otlp_endpoint.clone().map(|endpoint| otel::OtlpConfig {
            endpoint,
            service_name: a.service_name.clone(),
            sample_ratio: a.otlp_sample_ratio,
        }),
        _ => None,
    };
    // No output shows a secret of the command line, whoever prints it.
    let secrets = std::sync::Arc::new(layered.secrets());
    let _otel = match logging::init(cli.log_format, otlp.as_ref(), secrets.clone()) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("tandem: {}", secrets.scrub(&e));
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Serve(args) => serve_cli::serve(*args).await,
        Command::Tx(args) => return commands::tx(args, &secrets).await,
        Command::Log {
            verb: LogVerb::Check { data_dir, output },
        } => return log_cli::log_check(&data_dir, output),
        Command::Demo(args) => commands::run_demo(args).await,
        Command::Bench(args) => commands::run_bench(args).await,
        Command::BenchParticipant { listen, secure_dir } => {
            bench::serve_participant(listen, secure_dir.as_deref()).await
        }
        Command::Certs {
            verb: CertsVerb::Dev { out },
        } => commands::certs_dev(&out),
        Command::Auth { verb } => commands::auth(verb),
        Command::Cluster {
            verb: ClusterVerb::Status { store, output },
        } => tandem_cli::store_cli::cluster_status(&store, output).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tandem: {}", secrets.scrub(&format!("{e:#}")));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn durations_parse_with_units_and_reject_garbage() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("40"), Ok(Duration::from_millis(40)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("").is_err());
    }
}

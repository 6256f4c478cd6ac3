//! What each command of the `tandem` binary does once its arguments are
//! parsed (`tandem tx`, `bench`, `demo`, `certs`, `auth`); `main.rs` holds
//! the arguments and the dispatch.

use std::process::ExitCode;

use tandem_cli::tx_submit;
use tandem_cli::{bench, demo};
use tandem_coordinator::cli;
use tandem_coordinator::redact::Secrets;

use super::{AdminVerb, AuthVerb, BenchArgs, DemoArgs, TxArgs, TxVerb};

pub(super) fn certs_dev(out: &std::path::Path) -> anyhow::Result<()> {
    let files = tandem_cli::certs::write_dev(out)?;
    println!(
        "wrote development certificates, tokens and access files to {} (NOT FOR PRODUCTION)",
        files.dir.display()
    );
    Ok(())
}

pub(super) fn auth(verb: AuthVerb) -> anyhow::Result<()> {
    use tandem_sdk::security::{AccessList, auth};
    match verb {
        AuthVerb::Token { role, name } => {
            let token = auth::new_token();
            let line = format!(
                "{role} {name} token-sha256:{}",
                auth::token_digest_hex(&token)
            );
            AccessList::parse(&line).map_err(|e| anyhow::anyhow!(e))?;
            println!("{token}");
            eprintln!("access-file line: {line}");
        }
        AuthVerb::Hash => {
            let mut token = String::new();
            std::io::stdin().read_line(&mut token)?;
            anyhow::ensure!(!token.trim().is_empty(), "no token on stdin");
            println!("token-sha256:{}", auth::token_digest_hex(token.trim()));
        }
    }
    Ok(())
}

/// Runs one `tandem tx` verb: the result on stdout and exit code 0, or one
/// line on stderr and exit code 1.
pub(super) async fn tx(args: TxArgs, secrets: &Secrets) -> ExitCode {
    let verb = match args.verb {
        TxVerb::Submit {
            mode,
            branches,
            gtid,
            timeout,
        } => {
            let submitted = async {
                let options = args.security.options().map_err(anyhow::Error::msg)?;
                tx_submit::submit(&args.coordinator, &options, mode, &branches, gtid, timeout).await
            };
            return match submitted.await {
                Ok(outcome) => {
                    println!("{}", outcome.render(args.output));
                    if outcome.committed() {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    }
                }
                Err(e) => {
                    eprintln!("tandem: {}", secrets.scrub(&format!("{e:#}")));
                    ExitCode::FAILURE
                }
            };
        }
        TxVerb::Admin(verb) => verb,
    };
    let result = async {
        let options = args.security.options().map_err(cli::CliError)?;
        let mut client = cli::connect(&args.coordinator, &options).await?;
        let out = args.output;
        match verb {
            AdminVerb::List {
                state,
                older_than,
                label,
                resource,
                endpoint,
                mode,
                gtid_prefix,
                newest_first,
                limit,
            } => {
                let filter = cli::ListFilter {
                    states: state,
                    older_than,
                    labels: label,
                    resource,
                    endpoint,
                    mode,
                    gtid_prefix,
                    newest_first,
                };
                cli::list(&mut client, &filter, limit, out).await
            }
            AdminVerb::Stats => cli::stats(&mut client, out).await,
            AdminVerb::Show { gtid } => cli::show(&mut client, &gtid, out).await,
            AdminVerb::Retry { gtid } => cli::retry(&mut client, &gtid, out).await,
            AdminVerb::Abort { gtid, reason } => cli::abort(&mut client, &gtid, &reason, out).await,
            AdminVerb::Resolve {
                gtid,
                branch,
                settled,
                reason,
            } => cli::resolve(&mut client, &gtid, branch, settled.0, &reason, out).await,
        }
    }
    .await;
    match result {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tandem: {}", secrets.scrub(&e.to_string()));
            ExitCode::FAILURE
        }
    }
}

pub(super) async fn run_bench(args: BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.coordinator.is_some() || !args.coordinator_security.given(),
        "--ca, --cert, --key and --token-file are for a --coordinator the bench does not start \
         (--secure secures the ones it starts)"
    );
    let coordinator_access = args
        .coordinator_security
        .options()
        .map_err(anyhow::Error::msg)?;
    let options = bench::BenchOptions {
        mode: args.mode,
        branches: args.branches,
        concurrency: args.concurrency,
        duration: args.duration,
        floor_duration: args.floor_duration,
        payload: args.payload,
        interactive: args.interactive,
        participants: args.participants.unwrap_or(args.branches),
        coordinator: args.coordinator,
        coordinator_access,
        participant_urls: args.participant,
        recovery: args.recovery,
        retention: args.retention,
        secure: args.secure,
        store: args.store,
        instances: args.instances,
        metrics: args.metrics,
        trace: args.trace,
        otlp: args.otlp,
        otlp_sample_ratio: args.otlp_sample_ratio,
    };
    if args.retained.is_some() || args.live.is_some() {
        let (retained, live) = (args.retained.unwrap_or(0), args.live.unwrap_or(0));
        let report = bench::scale::run(options, retained, live).await?;
        match args.output {
            cli::Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
            cli::Output::Table => println!("{report}"),
        }
        return Ok(());
    }
    let report = bench::run(options).await?;
    match args.output {
        cli::Output::Json => println!("{}", report.to_json()),
        cli::Output::Table => println!("{report}"),
    }
    anyhow::ensure!(
        report.verified,
        "verification failed: participants counted {} commits for {} transactions",
        report.participant_commits,
        report.run.committed
    );
    Ok(())
}

pub(super) async fn run_demo(args: DemoArgs) -> anyhow::Result<()> {
    if args.order {
        let report = tandem_cli::demo_order::run(args.transfers, args.concurrency).await?;
        println!("{report}");
        anyhow::ensure!(report.ok(), "the order demo did not add up (see above)");
        return Ok(());
    }
    let report = demo::run(demo::DemoOptions {
        mode: args.mode,
        transfers: args.transfers,
        concurrency: args.concurrency,
        seed: args.seed,
        secure: args.secure,
        ..demo::DemoOptions::default()
    })
    .await?;
    println!("{report}");
    anyhow::ensure!(
        report.ok(),
        "the demo's invariants did not hold (see above)"
    );
    Ok(())
}

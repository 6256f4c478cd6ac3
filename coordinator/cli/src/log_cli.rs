//! `tandem log check`: the offline report on a stopped coordinator's log
//! (see [`tandem_coordinator::log::check_dir`]).

use tandem_coordinator::cli::Output;

/// `tandem log check`: prints the report of a stopped coordinator's log;
/// exit code 0 when healthy, 2 when damaged, 1 when it cannot be read.
pub fn log_check(dir: &std::path::Path, output: Output) -> std::process::ExitCode {
    let report = match tandem_coordinator::log::check_dir(dir) {
        Ok(r) => r,
        Err(e @ tandem_coordinator::log::LogError::Damaged(_)) => {
            println!("{e}");
            return std::process::ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("tandem: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let problems = report.problems();
    match output {
        Output::Json => {
            let doc = serde_json::json!({
                "data_dir": report.dir.display().to_string(),
                "mark": report.mark,
                "sled_round": report.sled_round,
                "counts": report.counts,
                "undecodable": report.undecodable.iter()
                    .map(|(k, why)| serde_json::json!({"gtid": k, "error": why}))
                    .collect::<Vec<_>>(),
                "quarantined": report.quarantined,
                "problems": problems,
                "healthy": problems.is_empty(),
            });
            println!("{doc:#}");
        }
        Output::Table => {
            println!("log        {}", report.dir.display());
            let mark = report.mark.map_or("none".to_string(), |m| m.to_string());
            println!("mark       {mark} (sled holds round {})", report.sled_round);
            for (state, n) in &report.counts {
                println!("{state:<10} {n}");
            }
            println!("quarantined {}", report.quarantined);
            for (k, why) in &report.undecodable {
                println!("undecodable {k}: {why}");
            }
            if problems.is_empty() {
                println!("healthy");
            }
            for p in &problems {
                println!("DAMAGED: {p}");
            }
        }
    }
    if problems.is_empty() {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::from(2)
    }
}

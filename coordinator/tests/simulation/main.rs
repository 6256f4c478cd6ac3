//! Seeded fault simulation of the coordinator, deterministic and in one
//! process: tokio's paused clock and one seeded generator drive many
//! concurrent transactions of both modes (one-shot and interactive) against
//! participants that vote no, fail, answer past deadlines and lose replies;
//! clients that give up at random points; a log whose forces fail or stall;
//! and coordinator crashes that keep only what was durably written and
//! recover while new transactions arrive. After each seed the invariants
//! (`invariants.rs`, one property per function) must hold.
//!
//! `cargo test -p tandem-coordinator --test simulation` runs 500 seeds.
//! Knobs: `TANDEM_SIM_SEEDS=100000` runs more, `TANDEM_SIM_FIRST=N` starts
//! at seed N, `TANDEM_SIM_SEED=N` replays one seed (a failure prints this
//! command).

// Items are `pub` for the modules of this test binary only.
#![allow(unreachable_pub)]
// A poisoned lock or a broken setup is a bug of the simulation: panic.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod invariants;
mod log;
mod net;
mod rng;
mod world;

use std::panic::AssertUnwindSafe;
use std::time::Instant;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn run_seed(seed: u64) -> Result<world::Summary, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime");
    match std::panic::catch_unwind(AssertUnwindSafe(|| rt.block_on(world::run(seed)))) {
        Ok(result) => result,
        Err(panic) => Err(format!(
            "panicked: {}",
            panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default()
        )),
    }
}

#[test]
fn seeded_fault_simulation() {
    let (first, count) = match env_u64("TANDEM_SIM_SEED") {
        Some(seed) => (seed, 1),
        None => (
            env_u64("TANDEM_SIM_FIRST").unwrap_or(0),
            env_u64("TANDEM_SIM_SEEDS").unwrap_or(500),
        ),
    };
    let started = Instant::now();
    let (mut txns, mut commits, mut restarts) = (0, 0, 0);
    let mut failures = Vec::new();
    for seed in first..first + count {
        if count > 1000 && seed > first && (seed - first) % 1000 == 0 {
            eprintln!(
                "simulation: {} seeds done in {:.0} s, {} failed",
                seed - first,
                started.elapsed().as_secs_f64(),
                failures.len()
            );
        }
        match run_seed(seed) {
            Ok(s) => {
                txns += s.transactions;
                commits += s.committed;
                restarts += s.restarts;
            }
            Err(e) => {
                eprintln!(
                    "seed {seed} failed: {e}\n  replay: TANDEM_SIM_SEED={seed} cargo test -p tandem-coordinator --test simulation -- --nocapture"
                );
                failures.push(seed);
                if failures.len() >= 10 {
                    break;
                }
            }
        }
    }
    eprintln!(
        "simulation: {count} seeds from {first} in {:.1} s: {txns} transactions ({commits} committed), {restarts} coordinator crashes; {} failed",
        started.elapsed().as_secs_f64(),
        failures.len()
    );
    assert!(failures.is_empty(), "failing seeds: {failures:?}");
}

/// A seed replays exactly: the same run gives the same end state.
#[test]
fn a_seed_replays_exactly() {
    for seed in [7, 12345] {
        let a = run_seed(seed).expect("seed passes");
        let b = run_seed(seed).expect("seed passes");
        assert_eq!(a, b, "seed {seed} did not replay");
    }
}

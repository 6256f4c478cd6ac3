//! The latency floor of one transaction, measured in the same run: what the
//! coordinator must wait for whatever it does, and nothing it could save.
//!
//! A one-shot `Submit` is answered after phase 1 of every branch (in
//! parallel), the forced commit decision, and the first round of phase 2
//! (in parallel; DESIGN.md "Replies to the client"), so
//!
//! ```text
//! floor = client RTT + 2 × participant RTT + 1 sync
//! ```
//!
//! Interactively, `Begin`, each `Enlist` (which runs that branch's phase 1)
//! and `Commit` are client calls made one after another, so the floor is
//! `(2 + branches) × client RTT + (branches + 1) × participant RTT` plus
//! one sync. Each part is the median of sequential calls (concurrency 1):
//! the floor is the p50 a coordinator that cost nothing would show at
//! concurrency 1.
//!
//! - client RTT: the coordinator's `grpc.health.v1` `Check` (no credential,
//!   no log), from the bench's client: the same network path and the same
//!   gRPC stack as `Submit`;
//! - participant RTT: the echo of a bench participant;
//! - sync: an append of 64 bytes to a file in the log's data dir and its
//!   `fdatasync`, timed while the echoes run (see `bench::run`). Not measured on a PostgreSQL store or a coordinator the
//!   bench did not start: the floor then leaves the sync out.

use std::io::Write;
use std::path::Path;

use serde::Serialize;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use super::*;

/// Sequential calls per RTT measurement (fewer if [`SAMPLE_TIME`] runs out).
const SAMPLES: usize = 1000;
/// Time cap of one RTT measurement.
const SAMPLE_TIME: Duration = Duration::from_secs(1);
/// Appends + `fdatasync`s of the sync measurement.
const SYNCS: usize = 200;
/// Calls made first and not counted (connections, caches).
const WARMUP: usize = 20;

/// The floor's parts, microseconds (medians of sequential calls).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct FloorParts {
    /// A unary call from the bench's client to the coordinator and back.
    pub client_rtt_us: f64,
    /// A unary call from the bench to a participant and back.
    pub participant_rtt_us: f64,
    /// An append + `fdatasync` in the log's file system (`None` when not
    /// measured: a PostgreSQL store, or a coordinator the bench did not
    /// start).
    pub fsync_us: Option<f64>,
}

impl FloorParts {
    /// The floor of one transaction of this shape, microseconds: the
    /// client calls and participant rounds that must follow one another,
    /// plus its syncs (the forced decision; a saga's forced start too).
    pub fn floor_us(&self, interactive: bool, branches: usize, mode: &str) -> f64 {
        let (client_calls, participant_rounds, syncs) = sequence(interactive, branches, mode);
        client_calls as f64 * self.client_rtt_us
            + participant_rounds as f64 * self.participant_rtt_us
            + syncs as f64 * self.fsync_us.unwrap_or(0.0)
    }
}

/// The client calls, the participant rounds and the syncs of one
/// transaction that follow one another (a round's calls go to the
/// branches in parallel; a saga's actions one after another). `mode` is
/// the report's name of it (`2pc`, `tcc`, `saga`, `msg`).
pub fn sequence(interactive: bool, branches: usize, mode: &str) -> (usize, usize, usize) {
    match mode {
        _ if interactive => (2 + branches, branches + 1, 1), // begin, enlists, commit; phase 1 each, phase 2
        "saga" => (1, branches + 1, 2), // submit; each action, the confirms; start and decision forced
        "msg" => (2, 1, 2), // prepare, submit; the deliveries; prepare and decision forced
        _ => (1, 2, 1),     // submit; phase 1, phase 2
    }
}

/// `p50 ÷ floor` (0 when the floor is unknown).
pub fn ratio(p50_us: u32, floor_us: f64) -> f64 {
    if floor_us > 0.0 {
        f64::from(p50_us) / floor_us
    } else {
        0.0
    }
}

/// The median of `samples` (0 for none).
pub(super) fn median(mut samples: Vec<f64>) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    samples.sort_unstable_by(f64::total_cmp);
    let mid = samples.len() / 2;
    if samples.len() % 2 == 1 {
        samples[mid]
    } else {
        (samples[mid - 1] + samples[mid]) / 2.0
    }
}

/// Times `call` sequentially: [`WARMUP`] calls, then up to [`SAMPLES`]
/// within [`SAMPLE_TIME`]; the median in microseconds.
async fn median_rtt<F, Fut>(mut call: F) -> anyhow::Result<f64>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    for i in 0..WARMUP {
        call(i).await?;
    }
    let started = Instant::now();
    let mut samples = Vec::with_capacity(SAMPLES);
    for i in 0..SAMPLES {
        if started.elapsed() >= SAMPLE_TIME {
            break;
        }
        let t0 = Instant::now();
        call(i).await?;
        samples.push(t0.elapsed().as_secs_f64() * 1e6);
    }
    Ok(median(samples))
}

/// The client RTT: health checks against the coordinator at `channel`.
pub(super) async fn client_rtt(channel: Channel) -> anyhow::Result<f64> {
    let health = HealthClient::new(channel);
    median_rtt(|_| {
        let mut h = health.clone();
        async move {
            h.check(HealthCheckRequest::default())
                .await
                .map_err(|e| anyhow::anyhow!("the coordinator's health check failed: {e}"))?;
            Ok(())
        }
    })
    .await
}

/// The participant RTT: echoes, round-robin over the participants.
pub(super) async fn participant_rtt(
    benches: &[BenchParticipantClient<Channel>],
) -> anyhow::Result<f64> {
    median_rtt(|i| {
        let mut b = benches[i % benches.len()].clone();
        async move {
            b.echo(bench_pb::EchoMessage {
                data: Bytes::from_static(b"0123456789abcdef"),
            })
            .await?;
            Ok(())
        }
    })
    .await
}

/// The sync: [`SYNCS`] appends of 64 bytes to a fresh file in `dir`, each
/// followed by `fdatasync`; the median in microseconds. The file is
/// removed afterwards.
pub(super) fn fsync_us(dir: &Path) -> anyhow::Result<f64> {
    let path = dir.join("bench-floor-fsync");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)?;
    let mut samples = Vec::with_capacity(SYNCS);
    let record = [b'f'; 64];
    for _ in 0..SYNCS {
        let t0 = Instant::now();
        file.write_all(&record)?;
        file.sync_data()?;
        samples.push(t0.elapsed().as_secs_f64() * 1e6);
    }
    drop(file);
    std::fs::remove_file(&path)?;
    Ok(median(samples))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(fsync: Option<f64>) -> FloorParts {
        FloorParts {
            client_rtt_us: 200.0,
            participant_rtt_us: 150.0,
            fsync_us: fsync,
        }
    }

    // One-shot: the Submit, then phase 1 and phase 2 (each a parallel
    // round over the branches, however many), then one sync.
    #[test]
    fn one_shot_floor_is_one_client_call_two_participant_rounds_one_sync() {
        assert_eq!(
            parts(Some(250.0)).floor_us(false, 2, "2pc"),
            200.0 + 300.0 + 250.0
        );
        assert_eq!(parts(Some(250.0)).floor_us(false, 5, "2pc"), 750.0);
    }

    // Interactive: Begin, each Enlist (with its phase 1) and Commit follow
    // one another; phase 2 is one parallel round.
    #[test]
    fn interactive_floor_counts_each_client_call_and_each_enlist() {
        // 4 client calls, 3 participant rounds, 1 sync.
        assert_eq!(
            parts(Some(250.0)).floor_us(true, 2, "2pc"),
            4.0 * 200.0 + 3.0 * 150.0 + 250.0
        );
    }

    // Without a measured sync (PostgreSQL store) the floor leaves it out.
    #[test]
    fn floor_without_a_measured_sync_leaves_it_out() {
        assert_eq!(parts(None).floor_us(false, 2, "2pc"), 500.0);
    }

    #[test]
    fn ratio_is_p50_over_floor_and_zero_without_a_floor() {
        assert_eq!(ratio(1500, 750.0), 2.0);
        assert_eq!(ratio(1500, 0.0), 0.0);
    }

    #[test]
    fn median_of_odd_even_and_empty_samples() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(Vec::new()), 0.0);
    }

    #[test]
    fn fsync_of_a_temp_dir_takes_time_and_leaves_no_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let us = fsync_us(dir.path()).expect("fsync");
        assert!(us > 0.0, "{us}");
        assert_eq!(std::fs::read_dir(dir.path()).expect("read_dir").count(), 0);
    }
}

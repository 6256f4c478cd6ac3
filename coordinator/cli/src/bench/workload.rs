//! What the bench runs: the echo floor (the latency floor is in
//! [`super::floor`]), the transactions (each latency from
//! the client's call to the acknowledged decision), and the recovery run.

use super::*;

/// The echo floor: `concurrency` callers, round-robin over participants.
pub(super) async fn echo_floor(
    benches: &[BenchParticipantClient<Channel>],
    concurrency: usize,
    duration: Duration,
) -> anyhow::Result<Floor> {
    // Warm the connections first.
    for b in benches {
        b.clone()
            .echo(bench_pb::EchoMessage { data: Bytes::new() })
            .await?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|w| {
            let (mut b, stop, calls) = (
                benches[w % benches.len()].clone(),
                stop.clone(),
                calls.clone(),
            );
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    if b.echo(bench_pb::EchoMessage {
                        data: Bytes::from_static(b"0123456789abcdef"),
                    })
                    .await
                    .is_ok()
                    {
                        calls.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.await;
    }
    let secs = started.elapsed().as_secs_f64();
    Ok(Floor {
        requests_per_s: calls.load(Ordering::Relaxed) as f64 / secs,
    })
}

pub(super) async fn counts(
    benches: &[BenchParticipantClient<Channel>],
) -> anyhow::Result<bench_pb::CountsResponse> {
    let mut total = bench_pb::CountsResponse::default();
    for b in benches {
        let c = b
            .clone()
            .counts(bench_pb::CountsRequest {})
            .await?
            .into_inner();
        total.phase_one += c.phase_one;
        total.commits += c.commits;
        total.rollbacks += c.rollbacks;
        total.echoes += c.echoes;
    }
    Ok(total)
}

/// Waits until the coordinator has no live transaction (phase 2 done).
pub(super) async fn drain(admin: &mut tandem_coordinator::cli::Admin) -> anyhow::Result<()> {
    for _ in 0..3000 {
        if admin
            .get_stats(pb::GetStatsRequest {})
            .await?
            .into_inner()
            .live
            == 0
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    anyhow::bail!("the coordinator still had live transactions 30 s after the run")
}

pub(super) fn branches(urls: &[String], options: &BenchOptions, i: u64) -> Vec<Branch> {
    let resource = match options.mode {
        Mode::TwoPhase => RESOURCE_2PC,
        // A saga step is called as a TCC branch is (try, confirm,
        // cancel): the same counting handler serves it.
        Mode::Tcc | Mode::Saga => RESOURCE_TCC,
        Mode::Msg => RESOURCE_MSG,
    };
    let payload = Bytes::from(vec![b'x'; options.payload]);
    (0..options.branches)
        .map(|b| {
            let url = &urls[(i as usize + b) % urls.len()];
            Branch::new(url.clone(), resource, payload.clone())
        })
        .collect()
}

/// One transaction; `Ok(true)` when committed and complete.
pub(super) async fn one(
    client: &TransactionClient,
    options: &BenchOptions,
    branches: Vec<Branch>,
) -> Result<bool, tandem_sdk::Error> {
    let traced;
    let client = if options.trace {
        traced = client.with_traceparent(tandem_sdk::trace::TraceParent::new_root());
        &traced
    } else {
        client
    };
    if options.mode == Mode::Msg {
        // The check is never asked: every message is submitted at once.
        let check = Branch::new(branches[0].endpoint.clone(), RESOURCE_CHECK, Bytes::new());
        let gtid = client
            .prepare_message(tandem_sdk::Gtid::now_v7(), check, branches, None)
            .await?;
        return Ok(client.submit_message(gtid).await?.complete);
    }
    if !options.interactive {
        return Ok(client.submit(options.mode, branches).await?.complete);
    }
    let gtid = client.begin(options.mode).await?;
    for b in branches {
        client.enlist(gtid, b).await?;
    }
    Ok(client.commit(gtid).await?.complete)
}

pub(super) async fn transactions(
    clients: &[TransactionClient],
    urls: &[String],
    options: &BenchOptions,
    coordinator: Option<&Proc>,
) -> RunStats {
    let stop = Arc::new(AtomicBool::new(false));
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..options.concurrency)
        .map(|w| {
            let (client, urls, options, stop, next) = (
                clients[w % clients.len()].clone(),
                urls.to_vec(),
                options.clone(),
                stop.clone(),
                next.clone(),
            );
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let (mut incomplete, mut errors) = (0u64, 0u64);
                let mut first_error = None;
                while !stop.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let t0 = Instant::now();
                    match one(&client, &options, branches(&urls, &options, i)).await {
                        Ok(true) => latencies.push(t0.elapsed().as_micros() as u32),
                        Ok(false) => incomplete += 1,
                        Err(e) => {
                            errors += 1;
                            first_error.get_or_insert_with(|| e.to_string());
                        }
                    }
                }
                (latencies, incomplete, errors, first_error)
            })
        })
        .collect();
    // RSS after the first minute, for long runs: memory must stay flat.
    let mut rss_after_first_minute = None;
    let deadline = started + options.duration;
    while Instant::now() < deadline {
        tokio::time::sleep(
            Duration::from_millis(200).min(deadline.saturating_duration_since(Instant::now())),
        )
        .await;
        if rss_after_first_minute.is_none() && started.elapsed() >= Duration::from_secs(60) {
            rss_after_first_minute = coordinator.and_then(|p| p.stats().ok()).map(|s| s.rss_kb);
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut stats = RunStats::default();
    let mut all = Vec::new();
    for w in workers {
        if let Ok((lat, incomplete, errors, first)) = w.await {
            all.extend(lat);
            stats.incomplete += incomplete;
            stats.errors += errors;
            if stats.first_error.is_none() {
                stats.first_error = first;
            }
        }
    }
    stats.elapsed = started.elapsed();
    stats.committed = all.len() as u64 + stats.incomplete;
    stats.set_latencies(all);
    stats.rss_after_first_minute_kb = rss_after_first_minute;
    stats
}

/// Piles up `options.recovery` in-flight transactions (participants fail
/// phase 2), kills the coordinator, restarts it on the same data dir with
/// participants healthy, and times how long it takes to finish all of them.
pub(super) async fn recover(
    coordinator: Proc,
    restart: impl FnOnce(&str) -> anyhow::Result<Proc>,
    client: &TransactionClient,
    benches: &[BenchParticipantClient<Channel>],
    urls: &[String],
    options: &BenchOptions,
) -> anyhow::Result<(Recovery, Proc)> {
    for b in benches {
        b.clone()
            .set_fail_phase_two(bench_pb::SetFailPhaseTwoRequest { fail: true })
            .await?;
    }
    let k = options.recovery.unwrap_or(0);
    let base = counts(benches).await?.commits;
    let piled = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..options.concurrency)
        .map(|w| {
            let (client, urls, options, piled) = (
                client.clone(),
                urls.to_vec(),
                options.clone(),
                piled.clone(),
            );
            tokio::spawn(async move {
                let mut i = w as u64;
                while piled.load(Ordering::Relaxed) < k as u64 {
                    // Decided commit, phase 2 failing: left in flight.
                    if let Ok(false) = one(&client, &options, branches(&urls, &options, i)).await {
                        piled.fetch_add(1, Ordering::Relaxed);
                    }
                    i += options.concurrency as u64;
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.await;
    }
    let piled = piled.load(Ordering::Relaxed);
    let pile_secs = started.elapsed().as_secs_f64();
    let addr = coordinator.addr().to_string();
    coordinator.kill();
    for b in benches {
        b.clone()
            .set_fail_phase_two(bench_pb::SetFailPhaseTwoRequest { fail: false })
            .await?;
    }
    let restarted_at = Instant::now();
    let restarted = restart(&addr)?;
    let want = base + piled * options.branches as u64;
    loop {
        if counts(benches).await?.commits >= want {
            break;
        }
        anyhow::ensure!(
            restarted_at.elapsed() < Duration::from_secs(600),
            "recovery did not finish within 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = restarted_at.elapsed().as_secs_f64();
    Ok((
        Recovery {
            transactions: piled,
            pile_up_s: pile_secs,
            seconds: secs,
            per_s: piled as f64 / secs,
        },
        restarted,
    ))
}

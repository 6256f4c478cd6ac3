//! The command driver: carries out what the engine asks (log writes and
//! forces, participant calls, retry and deadline timers) and feeds the
//! results back as events, until no call is in flight.
//!
//! All of it runs in tasks the coordinator owns ([`Inner::spawn_round`],
//! [`Inner::spawn_later`]), tracked so that shutdown can wait for them and
//! [`super::Coordinator::kill`] can stop them; never in a request's future.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use tandem_proto::v1::BranchRequest;
use tokio::task::AbortHandle;
use tracing::field::{Empty, display};
use tracing::{Instrument, Span, warn};

use super::transport::{CallError, Failure, bounded};
use super::{Entry, Inner};
use crate::engine::{Command, Event, Vote};
use crate::error::CoordError;
use crate::failpoint;
use crate::log::LogError;
use crate::model::{BranchId, Decision, Mode, TraceContext, TxState};

type CallFuture<'a> = Pin<Box<dyn Future<Output = Event> + Send + 'a>>;

impl Inner {
    /// Feeds one event to the engine and writes the record if it changed.
    pub(super) fn step(&self, entry: &Entry, event: Event) -> Result<Vec<Command>, CoordError> {
        let mut txn = entry.lock();
        let cmds = txn.handle(event, self.now())?;
        let written = cmds.iter().any(|c| {
            matches!(
                c,
                Command::Persist | Command::Force | Command::ForceDecision
            )
        });
        let result = if written {
            self.check_halted()
                .and_then(|()| match self.log.write(txn.record()) {
                    Ok(()) => Ok(cmds),
                    // An earlier flush of its first record met a presumed
                    // abort (asked about at another coordinator before it was
                    // written): abort it here instead, replacing that row.
                    Err(LogError::Refused(gtid)) if self.presumed_aborted(&gtid) => {
                        self.log.accept_presumed_abort(&gtid);
                        let cmds = if txn.record().decision == Some(Decision::Abort) {
                            // This event aborted it anyway: its own record
                            // (a first write deciding abort) replaces the
                            // row, and its rollbacks go out as they would.
                            cmds
                        } else {
                            txn.handle(Event::PresumedAborted, self.now())?
                        };
                        self.log.write(txn.record()).map_err(|e| self.halt(e))?;
                        Ok(cmds)
                    }
                    Err(e) => Err(self.halt(e)),
                })
        } else {
            Ok(cmds)
        };
        drop(txn);
        entry.changed.bump();
        result
    }

    /// Carries out `cmds` in a task of the coordinator's, and everything
    /// they lead to until no participant call is in flight. The returned
    /// future only waits for that task: dropping it changes nothing.
    pub(super) fn spawn_round(
        self: &Arc<Self>,
        entry: &Arc<Entry>,
        cmds: Vec<Command>,
    ) -> impl Future<Output = Result<(), CoordError>> + Send + 'static {
        let handle = (!cmds.is_empty()).then(|| {
            let (inner, entry) = (self.clone(), entry.clone());
            self.tasks.spawn(async move {
                tokio::select! {
                    biased;
                    r = inner.run(&entry, cmds) => r,
                    () = inner.killed.cancelled() => Err(CoordError::Unavailable(
                        "the coordinator was stopped".into(),
                    )),
                }
            })
        });
        async move {
            match handle {
                None => Ok(()),
                Some(h) => h.await.unwrap_or_else(|e| {
                    Err(CoordError::Unavailable(format!(
                        "round of calls ended: {e}"
                    )))
                }),
            }
        }
    }

    /// Carries out `cmds` and everything they lead to until no participant
    /// call is in flight. Retries are left to timers.
    async fn run(
        self: &Arc<Self>,
        entry: &Arc<Entry>,
        cmds: Vec<Command>,
    ) -> Result<(), CoordError> {
        let result = self.drive(entry, cmds).await;
        if let Err(e) = &result {
            let gtid = entry.gtid();
            warn!(%gtid, error = %e, "round of calls stopped");
            if self.log.refused(&gtid) {
                // Another coordinator runs it: nothing of ours was made
                // durable or sent in phase 2; drop our copy.
                self.forget(&gtid);
            }
            entry.changed.bump();
        }
        result
    }

    async fn drive(
        self: &Arc<Self>,
        entry: &Arc<Entry>,
        cmds: Vec<Command>,
    ) -> Result<(), CoordError> {
        let mut calls: FuturesUnordered<CallFuture<'_>> = FuturesUnordered::new();
        let mut queue = VecDeque::from(cmds);
        loop {
            while let Some(cmd) = queue.pop_front() {
                match cmd {
                    Command::Persist => {} // written by `step`
                    Command::Force => {
                        let t = Instant::now();
                        self.log
                            .force_txn(&entry.gtid())
                            .await
                            .map_err(|e| self.halt(e))?;
                        if let Some(m) = &self.metrics {
                            m.forced(t.elapsed());
                        }
                    }
                    Command::ForceDecision => {
                        let t = Instant::now();
                        match self.log.force_txn(&entry.gtid()).await {
                            Ok(()) => {}
                            Err(LogError::Refused(gtid)) if self.presumed_aborted(&gtid) => {
                                // Asked about at another coordinator before
                                // this one wrote it (one forced write per
                                // transaction): nothing was told or sent,
                                // so abort it here, replacing that row;
                                // once only (an abort refused again is not
                                // this rule's to fix).
                                self.log.accept_presumed_abort(&gtid);
                                let cmds = self.step(entry, Event::PresumedAborted)?;
                                if cmds.is_empty() {
                                    return Err(self.halt(LogError::Refused(gtid)));
                                }
                                queue.extend(cmds);
                                continue;
                            }
                            Err(e) => return Err(self.halt(e)),
                        }
                        if let Some(m) = &self.metrics {
                            m.decision_forced(t.elapsed());
                        }
                        failpoint::hit("after-decision-forced");
                        queue.extend(self.step(entry, Event::DecisionDurable)?);
                    }
                    Command::PhaseOne { branch } => {
                        failpoint::hit("after-branch-recorded");
                        calls.push(Box::pin(self.phase_one(entry, branch)))
                    }
                    Command::PhaseTwo {
                        branch,
                        commit,
                        attempt,
                    } => calls.push(Box::pin(self.phase_two(entry, branch, commit, attempt))),
                    Command::ActionLater { branch, delay } => {
                        if let Some(m) = &self.metrics {
                            m.retry();
                        }
                        self.spawn_later(
                            entry,
                            Event::ActionDue { branch },
                            tokio::time::sleep(delay),
                        );
                    }
                    Command::RetryLater { branch, delay } => {
                        if let Some(m) = &self.metrics {
                            m.retry();
                        }
                        self.spawn_later(
                            entry,
                            Event::RetryDue { branch },
                            tokio::time::sleep(delay),
                        );
                    }
                    Command::Finished => self.finished(entry),
                }
            }
            let Some(event) = calls.next().await else {
                return Ok(());
            };
            match &event {
                Event::PhaseOne { .. } => failpoint::hit("after-phase-one"),
                Event::PhaseTwo { result: Ok(()), .. } => failpoint::hit("between-phase-two"),
                _ => {}
            }
            queue.extend(self.step(entry, event)?);
        }
    }

    fn finished(&self, entry: &Entry) {
        let rec = entry.lock().record().clone();
        if let Some(m) = &self.metrics {
            m.finished(rec.mode, rec.state);
        }
        if rec.state == TxState::Stuck {
            let errors: Vec<String> = rec
                .branches
                .iter()
                .filter(|b| !b.last_error.is_empty())
                .map(|b| format!("branch {}: {}", b.id, b.last_error))
                .collect();
            warn!(
                gtid = %rec.gtid,
                decision = rec.decision.map_or("?", |d| d.name()),
                last_errors = %errors.join("; "),
                "retry policy exhausted: transaction is STUCK until `tandem tx retry`"
            );
            // The one place a transaction becomes STUCK: the engine says
            // Finished with the record STUCK (once per time it does).
            if let Some(alerter) = &self.alerter {
                alerter.stuck(&rec, self.now());
            }
        }
        self.forget(&rec.gtid);
    }

    fn branch_request(
        &self,
        entry: &Entry,
        branch: BranchId,
        attempt: u32,
    ) -> Option<(String, Mode, u64, BranchRequest, Option<TraceContext>)> {
        let txn = entry.lock();
        let rec = txn.record();
        let b = rec.branch(branch)?;
        Some((
            b.endpoint.clone(),
            b.mode,
            rec.deadline_ms,
            BranchRequest {
                gtid: rec.gtid.to_string(),
                branch_id: branch,
                resource: b.resource.clone(),
                payload: b.payload.clone(),
                attempt,
                epoch: rec.epoch,
                mode: crate::service::convert::mode_to_wire(b.mode) as i32,
            },
            rec.traceparent.clone(),
        ))
    }

    async fn phase_one(&self, entry: &Entry, branch: BranchId) -> Event {
        // A saga's action retried forward and a message's repeated
        // back-check are numbered (the check counts itself when sent).
        let attempt = entry
            .lock()
            .record()
            .branch(branch)
            .map_or(1, |b| match b.mode {
                Mode::Msg => b.attempts.max(1),
                _ => b.attempts + 1,
            });
        let Some((endpoint, mode, deadline, req, trace)) =
            self.branch_request(entry, branch, attempt)
        else {
            let vote = Vote::Failed("branch vanished".into());
            return Event::PhaseOne { branch, vote };
        };
        if let Err(e) = self.check_policy(&endpoint) {
            // Refused before dialling: the participant never heard of it.
            let vote = Vote::NotRun(e.to_string());
            return Event::PhaseOne { branch, vote };
        }
        // Cut at the global deadline: a call still out then counts as
        // failed (and gets its rollback / cancel once it returns).
        // A message's back-check comes after its deadline: it gets the
        // whole call timeout.
        let left = Duration::from_millis(deadline.saturating_sub(self.now()).max(1));
        let timeout = match mode {
            Mode::Msg => self.config.call_timeout,
            _ => self.config.call_timeout.min(left),
        };
        let span = call_span(&req, trace.as_ref(), mode.phase_one_verb());
        let trace = trace.map(|t| crate::otel::sampling::outgoing(&t, &span));
        let resource = self.metrics.as_ref().map(|_| req.resource.clone());
        let call = self
            .transport
            .phase_one(&endpoint, mode, req, trace, timeout);
        let t = Instant::now();
        let answer = bounded(timeout, call).instrument(span).await;
        if let (Some(m), Some(resource)) = (&self.metrics, resource) {
            let result = match &answer {
                Ok(v) if v.yes => "yes",
                Ok(_) => "no",
                Err(e) if matches!(e.kind, Failure::NotDelivered | Failure::Unimplemented) => {
                    "not_run"
                }
                Err(_) => "failed",
            };
            let phase = crate::metrics::phase_name(mode, true, true);
            m.call(&resource, phase, result, t.elapsed());
        }
        let vote = match answer {
            Ok(v) if v.yes => Vote::Yes(v.reply),
            Ok(v) => Vote::No(v.reason),
            // Phase 1 of this gtid may have gone out before a crash: the
            // refused connection proves nothing about that first call.
            Err(e)
                if e.kind == Failure::NotDelivered
                    && entry.lock().phase_one_maybe_sent_before() =>
            {
                Vote::Failed(e.message)
            }
            // Never ran there: nothing to roll back (DESIGN.md rule 3a).
            Err(e) if e.kind == Failure::NotDelivered => Vote::Unreachable(e.message),
            Err(e) if e.kind == Failure::Unimplemented => Vote::NotRun(e.message),
            Err(e) if e.kind == Failure::Permanent => Vote::Permanent(e.message),
            Err(e) => Vote::Failed(e.message),
        };
        Event::PhaseOne { branch, vote }
    }

    async fn phase_two(
        &self,
        entry: &Entry,
        branch: BranchId,
        commit: bool,
        attempt: u32,
    ) -> Event {
        let Some((endpoint, mode, _, req, trace)) = self.branch_request(entry, branch, attempt)
        else {
            return Event::PhaseTwo {
                branch,
                result: Ok(()),
            };
        };
        let timeout = self.config.call_timeout;
        let result = match self.check_policy(&endpoint) {
            Err(e) => Err(CallError::from(e.to_string())),
            Ok(()) => {
                let span = call_span(&req, trace.as_ref(), mode.phase_two_verb(commit));
                let trace = trace.map(|t| crate::otel::sampling::outgoing(&t, &span));
                let resource = self.metrics.as_ref().map(|_| req.resource.clone());
                let call = self
                    .transport
                    .phase_two(&endpoint, mode, commit, req, trace, timeout);
                let t = Instant::now();
                let answer = bounded(timeout, call).instrument(span).await;
                if let (Some(m), Some(resource)) = (&self.metrics, resource) {
                    let result = match &answer {
                        Ok(()) => "ok",
                        Err(e) if matches!(e.kind, Failure::Permanent | Failure::Unimplemented) => {
                            "refused"
                        }
                        Err(_) => "failed",
                    };
                    let phase = crate::metrics::phase_name(mode, false, commit);
                    m.call(&resource, phase, result, t.elapsed());
                }
                answer
            }
        };
        match result {
            Ok(()) => Event::PhaseTwo {
                branch,
                result: Ok(()),
            },
            Err(e) => {
                let gtid = entry.lock().record().gtid;
                let error = e.message;
                if matches!(e.kind, Failure::Permanent | Failure::Unimplemented) {
                    warn!(%gtid, branch, attempt, %error, "phase-2 call refused for good; not retried");
                    Event::PhaseTwoRefused { branch, error }
                } else {
                    warn!(%gtid, branch, attempt, %error, "phase-2 call failed");
                    if let Some(alerter) = &self.alerter {
                        alerter.branch_failed(
                            entry.lock().record(),
                            branch,
                            attempt,
                            &error,
                            self.now(),
                        );
                    }
                    Event::PhaseTwo {
                        branch,
                        result: Err(error),
                    }
                }
            }
        }
    }

    pub(super) fn start_deadline_timer(self: &Arc<Self>, entry: &Arc<Entry>, deadline_ms: u64) {
        let wait = Duration::from_millis(deadline_ms.saturating_sub(self.now()));
        let handle = self.spawn_later(entry, Event::DeadlinePassed, tokio::time::sleep(wait));
        *entry
            .deadline_timer
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(handle);
    }

    /// After `wait`, feeds `event` and runs what follows, in a task of the
    /// coordinator's. A timer still sleeping at shutdown just ends: the next
    /// start's recovery does what it was waiting for.
    fn spawn_later(
        self: &Arc<Self>,
        entry: &Arc<Entry>,
        event: Event,
        wait: impl Future<Output = ()> + Send + 'static,
    ) -> AbortHandle {
        let (inner, entry) = (self.clone(), entry.clone());
        let is_deadline = event == Event::DeadlinePassed;
        let task = async move {
            tokio::select! {
                biased;
                () = wait => {}
                () = inner.timers_stop.cancelled() => return,
            }
            if is_deadline {
                // Past this point the timer must not be aborted by `forget`.
                entry
                    .deadline_timer
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take();
            }
            if inner.check_halted().is_err() {
                return;
            }
            let gtid = entry.lock().record().gtid;
            match inner.step(&entry, event) {
                Ok(cmds) => {
                    if cmds.is_empty() {
                        return;
                    }
                    tokio::select! {
                        biased;
                        _ = inner.run(&entry, cmds) => {}
                        () = inner.killed.cancelled() => {}
                    }
                }
                Err(e) => warn!(%gtid, error = %e, "background step refused"),
            }
        };
        self.tasks.spawn(task).abort_handle()
    }
}

/// The span of one participant call (`tandem.call`, named after the call
/// for OpenTelemetry): `trace_id`, `gtid`, `branch_id`, `resource`,
/// `attempt`; the child of the transaction's trace context. Debug level,
/// so it costs nothing unless logs at debug or OpenTelemetry ask for it.
fn call_span(req: &BranchRequest, trace: Option<&TraceContext>, verb: &'static str) -> Span {
    // Sampled with the transaction's trace before it is built.
    let span = crate::otel::sampling::in_trace(trace.map(|t| &t.parent.trace_id), || {
        tracing::debug_span!(
            "tandem.call",
            otel.name = verb,
            trace_id = Empty,
            gtid = %req.gtid,
            branch_id = req.branch_id,
            resource = %req.resource,
            attempt = req.attempt,
        )
    });
    if let Some(t) = trace
        && !span.is_disabled()
    {
        span.record("trace_id", display(t.parent.trace_id_hex()));
        t.adopt(&span);
    }
    span
}

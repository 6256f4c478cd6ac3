//! The command driver: carries out what the engine asks (log writes and
//! forces, participant calls, retry and deadline timers) and feeds the
//! results back as events, until no call is in flight.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use tandem_proto::v1::BranchRequest;
use tokio::task::AbortHandle;
use tracing::warn;

use super::{Entry, Inner};
use crate::engine::{Command, Event, Vote};
use crate::error::CoordError;
use crate::failpoint;
use crate::model::{BranchId, Mode, TxState, now_ms};

type CallFuture<'a> = Pin<Box<dyn Future<Output = (Event, Option<Bytes>)> + Send + 'a>>;

impl Inner {
    /// Feeds one event to the engine and writes the record if it changed.
    pub(super) fn step(&self, entry: &Entry, event: Event) -> Result<Vec<Command>, CoordError> {
        let mut txn = entry.lock();
        let cmds = txn.handle(event, now_ms())?;
        if cmds.iter().any(|c| {
            matches!(
                c,
                Command::Persist | Command::Force | Command::ForceDecision
            )
        }) {
            self.check_halted()?;
            self.log.write(txn.record()).map_err(|e| self.halt(e))?;
        }
        Ok(cmds)
    }

    /// Carries out `cmds` and everything they lead to until no participant
    /// call is in flight. Retries are left to timers. Returns the phase-1
    /// replies received, by branch.
    pub(super) async fn run(
        self: &Arc<Self>,
        entry: &Arc<Entry>,
        cmds: Vec<Command>,
    ) -> Result<HashMap<BranchId, Bytes>, CoordError> {
        let mut calls: FuturesUnordered<CallFuture<'_>> = FuturesUnordered::new();
        let mut replies = HashMap::new();
        let mut queue = VecDeque::from(cmds);
        loop {
            while let Some(cmd) = queue.pop_front() {
                match cmd {
                    Command::Persist => {} // written by `step`
                    Command::Force => self.log.force().await.map_err(|e| self.halt(e))?,
                    Command::ForceDecision => {
                        self.log.force().await.map_err(|e| self.halt(e))?;
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
                    Command::RetryLater { branch, delay } => {
                        self.spawn_later(
                            entry,
                            Event::RetryDue { branch },
                            tokio::time::sleep(delay),
                        );
                    }
                    Command::Finished => {
                        let rec = entry.lock().record().clone();
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
                        }
                        self.forget(&rec.gtid);
                    }
                }
            }
            let Some((event, reply)) = calls.next().await else {
                return Ok(replies);
            };
            match (&event, reply) {
                (Event::PhaseOne { branch, .. }, reply) => {
                    failpoint::hit("after-phase-one");
                    if let Some(reply) = reply {
                        replies.insert(*branch, reply);
                    }
                }
                (Event::PhaseTwo { result: Ok(()), .. }, _) => failpoint::hit("between-phase-two"),
                _ => {}
            }
            queue.extend(self.step(entry, event)?);
        }
    }

    fn branch_request(
        &self,
        entry: &Entry,
        branch: BranchId,
        attempt: u32,
    ) -> Option<(String, Mode, u64, BranchRequest)> {
        let txn = entry.lock();
        let rec = txn.record();
        let b = rec.branch(branch)?;
        Some((
            b.endpoint.clone(),
            rec.mode,
            rec.deadline_ms,
            BranchRequest {
                gtid: rec.gtid.to_string(),
                branch_id: branch,
                resource: b.resource.clone(),
                payload: b.payload.clone(),
                attempt,
            },
        ))
    }

    async fn phase_one(&self, entry: &Entry, branch: BranchId) -> (Event, Option<Bytes>) {
        let Some((endpoint, mode, deadline, req)) = self.branch_request(entry, branch, 1) else {
            let vote = Vote::Failed("branch vanished".into());
            return (Event::PhaseOne { branch, vote }, None);
        };
        let left = Duration::from_millis(deadline.saturating_sub(now_ms()).max(1));
        let timeout = self.config.call_timeout.min(left);
        match self.pool.phase_one(&endpoint, mode, req, timeout).await {
            Ok(v) if v.yes => (
                Event::PhaseOne {
                    branch,
                    vote: Vote::Yes,
                },
                Some(v.reply),
            ),
            Ok(v) => (
                Event::PhaseOne {
                    branch,
                    vote: Vote::No(v.reason),
                },
                None,
            ),
            Err(e) => (
                Event::PhaseOne {
                    branch,
                    vote: Vote::Failed(e),
                },
                None,
            ),
        }
    }

    async fn phase_two(
        &self,
        entry: &Entry,
        branch: BranchId,
        commit: bool,
        attempt: u32,
    ) -> (Event, Option<Bytes>) {
        let Some((endpoint, mode, _, req)) = self.branch_request(entry, branch, attempt) else {
            return (
                Event::PhaseTwo {
                    branch,
                    result: Ok(()),
                },
                None,
            );
        };
        let result = self
            .pool
            .phase_two(&endpoint, mode, commit, req, self.config.call_timeout)
            .await;
        if let Err(error) = &result {
            let gtid = entry.lock().record().gtid;
            warn!(%gtid, branch, attempt, %error, "phase-2 call failed");
        }
        (Event::PhaseTwo { branch, result }, None)
    }

    pub(super) fn start_deadline_timer(self: &Arc<Self>, entry: &Arc<Entry>, deadline_ms: u64) {
        let wait = Duration::from_millis(deadline_ms.saturating_sub(now_ms()));
        let handle = self.spawn_later(entry, Event::DeadlinePassed, tokio::time::sleep(wait));
        *entry
            .deadline_timer
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(handle);
    }

    /// After `wait`, feeds `event` and runs what follows, in its own task.
    fn spawn_later(
        self: &Arc<Self>,
        entry: &Arc<Entry>,
        event: Event,
        wait: impl Future<Output = ()> + Send + 'static,
    ) -> AbortHandle {
        let (inner, entry) = (self.clone(), entry.clone());
        let is_deadline = event == Event::DeadlinePassed;
        let task: Pin<Box<dyn Future<Output = ()> + Send>> = Box::pin(async move {
            wait.await;
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
                    if let Err(e) = inner.run(&entry, cmds).await {
                        warn!(%gtid, error = %e, "background step failed");
                    }
                }
                Err(e) => warn!(%gtid, error = %e, "background step refused"),
            }
        });
        tokio::spawn(task).abort_handle()
    }
}

//! Simulated participants behind the coordinator's [`Transport`].
//!
//! Each participant keeps one barrier record per branch, with the SDK's
//! rules (idempotent phase 2, empty rollback, anti-hanging), and logs every
//! phase-2 call it applied, so the invariants can compare what happened at
//! the participants with what the coordinator decided. Calls run in tasks
//! of their own, as in a real server: a caller that gives up does not stop
//! the work. Faults: vote no, fail before or after doing the work, answer
//! late (past call timeouts and deadlines), lose the reply.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tandem_coordinator::model::{Gtid, Mode, TraceContext};
use tandem_coordinator::runtime::{CallError, CallFuture, Failure, Transport};
use tandem_proto::v1::{BranchRequest, VoteResponse};

use crate::rng::Rng;

/// A branch's barrier record at a participant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mark {
    /// Tried / prepared: holds a reservation. Since when (ms).
    Tried(u64),
    /// Voted no: holds nothing.
    Refused,
    /// Confirmed / committed.
    Confirmed,
    /// Cancelled / rolled back after a try.
    Cancelled,
    /// Cancel with no try before it.
    EmptyCancelled,
}

/// One participant service.
#[derive(Default)]
pub struct Participant {
    /// Barrier records by (gtid, branch).
    pub marks: Mutex<BTreeMap<(Gtid, u32), Mark>>,
    /// Every phase-2 call that changed something: (gtid, branch, commit).
    pub applied: Mutex<Vec<(Gtid, u32, bool)>>,
    /// Calls that contradict a decision (confirm after cancel, …).
    pub violations: Mutex<Vec<String>>,
    /// The protocol each branch was called with (first call).
    pub modes: Mutex<BTreeMap<(Gtid, u32), Mode>>,
}

impl Participant {
    /// Notes the protocol a call of branch `key` came with; a branch called
    /// with both protocols is a violation.
    fn saw(&self, key: (Gtid, u32), mode: Mode) {
        let first = *self.modes.lock().unwrap().entry(key).or_insert(mode);
        if first != mode {
            let (gtid, branch) = key;
            self.violations.lock().unwrap().push(format!(
                "{gtid} branch {branch} called with {mode:?} after {first:?}"
            ));
        }
    }

    fn try_(&self, key: (Gtid, u32), now: u64) -> bool {
        let mut marks = self.marks.lock().unwrap();
        if marks.contains_key(&key) {
            return false; // anti-hanging: a try after any record is refused
        }
        marks.insert(key, Mark::Tried(now));
        true
    }

    fn refuse(&self, key: (Gtid, u32)) {
        self.marks
            .lock()
            .unwrap()
            .entry(key)
            .or_insert(Mark::Refused);
    }

    /// Applies a phase-2 call through the barrier; `Err` for a call the
    /// barrier refuses (it is retried by the coordinator).
    pub fn finish(&self, key: (Gtid, u32), commit: bool, who: &str) -> Result<(), String> {
        let mut marks = self.marks.lock().unwrap();
        let mark = marks.get(&key).copied();
        let (gtid, branch) = key;
        let contradiction = |what: &str| {
            let v = format!("{who}: {what} on {gtid} branch {branch} (record {mark:?})");
            self.violations.lock().unwrap().push(v.clone());
            Err(v)
        };
        match (mark, commit) {
            (Some(Mark::Tried(_)), _) => {
                marks.insert(
                    key,
                    if commit {
                        Mark::Confirmed
                    } else {
                        Mark::Cancelled
                    },
                );
                self.applied.lock().unwrap().push((gtid, branch, commit));
                Ok(())
            }
            (Some(Mark::Confirmed), true) => Ok(()),
            (Some(Mark::Cancelled | Mark::EmptyCancelled | Mark::Refused), false) => Ok(()),
            (None, false) => {
                marks.insert(key, Mark::EmptyCancelled);
                Ok(())
            }
            (None, true) => contradiction("confirm without a try"),
            (Some(Mark::Refused), true) => contradiction("confirm after a no vote"),
            (Some(Mark::Confirmed), false) => contradiction("cancel after confirm"),
            (Some(Mark::Cancelled | Mark::EmptyCancelled), true) => {
                contradiction("confirm after cancel")
            }
        }
    }

    /// Branches holding a reservation since before `before` (ms).
    pub fn tried_before(&self, before: u64) -> Vec<(Gtid, u32)> {
        let marks = self.marks.lock().unwrap();
        marks
            .iter()
            .filter(|(_, m)| matches!(m, Mark::Tried(t) if *t < before))
            .map(|(k, _)| *k)
            .collect()
    }
}

/// The network: endpoint `http://p<i>:1` is participant `i`.
pub struct SimNet {
    pub participants: Vec<Arc<Participant>>,
    pub faults_on: Arc<AtomicBool>,
    pub rng: Arc<Mutex<Rng>>,
    pub clock: tandem_coordinator::runtime::Clock,
}

/// What one call does, drawn up front from the seed.
struct Plan {
    delay: Duration,
    /// Refuse (phase 1) / fail before doing anything.
    fail_before: bool,
    /// Vote no (phase 1 only).
    vote_no: bool,
    /// Do the work, then answer with an error (the reply is lost).
    lose_reply: bool,
}

impl SimNet {
    pub fn endpoint(i: usize) -> String {
        format!("http://p{i}:1")
    }

    fn participant(&self, endpoint: &str) -> Option<Arc<Participant>> {
        let i: usize = endpoint
            .strip_prefix("http://p")?
            .strip_suffix(":1")?
            .parse()
            .ok()?;
        self.participants.get(i).cloned()
    }

    fn plan(&self, phase_one: bool) -> Plan {
        let on = self.faults_on.load(Ordering::SeqCst);
        let mut rng = self.rng.lock().unwrap();
        let slow = on && rng.chance(0.05);
        Plan {
            delay: if slow {
                rng.ms(500, 4000)
            } else {
                rng.ms(1, 20)
            },
            fail_before: on && rng.chance(if phase_one { 0.03 } else { 0.10 }),
            vote_no: phase_one && rng.chance(0.05),
            lose_reply: on && rng.chance(0.04),
        }
    }
}

fn key(req: &BranchRequest) -> Option<(Gtid, u32)> {
    Some((Gtid::parse_str(&req.gtid).ok()?, req.branch_id))
}

impl Transport for SimNet {
    fn phase_one(
        &self,
        endpoint: &str,
        mode: Mode,
        req: BranchRequest,
        _trace: Option<TraceContext>,
        _timeout: Duration,
    ) -> CallFuture<'_, VoteResponse> {
        let p = self.participant(endpoint);
        if let (Some(p), Some(key)) = (&p, key(&req)) {
            p.saw(key, mode);
        }
        let plan = self.plan(true);
        let clock = self.clock.clone();
        let work = tokio::spawn(async move {
            let (Some(p), Some(key)) = (p, key(&req)) else {
                return Err("unknown participant".into());
            };
            tokio::time::sleep(plan.delay).await;
            if plan.fail_before {
                // Refused before anything ran, as a refused connection is.
                return Err(CallError::new(
                    Failure::NotDelivered,
                    "Unavailable: connection refused",
                ));
            }
            if plan.vote_no {
                p.refuse(key);
                return Ok(VoteResponse {
                    yes: false,
                    reason: "insufficient funds".into(),
                    reply: Bytes::new(),
                });
            }
            if !p.try_(key, clock.now_ms()) {
                return Ok(VoteResponse {
                    yes: false,
                    reason: "refused: branch already has a record".into(),
                    reply: Bytes::new(),
                });
            }
            if plan.lose_reply {
                return Err("Unavailable: connection reset".into());
            }
            Ok(VoteResponse {
                yes: true,
                reason: String::new(),
                reply: Bytes::from(format!("hold-{}", req.branch_id)),
            })
        });
        Box::pin(async move { work.await.unwrap_or_else(|e| Err(e.to_string().into())) })
    }

    fn phase_two(
        &self,
        endpoint: &str,
        mode: Mode,
        commit: bool,
        req: BranchRequest,
        _trace: Option<TraceContext>,
        _timeout: Duration,
    ) -> CallFuture<'_, ()> {
        let p = self.participant(endpoint);
        if let (Some(p), Some(key)) = (&p, key(&req)) {
            p.saw(key, mode);
        }
        let plan = self.plan(false);
        let work = tokio::spawn(async move {
            let (Some(p), Some(key)) = (p, key(&req)) else {
                return Err("unknown participant".into());
            };
            tokio::time::sleep(plan.delay).await;
            if plan.fail_before {
                return Err("Unavailable: connection refused".into());
            }
            p.finish(key, commit, "coordinator")?;
            if plan.lose_reply {
                return Err("Unavailable: connection reset".into());
            }
            Ok(())
        });
        Box::pin(async move { work.await.unwrap_or_else(|e| Err(e.to_string().into())) })
    }
}

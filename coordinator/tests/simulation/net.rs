//! The network between coordinator instances and participants, behind the
//! coordinator's [`Transport`].
//!
//! Each call goes to one replica of its participant, at random; some are
//! also sent to the other replica at nearly the same time (a duplicate
//! racing the first, as a retry through a load balancer does). Calls run
//! in tasks of their own, as in a real server: a caller that gives up does
//! not stop the work. Faults: the connection is refused, the reply is
//! lost, calls arrive late (past call timeouts and deadlines, after later
//! calls of the same branch), a proxy retries a phase-1 call at another
//! replica after losing the first reply. Each coordinator instance reaches the
//! network through its own [`Link`], which holds its calls while the
//! instance is paused (they arrive when it resumes, stale).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tandem_coordinator::model::{Gtid, Mode, TraceContext};
use tandem_coordinator::runtime::{CallError, CallFuture, Failure, Transport};
use tandem_coordinator::wake::Flag;
use tandem_proto::v1::participant_server::Participant as _;
use tandem_proto::v1::{BranchRequest, VoteResponse};
use tandem_sdk::server::ParticipantService;

use crate::participants::{Key, SimParticipant};
use crate::rng::Rng;

/// The participants, by endpoint `http://p<i>:1`.
pub struct SimNet {
    pub participants: Vec<Arc<SimParticipant>>,
    pub faults_on: Arc<AtomicBool>,
    pub rng: Arc<Mutex<Rng>>,
    /// The protocol each branch was first called with.
    pub modes: Mutex<BTreeMap<Key, Mode>>,
    /// Calls of a branch with another protocol than its first.
    pub violations: Mutex<Vec<String>>,
    /// Per participant: refuses every connection until then (a switch or
    /// host restart, often at the same time as a coordinator's crash).
    pub unreachable_until: Arc<Mutex<BTreeMap<usize, tokio::time::Instant>>>,
}

/// What one call does, drawn up front from the seed.
struct Plan {
    delay: Duration,
    /// The connection is refused: nothing is sent.
    refused: bool,
    /// The work is done, the reply is lost.
    lose_reply: bool,
    /// Also sent to another replica, this much later.
    duplicate: Option<Duration>,
    /// A proxy's retry (phase 1): the call first reaches another replica,
    /// whose reply is lost, and is then sent to this one; the caller hears
    /// only the second answer (the barrier's no to a repeated prepare,
    /// while the first attempt holds the work).
    retried_by_proxy: bool,
}

fn call_error(status: tonic::Status) -> CallError {
    let kind = match status.code() {
        tonic::Code::Unimplemented => Failure::Unimplemented,
        tonic::Code::FailedPrecondition if tandem_proto::rpc::is_permanent(&status) => {
            Failure::Permanent
        }
        _ => Failure::Unknown,
    };
    CallError::new(kind, format!("{:?}: {}", status.code(), status.message()))
}

/// Calls `service` as its gRPC server would be called.
pub async fn call_one(
    service: &ParticipantService,
    mode: Mode,
    req: BranchRequest,
) -> Result<VoteResponse, tonic::Status> {
    let req = tonic::Request::new(req);
    let resp = match mode {
        Mode::TwoPhase => service.prepare(req).await?,
        Mode::Tcc | Mode::Saga => service.r#try(req).await?,
        // A message's phase 1 is its back-check (branch 1 only).
        Mode::Msg => service.check(req).await?,
    };
    Ok(resp.into_inner())
}

/// Phase 2 of `req` at `service`.
pub async fn call_two(
    service: &ParticipantService,
    mode: Mode,
    commit: bool,
    req: BranchRequest,
) -> Result<(), tonic::Status> {
    let req = tonic::Request::new(req);
    match (mode, commit) {
        (Mode::TwoPhase, true) => service.commit(req).await?,
        (Mode::TwoPhase, false) => service.rollback(req).await?,
        (Mode::Tcc | Mode::Saga, true) => service.confirm(req).await?,
        (Mode::Tcc | Mode::Saga, false) => service.cancel(req).await?,
        (Mode::Msg, true) => service.deliver(req).await?,
        // As the coordinator's own transport: a dropped message's branches
        // are settled without a call.
        (Mode::Msg, false) => return Ok(()),
    };
    Ok(())
}

impl SimNet {
    pub fn endpoint(i: usize) -> String {
        format!("http://p{i}:1")
    }

    pub fn participant(&self, endpoint: &str) -> Option<Arc<SimParticipant>> {
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
            refused: on && rng.chance(if phase_one { 0.03 } else { 0.10 }),
            lose_reply: on && rng.chance(0.04),
            duplicate: (on && rng.chance(0.08)).then(|| rng.ms(0, 6)),
            retried_by_proxy: on && phase_one && rng.chance(0.02),
        }
    }

    /// Refuses every connection to participant `i` for `d`.
    pub fn cut_off(&self, i: usize, d: Duration) {
        let until = tokio::time::Instant::now() + d;
        let mut cut = self.unreachable_until.lock().unwrap();
        let at = cut.entry(i).or_insert(until);
        *at = (*at).max(until);
    }

    /// Whether connections to `endpoint` are refused at the time it is
    /// asked (the call's delay may start or end a cut-off).
    fn unreachable(&self, endpoint: &str) -> impl Fn() -> bool + Send + 'static {
        let i = endpoint
            .strip_prefix("http://p")
            .and_then(|e| e.strip_suffix(":1"))
            .and_then(|e| e.parse::<usize>().ok());
        let cut = self.unreachable_until.clone();
        move || {
            i.and_then(|i| cut.lock().unwrap().get(&i).copied())
                .is_some_and(|u| tokio::time::Instant::now() < u)
        }
    }

    fn replica(&self, p: &SimParticipant) -> usize {
        self.rng.lock().unwrap().below(p.replicas.len() as u64) as usize
    }

    /// Notes the protocol a call of a branch came with; a branch called
    /// with both protocols is a violation.
    fn saw(&self, req: &BranchRequest, mode: Mode) {
        let Ok(gtid) = Gtid::parse_str(&req.gtid) else {
            return;
        };
        let key = (gtid, req.branch_id);
        let first = *self.modes.lock().unwrap().entry(key).or_insert(mode);
        if first != mode {
            self.violations.lock().unwrap().push(format!(
                "{gtid} branch {} called with {mode:?} after {first:?}",
                req.branch_id
            ));
        }
    }

    fn phase_one(
        &self,
        endpoint: &str,
        mode: Mode,
        req: BranchRequest,
    ) -> CallFuture<'static, VoteResponse> {
        self.saw(&req, mode);
        let p = self.participant(endpoint);
        let plan = self.plan(true);
        let cut_off = self.unreachable(endpoint);
        let (first, second) = match &p {
            Some(p) => {
                let r = self.replica(p);
                (r, (r + 1) % p.replicas.len())
            }
            None => (0, 0),
        };
        let work = tokio::spawn(async move {
            let Some(p) = p else {
                return Err("unknown participant".into());
            };
            tokio::time::sleep(plan.delay).await;
            if plan.refused || cut_off() {
                return Err(CallError::new(
                    Failure::NotDelivered,
                    "Unavailable: connection refused",
                ));
            }
            if let Some(later) = plan.duplicate {
                p.races.fetch_add(1, Ordering::Relaxed);
                let (p, req) = (p.clone(), req.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(later).await;
                    let _ = call_one(&p.replicas[second], mode, req).await;
                });
            }
            if plan.retried_by_proxy {
                let _ = call_one(&p.replicas[second], mode, req.clone()).await;
            }
            let vote = call_one(&p.replicas[first], mode, req)
                .await
                .map_err(call_error)?;
            if plan.lose_reply {
                return Err("Unavailable: connection reset".into());
            }
            Ok(vote)
        });
        Box::pin(async move { work.await.unwrap_or_else(|e| Err(e.to_string().into())) })
    }

    fn phase_two(
        &self,
        endpoint: &str,
        mode: Mode,
        commit: bool,
        req: BranchRequest,
    ) -> CallFuture<'static, ()> {
        self.saw(&req, mode);
        let p = self.participant(endpoint);
        let plan = self.plan(false);
        let cut_off = self.unreachable(endpoint);
        let (first, second) = match &p {
            Some(p) => {
                let r = self.replica(p);
                (r, (r + 1) % p.replicas.len())
            }
            None => (0, 0),
        };
        let work = tokio::spawn(async move {
            let Some(p) = p else {
                return Err("unknown participant".into());
            };
            tokio::time::sleep(plan.delay).await;
            if plan.refused || cut_off() {
                return Err("Unavailable: connection refused".into());
            }
            if let Some(later) = plan.duplicate {
                p.races.fetch_add(1, Ordering::Relaxed);
                let (p, req) = (p.clone(), req.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(later).await;
                    let result = call_two(&p.replicas[second], mode, commit, req.clone()).await;
                    refused_phase_two(&p, &req, commit, result);
                });
            }
            let result = call_two(&p.replicas[first], mode, commit, req.clone()).await;
            refused_phase_two(&p, &req, commit, result.clone());
            result.map_err(call_error)?;
            if plan.lose_reply {
                return Err("Unavailable: connection reset".into());
            }
            Ok(())
        });
        Box::pin(async move { work.await.unwrap_or_else(|e| Err(e.to_string().into())) })
    }
}

/// A phase-2 call the barrier refused for contradicting the branch's
/// record (confirm after cancel, cancel after confirm, confirm with no
/// try) is a broken promise; a refusal for a stale epoch is the fence
/// working (a former owner's late call).
fn refused_phase_two(
    p: &SimParticipant,
    req: &BranchRequest,
    commit: bool,
    result: Result<(), tonic::Status>,
) {
    if let Err(s) = result
        && s.code() == tonic::Code::FailedPrecondition
        && !tandem_proto::rpc::is_permanent(&s)
        && !s.message().contains("epoch")
    {
        p.business.violation(format!(
            "coordinator (epoch {}) sent {} to {} branch {}, refused: {}",
            req.epoch,
            if commit { "commit" } else { "rollback" },
            req.gtid,
            req.branch_id,
            s.message()
        ));
    }
}

/// One coordinator instance's way onto the network: while the instance is
/// paused, its calls wait (and arrive when it resumes).
pub struct Link {
    pub net: Arc<SimNet>,
    pub paused: Arc<Flag>,
}

async fn resumed(paused: &Flag) {
    paused.cleared().await;
}

impl Transport for Link {
    fn phase_one(
        &self,
        endpoint: &str,
        mode: Mode,
        req: BranchRequest,
        _trace: Option<TraceContext>,
        _timeout: Duration,
    ) -> CallFuture<'_, VoteResponse> {
        let paused = self.paused.clone();
        let endpoint = endpoint.to_string();
        Box::pin(async move {
            resumed(&paused).await;
            self.net.phase_one(&endpoint, mode, req).await
        })
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
        let paused = self.paused.clone();
        let endpoint = endpoint.to_string();
        Box::pin(async move {
            resumed(&paused).await;
            self.net.phase_two(&endpoint, mode, commit, req).await
        })
    }
}

//! The `Coordinator` gRPC service.

use tandem_proto::v1 as pb;
use tandem_proto::v1::coordinator_server::Coordinator as CoordinatorRpc;
use tonic::{Request, Response, Status};
use tracing::field::Empty;
use tracing::instrument;

use super::convert::{
    branch_from_wire, mode_from_wire, record_to_wire, state_to_wire, timeout_from_wire,
};
use super::{abort_detail, optional_gtid, parse_gtid, request_trace};
use crate::model::Decision;
use crate::runtime::Coordinator;

/// Serves `tandem.v1.Coordinator` over a [`Coordinator`].
#[derive(Clone)]
pub struct CoordinatorService {
    coord: Coordinator,
}

impl CoordinatorService {
    /// Wraps a coordinator.
    pub fn new(coord: Coordinator) -> Self {
        CoordinatorService { coord }
    }
}

#[tonic::async_trait]
impl CoordinatorRpc for CoordinatorService {
    #[instrument(level = "debug", skip_all, fields(trace_id = Empty))]
    async fn begin(
        &self,
        req: Request<pb::BeginRequest>,
    ) -> Result<Response<pb::BeginResponse>, Status> {
        let trace = request_trace(req.metadata());
        let req = req.into_inner();
        let mode = mode_from_wire(req.mode)?;
        let chosen = optional_gtid(&req.gtid)?;
        let labels = labels_from_wire(req.labels)?;
        let gtid = self
            .coord
            .begin(
                mode,
                timeout_from_wire(req.timeout_ms),
                chosen,
                labels,
                trace,
            )
            .await?;
        tracing::debug!(%gtid, ?mode, "begun");
        Ok(Response::new(pb::BeginResponse {
            gtid: gtid.to_string(),
        }))
    }

    #[instrument(level = "debug", skip_all, fields(gtid = %req.get_ref().gtid, trace_id = Empty))]
    async fn enlist(
        &self,
        req: Request<pb::EnlistRequest>,
    ) -> Result<Response<pb::EnlistResponse>, Status> {
        request_trace(req.metadata());
        let req = req.into_inner();
        let gtid = parse_gtid(&req.gtid)?;
        let branch = branch_from_wire(req.branch)?;
        let (branch_id, reply) = self.coord.enlist(gtid, branch).await?;
        Ok(Response::new(pb::EnlistResponse { branch_id, reply }))
    }

    #[instrument(level = "debug", skip_all, fields(gtid = %req.get_ref().gtid, trace_id = Empty))]
    async fn commit(
        &self,
        req: Request<pb::CommitRequest>,
    ) -> Result<Response<pb::CommitResponse>, Status> {
        request_trace(req.metadata());
        let gtid = parse_gtid(&req.get_ref().gtid)?;
        let state = self.coord.commit(gtid).await?;
        Ok(Response::new(pb::CommitResponse {
            state: state_to_wire(state) as i32,
        }))
    }

    #[instrument(level = "debug", skip_all, fields(gtid = %req.get_ref().gtid, trace_id = Empty))]
    async fn rollback(
        &self,
        req: Request<pb::RollbackRequest>,
    ) -> Result<Response<pb::RollbackResponse>, Status> {
        request_trace(req.metadata());
        let req = req.into_inner();
        let gtid = parse_gtid(&req.gtid)?;
        let out = self.coord.rollback(gtid, req.reason).await?;
        Ok(Response::new(pb::RollbackResponse {
            state: state_to_wire(out.state) as i32,
            abort: out.abort.as_ref().map(abort_detail::to_wire),
        }))
    }

    #[instrument(level = "debug", skip_all, fields(trace_id = Empty))]
    async fn submit(
        &self,
        req: Request<pb::SubmitRequest>,
    ) -> Result<Response<pb::SubmitResponse>, Status> {
        let trace = request_trace(req.metadata());
        let req = req.into_inner();
        let mode = mode_from_wire(req.mode)?;
        let chosen = optional_gtid(&req.gtid)?;
        let labels = labels_from_wire(req.labels)?;
        let branches = req
            .branches
            .into_iter()
            .map(|b| branch_from_wire(Some(b)))
            .collect::<Result<Vec<_>, _>>()?;
        let out = self
            .coord
            .submit(
                mode,
                timeout_from_wire(req.timeout_ms),
                branches,
                chosen,
                labels,
                trace,
            )
            .await?;
        tracing::debug!(gtid = %out.gtid, state = %out.state, "submitted");
        Ok(Response::new(pb::SubmitResponse {
            gtid: out.gtid.to_string(),
            state: state_to_wire(out.state) as i32,
            reason: out.reason,
            replies: out.replies,
            abort: out.abort.as_ref().map(abort_detail::to_wire),
        }))
    }

    #[instrument(level = "debug", skip_all, fields(gtid = %req.get_ref().gtid, trace_id = Empty))]
    async fn prepare_message(
        &self,
        req: Request<pb::PrepareMessageRequest>,
    ) -> Result<Response<pb::PrepareMessageResponse>, Status> {
        let trace = request_trace(req.metadata());
        let req = req.into_inner();
        let gtid = optional_gtid(&req.gtid)?.ok_or_else(|| {
            Status::invalid_argument(
                "a message's gtid is required: the client makes it (a UUID v7) and writes it \
                 in its local transaction",
            )
        })?;
        let labels = labels_from_wire(req.labels)?;
        let check =
            branch_from_wire(Some(req.check.ok_or_else(|| {
                Status::invalid_argument("a message needs its back-check (check)")
            })?))?;
        let deliveries = req
            .branches
            .into_iter()
            .map(|b| branch_from_wire(Some(b)))
            .collect::<Result<Vec<_>, _>>()?;
        let gtid = self
            .coord
            .prepare_message(
                gtid,
                check,
                deliveries,
                timeout_from_wire(req.timeout_ms),
                labels,
                trace,
            )
            .await?;
        Ok(Response::new(pb::PrepareMessageResponse {
            gtid: gtid.to_string(),
        }))
    }

    #[instrument(level = "debug", skip_all, fields(gtid = %req.get_ref().gtid, trace_id = Empty))]
    async fn submit_message(
        &self,
        req: Request<pb::SubmitMessageRequest>,
    ) -> Result<Response<pb::SubmitMessageResponse>, Status> {
        request_trace(req.metadata());
        let gtid = parse_gtid(&req.get_ref().gtid)?;
        let state = self.coord.submit_message(gtid).await?;
        Ok(Response::new(pb::SubmitMessageResponse {
            state: state_to_wire(state) as i32,
        }))
    }

    #[instrument(level = "debug", skip_all, fields(gtid = %req.get_ref().gtid))]
    async fn get_transaction(
        &self,
        req: Request<pb::GetTransactionRequest>,
    ) -> Result<Response<pb::TransactionInfo>, Status> {
        let gtid = parse_gtid(&req.get_ref().gtid)?;
        Ok(Response::new(record_to_wire(&self.coord.get(gtid)?)))
    }

    #[instrument(level = "debug", skip_all, fields(gtid = %req.get_ref().gtid))]
    async fn get_outcome(
        &self,
        req: Request<pb::GetOutcomeRequest>,
    ) -> Result<Response<pb::GetOutcomeResponse>, Status> {
        let gtid = parse_gtid(&req.get_ref().gtid)?;
        let outcome = match self.coord.outcome(gtid)? {
            None => pb::Outcome::Pending,
            Some(Decision::Commit) => pb::Outcome::Commit,
            Some(Decision::Abort) => pb::Outcome::Abort,
        };
        Ok(Response::new(pb::GetOutcomeResponse {
            outcome: outcome as i32,
        }))
    }
}

/// Caller labels from the wire, checked (INVALID_ARGUMENT naming the key).
fn labels_from_wire(
    map: std::collections::HashMap<String, String>,
) -> Result<Vec<crate::labels::Label>, Status> {
    crate::labels::from_wire(map).map_err(|e| Status::invalid_argument(e.to_string()))
}

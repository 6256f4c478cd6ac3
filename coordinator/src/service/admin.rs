//! The `Admin` gRPC service: what operators (and `tandem tx`) call to look
//! at transactions and to drive or abort one by hand.

use tandem_proto::v1 as pb;
use tandem_proto::v1::admin_server::Admin as AdminRpc;
use tonic::{Request, Response, Status};
use tracing::instrument;

use super::convert::{mode_from_wire, record_to_wire, state_from_wire};
use super::{Caller, parse_gtid};
use crate::labels;
use crate::runtime::{Coordinator, ListQuery};

/// Default and largest page sizes of `ListTransactions`.
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

/// Serves `tandem.v1.Admin` over a [`Coordinator`].
#[derive(Clone)]
pub struct AdminService {
    coord: Coordinator,
}

impl AdminService {
    /// Wraps a coordinator.
    pub fn new(coord: Coordinator) -> Self {
        AdminService { coord }
    }
}

#[tonic::async_trait]
impl AdminRpc for AdminService {
    #[instrument(level = "debug", skip_all)]
    async fn list_transactions(
        &self,
        req: Request<pb::ListTransactionsRequest>,
    ) -> Result<Response<pb::ListTransactionsResponse>, Status> {
        let req = req.into_inner();
        let size = match req.page_size as usize {
            0 => DEFAULT_PAGE,
            n => n.min(MAX_PAGE),
        };
        let cursor = if req.page_token.is_empty() {
            None
        } else {
            Some(
                parse_gtid(&req.page_token)
                    .map_err(|_| Status::invalid_argument("bad page_token"))?,
            )
        };
        let query = list_query(req)?;
        let page = self.coord.list_page(cursor, &query, size)?;
        Ok(Response::new(pb::ListTransactionsResponse {
            transactions: page.records.iter().map(record_to_wire).collect(),
            next_page_token: page.next.map(|g| g.to_string()).unwrap_or_default(),
        }))
    }

    #[instrument(level = "debug", skip_all, fields(gtid = %req.get_ref().gtid))]
    async fn get_transaction(
        &self,
        req: Request<pb::AdminGetTransactionRequest>,
    ) -> Result<Response<pb::TransactionInfo>, Status> {
        let gtid = parse_gtid(&req.get_ref().gtid)?;
        let mut info = record_to_wire(&self.coord.get(gtid)?);
        if let Some(owner) = self.coord.owner(gtid)? {
            info.epoch = owner.epoch;
            info.owner = owner.name;
            info.owner_address = owner.address;
        }
        Ok(Response::new(info))
    }

    async fn get_stats(
        &self,
        _req: Request<pb::GetStatsRequest>,
    ) -> Result<Response<pb::StatsResponse>, Status> {
        let log = self.coord.log_stats();
        Ok(Response::new(pb::StatsResponse {
            forces: log.forces,
            flushes: log.flushes,
            live: self.coord.live_count() as u64,
            purged: self.coord.purged(),
        }))
    }

    #[instrument(level = "debug", skip_all, fields(gtid = %req.get_ref().gtid))]
    async fn retry_transaction(
        &self,
        req: Request<pb::RetryTransactionRequest>,
    ) -> Result<Response<pb::TransactionInfo>, Status> {
        let gtid = parse_gtid(&req.get_ref().gtid)?;
        self.coord.retry(gtid).await?;
        tracing::info!(%gtid, "operator retry");
        Ok(Response::new(record_to_wire(&self.coord.get(gtid)?)))
    }

    #[instrument(level = "debug", skip_all, fields(gtid = %req.get_ref().gtid))]
    async fn resolve_branch(
        &self,
        req: Request<pb::ResolveBranchRequest>,
    ) -> Result<Response<pb::TransactionInfo>, Status> {
        let by = req
            .extensions()
            .get::<Caller>()
            .map_or_else(|| "anonymous".to_string(), |c| c.0.clone());
        let req = req.into_inner();
        let gtid = parse_gtid(&req.gtid)?;
        let commit = match pb::Decision::try_from(req.outcome) {
            Ok(pb::Decision::Commit) => true,
            Ok(pb::Decision::Abort) => false,
            _ => {
                return Err(Status::invalid_argument(
                    "outcome must be DECISION_COMMIT or DECISION_ABORT",
                ));
            }
        };
        let branch = req.branch_id;
        self.coord
            .resolve(gtid, branch, commit, by.clone(), req.reason.clone())
            .await?;
        tracing::warn!(
            %gtid, branch, commit, by = %by, reason = %req.reason,
            "branch settled by hand: its participant's state is now the operator's responsibility"
        );
        Ok(Response::new(record_to_wire(&self.coord.get(gtid)?)))
    }

    #[instrument(level = "debug", skip_all, fields(gtid = %req.get_ref().gtid))]
    async fn abort_transaction(
        &self,
        req: Request<pb::AbortTransactionRequest>,
    ) -> Result<Response<pb::TransactionInfo>, Status> {
        let req = req.into_inner();
        let gtid = parse_gtid(&req.gtid)?;
        self.coord.abort(gtid, req.reason).await?;
        tracing::info!(%gtid, "operator abort");
        Ok(Response::new(record_to_wire(&self.coord.get(gtid)?)))
    }
}

/// The filters of a ListTransactions request, checked.
fn list_query(req: pb::ListTransactionsRequest) -> Result<ListQuery, Status> {
    let states = req
        .states
        .iter()
        .map(|s| state_from_wire(*s))
        .collect::<Result<Vec<_>, _>>()?;
    let wanted = labels::from_wire(req.labels)
        .map_err(|e| Status::invalid_argument(format!("labels filter: {e}")))?;
    if req.resource.len() > 256 {
        return Err(Status::invalid_argument(
            "resource filter: at most 256 bytes",
        ));
    }
    if req.endpoint.len() > 1024 {
        return Err(Status::invalid_argument(
            "endpoint filter: at most 1024 bytes",
        ));
    }
    let prefix = req.gtid_prefix.to_ascii_lowercase();
    if prefix.len() > 36 || !prefix.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
        return Err(Status::invalid_argument(
            "gtid_prefix: at most 36 hex digits and hyphens",
        ));
    }
    let mode = match pb::Mode::try_from(req.mode) {
        Ok(pb::Mode::Unspecified) => None,
        Ok(_) => Some(mode_from_wire(req.mode)?),
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "unknown mode {}",
                req.mode
            )));
        }
    };
    let some = |s: String| (!s.is_empty()).then_some(s);
    Ok(ListQuery {
        states,
        created_before_ms: (req.created_before_ms > 0).then_some(req.created_before_ms),
        labels: wanted,
        resource: some(req.resource),
        endpoint: some(req.endpoint),
        mode,
        gtid_prefix: some(prefix),
        newest_first: req.newest_first,
    })
}

//! An abort as fields on an ABORTED status: the gRPC richer error model
//! (`grpc-status-details-bin` holds a `google.rpc.Status`), carrying a
//! `tandem.v1.AbortInfo` and a `google.rpc.ErrorInfo`, so that any gRPC
//! client can read the branch, resource and the participant's reason
//! without parsing the message (`tandem_proto::rpc` declares those
//! messages).

use prost::Message;
use tandem_proto::rpc::{Any, DOMAIN, ErrorInfo, RpcStatus};
use tandem_proto::v1 as pb;

use crate::model::{AbortInfo, Gtid};

/// Type URL of the AbortInfo detail.
pub const ABORT_INFO_TYPE_URL: &str = "type.googleapis.com/tandem.v1.AbortInfo";

/// The wire form of an abort.
pub fn to_wire(a: &AbortInfo) -> pb::AbortInfo {
    use crate::model::AbortCause as C;
    let cause = match a.cause {
        C::VotedNo => pb::AbortCause::VotedNo,
        C::PhaseOneFailed => pb::AbortCause::PhaseOneFailed,
        C::Deadline => pb::AbortCause::Deadline,
        C::ClientRollback => pb::AbortCause::ClientRollback,
        C::OperatorAbort => pb::AbortCause::OperatorAbort,
        C::CoordinatorRestart => pb::AbortCause::CoordinatorRestart,
    };
    pb::AbortInfo {
        cause: cause as i32,
        branch_id: a.branch,
        resource: a.resource.clone(),
        detail: a.detail.clone(),
    }
}

/// The `grpc-status-details-bin` bytes of an ABORTED status for `abort`.
pub fn status_details(code: i32, message: &str, gtid: Gtid, abort: &AbortInfo) -> Vec<u8> {
    let info = to_wire(abort);
    let cause = pb::AbortCause::try_from(info.cause)
        .map(|c| c.as_str_name().trim_start_matches("ABORT_CAUSE_"))
        .unwrap_or("UNSPECIFIED")
        .to_string();
    let mut metadata = std::collections::HashMap::new();
    metadata.insert("gtid".to_string(), gtid.to_string());
    if abort.branch != 0 {
        metadata.insert("branch_id".to_string(), abort.branch.to_string());
        metadata.insert("resource".to_string(), abort.resource.clone());
    }
    RpcStatus {
        code,
        message: message.to_string(),
        details: vec![
            Any {
                type_url: ABORT_INFO_TYPE_URL.to_string(),
                value: info.encode_to_vec(),
            },
            ErrorInfo {
                reason: cause,
                domain: DOMAIN.to_string(),
                metadata,
            }
            .to_any(),
        ],
    }
    .encode_to_vec()
}

/// The AbortInfo detail of a status, if it carries one (for clients and
/// tests).
pub fn abort_info(status: &tonic::Status) -> Option<pb::AbortInfo> {
    let rpc = RpcStatus::decode(status.details()).ok()?;
    rpc.details
        .iter()
        .find(|d| d.type_url == ABORT_INFO_TYPE_URL)
        .and_then(|d| pb::AbortInfo::decode(d.value.as_slice()).ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::AbortCause;

    #[test]
    fn details_carry_the_abort_and_an_error_info() {
        let gtid = Gtid::now_v7();
        let abort = AbortInfo::by_branch(AbortCause::VotedNo, 2, "bank", "insufficient funds");
        let status = tonic::Status::with_details(
            tonic::Code::Aborted,
            "aborted",
            status_details(tonic::Code::Aborted as i32, "aborted", gtid, &abort).into(),
        );
        let got = abort_info(&status).expect("an AbortInfo detail");
        assert_eq!(got.cause, pb::AbortCause::VotedNo as i32);
        assert_eq!((got.branch_id, got.resource.as_str()), (2, "bank"));
        assert_eq!(got.detail, "insufficient funds");
        let rpc = RpcStatus::decode(status.details()).expect("google.rpc.Status");
        let info = ErrorInfo::decode(rpc.details[1].value.as_slice()).expect("ErrorInfo");
        assert_eq!(
            (info.reason.as_str(), info.domain.as_str()),
            ("VOTED_NO", DOMAIN)
        );
        assert_eq!(info.metadata["gtid"], gtid.to_string());
        assert_eq!(info.metadata["branch_id"], "2");
    }
}

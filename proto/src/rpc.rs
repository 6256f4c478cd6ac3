//! The three messages of gRPC's richer error model that Tandem uses,
//! declared by their field numbers (they are stable and tiny; generating
//! them would need googleapis' .proto files): a `google.rpc.Status` in the
//! `grpc-status-details-bin` trailer, holding `google.protobuf.Any`
//! details such as a `google.rpc.ErrorInfo` or a `tandem.v1.AbortInfo`.

use std::collections::HashMap;

use prost::Message;

/// The ErrorInfo domain of Tandem's details.
pub const DOMAIN: &str = "tandem.v1";

/// The ErrorInfo reason with which a participant says that a phase-2 call
/// will never succeed (with `FAILED_PRECONDITION`).
pub const PERMANENT: &str = "PERMANENT";

/// The ErrorInfo reason with which a coordinator says that another
/// coordinator of the same cluster runs the transaction (with
/// `UNAVAILABLE`); metadata [`OWNER_ADDRESS`] says where to send it.
pub const MOVED: &str = "MOVED";

/// The ErrorInfo metadata key of a [`MOVED`] status: the owner's address.
pub const OWNER_ADDRESS: &str = "owner_address";

/// Type URL of a `google.rpc.ErrorInfo` detail.
pub const ERROR_INFO_TYPE_URL: &str = "type.googleapis.com/google.rpc.ErrorInfo";

/// `google.rpc.Status`.
#[derive(Clone, PartialEq, Message)]
pub struct RpcStatus {
    /// The gRPC code.
    #[prost(int32, tag = "1")]
    pub code: i32,
    /// The status message.
    #[prost(string, tag = "2")]
    pub message: String,
    /// Typed details.
    #[prost(message, repeated, tag = "3")]
    pub details: Vec<Any>,
}

/// `google.protobuf.Any`.
#[derive(Clone, PartialEq, Message)]
pub struct Any {
    /// Which message `value` holds.
    #[prost(string, tag = "1")]
    pub type_url: String,
    /// The encoded message.
    #[prost(bytes = "vec", tag = "2")]
    pub value: Vec<u8>,
}

/// `google.rpc.ErrorInfo`.
#[derive(Clone, PartialEq, Message)]
pub struct ErrorInfo {
    /// A constant naming the cause, e.g. "VOTED_NO", "PERMANENT".
    #[prost(string, tag = "1")]
    pub reason: String,
    /// "tandem.v1".
    #[prost(string, tag = "2")]
    pub domain: String,
    /// More facts, by name.
    #[prost(map = "string, string", tag = "3")]
    pub metadata: HashMap<String, String>,
}

impl ErrorInfo {
    /// As an `Any` detail.
    pub fn to_any(&self) -> Any {
        Any {
            type_url: ERROR_INFO_TYPE_URL.to_string(),
            value: self.encode_to_vec(),
        }
    }
}

/// The ErrorInfo details of a status (none when it carries none, or they
/// do not decode).
pub fn error_infos(status: &tonic::Status) -> Vec<ErrorInfo> {
    let Ok(rpc) = RpcStatus::decode(status.details()) else {
        return Vec::new();
    };
    rpc.details
        .iter()
        .filter(|d| d.type_url == ERROR_INFO_TYPE_URL)
        .filter_map(|d| ErrorInfo::decode(d.value.as_slice()).ok())
        .collect()
}

/// Type URL of a `tandem.v1.AbortInfo` detail.
pub const ABORT_INFO_TYPE_URL: &str = "type.googleapis.com/tandem.v1.AbortInfo";

/// The `tandem.v1.AbortInfo` detail of an ABORTED status, if it has one.
pub fn abort_info(status: &tonic::Status) -> Option<crate::v1::AbortInfo> {
    let rpc = RpcStatus::decode(status.details()).ok()?;
    rpc.details
        .iter()
        .find(|d| d.type_url == ABORT_INFO_TYPE_URL)
        .and_then(|d| crate::v1::AbortInfo::decode(d.value.as_slice()).ok())
}

/// Whether a status says "this will never succeed": `FAILED_PRECONDITION`
/// with an ErrorInfo of domain [`DOMAIN`] and reason [`PERMANENT`].
pub fn is_permanent(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::FailedPrecondition
        && error_infos(status)
            .iter()
            .any(|i| i.domain == DOMAIN && i.reason == PERMANENT)
}

/// A `FAILED_PRECONDITION` status that says "this will never succeed"
/// (what a participant answers to stop the coordinator retrying).
pub fn permanent(message: impl Into<String>) -> tonic::Status {
    let message = message.into();
    let details = RpcStatus {
        code: tonic::Code::FailedPrecondition as i32,
        message: message.clone(),
        details: vec![
            ErrorInfo {
                reason: PERMANENT.to_string(),
                domain: DOMAIN.to_string(),
                metadata: HashMap::new(),
            }
            .to_any(),
        ],
    };
    tonic::Status::with_details(
        tonic::Code::FailedPrecondition,
        message,
        details.encode_to_vec().into(),
    )
}

/// An `UNAVAILABLE` status that redirects the caller: the coordinator at
/// `address` (named `owner`) runs the transaction `gtid`.
pub fn moved(message: impl Into<String>, gtid: &str, owner: &str, address: &str) -> tonic::Status {
    let message = message.into();
    let metadata = HashMap::from([
        ("gtid".to_string(), gtid.to_string()),
        ("owner".to_string(), owner.to_string()),
        (OWNER_ADDRESS.to_string(), address.to_string()),
    ]);
    let details = RpcStatus {
        code: tonic::Code::Unavailable as i32,
        message: message.clone(),
        details: vec![
            ErrorInfo {
                reason: MOVED.to_string(),
                domain: DOMAIN.to_string(),
                metadata,
            }
            .to_any(),
        ],
    };
    tonic::Status::with_details(
        tonic::Code::Unavailable,
        message,
        details.encode_to_vec().into(),
    )
}

/// The owner's address of a [`moved`] status, if `status` is one.
pub fn moved_to(status: &tonic::Status) -> Option<String> {
    if status.code() != tonic::Code::Unavailable {
        return None;
    }
    error_infos(status)
        .into_iter()
        .find(|i| i.domain == DOMAIN && i.reason == MOVED)
        .and_then(|mut i| i.metadata.remove(OWNER_ADDRESS))
        .filter(|a| !a.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_moved_status_names_the_owner_and_others_do_not() {
        let s = moved("run elsewhere", "g", "b", "http://10.0.0.2:7070");
        assert_eq!(moved_to(&s).as_deref(), Some("http://10.0.0.2:7070"));
        assert_eq!(moved_to(&tonic::Status::unavailable("x")), None);
        assert_eq!(moved_to(&permanent("x")), None);
    }

    #[test]
    fn a_permanent_status_reads_as_permanent_and_others_do_not() {
        assert!(is_permanent(&permanent("account closed")));
        assert!(!is_permanent(&tonic::Status::failed_precondition("x")));
        assert!(!is_permanent(&tonic::Status::unavailable("x")));
    }
}

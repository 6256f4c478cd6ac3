//! Tandem's gRPC contract, generated from `proto/tandem/v1/*.proto`.
//!
//! - `types.proto`: modes, states, branch and transaction records;
//! - `coordinator.proto`: the `Coordinator` service business services call;
//! - `participant.proto`: the `Participant` service the coordinator calls;
//! - `admin.proto`: the `Admin` service operators and `tandem tx` call;
//! - `bench.proto`: the echo and counters of `tandem bench`'s participants.
//!
//! Wire types only: no behaviour lives here.

/// Package `tandem.v1`.
pub mod v1 {
    #![allow(missing_docs, unreachable_pub, clippy::all)]
    tonic::include_proto!("tandem.v1");
}

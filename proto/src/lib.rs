//! Tandem's gRPC contract, generated from `proto/tandem/v1/*.proto`.
//!
//! - `types.proto`: modes, states, branch and transaction records;
//! - `coordinator.proto`: the `Coordinator` service business services call;
//! - `participant.proto`: the `Participant` service the coordinator calls;
//! - `admin.proto`: the `Admin` service operators and `tandem tx` call;
//!
//! - `tandem/bench/v1/bench.proto` (package `tandem.bench.v1`, internal): the
//!   echo and counters of `tandem bench`'s participants.
//!
//! Wire types only: no behaviour lives here ([`rpc`] adds the few
//! `google.rpc` messages of gRPC's richer error model).

pub mod rpc;

/// The encoded `FileDescriptorSet` of every `.proto` file above (and what
/// they import), so a server can answer gRPC reflection and tools such as
/// `grpcurl` work without the `.proto` files.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("tandem_descriptor");

/// Package `tandem.v1`.
pub mod v1 {
    #![allow(missing_docs, unreachable_pub, clippy::all)]
    tonic::include_proto!("tandem.v1");
}

/// Package `tandem.bench.v1`: internal to `tandem bench`, not public API.
pub mod bench {
    /// Version 1.
    pub mod v1 {
        #![allow(missing_docs, unreachable_pub, clippy::all)]
        tonic::include_proto!("tandem.bench.v1");
    }
}

//! gRPC server reflection (v1, and v1alpha for older `grpcurl`), so
//! `grpcurl -plaintext host:port list` and `describe` work without the
//! `.proto` files. Only the services this server serves are listed (the
//! descriptor set also holds `tandem.v1.Participant`, which participants
//! serve). Like health, it needs no credential: it tells the schema, which
//! is public, and nothing about transactions.

use tandem_proto::v1::admin_server::AdminServer;
use tandem_proto::v1::coordinator_server::CoordinatorServer;
use tonic::server::NamedService;
use tonic_health::pb::health_server::HealthServer;
use tonic_reflection::server::v1::{ServerReflection, ServerReflectionServer};
use tonic_reflection::server::v1alpha::{
    ServerReflection as ServerReflectionAlpha,
    ServerReflectionServer as ServerReflectionServerAlpha,
};
use tonic_reflection::server::{Builder, Error};

use super::{AdminService, CoordinatorService};

/// The services reflection lists.
fn builder() -> Builder<'static> {
    let names = [
        <CoordinatorServer<CoordinatorService> as NamedService>::NAME,
        <AdminServer<AdminService> as NamedService>::NAME,
        <HealthServer<tandem_common::health::StoppingHealth> as NamedService>::NAME,
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ];
    names.into_iter().fold(
        Builder::configure()
            .register_encoded_file_descriptor_set(tandem_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            // Both versions' descriptors, whichever one is built.
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            ),
        |b, name| b.with_service_name(name),
    )
}

/// The reflection services, v1 and v1alpha.
///
/// # Errors
///
/// A compiled descriptor set does not decode (a build defect).
pub fn reflection_services() -> Result<
    (
        ServerReflectionServer<impl ServerReflection>,
        ServerReflectionServerAlpha<impl ServerReflectionAlpha>,
    ),
    Error,
> {
    Ok((builder().build_v1()?, builder().build_v1alpha()?))
}

//! Compiles the `.proto` files with the `protoc` shipped by
//! `protoc-bin-vendored`, so a fresh machine needs no system protobuf compiler.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "tandem/v1/types.proto",
        "tandem/v1/coordinator.proto",
        "tandem/v1/participant.proto",
        "tandem/v1/admin.proto",
        "tandem/bench/v1/bench.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    // `bytes` fields as `Bytes`: payloads are passed on to participants without copies.
    config.bytes(["."]);
    // The compiled descriptors, for gRPC server reflection (`grpcurl list`).
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("tandem_descriptor.bin"))
        .compile_with_config(config, &files, &["."])?;
    Ok(())
}

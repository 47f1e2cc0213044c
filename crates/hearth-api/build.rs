fn main() -> Result<(), Box<dyn std::error::Error>> {
    // hearth's own API and Flintlock's, each with a descriptor set for gRPC reflection.
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("hearth_descriptor.bin"))
        .compile_protos(&["proto/hearth.proto"], &["proto"])?;
    // Flintlock's messages also get proto3 JSON (serde, through pbjson) for its HTTP gateway;
    // the well-known types are pbjson's, which have it.
    let flintlock = out.join("flintlock_descriptor.bin");
    tonic_prost_build::configure()
        .file_descriptor_set_path(&flintlock)
        .compile_well_known_types(true)
        .extern_path(".google.protobuf", "::pbjson_types")
        .compile_protos(&["proto/microvm/services/api/v1alpha1/microvm.proto"], &["proto"])?;
    // As grpc-gateway's marshaller: fields at their default written too (a PENDING state is
    // "PENDING", not left out), fields a client sends that it does not know ignored.
    pbjson_build::Builder::new()
        .register_descriptors(&std::fs::read(&flintlock)?)?
        .emit_fields()
        .ignore_unknown_fields()
        .build(&[".flintlock.types", ".microvm.services.api.v1alpha1"])?;
    Ok(())
}

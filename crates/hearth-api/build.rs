fn main() -> Result<(), Box<dyn std::error::Error>> {
    tonic_prost_build::configure().compile_protos(&["proto/hearth.proto"], &["proto"])?;
    // Flintlock's API, with a descriptor set for gRPC reflection.
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("flintlock_descriptor.bin"))
        .compile_protos(&["proto/microvm/services/api/v1alpha1/microvm.proto"], &["proto"])?;
    Ok(())
}

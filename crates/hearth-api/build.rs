fn main() -> Result<(), Box<dyn std::error::Error>> {
    // hearth's own API and Flintlock's, each with a descriptor set for gRPC reflection.
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("hearth_descriptor.bin"))
        .compile_protos(&["proto/hearth.proto"], &["proto"])?;
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("flintlock_descriptor.bin"))
        .compile_protos(&["proto/microvm/services/api/v1alpha1/microvm.proto"], &["proto"])?;
    Ok(())
}

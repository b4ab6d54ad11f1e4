//! Generates the protobuf types with prost-build, using the protoc binary vendored by
//! `protoc-bin-vendored` so no system protoc is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    // `proto` in this crate links to the workspace's top-level `proto/`; `cargo package`
    // copies the files it points to, so the published crate carries its own sources.
    let proto_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("proto");
    let files = ["decaton.proto", "chat.proto", "changelog.proto"].map(|f| proto_dir.join(f));
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    // The descriptor set too, for tools that handle these types by reflection (the CLI).
    config.file_descriptor_set_path(
        std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("descriptors.bin"),
    );
    config.compile_protos(&files, &[proto_dir])?;
    Ok(())
}

//! Compiles the project's `.proto` files into a descriptor set embedded in the binary, so
//! `decaton put` and `decaton tail` know the example `ChatOp` without any flag.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = ["decaton.proto", "chat.proto", "changelog.proto"].map(|f| proto_dir.join(f));
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("builtin.fds");
    let status = std::process::Command::new(protoc_bin_vendored::protoc_bin_path()?)
        .arg("--include_imports")
        .arg(format!("--proto_path={}", proto_dir.display()))
        .arg(format!("--descriptor_set_out={}", out.display()))
        .args(&files)
        .status()?;
    if !status.success() {
        return Err(format!("protoc failed ({status}) on {}", proto_dir.display()).into());
    }
    Ok(())
}

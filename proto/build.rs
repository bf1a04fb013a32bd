//! Compiles proto/dsv2/**/*.proto with protox (pure Rust, so no system `protoc` is needed) into
//! tonic + prost stubs, and writes the encoded FileDescriptorSet that server reflection serves.

use std::{env, fs, path::PathBuf};

/// The .proto files of this crate, relative to the crate root (which is also the include root,
/// so the files' import names are `dsv2/v1/inference.proto` and `dsv2/expert/v1/expert.proto`).
const PROTOS: &[&str] = &["dsv2/v1/inference.proto", "dsv2/expert/v1/expert.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }

    let mut compiler = protox::Compiler::new(["."])?;
    // Source info keeps the proto comments, which become the rustdoc of the generated types.
    compiler.include_source_info(true).include_imports(true);
    compiler.open_files(PROTOS)?;

    // Reflection clients (grpcurl, ghz) need the descriptors of every file, imports included.
    fs::write(
        out_dir.join("dsv2_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(compiler.file_descriptor_set())?;
    Ok(())
}

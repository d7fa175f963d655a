//! Compiles `proto/hci/v1/*.proto` with protox (pure Rust, no `protoc`) and
//! generates the tonic services, plus the encoded descriptor set served by
//! gRPC reflection.

use std::path::PathBuf;

use prost::Message;

const PROTOS: &[&str] = &[
    "hci/v1/resource.proto",
    "hci/v1/compute.proto",
    "hci/v1/storage.proto",
    "hci/v1/network.proto",
    "hci/v1/backup.proto",
    "hci/v1/node.proto",
    "hci/v1/event.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(PROTOS, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("hci_v1_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}

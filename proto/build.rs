//! Compiles `proto/*.proto` with protox (no system `protoc`) and generates tonic code.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_file = "proto/flotilla.proto";
    println!("cargo:rerun-if-changed={proto_file}");
    let file_descriptors = protox::compile([proto_file], ["proto"])?;
    tonic_prost_build::configure().compile_fds(file_descriptors)?;
    Ok(())
}

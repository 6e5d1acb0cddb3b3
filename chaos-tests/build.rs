//! Compiles the etcd v3 KV subset in `proto/etcd_kv.proto` with protox (no system `protoc`) and
//! generates a tonic client for it.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_file = "proto/etcd_kv.proto";
    println!("cargo:rerun-if-changed={proto_file}");
    let file_descriptors = protox::compile([proto_file], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .compile_fds(file_descriptors)?;
    Ok(())
}

//! Compiles the protos with protox (pure Rust: no system `protoc` needed).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/ambit/v1/mesh.proto", "proto/ambit/v1/ca.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Ordered maps: a resource's bytes (and so its content version) must not depend on
        // hash order, or identical resources would look changed and be resent.
        .btree_map(".")
        .compile_fds(fds)?;
    Ok(())
}

//! Compiles the test gRPC service (`tests/proto/echo.proto`) with protox, for the
//! waypoint's gRPC tests.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "tests/proto/echo.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["tests/proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}

//! Generates the Rust code for `proto/hearth/v1/pipeline.proto`.
//!
//! The .proto is parsed by `protox`, a pure-Rust compiler, so building needs no `protoc`
//! on the machine.

const PROTO: &str = "proto/hearth/v1/pipeline.proto";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed={PROTO}");
    let descriptors = protox::compile([PROTO], ["proto"])?;
    tonic_prost_build::configure()
        // Payloads as `Bytes`: a decoded frame's data is a view into the received buffer,
        // not a copy of it.
        .bytes(".hearth.v1")
        .compile_fds(descriptors)?;
    Ok(())
}

//! Helpers shared by the node's integration tests.
#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use hearth_models::ModelSource;

/// The default model, fetched by `hearth pull` (which the test script runs first).
pub fn default_model() -> ModelSource {
    let cache = std::env::var_os("HEARTH_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache/hearth")))
        .expect("HOME is set");
    let path = cache.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(path.exists(), "the default model is not at {}: run `hearth pull` first", path.display());
    ModelSource::open(&path).expect("the default model opens")
}

/// A free port on loopback.
pub fn loopback() -> SocketAddr {
    SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 0)
}

//! The fuzz corpus of `fuzz/` replayed on stable: every request body the fuzzer kept for
//! the API still parses without a panic.

#[path = "../../fuzz/replay.rs"]
mod replay;

use hearth_node::fuzzing::{self, MODEL_ID};
use serde_json::json;

#[test]
fn api_request_corpus() {
    replay::replay("api_request", fuzzing::api_request);
}

/// Requests of both endpoints, for the fuzzer to start from:
/// `cargo test -p hearth-node --test fuzz_corpus -- --ignored`.
#[test]
#[ignore = "writes the seed corpus"]
fn write_seed_corpus() {
    let requests = [
        json!({ "model": MODEL_ID, "prompt": "Once upon a time", "max_tokens": 16, "temperature": 0.7 }),
        json!({ "model": MODEL_ID, "prompt": ["one"], "stop": ["\n", "."], "top_p": 0.9, "top_k": 40, "seed": 7,
                "stream": true, "stream_options": { "include_usage": true }, "n": 1, "logprobs": null }),
        json!({ "model": MODEL_ID, "messages": [
            { "role": "system", "content": "Be brief." },
            { "role": "user", "content": [{ "type": "text", "text": "Hi" }] },
            { "role": "assistant", "content": null },
        ], "max_completion_tokens": 8, "stop": "\n", "response_format": { "type": "text" } }),
        json!({ "model": "another-model", "messages": [{ "role": "tool", "content": "x" }], "tools": [] }),
    ];
    let encoded: Vec<Vec<u8>> = requests.iter().map(|request| serde_json::to_vec(request).unwrap()).collect();
    replay::write_seeds("api_request", &encoded);
}

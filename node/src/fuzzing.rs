//! The entry point for the `api_request` fuzz target in `fuzz/`, and for the stable test
//! that replays its corpus (`tests/fuzz_corpus.rs`).
//!
//! It takes any request body, parses it as both endpoints would, and panics only if
//! parsing broke one of its promises: a panic here is a bug, whatever the body. Not part
//! of the crate's API.

use axum::response::IntoResponse;

use crate::api::{self, Endpoint, ParsedRequest, PromptSource};

/// The model the fuzzed node serves; corpus requests name it to get past the model check.
pub const MODEL_ID: &str = "fuzz-model";

/// The fuzzed model's context length, in tokens.
const CONTEXT: usize = 2048;

/// A request body sent to `/v1/completions` and to `/v1/chat/completions`.
pub fn api_request(body: &[u8]) {
    for endpoint in [Endpoint::Completions, Endpoint::Chat] {
        match api::parse_request(body, endpoint, MODEL_ID) {
            Ok(request) => check_request(request, endpoint),
            // Every refusal must turn into a response without panicking.
            Err(error) => drop(error.into_response()),
        }
    }
}

fn check_request(ParsedRequest { params, prompt }: ParsedRequest, endpoint: Endpoint) {
    match (&prompt, endpoint) {
        (PromptSource::Text(_), Endpoint::Completions) => {}
        (PromptSource::Chat(messages), Endpoint::Chat) => {
            assert!(!messages.is_empty());
            assert!(messages.iter().all(|m| ["system", "user", "assistant"].contains(&m.role.as_str())));
        }
        _ => panic!("{endpoint:?} parsed its prompt as {prompt:?}"),
    }
    // Stands in for the tokenizer: the checks below only count the prompt's tokens.
    let prompt_tokens = match &prompt {
        PromptSource::Text(text) => text.len().clamp(1, CONTEXT),
        PromptSource::Chat(messages) => messages.len().clamp(1, CONTEXT),
    };
    match api::generation_request(&params, vec![0; prompt_tokens], CONTEXT, endpoint.prompt_param()) {
        Ok(generation) => {
            assert!(generation.max_tokens >= 1);
            assert!(generation.prompt.len() + generation.max_tokens <= CONTEXT);
            assert!(generation.sampling.validate().is_ok());
            assert!(generation.stop.len() <= 4);
        }
        Err(error) => drop(error.into_response()),
    }
}

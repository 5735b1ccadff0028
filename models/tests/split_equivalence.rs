//! A model split into stages computes exactly what the whole model computes.

mod common;
mod tiny_model;

use common::{greedy, load_split, max_abs_diff, open_default_model};
use hearth_models::ModelSource;

/// Uneven splits into 2, 3 and 4 stages of a model with `n` layers.
fn uneven_splits(n: usize) -> Vec<Vec<usize>> {
    vec![vec![n / 3], vec![n / 5, n / 2 + 1], vec![1, n / 4 + 1, n - 2]]
}

fn assert_splits_match_whole(source: &ModelSource, prompt: &[u32], steps: usize) {
    let whole = load_split(source, &[]);
    let (expected_ids, expected_logits) = greedy(&whole, prompt, steps);
    for cuts in uneven_splits(source.config().num_layers) {
        let stages = load_split(source, &cuts);
        let ranges: Vec<_> = stages.iter().map(|s| s.layers()).collect();
        let (ids, logits) = greedy(&stages, prompt, steps);
        assert_eq!(ids, expected_ids, "greedy tokens differ for stages {ranges:?}");
        for (step, (a, b)) in logits.iter().zip(&expected_logits).enumerate() {
            let diff = max_abs_diff(a, b);
            assert!(diff <= 1e-4, "stages {ranges:?}, step {step}: logits differ by {diff}");
        }
    }
}

#[test]
fn default_model_splits_match_whole_model() {
    let source = open_default_model();
    // "The capital of France is"
    assert_splits_match_whole(&source, &[504, 3575, 282, 4649, 314], 8);
}

/// Stages reshaped from other stages (when a peer joins or leaves, a node keeps the layers
/// its new range shares with its old one) compute what freshly loaded ones do, bit for bit:
/// a range that shrinks, one that shifts, one that grows into the head, and the whole
/// model from a middle stage.
#[test]
fn reshaped_stages_match_freshly_loaded_ones() {
    let source = open_default_model();
    let n = source.config().num_layers;
    let prompt = [504, 3575, 282, 4649, 314];
    let (expected_ids, expected_logits) = greedy(&load_split(&source, &[]), &prompt, 6);
    let device = candle_core::Device::Cpu;
    let reshape = |from: std::ops::Range<usize>, to: std::ops::Range<usize>| {
        let stage = source.load_stage(from, &device).expect("stage loads");
        source.reshape_stage(stage, to).expect("stage reshapes")
    };
    let splits = [
        // Shrinks, and (the second) shifts into the head.
        vec![reshape(0..20, 0..12), reshape(5..20, 12..n)],
        // Grows at both ends: takes the embedding and the head on.
        vec![reshape(10..20, 0..n)],
        // From a first and a last stage: gives the embedding, resp. the head, up.
        vec![reshape(0..n, 0..9), reshape(3..n, 9..n)],
    ];
    for stages in splits {
        let ranges: Vec<_> = stages.iter().map(|s| s.layers()).collect();
        let (ids, logits) = greedy(&stages, &prompt, 6);
        assert_eq!(ids, expected_ids, "reshaped stages {ranges:?}");
        assert_eq!(logits, expected_logits, "reshaped stages {ranges:?}: logits differ");
    }
    let stage = source.load_stage(0..10, &device).expect("stage loads");
    assert!(source.reshape_stage(stage, 5..n + 1).is_err(), "a range past the model is refused");
}

#[test]
fn tiny_llama_splits_match_whole_model() {
    let dir = tiny_model::write(tiny_model::Flavor::Llama, "split-llama");
    let source = ModelSource::open(dir.path()).expect("tiny llama opens");
    assert!(source.config().tied_embeddings);
    // The folder's tokenizer.json and tokenizer_config.json load with the weights.
    let tokenizer = source.tokenizer().expect("tokenizer.json loads");
    let prompt = tokenizer.encode("w3 w17 w42 w5 w9 w11").expect("encodes");
    assert_eq!(prompt, [3, 17, 42, 5, 9, 11]);
    let template = source.chat_template(&tokenizer).expect("template").expect("tokenizer_config.json has one");
    let message = hearth_models::chat_template::ChatMessage { role: "user".into(), content: "w7".into() };
    assert_eq!(template.render(&[message], true).expect("renders"), "user: w7\nassistant:");
    assert_splits_match_whole(&source, &prompt, 6);
}

#[test]
fn tiny_qwen2_splits_match_whole_model() {
    let dir = tiny_model::write(tiny_model::Flavor::Qwen2, "split-qwen2");
    let source = ModelSource::open(dir.path()).expect("tiny qwen2 opens");
    assert!(source.config().qkv_bias);
    assert_splits_match_whole(&source, &[3, 17, 42, 5, 9, 11], 6);
}

#[test]
fn tiny_qwen3_splits_match_whole_model() {
    let dir = tiny_model::write(tiny_model::Flavor::Qwen3, "split-qwen3");
    let source = ModelSource::open(dir.path()).expect("tiny qwen3 opens");
    assert!(source.config().qk_norm);
    assert_splits_match_whole(&source, &[3, 17, 42, 5, 9, 11], 6);
}

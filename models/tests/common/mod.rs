//! Helpers shared by the model tests.
#![allow(dead_code)]

pub mod folder_reference;
pub mod llama_cpp;

use std::path::PathBuf;

use candle_core::Tensor;
use hearth_models::{ModelSource, Stage, StageCache, StageInput, StageOutput};

/// The default model, fetched by `hearth pull` (which the test script runs first).
pub fn default_model_path() -> PathBuf {
    if let Ok(path) = std::env::var("HEARTH_DEFAULT_MODEL") {
        return PathBuf::from(path);
    }
    let cache = std::env::var_os("HEARTH_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("hearth")))
        .or_else(|| std::env::var_os("HOME").map(|d| PathBuf::from(d).join(".cache/hearth")))
        .expect("HOME is set");
    cache.join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// Opens the default model, failing loudly (never skipping) when it has not been fetched.
pub fn open_default_model() -> ModelSource {
    let path = default_model_path();
    assert!(
        path.exists(),
        "the default model is not at {}: run `hearth pull` (or scripts/test.sh, which does) first",
        path.display()
    );
    ModelSource::open(&path).expect("the default model opens")
}

/// Splits `0..num_layers` at `cuts`, loading one stage per piece.
pub fn load_split(source: &ModelSource, cuts: &[usize]) -> Vec<Stage> {
    let n = source.config().num_layers;
    let bounds: Vec<usize> = std::iter::once(0).chain(cuts.iter().copied()).chain(std::iter::once(n)).collect();
    bounds
        .windows(2)
        .map(|w| source.load_stage(w[0]..w[1], &candle_core::Device::Cpu).expect("stage loads"))
        .collect()
}

/// Runs `tokens` through the stages in order and returns the last position's logits.
pub fn run_pipeline(stages: &[Stage], caches: &mut [StageCache], tokens: &[u32]) -> Vec<f32> {
    let mut hidden: Option<Tensor> = None;
    for (stage, cache) in stages.iter().zip(caches.iter_mut()) {
        let input = match &hidden {
            None => StageInput::Tokens(tokens),
            Some(h) => StageInput::Hidden(h),
        };
        match stage.forward(input, cache).expect("forward") {
            StageOutput::Hidden(h) => hidden = Some(h),
            StageOutput::Logits(logits) => return logits.to_vec1::<f32>().expect("logits"),
        }
    }
    panic!("the last stage returned no logits")
}

pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Greedy decoding: returns the generated ids and the logits of every step.
pub fn greedy(stages: &[Stage], prompt: &[u32], steps: usize) -> (Vec<u32>, Vec<Vec<f32>>) {
    let mut caches: Vec<StageCache> = stages.iter().map(|s| s.new_cache()).collect();
    let mut logits = run_pipeline(stages, &mut caches, prompt);
    let mut ids = Vec::new();
    let mut all_logits = Vec::new();
    for step in 0..steps {
        let next = argmax(&logits);
        ids.push(next);
        all_logits.push(std::mem::take(&mut logits));
        if step + 1 < steps {
            logits = run_pipeline(stages, &mut caches, &[next]);
        }
    }
    (ids, all_logits)
}

/// Logits after the prompt, then after each of `continuation`'s tokens but the last: a
/// reference's path replayed token by token, so that one near-tie cannot send two runs
/// down different texts.
pub fn teacher_forced(stages: &[Stage], prompt: &[u32], continuation: &[u32]) -> Vec<Vec<f32>> {
    let mut caches: Vec<StageCache> = stages.iter().map(|s| s.new_cache()).collect();
    let mut logits = vec![run_pipeline(stages, &mut caches, prompt)];
    for &token in &continuation[..continuation.len().saturating_sub(1)] {
        logits.push(run_pipeline(stages, &mut caches, &[token]));
    }
    logits
}

/// How far the best logit leads the second.
pub fn lead(logits: &[f32]) -> f32 {
    let best = argmax(logits) as usize;
    let second = logits.iter().enumerate().filter(|(i, _)| *i != best).map(|(_, &v)| v).fold(f32::MIN, f32::max);
    logits[best] - second
}

/// Checks each step's `ours` logits to be within `tolerance` of `theirs`, and our token
/// to be `tokens`' wherever their choice was clear (led by more than twice the
/// tolerance); prints the worst difference. `label` names the run, `whose` the reference.
pub fn check_logits(ours: &[Vec<f32>], theirs: &[Vec<f32>], tokens: &[u32], tolerance: f32, label: &str, whose: &str) {
    assert_eq!(ours.len(), theirs.len(), "{label}: steps");
    let (mut worst, mut clear) = (0.0f32, 0);
    for (step, ((ours, theirs), &token)) in ours.iter().zip(theirs).zip(tokens).enumerate() {
        assert_eq!(ours.len(), theirs.len(), "{label}: vocabulary size");
        let diff = max_abs_diff(ours, theirs);
        worst = worst.max(diff);
        assert!(diff <= tolerance, "{label}, step {step}: logits differ from {whose} by {diff}");
        if lead(theirs) > 2.0 * tolerance {
            clear += 1;
            assert_eq!(argmax(ours), token, "{label}, step {step}: another token than {whose}");
        }
    }
    eprintln!(
        "{label}: logits within {worst:.2e} of {whose}; the same token at {clear} of {} steps where its choice was clear",
        ours.len()
    );
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// The llama.cpp reference outputs for the default model.
pub fn reference() -> serde_json::Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/smollm2-q4_1.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("fixture json")
}

pub fn ids(value: &serde_json::Value) -> Vec<u32> {
    value.as_array().expect("array").iter().map(|v| v.as_u64().expect("id") as u32).collect()
}

/// Each of `cuts` (2, 3 and 4 uneven stages) generates the whole model's tokens, with
/// logits within `tolerance` of its.
pub fn check_splits(source: &ModelSource, prompt: &[u32], steps: usize, cuts: &[&[usize]], tolerance: f32, what: &str) {
    let (whole_ids, whole_logits) = greedy(&load_split(source, &[]), prompt, steps);
    for cuts in cuts {
        let (ids, split_logits) = greedy(&load_split(source, cuts), prompt, steps);
        assert_eq!(ids, whole_ids, "{what} cut at {cuts:?}: other tokens");
        for (a, b) in split_logits.iter().zip(&whole_logits) {
            let diff = max_abs_diff(a, b);
            assert!(diff <= tolerance, "{what} cut at {cuts:?}: logits differ by {diff}");
        }
    }
}

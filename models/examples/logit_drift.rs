//! How close the default model stays to llama.cpp on the golden prompts.
//!
//! ```text
//! cargo run --release -p hearth-models --example logit_drift
//! ```
//!
//! For each prompt of `tests/fixtures/smollm2-q4_1.json`, prints the largest difference
//! between our logits and llama.cpp's over llama.cpp's top five tokens at the first
//! generated position (before any divergence can compound), and how many greedy tokens
//! agree with llama.cpp's.

use std::path::PathBuf;

use candle_core::Device;
use hearth_models::{ModelSource, Stage, StageCache, StageInput, StageOutput};

type Error = Box<dyn std::error::Error>;

fn main() -> Result<(), Error> {
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/smollm2-q4_1.json");
    let reference: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture)?)?;
    let source = ModelSource::open(&default_model_path())?;
    let stage = source.load_stage(0..source.config().num_layers, &Device::Cpu)?;
    let (mut worst, mut matching) = (0.0f32, 0);
    let completions = reference["completions"].as_array().ok_or("no completions")?;
    for completion in completions {
        let prompt = ids(&completion["prompt_ids"])?;
        let expected = ids(&completion["generated_ids"])?;
        let mut cache = stage.new_cache();
        let mut logits = logits(&stage, &mut cache, &prompt)?;
        let mut drift = 0.0f32;
        for pair in completion["top5_logits_per_step"][0].as_array().ok_or("no top-5")? {
            let id = pair[0].as_u64().ok_or("no token id")? as usize;
            let theirs = pair[1].as_f64().ok_or("no logit")? as f32;
            drift = drift.max((logits[id] - theirs).abs());
        }
        let mut agreeing = 0;
        for (step, &want) in expected.iter().enumerate() {
            let next = argmax(&logits);
            if next != want {
                break;
            }
            agreeing += 1;
            if step + 1 < expected.len() {
                logits = self::logits(&stage, &mut cache, &[next])?;
            }
        }
        worst = worst.max(drift);
        matching += usize::from(agreeing == expected.len());
        println!(
            "{:<28} step-0 top-5 max |ours - llama.cpp| {drift:.4}, {agreeing}/{} tokens agree",
            completion["prompt"].to_string(),
            expected.len()
        );
    }
    println!("worst drift {worst:.4}; {matching} of {} continuations match in full", completions.len());
    Ok(())
}

fn logits(stage: &Stage, cache: &mut StageCache, tokens: &[u32]) -> Result<Vec<f32>, Error> {
    match stage.forward(StageInput::Tokens(tokens), cache)? {
        StageOutput::Logits(logits) => Ok(logits.to_vec1::<f32>()?),
        StageOutput::Hidden(_) => Err("a whole model returns logits".into()),
    }
}

fn ids(value: &serde_json::Value) -> Result<Vec<u32>, Error> {
    let array = value.as_array().ok_or("not an array of ids")?;
    Ok(array.iter().filter_map(|v| v.as_u64().map(|id| id as u32)).collect())
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

fn default_model_path() -> PathBuf {
    if let Some(path) = std::env::var_os("HEARTH_DEFAULT_MODEL") {
        return PathBuf::from(path);
    }
    let cache = std::env::var_os("HEARTH_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache/hearth")))
        .unwrap_or_else(|| PathBuf::from(".cache/hearth"));
    cache.join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
}

//! How far the default model's first-step logits are from llama.cpp's, per golden prompt.
//!
//! ```text
//! cargo run --release -p hearth-models --example logit_drift
//! ```
//!
//! For each prompt of `tests/fixtures/smollm2-q4_1.json`, prints the largest difference
//! between our logit and llama.cpp's over llama.cpp's top five tokens at the first
//! generated position (before any divergence can compound).

use std::path::PathBuf;

use candle_core::Device;
use hearth_models::{ModelSource, StageInput, StageOutput};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/smollm2-q4_1.json");
    let reference: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture)?)?;
    let source = ModelSource::open(&default_model_path())?;
    let stage = source.load_stage(0..source.config().num_layers, &Device::Cpu)?;
    let mut worst = 0.0f32;
    for completion in reference["completions"].as_array().ok_or("no completions")? {
        let ids: Vec<u32> = completion["prompt_ids"]
            .as_array()
            .ok_or("no prompt ids")?
            .iter()
            .filter_map(|v| v.as_u64().map(|id| id as u32))
            .collect();
        let mut cache = stage.new_cache();
        let StageOutput::Logits(logits) = stage.forward(StageInput::Tokens(&ids), &mut cache)? else {
            return Err("a whole model returns logits".into());
        };
        let logits = logits.to_vec1::<f32>()?;
        let mut drift = 0.0f32;
        if std::env::var_os("V").is_some() { let h = logits.iter().fold(0u64, |h, v| h.wrapping_mul(31).wrapping_add(v.to_bits() as u64)); print!("hash {h:x} "); }
        for pair in completion["top5_logits_per_step"][0].as_array().ok_or("no top-5")? {
            let (id, theirs) = (pair[0].as_u64().ok_or("id")? as usize, pair[1].as_f64().ok_or("logit")? as f32);
            drift = drift.max((logits[id] - theirs).abs());
            if std::env::var_os("V").is_some() { print!("{id}:{:.3}/{theirs:.3} ", logits[id]); }
        }
        worst = worst.max(drift);
        println!("{:<40} max |ours - llama.cpp| over the top 5: {drift:.4}", format!("{:?}", completion["prompt"]));
    }
    println!("worst: {worst:.4}");
    Ok(())
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

//! llama.cpp's outputs for synthetic models (`tests/fixtures/*_llama_cpp.json`, written by
//! `scripts/llama_cpp_reference.py`), and the comparison the tests make with them.

use std::path::PathBuf;

use hearth_models::synthetic::{write_synthetic_gguf, Quantization, Shape};
use hearth_models::Stage;
use sha2::{Digest, Sha256};

use super::{check_logits, ids, teacher_forced};

/// One model of a fixture, written again into a temporary folder.
pub struct Reference {
    pub path: PathBuf,
    pub name: String,
    pub quantization: Quantization,
    pub prompt: Vec<u32>,
    pub generated: Vec<u32>,
    /// The logits of the prompt's last position, then after each generated token.
    pub logits: Vec<Vec<f32>>,
    _dir: tempfile::TempDir,
}

fn floats(value: &serde_json::Value) -> Vec<f32> {
    value.as_array().expect("array").iter().map(|v| v.as_f64().expect("number") as f32).collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Each model of `fixtures/{fixture}`, written again here and checked to be the very file
/// llama.cpp ran (`rerun` says how to write the fixture again when it is not).
pub fn references(fixture: &str, rerun: &str) -> Vec<Reference> {
    let path = format!("{}/tests/fixtures/{fixture}", env!("CARGO_MANIFEST_DIR"));
    let fixture: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("fixture json");
    let prompt = ids(&fixture["prompt_ids"]);
    fixture["models"]
        .as_array()
        .expect("models")
        .iter()
        .map(|model| {
            let shape: Shape = model["shape"].as_str().expect("shape").parse().expect("a known shape");
            let quantization: Quantization = model["quantization"].as_str().expect("quant").parse().expect("known");
            let seed = model["seed"].as_u64().expect("seed");
            let dir = tempfile::tempdir().expect("temp dir");
            let path = dir.path().join(format!("{shape}-{quantization}.gguf"));
            write_synthetic_gguf(shape, quantization, seed, &path).expect("writes");
            let sha = hex(&Sha256::digest(std::fs::read(&path).expect("reads")));
            assert_eq!(
                sha,
                model["sha256"].as_str().expect("sha256"),
                "{shape} {quantization}: the writer no longer writes the file llama.cpp ran; run {rerun} again"
            );
            let prompt_logits = model["prompt_logits"].as_array().expect("rows");
            let mut logits = vec![floats(prompt_logits.last().expect("a row"))];
            logits.extend(model["step_logits"].as_array().expect("rows").iter().map(floats));
            logits.pop(); // after the last token: greedy stops before computing it
            Reference {
                path,
                name: format!("{shape} {quantization}"),
                quantization,
                prompt: prompt.clone(),
                generated: ids(&model["generated_ids"]),
                logits,
                _dir: dir,
            }
        })
        .collect()
}

/// Replays `reference`'s greedy path through `stages` and checks every step's logits to
/// be within `tolerance` of llama.cpp's, and its token to be llama.cpp's wherever
/// llama.cpp's choice was clear (led by more than twice the tolerance). `label` names the
/// run in messages.
pub fn check_against(reference: &Reference, stages: &[Stage], tolerance: f32, label: &str) {
    let logits = teacher_forced(stages, &reference.prompt, &reference.generated);
    check_logits(&logits, &reference.logits, &reference.generated, tolerance, label, "llama.cpp's");
}

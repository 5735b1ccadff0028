//! Plain f32 arithmetic over a Hugging Face folder's tensors, for the references the folder
//! tests write from the Hugging Face modeling code: a route into the weights that shares
//! nothing with `hearth_models` but the file.

use std::collections::HashMap;
use std::path::Path;

/// A folder's `model.safetensors` as f32 values (bytes as their values), by tensor name.
pub struct Weights(HashMap<String, (Vec<usize>, Vec<f32>)>);

impl Weights {
    /// Reads `dir/model.safetensors`, dropping `prefix` from the names that carry it (the
    /// decoder of a multimodal checkpoint).
    pub fn load(dir: &Path, prefix: &str) -> Self {
        let tensors = candle_core::safetensors::load(dir.join("model.safetensors"), &candle_core::Device::Cpu)
            .expect("model.safetensors")
            .into_iter()
            .map(|(name, t)| {
                // Bytes too (gpt-oss's MXFP4 blocks), as their values.
                let values = t
                    .to_dtype(candle_core::DType::F32)
                    .and_then(|t| t.flatten_all())
                    .and_then(|t| t.to_vec1::<f32>())
                    .expect("f32 values");
                let name = name.strip_prefix(prefix).map(str::to_owned).unwrap_or(name);
                (name, (t.dims().to_vec(), values))
            })
            .collect();
        Self(tensors)
    }

    /// Every tensor: its name, shape and values.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &(Vec<usize>, Vec<f32>))> {
        self.0.iter()
    }

    pub fn tensor(&self, name: &str) -> &[f32] {
        &self.0.get(name).unwrap_or_else(|| panic!("the folder has {name}")).1
    }

    /// `x` (rows of `name`'s column count) times `name` transposed: a `Linear` without bias.
    pub fn linear(&self, name: &str, x: &[f32]) -> Vec<f32> {
        let (dims, w) = self.0.get(name).unwrap_or_else(|| panic!("the folder has {name}"));
        let (rows, cols) = (dims[0], dims[1]);
        x.chunks_exact(cols)
            .flat_map(|x| (0..rows).map(move |r| w[r * cols..(r + 1) * cols].iter().zip(x).map(|(a, b)| a * b).sum()))
            .collect()
    }

    /// RMS norm of every `weight.len()`-wide piece of `x`, scaled by `offset + weight`
    /// (Gemma stores its norms less one).
    pub fn rms_norm(&self, name: &str, x: &[f32], eps: f32, offset: f32) -> Vec<f32> {
        let weight = self.tensor(name);
        x.chunks_exact(weight.len())
            .flat_map(|x| {
                let scale = 1.0 / (x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32 + eps).sqrt();
                x.iter().zip(weight).map(move |(v, w)| v * scale * (offset + w))
            })
            .collect()
    }
}

pub fn softmax(x: &[f32]) -> Vec<f32> {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = x.iter().map(|v| (v - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    exp.iter().map(|e| e / sum).collect()
}

/// A reference's greedy path: its `steps` tokens after `prompt` and the logits it chose
/// each from, `logits` recomputing the whole sequence each time.
pub fn greedy_path(prompt: &[u32], steps: usize, logits: impl Fn(&[u32]) -> Vec<f32>) -> (Vec<u32>, Vec<Vec<f32>>) {
    let mut tokens = prompt.to_vec();
    let mut all = Vec::new();
    for _ in 0..steps {
        let step = logits(&tokens);
        tokens.push(super::argmax(&step));
        all.push(step);
    }
    (tokens.split_off(prompt.len()), all)
}

/// The one-line error `hearth_models` gives for the folder `dir` once its `config.json`
/// says it is stored as `quantization` (a `quantization_config`).
pub fn refusal_when_quantized(dir: &Path, quantization: serde_json::Value) -> String {
    let path = dir.join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
    config["quantization_config"] = quantization;
    std::fs::write(&path, config.to_string()).expect("write");
    let error = hearth_models::ModelSource::open(dir).err().expect("refused").to_string();
    assert!(!error.contains('\n'), "one line: {error}");
    error
}

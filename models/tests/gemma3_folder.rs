//! Gemma 3 from Hugging Face folders (`gemma3_text`, and a multimodal checkpoint's
//! decoder): both compute paths compute what a plain f32 forward written here from the
//! folder's tensors computes, and 2, 3 and 4 stages compute what the whole model does.
//!
//! The reference follows the Hugging Face modeling code (`Gemma3ForCausalLM`): the
//! embedding scaled by `sqrt(hidden_size)`, RMS norms that scale by `1 + w`, q/k norms,
//! scores scaled by `query_pre_attn_scalar^-1/2`, sliding layers that see their last
//! `sliding_window` positions with RoPE of `rope_local_base_freq`, norms after attention
//! and after the MLP, and `gelu_pytorch_tanh`. It recomputes the whole sequence at each
//! step, with no cache: a route into the weights that shares nothing with `hearth_models`
//! but the file.

mod common;
mod tiny_model;

use std::path::Path;

use common::folder_reference::{greedy_path, softmax, Weights};
use common::{check_logits, check_splits, load_split, teacher_forced};
use hearth_models::{Architecture, ComputePath, ModelSource};
use tiny_model::Flavor;

/// The native path keeps K and V in f16 and looks GELU up in ggml's f16 table, as
/// llama.cpp does (measured: 3.6e-3); candle's ops compute in f32 (5.6e-6).
const NATIVE_TOLERANCE: f32 = 1e-2;
const CANDLE_TOLERANCE: f32 = 1e-4;
const SPLIT_TOLERANCE: f32 = 1e-4;
/// Long enough to slide past the window of 3 many times over.
const PROMPT: [u32; 9] = [3, 17, 42, 5, 9, 11, 60, 23, 8];
const STEPS: usize = 8;

/// A folder's weights as f32 vectors, with the config.json values the reference needs.
struct Reference {
    weights: Weights,
    layers: usize,
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    eps: f32,
    query_scale: f32,
    window: usize,
    /// For each layer: whether it slides.
    sliding: Vec<bool>,
    theta: f32,
    local_theta: f32,
}

impl Reference {
    fn load(dir: &Path) -> Self {
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).expect("config.json")).expect("json");
        let config = if config["model_type"] == "gemma3" { config["text_config"].clone() } else { config };
        let int = |key: &str| config[key].as_u64().unwrap_or_else(|| panic!("config.json has {key}")) as usize;
        let float = |key: &str| config[key].as_f64().unwrap_or_else(|| panic!("config.json has {key}")) as f32;
        let sliding = config["layer_types"]
            .as_array()
            .expect("layer_types")
            .iter()
            .map(|kind| kind == "sliding_attention")
            .collect();
        Self {
            weights: Weights::load(dir, "language_model."),
            layers: int("num_hidden_layers"),
            hidden: int("hidden_size"),
            heads: int("num_attention_heads"),
            kv_heads: int("num_key_value_heads"),
            head_dim: int("head_dim"),
            eps: float("rms_norm_eps"),
            query_scale: 1.0 / float("query_pre_attn_scalar").sqrt(),
            window: int("sliding_window"),
            sliding,
            theta: float("rope_theta"),
            local_theta: float("rope_local_base_freq"),
        }
    }

    fn linear(&self, name: &str, x: &[f32]) -> Vec<f32> {
        self.weights.linear(name, x)
    }

    /// Gemma's RMS norm: scaled by `1 + w`.
    fn rms_norm(&self, name: &str, x: &[f32]) -> Vec<f32> {
        self.weights.rms_norm(name, x, self.eps, 1.0)
    }

    /// Rotates every head of every position in place (pairs `i`, `i + d/2`).
    fn rope(&self, x: &mut [f32], heads: usize, theta: f32) {
        let d = self.head_dim;
        for (position, row) in x.chunks_exact_mut(heads * d).enumerate() {
            for head in row.chunks_exact_mut(d) {
                for i in 0..d / 2 {
                    let angle = position as f32 * theta.powf(-2.0 * i as f32 / d as f32);
                    let (sin, cos) = angle.sin_cos();
                    let (a, b) = (head[i], head[i + d / 2]);
                    head[i] = a * cos - b * sin;
                    head[i + d / 2] = b * cos + a * sin;
                }
            }
        }
    }

    fn attention(&self, layer: usize, h: &[f32]) -> Vec<f32> {
        let p = format!("model.layers.{layer}.self_attn");
        let (d, n) = (self.head_dim, h.len() / self.hidden);
        let projection = |name: &str| self.linear(&format!("{p}.{name}.weight"), h);
        let (q, k, v) = (projection("q_proj"), projection("k_proj"), projection("v_proj"));
        let mut q = self.rms_norm(&format!("{p}.q_norm.weight"), &q);
        let mut k = self.rms_norm(&format!("{p}.k_norm.weight"), &k);
        let sliding = self.sliding[layer];
        let theta = if sliding { self.local_theta } else { self.theta };
        self.rope(&mut q, self.heads, theta);
        self.rope(&mut k, self.kv_heads, theta);
        let (q_width, kv_width) = (self.heads * d, self.kv_heads * d);
        let mut out = vec![0.0; n * q_width];
        for t in 0..n {
            // A sliding layer's query sees the positions less than `window` before it.
            let first = if sliding { (t + 1).saturating_sub(self.window) } else { 0 };
            for head in 0..self.heads {
                let kv_head = head / (self.heads / self.kv_heads);
                let query = &q[t * q_width + head * d..][..d];
                let scores: Vec<f32> = (first..=t)
                    .map(|s| {
                        let key = &k[s * kv_width + kv_head * d..][..d];
                        query.iter().zip(key).map(|(a, b)| a * b).sum::<f32>() * self.query_scale
                    })
                    .collect();
                let weights = softmax(&scores);
                for (s, weight) in (first..=t).zip(&weights) {
                    let value = &v[s * kv_width + kv_head * d..][..d];
                    for (o, value) in out[t * q_width + head * d..][..d].iter_mut().zip(value) {
                        *o += weight * value;
                    }
                }
            }
        }
        self.linear(&format!("{p}.o_proj.weight"), &out)
    }

    /// `down(gelu_tanh(gate(x)) * up(x))`.
    fn mlp(&self, layer: usize, h: &[f32]) -> Vec<f32> {
        let name = |w: &str| format!("model.layers.{layer}.mlp.{w}.weight");
        let (gate, up) = (self.linear(&name("gate_proj"), h), self.linear(&name("up_proj"), h));
        let gelu = |x: f32| 0.5 * x * (1.0 + ((2.0 / std::f32::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh());
        let inner: Vec<f32> = gate.iter().zip(&up).map(|(&g, &u)| gelu(g) * u).collect();
        self.linear(&name("down_proj"), &inner)
    }

    /// The logits of the last position of `tokens`.
    fn logits(&self, tokens: &[u32]) -> Vec<f32> {
        let embedding = self.weights.tensor("model.embed_tokens.weight");
        let scale = (self.hidden as f32).sqrt();
        let mut x: Vec<f32> = tokens
            .iter()
            .flat_map(|&t| embedding[t as usize * self.hidden..][..self.hidden].iter().map(|v| v * scale))
            .collect();
        for layer in 0..self.layers {
            let p = format!("model.layers.{layer}");
            let attended = self.attention(layer, &self.rms_norm(&format!("{p}.input_layernorm.weight"), &x));
            let attended = self.rms_norm(&format!("{p}.post_attention_layernorm.weight"), &attended);
            x.iter_mut().zip(attended).for_each(|(x, a)| *x += a);
            let mixed = self.mlp(layer, &self.rms_norm(&format!("{p}.pre_feedforward_layernorm.weight"), &x));
            let mixed = self.rms_norm(&format!("{p}.post_feedforward_layernorm.weight"), &mixed);
            x.iter_mut().zip(mixed).for_each(|(x, m)| *x += m);
        }
        let last = self.rms_norm("model.norm.weight", &x[x.len() - self.hidden..]);
        self.linear("model.embed_tokens.weight", &last)
    }
}

/// Loads, runs on both paths against the reference (teacher-forced on its greedy tokens),
/// and splits.
fn check(flavor: Flavor) {
    let dir = tiny_model::write(flavor, &format!("{flavor:?}").to_lowercase());
    let reference = Reference::load(dir.path());
    let (generated, expected) = greedy_path(&PROMPT, STEPS, |tokens| reference.logits(tokens));
    let generated = &generated[..];

    for (compute, tolerance) in [(ComputePath::Native, NATIVE_TOLERANCE), (ComputePath::CandleOps, CANDLE_TOLERANCE)] {
        let what = format!("tiny {flavor:?} folder on {compute:?}");
        let mut source = ModelSource::open(dir.path()).expect("the folder opens");
        source.set_compute_path(compute);
        let config = source.config();
        assert_eq!(config.architecture, Architecture::Gemma3, "{what}");
        assert!(config.tied_embeddings, "{what}: the head is the embedding");
        let windows: Vec<Option<usize>> = (0..config.num_layers).map(|i| config.attention_window(i)).collect();
        let w = Some(tiny_model::GEMMA_WINDOW);
        assert_eq!(windows, [w, w, None, w, w, None], "{what}: which layers slide");
        let logits = teacher_forced(&load_split(&source, &[]), &PROMPT, generated);
        check_logits(&logits, &expected, generated, tolerance, &what, "the f32 reference's");
        check_splits(&source, &PROMPT, STEPS, &[&[2], &[1, 4], &[1, 3, 5]], SPLIT_TOLERANCE, &what);
    }
}

#[test]
fn a_gemma3_folder_computes_what_the_reference_does_on_both_paths_whole_and_split() {
    check(Flavor::Gemma3);
}

#[test]
fn a_multimodal_gemma3_checkpoints_decoder_computes_the_same() {
    check(Flavor::Gemma3Multimodal);
}

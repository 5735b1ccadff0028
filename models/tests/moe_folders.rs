//! Mixtures of experts from Hugging Face folders (Mixtral's and Qwen3-MoE's tensor names
//! and config.json keys): they load, both compute paths compute what a plain f32 forward
//! written here from the folder's tensors computes, and 2, 3 and 4 stages compute what the
//! whole model does.
//!
//! The reference follows the Hugging Face modeling code (`MixtralSparseMoeBlock`,
//! `Qwen3MoeSparseMoeBlock`): softmax over every expert's router logit, the top
//! `num_experts_per_tok`, renormalized, each expert a SwiGLU. It recomputes the whole
//! sequence at each step, with no cache and no quantization: a route into the weights
//! that shares nothing with `hearth_models` but the file.

mod common;
mod tiny_model;

use std::path::Path;

use common::folder_reference::{greedy_path, softmax, Weights};
use common::{check_logits, check_splits, load_split, teacher_forced};
use hearth_models::{ComputePath, ModelSource};
use tiny_model::Flavor;

/// The native path keeps K and V in f16, as llama.cpp does; candle's ops in f32.
const NATIVE_TOLERANCE: f32 = 5e-3;
const CANDLE_TOLERANCE: f32 = 1e-4;
const SPLIT_TOLERANCE: f32 = 1e-4;
const PROMPT: [u32; 6] = [3, 17, 42, 5, 9, 11];
const STEPS: usize = 8;

/// A folder's weights as f32 vectors, with the config.json values the reference needs.
struct Reference {
    weights: Weights,
    layers: usize,
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    experts: usize,
    experts_used: usize,
    normalize: bool,
    eps: f32,
    theta: f32,
    tied: bool,
    /// Mixtral's names (`block_sparse_moe`, `w1`/`w2`/`w3`) or Qwen3-MoE's (`mlp`, `*_proj`).
    mixtral: bool,
    qk_norm: bool,
}

impl Reference {
    fn load(dir: &Path) -> Self {
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).expect("config.json")).expect("json");
        let int = |key: &str| config[key].as_u64().unwrap_or_else(|| panic!("config.json has {key}")) as usize;
        let mixtral = config["model_type"] == "mixtral";
        Self {
            weights: Weights::load(dir, ""),
            layers: int("num_hidden_layers"),
            hidden: int("hidden_size"),
            heads: int("num_attention_heads"),
            kv_heads: int("num_key_value_heads"),
            head_dim: int("head_dim"),
            experts: int(if mixtral { "num_local_experts" } else { "num_experts" }),
            experts_used: int("num_experts_per_tok"),
            normalize: mixtral || config["norm_topk_prob"].as_bool().unwrap_or(false),
            eps: config["rms_norm_eps"].as_f64().expect("rms_norm_eps") as f32,
            theta: config["rope_theta"].as_f64().expect("rope_theta") as f32,
            tied: config["tie_word_embeddings"].as_bool().unwrap_or(false),
            mixtral,
            qk_norm: config["model_type"] == "qwen3_moe",
        }
    }

    fn linear(&self, name: &str, x: &[f32]) -> Vec<f32> {
        self.weights.linear(name, x)
    }

    fn rms_norm(&self, name: &str, x: &[f32]) -> Vec<f32> {
        self.weights.rms_norm(name, x, self.eps, 0.0)
    }

    /// Rotates every head of every position in place (pairs `i`, `i + d/2`).
    fn rope(&self, x: &mut [f32], heads: usize) {
        let d = self.head_dim;
        for (position, row) in x.chunks_exact_mut(heads * d).enumerate() {
            for head in row.chunks_exact_mut(d) {
                for i in 0..d / 2 {
                    let angle = position as f32 * self.theta.powf(-2.0 * i as f32 / d as f32);
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
        let (mut q, mut k, v) = (projection("q_proj"), projection("k_proj"), projection("v_proj"));
        if self.qk_norm {
            q = self.rms_norm(&format!("{p}.q_norm.weight"), &q);
            k = self.rms_norm(&format!("{p}.k_norm.weight"), &k);
        }
        self.rope(&mut q, self.heads);
        self.rope(&mut k, self.kv_heads);
        let (q_width, kv_width) = (self.heads * d, self.kv_heads * d);
        let mut out = vec![0.0; n * q_width];
        for t in 0..n {
            for head in 0..self.heads {
                let kv_head = head / (self.heads / self.kv_heads);
                let query = &q[t * q_width + head * d..][..d];
                let scores: Vec<f32> = (0..=t)
                    .map(|s| {
                        let key = &k[s * kv_width + kv_head * d..][..d];
                        query.iter().zip(key).map(|(a, b)| a * b).sum::<f32>() / (d as f32).sqrt()
                    })
                    .collect();
                let weights = softmax(&scores);
                for (s, weight) in weights.iter().enumerate() {
                    let value = &v[s * kv_width + kv_head * d..][..d];
                    for (o, value) in out[t * q_width + head * d..][..d].iter_mut().zip(value) {
                        *o += weight * value;
                    }
                }
            }
        }
        self.linear(&format!("{p}.o_proj.weight"), &out)
    }

    fn experts(&self, layer: usize, h: &[f32]) -> Vec<f32> {
        let (block, [gate, up, down]) = if self.mixtral {
            (format!("model.layers.{layer}.block_sparse_moe"), ["w1", "w3", "w2"])
        } else {
            (format!("model.layers.{layer}.mlp"), ["gate_proj", "up_proj", "down_proj"])
        };
        let mut out = Vec::with_capacity(h.len());
        for x in h.chunks_exact(self.hidden) {
            let probs = softmax(&self.linear(&format!("{block}.gate.weight"), x));
            let mut order: Vec<usize> = (0..self.experts).collect();
            order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
            let chosen = &order[..self.experts_used];
            let sum: f32 = chosen.iter().map(|&e| probs[e]).sum();
            let mut mixed = vec![0.0; self.hidden];
            for &e in chosen {
                let weight = if self.normalize { probs[e] / sum } else { probs[e] };
                let name = |w: &str| format!("{block}.experts.{e}.{w}.weight");
                let g = self.linear(&name(gate), x);
                let u = self.linear(&name(up), x);
                let inner: Vec<f32> = g.iter().zip(&u).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect();
                for (m, y) in mixed.iter_mut().zip(self.linear(&name(down), &inner)) {
                    *m += weight * y;
                }
            }
            out.extend(mixed);
        }
        out
    }

    /// The logits of the last position of `tokens`.
    fn logits(&self, tokens: &[u32]) -> Vec<f32> {
        let embedding = self.weights.tensor("model.embed_tokens.weight");
        let mut x: Vec<f32> =
            tokens.iter().flat_map(|&t| embedding[t as usize * self.hidden..][..self.hidden].iter().copied()).collect();
        for layer in 0..self.layers {
            let p = format!("model.layers.{layer}");
            let attended = self.attention(layer, &self.rms_norm(&format!("{p}.input_layernorm.weight"), &x));
            x.iter_mut().zip(attended).for_each(|(x, a)| *x += a);
            let mixed = self.experts(layer, &self.rms_norm(&format!("{p}.post_attention_layernorm.weight"), &x));
            x.iter_mut().zip(mixed).for_each(|(x, m)| *x += m);
        }
        let last = self.rms_norm("model.norm.weight", &x[x.len() - self.hidden..]);
        self.linear(if self.tied { "model.embed_tokens.weight" } else { "lm_head.weight" }, &last)
    }
}

/// Loads, runs on both paths against the reference (teacher-forced on its greedy tokens),
/// and splits.
fn check(flavor: Flavor) {
    let dir = tiny_model::write(flavor, &format!("moe-{flavor:?}").to_lowercase());
    let reference = Reference::load(dir.path());
    let (generated, expected) = greedy_path(&PROMPT, STEPS, |tokens| reference.logits(tokens));
    let generated = &generated[..];

    for (compute, tolerance) in [(ComputePath::Native, NATIVE_TOLERANCE), (ComputePath::CandleOps, CANDLE_TOLERANCE)] {
        let what = format!("tiny {flavor:?} folder on {compute:?}");
        let mut source = ModelSource::open(dir.path()).expect("the folder opens");
        source.set_compute_path(compute);
        let moe = source.config().moe.clone().expect("read as a mixture of experts");
        let expected_moe = (tiny_model::EXPERTS, tiny_model::EXPERTS_USED, true);
        assert_eq!((moe.experts, moe.experts_used, moe.normalize_weights), expected_moe, "{what}");
        let logits = teacher_forced(&load_split(&source, &[]), &PROMPT, generated);
        check_logits(&logits, &expected, generated, tolerance, &what, "the f32 reference's");
        check_splits(&source, &PROMPT, STEPS, &[&[2], &[1, 4], &[1, 2, 5]], SPLIT_TOLERANCE, &what);
    }
}

#[test]
fn a_mixtral_folder_computes_what_the_reference_does_on_both_paths_whole_and_split() {
    check(Flavor::Mixtral);
}

#[test]
fn a_qwen3_moe_folder_computes_what_the_reference_does_on_both_paths_whole_and_split() {
    check(Flavor::Qwen3Moe);
}

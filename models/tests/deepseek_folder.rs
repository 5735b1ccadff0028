//! DeepSeek-V2/V3 (and Kimi K2, which is V3's shape) from Hugging Face folders: a tiny
//! folder of each flavour, named and configured as the real checkpoints are, loads; both
//! compute paths compute what a plain f32 forward written here from the folder computes;
//! and 2, 3 and 4 stages, cut right after the dense layer and between expert layers,
//! compute what the whole model does.
//!
//! The reference follows the Hugging Face modeling code (`DeepseekV3Attention`,
//! `DeepseekV3MoE`), not llama.cpp's: latent attention computed the plain way (keys and
//! values expanded from the latent per head, with no absorption and no cache), YaRN's
//! frequencies and score scale, routing by sigmoid with the correction bias and
//! group-limited top-k, shared experts, the first layer dense. Where the two differ by
//! design, it takes llama.cpp's choice, which is what Hearth promises: experts outside the
//! chosen groups are masked to minus infinity (Hugging Face uses 0, which only differs when
//! every chosen score is negative).

mod common;
mod tiny_model;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use common::folder_reference::{greedy_path, refusal_when_quantized, softmax, Weights};
use common::{check_logits, check_splits, load_split, teacher_forced};
use hearth_models::{ComputePath, ModelSource};

/// The native path keeps the latent cache in f16, as llama.cpp does; candle's ops in f32.
const NATIVE_TOLERANCE: f32 = 5e-3;
const CANDLE_TOLERANCE: f32 = 1e-4;
const SPLIT_TOLERANCE: f32 = 1e-4;
const PROMPT: [u32; 6] = [3, 17, 42, 5, 9, 11];
const STEPS: usize = 8;

const VOCAB: usize = tiny_model::VOCAB;
const HIDDEN: usize = 32;
const LAYERS: usize = 4;
const DENSE_LAYERS: usize = 1;
const HEADS: usize = 4;
const QUERY_RANK: usize = 16;
const LATENT_RANK: usize = 16;
const ROPE_DIM: usize = 8;
const NOPE_DIM: usize = 8;
/// Unlike the real models, values are narrower than keys, so a swapped split shows.
const VALUE_DIM: usize = 6;
const FFN: usize = 48;
const EXPERT_FFN: usize = 12;
const EXPERTS: usize = 8;
const EXPERTS_USED: usize = 2;
const SHARED_EXPERTS: usize = 1;
const GROUPS: usize = 4;
const GROUPS_USED: usize = 2;
const ROUTED_SCALE: f32 = 2.5;
const YARN_FACTOR: f32 = 4.0;
const YARN_ORIGINAL_CONTEXT: usize = 32;
const YARN_MSCALE: f32 = 0.707;
const THETA: f32 = 10_000.0;
const EPS: f32 = 1e-6;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flavour {
    /// V3's (and Kimi K2's): low-rank queries, sigmoid routing with the correction bias
    /// over expert groups, normalized top-k weights, scaled; YaRN.
    V3,
    /// V2-Lite's: full-rank queries, softmax routing over all experts, unnormalized; no
    /// RoPE scaling.
    V2Lite,
}

/// Writes a tiny DeepSeek folder of `flavour`: `model.safetensors`, `config.json` as the
/// real checkpoints spell it, and the tests' word-level tokenizer.
fn write(flavour: Flavour) -> tempfile::TempDir {
    let dir = tempfile::Builder::new().prefix(&format!("hearth-deepseek-{flavour:?}-")).tempdir().expect("temp dir");
    let mut rng = tiny_model::Numbers(if flavour == Flavour::V3 { 31 } else { 32 });
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut add = |name: String, shape: &[usize], scale: f32, offset: f32| {
        tensors.insert(name, rng.tensor(shape, scale, offset));
    };
    let head_dim = NOPE_DIM + ROPE_DIM;
    add("model.embed_tokens.weight".into(), &[VOCAB, HIDDEN], 1.0, 0.0);
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        add(format!("{p}.input_layernorm.weight"), &[HIDDEN], 0.2, 1.0);
        add(format!("{p}.post_attention_layernorm.weight"), &[HIDDEN], 0.2, 1.0);
        let a = format!("{p}.self_attn");
        match flavour {
            Flavour::V3 => {
                add(format!("{a}.q_a_proj.weight"), &[QUERY_RANK, HIDDEN], 0.4, 0.0);
                add(format!("{a}.q_a_layernorm.weight"), &[QUERY_RANK], 0.2, 1.0);
                add(format!("{a}.q_b_proj.weight"), &[HEADS * head_dim, QUERY_RANK], 0.4, 0.0);
            }
            Flavour::V2Lite => add(format!("{a}.q_proj.weight"), &[HEADS * head_dim, HIDDEN], 0.4, 0.0),
        }
        add(format!("{a}.kv_a_proj_with_mqa.weight"), &[LATENT_RANK + ROPE_DIM, HIDDEN], 0.4, 0.0);
        add(format!("{a}.kv_a_layernorm.weight"), &[LATENT_RANK], 0.2, 1.0);
        add(format!("{a}.kv_b_proj.weight"), &[HEADS * (NOPE_DIM + VALUE_DIM), LATENT_RANK], 0.4, 0.0);
        add(format!("{a}.o_proj.weight"), &[HIDDEN, HEADS * VALUE_DIM], 0.4, 0.0);
        let mut feed_forward = |prefix: String, width: usize| {
            add(format!("{prefix}.gate_proj.weight"), &[width, HIDDEN], 0.4, 0.0);
            add(format!("{prefix}.up_proj.weight"), &[width, HIDDEN], 0.4, 0.0);
            add(format!("{prefix}.down_proj.weight"), &[HIDDEN, width], 0.4, 0.0);
        };
        if l < DENSE_LAYERS {
            feed_forward(format!("{p}.mlp"), FFN);
            continue;
        }
        for e in 0..EXPERTS {
            feed_forward(format!("{p}.mlp.experts.{e}"), EXPERT_FFN);
        }
        feed_forward(format!("{p}.mlp.shared_experts"), EXPERT_FFN * SHARED_EXPERTS);
        add(format!("{p}.mlp.gate.weight"), &[EXPERTS, HIDDEN], 1.0, 0.0);
        if flavour == Flavour::V3 {
            add(format!("{p}.mlp.gate.e_score_correction_bias"), &[EXPERTS], 0.4, 0.0);
        }
    }
    add("model.norm.weight".into(), &[HIDDEN], 0.2, 1.0);
    add("lm_head.weight".into(), &[VOCAB, HIDDEN], 1.0, 0.0);
    candle_core::safetensors::save(&tensors, dir.path().join("model.safetensors")).expect("save");

    let mut config = serde_json::json!({
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "moe_intermediate_size": EXPERT_FFN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": HEADS,
        "kv_lora_rank": LATENT_RANK,
        "q_lora_rank": QUERY_RANK,
        "qk_rope_head_dim": ROPE_DIM,
        "qk_nope_head_dim": NOPE_DIM,
        "v_head_dim": VALUE_DIM,
        "n_routed_experts": EXPERTS,
        "n_shared_experts": SHARED_EXPERTS,
        "num_experts_per_tok": EXPERTS_USED,
        "first_k_dense_replace": DENSE_LAYERS,
        "moe_layer_freq": 1,
        "n_group": GROUPS,
        "topk_group": GROUPS_USED,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "norm_topk_prob": true,
        "routed_scaling_factor": ROUTED_SCALE,
        "vocab_size": VOCAB,
        "max_position_embeddings": YARN_ORIGINAL_CONTEXT * YARN_FACTOR as usize,
        "rms_norm_eps": EPS,
        "rope_theta": THETA,
        "rope_scaling": {
            "type": "yarn",
            "factor": YARN_FACTOR,
            "original_max_position_embeddings": YARN_ORIGINAL_CONTEXT,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": YARN_MSCALE,
            "mscale_all_dim": YARN_MSCALE,
        },
        "tie_word_embeddings": false,
        "torch_dtype": "bfloat16",
    });
    if flavour == Flavour::V2Lite {
        let overrides = serde_json::json!({
            "architectures": ["DeepseekV2ForCausalLM"],
            "model_type": "deepseek_v2",
            "q_lora_rank": null,
            "n_group": 1,
            "topk_group": 1,
            "topk_method": "greedy",
            "scoring_func": "softmax",
            "norm_topk_prob": false,
            "routed_scaling_factor": 1.0,
            "rope_scaling": null,
            "max_position_embeddings": 128,
        });
        if let (Some(config), Some(overrides)) = (config.as_object_mut(), overrides.as_object()) {
            config.extend(overrides.clone());
        }
    }
    std::fs::write(dir.path().join("config.json"), config.to_string()).expect("config");
    tiny_model::write_tokenizer(dir.path());
    dir
}

/// A folder's weights as f32 vectors, and its flavour.
struct Reference {
    weights: Weights,
    flavour: Flavour,
}

impl Reference {
    fn load(dir: &Path, flavour: Flavour) -> Self {
        Self { weights: Weights::load(dir, ""), flavour }
    }

    fn linear(&self, name: &str, x: &[f32]) -> Vec<f32> {
        self.weights.linear(name, x)
    }

    fn rms_norm(&self, name: &str, x: &[f32]) -> Vec<f32> {
        self.weights.rms_norm(name, x, EPS, 0.0)
    }

    fn yarn(&self) -> bool {
        self.flavour == Flavour::V3
    }

    /// The rotary part's inverse frequencies: YaRN's blend of interpolated and original
    /// ones (`DeepseekV3YarnRotaryEmbedding`), or the plain ones.
    fn inverse_frequencies(&self) -> Vec<f32> {
        let d = ROPE_DIM;
        let plain: Vec<f32> = (0..d / 2).map(|i| 1.0 / THETA.powf(2.0 * i as f32 / d as f32)).collect();
        if !self.yarn() {
            return plain;
        }
        let correction_dim = |rotations: f32| {
            d as f32 * (YARN_ORIGINAL_CONTEXT as f32 / (rotations * 2.0 * std::f32::consts::PI)).ln()
                / (2.0 * THETA.ln())
        };
        let low = correction_dim(32.0).floor().max(0.0);
        let high = correction_dim(1.0).ceil().min(d as f32 - 1.0);
        let high = if high == low { high + 0.001 } else { high };
        plain
            .iter()
            .enumerate()
            .map(|(i, &extrapolated)| {
                let keep = 1.0 - ((i as f32 - low) / (high - low)).clamp(0.0, 1.0);
                extrapolated / YARN_FACTOR * (1.0 - keep) + extrapolated * keep
            })
            .collect()
    }

    /// Rotates the `ROPE_DIM` values at `x` for `position`, in DeepSeek's interleaved
    /// layout: pairs `(2i, 2i + 1)`.
    fn rope(&self, x: &mut [f32], position: usize) {
        for (i, frequency) in self.inverse_frequencies().into_iter().enumerate() {
            let (sin, cos) = (position as f32 * frequency).sin_cos();
            let (a, b) = (x[2 * i], x[2 * i + 1]);
            x[2 * i] = a * cos - b * sin;
            x[2 * i + 1] = b * cos + a * sin;
        }
    }

    fn attention(&self, layer: usize, h: &[f32]) -> Vec<f32> {
        let a = format!("model.layers.{layer}.self_attn");
        let n = h.len() / HIDDEN;
        let head_dim = NOPE_DIM + ROPE_DIM;
        let mut q = match self.flavour {
            Flavour::V3 => {
                let down = self.rms_norm(&format!("{a}.q_a_layernorm.weight"), &self.linear(&format!("{a}.q_a_proj.weight"), h));
                self.linear(&format!("{a}.q_b_proj.weight"), &down)
            }
            Flavour::V2Lite => self.linear(&format!("{a}.q_proj.weight"), h),
        };
        let compressed = self.linear(&format!("{a}.kv_a_proj_with_mqa.weight"), h);
        let latent_width = LATENT_RANK + ROPE_DIM;
        let latent: Vec<f32> =
            compressed.chunks_exact(latent_width).flat_map(|row| row[..LATENT_RANK].iter().copied()).collect();
        let mut rotary_keys: Vec<f32> =
            compressed.chunks_exact(latent_width).flat_map(|row| row[LATENT_RANK..].iter().copied()).collect();
        let kv = self.linear(&format!("{a}.kv_b_proj.weight"), &self.rms_norm(&format!("{a}.kv_a_layernorm.weight"), &latent));
        for t in 0..n {
            for head in 0..HEADS {
                self.rope(&mut q[(t * HEADS + head) * head_dim + NOPE_DIM..][..ROPE_DIM], t);
            }
            self.rope(&mut rotary_keys[t * ROPE_DIM..][..ROPE_DIM], t);
        }
        let mscale = if self.yarn() { 0.1 * YARN_MSCALE * YARN_FACTOR.ln() + 1.0 } else { 1.0 };
        let scale = mscale * mscale / (head_dim as f32).sqrt();
        let kv_width = NOPE_DIM + VALUE_DIM;
        let mut out = vec![0.0; n * HEADS * VALUE_DIM];
        for t in 0..n {
            for head in 0..HEADS {
                let query = &q[(t * HEADS + head) * head_dim..][..head_dim];
                let scores: Vec<f32> = (0..=t)
                    .map(|s| {
                        let key_nope = &kv[(s * HEADS + head) * kv_width..][..NOPE_DIM];
                        let key_rope = &rotary_keys[s * ROPE_DIM..][..ROPE_DIM];
                        let dot: f32 = query[..NOPE_DIM].iter().zip(key_nope).map(|(a, b)| a * b).sum::<f32>()
                            + query[NOPE_DIM..].iter().zip(key_rope).map(|(a, b)| a * b).sum::<f32>();
                        dot * scale
                    })
                    .collect();
                for (s, weight) in softmax(&scores).iter().enumerate() {
                    let value = &kv[(s * HEADS + head) * kv_width + NOPE_DIM..][..VALUE_DIM];
                    for (o, value) in out[(t * HEADS + head) * VALUE_DIM..][..VALUE_DIM].iter_mut().zip(value) {
                        *o += weight * value;
                    }
                }
            }
        }
        self.linear(&format!("{a}.o_proj.weight"), &out)
    }

    /// A SwiGLU feed-forward of one row.
    fn feed_forward(&self, prefix: &str, x: &[f32]) -> Vec<f32> {
        let gate = self.linear(&format!("{prefix}.gate_proj.weight"), x);
        let up = self.linear(&format!("{prefix}.up_proj.weight"), x);
        let inner: Vec<f32> = gate.iter().zip(&up).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect();
        self.linear(&format!("{prefix}.down_proj.weight"), &inner)
    }

    /// The experts `DeepseekV3MoE` picks for one row, with their weights.
    fn route(&self, layer: usize, x: &[f32]) -> Vec<(usize, f32)> {
        let gate = format!("model.layers.{layer}.mlp.gate");
        let logits = self.linear(&format!("{gate}.weight"), x);
        let (scores, choice) = match self.flavour {
            Flavour::V3 => {
                let scores: Vec<f32> = logits.iter().map(|l| 1.0 / (1.0 + (-l).exp())).collect();
                let bias = self.weights.tensor(&format!("{gate}.e_score_correction_bias"));
                let mut choice: Vec<f32> = scores.iter().zip(bias).map(|(s, b)| s + b).collect();
                // Groups ranked by the sum of their two best biased scores; the rest masked.
                let per_group = EXPERTS / GROUPS;
                let group_score = |g: usize| {
                    let mut members: Vec<f32> = choice[g * per_group..][..per_group].to_vec();
                    members.sort_by(|a, b| b.total_cmp(a));
                    members[0] + members[1]
                };
                let mut groups: Vec<usize> = (0..GROUPS).collect();
                groups.sort_by(|&a, &b| group_score(b).total_cmp(&group_score(a)).then(a.cmp(&b)));
                for (e, value) in choice.iter_mut().enumerate() {
                    if !groups[..GROUPS_USED].contains(&(e / per_group)) {
                        *value = f32::NEG_INFINITY;
                    }
                }
                (scores, choice)
            }
            Flavour::V2Lite => {
                let scores = softmax(&logits);
                (scores.clone(), scores)
            }
        };
        let mut order: Vec<usize> = (0..EXPERTS).collect();
        order.sort_by(|&a, &b| choice[b].total_cmp(&choice[a]).then(a.cmp(&b)));
        let chosen = &order[..EXPERTS_USED];
        let (normalize, scale) = match self.flavour {
            Flavour::V3 => (true, ROUTED_SCALE),
            Flavour::V2Lite => (false, 1.0),
        };
        let sum: f32 = chosen.iter().map(|&e| scores[e]).sum();
        chosen.iter().map(|&e| (e, if normalize { scores[e] / sum } else { scores[e] } * scale)).collect()
    }

    fn feed_forward_block(&self, layer: usize, h: &[f32]) -> Vec<f32> {
        let mlp = format!("model.layers.{layer}.mlp");
        if layer < DENSE_LAYERS {
            return h.chunks_exact(HIDDEN).flat_map(|x| self.feed_forward(&mlp, x)).collect();
        }
        let mut out = Vec::with_capacity(h.len());
        for x in h.chunks_exact(HIDDEN) {
            let mut mixed = self.feed_forward(&format!("{mlp}.shared_experts"), x);
            for (e, weight) in self.route(layer, x) {
                for (m, y) in mixed.iter_mut().zip(self.feed_forward(&format!("{mlp}.experts.{e}"), x)) {
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
            tokens.iter().flat_map(|&t| embedding[t as usize * HIDDEN..][..HIDDEN].iter().copied()).collect();
        for layer in 0..LAYERS {
            let p = format!("model.layers.{layer}");
            let attended = self.attention(layer, &self.rms_norm(&format!("{p}.input_layernorm.weight"), &x));
            x.iter_mut().zip(attended).for_each(|(x, a)| *x += a);
            let mixed = self.feed_forward_block(layer, &self.rms_norm(&format!("{p}.post_attention_layernorm.weight"), &x));
            x.iter_mut().zip(mixed).for_each(|(x, m)| *x += m);
        }
        let last = self.rms_norm("model.norm.weight", &x[x.len() - HIDDEN..]);
        self.linear("lm_head.weight", &last)
    }
}

/// Loads, runs on both paths against the reference (teacher-forced on its greedy tokens),
/// and splits.
fn check(flavour: Flavour) {
    let dir = write(flavour);
    let reference = Reference::load(dir.path(), flavour);
    let (generated, expected) = greedy_path(&PROMPT, STEPS, |tokens| reference.logits(tokens));
    let generated = &generated[..];

    for (compute, tolerance) in [(ComputePath::Native, NATIVE_TOLERANCE), (ComputePath::CandleOps, CANDLE_TOLERANCE)] {
        let what = format!("tiny DeepSeek {flavour:?} folder on {compute:?}");
        let mut source = ModelSource::open(dir.path()).expect("the folder opens");
        source.set_compute_path(compute);
        let config = source.config();
        let moe = config.moe.clone().expect("read as a mixture of experts");
        assert_eq!((moe.experts, moe.experts_used, moe.shared_experts, moe.dense_layers), (EXPERTS, EXPERTS_USED, 1, 1));
        let latent = config.latent_attention.clone().expect("read as latent attention");
        assert_eq!(latent.query_rank, (flavour == Flavour::V3).then_some(QUERY_RANK), "{what}");
        let logits = teacher_forced(&load_split(&source, &[]), &PROMPT, generated);
        check_logits(&logits, &expected, generated, tolerance, &what, "the f32 reference's");
        let cuts: [&[usize]; 3] = [&[DENSE_LAYERS], &[DENSE_LAYERS, 3], &[DENSE_LAYERS, 2, 3]];
        check_splits(&source, &PROMPT, STEPS, &cuts, SPLIT_TOLERANCE, &what);
    }
}

#[test]
fn a_deepseek_v3_folder_computes_what_the_reference_does_on_both_paths_whole_and_split() {
    check(Flavour::V3);
}

#[test]
fn a_deepseek_v2_lite_folder_computes_what_the_reference_does_on_both_paths_whole_and_split() {
    check(Flavour::V2Lite);
}

/// DeepSeek's own FP8 release stores its weights quantized in blocks: one clear line, not
/// a shape error deep in loading.
#[test]
fn a_checkpoint_stored_in_fp8_is_refused_in_one_line() {
    let dir = write(Flavour::V3);
    let quantization = serde_json::json!({"quant_method": "fp8", "weight_block_size": [128, 128]});
    let error = refusal_when_quantized(dir.path(), quantization);
    assert!(error.contains("fp8") && error.contains("GGUF"), "{error}");
}

/// A folder's layer weighs what its tensors do (`kv_b_proj` once, though it loads as two
/// sets of per-head matrices), an expert layer far more than the dense one, and latent
/// attention caches the latent and rotary key alone (in f16 on the native path).
#[test]
fn a_deepseek_folder_footprint_counts_each_tensor_once() {
    let dir = write(Flavour::V3);
    let reference = Reference::load(dir.path(), Flavour::V3);
    let source = ModelSource::open(dir.path()).expect("the folder opens");
    let footprint = source.footprint(&Device::Cpu);
    for (layer, &bytes) in footprint.layer_bytes.iter().enumerate() {
        let prefix = format!("model.layers.{layer}.");
        let in_folder: usize = reference
            .weights
            .iter()
            .filter(|(name, _)| name.starts_with(&prefix))
            .map(|(_, (_, values))| values.len() * std::mem::size_of::<f32>())
            .sum();
        assert_eq!(bytes, in_folder as u64, "layer {layer}");
    }
    let (dense, experts) = (footprint.layer_bytes[0], footprint.layer_bytes[DENSE_LAYERS]);
    assert!(experts > dense, "an expert layer ({experts} B) outweighs the dense one ({dense} B)");
    let native_f16 = 2;
    assert_eq!(footprint.kv_bytes_per_token_per_layer, (native_f16 * (LATENT_RANK + ROPE_DIM)) as u64);
}

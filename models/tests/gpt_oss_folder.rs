//! gpt-oss from Hugging Face folders: a tiny folder named and configured as OpenAI's
//! checkpoints are (experts as MXFP4 blocks and scales, gate and up rows taking turns,
//! YaRN with `truncate: false`), and one with its experts unquantized, load; both compute
//! paths compute what a plain f32 forward written here from the folder computes; and 2, 3
//! and 4 stages compute what the whole model does.
//!
//! The reference follows the Hugging Face modeling code (`GptOssAttention` with its sinks,
//! `GptOssTopKRouter`, `GptOssExperts`, `GptOssRotaryEmbedding`'s YaRN) and its MXFP4
//! dequantization (`convert_moe_packed_tensors`: values `2j` and `2j + 1` in byte `j`, each
//! row's scale `2^(s - 127)`), none of which Hearth's code shares.

mod common;
mod tiny_model;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use common::folder_reference::{greedy_path, refusal_when_quantized, softmax, Weights};
use common::{check_logits, check_splits, load_split, teacher_forced};
use hearth_models::{Architecture, ComputePath, ModelSource};

/// The native path keeps K and V in f16 and quantizes MXFP4 products' inputs to 8 bits, as
/// llama.cpp does; candle's path computes in f32 on the exact MXFP4 values. (Reading the
/// nibbles in Hugging Face's order instead of GGUF's moves the logits by 0.39.)
const NATIVE_TOLERANCE: f32 = 2e-2;
const CANDLE_TOLERANCE: f32 = 1e-4;
const SPLIT_TOLERANCE: f32 = 1e-4;
const PROMPT: [u32; 7] = [3, 17, 42, 5, 9, 11, 30];
const STEPS: usize = 8;

const VOCAB: usize = tiny_model::VOCAB;
const HIDDEN: usize = 64;
const LAYERS: usize = 4;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 16;
const FFN: usize = 32;
const EXPERTS: usize = 4;
const EXPERTS_USED: usize = 2;
const WINDOW: usize = 4;
const YARN_FACTOR: f32 = 4.0;
const YARN_ORIGINAL_CONTEXT: usize = 32;
const THETA: f32 = 150_000.0;
const EPS: f32 = 1e-5;
const FP4: [f32; 16] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Experts {
    /// As OpenAI ships them: `*_blocks` and `*_scales` bytes.
    Mxfp4,
    /// Dequantized (bf16 conversions of the checkpoints): `gate_up_proj` `[experts, hidden,
    /// 2 * ffn]` and `down_proj` `[experts, ffn, hidden]`.
    Dense,
}

fn bytes(numbers: &mut tiny_model::Numbers, shape: &[usize], low: u8, span: u8) -> Tensor {
    let values = numbers.tensor(shape, 1.0, 0.5).flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("values");
    let bytes: Vec<u8> = values.iter().map(|v| low + ((v * span as f32) as u8).min(span - 1)).collect();
    Tensor::from_vec(bytes, shape, &Device::Cpu).expect("bytes")
}

/// Dequantizes `[.., rows, blocks, 16]` blocks with `[.., rows, blocks]` scales as
/// Hugging Face does: `[.., rows, blocks * 32]` values.
fn dequantize(blocks: &[f32], scales: &[f32]) -> Vec<f32> {
    scales
        .iter()
        .zip(blocks.chunks_exact(16))
        .flat_map(|(&scale, pairs)| {
            let scale = 2f32.powi(scale as i32 - 127);
            pairs.iter().flat_map(move |&byte| {
                let byte = byte as u8;
                [FP4[(byte & 0x0F) as usize] * scale, FP4[(byte >> 4) as usize] * scale]
            })
        })
        .collect()
}

fn write(experts: Experts) -> tempfile::TempDir {
    let dir = tempfile::Builder::new().prefix(&format!("hearth-gpt-oss-{experts:?}-")).tempdir().expect("temp dir");
    let mut numbers = tiny_model::Numbers(41);
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut add = |tensors: &mut HashMap<String, Tensor>, name: String, shape: &[usize], scale: f32, offset: f32| {
        tensors.insert(name, numbers.tensor(shape, scale, offset));
    };
    add(&mut tensors, "model.embed_tokens.weight".into(), &[VOCAB, HIDDEN], 1.0, 0.0);
    let mut expert_numbers = tiny_model::Numbers(42);
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        add(&mut tensors, format!("{p}.input_layernorm.weight"), &[HIDDEN], 0.2, 1.0);
        add(&mut tensors, format!("{p}.post_attention_layernorm.weight"), &[HIDDEN], 0.2, 1.0);
        let a = format!("{p}.self_attn");
        for (proj, rows) in [("q_proj", HEADS * HEAD_DIM), ("k_proj", KV_HEADS * HEAD_DIM), ("v_proj", KV_HEADS * HEAD_DIM)] {
            add(&mut tensors, format!("{a}.{proj}.weight"), &[rows, HIDDEN], 0.5, 0.0);
            add(&mut tensors, format!("{a}.{proj}.bias"), &[rows], 0.2, 0.0);
        }
        add(&mut tensors, format!("{a}.o_proj.weight"), &[HIDDEN, HEADS * HEAD_DIM], 0.5, 0.0);
        add(&mut tensors, format!("{a}.o_proj.bias"), &[HIDDEN], 0.2, 0.0);
        add(&mut tensors, format!("{a}.sinks"), &[HEADS], 2.0, 0.0);
        add(&mut tensors, format!("{p}.mlp.router.weight"), &[EXPERTS, HIDDEN], 1.0, 0.0);
        add(&mut tensors, format!("{p}.mlp.router.bias"), &[EXPERTS], 0.5, 0.0);
        let e = format!("{p}.mlp.experts");
        add(&mut tensors, format!("{e}.gate_up_proj_bias"), &[EXPERTS, 2 * FFN], 0.4, 0.0);
        add(&mut tensors, format!("{e}.down_proj_bias"), &[EXPERTS, HIDDEN], 0.4, 0.0);
        // Scales of 2^-8 to 2^-6 before the values' up to 6: experts that add to the residual
        // about as much as a trained model's do, so that 8-bit inputs stay a small error.
        let gate_up_blocks = bytes(&mut expert_numbers, &[EXPERTS, 2 * FFN, HIDDEN / 32, 16], 0, 255);
        let gate_up_scales = bytes(&mut expert_numbers, &[EXPERTS, 2 * FFN, HIDDEN / 32], 119, 3);
        let down_blocks = bytes(&mut expert_numbers, &[EXPERTS, HIDDEN, FFN / 32, 16], 0, 255);
        let down_scales = bytes(&mut expert_numbers, &[EXPERTS, HIDDEN, FFN / 32], 119, 3);
        match experts {
            Experts::Mxfp4 => {
                tensors.insert(format!("{e}.gate_up_proj_blocks"), gate_up_blocks);
                tensors.insert(format!("{e}.gate_up_proj_scales"), gate_up_scales);
                tensors.insert(format!("{e}.down_proj_blocks"), down_blocks);
                tensors.insert(format!("{e}.down_proj_scales"), down_scales);
            }
            Experts::Dense => {
                // The same values, dequantized and stored as the modeling code multiplies them.
                let values = |blocks: &Tensor, scales: &Tensor, rows: usize, cols: usize| {
                    let f32s = |t: &Tensor| t.to_dtype(candle_core::DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    let dense = dequantize(&f32s(blocks), &f32s(scales));
                    Tensor::from_vec(dense, (EXPERTS, rows, cols), &Device::Cpu).unwrap().transpose(1, 2).unwrap().contiguous().unwrap()
                };
                tensors.insert(format!("{e}.gate_up_proj"), values(&gate_up_blocks, &gate_up_scales, 2 * FFN, HIDDEN));
                tensors.insert(format!("{e}.down_proj"), values(&down_blocks, &down_scales, HIDDEN, FFN));
            }
        }
    }
    add(&mut tensors, "model.norm.weight".into(), &[HIDDEN], 0.2, 1.0);
    add(&mut tensors, "lm_head.weight".into(), &[VOCAB, HIDDEN], 1.0, 0.0);
    candle_core::safetensors::save(&tensors, dir.path().join("model.safetensors")).expect("save");

    let layer_types: Vec<&str> =
        (0..LAYERS).map(|l| if l % 2 == 0 { "sliding_attention" } else { "full_attention" }).collect();
    let mut config = serde_json::json!({
        "architectures": ["GptOssForCausalLM"],
        "model_type": "gpt_oss",
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "num_local_experts": EXPERTS,
        "num_experts_per_tok": EXPERTS_USED,
        "experts_per_token": EXPERTS_USED,
        "attention_bias": true,
        "sliding_window": WINDOW,
        "layer_types": layer_types,
        "swiglu_limit": 7.0,
        "vocab_size": VOCAB,
        "max_position_embeddings": YARN_ORIGINAL_CONTEXT * YARN_FACTOR as usize,
        "rms_norm_eps": EPS,
        "rope_theta": THETA,
        "rope_scaling": {
            "rope_type": "yarn",
            "factor": YARN_FACTOR,
            "original_max_position_embeddings": YARN_ORIGINAL_CONTEXT,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": false,
        },
        "tie_word_embeddings": false,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
    });
    if experts == Experts::Mxfp4 {
        config["quantization_config"] =
            serde_json::json!({"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]});
    }
    std::fs::write(dir.path().join("config.json"), config.to_string()).expect("config");
    tiny_model::write_tokenizer(dir.path());
    dir
}

/// A folder's weights as f32 vectors, its experts dequantized.
struct Reference {
    weights: Weights,
    /// Per layer: each expert's gate, up and down matrices, `[rows][cols]` flattened.
    experts: Vec<Vec<[Vec<f32>; 3]>>,
}

impl Reference {
    fn load(dir: &Path, experts: Experts) -> Self {
        let weights = Weights::load(dir, "");
        let experts = (0..LAYERS)
            .map(|l| {
                let e = format!("model.layers.{l}.mlp.experts");
                let (gate_up, down) = match experts {
                    Experts::Mxfp4 => (
                        dequantize(weights.tensor(&format!("{e}.gate_up_proj_blocks")), weights.tensor(&format!("{e}.gate_up_proj_scales"))),
                        dequantize(weights.tensor(&format!("{e}.down_proj_blocks")), weights.tensor(&format!("{e}.down_proj_scales"))),
                    ),
                    // Stored transposed: back to rows of outputs.
                    Experts::Dense => (
                        transpose(weights.tensor(&format!("{e}.gate_up_proj")), HIDDEN, 2 * FFN),
                        transpose(weights.tensor(&format!("{e}.down_proj")), FFN, HIDDEN),
                    ),
                };
                (0..EXPERTS)
                    .map(|x| {
                        let gate_up = &gate_up[x * 2 * FFN * HIDDEN..(x + 1) * 2 * FFN * HIDDEN];
                        let rows = |first: usize| -> Vec<f32> {
                            (0..FFN).flat_map(|r| gate_up[(2 * r + first) * HIDDEN..][..HIDDEN].to_vec()).collect()
                        };
                        [rows(0), rows(1), down[x * HIDDEN * FFN..(x + 1) * HIDDEN * FFN].to_vec()]
                    })
                    .collect()
            })
            .collect();
        Self { weights, experts }
    }

    fn linear(&self, name: &str, x: &[f32]) -> Vec<f32> {
        let mut y = self.weights.linear(&format!("{name}.weight"), x);
        let bias = self.weights.tensor(&format!("{name}.bias"));
        for row in y.chunks_exact_mut(bias.len()) {
            row.iter_mut().zip(bias).for_each(|(y, b)| *y += b);
        }
        y
    }

    /// YaRN's inverse frequencies with `truncate: false` (the correction range unrounded),
    /// and its factor on cos and sin.
    fn rope(&self, x: &mut [f32], position: usize) {
        let d = HEAD_DIM;
        let correction = |rotations: f32| {
            d as f32 * (YARN_ORIGINAL_CONTEXT as f32 / (rotations * 2.0 * std::f32::consts::PI)).ln() / (2.0 * THETA.ln())
        };
        let (low, high) = (correction(32.0).max(0.0), correction(1.0).min(d as f32 - 1.0));
        let attention_factor = 0.1 * YARN_FACTOR.ln() + 1.0;
        for head in x.chunks_exact_mut(d) {
            for i in 0..d / 2 {
                let extrapolated = 1.0 / THETA.powf(2.0 * i as f32 / d as f32);
                let extrapolation = 1.0 - ((i as f32 - low) / (high - low)).clamp(0.0, 1.0);
                let frequency = extrapolated / YARN_FACTOR * (1.0 - extrapolation) + extrapolated * extrapolation;
                let (sin, cos) = (position as f32 * frequency).sin_cos();
                let (cos, sin) = (cos * attention_factor, sin * attention_factor);
                let (a, b) = (head[i], head[i + d / 2]);
                head[i] = a * cos - b * sin;
                head[i + d / 2] = b * cos + a * sin;
            }
        }
    }

    fn attention(&self, layer: usize, h: &[f32]) -> Vec<f32> {
        let a = format!("model.layers.{layer}.self_attn");
        let positions = h.len() / HIDDEN;
        let (mut q, mut k, v) = (self.linear(&format!("{a}.q_proj"), h), self.linear(&format!("{a}.k_proj"), h), self.linear(&format!("{a}.v_proj"), h));
        let (qw, kw) = (HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM);
        for p in 0..positions {
            self.rope(&mut q[p * qw..(p + 1) * qw], p);
            self.rope(&mut k[p * kw..(p + 1) * kw], p);
        }
        let sinks = self.weights.tensor(&format!("{a}.sinks"));
        let sliding = layer.is_multiple_of(2);
        let mut out = vec![0.0f32; positions * qw];
        for p in 0..positions {
            for head in 0..HEADS {
                let g = head / (HEADS / KV_HEADS);
                let query = &q[p * qw + head * HEAD_DIM..][..HEAD_DIM];
                let seen: Vec<usize> = (0..=p).filter(|&key| !sliding || p - key < WINDOW).collect();
                let mut scores: Vec<f32> = seen
                    .iter()
                    .map(|&key| {
                        let k = &k[key * kw + g * HEAD_DIM..][..HEAD_DIM];
                        query.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() / (HEAD_DIM as f32).sqrt()
                    })
                    .collect();
                scores.push(sinks[head]);
                let probs = softmax(&scores);
                for (&key, &prob) in seen.iter().zip(&probs) {
                    let v = &v[key * kw + g * HEAD_DIM..][..HEAD_DIM];
                    for (o, &v) in out[p * qw + head * HEAD_DIM..][..HEAD_DIM].iter_mut().zip(v) {
                        *o += prob * v;
                    }
                }
            }
        }
        self.linear(&format!("{a}.o_proj"), &out)
    }

    fn experts(&self, layer: usize, x: &[f32]) -> Vec<f32> {
        let p = format!("model.layers.{layer}.mlp");
        let logits = self.linear(&format!("{p}.router"), x);
        let gate_up_bias = self.weights.tensor(&format!("{p}.experts.gate_up_proj_bias"));
        let down_bias = self.weights.tensor(&format!("{p}.experts.down_proj_bias"));
        let product = |w: &[f32], x: &[f32], rows: usize| -> Vec<f32> {
            (0..rows).map(|r| w[r * x.len()..(r + 1) * x.len()].iter().zip(x).map(|(a, b)| a * b).sum()).collect()
        };
        x.chunks_exact(HIDDEN)
            .zip(logits.chunks_exact(EXPERTS))
            .flat_map(|(x, logits)| {
                let mut order: Vec<usize> = (0..EXPERTS).collect();
                order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
                let chosen = &order[..EXPERTS_USED];
                let weights = softmax(&chosen.iter().map(|&e| logits[e]).collect::<Vec<_>>());
                let mut out = vec![0.0f32; HIDDEN];
                for (&e, &weight) in chosen.iter().zip(&weights) {
                    let [gate_w, up_w, down_w] = &self.experts[layer][e];
                    let gate = product(gate_w, x, FFN);
                    let up = product(up_w, x, FFN);
                    let glu: Vec<f32> = (0..FFN)
                        .map(|i| {
                            let g = (gate[i] + gate_up_bias[e * 2 * FFN + 2 * i]).min(7.0);
                            let u = (up[i] + gate_up_bias[e * 2 * FFN + 2 * i + 1]).clamp(-7.0, 7.0);
                            g / (1.0 + (-1.702 * g).exp()) * (u + 1.0)
                        })
                        .collect();
                    let down = product(down_w, &glu, HIDDEN);
                    for (i, o) in out.iter_mut().enumerate() {
                        *o += weight * (down[i] + down_bias[e * HIDDEN + i]);
                    }
                }
                out
            })
            .collect()
    }

    fn logits(&self, tokens: &[u32]) -> Vec<f32> {
        let embedding = self.weights.tensor("model.embed_tokens.weight");
        let mut x: Vec<f32> =
            tokens.iter().flat_map(|&t| embedding[t as usize * HIDDEN..][..HIDDEN].iter().copied()).collect();
        for layer in 0..LAYERS {
            let p = format!("model.layers.{layer}");
            let attended = self.attention(layer, &self.weights.rms_norm(&format!("{p}.input_layernorm.weight"), &x, EPS, 0.0));
            x.iter_mut().zip(attended).for_each(|(x, a)| *x += a);
            let normed = self.weights.rms_norm(&format!("{p}.post_attention_layernorm.weight"), &x, EPS, 0.0);
            x.iter_mut().zip(self.experts(layer, &normed)).for_each(|(x, m)| *x += m);
        }
        let last = self.weights.rms_norm("model.norm.weight", &x[x.len() - HIDDEN..], EPS, 0.0);
        self.weights.linear("lm_head.weight", &last)
    }
}

fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    values
        .chunks_exact(rows * cols)
        .flat_map(|m| (0..cols).flat_map(move |c| (0..rows).map(move |r| m[r * cols + c])))
        .collect()
}

fn check(experts: Experts) {
    let dir = write(experts);
    let reference = Reference::load(dir.path(), experts);
    let (generated, expected) = greedy_path(&PROMPT, STEPS, |tokens| reference.logits(tokens));
    for (compute, tolerance) in [(ComputePath::Native, NATIVE_TOLERANCE), (ComputePath::CandleOps, CANDLE_TOLERANCE)] {
        let what = format!("tiny gpt-oss folder ({experts:?} experts) on {compute:?}");
        let mut source = ModelSource::open(dir.path()).expect("the folder opens");
        source.set_compute_path(compute);
        let config = source.config();
        assert_eq!(config.architecture, Architecture::GptOss);
        let windows: Vec<Option<usize>> = (0..LAYERS).map(|i| config.attention_window(i)).collect();
        assert_eq!(windows, [Some(WINDOW), None, Some(WINDOW), None], "{what}");
        let logits = teacher_forced(&load_split(&source, &[]), &PROMPT, &generated);
        check_logits(&logits, &expected, &generated, tolerance, &what, "the f32 reference's");
        check_splits(&source, &PROMPT, STEPS, &[&[1], &[2, 3], &[1, 2, 3]], SPLIT_TOLERANCE, &what);
    }
}

#[test]
fn a_gpt_oss_folder_with_mxfp4_experts_computes_what_the_reference_does() {
    check(Experts::Mxfp4);
}

#[test]
fn a_gpt_oss_folder_with_unquantized_experts_computes_what_the_reference_does() {
    check(Experts::Dense);
}

/// MXFP4 experts weigh their blocks and scales once loaded (17 bytes per 32 weights, gate
/// and up sharing their tensors half and half), not a dequantized copy.
#[test]
fn a_gpt_oss_folder_footprint_counts_mxfp4_experts_as_stored() {
    let dir = write(Experts::Mxfp4);
    let source = ModelSource::open(dir.path()).expect("opens");
    let footprint = source.footprint(&Device::Cpu);
    let mxfp4 = (3 * EXPERTS * FFN * HIDDEN / 32 * 17) as u64;
    let f32_bytes = |n: usize| (n * 4) as u64;
    let others = f32_bytes(2 * HIDDEN)
        + f32_bytes((HEADS + 2 * KV_HEADS) * HEAD_DIM * (HIDDEN + 1))
        + f32_bytes(HIDDEN * (HEADS * HEAD_DIM + 1) + HEADS)
        + f32_bytes(EXPERTS * (HIDDEN + 1))
        + f32_bytes(EXPERTS * (2 * FFN + HIDDEN));
    assert_eq!(footprint.layer_bytes, vec![mxfp4 + others; LAYERS]);
}

/// A checkpoint quantized in another way than gpt-oss's own MXFP4 is still refused.
#[test]
fn a_gpt_oss_folder_quantized_otherwise_is_refused_in_one_line() {
    let dir = write(Experts::Mxfp4);
    let error = refusal_when_quantized(dir.path(), serde_json::json!({"quant_method": "bitsandbytes"}));
    assert!(error.contains("bitsandbytes"), "{error}");
}

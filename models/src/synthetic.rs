//! Synthetic GGUF models for benchmarks and tests: the tensors, names, shapes, metadata and
//! quantization mix of llama.cpp's conversions of real Llama 3 models, and of
//! mixtures of experts (Mixtral, Qwen3-MoE, DeepSeek-V3) and of Gemma 3, filled with random weights drawn
//! from a seed.
//!
//! On a CPU, decoding is bound by the bytes of weights read per token, not by their
//! values, so a synthetic file runs as fast (or as slowly) as the real model would,
//! without downloading gigabytes. What it generates is gibberish.
//!
//! The file is written tensor by tensor, so even the 8B shape needs only a few chunks of
//! weights in memory at once. The same seed gives a byte-identical file (for a given
//! version of this crate and its `rand_chacha`).

use std::fmt;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::gguf::TensorType;
use crate::{Error, Result};

/// The model whose layout a synthetic file copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// Two small layers, for tests: Llama 3's layout at a size that writes in milliseconds.
    Tiny,
    Llama32_1B,
    Llama32_3B,
    Llama31_8B,
    /// Mixtral's layout (GGUF's `llama` with stacked experts) at test size: 4 layers of 4
    /// experts, 2 used, untied head.
    TinyMixtral,
    /// Qwen3-MoE's layout at test size: 4 layers of 8 experts, 2 used, q/k norms.
    TinyQwen3Moe,
    /// Qwen3-30B-A3B: every dimension of the real model (128 experts, 8 used, 768 wide),
    /// 4 of its 48 layers.
    Qwen3_30bA3b,
    /// DeepSeek-V3's layout (GGUF's `deepseek2`) at test size: latent attention with a
    /// query bottleneck and YaRN, a dense first layer, then 8 experts in 4 groups (2
    /// groups, 2 experts used), sigmoid routing with a bias, one shared expert.
    TinyDeepSeek2,
    /// `TinyDeepSeek2` as llama.cpp converted DeepSeek models before its MLA layout:
    /// one `attn_kv_b` per layer in place of `attn_k_b` and `attn_v_b`, and the heads'
    /// sizes as multi-head attention's.
    TinyDeepSeek2KvB,
    /// DeepSeek-V3: every dimension of its attention and experts (7168 wide, 128 heads,
    /// latent 512, experts 2048 wide, 8 used in 4 of 8 groups, one shared), with 4 of its
    /// 61 layers (one dense, as its first 3 are) and 32 of its 256 experts.
    DeepSeekV3,
    /// Gemma 3's layout (GGUF's `gemma3`) at test size: 4 layers, of which the third
    /// attends to everything and the others to a window of 4 positions (with a RoPE base
    /// of their own), q/k norms, post-norms, GeGLU, a tied head, a final logit softcap.
    TinyGemma3,
    /// gpt-oss's layout (GGUF's `gpt-oss`) at test size: 4 layers alternating a window of
    /// 8 positions and the whole context, 8 experts of which 4 are used, biases on the
    /// attention and the router and the experts, a sink per head, YaRN.
    TinyGptOss,
}

/// gpt-oss's sliding window at test size (its own is 128).
const GPT_OSS_WINDOW: usize = 8;
/// gpt-oss's RoPE scaling (its `config.json`).
const GPT_OSS_YARN_FACTOR: f32 = 32.0;
const GPT_OSS_YARN_ORIGINAL_CONTEXT: usize = 4096;

/// Gemma 3's sliding window at test size: short enough that a test's prompt and
/// generation slide far past it.
const GEMMA3_WINDOW: usize = 4;
/// Every third layer attends to the whole context (Gemma 3's own pattern is 6).
const GEMMA3_PATTERN: usize = 3;
/// The sliding layers' RoPE base (Gemma 3's `rope_local_base_freq`).
const GEMMA3_LOCAL_ROPE_THETA: f32 = 10_000.0;
/// Gemma 3 names none; Gemma 2's value, so that the softcap is exercised.
const GEMMA3_FINAL_SOFTCAP: f32 = 30.0;

/// The quantization mix, as `llama-quantize` would choose it (without an imatrix).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantization {
    /// `Q4_K_M`: Q4_K, with Q6_K for about half the layers' `attn_v` and `ffn_down`.
    Q4KM,
    /// `Q4_0`: Q4_0 throughout.
    Q4_0,
    /// `Q2_K`: Q2_K, with Q3_K for `ffn_down` and `attn_output`, and Q3_K (Q4_K where four
    /// or more query heads share a key head) for `attn_v`.
    Q2K,
    /// `Q3_K_M`: Q3_K, with Q4_K for `attn_output` and `ffn_down` (Q5_K in the first
    /// sixteenth of the layers), and Q5_K for the first two layers' `attn_v`, Q4_K for the
    /// others'.
    Q3KM,
    /// `Q5_0`: Q5_0 throughout.
    Q5_0,
    /// `Q5_1`: Q5_1 throughout.
    Q5_1,
    /// `BF16`: every matrix BF16 (the embedding and head too), norms and routers F32, as
    /// `convert_hf_to_gguf.py --outtype bf16` writes them.
    Bf16,
    /// `MXFP4_MOE`: experts MXFP4, every other matrix Q8_0 (gpt-oss's own files).
    Mxfp4Moe,
}

impl Shape {
    pub const ALL: [Shape; 12] = [
        Shape::Tiny,
        Shape::Llama32_1B,
        Shape::Llama32_3B,
        Shape::Llama31_8B,
        Shape::TinyMixtral,
        Shape::TinyQwen3Moe,
        Shape::Qwen3_30bA3b,
        Shape::TinyDeepSeek2,
        Shape::TinyDeepSeek2KvB,
        Shape::DeepSeekV3,
        Shape::TinyGemma3,
        Shape::TinyGptOss,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Shape::Tiny => "tiny",
            Shape::Llama32_1B => "llama-3.2-1b",
            Shape::Llama32_3B => "llama-3.2-3b",
            Shape::Llama31_8B => "llama-3.1-8b",
            Shape::TinyMixtral => "tiny-mixtral",
            Shape::TinyQwen3Moe => "tiny-qwen3moe",
            Shape::Qwen3_30bA3b => "qwen3-30b-a3b",
            Shape::TinyDeepSeek2 => "tiny-deepseek2",
            Shape::TinyDeepSeek2KvB => "tiny-deepseek2-kv-b",
            Shape::DeepSeekV3 => "deepseek-v3",
            Shape::TinyGemma3 => "tiny-gemma3",
            Shape::TinyGptOss => "tiny-gpt-oss",
        }
    }

    /// Hyperparameters from each model's `config.json` (meta-llama on Hugging Face).
    fn dimensions(self) -> Dimensions {
        let llama3 = Dimensions {
            layers: 16,
            hidden: 2048,
            ffn: 8192,
            heads: 32,
            kv_heads: 8,
            head_dim: 64,
            vocab: 128_256,
            context: 131_072,
            rope_theta: 500_000.0,
            rope_scaling_factor: 32.0,
            rms_eps: 1e-5,
            tied_embeddings: true,
            family: Family::Llama3,
            experts: None,
            latent: None,
        };
        let tiny_moe = Dimensions {
            layers: 4,
            hidden: 256,
            ffn: 256,
            heads: 4,
            kv_heads: 2,
            vocab: 1024,
            context: 2048,
            rope_theta: 1_000_000.0,
            tied_embeddings: false,
            ..llama3
        };
        let qwen3moe = Dimensions {
            family: Family::Qwen3Moe,
            rms_eps: 1e-6,
            ..tiny_moe
        };
        match self {
            Shape::Tiny => Dimensions {
                layers: 2,
                hidden: 256,
                ffn: 512,
                heads: 4,
                kv_heads: 2,
                vocab: 1024,
                context: 2048,
                ..llama3
            },
            Shape::Llama32_1B => llama3,
            Shape::Llama32_3B => Dimensions { layers: 28, hidden: 3072, heads: 24, head_dim: 128, ..llama3 },
            Shape::Llama31_8B => Dimensions {
                layers: 32,
                hidden: 4096,
                ffn: 14_336,
                heads: 32,
                head_dim: 128,
                rope_scaling_factor: 8.0,
                tied_embeddings: false,
                ..llama3
            },
            Shape::TinyMixtral => Dimensions {
                family: Family::Mixtral,
                experts: Some(ExpertDims { experts: 4, used: 2 }),
                ..tiny_moe
            },
            Shape::TinyQwen3Moe => Dimensions { experts: Some(ExpertDims { experts: 8, used: 2 }), ..qwen3moe },
            // Qwen/Qwen3-30B-A3B's config.json, with 4 of its 48 layers.
            Shape::Qwen3_30bA3b => Dimensions {
                hidden: 2048,
                ffn: 768,
                heads: 32,
                kv_heads: 4,
                head_dim: 128,
                vocab: 151_936,
                context: 40_960,
                experts: Some(ExpertDims { experts: 128, used: 8 }),
                ..qwen3moe
            },
            Shape::TinyDeepSeek2 => Dimensions {
                family: Family::DeepSeek2,
                ffn: 512,
                heads: 4,
                kv_heads: 1,
                rope_theta: 10_000.0,
                rms_eps: 1e-6,
                experts: Some(ExpertDims { experts: 8, used: 2 }),
                latent: Some(LatentDims {
                    query_rank: 256,
                    latent_rank: 64,
                    rope_dim: 16,
                    nope_dim: 32,
                    value_dim: 32,
                    expert_ffn: 256,
                    groups: 4,
                    groups_used: 2,
                    dense_layers: 1,
                    legacy_kv_b: false,
                }),
                ..tiny_moe
            },
            Shape::TinyDeepSeek2KvB => {
                let tiny = Shape::TinyDeepSeek2.dimensions();
                let latent = tiny.latent.map(|latent| LatentDims { legacy_kv_b: true, ..latent });
                Dimensions { latent, ..tiny }
            }
            // deepseek-ai/DeepSeek-V3's config.json, with 4 of its 61 layers and 32 of its
            // 256 routed experts (4 in each of its 8 groups).
            Shape::DeepSeekV3 => Dimensions {
                family: Family::DeepSeek2,
                layers: 4,
                hidden: 7168,
                ffn: 18_432,
                heads: 128,
                kv_heads: 1,
                head_dim: 128,
                vocab: 129_280,
                context: 163_840,
                rope_theta: 10_000.0,
                rms_eps: 1e-6,
                tied_embeddings: false,
                experts: Some(ExpertDims { experts: 32, used: 8 }),
                latent: Some(LatentDims {
                    query_rank: 1536,
                    latent_rank: 512,
                    rope_dim: 64,
                    nope_dim: 128,
                    value_dim: 128,
                    expert_ffn: 2048,
                    groups: 8,
                    groups_used: 4,
                    dense_layers: 1,
                    legacy_kv_b: false,
                }),
                ..llama3
            },
            Shape::TinyGemma3 => Dimensions {
                family: Family::Gemma3,
                layers: 4,
                ffn: 512,
                rms_eps: 1e-6,
                tied_embeddings: true,
                ..tiny_moe
            },
            Shape::TinyGptOss => Dimensions {
                family: Family::GptOss,
                rope_theta: 150_000.0,
                experts: Some(ExpertDims { experts: 8, used: 4 }),
                ..tiny_moe
            },
        }
    }
}

impl Quantization {
    pub const ALL: [Quantization; 8] = [
        Quantization::Q4KM,
        Quantization::Q4_0,
        Quantization::Q2K,
        Quantization::Q3KM,
        Quantization::Q5_0,
        Quantization::Q5_1,
        Quantization::Bf16,
        Quantization::Mxfp4Moe,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Quantization::Q4KM => "q4_k_m",
            Quantization::Q4_0 => "q4_0",
            Quantization::Q2K => "q2_k",
            Quantization::Q3KM => "q3_k_m",
            Quantization::Q5_0 => "q5_0",
            Quantization::Q5_1 => "q5_1",
            Quantization::Bf16 => "bf16",
            Quantization::Mxfp4Moe => "mxfp4_moe",
        }
    }

    /// llama.cpp's `llama_ftype`, stored as `general.file_type`.
    fn file_type(self) -> u32 {
        match self {
            Quantization::Q4KM => 15,
            Quantization::Q4_0 => 2,
            Quantization::Q2K => 10,
            Quantization::Q3KM => 12,
            Quantization::Q5_0 => 8,
            Quantization::Q5_1 => 9,
            Quantization::Bf16 => 32,
            Quantization::Mxfp4Moe => 38,
        }
    }

    fn base_dtype(self) -> GgmlDType {
        match self {
            Quantization::Q4KM => GgmlDType::Q4K,
            Quantization::Q4_0 => GgmlDType::Q4_0,
            Quantization::Q2K => GgmlDType::Q2K,
            Quantization::Q3KM => GgmlDType::Q3K,
            Quantization::Q5_0 => GgmlDType::Q5_0,
            Quantization::Q5_1 => GgmlDType::Q5_1,
            Quantization::Bf16 => GgmlDType::BF16,
            // Experts aside (`expert_dtype`).
            Quantization::Mxfp4Moe => GgmlDType::Q8_0,
        }
    }

    /// The type of stacked experts' matrices whose role would give them `dtype`.
    fn expert_dtype(self, dtype: GgmlDType) -> TensorType {
        match self {
            Quantization::Mxfp4Moe => TensorType::Mxfp4,
            _ => dtype.into(),
        }
    }
}

macro_rules! named_choices {
    ($type:ty) => {
        impl fmt::Display for $type {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.name())
            }
        }

        impl FromStr for $type {
            type Err = Error;

            fn from_str(text: &str) -> Result<Self> {
                Self::ALL.into_iter().find(|choice| choice.name() == text).ok_or_else(|| {
                    let names: Vec<&str> = Self::ALL.iter().map(|choice| choice.name()).collect();
                    Error::InvalidInput(format!("`{text}` is not one of {}", names.join(", ")))
                })
            }
        }
    };
}

named_choices!(Shape);
named_choices!(Quantization);

/// Writes a synthetic model to `path` (through a temporary file beside it, so an
/// interrupted run never leaves a truncated model behind).
pub fn write_synthetic_gguf(shape: Shape, quantization: Quantization, seed: u64, path: &Path) -> Result<()> {
    let dims = shape.dimensions();
    let tensors = tensor_plan(&dims, quantization);
    let metadata = metadata(shape, &dims, quantization, seed);

    let partial = partial_path(path);
    let file = File::create(&partial).map_err(|e| Error::io(&partial, e))?;
    let mut out = BufWriter::with_capacity(8 << 20, file);
    let written =
        write_gguf(&mut out, &metadata, &tensors, seed).and_then(|()| out.flush().map_err(|e| Error::io(&partial, e)));
    if let Err(error) = written {
        let _ = std::fs::remove_file(&partial);
        return Err(error);
    }
    drop(out);
    std::fs::rename(&partial, path).map_err(|e| Error::io(path, e))
}

/// A GGUF file of a one-layer decoder of `architecture` that holds only its token
/// embedding, of type `embedding`: enough for `ModelSource::open` to read the metadata
/// and accept or refuse it, which is what tests of refusals need.
pub fn header_only_gguf(architecture: &str, embedding: GgmlDType) -> Result<Vec<u8>> {
    let ones = Tensor::ones((64, 256), candle_core::DType::F32, &Device::Cpu)?;
    let embedding = QTensor::quantize(&ones, embedding)?;
    let key = |suffix: &str| format!("{architecture}.{suffix}");
    let metadata = [
        ("general.architecture".to_string(), Value::String(architecture.into())),
        (key("block_count"), Value::U32(1)),
        (key("embedding_length"), Value::U32(256)),
        (key("feed_forward_length"), Value::U32(512)),
        (key("attention.head_count"), Value::U32(4)),
        (key("context_length"), Value::U32(128)),
        (key("attention.layer_norm_rms_epsilon"), Value::F32(1e-6)),
    ];
    let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file = std::io::Cursor::new(Vec::new());
    candle_core::quantized::gguf_file::write(&mut file, &metadata, &[("token_embd.weight", &embedding)])?;
    Ok(file.into_inner())
}

fn partial_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    path.with_file_name(name)
}

#[derive(Debug, Clone, Copy)]
struct Dimensions {
    layers: usize,
    hidden: usize,
    ffn: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    vocab: usize,
    context: usize,
    rope_theta: f32,
    /// Llama 3.1's RoPE scaling (`rope_scaling.factor`; the other parameters are shared).
    rope_scaling_factor: f32,
    rms_eps: f32,
    tied_embeddings: bool,
    family: Family,
    /// Experts in every layer, each `ffn` wide, in place of a dense feed-forward.
    experts: Option<ExpertDims>,
    /// DeepSeek's latent attention and the rest of its layout (then experts are
    /// `expert_ffn` wide, and `ffn` is the dense layers' width).
    latent: Option<LatentDims>,
}

#[derive(Debug, Clone, Copy)]
struct LatentDims {
    query_rank: usize,
    latent_rank: usize,
    rope_dim: usize,
    nope_dim: usize,
    value_dim: usize,
    expert_ffn: usize,
    groups: usize,
    groups_used: usize,
    dense_layers: usize,
    /// The layout of llama.cpp's conversions before MLA: `attn_kv_b`.
    legacy_kv_b: bool,
}

/// DeepSeek-V3's RoPE scaling (its `config.json`).
const DEEPSEEK_YARN_FACTOR: f32 = 40.0;
const DEEPSEEK_YARN_ORIGINAL_CONTEXT: usize = 4096;
/// DeepSeek-V3's routed experts' weights are scaled by this.
const DEEPSEEK_ROUTED_SCALE: f32 = 2.5;

#[derive(Debug, Clone, Copy)]
struct ExpertDims {
    experts: usize,
    used: usize,
}

/// Which conversion's names and metadata the file copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    /// Llama 3, with its frequency-scaled RoPE (`rope_freqs.weight`).
    Llama3,
    /// GGUF's `llama` architecture with experts, plain RoPE.
    Mixtral,
    /// `qwen3moe`: q/k norms, experts named by their own width.
    Qwen3Moe,
    /// `deepseek2`: latent attention, shared experts, YaRN.
    DeepSeek2,
    /// `gemma3`: q/k norms, a norm after attention and after the feed-forward, sliding
    /// windows.
    Gemma3,
    /// `gpt-oss`: biases, sinks, alternating sliding windows, experts with biases.
    GptOss,
}

impl Family {
    fn architecture(self) -> &'static str {
        match self {
            Family::Llama3 | Family::Mixtral => "llama",
            Family::Qwen3Moe => "qwen3moe",
            Family::DeepSeek2 => "deepseek2",
            Family::Gemma3 => "gemma3",
            Family::GptOss => "gpt-oss",
        }
    }
}

// ---------------------------------------------------------------------------------------
// Tensors

/// One tensor of the file: its name, shape (outermost dimension first, as candle
/// orders them), storage type and contents.
struct TensorSpec {
    name: String,
    dims: Vec<usize>,
    dtype: TensorType,
    contents: Contents,
}

enum Contents {
    /// Normally distributed values.
    Random {
        mean: f32,
        std: f32,
    },
    Values(Vec<f32>),
}

/// Standard deviation of random weight matrices: the scale of trained Llama weights,
/// which keeps activations finite through every layer.
const WEIGHT_STD: f32 = 0.02;

/// The tensors llama.cpp's converter writes for a Llama 3 model, in its order.
fn tensor_plan(dims: &Dimensions, quantization: Quantization) -> Vec<TensorSpec> {
    let vector = |name: String, len: usize| TensorSpec {
        name,
        dims: vec![len],
        dtype: GgmlDType::F32.into(),
        contents: Contents::Random { mean: 1.0, std: WEIGHT_STD },
    };
    let matrix = |name: String, rows: usize, cols: usize, role: MatrixRole| TensorSpec {
        name,
        dims: vec![rows, cols],
        dtype: matrix_dtype(quantization, role, dims).into(),
        contents: Contents::Random { mean: 0.0, std: WEIGHT_STD },
    };
    let (q_width, kv_width) = (dims.heads * dims.head_dim, dims.kv_heads * dims.head_dim);

    let mut tensors = Vec::new();
    if dims.family == Family::Llama3 {
        tensors.push(TensorSpec {
            name: "rope_freqs.weight".into(),
            dims: vec![dims.head_dim / 2],
            dtype: GgmlDType::F32.into(),
            contents: Contents::Values(llama3_rope_factors(dims)),
        });
    }
    tensors.push(matrix("token_embd.weight".into(), dims.vocab, dims.hidden, MatrixRole::Embedding));
    if let Some(latent) = dims.latent {
        deepseek2_layers(dims, &latent, quantization, &mut tensors);
    }
    if dims.family == Family::GptOss {
        gpt_oss_layers(dims, quantization, &mut tensors);
    }
    for layer in (0..dims.layers).filter(|_| dims.latent.is_none() && dims.family != Family::GptOss) {
        let name = |suffix: &str| format!("blk.{layer}.{suffix}");
        tensors.extend([
            vector(name("attn_norm.weight"), dims.hidden),
            matrix(name("attn_q.weight"), q_width, dims.hidden, MatrixRole::Other),
            matrix(name("attn_k.weight"), kv_width, dims.hidden, MatrixRole::Other),
            matrix(name("attn_v.weight"), kv_width, dims.hidden, MatrixRole::AttentionValue(layer)),
            matrix(name("attn_output.weight"), dims.hidden, q_width, MatrixRole::AttentionOutput),
        ]);
        if matches!(dims.family, Family::Qwen3Moe | Family::Gemma3) {
            tensors.push(vector(name("attn_q_norm.weight"), dims.head_dim));
            tensors.push(vector(name("attn_k_norm.weight"), dims.head_dim));
        }
        if dims.family == Family::Gemma3 {
            tensors.push(vector(name("post_attention_norm.weight"), dims.hidden));
        }
        tensors.push(vector(name("ffn_norm.weight"), dims.hidden));
        match dims.experts {
            None => tensors.extend([
                matrix(name("ffn_gate.weight"), dims.ffn, dims.hidden, MatrixRole::Other),
                matrix(name("ffn_up.weight"), dims.ffn, dims.hidden, MatrixRole::Other),
                matrix(name("ffn_down.weight"), dims.hidden, dims.ffn, MatrixRole::FeedForwardDown(layer)),
            ]),
            Some(ExpertDims { experts, .. }) => {
                let stacked = |suffix: &str, rows: usize, cols: usize, role: MatrixRole| TensorSpec {
                    dims: vec![experts, rows, cols],
                    dtype: quantization.expert_dtype(matrix_dtype(quantization, role, dims)),
                    ..matrix(name(suffix), rows, cols, role)
                };
                tensors.extend([
                    // llama.cpp's converter and quantizer keep the router in f32.
                    TensorSpec {
                        dtype: GgmlDType::F32.into(),
                        ..matrix(name("ffn_gate_inp.weight"), experts, dims.hidden, MatrixRole::Other)
                    },
                    stacked("ffn_gate_exps.weight", dims.ffn, dims.hidden, MatrixRole::Other),
                    stacked("ffn_up_exps.weight", dims.ffn, dims.hidden, MatrixRole::Other),
                    stacked("ffn_down_exps.weight", dims.hidden, dims.ffn, MatrixRole::FeedForwardDown(layer)),
                ]);
            }
        }
        if dims.family == Family::Gemma3 {
            tensors.push(vector(name("post_ffw_norm.weight"), dims.hidden));
        }
    }
    tensors.push(vector("output_norm.weight".into(), dims.hidden));
    if !dims.tied_embeddings {
        tensors.push(matrix("output.weight".into(), dims.vocab, dims.hidden, MatrixRole::Output));
    }
    tensors
}

/// DeepSeek's layers, as llama.cpp's converter names and shapes them (its MLA layout,
/// with `attn_k_b` and `attn_v_b` per head).
fn deepseek2_layers(dims: &Dimensions, latent: &LatentDims, quantization: Quantization, tensors: &mut Vec<TensorSpec>) {
    let experts = dims.experts.map_or(0, |e| e.experts);
    let spec = |name: String, shape: Vec<usize>, dtype: GgmlDType, mean: f32, std: f32| TensorSpec {
        name,
        dims: shape,
        dtype: dtype.into(),
        contents: Contents::Random { mean, std },
    };
    // Rows too short for the mix's blocks get Q8_0, as llama-quantize falls back to
    // another type for them.
    let dtype = |cols: usize, role: MatrixRole| {
        let chosen = matrix_dtype(quantization, role, dims);
        if cols.is_multiple_of(chosen.block_size()) {
            chosen
        } else {
            GgmlDType::Q8_0
        }
    };
    let matrix = |name: String, rows: usize, cols: usize, role: MatrixRole| {
        spec(name, vec![rows, cols], dtype(cols, role), 0.0, WEIGHT_STD)
    };
    let vector = |name: String, len: usize| spec(name, vec![len], GgmlDType::F32, 1.0, WEIGHT_STD);
    let q_head = latent.nope_dim + latent.rope_dim;
    for layer in 0..dims.layers {
        let name = |suffix: &str| format!("blk.{layer}.{suffix}");
        tensors.extend([
            vector(name("attn_norm.weight"), dims.hidden),
            matrix(name("attn_q_a.weight"), latent.query_rank, dims.hidden, MatrixRole::Other),
            vector(name("attn_q_a_norm.weight"), latent.query_rank),
            matrix(name("attn_q_b.weight"), dims.heads * q_head, latent.query_rank, MatrixRole::Other),
            matrix(name("attn_kv_a_mqa.weight"), latent.latent_rank + latent.rope_dim, dims.hidden, MatrixRole::Other),
            vector(name("attn_kv_a_norm.weight"), latent.latent_rank),
        ]);
        // The latent is normed to about 1 per value: keep the scores moderate.
        if latent.legacy_kv_b {
            let rows = dims.heads * (latent.nope_dim + latent.value_dim);
            let kv_b = dtype(latent.latent_rank, MatrixRole::Other);
            tensors.push(spec(name("attn_kv_b.weight"), vec![rows, latent.latent_rank], kv_b, 0.0, 0.2));
        } else {
            tensors.extend([
                // Per head: ggml's {nope, latent, heads} and {latent, value, heads}.
                spec(
                    name("attn_k_b.weight"),
                    vec![dims.heads, latent.latent_rank, latent.nope_dim],
                    dtype(latent.nope_dim, MatrixRole::Other),
                    0.0,
                    0.2,
                ),
                spec(
                    name("attn_v_b.weight"),
                    vec![dims.heads, latent.value_dim, latent.latent_rank],
                    dtype(latent.latent_rank, MatrixRole::AttentionValue(layer)),
                    0.0,
                    0.2,
                ),
            ]);
        }
        tensors.extend([
            matrix(name("attn_output.weight"), dims.hidden, dims.heads * latent.value_dim, MatrixRole::Other),
            vector(name("ffn_norm.weight"), dims.hidden),
        ]);
        let down = MatrixRole::FeedForwardDown(layer);
        if layer < latent.dense_layers {
            tensors.extend([
                matrix(name("ffn_gate.weight"), dims.ffn, dims.hidden, MatrixRole::Other),
                matrix(name("ffn_up.weight"), dims.ffn, dims.hidden, MatrixRole::Other),
                matrix(name("ffn_down.weight"), dims.hidden, dims.ffn, down),
            ]);
            continue;
        }
        let width = latent.expert_ffn;
        let stacked = |suffix: &str, rows: usize, cols: usize, role: MatrixRole| TensorSpec {
            dtype: quantization.expert_dtype(dtype(cols, role)),
            ..spec(name(suffix), vec![experts, rows, cols], dtype(cols, role), 0.0, WEIGHT_STD)
        };
        tensors.extend([
            spec(name("ffn_gate_inp.weight"), vec![experts, dims.hidden], GgmlDType::F32, 0.0, WEIGHT_STD),
            // Large enough to change which experts win.
            spec(name("exp_probs_b.bias"), vec![experts], GgmlDType::F32, 0.0, 0.05),
            stacked("ffn_gate_exps.weight", width, dims.hidden, MatrixRole::Other),
            stacked("ffn_up_exps.weight", width, dims.hidden, MatrixRole::Other),
            stacked("ffn_down_exps.weight", dims.hidden, width, down),
            matrix(name("ffn_gate_shexp.weight"), width, dims.hidden, MatrixRole::Other),
            matrix(name("ffn_up_shexp.weight"), width, dims.hidden, MatrixRole::Other),
            matrix(name("ffn_down_shexp.weight"), dims.hidden, width, down),
        ]);
    }
}

/// gpt-oss's layers, as llama.cpp's converter names and shapes them: biases on q, k, v
/// and the output, a sink per head, the feed-forward's norm named `post_attention_norm`,
/// a router with a bias, and stacked experts with stacked biases.
fn gpt_oss_layers(dims: &Dimensions, quantization: Quantization, tensors: &mut Vec<TensorSpec>) {
    let experts = dims.experts.expect("gpt-oss has experts");
    let spec = |name: String, shape: Vec<usize>, dtype: TensorType, mean: f32, std: f32| TensorSpec {
        name,
        dims: shape,
        dtype,
        contents: Contents::Random { mean, std },
    };
    let f32_type = TensorType::Ggml(GgmlDType::F32);
    let matrix = |name: String, rows: usize, cols: usize, role: MatrixRole| {
        spec(name, vec![rows, cols], matrix_dtype(quantization, role, dims).into(), 0.0, WEIGHT_STD)
    };
    let vector = |name: String, len: usize, mean: f32, std: f32| spec(name, vec![len], f32_type, mean, std);
    let (q_width, kv_width) = (dims.heads * dims.head_dim, dims.kv_heads * dims.head_dim);
    for layer in 0..dims.layers {
        let name = |suffix: &str| format!("blk.{layer}.{suffix}");
        let stacked = |suffix: &str, rows: usize, cols: usize, role: MatrixRole| {
            let dtype = quantization.expert_dtype(matrix_dtype(quantization, role, dims));
            spec(name(suffix), vec![experts.experts, rows, cols], dtype, 0.0, WEIGHT_STD)
        };
        let stacked_bias = |suffix: &str, width: usize| {
            spec(name(suffix), vec![experts.experts, width], f32_type, 0.0, BIAS_STD)
        };
        tensors.extend([
            vector(name("attn_norm.weight"), dims.hidden, 1.0, WEIGHT_STD),
            matrix(name("attn_q.weight"), q_width, dims.hidden, MatrixRole::Other),
            vector(name("attn_q.bias"), q_width, 0.0, BIAS_STD),
            matrix(name("attn_k.weight"), kv_width, dims.hidden, MatrixRole::Other),
            vector(name("attn_k.bias"), kv_width, 0.0, BIAS_STD),
            matrix(name("attn_v.weight"), kv_width, dims.hidden, MatrixRole::AttentionValue(layer)),
            vector(name("attn_v.bias"), kv_width, 0.0, BIAS_STD),
            matrix(name("attn_output.weight"), dims.hidden, q_width, MatrixRole::AttentionOutput),
            vector(name("attn_output.bias"), dims.hidden, 0.0, BIAS_STD),
            // About the size of the scores, so that the sinks take a real share.
            vector(name("attn_sinks.weight"), dims.heads, 0.0, 1.0),
            vector(name("post_attention_norm.weight"), dims.hidden, 1.0, WEIGHT_STD),
            // llama.cpp's quantizer keeps the router in f32.
            spec(name("ffn_gate_inp.weight"), vec![experts.experts, dims.hidden], f32_type, 0.0, WEIGHT_STD),
            vector(name("ffn_gate_inp.bias"), experts.experts, 0.0, 0.05),
            stacked("ffn_gate_exps.weight", dims.ffn, dims.hidden, MatrixRole::Other),
            stacked_bias("ffn_gate_exps.bias", dims.ffn),
            stacked("ffn_up_exps.weight", dims.ffn, dims.hidden, MatrixRole::Other),
            stacked_bias("ffn_up_exps.bias", dims.ffn),
            stacked("ffn_down_exps.weight", dims.hidden, dims.ffn, MatrixRole::FeedForwardDown(layer)),
            stacked_bias("ffn_down_exps.bias", dims.hidden),
        ]);
    }
}

/// Standard deviation of random biases.
const BIAS_STD: f32 = 0.1;

/// What a matrix is, as far as llama.cpp's choice of quantization cares.
#[derive(Debug, Clone, Copy)]
enum MatrixRole {
    Embedding,
    Output,
    AttentionValue(usize),
    AttentionOutput,
    FeedForwardDown(usize),
    Other,
}

/// The storage type `llama-quantize` picks (`llama_tensor_get_type` in llama.cpp's
/// `src/llama-quant.cpp`), for the Llama 3 shapes: every row length here is a multiple
/// of 256, so no fallback types come into play. (Its special cases for models of 8
/// experts and for 70B models are left out.)
fn matrix_dtype(quantization: Quantization, role: MatrixRole, dims: &Dimensions) -> GgmlDType {
    // The LM head, or the embedding that doubles as one, gets Q6_K in every mix here.
    let is_head = matches!(role, MatrixRole::Output) || (dims.tied_embeddings && matches!(role, MatrixRole::Embedding));
    // A BF16 conversion is not quantized: no type differs from another.
    if quantization == Quantization::Bf16 {
        return GgmlDType::BF16;
    }
    if quantization == Quantization::Mxfp4Moe {
        return GgmlDType::Q8_0;
    }
    if is_head {
        return GgmlDType::Q6K;
    }
    match (quantization, role) {
        (Quantization::Q4KM, MatrixRole::AttentionValue(layer) | MatrixRole::FeedForwardDown(layer))
            if use_more_bits(layer, dims.layers) =>
        {
            GgmlDType::Q6K
        }
        (Quantization::Q2K, MatrixRole::AttentionValue(_)) if dims.heads / dims.kv_heads >= 4 => GgmlDType::Q4K,
        (Quantization::Q2K, MatrixRole::AttentionValue(_) | MatrixRole::AttentionOutput | MatrixRole::FeedForwardDown(_)) => {
            GgmlDType::Q3K
        }
        (Quantization::Q3KM, MatrixRole::AttentionValue(layer)) if layer < 2 => GgmlDType::Q5K,
        (Quantization::Q3KM, MatrixRole::FeedForwardDown(layer)) if layer < dims.layers / 16 => GgmlDType::Q5K,
        (Quantization::Q3KM, MatrixRole::AttentionValue(_) | MatrixRole::AttentionOutput | MatrixRole::FeedForwardDown(_)) => {
            GgmlDType::Q4K
        }
        _ => quantization.base_dtype(),
    }
}

/// llama.cpp's `use_more_bits`: the first and last eighth of the layers, and every third
/// layer between them.
fn use_more_bits(layer: usize, layers: usize) -> bool {
    let (layer, layers) = (layer as i64, layers as i64);
    layer < layers / 8 || layer >= 7 * layers / 8 || (layer - layers / 8) % 3 == 2
}

/// `rope_freqs.weight`: Llama 3.1's frequency-dependent RoPE scaling as per-frequency
/// divisors, computed as llama.cpp's `convert_hf_to_gguf.py` does.
fn llama3_rope_factors(dims: &Dimensions) -> Vec<f32> {
    const ORIGINAL_CONTEXT: f32 = 8192.0;
    const LOW_FREQ_FACTOR: f32 = 1.0;
    const HIGH_FREQ_FACTOR: f32 = 4.0;
    let low_freq_wavelength = ORIGINAL_CONTEXT / LOW_FREQ_FACTOR;
    let high_freq_wavelength = ORIGINAL_CONTEXT / HIGH_FREQ_FACTOR;
    let factor = dims.rope_scaling_factor;
    (0..dims.head_dim / 2)
        .map(|i| {
            let frequency = 1.0 / dims.rope_theta.powf((2 * i) as f32 / dims.head_dim as f32);
            let wavelength = 2.0 * std::f32::consts::PI / frequency;
            if wavelength < high_freq_wavelength {
                1.0
            } else if wavelength > low_freq_wavelength {
                factor
            } else {
                let smooth = (ORIGINAL_CONTEXT / wavelength - LOW_FREQ_FACTOR) / (HIGH_FREQ_FACTOR - LOW_FREQ_FACTOR);
                1.0 / ((1.0 - smooth) / factor + smooth)
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Metadata and vocabulary

fn metadata(shape: Shape, dims: &Dimensions, quantization: Quantization, seed: u64) -> Vec<(String, Value)> {
    let u32_value = |n: usize| Value::U32(u32::try_from(n).expect("model dimensions fit in u32"));
    let vocab = Vocabulary::synthetic(dims.vocab);
    let arch = dims.family.architecture();
    let key = |suffix: &str| format!("{arch}.{suffix}");
    let mut entries = vec![
        ("general.architecture".to_owned(), Value::String(arch.into())),
        ("general.name".to_owned(), Value::String(format!("synthetic {} {} seed {seed}", shape.name(), quantization.name()))),
        ("general.file_type".to_owned(), Value::U32(quantization.file_type())),
        ("general.quantization_version".to_owned(), Value::U32(2)),
        (key("block_count"), u32_value(dims.layers)),
        (key("context_length"), u32_value(dims.context)),
        (key("embedding_length"), u32_value(dims.hidden)),
        (key("feed_forward_length"), u32_value(dims.ffn)),
        (key("attention.head_count"), u32_value(dims.heads)),
        (key("attention.head_count_kv"), u32_value(dims.kv_heads)),
        (key("attention.key_length"), u32_value(dims.head_dim)),
        (key("attention.value_length"), u32_value(dims.head_dim)),
        (key("rope.freq_base"), Value::F32(dims.rope_theta)),
        (key("rope.dimension_count"), u32_value(dims.head_dim)),
        (key("attention.layer_norm_rms_epsilon"), Value::F32(dims.rms_eps)),
        (key("vocab_size"), u32_value(dims.vocab)),
        ("tokenizer.ggml.model".to_owned(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".to_owned(), Value::String("llama-bpe".into())),
    ];
    if let Some(experts) = dims.experts {
        entries.push((key("expert_count"), u32_value(experts.experts)));
        entries.push((key("expert_used_count"), u32_value(experts.used)));
        if dims.family == Family::Qwen3Moe {
            entries.push((key("expert_feed_forward_length"), u32_value(dims.ffn)));
        }
    }
    if let Some(latent) = dims.latent {
        // What llama.cpp's converter writes for DeepSeek-V3 in its MLA layout: the cache's
        // row (latent and rotary key) as the one KV head's key, the latent as its value.
        let replace = |entries: &mut Vec<(String, Value)>, suffix: &str, value: Value| {
            if let Some(entry) = entries.iter_mut().find(|(k, _)| *k == key(suffix)) {
                entry.1 = value;
            }
        };
        replace(&mut entries, "rope.dimension_count", u32_value(latent.rope_dim));
        if latent.legacy_kv_b {
            // The heads as multi-head attention's, as the converter wrote them before MLA.
            replace(&mut entries, "attention.head_count_kv", u32_value(dims.heads));
            replace(&mut entries, "attention.key_length", u32_value(latent.nope_dim + latent.rope_dim));
            replace(&mut entries, "attention.value_length", u32_value(latent.value_dim));
        } else {
            replace(&mut entries, "attention.key_length", u32_value(latent.latent_rank + latent.rope_dim));
            replace(&mut entries, "attention.value_length", u32_value(latent.latent_rank));
            entries.extend([
                (key("attention.key_length_mla"), u32_value(latent.nope_dim + latent.rope_dim)),
                (key("attention.value_length_mla"), u32_value(latent.value_dim)),
            ]);
        }
        entries.extend([
            (key("attention.q_lora_rank"), u32_value(latent.query_rank)),
            (key("attention.kv_lora_rank"), u32_value(latent.latent_rank)),
            (key("leading_dense_block_count"), u32_value(latent.dense_layers)),
            (key("expert_feed_forward_length"), u32_value(latent.expert_ffn)),
            (key("expert_shared_count"), u32_value(1)),
            (key("expert_weights_scale"), Value::F32(DEEPSEEK_ROUTED_SCALE)),
            (key("expert_weights_norm"), Value::Bool(true)),
            (key("expert_gating_func"), u32_value(2)),
            (key("expert_group_count"), u32_value(latent.groups)),
            (key("expert_group_used_count"), u32_value(latent.groups_used)),
            (key("rope.scaling.type"), Value::String("yarn".into())),
            (key("rope.scaling.factor"), Value::F32(DEEPSEEK_YARN_FACTOR)),
            (key("rope.scaling.original_context_length"), u32_value(DEEPSEEK_YARN_ORIGINAL_CONTEXT)),
            // 0.1 * mscale_all_dim, as the converter writes it.
            (key("rope.scaling.yarn_log_multiplier"), Value::F32(0.1)),
        ]);
    }
    if dims.family == Family::GptOss {
        entries.extend([
            (key("expert_feed_forward_length"), u32_value(dims.ffn)),
            (key("attention.sliding_window"), u32_value(GPT_OSS_WINDOW)),
            (key("rope.scaling.type"), Value::String("yarn".into())),
            (key("rope.scaling.factor"), Value::F32(GPT_OSS_YARN_FACTOR)),
            (key("rope.scaling.original_context_length"), u32_value(GPT_OSS_YARN_ORIGINAL_CONTEXT)),
        ]);
    }
    if dims.family == Family::Gemma3 {
        entries.extend([
            (key("attention.sliding_window"), u32_value(GEMMA3_WINDOW)),
            (key("attention.sliding_window_pattern"), u32_value(GEMMA3_PATTERN)),
            (key("rope.freq_base_swa"), Value::F32(GEMMA3_LOCAL_ROPE_THETA)),
            (key("final_logit_softcapping"), Value::F32(GEMMA3_FINAL_SOFTCAP)),
        ]);
    }
    entries.extend(vocab.into_metadata().into_iter().map(|(key, value)| (key.to_owned(), value)));
    entries
}

/// A byte-level BPE vocabulary laid out like Llama 3's: the 256 byte tokens, merged
/// tokens, then 256 control tokens with Llama 3's names at the end. Both llama.cpp and
/// Hearth accept it; it tokenizes text into plausible (two- or three-byte) pieces.
struct Vocabulary {
    tokens: Vec<String>,
    token_types: Vec<i32>,
    merges: Vec<String>,
    bos: u32,
    eos: u32,
}

/// llama.cpp's `llama_token_type` codes.
const TOKEN_NORMAL: i32 = 1;
const TOKEN_CONTROL: i32 = 3;
const CONTROL_TOKENS: usize = 256;
/// Llama 3's named control tokens, in id order from 128000; the rest are reserved ones.
const NAMED_CONTROL_TOKENS: [&str; 11] = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
];
const EOT_INDEX: usize = 9;
/// Llama 3's chat format (without the date and tool preamble of 3.1's template).
const LLAMA3_CHAT_TEMPLATE: &str = "{{ bos_token }}{% for message in messages %}\
    {{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}\
    {% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}";

impl Vocabulary {
    fn synthetic(size: usize) -> Self {
        let normal_tokens = size
            .checked_sub(CONTROL_TOKENS)
            .filter(|&n| n >= 256)
            .unwrap_or_else(|| panic!("a synthetic vocabulary needs at least {} tokens", 256 + CONTROL_TOKENS));
        let byte_tokens = byte_level_chars().map(String::from);
        let mut tokens: Vec<String> = byte_tokens.to_vec();
        let mut merges = Vec::with_capacity(normal_tokens - 256);
        for (left, right) in merge_candidates(&byte_tokens).take(normal_tokens - 256) {
            merges.push(format!("{left} {right}"));
            tokens.push(left + &right);
        }
        assert_eq!(tokens.len(), normal_tokens, "not enough distinct merges for a vocabulary of {size}");
        let first_control = tokens.len();
        tokens.extend(NAMED_CONTROL_TOKENS.iter().map(|t| t.to_string()));
        tokens.extend(
            (3..).map(|n| format!("<|reserved_special_token_{n}|>")).take(CONTROL_TOKENS - NAMED_CONTROL_TOKENS.len()),
        );
        let mut token_types = vec![TOKEN_NORMAL; first_control];
        token_types.resize(size, TOKEN_CONTROL);
        let id = |index: usize| u32::try_from(index).expect("vocabulary fits in u32");
        Self { tokens, token_types, merges, bos: id(first_control), eos: id(first_control + EOT_INDEX) }
    }

    fn into_metadata(self) -> Vec<(&'static str, Value)> {
        let strings = |items: Vec<String>| Value::Array(items.into_iter().map(Value::String).collect());
        vec![
            ("tokenizer.ggml.tokens", strings(self.tokens)),
            ("tokenizer.ggml.token_type", Value::Array(self.token_types.into_iter().map(Value::I32).collect())),
            ("tokenizer.ggml.merges", strings(self.merges)),
            ("tokenizer.ggml.bos_token_id", Value::U32(self.bos)),
            ("tokenizer.ggml.eos_token_id", Value::U32(self.eos)),
            ("tokenizer.ggml.add_bos_token", Value::Bool(true)),
            ("tokenizer.chat_template", Value::String(LLAMA3_CHAT_TEMPLATE.into())),
        ]
    }
}

/// GPT-2's byte-to-character map (`bytes_to_unicode`): printable bytes stand for
/// themselves, the others for the characters from U+0100 on.
fn byte_level_chars() -> [char; 256] {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut chars = ['\0'; 256];
    let mut next_unprintable = 256u32;
    for byte in 0..=255u8 {
        chars[byte as usize] = if printable(byte) {
            char::from(byte)
        } else {
            next_unprintable += 1;
            char::from_u32(next_unprintable - 1).expect("U+0100.. are characters")
        };
    }
    chars
}

/// Merges in rank order: pairs of bytes, then a pair followed by a byte, each walked
/// diagonally over byte ranks so that common English bytes (space, lowercase letters)
/// merge first, as in a trained vocabulary.
fn merge_candidates(byte_tokens: &[String; 256]) -> impl Iterator<Item = (String, String)> + '_ {
    let by_rank: Vec<&String> = bytes_by_frequency().iter().map(|&b| &byte_tokens[b as usize]).collect();
    let pairs: Vec<(String, String)> =
        diagonal(256, 256).map(|(a, b)| (by_rank[a].clone(), by_rank[b].clone())).collect();
    let triples = diagonal(pairs.len(), 256).map({
        let pairs = pairs.clone();
        let by_rank = by_rank.clone();
        move |(p, b)| (format!("{}{}", pairs[p].0, pairs[p].1), by_rank[b].clone())
    });
    pairs.into_iter().chain(triples)
}

/// Every byte once, the ones common in English text first.
fn bytes_by_frequency() -> Vec<u8> {
    let common = b" etaoinshrdlcumwfgypbvkjxqz,.ETAOINSHRDLCUMWFGYPBVKJXQZ0123456789'\"-:;!?()\n";
    let mut order = common.to_vec();
    order.extend((0..=255u8).filter(|b| !common.contains(b)));
    order
}

/// The pairs `(i, j)` with `i < rows`, `j < cols`, by increasing `i + j`.
fn diagonal(rows: usize, cols: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..rows + cols - 1).flat_map(move |sum| {
        let first = sum.saturating_sub(cols - 1);
        (first..=sum.min(rows - 1)).map(move |i| (i, sum - i))
    })
}

// ---------------------------------------------------------------------------------------
// The GGUF file (format: ggml's docs/gguf.md)

const GGUF_MAGIC: &[u8; 4] = b"GGUF";
const GGUF_VERSION: u32 = 3;
const GGUF_ALIGNMENT: u64 = 32;

fn write_gguf(out: &mut impl Write, metadata: &[(String, Value)], tensors: &[TensorSpec], seed: u64) -> Result<()> {
    let mut header = Vec::new();
    header.extend_from_slice(GGUF_MAGIC);
    header.extend_from_slice(&GGUF_VERSION.to_le_bytes());
    header.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    header.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        encode_string(&mut header, key);
        header.extend_from_slice(&value_type_code(value).to_le_bytes());
        encode_value(&mut header, value)?;
    }
    let mut offset = 0u64;
    for tensor in tensors {
        encode_string(&mut header, &tensor.name);
        header.extend_from_slice(&(tensor.dims.len() as u32).to_le_bytes());
        // GGUF lists dimensions innermost first.
        for &dim in tensor.dims.iter().rev() {
            header.extend_from_slice(&(dim as u64).to_le_bytes());
        }
        header.extend_from_slice(&tensor.dtype.number().to_le_bytes());
        header.extend_from_slice(&offset.to_le_bytes());
        offset += padded(tensor_bytes(tensor));
    }
    header.resize(padded(header.len() as u64) as usize, 0);
    write_all(out, &header)?;

    for (index, tensor) in tensors.iter().enumerate() {
        let size = write_tensor_data(out, tensor, tensor_seed(seed, index))?;
        debug_assert_eq!(size, tensor_bytes(tensor), "{}", tensor.name);
        write_all(out, &vec![0; (padded(size) - size) as usize])?;
    }
    Ok(())
}

fn padded(size: u64) -> u64 {
    size.div_ceil(GGUF_ALIGNMENT) * GGUF_ALIGNMENT
}

fn tensor_bytes(tensor: &TensorSpec) -> u64 {
    let elements: usize = tensor.dims.iter().product();
    (elements / tensor.dtype.block_values() * tensor.dtype.block_bytes()) as u64
}

fn write_all(out: &mut impl Write, bytes: &[u8]) -> Result<()> {
    out.write_all(bytes).map_err(|e| Error::io("synthetic GGUF output", e))
}

fn encode_string(buffer: &mut Vec<u8>, text: &str) {
    buffer.extend_from_slice(&(text.len() as u64).to_le_bytes());
    buffer.extend_from_slice(text.as_bytes());
}

/// GGUF's `gguf_metadata_value_type`.
fn value_type_code(value: &Value) -> u32 {
    match value {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn encode_value(buffer: &mut Vec<u8>, value: &Value) -> Result<()> {
    match value {
        Value::U8(v) => buffer.push(*v),
        Value::I8(v) => buffer.extend_from_slice(&v.to_le_bytes()),
        Value::U16(v) => buffer.extend_from_slice(&v.to_le_bytes()),
        Value::I16(v) => buffer.extend_from_slice(&v.to_le_bytes()),
        Value::U32(v) => buffer.extend_from_slice(&v.to_le_bytes()),
        Value::I32(v) => buffer.extend_from_slice(&v.to_le_bytes()),
        Value::U64(v) => buffer.extend_from_slice(&v.to_le_bytes()),
        Value::I64(v) => buffer.extend_from_slice(&v.to_le_bytes()),
        Value::F32(v) => buffer.extend_from_slice(&v.to_le_bytes()),
        Value::F64(v) => buffer.extend_from_slice(&v.to_le_bytes()),
        Value::Bool(v) => buffer.push(u8::from(*v)),
        Value::String(v) => encode_string(buffer, v),
        Value::Array(items) => {
            // GGUF arrays are homogeneous; an empty one may claim any element type.
            let element_type = items.first().map_or(value_type_code(&Value::U32(0)), value_type_code);
            if items.iter().any(|item| value_type_code(item) != element_type) {
                return Err(Error::InvalidInput("a GGUF array mixes value types".into()));
            }
            buffer.extend_from_slice(&element_type.to_le_bytes());
            buffer.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                encode_value(buffer, item)?;
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Weights

/// Elements generated and quantized as one unit of work (16 MiB of f32). Chunks depend
/// only on the tensor's shape, never on the thread count, so the output does not either.
const CHUNK_ELEMENTS: usize = 1 << 22;

/// Writes one tensor's data, generating and quantizing its chunks on every core a wave
/// at a time (candle's quantizers are single-threaded), and returns the bytes written.
fn write_tensor_data(out: &mut impl Write, tensor: &TensorSpec, seed: u64) -> Result<u64> {
    if let Contents::Values(values) = &tensor.contents {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        write_all(out, &bytes)?;
        return Ok(bytes.len() as u64);
    }
    let row_len = *tensor.dims.last().expect("tensors have a dimension");
    let rows = tensor.dims.iter().product::<usize>() / row_len;
    let rows_per_chunk = (CHUNK_ELEMENTS / row_len).max(1);
    let chunks: Vec<(usize, std::ops::Range<usize>)> =
        (0..rows).step_by(rows_per_chunk).map(|start| start..(start + rows_per_chunk).min(rows)).enumerate().collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut written = 0u64;
    for wave in chunks.chunks(threads) {
        let encoded: Vec<Result<Vec<u8>>> = std::thread::scope(|scope| {
            let workers: Vec<_> = wave
                .iter()
                .map(|(index, rows)| {
                    let chunk_seed = seed ^ splitmix64(*index as u64);
                    scope.spawn(move || encode_chunk(tensor, rows.len(), row_len, chunk_seed))
                })
                .collect();
            workers.into_iter().map(|w| w.join().expect("a quantization worker panicked")).collect()
        });
        for bytes in encoded {
            let bytes = bytes?;
            write_all(out, &bytes)?;
            written += bytes.len() as u64;
        }
    }
    Ok(written)
}

/// `rows` random rows of `tensor`, in its storage type.
fn encode_chunk(tensor: &TensorSpec, rows: usize, row_len: usize, seed: u64) -> Result<Vec<u8>> {
    let Contents::Random { mean, std } = tensor.contents else { unreachable!("fixed values are written whole") };
    let values = normal_values(rows * row_len, mean, std, seed);
    match tensor.dtype {
        TensorType::Ggml(GgmlDType::F32) => Ok(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
        TensorType::Mxfp4 => Ok(crate::kernels::quantize_mxfp4(&values)),
        TensorType::Ggml(dtype) => {
            let dense = Tensor::from_vec(values, (rows, row_len), &Device::Cpu)?;
            Ok(QTensor::quantize(&dense, dtype)?.data()?.into_owned())
        }
    }
}

/// `count` samples of N(mean, std²), by the Box–Muller transform.
fn normal_values(count: usize, mean: f32, std: f32, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut values = Vec::with_capacity(count + 1);
    while values.len() < count {
        // 1 - u lies in (0, 1], so the logarithm is finite.
        let radius = (-2.0 * (1.0 - rng.random::<f32>()).ln()).sqrt();
        let angle = std::f32::consts::TAU * rng.random::<f32>();
        values.push(mean + std * radius * angle.cos());
        values.push(mean + std * radius * angle.sin());
    }
    values.truncate(count);
    values
}

fn tensor_seed(seed: u64, tensor_index: usize) -> u64 {
    splitmix64(splitmix64(seed) ^ tensor_index as u64)
}

/// SplitMix64's finalizer: spreads nearby seeds (1, 2, 3...) over the whole range.
fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_k_m_gives_half_the_layers_more_bits_as_llama_cpp_does() {
        // The layers whose attn_v and ffn_down are Q6_K in llama.cpp's Llama-3.2-1B Q4_K_M.
        let more: Vec<usize> = (0..16).filter(|&l| use_more_bits(l, 16)).collect();
        assert_eq!(more, [0, 1, 4, 7, 10, 13, 14, 15]);
        let more_8b: Vec<usize> = (0..32).filter(|&l| use_more_bits(l, 32)).collect();
        assert_eq!(more_8b.len(), 16);
    }

    #[test]
    fn the_1b_layout_has_llama_cpps_tensor_count_and_types() {
        let dims = Shape::Llama32_1B.dimensions();
        let tensors = tensor_plan(&dims, Quantization::Q4KM);
        // 9 per block, plus token_embd, rope_freqs and output_norm (tied: no output.weight).
        assert_eq!(tensors.len(), 16 * 9 + 3);
        let dtype = |name: &str| tensors.iter().find(|t| t.name == name).and_then(|t| t.dtype.ggml());
        assert_eq!(dtype("token_embd.weight"), Some(GgmlDType::Q6K));
        assert_eq!(dtype("blk.0.attn_v.weight"), Some(GgmlDType::Q6K));
        assert_eq!(dtype("blk.2.attn_v.weight"), Some(GgmlDType::Q4K));
        assert_eq!(dtype("blk.4.ffn_down.weight"), Some(GgmlDType::Q6K));
        assert_eq!(dtype("blk.5.ffn_gate.weight"), Some(GgmlDType::Q4K));
        assert_eq!(dtype("output.weight"), None);
        let weights: u64 = tensors.iter().map(|t| t.dims.iter().product::<usize>() as u64).sum();
        assert_eq!(weights, 1_235_814_432, "Llama-3.2-1B's parameter count (+ 32 rope factors)");
    }

    #[test]
    fn low_bit_mixes_follow_llama_cpps_choices() {
        let dtype = |shape: Shape, quantization, name: &str| {
            let tensors = tensor_plan(&shape.dimensions(), quantization);
            tensors.iter().find(|t| t.name == name).and_then(|t| t.dtype.ggml())
        };
        let (tiny, one_b) = (Shape::Tiny, Shape::Llama32_1B);
        // Q2_K: attn_v takes Q3_K, or Q4_K where 4 query heads share a key head (the 1B's 32 / 8).
        assert_eq!(dtype(tiny, Quantization::Q2K, "blk.0.attn_q.weight"), Some(GgmlDType::Q2K));
        assert_eq!(dtype(tiny, Quantization::Q2K, "blk.0.attn_v.weight"), Some(GgmlDType::Q3K));
        assert_eq!(dtype(one_b, Quantization::Q2K, "blk.0.attn_v.weight"), Some(GgmlDType::Q4K));
        assert_eq!(dtype(tiny, Quantization::Q2K, "blk.1.attn_output.weight"), Some(GgmlDType::Q3K));
        assert_eq!(dtype(tiny, Quantization::Q2K, "blk.1.ffn_down.weight"), Some(GgmlDType::Q3K));
        assert_eq!(dtype(tiny, Quantization::Q2K, "token_embd.weight"), Some(GgmlDType::Q6K), "a tied head");
        let mixtral = Shape::TinyMixtral;
        assert_eq!(dtype(mixtral, Quantization::Q2K, "token_embd.weight"), Some(GgmlDType::Q2K));
        assert_eq!(dtype(mixtral, Quantization::Q2K, "blk.3.ffn_down_exps.weight"), Some(GgmlDType::Q3K));
        // Q3_K_M: Q5_K for the first two attn_v and the first sixteenth of ffn_down.
        assert_eq!(dtype(one_b, Quantization::Q3KM, "blk.1.attn_v.weight"), Some(GgmlDType::Q5K));
        assert_eq!(dtype(one_b, Quantization::Q3KM, "blk.2.attn_v.weight"), Some(GgmlDType::Q4K));
        assert_eq!(dtype(one_b, Quantization::Q3KM, "blk.0.ffn_down.weight"), Some(GgmlDType::Q5K));
        assert_eq!(dtype(one_b, Quantization::Q3KM, "blk.1.ffn_down.weight"), Some(GgmlDType::Q4K));
        assert_eq!(dtype(one_b, Quantization::Q3KM, "blk.1.attn_output.weight"), Some(GgmlDType::Q4K));
        assert_eq!(dtype(one_b, Quantization::Q3KM, "blk.1.ffn_up.weight"), Some(GgmlDType::Q3K));
        // The legacy 5-bit mixes: one type but the head.
        for (quantization, base) in [(Quantization::Q5_0, GgmlDType::Q5_0), (Quantization::Q5_1, GgmlDType::Q5_1)] {
            assert_eq!(dtype(mixtral, quantization, "blk.0.attn_v.weight"), Some(base));
            assert_eq!(dtype(mixtral, quantization, "blk.0.ffn_down_exps.weight"), Some(base));
            assert_eq!(dtype(mixtral, quantization, "output.weight"), Some(GgmlDType::Q6K));
        }
    }

    #[test]
    fn the_8b_layout_keeps_its_own_head() {
        let tensors = tensor_plan(&Shape::Llama31_8B.dimensions(), Quantization::Q4_0);
        let dtype = |name: &str| tensors.iter().find(|t| t.name == name).and_then(|t| t.dtype.ggml());
        assert_eq!(dtype("token_embd.weight"), Some(GgmlDType::Q4_0));
        assert_eq!(dtype("output.weight"), Some(GgmlDType::Q6K));
        assert_eq!(dtype("blk.0.ffn_down.weight"), Some(GgmlDType::Q4_0));
    }

    #[test]
    fn the_vocabulary_is_llama_3_sized_with_valid_merges() {
        let vocab = Vocabulary::synthetic(128_256);
        assert_eq!(vocab.tokens.len(), 128_256);
        assert_eq!(vocab.tokens[vocab.bos as usize], "<|begin_of_text|>");
        assert_eq!(vocab.bos, 128_000);
        assert_eq!(vocab.tokens[vocab.eos as usize], "<|eot_id|>");
        let distinct: std::collections::HashSet<&String> = vocab.tokens.iter().collect();
        assert_eq!(distinct.len(), vocab.tokens.len(), "token texts are distinct");
        assert_eq!(vocab.merges[0], "Ġ Ġ", "the most common byte merges first");
    }

    #[test]
    fn rope_factors_match_llama_3_2s() {
        let factors = llama3_rope_factors(&Shape::Llama32_1B.dimensions());
        assert_eq!(factors.len(), 32);
        assert_eq!(factors[0], 1.0, "high frequencies are not scaled");
        assert_eq!(factors[31], 32.0, "low frequencies are scaled by the factor");
    }
}

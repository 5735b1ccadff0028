//! The shape of a Llama-family decoder, read from GGUF metadata or a Hugging Face `config.json`.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The decoder families Hearth runs. They share one block structure and differ in details
/// recorded in [`ModelConfig`] (biases, q/k norms, RoPE layout).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// Llama 2/3, SmolLM2, and Mistral (which GGUF files also label `llama`).
    Llama,
    Mistral,
    /// Qwen2 and Qwen2.5: biases on the q/k/v projections.
    Qwen2,
    /// Qwen3: RMS norms on queries and keys, per head.
    Qwen3,
    /// Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3's attention, every layer a
    /// mixture of experts.
    Qwen3Moe,
}

impl Architecture {
    fn from_name(name: &str) -> Result<Self> {
        match name {
            "llama" => Ok(Self::Llama),
            "mistral" => Ok(Self::Mistral),
            "qwen2" => Ok(Self::Qwen2),
            "qwen3" => Ok(Self::Qwen3),
            "qwen3moe" | "qwen3_moe" => Ok(Self::Qwen3Moe),
            other => Err(Error::Unsupported(format!(
                "architecture `{other}` (supported: {SUPPORTED_ARCHITECTURES})"
            ))),
        }
    }

    /// RMS norms on queries and keys, per head.
    fn has_qk_norm(self) -> bool {
        matches!(self, Self::Qwen3 | Self::Qwen3Moe)
    }
}

/// What an unsupported file is told Hearth runs instead.
const SUPPORTED_ARCHITECTURES: &str =
    "llama (with Mixtral's experts), mistral, qwen2, qwen3, qwen3moe; deepseek2, gpt-oss and gemma3 are not yet supported";

/// A mixture-of-experts feed-forward: a router picks `experts_used` of `experts` small
/// feed-forwards for each token and mixes their outputs by its weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MoeConfig {
    pub experts: usize,
    pub experts_used: usize,
    /// The inner width of one expert.
    pub expert_ffn: usize,
    /// Whether the chosen experts' weights are rescaled to sum to 1 (Mixtral, Qwen3-MoE).
    pub normalize_weights: bool,
    /// A factor on the chosen experts' weights; 1 for none.
    pub weights_scale: f32,
}

/// How rotary embeddings pair up the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RopeLayout {
    /// Pairs (0,1), (2,3), ...: llama.cpp permutes Llama's q/k weights into this layout.
    Interleaved,
    /// Pairs (i, i + d/2): Hugging Face weights, and Qwen in GGUF ("neox" style).
    Halves,
}

/// Rescaling of RoPE frequencies for contexts longer than the model was trained on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor`.
    Linear { factor: f32 },
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_context: usize,
    },
    /// Per-frequency divisors, as GGUF stores Llama 3.1's scaling (`rope_freqs.weight`).
    FrequencyFactors(Vec<f32>),
}

/// Everything needed to build the blocks of a decoder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub num_layers: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    /// The longest sequence a request may reach (prompt plus completion).
    pub context_length: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f32,
    pub rope_layout: RopeLayout,
    pub rope_scaling: RopeScaling,
    /// Biases on the q, k and v projections (Qwen2).
    pub qkv_bias: bool,
    /// RMS norms on queries and keys (Qwen3).
    pub qk_norm: bool,
    /// The LM head reuses the token embedding.
    pub tied_embeddings: bool,
    /// Experts in place of every layer's dense feed-forward (Mixtral, Qwen3-MoE).
    pub moe: Option<MoeConfig>,
}

impl ModelConfig {
    /// Reads the `{arch}.*` keys of a GGUF file. `tied_embeddings` and the vocabulary size
    /// depend on which tensors the file holds, so the caller passes what it found.
    pub fn from_gguf(
        metadata: &HashMap<String, Value>,
        has_output_tensor: bool,
        embedding_rows: usize,
    ) -> Result<Self> {
        let arch_name = gguf_string(metadata, "general.architecture")?;
        let architecture = Architecture::from_name(arch_name)?;
        let key = |suffix: &str| format!("{arch_name}.{suffix}");
        let num_heads = gguf_usize(metadata, &key("attention.head_count"))?;
        let hidden_size = gguf_usize(metadata, &key("embedding_length"))?;
        let head_dim = match metadata.get(&key("attention.key_length")) {
            Some(v) => value_usize(v, "attention.key_length")?,
            None => hidden_size / num_heads.max(1),
        };
        let rope_scaling = match metadata.get(&key("rope.scaling.type")) {
            Some(Value::String(kind)) if kind == "linear" => RopeScaling::Linear {
                factor: gguf_f32(metadata, &key("rope.scaling.factor"))?,
            },
            Some(Value::String(kind)) if kind != "none" => {
                return Err(Error::Unsupported(format!("RoPE scaling `{kind}`")))
            }
            _ => RopeScaling::None,
        };
        // llama.cpp labels Qwen rotary embeddings "neox" and leaves their weights unpermuted.
        let rope_layout = match architecture {
            Architecture::Llama | Architecture::Mistral => RopeLayout::Interleaved,
            Architecture::Qwen2 | Architecture::Qwen3 | Architecture::Qwen3Moe => RopeLayout::Halves,
        };
        let intermediate_size = gguf_usize(metadata, &key("feed_forward_length"))?;
        let optional_usize = |suffix: &str| -> Result<Option<usize>> {
            metadata.get(&key(suffix)).map(|v| value_usize(v, suffix)).transpose()
        };
        let moe = match optional_usize("expert_count")?.filter(|&n| n > 0) {
            None if architecture == Architecture::Qwen3Moe => {
                return Err(invalid(format!("`{arch_name}.expert_count` is missing: a qwen3moe file needs experts")))
            }
            None => None,
            Some(experts) => Some(MoeConfig {
                experts,
                experts_used: optional_usize("expert_used_count")?
                    .ok_or_else(|| invalid(format!("GGUF metadata lacks `{arch_name}.expert_used_count`")))?,
                // Mixtral's experts are `feed_forward_length` wide; Qwen3-MoE names their width.
                expert_ffn: optional_usize("expert_feed_forward_length")?.unwrap_or(intermediate_size),
                // llama.cpp normalizes the chosen weights of both families.
                normalize_weights: true,
                weights_scale: match metadata.get(&key("expert_weights_scale")) {
                    Some(v) => v.to_f32().map_err(|e| invalid(format!("expert_weights_scale: {e}")))?,
                    None => 1.0,
                },
            }),
        };
        let config = Self {
            architecture,
            num_layers: gguf_usize(metadata, &key("block_count"))?,
            hidden_size,
            intermediate_size,
            num_heads,
            num_kv_heads: match metadata.get(&key("attention.head_count_kv")) {
                Some(v) => value_usize(v, "attention.head_count_kv")?,
                None => num_heads,
            },
            head_dim,
            vocab_size: embedding_rows,
            context_length: gguf_usize(metadata, &key("context_length"))?,
            rms_norm_eps: gguf_f32(metadata, &key("attention.layer_norm_rms_epsilon"))? as f64,
            rope_theta: match metadata.get(&key("rope.freq_base")) {
                Some(v) => v.to_f32().map_err(|e| invalid(format!("rope.freq_base: {e}")))?,
                None => 10_000.0,
            },
            rope_layout,
            rope_scaling,
            qkv_bias: architecture == Architecture::Qwen2,
            qk_norm: architecture.has_qk_norm(),
            tied_embeddings: !has_output_tensor,
            moe,
        };
        config.validate()?;
        Ok(config)
    }

    /// Reads a Hugging Face `config.json`.
    pub fn from_hf_json(json: &str) -> Result<Self> {
        let raw: HfConfig =
            serde_json::from_str(json).map_err(|e| invalid(format!("config.json: {e}")))?;
        // Mixtral is Mistral's block with experts: one architecture here, as in GGUF.
        let architecture = match raw.model_type.as_str() {
            "mixtral" => Architecture::Mistral,
            name => Architecture::from_name(name)?,
        };
        let num_heads = raw.num_attention_heads;
        let moe = match (raw.num_local_experts.or(raw.num_experts), raw.num_experts_per_tok) {
            (Some(experts), Some(experts_used)) if experts > 0 => {
                if raw.decoder_sparse_step.is_some_and(|step| step != 1)
                    || raw.mlp_only_layers.as_ref().is_some_and(|layers| !layers.is_empty())
                {
                    return Err(Error::Unsupported(
                        "a mixture of experts with dense layers between (decoder_sparse_step, mlp_only_layers)".into(),
                    ));
                }
                Some(MoeConfig {
                    experts,
                    experts_used,
                    expert_ffn: raw.moe_intermediate_size.unwrap_or(raw.intermediate_size),
                    // Mixtral always normalizes; Qwen3-MoE says so in its config.
                    normalize_weights: raw.model_type == "mixtral" || raw.norm_topk_prob.unwrap_or(false),
                    weights_scale: 1.0,
                })
            }
            _ if architecture == Architecture::Qwen3Moe => {
                return Err(invalid("config.json of a qwen3_moe model lacks num_experts".into()))
            }
            _ => None,
        };
        let rope_scaling = match raw.rope_scaling {
            None => RopeScaling::None,
            Some(scaling) => match scaling.kind().as_deref() {
                None | Some("default") => RopeScaling::None,
                Some("linear") => RopeScaling::Linear { factor: scaling.factor.unwrap_or(1.0) },
                Some("llama3") => RopeScaling::Llama3 {
                    factor: scaling.factor.unwrap_or(8.0),
                    low_freq_factor: scaling.low_freq_factor.unwrap_or(1.0),
                    high_freq_factor: scaling.high_freq_factor.unwrap_or(4.0),
                    original_context: scaling.original_max_position_embeddings.unwrap_or(8192),
                },
                Some(other) => return Err(Error::Unsupported(format!("RoPE scaling `{other}`"))),
            },
        };
        let config = Self {
            architecture,
            num_layers: raw.num_hidden_layers,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_heads,
            num_kv_heads: raw.num_key_value_heads.unwrap_or(num_heads),
            head_dim: raw.head_dim.unwrap_or(raw.hidden_size / num_heads.max(1)),
            vocab_size: raw.vocab_size,
            context_length: raw.max_position_embeddings,
            rms_norm_eps: raw.rms_norm_eps,
            rope_theta: raw.rope_theta.unwrap_or(10_000.0),
            rope_layout: RopeLayout::Halves,
            rope_scaling,
            qkv_bias: architecture == Architecture::Qwen2 || raw.attention_bias.unwrap_or(false),
            qk_norm: architecture.has_qk_norm(),
            tied_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            moe,
        };
        config.validate()?;
        Ok(config)
    }

    /// Rejects shapes that would make the block arithmetic fail later, with a message
    /// that names the offending field instead of a tensor shape error.
    fn validate(&self) -> Result<()> {
        let positive = [
            ("layers", self.num_layers),
            ("hidden size", self.hidden_size),
            ("intermediate size", self.intermediate_size),
            ("heads", self.num_heads),
            ("kv heads", self.num_kv_heads),
            ("head dim", self.head_dim),
            ("vocabulary", self.vocab_size),
            ("context length", self.context_length),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(invalid(format!("{name} is 0")));
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(invalid(format!(
                "{} heads cannot share {} kv heads evenly",
                self.num_heads, self.num_kv_heads
            )));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(invalid(format!("head dim {} is odd; RoPE needs pairs", self.head_dim)));
        }
        if let Some(moe) = &self.moe {
            if moe.experts_used == 0 || moe.experts_used > moe.experts || moe.expert_ffn == 0 {
                return Err(invalid(format!(
                    "{} experts used of {}, {} wide: a mixture of experts needs 1 to {} of them, each wider than 0",
                    moe.experts_used, moe.experts, moe.expert_ffn, moe.experts
                )));
            }
        }
        Ok(())
    }

    /// Bytes of K and V cache one token takes in one layer, at `dtype_bytes` per element.
    pub fn kv_bytes_per_token_per_layer(&self, dtype_bytes: usize) -> u64 {
        (2 * self.num_kv_heads * self.head_dim * dtype_bytes) as u64
    }
}

#[derive(Deserialize)]
struct HfConfig {
    model_type: String,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    max_position_embeddings: usize,
    rms_norm_eps: f64,
    rope_theta: Option<f32>,
    rope_scaling: Option<HfRopeScaling>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    /// Mixtral's expert count; Qwen3-MoE's is `num_experts`.
    num_local_experts: Option<usize>,
    num_experts: Option<usize>,
    num_experts_per_tok: Option<usize>,
    moe_intermediate_size: Option<usize>,
    norm_topk_prob: Option<bool>,
    decoder_sparse_step: Option<usize>,
    mlp_only_layers: Option<Vec<usize>>,
}

#[derive(Deserialize)]
struct HfRopeScaling {
    rope_type: Option<String>,
    #[serde(rename = "type")]
    legacy_type: Option<String>,
    factor: Option<f32>,
    low_freq_factor: Option<f32>,
    high_freq_factor: Option<f32>,
    original_max_position_embeddings: Option<usize>,
}

impl HfRopeScaling {
    fn kind(&self) -> Option<String> {
        self.rope_type.clone().or_else(|| self.legacy_type.clone())
    }
}

fn invalid(message: String) -> Error {
    Error::InvalidModel(message)
}

fn gguf_value<'a>(metadata: &'a HashMap<String, Value>, key: &str) -> Result<&'a Value> {
    metadata.get(key).ok_or_else(|| invalid(format!("GGUF metadata lacks `{key}`")))
}

fn gguf_string<'a>(metadata: &'a HashMap<String, Value>, key: &str) -> Result<&'a str> {
    match gguf_value(metadata, key)? {
        Value::String(s) => Ok(s),
        other => Err(invalid(format!("`{key}` should be a string, found {:?}", other.value_type()))),
    }
}

fn gguf_usize(metadata: &HashMap<String, Value>, key: &str) -> Result<usize> {
    value_usize(gguf_value(metadata, key)?, key)
}

fn value_usize(value: &Value, key: &str) -> Result<usize> {
    let n = match value {
        Value::U8(v) => *v as u64,
        Value::U16(v) => *v as u64,
        Value::U32(v) => *v as u64,
        Value::U64(v) => *v,
        Value::I8(v) => u64::try_from(*v).map_err(|_| invalid(format!("`{key}` is negative")))?,
        Value::I16(v) => u64::try_from(*v).map_err(|_| invalid(format!("`{key}` is negative")))?,
        Value::I32(v) => u64::try_from(*v).map_err(|_| invalid(format!("`{key}` is negative")))?,
        Value::I64(v) => u64::try_from(*v).map_err(|_| invalid(format!("`{key}` is negative")))?,
        other => {
            return Err(invalid(format!("`{key}` should be an integer, found {:?}", other.value_type())))
        }
    };
    usize::try_from(n).map_err(|_| invalid(format!("`{key}` = {n} is too large")))
}

fn gguf_f32(metadata: &HashMap<String, Value>, key: &str) -> Result<f32> {
    gguf_value(metadata, key)?.to_f32().map_err(|e| invalid(format!("`{key}`: {e}")))
}

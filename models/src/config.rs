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
    /// GGUF's `deepseek2`: DeepSeek-V2, V3, V3.1, R1 and Kimi K2. Multi-head latent
    /// attention (`crate::latent_attention`), dense leading layers, then experts with
    /// shared experts beside them.
    #[serde(rename = "deepseek2")]
    DeepSeek2,
    /// Gemma 3 (270M to 27B, text): sliding-window attention on five layers of six, q/k
    /// norms, norms after attention and after the feed-forward too, GeGLU, a scaled
    /// embedding (see [`ModelConfig`]'s `sliding_window`, `post_norms`, `activation`...).
    Gemma3,
    /// OpenAI's gpt-oss (20B, 120B): every layer a mixture of experts (MXFP4 in its
    /// files), biases on every attention projection and the router, a learned attention
    /// sink per head, sliding-window attention on every other layer, YaRN, and a clamped
    /// SwiGLU.
    #[serde(rename = "gpt-oss")]
    GptOss,
}

impl Architecture {
    fn from_name(name: &str) -> Result<Self> {
        match name {
            "llama" => Ok(Self::Llama),
            "mistral" => Ok(Self::Mistral),
            "qwen2" => Ok(Self::Qwen2),
            "qwen3" => Ok(Self::Qwen3),
            "qwen3moe" | "qwen3_moe" => Ok(Self::Qwen3Moe),
            "deepseek2" => Ok(Self::DeepSeek2),
            "gemma3" | "gemma3_text" => Ok(Self::Gemma3),
            "gpt-oss" | "gpt_oss" => Ok(Self::GptOss),
            other => Err(Error::Unsupported(format!(
                "architecture `{other}` (supported: {SUPPORTED_ARCHITECTURES})"
            ))),
        }
    }

    /// RMS norms on queries and keys, per head.
    fn has_qk_norm(self) -> bool {
        matches!(self, Self::Qwen3 | Self::Qwen3Moe | Self::Gemma3)
    }
}

/// What an unsupported file is told Hearth runs instead.
pub(crate) const SUPPORTED_ARCHITECTURES: &str =
    "llama (with Mixtral's experts), mistral, qwen2, qwen3, qwen3moe, gemma3 (text), deepseek2, gpt-oss";

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
    /// How router logits become weights.
    #[serde(default)]
    pub gating: Gating,
    /// Experts come in groups, and each token picks among the best groups' experts only
    /// (DeepSeek-V3's group-limited routing).
    #[serde(default)]
    pub groups: Option<ExpertGroups>,
    /// Experts every token goes through besides the routed ones (DeepSeek), as one
    /// feed-forward `shared_experts * expert_ffn` wide; 0 for none.
    #[serde(default)]
    pub shared_experts: usize,
    /// The first layers are dense (DeepSeek's `leading_dense_block_count`).
    #[serde(default)]
    pub dense_layers: usize,
}

impl MoeConfig {
    /// Whether layer `layer` holds experts (the leading dense layers do not).
    pub fn has_experts(&self, layer: usize) -> bool {
        layer >= self.dense_layers
    }
}

/// How a router's logits become the experts' weights.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Gating {
    /// A softmax over all experts (Mixtral, Qwen3-MoE, DeepSeek-V2).
    #[default]
    Softmax,
    /// Each logit's sigmoid (DeepSeek-V3); experts are chosen by that plus a learned
    /// per-expert bias, when the layer has one, and weighted without it.
    Sigmoid,
    /// Experts chosen by their logits, weighted by a softmax over the chosen ones alone
    /// (gpt-oss).
    SoftmaxOfChosen,
}

/// Group-limited routing: `count` equal groups of experts, of which each token uses `used`
/// (ranked by the sum of each group's two best scores).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExpertGroups {
    pub count: usize,
    pub used: usize,
}

/// DeepSeek's multi-head latent attention: keys and values of every head come from one
/// compressed latent per token plus one shared rotary key, and the cache holds just
/// those (`latent_rank + rope_dim` values per token and layer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatentAttentionConfig {
    /// Width of the queries' low-rank bottleneck; `None` projects queries directly.
    pub query_rank: Option<usize>,
    /// Width of the compressed latent (`kv_lora_rank`).
    pub latent_rank: usize,
    /// The rotated part of each head's query and key.
    pub rope_dim: usize,
    /// The unrotated part of each head's query and key.
    pub nope_dim: usize,
    /// Each head's value width.
    pub value_dim: usize,
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
    /// YaRN (DeepSeek-V2/V3): frequencies between two correction dimensions blend
    /// interpolation and extrapolation; attention scores are scaled to make up for it.
    Yarn {
        factor: f32,
        original_context: usize,
        /// DeepSeek's `mscale_all_dim` (GGUF stores a tenth of it), 0 when absent.
        log_multiplier: f32,
        beta_fast: f32,
        beta_slow: f32,
        /// The correction range is used as computed, not widened to whole dimensions
        /// (Hugging Face's `truncate: false`, gpt-oss's; llama.cpp always widens it).
        #[serde(default)]
        exact_range: bool,
    },
}

/// Sliding-window attention on some layers (Gemma 3; gpt-oss alternates the same way):
/// there a query at position `p` sees the `window` positions `p - window + 1 ..= p` alone,
/// and RoPE has a base of its own, without the scaling of the full layers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlidingWindow {
    pub window: usize,
    /// Which layers slide, by index; the others attend to the whole context.
    pub layers: Vec<bool>,
    /// RoPE's own base on the sliding layers, unscaled (Gemma 3's `rope_local_base_freq`);
    /// `None`: the full layers' RoPE (gpt-oss).
    pub rope_theta: Option<f32>,
}

/// The gated activation of the feed-forward: `down(act(gate(x)) * up(x))`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Activation {
    /// SwiGLU (Llama, Qwen, Mistral, DeepSeek).
    #[default]
    Silu,
    /// GeGLU with GELU's tanh approximation (Gemma's `gelu_pytorch_tanh`).
    GeluTanh,
    /// gpt-oss's SwiGLU: `g * sigmoid(1.702 g) * (u + 1)`, with the gate `g` clamped to at
    /// most 7 and the up projection `u` to ±7 (llama.cpp's `swiglu_oai`).
    ClampedSwiglu,
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
    /// Biases on the q, k and v projections (Qwen2, gpt-oss).
    pub qkv_bias: bool,
    /// A bias on attention's output projection (gpt-oss).
    #[serde(default)]
    pub output_bias: bool,
    /// A learned logit per head that joins every softmax of attention and takes its share
    /// of the weight, but has no value (gpt-oss's sinks).
    #[serde(default)]
    pub attention_sinks: bool,
    /// RMS norms on queries and keys (Qwen3).
    pub qk_norm: bool,
    /// The LM head reuses the token embedding.
    pub tied_embeddings: bool,
    /// Experts in place of the dense feed-forward (Mixtral, Qwen3-MoE, DeepSeek).
    pub moe: Option<MoeConfig>,
    /// Latent attention in place of grouped-query attention (DeepSeek). Then `head_dim`
    /// is the width of the cached latent plus rotary key, and `num_kv_heads` is 1.
    #[serde(default)]
    pub latent_attention: Option<LatentAttentionConfig>,
    /// Sliding-window attention on some layers (Gemma 3); `None`: every layer sees it all.
    #[serde(default)]
    pub sliding_window: Option<SlidingWindow>,
    /// What queries are multiplied by before attention (Gemma's `query_pre_attn_scalar^-1/2`,
    /// as llama.cpp applies it, to the queries); `None`: scores are scaled by
    /// `1/sqrt(head_dim)` in the softmax.
    #[serde(default)]
    pub query_scale: Option<f32>,
    /// RMS norms on the outputs of attention and of the feed-forward, before the residual
    /// adds (Gemma 2/3).
    #[serde(default)]
    pub post_norms: bool,
    #[serde(default)]
    pub activation: Activation,
    /// What token embeddings are multiplied by (Gemma: `sqrt(hidden_size)`, in f32 as
    /// llama.cpp computes it).
    #[serde(default)]
    pub embedding_scale: Option<f32>,
    /// Logits become `cap * tanh(logits / cap)` (Gemma 2; Gemma 3 files may name one).
    #[serde(default)]
    pub final_logit_softcap: Option<f32>,
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
            Some(Value::String(kind)) if kind == "yarn" => RopeScaling::Yarn {
                factor: gguf_f32(metadata, &key("rope.scaling.factor"))?,
                original_context: gguf_usize(metadata, &key("rope.scaling.original_context_length"))?,
                // llama.cpp's converter writes 0.1 * mscale_all_dim, and its loader divides back.
                log_multiplier: match metadata.get(&key("rope.scaling.yarn_log_multiplier")) {
                    Some(v) => v.to_f32().map_err(|e| invalid(format!("yarn_log_multiplier: {e}")))? / 0.1,
                    None => 0.0,
                },
                // llama.cpp's defaults; it reads no other values from the file.
                beta_fast: 32.0,
                beta_slow: 1.0,
                exact_range: false,
            },
            Some(Value::String(kind)) if kind != "none" => {
                return Err(Error::Unsupported(format!("RoPE scaling `{kind}`")))
            }
            _ => RopeScaling::None,
        };
        // llama.cpp labels Qwen rotary embeddings "neox" and leaves their weights unpermuted.
        let rope_layout = match architecture {
            Architecture::Llama | Architecture::Mistral | Architecture::DeepSeek2 => RopeLayout::Interleaved,
            Architecture::Qwen2
            | Architecture::Qwen3
            | Architecture::Qwen3Moe
            | Architecture::Gemma3
            | Architecture::GptOss => RopeLayout::Halves,
        };
        let intermediate_size = gguf_usize(metadata, &key("feed_forward_length"))?;
        let optional_usize = |suffix: &str| -> Result<Option<usize>> {
            metadata.get(&key(suffix)).map(|v| value_usize(v, suffix)).transpose()
        };
        let optional_f32 = |suffix: &str| -> Result<Option<f32>> {
            metadata.get(&key(suffix)).map(|v| v.to_f32().map_err(|e| invalid(format!("{suffix}: {e}")))).transpose()
        };
        let deepseek = architecture == Architecture::DeepSeek2;
        let gpt_oss = architecture == Architecture::GptOss;
        let moe = match optional_usize("expert_count")?.filter(|&n| n > 0) {
            None if matches!(architecture, Architecture::Qwen3Moe | Architecture::DeepSeek2 | Architecture::GptOss) => {
                return Err(invalid(format!("`{arch_name}.expert_count` is missing: a {arch_name} file needs experts")))
            }
            None => None,
            Some(experts) => Some(MoeConfig {
                experts,
                experts_used: optional_usize("expert_used_count")?
                    .ok_or_else(|| invalid(format!("GGUF metadata lacks `{arch_name}.expert_used_count`")))?,
                // Mixtral's experts are `feed_forward_length` wide; the others name their width.
                expert_ffn: optional_usize("expert_feed_forward_length")?.unwrap_or(intermediate_size),
                // llama.cpp always normalizes Mixtral's and Qwen3-MoE's chosen weights, and
                // DeepSeek's when the file says so.
                normalize_weights: match metadata.get(&key("expert_weights_norm")) {
                    Some(Value::Bool(normalize)) => *normalize,
                    Some(other) => {
                        return Err(invalid(format!("expert_weights_norm should be a bool, found {:?}", other.value_type())))
                    }
                    None => !deepseek && !gpt_oss,
                },
                weights_scale: optional_f32("expert_weights_scale")?.unwrap_or(1.0),
                gating: match optional_usize("expert_gating_func")? {
                    _ if gpt_oss => Gating::SoftmaxOfChosen,
                    // 0 is "unset": DeepSeek-V2's files predate the key and use a softmax.
                    None | Some(0) | Some(1) => Gating::Softmax,
                    Some(2) => Gating::Sigmoid,
                    Some(other) => return Err(Error::Unsupported(format!("expert gating function {other}"))),
                },
                groups: match (optional_usize("expert_group_count")?, optional_usize("expert_group_used_count")?) {
                    (Some(count), Some(used)) if count > 1 => Some(ExpertGroups { count, used }),
                    _ => None,
                },
                shared_experts: optional_usize("expert_shared_count")?.unwrap_or(0),
                dense_layers: optional_usize("leading_dense_block_count")?.unwrap_or(0),
            }),
        };
        // Current files (llama.cpp's MLA layout, `attn_k_b` and `attn_v_b`) describe the
        // cache's one row as the one KV head and name the heads' sizes `*_mla`; older ones
        // (`attn_kv_b`) describe the heads as multi-head attention, and are run the same way.
        let legacy_layout = deepseek && optional_usize("attention.key_length_mla")?.is_none();
        let latent_attention = if deepseek {
            let rope_dim = gguf_usize(metadata, &key("rope.dimension_count"))?;
            let (key_length, value_dim) = if legacy_layout {
                (head_dim, gguf_usize(metadata, &key("attention.value_length"))?)
            } else {
                (gguf_usize(metadata, &key("attention.key_length_mla"))?, gguf_usize(metadata, &key("attention.value_length_mla"))?)
            };
            if key_length <= rope_dim {
                return Err(invalid(format!("a key length of {key_length} leaves nothing beside {rope_dim} rotary dims")));
            }
            Some(LatentAttentionConfig {
                query_rank: optional_usize("attention.q_lora_rank")?.filter(|&r| r > 0),
                latent_rank: gguf_usize(metadata, &key("attention.kv_lora_rank"))?,
                rope_dim,
                nope_dim: key_length - rope_dim,
                value_dim,
            })
        } else {
            None
        };
        let num_layers = gguf_usize(metadata, &key("block_count"))?;
        let gemma = architecture == Architecture::Gemma3;
        let sliding_window = match optional_usize("attention.sliding_window")?.filter(|&w| w > 0 && (gemma || gpt_oss)) {
            None => None,
            Some(window) => Some(SlidingWindow {
                window,
                layers: match metadata.get(&key("attention.sliding_window_pattern")) {
                    // One flag per layer, or every `n`th layer full; llama.cpp's default is 6.
                    Some(Value::Array(flags)) => {
                        let flags = flags
                            .iter()
                            .map(|flag| match flag {
                                Value::Bool(sliding) => Ok(*sliding),
                                other => Err(invalid(format!(
                                    "attention.sliding_window_pattern holds {:?}, not bools",
                                    other.value_type()
                                ))),
                            })
                            .collect::<Result<Vec<_>>>()?;
                        if flags.len() != num_layers {
                            return Err(invalid(format!(
                                "attention.sliding_window_pattern has {} flags for {num_layers} layers",
                                flags.len()
                            )));
                        }
                        flags
                    }
                    Some(v) => sliding_pattern(num_layers, value_usize(v, "attention.sliding_window_pattern")?),
                    // gpt-oss alternates, sliding first.
                    None => sliding_pattern(num_layers, if gpt_oss { 2 } else { 6 }),
                },
                // Gemma's sliding layers have a base of their own; gpt-oss's share the
                // full layers' RoPE unless the file says otherwise.
                rope_theta: match optional_f32("rope.freq_base_swa")? {
                    Some(theta) => Some(theta),
                    None if gemma => Some(10_000.0),
                    None => None,
                },
            }),
        };
        // GGUF carries no `query_pre_attn_scalar`: llama.cpp takes it to be the head size
        // but in the 27B model (62 layers), whose is hidden / heads, as Gemma's code says.
        let query_scale = gemma.then(|| {
            let scalar = if num_layers == 62 { hidden_size / num_heads.max(1) } else { head_dim };
            1.0 / (scalar as f32).sqrt()
        });
        let config = Self {
            architecture,
            num_layers,
            hidden_size,
            intermediate_size,
            num_heads,
            num_kv_heads: match metadata.get(&key("attention.head_count_kv")) {
                _ if legacy_layout => 1,
                Some(v) => value_usize(v, "attention.head_count_kv")?,
                None => num_heads,
            },
            // Latent attention's cache row: the latent and the rotary key.
            head_dim: match &latent_attention {
                Some(latent) if legacy_layout => latent.latent_rank + latent.rope_dim,
                _ => head_dim,
            },
            vocab_size: embedding_rows,
            context_length: gguf_usize(metadata, &key("context_length"))?,
            rms_norm_eps: gguf_f32(metadata, &key("attention.layer_norm_rms_epsilon"))? as f64,
            rope_theta: match metadata.get(&key("rope.freq_base")) {
                Some(v) => v.to_f32().map_err(|e| invalid(format!("rope.freq_base: {e}")))?,
                None => 10_000.0,
            },
            rope_layout,
            rope_scaling,
            qkv_bias: matches!(architecture, Architecture::Qwen2 | Architecture::GptOss),
            output_bias: gpt_oss,
            attention_sinks: gpt_oss,
            qk_norm: architecture.has_qk_norm(),
            tied_embeddings: !has_output_tensor,
            moe,
            latent_attention,
            sliding_window,
            query_scale,
            post_norms: gemma,
            activation: match architecture {
                Architecture::Gemma3 => Activation::GeluTanh,
                Architecture::GptOss => Activation::ClampedSwiglu,
                _ => Activation::Silu,
            },
            embedding_scale: gemma.then(|| (hidden_size as f32).sqrt()),
            final_logit_softcap: optional_f32("final_logit_softcapping")?.filter(|&cap| cap > 0.0),
        };
        config.validate()?;
        Ok(config)
    }

    /// Reads a Hugging Face `config.json`.
    pub fn from_hf_json(json: &str) -> Result<Self> {
        let mut value: serde_json::Value =
            serde_json::from_str(json).map_err(|e| invalid(format!("config.json: {e}")))?;
        // Gemma 3's multimodal checkpoints keep the decoder's keys in `text_config`.
        if value["model_type"] == "gemma3" {
            value = value
                .get("text_config")
                .cloned()
                .ok_or_else(|| invalid("config.json of a gemma3 model lacks its text_config".into()))?;
            value["model_type"] = "gemma3_text".into();
        }
        if value["model_type"] == "gemma3_text" {
            fill_gemma3_defaults(&mut value)?;
        }
        let raw: HfConfig = serde_json::from_value(value).map_err(|e| invalid(format!("config.json: {e}")))?;
        // Mixtral is Mistral's block with experts: one architecture here, as in GGUF.
        let architecture = match raw.model_type.as_str() {
            "mixtral" => Architecture::Mistral,
            "deepseek_v2" | "deepseek_v3" | "kimi_k2" => Architecture::DeepSeek2,
            name => Architecture::from_name(name)?,
        };
        let method = raw.quantization_config.as_ref().map(|q| q["quant_method"].as_str().unwrap_or("unknown"));
        // gpt-oss ships its experts in MXFP4, which Hearth reads as they are.
        if let Some(method) = method.filter(|&m| !(m == "mxfp4" && architecture == Architecture::GptOss)) {
            return Err(Error::Unsupported(format!(
                "a checkpoint stored quantized ({method}): Hearth reads safetensors in f32, f16 or bf16; \
                 use a GGUF of the model (e.g. Q4_K_M) or a bf16 copy"
            )));
        }
        let num_heads = raw.num_attention_heads;
        if architecture == Architecture::DeepSeek2 {
            return Self::from_hf_deepseek(&raw);
        }
        let gpt_oss = architecture == Architecture::GptOss;
        if gpt_oss && raw.swiglu_limit.is_some_and(|limit| limit != crate::kernels::ops::SWIGLU_LIMIT) {
            return Err(Error::Unsupported(format!("a SwiGLU limit of {:?} (gpt-oss's is 7)", raw.swiglu_limit)));
        }
        let moe = match (raw.num_local_experts.or(raw.num_experts), raw.num_experts_per_tok.or(raw.experts_per_token)) {
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
                    gating: if gpt_oss { Gating::SoftmaxOfChosen } else { Gating::Softmax },
                    groups: None,
                    shared_experts: 0,
                    dense_layers: 0,
                })
            }
            _ if matches!(architecture, Architecture::Qwen3Moe | Architecture::GptOss) => {
                return Err(invalid(format!("config.json of a {} model lacks its experts' count", raw.model_type)))
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
                Some("yarn") => scaling.yarn()?,
                Some(other) => return Err(Error::Unsupported(format!("RoPE scaling `{other}`"))),
            },
        };
        let gemma = architecture == Architecture::Gemma3;
        if gemma && raw.attn_logit_softcapping.is_some() {
            return Err(Error::Unsupported("attention logit softcapping (Gemma 2's)".into()));
        }
        let num_layers = raw.num_hidden_layers;
        let sliding_window = match raw.sliding_window.filter(|&w| w > 0 && (gemma || gpt_oss)) {
            None => None,
            Some(window) => Some(SlidingWindow {
                window,
                layers: match (&raw.layer_types, raw.sliding_window_pattern) {
                    (Some(types), _) => {
                        if types.len() != num_layers {
                            return Err(invalid(format!("{} layer_types for {num_layers} layers", types.len())));
                        }
                        types
                            .iter()
                            .map(|kind| match kind.as_str() {
                                "sliding_attention" => Ok(true),
                                "full_attention" => Ok(false),
                                other => Err(Error::Unsupported(format!("layer type `{other}`"))),
                            })
                            .collect::<Result<Vec<_>>>()?
                    }
                    // Hugging Face's `(i + 1) % pattern != 0`, which is llama.cpp's rule.
                    (None, pattern) => sliding_pattern(num_layers, pattern.unwrap_or(if gpt_oss { 2 } else { 6 })),
                },
                rope_theta: if gemma { Some(raw.rope_local_base_freq.unwrap_or(10_000.0)) } else { None },
            }),
        };
        let head_dim = raw.head_dim.unwrap_or(raw.hidden_size / num_heads.max(1));
        let activation = match raw.hidden_activation.as_deref().or(raw.hidden_act.as_deref()) {
            _ if gpt_oss => Activation::ClampedSwiglu,
            None | Some("silu") | Some("swish") => Activation::Silu,
            Some("gelu_pytorch_tanh") | Some("gelu_new") | Some("gelu_tanh") => Activation::GeluTanh,
            Some(other) => return Err(Error::Unsupported(format!("activation `{other}`"))),
        };
        let config = Self {
            architecture,
            num_layers,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_heads,
            num_kv_heads: raw.num_key_value_heads.unwrap_or(num_heads),
            head_dim,
            vocab_size: raw.vocab_size,
            context_length: raw.max_position_embeddings,
            rms_norm_eps: raw.rms_norm_eps,
            rope_theta: raw.rope_theta.unwrap_or(10_000.0),
            rope_layout: RopeLayout::Halves,
            rope_scaling,
            qkv_bias: architecture == Architecture::Qwen2 || raw.attention_bias.unwrap_or(false),
            output_bias: gpt_oss && raw.attention_bias.unwrap_or(true),
            attention_sinks: gpt_oss,
            qk_norm: architecture.has_qk_norm(),
            tied_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            moe,
            latent_attention: None,
            sliding_window,
            query_scale: gemma.then(|| 1.0 / raw.query_pre_attn_scalar.unwrap_or(head_dim as f32).sqrt()),
            post_norms: gemma,
            activation,
            embedding_scale: gemma.then(|| (raw.hidden_size as f32).sqrt()),
            final_logit_softcap: raw.final_logit_softcapping.filter(|&cap| cap > 0.0),
        };
        config.validate()?;
        Ok(config)
    }

    /// DeepSeek's `config.json`, read into what its GGUF conversion says: latent attention
    /// as one KV head of the latent plus rotary key (so `head_dim` and the cache are as
    /// for GGUF), and group-limited routing as llama.cpp runs it (groups ranked by their
    /// two best scores, for V2's `group_limited_greedy` too).
    fn from_hf_deepseek(raw: &HfConfig) -> Result<Self> {
        let need = |value: Option<usize>, key: &str| {
            value.ok_or_else(|| invalid(format!("config.json of a {} model lacks {key}", raw.model_type)))
        };
        let latent = LatentAttentionConfig {
            query_rank: raw.q_lora_rank.filter(|&r| r > 0),
            latent_rank: need(raw.kv_lora_rank, "kv_lora_rank")?,
            rope_dim: need(raw.qk_rope_head_dim, "qk_rope_head_dim")?,
            nope_dim: need(raw.qk_nope_head_dim, "qk_nope_head_dim")?,
            value_dim: need(raw.v_head_dim, "v_head_dim")?,
        };
        let experts = need(raw.n_routed_experts, "n_routed_experts")?;
        let moe = MoeConfig {
            experts,
            experts_used: need(raw.num_experts_per_tok, "num_experts_per_tok")?,
            expert_ffn: need(raw.moe_intermediate_size, "moe_intermediate_size")?,
            normalize_weights: raw.norm_topk_prob.unwrap_or(false),
            weights_scale: raw.routed_scaling_factor.unwrap_or(1.0),
            gating: match raw.scoring_func.as_deref() {
                None | Some("softmax") => Gating::Softmax,
                Some("sigmoid") => Gating::Sigmoid,
                Some(other) => return Err(Error::Unsupported(format!("expert scoring function `{other}`"))),
            },
            groups: match (raw.n_group, raw.topk_group) {
                (Some(count), Some(used)) if count > 1 => Some(ExpertGroups { count, used }),
                _ => None,
            },
            shared_experts: raw.n_shared_experts.unwrap_or(0),
            dense_layers: raw.first_k_dense_replace.unwrap_or(0),
        };
        let rope_scaling = match &raw.rope_scaling {
            None => RopeScaling::None,
            Some(scaling) => match scaling.kind().as_deref() {
                None | Some("default") => RopeScaling::None,
                Some("yarn") => scaling.yarn()?,
                Some(other) => return Err(Error::Unsupported(format!("RoPE scaling `{other}` for deepseek2"))),
            },
        };
        let config = Self {
            architecture: Architecture::DeepSeek2,
            num_layers: raw.num_hidden_layers,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_heads: raw.num_attention_heads,
            num_kv_heads: 1,
            head_dim: latent.latent_rank + latent.rope_dim,
            vocab_size: raw.vocab_size,
            context_length: raw.max_position_embeddings,
            rms_norm_eps: raw.rms_norm_eps,
            rope_theta: raw.rope_theta.unwrap_or(10_000.0),
            // DeepSeek's modeling code de-interleaves before rotating halves: pairs (2i, 2i+1).
            rope_layout: RopeLayout::Interleaved,
            rope_scaling,
            qkv_bias: false,
            output_bias: false,
            attention_sinks: false,
            qk_norm: false,
            tied_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            moe: Some(moe),
            latent_attention: Some(latent),
            sliding_window: None,
            query_scale: None,
            post_norms: false,
            activation: Activation::Silu,
            embedding_scale: None,
            final_logit_softcap: None,
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
            if let Some(groups) = moe.groups {
                // Routing ranks the groups in a 64-bit mask (DeepSeek-V3 has 8).
                if groups.count > 64 {
                    return Err(Error::Unsupported(format!("{} expert groups (at most 64)", groups.count)));
                }
                if groups.used == 0 || groups.used > groups.count || !moe.experts.is_multiple_of(groups.count) {
                    return Err(invalid(format!(
                        "{} expert groups used of {} over {} experts: groups must divide the experts, and 1 to {} be used",
                        groups.used, groups.count, moe.experts, groups.count
                    )));
                }
                if moe.experts_used > groups.used * (moe.experts / groups.count) {
                    return Err(invalid(format!(
                        "{} experts used, more than the {} groups used hold",
                        moe.experts_used, groups.used
                    )));
                }
            }
        }
        if let Some(sliding) = &self.sliding_window {
            if sliding.window == 0 || sliding.layers.len() != self.num_layers {
                return Err(invalid(format!(
                    "a sliding window of {} positions over {} layer flags for {} layers",
                    sliding.window,
                    sliding.layers.len(),
                    self.num_layers
                )));
            }
        }
        if let Some(mla) = &self.latent_attention {
            if self.num_kv_heads != 1 || self.head_dim != mla.latent_rank + mla.rope_dim {
                return Err(invalid(format!(
                    "latent attention caches one row of {} latent and {} rotary values, but the file says \
                     {} kv heads of {}",
                    mla.latent_rank, mla.rope_dim, self.num_kv_heads, self.head_dim
                )));
            }
            if mla.latent_rank == 0 || mla.value_dim == 0 || !mla.rope_dim.is_multiple_of(2) {
                return Err(invalid(format!(
                    "latent attention of rank {}, values {} wide and {} rotary dims",
                    mla.latent_rank, mla.value_dim, mla.rope_dim
                )));
            }
        }
        Ok(())
    }

    /// The positions layer `layer` attends to before each query's own (inclusive of it):
    /// its window if it slides, else `None`, everything.
    pub fn attention_window(&self, layer: usize) -> Option<usize> {
        let sliding = self.sliding_window.as_ref()?;
        sliding.layers.get(layer).copied().unwrap_or(false).then_some(sliding.window)
    }

    /// Bytes of K and V cache one token takes in one layer, at `dtype_bytes` per element.
    /// Latent attention caches one row that serves as keys and (its first part) values.
    pub fn kv_bytes_per_token_per_layer(&self, dtype_bytes: usize) -> u64 {
        let rows = if self.latent_attention.is_some() { 1 } else { 2 };
        (rows * self.num_kv_heads * self.head_dim * dtype_bytes) as u64
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
    /// gpt-oss's other name for `num_experts_per_tok`.
    experts_per_token: Option<usize>,
    /// gpt-oss's clamp on its SwiGLU.
    swiglu_limit: Option<f32>,
    moe_intermediate_size: Option<usize>,
    norm_topk_prob: Option<bool>,
    decoder_sparse_step: Option<usize>,
    mlp_only_layers: Option<Vec<usize>>,
    // DeepSeek-V2/V3 and Kimi K2 (`deepseek_v2`, `deepseek_v3`, `kimi_k2`).
    q_lora_rank: Option<usize>,
    kv_lora_rank: Option<usize>,
    qk_rope_head_dim: Option<usize>,
    qk_nope_head_dim: Option<usize>,
    v_head_dim: Option<usize>,
    n_routed_experts: Option<usize>,
    n_shared_experts: Option<usize>,
    first_k_dense_replace: Option<usize>,
    routed_scaling_factor: Option<f32>,
    scoring_func: Option<String>,
    n_group: Option<usize>,
    topk_group: Option<usize>,
    /// Set by checkpoints stored in a quantized format (DeepSeek's own FP8 blocks).
    quantization_config: Option<serde_json::Value>,
    hidden_act: Option<String>,
    /// Gemma's name for the activation.
    hidden_activation: Option<String>,
    /// Gemma 3: attention scores are scaled by this to the -1/2, not by the head size.
    query_pre_attn_scalar: Option<f32>,
    sliding_window: Option<usize>,
    sliding_window_pattern: Option<usize>,
    /// `sliding_attention` or `full_attention` for each layer (newer configs).
    layer_types: Option<Vec<String>>,
    rope_local_base_freq: Option<f32>,
    final_logit_softcapping: Option<f32>,
    attn_logit_softcapping: Option<f32>,
}

/// Which of `layers` slide when every `pattern`th is full (0: all slide), as llama.cpp's
/// `set_swa_pattern` and Hugging Face's `(i + 1) % pattern` say.
fn sliding_pattern(layers: usize, pattern: usize) -> Vec<bool> {
    (0..layers).map(|i| pattern == 0 || i % pattern < pattern - 1).collect()
}

/// Fills what a Gemma 3 config.json may leave out with `Gemma3TextConfig`'s defaults
/// (multimodal checkpoints' `text_config` name only what differs from them).
fn fill_gemma3_defaults(value: &mut serde_json::Value) -> Result<()> {
    let defaults = serde_json::json!({
        "vocab_size": 262_208,
        "hidden_size": 2304,
        "intermediate_size": 9216,
        "num_hidden_layers": 26,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "max_position_embeddings": 131_072,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1_000_000.0,
        "rope_local_base_freq": 10_000.0,
        "query_pre_attn_scalar": 256,
        "sliding_window": 4096,
        "hidden_activation": "gelu_pytorch_tanh",
        "tie_word_embeddings": true,
    });
    let (Some(config), Some(defaults)) = (value.as_object_mut(), defaults.as_object()) else {
        return Err(invalid("config.json of a gemma3 model is not an object".into()));
    };
    for (key, default) in defaults {
        if config.get(key).is_none_or(|v| v.is_null() && key != "sliding_window") {
            config.insert(key.clone(), default.clone());
        }
    }
    Ok(())
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
    // YaRN's.
    beta_fast: Option<f32>,
    beta_slow: Option<f32>,
    mscale_all_dim: Option<f32>,
    truncate: Option<bool>,
}

impl HfRopeScaling {
    fn kind(&self) -> Option<String> {
        self.rope_type.clone().or_else(|| self.legacy_type.clone())
    }

    fn yarn(&self) -> Result<RopeScaling> {
        Ok(RopeScaling::Yarn {
            factor: self.factor.unwrap_or(1.0),
            original_context: self
                .original_max_position_embeddings
                .ok_or_else(|| invalid("YaRN scaling without original_max_position_embeddings".into()))?,
            // llama.cpp reads `mscale_all_dim` alone (DeepSeek's `mscale` equals it).
            log_multiplier: self.mscale_all_dim.unwrap_or(0.0),
            beta_fast: self.beta_fast.unwrap_or(32.0),
            beta_slow: self.beta_slow.unwrap_or(1.0),
            exact_range: self.truncate == Some(false),
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A family Hearth lacks is one clear line naming it and what is supported.
    #[test]
    fn an_unsupported_architecture_is_named_with_what_is_supported() {
        let metadata = HashMap::from([("general.architecture".to_owned(), Value::String("phi3".into()))]);
        let error = ModelConfig::from_gguf(&metadata, true, 1024).expect_err("phi3 is not supported");
        let message = error.to_string();
        assert!(message.contains("`phi3`") && message.contains("deepseek2") && message.contains("gemma3"), "{message}");
        assert!(!message.contains('\n'), "one line: {message}");
    }

    /// A multimodal Gemma 3 config.json names only what differs from `Gemma3TextConfig`'s
    /// defaults in its `text_config`; the sliding layers follow `sliding_window_pattern`.
    #[test]
    fn a_gemma3_text_config_is_read_with_its_defaults() {
        let json = r#"{"model_type": "gemma3", "text_config": {"hidden_size": 2560, "num_hidden_layers": 12,
            "intermediate_size": 10240, "sliding_window": 1024, "sliding_window_pattern": 6,
            "rope_scaling": {"rope_type": "linear", "factor": 8.0}}, "vision_config": {}}"#;
        let config = ModelConfig::from_hf_json(json).expect("reads");
        assert_eq!(config.architecture, Architecture::Gemma3);
        assert_eq!((config.num_heads, config.num_kv_heads, config.head_dim), (8, 4, 256));
        let windows: Vec<Option<usize>> = (0..12).map(|i| config.attention_window(i)).collect();
        let (s, f) = (Some(1024), None);
        assert_eq!(windows, [s, s, s, s, s, f, s, s, s, s, s, f]);
        let sliding = config.sliding_window.as_ref().expect("slides");
        assert_eq!((sliding.rope_theta, config.rope_theta), (Some(10_000.0), 1_000_000.0));
        assert_eq!(config.rope_scaling, RopeScaling::Linear { factor: 8.0 }, "the full layers' scaling");
        assert_eq!(config.query_scale, Some(1.0 / 16.0));
        assert_eq!(config.embedding_scale, Some(2560f32.sqrt()));
        assert_eq!(config.activation, Activation::GeluTanh);
        assert!(config.post_norms && config.qk_norm && config.tied_embeddings);
    }

    /// A DeepSeek file from before llama.cpp split `attn_kv_b` describes its heads as
    /// multi-head attention: it is read as the same latent attention.
    #[test]
    fn an_old_deepseek_layout_is_read_as_latent_attention() {
        let u32_value = |n: u32| Value::U32(n);
        let metadata: HashMap<String, Value> = [
            ("general.architecture", Value::String("deepseek2".into())),
            ("deepseek2.block_count", u32_value(4)),
            ("deepseek2.context_length", u32_value(2048)),
            ("deepseek2.attention.layer_norm_rms_epsilon", Value::F32(1e-6)),
            ("deepseek2.attention.head_count", u32_value(4)),
            ("deepseek2.attention.head_count_kv", u32_value(4)),
            ("deepseek2.attention.key_length", u32_value(48)),
            ("deepseek2.attention.value_length", u32_value(32)),
            ("deepseek2.attention.kv_lora_rank", u32_value(64)),
            ("deepseek2.embedding_length", u32_value(256)),
            ("deepseek2.feed_forward_length", u32_value(512)),
            ("deepseek2.expert_count", u32_value(8)),
            ("deepseek2.expert_used_count", u32_value(2)),
            ("deepseek2.rope.dimension_count", u32_value(16)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let config = ModelConfig::from_gguf(&metadata, true, 1024).expect("reads");
        let latent = config.latent_attention.clone().expect("latent attention");
        assert_eq!((latent.nope_dim, latent.rope_dim, latent.value_dim, latent.latent_rank), (32, 16, 32, 64));
        assert_eq!((config.num_kv_heads, config.head_dim), (1, 64 + 16), "one cached row of latent and rotary key");
    }
}

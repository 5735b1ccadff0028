//! Writes a tiny random Llama-family model as a Hugging Face folder, so tests can run
//! every architecture without downloading one: dense, or a mixture of experts named as
//! Mixtral's and Qwen3-MoE's checkpoints name them, or Gemma 3 (text-only, or inside a
//! multimodal checkpoint).
#![allow(dead_code)]

use std::collections::HashMap;

use candle_core::{Device, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// Tied embeddings, no biases, one safetensors file.
    Llama,
    /// q/k/v biases, untied head, sharded safetensors with an index.
    Qwen2,
    /// q/k norms, tied embeddings.
    Qwen3,
    /// Mixtral: `block_sparse_moe.gate` routes to `EXPERTS` experts of `w1` (gate), `w3`
    /// (up) and `w2` (down), `FFN` wide; untied head.
    Mixtral,
    /// Qwen3-MoE: q/k norms, `mlp.gate` routes to `EXPERTS` experts of
    /// `{gate,up,down}_proj`, `EXPERT_FFN` wide; weights renormalized (`norm_topk_prob`).
    Qwen3Moe,
    /// Gemma 3 (`gemma3_text`): four norms a layer (stored as `w` for a scale of `1 + w`),
    /// q/k norms, GeGLU, tied; layers 0, 1, 3, 4 slide over `GEMMA_WINDOW` positions.
    Gemma3,
    /// The same decoder as a multimodal checkpoint holds it: config.json's `gemma3` with
    /// a `text_config`, tensors under `language_model.model.` (the vision tower left out).
    Gemma3Multimodal,
}


pub const VOCAB: usize = 64;
pub const HIDDEN: usize = 32;
pub const LAYERS: usize = 6;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 8;
const FFN: usize = 48;
pub const EXPERTS: usize = 4;
pub const EXPERTS_USED: usize = 2;
/// Qwen3-MoE's experts are narrower than its (unused) dense width, as in the real models.
const EXPERT_FFN: usize = 24;
/// Gemma 3's sliding window here, short enough that a test's prompt slides past it.
pub const GEMMA_WINDOW: usize = 3;

/// Deterministic pseudo-random numbers (SplitMix64), so every run writes the same model.
pub struct Numbers(pub u64);

impl Numbers {
    fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    }

    pub fn tensor(&mut self, shape: &[usize], scale: f32, offset: f32) -> Tensor {
        let n = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|_| offset + scale * self.next()).collect();
        Tensor::from_vec(data, shape, &Device::Cpu).expect("tensor")
    }
}

pub fn write(flavor: Flavor, name: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new().prefix(&format!("hearth-{name}-")).tempdir().expect("temp dir");
    let mut rng = Numbers(match flavor {
        Flavor::Llama => 1,
        Flavor::Qwen2 => 2,
        Flavor::Qwen3 => 3,
        Flavor::Mixtral => 4,
        Flavor::Qwen3Moe => 5,
        Flavor::Gemma3 | Flavor::Gemma3Multimodal => 6,
    });
    let gemma = matches!(flavor, Flavor::Gemma3 | Flavor::Gemma3Multimodal);
    // Gemma's norms scale by `1 + w`: their weights lie around 0, the others' around 1.
    let norm_offset = if gemma { 0.0 } else { 1.0 };
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    let mut add = |name: String, shape: &[usize], scale: f32, offset: f32, rng: &mut Numbers| {
        tensors.push((name, rng.tensor(shape, scale, offset)));
    };
    add("model.embed_tokens.weight".into(), &[VOCAB, HIDDEN], 1.0, 0.0, &mut rng);
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        add(format!("{p}.input_layernorm.weight"), &[HIDDEN], 0.2, norm_offset, &mut rng);
        add(format!("{p}.post_attention_layernorm.weight"), &[HIDDEN], 0.2, norm_offset, &mut rng);
        if gemma {
            add(format!("{p}.pre_feedforward_layernorm.weight"), &[HIDDEN], 0.2, 0.0, &mut rng);
            add(format!("{p}.post_feedforward_layernorm.weight"), &[HIDDEN], 0.2, 0.0, &mut rng);
        }
        add(format!("{p}.self_attn.q_proj.weight"), &[HEADS * HEAD_DIM, HIDDEN], 0.4, 0.0, &mut rng);
        add(format!("{p}.self_attn.k_proj.weight"), &[KV_HEADS * HEAD_DIM, HIDDEN], 0.4, 0.0, &mut rng);
        add(format!("{p}.self_attn.v_proj.weight"), &[KV_HEADS * HEAD_DIM, HIDDEN], 0.4, 0.0, &mut rng);
        add(format!("{p}.self_attn.o_proj.weight"), &[HIDDEN, HEADS * HEAD_DIM], 0.4, 0.0, &mut rng);
        match flavor {
            Flavor::Mixtral => {
                add(format!("{p}.block_sparse_moe.gate.weight"), &[EXPERTS, HIDDEN], 1.0, 0.0, &mut rng);
                for e in 0..EXPERTS {
                    let q = format!("{p}.block_sparse_moe.experts.{e}");
                    add(format!("{q}.w1.weight"), &[FFN, HIDDEN], 0.4, 0.0, &mut rng);
                    add(format!("{q}.w2.weight"), &[HIDDEN, FFN], 0.4, 0.0, &mut rng);
                    add(format!("{q}.w3.weight"), &[FFN, HIDDEN], 0.4, 0.0, &mut rng);
                }
            }
            Flavor::Qwen3Moe => {
                add(format!("{p}.mlp.gate.weight"), &[EXPERTS, HIDDEN], 1.0, 0.0, &mut rng);
                for e in 0..EXPERTS {
                    let q = format!("{p}.mlp.experts.{e}");
                    add(format!("{q}.gate_proj.weight"), &[EXPERT_FFN, HIDDEN], 0.4, 0.0, &mut rng);
                    add(format!("{q}.up_proj.weight"), &[EXPERT_FFN, HIDDEN], 0.4, 0.0, &mut rng);
                    add(format!("{q}.down_proj.weight"), &[HIDDEN, EXPERT_FFN], 0.4, 0.0, &mut rng);
                }
            }
            Flavor::Llama | Flavor::Qwen2 | Flavor::Qwen3 | Flavor::Gemma3 | Flavor::Gemma3Multimodal => {
                add(format!("{p}.mlp.gate_proj.weight"), &[FFN, HIDDEN], 0.4, 0.0, &mut rng);
                add(format!("{p}.mlp.up_proj.weight"), &[FFN, HIDDEN], 0.4, 0.0, &mut rng);
                add(format!("{p}.mlp.down_proj.weight"), &[HIDDEN, FFN], 0.4, 0.0, &mut rng);
            }
        }
        if flavor == Flavor::Qwen2 {
            add(format!("{p}.self_attn.q_proj.bias"), &[HEADS * HEAD_DIM], 0.2, 0.0, &mut rng);
            add(format!("{p}.self_attn.k_proj.bias"), &[KV_HEADS * HEAD_DIM], 0.2, 0.0, &mut rng);
            add(format!("{p}.self_attn.v_proj.bias"), &[KV_HEADS * HEAD_DIM], 0.2, 0.0, &mut rng);
        }
        if matches!(flavor, Flavor::Qwen3 | Flavor::Qwen3Moe) || gemma {
            add(format!("{p}.self_attn.q_norm.weight"), &[HEAD_DIM], 0.2, norm_offset, &mut rng);
            add(format!("{p}.self_attn.k_norm.weight"), &[HEAD_DIM], 0.2, norm_offset, &mut rng);
        }
    }
    add("model.norm.weight".into(), &[HIDDEN], 0.2, norm_offset, &mut rng);
    let tied = !matches!(flavor, Flavor::Qwen2 | Flavor::Mixtral);
    if !tied {
        add("lm_head.weight".into(), &[VOCAB, HIDDEN], 1.0, 0.0, &mut rng);
    }
    if flavor == Flavor::Gemma3Multimodal {
        for (name, _) in tensors.iter_mut() {
            *name = format!("language_model.{name}");
        }
    }

    if flavor == Flavor::Qwen2 {
        // Two shards and an index, as large checkpoints come.
        let (first, second) = tensors.split_at(tensors.len() / 2);
        let mut weight_map = serde_json::Map::new();
        for (file, part) in [("model-00001-of-00002.safetensors", first), ("model-00002-of-00002.safetensors", second)] {
            let map: HashMap<String, Tensor> = part.iter().cloned().collect();
            candle_core::safetensors::save(&map, dir.path().join(file)).expect("save shard");
            for (name, _) in part {
                weight_map.insert(name.clone(), file.into());
            }
        }
        let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
        std::fs::write(dir.path().join("model.safetensors.index.json"), index.to_string()).expect("index");
    } else {
        let map: HashMap<String, Tensor> = tensors.into_iter().collect();
        candle_core::safetensors::save(&map, dir.path().join("model.safetensors")).expect("save");
    }

    let model_type = match flavor {
        Flavor::Llama => "llama",
        Flavor::Qwen2 => "qwen2",
        Flavor::Qwen3 => "qwen3",
        Flavor::Mixtral => "mixtral",
        Flavor::Qwen3Moe => "qwen3_moe",
        Flavor::Gemma3 | Flavor::Gemma3Multimodal => "gemma3_text",
    };
    let mut config = serde_json::json!({
        "model_type": model_type,
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "vocab_size": VOCAB,
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": tied,
    });
    let experts = match flavor {
        Flavor::Mixtral => serde_json::json!({"num_local_experts": EXPERTS, "num_experts_per_tok": EXPERTS_USED}),
        Flavor::Qwen3Moe => serde_json::json!({
            "num_experts": EXPERTS,
            "num_experts_per_tok": EXPERTS_USED,
            "moe_intermediate_size": EXPERT_FFN,
            "norm_topk_prob": true,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
        }),
        // Gemma 3: a full layer every third, queries scaled by 16^-1/2 (not the head
        // size's), each kind of layer with its RoPE base.
        Flavor::Gemma3 | Flavor::Gemma3Multimodal => serde_json::json!({
            "hidden_activation": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": 16,
            "sliding_window": GEMMA_WINDOW,
            "layer_types": (0..LAYERS)
                .map(|i| if (i + 1) % 3 == 0 { "full_attention" } else { "sliding_attention" })
                .collect::<Vec<_>>(),
            "rope_theta": 1_000_000.0,
            "rope_local_base_freq": 10_000.0,
            "final_logit_softcapping": null,
        }),
        Flavor::Llama | Flavor::Qwen2 | Flavor::Qwen3 => serde_json::json!({}),
    };
    if let (Some(config), Some(experts)) = (config.as_object_mut(), experts.as_object()) {
        config.extend(experts.clone());
    }
    if flavor == Flavor::Gemma3Multimodal {
        config = serde_json::json!({"model_type": "gemma3", "text_config": config, "vision_config": {}});
    }
    std::fs::write(dir.path().join("config.json"), config.to_string()).expect("config");
    write_tokenizer(dir.path());
    dir
}

/// A word-level tokenizer over `<unk>`, `<s>`, `</s>` and the words `w3` .. `w63`.
pub fn write_tokenizer(dir: &std::path::Path) {
    let mut vocab = serde_json::Map::new();
    for (id, word) in ["<unk>", "<s>", "</s>"].iter().enumerate() {
        vocab.insert((*word).into(), id.into());
    }
    for id in 3..VOCAB {
        vocab.insert(format!("w{id}"), id.into());
    }
    let special = |id: usize, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true})
    };
    let tokenizer = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")],
        "normalizer": null,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": null,
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": false},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).expect("tokenizer.json");
    let config = serde_json::json!({
        "bos_token": "<s>",
        "eos_token": "</s>",
        "add_bos_token": false,
        "chat_template": "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
    });
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).expect("tokenizer_config.json");
}

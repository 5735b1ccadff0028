//! Where a model's weights come from: a GGUF file or a Hugging Face folder of safetensors.
//!
//! Both are read lazily: opening a source parses only headers, and loading a stage reads
//! only the tensors of its own layers (GGUF by seeking, safetensors through a memory map).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{BufReader, Cursor};
use std::ops::Range;
use std::path::{Path, PathBuf};

use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use crate::chat_template::ChatTemplate;
use crate::config::{Architecture, ModelConfig, RopeScaling};
use crate::gguf::{GgufError, GgufHeader, TensorInfo, TensorType};
use crate::kernels::{attention, Matrix};
use crate::stage::{ComputePath, Stage};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// The tensors of a decoder, named independently of any file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TensorName {
    TokenEmbedding,
    OutputNorm,
    Output,
    /// Per-frequency RoPE divisors (Llama 3.1 in GGUF).
    RopeFrequencies,
    Layer(usize, LayerTensor),
    /// One expert's matrix, where a file stores experts one by one (Hugging Face folders);
    /// GGUF files stack them in [`LayerTensor::GateExperts`] and its siblings.
    Expert(usize, usize, ExpertTensor),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ExpertTensor {
    Gate,
    Up,
    Down,
}

impl ExpertTensor {
    pub(crate) const ALL: [ExpertTensor; 3] = [Self::Gate, Self::Up, Self::Down];

    /// The GGUF tensor that stacks every expert's matrix of this kind.
    pub(crate) fn stacked(self) -> LayerTensor {
        match self {
            Self::Gate => LayerTensor::GateExperts,
            Self::Up => LayerTensor::UpExperts,
            Self::Down => LayerTensor::DownExperts,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LayerTensor {
    AttentionNorm,
    Query,
    Key,
    Value,
    AttentionOutput,
    QueryBias,
    KeyBias,
    ValueBias,
    QueryNorm,
    KeyNorm,
    FeedForwardNorm,
    Gate,
    Up,
    Down,
    /// The router of a mixture of experts: one row of logits per expert.
    Router,
    /// Every expert's gate, up and down matrices, stacked (GGUF's `ffn_*_exps`).
    GateExperts,
    UpExperts,
    DownExperts,
    /// DeepSeek's per-expert bias on the router's scores, for choosing experts only.
    SelectionBias,
    /// The experts every token goes through (DeepSeek), as one feed-forward.
    SharedGate,
    SharedUp,
    SharedDown,
    /// Latent attention (DeepSeek): the queries' bottleneck and its norm, then its expansion.
    QueryA,
    QueryANorm,
    QueryB,
    /// The compressed latent and the shared rotary key, in one projection, and the latent's norm.
    LatentKv,
    LatentNorm,
    /// Per head: the latent's key projection (applied to queries instead, "absorbed") and
    /// its value projection.
    KeyFromLatent,
    ValueFromLatent,
    /// Gemma's norms of the attention's and the feed-forward's outputs. (gpt-oss's GGUF
    /// files name its feed-forward norm `post_attention_norm` too.)
    PostAttentionNorm,
    PostFeedForwardNorm,
    /// Latent attention's key and value projections from the latent in one tensor, as
    /// DeepSeek files from before llama.cpp's MLA layout hold them (and Hugging Face's
    /// `kv_b_proj`, which `KeyFromLatent` and `ValueFromLatent` name there).
    LatentKvB,
    /// gpt-oss: a bias on attention's output, each head's sink logit, a bias on the
    /// router's logits, and every expert's biases, stacked as its matrices are.
    AttentionOutputBias,
    AttentionSinks,
    RouterBias,
    GateExpertsBias,
    UpExpertsBias,
    DownExpertsBias,
}

impl LayerTensor {
    /// gpt-oss folders' stacked experts and their biases.
    fn is_gpt_oss_stacked(self) -> bool {
        matches!(
            self,
            Self::GateExperts
                | Self::UpExperts
                | Self::DownExperts
                | Self::GateExpertsBias
                | Self::UpExpertsBias
                | Self::DownExpertsBias
        )
    }

    /// Every weight a block may hold, for sizing a layer.
    const ALL: [LayerTensor; 38] = [
        Self::AttentionNorm,
        Self::Query,
        Self::Key,
        Self::Value,
        Self::AttentionOutput,
        Self::QueryBias,
        Self::KeyBias,
        Self::ValueBias,
        Self::QueryNorm,
        Self::KeyNorm,
        Self::FeedForwardNorm,
        Self::Gate,
        Self::Up,
        Self::Down,
        Self::Router,
        Self::GateExperts,
        Self::UpExperts,
        Self::DownExperts,
        Self::SelectionBias,
        Self::SharedGate,
        Self::SharedUp,
        Self::SharedDown,
        Self::QueryA,
        Self::QueryANorm,
        Self::QueryB,
        Self::LatentKv,
        Self::LatentNorm,
        Self::KeyFromLatent,
        Self::ValueFromLatent,
        Self::PostAttentionNorm,
        Self::PostFeedForwardNorm,
        Self::LatentKvB,
        Self::AttentionOutputBias,
        Self::AttentionSinks,
        Self::RouterBias,
        Self::GateExpertsBias,
        Self::UpExpertsBias,
        Self::DownExpertsBias,
    ];

    fn gguf_suffix(self) -> &'static str {
        match self {
            Self::AttentionNorm => "attn_norm.weight",
            Self::Query => "attn_q.weight",
            Self::Key => "attn_k.weight",
            Self::Value => "attn_v.weight",
            Self::AttentionOutput => "attn_output.weight",
            Self::QueryBias => "attn_q.bias",
            Self::KeyBias => "attn_k.bias",
            Self::ValueBias => "attn_v.bias",
            Self::QueryNorm => "attn_q_norm.weight",
            Self::KeyNorm => "attn_k_norm.weight",
            Self::FeedForwardNorm => "ffn_norm.weight",
            Self::Gate => "ffn_gate.weight",
            Self::Up => "ffn_up.weight",
            Self::Down => "ffn_down.weight",
            Self::Router => "ffn_gate_inp.weight",
            Self::GateExperts => "ffn_gate_exps.weight",
            Self::UpExperts => "ffn_up_exps.weight",
            Self::DownExperts => "ffn_down_exps.weight",
            Self::SelectionBias => "exp_probs_b.bias",
            Self::SharedGate => "ffn_gate_shexp.weight",
            Self::SharedUp => "ffn_up_shexp.weight",
            Self::SharedDown => "ffn_down_shexp.weight",
            Self::QueryA => "attn_q_a.weight",
            Self::QueryANorm => "attn_q_a_norm.weight",
            Self::QueryB => "attn_q_b.weight",
            Self::LatentKv => "attn_kv_a_mqa.weight",
            Self::LatentNorm => "attn_kv_a_norm.weight",
            Self::KeyFromLatent => "attn_k_b.weight",
            Self::ValueFromLatent => "attn_v_b.weight",
            Self::PostAttentionNorm => "post_attention_norm.weight",
            Self::PostFeedForwardNorm => "post_ffw_norm.weight",
            Self::LatentKvB => "attn_kv_b.weight",
            Self::AttentionOutputBias => "attn_output.bias",
            Self::AttentionSinks => "attn_sinks.weight",
            Self::RouterBias => "ffn_gate_inp.bias",
            Self::GateExpertsBias => "ffn_gate_exps.bias",
            Self::UpExpertsBias => "ffn_up_exps.bias",
            Self::DownExpertsBias => "ffn_down_exps.bias",
        }
    }

    fn hf_suffix(self) -> &'static str {
        match self {
            Self::AttentionNorm => "input_layernorm.weight",
            Self::Query => "self_attn.q_proj.weight",
            Self::Key => "self_attn.k_proj.weight",
            Self::Value => "self_attn.v_proj.weight",
            Self::AttentionOutput => "self_attn.o_proj.weight",
            Self::QueryBias => "self_attn.q_proj.bias",
            Self::KeyBias => "self_attn.k_proj.bias",
            Self::ValueBias => "self_attn.v_proj.bias",
            Self::QueryNorm => "self_attn.q_norm.weight",
            Self::KeyNorm => "self_attn.k_norm.weight",
            Self::FeedForwardNorm => "post_attention_layernorm.weight",
            Self::Gate => "mlp.gate_proj.weight",
            Self::Up => "mlp.up_proj.weight",
            Self::Down => "mlp.down_proj.weight",
            // Qwen3-MoE's name; Mixtral's and gpt-oss's are in `hf_aliases`.
            Self::Router => "mlp.gate.weight",
            // Hugging Face stores experts one by one (`TensorName::Expert`).
            Self::GateExperts | Self::UpExperts | Self::DownExperts => "mlp.experts",
            Self::SelectionBias => "mlp.gate.e_score_correction_bias",
            Self::SharedGate => "mlp.shared_experts.gate_proj.weight",
            Self::SharedUp => "mlp.shared_experts.up_proj.weight",
            Self::SharedDown => "mlp.shared_experts.down_proj.weight",
            Self::QueryA => "self_attn.q_a_proj.weight",
            Self::QueryANorm => "self_attn.q_a_layernorm.weight",
            Self::QueryB => "self_attn.q_b_proj.weight",
            Self::LatentKv => "self_attn.kv_a_proj_with_mqa.weight",
            Self::LatentNorm => "self_attn.kv_a_layernorm.weight",
            // Hugging Face keeps both in `kv_b_proj`; GGUF splits them.
            Self::KeyFromLatent | Self::ValueFromLatent => "self_attn.kv_b_proj.weight",
            // Gemma's names; which of its four norms is which is in `find_hf`.
            Self::PostAttentionNorm => "post_attention_layernorm.weight",
            Self::PostFeedForwardNorm => "post_feedforward_layernorm.weight",
            // Counted once, as `KeyFromLatent`.
            Self::LatentKvB => "self_attn.kv_b_proj.unused",
            Self::AttentionOutputBias => "self_attn.o_proj.bias",
            Self::AttentionSinks => "self_attn.sinks",
            Self::RouterBias => "mlp.router.bias",
            // gpt-oss's experts are stacked in its folders too (`mlp.experts.*_proj_bias`).
            Self::GateExpertsBias | Self::UpExpertsBias => "mlp.experts.gate_up_proj_bias",
            Self::DownExpertsBias => "mlp.experts.down_proj_bias",
        }
    }
}

impl TensorName {
    fn gguf(self) -> String {
        match self {
            Self::TokenEmbedding => "token_embd.weight".into(),
            Self::OutputNorm => "output_norm.weight".into(),
            Self::Output => "output.weight".into(),
            Self::RopeFrequencies => "rope_freqs.weight".into(),
            Self::Layer(i, t) => format!("blk.{i}.{}", t.gguf_suffix()),
            Self::Expert(i, _, t) => Self::Layer(i, t.stacked()).gguf(),
        }
    }

    fn hf(self) -> String {
        match self {
            Self::TokenEmbedding => "model.embed_tokens.weight".into(),
            Self::OutputNorm => "model.norm.weight".into(),
            Self::Output => "lm_head.weight".into(),
            Self::RopeFrequencies => "rope_freqs.weight".into(),
            Self::Layer(i, t) => format!("model.layers.{i}.{}", t.hf_suffix()),
            Self::Expert(i, e, t) => {
                let kind = match t {
                    ExpertTensor::Gate => "gate_proj",
                    ExpertTensor::Up => "up_proj",
                    ExpertTensor::Down => "down_proj",
                };
                format!("model.layers.{i}.mlp.experts.{e}.{kind}.weight")
            }
        }
    }

    /// Other names of the tensors that Mixtral and gpt-oss name their own way in Hugging
    /// Face folders.
    fn hf_aliases(self) -> Vec<String> {
        match self {
            Self::Layer(i, LayerTensor::Router) => vec![
                format!("model.layers.{i}.block_sparse_moe.gate.weight"),
                format!("model.layers.{i}.mlp.router.weight"),
            ],
            Self::Expert(i, e, t) => {
                let w = match t {
                    ExpertTensor::Gate => "w1",
                    ExpertTensor::Down => "w2",
                    ExpertTensor::Up => "w3",
                };
                vec![format!("model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight")]
            }
            _ => Vec::new(),
        }
    }
}

/// The name a safetensors file holds `name` under, if it holds it.
///
/// Gemma has four norms a layer: its `post_attention_layernorm` follows attention, and its
/// `pre_feedforward_layernorm` is what Llama calls `post_attention_layernorm`. A Gemma 3
/// checkpoint with its vision tower keeps the decoder under `language_model`.
fn find_hf(tensors: &MmapedSafetensors, name: TensorName) -> Option<String> {
    let gemma_norms = |layer: usize| {
        let pre_feed_forward = format!("model.layers.{layer}.pre_feedforward_layernorm.weight");
        find_prefixed(tensors, pre_feed_forward)
    };
    match name {
        TensorName::Layer(layer, LayerTensor::FeedForwardNorm) => {
            return gemma_norms(layer).or_else(|| find_prefixed(tensors, name.hf()))
        }
        TensorName::Layer(layer, LayerTensor::PostAttentionNorm) if gemma_norms(layer).is_none() => return None,
        _ => {}
    }
    std::iter::once(name.hf()).chain(name.hf_aliases()).find_map(|n| find_prefixed(tensors, n))
}

/// `name`, or where Gemma 3's multimodal checkpoints put it (`language_model.model.*` or
/// `model.language_model.*`, and `language_model.lm_head`), if the file holds it.
fn find_prefixed(tensors: &MmapedSafetensors, name: String) -> Option<String> {
    let nested = name.strip_prefix("model.").map(|rest| {
        [format!("language_model.model.{rest}"), format!("model.language_model.{rest}")]
    });
    let head = (name == "lm_head.weight").then(|| "language_model.lm_head.weight".to_owned());
    std::iter::once(name)
        .chain(nested.into_iter().flatten())
        .chain(head)
        .find(|n| tensors.get(n).is_ok())
}

/// Memory a model's parts take once loaded: what placement needs to split it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelFootprint {
    /// Weight bytes of each layer, in order.
    pub layer_bytes: Vec<u64>,
    /// The token embedding, held by the first stage.
    pub embedding_bytes: u64,
    /// The final norm and LM head, held by the last stage (a tied head re-reads the embedding).
    pub head_bytes: u64,
    /// K and V cache of one token in one layer.
    pub kv_bytes_per_token_per_layer: u64,
    /// The most positions each layer's cache holds however long the context: a bound
    /// for a sliding layer, which keeps about its window; `None` for the others.
    pub kv_positions_bound: Vec<Option<u64>>,
}

impl ModelFootprint {
    /// The KV cache bytes of each layer for a context of `tokens`.
    pub fn kv_bytes_per_layer(&self, tokens: u64) -> Vec<u64> {
        self.kv_positions_bound
            .iter()
            .map(|bound| self.kv_bytes_per_token_per_layer.saturating_mul(bound.map_or(tokens, |b| b.min(tokens))))
            .collect()
    }
}

/// Where a GGUF model's bytes lie in its file: what a node serving weights to its peers
/// reads, and what a node fetching them writes. Every range is checked to be countable
/// (no overflow); none is checked against the file on disk, which may be sparse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileLayout {
    /// The header (metadata, tokenizer, tensor infos): bytes `0..header_bytes`.
    pub header_bytes: u64,
    /// Each tensor's bytes as a range of file offsets, by name.
    pub tensors: BTreeMap<String, Range<u64>>,
    /// The length of the whole file: where the last tensor ends.
    pub file_bytes: u64,
}

impl FileLayout {
    /// Reads the layout of a GGUF file from its header alone, as received from a peer:
    /// `header` must be exactly the bytes before the data section. Nothing is allocated
    /// beyond what `header` holds, and a malformed header is an error, never a panic.
    pub fn from_gguf_header(header: &[u8]) -> Result<(Self, GgufHeader)> {
        let invalid = |why: String| Error::InvalidModel(format!("GGUF header from a peer: {why}"));
        let parsed = GgufHeader::read(&mut Cursor::new(header)).map_err(|e| invalid(e.to_string()))?;
        if parsed.data_offset != header.len() as u64 {
            return Err(invalid(format!(
                "its data section starts at byte {}, but it is {} bytes long",
                parsed.data_offset,
                header.len()
            )));
        }
        Ok((Self::of(&parsed)?, parsed))
    }

    fn of(header: &GgufHeader) -> Result<Self> {
        let mut tensors = BTreeMap::new();
        let mut file_bytes = header.data_offset;
        for (name, info) in &header.tensors {
            let too_large = || Error::InvalidModel(format!("tensor `{name}` is too large to count"));
            let bytes = info.bytes().ok_or_else(too_large)?;
            let start = header.data_offset.checked_add(info.offset).ok_or_else(too_large)?;
            let end = start.checked_add(bytes).ok_or_else(too_large)?;
            file_bytes = file_bytes.max(end);
            tensors.insert(name.clone(), start..end);
        }
        Ok(Self { header_bytes: header.data_offset, tensors, file_bytes })
    }
}

enum Weights {
    Gguf { path: PathBuf, header: GgufHeader },
    Safetensors { tensors: MmapedSafetensors },
}

/// An opened model: its configuration, tokenizer files and weights, ready to load stages.
pub struct ModelSource {
    name: String,
    location: PathBuf,
    config: ModelConfig,
    weights: Weights,
    /// The code that runs stages, if not the device's own (see [`ComputePath`]).
    compute: Option<ComputePath>,
}

impl ModelSource {
    /// Opens a `.gguf` file or a Hugging Face folder (`config.json` + `*.safetensors`).
    pub fn open(path: &Path) -> Result<Self> {
        if path.is_dir() {
            Self::open_hf_dir(path)
        } else {
            Self::open_gguf(path)
        }
    }

    fn open_gguf(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let header = GgufHeader::read(&mut BufReader::new(file)).map_err(|e| unreadable_gguf(path, e))?;
        let embedding_rows = match header.tensors.get("token_embd.weight") {
            Some(info) => info.dims.first().copied().unwrap_or(0),
            None => return Err(Error::InvalidModel("GGUF file has no `token_embd.weight`".into())),
        };
        let has_output = header.tensors.contains_key("output.weight");
        let mut config = ModelConfig::from_gguf(&header.metadata, has_output, embedding_rows)?;
        check_gguf_feed_forward(&config, &header)?;
        if header.tensors.contains_key(&TensorName::RopeFrequencies.gguf()) {
            let mut reader = BufReader::new(File::open(path).map_err(|e| Error::io(path, e))?);
            let factors = header
                .qtensor(&mut reader, &TensorName::RopeFrequencies.gguf(), &Device::Cpu)?
                .dequantize(&Device::Cpu)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            config.rope_scaling = RopeScaling::FrequencyFactors(factors);
        }
        Ok(Self {
            name: file_stem(path),
            location: path.to_path_buf(),
            config,
            weights: Weights::Gguf { path: path.to_path_buf(), header },
            compute: None,
        })
    }

    fn open_hf_dir(dir: &Path) -> Result<Self> {
        let config_path = dir.join("config.json");
        let json = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
        let config = ModelConfig::from_hf_json(&json)?;
        let shards = safetensors_shards(dir)?;
        // SAFETY: the files are mapped read-only; like every reader of model files we
        // assume nobody truncates them while the node runs.
        let tensors = unsafe { MmapedSafetensors::multi(&shards)? };
        let mut source = Self {
            name: dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            location: dir.to_path_buf(),
            config,
            weights: Weights::Safetensors { tensors },
            compute: None,
        };
        if !source.has(TensorName::Output) {
            source.config.tied_embeddings = true;
        }
        Ok(source)
    }

    /// A short name for the model: the file stem or folder name.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn location(&self) -> &Path {
        &self.location
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Runs every stage loaded from now on with `compute` instead of the device's own
    /// path: how tests run candle's operations (Metal's and CUDA's path) on the CPU.
    #[doc(hidden)]
    pub fn set_compute_path(&mut self, compute: ComputePath) {
        self.compute = Some(compute);
    }

    fn compute_path(&self, device: &Device) -> ComputePath {
        self.compute.unwrap_or_else(|| ComputePath::of_device(device))
    }

    /// Caps the context (and so the KV cache and RoPE tables) below the model's own.
    pub fn limit_context(&mut self, tokens: usize) {
        self.config.context_length = self.config.context_length.min(tokens.max(1));
    }

    pub fn tokenizer(&self) -> Result<Tokenizer> {
        match &self.weights {
            Weights::Gguf { header, .. } => Tokenizer::from_gguf(&header.metadata),
            Weights::Safetensors { .. } => Tokenizer::from_hf_dir(&self.location),
        }
    }

    /// The model's chat template, or `None` if it ships none.
    pub fn chat_template(&self, tokenizer: &Tokenizer) -> Result<Option<ChatTemplate>> {
        match &self.weights {
            Weights::Gguf { header, .. } => ChatTemplate::from_gguf(&header.metadata, tokenizer),
            Weights::Safetensors { .. } => ChatTemplate::from_hf_dir(&self.location, tokenizer),
        }
    }

    /// Where the model's bytes lie in its file; GGUF models only.
    pub fn file_layout(&self) -> Result<FileLayout> {
        match &self.weights {
            Weights::Gguf { header, .. } => FileLayout::of(header),
            Weights::Safetensors { .. } => {
                Err(Error::Unsupported("only GGUF models can be shared between nodes tensor by tensor".into()))
            }
        }
    }

    /// The file's names of the tensors a stage of `layers` loads: its blocks' weights,
    /// the embedding for the first stage, the final norm and head (or the tied
    /// embedding) for the last, and any tensor opening the model reads (RoPE factors).
    /// GGUF models only.
    pub fn stage_tensor_names(&self, layers: Range<usize>) -> Result<Vec<String>> {
        let Weights::Gguf { .. } = &self.weights else {
            return Err(Error::Unsupported("only GGUF models can be shared between nodes tensor by tensor".into()));
        };
        self.check_layers(&layers)?;
        let mut names = vec![TensorName::RopeFrequencies];
        if layers.start == 0 {
            names.push(TensorName::TokenEmbedding);
        }
        for i in layers.clone() {
            names.extend(LayerTensor::ALL.iter().map(|&t| TensorName::Layer(i, t)));
        }
        if layers.end == self.config.num_layers {
            names.push(TensorName::OutputNorm);
            names.push(if self.config.tied_embeddings { TensorName::TokenEmbedding } else { TensorName::Output });
        }
        let mut seen = BTreeSet::new();
        Ok(names
            .into_iter()
            .filter(|&name| self.has(name))
            .map(TensorName::gguf)
            .filter(|name| seen.insert(name.clone()))
            .collect())
    }

    /// Bytes each part takes in memory once loaded on `device`, without loading anything.
    pub fn footprint(&self, device: &Device) -> ModelFootprint {
        let dense_bytes = activation_dtype(device).size_in_bytes() as u64;
        let native = self.compute_path(device) == ComputePath::Native;
        let size = |name: TensorName| self.loaded_bytes(name, dense_bytes, native).unwrap_or(0);
        // Experts one tensor each (Hugging Face folders); GGUF's stacked ones are in `ALL`.
        let experts = match (&self.weights, &self.config.moe) {
            (Weights::Safetensors { .. }, Some(moe)) => moe.experts,
            _ => 0,
        };
        let layer_bytes = (0..self.config.num_layers)
            .map(|i| {
                let layer: u64 = LayerTensor::ALL.iter().map(|&t| size(TensorName::Layer(i, t))).sum();
                let experts: u64 = (0..experts)
                    .flat_map(|e| ExpertTensor::ALL.map(|t| size(TensorName::Expert(i, e, t))))
                    .sum();
                layer + experts
            })
            .collect();
        let embedding_bytes = size(TensorName::TokenEmbedding);
        let head = if self.config.tied_embeddings { embedding_bytes } else { size(TensorName::Output) };
        ModelFootprint {
            layer_bytes,
            embedding_bytes,
            head_bytes: head + size(TensorName::OutputNorm),
            // The CPU path keeps K and V in f16 (as llama.cpp does); other devices in the
            // activation dtype.
            kv_bytes_per_token_per_layer: self.config.kv_bytes_per_token_per_layer(
                match self.compute_path(device) {
                    ComputePath::Native => 2,
                    ComputePath::CandleOps => dense_bytes as usize,
                },
            ),
            kv_positions_bound: (0..self.config.num_layers)
                .map(|i| self.config.attention_window(i).map(|w| attention::KvCache::sliding_positions(w) as u64))
                .collect(),
        }
    }

    /// Loads layers `layers` (plus the embedding if it starts at 0, and the head if it ends
    /// at the last layer) onto `device`.
    pub fn load_stage(&self, layers: Range<usize>, device: &Device) -> Result<Stage> {
        self.check_layers(&layers)?;
        let mut loader = self.loader(device)?;
        Stage::load(&self.config, layers, &mut loader, None)
    }

    /// The stage of `layers`, made from `stage` (a stage of this model): the layers both
    /// ranges share, and the embedding or head if both have them, move over as they are;
    /// only the others load. The layers the new range leaves out are freed first. A node
    /// whose range changes when a peer joins or leaves thus loads only what it lacks, or
    /// nothing when its range shrinks.
    pub fn reshape_stage(&self, stage: Stage, layers: Range<usize>) -> Result<Stage> {
        self.check_layers(&layers)?;
        let mut loader = self.loader(stage.device())?;
        Stage::load(&self.config, layers, &mut loader, Some(stage))
    }

    /// Refuses a range of layers that is empty or runs past the model's.
    fn check_layers(&self, layers: &Range<usize>) -> Result<()> {
        let n = self.config.num_layers;
        if layers.start >= layers.end || layers.end > n {
            return Err(Error::InvalidInput(format!(
                "layer range {}..{} is not within the model's {n} layers",
                layers.start, layers.end
            )));
        }
        Ok(())
    }

    fn loader(&self, device: &Device) -> Result<TensorLoader<'_>> {
        let reader = match &self.weights {
            Weights::Gguf { path, .. } => {
                Some(BufReader::new(File::open(path).map_err(|e| Error::io(path, e))?))
            }
            Weights::Safetensors { .. } => None,
        };
        let compute = self.compute_path(device);
        if compute == ComputePath::Native && !device.is_cpu() {
            return Err(Error::Unsupported(format!(
                "the native kernels run on the CPU only, not on {:?}",
                device.location()
            )));
        }
        // Gemma's RMS norms multiply by `1 + w`: its Hugging Face checkpoints hold `w`, and
        // llama.cpp's converter writes `1 + w` into GGUF files.
        let norms_add_one =
            matches!(self.weights, Weights::Safetensors { .. }) && self.config.architecture == Architecture::Gemma3;
        Ok(TensorLoader { weights: &self.weights, reader, device: device.clone(), compute, norms_add_one })
    }

    fn has(&self, name: TensorName) -> bool {
        match &self.weights {
            Weights::Gguf { header, .. } => header.tensors.contains_key(&name.gguf()),
            Weights::Safetensors { tensors } => find_hf(tensors, name).is_some(),
        }
    }

    /// Bytes `name` takes once loaded: dense tensors in `dense_bytes` per value, except
    /// that the `native` kernels keep BF16 matrices as the file has them.
    fn loaded_bytes(&self, name: TensorName, dense_bytes: u64, native: bool) -> Option<u64> {
        match &self.weights {
            Weights::Gguf { header, .. } => {
                let info = header.tensors.get(&name.gguf())?;
                let elements = info.elements()?;
                // Split per head and kept in Q8_0 (`TensorLoader::latent_heads`).
                if let TensorName::Layer(_, LayerTensor::LatentKvB) = name {
                    return Some(if native { elements / 32 * 34 } else { elements * dense_bytes });
                }
                Some(match info.kind {
                    TensorType::Ggml(GgmlDType::BF16) if native && info.dims.len() >= 2 => elements * 2,
                    // Dense GGUF tensors are widened to the activation dtype on load.
                    kind if kind.is_dense() => elements * dense_bytes,
                    _ => info.bytes()?,
                })
            }
            // Keys and values from the latent are one Hugging Face tensor: count it once.
            Weights::Safetensors { .. } if matches!(name, TensorName::Layer(_, LayerTensor::ValueFromLatent)) => Some(0),
            // gpt-oss's stacked experts: MXFP4 blocks and scales stay as they are; gate and
            // up (and their biases) share tensors, half each.
            Weights::Safetensors { tensors } if matches!(name, TensorName::Layer(_, part) if part.is_gpt_oss_stacked()) => {
                let TensorName::Layer(layer, part) = name else { unreachable!("matched above") };
                let kind = match part {
                    LayerTensor::DownExperts | LayerTensor::DownExpertsBias => ExpertTensor::Down,
                    _ => ExpertTensor::Gate,
                };
                let elements = |suffix: &str| {
                    tensors.get(&gpt_oss_experts(layer, kind, suffix)).ok().map(|v| v.shape().iter().product::<usize>() as u64)
                };
                let share = if kind == ExpertTensor::Down { 1 } else { 2 };
                let bytes = match part {
                    LayerTensor::GateExperts | LayerTensor::UpExperts | LayerTensor::DownExperts => {
                        match (elements("_blocks"), elements("_scales"), elements("")) {
                            (Some(blocks), Some(scales), _) => blocks + scales,
                            (_, _, Some(values)) => values * dense_bytes,
                            _ => return None,
                        }
                    }
                    _ => elements("_bias")? * dense_bytes,
                };
                Some(bytes / share)
            }
            Weights::Safetensors { tensors } => {
                let view = tensors.get(&find_hf(tensors, name)?).ok()?;
                Some(view.shape().iter().product::<usize>() as u64 * dense_bytes)
            }
        }
    }
}

/// Reads tensors for one stage; holds the open file so a stage is loaded in one pass.
pub(crate) struct TensorLoader<'a> {
    weights: &'a Weights,
    reader: Option<BufReader<File>>,
    device: Device,
    compute: ComputePath,
    /// Norm weights are stored less 1 (Gemma's Hugging Face checkpoints).
    norms_add_one: bool,
}

impl TensorLoader<'_> {
    pub(crate) fn device(&self) -> &Device {
        &self.device
    }

    pub(crate) fn compute(&self) -> ComputePath {
        self.compute
    }

    pub(crate) fn contains(&self, name: TensorName) -> bool {
        match self.weights {
            Weights::Gguf { header, .. } => header.tensors.contains_key(&name.gguf()),
            Weights::Safetensors { tensors } => find_hf(tensors, name).is_some(),
        }
    }

    /// A weight matrix for products: kept quantized when the file is quantized.
    pub(crate) fn matrix(&mut self, name: TensorName) -> Result<Matrix> {
        match self.weights {
            Weights::Gguf { .. } if self.gguf_kind(name) == Some(TensorType::Mxfp4) => {
                let (info, bytes) = self.gguf_bytes(name)?;
                let [rows, cols] = info.dims[..] else {
                    return Err(Error::InvalidModel(format!("MXFP4 tensor `{}` is not a matrix", name.gguf())));
                };
                self.mxfp4_matrix(&bytes, rows, cols)
            }
            Weights::Gguf { .. } => {
                let qtensor = self.gguf_tensor(name)?;
                Ok(self.quantized_matrix(qtensor)?)
            }
            Weights::Safetensors { .. } => Ok(Matrix::dense(self.dense(name)?)),
        }
    }

    /// An MXFP4 matrix from its blocks as GGUF stores them, in whichever form runs it.
    fn mxfp4_matrix(&self, blocks: &[u8], rows: usize, cols: usize) -> Result<Matrix> {
        Ok(match self.compute {
            ComputePath::Native => Matrix::mxfp4_native(blocks, rows, cols)?,
            ComputePath::CandleOps => Matrix::mxfp4_candle(blocks, rows, cols, &self.device)?,
        })
    }

    fn quantized_matrix(&self, qtensor: QTensor) -> candle_core::Result<Matrix> {
        match self.compute {
            ComputePath::Native => Matrix::quantized(qtensor),
            ComputePath::CandleOps => Matrix::candle(qtensor),
        }
    }

    /// One matrix of `kind` for each of the `experts` of `layer`, each `rows × cols`:
    /// slices of GGUF's stacked tensor (its bytes as the file has them, never
    /// dequantized), or a Hugging Face folder's tensors one by one.
    pub(crate) fn experts(
        &mut self,
        layer: usize,
        kind: ExpertTensor,
        experts: usize,
        (rows, cols): (usize, usize),
    ) -> Result<Vec<Matrix>> {
        if let Weights::Safetensors { tensors } = self.weights {
            if tensors.get(&gpt_oss_experts(layer, kind, "_blocks")).is_ok() {
                return self.gpt_oss_mxfp4_experts(tensors, layer, kind, experts, (rows, cols));
            }
            if tensors.get(&gpt_oss_experts(layer, kind, "")).is_ok() {
                return self.gpt_oss_dense_experts(layer, kind, experts, (rows, cols));
            }
            return (0..experts)
                .map(|e| {
                    let matrix = self.dense(TensorName::Expert(layer, e, kind))?;
                    check_dims(TensorName::Expert(layer, e, kind), matrix.dims(), &[rows, cols])?;
                    Ok(Matrix::dense(matrix))
                })
                .collect();
        }
        self.stacked(TensorName::Layer(layer, kind.stacked()), experts, (rows, cols))
    }

    /// gpt-oss's MXFP4 experts of `kind` from its folder's blocks and scales (`[experts,
    /// rows, blocks, 16]` and `[experts, rows, blocks]` bytes, gate and up rows taking
    /// turns), each expert's rows rewritten in GGUF's block layout as llama.cpp's converter
    /// writes them: the exponent first, and the nibbles of values `j` and `j + 16` in byte
    /// `j` where Hugging Face pairs values `2j` and `2j + 1`.
    fn gpt_oss_mxfp4_experts(
        &self,
        tensors: &MmapedSafetensors,
        layer: usize,
        kind: ExpertTensor,
        experts: usize,
        (rows, cols): (usize, usize),
    ) -> Result<Vec<Matrix>> {
        let (blocks_name, scales_name) = (gpt_oss_experts(layer, kind, "_blocks"), gpt_oss_experts(layer, kind, "_scales"));
        let view = |name: &str| tensors.get(name).map_err(|e| Error::InvalidModel(format!("tensor `{name}`: {e}")));
        let (blocks, scales) = (view(&blocks_name)?, view(&scales_name)?);
        // Gate and up share one tensor, their rows interleaved.
        let (stored_rows, first, step) = match kind {
            ExpertTensor::Gate => (2 * rows, 0, 2),
            ExpertTensor::Up => (2 * rows, 1, 2),
            ExpertTensor::Down => (rows, 0, 1),
        };
        let per_row = cols / 32;
        let is_bytes = |view: &safetensors::tensor::TensorView<'_>| DType::try_from(view.dtype()).ok() == Some(DType::U8);
        if !is_bytes(&blocks)
            || !is_bytes(&scales)
            || blocks.shape() != [experts, stored_rows, per_row, 16]
            || scales.shape() != [experts, stored_rows, per_row]
        {
            return Err(Error::InvalidModel(format!(
                "`{blocks_name}` and `{scales_name}` are {:?} {:?} and {:?} {:?}, not MXFP4 blocks of {experts} experts' \
                 {stored_rows} rows of {cols}",
                blocks.dtype(),
                blocks.shape(),
                scales.dtype(),
                scales.shape()
            )));
        }
        let (blocks, scales) = (blocks.data(), scales.data());
        (0..experts)
            .map(|e| {
                let mut matrix = Vec::with_capacity(rows * per_row * 17);
                for r in 0..rows {
                    let row = e * stored_rows + first + step * r;
                    for b in 0..per_row {
                        let at = row * per_row + b;
                        matrix.push(scales[at]);
                        let pairs = &blocks[at * 16..(at + 1) * 16];
                        let value = |j: usize| if j.is_multiple_of(2) { pairs[j / 2] & 0x0F } else { pairs[j / 2] >> 4 };
                        matrix.extend((0..16).map(|j| value(j) | (value(j + 16) << 4)));
                    }
                }
                self.mxfp4_matrix(&matrix, rows, cols)
            })
            .collect()
    }

    /// gpt-oss's experts of `kind` from a folder that stores them unquantized: `[experts,
    /// cols, rows]` (transposed, gate and up columns taking turns).
    fn gpt_oss_dense_experts(
        &mut self,
        layer: usize,
        kind: ExpertTensor,
        experts: usize,
        (rows, cols): (usize, usize),
    ) -> Result<Vec<Matrix>> {
        let Weights::Safetensors { tensors } = self.weights else { unreachable!("a folder") };
        let name = gpt_oss_experts(layer, kind, "");
        let stacked = tensors.load(&name, &self.device).map_err(|e| Error::InvalidModel(format!("tensor `{name}`: {e}")))?;
        let stored_rows = if kind == ExpertTensor::Down { rows } else { 2 * rows };
        check_dims(TensorName::Layer(layer, kind.stacked()), stacked.dims(), &[experts, cols, stored_rows])?;
        let dtype = activation_dtype(&self.device);
        (0..experts)
            .map(|e| {
                let matrix = stacked.get(e)?.t()?;
                let matrix = match kind {
                    ExpertTensor::Down => matrix,
                    _ => matrix.reshape((rows, 2, cols))?.narrow(1, usize::from(kind == ExpertTensor::Up), 1)?.squeeze(1)?,
                };
                Ok(Matrix::dense(matrix.contiguous()?.to_dtype(dtype)?))
            })
            .collect()
    }

    /// A GGUF tensor of `count` stacked `rows x cols` matrices (experts, heads), as one
    /// matrix each: the file's bytes, sliced, not dequantized.
    pub(crate) fn stacked(&mut self, name: TensorName, count: usize, (rows, cols): (usize, usize)) -> Result<Vec<Matrix>> {
        if let Weights::Safetensors { .. } = self.weights {
            return self.latent_heads(name, name, count, (rows, cols));
        }
        if let TensorName::Layer(layer, LayerTensor::KeyFromLatent | LayerTensor::ValueFromLatent) = name {
            if !self.contains(name) && self.contains(TensorName::Layer(layer, LayerTensor::LatentKvB)) {
                return self.latent_heads(name, TensorName::Layer(layer, LayerTensor::LatentKvB), count, (rows, cols));
            }
        }
        if self.gguf_kind(name) == Some(TensorType::Mxfp4) {
            let (info, bytes) = self.gguf_bytes(name)?;
            check_dims(name, &info.dims, &[count, rows, cols])?;
            return bytes.chunks_exact(bytes.len() / count.max(1)).map(|b| self.mxfp4_matrix(b, rows, cols)).collect();
        }
        // Read on the CPU, sliced there, and each matrix moved to the device on its own.
        let stacked = self.gguf_tensor_on(name, &Device::Cpu)?;
        check_dims(name, stacked.shape().dims(), &[count, rows, cols])?;
        let dtype = stacked.dtype();
        let data = stacked.data()?;
        let per_matrix = data.len() / count;
        let matrices = data
            .chunks_exact(per_matrix)
            .map(|bytes| {
                let matrix = qtensor_from_ggml(dtype, bytes, vec![rows, cols], &self.device)?;
                self.quantized_matrix(matrix)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(matrices)
    }

    /// Latent attention's per-head key or value projections (`name`) from the one
    /// tensor `kv_b` of both (Hugging Face's `kv_b_proj`, old GGUF files' `attn_kv_b`:
    /// `heads * (nope + value)` rows of the latent), split as llama.cpp's converter splits
    /// it: each head's key part transposed to `latent x nope`, its value part `value x
    /// latent`. From a quantized file they are kept in Q8_0 on the CPU (their file type's
    /// blocks do not survive the transposition), else dense.
    fn latent_heads(&mut self, name: TensorName, kv_b: TensorName, heads: usize, (rows, cols): (usize, usize)) -> Result<Vec<Matrix>> {
        let TensorName::Layer(_, part @ (LayerTensor::KeyFromLatent | LayerTensor::ValueFromLatent)) = name else {
            return Err(Error::Unsupported(format!("`{}` split from the latent's projections", name.hf())));
        };
        let requantize = matches!(self.weights, Weights::Gguf { .. }) && self.compute == ComputePath::Native;
        let kv_b = self.dense(kv_b)?;
        let (all_rows, latent) = kv_b.dims2()?;
        let per_head = all_rows / heads.max(1);
        let (start, width, latent_expected) = match part {
            LayerTensor::KeyFromLatent => (0, cols, rows),
            _ => (per_head.saturating_sub(rows), rows, cols),
        };
        if per_head * heads != all_rows || width > per_head || latent != latent_expected {
            return Err(Error::InvalidModel(format!(
                "tensor `{}` has shape [{all_rows}, {latent}], not {heads} heads of keys and values over a latent \
                 of {latent_expected}",
                name.hf()
            )));
        }
        let heads_part = kv_b.reshape((heads, per_head, latent))?.narrow(1, start, width)?;
        let heads_part = match part {
            LayerTensor::KeyFromLatent => heads_part.transpose(1, 2)?,
            _ => heads_part,
        };
        (0..heads)
            .map(|h| {
                let matrix = heads_part.get(h)?.contiguous()?;
                if requantize && matrix.dim(1)?.is_multiple_of(32) {
                    // A fresh tensor: candle's quantizer reads a view's storage from its start.
                    let values = matrix.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                    let matrix = Tensor::from_vec(values, matrix.dims(), &Device::Cpu)?;
                    let quantized = QTensor::quantize(&matrix, GgmlDType::Q8_0)?;
                    return Ok(self.quantized_matrix(quantized)?);
                }
                Ok(Matrix::dense(matrix))
            })
            .collect()
    }

    /// A vector or matrix in the activation dtype (norms, biases).
    pub(crate) fn dense(&mut self, name: TensorName) -> Result<Tensor> {
        let dtype = activation_dtype(&self.device);
        match self.weights {
            Weights::Gguf { .. } if self.gguf_kind(name) == Some(TensorType::Mxfp4) => {
                let (info, bytes) = self.gguf_bytes(name)?;
                let values = crate::kernels::dequantize_mxfp4(&bytes);
                Ok(Tensor::from_vec(values, info.dims.clone(), &self.device)?.to_dtype(dtype)?)
            }
            Weights::Gguf { .. } => Ok(self.gguf_tensor(name)?.dequantize(&self.device)?.to_dtype(dtype)?),
            Weights::Safetensors { tensors } => {
                let hf_name = find_hf(tensors, name).unwrap_or_else(|| name.hf());
                let tensor = tensors
                    .load(&hf_name, &self.device)
                    .map_err(|e| Error::InvalidModel(format!("tensor `{hf_name}`: {e}")))?;
                // gpt-oss's gate and up biases share a tensor, taking turns.
                let tensor = match name {
                    TensorName::Layer(_, part @ (LayerTensor::GateExpertsBias | LayerTensor::UpExpertsBias)) => {
                        let (experts, both) = tensor.dims2()?;
                        let up = usize::from(part == LayerTensor::UpExpertsBias);
                        tensor.reshape((experts, both / 2, 2))?.narrow(2, up, 1)?.squeeze(2)?.contiguous()?
                    }
                    _ => tensor,
                };
                Ok(tensor.to_dtype(dtype)?)
            }
        }
    }

    /// An RMS norm's weight, as the norm multiplies by it.
    pub(crate) fn norm(&mut self, name: TensorName) -> Result<Tensor> {
        let weight = self.dense(name)?;
        Ok(if self.norms_add_one { (weight + 1.0)? } else { weight })
    }

    fn gguf_tensor(&mut self, name: TensorName) -> Result<QTensor> {
        let device = self.device.clone();
        self.gguf_tensor_on(name, &device)
    }

    fn gguf_tensor_on(&mut self, name: TensorName, device: &Device) -> Result<QTensor> {
        let (Weights::Gguf { header, .. }, Some(reader)) = (self.weights, self.reader.as_mut()) else {
            return Err(Error::InvalidModel("not a GGUF source".into()));
        };
        let gguf_name = name.gguf();
        header.qtensor(reader, &gguf_name, device).map_err(|e| Error::InvalidModel(format!("tensor `{gguf_name}`: {e}")))
    }

    /// The storage type of a GGUF tensor, if the file has it.
    fn gguf_kind(&self, name: TensorName) -> Option<TensorType> {
        match self.weights {
            Weights::Gguf { header, .. } => header.tensors.get(&name.gguf()).map(|info| info.kind),
            Weights::Safetensors { .. } => None,
        }
    }

    /// A GGUF tensor's entry and bytes, as the file stores them.
    fn gguf_bytes(&mut self, name: TensorName) -> Result<(TensorInfo, Vec<u8>)> {
        let (Weights::Gguf { header, .. }, Some(reader)) = (self.weights, self.reader.as_mut()) else {
            return Err(Error::InvalidModel("not a GGUF source".into()));
        };
        let (info, bytes) = header.tensor_bytes(reader, &name.gguf()).map_err(|e| Error::InvalidModel(e.to_string()))?;
        Ok((info.clone(), bytes))
    }
}

/// The error for a GGUF header Hearth cannot read: a tensor type it lacks (the IQ
/// quantizations, ternary ones) names the type and says what to do instead.
fn unreadable_gguf(path: &Path, error: GgufError) -> Error {
    match error {
        GgufError::UnknownType { .. } => Error::Unsupported(format!(
            "{}: {error}; it reads F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, MXFP4 and the K-quants \
             (Q2_K to Q6_K): use a file quantized to one of those (e.g. Q4_K_M)",
            path.display(),
        )),
        error => Error::InvalidModel(format!("{}: not a readable GGUF file: {error}", path.display())),
    }
}

/// A gpt-oss folder's stacked expert tensor of `kind` in `layer`: `part` is `_blocks`,
/// `_scales` or `_bias`, or empty for unquantized weights.
fn gpt_oss_experts(layer: usize, kind: ExpertTensor, part: &str) -> String {
    let stem = if kind == ExpertTensor::Down { "down_proj" } else { "gate_up_proj" };
    format!("model.layers.{layer}.mlp.experts.{stem}{part}")
}

fn check_dims(name: TensorName, dims: &[usize], expected: &[usize]) -> Result<()> {
    if dims != expected {
        return Err(Error::InvalidModel(format!("tensor {name:?} has shape {dims:?}, not {expected:?}")));
    }
    Ok(())
}

/// Refuses, with the reason and the fix, a GGUF file whose feed-forward tensors do not
/// match what its metadata says, instead of failing later on a missing tensor.
fn check_gguf_feed_forward(config: &ModelConfig, header: &GgufHeader) -> Result<()> {
    let has = |t: LayerTensor| header.tensors.contains_key(&TensorName::Layer(0, t).gguf());
    match &config.moe {
        Some(_) if !has(LayerTensor::GateExperts) && header.tensors.contains_key("blk.0.ffn_gate.0.weight") => {
            Err(Error::Unsupported(
                "experts stored one tensor each (`blk.N.ffn_gate.E.weight`, as old Mixtral conversions did); \
                 convert the model again with a current llama.cpp, which stacks them in `blk.N.ffn_gate_exps.weight`"
                    .into(),
            ))
        }
        None if !has(LayerTensor::Gate) && has(LayerTensor::Router) => Err(Error::InvalidModel(
            "the file holds a mixture of experts (`ffn_gate_inp`) but its metadata names no `expert_count`".into(),
        )),
        _ => Ok(()),
    }
}

/// The dtype hidden states and dense weights use on a device: f32 on CPU, where half
/// precision products are slow, and f16 on GPUs.
pub fn activation_dtype(device: &Device) -> DType {
    if device.is_cpu() {
        DType::F32
    } else {
        DType::F16
    }
}

/// The safetensors files of a Hugging Face folder: the shards named by
/// `model.safetensors.index.json`, else every `*.safetensors` file.
fn safetensors_shards(dir: &Path) -> Result<Vec<PathBuf>> {
    let index_path = dir.join("model.safetensors.index.json");
    if index_path.exists() {
        let text = std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
        let index: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::InvalidModel(format!("{}: {e}", index_path.display())))?;
        let weight_map = index
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::InvalidModel(format!("{} has no weight_map", index_path.display())))?;
        let files: BTreeSet<&str> = weight_map.values().filter_map(|v| v.as_str()).collect();
        return files
            .into_iter()
            .map(|file| {
                // Shard names come from a downloaded file: keep them inside the folder.
                if file.contains('/') || file.contains('\\') || file.starts_with('.') {
                    return Err(Error::InvalidModel(format!("shard name `{file}` escapes the folder")));
                }
                Ok(dir.join(file))
            })
            .collect();
    }
    let mut shards: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|ext| ext == "safetensors"))
        .collect();
    shards.sort();
    if shards.is_empty() {
        return Err(Error::InvalidModel(format!("{} holds no .safetensors files", dir.display())));
    }
    Ok(shards)
}

fn file_stem(path: &Path) -> String {
    path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into())
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use candle_core::quantized::gguf_file::{self, Value};

    use super::*;

    /// A GGUF file with two small tensors, and the given metadata.
    fn gguf(metadata: &[(&str, &Value)]) -> Vec<u8> {
        let a = QTensor::quantize(&Tensor::ones((2, 32), DType::F32, &Device::Cpu).unwrap(), GgmlDType::F32).unwrap();
        let b = QTensor::quantize(&Tensor::ones((4, 32), DType::F32, &Device::Cpu).unwrap(), GgmlDType::Q8_0).unwrap();
        let mut file = Cursor::new(Vec::new());
        gguf_file::write(&mut file, metadata, &[("a.weight", &a), ("b.weight", &b)]).unwrap();
        file.into_inner()
    }

    #[test]
    fn a_header_alone_gives_the_file_layout() {
        let file = gguf(&[("general.name", &Value::String("tiny".into()))]);
        let content = gguf_file::Content::read(&mut Cursor::new(&file)).unwrap();
        let header = &file[..content.tensor_data_offset as usize];
        let (layout, parsed) = FileLayout::from_gguf_header(header).unwrap();
        // The same as candle's reader finds.
        assert_eq!(parsed.data_offset, content.tensor_data_offset);
        for (name, info) in &content.tensor_infos {
            let ours = &parsed.tensors[name];
            assert_eq!((&ours.dims[..], ours.offset), (info.shape.dims(), info.offset), "{name}");
            assert_eq!(ours.kind, TensorType::Ggml(info.ggml_dtype), "{name}");
        }
        assert_eq!(parsed.tensors.len(), 2);
        assert_eq!(parsed.metadata["general.name"].to_string().unwrap(), "tiny");
        assert_eq!(layout.header_bytes, header.len() as u64);
        // 2 × 32 f32, then 4 blocks of 32 in Q8_0 (34 bytes each) at the next 32-byte boundary.
        let a = layout.tensors["a.weight"].clone();
        let b = layout.tensors["b.weight"].clone();
        assert_eq!((a.start, a.end - a.start), (layout.header_bytes, 256));
        assert_eq!((b.start, b.end - b.start), (layout.header_bytes + 256, 136));
        assert_eq!(layout.file_bytes, b.end);
        assert!(layout.file_bytes <= file.len() as u64);
    }

    #[test]
    fn malformed_headers_are_refused_without_panicking() {
        let file = gguf(&[]);
        let content = gguf_file::Content::read(&mut Cursor::new(&file)).unwrap();
        let header = &file[..content.tensor_data_offset as usize];
        let mut cases: Vec<(&str, Vec<u8>)> = vec![
            ("nothing", Vec::new()),
            ("not GGUF", b"GGML and then some".to_vec()),
            ("cut short", header[..header.len() - 1].to_vec()),
            ("with data after it", file.clone()),
        ];
        // Claims more entries than the bytes could hold.
        let mut counts = header.to_vec();
        counts[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        cases.push(("absurd counts", counts));
        // An alignment of 0 would divide by zero in the parser.
        let zero = gguf(&[("general.alignment", &Value::U32(0))]);
        cases.push(("alignment 0", zero[..zero.len().min(4096)].to_vec()));
        for (what, bytes) in cases {
            assert!(FileLayout::from_gguf_header(&bytes).is_err(), "{what}");
        }
    }
}

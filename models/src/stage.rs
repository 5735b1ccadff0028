//! A pipeline stage: a contiguous range of decoder blocks, with the token embedding if it
//! is the first stage and the final norm and LM head if it is the last.
//!
//! On the CPU a stage runs its own fused operations (`kernels::ops`, `kernels::attention`)
//! over buffers it reuses, with an f16 KV cache appended in place: they compute what
//! llama.cpp's CPU backend computes, bit for bit, so that greedy decoding follows its
//! reference outputs. Other devices run candle's operations ([`ComputePath`]), which the
//! CPU can run too, so that tests cover the path Metal and CUDA take.
//!
//! Every layer's attention is grouped-query attention, or DeepSeek's latent attention
//! (`crate::latent_attention`); every layer's feed-forward is dense, or a mixture of
//! experts (`crate::moe`). Gemma 3's differences are options of the same block: a scaled
//! embedding, queries scaled before attention instead of scores after it, sliding-window
//! attention with a RoPE base of its own on some layers, norms after attention and after
//! the feed-forward, and GeGLU for SwiGLU.

use std::cell::RefCell;
use std::ops::Range;

use candle_core::{DType, Device, Storage, Tensor};
use candle_nn::kv_cache::KvCache;

use crate::config::{Activation, Architecture, ModelConfig, RopeLayout, RopeScaling};
use crate::kernels::attention::{self, Heads};
use crate::kernels::ops::{self, RopePairs};
use crate::kernels::Matrix;
use crate::latent_attention::{self, LatentAttention};
use crate::moe::{self, Experts};
use crate::source::{activation_dtype, LayerTensor, TensorLoader, TensorName};
use crate::{Error, Result};

/// KV caches grow in steps of this many positions, so short requests stay small and long
/// ones copy their cache only every so often.
const KV_CACHE_STEP: usize = 256;

/// Which code runs a stage's arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ComputePath {
    /// This crate's CPU kernels, which compute what llama.cpp's CPU backend computes.
    Native,
    /// candle's operations: the path of Metal and CUDA, and of the CPU when asked for
    /// (`ModelSource::set_compute_path`), so that tests run it.
    CandleOps,
}

impl ComputePath {
    /// The path a device takes unless told otherwise.
    pub fn of_device(device: &Device) -> Self {
        if device.is_cpu() {
            Self::Native
        } else {
            Self::CandleOps
        }
    }
}

/// What flows into a stage.
pub enum StageInput<'a> {
    /// Token ids: only the first stage takes these.
    Tokens(&'a [u32]),
    /// Hidden states of shape `(positions, hidden_size)` from the previous stage.
    Hidden(&'a Tensor),
}

/// What flows out of a stage.
#[derive(Debug)]
pub enum StageOutput {
    /// Hidden states of shape `(positions, hidden_size)` for the next stage.
    Hidden(Tensor),
    /// Logits over the vocabulary for the last position: only the last stage returns these.
    Logits(Tensor),
}

/// The KV cache of one sequence in one stage. A sequence's cache never mixes with another's.
#[derive(Debug, Clone)]
pub struct StageCache {
    layers: Vec<LayerCache>,
    positions: usize,
}

/// One layer's keys and values: f16 rows on the CPU, candle tensors elsewhere (for latent
/// attention, one row per position that serves as both).
#[derive(Debug, Clone)]
enum LayerCache {
    Native(attention::KvCache),
    Candle(KvCache),
    CandleLatent(candle_nn::kv_cache::Cache),
    CandleSliding(SlidingCache),
}

/// A sliding layer's keys and values on candle's path: only the positions a later query
/// may still see, so that it holds at most its window.
#[derive(Debug, Clone, Default)]
struct SlidingCache {
    /// `(1, kv_heads, positions, head_dim)` each, from position `first` on.
    kv: Option<(Tensor, Tensor)>,
    first: usize,
}

impl StageCache {
    /// Positions already processed: the position the next input starts at.
    pub fn positions(&self) -> usize {
        self.positions
    }
}

/// A contiguous range of a model's layers, loaded and ready to run.
pub struct Stage {
    config: ModelConfig,
    layers: Range<usize>,
    embedding: Option<Matrix>,
    blocks: Vec<Block>,
    head: Option<Head>,
    rope: StageRope,
    /// The sliding layers' RoPE, if the stage has any (its own base, unscaled).
    sliding_rope: Option<StageRope>,
    device: Device,
    dtype: DType,
}

/// The rotary embedding of whichever path the stage runs.
enum StageRope {
    Native(ops::Rope),
    Candle(Rope),
}

impl Stage {
    /// Loads the stage of `layers`, taking over from `previous` (a stage of the same model
    /// on the same device) whatever it already holds: its layers in the range, its
    /// embedding, its head. The rest of `previous` is dropped before anything new loads, so
    /// memory holds at most the new stage.
    pub(crate) fn load(
        config: &ModelConfig,
        layers: Range<usize>,
        loader: &mut TensorLoader<'_>,
        previous: Option<Stage>,
    ) -> Result<Self> {
        let device = loader.device().clone();
        let compute = loader.compute();
        let is_first = layers.start == 0;
        let is_last = layers.end == config.num_layers;
        let (mut kept, kept_embedding, kept_head) = match previous {
            Some(previous)
                if previous.device.same_device(&device) && previous.config == *config && previous.compute() == compute =>
            {
                let kept: std::collections::HashMap<usize, Block> =
                    previous.layers.zip(previous.blocks).filter(|(i, _)| layers.contains(i)).collect();
                (kept, previous.embedding.filter(|_| is_first), previous.head.filter(|_| is_last))
            }
            _ => Default::default(),
        };
        let embedding = match kept_embedding {
            Some(embedding) => Some(embedding),
            None if is_first => Some(loader.matrix(TensorName::TokenEmbedding)?),
            None => None,
        };
        let blocks = layers
            .clone()
            .map(|i| kept.remove(&i).map_or_else(|| Block::load(config, i, loader), Ok))
            .collect::<Result<Vec<_>>>()?;
        let head = if let Some(head) = kept_head {
            Some(head)
        } else if is_last {
            let output = match (&embedding, config.tied_embeddings) {
                (Some(embedding), true) => embedding.clone(),
                (None, true) => loader.matrix(TensorName::TokenEmbedding)?,
                (_, false) => loader.matrix(TensorName::Output)?,
            };
            Some(Head {
                norm: RmsNorm::new(loader.norm(TensorName::OutputNorm)?, config.rms_norm_eps)?,
                output,
            })
        } else {
            None
        };
        let rope = match (compute, config.latent_attention.is_some()) {
            (ComputePath::Native, false) => StageRope::Native(native_rope(config)?),
            (ComputePath::Native, true) => StageRope::Native(latent_attention::native_rope(config)?),
            (ComputePath::CandleOps, false) => StageRope::Candle(Rope::new(config, &device)?),
            (ComputePath::CandleOps, true) => StageRope::Candle(Rope::latent(config, &device)?),
        };
        let sliding_rope = match sliding_rope_config(config) {
            Some(sliding) if layers.clone().any(|i| config.attention_window(i).is_some()) => Some(match compute {
                ComputePath::Native => StageRope::Native(native_rope(&sliding)?),
                ComputePath::CandleOps => StageRope::Candle(Rope::new(&sliding, &device)?),
            }),
            _ => None,
        };
        Ok(Self {
            rope,
            sliding_rope,
            config: config.clone(),
            layers,
            embedding,
            blocks,
            head,
            dtype: activation_dtype(&device),
            device,
        })
    }

    pub fn layers(&self) -> Range<usize> {
        self.layers.clone()
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn compute(&self) -> ComputePath {
        match self.rope {
            StageRope::Native(_) => ComputePath::Native,
            StageRope::Candle(_) => ComputePath::CandleOps,
        }
    }

    /// The dtype of hidden states this stage takes and gives.
    pub fn activation_dtype(&self) -> DType {
        self.dtype
    }

    pub fn is_first(&self) -> bool {
        self.embedding.is_some()
    }

    pub fn is_last(&self) -> bool {
        self.head.is_some()
    }

    /// An empty cache for a new sequence.
    pub fn new_cache(&self) -> StageCache {
        let latent = self.config.latent_attention.is_some();
        let width = self.config.num_kv_heads * self.config.head_dim;
        let layer = |i: usize| match (&self.rope, latent, self.config.attention_window(i)) {
            (StageRope::Native(_), false, Some(window)) => {
                LayerCache::Native(attention::KvCache::sliding(width, KV_CACHE_STEP, window))
            }
            (StageRope::Candle(_), false, Some(_)) => LayerCache::CandleSliding(SlidingCache::default()),
            (StageRope::Native(_), false, None) => LayerCache::Native(attention::KvCache::new(width, KV_CACHE_STEP)),
            (StageRope::Native(_), true, _) => {
                LayerCache::Native(attention::KvCache::latent(self.config.head_dim, KV_CACHE_STEP))
            }
            (StageRope::Candle(_), false, None) => LayerCache::Candle(KvCache::new(2, KV_CACHE_STEP)),
            (StageRope::Candle(_), true, _) => {
                LayerCache::CandleLatent(candle_nn::kv_cache::Cache::new(2, KV_CACHE_STEP))
            }
        };
        StageCache { layers: self.layers.clone().map(layer).collect(), positions: 0 }
    }

    /// Runs new positions of one sequence through this stage's layers, appending to `cache`.
    pub fn forward(&self, input: StageInput<'_>, cache: &mut StageCache) -> Result<StageOutput> {
        if cache.layers.len() != self.blocks.len() {
            return Err(Error::InvalidInput("the cache belongs to another stage".into()));
        }
        if let StageRope::Native(rope) = &self.rope {
            return self.forward_native(input, cache, rope);
        }
        let hidden = self.input_hidden(input)?;
        let seq_len = hidden.dim(1)?;
        let start = cache.positions;
        self.check_positions(start, seq_len)?;
        let mask = causal_mask(seq_len, start, &self.device, self.dtype)?;
        let StageRope::Candle(rope) = &self.rope else { unreachable!("the native path returned above") };
        let sliding_rope = match &self.sliding_rope {
            Some(StageRope::Candle(rope)) => Some(rope),
            _ => None,
        };
        let mut hidden = hidden;
        for (block, kv) in self.blocks.iter().zip(cache.layers.iter_mut()) {
            let rope = match (block.window(), sliding_rope) {
                (Some(_), Some(sliding)) => sliding,
                _ => rope,
            };
            hidden = block.forward(&hidden, start, mask.as_ref(), rope, kv)?;
        }
        cache.positions += seq_len;
        match &self.head {
            None => Ok(StageOutput::Hidden(hidden.squeeze(0)?)),
            Some(head) => {
                let last = hidden.narrow(1, seq_len - 1, 1)?;
                let logits = head.output.forward(&head.norm.forward(&last)?)?;
                let logits = match self.config.final_logit_softcap {
                    Some(cap) => ((logits / cap as f64)?.tanh()? * cap as f64)?,
                    None => logits,
                };
                Ok(StageOutput::Logits(logits.flatten_all()?.to_dtype(DType::F32)?))
            }
        }
    }

    fn check_positions(&self, start: usize, seq_len: usize) -> Result<()> {
        if seq_len == 0 {
            return Err(Error::InvalidInput("no positions to run".into()));
        }
        if start + seq_len > self.config.context_length {
            return Err(Error::InvalidInput(format!(
                "position {} is past the context of {} tokens",
                start + seq_len,
                self.config.context_length
            )));
        }
        Ok(())
    }

    /// Checks that `input` is what this stage takes.
    fn check_input(&self, input: &StageInput<'_>) -> Result<()> {
        match (input, &self.embedding) {
            (StageInput::Tokens(tokens), Some(_)) => {
                let vocab = self.config.vocab_size;
                if let Some(bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
                    return Err(Error::InvalidInput(format!("token id {bad} is outside the vocabulary of {vocab}")));
                }
                Ok(())
            }
            (StageInput::Hidden(hidden), None) => {
                let (_, width) = hidden.dims2().map_err(|_| {
                    Error::InvalidInput(format!("hidden states must be 2-D, got shape {:?}", hidden.dims()))
                })?;
                if width != self.config.hidden_size {
                    return Err(Error::InvalidInput(format!(
                        "hidden states are {width} wide; this model's are {}",
                        self.config.hidden_size
                    )));
                }
                Ok(())
            }
            (StageInput::Tokens(_), None) => Err(Error::InvalidInput(format!(
                "stage {}..{} takes hidden states, not tokens",
                self.layers.start, self.layers.end
            ))),
            (StageInput::Hidden(_), Some(_)) => {
                Err(Error::InvalidInput("the first stage takes tokens, not hidden states".into()))
            }
        }
    }

    /// Turns the input into hidden states of shape `(1, positions, hidden)`, checking that it
    /// is what this stage expects.
    fn input_hidden(&self, input: StageInput<'_>) -> Result<Tensor> {
        self.check_input(&input)?;
        match (input, &self.embedding) {
            (StageInput::Tokens(tokens), Some(embedding)) => {
                let ids = Tensor::new(tokens, &self.device)?;
                let embedded = embedding.embedding(&ids)?;
                // Scaled in f32 (as llama.cpp scales it) before any rounding to f16.
                let embedded = match self.config.embedding_scale {
                    Some(scale) => (embedded.to_dtype(DType::F32)? * scale as f64)?,
                    None => embedded,
                };
                Ok(embedded.to_dtype(self.dtype)?.unsqueeze(0)?)
            }
            (StageInput::Hidden(hidden), _) => {
                Ok(hidden.to_device(&self.device)?.to_dtype(self.dtype)?.unsqueeze(0)?)
            }
            (StageInput::Tokens(_), None) => unreachable!("checked above"),
        }
    }

    /// The CPU path: this module's fused operations over reused buffers (see the module's
    /// documentation).
    fn forward_native(&self, input: StageInput<'_>, cache: &mut StageCache, rope: &ops::Rope) -> Result<StageOutput> {
        self.check_input(&input)?;
        let seq_len = match &input {
            StageInput::Tokens(tokens) => tokens.len(),
            StageInput::Hidden(hidden) => hidden.dim(0)?,
        };
        let start = cache.positions;
        self.check_positions(start, seq_len)?;
        for layer in &cache.layers {
            let LayerCache::Native(kv) = layer else {
                return Err(Error::InvalidInput("the cache belongs to a stage on another device".into()));
            };
            if kv.len() != start {
                return Err(Error::InvalidInput("the cache was left inconsistent by a failed step".into()));
            }
        }
        let result = SCRATCH.with_borrow_mut(|scratch| -> Result<StageOutput> {
            let hidden = &mut scratch.hidden;
            hidden.clear();
            match (&input, &self.embedding) {
                (StageInput::Tokens(tokens), Some(embedding)) => {
                    embedding.embedding_into(tokens, hidden)?;
                    if let Some(scale) = self.config.embedding_scale {
                        hidden.iter_mut().for_each(|x| *x *= scale);
                    }
                }
                (StageInput::Hidden(input), _) => extend_from_tensor(hidden, input)?,
                (StageInput::Tokens(_), None) => unreachable!("checked above"),
            }
            let d = self.config.head_dim;
            let positions_angles = |rope: &ops::Rope, out: &mut Vec<f32>| {
                out.resize(seq_len * rope.angles_len(), 0.0);
                for (t, angles) in out.chunks_exact_mut(rope.angles_len()).enumerate() {
                    rope.angles(start + t, angles);
                }
            };
            positions_angles(rope, &mut scratch.angles);
            if let Some(StageRope::Native(sliding)) = &self.sliding_rope {
                positions_angles(sliding, &mut scratch.sliding_angles);
            }
            let heads = Heads::new(self.config.num_heads, self.config.num_kv_heads, d);
            let last_block = self.blocks.len() - 1;
            let mut rows = seq_len;
            for (i, (block, layer)) in self.blocks.iter().zip(cache.layers.iter_mut()).enumerate() {
                let LayerCache::Native(kv) = layer else { unreachable!("checked above") };
                // The model's last layer feeds only the head, which reads only the last
                // position: llama.cpp drops the other rows after attention, and so do we.
                let last_only = self.head.is_some() && i == last_block;
                let rope = match (block.window(), &self.sliding_rope) {
                    (Some(_), Some(StageRope::Native(sliding))) => sliding,
                    _ => rope,
                };
                rows = block.forward_native(&heads, rope, start, seq_len, last_only, kv, scratch)?;
            }
            let width = self.config.hidden_size;
            match &self.head {
                None => {
                    let hidden = &scratch.hidden[..rows * width];
                    Ok(StageOutput::Hidden(Tensor::from_slice(hidden, (rows, width), &Device::Cpu)?))
                }
                Some(head) => {
                    let last = &scratch.hidden[(rows - 1) * width..rows * width];
                    scratch.normed.resize(width, 0.0);
                    ops::rms_norm(last, &head.norm.values, head.norm.eps, &mut scratch.normed);
                    let mut logits = Vec::new();
                    head.output.forward_into(&scratch.normed, 1, &mut logits)?;
                    if let Some(cap) = self.config.final_logit_softcap {
                        // As ggml: scale, tanh, scale.
                        logits.iter_mut().for_each(|x| *x = (*x * (1.0 / cap)).tanh() * cap);
                    }
                    Ok(StageOutput::Logits(Tensor::from_vec(logits, self.config.vocab_size, &Device::Cpu)?))
                }
            }
        });
        if seq_len > 1 {
            // A long prompt's buffers are not kept for the steps that follow.
            SCRATCH.with_borrow_mut(Scratch::release_if_large);
            crate::kernels::release_large_buffers();
        }
        match result {
            Ok(output) => {
                cache.positions += seq_len;
                for layer in cache.layers.iter_mut() {
                    if let LayerCache::Native(kv) = layer {
                        kv.forget_unseen();
                    }
                }
                Ok(output)
            }
            Err(e) => {
                // Leave the cache as it was, so the sequence can go on or be retried.
                for layer in cache.layers.iter_mut() {
                    if let LayerCache::Native(kv) = layer {
                        kv.truncate(start);
                    }
                }
                Err(e)
            }
        }
    }
}

thread_local! {
    /// The CPU path's buffers, reused from step to step.
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Buffers larger than this many values are dropped after a step: one long prompt should
/// not pin its buffers for the life of the thread.
const KEEP_VALUES: usize = 1 << 18;

/// Buffers for one step of the CPU path, each `positions` rows of some width.
#[derive(Default)]
struct Scratch {
    /// The residual stream.
    hidden: Vec<f32>,
    normed: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attended: Vec<f32>,
    projected: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    /// RoPE's cos and sin for each position, and the sliding layers' own.
    angles: Vec<f32>,
    sliding_angles: Vec<f32>,
    attention: attention::Scratch,
    latent: latent_attention::Scratch,
    experts: moe::Scratch,
}

impl Scratch {
    fn release_if_large(&mut self) {
        let buffers = [
            &mut self.hidden,
            &mut self.normed,
            &mut self.q,
            &mut self.k,
            &mut self.v,
            &mut self.attended,
            &mut self.projected,
            &mut self.gate,
            &mut self.up,
            &mut self.angles,
            &mut self.sliding_angles,
        ];
        for buffer in buffers {
            if buffer.capacity() > KEEP_VALUES {
                *buffer = Vec::new();
            }
        }
        self.experts.release_if_large(KEEP_VALUES);
        self.latent.release_if_large(KEEP_VALUES);
    }
}

/// RoPE for the CPU path, with the model's frequency scaling.
fn native_rope(config: &ModelConfig) -> Result<ops::Rope> {
    let d = config.head_dim;
    let pairs = match config.rope_layout {
        RopeLayout::Interleaved => RopePairs::Adjacent,
        RopeLayout::Halves => RopePairs::Halves,
    };
    let (freq_scale, factors) = match &config.rope_scaling {
        RopeScaling::None => (1.0, None),
        RopeScaling::Linear { factor } => (1.0 / factor, None),
        RopeScaling::FrequencyFactors(factors) => {
            if factors.len() != d / 2 {
                return Err(Error::InvalidModel(format!(
                    "rope_freqs has {} factors for {} frequencies",
                    factors.len(),
                    d / 2
                )));
            }
            (1.0, Some(factors.clone()))
        }
        RopeScaling::Yarn { original_context, beta_fast, beta_slow, exact_range, .. } => {
            let yarn = latent_attention::YarnFactors::of(config).expect("YaRN scaling has YaRN factors");
            let betas = [*beta_fast, *beta_slow];
            let corr_dims = ops::Yarn::corr_dims(d, *original_context, config.rope_theta, betas, *exact_range);
            let rope = ops::Rope::new(d, config.rope_theta, pairs, yarn.freq_scale, None);
            return Ok(rope.with_yarn(ops::Yarn { ext_factor: 1.0, attn_factor: yarn.attn_factor, corr_dims }));
        }
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_context } => {
            let (factor, low, high) = (*factor as f64, *low_freq_factor as f64, *high_freq_factor as f64);
            let original = *original_context as f64;
            let factors = (0..d / 2)
                .map(|i| {
                    let frequency = 1.0 / (config.rope_theta as f64).powf(2.0 * i as f64 / d as f64);
                    let wavelength = 2.0 * std::f64::consts::PI / frequency;
                    if wavelength < original / high {
                        1.0
                    } else if wavelength > original / low {
                        factor as f32
                    } else {
                        let smooth = (original / wavelength - low) / (high - low);
                        (1.0 / ((1.0 - smooth) / factor + smooth)) as f32
                    }
                })
                .collect();
            (1.0, Some(factors))
        }
    };
    Ok(ops::Rope::new(d, config.rope_theta, pairs, freq_scale, factors))
}

struct Head {
    norm: RmsNorm,
    output: Matrix,
}

pub(crate) struct RmsNorm {
    weight: Tensor,
    /// The weight's values, for the CPU path (empty on other devices).
    pub(crate) values: Vec<f32>,
    pub(crate) eps: f32,
}

impl RmsNorm {
    pub(crate) fn new(weight: Tensor, eps: f64) -> Result<Self> {
        let values = cpu_values(&weight)?;
        Ok(Self { weight, values, eps: eps as f32 })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps)?)
    }
}

/// A projection with an optional bias (Qwen2 has them on q, k and v).
struct Linear {
    weight: Matrix,
    bias: Option<Tensor>,
    /// The bias's values, for the CPU path.
    bias_values: Vec<f32>,
}

impl Linear {
    fn load(loader: &mut TensorLoader<'_>, weight: TensorName, bias: Option<TensorName>) -> Result<Self> {
        let bias = bias.map(|b| loader.dense(b)).transpose()?;
        let bias_values = match &bias {
            Some(bias) => cpu_values(bias)?,
            None => Vec::new(),
        };
        Ok(Self { weight: loader.matrix(weight)?, bias, bias_values })
    }

    /// The CPU path: `m` rows of `x` into `out`, bias added as ggml adds it.
    fn forward_native(&self, x: &[f32], m: usize, out: &mut Vec<f32>) -> Result<()> {
        self.weight.forward_into(x, m, out)?;
        if self.bias.is_some() {
            ops::add_rows(out, &self.bias_values);
        }
        Ok(())
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.weight.forward(x)?;
        Ok(match &self.bias {
            Some(bias) => y.broadcast_add(bias)?,
            None => y,
        })
    }
}

/// A block's feed-forward: SwiGLU or GeGLU, or a mixture of SwiGLU experts.
enum FeedForward {
    Dense { gate: Linear, up: Linear, down: Linear, activation: Activation },
    Experts(Experts),
}

/// A block's attention: grouped-query heads, or DeepSeek's latent attention.
enum Attention {
    Grouped(GroupedAttention),
    Latent(LatentAttention),
}

/// Grouped-query attention (multi-head when there are as many KV heads as heads).
struct GroupedAttention {
    query: Linear,
    key: Linear,
    value: Linear,
    query_norm: Option<RmsNorm>,
    key_norm: Option<RmsNorm>,
    output: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    /// What queries are multiplied by after RoPE, when scores are not scaled instead (Gemma).
    query_scale: Option<f32>,
    /// The positions each query sees, its own included, on a sliding layer.
    window: Option<usize>,
    /// Whether this sliding layer's RoPE has a base of its own (Gemma's), not the full
    /// layers' (gpt-oss's).
    own_rope: bool,
    /// Each head's sink logit (gpt-oss), for the CPU path and for candle's (as a
    /// `(1, kv_heads, group, 1, 1)` tensor).
    sinks: Option<(std::sync::Arc<[f32]>, Tensor)>,
}

struct Block {
    attention_norm: RmsNorm,
    attention: Attention,
    /// Gemma's norm of the attention's output, before the residual add.
    post_attention_norm: Option<RmsNorm>,
    feed_forward_norm: RmsNorm,
    feed_forward: FeedForward,
    /// Gemma's norm of the feed-forward's output, before the residual add.
    post_feed_forward_norm: Option<RmsNorm>,
}

impl Block {
    fn load(config: &ModelConfig, layer: usize, loader: &mut TensorLoader<'_>) -> Result<Self> {
        let name = |t| TensorName::Layer(layer, t);
        let eps = config.rms_norm_eps;
        let attention_norm = RmsNorm::new(loader.norm(name(LayerTensor::AttentionNorm))?, eps)?;
        // gpt-oss's GGUF files name the feed-forward's norm as Gemma names its norm after attention.
        let feed_forward_norm_name = match config.architecture {
            Architecture::GptOss if loader.contains(name(LayerTensor::PostAttentionNorm)) => LayerTensor::PostAttentionNorm,
            _ => LayerTensor::FeedForwardNorm,
        };
        let feed_forward_norm = RmsNorm::new(loader.norm(name(feed_forward_norm_name))?, eps)?;
        let post_norm = |loader: &mut TensorLoader<'_>, t| -> Result<Option<RmsNorm>> {
            config.post_norms.then(|| RmsNorm::new(loader.norm(name(t))?, eps)).transpose()
        };
        let post_attention_norm = post_norm(loader, LayerTensor::PostAttentionNorm)?;
        let post_feed_forward_norm = post_norm(loader, LayerTensor::PostFeedForwardNorm)?;
        let attention = match config.latent_attention {
            Some(_) => Attention::Latent(LatentAttention::load(config, layer, loader)?),
            None => Attention::Grouped(GroupedAttention::load(config, layer, loader)?),
        };
        let feed_forward = match &config.moe {
            Some(moe) if moe.has_experts(layer) => {
                FeedForward::Experts(Experts::load(moe, config.activation, config.hidden_size, layer, loader)?)
            }
            _ => FeedForward::Dense {
                gate: Linear::load(loader, name(LayerTensor::Gate), None)?,
                up: Linear::load(loader, name(LayerTensor::Up), None)?,
                down: Linear::load(loader, name(LayerTensor::Down), None)?,
                activation: config.activation,
            },
        };
        Ok(Self {
            attention_norm,
            attention,
            post_attention_norm,
            feed_forward_norm,
            feed_forward,
            post_feed_forward_norm,
        })
    }

    /// The positions each query sees on this layer if it slides.
    fn window(&self) -> Option<usize> {
        match &self.attention {
            Attention::Grouped(attention) => attention.window,
            Attention::Latent(_) => None,
        }
    }

    /// The CPU path, on `scratch.hidden` (`positions` rows starting at position `start`,
    /// appended to `kv`); with `last_only`, the output is the last row alone. Returns the
    /// rows of `scratch.hidden` after this block.
    #[allow(clippy::too_many_arguments)]
    fn forward_native(
        &self,
        heads: &Heads,
        rope: &ops::Rope,
        start: usize,
        positions: usize,
        last_only: bool,
        kv: &mut attention::KvCache,
        s: &mut Scratch,
    ) -> Result<usize> {
        let width = s.hidden.len() / positions;
        s.normed.resize(s.hidden.len(), 0.0);
        ops::rms_norm(&s.hidden, &self.attention_norm.values, self.attention_norm.eps, &mut s.normed);
        let rows = if last_only { positions - 1..positions } else { 0..positions };
        let kept = rows.len();
        match &self.attention {
            Attention::Grouped(attention) => attention.forward_native(heads, rope, start, positions, rows.clone(), kv, s)?,
            Attention::Latent(attention) => attention.forward_native(
                &s.normed,
                positions,
                rows.clone(),
                rope,
                &s.angles,
                kv,
                &mut s.projected,
                &mut s.latent,
            )?,
        }
        debug_assert_eq!(kv.len(), start + positions);
        if last_only {
            s.hidden.copy_within(rows.start * width.., 0);
            s.hidden.truncate(kept * width);
        }
        if let Some(norm) = &self.post_attention_norm {
            ops::rms_norm_in_place(&mut s.projected, &norm.values, norm.eps);
        }
        ops::add_assign(&mut s.hidden, &s.projected);

        s.normed.resize(s.hidden.len(), 0.0);
        ops::rms_norm(&s.hidden, &self.feed_forward_norm.values, self.feed_forward_norm.eps, &mut s.normed);
        match &self.feed_forward {
            FeedForward::Dense { gate, up, down, activation } => {
                gate.forward_native(&s.normed, kept, &mut s.gate)?;
                up.forward_native(&s.normed, kept, &mut s.up)?;
                let ffn = s.gate.len() / kept;
                match activation {
                    Activation::Silu => ops::silu_mul(&mut s.gate, &s.up, ffn),
                    Activation::GeluTanh => ops::gelu_mul(&mut s.gate, &s.up),
                    Activation::ClampedSwiglu => ops::clamped_swiglu_mul(&mut s.gate, &s.up),
                }
                down.forward_native(&s.gate, kept, &mut s.projected)?;
            }
            FeedForward::Experts(experts) => experts.forward_native(&s.normed, kept, &mut s.projected, &mut s.experts)?,
        }
        if let Some(norm) = &self.post_feed_forward_norm {
            ops::rms_norm_in_place(&mut s.projected, &norm.values, norm.eps);
        }
        ops::add_assign(&mut s.hidden, &s.projected);
        Ok(kept)
    }

    /// `x` is `(1, positions, hidden)`; `start` is the absolute position of its first row.
    fn forward(&self, x: &Tensor, start: usize, mask: Option<&Tensor>, rope: &Rope, kv: &mut LayerCache) -> Result<Tensor> {
        let normed = self.attention_norm.forward(x)?;
        let attended = match (&self.attention, kv) {
            (Attention::Grouped(attention), LayerCache::Candle(kv)) => attention.forward(&normed, start, mask, rope, kv)?,
            (Attention::Grouped(attention), LayerCache::CandleSliding(cache)) => {
                attention.forward_sliding(&normed, start, rope, cache)?
            }
            (Attention::Latent(attention), LayerCache::CandleLatent(cache)) => {
                let seq_len = x.dim(1)?;
                let cos = rope.cos.narrow(0, start, seq_len)?;
                let sin = rope.sin.narrow(0, start, seq_len)?;
                attention.forward(&normed, mask, &cos, &sin, cache)?
            }
            _ => return Err(Error::InvalidInput("the cache belongs to a stage on another device".into())),
        };
        let attended = match &self.post_attention_norm {
            Some(norm) => norm.forward(&attended)?,
            None => attended,
        };
        let x = (x + attended)?;
        let h = self.feed_forward_norm.forward(&x)?;
        let mixed = match &self.feed_forward {
            FeedForward::Dense { gate, up, down, activation } => {
                let (gate, up) = (gate.forward(&h)?, up.forward(&h)?);
                let gated = match activation {
                    Activation::Silu => (candle_nn::ops::silu(&gate)? * up)?,
                    // candle's `gelu` is the tanh approximation.
                    Activation::GeluTanh => (gate.gelu()? * up)?,
                    Activation::ClampedSwiglu => moe::clamped_swiglu(&gate, &up)?,
                };
                down.forward(&gated)?
            }
            FeedForward::Experts(experts) => experts.forward(&h)?,
        };
        let mixed = match &self.post_feed_forward_norm {
            Some(norm) => norm.forward(&mixed)?,
            None => mixed,
        };
        Ok((x + mixed)?)
    }
}

impl GroupedAttention {
    fn load(config: &ModelConfig, layer: usize, loader: &mut TensorLoader<'_>) -> Result<Self> {
        let name = |t| TensorName::Layer(layer, t);
        let eps = config.rms_norm_eps;
        let bias = |t: LayerTensor| config.qkv_bias.then(|| name(t));
        let (query_norm, key_norm) = if config.qk_norm {
            (
                Some(RmsNorm::new(loader.norm(name(LayerTensor::QueryNorm))?, eps)?),
                Some(RmsNorm::new(loader.norm(name(LayerTensor::KeyNorm))?, eps)?),
            )
        } else {
            (None, None)
        };
        if config.qkv_bias && !loader.contains(name(LayerTensor::QueryBias)) {
            return Err(Error::InvalidModel(format!("layer {layer} lacks the q/k/v biases its architecture needs")));
        }
        let sinks = if config.attention_sinks {
            let sinks = loader.dense(name(LayerTensor::AttentionSinks))?;
            let values = sinks.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            if values.len() != config.num_heads {
                return Err(Error::InvalidModel(format!(
                    "layer {layer}: {} attention sinks for {} heads",
                    values.len(),
                    config.num_heads
                )));
            }
            let group = config.num_heads / config.num_kv_heads.max(1);
            let tensor = sinks.reshape((1, config.num_kv_heads, group, 1, 1))?.to_dtype(activation_dtype(loader.device()))?;
            Some((std::sync::Arc::from(values), tensor))
        } else {
            None
        };
        let output_bias = config.output_bias.then(|| name(LayerTensor::AttentionOutputBias));
        let window = config.attention_window(layer);
        Ok(Self {
            query: Linear::load(loader, name(LayerTensor::Query), bias(LayerTensor::QueryBias))?,
            key: Linear::load(loader, name(LayerTensor::Key), bias(LayerTensor::KeyBias))?,
            value: Linear::load(loader, name(LayerTensor::Value), bias(LayerTensor::ValueBias))?,
            query_norm,
            key_norm,
            output: Linear::load(loader, name(LayerTensor::AttentionOutput), output_bias)?,
            num_heads: config.num_heads,
            num_kv_heads: config.num_kv_heads,
            head_dim: config.head_dim,
            query_scale: config.query_scale,
            window,
            own_rope: window.is_some() && sliding_rope_config(config).is_some(),
            sinks,
        })
    }

    /// The CPU path: attention over `s.normed` (`positions` rows from `start`, appended to
    /// `kv`), the output of batch rows `rows` into `s.projected`.
    #[allow(clippy::too_many_arguments)]
    fn forward_native(
        &self,
        heads: &Heads,
        rope: &ops::Rope,
        start: usize,
        positions: usize,
        rows: Range<usize>,
        kv: &mut attention::KvCache,
        s: &mut Scratch,
    ) -> Result<()> {
        self.query.forward_native(&s.normed, positions, &mut s.q)?;
        self.key.forward_native(&s.normed, positions, &mut s.k)?;
        self.value.forward_native(&s.normed, positions, &mut s.v)?;
        if let (Some(qn), Some(kn)) = (&self.query_norm, &self.key_norm) {
            ops::rms_norm_in_place(&mut s.q, &qn.values, qn.eps);
            ops::rms_norm_in_place(&mut s.k, &kn.values, kn.eps);
        }
        // A sliding layer's angles may be of its own base.
        let all_angles = if self.own_rope { &s.sliding_angles } else { &s.angles };
        let angles_len = rope.angles_len();
        for (t, angles) in all_angles.chunks_exact(angles_len).enumerate() {
            rope.rotate(&mut s.q[t * heads.q_width()..(t + 1) * heads.q_width()], angles);
            rope.rotate(&mut s.k[t * heads.kv_width()..(t + 1) * heads.kv_width()], angles);
        }
        kv.append(&s.k, &s.v);
        debug_assert_eq!(kv.len(), start + positions);

        let kept = rows.len();
        s.attended.resize(kept * heads.q_width(), 0.0);
        let scale = match self.query_scale {
            // As ggml_scale on the queries, with a softmax scale of 1.
            Some(query_scale) => {
                s.q.iter_mut().for_each(|x| *x *= query_scale);
                1.0
            }
            None => 1.0 / (heads.head_dim as f32).sqrt(),
        };
        let q = &s.q[rows.start * heads.q_width()..];
        let scores = attention::Scores { scale, sinks: self.sinks.as_ref().map(|(values, _)| values.clone()) };
        attention::attend(heads, q, kv, positions, rows, scores, &mut s.attended, &mut s.attention);
        self.output.forward_native(&s.attended, kept, &mut s.projected)
    }

    /// Queries, keys and values of `x` (`(batch, positions, hidden)` from `start`), split
    /// into heads, normed and rotated; queries scaled if the model scales them.
    fn heads(&self, x: &Tensor, start: usize, rope: &Rope) -> Result<(Tensor, Tensor, Tensor)> {
        let (batch, seq_len, _) = x.dims3()?;
        let (heads, kv_heads, head_dim) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let split_heads = |t: Tensor, n: usize| -> Result<Tensor> {
            Ok(t.reshape((batch, seq_len, n, head_dim))?.transpose(1, 2)?.contiguous()?)
        };
        let mut q = split_heads(self.query.forward(x)?, heads)?;
        let mut k = split_heads(self.key.forward(x)?, kv_heads)?;
        let v = split_heads(self.value.forward(x)?, kv_heads)?;
        if let (Some(qn), Some(kn)) = (&self.query_norm, &self.key_norm) {
            q = qn.forward(&q)?;
            k = kn.forward(&k)?;
        }
        let q = rope.apply(&q, start)?;
        let q = match self.query_scale {
            Some(scale) => (q * scale as f64)?,
            None => q,
        };
        Ok((q, rope.apply(&k, start)?, v))
    }

    fn forward(&self, x: &Tensor, start: usize, mask: Option<&Tensor>, rope: &Rope, kv: &mut KvCache) -> Result<Tensor> {
        let (q, k, v) = self.heads(x, start, rope)?;
        let (k, v) = kv.append(&k, &v)?;
        self.attend(&q, &k, &v, mask)
    }

    /// A sliding layer: the cache keeps the last `window - 1` positions, all that the
    /// next query may see besides its own.
    fn forward_sliding(&self, x: &Tensor, start: usize, rope: &Rope, cache: &mut SlidingCache) -> Result<Tensor> {
        let window = self.window.ok_or_else(|| Error::InvalidInput("a sliding cache on a full layer".into()))?;
        let (q, k, v) = self.heads(x, start, rope)?;
        // The cache changes only once the step has gone through.
        let (k, v, first) = match &cache.kv {
            Some((cached_k, cached_v)) => {
                (Tensor::cat(&[cached_k, &k], 2)?, Tensor::cat(&[cached_v, &v], 2)?, cache.first)
            }
            None => (k, v, start),
        };
        let (seq_len, context) = (q.dim(2)?, k.dim(2)?);
        let mask = sliding_mask(seq_len, start, first, context, window, q.device(), q.dtype())?;
        let y = self.attend(&q, &k, &v, mask.as_ref())?;
        let keep = context.min(window - 1);
        let kept = (keep > 0)
            .then(|| -> Result<_> { Ok((k.narrow(2, context - keep, keep)?, v.narrow(2, context - keep, keep)?)) })
            .transpose()?;
        *cache = SlidingCache { kv: kept, first: first + context - keep };
        Ok(y)
    }

    /// Attention of `q` `(batch, heads, positions, head_dim)` over `k` and `v` (their KV
    /// heads' every cached position), through the output projection.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (batch, heads, seq_len, head_dim) = q.dims4()?;
        let kv_heads = self.num_kv_heads;
        let context = k.dim(2)?;
        // Grouped-query attention without copying K and V per query head: the query heads
        // that share a KV head are stacked along the position axis of one product.
        let group = heads / kv_heads;
        let q = q.reshape((batch, kv_heads, group * seq_len, head_dim))?;
        let scores = q.matmul(&k.t()?)?;
        // Queries already scaled (Gemma) take a softmax scale of 1.
        let scores = match self.query_scale {
            Some(_) => scores,
            None => (scores * (1.0 / (head_dim as f64).sqrt()))?,
        };
        let scores = match mask {
            Some(mask) => scores
                .reshape((batch, kv_heads, group, seq_len, context))?
                .broadcast_add(mask)?
                .reshape((batch, kv_heads, group * seq_len, context))?,
            None => scores,
        };
        let weights = match &self.sinks {
            // Each head's sink is one more score in its softmax, dropped after.
            Some((_, sinks)) => {
                let sinks = sinks.broadcast_as((batch, kv_heads, group, seq_len, 1))?;
                let sinks = sinks.reshape((batch, kv_heads, group * seq_len, 1))?;
                let with_sinks = Tensor::cat(&[&scores, &sinks], 3)?;
                candle_nn::ops::softmax_last_dim(&with_sinks)?.narrow(3, 0, context)?
            }
            None => candle_nn::ops::softmax_last_dim(&scores)?,
        };
        let y = weights.matmul(v)?;
        let y = y
            .reshape((batch, heads, seq_len, head_dim))?
            .transpose(1, 2)?
            .reshape((batch, seq_len, heads * head_dim))?;
        self.output.forward(&y)
    }
}

/// Precomputed rotary embedding tables for every position of the context.
struct Rope {
    cos: Tensor,
    sin: Tensor,
    layout: RopeLayout,
}

impl Rope {
    fn new(config: &ModelConfig, device: &Device) -> Result<Self> {
        let half = config.head_dim / 2;
        let mut inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / config.rope_theta.powf(2.0 * i as f32 / config.head_dim as f32))
            .collect();
        match &config.rope_scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => inv_freq.iter_mut().for_each(|f| *f /= factor),
            RopeScaling::FrequencyFactors(factors) => {
                if factors.len() != half {
                    return Err(Error::InvalidModel(format!(
                        "rope_freqs has {} factors for {half} frequencies",
                        factors.len()
                    )));
                }
                inv_freq.iter_mut().zip(factors).for_each(|(f, d)| *f /= d);
            }
            // YaRN's blend of frequencies and its factor on the rotation: the CPU path's tables.
            RopeScaling::Yarn { .. } => {
                let (cos, sin) = latent_attention::tables_of(&native_rope(config)?, config.context_length, device)?;
                return Ok(Self { cos, sin, layout: config.rope_layout });
            }
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_context } => {
                let original = *original_context as f32;
                let low_wavelen = original / low_freq_factor;
                let high_wavelen = original / high_freq_factor;
                for f in inv_freq.iter_mut() {
                    let wavelen = 2.0 * std::f32::consts::PI / *f;
                    if wavelen > low_wavelen {
                        *f /= factor;
                    } else if wavelen >= high_wavelen {
                        let smooth = (original / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        *f = (1.0 - smooth) * *f / factor + smooth * *f;
                    }
                }
            }
        }
        let positions = config.context_length;
        let angles: Vec<f32> = (0..positions)
            .flat_map(|p| inv_freq.iter().map(move |f| p as f32 * f))
            .collect();
        let angles = Tensor::from_vec(angles, (positions, half), device)?;
        let dtype = activation_dtype(device);
        Ok(Self {
            cos: angles.cos()?.to_dtype(dtype)?,
            sin: angles.sin()?.to_dtype(dtype)?,
            layout: config.rope_layout,
        })
    }

    /// Latent attention's tables: its rotary part only, with YaRN where the file asks.
    fn latent(config: &ModelConfig, device: &Device) -> Result<Self> {
        let (cos, sin) = latent_attention::rope_tables(config, device, activation_dtype(device))?;
        Ok(Self { cos, sin, layout: RopeLayout::Interleaved })
    }

    /// Rotates `x` of shape `(batch, heads, positions, head_dim)` starting at `start`.
    fn apply(&self, x: &Tensor, start: usize) -> Result<Tensor> {
        let seq_len = x.dim(2)?;
        let cos = self.cos.narrow(0, start, seq_len)?;
        let sin = self.sin.narrow(0, start, seq_len)?;
        let x = x.contiguous()?;
        Ok(match self.layout {
            RopeLayout::Interleaved => candle_nn::rotary_emb::rope_i(&x, &cos, &sin)?,
            RopeLayout::Halves => candle_nn::rotary_emb::rope(&x, &cos, &sin)?,
        })
    }
}

/// Appends the values of `tensor` (any shape) to `out` as f32: straight from its storage
/// when it already holds them contiguously on the CPU.
fn extend_from_tensor(out: &mut Vec<f32>, tensor: &Tensor) -> Result<()> {
    if tensor.device().is_cpu() && tensor.dtype() == DType::F32 {
        let (storage, layout) = tensor.storage_and_layout();
        if let (Storage::Cpu(storage), Some((start, end))) = (&*storage, layout.contiguous_offsets()) {
            out.extend_from_slice(&storage.as_slice::<f32>()?[start..end]);
            return Ok(());
        }
    }
    let values = tensor.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?;
    out.extend_from_slice(&values.to_vec1::<f32>()?);
    Ok(())
}

/// A vector's values on the CPU as f32, or nothing if it lives on another device.
fn cpu_values(tensor: &Tensor) -> Result<Vec<f32>> {
    if !tensor.device().is_cpu() {
        return Ok(Vec::new());
    }
    Ok(tensor.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// The RoPE of a model's sliding layers if it is their own: their base, without the
/// scaling of the others; `None` if they share the full layers'.
fn sliding_rope_config(config: &ModelConfig) -> Option<ModelConfig> {
    let theta = config.sliding_window.as_ref()?.rope_theta?;
    Some(ModelConfig { rope_theta: theta, rope_scaling: RopeScaling::None, ..config.clone() })
}

/// The additive mask of a sliding layer: query `i` (position `start + i`) sees key row `j`
/// (position `first + j`) if it is neither after it nor `window` or more before it; `None`
/// when every query sees every key.
fn sliding_mask(
    seq_len: usize,
    start: usize,
    first: usize,
    context: usize,
    window: usize,
    device: &Device,
    dtype: DType,
) -> Result<Option<Tensor>> {
    let visible = |i: usize, j: usize| first + j <= start + i && start + i - (first + j) < window;
    if (0..seq_len).all(|i| (0..context).all(|j| visible(i, j))) {
        return Ok(None);
    }
    let mask: Vec<f32> = (0..seq_len)
        .flat_map(|i| (0..context).map(move |j| if visible(i, j) { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    Ok(Some(Tensor::from_vec(mask, (seq_len, context), device)?.to_dtype(dtype)?))
}

/// The additive causal mask for `seq_len` new positions after `start` cached ones, or `None`
/// for a single position, which may attend to everything before it.
fn causal_mask(seq_len: usize, start: usize, device: &Device, dtype: DType) -> Result<Option<Tensor>> {
    if seq_len == 1 {
        return Ok(None);
    }
    let context = start + seq_len;
    let mask: Vec<f32> = (0..seq_len)
        .flat_map(|i| (0..context).map(move |j| if j > start + i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Some(Tensor::from_vec(mask, (seq_len, context), device)?.to_dtype(dtype)?))
}

//! A pipeline stage: a contiguous range of decoder blocks, with the token embedding if it
//! is the first stage and the final norm and LM head if it is the last.

use std::ops::Range;

use candle_core::{DType, Device, Tensor};
use candle_nn::kv_cache::KvCache;

use crate::config::{ModelConfig, RopeLayout, RopeScaling};
use crate::kernels::Matrix;
use crate::source::{activation_dtype, LayerTensor, TensorLoader, TensorName};
use crate::{Error, Result};

/// KV caches grow in steps of this many positions, so short requests stay small and long
/// ones copy their cache only every so often.
const KV_CACHE_STEP: usize = 256;

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
    layers: Vec<KvCache>,
    positions: usize,
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
    rope: Rope,
    device: Device,
    dtype: DType,
}

impl Stage {
    pub(crate) fn load(config: &ModelConfig, layers: Range<usize>, loader: &mut TensorLoader<'_>) -> Result<Self> {
        let device = loader.device().clone();
        let is_first = layers.start == 0;
        let is_last = layers.end == config.num_layers;
        let embedding = if is_first { Some(loader.matrix(TensorName::TokenEmbedding)?) } else { None };
        let blocks = layers
            .clone()
            .map(|i| Block::load(config, i, loader))
            .collect::<Result<Vec<_>>>()?;
        let head = if is_last {
            let output = match (&embedding, config.tied_embeddings) {
                (Some(embedding), true) => embedding.clone(),
                (None, true) => loader.matrix(TensorName::TokenEmbedding)?,
                (_, false) => loader.matrix(TensorName::Output)?,
            };
            Some(Head {
                norm: RmsNorm::new(loader.dense(TensorName::OutputNorm)?, config.rms_norm_eps),
                output,
            })
        } else {
            None
        };
        Ok(Self {
            rope: Rope::new(config, &device)?,
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
        StageCache {
            layers: self.blocks.iter().map(|_| KvCache::new(2, KV_CACHE_STEP)).collect(),
            positions: 0,
        }
    }

    /// Runs new positions of one sequence through this stage's layers, appending to `cache`.
    pub fn forward(&self, input: StageInput<'_>, cache: &mut StageCache) -> Result<StageOutput> {
        if cache.layers.len() != self.blocks.len() {
            return Err(Error::InvalidInput("the cache belongs to another stage".into()));
        }
        let hidden = self.input_hidden(input)?;
        let seq_len = hidden.dim(1)?;
        let start = cache.positions;
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
        let mask = causal_mask(seq_len, start, &self.device, self.dtype)?;
        let mut hidden = hidden;
        for (block, kv) in self.blocks.iter().zip(cache.layers.iter_mut()) {
            hidden = block.forward(&hidden, start, mask.as_ref(), &self.rope, kv)?;
        }
        cache.positions += seq_len;
        match &self.head {
            None => Ok(StageOutput::Hidden(hidden.squeeze(0)?)),
            Some(head) => {
                let last = hidden.narrow(1, seq_len - 1, 1)?;
                let logits = head.output.forward(&head.norm.forward(&last)?)?;
                Ok(StageOutput::Logits(logits.flatten_all()?.to_dtype(DType::F32)?))
            }
        }
    }

    /// Turns the input into hidden states of shape `(1, positions, hidden)`, checking that it
    /// is what this stage expects.
    fn input_hidden(&self, input: StageInput<'_>) -> Result<Tensor> {
        match (input, &self.embedding) {
            (StageInput::Tokens(tokens), Some(embedding)) => {
                let vocab = self.config.vocab_size;
                if let Some(bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
                    return Err(Error::InvalidInput(format!("token id {bad} is outside the vocabulary of {vocab}")));
                }
                let ids = Tensor::new(tokens, &self.device)?;
                Ok(embedding.embedding(&ids)?.to_dtype(self.dtype)?.unsqueeze(0)?)
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
                Ok(hidden.to_device(&self.device)?.to_dtype(self.dtype)?.unsqueeze(0)?)
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
}

struct Head {
    norm: RmsNorm,
    output: Matrix,
}

struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn new(weight: Tensor, eps: f64) -> Self {
        Self { weight, eps: eps as f32 }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps)?)
    }
}

/// A projection with an optional bias (Qwen2 has them on q, k and v).
struct Linear {
    weight: Matrix,
    bias: Option<Tensor>,
}

impl Linear {
    fn load(loader: &mut TensorLoader<'_>, weight: TensorName, bias: Option<TensorName>) -> Result<Self> {
        Ok(Self {
            weight: loader.matrix(weight)?,
            bias: bias.map(|b| loader.dense(b)).transpose()?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.weight.forward(x)?;
        Ok(match &self.bias {
            Some(bias) => y.broadcast_add(bias)?,
            None => y,
        })
    }
}

struct Block {
    attention_norm: RmsNorm,
    query: Linear,
    key: Linear,
    value: Linear,
    query_norm: Option<RmsNorm>,
    key_norm: Option<RmsNorm>,
    attention_output: Linear,
    feed_forward_norm: RmsNorm,
    gate: Linear,
    up: Linear,
    down: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Block {
    fn load(config: &ModelConfig, layer: usize, loader: &mut TensorLoader<'_>) -> Result<Self> {
        let name = |t| TensorName::Layer(layer, t);
        let eps = config.rms_norm_eps;
        let bias = |t: LayerTensor| config.qkv_bias.then(|| name(t));
        let mut norm = |t: LayerTensor| -> Result<RmsNorm> { Ok(RmsNorm::new(loader.dense(name(t))?, eps)) };
        let attention_norm = norm(LayerTensor::AttentionNorm)?;
        let feed_forward_norm = norm(LayerTensor::FeedForwardNorm)?;
        let (query_norm, key_norm) = if config.qk_norm {
            (Some(norm(LayerTensor::QueryNorm)?), Some(norm(LayerTensor::KeyNorm)?))
        } else {
            (None, None)
        };
        if config.qkv_bias && !loader.contains(name(LayerTensor::QueryBias)) {
            return Err(Error::InvalidModel(format!("layer {layer} lacks the q/k/v biases its architecture needs")));
        }
        Ok(Self {
            attention_norm,
            query: Linear::load(loader, name(LayerTensor::Query), bias(LayerTensor::QueryBias))?,
            key: Linear::load(loader, name(LayerTensor::Key), bias(LayerTensor::KeyBias))?,
            value: Linear::load(loader, name(LayerTensor::Value), bias(LayerTensor::ValueBias))?,
            query_norm,
            key_norm,
            attention_output: Linear::load(loader, name(LayerTensor::AttentionOutput), None)?,
            feed_forward_norm,
            gate: Linear::load(loader, name(LayerTensor::Gate), None)?,
            up: Linear::load(loader, name(LayerTensor::Up), None)?,
            down: Linear::load(loader, name(LayerTensor::Down), None)?,
            num_heads: config.num_heads,
            num_kv_heads: config.num_kv_heads,
            head_dim: config.head_dim,
        })
    }

    /// `x` is `(1, positions, hidden)`; `start` is the absolute position of its first row.
    fn forward(&self, x: &Tensor, start: usize, mask: Option<&Tensor>, rope: &Rope, kv: &mut KvCache) -> Result<Tensor> {
        let attended = self.attention(&self.attention_norm.forward(x)?, start, mask, rope, kv)?;
        let x = (x + attended)?;
        let h = self.feed_forward_norm.forward(&x)?;
        let gated = (candle_nn::ops::silu(&self.gate.forward(&h)?)? * self.up.forward(&h)?)?;
        Ok((x + self.down.forward(&gated)?)?)
    }

    fn attention(&self, x: &Tensor, start: usize, mask: Option<&Tensor>, rope: &Rope, kv: &mut KvCache) -> Result<Tensor> {
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
        let k = rope.apply(&k, start)?;
        let (k, v) = kv.append(&k, &v)?;
        let context = k.dim(2)?;

        // Grouped-query attention without copying K and V per query head: the query heads
        // that share a KV head are stacked along the position axis of one product.
        let group = heads / kv_heads;
        let q = q.reshape((batch, kv_heads, group * seq_len, head_dim))?;
        let scores = (q.matmul(&k.t()?)? * (1.0 / (head_dim as f64).sqrt()))?;
        let scores = match mask {
            Some(mask) => scores
                .reshape((batch, kv_heads, group, seq_len, context))?
                .broadcast_add(mask)?
                .reshape((batch, kv_heads, group * seq_len, context))?,
            None => scores,
        };
        let weights = candle_nn::ops::softmax_last_dim(&scores)?;
        let y = weights.matmul(&v)?;
        let y = y
            .reshape((batch, heads, seq_len, head_dim))?
            .transpose(1, 2)?
            .reshape((batch, seq_len, heads * head_dim))?;
        self.attention_output.forward(&y)
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

//! DeepSeek's multi-head latent attention (MLA), as llama.cpp runs GGUF's `deepseek2`
//! (DeepSeek-V2, V3, V3.1, R1, Kimi K2).
//!
//! Each token is projected to a small latent (`latent_rank` values, normed) and one rotary
//! key (`rope_dim` values) shared by all heads; the cache holds just those. A head's key is
//! its own projection of the latent followed by the rotary key, and its value another
//! projection of the latent. llama.cpp never forms those keys and values: it folds the key
//! projection into the query (`q_nope` times `attn_k_b`, "absorbed") and the value
//! projection into the output (`attn_v_b` after attending), so attention runs over the
//! cached rows directly, as one KV head of `latent_rank + rope_dim` whose first
//! `latent_rank` values are also the value. This module computes it the same way, so that
//! the CPU path gives llama.cpp's numbers and the cache holds llama.cpp's bytes.
//!
//! Queries go through a low-rank bottleneck with its own norm (`attn_q_a`, `attn_q_a_norm`,
//! `attn_q_b`), or straight (`attn_q`, DeepSeek-V2-Lite). RoPE covers the last `rope_dim`
//! values of each query head and the rotary key, with YaRN's scaling where the file asks
//! for it; the attention scale then carries YaRN's magnitude correction too.

use candle_core::{Device, Tensor, D};

use crate::config::{LatentAttentionConfig, ModelConfig, RopeScaling};
use crate::kernels::attention::{self, Heads};
use crate::kernels::{ops, Matrix};
use crate::source::{LayerTensor, TensorLoader, TensorName};
use crate::stage::RmsNorm;
use crate::{Error, Result};

/// How a token becomes its queries.
enum QueryProjection {
    Direct(Matrix),
    LowRank { down: Matrix, norm: RmsNorm, up: Matrix },
}

/// One layer's latent attention.
pub(crate) struct LatentAttention {
    query: QueryProjection,
    /// `hidden -> latent_rank + rope_dim`: the latent, then the rotary key.
    latent: Matrix,
    latent_norm: RmsNorm,
    /// Per head, `latent_rank x nope_dim`: multiplies the query's unrotated part into
    /// latent space.
    key_from_latent: Vec<Matrix>,
    /// Per head, `value_dim x latent_rank`: turns the attended latent into the head's value.
    value_from_latent: Vec<Matrix>,
    output: Matrix,
    dims: LatentAttentionConfig,
    heads: usize,
    scale: f32,
}

/// The CPU path's buffers, reused from layer to layer.
#[derive(Default)]
pub(crate) struct Scratch {
    bottleneck: Vec<f32>,
    query: Vec<f32>,
    latent: Vec<f32>,
    absorbed_query: Vec<f32>,
    gathered: Vec<f32>,
    product: Vec<f32>,
    attended: Vec<f32>,
    values: Vec<f32>,
    attention: attention::Scratch,
}

impl Scratch {
    pub(crate) fn release_if_large(&mut self, keep_values: usize) {
        let buffers = [
            &mut self.bottleneck,
            &mut self.query,
            &mut self.latent,
            &mut self.absorbed_query,
            &mut self.gathered,
            &mut self.product,
            &mut self.attended,
            &mut self.values,
        ];
        for buffer in buffers {
            if buffer.capacity() > keep_values {
                *buffer = Vec::new();
            }
        }
    }
}

/// YaRN's frequency scale and attention factor for RoPE, and the factor on attention
/// scores, as llama.cpp derives them for `deepseek2` (`llama_context`'s constructor, then
/// the graph's `kq_scale`), in its order of f32 operations.
pub(crate) struct YarnFactors {
    pub(crate) freq_scale: f32,
    pub(crate) attn_factor: f32,
    pub(crate) score_mscale: f32,
}

impl YarnFactors {
    pub(crate) fn of(config: &ModelConfig) -> Option<Self> {
        let RopeScaling::Yarn { factor, log_multiplier, .. } = config.rope_scaling else {
            return None;
        };
        let freq_scale = 1.0 / factor;
        let factor = 1.0 / freq_scale;
        let get_mscale = |scale: f32, mscale: f32| if scale <= 1.0 { 1.0 } else { 0.1 * mscale * scale.ln() + 1.0 };
        let mut attn_factor = if log_multiplier != 0.0 {
            // llama.cpp takes DeepSeek's `mscale` to equal `mscale_all_dim`: the ratio is 1.
            let mscale = if log_multiplier != 1.0 { log_multiplier } else { 1.0 };
            get_mscale(factor, mscale) / get_mscale(factor, log_multiplier)
        } else {
            get_mscale(factor, 1.0)
        };
        attn_factor *= 1.0 / (1.0 + 0.1 * factor.ln());
        let original = attn_factor * (1.0 + 0.1 * (1.0 / freq_scale).ln());
        let score_mscale = original * (1.0 + 0.1 * log_multiplier * (1.0 / freq_scale).ln());
        Some(Self { freq_scale, attn_factor, score_mscale })
    }
}

impl LatentAttention {
    pub(crate) fn load(config: &ModelConfig, layer: usize, loader: &mut TensorLoader<'_>) -> Result<Self> {
        let dims = dimensions(config)?.clone();
        let name = |t| TensorName::Layer(layer, t);
        let eps = config.rms_norm_eps;
        let heads = config.num_heads;
        let query = match dims.query_rank {
            Some(_) => QueryProjection::LowRank {
                down: loader.matrix(name(LayerTensor::QueryA))?,
                norm: RmsNorm::new(loader.dense(name(LayerTensor::QueryANorm))?, eps)?,
                up: loader.matrix(name(LayerTensor::QueryB))?,
            },
            None => QueryProjection::Direct(loader.matrix(name(LayerTensor::Query))?),
        };
        let score_mscale = YarnFactors::of(config).map_or(1.0, |yarn| yarn.score_mscale);
        let key_dim = (dims.nope_dim + dims.rope_dim) as f32;
        Ok(Self {
            query,
            latent: loader.matrix(name(LayerTensor::LatentKv))?,
            latent_norm: RmsNorm::new(loader.dense(name(LayerTensor::LatentNorm))?, eps)?,
            key_from_latent: loader.stacked(
                name(LayerTensor::KeyFromLatent),
                heads,
                (dims.latent_rank, dims.nope_dim),
            )?,
            value_from_latent: loader.stacked(
                name(LayerTensor::ValueFromLatent),
                heads,
                (dims.value_dim, dims.latent_rank),
            )?,
            output: loader.matrix(name(LayerTensor::AttentionOutput))?,
            scale: score_mscale * score_mscale / key_dim.sqrt(),
            dims,
            heads,
        })
    }

    /// The shape attention runs in: every head over the one cached row.
    pub(crate) fn heads(&self) -> Heads {
        let d = &self.dims;
        Heads { heads: self.heads, kv_heads: 1, head_dim: d.latent_rank + d.rope_dim, value_dim: d.latent_rank }
    }

    /// The CPU path: `x` holds `positions` normed rows starting at position `start` (their
    /// RoPE `angles`, `rope.angles_len()` per position); their cached rows are appended to
    /// `kv`, and the output of the batch rows `rows` goes to `out`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn forward_native(
        &self,
        x: &[f32],
        positions: usize,
        rows: std::ops::Range<usize>,
        rope: &ops::Rope,
        angles: &[f32],
        kv: &mut attention::KvCache,
        out: &mut Vec<f32>,
        s: &mut Scratch,
    ) -> Result<()> {
        let LatentAttentionConfig { latent_rank, rope_dim, nope_dim, value_dim, .. } = self.dims;
        let angles_len = rope.angles_len();
        match &self.query {
            QueryProjection::Direct(matrix) => matrix.forward_into(x, positions, &mut s.query)?,
            QueryProjection::LowRank { down, norm, up } => {
                down.forward_into(x, positions, &mut s.bottleneck)?;
                ops::rms_norm_in_place(&mut s.bottleneck, &norm.values, norm.eps);
                up.forward_into(&s.bottleneck, positions, &mut s.query)?;
            }
        }
        // The cached rows: the normed latent, then the rotated key.
        self.latent.forward_into(x, positions, &mut s.latent)?;
        let row = latent_rank + rope_dim;
        for (t, cached) in s.latent.chunks_exact_mut(row).enumerate() {
            let (latent, key) = cached.split_at_mut(latent_rank);
            ops::rms_norm_in_place(latent, &self.latent_norm.values, self.latent_norm.eps);
            rope.rotate(key, &angles[t * angles_len..(t + 1) * angles_len]);
        }
        kv.append(&s.latent, &[]);

        // Each kept row's query per head: its unrotated part taken into latent space, then
        // its rotated part.
        let kept = rows.len();
        let q_head = nope_dim + rope_dim;
        s.absorbed_query.resize(kept * self.heads * row, 0.0);
        for (h, key_from_latent) in self.key_from_latent.iter().enumerate() {
            s.gathered.clear();
            for t in rows.clone() {
                let head = &s.query[(t * self.heads + h) * q_head..][..q_head];
                s.gathered.extend_from_slice(&head[..nope_dim]);
            }
            key_from_latent.forward_into(&s.gathered, kept, &mut s.product)?;
            for (i, t) in rows.clone().enumerate() {
                let head = &s.query[(t * self.heads + h) * q_head..][..q_head];
                let absorbed = &mut s.absorbed_query[(i * self.heads + h) * row..][..row];
                absorbed[..latent_rank].copy_from_slice(&s.product[i * latent_rank..(i + 1) * latent_rank]);
                absorbed[latent_rank..].copy_from_slice(&head[nope_dim..]);
                rope.rotate(&mut absorbed[latent_rank..], &angles[t * angles_len..(t + 1) * angles_len]);
            }
        }
        let heads = self.heads();
        s.attended.resize(kept * heads.out_width(), 0.0);
        let q = &s.absorbed_query;
        attention::attend(&heads, q, kv, positions, rows, attention::Scores { scale: self.scale, sinks: None }, &mut s.attended, &mut s.attention);

        // Each head's attended latent becomes its value, then all heads go through the output.
        s.values.resize(kept * self.heads * value_dim, 0.0);
        for (h, value_from_latent) in self.value_from_latent.iter().enumerate() {
            s.gathered.clear();
            for i in 0..kept {
                s.gathered.extend_from_slice(&s.attended[(i * self.heads + h) * latent_rank..][..latent_rank]);
            }
            value_from_latent.forward_into(&s.gathered, kept, &mut s.product)?;
            for i in 0..kept {
                s.values[(i * self.heads + h) * value_dim..][..value_dim]
                    .copy_from_slice(&s.product[i * value_dim..(i + 1) * value_dim]);
            }
        }
        self.output.forward_into(&s.values, kept, out)?;
        Ok(())
    }

    /// candle's path: `x` is `(1, positions, hidden)`, normed; `cos` and `sin` are RoPE's
    /// tables for its positions (`(positions, rope_dim / 2)`, YaRN's factor included);
    /// `cache` holds `(1, 1, positions, latent_rank + rope_dim)` rows.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        cos: &Tensor,
        sin: &Tensor,
        cache: &mut candle_nn::kv_cache::Cache,
    ) -> Result<Tensor> {
        let LatentAttentionConfig { latent_rank, rope_dim, nope_dim, .. } = self.dims;
        let (batch, positions, _) = x.dims3()?;
        if batch != 1 {
            return Err(Error::InvalidInput(format!("latent attention runs one sequence, not {batch}")));
        }
        let x = x.squeeze(0)?;
        let query = match &self.query {
            QueryProjection::Direct(matrix) => matrix.forward(&x)?,
            QueryProjection::LowRank { down, norm, up } => up.forward(&norm.forward(&down.forward(&x)?)?)?,
        };
        // (heads, positions, nope + rope)
        let query = query.reshape((positions, self.heads, nope_dim + rope_dim))?.transpose(0, 1)?;
        let rotate = |t: &Tensor| -> Result<Tensor> {
            Ok(candle_nn::rotary_emb::rope_i(&t.unsqueeze(0)?.contiguous()?, cos, sin)?.squeeze(0)?)
        };
        let query_rotated = rotate(&query.narrow(D::Minus1, nope_dim, rope_dim)?)?;
        let query_unrotated = query.narrow(D::Minus1, 0, nope_dim)?;
        let absorbed = self
            .key_from_latent
            .iter()
            .enumerate()
            .map(|(h, matrix)| matrix.forward(&query_unrotated.get(h)?.contiguous()?))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let query = Tensor::cat(&[Tensor::stack(&absorbed, 0)?, query_rotated], D::Minus1)?;

        let cached = self.latent.forward(&x)?;
        let latent = self.latent_norm.forward(&cached.narrow(D::Minus1, 0, latent_rank)?)?;
        let key = rotate(&cached.narrow(D::Minus1, latent_rank, rope_dim)?.unsqueeze(0)?)?.squeeze(0)?;
        let row = Tensor::cat(&[latent, key], D::Minus1)?.unsqueeze(0)?.unsqueeze(0)?;
        cache.append(&row.contiguous()?)?;
        let keys = cache.current_data()?.ok_or_else(|| Error::InvalidInput("empty latent cache".into()))?;
        let keys = keys.squeeze(0)?.squeeze(0)?; // (context, row)
        let values = keys.narrow(D::Minus1, 0, latent_rank)?;

        // Every head against the one cached row per position.
        let scores = (query.contiguous()?.broadcast_matmul(&keys.t()?.contiguous()?)? * self.scale as f64)?;
        let scores = match mask {
            Some(mask) => scores.broadcast_add(mask)?,
            None => scores,
        };
        let weights = candle_nn::ops::softmax_last_dim(&scores)?;
        let attended = weights.broadcast_matmul(&values.contiguous()?)?; // (heads, positions, latent)
        let per_head = self
            .value_from_latent
            .iter()
            .enumerate()
            .map(|(h, matrix)| matrix.forward(&attended.get(h)?.contiguous()?))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let values = Tensor::cat(&per_head, D::Minus1)?; // (positions, heads * value_dim)
        Ok(self.output.forward(&values)?.unsqueeze(0)?)
    }
}

fn dimensions(config: &ModelConfig) -> Result<&LatentAttentionConfig> {
    config.latent_attention.as_ref().ok_or_else(|| Error::InvalidModel("latent attention without its dimensions".into()))
}

/// RoPE for latent attention on the CPU path: the rotary part only, adjacent pairs, YaRN
/// where the file asks for it.
pub(crate) fn native_rope(config: &ModelConfig) -> Result<ops::Rope> {
    let dims = dimensions(config)?;
    let pairs = ops::RopePairs::Adjacent;
    Ok(match (&config.rope_scaling, YarnFactors::of(config)) {
        (RopeScaling::Yarn { original_context, beta_fast, beta_slow, exact_range, .. }, Some(yarn)) => {
            let betas = [*beta_fast, *beta_slow];
            let corr_dims = ops::Yarn::corr_dims(dims.rope_dim, *original_context, config.rope_theta, betas, *exact_range);
            ops::Rope::new(dims.rope_dim, config.rope_theta, pairs, yarn.freq_scale, None).with_yarn(ops::Yarn {
                ext_factor: 1.0,
                attn_factor: yarn.attn_factor,
                corr_dims,
            })
        }
        (RopeScaling::None, _) => ops::Rope::new(dims.rope_dim, config.rope_theta, pairs, 1.0, None),
        (other, _) => return Err(Error::Unsupported(format!("RoPE scaling {other:?} with latent attention"))),
    })
}

/// candle's RoPE tables for latent attention: the CPU path's angles (and YaRN's factor on
/// them) for every position of the context, as `(cos, sin)` of shape `(positions, rope_dim / 2)`.
pub(crate) fn rope_tables(config: &ModelConfig, device: &Device, dtype: candle_core::DType) -> Result<(Tensor, Tensor)> {
    let (cos, sin) = tables_of(&native_rope(config)?, config.context_length, device)?;
    Ok((cos.to_dtype(dtype)?, sin.to_dtype(dtype)?))
}

/// The `(cos, sin)` tables of `rope` for `positions` positions, `(positions, pairs)` each,
/// in the activation dtype of `device`.
pub(crate) fn tables_of(rope: &ops::Rope, positions: usize, device: &Device) -> Result<(Tensor, Tensor)> {
    let pairs = rope.angles_len() / 2;
    let mut angles = vec![0.0f32; rope.angles_len()];
    let (mut cos, mut sin) = (Vec::with_capacity(positions * pairs), Vec::with_capacity(positions * pairs));
    for p in 0..positions {
        rope.angles(p, &mut angles);
        for pair in angles.chunks_exact(2) {
            cos.push(pair[0]);
            sin.push(pair[1]);
        }
    }
    let dtype = crate::source::activation_dtype(device);
    let table = |values: Vec<f32>| -> Result<Tensor> {
        Ok(Tensor::from_vec(values, (positions, pairs), device)?.to_dtype(dtype)?)
    };
    Ok((table(cos)?, table(sin)?))
}

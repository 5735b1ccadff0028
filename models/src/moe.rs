//! A mixture-of-experts feed-forward (Mixtral, Qwen3-MoE): a router scores every expert
//! for each token, the best `experts_used` run on it, and their outputs are mixed by the
//! router's weights.
//!
//! Only the chosen experts' weights are read: a decode step touches the router and its
//! token's experts, and a prompt's tokens are grouped by expert so each expert's matrices
//! pass over all of its tokens at once (what llama.cpp's `mul_mat_id` does). The experts
//! keep the file's bytes, one matrix each.
//!
//! The CPU path follows llama.cpp's `build_moe_ffn` step for step (softmax, top-k, the
//! weights' sum in f64, each expert's output scaled, then added in the order the experts
//! were chosen), so with the exact kernels it computes what llama.cpp computes. The
//! routing itself is the same code on every path.

use candle_core::{DType, Device, Tensor};

use crate::config::MoeConfig;
use crate::kernels::{ops, Matrix};
use crate::source::{ExpertTensor, LayerTensor, TensorLoader, TensorName};
use crate::{Error, Result};

/// ggml clamps the chosen weights' sum to the smallest normal f16 before dividing by it.
const MIN_WEIGHT_SUM: f32 = 6.103_515_6e-5;

/// How a router's logits become each token's experts and their weights.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Routing {
    experts: usize,
    used: usize,
    normalize: bool,
    scale: f32,
}

/// One expert chosen for one token, with the weight of its output.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Choice {
    pub expert: usize,
    pub weight: f32,
}

impl Routing {
    pub(crate) fn new(moe: &MoeConfig) -> Self {
        Self { experts: moe.experts, used: moe.experts_used, normalize: moe.normalize_weights, scale: moe.weights_scale }
    }

    /// Each token's experts, best first, `used` per token, from `logits` (one row of
    /// `experts` per token, turned into probabilities in place).
    pub(crate) fn route(&self, logits: &mut [f32], choices: &mut Vec<Choice>) {
        choices.clear();
        for probs in logits.chunks_exact_mut(self.experts) {
            ops::softmax_portable(probs, 1.0, false);
            let first = choices.len();
            for _ in 0..self.used {
                // The best expert not yet chosen; ties go to the lower index.
                let best = (0..self.experts)
                    .filter(|e| !choices[first..].iter().any(|c| c.expert == *e))
                    .fold(None, |best: Option<usize>, e| match best {
                        Some(b) if probs[b] >= probs[e] => Some(b),
                        _ => Some(e),
                    })
                    .expect("fewer experts used than there are");
                choices.push(Choice { expert: best, weight: probs[best] });
            }
            let chosen = &mut choices[first..];
            if self.normalize {
                let sum = chosen.iter().map(|c| c.weight as f64).sum::<f64>() as f32;
                let sum = sum.max(MIN_WEIGHT_SUM);
                chosen.iter_mut().for_each(|c| c.weight /= sum);
            }
            if self.scale != 0.0 && self.scale != 1.0 {
                chosen.iter_mut().for_each(|c| c.weight *= self.scale);
            }
        }
    }
}

/// A layer's experts and their router.
pub(crate) struct Experts {
    router: Matrix,
    gate: Vec<Matrix>,
    up: Vec<Matrix>,
    down: Vec<Matrix>,
    routing: Routing,
    hidden: usize,
    expert_ffn: usize,
}

/// The CPU path's buffers for one layer's experts, reused from layer to layer.
#[derive(Default)]
pub(crate) struct Scratch {
    logits: Vec<f32>,
    choices: Vec<Choice>,
    /// The (token, slot) pairs routed to the expert at hand.
    members: Vec<usize>,
    input: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    output: Vec<f32>,
    /// Every chosen expert's weighted output, a row per (token, slot).
    slots: Vec<f32>,
}

impl Scratch {
    pub(crate) fn release_if_large(&mut self, keep_values: usize) {
        for buffer in [&mut self.logits, &mut self.input, &mut self.gate, &mut self.up, &mut self.output, &mut self.slots]
        {
            if buffer.capacity() > keep_values {
                *buffer = Vec::new();
            }
        }
    }
}

impl Experts {
    pub(crate) fn load(moe: &MoeConfig, hidden: usize, layer: usize, loader: &mut TensorLoader<'_>) -> Result<Self> {
        let router_name = TensorName::Layer(layer, LayerTensor::Router);
        if !loader.contains(router_name) {
            return Err(Error::InvalidModel(format!("layer {layer} has experts but no router (`ffn_gate_inp`)")));
        }
        let router = loader.matrix(router_name)?;
        let (n, ffn) = (moe.experts, moe.expert_ffn);
        Ok(Self {
            router,
            gate: loader.experts(layer, ExpertTensor::Gate, n, (ffn, hidden))?,
            up: loader.experts(layer, ExpertTensor::Up, n, (ffn, hidden))?,
            down: loader.experts(layer, ExpertTensor::Down, n, (hidden, ffn))?,
            routing: Routing::new(moe),
            hidden,
            expert_ffn: ffn,
        })
    }

    /// The CPU path: the experts' mixed output for the `rows` rows of `x`, into `out`.
    pub(crate) fn forward_native(&self, x: &[f32], rows: usize, out: &mut Vec<f32>, s: &mut Scratch) -> Result<()> {
        let (hidden, used) = (self.hidden, self.routing.used);
        self.router.forward_into(x, rows, &mut s.logits)?;
        self.routing.route(&mut s.logits, &mut s.choices);
        s.slots.resize(rows * used * hidden, 0.0);
        for expert in 0..self.routing.experts {
            s.members.clear();
            s.members.extend(s.choices.iter().enumerate().filter(|(_, c)| c.expert == expert).map(|(i, _)| i));
            if s.members.is_empty() {
                continue;
            }
            s.input.clear();
            for &slot in &s.members {
                let row = slot / used;
                s.input.extend_from_slice(&x[row * hidden..(row + 1) * hidden]);
            }
            let n = s.members.len();
            self.gate[expert].forward_into(&s.input, n, &mut s.gate)?;
            self.up[expert].forward_into(&s.input, n, &mut s.up)?;
            ops::silu_mul(&mut s.gate, &s.up, self.expert_ffn);
            self.down[expert].forward_into(&s.gate, n, &mut s.output)?;
            for (&slot, output) in s.members.iter().zip(s.output.chunks_exact(hidden)) {
                let weight = s.choices[slot].weight;
                let weighted = &mut s.slots[slot * hidden..(slot + 1) * hidden];
                weighted.iter_mut().zip(output).for_each(|(w, &o)| *w = o * weight);
            }
        }
        // ggml adds the experts' outputs in the order they were chosen.
        out.clear();
        for token in s.slots.chunks_exact(used * hidden) {
            let start = out.len();
            out.extend_from_slice(&token[..hidden]);
            for slot in token[hidden..].chunks_exact(hidden) {
                ops::add_assign(&mut out[start..], slot);
            }
        }
        Ok(())
    }

    /// candle's path: `x` is `(1, positions, hidden)`. The routing is computed on the host
    /// (it is a few values per token), the experts' products on `x`'s device.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (batch, positions, hidden) = x.dims3()?;
        let x = x.reshape((batch * positions, hidden))?;
        let mut logits = self.router.forward(&x)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let mut choices = Vec::new();
        self.routing.route(&mut logits, &mut choices);
        let used = self.routing.used;
        let mut out = x.zeros_like()?;
        for expert in 0..self.routing.experts {
            let (rows, weights): (Vec<u32>, Vec<f32>) = choices
                .iter()
                .enumerate()
                .filter(|(_, c)| c.expert == expert)
                .map(|(slot, c)| ((slot / used) as u32, c.weight))
                .unzip();
            if rows.is_empty() {
                continue;
            }
            let device: &Device = x.device();
            let rows = Tensor::new(rows.as_slice(), device)?;
            let weights = Tensor::new(weights.as_slice(), device)?.to_dtype(x.dtype())?.unsqueeze(1)?;
            let input = x.index_select(&rows, 0)?;
            let gated = (candle_nn::ops::silu(&self.gate[expert].forward(&input)?)? * self.up[expert].forward(&input)?)?;
            let output = self.down[expert].forward(&gated)?.broadcast_mul(&weights)?;
            out = out.index_add(&rows, &output, 0)?;
        }
        Ok(out.reshape((batch, positions, hidden))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routing(experts: usize, used: usize, normalize: bool, scale: f32) -> Routing {
        Routing::new(&MoeConfig { experts, experts_used: used, expert_ffn: 1, normalize_weights: normalize, weights_scale: scale })
    }

    #[test]
    fn each_token_takes_its_best_experts_best_first() {
        let mut logits = vec![0.0, 2.0, 1.0, -1.0, /* second token */ 3.0, 0.0, 0.0, 3.5];
        let mut choices = Vec::new();
        routing(4, 2, false, 1.0).route(&mut logits, &mut choices);
        let experts: Vec<usize> = choices.iter().map(|c| c.expert).collect();
        assert_eq!(experts, [1, 2, 3, 0]);
        // Unnormalized weights are the softmax over all four experts.
        let z: f32 = [0.0f32, 2.0, 1.0, -1.0].iter().map(|l| l.exp()).sum();
        assert!((choices[0].weight - 2.0f32.exp() / z).abs() < 1e-6);
        assert!((choices[1].weight - 1.0f32.exp() / z).abs() < 1e-6);
    }

    #[test]
    fn normalized_weights_sum_to_one_and_keep_their_ratio() {
        let mut logits = vec![0.5, 1.5, -0.5, 1.0, 0.0, 0.25];
        let mut choices = Vec::new();
        routing(6, 3, true, 1.0).route(&mut logits, &mut choices);
        let sum: f32 = choices.iter().map(|c| c.weight).sum();
        assert!((sum - 1.0).abs() < 1e-6, "{choices:?}");
        assert_eq!(choices.iter().map(|c| c.expert).collect::<Vec<_>>(), [1, 3, 0]);
        assert!((choices[0].weight / choices[1].weight - 0.5f32.exp()).abs() < 1e-5);
    }

    #[test]
    fn a_scale_multiplies_the_weights_and_ties_go_to_the_lower_expert() {
        let mut logits = vec![1.0, 1.0, 1.0];
        let mut choices = Vec::new();
        routing(3, 2, true, 2.5).route(&mut logits, &mut choices);
        assert_eq!(choices, [Choice { expert: 0, weight: 1.25 }, Choice { expert: 1, weight: 1.25 }]);
    }
}

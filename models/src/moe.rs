//! A mixture-of-experts feed-forward (Mixtral, Qwen3-MoE, DeepSeek, gpt-oss): a router
//! scores every expert for each token, the best `experts_used` run on it, and their outputs
//! are mixed by the router's weights. DeepSeek adds shared experts that every token goes
//! through, and (V3) sigmoid scores, a per-expert bias that steers the choice but not the
//! weights, and choosing among the best groups of experts only. gpt-oss adds biases to
//! the router and to every expert's projections, weighs the chosen experts by a softmax
//! over their logits alone, and clamps its SwiGLU.
//!
//! Only the chosen experts' weights are read: a decode step touches the router and its
//! token's experts, and a prompt's tokens are grouped by expert so each expert's matrices
//! pass over all of its tokens at once (what llama.cpp's `mul_mat_id` does). The experts
//! keep the file's bytes, one matrix each.
//!
//! The CPU path follows llama.cpp's `build_moe_ffn` step for step (softmax or sigmoid,
//! group masking, top-k, the weights' sum in f64, each expert's output scaled, then added
//! in the order the experts were chosen, the shared experts last), so with the exact
//! kernels it computes what llama.cpp computes. The routing itself is the same code on
//! every path.

use candle_core::{DType, Device, Tensor};

use crate::config::{Activation, ExpertGroups, Gating, MoeConfig};
use crate::kernels::{ops, Matrix};
use crate::source::{ExpertTensor, LayerTensor, TensorLoader, TensorName};
use crate::{Error, Result};

/// ggml clamps the chosen weights' sum to the smallest normal f16 before dividing by it.
const MIN_WEIGHT_SUM: f32 = 6.103_515_6e-5;

/// llama.cpp's `LLAMA_MAX_EXPERTS` bounds the experts a token may use.
const MAX_EXPERTS_USED: usize = 512;

/// How a router's logits become each token's experts and their weights.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Routing {
    experts: usize,
    used: usize,
    normalize: bool,
    scale: f32,
    gating: Gating,
    groups: Option<ExpertGroups>,
}

/// One expert chosen for one token, with the weight of its output.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Choice {
    pub expert: usize,
    pub weight: f32,
}

impl Routing {
    pub(crate) fn new(moe: &MoeConfig) -> Self {
        Self {
            experts: moe.experts,
            used: moe.experts_used,
            normalize: moe.normalize_weights,
            scale: moe.weights_scale,
            gating: moe.gating,
            groups: moe.groups,
        }
    }

    /// Each token's experts, best first, `used` per token, from `logits` (one row of
    /// `experts` per token, turned into scores in place). `bias`, one value per expert, is
    /// added to the scores for choosing only; `selection` is a buffer.
    pub(crate) fn route(&self, logits: &mut [f32], bias: Option<&[f32]>, selection: &mut Vec<f32>, choices: &mut Vec<Choice>) {
        choices.clear();
        for scores in logits.chunks_exact_mut(self.experts) {
            match self.gating {
                Gating::Softmax => ops::softmax_row(scores),
                Gating::Sigmoid => scores.iter_mut().for_each(|s| *s = 1.0 / (1.0 + (-*s).exp())),
                // Chosen by their logits; weighed below.
                Gating::SoftmaxOfChosen => {}
            }
            selection.clear();
            match bias {
                Some(bias) => selection.extend(scores.iter().zip(bias).map(|(s, b)| s + b)),
                None => selection.extend_from_slice(scores),
            }
            if let Some(groups) = self.groups {
                mask_all_but_best_groups(selection, groups);
            }
            let first = choices.len();
            for _ in 0..self.used {
                // The best expert not yet chosen; ties go to the lower index.
                let best = (0..self.experts)
                    .filter(|e| !choices[first..].iter().any(|c| c.expert == *e))
                    .fold(None, |best: Option<usize>, e| match best {
                        Some(b) if selection[b] >= selection[e] => Some(b),
                        _ => Some(e),
                    })
                    .expect("fewer experts used than there are");
                choices.push(Choice { expert: best, weight: scores[best] });
            }
            let chosen = &mut choices[first..];
            if self.gating == Gating::SoftmaxOfChosen {
                let mut weights = [0.0f32; MAX_EXPERTS_USED];
                let weights = &mut weights[..chosen.len()];
                weights.iter_mut().zip(chosen.iter()).for_each(|(w, c)| *w = c.weight);
                ops::softmax_row(weights);
                chosen.iter_mut().zip(weights.iter()).for_each(|(c, &w)| c.weight = w);
            }
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

/// Sets the scores of every group but the `groups.used` best to minus infinity; a group
/// ranks by the sum of its two best scores (DeepSeek-V3, as llama.cpp computes it).
fn mask_all_but_best_groups(selection: &mut [f32], groups: ExpertGroups) {
    let per_group = selection.len() / groups.count;
    let group_score = |group: &[f32]| {
        let best = group.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let at = group.iter().position(|&s| s == best).unwrap_or(0);
        let second = group.iter().enumerate().filter(|(i, _)| *i != at).map(|(_, &s)| s).fold(f32::NEG_INFINITY, f32::max);
        best + second
    };
    // Few groups (8 in DeepSeek-V3): rank them with a bit mask, no allocation.
    let mut kept = 0u64;
    for _ in 0..groups.used {
        let best = (0..groups.count)
            .filter(|g| kept & (1 << g) == 0)
            .map(|g| (g, group_score(&selection[g * per_group..(g + 1) * per_group])))
            .fold(None, |best: Option<(usize, f32)>, (g, score)| match best {
                Some((_, b)) if b >= score => best,
                _ => Some((g, score)),
            });
        if let Some((g, _)) = best {
            kept |= 1 << g;
        }
    }
    for (g, group) in selection.chunks_exact_mut(per_group).enumerate() {
        if kept & (1 << g) == 0 {
            group.fill(f32::NEG_INFINITY);
        }
    }
}

/// A layer's experts and their router.
pub(crate) struct Experts {
    router: Matrix,
    /// Added to the router's logits (gpt-oss).
    router_bias: Option<Vec<f32>>,
    /// Added to the router's scores to choose experts (DeepSeek-V3's `exp_probs_b`).
    selection_bias: Option<Vec<f32>>,
    gate: Vec<Matrix>,
    up: Vec<Matrix>,
    down: Vec<Matrix>,
    /// Each expert's biases on its three projections (gpt-oss).
    biases: Option<Box<ExpertBiases>>,
    activation: Activation,
    shared: Option<SharedExperts>,
    routing: Routing,
    hidden: usize,
    expert_ffn: usize,
}

/// `(experts, width)` biases of the experts' gate, up and down projections: as tensors on
/// the model's device, and their values on the CPU.
struct ExpertBiases {
    gate: Tensor,
    up: Tensor,
    down: Tensor,
    gate_values: Vec<f32>,
    up_values: Vec<f32>,
    down_values: Vec<f32>,
}

impl ExpertBiases {
    fn load(
        loader: &mut TensorLoader<'_>,
        layer: usize,
        experts: usize,
        ffn: usize,
        hidden: usize,
    ) -> Result<Option<Box<Self>>> {
        let name = |t| TensorName::Layer(layer, t);
        if !loader.contains(name(LayerTensor::GateExpertsBias)) {
            return Ok(None);
        }
        let mut load = |t: LayerTensor, width: usize| -> Result<(Tensor, Vec<f32>)> {
            let bias = loader.dense(name(t))?;
            if bias.dims() != [experts, width] {
                return Err(Error::InvalidModel(format!(
                    "layer {layer}: expert biases of shape {:?}, not [{experts}, {width}]",
                    bias.dims()
                )));
            }
            let values = bias.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            Ok((bias, values))
        };
        let (gate, gate_values) = load(LayerTensor::GateExpertsBias, ffn)?;
        let (up, up_values) = load(LayerTensor::UpExpertsBias, ffn)?;
        let (down, down_values) = load(LayerTensor::DownExpertsBias, hidden)?;
        Ok(Some(Box::new(Self { gate, up, down, gate_values, up_values, down_values })))
    }
}

/// One value per expert of a layer, on the CPU, if the layer has the tensor.
fn per_expert_values(loader: &mut TensorLoader<'_>, name: TensorName, experts: usize) -> Result<Option<Vec<f32>>> {
    if !loader.contains(name) {
        return Ok(None);
    }
    let values = loader.dense(name)?.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    if values.len() != experts {
        return Err(Error::InvalidModel(format!("{name:?}: {} values for {experts} experts", values.len())));
    }
    Ok(Some(values))
}

/// The experts every token goes through, as one SwiGLU feed-forward.
struct SharedExperts {
    gate: Matrix,
    up: Matrix,
    down: Matrix,
}

/// The CPU path's buffers for one layer's experts, reused from layer to layer.
#[derive(Default)]
pub(crate) struct Scratch {
    logits: Vec<f32>,
    selection: Vec<f32>,
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
    pub(crate) fn load(
        moe: &MoeConfig,
        activation: Activation,
        hidden: usize,
        layer: usize,
        loader: &mut TensorLoader<'_>,
    ) -> Result<Self> {
        let router_name = TensorName::Layer(layer, LayerTensor::Router);
        if !loader.contains(router_name) {
            return Err(Error::InvalidModel(format!("layer {layer} has experts but no router (`ffn_gate_inp`)")));
        }
        if moe.experts_used > MAX_EXPERTS_USED.min(moe.experts) {
            return Err(Error::InvalidModel(format!("{} experts used of {}", moe.experts_used, moe.experts)));
        }
        let router = loader.matrix(router_name)?;
        let router_bias = per_expert_values(loader, TensorName::Layer(layer, LayerTensor::RouterBias), moe.experts)?;
        let selection_bias = per_expert_values(loader, TensorName::Layer(layer, LayerTensor::SelectionBias), moe.experts)?;
        let shared = if moe.shared_experts > 0 {
            let name = |t| TensorName::Layer(layer, t);
            Some(SharedExperts {
                gate: loader.matrix(name(LayerTensor::SharedGate))?,
                up: loader.matrix(name(LayerTensor::SharedUp))?,
                down: loader.matrix(name(LayerTensor::SharedDown))?,
            })
        } else {
            None
        };
        let (n, ffn) = (moe.experts, moe.expert_ffn);
        Ok(Self {
            router,
            router_bias,
            selection_bias,
            gate: loader.experts(layer, ExpertTensor::Gate, n, (ffn, hidden))?,
            up: loader.experts(layer, ExpertTensor::Up, n, (ffn, hidden))?,
            down: loader.experts(layer, ExpertTensor::Down, n, (hidden, ffn))?,
            biases: ExpertBiases::load(loader, layer, n, ffn, hidden)?,
            activation,
            shared,
            routing: Routing::new(moe),
            hidden,
            expert_ffn: ffn,
        })
    }

    /// The CPU path: the experts' mixed output for the `rows` rows of `x`, into `out`.
    pub(crate) fn forward_native(&self, x: &[f32], rows: usize, out: &mut Vec<f32>, s: &mut Scratch) -> Result<()> {
        let (hidden, used) = (self.hidden, self.routing.used);
        self.router.forward_into(x, rows, &mut s.logits)?;
        if let Some(bias) = &self.router_bias {
            ops::add_rows(&mut s.logits, bias);
        }
        self.routing.route(&mut s.logits, self.selection_bias.as_deref(), &mut s.selection, &mut s.choices);
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
            let (ffn, hidden_range) = (expert * self.expert_ffn..(expert + 1) * self.expert_ffn, expert * hidden..(expert + 1) * hidden);
            self.gate[expert].forward_into(&s.input, n, &mut s.gate)?;
            self.up[expert].forward_into(&s.input, n, &mut s.up)?;
            if let Some(biases) = &self.biases {
                ops::add_rows(&mut s.gate, &biases.gate_values[ffn.clone()]);
                ops::add_rows(&mut s.up, &biases.up_values[ffn]);
            }
            match self.activation {
                Activation::ClampedSwiglu => ops::clamped_swiglu_mul(&mut s.gate, &s.up),
                _ => ops::silu_mul(&mut s.gate, &s.up, self.expert_ffn),
            }
            self.down[expert].forward_into(&s.gate, n, &mut s.output)?;
            if let Some(biases) = &self.biases {
                ops::add_rows(&mut s.output, &biases.down_values[hidden_range]);
            }
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
        if let Some(shared) = &self.shared {
            shared.gate.forward_into(x, rows, &mut s.gate)?;
            shared.up.forward_into(x, rows, &mut s.up)?;
            let width = s.gate.len() / rows;
            ops::silu_mul(&mut s.gate, &s.up, width);
            shared.down.forward_into(&s.gate, rows, &mut s.output)?;
            ops::add_assign(out, &s.output);
        }
        Ok(())
    }

    /// candle's path: `x` is `(1, positions, hidden)`. The routing is computed on the host
    /// (it is a few values per token), the experts' products on `x`'s device.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (batch, positions, hidden) = x.dims3()?;
        let x = x.reshape((batch * positions, hidden))?;
        let mut logits = self.router.forward(&x)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        if let Some(bias) = &self.router_bias {
            ops::add_rows(&mut logits, bias);
        }
        let (mut selection, mut choices) = (Vec::new(), Vec::new());
        self.routing.route(&mut logits, self.selection_bias.as_deref(), &mut selection, &mut choices);
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
            let bias = |biases: &Tensor| biases.get(expert)?.to_dtype(input.dtype());
            let (mut gate, mut up) = (self.gate[expert].forward(&input)?, self.up[expert].forward(&input)?);
            if let Some(biases) = &self.biases {
                gate = gate.broadcast_add(&bias(&biases.gate)?)?;
                up = up.broadcast_add(&bias(&biases.up)?)?;
            }
            let gated = match self.activation {
                Activation::ClampedSwiglu => clamped_swiglu(&gate, &up)?,
                _ => (candle_nn::ops::silu(&gate)? * up)?,
            };
            let mut output = self.down[expert].forward(&gated)?;
            if let Some(biases) = &self.biases {
                output = output.broadcast_add(&bias(&biases.down)?)?;
            }
            let output = output.broadcast_mul(&weights)?;
            out = out.index_add(&rows, &output, 0)?;
        }
        if let Some(shared) = &self.shared {
            let gated = (candle_nn::ops::silu(&shared.gate.forward(&x)?)? * shared.up.forward(&x)?)?;
            out = (out + shared.down.forward(&gated)?)?;
        }
        Ok(out.reshape((batch, positions, hidden))?)
    }
}

/// gpt-oss's clamped SwiGLU on candle's path (`ops::clamped_swiglu_mul`).
pub(crate) fn clamped_swiglu(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    let x = gate.minimum(ops::SWIGLU_LIMIT as f64)?;
    let y = up.clamp(-ops::SWIGLU_LIMIT as f64, ops::SWIGLU_LIMIT as f64)?;
    let glu = (&x * candle_nn::ops::sigmoid(&(&x * ops::SWIGLU_ALPHA as f64)?)?)?;
    glu * (y + 1.0)?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn moe(experts: usize, used: usize, normalize: bool, scale: f32) -> MoeConfig {
        MoeConfig {
            experts,
            experts_used: used,
            expert_ffn: 1,
            normalize_weights: normalize,
            weights_scale: scale,
            gating: Gating::Softmax,
            groups: None,
            shared_experts: 0,
            dense_layers: 0,
        }
    }

    fn routing(experts: usize, used: usize, normalize: bool, scale: f32) -> Routing {
        Routing::new(&moe(experts, used, normalize, scale))
    }

    fn route(routing: &Routing, logits: &mut [f32], bias: Option<&[f32]>) -> Vec<Choice> {
        let mut choices = Vec::new();
        routing.route(logits, bias, &mut Vec::new(), &mut choices);
        choices
    }

    #[test]
    fn each_token_takes_its_best_experts_best_first() {
        let mut logits = vec![0.0, 2.0, 1.0, -1.0, /* second token */ 3.0, 0.0, 0.0, 3.5];
        let choices = route(&routing(4, 2, false, 1.0), &mut logits, None);
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
        let choices = route(&routing(6, 3, true, 1.0), &mut logits, None);
        let sum: f32 = choices.iter().map(|c| c.weight).sum();
        assert!((sum - 1.0).abs() < 1e-6, "{choices:?}");
        assert_eq!(choices.iter().map(|c| c.expert).collect::<Vec<_>>(), [1, 3, 0]);
        assert!((choices[0].weight / choices[1].weight - 0.5f32.exp()).abs() < 1e-5);
    }

    #[test]
    fn a_scale_multiplies_the_weights_and_ties_go_to_the_lower_expert() {
        let mut logits = vec![1.0, 1.0, 1.0];
        let choices = route(&routing(3, 2, true, 2.5), &mut logits, None);
        assert_eq!(choices, [Choice { expert: 0, weight: 1.25 }, Choice { expert: 1, weight: 1.25 }]);
    }

    /// DeepSeek-V3: sigmoid scores, a bias that chooses but does not weigh, and only the
    /// best groups' experts in the running.
    #[test]
    fn the_bias_and_the_groups_choose_and_the_sigmoid_weighs() {
        let config = MoeConfig {
            gating: Gating::Sigmoid,
            groups: Some(ExpertGroups { count: 3, used: 1 }),
            ..moe(6, 2, false, 1.0)
        };
        let routing = Routing::new(&config);
        let sigmoid = |x: f32| 1.0 / (1.0 + (-x).exp());
        // Groups {0,1} {2,3} {4,5}, scored by their two best sigmoids: 0.77, 1.17, 0.93.
        // Expert 4 scores best, but its group does not win, so it is not chosen.
        let logits = [0.0f32, -1.0, 0.5, 0.2, 2.0, -3.0];
        let choices = route(&routing, &mut logits.clone(), None);
        assert_eq!(choices.iter().map(|c| c.expert).collect::<Vec<_>>(), [2, 3]);
        assert_eq!(choices[0].weight, sigmoid(0.5));
        // The bias lifts group {0,1} and its experts are chosen, weighted unbiased.
        let bias = [1.0f32, 1.0, 0.0, 0.0, 0.0, 0.0];
        let choices = route(&routing, &mut logits.clone(), Some(&bias));
        assert_eq!(choices.iter().map(|c| c.expert).collect::<Vec<_>>(), [0, 1]);
        assert_eq!((choices[0].weight, choices[1].weight), (sigmoid(0.0), sigmoid(-1.0)));
        // With two groups in the running, expert 4 is.
        let two_groups = Routing::new(&MoeConfig { groups: Some(ExpertGroups { count: 3, used: 2 }), ..config });
        let choices = route(&two_groups, &mut logits.clone(), None);
        assert_eq!(choices.iter().map(|c| c.expert).collect::<Vec<_>>(), [4, 2]);
    }

    /// gpt-oss's SwiGLU clamps the gate above and the up projection both ways, on both
    /// paths (the tiny test models' activations never reach the limits).
    #[test]
    fn the_clamped_swiglu_clamps_on_both_paths() {
        let gate = [-10.0f32, -1.0, 0.0, 3.0, 7.0, 8.0, 20.0, 2.0];
        let up = [0.5f32, -9.0, 1.0, 12.0, -0.5, 0.0, 2.0, -7.5];
        let expected: Vec<f32> = gate
            .iter()
            .zip(&up)
            .map(|(&g, &u)| {
                let x = g.min(7.0) as f64;
                let y = (u as f64).clamp(-7.0, 7.0);
                (x / (1.0 + (-1.702 * x).exp()) * (y + 1.0)) as f32
            })
            .collect();
        let mut native = gate.to_vec();
        ops::clamped_swiglu_mul(&mut native, &up);
        let device = Device::Cpu;
        let candle = clamped_swiglu(&Tensor::new(&gate, &device).unwrap(), &Tensor::new(&up, &device).unwrap()).unwrap();
        let candle = candle.to_vec1::<f32>().unwrap();
        for i in 0..gate.len() {
            assert!((native[i] - expected[i]).abs() <= 1e-5 * expected[i].abs().max(1.0), "{i}: {} vs {}", native[i], expected[i]);
            assert!((candle[i] - expected[i]).abs() <= 1e-5 * expected[i].abs().max(1.0), "{i}: {} vs {}", candle[i], expected[i]);
        }
        // 8 and 20 are clamped to 7: the same output for the same `up`.
        assert_eq!(native[4] / 0.5f32.mul_add(-1.0, 1.0), native[5] / 1.0);
    }

    /// gpt-oss: experts are chosen by their logits and weighted by a softmax over the
    /// chosen ones alone.
    #[test]
    fn softmax_of_chosen_weighs_only_the_chosen() {
        let routing = Routing::new(&MoeConfig { gating: Gating::SoftmaxOfChosen, ..moe(4, 2, false, 1.0) });
        let choices = route(&routing, &mut [1.0, 3.0, -2.0, 2.0], None);
        assert_eq!(choices.iter().map(|c| c.expert).collect::<Vec<_>>(), [1, 3]);
        let z = 3.0f32.exp() + 2.0f32.exp();
        assert!((choices[0].weight - 3.0f32.exp() / z).abs() < 1e-6);
        assert!((choices[1].weight - 2.0f32.exp() / z).abs() < 1e-6);
    }
}

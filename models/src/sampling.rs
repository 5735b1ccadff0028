//! Choosing the next token from logits, and spotting stop strings in the decoded text.
//!
//! [`Sampler`] works on a plain `&[f32]` of logits (one per token id), so it is the same
//! on every device and is easy to test. Its whole state — the parameters plus the
//! position in the random stream — fits in a [`SamplerState`], which travels with a
//! request: a request resumed on another node continues the exact same random stream.
//!
//! Stop *tokens* (EOS, end-of-turn) are the caller's business: it compares the sampled id
//! against the ids the tokenizer reports. Stop *strings* are found in the decoded text by
//! [`StopMatcher`].

mod stop;

pub use stop::{StopMatcher, StopStatus};

use crate::{Error, Result};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde::{Deserialize, Serialize};
use std::cmp::Ordering;
use std::fmt;

/// Temperatures below this are treated as zero: the scaled logits would overflow long
/// before the distribution stops being a point mass on the argmax.
const GREEDY_TEMPERATURE: f32 = 1e-5;

/// The highest temperature [`SamplingParams::validate`] accepts, as in the OpenAI API.
const MAX_TEMPERATURE: f32 = 2.0;

/// How to pick each next token.
///
/// Deserialized values are untrusted: call [`validate`](Self::validate) before using
/// them. (A [`Sampler`] never panics on bad parameters, but it does not report them.)
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// Divides the logits before the softmax. `0` means greedy (always the most likely
    /// token); higher values flatten the distribution. Valid range: `0..=2`.
    pub temperature: f32,
    /// Nucleus sampling: draw only from the smallest set of most likely tokens whose
    /// probability adds up to at least `top_p`. `1` turns it off. Valid range: `(0, 1]`.
    pub top_p: f32,
    /// Draw only from the `top_k` most likely tokens. `0` turns it off.
    pub top_k: usize,
    /// Seeds the random stream: the same seed, parameters and logits give the same
    /// tokens.
    pub seed: u64,
}

impl SamplingParams {
    /// Always the most likely token; no randomness involved.
    pub fn greedy() -> Self {
        Self { temperature: 0.0, ..Self::default() }
    }

    /// Checks that every parameter is in its documented range.
    pub fn validate(&self) -> Result<()> {
        let Self { temperature, top_p, .. } = *self;
        // Written as negated range checks so that NaN fails them too.
        if !(0.0..=MAX_TEMPERATURE).contains(&temperature) {
            return Err(Error::InvalidInput(format!(
                "temperature must be between 0 and {MAX_TEMPERATURE}, got {temperature}"
            )));
        }
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(Error::InvalidInput(format!(
                "top_p must be greater than 0 and at most 1, got {top_p}"
            )));
        }
        Ok(())
    }
}

/// The OpenAI API's defaults: temperature 1 and top-p 1 (plain sampling from the model's
/// distribution), no top-k, seed 0.
///
/// Every request built from the default shares seed 0 and therefore the same random
/// stream; a server should pick a fresh seed for requests that do not name one.
impl Default for SamplingParams {
    fn default() -> Self {
        Self { temperature: 1.0, top_p: 1.0, top_k: 0, seed: 0 }
    }
}

/// Everything needed to resume a [`Sampler`] exactly where it stopped, on any machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplerState {
    pub params: SamplingParams,
    /// Position in the ChaCha20 stream seeded by `params.seed`, in 32-bit words.
    pub word_pos: u128,
}

/// Picks next tokens from logits; see the [module docs](self).
///
/// The same seed, parameters and logits give the same tokens on every platform.
/// Every non-greedy [`sample`](Self::sample) consumes exactly one 64-bit draw from the
/// random stream, whatever the logits, so the stream position depends only on how many
/// tokens have been sampled. Greedy sampling consumes none.
pub struct Sampler {
    params: SamplingParams,
    /// ChaCha20 rather than a faster generator because its stream is specified: the
    /// same seed and word position give the same draws on every platform and every
    /// version of the crate, which is what lets a request move between nodes.
    rng: ChaCha20Rng,
    scratch: Scratch,
}

/// Buffers reused across calls, so that sampling allocates nothing once it has seen the
/// vocabulary size.
#[derive(Default)]
struct Scratch {
    /// The tokens still in the running.
    candidates: Vec<Candidate>,
    /// Top-p: the tokens in the bucket where the nucleus ends.
    edge: Vec<Candidate>,
    /// Top-p: the probability mass in each weight bucket.
    bucket_mass: Vec<f64>,
}

/// A token still in the running. `weight` holds the logit until the softmax, then the
/// unnormalized probability, in `[0, 1]`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Candidate {
    id: u32,
    weight: f32,
}

/// Most likely first; equal weights in id order, so that which tokens survive a cut
/// (top-k, top-p) is well defined and never depends on the selection algorithm.
fn by_weight_desc(a: &Candidate, b: &Candidate) -> Ordering {
    b.weight.total_cmp(&a.weight).then(a.id.cmp(&b.id))
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        Self::at(params, 0)
    }

    /// Resumes the random stream recorded by [`state`](Self::state).
    pub fn from_state(state: &SamplerState) -> Self {
        Self::at(state.params, state.word_pos)
    }

    /// A snapshot from which [`from_state`](Self::from_state) continues the same stream.
    pub fn state(&self) -> SamplerState {
        SamplerState { params: self.params, word_pos: self.rng.get_word_pos() }
    }

    fn at(params: SamplingParams, word_pos: u128) -> Self {
        let mut rng = ChaCha20Rng::seed_from_u64(params.seed);
        rng.set_word_pos(word_pos);
        Self { params, rng, scratch: Scratch::default() }
    }

    /// Picks the next token from `logits`, indexed by token id.
    ///
    /// With a temperature of (nearly) zero this is the argmax, ties going to the lowest
    /// id. Otherwise it applies top-k, then the softmax with temperature, then top-p,
    /// and draws from what is left. NaN logits are never picked, nor are `-inf` ones
    /// unless every logit is `-inf`. If the top logit is infinite the softmax is
    /// undefined, so the argmax is taken instead. If there is nothing to pick (no
    /// logits, or all NaN) it returns 0, leaving the caller's length limit to end the
    /// request.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        debug_assert!(u32::try_from(logits.len()).is_ok(), "token ids are u32");
        let SamplingParams { temperature, top_p, top_k, .. } = self.params;
        // A NaN temperature (params are not validated here) means greedy too.
        if temperature.is_nan() || temperature < GREEDY_TEMPERATURE {
            return argmax(logits);
        }
        // Draw before looking at the logits, so that every call advances the stream by
        // the same amount (see the type docs).
        let u = unit_f64(self.rng.next_u64());

        let max = max_logit(logits);
        if !max.is_finite() {
            return first_at(logits, max);
        }

        let Scratch { candidates, edge, bucket_mass } = &mut self.scratch;
        if top_k > 0 && top_k < logits.len() {
            top_k_candidates(logits, top_k, candidates);
        } else {
            // NaN logits come along but get weight 0 below: cheaper than filtering here.
            candidates.clear();
            candidates.extend(
                logits.iter().enumerate().map(|(id, &logit)| Candidate { id: id as u32, weight: logit }),
            );
        }

        // Softmax with temperature, shifted by the max so that the weights are in
        // `[0, 1]` with the max at exactly 1. Normalizing is left to the draw, which
        // scales the uniform number instead. (A separate pass rather than fused into the
        // one above: alone, this loop vectorizes.)
        let inv_temperature = 1.0 / temperature;
        for c in candidates.iter_mut() {
            c.weight = exp_nonpositive((c.weight - max) * inv_temperature);
        }

        // A NaN top_p is treated as tiny rather than as "off".
        if top_p.is_nan() || top_p < 1.0 {
            nucleus(candidates, top_p.max(0.0), edge, bucket_mass);
        }
        pick(candidates, u)
    }
}

impl fmt::Debug for Sampler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sampler")
            .field("params", &self.params)
            .field("word_pos", &self.rng.get_word_pos())
            .finish_non_exhaustive()
    }
}

/// The lowest id among the largest non-NaN logits, or 0 if there are none.
fn argmax(logits: &[f32]) -> u32 {
    first_at(logits, max_logit(logits))
}

/// The largest logit, ignoring NaN; `-inf` if there is none.
fn max_logit(logits: &[f32]) -> f32 {
    // Independent lanes let the compiler use SIMD max instructions; a single running
    // max would be a chain of dependent compares. `l > max` is false for NaN.
    const LANES: usize = 8;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = logits.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (max, &l) in lanes.iter_mut().zip(chunk) {
            *max = if l > *max { l } else { *max };
        }
    }
    lanes.iter().chain(tail).fold(f32::NEG_INFINITY, |max, &l| if l > max { l } else { max })
}

/// The lowest id whose logit is `max` (from [`max_logit`]), or 0 if there is none.
fn first_at(logits: &[f32], max: f32) -> u32 {
    let id = if max == f32::NEG_INFINITY {
        // Every logit is -inf or NaN: all -inf tie.
        logits.iter().position(|l| !l.is_nan())
    } else {
        logits.iter().position(|&l| l == max)
    };
    id.map_or(0, |id| id as u32)
}

/// Maps 64 random bits to a uniform number in `[0, 1)`.
///
/// Done here rather than through `rand`'s distributions so that the mapping, and with it
/// every sampled token, cannot change under a dependency upgrade on some nodes only.
fn unit_f64(bits: u64) -> f64 {
    // The top 53 bits fill an f64 mantissa exactly.
    (bits >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// `e^x` for `x <= 0` (or NaN, which gives 0), within 3e-7 relative error.
///
/// Written out rather than calling `f32::exp` because it vectorizes (the softmax over a
/// large vocabulary is the sampler's main cost), and because, being plain IEEE
/// arithmetic, it gives the same bits on every platform, which libm does not promise.
/// Results below `e^-87` (about 1e-38, where f32 turns subnormal) are flushed to 0.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    // Adding 1.5 * 2^23 rounds to an integer, which then sits in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    // ln 2 split so that `k * LN2_HI` is exact for the |k| <= 126 that occur here
    // (Cody-Waite reduction), keeping the reduced argument accurate.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let shifted = x * std::f32::consts::LOG2_E + ROUND;
    let k = shifted - ROUND;
    let k_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    // e^x = 2^k * e^r with |r| <= ln(2) / 2, where degree 6 Taylor suffices.
    let r = (x - k * LN2_HI) - k * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (1.0 / 2.0 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // Multiply by 2^k by adding k to the exponent field (wrapping handles k < 0).
    let e = f32::from_bits(p.to_bits().wrapping_add(k_bits << 23));
    if x >= -87.0 {
        e
    } else {
        0.0
    }
}

/// Fills `out` with the `k` most likely tokens (`0 < k < logits.len()`), in no
/// particular order. NaN and `-inf` logits are never included.
///
/// One pass that keeps a running bar: a logit at or below the k-th best seen so far
/// cannot make the cut (on a tie the earlier id wins), and after the first few thousand
/// tokens nearly every logit fails that one compare. The buffer is cut back to `k` by a
/// partial sort whenever it reaches `2k`, which keeps the whole pass O(n).
fn top_k_candidates(logits: &[f32], k: usize, out: &mut Vec<Candidate>) {
    out.clear();
    let mut bar = f32::NEG_INFINITY;
    for (id, &logit) in logits.iter().enumerate() {
        if logit > bar {
            out.push(Candidate { id: id as u32, weight: logit });
            if out.len() == 2 * k {
                out.select_nth_unstable_by(k - 1, by_weight_desc);
                out.truncate(k);
                bar = out[k - 1].weight;
            }
        }
    }
    if out.len() > k {
        out.select_nth_unstable_by(k - 1, by_weight_desc);
        out.truncate(k);
    }
}

/// Top-p weight buckets: the bits of a non-negative f32 order like its value, so the
/// exponent and top 4 mantissa bits split each octave of weight into 16 buckets.
const BUCKET_SHIFT: u32 = 19;
/// Weights are at most 1.
const BUCKETS: usize = (1.0f32.to_bits() >> BUCKET_SHIFT) as usize + 1;

fn bucket(weight: f32) -> usize {
    ((weight.to_bits() >> BUCKET_SHIFT) as usize).min(BUCKETS - 1)
}

/// Zeroes the weight of every candidate outside the nucleus: the smallest set of the
/// most likely candidates whose weight is at least `top_p` of the total (at least one
/// candidate).
///
/// Sorting the vocabulary would cost milliseconds when the distribution is flat and the
/// nucleus is most of it. Instead, a histogram of weight finds the bucket where the
/// nucleus ends, and only that edge bucket is ranked exactly. O(n) whatever the
/// distribution.
fn nucleus(candidates: &mut [Candidate], top_p: f32, edge: &mut Vec<Candidate>, bucket_mass: &mut Vec<f64>) {
    bucket_mass.clear();
    bucket_mass.resize(BUCKETS, 0.0);
    for c in candidates.iter() {
        bucket_mass[bucket(c.weight)] += f64::from(c.weight);
    }
    let total: f64 = bucket_mass.iter().sum();
    let threshold = f64::from(top_p) * total;

    // From the top, the first non-empty bucket that brings the mass to the threshold.
    let mut above = 0.0;
    let mut edge_bucket = 0;
    for (b, &mass) in bucket_mass.iter().enumerate().rev() {
        if mass > 0.0 && above + mass >= threshold {
            edge_bucket = b;
            break;
        }
        above += mass;
    }

    edge.clear();
    edge.extend(candidates.iter().filter(|c| bucket(c.weight) == edge_bucket));
    let keep = select_mass(edge, threshold - above);
    // The least likely candidate kept: the nucleus is everything that ranks with it or
    // above (see `by_weight_desc`).
    let Some(&cut) = keep.checked_sub(1).and_then(|last| edge.get(last)) else {
        return;
    };
    for c in candidates.iter_mut() {
        // Weights are never NaN here, so plain compares rank like `by_weight_desc`.
        // Non-short-circuit `|` and `&` keep this branch-free: the outcome is random
        // from one token to the next, and mispredictions tripled the cost.
        let below = (c.weight < cut.weight) | ((c.weight == cut.weight) & (c.id > cut.id));
        c.weight = if below { 0.0 } else { c.weight };
    }
}

/// Moves to the front the smallest set of the most likely candidates whose weights add
/// up to at least `need`, and returns its size: at least 1, or all of them if even that
/// is not enough. The last of that set ranks lowest. Expected O(n): a bisection on the
/// rank of the cut, each step a partial sort of the part that still holds it.
fn select_mass(candidates: &mut [Candidate], need: f64) -> usize {
    // Invariants: `candidates[..lo]` are the `lo` most likely, and fall short of `need`
    // with mass `short`; `candidates[lo..hi]` all rank above `candidates[hi..]`; the
    // answer is in `lo + 1..=hi`. So at the end `candidates[lo]` is the last one kept.
    let (mut lo, mut hi) = (0, candidates.len());
    let mut short = 0.0;
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        candidates[lo..hi].select_nth_unstable_by(mid - lo - 1, by_weight_desc);
        let upper = mass(&candidates[lo..mid]);
        if short + upper >= need {
            hi = mid;
        } else {
            short += upper;
            lo = mid;
        }
    }
    hi
}

/// Weights are summed in blocks of this many, each block in f32 and the blocks in f64:
/// f32 lanes vectorize, and 256 terms of at most 1 lose no precision that matters.
const BLOCK: usize = 256;

/// The total weight.
fn mass(candidates: &[Candidate]) -> f64 {
    candidates.chunks(BLOCK).map(block_mass).sum()
}

/// The total weight of at most [`BLOCK`] candidates, summed in independent lanes so
/// that it vectorizes.
fn block_mass(block: &[Candidate]) -> f64 {
    const LANES: usize = 8;
    let mut lanes = [0.0f32; LANES];
    let chunks = block.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (sum, c) in lanes.iter_mut().zip(chunk) {
            *sum += c.weight;
        }
    }
    f64::from(lanes.iter().chain(tail.iter().map(|c| &c.weight)).sum::<f32>())
}

/// Draws a candidate with probability proportional to its weight, given `u` uniform in
/// `[0, 1)`. Never returns a zero-weight candidate if any weight is positive.
fn pick(candidates: &[Candidate], u: f64) -> u32 {
    // Walking a running sum token by token is a chain of dependent adds; skipping
    // whole blocks by their (vectorized) mass first makes the walk short.
    let target = u * mass(candidates);
    let last_positive = |cs: &[Candidate]| cs.iter().rev().find(|c| c.weight > 0.0).map(|c| c.id);

    let mut cumulative = 0.0;
    for block in candidates.chunks(BLOCK) {
        let block_mass = block_mass(block);
        if cumulative + block_mass > target {
            for c in block {
                cumulative += f64::from(c.weight);
                if cumulative > target {
                    return c.id;
                }
            }
            // The token-by-token sum rounded differently from the block's: the target is
            // at its very end.
            return last_positive(block).unwrap_or(0);
        }
        cumulative += block_mass;
    }
    // Rounding left the target at or past the total.
    last_positive(candidates).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_p: f32, top_k: usize, seed: u64) -> SamplingParams {
        SamplingParams { temperature, top_p, top_k, seed }
    }

    /// Logits with some structure and many distinct values, as a model would give.
    fn fake_logits(n: usize, salt: u32) -> Vec<f32> {
        (0..n as u32)
            .map(|i| {
                let h = (i ^ salt).wrapping_mul(2_654_435_761).rotate_left(13) ^ salt;
                (h % 10_000) as f32 / 1000.0 - 5.0
            })
            .collect()
    }

    fn draw_many(sampler: &mut Sampler, n: usize) -> Vec<u32> {
        (0..n).map(|i| sampler.sample(&fake_logits(1000, i as u32))).collect()
    }

    #[test]
    fn greedy_picks_argmax() {
        let mut s = Sampler::new(SamplingParams::greedy());
        assert_eq!(s.sample(&[0.1, 3.0, -2.0, 2.9]), 1);
        assert_eq!(s.sample(&[f32::NEG_INFINITY, -1e30, -5.0]), 2);
        let logits = fake_logits(50_000, 7);
        let expected = logits
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0)))
            .map(|(i, _)| i as u32);
        assert_eq!(Some(s.sample(&logits)), expected);
    }

    #[test]
    fn greedy_ties_go_to_lowest_id() {
        let mut s = Sampler::new(SamplingParams::greedy());
        assert_eq!(s.sample(&[1.0, 5.0, 2.0, 5.0, 5.0]), 1);
        assert_eq!(s.sample(&[7.0, 7.0]), 0);
        assert_eq!(s.sample(&[f32::NEG_INFINITY; 3]), 0);
    }

    #[test]
    fn temperature_below_threshold_is_greedy() {
        let mut s = Sampler::new(params(1e-6, 1.0, 0, 3));
        let logits = fake_logits(1000, 1);
        let greedy = argmax(&logits);
        for _ in 0..100 {
            assert_eq!(s.sample(&logits), greedy);
        }
        assert_eq!(s.state().word_pos, 0, "greedy consumes no randomness");
    }

    #[test]
    fn nan_is_never_picked() {
        let mut greedy = Sampler::new(SamplingParams::greedy());
        assert_eq!(greedy.sample(&[f32::NAN, 1.0, f32::NAN, 0.5]), 1);
        assert_eq!(greedy.sample(&[1.0, f32::NAN, 2.0]), 2);
        let mut hot = Sampler::new(params(2.0, 1.0, 0, 9));
        let logits = [f32::NAN, 0.0, f32::NAN, 0.0, f32::NAN];
        for _ in 0..1000 {
            let id = hot.sample(&logits);
            assert!(id == 1 || id == 3, "picked NaN logit {id}");
        }
        let mut top_k = Sampler::new(params(1.0, 0.9, 2, 9));
        for _ in 0..1000 {
            assert_ne!(top_k.sample(&[f32::NAN, f32::NAN, 1.0, 1.0, 0.5]), 0);
        }
    }

    #[test]
    fn masked_tokens_are_never_picked() {
        let mut s = Sampler::new(params(2.0, 1.0, 0, 10));
        let logits = [f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY, -50.0];
        for _ in 0..1000 {
            let id = s.sample(&logits);
            assert!(id == 1 || id == 3, "picked -inf logit {id}");
        }
    }

    #[test]
    fn degenerate_logits_do_not_panic() {
        for p in [SamplingParams::greedy(), params(1.0, 0.5, 3, 1)] {
            let mut s = Sampler::new(p);
            assert_eq!(s.sample(&[]), 0);
            assert_eq!(s.sample(&[f32::NAN, f32::NAN]), 0);
            assert_eq!(s.sample(&[0.0, f32::INFINITY, 1.0, f32::INFINITY]), 1);
            let all_neg_inf = s.sample(&[f32::NEG_INFINITY; 4]);
            assert!(all_neg_inf < 4);
        }
    }

    #[test]
    fn unvalidated_params_do_not_panic() {
        let logits = fake_logits(100, 2);
        let greedy = argmax(&logits);
        assert_eq!(Sampler::new(params(f32::NAN, 1.0, 0, 0)).sample(&logits), greedy);
        assert_eq!(Sampler::new(params(-1.0, 1.0, 0, 0)).sample(&logits), greedy);
        assert_eq!(Sampler::new(params(1.0, f32::NAN, 0, 0)).sample(&logits), greedy);
        assert_eq!(Sampler::new(params(1.0, -3.0, 0, 0)).sample(&logits), greedy);
        let id = Sampler::new(params(f32::INFINITY, 1.0, 0, 0)).sample(&logits);
        assert!((id as usize) < logits.len());
    }

    #[test]
    fn same_seed_same_tokens() {
        let p = params(0.8, 0.95, 40, 42);
        let a = draw_many(&mut Sampler::new(p), 500);
        let b = draw_many(&mut Sampler::new(p), 500);
        assert_eq!(a, b);
        let c = draw_many(&mut Sampler::new(SamplingParams { seed: 43, ..p }), 500);
        assert_ne!(a, c);
    }

    #[test]
    fn state_round_trip_continues_the_stream() {
        let mut original = Sampler::new(params(1.0, 0.9, 0, 1234));
        draw_many(&mut original, 37);
        let snapshot = original.state();

        let json = serde_json::to_string(&snapshot).expect("serialize");
        let decoded: SamplerState = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(decoded, snapshot);

        let mut resumed = Sampler::from_state(&decoded);
        assert_eq!(resumed.state(), snapshot);
        assert_eq!(draw_many(&mut original, 200), draw_many(&mut resumed, 200));
    }

    #[test]
    fn each_draw_advances_the_stream_by_one_u64() {
        let mut s = Sampler::new(params(1.0, 0.5, 5, 0));
        s.sample(&fake_logits(100, 0));
        s.sample(&[]);
        s.sample(&[f32::NAN]);
        s.sample(&[0.0, f32::INFINITY]);
        assert_eq!(s.state().word_pos, 8);
    }

    #[test]
    fn top_k_one_is_greedy() {
        for temperature in [0.1, 1.0, 2.0] {
            let mut s = Sampler::new(params(temperature, 1.0, 1, 5));
            for salt in 0..50 {
                let logits = fake_logits(5000, salt);
                assert_eq!(s.sample(&logits), argmax(&logits));
            }
            // Ties still go to the lowest id.
            assert_eq!(s.sample(&[0.0, 3.0, 1.0, 3.0]), 1);
        }
    }

    #[test]
    fn tiny_top_p_is_greedy() {
        let mut s = Sampler::new(params(2.0, 1e-6, 0, 5));
        for salt in 0..50 {
            let logits = fake_logits(5000, salt);
            assert_eq!(s.sample(&logits), argmax(&logits));
        }
        assert_eq!(s.sample(&[0.0, 3.0, 1.0, 3.0]), 1);
    }

    /// Frequencies of each id over `draws` samples.
    fn histogram(p: SamplingParams, logits: &[f32], draws: usize) -> Vec<f64> {
        let mut s = Sampler::new(p);
        let mut counts = vec![0usize; logits.len()];
        for _ in 0..draws {
            counts[s.sample(logits) as usize] += 1;
        }
        counts.iter().map(|&c| c as f64 / draws as f64).collect()
    }

    fn softmax(logits: &[f32], temperature: f32) -> Vec<f64> {
        let exps: Vec<f64> = logits.iter().map(|&l| (f64::from(l / temperature)).exp()).collect();
        let sum: f64 = exps.iter().sum();
        exps.iter().map(|e| e / sum).collect()
    }

    fn assert_close(actual: &[f64], expected: &[f64]) {
        // 20k draws: the standard error of each frequency is at most 0.0035.
        for (a, e) in actual.iter().zip(expected) {
            assert!((a - e).abs() < 0.015, "frequencies {actual:?}, expected {expected:?}");
        }
    }

    #[test]
    fn draws_follow_the_softmax() {
        let logits = [1.0, 2.0, 0.5, -1.0];
        assert_close(&histogram(params(1.0, 1.0, 0, 11), &logits, 20_000), &softmax(&logits, 1.0));
        assert_close(&histogram(params(0.5, 1.0, 0, 12), &logits, 20_000), &softmax(&logits, 0.5));
    }

    #[test]
    fn draws_follow_the_softmax_across_blocks() {
        // The same four tokens, spread over a vocabulary of many blocks of masked tokens,
        // so that the draw has to skip blocks.
        let ids = [3, 700, 701, 9_999];
        let mut logits = vec![f32::NEG_INFINITY; 10_000];
        for (&id, l) in ids.iter().zip([1.0, 2.0, 0.5, -1.0]) {
            logits[id] = l;
        }
        let frequencies = histogram(params(1.0, 1.0, 0, 16), &logits, 20_000);
        let actual: Vec<f64> = ids.iter().map(|&id| frequencies[id]).collect();
        assert_close(&actual, &softmax(&[1.0, 2.0, 0.5, -1.0], 1.0));
    }

    #[test]
    fn top_k_renormalizes_over_the_k_best() {
        let logits = [1.0, 2.0, 0.5, -1.0];
        let expected = {
            let p = softmax(&[1.0, 2.0], 1.0);
            [p[0], p[1], 0.0, 0.0]
        };
        assert_close(&histogram(params(1.0, 1.0, 2, 13), &logits, 20_000), &expected);
    }

    #[test]
    fn top_p_keeps_the_smallest_nucleus() {
        // Probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.75 keeps exactly the first two.
        let logits = [0.5f32, 0.3, 0.15, 0.05].map(f32::ln);
        let expected = [0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0];
        assert_close(&histogram(params(1.0, 0.75, 0, 14), &logits, 20_000), &expected);
        // 0.85 needs the third token too.
        let expected = [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0];
        assert_close(&histogram(params(1.0, 0.85, 0, 15), &logits, 20_000), &expected);
    }

    /// The nucleus by definition: sort everything, keep the shortest prefix that reaches
    /// `top_p` of the mass. Returns the kept ids with positive weight, sorted.
    fn reference_nucleus(candidates: &[Candidate], top_p: f32) -> Vec<u32> {
        let mut sorted = candidates.to_vec();
        sorted.sort_by(by_weight_desc);
        let total: f64 = sorted.iter().map(|c| f64::from(c.weight)).sum();
        let mut sum = 0.0;
        let keep = sorted
            .iter()
            .position(|c| {
                sum += f64::from(c.weight);
                sum >= f64::from(top_p) * total
            })
            .map_or(sorted.len(), |i| i + 1);
        let mut ids: Vec<u32> = sorted[..keep].iter().filter(|c| c.weight > 0.0).map(|c| c.id).collect();
        ids.sort_unstable();
        ids
    }

    fn softmax_candidates(logits: &[f32], temperature: f32) -> Vec<Candidate> {
        let max = max_logit(logits);
        logits
            .iter()
            .enumerate()
            .map(|(id, &l)| Candidate { id: id as u32, weight: exp_nonpositive((l - max) / temperature) })
            .collect()
    }

    #[test]
    fn nucleus_matches_a_full_sort() {
        let mut tied = fake_logits(20_000, 3);
        tied[17] = tied[4];
        tied[18] = tied[4];
        let peaked: Vec<f32> = fake_logits(20_000, 4)
            .iter()
            .enumerate()
            .map(|(i, l)| if i % 997 == 0 { l + 12.0 } else { *l })
            .collect();
        let distributions = [
            ("flat", softmax_candidates(&fake_logits(20_000, 3), 1.0)),
            ("tied", softmax_candidates(&tied, 0.7)),
            ("peaked", softmax_candidates(&peaked, 0.7)),
            ("uniform", softmax_candidates(&[0.5; 3000], 1.0)),
            ("with zeros", softmax_candidates(&[0.0, f32::NEG_INFINITY, -1.0, f32::NAN, -100.0, -0.5], 1.0)),
            ("one", softmax_candidates(&[3.0], 1.0)),
        ];
        let (mut edge, mut bucket_mass) = (Vec::new(), Vec::new());
        for (name, candidates) in &distributions {
            for top_p in [0.0f32, 1e-6, 0.01, 0.3, 0.5, 0.9, 0.999, 0.999_999] {
                let mut kept = candidates.clone();
                nucleus(&mut kept, top_p, &mut edge, &mut bucket_mass);
                // The nucleus zeroes what it drops; zero weights never count as kept.
                let ids: Vec<u32> = kept.iter().filter(|c| c.weight > 0.0).map(|c| c.id).collect();
                assert_eq!(ids, reference_nucleus(candidates, top_p), "{name}, top_p {top_p}");
            }
        }
    }

    #[test]
    fn top_k_matches_a_full_sort() {
        let ascending: Vec<f32> = (0..5000).map(|i| i as f32 * 0.01).collect();
        let mut tied = fake_logits(5000, 5);
        for i in (0..5000).step_by(7) {
            tied[i] = 4.5;
        }
        let mut odd = fake_logits(5000, 6);
        odd[3] = f32::NAN;
        odd[9] = f32::NEG_INFINITY;
        odd[11] = f32::NAN;
        let cases =
            [("ascending", ascending), ("tied", tied), ("odd", odd), ("random", fake_logits(5000, 7))];
        let mut out = Vec::new();
        for (name, logits) in &cases {
            let mut reference: Vec<Candidate> = logits
                .iter()
                .enumerate()
                .filter(|(_, l)| l.is_finite())
                .map(|(id, &weight)| Candidate { id: id as u32, weight })
                .collect();
            reference.sort_by(by_weight_desc);
            for k in [1, 2, 40, 700, 2499, 4999] {
                top_k_candidates(logits, k, &mut out);
                let mut got: Vec<u32> = out.iter().map(|c| c.id).collect();
                got.sort_unstable();
                let mut expected: Vec<u32> = reference.iter().take(k).map(|c| c.id).collect();
                expected.sort_unstable();
                assert_eq!(got, expected, "{name}, k {k}");
            }
        }
    }

    #[test]
    fn exp_is_accurate() {
        let mut worst = 0.0f64;
        for i in 0..=870_000 {
            let x = -(i as f32) * 1e-4;
            let exact = f64::from(x).exp();
            worst = worst.max((f64::from(exp_nonpositive(x)) - exact).abs() / exact);
        }
        assert!(worst < 3e-7, "relative error {worst:e}");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(-0.0), 1.0);
        assert_eq!(exp_nonpositive(-87.5), 0.0);
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_nonpositive(f32::NAN), 0.0);
    }

    #[test]
    fn argmax_matches_a_scalar_scan() {
        // Lengths around the lane width, to cover the tail.
        for len in 1..40 {
            for salt in 0..20 {
                let mut logits: Vec<f32> = fake_logits(len, salt).iter().map(|l| l.round()).collect();
                if salt % 3 == 0 {
                    logits[len / 2] = f32::NAN;
                }
                let mut best: Option<(usize, f32)> = None;
                for (i, &l) in logits.iter().enumerate() {
                    if !l.is_nan() && best.is_none_or(|(_, b)| l > b) {
                        best = Some((i, l));
                    }
                }
                assert_eq!(argmax(&logits), best.map_or(0, |(i, _)| i as u32), "{logits:?}");
            }
        }
    }

    #[test]
    fn pick_skips_zero_weights() {
        let cs = |weights: &[f32]| -> Vec<Candidate> {
            weights.iter().enumerate().map(|(id, &weight)| Candidate { id: id as u32, weight }).collect()
        };
        let almost_one = 1.0 - f64::EPSILON / 2.0;
        assert_eq!(pick(&cs(&[0.0, 0.5, 0.0, 0.25, 0.0]), 0.0), 1);
        assert_eq!(pick(&cs(&[0.0, 0.5, 0.0, 0.25, 0.0]), almost_one), 3);
        let mut long = vec![0.0; 1000];
        long[300] = 1.0;
        long[700] = 0.25;
        assert_eq!(pick(&cs(&long), 0.0), 300);
        assert_eq!(pick(&cs(&long), almost_one), 700);
        assert_eq!(pick(&[], 0.5), 0);
    }

    #[test]
    fn validate_checks_ranges() {
        let ok = SamplingParams::default();
        assert!(ok.validate().is_ok());
        assert!(SamplingParams::greedy().validate().is_ok());
        assert!(SamplingParams { temperature: 2.0, top_p: 1e-3, top_k: 7, seed: 1 }.validate().is_ok());
        for temperature in [-0.1, f32::NAN, f32::INFINITY, 2.01] {
            let err = SamplingParams { temperature, ..ok }.validate().unwrap_err();
            assert!(matches!(&err, Error::InvalidInput(m) if m.contains("temperature")), "{err}");
        }
        for top_p in [0.0, -0.5, 1.0001, f32::NAN] {
            let err = SamplingParams { top_p, ..ok }.validate().unwrap_err();
            assert!(matches!(&err, Error::InvalidInput(m) if m.contains("top_p")), "{err}");
        }
    }

    #[test]
    fn defaults_are_openai_defaults() {
        assert_eq!(SamplingParams::default(), params(1.0, 1.0, 0, 0));
        assert_eq!(SamplingParams::greedy(), params(0.0, 1.0, 0, 0));
    }

    #[test]
    fn scratch_is_reused() {
        let mut s = Sampler::new(params(1.0, 0.9, 0, 0));
        let logits = fake_logits(10_000, 0);
        s.sample(&logits);
        let buffer = s.scratch.candidates.as_ptr();
        for _ in 0..10 {
            s.sample(&logits);
        }
        assert_eq!(s.scratch.candidates.as_ptr(), buffer);
    }
}

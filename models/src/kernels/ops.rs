//! The decoder's operations other than the quantized products, on the CPU, computing what
//! llama.cpp's CPU backend computes, bit for bit: RMS norm, RoPE, SiLU with its gate, and
//! the pieces of attention (f16 rounding, softmax, the sums of its products).
//!
//! The reference is the same build as the products' (x86, AVX-512, no AMX; its outputs
//! are the golden fixture's). Its arithmetic, op by op:
//!
//! - RMS norm (`ggml_compute_forward_rms_norm_f32`): squares rounded to f32 and summed in
//!   f64, the mean rounded to f32, `scale = 1 / sqrtf(mean + eps)`, `x * scale`; the weight
//!   is a separate multiplication (`ggml_mul`), so each output is rounded twice.
//! - RoPE (`ggml_rope_cache_init`, `rope_yarn` without YaRN): the angle of pair `i` at
//!   position `p` is `p * s^i` built by repeated f32 multiplication, `s = powf(base, -2 /
//!   n_dims)`, divided by the pair's frequency factor if any and times `freq_scale`
//!   (linear scaling); the C library's `cosf` and `sinf`; rotations compiled with fused
//!   multiply-adds (GCC contracts `x0*c - x1*s` into `fma(x0, c, -(x1*s))` and `x0*s +
//!   x1*c` into `fma(x0, s, x1*c)`).
//! - SiLU (`ggml_v_silu`): `x / (1 + exp(-x))` with ggml's AVX-512 `ggml_v_expf`, a
//!   polynomial that differs from the C library's `expf` (and from ggml's own AVX2
//!   version) in the last bits, 16 values at a time; the rest of a row goes through the C
//!   library's `expf`. The gate is a separate multiplication.
//! - Softmax (`ggml_compute_forward_soft_max_f32`): scores scaled in f32, the maximum
//!   subtracted, `ggml_v_expf`, the exponentials summed sixteen at a time (an AVX-512
//!   register's horizontal sum) into an f64, each multiplied by `(float)(1.0 / sum)`.
//!
//! Rust's `cos`, `sin`, `exp` and `powf` on f32 call the C library's functions, as ggml
//! does: glibc's on Linux, where the reference ran (another C library may round some
//! angles differently in the last bit).
//!
//! Everything here is plain Rust; `ops_x86.rs` has AVX2 versions of the hot loops, which
//! the tests (`ops_tests.rs`, against llama.cpp's own tensors in `llama_cpp_ops.json`)
//! hold to these bit for bit.

use half::f16;

use super::Isa;

/// f32 rounded to the nearest f16 (ties to even) and widened back: how ggml stores the KV
/// cache and converts activations for f16 products.
#[inline]
pub(crate) fn round_f16(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// The horizontal sum of sixteen lanes as GCC's `_mm512_reduce_add_ps` computes it: the
/// upper eight onto the lower eight, then four onto four, then `(q0 + q2) + (q1 + q3)`.
#[inline(always)]
pub(crate) fn reduce16(v: &[f32; 16]) -> f32 {
    let h: [f32; 8] = std::array::from_fn(|i| v[i] + v[i + 8]);
    let q: [f32; 4] = std::array::from_fn(|i| h[i] + h[i + 4]);
    (q[0] + q[2]) + (q[1] + q[3])
}

/// RMS norm of each row of `x` (rows as long as `weight`), times `weight`, into `out`.
pub(crate) fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let n = weight.len();
    assert!(n > 0 && x.len().is_multiple_of(n) && out.len() == x.len());
    for (x, out) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        let scale = rms_scale(x, eps);
        for ((out, &x), &w) in out.iter_mut().zip(x).zip(weight) {
            *out = (x * scale) * w;
        }
    }
}

/// [`rms_norm`] in place.
pub(crate) fn rms_norm_in_place(x: &mut [f32], weight: &[f32], eps: f32) {
    let n = weight.len();
    assert!(n > 0 && x.len().is_multiple_of(n));
    for x in x.chunks_exact_mut(n) {
        let scale = rms_scale(x, eps);
        for (x, &w) in x.iter_mut().zip(weight) {
            *x = (*x * scale) * w;
        }
    }
}

/// `1 / sqrt(mean(x²) + eps)` with ggml's roundings.
fn rms_scale(x: &[f32], eps: f32) -> f32 {
    let sum = x.iter().fold(0.0f64, |sum, &v| sum + (v * v) as f64);
    let mean = (sum / x.len() as f64) as f32;
    1.0 / (mean + eps).sqrt()
}

/// `x += y`, element by element (ggml's residual adds and biases).
pub(crate) fn add_assign(x: &mut [f32], y: &[f32]) {
    assert_eq!(x.len(), y.len());
    for (x, &y) in x.iter_mut().zip(y) {
        *x += y;
    }
}

/// Adds `bias` to each row of `x`.
pub(crate) fn add_rows(x: &mut [f32], bias: &[f32]) {
    for row in x.chunks_exact_mut(bias.len()) {
        add_assign(row, bias);
    }
}

/// The constants of ggml's `ggml_v_expf` (from ARM's optimized routines), as bits.
pub(crate) mod exp_constants {
    /// `0x1.8p23`: adding it rounds to an integer.
    pub(crate) const SHIFT: u32 = 0x4b40_0000;
    /// `0x1.715476p+0`: log2(e).
    pub(crate) const LOG2E: u32 = 0x3fb8_aa3b;
    /// `0x1.62e4p-1` and `0x1.7f7d1cp-20`: ln(2) in two parts.
    pub(crate) const LN2_HI: u32 = 0x3f31_7200;
    pub(crate) const LN2_LO: u32 = 0x35bf_be8e;
    /// The polynomial's coefficients, `0x1.0e4020p-7` down to `0x1.ffffecp-1`.
    pub(crate) const C5: u32 = 0x3c07_2010;
    pub(crate) const C4: u32 = 0x3d2b_9f17;
    pub(crate) const C3: u32 = 0x3e2a_af33;
    pub(crate) const C2: u32 = 0x3eff_fedb;
    pub(crate) const C1: u32 = 0x3f7f_fff6;
}

/// `e^x` as ggml's AVX-512 `ggml_v_expf` computes each lane: `2^n * p(b)` for
/// `n = round(x * log2 e)` and `b = x - n ln 2`, the power applied by `vscalefps` (one
/// rounding, also into subnormals), and 0 or infinity once `|n| > 192`.
#[inline(always)]
pub(crate) fn expf(x: f32) -> f32 {
    use exp_constants::*;
    let c = f32::from_bits;
    let shift = c(SHIFT);
    let z = x.mul_add(c(LOG2E), shift);
    let n = z - shift;
    let b = (-n).mul_add(c(LN2_HI), x);
    let b = (-n).mul_add(c(LN2_LO), b);
    let u = b * b;
    let j = c(C5)
        .mul_add(b, c(C4))
        .mul_add(u, c(C3).mul_add(b, c(C2)))
        .mul_add(u, c(C1).mul_add(b, 1.0));
    if n.abs() > 192.0 {
        return if n <= 0.0 { 0.0 } else { f32::INFINITY };
    }
    scalef(j, n)
}

/// `j * 2^n` for an integral `|n| <= 192`, rounded once, as `vscalefps` does.
#[inline(always)]
pub(crate) fn scalef(j: f32, n: f32) -> f32 {
    if n.is_nan() {
        return f32::NAN;
    }
    // 2^n as an f64 (normal over this range): the product is exact in f64, and the
    // conversion rounds it once, to nearest even, subnormals included.
    let power = f64::from_bits(((n as i64 + 1023) as u64) << 52);
    (j as f64 * power) as f32
}

/// `x / (1 + e^-x)` as ggml's `ggml_v_silu`.
#[inline(always)]
pub(crate) fn silu(x: f32) -> f32 {
    x / (1.0 + expf(0.0 - x))
}

/// `gate = silu(gate) * up`, element by element (two roundings, as ggml's two ops), on
/// rows of `row` values: ggml's vector loop takes 16 values at a time, and the rest of a
/// row goes through `x / (1 + expf(-x))` with the C library's `expf`.
pub(crate) fn silu_mul(gate: &mut [f32], up: &[f32], row: usize) {
    match Isa::detect() {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2(avx2) => super::ops_x86::silu_mul(avx2, gate, up, row),
        // Portable, or NEON (whose kernels so far are only the K-quant products).
        _ => silu_mul_portable(gate, up, row),
    }
}

pub(crate) fn silu_mul_portable(gate: &mut [f32], up: &[f32], row: usize) {
    assert!(gate.len() == up.len() && row > 0 && gate.len().is_multiple_of(row));
    let vector = row & !15;
    for (gate, up) in gate.chunks_exact_mut(row).zip(up.chunks_exact(row)) {
        for (i, (g, &u)) in gate.iter_mut().zip(up).enumerate() {
            let s = if i < vector { silu(*g) } else { libm_silu(*g) };
            *g = s * u;
        }
    }
}

/// ggml's scalar `ggml_silu_f32`, for what its vector loop leaves.
#[inline(always)]
pub(crate) fn libm_silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// `gate = gelu(gate) * up` as ggml's `geglu` computes it on the CPU (`GGML_GELU_FP16`):
/// GELU's tanh approximation is looked up in a table by the input rounded to f16, the
/// table holding f16 values of `ggml_gelu_f32`; inputs beyond ±10 are 0 or themselves.
/// gpt-oss's SwiGLU constants, fixed in its code and in llama.cpp's.
pub(crate) const SWIGLU_ALPHA: f32 = 1.702;
pub(crate) const SWIGLU_LIMIT: f32 = 7.0;

/// `gate = min(gate, 7) * sigmoid(1.702 * min(gate, 7)) * (clamp(up, ±7) + 1)`, as ggml's
/// `swiglu_oai` computes it (with the C library's exponential).
pub(crate) fn clamped_swiglu_mul(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len());
    for (g, &u) in gate.iter_mut().zip(up) {
        let x = g.min(SWIGLU_LIMIT);
        let y = u.clamp(-SWIGLU_LIMIT, SWIGLU_LIMIT);
        *g = x / (1.0 + (SWIGLU_ALPHA * -x).exp()) * (y + 1.0);
    }
}

/// A softmax of a whole row in place, as ggml's `soft_max` without mask or scale: whole
/// groups of 16 through ggml's vector exponential, summed lane-wise; the rest one by one
/// through the C library's, as its scalar tail does. (A router's scores over its experts.)
pub(crate) fn softmax_row(values: &mut [f32]) {
    let max = values.iter().fold(f32::NEG_INFINITY, |m, &v| if m > v { m } else { v });
    let vector = values.len() & !15;
    let mut sum = 0.0f64;
    for chunk in values[..vector].chunks_exact_mut(16) {
        let mut lanes = [0.0f32; 16];
        for (lane, v) in lanes.iter_mut().zip(chunk.iter_mut()) {
            *v = expf(*v - max);
            *lane = *v;
        }
        sum += reduce16(&lanes) as f64;
    }
    for v in &mut values[vector..] {
        *v = (*v - max).exp();
        sum += *v as f64;
    }
    let inverse = (1.0 / sum) as f32;
    values.iter_mut().for_each(|v| *v *= inverse);
}

pub(crate) fn gelu_mul(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len());
    let table = gelu_table();
    for (g, &u) in gate.iter_mut().zip(up) {
        let x = *g;
        let gelu = if x <= -10.0 {
            0.0
        } else if x >= 10.0 {
            x
        } else {
            f16::from_bits(table[f16::from_f32(x).to_bits() as usize]).to_f32()
        };
        *g = gelu * u;
    }
}

/// ggml's `ggml_table_gelu_f16`: for each f16 bit pattern, `ggml_gelu_f32` of its value
/// rounded to f16 (built once, as ggml builds it at start-up).
fn gelu_table() -> &'static [u16] {
    static TABLE: std::sync::OnceLock<Vec<u16>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| (0..=u16::MAX).map(|bits| f16::from_f32(gelu_tanh(f16::from_bits(bits).to_f32())).to_bits()).collect())
}

/// `ggml_gelu_f32`: `0.5 x (1 + tanh(sqrt(2/pi) x (1 + 0.044715 x²)))`, in f32 with the C
/// library's `tanhf`, and `1 + 0.044715 x · x` fused as GCC contracts it (as for RoPE).
fn gelu_tanh(x: f32) -> f32 {
    const GELU_COEF_A: f32 = 0.044715;
    // sqrt(2 / pi), rounded to f32.
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (GELU_COEF_A * x).mul_add(x, 1.0)).tanh())
}

/// Turns one row of raw attention scores (the positions a query sees) into probabilities,
/// as ggml's `soft_max_ext`, and with `to_f16` rounds them to f16 as ggml does before their
/// product with V. Masked positions (after these) would add exact zeros, which change
/// nothing. A `sink` logit (gpt-oss) joins the row's maximum and sum, as ggml's
/// `soft_max_add_sinks`, without a probability of its own. (Attention calls the
/// instruction sets' versions directly.)
#[cfg(test)]
pub(crate) fn softmax(scores: &mut [f32], scale: f32, sink: Option<f32>, to_f16: bool) {
    match Isa::detect() {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2(avx2) => super::ops_x86::softmax(avx2, scores, scale, sink, to_f16),
        // Portable, or NEON (whose kernels so far are only the K-quant products).
        _ => softmax_portable(scores, scale, sink, to_f16),
    }
}

pub(crate) fn softmax_portable(scores: &mut [f32], scale: f32, sink: Option<f32>, to_f16: bool) {
    let mut max = f32::NEG_INFINITY;
    for s in scores.iter_mut() {
        *s *= scale;
        max = if max > *s { max } else { *s };
    }
    if let Some(sink) = sink {
        max = max.max(sink);
    }
    let mut sum = 0.0f64;
    for chunk in scores.chunks_mut(16) {
        let mut lanes = [0.0f32; 16];
        for (lane, s) in lanes.iter_mut().zip(chunk.iter_mut()) {
            *s = expf(*s - max);
            *lane = *s;
        }
        sum += reduce16(&lanes) as f64;
    }
    if let Some(sink) = sink {
        // ggml takes this exponential from the C library, not its own vector one.
        sum += (sink - max).exp() as f64;
    }
    let inverse = (1.0 / sum) as f32;
    for s in scores.iter_mut() {
        *s *= inverse;
        if to_f16 {
            *s = round_f16(*s);
        }
    }
}

/// How RoPE pairs the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RopePairs {
    /// (0, 1), (2, 3), ...: ggml's "normal" mode.
    Adjacent,
    /// (i, i + d/2): ggml's "neox" mode.
    Halves,
}

/// Rotary position embeddings as ggml's `rope_ext` computes them.
#[derive(Debug, Clone)]
pub(crate) struct Rope {
    head_dim: usize,
    pairs: RopePairs,
    /// `powf(base, -2 / n_dims)`: each pair's angle is the previous pair's times this.
    theta_scale: f32,
    /// `1 / factor` of linear scaling.
    freq_scale: f32,
    /// Per-pair divisors of the angle (GGUF's `rope_freqs`, Llama 3 scaling).
    factors: Option<Vec<f32>>,
    yarn: Option<Yarn>,
}

/// YaRN's part of ggml's `rope_ext`: between two correction dimensions, each pair's angle
/// blends the interpolated and the extrapolated one, and cos and sin are scaled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Yarn {
    /// How much of the extrapolated angle to blend in (1 for YaRN).
    pub(crate) ext_factor: f32,
    /// `attn_factor`: what cos and sin are multiplied by, before YaRN's own magnitude term.
    pub(crate) attn_factor: f32,
    /// The pairs below `corr_dims[0]` keep their extrapolated angle, those above
    /// `corr_dims[1]` the interpolated one.
    pub(crate) corr_dims: [f32; 2],
}

impl Yarn {
    /// ggml's `ggml_rope_yarn_corr_dims` for `n_dims` rotated dimensions: the range
    /// widened to whole dimensions, unless `exact` (Hugging Face's `truncate: false`).
    pub(crate) fn corr_dims(
        n_dims: usize,
        original_context: usize,
        base: f32,
        [beta_fast, beta_slow]: [f32; 2],
        exact: bool,
    ) -> [f32; 2] {
        let dim = |rotations: f32| {
            n_dims as f32 * (original_context as f32 / (rotations * 2.0 * std::f32::consts::PI)).ln() / (2.0 * base.ln())
        };
        if exact {
            return [dim(beta_fast).max(0.0), dim(beta_slow).min(n_dims as f32 - 1.0)];
        }
        [dim(beta_fast).floor().max(0.0), dim(beta_slow).ceil().min(n_dims as f32 - 1.0)]
    }
}

impl Rope {
    pub(crate) fn new(
        head_dim: usize,
        base: f32,
        pairs: RopePairs,
        freq_scale: f32,
        factors: Option<Vec<f32>>,
    ) -> Self {
        assert!(head_dim.is_multiple_of(2) && factors.as_ref().is_none_or(|f| f.len() == head_dim / 2));
        Self { head_dim, pairs, theta_scale: base.powf(-2.0 / head_dim as f32), freq_scale, factors, yarn: None }
    }

    pub(crate) fn with_yarn(self, yarn: Yarn) -> Self {
        Self { yarn: Some(yarn), ..self }
    }

    /// Values [`Rope::angles`] writes per position.
    pub(crate) fn angles_len(&self) -> usize {
        self.head_dim
    }

    /// cos and sin of each pair's angle at `position`, interleaved, into `out`.
    pub(crate) fn angles(&self, position: usize, out: &mut [f32]) {
        let mut theta = position as f32;
        for (i, out) in out[..self.head_dim].chunks_exact_mut(2).enumerate() {
            let extrapolated = match &self.factors {
                Some(factors) => theta / factors[i],
                None => theta,
            };
            let interpolated = self.freq_scale * extrapolated;
            match &self.yarn {
                None => {
                    out[0] = interpolated.cos();
                    out[1] = interpolated.sin();
                }
                Some(yarn) => {
                    // ggml's `rope_yarn`, in its order of operations.
                    let [low, high] = yarn.corr_dims;
                    let ramp = 1.0 - ((i as f32 - low) / (high - low).max(0.001)).clamp(0.0, 1.0);
                    let mix = ramp * yarn.ext_factor;
                    let angle = interpolated * (1.0 - mix) + extrapolated * mix;
                    let mscale = yarn.attn_factor * (1.0 + 0.1 * (1.0 / self.freq_scale).ln());
                    out[0] = angle.cos() * mscale;
                    out[1] = angle.sin() * mscale;
                }
            }
            theta *= self.theta_scale;
        }
    }

    /// Rotates every head of `x` (heads of `head_dim` values) by `angles` (from [`Rope::angles`]).
    pub(crate) fn rotate(&self, x: &mut [f32], angles: &[f32]) {
        match Isa::detect() {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2(avx2) => super::ops_x86::rope(avx2, self, x, angles),
            // Portable, or NEON (whose kernels so far are only the K-quant products).
            _ => self.rotate_portable(x, angles),
        }
    }

    #[inline(always)]
    pub(crate) fn rotate_portable(&self, x: &mut [f32], angles: &[f32]) {
        let d = self.head_dim;
        for head in x.chunks_exact_mut(d) {
            for (i, cs) in angles[..d].chunks_exact(2).enumerate() {
                let (a, b) = match self.pairs {
                    RopePairs::Adjacent => (2 * i, 2 * i + 1),
                    RopePairs::Halves => (i, i + d / 2),
                };
                let (x0, x1) = (head[a], head[b]);
                let (cos, sin) = (cs[0], cs[1]);
                head[a] = x0.mul_add(cos, -(x1 * sin));
                head[b] = x0.mul_add(sin, x1 * cos);
            }
        }
    }
}

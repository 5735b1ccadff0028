//! Activations quantized to ggml's Q8_K, the `vec_dot_type` of every K-quant format.
//!
//! llama.cpp runs the scalar `quantize_row_q8_K_ref` on x86 (its `quantize_row_q8_K` only
//! forwards to it), so this is that function: one scale per 256 values taken from the
//! value of largest magnitude (the first one, if several tie), the inverse scale
//! `-127 / max` (negative for a positive `max`: the quants come out negated, and so does
//! `d = 1 / iscale`), rounding half to even (ggml's `nearest_int` adds 1.5 * 2^23), and
//! sums of each 16 quants for the weights' offsets. It runs once per product over one
//! activation row, a sliver of the product's time, so no SIMD version is needed.

use super::kquant_format::QK_K;

/// One block of 256 quantized activations: ggml's `block_q8_K`.
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub(crate) struct Q8KBlock {
    pub(crate) qs: [i8; QK_K],
    /// The sums of `qs` in groups of 16.
    pub(crate) bsums: [i16; QK_K / 16],
    /// The scale `1 / iscale` (f32, unlike the 32-value formats' f16).
    pub(crate) d: f32,
}

impl Q8KBlock {
    pub(crate) const ZERO: Self = Self { qs: [0; QK_K], bsums: [0; QK_K / 16], d: 0.0 };
}

/// Quantizes one row (a multiple of 256 values) into `out`, one block per 256 values.
pub(crate) fn quantize_row_k(x: &[f32], out: &mut [Q8KBlock]) {
    debug_assert_eq!(x.len(), out.len() * QK_K);
    for (values, block) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
        // ggml keeps the first value of the largest magnitude (a strict `>` scan, which
        // NaNs never win); found here in two passes that vectorize.
        let amax = values.iter().fold(0.0f32, |amax, v| amax.max(v.abs()));
        let Some(&max) = values.iter().find(|v| v.abs() == amax).filter(|_| amax != 0.0) else {
            *block = Q8KBlock::ZERO;
            continue;
        };
        let iscale = -127.0 / max;
        for (q, &v) in block.qs.iter_mut().zip(values) {
            // |iscale * v| <= 127 up to rounding; ggml caps at 127 only, and the cast to
            // `int8_t` would wrap below -128, which rounding can never reach.
            *q = nearest_int(iscale * v).clamp(-128, 127) as i8;
        }
        for (sum, qs) in block.bsums.iter_mut().zip(block.qs.chunks_exact(16)) {
            *sum = qs.iter().map(|&q| q as i16).sum();
        }
        block.d = 1.0 / iscale;
    }
}

/// ggml's `nearest_int`: adding 1.5 * 2^23 leaves the value rounded (half to even) in the
/// low mantissa bits, for any |value| < 2^22. (Plain f32 operations, so it vectorizes,
/// where `round_ties_even` is a library call on baseline x86-64.)
#[inline(always)]
fn nearest_int(value: f32) -> i32 {
    let bits = (value + 12_582_912.0).to_bits() as i32;
    (bits & 0x007f_ffff) - 0x0040_0000
}

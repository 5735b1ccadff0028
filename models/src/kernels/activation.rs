//! Activations quantized to 8 bits per value, once per product, as llama.cpp does before
//! every quantized matrix product on the CPU.
//!
//! The arithmetic is that of ggml's x86 `quantize_row_q8_0` / `quantize_row_q8_1` (the
//! AVX2 code that llama.cpp runs on the machines its reference outputs came from), which
//! differs from ggml's scalar `*_ref` functions in two places that do change results:
//! the inverse scale is `127 / amax` rather than `1 / (amax / 127)`, and halves round to
//! even rather than away from zero. The scalar code here follows the x86 code, so that
//! every instruction set gives the same bytes.

use half::f16;

use super::format::BLOCK;

/// One block of 32 quantized activations.
///
/// Scales are kept as f32 holding exactly the f16 values ggml stores, so the products
/// read them without conversions and round exactly as ggml's do.
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub(crate) struct Q8Block {
    pub(crate) qs: [i8; BLOCK],
    /// The scale `amax / 127`, rounded to f16.
    pub(crate) d: f32,
    /// Q8_1 only: `d * sum(qs)` with `d` unrounded, rounded to f16; zero for Q8_0.
    pub(crate) s: f32,
}

impl Q8Block {
    pub(crate) const ZERO: Self = Self { qs: [0; BLOCK], d: 0.0, s: 0.0 };
}

/// The scale of a block and the factor that maps its values onto `-127..=127`.
pub(crate) fn scales(amax: f32) -> (f32, f32) {
    let d = amax / 127.0;
    let inverse = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    (d, inverse)
}

/// Rounds a block's f32 scale to the f16 that ggml stores.
pub(crate) fn round_to_f16(value: f32) -> f32 {
    f16::from_f32(value).to_f32()
}

/// Quantizes one row (a multiple of 32 values) into `out`, one block per 32 values; with
/// `with_sum`, also fills each block's `s` (the Q8_1 format).
pub(crate) fn quantize_row(x: &[f32], out: &mut [Q8Block], with_sum: bool) {
    debug_assert_eq!(x.len(), out.len() * BLOCK);
    for (values, block) in x.chunks_exact(BLOCK).zip(out.iter_mut()) {
        let amax = values.iter().fold(0.0f32, |max, v| max.max(v.abs()));
        let (d, inverse) = scales(amax);
        let mut sum = 0i32;
        for (q, &v) in block.qs.iter_mut().zip(values) {
            let rounded = (v * inverse).round_ties_even() as i32;
            // |v * inverse| <= 127 up to rounding, so this never clips; it saturates as
            // ggml's packing instructions would if it did.
            *q = rounded.clamp(-128, 127) as i8;
            sum += rounded;
        }
        block.d = round_to_f16(d);
        block.s = if with_sum { round_to_f16(d * sum as f32) } else { 0.0 };
    }
}

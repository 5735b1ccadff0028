//! The reference kernels, in plain Rust: what every SIMD version must reproduce bit for bit,
//! and what runs where no SIMD version exists.
//!
//! The order of the floating-point operations is that of ggml's AVX2 `ggml_vec_dot_*`
//! functions, which llama.cpp runs on x86 (AVX-512 builds included): per block, the 32
//! integer products are summed in eight groups of four consecutive values (what `maddubs`
//! and `madd`, or VNNI's `dpbusd`, yield), each group is scaled by `d_w * d_x` into its own
//! f32 accumulator with a fused multiply-add, and the eight accumulators are summed pairwise
//! at the end. Q4_1's and Q5_1's offsets (`m_w * s_x` per block) go into one more scalar
//! accumulator, added last. (Q5_0 and Q5_1 are Q4_0 and Q4_1 with a fifth bit per value:
//! ggml's `ggml_vec_dot_q5_0_q8_0` and `_q5_1_q8_1` take the same steps.)

use super::activation::Q8Block;
use super::format::{e8m0_half, f16_at, five_bit_quants, WeightFormat, BLOCK, MXFP4_VALUES};

/// Groups of consecutive products that SIMD code sums in integers before converting.
const LANES: usize = 8;
const GROUP: usize = BLOCK / LANES;

/// `out[r * m + i]` = row `r` of `weights` dotted with activation row `i`, for the `m`
/// activation rows of `acts` (each `blocks` blocks long).
pub(crate) fn product_rows(
    format: WeightFormat,
    weights: &[u8],
    blocks: usize,
    acts: &[Q8Block],
    m: usize,
    out: &mut [f32],
) {
    let row_bytes = blocks * format.block_bytes();
    for (row, out) in weights.chunks_exact(row_bytes).zip(out.chunks_exact_mut(m)) {
        for (x, out) in acts.chunks_exact(blocks).zip(out.iter_mut()) {
            *out = dot(format, row, x);
        }
    }
}

/// One weight row dotted with one quantized activation row.
pub(crate) fn dot(format: WeightFormat, row: &[u8], x: &[Q8Block]) -> f32 {
    let mut lanes = [0.0f32; LANES];
    let mut offsets = 0.0f32;
    for (block, a) in row.chunks_exact(format.block_bytes()).zip(x) {
        let (weights, scale) = decode_block(format, block);
        let scale = scale * a.d;
        for (lane, (w, q)) in lanes.iter_mut().zip(weights.chunks_exact(GROUP).zip(a.qs.chunks_exact(GROUP))) {
            let sum: i32 = w.iter().zip(q).map(|(&w, &q)| w * q as i32).sum();
            *lane = scale.mul_add(sum as f32, *lane);
        }
        if format.has_offset() {
            offsets = add_offset(offsets, f16_at(block, 2), a.s);
        }
    }
    sum_lanes(lanes) + offsets
}

/// The integer values of a weight block, in the activations' order, and its scale.
fn decode_block(format: WeightFormat, block: &[u8]) -> ([i32; BLOCK], f32) {
    let mut values = [0i32; BLOCK];
    match format {
        WeightFormat::Q4_0 | WeightFormat::Q4_1 => {
            // Q4_0 centres its nibbles on 8; Q4_1 adds its offset `m` separately.
            let (qs, bias) = match format {
                WeightFormat::Q4_0 => (&block[2..18], 8),
                _ => (&block[4..20], 0),
            };
            for (j, &byte) in qs.iter().enumerate() {
                values[j] = (byte & 0x0F) as i32 - bias;
                values[j + BLOCK / 2] = (byte >> 4) as i32 - bias;
            }
        }
        WeightFormat::Q5_0 | WeightFormat::Q5_1 => {
            // Q5_0 centres its quants on 16; Q5_1 adds its offset `m` separately.
            let (qh, bias) = match format {
                WeightFormat::Q5_0 => (2, 16),
                _ => (4, 0),
            };
            for (v, &q) in values.iter_mut().zip(&five_bit_quants(&block[qh..qh + 4], &block[qh + 4..qh + 20])) {
                *v = q as i32 - bias;
            }
        }
        WeightFormat::Q8_0 => {
            for (v, &q) in values.iter_mut().zip(&block[2..34]) {
                *v = q as i8 as i32;
            }
        }
        WeightFormat::Mxfp4 => {
            for (j, &byte) in block[1..17].iter().enumerate() {
                values[j] = MXFP4_VALUES[(byte & 0x0F) as usize] as i32;
                values[j + BLOCK / 2] = MXFP4_VALUES[(byte >> 4) as usize] as i32;
            }
            return (values, e8m0_half(block[0]));
        }
    }
    (values, f16_at(block, 0))
}

/// Adds one block's `m_w * s_x` to Q4_1's (or Q5_1's) offset accumulator, as ggml's `summs += m * s`.
///
/// Whether a compiler fuses this into one multiply-add makes no difference: both factors
/// are f16 values, whose product (22 significant bits at most) f32 holds exactly.
#[inline(always)]
pub(crate) fn add_offset(offsets: f32, m: f32, s: f32) -> f32 {
    offsets + m * s
}

/// The eight accumulators summed as ggml's `hsum_float_8` does: the upper half onto the
/// lower, then pairwise.
#[inline(always)]
pub(crate) fn sum_lanes(l: [f32; LANES]) -> f32 {
    let h = [l[0] + l[4], l[1] + l[5], l[2] + l[6], l[3] + l[7]];
    (h[0] + h[2]) + (h[1] + h[3])
}

//! The reference K-quant kernels, in plain Rust: what every SIMD version must reproduce bit
//! for bit, and what runs where no SIMD version exists.
//!
//! The order of the floating-point operations is that of ggml's AVX2 `ggml_vec_dot_q4_K_q8_K`,
//! `_q5_K_`, `_q6_K_`, `_q2_K_` and `_q3_K_`, which llama.cpp runs on x86 (AVX-512 builds
//! included). Within a
//! block everything is integer: each product of a weight quant and an activation quant
//! lands in one of eight i32 lanes (value `i` in lane `i / 4 % 8`: what `maddubs` and
//! `madd`, or `dpbusd`, yield on 32 values), multiplied by its sub-block's scale. Per
//! block, each lane is then converted to f32 and added into its own accumulator with a
//! fused multiply-add by `d_x * d_w`, and the eight accumulators are summed pairwise at the
//! end. The integer sums are exact whatever their order, so SIMD versions are free to
//! reach them any way; only the float steps must stay as they are.
//!
//! The mins of Q4_K and Q5_K (`-dmin * m * sum(q8)` per sub-block, from Q8_K's `bsums`)
//! are summed as ggml's AVX2 code does: for Q4_K, in four f32 lanes (two sub-blocks per
//! lane) with fused multiply-adds, summed pairwise and added last; for Q5_K, as one
//! integer per block, scaled into a scalar accumulator with a multiply-add (ggml writes
//! `summs += dmin * sum`, which GCC and Clang contract into one FMA when the target has
//! it, as llama.cpp's x86 builds do). Q2_K's mins (one per 16 values) go into the eight
//! lanes of the main accumulators themselves, two sub-blocks per lane, with a fused
//! multiply-add by `-d_x * dmin_w` before the block's scaled sums are added.
//!
//! ggml's scalar `_generic` versions compute the same integer sums but accumulate the
//! floats in another order, so results agree with them to f32 rounding only. So do
//! llama.cpp's repacked products: on AVX2 machines its CPU backend by default repacks Q4_K
//! matrices with a multiple of 8 rows (`q4_K_8x8_q8_K`; newer versions other K-quants too)
//! for its own gemv/gemm, which keeps one float sum per row (`sumf += sumi * d`, the mins
//! apart). These kernels are `ggml_vec_dot_*_q8_K`, what llama.cpp runs on matrices it
//! does not repack (and with `--no-repack`). No K-quant fixture from llama.cpp checks them
//! yet: the tests compare against ggml's arithmetic as read from its source.

use super::format::f16_at;
use super::kquant_activation::Q8KBlock;
use super::kquant_format::{
    quants_2, quants_3, quants_4_5, quants_6, scales_3, scales_and_mins, KQuant, Q2_K_D, Q3_K_D, Q3_K_SCALES, Q6_K_D,
    Q6_K_SCALES, QK_K,
};
use super::portable::sum_lanes;

/// Lanes of the integer and float accumulators, and values per lane per 32 values.
const LANES: usize = 8;
const GROUP: usize = 4;

/// `out[r * m + i]` = row `r` of `weights` dotted with activation row `i`, for the `m`
/// activation rows of `acts` (each `blocks` blocks long).
pub(crate) fn product_rows_k(
    kind: KQuant,
    weights: &[u8],
    blocks: usize,
    acts: &[Q8KBlock],
    m: usize,
    out: &mut [f32],
) {
    let row_bytes = blocks * kind.block_bytes();
    for (row, out) in weights.chunks_exact(row_bytes).zip(out.chunks_exact_mut(m)) {
        for (x, out) in acts.chunks_exact(blocks).zip(out.iter_mut()) {
            *out = dot(kind, row, x);
        }
    }
}

/// One weight row dotted with one quantized activation row.
pub(crate) fn dot(kind: KQuant, row: &[u8], x: &[Q8KBlock]) -> f32 {
    let mut lanes = [0.0f32; LANES];
    let mut min_lanes = [0.0f32; 4];
    let mut mins_sum = 0.0f32;
    for (block, a) in row.chunks_exact(kind.block_bytes()).zip(x) {
        // The integer value of every quant and the scale of every 16 values.
        let mut values = [0i32; QK_K];
        let mut scales = [0i32; QK_K / 16];
        let d_w = match kind {
            KQuant::Q4_K | KQuant::Q5_K => {
                let (sc, mins) = scales_and_mins(&block[4..16]);
                for (v, &q) in values.iter_mut().zip(&quants_4_5(kind, block)) {
                    *v = q as i32;
                }
                for (s, scale) in scales.iter_mut().enumerate() {
                    *scale = sc[s / 2] as i32;
                }
                let dmin = -a.d * f16_at(block, 2);
                // bsums in pairs: the sums of the 32 values of each sub-block.
                let sums: [i32; 8] = std::array::from_fn(|s| a.bsums[2 * s] as i32 + a.bsums[2 * s + 1] as i32);
                let products: [i32; 4] = std::array::from_fn(|j| {
                    mins[2 * j] as i32 * sums[2 * j] + mins[2 * j + 1] as i32 * sums[2 * j + 1]
                });
                if kind == KQuant::Q4_K {
                    for (lane, &p) in min_lanes.iter_mut().zip(&products) {
                        *lane = dmin.mul_add(p as f32, *lane);
                    }
                } else {
                    let total: i32 = products.iter().sum();
                    mins_sum = dmin.mul_add(total as f32, mins_sum);
                }
                f16_at(block, 0)
            }
            KQuant::Q6_K => {
                for (v, &q) in values.iter_mut().zip(&quants_6(block)) {
                    *v = q as i32;
                }
                for (s, scale) in scales.iter_mut().enumerate() {
                    *scale = block[Q6_K_SCALES + s] as i8 as i32;
                }
                f16_at(block, Q6_K_D)
            }
            KQuant::Q2_K => {
                for (v, &q) in values.iter_mut().zip(&quants_2(block)) {
                    *v = q as i32;
                }
                for (s, scale) in scales.iter_mut().enumerate() {
                    *scale = (block[s] & 0x0F) as i32;
                }
                let dmin = -a.d * f16_at(block, Q2_K_D + 2);
                for (k, lane) in lanes.iter_mut().enumerate() {
                    let min = |s: usize| (block[s] >> 4) as i32 * a.bsums[s] as i32;
                    *lane = dmin.mul_add((min(2 * k) + min(2 * k + 1)) as f32, *lane);
                }
                f16_at(block, Q2_K_D)
            }
            KQuant::Q3_K => {
                for (v, &q) in values.iter_mut().zip(&quants_3(block)) {
                    *v = q as i32;
                }
                for (scale, &s) in scales.iter_mut().zip(&scales_3(&block[Q3_K_SCALES..Q3_K_SCALES + 12])) {
                    *scale = s as i32;
                }
                f16_at(block, Q3_K_D)
            }
        };
        let mut sums = [0i32; LANES];
        for (g, (w, q)) in values.chunks_exact(GROUP).zip(a.qs.chunks_exact(GROUP)).enumerate() {
            let product: i32 = w.iter().zip(q).map(|(&w, &q)| w * q as i32).sum();
            sums[g % LANES] += scales[g * GROUP / 16] * product;
        }
        let d = a.d * d_w;
        for (lane, &sum) in lanes.iter_mut().zip(&sums) {
            *lane = d.mul_add(sum as f32, *lane);
        }
    }
    match kind {
        KQuant::Q4_K => sum_lanes(lanes) + sum_min_lanes(min_lanes),
        KQuant::Q5_K => sum_lanes(lanes) + mins_sum,
        KQuant::Q6_K | KQuant::Q2_K | KQuant::Q3_K => sum_lanes(lanes),
    }
}

/// Q4_K's four min accumulators summed as ggml does: the upper pair onto the lower, then
/// the two.
#[inline(always)]
pub(crate) fn sum_min_lanes(l: [f32; 4]) -> f32 {
    (l[0] + l[2]) + (l[1] + l[3])
}

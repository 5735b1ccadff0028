//! NEON K-quant kernels for aarch64 (Q4_K, Q5_K and Q6_K; Q2_K and Q3_K run the portable
//! ones so far): the integer sums of `kquant_portable.rs` (eight i32 lanes per block, as two
//! vectors of four), with `sdot` where the CPU has the dot-product extension and widening
//! multiplies with pairwise adds elsewhere, then the same float steps (`vfmaq_f32` is the
//! same fused multiply-add), so results equal the portable kernels' bit for bit.
//!
//! Unlike x86, NEON takes the weights as signed bytes, so Q6_K's `q - 32` is formed
//! directly. One weight row and one activation row per pass: prefill does not yet reuse
//! unpacked weights across activation rows here.

use std::arch::aarch64::*;
use std::arch::asm;

use super::kquant_activation::Q8KBlock;
use super::kquant_format::{scales_then_mins, KQuant, Q4_K_QS, Q5_K_QH, Q5_K_QS, Q6_K_D, Q6_K_QH, Q6_K_SCALES};
use super::kquant_portable::{self, sum_min_lanes};
use super::portable::sum_lanes;

const Q4_K: u8 = 0;
const Q5_K: u8 = 1;
const Q6_K: u8 = 2;

/// Proof that this CPU runs NEON, and whether it has the dot-product instructions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Neon {
    dotprod: bool,
}

impl Neon {
    pub(crate) fn detect() -> Option<Self> {
        std::arch::is_aarch64_feature_detected!("neon")
            .then(|| Self { dotprod: std::arch::is_aarch64_feature_detected!("dotprod") })
    }

    /// NEON version of [`super::kquant_portable::product_rows_k`].
    pub(crate) fn product_rows_k(
        self,
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
                // SAFETY: `self` exists only on CPUs with NEON, and `dotprod` is set only on
                // those with the dot-product instructions.
                *out = unsafe {
                    match (kind, self.dotprod) {
                        (KQuant::Q4_K, true) => dot_sdot::<Q4_K>(row, x),
                        (KQuant::Q5_K, true) => dot_sdot::<Q5_K>(row, x),
                        (KQuant::Q6_K, true) => dot_sdot::<Q6_K>(row, x),
                        (KQuant::Q4_K, false) => dot::<Q4_K, false>(row, x),
                        (KQuant::Q5_K, false) => dot::<Q5_K, false>(row, x),
                        (KQuant::Q6_K, false) => dot::<Q6_K, false>(row, x),
                        // No NEON kernels for these yet: the portable ones are as exact.
                        (KQuant::Q2_K | KQuant::Q3_K, _) => kquant_portable::dot(kind, row, x),
                    }
                };
            }
        }
    }
}

/// [`dot`] compiled with the dot-product extension.
#[target_feature(enable = "neon,dotprod")]
unsafe fn dot_sdot<const KIND: u8>(row: &[u8], x: &[Q8KBlock]) -> f32 {
    // SAFETY: same features, and the caller's.
    unsafe { dot::<KIND, true>(row, x) }
}

const fn block_bytes<const KIND: u8>() -> usize {
    match KIND {
        Q4_K => KQuant::Q4_K.block_bytes(),
        Q5_K => KQuant::Q5_K.block_bytes(),
        _ => KQuant::Q6_K.block_bytes(),
    }
}

/// The four-value sums of 16 weights times 16 activations, in four i32 lanes.
#[inline(always)]
unsafe fn groups<const SDOT: bool>(w: int8x16_t, q: int8x16_t) -> int32x4_t {
    if SDOT {
        let mut acc = vdupq_n_s32(0);
        // SAFETY: only reached from `dot_sdot`, compiled with the dot-product extension.
        unsafe {
            asm!("sdot {acc:v}.4s, {w:v}.16b, {q:v}.16b", acc = inout(vreg) acc, w = in(vreg) w, q = in(vreg) q,
                 options(pure, nomem, nostack));
        }
        acc
    } else {
        // Products fit i16 (|w| <= 63, |q| <= 128), and so do sums of two.
        let low = vmull_s8(vget_low_s8(w), vget_low_s8(q));
        let high = vmull_high_s8(w, q);
        vpaddlq_s16(vpaddq_s16(low, high))
    }
}

/// One weight row dotted with one quantized activation row.
#[inline(always)]
unsafe fn dot<const KIND: u8, const SDOT: bool>(row: &[u8], x: &[Q8KBlock]) -> f32 {
    let bytes = block_bytes::<KIND>();
    assert!(row.len() == x.len() * bytes);
    let low4 = vdupq_n_u8(0x0F);
    let (mut acc_lo, mut acc_hi) = (vdupq_n_f32(0.0), vdupq_n_f32(0.0));
    let mut acc_m = vdupq_n_f32(0.0);
    let mut summs = 0.0f32;
    for (block, a) in row.chunks_exact(bytes).zip(x) {
        let p = block.as_ptr();
        // Lanes 0-3 and 4-7 of the block's integer sums.
        let (mut sum_lo, mut sum_hi) = (vdupq_n_s32(0), vdupq_n_s32(0));
        // SAFETY (every load below): `block` holds one whole block and `a.qs` 256 bytes;
        // every offset read is within them.
        let d_w = unsafe {
            if KIND == Q6_K {
                let scales = &block[Q6_K_SCALES..Q6_K_SCALES + 16];
                for half in 0..2 {
                    for i in 0..2 {
                        let ql0 = vld1q_u8(p.add(64 * half + 16 * i));
                        let ql1 = vld1q_u8(p.add(64 * half + 32 + 16 * i));
                        let qh = vld1q_u8(p.add(Q6_K_QH + 32 * half + 16 * i));
                        let top = |h: uint8x16_t| vshlq_n_u8::<4>(vandq_u8(h, vdupq_n_u8(3)));
                        let quants = [
                            vorrq_u8(vandq_u8(ql0, low4), top(qh)),
                            vorrq_u8(vandq_u8(ql1, low4), top(vshrq_n_u8::<2>(qh))),
                            vorrq_u8(vshrq_n_u8::<4>(ql0), top(vshrq_n_u8::<4>(qh))),
                            vorrq_u8(vshrq_n_u8::<4>(ql1), top(vshrq_n_u8::<6>(qh))),
                        ];
                        for (k, quants) in quants.into_iter().enumerate() {
                            // Values 32c + 16i.. of chunk c = 4 * half + k: scale 2c + i.
                            let c = 4 * half + k;
                            let w = vsubq_s8(vreinterpretq_s8_u8(quants), vdupq_n_s8(32));
                            let q = vld1q_s8(a.qs.as_ptr().add(32 * c + 16 * i));
                            let scale = scales[2 * c + i] as i8 as i32;
                            if i == 0 {
                                sum_lo = vmlaq_n_s32(sum_lo, groups::<SDOT>(w, q), scale);
                            } else {
                                sum_hi = vmlaq_n_s32(sum_hi, groups::<SDOT>(w, q), scale);
                            }
                        }
                    }
                }
                super::format::f16_at(block, Q6_K_D)
            } else {
                let u = scales_then_mins(&block[4..16]);
                let sc: [u8; 16] = std::array::from_fn(|i| u[i / 4].to_le_bytes()[i % 4]);
                let qs = if KIND == Q4_K { Q4_K_QS } else { Q5_K_QS };
                let mut high_bits = [vdupq_n_u8(0); 2];
                if KIND == Q5_K {
                    high_bits = [vld1q_u8(p.add(Q5_K_QH)), vld1q_u8(p.add(Q5_K_QH + 16))];
                }
                for j in 0..4 {
                    for (i, high_bits) in high_bits.iter_mut().enumerate() {
                        let raw = vld1q_u8(p.add(qs + 32 * j + 16 * i));
                        let mut low = vandq_u8(raw, low4);
                        let mut high = vshrq_n_u8::<4>(raw);
                        if KIND == Q5_K {
                            // Bits 2j and 2j + 1 of each byte, shifted down by two per `j`.
                            let h = *high_bits;
                            low = vorrq_u8(low, vandq_u8(vshlq_n_u8::<4>(h), vdupq_n_u8(16)));
                            high = vorrq_u8(high, vandq_u8(vshlq_n_u8::<3>(h), vdupq_n_u8(16)));
                            *high_bits = vshrq_n_u8::<2>(h);
                        }
                        let q_low = vld1q_s8(a.qs.as_ptr().add(64 * j + 16 * i));
                        let q_high = vld1q_s8(a.qs.as_ptr().add(64 * j + 32 + 16 * i));
                        let s_low = groups::<SDOT>(vreinterpretq_s8_u8(low), q_low);
                        let s_high = groups::<SDOT>(vreinterpretq_s8_u8(high), q_high);
                        let both =
                            vaddq_s32(vmulq_n_s32(s_low, sc[2 * j] as i32), vmulq_n_s32(s_high, sc[2 * j + 1] as i32));
                        if i == 0 {
                            sum_lo = vaddq_s32(sum_lo, both);
                        } else {
                            sum_hi = vaddq_s32(sum_hi, both);
                        }
                    }
                }
                // The mins, as `kquant_portable.rs` computes them.
                let dmin = -a.d * super::format::f16_at(block, 2);
                let sums: [i32; 8] = std::array::from_fn(|s| a.bsums[2 * s] as i32 + a.bsums[2 * s + 1] as i32);
                let products: [i32; 4] = std::array::from_fn(|j| {
                    sc[8 + 2 * j] as i32 * sums[2 * j] + sc[8 + 2 * j + 1] as i32 * sums[2 * j + 1]
                });
                if KIND == Q4_K {
                    let products = vcvtq_f32_s32(vld1q_s32(products.as_ptr()));
                    acc_m = vfmaq_f32(acc_m, products, vdupq_n_f32(dmin));
                } else {
                    summs = dmin.mul_add(products.iter().sum::<i32>() as f32, summs);
                }
                super::format::f16_at(block, 0)
            }
        };
        let d = vdupq_n_f32(a.d * d_w);
        acc_lo = vfmaq_f32(acc_lo, vcvtq_f32_s32(sum_lo), d);
        acc_hi = vfmaq_f32(acc_hi, vcvtq_f32_s32(sum_hi), d);
    }
    let mut lanes = [0.0f32; 8];
    let mut min_lanes = [0.0f32; 4];
    // SAFETY: `lanes` holds 8 f32s, `min_lanes` 4.
    unsafe {
        vst1q_f32(lanes.as_mut_ptr(), acc_lo);
        vst1q_f32(lanes.as_mut_ptr().add(4), acc_hi);
        vst1q_f32(min_lanes.as_mut_ptr(), acc_m);
    }
    match KIND {
        Q4_K => sum_lanes(lanes) + sum_min_lanes(min_lanes),
        Q5_K => sum_lanes(lanes) + summs,
        _ => sum_lanes(lanes),
    }
}

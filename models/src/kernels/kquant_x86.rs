//! AVX2 + FMA K-quant kernels: ggml's x86 code for Q4_K, Q5_K and Q6_K, with its float
//! operations in its order (see `kquant_portable.rs`), several weight or activation rows
//! per pass as in `x86.rs`.
//!
//! The integer work per 32 values is ggml's: `maddubs` of the unsigned weight quants with
//! the activation quants, then `madd` with the sub-block's scale, which leaves the eight
//! i32 lanes the float steps expect. (Q6_K's `q - 32` is reached by subtracting `maddubs`
//! of 32 with the activations, as ggml does, since `maddubs` needs unsigned weights.)

use std::arch::x86_64::*;

use super::kquant_activation::Q8KBlock;
use super::kquant_format::{scales_then_mins, KQuant, Q4_K_QS, Q5_K_QH, Q5_K_QS, Q6_K_D, Q6_K_QH, Q6_K_SCALES};
use super::kquant_portable::sum_min_lanes;
use super::portable::sum_lanes;
use super::x86::Avx2;

/// Formats as const-generic parameters, so one kernel body serves all three.
const Q4_K: u8 = 0;
const Q5_K: u8 = 1;
const Q6_K: u8 = 2;

/// Activation rows handled per pass over a weight row when prefilling.
const ACT_ROWS: usize = 4;

/// Weight rows handled together when decoding (one activation row).
const WEIGHT_ROWS: usize = 1;

/// How far ahead of the block being read to prefetch weights.
const PREFETCH_BYTES: usize = 2048;

impl Avx2 {
    /// AVX2 version of [`super::kquant_portable::product_rows_k`].
    pub(crate) fn product_rows_k(
        self,
        kind: KQuant,
        weights: &[u8],
        blocks: usize,
        acts: &[Q8KBlock],
        m: usize,
        out: &mut [f32],
    ) {
        // SAFETY: `self` exists only on CPUs with the features `rows` needs.
        unsafe {
            match kind {
                KQuant::Q4_K => rows::<Q4_K>(weights, blocks, acts, m, out),
                KQuant::Q5_K => rows::<Q5_K>(weights, blocks, acts, m, out),
                KQuant::Q6_K => rows::<Q6_K>(weights, blocks, acts, m, out),
            }
        }
    }
}

const fn block_bytes<const KIND: u8>() -> usize {
    match KIND {
        Q4_K => KQuant::Q4_K.block_bytes(),
        Q5_K => KQuant::Q5_K.block_bytes(),
        _ => KQuant::Q6_K.block_bytes(),
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows<const KIND: u8>(weights: &[u8], blocks: usize, acts: &[Q8KBlock], m: usize, out: &mut [f32]) {
    let row_bytes = blocks * block_bytes::<KIND>();
    assert!(acts.len() >= m * blocks && out.len() * row_bytes == weights.len() * m);
    let act = |i: usize| &acts[i * blocks..(i + 1) * blocks];
    // SAFETY (every call below): same features as this function; `dots` checks that the
    // rows and activation rows it gets are whole and of equal length.
    unsafe {
        if m == 1 {
            let mut groups = weights.chunks_exact(WEIGHT_ROWS * row_bytes);
            let mut outs = out.chunks_exact_mut(WEIGHT_ROWS);
            for (group, out) in (&mut groups).zip(&mut outs) {
                let rows = std::array::from_fn(|r| &group[r * row_bytes..(r + 1) * row_bytes]);
                let dots = dots::<KIND, WEIGHT_ROWS, 1>(rows, [act(0)]);
                for (out, dots) in out.iter_mut().zip(dots) {
                    *out = dots[0];
                }
            }
            for (row, out) in groups.remainder().chunks_exact(row_bytes).zip(outs.into_remainder()) {
                *out = dots::<KIND, 1, 1>([row], [act(0)])[0][0];
            }
            return;
        }
        for (row, out) in weights.chunks_exact(row_bytes).zip(out.chunks_exact_mut(m)) {
            let mut i = 0;
            while m - i >= ACT_ROWS {
                let acts = [act(i), act(i + 1), act(i + 2), act(i + 3)];
                out[i..i + ACT_ROWS].copy_from_slice(&dots::<KIND, 1, ACT_ROWS>([row], acts)[0]);
                i += ACT_ROWS;
            }
            match m - i {
                3 => out[i..].copy_from_slice(&dots::<KIND, 1, 3>([row], [act(i), act(i + 1), act(i + 2)])[0]),
                2 => out[i..].copy_from_slice(&dots::<KIND, 1, 2>([row], [act(i), act(i + 1)])[0]),
                1 => out[i] = dots::<KIND, 1, 1>([row], [act(i)])[0][0],
                _ => {}
            }
        }
    }
}

/// `R` weight rows dotted with `N` activation rows: each weight chunk is unpacked once for
/// all `N`, each activation chunk loaded once for all `R`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dots<const KIND: u8, const R: usize, const N: usize>(
    rows: [&[u8]; R],
    xs: [&[Q8KBlock]; N],
) -> [[f32; N]; R] {
    let bytes = block_bytes::<KIND>();
    let blocks = xs[0].len();
    assert!(rows.iter().all(|row| row.len() == blocks * bytes) && xs.iter().all(|x| x.len() == blocks));
    let low4 = _mm256_set1_epi8(0x0F);
    let mut acc = [[_mm256_setzero_ps(); N]; R];
    let mut acc_m = [[_mm_setzero_ps(); N]; R];
    let mut summs = [[0.0f32; N]; R];
    for b in 0..blocks {
        // SAFETY (every read through `w` below): each row holds `blocks` whole blocks, so
        // `w[r]` points to `bytes` readable bytes, and every offset read is within them.
        let w: [*const u8; R] = std::array::from_fn(|r| rows[r][b * bytes..].as_ptr());
        let a: [&Q8KBlock; N] = std::array::from_fn(|n| &xs[n][b]);
        let mut sumi = [[_mm256_setzero_si256(); N]; R];
        let mut d_w = [0.0f32; R];
        let mut dmin_w = [0.0f32; R];
        // Q4_K and Q5_K: the eight scales as i16, in both halves; the eight mins as i16.
        // Q6_K: the sixteen i8 scales.
        let mut scales = [_mm256_setzero_si256(); R];
        let mut mins = [_mm_setzero_si128(); R];
        for r in 0..R {
            let p = w[r];
            // The prefetch is a hint that never faults, wherever it points.
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH_BYTES).cast());
            unsafe {
                if KIND == Q6_K {
                    let d = p.add(Q6_K_D).cast::<u16>().read_unaligned();
                    d_w[r] = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(d as i32)));
                    scales[r] = _mm256_castsi128_si256(_mm_loadu_si128(p.add(Q6_K_SCALES).cast()));
                } else {
                    let header = _mm_cvtph_ps(_mm_cvtsi32_si128(p.cast::<i32>().read_unaligned()));
                    d_w[r] = _mm_cvtss_f32(header);
                    dmin_w[r] = _mm_cvtss_f32(_mm_movehdup_ps(header));
                    let u = scales_then_mins(std::slice::from_raw_parts(p.add(4), 12));
                    let both = _mm256_cvtepu8_epi16(_mm_set_epi32(u[3] as i32, u[2] as i32, u[1] as i32, u[0] as i32));
                    let sc = _mm256_castsi256_si128(both);
                    scales[r] = _mm256_set_m128i(sc, sc);
                    mins[r] = _mm256_extracti128_si256::<1>(both);
                }
            }
        }
        if KIND == Q6_K {
            let low2 = _mm256_set1_epi8(3);
            let m32 = _mm256_set1_epi8(32);
            for half in 0..2 {
                // The activations and their `32 * q8` offsets, shared by all rows.
                let mut q8 = [[_mm256_setzero_si256(); 4]; N];
                let mut offsets = [[_mm256_setzero_si256(); 4]; N];
                for n in 0..N {
                    for k in 0..4 {
                        // SAFETY: `qs` holds 256 bytes.
                        q8[n][k] = unsafe { _mm256_loadu_si256(a[n].qs.as_ptr().add(128 * half + 32 * k).cast()) };
                        offsets[n][k] = _mm256_maddubs_epi16(m32, q8[n][k]);
                    }
                }
                for r in 0..R {
                    let p = w[r];
                    let (ql0, ql1, qh) = unsafe {
                        (
                            _mm256_loadu_si256(p.add(64 * half).cast()),
                            _mm256_loadu_si256(p.add(64 * half + 32).cast()),
                            _mm256_loadu_si256(p.add(Q6_K_QH + 32 * half).cast()),
                        )
                    };
                    let top = |h: __m256i| _mm256_slli_epi16::<4>(_mm256_and_si256(h, low2));
                    let quants = [
                        _mm256_or_si256(_mm256_and_si256(ql0, low4), top(qh)),
                        _mm256_or_si256(_mm256_and_si256(ql1, low4), top(_mm256_srli_epi16::<2>(qh))),
                        _mm256_or_si256(
                            _mm256_and_si256(_mm256_srli_epi16::<4>(ql0), low4),
                            top(_mm256_srli_epi16::<4>(qh)),
                        ),
                        _mm256_or_si256(
                            _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), low4),
                            top(_mm256_srli_epi16::<6>(qh)),
                        ),
                    ];
                    let sc128 = _mm256_castsi256_si128(scales[r]);
                    for k in 0..4 {
                        // Chunk `c` of 32 values: scale 2c for its first 16, 2c + 1 for the rest.
                        let c = (4 * half + k) as i64;
                        let pick = _mm_set_epi64x((2 * c + 1) * 0x0101_0101_0101_0101, 2 * c * 0x0101_0101_0101_0101);
                        let scale = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(sc128, pick));
                        for n in 0..N {
                            let p16 = _mm256_sub_epi16(_mm256_maddubs_epi16(quants[k], q8[n][k]), offsets[n][k]);
                            sumi[r][n] = _mm256_add_epi32(sumi[r][n], _mm256_madd_epi16(scale, p16));
                        }
                    }
                }
            }
        } else {
            let qs = if KIND == Q4_K { Q4_K_QS } else { Q5_K_QS };
            let bit4 = _mm256_set1_epi8(16);
            // Q5_K's fifth bits, shifted right by two per pair of sub-blocks so that the
            // bits of sub-blocks 2j and 2j + 1 are in bits 0 and 1 of each byte.
            let mut high_bits = [_mm256_setzero_si256(); R];
            if KIND == Q5_K {
                for r in 0..R {
                    high_bits[r] = unsafe { _mm256_loadu_si256(w[r].add(Q5_K_QH).cast()) };
                }
            }
            for j in 0..4 {
                let mut q8 = [[_mm256_setzero_si256(); 2]; N];
                for n in 0..N {
                    // SAFETY: `qs` holds 256 bytes.
                    unsafe {
                        q8[n][0] = _mm256_loadu_si256(a[n].qs.as_ptr().add(64 * j).cast());
                        q8[n][1] = _mm256_loadu_si256(a[n].qs.as_ptr().add(64 * j + 32).cast());
                    }
                }
                // Broadcasts the i16 scale of sub-block `s` from `scales`.
                let pick = |s: usize| _mm256_set1_epi16((((2 * s + 1) << 8) | (2 * s)) as i16);
                let (pick_l, pick_h) = (pick(2 * j), pick(2 * j + 1));
                for r in 0..R {
                    let raw = unsafe { _mm256_loadu_si256(w[r].add(qs + 32 * j).cast()) };
                    let mut low = _mm256_and_si256(raw, low4);
                    let mut high = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), low4);
                    if KIND == Q5_K {
                        // Bits 0 and 1 of each byte moved to bit 4 (16-bit shifts: the bits
                        // crossing into the next byte are masked off).
                        let h = high_bits[r];
                        low = _mm256_or_si256(low, _mm256_and_si256(_mm256_slli_epi16::<4>(h), bit4));
                        high = _mm256_or_si256(high, _mm256_and_si256(_mm256_slli_epi16::<3>(h), bit4));
                        high_bits[r] = _mm256_srli_epi16::<2>(h);
                    }
                    let scale_l = _mm256_shuffle_epi8(scales[r], pick_l);
                    let scale_h = _mm256_shuffle_epi8(scales[r], pick_h);
                    for n in 0..N {
                        let pl = _mm256_madd_epi16(scale_l, _mm256_maddubs_epi16(low, q8[n][0]));
                        let ph = _mm256_madd_epi16(scale_h, _mm256_maddubs_epi16(high, q8[n][1]));
                        sumi[r][n] = _mm256_add_epi32(sumi[r][n], _mm256_add_epi32(pl, ph));
                    }
                }
            }
        }
        // The float steps, in ggml's order.
        for n in 0..N {
            // bsums in pairs: the sums of each sub-block of 32 activations.
            let q8s = if KIND == Q6_K {
                _mm_setzero_si128()
            } else {
                // SAFETY: `bsums` holds 16 i16s.
                let sums = unsafe { _mm256_loadu_si256(a[n].bsums.as_ptr().cast()) };
                _mm_hadd_epi16(_mm256_castsi256_si128(sums), _mm256_extracti128_si256::<1>(sums))
            };
            for r in 0..R {
                let d = _mm256_set1_ps(a[n].d * d_w[r]);
                acc[r][n] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi[r][n]), acc[r][n]);
                if KIND != Q6_K {
                    let dmin = -a[n].d * dmin_w[r];
                    let products = _mm_madd_epi16(mins[r], q8s);
                    if KIND == Q4_K {
                        acc_m[r][n] = _mm_fmadd_ps(_mm_set1_ps(dmin), _mm_cvtepi32_ps(products), acc_m[r][n]);
                    } else {
                        summs[r][n] = dmin.mul_add(hsum_i32_4(products) as f32, summs[r][n]);
                    }
                }
            }
        }
    }
    let mut out = [[0.0f32; N]; R];
    for r in 0..R {
        for n in 0..N {
            let mut lanes = [0.0f32; 8];
            let mut min_lanes = [0.0f32; 4];
            // SAFETY: `lanes` holds 8 f32s, `min_lanes` 4.
            unsafe {
                _mm256_storeu_ps(lanes.as_mut_ptr(), acc[r][n]);
                _mm_storeu_ps(min_lanes.as_mut_ptr(), acc_m[r][n]);
            }
            out[r][n] = match KIND {
                Q4_K => sum_lanes(lanes) + sum_min_lanes(min_lanes),
                Q5_K => sum_lanes(lanes) + summs[r][n],
                _ => sum_lanes(lanes),
            };
        }
    }
    out
}

#[inline]
#[target_feature(enable = "avx2")]
fn hsum_i32_4(v: __m128i) -> i32 {
    let sum = _mm_add_epi32(v, _mm_unpackhi_epi64(v, v));
    let sum = _mm_add_epi32(sum, _mm_shuffle_epi32::<0b10_11_00_01>(sum));
    _mm_cvtsi128_si32(sum)
}

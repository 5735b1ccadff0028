//! x86 K-quant kernels: ggml's AVX2 code for Q4_K, Q5_K, Q6_K, Q2_K and Q3_K, with its float
//! operations in its order (see `kquant_portable.rs`), and an AVX-512 (VNNI) version that
//! reaches the same integer sums 64 values at a time, then takes the same float steps.
//! Several activation rows share each unpacked weight chunk when prefilling.
//!
//! The integer work per 32 values is ggml's: `maddubs` of the unsigned weight quants with
//! the activation quants, then `madd` with the sub-block's scale, which leaves the eight
//! i32 lanes the float steps expect. (Q6_K's `q - 32` is reached by subtracting `maddubs`
//! of 32 with the activations, as ggml does, since `maddubs` needs unsigned weights; Q3_K's
//! `q - 4` likewise, by subtracting `maddubs` of 4 where the high bit is clear.)

use std::arch::x86_64::*;

use super::kquant_activation::Q8KBlock;
use super::kquant_format::{
    scales_3_words, scales_then_mins, KQuant, Q2_K_D, Q2_K_QS, Q3_K_D, Q3_K_QS, Q3_K_SCALES, Q4_K_QS, Q5_K_QH, Q5_K_QS,
    Q6_K_D, Q6_K_QH, Q6_K_SCALES,
};
use super::kquant_portable::sum_min_lanes;
use super::portable::sum_lanes;
use super::x86::Avx2;

/// Formats as const-generic parameters, so one kernel body serves them all.
const Q4_K: u8 = 0;
const Q5_K: u8 = 1;
const Q6_K: u8 = 2;
const Q2_K: u8 = 3;
const Q3_K: u8 = 4;

/// Activation rows handled per pass over a weight row when prefilling.
const ACT_ROWS: usize = 4;

// One weight row per pass, even when decoding: two or four (sharing each activation load,
// as `x86.rs` does) measured slower for these larger blocks, with more streams for the
// prefetchers and registers spilled. (`dots` still takes `R` rows, for trying again.)

/// How far ahead of the block being read to prefetch weights.
const PREFETCH_BYTES: usize = 2048;

impl Avx2 {
    /// x86 version of [`super::kquant_portable::product_rows_k`]: AVX-512 where the CPU has
    /// it (with VNNI), AVX2 otherwise.
    pub(crate) fn product_rows_k(
        self,
        kind: KQuant,
        weights: &[u8],
        blocks: usize,
        acts: &[Q8KBlock],
        m: usize,
        out: &mut [f32],
    ) {
        // Detection is a cached bit test.
        match Avx512Vnni::detect() {
            Some(wide) => wide.product_rows_k(kind, weights, blocks, acts, m, out),
            None => self.product_rows_k_avx2(kind, weights, blocks, acts, m, out),
        }
    }

    /// [`Avx2::product_rows_k`] with the AVX2 kernels only.
    pub(crate) fn product_rows_k_avx2(
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
                KQuant::Q4_K => rows::<Q4_K, false>(weights, blocks, acts, m, out),
                KQuant::Q5_K => rows::<Q5_K, false>(weights, blocks, acts, m, out),
                KQuant::Q6_K => rows::<Q6_K, false>(weights, blocks, acts, m, out),
                KQuant::Q2_K => rows::<Q2_K, false>(weights, blocks, acts, m, out),
                KQuant::Q3_K => rows::<Q3_K, false>(weights, blocks, acts, m, out),
            }
        }
    }
}

const fn block_bytes<const KIND: u8>() -> usize {
    match KIND {
        Q4_K => KQuant::Q4_K.block_bytes(),
        Q5_K => KQuant::Q5_K.block_bytes(),
        Q6_K => KQuant::Q6_K.block_bytes(),
        Q2_K => KQuant::Q2_K.block_bytes(),
        _ => KQuant::Q3_K.block_bytes(),
    }
}

/// The rows of a product; with `WIDE`, through the AVX-512 kernels (callers vouch for the
/// CPU).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows<const KIND: u8, const WIDE: bool>(
    weights: &[u8],
    blocks: usize,
    acts: &[Q8KBlock],
    m: usize,
    out: &mut [f32],
) {
    let row_bytes = blocks * block_bytes::<KIND>();
    assert!(acts.len() >= m * blocks && out.len() * row_bytes == weights.len() * m);
    let act = |i: usize| &acts[i * blocks..(i + 1) * blocks];
    // SAFETY (every call below): same features as this function (and the AVX-512 ones if
    // `WIDE`); the kernels check that the rows and activation rows they get are whole and
    // of equal length.
    unsafe {
        for (row, out) in weights.chunks_exact(row_bytes).zip(out.chunks_exact_mut(m)) {
            let mut i = 0;
            while m - i >= ACT_ROWS {
                let acts = [act(i), act(i + 1), act(i + 2), act(i + 3)];
                out[i..i + ACT_ROWS].copy_from_slice(&dots_of::<KIND, WIDE, ACT_ROWS>(row, acts));
                i += ACT_ROWS;
            }
            match m - i {
                3 => out[i..].copy_from_slice(&dots_of::<KIND, WIDE, 3>(row, [act(i), act(i + 1), act(i + 2)])),
                2 => out[i..].copy_from_slice(&dots_of::<KIND, WIDE, 2>(row, [act(i), act(i + 1)])),
                1 => out[i] = dots_of::<KIND, WIDE, 1>(row, [act(i)])[0],
                _ => {}
            }
        }
    }
}

/// One weight row dotted with `N` activation rows by the AVX2 or (`WIDE`) the AVX-512
/// kernel.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dots_of<const KIND: u8, const WIDE: bool, const N: usize>(row: &[u8], xs: [&[Q8KBlock]; N]) -> [f32; N] {
    // SAFETY: the caller vouches for the features of the kernel it asks for.
    unsafe {
        if WIDE {
            dots_wide::<KIND, N>(row, xs)
        } else {
            dots::<KIND, 1, N>([row], xs)[0]
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
        // Q6_K, Q2_K and Q3_K: the sixteen scales as i8; Q2_K's sixteen mins as i16.
        let mut scales = [_mm256_setzero_si256(); R];
        let mut mins = [_mm_setzero_si128(); R];
        let mut mins_16 = [_mm256_setzero_si256(); R];
        for r in 0..R {
            let p = w[r];
            // The prefetch is a hint that never faults, wherever it points.
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH_BYTES).cast());
            unsafe {
                if KIND == Q2_K {
                    let header = _mm_cvtph_ps(_mm_cvtsi32_si128(p.add(Q2_K_D).cast::<i32>().read_unaligned()));
                    d_w[r] = _mm_cvtss_f32(header);
                    dmin_w[r] = _mm_cvtss_f32(_mm_movehdup_ps(header));
                    let packed = _mm_loadu_si128(p.cast());
                    scales[r] = _mm256_castsi128_si256(_mm_and_si128(packed, _mm_set1_epi8(0x0F)));
                    mins_16[r] = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16::<4>(packed), _mm_set1_epi8(0x0F)));
                } else if KIND == Q3_K {
                    let d = p.add(Q3_K_D).cast::<u16>().read_unaligned();
                    d_w[r] = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(d as i32)));
                    let u = scales_3_words(std::slice::from_raw_parts(p.add(Q3_K_SCALES), 12));
                    let packed = _mm_set_epi32(u[3] as i32, u[2] as i32, u[1] as i32, u[0] as i32);
                    scales[r] = _mm256_castsi128_si256(_mm_sub_epi8(packed, _mm_set1_epi8(32)));
                } else if KIND == Q6_K {
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
        if KIND == Q2_K || KIND == Q3_K {
            let low2 = _mm256_set1_epi8(3);
            let m4 = _mm256_set1_epi8(4);
            // Q3_K's high bits: bit `4 * half + k` of byte `l` for value `l` of chunk `k`.
            let mut hmask = [_mm256_setzero_si256(); R];
            if KIND == Q3_K {
                for r in 0..R {
                    hmask[r] = unsafe { _mm256_loadu_si256(w[r].cast()) };
                }
            }
            let qs = if KIND == Q2_K { Q2_K_QS } else { Q3_K_QS };
            for half in 0..2 {
                for r in 0..R {
                    let bits = unsafe { _mm256_loadu_si256(w[r].add(qs + 32 * half).cast()) };
                    let low = [
                        _mm256_and_si256(bits, low2),
                        _mm256_and_si256(_mm256_srli_epi16::<2>(bits), low2),
                        _mm256_and_si256(_mm256_srli_epi16::<4>(bits), low2),
                        _mm256_and_si256(_mm256_srli_epi16::<6>(bits), low2),
                    ];
                    let sc128 = _mm256_castsi256_si128(scales[r]);
                    for (k, low) in low.into_iter().enumerate() {
                        // 4 where Q3_K's high bit is clear, so that `low - high` is its quant.
                        let high = if KIND == Q3_K {
                            let bit = _mm256_set1_epi8((1u8 << (4 * half + k)) as i8);
                            let clear = _mm256_cmpeq_epi8(_mm256_and_si256(hmask[r], bit), _mm256_setzero_si256());
                            _mm256_and_si256(clear, m4)
                        } else {
                            _mm256_setzero_si256()
                        };
                        // Chunk `c` of 32 values: scale 2c for its first 16, 2c + 1 for the rest.
                        let c = (4 * half + k) as i64;
                        let pick = _mm_set_epi64x((2 * c + 1) * 0x0101_0101_0101_0101, 2 * c * 0x0101_0101_0101_0101);
                        let scale = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(sc128, pick));
                        for n in 0..N {
                            // SAFETY: `qs` holds 256 bytes.
                            let q8 = unsafe { _mm256_loadu_si256(a[n].qs.as_ptr().add(128 * half + 32 * k).cast()) };
                            let mut p16 = _mm256_maddubs_epi16(low, q8);
                            if KIND == Q3_K {
                                p16 = _mm256_sub_epi16(p16, _mm256_maddubs_epi16(high, q8));
                            }
                            sumi[r][n] = _mm256_add_epi32(sumi[r][n], _mm256_madd_epi16(scale, p16));
                        }
                    }
                }
            }
        } else if KIND == Q6_K {
            let low2 = _mm256_set1_epi8(3);
            let m32 = _mm256_set1_epi8(32);
            for half in 0..2 {
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
                    for (k, quants) in quants.into_iter().enumerate() {
                        // Chunk `c` of 32 values: scale 2c for its first 16, 2c + 1 for the rest.
                        let c = (4 * half + k) as i64;
                        let pick = _mm_set_epi64x((2 * c + 1) * 0x0101_0101_0101_0101, 2 * c * 0x0101_0101_0101_0101);
                        let scale = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(sc128, pick));
                        for n in 0..N {
                            // SAFETY: `qs` holds 256 bytes.
                            let q8 = unsafe { _mm256_loadu_si256(a[n].qs.as_ptr().add(128 * half + 32 * k).cast()) };
                            let offset = _mm256_maddubs_epi16(m32, q8);
                            let p16 = _mm256_sub_epi16(_mm256_maddubs_epi16(quants, q8), offset);
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
            // SAFETY: `bsums` holds 16 i16s.
            let bsums = unsafe { _mm256_loadu_si256(a[n].bsums.as_ptr().cast()) };
            let q8s = _mm_hadd_epi16(_mm256_castsi256_si128(bsums), _mm256_extracti128_si256::<1>(bsums));
            for r in 0..R {
                if KIND == Q2_K {
                    // Q2_K's mins first, into the same lanes.
                    let dmin = _mm256_set1_ps(-a[n].d * dmin_w[r]);
                    let products = _mm256_madd_epi16(mins_16[r], bsums);
                    acc[r][n] = _mm256_fmadd_ps(dmin, _mm256_cvtepi32_ps(products), acc[r][n]);
                }
                let d = _mm256_set1_ps(a[n].d * d_w[r]);
                acc[r][n] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi[r][n]), acc[r][n]);
                if KIND == Q4_K || KIND == Q5_K {
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

/// Proof that this CPU runs AVX-512 (F, BW, VL) with VNNI, besides all that [`Avx2`] needs:
/// the entry point of the 512-bit K-quant kernels (which [`Avx2::product_rows_k`] picks
/// when it can).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Avx512Vnni(Avx2);

impl Avx512Vnni {
    pub(crate) fn detect() -> Option<Self> {
        let avx2 = Avx2::detect()?;
        let supported = is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni");
        supported.then_some(Self(avx2))
    }

    /// AVX-512 version of [`super::kquant_portable::product_rows_k`].
    pub(crate) fn product_rows_k(
        self,
        kind: KQuant,
        weights: &[u8],
        blocks: usize,
        acts: &[Q8KBlock],
        m: usize,
        out: &mut [f32],
    ) {
        // SAFETY: `self` exists only on CPUs with the features `rows` needs, and with the
        // AVX-512 ones `WIDE` kernels need.
        unsafe {
            match kind {
                KQuant::Q4_K => rows::<Q4_K, true>(weights, blocks, acts, m, out),
                KQuant::Q5_K => rows::<Q5_K, true>(weights, blocks, acts, m, out),
                KQuant::Q6_K => rows::<Q6_K, true>(weights, blocks, acts, m, out),
                KQuant::Q2_K => rows::<Q2_K, true>(weights, blocks, acts, m, out),
                KQuant::Q3_K => rows::<Q3_K, true>(weights, blocks, acts, m, out),
            }
        }
    }
}

/// One weight row dotted with `N` activation rows, 64 values per instruction: the integer
/// sums of two 32-value chunks at once in 16 lanes (`dpwssd` adds the scaled pairs), folded
/// into the eight lanes of the float steps, which are [`dots`]'s.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn dots_wide<const KIND: u8, const N: usize>(row: &[u8], xs: [&[Q8KBlock]; N]) -> [f32; N] {
    let bytes = block_bytes::<KIND>();
    let blocks = xs[0].len();
    assert!(row.len() == blocks * bytes && xs.iter().all(|x| x.len() == blocks));
    let low4 = _mm512_set1_epi8(0x0F);
    // Per 16-bit lane: no shift for the lower 32 bytes, `n` for the upper ones.
    let upper_by = |n: i16| _mm512_inserti64x4::<1>(_mm512_setzero_si512(), _mm256_set1_epi16(n));
    // Per 16-bit lane: `i` for the lower half, `i + 1` for the upper one.
    let halves = |i: i16| _mm512_inserti64x4::<1>(_mm512_set1_epi16(i), _mm256_set1_epi16(i + 1));
    // For 16 values to a scale: lanes 0-7 of a 64-value chunk's 16-bit pairs take scale 4q,
    // lanes 8-15 4q + 1, ...
    let quarters = _mm512_inserti64x4::<1>(
        _mm512_castsi256_si512(_mm256_inserti128_si256::<1>(_mm256_setzero_si256(), _mm_set1_epi16(1))),
        _mm256_inserti128_si256::<1>(_mm256_set1_epi16(2), _mm_set1_epi16(3)),
    );
    let mut acc = [_mm256_setzero_ps(); N];
    let mut acc_m = [_mm_setzero_ps(); N];
    let mut summs = [0.0f32; N];
    for b in 0..blocks {
        // SAFETY (every read through `p` below): the row holds `blocks` whole blocks, so `p`
        // points to `bytes` readable bytes, and every offset read is within them.
        let p = row[b * bytes..].as_ptr();
        let a: [&Q8KBlock; N] = std::array::from_fn(|n| &xs[n][b]);
        // The prefetch is a hint that never faults, wherever it points.
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH_BYTES).cast());
        let mut sumi = [_mm512_setzero_si512(); N];
        let (mut dmin_w, mut mins, mut mins_16) = (0.0f32, _mm_setzero_si128(), _mm256_setzero_si256());
        let d_w = if KIND == Q2_K || KIND == Q3_K {
            let (d_w, scales) = unsafe {
                if KIND == Q2_K {
                    let header = _mm_cvtph_ps(_mm_cvtsi32_si128(p.add(Q2_K_D).cast::<i32>().read_unaligned()));
                    dmin_w = _mm_cvtss_f32(_mm_movehdup_ps(header));
                    let packed = _mm_loadu_si128(p.cast());
                    mins_16 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16::<4>(packed), _mm_set1_epi8(0x0F)));
                    (_mm_cvtss_f32(header), _mm256_cvtepu8_epi16(_mm_and_si128(packed, _mm_set1_epi8(0x0F))))
                } else {
                    let d = p.add(Q3_K_D).cast::<u16>().read_unaligned();
                    let u = scales_3_words(std::slice::from_raw_parts(p.add(Q3_K_SCALES), 12));
                    let packed = _mm_set_epi32(u[3] as i32, u[2] as i32, u[1] as i32, u[0] as i32);
                    let d = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(d as i32)));
                    (d, _mm256_cvtepi8_epi16(_mm_sub_epi8(packed, _mm_set1_epi8(32))))
                }
            };
            let scales = _mm512_castsi256_si512(scales);
            let low2 = _mm512_set1_epi8(3);
            // Q3_K's high bits, in both halves.
            let hmask = if KIND == Q3_K {
                unsafe { _mm512_broadcast_i64x4(_mm256_loadu_si256(p.cast())) }
            } else {
                _mm512_setzero_si512()
            };
            let qs = if KIND == Q2_K { Q2_K_QS } else { Q3_K_QS };
            for half in 0..2 {
                let bits = unsafe { _mm512_broadcast_i64x4(_mm256_loadu_si256(p.add(qs + 32 * half).cast())) };
                for pair in 0..2 {
                    // 32-value chunks 2 * pair (in the lower half) and 2 * pair + 1 of this
                    // half's 128 values: bit pairs 2 * pair and 2 * pair + 1 of the bytes.
                    let shift = _mm512_add_epi16(upper_by(2), _mm512_set1_epi16(4 * pair as i16));
                    let low = _mm512_and_si512(_mm512_srlv_epi16(bits, shift), low2);
                    let chunk = 2 * half + pair;
                    let scale = _mm512_permutexvar_epi16(
                        _mm512_add_epi16(quarters, _mm512_set1_epi16(4 * chunk as i16)),
                        scales,
                    );
                    // 4 where Q3_K's high bit is clear, so that `low - high` is its quant.
                    let high = if KIND == Q3_K {
                        let bit = 4 * half + 2 * pair;
                        let bits = _mm512_inserti64x4::<1>(
                            _mm512_set1_epi8((1u8 << bit) as i8),
                            _mm256_set1_epi8((1u8 << (bit + 1)) as i8),
                        );
                        _mm512_maskz_mov_epi8(_mm512_testn_epi8_mask(hmask, bits), _mm512_set1_epi8(4))
                    } else {
                        _mm512_setzero_si512()
                    };
                    for n in 0..N {
                        // SAFETY: `qs` holds 256 bytes.
                        let q8 = unsafe { _mm512_loadu_si512(a[n].qs.as_ptr().add(64 * chunk).cast()) };
                        let mut p16 = _mm512_maddubs_epi16(low, q8);
                        if KIND == Q3_K {
                            p16 = _mm512_sub_epi16(p16, _mm512_maddubs_epi16(high, q8));
                        }
                        sumi[n] = _mm512_dpwssd_epi32(sumi[n], p16, scale);
                    }
                }
            }
            d_w
        } else if KIND == Q6_K {
            let (d, scales) = unsafe {
                let d = p.add(Q6_K_D).cast::<u16>().read_unaligned();
                (d, _mm256_cvtepi8_epi16(_mm_loadu_si128(p.add(Q6_K_SCALES).cast())))
            };
            let scales = _mm512_castsi256_si512(scales);
            let low2 = _mm512_set1_epi8(3);
            let m32 = _mm512_set1_epi8(32);
            for half in 0..2 {
                let (low, high) = unsafe {
                    (
                        _mm512_loadu_si512(p.add(64 * half).cast()),
                        _mm512_broadcast_i64x4(_mm256_loadu_si256(p.add(Q6_K_QH + 32 * half).cast())),
                    )
                };
                let top =
                    |shift: __m512i| _mm512_slli_epi16::<4>(_mm512_and_si512(_mm512_srlv_epi16(high, shift), low2));
                // Values 0-63 of the half: low nibbles, top bits 0-1 and 2-3; 64-127: high nibbles, bits 4-5 and 6-7.
                let quants = [
                    _mm512_or_si512(_mm512_and_si512(low, low4), top(upper_by(2))),
                    _mm512_or_si512(
                        _mm512_and_si512(_mm512_srli_epi16::<4>(low), low4),
                        top(_mm512_add_epi16(upper_by(2), _mm512_set1_epi16(4))),
                    ),
                ];
                for (i, quants) in quants.into_iter().enumerate() {
                    let chunk = 2 * half + i;
                    let scale = _mm512_permutexvar_epi16(
                        _mm512_add_epi16(quarters, _mm512_set1_epi16(4 * chunk as i16)),
                        scales,
                    );
                    for n in 0..N {
                        // SAFETY: `qs` holds 256 bytes.
                        let q8 = unsafe { _mm512_loadu_si512(a[n].qs.as_ptr().add(64 * chunk).cast()) };
                        let p16 = _mm512_sub_epi16(_mm512_maddubs_epi16(quants, q8), _mm512_maddubs_epi16(m32, q8));
                        sumi[n] = _mm512_dpwssd_epi32(sumi[n], p16, scale);
                    }
                }
            }
            _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(d as i32)))
        } else {
            let (header, u) = unsafe {
                (p.cast::<i32>().read_unaligned(), scales_then_mins(std::slice::from_raw_parts(p.add(4), 12)))
            };
            let header = _mm_cvtph_ps(_mm_cvtsi32_si128(header));
            dmin_w = _mm_cvtss_f32(_mm_movehdup_ps(header));
            let both = _mm256_cvtepu8_epi16(_mm_set_epi32(u[3] as i32, u[2] as i32, u[1] as i32, u[0] as i32));
            mins = _mm256_extracti128_si256::<1>(both);
            let scales = _mm512_castsi256_si512(both);
            let qs = if KIND == Q4_K { Q4_K_QS } else { Q5_K_QS };
            // Q5_K's fifth bits, in both halves.
            let high = if KIND == Q5_K {
                unsafe { _mm512_broadcast_i64x4(_mm256_loadu_si256(p.add(Q5_K_QH).cast())) }
            } else {
                _mm512_setzero_si512()
            };
            for j in 0..4 {
                // The 32 bytes of sub-blocks 2j (low nibbles) and 2j + 1 (high nibbles) as
                // their 64 values in order.
                let raw = unsafe { _mm512_broadcast_i64x4(_mm256_loadu_si256(p.add(qs + 32 * j).cast())) };
                let mut quants = _mm512_and_si512(_mm512_srlv_epi16(raw, upper_by(4)), low4);
                if KIND == Q5_K {
                    let bits = _mm512_inserti64x4::<1>(
                        _mm512_set1_epi8(1 << (2 * j)),
                        _mm256_set1_epi8((1 << (2 * j + 1)) as i8),
                    );
                    let set = _mm512_test_epi8_mask(high, bits);
                    quants = _mm512_mask_add_epi8(quants, set, quants, _mm512_set1_epi8(16));
                }
                let scale = _mm512_permutexvar_epi16(halves(2 * j as i16), scales);
                for n in 0..N {
                    // SAFETY: `qs` holds 256 bytes.
                    let q8 = unsafe { _mm512_loadu_si512(a[n].qs.as_ptr().add(64 * j).cast()) };
                    sumi[n] = _mm512_dpwssd_epi32(sumi[n], _mm512_maddubs_epi16(quants, q8), scale);
                }
            }
            _mm_cvtss_f32(header)
        };
        // The float steps, as in `dots`.
        for n in 0..N {
            let folded = _mm256_add_epi32(_mm512_castsi512_si256(sumi[n]), _mm512_extracti64x4_epi64::<1>(sumi[n]));
            // SAFETY: `bsums` holds 16 i16s.
            let sums = unsafe { _mm256_loadu_si256(a[n].bsums.as_ptr().cast()) };
            if KIND == Q2_K {
                let dmin = _mm256_set1_ps(-a[n].d * dmin_w);
                acc[n] = _mm256_fmadd_ps(dmin, _mm256_cvtepi32_ps(_mm256_madd_epi16(mins_16, sums)), acc[n]);
            }
            let d = _mm256_set1_ps(a[n].d * d_w);
            acc[n] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(folded), acc[n]);
            if KIND == Q4_K || KIND == Q5_K {
                let q8s = _mm_hadd_epi16(_mm256_castsi256_si128(sums), _mm256_extracti128_si256::<1>(sums));
                let dmin = -a[n].d * dmin_w;
                let products = _mm_madd_epi16(mins, q8s);
                if KIND == Q4_K {
                    acc_m[n] = _mm_fmadd_ps(_mm_set1_ps(dmin), _mm_cvtepi32_ps(products), acc_m[n]);
                } else {
                    summs[n] = dmin.mul_add(hsum_i32_4(products) as f32, summs[n]);
                }
            }
        }
    }
    let mut out = [0.0f32; N];
    for n in 0..N {
        let mut lanes = [0.0f32; 8];
        let mut min_lanes = [0.0f32; 4];
        // SAFETY: `lanes` holds 8 f32s, `min_lanes` 4.
        unsafe {
            _mm256_storeu_ps(lanes.as_mut_ptr(), acc[n]);
            _mm_storeu_ps(min_lanes.as_mut_ptr(), acc_m[n]);
        }
        out[n] = match KIND {
            Q4_K => sum_lanes(lanes) + sum_min_lanes(min_lanes),
            Q5_K => sum_lanes(lanes) + summs[n],
            _ => sum_lanes(lanes),
        };
    }
    out
}

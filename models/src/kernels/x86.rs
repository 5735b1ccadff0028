//! AVX2 + FMA kernels: ggml's x86 code for the same formats, instruction for instruction
//! where the order of floating-point operations matters (see `portable.rs`).
//!
//! The kernels are reached through [`Avx2`], a token that only exists once the CPU has
//! been seen to support AVX2, FMA and F16C; memory is reached only through slices whose
//! lengths are checked before any pointer is formed.

use std::arch::x86_64::*;

use super::activation::{round_to_f16, scales, Q8Block};
use super::format::{e8m0_half, WeightFormat, BLOCK, MXFP4_VALUES};
use super::portable::{add_offset, sum_lanes};

/// Formats as const-generic parameters, so one kernel body serves them all.
pub(super) const Q4_0: u8 = 0;
pub(super) const Q4_1: u8 = 1;
pub(super) const Q8_0: u8 = 2;
pub(super) const Q5_0: u8 = 3;
pub(super) const Q5_1: u8 = 4;
pub(super) const MXFP4: u8 = 5;

/// Activation rows handled per pass over a weight row when prefilling: each unpacked weight
/// block is reused this many times, and the accumulators still fit in 16 vector registers.
const ACT_ROWS: usize = 4;

/// Weight rows handled together when decoding (one activation row).
const WEIGHT_ROWS: usize = 4;

/// How far ahead of the block being read to prefetch weights: the streams of several rows
/// are too much for the hardware prefetchers alone.
const PREFETCH_BYTES: usize = 2048;

/// Proof that this CPU runs AVX2, FMA and F16C: the kernels' entry points.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Avx2(());

impl Avx2 {
    pub(crate) fn detect() -> Option<Self> {
        let supported = is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c");
        supported.then_some(Self(()))
    }

    /// AVX2 version of [`super::activation::quantize_row`].
    pub(crate) fn quantize_row(self, x: &[f32], out: &mut [Q8Block], with_sum: bool) {
        // SAFETY: `self` exists only on CPUs with the features `quantize_row` needs.
        unsafe { quantize_row(x, out, with_sum) }
    }

    /// AVX2 version of [`super::portable::product_rows`].
    pub(crate) fn product_rows(
        self,
        format: WeightFormat,
        weights: &[u8],
        blocks: usize,
        acts: &[Q8Block],
        m: usize,
        out: &mut [f32],
    ) {
        // SAFETY: `self` exists only on CPUs with the features `rows` needs.
        unsafe {
            match format {
                WeightFormat::Q4_0 => rows::<Q4_0>(weights, blocks, acts, m, out),
                WeightFormat::Q4_1 => rows::<Q4_1>(weights, blocks, acts, m, out),
                WeightFormat::Q5_0 => rows::<Q5_0>(weights, blocks, acts, m, out),
                WeightFormat::Q5_1 => rows::<Q5_1>(weights, blocks, acts, m, out),
                WeightFormat::Q8_0 => rows::<Q8_0>(weights, blocks, acts, m, out),
                WeightFormat::Mxfp4 => rows::<MXFP4>(weights, blocks, acts, m, out),
            }
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_row(x: &[f32], out: &mut [Q8Block], with_sum: bool) {
    assert_eq!(x.len(), out.len() * BLOCK);
    for (values, block) in x.chunks_exact(BLOCK).zip(out.iter_mut()) {
        // SAFETY: `values` holds 32 f32s, read as four unaligned vectors of 8; `block.qs`
        // holds 32 bytes, written as one unaligned vector.
        unsafe {
            let p = values.as_ptr();
            let v = [0, 8, 16, 24].map(|i| _mm256_loadu_ps(p.add(i)));
            let sign = _mm256_set1_ps(-0.0);
            let mut max = _mm256_andnot_ps(sign, v[0]);
            for &v in &v[1..] {
                max = _mm256_max_ps(max, _mm256_andnot_ps(sign, v));
            }
            let max4 = _mm_max_ps(_mm256_extractf128_ps::<1>(max), _mm256_castps256_ps128(max));
            let max4 = _mm_max_ps(max4, _mm_movehl_ps(max4, max4));
            let max4 = _mm_max_ss(max4, _mm_movehdup_ps(max4));
            let (d, inverse) = scales(_mm_cvtss_f32(max4));

            let mul = _mm256_set1_ps(inverse);
            // Round half to even, as `_mm256_round_ps(_, _MM_ROUND_NEAREST)` in ggml.
            let q = v.map(|v| {
                _mm256_cvtps_epi32(_mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                    _mm256_mul_ps(v, mul),
                ))
            });
            if with_sum {
                let sum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
                block.s = round_to_f16(d * hsum_i32(sum) as f32);
            } else {
                block.s = 0.0;
            }
            block.d = round_to_f16(d);

            // Narrow to bytes; the packs work within 128-bit halves, so fix the order after.
            let packed = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
            let ordered = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256(block.qs.as_mut_ptr().cast(), ordered);
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn rows<const FORMAT: u8>(weights: &[u8], blocks: usize, acts: &[Q8Block], m: usize, out: &mut [f32]) {
    let row_bytes = blocks * block_bytes::<FORMAT>();
    assert!(acts.len() >= m * blocks && out.len() * row_bytes == weights.len() * m);
    let act = |i: usize| &acts[i * blocks..(i + 1) * blocks];
    // SAFETY (every call below): same features as this function; `dots` checks that the
    // rows and activation rows it gets are whole and of equal length.
    unsafe {
        if m == 1 {
            // Decoding: several weight rows at once share each activation block load, and
            // their accumulations (each a chain of dependent multiply-adds) overlap.
            let mut groups = weights.chunks_exact(WEIGHT_ROWS * row_bytes);
            let mut outs = out.chunks_exact_mut(WEIGHT_ROWS);
            for (group, out) in (&mut groups).zip(&mut outs) {
                // Spelled out: `array::from_fn` would call the closure out of line, without
                // this function's target features.
                let row = |r: usize| &group[r * row_bytes..(r + 1) * row_bytes];
                let rows = [row(0), row(1), row(2), row(3)];
                let dots = dots::<FORMAT, WEIGHT_ROWS, 1>(rows, [act(0)]);
                for (out, dots) in out.iter_mut().zip(dots) {
                    *out = dots[0];
                }
            }
            for (row, out) in groups.remainder().chunks_exact(row_bytes).zip(outs.into_remainder()) {
                *out = dots::<FORMAT, 1, 1>([row], [act(0)])[0][0];
            }
            return;
        }
        // Prefill: each unpacked weight block serves several activation rows.
        for (row, out) in weights.chunks_exact(row_bytes).zip(out.chunks_exact_mut(m)) {
            let mut i = 0;
            while m - i >= ACT_ROWS {
                let acts = [act(i), act(i + 1), act(i + 2), act(i + 3)];
                out[i..i + ACT_ROWS].copy_from_slice(&dots::<FORMAT, 1, ACT_ROWS>([row], acts)[0]);
                i += ACT_ROWS;
            }
            match m - i {
                3 => out[i..].copy_from_slice(&dots::<FORMAT, 1, 3>([row], [act(i), act(i + 1), act(i + 2)])[0]),
                2 => out[i..].copy_from_slice(&dots::<FORMAT, 1, 2>([row], [act(i), act(i + 1)])[0]),
                1 => out[i] = dots::<FORMAT, 1, 1>([row], [act(i)])[0][0],
                _ => {}
            }
        }
    }
}

pub(super) const fn block_bytes<const FORMAT: u8>() -> usize {
    match FORMAT {
        Q4_0 => WeightFormat::Q4_0.block_bytes(),
        Q4_1 => WeightFormat::Q4_1.block_bytes(),
        Q5_0 => WeightFormat::Q5_0.block_bytes(),
        Q5_1 => WeightFormat::Q5_1.block_bytes(),
        MXFP4 => WeightFormat::Mxfp4.block_bytes(),
        _ => WeightFormat::Q8_0.block_bytes(),
    }
}

/// `R` weight rows dotted with `N` activation rows: each weight block is unpacked once for
/// all `N`, and each activation block loaded once for all `R`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dots<const FORMAT: u8, const R: usize, const N: usize>(
    rows: [&[u8]; R],
    xs: [&[Q8Block]; N],
) -> [[f32; N]; R] {
    let bytes = block_bytes::<FORMAT>();
    let blocks = xs[0].len();
    assert!(rows.iter().all(|row| row.len() == blocks * bytes) && xs.iter().all(|x| x.len() == blocks));
    let mut acc = [[_mm256_setzero_ps(); N]; R];
    let mut offsets = [[0.0f32; N]; R];
    for b in 0..blocks {
        let mut weights = [_mm256_setzero_si256(); R];
        let mut scales = [0.0f32; R];
        let mut mins = [0.0f32; R];
        for r in 0..R {
            let block = &rows[r][b * bytes..(b + 1) * bytes];
            // SAFETY: `block` is one whole block of this format: the reads stay inside it.
            // The prefetch is a hint that never faults, wherever it points.
            unsafe {
                let p = block.as_ptr();
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH_BYTES).cast());
                // The f16 scale (and Q4_1's or Q5_1's f16 offset right after it), widened
                // exactly.
                let header = _mm_cvtph_ps(_mm_cvtsi32_si128(p.cast::<i32>().read_unaligned()));
                scales[r] = if FORMAT == MXFP4 { e8m0_half(*p) } else { _mm_cvtss_f32(header) };
                mins[r] = _mm_cvtss_f32(_mm_movehdup_ps(header));
                weights[r] = match FORMAT {
                    Q4_0 => _mm256_sub_epi8(nibbles(p.add(2)), _mm256_set1_epi8(8)),
                    Q4_1 => nibbles(p.add(4)),
                    // As ggml forms them: the fifth bit set gives the nibble, a clear one the
                    // nibble with its high bits set, i.e. minus 16 as a signed byte.
                    Q5_0 => _mm256_or_si256(nibbles(p.add(6)), _mm256_andnot_si256(bits(p.add(2)), _mm256_set1_epi8(-16))),
                    Q5_1 => _mm256_or_si256(nibbles(p.add(8)), _mm256_and_si256(bits(p.add(4)), _mm256_set1_epi8(16))),
                    // Each nibble looked up in the table of its values (in both halves).
                    MXFP4 => _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(mxfp4_table()), nibbles(p.add(1))),
                    _ => _mm256_loadu_si256(p.add(2).cast()),
                };
            }
        }
        for n in 0..N {
            let a = &xs[n][b];
            // SAFETY: `a.qs` holds 32 bytes.
            let q = unsafe { _mm256_loadu_si256(a.qs.as_ptr().cast()) };
            for r in 0..R {
                let products = match FORMAT {
                    // Q4_1's and Q5_1's quants are unsigned: no sign juggling needed.
                    Q4_1 | Q5_1 => sum_groups(weights[r], q),
                    _ => sum_groups(_mm256_sign_epi8(weights[r], weights[r]), _mm256_sign_epi8(q, weights[r])),
                };
                acc[r][n] = _mm256_fmadd_ps(_mm256_set1_ps(scales[r] * a.d), products, acc[r][n]);
                if FORMAT == Q4_1 || FORMAT == Q5_1 {
                    offsets[r][n] = add_offset(offsets[r][n], mins[r], a.s);
                }
            }
        }
    }
    let mut out = [[0.0f32; N]; R];
    for r in 0..R {
        for n in 0..N {
            let mut lanes = [0.0f32; 8];
            // SAFETY: `lanes` holds 8 f32s.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc[r][n]) };
            out[r][n] = sum_lanes(lanes) + offsets[r][n];
        }
    }
    out
}

/// MXFP4's values as the 16 bytes of a lookup table for `pshufb`.
#[inline]
#[target_feature(enable = "avx2")]
fn mxfp4_table() -> __m128i {
    // SAFETY: the table holds 16 bytes.
    unsafe { _mm_loadu_si128(MXFP4_VALUES.as_ptr().cast()) }
}

/// The 16 bytes at `p` split into 32 nibbles: low nibbles first, then high ones.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn nibbles(p: *const u8) -> __m256i {
    // SAFETY: the caller passes a pointer to 16 readable bytes.
    let low = unsafe { _mm_loadu_si128(p.cast()) };
    let both = _mm256_set_m128i(_mm_srli_epi16::<4>(low), low);
    _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
}

/// The 32 bits of the little-endian u32 at `p` as 32 bytes, 0xFF where the bit is set: byte
/// `j` for bit `j` (ggml's `bytes_from_bits_32`).
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn bits(p: *const u8) -> __m256i {
    // SAFETY: the caller passes a pointer to 4 readable bytes.
    let word = unsafe { p.cast::<i32>().read_unaligned() };
    // Byte j takes byte j / 8 of the word; OR-ing in all bits but bit j % 8 leaves 0xFF
    // exactly where that bit is set.
    let spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(word),
        _mm256_set_epi64x(0x0303_0303_0303_0303, 0x0202_0202_0202_0202, 0x0101_0101_0101_0101, 0),
    );
    let others = _mm256_or_si256(spread, _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe));
    _mm256_cmpeq_epi8(others, _mm256_set1_epi64x(-1))
}

/// Unsigned bytes times signed bytes, summed in groups of four consecutive products, as
/// f32 (exact: the sums are small integers).
#[inline]
#[target_feature(enable = "avx2")]
fn sum_groups(unsigned: __m256i, signed: __m256i) -> __m256 {
    // The pairwise i16 sums cannot saturate: |products| <= 128 * 127.
    let pairs = _mm256_maddubs_epi16(unsigned, signed);
    _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
}

#[inline]
#[target_feature(enable = "avx2")]
fn hsum_i32(v: __m256i) -> i32 {
    let sum = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let sum = _mm_add_epi32(sum, _mm_unpackhi_epi64(sum, sum));
    let sum = _mm_add_epi32(sum, _mm_shuffle_epi32::<0b10_11_00_01>(sum));
    _mm_cvtsi128_si32(sum)
}

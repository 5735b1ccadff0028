//! AVX-512 VNNI kernel for Q4_K over rows interleaved in fours (`interleave.rs`): the
//! arithmetic of `kquant_portable.rs`, bit for bit, four rows per instruction.
//!
//! Each 16-byte chunk of a group's quants holds the same bytes of all four rows, one row per
//! 128-bit lane. A chunk's low nibbles are 16 values of one sub-block and its high nibbles
//! 16 of the next, so `maddubs` with those activations (copied into every lane), then
//! `dpwssd` with each row's sub-block scale, leave in every lane the integer sums of four of
//! ggml's eight lanes: lanes 0-3 for the first 16 values of a sub-block, 4-7 for the last.
//! The float steps and the mins then run on the four rows at once, each lane on its own.

use std::arch::x86_64::*;

use super::format::MatrixFormat;
use super::interleave::{quants_offset, GROUP_ROWS};
use super::kquant_activation::Q8KBlock;
use super::kquant_format::KQuant;
use super::kquant_x86::Avx512Vnni;
use super::x86_interleaved::{act_rows, drive, GroupDots};

/// How far ahead of the block being read to prefetch weights.
const PREFETCH_BYTES: usize = 2048;

/// Bytes of one block of a group: four rows' blocks.
const GROUP_BLOCK: usize = GROUP_ROWS * KQuant::Q4_K.block_bytes();

/// Where a group's block has its packed scales (after the four scales and four mins) and
/// its quants.
const PACKED: usize = GROUP_ROWS * 4;
const QUANTS: usize = quants_offset(MatrixFormat::K(KQuant::Q4_K));

impl Avx512Vnni {
    /// [`super::kquant_portable::product_rows_k`] for a chunk of an interleaved Q4_K matrix:
    /// `rows` rows of `blocks` blocks, whole groups of four then a tail of fewer rows in row
    /// layout.
    ///
    /// # Panics
    /// If `kind` is not Q4_K, the only K-quant that is interleaved.
    #[allow(clippy::too_many_arguments)] // The slices and their shape, as every kernel here takes them.
    pub(crate) fn product_groups_k(
        self,
        kind: KQuant,
        weights: &[u8],
        rows: usize,
        blocks: usize,
        acts: &[Q8KBlock],
        m: usize,
        out: &mut [f32],
    ) {
        assert_eq!(kind, KQuant::Q4_K, "only Q4_K matrices are interleaved");
        let row_bytes = blocks * kind.block_bytes();
        assert!(weights.len() == rows * row_bytes && out.len() == rows * m && acts.len() >= m * blocks);
        let whole = rows / GROUP_ROWS * GROUP_ROWS;
        let (grouped, tail) = weights.split_at(whole * row_bytes);
        let (out, out_tail) = out.split_at_mut(whole * m);
        self.product_rows_k(kind, tail, blocks, acts, m, out_tail);
        // SAFETY: `self` exists only on CPUs with the features `drive` and `Q4KDots` need.
        unsafe { drive(&Q4KDots { acts, blocks }, grouped, blocks * GROUP_BLOCK, m, out) };
    }
}

/// [`GroupDots`] for Q4_K.
struct Q4KDots<'a> {
    acts: &'a [Q8KBlock],
    blocks: usize,
}

impl GroupDots for Q4KDots<'_> {
    fn act_row_bytes(&self) -> usize {
        self.blocks * size_of::<Q8KBlock>()
    }

    unsafe fn dots<const G: usize, const N: usize>(
        &self,
        groups: [&[u8]; G],
        first: usize,
    ) -> [[[f32; GROUP_ROWS]; N]; G] {
        // SAFETY: the caller vouches for the CPU.
        unsafe { dots::<G, N>(groups, act_rows(self.acts, self.blocks, first)) }
    }
}

/// `G` interleaved groups dotted with `N` activation rows: for each group and activation
/// row, the four rows' results.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn dots<const G: usize, const N: usize>(
    groups: [&[u8]; G],
    xs: [&[Q8KBlock]; N],
) -> [[[f32; GROUP_ROWS]; N]; G] {
    let blocks = xs[0].len();
    assert!(groups.iter().all(|group| group.len() == blocks * GROUP_BLOCK) && xs.iter().all(|x| x.len() == blocks));
    // Each of four factors to a whole 128-bit lane.
    let spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    // Each row's three words of packed scales to its own lane (the fourth word is unused).
    let to_lanes = _mm512_set_epi32(11, 11, 10, 9, 8, 8, 7, 6, 5, 5, 4, 3, 2, 2, 1, 0);
    let low4 = _mm512_set1_epi8(0x0F);
    // ggml's unpacking of the 6-bit scales and mins (`scales_then_mins`), in every lane: the
    // words (w0, w2, w1, w2 >> 4) masked to 6, 4, 6, 4 bits, topped up with the high two
    // bits of (-, w0, -, w1) in bits 4-5 of each byte.
    let shifts = _mm512_set_epi32(4, 0, 0, 0, 4, 0, 0, 0, 4, 0, 0, 0, 4, 0, 0, 0);
    let (l6, l4, l2) = (0x3f3f_3f3f, 0x0f0f_0f0f, 0x0303_0303);
    let low_masks = _mm512_set_epi32(l4, l6, l4, l6, l4, l6, l4, l6, l4, l6, l4, l6, l4, l6, l4, l6);
    let high_masks = _mm512_set_epi32(l2, 0, l2, 0, l2, 0, l2, 0, l2, 0, l2, 0, l2, 0, l2, 0);
    // Bytes 8-15 of a lane (the mins) as i16s.
    let mins_of = _mm512_broadcast_i32x4(_mm_setr_epi8(
        8, -128, 9, -128, 10, -128, 11, -128, 12, -128, 13, -128, 14, -128, 15, -128,
    ));

    let mut low = [[_mm512_setzero_ps(); N]; G];
    let mut high = [[_mm512_setzero_ps(); N]; G];
    let mut min_lanes = [[_mm512_setzero_ps(); N]; G];
    for b in 0..blocks {
        let mut d = [_mm512_setzero_ps(); G];
        let mut dmin = [_mm512_setzero_ps(); G];
        let mut unpacked = [_mm512_setzero_si512(); G];
        let blocks_of: [&[u8]; G] = std::array::from_fn(|g| &groups[g][b * GROUP_BLOCK..(b + 1) * GROUP_BLOCK]);
        for g in 0..G {
            // SAFETY: the block is one whole interleaved block: the reads stay inside it. The
            // prefetch is a hint that never faults, wherever it points.
            unsafe {
                let p = blocks_of[g].as_ptr();
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH_BYTES).cast());
                d[g] = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_cvtph_ps(_mm_loadl_epi64(p.cast()))));
                dmin[g] = _mm512_permutexvar_ps(
                    spread,
                    _mm512_castps128_ps512(_mm_cvtph_ps(_mm_loadl_epi64(p.add(8).cast()))),
                );
                let words = _mm512_permutexvar_epi32(to_lanes, _mm512_maskz_loadu_epi32(0x0FFF, p.add(PACKED).cast()));
                let kept = _mm512_and_si512(
                    _mm512_srlv_epi32(_mm512_shuffle_epi32::<0b10_01_10_00>(words), shifts),
                    low_masks,
                );
                let topped =
                    _mm512_and_si512(_mm512_srli_epi32::<6>(_mm512_shuffle_epi32::<0b01_01_00_00>(words)), high_masks);
                unpacked[g] = _mm512_or_si512(kept, _mm512_slli_epi32::<4>(topped));
            }
        }
        let mut sums_low = [[_mm512_setzero_si512(); N]; G];
        let mut sums_high = [[_mm512_setzero_si512(); N]; G];
        for j in 0..4 {
            // Chunk `2j` holds values 0-15 of sub-blocks 2j (low nibbles) and 2j + 1 (high
            // nibbles), for lanes 0-3; chunk `2j + 1` their values 16-31, for lanes 4-7.
            for g in 0..G {
                // SAFETY: both chunks' 64 bytes are inside the block.
                let (first, second) = unsafe {
                    let p = blocks_of[g].as_ptr().add(QUANTS + 128 * j);
                    (_mm512_loadu_si512(p.cast()), _mm512_loadu_si512(p.add(64).cast()))
                };
                let nibbles =
                    |raw: __m512i| [_mm512_and_si512(raw, low4), _mm512_and_si512(_mm512_srli_epi16::<4>(raw), low4)];
                let (first, second) = (nibbles(first), nibbles(second));
                let scales = [scale_of(unpacked[g], 2 * j), scale_of(unpacked[g], 2 * j + 1)];
                for n in 0..N {
                    for sub in 0..2 {
                        // SAFETY: `qs` holds 256 bytes; the 32 read start at most at 224.
                        let (a_first, a_second) = unsafe {
                            let q = xs[n][b].qs.as_ptr().add(64 * j + 32 * sub);
                            (
                                _mm512_broadcast_i32x4(_mm_loadu_si128(q.cast())),
                                _mm512_broadcast_i32x4(_mm_loadu_si128(q.add(16).cast())),
                            )
                        };
                        let low = _mm512_maddubs_epi16(first[sub], a_first);
                        let high = _mm512_maddubs_epi16(second[sub], a_second);
                        sums_low[g][n] = _mm512_dpwssd_epi32(sums_low[g][n], low, scales[sub]);
                        sums_high[g][n] = _mm512_dpwssd_epi32(sums_high[g][n], high, scales[sub]);
                    }
                }
            }
        }
        for n in 0..N {
            let a = &xs[n][b];
            // The sums of the activations of each sub-block, from the sums of each 16.
            // SAFETY: `bsums` holds 16 i16s.
            let sub_sums = unsafe {
                let p = a.bsums.as_ptr();
                _mm512_broadcast_i32x4(_mm_hadd_epi16(_mm_loadu_si128(p.cast()), _mm_loadu_si128(p.add(8).cast())))
            };
            for g in 0..G {
                let scale = _mm512_mul_ps(_mm512_set1_ps(a.d), d[g]);
                low[g][n] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(sums_low[g][n]), low[g][n]);
                high[g][n] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(sums_high[g][n]), high[g][n]);
                let mins = _mm512_madd_epi16(_mm512_shuffle_epi8(unpacked[g], mins_of), sub_sums);
                let dmin = _mm512_mul_ps(_mm512_set1_ps(-a.d), dmin[g]);
                min_lanes[g][n] = _mm512_fmadd_ps(dmin, _mm512_cvtepi32_ps(mins), min_lanes[g][n]);
            }
        }
    }
    let mut out = [[[0.0f32; GROUP_ROWS]; N]; G];
    for g in 0..G {
        for n in 0..N {
            // `sum_lanes` and `sum_min_lanes` in every 128-bit lane: (0 + 2) + (1 + 3), after
            // lanes 4-7 of a row are added to lanes 0-3.
            let mut sums = [0.0f32; 16];
            let mut mins = [0.0f32; 16];
            // SAFETY: both hold 16 f32s.
            unsafe {
                _mm512_storeu_ps(sums.as_mut_ptr(), pairwise(_mm512_add_ps(low[g][n], high[g][n])));
                _mm512_storeu_ps(mins.as_mut_ptr(), pairwise(min_lanes[g][n]));
            }
            for (k, out) in out[g][n].iter_mut().enumerate() {
                *out = sums[4 * k] + mins[4 * k];
            }
        }
    }
    out
}

/// Byte `s` of every 128-bit lane of `unpacked` (sub-block `s`'s scale) as eight i16s.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn scale_of(unpacked: __m512i, s: usize) -> __m512i {
    _mm512_shuffle_epi8(unpacked, _mm512_set1_epi16(s as i16 | i16::MIN))
}

/// `(v0 + v2) + (v1 + v3)` into element 0 of every 128-bit lane.
#[inline]
#[target_feature(enable = "avx512f")]
fn pairwise(v: __m512) -> __m512 {
    let t = _mm512_add_ps(v, _mm512_permute_ps::<0b01_00_11_10>(v));
    _mm512_add_ps(t, _mm512_permute_ps::<0b10_11_00_01>(t))
}

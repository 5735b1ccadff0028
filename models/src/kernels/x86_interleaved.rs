//! AVX-512 VNNI kernels for Q4_0, Q4_1 and Q8_0 over rows interleaved in fours
//! (`interleave.rs`): the arithmetic of `portable.rs`, bit for bit, four rows per instruction.
//!
//! A block's 32 quants split into two halves of 16 (Q4's low and high nibbles, Q8_0's first
//! and second 16 bytes). One 512-bit register holds a half of all four rows, one row per
//! 128-bit lane, so `dpbusd` against that half of the activation block, copied into every
//! lane, yields the sums of four consecutive products that ggml's `maddubs` and `madd`
//! yield: lanes 0-3 of each row in one register, lanes 4-7 in the other. Every lane is then
//! scaled and accumulated in f32 on its own, in block order, and the eight lanes of a row are
//! summed at the end in ggml's order, so the results equal the row-by-row kernels'.
//!
//! `dpbusd` multiplies unsigned bytes by signed ones. Q4_1's nibbles are unsigned already;
//! Q4_0's `nibble - 8` is taken as `nibble`, and Q8_0's `q` as `q + 128`, and the excess (8
//! or 128 times the group's sum of activations, worked out once per activation block by
//! [`group_biases`]) is where each integer sum starts.

use std::arch::x86_64::*;

use super::activation::Q8Block;
use super::format::{MatrixFormat, WeightFormat};
use super::interleave::{quants_offset, GROUP_ROWS};
use super::kquant_x86::Avx512Vnni;
use super::x86::{self, Q4_0, Q4_1, Q8_0};

/// Activation rows per pass over a group when prefilling: each unpacked weight block serves
/// them all, and their accumulators (two registers each) stay in registers.
const ACT_ROWS: usize = 4;

/// Groups per pass when decoding (one activation row): their multiply-add chains overlap.
const DECODE_GROUPS: usize = 2;

/// The activation rows of one prefill pass over a chunk's groups are kept to about this many
/// bytes, so that they stay in the L2 cache while every group of the chunk reads them.
const ACT_TILE_BYTES: usize = 512 * 1024;

/// How far ahead of the block being read to prefetch weights.
const PREFETCH_BYTES: usize = 2048;

/// The starting integer sums for an activation block: minus the excess that unsigned
/// weights add to each group of four products.
pub(crate) type GroupBiases = [i32; 8];

/// Fills `out` with the [`GroupBiases`] of every block of `acts` for weights of `format`
/// (nothing for Q4_1, whose weights need none).
pub(crate) fn group_biases(format: WeightFormat, acts: &[Q8Block], out: &mut Vec<GroupBiases>) {
    out.clear();
    let excess = match format {
        WeightFormat::Q4_0 => 8,
        WeightFormat::Q8_0 => 128,
        WeightFormat::Q4_1 => return,
        WeightFormat::Q5_0 | WeightFormat::Q5_1 | WeightFormat::Mxfp4 => panic!("{format:?} matrices are not interleaved"),
    };
    out.extend(acts.iter().map(|a| {
        let mut biases = [0; 8];
        for (bias, group) in biases.iter_mut().zip(a.qs.chunks_exact(4)) {
            *bias = -excess * group.iter().map(|&q| q as i32).sum::<i32>();
        }
        biases
    }));
}

impl Avx512Vnni {
    /// [`super::portable::product_rows`] for a chunk of an interleaved matrix: `rows` rows
    /// of `blocks` blocks, whole groups of four then a tail of fewer rows in row layout.
    /// `biases` holds the [`group_biases`] of `acts` for `format`.
    #[allow(clippy::too_many_arguments)] // The slices and their shape, as every kernel here takes them.
    pub(crate) fn product_groups(
        self,
        format: WeightFormat,
        weights: &[u8],
        rows: usize,
        blocks: usize,
        acts: &[Q8Block],
        biases: &[GroupBiases],
        m: usize,
        out: &mut [f32],
    ) {
        let shape = Shape { rows, blocks, m };
        // SAFETY: `self` exists only on CPUs with the features `groups` needs.
        unsafe {
            match format {
                WeightFormat::Q4_0 => groups::<Q4_0>(weights, shape, acts, biases, out),
                WeightFormat::Q4_1 => groups::<Q4_1>(weights, shape, acts, biases, out),
                WeightFormat::Q8_0 => groups::<Q8_0>(weights, shape, acts, biases, out),
                WeightFormat::Q5_0 | WeightFormat::Q5_1 | WeightFormat::Mxfp4 => panic!("{format:?} matrices are not interleaved"),
            }
        }
    }
}

#[derive(Clone, Copy)]
struct Shape {
    rows: usize,
    blocks: usize,
    m: usize,
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn groups<const FORMAT: u8>(
    weights: &[u8],
    Shape { rows, blocks, m }: Shape,
    acts: &[Q8Block],
    biases: &[GroupBiases],
    out: &mut [f32],
) {
    let row_bytes = blocks * x86::block_bytes::<FORMAT>();
    assert!(weights.len() == rows * row_bytes && out.len() == rows * m && acts.len() >= m * blocks);
    assert!(FORMAT == Q4_1 || biases.len() >= m * blocks, "activation biases missing");
    let whole = rows / GROUP_ROWS * GROUP_ROWS;
    let (grouped, tail) = weights.split_at(whole * row_bytes);
    let (out, out_tail) = out.split_at_mut(whole * m);
    // SAFETY: this function's features include those of the row layout's kernels, and of
    // `Block32Dots`'s.
    unsafe {
        x86::rows::<FORMAT>(tail, blocks, acts, m, out_tail);
        drive(&Block32Dots::<FORMAT> { acts, biases, blocks }, grouped, GROUP_ROWS * row_bytes, m, out);
    }
}

/// The dots of interleaved groups with activation rows, for one weight format: what
/// [`drive`] runs.
pub(super) trait GroupDots {
    /// Bytes of one activation row, to size the tiles that stay in cache.
    fn act_row_bytes(&self) -> usize;

    /// `G` groups dotted with the `N` activation rows from row `first` on: for each group
    /// and activation row, the four rows' results.
    ///
    /// # Safety
    /// The CPU runs AVX-512 (F, BW, VL) with VNNI, AVX2, FMA and F16C.
    unsafe fn dots<const G: usize, const N: usize>(
        &self,
        groups: [&[u8]; G],
        first: usize,
    ) -> [[[f32; GROUP_ROWS]; N]; G];
}

/// Runs `kernel` over the whole groups of `grouped` (each `group_bytes` long) and `m`
/// activation rows, into `out` (each row's `m` outputs in turn): two groups at a time when
/// decoding, so that their chains of multiply-adds overlap; when prefilling, a tile of
/// activation rows at a time, small enough to stay in the L2 cache while every group passes
/// over it, four rows at a time.
///
/// # Safety
/// As [`GroupDots::dots`].
pub(super) unsafe fn drive(kernel: &impl GroupDots, grouped: &[u8], group_bytes: usize, m: usize, out: &mut [f32]) {
    assert!(grouped.len().is_multiple_of(group_bytes) && out.len() == grouped.len() / group_bytes * GROUP_ROWS * m);
    // SAFETY (every call below): the caller vouches for the CPU; the kernels check that
    // the groups and activation rows they get are whole and of equal length.
    unsafe {
        if m == 1 {
            let mut pairs = grouped.chunks_exact(DECODE_GROUPS * group_bytes);
            let mut outs = out.chunks_exact_mut(DECODE_GROUPS * GROUP_ROWS);
            for (pair, out) in (&mut pairs).zip(&mut outs) {
                let (first, second) = pair.split_at(group_bytes);
                let dots = kernel.dots::<DECODE_GROUPS, 1>([first, second], 0);
                for (out, dots) in out.chunks_exact_mut(GROUP_ROWS).zip(dots) {
                    out.copy_from_slice(&dots[0]);
                }
            }
            let last = pairs.remainder().chunks_exact(group_bytes);
            for (group, out) in last.zip(outs.into_remainder().chunks_exact_mut(GROUP_ROWS)) {
                out.copy_from_slice(&kernel.dots::<1, 1>([group], 0)[0][0]);
            }
            return;
        }
        let tile = (ACT_TILE_BYTES / kernel.act_row_bytes()).max(ACT_ROWS) / ACT_ROWS * ACT_ROWS;
        for start in (0..m).step_by(tile) {
            let end = (start + tile).min(m);
            for (group, out) in grouped.chunks_exact(group_bytes).zip(out.chunks_exact_mut(GROUP_ROWS * m)) {
                // `out` holds the group's four rows of `m` outputs.
                let mut store = |i: usize, dots: &[[f32; GROUP_ROWS]]| {
                    for (n, dots) in dots.iter().enumerate() {
                        for (k, &dot) in dots.iter().enumerate() {
                            out[k * m + i + n] = dot;
                        }
                    }
                };
                let mut i = start;
                while end - i >= ACT_ROWS {
                    store(i, &kernel.dots::<1, ACT_ROWS>([group], i)[0]);
                    i += ACT_ROWS;
                }
                match end - i {
                    3 => store(i, &kernel.dots::<1, 3>([group], i)[0]),
                    2 => store(i, &kernel.dots::<1, 2>([group], i)[0]),
                    1 => store(i, &kernel.dots::<1, 1>([group], i)[0]),
                    _ => {}
                }
            }
        }
    }
}

/// Rows `first..first + N` of `acts`, rows of `blocks` blocks each.
pub(super) fn act_rows<T, const N: usize>(acts: &[T], blocks: usize, first: usize) -> [&[T]; N] {
    std::array::from_fn(|n| &acts[(first + n) * blocks..(first + n + 1) * blocks])
}

/// [`GroupDots`] for the 32-value formats.
struct Block32Dots<'a, const FORMAT: u8> {
    acts: &'a [Q8Block],
    biases: &'a [GroupBiases],
    blocks: usize,
}

impl<const FORMAT: u8> GroupDots for Block32Dots<'_, FORMAT> {
    fn act_row_bytes(&self) -> usize {
        self.blocks * size_of::<Q8Block>()
    }

    unsafe fn dots<const G: usize, const N: usize>(
        &self,
        groups: [&[u8]; G],
        first: usize,
    ) -> [[[f32; GROUP_ROWS]; N]; G] {
        let acts = act_rows(self.acts, self.blocks, first);
        // Q4_1 needs no biases.
        let biases = if FORMAT == Q4_1 { [&[][..]; N] } else { act_rows(self.biases, self.blocks, first) };
        // SAFETY: the caller vouches for the CPU.
        unsafe { dots::<FORMAT, G, N>(groups, acts, biases) }
    }
}

/// `G` interleaved groups dotted with `N` activation rows: for each group and activation
/// row, the four rows' results.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn dots<const FORMAT: u8, const G: usize, const N: usize>(
    groups: [&[u8]; G],
    xs: [&[Q8Block]; N],
    biases: [&[GroupBiases]; N],
) -> [[[f32; GROUP_ROWS]; N]; G] {
    let format = match FORMAT {
        Q4_0 => WeightFormat::Q4_0,
        Q4_1 => WeightFormat::Q4_1,
        _ => WeightFormat::Q8_0,
    };
    let bytes = GROUP_ROWS * format.block_bytes();
    let quants = quants_offset(MatrixFormat::Block32(format));
    let blocks = xs[0].len();
    assert!(groups.iter().all(|group| group.len() == blocks * bytes) && xs.iter().all(|x| x.len() == blocks));
    assert!(FORMAT == Q4_1 || biases.iter().all(|b| b.len() == blocks));
    // Each of four scales to a whole 128-bit lane.
    let spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    let low4 = _mm512_set1_epi8(0x0F);
    let mut low = [[_mm512_setzero_ps(); N]; G];
    let mut high = [[_mm512_setzero_ps(); N]; G];
    let mut offsets = [[_mm_setzero_ps(); N]; G];
    for b in 0..blocks {
        let mut halves = [(_mm512_setzero_si512(), _mm512_setzero_si512()); G];
        let mut scales = [_mm512_setzero_ps(); G];
        let mut mins = [_mm_setzero_ps(); G];
        for g in 0..G {
            let block = &groups[g][b * bytes..(b + 1) * bytes];
            // SAFETY: `block` is one whole interleaved block: the reads stay inside it. The
            // prefetch is a hint that never faults, wherever it points.
            unsafe {
                let p = block.as_ptr();
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH_BYTES).cast());
                let d = _mm_cvtph_ps(_mm_loadl_epi64(p.cast()));
                scales[g] = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(d));
                if FORMAT == Q4_1 {
                    mins[g] = _mm_cvtph_ps(_mm_loadl_epi64(p.add(8).cast()));
                }
                halves[g] = if FORMAT == Q8_0 {
                    let flip = _mm512_set1_epi8(-128);
                    (
                        _mm512_xor_si512(_mm512_loadu_si512(p.add(quants).cast()), flip),
                        _mm512_xor_si512(_mm512_loadu_si512(p.add(quants + 64).cast()), flip),
                    )
                } else {
                    let raw = _mm512_loadu_si512(p.add(quants).cast());
                    (_mm512_and_si512(raw, low4), _mm512_and_si512(_mm512_srli_epi16::<4>(raw), low4))
                };
            }
        }
        for n in 0..N {
            let a = &xs[n][b];
            // SAFETY: `qs` holds 32 bytes and a bias block 8 i32s: the loads read within them.
            let (a_low, a_high, bias_low, bias_high) = unsafe {
                let q = a.qs.as_ptr();
                let (bias_low, bias_high) = if FORMAT == Q4_1 {
                    (_mm512_setzero_si512(), _mm512_setzero_si512())
                } else {
                    let bias = biases[n][b].as_ptr();
                    (
                        _mm512_broadcast_i32x4(_mm_loadu_si128(bias.cast())),
                        _mm512_broadcast_i32x4(_mm_loadu_si128(bias.add(4).cast())),
                    )
                };
                (
                    _mm512_broadcast_i32x4(_mm_loadu_si128(q.cast())),
                    _mm512_broadcast_i32x4(_mm_loadu_si128(q.add(16).cast())),
                    bias_low,
                    bias_high,
                )
            };
            let d = _mm512_set1_ps(a.d);
            for g in 0..G {
                let scale = _mm512_mul_ps(scales[g], d);
                let sums_low = _mm512_dpbusd_epi32(bias_low, halves[g].0, a_low);
                let sums_high = _mm512_dpbusd_epi32(bias_high, halves[g].1, a_high);
                low[g][n] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(sums_low), low[g][n]);
                high[g][n] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(sums_high), high[g][n]);
                if FORMAT == Q4_1 {
                    // `m * s` is exact in f32, so one rounding, as `add_offset`'s.
                    offsets[g][n] = _mm_fmadd_ps(mins[g], _mm_set1_ps(a.s), offsets[g][n]);
                }
            }
        }
    }
    let mut out = [[[0.0f32; GROUP_ROWS]; N]; G];
    for g in 0..G {
        for n in 0..N {
            // `sum_lanes` in every 128-bit lane: lanes 0-3 of a row plus lanes 4-7, then
            // (0 + 2) + (1 + 3).
            let h = _mm512_add_ps(low[g][n], high[g][n]);
            let t = _mm512_add_ps(h, _mm512_permute_ps::<0b01_00_11_10>(h));
            let sums = _mm512_add_ps(t, _mm512_permute_ps::<0b10_11_00_01>(t));
            let mut lanes = [0.0f32; 16];
            let mut row_offsets = [0.0f32; GROUP_ROWS];
            // SAFETY: `lanes` holds 16 f32s, `row_offsets` 4.
            unsafe {
                _mm512_storeu_ps(lanes.as_mut_ptr(), sums);
                _mm_storeu_ps(row_offsets.as_mut_ptr(), offsets[g][n]);
            }
            for (k, out) in out[g][n].iter_mut().enumerate() {
                *out = lanes[4 * k] + row_offsets[k];
            }
        }
    }
    out
}

//! Rows interleaved in groups of four: the layout the AVX-512 kernels for Q4_0, Q4_1, Q8_0
//! (`x86_interleaved.rs`) and Q4_K (`kquant_x86_interleaved.rs`) read.
//!
//! Within a group, block by block, the four rows' f16 factors sit side by side (the four
//! scales, then Q4_1's four offsets or Q4_K's four mins), then Q4_K's packed sub-block
//! scales row after row, then the quants in chunks of 16 bytes: chunk `c` of rows 0 to 3,
//! then chunk `c + 1` of rows 0 to 3. So one 64-byte load holds the same 16 quants of all
//! four rows.
//! A group takes exactly the bytes its four rows took, so whole groups stay where their rows
//! were (a range of rows that starts and ends on a group boundary has the same bytes), and
//! a tail of fewer than four rows is left as it is.

use super::format::{MatrixFormat, WeightFormat};
use super::kquant_format::{KQuant, Q4_K_QS};

/// Rows per interleaved group.
pub(crate) const GROUP_ROWS: usize = 4;

/// Bytes the kernels load at once: the same 16 quants of each row of a group.
const CHUNK: usize = 16;

/// Whether matrices of `format` can be interleaved. (Q5_0, Q5_1 and the other K-quants are
/// not, so far: they run their row kernels in every layout.)
pub(crate) fn interleaves(format: MatrixFormat) -> bool {
    matches!(
        format,
        MatrixFormat::Block32(WeightFormat::Q4_0 | WeightFormat::Q4_1 | WeightFormat::Q8_0)
            | MatrixFormat::K(KQuant::Q4_K)
    )
}

/// Rearranges `data`, `rows` rows of `blocks` blocks of `format`, into groups of four rows.
///
/// # Panics
/// If `format` is not one that [`interleaves`].
pub(crate) fn interleave(format: MatrixFormat, data: &mut [u8], rows: usize, blocks: usize) {
    assert!(interleaves(format), "{format:?} matrices are not interleaved");
    let row_bytes = blocks * format.block_bytes();
    assert_eq!(data.len(), rows * row_bytes, "a matrix of the wrong size");
    let mut rows_of_group = vec![0u8; GROUP_ROWS * row_bytes];
    for group in data.chunks_exact_mut(GROUP_ROWS * row_bytes) {
        rows_of_group.copy_from_slice(group);
        let block_bytes = format.block_bytes();
        for (b, out) in group.chunks_exact_mut(GROUP_ROWS * block_bytes).enumerate() {
            for (k, row) in rows_of_group.chunks_exact(row_bytes).enumerate() {
                for_each_piece(format, k, |from, to, len| {
                    out[to..to + len].copy_from_slice(&row[b * block_bytes + from..][..len]);
                });
            }
        }
    }
}

/// Copies block `b` of row `k` of an interleaved `group` back into `out` as the file
/// stored it.
pub(crate) fn block_of(format: MatrixFormat, group: &[u8], k: usize, b: usize, out: &mut [u8]) {
    let block_bytes = format.block_bytes();
    let interleaved = &group[b * GROUP_ROWS * block_bytes..(b + 1) * GROUP_ROWS * block_bytes];
    for_each_piece(format, k, |from, to, len| out[from..from + len].copy_from_slice(&interleaved[to..to + len]));
}

/// Calls `copy(offset in the block, offset in the group's block, length)` for each piece of
/// row `k`'s block: its f16 factors, its packed scales, then its chunks of quants.
fn for_each_piece(format: MatrixFormat, k: usize, mut copy: impl FnMut(usize, usize, usize)) {
    let (factors, packed) = header(format);
    for field in (0..factors).step_by(2) {
        copy(field, (field / 2 * GROUP_ROWS + k) * 2, 2);
    }
    if packed > 0 {
        copy(factors, GROUP_ROWS * factors + k * packed, packed);
    }
    let quants = factors + packed;
    for chunk in (0..format.block_bytes() - quants).step_by(CHUNK) {
        copy(quants + chunk, GROUP_ROWS * quants + (chunk / CHUNK * GROUP_ROWS + k) * CHUNK, CHUNK);
    }
}

/// The bytes before a block's quants: its f16 factors (scale, and Q4_1's offset or Q4_K's
/// min), and its packed sub-block scales (Q4_K's 12 bytes).
const fn header(format: MatrixFormat) -> (usize, usize) {
    match format {
        MatrixFormat::Block32(WeightFormat::Q4_1) => (4, 0),
        MatrixFormat::Block32(_) => (2, 0),
        MatrixFormat::K(_) => (4, Q4_K_QS - 4),
        MatrixFormat::Bf16 => panic!("BF16 matrices are not interleaved"),
    }
}

/// Where a group's block of `format` has its quants: after the headers of all four rows.
pub(crate) const fn quants_offset(format: MatrixFormat) -> usize {
    let (factors, packed) = header(format);
    GROUP_ROWS * (factors + packed)
}

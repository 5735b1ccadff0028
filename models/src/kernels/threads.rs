//! Splitting a product's output rows across threads.
//!
//! Work goes to rayon's global pool, which candle's own CPU operations use too, so the
//! kernels add no threads of their own and never compete with candle's for cores. Rayon's
//! work stealing also makes a late-waking worker harmless: the calling thread runs every
//! chunk nobody has taken yet.
//!
//! Each output value is computed by one call on one thread, in an order that does not
//! depend on the split, so results are the same for any number of threads.

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};

use rayon::prelude::*;

/// 0 until first asked for: then the number of threads products use.
static THREADS: AtomicUsize = AtomicUsize::new(0);

/// Below this many block products (about 10 µs of work), a chunk is not worth a thread.
const MIN_BLOCKS_PER_CHUNK: usize = 4096;

/// Chunks per thread: more than one evens out threads that the OS delays.
const CHUNKS_PER_THREAD: usize = 4;

/// Threads for products: candle's count (`RAYON_NUM_THREADS`, else the physical cores),
/// read once, as reading it takes the environment's lock.
pub(crate) fn num_threads() -> usize {
    match THREADS.load(Ordering::Relaxed) {
        0 => {
            let threads = candle_core::utils::get_num_threads().max(1);
            THREADS.store(threads, Ordering::Relaxed);
            threads
        }
        threads => threads,
    }
}

/// Calls `f(rows, part)` for disjoint ranges of rows covering `0..out.len() / per_row`,
/// where `part` is the slice of `out` holding those rows (`per_row` values each), spread
/// over up to `threads` threads. `blocks_per_row` sizes a row's work.
pub(crate) fn for_row_ranges<F>(out: &mut [f32], per_row: usize, blocks_per_row: usize, threads: usize, f: F)
where
    F: Fn(Range<usize>, &mut [f32]) + Sync,
{
    let rows = out.len() / per_row;
    let work = rows * blocks_per_row;
    let threads = threads.min(work / MIN_BLOCKS_PER_CHUNK).max(1);
    if threads == 1 {
        f(0..rows, out);
        return;
    }
    let chunks = (threads * CHUNKS_PER_THREAD).min(work / MIN_BLOCKS_PER_CHUNK).max(threads);
    let chunk_rows = rows.div_ceil(chunks);
    out.par_chunks_mut(chunk_rows * per_row).enumerate().for_each(|(c, part)| {
        let start = c * chunk_rows;
        f(start..start + part.len() / per_row, part)
    });
}

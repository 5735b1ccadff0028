//! One matrix product as a job for the thread pool: chunks of weight rows, each chunk
//! writing its outputs into a shared vector of atomics (plain stores on any hardware that
//! runs these kernels), copied into the caller's buffer afterwards.
//!
//! A thread keeps its last job to reuse its buffers, so a product into a caller's buffer
//! allocates nothing.

use std::cell::{Cell, RefCell};
use std::ops::Range;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use super::activation::Q8Block;
use super::format::{ActivationFormat, BLOCK};
use super::threads::{self, Chunks, Job};
use super::{Isa, QuantMatrix};

/// Below this many block products (about 5 µs of work), a chunk is not worth a thread.
const MIN_BLOCKS_PER_CHUNK: usize = 4096;

/// Chunks per thread: more than one lets threads that start late, or that the OS delays,
/// take less of the work.
const CHUNKS_PER_THREAD: usize = 4;

/// `matrix` times the `m` rows of `x`, on up to `threads` threads with the kernels of `isa`:
/// `m` rows of outputs.
pub(super) fn multiply(matrix: &QuantMatrix, x: &[f32], m: usize, threads: usize, isa: Isa) -> Vec<f32> {
    let mut out = vec![0.0; m * matrix.rows];
    multiply_into(matrix, x, m, threads, isa, &mut out);
    out
}

/// [`multiply`] into `out` (`m` rows of `matrix.rows` values), allocating nothing once this
/// thread's buffers have grown to the size of the product.
pub(super) fn multiply_into(matrix: &QuantMatrix, x: &[f32], m: usize, threads: usize, isa: Isa, out: &mut [f32]) {
    assert_eq!(out.len(), m * matrix.rows, "output of the wrong size");
    if m == 0 || matrix.rows == 0 {
        return;
    }
    let blocks = matrix.cols / BLOCK;
    let work = matrix.rows * blocks * m;
    let threads = threads.min(work / MIN_BLOCKS_PER_CHUNK).max(1);
    let chunks = if threads == 1 { 1 } else { (threads * CHUNKS_PER_THREAD).min(work / MIN_BLOCKS_PER_CHUNK) };
    let chunk_rows = matrix.rows.div_ceil(chunks);

    // Kept only when no worker held it, and workers get jobs only while they are offered,
    // so the kept job is this thread's alone; a new one otherwise.
    let mut product = LAST.with(Cell::take).filter(|p| Arc::strong_count(p) == 1).unwrap_or_default();
    Arc::get_mut(&mut product).expect("an unshared job").prepare(isa, matrix, x, m, chunk_rows);
    let job: Arc<dyn Job> = product.clone();
    threads::run(&job, threads);
    drop(job);
    for (out, v) in out.iter_mut().zip(&product.out) {
        *out = f32::from_bits(v.load(Ordering::Relaxed));
    }
    // A worker that came too late to help may still hold the job for a moment: then it
    // is left to it, and the next product starts a new one.
    if let Some(state) = Arc::get_mut(&mut product) {
        state.finish();
        LAST.with(|last| last.set(Some(product)));
    }
}

/// Buffers larger than this many values are not kept between products: one long prompt
/// should not pin its buffers for the life of the thread.
const KEEP_VALUES: usize = 1 << 18;

thread_local! {
    /// The last product this thread started, kept for its buffers.
    static LAST: Cell<Option<Arc<Product>>> = const { Cell::new(None) };
    /// A chunk's results before they are spread into the output.
    static CHUNK_OUT: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

#[derive(Default)]
struct Product {
    /// `None` between products, so a kept job does not keep weights alive.
    matrix: Option<QuantMatrix>,
    isa: Option<Isa>,
    acts: Vec<Q8Block>,
    m: usize,
    chunk_rows: usize,
    chunks: Chunks,
    /// `m` rows of `matrix.rows` outputs, as f32 bits.
    out: Vec<AtomicU32>,
}

impl Product {
    fn prepare(&mut self, isa: Isa, matrix: &QuantMatrix, x: &[f32], m: usize, chunk_rows: usize) {
        let blocks = matrix.cols / BLOCK;
        let with_sum = matrix.format.activation() == ActivationFormat::Q8_1;
        self.acts.clear();
        self.acts.resize(m * blocks, Q8Block::ZERO);
        for (x, acts) in x.chunks_exact(matrix.cols).zip(self.acts.chunks_exact_mut(blocks)) {
            isa.quantize_row(x, acts, with_sum);
        }
        // Every value is overwritten: no need to clear.
        self.out.resize_with(m * matrix.rows, || AtomicU32::new(0));
        self.chunks = Chunks::new(matrix.rows.div_ceil(chunk_rows));
        self.matrix = Some(matrix.clone());
        self.isa = Some(isa);
        self.m = m;
        self.chunk_rows = chunk_rows;
    }

    /// Lets go of the weights, and of buffers too large to keep.
    fn finish(&mut self) {
        self.matrix = None;
        if self.out.capacity() > KEEP_VALUES {
            self.out = Vec::new();
        }
        if self.acts.capacity() * BLOCK > KEEP_VALUES {
            self.acts = Vec::new();
        }
    }

    fn rows_of(&self, chunk: usize, rows: usize) -> Range<usize> {
        let start = chunk * self.chunk_rows;
        start..(start + self.chunk_rows).min(rows)
    }
}

impl Job for Product {
    fn chunks(&self) -> &Chunks {
        &self.chunks
    }

    fn run_chunk(&self, chunk: usize) {
        let (Some(matrix), Some(isa)) = (&self.matrix, self.isa) else { return };
        let rows = self.rows_of(chunk, matrix.rows);
        let m = self.m;
        CHUNK_OUT.with_borrow_mut(|results| {
            // The kernels write each weight row's outputs for all activation rows together.
            results.clear();
            results.resize(rows.len() * m, 0.0);
            let weights = matrix.row_bytes(rows.clone());
            isa.product_rows(matrix.format, weights, matrix.cols / BLOCK, &self.acts, m, results);
            // Written one output row at a time, so that the stores are contiguous.
            for i in 0..m {
                let out = &self.out[i * matrix.rows + rows.start..i * matrix.rows + rows.end];
                for (out, v) in out.iter().zip(results[i..].iter().step_by(m)) {
                    out.store(v.to_bits(), Ordering::Relaxed);
                }
            }
        });
    }
}

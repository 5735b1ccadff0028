//! One matrix product as a job for the thread pool: chunks of weight rows, each chunk
//! writing its outputs into a shared vector of atomics (plain stores on any hardware that
//! runs these kernels), copied into the caller's buffer afterwards.
//!
//! A thread keeps its jobs to reuse their buffers, so a product into a caller's buffer
//! allocates nothing.

use std::cell::RefCell;
use std::ops::Range;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use super::activation::Q8Block;
use super::bf16;
use super::format::{ActivationFormat, MatrixFormat, BLOCK};
use super::interleave::GROUP_ROWS;
use super::kquant_activation::{quantize_row_k, Q8KBlock};
use super::kquant_format::QK_K;
use super::threads::{self, Chunks, Job};
#[cfg(target_arch = "x86_64")]
use super::x86_interleaved::{group_biases, GroupBiases};
use super::{Isa, Layout, QuantMatrix};

/// Below this many products of 32 values (about 5 µs of work), a chunk is not worth a
/// thread. (A K-quant block counts as eight: its cost per value is about the same.)
const MIN_BLOCKS_PER_CHUNK: usize = 4096;

/// Weight rows per tile when a chunk's results are transposed into the output.
const TILE_ROWS: usize = 32;

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
    let work = matrix.rows * (matrix.cols / BLOCK) * m;
    let threads = threads.min(work / MIN_BLOCKS_PER_CHUNK).max(1);
    let chunks = if threads == 1 { 1 } else { (threads * CHUNKS_PER_THREAD).min(work / MIN_BLOCKS_PER_CHUNK) };
    // Whole groups of rows, for interleaved layouts.
    let chunk_rows = matrix.rows.div_ceil(chunks).next_multiple_of(GROUP_ROWS);

    // Workers get jobs only while they are offered, so a kept job no worker holds any more
    // is this thread's alone.
    let mut product = SPARE
        .with_borrow_mut(|spare| spare.iter().position(|p| Arc::strong_count(p) == 1).map(|i| spare.swap_remove(i)))
        .unwrap_or_default();
    Arc::get_mut(&mut product).expect("an unshared job").prepare(isa, matrix, x, m, chunk_rows);
    let job: Arc<dyn Job> = product.clone();
    threads::run(&job, threads);
    drop(job);
    match Arc::get_mut(&mut product) {
        // The job is this thread's alone again: plain reads, which vectorize.
        Some(state) => {
            for (out, v) in out.iter_mut().zip(state.out.iter_mut()) {
                *out = f32::from_bits(*v.get_mut());
            }
        }
        // A worker that came too late to help still holds the job for a moment (and will
        // find nothing left to do): kept all the same, for when it lets go.
        None => {
            for (out, v) in out.iter_mut().zip(&product.out) {
                *out = f32::from_bits(v.load(Ordering::Relaxed));
            }
        }
    }
    // A kept job does not keep the weights alive.
    *product.matrix.lock().unwrap_or_else(PoisonError::into_inner) = None;
    SPARE.with_borrow_mut(|spare| {
        if spare.len() < SPARES {
            spare.push(product);
        }
    });
}

/// Jobs a thread keeps for their buffers: more than one, so that a worker still holding
/// the last one does not make the next product start afresh.
const SPARES: usize = 4;

/// Buffers of more than this many values are let go by [`release_large_buffers`].
const KEEP_VALUES: usize = 1 << 16;

/// Lets go of this thread's buffers for products if they are large: they grow to the
/// largest product the thread ran, and a long prompt should not pin its buffers for the
/// life of the thread.
pub(crate) fn release_large_buffers() {
    SPARE.with_borrow_mut(|spare| {
        spare.retain(|p| {
            p.out.capacity() <= KEEP_VALUES
                && p.acts.capacity() * BLOCK <= KEEP_VALUES
                && p.acts_k.capacity() * QK_K <= KEEP_VALUES
                && p.acts_bf16.capacity() <= 2 * KEEP_VALUES
                && p.bias_values() <= KEEP_VALUES
        })
    });
    CHUNK_OUT.with_borrow_mut(|results| {
        if results.capacity() > KEEP_VALUES {
            *results = Vec::new();
        }
    });
}

thread_local! {
    /// Products this thread ran, kept for their buffers.
    static SPARE: RefCell<Vec<Arc<Product>>> = const { RefCell::new(Vec::new()) };
    /// A chunk's results before they are spread into the output.
    static CHUNK_OUT: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

#[derive(Default)]
struct Product {
    /// `None` between products, so a kept job does not keep weights alive (behind a lock
    /// only so that a job a worker still holds can let go of them too).
    matrix: Mutex<Option<QuantMatrix>>,
    isa: Option<Isa>,
    /// The quantized activations: `acts` for 32-value formats, `acts_k` for K-quants.
    acts: Vec<Q8Block>,
    acts_k: Vec<Q8KBlock>,
    /// BF16 matrices' activations, rounded to BF16.
    acts_bf16: Vec<u16>,
    /// For interleaved Q4_0 and Q8_0 matrices, the integer sums `acts` start from.
    #[cfg(target_arch = "x86_64")]
    biases: Vec<GroupBiases>,
    m: usize,
    chunk_rows: usize,
    chunks: Chunks,
    /// `m` rows of `matrix.rows` outputs, as f32 bits.
    out: Vec<AtomicU32>,
}

impl Product {
    fn prepare(&mut self, isa: Isa, matrix: &QuantMatrix, x: &[f32], m: usize, chunk_rows: usize) {
        let blocks = matrix.cols / matrix.format.block_values();
        match matrix.format {
            MatrixFormat::Block32(format) => {
                let with_sum = format.activation() == ActivationFormat::Q8_1;
                self.acts.clear();
                self.acts.resize(m * blocks, Q8Block::ZERO);
                for (x, acts) in x.chunks_exact(matrix.cols).zip(self.acts.chunks_exact_mut(blocks)) {
                    isa.quantize_row(x, acts, with_sum);
                }
                #[cfg(target_arch = "x86_64")]
                if let Layout::Interleaved(_) = matrix.layout {
                    group_biases(format, &self.acts, &mut self.biases);
                }
            }
            MatrixFormat::K(_) => {
                self.acts_k.clear();
                self.acts_k.resize(m * blocks, Q8KBlock::ZERO);
                for (x, acts) in x.chunks_exact(matrix.cols).zip(self.acts_k.chunks_exact_mut(blocks)) {
                    quantize_row_k(x, acts);
                }
            }
            MatrixFormat::Bf16 => {
                self.acts_bf16.clear();
                self.acts_bf16.resize(m * matrix.cols, 0);
                bf16::convert_row(x, &mut self.acts_bf16);
            }
        }
        // Every value is overwritten: no need to clear.
        self.out.resize_with(m * matrix.rows, || AtomicU32::new(0));
        self.chunks = Chunks::new(matrix.rows.div_ceil(chunk_rows));
        *self.matrix.get_mut().unwrap_or_else(PoisonError::into_inner) = Some(matrix.clone());
        self.isa = Some(isa);
        self.m = m;
        self.chunk_rows = chunk_rows;
    }

    /// Values held for the biases of interleaved products.
    fn bias_values(&self) -> usize {
        #[cfg(target_arch = "x86_64")]
        return self.biases.capacity() * size_of::<GroupBiases>() / size_of::<i32>();
        #[cfg(not(target_arch = "x86_64"))]
        0
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
        let matrix = self.matrix.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let (Some(matrix), Some(isa)) = (matrix, self.isa) else { return };
        let rows = self.rows_of(chunk, matrix.rows);
        let m = self.m;
        CHUNK_OUT.with_borrow_mut(|results| {
            // The kernels write each weight row's outputs for all activation rows together.
            results.clear();
            results.resize(rows.len() * m, 0.0);
            let weights = matrix.row_bytes(rows.clone());
            let blocks = matrix.cols / matrix.format.block_values();
            match matrix.format {
                MatrixFormat::Block32(format) => match matrix.layout {
                    Layout::Rows => isa.product_rows(format, weights, blocks, &self.acts, m, results),
                    #[cfg(target_arch = "x86_64")]
                    Layout::Interleaved(vnni) => {
                        vnni.product_groups(format, weights, rows.len(), blocks, &self.acts, &self.biases, m, results)
                    }
                },
                MatrixFormat::K(kind) => match matrix.layout {
                    Layout::Rows => isa.product_rows_k(kind, weights, blocks, &self.acts_k, m, results),
                    #[cfg(target_arch = "x86_64")]
                    Layout::Interleaved(vnni) => {
                        vnni.product_groups_k(kind, weights, rows.len(), blocks, &self.acts_k, m, results)
                    }
                },
                MatrixFormat::Bf16 => isa.product_rows_bf16(weights, matrix.cols, &self.acts_bf16, m, results),
            }
            // Transposed into the output in tiles of weight rows, so that both the reads
            // and the writes stay within a few cache lines.
            for tile in (0..rows.len()).step_by(TILE_ROWS) {
                let tile = tile..(tile + TILE_ROWS).min(rows.len());
                for i in 0..m {
                    let start = i * matrix.rows + rows.start;
                    let out = &self.out[start + tile.start..start + tile.end];
                    for (out, v) in out.iter().zip(results[tile.start * m + i..].iter().step_by(m)) {
                        out.store(v.to_bits(), Ordering::Relaxed);
                    }
                }
            }
        });
    }
}

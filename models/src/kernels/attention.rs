//! Attention over an f16 KV cache, summed in llama.cpp's order.
//!
//! llama.cpp (without flash attention, its default) keeps K and V in f16 and computes
//! `softmax(scale * K q) V` as two f16 matrix products around a softmax: queries and
//! probabilities are rounded to f16 first, so every product of two terms is exact in f32
//! and only the order of the additions decides the result. That order depends on the batch:
//!
//! - a batch of two or more positions goes through llamafile's tinyBLAS (`sgemm.cpp`,
//!   16-lane AVX-512 vectors): term `i` of a sum goes to lane `i % 16`, each lane adds its
//!   terms in order, and `_mm512_reduce_add_ps` sums the lanes ([`Sum::Lanes16`]). tinyBLAS
//!   takes `K q` only when the head size is a multiple of 16, and `V p` only when it is a
//!   multiple of 4; ggml's own product (next) takes the rest;
//! - a single position goes through `ggml_vec_dot_f16`: four 16-lane accumulators take
//!   the terms below `n & !63` (term `i` to lane `i % 64`), are summed as `(a0 + a2) +
//!   (a1 + a3)` and then across lanes, and the rest of the terms are added one by one in
//!   f64 ([`Sum::VecDot`]).
//!
//! For the products with V, `n` is the cache's length as llama.cpp pads it, to a multiple
//! of 32, beyond which the probabilities are zeros. Zeros change no sum, so only the
//! positions a query sees are added here, but which of them fall in the f64 part depends
//! on the padded length.
//!
//! A sliding layer's cache ([`KvCache::sliding`]) lets each query see only the last
//! `window` positions, as llama.cpp's mask does (`p - k >= window` is masked): positions
//! before them give exact zeros in llama.cpp's sums, so they are left out here, but the
//! sums start at a multiple of 64 positions and are counted from there, which keeps every
//! term in the lane llama.cpp's order gives it. The cache forgets the rows no query will
//! see again ([`KvCache::forget_unseen`]), so it holds about twice the window, not the
//! context.
//!
//! Query heads share KV heads as ggml broadcasts them (head `h` reads KV head
//! `h / (heads / kv_heads)`). Each query row and head is computed on its own, so splitting
//! the work over threads ([`attend_parallel`]) or rows changes nothing. The plain Rust
//! ([`scores_portable`], [`weighted_values_portable`]) is the reference; `ops_x86.rs` has
//! the same in AVX2.

use std::cell::RefCell;
use std::ops::Range;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use half::f16;

use super::ops::{reduce16, round_f16};
use super::threads::{Chunks, Job};
use super::Isa;

/// llama.cpp pads the KV cache it attends over to a multiple of this (without flash attention).
const KV_PAD: usize = 32;

/// The number of heads and their size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Heads {
    pub(crate) heads: usize,
    pub(crate) kv_heads: usize,
    /// The width of a query and key head.
    pub(crate) head_dim: usize,
    /// The width of a value head: `head_dim`, but for latent attention, where values are
    /// the first `value_dim` values of each key.
    pub(crate) value_dim: usize,
}

impl Heads {
    pub(crate) fn new(heads: usize, kv_heads: usize, head_dim: usize) -> Self {
        Self { heads, kv_heads, head_dim, value_dim: head_dim }
    }

    pub(crate) fn q_width(&self) -> usize {
        self.heads * self.head_dim
    }

    pub(crate) fn kv_width(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// The width of one position's attention output.
    pub(crate) fn out_width(&self) -> usize {
        self.heads * self.value_dim
    }

    /// The KV head query head `h` reads (ggml broadcasts K and V over consecutive heads).
    fn kv_head(&self, h: usize) -> usize {
        h / (self.heads / self.kv_heads)
    }
}

/// How a sum of products is added up (see the module's documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sum {
    Lanes16,
    /// `ggml_vec_dot_f16` over `n` terms.
    VecDot { n: usize },
}

impl Sum {
    /// The order of `K q` for a batch of `batch` positions.
    pub(crate) fn scores(heads: &Heads, batch: usize) -> Self {
        // tinyBLAS takes the product when its inner dimension is a multiple of 16.
        if batch >= 2 && heads.head_dim.is_multiple_of(16) {
            Self::Lanes16
        } else {
            Self::VecDot { n: heads.head_dim }
        }
    }

    /// The order of `V p` for a batch of `batch` positions attending over `n_kv` (padded).
    fn values(heads: &Heads, batch: usize, n_kv: usize) -> Self {
        // tinyBLAS takes it when the rows of the output (the head's dimensions) come in
        // multiples of 4; `n_kv` is always a multiple of 16.
        if batch >= 2 && heads.value_dim.is_multiple_of(4) {
            Self::Lanes16
        } else {
            Self::VecDot { n: n_kv }
        }
    }
}

/// One sequence's keys and values for one layer, in f16, one row of `kv_width` values per
/// position; appended in place, growing in steps of `step` positions.
#[derive(Debug, Clone)]
pub(crate) struct KvCache {
    keys: Vec<f16>,
    /// Empty when the values are the keys' first columns (latent attention).
    values: Vec<f16>,
    width: usize,
    values_in_keys: bool,
    step: usize,
    /// The positions forgotten from the front (a multiple of [`WINDOW_ALIGN`]): row `r`
    /// holds position `forgotten + r`.
    forgotten: usize,
    /// The positions each query sees (its own and those before), if the layer slides.
    window: Option<usize>,
}

/// Sliding windows start their sums at a multiple of this many positions, which keeps
/// each term in the lane of llama.cpp's order (16 lanes, or 64 accumulators).
const WINDOW_ALIGN: usize = 64;

impl KvCache {
    pub(crate) fn new(width: usize, step: usize) -> Self {
        Self {
            keys: Vec::new(),
            values: Vec::new(),
            width,
            values_in_keys: false,
            step: step.max(1),
            forgotten: 0,
            window: None,
        }
    }

    /// The cache of a sliding layer, whose queries see the last `window` positions.
    pub(crate) fn sliding(width: usize, step: usize, window: usize) -> Self {
        Self { window: Some(window.max(1)), ..Self::new(width, step) }
    }

    /// The most positions a sliding cache of `window` holds between steps: rows are
    /// forgotten in runs at least as long as those kept (so that each row moves once on
    /// average), and the rows kept reach back to a multiple of [`WINDOW_ALIGN`].
    pub(crate) fn sliding_positions(window: usize) -> usize {
        2 * (window + WINDOW_ALIGN)
    }

    /// Forgets the rows no query after the last one held will see, when there are
    /// enough of them to be worth moving the rest: call it once a step has gone through,
    /// never in the middle of one (a failed step truncates back to where it began).
    pub(crate) fn forget_unseen(&mut self) {
        let Some(window) = self.window else { return };
        let next_query = self.len();
        let first_seen = (next_query + 1).saturating_sub(window) / WINDOW_ALIGN * WINDOW_ALIGN;
        let unseen = first_seen.saturating_sub(self.forgotten);
        let held = next_query - self.forgotten;
        if unseen > 0 && unseen >= held - unseen {
            self.keys.drain(..unseen * self.width);
            if !self.values_in_keys {
                self.values.drain(..unseen * self.width);
            }
            self.forgotten += unseen;
        }
    }

    /// A cache of keys alone, whose first columns serve as the values: latent attention's
    /// compressed latent followed by its rotary key, as llama.cpp caches them.
    pub(crate) fn latent(width: usize, step: usize) -> Self {
        Self { values_in_keys: true, ..Self::new(width, step) }
    }

    /// Positions seen so far (a sliding cache holds only the last of them).
    pub(crate) fn len(&self) -> usize {
        self.forgotten + self.keys.len() / self.width
    }

    /// Bytes held (allocated, not just used).
    #[cfg(test)]
    pub(crate) fn allocated_bytes(&self) -> usize {
        (self.keys.capacity() + self.values.capacity()) * 2
    }

    /// Appends rows of keys and values (as many rows as `keys` holds), rounded to f16. A
    /// latent cache takes no values (they are in the keys).
    pub(crate) fn append(&mut self, keys: &[f32], values: &[f32]) {
        let expected_values = if self.values_in_keys { 0 } else { keys.len() };
        assert!(values.len() == expected_values && keys.len().is_multiple_of(self.width));
        let needed = self.keys.len() + keys.len();
        if needed > self.keys.capacity() {
            let positions = (needed / self.width).div_ceil(self.step) * self.step;
            let extra = positions * self.width - self.keys.len();
            self.keys.reserve_exact(extra);
            if !self.values_in_keys {
                self.values.reserve_exact(extra);
            }
        }
        self.keys.extend(keys.iter().map(|&k| f16::from_f32(k)));
        self.values.extend(values.iter().map(|&v| f16::from_f32(v)));
    }

    /// Forgets positions from `len` on (`len` is at least the positions forgotten from the
    /// front: those are forgotten only between steps).
    pub(crate) fn truncate(&mut self, len: usize) {
        let rows = len.saturating_sub(self.forgotten);
        self.keys.truncate(rows * self.width);
        self.values.truncate(rows * self.width);
    }

    /// The rows held, for tests.
    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        self.keys.len() / self.width
    }

    #[cfg(test)]
    pub(crate) fn keys(&self) -> &[f16] {
        &self.keys
    }
}

/// Buffers one thread reuses across calls.
#[derive(Debug, Default)]
pub(crate) struct Scratch {
    query: Vec<f32>,
    scores: Vec<f32>,
    lanes: Vec<f32>,
}

/// Below this many multiply-adds, attention runs on the calling thread alone.
const PARALLEL_WORK: usize = 1 << 20;

/// Work items (a query row and head) per chunk handed to a thread.
const CHUNKS_PER_THREAD: usize = 8;

/// Attention of a batch of `batch` new positions (the last `batch` of `cache`), for query
/// rows `rows` of the batch: `q` holds those rows (`heads * head_dim` each, RoPE applied),
/// `out` receives them. Large batches and long contexts are spread over the product
/// threads; the results do not depend on how.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend(
    heads: &Heads,
    q: &[f32],
    cache: &mut KvCache,
    batch: usize,
    rows: Range<usize>,
    scores: Scores,
    out: &mut [f32],
    scratch: &mut Scratch,
) {
    let isa = Isa::detect();
    let threads = super::threads::num_threads();
    let context = cache.len();
    let work = rows.len() * heads.heads * context * heads.head_dim;
    if threads > 1 && work >= PARALLEL_WORK && rows.len() * heads.heads > 1 {
        attend_parallel(isa, heads, q, cache, batch, rows, scores, out, threads);
    } else {
        attend_with(isa, heads, q, cache, batch, rows, scores, out, scratch);
    }
}

/// How scores become probabilities: `softmax(scale * score)`, over the positions and,
/// where a model has them, one sink logit per query head (gpt-oss) that takes a share
/// of the weight but has no value.
#[derive(Debug, Clone, Default)]
pub(crate) struct Scores {
    pub(crate) scale: f32,
    pub(crate) sinks: Option<Arc<[f32]>>,
}

/// The sums, and the positions `start..` of the batch, of one call.
#[derive(Debug, Clone)]
struct Plan {
    heads: Heads,
    start: usize,
    scale: f32,
    /// One per query head.
    sinks: Option<Arc<[f32]>>,
    score_sum: Sum,
    value_sum: Sum,
    values_in_keys: bool,
    /// The cache's first row's position, and its window.
    forgotten: usize,
    window: Option<usize>,
}

impl Plan {
    fn new(heads: &Heads, cache: &KvCache, batch: usize, rows: &Range<usize>, scores: Scores) -> Self {
        let context = cache.len();
        assert!(batch >= 1 && batch <= context && rows.end <= batch && cache.width == heads.kv_width());
        assert!(heads.heads.is_multiple_of(heads.kv_heads));
        assert!(heads.value_dim == heads.head_dim || (cache.values_in_keys && heads.value_dim < heads.head_dim));
        assert!(scores.sinks.as_ref().is_none_or(|sinks| sinks.len() == heads.heads), "one sink per head");
        let n_kv = context.next_multiple_of(KV_PAD);
        Self {
            heads: *heads,
            start: context - batch,
            scale: scores.scale,
            sinks: scores.sinks,
            score_sum: Sum::scores(heads, batch),
            value_sum: Sum::values(heads, batch, n_kv),
            values_in_keys: cache.values_in_keys,
            forgotten: cache.forgotten,
            window: cache.window,
        }
    }

    /// Head `h` of batch row `t`: `q` is that head's query, `out` its output.
    #[allow(clippy::too_many_arguments)]
    fn one(
        &self,
        isa: Isa,
        cache_keys: &[f16],
        cache_values: &[f16],
        t: usize,
        h: usize,
        q: &[f32],
        out: &mut [f32],
        scratch: &mut Scratch,
    ) {
        let (d, dv) = (self.heads.head_dim, self.heads.value_dim);
        let width = self.heads.kv_width();
        let seen = self.start + t + 1;
        // A sliding window's sums start at a multiple of WINDOW_ALIGN before its first
        // position, and the positions between are masked.
        let (first, sums_from) = match self.window {
            Some(window) => {
                let first = seen.saturating_sub(window);
                (first, first / WINDOW_ALIGN * WINDOW_ALIGN)
            }
            None => (0, 0),
        };
        assert!(sums_from >= self.forgotten, "the cache forgot position {sums_from}, which a query still sees");
        let g = self.heads.kv_head(h);
        scratch.query.clear();
        scratch.query.extend(q.iter().map(|&v| round_f16(v)));
        scratch.scores.resize(seen - sums_from, 0.0);
        let row = sums_from - self.forgotten;
        let keys = &cache_keys[row * width + g * d..];
        // A latent cache's values are its keys' first columns (and its one KV head's).
        let (values, value_stride) = if self.values_in_keys {
            (keys, width)
        } else {
            let stride = self.heads.kv_heads * dv;
            (&cache_values[row * stride + g * dv..], stride)
        };
        let masked = first - sums_from;
        let sink = self.sinks.as_ref().map(|sinks| sinks[h]);
        // The f64 tail of `ggml_vec_dot_f16` starts at the same term, counted from here.
        let value_sum = match self.value_sum {
            Sum::VecDot { n } => Sum::VecDot { n: n - sums_from },
            lanes => lanes,
        };
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2(avx2) => {
                super::ops_x86::scores(avx2, self.score_sum, &scratch.query, keys, width, &mut scratch.scores);
                scratch.scores[..masked].fill(f32::NEG_INFINITY);
                super::ops_x86::softmax(avx2, &mut scratch.scores, self.scale, sink, true);
                let lanes = &mut scratch.lanes;
                super::ops_x86::weighted_values(avx2, value_sum, &scratch.scores, values, value_stride, out, lanes);
            }
            // Portable, or NEON (whose kernels so far are only the K-quant products).
            _ => {
                scores_portable(self.score_sum, &scratch.query, keys, width, &mut scratch.scores);
                scratch.scores[..masked].fill(f32::NEG_INFINITY);
                super::ops::softmax_portable(&mut scratch.scores, self.scale, sink, true);
                weighted_values_portable(value_sum, &scratch.scores, values, value_stride, out);
            }
        }
    }
}

/// [`attend`] on this thread, with the instruction set `isa`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend_with(
    isa: Isa,
    heads: &Heads,
    q: &[f32],
    cache: &KvCache,
    batch: usize,
    rows: Range<usize>,
    scores: Scores,
    out: &mut [f32],
    scratch: &mut Scratch,
) {
    let plan = Plan::new(heads, cache, batch, &rows, scores);
    let (w, d, wv, dv) = (heads.q_width(), heads.head_dim, heads.out_width(), heads.value_dim);
    assert!(q.len() == rows.len() * w && out.len() == rows.len() * wv);
    for (t, (q, out)) in rows.zip(q.chunks_exact(w).zip(out.chunks_exact_mut(wv))) {
        for (h, (q, out)) in q.chunks_exact(d).zip(out.chunks_exact_mut(dv)).enumerate() {
            plan.one(isa, &cache.keys, &cache.values, t, h, q, out, scratch);
        }
    }
}

/// [`attend`] on up to `threads` threads: the cache's rows move into a job for the
/// thread pool for the call (no copy), and come back after. Jobs are kept for reuse, so
/// that a step allocates nothing once they have grown to size.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend_parallel(
    isa: Isa,
    heads: &Heads,
    q: &[f32],
    cache: &mut KvCache,
    batch: usize,
    rows: Range<usize>,
    scores: Scores,
    out: &mut [f32],
    threads: usize,
) {
    let plan = Plan::new(heads, cache, batch, &rows, scores);
    assert!(q.len() == rows.len() * heads.q_width() && out.len() == rows.len() * heads.out_width());
    let items = rows.len() * heads.heads;
    let chunks = (threads * CHUNKS_PER_THREAD).min(items);
    // Workers get jobs only while they are offered, so a kept job no worker holds any
    // more is this thread's alone.
    let mut job = SPARE_JOBS
        .with_borrow_mut(|spare| spare.iter().position(|j| Arc::strong_count(j) == 1).map(|i| spare.swap_remove(i)))
        .unwrap_or_else(|| Arc::new(AttentionJob::new(isa, plan.clone())));
    {
        let state = Arc::get_mut(&mut job).expect("an unshared job");
        state.isa = isa;
        state.plan = plan;
        state.first_row = rows.start;
        state.q.clear();
        state.q.extend_from_slice(q);
        std::mem::swap(state.keys.get_mut().unwrap_or_else(PoisonError::into_inner), &mut cache.keys);
        std::mem::swap(state.values.get_mut().unwrap_or_else(PoisonError::into_inner), &mut cache.values);
        // Every value is overwritten: no need to clear.
        state.out.resize_with(out.len(), || AtomicU32::new(0));
        state.chunks = Chunks::new(chunks);
        state.chunk_count = chunks;
    }
    let shared: Arc<dyn Job> = job.clone();
    super::threads::run(&shared, threads);
    drop(shared);
    for (out, v) in out.iter_mut().zip(&job.out) {
        *out = f32::from_bits(v.load(Ordering::Relaxed));
    }
    // The cache's rows come back even if a worker that came too late to help still holds
    // the job: it runs no more chunks, so it does not read them.
    std::mem::swap(&mut *job.keys.write().unwrap_or_else(PoisonError::into_inner), &mut cache.keys);
    std::mem::swap(&mut *job.values.write().unwrap_or_else(PoisonError::into_inner), &mut cache.values);
    SPARE_JOBS.with_borrow_mut(|spare| {
        if spare.len() < SPARE_JOB_COUNT {
            spare.push(job);
        }
    });
}

/// Attention jobs a thread keeps for reuse (more than one, in case a worker still holds
/// the last).
const SPARE_JOB_COUNT: usize = 4;

/// One call of [`attend`] as a job for the thread pool: chunk `c` takes the work items
/// (row and head) `c, c + chunk_count, ...`, so that the long rows at the end of a batch
/// are shared out.
struct AttentionJob {
    isa: Isa,
    plan: Plan,
    first_row: usize,
    q: Vec<f32>,
    /// The cache's rows for the call, empty between calls; locked only to move them in
    /// and out (chunks share a read lock).
    keys: RwLock<Vec<f16>>,
    values: RwLock<Vec<f16>>,
    /// The outputs, as f32 bits.
    out: Vec<AtomicU32>,
    chunks: Chunks,
    chunk_count: usize,
}

impl AttentionJob {
    fn new(isa: Isa, plan: Plan) -> Self {
        Self {
            isa,
            plan,
            first_row: 0,
            q: Vec::new(),
            keys: RwLock::default(),
            values: RwLock::default(),
            out: Vec::new(),
            chunks: Chunks::default(),
            chunk_count: 1,
        }
    }
}

impl Job for AttentionJob {
    fn chunks(&self) -> &Chunks {
        &self.chunks
    }

    fn run_chunk(&self, chunk: usize) {
        let heads = &self.plan.heads;
        let (d, dv) = (heads.head_dim, heads.value_dim);
        let items = self.q.len() / d;
        let keys = self.keys.read().unwrap_or_else(PoisonError::into_inner);
        let values = self.values.read().unwrap_or_else(PoisonError::into_inner);
        JOB_SCRATCH.with_borrow_mut(|(scratch, head_out)| {
            head_out.resize(dv, 0.0);
            for item in (chunk..items).step_by(self.chunk_count) {
                let (t, h) = (self.first_row + item / heads.heads, item % heads.heads);
                let q = &self.q[item * d..(item + 1) * d];
                self.plan.one(self.isa, &keys, &values, t, h, q, head_out, scratch);
                for (out, v) in self.out[item * dv..(item + 1) * dv].iter().zip(head_out.iter()) {
                    out.store(v.to_bits(), Ordering::Relaxed);
                }
            }
        });
    }
}

thread_local! {
    /// A pool thread's buffers for attention jobs.
    static JOB_SCRATCH: RefCell<(Scratch, Vec<f32>)> = RefCell::new(Default::default());
    /// Attention jobs this thread ran, kept for reuse.
    static SPARE_JOBS: RefCell<Vec<Arc<AttentionJob>>> = const { RefCell::new(Vec::new()) };
}

/// Adds up `n` products `term(i)` in the order `sum` describes; `terms` of them may be
/// nonzero (the rest are zeros, which change nothing).
#[inline(always)]
pub(crate) fn sum_portable(sum: Sum, terms: usize, term: impl Fn(usize) -> f32) -> f32 {
    match sum {
        Sum::Lanes16 => {
            let mut lanes = [0.0f32; 16];
            for i in 0..terms {
                lanes[i % 16] += term(i);
            }
            reduce16(&lanes)
        }
        Sum::VecDot { n } => {
            let simd = n & !63;
            let mut acc = [0.0f32; 64];
            for i in 0..terms.min(simd) {
                acc[i % 64] += term(i);
            }
            let lanes: [f32; 16] = std::array::from_fn(|l| (acc[l] + acc[l + 32]) + (acc[l + 16] + acc[l + 48]));
            let mut total = reduce16(&lanes) as f64;
            for i in simd..terms {
                total += term(i) as f64;
            }
            total as f32
        }
    }
}

/// `scores[j] = keys[j] . query` for each position `j` of `scores`; key rows are `stride`
/// apart and `query.len()` long.
pub(crate) fn scores_portable(sum: Sum, query: &[f32], keys: &[f16], stride: usize, scores: &mut [f32]) {
    let d = query.len();
    for (j, score) in scores.iter_mut().enumerate() {
        let key = &keys[j * stride..j * stride + d];
        *score = sum_portable(sum, d, |i| key[i].to_f32() * query[i]);
    }
}

/// `out[i] = sum_j probs[j] * values[j][i]`; value rows are `stride` apart.
pub(crate) fn weighted_values_portable(sum: Sum, probs: &[f32], values: &[f16], stride: usize, out: &mut [f32]) {
    for (i, out) in out.iter_mut().enumerate() {
        *out = sum_portable(sum, probs.len(), |j| values[j * stride + i].to_f32() * probs[j]);
    }
}

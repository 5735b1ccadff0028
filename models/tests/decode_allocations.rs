//! A decode step on the CPU allocates only what it returns: the fused operations, the KV
//! cache (appended in place) and the products reuse their buffers from step to step.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use common::{argmax, load_split, open_default_model, run_pipeline};
use hearth_models::StageCache;

/// Counts allocations (and growths) on every thread.
struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator, only counting.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as the caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn decode_steps_allocate_only_their_outputs() {
    let source = open_default_model();
    // Two stages: one returns hidden states, the other logits.
    let stages = load_split(&source, &[source.config().num_layers / 2]);
    let mut caches: Vec<StageCache> = stages.iter().map(|s| s.new_cache()).collect();
    let mut next = argmax(&run_pipeline(&stages, &mut caches, &[504, 3575, 282, 4649, 314]));
    // Warm-up steps grow the buffers to their decode sizes.
    for _ in 0..3 {
        next = argmax(&run_pipeline(&stages, &mut caches, &[next]));
    }
    let mut per_step = Vec::new();
    for _ in 0..20 {
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        let logits = run_pipeline(&stages, &mut caches, &[next]);
        per_step.push(ALLOCATIONS.load(Ordering::Relaxed) - before);
        next = argmax(&logits);
    }
    eprintln!("allocations per decode step: {per_step:?}");
    // What remains is the tensors returned (about five allocations each, for the hidden
    // states and the logits), the logits' copy into a vector here, and now and then a new
    // product job when a pool thread still held the last one: a handful, whatever the
    // number of layers. One allocation per layer would be 30 more.
    per_step.sort();
    assert!(per_step[per_step.len() / 2] <= 12, "allocations per decode step: {per_step:?}");
    assert!(per_step.iter().all(|&n| n < 24), "allocations per decode step: {per_step:?}");
}

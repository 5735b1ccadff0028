//! Validation allocates nothing, whatever a message claims: the sizes it reads are
//! multiplied and compared, never allocated. A counting allocator proves it.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use common::{assert_invariants, EXPECT, LIMITS};
use hearth_proto::frame::StageFrame;
use hearth_proto::handshake::HandshakeStep;
use hearth_proto::probe::{challenge_from_wire, ProbeAnswer};
use hearth_proto::weights::{WeightChunk, WeightRequest};
use proptest::prelude::*;

/// Counts the allocations made on each thread, so that the test harness and proptest,
/// running alongside, do not blur the count.
struct CountingAllocator;

thread_local! {
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

fn count() {
    // `try_with`: the allocator also runs while thread locals are being torn down.
    let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
}

// SAFETY: every method forwards to the system allocator unchanged.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// Runs `f`, returning what it returns and how many allocations it made.
fn allocations<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let before = ALLOCATIONS.with(Cell::get);
    let value = f();
    (value, ALLOCATIONS.with(Cell::get) - before)
}

#[test]
fn the_counter_counts() {
    let (_, n) = allocations(|| std::hint::black_box(vec![1u8; 10]));
    assert_eq!(n, 1);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn validating_a_stage_message_allocates_nothing(message in common::stage_messages()) {
        // Accepted or refused: the result is dropped outside the count.
        let (result, n) = allocations(|| StageFrame::from_wire(message, &LIMITS, &EXPECT));
        prop_assert_eq!(n, 0, "{:?}", result);
        if let Ok(frame) = &result {
            assert_invariants(frame);
        }
    }

    #[test]
    fn validating_handshakes_and_chunks_allocates_nothing(
        handshake in common::handshake_messages(),
        chunk in common::weight_chunks(),
    ) {
        let (result, n) = allocations(|| HandshakeStep::from_wire(handshake));
        prop_assert_eq!(n, 0, "{:?}", result);
        let (result, n) = allocations(|| WeightChunk::from_wire(chunk, &LIMITS));
        prop_assert_eq!(n, 0, "{:?}", result.map(|chunk| chunk.tensor));
    }

    #[test]
    fn validating_probes_allocates_nothing((request, reply) in common::probes()) {
        let (result, n) = allocations(|| challenge_from_wire(&request));
        prop_assert_eq!(n, 0, "{:?}", result);
        let (result, n) = allocations(|| ProbeAnswer::from_wire(reply));
        prop_assert_eq!(n, 0, "{:?}", result);
    }

    #[test]
    fn validating_weight_requests_allocates_nothing(request in common::weight_requests()) {
        let (result, n) = allocations(|| WeightRequest::from_wire(request));
        prop_assert_eq!(n, 0, "{:?}", result);
    }
}

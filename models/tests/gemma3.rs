//! Gemma 3 against llama.cpp, on both compute paths, whole and split.
//!
//! The models are tiny synthetic GGUFs of Gemma 3's layout from the project's writer
//! (sliding windows of 4 positions on three layers of four, a full layer between); the
//! reference outputs are llama.cpp's on the same files (`fixtures/gemma3_llama_cpp.json`,
//! written by `scripts/llama_cpp_reference.py --suite gemma3`). The prompt is long
//! enough that the sliding layers' caches forget positions before the generation starts.

mod common;

use common::llama_cpp::{self, Reference};
use common::{check_splits, load_split};
use hearth_models::{Architecture, ComputePath, ModelSource};

/// As for the other architectures (`moe.rs`): the native kernels sum as llama.cpp does
/// but for the order of some f32 sums, whose last bits can move an activation across a
/// rounding step of its 8-bit quantization.
const NATIVE_TOLERANCE: f32 = 3e-2;
/// candle's kernels quantize activations and sum in their own ways.
const CANDLE_TOLERANCE: f32 = 1e-1;

fn open(path: &std::path::Path, compute: ComputePath) -> ModelSource {
    let mut source = ModelSource::open(path).expect("the model opens");
    source.set_compute_path(compute);
    source
}

fn references() -> Vec<Reference> {
    llama_cpp::references("gemma3_llama_cpp.json", "scripts/llama_cpp_reference.py --suite gemma3")
}

fn check_against_llama_cpp(compute: ComputePath, tolerance: f32) {
    for reference in references() {
        let source = open(&reference.path, compute);
        let config = source.config();
        assert_eq!(config.architecture, Architecture::Gemma3, "{}", reference.name);
        let windows: Vec<Option<usize>> = (0..config.num_layers).map(|i| config.attention_window(i)).collect();
        assert_eq!(windows, [Some(4), Some(4), None, Some(4)], "{}: sliding and full layers", reference.name);
        assert!(reference.prompt.len() > 2 * 64, "{}: the prompt slides past what the caches forget", reference.name);
        let label = format!("{} on {compute:?}", reference.name);
        llama_cpp::check_against(&reference, &load_split(&source, &[]), tolerance, &label);
    }
}

#[test]
fn native_gemma3_matches_llama_cpp() {
    check_against_llama_cpp(ComputePath::Native, NATIVE_TOLERANCE);
}

#[test]
fn candle_ops_gemma3_matches_llama_cpp() {
    check_against_llama_cpp(ComputePath::CandleOps, CANDLE_TOLERANCE);
}

/// 2, 3 and 4 uneven stages, on both paths, give the whole model's tokens and logits:
/// cuts between sliding layers, and around the full one.
#[test]
fn split_gemma3_matches_the_whole_model() {
    let references = references();
    for compute in [ComputePath::Native, ComputePath::CandleOps] {
        for reference in &references {
            let source = open(&reference.path, compute);
            let what = format!("{} on {compute:?}", reference.name);
            check_splits(&source, &reference.prompt, 8, &[&[1], &[3], &[1, 2], &[1, 2, 3]], 1e-4, &what);
        }
    }
}

/// A sliding layer's KV cache is bounded by its window, however long the context; a
/// full layer's grows with it.
#[test]
fn sliding_layers_count_their_window_not_the_context() {
    let reference = references().into_iter().next().expect("a fixture");
    let source = ModelSource::open(&reference.path).expect("opens");
    let footprint = source.footprint(&candle_core::Device::Cpu);
    let context = source.config().context_length as u64;
    let kv = footprint.kv_bytes_per_layer(context);
    let full = footprint.kv_bytes_per_token_per_layer * context;
    assert_eq!(kv[2], full, "the full layer holds the whole context");
    for layer in [0, 1, 3] {
        assert!(kv[layer] > 0 && kv[layer] * 8 < full, "layer {layer} holds {} bytes of {full}", kv[layer]);
    }
}

//! Times matrix-vector products (one decoding step's kind) of Llama-3.2-1B-shaped FFN
//! matrices in every format the kernels multiply natively (the K-quants, Q4_0, Q4_1, Q5_0,
//! Q5_1 and Q8_0): Hearth's kernels against candle's `QMatMul` on the same tensor, with 1
//! and with 2 threads, in GB/s of weights read.
//!
//! ```text
//! cargo run --release -p hearth-models --example kquant_speed
//! ```
//!
//! `-- Q4K 1` limits the run to the types whose names contain `Q4K` and to one thread;
//! `-- Q4K 1 64` multiplies 64 input rows at once (a prefill's kind of product) and also
//! gives billions of multiply-adds per second. `-- Q4K 2 1 cold` cycles through copies of
//! each matrix larger than the last-level cache together, so every product reads its
//! weights from memory, as decoding a large model does.
//!
//! Thread pools (candle's and Hearth's kernels') are sized once per process from
//! `RAYON_NUM_THREADS`, so each thread count runs in a child process of its own.

use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::time::Instant;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use hearth_models::BenchMatrix;

const CHILD_ENV: &str = "HEARTH_KQUANT_SPEED_CHILD";
/// (rows, cols): the FFN's gate and up projections, then its down projection.
const SHAPES: [(usize, usize); 2] = [(8192, 2048), (2048, 8192)];
const TYPES: [GgmlDType; 10] = [
    GgmlDType::Q4K,
    GgmlDType::Q6K,
    GgmlDType::Q5K,
    GgmlDType::Q3K,
    GgmlDType::Q2K,
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q8_0,
];
/// Timed runs per measurement: the best is kept (slower runs measure the neighbours, and
/// short runs are more often left alone by them).
const RUNS: usize = 200;
/// Products per timed run.
const PRODUCTS: usize = 1;
/// Bytes of copies cycled through in the cold mode: past any last-level cache here.
const COLD_BYTES: usize = 256 << 20;

fn main() -> ExitCode {
    if std::env::var_os(CHILD_ENV).is_some() {
        return match measure() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let Ok(exe) = std::env::current_exe() else {
        eprintln!("error: cannot find this program's path to run it per thread count");
        return ExitCode::FAILURE;
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let counts: Vec<usize> = match args.get(1).and_then(|n| n.parse().ok()) {
        Some(threads) => vec![threads],
        None => vec![1, 2],
    };
    for threads in counts {
        let status = Command::new(&exe)
            .args(args.first())
            .args(args.get(2))
            .args(args.get(3))
            .env(CHILD_ENV, "1")
            .env("RAYON_NUM_THREADS", threads.to_string())
            .status();
        if !status.is_ok_and(|s| s.success()) {
            eprintln!("error: the run with {threads} thread(s) failed");
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}

fn measure() -> candle_core::Result<()> {
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_default();
    let filter = std::env::args().nth(1).unwrap_or_default();
    let m: usize = std::env::args().nth(2).and_then(|m| m.parse().ok()).unwrap_or(1);
    let cold = std::env::args().nth(3).is_some_and(|mode| mode == "cold");
    for (rows, cols) in SHAPES {
        // Weights and an input like a model's: small values, a few larger ones.
        let weights: Vec<f32> = (0..rows * cols).map(|i| pseudo_random(i as u64) * 0.05).collect();
        let weights = Tensor::from_vec(weights, (rows, cols), &Device::Cpu)?;
        let x: Vec<f32> = (0..m * cols).map(|i| pseudo_random(i as u64 + (1 << 40)) * 2.0).collect();
        let input = Tensor::from_slice(&x, (m, cols), &Device::Cpu)?;
        for dtype in TYPES.into_iter().filter(|t| format!("{t:?}").contains(&filter)) {
            let qtensor = QTensor::quantize(&weights, dtype)?;
            let bytes = qtensor.storage_size_in_bytes();
            let copies = if cold { COLD_BYTES.div_ceil(bytes) } else { 1 };
            let mut natives = Vec::with_capacity(copies);
            for _ in 0..copies {
                let Some(native) = BenchMatrix::native(&qtensor)? else {
                    candle_core::bail!("{dtype:?} is not multiplied natively");
                };
                natives.push(native);
            }
            let candle = QMatMul::from_arc(Arc::new(qtensor))?;

            let mut out = Vec::new();
            let runs = (RUNS / m).max(5);
            let mut next = 0;
            let ours = best_time(runs, || {
                next = (next + 1) % copies;
                natives[next].forward_into(&x, m, &mut out)
            })?;
            let theirs = best_time(runs, || candle.forward(&input).map(drop))?;
            // The two agree up to rounding: a check that both computed the same product.
            let expected = candle.forward(&input)?.flatten_all()?.to_vec1::<f32>()?;
            let scale = expected.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let worst = out.iter().zip(&expected).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
            let gbs = |seconds: f64| bytes as f64 / seconds / 1e9;
            let gmacs = (rows * cols * m) as f64 / ours / 1e9;
            // Candle's side is always timed warm (its matrix is not copied), so a cold run
            // quotes no ratio: it would compare memory against cache.
            let (candle_label, ratio) = match cold {
                true => ("candle (warm)", String::new()),
                false => ("candle", format!(", {:>5.1}x candle", theirs / ours)),
            };
            println!(
                "{threads} thread(s) {:<5} {rows:>4}x{cols:<4} x {m} {:>5.1} MB: hearth {:>6.1} GB/s ({:>6.3} ms, \
                 {gmacs:>6.1} GMAC/s), {candle_label} {:>5.1} GB/s ({:>6.3} ms){ratio} (max diff {:.1e} of {:.1e})",
                format!("{dtype:?}"),
                bytes as f64 / 1e6,
                gbs(ours),
                ours * 1e3,
                gbs(theirs),
                theirs * 1e3,
                worst,
                scale,
            );
        }
    }
    Ok(())
}

/// The best time of one product, over `runs` runs of `PRODUCTS` products (after one
/// untimed run to warm caches and thread pools).
fn best_time(runs: usize, mut product: impl FnMut() -> candle_core::Result<()>) -> candle_core::Result<f64> {
    product()?;
    let mut best = f64::INFINITY;
    for _ in 0..runs {
        let started = Instant::now();
        for _ in 0..PRODUCTS {
            product()?;
        }
        best = best.min(started.elapsed().as_secs_f64() / PRODUCTS as f64);
    }
    Ok(best)
}

/// A value in -1..1 from a hash of `i` (splitmix64): reproducible without a dependency.
fn pseudo_random(i: u64) -> f32 {
    let mut z = i.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
}

//! Writes a synthetic GGUF: a real Llama 3 model's exact layout, metadata and llama.cpp
//! quantization mix, with random weights from a seed. For speed benchmarks only: it
//! decodes at the real model's speed and generates gibberish.
//!
//! ```text
//! cargo run --release -p hearth-models --example synthetic_gguf -- \
//!     --shape llama-3.2-1b --quant q4_k_m --seed 1 --out llama-3.2-1b-q4_k_m.gguf
//! ```
//!
//! Shapes: tiny, llama-3.2-1b, llama-3.2-3b, llama-3.1-8b, tiny-mixtral, tiny-qwen3moe,
//! qwen3-30b-a3b. Quantizations: q4_k_m, q4_0, q2_k, q3_k_m, q5_0, q5_1.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use hearth_models::synthetic::{write_synthetic_gguf, Quantization, Shape};

const USAGE: &str = "usage: synthetic_gguf --shape tiny|llama-3.2-1b|llama-3.2-3b|llama-3.1-8b|tiny-mixtral|tiny-qwen3moe|qwen3-30b-a3b \
                     --quant q4_k_m|q4_0|q2_k|q3_k_m|q5_0|q5_1 [--seed N] --out PATH";

struct Options {
    shape: Shape,
    quantization: Quantization,
    seed: u64,
    out: PathBuf,
}

fn main() -> ExitCode {
    let options = match parse(std::env::args().skip(1)) {
        Ok(options) => options,
        Err(message) => {
            eprintln!("error: {message}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let started = Instant::now();
    if let Err(e) = write_synthetic_gguf(options.shape, options.quantization, options.seed, &options.out) {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    let size = std::fs::metadata(&options.out).map(|m| m.len()).unwrap_or(0);
    println!(
        "wrote {} ({} {}, seed {}): {:.2} GiB in {:.1} s",
        options.out.display(),
        options.shape,
        options.quantization,
        options.seed,
        size as f64 / (1u64 << 30) as f64,
        started.elapsed().as_secs_f64()
    );
    ExitCode::SUCCESS
}

fn parse(mut args: impl Iterator<Item = String>) -> Result<Options, String> {
    let (mut shape, mut quantization, mut seed, mut out) = (None, None, 1, None);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--shape" => shape = Some(value()?.parse::<Shape>().map_err(|e| format!("--shape: {e}"))?),
            "--quant" => quantization = Some(value()?.parse::<Quantization>().map_err(|e| format!("--quant: {e}"))?),
            "--seed" => seed = value()?.parse().map_err(|e| format!("--seed: {e}"))?,
            "--out" => out = Some(PathBuf::from(value()?)),
            "-h" | "--help" => return Err("help requested".into()),
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    Ok(Options {
        shape: shape.ok_or("--shape is required")?,
        quantization: quantization.ok_or("--quant is required")?,
        seed,
        out: out.ok_or("--out is required")?,
    })
}

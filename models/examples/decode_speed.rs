//! Times greedy decoding of the default model with 1 and with 2 threads.
//!
//! ```text
//! cargo run --release -p hearth-models --example decode_speed [-- MODEL.gguf [TOKENS]]
//! ```
//!
//! Thread pools (candle's and Hearth's kernels') are sized once per process from
//! `RAYON_NUM_THREADS`, so each thread count runs in a child process of its own.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

use candle_core::Device;
use hearth_models::{ModelSource, Stage, StageInput, StageOutput};

/// "The capital of France is", as the default model's tokenizer splits it.
const PROMPT: [u32; 5] = [504, 3575, 282, 4649, 314];
const CHILD_ENV: &str = "HEARTH_DECODE_SPEED_CHILD";
const RUNS: usize = 3;
/// A long prompt, to time prefill (attention over many positions, large products).
const LONG_PROMPT: usize = 512;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let model = args.first().map(PathBuf::from).unwrap_or_else(default_model_path);
    let tokens: usize = args.get(1).and_then(|n| n.parse().ok()).unwrap_or(128);
    if std::env::var_os(CHILD_ENV).is_some() {
        return match measure(&model, tokens) {
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
    for threads in [1, 2] {
        let status = Command::new(&exe)
            .arg(&model)
            .arg(tokens.to_string())
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

fn measure(model: &Path, tokens: usize) -> hearth_models::Result<()> {
    let source = ModelSource::open(model)?;
    let stage = source.load_stage(0..source.config().num_layers, &Device::Cpu)?;
    // One untimed run warms the caches, the page tables and the thread pools.
    decode(&stage, 8)?;
    // The best of a few runs: on a shared machine, slower runs measure the neighbours.
    let (mut best_prefill, mut best_decode) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..RUNS {
        let started = Instant::now();
        let prefill = decode(&stage, tokens)?;
        best_decode = best_decode.min(started.elapsed().as_secs_f64() - prefill);
        best_prefill = best_prefill.min(prefill);
    }
    // Arbitrary but fixed token ids spread over the vocabulary.
    let long: Vec<u32> = (0..LONG_PROMPT as u32).map(|i| 100 + (i * 7919) % 40_000).collect();
    let mut best_long = f64::INFINITY;
    for _ in 0..2 {
        let mut cache = stage.new_cache();
        let started = Instant::now();
        logits(stage.forward(StageInput::Tokens(&long), &mut cache)?)?;
        best_long = best_long.min(started.elapsed().as_secs_f64());
    }
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_default();
    println!(
        "{threads} thread(s): prefill of {} tokens {:.1} ms, decode {:.1} tokens/s (best of {RUNS} runs of {tokens}), \
         prefill of {LONG_PROMPT} tokens {:.0} ms",
        PROMPT.len(),
        best_prefill * 1e3,
        tokens as f64 / best_decode,
        best_long * 1e3,
    );
    Ok(())
}

/// Greedy decoding of `tokens` tokens after the prompt; returns the prefill time in seconds.
fn decode(stage: &Stage, tokens: usize) -> hearth_models::Result<f64> {
    let mut cache = stage.new_cache();
    let started = Instant::now();
    let mut logits = logits(stage.forward(StageInput::Tokens(&PROMPT), &mut cache)?)?;
    let prefill = started.elapsed().as_secs_f64();
    for _ in 0..tokens {
        let next = argmax(&logits);
        logits = logits_of(stage, &mut cache, next)?;
    }
    Ok(prefill)
}

fn logits_of(stage: &Stage, cache: &mut hearth_models::StageCache, token: u32) -> hearth_models::Result<Vec<f32>> {
    logits(stage.forward(StageInput::Tokens(&[token]), cache)?)
}

fn logits(output: StageOutput) -> hearth_models::Result<Vec<f32>> {
    match output {
        StageOutput::Logits(logits) => Ok(logits.to_vec1::<f32>()?),
        StageOutput::Hidden(_) => Err(hearth_models::Error::InvalidInput("a whole model returns logits".into())),
    }
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

fn default_model_path() -> PathBuf {
    let cache = std::env::var_os("HEARTH_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache/hearth")))
        .unwrap_or_else(|| PathBuf::from(".cache/hearth"));
    cache.join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
}

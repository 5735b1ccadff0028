//! `hearth bench`: prefill and decode speed of one node, as one JSON object.

use std::time::Duration;

use serde_json::json;

use crate::engine::Model;

/// Text repeated to make prompts of any length.
const FILLER: &str = "The history of astronomy spans thousands of years, from the first people who \
    tracked the moon and the seasons to the telescopes that now look back to the early universe. \
    Each generation added careful measurements, bold ideas and better instruments. ";

pub fn run(model: Model, decode_tokens: usize, repeat: usize) -> anyhow::Result<()> {
    let repeat = repeat.max(1);
    let prompt = filler_tokens(&model, 512)?;
    // One untimed run warms caches and lets lazy initialisation happen.
    model.timed_run(&prompt[..16], 4)?;

    let prefill = |n: usize| -> anyhow::Result<(f64, Duration)> {
        let mut runs = Vec::new();
        for _ in 0..repeat {
            runs.push(model.timed_run(&prompt[..n], 1)?);
        }
        let ttft = median(runs.iter().map(|t| t.prefill + t.first_token).collect());
        Ok((n as f64 / median(runs.iter().map(|t| t.prefill).collect()).as_secs_f64(), ttft))
    };
    let (prefill_128, ttft_128) = prefill(128)?;
    let (prefill_512, _) = prefill(512)?;
    let mut decode_times = Vec::new();
    for _ in 0..repeat {
        decode_times.push(model.timed_run(&prompt[..16], decode_tokens + 1)?.decode);
    }
    let decode = decode_tokens as f64 / median(decode_times).as_secs_f64();

    let report = json!({
        "model": model.id(),
        "threads": candle_core::utils::get_num_threads(),
        "prefill_128_tokens_per_s": round(prefill_128),
        "prefill_512_tokens_per_s": round(prefill_512),
        "decode_tokens_per_s": round(decode),
        "decode_tokens": decode_tokens,
        "time_to_first_token_ms": round(ttft_128.as_secs_f64() * 1e3),
        "time_to_first_token_prompt_tokens": 128,
        "peak_rss_bytes": peak_rss_bytes(),
        "repeat": repeat,
    });
    println!("{report}");
    Ok(())
}

/// `n` tokens of filler text.
fn filler_tokens(model: &Model, n: usize) -> anyhow::Result<Vec<u32>> {
    let mut text = String::new();
    loop {
        text.push_str(FILLER);
        let tokens = model.tokenizer().encode(&text)?;
        if tokens.len() >= n {
            return Ok(tokens[..n].to_vec());
        }
    }
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values[values.len() / 2]
}

fn round(value: f64) -> f64 {
    (value * 10.0).round() / 10.0
}

/// The most memory this process has held, from the kernel's own accounting.
fn peak_rss_bytes() -> u64 {
    // SAFETY: getrusage only writes into the struct we hand it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return 0;
    }
    let max_rss = usage.ru_maxrss.max(0) as u64;
    // Linux reports KiB, macOS bytes.
    if cfg!(target_os = "macos") {
        max_rss
    } else {
        max_rss * 1024
    }
}

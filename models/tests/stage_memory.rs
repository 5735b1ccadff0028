//! A stage holds only its own layers in memory.
//!
//! Each measurement runs in a fresh child process (this test binary re-run with an
//! environment variable) so that one load's memory cannot hide another's.

mod common;

use std::process::Command;

use common::open_default_model;

const CHILD_ENV: &str = "HEARTH_STAGE_MEMORY_CHILD";

/// Resident set size of this process, in bytes (Linux).
fn resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS line");
    let kib: u64 = line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("VmRSS value");
    kib * 1024
}

/// In the child: load the layers named by the environment and print the memory they took.
#[test]
fn stage_memory_child() {
    let Ok(range) = std::env::var(CHILD_ENV) else { return };
    let (start, end) = range.split_once("..").expect("range");
    let source = open_default_model();
    let before = resident_bytes();
    let stage = source
        .load_stage(start.parse().expect("start")..end.parse().expect("end"), &candle_core::Device::Cpu)
        .expect("stage loads");
    let after = resident_bytes();
    println!("\nSTAGE_BYTES={}", after.saturating_sub(before));
    drop(stage);
}

fn stage_bytes(start: usize, end: usize) -> u64 {
    let output = Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "stage_memory_child", "--nocapture", "--test-threads", "1"])
        .env(CHILD_ENV, format!("{start}..{end}"))
        .output()
        .expect("child runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "child failed: {stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    stdout
        .lines()
        .find_map(|l| l.split_once("STAGE_BYTES=").map(|(_, v)| v))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("child printed no figure: {stdout}"))
}

#[test]
fn a_third_of_the_layers_takes_well_under_the_whole_model() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let source = open_default_model();
    let n = source.config().num_layers;
    let footprint = source.footprint(&candle_core::Device::Cpu);
    let whole = stage_bytes(0, n);
    let middle_third = stage_bytes(n / 3, 2 * n / 3);
    eprintln!("whole model: {} MiB, middle third: {} MiB", whole >> 20, middle_third >> 20);
    // The whole model must at least hold its weights; the middle third holds a third of the
    // layers and neither the embedding nor the head, so well under half of the whole.
    let weights: u64 = footprint.layer_bytes.iter().sum::<u64>() + footprint.embedding_bytes;
    assert!(whole as f64 > 0.8 * weights as f64, "whole model resident {whole} < its weights {weights}");
    assert!(
        (middle_third as f64) < 0.5 * whole as f64,
        "a stage with a third of the layers took {middle_third} bytes, the whole model {whole}"
    );
}

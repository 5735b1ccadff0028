//! `hearth serve` and `hearth generate` on a model Hearth does not run: one clear line on
//! stderr, a non-zero exit, no panic; and the same for an unknown `HEARTH_COMPUTE`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use candle_core::quantized::GgmlDType;
use hearth_models::synthetic::header_only_gguf;

/// A folder of this test's own, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("hearth-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("creates the folder");
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn write_gguf(path: &Path, architecture: &str) {
    let file = header_only_gguf(architecture, GgmlDType::Q8_0).expect("writes");
    std::fs::write(path, file).expect("writes the file");
}

fn hearth(args: &[&str], dir: &Path, compute: Option<&str>) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_hearth"));
    command
        .args(args)
        .env("HEARTH_CACHE_DIR", dir.join("cache"))
        .env("NO_COLOR", "1")
        .env_remove("HEARTH_COMPUTE")
        .stdin(Stdio::null());
    if let Some(compute) = compute {
        command.env("HEARTH_COMPUTE", compute);
    }
    command.output().expect("runs hearth")
}

fn serve_args<'a>(model: &'a str, data_dir: &'a str) -> Vec<&'a str> {
    vec![
        "serve", "--model", model, "--data-dir", data_dir, "--no-mdns", "--api-addr", "127.0.0.1:0", "--data-addr",
        "127.0.0.1:0", "--control-addr", "127.0.0.1:0",
    ]
}

/// Exits non-zero without a panic, and its stderr's last line is `error: ...` holding `needle`.
fn assert_refused(output: &Output, needle: &str, what: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{what}: exited with success\n{stderr}");
    assert_eq!(output.status.code(), Some(1), "{what}: {stderr}");
    assert!(!stderr.contains("panicked"), "{what}: panicked\n{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(last.starts_with("error: ") && last.contains(needle), "{what}: the last line is {last:?}\n{stderr}");
}

#[test]
fn serve_and_generate_refuse_an_unsupported_architecture_in_one_line() {
    let dir = TempDir::new("unsupported-architecture");
    let model = dir.0.join("phi-tiny.gguf");
    write_gguf(&model, "phi3");
    let (model, data_dir) = (model.to_str().expect("utf-8 path"), dir.0.join("data"));
    let data_dir = data_dir.to_str().expect("utf-8 path");
    let needle = "unsupported model: architecture `phi3` (supported: llama";
    let generate = hearth(&["generate", "--model", model, "--prompt", "hi", "--max-tokens", "2"], &dir.0, None);
    assert_refused(&generate, needle, "generate");
    assert_refused(&hearth(&serve_args(model, data_dir), &dir.0, None), needle, "serve");
}

#[test]
fn an_unknown_compute_path_is_refused_before_anything_loads() {
    let dir = TempDir::new("unknown-compute");
    let model = dir.0.join("llama-tiny.gguf");
    write_gguf(&model, "llama");
    let model = model.to_str().expect("utf-8 path");
    let generate = hearth(&["generate", "--model", model, "--prompt", "hi"], &dir.0, Some("metal"));
    assert_refused(&generate, "HEARTH_COMPUTE=`metal` is not a compute path: use `native` or `candle-ops`", "generate");
    let data_dir = dir.0.join("data");
    let serve = hearth(&serve_args(model, data_dir.to_str().expect("utf-8 path")), &dir.0, Some("cuda-ops"));
    assert_refused(&serve, "HEARTH_COMPUTE=`cuda-ops`", "serve");
}

//! Replays a fuzz target's corpus through its check, on stable Rust: the crates' tests
//! `tests/fuzz_corpus.rs` include this file, so CI runs every input the fuzzer kept (and
//! every crash it found, once fixed) without nightly or libFuzzer.

use std::fs;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};

/// `fuzz/`, beside the crate running the test.
pub fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// Runs `check` on every file of `corpus/<target>/` and `artifacts/<target>/`, and
/// fails naming each input that panicked. An empty corpus fails too: it would mean the
/// replay lost track of it.
pub fn replay(target: &str, check: fn(&[u8])) {
    let fuzz = fuzz_dir();
    let mut replayed = 0;
    let mut failed = Vec::new();
    for dir in [fuzz.join("corpus").join(target), fuzz.join("artifacts").join(target)] {
        let Ok(entries) = fs::read_dir(&dir) else { continue };
        for entry in entries {
            let path = entry.expect("a corpus folder can be listed").path();
            if !path.is_file() {
                continue;
            }
            let data = fs::read(&path).expect("a corpus file can be read");
            if panic::catch_unwind(AssertUnwindSafe(|| check(&data))).is_err() {
                failed.push(path.display().to_string());
            }
            replayed += 1;
        }
    }
    assert!(replayed > 0, "no corpus for the fuzz target {target} under {}", fuzz.display());
    assert!(failed.is_empty(), "{} of {replayed} inputs of {target} panicked: {failed:#?}", failed.len());
}

/// Writes `inputs` as `corpus/<target>/seed-<n>`: valid encodings the fuzzer starts from.
pub fn write_seeds(target: &str, inputs: &[Vec<u8>]) {
    let dir = fuzz_dir().join("corpus").join(target);
    fs::create_dir_all(&dir).expect("the corpus folder can be made");
    for (n, input) in inputs.iter().enumerate() {
        fs::write(dir.join(format!("seed-{n}")), input).expect("a seed can be written");
    }
}

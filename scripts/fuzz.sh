#!/usr/bin/env bash
# Fuzzes everything a node reads from the network, for SECONDS (default 60) per target,
# then minimizes each corpus. Needs a nightly toolchain (libFuzzer); installs cargo-fuzz
# if it is missing. New inputs land in fuzz/corpus/<target>/ (commit the ones worth
# keeping: CI replays them on stable through each crate's tests/fuzz_corpus.rs), crashes
# in fuzz/artifacts/<target>/.
# Usage: scripts/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-60}"
shift || true
targets=("$@")
if [[ ${#targets[@]} -eq 0 ]]; then
  targets=(frame activation weight_chunk txt_record gossip api_request)
fi

if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "fuzz.sh: no nightly toolchain (rustup toolchain install nightly); skipping the fuzz run."
  echo "fuzz.sh: the corpus is still checked on stable by 'cargo test' (tests/fuzz_corpus.rs)."
  exit 0
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

# A claimed size that makes the decoder allocate shows up as a crash, not a slow run.
limits=(-rss_limit_mb=512 -malloc_limit_mb=256 -max_len=8192)
for target in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$target"
  echo "== fuzzing $target for ${seconds}s"
  cargo +nightly fuzz run "$target" "fuzz/corpus/$target" -- "${limits[@]}" -max_total_time="$seconds"
  echo "== minimizing the $target corpus"
  cargo +nightly fuzz cmin "$target" "fuzz/corpus/$target" -- "${limits[@]}"
done

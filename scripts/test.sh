#!/usr/bin/env bash
# Runs every test of Hearth: Rust unit and integration tests, then the OpenAI API suite
# against a real `hearth serve`. Installs what the tests need first (pip packages, the
# default model). Usage: scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

# Reuse a build folder outside the clone when there is one: a clean release build of
# candle and friends takes many minutes on a small machine.
if [[ -z "${CARGO_TARGET_DIR:-}" && -d "$HOME/.cache/hearth-target" ]]; then
  export CARGO_TARGET_DIR="$HOME/.cache/hearth-target"
fi
target="${CARGO_TARGET_DIR:-$PWD/target}"

echo "== installing test dependencies"
python3 -m pip install --quiet --disable-pip-version-check -r tests/requirements.txt

echo "== building (release)"
cargo build --release --workspace --all-targets

echo "== fetching the default model"
"$target/release/hearth" pull --model default

echo "== Rust tests"
cargo test --release --workspace

echo "== API tests (openai client against hearth serve)"
HEARTH_BIN="$target/release/hearth" python3 -m pytest tests/api -q

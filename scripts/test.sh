#!/usr/bin/env bash
# Runs every test of Hearth: Rust unit and integration tests, the OpenAI API suite against
# a real `hearth serve`, and the multi-node suites on Linux network namespaces. Installs
# what the tests need first (pip packages, iproute2, the default model).
# Usage: scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

# Reuse a build folder outside the clone when there is one: a clean release build of
# candle, tonic and libp2p takes many minutes on a small machine.
if [[ -z "${CARGO_TARGET_DIR:-}" && -d "$HOME/.cache/hearth-target" ]]; then
  export CARGO_TARGET_DIR="$HOME/.cache/hearth-target"
fi
target="${CARGO_TARGET_DIR:-$PWD/target}"

echo "== installing test dependencies"
python3 -m pip install --quiet --disable-pip-version-check -r tests/requirements.txt
# The namespace tests drive `ip` and `tc`, and `ethtool` for the user-space netem relay
# (kernels without sch_netem); the web page's test runs its script in Node. As root we can
# install them.
if [[ $EUID -eq 0 ]] && ! { command -v tc && command -v ethtool && command -v node; } >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 ethtool nodejs) >/dev/null
fi

echo "== building (release)"
cargo build --release --workspace --all-targets

echo "== fetching the default model"
"$target/release/hearth" pull --model default

echo "== Rust tests"
cargo test --release --workspace

export HEARTH_BIN="$target/release/hearth"
echo "== API tests (the official openai client against hearth serve)"
python3 -m pytest tests/api -q -rs
echo "== multi-node tests (network namespaces)"
# Each suite has its own conftest, so they run as separate sessions. The namespace suites
# skip, loudly, without root; CI runs as root, where they must run.
python3 -m pytest tests/mesh -q -rs

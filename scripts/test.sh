#!/usr/bin/env bash
# Installs what the tests need (the pinned Tansu broker, only when missing) and runs
# every test in the workspace against both the embedded mock cluster and Tansu.
set -euo pipefail
cd "$(dirname "$0")/.."

TANSU_BIN="$(scripts/install-tansu.sh)"
export TANSU_BIN
echo "using tansu at $TANSU_BIN" >&2

# librdkafka logs broker disconnects at error level when a test stops its broker; keep
# test output readable unless asked otherwise.
export RUST_LOG="${RUST_LOG:-warn,librdkafka=off,rdkafka::client=off}"

cargo test --workspace --locked "$@"

#!/usr/bin/env bash
# Checks formatting, lints and docs, installs what the tests need (the pinned Tansu
# broker, only when missing) and runs every test in the workspace against both the
# embedded mock cluster and Tansu. Arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

# Cheap checks first, so a formatting slip fails in seconds rather than after the tests.
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
RUSTDOCFLAGS="-D warnings -D missing-docs" cargo doc --workspace --no-deps --locked
TANSU_BIN="$(scripts/install-tansu.sh)"
export TANSU_BIN
echo "using tansu at $TANSU_BIN" >&2

# The TLS, SASL and zstd build (vendored OpenSSL: several minutes the first time) and the
# tests that check librdkafka accepts those settings (SCRAM against a Tansu that requires
# it).
cargo test --locked -p decaton-client --features tls,sasl,zstd --test security
cargo check --locked -p decaton-cli --features tls,sasl,zstd
# Span export to an OpenTelemetry collector (the service's `otel` feature).
cargo test --locked -p decaton-examples --features otel --test otel

# librdkafka logs broker disconnects at error level when a test stops its broker; keep
# test output readable unless asked otherwise.
export RUST_LOG="${RUST_LOG:-warn,librdkafka=off,rdkafka::client=off}"

cargo test --workspace --locked "$@"

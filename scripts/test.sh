#!/usr/bin/env bash
# Checks formatting, lints and docs, installs what the tests need (the pinned Tansu
# broker, only when missing) and runs every test in the workspace against both the
# embedded mock cluster and Tansu. Arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

# One feature set for every step: the TLS, SASL and zstd build (vendored OpenSSL) and
# the OpenTelemetry export. Cargo builds librdkafka and OpenSSL once per feature set, and
# a build script's output is shared by clippy, doc and test when the features match; so
# lints, docs and tests all use the same set, and a cold run compiles each C library once.
# Features only add code: the `tls`/`zstd` tests check what the full build accepts.
FEATURES="decaton-cli/tls,decaton-cli/sasl,decaton-cli/zstd"
FEATURES+=",decaton-processor/tls,decaton-processor/sasl,decaton-processor/zstd"
# The same set without the example crates, for the pass that leaves them out.
LIB_FEATURES="$FEATURES,decaton-service/otel"
FEATURES+=",decaton-examples/otel"

# Cheap checks first, so a formatting slip fails in seconds rather than after the tests.
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked --features "$FEATURES" -- -D warnings
# Library and binary code never panics on what a broker or a configuration hands it: no
# unwrap, expect, panic or unchecked indexing outside tests. An invariant the code
# guarantees is an `allow` with its reason next to it.
cargo clippy --workspace --lib --bins --locked --features "$LIB_FEATURES" \
    --exclude decaton-examples --exclude decaton-integration-tests -- -D warnings \
    -D clippy::indexing_slicing -D clippy::string_slice -D clippy::panic \
    -D clippy::unwrap_used -D clippy::expect_used
RUSTDOCFLAGS="-D warnings -D missing-docs" \
    cargo doc --workspace --no-deps --locked --features "$FEATURES"
TANSU_BIN="$(scripts/install-tansu.sh)"
export TANSU_BIN
echo "using tansu at $TANSU_BIN" >&2

# librdkafka logs broker disconnects at error level when a test stops its broker; keep
# test output readable unless asked otherwise.
export RUST_LOG="${RUST_LOG:-warn,librdkafka=off,rdkafka::client=off}"

# Every test of the workspace, the SCRAM-against-Tansu and span-export tests included.
cargo test --workspace --locked --no-fail-fast --features "$FEATURES" "$@"

# Every runnable command of README.md, examples/README.md and docs/*.md, as written, on an
# embedded broker (about 30 s with the binaries the tests built).
DOC_FEATURES="$FEATURES" scripts/doc-commands.sh

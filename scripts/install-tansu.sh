#!/usr/bin/env bash
# Install the pinned Tansu broker (a Kafka-compatible broker written in Rust) into a
# cache directory, only when that exact version is not there yet. A cold build takes
# about nine minutes on two cores, so an existing install is never rebuilt.
#
# Prints the path of the tansu binary on stdout (everything else goes to stderr).
#
#   TANSU_VERSION    pinned version (default 0.6.0)
#   DECATON_CACHE    cache root (default ${XDG_CACHE_HOME:-$HOME/.cache}/decaton-rs)
set -euo pipefail

version="${TANSU_VERSION:-0.6.0}"
features="libsql,dynostore"
cache="${DECATON_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/decaton-rs}"
root="$cache/tansu-$version"
bin="$root/bin/tansu"
stamp="$root/.installed-$version-$features"

if [[ -x "$bin" && -f "$stamp" ]]; then
    echo "tansu $version already installed at $bin" >&2
    echo "$bin"
    exit 0
fi

echo "installing tansu $version ($features) into $root (takes several minutes)" >&2
mkdir -p "$root"
# A private target dir so the workspace's target/ is never touched, kept in the cache
# so an interrupted build resumes instead of starting over.
CARGO_TARGET_DIR="$cache/tansu-build" \
    cargo install --locked --root "$root" --version "$version" \
    --features "$features" tansu >&2
touch "$stamp"
# The build tree is large and never needed again once the binary is in place.
rm -rf "$cache/tansu-build"
echo "$bin"

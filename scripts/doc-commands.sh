#!/usr/bin/env bash
# Runs the shell commands of README.md, examples/README.md and docs/*.md as written, on
# the embedded broker of `decaton dev-broker`, so a document that drifts from the code
# fails.
#
# What runs: every ```sh block, in order, one shell per file, as a reader would type them.
#   * A command ending in `&` runs in the background until the file is done; then it gets
#     SIGTERM and must exit 0 (a background command that already exited must have exited
#     0). A `dev-broker` started so is waited for until it prints `bootstrap=HOST:PORT`,
#     which becomes DECATON_BOOTSTRAP; the document's own `export DECATON_BOOTSTRAP=HOST:PORT`
#     line (a placeholder for what it printed) is then skipped.
#   * Any other command must succeed within DOC_TIMEOUT seconds (default 120).
#   * `export` lines apply to the rest of the file.
#   * `decaton` is the workspace's build (target/debug first on PATH), and `cargo run
#     [--release] -p decaton-cli --` and `cargo run [--release] -p decaton-examples --bin
#     NAME [--]` run the debug binaries built first: the check must not wait for a
#     release build, nor for cargo's build lock while services start.
# Blocks that need a long run or another host are in SKIP below, each with its reason;
# every skip is printed, and a SKIP entry that matches no block fails the check.
#
# Usage: scripts/doc-commands.sh [FILE.md...]   (default: the files above)
# About 30 s once the binaries are built.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
DOC_TIMEOUT="${DOC_TIMEOUT:-120}"

# FILE|first command of the block (prefix)|reason
SKIP=(
  "README.md|cargo run --release -p decaton-examples --bin quickstart|100k tasks in a release build; examples/tests/quickstart_smoke.rs runs it small"
  "README.md|scripts/test.sh|the test command itself, which runs this check"
  "README.md|cargo test -p decaton-integration-tests --test faults|long runs (#[ignore]d), minutes each"
  "examples/README.md|cargo run --release -p decaton-examples --bin quickstart|100k tasks in a release build; examples/tests/quickstart_smoke.rs runs it small"
  "examples/README.md|cargo run --release -p decaton-examples --bin user-counters -- --dump|needs the user-counters instance stopped (it holds the store locks); examples/tests/user_counters.rs dumps a stopped one"
  "docs/benchmarks.md|decaton bench|benchmarks: minutes each, some on a Tansu started by hand ([TANSU] placeholders)"
  "docs/benchmarks.md|DECATON_RESTORE_BROKER=tansu|a million-record restore on Tansu, minutes"
  "docs/failures.md|decaton dlq list|needs a dead-letter topic with records (\$BOOTSTRAP of a running system); crates/cli/tests/dlq.rs runs list and replay"
)

if [ "$#" -gt 0 ]; then
  FILES=("$@")
else
  FILES=(README.md examples/README.md docs/*.md)
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
export RUST_LOG="${RUST_LOG:-warn,librdkafka=off,rdkafka::client=off}"
# Local state of the example services goes to the scratch directory, not the clone.
export DECATON_SUBSCRIPTIONS__USER_COUNTERS__STATE_DIR="$WORK/user-counters-state"

echo "doc-commands: building decaton and the examples" >&2
# DOC_FEATURES: the feature set of the build to reuse (scripts/test.sh passes its own).
cargo build --locked -q -p decaton-cli -p decaton-examples --bins \
  ${DOC_FEATURES:+--features "$DOC_FEATURES"}
export PATH="$ROOT/target/debug:$PATH"

failures=0
declare -A skip_used=()

fail() {
  echo "FAIL $*" >&2
  failures=$((failures + 1))
}

# Prints one record per command: LINE \037 KIND \037 TEXT, KIND `run` or `block` (the
# first command of a block, announced before its commands).
extract() {
  awk -v US=$'\037' '
    /^```sh[[:space:]]*$/ && !inblock { inblock = 1; first = 1; cmd = ""; next }
    /^```/ && inblock { inblock = 0; next }
    !inblock { next }
    {
      line = $0
      if (cmd == "") {
        if (line ~ /^[[:space:]]*(#.*)?$/) next
        start = NR
      }
      if (line ~ /\\[[:space:]]*$/) { sub(/\\[[:space:]]*$/, "", line); cmd = cmd line " "; next }
      cmd = cmd line
      if (first) { print start US "block" US cmd; first = 0 }
      print start US "run" US cmd
      cmd = ""
    }
  ' "$1"
}

# Sets skip_why to the reason when the block starting with FIRST-COMMAND is skipped.
skip_reason() { # FILE FIRST-COMMAND
  local entry file prefix reason
  skip_why=""
  for entry in "${SKIP[@]}"; do
    IFS='|' read -r file prefix reason <<<"$entry"
    if [ "$file" = "$1" ] && [[ "$2" == "$prefix"* ]]; then
      skip_used["$entry"]=1
      skip_why="$reason"
      return 0
    fi
  done
  return 1
}

# Polls until FILE has a `bootstrap=` line or PID is gone, for at most 60 s.
await_bootstrap() { # PID FILE
  local deadline=$((SECONDS + 60))
  while [ "$SECONDS" -lt "$deadline" ]; do
    if grep -q '^bootstrap=' "$2" 2>/dev/null; then
      sed -n 's/^bootstrap=//p' "$2" | head -n 1
      return 0
    fi
    kill -0 "$1" 2>/dev/null || return 1
    sleep 0.2
  done
  return 1
}

# SIGTERM to each background command still running, the last started first (the
# dev-broker last), one at a time as a reader would stop them; each must exit 0.
stop_background() { # FILE
  local pid deadline status i
  for ((i = ${#bg_order[@]} - 1; i >= 0; i--)); do
    pid="${bg_order[$i]}"
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + 60))
    while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then
      kill -KILL "$pid" 2>/dev/null || true
      fail "$1:${bg_line[$pid]}: did not stop within 60 s of SIGTERM: ${bg_cmd[$pid]}"
    fi
    status=0
    wait "$pid" || status=$?
    if [ "$status" -ne 0 ]; then
      fail "$1:${bg_line[$pid]}: exited $status: ${bg_cmd[$pid]}"
      tail -n 20 "${bg_log[$pid]}" >&2
    fi
  done
}

run_file() { # FILE
  local file="$1" line kind text skipping="" log n=0 status pid boot
  declare -gA bg_cmd=() bg_line=() bg_log=()
  bg_order=()
  local records
  records="$(extract "$file")"
  [ -n "$records" ] || return 0
  while IFS=$'\037' read -r line kind text; do
    if [ "$kind" = block ]; then
      if skip_reason "$file" "$text"; then
        echo "SKIP $file:$line: $skip_why" >&2
        skipping=1
      else
        skipping=""
      fi
      continue
    fi
    [ -z "$skipping" ] || continue
    n=$((n + 1))
    log="$WORK/$(basename "$file").$n.log"
    # The binaries built above, run directly: `cargo run` would wait on the build lock.
    text="${text//cargo run --release /cargo run }"
    text="${text//cargo run -p decaton-cli -- /decaton }"
    while [[ "$text" =~ cargo\ run\ -p\ decaton-examples\ --bin\ ([a-z-]+)(\ --)? ]]; do
      text="${text/"${BASH_REMATCH[0]}"/${BASH_REMATCH[1]}}"
    done
    # The placeholder for what dev-broker printed: set from its output instead.
    if [[ "$text" =~ ^export\ DECATON_BOOTSTRAP=HOST:PORT ]]; then
      echo "  $file:$line: DECATON_BOOTSTRAP=${DECATON_BOOTSTRAP:-unset} (from dev-broker)" >&2
      [ -n "${DECATON_BOOTSTRAP:-}" ] || fail "$file:$line: no dev-broker started before"
      continue
    fi
    echo "  $file:$line: $text" >&2
    if [[ "$text" =~ ^export\  ]]; then
      eval "$text"
      continue
    fi
    if [[ "$text" =~ ^(.*[^&])\&[[:space:]]*(#.*)?$ ]]; then
      bash -c "exec ${BASH_REMATCH[1]}" >"$log" 2>"$log.err" </dev/null &
      pid=$!
      bg_order+=("$pid")
      bg_cmd[$pid]="$text"
      bg_line[$pid]="$line"
      bg_log[$pid]="$log.err"
      if [[ "$text" == *dev-broker* ]]; then
        if boot="$(await_bootstrap "$pid" "$log")"; then
          export DECATON_BOOTSTRAP="$boot"
        else
          fail "$file:$line: dev-broker printed no bootstrap= line"
          tail -n 20 "$log.err" >&2
        fi
      fi
      continue
    fi
    status=0
    timeout --kill-after=10 "$DOC_TIMEOUT" bash -o pipefail -c "$text" >"$log" 2>"$log.err" </dev/null ||
      status=$?
    if [ "$status" -eq 124 ]; then
      fail "$file:$line: still running after ${DOC_TIMEOUT} s: $text"
      tail -n 20 "$log.err" >&2
    elif [ "$status" -ne 0 ]; then
      fail "$file:$line: exited $status: $text"
      tail -n 20 "$log.err" >&2
    fi
  done <<<"$records"
  stop_background "$file"
  unset DECATON_BOOTSTRAP
}

for file in "${FILES[@]}"; do
  run_file "$file"
done

if [ "$#" -eq 0 ]; then
  for entry in "${SKIP[@]}"; do
    [ -n "${skip_used[$entry]:-}" ] || fail "SKIP entry matches no block: $entry"
  done
fi

if [ "$failures" -ne 0 ]; then
  echo "doc-commands: $failures failure(s)" >&2
  exit 1
fi
echo "doc-commands: every runnable command passed" >&2

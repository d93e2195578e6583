#!/usr/bin/env bash
# Fuzzes the server's request path (fuzz/fuzz_request.c: proto/edge.c + coord/service.c over
# an embedded 2-shard engine) with libFuzzer for a fixed number of executions.
#
#   tests/fuzz.sh [RUNS]     RUNS executions (default 1500000, about a minute of one core)
#
# Configures build-fuzz with clang (-DFASA_FUZZ=ON: libFuzzer + ASan + UBSan), builds only
# fuzz_request and gen_corpus, writes the seed corpus into a temporary directory, runs the
# target over it with a fixed seed, and ends with the line
#   fuzz: N executions, K crashes
# It exits non-zero on any crash, leak, timeout or out-of-memory, after printing the
# reproducer's path (kept in build-fuzz/fuzz-artifacts/). Environment: FASA_FUZZ_SEED (default
# 1; another seed explores elsewhere), FASA_FUZZ_BUILD (default build-fuzz), FASA_FUZZ_CC
# (default clang). Called by tests/run-all.sh (FASA_SKIP_FUZZ=1 skips it there).
set -euo pipefail
if [ "${1:-}" = -h ] || [ "${1:-}" = --help ]; then
    sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
fi
runs=${1:-1500000}
case "$runs" in
'' | *[!0-9]*)
    echo "fuzz: RUNS must be a number of executions, got '$runs'" >&2
    exit 2
    ;;
esac
cd "$(dirname "$0")/.."
dir=${FASA_FUZZ_BUILD:-build-fuzz}
cc=${FASA_FUZZ_CC:-clang}
if ! command -v "$cc" >/dev/null; then
    echo "fuzz: $cc not found (deploy/install-deps.sh installs clang and libFuzzer)" >&2
    exit 1
fi
jobs=$(nproc 2>/dev/null || echo 2)

echo "=== fuzz build ($dir, $cc)"
cmake -S . -B "$dir" -DFASA_FUZZ=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DCMAKE_C_COMPILER="$cc" >/dev/null
cmake --build "$dir" -j "$jobs" --target fuzz_request gen_corpus

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir "$tmp/corpus"
"$dir/fuzz/gen_corpus" "$tmp/corpus"
art="$dir/fuzz-artifacts"
mkdir -p "$art"

echo "=== fuzz run ($runs executions, seed ${FASA_FUZZ_SEED:-1})"
# Requests stay small for speed (the seeds are under 1 KiB); every input must be answered
# within 10 s and the process stay under 2 GiB.
set +e
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
    UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 OPENBLAS_NUM_THREADS=1 \
    "$dir/fuzz/fuzz_request" -runs="$runs" -seed="${FASA_FUZZ_SEED:-1}" -max_len=4096 \
    -timeout=10 -rss_limit_mb=2048 -dict=fuzz/fasa.dict -artifact_prefix="$art/" \
    -print_final_stats=1 "$tmp/corpus" >"$tmp/log" 2>&1
rc=$?
set -e

grep -E '^#[0-9]+[[:space:]]+(INITED|DONE)' "$tmp/log" || true
execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$tmp/log" | tail -n 1)
if [ -z "$execs" ]; then # a crash ends the run before the final stats
    execs=$(grep -oE '^#[0-9]+' "$tmp/log" | tail -n 1 | tr -d '#')
fi
repro=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$tmp/log")
crashes=0
if [ "$rc" -ne 0 ] || [ -n "$repro" ]; then
    crashes=1
    grep -E 'ERROR|invariant broken|SUMMARY|^    #[0-9]' "$tmp/log" | head -n 40 >&2 || true
    cp "$tmp/log" "$art/last-run.log"
    echo "fuzz: failed (exit $rc); log: $art/last-run.log" >&2
    for r in $repro; do
        echo "fuzz: reproducer: $r (replay: $dir/fuzz/fuzz_request $r; with" \
            "FASA_FUZZ_RESET_EVERY=1 it starts from a fresh fixture)" >&2
    done
fi
echo "fuzz: ${execs:-0} executions, $crashes crashes"
exit $((crashes ? 1 : 0))

#!/usr/bin/env bash
# The write-ahead log's cost in append throughput (coord/wal.h): bench_server's append phase
# (2048-token appends, 8 KV heads x 128 dims, f32: 16 MiB of K and V per request) against a
# 3-rank fasa-server without a state dir, then with --state-dir and --wal off, write, fsync.
# Prints each run's append line and its throughput relative to the run without a state dir.
#   bench/wal_bench.sh [BUILD_DIR (build)] [TOKENS (131072)]
set -u
root=$(cd "$(dirname "$0")/.." && pwd)
build=$(cd "${1:-$root/build}" && pwd)
tokens=${2:-131072}
tmp=$(mktemp -d)
trap 'FASA_RUN_DIR=$tmp/run bash "$root/deploy/stop-local.sh" >/dev/null 2>&1; rm -rf "$tmp"' EXIT
export FASA_BUILD=$build FASA_RUN_DIR=$tmp/run
base=
for mode in none off write fsync; do
    rm -rf "$tmp/state" && mkdir -p "$tmp/state"
    extra=()
    [ "$mode" != none ] && extra=(--state-dir "$tmp/state" --wal "$mode")
    bash "$root/deploy/run-local.sh" 3 --bind 'tcp://127.0.0.1:*' -- "${extra[@]}" >/dev/null || exit 1
    line=$("$build/bench/bench_server" --server "$(cat "$tmp/run/endpoint")" --tokens "$tokens" \
        --steps 2 --dense-steps 1 --small 1024 --small-steps 2 2>/dev/null | grep '^append:')
    bash "$root/deploy/stop-local.sh" >/dev/null 2>&1
    gbs=$(echo "$line" | grep -Eo '[0-9.]+ GB/s' | head -1 | awk '{print $1}')
    [ -z "$base" ] && base=$gbs
    printf 'wal %-5s %s  | %.2fx of no state dir\n' "$mode" "$line" "$(awk -v a="$gbs" -v b="$base" 'BEGIN { print (b > 0) ? a / b : 0 }')"
done

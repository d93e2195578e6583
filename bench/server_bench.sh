#!/usr/bin/env bash
# The service benchmark: starts fasa-server with N ranks (default 3: a coordinator and 2
# workers), runs bench/bench_server against it (1M-token session: append throughput,
# Attend p50/p99 for fasa and dense; service overhead per Attend at 4K tokens), stops it.
#   bench/server_bench.sh [N] [bench_server options...]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
n=${1:-3}
[ $# -gt 0 ] && shift
export FASA_BUILD=${FASA_BUILD:-$root/build} FASA_RUN_DIR=$(mktemp -d)
trap 'bash "$root/deploy/stop-local.sh" >/dev/null 2>&1 || true; rm -rf "$FASA_RUN_DIR"' EXIT
bash "$root/deploy/run-local.sh" "$n" --bind 'tcp://127.0.0.1:*'
"$FASA_BUILD/bench/bench_server" --server "$(cat "$FASA_RUN_DIR/endpoint")" "$@"

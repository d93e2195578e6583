#!/usr/bin/env bash
# The service benchmark: starts fasa-server with N ranks (default 3: a coordinator and 2
# workers), runs bench/bench_server against it (1M-token session: append throughput,
# Attend p50/p99 for fasa and dense; service overhead per Attend at 4K tokens), stops it.
#   bench/server_bench.sh [N] [bench_server options...]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
n=${1:-3}
[ $# -gt 0 ] && shift
source "$root/bench/local_servers.sh"
start_server "$n"
"$FASA_BUILD/bench/bench_server" --server "$SERVER_ENDPOINT" "$@"

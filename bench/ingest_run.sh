#!/usr/bin/env bash
# Issue 14's ingest target in one go: a loopback fasa-server with 2 workers (3 ranks,
# deploy/run-local.sh), then `fasa bench ingest` with f16 on the wire and stored (the
# target: >= 1.0 GB/s of stored bytes), then the same with f32 for the ratio.
#   bash bench/ingest_run.sh [TOKENS (65536)] [JSON prefix (none)]
# FASA_BUILD: the build directory (default build). Prints every figure with its target.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
tokens=${1:-65536}
json=${2:-}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
export OPENBLAS_NUM_THREADS=1
# shellcheck source=bench/local_servers.sh
source "$root/bench/local_servers.sh"
start_server 3
for dt in f16 f32; do
    "$FASA_BUILD/fasa" bench ingest --server "$SERVER_ENDPOINT" --tokens "$tokens" --dtype $dt \
        ${json:+--json "$json-$dt.json"}
done

#!/usr/bin/env bash
# Issue 14's ingest target in one go: a fresh loopback fasa-server with 2 workers (3 ranks,
# deploy/run-local.sh) and no reserve, then `fasa bench ingest` with f16 on the wire and stored
# (the target: >= 1.0 GB/s of stored bytes) and the same with f32 for the ratio; then the same
# two through a fresh server whose workers pre-fault a memory reserve at start (--reserve,
# default 1200M per worker: both loads fit, the second in the memory the first gave back),
# with the reserve's start-up time from the server log. The first touch of fresh memory is
# what a server without a reserve pays during the load; with one it is paid at start.
#   bash bench/ingest_run.sh [TOKENS (65536)] [JSON prefix (none)] [RESERVE (1200M)]
# FASA_BUILD: the build directory (default build). Prints every figure with its target.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
tokens=${1:-65536}
json=${2:-}
reserve=${3:-1200M}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
export OPENBLAS_NUM_THREADS=1
# shellcheck source=bench/local_servers.sh
source "$root/bench/local_servers.sh"
for r in 0 "$reserve"; do
    if [ "$r" = 0 ]; then
        echo "== a fresh server, no reserve"
        start_server 3
    else
        echo "== a fresh server, --reserve $r per worker"
        start_server 3 -- --reserve "$r"
        # The workers log their reserve once faulted in (rank 0 may answer before): both.
        log=${_server_dirs[-1]}/fasa-server.log
        for _ in $(seq 600); do
            [ "$(grep -c "reserve:" "$log" || true)" -ge 2 ] && break
            sleep 0.1
        done
        grep -h "reserve:" "$log" | sed 's/^/  server log: /' || echo "  server log: no reserve line"
    fi
    for dt in f16 f32; do
        "$FASA_BUILD/fasa" bench ingest --server "$SERVER_ENDPOINT" --tokens "$tokens" --dtype $dt \
            ${json:+--json "$json-r$r-$dt.json"}
    done
    _stop_servers
    _server_dirs=()
done

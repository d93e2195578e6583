#!/usr/bin/env bash
# The soak benchmark: starts fasa-server with 3 ranks (a coordinator and 2 workers) on a free
# loopback port with deploy/run-local.sh, finds the PID of every rank, runs
# build/bench/bench_soak (CLIENTS concurrent clients x REQUESTS mixed requests, bad ones
# included, outputs checked, the ranks' VmRSS before and after), stops the server with
# deploy/stop-local.sh and checks that every rank exited. Exit status: bench_soak's (1 on
# any unexpected error), or 1 when the server did not start or a rank outlived the stop.
#
#   bench/soak.sh [CLIENTS (8)] [REQUESTS (2000)] [bench_soak options...]
#
# Environment: FASA_BUILD (build directory, default ./build), FASA_SOAK_RANKS (3),
# FASA_SOAK_TIMEOUT (seconds bench_soak may run, default 900), FASA_SOAK_MMAP_THRESHOLD
# (bytes, default 131072; "" = glibc's default). bench_soak asserts flat RSS (see its
# SOAK_RSS_SLACK_MIB). glibc's dynamic mmap threshold rises to 32 MiB once large blocks are
# freed, after which the workers' shard buffers come from the heap and its fragments stay
# resident: with glibc's default a worker grows ~35 MiB over 4800 soak requests and levels
# off, with 0.1 MiB of KV added. A fixed threshold (MALLOC_MMAP_THRESHOLD_, here for the
# ranks only; rank 0 sets its own) returns those buffers to the system on free, so what
# the bound catches is a leak, not that retention.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
case "${1:-}" in -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;; esac
clients=${1:-8}
requests=${2:-2000}
shift $(($# < 2 ? $# : 2))
n=${FASA_SOAK_RANKS:-3}
max_message=2097152
block=64
export FASA_BUILD=${FASA_BUILD:-$root/build}
FASA_RUN_DIR=$(mktemp -d)
export FASA_RUN_DIR
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
export OPENBLAS_NUM_THREADS=1
bench=$FASA_BUILD/bench/bench_soak
[ -x "$bench" ] || { echo "soak: $bench not found; build first" >&2; exit 1; }
cleanup() {
    bash "$root/deploy/stop-local.sh" >/dev/null 2>&1 || true
    rm -rf "$FASA_RUN_DIR"
}
trap cleanup EXIT

# Small blocks spread even short sessions over both workers; a 2 MiB message limit makes the
# oversized case cheap.
mmap_env=()
[ -n "${FASA_SOAK_MMAP_THRESHOLD-131072}" ] && mmap_env=(MALLOC_MMAP_THRESHOLD_="${FASA_SOAK_MMAP_THRESHOLD-131072}")
if ! env "${mmap_env[@]}" bash "$root/deploy/run-local.sh" "$n" --bind 'tcp://127.0.0.1:*' -- \
        --max-message $max_message --block $block --log-level warn; then
    echo "soak: the server did not start" >&2
    exit 1
fi
ep=$(cat "$FASA_RUN_DIR/endpoint")
launcher=$(cat "$FASA_RUN_DIR/launcher.pid")
# The ranks in rank order (Open MPI puts each one's rank in its environment).
declare -a by_rank
if [ "$n" -eq 1 ]; then
    by_rank[0]=$launcher
else
    for p in $(pgrep -P "$launcher"); do
        r=$(tr '\0' '\n' < "/proc/$p/environ" 2>/dev/null | sed -n 's/^OMPI_COMM_WORLD_RANK=//p')
        [ -n "$r" ] && by_rank[$r]=$p
    done
fi
if [ "${#by_rank[@]}" -ne "$n" ]; then
    # No readable environment: rank 0 from its PID file, the workers in PID order.
    by_rank=("$(cat "$FASA_RUN_DIR/fasa-server.pid")")
    for p in $(pgrep -P "$launcher"); do [ "$p" != "${by_rank[0]}" ] && by_rank+=("$p"); done
fi
pids=$(IFS=,; echo "${by_rank[*]}")
if [ "${#by_rank[@]}" -ne "$n" ]; then
    echo "soak: expected $n rank processes under launcher $launcher, found '${by_rank[*]}'" >&2
    exit 1
fi
echo "ranks (pid by rank): $pids"

# Under a sanitizer build the server (MPI) runs with the environment's ASAN_OPTIONS; the
# client checks leaks.
client_asan=${ASAN_OPTIONS:-}
client_asan=${client_asan//detect_leaks=0/detect_leaks=1}
ASAN_OPTIONS=$client_asan timeout "${FASA_SOAK_TIMEOUT:-900}" "$bench" --server "$ep" --clients "$clients" \
    --requests "$requests" --pids "$pids" --max-message $max_message --block $block "$@"
rc=$?
[ $rc -eq 124 ] && echo "soak: bench_soak ran past ${FASA_SOAK_TIMEOUT:-900} s" >&2

bash "$root/deploy/stop-local.sh" >/dev/null || rc=1
for p in $launcher ${by_rank[*]}; do
    if kill -0 "$p" 2>/dev/null; then
        echo "soak: process $p still running after the stop" >&2
        rc=1
    fi
done
if grep -Eqi 'assert|segmentation|abort|AddressSanitizer|runtime error' "$FASA_RUN_DIR/fasa-server.log"; then
    echo "soak: the server's log shows a crash:" >&2
    tail -20 "$FASA_RUN_DIR/fasa-server.log" >&2
    rc=1
fi
[ $rc -eq 0 ] && echo "soak: server stopped, all $n ranks exited"
exit $rc

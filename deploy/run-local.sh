#!/usr/bin/env bash
# Starts fasa-server with N ranks under mpirun on this machine (rank 0 coordinates, ranks
# 1..N-1 hold the shards; N=1 runs without a launcher), waits until it answers ping, and
# prints the endpoint and the PID file. Stop it with deploy/stop-local.sh.
#
#   deploy/run-local.sh N [--bind ENDPOINT] [--run-dir DIR] [-- extra fasa-server options]
#
# Environment: FASA_BUILD (build directory, default ./build), FASA_RUN_DIR (where the PID,
# endpoint and log files go, default /tmp/fasa-local), FASA_TEST_PORTS=LO-HI (a --bind
# ending in :* takes a free port of that range instead, retried when it is taken meanwhile),
# FASA_START_TIMEOUT_S (how long to wait for the first ping answer, default 30). Root-safe: sets Open MPI's
# run-as-root and oversubscription variables, and one OpenBLAS thread per rank.
# CURVE: pass -- --curve-secret FILE --authorized-keys DIR (needed for a --bind beyond
# loopback); the start-up ping then uses FASA_CURVE_SERVER_KEY and FASA_CURVE_CLIENT_SECRET,
# and without them the script only waits for the endpoint file (the server is bound).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; }
source "$here/deploy/ports.sh"

[ $# -ge 1 ] || { usage >&2; exit 2; }
case "$1" in -h|--help) usage; exit 0 ;; esac
n=$1; shift
[[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "run-local: N must be a positive integer, got '$n'" >&2; exit 2; }
bind="tcp://127.0.0.1:5555"
run_dir=${FASA_RUN_DIR:-/tmp/fasa-local}
extra=()
while [ $# -gt 0 ]; do
    case "$1" in
        --bind) bind=${2:?--bind needs an endpoint}; shift 2 ;;
        --run-dir) run_dir=${2:?--run-dir needs a directory}; shift 2 ;;
        --) shift; extra=("$@"); break ;;
        -h|--help) usage; exit 0 ;;
        *) echo "run-local: unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
done
start_timeout=${FASA_START_TIMEOUT_S:-30}
[[ "$start_timeout" =~ ^[1-9][0-9]*$ ]] || { echo "run-local: FASA_START_TIMEOUT_S must be a positive number of seconds, got '$start_timeout'" >&2; exit 2; }
build=${FASA_BUILD:-$here/build}
server=$build/fasa-server
client=$build/fasa
[ -x "$server" ] || { echo "run-local: $server not found; build first (cmake -S . -B build && cmake --build build -j)" >&2; exit 1; }
mkdir -p "$run_dir"
pid_file=$run_dir/fasa-server.pid          # rank 0 (the coordinator)
launcher_pid_file=$run_dir/launcher.pid    # mpirun, or rank 0 itself when N=1
endpoint_file=$run_dir/endpoint
log=$run_dir/fasa-server.log
if [ -f "$launcher_pid_file" ] && kill -0 "$(cat "$launcher_pid_file")" 2>/dev/null; then
    echo "run-local: a server is already running (PID $(cat "$launcher_pid_file"), $run_dir); stop it with deploy/stop-local.sh" >&2
    exit 1
fi
rm -f "$pid_file" "$endpoint_file"

export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_rmaps_base_oversubscribe=1 OPENBLAS_NUM_THREADS=1
ranged=0
[[ "$bind" == *:\* ]] && [ -n "${FASA_TEST_PORTS:-}" ] && ranged=1
start() {
    local b=$bind p
    if [ "$ranged" -eq 1 ]; then
        p=$(fasa_pick_port) || exit 2
        b=${bind%\*}$p
    fi
    local args=(--bind "$b" --pid-file "$pid_file" --endpoint-file "$endpoint_file" "${extra[@]}")
    if [ "$n" -eq 1 ]; then
        setsid "$server" "${args[@]}" >"$log" 2>&1 < /dev/null &
    else
        setsid mpirun -n "$n" -x OPENBLAS_NUM_THREADS "$server" "${args[@]}" >"$log" 2>&1 < /dev/null &
    fi
    launcher=$!
    echo "$launcher" > "$launcher_pid_file"
}
start
tries=1

# Wait for the endpoint file, then for a ping answer (with CURVE and no client key: none).
curve=0
[ -n "${FASA_CURVE_SECRET:-}" ] && curve=1
for a in "${extra[@]}"; do case "$a" in --curve-secret|--curve-secret=*) curve=1 ;; esac; done
no_ping=0
[ "$curve" -eq 1 ] && [ -z "${FASA_CURVE_CLIENT_SECRET:-}" ] && no_ping=1
for _ in $(seq 1 $((10 * start_timeout))); do
    if ! kill -0 "$launcher" 2>/dev/null; then
        if [ "$ranged" -eq 1 ] && [ "$tries" -lt 5 ] && grep -q "cannot bind" "$log"; then
            tries=$((tries + 1)) # the port was taken between the pick and the bind
            start
            continue
        fi
        echo "run-local: fasa-server exited during start-up; its log ($log):" >&2
        cat "$log" >&2
        rm -f "$launcher_pid_file"
        exit 1
    fi
    if [ -s "$endpoint_file" ]; then
        endpoint=$(cat "$endpoint_file")
        if [ ! -x "$client" ] || [ "$no_ping" -eq 1 ] ||
           FASA_TIMEOUT_MS=2000 "$client" ping --server "$endpoint" >/dev/null 2>&1; then
            if [ "$no_ping" -eq 1 ]; then
                echo "fasa-server: $n rank(s) listening on $endpoint (CURVE; not pinged: no FASA_CURVE_CLIENT_SECRET)"
            else
                echo "fasa-server: $n rank(s) answering on $endpoint"
            fi
            echo "endpoint: $endpoint"
            echo "pid file: $pid_file (launcher $launcher_pid_file, log $log)"
            exit 0
        fi
    fi
    sleep 0.1
done
echo "run-local: fasa-server did not answer within $start_timeout s; see $log" >&2
[ "$curve" -eq 1 ] && echo "run-local: (CURVE is on: FASA_CURVE_SERVER_KEY and FASA_CURVE_CLIENT_SECRET must name the server's public key and an authorised client's secret key)" >&2
exit 1

#!/usr/bin/env bash
# Stops the fasa-server started by deploy/run-local.sh: SIGTERM to the coordinator (rank 0),
# which tells every worker rank to stop and finalises MPI; then waits until the launcher and
# every rank are gone (escalating to SIGTERM on the launcher and SIGKILL after 20 s).
#
#   deploy/stop-local.sh [--run-dir DIR]      (default FASA_RUN_DIR or /tmp/fasa-local)
set -euo pipefail
run_dir=${FASA_RUN_DIR:-/tmp/fasa-local}
while [ $# -gt 0 ]; do
    case "$1" in
        --run-dir) run_dir=${2:?--run-dir needs a directory}; shift 2 ;;
        -h|--help) sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "stop-local: unknown option '$1'" >&2; exit 2 ;;
    esac
done
pid_file=$run_dir/fasa-server.pid
launcher_pid_file=$run_dir/launcher.pid
if [ ! -f "$launcher_pid_file" ]; then
    echo "stop-local: no server recorded in $run_dir" >&2
    exit 1
fi
launcher=$(cat "$launcher_pid_file")
# Every process of the job: the launcher and its children (the ranks).
pids=("$launcher")
if command -v pgrep >/dev/null; then
    while read -r p; do [ -n "$p" ] && pids+=("$p"); done < <(pgrep -P "$launcher" || true)
fi
alive() { for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && return 0; done; return 1; }

if [ -f "$pid_file" ]; then
    kill -TERM "$(cat "$pid_file")" 2>/dev/null || true
else
    kill -TERM "$launcher" 2>/dev/null || true
fi
for i in $(seq 1 200); do
    alive || break
    [ "$i" -eq 100 ] && kill -TERM "$launcher" 2>/dev/null || true
    sleep 0.1
done
if alive; then
    echo "stop-local: still running after 20 s; killing ${pids[*]}" >&2
    kill -KILL "${pids[@]}" 2>/dev/null || true
    sleep 0.5
fi
rm -f "$launcher_pid_file" "$pid_file" "$run_dir/endpoint"
echo "fasa-server stopped (${#pids[@]} process(es) gone)"

#!/usr/bin/env bash
# Issue 20's figures in one run, each printed with its target (bench/README.md "Decode
# latency"): starts loopback fasa-servers, runs `fasa bench latency` through a 1- and a
# 2-worker server at 1K, 4K and 16K tokens (targets at 4K: overhead p50 <= 150 us and p99
# <= 400 us with 1 worker, p50 <= 200 us with 2), the same over ipc://, the waiting
# policies compared at 4K tokens (worker/worker_mpi_wire.h: sleep at once; a fixed 50 us
# spin, the default before the adaptive window; the default, 50 us or as long as the
# recent waits took up to FASA_SPIN_MAX_US while ranks <= CPUs; FASA_SPIN_GAP=1, the
# worker's spin through the gap between commands even without a CPU to spare; a fixed
# 1000 us spin; busy-poll), each with 1 and 2 workers,
# `fasa ppl --server` against embedded on stories260K over 512 tokens (target: within
# 2x; also over ipc:// with 1 worker), and the CPU each rank of both servers burns while
# idle.
#   bench/latency_run.sh [OUT_DIR]   (default: a temporary directory; JSON and logs there)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$(mktemp -d)}
mkdir -p "$out"
source "$root/bench/local_servers.sh"
fasa=$FASA_BUILD/fasa
model=${FASA_SHARED_DIR:-$root/../shared}/data/models/stories260K
echo "== fasa bench latency: results in $out"

start_server 2
e1=$SERVER_ENDPOINT
start_server 3
e2=$SERVER_ENDPOINT
"$fasa" bench latency --server "$e1" --server "$e2" --json "$out/latency.json" |
    tee "$out/latency.txt"

echo "== over ipc:// (1 worker)"
d=$(mktemp -d)
_server_dirs+=("$d")
bash "$root/deploy/run-local.sh" 2 --bind "ipc://$d/fasa.sock" --run-dir "$d" >&2
"$fasa" bench latency --server "ipc://$d/fasa.sock" --tokens 4096 --steps 32 \
    --json "$out/latency-ipc.json" | tee "$out/latency-ipc.txt"

echo "== waiting policies at 4096 tokens, fasa (one server each; overhead = server - embedded)"
export root
policies=("FASA_SPIN_US=0 FASA_SPIN_MAX_US=0" "FASA_SPIN_US=50 FASA_SPIN_MAX_US=0" "default"
          "FASA_SPIN_GAP=1" "FASA_SPIN_US=1000 FASA_SPIN_MAX_US=0" "FASA_SPIN_US=10000000")
for i in "${!policies[@]}"; do
    pol=${policies[$i]}
    for n in 2 3; do
        env $([ "$pol" = default ] || echo "$pol") bash -c "source '$root/bench/local_servers.sh'; start_server $n;
            '$fasa' bench latency --server \"\$SERVER_ENDPOINT\" --tokens 4096 --steps 32 \
                --methods fasa --json '$out/policy-$i-$n.json'" > "$out/policy-$i-$n.txt" 2>&1 ||
            { echo "$pol, $((n - 1)) worker(s): failed (see $out/policy-$i-$n.txt)"; continue; }
        grep -E 'overhead \(' "$out/policy-$i-$n.txt" | sed "s|^ *|$pol, $((n - 1)) worker(s): |"
    done
done
if [ -f "$model/stories260K.bin" ]; then
    echo "== fasa ppl, stories260K, 512 tokens, dense, best of 3 runs: embedded against the 1- and 2-worker server"
    args=(--model "$model/stories260K.bin" --tokenizer "$model/tok512.bin"
          --text "$root/README.md" --tokens 512 --method dense)
    t() { local s; s=$(date +%s%N); "$fasa" ppl "${args[@]}" "$@" > /dev/null; echo $(( ($(date +%s%N) - s) / 1000000 )); }
    best3() { local a b c; a=$(t "$@"); b=$(t "$@"); c=$(t "$@"); printf '%s\n' "$a" "$b" "$c" | sort -n | head -1; }
    te=$(best3); t1=$(best3 --server "$e1"); t2=$(best3 --server "$e2")
    ti=$(best3 --server "ipc://$d/fasa.sock")
    awk -v e="$te" -v a="$t1" -v b="$t2" 'BEGIN { e /= 1000; a /= 1000; b /= 1000;
        printf "ppl embedded %.2f s; 1 worker %.2f s (%.1fx, target <= 2x: %s); 2 workers %.2f s (%.1fx, target <= 2x: %s)\n",
            e, a, a / e, a / e <= 2 ? "met" : "NOT met", b, b / e, b / e <= 2 ? "met" : "NOT met" }'
    awk -v e="$te" -v a="$ti" 'BEGIN { printf "ppl over ipc://, 1 worker: %.2f s (%.1fx)\n", a / 1000, a / e }'
fi

echo "== idle CPU: every rank of the 1- and the 2-worker server over 5 s without requests"
pids=$(for i in 0 1; do pgrep -P "$(cat "${_server_dirs[$i]}/launcher.pid")"; done | tr '\n' ' ')
cpu() { for p in $pids; do awk '{ s += $14 + $15 } END { printf "%d ", s }' "/proc/$p/stat"; done; }
sleep 1
before=$(cpu); sleep 5; after=$(cpu)
hz=$(getconf CLK_TCK)
paste -d' ' <(echo "$before" | tr ' ' '\n') <(echo "$after" | tr ' ' '\n') | grep . |
    awk -v hz="$hz" '{ printf "%s rank %d: %.1f%% of a core idle\n", NR <= 2 ? "1-worker server" : "2-worker server",
        NR <= 2 ? NR - 1 : NR - 3, 100 * ($2 - $1) / hz / 5 }'

#!/usr/bin/env bash
# The performance model (bench/perfmodel.py) end to end, in one run: measures its inputs on
# this machine, validates it against fasa-servers with 1, 2 and 3 workers here and against
# the 16-core device log (bench/results/device-h200-16core.log), then predicts 10M tokens of
# Llama-3.1-8B geometry (32 layers, 8 KV heads, 32 query heads, d128, f16) on 16 nodes of
# 300 GB/s memory and 100 Gb/s network, exact and local merge.
#   bench/perfmodel_run.sh [--tokens N] [--out DIR]
# Default 256K tokens (f16: 1 GiB of K and V per session). Needs a built tree ($FASA_BUILD,
# default build/). Every figure goes to DIR (default a new temporary directory) as JSON.
# The servers' workers run one thread each (FASA_THREADS=1), as the embedded inputs do; the
# model counts rank 0 as a rank of the first node that takes a core of its own.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
tokens=256K out=
while [ $# -gt 0 ]; do
    case "$1" in
    -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --tokens) tokens=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "perfmodel_run.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
out=${out:-$(mktemp -d)}
mkdir -p "$out"
source "$root/bench/local_servers.sh"
B=$FASA_BUILD
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
export OPENBLAS_NUM_THREADS=1 FASA_THREADS=1
echo "== inputs (this machine; $(nproc) cores, load average $(cut -d' ' -f1 /proc/loadavg))"
"$B/fasa" bench attend --tokens "$tokens" --dtype f16 --methods fasa --threads 1 --reps 5 \
    --json "$out/attend.json" | grep -E "attend:|fasa "
# The same on every core at once: a thread's scan rate while the node's other cores scan too.
"$B/fasa" bench attend --tokens "$tokens" --dtype f16 --methods fasa --threads "$(nproc)" --reps 5 \
    --json "$out/attend-mt.json" | grep -E "fasa "
mpirun -n 4 "$B/bench/pingpong" --json "$out/pingpong.json"
"$B/bench/merge_cost" --json "$out/merge_cost.json"
# Bulk load per worker and the service's round trip, on a 1-worker server.
data=$(mktemp -d)
trap '_stop_servers; rm -rf "$data"' EXIT
"$B/bench/gen_load" --out "$data/kv" --tokens 8192 --layers 2 --kv-heads 8 --head-dim 128 --f16
start_server 2 -- --load-root "$data"
E=$SERVER_ENDPOINT
"$B/fasa" create --server "$E" --session m --layers 2 --heads 32 --kv-heads 8 --head-dim 128 \
    --dtype f16 >/dev/null
lo=$("$B/fasa" load --server "$E" --session m --from kv)
echo "$lo" | head -1
load_gbs=$(echo "$lo" | head -1 | sed -E 's/.* ([0-9.]+) GB\/s read.*/\1/')
rt=$("$B/fasa" ping --server "$E" | sed -E 's/.*round trip ([0-9.]+) ms.*/\1/')
st=$("$B/fasa" stats --server "$E" --session m)
alloc=$(echo "$st" | grep -oE 'alloc[a-z_]* [0-9]+' | head -1 | grep -oE '[0-9]+$' || true)
kvb=$(echo "$st" | grep -oE 'kv_bytes [0-9]+' | head -1 | grep -oE '[0-9]+$' || true)
ratio=$(awk -v a="${alloc:-0}" -v k="${kvb:-0}" 'BEGIN { print (a > 0 && k > 0) ? a / k : 1 }')
echo "{\"load_gbs_per_worker\": $load_gbs, \"service_ms\": $rt, \"alloc_over_kv\": $ratio}" \
    >"$out/ingest.json"
cat "$out/ingest.json"
_stop_servers
_server_dirs=()
echo "== validation here: 1, 2 and 3 workers, $tokens tokens f16 (server round trips)"
eps=()
for ranks in 2 3 4; do
    start_server "$ranks"
    eps+=("$SERVER_ENDPOINT")
done
"$B/fasa" bench attend --server "$(IFS=,; echo "${eps[*]}")" --tokens "$tokens" --dtype f16 \
    --methods fasa --reps 5 --json "$out/servers.json" | grep -E "fasa "
python3 - "$out" "$(nproc)" "${FASA_THREADS:-}" <<'PY'
import json, sys
out, cores = sys.argv[1], int(sys.argv[2])
runs = json.load(open(f"{out}/servers.json"))["runs"][-3:]
# A server's workers each run FASA_THREADS, else as many threads as this machine's CPUs.
threads = int(sys.argv[3]) if len(sys.argv) > 3 and sys.argv[3] else cores
pts = [{"name": f"here-{w}w", "tokens": r["tokens"], "workers": w, "cores": cores,
        "threads": threads, "dtype_bytes": 2, "measured_ms": r["fasa_ms"]}
       for w, r in zip((1, 2, 3), runs)]
json.dump(pts, open(f"{out}/points-here.json", "w"), indent=1)
PY
_stop_servers
_server_dirs=()
M="python3 $root/bench/perfmodel.py"
MC="--merge-cost $out/merge_cost.json"
$M validate $MC --attend "$out/attend.json" --attend-mt "$out/attend-mt.json" \
    --pingpong "$out/pingpong.json" --ingest "$out/ingest.json" --points "$out/points-here.json"
# The device run's workers scanned on one thread each (its commit predates the threaded
# shard: its 1-worker step, 257 ms, is the 1-thread scan's 194 ms plus the rest).
echo "== validation on the device log (16 cores, 1M tokens f32, 1..16 workers, 1 thread each)"
cat >"$out/points-device.json" <<'JS'
[{"name": "device-1w", "tokens": 1048576, "workers": 1, "cores": 16, "dtype_bytes": 4, "measured_ms": 257.32},
 {"name": "device-2w", "tokens": 1048576, "workers": 2, "cores": 16, "dtype_bytes": 4, "measured_ms": 129.30},
 {"name": "device-4w", "tokens": 1048576, "workers": 4, "cores": 16, "dtype_bytes": 4, "measured_ms": 67.96},
 {"name": "device-8w", "tokens": 1048576, "workers": 8, "cores": 16, "dtype_bytes": 4, "measured_ms": 43.30},
 {"name": "device-16w", "tokens": 1048576, "workers": 16, "cores": 16, "dtype_bytes": 4, "measured_ms": 31.59}]
JS
echo '{"service_ms": 0.592}' >"$out/ingest-device.json"
$M validate $MC --attend "$root/bench/results/device-h200-16core-model.json" --split-like "$out/attend.json" \
    --pingpong "$out/pingpong.json" --ingest "$out/ingest-device.json" --points "$out/points-device.json"
echo "== prediction: 10M tokens, Llama-3.1-8B geometry, f16, 16 nodes x 300 GB/s, 100 Gb/s"
# A shard uses at most n_kv_heads (8) threads: a node's cores go to cores / 8 workers.
for cores in 16 64; do
    echo "-- per-thread rates of the device (16-core Xeon); $cores cores per node: $((cores / 8)) workers x 8 threads"
    $M predict $MC --attend "$root/bench/results/device-h200-16core-model.json" --split-like "$out/attend.json" \
        --pingpong "$out/pingpong.json" --ingest "$out/ingest.json" --tokens 10e6 --layers 32 \
        --nodes 16 --workers-per-node $((cores / 8)) --threads 8 --cores "$cores" --mem-gbs 300 \
        --net-gbps 100 --dtype-bytes 2 --json "$out/predict-$cores.json"
done
echo "figures in $out"

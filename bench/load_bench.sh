#!/usr/bin/env bash
# Bulk load (fasa load) against the file read bandwidth per worker, in one run: writes a
# load directory (bench/gen_load: k_L.npy, v_L.npy per layer), then for 1 and 2 workers
# starts a fasa-server with --load-root on it and runs, on a fresh empty session each time,
#   fasa load --check-only (a warm-up: the files in the page cache),
#   fasa load --check-only (the read bandwidth: every worker reads and checks its blocks,
#                           storing nothing),
#   fasa load              (a first load into memory the workers never held: on a virtual
#                           machine whose memory is touched for the first time this costs
#                           what the host takes to back the pages, printed as "cold"),
#   fasa drop, fasa load   (the load, into memory the workers held before),
# and prints per worker: its read GB/s (its bytes over the check-only pass), its load GB/s
# (its bytes over the load) and their ratio (target >= 0.7), its file reads alone (the
# seconds its reader spent in pread), and the whole load's GB/s, cold and warm. Then
# bench/load_rows (the same worker path in process, shard 0 of 1 and of 2) for the parts:
# file read, store from memory, check-only pass and load.
#   bench/load_bench.sh [--tokens T] [--layers L] [--kv-heads K] [--head-dim D] [--f32]
# Defaults: 16384 tokens, 4 layers, 8 KV heads, head_dim 128, float16 files into an f16
# session (268 MB of K and V). Both passes read from the page cache here (a local disk): on
# a cluster filesystem the read bandwidth is the filesystem's.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
T=16384 L=4 K=8 D=128 F16=--f16 DT=f16
while [ $# -gt 0 ]; do
    case "$1" in
    -h|--help) sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --tokens) T=$2; shift 2 ;;
    --layers) L=$2; shift 2 ;;
    --kv-heads) K=$2; shift 2 ;;
    --head-dim) D=$2; shift 2 ;;
    --f32) F16= DT=f32; shift ;;
    *) echo "load_bench.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
source "$root/bench/local_servers.sh"
data=$(mktemp -d)
trap '_stop_servers; rm -rf "$data"' EXIT
"$FASA_BUILD/bench/gen_load" --out "$data/kv" --tokens "$T" --layers "$L" --kv-heads "$K" \
    --head-dim "$D" $F16
echo "load directory: $T tokens x $L layers x $K KV heads x head_dim $D, $DT, $(du -sm "$data/kv" | cut -f1) MB"
for ranks in 2 3; do
    start_server "$ranks" -- --load-root "$data"
    E=$SERVER_ENDPOINT
    run() { # run SESSION [--check-only]: a fresh session, loaded
        "$FASA_BUILD/fasa" create --server "$E" --session "$1" --layers "$L" --heads "$K" \
            --kv-heads "$K" --head-dim "$D" --dtype "$DT" >/dev/null
        "$FASA_BUILD/fasa" load --server "$E" --session "$1" --from kv ${2:-}
    }
    run warm --check-only >/dev/null
    read_out=$(run read --check-only)
    cold_out=$(run cold)
    "$FASA_BUILD/fasa" drop --server "$E" --session cold >/dev/null
    load_out=$(run load)
    echo "-- $((ranks - 1)) worker(s)"
    echo "$cold_out" | head -1 | sed 's/^/  cold: /'
    echo "$load_out" | head -1 | sed 's/^/  /'
    echo "$load_out" | tail -n +2 | sed -E 's/.*shard ([0-9]+):.* file reads ([0-9.]+) s \(([0-9.]+) GB\/s\).*/  worker \1: file reads alone \2 s (\3 GB\/s)/'
    # Per worker: bytes and the two passes' wall times (the whole pass, at the coordinator).
    rs=$(echo "$read_out" | head -1 | sed -E 's/.* ([0-9.]+) s: .*/\1/')
    ls=$(echo "$load_out" | head -1 | sed -E 's/.* ([0-9.]+) s: .*/\1/')
    paste <(echo "$read_out" | tail -n +2) <(echo "$load_out" | tail -n +2) |
        awk -v rs="$rs" -v ls="$ls" '{
            for (i = 1; i <= NF; i++) if ($i == "MB" && !mb) mb = $(i - 1)
            sub(/:$/, "", $2)
            r = mb / 1000 / rs; l = mb / 1000 / ls
            printf "  worker %s: %.1f MB; read %.3f GB/s (check-only pass %.3f s), load %.3f GB/s (%.3f s): load/read %.2f (target >= 0.7: %s)\n",
                $2, mb, r, rs, l, ls, l / r, ((l / r >= 0.7) ? "met" : "not met")
            mb = 0
        }'
    _stop_servers
    _server_dirs=()
done
echo "-- the worker path in process (bench/load_rows), median of 5"
for S in 1 2; do
    "$FASA_BUILD/bench/load_rows" --from "$data/kv" --layers "$L" --kv-heads "$K" --head-dim "$D" \
        --dtype "$DT" --shards "$S" --no-naive | sed 's/^/  /'
done

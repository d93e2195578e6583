#!/usr/bin/env bash
# Recall of the exact top-B and output error against dense attention on the recorded
# stories260K activations: fasa (per-head and shared GQA) and oracle, for several budgets.
# usage: bench/stories_table.sh [FASA_BINARY] [SHARED_DIR]
set -euo pipefail
fasa=${1:-build/fasa}
shared=${2:-../shared}
dump=$shared/data/models/stories260K/golden/tinystories_T2048.qkv
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
$fasa calibrate --qkv "$dump" --ntip 2 --window 32 --out "$tmp/per-head.profile" >/dev/null
$fasa calibrate --qkv "$dump" --ntip 2 --window 32 --gqa shared --out "$tmp/shared.profile" >/dev/null
echo "stories260K, calibrated ntip 2 of 4 FCs, window 32, on positions 0:2048; decode positions 1024:2048:64"
echo "recall = share of the exact top-B found (mean over heads and positions); err = mean relative L2 error vs dense"
echo "layer 0 is dense under fasa (as in the reference code); oracle is sparse in every layer"
echo
printf '| method | B |'; for l in 0 1 2 3 4; do printf ' L%d recall | L%d err |' $l $l; done; echo
printf '|---|---|'; for l in 0 1 2 3 4; do printf -- '---|---|'; done; echo
for B in 16 32 64 128; do
    for m in fasa:per-head fasa:shared oracle:per-head; do
        method=${m%%:*} gqa=${m##*:}
        name=$method
        [ "$method" = fasa ] && name="fasa ($gqa)"
        $fasa replay --qkv "$dump" --method "$method" --budget "$B" --gqa "$gqa" \
            --profile "$tmp/$gqa.profile" --positions 1024:2048:64 --out "$tmp/o.npy" --compare >"$tmp/r.txt"
        printf '| %s | %d |' "$name" "$B"
        awk '$1 ~ /^[0-9]+$/ { printf " %.3f | %.3f |", $3, $4 }' "$tmp/r.txt"
        echo
    done
done

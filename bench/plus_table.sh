#!/usr/bin/env bash
# fasa-plus against every method at equal budget on real stories260K data: mean relative
# output error against dense (layers 1-4, positions 1024:2048:4, 'fasa replay --compare'),
# recall of the exact top-B, KV bytes read per step (the engine's bytes_read, per layer),
# and over a 1024-token decode 'fasa ppl --vs-dense': perplexity, mean KL from dense and
# top-1 agreement. Every method runs sparse in every layer (--dense-layers none).
# Profiles are calibrated on the TinyStories head (the golden dump's text); fasa-plus's
# settings were chosen on that dump only. Held out: the body of Alice, GPL-3, and the
# second half of the TinyStories file.
#
# usage: bash bench/plus_table.sh [--out DIR (default build/plus-table)] [--quick]
#   --quick: B 16, 32 and 64, the Alice dump only, no perplexity
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=$root/build/plus-table
quick=0
while [ $# -gt 0 ]; do
    case "$1" in
    --out) out=$2; shift 2 ;;
    --quick) quick=1; shift ;;
    -h | --help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "plus_table: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
fasa=$root/build/fasa
record=$root/build/bench/record_qkv
shared=$root/../shared
M=$shared/data/models/stories260K
for f in "$fasa" "$record" "$M/stories260K.bin" "$M/golden/tinystories_T2048.qkv"; do
    [ -r "$f" ] || { echo "plus_table: $f is missing (build first)" >&2; exit 2; }
done
mkdir -p "$out"
tail -c +574 "$shared/data/text/alice_in_wonderland_pg11.txt" >"$out/alice.txt"
tail -c +100001 "$shared/data/text/tinystories_train_head.txt" >"$out/ts_tail.txt"
cp /usr/share/common-licenses/GPL-3 "$out/gpl.txt"
cp "$M/golden/tinystories_T2048.qkv" "$out/ts_head.qkv"
chmod u+w "$out/ts_head.qkv"
texts="alice gpl ts_tail"
[ $quick = 1 ] && texts=alice
for x in $texts; do
    [ -s "$out/$x.qkv" ] || "$record" --model "$M/stories260K.bin" --tokenizer "$M/tok512.bin" \
        --text "$out/$x.txt" --tokens 2048 --out "$out/$x.qkv" >/dev/null
done
for n in 1 2; do
    "$fasa" calibrate --qkv "$out/ts_head.qkv" --ntip $n --window 32 --out "$out/p$n.profile" >/dev/null
done
budgets="16 32 64 128"
[ $quick = 1 ] && budgets="16 32 64"
methods="fasa fasa-plus sparq stream quest oracle"
# replay: mean over layers 1-4 of rel_err_mean and recall, and the bytes per step
replay() { # dump ntip method B
    "$fasa" replay --qkv "$out/$1.qkv" --profile "$out/p$2.profile" --method "$3" --budget "$4" \
        --positions 1024:2048:4 --dense-layers none --compare --out "$out/o.npy" 2>/dev/null |
        awk '$1 ~ /^[1-4]$/ { r += $3; e += $4; b += $6; n++ }
             END { printf "%.4f %.3f %.0f", e / n, r / n, b / n }'
}
ppl() { # text ntip method B
    "$fasa" ppl --model "$M/stories260K.bin" --tokenizer "$M/tok512.bin" --text "$out/$1.txt" \
        --tokens 1024 --profile "$out/p$2.profile" --method "$3" --budget "$4" \
        --dense-layers none --vs-dense 2>/dev/null |
        awk '/^perplexity/ { p = $2 } /^vs dense/ { k = $5; a = $10 } END { printf "%.3f %.4f %.3f", p, k, a }'
}
echo "| data | ntip | B | method | out err | recall | bytes/step | ppl | KL | top-1 |"
echo "|---|---|---|---|---|---|---|---|---|---|"
first=ts_head; [ $quick = 1 ] && first=
for x in $first $texts; do
    for n in 1 2; do
        for B in $budgets; do
            for m in $methods; do
                read -r e r b <<<"$(replay $x $n $m $B)"
                p="-" k="-" a="-"
                if [ $quick = 0 ] && [ $x != ts_head ]; then read -r p k a <<<"$(ppl $x $n $m $B)"; fi
                tag=$x; [ $x = ts_head ] && tag="ts_head (tuned)"
                echo "| $tag | $n | $B | $m | $e | $r | $b | $p | $k | $a |"
            done
        done
    done
done

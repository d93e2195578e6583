#!/usr/bin/env bash
# fasa-plus against every method at equal budget. On real stories260K data: mean relative
# output error against dense (layers 1-4, positions 1024:2048:4, 'fasa replay --compare'),
# recall of the exact top-B, KV bytes read per step (the engine's bytes_read, one layer),
# and over a 1024-token decode 'fasa ppl --vs-dense': perplexity, mean KL from dense and
# top-1 agreement. Every method runs sparse in every layer (--dense-layers none). Profiles
# are calibrated on the TinyStories head (the golden dump's text); fasa-plus's settings
# were chosen on that dump only ("ts_head (tuned)" rows). Held out: the body of Alice
# (alice), GPL-3 (gpl) and the second half of the TinyStories file (ts_tail). Then the
# synthetic d128 stream (bench/synth_qkv.c: 32 heads, 8 KV heads, 16 real signal FCs per
# head, 8192 tokens, calibrated on itself; positions 6144:8192:128), never tuned on.
#
# usage: bash bench/plus_table.sh [--out DIR (default build/plus-table)] [--texts "alice gpl ts_tail"]
#                                 [--budgets "16 32 64 128"] [--no-ppl] [--no-synth] [--no-tuned]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=$root/build/plus-table
texts="alice gpl ts_tail"
budgets="16 32 64 128"
do_ppl=1 do_synth=1 do_tuned=1
while [ $# -gt 0 ]; do
    case "$1" in
    --out) out=$2; shift 2 ;;
    --texts) texts=$2; shift 2 ;;
    --budgets) budgets=$2; shift 2 ;;
    --no-ppl) do_ppl=0; shift ;;
    --no-synth) do_synth=0; shift ;;
    --no-tuned) do_tuned=0; shift ;;
    -h | --help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "plus_table: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
fasa=$root/build/fasa
record=$root/build/bench/record_qkv
synth=$root/build/bench/synth_qkv
shared=$root/../shared
M=$shared/data/models/stories260K
for f in "$fasa" "$record" "$synth" "$M/stories260K.bin" "$M/golden/tinystories_T2048.qkv"; do
    [ -r "$f" ] || { echo "plus_table: $f is missing (build first)" >&2; exit 2; }
done
mkdir -p "$out"
tail -c +574 "$shared/data/text/alice_in_wonderland_pg11.txt" >"$out/alice.txt"
tail -c +100001 "$shared/data/text/tinystories_train_head.txt" >"$out/ts_tail.txt"
cp /usr/share/common-licenses/GPL-3 "$out/gpl.txt"
[ -s "$out/ts_head.qkv" ] || cp "$M/golden/tinystories_T2048.qkv" "$out/ts_head.qkv"
for x in $texts; do
    [ -s "$out/$x.qkv" ] || "$record" --model "$M/stories260K.bin" --tokenizer "$M/tok512.bin" \
        --text "$out/$x.txt" --tokens 2048 --out "$out/$x.qkv" >/dev/null
done
for n in 1 2; do
    "$fasa" calibrate --qkv "$out/ts_head.qkv" --ntip $n --window 32 --out "$out/p$n.profile" >/dev/null
done
methods="fasa fasa-plus sparq stream quest oracle"
replay() { # dump profile method B positions first-layer -> err recall bytes (mean over layers)
    "$fasa" replay --qkv "$out/$1.qkv" --profile "$2" --method "$3" --budget "$4" \
        --positions "$5" --dense-layers none --compare --out "$out/o.npy" 2>/dev/null |
        awk -v l0="$6" '$1 ~ /^[0-9]+$/ && $1 >= l0 && NF >= 6 { r += $3; e += $4; b += $6; n++ }
             END { printf "%.4f %.3f %.0f", e / n, r / n, b / n }'
}
ppl() { # text ntip method B -> ppl KL top-1
    "$fasa" ppl --model "$M/stories260K.bin" --tokenizer "$M/tok512.bin" --text "$out/$1.txt" \
        --tokens 1024 --profile "$out/p$2.profile" --method "$3" --budget "$4" \
        --dense-layers none --vs-dense 2>/dev/null |
        awk '/^perplexity/ { p = $2 } /^vs dense/ { k = $5; a = $9 } END { printf "%.3f %.4f %.3f", p, k, a }'
}
echo "| data | ntip | B | method | out err | recall | bytes/step | ppl (1024 tok) | KL | top-1 |"
echo "|---|---|---|---|---|---|---|---|---|---|"
first=ts_head
[ $do_tuned = 1 ] || first=
for x in $first $texts; do
    for n in 1 2; do
        for B in $budgets; do
            for m in $methods; do
                read -r e r b <<<"$(replay $x "$out/p$n.profile" $m $B 1024:2048:4 1)"
                p="-" k="-" a="-"
                if [ $do_ppl = 1 ] && [ $x != ts_head ]; then read -r p k a <<<"$(ppl $x $n $m $B)"; fi
                tag=$x
                [ $x = ts_head ] && tag="ts_head (tuned)"
                echo "| $tag | $n | $B | $m | $e | $r | $b | $p | $k | $a |"
            done
        done
    done
done
if [ $do_synth = 1 ]; then
    [ -s "$out/synth.qkv" ] || "$synth" --tokens 8192 --out "$out/synth.qkv"
    for n in 8 16; do
        "$fasa" calibrate --qkv "$out/synth.qkv" --ntip $n --window 128 --positions 4096:8192:256 \
            --out "$out/s$n.profile" >/dev/null
        for B in $budgets; do
            for m in $methods; do
                read -r e r b <<<"$(replay synth "$out/s$n.profile" $m $B 6144:8192:128 0)"
                echo "| synth d128 | $n | $B | $m | $e | $r | $b | - | - | - |"
            done
        done
    done
fi

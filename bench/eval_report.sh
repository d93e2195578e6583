#!/usr/bin/env bash
# The evaluation report on a real model (stories260K): calibrate on one text, evaluate on
# another the calibration never saw; perplexity, recall of the exact top-B and output error
# against budget for every method, ntip 1 and 2, both GQA modes, both FC pairings.
# Writes OUT/report.md (and OUT/recall.png, OUT/ppl.png where gnuplot is installed).
#
# usage: bash bench/eval_report.sh [--out DIR (default build/eval-report)] [--jobs N (default 2)]
#                                  [--fasa BIN] [--record BIN] [--shared DIR]
# See bench/README.md for what every number means.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
out=$root/build/eval-report
jobs=2
fasa=$root/build/fasa
record=$root/build/bench/record_qkv
shared=$root/../shared
while [ $# -gt 0 ]; do
    case "$1" in
    --out) out=$2; shift 2 ;;
    --jobs) jobs=$2; shift 2 ;;
    --fasa) fasa=$2; shift 2 ;;
    --record) record=$2; shift 2 ;;
    --shared) shared=$2; shift 2 ;;
    -h | --help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "eval_report: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
for b in "$fasa" "$record"; do
    [ -x "$b" ] || { echo "eval_report: $b is missing: build first (cmake --build build)" >&2; exit 2; }
done
model=$shared/data/models/stories260K/stories260K.bin
tok=$shared/data/models/stories260K/tok512.bin
calib_text=$shared/data/text/tinystories_train_head.txt
alice=$shared/data/text/alice_in_wonderland_pg11.txt
for f in "$model" "$tok" "$calib_text" "$alice"; do
    [ -r "$f" ] || { echo "eval_report: cannot read $f (--shared DIR)" >&2; exit 2; }
done

T=2048                     # tokens of each dump
BUDGETS="16 32 64 128 256"
WINDOW=32                  # calibration agreement window
POS_512=256:512            # decode positions scored for the 512-token table (every one)
POS_2048=256:2048:4        # ... and for the 2048-token table (every 4th)

mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$out/work
rm -rf "$work/res" "$work/prof"
mkdir -p "$work/res" "$work/prof"
start=$(date +%s)
say() { printf '[%4ds] %s\n' $(($(date +%s) - start)) "$*"; }

# Runs "$@" in the background with at most $jobs at once; stdout to res/KEY.txt.
failed=0
task() {
    local key=$1
    shift
    while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n || failed=1; done
    ("$@" >"$work/res/$key.txt" 2>"$work/res/$key.err" || {
        echo "eval_report: FAILED $key: $(tail -n 1 "$work/res/$key.err")" >&2
        touch "$work/res/$key.failed"
        exit 1
    }) &
}
# Waits for every task; a task's failure is also recorded in a file, so none can be missed
# whatever order the waits see them in.
drain() {
    while [ "$(jobs -rp | wc -l)" -gt 0 ]; do wait -n || failed=1; done
    wait || failed=1
    if compgen -G "$work/res/*.failed" >/dev/null; then failed=1; fi
}

# 1. The texts and the activation dumps.
# Held out: the body of Alice in Wonderland (from "CHAPTER I." at byte 573: the Gutenberg
# title page and table of contents before it are not prose).
tail -c +574 "$alice" >"$work/heldout.txt"
say "recording $T-token dumps (calibration: TinyStories head; held out: Alice body)"
"$record" --model "$model" --tokenizer "$tok" --text "$calib_text" --tokens $T \
    --out "$work/calib.qkv" >/dev/null
"$record" --model "$model" --tokenizer "$tok" --text "$work/heldout.txt" --tokens $T \
    --out "$work/heldout.qkv" >/dev/null

# 2. Profiles: ntip x gqa x pairing, calibrated on the TinyStories dump only.
say "calibrating 8 profiles (ntip 1,2 x gqa per-head,shared x pairing interleaved,half)"
for n in 1 2; do
    for g in per-head shared; do
        for p in interleaved half; do
            task "cal_${n}_${g}_${p}" "$fasa" calibrate --qkv "$work/calib.qkv" --ntip $n \
                --window $WINDOW --gqa $g --pairing $p --out "$work/prof/${n}_${g}_${p}.profile"
        done
    done
done
drain
[ $failed = 0 ] || exit 1

# 3. The rows: id|label|method|gqa|profile|dense layers|replay|ppl
# Every fasa row runs sparse in every layer (--dense-layers none), as every baseline does;
# "fasa-l0" keeps layer 0 dense (fasa's default) and is reported for perplexity only.
rows=()
for n in 1 2; do
    for g in per-head shared; do
        for p in interleaved half; do
            ppl=yes # half profiles too: 'fasa ppl' takes the pairing from the profile
            rows+=("fasa-$n-$g-$p|fasa ntip $n, $g, $p|fasa|$g|${n}_${g}_${p}|none|yes|$ppl")
        done
    done
done
rows+=("fasa-l0|fasa ntip 2, per-head, interleaved, layer 0 dense|fasa|per-head|2_per-head_interleaved||no|yes")
for g in per-head shared; do
    rows+=("oracle-$g|oracle (exact top-B), $g|oracle|$g|||yes|yes")
    rows+=("stream-$g|stream (8 sinks + recent), $g|stream|$g|||yes|yes")
    rows+=("quest-$g|quest (pages of 16), $g|quest|$g|||yes|yes")
done
rows+=("sparq-2|sparq r=2 (of 8 dims), per-head|sparq|per-head|||yes|yes")
rows+=("sparq-4|sparq r=4 (of 8 dims), per-head|sparq|per-head|2_per-head_interleaved||yes|yes")
for n in 1 2; do # ours (README "Our method: fasa-plus")
    rows+=("fasa-plus-$n|fasa-plus ntip $n, per-head (ours)|fasa-plus|per-head|${n}_per-head_interleaved|none|yes|yes")
done

args_for() { # row fields -> the method's arguments of replay / ppl, in $margs
    margs=(--method "$1" --gqa "$2")
    if [ -n "$3" ]; then margs+=(--profile "$work/prof/$3.profile"); fi
    if [ -n "$4" ]; then margs+=(--dense-layers "$4"); fi
}

n_replay=0 n_ppl=0
for r in "${rows[@]}"; do
    IFS='|' read -r id label method gqa prof dl rep ppl <<<"$r"
    [ "$rep" = yes ] && n_replay=$((n_replay + 2 * 5))
    [ "$ppl" = yes ] && n_ppl=$((n_ppl + 5))
done

# 4. Perplexity over the held-out text (one 2048-token decode gives both lengths: the
# 0-511 bucket is exactly a 512-token run, attention being causal).
say "perplexity: dense, the built-in reference, then $n_ppl sparse runs of $T tokens"
ppl_common=(--model "$model" --tokenizer "$tok" --text "$work/heldout.txt" --tokens "$T")
task ppl_dense "$fasa" ppl "${ppl_common[@]}" --method dense
task ppl_ref "$fasa" ppl "${ppl_common[@]}" --reference
i=0
for r in "${rows[@]}"; do
    IFS='|' read -r id label method gqa prof dl rep ppl <<<"$r"
    [ "$ppl" = yes ] || continue
    for B in $BUDGETS; do
        i=$((i + 1))
        args_for "$method" "$gqa" "$prof" "$dl"
        task "ppl_${id}_$B" "$fasa" ppl "${ppl_common[@]}" --budget "$B" "${margs[@]}" --vs-dense
    done
    say "  ppl $i/$n_ppl queued ($label)"
done
drain
[ $failed = 0 ] || exit 1

# 5. Recall of the exact top-B and relative output error (fasa replay --compare).
say "replay --compare: $n_replay runs (positions $POS_512 of 512, $POS_2048 of 2048)"
i=0
for r in "${rows[@]}"; do
    IFS='|' read -r id label method gqa prof dl rep ppl <<<"$r"
    [ "$rep" = yes ] || continue
    for len in 512 2048; do
        pos=$POS_512
        [ $len = 2048 ] && pos=$POS_2048
        for B in $BUDGETS; do
            i=$((i + 1))
            args_for "$method" "$gqa" "$prof" "$dl"
            task "rep_${len}_${id}_$B" "$fasa" replay --qkv "$work/heldout.qkv" --budget "$B" \
                --positions $pos --out "$work/res/rep_${len}_${id}_$B.npy" --compare "${margs[@]}"
        done
    done
    say "  replay $i/$n_replay queued ($label)"
done
# Calibration transfer: the same fasa rows replayed on the calibration text itself.
say "replay --compare on the calibration dump (in-sample): 10 runs"
for n in 1 2; do
    for B in $BUDGETS; do
        task "cal_rep_${n}_$B" "$fasa" replay --qkv "$work/calib.qkv" --budget "$B" \
            --positions $POS_2048 --out "$work/res/cal_rep_${n}_$B.npy" --compare --method fasa \
            --profile "$work/prof/${n}_per-head_interleaved.profile" --dense-layers none
    done
done
drain
[ $failed = 0 ] || exit 1
rm -f "$work"/res/*.npy

# 6. The report.
ppl_of() { # file bucket(all|512) -> perplexity
    if [ "$2" = all ]; then
        awk '$1 == "perplexity" { printf "%.2f", $2 }' "$1"
    else
        awk '$1 == "positions" && $2 == "0-511:" { printf "%.2f", $4 }' "$1"
    fi
}
kl_of() { # file -> mean KL from dense / top-1 agreement (fasa ppl --vs-dense)
    awk '$1 == "vs" && $2 == "dense:" { printf "%.4f / %.3f", $5, $9 }' "$1"
}
rec_of() { # file col(3 recall | 4 err | 6 bytes per step) -> mean over the layers
    awk -v c="$2" '$1 ~ /^[0-9]+$/ && NF >= 5 { s += $c; n++ } END { if (n) printf (c == 6 ? "%.0f" : "%.3f"), s / n }' "$1"
}
report=$out/report.md
{
    echo "# fasa evaluation report: stories260K"
    echo
    echo "Generated by \`bash bench/eval_report.sh\` on $(date -u '+%Y-%m-%d %H:%M UTC')."
    echo
    echo "- Model: stories260K (5 layers, 8 query heads, 4 KV heads, head_dim 8: 4 frequency"
    echo "  chunks (FCs) per head; RoPE pairs interleaved)."
    echo "- Calibration: the first $T tokens of \`tinystories_train_head.txt\` (window $WINDOW,"
    echo "  every position), one profile per ntip (1, 2), GQA mode (per-head, shared) and FC"
    echo "  pairing (interleaved = the model's RoPE pairs, half = dims i and i+4)."
    echo "- Held out: the body of Alice in Wonderland (\`alice_in_wonderland_pg11.txt\` from"
    echo "  \"CHAPTER I.\", byte 573), never seen by calibration; the first 512 and $T tokens."
    echo "- Perplexity: \`fasa ppl\` decoding the held-out text token by token with the method"
    echo "  doing every attention (positions 1..N-1 predicted). The 512 column is the 0-511"
    echo "  bucket of the $T-token decode, which equals a 512-token run. Half profiles group"
    echo "  dims i and i+4, which are not the model's RoPE pairs (FASA's reference code's grouping)."
    echo "- KL: \`fasa ppl --vs-dense\`: the mean KL(dense || method) of the next-token"
    echo "  distribution over the $T-token decode, and the share of positions whose argmax agrees."
    echo "- Recall: share of the exact top-B (per query head; per KV head under shared GQA)"
    echo "  that the method selected, and the mean relative L2 error of the attention output"
    echo "  against dense, from \`fasa replay --compare\` on the recorded held-out activations,"
    echo "  mean over all 5 layers, at positions $POS_512 (512 table) and $POS_2048 ($T"
    echo "  table): from position 256 on, so every B in the table really selects."
    echo "- Every method is sparse in every layer; \"layer 0 dense\" is fasa's default and shown"
    echo "  for perplexity only. sparq r=2 reads as many key dims per token as fasa ntip 1,"
    echo "  sparq r=4 as many as fasa ntip 2. Shared GQA: one token set per KV head (2 query"
    echo "  heads), so the oracle there is the best shared set, not the per-head top-B."
    echo
    echo "Dense attention (the reference row): perplexity $(ppl_of "$work/res/ppl_dense.txt" 512)"
    echo "over 512 tokens, $(ppl_of "$work/res/ppl_dense.txt" all) over $T tokens (the runner's"
    echo "built-in double-precision attention: $(ppl_of "$work/res/ppl_ref.txt" 512) and"
    echo "$(ppl_of "$work/res/ppl_ref.txt" all))."
    for len in 512 $T; do
        bucket=512
        [ "$len" = "$T" ] && bucket=all
        echo
        echo "## $len tokens of held-out text"
        echo
        echo "### Perplexity (dense: $(ppl_of "$work/res/ppl_dense.txt" $bucket))"
        echo
        printf '| method |'; for B in $BUDGETS; do printf ' B=%s |' "$B"; done; echo
        printf '|---|'; for B in $BUDGETS; do printf -- '---:|'; done; echo
        for r in "${rows[@]}"; do
            IFS='|' read -r id label method gqa prof dl rep ppl <<<"$r"
            [ "$ppl" = yes ] || continue
            printf '| %s |' "$label"
            for B in $BUDGETS; do printf ' %s |' "$(ppl_of "$work/res/ppl_${id}_$B.txt" $bucket)"; done
            echo
        done
        if [ "$len" = "$T" ]; then
            echo
            echo "### Mean KL divergence of the next-token distribution from dense's / top-1 agreement ($T tokens)"
            echo
            printf '| method |'; for B in $BUDGETS; do printf ' B=%s |' "$B"; done; echo
            printf '|---|'; for B in $BUDGETS; do printf -- '---:|'; done; echo
            for r in "${rows[@]}"; do
                IFS='|' read -r id label method gqa prof dl rep ppl <<<"$r"
                [ "$ppl" = yes ] || continue
                printf '| %s |' "$label"
                for B in $BUDGETS; do printf ' %s |' "$(kl_of "$work/res/ppl_${id}_$B.txt")"; done
                echo
            done
            echo
            echo "### KV bytes read per step (one layer, all heads; the engine's bytes_read)"
            echo
            printf '| method |'; for B in $BUDGETS; do printf ' B=%s |' "$B"; done; echo
            printf '|---|'; for B in $BUDGETS; do printf -- '---:|'; done; echo
            for r in "${rows[@]}"; do
                IFS='|' read -r id label method gqa prof dl rep ppl <<<"$r"
                [ "$rep" = yes ] || continue
                printf '| %s |' "$label"
                for B in $BUDGETS; do printf ' %s |' "$(rec_of "$work/res/rep_${len}_${id}_$B.txt" 6)"; done
                echo
            done
        fi
        echo
        echo "### Recall of the exact top-B / mean relative output error"
        echo
        printf '| method |'; for B in $BUDGETS; do printf ' B=%s |' "$B"; done; echo
        printf '|---|'; for B in $BUDGETS; do printf -- '---:|'; done; echo
        for r in "${rows[@]}"; do
            IFS='|' read -r id label method gqa prof dl rep ppl <<<"$r"
            [ "$rep" = yes ] || continue
            printf '| %s |' "$label"
            for B in $BUDGETS; do
                f=$work/res/rep_${len}_${id}_$B.txt
                printf ' %s / %s |' "$(rec_of "$f" 3)" "$(rec_of "$f" 4)"
            done
            echo
        done
    done
    echo
    echo "## Calibration transfer: in-sample against held out ($T tokens)"
    echo
    echo "Recall / mean relative error of fasa (per-head, interleaved, every layer sparse) at"
    echo "positions $POS_2048 of the calibration text itself and of the held-out text."
    echo
    printf '| method | text |'; for B in $BUDGETS; do printf ' B=%s |' "$B"; done; echo
    printf '|---|---|'; for B in $BUDGETS; do printf -- '---:|'; done; echo
    for n in 1 2; do
        for which in calib heldout; do
            if [ $which = calib ]; then
                printf '| fasa ntip %s | TinyStories (calibration) |' $n
            else
                printf '| fasa ntip %s | Alice (held out) |' $n
            fi
            for B in $BUDGETS; do
                f=$work/res/cal_rep_${n}_$B.txt
                [ $which = heldout ] && f=$work/res/rep_${T}_fasa-$n-per-head-interleaved_$B.txt
                printf ' %s / %s |' "$(rec_of "$f" 3)" "$(rec_of "$f" 4)"
            done
            echo
        done
    done
} >"$report"

# 7. Plots (gnuplot only): recall and perplexity against B at $T tokens, per-head rows.
plot_rows=(oracle-per-head fasa-plus-1 fasa-plus-2 fasa-1-per-head-interleaved fasa-2-per-head-interleaved fasa-1-shared-interleaved fasa-2-shared-interleaved stream-per-head quest-per-head sparq-2 sparq-4)
if command -v gnuplot >/dev/null; then
    for what in recall ppl; do
        dat=$work/$what.dat
        {
            printf 'B'
            for id in "${plot_rows[@]}"; do
                for r in "${rows[@]}"; do
                    IFS='|' read -r rid label _ <<<"$r"
                    [ "$rid" = "$id" ] && printf '\t"%s"' "$label"
                done
            done
            echo
            for B in $BUDGETS; do
                printf '%s' "$B"
                for id in "${plot_rows[@]}"; do
                    if [ $what = recall ]; then
                        printf '\t%s' "$(rec_of "$work/res/rep_${T}_${id}_$B.txt" 3)"
                    else
                        printf '\t%s' "$(ppl_of "$work/res/ppl_${id}_$B.txt" all)"
                    fi
                done
                echo
            done
        } >"$dat"
    done
    dense_ppl=$(ppl_of "$work/res/ppl_dense.txt" all)
    gnuplot <<GP
set terminal pngcairo size 900,650 noenhanced
set logscale x 2
set xlabel "budget B (tokens per head)"
set key below maxrows 3
set grid
set datafile separator "\t"
set output "$out/recall.png"
set title "stories260K, $T held-out tokens: recall of the exact top-B"
set ylabel "recall"
set yrange [0:1]
plot for [i=2:$((${#plot_rows[@]} + 1))] "$work/recall.dat" using 1:i with linespoints title columnhead(i)
set output "$out/ppl.png"
set title "stories260K, $T held-out tokens: perplexity (dense $dense_ppl)"
set ylabel "perplexity"
set logscale y
set autoscale yfixmax
set yrange [$dense_ppl * 0.9:*]
set ytics (10, 15, 20, 25, 30, 40, 50, 70, 100, 150, 200, 300, 500, 1000)
plot for [i=2:$((${#plot_rows[@]} + 1))] "$work/ppl.dat" using 1:i with linespoints title columnhead(i), $dense_ppl with lines dashtype 2 title "dense"
GP
    say "wrote $out/recall.png and $out/ppl.png"
else
    say "gnuplot not installed (deploy/install-deps.sh installs gnuplot-nox): no PNG plots"
fi
say "wrote $report (raw outputs in $work/res)"

#!/usr/bin/env bash
# The decode-step figures of issue 13 in one run, for a quiet machine: the scan with
# selection for every score dtype, the fasa and dense steps against their rooflines at 1 and
# 2 threads, and (when PEER points at a built ../shared/peer harness) ggml's CPU flash
# attention on the same shape, so every ratio comes from one run on one machine.
#
# usage: bash bench/roofline_run.sh [BUILD_DIR=build] [TOKENS=1M]
#   env: PEER=/path/to/ggml_attn (from ../shared/peer/build.sh; optional)
#        OUT=DIR (JSON and logs; default a new directory under /tmp)
#        REPS=5 (timed steps per figure)
# Memory: about 5 GiB at 1M tokens (f16 K/V of 8 KV heads x 128 dims, and the read buffer).
set -euo pipefail
build=${1:-build}
tokens=${2:-1M}
reps=${REPS:-5}
out=${OUT:-$(mktemp -d /tmp/fasa-roofline.XXXXXX)}
mkdir -p "$out"
fasa=$build/fasa
[ -x "$fasa" ] || { echo "roofline_run: $fasa not built" >&2; exit 2; }
export OPENBLAS_NUM_THREADS=1
echo "roofline_run: $(git rev-parse --short HEAD 2>/dev/null || echo '?') on $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(nproc) CPUs; figures in $out"

echo "=== scan with selection, f16 K/V, every score dtype (one thread)"
for sd in auto f32 f16 bf16 int8; do
    args=(--tokens "$tokens" --reps "$reps" --dtype f16)
    [ "$sd" = auto ] || args+=(--score-dtype "$sd")
    echo "--- score dtype $sd"
    FASA_THREADS=1 "$fasa" bench scan "${args[@]}" | tee "$out/scan-$sd.txt" |
        grep -E "^(cpu|simd|scan|read|recall)|scan/read" || true
done

for t in 1 2; do
    echo "=== fasa and dense step, f16 K/V, $t thread(s)"
    "$fasa" bench attend --tokens "$tokens" --dtype f16 --methods dense,fasa --reps "$reps" \
        --threads "$t" --json "$out/attend-t$t.json" | tee "$out/attend-t$t.txt"
done

if [ -n "${PEER:-}" ] && [ -x "$PEER" ]; then
    case $tokens in
        *M) n=$((${tokens%M} * 1048576)) ;;
        *K) n=$((${tokens%K} * 1024)) ;;
        *) n=$tokens ;;
    esac
    for t in 1 2; do
        echo "=== ggml flash attention (peer), f16, $t thread(s), $n tokens"
        "$PEER" --tokens "$n" --dtype f16 --threads "$t" --reps "$reps" | tee "$out/ggml-t$t.txt" | tail -1
    done
fi
echo "roofline_run: done ($out)"

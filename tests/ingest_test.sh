#!/usr/bin/env bash
# Appends of float16 .npy end to end, on a 3-rank fasa-server (2 workers) with a write-ahead
# log (--state-dir):
#   1. `fasa append` of float16 files (every layer, and one layer) into an f16 session holds
#      bit for bit what float32 files of the same values hold in another: dense and quest
#      outputs cmp-identical, the same stored bytes (stats);
#   2. a float16 file with a NaN is refused naming append.k, nothing stored; k float16 with
#      v float32 is refused;
#   3. kill -9 of rank 0, restart with --restore: the write-ahead log (f16 appends logged
#      widened to f32) brings back every token, outputs bit-identical.
# usage: ingest_test.sh BUILD_DIR
set -u
build=$1
source "$(dirname "$0")/server_util.sh"
state=$tmp/state
mkdir -p "$state" "$tmp/run"
export LC_ALL=C OPENBLAS_NUM_THREADS=1 FASA_TIMEOUT_MS=60000
log=$tmp/run/server.log
launcher=
cleanup() {
    [ -n "$launcher" ] && kill -KILL "$launcher" $(pgrep -P "$launcher" 2>/dev/null) 2>/dev/null
    rm -rf "$tmp"
}
start() {
    start_mpi 3 "$log" "$tmp/run" --bind 'tcp://127.0.0.1:*' --block 64 --state-dir "$state" "$@" ||
        exit 1
}
f() { "$fasa" "$@" --server "$ep"; }

# npy_pair F16 F32 SHAPE N: N random float16 values in +-[0.5, 2) into F16 ('<f2') and the
# same values as float32 into F32 ('<f4').
npy_pair() {
    local h16="" h32="" lo hi e m s b x i=0
    local -a r
    read -ra r <<<"$(head -c $((2 * $4)) /dev/urandom | od -An -v -tu1 | tr '\n' ' ')"
    while [ $i -lt $((2 * $4)) ]; do
        lo=${r[$i]}
        hi=$(((r[i + 1] & 0x87) | 0x38)) # sign, exponent 14 or 15, 2 mantissa bits
        s=$((hi >> 7)) e=$(((hi >> 2) & 31)) m=$((((hi & 3) << 8) | lo))
        b=$(((s << 31) | ((e + 112) << 23) | (m << 13)))
        printf -v x '\\x%02x\\x%02x' "$lo" "$hi"
        h16+=$x
        printf -v x '\\x%02x\\x%02x\\x%02x\\x%02x' $((b & 255)) $(((b >> 8) & 255)) \
            $(((b >> 16) & 255)) $(((b >> 24) & 255))
        h32+=$x
        i=$((i + 2))
    done
    { npy_header '<f2' "$3"; printf "$h16"; } >"$1"
    { npy_header '<f4' "$3"; printf "$h32"; } >"$2"
}
L=2 H=4 HKV=2 D=16 N=200
npy_pair "$tmp/k16.npy" "$tmp/k32.npy" "$L, $N, $HKV, $D" $((L * N * HKV * D))
npy_pair "$tmp/v16.npy" "$tmp/v32.npy" "$L, $N, $HKV, $D" $((L * N * HKV * D))
npy_pair "$tmp/kl16.npy" "$tmp/kl32.npy" "40, $HKV, $D" $((40 * HKV * D))
npy_pair "$tmp/vl16.npy" "$tmp/vl32.npy" "40, $HKV, $D" $((40 * HKV * D))
npy_pair "$tmp/q16.npy" "$tmp/q.npy" "$H, $D" $((H * D))

# attends PREFIX: dense and quest of both layers of both sessions.
attends() {
    local s m l
    for s in a b; do for m in dense quest; do for l in 0 1; do
        f attend --session $s --layer $l --q "$tmp/q.npy" --method $m \
            --out "$1_${s}_${m}_$l.npy" >/dev/null 2>"$tmp/err" ||
            { bad "attend $s $m $l: $(cat "$tmp/err")"; return 1; }
    done; done; done
}
stored() { f stats --session "$1" 2>/dev/null | awk '$1 ~ /^session\.(length|kv_bytes)$/ { print $2 }' | tr '\n' ' '; }

start
f create --session a --layers $L --heads $H --kv-heads $HKV --head-dim $D --dtype f16 >/dev/null &&
    f create --session b --layers $L --heads $H --kv-heads $HKV --head-dim $D --dtype f16 >/dev/null ||
    bad "create"
f append --session a --k "$tmp/k16.npy" --v "$tmp/v16.npy" >"$tmp/out" 2>&1 &&
    f append --session b --k "$tmp/k32.npy" --v "$tmp/v32.npy" >>"$tmp/out" 2>&1 &&
    f append --session a --layer 1 --k "$tmp/kl16.npy" --v "$tmp/vl16.npy" >>"$tmp/out" 2>&1 &&
    f append --session b --layer 1 --k "$tmp/kl32.npy" --v "$tmp/vl32.npy" >>"$tmp/out" 2>&1 &&
    ok "float16 and float32 .npy appended: $(head -1 "$tmp/out")" || bad "append: $(cat "$tmp/out")"
attends "$tmp/o1"
for m in dense quest; do for l in 0 1; do
    cmp -s "$tmp/o1_a_${m}_$l.npy" "$tmp/o1_b_${m}_$l.npy" || bad "f16 and f32 sessions differ: $m layer $l"
done; done
[ "$(stored a)" = "$(stored b)" ] && [ -n "$(stored a)" ] &&
    ok "f16 on the wire stores what f32 of the same values stores: 8 outputs cmp-identical, length and kv_bytes $(stored a)" ||
    bad "stats differ: a $(stored a), b $(stored b)"

# 2. Refusals.
{ head -c 128 "$tmp/k16.npy"; printf '\x00\x7e'; tail -c +131 "$tmp/k16.npy"; } >"$tmp/knan.npy"
before=$(stored a)
if f append --session a --start-pos $N --k "$tmp/knan.npy" --v "$tmp/v16.npy" >"$tmp/out" 2>&1; then
    bad "a NaN was accepted"
else
    grep -q "append.k\[0\] is NaN" "$tmp/out" && [ "$(stored a)" = "$before" ] &&
        ok "float16 NaN refused, nothing stored: $(head -1 "$tmp/out")" || bad "NaN: $(cat "$tmp/out")"
fi
if f append --session a --k "$tmp/k16.npy" --v "$tmp/v32.npy" >"$tmp/out" 2>&1; then
    bad "k float16 with v float32 was accepted"
else
    grep -q "same dtype" "$tmp/out" && ok "mixed dtypes refused: $(head -1 "$tmp/out")" ||
        bad "mixed: $(cat "$tmp/out")"
fi

# 3. kill -9 of rank 0; the log brings the f16 appends back.
kill -KILL "$(cat "$tmp/run/pid")"
for _ in $(seq 1 300); do kill -0 "$launcher" 2>/dev/null || break; sleep 0.1; done
kill -KILL "$launcher" $(pgrep -P "$launcher" 2>/dev/null) 2>/dev/null
wait "$launcher" 2>/dev/null
launcher=
start --restore
attends "$tmp/o2"
d=0
for x in "$tmp"/o1_*.npy; do cmp -s "$x" "$tmp/o2${x#$tmp/o1}" || d=$((d + 1)); done
[ $d -eq 0 ] && [ "$(stored a)" = "$before" ] &&
    ok "after kill -9 of rank 0 and --restore: every f16 token back ($(stored a)), 8 outputs bit-identical" ||
    bad "restore: $d outputs differ, a holds $(stored a), expected $before"
f shutdown >/dev/null 2>&1
for _ in $(seq 1 300); do kill -0 "$launcher" 2>/dev/null || break; sleep 0.1; done
wait "$launcher" 2>/dev/null
launcher=
echo "ingest_test: $pass passed, $fail failed"
[ $fail -eq 0 ]

#!/usr/bin/env bash
# Snapshots and restart, end to end: a 3-rank fasa-server with --state-dir gets two sessions
# (one fasa with a calibrated profile, one dense) and a named profile; `fasa snapshot` writes
# them; every process of the job is killed with SIGKILL; the server is restarted with
# --restore on 2 ranks (another shard count) and on 3 ranks (the same), and the same attends
# must give
#   - on 3 ranks: the bits the server gave before the kill (cmp);
#   - on 2 ranks: the bits a fresh session fed the same rows gives on that server (cmp), and
#     the pre-kill outputs within 1e-6 (npy_diff): across shard counts outputs agree only to
#     rounding, as the log-sum-exp merge order follows the shards.
# Then one byte of a shard file of the dense session is flipped: on restart that session is
# refused with a message naming the file (and requests for it get FAILED_PRECONDITION saying
# so) while the other
# restores. --snapshot-interval writes a changed session by itself.
# usage: snapshot_test.sh BUILD_DIR
set -u
build=$1
source "$(dirname "$0")/server_util.sh"
state=$tmp/state
mkdir -p "$state"
export LC_ALL=C

# Every process of the job: the launcher and its children (the ranks).
job_pids() {
    local l
    l=$(cat "$FASA_RUN_DIR/launcher.pid" 2>/dev/null) || return 0
    echo "$l $(pgrep -P "$l" | tr '\n' ' ')"
}
kill9() {
    local pids p
    pids=$(job_pids)
    [ -n "${pids// /}" ] || return 0
    kill -KILL $pids 2>/dev/null
    for _ in $(seq 1 100); do
        local alive=0
        for p in $pids; do kill -0 "$p" 2>/dev/null && alive=1; done
        [ $alive -eq 0 ] && break
        sleep 0.1
    done
    for p in $pids; do kill -0 "$p" 2>/dev/null && bad "pid $p survived SIGKILL"; done
    rm -f "$FASA_RUN_DIR/launcher.pid" "$FASA_RUN_DIR/fasa-server.pid" "$FASA_RUN_DIR/endpoint"
}
cleanup() {
    kill9 >/dev/null 2>&1
    rm -rf "$tmp"
}

# start N [server options]: starts the server, sets ep.
start() {
    local n=$1
    shift
    start_local "$n" --bind 'tcp://127.0.0.1:*' -- --block 256 --state-dir "$state" "$@" || exit 1
    local got
    got=$(job_pids | wc -w)
    [ "$got" -eq $((n + 1)) ] && ok "$n ranks up (+ mpirun)" || bad "expected $n ranks + mpirun, found $got processes"
}
f() { "$fasa" "$@" --server "$ep"; }

L=2 H=4 HKV=2 D=16 T=3000
mkdir -p "$tmp/qkv"
rnd_npy "$tmp/qkv/q.npy" "$L, $T, $H, $D" $((L * T * H * D))
rnd_npy "$tmp/qkv/k.npy" "$L, $T, $HKV, $D" $((L * T * HKV * D))
rnd_npy "$tmp/qkv/v.npy" "$L, $T, $HKV, $D" $((L * T * HKV * D))
for i in 0 1 2; do rnd_npy "$tmp/q$i.npy" "$H, $D" $((H * D)); done
"$fasa" calibrate --qkv "$tmp/qkv" --ntip 2 --window 32 --positions 1000:3000:50 \
    --out "$tmp/p.profile" >/dev/null || { echo "FAIL: calibrate"; exit 1; }

# attends SESSION PREFIX [METHODS]: every method (default all five) and layer with each
# query, outputs to PREFIX_*.npy.
attends() {
    local m l i
    for m in ${3:-fasa dense oracle quest stream}; do
        for l in 0 1; do
            for i in 0 1 2; do
                f attend --session "$1" --layer $l --q "$tmp/q$i.npy" --method $m \
                    --out "$2_${m}_${l}_$i.npy" >/dev/null 2>"$tmp/err" ||
                    { bad "attend $1 $m layer $l: $(cat "$tmp/err")"; return 1; }
            done
        done
    done
}
plain="dense oracle quest stream" # s2 has no profile: every method but fasa
# same A B TOL: every output of A_* against B_*: bit for bit (TOL 0) or within TOL.
same() {
    local a worst=0 n=0 bad_n=0
    for a in "$1"_*.npy; do
        local b=$2${a#$1}
        n=$((n + 1))
        if [ "$3" = 0 ]; then cmp -s "$a" "$b" || { bad_n=$((bad_n + 1)); echo "  differs: $a $b"; }
        else "$build/npy_diff" "$a" "$b" "$3" >"$tmp/d" || { bad_n=$((bad_n + 1)); echo "  $(cat "$tmp/d"): $a"; }
            worst=$(awk -v w="$worst" -v d="$(grep -Eo '[0-9.e+-]+' "$tmp/d" | head -1)" 'BEGIN { print (d + 0 > w + 0) ? d : w }')
        fi
    done
    [ $n -ge 24 ] && [ $bad_n -eq 0 ] &&
        { [ "$3" = 0 ] && echo "$n outputs bit-identical" || echo "$n outputs, max |diff| $worst"; }
}

# ---- 3 ranks: sessions, a named profile, attends, snapshots ----
start 3
f calibrate --qkv "$tmp/qkv" --ntip 2 --window 32 --positions 1000:3000:50 --out "$tmp/p_srv.profile" \
    --profile-name prof1 >/dev/null 2>"$tmp/err" || bad "calibrate --profile-name: $(cat "$tmp/err")"
if f create --session s1 --layers $L --heads $H --kv-heads $HKV --head-dim $D --profile "$tmp/p.profile" \
        --method fasa --budget 64 >/dev/null 2>"$tmp/err" &&
   f create --session s2 --layers $L --heads $H --kv-heads $HKV --head-dim $D >/dev/null 2>"$tmp/err" &&
   f append --session s1 --k "$tmp/qkv/k.npy" --v "$tmp/qkv/v.npy" >/dev/null 2>"$tmp/err" &&
   f append --session s2 --k "$tmp/qkv/k.npy" --v "$tmp/qkv/v.npy" >/dev/null 2>"$tmp/err"; then
    ok "sessions s1 (fasa) and s2 (dense) with $T tokens"
else
    bad "sessions: $(cat "$tmp/err")"
fi
attends s1 "$tmp/a" && attends s2 "$tmp/a2" "$plain" && ok "attends on 3 ranks"
if out=$(f snapshot s1 2>&1) && echo "$out" | grep -Eq "^snapshot s1 tokens $T bytes [0-9]+ manifest s1-[0-9a-f]{16}\.manifest$"; then
    ok "fasa snapshot s1: $out"
else
    bad "fasa snapshot s1: $out"
fi
if out=$(f snapshot --all 2>&1) && [ "$(echo "$out" | grep -c '^snapshot s[12] ')" -eq 2 ] &&
   echo "$out" | grep -q '^profiles 1$'; then
    ok "fasa snapshot --all: 2 sessions, 1 profile"
else
    bad "fasa snapshot --all: $out"
fi
[ "$(ls "$state"/*.shard | wc -l)" -eq 4 ] && ok "4 shard files (2 sessions x 2 workers), old generation removed" ||
    bad "shard files: $(ls "$state")"
kill9
ok "killed every process of the job with SIGKILL"

# ---- 2 ranks (1 shard): re-sharded on load ----
start 2 --restore --snapshot-interval 1
grep -q "restore: 2 sessions from $state onto 1 shard, 0 refused" "$FASA_RUN_DIR/fasa-server.log" &&
    ok "restore on 2 ranks: 2 sessions" || bad "restore log: $(grep restore "$FASA_RUN_DIR/fasa-server.log")"
attends s1 "$tmp/b" && attends s2 "$tmp/b2" "$plain"
f create --session s1f --layers $L --heads $H --kv-heads $HKV --head-dim $D --profile "$tmp/p.profile" \
    --method fasa --budget 64 >/dev/null && f append --session s1f --k "$tmp/qkv/k.npy" --v "$tmp/qkv/v.npy" >/dev/null
attends s1f "$tmp/c"
r=$(same "$tmp/b" "$tmp/c" 0) && ok "2 ranks: restored s1 = fresh s1f fed the same rows: $r" || bad "2 ranks: restored vs fresh: $r"
r=$(same "$tmp/b" "$tmp/a" 1e-6) && ok "2 ranks vs the 3-rank original (s1): $r" || bad "2 ranks vs original s1: $r"
r=$(same "$tmp/b2" "$tmp/a2" 1e-6) && ok "2 ranks vs the 3-rank original (s2): $r" || bad "2 ranks vs original s2: $r"
f create --session s3 --layers $L --heads $H --kv-heads $HKV --head-dim $D --profile-name prof1 >/dev/null 2>"$tmp/err" &&
    ok "the named profile prof1 was restored" || bad "create with prof1: $(cat "$tmp/err")"
# --snapshot-interval 1: the new sessions s1f and s3 get written without a request.
for _ in $(seq 1 50); do
    [ -f "$state"/s1f-*.manifest ] && [ -f "$state"/s3-*.manifest ] && break
    sleep 0.1
done
[ -f "$state"/s1f-*.manifest ] && [ -f "$state"/s3-*.manifest ] && ok "--snapshot-interval wrote s1f and s3" ||
    bad "--snapshot-interval: $(ls "$state")"
f drop --session s1f >/dev/null && f drop --session s3 >/dev/null
[ ! -e "$state"/s1f-*.manifest ] && ok "drop removed the snapshot of s1f" || bad "s1f's manifest is still there"
kill9

# ---- 3 ranks again: the same shard count as the original ----
start 3 --restore
attends s1 "$tmp/d" && attends s2 "$tmp/d2" "$plain"
r=$(same "$tmp/d" "$tmp/a" 0) && ok "3 ranks: restored s1 = pre-kill outputs: $r" || bad "3 ranks s1: $r"
r=$(same "$tmp/d2" "$tmp/a2" 0) && ok "3 ranks: restored s2 = pre-kill outputs: $r" || bad "3 ranks s2: $r"
kill9

# ---- a damaged shard file of s2: s2 refused, s1 served ----
shard=$(ls "$state"/s2-*.s1.shard)
byte=$(od -An -tu1 -j4000 -N1 "$shard" | tr -d ' ')
printf "\\x$(printf %02x $((byte ^ 0x10)))" | dd of="$shard" bs=1 seek=4000 count=1 conv=notrunc status=none
start 3 --restore
log=$FASA_RUN_DIR/fasa-server.log
if grep -q "restore: session s2 refused: $shard: checksum mismatch" "$log" &&
   grep -q "restore: 1 session from $state onto 2 shards, 1 refused" "$log"; then
    ok "damaged shard file reported: $(grep 'refused:' "$log" | sed 's/.*restore: //')"
else
    bad "damaged file not reported: $(grep restore "$log")"
fi
f attend --session s2 --layer 0 --q "$tmp/q0.npy" --out "$tmp/x.npy" >/dev/null 2>"$tmp/err" &&
    bad "attend to the refused s2 succeeded" ||
    { grep -q "session 's2' could not be restored: .*s2-.*\.shard: checksum mismatch" "$tmp/err" &&
        ok "requests for s2 say why: $(cat "$tmp/err")" || bad "s2: $(cat "$tmp/err")"; }
attends s1 "$tmp/e"
r=$(same "$tmp/e" "$tmp/a" 0) && ok "s1 restored beside the refused s2: $r" || bad "s1 beside refused s2: $r"
kill9

# ---- without --state-dir: Snapshot is refused naming the flag, --restore does not start ----
if start_local 1 --bind 'tcp://127.0.0.1:*'; then
    f snapshot --all >/dev/null 2>"$tmp/err" && bad "snapshot without --state-dir succeeded" ||
        { grep -q "FAILED_PRECONDITION\|--state-dir" "$tmp/err" && ok "no --state-dir: $(cat "$tmp/err")" ||
            bad "no --state-dir: $(cat "$tmp/err")"; }
    kill9
fi
"$build/fasa-server" --restore >/dev/null 2>"$tmp/err"
rc=$?
[ $rc -eq 2 ] && grep -q -- "--restore needs --state-dir" "$tmp/err" && ok "--restore alone: $(cat "$tmp/err")" ||
    bad "--restore alone: rc $rc, $(cat "$tmp/err")"
"$build/fasa-server" --state-dir "$tmp/none" >/dev/null 2>"$tmp/err"
rc=$?
[ $rc -eq 2 ] && grep -q "not a directory" "$tmp/err" && ok "a missing state dir is refused" ||
    bad "missing state dir: rc $rc, $(cat "$tmp/err")"

echo "snapshot_test: $pass passed, $fail failed"
[ $fail -eq 0 ]

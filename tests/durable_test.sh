#!/usr/bin/env bash
# Nothing acknowledged is lost, end to end, on a 3-rank fasa-server (mpirun) with --state-dir:
#   1. SIGTERM: after acknowledged appends (no snapshot requested), SIGTERM to rank 0 writes a
#      final snapshot and the job exits 0; a restart with --restore gives bit-identical
#      outputs (cmp against the outputs before the stop) and every appended token (stats).
#   2. Shutdown: the same through `fasa shutdown` after more appends.
#   3. Snapshot generations: stray files a killed snapshot leaves (a .tmp manifest, a .tmp
#      shard, a shard of another generation, a shard of a session with no manifest) are gone
#      after the next start; the live generation is kept (the restore is bit-identical).
#   4. A dead rank: kill -9 of a worker while clients attend in a loop: every client gets an
#      error (UNAVAILABLE naming the rank, or the connection lost) within 2 s of the kill, not
#      a timeout; the log names the rank and its PID; the job exits non-zero.
#      The restart with --restore replays the write-ahead log: every append acknowledged
#      after the last snapshot is there (stats) and the outputs are bit-identical.
#   5. kill -9 of rank 0 under load, after more appends and Attends with k_new: every client
#      gets an error within 2 s; the restart has them all, bit-identical.
#   6. A torn record at the end of a log (a write cut short by the kill) is cut off and the
#      records before it replay; --wal off logs nothing.
#   7. A hung worker (SIGSTOP) under load: seen after it stays stopped for 2 s; every client
#      gets an error within 3 s of the stop, and the log names the rank.
#   8. A request in flight when rank 0 dies (rank 0 stopped, then killed): the client gets
#      "connection lost" within 2 s of the kill, not a timeout.
# usage: durable_test.sh BUILD_DIR
set -u
build=$1
source "$(dirname "$0")/server_util.sh"
state=$tmp/state
mkdir -p "$state" "$tmp/run"
export LC_ALL=C OPENBLAS_NUM_THREADS=1
# Clients wait long: an error within 2 s is the server's doing, not the timeout's.
export FASA_TIMEOUT_MS=60000
now() { date +%s.%N; }
log=$tmp/run/server.log
launcher=
cleanup() {
    [ -n "$launcher" ] && kill -KILL "$launcher" $(pgrep -P "$launcher" 2>/dev/null) 2>/dev/null
    jobs -p | xargs -r kill 2>/dev/null
    rm -rf "$tmp"
}

# start [server options]: 3 ranks under mpirun in the background (launcher = its PID), ep.
start() {
    start_mpi 3 "$log" "$tmp/run" --bind 'tcp://127.0.0.1:*' --block 256 --state-dir "$state" \
        "$@" || exit 1
}
# stopped: waits for the launcher to exit (at most 60 s); rc = its exit status.
stopped() {
    local t
    for t in $(seq 1 600); do kill -0 "$launcher" 2>/dev/null || break; sleep 0.1; done
    wait "$launcher" 2>/dev/null
    rc=$?
    launcher=
}
f() { "$fasa" "$@" --server "$ep"; }

L=2 H=4 HKV=2 D=16
for n in 1000 300 50; do
    rnd_npy "$tmp/k$n.npy" "$L, $n, $HKV, $D" $((L * n * HKV * D))
    rnd_npy "$tmp/v$n.npy" "$L, $n, $HKV, $D" $((L * n * HKV * D))
done
for i in 0 1; do rnd_npy "$tmp/q$i.npy" "$H, $D" $((H * D)); done
rnd_npy "$tmp/kl50.npy" "50, $HKV, $D" $((50 * HKV * D))
rnd_npy "$tmp/vl50.npy" "50, $HKV, $D" $((50 * HKV * D))
for i in 0 1 2; do
    rnd_npy "$tmp/kn$i.npy" "$HKV, $D" $((HKV * D))
    rnd_npy "$tmp/vn$i.npy" "$HKV, $D" $((HKV * D))
done

# attends PREFIX: dense and quest on both layers with both queries of s1 and s2.
attends() {
    local s m l i
    for s in s1 s2; do for m in dense quest; do for l in 0 1; do for i in 0 1; do
        f attend --session $s --layer $l --q "$tmp/q$i.npy" --method $m \
            --out "$1_${s}_${m}_${l}_$i.npy" >/dev/null 2>"$tmp/err" ||
            { bad "attend $s $m $l: $(cat "$tmp/err")"; return 1; }
    done; done; done; done
}
# same A B: every output A_* equals B_* bit for bit.
same() {
    local a n=0 d=0
    for a in "$1"_*.npy; do
        n=$((n + 1))
        cmp -s "$a" "$2${a#$1}" || { d=$((d + 1)); echo "  differs: $a"; }
    done
    [ $n -eq 16 ] && [ $d -eq 0 ] && echo "$n outputs bit-identical"
}
# length S: tokens of session S (layer 0), from stats.
length() { f stats --session "$1" 2>/dev/null | awk '$1 == "session.length" { print $2; exit }'; }

# ---- 1. SIGTERM writes a final snapshot ----
start
f create --session s1 --layers $L --heads $H --kv-heads $HKV --head-dim $D >/dev/null &&
    f create --session s2 --layers $L --heads $H --kv-heads $HKV --head-dim $D >/dev/null &&
    f append --session s1 --k "$tmp/k1000.npy" --v "$tmp/v1000.npy" >/dev/null &&
    f append --session s1 --k "$tmp/k300.npy" --v "$tmp/v300.npy" >/dev/null &&
    f append --session s2 --k "$tmp/k300.npy" --v "$tmp/v300.npy" >/dev/null ||
    bad "sessions and appends"
attends "$tmp/a"
kill -TERM "$(cat "$tmp/run/pid")"
stopped
[ $rc -eq 0 ] && ok "SIGTERM: the job exited 0" || bad "SIGTERM: exit status $rc: $(tail -5 "$log")"
grep -q "stop: final snapshot done: 2 sessions written" "$log" &&
    ok "SIGTERM: $(grep -o 'final snapshot done.*' "$log")" || bad "no final snapshot: $(grep stop "$log")"
start --restore
[ "$(length s1)" = 1300 ] && [ "$(length s2)" = 300 ] && ok "restored after SIGTERM: s1 1300 tokens, s2 300" ||
    bad "lengths after SIGTERM: s1 $(length s1), s2 $(length s2): $(f stats --session s1 2>&1 | head -20)"
attends "$tmp/b" && r=$(same "$tmp/b" "$tmp/a") && ok "after SIGTERM + --restore: $r" || bad "after SIGTERM: $r"

# ---- 2. Shutdown writes a final snapshot ----
f append --session s1 --k "$tmp/k50.npy" --v "$tmp/v50.npy" >/dev/null || bad "append before shutdown"
attends "$tmp/c"
f shutdown >/dev/null 2>&1
stopped
[ $rc -eq 0 ] && ok "Shutdown: the job exited 0" || bad "Shutdown: exit status $rc"
grep -q "stop: final snapshot done: 1 session written" "$log" &&
    ok "Shutdown: only the changed session written" || bad "Shutdown snapshot: $(grep stop "$log")"

# ---- 3. stray files of killed snapshots are removed at start ----
s1stem=$(basename "$(ls "$state"/s1-*.manifest)" .manifest)
live=$(ls "$state" | sort)
touch "$state/$s1stem.manifest.tmp" "$state/$s1stem.g1.s0.shard.tmp" "$state/$s1stem.g1.s1.shard"
head -c 100000 /dev/zero >"$state/gone-0123456789abcdef.g5.s0.shard"
touch "$state/notes.txt"
start --restore
now_files=$(ls "$state" | sort)
[ "$now_files" = "$(printf '%s\nnotes.txt' "$live" | sort)" ] &&
    ok "stray snapshot files removed at start, the live generation and other files kept" ||
    bad "state dir after start: $now_files (expected the live files $live + notes.txt)"
grep -q "state dir: removed 4 files (100000 bytes)" "$log" && ok "$(grep -o 'state dir: removed.*' "$log")" ||
    bad "no removal logged: $(grep 'state dir' "$log")"
[ "$(length s1)" = 1350 ] && ok "restored after Shutdown: s1 1350 tokens" || bad "s1 length $(length s1)"
attends "$tmp/d" && r=$(same "$tmp/d" "$tmp/c") && ok "after Shutdown + --restore: $r" || bad "after Shutdown: $r"

# ---- 4. kill -9 of a worker under load ----
# Appends after the last snapshot (the restore's): only the log has them.
f append --session s1 --k "$tmp/k50.npy" --v "$tmp/v50.npy" >/dev/null &&
    f append --session s2 --layer 1 --k "$tmp/kl50.npy" --v "$tmp/vl50.npy" >/dev/null &&
    f append --session s2 --layer 0 --start-pos 300 --k "$tmp/kl50.npy" --v "$tmp/vl50.npy" >/dev/null ||
    bad "appends before the kill"
attends "$tmp/e"
# clients N: N loops of attends in the background; each writes its first error and when.
clients() {
    local i
    for i in $(seq 1 "$1"); do
        ( while "$fasa" attend --server "$ep" --session s1 --layer $((i % 2)) --q "$tmp/q0.npy" \
                --method dense --out "$tmp/cl$i.npy" >/dev/null 2>"$tmp/clerr$i"; do :; done
          now >"$tmp/clt$i" ) &
    done
    sleep 1
}
# errors_within N T0: every client's first error came within 2 s of T0, and none is a timeout.
errors_within() {
    local i worst=0 t missing=0
    for _ in $(seq 1 100); do
        local all=1
        for i in $(seq 1 "$1"); do [ -s "$tmp/clt$i" ] || all=0; done
        [ $all -eq 1 ] && break
        sleep 0.1
    done
    for i in $(seq 1 "$1"); do
        [ -s "$tmp/clt$i" ] || { bad "client $i got no error within 10 s"; missing=$((missing + 1)); continue; }
        t=$(awk -v a="$(cat "$tmp/clt$i")" -v b="$2" 'BEGIN { printf "%.3f", a - b }')
        worst=$(awk -v w="$worst" -v t="$t" 'BEGIN { print (t > w) ? t : w }')
        grep -q "within .* ms" "$tmp/clerr$i" && bad "client $i timed out: $(cat "$tmp/clerr$i")"
        echo "  client $i after $t s: $(cat "$tmp/clerr$i")"
    done
    local bound=${4:-2.0}
    [ $missing -eq 0 ] && awk -v w="$worst" -v b="$bound" 'BEGIN { exit !(w < b) }' &&
        ok "$3: every client ($1) got an error within $bound s (slowest $worst s)" ||
        bad "$3: slowest client error after $worst s (bound $bound s)"
    rm -f "$tmp"/clt* "$tmp"/clerr*
}
rank0=$(cat "$tmp/run/pid")
victim=$(pgrep -P "$launcher" | grep -vx "$rank0" | head -1)
clients 4
t0=$(now)
kill -KILL "$victim"
errors_within 4 "$t0" "kill -9 of worker pid $victim"
stopped
[ $rc -ne 0 ] && ok "the job exited non-zero ($rc)" || bad "the job exited 0 after a dead rank"
grep -Eq "ERROR rank=0 .*rank [12] \(pid $victim on host .*\) died" "$log" &&
    ok "the log names the rank: $(grep -Eo "rank [12] \(pid $victim.*died" "$log" | head -1)" ||
    bad "the log does not name rank pid $victim: $(grep -E 'ERROR|died' "$log" | head -5)"
wait 2>/dev/null
start --restore
[ "$(length s1)" = 1400 ] && [ "$(length s2)" = 350 ] &&
    ok "after kill -9 of a worker: every acknowledged append is back (s1 1400, s2 350 tokens): $(grep -o 'wal: replayed.*' "$log")" ||
    bad "after kill -9 of a worker: s1 $(length s1), s2 $(length s2): $(grep wal "$log")"
attends "$tmp/g" && r=$(same "$tmp/g" "$tmp/e") && ok "after kill -9 of a worker + --restore: $r" || bad "after worker kill: $r"

# ---- 5. kill -9 of rank 0 under load ----
f append --session s1 --k "$tmp/k50.npy" --v "$tmp/v50.npy" >/dev/null || bad "append before the rank 0 kill"
for i in 0 1 2; do
    f attend --session s2 --layer $((i % 2)) --q "$tmp/q0.npy" --k-new "$tmp/kn$i.npy" \
        --v-new "$tmp/vn$i.npy" --out "$tmp/x.npy" >/dev/null 2>"$tmp/err" || bad "attend --k-new: $(cat "$tmp/err")"
done
f attend --session s2 --layer 0 --q "$tmp/q0.npy" --k-new "$tmp/kn2.npy" --v-new "$tmp/vn2.npy" \
    --out "$tmp/x.npy" >/dev/null 2>"$tmp/err" || bad "attend --k-new: $(cat "$tmp/err")"
attends "$tmp/h"
clients 4
t0=$(now)
kill -KILL "$(cat "$tmp/run/pid")"
errors_within 4 "$t0" "kill -9 of rank 0"
stopped
wait 2>/dev/null
start --restore
[ "$(length s1)" = 1450 ] && [ "$(length s2)" = 353 ] &&
    ok "after kill -9 of rank 0: every acknowledged append and k_new is back (s1 1450, s2 353 tokens)" ||
    bad "after kill -9 of rank 0: s1 $(length s1), s2 $(length s2): $(grep wal "$log")"
attends "$tmp/i" && r=$(same "$tmp/i" "$tmp/h") && ok "after kill -9 of rank 0 + --restore: $r" || bad "after rank 0 kill: $r"

# ---- 6. a torn record; --wal off ----
f append --session s1 --k "$tmp/k50.npy" --v "$tmp/v50.npy" >/dev/null || bad "append before the torn record"
attends "$tmp/j"
kill -KILL "$launcher" $(pgrep -P "$launcher") 2>/dev/null
stopped
wal=$(ls "$state"/s1-*.wal)
size=$(stat -c %s "$wal")
head -c 1000 /dev/urandom >>"$wal"
start --restore
grep -Eq "wal: $wal: stopped after [0-9]+ records at a torn or damaged record.*cut at byte $size of $((size + 1000))" "$log" &&
    ok "a torn record is cut off: $(grep -o 'stopped after.*of [0-9]*' "$log")" || bad "torn record: $(grep wal "$log")"
[ "$(stat -c %s "$wal")" = "$size" ] && ok "the log is cut back to $size bytes" || bad "log size $(stat -c %s "$wal")"
attends "$tmp/k" && r=$(same "$tmp/k" "$tmp/j") && ok "the records before the torn one replayed: $r" || bad "torn: $r"
kill -TERM "$(cat "$tmp/run/pid")"
stopped
start --restore --wal off
f append --session s1 --k "$tmp/k50.npy" --v "$tmp/v50.npy" >/dev/null || bad "append with --wal off"
[ "$(stat -c %s "$wal")" -le "$size" ] && ok "--wal off: nothing logged" || bad "--wal off wrote to $wal"
kill -TERM "$(cat "$tmp/run/pid")"
stopped

# ---- 7. a hung worker ----
start --restore
rank0=$(cat "$tmp/run/pid")
victim=$(pgrep -P "$launcher" | grep -vx "$rank0" | head -1)
clients 3
t0=$(now)
kill -STOP "$victim"
errors_within 3 "$t0" "SIGSTOP of worker pid $victim (found after 2 s stopped)" 3.0
grep -Eq "rank [12] \(pid $victim on host .*\) hangs: stopped for 2000 ms" "$log" &&
    ok "the log names the hung rank: $(grep -Eo "rank [12] \(pid $victim.*hangs[^;]*" "$log" | head -1)" ||
    bad "hung rank not named: $(grep -E 'ERROR' "$log" | head -3)"
stopped
kill -CONT "$victim" 2>/dev/null
wait 2>/dev/null

# ---- 8. a request in flight when rank 0 dies ----
# A stopped worker holds rank 0 in its exchange for the attend (the watchdog would call it
# hung after 2 s); rank 0 is killed 0.5 s into it.
start --restore
rank0=$(cat "$tmp/run/pid")
victim=$(pgrep -P "$launcher" | grep -vx "$rank0" | head -1)
kill -STOP "$victim"
( "$fasa" attend --server "$ep" --session s1 --layer 0 --q "$tmp/q0.npy" --method dense \
    --out "$tmp/x.npy" >/dev/null 2>"$tmp/inflight.err"; now >"$tmp/inflight.t" ) &
sleep 0.5
t0=$(now)
kill -KILL "$rank0"
for _ in $(seq 1 100); do [ -s "$tmp/inflight.t" ] && break; sleep 0.1; done
if [ -s "$tmp/inflight.t" ]; then
    t=$(awk -v a="$(cat "$tmp/inflight.t")" -v b="$t0" 'BEGIN { printf "%.3f", a - b }')
    grep -q "was lost while waiting" "$tmp/inflight.err" && awk -v t="$t" 'BEGIN { exit !(t < 2.0) }' &&
        ok "a request in flight when rank 0 died failed after $t s: $(cat "$tmp/inflight.err")" ||
        bad "in-flight request: after $t s: $(cat "$tmp/inflight.err")"
else
    bad "the in-flight request got no answer within 10 s of the kill"
fi
kill -CONT "$victim" 2>/dev/null
stopped
wait 2>/dev/null

echo "durable_test: $pass passed, $fail failed"
[ $fail -eq 0 ]

#!/usr/bin/env bash
# Limits that hold (issue 19), end to end on loopback:
#   - a request over --max-message gets RESOURCE_EXHAUSTED naming the limit at once (not a
#     client timeout), and a log line;
#   - 30 slow raw ZMTP peers, each sending most of a large frame and then nothing, cannot make
#     rank 0 count more than --max-pending (its peak RSS, VmHWM, within 1.5 x it), are closed with a
#     log line, and the server still answers;
#   - a peer that stalls in the middle of a small frame is closed after --peer-timeout;
#   - FASA_DEADLINE_MS=-5 and =abc are errors naming it;
#   - restore over --max-sessions admits exactly the limit and refuses the rest by name (log,
#     and their requests answer why); restore over --memory-limit admits none past it;
#   - fasa snapshot --server E SESSION (the session after the options) works.
# usage: hold_test.sh BUILD_DIR
set -u
build=$1
source "$(dirname "$0")/server_util.sh"
log=$FASA_RUN_DIR/fasa-server.log

# start N [fasa-server options]: sets ep and pid (rank 0).
start() {
    local n=$1
    shift
    start_local "$n" --bind 'tcp://127.0.0.1:*' -- "$@" || exit 1
    pid=$(cat "$FASA_RUN_DIR/fasa-server.pid")
}
stop() { bash "$root/deploy/stop-local.sh" >/dev/null 2>&1 || true; }
f() { "$fasa" "$@" --server "$ep"; }
kib() { awk -v k="$1" '$1 == k":" { print $2 }' "/proc/$pid/status"; }

# npy FILE ROWS VALUE: a float32 .npy of shape (ROWS, 1, 8), every value VALUE.
npy() {
    python3 - "$@" <<'EOF'
import struct, sys
path, rows, val = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
hdr = "{'descr': '<f4', 'fortran_order': False, 'shape': (%d, 1, 8), }" % rows
while (10 + len(hdr) + 1) % 64:
    hdr += " "
hdr += "\n"
with open(path, "wb") as f:
    f.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(hdr)) + hdr.encode())
    f.write(struct.pack("<f", val) * (rows * 8))
EOF
}
geom=(--layers 1 --heads 2 --kv-heads 1 --head-dim 8 --method dense --budget 16)
# rnd FILE SHAPE SEED: a float32 .npy of that shape (a Python tuple), uniform in [-2, 2).
rnd() {
    python3 - "$@" <<'EOF'
import random, struct, sys
path, shape, seed = sys.argv[1], eval(sys.argv[2]), int(sys.argv[3])
n = 1
for d in shape:
    n *= d
rng = random.Random(seed)
hdr = "{'descr': '<f4', 'fortran_order': False, 'shape': %s, }" % (str(tuple(shape)),)
while (10 + len(hdr) + 1) % 64:
    hdr += " "
hdr += "\n"
with open(path, "wb") as f:
    f.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(hdr)) + hdr.encode())
    f.write(struct.pack("<%df" % n, *[rng.uniform(-2, 2) for _ in range(n)]))
EOF
}

# ---- one rank: the wire limits ----
cap=$((64 << 20))
start 1 --max-message 16M --max-pending 64M --peer-timeout 3
port=${ep##*:}

# 30 slow peers, each 14 MB into a 15 MB frame (420 MB in all against a 64 MiB cap).
echo 5 >"/proc/$pid/clear_refs" 2>/dev/null # VmHWM := VmRSS, where allowed
before=$(kib VmRSS)
python3 "$root/tests/slow_peers.py" 127.0.0.1 "$port" 30 15000000 14000000 10 >"$tmp/slow" 2>&1
peak=$(kib VmHWM)
grown=$(((peak - before) * 1024))
echo "slow peers: $(cat "$tmp/slow"); rank 0 RSS before ${before} KiB, peak ${peak} KiB: grew $grown bytes, cap $cap ($(awk -v g=$grown -v c=$cap 'BEGIN { printf "%.2f", g / c }') of it)"
# Under a sanitizer the allocator keeps freed buffers (ASan's quarantine; no malloc_trim), so
# RSS says nothing about what the guard holds there: the release build asserts it.
if ldd "$build/fasa-server" 2>/dev/null | grep -q "libasan\|libtsan"; then
    ok "sanitizer build: rank 0's RSS not asserted (grew $grown bytes; the release build checks it)"
# What the guard counts never passes the cap (asserted below); the RSS can for a moment,
# when one check closes several connections whose buffers ZeroMQ frees (and the heap is
# trimmed) a few ms later: measured 0.74-1.08 of the cap over 9 runs on a quiet 2-core
# machine (0.75-1.23 over 13 before the fast checks after an accept). Half as much again is
# the bound asserted; past it the guard is not bounding.
elif [ $grown -le $((cap * 3 / 2)) ]; then
    ok "30 slow peers grew rank 0 by $grown bytes <= 1.5 x --max-pending $cap"
else
    bad "30 slow peers grew rank 0 by $grown bytes > 1.5 x --max-pending $cap"
fi
# What the guard measured when it closed connections (every build): never past the cap.
most=$(grep -o "unfinished requests held [0-9]* bytes in all" "$log" | awk '$4 > m { m = $4 } END { print m + 0 }')
[ "$most" -gt $((cap / 2)) ] && [ "$most" -le $cap ] &&
    ok "the guard closed connections at $most bytes held in all (over half of, and within, the cap $cap)" ||
    bad "the guard closed connections at $most bytes held in all (cap $cap)"
grep -q "^clients 30 sent [0-9]* closed 30 " "$tmp/slow" && ok "all 30 slow peers were closed" ||
    bad "slow peers: $(cat "$tmp/slow")"
sent=$(awk '{ print $4 }' "$tmp/slow")
[ "${sent:-0}" -gt $((2 * cap)) ] && ok "they sent $sent bytes (over twice the cap)" ||
    bad "the peers sent only ${sent:-0} bytes: the test did not load the server"
n_closed=$(grep -c "closed the connection from 127.0.0.1:[0-9]*: it held [0-9]* bytes of unfinished requests" "$log")
[ "$n_closed" -ge 1 ] && ok "$n_closed closures logged" || bad "no closure logged"
f ping >/dev/null 2>&1 && ok "the server still answers" || bad "no ping after the slow peers"

# An append over --max-message: answered at once, naming the limit; logged.
npy "$tmp/bk.npy" 300000 0.25
npy "$tmp/bv.npy" 300000 0.5
f create --session big "${geom[@]}" >/dev/null || bad "create big"
t0=$(date +%s%N)
if FASA_TIMEOUT_MS=20000 f append --session big --layer 0 --k "$tmp/bk.npy" --v "$tmp/bv.npy" >"$tmp/out" 2>&1; then
    bad "an append of 19 MB went through --max-message 16M"
else
    ms=$((($(date +%s%N) - t0) / 1000000))
    if grep -q "over this server's --max-message of 16777216 bytes" "$tmp/out" && [ $ms -lt 5000 ]; then
        ok "oversized append refused in $ms ms: $(head -c 160 "$tmp/out")"
    else
        bad "oversized append after $ms ms: $(cat "$tmp/out")"
    fi
fi
grep -q "refused a request of [0-9]* bytes from .*: over --max-message 16777216" "$log" &&
    ok "the oversized request is logged" || bad "no log line for the oversized request"

# A peer stalled inside a 1 MB frame (well under the cap) is dropped by the heartbeat.
python3 "$root/tests/slow_peers.py" 127.0.0.1 "$port" 1 2000000 1000000 12 >"$tmp/stall" 2>&1
t=$(awk '{ print $10 }' "$tmp/stall")
if grep -q "closed 1 " "$tmp/stall" && awk -v t="$t" 'BEGIN { exit !(t >= 2 && t <= 9) }'; then
    ok "a stalled peer was closed after $t s (--peer-timeout 3)"
else
    bad "stalled peer: $(cat "$tmp/stall")"
fi
f ping >/dev/null 2>&1 && ok "a real client still gets answers" || bad "no ping after the stall"

# FASA_DEADLINE_MS must be an integer in range.
for dl in -5 abc 99999999999; do
    if FASA_DEADLINE_MS=$dl f ping >"$tmp/out" 2>&1; then
        bad "FASA_DEADLINE_MS=$dl accepted"
    elif grep -q "FASA_DEADLINE_MS='$dl' must be a whole number" "$tmp/out"; then
        ok "FASA_DEADLINE_MS=$dl refused: $(cat "$tmp/out")"
    else
        bad "FASA_DEADLINE_MS=$dl: $(cat "$tmp/out")"
    fi
done
FASA_DEADLINE_MS=5000 f ping >/dev/null 2>&1 && ok "FASA_DEADLINE_MS=5000 works" || bad "FASA_DEADLINE_MS=5000"
stop

# ---- three ranks: restore over the limits ----
state=$tmp/state
mkdir -p "$state"
npy "$tmp/k.npy" 3000 0.25
npy "$tmp/v.npy" 3000 0.5
start 3 --state-dir "$state" --block 64
for i in 1 2 3 4 5 6; do
    f create --session s$i "${geom[@]}" >/dev/null &&
        f append --session s$i --layer 0 --k "$tmp/k.npy" --v "$tmp/v.npy" >/dev/null ||
        bad "session s$i"
done
# The session after the options, as the help's usage says.
if out=$("$fasa" snapshot --server "$ep" s1 2>&1) && echo "$out" | grep -q "^snapshot s1 tokens 3000 "; then
    ok "fasa snapshot --server E s1: $out"
else
    bad "fasa snapshot --server E s1: $out"
fi
f snapshot --all >/dev/null 2>&1 || bad "snapshot --all"
stop
# stat_of FIELD: a value of fasa stats; rank_alloc R: rank R's alloc_bytes.
stat_of() { f stats 2>/dev/null | awk -v k="$1" '$1 == k { print $2 }'; }
rank_alloc() { f stats 2>/dev/null | awk -v r="$1" 'p && $1 == r { print $9 } /^rank +shards/ { p = 1 }'; }

start 3 --state-dir "$state" --block 64 --restore --max-sessions 3
n=$(stat_of n_sessions)
refused=$(grep -o "restore: session s[0-9] refused: the server holds its limit of 3 sessions (--max-sessions)" "$log" | awk '{ print $3 }' | sort | tr '\n' ' ')
[ "$n" = 3 ] && ok "restore with --max-sessions 3 admitted 3 of 6" || bad "restore with --max-sessions 3 admitted $n"
[ "$(echo $refused | wc -w)" = 3 ] && ok "the other three refused by name: $refused" ||
    bad "refusals logged: '$refused'; log: $(grep restore "$log" | tail -8)"
one=$(echo $refused | awk '{ print $1 }')
if [ -n "$one" ] && ! f stats --session "$one" >"$tmp/out" 2>&1 &&
    grep -q "session '$one' could not be restored: the server holds its limit of 3 sessions (--max-sessions)" "$tmp/out"; then
    ok "a refused session answers why: $(cat "$tmp/out")"
else
    bad "stats of refused session '$one': $(cat "$tmp/out")"
fi
# Each rank's resident memory beside what the limit counts (RankStats.rss_bytes).
f stats >"$tmp/stats" 2>&1
n_rss=$(awk '$1 == "rss_bytes.rank" && $3 > 1048576 { n++ } END { print n + 0 }' "$tmp/stats")
[ "$n_rss" = 3 ] && ok "stats report 3 ranks' RSS: $(grep rss_bytes "$tmp/stats" | tr '\n' ';')" ||
    bad "rank RSS: $(grep -A4 '^rank ' "$tmp/stats")"
w1=$(awk '$1 == "rss_bytes.rank" && $2 == 1 { print $3 }' "$tmp/stats")
[ "${w1:-0}" -ge "$(rank_alloc 1)" ] && ok "rank 1's RSS $w1 >= its alloc_bytes $(rank_alloc 1)" ||
    bad "rank 1's RSS ${w1:-none} below its alloc_bytes"
f stats --format prometheus 2>&1 | grep -q '^fasa_rank_rss_bytes{rank="2"} [1-9]' &&
    ok "prometheus: fasa_rank_rss_bytes" || bad "no fasa_rank_rss_bytes in the prometheus stats"
per=$((($(rank_alloc 1) + 2) / 3)) # what one session takes on rank 1
stop

limit=$((per * 5 / 2)) # room for two sessions per rank, not three
start 3 --state-dir "$state" --block 64 --restore --memory-limit $limit
n=$(stat_of n_sessions)
a1=$(rank_alloc 1)
a2=$(rank_alloc 2)
n_ref=$(grep -c "restore: session s[0-9] refused: .*memory limit" "$log")
[ "$n" = 2 ] && [ "$n_ref" = 4 ] && ok "restore with --memory-limit $limit (2.5 sessions) admitted 2, refused 4 by name" ||
    bad "restore with --memory-limit $limit: $n sessions, $n_ref refusals: $(grep refused "$log" | head -3)"
[ "${a1:-0}" -gt 0 ] && [ "$a1" -le $limit ] && [ "${a2:-0}" -le $limit ] &&
    ok "every rank under the limit: $a1, $a2 <= $limit bytes" || bad "ranks hold $a1, $a2 bytes, limit $limit"
stop

# ---- three ranks: the disk tier on the server ----
tdir=$tmp/tier
mkdir -p "$tdir" "$tmp/state2"
T=5000
rnd "$tmp/rk.npy" "($T, 2, 16)" 1
rnd "$tmp/rv.npy" "($T, 2, 16)" 2
rnd "$tmp/rq.npy" "(4, 16)" 3
dgeom=(--layers 1 --heads 4 --kv-heads 2 --head-dim 16 --budget 64)
start 3 --state-dir "$tmp/state2" --block 256 --tier-dir "$tdir"
f create --session ram "${dgeom[@]}" --tier ram >/dev/null 2>"$tmp/err" || bad "create ram: $(cat "$tmp/err")"
f create --session disk "${dgeom[@]}" --tier disk >/dev/null 2>"$tmp/err" || bad "create disk: $(cat "$tmp/err")"
for s in ram disk; do
    f append --session $s --layer 0 --k "$tmp/rk.npy" --v "$tmp/rv.npy" >/dev/null 2>"$tmp/err" ||
        bad "append $s: $(cat "$tmp/err")"
done
f stats --session disk 2>&1 | grep -q "^session.tier disk$" && ok "session disk reports tier disk" ||
    bad "session disk's tier: $(f stats --session disk 2>&1 | grep tier)"
# attends TAG: every method but fasa and sparq (no profile) on both sessions into TAG_S_M.npy.
attends() {
    local s m
    for s in ram disk; do
        for m in dense oracle stream quest; do
            f attend --session $s --layer 0 --q "$tmp/rq.npy" --method $m --out "$tmp/$1_${s}_$m.npy" \
                >/dev/null 2>"$tmp/err" || bad "attend $s $m: $(cat "$tmp/err")"
        done
    done
}
same_tiers() {
    local m n=0
    for m in dense oracle stream quest; do
        cmp -s "$tmp/$1_ram_$m.npy" "$tmp/$1_disk_$m.npy" && n=$((n + 1))
    done
    [ $n = 4 ]
}
attends a
same_tiers a && ok "disk tier over 2 workers: 4 methods bit-identical to the RAM tier" ||
    bad "disk tier answers differ from RAM"
# The rank table's rows 1 and 2 (the workers), alloc_bytes (column 9), summed.
held_of() { f stats --session "$1" 2>/dev/null | awk 'p && ($1 == 1 || $1 == 2) { s += $9 } /^session.rank +shards/ { p = 1 } END { print s + 0 }'; }
ar=$(held_of ram)
ad=$(held_of disk)
[ "$ad" -gt 0 ] && [ $((ad * 2)) -lt "$ar" ] && ok "disk tier holds $ad bytes in the workers' RAM, ram tier $ar" ||
    bad "RAM held: disk $ad ram $ar"
[ -z "$(ls -A "$tdir")" ] && ok "the tier dir stays empty (files unlinked at once)" || bad "files left in $tdir: $(ls "$tdir")"
# The benchmark's RAM per token through the server (target <= 30% of f16 K+V).
if "$fasa" bench attend --server "$ep" --tier disk --dtype f16 --tokens 4096 --reps 1 >"$tmp/bench" 2>&1 &&
    grep -q "^RAM per token: tier disk .*target <= 30%: met)$" "$tmp/bench"; then
    ok "$(grep '^RAM per token' "$tmp/bench")"
else
    bad "bench attend --server --tier disk: $(tail -3 "$tmp/bench")"
fi
f snapshot --all >/dev/null 2>"$tmp/err" || bad "snapshot of a disk-tier session: $(cat "$tmp/err")"
stop
start 3 --state-dir "$tmp/state2" --block 256 --tier-dir "$tdir" --restore
f stats --session disk 2>&1 | grep -q "^session.tier disk$" && ok "restored as a disk-tier session" ||
    bad "restored tier: $(f stats --session disk 2>&1 | grep -E 'tier|length')"
attends b
same_tiers b && cmp -s "$tmp/a_disk_quest.npy" "$tmp/b_disk_quest.npy" &&
    cmp -s "$tmp/a_disk_dense.npy" "$tmp/b_disk_dense.npy" &&
    ok "after restore: still bit-identical to RAM and to before" || bad "answers changed across the restore"
stop
# Without --tier-dir a disk-tier session is refused, naming it; so is a restore of one.
start 1 --state-dir "$tmp/state2" --restore
if ! f create --session x "${dgeom[@]}" --tier disk >"$tmp/out" 2>&1 && grep -q "tier-dir" "$tmp/out"; then
    ok "no --tier-dir: $(cat "$tmp/out")"
else
    bad "create --tier disk without --tier-dir: $(cat "$tmp/out")"
fi
if ! f stats --session disk >"$tmp/out" 2>&1 && grep -q "could not be restored: .*tier" "$tmp/out"; then
    ok "restore without --tier-dir refuses the disk-tier session: $(head -c 200 "$tmp/out")"
else
    bad "disk session restored without --tier-dir: $(head -c 300 "$tmp/out")"
fi
stop

echo "hold_test: $pass passed, $fail failed"
[ $fail -eq 0 ]

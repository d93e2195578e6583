#!/usr/bin/env bash
# fasa-server's limits end to end with N ranks: --memory-limit refuses an append that would
# take a rank's KV store over it and leaves the session and every rank's holdings as they
# were, a dense step over the kept rows still gives the exact answer, dropping a session
# gives its memory back, and --max-sessions refuses one session too many.
# usage: limits_test.sh N BUILD_DIR
set -u
n=$1
build=$2
source "$(dirname "$0")/server_util.sh"

# A float32 .npy of the given shape with every value the same (4 little-endian bytes as
# printf escapes): npy FILE 'SHAPE' COUNT BYTES.
npy() {
    {
        npy_header '<f4' "$2"
        local one=$4 block="" i
        for i in $(seq 64); do block="$block$one"; done
        for i in $(seq $(($3 / 64))); do printf "$block"; done
        for i in $(seq $(($3 % 64))); do printf "$one"; done
    } >"$1"
}
rows=4096
npy "$tmp/k.npy" "$rows, 1, 8" $((rows * 8)) '\x00\x00\x80\x3e' # 0.25
npy "$tmp/v.npy" "$rows, 1, 8" $((rows * 8)) '\x00\x00\x00\x3f' # 0.5
npy "$tmp/q.npy" "2, 8" 16 '\x00\x00\x80\x3f'                   # 1.0
npy "$tmp/want.npy" "2, 8" 16 '\x00\x00\x00\x3f'                # dense output: 0.5

# One chunk of 4096 rows of this geometry is 4096 x 8 x 2 x 4 = 256 KiB, plus small tables.
# Twice: without a memory reserve, then with --reserve (the chunks come from memory the
# workers faulted in at start, and a dropped session's go back there): the same refusal at
# the same tokens, the same holdings and answers.
for reserve in 0 64M; do
bash "$root/deploy/stop-local.sh" >/dev/null 2>&1
echo "-- --reserve $reserve"
# Everything but counters of requests and uptime must be unchanged: the rank table and KV bytes.
keep() { grep -E '^(kv_bytes|n_sessions|rank|[0-9]+ )' "$1" | grep -v rss; }
start_local "$n" --bind 'tcp://127.0.0.1:*' -- --memory-limit 700K --max-sessions 2 --block 64 \
    --reserve $reserve || exit 1
if [ "$reserve" != 0 ]; then
    log=$FASA_RUN_DIR/fasa-server.log
    for i in $(seq 100); do grep -q "reserve: 64.0 MiB mapped" "$log" && break; sleep 0.1; done
    grep -q "reserve: 64.0 MiB mapped and faulted in" "$log" &&
        ok "the reserve is logged: $(grep -m1 -o 'reserve: .*' "$log")" ||
        bad "no reserve line in the log: $(tail -3 "$log")"
fi
export FASA_SERVER=$ep
geom=(--layers 1 --heads 2 --kv-heads 1 --head-dim 8 --method dense --budget 16)
"$fasa" create --session a "${geom[@]}" >/dev/null || bad "create a"

# Append 4096 rows at a time until the limit refuses one.
held=0
refused=0
for i in $(seq 12); do
    "$fasa" stats >"$tmp/before" 2>&1
    if "$fasa" append --session a --layer 0 --k "$tmp/k.npy" --v "$tmp/v.npy" >"$tmp/out" 2>&1; then
        held=$((held + rows))
        continue
    fi
    refused=1
    break
done
if [ $refused = 1 ] && grep -q "RESOURCE_EXHAUSTED\|memory-limit" "$tmp/out" && grep -q "memory-limit" "$tmp/out"; then
    ok "append refused after $held tokens: $(head -c 200 "$tmp/out")"
else
    bad "no memory-limit refusal after $held tokens: $(cat "$tmp/out")"
fi
[ $held -gt 0 ] && ok "$held tokens fit under the limit" || bad "nothing fit under the limit"
"$fasa" stats >"$tmp/after" 2>&1
if [ "$reserve" = 0 ]; then
    held0=$held
    keep "$tmp/after" >"$tmp/held0"
else
    [ "$held" = "$held0" ] && ok "with the reserve the limit refused at the same $held tokens" ||
        bad "with the reserve $held tokens fit, without $held0"
    diff "$tmp/held0" <(keep "$tmp/after") >/dev/null && ok "with the reserve the same holdings" ||
        bad "holdings with the reserve differ: $(diff "$tmp/held0" <(keep "$tmp/after") | head -5)"
fi
if [ -n "$(keep "$tmp/after")" ] && diff <(keep "$tmp/before") <(keep "$tmp/after") >/dev/null; then
    ok "the refused append changed no rank's holdings"
else
    bad "holdings changed: $(diff <(keep "$tmp/before") <(keep "$tmp/after") | head -5)"
fi
len=$("$fasa" stats --session a 2>/dev/null | awk '$1 == "session.length" || $1 == "length" {print $2; exit}')
[ "$len" = "$held" ] && ok "session length $len" || bad "session length '$len', expected $held"
if "$fasa" attend --session a --layer 0 --q "$tmp/q.npy" --method dense --out "$tmp/o.npy" >/dev/null 2>"$tmp/err" &&
    d=$("$build/npy_diff" "$tmp/want.npy" "$tmp/o.npy" 0); then
    ok "dense step over the kept rows: $d"
else
    bad "dense step: $(cat "$tmp/err") $d"
fi

# --max-sessions 2.
"$fasa" create --session b "${geom[@]}" >/dev/null || bad "create b"
if "$fasa" create --session c "${geom[@]}" >"$tmp/out" 2>&1; then
    bad "a third session was created"
elif grep -q "max-sessions" "$tmp/out"; then
    ok "third session refused: $(cat "$tmp/out")"
else
    bad "third session: $(cat "$tmp/out")"
fi

# Dropping a gives its memory back: b takes as many rows as a held.
"$fasa" drop --session a >/dev/null || bad "drop a"
got=0
for i in $(seq $((held / rows))); do
    "$fasa" append --session b --layer 0 --k "$tmp/k.npy" --v "$tmp/v.npy" >"$tmp/out" 2>&1 && got=$((got + rows))
done
[ $got = $held ] && ok "after the drop, b took $got tokens" || bad "after the drop b took $got of $held: $(cat "$tmp/out")"

done

# Deadlines: slow dense steps (1024 query heads x 512 dims over 4096 tokens each; as many as
# keep the server busy for about 4 s) queue up; a ping sent a second later that may
# wait 50 ms behind them is answered UNAVAILABLE without running, one that may wait ten
# minutes is served. Replies may take long here, so the clients wait up to ten minutes.
export FASA_TIMEOUT_MS=600000
bash "$root/deploy/stop-local.sh" >/dev/null 2>&1
if start_local "$n" --bind 'tcp://127.0.0.1:*'; then
    export FASA_SERVER=$ep
    npyz() { # a float32 .npy of zeros: npyz FILE 'SHAPE' BYTES
        { npy_header '<f4' "$2"; head -c "$3" /dev/zero; } >"$1"
    }
    npyz "$tmp/bk.npy" "4096, 1, 512" $((4096 * 512 * 4))
    npyz "$tmp/bq.npy" "1024, 512" $((1024 * 512 * 4))
    "$fasa" create --session slow --layers 1 --heads 1024 --kv-heads 1 --head-dim 512 --method dense >/dev/null &&
        "$fasa" append --session slow --layer 0 --k "$tmp/bk.npy" --v "$tmp/bk.npy" >/dev/null || bad "slow session"
    # Time one step, then queue enough of them to keep the server busy for about 4 s
    # whatever this machine's speed (the kernels get faster; a fixed count would not).
    t0=$(date +%s%N)
    "$fasa" attend --session slow --layer 0 --q "$tmp/bq.npy" --out "$tmp/bo0.npy" >/dev/null 2>&1
    one_ms=$(( ($(date +%s%N) - t0) / 1000000 ))
    n_slow=$(( 4000 / (one_ms > 0 ? one_ms : 1) + 2 ))
    [ $n_slow -lt 6 ] && n_slow=6
    [ $n_slow -gt 64 ] && n_slow=64
    for i in $(seq $n_slow); do
        "$fasa" attend --session slow --layer 0 --q "$tmp/bq.npy" --out "$tmp/bo$i.npy" >/dev/null 2>&1 &
    done
    sleep 1
    if FASA_DEADLINE_MS=50 "$fasa" ping >"$tmp/out" 2>&1; then
        bad "a ping with a 50 ms deadline behind $n_slow slow steps ($one_ms ms each) was served"
    elif grep -q "deadline" "$tmp/out"; then
        ok "a ping past its deadline was not run: $(head -c 200 "$tmp/out")"
    else
        bad "ping past its deadline: $(cat "$tmp/out")"
    fi
    FASA_DEADLINE_MS=600000 "$fasa" ping >/dev/null 2>&1 && ok "a ping with a 600 s deadline was served" ||
        bad "a ping with a 600 s deadline failed"
    wait
    for i in $(seq $n_slow); do [ -s "$tmp/bo$i.npy" ] || bad "slow step $i gave no output"; done
fi

echo "limits ($n ranks): $pass passed, $fail failed"
[ $fail -eq 0 ]

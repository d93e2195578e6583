#!/usr/bin/env bash
# fasa-server end to end with N ranks: start it with deploy/run-local.sh, check that idle
# ranks do not spin a core, send bad input over the socket (socket_test), check that
# `fasa replay --server` gives the embedded engine's numbers on the recorded stories260K dump
# (fasa, dense, oracle), then stop it (odd N: a Shutdown request, even N: SIGTERM through
# deploy/stop-local.sh) and check every rank is gone.
# usage: server_test.sh N BUILD_DIR SHARED_DIR
set -u
n=$1
build=$2
shared=$3
source "$(dirname "$0")/server_util.sh"
dump=$shared/data/models/stories260K/golden/tinystories_T2048.qkv
# The server (MPI) runs with the environment's ASAN_OPTIONS; clients check leaks.
client_asan=${ASAN_OPTIONS:-}
client_asan=${client_asan//detect_leaks=0/detect_leaks=1}

max_message=8388608
start_local "$n" --bind 'tcp://127.0.0.1:*' -- --max-message $max_message --block 64 || exit 1
launcher=$(cat "$FASA_RUN_DIR/launcher.pid")
ranks=$(pgrep -P "$launcher" | tr '\n' ' ')
[ "$n" -eq 1 ] && ranks=$launcher
nranks=$(echo $ranks | wc -w)
[ "$nranks" -eq "$n" ] && ok "$n rank process(es): $ranks" || bad "expected $n ranks, found '$ranks'"

# Idle ranks must not spin: CPU seconds per rank over 2 idle seconds.
tck=$(getconf CLK_TCK)
cpu() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
declare -A before
for p in $ranks; do before[$p]=$(cpu "$p"); done
sleep 2
for p in $ranks; do
    used=$(( $(cpu "$p") - ${before[$p]} ))
    secs=$(awk -v t="$used" -v c="$tck" 'BEGIN { printf "%.2f", t / c }')
    if [ "$used" -le $((tck * 2 / 5)) ]; then ok "rank pid $p idle CPU ${secs} s over 2 s"
    else bad "rank pid $p used ${secs} s of CPU in 2 idle seconds"; fi
done

# Bad input over the socket.
if ASAN_OPTIONS=$client_asan FASA_ENDPOINT=$ep FASA_MAX_MESSAGE=$max_message "$build/socket_test"; then ok "socket_test"
else bad "socket_test"; fi

# replay --server equals the embedded engine.
if [ -f "$dump" ]; then
    if "$fasa" calibrate --qkv "$dump" --ntip 2 --window 32 --out "$tmp/p.profile" >/dev/null 2>&1; then
        for m in fasa dense oracle fasa-plus; do
            prof=()
            case $m in fasa | fasa-plus) prof=(--profile "$tmp/p.profile") ;; esac
            common=(replay --qkv "$dump" --method $m --budget 32 --positions 1024:2048:64 "${prof[@]}")
            if ! "$fasa" "${common[@]}" --out "$tmp/e_$m.npy" --selected "$tmp/e_$m.sel.npy" >/dev/null 2>"$tmp/err"; then
                bad "embedded replay $m: $(cat "$tmp/err")"; continue
            fi
            if ! ASAN_OPTIONS=$client_asan "$fasa" "${common[@]}" --server "$ep" --out "$tmp/s_$m.npy" --selected "$tmp/s_$m.sel.npy" >/dev/null 2>"$tmp/err"; then
                bad "replay --server $m: $(cat "$tmp/err")"; continue
            fi
            if d=$("$build/npy_diff" "$tmp/e_$m.npy" "$tmp/s_$m.npy" 1e-6); then ok "replay $m server vs embedded: $d"
            else bad "replay $m server vs embedded: $d"; fi
            if cmp -s "$tmp/e_$m.sel.npy" "$tmp/s_$m.sel.npy"; then ok "replay $m: identical selections"
            else bad "replay $m: selections differ"; fi
        done
        # replay --merge local: the server (its shards, block 64) equals the embedded engine
        # with as many shards; in process, --merge-eps 0.25 is the default and a larger eps
        # keeps more tokens per shard (from 2 shards on, other outputs).
        common=(replay --qkv "$dump" --method oracle --budget 32 --positions 1024:2048:256 --merge local)
        if "$fasa" "${common[@]}" --shards "$((n > 1 ? n - 1 : 1))" --block 64 --out "$tmp/e_loc.npy" >/dev/null 2>"$tmp/err" &&
           "$fasa" "${common[@]}" --shards "$((n > 1 ? n - 1 : 1))" --block 64 --merge-eps 0.25 --out "$tmp/e_loc25.npy" >/dev/null 2>"$tmp/err" &&
           "$fasa" "${common[@]}" --shards "$((n > 1 ? n - 1 : 1))" --block 64 --merge-eps 2 --out "$tmp/e_loc2.npy" >/dev/null 2>"$tmp/err" &&
           ASAN_OPTIONS=$client_asan "$fasa" "${common[@]}" --server "$ep" --out "$tmp/s_loc.npy" >/dev/null 2>"$tmp/err"; then
            if d=$("$build/npy_diff" "$tmp/e_loc.npy" "$tmp/s_loc.npy" 1e-6); then ok "replay --merge local server vs embedded: $d"
            else bad "replay --merge local server vs embedded: $d"; fi
            cmp -s "$tmp/e_loc.npy" "$tmp/e_loc25.npy" && ok "replay --merge-eps 0.25 is the default" ||
                bad "replay --merge-eps 0.25 differs from the default"
            if [ "$n" -gt 2 ]; then
                cmp -s "$tmp/e_loc.npy" "$tmp/e_loc2.npy" && bad "replay --merge-eps 2 changed nothing at $((n - 1)) shards" ||
                    ok "replay --merge-eps 2 keeps other tokens at $((n - 1)) shards"
            fi
        else
            bad "replay --merge local: $(cat "$tmp/err")"
        fi
    else
        bad "calibrate failed"
    fi
else
    echo "skip: $dump not found"
fi

# ---- fasa stats: a small dense session made with create / append / attend and a request
# that fails, then the text and the Prometheus formats of the same Stats. ----
# npy_zeros FILE SHAPE N: a float32 .npy of N zeros with shape SHAPE ("2, 100, 2, 8").
npy_zeros() {
    local hdr="{'descr': '<f4', 'fortran_order': False, 'shape': ($2), }"
    while [ $(((10 + ${#hdr} + 1) % 64)) -ne 0 ]; do hdr="$hdr "; done
    local len=$((${#hdr} + 1))
    { printf '\x93NUMPY\x01\x00'; printf "\\x$(printf %02x $((len & 255)))\\x$(printf %02x $((len >> 8)))"
      printf '%s\n' "$hdr"; head -c $((4 * $3)) /dev/zero; } >"$1"
}
st_run() { ASAN_OPTIONS=$client_asan "$fasa" "$@" --server "$ep"; }
npy_zeros "$tmp/k.npy" "2, 100, 2, 8" 3200
npy_zeros "$tmp/q.npy" "4, 8" 32
if st_run create --session st-stats --layers 2 --heads 4 --kv-heads 2 --head-dim 8 >/dev/null 2>"$tmp/err" &&
   st_run append --session st-stats --k "$tmp/k.npy" --v "$tmp/k.npy" >/dev/null 2>"$tmp/err" &&
   st_run attend --session st-stats --layer 1 --q "$tmp/q.npy" --out "$tmp/o.npy" >/dev/null 2>"$tmp/err" &&
   st_run attend --session st-stats --layer 0 --q "$tmp/q.npy" --out "$tmp/o.npy" >/dev/null 2>"$tmp/err"; then
    ok "stats workload: create, append, 2 attends"
else
    bad "stats workload: $(cat "$tmp/err")"
fi
st_run attend --session st-none --layer 0 --q "$tmp/q.npy" --out "$tmp/o.npy" >/dev/null 2>&1 &&
    bad "attend to a missing session succeeded"
# The text format: key value lines, then the latency and rank tables (global, session).
if st_run stats --session st-stats >"$tmp/stats.txt" 2>"$tmp/err"; then
    grep -Eq '^requests\.attend [1-9][0-9]*$' "$tmp/stats.txt" &&
    grep -Eq '^errors\.NOT_FOUND [1-9][0-9]*$' "$tmp/stats.txt" &&
    grep -Eq '^dense +[1-9][0-9]* ' "$tmp/stats.txt" &&
    grep -Eq '^session\.kv_bytes 25600$' "$tmp/stats.txt" &&
    [ "$(grep -Ec '^[0-9]+ ' "$tmp/stats.txt")" -eq $((2 * n)) ] &&
    ok "stats text format" || bad "stats text format: $(cat "$tmp/stats.txt")"
else
    bad "fasa stats: $(cat "$tmp/err")"
fi
# The Prometheus format: every sample of a declared family, the counters and the summary
# there, and the session's 25600 bytes (krest and v: no profile) spread over the ranks.
if st_run stats --session st-stats --format prometheus >"$tmp/stats.prom" 2>"$tmp/err"; then
    p=$tmp/stats.prom
    undeclared=$(awk '/^# TYPE / { t[$3] = $4; next } /^#/ { next }
        { name = $1; sub(/\{.*/, "", name); base = name; sub(/_(sum|count)$/, "", base)
          if (!(name in t) && !(t[base] == "summary") ) print }' "$p")
    malformed=$(grep -Ev '^# (HELP|TYPE) fasa_[a-z_]+ .+$|^fasa_[a-z_]+(\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\})? ([0-9.e+-]+|NaN)$' "$p")
    sumkind() { awk -v k="$1" -F'[ ]' '$1 ~ /^fasa_session_rank_kv_bytes\{/ && $1 ~ "kind=\"" k "\"" { s += $2 } END { print s + 0 }' "$p"; }
    shard0=$(sed -n 's/^fasa_rank_shards{rank="0"} //p' "$p")
    if [ -z "$undeclared" ] && [ -z "$malformed" ] &&
       grep -Eq '^fasa_requests_total\{type="attend"\} [1-9][0-9]*$' "$p" &&
       grep -Eq '^fasa_errors_total\{code="NOT_FOUND"\} [1-9][0-9]*$' "$p" &&
       grep -q '^# TYPE fasa_step_seconds summary$' "$p" &&
       grep -Eq '^fasa_step_seconds\{method="dense",quantile="0.99"\} [0-9.e-]+$' "$p" &&
       grep -Eq '^fasa_step_seconds_count\{method="dense"\} [1-9][0-9]*$' "$p" &&
       [ "$(grep -c '^fasa_rank_kv_bytes{rank="[0-9]*",kind="kdom"}' "$p")" -eq "$n" ] &&
       [ "$shard0" = "$([ "$n" -eq 1 ] && echo 1 || echo 0)" ] &&
       [ "$(sumkind kdom)" -eq 0 ] && [ "$(sumkind krest)" -eq 12800 ] && [ "$(sumkind v)" -eq 12800 ]; then
        ok "stats prometheus format ($(grep -c '^fasa_' "$p") samples)"
    else
        bad "stats prometheus format: undeclared '$undeclared' malformed '$malformed' kdom $(sumkind kdom) krest $(sumkind krest) v $(sumkind v) rank 0 shards '$shard0'"
    fi
else
    bad "fasa stats --format prometheus: $(cat "$tmp/err")"
fi
st_run drop --session st-stats >/dev/null 2>&1 || bad "drop st-stats"
# ---- end of the stats checks ----

# ---- --merge: libfasa's options against the embedded engine (merge_client), then the CLI's
# create --merge local and attend --merge over random keys (bench/gen_load). ----
shards=$((n > 1 ? n - 1 : 1))
if out=$(ASAN_OPTIONS=$client_asan "$build/merge_client" "$ep" $shards 64 2>&1); then ok "$out"; else bad "$out"; fi
# npy_from FILE SHAPE N SRC: a float32 .npy of shape SHAPE holding the last N values of the
# float32 .npy SRC.
npy_from() {
    local hdr="{'descr': '<f4', 'fortran_order': False, 'shape': ($2), }"
    while [ $(((10 + ${#hdr} + 1) % 64)) -ne 0 ]; do hdr="$hdr "; done
    local len=$((${#hdr} + 1))
    { printf '\x93NUMPY\x01\x00'; printf "\\x$(printf %02x $((len & 255)))\\x$(printf %02x $((len >> 8)))"
      printf '%s\n' "$hdr"; tail -c $((4 * $3)) "$4"; } >"$1"
}
if "$build/bench/gen_load" --out "$tmp/mg" --tokens 600 --layers 1 --kv-heads 2 --head-dim 8 >/dev/null 2>"$tmp/err" &&
   "$build/bench/gen_load" --out "$tmp/mq" --tokens 1 --layers 1 --kv-heads 4 --head-dim 8 --seed 5 >/dev/null 2>"$tmp/err"; then
    npy_from "$tmp/mq.npy" "4, 8" 32 "$tmp/mq/k_0.npy"
    mg_attend() { # SESSION OUT [--merge M]
        st_run attend --session "$1" --layer 0 --q "$tmp/mq.npy" --out "$2" --selected "$2.sel" "${@:3}" >/dev/null 2>"$tmp/err"
    }
    if st_run create --session mg-l --layers 1 --heads 4 --kv-heads 2 --head-dim 8 --method oracle --budget 16 --merge local >/dev/null 2>"$tmp/err" &&
       st_run append --session mg-l --layer 0 --k "$tmp/mg/k_0.npy" --v "$tmp/mg/v_0.npy" >/dev/null 2>"$tmp/err" &&
       mg_attend mg-l "$tmp/ml.npy" && mg_attend mg-l "$tmp/mll.npy" --merge local && mg_attend mg-l "$tmp/mle.npy" --merge exact; then
        cmp -s "$tmp/ml.npy" "$tmp/mll.npy" && ok "create --merge local: an attend's default is local" ||
            bad "create --merge local: attend and attend --merge local differ"
        if [ $shards -ge 2 ]; then
            cmp -s "$tmp/ml.npy" "$tmp/mle.npy" && bad "attend --merge exact on a local session gave the local outputs" ||
                ok "attend --merge exact differs from local ($shards shards)"
        else
            cmp -s "$tmp/ml.npy" "$tmp/mle.npy" && ok "one shard: local is exact" || bad "one shard: local and exact differ"
        fi
        # Local returns no selected positions: the int32 array is all -1 (0xff bytes).
        [ -z "$(tail -c $((4 * 16 * 4)) "$tmp/ml.npy.sel" | tr -d '\377')" ] && ok "attend under a local merge: selected all -1" ||
            bad "attend under a local merge returned selected positions"
    else
        bad "create --merge local / attend --merge: $(cat "$tmp/err")"
    fi
    st_run drop --session mg-l >/dev/null 2>&1 || bad "drop mg-l"
else
    bad "gen_load: $(cat "$tmp/err")"
fi

# The server is still serving, then it stops cleanly and every rank goes.
"$fasa" ping --server "$ep" >/dev/null 2>&1 && ok "still answering ping" || bad "ping after the tests"
if [ $((n % 2)) -eq 1 ]; then
    how="Shutdown request (with pings queued behind it)"
    if d=$(ASAN_OPTIONS=$client_asan FASA_SOCKET_SHUTDOWN=1 FASA_ENDPOINT=$ep "$build/socket_test" 2>&1); then
        ok "$(echo "$d" | grep '^shutdown:')"
    else
        bad "Shutdown with queued requests: $d"
    fi
else
    how="SIGTERM (stop-local.sh)"
    bash "$root/deploy/stop-local.sh" >/dev/null || bad "stop-local.sh"
fi
wait_gone $launcher $ranks && ok "every rank gone after a $how" || bad "ranks still running after a $how"
grep -q "fasa-server: stopping" "$FASA_RUN_DIR/fasa-server.log" && ok "clean stop logged" ||
    bad "no clean stop in the log: $(tail -5 "$FASA_RUN_DIR/fasa-server.log")"

echo "server_test ($n ranks): $pass passed, $fail failed"
[ $fail -eq 0 ]

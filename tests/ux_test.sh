#!/usr/bin/env bash
# What a new user meets, end to end against a 2-rank server: the README's snapshot block run
# as written (with this test's endpoint and directories), fasa sessions and fasa profile
# delete, fasa drop SESSION, FASA_SERVER honoured by the commands that otherwise run
# in-process, an interrupted command exiting 130 after dropping its sessions, and the
# server's log naming the client and its server-wide request number with one line per state
# change at the default level. Then the CLI's own checks that need no server: a missing
# tcp://, a refused port (at once), FASA_TIMEOUT_MS / FASA_SIMD, replay's --out check and
# --method dense without --budget.
# usage: ux_test.sh BUILD_DIR SHARED_DIR
set -u
build=$(cd "$1" && pwd)
shared=$2
source "$(dirname "$0")/server_util.sh"
dump=$shared/data/models/stories260K/golden/tinystories_T2048.qkv
source "$root/deploy/ports.sh"
# expect_error NAME PATTERN CMD...: non-zero exit, exactly one stderr line matching PATTERN.
source "$(dirname "$0")/expect.sh"

# ---- the README's snapshot block, as written but for the endpoint and paths ----
ep=$(fasa_bind_endpoint 127.0.0.1) || exit 1
if [ "${ep##*:}" = '*' ]; then
    # A concrete port for the block: one nothing listens on now.
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    ep=tcp://127.0.0.1:$port
fi
block=$(awk '/^mkdir -p \/tmp\/fasa-state/ { on = 1 } on && /^```/ { exit } on { print }' "$root/README.md")
[ -n "$block" ] && ok "found the README's snapshot block ($(printf '%s\n' "$block" | wc -l) lines)" ||
    bad "no snapshot block in README.md"
script=$(printf '%s\n' "$block" | sed -e "s#/tmp/fasa-state#$tmp/state#g" \
    -e "s#tcp://127.0.0.1:5555#$ep#g" -e "s#\./build/#$build/#g" \
    -e "s#^deploy/run-local.sh \([0-9]*\)#bash $root/deploy/run-local.sh \1 --bind $ep#" \
    -e "s#^deploy/stop-local.sh#bash $root/deploy/stop-local.sh#")
if (set -e; cd "$tmp"; eval "$script") >"$tmp/block.out" 2>&1; then
    ok "the snapshot block ran"
else
    bad "the snapshot block failed: $(tail -5 "$tmp/block.out")"
fi
grep -q '^seq-1 layers 2 heads 4 kv_heads 2 head_dim 8 dtype f32 tokens 0 kv_bytes 0 profile no$' "$tmp/block.out" &&
    ok "after the restore, fasa sessions lists seq-1" || bad "seq-1 not listed after the restore: $(cat "$tmp/block.out")"

# ---- a 2-rank server for the rest ----
if ! start_local 2 --bind 'tcp://127.0.0.1:*' -- --state-dir "$tmp/state"; then
    echo "ux_test: $pass passed, $fail failed"
    exit 1
fi
log=$FASA_RUN_DIR/fasa-server.log
export FASA_SERVER=$ep

# FASA_SERVER reaches calibrate, replay and demo (they print the server they ran on).
if [ -f "$dump" ]; then
    "$fasa" calibrate --qkv "$dump" --ntip 2 --window 32 --positions 1024:2048:256 \
        --profile-name stories --out "$tmp/p.profile" >"$tmp/cal.out" 2>&1 &&
        grep -q "calibrated on $ep" "$tmp/cal.out" && ok "calibrate ran on \$FASA_SERVER (and stored 'stories')" ||
        bad "calibrate with FASA_SERVER: $(cat "$tmp/cal.out")"
    "$fasa" replay --qkv "$dump" --method dense --positions 2000:2048:16 --out "$tmp/o.npy" \
        >"$tmp/rep.out" 2>&1 && grep -q "server $ep" "$tmp/rep.out" &&
        ok "replay ran on \$FASA_SERVER, --method dense without --budget" ||
        bad "replay with FASA_SERVER: $(cat "$tmp/rep.out")"
else
    bad "no recorded dump at $dump"
fi
"$fasa" demo --tokens 1024 --steps 1 >"$tmp/demo.out" 2>&1 && grep -q "server $ep" "$tmp/demo.out" &&
    ok "demo ran on \$FASA_SERVER" || bad "demo with FASA_SERVER: $(tail -3 "$tmp/demo.out")"

# Global options before or after the command (issue 17): --server, also with create and
# attend-like commands whose own options follow; both orders reach the same server.
"$fasa" --server "$ep" ping >"$tmp/g1" 2>&1 && grep -q " at $ep: " "$tmp/g1" &&
    env -u FASA_SERVER "$fasa" --server "$ep" ping >"$tmp/g1" 2>&1 && grep -q " at $ep: " "$tmp/g1" &&
    env -u FASA_SERVER "$fasa" ping --server "$ep" >"$tmp/g2" 2>&1 && grep -q " at $ep: " "$tmp/g2" &&
    env -u FASA_SERVER "$fasa" --server="$ep" ping >/dev/null 2>&1 &&
    ok "fasa --server E ping and fasa ping --server E both answer" ||
    bad "global --server: $(cat "$tmp/g1" "$tmp/g2")"
env -u FASA_SERVER "$fasa" --server "$ep" create --session g1 --layers 1 --heads 2 --kv-heads 1 \
    --head-dim 4 >/dev/null 2>&1 && env -u FASA_SERVER "$fasa" --server "$ep" sessions 2>&1 | grep -q '^g1 ' &&
    env -u FASA_SERVER "$fasa" drop g1 --server "$ep" >/dev/null 2>&1 &&
    ! env -u FASA_SERVER "$fasa" sessions --server "$ep" 2>&1 | grep -q '^g1 ' &&
    ok "--server before create/sessions, after drop SESSION" || bad "global --server with create/drop"
# A size with a suffix is the same number: --budget 1K is --budget 1024.
env -u FASA_SERVER "$fasa" create --server "$ep" --session g2 --layers 1 --heads 2 --kv-heads 1 \
    --head-dim 4 --budget 1K >/dev/null 2>&1 && "$fasa" stats --session g2 2>&1 | grep -q '^session.budget 1024$' &&
    ok "create --budget 1K stores 1024" || bad "create --budget 1K: $("$fasa" stats --session g2 2>&1 | grep budget)"
"$fasa" drop g2 >/dev/null 2>&1
# sessions, profile delete, drop SESSION.
"$fasa" create --session u1 --layers 1 --heads 2 --kv-heads 1 --head-dim 4 --dtype bf16 >/dev/null
"$fasa" sessions >"$tmp/ls" 2>&1
grep -q '^u1 layers 1 heads 2 kv_heads 1 head_dim 4 dtype bf16 tokens 0 kv_bytes 0 profile no$' "$tmp/ls" &&
    grep -q '^profiles 1: stories$' "$tmp/ls" && ok "fasa sessions: $(tr '\n' ';' <"$tmp/ls")" ||
    bad "fasa sessions: $(cat "$tmp/ls")"
"$fasa" snapshot --all >/dev/null 2>&1
ls "$tmp/state"/*.profile >/dev/null 2>&1 && ok "the profile is saved" || bad "no saved profile"
"$fasa" profile delete stories >"$tmp/pd" 2>&1 && grep -q 'deleted profile stories' "$tmp/pd" &&
    ! ls "$tmp/state"/*.profile >/dev/null 2>&1 && ok "fasa profile delete: the profile and its file are gone" ||
    bad "profile delete: $(cat "$tmp/pd") $(ls "$tmp/state")"
expect_error "profile delete again" "no profile 'stories' is stored" "$fasa" profile delete stories
"$fasa" profile --help | grep -q 'usage: fasa profile delete NAME' && ok "profile --help" || bad "profile --help"
"$fasa" sessions --help | grep -q 'usage: fasa sessions' && ok "sessions --help" || bad "sessions --help"
"$fasa" drop u1 >"$tmp/drop" 2>&1 && grep -q 'dropped session u1' "$tmp/drop" && ok "fasa drop u1" ||
    bad "fasa drop u1: $(cat "$tmp/drop")"
expect_error "drop twice named" "give the session once" "$fasa" drop u1 --session u2

# Ctrl-C during a long command: exit 130, and its sessions are dropped on the way out.
"$fasa" demo --tokens 262144 --steps 50 >"$tmp/int.out" 2>&1 &
pid=$!
for _ in $(seq 1 200); do grep -q '^sessions:' "$tmp/int.out" 2>/dev/null && break; sleep 0.05; done
sleep 0.5
kill -INT $pid
wait $pid
rc=$?
n=$("$fasa" stats | awk '$1 == "n_sessions" { print $2 }')
[ $rc -eq 130 ] && [ "$n" = 0 ] && ok "SIGINT: exit 130, no session left on the server" ||
    bad "SIGINT: exit $rc, $n sessions left: $(tail -2 "$tmp/int.out")"

# The log: who, the server's request number, one line per state change at info.
grep -E 'INFO rank=0 req=[0-9]+ n=[0-9]+ peer=127\.0\.0\.1 create_session session=u1 OK' "$log" >/dev/null &&
    ok "log: $(grep -m1 'create_session session=u1' "$log" | cut -d' ' -f2-)" ||
    bad "no info line for the create: $(grep u1 "$log")"
grep -E 'INFO .* drop_session session=u1 OK' "$log" >/dev/null && ok "log: the drop at info" || bad "no drop line"
grep -E 'INFO .* append session=cli-' "$log" >/dev/null && ok "log: appends at info" || bad "no append line"
grep -E 'INFO .* delete_profile profile=stories OK' "$log" >/dev/null && ok "log: the profile delete at info" ||
    bad "no delete_profile line"
nums=$(grep -oE ' n=[0-9]+ ' "$log" | tr -d ' n=' )
[ "$(printf '%s\n' "$nums" | sort -n | uniq -d | wc -l)" -eq 0 ] && [ "$(printf '%s\n' "$nums" | wc -l)" -ge 5 ] &&
    ok "server request numbers are unique across clients ($(printf '%s\n' "$nums" | wc -l) lines)" ||
    bad "request numbers repeat"
bash "$root/deploy/stop-local.sh" >/dev/null 2>&1
unset FASA_SERVER

# ---- without a server ----
expect_error "no tcp://" "names no transport: write tcp://127.0.0.1:6501" "$fasa" ping --server 127.0.0.1:6501
dead=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
expect_error "a dead port" "no server answered at tcp://127.0.0.1:$dead: the connection was refused" \
    env FASA_TIMEOUT_MS=60000 timeout 20 "$fasa" ping --server "tcp://127.0.0.1:$dead"
model=$shared/data/models/stories260K/stories260K.bin
tokz=$shared/data/models/stories260K/tok512.bin
text=$shared/data/text/tinystories_train_head.txt
for c in "replay --qkv $dump --method dense --out $tmp/y.npy" "demo" \
         "calibrate --qkv $dump --ntip 1 --out $tmp/y.profile" \
         "ppl --model $model --tokenizer $tokz --text $text --method dense" \
         "generate --model $model --tokenizer $tokz --steps 1"; do
    # shellcheck disable=SC2086
    expect_error "FASA_SERVER for ${c%% *}" "tcp://127.0.0.1:$dead" env FASA_SERVER="tcp://127.0.0.1:$dead" "$fasa" $c
done
expect_error "FASA_TIMEOUT_MS=abc" "FASA_TIMEOUT_MS='abc' must be a whole number" env FASA_TIMEOUT_MS=abc "$fasa" ping --server tcp://127.0.0.1:1
expect_error "FASA_SIMD=bogus" "FASA_SIMD='bogus' is not portable, avx2 or avx512" env FASA_SIMD=bogus "$fasa" demo --tokens 1024
if [ -f "$dump" ]; then
    expect_error "replay --out unwritable" "--out\|cannot write it" "$fasa" replay --qkv "$dump" --method dense --out "$tmp/no/dir/o.npy"
    "$fasa" replay --qkv "$dump" --method dense --positions 2000:2048:16 --out "$tmp/d1.npy" >/dev/null 2>&1 &&
    "$fasa" replay --qkv "$dump" --method dense --budget 7 --positions 2000:2048:16 --out "$tmp/d2.npy" >/dev/null 2>&1 &&
        cmp -s "$tmp/d1.npy" "$tmp/d2.npy" && cmp -s "$tmp/d1.npy" "$tmp/o.npy" &&
        ok "replay --method dense: no --budget needed, the same outputs as with one (and as on the server)" ||
        bad "replay --method dense without --budget"
fi
"$fasa" demo --tokens 1024 --steps 1 --dtype f16 >"$tmp/f16.out" 2>&1
grep -q 'f16 K+V: 0.00 GiB each' "$tmp/f16.out" && ok "demo --dtype f16 names its bytes" || bad "demo f16: $(grep sessions: "$tmp/f16.out")"
"$fasa" stats --help | grep -q 'a method no step ran has 0 steps' && ok "stats --help" || bad "stats --help"

out=$(FASA_SIMD=bogus timeout 20 "$build/fasa-server" --bind "tcp://127.0.0.1:*" 2>&1); rc=$?
[ $rc -eq 2 ] && [ "$out" = "fasa-server: FASA_SIMD='bogus' is not portable, avx2 or avx512" ] &&
    ok "fasa-server refuses FASA_SIMD=bogus" || bad "fasa-server FASA_SIMD=bogus: exit $rc, $out"

# FASA_TEST_PORTS keeps a script's server inside the range.
lo=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
hi=$((lo + 3))
if FASA_TEST_PORTS=$lo-$hi FASA_RUN_DIR=$tmp/ranged bash "$root/deploy/run-local.sh" 1 \
       --bind 'tcp://127.0.0.1:*' >"$tmp/ranged.out" 2>&1; then
    p=$(cat "$tmp/ranged/endpoint")
    p=${p##*:}
    [ "$p" -ge "$lo" ] && [ "$p" -le "$hi" ] && ok "FASA_TEST_PORTS=$lo-$hi: the server bound port $p" ||
        bad "FASA_TEST_PORTS=$lo-$hi: port $p"
    FASA_RUN_DIR=$tmp/ranged bash "$root/deploy/stop-local.sh" >/dev/null 2>&1
else
    bad "run-local with FASA_TEST_PORTS: $(cat "$tmp/ranged.out")"
fi
FASA_TEST_PORTS=abc FASA_RUN_DIR=$tmp/ranged bash "$root/deploy/run-local.sh" 1 --bind 'tcp://127.0.0.1:*' \
    >"$tmp/out" 2>"$tmp/err"
rc=$?
[ $rc -eq 2 ] && grep -q "FASA_TEST_PORTS='abc' must be LO-HI" "$tmp/err" && ok "FASA_TEST_PORTS=abc refused" ||
    bad "FASA_TEST_PORTS=abc: exit $rc, $(cat "$tmp/err")"

echo "ux_test: $pass passed, $fail failed"
[ $fail -eq 0 ]

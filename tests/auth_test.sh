#!/usr/bin/env bash
# CURVE authentication end to end: `fasa keygen` files and modes; fasa-server (2 ranks, on
# loopback) with --curve-secret and --authorized-keys; an authorised client's ping and
# `fasa replay --server` equal the embedded engine's; a client with an unknown key, a plain
# client and one with the wrong server key are refused (non-zero exit, a clear message,
# the refusal in the server log) while the authorised one is still served; the server
# refuses a non-loopback --bind without keys (every rank exits) and accepts it with them.
# usage: auth_test.sh BUILD_DIR SHARED_DIR
set -u
build=$1
shared=$2
source "$(dirname "$0")/server_util.sh"
server=$build/fasa-server
dump=$shared/data/models/stories260K/golden/tinystories_T2048.qkv
unset FASA_CURVE_SECRET FASA_AUTHORIZED_KEYS FASA_CURVE_SERVER_KEY FASA_CURVE_CLIENT_SECRET \
      FASA_BIND FASA_CONFIG FASA_SERVER
client_asan=${ASAN_OPTIONS:-}
client_asan=${client_asan//detect_leaks=0/detect_leaks=1}
open_pid=
cleanup() {
    bash "$root/deploy/stop-local.sh" >/dev/null 2>&1 || true
    [ -n "$open_pid" ] && kill "$open_pid" 2>/dev/null
    rm -rf "$tmp"
}
fasa_c() { ASAN_OPTIONS=$client_asan "$fasa" "$@"; }

# ---- keygen ----
mode() { stat -c %a "$1"; }
z85='^[]0-9a-zA-Z.:+=^!/*?&<>()[{}@%$#-]{40}$'   # the Z85 alphabet (']' first: literal)
keys_ok() {   # NAME: the two files, their modes, one 40-character Z85 line each
    [ "$(mode "$1.key")" = 600 ] && [ "$(mode "$1.pub")" = 644 ] &&
    [ "$(stat -c %s "$1.key")" = 41 ] && [ "$(stat -c %s "$1.pub")" = 41 ] &&
    grep -Eq "$z85" "$1.key" && grep -Eq "$z85" "$1.pub" && ! cmp -s "$1.key" "$1.pub"
}
mkdir -p "$tmp/keys" "$tmp/empty"
for name in server alice mallory; do
    if fasa_c keygen "$tmp/$name" >/dev/null 2>"$tmp/err" && keys_ok "$tmp/$name"; then
        ok "keygen $name: .key 0600, .pub 0644, one 40-character Z85 line each"
    else
        bad "keygen $name: $(cat "$tmp/err"); $(ls -l "$tmp/$name".* 2>&1)"
    fi
done
(umask 077 && fasa_c keygen "$tmp/masked" >/dev/null) && keys_ok "$tmp/masked" &&
    ok "keygen under umask 077: still 0600/0644" || bad "keygen under umask 077: $(ls -l "$tmp"/masked.*)"
cp "$tmp/alice.pub" "$tmp/keys/"
before=$(cat "$tmp/alice.key" "$tmp/alice.pub")
if ! fasa_c keygen "$tmp/alice" >/dev/null 2>"$tmp/err" && grep -q 'already exists (use --force' "$tmp/err" &&
   [ "$(cat "$tmp/alice.key" "$tmp/alice.pub")" = "$before" ]; then
    ok "keygen refuses to overwrite: $(cat "$tmp/err")"
else
    bad "keygen over existing files: $(cat "$tmp/err")"
fi
cp "$tmp/masked.key" "$tmp/forced.key"
if fasa_c keygen --force "$tmp/forced" >/dev/null 2>"$tmp/err" && keys_ok "$tmp/forced" &&
   ! cmp -s "$tmp/forced.key" "$tmp/masked.key"; then
    ok "keygen --force replaces the pair"
else
    bad "keygen --force: $(cat "$tmp/err")"
fi
fasa_c keygen --help | grep -q 'usage: fasa keygen' && ok "keygen --help" || bad "keygen --help"

# ---- the non-loopback bind rule ----
msg="fasa-server: --bind tcp://0.0.0.0:* is not loopback: to serve other hosts give --curve-secret FILE and --authorized-keys DIR (see 'fasa keygen'), or bind tcp://127.0.0.1"
out=$(timeout 120 mpirun -n 2 "$server" --bind 'tcp://0.0.0.0:*' 2>&1); rc=$?
if [ $rc -ne 0 ] && [ $rc -ne 124 ] && printf '%s\n' "$out" | grep -qxF "$msg"; then
    ok "2 ranks refuse --bind tcp://0.0.0.0:* without keys (exit $rc, every rank gone)"
else
    bad "bind 0.0.0.0 without keys: exit $rc, output: $out"
fi
out=$("$server" --bind 'tcp://127.0.0.1:*' --curve-secret "$tmp/server.key" 2>&1); rc=$?
[ $rc -eq 2 ] && printf '%s' "$out" | grep -q 'curve-secret needs --authorized-keys too' &&
    ok "--curve-secret alone refused" || bad "--curve-secret alone: exit $rc, $out"
chmod 640 "$tmp/server.key"
out=$(timeout 60 "$server" --bind 'tcp://127.0.0.1:*' --curve-secret "$tmp/server.key" --authorized-keys "$tmp/keys" 2>&1); rc=$?
chmod 600 "$tmp/server.key"
[ $rc -ne 0 ] && printf '%s' "$out" | grep -q "server.key: permissions 0640 are too open" &&
    ok "a group-readable secret key refused" || bad "group-readable secret key: exit $rc, $out"
out=$(timeout 60 "$server" --bind 'tcp://127.0.0.1:*' --curve-secret "$tmp/server.key" --authorized-keys "$tmp/empty" 2>&1); rc=$?
[ $rc -ne 0 ] && printf '%s' "$out" | grep -q "no \*.pub key files" &&
    ok "an empty --authorized-keys refused" || bad "empty authorized-keys: exit $rc, $out"

# With keys the same bind is accepted; the check goes over loopback only, then it stops.
# (The processes above exit before binding; from here every bind honours FASA_TEST_PORTS.)
source "$root/deploy/ports.sh"
open_bind=$(fasa_bind_endpoint 0.0.0.0) || exit 1
"$server" --bind "$open_bind" --endpoint-file "$tmp/open.ep" --curve-secret "$tmp/server.key" \
    --authorized-keys "$tmp/keys" >"$tmp/open.log" 2>&1 &
open_pid=$!
for _ in $(seq 1 100); do [ -s "$tmp/open.ep" ] && break; kill -0 $open_pid 2>/dev/null || break; sleep 0.1; done
ep_open=$(cat "$tmp/open.ep" 2>/dev/null)
case "$ep_open" in
    tcp://0.0.0.0:*)
        if fasa_c ping --server "tcp://127.0.0.1:${ep_open##*:}" --curve-server-key "$tmp/server.pub" \
               --curve-secret "$tmp/alice.key" >/dev/null 2>"$tmp/err"; then
            ok "--bind tcp://0.0.0.0:* with keys accepted ($ep_open) and serving"
        else
            bad "ping of the 0.0.0.0 server: $(cat "$tmp/err")"
        fi ;;
    *) bad "the server with keys did not bind 0.0.0.0: $(cat "$tmp/open.log")" ;;
esac
kill "$open_pid" 2>/dev/null
wait "$open_pid" 2>/dev/null
open_pid=

# A peer that accepts the TCP connection but never speaks ZeroMQ: the client's wait ends
# with the hint that the handshake did not complete (not a bare "no reply").
if command -v python3 >/dev/null; then
    python3 -c '
import os, socket, sys, time
s = socket.socket()
s.bind(("127.0.0.1", int(sys.argv[2] or 0)))
s.listen(8)
with open(sys.argv[1] + ".tmp", "w") as f: f.write(str(s.getsockname()[1]))
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
s.settimeout(20)
held = []
try:
    while True: held.append(s.accept()[0])
except OSError:
    pass
' "$tmp/mute.port" "$(fasa_pick_port)" &
    mute_pid=$!
    for _ in $(seq 1 100); do [ -s "$tmp/mute.port" ] && break; sleep 0.1; done
    out=$(FASA_TIMEOUT_MS=1500 fasa_c ping --server "tcp://127.0.0.1:$(cat "$tmp/mute.port")" \
              --curve-server-key "$tmp/server.pub" --curve-secret "$tmp/alice.key" 2>&1); rc=$?
    kill "$mute_pid" 2>/dev/null
    wait "$mute_pid" 2>/dev/null
    [ $rc -ne 0 ] && printf '%s' "$out" | grep -q "within 1500 ms: connected, but the security handshake did not complete (if the server requires CURVE, check --curve-server-key" &&
        ok "a silent peer: $out" || bad "a silent peer: exit $rc, $out"
else
    echo "skip: no python3 for the silent-peer check"
fi

# ---- a CURVE server with 2 ranks on loopback ----
export FASA_CURVE_SERVER_KEY=$tmp/server.pub FASA_CURVE_CLIENT_SECRET=$tmp/alice.key  # run-local's ping
start_local 2 --bind 'tcp://127.0.0.1:*' -- --block 64 --curve-secret "$tmp/server.key" \
    --authorized-keys "$tmp/keys" || exit 1
unset FASA_CURVE_SERVER_KEY FASA_CURVE_CLIENT_SECRET
log=$FASA_RUN_DIR/fasa-server.log
launcher=$(cat "$FASA_RUN_DIR/launcher.pid")
ranks=$(pgrep -P "$launcher" | tr '\n' ' ')
grep -q "curve: on; 1 authorized client key from $tmp/keys" "$log" && ok "server log: curve on, 1 key" ||
    bad "no curve line in the log: $(head -3 "$log")"
good=(--curve-server-key "$tmp/server.pub" --curve-secret "$tmp/alice.key")

fasa_c ping --server "$ep" "${good[@]}" >/dev/null 2>"$tmp/err" && ok "authorised ping (flags)" ||
    bad "authorised ping: $(cat "$tmp/err")"
FASA_CURVE_SERVER_KEY=$tmp/server.pub FASA_CURVE_CLIENT_SECRET=$tmp/alice.key \
    fasa_c ping --server "$ep" >/dev/null 2>"$tmp/err" && ok "authorised ping (environment)" ||
    bad "authorised ping from the environment: $(cat "$tmp/err")"

# replay --server (authorised) equals the embedded engine.
if [ -f "$dump" ]; then
    for m in dense oracle; do
        common=(replay --qkv "$dump" --method $m --budget 32 --positions 1024:2048:128)
        if ! fasa_c "${common[@]}" --out "$tmp/e_$m.npy" --selected "$tmp/e_$m.sel.npy" >/dev/null 2>"$tmp/err"; then
            bad "embedded replay $m: $(cat "$tmp/err")"; continue
        fi
        if ! fasa_c "${common[@]}" --server "$ep" "${good[@]}" --out "$tmp/s_$m.npy" \
                --selected "$tmp/s_$m.sel.npy" >/dev/null 2>"$tmp/err"; then
            bad "replay --server $m with keys: $(cat "$tmp/err")"; continue
        fi
        if d=$("$build/npy_diff" "$tmp/e_$m.npy" "$tmp/s_$m.npy" 1e-6); then ok "replay $m over CURVE vs embedded: $d"
        else bad "replay $m over CURVE vs embedded: $d"; fi
        cmp -s "$tmp/e_$m.sel.npy" "$tmp/s_$m.sel.npy" && ok "replay $m over CURVE: identical selections" ||
            bad "replay $m over CURVE: selections differ"
    done
else
    echo "skip: $dump not found"
fi

# refused: expect_refused WHAT PATTERN ARGS...: non-zero exit, the message matches.
expect_refused() {
    local what=$1 pattern=$2
    shift 2
    if FASA_TIMEOUT_MS=10000 fasa_c "$@" >/dev/null 2>"$tmp/err"; then
        bad "$what: served"
    elif grep -Eq -- "$pattern" "$tmp/err"; then
        ok "$what refused: $(cat "$tmp/err")"
    else
        bad "$what: unexpected message: $(cat "$tmp/err")"
    fi
}
mallory=(--curve-server-key "$tmp/server.pub" --curve-secret "$tmp/mallory.key")
expect_refused "unknown key (ping)" "refused this client \(ZAP status 400\): its public key is not in the server's --authorized-keys" \
    ping --server "$ep" "${mallory[@]}"
expect_refused "unknown key (replay)" "refused this client" \
    replay --qkv "$dump" --method dense --budget 32 --positions 1024:1100 --server "$ep" "${mallory[@]}" --out "$tmp/m.npy"
[ -e "$tmp/m.npy" ] && bad "the refused replay wrote an output"
mallory_pub=$(cat "$tmp/mallory.pub")
grep -F "refused a client from 127.0.0.1: its key is not in --authorized-keys $tmp/keys (public key $mallory_pub)" "$log" >/dev/null &&
    ok "server log names the refused key" || bad "no refusal in the server log: $(grep -i refused "$log")"
# (the server drops a plain client, or the client sees the mechanism mismatch first)
expect_refused "plain client" "the server (probably )?requires CURVE: give --curve-server-key FILE" \
    ping --server "$ep"
# (rank 0 logs it when its poll loop reads the socket's event: wait for the line)
for _ in $(seq 1 100); do grep -q "refused a client in the security handshake" "$log" && break; sleep 0.1; done
line=$(grep -m1 "refused a client in the security handshake" "$log")
[ -n "$line" ] && ok "server log: ${line#* req=- }" || bad "no handshake refusal in the server log"
expect_refused "wrong server key" "check --curve-server-key: it must be the server's public key" \
    ping --server "$ep" --curve-server-key "$tmp/alice.pub" --curve-secret "$tmp/alice.key"
expect_refused "half the client flags" "--curve-server-key needs --curve-secret too" \
    ping --server "$ep" --curve-server-key "$tmp/server.pub"
chmod 644 "$tmp/alice.key"
expect_refused "a readable client secret key" "alice.key: permissions 0644 are too open" \
    ping --server "$ep" "${good[@]}"
chmod 600 "$tmp/alice.key"

# Still serving the authorised client; then it stops cleanly with a Shutdown over CURVE.
fasa_c ping --server "$ep" "${good[@]}" >/dev/null 2>"$tmp/err" && ok "authorised client still served" ||
    bad "ping after the refusals: $(cat "$tmp/err")"
fasa_c shutdown --server "$ep" "${good[@]}" >/dev/null 2>"$tmp/err" || bad "shutdown: $(cat "$tmp/err")"
wait_gone $launcher $ranks && ok "every rank gone after a Shutdown over CURVE" || bad "ranks still running after the shutdown"

echo "auth_test: $pass passed, $fail failed"
[ $fail -eq 0 ]

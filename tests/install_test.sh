#!/usr/bin/env bash
# What a user meets first. Installs the build into a temporary prefix, runs the installed
# `fasa --version` and `fasa-server --help` (their RPATH finds libfasa.so.0 in PREFIX/lib),
# builds tests/install_client.c with `pkg-config --cflags --libs fasa` against the installed
# files only, and runs it against the installed fasa-server on 3 ranks started with
# --metrics-bind (and --block 4). Then the metrics endpoint over HTTP (curl): the numbers the client's own
# requests imply (sessions, K+V bytes = layers x tokens x kv_heads x head_dim x 2 x 4,
# requests and errors by type and code, per-rank tokens on the 2 workers and none on rank
# 0), 404 and 405 for other paths and methods, and the refusal of a non-loopback
# --metrics-bind without CURVE.
# usage: install_test.sh BUILD_DIR SANITIZED(0|1)
set -u
build=$1
sanitized=${2:-0}
root=$(cd "$(dirname "$0")/.." && pwd)
tmp=$(mktemp -d)
prefix=$tmp/prefix
export FASA_RUN_DIR=$tmp/run
pass=0
fail=0
ok() { pass=$((pass + 1)); echo "ok: $*"; }
bad() { fail=$((fail + 1)); echo "FAIL: $*"; }
cleanup() {
    FASA_BUILD=$prefix/bin bash "$root/deploy/stop-local.sh" >/dev/null 2>&1 || true
    rm -rf "$tmp"
}
trap cleanup EXIT
source "$root/deploy/ports.sh"

if cmake --install "$build" --prefix "$prefix" >"$tmp/install.log" 2>&1; then
    ok "cmake --install into $prefix"
else
    bad "cmake --install: $(tail -5 "$tmp/install.log")"
    exit 1
fi
grep -q 'Set runtime path of ".*/bin/fasa" to ""' "$tmp/install.log" &&
    bad "install cleared fasa's runtime path"
out=$(env -u LD_LIBRARY_PATH "$prefix/bin/fasa" --version 2>&1); rc=$?
[ $rc -eq 0 ] && [ "$out" = "fasa 0.1.0" ] && ok "installed fasa --version: $out" ||
    bad "installed fasa --version: exit $rc, $out"
out=$(env -u LD_LIBRARY_PATH "$prefix/bin/fasa-server" --help 2>&1); rc=$?
[ $rc -eq 0 ] && printf '%s' "$out" | grep -q -- '--metrics-bind ADDR:PORT' &&
    ok "installed fasa-server --help (lists --metrics-bind)" ||
    bad "installed fasa-server --help: exit $rc, $(printf '%s' "$out" | head -3)"

# A program built from the installed header, library and fasa.pc only.
export PKG_CONFIG_PATH=$prefix/lib/pkgconfig
flags=$(pkg-config --cflags --libs fasa 2>&1) || bad "pkg-config --cflags --libs fasa: $flags"
libdir=$(pkg-config --variable=libdir fasa)
san=()
[ "$sanitized" = 1 ] && san=(-fsanitize=address,undefined)
cp "$root/tests/install_client.c" "$tmp/client.c"
if (cd "$tmp" && cc -std=c11 -Wall -Wextra -Werror "${san[@]}" client.c -o client $flags \
        -Wl,-rpath,"$libdir") 2>"$tmp/cc.log"; then
    ok "built client.c with: cc client.c $flags"
else
    bad "building client.c: $(cat "$tmp/cc.log")"
fi
[ -x "$tmp/client" ] && "$tmp/client" >"$tmp/client.out" 2>&1 && ok "$(cat "$tmp/client.out" | tr '\n' ';')" ||
    bad "client without a server: $(cat "$tmp/client.out" 2>/dev/null)"

# The installed server on 3 ranks with the metrics endpoint.
mport=$(fasa_pick_port) || exit 1
mport=${mport:-0}
if ! FASA_BUILD=$prefix/bin bash "$root/deploy/run-local.sh" 3 --bind 'tcp://127.0.0.1:*' -- \
       --metrics-bind "127.0.0.1:$mport" --block 4 >"$tmp/start" 2>&1; then
    bad "the installed server did not start: $(cat "$tmp/start")"
    echo "install_test: $pass passed, $fail failed"
    exit 1
fi
ep=$(cat "$FASA_RUN_DIR/endpoint")
log=$FASA_RUN_DIR/fasa-server.log
murl=$(grep -o 'metrics: http://[^ ]*' "$log" | head -1 | sed 's/^metrics: //')
[ -n "$murl" ] && ok "server log: metrics at $murl" || bad "no metrics line in the log: $(cat "$log")"
if "$tmp/client" "$ep" >"$tmp/client.out" 2>&1; then
    ok "client against the installed server: $(tail -1 "$tmp/client.out")"
else
    bad "client against the server: $(cat "$tmp/client.out")"
fi
code=$(curl -s -o "$tmp/metrics" -w '%{http_code} %{content_type}' "$murl")
case "$code" in
    "200 text/plain; version=0.0.4"*) ok "GET /metrics: $code" ;;
    *) bad "GET /metrics: $code" ;;
esac
metric() { awk -v k="$1" '$1 == k { print $2; f = 1 } END { if (!f) print "missing" }' "$tmp/metrics"; }
expect() {
    local got
    got=$(metric "$1")
    [ "$got" = "$2" ] && ok "$1 = $2" || bad "$1 = $got, expected $2"
}
expect fasa_ranks 3
expect fasa_shards 2
expect fasa_sessions 1
expect fasa_kv_bytes $((2 * 10 * 2 * 8 * 2 * 4))
expect 'fasa_requests_total{type="create_session"}' 2
expect 'fasa_requests_total{type="append"}' 2
expect 'fasa_requests_total{type="attend"}' 5
expect 'fasa_requests_total{type="drop_session"}' 1
expect 'fasa_requests_total{type="list_sessions"}' 0
expect 'fasa_errors_total{code="NOT_FOUND"}' 1
expect 'fasa_attend_steps_total' 4
expect 'fasa_rank_shards{rank="0"}' 0
expect 'fasa_rank_tokens{rank="0"}' 0
t1=$(metric 'fasa_rank_tokens{rank="1"}')
t2=$(metric 'fasa_rank_tokens{rank="2"}')
# --block 4: positions 0-3 and 8-9 on shard 0 (rank 1), 4-7 on shard 1 (rank 2).
[ "$t1" = 6 ] && [ "$t2" = 4 ] && ok "per-rank tokens: rank 1 $t1, rank 2 $t2 (blocks of 4)" ||
    bad "per-rank tokens: rank 1 $t1, rank 2 $t2, expected 6 and 4"
sum=0
for r in 1 2; do
    for kind in kdom krest v; do
        sum=$((sum + $(metric "fasa_rank_kv_bytes{rank=\"$r\",kind=\"$kind\"}")))
    done
done
[ "$sum" = $((2 * 10 * 2 * 8 * 2 * 4)) ] && ok "per-rank K+V bytes add up to fasa_kv_bytes ($sum)" ||
    bad "per-rank K+V bytes: $sum"
# A scrape is not a request: a second one sees the same request counts.
curl -s "$murl" >"$tmp/metrics2"
cmp -s <(grep '^fasa_requests_total' "$tmp/metrics") <(grep '^fasa_requests_total' "$tmp/metrics2") &&
    ok "scrapes are not counted as requests" || bad "the request counts moved between two scrapes"
# The same formatter as `fasa stats --format prometheus`: the same metric names.
"$prefix/bin/fasa" stats --server "$ep" --format prometheus >"$tmp/cli.prom" 2>&1
diff <(grep '^# TYPE' "$tmp/metrics") <(grep '^# TYPE' "$tmp/cli.prom") >/dev/null &&
    ok "the endpoint and fasa stats --format prometheus have the same metric families" ||
    bad "metric families differ: $(diff <(grep '^# TYPE' "$tmp/metrics") <(grep '^# TYPE' "$tmp/cli.prom") | head -5)"
code=$(curl -s -o /dev/null -w '%{http_code}' "${murl%/metrics}/other")
[ "$code" = 404 ] && ok "GET /other: 404" || bad "GET /other: $code"
code=$(curl -s -o /dev/null -w '%{http_code}' -X POST -d x "$murl")
[ "$code" = 405 ] && ok "POST /metrics: 405" || bad "POST /metrics: $code"
FASA_BUILD=$prefix/bin bash "$root/deploy/stop-local.sh" >/dev/null 2>&1
code=$(curl -s -o /dev/null -w '%{http_code}' "$murl")
[ "$code" = 000 ] && ok "the endpoint is gone after the server stopped" || bad "after stop: $code"

msg="fasa-server: --metrics-bind 0.0.0.0:9464 is not loopback: metrics beyond this host need CURVE on (--curve-secret, --authorized-keys), or bind 127.0.0.1:PORT"
out=$("$prefix/bin/fasa-server" --metrics-bind 0.0.0.0:9464 2>&1); rc=$?
[ $rc -eq 2 ] && [ "$out" = "$msg" ] && ok "a non-loopback --metrics-bind without CURVE refused" ||
    bad "non-loopback --metrics-bind: exit $rc, $out"
out=$("$prefix/bin/fasa-server" --metrics-bind 127.0.0.1 2>&1); rc=$?
[ $rc -eq 2 ] && printf '%s' "$out" | grep -q "must be ADDR:PORT" && ok "--metrics-bind without a port refused" ||
    bad "--metrics-bind without a port: exit $rc, $out"

echo "install_test: $pass passed, $fail failed"
[ $fail -eq 0 ]

#!/usr/bin/env bash
# The decode round trip end to end (issue 20) on a 2-rank server bound to an ipc://
# endpoint: libfasa's attend halves against fasa_client_attend and the embedded engine
# (tests/latency_client.c), `fasa bench latency` over ipc:// (every server output equal to
# the embedded engine's, the JSON figures present), and `fasa ppl --server ipc://...` on
# stories260K giving the embedded run's perplexity.
# usage: latency_test.sh BUILD_DIR SHARED_DIR
set -u
build=$1
shared=$2
source "$(dirname "$0")/server_util.sh"

start_local 2 --bind "ipc://$tmp/fasa.sock" || exit 1
[ "$ep" = "ipc://$tmp/fasa.sock" ] && ok "bound $ep" || bad "endpoint '$ep'"

if out=$("$build/latency_client" "$ep" 1 2>&1); then ok "$out"; else bad "$out"; fi

if "$fasa" bench latency --server "$ep" --tokens 1024 --layers 2 --steps 3 \
        --json "$tmp/lat.json" > "$tmp/lat.txt" 2>&1; then
    ok "fasa bench latency over ipc://"
else
    bad "fasa bench latency: $(tail -3 "$tmp/lat.txt")"
fi
grep -q '^cpu: ' "$tmp/lat.txt" && ok "prints the CPU" || bad "no cpu line"
for key in attend_us_p50 overhead_us_p50 overhead_us_p99; do
    grep -q "\"$key\": [-0-9]" "$tmp/lat.json" && ok "json $key" || bad "json has no $key"
done
rows=$(grep -c '"max_abs_diff"' "$tmp/lat.json")
same=$(grep -c '"max_abs_diff": 0,' "$tmp/lat.json")
[ "$rows" -eq 2 ] && [ "$same" -eq 2 ] && ok "server outputs equal the embedded engine's ($rows rows)" ||
    bad "max_abs_diff: $same of $rows rows are 0"

m=$shared/data/models/stories260K
if [ -f "$m/stories260K.bin" ]; then
    args=(--model "$m/stories260K.bin" --tokenizer "$m/tok512.bin" --text "$root/README.md"
          --tokens 96 --method dense)
    emb=$("$fasa" ppl "${args[@]}" 2>&1 | grep '^positions')
    srv=$("$fasa" ppl "${args[@]}" --server "$ep" 2>&1 | grep '^positions')
    [ -n "$emb" ] && [ "$emb" = "$srv" ] && ok "ppl over ipc:// = embedded: $srv" ||
        bad "ppl: embedded '$emb', server '$srv'"
else
    echo "skip: no stories260K model under $m"
fi

echo "latency_test: $pass passed, $fail failed"
[ "$fail" -eq 0 ]

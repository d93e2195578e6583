#!/usr/bin/env bash
# The fasa CLI end to end: --help everywhere, calibrate + replay on the recorded dump,
# and bad input that must exit non-zero with one clear line naming the problem.
# usage: cli_test.sh FASA_BINARY SHARED_DIR
set -u
fasa=$1
shared=$2
dump=$shared/data/models/stories260K/golden/tinystories_T2048.qkv
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
pass=0
fail=0

ok() { pass=$((pass + 1)); }
bad() { fail=$((fail + 1)); echo "FAIL: $*"; }

# expect_error NAME PATTERN CMD...: non-zero exit, exactly one stderr line matching PATTERN.
source "$(dirname "$0")/expect.sh"

# le32 N: N as 4 little-endian bytes.
le32() { printf "\\x$(printf %02x $(($1 & 255)))\\x$(printf %02x $((($1 >> 8) & 255)))\\x$(printf %02x $((($1 >> 16) & 255)))\\x$(printf %02x $((($1 >> 24) & 255)))"; }

# make_dump FILE T L H HKV D: a valid QKV1 dump of zeros with that geometry (vocab 0).
make_dump() {
    local f=$1 T=$2 L=$3 H=$4 HKV=$5 D=$6
    { printf 'QKV1'; le32 1; le32 "$T"; le32 "$L"; le32 "$H"; le32 "$HKV"; le32 "$D"; le32 0; le32 0; le32 0
      head -c $((4 * T)) /dev/zero
      head -c $((4 * L * T * (H + 2 * HKV) * D)) /dev/zero; } >"$f"
}

for cmd in "" calibrate replay demo ppl generate ping stats create append attend drop shutdown; do
    if $fasa $cmd --help >"$tmp/out" 2>&1 && grep -q usage "$tmp/out"; then ok; else bad "fasa $cmd --help"; fi
done
# The commands that can run on a server say so in their --help.
for cmd in calibrate replay demo ppl generate; do
    if $fasa $cmd --help | grep -q -- '--server'; then ok; else bad "fasa $cmd --help lacks --server"; fi
done
if $fasa --help | grep -q '^  ping'; then ok; else bad "fasa --help lacks the server commands"; fi

# A real calibrate + replay round on the dump.
if $fasa calibrate --qkv "$dump" --ntip 2 --window 32 --positions 1024:2048:64 --out "$tmp/p.profile" >"$tmp/out" 2>&1 &&
   grep -q '^ntip 2$' "$tmp/p.profile" && [ "$(grep -c '^[0-9]* [0-9]* :' "$tmp/p.profile")" -eq 40 ]; then ok
else bad "calibrate: $(cat "$tmp/out")"; fi
if $fasa replay --qkv "$dump" --method fasa --budget 16 --profile "$tmp/p.profile" --positions 1984:2048:16 \
      --out "$tmp/o.npy" --selected "$tmp/s.npy" --compare >"$tmp/out" 2>&1 &&
   [ "$(stat -c %s "$tmp/o.npy")" -eq $((128 + 4 * 4 * 5 * 8 * 8)) ] &&
   [ "$(stat -c %s "$tmp/s.npy")" -eq $((128 + 4 * 4 * 5 * 8 * 16)) ] &&
   grep -q '^0 *dense' "$tmp/out" && grep -q '^4 *sparse' "$tmp/out"; then ok
else bad "replay: $(cat "$tmp/out")"; fi

# Bad input.
make_dump "$tmp/odd.qkv" 4 1 2 1 7
make_dump "$tmp/small.qkv" 4 1 2 1 4
head -c 100000 "$dump" >"$tmp/trunc.qkv"
printf 'NOPE0000000000000000000000000000000000000000' >"$tmp/magic.qkv"
$fasa calibrate --qkv "$tmp/small.qkv" --ntip 1 --out "$tmp/small.profile" >/dev/null 2>&1 || bad "calibrate small dump"

expect_error "missing file" "cannot open" $fasa calibrate --qkv "$tmp/none.qkv" --ntip 2 --out "$tmp/x"
expect_error "wrong magic" "magic" $fasa calibrate --qkv "$tmp/magic.qkv" --ntip 2 --out "$tmp/x"
expect_error "truncated dump" "truncated" $fasa replay --qkv "$tmp/trunc.qkv" --method dense --budget 8 --out "$tmp/x.npy"
expect_error "budget 0" "budget" $fasa replay --qkv "$dump" --method dense --budget 0 --out "$tmp/x.npy"
expect_error "ntip too large" "ntip 5 exceeds the 4 FCs" $fasa calibrate --qkv "$dump" --ntip 5 --out "$tmp/x"
expect_error "odd head_dim" "head_dim 7" $fasa calibrate --qkv "$tmp/odd.qkv" --ntip 1 --out "$tmp/x"
expect_error "profile mismatch" "profile does not match" $fasa replay --qkv "$dump" --method fasa --budget 8 --profile "$tmp/small.profile" --out "$tmp/x.npy"
expect_error "fasa without profile" "needs --profile" $fasa replay --qkv "$dump" --method fasa --budget 8 --out "$tmp/x.npy"
expect_error "unknown method" "method" $fasa replay --qkv "$dump" --method magic --budget 8 --out "$tmp/x.npy"
expect_error "bad positions" "positions" $fasa replay --qkv "$dump" --method dense --budget 8 --positions 10:5 --out "$tmp/x.npy"
expect_error "unknown command" "unknown command" $fasa frobnicate
expect_error "missing profile file" "cannot open profile" $fasa replay --qkv "$dump" --method fasa --budget 8 --profile "$tmp/none" --out "$tmp/x.npy"

# The llama2.c-format model: fasa dense against the runner's built-in full attention,
# greedy generation, and bad input.
model=$shared/data/models/stories260K/stories260K.bin
tokz=$shared/data/models/stories260K/tok512.bin
text=$shared/data/text/tinystories_train_head.txt
if $fasa ppl --model "$model" --tokenizer "$tokz" --text "$text" --tokens 128 --method dense >"$tmp/ppl_d" 2>&1 &&
   $fasa ppl --model "$model" --tokenizer "$tokz" --text "$text" --tokens 128 --reference >"$tmp/ppl_r" 2>&1 &&
   awk 'FNR == 1 { f++ } /^perplexity/ { p[f] = $2 }
        END { d = p[1] - p[2]; if (d < 0) d = -d; exit !(p[2] > 2 && p[2] < 8 && d <= 1e-4 * p[2]) }' \
       "$tmp/ppl_d" "$tmp/ppl_r" && grep -q '^positions 0-511: perplexity' "$tmp/ppl_d"; then ok
else bad "ppl dense vs reference: $(cat "$tmp/ppl_d" "$tmp/ppl_r")"; fi
if $fasa generate --model "$model" --tokenizer "$tokz" --steps 20 --method dense >"$tmp/gen" 2>&1 &&
   grep -q '^Once upon a time, there was a little girl named Lily\.' "$tmp/gen"; then ok
else bad "generate: $(cat "$tmp/gen")"; fi
head -c 1000 "$model" >"$tmp/trunc.bin"
mg=(--model "$model" --tokenizer "$tokz")
# --vs-dense: dense against the built-in reference has KL ~0 and full agreement; a sparse
# method's own perplexity is the same with and without the reference decode beside it.
if $fasa ppl "${mg[@]}" --text "$text" --tokens 128 --method dense --vs-dense >"$tmp/vs_d" 2>&1 &&
   awk '/^vs dense/ { k = $5; a = $9 } END { exit !(k >= 0 && k < 1e-6 && a == 1) }' "$tmp/vs_d"; then ok
else bad "ppl --vs-dense dense: $(cat "$tmp/vs_d")"; fi
$fasa calibrate --qkv "$dump" --ntip 1 --window 32 --out "$tmp/p1.profile" >/dev/null 2>&1 || bad "calibrate ntip 1"
if $fasa ppl "${mg[@]}" --text "$text" --tokens 128 --method fasa-plus --budget 8 --profile "$tmp/p1.profile" --vs-dense >"$tmp/vs_p" 2>&1 &&
   $fasa ppl "${mg[@]}" --text "$text" --tokens 128 --method fasa-plus --budget 8 --profile "$tmp/p1.profile" >"$tmp/vs_q" 2>&1 &&
   awk 'FNR == 1 { f++ } /^perplexity/ { p[f] = $2 } /^vs dense/ { k = $5; a = $9 }
        END { exit !(p[1] == p[2] && k > 0 && a > 0 && a <= 1) }' "$tmp/vs_p" "$tmp/vs_q"; then ok
else bad "ppl --vs-dense fasa-plus: $(cat "$tmp/vs_p" "$tmp/vs_q")"; fi
# Half pairing in ppl: with every FC dominant, fasa ranks by the full score, as oracle does.
$fasa calibrate --qkv "$dump" --ntip 4 --pairing half --out "$tmp/half4.profile" >/dev/null 2>&1 || bad "calibrate half"
if $fasa ppl "${mg[@]}" --text "$text" --tokens 128 --method fasa --budget 8 --dense-layers none --profile "$tmp/half4.profile" >"$tmp/ph_f" 2>&1 &&
   $fasa ppl "${mg[@]}" --text "$text" --tokens 128 --method oracle --budget 8 >"$tmp/ph_o" 2>&1 &&
   grep -q 'pairing\|perplexity' "$tmp/ph_f" &&
   awk 'FNR == 1 { f++ } /^perplexity/ { p[f] = $2 }
        END { d = p[1] - p[2]; if (d < 0) d = -d; exit !(p[2] > 2 && d <= 1e-3 * p[2]) }' "$tmp/ph_f" "$tmp/ph_o"; then ok
else bad "ppl half pairing vs oracle: $(cat "$tmp/ph_f" "$tmp/ph_o")"; fi
if $fasa generate "${mg[@]}" --steps 20 --method fasa --budget 8 --profile "$tmp/half4.profile" >"$tmp/gen_h" 2>&1 &&
   grep -q '^Once upon a time' "$tmp/gen_h"; then ok
else bad "generate half pairing: $(cat "$tmp/gen_h")"; fi
expect_error "ppl pairing mismatch" "pairing is half in the profile" $fasa ppl "${mg[@]}" --text "$text" --method fasa --budget 8 --profile "$tmp/half4.profile" --pairing interleaved
expect_error "ppl bad pairing" "--pairing" $fasa ppl "${mg[@]}" --text "$text" --pairing diagonal
expect_error "ppl fasa-plus without profile" "needs --profile or --calibrate-on" $fasa ppl "${mg[@]}" --text "$text" --method fasa-plus --budget 8
expect_error "ppl fasa-plus shared" "per-head only" $fasa ppl "${mg[@]}" --text "$text" --method fasa-plus --budget 8 --profile "$tmp/p1.profile" --gqa shared
expect_error "generate vs-dense" "does not apply" $fasa generate "${mg[@]}" --steps 3 --vs-dense
expect_error "ppl without --model" "--model CKPT is required" $fasa ppl --tokenizer "$tokz" --text "$text"
expect_error "ppl without --text" "--text FILE is required" $fasa ppl "${mg[@]}"
expect_error "ppl missing model" "cannot open model" $fasa ppl --model "$tmp/none.bin" --tokenizer "$tokz" --text "$text"
expect_error "ppl truncated model" "1000 bytes" $fasa ppl --model "$tmp/trunc.bin" --tokenizer "$tokz" --text "$text"
expect_error "ppl model as tokenizer" "tokenizer" $fasa ppl --model "$model" --tokenizer "$model" --text "$text"
expect_error "ppl missing text" "cannot open text" $fasa ppl "${mg[@]}" --text "$tmp/none.txt"
expect_error "ppl tokens 1" "--tokens" $fasa ppl "${mg[@]}" --text "$text" --tokens 1
expect_error "ppl fasa without profile" "needs --profile or --calibrate-on" $fasa ppl "${mg[@]}" --text "$text" --method fasa --budget 8
expect_error "ppl oracle without budget" "needs --budget" $fasa ppl "${mg[@]}" --text "$text" --method oracle
expect_error "ppl profile mismatch" "profile does not match" $fasa ppl "${mg[@]}" --text "$text" --method fasa --budget 8 --profile "$tmp/small.profile"
expect_error "ppl profile and calibrate" "alternatives" $fasa ppl "${mg[@]}" --text "$text" --method fasa --budget 8 --profile "$tmp/p.profile" --calibrate-on "$text"
expect_error "ppl ntip too large" "ntip 5 exceeds" $fasa ppl "${mg[@]}" --text "$text" --tokens 8 --method fasa --budget 8 --calibrate-on "$text" --ntip 5
expect_error "ppl reference with method" "--reference" $fasa ppl "${mg[@]}" --text "$text" --reference --method oracle --budget 8
expect_error "ppl option of generate" "does not apply" $fasa ppl "${mg[@]}" --text "$text" --steps 3
expect_error "generate without --steps" "--steps N is required" $fasa generate "${mg[@]}"
expect_error "generate bad temperature" "--temperature" $fasa generate "${mg[@]}" --steps 3 --temperature -1
expect_error "generate option of ppl" "does not apply" $fasa generate "${mg[@]}" --steps 3 --text "$text"
expect_error "generate bad method" "method" $fasa generate "${mg[@]}" --steps 3 --method magic

# Server-only commands without a server: a usage error (exit 2) naming the need.
for cmd in ping stats drop shutdown; do
    expect_error "$cmd without --server" "talks to a server" env -u FASA_SERVER $fasa $cmd
done
expect_error "create without --server" "talks to a server" env -u FASA_SERVER $fasa create --session s --layers 1 --heads 1 --kv-heads 1 --head-dim 2
env -u FASA_SERVER $fasa attend --session s --layer 0 --q "$tmp/q.npy" --out "$tmp/x.npy" >/dev/null 2>&1
if [ $? -eq 2 ]; then ok; else bad "attend without --server: exit status not 2"; fi
expect_error "option of another command" "does not apply" $fasa drop --server tcp://127.0.0.1:1 --session s --layers 3
expect_error "profile-name without server" "needs --server" $fasa calibrate --qkv "$dump" --ntip 2 --out "$tmp/x" --profile-name p


# One set of conventions (issue 17, cli/opts.h). -h is --help on every command.
for cmd in demo calibrate replay ppl generate ping stats create append attend drop shutdown \
           snapshot keygen sessions "profile" "profile delete" bench "bench scan" "bench attend" \
           "bench latency"; do
    # shellcheck disable=SC2086
    if $fasa $cmd -h >"$tmp/h1" 2>&1 && grep -q usage "$tmp/h1" && $fasa $cmd --help >"$tmp/h2" 2>&1 &&
        cmp -s "$tmp/h1" "$tmp/h2"; then ok; else bad "fasa $cmd -h: $(head -2 "$tmp/h1")"; fi
done
# Every option a command's --help lists is one its parser takes (the help is printed from the
# parser's table): each listed --NAME, given with no value, is never 'unknown'.
for cmd in demo calibrate replay ppl generate create attend append stats "bench attend" \
           "bench latency"; do
    # shellcheck disable=SC2086
    for opt in $($fasa $cmd --help | grep -oE '^  --[a-z][a-z0-9-]*' | sed 's/^  //'); do
        case $opt in --curve-server-key | --curve-secret) continue ;; esac
        # shellcheck disable=SC2086
        env -u FASA_SERVER $fasa $cmd $opt >/dev/null 2>"$tmp/e"
        if grep -q "unknown option" "$tmp/e"; then bad "fasa $cmd: $opt is listed but unknown"; else ok; fi
    done
done
# Sizes: K and M wherever a count is taken; 'not a number' when it is not one.
expect_error "size out of range" "--tokens '1G' must be in \[1024, 16777216\]" $fasa demo --tokens 1G
expect_error "not a number" "--steps 'abc' is not a number" $fasa demo --steps abc
expect_error "not a number, replay" "--budget '12x' is not a number" $fasa replay --qkv "$dump" --method dense --budget 12x --out "$tmp/x.npy"
expect_error "not a number, create" "--layers 'two' is not a number" $fasa create --server tcp://127.0.0.1:1 --session s --layers two
expect_error "size suffix, create" "--layers '2K' must be in \[1, 1024\]" $fasa create --server tcp://127.0.0.1:1 --session s --layers 2K
# --merge: exact or local on create and attend, and nowhere else.
expect_error "create --merge" "--merge 'fast' is not exact or local" $fasa create --server tcp://127.0.0.1:1 --session s --merge fast
expect_error "attend --merge" "--merge 'LOCAL' is not exact or local" $fasa attend --server tcp://127.0.0.1:1 --session s --merge LOCAL
expect_error "append --merge" "option '--merge' does not apply to 'append'" $fasa append --server tcp://127.0.0.1:1 --session s --merge local
expect_error "replay --merge-eps" "--merge-eps 'x' must be a number in \[0, 64\]" $fasa replay --qkv "$dump" --method oracle --budget 8 --out "$tmp/x.npy" --merge local --merge-eps x
expect_error "replay --merge-eps --server" "--merge-eps is in process only" $fasa replay --qkv "$dump" --method oracle --budget 8 --out "$tmp/x.npy" --merge-eps 1 --server tcp://127.0.0.1:1
if $fasa demo --tokens 2K --steps 1 --heads 4 --kv-heads 1 --head-dim 32 --ntip 4 --budget 32 >"$tmp/d2k" 2>&1 &&
    grep -q '^fasa demo: 2048 tokens' "$tmp/d2k"; then ok; else bad "demo --tokens 2K: $(head -1 "$tmp/d2k")"; fi
# (oracle keeps the exact top-B: 1024 of 2040+ tokens, so B changes the outputs.)
$fasa replay --qkv "$dump" --method oracle --positions 2040:2048 --budget 1000 --out "$tmp/r1000.npy" >/dev/null 2>&1
if $fasa replay --qkv "$dump" --method oracle --positions 2040:2048 --budget 1k --out "$tmp/r1k.npy" >/dev/null 2>&1 &&
    $fasa replay --qkv "$dump" --method oracle --positions 2040:2048 --budget 1024 --out "$tmp/r1024.npy" >/dev/null 2>&1 &&
    cmp -s "$tmp/r1k.npy" "$tmp/r1024.npy" && ! cmp -s "$tmp/r1k.npy" "$tmp/r1000.npy"; then ok
else bad "replay --budget 1k differs from 1024 (or B does not matter)"; fi
# --name=value is --name value.
if $fasa replay --qkv="$dump" --method=oracle --budget=1024 --positions=2040:2048 --out="$tmp/req.npy" >/dev/null 2>&1 &&
    cmp -s "$tmp/req.npy" "$tmp/r1024.npy"; then ok; else bad "replay --name=value"; fi
# Did you mean: a mistyped command or option.
expect_error "did you mean a command" "unknown command 'pnig' (did you mean 'ping'?" $fasa pnig
expect_error "did you mean a command 2" "did you mean 'calibrate'" $fasa calibrat --qkv x
expect_error "did you mean an option" "unknown option '--tokns' (did you mean '--tokens'?)" $fasa demo --tokns 3
expect_error "did you mean, server command" "did you mean '--session'" $fasa drop --server tcp://127.0.0.1:1 --sesion s
expect_error "no suggestion" "unknown command 'xyzzy' (see 'fasa --help')" $fasa xyzzy
expect_error "an option needs its value" "option '--out' needs a value" $fasa replay --qkv "$dump" --out
# Global options before or after the command: the same error from the same (dead) server.
for order in before after; do
    if [ $order = before ]; then set -- --server tcp://127.0.0.1:1 ping; else set -- ping --server tcp://127.0.0.1:1; fi
    expect_error "--server $order ping" "no server answered at tcp://127.0.0.1:1" env -u FASA_SERVER FASA_TIMEOUT_MS=2000 $fasa "$@"
done
expect_error "--server before drop SESSION" "no server answered at tcp://127.0.0.1:1" env -u FASA_SERVER FASA_TIMEOUT_MS=2000 $fasa --server tcp://127.0.0.1:1 drop s1
expect_error "unknown global option" "unknown option '--bogus' before the command" $fasa --bogus ping
expect_error "global option, no command" "no command after the options" $fasa --server tcp://127.0.0.1:1
# bench attend takes the CURVE keys, before or after the command (it reads the key files).
expect_error "bench attend --curve-server-key" "public key file $tmp/none.pub" $fasa bench attend --server tcp://127.0.0.1:1 --curve-server-key "$tmp/none.pub" --curve-secret "$tmp/none.key"
expect_error "--curve-server-key before bench" "public key file $tmp/none.pub" $fasa --server tcp://127.0.0.1:1 --curve-server-key "$tmp/none.pub" --curve-secret "$tmp/none.key" bench attend

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]

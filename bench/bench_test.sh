#!/usr/bin/env bash
# `fasa bench` end to end at small sizes: the commands run, print their figure lines and
# write CSV with the expected header and rows, and their byte counts equal the geometry's
# (computed here independently). No timing is asserted.
# usage: bench_test.sh FASA_BINARY
set -u
fasa=$1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
export OPENBLAS_NUM_THREADS=1
pass=0
fail=0
ok() { pass=$((pass + 1)); }
bad() { fail=$((fail + 1)); echo "FAIL: $*"; }
# has NAME FILE REGEX: FILE has a line matching the extended REGEX.
has() { if grep -Eq -- "$3" "$2"; then ok; else bad "$1: no line matching '$3' in: $(cat "$2")"; fi; }
# expect_error NAME PATTERN CMD...: exit 2, one stderr line matching PATTERN.
source "$(dirname "$0")/../tests/expect.sh"
expect_rc=2

# --help everywhere.
for c in "bench --help" "bench scan --help" "bench attend --help"; do
    # shellcheck disable=SC2086
    if $fasa $c >"$tmp/help" 2>&1 && grep -q "usage: fasa bench" "$tmp/help"; then ok; else bad "$c"; fi
done

# scan: 16384 tokens x 8 KV heads x 32 packed dims x 4 bytes = 16 MiB scanned.
T=16384
bytes=$((T * 8 * 32 * 4))
if "$fasa" bench scan --tokens 16K --reps 1 --csv "$tmp/scan.csv" >"$tmp/scan.out" 2>"$tmp/scan.err"; then ok
else bad "scan exit $?: $(cat "$tmp/scan.err")"; fi
has scan "$tmp/scan.out" "^bench scan: $T tokens, 8 KV heads x 32 of 128 key dims \(ntip 16 of 64 FCs\)"
has scan "$tmp/scan.out" '^read bandwidth, SIMD sum \(.*\): p50 +[0-9.]+ GB/s'
has scan "$tmp/scan.out" '^read bandwidth, OpenBLAS cblas_sasum: p50 +[0-9.]+ GB/s'
has scan "$tmp/scan.out" '^scoring scan \(shard_score, fasa\): p50 +[0-9.]+ GB/s'
has scan "$tmp/scan.out" '^scan/read = [0-9]+\.[0-9]+ \(target >= 0\.85: (met|not met)\)$'
if [ "$(head -1 "$tmp/scan.csv")" = "figure,tokens,bytes,reps,p50_ms,min_ms,gb_s" ]; then ok
else bad "scan csv header: $(head -1 "$tmp/scan.csv")"; fi
if [ "$(tail -n +2 "$tmp/scan.csv" | cut -d, -f1-4 | tr '\n' ' ')" = \
     "read_simd,$T,$bytes,1 read_sasum,$T,$bytes,1 read,$T,$bytes,1 scan,$T,$bytes,1 " ]; then ok
else bad "scan csv rows: $(cat "$tmp/scan.csv")"; fi
# gb_s is bytes / p50 (to the printed rounding).
if awk -F, 'NR > 1 && ($7 - $3 / ($5 * 1e6)) ^ 2 > (0.002 + 0.002 * $7) ^ 2 { exit 1 }' "$tmp/scan.csv"; then ok
else bad "scan csv gb_s is not bytes / p50: $(cat "$tmp/scan.csv")"; fi

# attend: 8192 tokens, embedded. Dense reads all of K and V: T x 8 x 128 x 2 x 4 bytes,
# and a session holds 8 x 128 x 2 x 4 = 8192 bytes per token in f32.
T=8192
dense=$((T * 8 * 128 * 2 * 4))
png=()
command -v gnuplot >/dev/null && png=(--png "$tmp/attend.png")
if "$fasa" bench attend --tokens 8K --reps 1 --csv "$tmp/attend.csv" "${png[@]}" >"$tmp/attend.out" 2>"$tmp/attend.err"; then ok
else bad "attend exit $?: $(cat "$tmp/attend.err")"; fi
has attend "$tmp/attend.out" "^attend: $T tokens on the embedded engine, 1 shard\(s\), dtype f32"
has attend "$tmp/attend.out" '^check: outputs finite; max \|dense - naive\| on heads 0, 17, 31 = [0-9.e+-]+ \(tolerance 1e-04: ok\)'
for m in dense fasa oracle; do
    has attend "$tmp/attend.out" "^tier ram  $m +p50 +[0-9.]+ ms  min +[0-9.]+ ms  read +[0-9.]+ MiB"
done
has attend "$tmp/attend.out" '^dense/fasa = [0-9]+\.[0-9]+ \(target >= 5\.0 applies at 1M tokens\)'
has attend "$tmp/attend.out" '^RAM per token: tier ram 8192 B \(f32 K\+V, 2\.00 of f16 K\+V = 4096 B\)'
want="tokens,backend,workers,dtype,tier,method,reps,p50_ms,min_ms,bytes_read,gb_s,kv_bytes_per_token,max_err"
if [ "$(head -1 "$tmp/attend.csv")" = "$want" ]; then ok; else bad "attend csv header: $(head -1 "$tmp/attend.csv")"; fi
if [ "$(tail -n +2 "$tmp/attend.csv" | cut -d, -f1-7 | tr '\n' ' ')" = \
     "$T,embedded,1,f32,ram,dense,1 $T,embedded,1,f32,ram,fasa,1 $T,embedded,1,f32,ram,oracle,1 " ]; then ok
else bad "attend csv rows: $(cat "$tmp/attend.csv")"; fi
if awk -F, -v d="$dense" 'NR == 2 && ($10 != d || $12 != 8192 || $13 > 1e-4) { exit 1 }
                          NR == 3 && ($10 >= d / 3 || $12 != 8192) { exit 1 }
                          NR == 4 && ($10 >= d || $12 != 8192) { exit 1 }' "$tmp/attend.csv"; then ok
else bad "attend csv values (dense reads $dense bytes, fasa under a third, oracle less): $(cat "$tmp/attend.csv")"; fi
if [ ${#png[@]} -gt 0 ]; then
    if [ "$(head -c 4 "$tmp/attend.png" | od -An -tx1 | tr -d ' ')" = "89504e47" ]; then ok
    else bad "attend --png wrote no PNG"; fi
fi

# --methods and several sizes.
if "$fasa" bench attend --tokens 2K,4096 --reps 1 --methods fasa --csv "$tmp/two.csv" >"$tmp/two.out" 2>&1 &&
   [ "$(tail -n +2 "$tmp/two.csv" | cut -d, -f1,6 | tr '\n' ' ')" = "2048,fasa 4096,fasa " ]; then ok
else bad "attend --tokens 2K,4096 --methods fasa: $(cat "$tmp/two.out" "$tmp/two.csv")"; fi

# f16 storage: the run succeeds with its figure lines.
if "$fasa" bench attend --tokens 2048 --reps 1 --dtype f16 >"$tmp/f16.out" 2>"$tmp/f16.err"; then
    has f16 "$tmp/f16.out" '^attend: 2048 tokens on the embedded engine, 1 shard\(s\), dtype f16'
else bad "--dtype f16: $(cat "$tmp/f16.err")"; fi

# The disk tier: RAM per token is what the shards allocate in RAM, against f16 K+V (the
# dominant dims, 32 of 128, in f16 plus positions and page bounds), and the CSV says disk.
if "$fasa" bench attend --tokens 8192 --reps 1 --dtype f16 --tier disk --methods fasa \
    --csv "$tmp/disk.csv" >"$tmp/disk.out" 2>"$tmp/disk.err"; then
    has "disk tier rows" "$tmp/disk.out" '^tier disk fasa '
    has "disk tier RAM" "$tmp/disk.out" '^RAM per token: tier disk [0-9]+ B \(f16; [0-9.]+% of f16 K\+V = 4096 B; target <= 30%: met\)'
    [ "$(tail -n +2 "$tmp/disk.csv" | cut -d, -f4,5,6)" = "f16,disk,fasa" ] && ok ||
        bad "disk tier csv: $(cat "$tmp/disk.csv")"
else bad "--tier disk: $(cat "$tmp/disk.err")"; fi
expect_error "disk tier's --state-dir on a server" "tier-dir" "$fasa" bench attend --tier disk --state-dir /tmp --server tcp://127.0.0.1:1
expect_error "bad tier" "\-\-tier 'tape'" "$fasa" bench attend --tier tape

# The roofline (issue 13): CPU and ceilings, the fasa and dense steps by phase, and --json
# with its stable names; byte figures against the geometry (f16: 2 bytes per element).
T=4096
if "$fasa" bench attend --tokens 4K --reps 1 --dtype f16 --methods dense,fasa --threads 2 \
    --json "$tmp/roof.json" >"$tmp/roof.out" 2>"$tmp/roof.err"; then
    has roofline "$tmp/roof.out" '^cpu: .+; simd: [a-z0-9. ]+; kernels. path (portable|avx2|avx512); threads 2 '
    has roofline "$tmp/roof.out" '^roofline: read 1 thread [0-9.]+ GB/s, 2 threads [0-9.]+ GB/s; compute \(one core, L1\): f16 to f32 [0-9.e+]+ conversions/s, f32 FMA [0-9.e+]+/s; the scan.s path [a-z0-9]+: [0-9.e+]+ conversions/s, FMA [0-9.e+]+/s; dense.s path [a-z0-9]+: [0-9.e+]+ conversions/s, FMA [0-9.e+]+/s$'
    for ph in scan gather attend; do
        has roofline "$tmp/roof.out" "^phase fasa +$ph +[0-9.]+ ms +[0-9.]+ GB/s +[0-9.]+ of roofline [0-9.]+ GB/s \((read|compute)\)$"
    done
    for ph in select merge other; do has roofline "$tmp/roof.out" "^phase fasa +$ph +[0-9.]+ ms$"; done
    has roofline "$tmp/roof.out" '^phase dense +attend +[0-9.]+ ms +[0-9.]+ GB/s +[0-9.]+ of roofline'
    has roofline "$tmp/roof.out" '^dense: kernel [0-9.]+ of its roofline \([0-9.]+ GB/s\), whole step [0-9.]+ \(target >= 0\.80 applies at 1M f16: (met|not met)\)$'
    has roofline "$tmp/roof.out" '^fasa: scan [0-9.]+ of its roofline \(target >= 0\.85\); step = [0-9.]+x the time its [0-9.]+ MiB take at the read bandwidth \(target <= 1\.3\)'
    for key in cpu simd threads dtype read_gbs read_gbs_by_threads cvt_per_s fma_per_s runs tokens \
        fasa_ms fasa_bytes dense_ms dense_bytes scan_roofline dense_roofline scan_bytes \
        fasa_over_read phases_ms dense_simd_path dense_cvt_per_s dense_fma_per_s; do
        grep -q "\"$key\": " "$tmp/roof.json" && ok || bad "json lacks $key: $(cat "$tmp/roof.json")"
    done
    for ph in scan select gather attend merge other; do
        grep -q "\"phases_ms\": {.*\"$ph\": [0-9.]" "$tmp/roof.json" && ok || bad "json phases_ms lacks $ph"
    done
    grep -q '"threads": 2,' "$tmp/roof.json" && ok || bad "json threads: $(cat "$tmp/roof.json")"
    # The last run is also at the top level: dense reads all of K and V, the scan 32 of 128
    # key dims.
    grep -q "^  \"tokens\": $T, .*\"dense_bytes\": $((T * 8 * 128 * 2 * 2)), " "$tmp/roof.json" && ok ||
        bad "json dense_bytes: $(cat "$tmp/roof.json")"
    grep -q "\"scan_bytes\": $((T * 8 * 32 * 2)), " "$tmp/roof.json" && ok || bad "json scan_bytes"
    if command -v python3 >/dev/null; then
        python3 -m json.tool "$tmp/roof.json" >/dev/null && ok || bad "json does not parse: $(cat "$tmp/roof.json")"
    fi
else bad "attend --json: $(cat "$tmp/roof.err")"; fi
expect_error "bad threads" "\-\-threads '0'" "$fasa" bench attend --threads 0
expect_error "scan takes no --json" "'--json' is for 'fasa bench attend'" "$fasa" bench scan --json x
FASA_THREADS=x "$fasa" bench attend --help >/dev/null 2>"$tmp/err"
[ $? -eq 2 ] && grep -q "FASA_THREADS 'x' must be a thread count" "$tmp/err" && ok || bad "FASA_THREADS=x: $(cat "$tmp/err")"

expect_error "bad benchmark" "unknown benchmark 'nope'" "$fasa" bench nope
expect_error "bad tokens" "\-\-tokens '12x'" "$fasa" bench scan --tokens 12x
expect_error "tokens too small" "\-\-tokens '100'" "$fasa" bench attend --tokens 100
expect_error "two sizes for scan" "\-\-tokens '1K,2K'" "$fasa" bench scan --tokens 1K,2K
expect_error "bad methods" "\-\-methods 'dense,foo'" "$fasa" bench attend --methods dense,foo
expect_error "bad dtype" "\-\-dtype 'f8'" "$fasa" bench attend --dtype f8
expect_error "attend-only option" "'--png' is for 'fasa bench attend'" "$fasa" bench scan --png x.png
expect_error "bad reps" "\-\-reps '0'" "$fasa" bench attend --reps 0

# --png: a PNG with gnuplot (deploy/install-deps.sh installs it); without gnuplot, or to a
# place it cannot write, a one-line error (exit 1) before anything is measured.
if command -v gnuplot >/dev/null; then
    if "$fasa" bench attend --tokens 1K,2K --reps 1 --methods dense --png "$tmp/a.png" \
           >"$tmp/png.out" 2>"$tmp/png.err" &&
       [ "$(head -c 8 "$tmp/a.png" | od -An -tx1 | tr -d ' \n')" = 89504e470d0a1a0a ]; then ok
    else bad "--png: $(cat "$tmp/png.err") $(ls -l "$tmp/a.png" 2>&1)"; fi
else
    bad "--png: gnuplot is not installed (deploy/install-deps.sh installs gnuplot-nox)"
fi
mkdir -p "$tmp/nognuplot"
for t in bash cat; do ln -sf "$(command -v $t)" "$tmp/nognuplot/$t"; done
PATH=$tmp/nognuplot "$fasa" bench attend --tokens 1K --reps 1 --png "$tmp/b.png" >"$tmp/out" 2>"$tmp/err"
rc=$?
if [ $rc -eq 1 ] && [ "$(wc -l <"$tmp/err")" -eq 1 ] && grep -q "gnuplot is not installed" "$tmp/err" &&
   ! grep -q "p50" "$tmp/out"; then ok
else bad "--png without gnuplot: exit $rc, $(cat "$tmp/err")"; fi
"$fasa" bench attend --tokens 1K --reps 1 --png "$tmp/no/such/dir/c.png" >"$tmp/out" 2>"$tmp/err"
rc=$?
if [ $rc -eq 1 ] && grep -q "\-\-png $tmp/no/such/dir/c.png: cannot write it" "$tmp/err" && ! grep -q "p50" "$tmp/out"; then ok
else bad "--png to a missing dir: exit $rc, $(cat "$tmp/err")"; fi

echo "bench_test: $pass passed, $fail failed"
[ $fail -eq 0 ]

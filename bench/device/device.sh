#!/usr/bin/env bash
# The multi-rank scaling benchmark of fasa on a machine without Open MPI or ZeroMQ (the
# 16-core machine of bench/results/device-h200-16core.log), from the repo root:
#
#   bash bench/device/pack.sh                     # here: build and pack .devbundle/bundle.tar.gz
#   bash bench/device/device.sh                   # there, with .devbundle/bundle.tar.gz beside
#
# The figures in bench/results came from
#   DEADLINE_S=290 EXTRA_S=220 STEPS=30 DENSE_STEPS=6 SMALL_STEPS=30 bash bench/device/device.sh
#
# Extracts .devbundle/bundle.tar.gz (made by bench/device/pack.sh: fasa + Open MPI 4.1 + PMIx
# + ZeroMQ + glibc 2.36, every ELF patched to load from /tmp/fb) to /tmp/fb, prints
# diagnostics, checks mpirun and a 3-rank fasa-server, then runs bench_server against
# fasa-server with N = workers + 1 ranks for each WORKERS, and prints a summary table.
# Writes $OUT/scaling.csv and $OUT/device.log ($OUT defaults to .devbundle/out).
#
# Environment (defaults): TOKENS (1048576) STEPS (50, fasa Attend steps) DENSE_STEPS (8)
#   SMALL_STEPS (50) WORKERS ("1 16 2 8 4": run order; the table is sorted)
#   RUN_TIMEOUT (150, seconds per bench run) DEADLINE_S (460: no run starts or outlives it)
#   BIND_TO (none; or core) SMOKE_TOKENS (65536)
set -uo pipefail
T_START=$(date +%s)
here=$(cd "$(dirname "$0")/../.." && pwd)/.devbundle   # the bundle pack.sh made
FB=/tmp/fb
OUT=${OUT:-$here/out}
mkdir -p "$OUT"
LOG=$OUT/device.log
CSV=$OUT/scaling.csv
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1

TOKENS=${TOKENS:-1048576}
STEPS=${STEPS:-50}
DENSE_STEPS=${DENSE_STEPS:-8}
SMALL_STEPS=${SMALL_STEPS:-50}
WORKERS=${WORKERS:-"1 16 2 8 4"}
RUN_TIMEOUT=${RUN_TIMEOUT:-150}
DEADLINE_S=${DEADLINE_S:-460}
BIND_TO=${BIND_TO:-none}
SMOKE_TOKENS=${SMOKE_TOKENS:-65536}
elapsed() { echo $(($(date +%s) - T_START)); }
say() { echo "[$(elapsed)s] $*"; }

say "== extract"
rm -rf "$FB" && mkdir -p "$FB" && tar -xzf "$here/bundle.tar.gz" -C "$FB" || { echo "extract failed"; exit 1; }
cat "$FB/BUNDLE_INFO"

# Open MPI / PMIx relocated into /tmp/fb; only shared memory and self transports; no
# binding (oversubscribed at 17 ranks on 16 cores); root-safe.
export OPAL_PREFIX=$FB/usr
export OPAL_PKGLIBDIR=$FB/usr/lib/x86_64-linux-gnu/openmpi/lib/openmpi3
export OPAL_PKGDATADIR=$FB/usr/share/openmpi
export OPAL_SYSCONFDIR=$FB/etc/openmpi
export OMPI_MCA_mca_base_component_path=$OPAL_PKGLIBDIR
px=$FB/usr/lib/x86_64-linux-gnu/pmix2
export PMIX_PREFIX=$px PMIX_EXEC_PREFIX=$px PMIX_LIBDIR=$px/lib PMIX_PKGLIBDIR=$px/lib/pmix
export PMIX_DATADIR=$px/share PMIX_PKGDATADIR=$px/share/pmix PMIX_SYSCONFDIR=$px/share
export PMIX_MCA_mca_base_component_path=$px/lib/pmix PMIX_MCA_pmix_mca_base_component_path=$px/lib/pmix
export PMIX_MCA_psec=native PMIX_MCA_gds=hash PMIX_MCA_pcompress_base_silence_warning=1
export HWLOC_PLUGINS_PATH=$FB/empty HWLOC_HIDE_ERRORS=1
export OMPI_MCA_plm=isolated
export OMPI_MCA_btl=self,vader OMPI_MCA_pml=ob1 OMPI_MCA_osc=sm,pt2pt,rdma
export OMPI_MCA_btl_vader_backing_directory=/tmp
export OMPI_MCA_hwloc_base_binding_policy=$BIND_TO
export OMPI_MCA_rmaps_base_oversubscribe=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_orte_tmpdir_base=/tmp TMPDIR=/tmp
export OPENBLAS_NUM_THREADS=1
unset LD_LIBRARY_PATH LD_PRELOAD
export PATH=$FB/usr/bin:$FB/bin:$PATH
export FASA_BUILD=$FB/bin

say "== diagnostics"
uname -a
grep -E '^(PRETTY_NAME)=' /etc/os-release 2>/dev/null
echo "system glibc: $(getconf GNU_LIBC_VERSION 2>/dev/null || ldd --version 2>/dev/null | head -1)"
echo "nproc: $(nproc)   cpus online: $(getconf _NPROCESSORS_ONLN)"
free -g 2>/dev/null || head -3 /proc/meminfo
grep -m1 'model name' /proc/cpuinfo
flags=$(grep -m1 '^flags' /proc/cpuinfo)
for f in avx2 fma avx512f avx512bw avx512vl avx512_bf16 avx512_fp16 amx_tile; do
    case " $flags " in *" $f "*) printf '%s=yes ' "$f" ;; *) printf '%s=no ' "$f" ;; esac
done; echo
grep -E 'Cpus_allowed_list' /proc/self/status
df -h /tmp /dev/shm 2>/dev/null
[ -e /etc/ld.so.preload ] && echo "WARNING: /etc/ld.so.preload exists (the bundled loader honours it too): $(cat /etc/ld.so.preload)"
echo "ptrace_scope: $(cat /proc/sys/kernel/yama/ptrace_scope 2>/dev/null || echo n/a)"
command -v nvidia-smi >/dev/null && timeout 20 nvidia-smi -L
grep -E ' /tmp | / ' /proc/mounts | head -3
nl=$(timeout 20 "$FB/lib/ld-linux-x86-64.so.2" --list "$FB/bin/fasa-server" | grep -c "=> $FB/")
echo "bundled loader: fasa-server resolves $nl libraries under $FB"
outside=$(timeout 20 "$FB/lib/ld-linux-x86-64.so.2" --list "$FB/bin/fasa-server" | grep '=>' | grep -v "=> $FB/" || true)
[ -n "$outside" ] && echo "WARNING: libraries resolved outside $FB: $outside"
timeout 20 fasa-server --version || echo "ERROR: fasa-server does not start (rc $?)"
timeout 20 mpirun --version | head -1
timeout 30 ompi_info 2>&1 | grep -E 'MCA (btl|pml|plm|pmix):' | tr -s ' ' | tr '\n' ';'; echo

run_dir=
stop_server() {
    [ -n "$run_dir" ] || return 0
    local l
    l=$(cat "$run_dir/launcher.pid" 2>/dev/null || true)
    FASA_RUN_DIR=$run_dir timeout 40 bash "$FB/bin/stop-local.sh" 2>&1 | sed 's/^/  /'
    if [ -n "$l" ] && kill -0 "$l" 2>/dev/null; then kill -KILL -- "-$l" 2>/dev/null; fi
    if [ -s "$run_dir/fasa-server.log" ] && [ "${1:-}" = show ]; then
        echo "  --- fasa-server.log (last 40 lines):"; tail -40 "$run_dir/fasa-server.log" | sed 's/^/  | /'
    fi
    rm -rf "$run_dir"; run_dir=
}
trap 'stop_server' EXIT
start_server() { # N
    run_dir=$(mktemp -d /tmp/fasa-run.XXXXXX)
    FASA_RUN_DIR=$run_dir timeout 60 bash "$FB/bin/run-local.sh" "$1" --bind 'tcp://127.0.0.1:*' \
        2>&1 | sed 's/^/  /'
    [ "${PIPESTATUS[0]}" -eq 0 ] && [ -s "$run_dir/endpoint" ]
}

say "== sanity: mpirun -n 3 uname -n"
timeout 60 mpirun -n 3 uname -n; echo "rc=$?"

say "== sanity: fasa-server with 3 ranks, ping"
if start_server 3; then
    timeout 20 fasa ping --server "$(cat "$run_dir/endpoint")"; echo "ping rc=$?"
    stop_server
else
    echo "ERROR: 3-rank fasa-server did not start"; stop_server show
fi

# A short bench at 3 ranks: appends send large MPI messages, which is where the vader
# single-copy mechanism (CMA, process_vm_readv) fails in some containers. Take the first
# transport setting that works.
smoke() {
    start_server 3 || { stop_server show; return 1; }
    timeout -k 5 45 bench_server --server "$(cat "$run_dir/endpoint")" --tokens "$SMOKE_TOKENS" \
        --steps 3 --dense-steps 2 --small 4096 --small-steps 5 2>&1 | grep -v 'appending:' | sed 's/^/  /'
    local rc=${PIPESTATUS[0]}
    if [ "$rc" -ne 0 ]; then stop_server show; else stop_server; fi
    return "$rc"
}
chosen=
for setting in "cma:" "nocopy:OMPI_MCA_btl_vader_single_copy_mechanism=none" \
               "tcp:OMPI_MCA_btl=self,tcp"; do
    name=${setting%%:*} assign=${setting#*:}
    say "== smoke ($name): 3 ranks, $SMOKE_TOKENS tokens"
    [ -n "$assign" ] && export "${assign?}"
    if smoke; then chosen=$name; break; fi
    echo "smoke ($name) failed"
done
if [ -z "$chosen" ]; then
    # Nothing multi-rank works: stop here rather than spend device time on runs that fail.
    say "ERROR: the 3-rank smoke bench failed with every transport setting; no scaling runs"
    echo "workers,ranks,tokens,status" > "$CSV"; echo "2,3,$SMOKE_TOKENS,smoke-failed" >> "$CSV"
    exit 1
fi
echo "transport: $chosen (btl=$OMPI_MCA_btl single_copy=${OMPI_MCA_btl_vader_single_copy_mechanism:-default})"

say "== scaling: $TOKENS tokens, steps $STEPS fasa / $DENSE_STEPS dense, workers in this order: $WORKERS"
RAW=$OUT/scaling_raw.csv   # one row per run as it finishes (survives a kill); scaling.csv at the end
echo "workers,ranks,tokens,status,wall_s,append_gbs,append_s,fasa_p50_ms,fasa_p99_ms,fasa_server_p50_ms,dense_p50_ms,dense_p99_ms,dense_server_p50_ms,overhead_fasa_ms,overhead_dense_ms,transport,bind" > "$RAW"
for w in $WORKERS; do
    n=$((w + 1))
    left=$((DEADLINE_S - $(elapsed)))
    if [ "$left" -lt 40 ]; then
        say "skipping $w workers: only ${left}s left before the ${DEADLINE_S}s deadline"
        echo "$w,$n,$TOKENS,skipped,,,,,,,,,,,,$chosen,$BIND_TO" >> "$RAW"; continue
    fi
    t_run=$((left - 10 < RUN_TIMEOUT ? left - 10 : RUN_TIMEOUT))
    say "-- $w worker(s) ($n ranks), bench timeout ${t_run}s"
    t0=$(date +%s)
    res=$OUT/.bench_w$w.txt
    : > "$res"
    status=ok
    if start_server "$n"; then
        timeout -k 5 "$t_run" bench_server --server "$(cat "$run_dir/endpoint")" \
            --tokens "$TOKENS" --steps "$STEPS" --dense-steps "$DENSE_STEPS" \
            --small-steps "$SMALL_STEPS" > "$res" 2> >(grep -v 'appending:' >&2)
        rc=$?
        sed 's/^/  /' "$res"
        [ "$rc" -eq 0 ] || { status="rc$rc"; [ "$rc" -eq 124 ] && status=timeout; }
        if [ "$status" = ok ]; then stop_server; else echo "  bench_server: $status"; stop_server show; fi
    else
        status=nostart; stop_server show
    fi
    wall=$(($(date +%s) - t0))
    # append: ... in X s of round trips (...): T tokens/s, G GB/s
    a_gbs=$(sed -n 's/^append: .*tokens\/s, \([0-9.]*\) GB\/s.*/\1/p' "$res")
    a_s=$(sed -n 's/^append: .* in \([0-9.]*\) s of round trips.*/\1/p' "$res")
    f=($(sed -n 's/^attend fasa .*p50 \([0-9.]*\) ms, p99 \([0-9.]*\) ms (server p50 \([0-9.]*\) ms).*/\1 \2 \3/p' "$res"))
    d=($(sed -n 's/^attend dense .*p50 \([0-9.]*\) ms, p99 \([0-9.]*\) ms (server p50 \([0-9.]*\) ms).*/\1 \2 \3/p' "$res"))
    of=$(sed -n 's/^overhead fasa .*-> overhead \([-0-9.]*\) ms.*/\1/p' "$res")
    od=$(sed -n 's/^overhead dense .*-> overhead \([-0-9.]*\) ms.*/\1/p' "$res")
    echo "$w,$n,$TOKENS,$status,$wall,$a_gbs,$a_s,${f[0]:-},${f[1]:-},${f[2]:-},${d[0]:-},${d[1]:-},${d[2]:-},$of,$od,$chosen,$BIND_TO" >> "$RAW"
    rm -f "$res"
done

# scaling.csv: the raw rows sorted by workers, plus dense/fasa and the speedups against
# the row with the fewest workers that has figures (p50 there / p50 here; append: here /
# there). The summary table prints the same.
{ head -1 "$RAW"; tail -n +2 "$RAW" | sort -t, -k1,1n; } | awk -F, -v OFS=, -v csv="$CSV" '
NR == 1 { print $0 ",dense_over_fasa,dense_speedup,fasa_speedup,append_speedup" > csv; next }
{ row[NR] = $0; w[NR] = $1; st[NR] = $4; a[NR] = $6; fp[NR] = $8; dp[NR] = $11; wl[NR] = $5; n = NR
  if (bf == "" && fp[NR] > 0 && dp[NR] > 0) { bf = fp[NR]; bd = dp[NR]; ba = a[NR] } }
function r(x, y) { return (x > 0 && y > 0) ? sprintf("%.2f", x / y) : "" }
END {
  printf "%7s %5s %8s %8s %11s %11s %10s %8s %8s %8s %6s\n", "workers", "ranks", "status", "app GB/s", "dense p50", "fasa p50", "dense/fasa", "dense x", "fasa x", "app x", "wall s"
  for (i = 2; i <= n; i++) {
    split(row[i], c, ",")
    rt = r(dp[i], fp[i]); sd = r(bd, dp[i]); sf = r(bf, fp[i]); sa = r(a[i], ba)
    print row[i], rt, sd, sf, sa > csv
    printf "%7s %5s %8s %8s %11s %11s %10s %8s %8s %8s %6s\n", w[i], c[2], st[i], a[i] == "" ? "-" : a[i], dp[i] == "" ? "-" : dp[i], fp[i] == "" ? "-" : fp[i], rt == "" ? "-" : rt, sd == "" ? "-" : sd, sf == "" ? "-" : sf, sa == "" ? "-" : sa, wl[i]
  }
}' > "$OUT/.summary.txt"
say "== summary ($TOKENS tokens, f32, transport $chosen, bind $BIND_TO; p50 in ms; 'x' = speedup against the fewest workers)"
cat "$OUT/.summary.txt"; rm -f "$OUT/.summary.txt"
echo "csv: $CSV"
cat "$CSV"

# Extras on the quiet machine, each under its own timeout, while time is left:
#   the scoring scan against the read bandwidth (one thread);
#   a pipelined BatchAttend against one Attend per session, pipelining on and off;
#   fasa bench attend at 1M tokens embedded, f32 and f16 (dense/fasa; the scaling table
#   covers 1 and 2 workers).
EXTRA_S=${EXTRA_S:-220}
extra() { # SECONDS CMD...
    local left=$((DEADLINE_S + EXTRA_S - $(elapsed))) t=$1; shift
    [ "$left" -lt 15 ] && { say "skipping: $*"; return; }
    [ "$t" -gt "$left" ] && t=$left
    say "== extra (${t}s): $*"
    timeout -k 5 "$t" "$@" 2>&1 | grep -v 'appending:\|sessions ready' | sed 's/^/  /'
}
extra 40 fasa bench scan --tokens 1M --reps 5
for pipe in 1 0; do
    left=$((DEADLINE_S + EXTRA_S - $(elapsed)))
    [ "$left" -lt 30 ] && { say "skipping bench_batch FASA_PIPELINE=$pipe"; continue; }
    say "== extra: bench_batch, 8 workers, FASA_PIPELINE=$pipe"
    if FASA_PIPELINE=$pipe start_server 9; then
        timeout -k 5 $((left - 10 < 60 ? left - 10 : 60)) bench_batch --server "$(cat "$run_dir/endpoint")" \
            --sessions 16 --tokens 32768 --reps 10 2>&1 | grep -v 'sessions ready' | sed 's/^/  /'
        stop_server
    else
        stop_server show
    fi
done
extra 75 fasa bench attend --tokens 1M --reps 3 --methods dense,fasa,oracle --csv "$OUT/attend_f32.csv"
extra 75 fasa bench attend --tokens 1M --reps 3 --methods dense,fasa --dtype f16 --csv "$OUT/attend_f16.csv"
say "done"
exec 1>&- 2>&-; sleep 1   # let tee finish device.log

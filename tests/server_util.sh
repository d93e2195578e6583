# Sourced by the shell end-to-end tests (tests/*.sh) after they set `build` (the build
# directory): the shared set-up, the pass/fail counters, and starting fasa-server.
#
# Sets root (the repository), fasa ($build/fasa), tmp (a new directory, removed at exit),
# FASA_BUILD and FASA_RUN_DIR ($tmp/run, for deploy/run-local.sh and stop-local.sh), pass and
# fail (0), and FASA_START_TIMEOUT_S (how long a server may take to answer its first ping:
# 60 s unless set; CI machines are loaded). Defines ok, bad, cleanup (stops a run-local
# server and removes $tmp; a test may define its own after sourcing this) and traps it at
# EXIT, start_local and start_mpi.
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
fasa=$build/fasa
tmp=$(mktemp -d)
export FASA_BUILD=$build FASA_RUN_DIR=$tmp/run
export FASA_START_TIMEOUT_S=${FASA_START_TIMEOUT_S:-60}
pass=0
fail=0
ok() { pass=$((pass + 1)); echo "ok: $*"; }
bad() { fail=$((fail + 1)); echo "FAIL: $*"; }
cleanup() {
    bash "$root/deploy/stop-local.sh" >/dev/null 2>&1 || true
    rm -rf "$tmp"
}
trap cleanup EXIT

# start_local N [deploy/run-local.sh options]: starts fasa-server with deploy/run-local.sh (its
# output in $tmp/start) and sets ep to its endpoint. 0, or 1 after bad "the server did not
# start: OUTPUT" (with the server's log when the output does not hold it already).
start_local() {
    if ! bash "$root/deploy/run-local.sh" "$@" >"$tmp/start" 2>&1; then
        local log=$FASA_RUN_DIR/fasa-server.log
        if [ -f "$log" ] && ! grep -q "exited during start-up" "$tmp/start"; then
            { echo "its log ($log):"; cat "$log"; } >>"$tmp/start"
        fi
        bad "the server did not start: $(cat "$tmp/start")"
        return 1
    fi
    ep=$(cat "$FASA_RUN_DIR/endpoint")
}

# start_mpi N LOG DIR [fasa-server options]: fasa-server on N ranks under setsid mpirun in
# the background (launcher = mpirun's PID, its output in LOG; Open MPI allowed to run as root
# and with more ranks than cores), writing DIR/endpoint and DIR/pid; waits up to
# FASA_START_TIMEOUT_S for both files and an answer to ping, and sets ep. 0, or 1 after bad
# "the server did not start within T s (launcher alive|gone): LOG".
start_mpi() {
    local n=$1 log=$2 dir=$3 i
    shift 3
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
    export OMPI_MCA_rmaps_base_oversubscribe=1
    rm -f "$dir/endpoint" "$dir/pid"
    setsid mpirun -n "$n" -x OPENBLAS_NUM_THREADS "$build/fasa-server" \
        --endpoint-file "$dir/endpoint" --pid-file "$dir/pid" "$@" >"$log" 2>&1 </dev/null &
    launcher=$!
    for ((i = 0; i < 10 * FASA_START_TIMEOUT_S; i++)); do
        if [ -s "$dir/endpoint" ] && [ -s "$dir/pid" ]; then
            ep=$(cat "$dir/endpoint")
            FASA_TIMEOUT_MS=2000 "$fasa" ping --server "$ep" >/dev/null 2>&1 && return 0
        fi
        kill -0 "$launcher" 2>/dev/null || break
        sleep 0.1
    done
    bad "the server did not start within $FASA_START_TIMEOUT_S s (launcher $(kill -0 "$launcher" 2>/dev/null && echo alive || echo gone)): $(cat "$log")"
    return 1
}

# npy_header DESCR SHAPE: the header of a version 1.0 .npy file of that dtype ('<f4', '<f2')
# and shape (a Python tuple's inside, "2, 8"), padded to 64 bytes; the data follows it.
npy_header() {
    local hdr="{'descr': '$1', 'fortran_order': False, 'shape': ($2), }"
    while [ $(((10 + ${#hdr} + 1) % 64)) -ne 0 ]; do hdr="$hdr "; done
    local len=$((${#hdr} + 1))
    printf '\x93NUMPY\x01\x00'
    printf "\\x$(printf %02x $((len & 255)))\\x$(printf %02x $((len >> 8)))"
    printf '%s\n' "$hdr"
}

# rnd_npy FILE SHAPE N: a float32 .npy of N pseudo-random finite values, |x| in [2^-7, 2):
# every byte is one of 0x3c..0x3f, 0xbc..0xbf, so the exponent stays in 120..127.
rnd_npy() {
    local set2
    set2=$(for _ in $(seq 32); do printf '\\074\\075\\076\\077\\274\\275\\276\\277'; done)
    { npy_header '<f4' "$2"; head -c $((4 * $3)) /dev/urandom | tr '\000-\377' "$set2"; } >"$1"
}

# wait_gone PID...: waits up to 20 s for every one of the processes to exit; 0 when they
# all have, else 1.
wait_gone() {
    local p alive
    for _ in $(seq 1 200); do
        alive=0
        for p in "$@"; do kill -0 "$p" 2>/dev/null && alive=1; done
        [ $alive -eq 0 ] && return 0
        sleep 0.1
    done
    return 1
}

#!/usr/bin/env bash
# Tests deploy/slurm/ on a real single-node Slurm cluster that it starts and stops itself.
#
#   deploy/slurm/selftest.sh [BUILD_DIR]          (default: build/ of this repository)
#
# 1. Installs Slurm and munge with apt-get when they are missing (root or sudo).
# 2. Starts munged, slurmctld and slurmd (-N localhost) with every file in a scratch directory
#    under /tmp (config generated there: CPUs from nproc, RealMemory from /proc/meminfo,
#    MpiDefault=pmix); nothing is written under /etc.
# 3. Runs, with 3 ranks (coordinator + 2 workers, --overcommit), under sbatch --wait:
#    a. fasa-server.sbatch: waits for its endpoint file, pings it, replays a workload against
#       it, compares with the embedded engine, stops it with `fasa shutdown`;
#    b. fasa-server.sbatch with --time=1: the time-limit signal (--signal=B:TERM@120) must stop
#       it cleanly (job COMPLETED, exit 0, not TIMEOUT);
#    c. fasa-job.sbatch with workload.example: every result must match the same lines run on
#       the embedded engine (float outputs within 1e-6 by npy_diff, selections and profiles
#       byte for byte);
#    d. fasa-server.sbatch with FASA_STATE_DIR: a session with acknowledged appends (no
#       snapshot requested), then `scontrol requeue` (what preemption does): the job is
#       stopped (TERM: final snapshot), requeued, restores, and gives bit-identical outputs
#       with every acknowledged token; then `fasa shutdown` completes it.
# 4. Cancels what is left, stops every daemon by its PID, waits until all of them (and every
#    process of the jobs) are gone and removes the scratch directory, also on failure.
#
# Daemons left by a run that died are found through /tmp/fasa-slurm-selftest.pids (and the
# scratch directory it names) and stopped first, so ports 6817/6818 are free again. Runs are
# serialised with a lock (/tmp/fasa-slurm-selftest.lock). Prints "slurm selftest: N passed,
# M failed", and the job and daemon logs on failure. Exit 0 only when everything passed.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
case "${1:-}" in -h|--help) sed -n '2,/^set -uo/{/^set -uo/!p;}' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;; esac
build_arg=${1:-$repo/build}
[ -d "$build_arg" ] || { echo "slurm selftest: no build directory $build_arg" >&2; exit 2; }
build=$(cd "$build_arg" && pwd)

export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
state=/tmp/fasa-slurm-selftest.pids
lock=/tmp/fasa-slurm-selftest.lock
dump_rel=../shared/data/models/stories260K/golden/tinystories_T2048.qkv
workload=$here/workload.example
ranks=3
started=$SECONDS

# Nothing from a surrounding job or the user's shell may steer the jobs submitted here.
for v in $(compgen -e); do
    case "$v" in SLURM_*|SBATCH_*|SRUN_*|SALLOC_*|FASA_*) unset "$v" ;; esac
done
export OPENBLAS_NUM_THREADS=1
if [ "$(id -u)" -eq 0 ]; then
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi

passed=0 failed=0 failures=()
ok()   { passed=$((passed + 1)); echo "  ok    $*"; }
bad()  { failed=$((failed + 1)); failures+=("$*"); echo "  FAIL  $*"; }
say()  { echo "slurm selftest: $*"; }

# --- processes of a run ---------------------------------------------------------------------
# alive PID: running (a zombie is not); start_time PID: with the PID, names one process.
alive() {
    local st
    st=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    st=${st##*) }
    [ "${st%% *}" != Z ]
}
start_time() {
    local st
    st=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
    st=${st##*) }
    set -- $st    # split on purpose: the fields after the command name
    [ "$1" != Z ] && echo "${20}"
}
# Every process of run DIR: the daemons (DIR in their command line), slurmstepd and
# slurmscriptd (working directory under DIR), and the jobs' processes (FASA_SLURM_SELFTEST_RUN
# =DIR in their environment, passed to the daemons and sbatch only, never to this shell).
run_pids() {
    local dir=$1 f p list
    # Collected first, so that grep and find (whose own command lines name DIR) have exited.
    list=$(grep -lzF -- "$dir/" /proc/[0-9]*/cmdline 2>/dev/null
           grep -lzxF -- "FASA_SLURM_SELFTEST_RUN=$dir" /proc/[0-9]*/environ 2>/dev/null
           find /proc/[0-9]* -maxdepth 1 -name cwd \( -lname "$dir/*" -o -lname "$dir" \) 2>/dev/null)
    for f in $list; do
        p=${f#/proc/}; p=${p%%/*}
        [ "$p" != "$$" ] && alive "$p" && echo "$p"
    done | sort -un
}

# TERM the PIDs, wait up to $1 seconds, then KILL what is left and wait a little more.
stop_pids() {
    local secs=$1; shift
    local p i n
    [ $# -gt 0 ] || return 0
    kill -TERM "$@" 2>/dev/null
    for ((i = 0; i < secs * 10; i++)); do
        n=0
        for p in "$@"; do alive "$p" && n=1; done
        [ "$n" -eq 0 ] && return 0
        sleep 0.1
    done
    kill -KILL "$@" 2>/dev/null
    sleep 0.5
    for p in "$@"; do alive "$p" && return 1; done
    return 0
}

owner_alive() {     # is the selftest that wrote the state file still running?
    local pid st
    read -r pid st < <(sed -n 's/^owner //p' "$state" 2>/dev/null)
    [ -n "$pid" ] && [ -n "$st" ] && [ "$(start_time "$pid")" = "$st" ]
}

# Stops what an earlier run left behind (it died before its teardown).
cleanup_stale() {
    [ -f "$state" ] || return 0
    local old pids=() kind pid rest
    if owner_alive; then
        bad "another selftest ($(sed -n 's/^owner //p' "$state" | cut -d' ' -f1)) is running"
        return 1
    fi
    old=$(sed -n 's/^scratch //p' "$state" | head -n 1)
    [ -n "$old" ] || { rm -f "$state"; return 0; }
    while read -r kind pid rest; do
        [ "$kind" = pid ] && [ -r "/proc/$pid/cmdline" ] || continue
        # Only if the PID still is that run's daemon (PIDs are reused).
        tr '\0' ' ' < "/proc/$pid/cmdline" | grep -qF -- "$old/" && pids+=("$pid")
    done < "$state"
    case "$old" in
        /tmp/fasa-slurm-selftest.?*)
            while read -r pid; do pids+=("$pid"); done < <(run_pids "$old") ;;
        *) old= ;;
    esac
    if [ ${#pids[@]} -gt 0 ]; then
        mapfile -t pids < <(printf '%s\n' "${pids[@]}" | sort -un)
        say "stopping ${#pids[@]} process(es) left by an earlier run ($old): ${pids[*]}"
        stop_pids 15 "${pids[@]}"
    fi
    [ -n "$old" ] && rm -rf "$old"
    rm -f "$state"
}

port_listening() {   # LISTEN (0A) on the port, IPv4 or IPv6
    local hex
    hex=$(printf ':%04X' "$1")
    awk -v h="$hex" '$4 == "0A" && substr($2, length($2) - 4) == h { f = 1 } END { exit !f }' \
        /proc/net/tcp /proc/net/tcp6 2>/dev/null
}

# --- teardown (also on failure or interrupt) ------------------------------------------------
S="" daemon_pids=() bg_pids=() torn_down=0
show_logs() {
    [ -n "$S" ] && [ -d "$S" ] || return 0
    local f
    for f in "$S"/jobs/* "$S"/*.sbatch.out; do
        [ -f "$f" ] || continue
        echo "----- $f"; tail -n 60 "$f"
    done
    for f in "$S/slurm/log/slurmctld.log" "$S/slurm/log/slurmd.log" "$S/munge/log/munged.log"; do
        [ -f "$f" ] || continue
        echo "----- $f (last 40 lines)"; tail -n 40 "$f"
    done
}
teardown() {
    [ "$torn_down" -eq 1 ] && return 0
    torn_down=1
    [ -n "$S" ] || return 0
    local p left=()
    if [ -s "$S/slurm/run/slurmctld.pid" ] && kill -0 "$(cat "$S/slurm/run/slurmctld.pid")" 2>/dev/null; then
        local jobs i
        mapfile -t jobs < <(squeue -h -o %A 2>/dev/null)
        if [ ${#jobs[@]} -gt 0 ]; then
            say "cancelling jobs still queued or running: ${jobs[*]}"
            scancel "${jobs[@]}" 2>/dev/null
            for ((i = 0; i < 300; i++)); do
                [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break
                sleep 0.1
            done
        fi
    fi
    for p in "${bg_pids[@]}"; do kill -0 "$p" 2>/dev/null && kill -TERM "$p" 2>/dev/null; done
    # The daemons, by their PIDs: slurmd, slurmctld, munged.
    for p in "${daemon_pids[@]}"; do
        stop_pids 15 "$p" || bad "daemon PID $p did not stop"
    done
    # Anything else of this run (slurmstepd, slurmscriptd, job processes) must be gone too.
    for ((i = 0; i < 50; i++)); do
        mapfile -t left < <(run_pids "$S")
        [ ${#left[@]} -eq 0 ] && break
        sleep 0.2
    done
    if [ ${#left[@]} -gt 0 ]; then
        bad "processes of this run were still alive after the daemons stopped: $(for p in "${left[@]}"; do printf '%s(%s) ' "$p" "$(tr '\0' ' ' < "/proc/$p/cmdline" 2>/dev/null | cut -c1-60)"; done)"
        stop_pids 10 "${left[@]}"
    fi
    rm -rf "$S"
    rm -f "$state"
}
on_exit() {
    local rc=$?
    if [ "$torn_down" -eq 0 ]; then
        [ "$rc" -ne 0 ] && show_logs
        teardown
    fi
}
trap on_exit EXIT
trap 'say "interrupted"; exit 130' INT
trap 'say "terminated"; exit 143' TERM

finish() {
    local secs
    [ "$failed" -gt 0 ] && { say "logs of the failed run:"; show_logs; }
    teardown
    if [ ${#daemon_pids[@]} -gt 0 ]; then
        local p n=0
        for p in "${daemon_pids[@]}"; do alive "$p" && n=1; done
        if [ "$n" -eq 0 ] && [ ! -e "$S" ]; then
            ok "teardown: daemons stopped by PID, no process of the run left, scratch removed"
        else
            bad "teardown incomplete"
        fi
    fi
    secs=$((SECONDS - started))
    say "$passed passed, $failed failed (${secs}s)"
    for f in "${failures[@]}"; do echo "  failed: $f"; done
    [ "$failed" -eq 0 ]
    exit $?
}

# --- 1. Slurm and munge ---------------------------------------------------------------------
say "build $build, repository $repo"
for f in fasa-server fasa npy_diff; do
    [ -x "$build/$f" ] || { bad "$build/$f missing (build first)"; finish; }
done
[ -r "$repo/$dump_rel" ] || { bad "the stories260K dump is missing ($repo/$dump_rel)"; finish; }

slurm_cmds=(munged mungekey munge unmunge slurmctld slurmd sbatch srun sinfo squeue scontrol scancel)
missing=0
for c in "${slurm_cmds[@]}"; do command -v "$c" >/dev/null || missing=1; done
if [ "$missing" -eq 1 ]; then
    sudo=
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo=sudo
        else bad "Slurm is not installed, and installing it needs root or sudo"; finish; fi
    fi
    say "installing slurmctld slurmd slurm-client munge libpmix-dev (apt-get)"
    # The packages' scripts would start system munge/slurm services that outlive this test:
    # a policy-rc.d that denies every start, in place only during the install, stops that.
    own_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d > /dev/null &&
            $sudo chmod 755 /usr/sbin/policy-rc.d && own_policy=1
    fi
    # libpmix-dev holds the libpmix.so that Slurm's mpi_pmix plugin loads.
    if $sudo apt-get update -q > /tmp/fasa-slurm-selftest.apt.log 2>&1 &&
       DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends \
           -o DPkg::Lock::Timeout=120 slurmctld slurmd slurm-client munge libpmix-dev \
           >> /tmp/fasa-slurm-selftest.apt.log 2>&1; then
        [ "$own_policy" -eq 1 ] && $sudo rm -f /usr/sbin/policy-rc.d
    else
        [ "$own_policy" -eq 1 ] && $sudo rm -f /usr/sbin/policy-rc.d
        tail -n 30 /tmp/fasa-slurm-selftest.apt.log
        bad "apt-get install of Slurm failed (log above)"; finish
    fi
    for c in "${slurm_cmds[@]}"; do command -v "$c" >/dev/null || { bad "$c still missing after installing"; finish; }; done
fi
ok "Slurm and munge installed ($(slurmd -V 2>/dev/null), $(munge --version 2>/dev/null | awk '{print $1}'))"

# --- 2. a single-node cluster in a scratch directory ----------------------------------------
# The lock serialises runs; children never inherit it (9>&-). If it is taken but the run
# named in the state file is dead, its daemons hold it (an older version let them inherit
# it): stop them first.
exec 9> "$lock"
if ! flock -w 5 9; then
    [ -f "$state" ] && ! owner_alive && cleanup_stale
    flock -w 180 9 || { bad "another selftest holds $lock"; finish; }
fi
cleanup_stale || finish
for port in 6817 6818; do
    if port_listening "$port"; then
        bad "port $port is already in use (another Slurm?); ss -ltnp shows: $(ss -Hltnp "sport = :$port" 2>/dev/null | tr '\n' ' ')"
        finish
    fi
done

S=$(mktemp -d /tmp/fasa-slurm-selftest.XXXXXX) || { bad "mktemp failed"; finish; }
printf 'scratch %s\nowner %s %s\n' "$S" "$$" "$(start_time $$)" > "$state"
marker=FASA_SLURM_SELFTEST_RUN=$S
mkdir -p "$S"/munge/{etc,run,lib,log} "$S"/slurm/{state,spool,log,run} "$S/jobs"
chmod 755 "$S" "$S/munge" "$S/munge/run"      # munged wants execute for all on the socket path
chmod 700 "$S/munge/etc" "$S/munge/lib" "$S/munge/log"

wait_pidfile() {    # FILE NAME: the daemon's PID once its PID file appears
    local i
    for ((i = 0; i < 100; i++)); do
        if [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; then
            daemon_pids=("$(cat "$1")" "${daemon_pids[@]}")    # stopped in reverse order
            echo "pid $(cat "$1") $2" >> "$state"
            return 0
        fi
        sleep 0.1
    done
    return 1
}

sock=$S/munge/run/munge.socket.2
mungekey --create --keyfile="$S/munge/etc/munge.key" 2>"$S/munge/log/mungekey.err" ||
    { cat "$S/munge/log/mungekey.err"; bad "mungekey failed"; finish; }
env "$marker" munged --key-file="$S/munge/etc/munge.key" --socket="$sock" \
    --pid-file="$S/munge/run/munged.pid" --seed-file="$S/munge/lib/munged.seed" \
    --log-file="$S/munge/log/munged.log" 9>&- ||
    { bad "munged did not start"; finish; }
wait_pidfile "$S/munge/run/munged.pid" munged || { bad "munged wrote no PID file"; finish; }
if munge -S "$sock" -n | unmunge -S "$sock" >/dev/null 2>&1; then ok "munged ($S/munge) encodes and decodes"
else bad "munge/unmunge round trip failed"; finish; fi

cpus=$(nproc)
mem=$(awk '/^MemTotal:/ { print int($2 / 1024) }' /proc/meminfo)
user=$(id -un)
conf=$S/slurm/slurm.conf
cat > "$conf" <<EOF
# Generated by deploy/slurm/selftest.sh for a throw-away single-node cluster.
ClusterName=fasaselftest
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$sock
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$S/slurm/state
SlurmdSpoolDir=$S/slurm/spool
SlurmctldPidFile=$S/slurm/run/slurmctld.pid
SlurmdPidFile=$S/slurm/run/slurmd.pid
SlurmctldLogFile=$S/slurm/log/slurmctld.log
SlurmdLogFile=$S/slurm/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=pmix
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
SchedulerType=sched/backfill
InactiveLimit=0
KillWait=5
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=30
# Take the node's layout from here, not from the hardware (CI machines differ).
SlurmdParameters=config_overrides
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
export SLURM_CONF=$conf
env "$marker" slurmctld -f "$conf" -c 9>&- || { bad "slurmctld did not start"; finish; }
wait_pidfile "$S/slurm/run/slurmctld.pid" slurmctld || { bad "slurmctld wrote no PID file"; finish; }
env "$marker" slurmd -f "$conf" -N localhost 9>&- || { bad "slurmd did not start"; finish; }
wait_pidfile "$S/slurm/run/slurmd.pid" slurmd || { bad "slurmd wrote no PID file"; finish; }
node_state=
for ((i = 0; i < 150; i++)); do
    node_state=$(sinfo -h -N -o %T 2>/dev/null)
    [ "$node_state" = idle ] && break
    sleep 0.2
done
if [ "$node_state" = idle ]; then ok "slurmctld + slurmd up: node localhost idle ($cpus CPUs, ${mem} MiB)"
else bad "node not idle after 30 s (sinfo: '${node_state}')"; finish; fi
if srun --mpi=list 2>&1 | grep -q pmix; then ok "srun --mpi=list offers pmix"
else bad "no pmix MPI plugin (srun --mpi=list: $(srun --mpi=list 2>&1 | tr '\n' ' '))"; finish; fi

# --- helpers for the jobs ---------------------------------------------------------------------
# submit NAME ARGS...: sbatch --wait in the background; its output in $S/NAME.sbatch.out.
submit() {
    local name=$1; shift
    (cd "$S" && exec env "$marker" FASA_BUILD="$build" sbatch --wait --job-name="$name" \
        --output="$S/jobs/%x-%j.out" "$@") > "$S/$name.sbatch.out" 2>&1 9>&- &
    bg_pids+=($!)
    last_bg=$!
}
job_id() { sed -n 's/^Submitted batch job \([0-9]*\).*/\1/p' "$S/$1.sbatch.out" | head -n 1; }
# check_job NAME PID WHAT: sbatch --wait's exit status and scontrol's state of the job.
check_job() {
    local name=$1 pid=$2 what=$3 rc id info
    wait "$pid"; rc=$?
    id=$(job_id "$name")
    info=$(scontrol show job -o "$id" 2>/dev/null)
    local st=${info#*JobState=}; st=${st%% *}
    local ec=${info#*ExitCode=}; ec=${ec%% *}
    if [ "$rc" -eq 0 ] && [ "$st" = COMPLETED ] && [ "$ec" = 0:0 ]; then
        ok "$what: job $id COMPLETED, ExitCode 0:0, sbatch --wait exit 0"
    else
        bad "$what: job ${id:-?} state ${st:-?} ExitCode ${ec:-?}, sbatch --wait exit $rc"
    fi
}
wait_endpoint() {   # FILE PID: waits (60 s) for the endpoint file while sbatch runs
    local i
    for ((i = 0; i < 600; i++)); do
        [ -s "$1" ] && return 0
        kill -0 "$2" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}
fasa_pids_of_job() {   # fasa-server processes of job NAME
    local id p
    id=$(job_id "$1")
    [ -n "$id" ] || return 0
    for p in $(run_pids "$S"); do
        [ "$(readlink "/proc/$p/exe" 2>/dev/null)" = "$build/fasa-server" ] &&
            tr '\0' '\n' < "/proc/$p/environ" 2>/dev/null | grep -qx "SLURM_JOB_ID=$id" && echo "$p"
    done
}
# compare KIND REF GOT: float32 .npy within 1e-6, or identical bytes
compare() {
    local kind=$1 ref=$2 got=$3 out
    if [ ! -f "$got" ]; then bad "$got missing"; return; fi
    if [ ! -f "$ref" ]; then bad "reference $ref missing"; return; fi
    if [ "$kind" = npy ]; then
        if out=$("$build/npy_diff" "$ref" "$got" 1e-6 2>&1); then ok "${got#"$S"/}: $out (embedded vs service)"
        else bad "${got#"$S"/} differs from the embedded engine: $out"; fi
    else
        if cmp -s "$ref" "$got"; then ok "${got#"$S"/}: identical to the embedded engine's"
        else bad "${got#"$S"/} differs from the embedded engine's ($ref)"; fi
    fi
}

# The workload's commands as fasa-job.sbatch reads them, and the files each one writes.
wl_cmds=()
while IFS= read -r raw || [ -n "$raw" ]; do
    read -r -a words <<< "$raw"
    [ ${#words[@]} -eq 0 ] && continue
    case "${words[0]}" in \#*) continue ;; esac
    [ "${words[0]}" = fasa ] && raw=${raw#*fasa}
    wl_cmds+=("$raw")
done < "$workload"
# outputs_of LINE: "kind name" per file the line writes under {out}
outputs_of() {
    local -a w
    read -r -a w <<< "$1"
    local i kind
    for ((i = 0; i + 1 < ${#w[@]}; i++)); do
        case "${w[$i]}" in
            --out) case "${w[$((i + 1))]}" in *.npy) kind=npy ;; *) kind=bytes ;; esac ;;
            --selected) kind=bytes ;;
            *) continue ;;
        esac
        case "${w[$((i + 1))]}" in '{out}/'*) echo "$kind ${w[$((i + 1))]#\{out\}/}" ;; esac
    done
}
expand() { local s=$1; echo "${s//'{out}'/"$2"}"; }

# --- 3b. started first: the time-limit job (its TERM comes from slurmctld within ~30 s) -------
say "submitting the time-limit job (fasa-server.sbatch --time=1, --signal=B:TERM@120)"
submit timelimit --time=1 --ntasks=$ranks --overcommit --export=ALL,FASA_ENDPOINT_FILE="$S/timelimit.endpoint",FASA_RUN_DIR="$S/timelimit-run" \
    "$here/fasa-server.sbatch"
tl_pid=$last_bg
# Checked now, while it serves: slurmctld's first time-limit pass comes about 30 s after it
# started, and the job stops (removing its endpoint file) soon after. At the end only its
# state, its output and leftover processes are checked.
if [ -s "$S/timelimit.endpoint" ] || wait_endpoint "$S/timelimit.endpoint" "$tl_pid"; then
    ep=$(cat "$S/timelimit.endpoint" 2>/dev/null)
    n_ranks=$(fasa_pids_of_job timelimit | wc -l)
    if [ -n "$ep" ] && FASA_TIMEOUT_MS=5000 "$build/fasa" ping --server "$ep" >/dev/null 2>&1; then
        ok "time-limit job serves on $ep ($n_ranks fasa-server processes of the job found)"
    elif ! kill -0 "$tl_pid" 2>/dev/null; then
        ok "time-limit job published its endpoint (already stopped)"
    else
        bad "time-limit job: no ping answer on '$ep'"
    fi
else
    bad "time-limit job: no endpoint file"
fi

# --- reference: the workload on the embedded engine -----------------------------------------
say "running workload.example on the embedded engine (reference)"
mkdir -p "$S/ref"
ref_ok=1
for line in "${wl_cmds[@]}"; do
    read -r -a words <<< "$(expand "$line" "$S/ref")"
    case "${words[0]}" in calibrate|replay|demo) ;; *) continue ;; esac
    if ! (cd "$repo" && "$build/fasa" "${words[@]}" > "$S/ref/log" 2>&1); then
        cat "$S/ref/log"; bad "embedded: fasa ${words[*]}"; ref_ok=0
    fi
done
[ "$ref_ok" -eq 1 ] && ok "embedded engine ran the ${#wl_cmds[@]} workload commands"

# --- 3a. service job: endpoint file, ping, replay, fasa shutdown ------------------------------
say "service job: fasa-server.sbatch, $ranks ranks, stopped with fasa shutdown"
ep_file=$S/service.endpoint
submit service --time=5 --ntasks=$ranks --overcommit \
    --export=ALL,FASA_ENDPOINT_FILE="$ep_file",FASA_RUN_DIR="$S/service-run" "$here/fasa-server.sbatch"
svc_pid=$last_bg
if wait_endpoint "$ep_file" "$svc_pid"; then
    ep=$(cat "$ep_file")
    ok "service job wrote its endpoint file: $ep"
    if out=$(FASA_TIMEOUT_MS=5000 "$build/fasa" ping --server "$ep" 2>&1) && [[ "$out" == *"$ranks rank(s)"* ]]; then
        ok "ping: $out"
    else
        bad "ping of $ep: $out"
    fi
    rank0=$(cat "$S/service-run/fasa-server.pid" 2>/dev/null)
    mkdir -p "$S/service-out" "$S/service-ref"
    args=(replay --qkv "$dump_rel" --method oracle --budget 32 --positions 1024:2048:64)
    if (cd "$repo" && "$build/fasa" "${args[@]}" --out "$S/service-ref/oracle.npy" --selected "$S/service-ref/sel.npy" >/dev/null) &&
       (cd "$repo" && "$build/fasa" "${args[@]}" --out "$S/service-out/oracle.npy" --selected "$S/service-out/sel.npy" --server "$ep" > "$S/service-out/log" 2>&1); then
        compare npy "$S/service-ref/oracle.npy" "$S/service-out/oracle.npy"
        compare bytes "$S/service-ref/sel.npy" "$S/service-out/sel.npy"
    else
        cat "$S/service-out/log"; bad "replay against the service job failed"
    fi
    if out=$(FASA_TIMEOUT_MS=10000 "$build/fasa" shutdown --server "$ep" 2>&1); then ok "fasa shutdown: $out"
    else bad "fasa shutdown: $out"; fi
    check_job service "$svc_pid" "service job after fasa shutdown"
    [ -e "$ep_file" ] && bad "the endpoint file is still there after the service stopped" ||
        ok "the endpoint file was removed when the service stopped"
    if [ -n "$rank0" ] && ! alive "$rank0" && [ -z "$(fasa_pids_of_job service)" ]; then
        ok "rank 0 (PID $rank0) and the workers are gone"
    else
        bad "fasa-server processes left after the service job: rank 0 '${rank0}' $(fasa_pids_of_job service | tr '\n' ' ')"
    fi
else
    bad "service job: no endpoint file within 60 s"
    check_job service "$svc_pid" "service job"
fi

# --- 3c. fasa-job.sbatch with the example workload --------------------------------------------
say "batch job: fasa-job.sbatch workload.example, $ranks ranks"
submit job --ntasks=$ranks --overcommit --chdir="$repo" --export=ALL,FASA_RUN_DIR="$S/job-run" \
    "$here/fasa-job.sbatch" "$workload" "$S/results"
job_pid=$last_bg
# A workload with a failing line: the job must run the rest, stop the service cleanly and fail.
cat > "$S/bad.workload" <<WORKLOAD
# one line that works, one that cannot (no such dump)
replay --qkv $dump_rel --method dense --budget 32 --positions 1024:2048:256 --out {out}/dense.npy
replay --qkv {out}/no-such.qkv --method dense --budget 8 --out {out}/never.npy
WORKLOAD
submit badjob --ntasks=$ranks --overcommit --chdir="$repo" --export=ALL,FASA_RUN_DIR="$S/badjob-run" \
    "$here/fasa-job.sbatch" "$S/bad.workload" "$S/bad-results"
badjob_pid=$last_bg
check_job job "$job_pid" "fasa-job.sbatch"
if [ -f "$S/results/workload.log" ]; then
    n_ok=$(grep -c '^OK ' "$S/results/workload.log")
    [ "$n_ok" -eq ${#wl_cmds[@]} ] && ok "workload.log: all ${#wl_cmds[@]} commands OK" ||
        bad "workload.log: $n_ok of ${#wl_cmds[@]} OK: $(grep -v '^OK ' "$S/results/workload.log" | tr '\n' ' ')"
else
    bad "no workload.log in the results"
fi
for line in "${wl_cmds[@]}"; do
    read -r -a words <<< "$line"
    case "${words[0]}" in calibrate|replay|demo) ;; *) continue ;; esac
    while read -r kind name; do
        [ -n "$name" ] && compare "$kind" "$S/ref/$name" "$S/results/$name"
    done < <(outputs_of "$line")
done
[ -z "$(fasa_pids_of_job job)" ] && ok "no fasa-server process left after the batch job" ||
    bad "fasa-server processes left after the batch job: $(fasa_pids_of_job job | tr '\n' ' ')"

# The failing workload.
wait "$badjob_pid"; rc=$?
id=$(job_id badjob)
info=$(scontrol show job -o "$id" 2>/dev/null)
st=${info#*JobState=}; st=${st%% *}; ec=${info#*ExitCode=}; ec=${ec%% *}
bad_out=$(ls "$S"/jobs/badjob-*.out 2>/dev/null | head -n 1)
if [ "$rc" -ne 0 ] && [ "$st" = FAILED ] && [ "$ec" = 1:0 ] &&
   [ "$(grep -c '^OK ' "$S/bad-results/workload.log" 2>/dev/null)" = 1 ] &&
   [ "$(grep -c '^FAILED ' "$S/bad-results/workload.log" 2>/dev/null)" = 1 ] &&
   grep -q 'service exit 0' "$bad_out" 2>/dev/null && [ -z "$(fasa_pids_of_job badjob)" ]; then
    ok "a workload with a failing line: job $id FAILED (ExitCode $ec, sbatch --wait exit $rc), the other line ran, the service stopped cleanly"
else
    bad "failing workload: job ${id:-?} state ${st:-?} ExitCode ${ec:-?}, sbatch --wait exit $rc, workload.log: $(tr '\n' ' ' < "$S/bad-results/workload.log" 2>/dev/null)"
fi

# --- 3b. the time-limit job, continued ---------------------------------------------------------
say "waiting for the time-limit job (slurmctld sends TERM to its batch shell)"
check_job timelimit "$tl_pid" "time-limit job stopped by --signal=B:TERM@120"
tl_out=$(ls "$S"/jobs/timelimit-*.out 2>/dev/null | head -n 1)
if [ -n "$tl_out" ] && grep -q 'TERM received' "$tl_out" && grep -q 'srun exit status 0' "$tl_out"; then
    ok "time-limit job: the trap sent TERM to rank 0, every rank stopped, srun exit 0"
else
    bad "time-limit job: no clean stop in its output ($tl_out)"
fi
[ -z "$(fasa_pids_of_job timelimit)" ] && ok "no fasa-server process left after the time-limit job" ||
    bad "fasa-server processes left after the time-limit job"

# --- 3d. durable: a job holding sessions is requeued (as preemption does) and restores ------
# rnd_npy FILE SHAPE N: float32 .npy of N pseudo-random finite values (tests/durable_test.sh)
set2=$(for _ in $(seq 32); do printf '\\074\\075\\076\\077\\274\\275\\276\\277'; done)
rnd_npy() {
    local hdr="{'descr': '<f4', 'fortran_order': False, 'shape': ($2), }"
    while [ $(((10 + ${#hdr} + 1) % 64)) -ne 0 ]; do hdr="$hdr "; done
    local len=$((${#hdr} + 1))
    { printf '\x93NUMPY\x01\x00'; printf "\\x$(printf %02x $((len & 255)))\\x$(printf %02x $((len >> 8)))"
      printf '%s\n' "$hdr"; head -c $((4 * $3)) /dev/urandom | tr '\000-\377' "$set2"; } >"$1"
}
D="$S/durable-data"
mkdir -p "$D" "$S/durable-state"
rnd_npy "$D/k.npy" "2, 600, 2, 16" 38400
rnd_npy "$D/v.npy" "2, 600, 2, 16" 38400
rnd_npy "$D/k2.npy" "2, 40, 2, 16" 2560
rnd_npy "$D/v2.npy" "2, 40, 2, 16" 2560
rnd_npy "$D/q.npy" "4, 16" 64
d_attends() {   # PREFIX: dense and quest on both layers
    local m l
    for m in dense quest; do for l in 0 1; do
        FASA_TIMEOUT_MS=20000 "$build/fasa" attend --server "$ep" --session d1 --layer $l --q "$D/q.npy" \
            --method $m --out "$1_${m}_$l.npy" >/dev/null 2>>"$D/err" || return 1
    done; done
}
d_length() { "$build/fasa" stats --server "$ep" --session d1 2>/dev/null | awk '$1 == "session.length" { print $2 }'; }
say "submitting the durable job (fasa-server.sbatch with FASA_STATE_DIR, --requeue)"
submit durable --ntasks=$ranks --overcommit --export=ALL,FASA_ENDPOINT_FILE="$S/durable.endpoint",FASA_RUN_DIR="$S/durable-run",FASA_STATE_DIR="$S/durable-state" \
    "$here/fasa-server.sbatch"
d_pid=$last_bg
if wait_endpoint "$S/durable.endpoint" "$d_pid"; then
    ep=$(cat "$S/durable.endpoint")
    if "$build/fasa" create --server "$ep" --session d1 --layers 2 --heads 4 --kv-heads 2 --head-dim 16 >/dev/null 2>>"$D/err" &&
       "$build/fasa" append --server "$ep" --session d1 --k "$D/k.npy" --v "$D/v.npy" >/dev/null 2>>"$D/err" &&
       "$build/fasa" append --server "$ep" --session d1 --k "$D/k2.npy" --v "$D/v2.npy" >/dev/null 2>>"$D/err" &&
       d_attends "$D/a"; then
        ok "durable job: session d1 with 640 acknowledged tokens, no snapshot requested"
    else
        bad "durable job: session: $(cat "$D/err")"
    fi
    d_id=$(job_id durable)
    old_ep=$ep
    scontrol requeue "$d_id" 2>>"$D/err" && ok "scontrol requeue $d_id (what preemption with PreemptMode=REQUEUE does)" ||
        bad "scontrol requeue $d_id: $(cat "$D/err")"
    back=0
    for ((i = 0; i < 2400; i++)); do   # up to 240 s: a requeued job may wait out a BeginTime
        if [ -s "$S/durable.endpoint" ] && [ "$(cat "$S/durable.endpoint")" != "$old_ep" ]; then
            ep=$(cat "$S/durable.endpoint")
            FASA_TIMEOUT_MS=5000 "$build/fasa" ping --server "$ep" >/dev/null 2>&1 && { back=1; break; }
        fi
        sleep 0.1
    done
    if [ $back -eq 1 ]; then
        rc_n=$(scontrol show job -o "$d_id" | sed -n 's/.*Restarts=\([0-9]*\).*/\1/p')
        ok "durable job requeued and serving again on $ep (Restarts=$rc_n)"
        [ "$(d_length)" = 640 ] && ok "after the requeue: every acknowledged append is there (640 tokens)" ||
            bad "after the requeue: d1 holds '$(d_length)' tokens, not 640"
        if d_attends "$D/b"; then
            nd=0
            for f in "$D"/a_*.npy; do cmp -s "$f" "$D/b${f#"$D"/a}" || nd=$((nd + 1)); done
            [ $nd -eq 0 ] && ok "after the requeue: 4 outputs bit-identical to before" || bad "after the requeue: $nd outputs differ"
        else
            bad "attends after the requeue: $(cat "$D/err")"
        fi
        d_out=$(ls "$S"/jobs/durable-*.out 2>/dev/null | head -n 1)
        grep -q "final snapshot done: 1 session written" "$d_out" && grep -q "restore: 1 session" "$d_out" &&
            ok "the first run wrote a final snapshot on TERM, the second restored it" ||
            bad "no final snapshot / restore in $d_out"
        FASA_TIMEOUT_MS=10000 "$build/fasa" shutdown --server "$ep" >/dev/null 2>&1
    else
        bad "the durable job did not come back after the requeue: $(scontrol show job -o "$d_id" | tr ' ' '\n' | grep -E 'JobState|Reason|BeginTime|Restarts' | tr '\n' ' ')"
        scancel "$d_id" 2>/dev/null
    fi
    for ((i = 0; i < 600; i++)); do kill -0 "$d_pid" 2>/dev/null || break; sleep 0.1; done
    st=$(scontrol show job -o "$d_id" | sed -n 's/.*JobState=\([A-Z]*\).*/\1/p')
    [ "$st" = COMPLETED ] && ok "durable job COMPLETED after its shutdown" || bad "durable job state $st"
else
    bad "durable job: no endpoint file"
fi
[ -z "$(fasa_pids_of_job durable)" ] && ok "no fasa-server process left after the durable job" ||
    bad "fasa-server processes left after the durable job"

finish

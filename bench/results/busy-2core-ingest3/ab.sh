#!/usr/bin/env bash
# A/B: fresh 2-worker server per run, f16 ingest 65536 tokens; prints build, reserve, GB/s.
set -u
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1 OPENBLAS_NUM_THREADS=1
root=/work/wt/ingest3
one() { # name build reserve
    local d; d=$(mktemp -d)
    if [ "$3" = 0 ]; then FASA_BUILD=$2 bash $root/deploy/run-local.sh 3 --bind 'tcp://127.0.0.1:*' --run-dir $d >/dev/null 2>&1
    else FASA_BUILD=$2 bash $root/deploy/run-local.sh 3 --bind 'tcp://127.0.0.1:*' --run-dir $d -- --reserve $3 >/dev/null 2>&1; sleep 3; fi
    local ep; ep=$(cat $d/endpoint)
    local g; g=$($2/fasa bench ingest --server $ep --tokens 65536 --dtype f16 --json $d/j.json >/dev/null 2>&1; python3 -c "import json;print(json.load(open('$d/j.json'))['ingest_gbs'])")
    echo "$1 reserve=$3 gbs=$g"
    FASA_BUILD=$2 bash $root/deploy/stop-local.sh --run-dir $d >/dev/null 2>&1; rm -rf $d
}
for i in 1 2 3; do
    one main /work/main/build 0
    one A /work/wt/ingest3-a/build 0
    one B $root/build 0
    one A /work/wt/ingest3-a/build 1200M
    one B $root/build 1200M
done

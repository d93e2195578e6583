#!/usr/bin/env bash
# Builds fasa twice (Release, and AddressSanitizer + UBSan) and runs every test in both,
# then the Slurm selftest (deploy/slurm/selftest.sh) on the Release build.
# This is the README's test command and what CI runs after deploy/install-deps.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=$(nproc 2>/dev/null || echo 2)
export OPENBLAS_NUM_THREADS=1
for variant in plain sanitize; do
    dir=build
    flags=()
    if [ "$variant" = sanitize ]; then
        dir=build-asan
        flags=(-DFASA_SANITIZE=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo)
        export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
    fi
    echo "=== $variant build ($dir)"
    cmake -S . -B "$dir" "${flags[@]}" >/dev/null
    cmake --build "$dir" -j "$jobs"
    echo "=== $variant tests"
    ctest --test-dir "$dir" --output-on-failure
done

# libFuzzer over the request path (clang, build-fuzz) for a fixed number of executions;
# FASA_SKIP_FUZZ=1 skips it.
if [ "${FASA_SKIP_FUZZ:-0}" = 1 ]; then
    echo "=== fuzz skipped (FASA_SKIP_FUZZ=1)"
else
    echo "=== fuzz"
    bash tests/fuzz.sh
fi

# A real single-node Slurm (installed with apt-get when missing) running both batch scripts
# of deploy/slurm/ against the plain build; FASA_SKIP_SLURM=1 skips it.
if [ "${FASA_SKIP_SLURM:-0}" = 1 ]; then
    echo "=== slurm selftest skipped (FASA_SKIP_SLURM=1)"
else
    echo "=== slurm selftest"
    bash deploy/slurm/selftest.sh build
fi

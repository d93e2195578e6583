#!/usr/bin/env bash
# Installs every Debian 12 package that fasa's build, tests and benchmarks need.
# Safe to run twice: apt-get install is idempotent, and the package index is only
# refreshed when a package is missing.
set -euo pipefail

pkgs=(build-essential cmake pkg-config
      libopenblas-dev check
      libopenmpi-dev openmpi-bin
      libzmq3-dev libprotobuf-c-dev protobuf-c-compiler
      clang clang-14 libclang-rt-14-dev   # clang + libFuzzer for tests/fuzz.sh
      gnuplot-nox                          # fasa bench --png, bench/eval_report.sh
      libmicrohttpd-dev curl               # fasa-server --metrics-bind and its test
      python3)                             # tests/slow_peers.py: raw ZMTP peers (hold_test.sh)

missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done

if [ ${#missing[@]} -eq 0 ]; then
    echo "install-deps: all ${#pkgs[@]} packages already installed"
    exit 0
fi

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "install-deps: installing ${missing[*]}"
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
echo "install-deps: done"

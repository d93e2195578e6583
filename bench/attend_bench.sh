#!/usr/bin/env bash
# `fasa bench attend` through the service with 1 and 2 workers in one run: starts a 2-rank
# (coordinator + 1 worker) and a 3-rank (coordinator + 2 workers) fasa-server on loopback,
# runs `fasa bench attend --server E1,E2` with the given options (the sessions run one at a
# time: one server is idle while the other works), and stops both.
#   bench/attend_bench.sh [fasa bench attend options...]
# e.g. bench/attend_bench.sh --tokens 128K,512K,1M --methods dense,fasa --csv attend.csv
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
case "${1:-}" in -h|--help) sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;; esac
source "$root/bench/local_servers.sh"
start_server 2
one=$SERVER_ENDPOINT
start_server 3
two=$SERVER_ENDPOINT
"$FASA_BUILD/fasa" bench attend --server "$one,$two" "$@"

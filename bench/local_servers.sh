# Sourced by the server benchmarks: start loopback fasa-servers (deploy/run-local.sh), each
# in its own run directory on a free port, and stop every one of them on exit.
#   source bench/local_servers.sh; start_server N; echo "$SERVER_ENDPOINT"
# Needs $root (the source tree); FASA_BUILD defaults to $root/build.
export FASA_BUILD=${FASA_BUILD:-$root/build}
_server_dirs=()
_stop_servers() {
    for d in "${_server_dirs[@]}"; do
        bash "$root/deploy/stop-local.sh" --run-dir "$d" >/dev/null 2>&1 || true
        rm -rf "$d"
    done
}
trap _stop_servers EXIT
# start_server N [-- fasa-server options]: N ranks (N - 1 workers; 1 = one process holding
# the shard); sets SERVER_ENDPOINT.
start_server() {
    local d
    d=$(mktemp -d)
    _server_dirs+=("$d")
    bash "$root/deploy/run-local.sh" "$1" --bind 'tcp://127.0.0.1:*' --run-dir "$d" "${@:2}" >&2
    SERVER_ENDPOINT=$(cat "$d/endpoint")
}

# Sourced by the scripts and tests that start servers: FASA_TEST_PORTS=LO-HI keeps every
# port they bind inside that range (CI machines that share a host, firewalls). Unset, they
# bind port * (any free one, the kernel's choice).
#   source deploy/ports.sh
#   port=$(fasa_pick_port) || exit 2   # a port of the range nothing listens on; "" when unset
#   ep=$(fasa_bind_endpoint 127.0.0.1) # tcp://127.0.0.1:PORT, or tcp://127.0.0.1:* when unset
# A port picked here can still be taken before the server binds it: callers retry on a bind
# failure (deploy/run-local.sh does, up to 5 times).
fasa_pick_port() {
    local r=${FASA_TEST_PORTS:-}
    [ -n "$r" ] || return 0
    if ! [[ "$r" =~ ^([0-9]+)-([0-9]+)$ ]] || [ "${BASH_REMATCH[1]}" -lt 1 ] ||
       [ "${BASH_REMATCH[2]}" -gt 65535 ] || [ "${BASH_REMATCH[1]}" -gt "${BASH_REMATCH[2]}" ]; then
        echo "FASA_TEST_PORTS='$r' must be LO-HI with 1 <= LO <= HI <= 65535" >&2
        return 1
    fi
    local lo=${BASH_REMATCH[1]} hi=${BASH_REMATCH[2]} i p
    local n=$((hi - lo + 1))
    local start=$(( (RANDOM * 32768 + RANDOM + $$) % n ))
    for ((i = 0; i < n; i++)); do
        p=$((lo + (start + i) % n))
        # Nothing listening on loopback: the connection is refused.
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            echo "$p"
            return 0
        fi
    done
    echo "FASA_TEST_PORTS=$r: every port is in use" >&2
    return 1
}

fasa_bind_endpoint() {
    local p
    p=$(fasa_pick_port) || return 1
    echo "tcp://$1:${p:-*}"
}

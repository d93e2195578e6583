# Sourced by the shell tests that check error messages (cli_test, ux_test, bench/bench_test):
# expect_error. Needs tmp (a scratch directory) and the test's ok and bad.

# expect_error NAME PATTERN CMD...: CMD exits non-zero (exactly $expect_rc when the caller
# sets expect_rc) with exactly one line on stderr, matching PATTERN; ok "NAME: LINE" or bad.
expect_error() {
    local name=$1 pattern=$2
    shift 2
    "$@" >"$tmp/out" 2>"$tmp/err"
    local rc=$? lines
    lines=$(wc -l <"$tmp/err")
    if [ -n "${expect_rc:-}" ] && [ $rc -ne "$expect_rc" ]; then bad "$name: exit $rc, want $expect_rc"; return; fi
    if [ $rc -eq 0 ]; then bad "$name: exit 0"; return; fi
    if [ "$lines" -ne 1 ]; then bad "$name: $lines stderr lines: $(cat "$tmp/err")"; return; fi
    if ! grep -q -- "$pattern" "$tmp/err"; then bad "$name: '$(cat "$tmp/err")' lacks '$pattern'"; return; fi
    ok "$name: $(cat "$tmp/err")"
}

/* What the libfasa test programs run by the shell tests (latency_client, merge_client) share:
 * one FAIL line on stderr, and the seeded generator of their inputs. CLIENT_PROG names the
 * program in the FAIL line; define it before including this. */
#ifndef FASA_TESTS_CLIENT_UTIL_H
#define FASA_TESTS_CLIENT_UTIL_H

#include <stdio.h>

/* Prints "PROG: FAIL: what[: msg]" and returns 1 (the exit status). */
static int s_fail(const char *what, const char *msg)
{
    fprintf(stderr, "%s: FAIL: %s%s%s\n", CLIENT_PROG, what, msg ? ": " : "", msg ? msg : "");
    return 1;
}

/* A value in [-0.5, 0.5) from a linear congruential state. */
static float s_rand(unsigned *state)
{
    *state = *state * 1664525u + 1013904223u;
    return (float)((*state >> 8) & 0xffff) / 65536.0f - 0.5f;
}

#endif

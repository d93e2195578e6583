/* `fasa bench latency` (issue 20): the service's round trip per Attend in a decode loop.
 *
 * For each context length and method, one session of `layers` layers (32 query heads, 8 KV
 * heads, head_dim 128, client/synth.h data, the generator's true profile, no dense layer)
 * is filled with `tokens` tokens in an embedded engine and on every server given; then
 * `steps` decode tokens run layer by layer, each Attend carrying the token's k_new and
 * v_new as an engine's does, the embedded call and each server's call one after the other
 * on the same inputs (so the overhead, server minus embedded, is measured in the same run
 * under the same load, and the outputs are compared). Printed per server, context and
 * method: p50/p90/p99 per Attend embedded and through the server, the overhead at each
 * percentile (server pX minus embedded pX), where the overhead goes (libfasa's timing and
 * the server's StepStats: client encode and decode, ZeroMQ and the reply, the I/O thread's
 * hand-over, rank 0's decode, the MPI score phase, the merges and the MPI attend phase,
 * each against the embedded engine's own), and the targets at 4K tokens. */
#ifndef FASA_BENCH_LATENCY_H
#define FASA_BENCH_LATENCY_H

#define BENCH_LATENCY_MAX 8

typedef struct bench_latency_opts {
    const char *servers[BENCH_LATENCY_MAX]; /* fasa-server endpoints (none: embedded only) */
    int n_servers;
    long tokens[BENCH_LATENCY_MAX]; /* context lengths (prefilled tokens) */
    int n_tokens;
    int layers;       /* layers per session (each decode token attends every layer) */
    int steps;        /* decode tokens per context */
    int budget;       /* fasa's budget B */
    int methods;      /* bit 0: fasa, bit 1: dense */
    const char *json; /* NULL, or a file for the figures */
} bench_latency_opts;

/* Defaults: contexts 1K, 4K and 16K, 2 layers, 64 decode tokens, B 256, fasa and dense. */
void bench_latency_defaults(bench_latency_opts *o);

/* Runs the benchmark and prints its report; 0, or 1 after printing why it failed. */
int bench_latency_run(const bench_latency_opts *o);

#endif

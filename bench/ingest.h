/* fasa bench ingest (bench/ingest.c): append bandwidth of a server, with the machine's read
 * bandwidth and the in-process shard_append rate from the same run. The options are parsed
 * by cli/cmd_bench.c. */
#ifndef FASA_BENCH_INGEST_H
#define FASA_BENCH_INGEST_H

typedef struct bench_ingest_opts {
    const char *server; /* NULL: FASA_SERVER */
    const char *json;   /* NULL: no JSON */
    const char *dtype;  /* "f16", "bf16" or "f32" */
    long tokens, chunk, layers, window;
} bench_ingest_opts;

/* Runs the load and prints the figures; the exit status (0, 1 on failure, 2 on bad usage). */
int bench_ingest(const bench_ingest_opts *o);

#endif

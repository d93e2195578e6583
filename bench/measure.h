/* The measuring code of `fasa bench scan` and `fasa bench attend` (cli/cmd_bench.c is
 * their option-parsing front): the options, and one function per benchmark that prints
 * each figure next to its target (shared/docs/targets.md). */
#ifndef FASA_BENCH_MEASURE_H
#define FASA_BENCH_MEASURE_H

#include "dtype.h"
#include "engine.h"

#define BENCH_MAX_SIZES 16
#define BENCH_MAX_SERVERS 8
#define BENCH_N_METHODS 3
#define BENCH_MIN_TOKENS 1024
#define BENCH_MAX_TOKENS (1L << 24)

/* The timed methods, in the order of bench_opts.timed: dense, fasa, oracle. */
extern const char *const bench_method_names[BENCH_N_METHODS];

typedef struct bench_opts {
    long sizes[BENCH_MAX_SIZES];
    int n_sizes;
    long reps, shards, budget, seed, chunk;
    fasa_dtype dtype;
    int score_dtype;            /* scan_dtype (kernels/scan.h), 0 auto */
    int tier;                   /* 0 ram, 1 disk */
    const char *state_dir;      /* disk tier: where; NULL: a temporary directory */
    char tmp_dir[64];           /* that temporary directory, removed at exit */
    int timed[BENCH_N_METHODS]; /* 1: time this method */
    char *servers[BENCH_MAX_SERVERS];
    int n_servers;
    char server_buf[1024];
    const char *csv, *png, *json;
    long threads; /* 0: the setting read at start-up (FASA_THREADS, ...) */
} bench_opts;

/* fasa bench scan: the scoring scan's GB/s against the read bandwidth. The exit status. */
int bench_scan(const bench_opts *o);
/* fasa bench attend: decode step time per method, RAM per token, the roofline. The exit
 * status. */
int bench_attend(const bench_opts *o);

#endif

/* fasa bench scan|attend: the option-parsing front; the measuring code is in
 * bench/measure.c. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cblas.h>

#include "backend.h"
#include "cli.h"
#include "engine.h"
#include "fasa_client.h"
#include "ingest.h"
#include "measure.h"
#include "opts.h"
#include "pool.h"
#include "scan.h"

static const char usage_bench[] =
    "usage: fasa bench scan|attend|latency|ingest [options]\n"
    "\n"
    "Benchmarks that print each figure next to its target (shared/docs/targets.md) and\n"
    "whether it is met, on synthetic data (32 query heads, 8 KV heads, head_dim 128, ntip 16\n"
    "of 64 FCs, B 256). One OpenBLAS thread.\n"
    "\n"
    "  scan     the scoring scan's GB/s against the machine's read bandwidth of the same bytes\n"
    "  attend   decode step time per method (dense, fasa, oracle), dense/fasa, RAM per token\n"
    "  latency  the service's round trip per Attend in a decode loop, against embedded\n"
    "  ingest   a server's append bandwidth (stored GB/s) against the read bandwidth\n"
    "\n"
    "Run 'fasa bench scan --help' (attend, latency, ingest) for the options.\n";

static const char usage_ingest[] =
    "usage: fasa bench ingest --server ENDPOINT [options]\n"
    "\n"
    "Appends synthetic keys and values (32 query heads, 8 KV heads, head_dim 128) to a new\n"
    "session on a running fasa-server, one layer per Append request, and prints the stored\n"
    "bytes per second over the whole load (ingest_gbs), next to this machine's read\n"
    "bandwidth and the in-process shard_append rate (fast path and naive reference) measured\n"
    "in the same run. Target (issue 14): f16 through a 2-worker server >= 1.0 GB/s of stored\n"
    "bytes.\n"
    "\n";

/* fasa bench ingest: the options; the load is bench/ingest.c's. */
static int s_ingest(int argc, char **argv)
{
    bench_ingest_opts o = {.tokens = 32768, .chunk = 4096, .layers = 4, .window = 4};
    const cli_opt opts[] = {
        CLI_STR("server", &o.server, "E", NULL, "the server (required; or FASA_SERVER)"),
        CLI_INT("tokens", &o.tokens, 1, 1L << 24, "N", "32768", "tokens to load"),
        CLI_INT("chunk", &o.chunk, 1, 1L << 24, "T", "4096",
                "tokens per Append request of one layer (4096: 16.8 MB of f16,\n"
                "two placement blocks, so two workers store each request at once)"),
        CLI_INT("layers", &o.layers, 1, 64, "L", "4", "layers of the session"),
        CLI_INT("window", &o.window, 1, FASA_CLIENT_APPEND_WINDOW, "W", "4",
                "appends in flight at once (libfasa's append window)"),
        CLI_STR("dtype", &o.dtype, "D", "f16",
                "f16, bf16 or f32: the session's storage dtype and the wire's"),
        CLI_STR("json", &o.json, "FILE", NULL,
                "also write the figures as JSON (ingest_gbs, read_gbs, cpu_features, ...)"),
        CLI_END};
    cli_parser p;
    cli_begin(&p, "bench ingest", usage_ingest, opts, argc, argv);
    const int c = cli_parse_all(&p);
    if (c) return cli_status(c) < 0 ? 0 : cli_status(c);
    return bench_ingest(&o);
}

static const char usage_scan[] =
    "usage: fasa bench scan [--tokens N] [--reps R] [--seed S] [--dtype T] [--score-dtype T]\n"
    "                       [--csv FILE]\n"
    "\n"
    "Builds one shard (worker/shard.h) of N synthetic tokens whose key layout packs each KV\n"
    "head's 16 signal FCs (32 of 128 key dims: ntip 16 of 64 FCs), and times its scoring scan,\n"
    "shard_score with method fasa and B 256 (the fused scan + top-B over the scoring store,\n"
    "kernels/scan.h, exactly what a fasa step's first phase runs), as GB/s = the bytes the scan "
    "reads\n"
    "(shard_bytes_read) / time. The read-bandwidth reference reads as many bytes from a buffer\n"
    "of that size with a SIMD streaming sum with independent accumulators (AVX2 where the CPU\n"
    "has it, portable C otherwise) and with OpenBLAS cblas_sasum, and takes the faster. The\n"
    "three are interleaved, one thread; each figure is the median (p50) of R runs after a\n"
    "warm-up, with the fastest run (min). The sums are checked against a sum in double.\n"
    "Prints 'scan/read = X (target >= 0.85: met|not met)', the CPU's SIMD features, and the\n"
    "recall of the f32 selection (each head's top-B by f32 dot products of the stored keys'\n"
    "dominant dims) by the scan's selection.\n"
    "Memory: about N x 9 KiB (the shard's keys and values, and the reference buffer).\n"
    "\n";

static const char usage_attend[] =
    "usage: fasa bench attend [--tokens N[,N...]] [options]\n"
    "\n"
    "For each context length: creates one session (32 query heads, 8 KV heads, head_dim 128,\n"
    "1 layer, profile = the generator's 16 signal FCs per KV head, no dense layer), appends\n"
    "the synthetic context in chunks (--chunk), checks the outputs (finite; dense equal\n"
    "to a naive attention in double on query heads 0, 17 and 31, max error printed; the run\n"
    "fails above 1e-4 for f32), then times R decode steps per method over the whole context\n"
    "(after one warm-up) and prints p50 and min step time, the bytes each step reads and\n"
    "their GB/s, dense/fasa (target >= 5 at 1M tokens) and the RAM per token of each storage\n"
    "tier (target for a disk tier: <= 30% of f16 K+V). With a 1-worker and a 2-worker\n"
    "server: the dense step's speed-up from 1 to 2 workers (target >= 1.7 at 1M tokens).\n"
    "One session exists at a time. Memory (f32): tokens x 8 KiB on the engine or the server\n"
    "(8 GiB at 1M); the client holds one chunk of tokens at a time.\n"
    "\n";

static const char usage_attend_tail[] =
    "\n"
    "Roofline (embedded engine): the fasa and dense steps split into phases (scan = phase 1\n"
    "on the shards, select = the candidate merge, gather and attend = phase 2, merge = the\n"
    "partial merge, other = the rest of the step), each in ms (mean of R steps) and GB/s,\n"
    "against ceilings measured in the same run: the streaming read bandwidth on 1 .. T\n"
    "threads and the compute ceiling of each phase's inner loop from micro-probes of\n"
    "conversions/s (the dtype to f32) and FMA/s (bench/roofline.h); a phase's fraction is of\n"
    "the lower of the two (targets: scan >= 0.85, dense >= 0.80, fasa step <= 1.3x its\n"
    "bytes at the read bandwidth, at 1M tokens f16).\n";

/* One token count: decimal, with an optional K (x 1024) or M (x 1048576) suffix. */
static int s_parse_tokens(const char *text, long *out_p)
{
    return cli_parse_size(text, BENCH_MIN_TOKENS, BENCH_MAX_TOKENS, out_p) ? -1 : 0;
}

/* Parses the options of `bench CMD` (argv[0] is CMD). 0, -1 for --help (printed), or the
 * exit status of an error (printed). */
static int s_parse(const char *cmd, int argc, char **argv, bench_opts *o)
{
    const int scan = strcmp(cmd, "bench scan") == 0;
    memset(o, 0, sizeof(*o));
    o->sizes[0] = 131072;
    o->n_sizes = 1;
    o->reps = scan ? 7 : 5;
    o->shards = 1;
    o->budget = 256;
    o->seed = 1;
    o->chunk = 2048;
    for (int m = 0; m < BENCH_N_METHODS; m++) o->timed[m] = 1;
    const cli_opt scan_opts[] = {
        {"tokens", CLI_T_VALUE, 't', 0, 0, 0, 0, 0, "N", NULL,
         "tokens (default 131072; 1024 .. 16777216; suffixes K = 1024, M = 1048576,\n"
         "e.g. 128K, 1M). Keep N x 1 KiB (the bytes scanned) well above the last-level\n"
         "cache, or the reference is not a memory bandwidth"},
        {"reps", CLI_T_INT, 'r', 0, 0, &o->reps, 1, 1000, "R", NULL,
         "timed runs per figure (default 7)"},
        {"seed", CLI_T_INT, 's', 0, 0, &o->seed, 0, 0x7fffffffL, "S", NULL,
         "generator seed (default 1)"},
        {"dtype", CLI_T_VALUE, 'd', 0, 0, 0, 0, 0, "T", NULL,
         "storage dtype of keys and values: f32 (default), f16 or bf16"},
        {"score-dtype", CLI_T_VALUE, 'Z', 0, 0, 0, 0, 0, "T", NULL,
         "the scoring store: f32, f16, bf16 or int8 (one scale per row); default:\n"
         "the key store's own dominant dims (the --dtype)"},
        {"csv", CLI_T_STR, 'c', 0, &o->csv, 0, 0, 0, "FILE", NULL,
         "also write the figures as CSV: figure,tokens,bytes,reps,p50_ms,min_ms,gb_s\n"
         "(figures read_simd, read_sasum, read (the faster), scan)"},
        /* attend's: --tier and --state-dir are taken and unused, the others refused. */
        {"methods", CLI_T_VALUE, 'm', 0, 0, 0, 0, 0, "LIST", NULL, NULL},
        {"tier", CLI_T_VALUE, 'T', 0, 0, 0, 0, 0, "T", NULL, NULL},
        {"state-dir", CLI_T_STR, 'D', 0, &o->state_dir, 0, 0, 0, "DIR", NULL, NULL},
        {"shards", CLI_T_INT, 'S', 0, 0, &o->shards, 1, 64, "K", NULL, NULL},
        {"server", CLI_T_VALUE, 'E', 0, 0, 0, 0, 0, "E[,E...]", NULL, NULL},
        {"chunk", CLI_T_INT, 'C', 0, 0, &o->chunk, 1, 65536, "N", NULL, NULL},
        {"budget", CLI_T_INT, 'b', 0, 0, &o->budget, 1, 65536, "B", NULL, NULL},
        {"png", CLI_T_STR, 'p', 0, &o->png, 0, 0, 0, "FILE", NULL, NULL},
        {"threads", CLI_T_INT, 'N', 0, 0, &o->threads, 1, FASA_POOL_MAX, "T", NULL, NULL},
        {"json", CLI_T_STR, 'J', 0, &o->json, 0, 0, 0, "FILE", NULL, NULL},
        CLI_END};
    const cli_opt attend_opts[] = {
        {"tokens", CLI_T_VALUE, 't', 0, 0, 0, 0, 0, "N[,N...]", NULL,
         "context lengths (default 131072); suffixes K and M, e.g. the sweep\n"
         "--tokens 128K,512K,1M (1024 .. 16777216 each, at most 16)"},
        {"methods", CLI_T_VALUE, 'm', 0, 0, 0, 0, 0, "LIST", NULL,
         "timed methods, comma-separated, of dense, fasa, oracle (default all)"},
        {"reps", CLI_T_INT, 'r', 0, 0, &o->reps, 1, 1000, "R", NULL,
         "timed steps per method (default 5); p50 and min are printed"},
        {"dtype", CLI_T_VALUE, 'd', 0, 0, 0, 0, 0, "T", NULL,
         "storage dtype of keys and values: f32 (default), f16, bf16 (the\n"
         "engine refuses what it does not support yet, and so does this)"},
        {"score-dtype", CLI_T_VALUE, 'Z', 0, 0, 0, 0, 0, "T", NULL,
         "the FASA scan's scoring store: f32, f16, bf16 or int8 (default:\n"
         "the --dtype's own key dims)"},
        {"tier", CLI_T_VALUE, 'T', 0, 0, 0, 0, 0, "T", NULL,
         "where keys and values live: ram (default) or disk (the dominant key\n"
         "dims in RAM, the rest of K and V in file-backed mappings under\n"
         "--state-dir, or with --server under the server's --tier-dir); RAM\n"
         "per token is then the bytes the shards allocate in RAM"},
        {"state-dir", CLI_T_STR, 'D', 0, &o->state_dir, 0, 0, 0, "DIR", NULL,
         "directory for the disk tier's files (default: a new one in /tmp,\n"
         "removed at exit; the files are unlinked at once anyway)"},
        {"shards", CLI_T_INT, 'S', 0, 0, &o->shards, 1, 64, "K", NULL,
         "in-process shards of the embedded engine (default 1)"},
        {"server", CLI_T_VALUE, 'E', 0, 0, 0, 0, 0, "E[,E...]", NULL,
         "run on fasa-servers at these endpoints instead, one after another\n"
         "(step times are round trips); bench/attend_bench.sh starts a\n"
         "1-worker and a 2-worker server and runs this with both"},
        {"chunk", CLI_T_INT, 'C', 0, 0, &o->chunk, 1, 65536, "N", NULL,
         "tokens per append request (default 2048: 16 MiB of f32 keys and\n"
         "values; keep N x 8 KiB under a server's --max-message, which\n"
         "otherwise refuses the append: RESOURCE_EXHAUSTED)"},
        {"budget", CLI_T_INT, 'b', 0, 0, &o->budget, 1, 65536, "B", NULL,
         "tokens kept per query head (default 256)"},
        {"seed", CLI_T_INT, 's', 0, 0, &o->seed, 0, 0x7fffffffL, "S", NULL,
         "generator seed (default 1)"},
        {"csv", CLI_T_STR, 'c', 0, &o->csv, 0, 0, 0, "FILE", NULL,
         "also write every row as CSV: tokens,backend,workers,dtype,tier,method,\n"
         "reps,p50_ms,min_ms,bytes_read,gb_s,kv_bytes_per_token,max_err\n"
         "(max_err: dense against the naive reference, the others against dense)"},
        {"png", CLI_T_STR, 'p', 0, &o->png, 0, 0, 0, "FILE", NULL,
         "plot p50 step time against context length per method (log-log)\n"
         "with gnuplot (deploy/install-deps.sh installs gnuplot-nox); an\n"
         "error, before anything runs, when gnuplot is missing"},
        {"threads", CLI_T_INT, 'N', 0, 0, &o->threads, 1, FASA_POOL_MAX, "T", NULL,
         "threads of the embedded engine's steps (default FASA_THREADS, else\n"
         "SLURM_CPUS_PER_TASK, else the CPUs this process may use)"},
        {"json", CLI_T_STR, 'J', 0, &o->json, 0, 0, 0, "FILE", NULL,
         "also write every figure as JSON under stable names: cpu, simd,\n"
         "threads, dtype, read_gbs (T threads), read_gbs_by_threads, cvt_per_s,\n"
         "fma_per_s, and per context length (\"runs\"; the last also at the top)\n"
         "tokens, fasa_ms, fasa_bytes, dense_ms, "
         "dense_bytes, oracle_ms,\n"
         "phases_ms {scan, select, gather, attend, "
         "merge, other},\n"
         "scan_roofline, dense_roofline, "
         "fasa_over_read"},
        CLI_END};
    cli_parser p;
    cli_begin(&p, cmd, scan ? usage_scan : usage_attend, scan ? scan_opts : attend_opts, argc,
              argv);
    if (!scan) p.tail = usage_attend_tail;
    int c;
    while ((c = cli_next(&p)) > 0) {
        const char *arg = p.arg;
        /* scan takes only --tokens (one size), --reps, --seed, --dtype, --score-dtype, --csv. */
        if (scan && (c == 'p' || c == 'm' || c == 'S' || c == 'E' || c == 'b' || c == 'C' ||
                     c == 'J' || c == 'N'))
            return cli_usage_error(cmd, "option '--%s' is for 'fasa bench attend'", p.opt->name);
        char buf[512], *parts[BENCH_MAX_SIZES];
        int n;
        switch (c) {
        case 't':
            n = cli_split(arg, buf, sizeof(buf), parts, scan ? 1 : BENCH_MAX_SIZES);
            for (int i = 0; i < n; i++)
                if (s_parse_tokens(parts[i], &o->sizes[i])) n = -1;
            if (n < 1)
                return cli_usage_error(cmd,
                                       scan ? "--tokens '%s' must be one count in [1024, "
                                              "16777216] (suffix K or M allowed)"
                                            : "--tokens '%s' must be up to 16 comma-separated "
                                              "counts in [1024, 16777216] (suffix K or M allowed)",
                                       arg);
            o->n_sizes = n;
            break;
        case 'm':
            memset(o->timed, 0, sizeof(o->timed));
            n = cli_split(arg, buf, sizeof(buf), parts, BENCH_MAX_SIZES);
            for (int i = 0; i < n; i++) {
                int found = 0;
                for (int m = 0; m < BENCH_N_METHODS; m++)
                    if (strcmp(parts[i], bench_method_names[m]) == 0) o->timed[m] = found = 1;
                if (!found) n = -1;
            }
            if (n < 1)
                return cli_usage_error(
                    cmd, "--methods '%s' must be a comma-separated list of dense, fasa, oracle",
                    arg);
            break;
        case 'd':
            if (fasa_dtype_parse(arg, &o->dtype))
                return cli_usage_error(cmd, "--dtype '%s' must be f32, f16 or bf16", arg);
            break;
        case 'Z':
            if (scan_dtype_parse(arg, &o->score_dtype))
                return cli_usage_error(cmd, "--score-dtype '%s' must be f32, f16, bf16 or int8",
                                       arg);
            break;
        case 'T':
            if (strcmp(arg, "ram") && strcmp(arg, "disk"))
                return cli_usage_error(cmd, "--tier '%s' must be ram or disk", arg);
            o->tier = arg[0] == 'd';
            break;
        case 'E':
            o->n_servers =
                cli_split(arg, o->server_buf, sizeof(o->server_buf), o->servers, BENCH_MAX_SERVERS);
            if (o->n_servers < 1)
                return cli_usage_error(
                    cmd, "--server '%s' must be 1 to 8 comma-separated endpoints", arg);
            break;
        }
    }
    if (c < 0) return cli_status(c);
    if (!scan && o->n_servers > 0 && o->state_dir)
        return cli_usage_error(cmd, "--state-dir is for the embedded engine: with --server the "
                                    "disk tier's files go to the server's --tier-dir");
    if (!scan && o->state_dir && !o->tier)
        return cli_usage_error(cmd, "--state-dir is for --tier disk");
    return 0;
}

int cmd_bench(int argc, char **argv)
{
    if (argc < 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) {
        fputs(usage_bench, argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    if (strcmp(argv[1], "ingest") == 0) return s_ingest(argc - 1, argv + 1);
    if (strcmp(argv[1], "latency") == 0) {
        openblas_set_num_threads(1);
        const int rc = cmd_bench_latency(argc - 1, argv + 1);
        return rc < 0 ? 0 : rc; /* -1: help printed */
    }
    const int scan = strcmp(argv[1], "scan") == 0;
    if (!scan && strcmp(argv[1], "attend") != 0)
        return cli_usage_error("bench", "unknown benchmark '%s' (scan, attend, latency or ingest)",
                               argv[1]);
    bench_opts o;
    const int prc = s_parse(scan ? "bench scan" : "bench attend", argc - 1, argv + 1, &o);
    if (prc) return prc < 0 ? 0 : prc;
    openblas_set_num_threads(1);
    if (scan) return bench_scan(&o);
    if (o.tier && !o.state_dir && o.n_servers == 0) {
        /* The disk tier's files are unlinked as soon as they are made: the directory stays
         * empty and goes at exit. */
        snprintf(o.tmp_dir, sizeof(o.tmp_dir), "/tmp/fasa-bench-XXXXXX");
        if (!mkdtemp(o.tmp_dir)) return cli_fail("bench attend", "cannot make a directory in /tmp");
        o.state_dir = o.tmp_dir;
    }
    if (o.threads) backend_set_threads((int)o.threads);
    const int rc = bench_attend(&o);
    if (*o.tmp_dir) rmdir(o.tmp_dir);
    return rc;
}

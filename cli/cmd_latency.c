/* fasa bench latency: the option-parsing front; the benchmark is bench/latency.c. */
#include <stdio.h>
#include <string.h>

#include "cli.h"
#include "latency.h"
#include "opts.h"

static const char usage_latency[] =
    "usage: fasa bench latency [--server E[,E...]]... [--tokens N[,N...]] [options]\n"
    "\n"
    "The service's round trip per Attend in a decode loop (issue 20): L layers x T tokens,\n"
    "every Attend carrying the token's k_new and v_new, on an embedded engine (as many\n"
    "shards and threads as the server has workers) and on each server, one call after the\n"
    "other on the same inputs. Prints p50/p90/p99 per Attend, the overhead (server pX minus\n"
    "embedded pX, measured in the same run), where it goes, the largest output difference,\n"
    "the machine's CPU features, and the targets at 4096 tokens: overhead p50 <= 150 us and\n"
    "p99 <= 400 us with a 1-worker server, p50 <= 200 us with a 2-worker one. 32 query\n"
    "heads, 8 KV heads, head_dim 128, synthetic data with its true profile; no layer is kept\n"
    "dense. bench/latency_run.sh starts the servers and prints every figure.\n"
    "\n";

int cmd_bench_latency(int argc, char **argv)
{
    const char *cmd = "bench latency";
    bench_latency_opts o;
    bench_latency_defaults(&o);
    long layers = o.layers, steps = o.steps, budget = o.budget;
    const cli_opt opts[] = {
        CLI_KEY("server", 'E', "E[,E...]", NULL,
                "a fasa-server endpoint (tcp://HOST:PORT or ipc://PATH); repeat or\n"
                "comma-separate for several, up to 8"),
        CLI_KEY("tokens", 't', "N[,N...]", "1024,4096,16384",
                "context lengths (prefilled tokens), 1024 .. 1048576 each, K and M\n"
                "suffixes, up to 8"),
        CLI_INT("layers", &layers, 1, 64, "L", "2", "layers per session"),
        CLI_INT("steps", &steps, 1, 100000, "T", "64", "decode tokens per context"),
        CLI_INT("budget", &budget, 1, 65536, "B", "256", "fasa's budget, tokens per query head"),
        CLI_KEY("methods", 'm', "LIST", "fasa,dense", "fasa, dense or both"),
        CLI_STR("json", &o.json, "FILE", NULL,
                "also write the figures: attend_us_p50, overhead_us_p50,\n"
                "overhead_us_p99 (of the first row at 4096 tokens) and every row"),
        CLI_END};
    static char server_buf[BENCH_LATENCY_MAX][1024];
    int first_tokens = 1;
    cli_parser p;
    cli_begin(&p, cmd, usage_latency, opts, argc, argv);
    int c;
    while ((c = cli_next(&p)) > 0) {
        char buf[512], *parts[BENCH_LATENCY_MAX];
        int n;
        switch (c) {
        case 'E':
            if (o.n_servers == BENCH_LATENCY_MAX)
                return cli_usage_error(cmd, "--server: at most %d endpoints", BENCH_LATENCY_MAX);
            n = cli_split(p.arg, server_buf[o.n_servers], sizeof(server_buf[0]), parts,
                          BENCH_LATENCY_MAX - o.n_servers);
            if (n < 1)
                return cli_usage_error(cmd, "--server '%s': at most %d endpoints in all", p.arg,
                                       BENCH_LATENCY_MAX);
            for (int i = 0; i < n; i++) o.servers[o.n_servers++] = parts[i];
            break;
        case 't':
            if (first_tokens) o.n_tokens = 0, first_tokens = 0;
            n = cli_split(p.arg, buf, sizeof(buf), parts, BENCH_LATENCY_MAX - o.n_tokens);
            for (int i = 0; i < n; i++)
                if (cli_parse_size(parts[i], 1024, 1048576, &o.tokens[o.n_tokens + i])) n = -1;
            if (n < 1)
                return cli_usage_error(cmd,
                                       "--tokens '%s': up to %d lengths in [1024, 1048576] (K, M "
                                       "suffixes allowed)",
                                       p.arg, BENCH_LATENCY_MAX);
            o.n_tokens += n;
            break;
        case 'm':
            if (!strcmp(p.arg, "fasa"))
                o.methods = 1;
            else if (!strcmp(p.arg, "dense"))
                o.methods = 2;
            else if (!strcmp(p.arg, "fasa,dense") || !strcmp(p.arg, "dense,fasa"))
                o.methods = 3;
            else
                return cli_usage_error(cmd, "--methods '%s' must be fasa, dense or fasa,dense",
                                       p.arg);
            break;
        }
    }
    if (c < 0) return cli_status(c);
    o.layers = (int)layers;
    o.steps = (int)steps;
    o.budget = (int)budget;
    return bench_latency_run(&o);
}

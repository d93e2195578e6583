/* fasa bench latency: the option parsing; the benchmark is bench/latency.c. */
#include <getopt.h>
#include <stdio.h>
#include <string.h>

#include "cli.h"
#include "latency.h"

static const char usage_latency[] =
    "usage: fasa bench latency [--server ENDPOINT]... [--tokens N[,N...]] [--layers L]\n"
    "                          [--steps T] [--budget B] [--methods fasa,dense] [--json FILE]\n"
    "\n"
    "The service's round trip per Attend in a decode loop (issue 20): L layers x T tokens,\n"
    "every Attend carrying the token's k_new and v_new, on an embedded engine and on each\n"
    "server, one call after the other on the same inputs. Prints p50/p90/p99 per Attend, the\n"
    "overhead (server minus embedded, at each percentile, measured in the same run), where\n"
    "it goes, the largest output difference, the machine's CPU features, and the targets at\n"
    "4096 tokens: overhead p50 <= 150 us and p99 <= 400 us with a 1-worker server, p50 <= 200\n"
    "us with a 2-worker one. 32 query heads, 8 KV heads, head_dim 128, synthetic data with\n"
    "its true profile; no layer is kept dense. bench/latency_run.sh starts the servers.\n"
    "\n"
    "  --server E     a fasa-server endpoint (repeat for several, up to 8)\n"
    "  --tokens LIST  context lengths, comma-separated (1024,4096,16384; 1024 .. 1048576)\n"
    "  --layers L     layers per session (2; 1 .. 64)\n"
    "  --steps T      decode tokens per context (64; 1 .. 100000)\n"
    "  --budget B     fasa's budget (256)\n"
    "  --methods M    fasa, dense or fasa,dense (both)\n"
    "  --json FILE    also write the figures: attend_us_p50, overhead_us_p50,\n"
    "                 overhead_us_p99 (of the first row at 4096 tokens), and every row\n";

int cmd_bench_latency(int argc, char **argv)
{
    static const struct option opts[] = {{"server", required_argument, 0, 'E'},
                                         {"tokens", required_argument, 0, 't'},
                                         {"layers", required_argument, 0, 'L'},
                                         {"steps", required_argument, 0, 'T'},
                                         {"budget", required_argument, 0, 'b'},
                                         {"methods", required_argument, 0, 'm'},
                                         {"json", required_argument, 0, 'J'},
                                         {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};
    const char *cmd = "bench latency";
    bench_latency_opts o;
    bench_latency_defaults(&o);
    int first_tokens = 1, ch;
    long v;
    optind = 1;
    while ((ch = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (ch) {
        case 'E':
            if (o.n_servers == BENCH_LATENCY_MAX)
                return cli_usage_error(cmd, "--server: at most %d", BENCH_LATENCY_MAX);
            o.servers[o.n_servers++] = optarg;
            break;
        case 't': {
            if (first_tokens) o.n_tokens = 0, first_tokens = 0;
            char buf[256];
            snprintf(buf, sizeof(buf), "%s", optarg);
            for (char *save = NULL, *p = strtok_r(buf, ",", &save); p;
                 p = strtok_r(NULL, ",", &save)) {
                if (o.n_tokens == BENCH_LATENCY_MAX || cli_parse_int(p, 1024, 1048576, &v))
                    return cli_usage_error(cmd,
                                           "--tokens '%s': up to %d lengths in [1024, 1048576]",
                                           optarg, BENCH_LATENCY_MAX);
                o.tokens[o.n_tokens++] = v;
            }
            break;
        }
        case 'L':
            if (cli_parse_int(optarg, 1, 64, &v))
                return cli_usage_error(cmd, "--layers '%s': expected 1 .. 64", optarg);
            o.layers = (int)v;
            break;
        case 'T':
            if (cli_parse_int(optarg, 1, 100000, &v))
                return cli_usage_error(cmd, "--steps '%s': expected 1 .. 100000", optarg);
            o.steps = (int)v;
            break;
        case 'b':
            if (cli_parse_int(optarg, 1, 65536, &v))
                return cli_usage_error(cmd, "--budget '%s': expected 1 .. 65536", optarg);
            o.budget = (int)v;
            break;
        case 'm':
            if (!strcmp(optarg, "fasa"))
                o.methods = 1;
            else if (!strcmp(optarg, "dense"))
                o.methods = 2;
            else if (!strcmp(optarg, "fasa,dense") || !strcmp(optarg, "dense,fasa"))
                o.methods = 3;
            else
                return cli_usage_error(cmd, "--methods '%s': fasa, dense or fasa,dense", optarg);
            break;
        case 'J':
            o.json = optarg;
            break;
        case 'h':
            fputs(usage_latency, stdout);
            return 0;
        default:
            fputs(usage_latency, stderr);
            return 2;
        }
    }
    if (optind < argc) return cli_usage_error(cmd, "unexpected argument '%s'", argv[optind]);
    if (!o.n_tokens) return cli_usage_error(cmd, "--tokens: give at least one length");
    return bench_latency_run(&o);
}

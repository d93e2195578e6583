/* fasa: the command-line client. Without --server, demo, calibrate and replay run on the
 * embedded in-process engine (the same worker and coordinator code the server runs); with
 * --server ENDPOINT they run against a fasa-server. The remaining commands always talk to a
 * server. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backend.h"
#include "cli.h"
#include "pool.h"
#include "simd.h"

static const char usage[] =
    "usage: fasa COMMAND [OPTIONS]\n"
    "\n"
    "Frequency-Aware Sparse Attention over long KV caches (arXiv 2602.03152).\n"
    "\n"
    "commands:\n"
    "  demo       synthetic long-context decode: calibrate, then fasa vs dense (no files needed)\n"
    "  calibrate  choose each head's dominant frequency chunks from recorded q/k activations\n"
    "  replay     re-run recorded activations with fasa, dense, oracle or a baseline\n"
    "  ppl        perplexity of a llama2.c-format model over a text, attention by fasa\n"
    "  generate   text from a llama2.c-format model, attention by fasa\n"
    "  bench      benchmarks printed with their targets: bench scan, bench attend, bench ingest\n"
    "\n"
    "These run in-process, or on a fasa-server with --server ENDPOINT (same numbers).\n"
    "\n"
    "server commands (need --server ENDPOINT, or FASA_SERVER in the environment):\n"
    "  ping       check that a server answers: version, ranks, shards, round trip\n"
    "  stats      server statistics, and one session's with --session\n"
    "  create     create a session with its geometry (and profile, method, budget)\n"
    "  append     append keys and values from .npy files to a session\n"
    "  attend     one decode step of one layer: queries from .npy, outputs to .npy\n"
    "  drop       drop a session\n"
    "  shutdown   stop the server\n"
    "  snapshot   write a session (or --all) to the server's --state-dir\n"
    "\n"
    "  keygen     write a CURVE key pair (NAME.key, NAME.pub) for a server or a client\n"
    "\n"
    "A server started with --curve-secret (see README, Authentication) needs, with any\n"
    "command: --curve-server-key FILE (its public key) and --curve-secret FILE (this\n"
    "client's secret key), or FASA_CURVE_SERVER_KEY and FASA_CURVE_CLIENT_SECRET.\n"
    "\n"
    "FASA_TIMEOUT_MS: the wait for each server reply in milliseconds (default 120000, and\n"
    "5000 for the ping that first checks the server answers). FASA_DEADLINE_MS: a deadline\n"
    "sent with each request; one that waits longer in the server's queue is not run\n"
    "(UNAVAILABLE).\n"
    "FASA_THREADS: threads of the embedded engine's steps (default SLURM_CPUS_PER_TASK when\n"
    "set, else the CPUs this process may run on; the outputs do not depend on it).\n"
    "Run 'fasa COMMAND --help' for a command's options.\n";

int cli_fail(const char *cmd, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "fasa %s: ", cmd);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    return 1;
}

int cli_usage_error(const char *cmd, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "fasa %s: ", cmd);
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, " (see 'fasa %s --help')\n", cmd);
    va_end(ap);
    return 2;
}

int cli_check_writable(const char *path, char *err, size_t err_len)
{
    if (access(path, F_OK) == 0) {
        if (access(path, W_OK) == 0) return 0;
        snprintf(err, err_len, "%s: cannot write it: %s", path, strerror(errno));
        return -1;
    }
    char dir[4096];
    snprintf(dir, sizeof(dir), "%s", path);
    char *slash = strrchr(dir, '/');
    if (!slash)
        snprintf(dir, sizeof(dir), ".");
    else if (slash == dir)
        dir[1] = 0;
    else
        *slash = 0;
    if (access(dir, W_OK) == 0) return 0;
    snprintf(err, err_len, "%s: cannot write it: directory %s: %s", path, dir, strerror(errno));
    return -1;
}

int cli_check_env(void)
{
    static const char *const ms[] = {"FASA_TIMEOUT_MS", "FASA_DEADLINE_MS"};
    for (int i = 0; i < 2; i++) {
        const char *v = getenv(ms[i]);
        long x;
        if (v && *v && cli_parse_int(v, i == 0 ? 1 : 0, 0x7fffffffL, &x)) {
            fprintf(stderr, "fasa: %s='%s' must be a whole number of milliseconds in [%d, %ld]\n",
                    ms[i], v, i == 0 ? 1 : 0, 0x7fffffffL);
            return 2;
        }
    }
    const char *simd = getenv("FASA_SIMD");
    if (simd && *simd) {
        int known = 0;
        for (int p = 0; p <= SIMD_PATH_LAST; p++) known |= !strcmp(simd, simd_path_name(p));
        if (!known) {
            fprintf(stderr, "fasa: FASA_SIMD='%s' is not portable, avx2 or avx512\n", simd);
            return 2;
        }
    }
    return 0;
}

/* FASA_SERVER for the commands that run in-process without --server: it is their --server
 * (README: every command takes --server ENDPOINT or FASA_SERVER). A new argv, or argv. */
static char **s_server_from_env(int *argc_p, char **argv)
{
    static const char *const cmds[] = {"demo", "calibrate", "replay", "ppl", "generate", "bench"};
    const char *env = getenv("FASA_SERVER");
    if (!env || !*env || *argc_p < 2) return argv;
    int takes = 0;
    for (size_t i = 0; i < sizeof(cmds) / sizeof(*cmds); i++) takes |= !strcmp(argv[1], cmds[i]);
    /* bench: only bench attend runs on a server. */
    if (!takes || (!strcmp(argv[1], "bench") &&
                   (*argc_p < 3 || (strcmp(argv[2], "attend") && strcmp(argv[2], "ingest")))))
        return argv;
    for (int i = 2; i < *argc_p; i++)
        if (!strcmp(argv[i], "--server") || !strncmp(argv[i], "--server=", 9) ||
            !strcmp(argv[i], "--help") || !strcmp(argv[i], "-h"))
            return argv;
    static char *grown[512];
    if (*argc_p + 3 > (int)(sizeof(grown) / sizeof(*grown))) return argv;
    for (int i = 0; i < *argc_p; i++) grown[i] = argv[i];
    grown[(*argc_p)++] = "--server";
    grown[(*argc_p)++] = (char *)env;
    grown[*argc_p] = NULL;
    return grown;
}

int cli_parse_int(const char *text, long lo, long hi, long *out_p)
{
    if (!text || !*text) return -1;
    char *end;
    errno = 0;
    const long v = strtol(text, &end, 10);
    if (errno || *end || v < lo || v > hi) return -1;
    *out_p = v;
    return 0;
}

/* Parses "none" or a comma-separated list of layers into flags; -1 on a bad entry. */
int cli_parse_dense_layers(const char *text, int n_layers, uint8_t *flags)
{
    memset(flags, 0, (size_t)n_layers);
    if (!text) {
        flags[0] = 1;
        return 0;
    }
    if (strcmp(text, "none") == 0) return 0;
    char buf[1024];
    snprintf(buf, sizeof(buf), "%s", text);
    for (char *save = NULL, *tok = strtok_r(buf, ",", &save); tok;
         tok = strtok_r(NULL, ",", &save)) {
        long l;
        if (cli_parse_int(tok, 0, n_layers - 1, &l)) return -1;
        flags[l] = 1;
    }
    return 0;
}

int cli_parse_range(const char *text, long *a_p, long *b_p, long *s_p)
{
    char *end;
    errno = 0;
    const long a = strtol(text, &end, 10);
    if (end == text || *end != ':') return -1;
    const char *t = end + 1;
    const long b = strtol(t, &end, 10);
    if (end == t) return -1;
    long s = 1;
    if (*end == ':') {
        t = end + 1;
        s = strtol(t, &end, 10);
        if (end == t) return -1;
    }
    if (*end || errno || a < 0 || b <= a || s < 1) return -1;
    *a_p = a;
    *b_p = b;
    *s_p = s;
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 ||
        strcmp(argv[1], "help") == 0) {
        fputs(usage, argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    if (strcmp(argv[1], "--version") == 0) {
        puts("fasa 0.1.0");
        return 0;
    }
    int rc = cli_check_env();
    if (rc) return rc;
    /* Settings read once at start-up: the embedded engine's threads. */
    char why[128];
    const int n_threads = fasa_threads_from_env(why, sizeof(why));
    if (n_threads < 1) {
        fprintf(stderr, "fasa: %s\n", why);
        return 2;
    }
    backend_set_threads(n_threads);
    argv = s_server_from_env(&argc, argv);
    if (strcmp(argv[1], "bench") == 0) return backend_exit_status(cmd_bench(argc - 1, argv + 1));
    static const struct {
        const char *name;
        int (*fn)(int, char **);
    } cmds[] = {
        {"demo", cmd_demo},         {"calibrate", cmd_calibrate}, {"replay", cmd_replay},
        {"ppl", cmd_ppl},           {"generate", cmd_generate},   {"ping", cmd_ping},
        {"stats", cmd_stats},       {"create", cmd_create},       {"append", cmd_append},
        {"attend", cmd_attend},     {"drop", cmd_drop},           {"shutdown", cmd_shutdown},
        {"snapshot", cmd_snapshot}, {"keygen", cmd_keygen},       {"sessions", cmd_sessions},
        {"profile", cmd_profile}};
    rc = backend_take_curve_args(&argc, argv); /* CURVE flags, for every command */
    if (rc) return rc;
    if (argc < 2) {
        fputs(usage, stderr);
        return 2;
    }
    for (size_t i = 0; i < sizeof(cmds) / sizeof(*cmds); i++)
        if (strcmp(argv[1], cmds[i].name) == 0)
            return backend_exit_status(cmds[i].fn(argc - 1, argv + 1));
    fprintf(stderr, "fasa: unknown command '%s' (see 'fasa --help')\n", argv[1]);
    return 2;
}

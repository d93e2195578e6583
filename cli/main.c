/* fasa: the command-line client. Without --server, demo, calibrate and replay run on the
 * embedded in-process engine (the same worker and coordinator code the server runs); with
 * --server ENDPOINT they run against a fasa-server. The remaining commands always talk to a
 * server. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "cli.h"
#include "opts.h"
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
    "  load       fill a session from files the server's workers read themselves (bulk load)\n"
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

/* Global options given before the command (--server E, --server=E; the CURVE keys are taken
 * out of argv wherever they are, backend_take_curve_args) move after it, where every
 * command's own parser reads them: `fasa --server E ping` is `fasa ping --server E`. 0, or
 * 2 after printing one line. */
static int s_move_global_options(int argc, char **argv)
{
    int n_global = 1; /* argv[1 .. n_global) are global options and their values */
    while (n_global < argc && argv[n_global][0] == '-') {
        const char *a = argv[n_global];
        if (!strcmp(a, "--server") && n_global + 1 < argc)
            n_global += 2;
        else if (!strncmp(a, "--server=", 9))
            n_global += 1;
        else if (!strcmp(a, "--server")) {
            fprintf(stderr, "fasa: option '--server' needs a value (ENDPOINT)\n");
            return 2;
        } else {
            fprintf(stderr, "fasa: unknown option '%s' before the command (see 'fasa --help')\n",
                    a);
            return 2;
        }
    }
    if (n_global == 1) return 0;
    if (n_global >= argc) {
        fprintf(stderr, "fasa: no command after the options (see 'fasa --help')\n");
        return 2;
    }
    /* Rotate: the command and its arguments first, then the global options. */
    char *moved[8];
    const int k = n_global - 1;
    if (k > (int)(sizeof(moved) / sizeof(*moved))) {
        fprintf(stderr, "fasa: too many options before the command\n");
        return 2;
    }
    memcpy(moved, argv + 1, (size_t)k * sizeof(*argv));
    memmove(argv + 1, argv + n_global, (size_t)(argc - n_global) * sizeof(*argv));
    memcpy(argv + argc - k, moved, (size_t)k * sizeof(*argv));
    return 0;
}

typedef struct cli_command {
    const char *name;
    int (*fn)(int, char **);
} cli_command;

static const cli_command s_commands[] = {
    {"demo", cmd_demo},         {"calibrate", cmd_calibrate}, {"replay", cmd_replay},
    {"ppl", cmd_ppl},           {"generate", cmd_generate},   {"bench", cmd_bench},
    {"ping", cmd_ping},         {"stats", cmd_stats},         {"create", cmd_create},
    {"append", cmd_append},     {"attend", cmd_attend},       {"drop", cmd_drop},
    {"shutdown", cmd_shutdown}, {"snapshot", cmd_snapshot},   {"keygen", cmd_keygen},
    {"sessions", cmd_sessions}, {"profile", cmd_profile},     {"load", cmd_load}};
#define N_COMMANDS (sizeof(s_commands) / sizeof(*s_commands))

/* Runs argv[1]'s command, or says which one was probably meant. */
static int s_dispatch(int argc, char **argv)
{
    for (size_t i = 0; i < N_COMMANDS; i++)
        if (strcmp(argv[1], s_commands[i].name) == 0)
            return backend_exit_status(s_commands[i].fn(argc - 1, argv + 1));
    const char *names[N_COMMANDS];
    for (size_t i = 0; i < N_COMMANDS; i++) names[i] = s_commands[i].name;
    const char *near = cli_did_you_mean(argv[1], names, (int)N_COMMANDS);
    if (near)
        fprintf(stderr, "fasa: unknown command '%s' (did you mean '%s'? see 'fasa --help')\n",
                argv[1], near);
    else
        fprintf(stderr, "fasa: unknown command '%s' (see 'fasa --help')\n", argv[1]);
    return 2;
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
    rc = backend_take_curve_args(&argc, argv); /* CURVE flags, for every command */
    if (rc) return rc;
    if (argc < 2) {
        fputs(usage, stderr);
        return 2;
    }
    rc = s_move_global_options(argc, argv);
    if (rc) return rc;
    argv = s_server_from_env(&argc, argv);
    return s_dispatch(argc, argv);
}

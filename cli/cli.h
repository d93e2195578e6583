/* Shared pieces of the `fasa` command-line tool. Each command is a function taking its
 * own argv (argv[0] is the command name) and returning the process exit status. */
#ifndef FASA_CLIENT_CLI_H
#define FASA_CLIENT_CLI_H

#include <stddef.h>
#include <stdint.h>

int cmd_calibrate(int argc, char **argv);
int cmd_replay(int argc, char **argv);
int cmd_demo(int argc, char **argv);
/* fasa bench scan|attend (cli/cmd_bench.c). */
int cmd_bench(int argc, char **argv);
/* fasa bench latency (cli/cmd_latency.c, bench/latency.c). */
int cmd_bench_latency(int argc, char **argv);
/* A llama2.c-format model with fasa attention (cli/cmd_model.c). */
int cmd_ppl(int argc, char **argv);
int cmd_generate(int argc, char **argv);
/* Commands that need a server (cli/cmd_server.c). */
int cmd_ping(int argc, char **argv);
int cmd_stats(int argc, char **argv);
int cmd_create(int argc, char **argv);
int cmd_append(int argc, char **argv);
int cmd_attend(int argc, char **argv);
int cmd_drop(int argc, char **argv);
int cmd_shutdown(int argc, char **argv);
int cmd_snapshot(int argc, char **argv);
/* What a server holds, and deleting a stored profile (cli/cmd_admin.c). */
int cmd_sessions(int argc, char **argv);
int cmd_profile(int argc, char **argv);
/* Bulk load from files the server's workers read (cli/cmd_load.c). */
int cmd_load(int argc, char **argv);
/* A CURVE key pair for the server and its clients (cli/cmd_keygen.c). */
int cmd_keygen(int argc, char **argv);

/* Prints "fasa CMD: message" to stderr (one line) and returns 2 (usage) or 1 (failure). */
int cli_fail(const char *cmd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
int cli_usage_error(const char *cmd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* 0 when path can be written (it exists and is writable, or its directory is), so that a
 * command finds a bad --out before computing; -1 with "--out PATH: why" style text in err. */
int cli_check_writable(const char *path, char *err, size_t err_len);
/* The environment settings every command reads, checked once at start: FASA_TIMEOUT_MS and
 * FASA_DEADLINE_MS (milliseconds), FASA_SIMD (portable, avx2 or avx512). 0, or 2 after
 * printing one line naming the variable. */
int cli_check_env(void);

/* Parses a decimal integer in [lo, hi] from text; 0 on success, -1 otherwise. */
int cli_parse_int(const char *text, long lo, long hi, long *out_p);
/* Parses "none" or a comma-separated list of layers below n_layers into flags[n_layers];
 * NULL means layer 0 only (the default). 0, or -1 on a bad entry. */
int cli_parse_dense_layers(const char *text, int n_layers, uint8_t *flags);
/* Splits text (copied into buf, buf_len bytes) at commas into at most max parts, each
 * pointing into buf; the count, or -1 when text does not fit buf or has more parts. */
int cli_split(const char *text, char *buf, size_t buf_len, char **parts, int max);
/* Parses "A:B" or "A:B:S" (S defaults to 1); 0 on success, -1 otherwise. */
int cli_parse_range(const char *text, long *a_p, long *b_p, long *s_p);

#endif

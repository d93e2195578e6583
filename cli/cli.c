/* The CLI's shared helpers (cli.h): one-line errors, the environment check, integers,
 * layer lists and ranges. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli.h"
#include "env.h"

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
    /* The environment, read once (FASA_SIMD sets the kernels' path). */
    char why[200];
    if (fasa_env_init(why, sizeof(why))) {
        fprintf(stderr, "fasa: %s\n", why);
        return 2;
    }
    return 0;
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

int cli_split(const char *text, char *buf, size_t buf_len, char **parts, int max)
{
    if (strlen(text) >= buf_len) return -1;
    strcpy(buf, text);
    int n = 0;
    for (char *save = NULL, *tok = strtok_r(buf, ",", &save); tok;
         tok = strtok_r(NULL, ",", &save)) {
        if (n == max) return -1;
        parts[n++] = tok;
    }
    return n;
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

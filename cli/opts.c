/* The CLI's option parser (opts.h). */
#include "opts.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"

void cli_begin(cli_parser *p, const char *cmd, const char *head, const cli_opt *opts, int argc,
               char **argv)
{
    memset(p, 0, sizeof(*p));
    p->cmd = cmd;
    p->head = head;
    p->opts = opts;
    p->argc = argc;
    p->argv = argv;
    p->i = 1;
}

int cli_status(int rc)
{
    return rc == CLI_HELP ? -1 : rc == CLI_ERROR ? 2 : rc;
}

int cli_parse_size(const char *text, long lo, long hi, long *out_p)
{
    if (!text || !*text) return -1;
    char *end;
    errno = 0;
    const long v = strtol(text, &end, 10);
    if (end == text || errno == ERANGE) return end == text ? -1 : -2;
    long mul = 1;
    if (*end == 'K' || *end == 'k') mul = 1L << 10;
    if (*end == 'M' || *end == 'm') mul = 1L << 20;
    if (*end == 'G' || *end == 'g') mul = 1L << 30;
    if (mul > 1) end++;
    if (*end) return -1;
    if (v > hi / mul || v < lo / mul) return -2;
    const long x = v * mul;
    if (x < lo || x > hi) return -2;
    *out_p = x;
    return 0;
}

static int s_min3(int a, int b, int c)
{
    return a < b ? (a < c ? a : c) : (b < c ? b : c);
}

/* The edit distance of a and b counting a swap of neighbours as one edit (optimal string
 * alignment); each at most 63 characters, longer: a large number. */
static int s_distance(const char *a, const char *b)
{
    const int n = (int)strlen(a), m = (int)strlen(b);
    if (n > 63 || m > 63) return 1000;
    static _Thread_local int d[64][64];
    for (int i = 0; i <= n; i++) d[i][0] = i;
    for (int j = 0; j <= m; j++) d[0][j] = j;
    for (int i = 1; i <= n; i++)
        for (int j = 1; j <= m; j++) {
            d[i][j] =
                s_min3(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]));
            if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] &&
                d[i - 2][j - 2] + 1 < d[i][j])
                d[i][j] = d[i - 2][j - 2] + 1;
        }
    return d[n][m];
}

const char *cli_did_you_mean(const char *word, const char *const *candidates, int n)
{
    const char *best = NULL;
    int best_d = 3;
    for (int i = 0; i < n; i++) {
        const int d = s_distance(word, candidates[i]);
        if (d < best_d) {
            best_d = d;
            best = candidates[i];
        }
    }
    return best && 2 * best_d < (int)strlen(word) ? best : NULL;
}

/* The row for "--text" (without the dashes, up to len characters): an exact name, else a
 * unique prefix (as getopt_long allows). NULL when none or ambiguous. */
static const cli_opt *s_find(const cli_opt *opts, const char *text, size_t len, int *ambiguous)
{
    const cli_opt *hit = NULL;
    int n_hits = 0;
    *ambiguous = 0;
    for (const cli_opt *o = opts; o->name; o++) {
        if (strlen(o->name) == len && !strncmp(o->name, text, len)) return o;
        if (!strncmp(o->name, text, len)) {
            hit = o;
            n_hits++;
        }
    }
    if (n_hits > 1) *ambiguous = 1;
    return n_hits == 1 ? hit : NULL;
}

static int s_unknown(const cli_parser *p, const char *text, size_t len)
{
    char word[64];
    snprintf(word, sizeof(word), "%.*s", (int)(len < 63 ? len : 63), text);
    const char *names[128];
    int n = 0;
    for (const cli_opt *o = p->opts; o->name && n < 127; o++) names[n++] = o->name;
    names[n++] = "help";
    const char *near = cli_did_you_mean(word, names, n);
    if (near)
        cli_usage_error(p->cmd, "unknown option '--%s' (did you mean '--%s'?)", word, near);
    else
        cli_usage_error(p->cmd, "unknown option '%s'", p->argv[p->i - 1]);
    return CLI_ERROR;
}

/* Stores or reports the value of row o. */
static int s_take(cli_parser *p, const cli_opt *o, const char *value)
{
    p->opt = o;
    p->arg = value;
    switch (o->type) {
    case CLI_T_FLAG:
        if (o->flag) *o->flag = 1;
        break;
    case CLI_T_STR:
        if (o->str) *o->str = value;
        break;
    case CLI_T_INT: {
        const int rc = cli_parse_size(value, o->lo, o->hi, &p->num);
        if (rc == -1) {
            cli_usage_error(p->cmd, "--%s '%s' is not a number", o->name, value);
            return CLI_ERROR;
        }
        if (rc) {
            cli_usage_error(p->cmd, "--%s '%s' must be in [%ld, %ld]", o->name, value, o->lo,
                            o->hi);
            return CLI_ERROR;
        }
        if (o->num) *o->num = p->num;
        break;
    }
    case CLI_T_VALUE:
        break;
    }
    return o->key;
}

int cli_next(cli_parser *p)
{
    while (p->i < p->argc) {
        const char *a = p->argv[p->i++];
        if (p->only_pos || a[0] != '-' || !a[1]) {
            if (p->n_pos >= p->max_pos || p->n_pos >= CLI_MAX_POS) {
                cli_usage_error(p->cmd, "unexpected argument '%s'", a);
                return CLI_ERROR;
            }
            p->pos[p->n_pos++] = a;
            continue;
        }
        if (!strcmp(a, "--")) {
            p->only_pos = 1;
            continue;
        }
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            cli_print_help(p, stdout);
            return CLI_HELP;
        }
        if (a[1] != '-') {
            cli_usage_error(p->cmd, "unknown option '%s'", a);
            return CLI_ERROR;
        }
        const char *name = a + 2, *eq = strchr(name, '=');
        const size_t len = eq ? (size_t)(eq - name) : strlen(name);
        int ambiguous;
        const cli_opt *o = s_find(p->opts, name, len, &ambiguous);
        if (!o && len <= 4 && !strncmp(name, "help", len) && len) {
            cli_print_help(p, stdout);
            return CLI_HELP;
        }
        if (!o && ambiguous) {
            cli_usage_error(p->cmd, "option '%.*s' is ambiguous", (int)len + 2, a);
            return CLI_ERROR;
        }
        if (!o) return s_unknown(p, name, len);
        const char *value = NULL;
        if (o->type == CLI_T_FLAG) {
            if (eq) {
                cli_usage_error(p->cmd, "option '--%s' takes no value", o->name);
                return CLI_ERROR;
            }
        } else if (eq) {
            value = eq + 1;
        } else if (p->i < p->argc) {
            value = p->argv[p->i++];
        } else {
            cli_usage_error(p->cmd, "option '--%s' needs a value (%s)", o->name,
                            o->meta ? o->meta : "one");
            return CLI_ERROR;
        }
        const int rc = s_take(p, o, value);
        if (rc) return rc;
    }
    return 0;
}

int cli_parse_all(cli_parser *p)
{
    int rc;
    while ((rc = cli_next(p)) > 0) {
    }
    return rc;
}

void cli_print_help(const cli_parser *p, FILE *f)
{
    if (p->head) fputs(p->head, f);
    int width = 0;
    char left[128];
    for (const cli_opt *o = p->opts; o->name; o++) {
        if (!o->help) continue;
        const int n = snprintf(left, sizeof(left), "  --%s%s%s", o->name, o->meta ? " " : "",
                               o->meta ? o->meta : "");
        if (n > width && n <= 24) width = n;
    }
    if (width < 12) width = 12;
    width += 2;
    for (const cli_opt *o = p->opts; o->name; o++) {
        if (!o->help) continue;
        const int n = snprintf(left, sizeof(left), "  --%s%s%s", o->name, o->meta ? " " : "",
                               o->meta ? o->meta : "");
        fputs(left, f);
        if (n + 2 > width) fputc(' ', f);
        for (int i = n; i < width; i++) fputc(' ', f);
        for (const char *h = o->help; *h; h++) {
            fputc(*h, f);
            if (*h == '\n')
                for (int i = 0; i < width; i++) fputc(' ', f);
        }
        if (o->dflt) fprintf(f, " (default %s)", o->dflt);
        fputc('\n', f);
    }
    fprintf(f, "  -h, --help%*sthis text\n", width - 12 > 1 ? width - 12 : 1, "");
    if (p->tail) fputs(p->tail, f);
}

/* The one option parser of the fasa CLI. Each command describes its options in a table
 * (name, type, range, default, help line); the parser reads argv against it, stores what it
 * can (integers with their range, sizes with K/M/G suffixes, strings, flags), hands the rest
 * to the command by key, and prints --help from the same table. Every command accepts -h
 * and --help; --name=value and --name value both work; a mistyped option or command gets
 * "did you mean". Errors are one line, "fasa CMD: ... (see 'fasa CMD --help')", exit 2.
 *
 *     long steps = 8; const char *out = NULL;
 *     const cli_opt opts[] = {
 *         CLI_INT("steps", &steps, 1, 4096, "S", "8", "decode steps"),
 *         CLI_STR("out", &out, "FILE", NULL, "where to write"),
 *         CLI_KEY("dtype", 'T', "T", "f32", "f32, f16 or bf16"),
 *         CLI_END};
 *     cli_parser p;
 *     cli_begin(&p, "demo", usage_head, opts, argc, argv);
 *     int c;
 *     while ((c = cli_next(&p)) > 0)
 *         if (c == 'T' && fasa_dtype_parse(p.arg, &dtype)) return cli_usage_error(...);
 *     if (c < 0) return cli_status(c);   (help printed: -1; error printed: 2)
 */
#ifndef FASA_CLI_OPTS_H
#define FASA_CLI_OPTS_H

#include <stdio.h>

typedef enum cli_type {
    CLI_T_FLAG,  /* no value: *flag = 1 */
    CLI_T_STR,   /* *str = the value (argv's own text, not copied) */
    CLI_T_INT,   /* *num = the value, a decimal integer in [lo, hi]; K, M, G suffixes allowed */
    CLI_T_VALUE, /* a value the command parses itself (cli_next returns key, p->arg) */
} cli_type;

typedef struct cli_opt {
    const char *name; /* without the leading "--"; NULL ends the table */
    cli_type type;
    int key;          /* > 0: cli_next returns it after storing (or instead, for CLI_T_VALUE) */
    int *flag;        /* CLI_T_FLAG */
    const char **str; /* CLI_T_STR */
    long *num;        /* CLI_T_INT */
    long lo, hi;      /* CLI_T_INT range */
    const char *meta; /* the value's name in --help ("N", "FILE"); NULL for a flag */
    const char *dflt; /* the default, printed "(default X)"; NULL: none or said in help */
    const char *help; /* the help text; '\n' starts an indented continuation line; NULL hides */
} cli_opt;

#define CLI_FLAG(name, flag, help)                                                                 \
    {                                                                                              \
        name, CLI_T_FLAG, 0, flag, 0, 0, 0, 0, 0, 0, help                                          \
    }
#define CLI_STR(name, str, meta, dflt, help)                                                       \
    {                                                                                              \
        name, CLI_T_STR, 0, 0, str, 0, 0, 0, meta, dflt, help                                      \
    }
#define CLI_INT(name, num, lo, hi, meta, dflt, help)                                               \
    {                                                                                              \
        name, CLI_T_INT, 0, 0, 0, num, lo, hi, meta, dflt, help                                    \
    }
/* An integer that is stored and also reported (to check it further, or that it was given). */
#define CLI_INT_KEY(name, key, num, lo, hi, meta, dflt, help)                                      \
    {                                                                                              \
        name, CLI_T_INT, key, 0, 0, num, lo, hi, meta, dflt, help                                  \
    }
#define CLI_KEY(name, key, meta, dflt, help)                                                       \
    {                                                                                              \
        name, CLI_T_VALUE, key, 0, 0, 0, 0, 0, meta, dflt, help                                    \
    }
#define CLI_END                                                                                    \
    {                                                                                              \
        0                                                                                          \
    }

#define CLI_MAX_POS 16
#define CLI_HELP (-1)  /* cli_next: --help or -h was given and the help printed */
#define CLI_ERROR (-2) /* cli_next: a usage error was printed */

typedef struct cli_parser {
    const char *cmd;     /* in messages: "fasa CMD: ..." */
    const char *head;    /* printed before the options by --help: usage line, description */
    const char *tail;    /* printed after them (may be NULL) */
    const cli_opt *opts; /* the table, ended by CLI_END */
    int argc;
    char **argv;  /* argv[0] is the command's name */
    int max_pos;  /* positional arguments allowed (default 0: each one is an error) */
    int i;        /* the next argv index */
    int only_pos; /* after "--" */
    /* The option cli_next returned: the table row, its value's text and (CLI_T_INT) number. */
    const cli_opt *opt;
    const char *arg;
    long num;
    /* The positional arguments, in order. */
    const char *pos[CLI_MAX_POS];
    int n_pos;
} cli_parser;

/* Starts parsing argv (argv[0] the command) against opts. head is --help's text before the
 * option list (the usage line and a paragraph, ending in "\n"). */
void cli_begin(cli_parser *p, const char *cmd, const char *head, const cli_opt *opts, int argc,
               char **argv);
/* The next option: its key (> 0) for a row with a key, after storing its value if the row
 * has a target; 0 at the end; CLI_HELP after printing --help to stdout; CLI_ERROR after
 * printing one line (unknown option with "did you mean", missing value, not a number, out
 * of range, an unexpected positional argument). */
int cli_next(cli_parser *p);
/* Runs cli_next to the end for a table whose rows all store (no keys). 0, CLI_HELP or
 * CLI_ERROR. */
int cli_parse_all(cli_parser *p);
/* The status a command returns for cli_next's negative results: -1 for CLI_HELP (the
 * commands' "help printed" convention), 2 for CLI_ERROR. */
int cli_status(int rc);
/* Prints head, the table's options with their help and defaults, then tail. */
void cli_print_help(const cli_parser *p, FILE *f);

/* Parses a decimal integer with an optional K (x 1024), M (x 1048576) or G (x 2^30) suffix
 * into [lo, hi]. 0; -1 when text is not a number; -2 when it is out of range. */
int cli_parse_size(const char *text, long lo, long hi, long *out_p);
/* The candidate closest to word by edit distance when it is close enough to be a typo
 * (at most 2 edits, and fewer than half the word), else NULL. */
const char *cli_did_you_mean(const char *word, const char *const *candidates, int n);

#endif

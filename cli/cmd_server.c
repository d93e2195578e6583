/* The commands that talk to a fasa-server through libfasa, one request each: ping, stats,
 * create, append, attend, drop, shutdown, snapshot. Session ids are used as given (no prefix):
 * these commands manage sessions that outlive the command. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "cli.h"
#include "dtype.h"
#include "names.h"
#include "scan.h"
#include "engine.h"
#include "fasa_client.h"
#include "npy.h"
#include "opts.h"
#include "progress.h"
#include "prom.h"
#include "timing.h"

/* --help's text after the option list of every server command. */
static const char common_tail[] =
    "\n"
    "FASA_TIMEOUT_MS sets the wait for each reply (default 120000; 5000 for the ping that\n"
    "first checks the server answers). Errors print 'fasa CMD: message' (the server's\n"
    "message) and exit 1; usage errors exit 2.\n";

static const char ping_usage[] =
    "usage: fasa ping --server ENDPOINT\n"
    "\n"
    "Checks that a fasa-server answers; prints its version, MPI ranks, shards per session and\n"
    "the round trip of a ping (the first one includes connecting).\n"
    "\n";

static const char stats_usage[] =
    "usage: fasa stats --server ENDPOINT [--session ID] [--format text|prometheus]\n"
    "\n"
    "Prints the server's statistics. The text format (the default) has 'key value' lines:\n"
    "ranks, shards, sessions, profiles, requests and errors answered, attend steps, batch\n"
    "items, KV bytes held, uptime, then requests.TYPE (requests by type, failed ones included;\n"
    "a batch counts once as batch_attend, its items in batch_items and, when they ran, in\n"
    "attend_steps) and errors.CODE (responses and batch items by status); then two tables:\n"
    "the server-side step times by the method each step actually ran, one row per method\n"
    "(FASA .. SPARQ; a method no step ran has 0 steps and zeros; p50/p90/p99/max/mean in\n"
    "microseconds, percentiles within about 2%), and what each MPI rank holds (shards,\n"
    "sessions, tokens of layer 0, rows of every layer, bytes of the dominant key dims (kdom),\n"
    "the other key dims (krest) and the values (v), and bytes allocated). Rank 0 of a\n"
    "multi-rank server is the coordinator and holds no shard. With --session also that\n"
    "session's geometry, length, KV bytes, profile, default method and budget, storage dtype,\n"
    "pairing, GQA mode and dense layers, and what each rank holds of it.\n"
    "The prometheus format prints the same numbers in the Prometheus text exposition format\n"
    "(metrics named fasa_*; step times as the summary fasa_step_seconds).\n"
    "\n";

static const char create_usage[] =
    "usage: fasa create --server ENDPOINT --session ID --layers L --heads H --kv-heads K\n"
    "                   --head-dim D [options]\n"
    "\n"
    "Creates a session (one sequence) on the server with this geometry.\n"
    "\n";

static const char append_usage[] =
    "usage: fasa append --server ENDPOINT --session ID [--layer N] --k K.npy --v V.npy\n"
    "                   [--start-pos P]\n"
    "\n"
    "Appends post-RoPE keys and values to a session: float32 or float16 .npy arrays of shape\n"
    "(n, kv_heads, head_dim) for one layer (--layer N), or (layers, n, kv_heads, head_dim) for\n"
    "every layer (no --layer). float16 travels as F16 (half the bytes; stored as sent in an\n"
    "f16 session). Large files go in requests of at most 32 MiB, each all or nothing, up to 4\n"
    "in flight, with a progress bar on a terminal; on a failure the positions stored are\n"
    "printed.\n"
    "\n";

static const char attend_usage[] =
    "usage: fasa attend --server ENDPOINT --session ID --layer N --q Q.npy --out OUT.npy\n"
    "                   [options]\n"
    "\n"
    "One decode step of one layer: attends with the queries Q (float32 (heads, head_dim)) over\n"
    "the session's keys and writes the outputs, float32 (heads, head_dim), to OUT.npy.\n"
    "\n";

static const char drop_usage[] =
    "usage: fasa drop --server ENDPOINT SESSION\n"
    "       fasa drop --server ENDPOINT --session ID\n"
    "\n"
    "Drops a session and frees its keys and values on the server (and its snapshot in the\n"
    "server's --state-dir, if any).\n"
    "\n";

static const char shutdown_usage[] = "usage: fasa shutdown --server ENDPOINT\n"
                                     "\n"
                                     "Stops the server cleanly (every rank) after it answers.\n"
                                     "\n";

static const char snapshot_usage[] =
    "usage: fasa snapshot --server ENDPOINT SESSION\n"
    "       fasa snapshot --server ENDPOINT --all\n"
    "\n"
    "Writes a snapshot of one session (or of every session and the named profiles) into the\n"
    "server's --state-dir: each rank its shard files, then a manifest. A server started later\n"
    "with --state-dir DIR --restore loads them back, on any number of ranks. Prints one line\n"
    "per session: id, tokens, bytes, manifest file.\n"
    "\n";

typedef struct srv_opts {
    const char *server, *session, *profile, *profile_name, *k, *v, *q, *k_new, *v_new, *out,
        *selected, *dense_layers;
    long layers, heads, kv_heads, head_dim, budget, layer, start_pos, max_pos;
    int have_layer, have_start_pos, stats;
    fasa_method method;
    int have_method;
    fasa_gqa gqa;
    int have_gqa;
    fc_pairing pairing;
    int have_pairing;
    int prometheus;   /* stats --format prometheus */
    int all;          /* snapshot --all */
    fasa_dtype dtype; /* create --dtype */
    int score_dtype;  /* create --score-dtype: scan_dtype (0 auto) */
    int tier;         /* create --tier: 0 the server's, 1 ram, 2 disk */
    int merge;        /* create and attend --merge: 0 not given, 1 exact, 2 local */
} srv_opts;

/* The help line of an option that differs between commands. */
static const char *s_help(const char *cmd, int key, const char *dflt)
{
    if (key == 'i' && !strcmp(cmd, "create"))
        return "1..128 printable ASCII bytes, unique on the server";
    if (key == 'i' && !strcmp(cmd, "stats")) return "also report this session";
    if (key == 'i' && (!strcmp(cmd, "drop") || !strcmp(cmd, "snapshot")))
        return "the session (or SESSION, anywhere among the options)";
    if (key == 'l' && !strcmp(cmd, "append")) return "the layer (default: every layer)";
    if (!strcmp(cmd, "attend")) {
        if (key == 'm')
            return "fasa, dense, oracle, stream, quest, sparq or fasa-plus (default: the\n"
                   "session's)";
        if (key == 'b') return "tokens kept per selection unit (default: the session's)";
        if (key == 'g') return "per-head or shared (default: the session's)";
        if (key == 'M') return "exact or local, as for create (default: the session's)";
    }
    return dflt;
}

/* Parses argv for cmd, accepting only the options whose keys are in allowed (listed by
 * --help in that order, after --server and the CURVE keys); the others are known and
 * refused ("does not apply"). Returns 0, -1 after printing --help, or the usage error
 * status. */
static int s_parse(const char *cmd, const char *usage, const char *allowed, int argc, char **argv,
                   srv_opts *o)
{
    memset(o, 0, sizeof(*o));
    o->max_pos = -1;
    const cli_opt all[] = {
        CLI_STR("server", &o->server, "ENDPOINT", NULL,
                "the server, e.g. tcp://127.0.0.1:5555 (default: $FASA_SERVER)"),
        /* Taken out of argv by main for every command (backend_take_curve_args). */
        CLI_STR("curve-server-key", NULL, "FILE", NULL,
                "a server with CURVE: its public key ('fasa keygen' NAME.pub;\n"
                "default: $FASA_CURVE_SERVER_KEY)"),
        CLI_STR("curve-secret", NULL, "FILE", NULL,
                "this client's secret key (NAME.key, mode 0600; its NAME.pub must\n"
                "be in the server's --authorized-keys; default:\n"
                "$FASA_CURVE_CLIENT_SECRET)"),
        {"session", CLI_T_STR, 'i', 0, &o->session, 0, 0, 0, "ID", NULL, "the session"},
        {"layers", CLI_T_INT, 'L', 0, 0, &o->layers, 1, 1024, "L", NULL, "layers (1..1024)"},
        {"heads", CLI_T_INT, 'H', 0, 0, &o->heads, 1, 1024, "H", NULL,
         "query heads, a multiple of --kv-heads"},
        {"kv-heads", CLI_T_INT, 'K', 0, 0, &o->kv_heads, 1, 1024, "K", NULL, "KV heads"},
        CLI_INT_KEY("head-dim", 'D', &o->head_dim, 2, 1024, "D", NULL, "head dim (even)"),
        CLI_KEY("pairing", 'P', "P", NULL, "interleaved (default) or half"),
        {"profile", CLI_T_STR, 'p', 0, &o->profile, 0, 0, 0, "FILE", NULL,
         "calibration profile from 'fasa calibrate' (sent as text)"},
        {"profile-name", CLI_T_STR, 'n', 0, &o->profile_name, 0, 0, 0, "NAME", NULL,
         "a profile stored on the server ('fasa calibrate --profile-name')"},
        CLI_KEY("method", 'm', "M", NULL,
                "default method: fasa, dense, oracle, stream, quest, sparq or fasa-plus\n"
                "(default: fasa with a profile, else dense)"),
        {"budget", CLI_T_INT, 'b', 0, 0, &o->budget, 1, 1 << 20, "B", NULL,
         "default tokens kept per selection unit (default 256)"},
        CLI_KEY("gqa", 'g', "G", NULL, "per-head (default) or shared"),
        {"dense-layers", CLI_T_STR, 'd', 0, &o->dense_layers, 0, 0, 0, "LIST", "0",
         "comma-separated layers kept dense under fasa, or none"},
        CLI_KEY("dtype", 'T', "T", NULL,
                "how keys and values are stored: f32 (default), f16 or bf16 (half\n"
                "the memory and bytes read; values beyond f16's range are refused)"),
        CLI_KEY("score-dtype", 'Z', "T", NULL,
                "the FASA scan's scoring store: f32, f16, bf16 or int8 (one scale\n"
                "per row), a packed copy of the dominant key dims; default: the\n"
                "--dtype's own key dims"),
        CLI_KEY("tier", 'R', "T", NULL,
                "ram or disk: only the scoring data in RAM, the rest of K and V in\n"
                "files under the server's --tier-dir (default: the server's --tier)"),
        CLI_KEY("merge", 'M', "M", NULL,
                "how a sparse step's shards combine: exact (default: the global\n"
                "top-B, two round trips) or local (one round trip: each of the S\n"
                "shards attends over its own top ceil(B (1 + eps) / S), eps the\n"
                "server's --merge-eps; fasa and oracle only, selected all -1)"),
        CLI_INT_KEY("layer", 'l', &o->layer, 0, 1023, "N", NULL, "the layer"),
        {"k", CLI_T_STR, 'k', 0, &o->k, 0, 0, 0, "K.npy", NULL, "keys"},
        {"v", CLI_T_STR, 'v', 0, &o->v, 0, 0, 0, "V.npy", NULL, "values (the same shape)"},
        CLI_INT_KEY("start-pos", 's', &o->start_pos, 0, 1L << 40, "P", NULL,
                    "the first position (default: the session's current length, that\n"
                    "of layer 0; give it when the layers' lengths differ)"),
        {"q", CLI_T_STR, 'q', 0, &o->q, 0, 0, 0, "Q.npy", NULL,
         "post-RoPE queries, (heads, head_dim)"},
        {"k-new", CLI_T_STR, 'a', 0, &o->k_new, 0, 0, 0, "K.npy", NULL,
         "key of the new position, (kv_heads, head_dim), appended first"},
        {"v-new", CLI_T_STR, 'w', 0, &o->v_new, 0, 0, 0, "V.npy", NULL, "its value (with --k-new)"},
        {"max-pos", CLI_T_INT, 'x', 0, 0, &o->max_pos, -1, 1L << 40, "P", NULL,
         "highest visible key position (default: every appended one)"},
        {"out", CLI_T_STR, 'o', 0, &o->out, 0, 0, 0, "OUT.npy", NULL, "the attention outputs"},
        {"selected", CLI_T_STR, 'S', 0, &o->selected, 0, 0, 0, "SEL.npy", NULL,
         "int32 (heads, budget): each head's chosen positions, best first,\n"
         "-1 padded; all -1 when the step ran dense"},
        {"stats", CLI_T_FLAG, 't', &o->stats, 0, 0, 0, 0, NULL, NULL,
         "print the step's statistics as 'key value' lines"},
        CLI_KEY("format", 'F', "F", NULL, "text (default) or prometheus"),
        {"all", CLI_T_FLAG, 'A', &o->all, 0, 0, 0, 0, NULL, NULL,
         "every session and the named profiles"},
    };
    const size_t n_all = sizeof(all) / sizeof(*all);
    /* This command's rows in the order of allowed (--server and CURVE first), then the
     * others, hidden and refused. */
    cli_opt opts[sizeof(all) / sizeof(*all) + 1];
    size_t n = 0;
    for (size_t r = 0; r < 3; r++) opts[n++] = all[r];
    for (const char *a = allowed; *a; a++)
        for (size_t r = 3; r < n_all; r++)
            if (all[r].key == *a) {
                opts[n] = all[r];
                opts[n++].help = s_help(cmd, *a, all[r].help);
            }
    for (size_t r = 3; r < n_all; r++)
        if (!strchr(allowed, all[r].key)) {
            opts[n] = (cli_opt)CLI_KEY(all[r].name, 1, all[r].meta, NULL, NULL);
            if (all[r].type == CLI_T_FLAG) opts[n].type = CLI_T_FLAG;
            n++;
        }
    opts[n] = (cli_opt)CLI_END;
    cli_parser p;
    cli_begin(&p, cmd, usage, opts, argc, argv);
    p.tail = common_tail;
    int c;
    while ((c = cli_next(&p)) > 0) {
        const char *arg = p.arg;
        switch (c) {
        case 1:
            return cli_usage_error(cmd, "option '--%s' does not apply to '%s'", p.opt->name, cmd);
        case 'R':
            if (strcmp(arg, "ram") && strcmp(arg, "disk"))
                return cli_usage_error(cmd, "--tier '%s' is not ram or disk", arg);
            o->tier = arg[0] == 'd' ? 2 : 1;
            break;
        case 'T':
            if (fasa_dtype_parse(arg, &o->dtype))
                return cli_usage_error(cmd, "--dtype '%s' is not f32, f16 or bf16", arg);
            break;
        case 'Z':
            if (scan_dtype_parse(arg, &o->score_dtype))
                return cli_usage_error(cmd, "--score-dtype '%s' is not f32, f16, bf16 or int8",
                                       arg);
            break;
        case 'M':
            if (strcmp(arg, "exact") && strcmp(arg, "local"))
                return cli_usage_error(cmd, "--merge '%s' is not exact or local", arg);
            o->merge = arg[0] == 'l' ? 2 : 1;
            break;
        case 'F':
            if (strcmp(arg, "text") && strcmp(arg, "prometheus"))
                return cli_usage_error(cmd, "--format '%s' is not text or prometheus", arg);
            o->prometheus = arg[0] == 'p';
            break;
        case 'D':
            if (o->head_dim % 2)
                return cli_usage_error(cmd, "--head-dim '%s' must be even, in [2, 1024]", arg);
            break;
        case 'l':
            o->have_layer = 1;
            break;
        case 's':
            o->have_start_pos = 1;
            break;
        case 'm':
            if (fasa_method_parse(arg, &o->method))
                return cli_usage_error(
                    cmd,
                    "--method '%s' is not fasa, dense, oracle, stream, quest, sparq or fasa-plus",
                    arg);
            o->have_method = 1;
            break;
        case 'g':
            if (fasa_gqa_parse(arg, &o->gqa))
                return cli_usage_error(cmd, "--gqa '%s' is not per-head or shared", arg);
            o->have_gqa = 1;
            break;
        case 'P':
            if (fc_pairing_parse(arg, &o->pairing))
                return cli_usage_error(cmd, "--pairing '%s' is not interleaved or half", arg);
            o->have_pairing = 1;
            break;
        }
    }
    if (c < 0) return cli_status(c);
    if (!o->server) {
        const char *env = getenv("FASA_SERVER");
        if (env && *env) o->server = env;
    }
    if (!o->server)
        return cli_usage_error(cmd,
                               "'fasa %s' talks to a server: give --server ENDPOINT (or set "
                               "FASA_SERVER)",
                               cmd);
    return 0;
}

/* Connects and checks that the server answers (a ping, waiting 5 s unless FASA_TIMEOUT_MS
 * says otherwise); on failure prints "fasa CMD: message" and returns NULL. */
static fasa_client *s_connect(const char *cmd, const char *server, int timeout_ms)
{
    char msg[FASA_CLIENT_MSG_MAX];
    fasa_client *c = backend_connect(server, timeout_ms, NULL, msg, sizeof(msg));
    if (!c) cli_fail(cmd, "%s", msg);
    return c;
}

static const char *s_method_name(fasa_client_method m)
{
    return fasa_names_wire_method((int)m);
}

int cmd_ping(int argc, char **argv)
{
    srv_opts o;
    int rc = s_parse("ping", ping_usage, "E", argc, argv, &o);
    if (rc) return rc < 0 ? 0 : rc;
    fasa_client *c = NULL;
    fasa_client_error ce;
    if (fasa_client_connect(o.server, backend_timeout_ms(BACKEND_PING_TIMEOUT_MS), &c, &ce))
        return cli_fail("ping", "%s", ce.msg);
    char msg[FASA_CLIENT_MSG_MAX];
    if (backend_client_curve(c, msg, sizeof(msg))) {
        fasa_client_close(&c);
        return cli_fail("ping", "%s", msg);
    }
    fasa_client_server_info info;
    double rtt[4];
    rc = 0;
    for (int i = 0; i < 4 && !rc; i++) {
        const double t0 = timing_now();
        if (fasa_client_ping(c, &info, &ce)) rc = cli_fail("ping", "%s", ce.msg);
        rtt[i] = 1e3 * (timing_now() - t0);
    }
    if (!rc) {
        double best = rtt[1];
        for (int i = 2; i < 4; i++)
            if (rtt[i] < best) best = rtt[i];
        printf("%s at %s: %u rank(s), %u shard(s), round trip %.3f ms (first, with connect: "
               "%.3f ms)\n",
               info.version, o.server, info.n_ranks, info.n_shards, best, rtt[0]);
    }
    fasa_client_close(&c);
    return rc;
}

/* The step times and rank holdings tables of the text format. */
static void s_print_latency(const fasa_client_stats *st)
{
    printf("%-8s %10s %12s %12s %12s %12s %12s\n", "latency", "steps", "p50_us", "p90_us", "p99_us",
           "max_us", "mean_us");
    for (int m = FASA_CLIENT_METHOD_FASA; m <= FASA_CLIENT_METHOD_LAST; m++) {
        const fasa_client_latency *l = &st->latency[m];
        printf("%-8s %10llu %12.1f %12.1f %12.1f %12.1f %12.1f\n",
               s_method_name((fasa_client_method)m), (unsigned long long)l->count, l->p50_us,
               l->p90_us, l->p99_us, l->max_us, l->count ? l->sum_us / (double)l->count : 0.0);
    }
}

static void s_print_ranks(const char *title, size_t n, const fasa_client_rank_stats *r)
{
    printf("%-12s %6s %8s %12s %12s %14s %14s %14s %14s\n", title, "shards", "sessions", "tokens",
           "rows", "kdom_bytes", "krest_bytes", "v_bytes", "alloc_bytes");
    for (size_t i = 0; i < n; i++)
        printf("%-12u %6u %8u %12llu %12llu %14llu %14llu %14llu %14llu\n", r[i].rank, r[i].shards,
               r[i].sessions, (unsigned long long)r[i].tokens, (unsigned long long)r[i].rows,
               (unsigned long long)r[i].kdom_bytes, (unsigned long long)r[i].krest_bytes,
               (unsigned long long)r[i].v_bytes, (unsigned long long)r[i].alloc_bytes);
    /* Resident memory beside what the limit counts, one line per rank (it changes from
     * request to request, so it stays out of the holdings table). */
    const char *prefix = strncmp(title, "session.", 8) ? "" : "session.";
    for (size_t i = 0; i < n; i++)
        if (r[i].rss_bytes)
            printf("%srss_bytes.rank %u %llu (alloc_bytes %llu)\n", prefix, r[i].rank,
                   (unsigned long long)r[i].rss_bytes, (unsigned long long)r[i].alloc_bytes);
}

static void s_print_text(const char *server, const fasa_client_stats *st)
{
    printf("server %s\nn_ranks %u\nn_shards %u\nn_sessions %u\nn_profiles %u\nrequests %llu\n"
           "errors %llu\nattend_steps %llu\nbatch_items %llu\nkv_bytes %llu\nuptime_s %.3f\n",
           server, st->n_ranks, st->n_shards, st->n_sessions, st->n_profiles,
           (unsigned long long)st->requests, (unsigned long long)st->errors,
           (unsigned long long)st->attend_steps, (unsigned long long)st->batch_items,
           (unsigned long long)st->kv_bytes, st->uptime_s);
    for (size_t i = 0; i < st->n_request_types; i++)
        printf("requests.%s %llu\n", st->requests_by_type[i].type,
               (unsigned long long)st->requests_by_type[i].count);
    for (int c = FASA_CLIENT_INVALID_ARGUMENT; c <= FASA_CLIENT_UNAVAILABLE; c++)
        printf("errors.%s %llu\n", fasa_client_status_name((fasa_client_status)c),
               (unsigned long long)st->errors_by_code[c]);
    s_print_latency(st);
    s_print_ranks("rank", st->n_rank_stats, st->rank_stats);
    if (st->has_session) {
        const fasa_client_session_info *s = &st->session;
        printf("session %s\nsession.n_layers %u\nsession.n_heads %u\nsession.n_kv_heads %u\n"
               "session.head_dim %u\nsession.length %llu\nsession.kv_bytes %llu\n"
               "session.has_profile %s\nsession.method %s\nsession.budget %u\n",
               s->session_id, s->n_layers, s->n_heads, s->n_kv_heads, s->head_dim,
               (unsigned long long)s->length, (unsigned long long)s->kv_bytes,
               s->has_profile ? "yes" : "no", s_method_name(s->method), s->budget);
        printf("session.dtype %s\n", s->dtype == FASA_CLIENT_DTYPE_F16    ? "f16"
                                     : s->dtype == FASA_CLIENT_DTYPE_BF16 ? "bf16"
                                                                          : "f32");
        printf("session.pairing %s\nsession.gqa %s\nsession.dense_layers",
               s->pairing == FASA_CLIENT_PAIRING_HALF ? "half" : "interleaved",
               s->gqa == FASA_CLIENT_GQA_SHARED ? "shared" : "per-head");
        for (size_t i = 0; i < s->n_dense_layers && i < 64; i++)
            printf("%s%u", i ? "," : " ", s->dense_layers[i]);
        printf("%s%s\n", s->n_dense_layers ? "" : " none", s->n_dense_layers > 64 ? ",..." : "");
        if (s->score_dtype) printf("session.score_dtype %s\n", scan_dtype_name(s->score_dtype));
        if (s->tier) printf("session.tier %s\n", s->tier == 2 ? "disk" : "ram");
        s_print_ranks("session.rank", s->n_rank_stats, s->rank_stats);
    }
}

int cmd_stats(int argc, char **argv)
{
    srv_opts o;
    int rc = s_parse("stats", stats_usage, "EiF", argc, argv, &o);
    if (rc) return rc < 0 ? 0 : rc;
    fasa_client *c = s_connect("stats", o.server, BACKEND_TIMEOUT_MS);
    if (!c) return 1;
    fasa_client_stats st;
    fasa_client_error ce;
    if (fasa_client_get_stats(c, o.session, &st, &ce)) {
        fasa_client_close(&c);
        return cli_fail("stats", "%s", ce.msg);
    }
    fasa_client_close(&c);
    if (o.prometheus)
        fasa_prom_write(stdout, &st);
    else
        s_print_text(o.server, &st);
    fasa_client_stats_free(&st);
    return 0;
}

/* Reads a whole text file (at most 64 MiB) into a malloc'd string; NULL with err filled. */
static char *s_read_text(const char *path, char *err, size_t err_len)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        snprintf(err, err_len, "cannot open profile %s: %s", path, strerror(errno));
        return NULL;
    }
    size_t cap = 4096, len = 0;
    char *buf = malloc(cap);
    while (buf) {
        if (len + 1 >= cap) {
            if (cap >= (size_t)64 << 20) {
                snprintf(err, err_len, "profile %s is over 64 MiB", path);
                free(buf);
                fclose(f);
                return NULL;
            }
            char *grown = realloc(buf, cap *= 2);
            if (!grown) {
                free(buf);
                buf = NULL;
                break;
            }
            buf = grown;
        }
        const size_t got = fread(buf + len, 1, cap - 1 - len, f);
        len += got;
        if (got == 0) break;
    }
    const int bad = ferror(f);
    fclose(f);
    if (!buf) {
        snprintf(err, err_len, "out of memory reading %s", path);
        return NULL;
    }
    if (bad) {
        snprintf(err, err_len, "cannot read profile %s", path);
        free(buf);
        return NULL;
    }
    buf[len] = '\0';
    return buf;
}

int cmd_create(int argc, char **argv)
{
    srv_opts o;
    int rc = s_parse("create", create_usage, "EiLHKDPpnmbgMdTZR", argc, argv, &o);
    if (rc) return rc < 0 ? 0 : rc;
    if (!o.session) return cli_usage_error("create", "--session ID is required");
    if (!o.layers || !o.heads || !o.kv_heads || !o.head_dim)
        return cli_usage_error("create",
                               "--layers, --heads, --kv-heads and --head-dim are required");
    if (o.profile && o.profile_name)
        return cli_usage_error("create", "give --profile or --profile-name, not both");
    uint32_t dense[1024];
    size_t n_dense = 0;
    if (o.dense_layers && strcmp(o.dense_layers, "none") != 0) {
        char buf[8192];
        snprintf(buf, sizeof(buf), "%s", o.dense_layers);
        for (char *save = NULL, *tok = strtok_r(buf, ",", &save); tok;
             tok = strtok_r(NULL, ",", &save)) {
            long l;
            if (n_dense == 1024 || cli_parse_int(tok, 0, o.layers - 1, &l))
                return cli_usage_error("create",
                                       "--dense-layers '%s' must be none or layers in [0, %ld)",
                                       o.dense_layers, o.layers);
            dense[n_dense++] = (uint32_t)l;
        }
    }
    char err[512];
    char *text = NULL;
    if (o.profile && !(text = s_read_text(o.profile, err, sizeof(err))))
        return cli_fail("create", "%s", err);
    fasa_client_session_config cfg = {
        .geom = {(uint32_t)o.layers, (uint32_t)o.heads, (uint32_t)o.kv_heads, (uint32_t)o.head_dim},
        .pairing = !o.have_pairing                ? FASA_CLIENT_PAIRING_DEFAULT
                   : o.pairing == FC_PAIRING_HALF ? FASA_CLIENT_PAIRING_HALF
                                                  : FASA_CLIENT_PAIRING_INTERLEAVED,
        .profile_text = text,
        .profile_name = o.profile_name,
        .method = o.have_method ? (fasa_client_method)(o.method + 1) : FASA_CLIENT_METHOD_DEFAULT,
        .budget = (uint32_t)o.budget,
        .gqa = o.have_gqa ? (fasa_client_gqa)(o.gqa + 1) : FASA_CLIENT_GQA_DEFAULT,
        .dense_layers_set = o.dense_layers != NULL,
        .dense_layers = dense,
        .n_dense_layers = n_dense,
        .dtype = (fasa_client_dtype)(o.dtype + 1),
        .score_dtype = (fasa_client_dtype)o.score_dtype,

        .tier = o.tier,
        .merge = (fasa_client_merge)o.merge};
    fasa_client *c = s_connect("create", o.server, BACKEND_TIMEOUT_MS);
    if (!c) {
        free(text);
        return 1;
    }
    uint32_t n_shards = 0;
    fasa_client_error ce;
    if (fasa_client_create_session(c, o.session, &cfg, &n_shards, &ce))
        rc = cli_fail("create", "%s", ce.msg);
    else
        printf("created session %s: %ld layers, %ld query heads / %ld KV heads, head_dim %ld, "
               "%s, %u shard(s)\n",
               o.session, o.layers, o.heads, o.kv_heads, o.head_dim,
               text || o.profile_name ? "with a profile" : "no profile", n_shards);
    fasa_client_close(&c);
    free(text);
    return rc;
}

int cmd_append(int argc, char **argv)
{
    srv_opts o;
    int rc = s_parse("append", append_usage, "Eilkvs", argc, argv, &o);
    if (rc) return rc < 0 ? 0 : rc;
    if (!o.session) return cli_usage_error("append", "--session ID is required");
    if (!o.k || !o.v) return cli_usage_error("append", "--k K.npy and --v V.npy are required");
    const int layer = o.have_layer ? (int)o.layer : -1;
    const int want_dims = o.have_layer ? 3 : 4;
    char err[512];
    void *k = NULL, *v = NULL;
    int64_t ks[NPY_MAX_DIMS], vs[NPY_MAX_DIMS];
    int knd = 0, vnd = 0, kf16 = 0, vf16 = 0;
    fasa_client *c = NULL;
    rc = 1;
    if (npy_read_f32_f16(o.k, &k, &kf16, &knd, ks, err, sizeof(err)) ||
        npy_read_f32_f16(o.v, &v, &vf16, &vnd, vs, err, sizeof(err))) {
        cli_fail("append", "%s", err);
        goto done;
    }
    if (kf16 != vf16) {
        cli_fail("append", "--v %s is %s but --k %s is %s: give both the same dtype", o.v,
                 vf16 ? "float16" : "float32", o.k, kf16 ? "float16" : "float32");
        goto done;
    }
    if (knd != want_dims) {
        cli_fail("append", "--k %s: %d dims, expected %s", o.k, knd,
                 o.have_layer ? "(n, kv_heads, head_dim) with --layer"
                              : "(layers, n, kv_heads, head_dim) without --layer");
        goto done;
    }
    if (vnd != knd || memcmp(ks, vs, (size_t)knd * sizeof(*ks)) != 0) {
        cli_fail("append", "--v %s: shape differs from --k %s", o.v, o.k);
        goto done;
    }
    const int off = o.have_layer ? 0 : 1;
    const fasa_client_geometry g = {o.have_layer ? 0 : (uint32_t)ks[0], 0, (uint32_t)ks[off + 1],
                                    (uint32_t)ks[off + 2]};
    const uint64_t n = (uint64_t)ks[off];
    if (!(c = s_connect("append", o.server, BACKEND_TIMEOUT_MS))) goto done;
    fasa_client_error ce;
    uint64_t start = (uint64_t)o.start_pos, length = 0;
    if (!o.have_start_pos) {
        fasa_client_stats st;
        if (fasa_client_get_stats(c, o.session, &st, &ce)) {
            cli_fail("append", "%s", ce.msg);
            goto done;
        }
        start = st.session.length;
        fasa_client_stats_free(&st);
    }
    /* Requests of at most 32 MiB (whole tokens of every layer the file holds). */
    const size_t esz = kf16 ? 2 : 4, layers = o.have_layer ? 1 : (size_t)ks[0];
    const size_t tok_bytes = 2 * layers * (size_t)ks[off + 1] * (size_t)ks[off + 2] * esz;
    const uint64_t per =
        tok_bytes && ((size_t)32 << 20) / tok_bytes ? ((size_t)32 << 20) / tok_bytes : 1;
    const fasa_client_dtype dt = kf16 ? FASA_CLIENT_DTYPE_F16 : FASA_CLIENT_DTYPE_F32;
    const size_t row = (size_t)ks[off + 1] * (size_t)ks[off + 2] * esz; /* bytes per token */
    void *bk = NULL, *bv = NULL;
    if (layers > 1 && n > per) { /* a request's tokens gathered from every layer */
        bk = malloc(layers * per * row);
        bv = malloc(layers * per * row);
        if (!bk || !bv) {
            free(bk), free(bv);
            cli_fail("append", "out of memory for a request of %llu tokens",
                     (unsigned long long)per);
            goto done;
        }
    }
    /* Up to 4 requests in flight (libfasa's append window): the next is read and packed
     * while the server stores the one before. Each is acknowledged once stored. */
    progress pr;
    progress_init(&pr, "append", (long)n);
    uint64_t acked = 0, sent = 0;
    int failed = 0;
    while (!failed && acked < n) {
        if (sent < n && fasa_client_append_pending(c) < 4) {
            const uint64_t m = n - sent < per ? n - sent : per;
            const void *pk = (const char *)k + sent * row, *pv = (const char *)v + sent * row;
            if (bk) {
                for (size_t l = 0; l < layers; l++) {
                    memcpy((char *)bk + l * m * row, (const char *)k + (l * n + sent) * row,
                           m * row);
                    memcpy((char *)bv + l * m * row, (const char *)v + (l * n + sent) * row,
                           m * row);
                }
                pk = bk, pv = bv;
            }
            failed = fasa_client_append_send(c, o.session, &g, layer, start + sent, m, dt, pk, pv,
                                             &ce) != FASA_CLIENT_OK;
            if (!failed) sent += m;
            continue;
        }
        failed = fasa_client_append_recv(c, &length, &ce) != FASA_CLIENT_OK;
        if (!failed) {
            acked += n - acked < per ? n - acked : per;
            progress_update(&pr, (long)acked);
        }
    }
    progress_done(&pr);
    while (fasa_client_append_pending(c)) { /* the ones after a failure: refused in order */
        fasa_client_error ignored;
        fasa_client_append_recv(c, NULL, &ignored);
    }
    free(bk), free(bv);
    if (failed) {
        cli_fail("append", "%s", ce.msg);
        if (acked)
            fprintf(stderr, "append: positions %llu..%llu were stored, the rest not\n",
                    (unsigned long long)start, (unsigned long long)(start + acked - 1));
        goto done;
    }
    if (o.have_layer)
        printf("appended positions %llu..%llu to layer %d of session %s: length %llu\n",
               (unsigned long long)start, (unsigned long long)(start + n - 1), layer, o.session,
               (unsigned long long)length);
    else
        printf("appended positions %llu..%llu to every layer of session %s: length %llu\n",
               (unsigned long long)start, (unsigned long long)(start + n - 1), o.session,
               (unsigned long long)length);
    rc = 0;
done:
    fasa_client_close(&c);
    free(k);
    free(v);
    return rc;
}

int cmd_attend(int argc, char **argv)
{
    srv_opts o;
    int rc = s_parse("attend", attend_usage, "EilqawmbgMxoSt", argc, argv, &o);
    if (rc) return rc < 0 ? 0 : rc;
    if (!o.session) return cli_usage_error("attend", "--session ID is required");
    if (!o.have_layer) return cli_usage_error("attend", "--layer N is required");
    if (!o.q) return cli_usage_error("attend", "--q Q.npy is required");
    if (!o.out) return cli_usage_error("attend", "--out OUT.npy is required");
    if (!o.k_new != !o.v_new) return cli_usage_error("attend", "--k-new and --v-new go together");
    char err[512];
    float *q = NULL, *kn = NULL, *vn = NULL, *out = NULL;
    int32_t *sel = NULL;
    int64_t qs[NPY_MAX_DIMS], ks[NPY_MAX_DIMS], vs[NPY_MAX_DIMS];
    int qnd = 0, knd = 0, vnd = 0;
    fasa_client *c = NULL;
    fasa_client_error ce;
    rc = 1;
    if (npy_read_f32(o.q, &q, &qnd, qs, err, sizeof(err)) ||
        (o.k_new && npy_read_f32(o.k_new, &kn, &knd, ks, err, sizeof(err))) ||
        (o.v_new && npy_read_f32(o.v_new, &vn, &vnd, vs, err, sizeof(err)))) {
        cli_fail("attend", "%s", err);
        goto done;
    }
    if (qnd != 2) {
        cli_fail("attend", "--q %s: %d dims, expected (heads, head_dim)", o.q, qnd);
        goto done;
    }
    if (o.k_new && (knd != 2 || vnd != 2 || ks[0] != vs[0] || ks[1] != vs[1] || ks[1] != qs[1])) {
        cli_fail("attend",
                 "--k-new %s and --v-new %s must both be (kv_heads, head_dim) with the head_dim "
                 "%lld of --q",
                 o.k_new, o.v_new, (long long)qs[1]);
        goto done;
    }
    if (!(c = s_connect("attend", o.server, BACKEND_TIMEOUT_MS))) goto done;
    /* The session's geometry and default budget (for the shapes the reply must have). */
    fasa_client_stats st;
    if (fasa_client_get_stats(c, o.session, &st, &ce)) {
        cli_fail("attend", "%s", ce.msg);
        goto done;
    }
    const uint32_t H = (uint32_t)qs[0], d = (uint32_t)qs[1];
    const uint32_t B = o.budget ? (uint32_t)o.budget : st.session.budget;
    fasa_client_stats_free(&st);
    out = malloc((size_t)H * d * sizeof(float) + 1);
    if (o.selected) sel = malloc((size_t)H * B * sizeof(int32_t) + 1);
    if (!out || (o.selected && !sel)) {
        cli_fail("attend", "out of memory");
        goto done;
    }
    fasa_client_step_stats ss;
    fasa_client_attend_req r = FASA_CLIENT_ATTEND_REQ_INIT;
    r.session_id = o.session;
    /* Shapes as given: the server names any mismatch with the session. */
    r.geom = (fasa_client_geometry){st.session.n_layers, H,
                                    o.k_new ? (uint32_t)ks[0] : st.session.n_kv_heads, d};
    r.layer = (uint32_t)o.layer;
    r.q = q;
    r.k_new = kn;
    r.v_new = vn;
    r.method = o.have_method ? (fasa_client_method)(o.method + 1) : FASA_CLIENT_METHOD_DEFAULT;
    r.budget = (uint32_t)o.budget;
    r.gqa = o.have_gqa ? (fasa_client_gqa)(o.gqa + 1) : FASA_CLIENT_GQA_DEFAULT;
    r.max_pos = o.max_pos;
    r.merge = (fasa_client_merge)o.merge;
    r.out = out;
    r.selected = sel;
    r.selected_budget = B;
    r.stats = &ss;
    if (fasa_client_attend(c, &r, &ce)) {
        cli_fail("attend", "%s", ce.msg);
        goto done;
    }
    int64_t shape[2] = {H, d};
    if (npy_write(o.out, "<f4", 2, shape, out, err, sizeof(err))) {
        cli_fail("attend", "%s", err);
        goto done;
    }
    if (o.selected) {
        shape[1] = B;
        if (npy_write(o.selected, "<i4", 2, shape, sel, err, sizeof(err))) {
            cli_fail("attend", "%s", err);
            goto done;
        }
    }
    printf("attended layer %ld of session %s: wrote %s (%u x %u)%s%s\n", o.layer, o.session, o.out,
           H, d, o.selected ? " and " : "", o.selected ? o.selected : "");
    if (o.stats)
        printf("method_used %s\nn_visible %u\nbytes_read %llu\nserver_us %llu\n",
               s_method_name(ss.method_used), ss.n_visible, (unsigned long long)ss.bytes_read,
               (unsigned long long)ss.server_us);
    rc = 0;
done:
    fasa_client_close(&c);
    free(q);
    free(kn);
    free(vn);
    free(out);
    free(sel);
    return rc;
}

/* A SESSION given anywhere among the options, taken out of argv (NULL when none). */
static const char *s_positional(int *argc_p, char ***argv_p)
{
    /* A word that follows an option is taken as that option's value (so `--layers 3` is
     * left to the parser, which names the option), unless the option is a known flag. */
    static const char *const flags[] = {"--all", "--help", "-h"};
    char **argv = *argv_p;
    const int argc = *argc_p;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--")) break;
        if (argv[i][0] == '-') continue;
        const char *prev = argv[i - 1];
        int after_value_option = i > 1 && prev[0] == '-' && !strchr(prev, '=');
        for (size_t k = 0; k < sizeof(flags) / sizeof(*flags); k++)
            if (!strcmp(prev, flags[k])) after_value_option = 0;
        if (after_value_option) continue;
        const char *p = argv[i];
        memmove(&argv[i], &argv[i + 1], (size_t)(argc - i) * sizeof(*argv));
        (*argc_p)--;
        return p;
    }
    return NULL;
}

int cmd_drop(int argc, char **argv)
{
    /* fasa drop SESSION [options], as fasa snapshot SESSION. */
    const char *positional = s_positional(&argc, &argv);
    srv_opts o;
    int rc = s_parse("drop", drop_usage, "Ei", argc, argv, &o);
    if (rc) return rc < 0 ? 0 : rc;
    if (positional && o.session)
        return cli_usage_error("drop", "give the session once (SESSION or --session ID)");
    if (positional) o.session = positional;
    if (!o.session) return cli_usage_error("drop", "SESSION (or --session ID) is required");
    fasa_client *c = s_connect("drop", o.server, BACKEND_TIMEOUT_MS);
    if (!c) return 1;
    fasa_client_error ce;
    if (fasa_client_drop_session(c, o.session, &ce))
        rc = cli_fail("drop", "%s", ce.msg);
    else
        printf("dropped session %s\n", o.session);
    fasa_client_close(&c);
    return rc;
}

int cmd_shutdown(int argc, char **argv)
{
    srv_opts o;
    int rc = s_parse("shutdown", shutdown_usage, "E", argc, argv, &o);
    if (rc) return rc < 0 ? 0 : rc;
    fasa_client *c = s_connect("shutdown", o.server, BACKEND_TIMEOUT_MS);
    if (!c) return 1;
    fasa_client_error ce;
    if (fasa_client_shutdown(c, &ce))
        rc = cli_fail("shutdown", "%s", ce.msg);
    else
        printf("server at %s is shutting down\n", o.server);
    fasa_client_close(&c);
    return rc;
}

int cmd_snapshot(int argc, char **argv)
{
    /* fasa snapshot SESSION [options]: the session may come first, without --session. */
    const char *positional = s_positional(&argc, &argv);
    srv_opts o;
    int rc = s_parse("snapshot", snapshot_usage, "EiA", argc, argv, &o);
    if (rc) return rc < 0 ? 0 : rc;
    if (positional && o.session)
        return cli_usage_error("snapshot", "give the session once (SESSION or --session ID)");
    if (positional) o.session = positional;
    if (!o.session == !o.all)
        return cli_usage_error("snapshot", "give exactly one of SESSION and --all");
    fasa_client *c = s_connect("snapshot", o.server, BACKEND_TIMEOUT_MS);
    if (!c) return 1;
    fasa_client_error ce;
    enum { CAP = 1024 };
    fasa_client_snapshot_info *infos = calloc(CAP, sizeof(*infos));
    size_t n = 0;
    uint32_t n_profiles = 0;
    if (!infos)
        rc = cli_fail("snapshot", "out of memory");
    else if (fasa_client_snapshot(c, o.session, infos, CAP, &n, &n_profiles, &ce))
        rc = cli_fail("snapshot", "%s", ce.msg);
    else {
        for (size_t i = 0; i < n && i < CAP; i++)
            printf("snapshot %s tokens %llu bytes %llu manifest %s\n", infos[i].session_id,
                   (unsigned long long)infos[i].length, (unsigned long long)infos[i].bytes,
                   infos[i].manifest);
        if (o.all) printf("profiles %u\n", n_profiles);
    }
    free(infos);
    fasa_client_close(&c);
    return rc;
}

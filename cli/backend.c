/* The CLI's backend: the embedded engine, or a server through libfasa. */
#include "backend.h"

#include <errno.h>
#include <stdint.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fasa_client.h"
#include "keyfile.h"
#include "pool.h"

typedef struct remote_session {
    char id[FASA_ID_MAX + 1];      /* the command's name for it */
    char wire_id[FASA_ID_MAX + 1]; /* "cli-<pid>-ID" on the server */
    fasa_client_geometry geom;
    int budget;   /* the session's default budget */
    int merge;    /* the session's fasa_merge */
    int32_t *len; /* (n_layers) tokens appended, tracked here */
} remote_session;

struct backend {
    fasa_engine_t *eng;
    fasa_client *cli;
    remote_session *s;
    int n_s, cap_s;
    struct sigaction old_int, old_term;
    int handlers;
    char desc[256];
    int n_shards; /* in-process engine */
};

static volatile sig_atomic_t s_interrupted;

int backend_exit_status(int rc)
{
    return s_interrupted ? 128 + (int)s_interrupted : rc;
}

static void s_on_signal(int sig)
{
    s_interrupted = sig;
}

__attribute__((format(printf, 3, 4))) static fasa_status s_fail(fasa_error *err, fasa_status code,
                                                                const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    err->code = code;
    vsnprintf(err->msg, sizeof(err->msg), fmt, ap);
    va_end(ap);
    return code;
}

/* A libfasa error as the engine's. */
static fasa_status s_from_client(const fasa_client_error *ce, fasa_error *err)
{
    return s_fail(err, (fasa_status)ce->code, "%s", ce->msg);
}

int backend_timeout_ms(int dflt)
{
    const char *t = getenv("FASA_TIMEOUT_MS");
    if (t && *t) {
        char *end;
        errno = 0;
        const long v = strtol(t, &end, 10);
        if (!errno && !*end && v > 0 && v <= 0x7fffffffL) return (int)v;
    }
    return dflt;
}

int backend_take_curve_args(int *argc_p, char **argv)
{
    static const struct {
        const char *opt, *env;
    } flags[] = {{"--curve-server-key", BACKEND_ENV_SERVER_KEY},
                 {"--curve-secret", BACKEND_ENV_SECRET}};
    int out = 1;
    for (int i = 1; i < *argc_p; i++) {
        int taken = 0;
        for (size_t f = 0; f < sizeof(flags) / sizeof(*flags) && !taken; f++) {
            const size_t n = strlen(flags[f].opt);
            if (strncmp(argv[i], flags[f].opt, n) != 0 || (argv[i][n] && argv[i][n] != '='))
                continue;
            const char *value = argv[i][n] ? argv[i] + n + 1 : (i + 1 < *argc_p ? argv[++i] : NULL);
            if (!value || !*value) {
                fprintf(stderr, "fasa: %s needs a FILE (see 'fasa --help')\n", flags[f].opt);
                return 2;
            }
            setenv(flags[f].env, value, 1);
            taken = 1;
        }
        if (!taken) argv[out++] = argv[i];
    }
    argv[out] = NULL;
    *argc_p = out;
    return 0;
}

int backend_client_curve(fasa_client *c, char *msg, size_t msg_len)
{
    /* FASA_DEADLINE_MS was checked at start-up (cli_check_env: digits, at most 2^31 - 1). */
    const char *dl = getenv("FASA_DEADLINE_MS");
    if (dl && *dl) fasa_client_set_deadline(c, (uint32_t)strtoul(dl, NULL, 10));
    const char *server_key = getenv(BACKEND_ENV_SERVER_KEY), *secret = getenv(BACKEND_ENV_SECRET);
    const int has_server = server_key && *server_key, has_secret = secret && *secret;
    if (!has_server && !has_secret) return 0;
    if (has_server != has_secret) {
        snprintf(msg, msg_len,
                 "%s needs %s too (the server's public key and this client's secret key)",
                 has_server ? "--curve-server-key" : "--curve-secret",
                 has_server ? "--curve-secret" : "--curve-server-key");
        return -1;
    }
    char server_z85[FASA_KEY_Z85_LEN + 1], secret_z85[FASA_KEY_Z85_LEN + 1];
    fasa_client_error ce;
    int rc = -1;
    if (fasa_keyfile_read(server_key, 0, server_z85, msg, msg_len) ||
        fasa_keyfile_read(secret, 1, secret_z85, msg, msg_len))
        return -1;
    if (fasa_client_set_curve(c, server_z85, secret_z85, NULL, &ce))
        snprintf(msg, msg_len, "%s", ce.msg);
    else
        rc = 0;
    memset(secret_z85, 0, sizeof(secret_z85));
    return rc;
}

fasa_client *backend_connect(const char *server, int timeout_ms, fasa_client_server_info *info,
                             char *msg, size_t msg_len)
{
    fasa_client *c = NULL;
    fasa_client_error ce;
    fasa_client_server_info dummy;
    if (fasa_client_connect(server, backend_timeout_ms(BACKEND_PING_TIMEOUT_MS), &c, &ce)) {
        snprintf(msg, msg_len, "%s", ce.msg);
        return NULL;
    }
    if (backend_client_curve(c, msg, msg_len)) {
        fasa_client_close(&c);
        return NULL;
    }
    if (fasa_client_ping(c, info ? info : &dummy, &ce)) {
        snprintf(msg, msg_len, "%s", ce.msg);
        fasa_client_close(&c);
        return NULL;
    }
    fasa_client_set_timeout(c, backend_timeout_ms(timeout_ms));
    return c;
}

static int s_threads = 1;

int backend_set_threads(int n_threads)
{
    if (n_threads >= 1 && n_threads <= FASA_POOL_MAX) s_threads = n_threads;
    return s_threads;
}

int backend_threads(void)
{
    return s_threads;
}

backend *backend_open(const char *server, int shards, int block, fasa_error *err)
{
    backend *b = calloc(1, sizeof(*b));
    if (!b) {
        s_fail(err, FASA_RESOURCE_EXHAUSTED, "out of memory");
        return NULL;
    }
    if (!server) {
        b->n_shards = shards;
        fasa_transport t;
        const int made = shards >= 1 && !fasa_transport_local_threads(&t, shards, s_threads);
        if (made && !(b->eng = fasa_engine_new_with(&t, block))) t.destroy(t.ctx);
        if (!b->eng) {
            free(b);
            s_fail(err, FASA_RESOURCE_EXHAUSTED, "out of memory for the embedded engine");
            return NULL;
        }
        snprintf(b->desc, sizeof(b->desc), "%d shard(s)", shards);
        return b;
    }
    fasa_client_server_info info;
    char msg[sizeof(err->msg)];
    if (!(b->cli = backend_connect(server, BACKEND_TIMEOUT_MS, &info, msg, sizeof(msg)))) {
        s_fail(err, FASA_UNAVAILABLE, "%s", msg);
        free(b);
        return NULL;
    }
    snprintf(b->desc, sizeof(b->desc), "server %s (%s, %u rank(s), %u shard(s))", server,
             info.version, info.n_ranks, info.n_shards);
    /* Ctrl-C while waiting for the server: fail the request, then clean up (drop the
     * sessions) on the way out. A second signal takes the default action. */
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = s_on_signal;
    sa.sa_flags = SA_RESETHAND;
    sigemptyset(&sa.sa_mask);
    s_interrupted = 0;
    if (sigaction(SIGINT, &sa, &b->old_int) == 0 && sigaction(SIGTERM, &sa, &b->old_term) == 0)
        b->handlers = 1;
    fasa_client_set_interrupt_flag(b->cli, &s_interrupted);
    return b;
}

static remote_session *s_find(const backend *b, const char *id)
{
    for (int i = 0; i < b->n_s; i++)
        if (strcmp(b->s[i].id, id) == 0) return &b->s[i];
    return NULL;
}

static void s_forget(backend *b, remote_session *s)
{
    free(s->len);
    *s = b->s[--b->n_s];
}

void backend_close(backend **b_p)
{
    if (!b_p || !*b_p) return;
    backend *b = *b_p;
    fasa_engine_destroy(&b->eng);
    int reachable = 1;
    for (int i = 0; i < b->n_s; i++) {
        fasa_client_error ce;
        if (reachable && fasa_client_drop_session(b->cli, b->s[i].wire_id, &ce)) {
            if (ce.code == FASA_CLIENT_UNAVAILABLE) reachable = 0;
            if (ce.code != FASA_CLIENT_NOT_FOUND)
                fprintf(stderr, "fasa: warning: could not drop session '%s' on the server: %s\n",
                        b->s[i].wire_id, ce.msg);
        }
        free(b->s[i].len);
    }
    free(b->s);
    fasa_client_close(&b->cli);
    if (b->handlers) {
        sigaction(SIGINT, &b->old_int, NULL);
        sigaction(SIGTERM, &b->old_term, NULL);
    }
    free(b);
    *b_p = NULL;
}

int backend_is_remote(const backend *b)
{
    return b && b->cli != NULL;
}

const char *backend_describe(const backend *b)
{
    return b ? b->desc : "";
}

static fasa_status s_check_remote(const backend *b, fasa_error *err)
{
    if (s_interrupted) return s_fail(err, FASA_UNAVAILABLE, "interrupted");
    (void)b;
    return FASA_OK;
}

fasa_status backend_create(backend *b, const char *id, const fasa_session_config *cfg,
                           fasa_error *err)
{
    if (b->eng) return fasa_engine_create(b->eng, id, cfg, err);
    fasa_status st;
    if ((st = s_check_remote(b, err))) return st;
    if (s_find(b, id)) return s_fail(err, FASA_ALREADY_EXISTS, "session '%s' exists", id);
    remote_session rs;
    memset(&rs, 0, sizeof(rs));
    const int n = snprintf(rs.wire_id, sizeof(rs.wire_id), "cli-%ld-%s", (long)getpid(), id);
    if (n < 0 || (size_t)n >= sizeof(rs.wire_id))
        return s_fail(err, FASA_INVALID_ARGUMENT,
                      "session id '%s' is too long once prefixed with 'cli-<pid>-'", id);
    snprintf(rs.id, sizeof(rs.id), "%s", id);
    if (cfg->n_layers < 1 || cfg->n_layers > 1024)
        return s_fail(err, FASA_INVALID_ARGUMENT, "n_layers %d must be in [1, 1024]",
                      cfg->n_layers);
    rs.geom = (fasa_client_geometry){(uint32_t)cfg->n_layers, (uint32_t)cfg->n_heads,
                                     (uint32_t)cfg->n_kv_heads, (uint32_t)cfg->head_dim};
    rs.budget = cfg->budget;
    rs.merge = cfg->merge;

    /* The profile travels as the text of its file. */
    char *text = NULL;
    size_t text_len = 0;
    if (cfg->profile) {
        FILE *f = open_memstream(&text, &text_len);
        if (!f) return s_fail(err, FASA_RESOURCE_EXHAUSTED, "out of memory for the profile");
        const int wrc = fasa_profile_write(cfg->profile, f);
        if (fclose(f) || wrc) {
            free(text);
            return s_fail(err, FASA_RESOURCE_EXHAUSTED, "cannot format the profile as text");
        }
    }
    uint32_t *dense = NULL;
    size_t n_dense = 0;
    if (cfg->dense_layers) {
        dense = malloc((size_t)cfg->n_layers * sizeof(*dense));
        if (!dense) {
            free(text);
            return s_fail(err, FASA_RESOURCE_EXHAUSTED, "out of memory");
        }
        for (int l = 0; l < cfg->n_layers; l++)
            if (cfg->dense_layers[l]) dense[n_dense++] = (uint32_t)l;
    }
    rs.len = calloc((size_t)cfg->n_layers, sizeof(*rs.len));
    if (rs.len && b->n_s == b->cap_s) {
        const int cap = 2 * b->cap_s + 4;
        remote_session *grown = realloc(b->s, (size_t)cap * sizeof(*grown));
        if (grown) {
            b->s = grown;
            b->cap_s = cap;
        }
    }
    if (!rs.len || b->n_s == b->cap_s) {
        free(text);
        free(dense);
        free(rs.len);
        return s_fail(err, FASA_RESOURCE_EXHAUSTED, "out of memory");
    }
    fasa_client_session_config cc = {
        .geom = rs.geom,
        .pairing = cfg->pairing == FC_PAIRING_HALF ? FASA_CLIENT_PAIRING_HALF
                                                   : FASA_CLIENT_PAIRING_INTERLEAVED,
        .profile_text = text,
        .method = (fasa_client_method)(cfg->method + 1),
        .budget = (uint32_t)cfg->budget,
        .gqa = cfg->gqa == FASA_GQA_SHARED ? FASA_CLIENT_GQA_SHARED : FASA_CLIENT_GQA_PER_HEAD,
        .dense_layers_set = cfg->dense_layers != NULL,
        .dense_layers = dense,
        .n_dense_layers = n_dense,
        .dtype = (fasa_client_dtype)(cfg->dtype + 1),
        .score_dtype = (fasa_client_dtype)cfg->score_dtype, /* scan_dtype: the wire's numbers */

        /* The server keeps a disk-tier session's files in its own --tier-dir. */
        .tier = cfg->tier == SHARD_TIER_DISK ? 2 : 0,
        .merge =
            cfg->merge == FASA_MERGE_LOCAL ? FASA_CLIENT_MERGE_LOCAL : FASA_CLIENT_MERGE_DEFAULT};
    fasa_client_error ce;
    const fasa_client_status cst = fasa_client_create_session(b->cli, rs.wire_id, &cc, NULL, &ce);
    free(text);
    free(dense);
    if (cst) {
        free(rs.len);
        return s_from_client(&ce, err);
    }
    b->s[b->n_s++] = rs;
    return FASA_OK;
}

int backend_set_merge_eps(backend *b, double eps)
{
    return b->eng ? fasa_engine_set_merge_eps(b->eng, eps) : -1;
}

fasa_status backend_drop(backend *b, const char *id, fasa_error *err)
{
    if (b->eng) return fasa_engine_drop(b->eng, id, err);
    fasa_status st;
    if ((st = s_check_remote(b, err))) return st;
    remote_session *s = s_find(b, id);
    if (!s) return s_fail(err, FASA_NOT_FOUND, "no session '%s'", id);
    fasa_client_error ce;
    if (fasa_client_drop_session(b->cli, s->wire_id, &ce)) return s_from_client(&ce, err);
    s_forget(b, s);
    return FASA_OK;
}

fasa_status backend_append(backend *b, const char *id, int layer, int32_t pos0, int n,
                           const float *k, const float *v, fasa_error *err)
{
    if (b->eng) return fasa_engine_append(b->eng, id, layer, pos0, n, k, v, err);
    fasa_status st;
    if ((st = s_check_remote(b, err))) return st;
    remote_session *s = s_find(b, id);
    if (!s) return s_fail(err, FASA_NOT_FOUND, "no session '%s'", id);
    if (layer < -1 || layer >= (int)s->geom.n_layers)
        return s_fail(err, FASA_INVALID_ARGUMENT, "layer %d of a session with %u layers", layer,
                      s->geom.n_layers);
    if (n < 0 || pos0 < 0) return s_fail(err, FASA_INVALID_ARGUMENT, "append %d at %d", n, pos0);
    fasa_client_error ce;
    if (fasa_client_append(b->cli, s->wire_id, &s->geom, layer, (uint64_t)pos0, (uint64_t)n, k, v,
                           NULL, &ce))
        return s_from_client(&ce, err);
    for (int l = 0; l < (int)s->geom.n_layers; l++)
        if (layer < 0 || l == layer) s->len[l] = pos0 + n;
    return FASA_OK;
}

fasa_status backend_attend(backend *b, const char *id, const fasa_attend_req *req, float *out,
                           int32_t *selected, fasa_step_stats *stats, fasa_error *err)
{
    if (b->eng) return fasa_engine_attend(b->eng, id, req, out, selected, stats, err);
    fasa_status st;
    if ((st = s_check_remote(b, err))) return st;
    remote_session *s = s_find(b, id);
    if (!s) return s_fail(err, FASA_NOT_FOUND, "no session '%s'", id);
    if (req->layer < 0 || req->layer >= (int)s->geom.n_layers)
        return s_fail(err, FASA_INVALID_ARGUMENT, "layer %d of a session with %u layers",
                      req->layer, s->geom.n_layers);
    if (req->budget < 0) return s_fail(err, FASA_INVALID_ARGUMENT, "budget %d", req->budget);
    fasa_client_step_stats cs;
    fasa_client_attend_req r = FASA_CLIENT_ATTEND_REQ_INIT;
    r.session_id = s->wire_id;
    r.geom = s->geom;
    r.layer = (uint32_t)req->layer;
    r.q = req->q;
    r.k_new = req->k_new;
    r.v_new = req->v_new;
    r.method = req->method < 0 ? FASA_CLIENT_METHOD_DEFAULT : (fasa_client_method)(req->method + 1);
    r.budget = (uint32_t)req->budget;
    r.gqa = req->gqa < 0 ? FASA_CLIENT_GQA_DEFAULT : (fasa_client_gqa)(req->gqa + 1);
    r.max_pos = req->max_pos;
    /* The engine's merge (0 exact in a zeroed request), sent only where it is not the
     * session's own. */
    if (req->merge >= 0 && req->merge != s->merge)
        r.merge =
            req->merge == FASA_MERGE_LOCAL ? FASA_CLIENT_MERGE_LOCAL : FASA_CLIENT_MERGE_EXACT;
    r.out = out;
    r.selected = selected;
    r.selected_budget = (uint32_t)(req->budget > 0 ? req->budget : s->budget);
    r.stats = &cs;
    fasa_client_error ce;
    if (fasa_client_attend(b->cli, &r, &ce)) return s_from_client(&ce, err);
    if (req->k_new) s->len[req->layer]++;
    if (stats) {
        stats->method_used =
            cs.method_used >= FASA_CLIENT_METHOD_FASA ? (int)cs.method_used - 1 : FASA_METHOD_DENSE;
        stats->n_visible = (int)cs.n_visible;
        stats->bytes_read = (int64_t)cs.bytes_read;
    }
    return FASA_OK;
}

int backend_ram_bytes(backend *b, const char *id, int64_t *out)
{
    if (!b->eng) { /* a server: its ranks' alloc_bytes for the session, from Stats */
        const remote_session *s = s_find(b, id);
        fasa_client_stats st;
        fasa_client_error ce;
        if (!s || fasa_client_get_stats(b->cli, s->wire_id, &st, &ce)) return -1;
        int rc = st.has_session ? 0 : -1;
        *out = 0;
        for (size_t i = 0; !rc && i < st.session.n_rank_stats; i++)
            *out += (int64_t)st.session.rank_stats[i].alloc_bytes;
        fasa_client_stats_free(&st);
        return rc;
    }
    if (b->n_shards < 1) return -1;
    fasa_shard_stats *st = calloc((size_t)b->n_shards, sizeof(*st));
    fasa_error err;
    if (!st || fasa_engine_shard_stats(b->eng, id, st, &err)) {
        free(st);
        return -1;
    }
    *out = 0;
    for (int i = 0; i < b->n_shards; i++) *out += st[i].alloc_bytes;
    free(st);
    return 0;
}

int32_t backend_length(const backend *b, const char *id, int layer)
{
    if (b->eng) return fasa_engine_length(b->eng, id, layer);
    const remote_session *s = s_find(b, id);
    if (!s || layer < 0 || layer >= (int)s->geom.n_layers) return -1;
    return s->len[layer];
}

int64_t backend_kv_bytes(backend *b, const char *id, fasa_error *err)
{
    if (b->eng) {
        const int64_t n = fasa_engine_kv_bytes(b->eng, id);
        if (n < 0) s_fail(err, FASA_NOT_FOUND, "no session '%s'", id);
        return n;
    }
    const remote_session *s = s_find(b, id);
    if (!s) return s_fail(err, FASA_NOT_FOUND, "no session '%s'", id), -1;
    fasa_client_stats st;
    fasa_client_error ce;
    const fasa_client_status cst = fasa_client_get_stats(b->cli, s->wire_id, &st, &ce);
    const int64_t n = cst || !st.has_session ? -1 : (int64_t)st.session.kv_bytes;
    fasa_client_stats_free(&st);
    if (cst)
        s_from_client(&ce, err);
    else if (n < 0)
        s_fail(err, FASA_INTERNAL, "the server's stats lack session '%s'", id);
    return n;
}

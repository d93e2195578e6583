/* Requests to engine calls and back. See service.h. */
#include "service.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "calib.h"
#include "edge.h"
#include "reply.h"
#include "fasa.pb-c.h"
#include "load.h"
#include "log.h"
#include "scan.h"
#include "simd.h"
#include "snapshot.h"
#include "wal.h"

#define VERSION_STRING "fasa-server 0.1.0"
/* Calibration cost bound: multiply-adds of the sample positions' score rows. */
#define MAX_CALIB_WORK 8e9

/* Step times per method for Stats: a log-bucket histogram of bounded size. Bucket 0 holds
 * [0, 1) us, bucket b >= 1 holds [G^(b-1), G^b) us with G = LAT_GROWTH (4% wide, so the
 * geometric middle of a bucket is within 2% of any value in it), the last one everything
 * above (G^638 us is about 7.4e10 us, 20 hours). */
#define LAT_BUCKETS 640
#define LAT_GROWTH 1.04

typedef struct lat_hist {
    uint64_t count;
    double sum, min, max; /* microseconds, exact */
    uint64_t bucket[LAT_BUCKETS];
} lat_hist;

typedef struct named_profile {
    char name[EDGE_MAX_ID + 1];
    fasa_profile *profile;
} named_profile;

struct fasa_service {
    fasa_engine_t *engine;
    int n_ranks, n_shards;
    size_t max_message;
    int max_sessions;
    uint32_t deadline_ms;   /* default queue deadline, 0 = none */
    int tier, has_tier_dir; /* fasa_service_opts */
    char load_root[4096];   /* LoadSession's directory ("" = no loads) */
    double waited_ms;       /* of the next request (fasa_service_set_wait) */
    double t_handle;        /* when fasa_service_handle began the request in hand */
    struct timespec start;
    uint64_t requests, errors, steps;
    named_profile profiles[FASA_SERVICE_MAX_PROFILES];
    int n_profiles;
    /* Stats: requests by edge_kind (0: undecodable), responses and batch items by status,
     * batch items received, step times by fasa_method; the per-rank holdings' buffers. */
    uint64_t by_kind[EDGE_KIND_LAST + 1], by_code[FASA_UNAVAILABLE + 1], batch_items;
    lat_hist lat[FASA_METHOD_LAST + 1];
    fasa_shard_stats *shard_buf;                 /* (n_shards) */
    Fasa__V1__RankStats *rank_msgs, **rank_ptrs; /* (2 x s_rank_entries): all, then session */
    fasa_service_event last;
    char last_session[EDGE_MAX_ID + 1];
    /* Snapshots: the state dir ("" = none) and each session's engine revision when it was
     * last written (fasa_engine_revision), so the interval writes only what changed. */
    char state_dir[4096];
    struct snap_rev {
        char id[EDGE_MAX_ID + 1];
        uint64_t rev;
    } * revs;
    int n_revs, cap_revs;
    int profiles_dirty; /* a named profile changed since they were last saved */
    fasa_wal_mode wal;  /* the write-ahead log of appends (wal.h), with a state dir */
    /* Sessions a restore refused, so requests for them say why instead of NOT_FOUND (until
     * a session of that id is created). */
    struct refused_session {
        char id[EDGE_MAX_ID + 1];
        char why[200];
    } * refused;
    int n_refused;
    /* A single Attend's memory, reused from request to request (grow-only): the decoded
     * request (edge.h's arena), the outputs, k_new/v_new widened to f32. */
    edge_arena *arena;
    float *one_o, *one_knew;
    int32_t *one_sel;
    size_t cap_o, cap_knew, cap_sel;
};

void fasa_service_set_wait(fasa_service *s, double waited_ms)
{
    s->waited_ms = waited_ms > 0 ? waited_ms : 0;
}

const fasa_service_event *fasa_service_last_event(const fasa_service *s)
{
    return &s->last;
}

static const char *s_kind_name(int kind)
{
    static const char *const names[] = {
        "undecodable",  "ping",      "create_session", "append",         "attend",
        "batch_attend", "calibrate", "set_profile",    "drop_session",   "stats",
        "shutdown",     "snapshot",  "list_sessions",  "delete_profile", "load_session"};
    return kind >= 0 && kind <= EDGE_KIND_LAST ? names[kind] : "undecodable";
}

/* The session a decoded request names, or "". */
static const char *s_session_of(const edge_request *q)
{
    const char *id = NULL;
    switch (q->kind) {
    case EDGE_CREATE:
        id = q->u.create.session_id;
        break;
    case EDGE_APPEND:
        id = q->u.append.session_id;
        break;
    case EDGE_ATTEND:
        id = q->u.attend.session_id;
        break;
    case EDGE_BATCH_ATTEND:
        id = q->u.batch.n ? q->u.batch.items[0].session_id : NULL;
        break;
    case EDGE_SET_PROFILE:
        id = q->u.set_profile.session_id;
        break;
    case EDGE_DROP:
    case EDGE_STATS:
        id = q->u.session_id;
        break;
    case EDGE_SNAPSHOT:
        id = q->u.snapshot.session_id;
        break;
    case EDGE_DELETE_PROFILE:
        id = q->u.profile_name; /* the log names the profile */
        break;
    case EDGE_LOAD_SESSION:
        id = q->u.load.session_id;
        break;
    default:
        break;
    }
    return id ? id : "";
}

/* What one handler produced: a status, a message, and the response body it filled. */
typedef struct reply {
    fasa_status code;
    char msg[320];
    Fasa__V1__Response *resp;
} reply;

static fasa_status s_fail(reply *r, fasa_status code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static fasa_status s_fail(reply *r, fasa_status code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(r->msg, sizeof(r->msg), fmt, ap);
    va_end(ap);
    r->code = code;
    return code;
}

static void s_rev_note(fasa_service *s, const char *id);

/* Makes an append the engine applied durable before its reply: a record in the session's
 * write-ahead log (wal.h), or, when that cannot be written, a snapshot of the session. 0,
 * or -1 (logged) when neither could be written. */
static int s_wal_log(fasa_service *s, const char *id, int layer, int32_t pos0, int n,
                     const float *k, const float *v)
{
    if (s->wal == FASA_WAL_OFF) return 0;
    const fasa_session_config *c = fasa_engine_config(s->engine, id);
    if (!c) return 0;
    if (!fasa_wal_append(s->state_dir, s->wal, id, layer, c->n_layers, pos0, n,
                         c->n_kv_heads * c->head_dim, k, v))
        return 0;
    const int e = errno;
    fasa_error fe;
    if (fasa_snapshot_session(s->engine, s->state_dir, id, NULL, &fe) == FASA_OK) {
        fasa_log(FASA_LOG_WARN, 0,
                 "wal: session %s: cannot log an append (%s); wrote a snapshot instead", id,
                 strerror(e));
        s_rev_note(s, id);
        return 0;
    }
    fasa_log(FASA_LOG_ERROR, 0,
             "wal: session %s: neither the log (%s) nor a snapshot (%s) could be written: what "
             "was appended since its last snapshot is lost if the server dies",
             id, strerror(e), fe.msg);
    return -1;
}

/* s_wal_log of an append sent as dtype (n elements in each of k and v): the log holds
 * f32, so F16 and BF16 are widened for it (exactly: a replay stores the same bits). */
static int s_wal_log_dt(fasa_service *s, const char *id, int layer, int32_t pos0, int n, int dtype,
                        const void *k, const void *v, size_t elems)
{
    if (s->wal == FASA_WAL_OFF || dtype == FASA_DTYPE_F32)
        return s_wal_log(s, id, layer, pos0, n, k, v);
    float *w = malloc(2 * elems * sizeof(float));
    if (!w) { /* no room to widen: a snapshot holds the rows instead */
        fasa_error fe;
        if (fasa_snapshot_session(s->engine, s->state_dir, id, NULL, &fe) != FASA_OK) return -1;
        s_rev_note(s, id);
        return 0;
    }
    dtype_to_f32(SIMD_AUTO, dtype, elems, k, w);
    dtype_to_f32(SIMD_AUTO, dtype, elems, v, w + elems);
    const int rc = s_wal_log(s, id, layer, pos0, n, w, w + elems);
    free(w);
    return rc;
}

/* A snapshot of a session whose state the log cannot describe (a new one, a new profile,
 * a step that failed after its k_new was appended), so that its log starts from it. */
static void s_wal_rebase(fasa_service *s, const char *id)
{
    if (s->wal == FASA_WAL_OFF) return;
    fasa_error fe;
    if (fasa_snapshot_session(s->engine, s->state_dir, id, NULL, &fe) == FASA_OK)
        s_rev_note(s, id);
    else
        fasa_log(FASA_LOG_ERROR, 0, "wal: session %s: snapshot: %s", id, fe.msg);
}

/* The k_new rows of m steps that ran (codes: their statuses; kpos: each step's layer
 * length before the request), logged in order. A session with a failed step that had a
 * k_new (it may or may not have been appended) is snapshotted instead. */
static void s_wal_k_new(fasa_service *s, int m, const char *const *ids, const fasa_attend_req *reqs,
                        const fasa_error *errs, const int32_t *kpos)
{
    if (s->wal == FASA_WAL_OFF) return;
    for (int i = 0; i < m; i++) {
        if (!reqs[i].k_new) continue;
        int failed = 0, ord = 0, first = 1;
        for (int j = 0; j < m; j++) {
            if (!reqs[j].k_new || strcmp(ids[j], ids[i])) continue;
            if (j < i) first = 0;
            if (errs[j].code) failed = 1;
            if (j < i && reqs[j].layer == reqs[i].layer) ord++;
        }
        if (failed) {
            if (first) s_wal_rebase(s, ids[i]);
            continue;
        }
        s_wal_log(s, ids[i], reqs[i].layer, kpos[i] + ord, 1, reqs[i].k_new, reqs[i].v_new);
    }
}

static double s_now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* Whether shard i lives on rank i + 1 (a multi-rank server); otherwise every shard is in
 * rank 0 (one rank, or the embedded engine). */
static int s_on_workers(const fasa_service *s)
{
    return s->n_ranks >= 2 && s->n_shards == s->n_ranks - 1;
}

/* Entries of StatsResult.rank_stats (and SessionInfo.rank_stats). */
static int s_rank_entries(const fasa_service *s)
{
    return s_on_workers(s) ? s->n_ranks : 1;
}

fasa_service *fasa_service_new(fasa_engine_t **engine_p, int n_shards, const fasa_service_opts *o)
{
    fasa_service *s = calloc(1, sizeof(*s));
    if (!s) return NULL;
    s->engine = *engine_p;
    s->n_ranks = o->n_ranks;
    s->n_shards = n_shards;
    const size_t n_rank_msgs = 2 * (size_t)s_rank_entries(s);
    s->shard_buf = calloc((size_t)(n_shards > 0 ? n_shards : 1), sizeof(*s->shard_buf));
    s->rank_msgs = calloc(n_rank_msgs, sizeof(*s->rank_msgs));
    s->rank_ptrs = calloc(n_rank_msgs, sizeof(*s->rank_ptrs));
    if (!s->shard_buf || !s->rank_msgs || !s->rank_ptrs) {
        free(s->shard_buf);
        free(s->rank_msgs);
        free(s->rank_ptrs);
        free(s);
        return NULL;
    }
    s->max_message = o->max_message ? o->max_message : EDGE_DEFAULT_MAX_MESSAGE;
    s->deadline_ms = o->deadline_ms;
    s->tier = o->tier;
    s->has_tier_dir = o->has_tier_dir;
    snprintf(s->load_root, sizeof(s->load_root), "%s", o->load_root ? o->load_root : "");
    s->max_sessions = o->max_sessions > 0 && o->max_sessions < FASA_SERVICE_MAX_SESSIONS
                          ? o->max_sessions
                          : FASA_SERVICE_MAX_SESSIONS;
    if (o->state_dir) snprintf(s->state_dir, sizeof(s->state_dir), "%.3000s", o->state_dir);
    s->wal = *s->state_dir ? o->wal : FASA_WAL_OFF;
    clock_gettime(CLOCK_MONOTONIC, &s->start);
    *engine_p = NULL; /* the service's now */
    return s;
}

void fasa_service_destroy(fasa_service **service_p)
{
    fasa_service *s = service_p ? *service_p : NULL;
    if (!s) return;
    fasa_engine_destroy(&s->engine);
    for (int i = 0; i < s->n_profiles; i++) fasa_profile_destroy(&s->profiles[i].profile);
    free(s->shard_buf);
    free(s->rank_msgs);
    free(s->rank_ptrs);
    free(s->revs);
    free(s->refused);
    edge_arena_destroy(&s->arena);
    free(s->one_o);
    free(s->one_knew);
    free(s->one_sel);
    free(s);
    *service_p = NULL;
}

/* Proto enums to engine values; 0 (unspecified) becomes -1, the session default. */
static int s_method(int m)
{
    return m == FASA__V1__METHOD__FASA        ? FASA_METHOD_FASA
           : m == FASA__V1__METHOD__DENSE     ? FASA_METHOD_DENSE
           : m == FASA__V1__METHOD__ORACLE    ? FASA_METHOD_ORACLE
           : m == FASA__V1__METHOD__STREAM    ? FASA_METHOD_STREAM
           : m == FASA__V1__METHOD__QUEST     ? FASA_METHOD_QUEST
           : m == FASA__V1__METHOD__SPARQ     ? FASA_METHOD_SPARQ
           : m == FASA__V1__METHOD__FASA_PLUS ? FASA_METHOD_FASA_PLUS
                                              : -1;
}

static Fasa__V1__Method s_method_out(int m)
{
    return m == FASA_METHOD_FASA        ? FASA__V1__METHOD__FASA
           : m == FASA_METHOD_DENSE     ? FASA__V1__METHOD__DENSE
           : m == FASA_METHOD_STREAM    ? FASA__V1__METHOD__STREAM
           : m == FASA_METHOD_QUEST     ? FASA__V1__METHOD__QUEST
           : m == FASA_METHOD_SPARQ     ? FASA__V1__METHOD__SPARQ
           : m == FASA_METHOD_FASA_PLUS ? FASA__V1__METHOD__FASA_PLUS
                                        : FASA__V1__METHOD__ORACLE;
}

static int s_gqa(int g)
{
    return g == FASA__V1__GQA__PER_HEAD ? FASA_GQA_PER_HEAD
           : g == FASA__V1__GQA__SHARED ? FASA_GQA_SHARED
                                        : -1;
}

static fc_pairing s_pairing(int p)
{
    return p == FASA__V1__PAIRING__HALF ? FC_PAIRING_HALF : FC_PAIRING_INTERLEAVED;
}

static named_profile *s_find_profile(fasa_service *s, const char *name)
{
    for (int i = 0; i < s->n_profiles; i++)
        if (strcmp(s->profiles[i].name, name) == 0) return &s->profiles[i];
    return NULL;
}

/* The profile a request names: parsed from its text (caller owns *owned_p) or borrowed from
 * the store. NULL, with r set, when neither works; NULL with r OK when none was given. */
static const fasa_profile *s_profile_of(fasa_service *s, const char *text, const char *name,
                                        const char *field, fasa_profile **owned_p, reply *r)
{
    *owned_p = NULL;
    if (name) {
        named_profile *np = s_find_profile(s, name);
        if (!np) s_fail(r, FASA_NOT_FOUND, "%s.profile_name '%s' is not stored here", field, name);
        return np ? np->profile : NULL;
    }
    if (!text) return NULL;
    const size_t len = strlen(text);
    FILE *f = fmemopen((void *)text, len ? len : 1, "r");
    if (!f) {
        s_fail(r, FASA_RESOURCE_EXHAUSTED, "%s.profile_text: out of memory", field);
        return NULL;
    }
    char err[256], what[64];
    snprintf(what, sizeof(what), "%s.profile_text", field);
    *owned_p = fasa_profile_read(f, what, len / 2, err, sizeof(err));
    fclose(f);
    if (!*owned_p) s_fail(r, FASA_INVALID_ARGUMENT, "%s", err);
    return *owned_p;
}

static fasa_status s_create(fasa_service *s, const edge_create *c, reply *r)
{
    if (fasa_engine_count(s->engine) >= s->max_sessions &&
        !fasa_engine_config(s->engine, c->session_id))
        return s_fail(r, FASA_RESOURCE_EXHAUSTED,
                      "create_session: the server holds its limit of %d sessions (--max-sessions)",
                      s->max_sessions);
    /* The tier: as asked, else the server's; disk needs the server's --tier-dir. */
    const int tier = c->tier == FASA__V1__TIER__DISK  ? SHARD_TIER_DISK
                     : c->tier == FASA__V1__TIER__RAM ? SHARD_TIER_RAM
                     : s->tier                        ? SHARD_TIER_DISK
                                                      : SHARD_TIER_RAM;
    if (tier == SHARD_TIER_DISK && !s->has_tier_dir)
        return s_fail(r, FASA_FAILED_PRECONDITION,
                      "create_session.tier: DISK needs a server started with --tier-dir DIR");
    fasa_profile *owned;
    const fasa_profile *prof =
        s_profile_of(s, c->profile_text, c->profile_name, "create_session", &owned, r);
    if (r->code) return r->code;
    uint8_t *dense = NULL;
    if (c->has_dense_layers) {
        if (!(dense = calloc((size_t)c->n_layers, 1))) {
            fasa_profile_destroy(&owned);
            return s_fail(r, FASA_RESOURCE_EXHAUSTED, "create_session: out of memory");
        }
        for (int i = 0; i < c->n_dense_layers; i++) dense[c->dense_layers[i]] = 1;
    }
    const int method = s_method(c->method), gqa = s_gqa(c->gqa);
    fasa_session_config cfg = {.n_layers = c->n_layers,
                               .n_heads = c->n_heads,
                               .n_kv_heads = c->n_kv_heads,
                               .head_dim = c->head_dim,
                               .pairing =
                                   prof && !c->pairing ? prof->pairing : s_pairing(c->pairing),
                               .profile = prof,
                               .method = method >= 0 ? (fasa_method)method
                                         : prof      ? FASA_METHOD_FASA
                                                     : FASA_METHOD_DENSE,
                               .budget = c->budget ? c->budget : 256,
                               .gqa = gqa >= 0 ? (fasa_gqa)gqa : FASA_GQA_PER_HEAD,
                               .dense_layers = dense,
                               .dtype = c->dtype,
                               .score_dtype = c->score_dtype,
                               .merge = c->merge == 2 ? FASA_MERGE_LOCAL : FASA_MERGE_EXACT,
                               .tier = tier};
    fasa_error fe;
    fasa_status st = fasa_engine_create(s->engine, c->session_id, &cfg, &fe);
    free(dense);
    fasa_profile_destroy(&owned);
    if (st) return s_fail(r, st, "create_session: %s", fe.msg);
    s_wal_rebase(s, c->session_id); /* its log starts from a manifest */
    static Fasa__V1__CreateSessionResult res;
    fasa__v1__create_session_result__init(&res);
    res.n_shards = (uint32_t)s->n_shards;
    r->resp->body_case = FASA__V1__RESPONSE__BODY_CREATE_SESSION;
    r->resp->create_session = &res;
    return FASA_OK;
}

static fasa_status s_shape_err(reply *r, const char *field, const edge_tensor *t, const char *want,
                               const char *id)
{
    char dims[96];
    size_t o = 0;
    for (int i = 0; i < t->rank; i++)
        o += (size_t)snprintf(dims + o, sizeof(dims) - o, "%s%lld", i ? ", " : "",
                              (long long)t->shape[i]);
    return s_fail(r, FASA_INVALID_ARGUMENT, "%s.shape [%s] must be %s of session '%s'", field, dims,
                  want, id);
}

static fasa_status s_append(fasa_service *s, const edge_append *a, reply *r)
{
    const fasa_session_config *c = fasa_engine_config(s->engine, a->session_id);
    if (!c)
        return s_fail(r, FASA_NOT_FOUND, "append.session_id: session '%s' not found",
                      a->session_id);
    if (a->layer >= c->n_layers)
        return s_fail(r, FASA_INVALID_ARGUMENT,
                      "append.layer %d out of range [-1, %d) for session '%s'", a->layer,
                      c->n_layers, a->session_id);
    const int off = a->layer < 0 ? 1 : 0;
    const int64_t *sh = a->k.shape;
    if ((off && sh[0] != c->n_layers) || sh[off + 1] != c->n_kv_heads ||
        sh[off + 2] != c->head_dim) {
        char want[96];
        if (off)
            snprintf(want, sizeof(want), "[n_layers %d, n, n_kv_heads %d, head_dim %d]",
                     c->n_layers, c->n_kv_heads, c->head_dim);
        else
            snprintf(want, sizeof(want), "[n, n_kv_heads %d, head_dim %d]", c->n_kv_heads,
                     c->head_dim);
        return s_shape_err(r, "append.k", &a->k, want, a->session_id);
    }
    const int32_t have = fasa_engine_length(s->engine, a->session_id, a->layer < 0 ? 0 : a->layer);
    if (a->start_pos != have)
        return s_fail(r, FASA_INVALID_ARGUMENT,
                      "append.start_pos %lld: session '%s' layer %d expects position %d next "
                      "(appends are contiguous and in order)",
                      (long long)a->start_pos, a->session_id, a->layer < 0 ? 0 : a->layer,
                      (int)have);
    /* The one pass over the values (the edge leaves it to here, where the session's dtype
     * is known): not finite, at least 2^50, or overflowing the session's dtype. */
    fasa_error fe;
    const edge_tensor *kv[2] = {&a->k, &a->v};
    for (int t = 0; t < 2; t++) {
        const long bad = fasa_engine_bad_value(kv[t]->dtype, c->dtype, kv[t]->n, kv[t]->raw);
        if (bad < 0) continue;
        const char *name = t ? "v" : "k";
        if (kv[t]->dtype == FASA_DTYPE_F32) {
            const float x = ((const float *)kv[t]->raw)[bad];
            if (!isfinite(x))
                return s_fail(r, FASA_INVALID_ARGUMENT, "append.%s[%ld] is %s", name, bad,
                              isnan(x) ? "NaN" : "infinite");
        } else {
            const uint16_t h = ((const uint16_t *)kv[t]->raw)[bad];
            const uint16_t em = kv[t]->dtype == FASA_DTYPE_F16 ? 0x7c00u : 0x7f80u;
            if ((h & em) == em)
                return s_fail(r, FASA_INVALID_ARGUMENT, "append.%s[%ld] is %s", name, bad,
                              (h & (em ^ 0x7fffu)) ? "NaN" : "infinite");
        }
        const fasa_status vs =
            fasa_engine_value_error(&fe, name, bad, kv[t]->dtype, c->dtype, kv[t]->raw);
        return s_fail(r, vs, "append: %s", fe.msg);
    }
    const fasa_status st =
        fasa_engine_append_checked(s->engine, a->session_id, a->layer, (int32_t)a->start_pos,
                                   (int)sh[off], a->k.dtype, a->k.raw, a->v.raw, &fe);
    if (st) return s_fail(r, st, "append: %s", fe.msg);
    if (s_wal_log_dt(s, a->session_id, a->layer, (int32_t)a->start_pos, (int)sh[off], a->k.dtype,
                     a->k.raw, a->v.raw, a->k.n))
        return s_fail(r, FASA_INTERNAL,
                      "append: applied, but neither the write-ahead log nor a snapshot could be "
                      "written in the state dir (see the server log)");
    static Fasa__V1__AppendResult res;
    fasa__v1__append_result__init(&res);
    res.length =
        (uint64_t)fasa_engine_length(s->engine, a->session_id, a->layer < 0 ? 0 : a->layer);
    r->resp->body_case = FASA__V1__RESPONSE__BODY_APPEND;
    r->resp->append = &res;
    return FASA_OK;
}

static void s_lat_add(lat_hist *h, double us)
{
    if (!(us >= 0)) us = 0;
    int b = 0;
    if (us >= 1) {
        const double x = floor(log(us) / log(LAT_GROWTH));
        b = x >= LAT_BUCKETS - 2 ? LAT_BUCKETS - 1 : 1 + (int)x;
    }
    h->bucket[b]++;
    if (h->count == 0 || us < h->min) h->min = us;
    if (us > h->max) h->max = us;
    h->count++;
    h->sum += us;
}

/* The nearest-rank q-quantile: the geometric middle of the bucket holding the
 * ceil(q x count)-th smallest time, kept within [min, max]; 0 when empty. */
static double s_lat_quantile(const lat_hist *h, double q)
{
    if (h->count == 0) return 0;
    uint64_t rank = (uint64_t)ceil(q * (double)h->count), seen = 0;
    if (rank < 1) rank = 1;
    int b = 0;
    while (b < LAT_BUCKETS - 1 && (seen += h->bucket[b]) < rank) b++;
    const double est = b == 0 ? 0.5 : pow(LAT_GROWTH, b - 0.5);
    return est < h->min ? h->min : est > h->max ? h->max : est;
}

/* The result of one Attend, with its own buffers (freed by s_attend_free). */
typedef struct attend_out {
    Fasa__V1__AttendResult res;
    Fasa__V1__Tensor out, sel;
    Fasa__V1__StepStats stats;
    uint64_t out_shape[2], sel_shape[2];
    float *o;
    int32_t *selected;
    /* Between s_attend_prepare and s_attend_finish: */
    fasa_attend_req req;
    const fasa_session_config *cfg;
    int budget;
    size_t out_bytes;
    int32_t kpos;     /* the layer's length before the request (for the log of k_new) */
    double decode_us; /* from the request's start to the engine call (single Attend) */
    float *knew;      /* k_new and v_new sent as F16 or BF16, widened to f32 (exact) */
    int borrowed;     /* o, selected and knew are the service's own (s_attend_mem) */
} attend_out;

static void s_attend_free(attend_out *a)
{
    if (!a->borrowed) {
        free(a->o);
        free(a->selected);
        free(a->knew);
    }
    a->o = NULL;
    a->selected = NULL;
    a->knew = NULL;
}

static int s_grow_mem(void **buf, size_t *cap, size_t bytes)
{
    if (bytes <= *cap) return 0;
    void *p = malloc(bytes);
    if (!p) return -1;
    free(*buf);
    *buf = p;
    *cap = bytes;
    return 0;
}

/* A single Attend's outputs in the service's own buffers, which only grow (the reply is
 * packed before the next request reuses them). 0, or -1 when memory is short. */
static int s_attend_mem(fasa_service *s, attend_out *ao, size_t o_n, size_t sel_n, size_t kn_n)
{
    if (s_grow_mem((void **)&s->one_o, &s->cap_o, o_n * sizeof(float)) ||
        (sel_n && s_grow_mem((void **)&s->one_sel, &s->cap_sel, sel_n * sizeof(int32_t))) ||
        (kn_n && s_grow_mem((void **)&s->one_knew, &s->cap_knew, kn_n * sizeof(float))))
        return -1;
    ao->o = s->one_o;
    ao->selected = sel_n ? s->one_sel : NULL;
    ao->knew = kn_n ? s->one_knew : NULL;
    ao->borrowed = 1;
    return 0;
}

/* reply_left: bytes the reply may still grow by; the step's outputs are charged to it. */
/* The service's checks of one Attend (against its session) and its outputs' memory (the
 * service's own with reuse: a single Attend); ao->req is then the engine's request. */
static fasa_status s_attend_prepare(fasa_service *s, const edge_attend *a, const char *field,
                                    attend_out *ao, const size_t *reply_left, int reuse, reply *r)
{
    const fasa_session_config *c = fasa_engine_config(s->engine, a->session_id);
    if (!c)
        return s_fail(r, FASA_NOT_FOUND, "%s.session_id: session '%s' not found", field,
                      a->session_id);
    if (a->layer >= c->n_layers)
        return s_fail(r, FASA_INVALID_ARGUMENT, "%s.layer %d out of range [0, %d) for session '%s'",
                      field, a->layer, c->n_layers, a->session_id);
    char f[96], want[64];
    if (a->q.shape[0] != c->n_heads || a->q.shape[1] != c->head_dim) {
        snprintf(f, sizeof(f), "%s.q", field);
        snprintf(want, sizeof(want), "[n_heads %d, head_dim %d]", c->n_heads, c->head_dim);
        return s_shape_err(r, f, &a->q, want, a->session_id);
    }
    if (a->k_new.rank && (a->k_new.shape[0] != c->n_kv_heads || a->k_new.shape[1] != c->head_dim)) {
        snprintf(f, sizeof(f), "%s.k_new", field);
        snprintf(want, sizeof(want), "[n_kv_heads %d, head_dim %d]", c->n_kv_heads, c->head_dim);
        return s_shape_err(r, f, &a->k_new, want, a->session_id);
    }
    const int budget = a->budget ? a->budget : c->budget;
    const size_t out_bytes =
        (size_t)c->n_heads * c->head_dim * sizeof(float) +
        (a->return_selected ? (size_t)c->n_heads * budget * sizeof(int32_t) : 0) + 256;
    if (out_bytes > *reply_left)
        return s_fail(r, FASA_RESOURCE_EXHAUSTED,
                      "%s: the reply would exceed %zu bytes (n_heads x budget selected "
                      "positions%s); ask for fewer",
                      field, s->max_message, a->return_selected ? " with return_selected" : "");
    memset(ao, 0, sizeof(*ao));
    const size_t kn = a->k_new.rank && a->k_new.dtype ? a->k_new.n : 0;
    const size_t o_n = (size_t)c->n_heads * c->head_dim;
    const size_t sel_n = a->return_selected ? (size_t)c->n_heads * budget : 0;
    if (reuse) {
        if (s_attend_mem(s, ao, o_n, sel_n, 2 * kn))
            return s_fail(r, FASA_RESOURCE_EXHAUSTED, "%s: out of memory for the outputs", field);
    } else {
        ao->o = malloc(o_n * sizeof(float));
        if (sel_n) ao->selected = malloc(sel_n * sizeof(int32_t));
        if (kn) ao->knew = malloc(2 * kn * sizeof(float));
    }
    if (!ao->o || (a->return_selected && !ao->selected) || (kn && !ao->knew)) {
        s_attend_free(ao);
        return s_fail(r, FASA_RESOURCE_EXHAUSTED, "%s: out of memory for the outputs", field);
    }
    if (kn) { /* one row: widened (exactly), it is stored as the same bits as sent */
        dtype_to_f32(SIMD_AUTO, a->k_new.dtype, kn, a->k_new.raw, ao->knew);
        dtype_to_f32(SIMD_AUTO, a->v_new.dtype, kn, a->v_new.raw, ao->knew + kn);
    }
    ao->req = (fasa_attend_req){.layer = a->layer,
                                .q = a->q.data,
                                .k_new = !a->k_new.rank ? NULL
                                         : kn           ? ao->knew
                                                        : a->k_new.data,
                                .v_new = !a->v_new.rank ? NULL
                                         : kn           ? ao->knew + kn
                                                        : a->v_new.data,
                                .method = s_method(a->method),
                                .budget = a->budget,
                                .gqa = s_gqa(a->gqa),
                                .max_pos = (int32_t)a->max_pos,
                                .merge = a->merge == 2   ? FASA_MERGE_LOCAL
                                         : a->merge == 1 ? FASA_MERGE_EXACT
                                                         : -1};
    ao->cfg = c;
    ao->budget = budget;
    ao->out_bytes = out_bytes;
    ao->kpos = fasa_engine_length(s->engine, a->session_id, a->layer);
    return FASA_OK;
}

/* After the engine ran the step (code, fe, st; us: its server time): the reply's result. */
static fasa_status s_attend_finish(fasa_service *s, const char *field, attend_out *ao,
                                   fasa_status code, const fasa_error *fe,
                                   const fasa_step_stats *st, double us, size_t *reply_left,
                                   reply *r)
{
    if (code) {
        s_attend_free(ao);
        return s_fail(r, code, "%s: %s", field, fe->msg);
    }
    const fasa_session_config *c = ao->cfg;
    const int budget = ao->budget;
    *reply_left -= ao->out_bytes;
    s->steps++;
    s_lat_add(&s->lat[st->method_used], us);
    fasa__v1__attend_result__init(&ao->res);
    fasa__v1__tensor__init(&ao->out);
    fasa__v1__step_stats__init(&ao->stats);
    ao->out_shape[0] = (uint64_t)c->n_heads;
    ao->out_shape[1] = (uint64_t)c->head_dim;
    ao->out.dtype = FASA__V1__DTYPE__F32;
    ao->out.n_shape = 2;
    ao->out.shape = ao->out_shape;
    ao->out.data.data = (uint8_t *)ao->o;
    ao->out.data.len = (size_t)c->n_heads * c->head_dim * sizeof(float);
    ao->res.out = &ao->out;
    if (ao->selected) {
        fasa__v1__tensor__init(&ao->sel);
        ao->sel_shape[0] = (uint64_t)c->n_heads;
        ao->sel_shape[1] = (uint64_t)budget;
        ao->sel.dtype = FASA__V1__DTYPE__I32;
        ao->sel.n_shape = 2;
        ao->sel.shape = ao->sel_shape;
        ao->sel.data.data = (uint8_t *)ao->selected;
        ao->sel.data.len = (size_t)c->n_heads * budget * sizeof(int32_t);
        ao->res.selected = &ao->sel;
    }
    ao->stats.method_used = s_method_out(st->method_used);
    ao->stats.n_visible = (uint32_t)st->n_visible;
    ao->stats.bytes_read = (uint64_t)st->bytes_read;
    ao->stats.server_us = (uint64_t)us;
    ao->stats.has_merge_used = 1;
    ao->stats.merge_used =
        st->merge_used == FASA_MERGE_LOCAL ? FASA__V1__MERGE__LOCAL : FASA__V1__MERGE__EXACT;
    ao->stats.has_local_budget = st->merge_used == FASA_MERGE_LOCAL;
    ao->stats.local_budget = (uint32_t)st->local_budget;
    ao->res.stats = &ao->stats;
    return FASA_OK;
}

static fasa_status s_attend(fasa_service *s, const edge_attend *a, const char *field,
                            attend_out *ao, size_t *reply_left, reply *r)
{
    if (s_attend_prepare(s, a, field, ao, reply_left, 1, r)) return r->code;
    fasa_step_stats st;
    fasa_error fe;
    const double t0 = s_now();
    const fasa_status code =
        fasa_engine_attend(s->engine, a->session_id, &ao->req, ao->o, ao->selected, &st, &fe);
    fe.code = code;
    s_wal_k_new(s, 1, &a->session_id, &ao->req, &fe, &ao->kpos);
    const fasa_status rc =
        s_attend_finish(s, field, ao, code, &fe, &st, (s_now() - t0) * 1e6, reply_left, r);
    if (rc == FASA_OK) {
        /* Where the step's time went (fasa.proto StepStats 7..9). */
        ao->stats.has_score_us = ao->stats.has_merge_us = ao->stats.has_attend_us = 1;
        ao->stats.score_us = (uint64_t)st.score_us;
        ao->stats.merge_us = (uint64_t)st.merge_us;
        ao->stats.attend_us = (uint64_t)st.attend_us;
        ao->decode_us = (t0 - s->t_handle) * 1e6;
    }
    return rc;
}

static void s_count_error(fasa_service *s, fasa_status code);

/* A BatchAttend: every item checked by the service in order (the reply budget counts the
 * items before it), then the engine runs the good ones as one pipelined batch. Each
 * item's server_us is the batch's time shared evenly among the items that ran. */
static void s_batch(fasa_service *s, const edge_attend *items_in, int n, attend_out *many,
                    Fasa__V1__BatchAttendItem *items, size_t *reply_left, reply *top)
{
    reply *ri = calloc((size_t)n, sizeof(*ri));
    int *go = calloc((size_t)n, sizeof(int));
    const char **ids = calloc((size_t)n, sizeof(*ids));
    fasa_attend_req *reqs = calloc((size_t)n, sizeof(*reqs));
    float **outs = calloc((size_t)n, sizeof(*outs));
    int32_t **sels = calloc((size_t)n, sizeof(*sels));
    fasa_step_stats *st = calloc((size_t)n, sizeof(*st));
    fasa_error *errs = calloc((size_t)n, sizeof(*errs));
    int32_t *kpos = calloc((size_t)n, sizeof(*kpos));
    if (!ri || !go || !ids || !reqs || !outs || !sels || !st || !errs || !kpos) {
        s_fail(top, FASA_RESOURCE_EXHAUSTED, "batch_attend: out of memory");
        goto done;
    }
    /* Reply budget: the items checked so far claim theirs as if they all succeed. */
    size_t left = *reply_left;
    int m = 0;
    for (int i = 0; i < n; i++) {
        char f[48];
        snprintf(f, sizeof(f), "batch_attend.items[%d]", i);
        ri[i] = (reply){.code = FASA_OK, .resp = top->resp};
        if (items_in[i].item_status) {
            s_fail(&ri[i], (fasa_status)items_in[i].item_status, "%s", items_in[i].item_msg);
            continue;
        }
        if (s_attend_prepare(s, &items_in[i], f, &many[i], &left, 0, &ri[i])) continue;
        left -= many[i].out_bytes;
        go[i] = 1;
        ids[m] = items_in[i].session_id;
        reqs[m] = many[i].req;
        outs[m] = many[i].o;
        sels[m] = many[i].selected;
        kpos[m] = many[i].kpos;
        m++;
    }
    const double t0 = s_now();
    fasa_engine_attend_batch(s->engine, m, ids, reqs, outs, sels, st, errs);
    s_wal_k_new(s, m, ids, reqs, errs, kpos);
    const double us = m ? (s_now() - t0) * 1e6 / m : 0;
    for (int i = 0, j = 0; i < n; i++) {
        char f[48];
        snprintf(f, sizeof(f), "batch_attend.items[%d]", i);
        fasa__v1__batch_attend_item__init(&items[i]);
        if (go[i]) {
            s_attend_finish(s, f, &many[i], errs[j].code, &errs[j], &st[j], us, reply_left, &ri[i]);
            j++;
        }
        if (ri[i].code == FASA_OK) {
            items[i].result = &many[i].res;
        } else {
            s->errors++;
            s_count_error(s, ri[i].code);
            items[i].message = strdup(ri[i].msg);
        }
        items[i].status = (Fasa__V1__Status)ri[i].code;
    }
done:
    free(ri), free(go), free(ids), free(reqs), free(outs), free(sels), free(st), free(errs);
    free(kpos);
}

static fasa_status s_calibrate(fasa_service *s, const edge_calibrate *c, reply *r, char **text_p)
{
    if (c->profile_name && !s_find_profile(s, c->profile_name) &&
        s->n_profiles >= FASA_SERVICE_MAX_PROFILES)
        return s_fail(r, FASA_RESOURCE_EXHAUSTED,
                      "calibrate.profile_name: the server stores at most %d profiles",
                      FASA_SERVICE_MAX_PROFILES);
    const int L = (int)c->q.shape[0], T = (int)c->q.shape[1], H = (int)c->q.shape[2];
    const int Hkv = (int)c->k.shape[2], d = (int)c->q.shape[3];
    const float **ptrs = malloc(2 * (size_t)L * sizeof(*ptrs));
    if (!ptrs) return s_fail(r, FASA_RESOURCE_EXHAUSTED, "calibrate: out of memory");
    for (int l = 0; l < L; l++) {
        ptrs[l] = c->q.data + (size_t)l * T * H * d;
        ptrs[L + l] = c->k.data + (size_t)l * T * Hkv * d;
    }
    const fasa_activations act = {.n_layers = L,
                                  .n_tokens = T,
                                  .n_heads = H,
                                  .n_kv_heads = Hkv,
                                  .head_dim = d,
                                  .q = ptrs,
                                  .k = ptrs + L,
                                  .v = ptrs + L};
    fasa_calib_opts o = {.ntip = c->ntip ? c->ntip : (d / 8 > 0 ? d / 8 : 1),
                         .window = c->window ? c->window : 32,
                         .pos_begin = c->pos_begin >= 0 ? c->pos_begin : T / 2,
                         .pos_end = c->pos_end ? c->pos_end : T,
                         .pos_step = c->pos_step ? c->pos_step : 1,
                         .pairing = s_pairing(c->pairing),
                         .gqa_shared = c->gqa == FASA__V1__GQA__SHARED};
    if (o.pos_begin >= o.pos_end) {
        free(ptrs);
        return s_fail(r, FASA_INVALID_ARGUMENT,
                      "calibrate: sample positions [%d, %d) are empty (pos_begin %s, pos_end %s)",
                      o.pos_begin, o.pos_end, c->pos_begin >= 0 ? "given" : "default T/2",
                      c->pos_end ? "given" : "default T");
    }
    if (o.window >= o.pos_end) {
        free(ptrs);
        return s_fail(r, FASA_INVALID_ARGUMENT,
                      "calibrate.window %d covers every sample position (the last is %d): with "
                      "no more keys than the window, every FC agrees fully",
                      o.window, o.pos_end - 1);
    }
    /* Each sample position t scores t + 1 keys with every head's full dot product. */
    const double n_pos = (double)((o.pos_end - o.pos_begin + o.pos_step - 1) / o.pos_step);
    const double work = (double)L * H * d * n_pos * ((o.pos_begin + o.pos_end) / 2.0 + 1);
    if (work > MAX_CALIB_WORK) {
        free(ptrs);
        return s_fail(r, FASA_RESOURCE_EXHAUSTED,
                      "calibrate: %.3g multiply-adds is over the limit of %.3g; use fewer sample "
                      "positions (pos_step) or tokens",
                      work, MAX_CALIB_WORK);
    }
    char err[256];
    fasa_profile *p = fasa_calibrate(&act, &o, err, sizeof(err));
    free(ptrs);
    if (!p) return s_fail(r, FASA_INVALID_ARGUMENT, "calibrate: %s", err);
    char *text = NULL;
    size_t text_len = 0;
    FILE *f = open_memstream(&text, &text_len);
    const int bad = !f || fasa_profile_write(p, f);
    if ((f && fclose(f)) || bad) {
        free(text);
        fasa_profile_destroy(&p);
        return s_fail(r, FASA_RESOURCE_EXHAUSTED, "calibrate: out of memory writing the profile");
    }
    if (c->profile_name) {
        named_profile *np = s_find_profile(s, c->profile_name);
        if (!np) {
            np = &s->profiles[s->n_profiles++];
            snprintf(np->name, sizeof(np->name), "%s", c->profile_name);
        } else {
            fasa_profile_destroy(&np->profile);
        }
        np->profile = p;
        s->profiles_dirty = 1; /* for --snapshot-interval */
    } else {
        fasa_profile_destroy(&p);
    }
    static Fasa__V1__CalibrateResult res;
    fasa__v1__calibrate_result__init(&res);
    res.profile_text = text;
    *text_p = text;
    r->resp->body_case = FASA__V1__RESPONSE__BODY_CALIBRATE;
    r->resp->calibrate = &res;
    return FASA_OK;
}

static fasa_status s_set_profile(fasa_service *s, const edge_set_profile *p, reply *r)
{
    if (!fasa_engine_config(s->engine, p->session_id))
        return s_fail(r, FASA_NOT_FOUND, "set_profile.session_id: session '%s' not found",
                      p->session_id);
    fasa_profile *owned;
    const fasa_profile *prof =
        s_profile_of(s, p->profile_text, p->profile_name, "set_profile", &owned, r);
    if (r->code) return r->code;
    fasa_error fe;
    const fasa_status st = fasa_engine_set_profile(s->engine, p->session_id, prof, &fe);
    fasa_profile_destroy(&owned);
    if (st) return s_fail(r, st, "set_profile: %s", fe.msg);
    s_wal_rebase(s, p->session_id); /* the key layout follows the profile */
    return FASA_OK;
}

static void s_count_error(fasa_service *s, fasa_status code)
{
    if ((unsigned)code <= FASA_UNAVAILABLE) s->by_code[code]++;
}

/* What every rank holds of session id, or of every session (id NULL), into msgs and ptrs
 * (s_rank_entries each): StatsResult.rank_stats or SessionInfo.rank_stats. */
static fasa_status s_ranks(fasa_service *s, const char *id, Fasa__V1__RankStats *msgs,
                           Fasa__V1__RankStats **ptrs, reply *r)
{
    fasa_error fe;
    const fasa_status st = fasa_engine_shard_stats(s->engine, id, s->shard_buf, &fe);
    if (st) return s_fail(r, st, "stats: %s", fe.msg);
    const int n = s_rank_entries(s), workers = s_on_workers(s);
    for (int k = 0; k < n; k++) {
        fasa__v1__rank_stats__init(&msgs[k]);
        msgs[k].rank = (uint32_t)k;
        ptrs[k] = &msgs[k];
    }
    for (int i = 0; i < s->n_shards; i++) {
        const fasa_shard_stats *x = &s->shard_buf[i];
        Fasa__V1__RankStats *m = &msgs[workers ? i + 1 : 0];
        m->shards++;
        /* Every session has a shard on every shard index: a rank's count is any one's. */
        if ((uint64_t)x->sessions > m->sessions) m->sessions = (uint32_t)x->sessions;
        m->tokens += (uint64_t)x->tokens;
        m->rows += (uint64_t)x->rows;
        m->kdom_bytes += (uint64_t)x->kdom_bytes;
        m->krest_bytes += (uint64_t)x->krest_bytes;
        m->v_bytes += (uint64_t)x->v_bytes;
        m->alloc_bytes += (uint64_t)x->alloc_bytes;
    }
    /* Each worker's resident memory, beside what it holds. */
    int64_t rss[s->n_shards > 0 ? s->n_shards : 1];
    if (workers && fasa_engine_shard_rss(s->engine, rss) == 0)
        for (int i = 0; i < s->n_shards; i++) {
            msgs[i + 1].has_rss_bytes = 1;
            msgs[i + 1].rss_bytes = (uint64_t)rss[i];
        }
    /* Rank 0 measures its own (it holds the shards itself when there are no workers). */
    msgs[0].has_rss_bytes = 1;
    msgs[0].rss_bytes = (uint64_t)fasa_rss_bytes();
    return FASA_OK;
}

static fasa_status s_stats(fasa_service *s, const char *id, reply *r)
{
    static Fasa__V1__StatsResult res;
    static Fasa__V1__SessionInfo info;
    static char id_copy[EDGE_MAX_ID + 1];
    static uint32_t dense[EDGE_MAX_LAYERS];
    static size_t n_dense;
    static Fasa__V1__DenseLayers dense_msg;
    static Fasa__V1__RequestCount req_msgs[EDGE_KIND_LAST + 1], *req_ptrs[EDGE_KIND_LAST + 1];
    static Fasa__V1__ErrorCount err_msgs[FASA_UNAVAILABLE], *err_ptrs[FASA_UNAVAILABLE];
    static Fasa__V1__LatencySummary lat_msgs[FASA_METHOD_LAST + 1], *lat_ptrs[FASA_METHOD_LAST + 1];
    const int n_ranks = s_rank_entries(s);
    fasa__v1__stats_result__init(&res);
    if (id) {
        const fasa_session_config *c = fasa_engine_config(s->engine, id);
        if (!c) return s_fail(r, FASA_NOT_FOUND, "stats.session_id: session '%s' not found", id);
        fasa__v1__session_info__init(&info);
        snprintf(id_copy, sizeof(id_copy), "%s", id);
        info.session_id = id_copy;
        info.n_layers = (uint32_t)c->n_layers;
        info.n_heads = (uint32_t)c->n_heads;
        info.n_kv_heads = (uint32_t)c->n_kv_heads;
        info.head_dim = (uint32_t)c->head_dim;
        info.length = (uint64_t)fasa_engine_length(s->engine, id, 0);
        info.kv_bytes = (uint64_t)fasa_engine_kv_bytes(s->engine, id);
        info.has_profile = c->profile != NULL;
        info.method = s_method_out(c->method);
        info.budget = (uint32_t)c->budget;
        info.has_dtype = 1;
        info.dtype = (Fasa__V1__DType)(FASA__V1__DTYPE__F32 + c->dtype);
        info.has_pairing = 1;
        info.pairing = c->pairing == FC_PAIRING_HALF ? FASA__V1__PAIRING__HALF
                                                     : FASA__V1__PAIRING__INTERLEAVED;
        info.has_gqa = 1;
        info.gqa = c->gqa == FASA_GQA_SHARED ? FASA__V1__GQA__SHARED : FASA__V1__GQA__PER_HEAD;
        n_dense = 0;
        for (int l = 0; l < c->n_layers && l < EDGE_MAX_LAYERS; l++)
            if (c->dense_layers ? c->dense_layers[l] : l == 0) dense[n_dense++] = (uint32_t)l;
        fasa__v1__dense_layers__init(&dense_msg);
        dense_msg.n_layers = n_dense;
        dense_msg.layers = dense;
        info.dense_layers = &dense_msg;
        info.has_score_dtype = 1; /* the effective one (scan_dtype: the proto's numbers) */
        info.score_dtype = (Fasa__V1__DType)scan_dtype_effective(c->score_dtype, c->dtype);
        info.has_tier = 1;
        info.tier = c->tier == SHARD_TIER_DISK ? FASA__V1__TIER__DISK : FASA__V1__TIER__RAM;
        if (s_ranks(s, id, s->rank_msgs + n_ranks, s->rank_ptrs + n_ranks, r)) return r->code;
        info.n_rank_stats = (size_t)n_ranks;
        info.rank_stats = s->rank_ptrs + n_ranks;
        res.session = &info;
    }
    if (s_ranks(s, NULL, s->rank_msgs, s->rank_ptrs, r)) return r->code;
    res.n_rank_stats = (size_t)n_ranks;
    res.rank_stats = s->rank_ptrs;
    for (int k = 0; k <= EDGE_KIND_LAST; k++) {
        fasa__v1__request_count__init(&req_msgs[k]);
        req_msgs[k].type = (char *)s_kind_name(k); /* the log's names (kind 0: undecodable) */
        req_msgs[k].count = s->by_kind[k];
        req_ptrs[k] = &req_msgs[k];
    }
    res.n_requests_by_type = EDGE_KIND_LAST + 1;
    res.requests_by_type = req_ptrs;
    for (int c = 1; c <= FASA_UNAVAILABLE; c++) {
        fasa__v1__error_count__init(&err_msgs[c - 1]);
        err_msgs[c - 1].code = (Fasa__V1__Status)c;
        err_msgs[c - 1].count = s->by_code[c];
        err_ptrs[c - 1] = &err_msgs[c - 1];
    }
    res.n_errors_by_code = FASA_UNAVAILABLE;
    res.errors_by_code = err_ptrs;
    for (int m = 0; m <= FASA_METHOD_LAST; m++) {
        const lat_hist *h = &s->lat[m];
        Fasa__V1__LatencySummary *l = &lat_msgs[m];
        fasa__v1__latency_summary__init(l);
        l->method = s_method_out(m);
        l->count = h->count;
        l->sum_us = h->sum;
        l->p50_us = s_lat_quantile(h, 0.50);
        l->p90_us = s_lat_quantile(h, 0.90);
        l->p99_us = s_lat_quantile(h, 0.99);
        l->max_us = h->max;
        lat_ptrs[m] = l;
    }
    res.n_latency = FASA_METHOD_LAST + 1;
    res.latency = lat_ptrs;
    res.has_batch_items = 1;
    res.batch_items = s->batch_items;
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    res.n_ranks = (uint32_t)s->n_ranks;
    res.n_shards = (uint32_t)s->n_shards;
    res.n_sessions = (uint32_t)fasa_engine_count(s->engine);
    res.requests = s->requests;
    res.errors = s->errors;
    res.attend_steps = s->steps;
    res.uptime_s =
        (double)(now.tv_sec - s->start.tv_sec) + 1e-9 * (double)(now.tv_nsec - s->start.tv_nsec);
    res.kv_bytes = (uint64_t)fasa_engine_kv_bytes(s->engine, NULL);
    res.n_profiles = (uint32_t)s->n_profiles;
    r->resp->body_case = FASA__V1__RESPONSE__BODY_STATS;
    r->resp->stats = &res;
    return FASA_OK;
}

/* ListSessions: the engine's own bookkeeping (no shard is asked), ordered by id. */
static int s_cmp_str(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

typedef struct list_out {
    Fasa__V1__ListSessionsResult res;
    Fasa__V1__SessionSummary *sums, **ptrs;
    const char **ids;
    char **names;
} list_out;

static void s_list_free(list_out *l)
{
    free(l->sums);
    free(l->ptrs);
    free(l->ids);
    free(l->names);
}

static fasa_status s_list_sessions(fasa_service *s, list_out *l, reply *r)
{
    const int n = fasa_engine_count(s->engine);
    l->sums = calloc((size_t)(n ? n : 1), sizeof(*l->sums));
    l->ptrs = calloc((size_t)(n ? n : 1), sizeof(*l->ptrs));
    l->ids = calloc((size_t)(n ? n : 1), sizeof(*l->ids));
    l->names = calloc((size_t)(s->n_profiles ? s->n_profiles : 1), sizeof(*l->names));
    if (!l->sums || !l->ptrs || !l->ids || !l->names)
        return s_fail(r, FASA_RESOURCE_EXHAUSTED, "list_sessions: out of memory");
    fasa_engine_ids(s->engine, l->ids, n);
    qsort(l->ids, (size_t)n, sizeof(*l->ids), s_cmp_str);
    for (int i = 0; i < n; i++) {
        const fasa_session_config *c = fasa_engine_config(s->engine, l->ids[i]);
        Fasa__V1__SessionSummary *m = &l->sums[i];
        fasa__v1__session_summary__init(m);
        m->session_id = (char *)l->ids[i];
        m->n_layers = (uint32_t)c->n_layers;
        m->n_heads = (uint32_t)c->n_heads;
        m->n_kv_heads = (uint32_t)c->n_kv_heads;
        m->head_dim = (uint32_t)c->head_dim;
        m->length = (uint64_t)fasa_engine_length(s->engine, l->ids[i], 0);
        m->kv_bytes = (uint64_t)fasa_engine_kv_bytes(s->engine, l->ids[i]);
        m->has_dtype = 1;
        m->dtype = (Fasa__V1__DType)(FASA__V1__DTYPE__F32 + c->dtype);
        m->has_profile = c->profile != NULL;
        l->ptrs[i] = m;
    }
    for (int i = 0; i < s->n_profiles; i++) l->names[i] = s->profiles[i].name;
    qsort(l->names, (size_t)s->n_profiles, sizeof(*l->names), s_cmp_str);
    fasa__v1__list_sessions_result__init(&l->res);
    l->res.n_sessions = (size_t)n;
    l->res.sessions = l->ptrs;
    l->res.n_profile_names = (size_t)s->n_profiles;
    l->res.profile_names = l->names;
    r->resp->body_case = FASA__V1__RESPONSE__BODY_LIST_SESSIONS;
    r->resp->list_sessions = &l->res;
    return FASA_OK;
}

/* DeleteProfile: out of the store and, with a state dir, off the disk (so --restore does not
 * bring it back). Sessions made from it hold their own copy. */
static fasa_status s_delete_profile(fasa_service *s, const char *name, reply *r)
{
    named_profile *np = s_find_profile(s, name);
    if (!np)
        return s_fail(r, FASA_NOT_FOUND, "delete_profile.profile_name: no profile '%s' is stored",
                      name);
    if (*s->state_dir) {
        fasa_error fe;
        if (fasa_snapshot_remove_profile(s->state_dir, name, &fe))
            return s_fail(r, fe.code, "delete_profile: %s", fe.msg);
    }
    fasa_profile_destroy(&np->profile);
    *np = s->profiles[--s->n_profiles];
    return FASA_OK;
}

static int s_pack(Fasa__V1__Response *resp, uint8_t **reply_p, size_t *reply_len_p);

/* A LoadSession's result and the storage its repeated field points at. */
typedef struct load_out {
    Fasa__V1__LoadSessionResult res;
    Fasa__V1__ShardLoad *shards, **shard_ptrs;
} load_out;

static void s_load_progress(void *ctx, int done, int n_layers, int64_t bytes)
{
    const char *id = ctx;
    fasa_log(done == n_layers ? FASA_LOG_INFO : FASA_LOG_DEBUG, 0,
             "load %s: %d/%d layers, %.1f MB read", id, done, n_layers, (double)bytes / 1e6);
}

static fasa_status s_load(fasa_service *s, const edge_load *q, load_out *o, reply *r)
{
    const fasa_session_config *c = fasa_engine_config(s->engine, q->session_id);
    if (!c)
        return s_fail(r, FASA_NOT_FOUND, "load_session.session_id: session '%s' not found",
                      q->session_id);
    char path[LOAD_MAX_PATH];
    fasa_error fe;
    fasa_load_plan plan;
    fasa_status st = fasa_load_resolve(s->load_root, q->path, path, sizeof(path), &fe);
    if (st) return s_fail(r, st, "%s", fe.msg);
    st = fasa_load_plan_open(path, s->load_root, c->n_layers, c->n_kv_heads, c->head_dim, &plan,
                             &fe);
    if (st) return s_fail(r, st, "load_session.path: %s", fe.msg);
    const int ns = s->n_shards;
    load_report *rep = calloc((size_t)ns, sizeof(*rep));
    o->shards = calloc((size_t)ns, sizeof(*o->shards));
    o->shard_ptrs = calloc((size_t)ns, sizeof(*o->shard_ptrs));
    fasa_load_result lr = {0};
    if (!rep || !o->shards || !o->shard_ptrs) {
        st = s_fail(r, FASA_RESOURCE_EXHAUSTED, "load_session: out of memory");
    } else {
        st = fasa_engine_load(s->engine, q->session_id, &plan, q->check_only, s_load_progress,
                              (void *)q->session_id, &lr, rep, &fe);
        if (st) s_fail(r, st, "load_session: %s", fe.msg);
    }
    if (!st) {
        if (!q->check_only) {
            s_rev_note(s, q->session_id);
            s_wal_rebase(s, q->session_id); /* the log cannot hold a load: a snapshot does */
        }
        fasa__v1__load_session_result__init(&o->res);
        o->res.length = (uint64_t)lr.length;
        o->res.stored_bytes = (uint64_t)lr.stored_bytes;
        o->res.file_bytes = (uint64_t)lr.file_bytes;
        o->res.seconds = lr.seconds;
        o->res.format = (char *)plan.format;
        for (int i = 0; i < ns; i++) {
            Fasa__V1__ShardLoad *m = &o->shards[i];
            fasa__v1__shard_load__init(m);
            m->shard = (uint32_t)i;
            m->rows = (uint64_t)rep[i].rows;
            m->file_bytes = (uint64_t)rep[i].file_bytes;
            m->read_s = rep[i].read_s;
            m->total_s = rep[i].total_s;
            o->shard_ptrs[i] = m;
        }
        o->res.n_shards = (size_t)ns;
        o->res.shards = o->shard_ptrs;
    }
    free(rep);
    fasa_load_plan_free(&plan);
    return st;
}

static int s_pack(Fasa__V1__Response *resp, uint8_t **reply_p, size_t *reply_len_p)
{
    return edge_reply_pack(resp, reply_p, reply_len_p);
}

/* Snapshots (coord/snapshot.h). */

static struct snap_rev *s_rev_find(fasa_service *s, const char *id)
{
    for (int i = 0; i < s->n_revs; i++)
        if (strcmp(s->revs[i].id, id) == 0) return &s->revs[i];
    return NULL;
}

/* Records that id was written (or restored) at its current revision. */
static void s_rev_note(fasa_service *s, const char *id)
{
    struct snap_rev *r = s_rev_find(s, id);
    if (!r) {
        if (s->n_revs == s->cap_revs) {
            const int cap = s->cap_revs ? 2 * s->cap_revs : 16;
            struct snap_rev *p = realloc(s->revs, (size_t)cap * sizeof(*p));
            if (!p) return; /* only costs a rewrite at the next interval */
            s->revs = p;
            s->cap_revs = cap;
        }
        r = &s->revs[s->n_revs++];
        snprintf(r->id, sizeof(r->id), "%s", id);
    }
    r->rev = fasa_engine_revision(s->engine, id);
}

static void s_rev_forget(fasa_service *s, const char *id)
{
    struct snap_rev *r = s_rev_find(s, id);
    if (r) *r = s->revs[--s->n_revs];
}

/* One SnapshotInfo and the strings it points at. */
typedef struct snap_out {
    Fasa__V1__SnapshotInfo info;
    char id[EDGE_MAX_ID + 1];
    char manifest[80];
} snap_out;

static int s_save_profiles(fasa_service *s, fasa_error *fe)
{
    for (int i = 0; i < s->n_profiles; i++)
        if (fasa_snapshot_save_profile(s->state_dir, s->profiles[i].name, s->profiles[i].profile,
                                       fe))
            return -1;
    s->profiles_dirty = 0;
    return 0;
}

/* Snapshot of one session (id) or of every session and the named profiles (id NULL). */
static fasa_status s_snapshot(fasa_service *s, const char *id, reply *r,
                              Fasa__V1__SnapshotResult *res, snap_out **outs_p,
                              Fasa__V1__SnapshotInfo ***ptrs_p)
{
    if (!*s->state_dir)
        return s_fail(r, FASA_FAILED_PRECONDITION,
                      "snapshot: this server runs without --state-dir, so it has nowhere to write "
                      "snapshots");
    const int n = id ? 1 : fasa_engine_count(s->engine);
    const char **ids = calloc((size_t)(n ? n : 1), sizeof(*ids));
    snap_out *outs = calloc((size_t)(n ? n : 1), sizeof(*outs));
    Fasa__V1__SnapshotInfo **ptrs = calloc((size_t)(n ? n : 1), sizeof(*ptrs));
    *outs_p = outs;
    *ptrs_p = ptrs;
    if (!ids || !outs || !ptrs) {
        free(ids);
        return s_fail(r, FASA_RESOURCE_EXHAUSTED, "snapshot: out of memory");
    }
    if (id)
        ids[0] = id;
    else
        fasa_engine_ids(s->engine, ids, n);
    fasa__v1__snapshot_result__init(res);
    for (int i = 0; i < n; i++) {
        fasa_snapshot_result sr;
        fasa_error fe;
        const fasa_status st = fasa_snapshot_session(s->engine, s->state_dir, ids[i], &sr, &fe);
        if (st) {
            s_fail(r, st, "snapshot%s: %s%s", id ? ".session_id" : " (all)", fe.msg,
                   id || !i ? "" : "; the sessions before it were written");
            free(ids);
            return st;
        }
        s_rev_note(s, ids[i]);
        snap_out *o = &outs[i];
        fasa__v1__snapshot_info__init(&o->info);
        snprintf(o->id, sizeof(o->id), "%s", ids[i]);
        snprintf(o->manifest, sizeof(o->manifest), "%s", sr.manifest);
        o->info.session_id = o->id;
        o->info.length = (uint64_t)sr.length;
        o->info.bytes = (uint64_t)sr.bytes;
        o->info.manifest = o->manifest;
        ptrs[i] = &o->info;
    }
    free(ids);
    res->n_sessions = (size_t)n;
    res->sessions = ptrs;
    if (!id) {
        fasa_error fe;
        if (s_save_profiles(s, &fe)) return s_fail(r, fe.code, "snapshot (all): %s", fe.msg);
        res->n_profiles = (uint32_t)s->n_profiles;
    }
    return FASA_OK;
}

static int s_add_profile(void *ctx, const char *name, fasa_profile **profile_p)
{
    fasa_service *s = ctx;
    if (s_find_profile(s, name) || s->n_profiles >= FASA_SERVICE_MAX_PROFILES) return -1;
    named_profile *np = &s->profiles[s->n_profiles++];
    snprintf(np->name, sizeof(np->name), "%s", name);
    np->profile = *profile_p;
    *profile_p = NULL;
    return 0;
}

static void s_on_refused(void *ctx, const char *id, const char *why)
{
    fasa_service *s = ctx;
    struct refused_session *p = realloc(s->refused, (size_t)(s->n_refused + 1) * sizeof(*p));
    if (!p) return; /* requests for it then get a plain NOT_FOUND */
    s->refused = p;
    snprintf(p[s->n_refused].id, sizeof(p->id), "%s", id);
    snprintf(p[s->n_refused].why, sizeof(p->why), "%s", why);
    s->n_refused++;
}

/* A NOT_FOUND for a session a restore refused becomes FAILED_PRECONDITION saying why; a
 * session created under that id ends it. */
static void s_refused_reply(fasa_service *s, reply *r)
{
    const char *id = s->last_session;
    for (int i = 0; *id && i < s->n_refused; i++) {
        if (strcmp(s->refused[i].id, id)) continue;
        if (r->code == FASA_OK && fasa_engine_config(s->engine, id)) {
            s->refused[i] = s->refused[--s->n_refused];
        } else if (r->code == FASA_NOT_FOUND) {
            /* Keep the field the message named ("stats.session_id: ..."). */
            char field[64] = "";
            const char *colon = strstr(r->msg, ": ");
            if (colon && colon - r->msg < (int)sizeof(field) - 2)
                snprintf(field, sizeof(field), "%.*s", (int)(colon - r->msg + 2), r->msg);
            s_fail(r, FASA_FAILED_PRECONDITION, "%ssession '%s' could not be restored: %s", field,
                   id, s->refused[i].why);
        }
        return;
    }
}

int fasa_service_restore(fasa_service *s, int *n_failed_p)
{
    *n_failed_p = 0;
    if (!*s->state_dir) return -1;
    int pf = 0;
    if (fasa_snapshot_load_profiles(s->state_dir, s_add_profile, s, &pf) < 0) return -1;
    const int n =
        fasa_snapshot_restore_all_cb(s->engine, s->state_dir, n_failed_p, s_on_refused, s);
    /* Then what was appended after each session's snapshot (wal.h). */
    long long rows = 0;
    const int recs = fasa_wal_replay_all(s->engine, s->state_dir, &rows);
    if (recs > 0)
        fasa_log(FASA_LOG_INFO, 0, "wal: replayed %d record%s, %lld rows", recs,
                 recs == 1 ? "" : "s", rows);
    *n_failed_p += pf;
    /* What was just loaded is what is on disk: the interval need not write it again. */
    const int count = fasa_engine_count(s->engine);
    const char **ids = calloc((size_t)(count ? count : 1), sizeof(*ids));
    if (ids) {
        fasa_engine_ids(s->engine, ids, count);
        for (int i = 0; i < count; i++) s_rev_note(s, ids[i]);
        free(ids);
    }
    return n;
}

int fasa_service_snapshot_changed(fasa_service *s)
{
    if (!*s->state_dir) return 0;
    const int count = fasa_engine_count(s->engine);
    const char **ids = calloc((size_t)(count ? count : 1), sizeof(*ids));
    if (!ids) return -1;
    fasa_engine_ids(s->engine, ids, count);
    int n = 0, failed = 0;
    for (int i = 0; i < count; i++) {
        const struct snap_rev *r = s_rev_find(s, ids[i]);
        if (r && r->rev == fasa_engine_revision(s->engine, ids[i])) continue;
        fasa_snapshot_result sr;
        fasa_error fe;
        if (fasa_snapshot_session(s->engine, s->state_dir, ids[i], &sr, &fe)) {
            fasa_log(FASA_LOG_WARN, 0, "snapshot: session %s: %s", ids[i], fe.msg);
            failed = 1;
            continue;
        }
        fasa_log(FASA_LOG_DEBUG, 0, "snapshot: session %s: %lld tokens, %lld bytes", ids[i],
                 (long long)sr.length, (long long)sr.bytes);
        s_rev_note(s, ids[i]);
        n++;
    }
    free(ids);
    fasa_error fe;
    if (s->profiles_dirty && s_save_profiles(s, &fe)) {
        fasa_log(FASA_LOG_WARN, 0, "snapshot: %s", fe.msg);
        failed = 1;
    }
    return failed ? -1 : n;
}

uint64_t fasa_service_request_id(const void *req, size_t len)
{
    return edge_scan_request_id(req, len);
}

int fasa_service_error(uint64_t request_id, fasa_status code, const char *msg, uint8_t **reply_p,
                       size_t *reply_len_p)
{
    return edge_reply_error(request_id, (int)code, msg, reply_p, reply_len_p);
}

int fasa_service_refuse(fasa_service *s, uint64_t request_id, fasa_status code, const char *msg,
                        size_t bytes_in, uint8_t **reply_p, size_t *reply_len_p)
{
    s->requests++;
    s->by_kind[0]++;
    s->errors++;
    s_count_error(s, code);
    s->waited_ms = 0;
    s->last = (fasa_service_event){.request_id = request_id,
                                   .seq = s->requests,
                                   .kind = s_kind_name(0),
                                   .session_id = "",
                                   .status = code,
                                   .bytes_in = bytes_in};
    snprintf(s->last.msg, sizeof(s->last.msg), "%s", msg);
    const int rc = fasa_service_error(request_id, code, msg, reply_p, reply_len_p);
    s->last.bytes_out = rc ? 0 : *reply_len_p;
    return rc;
}

int fasa_service_stats_reply(fasa_service *s, uint8_t **reply_p, size_t *reply_len_p)
{
    Fasa__V1__Response resp;
    fasa__v1__response__init(&resp);
    reply r = {.code = FASA_OK, .resp = &resp};
    if (s_stats(s, NULL, &r)) return -1;
    resp.protocol_version = EDGE_PROTOCOL_VERSION;
    resp.status = FASA__V1__STATUS__OK;
    return s_pack(&resp, reply_p, reply_len_p);
}

/* What one request's reply points into, freed once the reply is packed (s_handled_free). */
typedef struct handled {
    Fasa__V1__Response resp;
    attend_out one;
    attend_out *many; /* BatchAttend: n_many outputs, items and item pointers */
    int n_many;
    Fasa__V1__BatchAttendItem *items, **item_ptrs;
    Fasa__V1__BatchAttendResult batch_res;
    Fasa__V1__PingResult ping_res;
    char *text; /* Calibrate's profile text */
    Fasa__V1__SnapshotResult snap_res;
    snap_out *snaps;
    Fasa__V1__SnapshotInfo **snap_ptrs;
    list_out list;
    load_out load;
} handled;

static void s_handled_free(handled *h)
{
    s_attend_free(&h->one);
    for (int i = 0; i < h->n_many; i++) {
        s_attend_free(&h->many[i]);
        free(h->items[i].message);
    }
    free(h->many);
    free(h->items);
    free(h->item_ptrs);
    free(h->text);
    free(h->snaps);
    free(h->snap_ptrs);
    s_list_free(&h->list);
    free(h->load.shards);
    free(h->load.shard_ptrs);
}

static void s_ping(const fasa_service *s, const edge_request *req, handled *h)
{
    fasa__v1__ping_result__init(&h->ping_res);
    if (req->u.ping.payload) {
        h->ping_res.has_payload = 1;
        h->ping_res.payload.data = (uint8_t *)req->u.ping.payload;
        h->ping_res.payload.len = req->u.ping.len;
    }
    h->ping_res.n_ranks = (uint32_t)s->n_ranks;
    h->ping_res.n_shards = (uint32_t)s->n_shards;
    h->ping_res.version = (char *)VERSION_STRING;
    h->resp.body_case = FASA__V1__RESPONSE__BODY_PING;
    h->resp.ping = &h->ping_res;
}

static void s_batch_attend(fasa_service *s, const edge_request *req, handled *h, size_t *reply_left,
                           reply *r)
{
    const int n = req->u.batch.n;
    s->batch_items += (uint64_t)n;
    h->many = calloc((size_t)n, sizeof(*h->many));
    h->items = calloc((size_t)n, sizeof(*h->items));
    h->item_ptrs = calloc((size_t)n, sizeof(*h->item_ptrs));
    if (!h->many || !h->items || !h->item_ptrs) {
        s_fail(r, FASA_RESOURCE_EXHAUSTED, "batch_attend: out of memory");
        return;
    }
    h->n_many = n;
    for (int i = 0; i < n; i++) h->item_ptrs[i] = &h->items[i];
    s_batch(s, req->u.batch.items, n, h->many, h->items, reply_left, r);
    if (r->code) {
        h->n_many = 0;
        return;
    }
    fasa__v1__batch_attend_result__init(&h->batch_res);
    h->batch_res.n_items = (size_t)n;
    h->batch_res.items = h->item_ptrs;
    h->resp.body_case = FASA__V1__RESPONSE__BODY_BATCH_ATTEND;
    h->resp.batch_attend = &h->batch_res;
}

static void s_drop(fasa_service *s, const char *session_id, reply *r)
{
    fasa_error fe;
    const fasa_status st = fasa_engine_drop(s->engine, session_id, &fe);
    if (st) s_fail(r, st, "drop_session.session_id: %s", fe.msg);
    /* A dropped session must not come back on the next restore. */
    if (!st && *s->state_dir) {
        fasa_snapshot_remove(s->state_dir, session_id);
        s_rev_forget(s, session_id);
    }
}

/* Runs a decoded request (waited: ms in the server's queue) into h->resp or r's error. */
static void s_dispatch(fasa_service *s, const edge_request *req, double waited, handled *h,
                       reply *r, int *shutdown_p)
{
    size_t reply_left = s->max_message - 1024;
    Fasa__V1__Response *resp = &h->resp;
    switch (req->kind) {
    case EDGE_PING:
        s_ping(s, req, h);
        break;
    case EDGE_CREATE:
        s_create(s, &req->u.create, r);
        break;
    case EDGE_APPEND:
        s_append(s, &req->u.append, r);
        break;
    case EDGE_ATTEND:
        if (s_attend(s, &req->u.attend, "attend", &h->one, &reply_left, r) == FASA_OK) {
            resp->body_case = FASA__V1__RESPONSE__BODY_ATTEND;
            resp->attend = &h->one.res;
            resp->has_queue_us = resp->has_decode_us = 1;
            resp->queue_us = (uint64_t)(waited * 1e3);
            resp->decode_us = (uint64_t)h->one.decode_us;
        }
        break;
    case EDGE_BATCH_ATTEND:
        s_batch_attend(s, req, h, &reply_left, r);
        break;
    case EDGE_CALIBRATE:
        s_calibrate(s, &req->u.calibrate, r, &h->text);
        break;
    case EDGE_SET_PROFILE:
        s_set_profile(s, &req->u.set_profile, r);
        break;
    case EDGE_DROP:
        s_drop(s, req->u.session_id, r);
        break;
    case EDGE_STATS:
        s_stats(s, req->u.session_id, r);
        break;
    case EDGE_SHUTDOWN:
        *shutdown_p = 1;
        break;
    case EDGE_LIST_SESSIONS:
        s_list_sessions(s, &h->list, r);
        break;
    case EDGE_DELETE_PROFILE:
        s_delete_profile(s, req->u.profile_name, r);
        break;
    case EDGE_LOAD_SESSION:
        if (s_load(s, &req->u.load, &h->load, r) == FASA_OK) {
            resp->body_case = FASA__V1__RESPONSE__BODY_LOAD_SESSION;
            resp->load_session = &h->load.res;
        }
        break;
    case EDGE_SNAPSHOT:
        if (s_snapshot(s, req->u.snapshot.session_id, r, &h->snap_res, &h->snaps, &h->snap_ptrs) ==
            FASA_OK) {
            resp->body_case = FASA__V1__RESPONSE__BODY_SNAPSHOT;
            resp->snapshot = &h->snap_res;
        }
        break;
    }
    if (s->n_refused) s_refused_reply(s, r);
}

/* Packs h->resp (or r's error) for request rid of len bytes, and counts it. */
static int s_reply(fasa_service *s, uint64_t rid, size_t len, handled *h, reply *r,
                   uint8_t **reply_p, size_t *reply_len_p)
{
    Fasa__V1__Response *resp = &h->resp;
    resp->protocol_version = EDGE_PROTOCOL_VERSION;
    resp->request_id = rid;
    resp->status = (Fasa__V1__Status)r->code;
    if (r->code) {
        s->errors++;
        s_count_error(s, r->code);
        resp->body_case = FASA__V1__RESPONSE__BODY__NOT_SET;
        resp->message = r->msg;
    }
    s->last.request_id = rid;
    s->last.session_id = s->last_session;
    s->last.status = r->code;
    snprintf(s->last.msg, sizeof(s->last.msg), "%s", r->code ? r->msg : "");
    s->last.bytes_in = len;
    int rc = s_pack(resp, reply_p, reply_len_p);
    if (rc) /* the full reply did not fit in memory: a short one still tells the client */
        rc = fasa_service_error(rid, FASA_RESOURCE_EXHAUSTED, "out of memory building the reply",
                                reply_p, reply_len_p);
    return rc;
}

int fasa_service_handle(fasa_service *s, const void *buf, size_t len, uint8_t **reply_p,
                        size_t *reply_len_p, int *shutdown_p)
{
    return fasa_service_handle_frames(s, buf, len, NULL, 0, reply_p, reply_len_p, shutdown_p);
}

int fasa_service_handle_frames(fasa_service *s, const void *buf, size_t len,
                               const edge_frame *frames, int n_frames, uint8_t **reply_p,
                               size_t *reply_len_p, int *shutdown_p)
{
    handled h = {0};
    fasa__v1__response__init(&h.resp);
    reply r = {.code = FASA_OK, .resp = &h.resp};
    edge_request req;
    uint64_t rid;

    const double t_start = s_now();
    s->t_handle = t_start;
    s->requests++;
    if (!s->arena) s->arena = edge_arena_new(); /* NULL: edge_decode_in mallocs */
    const int code = edge_decode_frames(s->arena, buf, len, frames, n_frames, s->max_message, &req,
                                        &rid, r.msg, sizeof(r.msg));
    for (int i = 0; i < n_frames && frames; i++) len += frames[i].len; /* bytes in, all frames */
    fasa_log_set_request(rid); /* this thread's lines, and the workers', name the request */
    /* A request the edge refused counts under its body when the bytes parsed as a Request,
     * else as undecodable (req.kind 0), in the log as in Stats. */
    s->by_kind[req.kind]++;
    s->last.kind = s_kind_name((int)req.kind);
    s->last.seq = s->requests;
    snprintf(s->last_session, sizeof(s->last_session), "%s", code ? "" : s_session_of(&req));
    const double waited = s->waited_ms;
    s->waited_ms = 0;
    const uint32_t deadline = code ? 0 : req.deadline_ms ? req.deadline_ms : s->deadline_ms;
    if (code)
        r.code = (fasa_status)code;
    else if (deadline && req.kind != EDGE_SHUTDOWN && waited > deadline)
        s_fail(&r, FASA_UNAVAILABLE,
               "deadline_ms: the request waited %.0f ms in the server's queue, past its "
               "deadline of %u ms, and did not run",
               waited, deadline);
    else
        s_dispatch(s, &req, waited, &h, &r, shutdown_p);
    const int rc = s_reply(s, rid, len, &h, &r, reply_p, reply_len_p);
    s_handled_free(&h);
    if (code == 0) edge_request_free(&req);
    s->last.bytes_out = rc ? 0 : *reply_len_p;
    s->last.ms = 1e3 * (s_now() - t_start);
    fasa_log_set_request(0);
    return rc;
}

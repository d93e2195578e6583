/* Sessions, placement and the step plan. See engine.h. */
#include "engine.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "attn.h"
#include "dtype.h"
#include "simd.h"
#include "topk.h"

#define MAX_LAYERS 1024
#define MAX_HEADS 1024
#define MAX_HEAD_DIM 1024
#define MAX_BUDGET (1 << 20)
/* Bounds on what one session may make the engine and every shard allocate up front:
 * layout cells (n_layers x n_heads x head_dim: key permutation and query masks), and
 * step candidates (selection units x budget, per shard). */
#define MAX_LAYOUT_CELLS (1 << 24)
#define MAX_STEP_CANDS (1 << 24)
/* Transport session numbers are never reused (the MPI workers index tables by them). */
#define MAX_SESSION_NUMBERS (1 << 24)

typedef struct session {
    char id[FASA_ID_MAX + 1];
    int sid;                 /* transport's session number */
    fasa_session_config cfg; /* profile and dense_layers point at the copies below */
    fasa_profile *profile;   /* owned copy or NULL */
    uint8_t *dense_layers;   /* (n_layers) */
    int32_t *n_appended;     /* (n_layers) */
    char *tier_dir;          /* owned copy of cfg.tier_dir or NULL */
    struct session *next;
} session;

struct fasa_engine {
    fasa_transport tr;
    int block; /* placement block, tokens */
    int next_sid;
    session *sessions; /* singly linked; a service holds few sessions */
    /* Step scratch, grow-only. */
    topk_cand *cands;  /* (n_shards, units, budget) */
    int *n_cands;      /* (n_shards, units) */
    topk_cand *merged; /* (units, n_shards * budget) */
    topk_cand *thr;    /* (units) */
    uint8_t *have_thr; /* (units) */
    float *m;          /* (n_shards, n_heads) partial maxima */
    double *l, *o;     /* (n_shards, n_heads [, head_dim]) partial sums */
    double *aux;       /* (n_shards, n_heads, SHARD_SPARQ_AUX(head_dim)) sparq sums */
    int *n_sel;        /* (units) tokens each unit selected */
    size_t cap_cands, cap_ncands, cap_merged, cap_units, cap_heads, cap_m, cap_l, cap_o;
    size_t cap_aux, cap_nsel;
};

static const char *const s_status_names[] = {"OK",
                                             "INVALID_ARGUMENT",
                                             "NOT_FOUND",
                                             "ALREADY_EXISTS",
                                             "RESOURCE_EXHAUSTED",
                                             "UNAUTHENTICATED",
                                             "FAILED_PRECONDITION",
                                             "INTERNAL",
                                             "UNAVAILABLE"};

const char *fasa_status_name(fasa_status code)
{
    return (unsigned)code < sizeof(s_status_names) / sizeof(*s_status_names) ? s_status_names[code]
                                                                             : "UNKNOWN";
}

static const char *const s_method_names[] = {"fasa", "dense", "oracle", "stream", "quest", "sparq"};

const char *fasa_method_name(fasa_method m)
{
    return (unsigned)m <= FASA_METHOD_LAST ? s_method_names[m] : "unknown";
}

int fasa_method_parse(const char *name, fasa_method *out_p)
{
    for (int i = 0; i <= FASA_METHOD_LAST; i++)
        if (strcmp(name, s_method_names[i]) == 0) {
            *out_p = (fasa_method)i;
            return 0;
        }
    return -1;
}

int fasa_gqa_parse(const char *name, fasa_gqa *out_p)
{
    if (strcmp(name, "per-head") == 0)
        *out_p = FASA_GQA_PER_HEAD;
    else if (strcmp(name, "shared") == 0)
        *out_p = FASA_GQA_SHARED;
    else
        return -1;
    return 0;
}

static fasa_status s_fail(fasa_error *err, fasa_status code, const char *fmt, ...)
{
    if (err) {
        err->code = code;
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->msg, sizeof(err->msg), fmt, ap);
        va_end(ap);
    }
    return code;
}

fasa_engine_t *fasa_engine_new_with(const fasa_transport *transport, int block_tokens)
{
    fasa_engine_t *e = calloc(1, sizeof(*e));
    if (!e) return NULL;
    e->tr = *transport;
    e->block = block_tokens > 0 ? block_tokens : FASA_DEFAULT_BLOCK;
    return e;
}

fasa_engine_t *fasa_engine_new(int n_shards, int block_tokens)
{
    fasa_transport t;
    if (n_shards < 1 || fasa_transport_local(&t, n_shards)) return NULL;
    fasa_engine_t *e = fasa_engine_new_with(&t, block_tokens);
    if (!e) t.destroy(t.ctx);
    return e;
}

static void s_session_free(session *s)
{
    fasa_profile_destroy(&s->profile);
    free(s->dense_layers);
    free(s->n_appended);
    free(s->tier_dir);
    free(s);
}

void fasa_engine_destroy(fasa_engine_t **engine_p)
{
    fasa_engine_t *e = *engine_p;
    if (!e) return;
    while (e->sessions) {
        session *s = e->sessions;
        e->sessions = s->next;
        e->tr.session_drop(e->tr.ctx, s->sid);
        s_session_free(s);
    }
    e->tr.destroy(e->tr.ctx);
    free(e->cands);
    free(e->n_cands);
    free(e->merged);
    free(e->thr);
    free(e->have_thr);
    free(e->m);
    free(e->l);
    free(e->o);
    free(e->aux);
    free(e->n_sel);
    free(e);
    *engine_p = NULL;
}

static session *s_find(const fasa_engine_t *e, const char *id)
{
    for (session *s = e->sessions; s; s = s->next)
        if (strcmp(s->id, id) == 0) return s;
    return NULL;
}

int32_t fasa_engine_length(const fasa_engine_t *e, const char *id, int layer)
{
    const session *s = s_find(e, id);
    if (!s || layer < 0 || layer >= s->cfg.n_layers) return -1;
    return s->n_appended[layer];
}

const fasa_session_config *fasa_engine_config(const fasa_engine_t *e, const char *id)
{
    const session *s = s_find(e, id);
    return s ? &s->cfg : NULL;
}

int fasa_engine_count(const fasa_engine_t *e)
{
    int n = 0;
    for (const session *s = e->sessions; s; s = s->next) n++;
    return n;
}

static int64_t s_kv_bytes(const session *s)
{
    int64_t rows = 0;
    for (int l = 0; l < s->cfg.n_layers; l++) rows += s->n_appended[l];
    return rows * 2 * s->cfg.n_kv_heads * s->cfg.head_dim * (int64_t)fasa_dtype_size(s->cfg.dtype);
}

int64_t fasa_engine_kv_bytes(const fasa_engine_t *e, const char *id)
{
    if (id) {
        const session *s = s_find(e, id);
        return s ? s_kv_bytes(s) : -1;
    }
    int64_t total = 0;
    for (const session *s = e->sessions; s; s = s->next) total += s_kv_bytes(s);
    return total;
}

fasa_status fasa_engine_shard_stats(fasa_engine_t *e, const char *id, fasa_shard_stats *out,
                                    fasa_error *err)
{
    const session *s = id ? s_find(e, id) : NULL;
    if (id && !s) return s_fail(err, FASA_NOT_FOUND, "session '%s' not found", id);
    if (!e->tr.shard_stats || e->tr.shard_stats(e->tr.ctx, s ? s->sid : -1, out))
        return s_fail(err, FASA_INTERNAL, "a shard did not report what it holds");
    return FASA_OK;
}

/* Packs each KV head's keys by the union of its query heads' dominant FCs (shard.h). */
static int s_layout_from_profile(shard_layout *lay, const fasa_session_config *c,
                                 const fasa_profile *p)
{
    if (shard_layout_plain(lay, c->n_layers, c->n_heads, c->n_kv_heads, c->head_dim)) return -1;
    lay->dtype = c->dtype;
    lay->tier = c->tier;
    if (c->tier == SHARD_TIER_DISK && !(lay->tier_dir = strdup(c->tier_dir))) {
        shard_layout_cleanup(lay);
        return -1;
    }
    if (!p) return 0;
    const int d = c->head_dim, grp = c->n_heads / c->n_kv_heads;
    uint8_t in_union[MAX_HEAD_DIM], own[MAX_HEAD_DIM];
    for (int l = 0; l < c->n_layers; l++)
        for (int g = 0; g < c->n_kv_heads; g++) {
            memset(in_union, 0, (size_t)d);
            for (int i = 0; i < grp; i++)
                for (int t = 0; t < p->ntip; t++) {
                    int d0, d1;
                    fc_dims(c->pairing, d,
                            p->fcs[((size_t)l * c->n_heads + g * grp + i) * p->ntip + t], &d0, &d1);
                    in_union[d0] = in_union[d1] = 1;
                }
            int *perm = lay->perm + ((size_t)l * c->n_kv_heads + g) * d, u = 0;
            for (int x = 0; x < d; x++)
                if (in_union[x]) perm[u++] = x;
            lay->n_dom[l * c->n_kv_heads + g] = u;
            for (int x = 0, r = u; x < d; x++)
                if (!in_union[x]) perm[r++] = x;
            for (int i = 0; i < grp; i++) {
                const int h = g * grp + i;
                memset(own, 0, (size_t)d);
                for (int t = 0; t < p->ntip; t++) {
                    int d0, d1;
                    fc_dims(c->pairing, d, p->fcs[((size_t)l * c->n_heads + h) * p->ntip + t], &d0,
                            &d1);
                    own[d0] = own[d1] = 1;
                }
                uint8_t *mask = lay->qmask + ((size_t)l * c->n_heads + h) * d;
                for (int x = 0; x < u; x++) mask[x] = own[perm[x]];
            }
        }
    return 0;
}

static fasa_status s_check_config(const fasa_session_config *c, fasa_error *err)
{
    if (c->n_layers < 1 || c->n_layers > MAX_LAYERS)
        return s_fail(err, FASA_INVALID_ARGUMENT, "n_layers %d out of range [1, %d]", c->n_layers,
                      MAX_LAYERS);
    if (c->n_kv_heads < 1 || c->n_kv_heads > MAX_HEADS)
        return s_fail(err, FASA_INVALID_ARGUMENT, "n_kv_heads %d out of range [1, %d]",
                      c->n_kv_heads, MAX_HEADS);
    if (c->n_heads < c->n_kv_heads || c->n_heads > MAX_HEADS || c->n_heads % c->n_kv_heads)
        return s_fail(err, FASA_INVALID_ARGUMENT,
                      "n_heads %d must be a multiple of n_kv_heads %d and at most %d", c->n_heads,
                      c->n_kv_heads, MAX_HEADS);
    if (c->head_dim < 2 || c->head_dim > MAX_HEAD_DIM || c->head_dim % 2)
        return s_fail(err, FASA_INVALID_ARGUMENT, "head_dim %d must be even and in [2, %d]",
                      c->head_dim, MAX_HEAD_DIM);
    if (!fc_pairing_name(c->pairing))
        return s_fail(err, FASA_INVALID_ARGUMENT, "pairing %d is not interleaved or half",
                      (int)c->pairing);
    if ((unsigned)c->method > FASA_METHOD_LAST)
        return s_fail(err, FASA_INVALID_ARGUMENT, "method %d is unknown", (int)c->method);
    if (c->gqa != FASA_GQA_PER_HEAD && c->gqa != FASA_GQA_SHARED)
        return s_fail(err, FASA_INVALID_ARGUMENT, "gqa %d is unknown", (int)c->gqa);
    if (c->method == FASA_METHOD_SPARQ && c->gqa == FASA_GQA_SHARED)
        return s_fail(err, FASA_INVALID_ARGUMENT, "method sparq supports gqa per-head only");
    if (!fasa_dtype_name(c->dtype))
        return s_fail(err, FASA_INVALID_ARGUMENT, "dtype %d is not f32, f16 or bf16", c->dtype);
    if (c->tier != SHARD_TIER_RAM && c->tier != SHARD_TIER_DISK)
        return s_fail(err, FASA_INVALID_ARGUMENT, "tier %d is not ram (0) or disk (1)", c->tier);
    if (c->tier == SHARD_TIER_DISK) {
        struct stat sb;
        if (!c->tier_dir || stat(c->tier_dir, &sb) || !S_ISDIR(sb.st_mode) ||
            access(c->tier_dir, W_OK))
            return s_fail(err, FASA_INVALID_ARGUMENT,
                          "tier disk: tier_dir '%s' is not a writable directory",
                          c->tier_dir ? c->tier_dir : "(none)");
    }
    if (c->budget < 1 || c->budget > MAX_BUDGET)
        return s_fail(err, FASA_INVALID_ARGUMENT, "budget %d out of range [1, %d]", c->budget,
                      MAX_BUDGET);
    const int64_t cells = (int64_t)c->n_layers * c->n_heads * c->head_dim;
    if (cells > MAX_LAYOUT_CELLS)
        return s_fail(err, FASA_RESOURCE_EXHAUSTED,
                      "n_layers x n_heads x head_dim = %lld is over the limit of %d",
                      (long long)cells, MAX_LAYOUT_CELLS);
    if ((int64_t)c->n_heads * c->budget > MAX_STEP_CANDS)
        return s_fail(err, FASA_RESOURCE_EXHAUSTED,
                      "budget %d x n_heads %d = %lld candidates per step is over the limit of %d",
                      c->budget, c->n_heads, (long long)c->n_heads * c->budget, MAX_STEP_CANDS);
    if (c->method == FASA_METHOD_FASA && !c->profile)
        return s_fail(err, FASA_FAILED_PRECONDITION,
                      "method fasa needs a calibration profile (fasa calibrate)");
    if (c->profile) {
        char why[200];
        if (fasa_profile_check(c->profile, c->n_layers, c->n_heads, c->n_kv_heads, c->head_dim,
                               c->pairing, why, sizeof(why)))
            return s_fail(err, FASA_INVALID_ARGUMENT, "%s", why);
    }
    return FASA_OK;
}

fasa_status fasa_engine_create(fasa_engine_t *e, const char *id, const fasa_session_config *cfg,
                               fasa_error *err)
{
    const size_t id_len = id ? strlen(id) : 0;
    if (id_len == 0 || id_len > FASA_ID_MAX)
        return s_fail(err, FASA_INVALID_ARGUMENT, "session id must be 1..%d bytes", FASA_ID_MAX);
    for (size_t i = 0; i < id_len; i++)
        if (id[i] < 0x21 || id[i] > 0x7e)
            return s_fail(err, FASA_INVALID_ARGUMENT, "session id must be printable ASCII");
    fasa_status st = s_check_config(cfg, err);
    if (st) return st;
    if (cfg->method == FASA_METHOD_QUEST && e->block % FASA_QUEST_PAGE)
        return s_fail(err, FASA_FAILED_PRECONDITION,
                      "method quest needs a placement block that is a multiple of %d tokens "
                      "(this engine places blocks of %d)",
                      FASA_QUEST_PAGE, e->block);
    if (s_find(e, id)) return s_fail(err, FASA_ALREADY_EXISTS, "session '%s' already exists", id);
    if (e->next_sid >= MAX_SESSION_NUMBERS)
        return s_fail(err, FASA_RESOURCE_EXHAUSTED,
                      "this engine has used all its %d session numbers; restart it",
                      MAX_SESSION_NUMBERS);

    session *s = calloc(1, sizeof(*s));
    shard_layout lay = {0};
    if (!s) goto oom;
    memcpy(s->id, id, id_len + 1);
    s->cfg = *cfg;
    s->dense_layers = calloc((size_t)cfg->n_layers, 1);
    s->n_appended = calloc((size_t)cfg->n_layers, sizeof(int32_t));
    if (!s->dense_layers || !s->n_appended) goto oom;
    if (cfg->dense_layers)
        memcpy(s->dense_layers, cfg->dense_layers, (size_t)cfg->n_layers);
    else
        s->dense_layers[0] = 1;
    if (cfg->profile && !(s->profile = fasa_profile_clone(cfg->profile))) goto oom;
    s->cfg.profile = s->profile;
    s->cfg.dense_layers = s->dense_layers;
    if (cfg->tier_dir && !(s->tier_dir = strdup(cfg->tier_dir))) goto oom;
    s->cfg.tier_dir = s->tier_dir;
    if (s_layout_from_profile(&lay, cfg, s->profile)) goto oom;
    s->sid = e->next_sid++;
    if (e->tr.session_new(e->tr.ctx, s->sid, &lay)) goto oom;
    shard_layout_cleanup(&lay);
    s->next = e->sessions;
    e->sessions = s;
    return FASA_OK;
oom:
    shard_layout_cleanup(&lay);
    if (s) s_session_free(s);
    return s_fail(err, FASA_RESOURCE_EXHAUSTED, "out of memory creating session '%s'", id);
}

fasa_status fasa_engine_set_profile(fasa_engine_t *e, const char *id, const fasa_profile *profile,
                                    fasa_error *err)
{
    session *s = s_find(e, id);
    if (!s) return s_fail(err, FASA_NOT_FOUND, "session '%s' not found", id ? id : "");
    for (int l = 0; l < s->cfg.n_layers; l++)
        if (s->n_appended[l])
            return s_fail(err, FASA_FAILED_PRECONDITION,
                          "session '%s' already holds tokens; its profile can only be set "
                          "before the first append",
                          id);
    if (e->next_sid >= MAX_SESSION_NUMBERS)
        return s_fail(err, FASA_RESOURCE_EXHAUSTED,
                      "this engine has used all its %d session numbers; restart it",
                      MAX_SESSION_NUMBERS);
    fasa_session_config c = s->cfg;
    c.profile = profile;
    fasa_status st = s_check_config(&c, err);
    if (st) return st;
    fasa_profile *copy = NULL;
    shard_layout lay = {0};
    if ((profile && !(copy = fasa_profile_clone(profile))) || s_layout_from_profile(&lay, &c, copy))
        goto oom;
    /* A fresh transport session with the new layout; the old one goes once it exists. */
    const int sid = e->next_sid++;
    if (e->tr.session_new(e->tr.ctx, sid, &lay)) goto oom;
    shard_layout_cleanup(&lay);
    e->tr.session_drop(e->tr.ctx, s->sid);
    s->sid = sid;
    fasa_profile_destroy(&s->profile);
    s->profile = copy;
    s->cfg.profile = copy;
    return FASA_OK;
oom:
    shard_layout_cleanup(&lay);
    fasa_profile_destroy(&copy);
    return s_fail(err, FASA_RESOURCE_EXHAUSTED, "out of memory setting the profile of '%s'", id);
}

fasa_status fasa_engine_drop(fasa_engine_t *e, const char *id, fasa_error *err)
{
    for (session **pp = &e->sessions; *pp; pp = &(*pp)->next)
        if (strcmp((*pp)->id, id) == 0) {
            session *s = *pp;
            *pp = s->next;
            e->tr.session_drop(e->tr.ctx, s->sid);
            s_session_free(s);
            return FASA_OK;
        }
    return s_fail(err, FASA_NOT_FOUND, "session '%s' not found", id ? id : "");
}

/* Index of the first non-finite value, or -1. The first pass only tests the exponent bits
 * (all ones for NaN and infinity) and vectorises; the index is looked for only on failure. */
static long s_nonfinite(size_t n, const float *x)
{
    uint32_t bad = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t b;
        memcpy(&b, x + i, sizeof(b));
        bad |= (b & 0x7f800000u) == 0x7f800000u;
    }
    if (!bad) return -1;
    for (size_t i = 0; i < n; i++)
        if (!isfinite(x[i])) return (long)i;
    return -1;
}

/* Index of the first value that overflows the storage dtype (rounds to infinity: f16
 * |x| >= 65520, bf16 |x| >= 0x1.fefp127 = 3.3961e38), or -1. Such values are rejected, not
 * stored as inf. x is finite. */
static long s_overflow(int dtype, size_t n, const float *x)
{
    if (dtype == FASA_DTYPE_F32) return -1;
    const float lim = dtype == FASA_DTYPE_F16 ? 65520.0f : 0x1.fefp127f;
    uint32_t bad = 0;
    for (size_t i = 0; i < n; i++) bad |= fabsf(x[i]) >= lim;
    if (!bad) return -1;
    for (size_t i = 0; i < n; i++)
        if (fasa_dtype_overflows(dtype, x[i])) return (long)i;
    return -1;
}

/* Hands rows pos0 .. pos0 + n - 1 of one layer to their shards, one block run at a time.
 * Each run is added whole or not at all, so on failure the rows placed so far (*placed_p)
 * are a prefix, and the session stays consistent once its length counts them. */
static int s_place(fasa_engine_t *e, session *s, int layer, int32_t pos0, int n, const float *k,
                   const float *v, int *placed_p)
{
    *placed_p = 0;
    const size_t row = (size_t)s->cfg.n_kv_heads * s->cfg.head_dim;
    int32_t pos[1024];
    for (int i = 0; i < n;) {
        const int32_t p = pos0 + i;
        const int shard = (int)((p / e->block) % e->tr.n_shards);
        int run = (int)(e->block - p % e->block);
        if (run > n - i) run = n - i;
        if (run > 1024) run = 1024;
        for (int j = 0; j < run; j++) pos[j] = p + j;
        if (e->tr.append(e->tr.ctx, s->sid, shard, layer, run, pos, k + (size_t)i * row,
                         v + (size_t)i * row))
            return -1;
        i += run;
        *placed_p = i;
    }
    return 0;
}

fasa_status fasa_engine_append(fasa_engine_t *e, const char *id, int layer, int32_t pos0, int n,
                               const float *k, const float *v, fasa_error *err)
{
    session *s = s_find(e, id);
    if (!s) return s_fail(err, FASA_NOT_FOUND, "session '%s' not found", id ? id : "");
    const fasa_session_config *c = &s->cfg;
    if (layer < -1 || layer >= c->n_layers)
        return s_fail(err, FASA_INVALID_ARGUMENT, "layer %d out of range [-1, %d)", layer,
                      c->n_layers);
    if (n < 1) return s_fail(err, FASA_INVALID_ARGUMENT, "n_tokens %d must be at least 1", n);
    const int l0 = layer < 0 ? 0 : layer, l1 = layer < 0 ? c->n_layers : layer + 1;
    for (int l = l0; l < l1; l++)
        if (pos0 != s->n_appended[l])
            return s_fail(err, FASA_INVALID_ARGUMENT,
                          "start_pos %d: layer %d expects position %d next (appends are in order)",
                          (int)pos0, l, (int)s->n_appended[l]);
    if ((int64_t)pos0 + n > INT32_MAX)
        return s_fail(err, FASA_RESOURCE_EXHAUSTED, "n_tokens: a session holds at most %d tokens",
                      INT32_MAX);
    const size_t per_layer = (size_t)n * c->n_kv_heads * c->head_dim;
    const size_t total = per_layer * (size_t)(l1 - l0);
    long bad;
    if ((bad = s_nonfinite(total, k)) >= 0)
        return s_fail(err, FASA_INVALID_ARGUMENT, "k[%ld] is not finite", bad);
    if ((bad = s_nonfinite(total, v)) >= 0)
        return s_fail(err, FASA_INVALID_ARGUMENT, "v[%ld] is not finite", bad);
    if ((bad = s_overflow(c->dtype, total, k)) >= 0)
        return s_fail(err, FASA_INVALID_ARGUMENT, "k[%ld] value %g overflows %s", bad,
                      (double)k[bad], fasa_dtype_name(c->dtype));
    if ((bad = s_overflow(c->dtype, total, v)) >= 0)
        return s_fail(err, FASA_INVALID_ARGUMENT, "v[%ld] value %g overflows %s", bad,
                      (double)v[bad], fasa_dtype_name(c->dtype));
    for (int l = l0; l < l1; l++) {
        const size_t off = per_layer * (size_t)(l - l0);
        int placed;
        const int failed = s_place(e, s, l, pos0, n, k + off, v + off, &placed);
        s->n_appended[l] += placed;
        if (failed)
            return s_fail(err, FASA_RESOURCE_EXHAUSTED,
                          "out of memory appending to '%s': layer %d now holds %d tokens (%d of "
                          "the %d sent)%s",
                          id, l, (int)s->n_appended[l], placed, n,
                          l > l0 ? "; the layers before it took them all" : "");
    }
    return FASA_OK;
}

static int s_grow(void **buf, size_t *cap, size_t bytes)
{
    if (bytes <= *cap) return 0;
    void *p = realloc(*buf, bytes);
    if (!p) return -1;
    *buf = p;
    *cap = bytes;
    return 0;
}

static int s_scratch(fasa_engine_t *e, int units, int budget, int n_heads, int d)
{
    const size_t ns = (size_t)e->tr.n_shards;
    return s_grow((void **)&e->cands, &e->cap_cands, ns * units * budget * sizeof(topk_cand)) ||
           s_grow((void **)&e->n_cands, &e->cap_ncands, ns * units * sizeof(int)) ||
           s_grow((void **)&e->merged, &e->cap_merged, ns * units * budget * sizeof(topk_cand)) ||
           s_grow((void **)&e->thr, &e->cap_units, (size_t)units * sizeof(topk_cand)) ||
           s_grow((void **)&e->have_thr, &e->cap_heads, (size_t)units) ||
           s_grow((void **)&e->m, &e->cap_m, ns * n_heads * sizeof(float)) ||
           s_grow((void **)&e->l, &e->cap_l, ns * n_heads * sizeof(double)) ||
           s_grow((void **)&e->o, &e->cap_o, ns * n_heads * d * sizeof(double)) ||
           s_grow((void **)&e->aux, &e->cap_aux,
                  ns * n_heads * SHARD_SPARQ_AUX(d) * sizeof(double)) ||
           s_grow((void **)&e->n_sel, &e->cap_nsel, (size_t)units * sizeof(int));
}

fasa_status fasa_engine_attend(fasa_engine_t *e, const char *id, const fasa_attend_req *req,
                               float *out, int32_t *selected, fasa_step_stats *stats,
                               fasa_error *err)
{
    session *s = s_find(e, id);
    if (!s) return s_fail(err, FASA_NOT_FOUND, "session '%s' not found", id ? id : "");
    const fasa_session_config *c = &s->cfg;
    const int d = c->head_dim, nh = c->n_heads, grp = nh / c->n_kv_heads;

    /* Validate everything before touching state. */
    if (req->layer < 0 || req->layer >= c->n_layers)
        return s_fail(err, FASA_INVALID_ARGUMENT, "layer %d out of range [0, %d)", req->layer,
                      c->n_layers);
    const fasa_method method = req->method < 0 ? c->method : (fasa_method)req->method;
    if ((unsigned)method > FASA_METHOD_LAST)
        return s_fail(err, FASA_INVALID_ARGUMENT, "method %d is unknown", req->method);
    if (method == FASA_METHOD_QUEST && e->block % FASA_QUEST_PAGE)
        return s_fail(err, FASA_FAILED_PRECONDITION,
                      "method quest needs a placement block that is a multiple of %d tokens "
                      "(this engine places blocks of %d)",
                      FASA_QUEST_PAGE, e->block);
    if (method == FASA_METHOD_FASA && !s->profile)
        return s_fail(err, FASA_FAILED_PRECONDITION,
                      "method fasa: session '%s' has no calibration profile", id);
    const int budget = req->budget ? req->budget : c->budget;
    if (budget < 1 || budget > MAX_BUDGET)
        return s_fail(err, FASA_INVALID_ARGUMENT, "budget %d out of range [1, %d]", budget,
                      MAX_BUDGET);
    if ((int64_t)nh * budget > MAX_STEP_CANDS)
        return s_fail(err, FASA_RESOURCE_EXHAUSTED,
                      "budget %d x n_heads %d = %lld candidates per step is over the limit of %d",
                      budget, nh, (long long)nh * budget, MAX_STEP_CANDS);
    const fasa_gqa gqa = req->gqa < 0 ? c->gqa : (fasa_gqa)req->gqa;
    if (gqa != FASA_GQA_PER_HEAD && gqa != FASA_GQA_SHARED)
        return s_fail(err, FASA_INVALID_ARGUMENT, "gqa %d is unknown", req->gqa);
    if (method == FASA_METHOD_SPARQ && gqa == FASA_GQA_SHARED)
        return s_fail(err, FASA_INVALID_ARGUMENT, "method sparq supports gqa per-head only");
    if (!req->q) return s_fail(err, FASA_INVALID_ARGUMENT, "q is missing");
    long bad;
    if ((bad = s_nonfinite((size_t)nh * d, req->q)) >= 0)
        return s_fail(err, FASA_INVALID_ARGUMENT, "q[%ld] is not finite", bad);
    if (!req->k_new != !req->v_new)
        return s_fail(err, FASA_INVALID_ARGUMENT, "k_new and v_new come together");
    const size_t kv_row = (size_t)c->n_kv_heads * d;
    if (req->k_new && (bad = s_nonfinite(kv_row, req->k_new)) >= 0)
        return s_fail(err, FASA_INVALID_ARGUMENT, "k_new[%ld] is not finite", bad);
    if (req->v_new && (bad = s_nonfinite(kv_row, req->v_new)) >= 0)
        return s_fail(err, FASA_INVALID_ARGUMENT, "v_new[%ld] is not finite", bad);
    if (req->k_new && (bad = s_overflow(s->cfg.dtype, kv_row, req->k_new)) >= 0)
        return s_fail(err, FASA_INVALID_ARGUMENT, "k_new[%ld] value %g overflows %s", bad,
                      (double)req->k_new[bad], fasa_dtype_name(s->cfg.dtype));
    if (req->v_new && (bad = s_overflow(s->cfg.dtype, kv_row, req->v_new)) >= 0)
        return s_fail(err, FASA_INVALID_ARGUMENT, "v_new[%ld] value %g overflows %s", bad,
                      (double)req->v_new[bad], fasa_dtype_name(s->cfg.dtype));
    const int32_t length = s->n_appended[req->layer] + (req->k_new ? 1 : 0);
    const int32_t max_pos = req->max_pos < 0 ? length - 1 : req->max_pos;
    if (max_pos >= length)
        return s_fail(err, FASA_INVALID_ARGUMENT, "max_pos %d beyond the %d tokens appended",
                      (int)max_pos, (int)length);
    if (length == 0)
        return s_fail(err, FASA_FAILED_PRECONDITION, "layer %d of '%s' holds no tokens yet",
                      req->layer, id);
    const int units = gqa == FASA_GQA_SHARED ? c->n_kv_heads : nh;
    /* The shards' budget: tokens, or for quest whole pages (ceil(B/16)). */
    const int sbudget =
        method == FASA_METHOD_QUEST ? (budget + FASA_QUEST_PAGE - 1) / FASA_QUEST_PAGE : budget;
    if (s_scratch(e, units, sbudget, nh, d))
        return s_fail(err, FASA_RESOURCE_EXHAUSTED, "out of memory for a step of budget %d",
                      budget);

    int placed = 0;
    if (req->k_new && s_place(e, s, req->layer, length - 1, 1, req->k_new, req->v_new, &placed))
        return s_fail(err, FASA_RESOURCE_EXHAUSTED, "out of memory appending k_new to '%s'", id);
    s->n_appended[req->layer] += placed;

    const int n_vis = max_pos + 1;
    const int dense = method == FASA_METHOD_DENSE ||
                      (method == FASA_METHOD_FASA && s->dense_layers[req->layer]) ||
                      n_vis <= budget;
    static const shard_method s_shard_methods[] = {SHARD_FASA,   SHARD_DENSE, SHARD_ORACLE,
                                                   SHARD_STREAM, SHARD_QUEST, SHARD_SPARQ};
    /* sparq's r: the dims fasa would use (2 ntip) with a profile, else head_dim / 4. */
    int sparq_r = s->profile ? 2 * s->profile->ntip : d / 4;
    sparq_r = sparq_r < 1 ? 1 : sparq_r > d ? d : sparq_r;
    shard_step st = {.layer = req->layer,
                     .method = dense ? SHARD_DENSE : s_shard_methods[method],
                     .gqa = gqa == FASA_GQA_SHARED ? SHARD_GQA_SHARED : SHARD_GQA_PER_HEAD,
                     .budget = sbudget,
                     .max_pos = max_pos,
                     .scale = 1.0f / sqrtf((float)d),
                     .q = req->q,
                     .sparq_r = !dense && method == FASA_METHOD_SPARQ ? sparq_r : 0};
    const int ns = e->tr.n_shards;
    int64_t bytes = 0;
    if (selected)
        for (size_t i = 0; i < (size_t)nh * budget; i++) selected[i] = -1;

    if (!dense) {
        /* Phase 1: local candidates; merge them into each unit's global top-B. */
        if (e->tr.score(e->tr.ctx, s->sid, &st, e->cands, e->n_cands)) goto oom;
        for (int u = 0; u < units; u++) {
            topk_cand *mu = e->merged + (size_t)u * ns * sbudget;
            int n = 0;
            for (int sh = 0; sh < ns; sh++) {
                const int nc = e->n_cands[sh * units + u];
                memcpy(mu + n, e->cands + ((size_t)sh * units + u) * sbudget,
                       (size_t)nc * sizeof(topk_cand));
                n += nc;
            }
            n = topk_select(n, sbudget, mu);
            topk_sort(n, mu);
            e->n_sel[u] = n;
            e->have_thr[u] = n > 0;
            if (n > 0) e->thr[u] = mu[n - 1];
            if (selected) {
                const int h0 = gqa == FASA_GQA_SHARED ? u * grp : u;
                const int h1 = gqa == FASA_GQA_SHARED ? h0 + grp : u + 1;
                for (int h = h0; h < h1; h++) {
                    int32_t *sh = selected + (size_t)h * budget;
                    if (method != FASA_METHOD_QUEST) {
                        for (int i = 0; i < n; i++) sh[i] = mu[i].pos;
                        continue;
                    }
                    /* A quest candidate is a page: list its visible tokens. */
                    int k = 0;
                    for (int i = 0; i < n && k < budget; i++)
                        for (int32_t p = mu[i].pos;
                             p < mu[i].pos + FASA_QUEST_PAGE && p <= max_pos && k < budget; p++)
                            sh[k++] = p;
                }
            }
        }
    } else if (selected && method != FASA_METHOD_DENSE && n_vis <= budget) {
        for (int h = 0; h < nh; h++)
            for (int i = 0; i < n_vis; i++) selected[(size_t)h * budget + i] = i;
    }

    /* Phase 2: partials on every shard, merged exactly per head. */
    if (e->tr.attend(e->tr.ctx, s->sid, &st, e->thr, e->have_thr, e->m, e->l, e->o, e->aux, &bytes))
        goto oom;
    const size_t na = SHARD_SPARQ_AUX(d);
    for (int h = 0; h < nh; h++) {
        float mp[ns], mh;
        double lp[ns], lh, op[(size_t)ns * d], oh[d];
        for (int sh = 0; sh < ns; sh++) {
            mp[sh] = e->m[sh * nh + h];
            lp[sh] = e->l[sh * nh + h];
            memcpy(op + (size_t)sh * d, e->o + ((size_t)sh * nh + h) * d,
                   (size_t)d * sizeof(double));
        }
        attn_merge(ns, d, mp, lp, op, &mh, &lh, oh);
        attn_finalize(d, lh, oh, out + (size_t)h * d);
        if (st.method == SHARD_SPARQ) {
            /* Mean-value reallocation: the global softmax normaliser of z, the selected
             * tokens' share alpha of it, and the mean of every visible value. */
            double zmax = -INFINITY, z = 0, count = 0, vbar[d], alpha = 0;
            for (int sh = 0; sh < ns; sh++) {
                const double *a = e->aux + ((size_t)sh * nh + h) * na;
                if (a[0] > zmax) zmax = a[0];
            }
            for (int c = 0; c < d; c++) vbar[c] = 0;
            for (int sh = 0; sh < ns; sh++) {
                const double *a = e->aux + ((size_t)sh * nh + h) * na;
                if (a[2] > 0) z += a[1] * exp(a[0] - zmax);
                count += a[2];
                for (int c = 0; c < d; c++) vbar[c] += a[3 + c];
            }
            const topk_cand *mu = e->merged + (size_t)h * ns * sbudget;
            for (int i = 0; i < e->n_sel[h]; i++) alpha += exp((double)mu[i].score - zmax);
            alpha = z > 0 ? alpha / z : 1.0;
            for (int c = 0; c < d; c++)
                out[(size_t)h * d + c] =
                    (float)(alpha * (oh[c] / lh) + (1.0 - alpha) * vbar[c] / count);
        }
    }
    if (stats) {
        stats->method_used = dense ? FASA_METHOD_DENSE : method;
        stats->n_visible = n_vis;
        stats->bytes_read = bytes;
    }
    return FASA_OK;
oom:
    return s_fail(err, FASA_RESOURCE_EXHAUSTED,
                  "a shard failed (out of memory) during a step of '%s'%s", id,
                  req->k_new ? "; k_new and v_new were appended before the step" : "");
}

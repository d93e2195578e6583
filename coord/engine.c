/* Sessions, placement and the step plan. See engine.h. */
#include "engine.h"
#include "load.h"
#include "phase.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "attn.h"
#include "dtype.h"
#include "env.h"
#include "names.h"
#include "scan.h"
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

/* What one shard holds of one layer of a session: rows, distinct QUEST pages, and the last
 * page (pages are aligned positions / SHARD_QUEST_PAGE), from which shard_layer_bytes gives
 * the bytes the shard allocates for them. The engine keeps these so that it can refuse an
 * append that would take a shard over the memory limit before it sends any row. */
typedef struct acct {
    int64_t rows, pages;
    int32_t last_page;
} acct;

typedef struct session {
    char id[FASA_ID_MAX + 1];
    int sid;                 /* transport's session number */
    fasa_session_config cfg; /* profile and dense_layers point at the copies below */
    fasa_profile *profile;   /* owned copy or NULL */
    uint8_t *dense_layers;   /* (n_layers) */
    int32_t *n_appended;     /* (n_layers) */
    acct *held;              /* (n_shards, n_layers) what each shard holds of each layer */
    int *n_dom;              /* (n_layers, n_kv_heads) the layout's packed dims, for held */
    char *tier_dir;          /* owned copy of cfg.tier_dir or NULL */
    struct session *next;
} session;

struct fasa_engine {
    fasa_transport tr;
    int block;         /* placement block, tokens */
    int pipeline;      /* batches pipelined (FASA_PIPELINE=0 in the environment: not) */
    int one_exchange;  /* one-shard sparse steps in one exchange (fasa_engine_set_one_exchange) */
    double merge_eps;  /* local merge's eps (fasa_engine_set_merge_eps) */
    int64_t mem_limit; /* bytes per shard, 0 = none */
    int max_sessions;  /* sessions held at once, 0 = no limit (fasa_engine_set_max_sessions) */
    char *tier_dir;    /* disk tier sessions that name none (fasa_engine_set_tier_dir) */
    int64_t *shard_bytes; /* (n_shards) KV store bytes each shard allocates */
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
    double *merge;  /* (ns + ns * head_dim + 2 * head_dim) one head's partials, for the merge */
    float *merge_m; /* (ns) */
    size_t cap_merge, cap_merge_m;
};

const char *fasa_status_name(fasa_status code)
{
    return fasa_names_status((int)code);
}

const char *fasa_method_name(fasa_method m)
{
    return fasa_names_method((int)m);
}

int fasa_method_parse(const char *name, fasa_method *out_p)
{
    const int m = fasa_names_method_parse(name);
    if (m < 0) return -1;
    *out_p = (fasa_method)m;
    return 0;
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

fasa_status fasa_error_set(fasa_error *err, fasa_status code, const char *fmt, ...)
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

fasa_engine_t *fasa_engine_new_with(fasa_transport *transport, int block_tokens)
{
    fasa_engine_t *e = calloc(1, sizeof(*e));
    if (!e) return NULL;
    e->tr = *transport;
    e->block = block_tokens > 0 ? block_tokens : FASA_DEFAULT_BLOCK;
    e->pipeline = fasa_env_get()->pipeline;
    e->one_exchange = fasa_env_get()->one_exchange;
    e->merge_eps = FASA_MERGE_EPS_DEFAULT;
    if (!(e->shard_bytes = calloc((size_t)transport->n_shards, sizeof(int64_t)))) {
        free(e);
        return NULL;
    }
    *transport = (fasa_transport){0}; /* the engine's now */
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
    free(s->held);
    free(s->n_dom);
    free(s->tier_dir);
    free(s);
}

void fasa_engine_destroy(fasa_engine_t **engine_p)
{
    fasa_engine_t *e = engine_p ? *engine_p : NULL;
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
    free(e->shard_bytes);
    free(e->tier_dir);
    free(e->merge);
    free(e->merge_m);
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

int fasa_engine_shard_rss(fasa_engine_t *e, int64_t *out)
{
    return e->tr.shard_rss ? e->tr.shard_rss(e->tr.ctx, out) : -1;
}

fasa_status fasa_engine_shard_stats(fasa_engine_t *e, const char *id, fasa_shard_stats *out,
                                    fasa_error *err)
{
    const session *s = id ? s_find(e, id) : NULL;
    if (id && !s) return fasa_error_set(err, FASA_NOT_FOUND, "session '%s' not found", id);
    if (!e->tr.shard_stats || e->tr.shard_stats(e->tr.ctx, s ? s->sid : -1, out))
        return fasa_error_set(err, FASA_INTERNAL, "a shard did not report what it holds");
    return FASA_OK;
}

/* Packs each KV head's keys by the union of its query heads' dominant FCs (shard.h). */
static int s_layout_from_profile(shard_layout *lay, const fasa_session_config *c,
                                 const fasa_profile *p)
{
    if (shard_layout_plain(lay, c->n_layers, c->n_heads, c->n_kv_heads, c->head_dim)) return -1;
    lay->dtype = c->dtype;
    lay->score_dtype = c->score_dtype;
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
        return fasa_error_set(err, FASA_INVALID_ARGUMENT, "n_layers %d out of range [1, %d]",
                              c->n_layers, MAX_LAYERS);
    if (c->n_kv_heads < 1 || c->n_kv_heads > MAX_HEADS)
        return fasa_error_set(err, FASA_INVALID_ARGUMENT, "n_kv_heads %d out of range [1, %d]",
                              c->n_kv_heads, MAX_HEADS);
    if (c->n_heads < c->n_kv_heads || c->n_heads > MAX_HEADS || c->n_heads % c->n_kv_heads)
        return fasa_error_set(err, FASA_INVALID_ARGUMENT,
                              "n_heads %d must be a multiple of n_kv_heads %d and at most %d",
                              c->n_heads, c->n_kv_heads, MAX_HEADS);
    if (c->head_dim < 2 || c->head_dim > MAX_HEAD_DIM || c->head_dim % 2)
        return fasa_error_set(err, FASA_INVALID_ARGUMENT, "head_dim %d must be even and in [2, %d]",
                              c->head_dim, MAX_HEAD_DIM);
    if (!fc_pairing_name(c->pairing))
        return fasa_error_set(err, FASA_INVALID_ARGUMENT, "pairing %d is not interleaved or half",
                              (int)c->pairing);
    if ((unsigned)c->method > FASA_METHOD_LAST)
        return fasa_error_set(err, FASA_INVALID_ARGUMENT, "method %d is unknown", (int)c->method);
    if (c->gqa != FASA_GQA_PER_HEAD && c->gqa != FASA_GQA_SHARED)
        return fasa_error_set(err, FASA_INVALID_ARGUMENT, "gqa %d is unknown", (int)c->gqa);
    if (c->method == FASA_METHOD_SPARQ && c->gqa == FASA_GQA_SHARED)
        return fasa_error_set(err, FASA_INVALID_ARGUMENT,
                              "method sparq supports gqa per-head only");
    if (c->method == FASA_METHOD_FASA_PLUS && c->gqa == FASA_GQA_SHARED)
        return fasa_error_set(err, FASA_INVALID_ARGUMENT,
                              "method fasa-plus supports gqa per-head only");
    if (!fasa_dtype_name(c->dtype))
        return fasa_error_set(err, FASA_INVALID_ARGUMENT, "dtype %d is not f32, f16 or bf16",
                              c->dtype);
    if (!scan_dtype_valid(c->score_dtype))
        return fasa_error_set(err, FASA_INVALID_ARGUMENT,
                              "score_dtype %d is not auto, f32, f16, bf16 or int8", c->score_dtype);
    if (c->merge != FASA_MERGE_EXACT && c->merge != FASA_MERGE_LOCAL)
        return fasa_error_set(err, FASA_INVALID_ARGUMENT, "merge %d is not exact (0) or local (1)",
                              c->merge);
    if (c->tier != SHARD_TIER_RAM && c->tier != SHARD_TIER_DISK)
        return fasa_error_set(err, FASA_INVALID_ARGUMENT, "tier %d is not ram (0) or disk (1)",
                              c->tier);
    if (c->tier == SHARD_TIER_DISK) {
        struct stat sb;
        if (!c->tier_dir || stat(c->tier_dir, &sb) || !S_ISDIR(sb.st_mode) ||
            access(c->tier_dir, W_OK))
            return fasa_error_set(err, FASA_INVALID_ARGUMENT,
                                  "tier disk: tier_dir '%s' is not a writable directory",
                                  c->tier_dir ? c->tier_dir : "(none)");
    }
    if (c->budget < 1 || c->budget > MAX_BUDGET)
        return fasa_error_set(err, FASA_INVALID_ARGUMENT, "budget %d out of range [1, %d]",
                              c->budget, MAX_BUDGET);
    const int64_t cells = (int64_t)c->n_layers * c->n_heads * c->head_dim;
    if (cells > MAX_LAYOUT_CELLS)
        return fasa_error_set(err, FASA_RESOURCE_EXHAUSTED,
                              "n_layers x n_heads x head_dim = %lld is over the limit of %d",
                              (long long)cells, MAX_LAYOUT_CELLS);
    if ((int64_t)c->n_heads * c->budget > MAX_STEP_CANDS)
        return fasa_error_set(
            err, FASA_RESOURCE_EXHAUSTED,
            "budget %d x n_heads %d = %lld candidates per step is over the limit of %d", c->budget,
            c->n_heads, (long long)c->n_heads * c->budget, MAX_STEP_CANDS);
    if (c->method == FASA_METHOD_FASA && !c->profile)
        return fasa_error_set(err, FASA_FAILED_PRECONDITION,
                              "method fasa needs a calibration profile (fasa calibrate)");
    if (c->profile) {
        char why[200];
        if (fasa_profile_check(c->profile, c->n_layers, c->n_heads, c->n_kv_heads, c->head_dim,
                               c->pairing, why, sizeof(why)))
            return fasa_error_set(err, FASA_INVALID_ARGUMENT, "%s", why);
    }
    return FASA_OK;
}

fasa_status fasa_engine_create(fasa_engine_t *e, const char *id, const fasa_session_config *cfg,
                               fasa_error *err)
{
    /* A disk-tier session that names no directory uses the engine's (the server's
     * --tier-dir). */
    fasa_session_config with_dir;
    if (cfg && cfg->tier == SHARD_TIER_DISK && !cfg->tier_dir && e->tier_dir) {
        with_dir = *cfg;
        with_dir.tier_dir = e->tier_dir;
        cfg = &with_dir;
    }
    const size_t id_len = id ? strlen(id) : 0;
    if (id_len == 0 || id_len > FASA_ID_MAX)
        return fasa_error_set(err, FASA_INVALID_ARGUMENT, "session id must be 1..%d bytes",
                              FASA_ID_MAX);
    for (size_t i = 0; i < id_len; i++)
        if (id[i] < 0x21 || id[i] > 0x7e)
            return fasa_error_set(err, FASA_INVALID_ARGUMENT, "session id must be printable ASCII");
    fasa_status st = s_check_config(cfg, err);
    if (st) return st;
    if (cfg->method == FASA_METHOD_QUEST && e->block % FASA_QUEST_PAGE)
        return fasa_error_set(
            err, FASA_FAILED_PRECONDITION,
            "method quest needs a placement block that is a multiple of %d tokens "
            "(this engine places blocks of %d)",
            FASA_QUEST_PAGE, e->block);
    if (s_find(e, id))
        return fasa_error_set(err, FASA_ALREADY_EXISTS, "session '%s' already exists", id);
    if (e->max_sessions > 0 && fasa_engine_count(e) >= e->max_sessions)
        return fasa_error_set(err, FASA_RESOURCE_EXHAUSTED,
                              "the server holds its limit of %d sessions (--max-sessions)",
                              e->max_sessions);
    if (e->next_sid >= MAX_SESSION_NUMBERS)
        return fasa_error_set(err, FASA_RESOURCE_EXHAUSTED,
                              "this engine has used all its %d session numbers; restart it",
                              MAX_SESSION_NUMBERS);

    session *s = calloc(1, sizeof(*s));
    shard_layout lay = {0};
    if (!s) goto oom;
    memcpy(s->id, id, id_len + 1);
    s->cfg = *cfg;
    s->dense_layers = calloc((size_t)cfg->n_layers, 1);
    s->n_appended = calloc((size_t)cfg->n_layers, sizeof(int32_t));
    s->held = calloc((size_t)e->tr.n_shards * cfg->n_layers, sizeof(acct));
    if (!s->dense_layers || !s->n_appended || !s->held) goto oom;
    for (size_t i = 0; i < (size_t)e->tr.n_shards * cfg->n_layers; i++) s->held[i].last_page = -1;
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
    const size_t n_dom_bytes = (size_t)cfg->n_layers * cfg->n_kv_heads * sizeof(int);
    if (!(s->n_dom = malloc(n_dom_bytes))) goto oom;
    memcpy(s->n_dom, lay.n_dom, n_dom_bytes);
    s->sid = e->next_sid++;
    if (e->tr.session_new(e->tr.ctx, s->sid, &lay)) goto oom;
    shard_layout_cleanup(&lay);
    s->next = e->sessions;
    e->sessions = s;
    return FASA_OK;
oom:
    shard_layout_cleanup(&lay);
    if (s) s_session_free(s);
    return fasa_error_set(err, FASA_RESOURCE_EXHAUSTED, "out of memory creating session '%s'", id);
}

fasa_status fasa_engine_set_profile(fasa_engine_t *e, const char *id, const fasa_profile *profile,
                                    fasa_error *err)
{
    session *s = s_find(e, id);
    if (!s) return fasa_error_set(err, FASA_NOT_FOUND, "session '%s' not found", id ? id : "");
    for (int l = 0; l < s->cfg.n_layers; l++)
        if (s->n_appended[l])
            return fasa_error_set(err, FASA_FAILED_PRECONDITION,
                                  "session '%s' already holds tokens; its profile can only be set "
                                  "before the first append",
                                  id);
    if (e->next_sid >= MAX_SESSION_NUMBERS)
        return fasa_error_set(err, FASA_RESOURCE_EXHAUSTED,
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
    memcpy(s->n_dom, lay.n_dom, (size_t)c.n_layers * c.n_kv_heads * sizeof(int));
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
    return fasa_error_set(err, FASA_RESOURCE_EXHAUSTED, "out of memory setting the profile of '%s'",
                          id);
}

static int64_t s_acct_bytes(const session *s, int layer, const acct *a)
{
    const shard_layout lay = {.n_layers = s->cfg.n_layers,
                              .n_heads = s->cfg.n_heads,
                              .n_kv_heads = s->cfg.n_kv_heads,
                              .head_dim = s->cfg.head_dim,
                              .n_dom = s->n_dom,
                              .dtype = s->cfg.dtype,
                              .tier = s->cfg.tier};
    return (int64_t)shard_layer_bytes(&lay, layer, a->rows, a->pages);
}

/* Rows p0 .. p0 + n - 1 join a shard's layer (as shard.c's s_new_pages counts pages). */
static void s_acct_add(acct *a, int32_t p0, int n)
{
    const int32_t first = p0 / SHARD_QUEST_PAGE, last = (p0 + n - 1) / SHARD_QUEST_PAGE;
    a->rows += n;
    a->pages += last - first + 1 - (first == a->last_page);
    a->last_page = last;
}

/* Tokens [p, p + n) of one layer in runs that stay on one shard and one placement block. */
static int s_run_len(const fasa_engine_t *e, int32_t p, int n)
{
    const int run = (int)(e->block - p % e->block);
    return run < n ? run : n;
}

/* Refuses (RESOURCE_EXHAUSTED, nothing sent) an append of tokens pos0 .. pos0 + n - 1 to
 * layers l0 .. l1 - 1 that would take a shard's KV store over the memory limit. */
static fasa_status s_check_limit(fasa_engine_t *e, const session *s, int l0, int l1, int32_t pos0,
                                 int n, fasa_error *err)
{
    if (e->mem_limit <= 0) return FASA_OK;
    const int S = e->tr.n_shards, L = s->cfg.n_layers;
    int64_t *grow = calloc((size_t)S, sizeof(int64_t));
    if (!grow) return fasa_error_set(err, FASA_RESOURCE_EXHAUSTED, "out of memory");
    for (int l = l0; l < l1; l++) {
        /* Each shard's rows change once per run; simulate on copies, shard by shard. */
        for (int sh = 0; sh < S; sh++) {
            acct a = s->held[sh * L + l];
            const int64_t before = s_acct_bytes(s, l, &a);
            int touched = 0;
            for (int i = 0; i < n;) {
                const int32_t p = pos0 + i;
                const int run = s_run_len(e, p, n - i);
                if ((int)((p / e->block) % S) == sh) s_acct_add(&a, p, run), touched = 1;
                i += run;
            }
            if (touched) grow[sh] += s_acct_bytes(s, l, &a) - before;
        }
    }
    fasa_status st = FASA_OK;
    for (int sh = 0; sh < S && !st; sh++)
        if (grow[sh] > 0 && e->shard_bytes[sh] + grow[sh] > e->mem_limit)
            st = fasa_error_set(
                err, FASA_RESOURCE_EXHAUSTED,
                "memory limit: %d tokens would take shard %d to %lld bytes, "
                "over the limit of %lld bytes per shard (--memory-limit; it holds %lld)",
                n, sh, (long long)(e->shard_bytes[sh] + grow[sh]), (long long)e->mem_limit,
                (long long)e->shard_bytes[sh]);
    free(grow);
    return st;
}

int fasa_engine_set_tier_dir(fasa_engine_t *e, const char *dir)
{
    char *copy = dir && *dir ? strdup(dir) : NULL;
    if (dir && *dir && !copy) return -1;
    free(e->tier_dir);
    e->tier_dir = copy;
    return 0;
}

void fasa_engine_set_max_sessions(fasa_engine_t *e, int max_sessions)
{
    e->max_sessions = max_sessions > 0 ? max_sessions : 0;
}

void fasa_engine_set_memory_limit(fasa_engine_t *e, int64_t bytes_per_shard)
{
    e->mem_limit = bytes_per_shard > 0 ? bytes_per_shard : 0;
}

int64_t fasa_engine_shard_bytes(const fasa_engine_t *e, int shard)
{
    return shard >= 0 && shard < e->tr.n_shards ? e->shard_bytes[shard] : -1;
}

fasa_status fasa_engine_drop(fasa_engine_t *e, const char *id, fasa_error *err)
{
    for (session **pp = &e->sessions; *pp; pp = &(*pp)->next)
        if (strcmp((*pp)->id, id) == 0) {
            session *s = *pp;
            *pp = s->next;
            e->tr.session_drop(e->tr.ctx, s->sid);
            for (int sh = 0; sh < e->tr.n_shards; sh++)
                for (int l = 0; l < s->cfg.n_layers; l++)
                    e->shard_bytes[sh] -= s_acct_bytes(s, l, &s->held[sh * s->cfg.n_layers + l]);
            s_session_free(s);
            return FASA_OK;
        }
    return fasa_error_set(err, FASA_NOT_FOUND, "session '%s' not found", id ? id : "");
}

/* Keys, values and queries must be finite and below 2^50 (about 1.1e15) in magnitude: then
 * no dot product of head_dim <= 1024 terms (2^110) or sum of them overflows a float, where
 * a huge but finite input would silently give a wrong step (or NaN under sparq). */
#define MAX_ABS_EXP (127 + 50) /* biased exponent of 2^50 */
#define MAX_ABS_TEXT "2^50 (1.1e15)"

/* Index of the first value that is not finite or is at least 2^50 in magnitude, or -1. The
 * first pass only compares exponent bits and vectorises; the index is looked for only on
 * failure. */
static long s_nonfinite(size_t n, const float *x)
{
    uint32_t bad = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t b;
        memcpy(&b, x + i, sizeof(b));
        bad |= (b & 0x7f800000u) >= ((uint32_t)MAX_ABS_EXP << 23);
    }
    if (!bad) return -1;
    for (size_t i = 0; i < n; i++) {
        uint32_t b;
        memcpy(&b, x + i, sizeof(b));
        if ((b & 0x7f800000u) >= ((uint32_t)MAX_ABS_EXP << 23)) return (long)i;
    }
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
        acct *a = &s->held[shard * s->cfg.n_layers + layer];
        const int64_t before = s_acct_bytes(s, layer, a);
        s_acct_add(a, p, run);
        e->shard_bytes[shard] += s_acct_bytes(s, layer, a) - before;
        i += run;
        *placed_p = i;
    }
    return 0;
}

/* Index of the first f16/bf16 value that is not finite, is at least 2^50 in magnitude or
 * overflows the storage dtype, or -1: one vectorisable pass over the bits (an f16 is
 * always below 2^50 and fits f16, bf16 and f32). */
static long s_bad_half(int in_dt, int store_dt, size_t n, const uint16_t *x)
{
    /* bf16: biased exponent >= MAX_ABS_EXP (NaN and inf included), or |x| >= 65536 (the
     * first bf16 at or above 65520) into f16. */
    const uint16_t lim = in_dt == FASA_DTYPE_F16      ? 0x7c00u
                         : store_dt == FASA_DTYPE_F16 ? 0x4780u
                                                      : (uint16_t)(MAX_ABS_EXP << 7);
    uint16_t bad = 0;
    for (size_t i = 0; i < n; i++) bad |= (uint16_t)((x[i] & 0x7fffu) >= lim);
    if (!bad) return -1;
    for (size_t i = 0; i < n; i++)
        if ((x[i] & 0x7fffu) >= lim) return (long)i;
    return -1;
}

/* The f32 checks of an append in one pass per tensor: the index of the first value that
 * is not finite, at least 2^50, or overflows the storage dtype, or -1. */
static long s_bad_f32(int store_dt, size_t n, const float *x)
{
    const float lim = store_dt == FASA_DTYPE_F16    ? 65520.0f
                      : store_dt == FASA_DTYPE_BF16 ? 0x1.fefp127f
                                                    : INFINITY;
    uint32_t bad = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t b;
        memcpy(&b, x + i, sizeof(b));
        bad |= ((b & 0x7f800000u) >= ((uint32_t)MAX_ABS_EXP << 23)) | (fabsf(x[i]) >= lim);
    }
    if (!bad) return -1;
    const long a = s_nonfinite(n, x), o = s_overflow(store_dt, n, x);
    return a >= 0 && (o < 0 || a <= o) ? a : o;
}

/* One value's error: k[i] of an append of dtype in_dt into a session of store_dt. */
static fasa_status s_bad_value(fasa_error *err, const char *name, long i, int in_dt, int store_dt,
                               const void *x)
{
    float f;
    if (in_dt == FASA_DTYPE_F32)
        f = ((const float *)x)[i];
    else {
        const uint16_t h = ((const uint16_t *)x)[i];
        f = in_dt == FASA_DTYPE_F16 ? fasa_f16_to_f32(h) : fasa_bf16_to_f32(h);
    }
    uint32_t b;
    memcpy(&b, &f, sizeof(b));
    if ((b & 0x7f800000u) >= ((uint32_t)MAX_ABS_EXP << 23))
        return fasa_error_set(err, FASA_INVALID_ARGUMENT,
                              "%s[%ld] = %g: values must be finite and below " MAX_ABS_TEXT, name,
                              i, (double)f);
    return fasa_error_set(err, FASA_INVALID_ARGUMENT, "%s[%ld] value %g overflows %s", name, i,
                          (double)f, fasa_dtype_name(store_dt));
}

/* Hands every row of an append (layers l0 .. l1 - 1) to its shards in one transport call,
 * all or nothing, and accounts them on success. */
static int s_place_runs(fasa_engine_t *e, session *s, int l0, int l1, int32_t pos0, int n,
                        int dtype, const void *k, const void *v)
{
    const size_t row = (size_t)s->cfg.n_kv_heads * s->cfg.head_dim * fasa_dtype_size(dtype);
    int n_runs = 0;
    for (int i = 0; i < n; i += s_run_len(e, pos0 + i, n - i)) n_runs++;
    fasa_append_run *runs = malloc((size_t)n_runs * (size_t)(l1 - l0) * sizeof(*runs));
    if (!runs) return -1;
    int m = 0;
    for (int l = l0; l < l1; l++) {
        const size_t off = (size_t)(l - l0) * n * row;
        for (int i = 0; i < n;) {
            const int32_t p = pos0 + i;
            const int run = s_run_len(e, p, n - i);
            runs[m++] = (fasa_append_run){.shard = (int)((p / e->block) % e->tr.n_shards),
                                          .layer = l,
                                          .n = run,
                                          .pos0 = p,
                                          .k = (const char *)k + off + (size_t)i * row,
                                          .v = (const char *)v + off + (size_t)i * row};
            i += run;
        }
    }
    const int rc = e->tr.append_runs(e->tr.ctx, s->sid, dtype, m, runs);
    for (int i = 0; !rc && i < m; i++) {
        acct *a = &s->held[runs[i].shard * s->cfg.n_layers + runs[i].layer];
        const int64_t before = s_acct_bytes(s, runs[i].layer, a);
        s_acct_add(a, runs[i].pos0, runs[i].n);
        e->shard_bytes[runs[i].shard] += s_acct_bytes(s, runs[i].layer, a) - before;
    }
    free(runs);
    return rc;
}

long fasa_engine_bad_value(int in_dtype, int store_dtype, size_t n, const void *x)
{
    return in_dtype == FASA_DTYPE_F32 ? s_bad_f32(store_dtype, n, x)
                                      : s_bad_half(in_dtype, store_dtype, n, x);
}

fasa_status fasa_engine_value_error(fasa_error *err, const char *name, long i, int in_dtype,
                                    int store_dtype, const void *x)
{
    return s_bad_value(err, name, i, in_dtype, store_dtype, x);
}

static fasa_status s_append_dt(fasa_engine_t *e, const char *id, int layer, int32_t pos0, int n,
                               int dtype, const void *k, const void *v, int check, fasa_error *err);

fasa_status fasa_engine_append_dt(fasa_engine_t *e, const char *id, int layer, int32_t pos0, int n,
                                  int dtype, const void *k, const void *v, fasa_error *err)
{
    return s_append_dt(e, id, layer, pos0, n, dtype, k, v, 1, err);
}

fasa_status fasa_engine_append_checked(fasa_engine_t *e, const char *id, int layer, int32_t pos0,
                                       int n, int dtype, const void *k, const void *v,
                                       fasa_error *err)
{
    return s_append_dt(e, id, layer, pos0, n, dtype, k, v, 0, err);
}

/* fasa_engine_append_dt; check 0: the values were checked by the caller. */
static fasa_status s_append_dt(fasa_engine_t *e, const char *id, int layer, int32_t pos0, int n,
                               int dtype, const void *k, const void *v, int check, fasa_error *err)
{
    session *s = s_find(e, id);
    if (!s) return fasa_error_set(err, FASA_NOT_FOUND, "session '%s' not found", id ? id : "");
    if (dtype != FASA_DTYPE_F32 && dtype != FASA_DTYPE_F16 && dtype != FASA_DTYPE_BF16)
        return fasa_error_set(err, FASA_INVALID_ARGUMENT, "dtype %d is not f32, f16 or bf16",
                              dtype);
    if (!e->tr.append_runs && dtype != FASA_DTYPE_F32)
        return fasa_error_set(err, FASA_INVALID_ARGUMENT,
                              "this transport takes f32 appends only (dtype %s)",
                              fasa_dtype_name(dtype));
    const fasa_session_config *c = &s->cfg;
    if (layer < -1 || layer >= c->n_layers)
        return fasa_error_set(err, FASA_INVALID_ARGUMENT, "layer %d out of range [-1, %d)", layer,
                              c->n_layers);
    if (n < 1)
        return fasa_error_set(err, FASA_INVALID_ARGUMENT, "n_tokens %d must be at least 1", n);
    const int l0 = layer < 0 ? 0 : layer, l1 = layer < 0 ? c->n_layers : layer + 1;
    for (int l = l0; l < l1; l++)
        if (pos0 != s->n_appended[l])
            return fasa_error_set(
                err, FASA_INVALID_ARGUMENT,
                "start_pos %d: layer %d expects position %d next (appends are in order)", (int)pos0,
                l, (int)s->n_appended[l]);
    if ((int64_t)pos0 + n > INT32_MAX)
        return fasa_error_set(err, FASA_RESOURCE_EXHAUSTED,
                              "n_tokens: a session holds at most %d tokens", INT32_MAX);
    const size_t per_layer = (size_t)n * c->n_kv_heads * c->head_dim;
    const size_t total = per_layer * (size_t)(l1 - l0);
    const void *kv[2] = {k, v};
    for (int t = 0; check && t < 2; t++) {
        const long bad = fasa_engine_bad_value(dtype, c->dtype, total, kv[t]);
        if (bad >= 0) return s_bad_value(err, t ? "v" : "k", bad, dtype, c->dtype, kv[t]);
    }
    fasa_status st = s_check_limit(e, s, l0, l1, pos0, n, err);
    if (st) return st;
    if (e->tr.append_runs) {
        if (s_place_runs(e, s, l0, l1, pos0, n, dtype, k, v))
            return fasa_error_set(
                err, FASA_RESOURCE_EXHAUSTED,
                "out of memory appending %d tokens to '%s' (a shard ran out of "
                "memory or failed): nothing was stored, the session still holds %d",
                n, id, (int)s->n_appended[l0]);
        for (int l = l0; l < l1; l++) s->n_appended[l] += n;
        return FASA_OK;
    }
    /* A transport without append_runs: f32 rows layer by layer, each layer's taken part kept. */
    for (int l = l0; l < l1; l++) {
        const size_t off = per_layer * (size_t)(l - l0);
        int placed;
        const int failed =
            s_place(e, s, l, pos0, n, (const float *)k + off, (const float *)v + off, &placed);
        s->n_appended[l] += placed;
        if (failed)
            return fasa_error_set(
                err, FASA_RESOURCE_EXHAUSTED,
                "out of memory appending to '%s': layer %d now holds %d tokens (%d of "
                "the %d sent)%s",
                id, l, (int)s->n_appended[l], placed, n,
                l > l0 ? "; the layers before it took them all" : "");
    }
    return FASA_OK;
}

fasa_status fasa_engine_append(fasa_engine_t *e, const char *id, int layer, int32_t pos0, int n,
                               const float *k, const float *v, fasa_error *err)
{
    return fasa_engine_append_dt(e, id, layer, pos0, n, FASA_DTYPE_F32, k, v, err);
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

/* One step as planned: what the checks decided, the shard step, and where its phases put
 * their results (the engine's scratch for a single step, the batch's own for a batch). */
typedef struct step_plan {
    session *s;
    const char *id;
    const fasa_attend_req *req;
    fasa_method method;
    fasa_gqa gqa;
    int budget, sbudget, units, n_vis, dense;
    int local; /* local merge (engine.h fasa_merge): one phase, no global select */
    int one;   /* exact, and every visible row on one shard: score and attend in one exchange */
    shard_step st;
    topk_cand *cands, *merged, *thr; /* (ns, units, sbudget), (units, ns * sbudget), (units) */
    int *n_cands, *n_sel;            /* (ns, units), (units) */
    uint8_t *have_thr;               /* (units) */
    float *m;                        /* (ns, n_heads) */
    double *l, *o, *aux;             /* (ns, n_heads [, head_dim | SHARD_SPARQ_AUX]) */
    int64_t bytes;
} step_plan;

/* fasa-plus's recent window (engine.h): budget / (2 ntip) - 1 tokens, in [0, budget - 1]. */
static int s_plus_recent(const session *s, int budget)
{
    const int w = budget / (2 * s->profile->ntip) - SHARD_PLUS_SINKS;
    return w < 0 ? 0 : w > budget - 1 ? budget - 1 : w;
}

/* Checks a step and fills the plan; changes nothing (k_new is appended by s_plan_commit). */
static fasa_status s_plan_check(fasa_engine_t *e, const char *id, const fasa_attend_req *req,
                                step_plan *p, fasa_error *err)
{
    memset(p, 0, sizeof(*p));
    session *s = s_find(e, id);
    if (!s) return fasa_error_set(err, FASA_NOT_FOUND, "session '%s' not found", id ? id : "");
    const fasa_session_config *c = &s->cfg;
    const int d = c->head_dim, nh = c->n_heads;

    /* Validate everything before touching state. */
    if (req->layer < 0 || req->layer >= c->n_layers)
        return fasa_error_set(err, FASA_INVALID_ARGUMENT, "layer %d out of range [0, %d)",
                              req->layer, c->n_layers);
    const fasa_method method = req->method < 0 ? c->method : (fasa_method)req->method;
    if ((unsigned)method > FASA_METHOD_LAST)
        return fasa_error_set(err, FASA_INVALID_ARGUMENT, "method %d is unknown", req->method);
    if (method == FASA_METHOD_QUEST && e->block % FASA_QUEST_PAGE)
        return fasa_error_set(
            err, FASA_FAILED_PRECONDITION,
            "method quest needs a placement block that is a multiple of %d tokens "
            "(this engine places blocks of %d)",
            FASA_QUEST_PAGE, e->block);
    if ((method == FASA_METHOD_FASA || method == FASA_METHOD_FASA_PLUS) && !s->profile)
        return fasa_error_set(err, FASA_FAILED_PRECONDITION,
                              "method %s: session '%s' has no calibration profile",
                              fasa_method_name(method), id);
    const int budget = req->budget ? req->budget : c->budget;
    if (budget < 1 || budget > MAX_BUDGET)
        return fasa_error_set(err, FASA_INVALID_ARGUMENT, "budget %d out of range [1, %d]", budget,
                              MAX_BUDGET);
    if ((int64_t)nh * budget > MAX_STEP_CANDS)
        return fasa_error_set(
            err, FASA_RESOURCE_EXHAUSTED,
            "budget %d x n_heads %d = %lld candidates per step is over the limit of %d", budget, nh,
            (long long)nh * budget, MAX_STEP_CANDS);
    const fasa_gqa gqa = req->gqa < 0 ? c->gqa : (fasa_gqa)req->gqa;
    if (gqa != FASA_GQA_PER_HEAD && gqa != FASA_GQA_SHARED)
        return fasa_error_set(err, FASA_INVALID_ARGUMENT, "gqa %d is unknown", req->gqa);
    if (method == FASA_METHOD_SPARQ && gqa == FASA_GQA_SHARED)
        return fasa_error_set(err, FASA_INVALID_ARGUMENT,
                              "method sparq supports gqa per-head only");
    if (method == FASA_METHOD_FASA_PLUS && gqa == FASA_GQA_SHARED)
        return fasa_error_set(err, FASA_INVALID_ARGUMENT,
                              "method fasa-plus supports gqa per-head only");
    const int merge = req->merge < 0 ? c->merge : req->merge;
    if (merge != FASA_MERGE_EXACT && merge != FASA_MERGE_LOCAL)
        return fasa_error_set(err, FASA_INVALID_ARGUMENT, "merge %d is unknown", req->merge);
    if (merge == FASA_MERGE_LOCAL && method != FASA_METHOD_FASA && method != FASA_METHOD_ORACLE &&
        method != FASA_METHOD_DENSE)
        return fasa_error_set(err, FASA_INVALID_ARGUMENT,
                              "merge local supports methods fasa and oracle (not %s)",
                              fasa_method_name(method));
    if (merge == FASA_MERGE_LOCAL && !e->tr.attend_local)
        return fasa_error_set(err, FASA_FAILED_PRECONDITION,
                              "merge local: this engine's transport cannot run it");
    if (!req->q) return fasa_error_set(err, FASA_INVALID_ARGUMENT, "q is missing");
    long bad;
    if ((bad = s_nonfinite((size_t)nh * d, req->q)) >= 0)
        return fasa_error_set(err, FASA_INVALID_ARGUMENT,
                              "q[%ld] = %g: values must be finite and below " MAX_ABS_TEXT, bad,
                              (double)req->q[bad]);
    if (!req->k_new != !req->v_new)
        return fasa_error_set(err, FASA_INVALID_ARGUMENT, "k_new and v_new come together");
    const size_t kv_row = (size_t)c->n_kv_heads * d;
    if (req->k_new && (bad = s_nonfinite(kv_row, req->k_new)) >= 0)
        return fasa_error_set(err, FASA_INVALID_ARGUMENT,
                              "k_new[%ld] = %g: values must be finite and below " MAX_ABS_TEXT, bad,
                              (double)req->k_new[bad]);
    if (req->v_new && (bad = s_nonfinite(kv_row, req->v_new)) >= 0)
        return fasa_error_set(err, FASA_INVALID_ARGUMENT,
                              "v_new[%ld] = %g: values must be finite and below " MAX_ABS_TEXT, bad,
                              (double)req->v_new[bad]);
    if (req->k_new && (bad = s_overflow(s->cfg.dtype, kv_row, req->k_new)) >= 0)
        return fasa_error_set(err, FASA_INVALID_ARGUMENT, "k_new[%ld] value %g overflows %s", bad,
                              (double)req->k_new[bad], fasa_dtype_name(s->cfg.dtype));
    if (req->v_new && (bad = s_overflow(s->cfg.dtype, kv_row, req->v_new)) >= 0)
        return fasa_error_set(err, FASA_INVALID_ARGUMENT, "v_new[%ld] value %g overflows %s", bad,
                              (double)req->v_new[bad], fasa_dtype_name(s->cfg.dtype));
    const int32_t length = s->n_appended[req->layer] + (req->k_new ? 1 : 0);
    const int32_t max_pos = req->max_pos < 0 ? length - 1 : req->max_pos;
    if (max_pos >= length)
        return fasa_error_set(err, FASA_INVALID_ARGUMENT,
                              "max_pos %d beyond the %d tokens appended", (int)max_pos,
                              (int)length);
    if (length == 0)
        return fasa_error_set(err, FASA_FAILED_PRECONDITION, "layer %d of '%s' holds no tokens yet",
                              req->layer, id);
    if (req->k_new) {
        fasa_status st = s_check_limit(e, s, req->layer, req->layer + 1, length - 1, 1, err);
        if (st) return st;
    }
    p->s = s;
    p->id = s->id;
    p->req = req;
    p->method = method;
    p->gqa = gqa;
    p->budget = budget;
    p->units = gqa == FASA_GQA_SHARED ? c->n_kv_heads : nh;
    /* The shards' budget: tokens, or for quest whole pages (ceil(B/16)). */
    p->sbudget =
        method == FASA_METHOD_QUEST ? (budget + FASA_QUEST_PAGE - 1) / FASA_QUEST_PAGE : budget;
    p->n_vis = max_pos + 1;
    p->dense = method == FASA_METHOD_DENSE ||
               ((method == FASA_METHOD_FASA || method == FASA_METHOD_FASA_PLUS) &&
                s->dense_layers[req->layer]) ||
               p->n_vis <= budget;
    p->local = merge == FASA_MERGE_LOCAL && !p->dense;
    if (p->local) p->sbudget = fasa_engine_local_budget(e, budget);
    /* Position p is on shard (p / block) mod n_shards (s_place, s_place_runs, the loads), and
     * a layer holds positions 0 .. length - 1, so with one shard, or every visible position
     * in the first block, shard 0 holds every visible row: its top-B is the global top-B,
     * and it can attend over it in the same exchange (transport.h score_attend). */
    p->one = !p->dense && !p->local && e->one_exchange && e->tr.score_attend &&
             (e->tr.n_shards == 1 || max_pos < e->block);
    static const shard_method s_shard_methods[] = {SHARD_FASA,     SHARD_DENSE, SHARD_ORACLE,
                                                   SHARD_STREAM,   SHARD_QUEST, SHARD_SPARQ,
                                                   SHARD_FASA_PLUS};
    /* sparq's r: the dims fasa would use (2 ntip) with a profile, else head_dim / 4. */
    int sparq_r = s->profile ? 2 * s->profile->ntip : d / 4;
    sparq_r = sparq_r < 1 ? 1 : sparq_r > d ? d : sparq_r;
    p->st = (shard_step){.layer = req->layer,
                         .method = p->dense ? SHARD_DENSE : s_shard_methods[method],
                         .gqa = gqa == FASA_GQA_SHARED ? SHARD_GQA_SHARED : SHARD_GQA_PER_HEAD,
                         .budget = p->sbudget,
                         .max_pos = max_pos,
                         .scale = 1.0f / sqrtf((float)d),
                         .q = req->q,
                         .sparq_r = p->dense                          ? 0
                                    : method == FASA_METHOD_SPARQ     ? sparq_r
                                    : method == FASA_METHOD_FASA_PLUS ? s_plus_recent(s, budget)
                                                                      : 0};
    return FASA_OK;
}

/* Appends the step's k_new (the one state change of a step, made after every check). */
static fasa_status s_plan_commit(fasa_engine_t *e, step_plan *p, fasa_error *err)
{
    const fasa_attend_req *req = p->req;
    if (!req->k_new) return FASA_OK;
    int placed = 0;
    const int32_t pos = p->s->n_appended[req->layer];
    const int failed = s_place(e, p->s, req->layer, pos, 1, req->k_new, req->v_new, &placed);
    p->s->n_appended[req->layer] += placed;
    if (failed)
        return fasa_error_set(err, FASA_RESOURCE_EXHAUSTED, "out of memory appending k_new to '%s'",
                              p->id);
    return FASA_OK;
}

/* Phase 1's merge (after the shards' candidates are in p->cands): each unit's global top-B,
 * its threshold, and the selected positions. Also fills selected for a dense step. */
static void s_plan_select(const fasa_engine_t *e, step_plan *p, int32_t *selected)
{
    const int ns = e->tr.n_shards, units = p->units, sbudget = p->sbudget, budget = p->budget;
    const int nh = p->s->cfg.n_heads, grp = nh / p->s->cfg.n_kv_heads;
    if (selected)
        for (size_t i = 0; i < (size_t)nh * budget; i++) selected[i] = -1;
    if (p->dense) {
        if (selected && p->method != FASA_METHOD_DENSE && p->n_vis <= budget)
            for (int h = 0; h < nh; h++)
                for (int i = 0; i < p->n_vis; i++) selected[(size_t)h * budget + i] = i;
        return;
    }
    for (int u = 0; u < units; u++) {
        topk_cand *mu = p->merged + (size_t)u * ns * sbudget;
        int n = 0;
        for (int sh = 0; sh < ns; sh++) {
            const int nc = p->n_cands[sh * units + u];
            memcpy(mu + n, p->cands + ((size_t)sh * units + u) * sbudget,
                   (size_t)nc * sizeof(topk_cand));
            n += nc;
        }
        n = topk_select(n, sbudget, mu);
        topk_sort(n, mu);
        p->n_sel[u] = n;
        p->have_thr[u] = n > 0;
        if (n > 0) p->thr[u] = mu[n - 1];
        if (selected) {
            const int h0 = p->gqa == FASA_GQA_SHARED ? u * grp : u;
            const int h1 = p->gqa == FASA_GQA_SHARED ? h0 + grp : u + 1;
            for (int h = h0; h < h1; h++) {
                int32_t *sh = selected + (size_t)h * budget;
                if (p->method != FASA_METHOD_QUEST) {
                    for (int i = 0; i < n; i++) sh[i] = mu[i].pos;
                    continue;
                }
                /* A quest candidate is a page: list its visible tokens. */
                int k = 0;
                for (int i = 0; i < n && k < budget; i++)
                    for (int32_t q = mu[i].pos;
                         q < mu[i].pos + FASA_QUEST_PAGE && q <= p->st.max_pos && k < budget; q++)
                        sh[k++] = q;
            }
        }
    }
}

/* fasa-plus's output of head h (engine.h) from the merged exact partials (mh, lh, oh over
 * the selected tokens) and the shards' aux (shard.h). The unselected tokens U:
 * - their mass: sum over U of exp(z_j) (z the partial score, scaled) times the factor
 *   that turns partial into full scores, the geometric mean of exp(scale mu), mu =
 *   q_rest . mean of the visible keys, and of the selected tokens' ratio sum exp(full) /
 *   sum exp(z) (the first ignores the spread of q_rest . k_rest, the second the bias of a
 *   set chosen for high z);
 * - their value: the mean of their values moved along the regression of v on z over U,
 *   vbar_U + cov(v, z) / var(z) (zhat - zbar_U), zhat the exp(z)-weighted mean of z over U.
 * vbar is scratch (2 head_dim). */
static void s_plus_finish(const step_plan *p, int h, int ns, const double *oh, float mh, double lh,
                          float *out, double *vbar)
{
    const int nh = p->s->cfg.n_heads, d = p->s->cfg.head_dim;
    const size_t na = SHARD_SPARQ_AUX(d);
    int n_att = 0; /* the rows the head attended: its group's union of selections */
    for (int sh = 0; sh < ns; sh++)
        n_att += (int)p->aux[((size_t)sh * nh + h) * na + SHARD_PLUS_NA(d)];
    const int n_unsel = p->n_vis - n_att;
    double zmax = -INFINITY, z = 0, qk = 0, e1 = 0, e2 = 0, z1 = 0, z2 = 0, zw = 0;
    double *vz = vbar + d;
    for (int sh = 0; sh < ns; sh++) {
        const double *a = p->aux + ((size_t)sh * nh + h) * na;
        if ((a[1] > 0 || a[SHARD_PLUS_E1(d)] > 0) && a[0] > zmax) zmax = a[0];
    }
    for (int c = 0; c < d; c++) vbar[c] = vz[c] = 0;
    for (int sh = 0; sh < ns; sh++) {
        const double *a = p->aux + ((size_t)sh * nh + h) * na;
        const double f = a[0] > -INFINITY ? exp(a[0] - zmax) : 0;
        if (a[1] > 0) z += a[1] * f, zw += a[SHARD_PLUS_ZW(d)] * f;
        e1 += a[SHARD_PLUS_E1(d)] * f;
        e2 += a[SHARD_PLUS_E2(d)] * f;
        qk += a[2];
        z1 += a[SHARD_PLUS_Z1(d)];
        z2 += a[SHARD_PLUS_Z2(d)];
        for (int c = 0; c < d; c++) vbar[c] += a[3 + c], vz[c] += a[SHARD_PLUS_VZ(d) + c];
    }
    if (n_unsel <= 0 || !(z > 0) || !(lh > 0)) return; /* nothing unselected: exact */
    /* log of the unselected mass, and the common frame F of both masses. */
    double lconv = (double)p->st.scale * qk / p->n_vis;
    if (e1 > 0 && e2 > 0) lconv = 0.5 * (lconv + log(e2 / e1));
    const double lu = log(z) + zmax + lconv;
    const double f = lu > mh ? lu : mh, ws = lh * exp(mh - f), wu = exp(lu - f);
    /* The unselected tokens' value (the regression needs a spread of z). */
    const double zbar = z1 / n_unsel, varz = z2 / n_unsel - zbar * zbar, zhat = zw / z;
    const int reg = n_unsel > 1 && varz > 1e-12 && isfinite(zhat);
    for (int c = 0; c < d; c++) {
        const double vb = vbar[c] / n_unsel;
        const double vu = reg ? vb + (vz[c] / n_unsel - vb * zbar) / varz * (zhat - zbar) : vb;
        out[(size_t)h * d + c] = (float)((oh[c] * exp(mh - f) + wu * vu) / (ws + wu));
    }
}

/* Phase 2's merge (after the shards' partials are in p->m, l, o, aux): the outputs. */
static int s_plan_finish(fasa_engine_t *e, const step_plan *p, float *out, fasa_step_stats *stats)
{
    const int ns = e->tr.n_shards, nh = p->s->cfg.n_heads, d = p->s->cfg.head_dim;
    const size_t na = SHARD_SPARQ_AUX(d);
    /* On the heap: with many shards and a large head_dim these would not fit a stack. */
    if (s_grow((void **)&e->merge, &e->cap_merge,
               ((size_t)ns + (size_t)ns * d + 3 * (size_t)d) * sizeof(double)) ||
        s_grow((void **)&e->merge_m, &e->cap_merge_m, (size_t)ns * sizeof(float)))
        return -1;
    float *mp = e->merge_m, mh;
    double *lp = e->merge, *op = lp + ns, *oh = op + (size_t)ns * d, *vbar = oh + d, lh;
    for (int h = 0; h < nh; h++) {
        for (int sh = 0; sh < ns; sh++) {
            mp[sh] = p->m[sh * nh + h];
            lp[sh] = p->l[sh * nh + h];
            memcpy(op + (size_t)sh * d, p->o + ((size_t)sh * nh + h) * d,
                   (size_t)d * sizeof(double));
        }
        attn_merge(ns, d, mp, lp, op, &mh, &lh, oh);
        attn_finalize(d, lh, oh, out + (size_t)h * d);
        if (p->st.method == SHARD_FASA_PLUS) s_plus_finish(p, h, ns, oh, mh, lh, out, vbar);
        if (p->st.method == SHARD_SPARQ) {
            /* Mean-value reallocation: the global softmax normaliser of z, the selected
             * tokens' share alpha of it, and the mean of every visible value. */
            double zmax = -INFINITY, z = 0, count = 0, alpha = 0;
            for (int sh = 0; sh < ns; sh++) {
                const double *a = p->aux + ((size_t)sh * nh + h) * na;
                if (a[0] > zmax) zmax = a[0];
            }
            for (int c = 0; c < d; c++) vbar[c] = 0;
            for (int sh = 0; sh < ns; sh++) {
                const double *a = p->aux + ((size_t)sh * nh + h) * na;
                if (a[2] > 0) z += a[1] * exp(a[0] - zmax);
                count += a[2];
                for (int c = 0; c < d; c++) vbar[c] += a[3 + c];
            }
            const topk_cand *mu = p->merged + (size_t)h * ns * p->sbudget;
            for (int i = 0; i < p->n_sel[h]; i++) alpha += exp((double)mu[i].score - zmax);
            alpha = z > 0 ? alpha / z : 1.0;
            for (int c = 0; c < d; c++)
                out[(size_t)h * d + c] =
                    (float)(alpha * (oh[c] / lh) + (1.0 - alpha) * vbar[c] / count);
        }
    }
    if (stats) {
        stats->merge_used = p->local ? FASA_MERGE_LOCAL : FASA_MERGE_EXACT;
        stats->local_budget = p->local ? p->sbudget : 0;
        stats->method_used = p->dense ? FASA_METHOD_DENSE : p->method;
        stats->n_visible = p->n_vis;
        stats->bytes_read = p->bytes;
        stats->score_us = stats->merge_us = stats->attend_us = 0;
        /* fasa-plus also reads, on each shard holding rows of the layer and once per KV
         * head g (u its packed dims), its running sums in f32: the values' (head_dim), the
         * keys' over the dims not packed (head_dim - u) and v kdom^T (head_dim x u). */
        if (p->st.method == SHARD_FASA_PLUS) {
            const int hkv = p->s->cfg.n_kv_heads, nl = p->s->cfg.n_layers;
            int64_t per = 0;
            for (int g = 0; g < hkv; g++) {
                const int u = p->s->n_dom[p->st.layer * hkv + g];
                per += (int64_t)(2 * d - u + d * u) * (int64_t)sizeof(float);
            }
            for (int sh = 0; sh < ns; sh++)
                if (p->s->held[sh * nl + p->st.layer].rows > 0) stats->bytes_read += per;
        }
    }
    return 0;
}

static fasa_status s_step_failed(const step_plan *p, fasa_error *err)
{
    return fasa_error_set(err, FASA_RESOURCE_EXHAUSTED,
                          "a shard failed (out of memory) during a step of '%s'%s", p->id,
                          p->req->k_new ? "; k_new and v_new were appended before the step" : "");
}

static double s_clock_us(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return 1e6 * (double)t.tv_sec + 1e-3 * (double)t.tv_nsec;
}

/* A step's k_new handed to the transport to ride along with the step's first phase
 * (transport.h stage_append) instead of an append exchange of its own: the same checks
 * and accounting as s_plan_commit, which s_plan_check's limit check already passed. */
static int s_plan_stage(fasa_engine_t *e, const step_plan *p, int *shard_p, int32_t *pos_p)
{
    const fasa_attend_req *req = p->req;
    const int32_t pos = p->s->n_appended[req->layer];
    const int shard = (int)((pos / e->block) % e->tr.n_shards);
    *shard_p = shard;
    *pos_p = pos;
    return e->tr.stage_append(e->tr.ctx, p->s->sid, shard, req->layer, pos, req->k_new, req->v_new);
}

/* After the phase that carried a staged k_new: the row counted where it landed. Returns 1
 * when it was appended. */
static int s_plan_staged(fasa_engine_t *e, step_plan *p, int shard, int32_t pos)
{
    if (!e->tr.staged_appended(e->tr.ctx)) return 0;
    const int layer = p->req->layer;
    acct *a = &p->s->held[shard * p->s->cfg.n_layers + layer];
    const int64_t before = s_acct_bytes(p->s, layer, a);
    s_acct_add(a, pos, 1);
    e->shard_bytes[shard] += s_acct_bytes(p->s, layer, a) - before;
    p->s->n_appended[layer]++;
    return 1;
}

fasa_status fasa_engine_attend(fasa_engine_t *e, const char *id, const fasa_attend_req *req,
                               float *out, int32_t *selected, fasa_step_stats *stats,
                               fasa_error *err)
{
    step_plan p;
    fasa_status st = s_plan_check(e, id, req, &p, err);
    if (st) return st;
    if (s_scratch(e, p.units, p.sbudget, p.s->cfg.n_heads, p.s->cfg.head_dim))
        return fasa_error_set(err, FASA_RESOURCE_EXHAUSTED, "out of memory for a step of budget %d",
                              p.budget);
    p.cands = e->cands, p.merged = e->merged, p.thr = e->thr, p.n_cands = e->n_cands;
    p.n_sel = e->n_sel, p.have_thr = e->have_thr, p.m = e->m, p.l = e->l, p.o = e->o;
    p.aux = e->aux;
    /* k_new rides along with the first phase where the transport can carry it (not under a
     * local merge, whose one phase appends nothing). */
    int staged = 0, k_shard = 0;
    int32_t k_pos = 0;
    if (req->k_new && !p.local && e->tr.stage_append && e->tr.staged_appended) {
        if (s_plan_stage(e, &p, &k_shard, &k_pos))
            return fasa_error_set(err, FASA_RESOURCE_EXHAUSTED,
                                  "out of memory staging k_new for '%s'", p.id);
        staged = 1;
    } else if ((st = s_plan_commit(e, &p, err))) {
        return st;
    }
    if (p.one) {
        /* One exchange: each shard's candidates and its attention over them, then the same
         * select and merge as two phases have (the same bits: transport.h score_attend). */
        const double t0 = s_clock_us();
        double t = fasa_phase_now();
        const int failed = e->tr.score_attend(e->tr.ctx, p.s->sid, &p.st, p.cands, p.n_cands, p.m,
                                              p.l, p.o, p.aux, &p.bytes);
        if (staged && !s_plan_staged(e, &p, k_shard, k_pos))
            return fasa_error_set(err, FASA_RESOURCE_EXHAUSTED,
                                  "a shard failed (out of memory) appending k_new to '%s'; "
                                  "nothing was appended",
                                  p.id);
        if (failed) return s_step_failed(&p, err);
        const double t1 = s_clock_us();
        t = fasa_phase_add(FASA_PHASE_ATTEND, t);
        s_plan_select(e, &p, selected);
        if (s_plan_finish(e, &p, out, stats))
            return fasa_error_set(err, FASA_RESOURCE_EXHAUSTED,
                                  "out of memory merging a step of '%s'", id);
        fasa_phase_add(FASA_PHASE_MERGE, t);
        if (stats) {
            stats->attend_us = t1 - t0; /* the one phase, as for a dense step */
            stats->merge_us = s_clock_us() - t1;
        }
        return FASA_OK;
    }
    if (p.local) {
        /* One phase on the shards, then the exact merge of their partials. */
        if (selected)
            for (size_t i = 0; i < (size_t)p.s->cfg.n_heads * p.budget; i++) selected[i] = -1;
        if (e->tr.attend_local(e->tr.ctx, p.s->sid, &p.st, p.m, p.l, p.o, &p.bytes))
            return s_step_failed(&p, err);
        if (s_plan_finish(e, &p, out, stats))
            return fasa_error_set(err, FASA_RESOURCE_EXHAUSTED,
                                  "out of memory merging a step of '%s'", id);
        return FASA_OK;
    }
    const double t0 = s_clock_us();
    double t = fasa_phase_now(); /* 0 unless a benchmark times the phases (phase.h) */
    int failed = !p.dense && e->tr.score(e->tr.ctx, p.s->sid, &p.st, p.cands, p.n_cands);
    if (staged && !p.dense && !s_plan_staged(e, &p, k_shard, k_pos))
        return fasa_error_set(err, FASA_RESOURCE_EXHAUSTED,
                              "a shard failed (out of memory) appending k_new to '%s'; nothing "
                              "was appended",
                              p.id);
    if (failed) return s_step_failed(&p, err);
    const double t1 = s_clock_us();
    t = fasa_phase_add(FASA_PHASE_SCAN, t);
    s_plan_select(e, &p, selected);
    t = fasa_phase_add(FASA_PHASE_SELECT, t);
    const double t2 = s_clock_us();
    failed =
        e->tr.attend(e->tr.ctx, p.s->sid, &p.st, p.thr, p.have_thr, p.m, p.l, p.o, p.aux, &p.bytes);
    if (staged && p.dense && !s_plan_staged(e, &p, k_shard, k_pos))
        return fasa_error_set(err, FASA_RESOURCE_EXHAUSTED,
                              "a shard failed (out of memory) appending k_new to '%s'; nothing "
                              "was appended",
                              p.id);
    if (failed) return s_step_failed(&p, err);
    const double t3 = s_clock_us();
    t = fasa_phase_add(FASA_PHASE_ATTEND, t);
    if (s_plan_finish(e, &p, out, stats))
        return fasa_error_set(err, FASA_RESOURCE_EXHAUSTED, "out of memory merging a step of '%s'",
                              id);
    fasa_phase_add(FASA_PHASE_MERGE, t);
    if (stats) {
        stats->score_us = t1 - t0;
        stats->attend_us = t3 - t2;
        stats->merge_us = (t2 - t1) + (s_clock_us() - t3);
    }
    return FASA_OK;
}

/* A plan's own scratch, one block (freed with free); NULL when out of memory. */
static void *s_plan_alloc(const fasa_engine_t *e, step_plan *p)
{
    const size_t ns = (size_t)e->tr.n_shards, u = (size_t)p->units, b = (size_t)p->sbudget;
    const size_t nh = (size_t)p->s->cfg.n_heads, d = (size_t)p->s->cfg.head_dim;
    const size_t sizes[] = {ns * u * b * sizeof(topk_cand), ns * u * b * sizeof(topk_cand),
                            u * sizeof(topk_cand),          ns * nh * sizeof(double),
                            ns * nh * d * sizeof(double),   ns * nh * SHARD_SPARQ_AUX(d) * 8,
                            ns * u * sizeof(int),           u * sizeof(int),
                            ns * nh * sizeof(float),        u};
    size_t off[10], total = 0;
    for (int i = 0; i < 10; i++) {
        off[i] = total;
        total += (sizes[i] + 15) & ~(size_t)15;
    }
    uint8_t *m = malloc(total);
    if (!m) return NULL;
    p->cands = (topk_cand *)(m + off[0]);
    p->merged = (topk_cand *)(m + off[1]);
    p->thr = (topk_cand *)(m + off[2]);
    p->l = (double *)(m + off[3]);
    p->o = (double *)(m + off[4]);
    p->aux = (double *)(m + off[5]);
    p->n_cands = (int *)(m + off[6]);
    p->n_sel = (int *)(m + off[7]);
    p->m = (float *)(m + off[8]);
    p->have_thr = m + off[9];
    return m;
}

int fasa_engine_attend_batch(fasa_engine_t *e, int n, const char *const *ids,
                             const fasa_attend_req *reqs, float *const *outs,
                             int32_t *const *selected, fasa_step_stats *stats, fasa_error *errs)
{
    int n_ok = 0, any_local = 0;
    for (int i = 0; i < n && !any_local; i++) {
        const session *s = s_find(e, ids[i]);
        any_local = reqs[i].merge == FASA_MERGE_LOCAL ||
                    (reqs[i].merge < 0 && s && s->cfg.merge == FASA_MERGE_LOCAL);
    }
    /* Local merge has one phase, which the pipeline does not interleave: one by one. */
    if (!e->pipeline || !e->tr.score_start || !e->tr.attend_start || !e->tr.wait || n <= 1 ||
        any_local) {
        for (int i = 0; i < n; i++) {
            errs[i].code =
                fasa_engine_attend(e, ids[i], &reqs[i], outs[i], selected ? selected[i] : NULL,
                                   stats ? &stats[i] : NULL, &errs[i]);
            n_ok += errs[i].code == FASA_OK;
        }
        return n_ok;
    }
    enum { WAVE = FASA_PIPE_MAX / 2 };
    step_plan plans[WAVE];
    void *mem[WAVE];
    int idx[WAVE];
    for (int i = 0; i < n;) {
        /* A wave: the items from i on up to the first one whose session is already in it
         * (its steps must see the ones before it), each checked and its k_new appended in
         * order, exactly as one by one. */
        int nw = 0, j = i;
        for (; j < n && nw < WAVE; j++) {
            const session *s = s_find(e, ids[j]);
            int again = 0;
            for (int w = 0; w < nw && s; w++) again |= plans[w].s == s;
            if (again) break;
            step_plan *p = &plans[nw];
            if ((errs[j].code = s_plan_check(e, ids[j], &reqs[j], p, &errs[j]))) continue;
            if (!(mem[nw] = s_plan_alloc(e, p))) {
                fasa_error_set(&errs[j], FASA_RESOURCE_EXHAUSTED,
                               "out of memory for a step of budget %d", p->budget);
                continue;
            }
            if ((errs[j].code = s_plan_commit(e, p, &errs[j]))) {
                free(mem[nw]);
                continue;
            }
            idx[nw++] = j;
        }
        i = j;
        /* Phase 1 of every sparse step, then as each one's candidates come back: its merge
         * and its phase 2 (while the shards still score the later ones), then the outputs. */
        uint8_t scoring[WAVE], attending[WAVE];
        for (int w = 0; w < nw; w++) {
            step_plan *p = &plans[w];
            scoring[w] =
                !p->dense && !e->tr.score_start(e->tr.ctx, p->s->sid, &p->st, p->cands, p->n_cands);
            if (!p->dense && !scoring[w]) s_step_failed(p, &errs[idx[w]]);
        }
        for (int w = 0; w < nw; w++) {
            step_plan *p = &plans[w];
            attending[w] = 0;
            if (!p->dense && !scoring[w]) continue;
            if (scoring[w] && e->tr.wait(e->tr.ctx)) {
                s_step_failed(p, &errs[idx[w]]);
                continue;
            }
            s_plan_select(e, p, selected ? selected[idx[w]] : NULL);
            attending[w] = !e->tr.attend_start(e->tr.ctx, p->s->sid, &p->st, p->thr, p->have_thr,
                                               p->m, p->l, p->o, p->aux, &p->bytes);
            if (!attending[w]) s_step_failed(p, &errs[idx[w]]);
        }
        for (int w = 0; w < nw; w++) {
            step_plan *p = &plans[w];
            if (attending[w]) {
                if (e->tr.wait(e->tr.ctx)) {
                    s_step_failed(p, &errs[idx[w]]);
                } else if (s_plan_finish(e, p, outs[idx[w]], stats ? &stats[idx[w]] : NULL)) {
                    fasa_error_set(&errs[idx[w]], FASA_RESOURCE_EXHAUSTED,
                                   "out of memory merging a step of '%s'", p->id);
                } else {
                    errs[idx[w]].code = FASA_OK;
                    errs[idx[w]].msg[0] = 0;
                    n_ok++;
                }
            }
            free(mem[w]);
        }
    }
    return n_ok;
}

/* Snapshots (coord/snapshot.h) */

int fasa_engine_n_shards(const fasa_engine_t *e)
{
    return e->tr.n_shards;
}

int fasa_engine_block(const fasa_engine_t *e)
{
    return e->block;
}

int fasa_engine_ids(const fasa_engine_t *e, const char **ids, int cap)
{
    int n = 0;
    for (const session *s = e->sessions; s; s = s->next, n++)
        if (n < cap) ids[n] = s->id;
    return n;
}

uint64_t fasa_engine_revision(const fasa_engine_t *e, const char *id)
{
    const session *s = s_find(e, id);
    if (!s) return 0;
    /* A transport session number is never reused and changes with the profile; rows are
     * append-only: (sid, lengths) names the content. */
    uint64_t h = 0xcbf29ce484222325ull ^ (uint64_t)s->sid;
    h *= 0x100000001b3ull;
    for (int l = 0; l < s->cfg.n_layers; l++) {
        h ^= (uint64_t)(uint32_t)s->n_appended[l];
        h *= 0x100000001b3ull;
    }
    return h ? h : 1;
}

fasa_status fasa_engine_write_shards(fasa_engine_t *e, const char *id, const char *path_prefix,
                                     shard_snap_info *out, fasa_error *err)
{
    const session *s = s_find(e, id);
    if (!s) return fasa_error_set(err, FASA_NOT_FOUND, "session '%s' not found", id ? id : "");
    if (!e->tr.snapshot)
        return fasa_error_set(err, FASA_FAILED_PRECONDITION,
                              "this engine's transport cannot snapshot");
    for (int i = 0; i < e->tr.n_shards; i++) out[i] = (shard_snap_info){.err_no = EIO};
    if (e->tr.snapshot(e->tr.ctx, s->sid, path_prefix, id, s->cfg.dtype, out)) {
        for (int i = 0; i < e->tr.n_shards; i++)
            if (out[i].err_no)
                return fasa_error_set(err, FASA_INTERNAL,
                                      "shard %d could not write %s.s%d.shard: %s", i, path_prefix,
                                      i, strerror(out[i].err_no));
        return fasa_error_set(err, FASA_INTERNAL, "a shard could not write its snapshot file");
    }
    return FASA_OK;
}

/* Bulk load (load.h) */

/* Gives session s fresh, empty shards (a failed load's undo): a new transport session with
 * the same layout, the old one dropped, its accounting cleared. */
static fasa_status s_load_undo(fasa_engine_t *e, session *s, fasa_error *err)
{
    const int S = e->tr.n_shards, L = s->cfg.n_layers;
    shard_layout lay = {0};
    const int sid = e->next_sid < MAX_SESSION_NUMBERS ? e->next_sid++ : -1;
    const int ok = sid >= 0 && !s_layout_from_profile(&lay, &s->cfg, s->profile) &&
                   !e->tr.session_new(e->tr.ctx, sid, &lay);
    shard_layout_cleanup(&lay);
    if (!ok) /* no fresh shards: the old ones stay, holding part of the load */
        return fasa_error_set(err, FASA_INTERNAL,
                              "the failed load of '%s' could not be undone (out of memory); "
                              "drop the session",
                              s->id);
    for (int sh = 0; sh < S; sh++)
        for (int l = 0; l < L; l++) {
            acct *a = &s->held[sh * L + l];
            e->shard_bytes[sh] -= s_acct_bytes(s, l, a);
            *a = (acct){.last_page = -1};
        }
    for (int l = 0; l < L; l++) s->n_appended[l] = 0;
    e->tr.session_drop(e->tr.ctx, s->sid);
    s->sid = sid;
    return FASA_OK;
}

fasa_status fasa_engine_load(fasa_engine_t *e, const char *id, const fasa_load_plan *plan,
                             int check_only, fasa_load_progress progress, void *progress_ctx,
                             fasa_load_result *res, load_report *per_shard, fasa_error *err)
{
    session *s = s_find(e, id);
    if (!s) return fasa_error_set(err, FASA_NOT_FOUND, "session '%s' not found", id ? id : "");
    const int S = e->tr.n_shards, L = s->cfg.n_layers;
    if (!e->tr.load)
        return fasa_error_set(err, FASA_FAILED_PRECONDITION,
                              "this engine's transport cannot load files");
    if (plan->n_layers != L)
        return fasa_error_set(err, FASA_INVALID_ARGUMENT, "load: %d layers, the session has %d",
                              plan->n_layers, L);
    if (plan->T < 1 || plan->T > INT32_MAX)
        return fasa_error_set(err, FASA_INVALID_ARGUMENT, "load: T %lld out of range [1, %d]",
                              (long long)plan->T, INT32_MAX);
    for (int l = 0; l < L && !check_only; l++)
        if (s->n_appended[l])
            return fasa_error_set(err, FASA_FAILED_PRECONDITION,
                                  "session '%s' already holds tokens (layer %d: %d); a load "
                                  "fills an empty session",
                                  id, l, (int)s->n_appended[l]);
    const int n = (int)plan->T;
    fasa_status st = check_only ? FASA_OK : s_check_limit(e, s, 0, L, 0, n, err);
    if (st) return st;
    load_report *rep = calloc((size_t)S, sizeof(*rep));
    if (!rep) return fasa_error_set(err, FASA_RESOURCE_EXHAUSTED, "load: out of memory");
    if (per_shard) memset(per_shard, 0, (size_t)S * sizeof(*per_shard));
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    int64_t file_bytes = 0;
    for (int l = 0; l < L; l++) {
        load_job job = {.layer = l,
                        .block = e->block,
                        .n_shards = S,
                        .T = plan->T,
                        .check_only = check_only,
                        .k = plan->k[l],
                        .v = plan->v[l]};
        const int failed = e->tr.load(e->tr.ctx, s->sid, &job, rep);
        for (int sh = 0; sh < S; sh++) {
            file_bytes += rep[sh].file_bytes;
            if (per_shard) {
                per_shard[sh].rows += rep[sh].rows;
                per_shard[sh].file_bytes += rep[sh].file_bytes;
                per_shard[sh].read_s += rep[sh].read_s;
                per_shard[sh].total_s += rep[sh].total_s;
            }
        }
        if (failed) {
            int bad = 0;
            while (bad < S - 1 && rep[bad].err == LOAD_OK) bad++;
            char why[400];
            load_report_text(&job, &rep[bad], s->cfg.dtype, why, sizeof(why));
            const fasa_status code = rep[bad].err == LOAD_ENOMEM ? FASA_RESOURCE_EXHAUSTED
                                     : rep[bad].err == LOAD_EJOB ? FASA_INTERNAL
                                     : rep[bad].err == LOAD_EIO && rep[bad].err_no == ENOENT
                                         ? FASA_NOT_FOUND
                                         : FASA_INVALID_ARGUMENT;
            free(rep);
            if (!check_only && (st = s_load_undo(e, s, err))) return st;
            return fasa_error_set(err, code, "load of '%s' failed, nothing stored: %s", id, why);
        }
        if (!check_only) {
            /* The engine's accounting, as s_place keeps it for appends. */
            for (int32_t p = 0; p < n;) {
                const int run = s_run_len(e, p, n - p), sh = (int)((p / e->block) % S);
                acct *a = &s->held[sh * L + l];
                const int64_t before = s_acct_bytes(s, l, a);
                s_acct_add(a, p, run);
                e->shard_bytes[sh] += s_acct_bytes(s, l, a) - before;
                p += run;
            }
            s->n_appended[l] = n;
        }
        if (progress) progress(progress_ctx, l + 1, L, file_bytes);
    }
    free(rep);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    if (res) {
        res->length = check_only ? plan->T : s->n_appended[0];
        res->stored_bytes = check_only ? 0 : s_kv_bytes(s);
        res->file_bytes = file_bytes;
        res->seconds = (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
    }
    return FASA_OK;
}

/* Local merge (engine.h fasa_merge) */

void fasa_engine_set_one_exchange(fasa_engine_t *e, int on)
{
    e->one_exchange = on != 0;
}

int fasa_engine_set_merge_eps(fasa_engine_t *e, double eps)
{
    if (!(eps >= 0 && eps <= 64)) return -1;
    e->merge_eps = eps;
    return 0;
}

int fasa_engine_local_budget(const fasa_engine_t *e, int budget)
{
    const int S = e->tr.n_shards;
    if (S <= 1) return budget;
    const double b = ceil((double)budget * (1.0 + e->merge_eps) / S);
    return b >= budget ? budget : b < 1 ? 1 : (int)b;
}

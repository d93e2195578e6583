/* The in-process transport of the embedded engine: shards are plain shard_t objects.
 * With T > 1 threads a phase runs its shards in parallel (one pool task per shard, each
 * shard's KV groups then inline on that thread) when there are at least T shards, else
 * the shards one after another, each running its KV groups on all T threads. Either way
 * every output is computed by the same code on the same rows, so it is the same bits for
 * any T. */
#include <stdio.h>
#include <stdlib.h>

#include "dtype.h"
#include "local_merge.h"
#include "pool.h"
#include "transport.h"

typedef struct local_ctx {
    int n_shards;
    int cap;             /* capacity of sessions */
    shard_t ***sessions; /* (cap) each NULL or (n_shards) shards */
    /* Pipelined phases run at once; their results wait here for wait(), oldest first. */
    int done[FASA_PIPE_MAX], head, len;
    fasa_pool_t *pool; /* NULL: one thread */
    uint32_t txn;      /* append_runs: the last shard transaction's number */
} local_ctx;

static int s_session_new(void *ctx, int sid, const shard_layout *layout)
{
    local_ctx *c = ctx;
    if (sid >= c->cap) {
        int cap = c->cap ? c->cap : 8;
        while (cap <= sid) cap *= 2;
        shard_t ***p = realloc(c->sessions, (size_t)cap * sizeof(*p));
        if (!p) return -1;
        for (int i = c->cap; i < cap; i++) p[i] = NULL;
        c->sessions = p;
        c->cap = cap;
    }
    shard_t **sh = calloc((size_t)c->n_shards, sizeof(*sh));
    if (!sh) return -1;
    for (int i = 0; i < c->n_shards; i++) {
        sh[i] = shard_new(layout);
        if (sh[i]) shard_set_pool(sh[i], c->pool);
        if (!sh[i]) {
            for (int j = 0; j < i; j++) shard_destroy(&sh[j]);
            free(sh);
            return -1;
        }
    }
    c->sessions[sid] = sh;
    return 0;
}

static void s_session_drop(void *ctx, int sid)
{
    local_ctx *c = ctx;
    if (sid >= c->cap || !c->sessions[sid]) return;
    for (int i = 0; i < c->n_shards; i++) shard_destroy(&c->sessions[sid][i]);
    free(c->sessions[sid]);
    c->sessions[sid] = NULL;
}

static int s_append(void *ctx, int sid, int shard, int layer, int n, const int32_t *pos,
                    const float *k, const float *v)
{
    local_ctx *c = ctx;
    return shard_append(c->sessions[sid][shard], layer, n, pos, k, v);
}

/* Every run, one shard after the other, under one shard transaction each (undone on every
 * shard touched when one fails). */
static int s_append_runs(void *ctx, int sid, int dtype, int n_runs, const fasa_append_run *runs)
{
    local_ctx *c = ctx;
    if (++c->txn == 0) c->txn = 1;
    const uint32_t txn = c->txn;
    shard_t **sh = c->sessions[sid];
    for (int i = 0; i < c->n_shards; i++) shard_txn_begin(sh[i], txn);
    int rc = 0;
    for (int i = 0; i < n_runs && !rc; i++) {
        const fasa_append_run *r = &runs[i];
        int32_t pos[1024];
        for (int j = 0; j < r->n && !rc; j += 1024) {
            const int m = r->n - j < 1024 ? r->n - j : 1024;
            const size_t off = (size_t)j * shard_layout_of(sh[r->shard])->n_kv_heads *
                               shard_layout_of(sh[r->shard])->head_dim * fasa_dtype_size(dtype);
            for (int t = 0; t < m; t++) pos[t] = r->pos0 + j + t;
            rc = shard_append_dt(sh[r->shard], r->layer, m, pos, dtype, (const char *)r->k + off,
                                 (const char *)r->v + off);
        }
    }
    for (int i = 0; i < c->n_shards; i++) {
        if (rc) shard_txn_undo(sh[i], txn);
        shard_txn_begin(sh[i], 0);
    }
    return rc;
}

/* One phase over every shard of a session: a pool task per shard. */
typedef struct local_phase {
    shard_t **sh;
    const shard_step *st;
    int units;
    topk_cand *cands;
    int *n_cands;
    const topk_cand *thr;
    const uint8_t *have_thr;
    float *m;
    double *l, *o, *aux;
    size_t nh, d;
    int rc[]; /* (n_shards) */
} local_phase;

static void s_score_one(void *ctx, int i, int tid)
{
    (void)tid;
    local_phase *p = ctx;
    p->rc[i] = shard_score(p->sh[i], p->st, p->cands + (size_t)i * p->units * p->st->budget,
                           p->n_cands + i * p->units);
}

static void s_attend_one(void *ctx, int i, int tid)
{
    (void)tid;
    local_phase *p = ctx;
    /* Shard i writes block i of (m, l, o). */
    p->rc[i] = shard_attend(p->sh[i], p->st, p->thr, p->have_thr, p->m + i * p->nh,
                            p->l + i * p->nh, p->o + i * p->nh * p->d);
    if (!p->rc[i] && (p->st->method == SHARD_SPARQ || p->st->method == SHARD_FASA_PLUS))
        shard_sparq_aux(p->sh[i], p->st, p->aux + i * p->nh * SHARD_SPARQ_AUX(p->d));
}

/* Runs fn over the shards (see the top of the file); 0, or -1 when one failed. */
static int s_phase(local_ctx *c, local_phase *p, fasa_pool_fn fn)
{
    if (c->n_shards >= fasa_pool_threads(c->pool))
        fasa_pool_run(c->pool, c->n_shards, fn, p);
    else
        for (int i = 0; i < c->n_shards; i++) fn(p, i, 0);
    for (int i = 0; i < c->n_shards; i++)
        if (p->rc[i]) return -1;
    return 0;
}

/* Runs fn over every shard of session sid (see s_phase) with the phase's fields from *f;
 * sh, nh and d are filled in here. 0, or -1 when one failed. */
static int s_run(local_ctx *c, int sid, const local_phase *f, fasa_pool_fn fn)
{
    shard_t **sh = c->sessions[sid];
    const shard_layout *lay = shard_layout_of(sh[0]);
    local_phase *p = calloc(1, sizeof(*p) + (size_t)c->n_shards * sizeof(int));
    if (!p) return -1;
    *p = *f;
    p->sh = sh;
    p->nh = (size_t)lay->n_heads;
    p->d = (size_t)lay->head_dim;
    const int rc = s_phase(c, p, fn);
    free(p);
    return rc;
}

/* s_run for a phase that reads rows, then the bytes every shard read into *bytes_p. */
static int s_run_read(local_ctx *c, int sid, const local_phase *f, fasa_pool_fn fn,
                      int64_t *bytes_p)
{
    if (s_run(c, sid, f, fn)) return -1;
    int64_t bytes = 0;
    for (int i = 0; i < c->n_shards; i++) bytes += shard_bytes_read(c->sessions[sid][i]);
    *bytes_p = bytes;
    return 0;
}

static int s_score(void *ctx, int sid, const shard_step *st, topk_cand *cands, int *n_cands)
{
    local_ctx *c = ctx;
    const local_phase f = {.st = st,
                           .units = shard_units(c->sessions[sid][0], st->gqa),
                           .cands = cands,
                           .n_cands = n_cands};
    return s_run(c, sid, &f, s_score_one);
}

static int s_attend(void *ctx, int sid, const shard_step *st, const topk_cand *thr,
                    const uint8_t *have_thr, float *m, double *l, double *o, double *aux,
                    int64_t *bytes_p)
{
    const local_phase f = {
        .st = st, .thr = thr, .have_thr = have_thr, .m = m, .l = l, .o = o, .aux = aux};
    return s_run_read(ctx, sid, &f, s_attend_one, bytes_p);
}

/* Adds what one shard of a session holds to *st. */
static int s_push(local_ctx *c, int rc)
{
    if (c->len == FASA_PIPE_MAX) return -1;
    c->done[(c->head + c->len++) % FASA_PIPE_MAX] = rc;
    return 0;
}

static int s_score_start(void *ctx, int sid, const shard_step *st, topk_cand *cands, int *n_cands)
{
    local_ctx *c = ctx;
    return c->len == FASA_PIPE_MAX ? -1 : s_push(c, s_score(ctx, sid, st, cands, n_cands));
}

static int s_attend_start(void *ctx, int sid, const shard_step *st, const topk_cand *thr,
                          const uint8_t *have_thr, float *m, double *l, double *o, double *aux,
                          int64_t *bytes_p)
{
    local_ctx *c = ctx;
    return c->len == FASA_PIPE_MAX
               ? -1
               : s_push(c, s_attend(ctx, sid, st, thr, have_thr, m, l, o, aux, bytes_p));
}

static int s_wait(void *ctx)
{
    local_ctx *c = ctx;
    if (!c->len) return -1;
    const int rc = c->done[c->head];
    c->head = (c->head + 1) % FASA_PIPE_MAX;
    c->len--;
    return rc;
}

static int s_shard_stats(void *ctx, int sid, fasa_shard_stats *out)
{
    local_ctx *c = ctx;
    if (sid >= 0 && (sid >= c->cap || !c->sessions[sid])) return -1;
    for (int i = 0; i < c->n_shards; i++) {
        out[i] = (fasa_shard_stats){0};
        for (int s = sid >= 0 ? sid : 0; s < (sid >= 0 ? sid + 1 : c->cap); s++)
            if (c->sessions[s]) shard_holdings_add(&out[i], c->sessions[s][i]);
    }
    return 0;
}

static int s_snapshot(void *ctx, int sid, const char *prefix, const char *id, int dtype,
                      shard_snap_info *out)
{
    local_ctx *c = ctx;
    if (sid < 0 || sid >= c->cap || !c->sessions[sid]) return -1;
    int rc = 0;
    for (int i = 0; i < c->n_shards; i++) {
        char path[4200], why[300];
        snprintf(path, sizeof(path), "%s.s%d.shard", prefix, i);
        if (shard_snap_write(c->sessions[sid][i], path, id, i, c->n_shards, dtype, &out[i], why,
                             sizeof(why)))
            rc = -1;
    }
    return rc;
}

static void s_local_one(void *ctx, int i, int tid)
{
    (void)tid;
    local_phase *p = ctx;
    p->rc[i] = shard_attend_local(p->sh[i], p->st, p->m + i * p->nh, p->l + i * p->nh,
                                  p->o + i * p->nh * p->d);
}

/* A local-merge step (transport.h attend_local): both phases on every shard at once. */
static int s_attend_local(void *ctx, int sid, const shard_step *st, float *m, double *l, double *o,
                          int64_t *bytes_p)
{
    const local_phase f = {.st = st, .m = m, .l = l, .o = o};
    return s_run_read(ctx, sid, &f, s_local_one, bytes_p);
}

/* Bulk load of one layer: the shards one after another, on this thread. */
static int s_load(void *ctx, int sid, const load_job *job, load_report *out)
{
    local_ctx *c = ctx;
    if (sid < 0 || sid >= c->cap || !c->sessions[sid]) return -1;
    int rc = 0;
    for (int i = 0; i < c->n_shards; i++) {
        load_job j = *job;
        j.shard = i;
        j.n_shards = c->n_shards;
        if (shard_load_layer(c->sessions[sid][i], &j, &out[i])) rc = -1;
    }
    return rc;
}

static void s_destroy(void *ctx)
{
    local_ctx *c = ctx;
    for (int sid = 0; sid < c->cap; sid++) s_session_drop(c, sid);
    free(c->sessions);
    fasa_pool_destroy(&c->pool);
    free(c);
}

int fasa_transport_local(fasa_transport *t, int n_shards)
{
    return fasa_transport_local_threads(t, n_shards, 1);
}

int fasa_transport_local_threads(fasa_transport *t, int n_shards, int n_threads)
{
    local_ctx *c = calloc(1, sizeof(*c));
    if (!c) return -1;
    if (n_threads > 1 && !(c->pool = fasa_pool_new(n_threads))) {
        free(c);
        return -1;
    }
    c->n_shards = n_shards;
    *t = (fasa_transport){.ctx = c,
                          .n_shards = n_shards,
                          .session_new = s_session_new,
                          .session_drop = s_session_drop,
                          .append = s_append,
                          .append_runs = s_append_runs,
                          .score = s_score,
                          .attend = s_attend,
                          .shard_stats = s_shard_stats,
                          .score_start = s_score_start,
                          .attend_start = s_attend_start,
                          .wait = s_wait,
                          .snapshot = s_snapshot,
                          .load = s_load,
                          .attend_local = s_attend_local,
                          .destroy = s_destroy};
    return 0;
}

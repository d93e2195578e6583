/* The in-process transport of the embedded engine: shards are plain shard_t objects
 * called one after another. */
#include <stdio.h>
#include <stdlib.h>

#include "transport.h"

typedef struct local_ctx {
    int n_shards;
    int cap;             /* capacity of sessions */
    shard_t ***sessions; /* (cap) each NULL or (n_shards) shards */
    /* Pipelined phases run at once; their results wait here for wait(), oldest first. */
    int done[FASA_PIPE_MAX], head, len;
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

static int s_score(void *ctx, int sid, const shard_step *st, topk_cand *cands, int *n_cands)
{
    local_ctx *c = ctx;
    shard_t **sh = c->sessions[sid];
    const int units = shard_units(sh[0], st->gqa);
    for (int i = 0; i < c->n_shards; i++)
        if (shard_score(sh[i], st, cands + (size_t)i * units * st->budget, n_cands + i * units))
            return -1;
    return 0;
}

static int s_attend(void *ctx, int sid, const shard_step *st, const topk_cand *thr,
                    const uint8_t *have_thr, float *m, double *l, double *o, double *aux,
                    int64_t *bytes_p)
{
    local_ctx *c = ctx;
    shard_t **sh = c->sessions[sid];
    int64_t bytes = 0;
    const shard_layout *lay = shard_layout_of(sh[0]);
    const size_t nh = (size_t)lay->n_heads, d = (size_t)lay->head_dim;
    for (int i = 0; i < c->n_shards; i++) {
        /* Shard i writes block i of (m, l, o). */
        if (shard_attend(sh[i], st, thr, have_thr, m + i * nh, l + i * nh, o + i * nh * d))
            return -1;
        if (st->method == SHARD_SPARQ || st->method == SHARD_FASA_PLUS)
            shard_sparq_aux(sh[i], st, aux + i * nh * SHARD_SPARQ_AUX(d));
        bytes += shard_bytes_read(sh[i]);
    }
    *bytes_p = bytes;
    return 0;
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

static void s_destroy(void *ctx)
{
    local_ctx *c = ctx;
    for (int sid = 0; sid < c->cap; sid++) s_session_drop(c, sid);
    free(c->sessions);
    free(c);
}

int fasa_transport_local(fasa_transport *t, int n_shards)
{
    local_ctx *c = calloc(1, sizeof(*c));
    if (!c) return -1;
    c->n_shards = n_shards;
    *t = (fasa_transport){.ctx = c,
                          .n_shards = n_shards,
                          .session_new = s_session_new,
                          .session_drop = s_session_drop,
                          .append = s_append,
                          .score = s_score,
                          .attend = s_attend,
                          .shard_stats = s_shard_stats,
                          .score_start = s_score_start,
                          .attend_start = s_attend_start,
                          .wait = s_wait,
                          .snapshot = s_snapshot,
                          .destroy = s_destroy};
    return 0;
}

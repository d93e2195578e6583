/* A shard of one session's KV cache: the rows (token positions) that placement gave this
 * shard, for every layer and KV head, and the two local halves of a FASA step.
 *
 * Layout per (layer, KV head), in chunks of SHARD_CHUNK rows so that growth never copies:
 *   kdom  the dominant key dims (the union of the FCs the group's query heads use), packed
 *         in row tiles of SCORE_TILE rows, dim-major (score.h): the only bytes the TIP scan
 *         reads;
 *   krest the other key dims, row-major;
 *   v     the values, row-major, in the original dim order.
 * Key dims are stored in a permuted order: perm[0..n_dom) are the dominant dims and
 * perm[n_dom..d) the rest, each ascending. Queries are permuted the same way.
 *
 * A step runs in two phases, as it does across ranks (DESIGN.md "One decode step"):
 * shard_score returns each selection unit's local top-B candidates and keeps them;
 * shard_attend then attends over the kept candidates that are not worse than the
 * coordinator's global threshold, returning exact partials (attn.h). A unit is one query
 * head (GQA per-head) or one KV head whose query heads share a token set (GQA shared).
 * Not thread-safe: one caller at a time. */
#ifndef FASA_WORKER_SHARD_H
#define FASA_WORKER_SHARD_H

#include <stddef.h>
#include <stdint.h>

#include "topk.h"

#define SHARD_CHUNK 4096

typedef enum shard_method { SHARD_FASA = 0, SHARD_DENSE = 1, SHARD_ORACLE = 2 } shard_method;
typedef enum shard_gqa { SHARD_GQA_PER_HEAD = 0, SHARD_GQA_SHARED = 1 } shard_gqa;

/* How a session's keys are packed; derived from its calibration profile. Plain value type. */
typedef struct shard_layout {
    int n_layers, n_heads, n_kv_heads, head_dim;
    int *n_dom;     /* (n_layers, n_kv_heads) dominant dims packed per KV head; 0 = none */
    int *perm;      /* (n_layers, n_kv_heads, head_dim) stored dim order, see above */
    uint8_t *qmask; /* (n_layers, n_heads, head_dim) 1 where packed dim p < n_dom of the
                       head's KV head belongs to one of the head's own FCs */
} shard_layout;

/* One step as the shard sees it. */
typedef struct shard_step {
    int layer;
    shard_method method;
    shard_gqa gqa;
    int budget;      /* B: tokens per unit, >= 1 */
    int32_t max_pos; /* highest visible position (inclusive) */
    float scale;     /* logit scale, 1/sqrt(head_dim) */
    const float *q;  /* (n_heads, head_dim) queries, original dim order */
} shard_step;

typedef struct shard shard_t;

/* Deep-copies a layout into freshly allocated arrays (caller owns, free with
 * shard_layout_cleanup). Returns 0, or -1 when out of memory. */
int shard_layout_copy(shard_layout *dst, const shard_layout *src);
void shard_layout_cleanup(shard_layout *layout);
/* The layout that packs nothing (no profile yet): every dim in the rest part. */
int shard_layout_plain(shard_layout *dst, int n_layers, int n_heads, int n_kv_heads, int head_dim);

/* A new empty shard with its own copy of layout; NULL when out of memory. */
shard_t *shard_new(const shard_layout *layout);
void shard_destroy(shard_t **shard_p);

/* Appends n rows to a layer: positions pos[n] (ascending, above every row held),
 * k and v (n, n_kv_heads, head_dim). Returns 0, or -1 when out of memory (nothing added). */
int shard_append(shard_t *shard, int layer, int n, const int32_t *pos, const float *k,
                 const float *v);

/* The shard's key layout (borrowed, valid while the shard lives). */
const shard_layout *shard_layout_of(const shard_t *shard);

/* Rows held for a layer, and how many of them are at or below max_pos. */
int shard_rows(const shard_t *shard, int layer);
int shard_visible(const shard_t *shard, int layer, int32_t max_pos);

/* Selection units of a step: n_heads for per-head GQA, n_kv_heads for shared. */
int shard_units(const shard_t *shard, shard_gqa gqa);

/* Phase 1 (fasa and oracle): for each unit u, the local best min(budget, visible) candidates
 * are written to cands[u * budget ..], best first, and their count to n_cands[u]. They are
 * also kept for shard_attend. Returns 0, or -1 when out of memory. */
int shard_score(shard_t *shard, const shard_step *step, topk_cand *cands, int *n_cands);

/* Phase 2: exact partials per query head: m[n_heads], l[n_heads], o[n_heads][head_dim]
 * (unnormalised, original dim order). For dense every visible row counts; otherwise the
 * rows kept by the last shard_score of this step that are not worse than thr[u] (the
 * global k-th best of unit u; a unit with have_thr[u] = 0 selects nothing here).
 * Returns 0, or -1 when out of memory. */
int shard_attend(shard_t *shard, const shard_step *step, const topk_cand *thr,
                 const uint8_t *have_thr, float *m, double *l, double *o);

/* Bytes the last shard_score + shard_attend read from the KV store (for stats). */
int64_t shard_bytes_read(const shard_t *shard);
/* Bytes held in the KV store. */
size_t shard_bytes_held(const shard_t *shard);
/* Bytes of the rows held, all layers, by part (the layout above): kdom (the dominant key
 * dims), krest (the other key dims) and v (the values). They count stored elements, not
 * chunk capacity, so kdom + krest = v = rows x n_kv_heads x head_dim x 4 bytes. */
void shard_bytes_by_kind(const shard_t *shard, int64_t *kdom_p, int64_t *krest_p, int64_t *v_p);

#endif

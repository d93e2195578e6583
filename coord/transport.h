/* How the coordinator's step plan reaches the shards. The plan (engine.c) is written
 * once against these operations; the embedded engine implements them with in-process
 * shards (transport_local.c) and the server with MPI worker ranks. Every operation
 * covers all shards of a session, so a transport may run the shards in parallel. */
#ifndef FASA_COORD_TRANSPORT_H
#define FASA_COORD_TRANSPORT_H

#include <stdint.h>

#include "shard.h"

typedef struct fasa_transport {
    void *ctx;
    int n_shards;
    /* Creates the shards of session sid with this key layout. 0, or -1 out of memory. */
    int (*session_new)(void *ctx, int sid, const shard_layout *layout);
    void (*session_drop)(void *ctx, int sid);
    /* Appends n rows (positions pos[n], k and v (n, n_kv_heads, head_dim)) to one shard. */
    int (*append)(void *ctx, int sid, int shard, int layer, int n, const int32_t *pos,
                  const float *k, const float *v);
    /* Phase 1 on every shard: cands (n_shards, units, budget), n_cands (n_shards, units). */
    int (*score)(void *ctx, int sid, const shard_step *step, topk_cand *cands, int *n_cands);
    /* Phase 2 on every shard: m, l (n_shards, n_heads), o (n_shards, n_heads, head_dim);
     * bytes_p gets the KV bytes all shards read for this step. */
    int (*attend)(void *ctx, int sid, const shard_step *step, const topk_cand *thr,
                  const uint8_t *have_thr, float *m, double *l, double *o, int64_t *bytes_p);
    void (*destroy)(void *ctx);
} fasa_transport;

/* In-process shards: n_shards shard_t per session. Returns 0, or -1 out of memory. */
int fasa_transport_local(fasa_transport *t, int n_shards);

#endif

/* How the coordinator's step plan reaches the shards. The plan (engine.c) is written
 * once against these operations; the embedded engine implements them with in-process
 * shards (transport_local.c) and the server with MPI worker ranks. Every operation
 * covers all shards of a session, so a transport may run the shards in parallel. */
#ifndef FASA_COORD_TRANSPORT_H
#define FASA_COORD_TRANSPORT_H

#include <stdint.h>

#include "load_rows.h"
#include "shard.h"
#include "shard_snap.h"

/* What one shard holds (for Stats): shard.h's shard_holdings. */
typedef shard_holdings fasa_shard_stats;

#define FASA_PIPE_MAX 64 /* phases in flight at once (score_start / attend_start) */

/* One run of an append: rows pos0 .. pos0 + n - 1 of a layer for one shard, k and v
 * (n, n_kv_heads, head_dim) elements of the request's dtype. */
typedef struct fasa_append_run {
    int shard, layer, n;
    int32_t pos0;
    const void *k, *v;
} fasa_append_run;

typedef struct fasa_transport {
    void *ctx;
    int n_shards;
    /* Creates the shards of session sid with this key layout. 0, or -1 out of memory. */
    int (*session_new)(void *ctx, int sid, const shard_layout *layout);
    void (*session_drop)(void *ctx, int sid);
    /* Appends n rows (positions pos[n], k and v (n, n_kv_heads, head_dim)) to one shard. */
    int (*append)(void *ctx, int sid, int shard, int layer, int n, const int32_t *pos,
                  const float *k, const float *v);
    /* Optional (NULL: the engine sends f32 runs one by one through append): every run of
     * one request, k and v of dtype (fasa_dtype), all or nothing: 0 when every shard took
     * its runs, -1 when one failed (out of memory, or a worker error), and then no shard
     * holds any of them (each is put back as it was, bit for bit). The shards store their
     * runs in parallel. */
    int (*append_runs)(void *ctx, int sid, int dtype, int n_runs, const fasa_append_run *runs);
    /* Phase 1 on every shard: cands (n_shards, units, budget), n_cands (n_shards, units). */
    int (*score)(void *ctx, int sid, const shard_step *step, topk_cand *cands, int *n_cands);
    /* Phase 2 on every shard: m, l (n_shards, n_heads), o (n_shards, n_heads, head_dim);
     * for a SPARQ or FASA_PLUS step also aux (n_shards, n_heads, SHARD_SPARQ_AUX(head_dim)), each
     * shard's shard_sparq_aux (aux is not touched for other methods and may be NULL);
     * bytes_p gets the KV bytes all shards read for this step. */
    int (*attend)(void *ctx, int sid, const shard_step *step, const topk_cand *thr,
                  const uint8_t *have_thr, float *m, double *l, double *o, double *aux,
                  int64_t *bytes_p);
    /* Every shard's holdings: out (n_shards), shard i in out[i], for session sid or, with
     * sid -1, summed over every session. 0, or -1 (no such session, or a shard failed). */
    int (*shard_stats)(void *ctx, int sid, fasa_shard_stats *out);
    /* Pipelined phases, for batches (NULL: not offered; the engine then runs the steps one
     * by one). score_start and attend_start begin what score and attend do (everything they
     * read, the step, its queries and the thresholds, is read before they return) and
     * wait completes the oldest phase begun and not yet completed, filling the outputs
     * given to its start (borrowed: they stay the caller's and must stay valid until then). So the
     * coordinator can merge one step's candidates while the shards work on the next. Phases in
     * flight together are of different sessions, and at most FASA_PIPE_MAX are in flight. Each
     * returns 0, or -1 when that phase failed (a start that fails begins nothing). */
    int (*score_start)(void *ctx, int sid, const shard_step *step, topk_cand *cands, int *n_cands);
    int (*attend_start)(void *ctx, int sid, const shard_step *step, const topk_cand *thr,
                        const uint8_t *have_thr, float *m, double *l, double *o, double *aux,
                        int64_t *bytes_p);
    int (*wait)(void *ctx);
    /* Optional (NULL: no local merge): phase 1 and phase 2 of a sparse step in one, on every
     * shard: each scores with step->budget and attends over its own candidates (its
     * threshold: its last one kept per unit), filling m, l, o as attend does. 0, or -1. */
    int (*attend_local)(void *ctx, int sid, const shard_step *step, float *m, double *l, double *o,
                        int64_t *bytes_p);
    /* Optional (NULL: the engine runs score and attend): both phases of an exact sparse step
     * in one exchange, for a step whose visible rows are all on one shard (the others hold
     * none at or below max_pos): every shard scores as score does (filling cands, n_cands)
     * and attends over its own candidates, each unit's threshold its worst one kept
     * (worker/local_merge.h shard_score_attend), filling m, l, o, aux and bytes_p as attend
     * does. With one shard holding the visible rows its candidates are the global top-B, so
     * the results are the bits of score, the engine's select and attend. A staged k_new
     * (stage_append) rides along as with score. 0, or -1. The in-process transport leaves
     * it NULL: its phases cost no exchange, and the embedded engine's phase timers (scan,
     * attend: worker/phase.h) keep their meaning. */
    int (*score_attend)(void *ctx, int sid, const shard_step *step, topk_cand *cands, int *n_cands,
                        float *m, double *l, double *o, double *aux, int64_t *bytes_p);
    /* Every shard of session sid writes its snapshot file (shard_snap.h): shard i to
     * path_prefix + ".s<i>.shard", naming session id and storage dtype; out (n_shards) gets
     * each file's checksum and size. 0, or -1 when a shard failed (out[i].err_no: its errno,
     * or EIO when it did not say). The prefix must name a place every shard can reach. */
    int (*snapshot)(void *ctx, int sid, const char *path_prefix, const char *id, int dtype,
                    shard_snap_info *out);
    /* Optional (NULL in-process, where every shard is in this process): each shard's
     * holder's resident memory in bytes, out[n_shards]. 0, or -1. */
    int (*shard_rss)(void *ctx, int64_t *out);
    /* Optional (NULL: not offered; the engine then appends a step's k_new with append, an
     * exchange of its own). stage_append hands over one row (position pos of layer, k and v
     * (n_kv_heads, head_dim), read before it returns) for shard `shard` to append before the
     * next phase it runs: the next score, or attend when no score comes first (a dense step),
     * so a decode step with k_new costs the shards one exchange less. After that phase
     * staged_appended says whether the row landed: 1, or 0 (the shard was out of memory, or
     * the phase never started; nothing changed there). stage_append returns 0, or -1 (nothing
     * staged). Not for pipelined phases. */
    int (*stage_append)(void *ctx, int sid, int shard, int layer, int32_t pos, const float *k,
                        const float *v);
    int (*staged_appended)(void *ctx);
    /* Optional (NULL: the engine cannot bulk-load): every shard of session sid runs job
     * (worker/load_rows.h) with its own index in job->shard, out (n_shards) getting each
     * one's report. 0, or -1 when a shard failed (out[i].err says which and why). */
    int (*load)(void *ctx, int sid, const load_job *job, load_report *out);
    /* Frees ctx and everything the transport holds. */
    void (*destroy)(void *ctx);
} fasa_transport;

/* In-process shards: n_shards shard_t per session, one thread. Returns 0, or -1 out of
 * memory. On 0 the caller owns *t: free it with t->destroy(t->ctx), or hand it to
 * fasa_engine_new_with (engine.h), which takes it over. Likewise for
 * fasa_transport_local_threads below and fasa_transport_mpi (transport_mpi.h). */
int fasa_transport_local(fasa_transport *t, int n_shards);
/* The same on n_threads threads (1 .. FASA_POOL_MAX, worker/pool.h): a pool made once,
 * here, and used by every step; outputs are the same bits for any n_threads. Returns 0, or
 * -1 out of memory or when a thread cannot be started. */
int fasa_transport_local_threads(fasa_transport *t, int n_shards, int n_threads);

#endif

/* The fasa engine: sessions, their placement over shards, and the decode step plan
 *   score (each shard's local top-B) -> global top-B -> attention over the selected rows
 *   on each shard -> exact log-sum-exp merge
 * driven over a transport (transport.h): in-process shards for the embedded engine, MPI
 * ranks for the server. Selection uses the total order of topk.h and the merge is exact,
 * so outputs do not depend on the number of shards beyond float rounding.
 *
 * Every call validates its input first and on error changes nothing, returning a status
 * and a one-line message naming the field at fault. The one exception is running out of
 * memory on a shard part-way through an append (or the step after an Attend's k_new): the
 * rows placed so far stay, the session's length counts them, and the message says so, so a
 * client can resume from the new length. */
#ifndef FASA_COORD_ENGINE_H
#define FASA_COORD_ENGINE_H

#include <stddef.h>
#include <stdint.h>

#include "profile.h"
#include "transport.h"

#define FASA_ID_MAX 128         /* session id bytes */
#define FASA_DEFAULT_BLOCK 2048 /* tokens per placement block */

typedef enum fasa_status {
    FASA_OK = 0,
    FASA_INVALID_ARGUMENT,
    FASA_NOT_FOUND,
    FASA_ALREADY_EXISTS,
    FASA_RESOURCE_EXHAUSTED,
    FASA_UNAUTHENTICATED,
    FASA_FAILED_PRECONDITION,
    FASA_INTERNAL,
    FASA_UNAVAILABLE,
} fasa_status;

typedef struct fasa_error {
    fasa_status code;
    char msg[256];
} fasa_error;

/* Methods. The baselines (fasa-algorithm.md §6) run on the same step plan as fasa:
 *   stream  8 sink tokens (positions 0..7) + the B - 8 most recent visible tokens; with
 *           B <= 8 only the first B sinks;
 *   quest   pages of 16 tokens aligned to absolute positions, page score
 *           sum_c max(q_c min_c, q_c max_c) (shared GQA: summed over the group's heads),
 *           exact attention over every visible token of the top ceil(B/16) pages. Needs a
 *           placement block that is a multiple of 16 (pages never straddle shards).
 *   sparq   per query head: the r largest |q_c| (r = 2 ntip, the dims fasa uses, with a
 *           profile; head_dim / 4 without, at least 1), approximate scores
 *           softmax(q[i1].K[:,i1] / tau), tau = sqrt(d |q[i1]|_1 / |q|_1), exact attention over
 *           the top B, output alpha * attn + (1 - alpha) * mean of the visible values with
 *           alpha the approximate softmax mass of the selected tokens. Per-head GQA only
 *           (INVALID_ARGUMENT with shared).
 * Like oracle, the baselines ignore dense_layers (that applies to fasa and fasa-plus only).
 *
 * Our own method:
 *   fasa-plus  needs a profile, per-head GQA only (INVALID_ARGUMENT with shared). Per query
 *           head: fasa's scan over the stored dominant dims, scored with every dim the KV
 *           head stores (the union of its query heads' FCs: the bytes fasa's scan reads
 *           anyway); position 0 (a sink) and the R = B / (2 ntip) - 1 most recent visible
 *           tokens (at least 0) are always among the top B; exact attention over the union
 *           of the top B of every head of its KV group (at most group x B rows: the rows
 *           phase 2 gathers once for the group anyway, so no more bytes than the head's own
 *           B; the selection reported is the head's own top B).
 *           Then the tokens not selected (U) are estimated from their partial scores s_j
 *           already computed, z_j = scale s_j: their mass M = sum_U e^{z_j} e^c, where c is
 *           the mean of scale mu (mu = q_rest . the mean of the visible keys over the dims
 *           not scored) and of log(sum_sel e^{f_j} / sum_sel e^{z_j}); and their value
 *           vhat = vbar_U + cov_U(v, z) / var_U(z) (zhat - zbar_U), zhat the e^z-weighted
 *           mean of z over U (the regression of v on z; sum v z over U comes from a
 *           running sum of v kdom^T per KV head). out = (sum_sel e^{f_j} v_j + M vhat) /
 *           (sum_sel e^{f_j} + M), f_j the exact logits. Reads fasa's bytes (phase 2 gathers
 *           each KV group's rows once, as fasa does; the forced rows are common to the
 *           group's heads) plus, per KV head and shard, its running sums in f32: the
 *           values' (head_dim), the keys' over the dims not scored (head_dim - u) and
 *           v kdom^T (head_dim x u), all kept up to date as append work (not counted). */
typedef enum fasa_method {
    FASA_METHOD_FASA = 0,
    FASA_METHOD_DENSE,
    FASA_METHOD_ORACLE,
    FASA_METHOD_STREAM,
    FASA_METHOD_QUEST,
    FASA_METHOD_SPARQ,
    FASA_METHOD_FASA_PLUS
} fasa_method;
#define FASA_METHOD_LAST FASA_METHOD_FASA_PLUS
#define FASA_QUEST_PAGE 16 /* tokens per quest page (SHARD_QUEST_PAGE) */
typedef enum fasa_gqa { FASA_GQA_PER_HEAD = 0, FASA_GQA_SHARED = 1 } fasa_gqa;

const char *fasa_status_name(fasa_status code);
/* Fills err (when not NULL) with code and a printf-formatted one-line message; returns code. */
fasa_status fasa_error_set(fasa_error *err, fasa_status code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
const char *fasa_method_name(fasa_method m);
int fasa_method_parse(const char *name, fasa_method *out_p);
int fasa_gqa_parse(const char *name, fasa_gqa *out_p);

typedef struct fasa_session_config {
    int n_layers, n_heads, n_kv_heads, head_dim;
    fc_pairing pairing;
    const fasa_profile *profile; /* borrowed, copied; NULL: no profile (fasa unavailable) */
    fasa_method method;          /* default method */
    int budget;                  /* default B, tokens per selection unit */
    fasa_gqa gqa;                /* default token selection: per query head or per KV head */
    const uint8_t *dense_layers; /* (n_layers) 1 = always dense under fasa; NULL: layer 0 */
    int dtype;                   /* fasa_dtype (kernels/dtype.h) of the stored keys and values;
                                    0 = f32 */
    int score_dtype;             /* scan_dtype (kernels/scan.h) of the FASA scan's scoring
                                    store: 0 (auto) = dtype's own; f32, f16, bf16, int8 */
    int tier;                    /* 0: keys and values in RAM; 1 (disk): only the dominant key
                                    dims in RAM, the rest of K and V in unlinked files under
                                    tier_dir (worker/shard.h SHARD_TIER_DISK; in-process
                                    shards and MPI workers, each in its own tier_dir) */
    const char *tier_dir;        /* with tier 1: an existing directory (copied); NULL: the
                                    engine's (fasa_engine_set_tier_dir) */
    int merge;                   /* fasa_merge of sparse steps: 0 exact (default), 1 local */
} fasa_session_config;

typedef struct fasa_attend_req {
    int layer;
    const float *q;     /* (n_heads, head_dim) post-RoPE queries */
    const float *k_new; /* (n_kv_heads, head_dim) or NULL: appended at the next position first */
    const float *v_new; /* (n_kv_heads, head_dim), with k_new */
    int method;         /* fasa_method, or -1 for the session default */
    int budget;         /* B, or 0 for the session default */
    int gqa;            /* fasa_gqa, or -1 for the session default */
    int32_t max_pos;    /* highest visible position, or -1 for all appended */
    int merge;          /* fasa_merge, or -1 for the session default (0 in a zeroed struct
                           is exact) */
} fasa_attend_req;

/* A decode step of layer with the session's defaults (method, budget, token selection, the
 * exact merge) over every appended position: q, with k_new and v_new (or NULL) appended
 * first. */
static inline fasa_attend_req fasa_attend_step(int layer, const float *q, const float *k_new,
                                               const float *v_new)
{
    return (fasa_attend_req){.layer = layer,
                             .q = q,
                             .k_new = k_new,
                             .v_new = v_new,
                             .method = -1,
                             .budget = 0,
                             .gqa = -1,
                             .max_pos = -1};
}

typedef struct fasa_step_stats {
    int method_used;    /* fasa_method actually run (dense when every token fits B) */
    int n_visible;      /* tokens visible to the step */
    int64_t bytes_read; /* KV bytes read on all shards */
    /* fasa_engine_attend only (0 from a batch): the step's wall time on the calling thread
     * in phase 1 (the shards' scoring, with the k_new append when the transport carries it
     * along), the merges (global top-B and log-sum-exp) and phase 2 (the shards' attention;
     * for a dense step the only phase, then with the k_new, and likewise for a sparse step
     * run in one exchange, fasa_engine_set_one_exchange). Microseconds. */
    double score_us, merge_us, attend_us;
    int merge_used;   /* fasa_merge run (a dense step: exact) */
    int local_budget; /* local merge: tokens each shard kept per unit; else 0 */
} fasa_step_stats;

/* How a sparse step's shards combine (fasa.proto Merge):
 *   exact  the default: every shard's top-B candidates to the coordinator, the global top-B
 *          per unit, then every shard's attention over its part of them (two phases);
 *   local  one phase: each of the S shards scores and attends over its own top
 *          ceil(B (1 + eps) / S) per unit (its top B with one shard, so the same as exact),
 *          and the partials are merged exactly by their log-sum-exp. Methods fasa and
 *          oracle only; selected is all -1. eps: fasa_engine_set_merge_eps (default 0.25). */
typedef enum fasa_merge { FASA_MERGE_EXACT = 0, FASA_MERGE_LOCAL = 1 } fasa_merge;
#define FASA_MERGE_EPS_DEFAULT 0.25

typedef struct fasa_engine fasa_engine_t;

/* The local merge's eps, in [0, 64]; -1 when out of range (unchanged). */
int fasa_engine_set_merge_eps(fasa_engine_t *e, double eps);
/* Tokens each of the engine's shards keeps per unit under local merge for budget B. */
int fasa_engine_local_budget(const fasa_engine_t *e, int budget);
/* An exact sparse step whose visible rows are all on one shard (one shard, or every visible
 * position in the first placement block) scores and attends in one exchange when on (the
 * default; FASA_ONE_EXCHANGE=0 in the environment turns it off) and the transport offers it
 * (transport.h score_attend: the MPI one), in two (score, then attend over the global top-B)
 * when off. The same outputs, selections and stats either way but
 * the phase times: the one exchange counts as attend_us. For tests and measurements. */
void fasa_engine_set_one_exchange(fasa_engine_t *e, int on);

/* A new engine over in-process shards. n_shards >= 1; block_tokens >= 1 tokens per
 * placement block (block-cyclic). NULL when out of memory. Caller owns the engine (free with
 * fasa_engine_destroy). */
fasa_engine_t *fasa_engine_new(int n_shards, int block_tokens);
/* An engine over a caller-made transport. On success the engine takes the transport over
 * (its destroy runs in fasa_engine_destroy) and *transport is cleared (ctx and destroy NULL:
 * the caller holds nothing to destroy twice); on NULL (out of memory) *transport is left as
 * it was and is still the caller's. Caller owns the engine (free with fasa_engine_destroy). */
fasa_engine_t *fasa_engine_new_with(fasa_transport *transport, int block_tokens);
/* Frees the engine, its sessions and its transport; *engine_p becomes NULL. NULL (or *engine_p
 * NULL) is a no-op. */
void fasa_engine_destroy(fasa_engine_t **engine_p);

fasa_status fasa_engine_create(fasa_engine_t *e, const char *id, const fasa_session_config *cfg,
                               fasa_error *err);
fasa_status fasa_engine_drop(fasa_engine_t *e, const char *id, fasa_error *err);

/* Appends keys and values of positions pos0 .. pos0 + n - 1 (pos0 must be the next
 * position). layer >= 0: k, v are (n, n_kv_heads, head_dim) for that layer; layer = -1:
 * (n_layers, n, n_kv_heads, head_dim) for every layer, which must all be at pos0. */
fasa_status fasa_engine_append(fasa_engine_t *e, const char *id, int layer, int32_t pos0, int n,
                               const float *k, const float *v, fasa_error *err);
/* The same with k and v of dtype (fasa_dtype: f32, f16 or bf16) elements: the rows are
 * stored as an f32 append of the values widened to f32 would store them (rows of the
 * session's dtype are copied as they are). Values must be finite (and below 2^50 and not
 * overflow the session's dtype, as for f32). All or nothing: on any failure (a bad value,
 * the memory limit, a shard out of memory or a worker error) no shard holds any of the
 * rows. */
fasa_status fasa_engine_append_dt(fasa_engine_t *e, const char *id, int layer, int32_t pos0, int n,
                                  int dtype, const void *k, const void *v, fasa_error *err);
/* For a caller that makes the value check itself (the service, one pass over the values
 * of a request): fasa_engine_bad_value is the check fasa_engine_append_dt makes of k and
 * of v (n values of in_dtype for a session of store_dtype): the index of the first value
 * that is not finite, at least 2^50, or overflows store_dtype, or -1; fasa_engine_value_error
 * sets err to that value's message (name[i] ...) and returns its status; and
 * fasa_engine_append_checked is fasa_engine_append_dt without that pass: every value of k
 * and v must already have passed fasa_engine_bad_value with the session's dtype. */
long fasa_engine_bad_value(int in_dtype, int store_dtype, size_t n, const void *x);
fasa_status fasa_engine_value_error(fasa_error *err, const char *name, long i, int in_dtype,
                                    int store_dtype, const void *x);
fasa_status fasa_engine_append_checked(fasa_engine_t *e, const char *id, int layer, int32_t pos0,
                                       int n, int dtype, const void *k, const void *v,
                                       fasa_error *err);

/* One decode step of one layer. out (n_heads, head_dim) gets the attention outputs.
 * selected, if not NULL, is (n_heads, budget): each head's chosen positions best-first
 * (all visible positions ascending when every token fits the budget), -1 padded; for a
 * dense step it is all -1. For quest it lists the tokens of the selected pages, best page
 * first and ascending within a page, cut at budget entries (ceil(B/16) pages can hold up
 * to 15 tokens more than B; they are attended but not listed). stats may be NULL. */
fasa_status fasa_engine_attend(fasa_engine_t *e, const char *id, const fasa_attend_req *req,
                               float *out, int32_t *selected, fasa_step_stats *stats,
                               fasa_error *err);

/* A batch of steps with the same outcome as fasa_engine_attend on each item in order (the
 * same outputs, statuses and state changes; errs[i].code is item i's status), but the
 * shards' phases of steps of different sessions are pipelined: the engine merges one step's
 * candidates while the shards score the next, and a step's attention is sent as soon as its
 * candidates are merged. Items are taken in waves of steps of different sessions (a session
 * seen again starts the next wave). selected and stats may be NULL, as may selected[i].
 * FASA_PIPELINE=0 in the environment when the engine is made turns the pipelining off (the
 * items then run one by one), for comparisons.
 * Returns the number of items that succeeded. */
int fasa_engine_attend_batch(fasa_engine_t *e, int n, const char *const *ids,
                             const fasa_attend_req *reqs, float *const *outs,
                             int32_t *const *selected, fasa_step_stats *stats, fasa_error *errs);

/* Positions appended so far to a layer of a session, or -1 if there is no such session. */
int32_t fasa_engine_length(const fasa_engine_t *e, const char *id, int layer);

/* A session's configuration (borrowed; profile and dense_layers point at the engine's
 * copies), or NULL if there is no such session. */
const fasa_session_config *fasa_engine_config(const fasa_engine_t *e, const char *id);

/* Replaces a session's profile (borrowed: the engine keeps a copy; NULL: none). The key layout
 * depends on the profile, so this is allowed only while the session holds no tokens
 * (FAILED_PRECONDITION). */
fasa_status fasa_engine_set_profile(fasa_engine_t *e, const char *id, const fasa_profile *profile,
                                    fasa_error *err);

/* Sessions held, and the bytes of keys and values held by one session (id) or by all
 * (id NULL); -1 for an unknown id. */
int fasa_engine_count(const fasa_engine_t *e);
int64_t fasa_engine_kv_bytes(const fasa_engine_t *e, const char *id);

/* The memory limit (--memory-limit): an append (or an Attend's k_new) that would take a
 * shard's KV store past bytes_per_shard allocated bytes (shard_bytes_held: chunks, position
 * tables and QUEST page bounds, over every session) is refused with RESOURCE_EXHAUSTED
 * before any row is sent, so it changes nothing. 0 = no limit. In the server a shard is a
 * worker rank (shard i on rank i + 1; with one rank, rank 0 holds shard 0). */
void fasa_engine_set_memory_limit(fasa_engine_t *e, int64_t bytes_per_shard);
/* The session limit (--max-sessions): a create (a restore's too) beyond max_sessions held
 * sessions is refused with RESOURCE_EXHAUSTED. 0 = no limit. */
void fasa_engine_set_max_sessions(fasa_engine_t *e, int max_sessions);
/* The directory of disk-tier sessions whose config names none (a server's --tier-dir, and
 * disk-tier sessions a restore brings back); NULL or "" for none. 0, or -1 out of memory. */
int fasa_engine_set_tier_dir(fasa_engine_t *e, const char *dir);
/* The KV store bytes shard `shard` allocates, as the engine accounts them (equal to the
 * shard's own shard_bytes_held), or -1 for a shard out of range. */
int64_t fasa_engine_shard_bytes(const fasa_engine_t *e, int shard);

/* The resident memory of each shard's process, out[n_shards] (shards on MPI workers): 0, or
 * -1 when the transport cannot say (in-process: they are all this process). */
int fasa_engine_shard_rss(fasa_engine_t *e, int64_t *out);

/* What every shard holds (transport.h fasa_shard_stats): out has one entry per shard of the
 * engine (shard i in out[i]), for session id, or summed over every session (id NULL).
 * NOT_FOUND for an unknown id; INTERNAL when a shard did not report. */
fasa_status fasa_engine_shard_stats(fasa_engine_t *e, const char *id, fasa_shard_stats *out,
                                    fasa_error *err);

/* Snapshots (coord/snapshot.h drives them; these are its handles on the engine). */

/* Shards of this engine, and its placement block in tokens. */
int fasa_engine_n_shards(const fasa_engine_t *e);
int fasa_engine_block(const fasa_engine_t *e);
/* The ids of the sessions held (borrowed, valid until the next create or drop): the first
 * min(count, cap) go to ids; returns the count. */
int fasa_engine_ids(const fasa_engine_t *e, const char **ids, int cap);
/* A value that changes whenever a session's content (rows, profile) changes; 0 for an
 * unknown id. */
uint64_t fasa_engine_revision(const fasa_engine_t *e, const char *id);
/* Every shard of session id writes its snapshot file (shard_snap.h) to path_prefix +
 * ".s<i>.shard"; out (n_shards) gets each file's checksum and size. NOT_FOUND, or INTERNAL
 * naming the shard and the error when a shard could not write (files of the others may
 * exist: the caller removes them). */
fasa_status fasa_engine_write_shards(fasa_engine_t *e, const char *id, const char *path_prefix,
                                     shard_snap_info *out, fasa_error *err);

#endif

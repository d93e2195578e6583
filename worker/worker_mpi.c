/* The command loop of a worker rank: rank 0's shard commands (worker_mpi_wire.h) executed
 * on this rank's shards, one shard_t per session, in a table indexed by the engine's
 * session number (small increasing integers).
 *
 * The loop spends most of its life idle between decode steps, so it must not hold a core:
 * a blocking MPI_Recv busy-polls in Open MPI, so it polls with MPI_Iprobe and sleeps
 * between polls instead (wmpi_backoff: a spin after each command, so the next command of
 * a burst is picked up at once, as long as the recent gaps between commands (wmpi_adapt: a
 * decode loop's next Attend; only short gaps where the node has no CPU to spare), then
 * sleeps in ppoll until rank 0's wake-up (kick.h) or a timeout growing to WORKER_MAX_SLEEP_NS,
 * longer once wake-ups arrive).
 *
 * Every command is checked before it is used: its size against its header, the header's
 * geometry against the session it names, positions against the rows held. A bad command
 * gets an error reply and changes nothing; the worker keeps serving. */
#include "worker_mpi.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "dtype.h"
#include "scan.h"
#include "log.h"
#include "pool.h"

#include "load_rows.h"
#include "local_merge.h"
#include "shard.h"
#include "shard_snap.h"
#include "worker_mpi_wire.h"

/* Longest sleep between polls while idle: the latency a command can wait for a sleeping
 * worker, against about one wakeup per WORKER_MAX_SLEEP_NS of CPU while idle. */
#define WORKER_MAX_SLEEP_NS 200000L
/* The replies a worker sends are at most a few MiB, but start with room for any header. */
#define WORKER_REPLY0 4096

typedef struct worker_session {
    shard_t *shard; /* NULL: no such session */
    /* The last successful SCORE; a sparse ATTEND must be its second half. */
    int scored;
    shard_step last;
} worker_session;

typedef struct worker {
    MPI_Comm comm;
    int rank;
    int size;              /* ranks in comm: shards are ranks 1 .. size - 1 */
    int cap;               /* capacity of sessions */
    worker_session *table; /* (cap) indexed by sid */
    uint8_t *rx;           /* the command being served, grow-only */
    size_t rx_cap;
    uint8_t *tx; /* the reply being built: header, then payload built in place */
    size_t tx_cap;
    fasa_pool_t *pool;     /* every shard's steps run on it (NULL: one thread) */
    wmpi_kick kick;        /* wake-ups from rank 0 while idle (kick.h) */
    MPI_Request reply_req; /* the last reply's send, completed before tx is reused */
    int reply_pending;
    int fault_in;    /* WMPI_TEST_FAULT: sections until one fails, 0: never */
    int32_t *runpos; /* APPEND_RUNS: one section's positions, grow-only */
    size_t runpos_cap;
    uint8_t *parts_hdr; /* APPEND_PARTS: the command's header and runs, grow-only */
    size_t parts_hdr_cap;
    MPI_Request *part_req; /* APPEND_PARTS: one receive per part, grow-only */
    size_t part_req_cap;
} worker;

static int s_grow(uint8_t **buf, size_t *cap, size_t bytes)
{
    if (bytes <= *cap) return 0;
    uint8_t *p = realloc(*buf, bytes);
    if (!p) return -1;
    /* Zeroed, so reply slots a step leaves unwritten never carry stale heap bytes. */
    memset(p + *cap, 0, bytes - *cap);
    *buf = p;
    *cap = bytes;
    return 0;
}

/* Logs a rejected command once, here where the reason is known, and returns its status. */
static wmpi_status s_reject(const worker *w, wmpi_status st, const wmpi_cmd *h, const char *why)
{
    (void)w;
    fasa_log(FASA_LOG_WARN, 0, "worker: command %d sid %d rejected: %s", h ? h->cmd : -1,
             h ? h->sid : -1, why);
    return st;
}

/* Completes the last reply's send (rank 0 has usually taken it long before). */
static void s_reply_done(worker *w)
{
    if (!w->reply_pending) return;
    wmpi_waitall(1, &w->reply_req, MPI_STATUSES_IGNORE, WORKER_MAX_SLEEP_NS, NULL);
    w->reply_pending = 0;
}

/* Sends the reply header in w->tx with payload bytes after it and wakes rank 0; the send
 * completes in the background (s_reply_done, before w->tx is written again), so the
 * worker goes back to its loop at once. */
static void s_reply(worker *w, wmpi_status status, int cmd, int64_t bytes_read, size_t payload)
{
    const wmpi_reply r = {.status = status, .cmd = cmd, .bytes_read = bytes_read};
    memcpy(w->tx, &r, sizeof(r));
    if (status != WMPI_OK) payload = 0;
    MPI_Isend(w->tx, (int)(sizeof(r) + payload), MPI_BYTE, 0, WMPI_TAG_REPLY, w->comm,
              &w->reply_req);
    w->reply_pending = 1;
    /* One call into MPI first, so that the reply shows before rank 0 looks for it. */
    int done = 0;
    MPI_Test(&w->reply_req, &done, MPI_STATUS_IGNORE);
    if (done) w->reply_pending = 0;
    wmpi_kick_send(&w->kick, 0);
}

/* The live session a command names whose geometry matches the header, or NULL. */
static worker_session *s_find(worker *w, const wmpi_cmd *h)
{
    if (h->sid < 0 || h->sid >= w->cap || !w->table[h->sid].shard) return NULL;
    return &w->table[h->sid];
}

static int s_same_geometry(const shard_layout *lay, const wmpi_cmd *h)
{
    return lay->n_layers == h->n_layers && lay->n_heads == h->n_heads &&
           lay->n_kv_heads == h->n_kv_heads && lay->head_dim == h->head_dim;
}

static wmpi_status s_session_new(worker *w, const wmpi_cmd *h, const uint8_t *p)
{
    const int nl = h->n_layers, nh = h->n_heads, nkv = h->n_kv_heads, d = h->head_dim;
    if (h->sid < 0 || h->sid >= WMPI_MAX_SID)
        return s_reject(w, WMPI_EINVAL, h, "sid out of range");
    if (nl < 1 || nl > WMPI_MAX_LAYERS || nkv < 1 || nh < nkv || nh > WMPI_MAX_HEADS || nh % nkv ||
        d < 1 || d > WMPI_MAX_HEAD_DIM)
        return s_reject(w, WMPI_EINVAL, h, "bad geometry");
    const int64_t lk = (int64_t)nl * nkv, mask_end = lk * 4 + lk * d * 4 + (int64_t)nl * nh * d;
    const int disk = h->method == SHARD_TIER_DISK;
    if ((h->method != SHARD_TIER_RAM && !disk) ||
        (disk ? h->budget < 1 || h->budget > WMPI_MAX_DIR : h->budget != 0))
        return s_reject(w, WMPI_EINVAL, h, "tier or tier_dir length out of range");
    if (h->payload_bytes != mask_end + h->budget)
        return s_reject(w, WMPI_EINVAL, h, "layout size does not match the geometry");
    if (h->n < 0 || !fasa_dtype_size(h->n % 16))
        return s_reject(w, WMPI_EINVAL, h, "dtype out of range");
    if (!scan_dtype_valid(h->n / 16))
        return s_reject(w, WMPI_EINVAL, h, "score dtype out of range");
    if (h->sid < w->cap && w->table[h->sid].shard)
        return s_reject(w, WMPI_EEXIST, h, "session exists");
    shard_layout lay = {.n_layers = nl,
                        .n_heads = nh,
                        .n_kv_heads = nkv,
                        .head_dim = d,
                        .n_dom = (int *)p,
                        .perm = (int *)(p + lk * 4),
                        .qmask = (uint8_t *)(p + lk * 4 + lk * d * 4),
                        .dtype = h->n % 16,
                        .score_dtype = h->n / 16,
                        .tier = disk ? SHARD_TIER_DISK : SHARD_TIER_RAM};
    char dir[WMPI_MAX_DIR + 1];
    if (disk) {
        snprintf(dir, sizeof(dir), "%.*s", (int)h->budget, (const char *)p + mask_end);
        if (strlen(dir) != (size_t)h->budget || access(dir, W_OK))
            return s_reject(w, WMPI_EINVAL, h, "tier_dir is not a writable directory on this node");
        lay.tier_dir = dir; /* shard_new copies it */
    }
    /* The shard indexes keys by n_dom and perm: they must be in range and a permutation. */
    uint8_t seen[WMPI_MAX_HEAD_DIM];
    for (int64_t i = 0; i < lk; i++) {
        if (lay.n_dom[i] < 0 || lay.n_dom[i] > d)
            return s_reject(w, WMPI_EINVAL, h, "n_dom out of range");
        memset(seen, 0, (size_t)d);
        for (int x = 0; x < d; x++) {
            const int v = lay.perm[i * d + x];
            if (v < 0 || v >= d || seen[v])
                return s_reject(w, WMPI_EINVAL, h, "perm is not a permutation");
            seen[v] = 1;
        }
    }
    if (h->sid >= w->cap) {
        int cap = w->cap ? w->cap : 8;
        while (cap <= h->sid) cap *= 2;
        worker_session *t = realloc(w->table, (size_t)cap * sizeof(*t));
        if (!t) return s_reject(w, WMPI_ENOMEM, h, "out of memory for the session table");
        memset(t + w->cap, 0, (size_t)(cap - w->cap) * sizeof(*t));
        w->table = t;
        w->cap = cap;
    }
    shard_t *sh = shard_new(&lay);
    if (!sh) return s_reject(w, WMPI_ENOMEM, h, "out of memory for a shard");
    shard_set_pool(sh, w->pool);
    w->table[h->sid] = (worker_session){.shard = sh};
    return WMPI_OK;
}

static wmpi_status s_session_drop(worker *w, const wmpi_cmd *h)
{
    worker_session *s = s_find(w, h);
    if (!s) return s_reject(w, WMPI_ENOENT, h, "no such session");
    if (h->payload_bytes != 0) return s_reject(w, WMPI_EINVAL, h, "payload on a drop");
    shard_destroy(&s->shard);
    *s = (worker_session){0};
    return WMPI_OK;
}

static wmpi_status s_append(worker *w, const wmpi_cmd *h, const uint8_t *p)
{
    worker_session *s = s_find(w, h);
    if (!s) return s_reject(w, WMPI_ENOENT, h, "no such session");
    const shard_layout *lay = shard_layout_of(s->shard);
    if (!s_same_geometry(lay, h)) return s_reject(w, WMPI_EINVAL, h, "geometry differs");
    if (h->layer < 0 || h->layer >= lay->n_layers)
        return s_reject(w, WMPI_EINVAL, h, "layer out of range");
    const int64_t kv = (int64_t)h->n * lay->n_kv_heads * lay->head_dim * (int64_t)sizeof(float);
    if (h->n < 1 || h->payload_bytes != (int64_t)h->n * 4 + 2 * kv)
        return s_reject(w, WMPI_EINVAL, h, "append size does not match n");
    /* Rows are append-only and ascending (shard.h); anything else would corrupt lookups. */
    const int32_t *pos = (const int32_t *)p;
    const int rows = shard_rows(s->shard, h->layer);
    if (pos[0] < 0 || shard_visible(s->shard, h->layer, pos[0] - 1) != rows)
        return s_reject(w, WMPI_EINVAL, h, "positions not above the rows held");
    for (int i = 1; i < h->n; i++)
        if (pos[i] <= pos[i - 1]) return s_reject(w, WMPI_EINVAL, h, "positions not ascending");
    const float *k = (const float *)(p + (size_t)h->n * 4);
    const float *v = (const float *)(p + (size_t)h->n * 4 + (size_t)kv);
    if (shard_append(s->shard, h->layer, h->n, pos, k, v))
        return s_reject(w, WMPI_ENOMEM, h, "out of memory appending");
    return WMPI_OK;
}

/* APPEND_RUNS: every section checked first (sizes, layers, positions above the rows held
 * and ascending), then stored under the header's transaction; a section that fails puts
 * back every one before it. */
static wmpi_status s_append_runs(worker *w, const wmpi_cmd *h, const uint8_t *p)
{
    worker_session *s = s_find(w, h);
    if (!s) return s_reject(w, WMPI_ENOENT, h, "no such session");
    const shard_layout *lay = shard_layout_of(s->shard);
    if (!s_same_geometry(lay, h)) return s_reject(w, WMPI_EINVAL, h, "geometry differs");
    if (h->method < FASA_DTYPE_F32 || h->method > FASA_DTYPE_BF16 || h->max_pos == 0 || h->n < 1)
        return s_reject(w, WMPI_EINVAL, h, "append runs: dtype, transaction or count out of range");
    const int64_t row = (int64_t)lay->n_kv_heads * lay->head_dim * fasa_dtype_size(h->method);
    int32_t next[WMPI_MAX_LAYERS]; /* per layer: the lowest position the next run may take */
    for (int l = 0; l < lay->n_layers; l++) next[l] = -1;
    int64_t off = 0, max_n = 0;
    for (int i = 0; i < h->n; i++) {
        wmpi_run r;
        if (h->payload_bytes - off < (int64_t)sizeof(r))
            return s_reject(w, WMPI_EINVAL, h, "append runs: payload too short");
        memcpy(&r, p + off, sizeof(r));
        if (r.layer < 0 || r.layer >= lay->n_layers || r.n < 1 || r.pos0 < 0 ||
            (int64_t)r.pos0 + r.n > INT32_MAX ||
            h->payload_bytes - off - (int64_t)sizeof(r) < 2 * row * r.n)
            return s_reject(w, WMPI_EINVAL, h, "append runs: a section is out of range");
        if (next[r.layer] < 0 &&
            shard_visible(s->shard, r.layer, r.pos0 - 1) != shard_rows(s->shard, r.layer))
            return s_reject(w, WMPI_EINVAL, h, "positions not above the rows held");
        if (r.pos0 < next[r.layer]) return s_reject(w, WMPI_EINVAL, h, "positions not ascending");
        next[r.layer] = r.pos0 + r.n;
        if (r.n > max_n) max_n = r.n;
        off += (int64_t)sizeof(r) + 2 * row * r.n;
    }
    if (off != h->payload_bytes) return s_reject(w, WMPI_EINVAL, h, "append runs: size mismatch");
    if ((size_t)max_n > w->runpos_cap) {
        int32_t *q = realloc(w->runpos, (size_t)max_n * sizeof(int32_t));
        if (!q) return s_reject(w, WMPI_ENOMEM, h, "out of memory appending");
        w->runpos = q;
        w->runpos_cap = (size_t)max_n;
    }
    const uint32_t txn = (uint32_t)h->max_pos;
    shard_txn_begin(s->shard, txn);
    int failed = 0;
    off = 0;
    for (int i = 0; i < h->n && !failed; i++) {
        wmpi_run r;
        memcpy(&r, p + off, sizeof(r));
        const uint8_t *k = p + off + sizeof(r), *v = k + row * r.n;
        for (int j = 0; j < r.n; j++) w->runpos[j] = r.pos0 + j;
        failed = (w->fault_in > 0 && --w->fault_in == 0) ||
                 shard_append_dt(s->shard, r.layer, r.n, w->runpos, h->method, k, v);
        off += (int64_t)sizeof(r) + 2 * row * r.n;
    }
    if (failed) shard_txn_undo(s->shard, txn);
    shard_txn_begin(s->shard, 0);
    return failed ? s_reject(w, WMPI_ENOMEM, h, "out of memory appending") : WMPI_OK;
}

static wmpi_status s_append_undo(worker *w, const wmpi_cmd *h)
{
    worker_session *s = s_find(w, h);
    if (!s) return s_reject(w, WMPI_ENOENT, h, "no such session");
    if (h->payload_bytes != 0 || h->max_pos == 0)
        return s_reject(w, WMPI_EINVAL, h, "append undo: payload or transaction");
    shard_txn_undo(s->shard, (uint32_t)h->max_pos);
    return WMPI_OK;
}

/* Checks a SCORE or ATTEND header against its session and fills the step (q aside). */
static worker_session *s_step_check(worker *w, const wmpi_cmd *h, shard_step *st,
                                    wmpi_status *status_p)
{
    worker_session *s = s_find(w, h);
    const char *why = NULL;
    *status_p = WMPI_EINVAL;
    if (!s) {
        *status_p = WMPI_ENOENT;
        why = "no such session";
    } else if (!s_same_geometry(shard_layout_of(s->shard), h)) {
        why = "geometry differs";
    } else if (h->layer < 0 || h->layer >= h->n_layers) {
        why = "layer out of range";
    } else if (h->method < SHARD_FASA || h->method > SHARD_METHOD_LAST) {
        why = "unknown method";
    } else if (h->gqa != SHARD_GQA_PER_HEAD && h->gqa != SHARD_GQA_SHARED) {
        why = "unknown gqa";
    } else if (h->budget < 1 || h->budget > WMPI_MAX_BUDGET) {
        why = "budget out of range";
    } else if (h->n_units != shard_units(s->shard, (shard_gqa)h->gqa)) {
        why = "n_units does not match gqa";
    } else if (!isfinite(h->scale)) {
        why = "scale is not finite";
    } else if (h->method == SHARD_SPARQ &&
               (h->sparq_r < 1 || h->sparq_r > h->head_dim || h->gqa != SHARD_GQA_PER_HEAD)) {
        why = "sparq needs r in [1, head_dim] and per-head gqa";
    } else if (h->method == SHARD_FASA_PLUS &&
               (h->sparq_r < 0 || h->sparq_r >= h->budget || h->gqa != SHARD_GQA_PER_HEAD)) {
        why = "fasa-plus needs a recent window in [0, budget) and per-head gqa";
    }
    if (why) {
        s_reject(w, *status_p, h, why);
        return NULL;
    }
    *st = (shard_step){.layer = h->layer,
                       .method = (shard_method)h->method,
                       .gqa = (shard_gqa)h->gqa,
                       .budget = h->budget,
                       .max_pos = h->max_pos,
                       .scale = h->scale,
                       .sparq_r = h->sparq_r};
    *status_p = WMPI_OK;
    return s;
}

/* Phase 1; the reply payload (cands, n_cands) is written in place in w->tx. */
static wmpi_status s_score(worker *w, const wmpi_cmd *h, const uint8_t *p, size_t *payload_p)
{
    shard_step st;
    wmpi_status status;
    worker_session *s = s_step_check(w, h, &st, &status);
    if (!s) return status;
    const size_t units = (size_t)h->n_units, q_bytes = (size_t)h->n_heads * h->head_dim * 4;
    if (h->payload_bytes != (int64_t)q_bytes)
        return s_reject(w, WMPI_EINVAL, h, "score size does not match the geometry");
    const size_t cand_bytes = units * (size_t)st.budget * sizeof(topk_cand);
    const size_t payload = cand_bytes + units * sizeof(int);
    if ((int64_t)payload > WMPI_MAX_MSG - (int64_t)sizeof(wmpi_reply))
        return s_reject(w, WMPI_ENOMEM, h, "candidates too big for one reply");
    if (s_grow(&w->tx, &w->tx_cap, sizeof(wmpi_reply) + payload))
        return s_reject(w, WMPI_ENOMEM, h, "out of memory for the reply");
    st.q = (const float *)p;
    s->scored = 0;
    uint8_t *r = w->tx + sizeof(wmpi_reply);
    if (shard_score(s->shard, &st, (topk_cand *)r, (int *)(r + cand_bytes)))
        return s_reject(w, WMPI_ENOMEM, h, "out of memory scoring");
    s->scored = 1;
    s->last = st;
    *payload_p = payload;
    return WMPI_OK;
}

/* Where an attend reply's sections lie, in bytes from its payload's start: l (n_heads
 * doubles), o (n_heads x head_dim doubles), the SPARQ / FASA_PLUS aux (aux_n doubles, else
 * none), m (n_heads floats); bytes: the whole. ATTEND and SCORE_ATTEND replies begin so. */
typedef struct attend_layout {
    size_t o, aux, m, bytes, aux_n;
} attend_layout;

static attend_layout s_attend_layout(const shard_step *st, size_t nh, size_t d)
{
    attend_layout a;
    a.aux_n =
        st->method == SHARD_SPARQ || st->method == SHARD_FASA_PLUS ? nh * SHARD_SPARQ_AUX(d) : 0;
    a.o = nh * 8;
    a.aux = a.o + nh * d * 8;
    a.m = a.aux + a.aux_n * 8;
    a.bytes = a.m + nh * 4;
    return a;
}

/* Phase 2; the reply payload (l, o, m) is written in place in w->tx. */
static wmpi_status s_attend(worker *w, const wmpi_cmd *h, const uint8_t *p, size_t *payload_p,
                            int64_t *bytes_p)
{
    shard_step st;
    wmpi_status status;
    worker_session *s = s_step_check(w, h, &st, &status);
    if (!s) return status;
    const size_t units = (size_t)h->n_units, nh = (size_t)h->n_heads, d = (size_t)h->head_dim;
    const int dense = st.method == SHARD_DENSE;
    const size_t q_bytes = nh * d * 4, thr_bytes = dense ? 0 : units * (sizeof(topk_cand) + 1);
    if (h->payload_bytes != (int64_t)(q_bytes + thr_bytes))
        return s_reject(w, WMPI_EINVAL, h, "attend size does not match the geometry");
    /* A sparse attend selects from what the last score kept: it must be that step's. */
    if (!dense && (!s->scored || s->last.layer != st.layer || s->last.method != st.method ||
                   s->last.gqa != st.gqa || s->last.budget != st.budget ||
                   s->last.max_pos != st.max_pos || s->last.sparq_r != st.sparq_r))
        return s_reject(w, WMPI_EINVAL, h, "sparse attend without its score");
    const attend_layout a = s_attend_layout(&st, nh, d);
    const size_t payload = a.bytes;
    if (s_grow(&w->tx, &w->tx_cap, sizeof(wmpi_reply) + payload))
        return s_reject(w, WMPI_ENOMEM, h, "out of memory for the reply");
    st.q = (const float *)p;
    const topk_cand *thr = dense ? NULL : (const topk_cand *)(p + q_bytes);
    const uint8_t *have_thr = dense ? NULL : p + q_bytes + units * sizeof(topk_cand);
    uint8_t *r = w->tx + sizeof(wmpi_reply);
    if (shard_attend(s->shard, &st, thr, have_thr, (float *)(r + a.m), (double *)r,
                     (double *)(r + a.o)))
        return s_reject(w, WMPI_ENOMEM, h, "out of memory attending");
    if (a.aux_n) shard_sparq_aux(s->shard, &st, (double *)(r + a.aux));
    *bytes_p = shard_bytes_read(s->shard);
    *payload_p = payload;
    return WMPI_OK;
}

/* SCORE_ATTEND: both phases of an exact sparse step whose visible rows are all on one
 * shard; the reply payload (l, o, aux, m, then cands, n_cands) is written in place in w->tx,
 * the thresholds' scratch after it. */
static wmpi_status s_score_attend(worker *w, const wmpi_cmd *h, const uint8_t *p, size_t *payload_p,
                                  int64_t *bytes_p)
{
    shard_step st;
    wmpi_status status;
    worker_session *s = s_step_check(w, h, &st, &status);
    if (!s) return status;
    const size_t units = (size_t)h->n_units, nh = (size_t)h->n_heads, d = (size_t)h->head_dim;
    if (h->payload_bytes != (int64_t)(nh * d * 4))
        return s_reject(w, WMPI_EINVAL, h, "score_attend size does not match the geometry");
    if (st.method == SHARD_DENSE)
        return s_reject(w, WMPI_EINVAL, h, "score_attend of a dense step");
    const attend_layout a = s_attend_layout(&st, nh, d);
    const size_t att = a.bytes;
    const size_t cand_bytes = units * (size_t)st.budget * sizeof(topk_cand);
    const size_t payload = att + cand_bytes + units * sizeof(int);
    if ((int64_t)payload > WMPI_MAX_MSG - (int64_t)sizeof(wmpi_reply))
        return s_reject(w, WMPI_ENOMEM, h, "candidates too big for one reply");
    if (s_grow(&w->tx, &w->tx_cap, sizeof(wmpi_reply) + payload + units * (sizeof(topk_cand) + 1)))
        return s_reject(w, WMPI_ENOMEM, h, "out of memory for the reply");
    st.q = (const float *)p;
    s->scored = 0;
    uint8_t *r = w->tx + sizeof(wmpi_reply);
    /* Every section is 4-byte aligned (att is a multiple of 4), as topk_cand needs. */
    topk_cand *thr = (topk_cand *)(void *)(r + payload);
    if (shard_score_attend(
            s->shard, &st, (topk_cand *)(void *)(r + att), (int *)(void *)(r + att + cand_bytes),
            thr, (uint8_t *)(thr + units), (float *)(void *)(r + a.m), (double *)(void *)r,
            (double *)(void *)(r + a.o), a.aux_n ? (double *)(void *)(r + a.aux) : NULL))
        return s_reject(w, WMPI_ENOMEM, h, "out of memory scoring and attending");
    s->scored = 1;
    s->last = st;
    *bytes_p = shard_bytes_read(s->shard);
    *payload_p = payload;
    return WMPI_OK;
}

/* SCORE_KNEW, ATTEND_KNEW: a decode step's k_new (wmpi_knew, k, v) in front of a SCORE or
 * ATTEND payload. Every check of the phase is made first (on a header describing just the
 * phase), then the shard named appends the row and runs the phase; the others run the phase.
 * *appended_p: 1 once the row was appended here. */
static wmpi_status s_knew_step(worker *w, const wmpi_cmd *h, const uint8_t *p, size_t *payload_p,
                               int64_t *bytes_p, int *appended_p)
{
    shard_step st;
    wmpi_status status;
    worker_session *s = s_step_check(w, h, &st, &status);
    if (!s) return status;
    const size_t row = (size_t)h->n_kv_heads * h->head_dim * sizeof(float);
    const size_t knew_bytes = sizeof(wmpi_knew) + 2 * row;
    if (h->payload_bytes < (int64_t)knew_bytes)
        return s_reject(w, WMPI_EINVAL, h, "k_new section shorter than its row");
    wmpi_knew kh;
    memcpy(&kh, p, sizeof(kh));
    if (kh.shard < 0 || kh.shard >= w->size - 1)
        return s_reject(w, WMPI_EINVAL, h, "k_new shard out of range");
    wmpi_cmd ph = *h;
    ph.cmd = h->cmd == WMPI_SCORE_KNEW          ? WMPI_SCORE
             : h->cmd == WMPI_SCORE_ATTEND_KNEW ? WMPI_SCORE_ATTEND
                                                : WMPI_ATTEND;
    ph.payload_bytes = h->payload_bytes - (int64_t)knew_bytes;
    const uint8_t *pp = p + knew_bytes;
    /* The phase's own size checks, before anything changes (they return before using
     * the shard when the sizes are wrong). */
    const size_t units = (size_t)h->n_units, q_bytes = (size_t)h->n_heads * h->head_dim * 4;
    const size_t thr_bytes =
        ph.cmd != WMPI_ATTEND || st.method == SHARD_DENSE ? 0 : units * (sizeof(topk_cand) + 1);
    if (ph.payload_bytes != (int64_t)(q_bytes + thr_bytes))
        return s_reject(w, WMPI_EINVAL, h, "step size does not match the geometry");
    if (ph.cmd == WMPI_ATTEND && st.method != SHARD_DENSE)
        return s_reject(w, WMPI_EINVAL, h, "a sparse attend carries no k_new (its score did)");
    if (ph.cmd == WMPI_SCORE_ATTEND && st.method == SHARD_DENSE)
        return s_reject(w, WMPI_EINVAL, h, "score_attend of a dense step");
    if (kh.shard == w->rank - 1) {
        const int rows = shard_rows(s->shard, h->layer);
        if (kh.pos < 0 || shard_visible(s->shard, h->layer, kh.pos - 1) != rows)
            return s_reject(w, WMPI_EINVAL, h, "k_new position not above the rows held");
        const float *k = (const float *)(p + sizeof(kh)),
                    *v = (const float *)(p + sizeof(kh) + row);
        if (shard_append(s->shard, h->layer, 1, &kh.pos, k, v))
            return s_reject(w, WMPI_ENOMEM, h, "out of memory appending k_new");
        *appended_p = 1;
    }
    return ph.cmd == WMPI_SCORE          ? s_score(w, &ph, pp, payload_p)
           : ph.cmd == WMPI_SCORE_ATTEND ? s_score_attend(w, &ph, pp, payload_p, bytes_p)
                                         : s_attend(w, &ph, pp, payload_p, bytes_p);
}

/* What this worker holds for one session (sid >= 0) or every one (sid -1); the reply
 * payload (one wmpi_stats) is written in place in w->tx. */
static wmpi_status s_stats(worker *w, const wmpi_cmd *h, size_t *payload_p)
{
    if (h->payload_bytes != 0) return s_reject(w, WMPI_EINVAL, h, "payload on a stats");
    wmpi_stats st = {0};
    if (h->sid == -1) {
        for (int i = 0; i < w->cap; i++)
            if (w->table[i].shard) shard_holdings_add(&st, w->table[i].shard);
    } else {
        const worker_session *s = s_find(w, h);
        if (!s) return s_reject(w, WMPI_ENOENT, h, "no such session");
        if (!s_same_geometry(shard_layout_of(s->shard), h))
            return s_reject(w, WMPI_EINVAL, h, "geometry differs");
        shard_holdings_add(&st, s->shard);
    }
    st.rss_bytes = fasa_rss_bytes();
    if (s_grow(&w->tx, &w->tx_cap, sizeof(wmpi_reply) + sizeof(st)))
        return s_reject(w, WMPI_ENOMEM, h, "out of memory for the reply");
    memcpy(w->tx + sizeof(wmpi_reply), &st, sizeof(st));
    *payload_p = sizeof(st);
    return WMPI_OK;
}

/* Writes this worker's shard of a session to its snapshot file; the reply payload (one
 * shard_snap_info, err_no set when the write failed) is written in place in w->tx. */
static wmpi_status s_snapshot(worker *w, const wmpi_cmd *h, const uint8_t *p, size_t *payload_p)
{
    const worker_session *s = s_find(w, h);
    if (!s) return s_reject(w, WMPI_ENOENT, h, "no such session");
    if (!s_same_geometry(shard_layout_of(s->shard), h))
        return s_reject(w, WMPI_EINVAL, h, "geometry differs");
    wmpi_snap q;
    if (h->payload_bytes < (int64_t)sizeof(q)) return s_reject(w, WMPI_EINVAL, h, "short snapshot");
    memcpy(&q, p, sizeof(q));
    if (q.prefix_len < 1 || q.prefix_len > 4000 || q.id_len < 1 || q.id_len > SHARD_SNAP_MAX_ID ||
        h->payload_bytes != (int64_t)sizeof(q) + q.prefix_len + q.id_len ||
        q.n_shards != w->size - 1)
        return s_reject(w, WMPI_EINVAL, h, "snapshot sizes do not match");
    char path[4100], id[SHARD_SNAP_MAX_ID + 1], why[300];
    const char *text = (const char *)p + sizeof(q);
    snprintf(path, sizeof(path), "%.*s.s%d.shard", q.prefix_len, text, w->rank - 1);
    snprintf(id, sizeof(id), "%.*s", q.id_len, text + q.prefix_len);
    if (s_grow(&w->tx, &w->tx_cap, sizeof(wmpi_reply) + sizeof(shard_snap_info)))
        return s_reject(w, WMPI_ENOMEM, h, "out of memory for the reply");
    shard_snap_info info;
    if (shard_snap_write(s->shard, path, id, w->rank - 1, q.n_shards, q.dtype, &info, why,
                         sizeof(why)))
        fasa_log(FASA_LOG_ERROR, 0, "worker: snapshot of session %s: %s", id, why);
    memcpy(w->tx + sizeof(wmpi_reply), &info, sizeof(info));
    *payload_p = sizeof(info);
    return WMPI_OK;
}

/* A local-merge step: score and attend in one; the reply payload (l, o, m) as ATTEND's. */
static wmpi_status s_attend_local(worker *w, const wmpi_cmd *h, const uint8_t *p, size_t *payload_p,
                                  int64_t *bytes_p)
{
    shard_step st;
    wmpi_status status;
    worker_session *s = s_step_check(w, h, &st, &status);
    if (!s) return status;
    const size_t nh = (size_t)h->n_heads, d = (size_t)h->head_dim;
    if (h->payload_bytes != (int64_t)(nh * d * 4))
        return s_reject(w, WMPI_EINVAL, h, "attend_local size does not match the geometry");
    if (st.method != SHARD_FASA && st.method != SHARD_ORACLE)
        return s_reject(w, WMPI_EINVAL, h, "attend_local needs method fasa or oracle");
    const size_t payload = nh * 8 + nh * d * 8 + nh * 4;
    if (s_grow(&w->tx, &w->tx_cap, sizeof(wmpi_reply) + payload))
        return s_reject(w, WMPI_ENOMEM, h, "out of memory for the reply");
    st.q = (const float *)p;
    s->scored = 0;
    uint8_t *r = w->tx + sizeof(wmpi_reply);
    if (shard_attend_local(s->shard, &st, (float *)(r + nh * 8 + nh * d * 8), (double *)r,
                           (double *)(r + nh * 8)))
        return s_reject(w, WMPI_ENOMEM, h, "out of memory attending");
    *bytes_p = shard_bytes_read(s->shard);
    *payload_p = payload;
    return WMPI_OK;
}

/* Loads this worker's rows of one layer from files (load_rows.h); the reply payload (one
 * load_report, err set when the files failed) is written in place in w->tx. */
static wmpi_status s_load(worker *w, const wmpi_cmd *h, const uint8_t *p, size_t *payload_p)
{
    worker_session *s = s_find(w, h);
    if (!s) return s_reject(w, WMPI_ENOENT, h, "no such session");
    if (!s_same_geometry(shard_layout_of(s->shard), h))
        return s_reject(w, WMPI_EINVAL, h, "geometry differs");
    if (h->payload_bytes != (int64_t)sizeof(load_job))
        return s_reject(w, WMPI_EINVAL, h, "load size does not match");
    load_job job;
    memcpy(&job, p, sizeof(job));
    if (job.shard != w->rank - 1 || job.n_shards != w->size - 1)
        return s_reject(w, WMPI_EINVAL, h, "load job for another shard");
    if (s_grow(&w->tx, &w->tx_cap, sizeof(wmpi_reply) + sizeof(load_report)))
        return s_reject(w, WMPI_ENOMEM, h, "out of memory for the reply");
    load_report rep;
    if (shard_load_layer(s->shard, &job, &rep)) {
        char why[400];
        load_report_text(&job, &rep, shard_layout_of(s->shard)->dtype, why, sizeof(why));
        fasa_log(FASA_LOG_WARN, 0, "worker %d: load: %s", w->rank, why);
    }
    memcpy(w->tx + sizeof(wmpi_reply), &rep, sizeof(rep));
    *payload_p = sizeof(rep);
    return WMPI_OK;
}

/* APPEND_PARTS (worker_mpi_wire.h), received as *count_p bytes in w->rx: receives its 2 n
 * parts straight into place after the runs, so that w->rx holds the APPEND_RUNS it stands
 * for (*count_p bytes then). -1 when the magic, counts or sizes do not add up, memory is
 * short or a receive fails: the parts cannot be placed, so the caller stops (fail-stop). */
static int s_recv_parts(worker *w, int *count_p)
{
    wmpi_cmd h;
    memcpy(&h, w->rx, sizeof(h));
    const int64_t nsec = h.n, hdr = (int64_t)sizeof(h) + nsec * (int64_t)sizeof(wmpi_run);
    const size_t esz = h.method >= 0 && h.method <= 2 ? fasa_dtype_size(h.method) : 0;
    if (h.magic != WMPI_MAGIC || nsec < 1 || hdr != *count_p || !esz || h.payload_bytes < 0 ||
        h.payload_bytes > WMPI_MAX_MSG - (int64_t)sizeof(h) || h.n_kv_heads < 1 || h.head_dim < 1 ||
        h.n_kv_heads > WMPI_MAX_HEADS || h.head_dim > WMPI_MAX_HEAD_DIM) {
        fasa_log(FASA_LOG_ERROR, 0, "worker: APPEND_PARTS header does not add up");
        return -1;
    }
    const int64_t row = (int64_t)h.n_kv_heads * h.head_dim * (int64_t)esz;
    int64_t total = 0;
    for (int64_t i = 0; i < nsec; i++) {
        wmpi_run r;
        memcpy(&r, w->rx + sizeof(h) + i * (int64_t)sizeof(r), sizeof(r));
        if (r.n < 1 || r.n > h.payload_bytes / (2 * row)) total = -1;
        if (total < 0) break;
        total += (int64_t)sizeof(r) + 2 * row * r.n;
    }
    if (total != h.payload_bytes) {
        fasa_log(FASA_LOG_ERROR, 0, "worker: APPEND_PARTS sections do not add up to the payload");
        return -1;
    }
    /* The header and runs aside, then the whole APPEND_RUNS layout in w->rx. */
    if (s_grow(&w->parts_hdr, &w->parts_hdr_cap, (size_t)hdr) ||
        s_grow(&w->rx, &w->rx_cap, sizeof(h) + (size_t)total)) {
        fasa_log(FASA_LOG_ERROR, 0, "worker: out of memory receiving a %lld-byte append",
                 (long long)total);
        return -1;
    }
    if ((size_t)(2 * nsec) > w->part_req_cap) {
        MPI_Request *q = realloc(w->part_req, (size_t)(2 * nsec) * sizeof(*q));
        if (!q) {
            fasa_log(FASA_LOG_ERROR, 0, "worker: out of memory receiving an append");
            return -1;
        }
        w->part_req = q;
        w->part_req_cap = (size_t)(2 * nsec);
    }
    memcpy(w->parts_hdr, w->rx, (size_t)hdr);
    h.cmd = WMPI_APPEND_RUNS;
    memcpy(w->rx, &h, sizeof(h));
    int64_t off = sizeof(h);
    for (int64_t i = 0; i < nsec; i++) {
        wmpi_run r;
        memcpy(&r, w->parts_hdr + sizeof(h) + i * (int64_t)sizeof(r), sizeof(r));
        memcpy(w->rx + off, &r, sizeof(r));
        uint8_t *k = w->rx + off + sizeof(r);
        const int bytes = (int)(row * r.n);
        MPI_Irecv(k, bytes, MPI_BYTE, 0, WMPI_TAG_PART, w->comm, &w->part_req[2 * i]);
        MPI_Irecv(k + bytes, bytes, MPI_BYTE, 0, WMPI_TAG_PART, w->comm, &w->part_req[2 * i + 1]);
        off += (int64_t)sizeof(r) + 2 * row * r.n;
    }
    /* An MPI error (a truncated part, a failed rank 0) stops the worker. */
    if (wmpi_waitall((int)(2 * nsec), w->part_req, MPI_STATUSES_IGNORE, WORKER_MAX_SLEEP_NS,
                     NULL) != MPI_SUCCESS) {
        fasa_log(FASA_LOG_ERROR, 0, "worker: receiving the parts of an append failed");
        return -1;
    }
    *count_p = (int)(sizeof(h) + (size_t)total);
    return 0;
}

/* Serves one received command of count bytes in w->rx. Returns 1 on a valid STOP. */
static int s_serve(worker *w, int count)
{
    s_reply_done(w); /* every handler may write or grow w->tx */
    wmpi_cmd h;
    if ((size_t)count < sizeof(h)) {
        s_reject(w, WMPI_EINVAL, NULL, "message shorter than a header");
        s_reply(w, WMPI_EINVAL, -1, 0, 0);
        return 0;
    }
    memcpy(&h, w->rx, sizeof(h));
    fasa_log_set_request(h.request_id); /* the worker's lines name the client's request */
    const uint8_t *p = w->rx + sizeof(h);
    size_t payload = 0;
    int64_t bytes_read = 0;
    wmpi_status st;
    if (h.magic != WMPI_MAGIC) {
        st = s_reject(w, WMPI_EINVAL, &h, "bad magic");
    } else if (h.payload_bytes != (int64_t)count - (int64_t)sizeof(h)) {
        st = s_reject(w, WMPI_EINVAL, &h, "payload_bytes does not match the message size");
    } else {
        switch (h.cmd) {
        case WMPI_STOP:
            if (h.payload_bytes == 0) return 1;
            st = s_reject(w, WMPI_EINVAL, &h, "payload on a stop");
            break;
        case WMPI_SESSION_NEW:
            st = s_session_new(w, &h, p);
            break;
        case WMPI_SESSION_DROP:
            st = s_session_drop(w, &h);
            break;
        case WMPI_APPEND:
            st = s_append(w, &h, p);
            break;
        case WMPI_APPEND_RUNS:
            st = s_append_runs(w, &h, p);
            break;
        case WMPI_APPEND_UNDO:
            st = s_append_undo(w, &h);
            break;
        case WMPI_TEST_FAULT:
            w->fault_in = h.n > 0 ? h.n : 0;
            st = h.payload_bytes ? s_reject(w, WMPI_EINVAL, &h, "payload on a fault") : WMPI_OK;
            break;
        case WMPI_SCORE:
            st = s_score(w, &h, p, &payload);
            break;
        case WMPI_ATTEND:
            st = s_attend(w, &h, p, &payload, &bytes_read);
            break;
        case WMPI_SCORE_ATTEND:
            st = s_score_attend(w, &h, p, &payload, &bytes_read);
            break;
        case WMPI_SCORE_KNEW:
        case WMPI_SCORE_ATTEND_KNEW:
        case WMPI_ATTEND_KNEW: {
            int appended = 0;
            st = s_knew_step(w, &h, p, &payload, &bytes_read, &appended);
            if (st != WMPI_OK) bytes_read = appended; /* worker_mpi_wire.h */
            break;
        }
        case WMPI_STATS:
            st = s_stats(w, &h, &payload);
            break;
        case WMPI_SNAPSHOT:
            st = s_snapshot(w, &h, p, &payload);
            break;
        case WMPI_LOAD:
            st = s_load(w, &h, p, &payload);
            break;
        case WMPI_ATTEND_LOCAL:
            st = s_attend_local(w, &h, p, &payload, &bytes_read);
            break;
        default:
            st = s_reject(w, WMPI_EINVAL, &h, "unknown command");
            break;
        }
    }
    s_reply(w, st, h.cmd, bytes_read, payload);
    return 0;
}

int worker_mpi_loop(MPI_Comm comm)
{
    return worker_mpi_loop_threads(comm, 1);
}

int worker_mpi_loop_threads(MPI_Comm comm, int n_threads)
{
    worker w = {.comm = comm};
    int rc = 0;
    MPI_Comm_rank(comm, &w.rank);
    MPI_Comm_size(comm, &w.size);
    wmpi_spin_set_ranks(w.size);
    if (n_threads > 1 && !(w.pool = fasa_pool_new(n_threads))) {
        fasa_log(FASA_LOG_ERROR, 0, "worker: cannot start %d threads", n_threads);
        return -1;
    }
    if (s_grow(&w.tx, &w.tx_cap, WORKER_REPLY0)) {
        fasa_log(FASA_LOG_ERROR, 0, "worker: out of memory starting");
        fasa_pool_destroy(&w.pool);
        return -1;
    }
    wmpi_kick_open(&w.kick, w.rank);
    /* The gaps between commands (from one's reply to the next's arrival) set the spin window
     * (wmpi_adapt): in a decode loop the next command comes while this rank still spins. */
    wmpi_adapt gaps = {.gap = 1};
    wmpi_backoff idle;
    wmpi_backoff_start(&idle, &gaps);
    struct timespec idle_since = idle.since;
    for (;;) {
        int flag = 0;
        MPI_Status status;
        MPI_Iprobe(0, WMPI_TAG_CMD, comm, &flag, &status);
        if (!flag) {
            /* A reply still going out needs this rank to keep calling into MPI. */
            if (w.reply_pending) {
                int done = 0;
                MPI_Test(&w.reply_req, &done, MPI_STATUS_IGNORE);
                if (done) w.reply_pending = 0;
            }
            wmpi_backoff_pause(&idle, WORKER_MAX_SLEEP_NS, WMPI_KICKED_SLEEP_NS, &w.kick,
                               w.reply_pending);
            continue;
        }
        int count = 0;
        MPI_Get_count(&status, MPI_BYTE, &count);
        /* Without room for the command it cannot even be received, so it cannot be
         * answered either: give up and let the caller abort the job (fail-stop). */
        if (s_grow(&w.rx, &w.rx_cap, count > 0 ? (size_t)count : 1)) {
            fasa_log(FASA_LOG_ERROR, 0, "worker: out of memory receiving a %d-byte command", count);
            rc = -1;
            break;
        }
        wmpi_adapt_note(&gaps, wmpi_since_ns(&idle_since));
        MPI_Recv(w.rx, count, MPI_BYTE, 0, WMPI_TAG_CMD, comm, MPI_STATUS_IGNORE);
        if ((size_t)count >= sizeof(wmpi_cmd) &&
            ((const wmpi_cmd *)(void *)w.rx)->cmd == WMPI_APPEND_PARTS &&
            s_recv_parts(&w, &count)) {
            rc = -1;
            break;
        }
        if (s_serve(&w, count)) break;
        wmpi_backoff_start(&idle, &gaps);
        idle_since = idle.since;
    }
    s_reply_done(&w);
    wmpi_kick_close(&w.kick);
    for (int i = 0; i < w.cap; i++) shard_destroy(&w.table[i].shard);
    free(w.table);
    free(w.rx);
    free(w.tx);
    free(w.runpos);
    free(w.parts_hdr);
    free(w.part_req);
    fasa_pool_destroy(&w.pool);
    return rc;
}

/* The MPI transport: the engine's shard operations (transport.h) as point-to-point
 * messages from rank 0 to the worker ranks (worker_mpi.c); message format in
 * worker_mpi_wire.h. It behaves like the in-process transport (transport_local.c): the same
 * results in the same caller arrays, -1 where a shard runs out of memory.
 *
 * An operation on all shards packs its command once, pre-posts every worker's reply
 * receive, sends the command to all workers (and wakes them: kick.h) and then waits for
 * everything, so the workers compute in parallel. The wait polls for a spin window (50 us,
 * or in a decode loop as long as the recent exchanges took, capped: wmpi_adapt, only while
 * this node's ranks do not outnumber its CPUs), then sleeps in the kernel until a worker's
 * reply wakes it (worker_mpi_wire.h wmpi_backoff): on a machine with fewer cores than
 * ranks, a coordinator spinning in a blocking MPI wait would take the CPU from the workers
 * it is waiting for. A decode step's k_new rides along with its first
 * phase (stage_append: SCORE_KNEW / ATTEND_KNEW). Appends go to one shard and wait for their reply,
 * so a worker out of memory fails the append that hit it. All MPI calls happen on the calling
 * thread (MPI_THREAD_FUNNELED is enough). */
#include "transport_mpi.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "liveness.h"
#include "log.h"
#include "worker_mpi_wire.h"

/* The coordinator's wait sleeps at most this long between polls: a step's phases are
 * short, so it must notice replies quickly. */
#define COORD_MAX_SLEEP_NS 100000L
/* ... and at most this long once the workers' wake-ups arrive (kick.h): a reply too large
 * for one shared-memory fragment (where single-copy is not available) comes in pieces that
 * each need a call into MPI here, and only the first is announced. */
#define COORD_KICKED_SLEEP_NS 1000000L

/* wmpi_waitall that gives up on a failed rank: an MPI error (the communicator returns
 * errors, see fasa_transport_mpi) or a rank the watchdog found dead (liveness.h) ends the
 * wait with -1 instead of waiting forever for a reply that will not come. reqs is m
 * receives, then the m sends, to the workers of shards[0 .. m) (NULL: shards first ..
 * first + m - 1, consecutive); those are the ranks it wakes again. */
static int s_waitall(int m, MPI_Request *reqs, MPI_Status *statuses, wmpi_kick *kick, int first,
                     const int *shards, wmpi_adapt *waits)
{
    const int n = 2 * m;
    wmpi_backoff b;
    wmpi_backoff_start(&b, waits);
    const struct timespec t0 = b.since;
    for (int polls = 0;; polls++) {
        int done = 0;
        const int rc = MPI_Testall(n, reqs, &done, statuses);
        if (rc != MPI_SUCCESS) {
            char why[MPI_MAX_ERROR_STRING] = "";
            int len = 0;
            MPI_Error_string(rc, why, &len);
            fasa_liveness_fail("MPI error waiting for the workers: %s", why);
            return -1;
        }
        if (done) {
            wmpi_adapt_note(waits, wmpi_since_ns(&t0));
            return 0;
        }
        if (fasa_liveness_failure()) return -1;
        /* Once the first poll has put the sends on their way, wake the same workers again
         * (a large message may only show after it); while a send is incomplete, keep
         * calling into MPI. */
        int sent = 1;
        MPI_Testall(m, reqs + m, &sent, MPI_STATUSES_IGNORE);
        if (polls == 0)
            for (int i = 0; i < m; i++) wmpi_kick_send(kick, (shards ? shards[i] : first + i) + 1);
        wmpi_backoff_pause(&b, COORD_MAX_SLEEP_NS, COORD_KICKED_SLEEP_NS, kick, !sent);
    }
}

typedef struct mpi_session {
    int live;                                    /* 1 between session_new and session_drop */
    int n_layers, n_heads, n_kv_heads, head_dim; /* geometry, to size commands and replies */
} mpi_session;

typedef struct mpi_ctx {
    MPI_Comm comm;
    int n_shards;          /* shard i lives on rank i + 1 */
    int cap;               /* capacity of sessions */
    mpi_session *sessions; /* (cap) indexed by sid */
    uint8_t *cmd;          /* the command being sent, grow-only */
    size_t cmd_cap;
    uint8_t **reply;     /* (n_shards) each worker's reply buffer, grow-only */
    size_t *reply_cap;   /* (n_shards) */
    int *status;         /* (n_shards) wmpi_status of each worker's last reply */
    MPI_Request *reqs;   /* (2 * n_shards) receives then sends */
    MPI_Status *stats;   /* (2 * n_shards) */
    struct pipe_op *ops; /* (FASA_PIPE_MAX) a ring of phases in flight, made on first use */
    int op_head, op_len;
    /* A step's k_new staged for the next phase (stage_append), and how that went. */
    int staged, staged_sid, staged_shard, staged_layer, staged_appended;
    int32_t staged_pos;
    const float *staged_k, *staged_v;
    wmpi_kick kick;   /* wake-ups from the workers' replies (kick.h) */
    wmpi_adapt waits; /* how long the last exchanges took: the spin window (wmpi_adapt) */
    /* append_runs: each shard's APPEND_RUNS command, grow-only, and the transaction count */
    uint8_t **ap_cmd;
    size_t *ap_cap;
    uint32_t txn;
    /* append_runs' parts (APPEND_PARTS): the k and v pieces of one round, in the order they
     * are sent, each read straight from the request's memory; their sends. Grow-only. */
    struct ap_part {
        int shard;
        int bytes;
        const void *p;
    } * ap_part;
    int ap_nparts, ap_parts_cap;
    MPI_Request *ap_req; /* (ap_parts_cap) */
} mpi_ctx;

/* A SCORE or ATTEND in flight: its own command and reply buffers and requests, and where
 * its results go once it completes. */
typedef struct pipe_op {
    wmpi_cmd_code code;
    uint8_t *cmd; /* the packed command (swapped in from mpi_ctx.cmd), grow-only */
    size_t cmd_cap;
    uint8_t **reply;   /* (n_shards) grow-only */
    size_t *reply_cap; /* (n_shards) */
    size_t reply_bytes;
    MPI_Request *reqs; /* (2 * n_shards) receives then sends */
    MPI_Status *stats; /* (2 * n_shards) */
    int knew_shard;    /* the shard that appends the k_new a *_KNEW carries, else -1 */
    int units, budget, n_heads, head_dim;
    size_t aux_n;
    topk_cand *cands;
    int *n_cands;
    float *m;
    double *l, *o, *aux;
    int64_t *bytes_p;
} pipe_op;

static int s_grow(uint8_t **buf, size_t *cap, size_t bytes)
{
    if (bytes <= *cap) return 0;
    uint8_t *p = realloc(*buf, bytes);
    if (!p) return -1;
    *buf = p;
    *cap = bytes;
    return 0;
}

static const mpi_session *s_session(const mpi_ctx *c, int sid)
{
    return sid >= 0 && sid < c->cap && c->sessions[sid].live ? &c->sessions[sid] : NULL;
}

/* Makes room for a command with payload bytes of payload and writes its header; returns
 * the payload pointer, or NULL when the message would be too big or memory is short. */
static uint8_t *s_cmd_begin(mpi_ctx *c, wmpi_cmd_code code, int sid, const mpi_session *s,
                            int64_t payload)
{
    if (payload < 0 || payload > WMPI_MAX_MSG - (int64_t)sizeof(wmpi_cmd)) return NULL;
    if (s_grow(&c->cmd, &c->cmd_cap, sizeof(wmpi_cmd) + (size_t)payload)) return NULL;
    wmpi_cmd h = {.magic = WMPI_MAGIC,
                  .cmd = code,
                  .sid = sid,
                  .payload_bytes = payload,
                  .request_id = fasa_log_request()};
    if (s) {
        h.n_layers = s->n_layers;
        h.n_heads = s->n_heads;
        h.n_kv_heads = s->n_kv_heads;
        h.head_dim = s->head_dim;
    }
    memcpy(c->cmd, &h, sizeof(h));
    return c->cmd + sizeof(wmpi_cmd);
}

static wmpi_cmd *s_cmd_header(mpi_ctx *c)
{
    return (wmpi_cmd *)c->cmd;
}

/* Sends the packed command to the workers of shards [s0, s1) and, unless it is STOP,
 * receives each one's reply (at most reply_payload bytes after the header) into
 * c->reply[i], setting c->status[i]. A reply that is short, too long for its status or
 * answers another command counts as WMPI_EINVAL. Returns 0 when every reply is WMPI_OK. */
static int s_exchange(mpi_ctx *c, int s0, int s1, int64_t reply_payload)
{
    const wmpi_cmd *h = s_cmd_header(c);
    const int want_reply = h->cmd != WMPI_STOP, n = s1 - s0;
    const size_t reply_bytes = sizeof(wmpi_reply) + (size_t)reply_payload;
    /* Until a reply says otherwise: the rollback in s_session_new reads these. */
    for (int i = s0; i < s1; i++) c->status[i] = WMPI_ENOMEM;
    if (reply_payload < 0 || reply_payload > WMPI_MAX_MSG - (int64_t)sizeof(wmpi_reply)) return -1;
    if (want_reply)
        for (int i = s0; i < s1; i++)
            if (s_grow(&c->reply[i], &c->reply_cap[i], reply_bytes)) return -1;
    /* Receives first, so that replies land in place rather than in MPI's unexpected queue. */
    MPI_Request *rreq = c->reqs, *sreq = c->reqs + n;
    for (int i = s0; i < s1; i++) {
        rreq[i - s0] = MPI_REQUEST_NULL;
        if (want_reply)
            MPI_Irecv(c->reply[i], (int)reply_bytes, MPI_BYTE, i + 1, WMPI_TAG_REPLY, c->comm,
                      &rreq[i - s0]);
    }
    const int cmd_bytes = (int)(sizeof(wmpi_cmd) + (size_t)h->payload_bytes);
    /* Every send reads the same buffer, which MPI-3 allows while they are pending. */
    for (int i = s0; i < s1; i++) {
        MPI_Isend(c->cmd, cmd_bytes, MPI_BYTE, i + 1, WMPI_TAG_CMD, c->comm, &sreq[i - s0]);
        wmpi_kick_send(&c->kick, i + 1);
    }
    if (s_waitall(n, c->reqs, c->stats, &c->kick, s0, NULL, &c->waits)) return -1;
    if (!want_reply) return 0;

    int rc = 0;
    for (int i = s0; i < s1; i++) {
        int count = 0;
        MPI_Get_count(&c->stats[i - s0], MPI_BYTE, &count);
        wmpi_reply r = {.status = WMPI_EINVAL};
        if ((size_t)count >= sizeof(r)) memcpy(&r, c->reply[i], sizeof(r));
        if (r.cmd != h->cmd || (r.status == WMPI_OK && (size_t)count != reply_bytes))
            r.status = WMPI_EINVAL;
        c->status[i] = r.status;
        if (r.status != WMPI_OK) rc = -1;
    }
    return rc;
}

static int s_session_new(void *ctx, int sid, const shard_layout *lay)
{
    mpi_ctx *c = ctx;
    if (sid < 0 || sid >= WMPI_MAX_SID || s_session(c, sid)) return -1;
    if (lay->tier != SHARD_TIER_RAM && lay->tier != SHARD_TIER_DISK) return -1;
    /* Disk tier: the directory travels after qmask; each worker makes its files there. */
    const int64_t dir_len =
        lay->tier == SHARD_TIER_DISK && lay->tier_dir ? (int64_t)strlen(lay->tier_dir) : 0;
    if (lay->tier == SHARD_TIER_DISK && (dir_len < 1 || dir_len > WMPI_MAX_DIR)) return -1;
    if (sid >= c->cap) {
        int cap = c->cap ? c->cap : 8;
        while (cap <= sid) cap *= 2;
        mpi_session *p = realloc(c->sessions, (size_t)cap * sizeof(*p));
        if (!p) return -1;
        memset(p + c->cap, 0, (size_t)(cap - c->cap) * sizeof(*p));
        c->sessions = p;
        c->cap = cap;
    }
    const mpi_session s = {1, lay->n_layers, lay->n_heads, lay->n_kv_heads, lay->head_dim};
    const int64_t lk = (int64_t)s.n_layers * s.n_kv_heads, d = s.head_dim;
    const int64_t mask_bytes = (int64_t)s.n_layers * s.n_heads * d;
    uint8_t *p =
        s_cmd_begin(c, WMPI_SESSION_NEW, sid, &s, lk * 4 + lk * d * 4 + mask_bytes + dir_len);
    if (!p) return -1;
    memcpy(p, lay->n_dom, (size_t)lk * 4);
    memcpy(p + lk * 4, lay->perm, (size_t)(lk * d) * 4);
    memcpy(p + lk * 4 + lk * d * 4, lay->qmask, (size_t)mask_bytes);
    if (dir_len) memcpy(p + lk * 4 + lk * d * 4 + mask_bytes, lay->tier_dir, (size_t)dir_len);
    /* SESSION_NEW: the storage dtype, and the score dtype times 16 */
    s_cmd_header(c)->n = lay->dtype + 16 * lay->score_dtype;
    s_cmd_header(c)->method = lay->tier;        /* the tier */
    s_cmd_header(c)->budget = (int32_t)dir_len; /* bytes of tier_dir after qmask */
    if (s_exchange(c, 0, c->n_shards, 0) == 0) {
        c->sessions[sid] = s;
        return 0;
    }
    /* All or nothing, as in-process: drop the shards that were made. */
    int made[c->n_shards];
    for (int i = 0; i < c->n_shards; i++) made[i] = c->status[i] == WMPI_OK;
    s_cmd_begin(c, WMPI_SESSION_DROP, sid, &s, 0);
    for (int i = 0; i < c->n_shards; i++)
        if (made[i]) s_exchange(c, i, i + 1, 0);
    return -1;
}

static void s_session_drop(void *ctx, int sid)
{
    mpi_ctx *c = ctx;
    const mpi_session *s = s_session(c, sid);
    if (!s) return;
    s_cmd_begin(c, WMPI_SESSION_DROP, sid, s, 0);
    s_exchange(c, 0, c->n_shards, 0);
    c->sessions[sid].live = 0;
}

/* One APPEND of n rows to one shard. */
static int s_append_run(mpi_ctx *c, int sid, const mpi_session *s, int shard, int layer, int n,
                        const int32_t *pos, const float *k, const float *v)
{
    const size_t kv_bytes = (size_t)n * s->n_kv_heads * s->head_dim * sizeof(float);
    uint8_t *p = s_cmd_begin(c, WMPI_APPEND, sid, s, (int64_t)n * 4 + 2 * (int64_t)kv_bytes);
    if (!p) return -1;
    wmpi_cmd *h = s_cmd_header(c);
    h->layer = layer;
    h->n = n;
    memcpy(p, pos, (size_t)n * 4);
    memcpy(p + (size_t)n * 4, k, kv_bytes);
    memcpy(p + (size_t)n * 4 + kv_bytes, v, kv_bytes);
    return s_exchange(c, shard, shard + 1, 0);
}

static int s_append(void *ctx, int sid, int shard, int layer, int n, const int32_t *pos,
                    const float *k, const float *v)
{
    mpi_ctx *c = ctx;
    const mpi_session *s = s_session(c, sid);
    if (!s || shard < 0 || shard >= c->n_shards) return -1;
    /* One message per append; only a run too big for one message is split by rows. */
    const size_t row = (size_t)s->n_kv_heads * s->head_dim;
    const int64_t row_bytes = 4 + 2 * (int64_t)row * (int64_t)sizeof(float);
    const int per_msg = (int)((WMPI_MAX_MSG - (int64_t)sizeof(wmpi_cmd)) / row_bytes);
    for (int i = 0; i < n; i += per_msg) {
        const int m = n - i < per_msg ? n - i : per_msg;
        if (s_append_run(c, sid, s, shard, layer, m, pos + i, k + (size_t)i * row,
                         v + (size_t)i * row))
            return -1;
    }
    return 0;
}

/* Waits for n sends of this rank (APPEND_PARTS' parts), polling as s_waitall does: they
 * complete while the workers take them. 0, or -1 when a rank died meanwhile. */
static int s_wait_sends(int n, MPI_Request *reqs, wmpi_kick *kick)
{
    wmpi_backoff b;
    wmpi_backoff_reset(&b);
    for (;;) {
        int done = 0;
        if (MPI_Testall(n, reqs, &done, MPI_STATUSES_IGNORE) != MPI_SUCCESS) {
            fasa_liveness_fail("MPI error sending an append to the workers");
            return -1;
        }
        if (done) return 0;
        if (fasa_liveness_failure()) return -1;
        wmpi_backoff_pause(&b, COORD_MAX_SLEEP_NS, COORD_KICKED_SLEEP_NS, kick, 1);
    }
}

/* Sends the command c->ap_cmd[i] to every shard i with want[i] set (or, with code not 0,
 * a bare command of that code to them), every reply receive posted first and every send
 * at once, then waits for all: the workers work in parallel. want[i] becomes 0 where the
 * reply was WMPI_OK. Returns 0 when every reply was WMPI_OK. */
static int s_ap_exchange(mpi_ctx *c, int sid, const mpi_session *s, uint8_t *want, int code,
                         uint32_t txn)
{
    const int S = c->n_shards;
    int idx[S], m = 0;
    for (int i = 0; i < S; i++)
        if (want[i]) idx[m++] = i;
    if (!m) return 0;
    wmpi_cmd bare = {.magic = WMPI_MAGIC, .cmd = code, .sid = sid, .max_pos = (int32_t)txn};
    bare.n_layers = s->n_layers, bare.n_heads = s->n_heads, bare.n_kv_heads = s->n_kv_heads;
    bare.head_dim = s->head_dim;
    MPI_Request *rreq = c->reqs, *sreq = c->reqs + m;
    for (int j = 0; j < m; j++) {
        const int i = idx[j];
        if (s_grow(&c->reply[i], &c->reply_cap[i], sizeof(wmpi_reply))) return -1;
    }
    for (int j = 0; j < m; j++)
        MPI_Irecv(c->reply[idx[j]], (int)sizeof(wmpi_reply), MPI_BYTE, idx[j] + 1, WMPI_TAG_REPLY,
                  c->comm, &rreq[j]);
    for (int j = 0; j < m; j++) {
        const uint8_t *buf = code ? (const uint8_t *)&bare : c->ap_cmd[idx[j]];
        const wmpi_cmd *h = (const wmpi_cmd *)buf;
        /* APPEND_PARTS: the header and runs only; k and v follow as parts. */
        const size_t bytes = h->cmd == WMPI_APPEND_PARTS
                                 ? sizeof(wmpi_cmd) + (size_t)h->n * sizeof(wmpi_run)
                                 : sizeof(wmpi_cmd) + (size_t)h->payload_bytes;
        MPI_Isend(buf, (int)bytes, MPI_BYTE, idx[j] + 1, WMPI_TAG_CMD, c->comm, &sreq[j]);
        wmpi_kick_send(&c->kick, idx[j] + 1);
    }
    int np = 0;
    for (int i = 0; !code && i < c->ap_nparts; i++) {
        const struct ap_part *x = &c->ap_part[i];
        if (!want[x->shard]) continue;
        MPI_Isend(x->p, x->bytes, MPI_BYTE, x->shard + 1, WMPI_TAG_PART, c->comm, &c->ap_req[np++]);
    }
    if (np && s_wait_sends(np, c->ap_req, &c->kick)) return -1;
    if (s_waitall(m, c->reqs, c->stats, &c->kick, 0, idx, &c->waits)) return -1;
    int rc = 0;
    for (int j = 0; j < m; j++) {
        const int i = idx[j];
        int count = 0;
        MPI_Get_count(&c->stats[j], MPI_BYTE, &count);
        wmpi_reply r = {.status = WMPI_EINVAL};
        if ((size_t)count == sizeof(r)) memcpy(&r, c->reply[i], sizeof(r));
        const int32_t want_cmd = code ? code : WMPI_APPEND_RUNS;
        if (r.cmd != want_cmd) r.status = WMPI_EINVAL;
        c->status[i] = r.status;
        if (r.status == WMPI_OK)
            want[i] = 0;
        else
            rc = -1;
    }
    return rc;
}

/* Every run of a request as one APPEND_RUNS command per shard (more only where a shard's
 * part is over WMPI_MAX_MSG), all posted at once; when any shard fails, APPEND_UNDO of the
 * transaction to every shard that took part puts them all back. */
static int s_append_runs(void *ctx, int sid, int dtype, int n_runs, const fasa_append_run *runs)
{
    mpi_ctx *c = ctx;
    const mpi_session *s = s_session(c, sid);
    if (!s || (dtype != 0 && dtype != 1 && dtype != 2)) return -1;
    const int S = c->n_shards;
    if (!c->ap_cmd) {
        c->ap_cmd = calloc((size_t)S, sizeof(*c->ap_cmd));
        c->ap_cap = calloc((size_t)S, sizeof(*c->ap_cap));
        if (!c->ap_cmd || !c->ap_cap) {
            free(c->ap_cmd), free(c->ap_cap);
            c->ap_cmd = NULL, c->ap_cap = NULL;
            return -1;
        }
    }
    if (++c->txn == 0) c->txn = 1;
    const uint32_t txn = c->txn;
    const int64_t row = (int64_t)s->n_kv_heads * s->head_dim * (dtype ? 2 : 4);
    const int64_t room = WMPI_MAX_MSG - (int64_t)sizeof(wmpi_cmd);
    uint8_t touched[S], want[S];
    memset(touched, 0, sizeof(touched));
    int next = 0, rc = 0, split = 0; /* next: the first run (or part of it) not sent yet */
    int64_t done_rows = 0;           /* rows of runs[next] already sent */
    while (next < n_runs && !rc) {
        /* One round: each shard's runs from next on, as far as one message holds. */
        int64_t used[S];
        int sections[S];
        memset(want, 0, sizeof(want));
        for (int i = 0; i < S; i++) used[i] = 0, sections[i] = 0;
        int stop = n_runs;
        for (int r = next; r < n_runs; r++) {
            const int sh = runs[r].shard;
            if (sh < 0 || sh >= S) return -1;
            const int64_t left = runs[r].n - (r == next ? done_rows : 0);
            if (used[sh] + (int64_t)sizeof(wmpi_run) + 2 * row * left > room) {
                stop = r;
                break;
            }
            used[sh] += (int64_t)sizeof(wmpi_run) + 2 * row * left;
            sections[sh]++;
        }
        int64_t part = 0; /* rows of runs[stop] that fit after all (a run over the limit) */
        if (stop == next) {
            part = (room - (int64_t)sizeof(wmpi_run)) / (2 * row);
            if (part > runs[stop].n - done_rows) part = runs[stop].n - done_rows;
            used[runs[stop].shard] = (int64_t)sizeof(wmpi_run) + 2 * row * part;
            sections[runs[stop].shard] = 1;
            split = 1;
        }
        for (int i = 0; i < S; i++) {
            if (!sections[i]) continue;
            if (s_grow(&c->ap_cmd[i], &c->ap_cap[i],
                       sizeof(wmpi_cmd) + (size_t)sections[i] * sizeof(wmpi_run))) {
                rc = -1;
                break;
            }
            const wmpi_cmd h = {.magic = WMPI_MAGIC,
                                .cmd = WMPI_APPEND_PARTS,
                                .sid = sid,
                                .n_layers = s->n_layers,
                                .n_heads = s->n_heads,
                                .n_kv_heads = s->n_kv_heads,
                                .head_dim = s->head_dim,
                                .n = sections[i],
                                .method = dtype,
                                .max_pos = (int32_t)txn,
                                .payload_bytes = used[i]};
            memcpy(c->ap_cmd[i], &h, sizeof(h));
            used[i] = 0; /* now the write offset */
            want[i] = touched[i] = 1;
        }
        const int end = split ? next + 1 : stop;
        /* Each section's run header into its shard's command; its k and v stay where the
         * request holds them and go as two parts (no copy here). */
        c->ap_nparts = 0;
        if (!rc && 2 * (end - next) > c->ap_parts_cap) {
            const int cap =
                2 * (end - next) > 2 * c->ap_parts_cap ? 2 * (end - next) : 2 * c->ap_parts_cap;
            struct ap_part *q = realloc(c->ap_part, (size_t)cap * sizeof(*q));
            MPI_Request *qr = q ? realloc(c->ap_req, (size_t)cap * sizeof(*qr)) : NULL;
            if (q) c->ap_part = q;
            if (qr) c->ap_req = qr, c->ap_parts_cap = cap;
            if (!qr) rc = -1;
        }
        for (int r = next; r < end && !rc; r++) {
            const fasa_append_run *x = &runs[r];
            const int64_t skip = r == next ? done_rows : 0;
            const int64_t nr = split ? part : x->n - skip;
            uint8_t *p = c->ap_cmd[x->shard] + sizeof(wmpi_cmd) + used[x->shard];
            const wmpi_run hr = {x->layer, (int32_t)nr, x->pos0 + (int32_t)skip, 0};
            memcpy(p, &hr, sizeof(hr));
            c->ap_part[c->ap_nparts++] =
                (struct ap_part){x->shard, (int)(nr * row), (const uint8_t *)x->k + skip * row};
            c->ap_part[c->ap_nparts++] =
                (struct ap_part){x->shard, (int)(nr * row), (const uint8_t *)x->v + skip * row};
            used[x->shard] += (int64_t)sizeof(hr);
        }
        if (!rc) rc = s_ap_exchange(c, sid, s, want, 0, txn);
        if (split) {
            done_rows += part;
            if (done_rows == runs[next].n) next++, done_rows = 0;
            split = 0;
        } else {
            next = stop, done_rows = 0;
        }
    }
    if (rc) s_ap_exchange(c, sid, s, touched, WMPI_APPEND_UNDO, txn);
    return rc;
}

/* Tests only: shard's worker fails the nth APPEND_RUNS section from now (0: never). */
int fasa_transport_mpi_test_fault(void *ctx, int shard, int nth)
{
    mpi_ctx *c = ctx;
    if (shard < 0 || shard >= c->n_shards) return -1;
    if (!s_cmd_begin(c, WMPI_TEST_FAULT, -1, NULL, 0)) return -1;
    s_cmd_header(c)->n = nth;
    return s_exchange(c, shard, shard + 1, 0);
}

/* Packs a SCORE or ATTEND header and the queries; returns the payload pointer after q.
 * With a k_new staged for this session the command becomes SCORE_KNEW or ATTEND_KNEW, the
 * row in front of the queries (worker_mpi_wire.h), and the staging is used up: *knew_p gets
 * the shard that appends it (else -1). */
static uint8_t *s_step_begin(mpi_ctx *c, wmpi_cmd_code code, int sid, const mpi_session *s,
                             const shard_step *st, int units, int64_t extra, int *knew_p)
{
    const size_t q_bytes = (size_t)s->n_heads * s->head_dim * sizeof(float);
    const int knew = c->staged && c->staged_sid == sid && c->staged_layer == st->layer;
    const size_t row = (size_t)s->n_kv_heads * s->head_dim * sizeof(float);
    const size_t knew_bytes = knew ? sizeof(wmpi_knew) + 2 * row : 0;
    c->staged = 0;
    *knew_p = -1;
    if (knew)
        code = code == WMPI_SCORE          ? WMPI_SCORE_KNEW
               : code == WMPI_SCORE_ATTEND ? WMPI_SCORE_ATTEND_KNEW
                                           : WMPI_ATTEND_KNEW;
    uint8_t *p = s_cmd_begin(c, code, sid, s, (int64_t)(knew_bytes + q_bytes) + extra);
    if (!p) return NULL;
    if (knew) {
        const wmpi_knew kh = {.shard = c->staged_shard, .pos = c->staged_pos};
        memcpy(p, &kh, sizeof(kh));
        memcpy(p + sizeof(kh), c->staged_k, row);
        memcpy(p + sizeof(kh) + row, c->staged_v, row);
        p += knew_bytes;
        *knew_p = c->staged_shard;
    }
    wmpi_cmd *h = s_cmd_header(c);
    h->layer = st->layer;
    h->method = st->method;
    h->gqa = st->gqa;
    h->budget = st->budget;
    h->max_pos = st->max_pos;
    h->scale = st->scale;
    h->n_units = units;
    h->sparq_r = st->sparq_r;
    memcpy(p, st->q, q_bytes);
    return p + q_bytes;
}

/* The next free slot of the ring, its buffers made; NULL when full or out of memory. */
static pipe_op *s_op_slot(mpi_ctx *c)
{
    if (!c->ops && !(c->ops = calloc(FASA_PIPE_MAX, sizeof(*c->ops)))) return NULL;
    if (c->op_len == FASA_PIPE_MAX) return NULL;
    pipe_op *op = &c->ops[(c->op_head + c->op_len) % FASA_PIPE_MAX];
    const size_t n = (size_t)c->n_shards;
    if (!op->reply) {
        op->reply = calloc(n, sizeof(*op->reply));
        op->reply_cap = calloc(n, sizeof(*op->reply_cap));
        op->reqs = calloc(2 * n, sizeof(*op->reqs));
        op->stats = calloc(2 * n, sizeof(*op->stats));
        if (!op->reply || !op->reply_cap || !op->reqs || !op->stats) {
            free(op->reply), free(op->reply_cap), free(op->reqs), free(op->stats);
            op->reply = NULL, op->reply_cap = NULL, op->reqs = NULL, op->stats = NULL;
            return NULL;
        }
    }
    return op;
}

static void s_op_free(pipe_op *op, int n_shards)
{
    if (op->reply)
        for (int i = 0; i < n_shards; i++) free(op->reply[i]);
    free(op->reply), free(op->reply_cap), free(op->reqs), free(op->stats), free(op->cmd);
}

/* Sends the command packed in c->cmd to every worker with every reply receive posted
 * first, as s_exchange does, but returns at once: the command buffer moves into the op,
 * which joins the ring. */
static int s_op_post(mpi_ctx *c, pipe_op *op, int64_t reply_payload)
{
    if (reply_payload < 0 || reply_payload > WMPI_MAX_MSG - (int64_t)sizeof(wmpi_reply)) return -1;
    const int n = c->n_shards;
    op->reply_bytes = sizeof(wmpi_reply) + (size_t)reply_payload;
    for (int i = 0; i < n; i++)
        if (s_grow(&op->reply[i], &op->reply_cap[i], op->reply_bytes)) return -1;
    uint8_t *cmd = c->cmd;
    const size_t cmd_cap = c->cmd_cap;
    c->cmd = op->cmd, c->cmd_cap = op->cmd_cap;
    op->cmd = cmd, op->cmd_cap = cmd_cap;
    const wmpi_cmd *h = (const wmpi_cmd *)op->cmd;
    op->code = (wmpi_cmd_code)h->cmd;
    for (int i = 0; i < n; i++)
        MPI_Irecv(op->reply[i], (int)op->reply_bytes, MPI_BYTE, i + 1, WMPI_TAG_REPLY, c->comm,
                  &op->reqs[i]);
    const int cmd_bytes = (int)(sizeof(wmpi_cmd) + (size_t)h->payload_bytes);
    for (int i = 0; i < n; i++) {
        MPI_Isend(op->cmd, cmd_bytes, MPI_BYTE, i + 1, WMPI_TAG_CMD, c->comm, &op->reqs[n + i]);
        wmpi_kick_send(&c->kick, i + 1);
    }
    c->op_len++;
    return 0;
}

static int s_score_start(void *ctx, int sid, const shard_step *st, topk_cand *cands, int *n_cands)
{
    mpi_ctx *c = ctx;
    const mpi_session *s = s_session(c, sid);
    pipe_op *op = s ? s_op_slot(c) : NULL;
    if (!op) return c->staged = 0, -1;
    const int units = st->gqa == SHARD_GQA_SHARED ? s->n_kv_heads : s->n_heads, b = st->budget;
    const int64_t cand_bytes = (int64_t)units * b * (int64_t)sizeof(topk_cand);
    if (!s_step_begin(c, WMPI_SCORE, sid, s, st, units, 0, &op->knew_shard)) return -1;
    op->units = units;
    op->budget = b;
    op->cands = cands;
    op->n_cands = n_cands;
    return s_op_post(c, op, cand_bytes + (int64_t)units * 4);
}

static int s_attend_start(void *ctx, int sid, const shard_step *st, const topk_cand *thr,
                          const uint8_t *have_thr, float *m, double *l, double *o, double *aux,
                          int64_t *bytes_p)
{
    mpi_ctx *c = ctx;
    const mpi_session *s = s_session(c, sid);
    pipe_op *op = s ? s_op_slot(c) : NULL;
    if (!op) return c->staged = 0, -1;
    const int units = st->gqa == SHARD_GQA_SHARED ? s->n_kv_heads : s->n_heads;
    /* A dense step reads no thresholds (the engine leaves them unset), so none are sent. */
    const int64_t thr_bytes =
        st->method == SHARD_DENSE ? 0 : (int64_t)units * (int64_t)(sizeof(topk_cand) + 1);
    uint8_t *p = s_step_begin(c, WMPI_ATTEND, sid, s, st, units, thr_bytes, &op->knew_shard);
    if (!p) return -1;
    if (thr_bytes) {
        memcpy(p, thr, (size_t)units * sizeof(topk_cand));
        memcpy(p + (size_t)units * sizeof(topk_cand), have_thr, (size_t)units);
    }
    const size_t nh = (size_t)s->n_heads, d = (size_t)s->head_dim;
    op->n_heads = s->n_heads;
    op->head_dim = s->head_dim;
    op->aux_n =
        st->method == SHARD_SPARQ || st->method == SHARD_FASA_PLUS ? nh * SHARD_SPARQ_AUX(d) : 0;
    op->m = m, op->l = l, op->o = o, op->aux = aux, op->bytes_p = bytes_p;
    return s_op_post(c, op, (int64_t)(nh * 8 + nh * d * 8 + op->aux_n * 8 + nh * 4));
}

static int s_wait(void *ctx);

/* A local-merge step (transport.h attend_local): one command, one reply per worker, the
 * partials unpacked as ATTEND's. */
static int s_attend_local(void *ctx, int sid, const shard_step *st, float *m, double *l, double *o,
                          int64_t *bytes_p)
{
    mpi_ctx *c = ctx;
    const mpi_session *s = s_session(c, sid);
    pipe_op *op = s ? s_op_slot(c) : NULL;
    if (!op) return -1;
    const int units = st->gqa == SHARD_GQA_SHARED ? s->n_kv_heads : s->n_heads;
    if (!s_step_begin(c, WMPI_ATTEND_LOCAL, sid, s, st, units, 0, &op->knew_shard)) return -1;
    const size_t nh = (size_t)s->n_heads, d = (size_t)s->head_dim;
    op->n_heads = s->n_heads;
    op->head_dim = s->head_dim;
    op->aux_n = 0;
    op->m = m, op->l = l, op->o = o, op->aux = NULL, op->bytes_p = bytes_p;
    if (s_op_post(c, op, (int64_t)(nh * 8 + nh * d * 8 + nh * 4))) return -1;
    return s_wait(ctx);
}

/* Both phases of a step in one command (transport.h score_attend), a staged k_new riding
 * along; each reply is ATTEND's payload, then SCORE's (worker_mpi_wire.h SCORE_ATTEND). */
static int s_score_attend(void *ctx, int sid, const shard_step *st, topk_cand *cands, int *n_cands,
                          float *m, double *l, double *o, double *aux, int64_t *bytes_p)
{
    mpi_ctx *c = ctx;
    const mpi_session *s = s_session(c, sid);
    pipe_op *op = s ? s_op_slot(c) : NULL;
    if (!op) return c->staged = 0, -1;
    const int units = st->gqa == SHARD_GQA_SHARED ? s->n_kv_heads : s->n_heads, b = st->budget;
    if (!s_step_begin(c, WMPI_SCORE_ATTEND, sid, s, st, units, 0, &op->knew_shard)) return -1;
    const size_t nh = (size_t)s->n_heads, d = (size_t)s->head_dim;
    op->units = units;
    op->budget = b;
    op->cands = cands;
    op->n_cands = n_cands;
    op->n_heads = s->n_heads;
    op->head_dim = s->head_dim;
    op->aux_n =
        st->method == SHARD_SPARQ || st->method == SHARD_FASA_PLUS ? nh * SHARD_SPARQ_AUX(d) : 0;
    op->m = m, op->l = l, op->o = o, op->aux = aux, op->bytes_p = bytes_p;
    const int64_t att = (int64_t)(nh * 8 + nh * d * 8 + op->aux_n * 8 + nh * 4);
    if (s_op_post(c, op, att + (int64_t)units * b * (int64_t)sizeof(topk_cand) + units * 4))
        return -1;
    return s_wait(ctx);
}

/* Completes the oldest phase in flight: every reply checked as s_exchange checks them,
 * then unpacked into the outputs given to its start. */
static int s_wait(void *ctx)
{
    mpi_ctx *c = ctx;
    if (!c->op_len) return -1;
    pipe_op *op = &c->ops[c->op_head];
    c->op_head = (c->op_head + 1) % FASA_PIPE_MAX;
    c->op_len--;
    const int n = c->n_shards;
    c->staged_appended = 0;
    if (s_waitall(n, op->reqs, op->stats, &c->kick, 0, NULL, &c->waits)) return -1;
    int rc = 0;
    for (int i = 0; i < n; i++) {
        int count = 0;
        MPI_Get_count(&op->stats[i], MPI_BYTE, &count);
        wmpi_reply r = {.status = WMPI_EINVAL};
        if ((size_t)count >= sizeof(r)) memcpy(&r, op->reply[i], sizeof(r));
        const int ok =
            r.cmd == (int)op->code && r.status == WMPI_OK && (size_t)count == op->reply_bytes;
        /* The shard holding a carried k_new says whether it appended it, even on failure. */
        if (i == op->knew_shard && r.cmd == (int)op->code)
            c->staged_appended = ok || (r.status != WMPI_OK && r.bytes_read == 1);
        if (!ok) rc = -1;
    }
    if (rc) return -1;
    const size_t nh = (size_t)op->n_heads, d = (size_t)op->head_dim, aux_n = op->aux_n;
    const int both = op->code == WMPI_SCORE_ATTEND || op->code == WMPI_SCORE_ATTEND_KNEW;
    if (both || op->code == WMPI_SCORE || op->code == WMPI_SCORE_KNEW) {
        const int units = op->units, b = op->budget;
        const size_t cand_bytes = (size_t)units * b * sizeof(topk_cand);
        /* SCORE_ATTEND: the candidates after ATTEND's payload. */
        const size_t at = both ? nh * 8 + nh * d * 8 + aux_n * 8 + nh * 4 : 0;
        for (int i = 0; i < n; i++) {
            /* Shard i fills block i, as in-process: n_cands[i][u] best-first candidates. */
            const uint8_t *r = op->reply[i] + sizeof(wmpi_reply) + at;
            int *nc = op->n_cands + (size_t)i * units;
            memcpy(nc, r + cand_bytes, (size_t)units * sizeof(int));
            for (int u = 0; u < units; u++) {
                if (nc[u] < 0 || nc[u] > b) return -1;
                memcpy(op->cands + ((size_t)i * units + u) * b,
                       r + (size_t)u * b * sizeof(topk_cand), (size_t)nc[u] * sizeof(topk_cand));
            }
        }
        if (!both) return 0;
    }
    int64_t bytes = 0;
    for (int i = 0; i < n; i++) {
        /* Shard i writes block i of (m, l, o). */
        const uint8_t *r = op->reply[i] + sizeof(wmpi_reply);
        memcpy(op->l + i * nh, r, nh * sizeof(double));
        memcpy(op->o + i * nh * d, r + nh * 8, nh * d * sizeof(double));
        if (aux_n) memcpy(op->aux + i * aux_n, r + nh * 8 + nh * d * 8, aux_n * sizeof(double));
        memcpy(op->m + i * nh, r + nh * 8 + nh * d * 8 + aux_n * 8, nh * sizeof(float));
        wmpi_reply h;
        memcpy(&h, op->reply[i], sizeof(h));
        bytes += h.bytes_read;
    }
    *op->bytes_p = bytes;
    return 0;
}

/* One phase on its own: begun and completed at once (nothing else is in flight then). */
static int s_score(void *ctx, int sid, const shard_step *st, topk_cand *cands, int *n_cands)
{
    if (s_score_start(ctx, sid, st, cands, n_cands)) return -1;
    return s_wait(ctx);
}

static int s_attend(void *ctx, int sid, const shard_step *st, const topk_cand *thr,
                    const uint8_t *have_thr, float *m, double *l, double *o, double *aux,
                    int64_t *bytes_p)
{
    if (s_attend_start(ctx, sid, st, thr, have_thr, m, l, o, aux, bytes_p)) return -1;
    return s_wait(ctx);
}

static int s_stage_append(void *ctx, int sid, int shard, int layer, int32_t pos, const float *k,
                          const float *v)
{
    mpi_ctx *c = ctx;
    if (!s_session(c, sid) || shard < 0 || shard >= c->n_shards) return -1;
    /* The pointers stay valid until the phase that carries the row has been packed: the
     * engine stages and starts that phase within one call. */
    c->staged = 1;
    c->staged_sid = sid;
    c->staged_shard = shard;
    c->staged_layer = layer;
    c->staged_pos = pos;
    c->staged_k = k;
    c->staged_v = v;
    c->staged_appended = 0;
    return 0;
}

static int s_staged_appended(void *ctx)
{
    mpi_ctx *c = ctx;
    const int appended = c->staged_appended;
    c->staged = 0;
    c->staged_appended = 0;
    return appended;
}

static int s_shard_stats(void *ctx, int sid, fasa_shard_stats *out)
{
    mpi_ctx *c = ctx;
    const mpi_session *s = NULL;
    if (sid >= 0 && !(s = s_session(c, sid))) return -1;
    if (!s_cmd_begin(c, WMPI_STATS, sid >= 0 ? sid : -1, s, 0) ||
        s_exchange(c, 0, c->n_shards, (int64_t)sizeof(wmpi_stats)))
        return -1;
    for (int i = 0; i < c->n_shards; i++) {
        memcpy(&out[i], c->reply[i] + sizeof(wmpi_reply), sizeof(out[i]));
        out[i].rss_bytes = 0; /* the holdings alone, as in-process; s_shard_rss has it */
    }
    return 0;
}

static int s_shard_rss(void *ctx, int64_t *out)
{
    mpi_ctx *c = ctx;
    if (!s_cmd_begin(c, WMPI_STATS, -1, NULL, 0) ||
        s_exchange(c, 0, c->n_shards, (int64_t)sizeof(wmpi_stats)))
        return -1;
    for (int i = 0; i < c->n_shards; i++) {
        wmpi_stats st;
        memcpy(&st, c->reply[i] + sizeof(wmpi_reply), sizeof(st));
        out[i] = st.rss_bytes;
    }
    return 0;
}

static int s_snapshot(void *ctx, int sid, const char *prefix, const char *id, int dtype,
                      shard_snap_info *out)
{
    mpi_ctx *c = ctx;
    const mpi_session *s = s_session(c, sid);
    if (!s) return -1;
    const wmpi_snap q = {.dtype = dtype,
                         .n_shards = c->n_shards,
                         .prefix_len = (int32_t)strlen(prefix),
                         .id_len = (int32_t)strlen(id)};
    uint8_t *p =
        s_cmd_begin(c, WMPI_SNAPSHOT, sid, s, (int64_t)sizeof(q) + q.prefix_len + q.id_len);
    if (!p) return -1;
    memcpy(p, &q, sizeof(q));
    memcpy(p + sizeof(q), prefix, (size_t)q.prefix_len);
    memcpy(p + sizeof(q) + q.prefix_len, id, (size_t)q.id_len);
    const int failed = s_exchange(c, 0, c->n_shards, (int64_t)sizeof(shard_snap_info));
    int rc = 0;
    for (int i = 0; i < c->n_shards; i++) {
        if (c->status[i] == WMPI_OK)
            memcpy(&out[i], c->reply[i] + sizeof(wmpi_reply), sizeof(out[i]));
        else
            out[i] = (shard_snap_info){.err_no = EIO};
        if (out[i].err_no) rc = -1;
    }
    return failed ? -1 : rc;
}

/* Bulk load of one layer: every worker reads its own rows (load_rows.h), in parallel. */
static int s_load(void *ctx, int sid, const load_job *job, load_report *out)
{
    mpi_ctx *c = ctx;
    const mpi_session *s = s_session(c, sid);
    if (!s) return -1;
    int rc = 0;
    /* Each worker's job names its own shard: one command per worker, sent together. */
    uint8_t **cmds = calloc((size_t)c->n_shards, sizeof(*cmds));
    MPI_Request *rreq = c->reqs, *sreq = c->reqs + c->n_shards;
    const size_t reply_bytes = sizeof(wmpi_reply) + sizeof(load_report);
    const int cmd_bytes = (int)(sizeof(wmpi_cmd) + sizeof(load_job));
    if (!cmds) return -1;
    for (int i = 0; i < c->n_shards; i++)
        if (!(cmds[i] = malloc((size_t)cmd_bytes)) ||
            s_grow(&c->reply[i], &c->reply_cap[i], reply_bytes))
            rc = -1;
    if (rc) goto out;
    for (int i = 0; i < c->n_shards; i++) {
        wmpi_cmd h = {.magic = WMPI_MAGIC,
                      .cmd = WMPI_LOAD,
                      .sid = sid,
                      .n_layers = s->n_layers,
                      .n_heads = s->n_heads,
                      .n_kv_heads = s->n_kv_heads,
                      .head_dim = s->head_dim,
                      .layer = job->layer,
                      .payload_bytes = (int64_t)sizeof(load_job)};
        load_job j = *job;
        j.shard = i;
        j.n_shards = c->n_shards;
        memcpy(cmds[i], &h, sizeof(h));
        memcpy(cmds[i] + sizeof(h), &j, sizeof(j));
        MPI_Irecv(c->reply[i], (int)reply_bytes, MPI_BYTE, i + 1, WMPI_TAG_REPLY, c->comm,
                  &rreq[i]);
    }
    for (int i = 0; i < c->n_shards; i++) {
        MPI_Isend(cmds[i], cmd_bytes, MPI_BYTE, i + 1, WMPI_TAG_CMD, c->comm, &sreq[i]);
        wmpi_kick_send(&c->kick, i + 1);
    }
    if (s_waitall(c->n_shards, c->reqs, c->stats, &c->kick, 0, NULL, &c->waits)) {
        rc = -1;
        for (int i = 0; i < c->n_shards; i++) out[i] = (load_report){.err = LOAD_EJOB};
        goto out;
    }
    for (int i = 0; i < c->n_shards; i++) {
        int count = 0;
        MPI_Get_count(&c->stats[i], MPI_BYTE, &count);
        wmpi_reply r = {.status = WMPI_EINVAL};
        if ((size_t)count >= sizeof(r)) memcpy(&r, c->reply[i], sizeof(r));
        if (r.cmd != WMPI_LOAD || r.status != WMPI_OK || (size_t)count != reply_bytes)
            out[i] = (load_report){.err = r.status == WMPI_ENOMEM ? LOAD_ENOMEM : LOAD_EJOB};
        else
            memcpy(&out[i], c->reply[i] + sizeof(wmpi_reply), sizeof(out[i]));
        if (out[i].err != LOAD_OK) rc = -1;
    }
out:
    for (int i = 0; i < c->n_shards; i++) free(cmds[i]);
    free(cmds);
    return rc;
}

static void s_ctx_free(mpi_ctx *c)
{
    wmpi_kick_close(&c->kick);
    if (c->reply)
        for (int i = 0; i < c->n_shards; i++) free(c->reply[i]);
    free(c->reply);
    free(c->reply_cap);
    free(c->status);
    free(c->reqs);
    free(c->stats);
    free(c->sessions);
    free(c->cmd);
    if (c->ops)
        for (int i = 0; i < FASA_PIPE_MAX; i++) s_op_free(&c->ops[i], c->n_shards);
    free(c->ops);
    if (c->ap_cmd)
        for (int i = 0; i < c->n_shards; i++) free(c->ap_cmd[i]);
    free(c->ap_cmd);
    free(c->ap_cap);
    free(c->ap_part);
    free(c->ap_req);
    free(c);
}

/* Tells every worker to stop; they free their shards on the way out. */
static void s_destroy(void *ctx)
{
    mpi_ctx *c = ctx;
    if (s_cmd_begin(c, WMPI_STOP, -1, NULL, 0)) {
        s_exchange(c, 0, c->n_shards, 0);
    } else {
        /* No memory even for a header: send one from the stack so the workers still stop. */
        const wmpi_cmd h = {.magic = WMPI_MAGIC, .cmd = WMPI_STOP, .sid = -1};
        for (int i = 0; i < c->n_shards; i++) {
            MPI_Send(&h, (int)sizeof(h), MPI_BYTE, i + 1, WMPI_TAG_CMD, c->comm);
            wmpi_kick_send(&c->kick, i + 1);
        }
    }
    s_ctx_free(c);
}

int fasa_transport_mpi(fasa_transport *t, MPI_Comm comm)
{
    int size = 0;
    MPI_Comm_size(comm, &size);
    wmpi_spin_set_ranks(size);
    if (size < 2) return -1;
    /* A failed exchange returns to rank 0 (which reports it) instead of aborting the job. */
    MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN);
    mpi_ctx *c = calloc(1, sizeof(*c));
    if (!c) return -1;
    c->comm = comm;
    c->n_shards = size - 1;
    int rank = 0;
    MPI_Comm_rank(comm, &rank);
    wmpi_kick_open(&c->kick, rank);
    c->reply = calloc((size_t)c->n_shards, sizeof(*c->reply));
    c->reply_cap = calloc((size_t)c->n_shards, sizeof(*c->reply_cap));
    c->status = calloc((size_t)c->n_shards, sizeof(*c->status));
    c->reqs = calloc(2 * (size_t)c->n_shards, sizeof(*c->reqs));
    c->stats = calloc(2 * (size_t)c->n_shards, sizeof(*c->stats));
    if (!c->reply || !c->reply_cap || !c->status || !c->reqs || !c->stats) goto err_free;
    *t = (fasa_transport){.ctx = c,
                          .n_shards = c->n_shards,
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
                          .shard_rss = s_shard_rss,
                          .stage_append = s_stage_append,
                          .staged_appended = s_staged_appended,
                          .load = s_load,
                          .attend_local = s_attend_local,
                          .score_attend = s_score_attend,
                          .destroy = s_destroy};
    return 0;
err_free:
    s_ctx_free(c);
    return -1;
}

/* bench_soak: many concurrent clients, a long mixed workload, against a running fasa-server.
 *
 * CLIENTS threads (pthreads, default 8), each with its own libfasa handle, run REQUESTS
 * requests each (default 2000) in a seeded pseudo-random mix:
 *   append      small key/value blocks (1..24 tokens, every layer or one layer) to one of
 *               the client's own sessions;
 *   attend      fasa, dense or oracle, with and without k_new, sometimes with a budget or a
 *               max_pos; every output is checked against an embedded engine in this process
 *               that holds the same data (same shard count and block, so the outputs and the
 *               selected positions must agree), and every dense output also against a naive
 *               exact attention in double precision over the same keys and values;
 *   batch       BatchAttend over every layer, each item checked like an attend;
 *   stats       the session's length and kv_bytes must be what the client appended;
 *   ping;
 *   create/drop sessions come and go (at most 2 live per client, at most --max-tokens
 *               tokens each), half of them with the profile as text, half by its name;
 *   bad         requests that must fail with one status: wrong q shape, NaN in q, infinity
 *               in an appended value, an unknown session, an append at the wrong position,
 *               a duplicate create, a layer out of range, a drop of an unknown session
 *               (INVALID_ARGUMENT, NOT_FOUND or ALREADY_EXISTS), garbage bytes and a
 *               cut-short Ping on a raw ZeroMQ socket (INVALID_ARGUMENT, the Ping's request id
 *               recovered), and a message over --max-message (RESOURCE_EXHAUSTED from the
 *               server's I/O thread, which the server's counters do not see); one
 *               BatchAttend in four has an item that must fail alone.
 * An unexpected error is any status other than the one expected, a timeout, or a wrong
 * result. The sessions use a real calibration profile: Calibrate on the server over a
 * synthetic sample (data/synth.h, one generator per layer), stored there as "soak".
 *
 * Phases: warm-up (--warmup requests per client, checked, not timed), then the soak
 * (timed), then every client drops its sessions. The resident memory (VmRSS) of every
 * server rank (--pids, in rank order) is read after the warm-up, at every tenth of the soak,
 * after the soak and after the drops; the server's error counter must equal the number of
 * bad requests (and items) it was sent. Exit status 1 when there was any unexpected error.
 *
 * bench/soak.sh starts a 3-rank server, runs this and stops the server. */
#include <getopt.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

#include "engine.h"

#define SOAK_RSS_SLACK_MIB 64
#include "fasa.pb-c.h"
#include "fasa_client.h"
#include "synth.h"
#include "timing.h"

/* The sessions' geometry: 3 layers (layer 0 stays dense under fasa, the server's default),
 * 8 query heads over 2 KV heads, head_dim 32 (16 FCs, 4 dominant). */
enum { NL = 3, NH = 8, NKV = 2, HD = 32, NTIP = 4, MAX_LIVE = 2, MAX_PIDS = 64 };
#define SOAK_PROFILE "soak"
#define SOAK_TOL 1e-4

typedef enum soak_kind {
    K_APPEND,
    K_ATTEND_FASA,
    K_ATTEND_DENSE,
    K_ATTEND_ORACLE,
    K_BATCH,
    K_STATS,
    K_PING,
    K_CREATE,
    K_DROP,
    K_BAD,
    K_N
} soak_kind;
static const char *const s_kind_name[K_N] = {
    "append", "attend.fasa", "attend.dense", "attend.oracle", "batch",
    "stats",  "ping",        "create",       "drop",          "bad"};

typedef enum soak_bad {
    B_SHAPE,
    B_NAN_Q,
    B_INF_V,
    B_UNKNOWN,
    B_POSITION,
    B_DUPLICATE,
    B_LAYER,
    B_DROP_UNKNOWN,
    B_GARBAGE,
    B_TRUNCATED,
    B_OVERSIZED,
    B_N
} soak_bad;
static const char *const s_bad_name[B_N] = {"q shape (INVALID_ARGUMENT)",
                                            "NaN in q (INVALID_ARGUMENT)",
                                            "inf in v (INVALID_ARGUMENT)",
                                            "unknown session (NOT_FOUND)",
                                            "wrong position (INVALID_ARGUMENT)",
                                            "duplicate create (ALREADY_EXISTS)",
                                            "layer out of range (INVALID_ARGUMENT)",
                                            "drop unknown (NOT_FOUND)",
                                            "garbage bytes (INVALID_ARGUMENT)",
                                            "truncated request (INVALID_ARGUMENT, its id)",
                                            "oversized (RESOURCE_EXHAUSTED)"};

typedef struct soak_opts {
    const char *server;
    int clients, requests, warmup, max_tokens, block, timeout_ms;
    long max_message;
    uint64_t seed;
    int n_pids;
    long pids[MAX_PIDS];
} soak_opts;

/* What every client shares, read-only once the threads start. */
typedef struct soak_shared {
    soak_opts o;
    int n_shards;
    synth_t synth[NL];      /* one generator per layer */
    char *profile_text;     /* from Calibrate */
    fasa_profile *profile;  /* the same, parsed, for the embedded engines */
    pthread_barrier_t gate; /* phase changes: the main thread reads memory in between */
    atomic_long done;       /* soak requests done, all clients */
} soak_shared;

typedef struct soak_session {
    int live;
    char id[64];
    int offset; /* session position p is generator position offset + p */
    int len[NL];
} soak_session;

#define SOAK_FIRST 5
typedef struct soak_client {
    int idx;
    soak_shared *sh;
    uint64_t rng;
    fasa_client *c;
    void *zctx, *raw;
    fasa_engine_t *eng;
    soak_session s[MAX_LIVE];
    int serial;
    int timed; /* 1 during the soak phase */
    int final; /* 1 while dropping the sessions at the end */
    /* results */
    long count[K_N], bad_count[B_N];
    long bad_at_server; /* bad requests of the soak phase that the server answers */
    long bad_items;     /* bad batch items of the soak phase */
    double *lat[K_N];   /* ms, soak phase only */
    long n_lat[K_N];
    long unexpected, unexpected_warmup, verified, dense_checked;
    double max_diff, max_dense_diff;
    int n_first;
    char first[SOAK_FIRST][400];
    /* scratch */
    float *k, *v, *q, *out, *ref, *bq, *bout;
    int32_t *sel, *sel_ref, *bsel;
    double *logit;
} soak_client;

static uint64_t s_next(uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static int s_rand(soak_client *cl, int n)
{
    return (int)(s_next(&cl->rng) % (uint64_t)n);
}

static void *s_alloc(size_t n)
{
    void *p = calloc(1, n ? n : 1);
    if (!p) {
        fprintf(stderr, "bench_soak: out of memory\n");
        exit(1);
    }
    return p;
}

static void s_unexpected(soak_client *cl, const char *fmt, ...)
{
    if (cl->timed)
        cl->unexpected++;
    else
        cl->unexpected_warmup++;
    if (cl->n_first < SOAK_FIRST) {
        int n = snprintf(cl->first[cl->n_first], sizeof(cl->first[0]), "client %d%s: ", cl->idx,
                         cl->timed   ? ""
                         : cl->final ? " (final drops)"
                                     : " (warm-up)");
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(cl->first[cl->n_first] + n, sizeof(cl->first[0]) - (size_t)n, fmt, ap);
        va_end(ap);
        cl->n_first++;
    }
}

static void s_record(soak_client *cl, soak_kind k, double t0)
{
    if (!cl->timed) return;
    cl->count[k]++;
    cl->lat[k][cl->n_lat[k]++] = 1e3 * (timing_now() - t0);
}

/* Checks a libfasa status against the expected one; 1 when it matched. */
static int s_expect(soak_client *cl, const char *what, fasa_client_status got,
                    fasa_client_status want, const fasa_client_error *e)
{
    if (got == want) return 1;
    s_unexpected(cl, "%s: got %s (%s), expected %s", what, fasa_client_status_name(got),
                 got ? e->msg : "", fasa_client_status_name(want));
    return 0;
}

static const fasa_client_geometry s_geom = {NL, NH, NKV, HD};

/* ---- sessions: the server's and the embedded mirror ---- */

static int s_live(const soak_client *cl)
{
    int n = 0;
    for (int i = 0; i < MAX_LIVE; i++) n += cl->s[i].live;
    return n;
}

static int s_max_len(const soak_session *s)
{
    int m = 0;
    for (int l = 0; l < NL; l++) m = s->len[l] > m ? s->len[l] : m;
    return m;
}

/* Forgets a session on both sides without counting a request (after a mismatch). */
static void s_forget(soak_client *cl, soak_session *s)
{
    fasa_client_drop_session(cl->c, s->id, NULL);
    fasa_engine_drop(cl->eng, s->id, NULL);
    s->live = 0;
}

static void s_op_create(soak_client *cl)
{
    soak_session *s = NULL;
    for (int i = 0; i < MAX_LIVE && !s; i++)
        if (!cl->s[i].live) s = &cl->s[i];
    if (!s) return;
    memset(s, 0, sizeof(*s));
    snprintf(s->id, sizeof(s->id), "soak-c%d-s%d", cl->idx, cl->serial);
    const int by_name = cl->serial % 2;
    cl->serial++;
    const int span = cl->sh->synth[0].cfg.n_tokens - cl->sh->o.max_tokens - 1;
    s->offset = s_rand(cl, span);
    fasa_client_session_config cfg = {
        .geom = s_geom, .method = FASA_CLIENT_METHOD_FASA, .budget = 16};
    if (by_name)
        cfg.profile_name = SOAK_PROFILE;
    else
        cfg.profile_text = cl->sh->profile_text;
    fasa_client_error e;
    uint32_t shards = 0;
    const double t0 = timing_now();
    const fasa_client_status st = fasa_client_create_session(cl->c, s->id, &cfg, &shards, &e);
    s_record(cl, K_CREATE, t0);
    if (!s_expect(cl, "create", st, FASA_CLIENT_OK, &e)) return;
    if ((int)shards != cl->sh->n_shards)
        s_unexpected(cl, "create %s: %u shards, the server has %d", s->id, shards,
                     cl->sh->n_shards);
    fasa_session_config ec = {.n_layers = NL,
                              .n_heads = NH,
                              .n_kv_heads = NKV,
                              .head_dim = HD,
                              .pairing = cl->sh->profile->pairing,
                              .profile = cl->sh->profile,
                              .method = FASA_METHOD_FASA,
                              .budget = 16,
                              .gqa = FASA_GQA_PER_HEAD};
    fasa_error fe;
    if (fasa_engine_create(cl->eng, s->id, &ec, &fe)) {
        fprintf(stderr, "bench_soak: embedded create: %s\n", fe.msg);
        exit(1);
    }
    s->live = 1;
}

static void s_op_drop(soak_client *cl, soak_session *s)
{
    fasa_client_error e;
    const double t0 = timing_now();
    const fasa_client_status st = fasa_client_drop_session(cl->c, s->id, &e);
    s_record(cl, K_DROP, t0);
    s_expect(cl, "drop", st, FASA_CLIENT_OK, &e);
    fasa_engine_drop(cl->eng, s->id, NULL);
    s->live = 0;
}

/* Keys and values of positions pos .. pos + n - 1 of one layer of a session. */
static void s_kv(const soak_client *cl, const soak_session *s, int layer, int pos, int n, float *k,
                 float *v)
{
    synth_kv(&cl->sh->synth[layer], s->offset + pos, n, k, v);
}

static void s_op_append(soak_client *cl, soak_session *s)
{
    const int cap = cl->sh->o.max_tokens;
    int lo = 0, equal = 1;
    for (int l = 1; l < NL; l++) {
        if (s->len[l] != s->len[0]) equal = 0;
        if (s->len[l] < s->len[lo]) lo = l;
    }
    int n = 1 + s_rand(cl, 24);
    if (n > cap - s->len[lo]) n = cap - s->len[lo];
    const size_t row = (size_t)NKV * HD;
    /* Every layer at once when they are level (and now and then one layer alone). */
    const int layer = equal && s_rand(cl, 4) ? -1 : lo;
    const int start = s->len[lo];
    if (layer < 0) {
        for (int l = 0; l < NL; l++)
            s_kv(cl, s, l, start, n, cl->k + (size_t)l * n * row, cl->v + (size_t)l * n * row);
    } else {
        s_kv(cl, s, layer, start, n, cl->k, cl->v);
    }
    fasa_client_error e;
    uint64_t new_len = 0;
    const double t0 = timing_now();
    const fasa_client_status st = fasa_client_append(cl->c, s->id, &s_geom, layer, (uint64_t)start,
                                                     (uint64_t)n, cl->k, cl->v, &new_len, &e);
    s_record(cl, K_APPEND, t0);
    if (!s_expect(cl, "append", st, FASA_CLIENT_OK, &e)) {
        s_forget(cl, s);
        return;
    }
    if (new_len != (uint64_t)(start + n))
        s_unexpected(cl, "append %s layer %d: length %llu, expected %d", s->id, layer,
                     (unsigned long long)new_len, start + n);
    fasa_error fe;
    if (fasa_engine_append(cl->eng, s->id, layer, start, n, cl->k, cl->v, &fe)) {
        fprintf(stderr, "bench_soak: embedded append: %s\n", fe.msg);
        exit(1);
    }
    for (int l = 0; l < NL; l++)
        if (layer < 0 || l == layer) s->len[l] += n;
}

/* Exact attention in double over positions 0..n_vis-1 of one layer: max |out - naive|. */
static double s_naive_dense(soak_client *cl, const soak_session *s, int layer, int n_vis,
                            const float *q, const float *out)
{
    const size_t row = (size_t)NKV * HD;
    s_kv(cl, s, layer, 0, n_vis, cl->k, cl->v);
    double worst = 0;
    for (int h = 0; h < NH; h++) {
        const int g = h / (NH / NKV);
        double m = -INFINITY;
        for (int j = 0; j < n_vis; j++) {
            double dot = 0;
            for (int d = 0; d < HD; d++)
                dot += (double)q[h * HD + d] * cl->k[(size_t)j * row + (size_t)g * HD + d];
            cl->logit[j] = dot / sqrt((double)HD);
            if (cl->logit[j] > m) m = cl->logit[j];
        }
        double sum = 0, o[HD] = {0};
        for (int j = 0; j < n_vis; j++) {
            const double w = exp(cl->logit[j] - m);
            sum += w;
            for (int d = 0; d < HD; d++) o[d] += w * cl->v[(size_t)j * row + (size_t)g * HD + d];
        }
        for (int d = 0; d < HD; d++) {
            const double diff = fabs(o[d] / sum - out[h * HD + d]);
            if (diff > worst) worst = diff;
        }
    }
    return worst;
}

static const fasa_method s_engine_method[3] = {FASA_METHOD_FASA, FASA_METHOD_DENSE,
                                               FASA_METHOD_ORACLE};

/* Runs the request er (method fasa, dense or oracle) on the embedded engine, which holds the
 * same data, and compares what the server answered: out, the selected positions (sel, budget
 * columns) and the step statistics; a dense output also against naive exact attention. */
static void s_verify(soak_client *cl, const soak_session *s, const fasa_attend_req *er,
                     const char *what, int budget, const float *out, const int32_t *sel,
                     const fasa_client_step_stats *st)
{
    fasa_step_stats est;
    fasa_error fe;
    if (fasa_engine_attend(cl->eng, s->id, er, cl->ref, cl->sel_ref, &est, &fe)) {
        fprintf(stderr, "bench_soak: embedded attend: %s\n", fe.msg);
        exit(1);
    }
    const int layer = er->layer, mi = er->method;
    const int n_vis = er->max_pos >= 0 ? er->max_pos + 1 : s->len[layer];
    const char *method = fasa_method_name(s_engine_method[mi]);
    cl->verified++;
    double worst = 0;
    for (int i = 0; i < NH * HD; i++) {
        const double d = fabs((double)out[i] - cl->ref[i]);
        if (!(d <= worst)) worst = d; /* NaN sticks */
    }
    if (worst > cl->max_diff || isnan(worst)) cl->max_diff = worst;
    if (!(worst <= SOAK_TOL))
        s_unexpected(cl, "%s %s layer %d %s at %d tokens: max |server - embedded| %.3g", what,
                     s->id, layer, method, n_vis, worst);
    else if (memcmp(sel, cl->sel_ref, (size_t)NH * budget * sizeof(int32_t)))
        s_unexpected(cl, "%s %s layer %d %s at %d tokens: selected positions differ", what, s->id,
                     layer, method, n_vis);
    else if ((int)st->n_visible != n_vis || (int)st->method_used != est.method_used + 1)
        s_unexpected(cl, "%s %s layer %d: n_visible %u method_used %d, expected %d and %d", what,
                     s->id, layer, st->n_visible, (int)st->method_used, n_vis, est.method_used + 1);
    if (er->method == FASA_METHOD_DENSE) {
        const double dd = s_naive_dense(cl, s, layer, n_vis, er->q, out);
        cl->dense_checked++;
        if (dd > cl->max_dense_diff || isnan(dd)) cl->max_dense_diff = dd;
        if (!(dd <= SOAK_TOL))
            s_unexpected(cl, "%s %s layer %d dense at %d tokens: max |server - naive| %.3g", what,
                         s->id, layer, n_vis, dd);
    }
}

static void s_op_attend(soak_client *cl, soak_session *s)
{
    static const fasa_client_method cm[3] = {FASA_CLIENT_METHOD_FASA, FASA_CLIENT_METHOD_DENSE,
                                             FASA_CLIENT_METHOD_ORACLE};
    const int mi = s_rand(cl, 3);
    const int layer = s_rand(cl, NL);
    const int len = s->len[layer];
    int with_new = len < cl->sh->o.max_tokens && (len == 0 || s_rand(cl, 10) < 3);
    float knew[NKV * HD], vnew[NKV * HD];
    if (with_new) s_kv(cl, s, layer, len, 1, knew, vnew);
    const int n_all = len + with_new;
    const int budget = s_rand(cl, 3) == 0 ? 0 : (s_rand(cl, 2) ? 8 : 32);
    const int eff_budget = budget ? budget : 16;
    const int max_pos = !with_new && s_rand(cl, 6) == 0 ? s_rand(cl, len) : -1;
    synth_query(&cl->sh->synth[layer], s->offset + n_all - 1, cl->q);

    fasa_client_step_stats st;
    fasa_client_attend_req r = FASA_CLIENT_ATTEND_REQ_INIT;
    r.session_id = s->id;
    r.geom = s_geom;
    r.layer = (uint32_t)layer;
    r.q = cl->q;
    r.k_new = with_new ? knew : NULL;
    r.v_new = with_new ? vnew : NULL;
    r.method = cm[mi];
    r.budget = (uint32_t)budget;
    r.max_pos = max_pos;
    r.out = cl->out;
    r.selected = cl->sel;
    r.selected_budget = (uint32_t)eff_budget;
    r.stats = &st;
    fasa_client_error e;
    const double t0 = timing_now();
    const fasa_client_status rc = fasa_client_attend(cl->c, &r, &e);
    s_record(cl, (soak_kind)(K_ATTEND_FASA + mi), t0);
    if (!s_expect(cl, "attend", rc, FASA_CLIENT_OK, &e)) {
        s_forget(cl, s);
        return;
    }
    if (with_new) s->len[layer]++;

    /* The embedded engine with the same data and the same request. */
    fasa_attend_req er = {.layer = layer,
                          .q = cl->q,
                          .k_new = with_new ? knew : NULL,
                          .v_new = with_new ? vnew : NULL,
                          .method = s_engine_method[mi],
                          .budget = budget,
                          .gqa = -1,
                          .max_pos = max_pos};
    s_verify(cl, s, &er, "attend", eff_budget, cl->out, cl->sel, &st);
}

/* One BatchAttend: every layer of the session, each item its own method and budget; now
 * and then one item is bad and must fail alone while the others run: a q shape that
 * disagrees with the session (INVALID_ARGUMENT) or an unknown session (NOT_FOUND). (Not NaN:
 * the server refuses the whole batch for a NaN in one item, see bench/README.md.) */
static void s_op_batch(soak_client *cl, soak_session *s)
{
    fasa_client_attend_req it[NL];
    fasa_client_error item_err[NL];
    fasa_client_step_stats st[NL];
    int mi[NL], budget[NL];
    const int bad = s_rand(cl, 4) == 0 ? s_rand(cl, NL) : -1;
    const int bad_shape = s_rand(cl, 2);
    for (int l = 0; l < NL; l++) {
        float *q = cl->bq + (size_t)l * NH * HD;
        synth_query(&cl->sh->synth[l], s->offset + s->len[l] - 1, q);
        mi[l] = s_rand(cl, 3);
        budget[l] = s_rand(cl, 2) ? 8 : 32;
        it[l] = (fasa_client_attend_req)FASA_CLIENT_ATTEND_REQ_INIT;
        it[l].session_id = s->id;
        it[l].geom = s_geom;
        it[l].layer = (uint32_t)l;
        it[l].q = q;
        it[l].method = (fasa_client_method)(FASA_CLIENT_METHOD_FASA + mi[l]);
        it[l].budget = (uint32_t)budget[l];
        it[l].out = cl->bout + (size_t)l * NH * HD;
        it[l].selected = cl->bsel + (size_t)l * NH * 64;
        it[l].stats = &st[l];
        if (l == bad && bad_shape)
            it[l].geom.head_dim = HD - 2;
        else if (l == bad)
            it[l].session_id = "soak-nobody";
    }
    if (bad >= 0 && cl->timed) {
        cl->bad_at_server++;
        cl->bad_items++;
    }
    fasa_client_error e;
    const double t0 = timing_now();
    const fasa_client_status rc = fasa_client_batch_attend(cl->c, NL, it, item_err, &e);
    s_record(cl, K_BATCH, t0);
    if (!s_expect(cl, "batch_attend", rc, FASA_CLIENT_OK, &e)) return;
    for (int l = 0; l < NL; l++) {
        if (l == bad) {
            s_expect(
                cl, bad_shape ? "batch item with a wrong q shape" : "batch item, unknown session",
                item_err[l].code, bad_shape ? FASA_CLIENT_INVALID_ARGUMENT : FASA_CLIENT_NOT_FOUND,
                &item_err[l]);
            continue;
        }
        if (!s_expect(cl, "batch item", item_err[l].code, FASA_CLIENT_OK, &item_err[l])) continue;
        fasa_attend_req er = {.layer = l,
                              .q = it[l].q,
                              .method = s_engine_method[mi[l]],
                              .budget = budget[l],
                              .gqa = -1,
                              .max_pos = -1};
        s_verify(cl, s, &er, "batch item", budget[l], it[l].out, it[l].selected, &st[l]);
    }
}

static void s_op_stats(soak_client *cl, soak_session *s)
{
    fasa_client_stats st;
    fasa_client_error e;
    const int with_session = s_rand(cl, 2);
    const double t0 = timing_now();
    const fasa_client_status rc =
        fasa_client_get_stats(cl->c, with_session ? s->id : NULL, &st, &e);
    s_record(cl, K_STATS, t0);
    if (s_expect(cl, "stats", rc, FASA_CLIENT_OK, &e)) {
        uint64_t rows = 0;
        for (int l = 0; l < NL; l++) rows += (uint64_t)s->len[l];
        const uint64_t want = rows * NKV * HD * sizeof(float) * 2;
        if ((int)st.n_shards != cl->sh->n_shards)
            s_unexpected(cl, "stats: %u shards, expected %d", st.n_shards, cl->sh->n_shards);
        if (with_session && (!st.has_session || st.session.length != (uint64_t)s->len[0] ||
                             st.session.kv_bytes != want))
            s_unexpected(cl, "stats %s: length %llu kv_bytes %llu, expected %d and %llu", s->id,
                         (unsigned long long)st.session.length,
                         (unsigned long long)st.session.kv_bytes, s->len[0],
                         (unsigned long long)want);
    }
    fasa_client_stats_free(&st);
}

static void s_op_ping(soak_client *cl)
{
    fasa_client_server_info info;
    fasa_client_error e;
    const double t0 = timing_now();
    const fasa_client_status rc = fasa_client_ping(cl->c, &info, &e);
    s_record(cl, K_PING, t0);
    if (s_expect(cl, "ping", rc, FASA_CLIENT_OK, &e) && (int)info.n_shards != cl->sh->n_shards)
        s_unexpected(cl, "ping: %u shards, expected %d", info.n_shards, cl->sh->n_shards);
}

/* Raw bytes on a DEALER socket: the reply's status, or -1 with no reply
 * within wait_ms. */
static int s_raw_roundtrip(void *sock, const void *buf, size_t n, int wait_ms,
                           uint64_t *request_id_p)
{
    zmq_setsockopt(sock, ZMQ_RCVTIMEO, &wait_ms, sizeof(wait_ms));
    if (zmq_send(sock, buf, n, 0) < 0) return -2;
    zmq_msg_t m;
    zmq_msg_init(&m);
    if (zmq_msg_recv(&m, sock, 0) < 0) {
        zmq_msg_close(&m);
        return -1;
    }
    Fasa__V1__Response *r = fasa__v1__response__unpack(NULL, zmq_msg_size(&m), zmq_msg_data(&m));
    zmq_msg_close(&m);
    if (!r) return -3;
    const int st = (int)r->status;
    *request_id_p = r->request_id;
    fasa__v1__response__free_unpacked(r, NULL);
    return st;
}

static void *s_dealer(soak_client *cl)
{
    void *sock = zmq_socket(cl->zctx, ZMQ_DEALER);
    const int linger = 0;
    if (!sock || zmq_setsockopt(sock, ZMQ_LINGER, &linger, sizeof(linger)) ||
        zmq_connect(sock, cl->sh->o.server)) {
        fprintf(stderr, "bench_soak: raw socket to %s: %s\n", cl->sh->o.server,
                zmq_strerror(zmq_errno()));
        exit(1);
    }
    return sock;
}

static void s_op_bad(soak_client *cl, soak_session *s)
{
    const soak_opts *o = &cl->sh->o;
    /* Oversized messages cost a whole message's bytes: 1 in 40 bad ones. */
    soak_bad b = (soak_bad)s_rand(cl, B_N - 1);
    if (o->max_message > 0 && s_rand(cl, 40) == 0) b = B_OVERSIZED;
    if (cl->timed) {
        cl->bad_count[b]++;
        cl->bad_at_server += b != B_OVERSIZED;
    }
    fasa_client_error e;
    fasa_client_status rc = FASA_CLIENT_OK, want = FASA_CLIENT_INVALID_ARGUMENT;
    fasa_client_attend_req r = FASA_CLIENT_ATTEND_REQ_INIT;
    r.session_id = s->id;
    r.geom = s_geom;
    r.q = cl->q;
    r.out = cl->out;
    synth_query(&cl->sh->synth[0], s->offset + s->len[0], cl->q);
    const int start = s->len[0];
    char what[96];
    snprintf(what, sizeof(what), "bad request: %s", s_bad_name[b]);
    double t0 = timing_now();
    switch (b) {
    case B_SHAPE:
        r.geom.head_dim = HD - 2;
        t0 = timing_now();
        rc = fasa_client_attend(cl->c, &r, &e);
        break;
    case B_NAN_Q:
        cl->q[s_rand(cl, NH * HD)] = NAN;
        t0 = timing_now();
        rc = fasa_client_attend(cl->c, &r, &e);
        break;
    case B_INF_V:
        s_kv(cl, s, 0, start, 1, cl->k, cl->v);
        cl->v[s_rand(cl, NKV * HD)] = s_rand(cl, 2) ? INFINITY : -INFINITY;
        t0 = timing_now();
        rc = fasa_client_append(cl->c, s->id, &s_geom, 0, (uint64_t)start, 1, cl->k, cl->v, NULL,
                                &e);
        break;
    case B_UNKNOWN:
        r.session_id = "soak-nobody";
        t0 = timing_now();
        rc = fasa_client_attend(cl->c, &r, &e);
        want = FASA_CLIENT_NOT_FOUND;
        break;
    case B_POSITION: {
        const int wrong =
            start > 0 && s_rand(cl, 2) ? s_rand(cl, start) : start + 1 + s_rand(cl, 9);
        s_kv(cl, s, 0, wrong, 1, cl->k, cl->v);
        t0 = timing_now();
        rc = fasa_client_append(cl->c, s->id, &s_geom, 0, (uint64_t)wrong, 1, cl->k, cl->v, NULL,
                                &e);
        break;
    }
    case B_DUPLICATE: {
        fasa_client_session_config cfg = {.geom = s_geom, .profile_name = SOAK_PROFILE};
        t0 = timing_now();
        rc = fasa_client_create_session(cl->c, s->id, &cfg, NULL, &e);
        want = FASA_CLIENT_ALREADY_EXISTS;
        break;
    }
    case B_LAYER:
        r.layer = NL + (uint32_t)s_rand(cl, 5);
        t0 = timing_now();
        rc = fasa_client_attend(cl->c, &r, &e);
        break;
    case B_DROP_UNKNOWN:
        t0 = timing_now();
        rc = fasa_client_drop_session(cl->c, "soak-nobody", &e);
        want = FASA_CLIENT_NOT_FOUND;
        break;
    case B_GARBAGE: {
        uint8_t junk[256];
        const size_t n = 1 + (size_t)s_rand(cl, sizeof(junk));
        for (size_t i = 0; i < n; i++) junk[i] = (uint8_t)s_next(&cl->rng);
        junk[0] = 0xff; /* not a valid first key */
        uint64_t id = 1;
        t0 = timing_now();
        const int st = s_raw_roundtrip(cl->raw, junk, n, o->timeout_ms, &id);
        s_record(cl, K_BAD, t0);
        if (st != FASA__V1__STATUS__INVALID_ARGUMENT || id != 0)
            s_unexpected(cl, "%s: status %d request_id %llu (-1: no reply)", what, st,
                         (unsigned long long)id);
        return;
    }
    case B_TRUNCATED: {
        /* A valid Ping cut inside its payload: refused, with the request id recovered. */
        Fasa__V1__Request req = FASA__V1__REQUEST__INIT;
        Fasa__V1__Ping ping = FASA__V1__PING__INIT;
        uint8_t payload[64], buf[128];
        for (size_t i = 0; i < sizeof(payload); i++) payload[i] = (uint8_t)s_next(&cl->rng);
        ping.has_payload = 1;
        ping.payload.data = payload;
        ping.payload.len = sizeof(payload);
        req.protocol_version = 1;
        req.request_id = 1 + (s_next(&cl->rng) >> 1);
        req.body_case = FASA__V1__REQUEST__BODY_PING;
        req.ping = &ping;
        const size_t n = fasa__v1__request__pack(&req, buf);
        uint64_t id = 0;
        t0 = timing_now();
        const int st =
            s_raw_roundtrip(cl->raw, buf, n - 1 - (size_t)s_rand(cl, 32), o->timeout_ms, &id);
        s_record(cl, K_BAD, t0);
        if (st != FASA__V1__STATUS__INVALID_ARGUMENT || id != req.request_id)
            s_unexpected(cl, "%s: status %d request_id %llu, sent %llu (-1: no reply)", what, st,
                         (unsigned long long)id, (unsigned long long)req.request_id);
        return;
    }
    case B_OVERSIZED: {
        /* A fresh peer: answered RESOURCE_EXHAUSTED at once (issue 19; it used to be
         * dropped in silence); nobody else notices. */
        const size_t n = (size_t)o->max_message + 1;
        uint8_t *big = s_alloc(n);
        memset(big, 0x0a, n);
        void *sock = s_dealer(cl);
        uint64_t id = 0;
        const int st = s_raw_roundtrip(sock, big, n, 10000, &id);
        cl->count[K_BAD] += cl->timed; /* not timed: sending it is most of the cost */
        zmq_close(sock);
        free(big);
        if (st != FASA_CLIENT_RESOURCE_EXHAUSTED)
            s_unexpected(cl, "%s: status %d, expected RESOURCE_EXHAUSTED (-1: no reply)", what, st);
        return;
    }
    case B_N:
        break;
    }
    s_record(cl, K_BAD, t0);
    s_expect(cl, what, rc, want, &e);
}

/* One request of the mix. */
static void s_step(soak_client *cl)
{
    if (!s_live(cl)) {
        s_op_create(cl);
        return;
    }
    soak_session *s = NULL;
    int pick = s_rand(cl, MAX_LIVE);
    for (int i = 0; i < MAX_LIVE && !s; i++)
        if (cl->s[(pick + i) % MAX_LIVE].live) s = &cl->s[(pick + i) % MAX_LIVE];
    const int full = s_max_len(s) >= cl->sh->o.max_tokens;
    const int r = s_rand(cl, 1000);
    if (r < 250) {
        if (full)
            s_op_drop(cl, s);
        else
            s_op_append(cl, s);
    } else if (r < 560) {
        s_op_attend(cl, s);
    } else if (r < 600) {
        /* Batches need a token in every layer. */
        int empty = 0;
        for (int l = 0; l < NL; l++) empty |= s->len[l] == 0;
        if (empty)
            s_op_attend(cl, s);
        else
            s_op_batch(cl, s);
    } else if (r < 680) {
        s_op_stats(cl, s);
    } else if (r < 740) {
        s_op_ping(cl);
    } else if (r < 800) {
        if (s_live(cl) < MAX_LIVE && s_rand(cl, 2))
            s_op_create(cl);
        else
            s_op_drop(cl, s);
    } else {
        s_op_bad(cl, s);
    }
}

static void *s_client_main(void *arg)
{
    soak_client *cl = arg;
    soak_shared *sh = cl->sh;
    pthread_barrier_t *gate = &sh->gate;
    for (int i = 0; i < sh->o.warmup; i++) s_step(cl);
    pthread_barrier_wait(gate); /* warm-up done: memory before */
    pthread_barrier_wait(gate);
    cl->timed = 1;
    for (int i = 0; i < sh->o.requests; i++) {
        s_step(cl);
        atomic_fetch_add(&sh->done, 1);
    }
    cl->timed = 0;
    pthread_barrier_wait(gate); /* soak done: memory after */
    pthread_barrier_wait(gate);
    cl->final = 1;
    for (int i = 0; i < MAX_LIVE; i++)
        if (cl->s[i].live) {
            fasa_client_error e;
            s_expect(cl, "final drop", fasa_client_drop_session(cl->c, cl->s[i].id, &e),
                     FASA_CLIENT_OK, &e);
            fasa_engine_drop(cl->eng, cl->s[i].id, NULL);
            cl->s[i].live = 0;
        }
    pthread_barrier_wait(gate); /* drops done: memory after the drops */
    return NULL;
}

/* ---- memory of the server's ranks ---- */

static long s_rss_kb(long pid)
{
    char path[64], line[256];
    snprintf(path, sizeof(path), "/proc/%ld/status", pid);
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    long kb = -1;
    while (fgets(line, sizeof(line), f))
        if (strncmp(line, "VmRSS:", 6) == 0) kb = atol(line + 6);
    fclose(f);
    return kb;
}

/* What the server says its ranks hold: KV bytes stored and allocated. */
static void s_print_held(const fasa_client_stats *st)
{
    printf("  server-held KV: %u sessions, %.2f MiB stored; allocated by rank:", st->n_sessions,
           st->kv_bytes / 1048576.0);
    for (size_t i = 0; i < st->n_rank_stats; i++)
        printf("%s %u %.2f MiB", i ? "," : "", st->rank_stats[i].rank,
               st->rank_stats[i].alloc_bytes / 1048576.0);
    printf("\n");
}

static long s_print_rss(const soak_opts *o, const char *when, long *per_rank)
{
    long total = 0;
    char detail[1024] = "";
    size_t off = 0;
    for (int i = 0; i < o->n_pids; i++) {
        per_rank[i] = s_rss_kb(o->pids[i]);
        total += per_rank[i] > 0 ? per_rank[i] : 0;
        off += (size_t)snprintf(detail + off, sizeof(detail) - off, "%srank %d %.1f", i ? ", " : "",
                                i, per_rank[i] / 1024.0);
        if (off >= sizeof(detail)) off = sizeof(detail) - 1;
    }
    printf("server RSS %-18s %8.1f MiB (%s)\n", when, total / 1024.0, detail);
    return total;
}

/* ---- report ---- */

static double s_pct(long n, const double *sorted, double p)
{
    if (n == 0) return 0;
    long i = (long)ceil(p * (double)n) - 1;
    if (i < 0) i = 0;
    return sorted[i];
}

static void s_print_lat(const char *name, long count, long n, double *x)
{
    qsort(x, (size_t)n, sizeof(double), timing_cmp);
    printf("  %-14s %7ld %9.3f %9.3f %9.3f %9.3f\n", name, count, s_pct(n, x, 0.5),
           s_pct(n, x, 0.9), s_pct(n, x, 0.99), n ? x[n - 1] : 0);
}

static int s_calibrate(soak_shared *sh, fasa_client *c)
{
    /* A sample of 256 tokens per layer (1 MiB of q and k: it fits the --max-message of
     * soak.sh), every other position of the last three quarters. */
    const int T = 256;
    float *q = s_alloc((size_t)NL * T * NH * HD * sizeof(float));
    float *k = s_alloc((size_t)NL * T * NKV * HD * sizeof(float));
    for (int l = 0; l < NL; l++) {
        synth_kv(&sh->synth[l], 0, T, k + (size_t)l * T * NKV * HD, NULL);
        for (int t = 0; t < T; t++)
            synth_query(&sh->synth[l], t, q + ((size_t)l * T + t) * NH * HD);
    }
    fasa_client_calib_opts co = {.ntip = NTIP,
                                 .window = 32,
                                 .pos_begin = T / 4,
                                 .pos_end = T,
                                 .pos_step = 2,
                                 .profile_name = SOAK_PROFILE};
    fasa_client_error e;
    const fasa_client_status st =
        fasa_client_calibrate(c, &s_geom, (uint32_t)T, q, k, &co, &sh->profile_text, &e);
    free(q);
    free(k);
    if (st) {
        fprintf(stderr, "bench_soak: calibrate: %s\n", e.msg);
        return -1;
    }
    char err[256];
    FILE *f = fmemopen(sh->profile_text, strlen(sh->profile_text), "r");
    sh->profile = f ? fasa_profile_read(f, "calibrate reply", 1u << 20, err, sizeof(err)) : NULL;
    if (f) fclose(f);
    if (!sh->profile) {
        fprintf(stderr, "bench_soak: the calibrated profile: %s\n", f ? err : "fmemopen");
        return -1;
    }
    /* How many dominant FCs calibration found among the generator's signal FCs. */
    int hit = 0, all = 0;
    for (int l = 0; l < NL; l++)
        for (int h = 0; h < NH; h++)
            for (int i = 0; i < NTIP; i++, all++)
                hit += synth_is_signal(&sh->synth[l], h / (NH / NKV),
                                       sh->profile->fcs[((size_t)l * NH + h) * NTIP + i]);
    printf("profile: calibrated on the server (%d tokens x %d layers, ntip %d, stored as \"%s\"):"
           " %d of %d dominant FCs are the generator's signal FCs\n",
           T, NL, NTIP, SOAK_PROFILE, hit, all);
    return 0;
}

static void s_usage(FILE *f)
{
    fputs("usage: bench_soak --server ENDPOINT [options]\n"
          "  --clients N       concurrent clients, each its own connection (8)\n"
          "  --requests R      requests per client in the soak (2000)\n"
          "  --warmup W        requests per client before the first memory reading (500)\n"
          "  --seed S          seed of the request mix (1)\n"
          "  --pids P0,P1,..   PIDs of the server's ranks in rank order, for VmRSS\n"
          "  --max-message B   the server's --max-message (0: no oversized requests; 0)\n"
          "  --block N         the server's --block, for the embedded reference (2048)\n"
          "  --max-tokens N    tokens per session before it is dropped (256)\n"
          "  --timeout-ms T    wait for each reply (30000)\n"
          "Exit status: 0 when every request got the expected answer, 1 otherwise.\n",
          f);
}

int main(int argc, char **argv)
{
    static soak_shared sh;
    soak_opts *o = &sh.o;
    *o = (soak_opts){.clients = 8,
                     .requests = 2000,
                     .warmup = 500,
                     .max_tokens = 256,
                     .block = FASA_DEFAULT_BLOCK,
                     .timeout_ms = 30000,
                     .seed = 1};
    static const struct option opts[] = {{"server", required_argument, 0, 's'},
                                         {"clients", required_argument, 0, 'c'},
                                         {"requests", required_argument, 0, 'r'},
                                         {"warmup", required_argument, 0, 'w'},
                                         {"seed", required_argument, 0, 'S'},
                                         {"pids", required_argument, 0, 'p'},
                                         {"max-message", required_argument, 0, 'm'},
                                         {"block", required_argument, 0, 'b'},
                                         {"max-tokens", required_argument, 0, 't'},
                                         {"timeout-ms", required_argument, 0, 'T'},
                                         {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};
    int ch;
    while ((ch = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (ch) {
        case 's':
            o->server = optarg;
            break;
        case 'c':
            o->clients = atoi(optarg);
            break;
        case 'r':
            o->requests = atoi(optarg);
            break;
        case 'w':
            o->warmup = atoi(optarg);
            break;
        case 'S':
            o->seed = strtoull(optarg, NULL, 0);
            break;
        case 'm':
            o->max_message = atol(optarg);
            break;
        case 'b':
            o->block = atoi(optarg);
            break;
        case 't':
            o->max_tokens = atoi(optarg);
            break;
        case 'T':
            o->timeout_ms = atoi(optarg);
            break;
        case 'p':
            for (char *p = optarg; *p && o->n_pids < MAX_PIDS;) {
                o->pids[o->n_pids++] = strtol(p, &p, 10);
                if (*p == ',') p++;
            }
            break;
        case 'h':
            s_usage(stdout);
            return 0;
        default:
            s_usage(stderr);
            return 2;
        }
    }
    if (!o->server || o->clients < 1 || o->clients > 256 || o->requests < 1 || o->warmup < 0 ||
        o->max_tokens < 8 || o->max_tokens > 4096 || o->block < 1 || o->timeout_ms < 1 ||
        o->max_message < 0) {
        fprintf(stderr, "bench_soak: need --server, clients 1..256, requests >= 1, "
                        "max-tokens 8..4096 (see --help)\n");
        return 2;
    }

    char err[256];
    for (int l = 0; l < NL; l++) {
        synth_cfg sc = synth_cfg_default(1 << 16);
        sc.n_heads = NH;
        sc.n_kv_heads = NKV;
        sc.head_dim = HD;
        sc.n_signal = NTIP;
        sc.seed = o->seed * 1000 + (uint64_t)l + 1;
        if (synth_init(&sh.synth[l], &sc, err, sizeof(err))) {
            fprintf(stderr, "bench_soak: %s\n", err);
            return 1;
        }
    }
    fasa_client *c;
    fasa_client_error e;
    fasa_client_server_info info;
    if (fasa_client_connect(o->server, o->timeout_ms, &c, &e) || fasa_client_ping(c, &info, &e)) {
        fprintf(stderr, "bench_soak: %s: %s\n", o->server, e.msg);
        return 1;
    }
    sh.n_shards = (int)info.n_shards;
    printf("server %s: %s, %u ranks, %u shards; %d clients x %d requests (+%d warm-up), "
           "seed %llu\n",
           o->server, info.version, info.n_ranks, info.n_shards, o->clients, o->requests, o->warmup,
           (unsigned long long)o->seed);
    if (o->n_pids && o->n_pids != (int)info.n_ranks)
        printf("note: %d PIDs given for %u ranks\n", o->n_pids, info.n_ranks);
    if (s_calibrate(&sh, c)) return 1;

    pthread_barrier_init(&sh.gate, NULL, (unsigned)o->clients + 1);
    soak_client *cls = s_alloc((size_t)o->clients * sizeof(soak_client));
    pthread_t *th = s_alloc((size_t)o->clients * sizeof(pthread_t));
    const size_t kv_max = (size_t)NL * (o->max_tokens + 32) * NKV * HD;
    for (int i = 0; i < o->clients; i++) {
        soak_client *cl = &cls[i];
        cl->idx = i;
        cl->sh = &sh;
        /* Each client's stream starts at a hashed state (streams started a fixed number of
         * increments apart would be shifted copies of one another). */
        uint64_t x = (o->seed << 20) + (uint64_t)i;
        cl->rng = s_next(&x);
        for (int k = 0; k < K_N; k++) cl->lat[k] = s_alloc((size_t)o->requests * sizeof(double));
        cl->k = s_alloc(kv_max * sizeof(float));
        cl->v = s_alloc(kv_max * sizeof(float));
        cl->q = s_alloc((size_t)NH * HD * sizeof(float));
        cl->out = s_alloc((size_t)NH * HD * sizeof(float));
        cl->ref = s_alloc((size_t)NH * HD * sizeof(float));
        cl->sel = s_alloc((size_t)NH * 64 * sizeof(int32_t));
        cl->sel_ref = s_alloc((size_t)NH * 64 * sizeof(int32_t));
        cl->bq = s_alloc((size_t)NL * NH * HD * sizeof(float));
        cl->bout = s_alloc((size_t)NL * NH * HD * sizeof(float));
        cl->bsel = s_alloc((size_t)NL * NH * 64 * sizeof(int32_t));
        cl->logit = s_alloc((size_t)(o->max_tokens + 32) * sizeof(double));
        cl->eng = fasa_engine_new(sh.n_shards, o->block);
        cl->zctx = zmq_ctx_new();
        if (!cl->eng || !cl->zctx) {
            fprintf(stderr, "bench_soak: out of memory\n");
            return 1;
        }
        if (fasa_client_connect(o->server, o->timeout_ms, &cl->c, &e)) {
            fprintf(stderr, "bench_soak: connect: %s\n", e.msg);
            return 1;
        }
        cl->raw = s_dealer(cl);
    }
    fasa_client_stats st0 = {0}, st1 = {0}, st2 = {0};
    for (int i = 0; i < o->clients; i++) pthread_create(&th[i], NULL, s_client_main, &cls[i]);

    long rss[3][MAX_PIDS], tot[3];
    pthread_barrier_wait(&sh.gate); /* warm-up done */
    tot[0] = s_print_rss(o, "after warm-up:", rss[0]);
    if (fasa_client_get_stats(c, NULL, &st0, &e))
        fprintf(stderr, "bench_soak: stats: %s\n", e.msg);
    else
        s_print_held(&st0);
    const double t0 = timing_now();
    pthread_barrier_wait(&sh.gate);
    /* Memory along the way: at every tenth of the requests. */
    enum { N_MARKS = 10 };
    long mark_kb[N_MARKS][MAX_PIDS], mark_tot[N_MARKS] = {0};
    const long n_req = (long)o->clients * o->requests;
    for (int m = 0; m < N_MARKS - 1 && o->n_pids;) {
        if (atomic_load(&sh.done) >= n_req * (m + 1) / N_MARKS) {
            for (int i = 0; i < o->n_pids; i++) {
                mark_kb[m][i] = s_rss_kb(o->pids[i]);
                mark_tot[m] += mark_kb[m][i] > 0 ? mark_kb[m][i] : 0;
            }
            m++;
        } else {
            nanosleep(&(struct timespec){0, 20000000}, NULL);
        }
    }
    pthread_barrier_wait(&sh.gate); /* soak done */
    const double wall = timing_now() - t0;
    tot[1] = s_print_rss(o, "after the soak:", rss[1]);
    if (o->n_pids) {
        for (int i = 0; i < o->n_pids; i++) mark_kb[N_MARKS - 1][i] = rss[1][i];
        mark_tot[N_MARKS - 1] = tot[1];
        printf("  during the soak, at 10%%, 20%%, .. 100%% of the requests (MiB):\n    all ranks:");
        for (int m = 0; m < N_MARKS; m++) printf(" %.1f", mark_tot[m] / 1024.0);
        for (int i = 0; i < o->n_pids; i++) {
            printf("\n    rank %d:   ", i);
            for (int m = 0; m < N_MARKS; m++) printf(" %.1f", mark_kb[m][i] / 1024.0);
        }
        printf("\n");
    }
    if (fasa_client_get_stats(c, NULL, &st1, &e))
        fprintf(stderr, "bench_soak: stats: %s\n", e.msg);
    else
        s_print_held(&st1);
    pthread_barrier_wait(&sh.gate);
    pthread_barrier_wait(&sh.gate); /* drops done */
    tot[2] = s_print_rss(o, "after the drops:", rss[2]);
    long extra_unexpected = 0;
    if (fasa_client_get_stats(c, NULL, &st2, &e)) {
        fprintf(stderr, "bench_soak: stats: %s\n", e.msg);
        extra_unexpected++;
    } else {
        s_print_held(&st2);
    }
    if (st2.n_sessions != 0 || st2.kv_bytes != 0) {
        printf("unexpected: after every drop the server holds %u sessions, %llu KV bytes\n",
               st2.n_sessions, (unsigned long long)st2.kv_bytes);
        extra_unexpected++;
    }
    for (int i = 0; i < o->clients; i++) pthread_join(th[i], NULL);
    /* Flat RSS: over the soak the ranks may grow by what they were given to hold (the KV
     * bytes appended, twice over for the shards' growth-by-doubling buffers) plus a fixed
     * SOAK_RSS_SLACK_MIB for the allocator's arenas and the ZeroMQ buffers of the clients'
     * connections (bounded by the server's queue: 64 requests of --max-message). More is a
     * leak; so is memory still held after every session was dropped beyond the warm-up's
     * level plus the same slack. */
    if (o->n_pids && tot[0] > 0) {
        const long slack_kb = SOAK_RSS_SLACK_MIB * 1024L;
        const long held_kb =
            st1.kv_bytes > st0.kv_bytes ? (long)((st1.kv_bytes - st0.kv_bytes) / 1024) : 0;
        const long bound_kb = tot[0] + 2 * held_kb + slack_kb;
        printf("flat RSS: after the soak %.1f MiB <= %.1f MiB (warm-up %.1f + 2 x %.1f MiB KV "
               "added + %d MiB slack): %s; after the drops %.1f MiB <= %.1f MiB: %s\n",
               tot[1] / 1024.0, bound_kb / 1024.0, tot[0] / 1024.0, held_kb / 1024.0,
               SOAK_RSS_SLACK_MIB, tot[1] <= bound_kb ? "ok" : "EXCEEDED", tot[2] / 1024.0,
               (tot[0] + slack_kb) / 1024.0, tot[2] <= tot[0] + slack_kb ? "ok" : "EXCEEDED");
        if (tot[1] > bound_kb) {
            printf("unexpected: server RSS grew past its bound during the soak\n");
            extra_unexpected++;
        }
        if (tot[2] > tot[0] + slack_kb) {
            printf("unexpected: server RSS after the drops is past the warm-up's + slack\n");
            extra_unexpected++;
        }
    }
    if (o->n_pids && tot[0] > 0) {
        printf("server RSS after the soak / after warm-up: %.3f; after the drops / after warm-up: "
               "%.3f\n",
               (double)tot[1] / tot[0], (double)tot[2] / tot[0]);
        for (int i = 0; i < o->n_pids; i++)
            printf("  rank %d (pid %ld): %.1f -> %.1f -> %.1f MiB (x%.3f)\n", i, o->pids[i],
                   rss[0][i] / 1024.0, rss[1][i] / 1024.0, rss[2][i] / 1024.0,
                   rss[0][i] > 0 ? (double)rss[1][i] / rss[0][i] : 0.0);
    }

    /* Aggregate. */
    long count[K_N] = {0}, bad[B_N] = {0}, n_lat[K_N] = {0}, unexpected = extra_unexpected,
         unexpected_w = 0, verified = 0, dense_checked = 0, total = 0, bad_at_server = 0,
         bad_items = 0;
    double max_diff = 0, max_dense = 0;
    double *lat[K_N], *all = s_alloc((size_t)o->clients * o->requests * sizeof(double));
    long n_all = 0;
    for (int k = 0; k < K_N; k++)
        lat[k] = s_alloc((size_t)o->clients * o->requests * sizeof(double));
    for (int i = 0; i < o->clients; i++) {
        soak_client *cl = &cls[i];
        for (int k = 0; k < K_N; k++) {
            memcpy(lat[k] + n_lat[k], cl->lat[k], (size_t)cl->n_lat[k] * sizeof(double));
            memcpy(all + n_all, cl->lat[k], (size_t)cl->n_lat[k] * sizeof(double));
            n_lat[k] += cl->n_lat[k];
            n_all += cl->n_lat[k];
        }
        for (int k = 0; k < K_N; k++) count[k] += cl->count[k];
        for (int b = 0; b < B_N; b++) bad[b] += cl->bad_count[b];
        unexpected += cl->unexpected;
        bad_at_server += cl->bad_at_server;
        bad_items += cl->bad_items;
        unexpected_w += cl->unexpected_warmup;
        verified += cl->verified;
        dense_checked += cl->dense_checked;
        if (cl->max_diff > max_diff) max_diff = cl->max_diff;
        if (cl->max_dense_diff > max_dense) max_dense = cl->max_dense_diff;
    }
    for (int k = 0; k < K_N; k++) total += count[k];

    printf("\nsoak phase: requests and round-trip latency in ms (oversized requests not timed)\n"
           "  kind             count       p50       p90       p99       max\n");
    s_print_lat("all", total, n_all, all);
    for (int k = 0; k < K_N; k++) s_print_lat(s_kind_name[k], count[k], n_lat[k], lat[k]);
    printf("bad requests by case:");
    for (int b = 0; b < B_N; b++) printf("%s %s %ld", b ? "," : "", s_bad_name[b], bad[b]);
    printf("; and %ld batch items that fail alone (wrong q shape, unknown session)", bad_items);
    printf("\nthroughput: %ld requests in %.2f s = %.0f requests/s (%d clients)\n", total, wall,
           total / wall, o->clients);
    printf("checked (warm-up included): %ld attend outputs against the embedded engine (max |diff| "
           "%.3g), %ld dense "
           "ones against naive exact attention (max |diff| %.3g)\n",
           verified, max_diff, dense_checked, max_dense);
    /* The server's own counters: every failure it counted is one of the bad requests. */
    if (st0.requests && st1.requests) {
        const uint64_t errs = st1.errors - st0.errors;
        printf("server counters over the soak: %llu requests, %llu errors; the clients sent %ld "
               "bad requests that reach the server\n",
               (unsigned long long)(st1.requests - st0.requests), (unsigned long long)errs,
               bad_at_server);
        if (errs != (uint64_t)bad_at_server) {
            printf("unexpected: the server counted %llu errors for %ld bad requests\n",
                   (unsigned long long)errs, bad_at_server);
            unexpected++;
        }
    }
    if (unexpected + unexpected_w) {
        /* The first few of each client, at most 12 lines. */
        printf("unexpected errors (the first ones):\n");
        int shown = 0;
        for (int j = 0; j < SOAK_FIRST && shown < 12; j++)
            for (int i = 0; i < o->clients && shown < 12; i++)
                if (j < cls[i].n_first) {
                    printf("  %s\n", cls[i].first[j]);
                    shown++;
                }
    }
    if (unexpected_w)
        printf("outside the soak (warm-up, final drops): %ld unexpected errors\n", unexpected_w);
    printf("soak: %ld requests, %ld unexpected errors\n", total, unexpected + unexpected_w);

    fasa_client_stats_free(&st0);
    fasa_client_stats_free(&st1);
    fasa_client_stats_free(&st2);
    for (int i = 0; i < o->clients; i++) {
        soak_client *cl = &cls[i];
        fasa_client_close(&cl->c);
        zmq_close(cl->raw);
        zmq_ctx_term(cl->zctx);
        fasa_engine_destroy(&cl->eng);
        for (int k = 0; k < K_N; k++) free(cl->lat[k]);
        free(cl->k);
        free(cl->v);
        free(cl->q);
        free(cl->out);
        free(cl->ref);
        free(cl->sel);
        free(cl->sel_ref);
        free(cl->bq);
        free(cl->bout);
        free(cl->bsel);
        free(cl->logit);
    }
    for (int k = 0; k < K_N; k++) free(lat[k]);
    free(all);
    free(cls);
    free(th);
    fasa_client_close(&c);
    free(sh.profile_text);
    fasa_profile_destroy(&sh.profile);
    for (int l = 0; l < NL; l++) synth_free(&sh.synth[l]);
    pthread_barrier_destroy(&sh.gate);
    return unexpected + unexpected_w ? 1 : 0;
}

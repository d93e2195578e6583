/* The MPI transport against the in-process one. Run under mpiexec with N >= 2 ranks: rank 0
 * runs the Check suite over an engine whose shards are ranks 1..N-1 (N - 1 shards), and the
 * other ranks serve it with worker_mpi_loop. Every test replays the same steps on that
 * engine and on in-process engines with N - 1 shards and with 1 shard, and holds them to
 * the same selections and outputs within float rounding (DESIGN.md "One decode step across
 * ranks").
 *
 * Check must run in no-fork mode here: a forked child touching Open MPI's shared-memory
 * state crashes (ecosystem-notes §5.3), so the code sets it rather than the environment.
 *
 * With FASA_MPI_IDLE_SECONDS=S set, the binary runs no tests: rank 0 makes the transport,
 * sleeps S seconds and destroys it, and every rank prints the CPU it used meanwhile, which
 * measures what idle workers cost. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include <mpi.h>

#include "env.h"
#include "attn.h"
#include "ca.h"
#include "engine.h"
#include "qkv.h"
#include "snapshot.h"
#include "scan.h"
#include "simd.h"
#include "test_util.h"
#include "transport_mpi.h"
#include "worker_mpi_wire.h"
#include "worker_mpi.h"
#include "worker_mpi_wire.h"

#ifndef FASA_SHARED_DIR
#define FASA_SHARED_DIR "../shared"
#endif

/* Small placement blocks, so every worker holds many blocks of every sequence. */
#define MPI_TEST_BLOCK 64

static MPI_Comm s_comm;             /* the transport's communicator (a dup of MPI_COMM_WORLD) */
static int s_n_workers;             /* ranks - 1: shards of the MPI engine */
static fasa_engine_t *s_mpi;        /* rank 0: the engine over the workers, shared by the tests */
static double s_worst_n, s_worst_1; /* largest output differences seen, for the summary */

/* The MPI engine's transport is the MPI one behind this counter, so a test can tell
 * whether an engine call reached the workers at all. */
typedef struct counted {
    fasa_transport inner; /* the MPI transport, owned */
    long ops;             /* operations forwarded so far */
    /* stage_off: a step's k_new goes as an APPEND of its own (the engine's path without
     * stage_append: two exchanges for a dense step, three for a sparse one) instead of riding
     * along with the step's first phase (SCORE_KNEW / ATTEND_KNEW). */
    int stage_off, staged_ok;
} counted;

static counted s_counted;

static int s_c_session_new(void *ctx, int sid, const shard_layout *layout)
{
    counted *c = ctx;
    c->ops++;
    return c->inner.session_new(c->inner.ctx, sid, layout);
}

static void s_c_session_drop(void *ctx, int sid)
{
    counted *c = ctx;
    c->ops++;
    c->inner.session_drop(c->inner.ctx, sid);
}

static int s_c_append(void *ctx, int sid, int shard, int layer, int n, const int32_t *pos,
                      const float *k, const float *v)
{
    counted *c = ctx;
    c->ops++;
    return c->inner.append(c->inner.ctx, sid, shard, layer, n, pos, k, v);
}

static int s_c_append_runs(void *ctx, int sid, int dtype, int n_runs, const fasa_append_run *runs)
{
    counted *c = ctx;
    c->ops++;
    return c->inner.append_runs(c->inner.ctx, sid, dtype, n_runs, runs);
}

static int s_c_score(void *ctx, int sid, const shard_step *st, topk_cand *cands, int *n_cands)
{
    counted *c = ctx;
    c->ops++;
    return c->inner.score(c->inner.ctx, sid, st, cands, n_cands);
}

static int s_c_attend(void *ctx, int sid, const shard_step *st, const topk_cand *thr,
                      const uint8_t *have_thr, float *m, double *l, double *o, double *aux,
                      int64_t *bytes_p)
{
    counted *c = ctx;
    c->ops++;
    return c->inner.attend(c->inner.ctx, sid, st, thr, have_thr, m, l, o, aux, bytes_p);
}

static int s_c_score_attend(void *ctx, int sid, const shard_step *st, topk_cand *cands,
                            int *n_cands, float *m, double *l, double *o, double *aux,
                            int64_t *bytes_p)
{
    counted *c = ctx;
    c->ops++;
    return c->inner.score_attend(c->inner.ctx, sid, st, cands, n_cands, m, l, o, aux, bytes_p);
}

static int s_c_shard_stats(void *ctx, int sid, fasa_shard_stats *out)
{
    counted *c = ctx;
    c->ops++;
    return c->inner.shard_stats(c->inner.ctx, sid, out);
}

static int s_c_snapshot(void *ctx, int sid, const char *prefix, const char *id, int dtype,
                        shard_snap_info *out)
{
    counted *c = ctx;
    c->ops++;
    return c->inner.snapshot(c->inner.ctx, sid, prefix, id, dtype, out);
}

static int s_c_stage_append(void *ctx, int sid, int shard, int layer, int32_t pos, const float *k,
                            const float *v)
{
    counted *c = ctx;
    if (!c->stage_off) return c->inner.stage_append(c->inner.ctx, sid, shard, layer, pos, k, v);
    c->ops++;
    c->staged_ok = c->inner.append(c->inner.ctx, sid, shard, layer, 1, &pos, k, v) == 0;
    return 0;
}

static int s_c_staged_appended(void *ctx)
{
    counted *c = ctx;
    if (!c->stage_off) return c->inner.staged_appended(c->inner.ctx);
    const int ok = c->staged_ok;
    c->staged_ok = 0;
    return ok;
}

static void s_c_destroy(void *ctx)
{
    counted *c = ctx;
    c->inner.destroy(c->inner.ctx);
}

static const char *s_shared_dir(void)
{
    const char *env = getenv("FASA_SHARED_DIR");
    return env && *env ? env : FASA_SHARED_DIR;
}

/* ---- replaying decode steps on an engine ---- */

typedef struct replay {
    int nl, nh, nkv, d, T; /* geometry; tokens available */
    fc_pairing pairing;
    fasa_method method; /* session default */
    fasa_gqa gqa;
    int budget;
    const fasa_profile *profile;                 /* NULL: calibration-free session */
    const float *const *q, *const *k, *const *v; /* (nl) -> (T, heads, d) */
    int prefix;                                  /* positions appended before the first step */
    int pos_step;    /* steps at t = prefix, prefix + pos_step, ... < T */
    int back;        /* each step also attends with max_pos = t - back, nothing appended */
    int score_dtype; /* scan_dtype (kernels/scan.h), 0 auto */
} replay;

typedef struct replay_out {
    int n_att;              /* attends recorded: steps * nl * 2 */
    float *out;             /* (n_att, nh, d) */
    int32_t *sel;           /* (n_att, nh, budget) */
    int64_t *bytes;         /* (n_att) KV bytes read */
    fasa_step_stats *stats; /* (n_att) each step's stats, the phase times zeroed, or NULL */
} replay_out;

static void s_out_init(const replay *c, replay_out *o)
{
    const int steps = (c->T - c->prefix + c->pos_step - 1) / c->pos_step;
    o->n_att = steps * c->nl * 2;
    o->out = test_alloc((size_t)o->n_att * c->nh * c->d * sizeof(float));
    o->sel = test_alloc((size_t)o->n_att * c->nh * c->budget * sizeof(int32_t));
    o->bytes = test_alloc((size_t)o->n_att * sizeof(int64_t));
    o->stats = test_alloc((size_t)o->n_att * sizeof(fasa_step_stats));
}

static void s_out_cleanup(replay_out *o)
{
    free(o->out);
    free(o->sel);
    free(o->bytes);
    free(o->stats);
}

static void s_create(fasa_engine_t *e, const char *id, const replay *c)
{
    const fasa_session_config cfg = {.n_layers = c->nl,
                                     .n_heads = c->nh,
                                     .n_kv_heads = c->nkv,
                                     .head_dim = c->d,
                                     .pairing = c->pairing,
                                     .profile = c->profile,
                                     .method = c->method,
                                     .budget = c->budget,
                                     .gqa = c->gqa,
                                     .score_dtype = c->score_dtype};
    fasa_error err;
    ck_assert_msg(fasa_engine_create(e, id, &cfg, &err) == FASA_OK, "create %s: %s", id, err.msg);
}

/* Appends positions from .. to - 1 of layer l. */
static void s_append(fasa_engine_t *e, const char *id, const replay *c, int l, int from, int to)
{
    if (to <= from) return;
    const size_t row = (size_t)c->nkv * c->d;
    fasa_error err;
    ck_assert_msg(fasa_engine_append(e, id, l, from, to - from, c->k[l] + from * row,
                                     c->v[l] + from * row, &err) == FASA_OK,
                  "append %s: %s", id, err.msg);
}

/* One attend of layer l at position t into slot a of o: with k_new (position t appended
 * first) or with the visible range cut at max_pos. */
static void s_attend(fasa_engine_t *e, const char *id, const replay *c, int l, int t, int k_new,
                     int32_t max_pos, replay_out *o, int a)
{
    const size_t row = (size_t)c->nkv * c->d;
    const fasa_attend_req req = {.layer = l,
                                 .q = c->q[l] + (size_t)t * c->nh * c->d,
                                 .k_new = k_new ? c->k[l] + t * row : NULL,
                                 .v_new = k_new ? c->v[l] + t * row : NULL,
                                 .method = -1,
                                 .gqa = -1,
                                 .max_pos = max_pos};
    fasa_step_stats stats;
    fasa_error err;
    ck_assert_msg(fasa_engine_attend(e, id, &req, o->out + (size_t)a * c->nh * c->d,
                                     o->sel + (size_t)a * c->nh * c->budget, &stats,
                                     &err) == FASA_OK,
                  "attend %s layer %d t %d: %s", id, l, t, err.msg);
    o->bytes[a] = stats.bytes_read;
    stats.score_us = stats.merge_us = stats.attend_us = 0;
    if (o->stats) o->stats[a] = stats; /* NULL in a one-step replay_out */
}

/* Creates session id, replays c's steps into o, drops the session. */
static void s_replay(fasa_engine_t *e, const char *id, const replay *c, replay_out *o)
{
    s_create(e, id, c);
    for (int l = 0; l < c->nl; l++) s_append(e, id, c, l, 0, c->prefix);
    int a = 0;
    for (int t = c->prefix; t < c->T; t += c->pos_step)
        for (int l = 0; l < c->nl; l++) {
            s_append(e, id, c, l, fasa_engine_length(e, id, l), t);
            s_attend(e, id, c, l, t, 1, -1, o, a++);
            s_attend(e, id, c, l, t, 0, t - c->back > 0 ? t - c->back : 0, o, a++);
        }
    ck_assert_int_eq(a, o->n_att);
    fasa_error err;
    ck_assert_int_eq(fasa_engine_drop(e, id, &err), FASA_OK);
}

/* Replays c over MPI and in process with n_workers and with 1 shard: selections and bytes
 * read agree exactly, outputs within 1e-6. */
static void s_check_agree(const replay *c, const char *what)
{
    replay_out om, on, o1;
    s_out_init(c, &om);
    s_out_init(c, &on);
    s_out_init(c, &o1);
    s_replay(s_mpi, "agree", c, &om);
    fasa_engine_t *e = fasa_engine_new(s_n_workers, MPI_TEST_BLOCK);
    ck_assert_ptr_nonnull(e);
    s_replay(e, "agree", c, &on);
    fasa_engine_destroy(&e);
    e = fasa_engine_new(1, MPI_TEST_BLOCK);
    ck_assert_ptr_nonnull(e);
    s_replay(e, "agree", c, &o1);
    fasa_engine_destroy(&e);

    const size_t no = (size_t)om.n_att * c->nh * c->d, ns = (size_t)om.n_att * c->nh * c->budget;
    const double dn = test_max_abs_diff(no, om.out, on.out);
    const double d1 = test_max_abs_diff(no, om.out, o1.out);
    printf("mpi %d workers, %s: max |diff| %.3g vs %d in-process shards, %.3g vs 1\n", s_n_workers,
           what, dn, s_n_workers, d1);
    ck_assert_double_le(dn, 1e-6);
    ck_assert_double_le(d1, 1e-6);
    ck_assert_mem_eq(om.sel, on.sel, ns * sizeof(int32_t));
    ck_assert_mem_eq(om.sel, o1.sel, ns * sizeof(int32_t));
    ck_assert_mem_eq(om.bytes, on.bytes, (size_t)om.n_att * sizeof(int64_t));
    if (dn > s_worst_n) s_worst_n = dn;
    if (d1 > s_worst_1) s_worst_1 = d1;

    /* Not vacuous: the outputs carry signal, and a sparse step selected something. */
    double mag = 0;
    for (size_t i = 0; i < no; i++) mag = fmax(mag, fabs(om.out[i]));
    ck_assert_double_gt(mag, 1e-3);
    int selected = 0;
    for (size_t i = 0; i < ns; i++) selected += om.sel[i] >= 0;
    if (c->method != FASA_METHOD_DENSE) ck_assert_int_gt(selected, 0);
    s_out_cleanup(&om);
    s_out_cleanup(&on);
    s_out_cleanup(&o1);
}

/* ---- random data ---- */

typedef struct dataset {
    int nl;
    float *q[4], *k[4], *v[4]; /* (nl) -> (T, heads, d) */
} dataset;

static void s_data_init(dataset *ds, int nl, int nh, int nkv, int d, int T, uint64_t seed)
{
    test_rng r = {seed};
    ds->nl = nl;
    for (int l = 0; l < nl; l++) {
        const size_t nq = (size_t)T * nh * d, nk = (size_t)T * nkv * d;
        ds->q[l] = test_alloc(nq * sizeof(float));
        ds->k[l] = test_alloc(nk * sizeof(float));
        ds->v[l] = test_alloc(nk * sizeof(float));
        test_fill(&r, nq, ds->q[l], 1.0f);
        test_fill(&r, nk, ds->k[l], 1.0f);
        test_fill(&r, nk, ds->v[l], 1.0f);
        /* Exact copies of the first key row, on many shards: score ties across ranks. */
        for (int t = 97; t < T; t += 61)
            memcpy(ds->k[l] + (size_t)t * nkv * d, ds->k[l], (size_t)nkv * d * sizeof(float));
    }
}

static void s_data_cleanup(dataset *ds)
{
    for (int l = 0; l < ds->nl; l++) free(ds->q[l]), free(ds->k[l]), free(ds->v[l]);
}

static replay s_replay_of(const dataset *ds, int nh, int nkv, int d, int T)
{
    return (replay){.nl = ds->nl,
                    .nh = nh,
                    .nkv = nkv,
                    .d = d,
                    .T = T,
                    .q = (const float *const *)ds->q,
                    .k = (const float *const *)ds->k,
                    .v = (const float *const *)ds->v};
}

/* A profile whose dominant FCs come from a seeded pseudo-random CA per head (per KV group
 * when shared, as calibration would make them). */
static fasa_profile *s_profile(int nl, int nh, int nkv, int d, int ntip, fc_pairing pairing,
                               int shared, uint64_t seed)
{
    fasa_profile *p = fasa_profile_new(nl, nh, nkv, d, ntip);
    ck_assert_ptr_nonnull(p);
    const int n_fc = d / 2, grp = nh / nkv;
    test_rng r = {seed};
    for (int l = 0; l < nl; l++)
        for (int h = 0; h < nh; h++) {
            double *ca = p->ca + ((size_t)l * nh + h) * n_fc;
            if (shared && h % grp)
                memcpy(ca, ca - (size_t)(h % grp) * n_fc, (size_t)n_fc * sizeof(double));
            else
                for (int f = 0; f < n_fc; f++) ca[f] = (double)(test_next(&r) % 1000) / 1000.0;
            ca_select(n_fc, ntip, ca, p->fcs + ((size_t)l * nh + h) * ntip);
        }
    p->pairing = pairing;
    p->gqa_shared = shared;
    p->window = 32;
    return p;
}

/* (a) Calibration-free sessions: dense, oracle and the stream, quest and sparq baselines,
 * per-head and shared GQA (sparq: per-head only), budgets below,
 * between and above the visible tokens, each step with k_new and with max_pos cut back. */
START_TEST(test_mpi_plain_agree)
{
    enum { NL = 2, NH = 8, NKV = 2, D = 16, T = 700 };
    dataset ds;
    s_data_init(&ds, NL, NH, NKV, D, T, 41);
    const int budgets[] = {24, 400, 4096};
    for (int m = FASA_METHOD_DENSE; m <= FASA_METHOD_LAST; m++)
        for (int g = 0; g < 2; g++)
            for (int b = 0; b < 3; b++) {
                if (m == FASA_METHOD_SPARQ && g) continue; /* sparq: per-head gqa only */
                if (m == FASA_METHOD_FASA_PLUS) continue;  /* needs a profile: below */
                replay c = s_replay_of(&ds, NH, NKV, D, T);
                c.method = (fasa_method)m;
                c.gqa = (fasa_gqa)g;
                c.budget = budgets[b];
                c.prefix = 563;
                c.pos_step = 10;
                c.back = 350;
                char what[96];
                snprintf(what, sizeof(what), "%s %s B=%d", fasa_method_name(c.method),
                         g ? "shared" : "per-head", c.budget);
                s_check_agree(&c, what);
            }
    s_data_cleanup(&ds);
}
END_TEST

/* (b) fasa with a profile (dominant FCs packed on the workers), next to oracle and dense on
 * the same session layout; both pairings, per-head and shared GQA. */
START_TEST(test_mpi_fasa_agree)
{
    enum { NL = 3, NH = 4, NKV = 2, D = 16, T = 600 };
    dataset ds;
    s_data_init(&ds, NL, NH, NKV, D, T, 43);
    for (int shared = 0; shared < 2; shared++) {
        const fc_pairing pairing = shared ? FC_PAIRING_HALF : FC_PAIRING_INTERLEAVED;
        fasa_profile *p = s_profile(NL, NH, NKV, D, 3, pairing, shared, 7 + shared);
        for (int m = 0; m <= FASA_METHOD_FASA_PLUS; m++)
            for (int budget = 20; budget <= 300; budget += 280) {
                /* fasa, dense, oracle, and fasa-plus (per-head only) */
                if ((m > FASA_METHOD_ORACLE && m != FASA_METHOD_FASA_PLUS) ||
                    (m == FASA_METHOD_FASA_PLUS && shared))
                    continue;
                replay c = s_replay_of(&ds, NH, NKV, D, T);
                c.pairing = pairing;
                c.profile = p;
                c.method = (fasa_method)m;
                c.gqa = (fasa_gqa)shared;
                c.budget = budget;
                c.prefix = 450;
                c.pos_step = 13;
                c.back = 200;
                char what[96];
                snprintf(what, sizeof(what), "profile %s %s B=%d", fasa_method_name(c.method),
                         shared ? "shared" : "per-head", budget);
                s_check_agree(&c, what);
            }
        /* The scoring stores the workers build themselves (SESSION_NEW carries the score
         * dtype): int8 and bf16 select as in-process. */
        const int sds[2] = {SCAN_I8, SCAN_BF16};
        for (int si = 0; si < 2; si++) {
            replay c = s_replay_of(&ds, NH, NKV, D, T);
            c.pairing = pairing;
            c.profile = p;
            c.method = FASA_METHOD_FASA;
            c.gqa = (fasa_gqa)shared;
            c.budget = 20;
            c.prefix = 450;
            c.pos_step = 37;
            c.back = 200;
            c.score_dtype = sds[si];
            char what[96];
            snprintf(what, sizeof(what), "profile fasa %s score dtype %s",
                     shared ? "shared" : "per-head", scan_dtype_name(sds[si]));
            s_check_agree(&c, what);
        }
        fasa_profile_destroy(&p);
    }
    s_data_cleanup(&ds);
}
END_TEST

/* (b2) A decode step's k_new riding along with its first phase (SCORE_KNEW, ATTEND_KNEW:
 * one exchange for a dense step, two for a sparse one) against the same steps with k_new
 * appended by an exchange of its own: the same bits (outputs, selections, bytes read), and
 * both as in-process (s_check_agree). And the exchanges a step costs either way. */
START_TEST(test_mpi_knew_one_exchange)
{
    enum { NL = 2, NH = 4, NKV = 2, D = 16, T = 500 };
    dataset ds;
    s_data_init(&ds, NL, NH, NKV, D, T, 47);
    fasa_profile *p = s_profile(NL, NH, NKV, D, 3, FC_PAIRING_INTERLEAVED, 0, 11);
    const fasa_method methods[] = {FASA_METHOD_DENSE, FASA_METHOD_FASA, FASA_METHOD_ORACLE,
                                   FASA_METHOD_STREAM};
    for (int mi = 0; mi < 4; mi++)
        for (int budget = 24; budget <= 600; budget += 576) {
            replay c = s_replay_of(&ds, NH, NKV, D, T);
            c.profile = p;
            c.method = methods[mi];
            c.budget = budget; /* 600: every step dense (all visible tokens fit) */
            c.prefix = 380;
            c.pos_step = 7;
            c.back = 150;
            replay_out on, off;
            s_out_init(&c, &on);
            s_out_init(&c, &off);
            s_replay(s_mpi, "knew", &c, &on);
            s_counted.stage_off = 1;
            s_replay(s_mpi, "knew", &c, &off);
            s_counted.stage_off = 0;
            const size_t no = (size_t)on.n_att * c.nh * c.d,
                         ns = (size_t)on.n_att * c.nh * c.budget;
            ck_assert_mem_eq(on.out, off.out, no * sizeof(float));
            ck_assert_mem_eq(on.sel, off.sel, ns * sizeof(int32_t));
            ck_assert_mem_eq(on.bytes, off.bytes, (size_t)on.n_att * sizeof(int64_t));
            s_out_cleanup(&on);
            s_out_cleanup(&off);
            char what[96];
            snprintf(what, sizeof(what), "k_new with the phase, %s B=%d",
                     fasa_method_name(c.method), budget);
            s_check_agree(&c, what);
        }
    /* Exchanges per step with k_new: dense 1 (2 without), sparse 2 (3 without). */
    replay c = s_replay_of(&ds, NH, NKV, D, T);
    c.profile = p;
    c.method = FASA_METHOD_FASA;
    c.budget = 24;
    s_create(s_mpi, "count", &c);
    s_append(s_mpi, "count", &c, 1, 0, 300);
    const size_t row = (size_t)NKV * D;
    float out[NH * D];
    fasa_error err;
    for (int off = 0; off < 2; off++)
        for (int dense = 0; dense < 2; dense++) {
            s_counted.stage_off = off;
            const int32_t t = fasa_engine_length(s_mpi, "count", 1);
            const fasa_attend_req req = {.layer = 1,
                                         .q = c.q[1] + (size_t)t * NH * D,
                                         .k_new = c.k[1] + t * row,
                                         .v_new = c.v[1] + t * row,
                                         .method = dense ? FASA_METHOD_DENSE : -1,
                                         .gqa = -1,
                                         .max_pos = -1};
            const long ops = s_counted.ops;
            ck_assert_int_eq(fasa_engine_attend(s_mpi, "count", &req, out, NULL, NULL, &err),
                             FASA_OK);
            /* One worker: a sparse step is one exchange too (score and attend in one). */
            ck_assert_int_eq(s_counted.ops - ops, (dense || s_n_workers == 1 ? 1 : 2) + off);
            ck_assert_int_eq(fasa_engine_length(s_mpi, "count", 1), t + 1);
        }
    s_counted.stage_off = 0;
    ck_assert_int_eq(fasa_engine_drop(s_mpi, "count", &err), FASA_OK);
    fasa_profile_destroy(&p);
    s_data_cleanup(&ds);
}
END_TEST

/* Every output, selection and stat of two replays the same bits. */
static void s_same_bits(const replay *c, const replay_out *a, const replay_out *b, const char *what)
{
    const size_t no = (size_t)a->n_att * c->nh * c->d, ns = (size_t)a->n_att * c->nh * c->budget;
    ck_assert_msg(!memcmp(a->out, b->out, no * sizeof(float)), "%s: outputs differ", what);
    ck_assert_msg(!memcmp(a->sel, b->sel, ns * sizeof(int32_t)), "%s: selections differ", what);
    for (int i = 0; i < a->n_att; i++) {
        const fasa_step_stats *x = &a->stats[i], *y = &b->stats[i];
        ck_assert_msg(x->bytes_read == y->bytes_read && x->method_used == y->method_used &&
                          x->n_visible == y->n_visible && x->merge_used == y->merge_used &&
                          x->local_budget == y->local_budget,
                      "%s: stats of step %d differ", what, i);
        ck_assert_int_eq(x->merge_used, FASA_MERGE_EXACT);
        ck_assert_int_eq(x->local_budget, 0);
    }
}

/* (b3) A sparse step whose visible rows are all on one shard (one worker, or every visible
 * position in the first placement block) scores and attends in one exchange (SCORE_ATTEND,
 * SCORE_ATTEND_KNEW): the same bits (outputs, selections, stats) as the two-exchange path
 * (fasa_engine_set_one_exchange off), for every method, on the workers and in process, a
 * short context (every step on shard 0 whatever the workers) and a long one (one shard only
 * with one worker, or when max_pos is cut back into the first block), and the exchanges a
 * step costs. */
START_TEST(test_mpi_one_exchange)
{
    enum { NL = 2, NH = 4, NKV = 2, D = 16, T = 420 };
    dataset ds;
    s_data_init(&ds, NL, NH, NKV, D, T, 53);
    fasa_profile *prof[2] = {s_profile(NL, NH, NKV, D, 3, FC_PAIRING_INTERLEAVED, 0, 13),
                             s_profile(NL, NH, NKV, D, 3, FC_PAIRING_INTERLEAVED, 1, 17)};
    fasa_engine_t *loc = fasa_engine_new(1, MPI_TEST_BLOCK);
    fasa_engine_t *locn = fasa_engine_new(s_n_workers, MPI_TEST_BLOCK);
    ck_assert_ptr_nonnull(loc);
    ck_assert_ptr_nonnull(locn);
    int runs = 0;
    for (int m = FASA_METHOD_FASA; m <= FASA_METHOD_LAST; m++)
        for (int g = 0; g < 2; g++)
            for (int len = 0; len < 2; len++) {
                if ((m == FASA_METHOD_SPARQ || m == FASA_METHOD_FASA_PLUS) && g) continue;
                replay c = s_replay_of(&ds, NH, NKV, D, len ? T : MPI_TEST_BLOCK);
                c.profile = prof[g];
                c.method = (fasa_method)m;
                c.gqa = (fasa_gqa)g;
                c.budget = 24;
                c.prefix = len ? 380 : 30;
                c.pos_step = len ? 9 : 4;
                /* Long: the cut-back steps see positions up to 30 .. 66, so most are on shard
                 * 0 while the other shards hold rows past max_pos. */
                c.back = len ? 350 : 10;
                char what[96];
                snprintf(what, sizeof(what), "one exchange, %s %s, %d tokens",
                         fasa_method_name(c.method), g ? "shared" : "per-head", c.T);
                /* The workers with it on and off; in process (two phases, the in-process
                 * transport has no score_attend) with 1 and with as many shards. */
                fasa_engine_t *engines[3] = {s_mpi, loc, locn};
                replay_out on[3], off;
                for (int i = 0; i < 3; i++) {
                    s_out_init(&c, &on[i]);
                    s_replay(engines[i], "one", &c, &on[i]);
                }
                s_out_init(&c, &off);
                fasa_engine_set_one_exchange(s_mpi, 0);
                s_replay(s_mpi, "one", &c, &off);
                fasa_engine_set_one_exchange(s_mpi, 1);
                s_same_bits(&c, &on[0], &off, what);
                s_out_cleanup(&off);
                /* And the workers as in process, within float rounding. */
                const size_t no = (size_t)on[0].n_att * c.nh * c.d;
                ck_assert_double_le(test_max_abs_diff(no, on[0].out, on[1].out), 1e-6);
                ck_assert_double_le(test_max_abs_diff(no, on[0].out, on[2].out), 1e-6);
                ck_assert_mem_eq(on[0].sel, on[1].sel,
                                 (size_t)on[0].n_att * c.nh * c.budget * sizeof(int32_t));
                ck_assert_mem_eq(on[0].sel, on[2].sel,
                                 (size_t)on[0].n_att * c.nh * c.budget * sizeof(int32_t));
                ck_assert_mem_eq(on[0].bytes, on[2].bytes, (size_t)on[0].n_att * sizeof(int64_t));
                int selected = 0;
                for (size_t i = 0; i < (size_t)on[0].n_att * c.nh * c.budget; i++)
                    selected += on[0].sel[i] >= 0;
                if (m != FASA_METHOD_DENSE) ck_assert_int_gt(selected, 0);
                for (int i = 0; i < 3; i++) s_out_cleanup(&on[i]);
                runs++;
            }
    ck_assert_int_eq(runs, 2 * (2 * 5 + 2));
    fasa_engine_destroy(&loc);
    fasa_engine_destroy(&locn);

    /* Exchanges per sparse step with k_new: 1 while every visible row is in the first block
     * (or there is one worker), 2 once a second shard holds one; 2 and 2 with it off. */
    replay c = s_replay_of(&ds, NH, NKV, D, T);
    c.profile = prof[0];
    c.method = FASA_METHOD_FASA;
    c.budget = 8;
    s_create(s_mpi, "count1", &c);
    const size_t row = (size_t)NKV * D;
    float out[NH * D];
    fasa_error err;
    for (int32_t t = 0; t < 2 * MPI_TEST_BLOCK + 2; t++)
        for (int on = 1; on >= 0; on--) {
            if (on == 0 && t % 16) continue;
            fasa_engine_set_one_exchange(s_mpi, on);
            const int32_t len = fasa_engine_length(s_mpi, "count1", 1);
            const fasa_attend_req req = {.layer = 1,
                                         .q = c.q[1] + (size_t)len * NH * D,
                                         .k_new = c.k[1] + len * row,
                                         .v_new = c.v[1] + len * row,
                                         .method = -1,
                                         .gqa = -1,
                                         .max_pos = -1};
            fasa_step_stats st;
            const long ops = s_counted.ops;
            ck_assert_int_eq(fasa_engine_attend(s_mpi, "count1", &req, out, NULL, &st, &err),
                             FASA_OK);
            const int sparse = len + 1 > c.budget;
            const int one = sparse && on && (s_n_workers == 1 || len < MPI_TEST_BLOCK);
            ck_assert_int_eq(st.method_used, sparse ? FASA_METHOD_FASA : FASA_METHOD_DENSE);
            ck_assert_int_eq(st.merge_used, FASA_MERGE_EXACT);
            ck_assert_msg(s_counted.ops - ops == (one || !sparse ? 1 : 2),
                          "t %d on %d: %ld exchanges", (int)t, on, s_counted.ops - ops);
            ck_assert_int_eq(fasa_engine_length(s_mpi, "count1", 1), len + 1);
        }
    fasa_engine_set_one_exchange(s_mpi, 1);
    ck_assert_int_eq(fasa_engine_drop(s_mpi, "count1", &err), FASA_OK);
    fasa_profile_destroy(&prof[0]);
    fasa_profile_destroy(&prof[1]);
    s_data_cleanup(&ds);
}
END_TEST

/* (c) The recorded stories260K activations, positions 1024..2047 every 128: dense, and
 * oracle, stream, quest and sparq B=32. Skipped when the dump is not there. */
START_TEST(test_mpi_golden)
{
    char path[1024], err[512];
    snprintf(path, sizeof(path), "%s/data/models/stories260K/golden/tinystories_T2048.qkv",
             s_shared_dir());
    if (access(path, R_OK) != 0) {
        printf("mpi golden: %s not readable, skipped\n", path);
        return;
    }
    fasa_qkv dump;
    ck_assert_msg(fasa_qkv_load(path, &dump, err, sizeof(err)) == 0, "%s", err);
    const fasa_activations *a = &dump.act;
    ck_assert_int_eq(a->n_tokens, 2048);
    for (int m = FASA_METHOD_DENSE; m <= FASA_METHOD_SPARQ; m++) {
        replay c = {.nl = a->n_layers,
                    .nh = a->n_heads,
                    .nkv = a->n_kv_heads,
                    .d = a->head_dim,
                    .T = a->n_tokens,
                    .method = (fasa_method)m,
                    .budget = 32,
                    .q = a->q,
                    .k = a->k,
                    .v = a->v,
                    .prefix = 1024,
                    .pos_step = 128,
                    .back = 500};
        char what[64];
        snprintf(what, sizeof(what), "golden %s B=32", fasa_method_name(c.method));
        s_check_agree(&c, what);
        if (m == FASA_METHOD_DENSE) continue;
        /* One exchange against two on the recorded data: the same bits (with one worker
         * every step is on one shard; with more, the steps cut back into the first block). */
        c.back = 2048 - 64 + 1;
        replay_out on, off;
        s_out_init(&c, &on);
        s_out_init(&c, &off);
        s_replay(s_mpi, "golden-one", &c, &on);
        fasa_engine_set_one_exchange(s_mpi, 0);
        s_replay(s_mpi, "golden-one", &c, &off);
        fasa_engine_set_one_exchange(s_mpi, 1);
        s_same_bits(&c, &on, &off, what);
        s_out_cleanup(&on);
        s_out_cleanup(&off);
    }
    fasa_qkv_cleanup(&dump);
}
END_TEST

/* Attends layer l of session id at position t (appending it) on both engines and holds
 * them to each other. */
static void s_attend_both(fasa_engine_t *loc, const char *id, const replay *c, int l, int t)
{
    replay_out om = {.n_att = 1}, ol = {.n_att = 1};
    om.out = test_alloc((size_t)c->nh * c->d * sizeof(float));
    ol.out = test_alloc((size_t)c->nh * c->d * sizeof(float));
    om.sel = test_alloc((size_t)c->nh * c->budget * sizeof(int32_t));
    ol.sel = test_alloc((size_t)c->nh * c->budget * sizeof(int32_t));
    om.bytes = test_alloc(sizeof(int64_t));
    ol.bytes = test_alloc(sizeof(int64_t));
    s_attend(s_mpi, id, c, l, t, 1, -1, &om, 0);
    s_attend(loc, id, c, l, t, 1, -1, &ol, 0);
    ck_assert_double_le(test_max_abs_diff((size_t)c->nh * c->d, om.out, ol.out), 1e-6);
    ck_assert_mem_eq(om.sel, ol.sel, (size_t)c->nh * c->budget * sizeof(int32_t));
    s_out_cleanup(&om);
    s_out_cleanup(&ol);
}

/* (d) Two sessions of different geometry interleaved on the same workers; one dropped
 * while the other carries on; the dropped id re-created with another geometry. */
START_TEST(test_mpi_sessions_interleaved)
{
    dataset da, db;
    s_data_init(&da, 2, 4, 2, 8, 400, 51);
    s_data_init(&db, 1, 6, 3, 12, 400, 52);
    replay ca = s_replay_of(&da, 4, 2, 8, 400), cb = s_replay_of(&db, 6, 3, 12, 400);
    ca.method = FASA_METHOD_ORACLE;
    ca.budget = 16;
    cb.method = FASA_METHOD_ORACLE;
    cb.gqa = FASA_GQA_SHARED;
    cb.budget = 40;
    fasa_engine_t *loc = fasa_engine_new(s_n_workers, MPI_TEST_BLOCK);
    ck_assert_ptr_nonnull(loc);
    fasa_engine_t *both[2] = {s_mpi, loc};
    for (int i = 0; i < 2; i++) {
        s_create(both[i], "x", &ca);
        s_create(both[i], "y", &cb);
    }
    /* Runs of 37 tokens each, alternating sessions, with a step after each run. */
    int t = 0;
    for (; t + 38 <= 300; t += 38) {
        for (int i = 0; i < 2; i++) {
            for (int l = 0; l < ca.nl; l++) s_append(both[i], "x", &ca, l, t, t + 37);
            s_append(both[i], "y", &cb, 0, t, t + 37);
        }
        for (int l = 0; l < ca.nl; l++) s_attend_both(loc, "x", &ca, l, t + 37);
        s_attend_both(loc, "y", &cb, 0, t + 37);
    }
    fasa_error err;
    for (int i = 0; i < 2; i++) ck_assert_int_eq(fasa_engine_drop(both[i], "x", &err), FASA_OK);
    /* y is untouched by x's drop. */
    s_append(s_mpi, "y", &cb, 0, t, t + 20);
    s_append(loc, "y", &cb, 0, t, t + 20);
    s_attend_both(loc, "y", &cb, 0, t + 20);
    /* x again, now with y's geometry and data, from position 0. */
    replay cx = cb;
    cx.gqa = FASA_GQA_PER_HEAD;
    cx.budget = 25;
    for (int i = 0; i < 2; i++) {
        s_create(both[i], "x", &cx);
        ck_assert_int_eq(fasa_engine_length(both[i], "x", 0), 0);
        s_append(both[i], "x", &cx, 0, 0, 150);
    }
    for (int p = 150; p < 400; p += 50) {
        s_attend_both(loc, "x", &cx, 0, p);
        s_attend_both(loc, "y", &cb, 0, fasa_engine_length(s_mpi, "y", 0));
        for (int i = 0; i < 2; i++) s_append(both[i], "x", &cx, 0, p + 1, p + 50);
    }
    for (int i = 0; i < 2; i++) {
        ck_assert_int_eq(fasa_engine_drop(both[i], "x", &err), FASA_OK);
        ck_assert_int_eq(fasa_engine_drop(both[i], "y", &err), FASA_OK);
    }
    fasa_engine_destroy(&loc);
    s_data_cleanup(&da);
    s_data_cleanup(&db);
}
END_TEST

/* (d2) A batch over MPI, its phases pipelined across the workers, gives what the same
 * steps give one by one in process: 4 sessions (fasa, oracle, quest, dense by default),
 * 30 items in waves (sessions repeat), with k_new, and two failing items. */
START_TEST(test_mpi_batch)
{
    enum { NL = 2, NH = 4, NKV = 2, D = 16, T = 600, NSES = 4, NI = 30 };
    dataset ds;
    s_data_init(&ds, NL, NH, NKV, D, T, 77);
    fasa_profile *prof = s_profile(NL, NH, NKV, D, 2, FC_PAIRING_INTERLEAVED, 0, 78);
    fasa_engine_t *loc = fasa_engine_new(s_n_workers, MPI_TEST_BLOCK);
    ck_assert_ptr_nonnull(loc);
    fasa_engine_t *both[2] = {s_mpi, loc};
    const char *ids_s[NSES] = {"bf", "bo", "bq", "bd"};
    const fasa_method methods[NSES] = {FASA_METHOD_FASA, FASA_METHOD_ORACLE, FASA_METHOD_QUEST,
                                       FASA_METHOD_DENSE};
    replay c = s_replay_of(&ds, NH, NKV, D, T);
    c.budget = 32;
    c.profile = prof;
    for (int x = 0; x < 2; x++)
        for (int si = 0; si < NSES; si++) {
            c.method = methods[si];
            s_create(both[x], ids_s[si], &c);
            for (int l = 0; l < NL; l++) s_append(both[x], ids_s[si], &c, l, 0, 400 + si * 10);
        }
    const size_t row = (size_t)NKV * D;
    const char *ids[NI];
    fasa_attend_req reqs[NI];
    float *out[2];
    int32_t *sel[2];
    for (int x = 0; x < 2; x++) {
        out[x] = test_alloc(sizeof(float) * NI * NH * D);
        sel[x] = test_alloc(sizeof(int32_t) * NI * NH * c.budget);
    }
    float *outs[2][NI];
    int32_t *sels[2][NI];
    int next[NSES][NL];
    for (int si = 0; si < NSES; si++)
        for (int l = 0; l < NL; l++) next[si][l] = 400 + si * 10;
    for (int i = 0; i < NI; i++) {
        const int si = (i * 7 + i / 5) % NSES, l = i % NL, knew = i % 3 != 2;
        ids[i] = i == 11 ? "missing" : ids_s[si];
        const int t = next[si][l];
        if (knew && i != 11) next[si][l]++;
        reqs[i] = (fasa_attend_req){.layer = l,
                                    .q = ds.q[l] + (size_t)t * NH * D,
                                    .k_new = knew ? ds.k[l] + t * row : NULL,
                                    .v_new = knew ? ds.v[l] + t * row : NULL,
                                    .method = -1,
                                    .budget = i == 17 ? -1 : 0,
                                    .gqa = -1,
                                    .max_pos = -1};
        for (int x = 0; x < 2; x++) {
            outs[x][i] = out[x] + (size_t)i * NH * D;
            sels[x][i] = sel[x] + (size_t)i * NH * c.budget;
        }
    }
    fasa_error errs[2][NI];
    fasa_step_stats st[2][NI];
    const int n_ok =
        fasa_engine_attend_batch(s_mpi, NI, ids, reqs, outs[0], sels[0], st[0], errs[0]);
    int want = 0;
    for (int i = 0; i < NI; i++) {
        errs[1][i].code = fasa_engine_attend(loc, ids[i], &reqs[i], outs[1][i], sels[1][i],
                                             &st[1][i], &errs[1][i]);
        ck_assert_int_eq(errs[0][i].code, errs[1][i].code);
        if (errs[1][i].code) continue;
        want++;
        ck_assert_double_le(test_max_abs_diff((size_t)NH * D, outs[0][i], outs[1][i]), 1e-6);
        ck_assert_mem_eq(sels[0][i], sels[1][i], sizeof(int32_t) * NH * c.budget);
        ck_assert_int_eq(st[0][i].bytes_read, st[1][i].bytes_read);
    }
    ck_assert_int_eq(want, NI - 2);
    ck_assert_int_eq(n_ok, want);
    fasa_error err;
    for (int si = 0; si < NSES; si++)
        for (int x = 0; x < 2; x++) {
            for (int l = 0; l < NL; l++)
                ck_assert_int_eq(fasa_engine_length(both[x], ids_s[si], l), next[si][l]);
            ck_assert_int_eq(fasa_engine_drop(both[x], ids_s[si], &err), FASA_OK);
        }
    for (int x = 0; x < 2; x++) free(out[x]), free(sel[x]);
    fasa_engine_destroy(&loc);
    fasa_profile_destroy(&prof);
    s_data_cleanup(&ds);
}
END_TEST

/* (e) A dropped session is gone at the engine: NOT_FOUND without a message to the workers,
 * and the workers stay in step. */
START_TEST(test_mpi_after_drop)
{
    dataset ds;
    s_data_init(&ds, 1, 4, 2, 8, 64, 61);
    replay c = s_replay_of(&ds, 4, 2, 8, 64);
    c.method = FASA_METHOD_DENSE;
    c.budget = 8;
    fasa_error err;
    s_create(s_mpi, "gone", &c);
    s_append(s_mpi, "gone", &c, 0, 0, 40);
    ck_assert_int_eq(fasa_engine_drop(s_mpi, "gone", &err), FASA_OK);
    const long ops = s_counted.ops;
    ck_assert_int_eq(fasa_engine_append(s_mpi, "gone", 0, 40, 1, ds.k[0], ds.v[0], &err),
                     FASA_NOT_FOUND);
    ck_assert_ptr_nonnull(strstr(err.msg, "gone"));
    float out[4 * 8];
    const fasa_attend_req req = {.q = ds.q[0], .method = -1, .gqa = -1, .max_pos = -1};
    ck_assert_int_eq(fasa_engine_attend(s_mpi, "gone", &req, out, NULL, NULL, &err),
                     FASA_NOT_FOUND);
    ck_assert_int_eq(fasa_engine_drop(s_mpi, "gone", &err), FASA_NOT_FOUND);
    ck_assert_int_eq(fasa_engine_length(s_mpi, "gone", 0), -1);
    ck_assert_int_eq(s_counted.ops, ops); /* none of that reached the workers */
    /* The same id starts afresh and works. */
    s_create(s_mpi, "gone", &c);
    s_append(s_mpi, "gone", &c, 0, 0, 64);
    ck_assert_int_eq(fasa_engine_attend(s_mpi, "gone", &req, out, NULL, NULL, &err), FASA_OK);
    float want[8];
    attn_ref(64, 8, 1.0f / sqrtf(8), ds.q[0], ds.k[0], 2 * 8, ds.v[0], 2 * 8, want);
    ck_assert_double_le(test_max_abs_diff(8, out, want), 1e-5);
    ck_assert_int_eq(fasa_engine_drop(s_mpi, "gone", &err), FASA_OK);
    s_data_cleanup(&ds);
}
END_TEST

/* Holds the MPI engine's per-shard holdings (of session id, or of all for NULL) to those of
 * an in-process engine with as many shards; returns the MPI ones in got. */
static void s_stats_agree(fasa_engine_t *loc, const char *id, fasa_shard_stats *got)
{
    fasa_shard_stats want[s_n_workers];
    fasa_error err;
    ck_assert_msg(fasa_engine_shard_stats(s_mpi, id, got, &err) == FASA_OK, "%s", err.msg);
    ck_assert_msg(fasa_engine_shard_stats(loc, id, want, &err) == FASA_OK, "%s", err.msg);
    for (int i = 0; i < s_n_workers; i++)
        ck_assert_msg(memcmp(&got[i], &want[i], sizeof(want[i])) == 0,
                      "%s shard %d: mpi sessions %lld rows %lld kdom %lld krest %lld v %lld alloc "
                      "%lld, in-process %lld %lld %lld %lld %lld %lld",
                      id ? id : "(all)", i, (long long)got[i].sessions, (long long)got[i].rows,
                      (long long)got[i].kdom_bytes, (long long)got[i].krest_bytes,
                      (long long)got[i].v_bytes, (long long)got[i].alloc_bytes,
                      (long long)want[i].sessions, (long long)want[i].rows,
                      (long long)want[i].kdom_bytes, (long long)want[i].krest_bytes,
                      (long long)want[i].v_bytes, (long long)want[i].alloc_bytes);
}

/* Dominant dims per (layer, KV head) of a profile: the union of its group's FCs' dims. */
static int s_n_dom(const fasa_profile *p, int l, int g)
{
    const int grp = p->n_heads / p->n_kv_heads, d = p->head_dim;
    uint8_t in[64] = {0};
    for (int h = g * grp; h < (g + 1) * grp; h++)
        for (int t = 0; t < p->ntip; t++) {
            int d0, d1;
            fc_dims(p->pairing, d, p->fcs[((size_t)l * p->n_heads + h) * p->ntip + t], &d0, &d1);
            in[d0] = in[d1] = 1;
        }
    int n = 0;
    for (int x = 0; x < d; x++) n += in[x];
    return n;
}

/* (f) Stats over MPI: what each worker holds (sessions, tokens, rows, bytes by kind and
 * allocated) equals what the in-process shards hold, for each session and for all, as
 * sessions grow, get a k_new and go; the totals match the sessions' geometry. */
START_TEST(test_mpi_stats)
{
    enum { NL = 3, NH = 4, NKV = 2, D = 16, T = 600 };
    ck_assert_int_eq(fasa_engine_count(s_mpi), 0);
    dataset da, db;
    s_data_init(&da, NL, NH, NKV, D, T, 81);
    s_data_init(&db, 1, 6, 3, 12, 400, 82);
    fasa_profile *p = s_profile(NL, NH, NKV, D, 3, FC_PAIRING_INTERLEAVED, 0, 83);
    replay ca = s_replay_of(&da, NH, NKV, D, T), cb = s_replay_of(&db, 6, 3, 12, 400);
    ca.profile = p;
    ca.method = FASA_METHOD_FASA;
    ca.budget = 20;
    cb.method = FASA_METHOD_ORACLE;
    cb.budget = 30;
    fasa_engine_t *loc = fasa_engine_new(s_n_workers, MPI_TEST_BLOCK);
    ck_assert_ptr_nonnull(loc);
    fasa_engine_t *both[2] = {s_mpi, loc};
    fasa_shard_stats got[s_n_workers];
    for (int i = 0; i < 2; i++) {
        s_create(both[i], "sa", &ca);
        s_create(both[i], "sb", &cb);
    }
    s_stats_agree(loc, NULL, got);
    for (int i = 0; i < s_n_workers; i++) {
        ck_assert_int_eq(got[i].sessions, 2);
        ck_assert_int_eq(got[i].rows + got[i].v_bytes + got[i].alloc_bytes, 0);
    }
    const int len[NL] = {300, 150, 517};
    for (int i = 0; i < 2; i++) {
        for (int l = 0; l < NL; l++) s_append(both[i], "sa", &ca, l, 0, len[l]);
        s_append(both[i], "sb", &cb, 0, 0, 399);
    }
    s_attend_both(loc, "sa", &ca, 2, len[2]); /* k_new: layer 2 now holds 518 */
    s_attend_both(loc, "sb", &cb, 0, 399);
    for (int k = 0; k < 3; k++) s_stats_agree(loc, k == 0 ? "sa" : k == 1 ? "sb" : NULL, got);

    /* The totals of "sa" over the workers: from its lengths and the profile's FCs. */
    s_stats_agree(loc, "sa", got);
    int64_t tokens = 0, rows = 0, kdom = 0, krest = 0, v = 0, want_kdom = 0;
    for (int i = 0; i < s_n_workers; i++) {
        ck_assert_int_eq(got[i].sessions, 1);
        ck_assert_int_gt(got[i].tokens, 0); /* 300 tokens in blocks of 64 reach every worker */
        ck_assert_int_ge(got[i].alloc_bytes,
                         got[i].kdom_bytes + got[i].krest_bytes + got[i].v_bytes);
        tokens += got[i].tokens;
        rows += got[i].rows;
        kdom += got[i].kdom_bytes;
        krest += got[i].krest_bytes;
        v += got[i].v_bytes;
    }
    for (int l = 0; l < NL; l++)
        for (int g = 0; g < NKV; g++)
            want_kdom += (int64_t)(len[l] + (l == 2)) * s_n_dom(p, l, g) * 4;
    ck_assert_int_eq(tokens, len[0]);
    ck_assert_int_eq(rows, len[0] + len[1] + len[2] + 1);
    ck_assert_int_eq(kdom, want_kdom);
    ck_assert_int_gt(krest, 0);
    ck_assert_int_eq(kdom + krest, v);
    ck_assert_int_eq(v, rows * NKV * D * 4);
    ck_assert_int_eq(kdom + krest + v, fasa_engine_kv_bytes(s_mpi, "sa"));

    /* An unknown id is refused at the engine, without a message to the workers. */
    fasa_error err;
    const long ops = s_counted.ops;
    ck_assert_int_eq(fasa_engine_shard_stats(s_mpi, "none", got, &err), FASA_NOT_FOUND);
    ck_assert_int_eq(s_counted.ops, ops);

    /* Dropped sessions leave nothing behind. */
    for (int i = 0; i < 2; i++) ck_assert_int_eq(fasa_engine_drop(both[i], "sb", &err), FASA_OK);
    s_stats_agree(loc, NULL, got);
    for (int i = 0; i < s_n_workers; i++) ck_assert_int_eq(got[i].sessions, 1);
    for (int i = 0; i < 2; i++) ck_assert_int_eq(fasa_engine_drop(both[i], "sa", &err), FASA_OK);
    s_stats_agree(loc, NULL, got);
    for (int i = 0; i < s_n_workers; i++)
        ck_assert_int_eq(got[i].sessions + got[i].rows + got[i].alloc_bytes, 0);
    fasa_engine_destroy(&loc);
    fasa_profile_destroy(&p);
    s_data_cleanup(&da);
    s_data_cleanup(&db);
}
END_TEST

/* ---- commands sent by hand to worker rank 1 ---- */

/* Sends bytes as a command to rank 1 and returns its reply's status (cmd_p: the command
 * it answers); with out, the reply's payload must be out_len bytes and goes there. */
static int s_raw_reply(const void *msg, int bytes, int *cmd_p, void *out, size_t out_len)
{
    MPI_Send(msg, bytes, MPI_BYTE, 1, WMPI_TAG_CMD, s_comm);
    MPI_Status st;
    MPI_Probe(1, WMPI_TAG_REPLY, s_comm, &st);
    int count = 0;
    MPI_Get_count(&st, MPI_BYTE, &count);
    uint8_t *buf = test_alloc((size_t)count);
    MPI_Recv(buf, count, MPI_BYTE, 1, WMPI_TAG_REPLY, s_comm, MPI_STATUS_IGNORE);
    ck_assert_int_ge(count, (int)sizeof(wmpi_reply));
    wmpi_reply r;
    memcpy(&r, buf, sizeof(r));
    if (out && r.status == WMPI_OK) {
        ck_assert_int_eq(count, (int)(sizeof(r) + out_len));
        memcpy(out, buf + sizeof(r), out_len);
    }
    free(buf);
    if (cmd_p) *cmd_p = r.cmd;
    return r.status;
}

static int s_raw(const void *msg, int bytes, int *cmd_p)
{
    return s_raw_reply(msg, bytes, cmd_p, NULL, 0);
}

/* A command header with payload bytes of payload from p, in one buffer. */
static int s_raw_cmd(const wmpi_cmd *h, const void *p, int64_t payload)
{
    uint8_t *buf = test_alloc(sizeof(*h) + (size_t)payload);
    memcpy(buf, h, sizeof(*h));
    if (payload) memcpy(buf + sizeof(*h), p, (size_t)payload);
    const int st = s_raw(buf, (int)(sizeof(*h) + payload), NULL);
    free(buf);
    return st;
}

/* Malformed commands get an error reply and change nothing; the worker keeps serving. */
START_TEST(test_mpi_bad_commands)
{
    enum { SID = 50000, D = 2 };
    int cmd = 0;
    ck_assert_int_eq(s_raw("junk", 5, &cmd), WMPI_EINVAL);
    ck_assert_int_eq(cmd, -1);
    wmpi_cmd h = {.magic = WMPI_MAGIC ^ 1, .cmd = WMPI_SESSION_DROP, .sid = SID};
    ck_assert_int_eq(s_raw_cmd(&h, NULL, 0), WMPI_EINVAL);
    h = (wmpi_cmd){.magic = WMPI_MAGIC, .cmd = 42, .sid = SID};
    ck_assert_int_eq(s_raw_cmd(&h, NULL, 0), WMPI_EINVAL);
    h.cmd = WMPI_SESSION_DROP;
    ck_assert_int_eq(s_raw_cmd(&h, NULL, 0), WMPI_ENOENT);
    h.payload_bytes = 100; /* but none sent */
    ck_assert_int_eq(s_raw_cmd(&h, NULL, 0), WMPI_EINVAL);

    /* SESSION_NEW of 1 layer, 1 head, head_dim 2: n_dom, perm (2), qmask (2 bytes). */
    struct {
        int32_t n_dom, perm[D];
        uint8_t qmask[D];
    } lay = {1, {1, 1}, {1, 0}};
    const int64_t lay_bytes = 4 + 4 * D + D;
    h = (wmpi_cmd){.magic = WMPI_MAGIC,
                   .cmd = WMPI_SESSION_NEW,
                   .sid = SID,
                   .n_layers = 1,
                   .n_heads = 1,
                   .n_kv_heads = 1,
                   .head_dim = D,
                   .payload_bytes = lay_bytes};
    ck_assert_int_eq(s_raw_cmd(&h, &lay, lay_bytes), WMPI_EINVAL); /* perm repeats 1 */
    lay.perm[0] = 0;
    lay.n_dom = 3;
    ck_assert_int_eq(s_raw_cmd(&h, &lay, lay_bytes), WMPI_EINVAL); /* n_dom > head_dim */
    lay.n_dom = 1;
    h.n_heads = 3; /* a valid geometry, but the qmask sent is for one head */
    ck_assert_int_eq(s_raw_cmd(&h, &lay, lay_bytes), WMPI_EINVAL);
    h.n_heads = 1;
    ck_assert_int_eq(s_raw_cmd(&h, &lay, lay_bytes), WMPI_OK);
    ck_assert_int_eq(s_raw_cmd(&h, &lay, lay_bytes), WMPI_EEXIST);

    /* APPEND: two rows, checked for size, geometry and order. */
    struct {
        int32_t pos[2];
        float k[2 * D], v[2 * D];
    } ap = {{5, 9}, {1, 2, 3, 4}, {5, 6, 7, 8}};
    const int64_t ap_bytes = 8 + 16 + 16;
    h.cmd = WMPI_APPEND;
    h.layer = 0;
    h.n = 2;
    h.payload_bytes = ap_bytes;
    ck_assert_int_eq(s_raw_cmd(&h, &ap, ap_bytes), WMPI_OK);
    ck_assert_int_eq(s_raw_cmd(&h, &ap, ap_bytes), WMPI_EINVAL); /* not above the rows */
    ap.pos[0] = 12, ap.pos[1] = 11;
    ck_assert_int_eq(s_raw_cmd(&h, &ap, ap_bytes), WMPI_EINVAL); /* not ascending */
    ap.pos[1] = 13;
    h.layer = 1;
    ck_assert_int_eq(s_raw_cmd(&h, &ap, ap_bytes), WMPI_EINVAL); /* no layer 1 */
    h.layer = 0;
    h.head_dim = 4;
    ck_assert_int_eq(s_raw_cmd(&h, &ap, ap_bytes), WMPI_EINVAL); /* other geometry */
    h.head_dim = D;
    h.n = 3;
    ck_assert_int_eq(s_raw_cmd(&h, &ap, ap_bytes), WMPI_EINVAL); /* n does not fit */
    h.n = 2;
    ck_assert_int_eq(s_raw_cmd(&h, &ap, ap_bytes), WMPI_OK);

    /* ATTEND: a sparse one needs its SCORE; a dense one answers with (l, o, m). */
    struct {
        float q[D];
        topk_cand thr;
        uint8_t have;
    } at = {{1, 0}, {0, 0}, 1};
    h.cmd = WMPI_ATTEND;
    h.n = 0;
    h.method = SHARD_ORACLE;
    h.budget = 2;
    h.max_pos = 100;
    h.scale = 1;
    h.n_units = 1;
    h.payload_bytes = 4 * D + 9;
    ck_assert_int_eq(s_raw_cmd(&h, &at, h.payload_bytes), WMPI_EINVAL);
    h.n_units = 2;
    ck_assert_int_eq(s_raw_cmd(&h, &at, h.payload_bytes), WMPI_EINVAL);
    h.n_units = 1;
    h.method = 7;
    ck_assert_int_eq(s_raw_cmd(&h, &at, h.payload_bytes), WMPI_EINVAL);
    h.method = SHARD_DENSE;
    h.payload_bytes = 4 * D;
    ck_assert_int_eq(s_raw_cmd(&h, &at, h.payload_bytes), WMPI_OK);
    h.cmd = WMPI_SCORE;
    h.method = SHARD_ORACLE;
    ck_assert_int_eq(s_raw_cmd(&h, &at, h.payload_bytes), WMPI_OK);
    h.cmd = WMPI_ATTEND;
    h.payload_bytes = 4 * D + 9;
    ck_assert_int_eq(s_raw_cmd(&h, &at, h.payload_bytes), WMPI_OK);

    /* STATS: of the session (4 rows of 1 dominant dim and 1 other), of every session (sid
     * -1), nothing of a session it does not hold or with a payload. */
    wmpi_stats ws;
    const wmpi_cmd sh = {.magic = WMPI_MAGIC,
                         .cmd = WMPI_STATS,
                         .sid = SID,
                         .n_layers = 1,
                         .n_heads = 1,
                         .n_kv_heads = 1,
                         .head_dim = D};
    ck_assert_int_eq(s_raw_reply(&sh, sizeof(sh), &cmd, &ws, sizeof(ws)), WMPI_OK);
    ck_assert_int_eq(cmd, WMPI_STATS);
    ck_assert_int_eq(ws.sessions, 1);
    ck_assert_int_eq(ws.tokens, 4);
    ck_assert_int_eq(ws.rows, 4);
    ck_assert_int_eq(ws.kdom_bytes, 16);
    ck_assert_int_eq(ws.krest_bytes, 16);
    ck_assert_int_eq(ws.v_bytes, 32);
    ck_assert_int_gt(ws.alloc_bytes, 64);
    h = sh;
    h.sid = -1;
    h.n_layers = h.n_heads = h.n_kv_heads = h.head_dim = 0;
    ck_assert_int_eq(s_raw_reply(&h, sizeof(h), NULL, &ws, sizeof(ws)), WMPI_OK);
    ck_assert_int_eq(ws.sessions, 1); /* the engine's sessions are all dropped by now */
    ck_assert_int_eq(ws.v_bytes, 32);
    h = sh;
    h.head_dim = 4;
    ck_assert_int_eq(s_raw_cmd(&h, NULL, 0), WMPI_EINVAL); /* other geometry */
    h = sh;
    h.sid = SID + 1;
    ck_assert_int_eq(s_raw_cmd(&h, NULL, 0), WMPI_ENOENT);
    h = sh;
    h.payload_bytes = 4;
    ck_assert_int_eq(s_raw_cmd(&h, &ws, 4), WMPI_EINVAL);

    /* SCORE_KNEW / ATTEND_KNEW: the row (for shard 0, this worker) is checked like an
     * append and with the phase before anything changes; only a valid one adds it. */
    struct {
        wmpi_knew kh;
        float k[D], v[D], q[D];
        topk_cand thr;
        uint8_t have;
    } kn = {{0, 13}, {1, 1}, {2, 2}, {1, 0}, {0, 0}, 1};
    h = sh;
    h.cmd = WMPI_ATTEND_KNEW;
    h.method = SHARD_DENSE;
    h.budget = 2;
    h.max_pos = 100;
    h.scale = 1;
    h.n_units = 1;
    h.payload_bytes = 8 + 4 * D * 3;
    ck_assert_int_eq(s_raw_cmd(&h, &kn, h.payload_bytes), WMPI_EINVAL); /* 13 is held */
    kn.kh.shard = 5;
    kn.kh.pos = 20;
    ck_assert_int_eq(s_raw_cmd(&h, &kn, h.payload_bytes), WMPI_EINVAL); /* no shard 5 */
    kn.kh.shard = 0;
    h.payload_bytes = 8 + 4 * D * 2;
    ck_assert_int_eq(s_raw_cmd(&h, &kn, h.payload_bytes), WMPI_EINVAL); /* no q */
    h.payload_bytes = 8 + 4 * D * 3 + 9;
    h.method = SHARD_ORACLE;
    ck_assert_int_eq(s_raw_cmd(&h, &kn, h.payload_bytes), WMPI_EINVAL); /* a sparse attend */
    ck_assert_int_eq(s_raw_reply(&sh, sizeof(sh), NULL, &ws, sizeof(ws)), WMPI_OK);
    ck_assert_int_eq(ws.tokens, 4); /* none of those appended */
    h.method = SHARD_DENSE;
    h.payload_bytes = 8 + 4 * D * 3;
    ck_assert_int_eq(s_raw_cmd(&h, &kn, h.payload_bytes), WMPI_OK);
    h.cmd = WMPI_SCORE_KNEW;
    h.method = SHARD_ORACLE;
    ck_assert_int_eq(s_raw_cmd(&h, &kn, h.payload_bytes), WMPI_EINVAL); /* 20 is held now */
    kn.kh.pos = 21;
    ck_assert_int_eq(s_raw_cmd(&h, &kn, h.payload_bytes), WMPI_OK);
    h.cmd = WMPI_ATTEND; /* the second half of that score */
    h.payload_bytes = 4 * D + 9;
    ck_assert_int_eq(s_raw_cmd(&h, kn.q, h.payload_bytes), WMPI_OK);
    ck_assert_int_eq(s_raw_reply(&sh, sizeof(sh), NULL, &ws, sizeof(ws)), WMPI_OK);
    ck_assert_int_eq(ws.tokens, 6);

    h = (wmpi_cmd){.magic = WMPI_MAGIC, .cmd = WMPI_SESSION_DROP, .sid = SID};
    ck_assert_int_eq(s_raw_cmd(&h, NULL, 0), WMPI_OK);
    ck_assert_int_eq(s_raw_cmd(&h, NULL, 0), WMPI_ENOENT);
    h.cmd = WMPI_SCORE;
    ck_assert_int_eq(s_raw_cmd(&h, NULL, 0), WMPI_ENOENT);

    /* The engine over the same workers still works. */
    dataset ds;
    s_data_init(&ds, 1, 2, 1, 4, 300, 71);
    replay c = s_replay_of(&ds, 2, 1, 4, 300);
    c.method = FASA_METHOD_ORACLE;
    c.budget = 10;
    c.prefix = 250;
    c.pos_step = 17;
    c.back = 100;
    s_check_agree(&c, "after bad commands");
    s_data_cleanup(&ds);
}
END_TEST

/* Every attend of layer l at the last position, methods fasa, oracle and dense, into out
 * (3, nl, nh, d). */
static void s_snap_attends(fasa_engine_t *e, const replay *c, float *out)
{
    const int methods[] = {FASA_METHOD_FASA, FASA_METHOD_ORACLE, FASA_METHOD_DENSE};
    for (int m = 0; m < 3; m++)
        for (int l = 0; l < c->nl; l++) {
            const fasa_attend_req req = {.layer = l,
                                         .q = c->q[l] + (size_t)(c->T - 1) * c->nh * c->d,
                                         .method = methods[m],
                                         .gqa = -1,
                                         .max_pos = -1};
            fasa_error err;
            ck_assert_msg(fasa_engine_attend(e, "snap", &req,
                                             out + ((size_t)m * c->nl + l) * c->nh * c->d, NULL,
                                             NULL, &err) == FASA_OK,
                          "%s", err.msg);
        }
}

/* The workers write their shards of a session; it restores into in-process engines of 1,
 * N - 1 and N shards (each answering as a fresh engine of that count fed the same rows, bit
 * for bit, and as the MPI engine within 1e-6) and back into the MPI engine (bit for bit). */
START_TEST(test_mpi_snapshot)
{
    enum { NL = 2, NH = 4, NKV = 2, D = 16, T = 600 };
    dataset ds;
    s_data_init(&ds, NL, NH, NKV, D, T, 31);
    fasa_profile *p = s_profile(NL, NH, NKV, D, 2, FC_PAIRING_INTERLEAVED, 0, 5);
    replay c = s_replay_of(&ds, NH, NKV, D, T);
    c.method = FASA_METHOD_FASA;
    c.budget = 48;
    c.profile = p;
    char dir[] = "/tmp/fasa-mpisnap-XXXXXX";
    ck_assert_ptr_nonnull(mkdtemp(dir));
    const size_t n_out = 3 * NL * NH * D;
    float *om = test_alloc(n_out * 4), *ob = test_alloc(n_out * 4), *oc = test_alloc(n_out * 4);
    s_create(s_mpi, "snap", &c);
    for (int l = 0; l < NL; l++) s_append(s_mpi, "snap", &c, l, 0, T - l * 50);
    s_snap_attends(s_mpi, &c, om);
    fasa_error err;
    fasa_snapshot_result res;
    ck_assert_msg(fasa_snapshot_session(s_mpi, dir, "snap", &res, &err) == FASA_OK, "%s", err.msg);
    ck_assert_int_eq(res.length, T);
    const int counts[] = {1, s_n_workers, s_n_workers + 1};
    for (int i = 0; i < 3; i++) {
        fasa_engine_t *b = fasa_engine_new(counts[i], MPI_TEST_BLOCK);
        fasa_engine_t *f = fasa_engine_new(counts[i], MPI_TEST_BLOCK);
        int failed = -1;
        ck_assert_int_eq(fasa_snapshot_restore_all(b, dir, &failed), 1);
        ck_assert_int_eq(failed, 0);
        ck_assert_int_eq(fasa_engine_length(b, "snap", 1), T - 50);
        s_create(f, "snap", &c);
        for (int l = 0; l < NL; l++) s_append(f, "snap", &c, l, 0, T - l * 50);
        s_snap_attends(b, &c, ob);
        s_snap_attends(f, &c, oc);
        ck_assert_mem_eq(ob, oc, n_out * 4);
        const double diff = test_max_abs_diff(n_out, ob, om);
        printf("mpi %d workers: snapshot restored on %d in-process shards: max |diff| %.3g\n",
               s_n_workers, counts[i], diff);
        ck_assert_double_le(diff, 1e-6);
        fasa_engine_destroy(&b);
        fasa_engine_destroy(&f);
    }
    /* Back into the MPI engine, after dropping the session there. */
    ck_assert_int_eq(fasa_engine_drop(s_mpi, "snap", &err), FASA_OK);
    int failed = -1;
    ck_assert_int_eq(fasa_snapshot_restore_all(s_mpi, dir, &failed), 1);
    s_snap_attends(s_mpi, &c, ob);
    ck_assert_mem_eq(ob, om, n_out * 4);
    ck_assert_int_eq(fasa_engine_drop(s_mpi, "snap", &err), FASA_OK);
    char cmd[128];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
    ck_assert_int_eq(system(cmd), 0);
    free(om);
    free(ob);
    free(oc);
    fasa_profile_destroy(&p);
    s_data_cleanup(&ds);
}
END_TEST

/* Every shard's rows and bytes of session id on the MPI engine equal loc's (the capacity
 * a failed append grew may stay allocated, so alloc_bytes is not compared). */
static void s_held_agree(fasa_engine_t *loc, const char *id)
{
    fasa_shard_stats got[s_n_workers], want[s_n_workers];
    fasa_error err;
    ck_assert_msg(fasa_engine_shard_stats(s_mpi, id, got, &err) == FASA_OK, "%s", err.msg);
    ck_assert_msg(fasa_engine_shard_stats(loc, id, want, &err) == FASA_OK, "%s", err.msg);
    for (int i = 0; i < s_n_workers; i++) {
        ck_assert_int_eq(got[i].tokens, want[i].tokens);
        ck_assert_int_eq(got[i].rows, want[i].rows);
        ck_assert_int_eq(got[i].kdom_bytes, want[i].kdom_bytes);
        ck_assert_int_eq(got[i].krest_bytes, want[i].krest_bytes);
        ck_assert_int_eq(got[i].v_bytes, want[i].v_bytes);
    }
}

/* A quest step (page bounds) of every layer at the last position, no k_new, on both. */
static void s_steps_agree(fasa_engine_t *loc, const char *id, const replay *c, int t)
{
    replay_out om = {.n_att = 1}, ol = {.n_att = 1};
    om.out = test_alloc((size_t)c->nh * c->d * sizeof(float));
    ol.out = test_alloc((size_t)c->nh * c->d * sizeof(float));
    om.sel = test_alloc((size_t)c->nh * c->budget * sizeof(int32_t));
    ol.sel = test_alloc((size_t)c->nh * c->budget * sizeof(int32_t));
    om.bytes = test_alloc(sizeof(int64_t));
    ol.bytes = test_alloc(sizeof(int64_t));
    for (int l = 0; l < c->nl; l++) {
        s_attend(s_mpi, id, c, l, t, 0, -1, &om, 0);
        s_attend(loc, id, c, l, t, 0, -1, &ol, 0);
        ck_assert_mem_eq(om.out, ol.out, (size_t)c->nh * c->d * sizeof(float));
        ck_assert_mem_eq(om.sel, ol.sel, (size_t)c->nh * c->budget * sizeof(int32_t));
        ck_assert_int_eq(om.bytes[0], ol.bytes[0]);
    }
    s_out_cleanup(&om);
    s_out_cleanup(&ol);
}

/* (j) Atomic appends: an append of every layer that fails on one worker part-way (the
 * test fault hook: its 1st, 2nd or 3rd run of the request fails as out of memory, after the
 * runs before it were stored and while the other workers store theirs) leaves no row on
 * any shard: every layer's length, every shard's rows and bytes, and quest steps (page
 * bounds included) equal those of an in-process engine that never got it. Then the same
 * rows go in (f32, and f16 for the next ones) and the two still agree. */
START_TEST(test_mpi_atomic_append)
{
    enum { NL = 2, NH = 4, NKV = 2, D = 16, T = 1300, P0 = 200, N = 500 };
    dataset ds;
    s_data_init(&ds, NL, NH, NKV, D, T, 47);
    replay c = s_replay_of(&ds, NH, NKV, D, T);
    c.method = FASA_METHOD_QUEST;
    c.budget = 64;
    fasa_engine_t *loc = fasa_engine_new(s_n_workers, MPI_TEST_BLOCK);
    ck_assert_ptr_nonnull(loc);
    s_create(s_mpi, "at", &c);
    s_create(loc, "at", &c);
    for (int l = 0; l < NL; l++) {
        s_append(s_mpi, "at", &c, l, 0, P0);
        s_append(loc, "at", &c, l, 0, P0);
    }
    const size_t row = (size_t)NKV * D;
    float *k = test_alloc((size_t)NL * N * row * 4), *v = test_alloc((size_t)NL * N * row * 4);
    uint16_t *kh = test_alloc((size_t)NL * N * row * 2), *vh = test_alloc((size_t)NL * N * row * 2);
    fasa_error err;
    for (int fault = 1; fault <= 3; fault++) {
        for (int l = 0; l < NL; l++) {
            memcpy(k + (size_t)l * N * row, ds.k[l] + (size_t)P0 * row, N * row * 4);
            memcpy(v + (size_t)l * N * row, ds.v[l] + (size_t)P0 * row, N * row * 4);
        }
        ck_assert_int_eq(fasa_transport_mpi_test_fault(s_counted.inner.ctx, s_n_workers - 1, fault),
                         0);
        ck_assert_int_eq(fasa_engine_append(s_mpi, "at", -1, P0, N, k, v, &err),
                         FASA_RESOURCE_EXHAUSTED);
        ck_assert_msg(strstr(err.msg, "nothing was stored"), "%s", err.msg);
        for (int l = 0; l < NL; l++) ck_assert_int_eq(fasa_engine_length(s_mpi, "at", l), P0);
        s_held_agree(loc, "at");
        s_steps_agree(loc, "at", &c, P0 - 1);
    }
    ck_assert_int_eq(fasa_transport_mpi_test_fault(s_counted.inner.ctx, s_n_workers - 1, 0), 0);
    ck_assert_int_eq(fasa_engine_append(s_mpi, "at", -1, P0, N, k, v, &err), FASA_OK);
    ck_assert_int_eq(fasa_engine_append(loc, "at", -1, P0, N, k, v, &err), FASA_OK);
    s_held_agree(loc, "at");
    s_steps_agree(loc, "at", &c, P0 + N - 1);
    /* The next rows as f16 on the wire (the data rounded to f16 first on both). */
    for (int l = 0; l < NL; l++) {
        dtype_from_f32(SIMD_PORTABLE, FASA_DTYPE_F16, N * row, ds.k[l] + (size_t)(P0 + N) * row,
                       kh + (size_t)l * N * row);
        dtype_from_f32(SIMD_PORTABLE, FASA_DTYPE_F16, N * row, ds.v[l] + (size_t)(P0 + N) * row,
                       vh + (size_t)l * N * row);
    }
    ck_assert_int_eq(fasa_transport_mpi_test_fault(s_counted.inner.ctx, 0, 2), 0);
    ck_assert_int_eq(
        fasa_engine_append_dt(s_mpi, "at", -1, P0 + N, N, FASA_DTYPE_F16, kh, vh, &err),
        FASA_RESOURCE_EXHAUSTED);
    s_held_agree(loc, "at");
    ck_assert_int_eq(fasa_transport_mpi_test_fault(s_counted.inner.ctx, 0, 0), 0);
    for (fasa_engine_t *e = s_mpi;; e = loc) {
        ck_assert_msg(fasa_engine_append_dt(e, "at", -1, P0 + N, N, FASA_DTYPE_F16, kh, vh, &err) ==
                          FASA_OK,
                      "%s", err.msg);
        if (e == loc) break;
    }
    s_held_agree(loc, "at");
    s_steps_agree(loc, "at", &c, P0 + 2 * N - 1);
    ck_assert_int_eq(fasa_engine_drop(s_mpi, "at", &err), FASA_OK);
    fasa_engine_destroy(&loc);
    free(k), free(v), free(kh), free(vh);
    s_data_cleanup(&ds);
}
END_TEST

/* The adaptive spin window (worker_mpi_wire.h wmpi_adapt): its rule on set histories, when it
 * applies, and a spin that loses its core giving up. No timing is asserted beyond the
 * order of a few hundred microseconds the test sets up itself. */
START_TEST(test_spin_adapt)
{
    const long base = 50000, cap = 5000000;
    wmpi_adapt a = {0};
    /* Slurm's per-node task counts: this node's entry, "(xN)" repeats expanded. */
    ck_assert_int_eq(wmpi_slurm_node_tasks("2(x3),1", 0), 2);
    ck_assert_int_eq(wmpi_slurm_node_tasks("2(x3),1", 2), 2);
    ck_assert_int_eq(wmpi_slurm_node_tasks("2(x3),1", 3), 1);
    ck_assert_int_eq(wmpi_slurm_node_tasks("1,4", 1), 4);
    ck_assert_int_eq(wmpi_slurm_node_tasks("1,4", 2), 0);
    ck_assert_int_eq(wmpi_slurm_node_tasks("4", 0), 4);
    ck_assert_int_eq(wmpi_slurm_node_tasks("2(3)", 0), 0);
    ck_assert_int_eq(wmpi_slurm_node_tasks("x", 0), 0);
    ck_assert_int_eq(wmpi_slurm_node_tasks(NULL, 0), 0);
    ck_assert_int_eq(wmpi_adapt_window(&a, base, cap), base); /* no history */
    for (int i = 0; i < WMPI_ADAPT_MIN - 1; i++) wmpi_adapt_note(&a, 2000000);
    ck_assert_int_eq(wmpi_adapt_window(&a, base, cap), base); /* too few waits yet */
    for (int i = 0; i < WMPI_ADAPT_N; i++) wmpi_adapt_note(&a, 2000000);
    ck_assert_int_eq(wmpi_adapt_window(&a, base, cap), 3020000);  /* 1.5 x 2 ms + 20 us */
    ck_assert_int_eq(wmpi_adapt_window(&a, base, 0), base);       /* off */
    ck_assert_int_eq(wmpi_adapt_window(&a, base, 1000000), base); /* every wait over the cap */
    for (int i = 0; i < WMPI_ADAPT_N; i++) wmpi_adapt_note(&a, 4000000);
    ck_assert_int_eq(wmpi_adapt_window(&a, base, cap), cap); /* 6.02 ms, capped */
    /* The longest wait under the cap counts, those over it do not, while enough stay under. */
    for (int i = 0; i < WMPI_ADAPT_N - WMPI_ADAPT_MIN; i++) wmpi_adapt_note(&a, 10000000);
    for (int i = 0; i < WMPI_ADAPT_MIN; i++) wmpi_adapt_note(&a, i == 2 ? 1000000 : 300000);
    ck_assert_int_eq(wmpi_adapt_window(&a, base, cap), 1520000);
    /* Three more over the cap: the first two replace the oldest (over the cap too), the third
     * a short one, so only WMPI_ADAPT_MIN - 1 stay under it. */
    for (int i = 0; i < 3; i++) wmpi_adapt_note(&a, 10000000);
    ck_assert_int_eq(wmpi_adapt_window(&a, base, cap), base);
    wmpi_adapt b = {0};
    for (int i = 0; i < WMPI_ADAPT_N; i++) wmpi_adapt_note(&b, 10000); /* shorter than base */
    ck_assert_int_eq(wmpi_adapt_window(&b, base, cap), base);

    /* Only while this node's ranks do not outnumber its CPUs; FASA_SPIN_MAX_US sets the cap. */
    ck_assert_int_eq(wmpi_spin_max_for(2, 2, NULL), 1000L * WMPI_SPIN_MAX_US);
    ck_assert_int_eq(wmpi_spin_max_for(3, 2, NULL), 0);
    ck_assert_int_eq(wmpi_spin_max_for(4, 16, "1000"), 1000000);
    ck_assert_int_eq(wmpi_spin_max_for(2, 2, "0"), 0);
    ck_assert_int_eq(wmpi_spin_max_for(2, 2, "12x"), 1000L * WMPI_SPIN_MAX_US);
    ck_assert_int_eq(wmpi_spin_max_for(2, 2, "999999999"), 100000000L);
    ck_assert_int_eq(wmpi_spin_max_for(1, -1, NULL), 0);

    /* A worker's wait for its next command spins long only with a CPU to spare beyond the
     * node's ranks (the client's own work runs in that gap), else through short gaps only,
     * unless FASA_SPIN_GAP says. */
    const long cpus = wmpi_node_cpus();
    setenv("FASA_SPIN_MAX_US", "2000", 1);
    wmpi_spin_set_ranks(1);
    ck_assert_int_eq(wmpi_spin_max_ns, cpus >= 1 ? 2000000 : 0);
    ck_assert_int_eq(wmpi_spin_gap_max_ns, cpus >= 2   ? 2000000
                                           : cpus >= 1 ? 1000L * WMPI_SPIN_GAP_SHARED_US
                                                       : 0);
    setenv("FASA_SPIN_GAP", "1", 1);
    wmpi_spin_set_ranks(1);
    ck_assert_int_eq(wmpi_spin_gap_max_ns, wmpi_spin_max_ns);
    setenv("FASA_SPIN_GAP", "0", 1);
    wmpi_spin_set_ranks(1);
    ck_assert_int_eq(wmpi_spin_gap_max_ns, 0);
    unsetenv("FASA_SPIN_GAP");
    unsetenv("FASA_SPIN_MAX_US");

    /* A long spin whose polls come close together keeps spinning; one that found itself
     * 300 us after its last poll (descheduled) sleeps and cools its site down. */
    const long saved = wmpi_spin_max_ns;
    wmpi_spin_max_ns = 100000000L; /* 100 ms: a window of 30 ms, past any scheduling delay */
    wmpi_adapt c = {0};
    for (int i = 0; i < WMPI_ADAPT_N; i++) wmpi_adapt_note(&c, 20000000);
    wmpi_backoff w;
    wmpi_backoff_start(&w, &c);
    ck_assert_int_eq(w.spin_ns, 30020000);
    w.since.tv_nsec -= 100000; /* 100 us into the wait */
    if (w.since.tv_nsec < 0) w.since.tv_nsec += 1000000000L, w.since.tv_sec--;
    w.last_ns = 1000000000L; /* the last poll no earlier than this one, however late it runs */
    wmpi_backoff_pause(&w, 100000, 100000, NULL, 0);
    ck_assert_int_eq(w.spin_ns, 30020000);
    ck_assert_int_eq(c.cool, 0);
    w.since.tv_nsec -= 300000; /* 400 us in, the last poll 300 us ago */
    if (w.since.tv_nsec < 0) w.since.tv_nsec += 1000000000L, w.since.tv_sec--;
    wmpi_backoff_pause(&w, 100000, 100000, NULL, 0);
    ck_assert_int_eq(w.spin_ns, wmpi_spin_ns());
    ck_assert_int_eq(c.cool, WMPI_ADAPT_N);
    ck_assert_int_eq(wmpi_adapt_window(&c, base, wmpi_spin_max_ns), base);
    for (int i = 0; i < WMPI_ADAPT_N; i++) wmpi_adapt_note(&c, 20000000);
    ck_assert_int_eq(wmpi_adapt_window(&c, base, wmpi_spin_max_ns), 30020000); /* cooled down */
    /* Each further loss doubles the cool-down, up to WMPI_ADAPT_COOL_MAX; a long spin that
     * caught its message halves it. */
    wmpi_adapt_preempted(&c);
    ck_assert_int_eq(c.cool, 2 * WMPI_ADAPT_N);
    for (int i = 0; i < 20; i++) wmpi_adapt_preempted(&c);
    ck_assert_int_eq(c.cool, WMPI_ADAPT_COOL_MAX);
    c.cool = 0;
    wmpi_backoff_start(&w, &c);
    ck_assert_int_eq(c.armed_ns, 30020000);
    wmpi_adapt_note(&c, 25000000);
    ck_assert_int_eq(c.penalty, WMPI_ADAPT_COOL_MAX / 2);
    ck_assert_int_eq(c.armed_ns, 0);
    wmpi_adapt_note(&c, 25000000); /* a wait without a long window changes nothing */
    ck_assert_int_eq(c.penalty, WMPI_ADAPT_COOL_MAX / 2);
    wmpi_spin_max_ns = saved;
}
END_TEST

static Suite *s_mpi_suite(void)
{
    Suite *s = suite_create("mpi_transport");
    TCase *tc = tcase_create("mpi");
    tcase_add_test(tc, test_mpi_plain_agree);
    tcase_add_test(tc, test_mpi_fasa_agree);
    tcase_add_test(tc, test_mpi_knew_one_exchange);
    tcase_add_test(tc, test_mpi_one_exchange);
    tcase_add_test(tc, test_mpi_golden);
    tcase_add_test(tc, test_mpi_sessions_interleaved);
    tcase_add_test(tc, test_mpi_batch);
    tcase_add_test(tc, test_mpi_after_drop);
    tcase_add_test(tc, test_mpi_stats);
    tcase_add_test(tc, test_mpi_bad_commands);
    tcase_add_test(tc, test_mpi_snapshot);
    tcase_add_test(tc, test_mpi_atomic_append);
    tcase_add_test(tc, test_spin_adapt);
    suite_add_tcase(s, tc);
    return s;
}

/* Rank 0: the suite over an engine on the workers; destroying it stops them. */
static int s_run_suite(void)
{
    if (fasa_transport_mpi(&s_counted.inner, s_comm)) {
        fprintf(stderr, "rank 0: out of memory making the MPI transport\n");
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    fasa_transport t = {.ctx = &s_counted,
                        .n_shards = s_counted.inner.n_shards,
                        .session_new = s_c_session_new,
                        .session_drop = s_c_session_drop,
                        .append = s_c_append,
                        .append_runs = s_c_append_runs,
                        .score = s_c_score,
                        .attend = s_c_attend,
                        .score_attend = s_c_score_attend,
                        .shard_stats = s_c_shard_stats,
                        .snapshot = s_c_snapshot,
                        .stage_append = s_c_stage_append,
                        .staged_appended = s_c_staged_appended,
                        .destroy = s_c_destroy};
    s_mpi = fasa_engine_new_with(&t, MPI_TEST_BLOCK);
    if (!s_mpi) {
        t.destroy(t.ctx);
        return 1;
    }
    SRunner *sr = srunner_create(s_mpi_suite());
    srunner_set_fork_status(sr, CK_NOFORK);
    srunner_run_all(sr, CK_NORMAL);
    const int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    printf("mpi %d workers: largest |diff| %.3g vs in-process with as many shards, %.3g vs 1\n",
           s_n_workers, s_worst_n, s_worst_1);
    fasa_engine_destroy(&s_mpi);
    return failed;
}

static double s_seconds(struct timeval tv)
{
    return (double)tv.tv_sec + tv.tv_usec * 1e-6;
}

/* FASA_MPI_IDLE_SECONDS: the CPU each rank uses while the workers wait for commands. */
static void s_idle_run(int rank, double seconds)
{
    struct rusage r0, r1;
    struct timespec w0, w1;
    getrusage(RUSAGE_SELF, &r0);
    clock_gettime(CLOCK_MONOTONIC, &w0);
    if (rank == 0) {
        fasa_transport t;
        if (fasa_transport_mpi(&t, s_comm)) MPI_Abort(MPI_COMM_WORLD, 1);
        struct timespec left = {(time_t)seconds, (long)((seconds - floor(seconds)) * 1e9)};
        while (nanosleep(&left, &left) != 0 && errno == EINTR) continue;
        t.destroy(t.ctx);
    } else if (worker_mpi_loop(s_comm)) {
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    getrusage(RUSAGE_SELF, &r1);
    clock_gettime(CLOCK_MONOTONIC, &w1);
    const double user = s_seconds(r1.ru_utime) - s_seconds(r0.ru_utime);
    const double sys = s_seconds(r1.ru_stime) - s_seconds(r0.ru_stime);
    const double wall = (double)(w1.tv_sec - w0.tv_sec) + (w1.tv_nsec - w0.tv_nsec) * 1e-9;
    printf("rank %d (%s): %.3f s cpu (user %.3f, sys %.3f) over %.3f s idle\n", rank,
           rank ? "worker" : "coordinator", user + sys, user, sys, wall);
    fflush(stdout);
}

int main(int argc, char **argv)
{
    fasa_env_init(NULL, 0); /* FASA_SIMD, read once at start-up */
    int provided = 0, rank = 0, size = 0;
    MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
    if (provided < MPI_THREAD_FUNNELED) {
        fprintf(stderr, "MPI gives thread level %d, below MPI_THREAD_FUNNELED\n", provided);
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    if (size < 2) {
        fprintf(stderr, "fasa_mpi_tests needs at least 2 ranks (mpiexec -n 3 ...)\n");
        MPI_Finalize();
        return EXIT_FAILURE;
    }
    s_n_workers = size - 1;
    /* The transport's own communicator keeps its tags apart from anything else. */
    MPI_Comm_dup(MPI_COMM_WORLD, &s_comm);
    int failed = 0;
    const char *idle = getenv("FASA_MPI_IDLE_SECONDS");
    if (idle && *idle)
        s_idle_run(rank, atof(idle));
    else if (rank == 0)
        failed = s_run_suite();
    else if (worker_mpi_loop_threads(s_comm, rank % 2 ? 2 : 1)) /* threaded and not */
        MPI_Abort(MPI_COMM_WORLD, 2);
    /* Every rank exits with the suite's verdict. */
    MPI_Allreduce(MPI_IN_PLACE, &failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    MPI_Comm_free(&s_comm);
    MPI_Finalize();
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}

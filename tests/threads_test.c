/* Issue 13: the fused dense kernel against its naive reference on every SIMD path, the
 * thread pool, and outputs bit for bit independent of the thread count (shards and the
 * embedded engine, every method). */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "attn.h"
#include "ca.h"
#include "engine.h"
#include "dense.h"
#include "dtype.h"
#include "pool.h"
#include "scan.h"
#include "shard.h"
#include "simd.h"
#include "test_util.h"

/* Stores rows (n, d) of f32 (values in the permuted order: dominant dims first) as the
 * shard does: kdom tiles of the first u dims, krest rows of the rest, in dtype. */
static void s_pack(int dtype, int n, int d, int u, const float *k, void *kdom, void *krest)
{
    const size_t esz = fasa_dtype_size(dtype);
    const int n_tiles = (n + SCORE_TILE - 1) / SCORE_TILE;
    float *td = test_alloc((size_t)n_tiles * SCORE_TILE * (u ? u : 1) * 4);
    float *tr = test_alloc((size_t)n * (d - u ? d - u : 1) * 4);
    for (int j = 0; j < n; j++) {
        for (int c = 0; c < u; c++)
            td[((size_t)(j / SCORE_TILE) * u + c) * SCORE_TILE + j % SCORE_TILE] =
                k[(size_t)j * d + c];
        for (int c = u; c < d; c++) tr[(size_t)j * (d - u) + c - u] = k[(size_t)j * d + c];
    }
    dtype_from_f32(SIMD_PORTABLE, dtype, (size_t)n_tiles * SCORE_TILE * u, td, kdom);
    dtype_from_f32(SIMD_PORTABLE, dtype, (size_t)n * (d - u), tr, krest);
    (void)esz;
    free(td), free(tr);
}

/* dense_block over blocks of a context on path `path` against dense_block_ref and, as an
 * independent check of both, attn_ref on the rounded rows. */
START_TEST(test_dense_block_paths)
{
    test_rng r = {13};
    const int cfg[][4] = {/* n, d, u, n_q */
                          {1, 8, 0, 1},     {17, 16, 4, 3},     {256, 128, 32, 4},
                          {300, 128, 0, 4}, {700, 128, 128, 5}, {513, 64, 20, 8},
                          {40, 42, 10, 2},  {100, 112, 40, 7},  {65, 48, 48, 6}};
    for (size_t ci = 0; ci < sizeof(cfg) / sizeof(*cfg); ci++)
        for (int dt = 0; dt <= FASA_DTYPE_LAST; dt++)
            for (int peaky = 0; peaky < 2; peaky++) {
                const int n = cfg[ci][0], d = cfg[ci][1], u = cfg[ci][2], n_q = cfg[ci][3];
                const size_t esz = fasa_dtype_size(dt);
                const int n_pad = (n + SCORE_TILE - 1) / SCORE_TILE * SCORE_TILE;
                float *q = test_alloc((size_t)n_q * d * 4), *k = test_alloc((size_t)n_pad * d * 4);
                float *v = test_alloc((size_t)n * d * 4), *kr = test_alloc((size_t)n * d * 4);
                float *vr = test_alloc((size_t)n * d * 4);
                void *kdom = test_alloc((size_t)n_pad * (u ? u : 1) * esz);
                void *krest = test_alloc((size_t)n * (d - u ? d - u : 1) * esz);
                void *vs = test_alloc((size_t)n * d * esz);
                float *scr = test_alloc(DENSE_SCRATCH(n_q, d) * 4);
                test_fill(&r, (size_t)n_q * d, q, peaky ? 8.0f : 1.0f);
                test_fill(&r, (size_t)n * d, k, 1.0f);
                test_fill(&r, (size_t)n * d, v, 1.0f);
                s_pack(dt, n, d, u, k, kdom, krest);
                dtype_from_f32(SIMD_PORTABLE, dt, (size_t)n * d, v, vs);
                /* The rounded rows, for attn_ref. */
                dtype_to_f32(SIMD_PORTABLE, dt, (size_t)n * d, vs, vr);
                for (int j = 0; j < n; j++)
                    for (int c = 0; c < d; c++) {
                        uint16_t h;
                        float x = k[(size_t)j * d + c];
                        if (dt == FASA_DTYPE_F16) h = fasa_f32_to_f16(x), x = fasa_f16_to_f32(h);
                        if (dt == FASA_DTYPE_BF16) h = fasa_f32_to_bf16(x), x = fasa_bf16_to_f32(h);
                        kr[(size_t)j * d + c] = x;
                    }
                const float scale = 1.0f / sqrtf((float)d);
                float mr[8], mp[8], out[128], ref[128];
                double lr[8], lp[8], *orf = test_alloc((size_t)n_q * d * 8),
                                     *op = test_alloc((size_t)n_q * d * 8);
                attn_state_init(n_q, d, mr, lr, orf);
                for (int j0 = 0; j0 < n; j0 += DENSE_BLOCK) {
                    const int nb = n - j0 < DENSE_BLOCK ? n - j0 : DENSE_BLOCK;
                    dense_block_ref(dt, nb, d, u, n_q, scale, q,
                                    (char *)kdom + (size_t)j0 * u * esz,
                                    (char *)krest + (size_t)j0 * (d - u) * esz,
                                    (char *)vs + (size_t)j0 * d * esz, mr, lr, orf);
                }
                for (int h = 0; h < n_q; h++) { /* the reference against attn_ref */
                    attn_finalize(d, lr[h], orf + (size_t)h * d, out);
                    attn_ref(n, d, scale, q + (size_t)h * d, kr, d, vr, d, ref);
                    ck_assert_double_le(test_max_abs_diff((size_t)d, out, ref), 1e-6);
                }
                for (int path = 0; path <= SIMD_PATH_LAST; path++) {
                    if (!simd_path_supported((simd_path)path)) continue;
                    attn_state_init(n_q, d, mp, lp, op);
                    for (int j0 = 0; j0 < n; j0 += DENSE_BLOCK) {
                        const int nb = n - j0 < DENSE_BLOCK ? n - j0 : DENSE_BLOCK;
                        dense_block(path, dt, nb, d, u, n_q, scale, q,
                                    (char *)kdom + (size_t)j0 * u * esz,
                                    (char *)krest + (size_t)j0 * (d - u) * esz,
                                    (char *)vs + (size_t)j0 * d * esz, mp, lp, op, scr);
                    }
                    for (int h = 0; h < n_q; h++) {
                        attn_finalize(d, lp[h], op + (size_t)h * d, out);
                        attn_finalize(d, lr[h], orf + (size_t)h * d, ref);
                        const double err = test_max_abs_diff((size_t)d, out, ref);
                        if (err > 2e-5)
                            ck_abort_msg("dense_block path %s dtype %s n %d d %d u %d n_q %d "
                                         "head %d: error %g",
                                         simd_path_name(path), fasa_dtype_name(dt), n, d, u, n_q, h,
                                         err);
                        /* The partial itself, not only its ratio: m within f32 rounding. */
                        ck_assert_float_eq_tol(mp[h], mr[h], 1e-5f * (1 + fabsf(mr[h])));
                        ck_assert_double_le(fabs(lp[h] - lr[h] * exp((double)mr[h] - mp[h])),
                                            1e-5 * lp[h]);
                    }
                }
                free(q), free(k), free(v), free(kr), free(vr), free(kdom), free(krest), free(vs),
                    free(scr), free(orf), free(op);
            }
}
END_TEST

/* dense_path(): the path FASA_SIMD named (simd_path_choose), else avx512 where the CPU has
 * it, else simd_path_default; a named path this CPU lacks falls back. */
START_TEST(test_dense_path_choice)
{
    simd_path_choose(NULL);
    const int best = simd_path_supported(SIMD_AVX512) ? SIMD_AVX512 : (int)simd_path_default();
    ck_assert_int_eq(dense_path(), best);
    ck_assert_int_eq(simd_path_choose("portable"), 0);
    ck_assert_int_eq(dense_path(), SIMD_PORTABLE);
    if (simd_path_supported(SIMD_AVX2)) {
        ck_assert_int_eq(simd_path_choose("avx2"), 0);
        ck_assert_int_eq(dense_path(), SIMD_AVX2);
    }
    if (!simd_path_supported(SIMD_AVX512)) {
        ck_assert_int_eq(simd_path_choose("avx512"), -2);
        ck_assert_int_eq(dense_path(), (int)simd_path_default());
    }
    simd_path_choose(NULL);
    ck_assert_int_eq(dense_path(), best);
}
END_TEST

/* A first block whose logits all overflow to -inf in f32 (finite keys and queries:
 * 1e10 * -1e30) adds nothing on every path: after it and a normal block, m, l and o are
 * those of the normal block alone, bit for bit (the SIMD paths once made l NaN there). */
START_TEST(test_dense_block_inf_block)
{
    test_rng r = {29};
    enum { N = 40, D = 16, U = 4, NQ = 3 };
    const int n_pad = (N + SCORE_TILE - 1) / SCORE_TILE * SCORE_TILE;
    float q[NQ * D], qb[NQ * D], k[n_pad * D], v[N * D], kdom[n_pad * U], krest[N * (D - U)];
    float kb_dom[n_pad * U], kb_rest[N * (D - U)];
    float *scr = test_alloc(DENSE_SCRATCH(NQ, D) * 4);
    test_fill(&r, NQ * D, q, 1.0f);
    test_fill(&r, (size_t)N * D, k, 1.0f);
    test_fill(&r, (size_t)N * D, v, 1.0f);
    s_pack(FASA_DTYPE_F32, N, D, U, k, kdom, krest);
    for (int i = 0; i < NQ * D; i++) qb[i] = 1e10f;
    for (int i = 0; i < n_pad * U; i++) kb_dom[i] = -1e30f;
    for (int i = 0; i < N * (D - U); i++) kb_rest[i] = -1e30f;
    for (int path = 0; path <= SIMD_PATH_LAST; path++) {
        if (!simd_path_supported((simd_path)path)) continue;
        float m0[NQ], m1[NQ];
        double l0[NQ], l1[NQ], o0[NQ * D], o1[NQ * D];
        attn_state_init(NQ, D, m0, l0, o0);
        attn_state_init(NQ, D, m1, l1, o1);
        dense_block(path, FASA_DTYPE_F32, N, D, U, NQ, 0.25f, q, kdom, krest, v, m0, l0, o0, scr);
        dense_block(path, FASA_DTYPE_F32, N, D, U, NQ, 0.25f, qb, kb_dom, kb_rest, v, m1, l1, o1,
                    scr);
        dense_block(path, FASA_DTYPE_F32, N, D, U, NQ, 0.25f, q, kdom, krest, v, m1, l1, o1, scr);
        for (int h = 0; h < NQ; h++)
            if (!isfinite(l1[h]) || l1[h] != l0[h] || m1[h] != m0[h])
                ck_abort_msg("path %s head %d: l %g m %g with the -inf block first, %g %g without",
                             simd_path_name(path), h, l1[h], (double)m1[h], l0[h], (double)m0[h]);
        ck_assert_mem_eq(o1, o0, sizeof(o0));
    }
    free(scr);
}
END_TEST

/* ---- the pool ---- */

typedef struct s_pool_ctx {
    int *hits;   /* (n_tasks) times each task ran */
    int *tid_of; /* (n_tasks) the thread id it ran with */
    int n_threads;
    fasa_pool_t *inner; /* nested runs go here */
    int *inner_hits;    /* (n_tasks, 4) */
} s_pool_ctx;

static void s_inner(void *ctx, int task, int tid)
{
    int *slot = ctx;
    __atomic_fetch_add(&slot[task], 1 + tid * 0, __ATOMIC_RELAXED);
}

static void s_task(void *ctx, int task, int tid)
{
    s_pool_ctx *c = ctx;
    __atomic_fetch_add(&c->hits[task], 1, __ATOMIC_RELAXED);
    c->tid_of[task] = tid;
    if (c->inner) fasa_pool_run(c->inner, 4, s_inner, c->inner_hits + (size_t)task * 4);
}

START_TEST(test_pool_runs_each_task_once)
{
    for (int T = 1; T <= 4; T++) {
        fasa_pool_t *p = fasa_pool_new(T);
        ck_assert_ptr_nonnull(p);
        ck_assert_int_eq(fasa_pool_threads(p), T);
        for (int rep = 0; rep < 50; rep++) {
            const int n = rep % 9; /* 0 .. 8 tasks, fewer and more than threads */
            int hits[8] = {0}, tid_of[8], inner_hits[32] = {0};
            s_pool_ctx c = {hits, tid_of, T, rep % 2 ? p : NULL, inner_hits};
            fasa_pool_run(p, n, s_task, &c);
            for (int t = 0; t < n; t++) {
                ck_assert_int_eq(hits[t], 1);
                ck_assert(tid_of[t] >= 0 && tid_of[t] < T);
                for (int i = 0; c.inner && i < 4; i++) ck_assert_int_eq(inner_hits[t * 4 + i], 1);
            }
        }
        fasa_pool_destroy(&p);
        ck_assert_ptr_null(p);
    }
    int hits[3] = {0}, tid_of[3];
    s_pool_ctx c = {hits, tid_of, 1, NULL, NULL};
    fasa_pool_run(NULL, 3, s_task, &c); /* NULL: inline, thread 0 */
    for (int t = 0; t < 3; t++) ck_assert_int_eq(hits[t] * 10 + tid_of[t], 10);
    ck_assert_ptr_null(fasa_pool_new(0));
    ck_assert_ptr_null(fasa_pool_new(FASA_POOL_MAX + 1));
}
END_TEST

START_TEST(test_threads_from_env)
{
    char why[128] = "";
    setenv("FASA_THREADS", "3", 1);
    setenv("SLURM_CPUS_PER_TASK", "5", 1);
    ck_assert_int_eq(fasa_threads_from_env(why, sizeof(why)), 3);
    unsetenv("FASA_THREADS");
    ck_assert_int_eq(fasa_threads_from_env(why, sizeof(why)), 5);
    setenv("SLURM_CPUS_PER_TASK", "0", 1);
    ck_assert_int_eq(fasa_threads_from_env(why, sizeof(why)), -1);
    ck_assert_ptr_nonnull(strstr(why, "SLURM_CPUS_PER_TASK"));
    setenv("FASA_THREADS", "2x", 1);
    ck_assert_int_eq(fasa_threads_from_env(why, sizeof(why)), -1);
    ck_assert_ptr_nonnull(strstr(why, "FASA_THREADS '2x'"));
    unsetenv("FASA_THREADS");
    unsetenv("SLURM_CPUS_PER_TASK");
    const int n = fasa_threads_from_env(why, sizeof(why));
    ck_assert(n >= 1 && n <= FASA_POOL_MAX);
}
END_TEST

/* ---- outputs independent of the thread count ---- */

#define TT_L 2
#define TT_H 8
#define TT_KV 2
#define TT_D 32
#define TT_N 1500 /* tokens: several dense blocks and a partial SHARD_CHUNK */
#define TT_B 40

/* A profile with pseudo-random FCs per head (per KV head when shared). */
static fasa_profile *s_profile(int shared)
{
    fasa_profile *p = fasa_profile_new(TT_L, TT_H, TT_KV, TT_D, 4);
    ck_assert_ptr_nonnull(p);
    const int n_fc = TT_D / 2, grp = TT_H / TT_KV;
    for (int l = 0; l < TT_L; l++)
        for (int h = 0; h < TT_H; h++) {
            double *ca = p->ca + ((size_t)l * TT_H + h) * n_fc;
            test_rng rr = {1000u + (unsigned)l * 64 + (unsigned)(shared ? h / grp : h)};
            for (int i = 0; i < n_fc; i++) ca[i] = (double)(test_next(&rr) % 1000) / 1000.0;
            ca_select(n_fc, 4, ca, p->fcs + ((size_t)l * TT_H + h) * 4);
        }
    p->gqa_shared = shared;
    p->window = 32;
    return p;
}

/* Every method and GQA mode on an engine of n_shards shards and n_threads threads: the
 * outputs of a few steps per layer into out (n_cases, TT_L, steps, TT_H, TT_D) and the
 * selections into sel. Returns the number of floats written. */
static size_t s_engine_run(int n_shards, int n_threads, int dtype, const float *k, const float *v,
                           const float *q, float *out, int32_t *sel)
{
    fasa_transport t;
    ck_assert_int_eq(fasa_transport_local_threads(&t, n_shards, n_threads), 0);
    fasa_engine_t *e = fasa_engine_new_with(&t, 64);
    ck_assert_ptr_nonnull(e);
    size_t no = 0, ns = 0;
    for (int shared = 0; shared < 2; shared++) {
        fasa_profile *p = s_profile(shared);
        const fasa_session_config cfg = {.n_layers = TT_L,
                                         .n_heads = TT_H,
                                         .n_kv_heads = TT_KV,
                                         .head_dim = TT_D,
                                         .pairing = FC_PAIRING_INTERLEAVED,
                                         .profile = p,
                                         .method = FASA_METHOD_FASA,
                                         .budget = TT_B,
                                         .gqa = (fasa_gqa)shared,
                                         .dtype = dtype};
        fasa_error err;
        ck_assert_int_eq(fasa_engine_create(e, "s", &cfg, &err), FASA_OK);
        ck_assert_int_eq(fasa_engine_append(e, "s", -1, 0, TT_N, k, v, &err), FASA_OK);
        for (int m = 0; m <= FASA_METHOD_LAST; m++) {
            if (shared && (m == FASA_METHOD_SPARQ || m == FASA_METHOD_FASA_PLUS))
                continue; /* per-head only */
            for (int l = 0; l < TT_L; l++)
                for (int step = 0; step < 3; step++) {
                    const fasa_attend_req req = {.layer = l,
                                                 .q = q + ((size_t)l * 3 + step) * TT_H * TT_D,
                                                 .method = m,
                                                 .gqa = -1,
                                                 .max_pos = TT_N - 1 - 311 * step};
                    ck_assert_msg(
                        fasa_engine_attend(e, "s", &req, out + no, sel + ns, NULL, &err) == FASA_OK,
                        "%s", err.msg);
                    no += (size_t)TT_H * TT_D;
                    ns += (size_t)TT_H * TT_B;
                }
        }
        ck_assert_int_eq(fasa_engine_drop(e, "s", &err), FASA_OK);
        fasa_profile_destroy(&p);
    }
    fasa_engine_destroy(&e);
    return no;
}

/* T = 1, 2, 3 threads, 1 and 3 shards, f32 and f16: the same bits as T = 1. */
START_TEST(test_engine_threads_identical)
{
    test_rng r = {77};
    const size_t nkv = (size_t)TT_L * TT_N * TT_KV * TT_D;
    float *k = test_alloc(nkv * 4), *v = test_alloc(nkv * 4);
    float *q = test_alloc((size_t)TT_L * 3 * TT_H * TT_D * 4);
    test_fill(&r, nkv, k, 1.0f);
    test_fill(&r, nkv, v, 1.0f);
    test_fill(&r, (size_t)TT_L * 3 * TT_H * TT_D, q, 3.0f);
    const size_t cap = (size_t)2 * (FASA_METHOD_LAST + 1) * TT_L * 3 * TT_H;
    float *o1 = test_alloc(cap * TT_D * 4), *ot = test_alloc(cap * TT_D * 4);
    int32_t *s1 = test_alloc(cap * TT_B * 4), *st = test_alloc(cap * TT_B * 4);
    const int dtypes[2] = {FASA_DTYPE_F32, FASA_DTYPE_F16}, shards[2] = {1, 3};
    for (int di = 0; di < 2; di++)
        for (int si = 0; si < 2; si++) {
            const size_t no = s_engine_run(shards[si], 1, dtypes[di], k, v, q, o1, s1);
            ck_assert(no > 0);
            for (int T = 2; T <= 3; T++) {
                memset(ot, 0xff, no * 4);
                const size_t nt = s_engine_run(shards[si], T, dtypes[di], k, v, q, ot, st);
                ck_assert_int_eq(nt, no);
                if (memcmp(o1, ot, no * 4) || memcmp(s1, st, no / TT_D * TT_B * 4))
                    ck_abort_msg("%d threads, %d shards, %s: outputs differ from 1 thread", T,
                                 shards[si], fasa_dtype_name(dtypes[di]));
            }
        }
    free(k), free(v), free(q), free(o1), free(ot), free(s1), free(st);
}
END_TEST

/* One shard on pools of 1, 2 and 3 threads: shard_score's candidates and shard_attend's
 * partials bit for bit equal to no pool, for every method (and the partial of dense equal
 * to exact attention, so the comparison is of right answers). */
START_TEST(test_shard_threads_identical)
{
    test_rng r = {78};
    shard_layout lay;
    ck_assert_int_eq(shard_layout_plain(&lay, 1, TT_H, TT_KV, TT_D), 0);
    for (int g = 0; g < TT_KV; g++) { /* 8 dominant dims per KV head */
        lay.n_dom[g] = 8;
        for (int i = 0; i < TT_H / TT_KV; i++)
            memset(lay.qmask + (size_t)(g * (TT_H / TT_KV) + i) * TT_D, 1, 8);
    }
    const size_t nkv = (size_t)TT_N * TT_KV * TT_D;
    float *k = test_alloc(nkv * 4), *v = test_alloc(nkv * 4), *q = test_alloc(TT_H * TT_D * 4);
    int32_t *pos = test_alloc(TT_N * 4);
    test_fill(&r, nkv, k, 1.0f);
    test_fill(&r, nkv, v, 1.0f);
    test_fill(&r, TT_H * TT_D, q, 3.0f);
    for (int i = 0; i < TT_N; i++) pos[i] = 3 * i;
    shard_t *sh[4];
    /* sh[0] without a pool, sh[i] on a pool of i threads. */
    fasa_pool_t *pools[4] = {NULL, fasa_pool_new(1), fasa_pool_new(2), fasa_pool_new(3)};
    for (int i = 0; i < 4; i++) {
        ck_assert_ptr_nonnull(sh[i] = shard_new(&lay));
        ck_assert_int_eq(shard_append(sh[i], 0, TT_N, pos, k, v), 0);
        if (i) {
            ck_assert_ptr_nonnull(pools[i]);
            shard_set_pool(sh[i], pools[i]);
        }
    }
    const size_t nc = (size_t)TT_H * TT_B;
    topk_cand *c0 = test_alloc(nc * sizeof(topk_cand)), *ci = test_alloc(nc * sizeof(topk_cand));
    topk_cand thr[TT_H];
    uint8_t have[TT_H];
    int n0[TT_H], ni[TT_H];
    float m0[TT_H], mi[TT_H];
    double l0[TT_H], li[TT_H], o0[TT_H * TT_D], oi[TT_H * TT_D];
    for (int method = 0; method <= SHARD_METHOD_LAST; method++)
        for (int gqa = 0; gqa < 2; gqa++) {
            if (gqa && (method == SHARD_SPARQ || method == SHARD_FASA_PLUS))
                continue; /* per-head GQA only (shard.h) */
            const shard_step st = {.layer = 0,
                                   .method = (shard_method)method,
                                   .gqa = (shard_gqa)gqa,
                                   .budget = TT_B,
                                   .max_pos = 3 * (TT_N - 7),
                                   .scale = 1.0f / sqrtf((float)TT_D),
                                   .q = q,
                                   .sparq_r = method == SHARD_SPARQ ? 8 : 0};
            const int units = shard_units(sh[0], st.gqa);
            if (method != SHARD_DENSE) {
                ck_assert_int_eq(shard_score(sh[0], &st, c0, n0), 0);
                for (int u = 0; u < units; u++) { /* a threshold inside each unit's list */
                    have[u] = n0[u] > 0;
                    thr[u] = n0[u] > 0 ? c0[(size_t)u * TT_B + n0[u] / 2] : (topk_cand){0, 0};
                }
            }
            ck_assert_int_eq(shard_attend(sh[0], &st, thr, have, m0, l0, o0), 0);
            const int64_t b0 = shard_bytes_read(sh[0]);
            for (int i = 1; i < 4; i++) {
                if (method != SHARD_DENSE) {
                    ck_assert_int_eq(shard_score(sh[i], &st, ci, ni), 0);
                    ck_assert_mem_eq(ni, n0, (size_t)units * sizeof(int));
                    for (int u = 0; u < units; u++)
                        ck_assert_mem_eq(ci + (size_t)u * TT_B, c0 + (size_t)u * TT_B,
                                         (size_t)n0[u] * sizeof(topk_cand));
                }
                ck_assert_int_eq(shard_attend(sh[i], &st, thr, have, mi, li, oi), 0);
                ck_assert_mem_eq(mi, m0, sizeof(m0));
                ck_assert_mem_eq(li, l0, sizeof(l0));
                ck_assert_mem_eq(oi, o0, sizeof(o0));
                ck_assert_int_eq(shard_bytes_read(sh[i]), b0);
            }
            if (method == SHARD_DENSE) /* against exact attention over the visible rows */
                for (int h = 0; h < TT_H; h++) {
                    float out[TT_D], want[TT_D];
                    attn_finalize(TT_D, l0[h], o0 + h * TT_D, out);
                    attn_ref(TT_N - 6, TT_D, st.scale, q + h * TT_D,
                             k + (h / (TT_H / TT_KV)) * TT_D, TT_KV * TT_D,
                             v + (h / (TT_H / TT_KV)) * TT_D, TT_KV * TT_D, want);
                    ck_assert_double_le(test_max_abs_diff(TT_D, out, want), 2e-6);
                }
        }
    for (int i = 0; i < 4; i++) shard_destroy(&sh[i]);
    for (int i = 1; i < 4; i++) fasa_pool_destroy(&pools[i]);
    shard_layout_cleanup(&lay);
    free(k), free(v), free(q), free(pos), free(c0), free(ci);
}
END_TEST

/* Per-head GQA's phase 2 gathers each KV group's union once (s_attend_union); the reference
 * gathers head by head (shard_set_gather_per_head). On 1, 2 and 3 shards (rows dealt in
 * blocks) and pools of 1, 2 and 3 threads, for every sparse method and f32/f16: each
 * shard's partials (and fasa-plus's aux, less the attended rows) are bit for bit the
 * reference's, and the union reads exactly the reference's bytes less the rows it did not
 * read twice (counted from the candidates; fasa-plus, whose heads attend the group's
 * union: less the union once per head with a selection but one). The group's queries are
 * correlated, so that their selections overlap. */
START_TEST(test_shard_union_gather)
{
    enum { NS = 3, BLK = 96, GRP = TT_H / TT_KV };
    test_rng r = {91};
    shard_layout lay;
    ck_assert_int_eq(shard_layout_plain(&lay, 1, TT_H, TT_KV, TT_D), 0);
    for (int g = 0; g < TT_KV; g++) {
        lay.n_dom[g] = 8;
        for (int i = 0; i < GRP; i++) memset(lay.qmask + (size_t)(g * GRP + i) * TT_D, 1, 8);
    }
    const size_t nkv = (size_t)TT_N * TT_KV * TT_D;
    float *k = test_alloc(nkv * 4), *v = test_alloc(nkv * 4), *q = test_alloc(TT_H * TT_D * 4);
    float *base = test_alloc(TT_KV * TT_D * 4), *noise = test_alloc(TT_H * TT_D * 4);
    int32_t *pos = test_alloc(TT_N * 4), *spos = test_alloc(TT_N * 4);
    float *sk = test_alloc(nkv * 4), *sv = test_alloc(nkv * 4);
    test_fill(&r, nkv, k, 1.0f);
    test_fill(&r, nkv, v, 1.0f);
    test_fill(&r, TT_KV * TT_D, base, 3.0f);
    test_fill(&r, TT_H * TT_D, noise, 1.0f);
    for (int h = 0; h < TT_H; h++)
        for (int c = 0; c < TT_D; c++)
            q[h * TT_D + c] = base[(h / GRP) * TT_D + c] + noise[h * TT_D + c];
    for (int i = 0; i < TT_N; i++) pos[i] = 3 * i;
    fasa_pool_t *pools[4] = {NULL, NULL, fasa_pool_new(2), fasa_pool_new(3)};
    ck_assert_ptr_nonnull(pools[2]);
    ck_assert_ptr_nonnull(pools[3]);
    const int dtypes[2] = {FASA_DTYPE_F32, FASA_DTYPE_F16};
    const int methods[] = {SHARD_FASA, SHARD_FASA_PLUS, SHARD_SPARQ, SHARD_ORACLE, SHARD_STREAM};
    const size_t na = (size_t)TT_H * SHARD_SPARQ_AUX(TT_D);
    const size_t nc = (size_t)NS * TT_H * TT_B;
    topk_cand *cands = test_alloc(nc * sizeof(topk_cand)),
              *all = test_alloc(nc * sizeof(topk_cand));
    double *aux_u = test_alloc(na * 8), *aux_h = test_alloc(na * 8);
    int n_cands[NS * TT_H], checked_shared = 0;
    for (int di = 0; di < 2; di++)
        for (int ns = 1; ns <= NS; ns++) {
            shard_t *uni[NS], *ref[NS];
            for (int si = 0; si < ns; si++) { /* rows in blocks of BLK, dealt round robin */
                int n = 0;
                for (int i = 0; i < TT_N; i++)
                    if ((i / BLK) % ns == si) {
                        spos[n] = pos[i];
                        memcpy(sk + (size_t)n * TT_KV * TT_D, k + (size_t)i * TT_KV * TT_D,
                               TT_KV * TT_D * 4);
                        memcpy(sv + (size_t)n * TT_KV * TT_D, v + (size_t)i * TT_KV * TT_D,
                               TT_KV * TT_D * 4);
                        n++;
                    }
                lay.dtype = dtypes[di];
                ck_assert_ptr_nonnull(uni[si] = shard_new(&lay));
                ck_assert_ptr_nonnull(ref[si] = shard_new(&lay));
                ck_assert_int_eq(shard_append(uni[si], 0, n, spos, sk, sv), 0);
                ck_assert_int_eq(shard_append(ref[si], 0, n, spos, sk, sv), 0);
                shard_set_gather_per_head(ref[si], 1);
            }
            for (size_t mi = 0; mi < sizeof(methods) / sizeof(*methods); mi++)
                for (int T = 1; T <= 3; T++) {
                    const int method = methods[mi];
                    const shard_step st = {.layer = 0,
                                           .method = (shard_method)method,
                                           .gqa = SHARD_GQA_PER_HEAD,
                                           .budget = TT_B,
                                           .max_pos = 3 * (TT_N - 7),
                                           .scale = 1.0f / sqrtf((float)TT_D),
                                           .q = q,
                                           .sparq_r = method == SHARD_SPARQ       ? 8
                                                      : method == SHARD_FASA_PLUS ? 5
                                                                                  : 0};
                    for (int si = 0; si < ns; si++) { /* both score the same */
                        int n_ref[TT_H];
                        topk_cand *c = cands + (size_t)si * TT_H * TT_B;
                        shard_set_pool(uni[si], pools[T]);
                        shard_set_pool(ref[si], pools[T]);
                        ck_assert_int_eq(shard_score(uni[si], &st, c, n_cands + si * TT_H), 0);
                        ck_assert_int_eq(shard_score(ref[si], &st, all, n_ref), 0);
                        ck_assert_mem_eq(n_ref, n_cands + si * TT_H, sizeof(n_ref));
                        for (int h = 0; h < TT_H; h++)
                            ck_assert_mem_eq(all + (size_t)h * TT_B, c + (size_t)h * TT_B,
                                             (size_t)n_ref[h] * sizeof(topk_cand));
                    }
                    /* The global threshold of each head, as the merge finds it: the B-th
                     * best of every shard's candidates. Head 1 selects nothing. */
                    topk_cand thr[TT_H];
                    uint8_t have[TT_H];
                    for (int h = 0; h < TT_H; h++) {
                        int n = 0;
                        for (int si = 0; si < ns; si++)
                            for (int j = 0; j < n_cands[si * TT_H + h]; j++)
                                all[n++] = cands[((size_t)si * TT_H + h) * TT_B + j];
                        topk_sort(n, all);
                        have[h] = n > 0 && h != 1;
                        thr[h] = n > 0 ? all[(n < TT_B ? n : TT_B) - 1] : (topk_cand){0, 0};
                    }
                    for (int si = 0; si < ns; si++) {
                        float mu[TT_H], mh[TT_H];
                        double lu[TT_H], lh[TT_H], ou[TT_H * TT_D], oh[TT_H * TT_D];
                        ck_assert_int_eq(shard_attend(ref[si], &st, thr, have, mh, lh, oh), 0);
                        ck_assert_int_eq(shard_attend(uni[si], &st, thr, have, mu, lu, ou), 0);
                        ck_assert_mem_eq(mu, mh, sizeof(mu));
                        ck_assert_mem_eq(lu, lh, sizeof(lu));
                        ck_assert_mem_eq(ou, oh, sizeof(ou));
                        if (method == SHARD_FASA_PLUS) {
                            shard_sparq_aux(uni[si], &st, aux_u);
                            shard_sparq_aux(ref[si], &st, aux_h);
                            ck_assert_mem_eq(aux_u, aux_h, na * 8);
                        }
                        /* Rows each head attends, and rows each group's union holds
                         * (fasa-plus: each head with a selection attends its group's
                         * union, which the reference gathers for each of them). */
                        int64_t twice = 0, plus_again = 0;
                        for (int g = 0; g < TT_KV; g++) {
                            int32_t seen[GRP * TT_B];
                            int n_seen = 0, n_have = 0;
                            for (int i = 0; i < GRP; i++) {
                                const int h = g * GRP + i;
                                n_have += have[h];
                                const topk_cand *c = cands + ((size_t)si * TT_H + h) * TT_B;
                                for (int j = 0; have[h] && j < n_cands[si * TT_H + h]; j++) {
                                    if (topk_better(thr[h], c[j])) continue;
                                    int dup = 0;
                                    for (int x = 0; x < n_seen && !dup; x++)
                                        dup = seen[x] == c[j].pos;
                                    if (dup)
                                        twice++;
                                    else
                                        seen[n_seen++] = c[j].pos;
                                }
                            }
                            if (n_have > 0) plus_again += (int64_t)(n_have - 1) * n_seen;
                        }
                        checked_shared += twice > 0;
                        ck_assert_int_eq(shard_bytes_read(ref[si]) - shard_bytes_read(uni[si]),
                                         (method == SHARD_FASA_PLUS ? plus_again : twice) * 2 *
                                             TT_D * (int64_t)fasa_dtype_size(dtypes[di]));
                    }
                }
            for (int si = 0; si < ns; si++) shard_destroy(&uni[si]), shard_destroy(&ref[si]);
        }
    ck_assert_int_gt(checked_shared, 0); /* the unions did share rows */
    fasa_pool_destroy(&pools[2]);
    fasa_pool_destroy(&pools[3]);
    shard_layout_cleanup(&lay);
    free(k), free(v), free(q), free(base), free(noise), free(pos), free(spos), free(sk), free(sv);
    free(cands), free(all), free(aux_u), free(aux_h);
}
END_TEST

/* The FASA scan split into row parts (when that cuts the rounds of work: s_score_n_parts):
 * over 4 chunks and a partial one, pools of 3, 5 and 16 threads (2 KV heads: 3 parts, 3,
 * and one per chunk) give the candidates, phase 2's partials and the bytes read of no pool,
 * bit for bit, for f32 and f16, per-head and shared GQA, three visible lengths (5, 3 and 2
 * chunks, the last partial); and per-head f32 candidates equal the best budget of the scan
 * kernel's scores of the rows packed by hand (topk_ref). */
START_TEST(test_shard_scan_parts)
{
    enum { H = 4, KV = 2, D = 16, U = 8, B = 33, N = 4 * SHARD_CHUNK + 321 };
    test_rng r = {79};
    const size_t nkv = (size_t)N * KV * D;
    float *k = test_alloc(nkv * 4), *v = test_alloc(nkv * 4), q[H * D];
    int32_t *pos = test_alloc(N * 4);
    test_fill(&r, nkv, k, 1.0f);
    test_fill(&r, nkv, v, 1.0f);
    test_fill(&r, H * D, q, 2.0f);
    for (int i = 0; i < N; i++) pos[i] = 2 * i + 1;
    void *tiles = test_alloc((size_t)(N / SCORE_TILE + 1) * scan_tile_bytes(SCAN_F32, U));
    float *sc = test_alloc((size_t)N * 4);
    topk_cand *all = test_alloc((size_t)N * sizeof(topk_cand)), ref[B];
    const int threads[3] = {3, 5, 16};
    for (int dtype = FASA_DTYPE_F32; dtype <= FASA_DTYPE_F16; dtype++) {
        shard_layout lay;
        ck_assert_int_eq(shard_layout_plain(&lay, 1, H, KV, D), 0);
        lay.dtype = dtype;
        for (int g = 0; g < KV; g++) lay.n_dom[g] = U;
        memset(lay.qmask, 0, (size_t)H * D);
        for (int h = 0; h < H; h++) memset(lay.qmask + (size_t)h * D, 1, U);
        shard_t *sh[4];
        fasa_pool_t *pools[4] = {NULL};
        for (int i = 0; i < 4; i++) {
            ck_assert_ptr_nonnull(sh[i] = shard_new(&lay));
            ck_assert_int_eq(shard_append(sh[i], 0, N, pos, k, v), 0);
            if (i) {
                ck_assert_ptr_nonnull(pools[i] = fasa_pool_new(threads[i - 1]));
                shard_set_pool(sh[i], pools[i]);
            }
        }
        const int max_pos[3] = {pos[N - 1], pos[2 * SHARD_CHUNK + 5], pos[SHARD_CHUNK]};
        for (int vi = 0; vi < 3; vi++)
            for (int gqa = 0; gqa < 2; gqa++) {
                const shard_step st = {.layer = 0,
                                       .method = SHARD_FASA,
                                       .gqa = (shard_gqa)gqa,
                                       .budget = B,
                                       .max_pos = max_pos[vi],
                                       .scale = 1.0f / sqrtf((float)D),
                                       .q = q};
                const int units = shard_units(sh[0], st.gqa);
                const int n_vis = shard_visible(sh[0], 0, st.max_pos);
                topk_cand c[4][H * B], thr[H];
                int nc[4][H];
                uint8_t have[H];
                float m[4][H];
                double l[4][H], o[4][H * D];
                int64_t bytes[4];
                for (int i = 0; i < 4; i++) {
                    ck_assert_int_eq(shard_score(sh[i], &st, c[i], nc[i]), 0);
                    if (i == 0)
                        for (int u = 0; u < units; u++) {
                            have[u] = nc[0][u] > 0;
                            thr[u] = c[0][u * B + nc[0][u] - 1];
                        }
                    ck_assert_int_eq(shard_attend(sh[i], &st, thr, have, m[i], l[i], o[i]), 0);
                    bytes[i] = shard_bytes_read(sh[i]);
                }
                for (int i = 1; i < 4; i++) {
                    ck_assert_mem_eq(nc[i], nc[0], (size_t)units * sizeof(int));
                    for (int u = 0; u < units; u++)
                        ck_assert_mem_eq(c[i] + u * B, c[0] + u * B,
                                         (size_t)nc[0][u] * sizeof(topk_cand));
                    ck_assert_mem_eq(m[i], m[0], (size_t)units * sizeof(float));
                    ck_assert_mem_eq(l[i], l[0], (size_t)units * sizeof(double));
                    ck_assert_mem_eq(o[i], o[0], (size_t)units * D * sizeof(double));
                    ck_assert_int_eq(bytes[i], bytes[0]);
                }
                if (dtype != FASA_DTYPE_F32 || gqa) continue;
                for (int h = 0; h < H; h++) { /* the reference selection */
                    const int g = h / (H / KV);
                    memset(tiles, 0, (size_t)(N / SCORE_TILE + 1) * scan_tile_bytes(SCAN_F32, U));
                    for (int j = 0; j < n_vis; j++)
                        scan_pack_row(SCAN_F32, U, k + ((size_t)j * KV + g) * D, tiles, NULL, j);
                    scan_q sq = {0};
                    ck_assert_int_eq(scan_q_prep(&sq, SCAN_F32, 1, U, q + h * D), 0);
                    scan_scores(SIMD_AUTO, &sq, n_vis, tiles, NULL, sc, n_vis);
                    scan_q_free(&sq);
                    for (int j = 0; j < n_vis; j++) all[j] = (topk_cand){sc[j], pos[j]};
                    const int want = topk_ref(n_vis, B, all, ref);
                    ck_assert_int_eq(nc[0][h], want);
                    for (int i = 0; i < 4; i++)
                        ck_assert_mem_eq(c[i] + h * B, ref, (size_t)want * sizeof(topk_cand));
                }
            }
        for (int i = 0; i < 4; i++) shard_destroy(&sh[i]);
        for (int i = 1; i < 4; i++) fasa_pool_destroy(&pools[i]);
        shard_layout_cleanup(&lay);
    }
    free(k), free(v), free(pos), free(tiles), free(sc), free(all);
}
END_TEST

Suite *threads_suite(void)
{
    const TTest *tests[] = {test_dense_block_paths,       test_dense_path_choice,
                            test_dense_block_inf_block,   test_pool_runs_each_task_once,
                            test_threads_from_env,        test_engine_threads_identical,
                            test_shard_threads_identical, test_shard_union_gather,
                            test_shard_scan_parts,        NULL};
    return test_suite("threads", "core", 300, tests);
}

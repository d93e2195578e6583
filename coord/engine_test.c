/* The engine: shard-count independence, bad input, profiles; and the same on the recorded
 * stories260K activations (golden suite) against exact attention computed here. */
#define _DEFAULT_SOURCE /* mkdtemp */
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "attn.h"
#include "ca.h"
#include "calib.h"
#include "engine.h"
#include "simd.h"
#include "qkv.h"
#include "test_util.h"

/* A profile with pseudo-random distinct FCs per head (shared: per KV head). */
static fasa_profile *s_random_profile(int nl, int nh, int nkv, int d, int ntip, int shared,
                                      uint64_t seed)
{
    fasa_profile *p = fasa_profile_new(nl, nh, nkv, d, ntip);
    ck_assert_ptr_nonnull(p);
    test_rng r = {seed};
    const int n_fc = d / 2, grp = nh / nkv;
    for (int l = 0; l < nl; l++)
        for (int h = 0; h < nh; h++) {
            double *ca = p->ca + ((size_t)l * nh + h) * n_fc;
            test_rng rr = {shared ? seed * 1000 + l * 64 + h / grp : test_next(&r)};
            for (int i = 0; i < n_fc; i++) ca[i] = (double)(test_next(&rr) % 1000) / 1000.0;
            ca_select(n_fc, ntip, ca, p->fcs + ((size_t)l * nh + h) * ntip);
        }
    p->gqa_shared = shared;
    p->window = 32;
    return p;
}

typedef struct run_cfg {
    int nl, nh, nkv, d, T, prefix, block;
    fasa_method method;
    fasa_gqa gqa;
    int budget;
    const fasa_profile *profile;
    const float *const *q, *const *k, *const *v; /* per layer, (T, heads, d) */
    int pos_step;
} run_cfg;

/* The fasa_dtype s_run creates its sessions with (test_engine_dtype sets it; 0 = f32), and
 * with a directory the disk tier (test_engine_disk_tier). */
static int s_run_dtype;
static const char *s_run_tier_dir;

/* Replays positions prefix..T-1 (step pos_step) on an engine with n_shards; writes outputs
 * (n_steps, nl, nh, d) and selections (n_steps, nl, nh, budget). */
static void s_run(const run_cfg *c, int n_shards, float *out, int32_t *sel)
{
    fasa_engine_t *e = fasa_engine_new(n_shards, c->block);
    ck_assert_ptr_nonnull(e);
    fasa_session_config cfg = {.n_layers = c->nl,
                               .n_heads = c->nh,
                               .n_kv_heads = c->nkv,
                               .head_dim = c->d,
                               .pairing = FC_PAIRING_INTERLEAVED,
                               .profile = c->profile,
                               .method = c->method,
                               .budget = c->budget,
                               .gqa = c->gqa,
                               .dtype = s_run_dtype,
                               .tier = s_run_tier_dir ? 1 : 0,
                               .tier_dir = s_run_tier_dir};
    fasa_error err;
    ck_assert_int_eq(fasa_engine_create(e, "s", &cfg, &err), FASA_OK);
    const size_t row = (size_t)c->nkv * c->d;
    for (int l = 0; l < c->nl; l++)
        ck_assert_int_eq(fasa_engine_append(e, "s", l, 0, c->prefix, c->k[l], c->v[l], &err),
                         FASA_OK);
    int step = 0;
    for (int t = c->prefix; t < c->T; t++) {
        const int attend = (t - c->prefix) % c->pos_step == 0;
        for (int l = 0; l < c->nl; l++) {
            if (!attend) {
                ck_assert_int_eq(
                    fasa_engine_append(e, "s", l, t, 1, c->k[l] + t * row, c->v[l] + t * row, &err),
                    FASA_OK);
                continue;
            }
            fasa_attend_req req = {.layer = l,
                                   .q = c->q[l] + (size_t)t * c->nh * c->d,
                                   .k_new = c->k[l] + t * row,
                                   .v_new = c->v[l] + t * row,
                                   .method = -1,
                                   .gqa = -1,
                                   .max_pos = -1};
            const size_t o = (size_t)step * c->nl + l;
            ck_assert_int_eq(fasa_engine_attend(e, "s", &req, out + o * c->nh * c->d,
                                                sel ? sel + o * c->nh * c->budget : NULL, NULL,
                                                &err),
                             FASA_OK);
        }
        step += attend;
    }
    fasa_engine_destroy(&e);
}

/* Naive reference of one fasa-plus step (engine.h), head h at position t of layer l (keys
 * 0..t visible, layer 0 dense), over all keys of the layer in one array, in double: the
 * scores over the union of the group's FCs (interleaved pairing), position 0 and the R most
 * recent positions first, the exact attention over the top B and the unselected tokens U:
 * their mass sum exp(z_j) exp(c), z_j = scale s_j, c the mean of scale mu and of the log of
 * the selected tokens' sum exp(scale x_j) / sum exp(z_j) (x_j the full score), attending to
 * vbar_U + cov_U(v, z) / var_U(z) (zhat - zbar_U), zhat the exp(z)-weighted mean of z. */
static void s_ref_plus(const run_cfg *c, int l, int t, int h, float *out, int32_t *sel)
{
    const int d = c->d, nkv = c->nkv, grp = c->nh / nkv, g = h / grp, B = c->budget;
    const int n_vis = t + 1, ntip = c->profile->ntip;
    const float *K = c->k[l], *V = c->v[l], *q = c->q[l] + ((size_t)t * c->nh + h) * d;
    const double scale = 1.0f / sqrtf((float)d);
    uint8_t dom[d], *use = test_alloc((size_t)n_vis);
    memset(dom, 0, sizeof(dom));
    for (int hh = g * grp; hh < g * grp + grp; hh++)
        for (int i = 0; i < ntip; i++) {
            const int fc = c->profile->fcs[((size_t)l * c->nh + hh) * ntip + i];
            dom[2 * fc] = dom[2 * fc + 1] = 1;
        }
    int R = B / (2 * ntip) - 1;
    R = R < 0 ? 0 : R > B - 1 ? B - 1 : R;
    double *sj = test_alloc((size_t)n_vis * sizeof(double)), mu = 0;
    topk_cand *all = test_alloc((size_t)n_vis * sizeof(topk_cand));
    topk_cand *best = test_alloc((size_t)B * sizeof(topk_cand));
    for (int j = 0; j < n_vis; j++) {
        sj[j] = 0;
        for (int cc = 0; cc < d; cc++) {
            const double x = (double)q[cc] * K[((size_t)j * nkv + g) * d + cc];
            if (dom[cc])
                sj[j] += x;
            else
                mu += x / n_vis;
        }
        all[j] = (topk_cand){j == 0 || j > t - R ? INFINITY : (float)sj[j], j};
    }
    const int sparse = l != 0 && n_vis > B;
    if (!sparse) {
        for (int j = 0; j < n_vis; j++) use[j] = 1;
        if (n_vis <= B)
            for (int j = 0; j < n_vis; j++) sel[j] = j;
    } else {
        ck_assert_int_eq(topk_ref(n_vis, B, all, best), B);
        for (int i = 0; i < B; i++) use[best[i].pos] = 1, sel[i] = best[i].pos;
    }
    double mx = -INFINITY, den = 0, acc[d], mass = 0, vbar[d], vz[d];
    double e1 = 0, e2 = 0, z1 = 0, z2 = 0, zw = 0;
    for (int j = 0; j < n_vis; j++) {
        double x = 0;
        for (int cc = 0; cc < d; cc++) x += (double)q[cc] * K[((size_t)j * nkv + g) * d + cc];
        if (use[j]) mx = x * scale > mx ? x * scale : mx;
    }
    for (int cc = 0; cc < d; cc++) acc[cc] = vbar[cc] = vz[cc] = 0;
    int n_unsel = 0;
    for (int j = 0; j < n_vis; j++) {
        const float *vj = V + ((size_t)j * nkv + g) * d;
        const double z = scale * sj[j];
        if (use[j]) {
            double x = 0;
            for (int cc = 0; cc < d; cc++) x += (double)q[cc] * K[((size_t)j * nkv + g) * d + cc];
            const double w = exp(x * scale - mx);
            den += w;
            for (int cc = 0; cc < d; cc++) acc[cc] += w * vj[cc];
            e1 += exp(z - mx), e2 += w;
        } else {
            const double w = exp(z - mx);
            mass += w;
            z1 += z, z2 += z * z, zw += w * z;
            for (int cc = 0; cc < d; cc++) vbar[cc] += vj[cc], vz[cc] += z * vj[cc];
            n_unsel++;
        }
    }
    if (n_unsel > 0 && mass > 0) {
        const double c0 = 0.5 * (scale * mu + log(e2 / e1)), zbar = z1 / n_unsel;
        const double varz = z2 / n_unsel - zbar * zbar, zhat = zw / mass;
        for (int cc = 0; cc < d; cc++) {
            const double vb = vbar[cc] / n_unsel;
            const double vu = n_unsel > 1 && varz > 1e-12
                                  ? vb + (vz[cc] / n_unsel - vb * zbar) / varz * (zhat - zbar)
                                  : vb;
            acc[cc] += mass * exp(c0) * vu;
        }
        den += mass * exp(c0);
    }
    for (int cc = 0; cc < d; cc++) out[cc] = (float)(acc[cc] / den);
    free(use), free(sj), free(all), free(best);
}

/* Naive reference of one stream, quest or sparq step, straight from fasa-algorithm.md §6 over all
 * keys of the layer in one array: head h at position t of layer l (keys 0..t visible).
 * sel (budget) gets the positions as the engine reports them, -1 padded; out (d) the
 * exact attention over the chosen tokens, in double. */
static void s_ref_baseline(const run_cfg *c, int l, int t, int h, float *out, int32_t *sel)
{
    const int d = c->d, nkv = c->nkv, grp = c->nh / nkv, g = h / grp, B = c->budget;
    const int n_vis = t + 1;
    const float *K = c->k[l], *V = c->v[l], *q = c->q[l] + ((size_t)t * c->nh + h) * d;
    uint8_t *use = test_alloc((size_t)n_vis);
    for (int i = 0; i < B; i++) sel[i] = -1;
    if (c->method == FASA_METHOD_FASA_PLUS) {
        free(use);
        s_ref_plus(c, l, t, h, out, sel);
        return;
    }
    double alpha = 1, vbar[d]; /* sparq's mean-value reallocation */
    if (n_vis <= B) {
        for (int i = 0; i < n_vis; i++) use[i] = 1, sel[i] = i;
    } else if (c->method == FASA_METHOD_STREAM) {
        const int ns = B < 8 ? B : 8;
        for (int i = 0; i < ns; i++) use[i] = 1, sel[i] = i;
        for (int i = 0; i < B - ns; i++) use[t - i] = 1, sel[ns + i] = t - i;
    } else if (c->method == FASA_METHOD_SPARQ) {
        int r = c->profile ? 2 * c->profile->ntip : d / 4;
        r = r < 1 ? 1 : r;
        uint8_t keep[d];
        double l1 = 0, l1_sel = 0;
        for (int cc = 0; cc < d; cc++) { /* i1: the r largest |q_c|, ties to the lower dim */
            int above = 0;
            for (int x = 0; x < d; x++)
                above += fabsf(q[x]) > fabsf(q[cc]) || (fabsf(q[x]) == fabsf(q[cc]) && x < cc);
            keep[cc] = above < r;
            l1 += fabsf(q[cc]);
            l1_sel += keep[cc] ? fabsf(q[cc]) : 0;
        }
        const double tau = sqrt(d * l1_sel / l1);
        double *z = test_alloc((size_t)n_vis * sizeof(double)), zmax = -INFINITY, zsum = 0;
        topk_cand *all = test_alloc((size_t)n_vis * sizeof(topk_cand));
        topk_cand *best = test_alloc((size_t)B * sizeof(topk_cand));
        for (int j = 0; j < n_vis; j++) {
            z[j] = 0;
            for (int cc = 0; cc < d; cc++)
                if (keep[cc]) z[j] += (double)q[cc] * K[((size_t)j * nkv + g) * d + cc];
            z[j] /= tau;
            zmax = z[j] > zmax ? z[j] : zmax;
            all[j] = (topk_cand){(float)z[j], j};
        }
        for (int j = 0; j < n_vis; j++) zsum += exp(z[j] - zmax);
        ck_assert_int_eq(topk_ref(n_vis, B, all, best), B);
        alpha = 0;
        for (int i = 0; i < B; i++) {
            use[best[i].pos] = 1, sel[i] = best[i].pos;
            alpha += exp(z[best[i].pos] - zmax) / zsum;
        }
        for (int cc = 0; cc < d; cc++) {
            vbar[cc] = 0;
            for (int j = 0; j < n_vis; j++) vbar[cc] += V[((size_t)j * nkv + g) * d + cc];
            vbar[cc] /= n_vis;
        }
        free(z), free(all), free(best);
    } else { /* quest */
        const int n_pages = (n_vis + 15) / 16, P = (B + 15) / 16;
        const int h0 = c->gqa == FASA_GQA_SHARED ? g * grp : h;
        const int h1 = c->gqa == FASA_GQA_SHARED ? h0 + grp : h + 1;
        topk_cand *pg = test_alloc((size_t)n_pages * sizeof(topk_cand)), best[64];
        ck_assert_int_le(P, 64);
        for (int p = 0; p < n_pages; p++) {
            double score = 0;
            for (int cc = 0; cc < d; cc++) {
                double mn = INFINITY, mx = -INFINITY;
                for (int j = 16 * p; j < 16 * p + 16 && j < n_vis; j++) {
                    const double x = K[((size_t)j * nkv + g) * d + cc];
                    mn = x < mn ? x : mn, mx = x > mx ? x : mx;
                }
                for (int hh = h0; hh < h1; hh++) {
                    const double qc = c->q[l][((size_t)t * c->nh + hh) * d + cc];
                    score += qc * mn > qc * mx ? qc * mn : qc * mx;
                }
            }
            pg[p] = (topk_cand){(float)score, 16 * p};
        }
        const int np = topk_ref(n_pages, P, pg, best);
        for (int i = 0, k = 0; i < np; i++)
            for (int j = best[i].pos; j < best[i].pos + 16 && j < n_vis; j++) {
                use[j] = 1;
                if (k < B) sel[k++] = j;
            }
        free(pg);
    }
    const double scale = 1.0f / sqrtf((float)d);
    double mx = -INFINITY, den = 0, acc[d];
    for (int j = 0; j < n_vis; j++)
        if (use[j]) {
            double x = 0;
            for (int cc = 0; cc < d; cc++) x += (double)q[cc] * K[((size_t)j * nkv + g) * d + cc];
            mx = x * scale > mx ? x * scale : mx;
        }
    for (int cc = 0; cc < d; cc++) acc[cc] = 0;
    for (int j = 0; j < n_vis; j++)
        if (use[j]) {
            double x = 0;
            for (int cc = 0; cc < d; cc++) x += (double)q[cc] * K[((size_t)j * nkv + g) * d + cc];
            const double w = exp(x * scale - mx);
            den += w;
            for (int cc = 0; cc < d; cc++) acc[cc] += w * V[((size_t)j * nkv + g) * d + cc];
        }
    for (int cc = 0; cc < d; cc++)
        out[cc] = (float)(alpha * (acc[cc] / den) + (alpha < 1 ? (1 - alpha) * vbar[cc] : 0));
    free(use);
}

/* Runs a stream, quest or sparq config on each shard count in counts[n_counts] and checks every
 * step against s_ref_baseline: selections exactly, outputs to tol. Returns the largest
 * absolute output error seen. */
static double s_check_baseline(const run_cfg *c, const int *counts, int n_counts, double tol)
{
    const int steps = (c->T - c->prefix + c->pos_step - 1) / c->pos_step;
    const size_t no = (size_t)steps * c->nl * c->nh * c->d;
    const size_t ns = (size_t)steps * c->nl * c->nh * c->budget;
    float *out = test_alloc(no * 4), *want = test_alloc(no * 4);
    int32_t *sel = test_alloc(ns * 4), *wsel = test_alloc(ns * 4);
    for (int s = 0; s < steps; s++)
        for (int l = 0; l < c->nl; l++)
            for (int h = 0; h < c->nh; h++) {
                const size_t o = ((size_t)s * c->nl + l) * c->nh + h;
                s_ref_baseline(c, l, c->prefix + s * c->pos_step, h, want + o * c->d,
                               wsel + o * c->budget);
            }
    double worst = 0;
    for (int i = 0; i < n_counts; i++) {
        s_run(c, counts[i], out, sel);
        ck_assert_mem_eq(sel, wsel, ns * 4);
        const double e = test_max_abs_diff(no, out, want);
        ck_assert_msg(e <= tol, "%s on %d shards: max abs error %g", fasa_method_name(c->method),
                      counts[i], e);
        if (e > worst) worst = e;
    }
    free(out), free(want), free(sel), free(wsel);
    return worst;
}

/* stream, quest and sparq through the engine against the naive reference, on 1, 2, 3 and 7
 * shards (blocks of 16 and 48 tokens), per-head and shared GQA (sparq: per-head, without a
 * profile and with one), budgets below and above the 8 sinks and not a multiple of the
 * 16-token page. */
START_TEST(test_engine_baselines_ref)
{
    enum { NL = 2, NH = 8, NKV = 2, D = 16, T = 700 };
    test_rng r = {23};
    float *buf[3][NL];
    for (int l = 0; l < NL; l++) {
        buf[0][l] = test_alloc((size_t)T * NH * D * 4);
        buf[1][l] = test_alloc((size_t)T * NKV * D * 4);
        buf[2][l] = test_alloc((size_t)T * NKV * D * 4);
        test_fill(&r, (size_t)T * NH * D, buf[0][l], 1.0f);
        test_fill(&r, (size_t)T * NKV * D, buf[1][l], 1.0f);
        test_fill(&r, (size_t)T * NKV * D, buf[2][l], 1.0f);
    }
    const int counts[4] = {1, 2, 3, 7}, budgets[3] = {5, 24, 64}, blocks[2] = {16, 48};
    double worst[3] = {0, 0, 0};
    fasa_profile *p = s_random_profile(NL, NH, NKV, D, 3, 0, 8);
    for (int m = FASA_METHOD_STREAM; m <= FASA_METHOD_SPARQ; m++)
        for (int shared = 0; shared < 2; shared++)
            for (int bi = 0; bi < 3; bi++)
                for (int bl = 0; bl < 2; bl++) {
                    if (m == FASA_METHOD_SPARQ && shared) continue; /* per-head only */
                    run_cfg c = {NL,
                                 NH,
                                 NKV,
                                 D,
                                 T,
                                 600,
                                 blocks[bl],
                                 (fasa_method)m,
                                 (fasa_gqa)shared,
                                 budgets[bi],
                                 m == FASA_METHOD_SPARQ && bl ? p : NULL, /* r = 6, else 4 */
                                 (const float *const *)buf[0],
                                 (const float *const *)buf[1],
                                 (const float *const *)buf[2],
                                 13};
                    const double e = s_check_baseline(&c, counts, 4, 1e-6);
                    if (e > worst[m - FASA_METHOD_STREAM]) worst[m - FASA_METHOD_STREAM] = e;
                }
    printf("engine stream: max abs error vs reference %.3g\n", worst[0]);
    printf("engine quest: max abs error vs reference %.3g\n", worst[1]);
    printf("engine sparq: max abs error vs reference %.3g\n", worst[2]);
    fasa_profile_destroy(&p);
    for (int l = 0; l < NL; l++) free(buf[0][l]), free(buf[1][l]), free(buf[2][l]);
}
END_TEST

/* fasa-plus through the engine against its naive reference (s_ref_plus), on 1, 2, 3 and 7
 * shards (blocks of 16 and 48 tokens), budgets 5, 24 and 64 (recent windows 0, 3 and 9 at
 * ntip 3), layer 0 dense; and its refusals (shared GQA, no profile). */
START_TEST(test_engine_plus_ref)
{
    enum { NL = 2, NH = 8, NKV = 2, D = 16, T = 700 };
    test_rng r = {29};
    float *buf[3][NL];
    for (int l = 0; l < NL; l++) {
        buf[0][l] = test_alloc((size_t)T * NH * D * 4);
        buf[1][l] = test_alloc((size_t)T * NKV * D * 4);
        buf[2][l] = test_alloc((size_t)T * NKV * D * 4);
        test_fill(&r, (size_t)T * NH * D, buf[0][l], 1.0f);
        test_fill(&r, (size_t)T * NKV * D, buf[1][l], 1.0f);
        test_fill(&r, (size_t)T * NKV * D, buf[2][l], 1.0f);
    }
    const int counts[4] = {1, 2, 3, 7}, budgets[3] = {5, 24, 64}, blocks[2] = {16, 48};
    double worst = 0;
    fasa_profile *p = s_random_profile(NL, NH, NKV, D, 3, 0, 8);
    for (int bi = 0; bi < 3; bi++)
        for (int bl = 0; bl < 2; bl++) {
            run_cfg c = {NL,
                         NH,
                         NKV,
                         D,
                         T,
                         600,
                         blocks[bl],
                         FASA_METHOD_FASA_PLUS,
                         FASA_GQA_PER_HEAD,
                         budgets[bi],
                         p,
                         (const float *const *)buf[0],
                         (const float *const *)buf[1],
                         (const float *const *)buf[2],
                         13};
            const double e = s_check_baseline(&c, counts, 4, 1e-5);
            if (e > worst) worst = e;
        }
    printf("engine fasa-plus: max abs error vs reference %.3g\n", worst);
    /* Refusals: shared GQA at create and per step, and no profile. */
    fasa_engine_t *e = fasa_engine_new(2, 16);
    fasa_error err;
    fasa_session_config cfg = {.n_layers = NL,
                               .n_heads = NH,
                               .n_kv_heads = NKV,
                               .head_dim = D,
                               .pairing = FC_PAIRING_INTERLEAVED,
                               .profile = p,
                               .method = FASA_METHOD_FASA_PLUS,
                               .budget = 8,
                               .gqa = FASA_GQA_SHARED};
    ck_assert_int_eq(fasa_engine_create(e, "x", &cfg, &err), FASA_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(err.msg, "fasa-plus"));
    cfg.gqa = FASA_GQA_PER_HEAD;
    cfg.profile = NULL;
    ck_assert_int_eq(fasa_engine_create(e, "x", &cfg, &err), FASA_OK);
    ck_assert_int_eq(fasa_engine_append(e, "x", 1, 0, 20, buf[1][1], buf[2][1], &err), FASA_OK);
    fasa_attend_req req = {.layer = 1, .q = buf[0][1], .method = -1, .gqa = -1, .max_pos = -1};
    float o[NH * D];
    ck_assert_int_eq(fasa_engine_attend(e, "x", &req, o, NULL, NULL, &err),
                     FASA_FAILED_PRECONDITION);
    ck_assert_ptr_nonnull(strstr(err.msg, "fasa-plus"));
    ck_assert_int_eq(fasa_engine_set_profile(e, "y", p, &err), FASA_NOT_FOUND);
    ck_assert_int_eq(fasa_engine_drop(e, "x", &err), FASA_OK);
    cfg.profile = p;
    ck_assert_int_eq(fasa_engine_create(e, "x", &cfg, &err), FASA_OK);
    ck_assert_int_eq(fasa_engine_append(e, "x", 1, 0, 20, buf[1][1], buf[2][1], &err), FASA_OK);
    req.gqa = FASA_GQA_SHARED;
    ck_assert_int_eq(fasa_engine_attend(e, "x", &req, o, NULL, NULL, &err), FASA_INVALID_ARGUMENT);
    ck_assert_int_eq(fasa_engine_length(e, "x", 1), 20); /* nothing changed */
    fasa_engine_destroy(&e);
    fasa_profile_destroy(&p);
    for (int l = 0; l < NL; l++) free(buf[0][l]), free(buf[1][l]), free(buf[2][l]);
}
END_TEST

/* 1, 2, 3 and 7 shards agree: selections exactly, outputs to rounding. */
START_TEST(test_engine_shards_agree)
{
    enum { NL = 2, NH = 8, NKV = 2, D = 16, T = 700 };
    test_rng r = {21};
    float *buf[3][NL];
    for (int l = 0; l < NL; l++) {
        buf[0][l] = test_alloc((size_t)T * NH * D * 4);
        buf[1][l] = test_alloc((size_t)T * NKV * D * 4);
        buf[2][l] = test_alloc((size_t)T * NKV * D * 4);
        test_fill(&r, (size_t)T * NH * D, buf[0][l], 1.0f);
        test_fill(&r, (size_t)T * NKV * D, buf[1][l], 1.0f);
        test_fill(&r, (size_t)T * NKV * D, buf[2][l], 1.0f);
        /* A few exact duplicates of key rows force score ties across shards. */
        for (int t = 300; t < T; t += 50)
            memcpy(buf[1][l] + (size_t)t * NKV * D, buf[1][l], NKV * D * 4);
    }
    for (int shared = 0; shared < 2; shared++) {
        fasa_profile *p = s_random_profile(NL, NH, NKV, D, 3, shared, 5 + shared);
        for (int m = 0; m <= FASA_METHOD_LAST; m++) {
            if ((m == FASA_METHOD_SPARQ || m == FASA_METHOD_FASA_PLUS) && shared)
                continue; /* sparq, fasa-plus: per-head only */
            run_cfg c = {NL,
                         NH,
                         NKV,
                         D,
                         T,
                         600,
                         16,
                         (fasa_method)m,
                         (fasa_gqa)shared,
                         24,
                         p,
                         (const float *const *)buf[0],
                         (const float *const *)buf[1],
                         (const float *const *)buf[2],
                         7};
            const int steps = (T - c.prefix + c.pos_step - 1) / c.pos_step;
            const size_t no = (size_t)steps * NL * NH * D, ns = (size_t)steps * NL * NH * c.budget;
            float *o1 = test_alloc(no * 4), *on = test_alloc(no * 4);
            int32_t *s1 = test_alloc(ns * 4), *sn = test_alloc(ns * 4);
            s_run(&c, 1, o1, s1);
            const int counts[3] = {2, 3, 7};
            for (int i = 0; i < 3; i++) {
                s_run(&c, counts[i], on, sn);
                ck_assert_double_le(test_max_abs_diff(no, on, o1), 1e-6);
                ck_assert_mem_eq(sn, s1, ns * 4);
            }
            if (m != FASA_METHOD_DENSE)
                ck_assert_int_ge(s1[(size_t)NH * c.budget + c.budget - 1], 0); /* layer 1, head 0 */
            free(o1), free(on), free(s1), free(sn);
        }
        fasa_profile_destroy(&p);
    }
    for (int l = 0; l < NL; l++) free(buf[0][l]), free(buf[1][l]), free(buf[2][l]);
}
END_TEST

/* The memory limit: the engine's accounting equals what each shard allocates, an append or
 * an Attend's k_new that would pass the limit is refused and changes nothing, and dropping
 * a session gives its bytes back. Block 5 makes QUEST pages straddle blocks and shards. */
START_TEST(test_engine_memory_limit)
{
    enum { NH = 4, NKV = 2, D = 8, S = 3, N = 5000 };
    fasa_engine_t *e = fasa_engine_new(S, 5);
    fasa_session_config cfg = {.n_layers = 2,
                               .n_heads = NH,
                               .n_kv_heads = NKV,
                               .head_dim = D,
                               .method = FASA_METHOD_DENSE,
                               .budget = 8};
    fasa_error err;
    ck_assert_int_eq(fasa_engine_create(e, "a", &cfg, &err), FASA_OK);
    ck_assert_int_eq(fasa_engine_create(e, "b", &cfg, &err), FASA_OK);
    test_rng r = {77};
    float *k = malloc(sizeof(float) * 2 * N * NKV * D),
          *v = malloc(sizeof(float) * 2 * N * NKV * D);
    float q[NH * D], o[NH * D];
    test_fill(&r, 2 * N * NKV * D, k, 1.0f);
    test_fill(&r, 2 * N * NKV * D, v, 1.0f);
    test_fill(&r, NH * D, q, 1.0f);
    /* Uneven appends: one layer at a time, then both layers at once. */
    ck_assert_int_eq(fasa_engine_append(e, "a", 0, 0, 1234, k, v, &err), FASA_OK);
    ck_assert_int_eq(fasa_engine_append(e, "a", 1, 0, 77, k, v, &err), FASA_OK);
    ck_assert_int_eq(fasa_engine_append(e, "b", -1, 0, 333, k, v, &err), FASA_OK);
    fasa_shard_stats st[S], st2[S];
    ck_assert_int_eq(fasa_engine_shard_stats(e, NULL, st, &err), FASA_OK);
    int64_t held = 0;
    for (int i = 0; i < S; i++) {
        ck_assert_int_gt(st[i].alloc_bytes, 0);
        ck_assert_int_eq(fasa_engine_shard_bytes(e, i), st[i].alloc_bytes);
        if (st[i].alloc_bytes > held) held = st[i].alloc_bytes;
    }
    /* A limit just above the fullest shard: growing into a new chunk does not fit. */
    fasa_engine_set_memory_limit(e, held + 1);
    ck_assert_int_eq(fasa_engine_append(e, "a", 0, 1234, N, k, v, &err), FASA_RESOURCE_EXHAUSTED);
    ck_assert_ptr_nonnull(strstr(err.msg, "memory-limit"));
    ck_assert_int_eq(fasa_engine_append(e, "b", -1, 333, N, k, v, &err), FASA_RESOURCE_EXHAUSTED);
    ck_assert_int_eq(fasa_engine_length(e, "a", 0), 1234);
    ck_assert_int_eq(fasa_engine_length(e, "b", 0), 333);
    ck_assert_int_eq(fasa_engine_length(e, "b", 1), 333);
    ck_assert_int_eq(fasa_engine_shard_stats(e, NULL, st2, &err), FASA_OK);
    ck_assert_mem_eq(st, st2, sizeof(st));
    /* A few rows that stay inside the chunks, tables and pages already held still fit. */
    ck_assert_int_eq(fasa_engine_append(e, "a", 0, 1234, 2, k, v, &err), FASA_OK);
    /* An Attend whose k_new needs a new chunk fails before the step and leaves the length;
     * the growth is counted, not what is held already: a row that allocates nothing fits
     * even above the limit. */
    fasa_attend_req req = {
        .layer = 0, .q = q, .k_new = k, .v_new = v, .method = -1, .gqa = -1, .max_pos = -1};
    ck_assert_int_eq(fasa_engine_create(e, "c", &cfg, &err), FASA_OK);
    fasa_engine_set_memory_limit(e, held);
    ck_assert_int_eq(fasa_engine_attend(e, "c", &req, o, NULL, NULL, &err),
                     FASA_RESOURCE_EXHAUSTED);
    ck_assert_int_eq(fasa_engine_length(e, "c", 0), 0);
    fasa_engine_set_memory_limit(e, 1);
    ck_assert_int_eq(fasa_engine_attend(e, "a", &req, o, NULL, NULL, &err), FASA_OK);
    ck_assert_int_eq(fasa_engine_length(e, "a", 0), 1237);
    fasa_engine_set_memory_limit(e, 0);
    ck_assert_int_eq(fasa_engine_attend(e, "c", &req, o, NULL, NULL, &err), FASA_OK);
    ck_assert_int_eq(fasa_engine_length(e, "c", 0), 1);
    ck_assert_int_eq(fasa_engine_shard_stats(e, NULL, st, &err), FASA_OK);
    for (int i = 0; i < S; i++) ck_assert_int_eq(fasa_engine_shard_bytes(e, i), st[i].alloc_bytes);
    /* Without a limit a large append goes through and the accounting still matches. */
    ck_assert_int_eq(fasa_engine_append(e, "b", -1, 333, N, k, v, &err), FASA_OK);
    ck_assert_int_eq(fasa_engine_shard_stats(e, NULL, st, &err), FASA_OK);
    for (int i = 0; i < S; i++) ck_assert_int_eq(fasa_engine_shard_bytes(e, i), st[i].alloc_bytes);
    ck_assert_int_eq(fasa_engine_drop(e, "a", &err), FASA_OK);
    ck_assert_int_eq(fasa_engine_drop(e, "b", &err), FASA_OK);
    ck_assert_int_eq(fasa_engine_drop(e, "c", &err), FASA_OK);
    for (int i = 0; i < S; i++) ck_assert_int_eq(fasa_engine_shard_bytes(e, i), 0);
    free(k), free(v);
    fasa_engine_destroy(&e);
}
END_TEST

/* A batch gives what the same steps give one by one, bit for bit (outputs, selections,
 * statuses, lengths): waves of different sessions pipelined, a session seen again, dense,
 * oracle, quest, sparq and fasa steps, k_new, and failing items among them. */
START_TEST(test_engine_batch)
{
    enum { NL = 2, NH = 4, NKV = 2, D = 16, T = 300, NS = 5, B = 24, NI = 12 };
    fasa_profile *prof = s_random_profile(NL, NH, NKV, D, 2, 0, 5);
    test_rng r = {99};
    const size_t row = (size_t)NKV * D;
    float *k = test_alloc(sizeof(float) * NS * NL * (T + NI) * row);
    float *v = test_alloc(sizeof(float) * NS * NL * (T + NI) * row);
    float *q = test_alloc(sizeof(float) * NI * NH * D);
    test_fill(&r, NS * NL * (T + NI) * row, k, 1.0f);
    test_fill(&r, NS * NL * (T + NI) * row, v, 1.0f);
    test_fill(&r, NI * NH * D, q, 1.0f);
    for (int shards = 1; shards <= 3; shards += 2) {
        fasa_engine_t *e[2] = {fasa_engine_new(shards, 16), fasa_engine_new(shards, 16)};
        fasa_error err;
        const char *names[NS] = {"a", "b", "c", "d", "e"};
        for (int x = 0; x < 2; x++)
            for (int si = 0; si < NS; si++) {
                fasa_session_config cfg = {.n_layers = NL,
                                           .n_heads = NH,
                                           .n_kv_heads = NKV,
                                           .head_dim = D,
                                           .profile = prof,
                                           .method = FASA_METHOD_FASA,
                                           .budget = B};
                ck_assert_int_eq(fasa_engine_create(e[x], names[si], &cfg, &err), FASA_OK);
                const float *ks = k + (size_t)si * NL * (T + NI) * row;
                const float *vs = v + (size_t)si * NL * (T + NI) * row;
                for (int l = 0; l < NL; l++)
                    ck_assert_int_eq(fasa_engine_append(e[x], names[si], l, 0, T - si * 7,
                                                        ks + (size_t)l * (T + NI) * row,
                                                        vs + (size_t)l * (T + NI) * row, &err),
                                     FASA_OK);
            }
        /* Items: session, layer, method (-1 default), budget, k_new. */
        const struct {
            const char *id;
            int layer, method, budget, knew;
        } it[NI] = {{"a", 1, -1, 0, 1},
                    {"b", 1, FASA_METHOD_DENSE, 0, 1},
                    {"c", 0, FASA_METHOD_ORACLE, 0, 0},
                    {"nope", 0, -1, 0, 0},
                    {"d", 1, FASA_METHOD_QUEST, 40, 1},
                    {"a", 1, -1, 0, 1}, /* again: a new wave, after the first a */
                    {"e", 0, FASA_METHOD_SPARQ, 0, 0},
                    {"b", 0, -1, -5, 0}, /* bad budget */
                    {"c", 1, FASA_METHOD_STREAM, 0, 1},
                    {"e", 1, -1, 0, 1},
                    {"d", 0, -1, 400, 0}, /* every token fits: dense */
                    {"a", 0, -1, 0, 1}};
        fasa_attend_req reqs[NI];
        const char *ids[NI];
        float *outs[2][NI];
        int32_t *sels[2][NI];
        fasa_step_stats st[2][NI];
        fasa_error errs[2][NI];
        for (int i = 0; i < NI; i++) {
            const int si = it[i].id[0] - 'a';
            const size_t at = ((size_t)(si < NS ? si : 0) * NL + it[i].layer) * (T + NI) + T + i;
            reqs[i] = (fasa_attend_req){.layer = it[i].layer,
                                        .q = q + (size_t)i * NH * D,
                                        .k_new = it[i].knew ? k + at * row : NULL,
                                        .v_new = it[i].knew ? v + at * row : NULL,
                                        .method = it[i].method,
                                        .budget = it[i].budget,
                                        .gqa = -1,
                                        .max_pos = -1};
            ids[i] = it[i].id;
            for (int x = 0; x < 2; x++) {
                outs[x][i] = test_alloc(sizeof(float) * NH * D);
                sels[x][i] = test_alloc(sizeof(int32_t) * NH * 400);
            }
        }
        /* One by one on e[0]; the batch on e[1]. */
        for (int i = 0; i < NI; i++)
            errs[0][i].code = fasa_engine_attend(e[0], ids[i], &reqs[i], outs[0][i], sels[0][i],
                                                 &st[0][i], &errs[0][i]);
        const int n_ok =
            fasa_engine_attend_batch(e[1], NI, ids, reqs, outs[1], sels[1], st[1], errs[1]);
        int want_ok = 0;
        for (int i = 0; i < NI; i++) {
            ck_assert_int_eq(errs[1][i].code, errs[0][i].code);
            if (errs[0][i].code) {
                ck_assert_str_eq(errs[1][i].msg, errs[0][i].msg);
                continue;
            }
            want_ok++;
            const int budget = it[i].budget ? it[i].budget : B;
            ck_assert_mem_eq(outs[1][i], outs[0][i], sizeof(float) * NH * D);
            ck_assert_mem_eq(sels[1][i], sels[0][i], sizeof(int32_t) * NH * budget);
            ck_assert_int_eq(st[1][i].method_used, st[0][i].method_used);
            ck_assert_int_eq(st[1][i].n_visible, st[0][i].n_visible);
            ck_assert_int_eq(st[1][i].bytes_read, st[0][i].bytes_read);
        }
        ck_assert_int_eq(n_ok, want_ok);
        ck_assert_int_eq(want_ok, 10);
        for (int si = 0; si < NS; si++)
            for (int l = 0; l < NL; l++)
                ck_assert_int_eq(fasa_engine_length(e[1], names[si], l),
                                 fasa_engine_length(e[0], names[si], l));
        for (int i = 0; i < NI; i++)
            for (int x = 0; x < 2; x++) free(outs[x][i]), free(sels[x][i]);
        fasa_engine_destroy(&e[0]);
        fasa_engine_destroy(&e[1]);
    }
    free(k), free(v), free(q);
    fasa_profile_destroy(&prof);
}
END_TEST

/* An f16 or bf16 session answers as an f32 session fed the keys and values rounded to that
 * dtype (queries stay f32): the same selections and outputs to float rounding, every method;
 * values that would overflow the dtype are refused, naming the field, and change nothing. */
START_TEST(test_engine_dtype)
{
    enum { NL = 2, NH = 8, NKV = 2, D = 16, T = 500 };
    test_rng r = {23};
    float *buf[3][NL], *rnd[2][NL];
    for (int l = 0; l < NL; l++) {
        buf[0][l] = test_alloc((size_t)T * NH * D * 4);
        test_fill(&r, (size_t)T * NH * D, buf[0][l], 1.0f);
        for (int x = 1; x < 3; x++) {
            buf[x][l] = test_alloc((size_t)T * NKV * D * 4);
            rnd[x - 1][l] = test_alloc((size_t)T * NKV * D * 4);
            test_fill(&r, (size_t)T * NKV * D, buf[x][l], 2.0f);
        }
    }
    for (int dt = FASA_DTYPE_F16; dt <= FASA_DTYPE_BF16; dt++) {
        for (int x = 0; x < 2; x++)
            for (int l = 0; l < NL; l++)
                for (size_t i = 0; i < (size_t)T * NKV * D; i++) {
                    const float v = buf[x + 1][l][i];
                    rnd[x][l][i] = dt == FASA_DTYPE_F16 ? fasa_f16_to_f32(fasa_f32_to_f16(v))
                                                        : fasa_bf16_to_f32(fasa_f32_to_bf16(v));
                }
        for (int shared = 0; shared < 2; shared++) {
            fasa_profile *p = s_random_profile(NL, NH, NKV, D, 3, shared, 9 + shared);
            for (int m = 0; m <= FASA_METHOD_LAST; m++) {
                if ((m == FASA_METHOD_SPARQ || m == FASA_METHOD_FASA_PLUS) && shared) continue;
                run_cfg c = {NL,
                             NH,
                             NKV,
                             D,
                             T,
                             450,
                             16,
                             (fasa_method)m,
                             (fasa_gqa)shared,
                             20,
                             p,
                             (const float *const *)buf[0],
                             (const float *const *)buf[1],
                             (const float *const *)buf[2],
                             5};
                run_cfg c32 = c;
                c32.k = (const float *const *)rnd[0], c32.v = (const float *const *)rnd[1];
                const int steps = (T - c.prefix + c.pos_step - 1) / c.pos_step;
                const size_t no = (size_t)steps * NL * NH * D,
                             ns = (size_t)steps * NL * NH * c.budget;
                float *oa = test_alloc(no * 4), *ob = test_alloc(no * 4);
                int32_t *sa = test_alloc(ns * 4), *sb = test_alloc(ns * 4);
                s_run_dtype = dt;
                s_run(&c, 2, oa, sa);
                s_run_dtype = FASA_DTYPE_F32;
                s_run(&c32, 3, ob, sb);
                ck_assert_double_le(test_max_abs_diff(no, oa, ob), 1e-6);
                ck_assert_mem_eq(sa, sb, ns * 4);
                free(oa), free(ob), free(sa), free(sb);
            }
            fasa_profile_destroy(&p);
        }
    }
    /* Overflow: refused with the field and value named, nothing appended. */
    fasa_engine_t *e = fasa_engine_new(2, 8);
    fasa_session_config cfg = {.n_layers = 1,
                               .n_heads = 2,
                               .n_kv_heads = 1,
                               .head_dim = 4,
                               .method = FASA_METHOD_DENSE,
                               .budget = 4,
                               .dtype = FASA_DTYPE_F16};
    fasa_error err;
    ck_assert_int_eq(fasa_engine_create(e, "h", &cfg, &err), FASA_OK);
    cfg.dtype = FASA_DTYPE_BF16;
    ck_assert_int_eq(fasa_engine_create(e, "b", &cfg, &err), FASA_OK);
    cfg.dtype = 3;
    ck_assert_int_eq(fasa_engine_create(e, "x", &cfg, &err), FASA_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(err.msg, "dtype"));
    float k[8] = {1, 2, 3, 4, 65519.0f, -1, 0, 0}, v[8] = {0};
    ck_assert_int_eq(fasa_engine_append(e, "h", 0, 0, 2, k, v, &err),
                     FASA_OK); /* rounds to 65504 */
    k[6] = -65520.0f;
    ck_assert_int_eq(fasa_engine_append(e, "h", 0, 2, 2, k, v, &err), FASA_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(err.msg, "k[6] value -65520 overflows f16"));
    ck_assert_int_eq(fasa_engine_append(e, "h", 0, 2, 2, v, k, &err), FASA_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(err.msg, "v[6]"));
    ck_assert_int_eq(fasa_engine_append(e, "b", 0, 0, 2, k, v, &err), FASA_OK); /* fits bf16 */
    ck_assert_int_eq(fasa_engine_kv_bytes(e, "h"), 2 * 2 * 4 * 2);
    float q[8] = {1, 0, 0, 0, 0, 1, 0, 0}, out[8];
    fasa_attend_req req = {
        .layer = 0, .q = q, .k_new = k + 4, .v_new = v, .method = -1, .gqa = -1, .max_pos = -1};
    ck_assert_int_eq(fasa_engine_attend(e, "h", &req, out, NULL, NULL, &err),
                     FASA_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(err.msg, "k_new[2] value -65520 overflows f16"));
    req.k_new = v, req.v_new = k + 4;
    ck_assert_int_eq(fasa_engine_attend(e, "h", &req, out, NULL, NULL, &err),
                     FASA_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(err.msg, "v_new[2]"));
    /* Nothing was appended: the next position is still 2, and the stored 65519 reads 65504. */
    req.k_new = req.v_new = NULL;
    ck_assert_int_eq(fasa_engine_attend(e, "h", &req, out, NULL, NULL, &err), FASA_OK);
    ck_assert_int_eq(fasa_engine_append(e, "h", 0, 2, 1, v, v, &err), FASA_OK);
    fasa_engine_destroy(&e);
    for (int l = 0; l < NL; l++) {
        free(buf[0][l]);
        for (int x = 0; x < 2; x++) free(buf[x + 1][l]), free(rnd[x][l]);
    }
}
END_TEST

/* A disk-tier session answers exactly as a RAM one (every method, f16), and refuses a
 * directory it cannot use. */
START_TEST(test_engine_disk_tier)
{
    enum { NL = 2, NH = 8, NKV = 2, D = 16, T = 500 };
    test_rng r = {29};
    float *buf[3][NL];
    for (int l = 0; l < NL; l++)
        for (int x = 0; x < 3; x++) {
            const size_t n = (size_t)T * (x ? NKV : NH) * D;
            buf[x][l] = test_alloc(n * 4);
            test_fill(&r, n, buf[x][l], 1.0f);
        }
    char dir[] = "/tmp/fasa-engine-tier-XXXXXX";
    ck_assert_ptr_nonnull(mkdtemp(dir));
    fasa_profile *p = s_random_profile(NL, NH, NKV, D, 3, 0, 13);
    s_run_dtype = FASA_DTYPE_F16;
    for (int m = 0; m <= FASA_METHOD_LAST; m++) {
        run_cfg c = {NL,
                     NH,
                     NKV,
                     D,
                     T,
                     450,
                     16,
                     (fasa_method)m,
                     FASA_GQA_PER_HEAD,
                     20,
                     p,
                     (const float *const *)buf[0],
                     (const float *const *)buf[1],
                     (const float *const *)buf[2],
                     5};
        const int steps = (T - c.prefix + c.pos_step - 1) / c.pos_step;
        const size_t no = (size_t)steps * NL * NH * D, ns = (size_t)steps * NL * NH * c.budget;
        float *oa = test_alloc(no * 4), *ob = test_alloc(no * 4);
        int32_t *sa = test_alloc(ns * 4), *sb = test_alloc(ns * 4);
        s_run_tier_dir = dir;
        s_run(&c, 2, oa, sa);
        s_run_tier_dir = NULL;
        s_run(&c, 2, ob, sb);
        ck_assert_mem_eq(oa, ob, no * 4);
        ck_assert_mem_eq(sa, sb, ns * 4);
        free(oa), free(ob), free(sa), free(sb);
    }
    s_run_dtype = FASA_DTYPE_F32;
    fasa_profile_destroy(&p);
    fasa_engine_t *e = fasa_engine_new(1, 8);
    fasa_session_config cfg = {.n_layers = 1,
                               .n_heads = 2,
                               .n_kv_heads = 1,
                               .head_dim = 4,
                               .method = FASA_METHOD_DENSE,
                               .budget = 4,
                               .tier = 1};
    fasa_error err;
    ck_assert_int_eq(fasa_engine_create(e, "t", &cfg, &err), FASA_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(err.msg, "tier_dir"));
    cfg.tier_dir = "/nonexistent/fasa";
    ck_assert_int_eq(fasa_engine_create(e, "t", &cfg, &err), FASA_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(err.msg, "/nonexistent/fasa"));
    cfg.tier = 2;
    ck_assert_int_eq(fasa_engine_create(e, "t", &cfg, &err), FASA_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(err.msg, "tier"));
    fasa_engine_destroy(&e);
    ck_assert_int_eq(rmdir(dir), 0); /* no file left behind */
    for (int l = 0; l < NL; l++)
        for (int x = 0; x < 3; x++) free(buf[x][l]);
}
END_TEST

/* The largest group the limits allow (1024 query heads on one KV head of 1024 dims) runs
 * every method without exhausting the stack (such a step once crashed the server). The
 * dense output checks against exact attention in double on a few heads. */
START_TEST(test_engine_big_group)
{
    enum { NH = 1024, NKV = 1, D = 1024, N = 40, B = 8 };
    fasa_profile *prof = s_random_profile(1, NH, NKV, D, 8, 0, 3);
    fasa_engine_t *e = fasa_engine_new(2, 16);
    fasa_session_config cfg = {.n_layers = 1,
                               .n_heads = NH,
                               .n_kv_heads = NKV,
                               .head_dim = D,
                               .profile = prof,
                               .method = FASA_METHOD_FASA,
                               .budget = B,
                               .dense_layers = (const uint8_t[]){0}};
    fasa_error err;
    ck_assert_int_eq(fasa_engine_create(e, "g", &cfg, &err), FASA_OK);
    test_rng r = {41};
    float *k = test_alloc(sizeof(float) * N * D), *v = test_alloc(sizeof(float) * N * D);
    float *q = test_alloc(sizeof(float) * NH * D), *o = test_alloc(sizeof(float) * NH * D);
    test_fill(&r, N * D, k, 0.05f);
    test_fill(&r, N * D, v, 1.0f);
    test_fill(&r, NH * D, q, 0.05f);
    ck_assert_int_eq(fasa_engine_append(e, "g", 0, 0, N, k, v, &err), FASA_OK);
    for (int m = FASA_METHOD_FASA; m <= FASA_METHOD_SPARQ; m++) {
        fasa_attend_req req = {.layer = 0, .q = q, .method = m, .gqa = -1, .max_pos = -1};
        ck_assert_msg(fasa_engine_attend(e, "g", &req, o, NULL, NULL, &err) == FASA_OK, "%s: %s",
                      fasa_method_name((fasa_method)m), err.msg);
        for (int i = 0; i < NH * D; i++) ck_assert(isfinite(o[i]));
        if (m != FASA_METHOD_DENSE) continue;
        for (int h = 0; h < NH; h += 341) {
            double z[N], mx = -INFINITY, l = 0;
            for (int j = 0; j < N; j++) {
                z[j] = 0;
                for (int c = 0; c < D; c++) z[j] += (double)q[h * D + c] * k[j * D + c];
                z[j] /= sqrt((double)D);
                if (z[j] > mx) mx = z[j];
            }
            for (int j = 0; j < N; j++) l += exp(z[j] - mx);
            for (int c = 0; c < D; c += 97) {
                double want = 0;
                for (int j = 0; j < N; j++) want += exp(z[j] - mx) / l * v[j * D + c];
                ck_assert_double_le(fabs(want - o[h * D + c]), 1e-5);
            }
        }
    }
    free(k), free(v), free(q), free(o);
    fasa_engine_destroy(&e);
    fasa_profile_destroy(&prof);
}
END_TEST

/* Bad input gets the right status and a message naming the field, and changes nothing. */
START_TEST(test_engine_bad_input)
{
    enum { NH = 4, NKV = 2, D = 8, N = 50 };
    fasa_engine_t *e = fasa_engine_new(2, 8);
    fasa_session_config cfg = {.n_layers = 2,
                               .n_heads = NH,
                               .n_kv_heads = NKV,
                               .head_dim = D,
                               .method = FASA_METHOD_DENSE,
                               .budget = 8};
    fasa_error err;
    ck_assert_int_eq(fasa_engine_create(e, "a", &cfg, &err), FASA_OK);
    ck_assert_int_eq(fasa_engine_create(e, "a", &cfg, &err), FASA_ALREADY_EXISTS);
    fasa_session_config bad = cfg;
    bad.head_dim = 7;
    ck_assert_int_eq(fasa_engine_create(e, "b", &bad, &err), FASA_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(err.msg, "head_dim"));
    bad = cfg;
    bad.n_heads = 5;
    ck_assert_int_eq(fasa_engine_create(e, "b", &bad, &err), FASA_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(err.msg, "n_heads"));
    bad = cfg;
    bad.budget = 0;
    ck_assert_int_eq(fasa_engine_create(e, "b", &bad, &err), FASA_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(err.msg, "budget"));
    bad = cfg;
    bad.method = FASA_METHOD_FASA;
    ck_assert_int_eq(fasa_engine_create(e, "b", &bad, &err), FASA_FAILED_PRECONDITION);
    ck_assert_int_eq(fasa_engine_create(e, "", &cfg, &err), FASA_INVALID_ARGUMENT);
    ck_assert_int_eq(fasa_engine_create(e, "has space", &cfg, &err), FASA_INVALID_ARGUMENT);

    test_rng r = {31};
    float k[N * NKV * D], v[N * NKV * D], q[NH * D], o1[NH * D], o2[NH * D];
    test_fill(&r, N * NKV * D, k, 1.0f);
    test_fill(&r, N * NKV * D, v, 1.0f);
    test_fill(&r, NH * D, q, 1.0f);
    ck_assert_int_eq(fasa_engine_append(e, "a", 0, 0, N, k, v, &err), FASA_OK);
    fasa_attend_req req = {.layer = 0, .q = q, .method = -1, .gqa = -1, .max_pos = -1};
    ck_assert_int_eq(fasa_engine_attend(e, "a", &req, o1, NULL, NULL, &err), FASA_OK);

    /* Each of these fails and leaves the session as it was. */
    ck_assert_int_eq(fasa_engine_append(e, "nope", 0, N, 1, k, v, &err), FASA_NOT_FOUND);
    ck_assert_int_eq(fasa_engine_append(e, "a", 0, N + 1, 1, k, v, &err), FASA_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(err.msg, "start_pos"));
    ck_assert_int_eq(fasa_engine_append(e, "a", 0, 3, 1, k, v, &err), FASA_INVALID_ARGUMENT);
    ck_assert_int_eq(fasa_engine_append(e, "a", 2, N, 1, k, v, &err), FASA_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(err.msg, "layer"));
    ck_assert_int_eq(fasa_engine_append(e, "a", -1, N, 1, k, v, &err), FASA_INVALID_ARGUMENT);
    float kn[NKV * D];
    memcpy(kn, k, sizeof(kn));
    kn[5] = NAN;
    ck_assert_int_eq(fasa_engine_append(e, "a", 0, N, 1, kn, v, &err), FASA_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(err.msg, "k[5]"));
    fasa_attend_req br = req;
    br.k_new = kn;
    br.v_new = v;
    ck_assert_int_eq(fasa_engine_attend(e, "a", &br, o2, NULL, NULL, &err), FASA_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(err.msg, "k_new"));
    float qn[NH * D];
    memcpy(qn, q, sizeof(qn));
    qn[9] = INFINITY;
    br = req;
    br.q = qn;
    ck_assert_int_eq(fasa_engine_attend(e, "a", &br, o2, NULL, NULL, &err), FASA_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(err.msg, "q[9]"));
    /* Huge but finite values would overflow q.k silently: refused from 2^50 on. */
    qn[9] = 0x1p50f;
    ck_assert_int_eq(fasa_engine_attend(e, "a", &br, o2, NULL, NULL, &err), FASA_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(err.msg, "q[9] = 1.1259e+15"));
    qn[9] = -0x1.fffffep49f; /* the largest magnitude accepted */
    ck_assert_int_eq(fasa_engine_attend(e, "a", &br, o2, NULL, NULL, &err), FASA_OK);
    kn[5] = 3e38f;
    ck_assert_int_eq(fasa_engine_append(e, "a", 0, N, 1, kn, v, &err), FASA_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(err.msg, "k[5] = 3e+38"));
    ck_assert_int_eq(fasa_engine_length(e, "a", 0), N);
    br = req;
    br.budget = -3;
    ck_assert_int_eq(fasa_engine_attend(e, "a", &br, o2, NULL, NULL, &err), FASA_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(err.msg, "budget"));
    br = req;
    br.method = FASA_METHOD_FASA;
    ck_assert_int_eq(fasa_engine_attend(e, "a", &br, o2, NULL, NULL, &err),
                     FASA_FAILED_PRECONDITION);
    br = req;
    br.max_pos = N;
    ck_assert_int_eq(fasa_engine_attend(e, "a", &br, o2, NULL, NULL, &err), FASA_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(err.msg, "max_pos"));
    br = req;
    br.layer = 1; /* nothing appended to layer 1 yet */
    ck_assert_int_eq(fasa_engine_attend(e, "a", &br, o2, NULL, NULL, &err),
                     FASA_FAILED_PRECONDITION);
    ck_assert_int_eq(fasa_engine_attend(e, "zz", &req, o2, NULL, NULL, &err), FASA_NOT_FOUND);
    br = req;
    br.method = FASA_METHOD_LAST + 1;
    ck_assert_int_eq(fasa_engine_attend(e, "a", &br, o2, NULL, NULL, &err), FASA_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(err.msg, "method"));
    /* quest pages must not straddle shards: this engine's blocks of 8 tokens can't hold them. */
    br.method = FASA_METHOD_QUEST;
    ck_assert_int_eq(fasa_engine_attend(e, "a", &br, o2, NULL, NULL, &err),
                     FASA_FAILED_PRECONDITION);
    ck_assert_ptr_nonnull(strstr(err.msg, "multiple of 16"));
    bad = cfg;
    bad.method = FASA_METHOD_QUEST;
    ck_assert_int_eq(fasa_engine_create(e, "b", &bad, &err), FASA_FAILED_PRECONDITION);
    ck_assert_ptr_nonnull(strstr(err.msg, "quest"));
    br.method = FASA_METHOD_SPARQ;
    br.gqa = FASA_GQA_SHARED;
    ck_assert_int_eq(fasa_engine_attend(e, "a", &br, o2, NULL, NULL, &err), FASA_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(err.msg, "sparq"));
    bad = cfg;
    bad.method = FASA_METHOD_SPARQ;
    bad.gqa = FASA_GQA_SHARED;
    ck_assert_int_eq(fasa_engine_create(e, "b", &bad, &err), FASA_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(err.msg, "per-head"));
    br.gqa = -1;
    br.method = FASA_METHOD_STREAM; /* stream has no such constraint */
    ck_assert_int_eq(fasa_engine_attend(e, "a", &br, o2, NULL, NULL, &err), FASA_OK);

    ck_assert_int_eq(fasa_engine_length(e, "a", 0), N);
    ck_assert_int_eq(fasa_engine_length(e, "a", 1), 0);
    ck_assert_int_eq(fasa_engine_attend(e, "a", &req, o2, NULL, NULL, &err), FASA_OK);
    ck_assert_mem_eq(o1, o2, sizeof(o1));
    /* A visible range below the end sees exactly that prefix. */
    br = req;
    br.max_pos = 9;
    ck_assert_int_eq(fasa_engine_attend(e, "a", &br, o2, NULL, NULL, &err), FASA_OK);
    float want[D];
    attn_ref(10, D, 1.0f / sqrtf(D), q, k, NKV * D, v, NKV * D, want);
    ck_assert_double_le(test_max_abs_diff(D, o2, want), 1e-5);

    ck_assert_int_eq(fasa_engine_drop(e, "a", &err), FASA_OK);
    ck_assert_int_eq(fasa_engine_drop(e, "a", &err), FASA_NOT_FOUND);
    ck_assert_int_eq(fasa_engine_length(e, "a", 0), -1);
    fasa_engine_destroy(&e);
}
END_TEST

START_TEST(test_profile_roundtrip)
{
    fasa_profile *p = s_random_profile(3, 4, 2, 10, 2, 0, 9);
    snprintf(p->samples, sizeof(p->samples), "1:9:2");
    char path[] = "/tmp/fasa_profile_XXXXXX", err[256];
    const int fd = mkstemp(path);
    ck_assert_int_ge(fd, 0);
    close(fd);
    ck_assert_int_eq(fasa_profile_save(p, path, err, sizeof(err)), 0);
    fasa_profile *q = fasa_profile_load(path, err, sizeof(err));
    ck_assert_msg(q != NULL, "%s", err);
    ck_assert_int_eq(q->n_layers, 3);
    ck_assert_int_eq(q->head_dim, 10);
    ck_assert_str_eq(q->samples, "1:9:2");
    ck_assert_mem_eq(q->fcs, p->fcs, 3 * 4 * 2 * sizeof(int));
    for (int i = 0; i < 3 * 4 * 5; i++) ck_assert_double_eq_tol(q->ca[i], p->ca[i], 1e-6);
    ck_assert_int_eq(fasa_profile_check(q, 3, 4, 2, 10, FC_PAIRING_INTERLEAVED, err, sizeof(err)),
                     0);
    ck_assert_int_eq(fasa_profile_check(q, 4, 4, 2, 10, FC_PAIRING_INTERLEAVED, err, sizeof(err)),
                     -1);
    ck_assert_ptr_nonnull(strstr(err, "n_layers"));
    /* A damaged row is refused with its line number. */
    FILE *f = fopen(path, "w");
    fasa_profile_write(p, f);
    fprintf(f, "garbage\n");
    fclose(f);
    fasa_profile_destroy(&q);
    q = fasa_profile_load(path, err, sizeof(err));
    ck_assert_ptr_nonnull(q); /* trailing lines after the table are ignored */
    fasa_profile_destroy(&q);
    f = fopen(path, "w");
    fputs("fasa-profile 1\nn_layers 1\nn_heads 1\nn_kv_heads 1\nhead_dim 4\npairing interleaved\n"
          "gqa per-head\nntip 1\nwindow 8\nsamples -\n0 0 : 5 : 0.1 0.2\n",
          f);
    fclose(f);
    ck_assert_ptr_null(fasa_profile_load(path, err, sizeof(err)));
    ck_assert_ptr_nonnull(strstr(err, "line 11"));
    unlink(path);
    fasa_profile_destroy(&p);
}
END_TEST

/* Appends sent as f16 or bf16 (fasa_engine_append_dt) against f32 appends of the same
 * values widened: every session dtype (f32, f16, bf16) over 3 shards answers dense, quest
 * and sparq steps with the same bits and holds the same bytes; bad half values (NaN, inf,
 * bf16 >= 2^50, bf16 overflowing an f16 session) are refused naming k or v, nothing stored;
 * k and v travel in one request of every layer, all or nothing. */
START_TEST(test_engine_append_half)
{
    enum { NL = 2, NH = 4, NKV = 2, D = 16, T = 700 };
    const size_t row = (size_t)NKV * D, n = (size_t)NL * T * row;
    test_rng r = {91};
    float *k = test_alloc(n * 4), *v = test_alloc(n * 4), *kw = test_alloc(n * 4),
          *vw = test_alloc(n * 4), *q = test_alloc((size_t)NH * D * 4);
    uint16_t *kh = test_alloc(n * 2), *vh = test_alloc(n * 2);
    test_fill(&r, n, k, 3.0f);
    test_fill(&r, n, v, 3.0f);
    test_fill(&r, (size_t)NH * D, q, 1.0f);
    fasa_error err;
    for (int in = FASA_DTYPE_F16; in <= FASA_DTYPE_BF16; in++) {
        dtype_from_f32(SIMD_PORTABLE, in, n, k, kh);
        dtype_from_f32(SIMD_PORTABLE, in, n, v, vh);
        dtype_to_f32(SIMD_PORTABLE, in, n, kh, kw);
        dtype_to_f32(SIMD_PORTABLE, in, n, vh, vw);
        for (int dt = FASA_DTYPE_F32; dt <= FASA_DTYPE_BF16; dt++) {
            fasa_engine_t *e = fasa_engine_new(3, 64);
            ck_assert_ptr_nonnull(e);
            const fasa_session_config cfg = {.n_layers = NL,
                                             .n_heads = NH,
                                             .n_kv_heads = NKV,
                                             .head_dim = D,
                                             .method = FASA_METHOD_DENSE,
                                             .budget = 48,
                                             .dtype = dt};
            ck_assert_int_eq(fasa_engine_create(e, "h", &cfg, &err), FASA_OK);
            ck_assert_int_eq(fasa_engine_create(e, "w", &cfg, &err), FASA_OK);
            /* Half: every layer at once, in two requests; widened f32: layer by layer. */
            const size_t half = (size_t)T / 2;
            for (int part = 0; part < 2; part++) {
                const size_t t0 = part ? half : 0, m = part ? T - half : half;
                uint16_t *bk = test_alloc(NL * m * row * 2), *bv = test_alloc(NL * m * row * 2);
                for (int l = 0; l < NL; l++) {
                    memcpy(bk + l * m * row, kh + ((size_t)l * T + t0) * row, m * row * 2);
                    memcpy(bv + l * m * row, vh + ((size_t)l * T + t0) * row, m * row * 2);
                }
                ck_assert_msg(fasa_engine_append_dt(e, "h", -1, (int32_t)t0, (int)m, in, bk, bv,
                                                    &err) == FASA_OK,
                              "%s", err.msg);
                free(bk), free(bv);
            }
            for (int l = 0; l < NL; l++)
                ck_assert_int_eq(fasa_engine_append(e, "w", l, 0, T, kw + (size_t)l * T * row,
                                                    vw + (size_t)l * T * row, &err),
                                 FASA_OK);
            fasa_shard_stats sh[3], sw[3];
            ck_assert_int_eq(fasa_engine_shard_stats(e, "h", sh, &err), FASA_OK);
            ck_assert_int_eq(fasa_engine_shard_stats(e, "w", sw, &err), FASA_OK);
            ck_assert_mem_eq(sh, sw, sizeof(sh));
            const int methods[] = {FASA_METHOD_DENSE, FASA_METHOD_QUEST, FASA_METHOD_SPARQ};
            for (int mi = 0; mi < 3; mi++)
                for (int l = 0; l < NL; l++) {
                    float oh[NH * D], ow[NH * D];
                    int32_t selh[NH * 48], selw[NH * 48];
                    fasa_attend_req req = {
                        .layer = l, .q = q, .method = methods[mi], .gqa = -1, .max_pos = 650};
                    ck_assert_int_eq(fasa_engine_attend(e, "h", &req, oh, selh, NULL, &err),
                                     FASA_OK);
                    ck_assert_int_eq(fasa_engine_attend(e, "w", &req, ow, selw, NULL, &err),
                                     FASA_OK);
                    ck_assert_mem_eq(oh, ow, sizeof(oh));
                    ck_assert_mem_eq(selh, selw, sizeof(selh));
                }
            /* Refused, naming the value; nothing stored. */
            uint16_t bad[2 * row];
            memcpy(bad, kh, sizeof(bad));
            const uint16_t nan = in == FASA_DTYPE_F16 ? 0x7e00 : 0x7fc0;
            const uint16_t inf = in == FASA_DTYPE_F16 ? 0xfc00 : 0xff80;
            const uint16_t big = in == FASA_DTYPE_F16 ? 0 : 0x5900;  /* bf16 2^51 */
            const uint16_t over = in == FASA_DTYPE_F16 ? 0 : 0x4780; /* bf16 65536 */
            const uint16_t vals[] = {nan, inf, big, over};
            for (int b = 0; b < 4; b++) {
                if (!vals[b] || (b == 3 && dt != FASA_DTYPE_F16)) continue;
                memcpy(bad, kh, sizeof(bad));
                bad[row + 5] = vals[b];
                ck_assert_int_eq(fasa_engine_append_dt(e, "h", 0, T, 2, in, kh, bad, &err),
                                 FASA_INVALID_ARGUMENT);
                ck_assert_msg(strstr(err.msg, "v[") != NULL, "%s", err.msg);
                ck_assert_msg(strstr(err.msg, b == 3 ? "overflows" : "finite") != NULL, "%s",
                              err.msg);
                ck_assert_int_eq(fasa_engine_length(e, "h", 0), T);
            }
            ck_assert_int_eq(fasa_engine_append_dt(e, "h", 0, T, 2, 7, kh, kh, &err),
                             FASA_INVALID_ARGUMENT);
            fasa_engine_destroy(&e);
        }
    }
    free(k), free(v), free(kw), free(vw), free(q), free(kh), free(vh);
}
END_TEST

/* Ownership in the signatures (house style rule 6): fasa_engine_new_with takes the
 * transport over and clears the caller's copy; the engine then still runs on it (a dense
 * step over every appended row equals exact attention, computed here); the destructor nulls
 * the pointer and accepts NULL. */
START_TEST(test_engine_owns_transport)
{
    enum { OT = 37, OH = 2, OD = 4 };
    fasa_transport t;
    ck_assert_int_eq(fasa_transport_local(&t, 2), 0);
    fasa_engine_t *e = fasa_engine_new_with(&t, 16);
    ck_assert_ptr_nonnull(e);
    ck_assert_ptr_null(t.ctx);
    ck_assert_ptr_null((void *)t.destroy);
    ck_assert_int_eq(fasa_engine_n_shards(e), 2);
    fasa_error err;
    fasa_session_config cfg = {.n_layers = 1,
                               .n_heads = OH,
                               .n_kv_heads = OH,
                               .head_dim = OD,
                               .pairing = FC_PAIRING_INTERLEAVED,
                               .method = FASA_METHOD_DENSE,
                               .budget = 8};
    const fasa_status st = fasa_engine_create(e, "own", &cfg, &err);
    ck_assert_msg(st == FASA_OK, "%s", err.msg);
    float k[OT * OH * OD], v[OT * OH * OD], q[OH * OD], o[OH * OD];
    for (int i = 0; i < OT * OH * OD; i++) k[i] = sinf(0.37f * i), v[i] = cosf(0.11f * i);
    for (int i = 0; i < OH * OD; i++) q[i] = 0.5f - 0.13f * i;
    ck_assert_int_eq(fasa_engine_append(e, "own", 0, 0, OT, k, v, &err), FASA_OK);
    fasa_attend_req req = {.layer = 0, .q = q, .method = -1, .gqa = -1, .max_pos = -1};
    ck_assert_int_eq(fasa_engine_attend(e, "own", &req, o, NULL, NULL, &err), FASA_OK);
    for (int h = 0; h < OH; h++) {
        double m = -INFINITY, l = 0, acc[OD] = {0}, sc[OT];
        for (int r = 0; r < OT; r++) {
            double dot = 0;
            for (int c = 0; c < OD; c++) dot += (double)q[h * OD + c] * k[(r * OH + h) * OD + c];
            sc[r] = dot / sqrt((double)OD);
            if (sc[r] > m) m = sc[r];
        }
        for (int r = 0; r < OT; r++) {
            const double w = exp(sc[r] - m);
            l += w;
            for (int c = 0; c < OD; c++) acc[c] += w * v[(r * OH + h) * OD + c];
        }
        for (int c = 0; c < OD; c++) ck_assert_double_eq_tol(o[h * OD + c], acc[c] / l, 1e-5);
    }
    fasa_engine_destroy(&e);
    ck_assert_ptr_null(e);
    fasa_engine_destroy(&e);
    fasa_engine_destroy(NULL);
}
END_TEST

Suite *engine_suite(void)
{
    Suite *s = suite_create("engine");
    TCase *tc = tcase_create("engine");
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, test_engine_shards_agree);
    tcase_add_test(tc, test_engine_baselines_ref);
    tcase_add_test(tc, test_engine_plus_ref);
    tcase_add_test(tc, test_engine_bad_input);
    tcase_add_test(tc, test_engine_batch);
    tcase_add_test(tc, test_engine_big_group);
    tcase_add_test(tc, test_engine_memory_limit);
    tcase_add_test(tc, test_engine_dtype);
    tcase_add_test(tc, test_engine_append_half);
    tcase_add_test(tc, test_engine_disk_tier);
    tcase_add_test(tc, test_profile_roundtrip);
    tcase_add_test(tc, test_engine_owns_transport);
    suite_add_tcase(s, tc);
    return s;
}

/* ---- golden: the recorded stories260K activations ---- */

static fasa_qkv s_dump;

static void s_golden_setup(void)
{
    char path[1024], err[512];
    snprintf(path, sizeof(path), "%s/data/models/stories260K/golden/tinystories_T2048.qkv",
             test_shared_dir());
    ck_assert_msg(fasa_qkv_load(path, &s_dump, err, sizeof(err)) == 0, "%s", err);
}

static void s_golden_teardown(void)
{
    fasa_qkv_cleanup(&s_dump);
}

static run_cfg s_dump_cfg(fasa_method m, int budget, const fasa_profile *p, fasa_gqa gqa)
{
    const fasa_activations *a = &s_dump.act;
    return (run_cfg){a->n_layers, a->n_heads, a->n_kv_heads, a->head_dim, a->n_tokens, 1024, 64,
                     m,           gqa,        budget,        p,           a->q,        a->k, a->v,
                     64};
}

/* dense through the engine equals exact attention computed here in double precision. */
START_TEST(test_golden_dense_exact)
{
    const fasa_activations *a = &s_dump.act;
    ck_assert_int_eq(a->n_tokens, 2048);
    ck_assert_int_eq(a->head_dim, 8);
    run_cfg c = s_dump_cfg(FASA_METHOD_DENSE, 32, NULL, FASA_GQA_PER_HEAD);
    const int steps = 16, L = a->n_layers, H = a->n_heads, d = a->head_dim;
    float *out = test_alloc((size_t)steps * L * H * d * 4), want[8];
    s_run(&c, 1, out, NULL);
    const int grp = H / a->n_kv_heads, ld = a->n_kv_heads * d;
    double worst = 0;
    for (int s = 0; s < steps; s++) {
        const int t = 1024 + 64 * s;
        for (int l = 0; l < L; l++)
            for (int h = 0; h < H; h++) {
                attn_ref(t + 1, d, 1.0f / sqrtf(d), a->q[l] + ((size_t)t * H + h) * d,
                         a->k[l] + (h / grp) * d, ld, a->v[l] + (h / grp) * d, ld, want);
                const double e = test_rel_err(d, out + (((size_t)s * L + l) * H + h) * d, want);
                if (e > worst) worst = e;
            }
    }
    ck_assert_double_le(worst, 1e-5);
    free(out);
}
END_TEST

/* oracle with B >= t+1 equals dense: through the engine (which then attends every token)
 * and through the sparse path itself (shard_score + shard_attend with B covering all rows). */
START_TEST(test_golden_oracle_full_budget)
{
    const fasa_activations *a = &s_dump.act;
    const int steps = 16, L = a->n_layers, H = a->n_heads, d = a->head_dim;
    const size_t no = (size_t)steps * L * H * d;
    float *od = test_alloc(no * 4), *oo = test_alloc(no * 4);
    run_cfg c = s_dump_cfg(FASA_METHOD_DENSE, 2048, NULL, FASA_GQA_PER_HEAD);
    s_run(&c, 1, od, NULL);
    c.method = FASA_METHOD_ORACLE;
    s_run(&c, 3, oo, NULL);
    ck_assert_double_le(test_max_abs_diff(no, oo, od), 1e-6);

    shard_layout lay;
    ck_assert_int_eq(shard_layout_plain(&lay, L, H, a->n_kv_heads, d), 0);
    shard_t *sh = shard_new(&lay);
    int32_t *pos = test_alloc(2048 * 4);
    for (int i = 0; i < 2048; i++) pos[i] = i;
    for (int l = 0; l < L; l++)
        ck_assert_int_eq(shard_append(sh, l, 2048, pos, a->k[l], a->v[l]), 0);
    const int B = 2048, grp = H / a->n_kv_heads;
    topk_cand *cands = test_alloc((size_t)H * B * sizeof(topk_cand)), thr[8];
    int n_c[8];
    uint8_t have[8];
    float m[8], out[8], want[8];
    double lsum[8], o[64];
    for (int t = 1023; t < 2048; t += 128)
        for (int l = 0; l < L; l++) {
            shard_step st = {l, SHARD_ORACLE,    SHARD_GQA_PER_HEAD,          B,
                             t, 1.0f / sqrtf(d), a->q[l] + (size_t)t * H * d, 0};
            ck_assert_int_eq(shard_score(sh, &st, cands, n_c), 0);
            for (int h = 0; h < H; h++) {
                ck_assert_int_eq(n_c[h], t + 1);
                thr[h] = cands[(size_t)h * B + n_c[h] - 1];
                have[h] = 1;
            }
            ck_assert_int_eq(shard_attend(sh, &st, thr, have, m, lsum, o), 0);
            for (int h = 0; h < H; h++) {
                attn_finalize(d, lsum[h], o + h * d, out);
                attn_ref(t + 1, d, st.scale, st.q + h * d, a->k[l] + (h / grp) * d,
                         a->n_kv_heads * d, a->v[l] + (h / grp) * d, a->n_kv_heads * d, want);
                ck_assert_double_le(test_rel_err(d, out, want), 1e-5);
            }
        }
    shard_destroy(&sh);
    shard_layout_cleanup(&lay);
    free(pos), free(cands), free(od), free(oo);
}
END_TEST

/* Calibrated fasa, oracle and dense give the same outputs and selections on 1 and 3 shards. */
START_TEST(test_golden_shards_agree)
{
    const fasa_activations *a = &s_dump.act;
    char err[256];
    for (int shared = 0; shared < 2; shared++) {
        fasa_calib_opts co = {.ntip = 2,
                              .window = 32,
                              .pos_begin = 256,
                              .pos_end = 2048,
                              .pos_step = 128,
                              .pairing = FC_PAIRING_INTERLEAVED,
                              .gqa_shared = shared};
        fasa_profile *p = fasa_calibrate(a, &co, err, sizeof(err));
        ck_assert_msg(p != NULL, "%s", err);
        for (int m = 0; m < 3; m++) {
            run_cfg c = s_dump_cfg((fasa_method)m, 32, p, (fasa_gqa)shared);
            const size_t no = (size_t)16 * a->n_layers * a->n_heads * a->head_dim;
            const size_t ns = (size_t)16 * a->n_layers * a->n_heads * 32;
            float *o1 = test_alloc(no * 4), *o3 = test_alloc(no * 4);
            int32_t *s1 = test_alloc(ns * 4), *s3 = test_alloc(ns * 4);
            s_run(&c, 1, o1, s1);
            s_run(&c, 3, o3, s3);
            ck_assert_double_le(test_max_abs_diff(no, o1, o3), 1e-6);
            ck_assert_mem_eq(s1, s3, ns * 4);
            free(o1), free(o3), free(s1), free(s3);
        }
        fasa_profile_destroy(&p);
    }
}
END_TEST

/* stream, quest and sparq on the recorded activations: 1 and 3 shards against the naive
 * reference, per-head and shared GQA (sparq: per-head). */
START_TEST(test_golden_baselines)
{
    const int counts[2] = {1, 3}, budgets[2] = {64, 100};
    for (int m = FASA_METHOD_STREAM; m <= FASA_METHOD_SPARQ; m++) {
        double worst = 0;
        for (int shared = 0; shared < 2; shared++)
            for (int bi = 0; bi < 2; bi++) {
                if (m == FASA_METHOD_SPARQ && shared) continue; /* per-head only */
                run_cfg c = s_dump_cfg((fasa_method)m, budgets[bi], NULL, (fasa_gqa)shared);
                const double e = s_check_baseline(&c, counts, 2, 1e-5);
                if (e > worst) worst = e;
            }
        printf("golden %s: max abs error vs reference %.3g\n", fasa_method_name((fasa_method)m),
               worst);
    }
}
END_TEST

/* The profile's mean CA equals the naive CA kernel averaged by hand. */
START_TEST(test_golden_calibration)
{
    const fasa_activations *a = &s_dump.act;
    char err[256];
    fasa_calib_opts co = {.ntip = 2,
                          .window = 32,
                          .pos_begin = 100,
                          .pos_end = 2048,
                          .pos_step = 250,
                          .pairing = FC_PAIRING_HALF};
    fasa_profile *p = fasa_calibrate(a, &co, err, sizeof(err));
    ck_assert_msg(p != NULL, "%s", err);
    const int d = a->head_dim, H = a->n_heads, grp = H / a->n_kv_heads;
    const int checks[3][2] = {{0, 0}, {2, 5}, {4, 7}};
    for (int i = 0; i < 3; i++) {
        const int l = checks[i][0], h = checks[i][1];
        double ca[4] = {0};
        int n = 0;
        for (int t = 100; t < 2048; t += 250, n++)
            ca_accumulate_ref(t + 1, d, FC_PAIRING_HALF, 32, a->q[l] + ((size_t)t * H + h) * d,
                              a->k[l] + (h / grp) * d, a->n_kv_heads * d, ca);
        for (int f = 0; f < 4; f++)
            ck_assert_double_eq_tol(p->ca[((size_t)l * H + h) * 4 + f], ca[f] / n, 1e-12);
        int fcs[2];
        for (int f = 0; f < 4; f++) ca[f] /= n;
        ca_select(4, 2, ca, fcs);
        ck_assert_int_eq(p->fcs[((size_t)l * H + h) * 2], fcs[0]);
        ck_assert_int_eq(p->fcs[((size_t)l * H + h) * 2 + 1], fcs[1]);
    }
    fasa_profile_destroy(&p);
}
END_TEST

Suite *golden_suite(void)
{
    Suite *s = suite_create("golden");
    TCase *tc = tcase_create("stories260K");
    tcase_add_unchecked_fixture(tc, s_golden_setup, s_golden_teardown);
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, test_golden_dense_exact);
    tcase_add_test(tc, test_golden_oracle_full_budget);
    tcase_add_test(tc, test_golden_shards_agree);
    tcase_add_test(tc, test_golden_baselines);
    tcase_add_test(tc, test_golden_calibration);
    suite_add_tcase(s, tc);
    return s;
}

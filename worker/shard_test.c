/* The shard store against brute force over the same rows. */
#define _DEFAULT_SOURCE /* mkdtemp */
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "attn.h"
#include "pool.h"
#include "scan.h"
#include "shard.h"
#include "simd.h"
#include "test_util.h"

/* A layout packing dims {1, 2, 5} of every KV head, head h owning {1, 2} or {2, 5}. */
static void s_layout(shard_layout *lay, int nl, int nh, int nkv, int d)
{
    ck_assert_int_eq(shard_layout_plain(lay, nl, nh, nkv, d), 0);
    for (int i = 0; i < nl * nkv; i++) {
        int *perm = lay->perm + (size_t)i * d, r = 3;
        perm[0] = 1, perm[1] = 2, perm[2] = 5;
        for (int c = 0; c < d; c++)
            if (c != 1 && c != 2 && c != 5) perm[r++] = c;
        lay->n_dom[i] = 3;
    }
    for (int i = 0; i < nl * nh; i++) {
        uint8_t *m = lay->qmask + (size_t)i * d;
        m[0] = i % 2 == 0, m[1] = 1, m[2] = i % 2 == 1;
    }
}

/* Rows across several chunks; oracle candidates and dense partials against brute force. */
START_TEST(test_shard_oracle_dense)
{
    const int nl = 2, nh = 4, nkv = 2, d = 8, n = SHARD_CHUNK + 1000, grp = nh / nkv;
    shard_layout lay;
    s_layout(&lay, nl, nh, nkv, d);
    shard_t *sh = shard_new(&lay);
    ck_assert_ptr_nonnull(sh);
    test_rng r = {11};
    float *k = test_alloc((size_t)n * nkv * d * 4), *v = test_alloc((size_t)n * nkv * d * 4);
    int32_t *pos = test_alloc((size_t)n * 4);
    test_fill(&r, (size_t)n * nkv * d, k, 1.0f);
    test_fill(&r, (size_t)n * nkv * d, v, 1.0f);
    for (int i = 0; i < n; i++) pos[i] = 3 * i + 1; /* a shard holds a sparse subset */
    for (int i0 = 0; i0 < n; i0 += 777) { /* appends of odd sizes straddle chunks and tiles */
        const int m = n - i0 < 777 ? n - i0 : 777;
        ck_assert_int_eq(
            shard_append(sh, 1, m, pos + i0, k + (size_t)i0 * nkv * d, v + (size_t)i0 * nkv * d),
            0);
    }
    ck_assert_int_eq(shard_rows(sh, 1), n);
    ck_assert_int_eq(shard_rows(sh, 0), 0);
    ck_assert_int_eq(shard_visible(sh, 1, 3 * 4500), 4500);
    ck_assert_int_eq(shard_visible(sh, 1, 0), 0);

    float q[4 * 8];
    test_fill(&r, sizeof(q) / 4, q, 1.0f);
    const int n_vis = 4500, B = 40;
    shard_step st = {.layer = 1,
                     .method = SHARD_ORACLE,
                     .gqa = SHARD_GQA_PER_HEAD,
                     .budget = B,
                     .max_pos = 3 * (n_vis - 1) + 1,
                     .scale = 1.0f / sqrtf(d),
                     .q = q};
    topk_cand cands[4 * 40], all[4500], ref[40];
    int n_c[4];
    ck_assert_int_eq(shard_score(sh, &st, cands, n_c), 0);
    for (int h = 0; h < nh; h++) {
        const int g = h / grp;
        for (int j = 0; j < n_vis; j++) {
            double s = 0;
            for (int c = 0; c < d; c++)
                s += (double)q[h * d + c] * k[((size_t)j * nkv + g) * d + c];
            all[j] = (topk_cand){(float)s, pos[j]};
        }
        ck_assert_int_eq(n_c[h], B);
        topk_ref(n_vis, B, all, ref);
        for (int i = 0; i < B; i++) {
            ck_assert_int_eq(cands[h * B + i].pos, ref[i].pos);
            ck_assert_float_eq_tol(cands[h * B + i].score, ref[i].score, 1e-5f);
        }
    }
    /* Dense partials over the visible rows equal exact attention. */
    st.method = SHARD_DENSE;
    float m[4], out[8], want[8];
    double l[4], o[4 * 8];
    ck_assert_int_eq(shard_attend(sh, &st, NULL, NULL, m, l, o), 0);
    for (int h = 0; h < nh; h++) {
        attn_finalize(d, l[h], o + h * d, out);
        attn_ref(n_vis, d, st.scale, q + h * d, k + (h / grp) * d, nkv * d, v + (h / grp) * d,
                 nkv * d, want);
        ck_assert_double_le(test_max_abs_diff(d, out, want), 1e-5);
    }
    ck_assert_int_eq(shard_bytes_read(sh), (int64_t)n_vis * nkv * 2 * d * 4);
    shard_destroy(&sh);
    ck_assert_ptr_null(sh);
    shard_layout_cleanup(&lay);
    free(k), free(v), free(pos);
}
END_TEST

/* FASA scores use only each head's own packed dims; shared GQA sums the group. */
START_TEST(test_shard_fasa_scores)
{
    const int nh = 4, nkv = 2, d = 8, n = 100, grp = 2;
    shard_layout lay;
    s_layout(&lay, 1, nh, nkv, d);
    shard_t *sh = shard_new(&lay);
    test_rng r = {12};
    float *k = test_alloc((size_t)n * nkv * d * 4), *v = test_alloc((size_t)n * nkv * d * 4);
    int32_t pos[100];
    for (int i = 0; i < n; i++) pos[i] = i;
    test_fill(&r, (size_t)n * nkv * d, k, 1.0f);
    test_fill(&r, (size_t)n * nkv * d, v, 1.0f);
    ck_assert_int_eq(shard_append(sh, 0, n, pos, k, v), 0);
    float q[4 * 8];
    test_fill(&r, sizeof(q) / 4, q, 1.0f);
    const int B = n; /* every row comes back, so scores can be checked one by one */
    for (int shared = 0; shared < 2; shared++) {
        shard_step st = {.layer = 0,
                         .method = SHARD_FASA,
                         .gqa = shared,
                         .budget = B,
                         .max_pos = n - 1,
                         .scale = 1.0f / sqrtf(d),
                         .q = q};
        topk_cand *c = test_alloc((size_t)nh * B * sizeof(*c));
        int n_c[4];
        ck_assert_int_eq(shard_score(sh, &st, c, n_c), 0);
        const int units = shared ? nkv : nh;
        for (int u = 0; u < units; u++) {
            ck_assert_int_eq(n_c[u], n);
            for (int i = 0; i < n; i++) {
                const int j = c[u * B + i].pos, g = shared ? u : u / grp;
                double s = 0;
                for (int hh = 0; hh < grp; hh++) {
                    const int h = shared ? g * grp + hh : u;
                    if (!shared && hh) break;
                    const int dims[2] = {h % 2 == 0 ? 1 : 2, h % 2 == 0 ? 2 : 5};
                    for (int x = 0; x < 2; x++)
                        s += (double)q[h * d + dims[x]] * k[((size_t)j * nkv + g) * d + dims[x]];
                }
                ck_assert_float_eq_tol(c[u * B + i].score, s, 1e-5);
                if (i) ck_assert(topk_better(c[u * B + i - 1], c[u * B + i]));
            }
        }
        /* With the threshold at the worst candidate, attention covers every row: dense. */
        topk_cand thr[4];
        uint8_t have[4] = {1, 1, 1, 1};
        for (int u = 0; u < units; u++) thr[u] = c[u * B + n - 1];
        float m[4], out[8], want[8];
        double l[4], o[32];
        ck_assert_int_eq(shard_attend(sh, &st, thr, have, m, l, o), 0);
        for (int h = 0; h < nh; h++) {
            attn_finalize(d, l[h], o + h * d, out);
            attn_ref(n, d, st.scale, q + h * d, k + (h / grp) * d, nkv * d, v + (h / grp) * d,
                     nkv * d, want);
            ck_assert_double_le(test_max_abs_diff(d, out, want), 1e-5);
        }
        free(c);
    }
    shard_destroy(&sh);
    shard_layout_cleanup(&lay);
    free(k), free(v);
}
END_TEST

/* Exact attention of query q over the rows idx[n] of k, v ((rows, nkv, d), KV head g),
 * in double (the naive reference of a sparse step's output). */
static void s_ref_attend(int n, const int *idx, int d, int nkv, int g, float scale, const float *q,
                         const float *k, const float *v, float *out)
{
    double mx = -INFINITY, s[n ? n : 1], acc[d], den = 0;
    for (int i = 0; i < n; i++) {
        double x = 0;
        for (int c = 0; c < d; c++) x += (double)q[c] * k[((size_t)idx[i] * nkv + g) * d + c];
        s[i] = x * scale;
        if (s[i] > mx) mx = s[i];
    }
    for (int c = 0; c < d; c++) acc[c] = 0;
    for (int i = 0; i < n; i++) {
        const double w = exp(s[i] - mx);
        den += w;
        for (int c = 0; c < d; c++) acc[c] += w * v[((size_t)idx[i] * nkv + g) * d + c];
    }
    for (int c = 0; c < d; c++) out[c] = n ? (float)(acc[c] / den) : 0.0f;
}

/* A shard's sparse rows: positions in runs of 32 every 64 (shard 0 of 2, block 32), so
 * pages are whole here but positions have gaps; rows straddle a chunk. */
typedef struct s_data {
    int n, nh, nkv, d;
    float *k, *v, q[4 * 8];
    int32_t *pos;
    shard_t *sh;
    shard_layout lay;
} s_data;

static void s_data_make(s_data *x, uint64_t seed)
{
    x->n = SHARD_CHUNK + 300, x->nh = 4, x->nkv = 2, x->d = 8;
    s_layout(&x->lay, 1, x->nh, x->nkv, x->d);
    x->sh = shard_new(&x->lay);
    ck_assert_ptr_nonnull(x->sh);
    test_rng r = {seed};
    const size_t kv = (size_t)x->n * x->nkv * x->d;
    x->k = test_alloc(kv * 4), x->v = test_alloc(kv * 4);
    x->pos = test_alloc((size_t)x->n * 4);
    test_fill(&r, kv, x->k, 1.0f);
    test_fill(&r, kv, x->v, 1.0f);
    test_fill(&r, sizeof(x->q) / 4, x->q, 1.0f);
    for (int i = 0; i < x->n; i++) x->pos[i] = (i / 32) * 64 + i % 32;
    for (int i0 = 0; i0 < x->n; i0 += 333) { /* appends that split pages */
        const int m = x->n - i0 < 333 ? x->n - i0 : 333;
        const size_t o = (size_t)i0 * x->nkv * x->d;
        ck_assert_int_eq(shard_append(x->sh, 0, m, x->pos + i0, x->k + o, x->v + o), 0);
    }
}

static void s_data_free(s_data *x)
{
    shard_destroy(&x->sh);
    shard_layout_cleanup(&x->lay);
    free(x->k), free(x->v), free(x->pos);
}

/* stream: candidates are the sinks and the most recent rows, against a reference that
 * scores every visible row; attention over them against s_ref_attend. */
START_TEST(test_shard_stream)
{
    s_data x;
    s_data_make(&x, 31);
    const int d = x.d, nh = x.nh, grp = nh / x.nkv, n_vis = 4100;
    const int32_t max_pos = x.pos[n_vis - 1];
    topk_cand *all = test_alloc((size_t)n_vis * sizeof(topk_cand)), ref[40], cands[4 * 40];
    const int budgets[3] = {20, 8, 5};
    double worst = 0;
    for (int bi = 0; bi < 3; bi++)
        for (int shared = 0; shared < 2; shared++) {
            const int B = budgets[bi], units = shared ? x.nkv : nh;
            shard_step st = {0, SHARD_STREAM, shared, B, max_pos, 1.0f / sqrtf(d), x.q, 0};
            int n_c[4];
            ck_assert_int_eq(shard_score(x.sh, &st, cands, n_c), 0);
            for (int j = 0; j < n_vis; j++)
                all[j] = (topk_cand){x.pos[j] < 8 ? 1.0f : -(float)(max_pos - x.pos[j]), x.pos[j]};
            ck_assert_int_eq(topk_ref(n_vis, B, all, ref), B);
            /* The reference set by hand: the first min(B, 8) sinks, then the most recent. */
            for (int i = 0; i < B; i++)
                ck_assert_int_eq(ref[i].pos, i < 8 ? i : x.pos[n_vis - 1 - (i - 8)]);
            topk_cand thr[4];
            uint8_t have[4];
            for (int u = 0; u < units; u++) {
                ck_assert_int_eq(n_c[u], B);
                for (int i = 0; i < B; i++) {
                    ck_assert_int_eq(cands[u * B + i].pos, ref[i].pos);
                    ck_assert_float_eq(cands[u * B + i].score, ref[i].score);
                }
                thr[u] = ref[B - 1], have[u] = 1;
            }
            float m[4], out[8], want[8];
            double l[4], o[32];
            ck_assert_int_eq(shard_attend(x.sh, &st, thr, have, m, l, o), 0);
            int idx[40];
            for (int i = 0; i < B; i++) {
                int j = 0;
                while (x.pos[j] != ref[i].pos) j++;
                idx[i] = j;
            }
            for (int h = 0; h < nh; h++) {
                attn_finalize(d, l[h], o + h * d, out);
                s_ref_attend(B, idx, d, x.nkv, h / grp, st.scale, x.q + h * d, x.k, x.v, want);
                const double e = test_max_abs_diff(d, out, want);
                if (e > worst) worst = e;
            }
            /* Scoring reads no key; attention reads the B rows every unit selects once per
             * KV group (per-head GQA gathers the union of the group's selections). */
            ck_assert_int_eq(shard_bytes_read(x.sh), (int64_t)x.nkv * B * 2 * d * 4);
            (void)units;
        }
    printf("shard stream: max abs error vs reference %.3g\n", worst);
    ck_assert_double_le(worst, 1e-6);
    free(all);
    s_data_free(&x);
}
END_TEST

/* quest: page bounds computed from scratch over the visible rows, pages picked directly,
 * attention over every visible row of the picked pages. max_pos falls inside a page. */
START_TEST(test_shard_quest)
{
    s_data x;
    s_data_make(&x, 32);
    const int d = x.d, nh = x.nh, nkv = x.nkv, grp = nh / nkv, n_vis = 4100, P = 5;
    const int32_t max_pos = x.pos[n_vis - 1];
    ck_assert_int_ne(max_pos % 16, 15); /* the last visible page is partial */
    const int n_pages = (max_pos / 16) + 1;
    double *mn = test_alloc((size_t)n_pages * nkv * d * 8),
           *mx = test_alloc((size_t)n_pages * nkv * d * 8);
    int *count = test_alloc((size_t)n_pages * sizeof(int));
    for (int j = 0; j < n_vis; j++) {
        const int p = x.pos[j] / 16;
        for (int g = 0; g < nkv; g++)
            for (int c = 0; c < d; c++) {
                const double kv = x.k[((size_t)j * nkv + g) * d + c];
                double *a = mn + ((size_t)p * nkv + g) * d + c,
                       *b = mx + ((size_t)p * nkv + g) * d + c;
                if (!count[p] || kv < *a) *a = kv;
                if (!count[p] || kv > *b) *b = kv;
            }
        count[p]++;
    }
    topk_cand *all = test_alloc((size_t)n_pages * sizeof(topk_cand)), ref[8], cands[4 * 8];
    int *idx = test_alloc((size_t)P * 16 * sizeof(int));
    double worst = 0;
    for (int shared = 0; shared < 2; shared++) {
        const int units = shared ? nkv : nh;
        shard_step st = {0, SHARD_QUEST, shared, P, max_pos, 1.0f / sqrtf(d), x.q, 0};
        int n_c[4];
        ck_assert_int_eq(shard_score(x.sh, &st, cands, n_c), 0);
        int64_t bytes = 0;
        topk_cand thr[4];
        uint8_t have[4];
        for (int u = 0; u < units; u++) {
            const int g = shared ? u : u / grp, h0 = shared ? u * grp : u;
            const int h1 = shared ? h0 + grp : u + 1;
            int n_all = 0;
            for (int p = 0; p < n_pages; p++) {
                if (!count[p]) continue;
                double score = 0;
                for (int h = h0; h < h1; h++)
                    for (int c = 0; c < d; c++) {
                        const double a = x.q[h * d + c] * mn[((size_t)p * nkv + g) * d + c];
                        const double b = x.q[h * d + c] * mx[((size_t)p * nkv + g) * d + c];
                        score += a > b ? a : b;
                    }
                all[n_all++] = (topk_cand){(float)score, p * 16};
            }
            ck_assert_int_eq(topk_ref(n_all, P, all, ref), P);
            ck_assert_int_eq(n_c[u], P);
            for (int i = 0; i < P; i++) {
                ck_assert_int_eq(cands[u * P + i].pos, ref[i].pos);
                ck_assert_float_eq_tol(cands[u * P + i].score, ref[i].score, 1e-5);
            }
            thr[u] = ref[P - 1], have[u] = 1;
        }
        bytes += (int64_t)(n_vis / 32 * 2 + 1) * nkv * 2 * d * 4; /* bounds of visible pages */
        float m[4], out[8], want[8];
        double l[4], o[32];
        ck_assert_int_eq(shard_attend(x.sh, &st, thr, have, m, l, o), 0);
        for (int h = 0; h < nh; h++) {
            /* The reference pages of h's unit: its top P, again from scratch. */
            const int u = shared ? h / grp : h;
            const int g = h / grp, h0 = shared ? u * grp : u, h1 = shared ? h0 + grp : u + 1;
            int n_all = 0;
            for (int p = 0; p < n_pages; p++) {
                if (!count[p]) continue;
                double score = 0;
                for (int hh = h0; hh < h1; hh++)
                    for (int c = 0; c < d; c++) {
                        const double a = x.q[hh * d + c] * mn[((size_t)p * nkv + g) * d + c];
                        const double b = x.q[hh * d + c] * mx[((size_t)p * nkv + g) * d + c];
                        score += a > b ? a : b;
                    }
                all[n_all++] = (topk_cand){(float)score, p * 16};
            }
            topk_ref(n_all, P, all, ref);
            int n = 0;
            for (int j = 0; j < n_vis; j++)
                for (int i = 0; i < P; i++)
                    if (x.pos[j] / 16 * 16 == ref[i].pos) idx[n++] = j;
            if (!shared || h == h0) bytes += (int64_t)n * 2 * d * 4;
            attn_finalize(d, l[h], o + h * d, out);
            s_ref_attend(n, idx, d, nkv, g, st.scale, x.q + h * d, x.k, x.v, want);
            const double e = test_max_abs_diff(d, out, want);
            if (e > worst) worst = e;
        }
        ck_assert_int_eq(shard_bytes_read(x.sh), bytes);
    }
    printf("shard quest: max abs error vs reference %.3g\n", worst);
    ck_assert_double_le(worst, 1e-6);
    free(mn), free(mx), free(count), free(all), free(idx);
    s_data_free(&x);
}
END_TEST

/* sparq: candidates by the approximate logits z over the r largest |q| dims, and the sums
 * for the mean-value reallocation, against a reference over every visible row; rows past
 * max_pos are held and must not count. */
START_TEST(test_shard_sparq)
{
    s_data x;
    s_data_make(&x, 33);
    const int d = x.d, nh = x.nh, nkv = x.nkv, grp = nh / nkv, n_vis = 4100, B = 30, r = 3;
    const int32_t max_pos = x.pos[n_vis - 1];
    shard_step st = {0, SHARD_SPARQ, SHARD_GQA_PER_HEAD, B, max_pos, 1.0f / sqrtf(d), x.q, r};
    topk_cand cands[4 * 30], ref[30];
    topk_cand *all = test_alloc((size_t)n_vis * sizeof(topk_cand));
    int n_c[4];
    ck_assert_int_eq(shard_score(x.sh, &st, cands, n_c), 0);
    double aux[4 * SHARD_SPARQ_AUX(8)];
    shard_sparq_aux(x.sh, &st, aux);
    double worst = 0;
    for (int h = 0; h < nh; h++) {
        const int g = h / grp;
        const float *q = x.q + h * d;
        uint8_t keep[8];
        double l1 = 0, l1_sel = 0;
        int kept = 0;
        for (int c = 0; c < d; c++) {
            int above = 0;
            for (int y = 0; y < d; y++)
                above += fabsf(q[y]) > fabsf(q[c]) || (fabsf(q[y]) == fabsf(q[c]) && y < c);
            keep[c] = above < r;
            kept += keep[c];
            l1 += fabsf(q[c]);
            l1_sel += keep[c] ? fabsf(q[c]) : 0;
        }
        ck_assert_int_eq(kept, r);
        const double tau = sqrt(d * l1_sel / l1);
        double zmax = -INFINITY, zsum = 0, vs[8] = {0};
        for (int j = 0; j < n_vis; j++) {
            double z = 0;
            for (int c = 0; c < d; c++)
                if (keep[c]) z += (double)q[c] * x.k[((size_t)j * nkv + g) * d + c];
            z /= tau;
            all[j] = (topk_cand){(float)z, x.pos[j]};
            zmax = z > zmax ? z : zmax;
            for (int c = 0; c < d; c++) vs[c] += x.v[((size_t)j * nkv + g) * d + c];
        }
        for (int j = 0; j < n_vis; j++) zsum += exp((double)all[j].score - zmax);
        ck_assert_int_eq(topk_ref(n_vis, B, all, ref), B);
        ck_assert_int_eq(n_c[h], B);
        for (int i = 0; i < B; i++) {
            ck_assert_int_eq(cands[h * B + i].pos, ref[i].pos);
            ck_assert_float_eq_tol(cands[h * B + i].score, ref[i].score, 1e-5);
        }
        const double *a = aux + (size_t)h * SHARD_SPARQ_AUX(d);
        ck_assert_double_eq_tol(a[0], zmax, 1e-5);
        ck_assert_double_eq_tol(a[1] * exp(a[0] - zmax), zsum, 1e-5 * zsum);
        ck_assert_double_eq(a[2], n_vis);
        for (int c = 0; c < d; c++) {
            const double e = fabs(a[3 + c] - vs[c]);
            if (e > worst) worst = e;
        }
    }
    printf("shard sparq: max abs error of the value sums %.3g\n", worst);
    ck_assert_double_le(worst, 1e-9);
    free(all);
    s_data_free(&x);
}
END_TEST

/* A shard storing f16 or bf16 answers exactly (candidates, scores, partials, SPARQ aux:
 * bit for bit; dense to f32 rounding) as an f32 shard fed the same rows rounded to that
 * dtype, for every method and GQA mode; the stored and read bytes halve. d = 40 runs the
 * conversions' vector bodies and tails. */
START_TEST(test_shard_dtype)
{
    const int nh = 4, nkv = 2, d = 40, n = SHARD_CHUNK + 300, B = 24;
    const size_t kv = (size_t)n * nkv * d;
    test_rng r = {41};
    float *k = test_alloc(kv * 4), *v = test_alloc(kv * 4), *kr = test_alloc(kv * 4),
          *vr = test_alloc(kv * 4), q[4 * 40];
    int32_t *pos = test_alloc((size_t)n * 4);
    test_fill(&r, kv, k, 3.0f);
    test_fill(&r, kv, v, 3.0f);
    test_fill(&r, sizeof(q) / 4, q, 1.0f);
    for (int i = 0; i < n; i++) pos[i] = (i / 32) * 64 + i % 32;
    for (int dt = FASA_DTYPE_F16; dt <= FASA_DTYPE_BF16; dt++) {
        for (size_t i = 0; i < kv; i++) {
            kr[i] = dt == FASA_DTYPE_F16 ? fasa_f16_to_f32(fasa_f32_to_f16(k[i]))
                                         : fasa_bf16_to_f32(fasa_f32_to_bf16(k[i]));
            vr[i] = dt == FASA_DTYPE_F16 ? fasa_f16_to_f32(fasa_f32_to_f16(v[i]))
                                         : fasa_bf16_to_f32(fasa_f32_to_bf16(v[i]));
        }
        shard_layout lay;
        s_layout(&lay, 1, nh, nkv, d);
        shard_t *ref = shard_new(&lay);
        lay.dtype = dt;
        shard_t *sh = shard_new(&lay);
        ck_assert_ptr_nonnull(ref);
        ck_assert_ptr_nonnull(sh);
        ck_assert_int_eq(shard_layout_of(sh)->dtype, dt);
        for (int i0 = 0; i0 < n; i0 += 333) {
            const int m = n - i0 < 333 ? n - i0 : 333;
            const size_t o = (size_t)i0 * nkv * d;
            ck_assert_int_eq(shard_append(sh, 0, m, pos + i0, k + o, v + o), 0);
            ck_assert_int_eq(shard_append(ref, 0, m, pos + i0, kr + o, vr + o), 0);
        }
        int64_t a[3], b[3];
        shard_bytes_by_kind(sh, &a[0], &a[1], &a[2]);
        shard_bytes_by_kind(ref, &b[0], &b[1], &b[2]);
        for (int i = 0; i < 3; i++) ck_assert_int_eq(2 * a[i], b[i]);
        ck_assert_int_eq(b[2], (int64_t)n * nkv * d * 4);
        /* A full chunk and one of 512 rows (300 held) per KV head, each K and V at half
         * size; positions and bounds as before. */
        ck_assert_uint_eq(shard_bytes_held(ref) - shard_bytes_held(sh),
                          (size_t)(SHARD_CHUNK + 512) * nkv * d * 2 * 2);
        for (int method = 0; method <= SHARD_METHOD_LAST; method++)
            for (int shared = 0; shared < 2; shared++) {
                if ((method == SHARD_SPARQ || method == SHARD_FASA_PLUS) && shared) continue;
                const int32_t max_pos = pos[4100];
                shard_step st = {0,       method,          shared, B,
                                 max_pos, 1.0f / sqrtf(d), q,      method == SHARD_SPARQ ? 7 : 0};
                const int units = shard_units(sh, shared);
                topk_cand ca[4 * 24], cb[4 * 24], thr[4];
                int na[4] = {0}, nb[4] = {0};
                uint8_t have[4] = {0};
                if (method != SHARD_DENSE) {
                    ck_assert_int_eq(shard_score(sh, &st, ca, na), 0);
                    ck_assert_int_eq(shard_score(ref, &st, cb, nb), 0);
                    for (int u = 0; u < units; u++) {
                        ck_assert_int_eq(na[u], nb[u]);
                        ck_assert_mem_eq(ca + u * B, cb + u * B, (size_t)na[u] * sizeof(*ca));
                        if (nb[u]) thr[u] = cb[u * B + nb[u] - 1], have[u] = 1;
                    }
                }
                if (method == SHARD_SPARQ) {
                    double xa[4 * SHARD_SPARQ_AUX(40)], xb[4 * SHARD_SPARQ_AUX(40)];
                    shard_sparq_aux(sh, &st, xa);
                    shard_sparq_aux(ref, &st, xb);
                    ck_assert_mem_eq(xa, xb, sizeof(xa));
                }
                float ma[4], mb[4];
                double la[4], lb[4], oa[4 * 40], ob[4 * 40];
                ck_assert_int_eq(shard_attend(sh, &st, thr, have, ma, la, oa), 0);
                ck_assert_int_eq(shard_attend(ref, &st, thr, have, mb, lb, ob), 0);
                if (method == SHARD_DENSE) {
                    /* f16/bf16 dense logits run as sgemm over converted blocks, f32 as the
                     * loops: equal to f32 rounding. */
                    for (int h = 0; h < nh; h++) {
                        ck_assert_float_eq_tol(ma[h], mb[h], 1e-5f);
                        ck_assert_double_eq_tol(la[h] * exp(ma[h] - mb[h]), lb[h], 1e-5 * lb[h]);
                        for (int c = 0; c < d; c++)
                            ck_assert_double_eq_tol(oa[h * d + c] * exp(ma[h] - mb[h]),
                                                    ob[h * d + c], 1e-5 * lb[h]);
                    }
                } else {
                    ck_assert_mem_eq(ma, mb, sizeof(ma));
                    ck_assert_mem_eq(la, lb, sizeof(la));
                    ck_assert_mem_eq(oa, ob, sizeof(oa));
                }
                /* QUEST also reads its page bounds, which stay f32. */
                if (method == SHARD_QUEST)
                    ck_assert_int_lt(shard_bytes_read(sh), shard_bytes_read(ref));
                else
                    ck_assert_int_eq(2 * shard_bytes_read(sh), shard_bytes_read(ref));
                ck_assert_int_gt(shard_bytes_read(sh), 0);
            }
        shard_destroy(&sh);
        shard_destroy(&ref);
        shard_layout_cleanup(&lay);
    }
    free(k), free(v), free(kr), free(vr), free(pos);
}
END_TEST

/* The disk tier answers bit for bit as the RAM tier (every method, f32 and f16), holds
 * only kdom, positions and bounds in RAM, and leaves no file behind. */
START_TEST(test_shard_disk_tier)
{
    const int nh = 4, nkv = 2, d = 40, n = SHARD_CHUNK + 300, B = 24;
    const size_t kv = (size_t)n * nkv * d;
    test_rng r = {43};
    float *k = test_alloc(kv * 4), *v = test_alloc(kv * 4), q[4 * 40];
    int32_t *pos = test_alloc((size_t)n * 4);
    test_fill(&r, kv, k, 3.0f);
    test_fill(&r, kv, v, 3.0f);
    test_fill(&r, sizeof(q) / 4, q, 1.0f);
    for (int i = 0; i < n; i++) pos[i] = (i / 32) * 64 + i % 32;
    char dir[] = "/tmp/fasa-tier-test-XXXXXX";
    ck_assert_ptr_nonnull(mkdtemp(dir));
    for (int dt = FASA_DTYPE_F32; dt <= FASA_DTYPE_F16; dt++) {
        shard_layout lay;
        s_layout(&lay, 1, nh, nkv, d);
        lay.dtype = dt;
        shard_t *ram = shard_new(&lay);
        lay.tier = SHARD_TIER_DISK;
        ck_assert_ptr_null(shard_new(&lay)); /* disk needs a directory */
        lay.tier_dir = strdup(dir);
        shard_t *disk = shard_new(&lay);
        ck_assert_ptr_nonnull(ram);
        ck_assert_ptr_nonnull(disk);
        for (int i0 = 0; i0 < n; i0 += 333) {
            const int m = n - i0 < 333 ? n - i0 : 333;
            const size_t o = (size_t)i0 * nkv * d;
            ck_assert_int_eq(shard_append(ram, 0, m, pos + i0, k + o, v + o), 0);
            ck_assert_int_eq(shard_append(disk, 0, m, pos + i0, k + o, v + o), 0);
        }
        ck_assert_uint_eq(shard_bytes_mapped(ram), 0);
        ck_assert_uint_ge(shard_bytes_mapped(disk),
                          (size_t)2 * nkv * SHARD_CHUNK * (2 * d - 3) * fasa_dtype_size(dt));
        /* RAM: kdom (3 dims) instead of 2 d dims per row, over a full chunk and one of 512
         * rows (300 held). */
        ck_assert_uint_eq(shard_bytes_held(ram) - shard_bytes_held(disk),
                          (size_t)(SHARD_CHUNK + 512) * nkv * (2 * d - 3) * fasa_dtype_size(dt));
        ck_assert_uint_eq(shard_bytes_held(disk), shard_bytes_allocated(disk));
        for (int method = 0; method <= SHARD_METHOD_LAST; method++)
            for (int shared = 0; shared < 2; shared++) {
                if ((method == SHARD_SPARQ || method == SHARD_FASA_PLUS) && shared) continue;
                shard_step st = {0,         method,          shared, B,
                                 pos[4100], 1.0f / sqrtf(d), q,      method == SHARD_SPARQ ? 7 : 0};
                const int units = shard_units(ram, shared);
                topk_cand ca[4 * 24], cb[4 * 24], thr[4];
                int na[4] = {0}, nb[4] = {0};
                uint8_t have[4] = {0};
                if (method != SHARD_DENSE) {
                    ck_assert_int_eq(shard_score(disk, &st, ca, na), 0);
                    ck_assert_int_eq(shard_score(ram, &st, cb, nb), 0);
                    for (int u = 0; u < units; u++) {
                        ck_assert_int_eq(na[u], nb[u]);
                        ck_assert_mem_eq(ca + u * B, cb + u * B, (size_t)na[u] * sizeof(*ca));
                        if (nb[u]) thr[u] = cb[u * B + nb[u] - 1], have[u] = 1;
                    }
                }
                float ma[4], mb[4];
                double la[4], lb[4], oa[4 * 40], ob[4 * 40];
                ck_assert_int_eq(shard_attend(disk, &st, thr, have, ma, la, oa), 0);
                ck_assert_int_eq(shard_attend(ram, &st, thr, have, mb, lb, ob), 0);
                ck_assert_mem_eq(ma, mb, sizeof(ma));
                ck_assert_mem_eq(la, lb, sizeof(la));
                ck_assert_mem_eq(oa, ob, sizeof(oa));
                ck_assert_int_eq(shard_bytes_read(disk), shard_bytes_read(ram));
            }
        shard_destroy(&disk);
        shard_destroy(&ram);
        /* A directory that does not exist: the append fails and adds nothing. */
        free(lay.tier_dir);
        lay.tier_dir = strdup("/nonexistent/fasa-tier");
        disk = shard_new(&lay);
        ck_assert_ptr_nonnull(disk);
        ck_assert_int_eq(shard_append(disk, 0, 1, pos, k, v), -1);
        ck_assert_int_eq(shard_rows(disk, 0), 0);
        shard_destroy(&disk);
        shard_layout_cleanup(&lay);
    }
    ck_assert_int_eq(rmdir(dir), 0); /* empty: every backing file was unlinked */
    free(k), free(v), free(pos);
}
END_TEST

/* Every score dtype over K/V f32 and f16: the fused scan's candidates equal a selection
 * over the scan kernel's scores of the rows packed by hand (the shard's packing, chunking
 * and row -> position mapping), the same rows split over 3 shards select the same, and
 * phase 2 over the selection matches attention over those rows. */
START_TEST(test_shard_score_dtype)
{
    const int nh = 4, nkv = 2, d = 8, n = SHARD_CHUNK + 700, grp = 2, B = 37, u = 3;
    const int sds[] = {SCAN_AUTO, SCAN_F32, SCAN_F16, SCAN_BF16, SCAN_I8};
    test_rng r = {41};
    float *k = test_alloc((size_t)n * nkv * d * 4), *v = test_alloc((size_t)n * nkv * d * 4);
    int32_t *pos = test_alloc((size_t)n * 4);
    test_fill(&r, (size_t)n * nkv * d, k, 1.0f);
    test_fill(&r, (size_t)n * nkv * d, v, 1.0f);
    for (int i = 0; i < n; i++) pos[i] = 2 * i + 5;
    float q[4 * 8];
    test_fill(&r, sizeof(q) / 4, q, 1.0f);
    for (int kvd = FASA_DTYPE_F32; kvd <= FASA_DTYPE_F16; kvd++)
        for (size_t si = 0; si < sizeof(sds) / sizeof(*sds); si++) {
            shard_layout lay;
            s_layout(&lay, 1, nh, nkv, d);
            lay.dtype = kvd;
            lay.score_dtype = sds[si];
            const int sd = scan_dtype_effective(sds[si], kvd);
            shard_t *one = shard_new(&lay), *part[3];
            ck_assert_ptr_nonnull(one);
            for (int p = 0; p < 3; p++) part[p] = shard_new(&lay);
            ck_assert_int_eq(shard_append(one, 0, n, pos, k, v), 0);
            for (int i0 = 0; i0 < n; i0 += 64) { /* blocks of 64 rows round-robin */
                const int m = n - i0 < 64 ? n - i0 : 64;
                ck_assert_int_eq(shard_append(part[(i0 / 64) % 3], 0, m, pos + i0,
                                              k + (size_t)i0 * nkv * d, v + (size_t)i0 * nkv * d),
                                 0);
            }
            shard_step st = {.layer = 0,
                             .method = SHARD_FASA,
                             .gqa = SHARD_GQA_PER_HEAD,
                             .budget = B,
                             .max_pos = pos[n - 1] - 100,
                             .scale = 1.0f / sqrtf(d),
                             .q = q};
            const int n_vis = shard_visible(one, 0, st.max_pos);
            topk_cand c1[4 * 37], cp[3][4 * 37];
            int n1[4], np[3][4];
            ck_assert_int_eq(shard_score(one, &st, c1, n1), 0);
            for (int p = 0; p < 3; p++)
                ck_assert_int_eq(shard_score(part[p], &st, cp[p], np[p]), 0);
            /* The reference store: every visible row of KV head g, rounded to the K/V dtype,
             * packed dims {1, 2, 5}. */
            const int nt = (n_vis + SCORE_TILE - 1) / SCORE_TILE;
            void *tiles = test_alloc((size_t)nt * scan_tile_bytes(sd, u));
            float *rs = test_alloc((size_t)nt * SCORE_TILE * 4),
                  *sc = test_alloc((size_t)n_vis * 4);
            topk_cand *all = test_alloc((size_t)n_vis * sizeof(*all)), ref[37], merged[3 * 37];
            for (int h = 0; h < nh; h++) {
                const int g = h / grp;
                memset(tiles, 0, (size_t)nt * scan_tile_bytes(sd, u));
                for (int j = 0; j < n_vis; j++) {
                    float x[3];
                    const int dims[3] = {1, 2, 5};
                    for (int c = 0; c < 3; c++) {
                        const float kk = k[((size_t)j * nkv + g) * d + dims[c]];
                        x[c] = kvd == FASA_DTYPE_F16 ? fasa_f16_to_f32(fasa_f32_to_f16(kk)) : kk;
                    }
                    scan_pack_row(sd, u, x, tiles, rs, j);
                }
                /* FASA masks head h to its own dims: {1, 2} (even h) or {2, 5}. */
                const float qd[3] = {h % 2 == 0 ? q[h * d + 1] : 0.0f, q[h * d + 2],
                                     h % 2 == 1 ? q[h * d + 5] : 0.0f};
                scan_q sq = {0};
                ck_assert_int_eq(scan_q_prep(&sq, sd, 1, u, qd), 0);
                scan_scores(SIMD_AUTO, &sq, n_vis, tiles, rs, sc, n_vis);
                scan_q_free(&sq);
                for (int j = 0; j < n_vis; j++) all[j] = (topk_cand){sc[j], pos[j]};
                const int m = topk_ref(n_vis, B, all, ref);
                ck_assert_int_eq(n1[h], m);
                int nm = 0;
                for (int p = 0; p < 3; p++)
                    for (int i = 0; i < np[p][h]; i++) merged[nm++] = cp[p][h * B + i];
                topk_cand mref[37];
                ck_assert_int_eq(topk_ref(nm, B, merged, mref), m);
                for (int i = 0; i < m; i++) {
                    ck_assert_msg(c1[h * B + i].pos == ref[i].pos &&
                                      c1[h * B + i].score == ref[i].score,
                                  "kv %d score %s head %d #%d: pos %d %a vs ref %d %a", kvd,
                                  scan_dtype_name(sd), h, i, c1[h * B + i].pos,
                                  (double)c1[h * B + i].score, ref[i].pos, (double)ref[i].score);
                    ck_assert_int_eq(mref[i].pos, ref[i].pos);
                }
            }
            /* Phase 2 over the selection (threshold = the B-th best) against attention over
             * the selected rows, K and V rounded to the K/V dtype. */
            topk_cand thr[4];
            uint8_t have[4] = {1, 1, 1, 1};
            for (int h = 0; h < nh; h++) thr[h] = c1[h * B + n1[h] - 1];
            float m[4], out[8], want[8];
            double l[4], o[32];
            ck_assert_int_eq(shard_attend(one, &st, thr, have, m, l, o), 0);
            float *kr = test_alloc((size_t)B * d * 4), *vr = test_alloc((size_t)B * d * 4);
            for (int h = 0; h < nh; h++) {
                const int g = h / grp;
                for (int i = 0; i < n1[h]; i++) {
                    const int j = (c1[h * B + i].pos - 5) / 2;
                    for (int c = 0; c < d; c++) {
                        float kk = k[((size_t)j * nkv + g) * d + c],
                              vv = v[((size_t)j * nkv + g) * d + c];
                        if (kvd == FASA_DTYPE_F16)
                            kk = fasa_f16_to_f32(fasa_f32_to_f16(kk)),
                            vv = fasa_f16_to_f32(fasa_f32_to_f16(vv));
                        kr[i * d + c] = kk, vr[i * d + c] = vv;
                    }
                }
                attn_finalize(d, l[h], o + h * d, out);
                attn_ref(n1[h], d, st.scale, q + h * d, kr, d, vr, d, want);
                ck_assert_double_le(test_max_abs_diff(d, out, want), 1e-5);
            }
            free(kr), free(vr), free(tiles), free(rs), free(sc), free(all);
            shard_destroy(&one);
            for (int p = 0; p < 3; p++) shard_destroy(&part[p]);
            shard_layout_cleanup(&lay);
        }
    free(k), free(v), free(pos);
}
END_TEST

/* The score dtype of the session's own K/V dtype (f32, f16, bf16) is the unset one: the scan
 * reads the key store's dominant dims in place (they are already packed in tiles, scan.h's
 * layout), so no copy is made and memory, bytes read, selections and outputs are the same bits
 * as the unset dtype's, on one shard and on the rows split over 3. */
START_TEST(test_shard_score_own_dtype)
{
    const int nh = 4, nkv = 2, d = 8, n = SHARD_CHUNK + 700, B = 37;
    test_rng r = {43};
    float *k = test_alloc((size_t)n * nkv * d * 4), *v = test_alloc((size_t)n * nkv * d * 4);
    int32_t *pos = test_alloc((size_t)n * 4);
    test_fill(&r, (size_t)n * nkv * d, k, 1.0f);
    test_fill(&r, (size_t)n * nkv * d, v, 1.0f);
    for (int i = 0; i < n; i++) pos[i] = 3 * i + 1;
    float q[4 * 8];
    test_fill(&r, sizeof(q) / 4, q, 1.0f);
    const int own[3] = {SCAN_F32, SCAN_F16, SCAN_BF16};
    for (int kvd = FASA_DTYPE_F32; kvd <= FASA_DTYPE_BF16; kvd++) {
        ck_assert_int_eq(scan_dtype_effective(SCAN_AUTO, kvd), own[kvd]);
        shard_t *sh[2][4]; /* [auto, own][one shard, 3 parts] */
        for (int w = 0; w < 2; w++) {
            shard_layout lay;
            s_layout(&lay, 1, nh, nkv, d);
            lay.dtype = kvd;
            lay.score_dtype = w ? own[kvd] : SCAN_AUTO;
            for (int p = 0; p < 4; p++) ck_assert_ptr_nonnull(sh[w][p] = shard_new(&lay));
            shard_layout_cleanup(&lay);
            ck_assert_int_eq(shard_append(sh[w][0], 0, n, pos, k, v), 0);
            for (int i0 = 0; i0 < n; i0 += 64) {
                const int m = n - i0 < 64 ? n - i0 : 64;
                ck_assert_int_eq(shard_append(sh[w][1 + (i0 / 64) % 3], 0, m, pos + i0,
                                              k + (size_t)i0 * nkv * d, v + (size_t)i0 * nkv * d),
                                 0);
            }
        }
        const shard_step st = {.layer = 0,
                               .method = SHARD_FASA,
                               .gqa = SHARD_GQA_PER_HEAD,
                               .budget = B,
                               .max_pos = pos[n - 1] - 50,
                               .scale = 1.0f / sqrtf(d),
                               .q = q};
        for (int p = 0; p < 4; p++) {
            ck_assert_uint_eq(shard_bytes_held(sh[0][p]), shard_bytes_held(sh[1][p]));
            ck_assert_uint_eq(shard_bytes_allocated(sh[0][p]), shard_bytes_allocated(sh[1][p]));
            topk_cand c[2][4 * 37];
            int nc[2][4];
            float m[2][4];
            double l[2][4], o[2][4 * 8];
            for (int w = 0; w < 2; w++) {
                ck_assert_int_eq(shard_score(sh[w][p], &st, c[w], nc[w]), 0);
                topk_cand thr[4];
                uint8_t have[4];
                for (int h = 0; h < nh; h++) {
                    ck_assert_int_gt(nc[w][h], 0);
                    thr[h] = c[w][h * B + nc[w][h] - 1], have[h] = 1;
                }
                ck_assert_int_eq(shard_attend(sh[w][p], &st, thr, have, m[w], l[w], o[w]), 0);
            }
            ck_assert_int_eq(shard_bytes_read(sh[0][p]), shard_bytes_read(sh[1][p]));
            for (int h = 0; h < nh; h++) {
                ck_assert_int_eq(nc[0][h], nc[1][h]);
                ck_assert_mem_eq(c[0] + h * B, c[1] + h * B, (size_t)nc[0][h] * sizeof(topk_cand));
            }
            ck_assert_mem_eq(m[0], m[1], sizeof(m[0]));
            ck_assert_mem_eq(l[0], l[1], sizeof(l[0]));
            ck_assert_mem_eq(o[0], o[1], sizeof(o[0]));
        }
        for (int w = 0; w < 2; w++)
            for (int p = 0; p < 4; p++) shard_destroy(&sh[w][p]);
    }
    free(k), free(v), free(pos);
}
END_TEST

/* Memory follows the rows held: after appends of uneven sizes the bytes the shard counts
 * (shard_bytes_held, from the rows alone, which the engine's memory limit mirrors) equal
 * what its arrays hold (shard_bytes_allocated), 100 rows cost a small part of a chunk, and
 * a store grown a few rows at a time answers bit for bit as one filled in a single append
 * (whose chunks never grow). */
START_TEST(test_shard_bytes_exact)
{
    const int nh = 4, nkv = 2, d = 40, n = 2 * SHARD_CHUNK + 700;
    const size_t kv = (size_t)n * nkv * d;
    test_rng r = {47};
    float *k = test_alloc(kv * 4), *v = test_alloc(kv * 4), q[4 * 40];
    int32_t *pos = test_alloc((size_t)n * 4);
    test_fill(&r, kv, k, 3.0f);
    test_fill(&r, kv, v, 3.0f);
    test_fill(&r, sizeof(q) / 4, q, 1.0f);
    for (int i = 0; i < n; i++) pos[i] = i;
    for (int dt = FASA_DTYPE_F32; dt <= FASA_DTYPE_F16; dt++) {
        shard_layout lay;
        s_layout(&lay, 1, nh, nkv, d);
        lay.dtype = dt;
        shard_t *grown = shard_new(&lay), *once = shard_new(&lay);
        ck_assert_ptr_nonnull(grown);
        ck_assert_ptr_nonnull(once);
        ck_assert_uint_eq(shard_bytes_held(grown), shard_bytes_allocated(grown));
        const size_t esz = fasa_dtype_size(dt), row = (size_t)nkv * 2 * d * esz;
        static const int runs[] = {1, 7, 56, 36, 100, 900, 3000, 1, 4095, 700};
        int i0 = 0;
        for (size_t j = 0; j < sizeof(runs) / sizeof(*runs) && i0 < n; j++) {
            const int m = i0 + runs[j] <= n ? runs[j] : n - i0;
            const size_t o = (size_t)i0 * nkv * d;
            ck_assert_int_eq(shard_append(grown, 0, m, pos + i0, k + o, v + o), 0);
            i0 += m;
            ck_assert_uint_eq(shard_bytes_held(grown), shard_bytes_allocated(grown));
            if (i0 == 100) /* 128 rows' arrays, not 4096: well under a tenth of a chunk */
                ck_assert_uint_lt(shard_bytes_held(grown), (size_t)SHARD_CHUNK / 10 * row);
        }
        ck_assert_int_eq(i0, n);
        ck_assert_int_eq(shard_append(once, 0, n, pos, k, v), 0);
        ck_assert_uint_eq(shard_bytes_held(once), shard_bytes_allocated(once));
        ck_assert_uint_eq(shard_bytes_held(once), shard_bytes_held(grown));
        /* Two full chunks and one of 1024 rows (700 held), K and V of every head. */
        ck_assert_uint_le((size_t)(2 * SHARD_CHUNK + 1024) * row, shard_bytes_held(once));
        for (int method = 0; method <= SHARD_METHOD_LAST; method++) {
            if (method == SHARD_SPARQ) continue;
            shard_step st = {0, method, 0, 32, n - 1, 1.0f / sqrtf(d), q, 0};
            topk_cand ca[4 * 32], cb[4 * 32], thr[4];
            int na[4] = {0}, nb[4] = {0};
            uint8_t have[4] = {0};
            if (method != SHARD_DENSE) {
                ck_assert_int_eq(shard_score(grown, &st, ca, na), 0);
                ck_assert_int_eq(shard_score(once, &st, cb, nb), 0);
                for (int u = 0; u < 4; u++) {
                    ck_assert_int_eq(na[u], nb[u]);
                    ck_assert_mem_eq(ca + u * 32, cb + u * 32, (size_t)na[u] * sizeof(*ca));
                    if (nb[u]) thr[u] = cb[u * 32 + nb[u] - 1], have[u] = 1;
                }
            }
            float ma[4], mb[4];
            double la[4], lb[4], oa[4 * 40], ob[4 * 40];
            ck_assert_int_eq(shard_attend(grown, &st, thr, have, ma, la, oa), 0);
            ck_assert_int_eq(shard_attend(once, &st, thr, have, mb, lb, ob), 0);
            ck_assert_mem_eq(ma, mb, sizeof(ma));
            ck_assert_mem_eq(la, lb, sizeof(la));
            ck_assert_mem_eq(oa, ob, sizeof(oa));
        }
        shard_destroy(&grown);
        shard_destroy(&once);
        shard_layout_cleanup(&lay);
    }
    free(k), free(v), free(pos);
}
END_TEST

/* Runs a FASA and a dense step on layer 0 of a and b and asserts the same bits. */
static void s_same_steps(shard_t *a, shard_t *b, int nh, int d, int max_pos, const float *q)
{
    for (int method = SHARD_FASA; method <= SHARD_DENSE; method += SHARD_DENSE - SHARD_FASA) {
        shard_step st = {0, method, 0, 32, max_pos, 1.0f / sqrtf((float)d), q, 0};
        topk_cand ca[8 * 32], cb[8 * 32], thr[8];
        int na[8] = {0}, nb[8] = {0};
        uint8_t have[8] = {0};
        if (method != SHARD_DENSE) {
            ck_assert_int_eq(shard_score(a, &st, ca, na), 0);
            ck_assert_int_eq(shard_score(b, &st, cb, nb), 0);
            for (int u = 0; u < nh; u++) {
                ck_assert_int_eq(na[u], nb[u]);
                ck_assert_mem_eq(ca + u * 32, cb + u * 32, (size_t)na[u] * sizeof(*ca));
                if (nb[u]) thr[u] = cb[u * 32 + nb[u] - 1], have[u] = 1;
            }
        }
        float ma[8], mb[8];
        double la[8], lb[8], oa[8 * 128], ob[8 * 128];
        ck_assert_int_eq(shard_attend(a, &st, thr, have, ma, la, oa), 0);
        ck_assert_int_eq(shard_attend(b, &st, thr, have, mb, lb, ob), 0);
        ck_assert_mem_eq(ma, mb, (size_t)nh * sizeof(*ma));
        ck_assert_mem_eq(la, lb, (size_t)nh * sizeof(*la));
        ck_assert_mem_eq(oa, ob, (size_t)nh * d * sizeof(*oa));
    }
}

/* shard_reserve: shards whose chunks come from the reserve (a first one, then one in the
 * memory a destroyed shard gave back, written with other rows: it must be zeroed again,
 * partial tiles included) hold bitwise what a shard without a reserve holds, count the
 * same bytes, answer the same steps; one that outgrows the reserve grows past it; the
 * reserve keeps at most its size free, and 0 ends it. */
START_TEST(test_shard_reserve)
{
    const int nh = 8, nkv = 4, d = 128, n = 4 * SHARD_CHUNK + 301; /* ~17 MB per chunk (f32) */
    const size_t kv = (size_t)n * nkv * d;
    test_rng r = {91};
    float *k = test_alloc(kv * 4), *v = test_alloc(kv * 4), *k2 = test_alloc(kv * 4), q[8 * 128];
    int32_t *pos = test_alloc((size_t)n * 4);
    test_fill(&r, kv, k, 3.0f);
    test_fill(&r, kv, v, 3.0f);
    test_fill(&r, kv, k2, 5.0f);
    test_fill(&r, sizeof(q) / 4, q, 1.0f);
    for (int i = 0; i < n; i++) pos[i] = 2 * i;
    size_t size, free_b;
    shard_reserve_stats(&size, &free_b);
    ck_assert_uint_eq(size, 0);
    ck_assert_uint_eq(free_b, 0);
    for (int dt = FASA_DTYPE_F32; dt <= FASA_DTYPE_F16; dt++) {
        shard_layout lay;
        s_layout(&lay, 1, nh, nkv, d);
        lay.dtype = dt;
        const int m = SHARD_CHUNK - 13; /* one full chunk, its last tile partial */
        /* Without a reserve: the reference shards. */
        shard_t *ref = shard_new(&lay), *ref_small = shard_new(&lay);
        ck_assert_int_eq(shard_append(ref, 0, n, pos, k, v), 0);
        ck_assert_int_eq(shard_append(ref_small, 0, m, pos, k, v), 0);
        const size_t res = (size_t)64 << 20;
        double sec = -1;
        ck_assert_int_eq(shard_reserve(res, 3, &sec), 0);
        ck_assert(sec >= 0);
        shard_reserve_stats(&size, &free_b);
        ck_assert_uint_eq(size, res);
        ck_assert_uint_eq(free_b, res);
        /* A shard in the reserve, written with other rows and destroyed: dirty memory back. */
        shard_t *dirty = shard_new(&lay);
        ck_assert_int_eq(shard_append(dirty, 0, SHARD_CHUNK, pos, k2, k2), 0);
        shard_reserve_stats(NULL, &free_b);
        ck_assert_uint_lt(free_b, res);
        shard_destroy(&dirty);
        shard_reserve_stats(NULL, &free_b);
        ck_assert_uint_eq(free_b, res);
        /* The same rows as ref_small, in that memory. */
        shard_t *small = shard_new(&lay);
        ck_assert_int_eq(shard_append(small, 0, m, pos, k, v), 0);
        shard_reserve_stats(NULL, &free_b);
        ck_assert_uint_lt(free_b, res);
        ck_assert(shard_store_equal(ref_small, small));
        ck_assert_uint_eq(shard_bytes_held(small), shard_bytes_held(ref_small));
        ck_assert_uint_eq(shard_bytes_allocated(small), shard_bytes_allocated(ref_small));
        s_same_steps(ref_small, small, nh, d, 2 * m, q);
        /* More than the reserve holds (f32: five chunks of ~17 MB): grows past it. */
        shard_t *big = shard_new(&lay);
        ck_assert_int_eq(shard_append(big, 0, n, pos, k, v), 0);
        shard_reserve_stats(NULL, &free_b);
        ck_assert_uint_lt(free_b, res);
        ck_assert(shard_store_equal(ref, big));
        ck_assert_uint_eq(shard_bytes_held(big), shard_bytes_held(ref));
        s_same_steps(ref, big, nh, d, 2 * n, q);
        /* Everything back: the free memory is at most the reserve. */
        shard_destroy(&small);
        shard_destroy(&big);
        shard_reserve_stats(&size, &free_b);
        ck_assert_uint_eq(size, res);
        ck_assert_uint_le(free_b, res);
        ck_assert_uint_ge(free_b, res - ((size_t)32 << 20));
        ck_assert_int_eq(shard_reserve(0, 1, NULL), 0);
        shard_reserve_stats(&size, &free_b);
        ck_assert_uint_eq(size, 0);
        ck_assert_uint_eq(free_b, 0);
        /* A reserve smaller than an arena (32 MiB) still serves a chunk. */
        ck_assert_int_eq(shard_reserve((size_t)18 << 20, 1, NULL), 0);
        small = shard_new(&lay);
        ck_assert_int_eq(shard_append(small, 0, m, pos, k, v), 0);
        shard_reserve_stats(NULL, &free_b);
        ck_assert_uint_lt(free_b, (size_t)18 << 20);
        ck_assert(shard_store_equal(ref_small, small));
        shard_destroy(&small);
        shard_reserve_stats(NULL, &free_b);
        ck_assert_uint_eq(free_b, (size_t)18 << 20);
        ck_assert_int_eq(shard_reserve(0, 1, NULL), 0);
        /* Chunks over half an arena (f16 with 8 KV heads: ~17 MB) take from the reserve about
         * what they hold, not a 32 MiB arena each. */
        if (dt == FASA_DTYPE_F16) {
            shard_layout lay8;
            s_layout(&lay8, 1, nh, 8, d);
            lay8.dtype = dt;
            ck_assert_int_eq(shard_reserve(res, 1, NULL), 0);
            shard_t *wide = shard_new(&lay8);
            ck_assert_int_eq(shard_append(wide, 0, 2 * SHARD_CHUNK, pos, k, v), 0);
            shard_reserve_stats(NULL, &free_b);
            const size_t held = shard_bytes_held(wide);
            ck_assert_uint_gt(held, (size_t)32 << 20);
            ck_assert_uint_le(res - free_b, held + ((size_t)4 << 20)); /* 2 MiB per chunk */
            shard_destroy(&wide);
            shard_layout_cleanup(&lay8);
            ck_assert_int_eq(shard_reserve(0, 1, NULL), 0);
        }
        shard_destroy(&ref);
        shard_destroy(&ref_small);
        shard_layout_cleanup(&lay);
    }
    free(k), free(v), free(k2), free(pos);
}
END_TEST

/* A layout with a shuffled dim order per (layer, KV head) and n_dom from 0 to d. */
static void s_layout_random(shard_layout *lay, test_rng *r, int nl, int nh, int nkv, int d)
{
    ck_assert_int_eq(shard_layout_plain(lay, nl, nh, nkv, d), 0);
    for (int i = 0; i < nl * nkv; i++) {
        int *perm = lay->perm + (size_t)i * d;
        for (int c = d - 1; c > 0; c--) {
            const int j = (int)(test_next(r) % (uint64_t)(c + 1)), t = perm[c];
            perm[c] = perm[j], perm[j] = t;
        }
        lay->n_dom[i] = i == 0 ? 0 : i == 1 ? d : (int)(test_next(r) % (uint64_t)(d + 1));
    }
    for (size_t i = 0; i < (size_t)nl * nh * d; i++) lay->qmask[i] = test_next(r) % 2;
}

/* shard_append (and shard_append_dt from f16/bf16/f32 rows) against the reference
 * shard_append_naive: bitwise the same store, for every storage and score dtype, appends
 * of 1 row to more than a chunk, position gaps (QUEST pages), signed zeros and repeats
 * (min/max ties). Rows sent as the session's dtype equal an f32 append of the same values
 * rounded; then QUEST, SPARQ and FASA steps on both answer the same bits. */
START_TEST(test_shard_append_fast)
{
    const int nl = 2, nh = 6, nkv = 3, d = 10, n = SHARD_CHUNK + 900;
    const int sds[] = {SCAN_AUTO, SCAN_F16, SCAN_I8};
    test_rng r = {77};
    const size_t row = (size_t)nkv * d;
    float *k = test_alloc((size_t)n * row * 4), *v = test_alloc((size_t)n * row * 4);
    float *kw = test_alloc((size_t)n * row * 4), *vw = test_alloc((size_t)n * row * 4);
    uint16_t *kh = test_alloc((size_t)n * row * 2), *vh = test_alloc((size_t)n * row * 2);
    int32_t *pos = test_alloc((size_t)n * 4);
    test_fill(&r, (size_t)n * row, k, 3.0f);
    test_fill(&r, (size_t)n * row, v, 3.0f);
    for (size_t i = 0; i < (size_t)n * row; i++) {
        const uint64_t x = test_next(&r) % 16;
        if (x == 0) k[i] = 0.0f;
        if (x == 1) k[i] = -0.0f;
        if (x == 2 && i >= row) k[i] = k[i - row]; /* the row before's value: a tie */
        if (x == 3) v[i] = -0.0f;
    }
    for (int i = 0, p = 3; i < n; i++) pos[i] = p, p += 1 + (int)(test_next(&r) % 5 == 0) * 20;
    const int steps[] = {1, 7, 16, 100, 1000, SHARD_CHUNK + 5};
    for (int dt = FASA_DTYPE_F32; dt <= FASA_DTYPE_BF16; dt++)
        for (size_t si = 0; si < sizeof(sds) / sizeof(*sds); si++)
            for (int in = FASA_DTYPE_F32; in <= FASA_DTYPE_BF16; in++) {
                shard_layout lay;
                s_layout_random(&lay, &r, nl, nh, nkv, d);
                lay.dtype = dt;
                lay.score_dtype = sds[si];
                /* Without a scoring copy, layer 1 keeps the original dim order (as a
                 * session without a profile): shard_append_dt copies such rows whole. */
                for (int g = 0; g < nkv && sds[si] == SCAN_AUTO; g++)
                    for (int p = 0; p < d; p++) lay.perm[((size_t)nkv + g) * d + p] = p;
                /* The values as the input dtype carries them (f32: themselves). */
                const float *kin = k, *vin = v;
                if (in != FASA_DTYPE_F32) {
                    dtype_from_f32(SIMD_PORTABLE, in, (size_t)n * row, k, kh);
                    dtype_from_f32(SIMD_PORTABLE, in, (size_t)n * row, v, vh);
                    dtype_to_f32(SIMD_PORTABLE, in, (size_t)n * row, kh, kw);
                    dtype_to_f32(SIMD_PORTABLE, in, (size_t)n * row, vh, vw);
                    kin = kw, vin = vw;
                }
                shard_t *ref = shard_new(&lay), *fast = shard_new(&lay);
                ck_assert_ptr_nonnull(ref);
                ck_assert_ptr_nonnull(fast);
                for (int l = 0; l < nl; l++)
                    for (int i0 = 0, si2 = l; i0 < n; si2++) {
                        int m = steps[si2 % 6];
                        if (m > n - i0) m = n - i0;
                        const size_t o = (size_t)i0 * row;
                        ck_assert_int_eq(shard_append_naive(ref, l, m, pos + i0, kin + o, vin + o),
                                         0);
                        if (in == FASA_DTYPE_F32)
                            ck_assert_int_eq(shard_append(fast, l, m, pos + i0, k + o, v + o), 0);
                        else
                            ck_assert_int_eq(
                                shard_append_dt(fast, l, m, pos + i0, in, kh + o, vh + o), 0);
                        i0 += m;
                        /* Bounds and sums brought up to date part-way (a page half full),
                         * then appended to again. */
                        if (si2 % 4 == 1) ck_assert(shard_store_equal(ref, fast));
                    }
                ck_assert_msg(shard_store_equal(ref, fast), "dtype %d score %d in %d", dt, sds[si],
                              in);
                /* The steps that read the bounds and sums answer the same bits. */
                float q[6 * 10], m1[6], m2[6];
                double l1[6], l2[6], o1[6 * 10], o2[6 * 10];
                test_fill(&r, sizeof(q) / 4, q, 1.0f);
                const shard_method ms[] = {SHARD_QUEST, SHARD_SPARQ, SHARD_FASA};
                for (int mi = 0; mi < 3; mi++) {
                    shard_step st = {.layer = 1,
                                     .method = ms[mi],
                                     .gqa = SHARD_GQA_PER_HEAD,
                                     .budget = 9,
                                     .max_pos = pos[n - 1] - 50,
                                     .scale = 0.3f,
                                     .q = q,
                                     .sparq_r = ms[mi] == SHARD_SPARQ ? 4 : 0};
                    topk_cand c1[6 * 9] = {{0}}, c2[6 * 9] = {{0}}, thr[6];
                    int n1[6], n2[6];
                    uint8_t have[6] = {1, 1, 1, 1, 1, 1};
                    ck_assert_int_eq(shard_score(ref, &st, c1, n1), 0);
                    ck_assert_int_eq(shard_score(fast, &st, c2, n2), 0);
                    ck_assert_msg(!memcmp(n1, n2, sizeof(n1)), "method %d dt %d sd %d in %d",
                                  ms[mi], dt, sds[si], in);
                    ck_assert_mem_eq(c1, c2, sizeof(c1));
                    for (int h = 0; h < 6; h++) thr[h] = c1[h * 9 + n1[h] - 1];
                    ck_assert_int_eq(shard_attend(ref, &st, thr, have, m1, l1, o1), 0);
                    ck_assert_int_eq(shard_attend(fast, &st, thr, have, m2, l2, o2), 0);
                    ck_assert_mem_eq(m1, m2, sizeof(m1));
                    ck_assert_mem_eq(l1, l2, sizeof(l1));
                    ck_assert_mem_eq(o1, o2, sizeof(o1));
                }
                shard_destroy(&ref);
                shard_destroy(&fast);
                shard_layout_cleanup(&lay);
            }
    free(k), free(v), free(kw), free(vw), free(kh), free(vh), free(pos);
}
END_TEST

/* shard_txn_undo: a shard that took appends under a transaction and undid them holds
 * bitwise what one that never took them holds, and both take the next rows the same. */
START_TEST(test_shard_txn_undo)
{
    const int nl = 2, nh = 6, nkv = 3, d = 10, n = 2 * SHARD_CHUNK + 300;
    const int sds[] = {SCAN_AUTO, SCAN_BF16, SCAN_I8};
    test_rng r = {78};
    const size_t row = (size_t)nkv * d;
    float *k = test_alloc((size_t)n * row * 4), *v = test_alloc((size_t)n * row * 4);
    int32_t *pos = test_alloc((size_t)n * 4);
    test_fill(&r, (size_t)n * row, k, 2.0f);
    test_fill(&r, (size_t)n * row, v, 2.0f);
    for (int i = 0; i < n; i++) pos[i] = 3 * i + 1;
    /* cut: the rows kept; then undone appends of rows cut .. cut2 (layer 0 in two appends
     * crossing a tile, a page and a chunk; layer 1 in one); then cut .. n kept. */
    const int cuts[][2] = {{0, 40}, {37, SHARD_CHUNK + 9}, {SHARD_CHUNK - 5, SHARD_CHUNK + 700}};
    for (int dt = FASA_DTYPE_F32; dt <= FASA_DTYPE_BF16; dt++)
        for (size_t si = 0; si < sizeof(sds) / sizeof(*sds); si++)
            for (int ci = 0; ci < 3; ci++) {
                const int cut = cuts[ci][0], cut2 = cuts[ci][1], mid = (cut + cut2) / 2;
                shard_layout lay;
                s_layout_random(&lay, &r, nl, nh, nkv, d);
                lay.dtype = dt;
                lay.score_dtype = sds[si];
                shard_t *a = shard_new(&lay), *b = shard_new(&lay);
                for (int l = 0; l < nl; l++) {
                    ck_assert_int_eq(shard_append(a, l, cut, pos, k, v), 0);
                    ck_assert_int_eq(shard_append(b, l, cut, pos, k, v), 0);
                }
                if (ci == 1) ck_assert(shard_store_equal(a, b)); /* sums up to date */
                shard_txn_begin(a, 7);
                const size_t o = (size_t)cut * row, om = (size_t)mid * row;
                ck_assert_int_eq(shard_append(a, 0, mid - cut, pos + cut, k + o, v + o), 0);
                ck_assert_int_eq(shard_append(a, 0, cut2 - mid, pos + mid, k + om, v + om), 0);
                ck_assert_int_eq(shard_append(a, 1, cut2 - cut, pos + cut, k + o, v + o), 0);
                ck_assert_int_eq(shard_rows(a, 0), cut2);
                ck_assert(!shard_store_equal(a, b));
                shard_txn_undo(a, 8); /* another transaction: nothing */
                ck_assert_int_eq(shard_rows(a, 0), cut2);
                shard_txn_undo(a, 7);
                shard_txn_begin(a, 0);
                ck_assert_int_eq(shard_rows(a, 0), cut);
                ck_assert_int_eq(shard_rows(a, 1), cut);
                ck_assert_msg(shard_store_equal(a, b), "undo: dtype %d score %d cut %d", dt,
                              sds[si], ci);
                for (int l = 0; l < nl; l++) {
                    ck_assert_int_eq(shard_append(a, l, n - cut, pos + cut, k + o, v + o), 0);
                    ck_assert_int_eq(shard_append(b, l, n - cut, pos + cut, k + o, v + o), 0);
                }
                ck_assert_msg(shard_store_equal(a, b), "after: dtype %d score %d cut %d", dt,
                              sds[si], ci);
                shard_destroy(&a);
                shard_destroy(&b);
                shard_layout_cleanup(&lay);
            }
    free(k), free(v), free(pos);
}
END_TEST

/* FASA_PLUS's running v kdom^T sums (folded by the step after the appends, read in f32):
 * after bulk and single-row appends, steps with rows past max_pos, on one thread and on
 * three, and on a shard whose transactions appended other rows, ran a step on them (the
 * sums fold them in) and were undone: the three answer the same bits (candidates,
 * partials, aux, bytes); and the aux after phase 2 holds, over the visible rows not
 * attended, the value sum and scale * sum of (q_dom . k_dom) v against a double reference
 * (relative 1e-6 of the sum of |terms|). KV heads packing 0, all and some dims. */
START_TEST(test_shard_plus_fold)
{
    const int nh = 6, nkv = 3, d = 10, grp = nh / nkv, n = SHARD_CHUNK + 300, B = 16;
    const size_t row = (size_t)nkv * d, na = SHARD_SPARQ_AUX(10);
    test_rng r = {91};
    float *k = test_alloc((size_t)n * row * 4), *v = test_alloc((size_t)n * row * 4);
    float *junk = test_alloc(64 * row * 4), q[6 * 10];
    int32_t *pos = test_alloc((size_t)n * 4);
    test_fill(&r, (size_t)n * row, k, 2.0f);
    test_fill(&r, (size_t)n * row, v, 2.0f);
    test_fill(&r, 64 * row, junk, 5.0f);
    for (int i = 0; i < n; i++) pos[i] = 2 * i;
    shard_layout lay;
    s_layout_random(&lay, &r, 1, nh, nkv, d);
    fasa_pool_t *pool = fasa_pool_new(3);
    ck_assert_ptr_nonnull(pool);
    shard_t *sh[3] = {shard_new(&lay), shard_new(&lay), shard_new(&lay)};
    shard_set_pool(sh[1], pool);
    double worst = 0;
    int at = 0, steps = 0;
    const int adds[] = {700, 1, 1, 13, 1, SHARD_CHUNK - 600, 1, 57, 1, 1};
    for (size_t ai = 0; ai < sizeof(adds) / sizeof(*adds); ai++) {
        const int m = adds[ai];
        if (ai % 2 == 1) { /* sh[2]: other rows under a transaction, a step, undone */
            shard_txn_begin(sh[2], (uint32_t)ai);
            ck_assert_int_eq(shard_append(sh[2], 0, 5, pos + at, junk, junk + 5 * row), 0);
            test_fill(&r, sizeof(q) / 4, q, 1.0f);
            shard_step st = {0, SHARD_FASA_PLUS, 0, B, pos[at + 4], 1.0f / sqrtf(d), q, 3};
            ck_assert_int_eq(shard_score(sh[2], &st, NULL, NULL), 0);
            shard_txn_undo(sh[2], (uint32_t)ai);
            shard_txn_begin(sh[2], 0);
        }
        for (int x = 0; x < 3; x++)
            ck_assert_int_eq(shard_append(sh[x], 0, m, pos + at, k + at * row, v + at * row), 0);
        at += m;
        for (int back = 0; back < 3; back += 2) { /* max_pos the last row, then 2 rows back */
            test_fill(&r, sizeof(q) / 4, q, 1.0f);
            const int n_vis = at - back;
            shard_step st = {0, SHARD_FASA_PLUS, 0, B, pos[n_vis - 1], 1.0f / sqrtf(d), q, 3};
            topk_cand c[3][6 * 16], thr[6];
            int nc[3][6];
            uint8_t have[6];
            float mm[3][6];
            double l[3][6], o[3][6 * 10], aux[3][6 * SHARD_SPARQ_AUX(10)];
            int64_t bytes[3];
            for (int x = 0; x < 3; x++) {
                ck_assert_int_eq(shard_score(sh[x], &st, c[x], nc[x]), 0);
                for (int h = 0; h < nh; h++) {
                    ck_assert_int_eq(nc[x][h], nc[0][h]);
                    have[h] = nc[x][h] > 0;
                    if (have[h]) thr[h] = c[x][h * B + nc[x][h] - 1];
                }
                ck_assert_int_eq(shard_attend(sh[x], &st, thr, have, mm[x], l[x], o[x]), 0);
                shard_sparq_aux(sh[x], &st, aux[x]);
                bytes[x] = shard_bytes_read(sh[x]);
            }
            for (int x = 1; x < 3; x++) {
                ck_assert_mem_eq(c[x], c[0], sizeof(c[0]));
                ck_assert_mem_eq(mm[x], mm[0], sizeof(mm[0]));
                ck_assert_mem_eq(l[x], l[0], sizeof(l[0]));
                ck_assert_mem_eq(o[x], o[0], sizeof(o[0]));
                ck_assert_mem_eq(aux[x], aux[0], sizeof(aux[0]));
                ck_assert_int_eq(bytes[x], bytes[0]);
            }
            for (int h = 0; h < nh; h++) { /* the reference over the rows not attended */
                const int g = h / grp, u = lay.n_dom[g];
                const int *perm = lay.perm + (size_t)g * d;
                uint8_t *sel = calloc((size_t)n_vis, 1); /* the group's union */
                int n_sel = 0;
                for (int hh = g * grp; hh < g * grp + grp; hh++)
                    for (int j = 0; j < nc[0][hh]; j++)
                        if (!sel[c[0][hh * B + j].pos / 2])
                            sel[c[0][hh * B + j].pos / 2] = 1, n_sel++;
                double vs[10] = {0}, vz[10] = {0}, mag[10] = {0};
                for (int j = 0; j < n_vis; j++) {
                    if (sel[j]) continue;
                    const float *kj = k + (size_t)j * row + (size_t)g * d;
                    const float *vj = v + (size_t)j * row + (size_t)g * d;
                    double z = 0;
                    for (int p = 0; p < u; p++) z += (double)q[h * d + perm[p]] * kj[perm[p]];
                    z *= (double)(1.0f / sqrtf(d));
                    for (int cc = 0; cc < d; cc++)
                        vs[cc] += vj[cc], vz[cc] += z * vj[cc], mag[cc] += fabs(z * vj[cc]);
                }
                free(sel);
                const double *a = aux[0] + (size_t)h * na;
                ck_assert_double_eq(a[SHARD_PLUS_NA(10)], n_sel);
                for (int cc = 0; cc < d; cc++) {
                    ck_assert_double_eq_tol(a[3 + cc], vs[cc], 1e-6 * n_vis);
                    const double e = fabs(a[SHARD_PLUS_VZ(10) + cc] - vz[cc]);
                    ck_assert_msg(e <= 1e-6 * (mag[cc] + 1e-3), "head %d dim %d: vz %g want %g", h,
                                  cc, a[SHARD_PLUS_VZ(10) + cc], vz[cc]);
                    if (mag[cc] > 0 && e / mag[cc] > worst) worst = e / mag[cc];
                }
            }
            steps++;
        }
    }
    ck_assert_int_eq(steps, 20);
    printf("shard fasa-plus: v z sums, max error relative to the sum of |terms| %.3g\n", worst);
    for (int x = 0; x < 3; x++) shard_destroy(&sh[x]);
    fasa_pool_destroy(&pool);
    shard_layout_cleanup(&lay);
    free(k), free(v), free(junk), free(pos);
}
END_TEST

Suite *shard_suite(void)
{
    Suite *s = suite_create("shard");
    TCase *tc = tcase_create("store");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_shard_oracle_dense);
    tcase_add_test(tc, test_shard_fasa_scores);
    tcase_add_test(tc, test_shard_score_dtype);
    tcase_add_test(tc, test_shard_score_own_dtype);
    tcase_add_test(tc, test_shard_stream);
    tcase_add_test(tc, test_shard_quest);
    tcase_add_test(tc, test_shard_sparq);
    tcase_add_test(tc, test_shard_dtype);
    tcase_add_test(tc, test_shard_disk_tier);
    tcase_add_test(tc, test_shard_bytes_exact);
    tcase_add_test(tc, test_shard_reserve);
    tcase_add_test(tc, test_shard_append_fast);
    tcase_add_test(tc, test_shard_txn_undo);
    tcase_add_test(tc, test_shard_plus_fold);
    suite_add_tcase(s, tc);
    return s;
}

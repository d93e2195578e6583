/* The shard store against brute force over the same rows. */
#include <math.h>
#include <string.h>

#include "attn.h"
#include "shard.h"
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

Suite *shard_suite(void)
{
    Suite *s = suite_create("shard");
    TCase *tc = tcase_create("store");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_shard_oracle_dense);
    tcase_add_test(tc, test_shard_fasa_scores);
    suite_add_tcase(s, tc);
    return s;
}

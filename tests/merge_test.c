/* Local merge (engine.h fasa_merge): with one shard it is the exact merge, bit for bit; with
 * S shards its output is exact attention over the union of each shard's own top
 * ceil(B (1 + eps) / S) by score, computed here independently in double; methods other than
 * fasa and oracle are refused; the service carries Attend.merge and StepStats. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fasa.pb-c.h"
#include "load_util.h"
#include "service.h"

#define MT_T 300
#define MT_NH 4
#define MT_NKV 2
#define MT_D 8
#define MT_BLOCK 32
#define MT_B 24

static fasa_session_config s_cfg(void)
{
    return (fasa_session_config){.n_layers = 1,
                                 .n_heads = MT_NH,
                                 .n_kv_heads = MT_NKV,
                                 .head_dim = MT_D,
                                 .method = FASA_METHOD_ORACLE,
                                 .budget = MT_B};
}

static fasa_engine_t *s_engine(int shards, const float *k, const float *v)
{
    fasa_engine_t *e = fasa_engine_new(shards, MT_BLOCK);
    const fasa_session_config c = s_cfg();
    fasa_error err;
    ck_assert_int_eq(fasa_engine_create(e, "s", &c, &err), FASA_OK);
    ck_assert_int_eq(fasa_engine_append(e, "s", 0, 0, MT_T, k, v, &err), FASA_OK);
    return e;
}

typedef struct scored {
    double s;
    int pos;
} scored;

static int s_by_score(const void *a, const void *b)
{
    const scored *x = a, *y = b;
    if (x->s != y->s) return x->s > y->s ? -1 : 1;
    return x->pos - y->pos;
}

START_TEST(test_local_one_shard_is_exact)
{
    const size_t n = (size_t)MT_T * MT_NKV * MT_D;
    float *k = test_alloc(n * 4), *v = test_alloc(n * 4), q[MT_NH * MT_D], oe[MT_NH * MT_D],
          ol[MT_NH * MT_D];
    test_rng r = {3};
    test_fill(&r, n, k, 2.0f);
    test_fill(&r, n, v, 1.0f);
    fasa_engine_t *e = s_engine(1, k, v);
    ck_assert_int_eq(fasa_engine_local_budget(e, MT_B), MT_B);
    for (int it = 0; it < 20; it++) {
        test_fill(&r, MT_NH * MT_D, q, 1.5f);
        fasa_attend_req req = {.q = q,
                               .method = -1,
                               .budget = 8 + it,
                               .gqa = it % 2,
                               .max_pos = it % 3 ? -1 : 100 + it};
        fasa_step_stats se, sl;
        fasa_error err;
        req.merge = FASA_MERGE_EXACT;
        ck_assert_int_eq(fasa_engine_attend(e, "s", &req, oe, NULL, &se, &err), FASA_OK);
        req.merge = FASA_MERGE_LOCAL;
        ck_assert_msg(fasa_engine_attend(e, "s", &req, ol, NULL, &sl, &err) == FASA_OK, "%s",
                      err.msg);
        ck_assert(!memcmp(oe, ol, sizeof(oe)));
        ck_assert_int_eq(sl.merge_used, FASA_MERGE_LOCAL);
        ck_assert_int_eq(se.merge_used, FASA_MERGE_EXACT);
        ck_assert_int_eq(sl.local_budget, req.budget);
        ck_assert_int_eq(sl.bytes_read, se.bytes_read);
    }
    fasa_engine_destroy(&e);
    free(k);
    free(v);
}
END_TEST

/* S shards: exact attention (double) over the union of each shard's own top b' by the full
 * score, the shard's rows being the blocks p / 32 % S == shard. */
START_TEST(test_local_matches_reference)
{
    const size_t n = (size_t)MT_T * MT_NKV * MT_D;
    float *k = test_alloc(n * 4), *v = test_alloc(n * 4), q[MT_NH * MT_D], out[MT_NH * MT_D];
    test_rng r = {4};
    test_fill(&r, n, k, 2.0f);
    test_fill(&r, n, v, 1.0f);
    scored *sc = test_alloc(MT_T * sizeof(scored));
    uint8_t *in = test_alloc(MT_T);
    for (int S = 2; S <= 3; S++) {
        fasa_engine_t *e = s_engine(S, k, v);
        const int bl = fasa_engine_local_budget(e, MT_B);
        ck_assert_int_eq(bl, (int)ceil(MT_B * 1.25 / S));
        for (int it = 0; it < 10; it++) {
            test_fill(&r, MT_NH * MT_D, q, 1.5f);
            const int max_pos = it % 2 ? MT_T - 1 : 150 + it;
            fasa_attend_req req = {.q = q,
                                   .method = -1,
                                   .gqa = FASA_GQA_PER_HEAD,
                                   .max_pos = max_pos,
                                   .merge = FASA_MERGE_LOCAL};
            fasa_error err;
            fasa_step_stats st;
            ck_assert_msg(fasa_engine_attend(e, "s", &req, out, NULL, &st, &err) == FASA_OK, "%s",
                          err.msg);
            ck_assert_int_eq(st.local_budget, bl);
            for (int h = 0; h < MT_NH; h++) {
                const int g = h / (MT_NH / MT_NKV);
                const float *qh = q + h * MT_D;
                memset(in, 0, MT_T);
                for (int sh = 0; sh < S; sh++) {
                    int m = 0;
                    for (int p = 0; p <= max_pos; p++) {
                        if ((p / MT_BLOCK) % S != sh) continue;
                        double s = 0;
                        for (int c = 0; c < MT_D; c++)
                            s += (double)qh[c] * k[((size_t)p * MT_NKV + g) * MT_D + c];
                        sc[m++] = (scored){s, p};
                    }
                    qsort(sc, (size_t)m, sizeof(*sc), s_by_score);
                    for (int i = 0; i < m && i < bl; i++) in[sc[i].pos] = 1;
                }
                double mx = -INFINITY, l = 0, o[MT_D] = {0};
                for (int p = 0; p <= max_pos; p++) {
                    if (!in[p]) continue;
                    double s = 0;
                    for (int c = 0; c < MT_D; c++)
                        s += (double)qh[c] * k[((size_t)p * MT_NKV + g) * MT_D + c];
                    s /= sqrt((double)MT_D);
                    if (s > mx) mx = s;
                }
                for (int p = 0; p <= max_pos; p++) {
                    if (!in[p]) continue;
                    double s = 0;
                    for (int c = 0; c < MT_D; c++)
                        s += (double)qh[c] * k[((size_t)p * MT_NKV + g) * MT_D + c];
                    const double w = exp(s / sqrt((double)MT_D) - mx);
                    l += w;
                    for (int c = 0; c < MT_D; c++)
                        o[c] += w * v[((size_t)p * MT_NKV + g) * MT_D + c];
                }
                for (int c = 0; c < MT_D; c++)
                    ck_assert_msg(fabs(out[h * MT_D + c] - o[c] / l) < 1e-5,
                                  "S %d head %d dim %d: %g vs %g", S, h, c, out[h * MT_D + c],
                                  o[c] / l);
            }
        }
        fasa_engine_destroy(&e);
    }
    free(sc);
    free(in);
    free(k);
    free(v);
}
END_TEST

START_TEST(test_local_refused)
{
    const size_t n = (size_t)MT_T * MT_NKV * MT_D;
    float *k = test_alloc(n * 4), *v = test_alloc(n * 4), q[MT_NH * MT_D] = {0}, out[MT_NH * MT_D];
    fasa_engine_t *e = s_engine(2, k, v);
    fasa_error err;
    fasa_attend_req req = {
        .q = q, .method = FASA_METHOD_STREAM, .gqa = -1, .max_pos = -1, .merge = FASA_MERGE_LOCAL};
    ck_assert_int_eq(fasa_engine_attend(e, "s", &req, out, NULL, NULL, &err),
                     FASA_INVALID_ARGUMENT);
    ck_assert_msg(strstr(err.msg, "merge local"), "%s", err.msg);
    req.merge = 5;
    ck_assert_int_eq(fasa_engine_attend(e, "s", &req, out, NULL, NULL, &err),
                     FASA_INVALID_ARGUMENT);
    /* A dense step under local merge is the dense step. */
    req.method = FASA_METHOD_DENSE;
    req.merge = FASA_MERGE_LOCAL;
    fasa_step_stats st;
    ck_assert_int_eq(fasa_engine_attend(e, "s", &req, out, NULL, &st, &err), FASA_OK);
    ck_assert_int_eq(st.merge_used, FASA_MERGE_EXACT);
    ck_assert_int_eq(fasa_engine_set_merge_eps(e, -1), -1);
    ck_assert_int_eq(fasa_engine_set_merge_eps(e, 0), 0);
    ck_assert_int_eq(fasa_engine_local_budget(e, MT_B), MT_B / 2);
    fasa_engine_destroy(&e);
    free(k);
    free(v);
}
END_TEST

Suite *merge_suite(void)
{
    const TTest *tests[] = {test_local_one_shard_is_exact, test_local_matches_reference,
                            test_local_refused, NULL};
    return test_suite("merge", "merge", 120, tests);
}

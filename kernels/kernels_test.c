/* Every optimised kernel against its naive reference. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "attn.h"
#include "ca.h"
#include "scan.h"
#include "score.h"
#include "simd.h"
#include "test_util.h"
#include "topk.h"

/* score_tiles vs score_tiles_ref over head counts that hit every grouping (4, 2, 1). */
START_TEST(test_score_tiles)
{
    test_rng r = {1};
    const int dims[] = {0, 2, 8, 32, 33, 128};
    for (size_t di = 0; di < sizeof(dims) / sizeof(*dims); di++)
        for (int n_q = 1; n_q <= 8; n_q++) {
            const int nd = dims[di], n_tiles = 5, ld = n_tiles * SCORE_TILE + 3;
            float *q = test_alloc((size_t)n_q * nd * 4 + 4);
            float *tiles = test_alloc((size_t)n_tiles * nd * SCORE_TILE * 4 + 4);
            float *a = test_alloc((size_t)n_q * ld * 4), *b = test_alloc((size_t)n_q * ld * 4);
            test_fill(&r, (size_t)n_q * nd, q, 2.0f);
            test_fill(&r, (size_t)n_tiles * nd * SCORE_TILE, tiles, 3.0f);
            score_tiles(n_tiles, nd, n_q, a, ld, q, tiles);
            score_tiles_ref(n_tiles, nd, n_q, b, ld, q, tiles);
            for (int h = 0; h < n_q; h++)
                for (int j = 0; j < n_tiles * SCORE_TILE; j++)
                    ck_assert_float_eq_tol(a[h * ld + j], b[h * ld + j], 1e-5f * (nd + 1) * 6);
            free(q), free(tiles), free(a), free(b);
        }
}
END_TEST

START_TEST(test_score_rows)
{
    test_rng r = {2};
    const int dims[] = {1, 2, 15, 16, 17, 96, 128};
    for (size_t di = 0; di < sizeof(dims) / sizeof(*dims); di++)
        for (int n_q = 1; n_q <= 5; n_q += 2)
            for (int acc = 0; acc < 2; acc++) {
                const int nd = dims[di], n = 37, ldr = nd + 5, ld = n + 1;
                float *q = test_alloc((size_t)n_q * nd * 4);
                float *rows = test_alloc((size_t)n * ldr * 4);
                float *a = test_alloc((size_t)n_q * ld * 4), *b = test_alloc((size_t)n_q * ld * 4);
                test_fill(&r, (size_t)n_q * nd, q, 1.0f);
                test_fill(&r, (size_t)n * ldr, rows, 1.0f);
                test_fill(&r, (size_t)n_q * ld, a, 1.0f);
                memcpy(b, a, (size_t)n_q * ld * 4);
                score_rows(n, nd, n_q, a, ld, q, rows, ldr, acc);
                score_rows_ref(n, nd, n_q, b, ld, q, rows, ldr, acc);
                ck_assert_double_le(test_max_abs_diff((size_t)n_q * ld, a, b), 1e-5 * (nd + 1));
                free(q), free(rows), free(a), free(b);
            }
}
END_TEST

/* ---- storage dtypes: every SIMD path against naive converters ---- */

static uint32_t s_fbits(float x)
{
    uint32_t b;
    memcpy(&b, &x, 4);
    return b;
}

/* Naive f16 decode straight from the definition. */
static float s_naive_f16(uint16_t h)
{
    const int sign = h >> 15, e = (h >> 10) & 31, m = h & 1023;
    double v;
    if (e == 31)
        v = m ? NAN : INFINITY;
    else if (e == 0)
        v = ldexp(m, -24);
    else
        v = ldexp(1024 + m, e - 25);
    return (float)(sign ? -v : v);
}

/* Naive f32 -> f16: the nearest finite f16 value (positive patterns are ordered like their
 * values, so a binary search finds the two around |x|), ties to the even pattern; inf when
 * |x| is at least halfway from 65504 to 2^16. */
static uint16_t s_naive_to_f16(float x)
{
    const double a = fabs((double)x);
    const uint16_t sign = signbit(x) ? 0x8000 : 0;
    if (a >= 65520.0) return sign | 0x7c00;
    int lo = 0, hi = 0x7bff; /* largest pattern with value <= a */
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if ((double)s_naive_f16((uint16_t)mid) <= a)
            lo = mid;
        else
            hi = mid - 1;
    }
    if (lo == 0x7bff) return sign | 0x7bff;
    const double dl = a - s_naive_f16((uint16_t)lo), dh = s_naive_f16((uint16_t)(lo + 1)) - a;
    return sign | (uint16_t)(dl < dh || (dl == dh && (lo & 1) == 0) ? lo : lo + 1);
}

/* Naive f32 -> bf16: the nearer of the two bf16 values around x (ties: even), where the
 * pattern past the largest finite one stands for 2^128 (it decodes as inf). */
static uint16_t s_naive_to_bf16(float x)
{
    const uint32_t b = s_fbits(x), lo = b >> 16, hi = lo + 1;
    const uint32_t blo = lo << 16, bhi = hi << 16;
    float flo, fhi;
    memcpy(&flo, &blo, 4), memcpy(&fhi, &bhi, 4);
    const double vh = isinf(fhi) ? copysign(ldexp(1, 128), fhi) : fhi;
    const double dl = fabs((double)x - flo), dh = fabs(vh - x);
    if (dl < dh || (dl == dh && (lo & 1) == 0)) return (uint16_t)lo;
    return (uint16_t)hi;
}

static int s_paths(simd_path *out)
{
    int n = 0;
    for (int p = 0; p <= SIMD_PATH_LAST; p++) {
        if (simd_path_supported((simd_path)p))
            out[n++] = (simd_path)p;
        else
            printf("kernels: simd path %s not on this CPU, skipped\n", simd_path_name(p));
    }
    return n;
}

/* Every f16 and bf16 bit pattern decodes as the naive decoder says and encodes back to
 * itself (NaN: to a NaN), on every path; n = 65536 covers the vector bodies, 13 the tails. */
START_TEST(test_dtype_roundtrip)
{
    simd_path paths[3];
    const int np = s_paths(paths);
    uint16_t *h = test_alloc(65536 * 2), *back = test_alloc(65536 * 2);
    float *f = test_alloc(65536 * 4);
    for (int i = 0; i < 65536; i++) h[i] = (uint16_t)i;
    for (int pi = 0; pi < np; pi++)
        for (int dt = FASA_DTYPE_F16; dt <= FASA_DTYPE_BF16; dt++)
            for (int tail = 0; tail < 2; tail++) {
                const size_t n = tail ? 13 : 65536, off = tail ? 0x3c00 : 0;
                dtype_to_f32(paths[pi], dt, n, h + off, f);
                dtype_from_f32(paths[pi], dt, n, f, back);
                for (size_t j = 0; j < n; j++) {
                    const uint16_t x = (uint16_t)(j + off);
                    const float want = dt == FASA_DTYPE_F16 ? s_naive_f16(x) : 0;
                    const uint32_t wb = dt == FASA_DTYPE_F16 ? s_fbits(want) : (uint32_t)x << 16;
                    const int nan = dt == FASA_DTYPE_F16 ? (x & 0x7c00) == 0x7c00 && (x & 0x3ff)
                                                         : (x & 0x7f80) == 0x7f80 && (x & 0x7f);
                    if (nan) {
                        ck_assert(isnan(f[j]));
                        ck_assert(dt == FASA_DTYPE_F16
                                      ? (back[j] & 0x7c00) == 0x7c00 && (back[j] & 0x3ff)
                                      : (back[j] & 0x7f80) == 0x7f80 && (back[j] & 0x7f));
                        continue;
                    }
                    ck_assert_msg(s_fbits(f[j]) == wb, "%s %s 0x%04x -> 0x%08x, want 0x%08x",
                                  simd_path_name(paths[pi]), fasa_dtype_name(dt), x, s_fbits(f[j]),
                                  wb);
                    ck_assert_msg(back[j] == x, "%s %s 0x%04x back as 0x%04x",
                                  simd_path_name(paths[pi]), fasa_dtype_name(dt), x, back[j]);
                    /* The scalar converters agree too. */
                    ck_assert_uint_eq(
                        s_fbits(dt == FASA_DTYPE_F16 ? fasa_f16_to_f32(x) : fasa_bf16_to_f32(x)),
                        wb);
                }
            }
    free(h), free(back), free(f);
}
END_TEST

/* f32 -> f16/bf16 rounding on every path against the naive nearest-even converters: random
 * values over every exponent, exact ties, the subnormal and overflow edges. */
START_TEST(test_dtype_rounding)
{
    simd_path paths[3];
    const int np = s_paths(paths);
    enum { N = 4096 };
    float *x = test_alloc(N * 4);
    uint16_t *got = test_alloc(N * 2), *want16 = test_alloc(N * 2), *wantb = test_alloc(N * 2);
    test_rng r = {77};
    const float edges[] = {0.0f,
                           -0.0f,
                           65504.0f,
                           65519.99f,
                           65520.0f,
                           -65520.0f,
                           65536.0f,
                           1e30f,
                           0x1p-24f,
                           0x1p-25f,
                           0x1.0001p-25f,
                           0x1.8p-24f,
                           0x1p-14f,
                           0x1.ffcp-15f,
                           0x1.ffep-15f,
                           1.0f + 0x1p-11f,
                           1.0f + 0x3p-11f,
                           1.0f + 0x1p-8f,
                           1.0f + 0x3p-8f,
                           0x1.fefp127f,
                           0x1.feep127f,
                           3.4e38f,
                           -3.4e38f,
                           1e-40f};
    const int ne = (int)(sizeof(edges) / sizeof(*edges));
    for (int i = 0; i < N; i++) {
        if (i < ne) {
            x[i] = edges[i];
        } else {
            /* Random sign and mantissa; exponents across f16's range and a little beyond,
             * every 8th value a tie for f16 or bf16 (low 13 or 16 bits 1000...). */
            uint32_t b = (uint32_t)test_next(&r);
            const uint32_t e = 100 + (uint32_t)(test_next(&r) % 45);
            b = (b & 0x807fffffu) | (e << 23);
            if (i % 8 == 1) b = (b & ~0x1fffu) | 0x1000u;
            if (i % 8 == 2) b = (b & ~0xffffu) | 0x8000u;
            if (i % 8 == 3) b = (uint32_t)test_next(&r) & 0xff7fffffu; /* any finite f32 */
            memcpy(&x[i], &b, 4);
        }
        want16[i] = s_naive_to_f16(x[i]);
        wantb[i] = s_naive_to_bf16(x[i]);
        ck_assert_uint_eq(fasa_f32_to_f16(x[i]), want16[i]);
        ck_assert_uint_eq(fasa_f32_to_bf16(x[i]), wantb[i]);
        ck_assert_int_eq(fasa_dtype_overflows(FASA_DTYPE_F16, x[i]),
                         (want16[i] & 0x7fff) == 0x7c00);
    }
    ck_assert_uint_eq(want16[2], 0x7bff);  /* 65504 */
    ck_assert_uint_eq(want16[3], 0x7bff);  /* 65519.99 rounds down */
    ck_assert_uint_eq(want16[4], 0x7c00);  /* 65520 ties to even: inf */
    ck_assert_uint_eq(want16[9], 0x0000);  /* 2^-25 ties to even: 0 */
    ck_assert_uint_eq(want16[10], 0x0001); /* just above: the smallest subnormal */
    ck_assert_uint_eq(want16[11], 0x0002); /* 1.5 * 2^-24 ties to even: 2 */
    for (int pi = 0; pi < np; pi++) {
        dtype_from_f32(paths[pi], FASA_DTYPE_F16, N, x, got);
        for (int i = 0; i < N; i++)
            ck_assert_msg(got[i] == want16[i], "%s f16 of %a: 0x%04x want 0x%04x",
                          simd_path_name(paths[pi]), (double)x[i], got[i], want16[i]);
        dtype_from_f32(paths[pi], FASA_DTYPE_BF16, N, x, got);
        for (int i = 0; i < N; i++)
            ck_assert_msg(got[i] == wantb[i], "%s bf16 of %a: 0x%04x want 0x%04x",
                          simd_path_name(paths[pi]), (double)x[i], got[i], wantb[i]);
    }
    free(x), free(got), free(want16), free(wantb);
}
END_TEST

/* The f16/bf16 tile scan on every path (9 tiles: the 1, 2 and 4 tile blocks): bit for bit
 * score_tiles on the decoded keys, and within f32 summation error of the naive double
 * reference. */
START_TEST(test_score_tiles_dt)
{
    simd_path paths[3];
    const int np = s_paths(paths);
    test_rng r = {5};
    const int dims[] = {0, 2, 8, 32, 33, 128};
    for (int dt = FASA_DTYPE_F16; dt <= FASA_DTYPE_BF16; dt++)
        for (size_t di = 0; di < sizeof(dims) / sizeof(*dims); di++)
            for (int n_q = 1; n_q <= 9; n_q++) {
                const int nd = dims[di], n_tiles = 9, ld = n_tiles * SCORE_TILE + 3;
                const size_t nk = (size_t)n_tiles * nd * SCORE_TILE;
                float *q = test_alloc((size_t)n_q * nd * 4 + 4), *kf = test_alloc(nk * 4 + 4);
                uint16_t *kh = test_alloc(nk * 2 + 2);
                float *a = test_alloc((size_t)n_q * ld * 4), *b = test_alloc((size_t)n_q * ld * 4),
                      *c = test_alloc((size_t)n_q * ld * 4);
                test_fill(&r, (size_t)n_q * nd, q, 2.0f);
                test_fill(&r, nk, kf, 3.0f);
                for (size_t i = 0; i < nk; i++) {
                    kh[i] = dt == FASA_DTYPE_F16 ? s_naive_to_f16(kf[i]) : s_naive_to_bf16(kf[i]);
                    kf[i] = dt == FASA_DTYPE_F16 ? s_naive_f16(kh[i]) : fasa_bf16_to_f32(kh[i]);
                }
                score_tiles_ref(n_tiles, nd, n_q, b, ld, q, kf);
                score_tiles(n_tiles, nd, n_q, c, ld, q, kf);
                for (int pi = 0; pi < np; pi++) {
                    memset(a, 0, (size_t)n_q * ld * 4);
                    score_tiles_dt(paths[pi], dt, n_tiles, nd, n_q, a, ld, q, kh);
                    for (int h = 0; h < n_q; h++)
                        for (int j = 0; j < n_tiles * SCORE_TILE; j++) {
                            ck_assert_float_eq_tol(a[h * ld + j], b[h * ld + j],
                                                   1e-5f * (nd + 1) * 6);
                            ck_assert_msg(s_fbits(a[h * ld + j]) == s_fbits(c[h * ld + j]),
                                          "%s %s nd %d n_q %d: %a vs f32 kernel %a",
                                          simd_path_name(paths[pi]), fasa_dtype_name(dt), nd, n_q,
                                          (double)a[h * ld + j], (double)c[h * ld + j]);
                        }
                }
                free(q), free(kf), free(kh), free(a), free(b), free(c);
            }
}
END_TEST

/* Checks topk_select against topk_ref: the same set (compared after sorting). */
static void s_check_topk(int n, int k, const topk_cand *in)
{
    topk_cand *a = test_alloc((size_t)(n + 1) * sizeof(*a)),
              *b = test_alloc((size_t)(n + 1) * sizeof(*b));
    memcpy(a, in, (size_t)n * sizeof(*a));
    const int m = topk_select(n, k, a);
    const int mr = topk_ref(n, k, in, b);
    ck_assert_int_eq(m, mr);
    topk_sort(m, a);
    for (int i = 0; i < m; i++) {
        ck_assert_int_eq(a[i].pos, b[i].pos);
        ck_assert(a[i].score == b[i].score ||
                  (a[i].score != a[i].score && b[i].score != b[i].score));
    }
    free(a), free(b);
}

START_TEST(test_topk_cases)
{
    test_rng r = {3};
    const int ns[] = {1, 2, 3, 4, 5, 17, 100, 1000, 5000};
    for (size_t ni = 0; ni < sizeof(ns) / sizeof(*ns); ni++) {
        const int n = ns[ni];
        topk_cand *c = test_alloc((size_t)n * sizeof(*c));
        const int ks[] = {1, 2, n / 2, n - 1, n, n + 5};
        for (int mode = 0; mode < 5; mode++) {
            for (int i = 0; i < n; i++) {
                float s;
                switch (mode) {
                case 0:
                    s = test_uniform(&r);
                    break; /* distinct */
                case 1:
                    s = (float)(test_next(&r) % 4);
                    break; /* many ties */
                case 2:
                    s = 1.5f;
                    break; /* all equal */
                case 3:
                    s = (i % 7 == 0) ? NAN : test_uniform(&r);
                    break; /* NaN ranks last */
                default:
                    s = (float)(n - i);
                    break; /* sorted */
                }
                c[i] = (topk_cand){s, i};
            }
            /* Shuffle positions so that ties are not resolved by input order. */
            for (int i = n - 1; i > 0; i--) {
                const int j = (int)(test_next(&r) % (uint64_t)(i + 1));
                const int32_t t = c[i].pos;
                c[i].pos = c[j].pos;
                c[j].pos = t;
            }
            for (size_t ki = 0; ki < sizeof(ks) / sizeof(*ks); ki++)
                if (ks[ki] >= 1) s_check_topk(n, ks[ki], c);
        }
        free(c);
    }
    /* Ties break to the lower position; k <= 0 selects nothing. */
    topk_cand t[4] = {{1.0f, 9}, {2.0f, 5}, {2.0f, 3}, {1.0f, 2}};
    ck_assert_int_eq(topk_select(4, 2, t), 2);
    topk_sort(2, t);
    ck_assert_int_eq(t[0].pos, 3);
    ck_assert_int_eq(t[1].pos, 5);
    ck_assert_int_eq(topk_select(4, 0, t), 0);
    ck_assert(topk_better((topk_cand){-INFINITY, 9}, (topk_cand){NAN, 0}));
}
END_TEST

/* The running top-k over blocks equals one selection over everything. */
START_TEST(test_topk_acc)
{
    test_rng r = {4};
    const int n = 20000, block = 1000;
    float *s = test_alloc((size_t)n * 4);
    topk_cand *all = test_alloc((size_t)n * sizeof(*all));
    for (int i = 0; i < n; i++) {
        s[i] = (float)(test_next(&r) % 50); /* heavy ties */
        all[i] = (topk_cand){s[i], i};
    }
    const int ks[] = {1, 7, 256, 5000, 20000};
    for (size_t ki = 0; ki < 5; ki++) {
        const int k = ks[ki], cap = 2 * k + block;
        topk_cand *buf = test_alloc((size_t)cap * sizeof(*buf)),
                  *ref = test_alloc((size_t)k * sizeof(*ref));
        topk_acc acc;
        topk_acc_init(&acc, k, buf, cap);
        for (int i = 0; i < n; i += block) topk_acc_push(&acc, block, s + i, NULL, i);
        const int m = topk_acc_finish(&acc);
        ck_assert_int_eq(m, topk_ref(n, k, all, ref));
        for (int i = 0; i < m; i++) ck_assert_int_eq(buf[i].pos, ref[i].pos);
        free(buf), free(ref);
    }
    free(s), free(all);
}
END_TEST

/* A score for the selection tests: clustered values (many share their top key bits), exact
 * ties, +-0, +-inf and NaN, by mode. */
static float s_sel_score(test_rng *r, int mode)
{
    static const float special[] = {0.0f, -0.0f, INFINITY, -INFINITY, NAN, 1.0f, -1.0f};
    switch (mode) {
    case 0:
        return test_uniform(r);
    case 1:
        return 1.0f + 1e-6f * (float)(test_next(r) % 5000); /* one exponent, close values */
    case 2:
        return (float)(test_next(r) % 3); /* heavy ties */
    case 3:
        return test_next(r) % 4 ? test_uniform(r) : special[test_next(r) % 7];
    default:
        return -1e-30f * (float)(test_next(r) % 100); /* tiny negatives and -0 */
    }
}

/* topk_select on both paths (AVX-512 where the CPU has it, portable) and topk_select_qs
 * against topk_ref: the same set; topk_select also keeps the chosen ones in their input
 * order at the front and permutes the rest behind them. */
START_TEST(test_topk_select_paths)
{
    test_rng r = {31};
    const int ns[] = {2, 9, 63, 64, 65, 300, 1024, 4096, 4097, 6000};
    for (int use_port = 0; use_port < 2; use_port++) {
        if (use_port)
            if ((simd_path_choose("portable")) != (0))
                ck_abort_msg("simd_path_choose(\"portable\") == 0: %d vs %d",
                             (int)(simd_path_choose("portable")), (int)(0));
        for (size_t ni = 0; ni < sizeof(ns) / sizeof(*ns); ni++)
            for (int mode = 0; mode < 5; mode++) {
                const int n = ns[ni];
                topk_cand *in = test_alloc((size_t)n * sizeof(*in)),
                          *a = test_alloc((size_t)n * sizeof(*a)),
                          *ref = test_alloc((size_t)n * sizeof(*ref));
                int32_t *rank = test_alloc((size_t)n * sizeof(*rank));
                for (int i = 0; i < n; i++) in[i] = (topk_cand){s_sel_score(&r, mode), 0};
                int32_t *idx = test_alloc((size_t)n * sizeof(*idx)); /* input of a position */
                for (int i = 0; i < n; i++) {
                    in[i].pos = (int32_t)(i * 7919 % n) - n / 2;
                    idx[in[i].pos + n / 2] = i;
                }
                const int ks[] = {1, 2, n / 3 + 1, n - 1, n};
                for (int ki = 0; ki < 5; ki++) {
                    const int k = ks[ki];
                    memcpy(a, in, (size_t)n * sizeof(*a));
                    if ((topk_select(n, k, a)) != (k))
                        ck_abort_msg("topk_select(n, k, a) == k: %d vs %d",
                                     (int)(topk_select(n, k, a)), (int)(k));
                    const int m = topk_ref(n, k, in, ref);
                    if ((m) != (k)) ck_abort_msg("m == k: %d vs %d", (int)(m), (int)(k));
                    /* The same set; in input order; every input once (a permutation). */
                    for (int i = 0; i < n; i++) rank[i] = -1;
                    int last = -1;
                    for (int i = 0; i < n; i++) rank[i] = -1;
                    for (int i = 0; i < n; i++) {
                        const int at = idx[a[i].pos + n / 2];
                        if (!(rank[at] < 0))
                            ck_abort_msg("failed: rank[at] < 0"); /* every input once */
                        rank[at] = i;
                        if (i >= k || n > 4096) continue; /* more than 4096: topk_select_qs */
                        if (!(at > last))
                            ck_abort_msg("n %d mode %d k %d: #%d out of input order", n, mode, k,
                                         i);
                        last = at;
                    }
                    topk_sort(k, a);
                    for (int i = 0; i < k; i++) {
                        if (!(a[i].pos == ref[i].pos))
                            ck_abort_msg("%s n %d mode %d k %d: #%d pos %d vs %d",
                                         use_port ? "portable" : "auto", n, mode, k, i, a[i].pos,
                                         ref[i].pos);
                        if (!(s_fbits(a[i].score) == s_fbits(ref[i].score)))
                            ck_abort_msg("failed: s_fbits(a[i].score) == s_fbits(ref[i].score)");
                    }
                    memcpy(a, in, (size_t)n * sizeof(*a));
                    if ((topk_select_qs(n, k, a)) != (k))
                        ck_abort_msg("topk_select_qs(n, k, a) == k: %d vs %d",
                                     (int)(topk_select_qs(n, k, a)), (int)(k));
                    topk_sort(k, a);
                    for (int i = 0; i < k; i++)
                        if ((a[i].pos) != (ref[i].pos))
                            ck_abort_msg("a[i].pos == ref[i].pos: %d vs %d", (int)(a[i].pos),
                                         (int)(ref[i].pos));
                }
                free(in), free(a), free(ref), free(rank), free(idx);
            }
        if (use_port) simd_path_choose(NULL);
    }
}
END_TEST

/* The fused scan's use of the running top-k (scan.c s_insert: offers in ascending position,
 * topk_acc_trim at lim held, the strict score compare against thr): the exact top-k on both
 * paths, kept in ascending position, and thr never better than the k-th best seen. */
START_TEST(test_topk_acc_trim)
{
    test_rng r = {37};
    const int n = 9000;
    for (int use_port = 0; use_port < 2; use_port++) {
        if (use_port)
            if ((simd_path_choose("portable")) != (0))
                ck_abort_msg("simd_path_choose(\"portable\") == 0: %d vs %d",
                             (int)(simd_path_choose("portable")), (int)(0));
        for (int mode = 0; mode < 5; mode++) {
            topk_cand *all = test_alloc((size_t)n * sizeof(*all));
            for (int i = 0; i < n; i++) all[i] = (topk_cand){s_sel_score(&r, mode), 50 + i};
            const int ks[] = {1, 5, 256, 3000, 9000};
            for (int ki = 0; ki < 5; ki++)
                for (int big = 0; big < 2; big++) {
                    const int k = ks[ki], cap = big ? 2 * k + 4096 : k + 1;
                    topk_cand *buf = test_alloc((size_t)cap * sizeof(*buf)),
                              *ref = test_alloc((size_t)n * sizeof(*ref));
                    topk_acc acc;
                    topk_acc_init(&acc, k, buf, cap);
                    int trims = 0;
                    for (int i = 0; i < n; i++) {
                        const float sc = all[i].score;
                        if (acc.have_thr && acc.thr.score == acc.thr.score && !(sc > acc.thr.score))
                            continue; /* as s_beats */
                        if (acc.n >= acc.lim) {
                            topk_acc_trim(&acc);
                            trims++;
                            if (!(acc.n >= k && acc.n < acc.lim))
                                ck_abort_msg("failed: acc.n >= k && acc.n < acc.lim");
                            /* thr is not better than the k-th best of the first i. */
                            if (trims <= 12) {
                                topk_ref(i, k, all, ref);
                                if (!(!topk_better(acc.thr, ref[k - 1])))
                                    ck_abort_msg("failed: !topk_better(acc.thr, ref[k - 1])");
                            }
                            for (int j = 1; j < acc.n; j++)
                                if (!(acc.items[j - 1].pos < acc.items[j].pos))
                                    ck_abort_msg("failed: acc.items[j - 1].pos < acc.items[j].pos");
                        }
                        if (acc.n == acc.cap) topk_acc_compact(&acc);
                        acc.items[acc.n++] = all[i];
                    }
                    const int got = topk_acc_finish_unsorted(&acc);
                    const int m = topk_ref(n, k, all, ref);
                    if ((got) != (m)) ck_abort_msg("got == m: %d vs %d", (int)(got), (int)(m));
                    for (int j = 1; j < got; j++)
                        if (!(acc.items[j - 1].pos < acc.items[j].pos))
                            ck_abort_msg("failed: acc.items[j - 1].pos < acc.items[j].pos");
                    topk_sort(got, acc.items);
                    for (int j = 0; j < m; j++) {
                        if (!(acc.items[j].pos == ref[j].pos))
                            ck_abort_msg("%s mode %d k %d cap %d (%d trims): #%d pos %d vs %d",
                                         use_port ? "portable" : "auto", mode, k, cap, trims, j,
                                         acc.items[j].pos, ref[j].pos);
                        if (!(s_fbits(acc.items[j].score) == s_fbits(ref[j].score)))
                            ck_abort_msg(
                                "failed: s_fbits(acc.items[j].score) == s_fbits(ref[j].score)");
                    }
                    free(buf), free(ref);
                }
            free(all);
        }
        if (use_port) simd_path_choose(NULL);
    }
}
END_TEST

/* Blocked online-softmax attention against the double-precision reference. */
START_TEST(test_attn_dense)
{
    test_rng r = {5};
    const int ns[] = {1, 7, 255, 256, 257, 1000};
    const int ds[] = {2, 8, 128};
    const float qscale[] = {0.1f, 1.0f, 30.0f}; /* near-uniform to very peaky */
    for (size_t ni = 0; ni < 6; ni++)
        for (size_t di = 0; di < 3; di++)
            for (size_t qi = 0; qi < 3; qi++) {
                const int n = ns[ni], d = ds[di], n_q = 3;
                float *q = test_alloc((size_t)n_q * d * 4), *k = test_alloc((size_t)n * d * 4);
                float *v = test_alloc((size_t)n * d * 4), *o = test_alloc((size_t)n_q * d * 4);
                float *ref = test_alloc((size_t)d * 4),
                      *scr = test_alloc((size_t)n_q * ATTN_BLOCK * 4);
                test_fill(&r, (size_t)n_q * d, q, qscale[qi]);
                test_fill(&r, (size_t)n * d, k, 1.0f);
                test_fill(&r, (size_t)n * d, v, 1.0f);
                const float scale = 1.0f / sqrtf((float)d);
                attn_dense(n, d, n_q, scale, q, k, d, v, d, o, scr);
                for (int h = 0; h < n_q; h++) {
                    attn_ref(n, d, scale, q + h * d, k, d, v, d, ref);
                    ck_assert_double_le(test_max_abs_diff((size_t)d, o + h * d, ref), 2e-5);
                }
                free(q), free(k), free(v), free(o), free(ref), free(scr);
            }
}
END_TEST

/* Logits of +-1e30 and a single row: no overflow, NaN or division by zero. */
/* attn_accum_blas over blocks (one sgemm per block, or several when n_q x d is large)
 * against the naive reference. */
START_TEST(test_attn_accum_blas)
{
    test_rng r = {6};
    const int cfg[][3] = {{1, 2, 1}, {257, 8, 3}, {1000, 128, 4}, {300, 128, 1}, {37, 1024, 8}};
    for (size_t ci = 0; ci < sizeof(cfg) / sizeof(*cfg); ci++)
        for (int peaky = 0; peaky < 2; peaky++) {
            const int n = cfg[ci][0], d = cfg[ci][1], n_q = cfg[ci][2], blk = 256;
            float *q = test_alloc((size_t)n_q * d * 4), *k = test_alloc((size_t)n * d * 4);
            float *v = test_alloc((size_t)n * d * 4), *lg = test_alloc((size_t)n_q * blk * 4);
            float *pv = test_alloc((size_t)n_q * d * 4), *out = test_alloc((size_t)d * 4),
                  *ref = test_alloc((size_t)d * 4);
            double *l = test_alloc((size_t)n_q * 8), *o = test_alloc((size_t)n_q * d * 8);
            float *m = test_alloc((size_t)n_q * 4);
            test_fill(&r, (size_t)n_q * d, q, peaky ? 30.0f : 1.0f);
            test_fill(&r, (size_t)n * d, k, 1.0f);
            test_fill(&r, (size_t)n * d, v, 1.0f);
            const float scale = 1.0f / sqrtf((float)d);
            attn_state_init(n_q, d, m, l, o);
            for (int j0 = 0; j0 < n; j0 += blk) {
                const int nb = n - j0 < blk ? n - j0 : blk;
                score_rows_ref(nb, d, n_q, lg, blk, q, k + (size_t)j0 * d, d, 0);
                for (int h = 0; h < n_q; h++)
                    for (int j = 0; j < nb; j++) lg[h * blk + j] *= scale;
                attn_accum_blas(nb, d, n_q, lg, blk, v + (size_t)j0 * d, d, m, l, o, pv);
            }
            for (int h = 0; h < n_q; h++) {
                attn_finalize(d, l[h], o + (size_t)h * d, out);
                attn_ref(n, d, scale, q + (size_t)h * d, k, d, v, d, ref);
                ck_assert_double_le(test_max_abs_diff((size_t)d, out, ref), 2e-5);
            }
            free(q), free(k), free(v), free(lg), free(pv), free(out), free(ref), free(l), free(o),
                free(m);
        }
}
END_TEST

START_TEST(test_attn_extreme_logits)
{
    const int d = 2;
    float m[1];
    double l[1], o[2];
    const float v[3 * 2] = {1, 2, 3, 4, 5, 6};
    const float big[3] = {1e30f, -1e30f, 1e30f};
    attn_state_init(1, d, m, l, o);
    attn_accum(3, d, 1, big, 3, v, d, m, l, o);
    float out[2];
    attn_finalize(d, l[0], o, out);
    ck_assert_float_eq_tol(out[0], 3.0f, 1e-6f); /* the two +1e30 rows share the weight */
    ck_assert_float_eq_tol(out[1], 4.0f, 1e-6f);
    const float neg[3] = {-1e30f, -1e30f, -3e30f};
    attn_state_init(1, d, m, l, o);
    attn_accum(3, d, 1, neg, 3, v, d, m, l, o);
    attn_finalize(d, l[0], o, out);
    ck_assert_float_eq_tol(out[0], 2.0f, 1e-6f);
    ck_assert(isfinite(out[1]));
    const float one[1] = {-5e29f};
    attn_state_init(1, d, m, l, o);
    attn_accum(1, d, 1, one, 1, v + 4, d, m, l, o);
    attn_finalize(d, l[0], o, out);
    ck_assert_float_eq(out[0], 5.0f);
    ck_assert_float_eq(out[1], 6.0f);
}
END_TEST

/* Partials over disjoint parts merge to the partial of the whole; empty parts are skipped. */
START_TEST(test_attn_merge)
{
    test_rng r = {6};
    const int n = 300, d = 16, parts = 4;
    float *lg = test_alloc(n * 4), *v = test_alloc((size_t)n * d * 4);
    test_fill(&r, n, lg, 20.0f);
    test_fill(&r, (size_t)n * d, v, 1.0f);
    float m1, out1[16];
    double l1, o1[16];
    attn_state_init(1, d, &m1, &l1, o1);
    attn_accum(n, d, 1, lg, n, v, d, &m1, &l1, o1);
    attn_finalize(d, l1, o1, out1);
    float pm[5];
    double pl[5], po[5 * 16];
    const int cut[5] = {0, 10, 10, 200, 300}; /* part 1 is empty */
    for (int p = 0; p < parts; p++) {
        attn_state_init(1, d, &pm[p], &pl[p], po + p * d);
        attn_accum(cut[p + 1] - cut[p], d, 1, lg + cut[p], n, v + (size_t)cut[p] * d, d, &pm[p],
                   &pl[p], po + p * d);
    }
    float mm, outm[16];
    double lm, om[16];
    attn_merge(parts, d, pm, pl, po, &mm, &lm, om);
    attn_finalize(d, lm, om, outm);
    ck_assert_double_le(test_max_abs_diff(d, outm, out1), 1e-6);
    ck_assert_float_eq(mm, m1);
    /* All parts empty: the empty partial and zero output. */
    float em[2] = {-INFINITY, -INFINITY};
    double el[2] = {0, 0}, eo[32] = {0};
    attn_merge(2, d, em, el, eo, &mm, &lm, om);
    ck_assert(lm == 0.0 && mm == -INFINITY);
    attn_finalize(d, lm, om, outm);
    ck_assert_float_eq(outm[0], 0.0f);
    free(lg), free(v);
}
END_TEST

/* Contextual agreement: the fast kernel equals the naive one exactly, both pairings. */
START_TEST(test_ca)
{
    test_rng r = {7};
    const int ns[] = {1, 5, 64, 300};
    const int ds[] = {2, 8, 16};
    for (int pairing = 0; pairing < 2; pairing++)
        for (size_t ni = 0; ni < 4; ni++)
            for (size_t di = 0; di < 3; di++)
                for (int w = 1; w <= 64; w *= 4) {
                    const int n = ns[ni], d = ds[di], ld = d + 2;
                    float *q = test_alloc((size_t)d * 4), *k = test_alloc((size_t)n * ld * 4);
                    test_fill(&r, (size_t)d, q, 1.0f);
                    for (int i = 0; i < n * ld; i++) /* coarse values make ties common */
                        k[i] = (float)((int)(test_next(&r) % 5) - 2);
                    double a[8] = {0}, b[8] = {0};
                    void *scr = test_alloc(ca_scratch_bytes(n));
                    ca_accumulate(n, d, (fc_pairing)pairing, w, q, k, ld, a, scr);
                    ca_accumulate_ref(n, d, (fc_pairing)pairing, w, q, k, ld, b);
                    for (int i = 0; i < d / 2; i++) {
                        ck_assert_double_eq(a[i], b[i]);
                        ck_assert(a[i] >= 0.0 && a[i] <= 1.0);
                    }
                    free(q), free(k), free(scr);
                }
    /* A key set where FC 1 alone carries the ranking: its agreement is 1. */
    const int n = 50, d = 4;
    float q[4] = {0, 0, 1, 0}, k[50 * 4];
    for (int j = 0; j < n; j++) {
        k[j * 4 + 0] = 0.001f * (float)(j % 3);
        k[j * 4 + 1] = 0;
        k[j * 4 + 2] = (float)j;
        k[j * 4 + 3] = 0;
    }
    double ca[2] = {0, 0};
    void *scr = test_alloc(ca_scratch_bytes(n));
    ca_accumulate(n, d, FC_PAIRING_INTERLEAVED, 10, q, k, d, ca, scr);
    ck_assert_double_eq(ca[1], 1.0);
    free(scr);
}
END_TEST

START_TEST(test_ca_select)
{
    const double ca[6] = {0.5, 0.9, 0.5, 0.1, 0.9, 0.5};
    int fcs[6];
    ca_select(6, 3, ca, fcs); /* 1 and 4 tie at the top; then 0 wins the tie at 0.5 */
    ck_assert_int_eq(fcs[0], 0);
    ck_assert_int_eq(fcs[1], 1);
    ck_assert_int_eq(fcs[2], 4);
    ca_select(6, 6, ca, fcs);
    for (int i = 0; i < 6; i++) ck_assert_int_eq(fcs[i], i);
    ca_select(6, 1, ca, fcs);
    ck_assert_int_eq(fcs[0], 1);
}
END_TEST

/* int8 (keys) and int16 (queries) quantisation against their naive reference (same scale,
 * same rounding), and the real bound |x - scale * q| <= scale / 2. */
START_TEST(test_scan_quant_i8)
{
    test_rng r = {21};
    const int ns[] = {1, 3, 4, 32, 33, 128};
    for (size_t ni = 0; ni < sizeof(ns) / sizeof(*ns); ni++)
        for (int rep = 0; rep < 50; rep++) {
            const int n = ns[ni];
            float x[128];
            int8_t a[128], b[128];
            test_fill(&r, (size_t)n, x, rep % 3 == 0 ? 1e-3f : 5.0f);
            if (rep == 7) /* exact ties at .5: x = (k + 0.5) * scale */
                for (int i = 0; i < n; i++) x[i] = (float)(i % 9) - 4.0f + (i == 0 ? 127.0f : 0.5f);
            if (rep == 8) memset(x, 0, sizeof(x));
            const float sa = scan_quant_i8(n, x, a), sb = scan_quant_i8_ref(n, x, b);
            ck_assert_msg(sa == sb, "n %d rep %d: scale %a vs ref %a", n, rep, (double)sa,
                          (double)sb);
            for (int i = 0; i < n; i++) {
                ck_assert_msg(a[i] == b[i], "n %d rep %d i %d: x %a -> %d, ref %d", n, rep, i,
                              (double)x[i], a[i], b[i]);
                ck_assert(a[i] >= -127 && a[i] <= 127);
                ck_assert(fabs((double)x[i] - (double)sa * a[i]) <= 0.5 * sa * (1 + 1e-6) + 1e-30);
            }
            int16_t qa[128], qb[128];
            const float ta = scan_quant_q16(n, x, qa), tb = scan_quant_q16_ref(n, x, qb);
            ck_assert(ta == tb);
            for (int i = 0; i < n; i++) {
                ck_assert_msg(qa[i] == qb[i], "q16 n %d rep %d i %d: %d vs ref %d", n, rep, i,
                              qa[i], qb[i]);
                ck_assert(qa[i] >= -SCAN_Q16_MAX && qa[i] <= SCAN_Q16_MAX);
                /* x / scale in f32 is off by up to 8191 ulps of 1: a looser bound. */
                ck_assert(fabs((double)x[i] - (double)ta * qa[i]) <= (0.5 + 2e-3) * ta + 1e-30);
            }
        }
}
END_TEST

/* Fills a store of sd with n_rows random rows (their f32 originals in x) and a query set. */
static void s_scan_store(test_rng *r, int sd, int n_rows, int nd, float *x, void *tiles, float *rs)
{
    test_fill(r, (size_t)n_rows * nd, x, 3.0f);
    for (int i = 0; i < n_rows; i++) scan_pack_row(sd, nd, x + (size_t)i * nd, tiles, rs, i);
}

/* scan_scores on every path against the naive reference (int8: exactly; the float stores:
 * to rounding) and bit-identical across paths; int8 scores near the f32 ones. */
START_TEST(test_scan_scores)
{
    simd_path paths[3];
    const int np = s_paths(paths);
    test_rng r = {22};
    const int sds[] = {SCAN_F32, SCAN_F16, SCAN_BF16, SCAN_I8};
    const int dims[] = {1, 4, 7, 32, 33, 128};
    const int rows[] = {1, 15, 16, 17, 100};
    for (size_t si = 0; si < 4; si++)
        for (size_t di = 0; di < sizeof(dims) / sizeof(*dims); di++)
            for (size_t ri = 0; ri < sizeof(rows) / sizeof(*rows); ri++)
                for (int n_q = 1; n_q <= 7; n_q += 3) {
                    const int sd = sds[si], nd = dims[di], nr = rows[ri];
                    const int n_tiles = (nr + SCORE_TILE - 1) / SCORE_TILE, ld = nr + 5;
                    float *x = test_alloc((size_t)nr * nd * 4),
                          *q = test_alloc((size_t)n_q * nd * 4);
                    void *tiles = test_alloc((size_t)n_tiles * scan_tile_bytes(sd, nd));
                    float *rs = test_alloc((size_t)n_tiles * SCORE_TILE * 4);
                    float *ref = test_alloc((size_t)n_q * ld * 4),
                          *got = test_alloc((size_t)n_q * ld * 4),
                          *first = test_alloc((size_t)n_q * ld * 4);
                    s_scan_store(&r, sd, nr, nd, x, tiles, rs);
                    test_fill(&r, (size_t)n_q * nd, q, 2.0f);
                    scan_q sq = {0};
                    ck_assert_int_eq(scan_q_prep(&sq, sd, n_q, nd, q), 0);
                    scan_scores_ref(&sq, nr, tiles, rs, ref, ld);
                    for (int pi = 0; pi < np; pi++) {
                        scan_scores(paths[pi], &sq, nr, tiles, rs, got, ld);
                        for (int h = 0; h < n_q; h++)
                            for (int j = 0; j < nr; j++) {
                                const float g = got[h * ld + j], e = ref[h * ld + j];
                                if (sd == SCAN_I8)
                                    ck_assert_msg(g == e, "%s int8 nd %d: %a vs ref %a",
                                                  simd_path_name(paths[pi]), nd, (double)g,
                                                  (double)e);
                                else
                                    ck_assert_float_eq_tol(g, e, 1e-5f * 6 * (nd + 1));
                                if (pi == 0)
                                    first[h * ld + j] = g;
                                else
                                    ck_assert_msg(s_fbits(g) == s_fbits(first[h * ld + j]),
                                                  "%s %s nd %d: %a vs %s %a",
                                                  simd_path_name(paths[pi]), scan_dtype_name(sd),
                                                  nd, (double)g, simd_path_name(paths[0]),
                                                  (double)first[h * ld + j]);
                                /* The store's own precision against the f32 dot product. */
                                double exact = 0, mag = 0;
                                for (int c = 0; c < nd; c++) {
                                    exact += (double)q[h * nd + c] * x[(size_t)j * nd + c];
                                    mag += fabs((double)q[h * nd + c]) * 3.0;
                                }
                                const double tol = sd == SCAN_F32    ? 1e-5
                                                   : sd == SCAN_F16  ? 2e-3
                                                   : sd == SCAN_BF16 ? 1e-2
                                                                     : 2e-2;
                                ck_assert_msg(fabs(g - exact) <= tol * mag + 1e-6,
                                              "%s nd %d: %g vs exact %g", scan_dtype_name(sd), nd,
                                              (double)g, exact);
                            }
                    }
                    scan_q_free(&sq);
                    free(x), free(q), free(tiles), free(rs), free(ref), free(got), free(first);
                }
}
END_TEST

/* The fused scan + top-k selects exactly what a full selection over the same kernel's
 * scores selects, on every path, with heavy ties (a coarse int grid) and in several calls
 * (row offsets as a shard's chunks). */
START_TEST(test_scan_topk)
{
    simd_path paths[3];
    const int np = s_paths(paths);
    test_rng r = {23};
    const int sds[] = {SCAN_F32, SCAN_F16, SCAN_BF16, SCAN_I8};
    const int nr = 3000, nd = 32, n_q = 7, block = 1024;
    const int ks[] = {1, 7, 256, 2999, 5000};
    for (size_t si = 0; si < 4; si++)
        for (int ties = 0; ties < 2; ties++) {
            const int sd = sds[si], n_tiles = (nr + SCORE_TILE - 1) / SCORE_TILE;
            float *x = test_alloc((size_t)nr * nd * 4), q[n_q * nd];
            void *tiles = test_alloc((size_t)n_tiles * scan_tile_bytes(sd, nd));
            float *rs = test_alloc((size_t)n_tiles * SCORE_TILE * 4);
            test_fill(&r, (size_t)nr * nd, x, 3.0f);
            test_fill(&r, (size_t)n_q * nd, q, 1.0f);
            if (ties) {
                for (int i = 0; i < nr * nd; i++) x[i] = roundf(x[i]);
                for (int i = 0; i < n_q * nd; i++) q[i] = roundf(q[i]);
                for (int i = 0; i < nd; i++) q[i] = i == 0; /* head 0: 7 distinct scores */
            }
            for (int i = 0; i < nr; i++) scan_pack_row(sd, nd, x + (size_t)i * nd, tiles, rs, i);
            scan_q sq = {0};
            ck_assert_int_eq(scan_q_prep(&sq, sd, n_q, nd, q), 0);
            float *sc = test_alloc((size_t)n_q * nr * 4), *sc0 = test_alloc((size_t)n_q * nr * 4);
            scan_scores_ref(&sq, nr, tiles, rs, sc, nr);
            /* paths[0] is portable: every path's scores (so its selection) are its bits. */
            scan_scores(paths[0], &sq, nr, tiles, rs, sc0, nr);
            /* cap 2k + 3: compactions when the buffer is full; 5k + 1 and 2k + block (the
             * shard's): trims at lim held (the fused scan's, scan.c s_insert; the AVX-512
             * kernel's bulk inserts, s512_offer). */
            for (size_t ki = 0; ki < 3 * sizeof(ks) / sizeof(*ks); ki++)
                for (int pi = 0; pi < np; pi++) {
                    const int k = ks[ki / 3], cap = ki % 3 == 0   ? 2 * k + 3
                                                    : ki % 3 == 1 ? 5 * k + 1
                                                                  : 2 * k + block;
                    scan_scores(paths[pi], &sq, nr, tiles, rs, sc, nr);
                    for (int j = 0; j < n_q * nr; j++)
                        ck_assert_msg(s_fbits(sc[j]) == s_fbits(sc0[j]), "%s %s: score %d %a vs %a",
                                      simd_path_name(paths[pi]), scan_dtype_name(sd), j,
                                      (double)sc[j], (double)sc0[j]);
                    topk_acc acc[n_q];
                    topk_cand *buf = test_alloc((size_t)n_q * cap * sizeof(topk_cand));
                    for (int h = 0; h < n_q; h++)
                        topk_acc_init(&acc[h], k, buf + (size_t)h * cap, cap);
                    for (int r0 = 0; r0 < nr; r0 += block) {
                        const int n = nr - r0 < block ? nr - r0 : block;
                        scan_topk(paths[pi], &sq, n,
                                  (const char *)tiles +
                                      (size_t)(r0 / SCORE_TILE) * scan_tile_bytes(sd, nd),
                                  rs + r0, 100 + r0, acc);
                    }
                    for (int h = 0; h < n_q; h++) {
                        topk_cand *all = test_alloc((size_t)nr * sizeof(*all)),
                                  *ref = test_alloc((size_t)(k < nr ? k : nr) * sizeof(*ref));
                        for (int j = 0; j < nr; j++) all[j] = (topk_cand){sc[h * nr + j], 100 + j};
                        const int m = topk_ref(nr, k, all, ref);
                        const int got = topk_acc_finish_unsorted(&acc[h]);
                        ck_assert_int_eq(got, m);
                        topk_sort(got, acc[h].items);
                        for (int i = 0; i < m; i++) {
                            ck_assert_msg(acc[h].items[i].pos == ref[i].pos,
                                          "%s %s ties %d k %d head %d: #%d pos %d vs %d",
                                          simd_path_name(paths[pi]), scan_dtype_name(sd), ties, k,
                                          h, i, acc[h].items[i].pos, ref[i].pos);
                            ck_assert(acc[h].items[i].score == ref[i].score);
                        }
                        free(all), free(ref);
                    }
                    free(buf);
                }
            scan_q_free(&sq);
            free(x), free(tiles), free(rs), free(sc), free(sc0);
        }
}
END_TEST

/* topk_sort (radix keys) against qsort's order (topk_ref) with ties, NaN, +-0 and +-inf. */
START_TEST(test_topk_sort_keys)
{
    test_rng r = {24};
    const int ns[] = {2, 16, 17, 300, 5000};
    const float special[] = {0.0f, -0.0f, INFINITY, -INFINITY, NAN, 1.0f, -1.0f, 1e-40f, -1e-40f};
    for (size_t ni = 0; ni < sizeof(ns) / sizeof(*ns); ni++) {
        const int n = ns[ni];
        topk_cand *a = test_alloc((size_t)n * sizeof(*a)), *b = test_alloc((size_t)n * sizeof(*b));
        for (int i = 0; i < n; i++) {
            const uint64_t z = test_next(&r);
            a[i] = (topk_cand){z % 3 ? special[z % 9] : test_uniform(&r),
                               (int32_t)(test_next(&r) % 2000000) - 1000000};
            a[i].pos = a[i].pos * 4 + i % 4; /* unique positions, negative ones too */
            a[i].pos = (int32_t)((uint32_t)i * 2654435761u % 1000003u) - 500000;
        }
        /* Shuffled positions; ascending positions (the sort then skips the position's
         * digits); the sorted output again (no pass at all). */
        for (int round = 0; round < 3; round++) {
            if (round == 1)
                for (int i = 0; i < n; i++) a[i].pos = 3 * i - n;
            topk_ref(n, n, a, b);
            topk_sort(n, a);
            int bad = -1;
            for (int i = 0; i < n && bad < 0; i++)
                if (a[i].pos != b[i].pos ||
                    !(s_fbits(a[i].score) == s_fbits(b[i].score) ||
                      (a[i].score != a[i].score && b[i].score != b[i].score) ||
                      a[i].score == b[i].score))
                    bad = i;
            ck_assert_msg(bad < 0, "n %d round %d: #%d differs", n, round, bad);
        }
        free(a), free(b);
    }
}
END_TEST

Suite *kernels_suite(void)
{
    Suite *s = suite_create("kernels");
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_score_tiles);
    tcase_add_test(tc, test_score_rows);
    tcase_add_test(tc, test_dtype_roundtrip);
    tcase_add_test(tc, test_dtype_rounding);
    tcase_add_test(tc, test_score_tiles_dt);
    tcase_add_test(tc, test_topk_cases);
    tcase_add_test(tc, test_topk_select_paths);
    tcase_add_test(tc, test_topk_acc_trim);
    tcase_add_test(tc, test_topk_acc);
    tcase_add_test(tc, test_attn_dense);
    tcase_add_test(tc, test_attn_accum_blas);
    tcase_add_test(tc, test_attn_extreme_logits);
    tcase_add_test(tc, test_attn_merge);
    tcase_add_test(tc, test_ca);
    tcase_add_test(tc, test_ca_select);
    tcase_add_test(tc, test_scan_quant_i8);
    tcase_add_test(tc, test_scan_scores);
    tcase_add_test(tc, test_scan_topk);
    tcase_add_test(tc, test_topk_sort_keys);
    suite_add_tcase(s, tc);
    return s;
}

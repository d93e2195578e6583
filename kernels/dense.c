/* The fused dense block kernel, one implementation per SIMD path. See dense.h. */
#include "dense.h"

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "dtype.h"
#include "simd.h"

#if defined(__x86_64__) && defined(__GNUC__)
#define DENSE_X86 1
#include <immintrin.h>
#define T_AVX2 __attribute__((target("avx2,fma,f16c")))
#else
#define DENSE_X86 0
#endif

/* One stored element as f32 (the scalar conversions of simd.h). */
static inline float s_get(int dtype, const void *base, size_t e)
{
    if (dtype == FASA_DTYPE_F32) return ((const float *)base)[e];
    const uint16_t h = ((const uint16_t *)base)[e];
    return dtype == FASA_DTYPE_F16 ? fasa_f16_to_f32(h) : fasa_bf16_to_f32(h);
}

/* Rows per sub-block of p.V: each sub-block's f32 sums are added to the double o, so no
 * f32 sum runs over more than DENSE_SUB rows (and the sub-block's V stays in L1). */
#define DENSE_SUB 32

/* Raises the running partial (m, l, o[d]) to cover a block of maximum mb and sum of
 * exponentials lb (relative to mb): rescales what it holds, adds lb, and returns the factor
 * exp(mb - m_new) the block's sums of p_j v_j are to be added to o with. */
static double s_raise(int d, float mb, double lb, float *m, double *l, double *o)
{
    if (mb > *m) {
        const double r = *m == -INFINITY ? 0.0 : exp((double)*m - mb);
        if (r != 1.0) {
            *l *= r;
            for (int c = 0; c < d; c++) o[c] *= r;
        }
        *m = mb;
        *l += lb;
        return 1.0;
    }
    const double r = exp((double)mb - *m);
    *l += lb * r;
    return r;
}

/* o[d] += r * ob[d]. */
static void s_add(int d, double r, const float *ob, double *o)
{
    for (int c = 0; c < d; c++) o[c] += r * ob[c];
}

/* ---- naive reference ---- */

void dense_block_ref(int dtype, int n, int d, int u, int n_q, float scale, const float *q,
                     const void *kdom, const void *krest, const void *v, float *m, double *l,
                     double *o)
{
    if (n <= 0) return;
    for (int h = 0; h < n_q; h++) {
        const float *qh = q + (size_t)h * d;
        double s[DENSE_BLOCK], mb = -INFINITY;
        for (int j = 0; j < n; j++) {
            const size_t t = (size_t)(j / SCORE_TILE), lane = (size_t)(j % SCORE_TILE);
            double acc = 0;
            for (int c = 0; c < u; c++)
                acc += (double)qh[c] * s_get(dtype, kdom, (t * u + c) * SCORE_TILE + lane);
            for (int c = u; c < d; c++)
                acc += (double)qh[c] * s_get(dtype, krest, (size_t)j * (d - u) + (c - u));
            s[j] = acc * scale;
            if (s[j] > mb) mb = s[j];
        }
        double lb = 0, ob[d];
        for (int c = 0; c < d; c++) ob[c] = 0;
        for (int j = 0; j < n; j++) {
            const double p = exp(s[j] - mb);
            lb += p;
            for (int c = 0; c < d; c++) ob[c] += p * s_get(dtype, v, (size_t)j * d + c);
        }
        /* attn_merge of (m, l, o) and (mb, lb, ob). */
        double *oh = o + (size_t)h * d;
        const double mx = mb > m[h] ? mb : m[h];
        const double r0 = m[h] == -INFINITY ? 0.0 : exp(m[h] - mx), r1 = exp(mb - mx);
        l[h] = l[h] * r0 + lb * r1;
        for (int c = 0; c < d; c++) oh[c] = oh[c] * r0 + ob[c] * r1;
        m[h] = (float)mx;
    }
}

/* ---- portable ---- */

static void s_block_portable(int dtype, int n, int d, int u, int n_q, float scale,
                             const float *restrict q, const void *restrict kdom,
                             const void *restrict krest, const void *restrict v, float *restrict m,
                             double *restrict l, double *restrict o, float *restrict scratch)
{
    float *lg = scratch, *ob = scratch + (size_t)n_q * DENSE_BLOCK;
    const int n_tiles = (n + SCORE_TILE - 1) / SCORE_TILE;
    for (int h = 0; h < n_q; h++) {
        const float *qh = q + (size_t)h * d;
        float *s = lg + (size_t)h * DENSE_BLOCK;
        for (int t = 0; t < n_tiles; t++) {
            float acc[SCORE_TILE] = {0};
            for (int c = 0; c < u; c++)
                for (int x = 0; x < SCORE_TILE; x++)
                    acc[x] += qh[c] * s_get(dtype, kdom, ((size_t)t * u + c) * SCORE_TILE + x);
            for (int x = 0; x < SCORE_TILE && t * SCORE_TILE + x < n; x++)
                s[t * SCORE_TILE + x] = acc[x];
        }
        for (int j = 0; j < n; j++) {
            float acc = 0;
            for (int c = u; c < d; c++)
                acc += qh[c] * s_get(dtype, krest, (size_t)j * (d - u) + (c - u));
            s[j] = (s[j] + acc) * scale;
        }
    }
    for (int h = 0; h < n_q; h++) {
        float *s = lg + (size_t)h * DENSE_BLOCK, mb = -INFINITY;
        for (int j = 0; j < n; j++) mb = s[j] > mb ? s[j] : mb;
        float lb = 0;
        for (int j = 0; j < n; j++) lb += s[j] = expf(s[j] - mb);
        if (!(lb > 0)) continue;
        double *oh = o + (size_t)h * d;
        const double r = s_raise(d, mb, lb, m + h, l + h, oh);
        float *obh = ob + (size_t)h * d;
        for (int j0 = 0; j0 < n; j0 += DENSE_SUB) {
            const int j1 = n - j0 < DENSE_SUB ? n : j0 + DENSE_SUB;
            memset(obh, 0, (size_t)d * sizeof(float));
            for (int j = j0; j < j1; j++)
                for (int c = 0; c < d; c++) obh[c] += s[j] * s_get(dtype, v, (size_t)j * d + c);
            s_add(d, r, obh, oh);
        }
    }
}

/* ---- avx2 ---- */

#if DENSE_X86
/* 8 stored elements from base + e as f32. */
T_AVX2 static inline __m256 s_load8(int dtype, const void *base, size_t e)
{
    if (dtype == FASA_DTYPE_F32) return _mm256_loadu_ps((const float *)base + e);
    const __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)base + e));
    if (dtype == FASA_DTYPE_F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* exp(x) for x <= 0 (Cephes' expf polynomial; below -87.3 it gives about 2^-126). */
T_AVX2 static inline __m256 s_exp8(__m256 x)
{
    x = _mm256_max_ps(_mm256_set1_ps(-87.3f),
                      x); /* NaN passes through (max returns its 2nd operand) */
    const __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    const __m256i e =
        _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

/* The 8 lane sums of a[0..7] as one vector (lane r = sum of a[r]). */
T_AVX2 static inline __m256 s_hsum8x8(const __m256 *a)
{
    const __m256 s01 = _mm256_hadd_ps(a[0], a[1]), s23 = _mm256_hadd_ps(a[2], a[3]);
    const __m256 s45 = _mm256_hadd_ps(a[4], a[5]), s67 = _mm256_hadd_ps(a[6], a[7]);
    const __m256 s0 = _mm256_hadd_ps(s01, s23), s1 = _mm256_hadd_ps(s45, s67);
    return _mm256_add_ps(_mm256_permute2f128_ps(s0, s1, 0x20),
                         _mm256_permute2f128_ps(s0, s1, 0x31));
}

/* Logits of NH (1 .. 4) heads q[0 .. NH) (rows of d floats) over the block, unscaled, into
 * lg rows DENSE_BLOCK apart. */
T_AVX2 static inline __attribute__((always_inline)) void
s_logits_avx2(const int NH, int dtype, int n, int d, int u, const float *q, const void *kdom,
              const void *krest, float *lg, const char *pf)
{
    const int n_tiles = (n + SCORE_TILE - 1) / SCORE_TILE, w = d - u;
    for (int t = 0; t < n_tiles; t++) {
        __m256 a0[4], a1[4];
        for (int h = 0; h < NH; h++) a0[h] = a1[h] = _mm256_setzero_ps();
        for (int c = 0; c < u; c++) {
            const size_t e = ((size_t)t * u + c) * SCORE_TILE;
            const __m256 k0 = s_load8(dtype, kdom, e), k1 = s_load8(dtype, kdom, e + 8);
            for (int h = 0; h < NH; h++) {
                const __m256 qb = _mm256_broadcast_ss(q + (size_t)h * d + c);
                a0[h] = _mm256_fmadd_ps(k0, qb, a0[h]);
                a1[h] = _mm256_fmadd_ps(k1, qb, a1[h]);
            }
        }
        for (int h = 0; h < NH; h++) { /* the block's scratch has room for whole tiles */
            _mm256_storeu_ps(lg + (size_t)h * DENSE_BLOCK + t * SCORE_TILE, a0[h]);
            _mm256_storeu_ps(lg + (size_t)h * DENSE_BLOCK + t * SCORE_TILE + 8, a1[h]);
        }
    }
    if (w == 0) return;
    const int w8 = w & ~7;
    __m256 part[4][8];
    for (int j0 = 0; j0 < n; j0 += 8) {
        const int nj = n - j0 < 8 ? n - j0 : 8;
        /* Two rows at a time: 2 x NH independent FMA chains hide the FMA latency. */
        for (int r = 0; r < 8; r += 2) {
            __m256 acc[4], acc2[4];
            for (int h = 0; h < NH; h++) acc[h] = acc2[h] = _mm256_setzero_ps();
            if (r < nj) {
                const size_t e = (size_t)(j0 + r) * w, e2 = r + 1 < nj ? e + w : e;
                /* pf: the same rows of V, fetched now for the p.V pass (memory-bound
                 * otherwise: the prefetchers start each stream cold). */
                if (pf)
                    for (size_t b = 0; b < 2 * (size_t)d * fasa_dtype_size(dtype); b += 64)
                        _mm_prefetch(pf + (size_t)(j0 + r) * d * fasa_dtype_size(dtype) + b,
                                     _MM_HINT_T0);
                for (int c = 0; c < w8; c += 8) {
                    const __m256 k = s_load8(dtype, krest, e + c);
                    const __m256 k2 = s_load8(dtype, krest, e2 + c);
                    for (int h = 0; h < NH; h++) {
                        const __m256 qv = _mm256_loadu_ps(q + (size_t)h * d + u + c);
                        acc[h] = _mm256_fmadd_ps(k, qv, acc[h]);
                        acc2[h] = _mm256_fmadd_ps(k2, qv, acc2[h]);
                    }
                }
            }
            for (int h = 0; h < NH; h++) part[h][r] = acc[h], part[h][r + 1] = acc2[h];
        }
        for (int h = 0; h < NH; h++) {
            float *s = lg + (size_t)h * DENSE_BLOCK + j0;
            float sum[8];
            _mm256_storeu_ps(sum, s_hsum8x8(part[h]));
            for (int r = 0; r < nj; r++) {
                float tail = 0;
                for (int c = w8; c < w; c++)
                    tail +=
                        q[(size_t)h * d + u + c] * s_get(dtype, krest, (size_t)(j0 + r) * w + c);
                s[r] += sum[r] + tail;
            }
        }
    }
}

/* ob[h][0 .. d) = sum_{j0 <= j < j1} p[h][j] v_j for NH heads (p rows DENSE_BLOCK apart,
 * ob rows d apart), 16 dims at a time (2 x NH accumulators in registers). */
T_AVX2 static inline __attribute__((always_inline)) void
s_pv_avx2(const int NH, int dtype, int j0, int j1, int d, const float *p, const void *v, float *ob)
{
    const int d16 = d & ~15;
    for (int c = 0; c < d16; c += 16) {
        __m256 a0[4], a1[4];
        for (int h = 0; h < NH; h++) a0[h] = a1[h] = _mm256_setzero_ps();
        for (int j = j0; j < j1; j++) {
            const size_t e = (size_t)j * d + c;
            const __m256 v0 = s_load8(dtype, v, e), v1 = s_load8(dtype, v, e + 8);
            for (int h = 0; h < NH; h++) {
                const __m256 pb = _mm256_broadcast_ss(p + (size_t)h * DENSE_BLOCK + j);
                a0[h] = _mm256_fmadd_ps(v0, pb, a0[h]);
                a1[h] = _mm256_fmadd_ps(v1, pb, a1[h]);
            }
        }
        for (int h = 0; h < NH; h++) {
            _mm256_storeu_ps(ob + (size_t)h * d + c, a0[h]);
            _mm256_storeu_ps(ob + (size_t)h * d + c + 8, a1[h]);
        }
    }
    for (int c = d16; c < d; c++) {
        float acc[4] = {0, 0, 0, 0};
        for (int j = j0; j < j1; j++) {
            const float x = s_get(dtype, v, (size_t)j * d + c);
            for (int h = 0; h < NH; h++) acc[h] += p[(size_t)h * DENSE_BLOCK + j] * x;
        }
        for (int h = 0; h < NH; h++) ob[(size_t)h * d + c] = acc[h];
    }
}

T_AVX2 static inline __attribute__((always_inline)) void
s_block_avx2_dt(const int dtype, int n, int d, int u, int n_q, float scale, const float *restrict q,
                const void *restrict kdom, const void *restrict krest, const void *restrict v,
                float *restrict m, double *restrict l, double *restrict o, float *restrict scratch)
{
    float *lg = scratch, *ob = scratch + (size_t)n_q * DENSE_BLOCK;
    for (int h0 = 0; h0 < n_q; h0 += 4) {
        const int nh = n_q - h0 < 4 ? n_q - h0 : 4;
        const float *qh = q + (size_t)h0 * d;
        float *lh = lg + (size_t)h0 * DENSE_BLOCK;
        switch (nh) {
        case 4:
            s_logits_avx2(4, dtype, n, d, u, qh, kdom, krest, lh, h0 ? NULL : (const char *)v);
            break;
        case 3:
            s_logits_avx2(3, dtype, n, d, u, qh, kdom, krest, lh, h0 ? NULL : (const char *)v);
            break;
        case 2:
            s_logits_avx2(2, dtype, n, d, u, qh, kdom, krest, lh, h0 ? NULL : (const char *)v);
            break;
        default:
            s_logits_avx2(1, dtype, n, d, u, qh, kdom, krest, lh, h0 ? NULL : (const char *)v);
            break;
        }
    }
    const int n8 = n & ~7;
    float mb[n_q], lb[n_q];
    const __m256 sc = _mm256_set1_ps(scale);
    for (int h = 0; h < n_q; h++) {
        float *s = lg + (size_t)h * DENSE_BLOCK;
        __m256 mx = _mm256_set1_ps(-INFINITY);
        for (int j = 0; j < n8; j += 8) {
            const __m256 x = _mm256_mul_ps(_mm256_loadu_ps(s + j), sc);
            _mm256_storeu_ps(s + j, x);
            mx = _mm256_max_ps(mx, x);
        }
        float mxs[8], mh = -INFINITY;
        _mm256_storeu_ps(mxs, mx);
        for (int i = 0; i < 8; i++) mh = mxs[i] > mh ? mxs[i] : mh;
        for (int j = n8; j < n; j++) {
            s[j] *= scale;
            mh = s[j] > mh ? s[j] : mh;
        }
        /* exp over whole vectors; lanes past n are zeroed so p.V and l ignore them. */
        const __m256 mv = _mm256_set1_ps(mh);
        __m256 sum = _mm256_setzero_ps();
        for (int j = 0; j < n; j += 8) {
            __m256 e = s_exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), mv));
            if (j + 8 > n) {
                const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
                const __m256i lim = _mm256_set1_epi32(n - j);
                e = _mm256_and_ps(e, _mm256_castsi256_ps(_mm256_cmpgt_epi32(lim, idx)));
            }
            _mm256_storeu_ps(s + j, e);
            sum = _mm256_add_ps(sum, e);
        }
        float ss[8];
        _mm256_storeu_ps(ss, sum);
        lb[h] = ((ss[0] + ss[4]) + (ss[1] + ss[5])) + ((ss[2] + ss[6]) + (ss[3] + ss[7]));
        mb[h] = mh;
    }
    double rb[n_q];
    for (int h = 0; h < n_q; h++)
        /* A block whose logits are all -inf adds nothing (as on the portable path). */
        rb[h] = lb[h] > 0 && mb[h] > -INFINITY
                    ? s_raise(d, mb[h], lb[h], m + h, l + h, o + (size_t)h * d)
                    : 0.0;
    /* p.V per sub-block: its V rows converted front to back into vb (a sequential read the
     * hardware prefetchers follow; the dim-chunk walk below then stays in L1). */
    float *vb = ob + (size_t)n_q * d;
    for (int j0 = 0; j0 < n; j0 += DENSE_SUB) {
        const int j1 = n - j0 < DENSE_SUB ? n : j0 + DENSE_SUB;
        const size_t ne = (size_t)(j1 - j0) * d, e0 = (size_t)j0 * d;
        size_t i = 0;
        for (; i + 8 <= ne; i += 8) _mm256_storeu_ps(vb + i, s_load8(dtype, v, e0 + i));
        for (; i < ne; i++) vb[i] = s_get(dtype, v, e0 + i);
        for (int h0 = 0; h0 < n_q; h0 += 4) {
            const int nh = n_q - h0 < 4 ? n_q - h0 : 4;
            const float *ph = lg + (size_t)h0 * DENSE_BLOCK + j0;
            float *oh = ob + (size_t)h0 * d;
            switch (nh) {
            case 4:
                s_pv_avx2(4, FASA_DTYPE_F32, 0, j1 - j0, d, ph, vb, oh);
                break;
            case 3:
                s_pv_avx2(3, FASA_DTYPE_F32, 0, j1 - j0, d, ph, vb, oh);
                break;
            case 2:
                s_pv_avx2(2, FASA_DTYPE_F32, 0, j1 - j0, d, ph, vb, oh);
                break;
            default:
                s_pv_avx2(1, FASA_DTYPE_F32, 0, j1 - j0, d, ph, vb, oh);
                break;
            }
        }
        for (int h = 0; h < n_q; h++)
            if (rb[h] > 0) s_add(d, rb[h], ob + (size_t)h * d, o + (size_t)h * d);
    }
}
/* One copy per dtype, so that the loads' dtype test folds away. */
T_AVX2 static void s_block_avx2(int dtype, int n, int d, int u, int n_q, float scale,
                                const float *restrict q, const void *restrict kdom,
                                const void *restrict krest, const void *restrict v,
                                float *restrict m, double *restrict l, double *restrict o,
                                float *restrict scratch)
{
    if (dtype == FASA_DTYPE_F16)
        s_block_avx2_dt(FASA_DTYPE_F16, n, d, u, n_q, scale, q, kdom, krest, v, m, l, o, scratch);
    else if (dtype == FASA_DTYPE_BF16)
        s_block_avx2_dt(FASA_DTYPE_BF16, n, d, u, n_q, scale, q, kdom, krest, v, m, l, o, scratch);
    else
        s_block_avx2_dt(FASA_DTYPE_F32, n, d, u, n_q, scale, q, kdom, krest, v, m, l, o, scratch);
}
#endif

/* ---- avx512 ---- */

#if DENSE_X86
#define T_AVX512 __attribute__((target("avx512f,avx2,fma,f16c")))

/* Rows ahead of the logits the avx512 kernel prefetches keys (the hardware prefetchers
 * alone leave it at about half the rate at 1M tokens). */
#define DENSE_PF_AHEAD 64

/* 16 stored elements from base + e as f32. */
T_AVX512 static inline __m512 s_load16(int dtype, const void *base, size_t e)
{
    if (dtype == FASA_DTYPE_F32) return _mm512_loadu_ps((const float *)base + e);
    const __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)base + e));
    if (dtype == FASA_DTYPE_F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* exp(x) for x <= 0: the polynomial of s_exp8, 2^n applied by vscalefps. */
T_AVX512 static inline __m512 s_exp16(__m512 x)
{
    x = _mm512_max_ps(_mm512_set1_ps(-87.3f), x); /* NaN passes through */
    const __m512 fx = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
    x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.12194440e-4f), x);
    __m512 y = _mm512_set1_ps(1.9875691500e-4f);
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507e-3f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(y, fx);
}

/* a[0 .. 7] + b[0 .. 7] into lanes 0 .. 7, a[8 .. 15] + b[8 .. 15] into lanes 8 .. 15 after
 * the halves are paired: one level of the 16-to-1 reduction below. */
#define S_RED(a, b, imm_lo, imm_hi, op) _mm512_add_ps(op(a, b, imm_lo), op(a, b, imm_hi))

/* The 16 lane sums of v[0 .. 15] as one vector: lane 4 i + k is the sum of v[4 k + i]. */
T_AVX512 static inline __m512 s_hsum16x16(const __m512 *v)
{
    __m512 x[8], y[4], w[2];
    for (int k = 0; k < 8; k++)
        x[k] = S_RED(v[2 * k], v[2 * k + 1], 0x44, 0xEE, _mm512_shuffle_f32x4);
    for (int k = 0; k < 4; k++)
        y[k] = S_RED(x[2 * k], x[2 * k + 1], 0x88, 0xDD, _mm512_shuffle_f32x4);
    for (int k = 0; k < 2; k++) w[k] = S_RED(y[2 * k], y[2 * k + 1], 0x44, 0xEE, _mm512_shuffle_ps);
    return S_RED(w[0], w[1], 0x88, 0xDD, _mm512_shuffle_ps);
}

/* Logits of NH (1 .. 4) heads q[0 .. NH) over the block, unscaled, into lg rows DENSE_BLOCK
 * apart (whole tiles; lanes past n hold whatever the last tile's padding gives). Per tile:
 * the other dims of 4 rows at a time (4 x NH accumulators of 16 lanes, the heads' q chunk
 * loaded once for the 4 rows, the 16 (row, head) sums reduced together), the 4 groups'
 * sums turned into one vector of the tile's 16 rows per head, then the tile's dominant dims
 * added with the 16 rows in the lanes; nothing goes through memory between the parts.
 * pf: V of the same rows, prefetched for the p.V pass. */
T_AVX512 static inline __attribute__((always_inline)) void
s_logits_avx512(const int NH, const int dtype, int n, int d, int u, const float *q, const float *qd,
                const void *kdom, const void *krest, float *lg, const char *pf)
{
    const int n_tiles = (n + SCORE_TILE - 1) / SCORE_TILE, w = d - u, w16 = w & ~15;
    const size_t esz = fasa_dtype_size(dtype), vrow = (size_t)d * esz;
    const float *qr[4];
    for (int h = 0; h < NH; h++) qr[h] = q + (size_t)h * d + u;
    for (int t = 0; t < n_tiles; t++) {
        __m512 sg[4]; /* sg[g]: lane 4 h + r = rest-dims sum of row 16 t + 4 g + r, head h */
        for (int g = 0; g < 4; g++) {
            const int j0 = t * SCORE_TILE + 4 * g, nj = n - j0 < 4 ? n - j0 : 4;
            sg[g] = _mm512_setzero_ps();
            if (nj <= 0) continue;
            if (pf) { /* the first head group only */
                const char *pr = pf + (size_t)j0 * vrow;
                for (size_t b = 0; b < (size_t)nj * vrow; b += 64)
                    _mm_prefetch(pr + b, _MM_HINT_T0);
                /* The keys DENSE_PF_AHEAD rows on (into the next block at the end). */
                const char *pk = (const char *)krest + (size_t)(j0 + DENSE_PF_AHEAD) * w * esz;
                for (size_t b = 0; b < 4 * (size_t)w * esz; b += 64)
                    _mm_prefetch(pk + b, _MM_HINT_T0);
                const char *pd =
                    (const char *)kdom +
                    ((size_t)(t * SCORE_TILE + DENSE_PF_AHEAD) * u + (size_t)g * 4 * u) * esz;
                for (size_t b = 0; b < 4 * (size_t)u * esz; b += 64)
                    _mm_prefetch(pd + b, _MM_HINT_T0);
            }
            if (w16 == 0 && w == 0) continue;
            __m512 acc[16];
            for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_ps();
            /* Rows past n repeat the last one (read, then dropped). */
            const char *r0 = (const char *)krest + (size_t)j0 * w * esz;
            const size_t st = (size_t)w * esz;
            const char *r1 = nj > 1 ? r0 + st : r0, *r2 = nj > 2 ? r0 + 2 * st : r1;
            const char *r3 = nj > 3 ? r0 + 3 * st : r2;
            for (int c = 0; c < w16; c += 16) {
                __m512 qv[4];
                for (int h = 0; h < NH; h++) qv[h] = _mm512_loadu_ps(qr[h] + c);
                const __m512 k0 = s_load16(dtype, r0, (size_t)c);
                for (int h = 0; h < NH; h++) acc[h] = _mm512_fmadd_ps(k0, qv[h], acc[h]);
                const __m512 k1 = s_load16(dtype, r1, (size_t)c);
                for (int h = 0; h < NH; h++) acc[4 + h] = _mm512_fmadd_ps(k1, qv[h], acc[4 + h]);
                const __m512 k2 = s_load16(dtype, r2, (size_t)c);
                for (int h = 0; h < NH; h++) acc[8 + h] = _mm512_fmadd_ps(k2, qv[h], acc[8 + h]);
                const __m512 k3 = s_load16(dtype, r3, (size_t)c);
                for (int h = 0; h < NH; h++) acc[12 + h] = _mm512_fmadd_ps(k3, qv[h], acc[12 + h]);
            }
            /* acc[4 r + h]: lane 4 h + r of the sum. */
            sg[g] = s_hsum16x16(acc);
            if (w16 < w) {
                float tail[16] = {0};
                for (int r = 0; r < nj; r++)
                    for (int h = 0; h < NH; h++)
                        for (int c = w16; c < w; c++)
                            tail[4 * h + r] +=
                                qr[h][c] * s_get(dtype, krest, (size_t)(j0 + r) * w + c);
                sg[g] = _mm512_add_ps(sg[g], _mm512_loadu_ps(tail));
            }
        }
        /* A 4 x 4 transpose of 128-bit blocks: a[h] lane 4 g + r = sg[g] lane 4 h + r. */
        const __m512 t0 = _mm512_shuffle_f32x4(sg[0], sg[1], 0x44);
        const __m512 t1 = _mm512_shuffle_f32x4(sg[0], sg[1], 0xEE);
        const __m512 t2 = _mm512_shuffle_f32x4(sg[2], sg[3], 0x44);
        const __m512 t3 = _mm512_shuffle_f32x4(sg[2], sg[3], 0xEE);
        __m512 a[4] = {_mm512_shuffle_f32x4(t0, t2, 0x88), _mm512_shuffle_f32x4(t0, t2, 0xDD),
                       _mm512_shuffle_f32x4(t1, t3, 0x88), _mm512_shuffle_f32x4(t1, t3, 0xDD)};
        const char *kt = (const char *)kdom + (size_t)t * u * SCORE_TILE * esz;
        for (int c = 0; c < u; c++) {
            const __m512 k = s_load16(dtype, kt, (size_t)c * SCORE_TILE);
            for (int h = 0; h < NH; h++)
                a[h] = _mm512_fmadd_ps(k, _mm512_set1_ps(qd[4 * c + h]), a[h]);
        }
        for (int h = 0; h < NH; h++)
            _mm512_storeu_ps(lg + (size_t)h * DENSE_BLOCK + t * SCORE_TILE, a[h]);
    }
}

/* Memory to prefetch during p.V, row by row: the next block's keys (row j: row[i] bytes at
 * at[i] + j row[i]). */
typedef struct s_pf {
    const char *at[2];
    size_t row[2];
} s_pf;

/* ob[h][c0 .. c0 + 16 CH) += sum_{j0 <= j < j1} p[h][j] v_j for NH heads: NH x CH
 * accumulators of 16 lanes. */
T_AVX512 static inline __attribute__((always_inline)) void
s_pv_avx512(const int NH, const int CH, const int dtype, int j0, int j1, int d, int c0,
            const float *p, const void *v, float *ob, const s_pf *pf)
{
    __m512 acc[4][4];
    for (int h = 0; h < NH; h++)
        for (int k = 0; k < CH; k++) acc[h][k] = _mm512_loadu_ps(ob + (size_t)h * d + c0 + 16 * k);
    for (int j = j0; j < j1; j++) {
        if (pf)
            for (int i = 0; i < 2; i++)
                for (size_t b = 0; b < pf->row[i]; b += 64)
                    _mm_prefetch(pf->at[i] + (size_t)j * pf->row[i] + b, _MM_HINT_T0);
        __m512 vv[4];
        for (int k = 0; k < CH; k++) vv[k] = s_load16(dtype, v, (size_t)j * d + c0 + 16 * k);
        for (int h = 0; h < NH; h++) {
            const __m512 pb = _mm512_set1_ps(p[(size_t)h * DENSE_BLOCK + j]);
            for (int k = 0; k < CH; k++) acc[h][k] = _mm512_fmadd_ps(vv[k], pb, acc[h][k]);
        }
    }
    for (int h = 0; h < NH; h++)
        for (int k = 0; k < CH; k++) _mm512_storeu_ps(ob + (size_t)h * d + c0 + 16 * k, acc[h][k]);
}

/* Rows per sub-block of the avx512 p.V: its V (16 KiB at d 128, f16) stays in L1 while the
 * dims are walked 64 at a time. */
#define DENSE_SUB512 64

/* p.V of NH heads over rows [j0, j1), all dims, into ob (added to what ob holds). */
T_AVX512 static inline __attribute__((always_inline)) void
s_pv_all_avx512(const int NH, const int dtype, int j0, int j1, int d, const float *p, const void *v,
                float *ob, const s_pf *pf)
{
    const int d16 = d & ~15;
    for (int c0 = 0; c0 < d16; c0 += 64) {
        switch ((d16 - c0) / 16 < 4 ? (d16 - c0) / 16 : 4) {
        case 4:
            s_pv_avx512(NH, 4, dtype, j0, j1, d, c0, p, v, ob, c0 ? NULL : pf);
            break;
        case 3:
            s_pv_avx512(NH, 3, dtype, j0, j1, d, c0, p, v, ob, c0 ? NULL : pf);
            break;
        case 2:
            s_pv_avx512(NH, 2, dtype, j0, j1, d, c0, p, v, ob, c0 ? NULL : pf);
            break;
        default:
            s_pv_avx512(NH, 1, dtype, j0, j1, d, c0, p, v, ob, c0 ? NULL : pf);
            break;
        }
    }
    for (int c = d16; c < d; c++)
        for (int h = 0; h < NH; h++) {
            float acc = ob[(size_t)h * d + c];
            for (int j = j0; j < j1; j++)
                acc += p[(size_t)h * DENSE_BLOCK + j] * s_get(dtype, v, (size_t)j * d + c);
            ob[(size_t)h * d + c] = acc;
        }
}

T_AVX512 static inline __attribute__((always_inline)) void
s_block_avx512_dt(const int dtype, int n, int d, int u, int n_q, float scale,
                  const float *restrict q, const void *restrict kdom, const void *restrict krest,
                  const void *restrict v, float *restrict m, double *restrict l, double *restrict o,
                  float *restrict scratch)
{
    float *lg = scratch, *ob = scratch + (size_t)n_q * DENSE_BLOCK;
    float *qd = ob + (size_t)n_q * d; /* 4 u <= 32 d floats */
    for (int h0 = 0; h0 < n_q; h0 += 4) {
        const int nh = n_q - h0 < 4 ? n_q - h0 : 4;
        const float *qh = q + (size_t)h0 * d;
        float *lh = lg + (size_t)h0 * DENSE_BLOCK;
        const char *pf = h0 ? NULL : (const char *)v;
        for (int c = 0; c < u; c++) /* the dominant dims' q, the group's heads side by side */
            for (int h = 0; h < nh; h++) qd[4 * c + h] = qh[(size_t)h * d + c];
        switch (nh) {
        case 4:
            s_logits_avx512(4, dtype, n, d, u, qh, qd, kdom, krest, lh, pf);
            break;
        case 3:
            s_logits_avx512(3, dtype, n, d, u, qh, qd, kdom, krest, lh, pf);
            break;
        case 2:
            s_logits_avx512(2, dtype, n, d, u, qh, qd, kdom, krest, lh, pf);
            break;
        default:
            s_logits_avx512(1, dtype, n, d, u, qh, qd, kdom, krest, lh, pf);
            break;
        }
    }
    /* The block's softmax per head: scale, maximum, exponentials (zero past n), their sum. */
    double rb[n_q];
    const __m512 sc = _mm512_set1_ps(scale);
    for (int h = 0; h < n_q; h++) {
        float *s = lg + (size_t)h * DENSE_BLOCK;
        __m512 mx = _mm512_set1_ps(-INFINITY);
        for (int j = 0; j < n; j += 16) {
            const __mmask16 k = n - j >= 16 ? 0xffff : (__mmask16)((1u << (n - j)) - 1);
            const __m512 x = _mm512_mul_ps(_mm512_loadu_ps(s + j), sc);
            _mm512_storeu_ps(s + j, x);
            mx = _mm512_mask_max_ps(mx, k, mx, x);
        }
        const float mh = _mm512_reduce_max_ps(mx);
        const __m512 mv = _mm512_set1_ps(mh);
        __m512 sum = _mm512_setzero_ps();
        for (int j = 0; j < n; j += 16) {
            const __mmask16 k = n - j >= 16 ? 0xffff : (__mmask16)((1u << (n - j)) - 1);
            const __m512 e =
                _mm512_maskz_mov_ps(k, s_exp16(_mm512_sub_ps(_mm512_loadu_ps(s + j), mv)));
            _mm512_storeu_ps(s + j, e);
            sum = _mm512_add_ps(sum, e);
        }
        const float lb = _mm512_reduce_add_ps(sum);
        rb[h] =
            lb > 0 && mh > -INFINITY ? s_raise(d, mh, lb, m + h, l + h, o + (size_t)h * d) : 0.0;
    }
    memset(ob, 0, (size_t)n_q * d * sizeof(float));
    const size_t esz = fasa_dtype_size(dtype);
    const s_pf pf = {
        {(const char *)krest + (size_t)n * (d - u) * esz, (const char *)kdom + (size_t)n * u * esz},
        {(size_t)(d - u) * esz, (size_t)u * esz}};
    for (int j0 = 0; j0 < n; j0 += DENSE_SUB512) {
        const int j1 = n - j0 < DENSE_SUB512 ? n : j0 + DENSE_SUB512;
        for (int h0 = 0; h0 < n_q; h0 += 4) {
            const int nh = n_q - h0 < 4 ? n_q - h0 : 4;
            const float *ph = lg + (size_t)h0 * DENSE_BLOCK;
            float *oh = ob + (size_t)h0 * d;
            switch (nh) {
            case 4:
                s_pv_all_avx512(4, dtype, j0, j1, d, ph, v, oh, h0 ? NULL : &pf);
                break;
            case 3:
                s_pv_all_avx512(3, dtype, j0, j1, d, ph, v, oh, h0 ? NULL : &pf);
                break;
            case 2:
                s_pv_all_avx512(2, dtype, j0, j1, d, ph, v, oh, h0 ? NULL : &pf);
                break;
            default:
                s_pv_all_avx512(1, dtype, j0, j1, d, ph, v, oh, h0 ? NULL : &pf);
                break;
            }
        }
    }
    for (int h = 0; h < n_q; h++)
        if (rb[h] > 0) s_add(d, rb[h], ob + (size_t)h * d, o + (size_t)h * d);
}

T_AVX512 static void s_block_avx512(int dtype, int n, int d, int u, int n_q, float scale,
                                    const float *restrict q, const void *restrict kdom,
                                    const void *restrict krest, const void *restrict v,
                                    float *restrict m, double *restrict l, double *restrict o,
                                    float *restrict scratch)
{
    if (dtype == FASA_DTYPE_F16)
        s_block_avx512_dt(FASA_DTYPE_F16, n, d, u, n_q, scale, q, kdom, krest, v, m, l, o, scratch);
    else if (dtype == FASA_DTYPE_BF16)
        s_block_avx512_dt(FASA_DTYPE_BF16, n, d, u, n_q, scale, q, kdom, krest, v, m, l, o,
                          scratch);
    else
        s_block_avx512_dt(FASA_DTYPE_F32, n, d, u, n_q, scale, q, kdom, krest, v, m, l, o, scratch);
}
#endif

/* The path of a block: path where the CPU has it; for SIMD_AUTO (or a path it lacks) the path
 * FASA_SIMD named (simd_path_named), else AVX-512 where the CPU has it (the wider kernel:
 * twice the avx2 one's rate at 1M f16 tokens on a Zen 5 core), else simd_path_default. */
#if DENSE_X86
static int s_path(int path)
{
    if (path >= 0 && path <= SIMD_PATH_LAST && simd_path_supported((simd_path)path)) return path;
    const int named = simd_path_named();
    if (named >= 0) return named;
    return simd_path_supported(SIMD_AVX512) ? SIMD_AVX512 : (int)simd_path_default();
}
#endif

int dense_path(void)
{
#if DENSE_X86
    return s_path(SIMD_AUTO);
#else
    return SIMD_PORTABLE;
#endif
}

void dense_block(int path, int dtype, int n, int d, int u, int n_q, float scale,
                 const float *restrict q, const void *restrict kdom, const void *restrict krest,
                 const void *restrict v, float *restrict m, double *restrict l, double *restrict o,
                 float *restrict scratch)
{
    if (n <= 0 || n_q <= 0) return;
#if DENSE_X86
    path = s_path(path);
    if (path == SIMD_AVX512) {
        s_block_avx512(dtype, n, d, u, n_q, scale, q, kdom, krest, v, m, l, o, scratch);
        return;
    }
    if (path != SIMD_PORTABLE) {
        s_block_avx2(dtype, n, d, u, n_q, scale, q, kdom, krest, v, m, l, o, scratch);
        return;
    }
#endif
    s_block_portable(dtype, n, d, u, n_q, scale, q, kdom, krest, v, m, l, o, scratch);
}

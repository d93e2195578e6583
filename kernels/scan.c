/* The scoring store and the fused scan + top-k. See scan.h for the layouts and the
 * arithmetic every path shares. */
#include "scan.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

#if defined(__x86_64__) && defined(__GNUC__)
#define SCAN_X86 1
#include <immintrin.h>
#define T_AVX2 __attribute__((target("avx2,fma,f16c")))
#else
#define SCAN_X86 0
#endif

const char *scan_dtype_name(int sd)
{
    switch (sd) {
    case SCAN_AUTO:
        return "auto";
    case SCAN_F32:
        return "f32";
    case SCAN_F16:
        return "f16";
    case SCAN_BF16:
        return "bf16";
    case SCAN_I8:
        return "int8";
    default:
        return NULL;
    }
}

int scan_dtype_parse(const char *name, int *out)
{
    static const int all[] = {SCAN_AUTO, SCAN_F32, SCAN_F16, SCAN_BF16, SCAN_I8};
    if (!name) return -1;
    if (!strcmp(name, "i8")) {
        *out = SCAN_I8;
        return 0;
    }
    for (size_t i = 0; i < sizeof(all) / sizeof(*all); i++)
        if (!strcmp(name, scan_dtype_name(all[i]))) {
            *out = all[i];
            return 0;
        }
    return -1;
}

int scan_dtype_valid(int sd)
{
    return sd == SCAN_AUTO || scan_dtype_size(sd) > 0;
}

int scan_dtype_effective(int sd, int kv_dtype)
{
    if (sd != SCAN_AUTO) return sd;
    return kv_dtype == FASA_DTYPE_F16    ? SCAN_F16
           : kv_dtype == FASA_DTYPE_BF16 ? SCAN_BF16
                                         : SCAN_F32;
}

size_t scan_dtype_size(int sd)
{
    switch (sd) {
    case SCAN_F32:
        return 4;
    case SCAN_F16:
    case SCAN_BF16:
        return 2;
    case SCAN_I8:
        return 1;
    default:
        return 0;
    }
}

int scan_dims_padded(int sd, int n_dims)
{
    return sd == SCAN_I8 ? (n_dims + 1) / 2 * 2 : n_dims;
}

size_t scan_tile_bytes(int sd, int n_dims)
{
    return (size_t)SCORE_TILE * (size_t)scan_dims_padded(sd, n_dims) * scan_dtype_size(sd);
}

/* ---- int8 quantisation ---- */

static float s_maxabs(int n, const float *x)
{
    float m = 0.0f;
    for (int i = 0; i < n; i++) {
        const float a = fabsf(x[i]);
        m = a > m ? a : m;
    }
    return m;
}

/* The quantiser of scan.h with limit lim (127 keys, SCAN_Q16_MAX queries). */
static float s_quant(int n, const float *x, float lim, int32_t *q)
{
    const float scale = s_maxabs(n, x) / lim;
    for (int i = 0; i < n; i++) {
        float t = scale > 0.0f ? rintf(x[i] / scale) : 0.0f; /* default mode: ties to even */
        t = t > lim ? lim : t < -lim ? -lim : t;
        q[i] = (int32_t)t;
    }
    return scale;
}

static float s_quant_ref(int n, const float *x, long lim, int32_t *q)
{
    float m = 0.0f;
    for (int i = 0; i < n; i++)
        if (fabsf(x[i]) > m) m = fabsf(x[i]);
    const float scale = m / (float)lim;
    for (int i = 0; i < n; i++) {
        if (!(scale > 0.0f)) {
            q[i] = 0;
            continue;
        }
        const float t = x[i] / scale;
        const float f = floorf(t), diff = t - f;
        long r = (long)f;
        if (diff > 0.5f || (diff == 0.5f && (r % 2 != 0))) r++;
        if (r > lim) r = lim;
        if (r < -lim) r = -lim;
        q[i] = (int32_t)r;
    }
    return scale;
}

float scan_quant_i8(int n, const float *x, int8_t *q)
{
    int32_t t[n > 0 ? n : 1];
    const float s = s_quant(n, x, 127.0f, t);
    for (int i = 0; i < n; i++) q[i] = (int8_t)t[i];
    return s;
}

float scan_quant_i8_ref(int n, const float *x, int8_t *q)
{
    int32_t t[n > 0 ? n : 1];
    const float s = s_quant_ref(n, x, 127, t);
    for (int i = 0; i < n; i++) q[i] = (int8_t)t[i];
    return s;
}

float scan_quant_q16(int n, const float *x, int16_t *q)
{
    int32_t t[n > 0 ? n : 1];
    const float s = s_quant(n, x, (float)SCAN_Q16_MAX, t);
    for (int i = 0; i < n; i++) q[i] = (int16_t)t[i];
    return s;
}

float scan_quant_q16_ref(int n, const float *x, int16_t *q)
{
    int32_t t[n > 0 ? n : 1];
    const float s = s_quant_ref(n, x, SCAN_Q16_MAX, t);
    for (int i = 0; i < n; i++) q[i] = (int16_t)t[i];
    return s;
}

/* ---- packing ---- */

static size_t s_i8_index(int n_pad, int row, int c)
{
    const int t = row / SCORE_TILE, l = row % SCORE_TILE;
    return (size_t)t * SCORE_TILE * n_pad + (size_t)(c / 2) * 2 * SCORE_TILE + (size_t)l * 2 +
           (size_t)(c % 2);
}

void scan_pack_row(int sd, int n_dims, const float *x, void *tiles, float *row_scale, int row)
{
    const int t = row / SCORE_TILE, l = row % SCORE_TILE;
    const size_t e0 = (size_t)t * n_dims * SCORE_TILE + (size_t)l;
    switch (sd) {
    case SCAN_F32:
        for (int c = 0; c < n_dims; c++) ((float *)tiles)[e0 + (size_t)c * SCORE_TILE] = x[c];
        return;
    case SCAN_F16:
        for (int c = 0; c < n_dims; c++)
            ((uint16_t *)tiles)[e0 + (size_t)c * SCORE_TILE] = fasa_f32_to_f16(x[c]);
        return;
    case SCAN_BF16:
        for (int c = 0; c < n_dims; c++)
            ((uint16_t *)tiles)[e0 + (size_t)c * SCORE_TILE] = fasa_f32_to_bf16(x[c]);
        return;
    case SCAN_I8: {
        int8_t qv[n_dims > 0 ? n_dims : 1];
        const float s = scan_quant_i8(n_dims, x, qv);
        const int n_pad = scan_dims_padded(sd, n_dims);
        for (int c = 0; c < n_dims; c++) ((int8_t *)tiles)[s_i8_index(n_pad, row, c)] = qv[c];
        row_scale[row] = s;
        return;
    }
    default:
        return;
    }
}

/* ---- queries ---- */

int scan_q_prep(scan_q *sq, int sd, int n_q, int n_dims, const float *q)
{
    const int n_pad = scan_dims_padded(sd, n_dims);
    const size_t nf = (size_t)n_q * (n_dims > 0 ? n_dims : 1), np = (size_t)n_q * (n_pad + 4);
    const size_t need =
        nf * sizeof(float) + np * sizeof(int16_t) + (size_t)n_q * sizeof(float) + 64;
    if (need > sq->cap) {
        void *m = realloc(sq->mem, need);
        if (!m) return -1;
        sq->mem = m;
        sq->cap = need;
    }
    sq->sd = sd, sq->n_q = n_q, sq->n_dims = n_dims, sq->n_pad = n_pad;
    sq->qf = sq->mem;
    sq->qscale = sq->qf + nf;
    sq->qi = (int16_t *)(sq->qscale + n_q);
    memcpy(sq->qf, q, (size_t)n_q * n_dims * sizeof(float));
    if (sd == SCAN_I8)
        for (int h = 0; h < n_q; h++) {
            int16_t *qi = sq->qi + (size_t)h * n_pad;
            memset(qi, 0, (size_t)n_pad * sizeof(*qi));
            sq->qscale[h] = scan_quant_q16(n_dims, q + (size_t)h * n_dims, qi);
        }
    return 0;
}

void scan_q_free(scan_q *sq)
{
    if (!sq) return;
    free(sq->mem);
    memset(sq, 0, sizeof(*sq));
}

/* ---- portable scores (the arithmetic of scan.h, one row at a time) ---- */

static float s_get(int sd, const void *tiles, size_t e)
{
    if (sd == SCAN_F32) return ((const float *)tiles)[e];
    const uint16_t h = ((const uint16_t *)tiles)[e];
    return sd == SCAN_F16 ? fasa_f16_to_f32(h) : fasa_bf16_to_f32(h);
}

/* Score of row r for head h: the portable kernel, bit-identical to the SIMD ones. */
static float s_score_port(const scan_q *sq, int h, int r, const void *tiles, const float *row_scale)
{
    const int t = r / SCORE_TILE, l = r % SCORE_TILE, nd = sq->n_dims;
    if (sq->sd == SCAN_I8) {
        const int16_t *qi = sq->qi + (size_t)h * sq->n_pad;
        int32_t acc = 0;
        for (int c = 0; c < sq->n_pad; c++)
            acc += (int32_t)qi[c] * ((const int8_t *)tiles)[s_i8_index(sq->n_pad, r, c)];
        return (float)acc * sq->qscale[h] * row_scale[r];
    }
    const float *q = sq->qf + (size_t)h * nd;
    const size_t e0 = (size_t)t * nd * SCORE_TILE + (size_t)l;
    float acc = 0.0f;
    for (int c = 0; c < nd; c++)
        acc = fmaf(q[c], s_get(sq->sd, tiles, e0 + (size_t)c * SCORE_TILE), acc);
    return acc;
}

void scan_scores_ref(const scan_q *sq, int n_rows, const void *tiles, const float *row_scale,
                     float *out, int ld_out)
{
    for (int h = 0; h < sq->n_q; h++)
        for (int r = 0; r < n_rows; r++) {
            const int t = r / SCORE_TILE, l = r % SCORE_TILE;
            float v;
            if (sq->sd == SCAN_I8) {
                int64_t acc = 0;
                for (int c = 0; c < sq->n_dims; c++)
                    acc += (int64_t)sq->qi[(size_t)h * sq->n_pad + c] *
                           ((const int8_t *)tiles)[s_i8_index(sq->n_pad, r, c)];
                v = (float)acc * sq->qscale[h] * row_scale[r];
            } else {
                double acc = 0.0;
                for (int c = 0; c < sq->n_dims; c++)
                    acc +=
                        (double)sq->qf[(size_t)h * sq->n_dims + c] *
                        s_get(sq->sd, tiles, ((size_t)t * sq->n_dims + c) * SCORE_TILE + (size_t)l);
                v = (float)acc;
            }
            out[(size_t)h * ld_out + r] = v;
        }
}

/* The fused scan's rare insert, shared by every path: stores c, cutting the held candidates
 * back first once acc->lim (4k, topk_acc_init) are held (topk_acc_trim: to those at or
 * above a threshold the best k reach, found by counts, not comparisons). Compacting early
 * keeps the threshold near the running k-th best, so that far fewer rows beat it (about
 * k ln(n / k) plus the slack per compaction, against the whole buffer's worth per
 * compaction when it waited for the buffer to fill); the selection is the exact top-k
 * either way (the finish cuts to exactly k). */
static inline void s_insert(topk_acc *acc, topk_cand c)
{
    if (acc->n >= acc->lim) topk_acc_trim(acc);
    acc->items[acc->n++] = c;
}

/* 1 when score s may enter acc: no threshold yet (or a NaN one), or s beats it (rows come
 * in ascending position, so an equal score never does). */
static inline int s_beats(const topk_acc *acc, float s)
{
    return !acc->have_thr || acc->thr.score != acc->thr.score || s > acc->thr.score;
}

/* Offers row score s of one head: the fused insert the SIMD kernels do with a vector
 * compare, here one compare per row. */
static inline void s_offer_port(topk_acc *acc, float s, int32_t pos)
{
    if (s_beats(acc, s)) s_insert(acc, (topk_cand){s, pos});
}

static void s_scores_port(const scan_q *sq, int n_rows, const void *tiles, const float *row_scale,
                          float *out, int ld_out)
{
    for (int r = 0; r < n_rows; r++)
        for (int h = 0; h < sq->n_q; h++)
            out[(size_t)h * ld_out + r] = s_score_port(sq, h, r, tiles, row_scale);
}

static void s_topk_port(const scan_q *sq, int n_rows, const void *tiles, const float *row_scale,
                        int32_t pos0, topk_acc *acc)
{
    for (int r = 0; r < n_rows; r++)
        for (int h = 0; h < sq->n_q; h++)
            s_offer_port(&acc[h], s_score_port(sq, h, r, tiles, row_scale), pos0 + r);
}

/* ---- AVX2 ---- */

#if SCAN_X86
/* Row of each of the 16 score lanes (vector 0 lanes 0..7, then vector 1): the bf16 unpack
 * interleaves the two 128-bit halves. */
static const int8_t s_lane_row_id[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
static const int8_t s_lane_row_bf16[16] = {0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15};

#define S_NQ_MAX 4

/* Scores of one tile for nq (1..4, a constant after inlining) heads from q (ld_q apart) into
 * acc[h][0..1]; lane order as s_lane_row_*. */
T_AVX2 static inline __attribute__((always_inline)) void
s_tile_float(int sd, int nq, int nd, const float *q, int ld_q, const void *tile, __m256 acc[][2])
{
    /* Local accumulators, copied out at the end: accumulating into acc itself (a caller's
     * array) made GCC store all of them to the stack in every iteration, 8 stores per dim and
     * 16 rows, which bounded the float scans. */
    __m256 r[S_NQ_MAX][2];
    for (int h = 0; h < nq; h++) r[h][0] = r[h][1] = _mm256_setzero_ps();
    const __m256i zero = _mm256_setzero_si256();
    for (int c = 0; c < nd; c++) {
        __m256 k0, k1;
        if (sd == SCAN_F32) {
            const float *p = (const float *)tile + (size_t)c * SCORE_TILE;
            k0 = _mm256_loadu_ps(p);
            k1 = _mm256_loadu_ps(p + 8);
        } else if (sd == SCAN_F16) {
            const uint16_t *p = (const uint16_t *)tile + (size_t)c * SCORE_TILE;
            k0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
            k1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 8)));
        } else {
            const __m256i w = _mm256_loadu_si256(
                (const __m256i *)((const uint16_t *)tile + (size_t)c * SCORE_TILE));
            k0 = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, w));
            k1 = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, w));
        }
        for (int h = 0; h < nq; h++) {
            const __m256 qb = _mm256_broadcast_ss(q + (size_t)h * ld_q + c);
            r[h][0] = _mm256_fmadd_ps(qb, k0, r[h][0]);
            r[h][1] = _mm256_fmadd_ps(qb, k1, r[h][1]);
        }
    }
    for (int h = 0; h < nq; h++) acc[h][0] = r[h][0], acc[h][1] = r[h][1];
}

/* int8 tile: sum_c qi_c ki_c with the int16 queries: each pair of dims of 8 rows (16
 * bytes) sign-extended to int16 once (vpmovsxbw), then per head one vpmaddwd against the
 * head's broadcast pair of int16 query values (exact int32 products and pair sums; scan.h
 * bounds the sum), then the two scalings in f32. The two halves of the tile (rows 0..7, then
 * 8..15) run one after the other, so that the nq accumulators, the key vector and a
 * broadcast query pair stay in registers (both halves at once spilled an accumulator to the
 * stack, a store-to-load chain in every iteration); integer sums make the order moot. */
T_AVX2 static inline __attribute__((always_inline)) void
s_tile_i8(int nq, int n_pad, const int16_t *qi, const float *qscale, const void *tile,
          const float *kscale, __m256 acc[][2])
{
    const int n2 = n_pad / 2;
    for (int half = 0; half < 2; half++) {
        __m256i ai[S_NQ_MAX];
        for (int h = 0; h < nq; h++) ai[h] = _mm256_setzero_si256();
        const int8_t *p = (const int8_t *)tile + 16 * half;
        for (int c2 = 0; c2 < n2; c2++, p += 2 * SCORE_TILE) {
            const __m256i kk = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)p));
            for (int h = 0; h < nq; h++) {
                int32_t w;
                memcpy(&w, qi + (size_t)h * n_pad + 2 * c2, 4);
                ai[h] = _mm256_add_epi32(ai[h], _mm256_madd_epi16(kk, _mm256_set1_epi32(w)));
            }
        }
        const __m256 ks = _mm256_loadu_ps(kscale + 8 * half);
        for (int h = 0; h < nq; h++)
            acc[h][half] = _mm256_mul_ps(
                _mm256_mul_ps(_mm256_cvtepi32_ps(ai[h]), _mm256_set1_ps(qscale[h])), ks);
    }
}

/* The rare inserts of one tile and head: the lanes in mask (scores s[16], lane order
 * lane_row), in ascending row order (the strict compare assumes it; the lane maps are their
 * own inverses), each checked again against the threshold an insert may have raised. */
__attribute__((noinline, cold)) static void
s_tile_offer(topk_acc *a, const float *s, const int8_t *lane_row, unsigned mask, int32_t p0)
{
    /* The rows of the lanes in mask, as a mask over rows (ascending row = ascending bit). */
    unsigned rows = 0;
    for (unsigned m = mask; m; m &= m - 1) rows |= 1u << lane_row[__builtin_ctz(m)];
    for (; rows; rows &= rows - 1) {
        const int r = __builtin_ctz(rows), i = lane_row[r];
        if (s_beats(a, s[i])) s_insert(a, (topk_cand){s[i], p0 + r});
    }
}

/* One tile of nq heads starting at head h0, as scores (out != NULL) or offers to acc. */
T_AVX2 static inline __attribute__((always_inline)) void
s_tile_avx2(const scan_q *sq, int nq, int h0, int t, int n_valid, const void *tiles,
            const float *row_scale, float *out, int ld_out, int32_t pos0, topk_acc *acc)
{
    __m256 v[S_NQ_MAX][2];
    const int sd = sq->sd;
    const size_t tb = (size_t)SCORE_TILE * (size_t)sq->n_pad *
                      (sd == SCAN_F32  ? 4
                       : sd == SCAN_I8 ? 1
                                       : 2);
    const void *tile = (const char *)tiles + (size_t)t * tb;
    if (sd == SCAN_I8)
        s_tile_i8(nq, sq->n_pad, sq->qi + (size_t)h0 * sq->n_pad, sq->qscale + h0, tile,
                  row_scale + (size_t)t * SCORE_TILE, v);
    else
        s_tile_float(sd, nq, sq->n_dims, sq->qf + (size_t)h0 * sq->n_dims, sq->n_dims, tile, v);
    const int8_t *lane_row = sd == SCAN_BF16 ? s_lane_row_bf16 : s_lane_row_id;
    unsigned vmask = 0xffffu; /* lanes whose rows are valid */
    if (n_valid < SCORE_TILE) {
        vmask = 0;
        for (int i = 0; i < 16; i++)
            if (lane_row[i] < n_valid) vmask |= 1u << i;
    }
    if (out) {
        for (int h = 0; h < nq; h++) {
            float s[16];
            _mm256_storeu_ps(s, v[h][0]);
            _mm256_storeu_ps(s + 8, v[h][1]);
            float *o = out + (size_t)(h0 + h) * ld_out + (size_t)t * SCORE_TILE;
            for (int i = 0; i < 16; i++)
                if (lane_row[i] < n_valid) o[lane_row[i]] = s[i];
        }
        return;
    }
    /* One vector compare per 8 rows and head against the head's threshold, one branch per
     * tile for all nq heads: the inserts are rare. */
    unsigned m[S_NQ_MAX], any = 0;
    for (int h = 0; h < nq; h++) {
        const topk_acc *a = &acc[h0 + h];
        unsigned mh = 0xffffu;
        if (a->have_thr && a->thr.score == a->thr.score) {
            const __m256 th = _mm256_set1_ps(a->thr.score);
            mh = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(v[h][0], th, _CMP_GT_OQ)) |
                 (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(v[h][1], th, _CMP_GT_OQ)) << 8;
        }
        m[h] = mh & vmask;
        any |= m[h];
    }
    if (__builtin_expect(!any, 1)) return;
    for (int h = 0; h < nq; h++) {
        if (!m[h]) continue;
        float s[16];
        _mm256_storeu_ps(s, v[h][0]);
        _mm256_storeu_ps(s + 8, v[h][1]);
        s_tile_offer(&acc[h0 + h], s, lane_row, m[h], pos0 + t * SCORE_TILE);
    }
}

/* The tile loop for one score dtype SD (a constant after inlining, so the inner loops
 * carry no dtype branch). */
T_AVX2 static inline __attribute__((always_inline)) void
s_run_sd(int sd, const scan_q *sq, int n_rows, const void *tiles, const float *row_scale,
         float *out, int ld_out, int32_t pos0, topk_acc *acc)
{
    const int n_tiles = (n_rows + SCORE_TILE - 1) / SCORE_TILE;
    scan_q q = *sq;
    q.sd = sd;
    for (int t = 0; t < n_tiles; t++) {
        const int nv = n_rows - t * SCORE_TILE;
        int h = 0;
        for (; h + 4 <= q.n_q; h += 4)
            s_tile_avx2(&q, 4, h, t, nv, tiles, row_scale, out, ld_out, pos0, acc);
        for (; h + 2 <= q.n_q; h += 2)
            s_tile_avx2(&q, 2, h, t, nv, tiles, row_scale, out, ld_out, pos0, acc);
        for (; h < q.n_q; h++)
            s_tile_avx2(&q, 1, h, t, nv, tiles, row_scale, out, ld_out, pos0, acc);
    }
}

T_AVX2 static void s_run_f32(const scan_q *sq, int n, const void *t, const float *rs, float *out,
                             int ld, int32_t p0, topk_acc *acc)
{
    s_run_sd(SCAN_F32, sq, n, t, rs, out, ld, p0, acc);
}
T_AVX2 static void s_run_f16(const scan_q *sq, int n, const void *t, const float *rs, float *out,
                             int ld, int32_t p0, topk_acc *acc)
{
    s_run_sd(SCAN_F16, sq, n, t, rs, out, ld, p0, acc);
}
T_AVX2 static void s_run_bf16(const scan_q *sq, int n, const void *t, const float *rs, float *out,
                              int ld, int32_t p0, topk_acc *acc)
{
    s_run_sd(SCAN_BF16, sq, n, t, rs, out, ld, p0, acc);
}
/* The int8 scan proper, nq (1, 2; up to S_NQ_MAX) heads at a time over all the rows of a
 * call. Its cost was instructions, not multiplies or memory: the generic tile path kept the
 * scores of a tile in a stack array and loaded each head's threshold and reformatted its
 * mask for every tile. Here the accumulators are named (no register spills; with 4 heads at
 * once GCC spills, and 2 measured as fast or faster in an in-cache A/B), the thresholds stay
 * in registers between inserts, one branch per tile covers all nq heads, and scores reach
 * memory only to be inserted or stored (out != NULL). A second pair of heads re-reads a
 * call's rows (a 4096-row shard chunk) from L2. The integer sums are exact, so the scores
 * are the same bits as every other path's. */
T_AVX2 static inline __attribute__((always_inline)) void
s_i8_heads(int nq, const scan_q *sq, int h0, int n_rows, const int8_t *tiles,
           const float *row_scale, float *out, int ld_out, int32_t pos0, topk_acc *acc)
{
    const int n_pad = sq->n_pad, n2 = n_pad / 2, n_tiles = (n_rows + SCORE_TILE - 1) / SCORE_TILE;
    const size_t tb = (size_t)SCORE_TILE * (size_t)n_pad;
    const int16_t *qh[S_NQ_MAX];
    __m256 qs[S_NQ_MAX], th[S_NQ_MAX];
    for (int h = 0; h < nq; h++) {
        qh[h] = sq->qi + (size_t)(h0 + h) * n_pad;
        qs[h] = _mm256_set1_ps(sq->qscale[h0 + h]);
        th[h] = _mm256_setzero_ps();
    }
    /* Thresholds: a head without one (or with a NaN one) takes every row (force). */
    int force = 0;
#define S_I8_THR()                                                                                 \
    do {                                                                                           \
        force = 0;                                                                                 \
        for (int h = 0; h < nq; h++) {                                                             \
            const topk_acc *a_ = &acc[h0 + h];                                                     \
            const int f_ = !(a_->have_thr && a_->thr.score == a_->thr.score);                      \
            force |= f_;                                                                           \
            th[h] = _mm256_set1_ps(f_ ? 0.0f : a_->thr.score);                                     \
        }                                                                                          \
    } while (0)
    if (!out) S_I8_THR();
    for (int t = 0; t < n_tiles; t++) {
        const int8_t *p = tiles + (size_t)t * tb;
        const __m256i z = _mm256_setzero_si256();
        __m256i a00 = z, a01 = z, a10 = z, a11 = z, a20 = z, a21 = z, a30 = z, a31 = z;
        for (int c2 = 0; c2 < n2; c2++, p += 2 * SCORE_TILE) {
            const __m256i k0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)p));
            const __m256i k1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(p + 16)));
            int32_t w;
            memcpy(&w, qh[0] + 2 * c2, 4);
            __m256i b = _mm256_set1_epi32(w);
            a00 = _mm256_add_epi32(a00, _mm256_madd_epi16(k0, b));
            a01 = _mm256_add_epi32(a01, _mm256_madd_epi16(k1, b));
            if (nq > 1) {
                memcpy(&w, qh[1] + 2 * c2, 4);
                b = _mm256_set1_epi32(w);
                a10 = _mm256_add_epi32(a10, _mm256_madd_epi16(k0, b));
                a11 = _mm256_add_epi32(a11, _mm256_madd_epi16(k1, b));
            }
            if (nq > 2) {
                memcpy(&w, qh[2] + 2 * c2, 4);
                b = _mm256_set1_epi32(w);
                a20 = _mm256_add_epi32(a20, _mm256_madd_epi16(k0, b));
                a21 = _mm256_add_epi32(a21, _mm256_madd_epi16(k1, b));
                memcpy(&w, qh[3] + 2 * c2, 4);
                b = _mm256_set1_epi32(w);
                a30 = _mm256_add_epi32(a30, _mm256_madd_epi16(k0, b));
                a31 = _mm256_add_epi32(a31, _mm256_madd_epi16(k1, b));
            }
        }
        const float *ks = row_scale + (size_t)t * SCORE_TILE;
        const __m256 ks0 = _mm256_loadu_ps(ks), ks1 = _mm256_loadu_ps(ks + 8);
        const __m256i ai[S_NQ_MAX][2] = {{a00, a01}, {a10, a11}, {a20, a21}, {a30, a31}};
        __m256 f[S_NQ_MAX][2];
        for (int h = 0; h < nq; h++) {
            f[h][0] = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(ai[h][0]), qs[h]), ks0);
            f[h][1] = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(ai[h][1]), qs[h]), ks1);
        }
        const int nv = n_rows - t * SCORE_TILE;
        if (out) {
            for (int h = 0; h < nq; h++) {
                float *o = out + (size_t)(h0 + h) * ld_out + (size_t)t * SCORE_TILE;
                if (nv >= SCORE_TILE) {
                    _mm256_storeu_ps(o, f[h][0]);
                    _mm256_storeu_ps(o + 8, f[h][1]);
                } else {
                    float sc[16];
                    _mm256_storeu_ps(sc, f[h][0]);
                    _mm256_storeu_ps(sc + 8, f[h][1]);
                    memcpy(o, sc, (size_t)nv * sizeof(float));
                }
            }
            continue;
        }
        __m256 c = _mm256_setzero_ps();
        for (int h = 0; h < nq; h++)
            c = _mm256_or_ps(c, _mm256_or_ps(_mm256_cmp_ps(f[h][0], th[h], _CMP_GT_OQ),
                                             _mm256_cmp_ps(f[h][1], th[h], _CMP_GT_OQ)));
        if (__builtin_expect(!(force | _mm256_movemask_ps(c)), 1)) continue;
        const unsigned vmask = nv >= SCORE_TILE ? 0xffffu : (1u << nv) - 1u;
        for (int h = 0; h < nq; h++) {
            const topk_acc *a = &acc[h0 + h];
            unsigned m = 0xffffu;
            if (a->have_thr && a->thr.score == a->thr.score)
                m = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(f[h][0], th[h], _CMP_GT_OQ)) |
                    (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(f[h][1], th[h], _CMP_GT_OQ)) << 8;
            m &= vmask;
            if (!m) continue;
            float sc[16];
            _mm256_storeu_ps(sc, f[h][0]);
            _mm256_storeu_ps(sc + 8, f[h][1]);
            s_tile_offer(&acc[h0 + h], sc, s_lane_row_id, m, pos0 + t * SCORE_TILE);
        }
        S_I8_THR();
    }
#undef S_I8_THR
}

T_AVX2 static void s_run_i8(const scan_q *sq, int n, const void *t, const float *rs, float *out,
                            int ld, int32_t p0, topk_acc *acc)
{
    int h = 0;
    for (; h + 2 <= sq->n_q; h += 2) s_i8_heads(2, sq, h, n, t, rs, out, ld, p0, acc);
    if (h < sq->n_q) s_i8_heads(1, sq, h, n, t, rs, out, ld, p0, acc);
}

static void s_run_avx2(const scan_q *sq, int n_rows, const void *tiles, const float *row_scale,
                       float *out, int ld_out, int32_t pos0, topk_acc *acc)
{
    switch (sq->sd) {
    case SCAN_F32:
        s_run_f32(sq, n_rows, tiles, row_scale, out, ld_out, pos0, acc);
        return;
    case SCAN_F16:
        s_run_f16(sq, n_rows, tiles, row_scale, out, ld_out, pos0, acc);
        return;
    case SCAN_BF16:
        s_run_bf16(sq, n_rows, tiles, row_scale, out, ld_out, pos0, acc);
        return;
    default:
        s_run_i8(sq, n_rows, tiles, row_scale, out, ld_out, pos0, acc);
        return;
    }
}

/* ---- AVX-512 ----
 * One 16-row tile's dim is one 16-lane vector (f32: 64 bytes; f16: 32 bytes through
 * vcvtph2ps; bf16: 32 bytes zero-extended to 32 bits and shifted up; int8: one dim pair of
 * the 16 rows, 32 bytes sign-extended to int16), so lane l is row l for every dtype (no lane
 * map). Two tiles (32 rows) run at once for up to 4 heads: 8 independent accumulators, one
 * FMA (or vpdpwssd) chain per head, tile and lane in dim order, as the other paths. int8 uses
 * vpdpwssd (AVX512-VNNI): the int32 sum of the two int16 products of a lane pair added to
 * the accumulator, the same exact integer sum as vpmaddwd + vpaddd (scan.h bounds it), then
 * the same two f32 scalings; without VNNI (or AVX512BW) int8 runs the AVX2 kernel. */

#define T_AVX512 __attribute__((target("avx512f,avx2,fma,f16c")))
#define T_AVX512I8 __attribute__((target("avx512f,avx512bw,avx512vnni,avx2,fma,f16c")))

/* Scores of nt (1, 2) consecutive tiles from tile (nq heads from h0) into v[h][tt]. */
T_AVX512 static inline __attribute__((always_inline)) void s512_float(int sd, int nq, int nt,
                                                                      int nd, const float *q,
                                                                      int ld_q, const void *tile0,
                                                                      size_t tb, __m512 v[][2])
{
    __m512 r[S_NQ_MAX][2];
    for (int h = 0; h < nq; h++) r[h][0] = r[h][1] = _mm512_setzero_ps();
    for (int c = 0; c < nd; c++) {
        __m512 k[2];
        for (int tt = 0; tt < nt; tt++) {
            const char *tp = (const char *)tile0 + (size_t)tt * tb;
            if (sd == SCAN_F32)
                k[tt] = _mm512_loadu_ps((const float *)tp + (size_t)c * SCORE_TILE);
            else if (sd == SCAN_F16)
                k[tt] = _mm512_cvtph_ps(_mm256_loadu_si256(
                    (const __m256i *)((const uint16_t *)tp + (size_t)c * SCORE_TILE)));
            else
                k[tt] = _mm512_castsi512_ps(_mm512_slli_epi32(
                    _mm512_cvtepu16_epi32(_mm256_loadu_si256(
                        (const __m256i *)((const uint16_t *)tp + (size_t)c * SCORE_TILE))),
                    16));
        }
        for (int h = 0; h < nq; h++) {
            const __m512 qb = _mm512_set1_ps(q[(size_t)h * ld_q + c]);
            for (int tt = 0; tt < nt; tt++) r[h][tt] = _mm512_fmadd_ps(qb, k[tt], r[h][tt]);
        }
    }
    for (int h = 0; h < nq; h++)
        for (int tt = 0; tt < nt; tt++) v[h][tt] = r[h][tt];
}

T_AVX512I8 static inline __attribute__((always_inline)) void
s512_i8(int nq, int nt, int n_pad, const int16_t *qi, const float *qscale, const void *tile0,
        size_t tb, const float *kscale, __m512 v[][2])
{
    __m512i a[S_NQ_MAX][2];
    for (int h = 0; h < nq; h++) a[h][0] = a[h][1] = _mm512_setzero_si512();
    const int n2 = n_pad / 2;
    for (int c2 = 0; c2 < n2; c2++) {
        __m512i k[2];
        for (int tt = 0; tt < nt; tt++)
            k[tt] = _mm512_cvtepi8_epi16(
                _mm256_loadu_si256((const __m256i *)((const int8_t *)tile0 + (size_t)tt * tb +
                                                     (size_t)c2 * 2 * SCORE_TILE)));
        for (int h = 0; h < nq; h++) {
            int32_t w;
            memcpy(&w, qi + (size_t)h * n_pad + 2 * c2, 4);
            const __m512i b = _mm512_set1_epi32(w);
            for (int tt = 0; tt < nt; tt++) a[h][tt] = _mm512_dpwssd_epi32(a[h][tt], k[tt], b);
        }
    }
    for (int tt = 0; tt < nt; tt++) {
        const __m512 ks = _mm512_loadu_ps(kscale + (size_t)tt * SCORE_TILE);
        for (int h = 0; h < nq; h++)
            v[h][tt] = _mm512_mul_ps(
                _mm512_mul_ps(_mm512_cvtepi32_ps(a[h][tt]), _mm512_set1_ps(qscale[h])), ks);
    }
}

/* The inserts of one tile and head on the AVX-512 path (lane l is row l): the rows of mask,
 * trimmed first when lim are held (then checked again against the new threshold), stored
 * at once in ascending row order by two compressions of (score, position) pairs; a buffer
 * without room for 16 more takes them one at a time (s_tile_offer). Rows that no longer beat
 * a threshold raised within the tile may go in: the next trim drops them. */
T_AVX512 __attribute__((noinline)) static void s512_offer(topk_acc *a, __m512 s, unsigned mask,
                                                          int32_t p0)
{
    if (a->cap - a->n < 2 * SCORE_TILE || a->lim >= a->cap) {
        float sc[16];
        _mm512_storeu_ps(sc, s);
        s_tile_offer(a, sc, s_lane_row_id, mask, p0);
        return;
    }
    if (a->n >= a->lim) {
        topk_acc_trim(a);
        if (a->thr.score == a->thr.score)
            mask &= (unsigned)_mm512_cmp_ps_mask(s, _mm512_set1_ps(a->thr.score), _CMP_GT_OQ);
    }
    const __m512i pos =
        _mm512_add_epi32(_mm512_set1_epi32(p0),
                         _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    const __m512i il = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i ih =
        _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    const __m512i si = _mm512_castps_si512(s);
    const __mmask8 m0 = (__mmask8)(mask & 0xffu), m1 = (__mmask8)(mask >> 8);
    const int c0 = __builtin_popcount(m0), c1 = __builtin_popcount(m1);
    topk_cand *it = a->items + a->n;
    _mm512_mask_storeu_epi64(
        (void *)it, (__mmask8)((1u << c0) - 1u),
        _mm512_maskz_compress_epi64(m0, _mm512_permutex2var_epi32(si, il, pos)));
    _mm512_mask_storeu_epi64(
        (void *)(it + c0), (__mmask8)((1u << c1) - 1u),
        _mm512_maskz_compress_epi64(m1, _mm512_permutex2var_epi32(si, ih, pos)));
    a->n += c0 + c1;
}

/* nt tiles from tile t for nq heads from h0: scores to out, or the fused offers to acc.
 * n_valid: rows of the call from tile t's first row on. */
#define S512_TILE_BODY(COMPUTE)                                                                    \
    do {                                                                                           \
        __m512 v[S_NQ_MAX][2];                                                                     \
        COMPUTE;                                                                                   \
        __mmask16 vm[2];                                                                           \
        for (int tt = 0; tt < nt; tt++) {                                                          \
            const int nv = n_valid - tt * SCORE_TILE;                                              \
            vm[tt] = nv >= SCORE_TILE ? (__mmask16)0xffffu : (__mmask16)((1u << nv) - 1u);         \
        }                                                                                          \
        if (out) {                                                                                 \
            for (int h = 0; h < nq; h++)                                                           \
                for (int tt = 0; tt < nt; tt++)                                                    \
                    _mm512_mask_storeu_ps(out + (size_t)(h0 + h) * ld_out +                        \
                                              (size_t)(t + tt) * SCORE_TILE,                       \
                                          vm[tt], v[h][tt]);                                       \
            return;                                                                                \
        }                                                                                          \
        unsigned m[S_NQ_MAX][2], any = 0;                                                          \
        for (int h = 0; h < nq; h++) {                                                             \
            const topk_acc *a = &acc[h0 + h];                                                      \
            const int thr = a->have_thr && a->thr.score == a->thr.score;                           \
            const __m512 th = _mm512_set1_ps(thr ? a->thr.score : 0.0f);                           \
            for (int tt = 0; tt < nt; tt++) {                                                      \
                m[h][tt] =                                                                         \
                    (unsigned)(thr ? _mm512_mask_cmp_ps_mask(vm[tt], v[h][tt], th, _CMP_GT_OQ)     \
                                   : vm[tt]);                                                      \
                any |= m[h][tt];                                                                   \
            }                                                                                      \
        }                                                                                          \
        if (__builtin_expect(!any, 1)) return;                                                     \
        for (int h = 0; h < nq; h++)                                                               \
            for (int tt = 0; tt < nt; tt++) {                                                      \
                if (!m[h][tt]) continue;                                                           \
                s512_offer(&acc[h0 + h], v[h][tt], m[h][tt], pos0 + (t + tt) * SCORE_TILE);        \
            }                                                                                      \
    } while (0)

T_AVX512 static inline __attribute__((always_inline)) void
s512_tiles_float(int sd, const scan_q *sq, int nq, int nt, int h0, int t, int n_valid,
                 const void *tiles, float *out, int ld_out, int32_t pos0, topk_acc *acc)
{
    const size_t tb = (size_t)SCORE_TILE * (size_t)sq->n_dims * (sd == SCAN_F32 ? 4 : 2);
    S512_TILE_BODY(s512_float(sd, nq, nt, sq->n_dims, sq->qf + (size_t)h0 * sq->n_dims, sq->n_dims,
                              (const char *)tiles + (size_t)t * tb, tb, v));
}

T_AVX512I8 static inline __attribute__((always_inline)) void
s512_tiles_i8(const scan_q *sq, int nq, int nt, int h0, int t, int n_valid, const void *tiles,
              const float *row_scale, float *out, int ld_out, int32_t pos0, topk_acc *acc)
{
    const size_t tb = (size_t)SCORE_TILE * (size_t)sq->n_pad;
    S512_TILE_BODY(s512_i8(nq, nt, sq->n_pad, sq->qi + (size_t)h0 * sq->n_pad, sq->qscale + h0,
                           (const char *)tiles + (size_t)t * tb, tb,
                           row_scale + (size_t)t * SCORE_TILE, v));
}
#undef S512_TILE_BODY

/* The tile loop of the AVX-512 path: pairs of tiles (a last odd tile alone), each for the
 * heads 4, then 2, then 1 at a time; SD and the group sizes are constants after inlining. */
/* Software prefetch distance of the AVX-512 scan: with two tiles at once and no prefetch the
 * scan streamed from memory at half the AVX2 kernels' rate (the hardware prefetcher kept up
 * with neither stream); 8 KiB ahead measured best of 2, 4, 8, 12 and 16 KiB (2M rows of 32
 * dims, 4096-row calls). Only lines inside the call's tiles are prefetched. */
#define S512_PF 8192
#define S512_LOOP(CALL)                                                                            \
    do {                                                                                           \
        const int n_tiles = (n_rows + SCORE_TILE - 1) / SCORE_TILE;                                \
        const size_t tb_ = scan_tile_bytes(sq->sd, sq->n_dims), end_ = (size_t)n_tiles * tb_;      \
        for (int t = 0; t < n_tiles; t += 2) {                                                     \
            const int nv = n_rows - t * SCORE_TILE;                                                \
            const size_t pf_ = (size_t)t * tb_ + S512_PF;                                          \
            const size_t pe_ = pf_ + 2 * tb_ < end_ ? pf_ + 2 * tb_ : end_;                        \
            for (size_t b_ = pf_; b_ < pe_; b_ += 64)                                              \
                _mm_prefetch((const char *)tiles + b_, _MM_HINT_T0);                               \
            int h = 0;                                                                             \
            if (t + 1 < n_tiles) {                                                                 \
                for (; h + 4 <= sq->n_q; h += 4) CALL(4, 2);                                       \
                for (; h + 2 <= sq->n_q; h += 2) CALL(2, 2);                                       \
                for (; h < sq->n_q; h++) CALL(1, 2);                                               \
            } else {                                                                               \
                for (; h + 4 <= sq->n_q; h += 4) CALL(4, 1);                                       \
                for (; h + 2 <= sq->n_q; h += 2) CALL(2, 1);                                       \
                for (; h < sq->n_q; h++) CALL(1, 1);                                               \
            }                                                                                      \
        }                                                                                          \
    } while (0)

T_AVX512 static inline __attribute__((always_inline)) void
s512_run_float(int sd, const scan_q *sq, int n_rows, const void *tiles, float *out, int ld_out,
               int32_t pos0, topk_acc *acc)
{
#define S512_CALL_F(NQ, NT)                                                                        \
    s512_tiles_float(sd, sq, NQ, NT, h, t, nv, tiles, out, ld_out, pos0, acc)
    S512_LOOP(S512_CALL_F);
#undef S512_CALL_F
}

T_AVX512 static void s512_run_f32(const scan_q *sq, int n, const void *t, float *out, int ld,
                                  int32_t p0, topk_acc *acc)
{
    s512_run_float(SCAN_F32, sq, n, t, out, ld, p0, acc);
}
T_AVX512 static void s512_run_f16(const scan_q *sq, int n, const void *t, float *out, int ld,
                                  int32_t p0, topk_acc *acc)
{
    s512_run_float(SCAN_F16, sq, n, t, out, ld, p0, acc);
}
T_AVX512 static void s512_run_bf16(const scan_q *sq, int n, const void *t, float *out, int ld,
                                   int32_t p0, topk_acc *acc)
{
    s512_run_float(SCAN_BF16, sq, n, t, out, ld, p0, acc);
}

T_AVX512I8 static void s512_run_i8(const scan_q *sq, int n_rows, const void *tiles,
                                   const float *row_scale, float *out, int ld_out, int32_t pos0,
                                   topk_acc *acc)
{
#define S512_CALL_I(NQ, NT)                                                                        \
    s512_tiles_i8(sq, NQ, NT, h, t, nv, tiles, row_scale, out, ld_out, pos0, acc)
    S512_LOOP(S512_CALL_I);
#undef S512_CALL_I
}
#undef S512_LOOP

/* 1 when the CPU has what the AVX-512 int8 kernel needs besides AVX-512F. */
static int s_has_i8_512(void)
{
    static int have = -1;
    int h = __atomic_load_n(&have, __ATOMIC_RELAXED);
    if (h < 0) {
        __builtin_cpu_init();
        h = __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni");
        __atomic_store_n(&have, h, __ATOMIC_RELAXED);
    }
    return h;
}

static void s_run_avx512(const scan_q *sq, int n_rows, const void *tiles, const float *row_scale,
                         float *out, int ld_out, int32_t pos0, topk_acc *acc)
{
    switch (sq->sd) {
    case SCAN_F32:
        s512_run_f32(sq, n_rows, tiles, out, ld_out, pos0, acc);
        return;
    case SCAN_F16:
        s512_run_f16(sq, n_rows, tiles, out, ld_out, pos0, acc);
        return;
    case SCAN_BF16:
        s512_run_bf16(sq, n_rows, tiles, out, ld_out, pos0, acc);
        return;
    default:
        if (s_has_i8_512())
            s512_run_i8(sq, n_rows, tiles, row_scale, out, ld_out, pos0, acc);
        else
            s_run_avx2(sq, n_rows, tiles, row_scale, out, ld_out, pos0, acc);
        return;
    }
}
#endif

/* The path of a scan: path where the CPU has it; for SIMD_AUTO (or a path it lacks) the
 * path FASA_SIMD named (simd_path_named), else AVX-512 where the CPU has it (about twice
 * the AVX2 kernels' rate in cache on AVX-512 CPUs with full-width units; the scores are the
 * same bits), else simd_path_default. */
static int s_path(int path)
{
    if (path >= 0 && path <= SIMD_PATH_LAST && simd_path_supported((simd_path)path)) return path;
    const int named = simd_path_named();
    if (named >= 0) return named;
    return simd_path_supported(SIMD_AVX512) ? SIMD_AVX512 : (int)simd_path_default();
}

int scan_path(void)
{
#if SCAN_X86
    return s_path(SIMD_AUTO);
#else
    return SIMD_PORTABLE;
#endif
}

void scan_prefetch(const void *tiles, size_t bytes)
{
#if SCAN_X86
    for (size_t b = 0; b < bytes; b += 64) _mm_prefetch((const char *)tiles + b, _MM_HINT_T1);
#else
    (void)tiles, (void)bytes;
#endif
}

void scan_scores(int path, const scan_q *sq, int n_rows, const void *tiles, const float *row_scale,
                 float *out, int ld_out)
{
    if (n_rows <= 0) return;
#if SCAN_X86
    const int p = s_path(path);
    if (p == SIMD_AVX512) {
        s_run_avx512(sq, n_rows, tiles, row_scale, out, ld_out, 0, NULL);
        return;
    }
    if (p != SIMD_PORTABLE) {
        s_run_avx2(sq, n_rows, tiles, row_scale, out, ld_out, 0, NULL);
        return;
    }
#else
    (void)path;
#endif
    s_scores_port(sq, n_rows, tiles, row_scale, out, ld_out);
}

void scan_topk(int path, const scan_q *sq, int n_rows, const void *tiles, const float *row_scale,
               int32_t pos0, topk_acc *acc)
{
    if (n_rows <= 0 || (sq->n_q > 0 && acc[0].k <= 0)) return;
#if SCAN_X86
    const int p = s_path(path);
    if (p == SIMD_AVX512) {
        s_run_avx512(sq, n_rows, tiles, row_scale, NULL, 0, pos0, acc);
        return;
    }
    if (p != SIMD_PORTABLE) {
        s_run_avx2(sq, n_rows, tiles, row_scale, NULL, 0, pos0, acc);
        return;
    }
#else
    (void)path;
#endif
    s_topk_port(sq, n_rows, tiles, row_scale, pos0, acc);
}

/* Storage dtype conversions and the f16/bf16 tile scan, one implementation per SIMD path
 * (simd.h). The tile scans multiply and add in the same order as score_tiles (one f32
 * multiply, then one f32 add, per dim, in dim order, no FMA), so an f16/bf16 scan gives
 * bit for bit the scores score_tiles gives on the converted keys, on every path. */
#include "simd.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "score.h"

#if defined(__x86_64__) && defined(__GNUC__)
#define FASA_X86 1
#include <cpuid.h>
#include <immintrin.h>
#define T_AVX2 __attribute__((target("avx2,fma,f16c")))
#define T_AVX512 __attribute__((target("avx512f,avx2,fma,f16c")))
#else
#define FASA_X86 0
#endif

const char *simd_path_name(int path)
{
    static const char *const names[] = {"portable", "avx2", "avx512"};
    return path >= 0 && path <= SIMD_PATH_LAST ? names[path] : NULL;
}

#if FASA_X86
/* F16C from CPUID leaf 1 (ECX bit 29): clang's __builtin_cpu_supports does not know "f16c". */
static int s_has_f16c(void)
{
    unsigned a, b, c, d;
    return __get_cpuid(1, &a, &b, &c, &d) && (c & (1u << 29));
}
#endif

/* Bit p: path p runs on this CPU; -1 until first asked. CPUID is asked once: under a
 * hypervisor each CPUID traps, and the conversions check their path on every call. */
static int s_supported = -1;

static int s_probe(void)
{
    int mask = 1 << SIMD_PORTABLE;
#if FASA_X86
    __builtin_cpu_init();
    const int avx2 =
        __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && s_has_f16c();
    if (avx2) mask |= 1 << SIMD_AVX2;
    if (avx2 && __builtin_cpu_supports("avx512f")) mask |= 1 << SIMD_AVX512;
#endif
    return mask;
}

int simd_path_supported(simd_path path)
{
    int mask = __atomic_load_n(&s_supported, __ATOMIC_RELAXED);
    if (mask < 0) {
        mask = s_probe(); /* the same answer on every thread: a race only repeats it */
        __atomic_store_n(&s_supported, mask, __ATOMIC_RELAXED);
    }
    return (int)path >= 0 && (int)path <= SIMD_PATH_LAST && ((mask >> (int)path) & 1);
}

const char *simd_cpu_features(void)
{
    static char buf[160];
#if FASA_X86
    unsigned a, b, c, d, b7 = 0, c7 = 0, d7 = 0, a71 = 0;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return "none";
    const unsigned c1 = c;
    if (__get_cpuid_max(0, NULL) >= 7) {
        __cpuid_count(7, 0, a, b7, c7, d7);
        __cpuid_count(7, 1, a71, b, c, d);
    }
    const struct {
        const char *name;
        int on;
    } f[] = {{"sse4.2", !!(c1 & (1u << 20))},      {"avx2", !!(b7 & (1u << 5))},
             {"fma", !!(c1 & (1u << 12))},         {"f16c", !!(c1 & (1u << 29))},
             {"avx512f", !!(b7 & (1u << 16))},     {"avx512bw", !!(b7 & (1u << 30))},
             {"avx512_vnni", !!(c7 & (1u << 11))}, {"avx512_fp16", !!(d7 & (1u << 23))},
             {"avx_vnni", !!(a71 & (1u << 4))}};
    size_t n = 0;
    buf[0] = 0;
    for (size_t i = 0; i < sizeof(f) / sizeof(*f); i++)
        if (f[i].on)
            n += (size_t)snprintf(buf + n, sizeof(buf) - n, "%s%s", n ? " " : "", f[i].name);
    return n ? buf : "none";
#else
    (void)buf;
    return "none";
#endif
}

static int s_chosen = -1, s_named = -1;

static simd_path s_best(void)
{
    /* AVX2 first: on the development machine AVX-512 was never faster for the conversions
     * and the f16/bf16 scan, and in loaded runs up to 1.5x slower (bench_kernels);
     * AVX-512 is there to be forced and compared. */
    return simd_path_supported(SIMD_AVX2) ? SIMD_AVX2 : SIMD_PORTABLE;
}

simd_path simd_path_default(void)
{
    const int p = __atomic_load_n(&s_chosen, __ATOMIC_RELAXED);
    return p >= 0 ? (simd_path)p : s_best();
}

int simd_path_choose(const char *name)
{
    int want = s_best(), rc = 0;
    if (name && *name) {
        int named = -1;
        for (int i = 0; i <= SIMD_PATH_LAST; i++)
            if (!strcmp(name, simd_path_name(i))) named = i;
        if (named < 0)
            rc = -1;
        else if (!simd_path_supported((simd_path)named))
            rc = -2;
        else
            want = named;
    }
    __atomic_store_n(&s_chosen, want, __ATOMIC_RELAXED);
    __atomic_store_n(&s_named, name && *name && !rc ? want : -1, __ATOMIC_RELAXED);
    return rc;
}

int simd_path_named(void)
{
    return __atomic_load_n(&s_named, __ATOMIC_RELAXED);
}

static int s_path(int path)
{
    return path < 0 || path > SIMD_PATH_LAST || !simd_path_supported((simd_path)path)
               ? (int)simd_path_default()
               : path;
}

/* ---- scalar reference conversions ---- */

static uint32_t s_bits(float x)
{
    uint32_t b;
    memcpy(&b, &x, 4);
    return b;
}

static float s_float(uint32_t b)
{
    float x;
    memcpy(&x, &b, 4);
    return x;
}

uint16_t fasa_f32_to_f16(float x)
{
    const uint32_t b = s_bits(x), a = b & 0x7fffffffu;
    const uint16_t sign = (uint16_t)((b >> 16) & 0x8000u);
    if (a > 0x7f800000u) return sign | 0x7e00u | (uint16_t)((a >> 13) & 0x3ffu); /* quiet NaN */
    if (a >= 0x477ff000u) return sign | 0x7c00u; /* >= 65520 rounds to inf */
    if (a >= 0x38800000u) {                      /* normal: rebias, round the 13 dropped bits */
        uint32_t r = a - 0x38000000u;
        r += 0xfffu + ((r >> 13) & 1u);
        return sign | (uint16_t)(r >> 13);
    }
    if (a < 0x33000000u) return sign; /* below 2^-25: rounds to zero */
    /* Subnormal: the value in units of 2^-24 is m >> s, rounded to nearest even. */
    const uint32_t e = a >> 23, m = (a & 0x7fffffu) | 0x800000u, s = 126u - e;
    uint32_t r = m >> s;
    const uint32_t rem = m & ((1u << s) - 1u), half = 1u << (s - 1u);
    if (rem > half || (rem == half && (r & 1u))) r++;
    return sign | (uint16_t)r;
}

float fasa_f16_to_f32(uint16_t h)
{
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0) {
        const float f = (float)m * 0x1p-24f; /* zero or subnormal, exact */
        return sign ? -f : f;
    }
    if (e == 31) return s_float(sign | 0x7f800000u | (m << 13));
    return s_float(sign | ((e + 112u) << 23) | (m << 13));
}

uint16_t fasa_f32_to_bf16(float x)
{
    const uint32_t b = s_bits(x);
    if ((b & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((b >> 16) | 0x40u); /* quiet NaN */
    return (uint16_t)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

float fasa_bf16_to_f32(uint16_t h)
{
    return s_float((uint32_t)h << 16);
}

int fasa_dtype_overflows(int dtype, float x)
{
    if (dtype == FASA_DTYPE_F16) return (fasa_f32_to_f16(x) & 0x7fffu) == 0x7c00u;
    if (dtype == FASA_DTYPE_BF16) return (fasa_f32_to_bf16(x) & 0x7fffu) == 0x7f80u;
    return 0;
}

static void s_from_port(int dtype, size_t i, size_t n, const float *src, uint16_t *d)
{
    if (dtype == FASA_DTYPE_F16)
        for (; i < n; i++) d[i] = fasa_f32_to_f16(src[i]);
    else
        for (; i < n; i++) d[i] = fasa_f32_to_bf16(src[i]);
}

/* f16 -> f32 without branches, so that the loop vectorises: move exponent and mantissa
 * into place and rebias; inf/NaN get the rest of the exponent, and zero/subnormals are
 * renormalised by subtracting 2^-14 (exact). Bit-identical to fasa_f16_to_f32 (the
 * kernels test checks all 65536 patterns). */
static inline float s_f16_fast(uint16_t h)
{
    const uint32_t shifted_exp = 0x7c00u << 13;
    uint32_t o = (uint32_t)(h & 0x7fffu) << 13;
    const uint32_t exp = o & shifted_exp;
    o += (127u - 15u) << 23;
    o += exp == shifted_exp ? (128u - 16u) << 23 : 0u;
    const uint32_t sub = exp == 0 ? 1u : 0u;
    o += sub << 23;
    float f = s_float(o) - (sub ? 0x1p-14f : 0.0f);
    return s_float(s_bits(f) | ((uint32_t)(h & 0x8000u) << 16));
}

static void s_to_port(int dtype, size_t i, size_t n, const uint16_t *s, float *dst)
{
    if (dtype == FASA_DTYPE_F16)
        for (; i < n; i++) dst[i] = s_f16_fast(s[i]);
    else
        for (; i < n; i++) dst[i] = s_float((uint32_t)s[i] << 16);
}

/* ---- SIMD conversions ---- */

#if FASA_X86
T_AVX2 static inline __m256 s_ld8(int dtype, const uint16_t *p)
{
    const __m128i w = _mm_loadu_si128((const __m128i *)p);
    if (dtype == FASA_DTYPE_F16) return _mm256_cvtph_ps(w);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(w), 16));
}

T_AVX512 static inline __m512 s_ld16(int dtype, const uint16_t *p)
{
    const __m256i w = _mm256_loadu_si256((const __m256i *)p);
    if (dtype == FASA_DTYPE_F16) return _mm512_cvtph_ps(w);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(w), 16));
}

T_AVX2 static void s_to_avx2(int dtype, size_t n, const uint16_t *s, float *d)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(d + i, s_ld8(dtype, s + i));
    s_to_port(dtype, i, n, s, d);
}

T_AVX512 static void s_to_avx512(int dtype, size_t n, const uint16_t *s, float *d)
{
    size_t i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(d + i, s_ld16(dtype, s + i));
    s_to_port(dtype, i, n, s, d);
}

T_AVX2 static void s_from_avx2(int dtype, size_t n, const float *s, uint16_t *d)
{
    size_t i = 0;
    if (dtype == FASA_DTYPE_F16) {
        for (; i + 8 <= n; i += 8)
            _mm_storeu_si128((__m128i *)(d + i),
                             _mm256_cvtps_ph(_mm256_loadu_ps(s + i),
                                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    } else {
        const __m256i one = _mm256_set1_epi32(1), bias = _mm256_set1_epi32(0x7fff),
                      qnan = _mm256_set1_epi32(0x40);
        for (; i + 8 <= n; i += 8) {
            const __m256 x = _mm256_loadu_ps(s + i);
            const __m256i b = _mm256_castps_si256(x);
            const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), one);
            __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(b, bias), lsb), 16);
            const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
            r = _mm256_blendv_epi8(r, _mm256_or_si256(_mm256_srli_epi32(b, 16), qnan), nan);
            const __m256i pk = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
            _mm_storeu_si128((__m128i *)(d + i), _mm256_castsi256_si128(pk));
        }
    }
    s_from_port(dtype, i, n, s, d);
}

T_AVX512 static void s_from_avx512(int dtype, size_t n, const float *s, uint16_t *d)
{
    size_t i = 0;
    if (dtype == FASA_DTYPE_F16) {
        for (; i + 16 <= n; i += 16)
            _mm256_storeu_si256((__m256i *)(d + i),
                                _mm512_cvtps_ph(_mm512_loadu_ps(s + i),
                                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    } else {
        const __m512i one = _mm512_set1_epi32(1), bias = _mm512_set1_epi32(0x7fff),
                      qnan = _mm512_set1_epi32(0x40);
        for (; i + 16 <= n; i += 16) {
            const __m512 x = _mm512_loadu_ps(s + i);
            const __m512i b = _mm512_castps_si512(x);
            const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), one);
            __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(b, bias), lsb), 16);
            const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
            r = _mm512_mask_blend_epi32(nan, r, _mm512_or_si512(_mm512_srli_epi32(b, 16), qnan));
            _mm256_storeu_si256((__m256i *)(d + i), _mm512_cvtepi32_epi16(r));
        }
    }
    s_from_port(dtype, i, n, s, d);
}
#endif

void dtype_from_f32(int path, int dtype, size_t n, const float *src, void *dst)
{
    if (dtype == FASA_DTYPE_F32) {
        memcpy(dst, src, n * sizeof(float));
        return;
    }
    switch (s_path(path)) {
#if FASA_X86
    case SIMD_AVX512:
        s_from_avx512(dtype, n, src, dst);
        return;
    case SIMD_AVX2:
        s_from_avx2(dtype, n, src, dst);
        return;
#endif
    default:
        s_from_port(dtype, 0, n, src, dst);
        return;
    }
}

void dtype_to_f32(int path, int dtype, size_t n, const void *src, float *dst)
{
    if (dtype == FASA_DTYPE_F32) {
        memcpy(dst, src, n * sizeof(float));
        return;
    }
    switch (s_path(path)) {
#if FASA_X86
    case SIMD_AVX512:
        s_to_avx512(dtype, n, src, dst);
        return;
    case SIMD_AVX2:
        s_to_avx2(dtype, n, src, dst);
        return;
#endif
    default:
        s_to_port(dtype, 0, n, src, dst);
        return;
    }
}

/* ---- the tile scan over f16/bf16 keys ---- */

/* Portable: each tile converted once into f32 and scored by score_tiles (plain C, so the
 * same multiplies and adds); tiles of more than S_PORT_DIMS dims go a dim row at a time. */
#define S_PORT_DIMS 256
static void s_tiles_port(int dtype, int n_tiles, int n_dims, int n_q, float *restrict out,
                         int ld_out, const float *restrict q, const uint16_t *restrict tiles)
{
    float kf[SCORE_TILE], acc[4][SCORE_TILE];
    if (n_dims <= S_PORT_DIMS) {
        float tf[S_PORT_DIMS * SCORE_TILE];
        for (int t = 0; t < n_tiles; t++) {
            s_to_port(dtype, 0, (size_t)n_dims * SCORE_TILE,
                      tiles + (size_t)t * n_dims * SCORE_TILE, tf);
            score_tiles(1, n_dims, n_q, out + (size_t)t * SCORE_TILE, ld_out, q, tf);
        }
        return;
    }
    for (int t = 0; t < n_tiles; t++) {
        const uint16_t *tile = tiles + (size_t)t * n_dims * SCORE_TILE;
        for (int h = 0; h < n_q; h += 4) {
            const int nq = n_q - h < 4 ? n_q - h : 4;
            memset(acc, 0, sizeof(acc));
            for (int c = 0; c < n_dims; c++) {
                s_to_port(dtype, 0, SCORE_TILE, tile + (size_t)c * SCORE_TILE, kf);
                for (int i = 0; i < nq; i++) {
                    const float qc = q[(size_t)(h + i) * n_dims + c];
                    for (int l = 0; l < SCORE_TILE; l++) acc[i][l] += qc * kf[l];
                }
            }
            for (int i = 0; i < nq; i++)
                memcpy(out + (size_t)(h + i) * ld_out + (size_t)t * SCORE_TILE, acc[i],
                       sizeof(acc[i]));
        }
    }
}

#if FASA_X86
/* NT consecutive tiles against NQ heads (constants once inlined, so the NT x NQ
 * accumulators stay in registers). Several tiles at once give the adds independent chains
 * when there are few heads: one chain per tile row and head, at most 8 live. Every row
 * is still summed in dim order, so the scores do not depend on NT.
 * AVX2: a tile row is two 8-lane halves. */
T_AVX2 static inline __attribute__((always_inline)) void
s_tile8(int dtype, int nt, int nq, int n_dims, const float *restrict qh,
        const uint16_t *restrict tile, float *restrict o, int ld_out)
{
    const size_t ts = (size_t)n_dims * SCORE_TILE;
    __m256 a0[4][4], a1[4][4];
    for (int t = 0; t < nt; t++)
        for (int i = 0; i < nq; i++) a0[t][i] = a1[t][i] = _mm256_setzero_ps();
    for (int c = 0; c < n_dims; c++)
        for (int t = 0; t < nt; t++) {
            const uint16_t *p = tile + t * ts + (size_t)c * SCORE_TILE;
            const __m256 k0 = s_ld8(dtype, p), k1 = s_ld8(dtype, p + 8);
            for (int i = 0; i < nq; i++) {
                const __m256 qc = _mm256_set1_ps(qh[(size_t)i * n_dims + c]);
                a0[t][i] = _mm256_add_ps(a0[t][i], _mm256_mul_ps(qc, k0));
                a1[t][i] = _mm256_add_ps(a1[t][i], _mm256_mul_ps(qc, k1));
            }
        }
    for (int t = 0; t < nt; t++)
        for (int i = 0; i < nq; i++) {
            _mm256_storeu_ps(o + (size_t)i * ld_out + t * SCORE_TILE, a0[t][i]);
            _mm256_storeu_ps(o + (size_t)i * ld_out + t * SCORE_TILE + 8, a1[t][i]);
        }
}

/* AVX-512: a tile row is one register. */
T_AVX512 static inline __attribute__((always_inline)) void
s_tile16(int dtype, int nt, int nq, int n_dims, const float *restrict qh,
         const uint16_t *restrict tile, float *restrict o, int ld_out)
{
    const size_t ts = (size_t)n_dims * SCORE_TILE;
    __m512 a[4][8];
    for (int t = 0; t < nt; t++)
        for (int i = 0; i < nq; i++) a[t][i] = _mm512_setzero_ps();
    for (int c = 0; c < n_dims; c++)
        for (int t = 0; t < nt; t++) {
            const __m512 k = s_ld16(dtype, tile + t * ts + (size_t)c * SCORE_TILE);
            for (int i = 0; i < nq; i++)
                a[t][i] = _mm512_add_ps(
                    a[t][i], _mm512_mul_ps(_mm512_set1_ps(qh[(size_t)i * n_dims + c]), k));
        }
    for (int t = 0; t < nt; t++)
        for (int i = 0; i < nq; i++)
            _mm512_storeu_ps(o + (size_t)i * ld_out + t * SCORE_TILE, a[t][i]);
}

/* Tiles per call for NQ heads: AVX2 about 8 accumulator chains (2 per tile row); AVX-512
 * at least 4 (with 4 heads, 2 tiles at once measured slower in bench_kernels). */
#define S_NT8(NQ) ((NQ) >= 4 ? 1 : (NQ) == 2 ? 2 : 4)
#define S_NT16(NQ) ((NQ) >= 4 ? 1 : (NQ) == 2 ? 2 : 4)

/* Heads NQ at a time over the block of nb tiles at t0, NT tiles per call. */
#define S_RUN(ONE, DT, NQ, NT)                                                                     \
    for (; h + (NQ) <= n_q; h += (NQ)) {                                                           \
        int t = 0;                                                                                 \
        for (; t + (NT) <= nb; t += (NT))                                                          \
            ONE(DT, NT, NQ, n_dims, q + (size_t)h * n_dims, tiles + (size_t)(t0 + t) * ts,         \
                out + (size_t)h * ld_out + (size_t)(t0 + t) * SCORE_TILE, ld_out);                 \
        for (; t < nb; t++)                                                                        \
            ONE(DT, 1, NQ, n_dims, q + (size_t)h * n_dims, tiles + (size_t)(t0 + t) * ts,          \
                out + (size_t)h * ld_out + (size_t)(t0 + t) * SCORE_TILE, ld_out);                 \
    }

/* Blocks of 4 tiles (they stay in L1 across head groups), heads in groups of GROUP, 4, 2
 * and 1. */
#define S_TILES(NAME, ATTR, ONE, NTF, GROUP, DT)                                                   \
    ATTR static void NAME(int n_tiles, int n_dims, int n_q, float *restrict out, int ld_out,       \
                          const float *restrict q, const uint16_t *restrict tiles)                 \
    {                                                                                              \
        const size_t ts = (size_t)n_dims * SCORE_TILE;                                             \
        for (int t0 = 0; t0 < n_tiles; t0 += 4) {                                                  \
            const int nb = n_tiles - t0 < 4 ? n_tiles - t0 : 4;                                    \
            int h = 0;                                                                             \
            S_RUN(ONE, DT, GROUP, NTF(GROUP))                                                      \
            S_RUN(ONE, DT, 4, NTF(4))                                                              \
            S_RUN(ONE, DT, 2, NTF(2))                                                              \
            S_RUN(ONE, DT, 1, NTF(1))                                                              \
        }                                                                                          \
    }

S_TILES(s_tiles_avx2_f16, T_AVX2, s_tile8, S_NT8, 4, FASA_DTYPE_F16)
S_TILES(s_tiles_avx2_bf16, T_AVX2, s_tile8, S_NT8, 4, FASA_DTYPE_BF16)
S_TILES(s_tiles_avx512_f16, T_AVX512, s_tile16, S_NT16, 8, FASA_DTYPE_F16)
S_TILES(s_tiles_avx512_bf16, T_AVX512, s_tile16, S_NT16, 8, FASA_DTYPE_BF16)
#endif

void score_tiles_dt(int path, int dtype, int n_tiles, int n_dims, int n_q, float *restrict out,
                    int ld_out, const float *restrict q, const void *restrict tiles)
{
    if (dtype == FASA_DTYPE_F32) {
        score_tiles(n_tiles, n_dims, n_q, out, ld_out, q, tiles);
        return;
    }
    const int f16 = dtype == FASA_DTYPE_F16;
    switch (s_path(path)) {
#if FASA_X86
    case SIMD_AVX512:
        (f16 ? s_tiles_avx512_f16 : s_tiles_avx512_bf16)(n_tiles, n_dims, n_q, out, ld_out, q,
                                                         tiles);
        return;
    case SIMD_AVX2:
        (f16 ? s_tiles_avx2_f16 : s_tiles_avx2_bf16)(n_tiles, n_dims, n_q, out, ld_out, q, tiles);
        return;
#endif
    default:
        s_tiles_port(dtype, n_tiles, n_dims, n_q, out, ld_out, q, tiles);
        return;
    }
}

/* Read-bandwidth references: see readbw.h. */
#include "readbw.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define READBW_X86 1
#endif

float readbw_sum_portable(size_t n, const float *x)
{
    float acc[16] = {0};
    size_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++) acc[j] += x[i + j];
    for (; i < n; i++) acc[i % 16] += x[i];
    float s = 0.0f;
    for (int j = 0; j < 16; j++) s += acc[j];
    return s;
}

#ifdef READBW_X86
/* 8 independent 8-lane accumulators: 64 floats (four cache lines) per iteration, so the
 * loop is bound by loads, not by the latency of the additions. */
__attribute__((target("avx2"))) static float s_sum_avx2(size_t n, const float *x)
{
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    size_t i = 0;
    for (; i + 64 <= n; i += 64) {
        a0 = _mm256_add_ps(a0, _mm256_loadu_ps(x + i));
        a1 = _mm256_add_ps(a1, _mm256_loadu_ps(x + i + 8));
        a2 = _mm256_add_ps(a2, _mm256_loadu_ps(x + i + 16));
        a3 = _mm256_add_ps(a3, _mm256_loadu_ps(x + i + 24));
        a4 = _mm256_add_ps(a4, _mm256_loadu_ps(x + i + 32));
        a5 = _mm256_add_ps(a5, _mm256_loadu_ps(x + i + 40));
        a6 = _mm256_add_ps(a6, _mm256_loadu_ps(x + i + 48));
        a7 = _mm256_add_ps(a7, _mm256_loadu_ps(x + i + 56));
    }
    a0 = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)),
                       _mm256_add_ps(_mm256_add_ps(a4, a5), _mm256_add_ps(a6, a7)));
    float lane[8];
    _mm256_storeu_ps(lane, a0);
    float s = 0.0f;
    for (int j = 0; j < 8; j++) s += lane[j];
    for (; i < n; i++) s += x[i];
    return s;
}

static int s_have_avx2(void)
{
    static int have = -1;
    if (have < 0) {
        __builtin_cpu_init();
        have = __builtin_cpu_supports("avx2") != 0;
    }
    return have;
}
#endif

float readbw_sum(size_t n, const float *x)
{
#ifdef READBW_X86
    if (s_have_avx2()) return s_sum_avx2(n, x);
#endif
    return readbw_sum_portable(n, x);
}

const char *readbw_sum_name(void)
{
#ifdef READBW_X86
    if (s_have_avx2()) return "AVX2, 8 x 8 accumulators";
#endif
    return "portable C, 16 accumulators";
}

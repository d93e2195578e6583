/* The machine's ceilings: see roofline.h. */
#define _GNU_SOURCE
#include "roofline.h"

#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "dtype.h"
#include "readbw.h"
#include "simd.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define ROOF_X86 1
#endif

static double s_now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

void roofline_cpu(char *model, size_t model_len, char *simd, size_t simd_len)
{
    snprintf(model, model_len, "unknown");
    FILE *f = fopen("/proc/cpuinfo", "r");
    char line[512];
    while (f && fgets(line, sizeof(line), f)) {
        if (strncmp(line, "model name", 10)) continue;
        const char *c = strchr(line, ':');
        if (!c) continue;
        c++;
        while (*c == ' ' || *c == '\t') c++;
        snprintf(model, model_len, "%s", c);
        model[strcspn(model, "\n")] = '\0';
        break;
    }
    if (f) fclose(f);
    simd[0] = '\0';
#ifdef ROOF_X86
    __builtin_cpu_init();
    static const char *const feats[] = {"sse4.2",   "avx",        "avx2",
                                        "fma",      "avx512f",    "avx512bw",
                                        "avx512vl", "avx512vnni", "avx512bf16"};
    const int has[] = {__builtin_cpu_supports("sse4.2"),    __builtin_cpu_supports("avx"),
                       __builtin_cpu_supports("avx2"),      __builtin_cpu_supports("fma"),
                       __builtin_cpu_supports("avx512f"),   __builtin_cpu_supports("avx512bw"),
                       __builtin_cpu_supports("avx512vl"),  __builtin_cpu_supports("avx512vnni"),
                       __builtin_cpu_supports("avx512bf16")};
    size_t at = 0;
    for (size_t i = 0; i < sizeof(feats) / sizeof(*feats); i++) {
        if (!has[i]) continue;
        at += (size_t)snprintf(simd + at, at < simd_len ? simd_len - at : 0, "%s%s", at ? " " : "",
                               feats[i]);
        if (i == 3 && simd_path_supported(SIMD_AVX2)) /* F16C: with the avx2 path */
            at += (size_t)snprintf(simd + at, at < simd_len ? simd_len - at : 0, " f16c");
    }
#endif
    if (!simd[0]) snprintf(simd, simd_len, "none");
}

typedef struct s_slice {
    const float *x;
    size_t n;
    pthread_barrier_t *go;
    double t; /* seconds of this thread's read */
    volatile float sink;
} s_slice;

static void *s_read(void *arg)
{
    s_slice *s = arg;
    pthread_barrier_wait(s->go);
    const double t0 = s_now();
    s->sink = readbw_sum(s->n, s->x);
    s->t = s_now() - t0;
    return NULL;
}

double roofline_read_gbs(const float *buf, size_t n, int n_threads, int reps)
{
    if (n_threads < 1) n_threads = 1;
    if (n_threads > 64) n_threads = 64;
    double best = 0;
    for (int r = 0; r < reps; r++) {
        s_slice sl[64];
        pthread_t th[64];
        pthread_barrier_t go;
        pthread_barrier_init(&go, NULL, (unsigned)n_threads);
        const size_t per = n / (size_t)n_threads;
        int started = 0;
        for (int i = 0; i < n_threads; i++) {
            sl[i] = (s_slice){.x = buf + (size_t)i * per, .n = per, .go = &go};
            if (i > 0 && pthread_create(&th[i], NULL, s_read, &sl[i])) break;
            started = i + 1;
        }
        if (started < n_threads) { /* cannot start a thread: no figure */
            for (int i = 1; i < started; i++) pthread_cancel(th[i]);
            pthread_barrier_destroy(&go);
            return 0;
        }
        s_read(&sl[0]);
        double t = sl[0].t;
        for (int i = 1; i < n_threads; i++) {
            pthread_join(th[i], NULL);
            if (sl[i].t > t) t = sl[i].t;
        }
        pthread_barrier_destroy(&go);
        const double gbs = (double)per * n_threads * sizeof(float) / t / 1e9;
        if (gbs > best) best = gbs;
    }
    return best;
}

double roofline_cvt_per_s(int dtype)
{
    return roofline_cvt_per_s_on(dtype, SIMD_AUTO);
}

double roofline_cvt_per_s_on(int dtype, int path)
{
    enum { N = 2048, REPS = 4000 }; /* 4 KiB of f16 in, 8 KiB of f32 out: L1 */
    static uint16_t in16[N * 2];
    static float out[N];
    const void *in = in16;
    for (int i = 0; i < N * 2; i++) in16[i] = (uint16_t)(0x3c00 + (i & 0x3ff));
    double best = 0;
    for (int rep = 0; rep < 3; rep++) {
        const double t0 = s_now();
        for (int r = 0; r < REPS; r++) {
            dtype_to_f32(path, dtype, N, in, out);
            __asm__ volatile("" : : "r"(out) : "memory");
        }
        const double rate = (double)N * REPS / (s_now() - t0);
        if (rate > best) best = rate;
    }
    return best;
}

#ifdef ROOF_X86
__attribute__((target("avx2,fma"))) static double s_fma_avx2(long iters)
{
    __m256 a[10];
    for (int i = 0; i < 10; i++) a[i] = _mm256_set1_ps(0.001f * (float)i);
    const __m256 x = _mm256_set1_ps(0.999f), y = _mm256_set1_ps(1e-4f);
    for (long it = 0; it < iters; it++)
        for (int i = 0; i < 10; i++) a[i] = _mm256_fmadd_ps(a[i], x, y);
    __m256 s = a[0];
    for (int i = 1; i < 10; i++) s = _mm256_add_ps(s, a[i]);
    float lane[8];
    _mm256_storeu_ps(lane, s);
    return lane[0];
}

__attribute__((target("avx512f"))) static double s_fma_avx512(long iters)
{
    __m512 a[10];
    for (int i = 0; i < 10; i++) a[i] = _mm512_set1_ps(0.001f * (float)i);
    const __m512 x = _mm512_set1_ps(0.999f), y = _mm512_set1_ps(1e-4f);
    for (long it = 0; it < iters; it++)
        for (int i = 0; i < 10; i++) a[i] = _mm512_fmadd_ps(a[i], x, y);
    __m512 s = a[0];
    for (int i = 1; i < 10; i++) s = _mm512_add_ps(s, a[i]);
    return _mm512_reduce_add_ps(s);
}
#endif

static double s_fma_portable(long iters)
{
    float a[8];
    for (int i = 0; i < 8; i++) a[i] = 0.001f * (float)i;
    for (long it = 0; it < iters; it++)
        for (int i = 0; i < 8; i++) a[i] = a[i] * 0.999f + 1e-4f;
    return a[0] + a[7];
}

double roofline_fma_per_s(void)
{
    return roofline_fma_per_s_on(SIMD_AUTO);
}

double roofline_fma_per_s_on(int path)
{
    const long iters = 2000000;
    if (path < 0 || !simd_path_supported((simd_path)path)) path = (int)simd_path_default();
    volatile double sink = 0;
    double best = 0;
    for (int rep = 0; rep < 3; rep++) {
        const double t0 = s_now();
        double lanes;
#ifdef ROOF_X86
        if (path == SIMD_AVX512) {
            sink += s_fma_avx512(iters);
            lanes = 160.0 * iters;
        } else if (path == SIMD_AVX2) {
            sink += s_fma_avx2(iters);
            lanes = 80.0 * iters;
        } else
#endif
        {
            sink += s_fma_portable(iters);
            lanes = 8.0 * iters;
        }
        const double rate = lanes / (s_now() - t0);
        if (rate > best) best = rate;
    }
    (void)sink;
    return best;
}

double roofline_compute_gbs(size_t esz, double fma_per_elem, double cvt_per_s, double fma_per_s)
{
    if (cvt_per_s <= 0 || fma_per_s <= 0) return 0;
    return (double)esz / (1.0 / cvt_per_s + fma_per_elem / fma_per_s) / 1e9;
}

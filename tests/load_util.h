/* Helpers of the bulk-load tests (tests/load_test.c, tests/load_mpi_test.c): .npy files
 * written byte by byte (independent of the loader's reader), and the comparison of two
 * engines' steps, bit for bit. */
#ifndef FASA_TESTS_LOAD_UTIL_H
#define FASA_TESTS_LOAD_UTIL_H

#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include "engine.h"
#include "simd.h"
#include "test_util.h"

/* Writes an .npy v1.0 file: header dict text header (e.g. "{'descr': '<f4', ...}"), then
 * bytes of data. */
static inline void lt_write_raw_npy(const char *path, const char *header, const void *data,
                                    size_t bytes)
{
    char h[512];
    int n = snprintf(h, sizeof(h), "%s", header);
    while ((10 + n + 1) % 64) h[n++] = ' ';
    h[n++] = '\n';
    FILE *f = fopen(path, "wb");
    ck_assert_ptr_nonnull(f);
    const unsigned char pre[10] = {
        0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0, (unsigned char)(n & 0xff), (unsigned char)(n >> 8)};
    ck_assert_uint_eq(fwrite(pre, 1, 10, f), 10);
    ck_assert_uint_eq(fwrite(h, 1, (size_t)n, f), (size_t)n);
    if (bytes) ck_assert_uint_eq(fwrite(data, 1, bytes, f), bytes);
    ck_assert_int_eq(fclose(f), 0);
}

/* An (T, H, D) or (L, T, H, D) array of f32 values, as '<f4' or (f16 nonzero) '<f2'. */
static inline void lt_write_npy(const char *path, int f16, int rank, const int64_t *shape,
                                const float *x)
{
    char header[256], dims[128] = "";
    size_t n = 1;
    for (int i = 0; i < rank; i++) {
        n *= (size_t)shape[i];
        snprintf(dims + strlen(dims), sizeof(dims) - strlen(dims), "%lld, ", (long long)shape[i]);
    }
    dims[strlen(dims) - 2] = 0;
    snprintf(header, sizeof(header), "{'descr': '%s', 'fortran_order': False, 'shape': (%s), }",
             f16 ? "<f2" : "<f4", dims);
    if (!f16) {
        lt_write_raw_npy(path, header, x, n * 4);
        return;
    }
    uint16_t *h = test_alloc(n * 2);
    for (size_t i = 0; i < n; i++) h[i] = fasa_f32_to_f16(x[i]);
    lt_write_raw_npy(path, header, h, n * 2);
    free(h);
}

/* Random keys and values (L, T, H, D) in k and v (f16-exact when f16), and the per-layer
 * files k_L.npy, v_L.npy in dir. */
static inline void lt_make_layers(const char *dir, int L, int T, int H, int D, int f16,
                                  uint64_t seed, float *k, float *v)
{
    test_rng r = {seed};
    const size_t n = (size_t)L * T * H * D, per = (size_t)T * H * D;
    test_fill(&r, n, k, 2.0f);
    test_fill(&r, n, v, 1.0f);
    if (f16)
        for (size_t i = 0; i < n; i++) {
            k[i] = fasa_f16_to_f32(fasa_f32_to_f16(k[i]));
            v[i] = fasa_f16_to_f32(fasa_f32_to_f16(v[i]));
        }
    mkdir(dir, 0755);
    const int64_t shape[3] = {T, H, D};
    char p[1024];
    for (int l = 0; l < L; l++) {
        snprintf(p, sizeof(p), "%s/k_%d.npy", dir, l);
        lt_write_npy(p, f16, 3, shape, k + l * per);
        snprintf(p, sizeof(p), "%s/v_%d.npy", dir, l);
        lt_write_npy(p, f16, 3, shape, v + l * per);
    }
}

/* Steps of every layer of session id on engines a and b, with several methods and visible
 * lengths: the outputs and selections must be the same bits. Returns the steps compared. */
static inline int lt_same_steps(fasa_engine_t *a, fasa_engine_t *b, const char *id, int L, int T,
                                int nh, int d, uint64_t seed)
{
    static const int methods[] = {FASA_METHOD_DENSE, FASA_METHOD_ORACLE, FASA_METHOD_STREAM,
                                  FASA_METHOD_QUEST, FASA_METHOD_SPARQ};
    const int budget = 24, maxes[] = {T - 1, T / 2, 40};
    test_rng r = {seed};
    float *q = test_alloc((size_t)nh * d * 4), *oa = test_alloc((size_t)nh * d * 4),
          *ob = test_alloc((size_t)nh * d * 4);
    int32_t *sa = test_alloc((size_t)nh * budget * 4), *sb = test_alloc((size_t)nh * budget * 4);
    int steps = 0;
    for (int l = 0; l < L; l++)
        for (size_t m = 0; m < sizeof(methods) / sizeof(*methods); m++)
            for (int x = 0; x < 3; x++) {
                test_fill(&r, (size_t)nh * d, q, 1.5f);
                fasa_attend_req req = {.layer = l,
                                       .q = q,
                                       .method = methods[m],
                                       .budget = budget,
                                       .gqa = -1,
                                       .max_pos = maxes[x]};
                fasa_error ea, eb;
                fasa_step_stats ta, tb;
                ck_assert_msg(fasa_engine_attend(a, id, &req, oa, sa, &ta, &ea) == FASA_OK, "%s",
                              ea.msg);
                ck_assert_msg(fasa_engine_attend(b, id, &req, ob, sb, &tb, &eb) == FASA_OK, "%s",
                              eb.msg);
                ck_assert_msg(!memcmp(oa, ob, (size_t)nh * d * 4),
                              "layer %d method %d max_pos %d: outputs differ", l, methods[m],
                              maxes[x]);
                ck_assert(!memcmp(sa, sb, (size_t)nh * budget * 4));
                ck_assert_int_eq(ta.bytes_read, tb.bytes_read);
                steps++;
            }
    free(q), free(oa), free(ob), free(sa), free(sb);
    return steps;
}

#endif

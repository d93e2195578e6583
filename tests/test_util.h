/* Helpers shared by the Check suites: a seeded generator and tolerant comparisons. */
#ifndef FASA_TESTS_TEST_UTIL_H
#define FASA_TESTS_TEST_UTIL_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include <check.h>

typedef struct test_rng {
    uint64_t s;
} test_rng;

static inline uint64_t test_next(test_rng *r)
{
    uint64_t z = (r->s += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

/* Uniform in [-1, 1). */
static inline float test_uniform(test_rng *r)
{
    return (float)((test_next(r) >> 40) * (1.0 / 8388608.0) - 1.0);
}

static inline void test_fill(test_rng *r, size_t n, float *x, float scale)
{
    for (size_t i = 0; i < n; i++) x[i] = scale * test_uniform(r);
}

static inline void *test_alloc(size_t bytes)
{
    void *p = calloc(1, bytes ? bytes : 1);
    ck_assert_ptr_nonnull(p);
    return p;
}

/* Largest |a - b| over n values. */
static inline double test_max_abs_diff(size_t n, const float *a, const float *b)
{
    double m = 0;
    for (size_t i = 0; i < n; i++) {
        const double d = fabs((double)a[i] - b[i]);
        if (d > m || d != d) m = d != d ? INFINITY : d;
    }
    return m;
}

/* max |a - b| / max |b| over n values (0 when both are all zero). */
static inline double test_rel_err(size_t n, const float *a, const float *b)
{
    double mb = 0;
    for (size_t i = 0; i < n; i++)
        if (fabs(b[i]) > mb) mb = fabs(b[i]);
    const double d = test_max_abs_diff(n, a, b);
    return mb > 0 ? d / mb : d;
}

/* Adds a test case named name to s with the tests of a NULL-ended list, under a timeout of
 * timeout_s seconds (0: Check's default, CK_DEFAULT_TIMEOUT); returns it (for fixtures). */
static inline TCase *test_add_case(Suite *s, const char *name, int timeout_s,
                                   const TTest *const *tests)
{
    TCase *tc = tcase_create(name);
    if (timeout_s > 0) tcase_set_timeout(tc, timeout_s);
    for (; *tests; tests++) tcase_add_test(tc, *tests);
    suite_add_tcase(s, tc);
    return tc;
}

/* A suite of one test case (test_add_case). */
static inline Suite *test_suite(const char *name, const char *tcase, int timeout_s,
                                const TTest *const *tests)
{
    Suite *s = suite_create(name);
    test_add_case(s, tcase, timeout_s, tests);
    return s;
}

Suite *kernels_suite(void);
Suite *shard_suite(void);
Suite *engine_suite(void);
Suite *golden_suite(void);
Suite *io_suite(void);
Suite *service_suite(void);
Suite *config_suite(void);
Suite *model_suite(void);
Suite *snapshot_suite(void);
Suite *threads_suite(void);
Suite *admin_suite(void);
Suite *base_suite(void);
Suite *load_suite(void);
Suite *merge_suite(void);

/* ../shared as seen from the source tree (tests may read the recorded data there). */
const char *test_shared_dir(void);

#endif

/* Wall-clock timing and medians for the demo and the benchmarks. */
#ifndef FASA_CLIENT_TIMING_H
#define FASA_CLIENT_TIMING_H

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Seconds on the monotonic clock. */
static inline double timing_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static inline int timing_cmp(const void *a, const void *b)
{
    const double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Median of x[0..n) (n >= 1); x itself is left as it was. */
static inline double timing_median(int n, const double *x)
{
    double *t = malloc((size_t)n * sizeof(double));
    if (!t) abort();
    memcpy(t, x, (size_t)n * sizeof(double));
    qsort(t, (size_t)n, sizeof(double), timing_cmp);
    const double m = n % 2 ? t[n / 2] : 0.5 * (t[n / 2 - 1] + t[n / 2]);
    free(t);
    return m;
}

/* The p-th quantile of x[0..n) (n >= 1, p in [0, 1]): the ceil(p n)-th smallest value (the
 * smallest for p = 0); x itself is left as it was. */
static inline double timing_pct(int n, const double *x, double p)
{
    double *t = malloc((size_t)n * sizeof(double));
    if (!t) abort();
    memcpy(t, x, (size_t)n * sizeof(double));
    qsort(t, (size_t)n, sizeof(double), timing_cmp);
    int i = (int)ceil(p * n) - 1;
    i = i < 0 ? 0 : i >= n ? n - 1 : i;
    const double v = t[i];
    free(t);
    return v;
}

#endif

/* Read-bandwidth references for the benchmarks (bench_scan, `fasa bench scan`): a streaming
 * sum with several independent accumulators, SIMD where the CPU has it (AVX2, picked at run
 * time) and portable C otherwise. Compare it with OpenBLAS cblas_sasum and take the faster:
 * a single-accumulator loop is latency-bound and is not a bandwidth reference. */
#ifndef FASA_BENCH_READBW_H
#define FASA_BENCH_READBW_H

#include <stddef.h>

/* Sum of x[0..n) read once, front to back (any n; the order of additions differs from a
 * plain loop). */
float readbw_sum(size_t n, const float *x);

/* The variant readbw_sum runs on this CPU, e.g. "AVX2, 8 x 8 accumulators". */
const char *readbw_sum_name(void);

/* The portable variant (16 accumulators), whatever the CPU; the reference of the tests. */
float readbw_sum_portable(size_t n, const float *x);

#endif

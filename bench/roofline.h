/* The machine's ceilings for `fasa bench attend` (issue 13, item 1), measured in the run
 * that uses them: the streaming read bandwidth on 1 .. T threads, and micro-probes of the
 * two operations the step's inner loops are made of, conversions of the storage dtype to
 * f32 and f32 multiply-adds (FMA), per second on one core with data in L1. A phase's
 * compute ceiling is the rate its inner loop would reach doing nothing but those
 * operations at the probed rates, one after the other (conservative: no overlap of the
 * two); its roofline is the lower of that and the read bandwidth. */
#ifndef FASA_BENCH_ROOFLINE_H
#define FASA_BENCH_ROOFLINE_H

#include <stddef.h>

/* The CPU's model name (/proc/cpuinfo, "unknown" elsewhere) and its SIMD features that the
 * kernels can use, space-separated (e.g. "sse4.2 avx avx2 fma f16c"). */
void roofline_cpu(char *model, size_t model_len, char *simd, size_t simd_len);

/* GB/s of a streaming read (readbw.h's SIMD sum) of n floats of buf, split into n_threads
 * contiguous slices read at once by as many threads; the best of reps runs. */
double roofline_read_gbs(const float *buf, size_t n, int n_threads, int reps);

/* Elements per second converted from dtype (fasa_dtype) to f32 on the default SIMD path
 * (simd.h dtype_to_f32; f32 is a copy), one core, buffers in L1. */
double roofline_cvt_per_s(int dtype);
/* The same on SIMD path path (a simd_path, or SIMD_AUTO: the default). */
double roofline_cvt_per_s_on(int dtype, int path);

/* f32 multiply-adds per second (lanes counted), one core: FMA with 10 independent
 * accumulators on the default SIMD path (AVX2 where the CPU has it), else a plain C loop. */
double roofline_fma_per_s(void);
/* The same on SIMD path path (AVX-512: 16 lanes; SIMD_AUTO or a path the CPU lacks: the
 * default). */
double roofline_fma_per_s_on(int path);

/* Compute ceiling in GB/s of an inner loop that converts each stored element (esz bytes)
 * once and uses it in fma_per_elem multiply-adds: esz / (1 / cvt + fma_per_elem / fma). */
double roofline_compute_gbs(size_t esz, double fma_per_elem, double cvt_per_s, double fma_per_s);

#endif

/* Storage dtype kernels with run-time SIMD dispatch.
 *
 * Keys and values may be stored as f32, f16 (IEEE binary16) or bf16 (the top half of an
 * f32); queries, scores and every accumulation stay f32 (attention partials in double,
 * attn.h). A path is a code path for the conversions and the f16/bf16 tile scan:
 *   portable  plain C, bit-exact conversions with round-to-nearest-even, everywhere;
 *   avx2      AVX2 + FMA + F16C (vcvtph2ps / vcvtps2ph, 8 lanes);
 *   avx512    AVX-512F (16 lanes).
 * The SIMD paths are compiled with function target attributes, so the build itself stays
 * portable (no -march), and are used only where the CPU has them (__builtin_cpu_supports).
 * The default path is avx2 where the CPU has it (avx512 measured no faster in
 * bench_kernels), else portable; the environment variable FASA_SIMD
 * (portable | avx2 | avx512) forces one for tests and benchmarks (a path the CPU lacks, or
 * an unknown name, falls back to the default with a note on stderr). Every path converts
 * bit-identically (the same rounding); the f16/bf16 scans differ between paths only by the
 * order of f32 additions. The f32 kernels (score.c, attn.c) keep their own target_clones
 * dispatch. The fused scan (scan.h) and the dense kernel (dense.h) default to avx512 where
 * the CPU has it, unless FASA_SIMD names a path (simd_path_named). */
#ifndef FASA_KERNELS_SIMD_H
#define FASA_KERNELS_SIMD_H

#include <stddef.h>
#include <stdint.h>

#include "dtype.h"

typedef enum simd_path { SIMD_PORTABLE = 0, SIMD_AVX2 = 1, SIMD_AVX512 = 2 } simd_path;
#define SIMD_PATH_LAST SIMD_AVX512

/* Largest finite f16. */
#define FASA_F16_MAX 65504.0f

/* "portable", "avx2", "avx512" (static strings, borrowed), or NULL out of range. */
const char *simd_path_name(int path);
/* 1 when this CPU (and compiler) can run the path; portable always can. */
int simd_path_supported(simd_path path);
/* The path used by the kernels below when given SIMD_AUTO: the one simd_path_choose set, else
 * the best one. */
simd_path simd_path_default(void);
/* Sets the path SIMD_AUTO means, by name ("portable", "avx2", "avx512"; NULL or "": the best
 * one). Called once at start-up (worker/env.h reads FASA_SIMD), before the kernels run; the
 * kernels read no environment. 0; -1 for an unknown name, -2 when this CPU lacks the path
 * (then the best one is used). */
int simd_path_choose(const char *name);
#define SIMD_AUTO (-1)
/* The path the last simd_path_choose named (and this CPU has), or -1 when it named none:
 * kernels whose best path differs from simd_path_default's (the fused scan, scan.h) take
 * their own best unless a path was named. */
int simd_path_named(void);

/* The CPU's SIMD features as CPUID reports them, space-separated, from: sse4.2 avx2 fma f16c
 * avx512f avx512bw avx512_vnni avx512_fp16 avx_vnni (a static string; "none" off x86). */
const char *simd_cpu_features(void);

/* Scalar reference conversions, round to nearest even (subnormals kept; f16 overflow gives
 * inf, NaN stays NaN). */
uint16_t fasa_f32_to_f16(float x);
float fasa_f16_to_f32(uint16_t h);
uint16_t fasa_f32_to_bf16(float x);
float fasa_bf16_to_f32(uint16_t h);

/* 1 when the finite value x does not fit dtype (rounds to infinity), else 0. */
int fasa_dtype_overflows(int dtype, float x);

/* Converts n floats to dtype (dst holds n elements of fasa_dtype_size(dtype) bytes) and
 * back. path: a simd_path or SIMD_AUTO. For f32 both are plain copies. */
void dtype_from_f32(int path, int dtype, size_t n, const float *src, void *dst);
void dtype_to_f32(int path, int dtype, size_t n, const void *src, float *dst);

/* score_tiles (score.h) over tiles stored as dtype: element c, l of tile t is at
 * index (t * n_dims + c) * SCORE_TILE + l of the dtype array. f32 runs score_tiles itself. */
void score_tiles_dt(int path, int dtype, int n_tiles, int n_dims, int n_q, float *restrict out,
                    int ld_out, const float *restrict q, const void *restrict tiles);

#endif

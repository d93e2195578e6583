/* Dense attention as one fused kernel per KV group and block (issue 13, item 4).
 *
 * One call folds a block of at most DENSE_BLOCK rows of one KV head into the running
 * partials (attn.h: m, l, o in double) of the n_q query heads that share it, in one pass
 * over the block's K and V: convert each stored element (f32, f16 or bf16) once, q.k for
 * all n_q heads, the block's softmax, p.V, with f32 accumulation inside the block and one
 * log-sum-exp fold of the block's partial (m_b, l_b, o_b) into the double partial per
 * block. The keys are stored as the shard stores them (shard.h): the n_dom dominant dims
 * in row tiles of SCORE_TILE rows, dim-major (score.h), the other head_dim - n_dom dims
 * row-major, and the values row-major; the queries q (n_q, head_dim) are in the same
 * permuted order (dominant dims first).
 *
 * Paths (simd.h): portable C (expf, plain loops); avx2 (AVX2 + FMA + F16C, 8 lanes, a
 * polynomial exp of a few ulp, accumulators in registers); avx512 (AVX-512F, 16 lanes: the
 * row-major key dims of 4 rows x 4 heads in 16 accumulators reduced together into one
 * vector, the tile's dominant dims with its 16 rows in the lanes, p.V 64 dims x 4 heads in
 * registers, the same exp polynomial with vscalefps, keys prefetched 64 rows ahead and the
 * block's V during its logits). SIMD_AUTO takes dense_path(). Each path is deterministic:
 * the same rows in the same blocks give the same bits, whatever thread runs them; paths
 * differ by rounding (FMA, the exp, the order of f32 sums), within the tolerance the tests
 * check against the naive reference. */
#ifndef FASA_KERNELS_DENSE_H
#define FASA_KERNELS_DENSE_H

#include "score.h"

/* Rows per block, at most; the block's first row starts a tile. */
#define DENSE_BLOCK 256

/* Floats of scratch dense_block needs for n_q heads of head_dim dims. */
#define DENSE_SCRATCH(n_q, head_dim)                                                               \
    ((size_t)(n_q) * (DENSE_BLOCK + (head_dim)) + 32 * (size_t)(head_dim))

/* Folds rows 0 .. n_rows - 1 (1 .. DENSE_BLOCK) into m[n_q], l[n_q], o[n_q][head_dim]:
 * logits scale * q_h . k_j, k_j's dominant dims at element (t * n_dom + c) * SCORE_TILE + l
 * of kdom for row j = t * SCORE_TILE + l (whole tiles are read: rows past n_rows in the
 * last tile are read and ignored), its other dims at krest[j * (head_dim - n_dom) ..],
 * v_j at v[j * head_dim ..], all elements of dtype (fasa_dtype). path: a simd_path or
 * SIMD_AUTO. scratch: DENSE_SCRATCH(n_q, head_dim) floats. */
void dense_block(int path, int dtype, int n_rows, int head_dim, int n_dom, int n_q, float scale,
                 const float *restrict q, const void *restrict kdom, const void *restrict krest,
                 const void *restrict v, float *restrict m, double *restrict l, double *restrict o,
                 float *restrict scratch);

/* The path dense_block takes for SIMD_AUTO: the one FASA_SIMD named (simd_path_named), else
 * avx512 where the CPU has it, else simd_path_default. */
int dense_path(void);

/* Naive reference of dense_block: every element converted with the scalar conversions,
 * logits, exponentials and sums in double, the block's partial merged as attn_merge does. */
void dense_block_ref(int dtype, int n_rows, int head_dim, int n_dom, int n_q, float scale,
                     const float *q, const void *kdom, const void *krest, const void *v, float *m,
                     double *l, double *o);

#endif

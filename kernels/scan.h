/* The scoring store and the fused scan + top-k of a FASA step's first phase.
 *
 * The scoring store is a packed copy of the dominant key dims whose element type, the
 * score dtype, is chosen per session independently of the K/V storage dtype:
 *   SCAN_F32, SCAN_F16, SCAN_BF16  tiles of SCORE_TILE rows, dim-major, as score.h:
 *        element (c, l) of tile t at (t * n_dims + c) * SCORE_TILE + l;
 *   SCAN_I8  int8 with ONE f32 scale per row (never per tile or block, so that a row's
 *        score does not depend on where placement put it): tiles of SCORE_TILE rows with
 *        the dims padded to a multiple of 2 (zeros) and grouped in pairs, so that one
 *        16-bit lane pair holds 2 dims of one row: byte (c, l) of tile t at
 *        t * SCORE_TILE * n_pad + (c / 2) * 2 * SCORE_TILE + l * 2 + c % 2.
 * int8 quantisation of a row x (scan_quant_i8): scale = max|x_c| / 127 (f32 division; 0 for
 * a zero row), q_c = x_c / scale (f32 division) rounded to nearest, ties to even, within
 * [-127, 127]; x_c ~ scale * q_c. Queries are quantised per head the same way to int16
 * within [-SCAN_Q16_MAX, SCAN_Q16_MAX] (scan_quant_q16: the query's own error is then
 * negligible next to the keys'), and an int8 score is
 * (float)(sum_c qi_c ki_c) * qscale * kscale[row]: the int32 sum is exact (at most
 * 1024 x 8191 x 127 < 2^31), its conversion rounds to nearest even on every path.
 *
 * Scores of the f32/f16/bf16 stores are f32 fused multiply-adds in dim order
 * (acc = fma(q_c, k_c, acc), c = 0, 1, ...), so every SIMD path and the portable one give
 * bit-identical scores for a row wherever it sits, and int8 scores are exact integers
 * scaled the same way on every path: the selection never depends on the path, the tile
 * or the shard a row is in.
 *
 * scan_topk fuses the scan with the running top-k: no per-token score buffer; each tile's
 * scores stay in registers, are compared (one vector compare per 8 rows) against each
 * head's running threshold (at most the k-th best so far under the order of topk.h) and
 * only the rows that beat it are inserted (rare: the threshold is refreshed by a trim,
 * topk_acc_trim, once 4k candidates are held: to those whose score key reaches a 16-bit
 * threshold the best k all reach, found by vectorised counts, about 2.2 k ln(n / k) inserts
 * of n rows for data in random order, a fixed cost per step; the AVX-512 kernel stores a
 * tile's passing rows at once). Rows are offered in ascending position, which the strict
 * compare relies on: an equal score at a higher position never beats the threshold; the
 * held candidates stay in that order (the trims and the finish are stable).
 *
 * Paths: portable C; AVX2 (+FMA, F16C): two 8-lane vectors per 16-row tile, int8 by
 * vpmovsxbw + vpmaddwd; AVX-512 (AVX-512F): one 16-lane vector per tile and dim (lane l is
 * row l for every dtype), two tiles (32 rows) at once for up to 4 heads, a software prefetch
 * 8 KiB ahead, int8 by vpdpwssd on the same int16 queries and sign-extended keys (needs
 * AVX512BW and AVX512-VNNI besides; without them int8 runs the AVX2 kernel). The stored layout
 * is the same for every path. A scan given SIMD_AUTO runs the path FASA_SIMD named, else
 * AVX-512 where the CPU has it, else simd_path_default (scan.c s_path). The scores are the
 * same bits on every path (above), so the selection never depends on it. */
#ifndef FASA_KERNELS_SCAN_H
#define FASA_KERNELS_SCAN_H

#include <stddef.h>
#include <stdint.h>

#include "score.h"
#include "topk.h"

/* Score dtypes; the numbers are the wire's DType numbers (proto/fasa.proto). SCAN_AUTO:
 * the session's K/V storage dtype (the dominant dims of the key store itself, no copy). */
typedef enum scan_dtype {
    SCAN_AUTO = 0,
    SCAN_F32 = 1,
    SCAN_F16 = 2,
    SCAN_BF16 = 3,
    SCAN_I8 = 5
} scan_dtype;

/* "auto", "f32", "f16", "bf16", "int8"; NULL for a value that is none of them. */
const char *scan_dtype_name(int sd);
/* 0 and *out set for one of the names above (also "i8"), -1 otherwise. */
int scan_dtype_parse(const char *name, int *out);
/* 1 for SCAN_AUTO and the four dtypes, else 0. */
int scan_dtype_valid(int sd);
/* The score dtype a session of K/V dtype kv_dtype (fasa_dtype) and score dtype sd scans:
 * sd, or for SCAN_AUTO the one matching kv_dtype. */
int scan_dtype_effective(int sd, int kv_dtype);
/* Bytes per element: 4, 2, 2, 1 (0 for SCAN_AUTO or unknown). */
size_t scan_dtype_size(int sd);
/* Dims stored per row: n_dims, rounded up to a multiple of 4 for SCAN_I8. */
int scan_dims_padded(int sd, int n_dims);
/* Bytes of one tile of SCORE_TILE rows. */
size_t scan_tile_bytes(int sd, int n_dims);

#define SCAN_Q16_MAX 8191

/* int8 quantisation of n values (rule above): q[n], returns the scale. */
float scan_quant_i8(int n, const float *x, int8_t *q);
/* Naive reference of scan_quant_i8 (rounding by floor and comparison, not lrintf). */
float scan_quant_i8_ref(int n, const float *x, int8_t *q);

/* The queries' int16 quantisation (limit SCAN_Q16_MAX), and its naive reference. */
float scan_quant_q16(int n, const float *x, int16_t *q);
float scan_quant_q16_ref(int n, const float *x, int16_t *q);

/* Packs row `row` (x[n_dims], f32; f16/bf16 round to nearest even) into a store of sd whose
 * tile 0 is at tiles; row_scale[row] gets the int8 scale (SCAN_I8 only; may be NULL
 * otherwise). Padding dims and rows never written must be zero (calloc the store). */
void scan_pack_row(int sd, int n_dims, const float *x, void *tiles, float *row_scale, int row);

/* Queries prepared for a scan: f32 for the f32/f16/bf16 stores, int8 + scale per head for
 * SCAN_I8. Grow-only memory; zero-initialise; the caller owns what scan_q_prep allocates
 * in it (free with scan_q_free). */
typedef struct scan_q {
    int sd, n_q, n_dims, n_pad;
    float *qf;     /* (n_q, n_dims) */
    int16_t *qi;   /* SCAN_I8: (n_q, n_pad) quantised queries */
    float *qscale; /* SCAN_I8: (n_q) */
    void *mem;
    size_t cap;
} scan_q;
/* Prepares n_q queries q (n_q, n_dims) for a store of sd. Returns 0, or -1 out of memory. */
int scan_q_prep(scan_q *sq, int sd, int n_q, int n_dims, const float *q);
/* Frees sq's memory (the struct is the caller's, zeroed after); NULL is a no-op. */
void scan_q_free(scan_q *sq);

/* out[h * ld_out + r] = score of row r (r < n_rows) for head h < sq->n_q, over the store
 * tiles (+ row_scale for SCAN_I8) of sq->sd. path: a simd_path or SIMD_AUTO (simd.h). */
/* The SIMD path (simd.h) scan_scores and scan_topk take for SIMD_AUTO on this CPU. */
int scan_path(void);

void scan_scores(int path, const scan_q *sq, int n_rows, const void *tiles, const float *row_scale,
                 float *out, int ld_out);
/* Naive reference of scan_scores: double sums of the stored values (int8: the exact integer
 * sum, then the same two f32 scalings). */
void scan_scores_ref(const scan_q *sq, int n_rows, const void *tiles, const float *row_scale,
                     float *out, int ld_out);

/* The fused scan: offers every row r < n_rows, as (score, pos0 + r), to acc[h] for each
 * head h < sq->n_q (each acc's cap >= k + 1; see topk_acc_offer). Equal, as a selection,
 * to scan_scores followed by topk_acc_push of all the scores. */
void scan_topk(int path, const scan_q *sq, int n_rows, const void *tiles, const float *row_scale,
               int32_t pos0, topk_acc *acc);

/* Prefetches the first bytes of a store (the next scan_topk call's rows) into L2: a caller
 * scanning chunks that are separate allocations issues it for the next chunk before
 * scanning the current one, so that the next call does not start cold (the kernels prefetch
 * only inside their own call's tiles). A no-op off x86. */
void scan_prefetch(const void *tiles, size_t bytes);

#endif

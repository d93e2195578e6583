/* Partial dot products of queries against stored keys: the TIP scan of FASA.
 *
 * The scan is the one pass over every cached token, so its layout decides the speed.
 * Keys are kept in row tiles of SCORE_TILE rows, dim-major inside a tile:
 * tile[c][l] is dim c of row l. One tile of n_dims dims is n_dims * SCORE_TILE floats.
 * Scoring 16 rows is then n_dims vertical multiply-adds per query, no horizontal sums,
 * and each row's score is summed in the same order (c = 0, 1, ...) whatever tile or
 * shard it sits in, so scores are bit-identical however the cache is sharded.
 * Padding rows in a partial last tile are zero; their scores are computed and ignored.
 *
 * The remaining dims live row-major; score_rows handles those (and gathered rows). */
#ifndef FASA_KERNELS_SCORE_H
#define FASA_KERNELS_SCORE_H

#define SCORE_TILE 16

/* out[h * ld_out + t * SCORE_TILE + l] = sum_c q[h * n_dims + c] * tiles[t][c][l]
 * for h < n_q, t < n_tiles, l < SCORE_TILE. n_dims may be 0 (scores are 0). */
void score_tiles(int n_tiles, int n_dims, int n_q, float *restrict out, int ld_out,
                 const float *restrict q, const float *restrict tiles);
/* Naive reference of score_tiles (double accumulation). */
void score_tiles_ref(int n_tiles, int n_dims, int n_q, float *restrict out, int ld_out,
                     const float *restrict q, const float *restrict tiles);

/* out[h * ld_out + r] (+)= sum_c q[h * n_dims + c] * rows[r * ld_rows + c] for r < n_rows.
 * With accumulate = 0 the outputs are overwritten, otherwise added to. */
void score_rows(int n_rows, int n_dims, int n_q, float *restrict out, int ld_out,
                const float *restrict q, const float *restrict rows, int ld_rows, int accumulate);
/* Naive reference of score_rows (double accumulation). */
void score_rows_ref(int n_rows, int n_dims, int n_q, float *restrict out, int ld_out,
                    const float *restrict q, const float *restrict rows, int ld_rows,
                    int accumulate);

#endif

/* Scoring kernels. See score.h for the tile layout and why it is used. The optimised
 * versions are plain C written so that GCC vectorises the SCORE_TILE lanes; target_clones
 * builds an AVX-512 and an AVX2 variant next to the portable one and picks at load time. */
#include "score.h"

#include <string.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(FASA_NO_CLONES)
#define KERN_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define KERN_CLONES
#endif

/* One tile row of SCORE_TILE floats as a GCC vector: the accumulators of a tile live in
 * NQ vector registers and each dim costs one load and NQ broadcast multiply-adds, with no
 * horizontal sums. Written with vector extensions because plain loops got vectorised
 * across heads (shuffles and stack traffic) instead of across the tile's rows. */
typedef float s_v16 __attribute__((vector_size(SCORE_TILE * sizeof(float))));

/* Scores NQ query heads against one tile. NQ is a compile-time constant in each expansion
 * so the accumulators stay in registers. */
#define SCORE_TILE_NQ(NQ)                                                                          \
    static inline void s_tile_##NQ(int n_dims, float *restrict out, int ld_out,                    \
                                   const float *restrict q, int ld_q, const float *restrict tile)  \
    {                                                                                              \
        s_v16 acc[NQ];                                                                             \
        for (int h = 0; h < NQ; h++) acc[h] = (s_v16){0};                                          \
        for (int c = 0; c < n_dims; c++) {                                                         \
            s_v16 kr;                                                                              \
            memcpy(&kr, tile + (size_t)c * SCORE_TILE, sizeof(kr));                                \
            for (int h = 0; h < NQ; h++) acc[h] += q[(size_t)h * ld_q + c] * kr;                   \
        }                                                                                          \
        for (int h = 0; h < NQ; h++) memcpy(out + (size_t)h * ld_out, &acc[h], sizeof(acc[h]));    \
    }

SCORE_TILE_NQ(1)
SCORE_TILE_NQ(2)
SCORE_TILE_NQ(4)

KERN_CLONES
void score_tiles(int n_tiles, int n_dims, int n_q, float *restrict out, int ld_out,
                 const float *restrict q, const float *restrict tiles)
{
    const size_t tile_floats = (size_t)n_dims * SCORE_TILE;
    for (int t = 0; t < n_tiles; t++) {
        const float *tile = tiles + (size_t)t * tile_floats;
        float *o = out + (size_t)t * SCORE_TILE;
        /* Groups of 4 heads, then 2, then 1: the tile stays in L1 across groups. */
        int h = 0;
        for (; h + 4 <= n_q; h += 4)
            s_tile_4(n_dims, o + (size_t)h * ld_out, ld_out, q + (size_t)h * n_dims, n_dims, tile);
        for (; h + 2 <= n_q; h += 2)
            s_tile_2(n_dims, o + (size_t)h * ld_out, ld_out, q + (size_t)h * n_dims, n_dims, tile);
        for (; h < n_q; h++)
            s_tile_1(n_dims, o + (size_t)h * ld_out, ld_out, q + (size_t)h * n_dims, n_dims, tile);
    }
}

void score_tiles_ref(int n_tiles, int n_dims, int n_q, float *restrict out, int ld_out,
                     const float *restrict q, const float *restrict tiles)
{
    for (int h = 0; h < n_q; h++)
        for (int t = 0; t < n_tiles; t++)
            for (int l = 0; l < SCORE_TILE; l++) {
                double s = 0.0;
                for (int c = 0; c < n_dims; c++)
                    s += (double)q[h * n_dims + c] *
                         tiles[((size_t)t * n_dims + c) * SCORE_TILE + l];
                out[(size_t)h * ld_out + (size_t)t * SCORE_TILE + l] = (float)s;
            }
}

/* One row against one query: 16 independent partial sums, combined in a fixed order,
 * so every row's result is computed the same way. */
static inline float s_dot(int n, const float *restrict a, const float *restrict b)
{
    float acc[16] = {0};
    int c = 0;
    for (; c + 16 <= n; c += 16)
        for (int i = 0; i < 16; i++) acc[i] += a[c + i] * b[c + i];
    for (int i = 0; c < n; c++, i++) acc[i] += a[c] * b[c];
    for (int w = 8; w > 0; w /= 2)
        for (int i = 0; i < w; i++) acc[i] += acc[i + w];
    return acc[0];
}

KERN_CLONES
void score_rows(int n_rows, int n_dims, int n_q, float *restrict out, int ld_out,
                const float *restrict q, const float *restrict rows, int ld_rows, int accumulate)
{
    for (int r = 0; r < n_rows; r++) {
        const float *row = rows + (size_t)r * ld_rows;
        for (int h = 0; h < n_q; h++) {
            const float s = s_dot(n_dims, q + (size_t)h * n_dims, row);
            float *o = out + (size_t)h * ld_out + r;
            *o = accumulate ? *o + s : s;
        }
    }
}

void score_rows_ref(int n_rows, int n_dims, int n_q, float *restrict out, int ld_out,
                    const float *restrict q, const float *restrict rows, int ld_rows,
                    int accumulate)
{
    for (int h = 0; h < n_q; h++)
        for (int r = 0; r < n_rows; r++) {
            double s = 0.0;
            for (int c = 0; c < n_dims; c++)
                s += (double)q[h * n_dims + c] * rows[(size_t)r * ld_rows + c];
            float *o = out + (size_t)h * ld_out + r;
            *o = accumulate ? (float)(*o + s) : (float)s;
        }
}

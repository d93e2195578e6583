/* bench_scan: the FASA scoring scan against the machine's read bandwidth, in one run.
 *
 * (a) read bandwidth over the very bytes the scan reads: the faster of a streaming sum
 *     with independent accumulators (readbw.h: AVX2 when the CPU has it) and OpenBLAS
 *     cblas_sasum, one thread;
 * (b) the scan: score_tiles over a packed dominant-dim block of N tokens x 32 dims (ntip
 *     16) of one KV head, with the 4 query heads of its GQA group, in 4096-row chunks into
 *     a small score buffer, as a shard scans it.
 * Each figure is the median of --repeats runs; the ratio scan / bandwidth is printed. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cblas.h>

#include "env.h"
#include "readbw.h"
#include "score.h"
#include "timing.h"

#define DIMS 32    /* 2 * ntip, ntip 16 */
#define N_Q 4      /* query heads of one GQA group */
#define CHUNK 4096 /* rows scored per call, as shard.c's SHARD_CHUNK */

static const char usage[] = "usage: bench_scan [--tokens N] [--repeats R] [--help]\n"
                            "  --tokens N    tokens in the packed block (default 1048576)\n"
                            "  --repeats R   runs per figure, the median is printed (default 7)\n";

/* The scan as shard_score runs it: chunks of CHUNK rows into one score buffer. */
static float s_scan(int n_tokens, const float *tiles, const float *q, float *scores)
{
    float sink = 0.0f;
    for (int r0 = 0; r0 < n_tokens; r0 += CHUNK) {
        const int nr = n_tokens - r0 < CHUNK ? n_tokens - r0 : CHUNK;
        score_tiles((nr + SCORE_TILE - 1) / SCORE_TILE, DIMS, N_Q, scores, CHUNK, q,
                    tiles + (size_t)r0 * DIMS);
        sink += scores[0] + scores[(size_t)(N_Q - 1) * CHUNK + nr - 1];
    }
    return sink;
}

int main(int argc, char **argv)
{
    fasa_env_init(NULL, 0); /* FASA_SIMD, read once at start-up */
    long tokens = 1048576, repeats = 7;
    for (int i = 1; i < argc; i++) {
        char *end = NULL;
        if (strcmp(argv[i], "--help") == 0) {
            fputs(usage, stdout);
            return 0;
        } else if (strcmp(argv[i], "--tokens") == 0 && i + 1 < argc) {
            tokens = strtol(argv[++i], &end, 10);
            if (*end || tokens < CHUNK || tokens > (1L << 26)) goto bad;
        } else if (strcmp(argv[i], "--repeats") == 0 && i + 1 < argc) {
            repeats = strtol(argv[++i], &end, 10);
            if (*end || repeats < 1 || repeats > 1000) goto bad;
        } else {
            goto bad;
        }
    }
    openblas_set_num_threads(1);
    tokens = (tokens + SCORE_TILE - 1) / SCORE_TILE * SCORE_TILE;

    const size_t n = (size_t)tokens * DIMS;
    const double bytes = (double)n * sizeof(float);
    float *tiles = aligned_alloc(64, n * sizeof(float));
    float *scores = aligned_alloc(64, (size_t)N_Q * CHUNK * sizeof(float));
    float q[N_Q * DIMS];
    double *t_sum = malloc((size_t)repeats * sizeof(double));
    double *t_blas = malloc((size_t)repeats * sizeof(double));
    double *t_scan = malloc((size_t)repeats * sizeof(double));
    if (!tiles || !scores || !t_sum || !t_blas || !t_scan) {
        fprintf(stderr, "bench_scan: out of memory for %ld tokens\n", tokens);
        return 1;
    }
    uint64_t x = 0x9e3779b97f4a7c15ULL;
    for (size_t i = 0; i < n; i++) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        tiles[i] = (float)((int32_t)(x >> 32)) * (1.0f / 2147483648.0f);
    }
    for (int i = 0; i < N_Q * DIMS; i++) q[i] = 0.01f * (float)(i % 7 - 3);

    /* Interleave the three so that drift in the machine affects all alike. */
    volatile float sink = 0.0f;
    sink += readbw_sum(n, tiles) + s_scan((int)tokens, tiles, q, scores); /* warm-up */
    for (long r = 0; r < repeats; r++) {
        double t0 = timing_now();
        sink += readbw_sum(n, tiles);
        t_sum[r] = timing_now() - t0;
        t0 = timing_now();
        sink += cblas_sasum((blasint)n, tiles, 1);
        t_blas[r] = timing_now() - t0;
        t0 = timing_now();
        sink += s_scan((int)tokens, tiles, q, scores);
        t_scan[r] = timing_now() - t0;
    }
    (void)sink;
    const double gb_sum = bytes / timing_median((int)repeats, t_sum) / 1e9;
    const double gb_blas = bytes / timing_median((int)repeats, t_blas) / 1e9;
    const double ts = timing_median((int)repeats, t_scan), gb_scan = bytes / ts / 1e9;
    const double bw = gb_sum > gb_blas ? gb_sum : gb_blas;

    printf("bench_scan: %ld tokens x %d dims (ntip %d) x %d query heads, %.1f MiB, median of "
           "%ld, 1 thread\n",
           tokens, DIMS, DIMS / 2, N_Q, bytes / (1024.0 * 1024.0), repeats);
    printf("read bandwidth, streaming sum (%s): %7.2f GB/s\n", readbw_sum_name(), gb_sum);
    printf("read bandwidth, OpenBLAS cblas_sasum:   %7.2f GB/s\n", gb_blas);
    printf("read bandwidth (the faster):            %7.2f GB/s\n", bw);
    printf("scoring scan score_tiles:               %7.2f GB/s  (%.2f ms, %.2f ns/token)\n",
           gb_scan, ts * 1e3, ts * 1e9 / (double)tokens);
    printf("scan / bandwidth:                       %7.1f %%   (target >= 80 %%)\n",
           100.0 * gb_scan / bw);
    free(tiles);
    free(scores);
    free(t_sum);
    free(t_blas);
    free(t_scan);
    return 0;
bad:
    fprintf(stderr, "bench_scan: bad arguments (see bench_scan --help)\n");
    return 2;
}

/* bench_kernels: the storage dtypes' kernels on every SIMD path, and OpenBLAS against the
 * hand-written loops, for one decode step of a 32-query-head, 8-KV-head (GQA 4), head_dim
 * 128 layer over N tokens, one thread. The figures of a section are timed interleaved
 * (one run of each, --repeats times) and each is the best of its runs, so that load from
 * other processes moves them alike; each section prints ratios.
 *
 *   convert  dtype_to_f32 of the whole K block (GB/s of f32 written);
 *   scan     the FASA scoring scan: score_tiles_dt over 32 packed dominant dims (ntip 16)
 *            of every KV head with its 4 query heads, in 4096-row chunks (as shard_score);
 *   logits   dense logits of a GQA group against its KV head's row-major keys, in blocks
 *            of --block rows: score_rows (the hand loop the engine uses) vs cblas_sgemm
 *            (M = 4 query heads, N = block rows, K = 128); f16 converts each block first;
 *   attend   the whole dense step (logits, online softmax, P.V): the hand loops
 *            (score_rows + attn_accum, double accumulation) vs sgemm for the logits and
 *            attn_accum_blas for P.V (f32 per block, folded into double partials; what
 *            the engine's dense path now uses). */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cblas.h>

#include "env.h"
#include "attn.h"
#include "score.h"
#include "simd.h"
#include "timing.h"

#define D 128
#define NQ 32
#define NKV 8
#define GRP (NQ / NKV)
#define DOM 32
#define CHUNK 4096

static const char usage[] =
    "usage: bench_kernels [--tokens N] [--block B] [--repeats R] [--help]\n"
    "  --tokens N    context tokens (default 131072; memory about 4 x N KiB)\n"
    "  --block B     rows per dense block for logits/attend (default 256, the engine's)\n"
    "  --repeats R   runs per figure, interleaved; the best is printed (default 7)\n"
    "FASA_SIMD=portable|avx2|avx512 changes only the engine's default path; every path the\n"
    "CPU has is measured here.\n";

static long g_tokens = 131072, g_block = ATTN_BLOCK, g_repeats = 7;
static volatile float g_sink;

typedef void (*bench_fn)(void *arg);

/* Times n jobs interleaved: a warm-up of each, then --repeats rounds of one run of each;
 * best[i] gets job i's fastest run in seconds. */
static void s_time_all(int n, const bench_fn *fn, void *const *arg, double *best)
{
    for (int i = 0; i < n; i++) fn[i](arg[i]), best[i] = INFINITY;
    for (long r = 0; r < g_repeats; r++)
        for (int i = 0; i < n; i++) {
            const double t0 = timing_now();
            fn[i](arg[i]);
            const double t = timing_now() - t0;
            if (t < best[i]) best[i] = t;
        }
}

static void s_fill(size_t n, float *x, uint64_t seed)
{
    uint64_t s = seed;
    for (size_t i = 0; i < n; i++) {
        s = s * 6364136223846793005ULL + 1442695040888963407ULL;
        x[i] = (float)((double)(s >> 40) / (double)(1 << 24) * 2.0 - 1.0);
    }
}

/* ---- convert ---- */
typedef struct conv_arg {
    int path, dtype;
    size_t n;
    const void *src;
    float *dst;
} conv_arg;

static void s_conv(void *a)
{
    conv_arg *c = a;
    const size_t blk = 1 << 16; /* as the engine does: a block at a time, into cache */
    for (size_t i = 0; i < c->n; i += blk)
        dtype_to_f32(c->path, c->dtype, c->n - i < blk ? c->n - i : blk,
                     (const char *)c->src + i * fasa_dtype_size(c->dtype), c->dst);
    g_sink += c->dst[0];
}

/* ---- scan ---- */
typedef struct scan_arg {
    int path, dtype;
    const void *tiles[NKV]; /* (N / 16, DOM, 16) per KV head */
    const float *q;         /* (NQ, DOM) */
    float *scores;          /* (GRP, CHUNK) */
} scan_arg;

static void s_scan(void *a)
{
    scan_arg *s = a;
    const size_t esz = fasa_dtype_size(s->dtype);
    for (int g = 0; g < NKV; g++)
        for (long r0 = 0; r0 < g_tokens; r0 += CHUNK) {
            const int nr = (int)(g_tokens - r0 < CHUNK ? g_tokens - r0 : CHUNK);
            score_tiles_dt(s->path, s->dtype, (nr + SCORE_TILE - 1) / SCORE_TILE, DOM, GRP,
                           s->scores, CHUNK, s->q + (size_t)g * GRP * DOM,
                           (const char *)s->tiles[g] + (size_t)r0 * DOM * esz);
            g_sink += s->scores[nr - 1];
        }
}

/* ---- logits and attend ---- */
typedef struct dense_arg {
    int dtype, blas;             /* blas: 0 loops, 1 sgemm logits and P.V, 2 loops + sgemm P.V */
    const void *k[NKV], *v[NKV]; /* (N, D) row-major per KV head, stored dtype */
    const float *q;              /* (NQ, D) */
    float *lg, *kb, *vb, *pv;    /* scratch: (GRP, block), (block, D) x 2, (GRP, D) */
    float *out;                  /* (NQ, D) */
} dense_arg;

/* Block rows [r0, r0 + nb) of a stored (N, D) array as f32 (converted into buf). */
static const float *s_block(int dtype, const void *base, long r0, int nb, float *buf)
{
    if (dtype == FASA_DTYPE_F32) return (const float *)base + (size_t)r0 * D;
    dtype_to_f32(SIMD_AUTO, dtype, (size_t)nb * D, (const char *)base + (size_t)r0 * D * 2, buf);
    return buf;
}

static void s_logits_block(const dense_arg *a, const float *q, const float *k, int nb)
{
    if (a->blas == 1)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, GRP, nb, D, 1.0f, q, D, k, D, 0.0f,
                    a->lg, (int)g_block);
    else
        score_rows(nb, D, GRP, a->lg, (int)g_block, q, k, D, 0);
}

static void s_logits(void *p)
{
    dense_arg *a = p;
    for (int g = 0; g < NKV; g++)
        for (long r0 = 0; r0 < g_tokens; r0 += g_block) {
            const int nb = (int)(g_tokens - r0 < g_block ? g_tokens - r0 : g_block);
            const float *k = s_block(a->dtype, a->k[g], r0, nb, a->kb);
            s_logits_block(a, a->q + (size_t)g * GRP * D, k, nb);
            g_sink += a->lg[nb - 1];
        }
}

static void s_attend(void *p)
{
    dense_arg *a = p;
    const float scale = 1.0f / sqrtf((float)D);
    for (int g = 0; g < NKV; g++) {
        float m[GRP];
        double l[GRP], o[GRP * D];
        attn_state_init(GRP, D, m, l, o);
        for (long r0 = 0; r0 < g_tokens; r0 += g_block) {
            const int nb = (int)(g_tokens - r0 < g_block ? g_tokens - r0 : g_block);
            const float *k = s_block(a->dtype, a->k[g], r0, nb, a->kb);
            s_logits_block(a, a->q + (size_t)g * GRP * D, k, nb);
            for (int i = 0; i < GRP; i++)
                for (int j = 0; j < nb; j++) a->lg[(size_t)i * g_block + j] *= scale;
            const float *v = s_block(a->dtype, a->v[g], r0, nb, a->vb);
            if (!a->blas) {
                attn_accum(nb, D, GRP, a->lg, (int)g_block, v, D, m, l, o);
                continue;
            }
            attn_accum_blas(nb, D, GRP, a->lg, (int)g_block, v, D, m, l, o, a->pv);
        }
        for (int i = 0; i < GRP; i++)
            attn_finalize(D, l[i], o + (size_t)i * D, a->out + (size_t)(g * GRP + i) * D);
    }
    g_sink += a->out[0];
}

static int s_arg(int argc, char **argv, int *i, const char *name, long lo, long hi, long *out)
{
    if (strcmp(argv[*i], name) || *i + 1 >= argc) return 0;
    char *end = NULL;
    const long v = strtol(argv[++*i], &end, 10);
    if (*end || v < lo || v > hi) {
        fprintf(stderr, "bench_kernels: %s '%s' must be in [%ld, %ld]\n", name, argv[*i], lo, hi);
        exit(2);
    }
    *out = v;
    return 1;
}

int main(int argc, char **argv)
{
    fasa_env_init(NULL, 0); /* FASA_SIMD, read once at start-up */
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help")) {
            fputs(usage, stdout);
            return 0;
        }
        if (!s_arg(argc, argv, &i, "--tokens", CHUNK, 1L << 24, &g_tokens) &&
            !s_arg(argc, argv, &i, "--block", 16, 1 << 16, &g_block) &&
            !s_arg(argc, argv, &i, "--repeats", 1, 999, &g_repeats)) {
            fputs(usage, stderr);
            return 2;
        }
    }
    g_tokens = g_tokens / SCORE_TILE * SCORE_TILE;
    openblas_set_num_threads(1);
    const size_t n = (size_t)g_tokens, nk = n * D;
    printf("bench_kernels: %ld tokens, %d query heads, %d KV heads, head_dim %d, 1 thread, "
           "best of %ld interleaved runs; default path %s\n",
           g_tokens, NQ, NKV, D, g_repeats, simd_path_name(simd_path_default()));
    int paths[3], np = 0;
    for (int p = 0; p <= SIMD_PATH_LAST; p++)
        if (simd_path_supported((simd_path)p)) paths[np++] = p;

    /* Keys and values of every KV head in each dtype, row-major, and packed tiles. */
    float *q = malloc((size_t)NQ * D * 4), *kf = malloc(nk * 4), *vf = malloc(nk * 4);
    float *dom = malloc((size_t)NKV * n * DOM * 4);
    uint16_t *k16[2] = {malloc(nk * 2), malloc(nk * 2)}, *v16[2] = {malloc(nk * 2), malloc(nk * 2)};
    uint16_t *dom16[2] = {malloc((size_t)NKV * n * DOM * 2), malloc((size_t)NKV * n * DOM * 2)};
    float *scratch = malloc((size_t)(4 * g_block * D + 2 * CHUNK * GRP + NQ * D) * 4 + (1 << 18));
    if (!q || !kf || !vf || !dom || !k16[0] || !k16[1] || !v16[0] || !v16[1] || !dom16[0] ||
        !dom16[1] || !scratch) {
        fprintf(stderr, "bench_kernels: out of memory\n");
        return 1;
    }
    s_fill((size_t)NQ * D, q, 1);
    s_fill(nk, kf, 2);
    s_fill(nk, vf, 3);
    s_fill((size_t)NKV * n * DOM, dom, 4);
    for (int t = 0; t < 2; t++) {
        dtype_from_f32(SIMD_AUTO, FASA_DTYPE_F16 + t, nk, kf, k16[t]);
        dtype_from_f32(SIMD_AUTO, FASA_DTYPE_F16 + t, nk, vf, v16[t]);
        dtype_from_f32(SIMD_AUTO, FASA_DTYPE_F16 + t, (size_t)NKV * n * DOM, dom, dom16[t]);
    }
    /* The packed dominant dims are per KV head; the row-major K and V are one KV head's N
     * rows that the dense loops walk once per KV head (8 copies would need 8x the memory;
     * at the default N each walk is 64 MiB of f32, far past the caches). */

    printf("\n[convert] dtype_to_f32 of %zu elements (64 Ki at a time)\n", nk);
    printf("%-10s %-6s %10s %10s\n", "path", "dtype", "ms", "GB/s out");
    {
        conv_arg c[6];
        bench_fn fn[6] = {0};
        void *arg[6] = {0};
        double best[6];
        int nj = 0;
        for (int t = 0; t < 2; t++)
            for (int pi = 0; pi < np; pi++, nj++) {
                c[nj] = (conv_arg){paths[pi], FASA_DTYPE_F16 + t, nk, k16[t], scratch};
                fn[nj] = s_conv, arg[nj] = &c[nj];
            }
        s_time_all(nj, fn, arg, best);
        for (int j = 0; j < nj; j++)
            printf("%-10s %-6s %10.2f %10.2f\n",
                   simd_path_name(c[j].path) ? simd_path_name(c[j].path) : "?",
                   fasa_dtype_name(c[j].dtype) ? fasa_dtype_name(c[j].dtype) : "?", 1e3 * best[j],
                   nk * 4 / best[j] / 1e9);
    }

    printf("\n[scan] score_tiles_dt: %d KV heads x %ld tokens x %d dims, %d query heads each\n",
           NKV, g_tokens, DOM, GRP);
    printf("%-10s %-6s %10s %10s %12s\n", "path", "dtype", "ms", "GB/s read", "f32 / this");
    {
        /* f32 runs score_tiles (target_clones) whatever the path: measured once. */
        scan_arg sa[7];
        bench_fn fn[7] = {0};
        void *arg[7] = {0};
        double best[7];
        int nj = 0;
        for (int pi = -1; pi < np; pi++)
            for (int dt = pi < 0 ? 0 : 1; dt <= (pi < 0 ? 0 : FASA_DTYPE_LAST); dt++, nj++) {
                sa[nj] = (scan_arg){
                    .path = pi < 0 ? SIMD_AUTO : paths[pi], .dtype = dt, .q = q, .scores = scratch};
                for (int g = 0; g < NKV; g++)
                    sa[nj].tiles[g] = dt ? (const void *)(dom16[dt - 1] + (size_t)g * n * DOM)
                                         : (const void *)(dom + (size_t)g * n * DOM);
                fn[nj] = s_scan, arg[nj] = &sa[nj];
            }
        s_time_all(nj, fn, arg, best);
        for (int j = 0; j < nj; j++)
            printf("%-10s %-6s %10.2f %10.2f %11.2fx\n",
                   sa[j].dtype ? simd_path_name(sa[j].path) : "clones",
                   fasa_dtype_name(sa[j].dtype), 1e3 * best[j],
                   (double)NKV * n * DOM * fasa_dtype_size(sa[j].dtype) / best[j] / 1e9,
                   best[0] / best[j]);
    }

    dense_arg da = {.q = q,
                    .lg = scratch,
                    .kb = scratch + (size_t)GRP * g_block,
                    .vb = scratch + (size_t)GRP * g_block + (size_t)g_block * D,
                    .pv = scratch + (size_t)GRP * g_block + 2 * (size_t)g_block * D,
                    .out = scratch + (size_t)GRP * g_block + 2 * (size_t)g_block * D + GRP * D};
    for (int sec = 0; sec < 2; sec++) {
        printf("\n[%s] %s, blocks of %ld rows, default path\n", sec ? "attend" : "logits",
               sec ? "dense attention (logits, online softmax, P.V)" : "dense logits q.K^T",
               g_block);
        printf("%-6s %-22s %10s %10s %14s\n", "dtype", "impl", "ms", "GB/s read", "this / loops");
        /* attend also times the engine's mix: loop logits, sgemm P.V (attn_accum_blas). */
        const int ni = sec ? 3 : 2;
        static const char *const names[3] = {"loops", "cblas_sgemm", "loops + sgemm P.V"};
        dense_arg dj[9];
        bench_fn fn[9] = {0};
        void *arg[9] = {0};
        double best[9];
        for (int j = 0; j < 3 * ni; j++) {
            const int dt = j / ni;
            dj[j] = da;
            dj[j].dtype = dt, dj[j].blas = j % ni;
            for (int g = 0; g < NKV; g++) {
                dj[j].k[g] = dt ? (const void *)k16[dt - 1] : kf;
                dj[j].v[g] = dt ? (const void *)v16[dt - 1] : vf;
            }
            fn[j] = sec ? s_attend : s_logits, arg[j] = &dj[j];
        }
        s_time_all(3 * ni, fn, arg, best);
        for (int j = 0; j < 3 * ni; j++) {
            const double bytes = (double)NKV * nk * fasa_dtype_size(j / ni) * (sec ? 2 : 1);
            printf("%-6s %-22s %10.2f %10.2f", fasa_dtype_name(j / ni), names[j % ni],
                   1e3 * best[j], bytes / best[j] / 1e9);
            if (j % ni)
                printf(" %13.2fx\n", best[j] / best[j - j % ni]);
            else
                printf("\n");
        }
    }
    printf("\n(this / loops > 1: the hand loops are faster)\n");
    free(q), free(kf), free(vf), free(dom), free(scratch);
    for (int t = 0; t < 2; t++) free(k16[t]), free(v16[t]), free(dom16[t]);
    return 0;
}

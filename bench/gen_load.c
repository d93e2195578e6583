/* gen_load: writes a bulk-load directory (README "Bulk load"): k_L.npy and v_L.npy for every
 * layer, each (T, n_kv_heads, head_dim) of float32 or float16, values uniform in [-1, 1)
 * from a seeded generator, for bench/load_bench.sh and by hand. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "simd.h"

static const char usage[] =
    "usage: gen_load --out DIR --tokens T --layers L --kv-heads K --head-dim D [--f16] [--seed S]\n"
    "\n"
    "Writes DIR/k_L.npy and DIR/v_L.npy (T, K, D) for L = 0 .. layers - 1: the per-layer\n"
    "layout 'fasa load' reads, float32 (default) or float16.\n";

static uint64_t s_next(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static int s_write(const char *path, int f16, long T, long K, long D, uint64_t *seed)
{
    FILE *f = fopen(path, "wb");
    if (!f) return -1;
    char h[256];
    int n = snprintf(h, sizeof(h),
                     "{'descr': '%s', 'fortran_order': False, 'shape': (%ld, %ld, %ld), }",
                     f16 ? "<f2" : "<f4", T, K, D);
    while ((10 + n + 1) % 64) h[n++] = ' ';
    h[n++] = '\n';
    const unsigned char pre[10] = {
        0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0, (unsigned char)(n & 0xff), (unsigned char)(n >> 8)};
    int rc = fwrite(pre, 1, 10, f) != 10 || fwrite(h, 1, (size_t)n, f) != (size_t)n;
    const size_t row = (size_t)K * D, es = f16 ? 2 : 4;
    unsigned char *buf = malloc(row * es);
    for (long t = 0; t < T && !rc && buf; t++) {
        for (size_t i = 0; i < row; i++) {
            const float x = (float)((s_next(seed) >> 40) * (1.0 / 8388608.0) - 1.0);
            if (f16) {
                const uint16_t v = fasa_f32_to_f16(x);
                memcpy(buf + 2 * i, &v, 2);
            } else {
                memcpy(buf + 4 * i, &x, 4);
            }
        }
        rc = fwrite(buf, es, row, f) != row;
    }
    free(buf);
    return fclose(f) || rc || !buf ? -1 : 0;
}

int main(int argc, char **argv)
{
    const char *out = NULL;
    long T = 0, L = 0, K = 0, D = 0, seed = 1;
    int f16 = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help")) {
            fputs(usage, stdout);
            return 0;
        } else if (!strcmp(argv[i], "--f16")) {
            f16 = 1;
        } else if (i + 1 < argc && !strcmp(argv[i], "--out")) {
            out = argv[++i];
        } else if (i + 1 < argc && !strcmp(argv[i], "--tokens")) {
            T = strtol(argv[++i], NULL, 10);
        } else if (i + 1 < argc && !strcmp(argv[i], "--layers")) {
            L = strtol(argv[++i], NULL, 10);
        } else if (i + 1 < argc && !strcmp(argv[i], "--kv-heads")) {
            K = strtol(argv[++i], NULL, 10);
        } else if (i + 1 < argc && !strcmp(argv[i], "--head-dim")) {
            D = strtol(argv[++i], NULL, 10);
        } else if (i + 1 < argc && !strcmp(argv[i], "--seed")) {
            seed = strtol(argv[++i], NULL, 10);
        } else {
            fprintf(stderr, "gen_load: unknown option '%s'\n%s", argv[i], usage);
            return 2;
        }
    }
    if (!out || T < 1 || L < 1 || K < 1 || D < 1) {
        fprintf(stderr, "gen_load: --out, --tokens, --layers, --kv-heads and --head-dim are "
                        "required (positive)\n");
        return 2;
    }
    mkdir(out, 0755);
    uint64_t s = (uint64_t)seed;
    char p[4096];
    for (long l = 0; l < L; l++)
        for (int kv = 0; kv < 2; kv++) {
            snprintf(p, sizeof(p), "%s/%c_%ld.npy", out, kv ? 'v' : 'k', l);
            if (s_write(p, f16, T, K, D, &s)) {
                fprintf(stderr, "gen_load: cannot write %s\n", p);
                return 1;
            }
        }
    return 0;
}

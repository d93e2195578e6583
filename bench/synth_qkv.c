/* synth_qkv: writes the synthetic long-context stream of data/synth.h (32 query heads,
 * 8 KV heads, head_dim 128, 16 signal FCs per KV head: FASA's dominant FCs are real here)
 * as a one-layer QKV1 dump (format in shared/data/models/stories260K/README.md: tokens all
 * 0, logits none), readable by 'fasa calibrate' and 'fasa replay'. */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "synth.h"

static const char usage[] = "usage: synth_qkv --tokens N --out DUMP.qkv [--seed S]\n"
                            "\n"
                            "Writes N positions (256 .. 262144) of the synthetic d128 stream "
                            "(data/synth.h)\n"
                            "as a one-layer QKV1 dump: q, k, v of every position.\n";

int main(int argc, char **argv)
{
    long n = 0, seed = 1;
    const char *out = NULL;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0) {
            fputs(usage, stdout);
            return 0;
        } else if (i + 1 < argc && strcmp(argv[i], "--tokens") == 0) {
            n = strtol(argv[++i], NULL, 10);
        } else if (i + 1 < argc && strcmp(argv[i], "--seed") == 0) {
            seed = strtol(argv[++i], NULL, 10);
        } else if (i + 1 < argc && strcmp(argv[i], "--out") == 0) {
            out = argv[++i];
        } else {
            fprintf(stderr, "synth_qkv: unknown or incomplete argument '%s'\n%s", argv[i], usage);
            return 2;
        }
    }
    if (n < 256 || n > 262144 || !out) {
        fprintf(stderr, "synth_qkv: --tokens N in [256, 262144] and --out are required\n%s", usage);
        return 2;
    }
    synth_cfg sc = synth_cfg_default((int)n);
    sc.seed = (uint64_t)seed;
    synth_t s;
    char err[256];
    if (synth_init(&s, &sc, err, sizeof(err))) {
        fprintf(stderr, "synth_qkv: %s\n", err);
        return 1;
    }
    const size_t H = (size_t)sc.n_heads, G = (size_t)sc.n_kv_heads, d = (size_t)sc.head_dim;
    float *q = malloc((size_t)n * H * d * sizeof(float));
    float *k = malloc((size_t)n * G * d * sizeof(float));
    float *v = malloc((size_t)n * G * d * sizeof(float));
    FILE *f = q && k && v ? fopen(out, "wb") : NULL;
    int ok = f != NULL;
    if (ok) {
        synth_kv(&s, 0, (int)n, k, v);
        for (long t = 0; t < n; t++) synth_query(&s, (int)t, q + (size_t)t * H * d);
        const int32_t hdr[9] = {1, (int32_t)n, 1, (int32_t)H, (int32_t)G, (int32_t)d, 0, 0, 0};
        ok = fwrite("QKV1", 1, 4, f) == 4 && fwrite(hdr, sizeof(int32_t), 9, f) == 9;
        const int32_t zero = 0;
        for (long t = 0; ok && t < n; t++) ok = fwrite(&zero, sizeof(zero), 1, f) == 1;
        ok = ok && fwrite(q, sizeof(float), (size_t)n * H * d, f) == (size_t)n * H * d &&
             fwrite(k, sizeof(float), (size_t)n * G * d, f) == (size_t)n * G * d &&
             fwrite(v, sizeof(float), (size_t)n * G * d, f) == (size_t)n * G * d;
        ok = fclose(f) == 0 && ok;
    }
    if (!ok) fprintf(stderr, "synth_qkv: cannot write %s: %s\n", out, strerror(errno));
    free(q), free(k), free(v);
    synth_free(&s);
    return ok ? 0 : 1;
}

/* bench_step: one decode step through the engine (fasa_engine_attend), fasa against dense,
 * on synthetic data (data/synth.h): 32 query heads, 8 KV heads, head_dim 128, ntip 16,
 * B 256, one layer, 128K tokens by default. The fasa profile names the true signal FCs
 * (--calibrate: found by fasa_calibrate on a 4096-token sample instead). Prints the median
 * step time of each, the ratio dense/fasa and the KV bytes each step reads. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cblas.h>

#include "env.h"
#include "calib.h"
#include "engine.h"
#include "synth.h"
#include "timing.h"

static const char usage[] =
    "usage: bench_step [--tokens N] [--steps S] [--shards N] [--calibrate] [--help]\n"
    "  --tokens N    context length (default 131072)\n"
    "  --steps S     timed decode steps per method, after one warm-up (default 9)\n"
    "  --shards N    in-process shards (default 1)\n"
    "  --calibrate   profile from fasa_calibrate on a 4096-token sample (default: the true\n"
    "                signal FCs of the generator)\n";

static int s_arg_long(const char *text, long lo, long hi, long *out)
{
    char *end;
    const long v = text ? strtol(text, &end, 10) : 0;
    if (!text || !*text || *end || v < lo || v > hi) return -1;
    *out = v;
    return 0;
}

int main(int argc, char **argv)
{
    fasa_env_init(NULL, 0); /* FASA_SIMD, read once at start-up */
    long tokens = 131072, steps = 9, shards = 1;
    int calibrate = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--help") == 0) {
            fputs(usage, stdout);
            return 0;
        } else if (strcmp(a, "--calibrate") == 0) {
            calibrate = 1;
        } else if (strcmp(a, "--tokens") == 0 && i + 1 < argc) {
            if (s_arg_long(argv[++i], 8192, 1L << 24, &tokens)) goto bad;
        } else if (strcmp(a, "--steps") == 0 && i + 1 < argc) {
            if (s_arg_long(argv[++i], 1, 1000, &steps)) goto bad;
        } else if (strcmp(a, "--shards") == 0 && i + 1 < argc) {
            if (s_arg_long(argv[++i], 1, 64, &shards)) goto bad;
        } else {
            goto bad;
        }
    }
    openblas_set_num_threads(1);

    const int T = (int)tokens, S = (int)steps, B = 256, H = 32, G = 8, d = 128;
    const int n_ctx = T - S - 1; /* bulk; every step (warm-up included) appends one token */
    char err[512];
    synth_cfg sc = synth_cfg_default(T);
    synth_t syn;
    if (synth_init(&syn, &sc, err, sizeof(err))) {
        fprintf(stderr, "bench_step: %s\n", err);
        return 1;
    }
    fasa_profile *prof = NULL;
    if (calibrate) {
        synth_sample smp;
        if (synth_sample_make(&syn, 4096, 16, &smp, err, sizeof(err))) {
            fprintf(stderr, "bench_step: %s\n", err);
            return 1;
        }
        fasa_calib_opts co = {.ntip = 16,
                              .window = B,
                              .pos_begin = smp.pos_begin,
                              .pos_end = smp.pos_end,
                              .pos_step = smp.pos_step,
                              .pairing = sc.pairing};
        prof = fasa_calibrate(&smp.act, &co, err, sizeof(err));
        synth_sample_free(&smp);
    } else {
        prof = synth_true_profile(&syn, B);
    }
    if (!prof) {
        fprintf(stderr, "bench_step: no profile: %s\n", calibrate ? err : "out of memory");
        return 1;
    }

    fasa_engine_t *eng = fasa_engine_new((int)shards, FASA_DEFAULT_BLOCK);
    const size_t row = (size_t)G * d, chunk = 4096;
    float *k = malloc(chunk * row * sizeof(float)), *v = malloc(chunk * row * sizeof(float));
    float *q = malloc((size_t)H * d * sizeof(float)), *out = malloc((size_t)H * d * sizeof(float));
    double *ms = malloc(2 * (size_t)S * sizeof(double));
    int64_t bytes[2] = {0, 0};
    const uint8_t no_dense = 0;
    static const char *const ids[2] = {"fasa", "dense"};
    fasa_error fe;
    if (!eng || !k || !v || !q || !out || !ms) {
        fprintf(stderr, "bench_step: out of memory\n");
        return 1;
    }
    for (int i = 0; i < 2; i++) {
        fasa_session_config cfg = {.n_layers = 1,
                                   .n_heads = H,
                                   .n_kv_heads = G,
                                   .head_dim = d,
                                   .pairing = sc.pairing,
                                   .profile = i == 0 ? prof : NULL,
                                   .method = i == 0 ? FASA_METHOD_FASA : FASA_METHOD_DENSE,
                                   .budget = B,
                                   .gqa = FASA_GQA_PER_HEAD,
                                   .dense_layers = &no_dense};
        if (fasa_engine_create(eng, ids[i], &cfg, &fe)) goto engine_err;
    }
    double t0 = timing_now();
    for (int p0 = 0; p0 < n_ctx; p0 += (int)chunk) {
        const int n = n_ctx - p0 < (int)chunk ? n_ctx - p0 : (int)chunk;
        synth_kv(&syn, p0, n, k, v);
        for (int i = 0; i < 2; i++)
            if (fasa_engine_append(eng, ids[i], 0, p0, n, k, v, &fe)) goto engine_err;
    }
    printf("bench_step: %d tokens, %d query heads / %d KV heads, head_dim %d, ntip 16, B %d, "
           "1 layer, %ld shard(s), profile %s (%.1f s to build the context)\n",
           T, H, G, d, B, shards, calibrate ? "calibrated" : "true signal FCs", timing_now() - t0);

    /* Step s (s = 0 is the warm-up) decodes position n_ctx + s in both sessions. */
    for (int s = 0; s <= S; s++) {
        const int t = n_ctx + s;
        synth_query(&syn, t, q);
        synth_kv(&syn, t, 1, k, v);
        for (int i = 0; i < 2; i++) {
            fasa_attend_req req = fasa_attend_step(0, q, k, v);
            fasa_step_stats st;
            t0 = timing_now();
            if (fasa_engine_attend(eng, ids[i], &req, out, NULL, &st, &fe)) goto engine_err;
            const double dt = 1e3 * (timing_now() - t0);
            if (s > 0) ms[i * S + s - 1] = dt;
            bytes[i] = st.bytes_read;
        }
    }
    const double mf = timing_median(S, ms), md = timing_median(S, ms + S);
    const double mib = 1024.0 * 1024.0;
    printf("fasa   step: %8.2f ms (median of %d), %8.1f MiB read, %6.2f GB/s effective\n", mf, S,
           bytes[0] / mib, bytes[0] / (mf * 1e6));
    printf("dense  step: %8.2f ms (median of %d), %8.1f MiB read, %6.2f GB/s effective\n", md, S,
           bytes[1] / mib, bytes[1] / (md * 1e6));
    printf("dense/fasa time ratio: %.2fx   bytes ratio: %.2fx\n", md / mf,
           (double)bytes[1] / (double)bytes[0]);
    fasa_engine_destroy(&eng);
    fasa_profile_destroy(&prof);
    synth_free(&syn);
    free(k);
    free(v);
    free(q);
    free(out);
    free(ms);
    return 0;
engine_err:
    fprintf(stderr, "bench_step: %s\n", fe.msg);
    return 1;
bad:
    fprintf(stderr, "bench_step: bad arguments (see bench_step --help)\n");
    return 2;
}

/* merge_bench: exact vs local merge (engine.h fasa_merge) on the embedded engine, at 1 .. S
 * shards, over the synthetic d128 stream (client/synth.h: 32 query / 8 KV heads, 16 signal
 * FCs, its true profile), method fasa, f16, B 256: for each shard count, R decode steps
 * (queries of the last R positions over the whole context) print
 *   recall   of the exact top-B by the union of the shards' own top ceil(B (1 + eps) / S)
 *            (each shard's local set found by a 1-shard engine holding that shard's rows
 *            alone, scored by the same code), mean over steps and heads;
 *   error    max |local - exact| / max |exact| of the outputs, median and max over steps;
 *   time     p50 step ms of each, in-process (the shards on this machine's threads).
 *
 *   merge_bench [--tokens N] [--shards S] [--reps R] [--eps E]   (default 65536, 3, 8, 0.25)
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine.h"
#include "synth.h"
#include "timing.h"

#define B 256

static void s_die(const char *what, const fasa_error *e)
{
    fprintf(stderr, "merge_bench: %s: %s\n", what, e ? e->msg : "out of memory");
    exit(1);
}

int main(int argc, char **argv)
{
    long N = 65536, S_max = 3, R = 8;
    double eps = 0.25;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help")) {
            puts("usage: merge_bench [--tokens N] [--shards S] [--reps R] [--eps E]");
            return 0;
        } else if (i + 1 < argc && !strcmp(argv[i], "--tokens")) {
            N = strtol(argv[++i], NULL, 10);
        } else if (i + 1 < argc && !strcmp(argv[i], "--shards")) {
            S_max = strtol(argv[++i], NULL, 10);
        } else if (i + 1 < argc && !strcmp(argv[i], "--reps")) {
            R = strtol(argv[++i], NULL, 10);
        } else if (i + 1 < argc && !strcmp(argv[i], "--eps")) {
            eps = strtod(argv[++i], NULL);
        }
    }
    char err[256];
    synth_cfg sc = synth_cfg_default((int)N);
    synth_t syn;
    if (synth_init(&syn, &sc, err, sizeof(err))) return fprintf(stderr, "%s\n", err), 1;
    fasa_profile *prof = synth_true_profile(&syn, B);
    const int H = sc.n_heads, G = sc.n_kv_heads, d = sc.head_dim;
    const size_t row = (size_t)G * d;
    float *k = malloc((size_t)N * row * 4), *v = malloc((size_t)N * row * 4);
    float *q = malloc((size_t)H * d * 4), *oe = malloc((size_t)H * d * 4),
          *ol = malloc((size_t)H * d * 4);
    int32_t *sel = malloc((size_t)H * B * 4), *lsel = malloc((size_t)H * B * 4);
    uint8_t *in = calloc((size_t)N, 1);
    if (!prof || !k || !v || !q || !oe || !ol || !sel || !lsel || !in) s_die("setup", NULL);
    synth_kv(&syn, 0, (int)N, k, v);
    const uint8_t no_dense = 0;
    const fasa_session_config cfg = {.n_layers = 1,
                                     .n_heads = H,
                                     .n_kv_heads = G,
                                     .head_dim = d,
                                     .pairing = sc.pairing,
                                     .profile = prof,
                                     .method = FASA_METHOD_FASA,
                                     .budget = B,
                                     .dense_layers = &no_dense,
                                     .dtype = 1};
    printf("merge_bench: %ld tokens, %d query / %d KV heads, head_dim %d, fasa, f16, B %d, eps "
           "%.2f, %ld steps, block %d\n",
           N, H, G, d, B, eps, R, FASA_DEFAULT_BLOCK);
    printf("shards  local B  recall(mean)  recall(min)  err p50     err max     exact ms  local "
           "ms  exact/local\n");
    fasa_error fe;
    for (int S = 1; S <= S_max; S++) {
        fasa_engine_t *e = fasa_engine_new(S, FASA_DEFAULT_BLOCK);
        if (!e || fasa_engine_set_merge_eps(e, eps)) s_die("engine", NULL);
        if (fasa_engine_create(e, "s", &cfg, &fe)) s_die("create", &fe);
        for (long p = 0; p < N; p += 4096)
            if (fasa_engine_append(e, "s", 0, (int)p, (int)(N - p < 4096 ? N - p : 4096),
                                   k + p * row, v + p * row, &fe))
                s_die("append", &fe);
        const int bl = fasa_engine_local_budget(e, B);
        /* Each shard's rows alone in a 1-shard engine (positions renumbered in order: the
         * scores do not depend on them, and ties keep their order). */
        fasa_engine_t **sub = calloc((size_t)S, sizeof(*sub));
        int32_t **map = calloc((size_t)S, sizeof(*map));
        for (int s = 0; s < S; s++) {
            sub[s] = fasa_engine_new(1, FASA_DEFAULT_BLOCK);
            map[s] = malloc((size_t)N * 4);
            if (!sub[s] || !map[s] || fasa_engine_create(sub[s], "s", &cfg, &fe)) s_die("sub", &fe);
            int n = 0;
            for (long b0 = (long)s * FASA_DEFAULT_BLOCK; b0 < N;
                 b0 += (long)S * FASA_DEFAULT_BLOCK) {
                const int m = (int)(N - b0 < FASA_DEFAULT_BLOCK ? N - b0 : FASA_DEFAULT_BLOCK);
                if (fasa_engine_append(sub[s], "s", 0, n, m, k + b0 * row, v + b0 * row, &fe))
                    s_die("sub append", &fe);
                for (int j = 0; j < m; j++) map[s][n + j] = (int32_t)(b0 + j);
                n += m;
            }
        }
        double *te = malloc((size_t)R * 8), *tl = malloc((size_t)R * 8),
               *er = malloc((size_t)R * 8);
        double rsum = 0, rmin = 1;
        for (long it = 0; it < R; it++) {
            synth_query(&syn, (int)(N - R + it), q);
            fasa_attend_req req = {.q = q, .method = -1, .gqa = -1, .max_pos = -1};
            req.merge = FASA_MERGE_EXACT;
            double t0 = timing_now();
            if (fasa_engine_attend(e, "s", &req, oe, sel, NULL, &fe)) s_die("exact", &fe);
            te[it] = 1e3 * (timing_now() - t0);
            req.merge = FASA_MERGE_LOCAL;
            t0 = timing_now();
            if (fasa_engine_attend(e, "s", &req, ol, NULL, NULL, &fe)) s_die("local", &fe);
            tl[it] = 1e3 * (timing_now() - t0);
            double mx = 0, md = 0;
            for (int i = 0; i < H * d; i++) {
                mx = fabs(oe[i]) > mx ? fabs(oe[i]) : mx;
                md = fabs(oe[i] - ol[i]) > md ? fabs(oe[i] - ol[i]) : md;
            }
            er[it] = mx > 0 ? md / mx : md;
            /* Recall: each head's exact top-B against the union of the shards' top bl. */
            for (int h = 0; h < H; h++) memset(in, 0, (size_t)N);
            double hits = 0, total = 0;
            uint8_t *mark = calloc((size_t)H * (size_t)N / 8 + 1, 1);
            for (int s = 0; s < S; s++) {
                fasa_attend_req r2 = {.q = q, .method = -1, .budget = bl, .gqa = -1, .max_pos = -1};
                if (fasa_engine_attend(sub[s], "s", &r2, ol, lsel, NULL, &fe)) s_die("sub", &fe);
                for (int h = 0; h < H; h++)
                    for (int i = 0; i < bl; i++) {
                        const int32_t p = lsel[(size_t)h * bl + i];
                        if (p < 0) continue;
                        const size_t bit = (size_t)h * N + (size_t)map[s][p];
                        mark[bit / 8] |= (uint8_t)(1u << (bit % 8));
                    }
            }
            for (int h = 0; h < H; h++) {
                double hh = 0, tt = 0;
                for (int i = 0; i < B; i++) {
                    const int32_t p = sel[(size_t)h * B + i];
                    if (p < 0) continue;
                    const size_t bit = (size_t)h * N + (size_t)p;
                    tt++;
                    hh += (mark[bit / 8] >> (bit % 8)) & 1;
                }
                if (tt > 0 && hh / tt < rmin) rmin = hh / tt;
                hits += hh, total += tt;
            }
            free(mark);
            rsum += total > 0 ? hits / total : 1;
        }
        qsort(te, (size_t)R, 8, timing_cmp);
        qsort(tl, (size_t)R, 8, timing_cmp);
        qsort(er, (size_t)R, 8, timing_cmp);
        printf("%6d  %7d  %12.4f  %11.4f  %10.3g  %10.3g  %8.3f  %8.3f  %11.2f\n", S, bl,
               rsum / (double)R, rmin, er[R / 2], er[R - 1], te[R / 2], tl[R / 2],
               te[R / 2] / tl[R / 2]);
        for (int s = 0; s < S; s++) fasa_engine_destroy(&sub[s]), free(map[s]);
        free(sub), free(map), free(te), free(tl), free(er);
        fasa_engine_destroy(&e);
    }
    free(k), free(v), free(q), free(oe), free(ol), free(sel), free(lsel), free(in);
    fasa_profile_destroy(&prof);
    synth_free(&syn);
    return 0;
}

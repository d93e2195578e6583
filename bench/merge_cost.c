/* merge_cost: what rank 0 spends per step merging P shards' results, by P, for the
 * performance model (bench/perfmodel.py): the exact merge's candidate select (each unit's
 * P x B candidates copied together, topk_select to the best B, topk_sort: what the engine's
 * s_plan_select does) and the partials' merge (attn_merge of P partials per head and
 * attn_finalize: s_plan_finish), at 32 units / heads, head_dim 128, B 256.
 *
 *   merge_cost [--json FILE] [--max-shards N]
 * Prints and writes {"budget": B, "units": U, "select_ms": {P: ms}, "merge_ms": {P: ms}} for
 * P = 1, 2, 4, .. N (default 256), each the median of several repetitions. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "attn.h"
#include "timing.h"
#include "topk.h"

#define UNITS 32
#define BUDGET 256
#define HEAD_DIM 128

static uint64_t s_rng = 88172645463325252ull;
static float s_uniform(void)
{
    s_rng ^= s_rng << 13, s_rng ^= s_rng >> 7, s_rng ^= s_rng << 17;
    return (float)((s_rng >> 40) * (1.0 / 16777216.0));
}

int main(int argc, char **argv)
{
    const char *json = NULL;
    int max_shards = 256;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help")) {
            puts("usage: merge_cost [--json FILE] [--max-shards N]");
            return 0;
        } else if (i + 1 < argc && !strcmp(argv[i], "--json")) {
            json = argv[++i];
        } else if (i + 1 < argc && !strcmp(argv[i], "--max-shards")) {
            max_shards = atoi(argv[++i]);
        }
    }
    FILE *f = json ? fopen(json, "w") : NULL;
    if (json && !f) return 1;
    if (f) fprintf(f, "{\"budget\": %d, \"units\": %d, \"head_dim\": %d", BUDGET, UNITS, HEAD_DIM);
    char sel_txt[4096] = "", mrg_txt[4096] = "";
    for (int P = 1; P <= max_shards; P *= 2) {
        const size_t nc = (size_t)P * BUDGET;
        topk_cand *cands = malloc((size_t)UNITS * nc * sizeof(*cands)),
                  *mu = malloc(nc * sizeof(*mu));
        float *m = malloc((size_t)P * sizeof(float)), out[HEAD_DIM];
        double *l = malloc((size_t)P * sizeof(double)), *o = malloc((size_t)P * HEAD_DIM * 8);
        double oh[HEAD_DIM], lh;
        float mh;
        for (size_t i = 0; i < (size_t)UNITS * nc; i++)
            cands[i] = (topk_cand){s_uniform(), (int32_t)(i % 1000000)};
        for (int p = 0; p < P; p++) {
            m[p] = s_uniform();
            l[p] = 1 + s_uniform();
            for (int c = 0; c < HEAD_DIM; c++) o[p * HEAD_DIM + c] = s_uniform();
        }
        const int reps = P <= 16 ? 21 : 7;
        double ts[21], tm[21];
        float sink = 0;
        for (int r = 0; r < reps; r++) {
            double t0 = timing_now();
            for (int u = 0; u < UNITS; u++) {
                memcpy(mu, cands + (size_t)u * nc, nc * sizeof(*mu));
                const int n = topk_select((int)nc, BUDGET, mu);
                topk_sort(n, mu);
                sink += mu[0].score;
            }
            ts[r] = timing_now() - t0;
            t0 = timing_now();
            for (int h = 0; h < UNITS; h++) {
                attn_merge(P, HEAD_DIM, m, l, o, &mh, &lh, oh);
                attn_finalize(HEAD_DIM, lh, oh, out);
                sink += out[0];
            }
            tm[r] = timing_now() - t0;
        }
        qsort(ts, (size_t)reps, sizeof(double), timing_cmp);
        qsort(tm, (size_t)reps, sizeof(double), timing_cmp);
        printf("shards %4d: select %8.3f ms (%.2f ns per candidate), merge %7.3f ms%s\n", P,
               1e3 * ts[reps / 2], 1e9 * ts[reps / 2] / ((double)UNITS * (double)nc),
               1e3 * tm[reps / 2], sink == 12345.f ? " " : "");
        snprintf(sel_txt + strlen(sel_txt), sizeof(sel_txt) - strlen(sel_txt), "%s\"%d\": %.5f",
                 P > 1 ? ", " : "", P, 1e3 * ts[reps / 2]);
        snprintf(mrg_txt + strlen(mrg_txt), sizeof(mrg_txt) - strlen(mrg_txt), "%s\"%d\": %.5f",
                 P > 1 ? ", " : "", P, 1e3 * tm[reps / 2]);
        free(cands), free(mu), free(m), free(l), free(o);
    }
    if (f) {
        fprintf(f, ", \"select_ms\": {%s}, \"merge_ms\": {%s}}\n", sel_txt, mrg_txt);
        fclose(f);
    }
    return 0;
}

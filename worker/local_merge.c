/* Local merge on one shard. See local_merge.h. */
#include "local_merge.h"

#include <stdlib.h>

int shard_attend_local(shard_t *shard, const shard_step *step, float *m, double *l, double *o)
{
    const int units = shard_units(shard, step->gqa), b = step->budget;
    topk_cand *cands = malloc((size_t)units * b * sizeof(*cands));
    topk_cand *thr = malloc((size_t)units * sizeof(*thr));
    int *n_cands = malloc((size_t)units * sizeof(int));
    uint8_t *have = malloc((size_t)units);
    int rc = -1;
    if (cands && thr && n_cands && have && !shard_score(shard, step, cands, n_cands)) {
        /* Each unit's candidates come best-first: its last one is its threshold. */
        for (int u = 0; u < units; u++) {
            have[u] = n_cands[u] > 0;
            if (have[u]) thr[u] = cands[(size_t)u * b + n_cands[u] - 1];
        }
        rc = shard_attend(shard, step, thr, have, m, l, o);
    }
    free(cands);
    free(thr);
    free(n_cands);
    free(have);
    return rc;
}

int shard_score_attend(shard_t *shard, const shard_step *step, topk_cand *cands, int *n_cands,
                       topk_cand *thr, uint8_t *have, float *m, double *l, double *o, double *aux)
{
    const int units = shard_units(shard, step->gqa), b = step->budget;
    if (shard_score(shard, step, cands, n_cands)) return -1;
    /* Each unit's candidates come best-first (shard.h): its last one is its threshold, as
     * the coordinator's sorted top-B of this shard's candidates alone would make it. */
    for (int u = 0; u < units; u++) {
        have[u] = n_cands[u] > 0;
        if (have[u]) thr[u] = cands[(size_t)u * b + n_cands[u] - 1];
    }
    if (shard_attend(shard, step, thr, have, m, l, o)) return -1;
    if (step->method == SHARD_SPARQ || step->method == SHARD_FASA_PLUS)
        shard_sparq_aux(shard, step, aux);
    return 0;
}

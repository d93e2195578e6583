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

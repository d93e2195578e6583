/* Local merge on one shard (coord/engine.h fasa_merge): phase 1 and phase 2 of a sparse
 * step in one, with the shard's own candidates as the threshold, so a step needs one round
 * trip and no global select. */
#ifndef FASA_WORKER_LOCAL_MERGE_H
#define FASA_WORKER_LOCAL_MERGE_H

#include "shard.h"

/* shard_score with step->budget (the shard's own budget per unit), then shard_attend over
 * the candidates it kept: each unit's threshold is its last (worst) candidate kept, a unit
 * with none selects nothing. m, l, o as shard_attend. 0, or -1 when out of memory. */
int shard_attend_local(shard_t *shard, const shard_step *step, float *m, double *l, double *o);

#endif

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

/* Both phases of an exact sparse step in one, for a step whose visible rows are all on this
 * shard (coord/engine.c's one-exchange step): shard_score with step->budget into cands
 * (units, budget) and n_cands (units) as it fills them, then shard_attend with each unit's
 * threshold its own worst candidate kept (a unit with none selects nothing), then for SPARQ
 * and FASA_PLUS shard_sparq_aux into aux (else aux is not touched and may be NULL). With no
 * other shard holding a visible row, the coordinator's global top-B of these candidates is
 * these candidates, so this gives the bits of score, global select and attend. thr (units)
 * and have (units) are the caller's scratch. 0, or -1 when out of memory. */
int shard_score_attend(shard_t *shard, const shard_step *step, topk_cand *cands, int *n_cands,
                       topk_cand *thr, uint8_t *have, float *m, double *l, double *o, double *aux);

#endif

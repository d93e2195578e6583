/* Wall time per phase of a decode step, for `fasa bench attend` (issue 13, item 1).
 *
 * Off unless a benchmark turns it on; then each phase adds its elapsed time with one pair of
 * timestamps per phase and step (or per selection unit inside a shard), never per row, so
 * the step is not measurably slower. Process-wide counters, added to atomically: the
 * engine's phases (scan = phase 1 on the shards, select = the candidate merge, attend =
 * phase 2 on the shards, merge = the partial merge) are wall times of the coordinating
 * thread; inside phase 2 the shards split their time into gather and the attention kernel
 * (FASA_PHASE_GATHER, FASA_PHASE_KERNEL), summed over every thread. */
#ifndef FASA_WORKER_PHASE_H
#define FASA_WORKER_PHASE_H

typedef enum fasa_phase {
    FASA_PHASE_SCAN = 0,
    FASA_PHASE_SELECT,
    FASA_PHASE_ATTEND,
    FASA_PHASE_MERGE,
    FASA_PHASE_GATHER, /* inside ATTEND, per thread */
    FASA_PHASE_KERNEL, /* inside ATTEND, per thread */
    FASA_PHASE_N
} fasa_phase;

/* Turns the counters on or off (off: fasa_phase_now returns 0 and adds nothing). */
void fasa_phase_enable(int on);
/* A timestamp in seconds when on, else 0. */
double fasa_phase_now(void);
/* Adds now - t0 to phase ph when on (t0 from fasa_phase_now); returns now (or 0). */
double fasa_phase_add(fasa_phase ph, double t0);
/* Seconds per phase since the last reset; and the reset. */
void fasa_phase_get(double out[FASA_PHASE_N]);
void fasa_phase_reset(void);

#endif

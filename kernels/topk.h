/* Top-k selection of (score, position) candidates under one total order: a higher score
 * first, then a lower position; NaN ranks below every number. Positions are unique
 * within one selection, so the order is strict and every selection is reproducible,
 * whatever order the candidates arrive in or how they are split across shards. */
#ifndef FASA_KERNELS_TOPK_H
#define FASA_KERNELS_TOPK_H

#include <stdint.h>

typedef struct topk_cand {
    float score; /* ranking score (unscaled partial or full dot product) */
    int32_t pos; /* absolute token position */
} topk_cand;

/* 1 when a ranks strictly before b in the total order. */
static inline int topk_better(topk_cand a, topk_cand b)
{
    if (a.score > b.score) return 1;
    if (a.score < b.score) return 0;
    if (a.score == b.score) return a.pos < b.pos;
    const int a_nan = a.score != a.score, b_nan = b.score != b.score;
    if (a_nan != b_nan) return b_nan;
    return a.pos < b.pos;
}

/* Reorders items (a permutation) so that items[0..min(k, n)) are the k best, in the order
 * they had among items (a stable partition: candidates given in ascending position stay so).
 * O(n): the k-th best key is found bit by bit by vectorised counts (topk.c); inputs of more
 * than 4096 candidates go to topk_select_qs instead. Returns min(k, n); k <= 0 gives 0. */
int topk_select(int n, int k, topk_cand *items);
/* The same set by quickselect (median-of-three pivots, a sort when partitions keep coming
 * out lopsided), in no particular order: the second implementation the tests compare. */
int topk_select_qs(int n, int k, topk_cand *items);

/* Sorts items best-first: an LSD radix sort of 64-bit keys that encode the total order
 * (no comparison callbacks); topk_ref keeps qsort as its independent reference. */
void topk_sort(int n, topk_cand *items);

/* Naive reference: copies in, sorts it fully, writes the best min(k, n) to out best-first.
 * Returns min(k, n). */
int topk_ref(int n, int k, const topk_cand *in, topk_cand *out);

/* A running top-k over candidates pushed in blocks, for scans longer than memory allows to
 * keep every score. Holds at most cap candidates, cap >= 2 * k + the largest block pushed;
 * once it has seen k candidates, a candidate that cannot beat the current k-th best is
 * dropped without being stored, so the expected cost is O(1) per candidate. */
typedef struct topk_acc {
    topk_cand *items; /* (cap) caller-owned buffer */
    int n;            /* candidates held now */
    int cap;          /* capacity of items */
    int k;            /* how many to keep */
    int lim;          /* the fused scan compacts (topk_acc_trim) at lim held */
    int have_thr;     /* 1 once thr is set: at most the k-th best of everything seen */
    topk_cand thr;    /* the worst candidate held after the last compaction: whatever does
                       * not beat it is not among the best k, valid when have_thr */
} topk_acc;

/* Starts an empty accumulator over buf (cap candidates): buf stays the caller's (acc keeps
 * it in items and never frees it), so it must outlive every use of acc. */
void topk_acc_init(topk_acc *acc, int k, topk_cand *buf, int cap);
/* Offers n candidates: scores[i] at position pos0 + i (pos == NULL) or pos[i]. n must be
 * at most cap - 2 * k. */
void topk_acc_push(topk_acc *acc, int n, const float *scores, const int32_t *pos, int32_t pos0);
/* Offers one candidate (the fused scan's rare insert; scan.h): stores it, compacting to the
 * best k first when the buffer is full (cap >= k + 1). The caller has already dropped what
 * cannot beat thr. topk_acc_compact: cuts to the best k. topk_acc_trim: cuts to the
 * candidates at or above a threshold that the best k all reach (the key's top 16 bits:
 * between k and k + (lim - k) / 2 of them, else the best k), cheaper; both set thr to the
 * worst kept and keep the held candidates in the order they came. */
void topk_acc_compact(topk_acc *acc);
void topk_acc_trim(topk_acc *acc);
static inline void topk_acc_offer(topk_acc *acc, topk_cand c)
{
    if (acc->n == acc->cap) topk_acc_compact(acc);
    acc->items[acc->n++] = c;
}
/* Leaves the best min(k, seen) candidates in items[0..return) in no particular order (the
 * merge needs the candidates and the threshold, not a sorted list). */
int topk_acc_finish_unsorted(topk_acc *acc);
/* Leaves the best min(k, seen) candidates in items[0..return), sorted best-first. */
int topk_acc_finish(topk_acc *acc);

#endif

/* Contextual agreement (FASA Eq. 4-5): how well one frequency chunk alone ranks the keys
 * that the full head ranks highest.
 *
 * For a query q and keys K (n rows), with window k_eff = min(window, n):
 *   CA_i = |TopK(q . K, k_eff) ∩ TopK(q[FC i] . K[FC i], k_eff)| / k_eff
 * using raw post-RoPE dot products (no scale; it does not change rankings) and the total
 * order of topk.h for ties. Calibration averages CA over sample positions and keeps the
 * ntip FCs with the highest mean per head. */
#ifndef FASA_KERNELS_CA_H
#define FASA_KERNELS_CA_H

#include <stddef.h>

#include "fc.h"

/* Bytes of scratch ca_accumulate needs for n keys. */
size_t ca_scratch_bytes(int n);

/* Adds CA_i for every FC i < d/2 of one query to ca[i]. q[d]; keys k[j * ld_k .. + d) for
 * j < n. scratch holds ca_scratch_bytes(n) bytes, 8-byte aligned. */
void ca_accumulate(int n, int d, fc_pairing pairing, int window, const float *q, const float *k,
                   int ld_k, double *ca, void *scratch);

/* Naive reference of ca_accumulate: full sorts and a quadratic intersection. */
void ca_accumulate_ref(int n, int d, fc_pairing pairing, int window, const float *q, const float *k,
                       int ld_k, double *ca);

/* The ntip FCs with the highest ca (ties to the lower FC index), written to fcs_out in
 * ascending FC order. Requires 1 <= ntip <= n_fc. */
void ca_select(int n_fc, int ntip, const double *ca, int *fcs_out);

#endif

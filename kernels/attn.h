/* Exact softmax attention in pieces that merge exactly.
 *
 * A partial over a set of rows is (m, l, o): the largest logit m, the sum of exponentials
 * l = sum_j exp(s_j - m), and the unnormalised output o = sum_j exp(s_j - m) v_j.
 * Partials over disjoint row sets merge with log-sum-exp rescaling to the partial of the
 * union, so attention can be split across blocks (online softmax), shards and ranks and
 * still equal one softmax over all rows, up to rounding. l and o are kept in double so that
 * the order rows are summed in (which depends on the sharding) moves outputs by far less
 * than float rounding. An empty partial has
 * m = -INFINITY, l = 0, o = 0. */
#ifndef FASA_KERNELS_ATTN_H
#define FASA_KERNELS_ATTN_H

/* Rows handled per block by attn_dense; its scratch needs n_q * ATTN_BLOCK floats. */
#define ATTN_BLOCK 256

/* Sets n_q partials to empty: m = -inf, l = 0, o[n_q][d] = 0. */
void attn_state_init(int n_q, int d, float *m, double *l, double *o);

/* Folds n rows into n_q running partials (online softmax). logits[h * ld_logit + j] is the
 * already-scaled logit of row j for head h; row j's value is v[j * ld_v .. + d). Every head
 * sees the same rows. m[n_q], l[n_q], o[n_q][d] are updated in place. */
void attn_accum(int n, int d, int n_q, const float *restrict logits, int ld_logit,
                const float *restrict v, int ld_v, float *restrict m, double *restrict l,
                double *restrict o);

/* As attn_accum, with the block's P.V as OpenBLAS sgemm: exp(logit - m) in f32 into
 * logits (overwritten), then sum_j p_j v_j in f32 for the whole block, folded into the
 * double o once per block. Chosen by bench_kernels for the dense path (sgemm P.V beats the
 * double-precision loop of attn_accum); rounding differs from attn_accum by f32 sums over
 * one block. Each sgemm stays at most ATTN_BLAS_MNK multiply-adds so that OpenBLAS runs it
 * on the calling thread; shapes where even one row exceeds that use attn_accum.
 * Scratch: pv[n_q * d]. */
#define ATTN_BLAS_MNK 131072
void attn_accum_blas(int n, int d, int n_q, float *restrict logits, int ld_logit,
                     const float *restrict v, int ld_v, float *restrict m, double *restrict l,
                     double *restrict o, float *restrict pv);

/* Merges n_parts partials of one head (m[i], l[i], o[i * d ..]) into one (*m_p, *l_p,
 * o_out[d]); empty parts are skipped, and all-empty gives the empty partial. */
void attn_merge(int n_parts, int d, const float *m, const double *l, const double *o, float *m_p,
                double *l_p, double *restrict o_out);

/* out[d] = o / l; an empty partial gives zeros. */
void attn_finalize(int d, double l, const double *o, float *out);

/* Exact attention of n_q queries over n rows of row-major k and v (ld_k, ld_v floats apart),
 * blocked with online softmax so that any n runs in O(n_q * ATTN_BLOCK) scratch.
 * out[h * d ..] = softmax(scale * q_h . k_j) v. */
void attn_dense(int n, int d, int n_q, float scale, const float *q, const float *k, int ld_k,
                const float *v, int ld_v, float *out, float *scratch);

/* Naive reference: one query, full softmax in double precision. */
void attn_ref(int n, int d, float scale, const float *q, const float *k, int ld_k, const float *v,
              int ld_v, float *out);

#endif

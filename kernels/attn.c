#include "attn.h"

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <cblas.h>

#include "score.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(FASA_NO_CLONES)
#define KERN_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define KERN_CLONES
#endif

void attn_state_init(int n_q, int d, float *m, double *l, double *o)
{
    for (int h = 0; h < n_q; h++) {
        m[h] = -INFINITY;
        l[h] = 0.0f;
    }
    memset(o, 0, (size_t)n_q * d * sizeof(*o));
}

KERN_CLONES
void attn_accum(int n, int d, int n_q, const float *restrict logits, int ld_logit,
                const float *restrict v, int ld_v, float *restrict m, double *restrict l,
                double *restrict o)
{
    if (n <= 0) return;
    /* Raise each head's running max to cover the block, rescaling what it already holds
     * (the online-softmax step); then every exponential below is at most 1. */
    for (int h = 0; h < n_q; h++) {
        const float *s = logits + (size_t)h * ld_logit;
        float mb = s[0];
        for (int j = 1; j < n; j++) mb = s[j] > mb ? s[j] : mb;
        if (mb > m[h]) {
            const double r = m[h] == -INFINITY ? 0.0 : exp((double)m[h] - mb);
            l[h] *= r;
            double *oh = o + (size_t)h * d;
            for (int c = 0; c < d; c++) oh[c] *= r;
            m[h] = mb;
        }
    }
    for (int j = 0; j < n; j++) {
        const float *vj = v + (size_t)j * ld_v;
        for (int h = 0; h < n_q; h++) {
            const double p = expf(logits[(size_t)h * ld_logit + j] - m[h]);
            l[h] += p;
            double *oh = o + (size_t)h * d;
            for (int c = 0; c < d; c++) oh[c] += p * vj[c];
        }
    }
}

void attn_accum_blas(int n, int d, int n_q, float *restrict logits, int ld_logit,
                     const float *restrict v, int ld_v, float *restrict m, double *restrict l,
                     double *restrict o, float *restrict pv)
{
    if (n <= 0) return;
    if ((int64_t)n_q * d > ATTN_BLAS_MNK) {
        attn_accum(n, d, n_q, logits, ld_logit, v, ld_v, m, l, o);
        return;
    }
    for (int h = 0; h < n_q; h++) {
        float *s = logits + (size_t)h * ld_logit;
        float mb = s[0];
        for (int j = 1; j < n; j++) mb = s[j] > mb ? s[j] : mb;
        if (mb > m[h]) {
            const double r = m[h] == -INFINITY ? 0.0 : exp((double)m[h] - mb);
            l[h] *= r;
            double *oh = o + (size_t)h * d;
            for (int c = 0; c < d; c++) oh[c] *= r;
            m[h] = mb;
        }
        double ls = 0;
        for (int j = 0; j < n; j++) ls += s[j] = expf(s[j] - m[h]);
        l[h] += ls;
    }
    /* Rows per sgemm so that n_q x d x rows stays within ATTN_BLAS_MNK. */
    const int step = (int)(ATTN_BLAS_MNK / ((int64_t)n_q * d));
    for (int j0 = 0; j0 < n; j0 += step) {
        const int nj = n - j0 < step ? n - j0 : step;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n_q, d, nj, 1.0f, logits + j0,
                    ld_logit, v + (size_t)j0 * ld_v, ld_v, j0 ? 1.0f : 0.0f, pv, d);
    }
    for (size_t i = 0; i < (size_t)n_q * d; i++) o[i] += pv[i];
}

void attn_merge(int n_parts, int d, const float *m, const double *l, const double *o, float *m_p,
                double *l_p, double *restrict o_out)
{
    float mx = -INFINITY;
    for (int i = 0; i < n_parts; i++)
        if (l[i] > 0.0 && m[i] > mx) mx = m[i];
    memset(o_out, 0, (size_t)d * sizeof(*o_out));
    double lsum = 0.0;
    if (mx != -INFINITY) {
        for (int i = 0; i < n_parts; i++) {
            if (!(l[i] > 0.0)) continue;
            const double r = exp((double)m[i] - mx);
            lsum += l[i] * r;
            const double *oi = o + (size_t)i * d;
            for (int c = 0; c < d; c++) o_out[c] += r * oi[c];
        }
    }
    *m_p = mx;
    *l_p = lsum;
}

void attn_finalize(int d, double l, const double *o, float *out)
{
    const double inv = l > 0.0 ? 1.0 / l : 0.0;
    for (int c = 0; c < d; c++) out[c] = (float)(o[c] * inv);
}

void attn_dense(int n, int d, int n_q, float scale, const float *q, const float *k, int ld_k,
                const float *v, int ld_v, float *out, float *scratch)
{
    float m[n_q > 0 ? n_q : 1];
    double l[n_q > 0 ? n_q : 1], o[n_q > 0 ? n_q * d : 1];
    attn_state_init(n_q, d, m, l, o);
    for (int j0 = 0; j0 < n; j0 += ATTN_BLOCK) {
        const int nb = n - j0 < ATTN_BLOCK ? n - j0 : ATTN_BLOCK;
        score_rows(nb, d, n_q, scratch, ATTN_BLOCK, q, k + (size_t)j0 * ld_k, ld_k, 0);
        for (int h = 0; h < n_q; h++)
            for (int j = 0; j < nb; j++) scratch[h * ATTN_BLOCK + j] *= scale;
        attn_accum(nb, d, n_q, scratch, ATTN_BLOCK, v + (size_t)j0 * ld_v, ld_v, m, l, o);
    }
    for (int h = 0; h < n_q; h++) attn_finalize(d, l[h], o + (size_t)h * d, out + (size_t)h * d);
}

void attn_ref(int n, int d, float scale, const float *q, const float *k, int ld_k, const float *v,
              int ld_v, float *out)
{
    double mx = -INFINITY;
    for (int j = 0; j < n; j++) {
        double s = 0.0;
        for (int c = 0; c < d; c++) s += (double)q[c] * k[(size_t)j * ld_k + c];
        s *= scale;
        if (s > mx) mx = s;
    }
    double lsum = 0.0;
    double acc[d > 0 ? d : 1];
    for (int c = 0; c < d; c++) acc[c] = 0.0;
    for (int j = 0; j < n; j++) {
        double s = 0.0;
        for (int c = 0; c < d; c++) s += (double)q[c] * k[(size_t)j * ld_k + c];
        const double p = exp(s * scale - mx);
        lsum += p;
        for (int c = 0; c < d; c++) acc[c] += p * v[(size_t)j * ld_v + c];
    }
    for (int c = 0; c < d; c++) out[c] = n > 0 ? (float)(acc[c] / lsum) : 0.0f;
}

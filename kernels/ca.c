#include "ca.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "topk.h"

size_t ca_scratch_bytes(int n)
{
    return (size_t)n * (sizeof(topk_cand) + sizeof(float) + 1) + 16;
}

/* Marks (mark[pos] = 1) the k_eff best of scores[0..n) and returns k_eff. */
static int s_top_set(int n, int k_eff, const float *scores, topk_cand *cand)
{
    for (int j = 0; j < n; j++) cand[j] = (topk_cand){scores[j], j};
    return topk_select(n, k_eff, cand);
}

void ca_accumulate(int n, int d, fc_pairing pairing, int window, const float *q, const float *k,
                   int ld_k, double *ca, void *scratch)
{
    if (n <= 0 || window <= 0) return;
    const int k_eff = window < n ? window : n;
    topk_cand *cand = scratch;
    float *s = (float *)(cand + n);
    uint8_t *in_full = (uint8_t *)(s + n);

    /* The full head's top set. */
    for (int j = 0; j < n; j++) {
        const float *kj = k + (size_t)j * ld_k;
        float acc = 0.0f;
        for (int c = 0; c < d; c++) acc += q[c] * kj[c];
        s[j] = acc;
    }
    memset(in_full, 0, (size_t)n);
    s_top_set(n, k_eff, s, cand);
    for (int i = 0; i < k_eff; i++) in_full[cand[i].pos] = 1;

    for (int i = 0; i < d / 2; i++) {
        int d0, d1;
        fc_dims(pairing, d, i, &d0, &d1);
        for (int j = 0; j < n; j++) {
            const float *kj = k + (size_t)j * ld_k;
            s[j] = q[d0] * kj[d0] + q[d1] * kj[d1];
        }
        s_top_set(n, k_eff, s, cand);
        int hits = 0;
        for (int t = 0; t < k_eff; t++) hits += in_full[cand[t].pos];
        ca[i] += (double)hits / k_eff;
    }
}

void ca_accumulate_ref(int n, int d, fc_pairing pairing, int window, const float *q, const float *k,
                       int ld_k, double *ca)
{
    if (n <= 0 || window <= 0) return;
    const int k_eff = window < n ? window : n;
    topk_cand *all = malloc((size_t)n * sizeof(*all));
    topk_cand *full = malloc((size_t)k_eff * sizeof(*full));
    topk_cand *part = malloc((size_t)k_eff * sizeof(*part));
    if (!all || !full || !part) abort();
    for (int j = 0; j < n; j++) {
        float acc = 0.0f;
        for (int c = 0; c < d; c++) acc += q[c] * k[(size_t)j * ld_k + c];
        all[j] = (topk_cand){acc, j};
    }
    topk_ref(n, k_eff, all, full);
    for (int i = 0; i < d / 2; i++) {
        int d0, d1;
        fc_dims(pairing, d, i, &d0, &d1);
        for (int j = 0; j < n; j++) {
            const float *kj = k + (size_t)j * ld_k;
            all[j] = (topk_cand){q[d0] * kj[d0] + q[d1] * kj[d1], j};
        }
        topk_ref(n, k_eff, all, part);
        int hits = 0;
        for (int a = 0; a < k_eff; a++)
            for (int b = 0; b < k_eff; b++) hits += full[a].pos == part[b].pos;
        ca[i] += (double)hits / k_eff;
    }
    free(part);
    free(full);
    free(all);
}

void ca_select(int n_fc, int ntip, const double *ca, int *fcs_out)
{
    /* Selection sort over a few dozen FCs: pick the best remaining ntip times. */
    uint8_t taken[n_fc > 0 ? n_fc : 1];
    memset(taken, 0, sizeof(taken));
    for (int t = 0; t < ntip; t++) {
        int best = -1;
        for (int i = 0; i < n_fc; i++)
            if (!taken[i] && (best < 0 || ca[i] > ca[best])) best = i;
        taken[best] = 1;
    }
    int m = 0;
    for (int i = 0; i < n_fc; i++)
        if (taken[i]) fcs_out[m++] = i;
}

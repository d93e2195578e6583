#include "calib.h"

#include <stdio.h>
#include <stdlib.h>

#include "ca.h"

fasa_profile *fasa_calibrate(const fasa_activations *a, const fasa_calib_opts *o, char *err,
                             size_t err_len)
{
    const int d = a->head_dim, n_fc = d / 2, grp = a->n_heads / a->n_kv_heads;
    if (o->ntip < 1 || o->ntip > n_fc) {
        snprintf(err, err_len, "ntip %d out of range [1, %d] (head_dim %d has %d FCs)", o->ntip,
                 n_fc, d, n_fc);
        return NULL;
    }
    if (o->window < 1) {
        snprintf(err, err_len, "window %d must be at least 1", o->window);
        return NULL;
    }
    if (o->pos_begin < 0 || o->pos_end > a->n_tokens || o->pos_begin >= o->pos_end ||
        o->pos_step < 1) {
        snprintf(err, err_len, "positions %d:%d:%d must satisfy 0 <= A < B <= %d and S >= 1",
                 o->pos_begin, o->pos_end, o->pos_step, a->n_tokens);
        return NULL;
    }
    fasa_profile *p = fasa_profile_new(a->n_layers, a->n_heads, a->n_kv_heads, d, o->ntip);
    void *scratch = malloc(ca_scratch_bytes(a->n_tokens));
    double *grp_ca = malloc((size_t)n_fc * sizeof(double));
    if (!p || !scratch || !grp_ca) {
        snprintf(err, err_len, "out of memory");
        fasa_profile_destroy(&p);
        free(scratch);
        free(grp_ca);
        return NULL;
    }
    p->pairing = o->pairing;
    p->gqa_shared = o->gqa_shared;
    p->window = o->window;
    snprintf(p->samples, sizeof(p->samples), "%d:%d:%d", o->pos_begin, o->pos_end, o->pos_step);

    const long total = (o->pos_end - o->pos_begin + o->pos_step - 1) / o->pos_step;
    long done = 0, count = 0;
    for (int t = o->pos_begin; t < o->pos_end; t += o->pos_step, count++) {
        for (int l = 0; l < a->n_layers; l++)
            for (int h = 0; h < a->n_heads; h++) {
                const float *q = a->q[l] + ((size_t)t * a->n_heads + h) * d;
                const float *k = a->k[l] + (size_t)(h / grp) * d;
                ca_accumulate(t + 1, d, o->pairing, o->window, q, k, a->n_kv_heads * d,
                              p->ca + ((size_t)l * a->n_heads + h) * n_fc, scratch);
            }
        if (o->progress) o->progress(o->progress_arg, ++done, total);
    }
    for (size_t i = 0; i < (size_t)a->n_layers * a->n_heads * n_fc; i++) p->ca[i] /= (double)count;

    for (int l = 0; l < a->n_layers; l++)
        for (int g = 0; g < a->n_kv_heads; g++) {
            for (int i = 0; i < n_fc; i++) {
                double s = 0.0;
                for (int j = 0; j < grp; j++)
                    s += p->ca[((size_t)l * a->n_heads + g * grp + j) * n_fc + i];
                grp_ca[i] = s / grp;
            }
            for (int j = 0; j < grp; j++) {
                const size_t lh = (size_t)l * a->n_heads + g * grp + j;
                ca_select(n_fc, o->ntip, o->gqa_shared ? grp_ca : p->ca + lh * n_fc,
                          p->fcs + lh * o->ntip);
            }
        }
    free(scratch);
    free(grp_ca);
    return p;
}

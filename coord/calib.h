/* Calibration: mean contextual agreement (ca.h) per (layer, query head, FC) over sample
 * decode positions of recorded activations, and the ntip dominant FCs per head (Eq. 5). */
#ifndef FASA_COORD_CALIB_H
#define FASA_COORD_CALIB_H

#include <stddef.h>

#include "profile.h"

/* Recorded post-RoPE activations, one pointer per layer (borrowed). */
typedef struct fasa_activations {
    int n_layers, n_tokens, n_heads, n_kv_heads, head_dim;
    const float *const *q; /* (n_layers) -> (n_tokens, n_heads, head_dim) */
    const float *const *k; /* (n_layers) -> (n_tokens, n_kv_heads, head_dim) */
    const float *const *v; /* (n_layers) -> (n_tokens, n_kv_heads, head_dim) */
} fasa_activations;

typedef struct fasa_calib_opts {
    int ntip;                         /* dominant FCs per head, 1..head_dim/2 */
    int window;                       /* CA window K */
    int pos_begin, pos_end, pos_step; /* sample decode positions t in [begin, end) by step */
    fc_pairing pairing;
    int gqa_shared; /* 1: one FC set per KV head by the group's mean CA */
    /* Called after each sample position with (done, total), or NULL. */
    void (*progress)(void *arg, long done, long total);
    void *progress_arg;
} fasa_calib_opts;

/* Builds a profile or returns NULL with a reason in err; a and o are borrowed. Caller owns
 * the profile (free with fasa_profile_destroy). Query t attends to
 * keys 0..t, as at decode time once t is appended. */
fasa_profile *fasa_calibrate(const fasa_activations *a, const fasa_calib_opts *o, char *err,
                             size_t err_len);

#endif

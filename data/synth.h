/* A deterministic synthetic long-context generator with the geometry FASA relies on.
 *
 * Keys, values and queries are built pre-RoPE and then rotated with real RoPE (query at
 * its position t, key at its position j), so every score is q R_{j-t} k as in a model.
 * Per KV head, n_signal low-frequency FCs (picked at random from the lower-frequency half,
 * the same for the group's query heads) carry the signal:
 *   key   j: N(0, 1) noise in every dim, plus in each signal FC a heavy-tailed
 *            (log-normal) token amplitude a_j times a fixed per-(KV head, FC) 2-D
 *            direction u; about one token in 2048 per KV head is a "needle": a large
 *            amplitude whose phase is set so that it lines up with the queries at the end
 *            of the context;
 *   query t: in each signal FC a strength b times u (turned by a small per-head angle),
 *            plus N(0, 1) noise in every dim;
 *   value j: N(0, 1) in every dim.
 * With the default strengths the exact top-256 of a 128K..256K context holds most of the
 * softmax mass, and the signal FCs alone rank keys nearly as the full dot product does.
 *
 * Every token and every query position has its own random stream (splitmix64 seeded by
 * seed, kind and position), so any range can be generated on its own, in any order, and
 * always gives the same numbers. Noise is N(0, 1) by Box-Muller, computed over arrays with
 * polynomial log / sin / cos so that it vectorises (about 0.5 s per 128K tokens x 8 KV heads
 * x 128 dims of keys and values on one core). */
#ifndef FASA_CLIENT_SYNTH_H
#define FASA_CLIENT_SYNTH_H

#include <stdint.h>

#include "calib.h"
#include "fc.h"
#include "profile.h"

typedef struct synth_cfg {
    int n_tokens; /* context length; needles line up with queries near its end */
    int n_heads, n_kv_heads, head_dim;
    uint64_t seed;
    double rope_base;   /* 10000 */
    fc_pairing pairing; /* which dims form an FC (interleaved: 2i, 2i+1) */
    int n_signal;       /* signal FCs per KV head, 1..head_dim/4 (16 at head_dim 128) */
} synth_cfg;

/* A config with the defaults above: 32 heads, 8 KV heads, head_dim 128, base 10000,
 * interleaved, 16 signal FCs, seed 1. */
synth_cfg synth_cfg_default(int n_tokens);

typedef struct synth {
    synth_cfg cfg;
    int t_ref;     /* position the needles line up with: n_tokens - 1 */
    int *signal;   /* (n_kv_heads, n_signal) ascending FC indices */
    float *dir;    /* (n_kv_heads, head_dim / 2, 2) pre-RoPE unit directions */
    float *qturn;  /* (n_heads, 2) cos, sin of each query head's small turn */
    double *theta; /* (head_dim / 2) RoPE frequency of FC i: base^(-2i/d) */
} synth_t;

/* 0, and the caller owns s's arrays (free with synth_free), or -1 with a reason in err (bad
 * geometry, out of memory). cfg is borrowed. */
int synth_init(synth_t *s, const synth_cfg *cfg, char *err, int err_len);
/* Frees s's arrays (the struct is the caller's); NULL is a no-op. */
void synth_free(synth_t *s);

/* Post-RoPE keys and values of positions pos0 .. pos0 + n - 1, each (n, n_kv_heads,
 * head_dim). Either may be NULL. */
void synth_kv(const synth_t *s, int pos0, int n, float *k, float *v);

/* Post-RoPE queries of decode position t: (n_heads, head_dim). */
void synth_query(const synth_t *s, int t, float *q);

/* 1 when FC i carries signal for KV head g. */
int synth_is_signal(const synth_t *s, int g, int fc);

/* A profile (1 layer, per-head, ntip = n_signal) naming the true signal FCs of every
 * head, as a perfect calibration would; NULL when out of memory. Caller owns it (free with
 * fasa_profile_destroy). */
fasa_profile *synth_true_profile(const synth_t *s, int window);

/* A short calibration sample: the first n_tokens of the same stream (keys, values) and
 * queries at every position, 1 layer, as fasa_activations; the suggested sample positions
 * are n_positions evenly spaced in the last three quarters. The struct holds pointers into
 * itself: do not copy or move it after synth_sample_make. */
typedef struct synth_sample {
    float *q, *k, *v;
    const float *qp[1], *kp[1], *vp[1];
    fasa_activations act;
    int pos_begin, pos_end, pos_step;
} synth_sample;

/* 0, and the caller owns out's arrays (free with synth_sample_free), or -1 with a reason in
 * err. */
int synth_sample_make(const synth_t *s, int n_tokens, int n_positions, synth_sample *out, char *err,
                      int err_len);
/* Frees x's arrays (the struct is the caller's); NULL is a no-op. */
void synth_sample_free(synth_sample *x);

#endif

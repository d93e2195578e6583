/* Synthetic long-context generator. See synth.h for the model. */
#include "synth.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Strengths, in raw dot-product units (logits are these times 1/sqrt(head_dim)). */
#ifndef SYN_KEY_NOISE
#define SYN_KEY_NOISE 1.0f /* std of key noise, every dim */
#endif
#ifndef SYN_QUERY_NOISE
#define SYN_QUERY_NOISE 0.5f /* std of query noise, every dim */
#endif
#ifndef SYN_AMP_SIGMA
#define SYN_AMP_SIGMA 0.5f /* log-normal sigma of the per-token key amplitude */
#endif
#ifndef SYN_AMP_SCALE
#define SYN_AMP_SCALE 0.5f /* median key amplitude per signal FC */
#endif
#ifndef SYN_QUERY_SIGNAL
#define SYN_QUERY_SIGNAL 4.5f /* query strength b in each signal FC */
#endif
#ifndef SYN_NEEDLE_RATE
#define SYN_NEEDLE_RATE 2048 /* about one needle per this many tokens per KV head */
#endif
#ifndef SYN_NEEDLE_AMP
#define SYN_NEEDLE_AMP 2.0f /* needle amplitude per signal FC */
#endif
#ifndef SYN_TURN_SIGMA
#define SYN_TURN_SIGMA 0.25f /* std (radians) of a query head's turn from its KV head */
#endif

enum { STREAM_KV = 1, STREAM_Q = 2, STREAM_SETUP = 3 };

typedef struct rng {
    uint64_t s;
    float spare;
    int have_spare;
} rng;

static inline uint64_t s_mix(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static inline uint64_t s_next(rng *r)
{
    r->s += 0x9e3779b97f4a7c15ULL;
    return s_mix(r->s);
}

/* One independent stream per (seed, kind, index). */
static void s_seed(rng *r, uint64_t seed, int kind, uint64_t index)
{
    r->s = s_mix(seed * 0x9e3779b97f4a7c15ULL + ((uint64_t)kind << 56) + s_mix(index + 1));
    r->have_spare = 0;
}

/* Uniform in [0, 1). */
static inline double s_unif(rng *r)
{
    return (double)(s_next(r) >> 11) * (1.0 / 9007199254740992.0);
}

/* N(0, 1): Box-Muller with libm, for the few draws outside the bulk noise. */
static float s_gauss(rng *r)
{
    if (r->have_spare) {
        r->have_spare = 0;
        return r->spare;
    }
    const double u1 = ((double)(s_next(r) >> 11) + 0.5) * (1.0 / 9007199254740992.0);
    const double u2 = s_unif(r);
    const double m = sqrt(-2.0 * log(u1));
    r->spare = (float)(m * sin(6.283185307179586 * u2));
    r->have_spare = 1;
    return (float)(m * cos(6.283185307179586 * u2));
}

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(FASA_NO_CLONES)
#define SYN_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SYN_CLONES
#endif

/* Box-Muller over arrays, branch-free so that it vectorises: u1 in (0, 1], u2 in [0, 1)
 * in, out[2i], out[2i+1] = sqrt(-2 ln u1) (cos, sin)(2 pi u2). ln by exponent split and
 * the atanh series (|error| < 2e-7), sqrt by Newton steps; cos and sin of the half angle by Taylor
 * polynomials on
 * [-pi/2, pi/2] and the double-angle formulas (|error| < 1e-6). */
SYN_CLONES
static void s_box_muller(int n_pairs, const uint32_t *restrict b1, const uint32_t *restrict b2,
                         float *restrict out)
{
    for (int i = 0; i < n_pairs; i++) {
        /* u1 = (top 24 bits + 1) / 2^24 in (0, 1]; its float bits give exponent and mantissa. */
        const float u1 = ((float)(int32_t)(b1[i] >> 8) + 1.0f) * (1.0f / 16777216.0f);
        union {
            float f;
            uint32_t u;
        } x = {.f = u1};
        const int e = (int)(x.u >> 23) - 127;
        x.u = (x.u & 0x7fffffu) | 0x3f800000u; /* mantissa in [1, 2) */
        const float t = (x.f - 1.0f) / (x.f + 1.0f), t2 = t * t;
        float p = 1.0f / 9;
        p = 1.0f / 7 + t2 * p;
        p = 1.0f / 5 + t2 * p;
        p = 1.0f / 3 + t2 * p;
        const float ln_m = 2.0f * t * (1.0f + t2 * p);
        const float ln_u1 = (float)e * 0.69314718f + ln_m;
        float r2 = -2.0f * ln_u1;
        r2 = r2 > 0.0f ? r2 : 0.0f;
        /* sqrt(r2) = r2 / sqrt(r2) by three Newton steps on the bit-trick inverse square
         * root (relative error < 1e-7; sqrtf would keep the loop scalar for errno). */
        union {
            float f;
            uint32_t u;
        } y = {.f = r2};
        y.u = 0x5f3759dfu - (y.u >> 1);
        float ys = y.f;
        for (int it = 0; it < 3; it++) ys = ys * (1.5f - 0.5f * r2 * ys * ys);
        const float m = r2 * ys;
        /* a in [-pi/2, pi/2); the full angle 2a is uniform on [-pi, pi). */
        const float a = ((float)(int32_t)(b2[i] >> 8) * (1.0f / 16777216.0f) - 0.5f) * 3.14159265f;
        const float a2 = a * a;
        float ps = -1.0f / 39916800, pc = 1.0f / 479001600;
        ps = 1.0f / 362880 + a2 * ps;
        pc = -1.0f / 3628800 + a2 * pc;
        ps = -1.0f / 5040 + a2 * ps;
        pc = 1.0f / 40320 + a2 * pc;
        ps = 1.0f / 120 + a2 * ps;
        pc = -1.0f / 720 + a2 * pc;
        ps = -1.0f / 6 + a2 * ps;
        pc = 1.0f / 24 + a2 * pc;
        const float s = a * (1.0f + a2 * ps);
        const float c = 1.0f + a2 * (-0.5f + a2 * pc);
        out[2 * i] = m * (c * c - s * s);
        out[2 * i + 1] = m * (2.0f * s * c);
    }
}

#define GAUSS_BLOCK 256 /* pairs per batch */

/* n (even) N(0, 1) draws into out. */
static void s_gauss_fill(rng *r, int n, float *out)
{
    uint32_t b1[GAUSS_BLOCK], b2[GAUSS_BLOCK];
    for (int i0 = 0; i0 < n / 2; i0 += GAUSS_BLOCK) {
        const int m = n / 2 - i0 < GAUSS_BLOCK ? n / 2 - i0 : GAUSS_BLOCK;
        for (int i = 0; i < m; i++) {
            const uint64_t x = s_next(r);
            b1[i] = (uint32_t)x;
            b2[i] = (uint32_t)(x >> 32);
        }
        s_box_muller(m, b1, b2, out + 2 * (size_t)i0);
    }
}

synth_cfg synth_cfg_default(int n_tokens)
{
    synth_cfg c = {.n_tokens = n_tokens,
                   .n_heads = 32,
                   .n_kv_heads = 8,
                   .head_dim = 128,
                   .seed = 1,
                   .rope_base = 10000.0,
                   .pairing = FC_PAIRING_INTERLEAVED,
                   .n_signal = 16};
    return c;
}

void synth_free(synth_t *s)
{
    if (!s) return;
    free(s->signal);
    free(s->dir);
    free(s->qturn);
    free(s->theta);
    memset(s, 0, sizeof(*s));
}

int synth_init(synth_t *s, const synth_cfg *cfg, char *err, int err_len)
{
    memset(s, 0, sizeof(*s));
    const int d = cfg->head_dim, n_fc = d / 2;
    if (cfg->n_tokens < 1 || cfg->n_kv_heads < 1 || cfg->n_heads < cfg->n_kv_heads ||
        cfg->n_heads % cfg->n_kv_heads || cfg->n_kv_heads > 1024 || d < 4 || d > 1024 || d % 4 ||
        cfg->n_signal < 1 || cfg->n_signal > d / 4 || !(cfg->rope_base > 1.0) ||
        !fc_pairing_name(cfg->pairing)) {
        snprintf(err, (size_t)err_len,
                 "synthetic geometry: need n_tokens >= 1, n_heads a multiple of n_kv_heads, "
                 "head_dim a multiple of 4 in [4, 1024], n_kv_heads <= 1024 and 1 <= n_signal <= "
                 "head_dim/4");
        return -1;
    }
    s->cfg = *cfg;
    s->t_ref = cfg->n_tokens - 1;
    s->signal = malloc((size_t)cfg->n_kv_heads * cfg->n_signal * sizeof(int));
    s->dir = malloc((size_t)cfg->n_kv_heads * n_fc * 2 * sizeof(float));
    s->qturn = malloc((size_t)cfg->n_heads * 2 * sizeof(float));
    s->theta = malloc((size_t)n_fc * sizeof(double));
    if (!s->signal || !s->dir || !s->qturn || !s->theta) {
        synth_free(s);
        snprintf(err, (size_t)err_len, "out of memory");
        return -1;
    }
    for (int i = 0; i < n_fc; i++) s->theta[i] = pow(cfg->rope_base, -2.0 * i / d);
    rng r;
    s_seed(&r, cfg->seed, STREAM_SETUP, 0);
    for (int g = 0; g < cfg->n_kv_heads; g++) {
        /* n_signal distinct FCs of the lower-frequency half [n_fc/2, n_fc), ascending. */
        int pool[512];
        const int half = n_fc / 2;
        for (int i = 0; i < half; i++) pool[i] = n_fc - half + i;
        for (int i = 0; i < cfg->n_signal; i++) {
            const int j = i + (int)(s_unif(&r) * (half - i));
            const int t = pool[i];
            pool[i] = pool[j];
            pool[j] = t;
        }
        int *sig = s->signal + (size_t)g * cfg->n_signal;
        memcpy(sig, pool, (size_t)cfg->n_signal * sizeof(int));
        for (int i = 1; i < cfg->n_signal; i++)
            for (int j = i; j > 0 && sig[j - 1] > sig[j]; j--) {
                const int t = sig[j];
                sig[j] = sig[j - 1];
                sig[j - 1] = t;
            }
        for (int i = 0; i < n_fc; i++) {
            const double a = 6.283185307179586 * s_unif(&r);
            s->dir[((size_t)g * n_fc + i) * 2] = (float)cos(a);
            s->dir[((size_t)g * n_fc + i) * 2 + 1] = (float)sin(a);
        }
    }
    for (int h = 0; h < cfg->n_heads; h++) {
        const float a = SYN_TURN_SIGMA * s_gauss(&r);
        s->qturn[2 * h] = cosf(a);
        s->qturn[2 * h + 1] = sinf(a);
    }
    return 0;
}

int synth_is_signal(const synth_t *s, int g, int fc)
{
    const int *sig = s->signal + (size_t)g * s->cfg.n_signal;
    for (int i = 0; i < s->cfg.n_signal; i++)
        if (sig[i] == fc) return 1;
    return 0;
}

/* Rotates FC i of x (pre-RoPE, head_dim d) by angle pos * theta_i, for every FC, using
 * the precomputed cos/sin of this position. */
static void s_rope(const synth_t *s, float *x, const float *cs, const float *sn)
{
    const int d = s->cfg.head_dim;
    for (int i = 0; i < d / 2; i++) {
        int d0, d1;
        fc_dims(s->cfg.pairing, d, i, &d0, &d1);
        const float a = x[d0], b = x[d1];
        x[d0] = a * cs[i] - b * sn[i];
        x[d1] = a * sn[i] + b * cs[i];
    }
}

/* cos and sin of pos * theta_i for every FC, exactly (libm, double). */
static void s_angles(const synth_t *s, double pos, double *cs, double *sn)
{
    for (int i = 0; i < s->cfg.head_dim / 2; i++) {
        const double a = pos * s->theta[i];
        cs[i] = cos(a);
        sn[i] = sin(a);
    }
}

#define ANGLE_REFRESH 1024 /* positions between exact recomputations of the RoPE angles */

void synth_kv(const synth_t *s, int pos0, int n, float *k, float *v)
{
    const int d = s->cfg.head_dim, n_fc = d / 2, hkv = s->cfg.n_kv_heads, ns = s->cfg.n_signal;
    double cs[512], sn[512], c1[512], s1[512];
    float csf[512], snf[512], scratch[1024];
    s_angles(s, 1.0, c1, s1);
    for (int t = 0; t < n; t++) {
        const int j = pos0 + t;
        rng r;
        s_seed(&r, s->cfg.seed, STREAM_KV, (uint64_t)j);
        if (k) {
            /* Angles advance by one rotation per position (in double), refreshed often. */
            if (t % ANGLE_REFRESH == 0) {
                s_angles(s, j, cs, sn);
            } else {
                for (int i = 0; i < n_fc; i++) {
                    const double c = cs[i] * c1[i] - sn[i] * s1[i];
                    sn[i] = sn[i] * c1[i] + cs[i] * s1[i];
                    cs[i] = c;
                }
            }
            for (int i = 0; i < n_fc; i++) {
                csf[i] = (float)cs[i];
                snf[i] = (float)sn[i];
            }
        }
        /* Draws come in a fixed order whether or not k or v is wanted, so both agree. */
        float z[1024];
        uint8_t needle[1024];
        for (int g = 0; g < hkv; g++) {
            z[g] = s_gauss(&r);
            needle[g] = (s_next(&r) % SYN_NEEDLE_RATE) == 0;
        }
        for (int g = 0; g < hkv; g++) {
            float *kr = k ? k + ((size_t)t * hkv + g) * d : scratch;
            float *vr = v ? v + ((size_t)t * hkv + g) * d : scratch;
            s_gauss_fill(&r, d, kr);
            s_gauss_fill(&r, d, vr);
            if (!k) continue;
            if (SYN_KEY_NOISE != 1.0f)
                for (int c = 0; c < d; c++) kr[c] *= SYN_KEY_NOISE;
            const int *sig = s->signal + (size_t)g * ns;
            for (int x = 0; x < ns; x++) {
                const int i = sig[x];
                int d0, d1;
                fc_dims(s->cfg.pairing, d, i, &d0, &d1);
                float ux = s->dir[((size_t)g * n_fc + i) * 2];
                float uy = s->dir[((size_t)g * n_fc + i) * 2 + 1];
                float amp;
                if (needle[g]) {
                    /* Pre-turned by (t_ref - j) theta_i: after RoPE at j it points where
                     * the queries at t_ref point. */
                    const double a = (double)(s->t_ref - j) * s->theta[i];
                    const float c = (float)cos(a), sa = (float)sin(a);
                    const float nx = ux * c - uy * sa, ny = ux * sa + uy * c;
                    ux = nx;
                    uy = ny;
                    amp = SYN_NEEDLE_AMP;
                } else {
                    amp = SYN_AMP_SCALE * expf(SYN_AMP_SIGMA * z[g]);
                }
                kr[d0] += amp * ux;
                kr[d1] += amp * uy;
            }
            s_rope(s, kr, csf, snf);
        }
    }
}

void synth_query(const synth_t *s, int t, float *q)
{
    const int d = s->cfg.head_dim, n_fc = d / 2, grp = s->cfg.n_heads / s->cfg.n_kv_heads;
    const int ns = s->cfg.n_signal;
    double cs[512], sn[512];
    float csf[512], snf[512];
    s_angles(s, t, cs, sn);
    for (int i = 0; i < n_fc; i++) {
        csf[i] = (float)cs[i];
        snf[i] = (float)sn[i];
    }
    rng r;
    s_seed(&r, s->cfg.seed, STREAM_Q, (uint64_t)t);
    for (int h = 0; h < s->cfg.n_heads; h++) {
        const int g = h / grp;
        float *qh = q + (size_t)h * d;
        const float b = SYN_QUERY_SIGNAL * (1.0f + 0.1f * s_gauss(&r));
        s_gauss_fill(&r, d, qh);
        if (SYN_QUERY_NOISE != 1.0f)
            for (int c = 0; c < d; c++) qh[c] *= SYN_QUERY_NOISE;
        const float tc = s->qturn[2 * h], ts = s->qturn[2 * h + 1];
        const int *sig = s->signal + (size_t)g * ns;
        for (int x = 0; x < ns; x++) {
            const int i = sig[x];
            int d0, d1;
            fc_dims(s->cfg.pairing, d, i, &d0, &d1);
            const float ux = s->dir[((size_t)g * n_fc + i) * 2];
            const float uy = s->dir[((size_t)g * n_fc + i) * 2 + 1];
            qh[d0] += b * (ux * tc - uy * ts);
            qh[d1] += b * (ux * ts + uy * tc);
        }
        s_rope(s, qh, csf, snf);
    }
}

fasa_profile *synth_true_profile(const synth_t *s, int window)
{
    const synth_cfg *c = &s->cfg;
    const int grp = c->n_heads / c->n_kv_heads, n_fc = c->head_dim / 2;
    fasa_profile *p = fasa_profile_new(1, c->n_heads, c->n_kv_heads, c->head_dim, c->n_signal);
    if (!p) return NULL;
    p->pairing = c->pairing;
    p->gqa_shared = 0;
    p->window = window;
    snprintf(p->samples, sizeof(p->samples), "synthetic-truth");
    for (int h = 0; h < c->n_heads; h++) {
        const int g = h / grp;
        memcpy(p->fcs + (size_t)h * c->n_signal, s->signal + (size_t)g * c->n_signal,
               (size_t)c->n_signal * sizeof(int));
        for (int i = 0; i < n_fc; i++) p->ca[(size_t)h * n_fc + i] = synth_is_signal(s, g, i);
    }
    return p;
}

void synth_sample_free(synth_sample *x)
{
    if (!x) return;
    free(x->q);
    free(x->k);
    free(x->v);
    memset(x, 0, sizeof(*x));
}

int synth_sample_make(const synth_t *s, int n_tokens, int n_positions, synth_sample *x, char *err,
                      int err_len)
{
    memset(x, 0, sizeof(*x));
    const synth_cfg *c = &s->cfg;
    if (n_tokens < 2 || n_positions < 1) {
        snprintf(err, (size_t)err_len, "calibration sample needs >= 2 tokens and >= 1 position");
        return -1;
    }
    const size_t qrow = (size_t)c->n_heads * c->head_dim,
                 kvrow = (size_t)c->n_kv_heads * c->head_dim;
    x->q = malloc((size_t)n_tokens * qrow * sizeof(float));
    x->k = malloc((size_t)n_tokens * kvrow * sizeof(float));
    x->v = malloc((size_t)n_tokens * kvrow * sizeof(float));
    if (!x->q || !x->k || !x->v) {
        synth_sample_free(x);
        snprintf(err, (size_t)err_len, "out of memory for a calibration sample of %d tokens",
                 n_tokens);
        return -1;
    }
    synth_kv(s, 0, n_tokens, x->k, x->v);
    for (int t = 0; t < n_tokens; t++) synth_query(s, t, x->q + (size_t)t * qrow);
    x->qp[0] = x->q;
    x->kp[0] = x->k;
    x->vp[0] = x->v;
    x->act = (fasa_activations){.n_layers = 1,
                                .n_tokens = n_tokens,
                                .n_heads = c->n_heads,
                                .n_kv_heads = c->n_kv_heads,
                                .head_dim = c->head_dim,
                                .q = x->qp,
                                .k = x->kp,
                                .v = x->vp};
    x->pos_begin = n_tokens / 4;
    x->pos_end = n_tokens;
    x->pos_step = (x->pos_end - x->pos_begin) / n_positions;
    if (x->pos_step < 1) x->pos_step = 1;
    return 0;
}

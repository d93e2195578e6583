/* The fuzz target's starting state. See fixture.h. */
#define _GNU_SOURCE /* mkdtemp */
#include "fixture.h"

#include <math.h>
#include <sys/stat.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tensor.h"

static void s_die(const char *what, const Fasa__V1__Response *r)
{
    fprintf(stderr, "fuzz fixture: %s failed: status %d %s\n", what, r ? (int)r->status : -1,
            r && r->message ? r->message : "");
    abort();
}

void fuzz_fill(uint64_t *state, size_t n, float *x, float scale)
{
    for (size_t i = 0; i < n; i++) {
        uint64_t z = (*state += 0x9e3779b97f4a7c15ULL);
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
        z ^= z >> 31;
        x[i] = scale * (float)((double)(z >> 40) * (1.0 / 8388608.0) - 1.0);
    }
}

uint8_t *fuzz_pack(const Fasa__V1__Request *req, size_t *len_p)
{
    const size_t n = fasa__v1__request__get_packed_size(req);
    uint8_t *buf = malloc(n ? n : 1);
    if (!buf) {
        fprintf(stderr, "fuzz: out of memory packing a request\n");
        abort();
    }
    *len_p = fasa__v1__request__pack(req, buf);
    return buf;
}

void fuzz_split(const uint8_t *data, size_t size, const uint8_t **req_p, size_t *len_p,
                edge_frame *frames, int *n_frames_p)
{
    *req_p = data;
    *len_p = size;
    *n_frames_p = 0;
    if (size < 4 || memcmp(data, "FRM", 3) != 0) return;
    const int n = data[3];
    size_t at = 4;
    if (size - at < (size_t)n * 4) return; /* no room for the lengths: one frame */
    size_t lens[FUZZ_MAX_FRAMES];
    for (int i = 0; i < n; i++, at += 4)
        lens[i] = (size_t)data[at] | (size_t)data[at + 1] << 8 | (size_t)data[at + 2] << 16 |
                  (size_t)data[at + 3] << 24;
    size_t avail = size - at;
    for (int i = 0; i < n; i++) {
        if (lens[i] > avail) lens[i] = avail;
        avail -= lens[i];
    }
    *req_p = data + at;
    *len_p = avail;
    at += avail;
    for (int i = 0; i < n; i++) {
        frames[i] = (edge_frame){data + at, lens[i]};
        at += lens[i];
    }
    *n_frames_p = n;
}

uint8_t *fuzz_join(const uint8_t *req, size_t len, const edge_frame *frames, int n_frames,
                   size_t *out_len_p)
{
    size_t total = 4 + 4 * (size_t)n_frames + len;
    for (int i = 0; i < n_frames; i++) total += frames[i].len;
    uint8_t *b = malloc(total);
    if (!b || n_frames < 0 || n_frames > FUZZ_MAX_FRAMES) {
        fprintf(stderr, "fuzz: cannot join %d frames\n", n_frames);
        abort();
    }
    memcpy(b, "FRM", 3);
    b[3] = (uint8_t)n_frames;
    size_t at = 4;
    for (int i = 0; i < n_frames; i++, at += 4)
        for (int j = 0; j < 4; j++) b[at + j] = (uint8_t)(frames[i].len >> (8 * j));
    memcpy(b + at, req, len);
    at += len;
    for (int i = 0; i < n_frames; i++) {
        memcpy(b + at, frames[i].data, frames[i].len);
        at += frames[i].len;
    }
    *out_len_p = total;
    return b;
}

Fasa__V1__Response *fuzz_roundtrip(fuzz_fixture *fx, const void *buf, size_t len)
{
    uint8_t *reply = NULL;
    size_t n = 0;
    int shutdown = 0;
    const uint8_t *req;
    size_t req_len;
    edge_frame frames[FUZZ_MAX_FRAMES];
    int n_frames;
    fuzz_split(buf, len, &req, &req_len, frames, &n_frames);
    if (fasa_service_handle_frames(fx->svc, req, req_len, frames, n_frames, &reply, &n, &shutdown))
        s_die("handle", NULL);
    Fasa__V1__Response *r = fasa__v1__response__unpack(NULL, n, reply);
    free(reply);
    if (!r) s_die("decoding the response", NULL);
    return r;
}

/* Sends req and insists on OK; returns the response (caller frees). */
static Fasa__V1__Response *s_send_ok(fuzz_fixture *fx, Fasa__V1__Request *req, const char *what)
{
    static uint64_t next_id = 1;
    req->protocol_version = 1;
    req->request_id = next_id++;
    size_t len;
    uint8_t *buf = fuzz_pack(req, &len);
    Fasa__V1__Response *r = fuzz_roundtrip(fx, buf, len);
    free(buf);
    if (r->status != FASA__V1__STATUS__OK) s_die(what, r);
    return r;
}

/* Calibrates profile "p" from random activations; keeps its text. */
static void s_calibrate(fuzz_fixture *fx, uint64_t *rng)
{
    enum { NQ = FUZZ_L * FUZZ_T * FUZZ_H * FUZZ_D, NK = FUZZ_L * FUZZ_T * FUZZ_HKV * FUZZ_D };
    static float q[NQ], k[NK];
    fuzz_fill(rng, NQ, q, 1.0f);
    fuzz_fill(rng, NK, k, 1.0f);
    uint64_t qs[4] = {FUZZ_L, FUZZ_T, FUZZ_H, FUZZ_D}, ks[4] = {FUZZ_L, FUZZ_T, FUZZ_HKV, FUZZ_D};
    Fasa__V1__Request req = FASA__V1__REQUEST__INIT;
    Fasa__V1__Calibrate c = FASA__V1__CALIBRATE__INIT;
    Fasa__V1__Tensor tq, tk;
    edge_tensor_f32(&tq, qs, 4, q, NQ);
    edge_tensor_f32(&tk, ks, 4, k, NK);
    c.q = &tq;
    c.k = &tk;
    c.has_window = c.has_pos_step = 1;
    c.window = 8;
    c.pos_step = 2;
    c.profile_name = "p";
    req.body_case = FASA__V1__REQUEST__BODY_CALIBRATE;
    req.calibrate = &c;
    Fasa__V1__Response *r = s_send_ok(fx, &req, "calibrate 'p'");
    fx->profile_text = strdup(r->calibrate->profile_text);
    fasa__v1__response__free_unpacked(r, NULL);
    if (!fx->profile_text) s_die("strdup", NULL);
}

/* A session's geometry: layers, query heads, KV heads, head_dim, pairing (proto enum). */
typedef struct geometry {
    int l, h, hkv, d, pairing;
} geometry;

/* Creates session id (with profile "p" when profile is set) and appends n tokens to every
 * layer. */
static void s_session(fuzz_fixture *fx, const char *id, const geometry *g, int profile, int n,
                      uint64_t *rng)
{
    Fasa__V1__Request req = FASA__V1__REQUEST__INIT;
    Fasa__V1__CreateSession c = FASA__V1__CREATE_SESSION__INIT;
    c.session_id = (char *)id;
    c.n_layers = (uint32_t)g->l;
    c.n_heads = (uint32_t)g->h;
    c.n_kv_heads = (uint32_t)g->hkv;
    c.head_dim = (uint32_t)g->d;
    c.has_pairing = 1;
    c.pairing = (Fasa__V1__Pairing)g->pairing;
    if (profile) c.profile_name = "p";
    req.body_case = FASA__V1__REQUEST__BODY_CREATE_SESSION;
    req.create_session = &c;
    fasa__v1__response__free_unpacked(s_send_ok(fx, &req, "create_session"), NULL);
    if (n == 0) return;

    const size_t nf = (size_t)g->l * n * g->hkv * g->d;
    float *k = malloc(2 * nf * sizeof(float));
    if (!k) s_die("malloc", NULL);
    fuzz_fill(rng, 2 * nf, k, 1.0f);
    uint64_t shape[4] = {(uint64_t)g->l, (uint64_t)n, (uint64_t)g->hkv, (uint64_t)g->d};
    Fasa__V1__Request ar = FASA__V1__REQUEST__INIT;
    Fasa__V1__Append a = FASA__V1__APPEND__INIT;
    Fasa__V1__Tensor tk, tv;
    edge_tensor_f32(&tk, shape, 4, k, nf);
    edge_tensor_f32(&tv, shape, 4, k + nf, nf);
    a.session_id = (char *)id;
    a.start_pos = 0;
    a.k = &tk;
    a.v = &tv;
    ar.body_case = FASA__V1__REQUEST__BODY_APPEND;
    ar.append = &a;
    fasa__v1__response__free_unpacked(s_send_ok(fx, &ar, "append"), NULL);
    free(k);
}

static void s_die_path(const char *what, const char *path)
{
    fprintf(stderr, "fuzz fixture: %s: %s\n", what, path);
    abort();
}

/* One (FUZZ_LOAD_T, FUZZ_HKV, FUZZ_D) float32 .npy file. */
static void s_npy(const char *path, const float *x)
{
    char h[128];
    int n =
        snprintf(h, sizeof(h), "{'descr': '<f4', 'fortran_order': False, 'shape': (%d, %d, %d), }",
                 FUZZ_LOAD_T, FUZZ_HKV, FUZZ_D);
    while ((10 + n + 1) % 64) h[n++] = ' ';
    h[n++] = '\n';
    const unsigned char pre[10] = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0, (unsigned char)n, 0};
    const size_t cnt = (size_t)FUZZ_LOAD_T * FUZZ_HKV * FUZZ_D;
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(pre, 1, 10, f) != 10 || fwrite(h, 1, (size_t)n, f) != (size_t)n ||
        fwrite(x, sizeof(float), cnt, f) != cnt || fclose(f))
        s_die_path("writing a load file", path);
}

/* The load root's directories "kv" and "bad" (fixture.h). */
static void s_load_dirs(fuzz_fixture *fx, uint64_t *rng)
{
    snprintf(fx->load_root, sizeof(fx->load_root), "/tmp/fasa-fuzz-load.XXXXXX");
    if (!mkdtemp(fx->load_root)) s_die_path("mkdtemp", fx->load_root);
    const size_t cnt = (size_t)FUZZ_LOAD_T * FUZZ_HKV * FUZZ_D;
    float x[FUZZ_LOAD_T * FUZZ_HKV * FUZZ_D];
    char p[128];
    for (int bad = 0; bad < 2; bad++) {
        snprintf(p, sizeof(p), "%s/%s", fx->load_root, bad ? "bad" : "kv");
        if (mkdir(p, 0755)) s_die_path("mkdir", p);
        for (int l = 0; l < FUZZ_L; l++)
            for (int kv = 0; kv < 2; kv++) {
                fuzz_fill(rng, cnt, x, 1.0f);
                if (bad && l == 1 && kv) x[20 * FUZZ_HKV * FUZZ_D + 3] = NAN;
                snprintf(p, sizeof(p), "%s/%s/%c_%d.npy", fx->load_root, bad ? "bad" : "kv",
                         kv ? 'v' : 'k', l);
                s_npy(p, x);
            }
    }
}

fuzz_fixture *fuzz_fixture_new(void)
{
    fuzz_fixture *fx = calloc(1, sizeof(*fx));
    if (!fx) s_die("calloc", NULL);
    fx->engine = fasa_engine_new(FUZZ_SHARDS, FUZZ_BLOCK);
    if (!fx->engine) s_die("fasa_engine_new", NULL);
    uint64_t load_rng = 99;
    s_load_dirs(fx, &load_rng);
    const fasa_service_opts o = {.n_ranks = 1,
                                 .max_message = 0, /* 0: the default limit */
                                 .load_root = fx->load_root};
    fasa_engine_t *owned = fx->engine; /* the service's from here; fx->engine stays a borrow */
    fx->svc = fasa_service_new(&owned, FUZZ_SHARDS, &o);
    if (!fx->svc) s_die("fasa_service_new", NULL);
    uint64_t rng = 1234;
    s_calibrate(fx, &rng);
    const geometry std = {FUZZ_L, FUZZ_H, FUZZ_HKV, FUZZ_D, FASA__V1__PAIRING__INTERLEAVED};
    const geometry small = {1, 2, 2, 2, FASA__V1__PAIRING__HALF};
    s_session(fx, "d", &std, 0, FUZZ_N, &rng);
    s_session(fx, "f", &std, 1, FUZZ_N, &rng);
    s_session(fx, "e", &std, 0, 0, &rng);
    s_session(fx, "g", &small, 0, FUZZ_N_G, &rng);
    return fx;
}

void fuzz_fixture_destroy(fuzz_fixture **fx_p)
{
    fuzz_fixture *fx = *fx_p;
    if (!fx) return;
    fasa_service_destroy(&fx->svc);
    free(fx->profile_text);
    char cmd[128];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", fx->load_root);
    if (fx->load_root[0] && system(cmd)) s_die_path("removing", fx->load_root);
    free(fx);
    *fx_p = NULL;
}

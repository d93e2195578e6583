/* Writes the seed corpus of fuzz_request: one serialised fasa.v1.Request per file, covering
 * every request kind with the options that reach different code (create with and without a
 * profile, append of one layer and of all, attend with and without k_new under every method,
 * return_selected, max_pos, shared GQA, a batch, calibrate, set profile by name and by text,
 * stats, drop, shutdown) and a few bad requests. The seeds name the fixture's sessions
 * (fixture.h), and each is checked against a fresh fixture before it is written: the good
 * ones must be answered OK and the bad ones with their expected status, so a seed that
 * stopped reaching the engine fails the generation instead of silently weakening the fuzzer.
 *
 * Usage: gen_corpus DIR   (DIR must exist; files are named NN-what.pb) */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fixture.h"
#include "tensor.h"

enum { L = FUZZ_L, H = FUZZ_H, HKV = FUZZ_HKV, D = FUZZ_D, N = FUZZ_N };

static const char *s_dir;
static int s_count, s_failed;
static uint64_t s_rng = 99;
static char *s_profile_text;

/* Writes bytes as seed name after checking that a fresh fixture answers them with status
 * want (-1: any status). */
static void s_write(const char *name, const uint8_t *buf, size_t len, int want)
{
    fuzz_fixture *fx = fuzz_fixture_new();
    Fasa__V1__Response *r = fuzz_roundtrip(fx, buf, len);
    if (want >= 0 && (int)r->status != want) {
        fprintf(stderr, "gen_corpus: seed %s got status %d (%s), expected %d\n", name,
                (int)r->status, r->message ? r->message : "", want);
        s_failed++;
    }
    fasa__v1__response__free_unpacked(r, NULL);
    fuzz_fixture_destroy(&fx);

    char path[4096];
    snprintf(path, sizeof(path), "%s/%02d-%s.pb", s_dir, s_count++, name);
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(buf, 1, len, f) != len || fclose(f)) {
        fprintf(stderr, "gen_corpus: cannot write %s\n", path);
        exit(1);
    }
}

static void s_emit(const char *name, Fasa__V1__Request *req, int want)
{
    if (!req->protocol_version) req->protocol_version = 1;
    req->request_id = 1000 + (uint64_t)s_count;
    size_t len;
    uint8_t *buf = fuzz_pack(req, &len);
    s_write(name, buf, len, want);
    free(buf);
}

/* s_emit of a Request followed by raw data frames (fixture.h's multipart inputs). */
static void s_emit_frames(const char *name, Fasa__V1__Request *req, const edge_frame *frames,
                          int n_frames, int want)
{
    if (!req->protocol_version) req->protocol_version = 1;
    req->request_id = 1000 + (uint64_t)s_count;
    size_t len, all;
    uint8_t *buf = fuzz_pack(req, &len);
    uint8_t *joined = fuzz_join(buf, len, frames, n_frames, &all);
    s_write(name, joined, all, want);
    free(joined);
    free(buf);
}

static void s_tensor(Fasa__V1__Tensor *t, uint64_t *shape, int rank, float *data, size_t n)
{
    edge_tensor_f32(t, shape, rank, data, n);
    fuzz_fill(&s_rng, n, data, 1.0f);
}

/* A tensor of n F16 (or BF16) elements: finite values near 1 (bits from the seed). */
static void s_tensor_half(Fasa__V1__Tensor *t, uint64_t *shape, int rank, uint16_t *data, size_t n,
                          int bf16)
{
    fasa__v1__tensor__init(t);
    t->dtype = bf16 ? FASA__V1__DTYPE__BF16 : FASA__V1__DTYPE__F16;
    t->n_shape = (size_t)rank;
    t->shape = shape;
    t->data.data = (uint8_t *)data;
    t->data.len = n * sizeof(uint16_t);
    float f[n];
    fuzz_fill(&s_rng, n, f, 1.0f);
    for (size_t i = 0; i < n; i++) {
        uint32_t b;
        memcpy(&b, &f[i], sizeof(b));
        /* f32 -> bf16 by truncation, or an f16 of the same sign with 10 mantissa bits. */
        data[i] = bf16 ? (uint16_t)(b >> 16)
                       : (uint16_t)(((b >> 16) & 0x8000u) | 0x3800u | ((b >> 13) & 0x3ffu));
    }
}

static void s_ping(void)
{
    Fasa__V1__Request req = FASA__V1__REQUEST__INIT;
    Fasa__V1__Ping p = FASA__V1__PING__INIT;
    p.has_payload = 1;
    p.payload.data = (uint8_t *)"hello";
    p.payload.len = 5;
    req.body_case = FASA__V1__REQUEST__BODY_PING;
    req.ping = &p;
    s_emit("ping", &req, 0);
}

static void s_creates(void)
{
    Fasa__V1__Request req = FASA__V1__REQUEST__INIT;
    Fasa__V1__CreateSession c = FASA__V1__CREATE_SESSION__INIT;
    c.session_id = "n";
    c.n_layers = L;
    c.n_heads = H;
    c.n_kv_heads = HKV;
    c.head_dim = D;
    req.body_case = FASA__V1__REQUEST__BODY_CREATE_SESSION;
    req.create_session = &c;
    s_emit("create", &req, 0);

    /* With the profile's text, every option set. */
    Fasa__V1__DenseLayers dl = FASA__V1__DENSE_LAYERS__INIT;
    uint32_t dense[1] = {1};
    dl.n_layers = 1;
    dl.layers = dense;
    c.session_id = "t";
    c.profile_text = s_profile_text;
    c.has_pairing = c.has_method = c.has_budget = c.has_gqa = c.has_dtype = 1;
    c.pairing = FASA__V1__PAIRING__INTERLEAVED;
    c.method = FASA__V1__METHOD__FASA;
    c.budget = 8;
    c.gqa = FASA__V1__GQA__SHARED;
    c.dtype = FASA__V1__DTYPE__F32;
    c.dense_layers = &dl;
    s_emit("create-profile-text", &req, 0);

    /* An int8 scoring store (the seed of the score_dtype field). */
    c.session_id = "i8";
    c.has_score_dtype = 1;
    c.score_dtype = FASA__V1__DTYPE__I8;
    s_emit("create-score-i8", &req, 0);
    c.session_id = "i32";
    c.score_dtype = FASA__V1__DTYPE__I32;
    s_emit("bad-create-score-dtype", &req, FASA__V1__STATUS__INVALID_ARGUMENT);
    c.has_score_dtype = 0;

    /* With the stored profile's name. */
    c.session_id = "m";
    c.profile_text = NULL;
    c.profile_name = "p";
    c.method = FASA__V1__METHOD__QUEST;
    c.budget = 16;
    c.gqa = FASA__V1__GQA__PER_HEAD;
    c.dense_layers = NULL;
    s_emit("create-profile-name", &req, 0);

    /* Bad: odd head_dim; a duplicate id; HALF pairing against an INTERLEAVED profile. */
    c.session_id = "o";
    c.head_dim = 7;
    s_emit("bad-create-head-dim", &req, FASA__V1__STATUS__INVALID_ARGUMENT);
    c.head_dim = D;
    c.session_id = "d";
    s_emit("bad-create-exists", &req, FASA__V1__STATUS__ALREADY_EXISTS);
    c.session_id = "h";
    c.pairing = FASA__V1__PAIRING__HALF;
    s_emit("bad-create-pairing", &req, -1);
}

static void s_appends(void)
{
    static float k[L * 2 * HKV * D], v[L * 2 * HKV * D];
    Fasa__V1__Request req = FASA__V1__REQUEST__INIT;
    Fasa__V1__Append a = FASA__V1__APPEND__INIT;
    Fasa__V1__Tensor tk, tv;
    uint64_t all[4] = {L, 1, HKV, D}, one[3] = {2, HKV, D};
    s_tensor(&tk, all, 4, k, L * HKV * D);
    s_tensor(&tv, all, 4, v, L * HKV * D);
    a.session_id = "d";
    a.start_pos = N;
    a.k = &tk;
    a.v = &tv;
    req.body_case = FASA__V1__REQUEST__BODY_APPEND;
    req.append = &a;
    s_emit("append-all-layers", &req, 0);
    a.start_pos = 3;
    s_emit("bad-append-start-pos", &req, FASA__V1__STATUS__INVALID_ARGUMENT);

    s_tensor(&tk, one, 3, k, 2 * HKV * D);
    s_tensor(&tv, one, 3, v, 2 * HKV * D);
    a.has_layer = 1;
    a.layer = 1;
    a.start_pos = N;
    s_emit("append-layer", &req, 0);
    a.session_id = "e";
    a.start_pos = 0;
    s_emit("append-empty-session", &req, 0);

    /* k and v as raw data frames 1 and 2 after the Request; then a frame a byte short, a
     * frame too many, one missing, and one named twice. */
    a.session_id = "d";
    a.start_pos = N;
    const edge_frame fr[3] = {
        {k, sizeof(float) * 2 * HKV * D}, {v, sizeof(float) * 2 * HKV * D}, {v, 8}};
    tk.data.len = tv.data.len = 0;
    tk.has_data_frame = tv.has_data_frame = 1;
    tk.data_frame = 1;
    tv.data_frame = 2;
    s_emit_frames("append-layer-frames", &req, fr, 2, 0);
    const edge_frame shorter[2] = {fr[0], {v, fr[1].len - 1}};
    s_emit_frames("bad-append-frame-size", &req, shorter, 2, FASA__V1__STATUS__INVALID_ARGUMENT);
    s_emit_frames("bad-append-frame-extra", &req, fr, 3, FASA__V1__STATUS__INVALID_ARGUMENT);
    s_emit_frames("bad-append-frame-missing", &req, fr, 1, FASA__V1__STATUS__INVALID_ARGUMENT);
    tv.data_frame = 1;
    s_emit_frames("bad-append-frame-twice", &req, fr, 2, FASA__V1__STATUS__INVALID_ARGUMENT);
    s_tensor(&tk, one, 3, k, 2 * HKV * D);
    s_tensor(&tv, one, 3, v, 2 * HKV * D);

    /* F16 and BF16 on the wire (stored as sent where the session's dtype matches). */
    static uint16_t kh[L * 2 * HKV * D], vh[L * 2 * HKV * D];
    a.session_id = "d";
    a.start_pos = N;
    s_tensor_half(&tk, one, 3, kh, 2 * HKV * D, 0);
    s_tensor_half(&tv, one, 3, vh, 2 * HKV * D, 0);
    s_emit("append-layer-f16", &req, 0);
    s_tensor(&tv, one, 3, v, 2 * HKV * D);
    s_emit("bad-append-f16-v-f32", &req, FASA__V1__STATUS__INVALID_ARGUMENT);
    s_tensor_half(&tv, one, 3, vh, 2 * HKV * D, 0);
    vh[5] = 0x7e00; /* NaN */
    s_emit("bad-append-f16-nan", &req, FASA__V1__STATUS__INVALID_ARGUMENT);
    a.has_layer = 0;
    s_tensor_half(&tk, all, 4, kh, L * HKV * D, 1);
    s_tensor_half(&tv, all, 4, vh, L * HKV * D, 1);
    s_emit("append-all-layers-bf16", &req, 0);
}

/* One Attend on session id, layer 1. */
typedef struct attend_req {
    Fasa__V1__Request req;
    Fasa__V1__Attend a;
    Fasa__V1__Tensor tq, tk, tv;
    uint64_t qs[2], ks[2];
    float q[H * D], k[HKV * D], v[HKV * D];
} attend_req;

static void s_attend_init(attend_req *x, const char *id, int k_new)
{
    memset(x, 0, sizeof(*x));
    fasa__v1__request__init(&x->req);
    fasa__v1__attend__init(&x->a);
    x->qs[0] = H;
    x->qs[1] = D;
    x->ks[0] = HKV;
    x->ks[1] = D;
    s_tensor(&x->tq, x->qs, 2, x->q, H * D);
    x->a.session_id = (char *)id;
    x->a.layer = 1;
    x->a.q = &x->tq;
    if (k_new) {
        s_tensor(&x->tk, x->ks, 2, x->k, HKV * D);
        s_tensor(&x->tv, x->ks, 2, x->v, HKV * D);
        x->a.k_new = &x->tk;
        x->a.v_new = &x->tv;
    }
    x->req.body_case = FASA__V1__REQUEST__BODY_ATTEND;
    x->req.attend = &x->a;
}

static void s_attends(void)
{
    attend_req x;
    s_attend_init(&x, "d", 0);
    s_emit("attend-dense", &x.req, 0);
    x.a.has_method = 1;
    x.a.method = FASA__V1__METHOD__FASA;
    s_emit("bad-attend-fasa-no-profile", &x.req, FASA__V1__STATUS__FAILED_PRECONDITION);

    s_attend_init(&x, "f", 1);
    x.a.has_budget = x.a.has_return_selected = 1;
    x.a.budget = 8;
    x.a.return_selected = 1;
    s_emit("attend-fasa-k-new", &x.req, 0);
    static uint16_t knh[HKV * D], vnh[HKV * D];
    s_tensor_half(&x.tk, x.ks, 2, knh, HKV * D, 0);
    s_tensor_half(&x.tv, x.ks, 2, vnh, HKV * D, 0);
    s_emit("attend-fasa-k-new-f16", &x.req, 0);

    s_attend_init(&x, "f", 0);
    x.a.has_budget = x.a.has_return_selected = x.a.has_max_pos = x.a.has_gqa = 1;
    x.a.budget = 4;
    x.a.return_selected = 1;
    x.a.max_pos = 30;
    x.a.gqa = FASA__V1__GQA__SHARED;
    s_emit("attend-fasa-shared-max-pos", &x.req, 0);

    /* Local merge: one phase per shard; refused for the baselines. */
    s_attend_init(&x, "f", 0);
    x.a.has_budget = x.a.has_return_selected = x.a.has_merge = 1;
    x.a.budget = 8;
    x.a.return_selected = 1;
    x.a.merge = FASA__V1__MERGE__LOCAL;
    s_emit("attend-fasa-local", &x.req, 0);
    x.a.has_method = 1;
    x.a.method = FASA__V1__METHOD__STREAM;
    s_emit("bad-attend-stream-local", &x.req, FASA__V1__STATUS__INVALID_ARGUMENT);

    static const struct {
        Fasa__V1__Method m;
        const char *name;
    } methods[] = {{FASA__V1__METHOD__ORACLE, "attend-oracle"},
                   {FASA__V1__METHOD__STREAM, "attend-stream"},
                   {FASA__V1__METHOD__QUEST, "attend-quest"},
                   {FASA__V1__METHOD__SPARQ, "attend-sparq"},
                   {FASA__V1__METHOD__DENSE, "attend-dense-method"},
                   {FASA__V1__METHOD__FASA_PLUS, "attend-fasa-plus"}};
    for (size_t i = 0; i < sizeof(methods) / sizeof(methods[0]); i++) {
        s_attend_init(&x, "f", i % 2);
        x.a.has_method = x.a.has_budget = x.a.has_return_selected = 1;
        x.a.method = methods[i].m;
        x.a.budget = 20;
        x.a.return_selected = 1;
        s_emit(methods[i].name, &x.req, 0);
    }

    /* Session "g" (1 layer, 2 heads, head_dim 2, HALF): layer 0, several methods. */
    static const Fasa__V1__Method g_methods[] = {FASA__V1__METHOD__SPARQ, FASA__V1__METHOD__QUEST,
                                                 FASA__V1__METHOD__STREAM};
    for (size_t i = 0; i < sizeof(g_methods) / sizeof(g_methods[0]); i++) {
        char name[32];
        snprintf(name, sizeof(name), "attend-small-%zu", i);
        s_attend_init(&x, "g", 1);
        x.qs[0] = x.ks[0] = 2;
        x.qs[1] = x.ks[1] = 2;
        x.tq.data.len = x.tk.data.len = x.tv.data.len = 4 * sizeof(float);
        x.a.layer = 0;
        x.a.has_method = x.a.has_budget = x.a.has_return_selected = 1;
        x.a.method = g_methods[i];
        x.a.budget = 3;
        x.a.return_selected = 1;
        s_emit(name, &x.req, 0);
    }

    /* Bad: NaN in q, a q shape of the wrong head_dim, k_new without v_new. */
    s_attend_init(&x, "f", 0);
    x.q[5] = NAN;
    s_emit("bad-attend-nan", &x.req, FASA__V1__STATUS__INVALID_ARGUMENT);
    s_attend_init(&x, "f", 0);
    x.qs[0] = 2 * H;
    x.qs[1] = D / 2;
    s_emit("bad-attend-shape", &x.req, FASA__V1__STATUS__INVALID_ARGUMENT);
    s_attend_init(&x, "f", 1);
    x.a.v_new = NULL;
    s_emit("bad-attend-k-new-alone", &x.req, FASA__V1__STATUS__INVALID_ARGUMENT);

    /* A truncated Attend: the request id is still recovered. */
    s_attend_init(&x, "d", 0);
    x.req.protocol_version = 1;
    x.req.request_id = 77;
    size_t len;
    uint8_t *buf = fuzz_pack(&x.req, &len);
    s_write("bad-truncated", buf, len / 2, FASA__V1__STATUS__INVALID_ARGUMENT);
    free(buf);
}

static void s_batch(void)
{
    attend_req x[3];
    s_attend_init(&x[0], "d", 0);
    x[0].a.layer = 0;
    s_attend_init(&x[1], "f", 1);
    s_attend_init(&x[2], "f", 0);
    x[2].a.has_method = x[2].a.has_budget = 1;
    x[2].a.method = FASA__V1__METHOD__ORACLE;
    x[2].a.budget = 6;
    Fasa__V1__Attend *items[3] = {&x[0].a, &x[1].a, &x[2].a};
    Fasa__V1__Request req = FASA__V1__REQUEST__INIT;
    Fasa__V1__BatchAttend b = FASA__V1__BATCH_ATTEND__INIT;
    b.n_items = 3;
    b.items = items;
    req.body_case = FASA__V1__REQUEST__BODY_BATCH_ATTEND;
    req.batch_attend = &b;
    s_emit("batch-attend", &req, 0);
    /* One item on an unknown session: the batch is OK, that item NOT_FOUND. */
    x[1].a.session_id = "ghost";
    s_emit("batch-attend-bad-item", &req, 0);
}

static void s_calibrate(void)
{
    enum { CL = 1, CT = 8, CH = 2, CHKV = 1, CD = 4 };
    static float q[CL * CT * CH * CD], k[CL * CT * CHKV * CD];
    uint64_t qs[4] = {CL, CT, CH, CD}, ks[4] = {CL, CT, CHKV, CD};
    Fasa__V1__Request req = FASA__V1__REQUEST__INIT;
    Fasa__V1__Calibrate c = FASA__V1__CALIBRATE__INIT;
    Fasa__V1__Tensor tq, tk;
    s_tensor(&tq, qs, 4, q, sizeof(q) / sizeof(float));
    s_tensor(&tk, ks, 4, k, sizeof(k) / sizeof(float));
    c.q = &tq;
    c.k = &tk;
    c.has_window = c.has_pos_begin = c.has_pairing = c.has_ntip = 1;
    c.window = 2;
    c.pos_begin = 4;
    c.ntip = 1;
    c.pairing = FASA__V1__PAIRING__HALF;
    c.profile_name = "q";
    req.body_case = FASA__V1__REQUEST__BODY_CALIBRATE;
    req.calibrate = &c;
    s_emit("calibrate", &req, 0);
    c.has_gqa = c.has_pos_end = c.has_pos_step = 1;
    c.gqa = FASA__V1__GQA__SHARED;
    c.pos_end = 7;
    c.pos_step = 2;
    c.profile_name = NULL;
    s_emit("calibrate-shared", &req, 0);
    c.window = 8;
    s_emit("bad-calibrate-window", &req, FASA__V1__STATUS__INVALID_ARGUMENT);
}

static void s_others(void)
{
    Fasa__V1__Request req = FASA__V1__REQUEST__INIT;
    Fasa__V1__SetProfile sp = FASA__V1__SET_PROFILE__INIT;
    sp.session_id = "e";
    sp.profile_name = "p";
    req.body_case = FASA__V1__REQUEST__BODY_SET_PROFILE;
    req.set_profile = &sp;
    s_emit("set-profile-name", &req, 0);
    sp.profile_name = NULL;
    sp.profile_text = s_profile_text;
    s_emit("set-profile-text", &req, 0);
    sp.session_id = "f";
    s_emit("bad-set-profile-has-tokens", &req, FASA__V1__STATUS__FAILED_PRECONDITION);

    Fasa__V1__Stats st = FASA__V1__STATS__INIT;
    fasa__v1__request__init(&req);
    req.body_case = FASA__V1__REQUEST__BODY_STATS;
    req.stats = &st;
    s_emit("stats", &req, 0);
    st.session_id = "f";
    s_emit("stats-session", &req, 0);
    st.session_id = "ghost";
    s_emit("bad-stats-unknown", &req, FASA__V1__STATUS__NOT_FOUND);

    Fasa__V1__DropSession dr = FASA__V1__DROP_SESSION__INIT;
    fasa__v1__request__init(&req);
    dr.session_id = "d";
    req.body_case = FASA__V1__REQUEST__BODY_DROP_SESSION;
    req.drop_session = &dr;
    s_emit("drop", &req, 0);

    Fasa__V1__ListSessions ls = FASA__V1__LIST_SESSIONS__INIT;
    fasa__v1__request__init(&req);
    req.body_case = FASA__V1__REQUEST__BODY_LIST_SESSIONS;
    req.list_sessions = &ls;
    s_emit("list-sessions", &req, 0);

    Fasa__V1__DeleteProfile dp = FASA__V1__DELETE_PROFILE__INIT;
    fasa__v1__request__init(&req);
    dp.profile_name = "p";
    req.body_case = FASA__V1__REQUEST__BODY_DELETE_PROFILE;
    req.delete_profile = &dp;
    s_emit("delete-profile", &req, 0);
    dp.profile_name = "ghost";
    s_emit("bad-delete-profile-unknown", &req, FASA__V1__STATUS__NOT_FOUND);
    dp.profile_name = "two words";
    s_emit("bad-delete-profile-name", &req, FASA__V1__STATUS__INVALID_ARGUMENT);
    Fasa__V1__LoadSession ld = FASA__V1__LOAD_SESSION__INIT;
    fasa__v1__request__init(&req);
    ld.session_id = "e";
    ld.path = "kv";
    req.body_case = FASA__V1__REQUEST__BODY_LOAD_SESSION;
    req.load_session = &ld;
    s_emit("load-session", &req, 0);
    ld.has_check_only = 1, ld.check_only = 1;
    s_emit("load-session-check", &req, 0);
    ld.has_check_only = 0, ld.check_only = 0;
    ld.path = "bad";
    s_emit("bad-load-session-nan", &req, FASA__V1__STATUS__INVALID_ARGUMENT);
    ld.path = "/etc";
    s_emit("bad-load-session-outside", &req, FASA__V1__STATUS__INVALID_ARGUMENT);
    ld.path = "kv";
    ld.session_id = "d";
    s_emit("bad-load-session-full", &req, FASA__V1__STATUS__FAILED_PRECONDITION);
    ld.session_id = "g";
    s_emit("bad-load-session-geometry", &req, FASA__V1__STATUS__INVALID_ARGUMENT);
    /* No request_id (a required field): undecodable. */
    static const uint8_t no_id[] = {0x08, 0x01, 0xaa, 0x01, 0x00};
    s_write("bad-no-request-id", no_id, sizeof(no_id), FASA__V1__STATUS__INVALID_ARGUMENT);

    Fasa__V1__Shutdown sh = FASA__V1__SHUTDOWN__INIT;
    fasa__v1__request__init(&req);
    req.body_case = FASA__V1__REQUEST__BODY_SHUTDOWN;
    req.shutdown = &sh;
    s_emit("shutdown", &req, 0);

    /* Bad envelopes: a version this server does not speak, no body, garbage. */
    Fasa__V1__Ping p = FASA__V1__PING__INIT;
    fasa__v1__request__init(&req);
    req.protocol_version = 2;
    req.body_case = FASA__V1__REQUEST__BODY_PING;
    req.ping = &p;
    s_emit("bad-version", &req, FASA__V1__STATUS__INVALID_ARGUMENT);
    fasa__v1__request__init(&req);
    s_emit("bad-no-body", &req, FASA__V1__STATUS__INVALID_ARGUMENT);
    static const uint8_t junk[] = {0xff, 0x10, 0x05, 0x52, 0x80, 0x80, 0x01, 0x00};
    s_write("bad-garbage", junk, sizeof(junk), FASA__V1__STATUS__INVALID_ARGUMENT);
}

int main(int argc, char **argv)
{
    if (argc != 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) {
        fprintf(argc == 2 ? stdout : stderr,
                "usage: gen_corpus DIR\n"
                "Writes the seed corpus of fuzz_request (one serialised fasa.v1.Request per\n"
                "file) into DIR, which must exist, after checking each seed's status against\n"
                "a fresh fuzz fixture.\n");
        return argc == 2 ? 0 : 2;
    }
    s_dir = argv[1];
    fuzz_fixture *fx = fuzz_fixture_new();
    s_profile_text = strdup(fx->profile_text);
    fuzz_fixture_destroy(&fx);
    if (!s_profile_text) return 1;
    s_ping();
    s_creates();
    s_appends();
    s_attends();
    s_batch();
    s_calibrate();
    s_others();
    free(s_profile_text);
    if (s_failed) {
        fprintf(stderr, "gen_corpus: %d of %d seeds did not get their expected status\n", s_failed,
                s_count);
        return 1;
    }
    printf("gen_corpus: %d seeds in %s\n", s_count, s_dir);
    return 0;
}

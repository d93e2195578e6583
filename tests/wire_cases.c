/* Bad input at the protocol level, shared by two drivers: socket_test sends the bytes to a
 * live fasa-server over ZeroMQ, and the service suite of fasa_tests hands them straight to
 * fasa_service_handle (so the same cases also run under LeakSanitizer without MPI).
 *
 * Garbage bytes, a truncated protobuf, a wrong protocol version, shapes that disagree with
 * the session, NaN in q, an unknown session, appends out of order, budget 0, a shape that
 * claims 2 GiB: each must get an error response naming the field, and the session's state
 * must be unchanged afterwards: its length, and an Attend whose output is checked against
 * exact attention computed here and must come back bit-identical. */
#include "wire_cases.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tensor.h"
#include "test_util.h"

#define L WIRE_L
#define H WIRE_H
#define HKV WIRE_HKV
#define D WIRE_D
#define N WIRE_N

static wire_rt_fn s_rt;
static wire_rt_frames_fn s_rt_frames;
static uint64_t s_next_id = 1;
static float s_k[L][N][HKV][D], s_v[L][N][HKV][D], s_q[H][D];

void wire_create_init(Fasa__V1__Request *req, Fasa__V1__CreateSession *c, const char *id)
{
    fasa__v1__request__init(req);
    fasa__v1__create_session__init(c);
    c->session_id = (char *)id;
    c->n_layers = L;
    c->n_heads = H;
    c->n_kv_heads = HKV;
    c->head_dim = D;
    req->body_case = FASA__V1__REQUEST__BODY_CREATE_SESSION;
    req->create_session = c;
}

void wire_set_roundtrip(wire_rt_fn rt)
{
    s_rt = rt;
}

void wire_set_roundtrip_frames(wire_rt_frames_fn rt)
{
    s_rt_frames = rt;
}

/* wire_send of a Request followed by n raw data frames. */
static Fasa__V1__Response *s_send_frames(Fasa__V1__Request *req, const edge_frame *fr, int n)
{
    if (!req->request_id) req->request_id = s_next_id++;
    if (!req->protocol_version) req->protocol_version = 1;
    const size_t len = fasa__v1__request__get_packed_size(req);
    uint8_t *buf = test_alloc(len);
    fasa__v1__request__pack(req, buf);
    Fasa__V1__Response *r = s_rt_frames(buf, len, fr, n);
    free(buf);
    ck_assert_msg(r != NULL, "no reply");
    ck_assert_uint_eq(r->request_id, req->request_id);
    return r;
}

Fasa__V1__Response *wire_send(Fasa__V1__Request *req)
{
    if (!req->request_id) req->request_id = s_next_id++;
    if (!req->protocol_version) req->protocol_version = 1;
    const size_t n = fasa__v1__request__get_packed_size(req);
    uint8_t *buf = test_alloc(n);
    fasa__v1__request__pack(req, buf);
    Fasa__V1__Response *r = s_rt(buf, n);
    free(buf);
    ck_assert_msg(r != NULL, "no reply");
    ck_assert_uint_eq(r->request_id, req->request_id);
    return r;
}

/* Asserts an error status whose message mentions field. */
void wire_expect_error(Fasa__V1__Response *r, Fasa__V1__Status code, const char *field)
{
    ck_assert_msg(r->status == code, "status %d, expected %d (%s)", r->status, code,
                  r->message ? r->message : "");
    ck_assert_ptr_nonnull(r->message);
    ck_assert_msg(strstr(r->message, field) != NULL, "message '%s' does not name '%s'", r->message,
                  field);
    fasa__v1__response__free_unpacked(r, NULL);
}

void wire_tensor(Fasa__V1__Tensor *t, uint64_t *shape, int rank, const float *data, size_t n)
{
    edge_tensor_f32(t, shape, rank, data, n);
}

static Fasa__V1__Response *s_attend_q(const char *id, const float *q, uint64_t *shape, int budget)
{
    Fasa__V1__Request req = FASA__V1__REQUEST__INIT;
    Fasa__V1__Attend a = FASA__V1__ATTEND__INIT;
    Fasa__V1__Tensor tq;
    wire_tensor(&tq, shape, 2, q, (size_t)(shape[0] * shape[1]));
    a.session_id = (char *)id;
    a.layer = 1;
    a.q = &tq;
    if (budget >= 0) {
        a.has_budget = 1;
        a.budget = (uint32_t)budget;
    }
    req.body_case = FASA__V1__REQUEST__BODY_ATTEND;
    req.attend = &a;
    return wire_send(&req);
}

static Fasa__V1__Response *s_append(const char *id, uint64_t start, uint64_t *shape, int rank,
                                    const float *k, const float *v, size_t n)
{
    Fasa__V1__Request req = FASA__V1__REQUEST__INIT;
    Fasa__V1__Append a = FASA__V1__APPEND__INIT;
    Fasa__V1__Tensor tk, tv;
    wire_tensor(&tk, shape, rank, k, n);
    wire_tensor(&tv, shape, rank, v, n);
    a.session_id = (char *)id;
    a.start_pos = start;
    a.k = &tk;
    a.v = &tv;
    req.body_case = FASA__V1__REQUEST__BODY_APPEND;
    req.append = &a;
    return wire_send(&req);
}

static uint64_t s_length(const char *id)
{
    Fasa__V1__Request req = FASA__V1__REQUEST__INIT;
    Fasa__V1__Stats st = FASA__V1__STATS__INIT;
    st.session_id = (char *)id;
    req.body_case = FASA__V1__REQUEST__BODY_STATS;
    req.stats = &st;
    Fasa__V1__Response *r = wire_send(&req);
    ck_assert_int_eq(r->status, FASA__V1__STATUS__OK);
    ck_assert_ptr_nonnull(r->stats->session);
    const uint64_t n = r->stats->session->length;
    fasa__v1__response__free_unpacked(r, NULL);
    return n;
}

/* The reference: exact attention of layer 1 over every position, in double. */
static void s_reference(float out[H][D])
{
    for (int h = 0; h < H; h++) {
        const int g = h / (H / HKV);
        double s[N], m = -INFINITY, l = 0, o[D] = {0};
        for (int t = 0; t < N; t++) {
            double dot = 0;
            for (int i = 0; i < D; i++) dot += (double)s_q[h][i] * s_k[1][t][g][i];
            s[t] = dot / sqrt((double)D);
            if (s[t] > m) m = s[t];
        }
        for (int t = 0; t < N; t++) {
            const double p = exp(s[t] - m);
            l += p;
            for (int i = 0; i < D; i++) o[i] += p * s_v[1][t][g][i];
        }
        for (int i = 0; i < D; i++) out[h][i] = (float)(o[i] / l);
    }
}

static float s_base[H][D];

/* Creates session "bad" (dense, 40 tokens in both layers) and records its attend output. */
/* The reply to a DropSession of id (caller frees). */
static Fasa__V1__Response *s_drop(const char *id)
{
    Fasa__V1__DropSession ds = FASA__V1__DROP_SESSION__INIT;
    ds.session_id = (char *)id;
    Fasa__V1__Request req = FASA__V1__REQUEST__INIT;
    req.body_case = FASA__V1__REQUEST__BODY_DROP_SESSION;
    req.drop_session = &ds;
    return wire_send(&req);
}

void wire_make_session(void)
{
    test_rng rng = {42};
    test_fill(&rng, sizeof(s_k) / sizeof(float), &s_k[0][0][0][0], 1.0f);
    test_fill(&rng, sizeof(s_v) / sizeof(float), &s_v[0][0][0][0], 1.0f);
    test_fill(&rng, sizeof(s_q) / sizeof(float), &s_q[0][0], 2.0f);

    fasa__v1__response__free_unpacked(s_drop("bad"), NULL); /* from an earlier run */

    Fasa__V1__Request cr;
    Fasa__V1__CreateSession c;
    wire_create_init(&cr, &c, "bad");
    Fasa__V1__Response *r = wire_send(&cr);
    ck_assert_msg(r->status == 0, "create: %s", r->message);
    fasa__v1__response__free_unpacked(r, NULL);

    uint64_t shape[4] = {L, N, HKV, D};
    r = s_append("bad", 0, shape, 4, &s_k[0][0][0][0], &s_v[0][0][0][0], sizeof(s_k) / 4);
    ck_assert_msg(r->status == 0, "append: %s", r->message);
    ck_assert_uint_eq(r->append->length, N);
    fasa__v1__response__free_unpacked(r, NULL);

    uint64_t qs[2] = {H, D};
    r = s_attend_q("bad", &s_q[0][0], qs, -1);
    ck_assert_msg(r->status == 0, "attend: %s", r->message);
    ck_assert_uint_eq(r->attend->out->data.len, sizeof(s_base));
    memcpy(s_base, r->attend->out->data.data, sizeof(s_base));
    ck_assert_int_eq(r->attend->stats->n_visible, N);
    fasa__v1__response__free_unpacked(r, NULL);
    float ref[H][D];
    s_reference(ref);
    for (int h = 0; h < H; h++)
        for (int i = 0; i < D; i++) ck_assert_float_eq_tol(s_base[h][i], ref[h][i], 1e-5);
}

/* The session is as it was: same length, bit-identical output. */
void wire_check_unchanged(void)
{
    ck_assert_uint_eq(s_length("bad"), N);
    uint64_t qs[2] = {H, D};
    Fasa__V1__Response *r = s_attend_q("bad", &s_q[0][0], qs, -1);
    ck_assert_msg(r->status == 0, "attend: %s", r->message);
    ck_assert_int_eq(memcmp(r->attend->out->data.data, s_base, sizeof(s_base)), 0);
    fasa__v1__response__free_unpacked(r, NULL);
}

START_TEST(test_bad_bytes)
{
    wire_make_session();
    /* Garbage. */
    uint8_t junk[64];
    test_rng rng = {7};
    for (size_t i = 0; i < sizeof(junk); i++) junk[i] = (uint8_t)test_next(&rng);
    junk[0] = 0xff; /* not a valid first key */
    Fasa__V1__Response *r = s_rt(junk, sizeof(junk));
    ck_assert_ptr_nonnull(r);
    ck_assert_uint_eq(r->request_id, 0);
    wire_expect_error(r, FASA__V1__STATUS__INVALID_ARGUMENT, "request");

    /* A valid Append cut short: refused, and the request id is still recovered. */
    Fasa__V1__Request req = FASA__V1__REQUEST__INIT;
    Fasa__V1__Append a = FASA__V1__APPEND__INIT;
    Fasa__V1__Tensor tk, tv;
    uint64_t shape[3] = {1, HKV, D};
    wire_tensor(&tk, shape, 3, &s_k[0][0][0][0], HKV * D);
    wire_tensor(&tv, shape, 3, &s_v[0][0][0][0], HKV * D);
    a.session_id = "bad";
    a.has_layer = 1;
    a.layer = 0;
    a.start_pos = N;
    a.k = &tk;
    a.v = &tv;
    req.protocol_version = 1;
    req.request_id = 4242;
    req.body_case = FASA__V1__REQUEST__BODY_APPEND;
    req.append = &a;
    uint8_t buf[1024];
    const size_t n = fasa__v1__request__pack(&req, buf);
    r = s_rt(buf, n / 2);
    ck_assert_ptr_nonnull(r);
    ck_assert_uint_eq(r->request_id, 4242);
    wire_expect_error(r, FASA__V1__STATUS__INVALID_ARGUMENT, "request");

    /* Wrong protocol version. */
    Fasa__V1__Request v = FASA__V1__REQUEST__INIT;
    Fasa__V1__Ping p = FASA__V1__PING__INIT;
    v.protocol_version = 99;
    v.body_case = FASA__V1__REQUEST__BODY_PING;
    v.ping = &p;
    wire_expect_error(wire_send(&v), FASA__V1__STATUS__INVALID_ARGUMENT, "protocol_version");

    /* No body at all. */
    Fasa__V1__Request e = FASA__V1__REQUEST__INIT;
    wire_expect_error(wire_send(&e), FASA__V1__STATUS__INVALID_ARGUMENT, "request.body");

    wire_check_unchanged();
}
END_TEST

START_TEST(test_bad_fields)
{
    wire_make_session();
    uint64_t good[2] = {H, D}, wrong[2] = {H, D - 2}, huge[2] = {1u << 15, 1u << 14};
    float q[H * D];
    memcpy(q, s_q, sizeof(q));

    /* A q shape that disagrees with the session. */
    wire_expect_error(s_attend_q("bad", q, wrong, -1), FASA__V1__STATUS__INVALID_ARGUMENT,
                      "attend.q.shape");
    /* A shape that claims 2 GiB with 128 bytes behind it. */
    Fasa__V1__Request req = FASA__V1__REQUEST__INIT;
    Fasa__V1__Attend a = FASA__V1__ATTEND__INIT;
    Fasa__V1__Tensor tq;
    wire_tensor(&tq, huge, 2, q, H * D);
    a.session_id = "bad";
    a.layer = 1;
    a.q = &tq;
    req.body_case = FASA__V1__REQUEST__BODY_ATTEND;
    req.attend = &a;
    wire_expect_error(wire_send(&req), FASA__V1__STATUS__INVALID_ARGUMENT, "attend.q.shape");
    /* A dtype the server does not take. */
    tq.dtype = FASA__V1__DTYPE__F16;
    tq.shape = good;
    wire_expect_error(wire_send(&req), FASA__V1__STATUS__INVALID_ARGUMENT, "attend.q.dtype");
    /* NaN and infinity in q. */
    q[5] = NAN;
    wire_expect_error(s_attend_q("bad", q, good, -1), FASA__V1__STATUS__INVALID_ARGUMENT,
                      "attend.q[5]");
    q[5] = INFINITY;
    wire_expect_error(s_attend_q("bad", q, good, -1), FASA__V1__STATUS__INVALID_ARGUMENT,
                      "attend.q[5]");
    q[5] = s_q[0][5];
    /* Budget 0. */
    wire_expect_error(s_attend_q("bad", q, good, 0), FASA__V1__STATUS__INVALID_ARGUMENT,
                      "attend.budget");
    /* An unknown session. */
    wire_expect_error(s_attend_q("nobody", q, good, -1), FASA__V1__STATUS__NOT_FOUND, "session_id");
    /* A layer beyond the session's. */
    a.layer = L;
    tq.dtype = FASA__V1__DTYPE__F32;
    wire_expect_error(wire_send(&req), FASA__V1__STATUS__INVALID_ARGUMENT, "attend.layer");
    /* method fasa on a session without a profile. */
    a.layer = 1;
    a.has_method = 1;
    a.method = FASA__V1__METHOD__FASA;
    wire_expect_error(wire_send(&req), FASA__V1__STATUS__FAILED_PRECONDITION, "profile");
    /* An unknown method number. */
    a.method = (Fasa__V1__Method)17;
    wire_expect_error(wire_send(&req), FASA__V1__STATUS__INVALID_ARGUMENT, "attend.method");
    a.has_method = 0;
    /* k_new without v_new. */
    Fasa__V1__Tensor tk;
    uint64_t kshape[2] = {HKV, D};
    wire_tensor(&tk, kshape, 2, &s_k[1][0][0][0], HKV * D);
    a.k_new = &tk;
    wire_expect_error(wire_send(&req), FASA__V1__STATUS__INVALID_ARGUMENT, "v_new");
    a.k_new = NULL;

    /* Appends out of order (position 50, the session expects 40), and into the past. */
    uint64_t ashape[4] = {L, 1, HKV, D};
    wire_expect_error(
        s_append("bad", 50, ashape, 4, &s_k[0][0][0][0], &s_v[0][0][0][0], L * HKV * D),
        FASA__V1__STATUS__INVALID_ARGUMENT, "append.start_pos");
    wire_expect_error(
        s_append("bad", 3, ashape, 4, &s_k[0][0][0][0], &s_v[0][0][0][0], L * HKV * D),
        FASA__V1__STATUS__INVALID_ARGUMENT, "append.start_pos");
    /* An append whose head count disagrees with the session. */
    uint64_t bshape[4] = {L, 2, 1, D};
    wire_expect_error(s_append("bad", N, bshape, 4, &s_k[0][0][0][0], &s_v[0][0][0][0], L * 2 * D),
                      FASA__V1__STATUS__INVALID_ARGUMENT, "append.k.shape");
    /* NaN in an append's values. */
    float kv[L][1][HKV][D];
    memcpy(kv, s_k, sizeof(kv));
    kv[1][0][1][3] = NAN;
    wire_expect_error(s_append("bad", N, ashape, 4, &kv[0][0][0][0], &kv[0][0][0][0], L * HKV * D),
                      FASA__V1__STATUS__INVALID_ARGUMENT, "append.k[");
    /* A 0-row append (shape [L, 0, HKV, D], no data): named as 0 rows, not as a shape that
     * "claims more than the 0 data bytes". */
    uint64_t zshape[4] = {L, 0, HKV, D};
    Fasa__V1__Response *zr = s_append("bad", N, zshape, 4, &s_k[0][0][0][0], &s_v[0][0][0][0], 0);
    ck_assert_msg(zr->message && !strstr(zr->message, "claims more"), "%s", zr->message);
    wire_expect_error(zr, FASA__V1__STATUS__INVALID_ARGUMENT, "append.k.shape[1] is 0");
    /* An append to an unknown session. */
    wire_expect_error(
        s_append("ghost", 0, ashape, 4, &s_k[0][0][0][0], &s_v[0][0][0][0], L * HKV * D),
        FASA__V1__STATUS__NOT_FOUND, "session_id");

    /* A duplicate create, a session id with a space, and an unknown drop. */
    Fasa__V1__Request cr;
    Fasa__V1__CreateSession c;
    wire_create_init(&cr, &c, "bad");
    wire_expect_error(wire_send(&cr), FASA__V1__STATUS__ALREADY_EXISTS, "bad");
    c.session_id = "has space";
    wire_expect_error(wire_send(&cr), FASA__V1__STATUS__INVALID_ARGUMENT,
                      "create_session.session_id");
    c.session_id = "odd";
    c.head_dim = 7;
    wire_expect_error(wire_send(&cr), FASA__V1__STATUS__INVALID_ARGUMENT, "head_dim");
    c.head_dim = D;
    c.profile_text = "fasa-profile 1\nn_layers 99999999\n";
    wire_expect_error(wire_send(&cr), FASA__V1__STATUS__INVALID_ARGUMENT, "profile_text");
    wire_expect_error(s_drop("ghost"), FASA__V1__STATUS__NOT_FOUND, "ghost");

    /* A batch: one good item and one bad; the good one runs, the bad one names itself. */
    Fasa__V1__Request br = FASA__V1__REQUEST__INIT;
    Fasa__V1__BatchAttend b = FASA__V1__BATCH_ATTEND__INIT;
    Fasa__V1__Attend ok = FASA__V1__ATTEND__INIT, bad = FASA__V1__ATTEND__INIT;
    Fasa__V1__Tensor tq_ok, tq_bad;
    wire_tensor(&tq_ok, good, 2, &s_q[0][0], H * D);
    wire_tensor(&tq_bad, wrong, 2, &s_q[0][0], H * (D - 2));
    ok.session_id = bad.session_id = "bad";
    ok.layer = bad.layer = 1;
    ok.q = &tq_ok;
    bad.q = &tq_bad;
    Fasa__V1__Attend *items[2] = {&ok, &bad};
    b.n_items = 2;
    b.items = items;
    br.body_case = FASA__V1__REQUEST__BODY_BATCH_ATTEND;
    br.batch_attend = &b;
    Fasa__V1__Response *r = wire_send(&br);
    ck_assert_int_eq(r->status, 0);
    ck_assert_uint_eq(r->batch_attend->n_items, 2);
    ck_assert_int_eq(r->batch_attend->items[0]->status, 0);
    ck_assert_int_eq(
        memcmp(r->batch_attend->items[0]->result->out->data.data, s_base, sizeof(s_base)), 0);
    ck_assert_int_eq(r->batch_attend->items[1]->status, FASA__V1__STATUS__INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(r->batch_attend->items[1]->message, "batch_attend.items[1].q"));
    fasa__v1__response__free_unpacked(r, NULL);
    /* A NaN in one item (an edge check, unlike the shape above) fails that item alone too. */
    float qnan[H * D];
    memcpy(qnan, &s_q[0][0], sizeof(qnan));
    qnan[3] = NAN;
    wire_tensor(&tq_bad, good, 2, qnan, H * D);
    r = wire_send(&br);
    ck_assert_int_eq(r->status, 0);
    ck_assert_int_eq(r->batch_attend->items[0]->status, 0);
    ck_assert_int_eq(
        memcmp(r->batch_attend->items[0]->result->out->data.data, s_base, sizeof(s_base)), 0);
    ck_assert_int_eq(r->batch_attend->items[1]->status, FASA__V1__STATUS__INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(r->batch_attend->items[1]->message, "batch_attend.items[1].q"));
    ck_assert_ptr_nonnull(strstr(r->batch_attend->items[1]->message, "NaN"));
    fasa__v1__response__free_unpacked(r, NULL);

    wire_check_unchanged();
}
END_TEST

/* CreateSession.dtype: F16 and BF16 are storage dtypes, I32 and unknown numbers are not. */
START_TEST(test_create_dtype)
{
    Fasa__V1__Request req;
    Fasa__V1__CreateSession c;
    const int bad[2] = {FASA__V1__DTYPE__I32, 9};
    for (int i = 0; i < 2; i++) {
        wire_create_init(&req, &c, "dt-bad");
        c.has_dtype = 1;
        c.dtype = (Fasa__V1__DType)bad[i];
        wire_expect_error(wire_send(&req), FASA__V1__STATUS__INVALID_ARGUMENT,
                          "create_session.dtype");
    }
    const char *ids[2] = {"dt-f16", "dt-bf16"};
    for (int i = 0; i < 2; i++) {
        wire_create_init(&req, &c, ids[i]);
        c.has_dtype = 1;
        c.dtype = i ? FASA__V1__DTYPE__BF16 : FASA__V1__DTYPE__F16;
        Fasa__V1__Response *r = wire_send(&req);
        ck_assert_int_eq(r->status, 0);
        fasa__v1__response__free_unpacked(r, NULL);
        r = s_drop(ids[i]);
        ck_assert_int_eq(r->status, 0);
        fasa__v1__response__free_unpacked(r, NULL);
    }
}
END_TEST

/* Append values the session's dtype cannot take: inline F16/BF16 NaN and infinity, 70000
 * (F32) into an f16 session, 2^51 into an f32 session. Each is refused naming the field,
 * and the session keeps its length (one good row appended first). */
static Fasa__V1__Response *s_append_dt(const char *id, uint64_t *shape, Fasa__V1__DType dt,
                                       const void *k, const void *v, size_t bytes)
{
    Fasa__V1__Request req = FASA__V1__REQUEST__INIT;
    Fasa__V1__Append a = FASA__V1__APPEND__INIT;
    Fasa__V1__Tensor tk, tv;
    wire_tensor(&tk, shape, 4, k, 0);
    wire_tensor(&tv, shape, 4, v, 0);
    tk.dtype = tv.dtype = dt;
    tk.data.data = (uint8_t *)k, tk.data.len = bytes;
    tv.data.data = (uint8_t *)v, tv.data.len = bytes;
    a.session_id = (char *)id;
    a.start_pos = 1;
    a.k = &tk;
    a.v = &tv;
    req.body_case = FASA__V1__REQUEST__BODY_APPEND;
    req.append = &a;
    return wire_send(&req);
}

START_TEST(test_append_bad_values)
{
    uint64_t shape[4] = {L, 1, HKV, D};
    const char *ids[3] = {"val-f32", "val-f16", "val-bf16"};
    const Fasa__V1__DType dts[3] = {FASA__V1__DTYPE__F32, FASA__V1__DTYPE__F16,
                                    FASA__V1__DTYPE__BF16};
    for (int i = 0; i < 3; i++) {
        Fasa__V1__Request req;
        Fasa__V1__CreateSession c;
        wire_create_init(&req, &c, ids[i]);
        c.has_dtype = 1;
        c.dtype = dts[i];
        Fasa__V1__Response *r = wire_send(&req);
        ck_assert_int_eq(r->status, 0);
        fasa__v1__response__free_unpacked(r, NULL);
        r = s_append(ids[i], 0, shape, 4, &s_k[0][0][0][0], &s_v[0][0][0][0], L * HKV * D);
        ck_assert_int_eq(r->status, 0);
        fasa__v1__response__free_unpacked(r, NULL);
        ck_assert_uint_eq(s_length(ids[i]), 1);
    }
    enum { NV = L * HKV * D };
    static float kf[NV];
    static uint16_t kh[NV], vh[NV];
    /* f32: 2^51 in k. */
    memcpy(kf, s_k, sizeof(kf));
    kf[5] = 2251799813685248.0f;
    wire_expect_error(s_append("val-f32", 1, shape, 4, kf, &s_v[0][0][0][0], NV),
                      FASA__V1__STATUS__INVALID_ARGUMENT, "k[5]");
    ck_assert_uint_eq(s_length("val-f32"), 1);
    /* f16 session, F32 tensors: 70000 overflows f16. */
    kf[5] = 70000.0f;
    wire_expect_error(s_append("val-f16", 1, shape, 4, kf, &s_v[0][0][0][0], NV),
                      FASA__V1__STATUS__INVALID_ARGUMENT, "k[5]");
    ck_assert_uint_eq(s_length("val-f16"), 1);
    /* Inline F16 / BF16: NaN in k, infinity in v (small finite values elsewhere: 0.5). */
    for (int i = 1; i < 3; i++) {
        const uint16_t half = i == 1 ? 0x3800 : 0x3f00, nan = i == 1 ? 0x7e00 : 0x7fc0,
                       inf = i == 1 ? 0x7c00 : 0x7f80;
        for (int j = 0; j < NV; j++) kh[j] = vh[j] = half;
        kh[7] = nan;
        wire_expect_error(s_append_dt(ids[i], shape, dts[i], kh, vh, sizeof(kh)),
                          FASA__V1__STATUS__INVALID_ARGUMENT, "k[7]");
        ck_assert_uint_eq(s_length(ids[i]), 1);
        kh[7] = half;
        vh[9] = inf;
        wire_expect_error(s_append_dt(ids[i], shape, dts[i], kh, vh, sizeof(kh)),
                          FASA__V1__STATUS__INVALID_ARGUMENT, "v[9]");
        ck_assert_uint_eq(s_length(ids[i]), 1);
        /* The same tensors without the bad value are taken. */
        vh[9] = half;
        Fasa__V1__Response *r = s_append_dt(ids[i], shape, dts[i], kh, vh, sizeof(kh));
        ck_assert_msg(r->status == 0, "%s", r->message ? r->message : "");
        fasa__v1__response__free_unpacked(r, NULL);
        ck_assert_uint_eq(s_length(ids[i]), 2);
    }
    for (int i = 0; i < 3; i++) {
        Fasa__V1__Response *r = s_drop(ids[i]);
        ck_assert_int_eq(r->status, 0);
        fasa__v1__response__free_unpacked(r, NULL);
    }
}
END_TEST

/* CreateSession.score_dtype: F32, F16, BF16 and I8 are score dtypes (any storage dtype),
 * I32 and unknown numbers are refused naming the field. */
START_TEST(test_create_score_dtype)
{
    Fasa__V1__Request req;
    Fasa__V1__CreateSession c;
    const int bad[2] = {FASA__V1__DTYPE__I32, 9};
    for (int i = 0; i < 2; i++) {
        wire_create_init(&req, &c, "sd-bad");
        c.has_score_dtype = 1;
        c.score_dtype = (Fasa__V1__DType)bad[i];
        wire_expect_error(wire_send(&req), FASA__V1__STATUS__INVALID_ARGUMENT,
                          "create_session.score_dtype");
    }
    const int good[4] = {FASA__V1__DTYPE__F32, FASA__V1__DTYPE__F16, FASA__V1__DTYPE__BF16,
                         FASA__V1__DTYPE__I8};
    for (int i = 0; i < 4; i++) {
        wire_create_init(&req, &c, "sd-ok");
        c.has_dtype = 1;
        c.dtype = FASA__V1__DTYPE__F16;
        c.has_score_dtype = 1;
        c.score_dtype = (Fasa__V1__DType)good[i];
        Fasa__V1__Response *r = wire_send(&req);
        ck_assert_int_eq(r->status, 0);
        fasa__v1__response__free_unpacked(r, NULL);
        r = s_drop("sd-ok");
        ck_assert_int_eq(r->status, 0);
        fasa__v1__response__free_unpacked(r, NULL);
    }
}
END_TEST

/* An Append of every layer of id from start with k and v as raw data frames fk and fv (0:
 * inline) over the frames fr[0..n). */
typedef struct frames_append {
    Fasa__V1__Request req;
    Fasa__V1__Append a;
    Fasa__V1__Tensor tk, tv;
    uint64_t shape[4];
} frames_append;

static void s_frames_append_init(frames_append *x, const char *id, uint64_t start, uint64_t n)
{
    fasa__v1__request__init(&x->req);
    fasa__v1__append__init(&x->a);
    x->shape[0] = L, x->shape[1] = n, x->shape[2] = HKV, x->shape[3] = D;
    wire_tensor(&x->tk, x->shape, 4, &s_k[0][0][0][0], (size_t)(L * n * HKV * D));
    wire_tensor(&x->tv, x->shape, 4, &s_v[0][0][0][0], (size_t)(L * n * HKV * D));
    x->tk.has_data_frame = x->tv.has_data_frame = 1;
    x->tk.data_frame = 1;
    x->tv.data_frame = 2;
    x->tk.data.len = x->tv.data.len = 0;
    x->a.session_id = (char *)id;
    x->a.start_pos = start;
    x->a.k = &x->tk;
    x->a.v = &x->tv;
    x->req.body_case = FASA__V1__REQUEST__BODY_APPEND;
    x->req.append = &x->a;
}

START_TEST(test_raw_frames)
{
    if (!s_rt_frames) return;
    wire_make_session();
    /* The rows of "bad" again, into "frames" as raw data frames (k's 4 bytes off an
     * 8-byte boundary, v's 2: a misaligned one is copied): the same stored rows, so the
     * same attend output, bit for bit. */
    fasa__v1__response__free_unpacked(s_drop("frames"), NULL);
    Fasa__V1__Request cr;
    Fasa__V1__CreateSession c;
    wire_create_init(&cr, &c, "frames");
    Fasa__V1__Response *r = wire_send(&cr);
    ck_assert_msg(r->status == 0, "create: %s", r->message);
    fasa__v1__response__free_unpacked(r, NULL);
    const size_t bytes = sizeof(s_k);
    uint8_t *kb = test_alloc(bytes + 8), *vb = test_alloc(bytes + 8);
    memcpy(kb + 4, s_k, bytes);
    memcpy(vb + 2, s_v, bytes);
    frames_append x;
    s_frames_append_init(&x, "frames", 0, N);
    edge_frame fr[EDGE_MAX_FRAMES + 1];
    fr[0] = (edge_frame){kb + 4, bytes};
    fr[1] = (edge_frame){vb + 2, bytes};
    r = s_send_frames(&x.req, fr, 2);
    ck_assert_msg(r->status == 0, "append with raw frames: %s", r->message);
    ck_assert_uint_eq(r->append->length, N);
    fasa__v1__response__free_unpacked(r, NULL);
    uint64_t qs[2] = {H, D};
    r = s_attend_q("frames", &s_q[0][0], qs, -1);
    ck_assert_msg(r->status == 0, "attend: %s", r->message);
    ck_assert_int_eq(memcmp(r->attend->out->data.data, s_base, sizeof(s_base)), 0);
    fasa__v1__response__free_unpacked(r, NULL);
    fasa__v1__response__free_unpacked(s_drop("frames"), NULL);

    /* Bad frames, each refused naming what is wrong, "bad" unchanged. One token more. */
    const size_t one = (size_t)L * HKV * D * sizeof(float);
    s_frames_append_init(&x, "bad", N, 1);
    fr[0] = (edge_frame){kb + 4, one};
    fr[1] = (edge_frame){vb + 2, one};
    fr[2] = (edge_frame){vb + 2, 8};
    const edge_frame short_v[2] = {fr[0], {vb + 2, one - 4}}, long_k[2] = {{kb, one + 4}, fr[1]};
    wire_expect_error(s_send_frames(&x.req, short_v, 2), FASA__V1__STATUS__INVALID_ARGUMENT,
                      "append.v.shape [2, 1, 2, 8] claims more than the 124 bytes of data frame 2");
    wire_expect_error(s_send_frames(&x.req, long_k, 2), FASA__V1__STATUS__INVALID_ARGUMENT,
                      "append.k.shape holds 32 floats but data frame 1 has 132 bytes");
    wire_expect_error(s_send_frames(&x.req, fr, 1), FASA__V1__STATUS__INVALID_ARGUMENT,
                      "append.v.data_frame 2: the message has only 1 data frame");
    wire_expect_error(s_send_frames(&x.req, fr, 3), FASA__V1__STATUS__INVALID_ARGUMENT,
                      "data frame 3 (8 bytes) is named by no tensor");
    wire_expect_error(s_send_frames(&x.req, fr, 0), FASA__V1__STATUS__INVALID_ARGUMENT,
                      "append.k.data_frame 1: the message has no data frames");
    x.tv.data_frame = 1;
    wire_expect_error(s_send_frames(&x.req, fr, 2), FASA__V1__STATUS__INVALID_ARGUMENT,
                      "append.v.data_frame 1 is already the data of another tensor");
    x.tv.data_frame = 2;
    x.tv.data.len = one; /* inline data too */
    wire_expect_error(s_send_frames(&x.req, fr, 2), FASA__V1__STATUS__INVALID_ARGUMENT,
                      "append.v: data (128 bytes) and data_frame 2 are both given");
    x.tv.data.len = 0;
    float nan_v[L * HKV * D];
    memcpy(nan_v, s_v, sizeof(nan_v));
    nan_v[5] = NAN;
    const edge_frame with_nan[2] = {fr[0], {nan_v, sizeof(nan_v)}};
    wire_expect_error(s_send_frames(&x.req, with_nan, 2), FASA__V1__STATUS__INVALID_ARGUMENT,
                      "append.v[5] is NaN");
    /* No Request before the frames (an empty first frame), and garbage there. */
    wire_expect_error(s_rt_frames("", 0, fr, 2), FASA__V1__STATUS__INVALID_ARGUMENT, "first frame");
    wire_expect_error(s_rt_frames("\xff\xff\xff", 3, fr, 2), FASA__V1__STATUS__INVALID_ARGUMENT,
                      "first frame is not a valid fasa.v1.Request");
    /* Attend q as a raw frame, in a BatchAttend whose first item the edge refuses (a session
     * id with spaces, before its q is read) alone, its frame still its own: the second gets
     * "bad"'s output. */
    {
        Fasa__V1__Request req = FASA__V1__REQUEST__INIT;
        Fasa__V1__BatchAttend b = FASA__V1__BATCH_ATTEND__INIT;
        Fasa__V1__Attend it[2] = {FASA__V1__ATTEND__INIT, FASA__V1__ATTEND__INIT};
        Fasa__V1__Attend *items[2] = {&it[0], &it[1]};
        Fasa__V1__Tensor tq[2];
        uint64_t qs[2] = {H, D};
        const edge_frame qf[2] = {{s_q, sizeof(s_q)}, {s_q, sizeof(s_q)}};
        for (int i = 0; i < 2; i++) {
            wire_tensor(&tq[i], qs, 2, &s_q[0][0], H * D);
            tq[i].data.len = 0;
            tq[i].has_data_frame = 1;
            tq[i].data_frame = (uint32_t)i + 1;
            it[i].session_id = i ? "bad" : "no such session";
            it[i].layer = 1;
            it[i].q = &tq[i];
        }
        b.n_items = 2;
        b.items = items;
        req.body_case = FASA__V1__REQUEST__BODY_BATCH_ATTEND;
        req.batch_attend = &b;
        Fasa__V1__Response *br = s_send_frames(&req, qf, 2);
        ck_assert_msg(br->status == 0, "batch: %s", br->message);
        ck_assert_uint_eq(br->batch_attend->n_items, 2);
        ck_assert_int_eq(br->batch_attend->items[0]->status, FASA__V1__STATUS__INVALID_ARGUMENT);
        ck_assert_int_eq(br->batch_attend->items[1]->status, FASA__V1__STATUS__OK);
        ck_assert_int_eq(
            memcmp(br->batch_attend->items[1]->result->out->data.data, s_base, sizeof(s_base)), 0);
        fasa__v1__response__free_unpacked(br, NULL);
    }
    /* More frames than a message may carry. */
    for (int i = 0; i <= EDGE_MAX_FRAMES; i++) fr[i] = (edge_frame){vb, 4};
    wire_expect_error(s_send_frames(&x.req, fr, EDGE_MAX_FRAMES + 1),
                      FASA__V1__STATUS__INVALID_ARGUMENT, "data frames");
    free(kb);
    free(vb);
    wire_check_unchanged();
}
END_TEST

void wire_cases_add(TCase *tc)
{
    tcase_add_test(tc, test_raw_frames);
    tcase_add_test(tc, test_bad_bytes);
    tcase_add_test(tc, test_bad_fields);
    tcase_add_test(tc, test_create_dtype);
    tcase_add_test(tc, test_append_bad_values);
    tcase_add_test(tc, test_create_score_dtype);
}

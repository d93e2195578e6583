/* The service without ZeroMQ or MPI: the bad-input cases of wire_cases.c handed straight
 * to fasa_service_handle over an embedded engine of 2 shards (so they run under
 * LeakSanitizer too), and the requests only the service answers: Calibrate against
 * fasa_calibrate called directly, SetProfile, Stats, Shutdown. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "calib.h"
#include "service.h"
#include "test_util.h"
#include "wire_cases.h"

static fasa_service *s_svc;
static int s_shutdown;

static Fasa__V1__Response *s_rt(const void *buf, size_t len)
{
    uint8_t *reply = NULL;
    size_t n = 0;
    ck_assert_int_eq(fasa_service_handle(s_svc, buf, len, &reply, &n, &s_shutdown), 0);
    Fasa__V1__Response *r = fasa__v1__response__unpack(NULL, n, reply);
    free(reply);
    ck_assert_ptr_nonnull(r);
    return r;
}

static void s_setup(void)
{
    fasa_engine_t *e = fasa_engine_new(2, 16);
    ck_assert_ptr_nonnull(e);
    const fasa_service_opts o = {.n_ranks = 1, .max_message = 1 << 20};
    s_svc = fasa_service_new(e, 2, &o);
    ck_assert_ptr_nonnull(s_svc);
    s_shutdown = 0;
    wire_set_roundtrip(s_rt);
}

static void s_teardown(void)
{
    fasa_service_destroy(&s_svc);
}

static void s_tensor(Fasa__V1__Tensor *t, uint64_t *shape, const float *data, size_t n)
{
    fasa__v1__tensor__init(t);
    t->dtype = FASA__V1__DTYPE__F32;
    t->n_shape = 4;
    t->shape = shape;
    t->data.data = (uint8_t *)data;
    t->data.len = n * sizeof(float);
}

START_TEST(test_calibrate_profile_stats_shutdown)
{
    enum { L = WIRE_L, T = 96, H = WIRE_H, HKV = WIRE_HKV, D = WIRE_D };
    test_rng rng = {5};
    float *q = test_alloc(sizeof(float) * L * T * H * D);
    float *k = test_alloc(sizeof(float) * L * T * HKV * D);
    test_fill(&rng, (size_t)L * T * H * D, q, 1.0f);
    test_fill(&rng, (size_t)L * T * HKV * D, k, 1.0f);

    /* Calibrate through the service; the same options straight into fasa_calibrate. */
    Fasa__V1__Request req = FASA__V1__REQUEST__INIT;
    Fasa__V1__Calibrate c = FASA__V1__CALIBRATE__INIT;
    Fasa__V1__Tensor tq, tk;
    uint64_t qs[4] = {L, T, H, D}, ks[4] = {L, T, HKV, D};
    s_tensor(&tq, qs, q, (size_t)L * T * H * D);
    s_tensor(&tk, ks, k, (size_t)L * T * HKV * D);
    c.q = &tq;
    c.k = &tk;
    c.has_ntip = c.has_window = c.has_pos_begin = c.has_pos_end = c.has_pos_step = 1;
    c.ntip = 2;
    c.window = 8;
    c.pos_begin = 48;
    c.pos_end = 96;
    c.pos_step = 4;
    c.profile_name = "rand";
    req.body_case = FASA__V1__REQUEST__BODY_CALIBRATE;
    req.calibrate = &c;
    Fasa__V1__Response *r = wire_send(&req);
    ck_assert_msg(r->status == 0, "calibrate: %s", r->message);

    const float *qp[L], *kp[L];
    for (int l = 0; l < L; l++) {
        qp[l] = q + (size_t)l * T * H * D;
        kp[l] = k + (size_t)l * T * HKV * D;
    }
    const fasa_activations act = {L, T, H, HKV, D, qp, kp, kp};
    const fasa_calib_opts o = {.ntip = 2,
                               .window = 8,
                               .pos_begin = 48,
                               .pos_end = 96,
                               .pos_step = 4,
                               .pairing = FC_PAIRING_INTERLEAVED};
    char err[256], *text = NULL;
    size_t text_len = 0;
    fasa_profile *p = fasa_calibrate(&act, &o, err, sizeof(err));
    ck_assert_msg(p != NULL, "%s", err);
    FILE *f = open_memstream(&text, &text_len);
    ck_assert_int_eq(fasa_profile_write(p, f), 0);
    fclose(f);
    ck_assert_str_eq(r->calibrate->profile_text, text);
    fasa__v1__response__free_unpacked(r, NULL);

    /* A session created without a profile gets the stored one; then fasa runs. */
    Fasa__V1__Request cr;
    Fasa__V1__CreateSession cs;
    wire_create_init(&cr, &cs, "cal");
    r = wire_send(&cr);
    ck_assert_int_eq(r->status, 0);
    ck_assert_uint_eq(r->create_session->n_shards, 2);
    fasa__v1__response__free_unpacked(r, NULL);

    Fasa__V1__Request sr = FASA__V1__REQUEST__INIT;
    Fasa__V1__SetProfile sp = FASA__V1__SET_PROFILE__INIT;
    sp.session_id = "cal";
    sp.profile_name = "nope";
    sr.body_case = FASA__V1__REQUEST__BODY_SET_PROFILE;
    sr.set_profile = &sp;
    wire_expect_error(wire_send(&sr), FASA__V1__STATUS__NOT_FOUND, "profile_name");
    sp.profile_name = "rand";
    r = wire_send(&sr);
    ck_assert_msg(r->status == 0, "set_profile: %s", r->message);
    fasa__v1__response__free_unpacked(r, NULL);

    /* Stats see the session and its profile; after an append SetProfile is refused. */
    Fasa__V1__Request st = FASA__V1__REQUEST__INIT;
    Fasa__V1__Stats s = FASA__V1__STATS__INIT;
    s.session_id = "cal";
    st.body_case = FASA__V1__REQUEST__BODY_STATS;
    st.stats = &s;
    r = wire_send(&st);
    ck_assert_int_eq(r->status, 0);
    ck_assert_uint_eq(r->stats->n_sessions, 1);
    ck_assert_uint_eq(r->stats->n_profiles, 1);
    ck_assert_int_eq(r->stats->session->has_profile, 1);
    ck_assert_uint_eq(r->stats->session->length, 0);
    fasa__v1__response__free_unpacked(r, NULL);

    Fasa__V1__Request ar = FASA__V1__REQUEST__INIT;
    Fasa__V1__Append a = FASA__V1__APPEND__INIT;
    Fasa__V1__Tensor ak, av;
    uint64_t as[4] = {L, T, HKV, D};
    s_tensor(&ak, as, k, (size_t)L * T * HKV * D);
    s_tensor(&av, as, k, (size_t)L * T * HKV * D);
    a.session_id = "cal";
    a.k = &ak;
    a.v = &av;
    ar.body_case = FASA__V1__REQUEST__BODY_APPEND;
    ar.append = &a;
    r = wire_send(&ar);
    ck_assert_msg(r->status == 0, "append: %s", r->message);
    ck_assert_uint_eq(r->append->length, T);
    fasa__v1__response__free_unpacked(r, NULL);
    wire_expect_error(wire_send(&sr), FASA__V1__STATUS__FAILED_PRECONDITION, "holds tokens");

    r = wire_send(&st);
    ck_assert_uint_eq(r->stats->session->length, T);
    ck_assert_uint_eq(r->stats->session->kv_bytes, (uint64_t)L * T * HKV * D * 2 * 4);
    fasa__v1__response__free_unpacked(r, NULL);

    /* Shutdown is answered OK and raises the flag. */
    Fasa__V1__Request sd = FASA__V1__REQUEST__INIT;
    Fasa__V1__Shutdown sdb = FASA__V1__SHUTDOWN__INIT;
    sd.body_case = FASA__V1__REQUEST__BODY_SHUTDOWN;
    sd.shutdown = &sdb;
    ck_assert_int_eq(s_shutdown, 0);
    r = wire_send(&sd);
    ck_assert_int_eq(r->status, 0);
    ck_assert_int_eq(s_shutdown, 1);
    fasa__v1__response__free_unpacked(r, NULL);

    /* Over the size limit. */
    uint8_t *big = test_alloc((1 << 20) + 1);
    r = s_rt(big, (1 << 20) + 1);
    wire_expect_error(r, FASA__V1__STATUS__INVALID_ARGUMENT, "limit");
    free(big);
    fasa_profile_destroy(&p);
    free(text);
    free(q);
    free(k);
}
END_TEST

/* Packs a request into a fresh buffer. */
static uint8_t *s_pack(Fasa__V1__Request *req, size_t *len)
{
    req->protocol_version = 1;
    req->request_id = 9;
    *len = fasa__v1__request__get_packed_size(req);
    uint8_t *buf = test_alloc(*len);
    fasa__v1__request__pack(req, buf);
    return buf;
}

START_TEST(test_mutated_requests)
{
    /* Valid requests with random bytes changed, bits flipped, or cut short: every one must
     * get a well-formed Response with a known status (under ASan, without any memory error),
     * and the service must still answer a good request correctly afterwards. */
    wire_make_session();
    enum { H = WIRE_H, HKV = WIRE_HKV, D = WIRE_D };
    test_rng rng = {11};
    float q[H * D], kv[HKV * D];
    test_fill(&rng, H * D, q, 1.0f);
    test_fill(&rng, HKV * D, kv, 1.0f);
    uint64_t qs[2] = {H, D}, ks[2] = {HKV, D};
    Fasa__V1__Tensor tq, tk, tv;
    fasa__v1__tensor__init(&tq);
    tq.dtype = FASA__V1__DTYPE__F32;
    tq.n_shape = 2;
    tq.shape = qs;
    tq.data.data = (uint8_t *)q;
    tq.data.len = sizeof(q);
    tk = tq;
    tk.shape = ks;
    tk.data.data = (uint8_t *)kv;
    tk.data.len = sizeof(kv);
    tv = tk;
    Fasa__V1__Attend a = FASA__V1__ATTEND__INIT;
    a.session_id = "bad";
    a.layer = 1;
    a.q = &tq;
    a.k_new = &tk;
    a.v_new = &tv;
    a.has_return_selected = 1;
    a.return_selected = 1;
    Fasa__V1__Attend *items[2] = {&a, &a};
    Fasa__V1__BatchAttend b = FASA__V1__BATCH_ATTEND__INIT;
    b.n_items = 2;
    b.items = items;
    Fasa__V1__CreateSession c;
    Fasa__V1__Request r1 = FASA__V1__REQUEST__INIT, r2 = FASA__V1__REQUEST__INIT, r3;
    wire_create_init(&r3, &c, "m");
    r1.body_case = FASA__V1__REQUEST__BODY_ATTEND;
    r1.attend = &a;
    r2.body_case = FASA__V1__REQUEST__BODY_BATCH_ATTEND;
    r2.batch_attend = &b;
    size_t len[3];
    uint8_t *good[3] = {s_pack(&r1, &len[0]), s_pack(&r2, &len[1]), s_pack(&r3, &len[2])};
    int n_ok = 0;
    for (int it = 0; it < 3000; it++) {
        const int w = (int)(test_next(&rng) % 3);
        size_t n = len[w];
        uint8_t *m = test_alloc(n);
        memcpy(m, good[w], n);
        const int edits = 1 + (int)(test_next(&rng) % 4);
        for (int e = 0; e < edits; e++) {
            const size_t at = (size_t)(test_next(&rng) % n);
            switch (test_next(&rng) % 3) {
            case 0:
                m[at] = (uint8_t)test_next(&rng);
                break;
            case 1:
                m[at] ^= (uint8_t)(1u << (test_next(&rng) % 8));
                break;
            default:
                n = at > 0 ? at : 1;
                break;
            }
        }
        Fasa__V1__Response *r = s_rt(m, n);
        ck_assert_int_le(r->status, FASA__V1__STATUS__UNAVAILABLE);
        ck_assert(r->status == 0 || (r->message && *r->message));
        n_ok += r->status == 0;
        fasa__v1__response__free_unpacked(r, NULL);
        free(m);
    }
    ck_assert_int_lt(n_ok, 3000); /* the mutations did reach the error paths */
    for (int w = 0; w < 3; w++) free(good[w]);
    /* Still serving: a ping answers. */
    Fasa__V1__Request pr = FASA__V1__REQUEST__INIT;
    Fasa__V1__Ping ping = FASA__V1__PING__INIT;
    pr.body_case = FASA__V1__REQUEST__BODY_PING;
    pr.ping = &ping;
    Fasa__V1__Response *r = wire_send(&pr);
    ck_assert_int_eq(r->status, 0);
    ck_assert_uint_eq(r->ping->n_shards, 2);
    fasa__v1__response__free_unpacked(r, NULL);
}
END_TEST

START_TEST(test_limits)
{
    /* A few bytes must not make the server allocate gigabytes: geometry whose layout is
     * too large, and a reply that would be too large, are refused up front. */
    Fasa__V1__Request cr;
    Fasa__V1__CreateSession c;
    wire_create_init(&cr, &c, "big");
    c.n_layers = c.n_heads = c.n_kv_heads = c.head_dim = 1024;
    wire_expect_error(wire_send(&cr), FASA__V1__STATUS__RESOURCE_EXHAUSTED,
                      "n_layers x n_heads x head_dim");
    c.n_layers = 2;
    c.n_heads = c.n_kv_heads = 64;
    c.head_dim = 8;
    c.has_budget = 1;
    c.budget = 1 << 20;
    wire_expect_error(wire_send(&cr), FASA__V1__STATUS__RESOURCE_EXHAUSTED, "budget");

    wire_make_session();
    float q[WIRE_H * WIRE_D] = {0};
    uint64_t qs[2] = {WIRE_H, WIRE_D};
    Fasa__V1__Tensor tq;
    fasa__v1__tensor__init(&tq);
    tq.dtype = FASA__V1__DTYPE__F32;
    tq.n_shape = 2;
    tq.shape = qs;
    tq.data.data = (uint8_t *)q;
    tq.data.len = sizeof(q);
    Fasa__V1__Attend a = FASA__V1__ATTEND__INIT;
    a.session_id = "bad";
    a.layer = 1;
    a.q = &tq;
    a.has_budget = a.has_return_selected = 1;
    a.budget = 1 << 20; /* 16 MiB of selected positions; this service replies at most 1 MiB */
    a.return_selected = 1;
    Fasa__V1__Request ar = FASA__V1__REQUEST__INIT;
    ar.body_case = FASA__V1__REQUEST__BODY_ATTEND;
    ar.attend = &a;
    wire_expect_error(wire_send(&ar), FASA__V1__STATUS__RESOURCE_EXHAUSTED, "return_selected");
    a.return_selected = 0; /* without the positions the same step is fine */
    Fasa__V1__Response *r = wire_send(&ar);
    ck_assert_msg(r->status == 0, "%s", r->message);
    fasa__v1__response__free_unpacked(r, NULL);
    wire_check_unchanged();

    /* Calibration with a window that holds every key of the first sample position. */
    enum { T = 40 };
    float *x = test_alloc(sizeof(float) * WIRE_L * T * WIRE_H * WIRE_D);
    uint64_t s4[4] = {WIRE_L, T, WIRE_H, WIRE_D};
    Fasa__V1__Tensor t4;
    fasa__v1__tensor__init(&t4);
    t4.dtype = FASA__V1__DTYPE__F32;
    t4.n_shape = 4;
    t4.shape = s4;
    t4.data.data = (uint8_t *)x;
    t4.data.len = sizeof(float) * WIRE_L * T * WIRE_H * WIRE_D;
    Fasa__V1__Calibrate cal = FASA__V1__CALIBRATE__INIT;
    cal.q = cal.k = &t4; /* k with n_kv_heads = n_heads */
    Fasa__V1__Request req = FASA__V1__REQUEST__INIT;
    req.body_case = FASA__V1__REQUEST__BODY_CALIBRATE;
    req.calibrate = &cal;
    wire_expect_error(wire_send(&req), FASA__V1__STATUS__INVALID_ARGUMENT, "calibrate.window");
    free(x);
}
END_TEST

Suite *service_suite(void)
{
    Suite *s = suite_create("service");
    TCase *tc = tcase_create("service");
    tcase_add_checked_fixture(tc, s_setup, s_teardown);
    tcase_set_timeout(tc, 120);
    wire_cases_add(tc);
    tcase_add_test(tc, test_calibrate_profile_stats_shutdown);
    tcase_add_test(tc, test_mutated_requests);
    tcase_add_test(tc, test_limits);
    suite_add_tcase(s, tc);
    return s;
}

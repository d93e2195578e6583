/* The service without ZeroMQ or MPI: the bad-input cases of wire_cases.c handed straight
 * to fasa_service_handle over an embedded engine of 2 shards (so they run under
 * LeakSanitizer too), and the requests only the service answers: Calibrate against
 * fasa_calibrate called directly, SetProfile, Stats, Shutdown. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "calib.h"
#include "edge.h"
#include "fc.h"
#include "service.h"
#include "simd.h"
#include "snapshot.h"
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

static Fasa__V1__Response *s_rt_frames(const void *buf, size_t len, const edge_frame *frames, int n)
{
    uint8_t *reply = NULL;
    size_t rn = 0;
    ck_assert_int_eq(
        fasa_service_handle_frames(s_svc, buf, len, frames, n, &reply, &rn, &s_shutdown), 0);
    Fasa__V1__Response *r = fasa__v1__response__unpack(NULL, rn, reply);
    free(reply);
    ck_assert_ptr_nonnull(r);
    return r;
}

static void s_setup(void)
{
    fasa_engine_t *e = fasa_engine_new(2, 16);
    ck_assert_ptr_nonnull(e);
    const fasa_service_opts o = {.n_ranks = 1, .max_message = 1 << 20};
    s_svc = fasa_service_new(&e, 2, &o);
    ck_assert_ptr_nonnull(s_svc);
    s_shutdown = 0;
    wire_set_roundtrip(s_rt);
    wire_set_roundtrip_frames(s_rt_frames);
}

static void s_teardown(void)
{
    fasa_service_destroy(&s_svc);
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
    wire_tensor(&tq, qs, 4, q, (size_t)L * T * H * D);
    wire_tensor(&tk, ks, 4, k, (size_t)L * T * HKV * D);
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
    wire_tensor(&ak, as, 4, k, (size_t)L * T * HKV * D);
    wire_tensor(&av, as, 4, k, (size_t)L * T * HKV * D);
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
    wire_tensor(&tq, qs, 2, q, H * D);
    wire_tensor(&tk, ks, 2, kv, HKV * D);
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
    wire_tensor(&tq, qs, 2, q, WIRE_H * WIRE_D);
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
    wire_tensor(&t4, s4, 4, x, (size_t)WIRE_L * T * WIRE_H * WIRE_D);
    Fasa__V1__Calibrate cal = FASA__V1__CALIBRATE__INIT;
    cal.q = cal.k = &t4; /* k with n_kv_heads = n_heads */
    cal.has_window = 1;
    cal.window = T; /* the last sample position, T - 1, has T keys */
    Fasa__V1__Request req = FASA__V1__REQUEST__INIT;
    req.body_case = FASA__V1__REQUEST__BODY_CALIBRATE;
    req.calibrate = &cal;
    wire_expect_error(wire_send(&req), FASA__V1__STATUS__INVALID_ARGUMENT, "calibrate.window");
    free(x);
}
END_TEST

/* ---- Stats: exact counts after a known sequence of requests ---- */

enum { ST_L = 2, ST_T = 64, ST_H = 4, ST_HKV = 2, ST_D = 16, ST_B = 8, ST_LOOP = 30 };

/* An Attend of session id (ST_* geometry) at layer; method 0: the session's; k_new, v_new
 * when kv is not NULL. */
static void s_attend_init(Fasa__V1__Attend *a, Fasa__V1__Tensor *tq, Fasa__V1__Tensor *tk,
                          Fasa__V1__Tensor *tv, uint64_t *qs, uint64_t *ks, const char *id,
                          int layer, int method, const float *q, const float *kv)
{
    fasa__v1__attend__init(a);
    qs[0] = ST_H, qs[1] = ST_D, ks[0] = ST_HKV, ks[1] = ST_D;
    wire_tensor(tq, qs, 2, q, ST_H * ST_D);
    a->session_id = (char *)id;
    a->layer = (uint32_t)layer;
    a->q = tq;
    if (method) {
        a->has_method = 1;
        a->method = (Fasa__V1__Method)method;
    }
    if (kv) {
        wire_tensor(tk, ks, 2, kv, ST_HKV * ST_D);
        *tv = *tk;
        a->k_new = tk;
        a->v_new = tv;
    }
}

/* Step times seen in the replies, by method_used. */
typedef struct seen_steps {
    int n[FASA__V1__METHOD__FASA_PLUS + 1];
    uint64_t us[FASA__V1__METHOD__FASA_PLUS + 1][64];
} seen_steps;

static void s_seen(seen_steps *st, const Fasa__V1__AttendResult *res)
{
    const int m = (int)res->stats->method_used;
    ck_assert_int_ge(m, 1);
    ck_assert_int_le(m, 6);
    ck_assert_int_lt(st->n[m], 64);
    st->us[m][st->n[m]++] = res->stats->server_us;
}

static Fasa__V1__Response *s_attend_ok(const char *id, int layer, int method, const float *q,
                                       const float *kv, seen_steps *st)
{
    Fasa__V1__Attend a;
    Fasa__V1__Tensor tq, tk, tv;
    uint64_t qs[2], ks[2];
    s_attend_init(&a, &tq, &tk, &tv, qs, ks, id, layer, method, q, kv);
    Fasa__V1__Request req = FASA__V1__REQUEST__INIT;
    req.body_case = FASA__V1__REQUEST__BODY_ATTEND;
    req.attend = &a;
    Fasa__V1__Response *r = wire_send(&req);
    if (r->status == 0) s_seen(st, r->attend);
    return r;
}

static int s_cmp_u64(const void *a, const void *b)
{
    const uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

static uint64_t s_count_of(const Fasa__V1__StatsResult *r, const char *type)
{
    for (size_t i = 0; i < r->n_requests_by_type; i++)
        if (strcmp(r->requests_by_type[i]->type, type) == 0) return r->requests_by_type[i]->count;
    ck_abort_msg("no requests_by_type entry '%s'", type);
    return 0;
}

static uint64_t s_errors_of(const Fasa__V1__StatsResult *r, Fasa__V1__Status code)
{
    for (size_t i = 0; i < r->n_errors_by_code; i++)
        if (r->errors_by_code[i]->code == code) return r->errors_by_code[i]->count;
    ck_abort_msg("no errors_by_code entry for %d", code);
    return 0;
}

/* Checks one method's latency summary against the server_us values of its steps: the count
 * exactly; max and sum to the microsecond server_us rounds down to; each percentile within
 * the histogram's 2% (plus that microsecond) of the nearest-rank value. */
static void s_check_latency(const Fasa__V1__LatencySummary *l, int n, uint64_t *us)
{
    ck_assert_uint_eq(l->count, (uint64_t)n);
    qsort(us, (size_t)n, sizeof(*us), s_cmp_u64);
    uint64_t sum = 0;
    for (int i = 0; i < n; i++) sum += us[i];
    ck_assert_uint_eq((uint64_t)l->max_us, us[n - 1]);
    ck_assert_double_ge(l->sum_us, (double)sum);
    ck_assert_double_lt(l->sum_us, (double)(sum + (uint64_t)n));
    const double qs[3] = {0.5, 0.9, 0.99}, est[3] = {l->p50_us, l->p90_us, l->p99_us};
    for (int k = 0; k < 3; k++) {
        int rank = (int)ceil(qs[k] * n);
        if (rank < 1) rank = 1;
        const double want = (double)us[rank - 1];
        ck_assert_msg(fabs(est[k] - want) <= 0.021 * want + 1.1,
                      "method %d q %.2f: %.2f us, nearest-rank %.0f us", l->method, qs[k], est[k],
                      want);
    }
    ck_assert_double_le(l->p50_us, l->p90_us);
    ck_assert_double_le(l->p90_us, l->p99_us);
    ck_assert_double_le(l->p99_us, l->max_us);
}

/* The bytes by kind one session's rows take: rows (n_layers) per layer, n_dom (n_layers,
 * n_kv_heads) dominant dims per KV head. */
static void s_bytes_by_kind(const int64_t *rows, const int *n_dom, uint64_t *kdom, uint64_t *krest,
                            uint64_t *v)
{
    *kdom = *krest = *v = 0;
    for (int l = 0; l < ST_L; l++)
        for (int g = 0; g < ST_HKV; g++) {
            *kdom += (uint64_t)rows[l] * n_dom[l * ST_HKV + g] * 4;
            *krest += (uint64_t)rows[l] * (ST_D - n_dom[l * ST_HKV + g]) * 4;
            *v += (uint64_t)rows[l] * ST_D * 4;
        }
}

START_TEST(test_stats_counts)
{
    test_rng rng = {23};
    float *q = test_alloc(sizeof(float) * ST_L * ST_T * ST_H * ST_D);
    float *k = test_alloc(sizeof(float) * ST_L * ST_T * ST_HKV * ST_D);
    float *v = test_alloc(sizeof(float) * ST_L * ST_T * ST_HKV * ST_D);
    test_fill(&rng, (size_t)ST_L * ST_T * ST_H * ST_D, q, 1.0f);
    test_fill(&rng, (size_t)ST_L * ST_T * ST_HKV * ST_D, k, 1.0f);
    test_fill(&rng, (size_t)ST_L * ST_T * ST_HKV * ST_D, v, 1.0f);
    seen_steps seen;
    memset(&seen, 0, sizeof(seen));
    Fasa__V1__Response *r;

    /* 2 pings. */
    Fasa__V1__Request pr = FASA__V1__REQUEST__INIT;
    Fasa__V1__Ping ping = FASA__V1__PING__INIT;
    pr.body_case = FASA__V1__REQUEST__BODY_PING;
    pr.ping = &ping;
    for (int i = 0; i < 2; i++) {
        pr.request_id = 0;
        r = wire_send(&pr);
        ck_assert_int_eq(r->status, 0);
        fasa__v1__response__free_unpacked(r, NULL);
    }

    /* A calibration stored as "p"; its dominant FCs give the key layout. */
    Fasa__V1__Request cal = FASA__V1__REQUEST__INIT;
    Fasa__V1__Calibrate c = FASA__V1__CALIBRATE__INIT;
    Fasa__V1__Tensor tq, tk;
    uint64_t qs4[4] = {ST_L, ST_T, ST_H, ST_D}, ks4[4] = {ST_L, ST_T, ST_HKV, ST_D};
    wire_tensor(&tq, qs4, 4, q, (size_t)ST_L * ST_T * ST_H * ST_D);
    wire_tensor(&tk, ks4, 4, k, (size_t)ST_L * ST_T * ST_HKV * ST_D);
    c.q = &tq;
    c.k = &tk;
    c.has_ntip = c.has_window = c.has_pos_begin = c.has_pos_step = 1;
    c.ntip = 2;
    c.window = 8;
    c.pos_begin = 32;
    c.pos_step = 4;
    c.profile_name = "p";
    cal.body_case = FASA__V1__REQUEST__BODY_CALIBRATE;
    cal.calibrate = &c;
    r = wire_send(&cal);
    ck_assert_msg(r->status == 0, "calibrate: %s", r->message);
    const char *text = r->calibrate->profile_text;
    FILE *f = fmemopen((void *)text, strlen(text), "r");
    char err[256];
    fasa_profile *prof = fasa_profile_read(f, "reply", strlen(text), err, sizeof(err));
    fclose(f);
    ck_assert_msg(prof != NULL, "%s", err);
    fasa__v1__response__free_unpacked(r, NULL);
    int n_dom[ST_L * ST_HKV];
    const int grp = ST_H / ST_HKV;
    for (int l = 0; l < ST_L; l++)
        for (int g = 0; g < ST_HKV; g++) {
            uint8_t in[ST_D] = {0};
            for (int h = g * grp; h < (g + 1) * grp; h++)
                for (int t = 0; t < prof->ntip; t++) {
                    int d0, d1;
                    fc_dims(prof->pairing, ST_D, prof->fcs[(l * ST_H + h) * prof->ntip + t], &d0,
                            &d1);
                    in[d0] = in[d1] = 1;
                }
            n_dom[l * ST_HKV + g] = 0;
            for (int x = 0; x < ST_D; x++) n_dom[l * ST_HKV + g] += in[x];
            /* At least one FC, at most the group's 2 x ntip FCs: never all of K. */
            ck_assert_int_ge(n_dom[l * ST_HKV + g], 2);
            ck_assert_int_le(n_dom[l * ST_HKV + g], 2 * grp * prof->ntip);
        }
    fasa_profile_destroy(&prof);

    /* 4 creates: "st" with the profile, the same again, one naming no stored profile, and
     * an empty session "e" without a profile. */
    Fasa__V1__Request cr;
    Fasa__V1__CreateSession cs;
    wire_create_init(&cr, &cs, "st");
    cs.n_heads = ST_H;
    cs.n_kv_heads = ST_HKV;
    cs.head_dim = ST_D;
    cs.n_layers = ST_L;
    cs.profile_name = "p";
    cs.has_budget = 1;
    cs.budget = ST_B;
    r = wire_send(&cr);
    ck_assert_msg(r->status == 0, "create: %s", r->message);
    fasa__v1__response__free_unpacked(r, NULL);
    cr.request_id = 0;
    wire_expect_error(wire_send(&cr), FASA__V1__STATUS__ALREADY_EXISTS, "st");
    cr.request_id = 0;
    cs.session_id = "x";
    cs.profile_name = "nope";
    wire_expect_error(wire_send(&cr), FASA__V1__STATUS__NOT_FOUND, "profile_name");
    cr.request_id = 0;
    cs.session_id = "e";
    cs.profile_name = NULL;
    r = wire_send(&cr);
    ck_assert_int_eq(r->status, 0);
    fasa__v1__response__free_unpacked(r, NULL);

    /* 2 appends: every layer's T tokens, then the same start again. */
    Fasa__V1__Request ar = FASA__V1__REQUEST__INIT;
    Fasa__V1__Append a = FASA__V1__APPEND__INIT;
    Fasa__V1__Tensor ak, av;
    wire_tensor(&ak, ks4, 4, k, (size_t)ST_L * ST_T * ST_HKV * ST_D);
    wire_tensor(&av, ks4, 4, v, (size_t)ST_L * ST_T * ST_HKV * ST_D);
    a.session_id = "st";
    a.k = &ak;
    a.v = &av;
    ar.body_case = FASA__V1__REQUEST__BODY_APPEND;
    ar.append = &a;
    r = wire_send(&ar);
    ck_assert_msg(r->status == 0, "append: %s", r->message);
    fasa__v1__response__free_unpacked(r, NULL);
    ar.request_id = 0;
    wire_expect_error(wire_send(&ar), FASA__V1__STATUS__INVALID_ARGUMENT, "start_pos");

    /* 8 attends: ST_LOOP on layer 1 cycling fasa, dense, oracle; layer 0 (dense under fasa);
     * one with k_new (layer 1 now holds T + 1 rows); an unknown session; a layer out of
     * range; a q one float short (refused at the edge, still counted as an attend). */
    for (int i = 0; i < ST_LOOP; i++) {
        r = s_attend_ok("st", 1, 1 + i % 3, q + (size_t)i * ST_H * ST_D, NULL, &seen);
        ck_assert_msg(r->status == 0, "attend %d: %s", i, r->message);
        ck_assert_int_eq(r->attend->stats->method_used, 1 + i % 3);
        fasa__v1__response__free_unpacked(r, NULL);
    }
    r = s_attend_ok("st", 0, 0, q, NULL, &seen);
    ck_assert_int_eq(r->status, 0);
    ck_assert_int_eq(r->attend->stats->method_used, FASA__V1__METHOD__DENSE);
    fasa__v1__response__free_unpacked(r, NULL);
    r = s_attend_ok("st", 1, 0, q, k, &seen);
    ck_assert_int_eq(r->status, 0);
    ck_assert_int_eq(r->attend->stats->method_used, FASA__V1__METHOD__FASA);
    fasa__v1__response__free_unpacked(r, NULL);
    wire_expect_error(s_attend_ok("nope", 1, 0, q, NULL, &seen), FASA__V1__STATUS__NOT_FOUND,
                      "session_id");
    wire_expect_error(s_attend_ok("st", 5, 0, q, NULL, &seen), FASA__V1__STATUS__INVALID_ARGUMENT,
                      "layer");
    {
        Fasa__V1__Attend ba;
        Fasa__V1__Tensor bq, bk, bv;
        uint64_t bqs[2], bks[2];
        s_attend_init(&ba, &bq, &bk, &bv, bqs, bks, "st", 1, 0, q, NULL);
        bq.data.len -= sizeof(float);
        Fasa__V1__Request req = FASA__V1__REQUEST__INIT;
        req.body_case = FASA__V1__REQUEST__BODY_ATTEND;
        req.attend = &ba;
        r = wire_send(&req);
        ck_assert_int_eq(r->status, FASA__V1__STATUS__INVALID_ARGUMENT);
        fasa__v1__response__free_unpacked(r, NULL);
    }

    /* 1 batch of 3 items: fasa on layer 1, layer 0 (dense), an unknown session. */
    {
        Fasa__V1__Attend items[3], *ptrs[3];
        Fasa__V1__Tensor bq[3], bk[3], bv[3];
        uint64_t bqs[3][2], bks[3][2];
        const char *ids[3] = {"st", "st", "nope"};
        const int layers[3] = {1, 0, 1};
        for (int i = 0; i < 3; i++) {
            s_attend_init(&items[i], &bq[i], &bk[i], &bv[i], bqs[i], bks[i], ids[i], layers[i], 0,
                          q + (size_t)(7 + i) * ST_H * ST_D, NULL);
            ptrs[i] = &items[i];
        }
        Fasa__V1__BatchAttend b = FASA__V1__BATCH_ATTEND__INIT;
        b.n_items = 3;
        b.items = ptrs;
        Fasa__V1__Request req = FASA__V1__REQUEST__INIT;
        req.body_case = FASA__V1__REQUEST__BODY_BATCH_ATTEND;
        req.batch_attend = &b;
        r = wire_send(&req);
        ck_assert_int_eq(r->status, 0);
        ck_assert_uint_eq(r->batch_attend->n_items, 3);
        for (int i = 0; i < 2; i++) {
            ck_assert_int_eq(r->batch_attend->items[i]->status, 0);
            s_seen(&seen, r->batch_attend->items[i]->result);
        }
        ck_assert_int_eq(r->batch_attend->items[2]->status, FASA__V1__STATUS__NOT_FOUND);
        fasa__v1__response__free_unpacked(r, NULL);
    }

    /* 1 undecodable message, 1 set_profile refused (the session holds tokens). */
    const uint8_t junk[] = {0xff, 0xff, 0xff, 0x01};
    wire_expect_error(s_rt(junk, sizeof(junk)), FASA__V1__STATUS__INVALID_ARGUMENT, "request");
    Fasa__V1__Request sr = FASA__V1__REQUEST__INIT;
    Fasa__V1__SetProfile sp = FASA__V1__SET_PROFILE__INIT;
    sp.session_id = "st";
    sp.profile_name = "p";
    sr.body_case = FASA__V1__REQUEST__BODY_SET_PROFILE;
    sr.set_profile = &sp;
    wire_expect_error(wire_send(&sr), FASA__V1__STATUS__FAILED_PRECONDITION, "holds tokens");

    /* The 21st request: Stats of "st". */
    Fasa__V1__Request st = FASA__V1__REQUEST__INIT;
    Fasa__V1__Stats sb = FASA__V1__STATS__INIT;
    sb.session_id = "st";
    st.body_case = FASA__V1__REQUEST__BODY_STATS;
    st.stats = &sb;
    r = wire_send(&st);
    ck_assert_msg(r->status == 0, "stats: %s", r->message);
    const Fasa__V1__StatsResult *res = r->stats;

    /* Requests by type, errors by code: exact, and adding up to the totals. */
    ck_assert_uint_eq(
        res->n_requests_by_type,
        15); /* 11 bodies + undecodable, list_sessions, delete_profile, load_session */
    ck_assert_uint_eq(s_count_of(res, "undecodable"), 1);
    ck_assert_uint_eq(s_count_of(res, "ping"), 2);
    ck_assert_uint_eq(s_count_of(res, "calibrate"), 1);
    ck_assert_uint_eq(s_count_of(res, "create_session"), 4);
    ck_assert_uint_eq(s_count_of(res, "append"), 2);
    ck_assert_uint_eq(s_count_of(res, "attend"), ST_LOOP + 5);
    ck_assert_uint_eq(s_count_of(res, "batch_attend"), 1);
    ck_assert_uint_eq(s_count_of(res, "set_profile"), 1);
    ck_assert_uint_eq(s_count_of(res, "stats"), 1);
    ck_assert_uint_eq(s_count_of(res, "drop_session"), 0);
    ck_assert_uint_eq(s_count_of(res, "shutdown"), 0);
    uint64_t total = 0;
    for (size_t i = 0; i < res->n_requests_by_type; i++) total += res->requests_by_type[i]->count;
    ck_assert_uint_eq(total, res->requests);
    ck_assert_uint_eq(res->requests, 13 + ST_LOOP + 5);
    ck_assert_uint_eq(res->n_errors_by_code, 8);
    ck_assert_uint_eq(s_errors_of(res, FASA__V1__STATUS__INVALID_ARGUMENT), 4);
    ck_assert_uint_eq(s_errors_of(res, FASA__V1__STATUS__NOT_FOUND), 3);
    ck_assert_uint_eq(s_errors_of(res, FASA__V1__STATUS__ALREADY_EXISTS), 1);
    ck_assert_uint_eq(s_errors_of(res, FASA__V1__STATUS__FAILED_PRECONDITION), 1);
    ck_assert_uint_eq(s_errors_of(res, FASA__V1__STATUS__RESOURCE_EXHAUSTED), 0);
    ck_assert_uint_eq(s_errors_of(res, FASA__V1__STATUS__INTERNAL), 0);
    ck_assert_uint_eq(res->errors, 9);
    ck_assert_uint_eq(res->batch_items, 3);
    ck_assert_uint_eq(res->attend_steps, ST_LOOP + 2 + 2);

    /* Latency: one summary per method, counting exactly the steps that ran it. */
    ck_assert_int_eq(seen.n[FASA__V1__METHOD__FASA], ST_LOOP / 3 + 2);
    ck_assert_int_eq(seen.n[FASA__V1__METHOD__DENSE], ST_LOOP / 3 + 2);
    ck_assert_int_eq(seen.n[FASA__V1__METHOD__ORACLE], ST_LOOP / 3);
    ck_assert_int_eq(seen.n[FASA__V1__METHOD__STREAM], 0);
    ck_assert_int_eq(seen.n[FASA__V1__METHOD__QUEST], 0);
    ck_assert_int_eq(seen.n[FASA__V1__METHOD__SPARQ], 0);
    ck_assert_uint_eq(res->n_latency, 7); /* FASA, DENSE, ORACLE, STREAM, QUEST, SPARQ, FASA_PLUS */
    for (size_t i = 0; i < res->n_latency; i++) {
        const int m = (int)res->latency[i]->method;
        ck_assert_int_eq(m, (int)i + 1);
        if (seen.n[m] == 0)
            ck_assert_uint_eq(res->latency[i]->count, 0);
        else
            s_check_latency(res->latency[i], seen.n[m], seen.us[m]);
    }

    /* Holdings: one rank (the service was told 1) holding both shards. "st" holds T rows
     * in layer 0 and T + 1 in layer 1; "e" none. */
    const int64_t rows[ST_L] = {ST_T, ST_T + 1};
    uint64_t kdom, krest, vb;
    s_bytes_by_kind(rows, n_dom, &kdom, &krest, &vb);
    ck_assert_uint_gt(kdom, 0);
    ck_assert_uint_gt(krest, 0);
    ck_assert_uint_eq(kdom + krest, vb);
    ck_assert_uint_eq(vb, (uint64_t)(2 * ST_T + 1) * ST_HKV * ST_D * 4);
    const Fasa__V1__SessionInfo *si = res->session;
    ck_assert_uint_eq(si->kv_bytes, 2 * vb);
    ck_assert_uint_eq(res->kv_bytes, 2 * vb);
    ck_assert_uint_eq(res->n_rank_stats, 1);
    ck_assert_uint_eq(si->n_rank_stats, 1);
    for (int w = 0; w < 2; w++) {
        const Fasa__V1__RankStats *rk = w ? si->rank_stats[0] : res->rank_stats[0];
        ck_assert_uint_eq(rk->rank, 0);
        ck_assert_uint_eq(rk->shards, 2);
        ck_assert_uint_eq(rk->sessions, w ? 1 : 2);
        ck_assert_uint_eq(rk->tokens, ST_T);
        ck_assert_uint_eq(rk->rows, 2 * ST_T + 1);
        ck_assert_uint_eq(rk->kdom_bytes, kdom);
        ck_assert_uint_eq(rk->krest_bytes, krest);
        ck_assert_uint_eq(rk->v_bytes, vb);
        ck_assert_uint_eq(rk->kdom_bytes + rk->krest_bytes + rk->v_bytes, si->kv_bytes);
        ck_assert_uint_ge(rk->alloc_bytes, si->kv_bytes);
    }
    fasa__v1__response__free_unpacked(r, NULL);
    free(q);
    free(k);
    free(v);
}
END_TEST

static Fasa__V1__Response *s_stats_of(const char *id)
{
    Fasa__V1__Request req = FASA__V1__REQUEST__INIT;
    Fasa__V1__Stats sb = FASA__V1__STATS__INIT;
    sb.session_id = (char *)id;
    req.body_case = FASA__V1__REQUEST__BODY_STATS;
    req.stats = &sb;
    Fasa__V1__Response *r = wire_send(&req);
    ck_assert_msg(r->status == 0, "stats: %s", r->message);
    return r;
}

START_TEST(test_stats_ranks)
{
    /* As a 3-rank server sees it: shard i on rank i + 1, rank 0 the coordinator holding
     * nothing. Session "bad" holds 40 tokens per layer in blocks of 16: shard 0 (rank 1)
     * positions 0..15 and 32..39, shard 1 (rank 2) 16..31. */
    fasa_service_destroy(&s_svc);
    fasa_engine_t *e = fasa_engine_new(2, 16);
    ck_assert_ptr_nonnull(e);
    const fasa_service_opts o = {.n_ranks = 3, .max_message = 1 << 20};
    s_svc = fasa_service_new(&e, 2, &o);
    ck_assert_ptr_nonnull(s_svc);
    wire_make_session();
    Fasa__V1__Response *r = s_stats_of("bad");
    const uint64_t row_bytes = WIRE_HKV * WIRE_D * 4, tokens[3] = {0, 24, 16};
    ck_assert_uint_eq(r->stats->n_rank_stats, 3);
    ck_assert_uint_eq(r->stats->session->n_rank_stats, 3);
    uint64_t sum = 0;
    for (int k = 0; k < 3; k++) {
        const Fasa__V1__RankStats *rk = r->stats->rank_stats[k];
        ck_assert_uint_eq(rk->rank, (uint32_t)k);
        ck_assert_uint_eq(rk->shards, k ? 1 : 0);
        ck_assert_uint_eq(rk->sessions, k ? 1 : 0);
        ck_assert_uint_eq(rk->tokens, tokens[k]);
        ck_assert_uint_eq(rk->rows, WIRE_L * tokens[k]);
        ck_assert_uint_eq(rk->kdom_bytes, 0); /* no profile: all of K is the rest */
        ck_assert_uint_eq(rk->krest_bytes, WIRE_L * tokens[k] * row_bytes);
        ck_assert_uint_eq(rk->v_bytes, WIRE_L * tokens[k] * row_bytes);
        ck_assert(k ? rk->alloc_bytes > 0 : rk->alloc_bytes == 0);
        const Fasa__V1__RankStats *sk = r->stats->session->rank_stats[k];
        ck_assert_uint_eq(sk->rank, rk->rank);
        ck_assert_uint_eq(sk->tokens, rk->tokens);
        ck_assert_uint_eq(sk->v_bytes, rk->v_bytes);
        ck_assert_uint_eq(sk->alloc_bytes, rk->alloc_bytes);
        sum += rk->kdom_bytes + rk->krest_bytes + rk->v_bytes;
    }
    ck_assert_uint_eq(sum, r->stats->session->kv_bytes);
    ck_assert_uint_eq(sum, r->stats->kv_bytes);
    fasa__v1__response__free_unpacked(r, NULL);

    /* Dropped, the session's rows are gone from every rank. */
    Fasa__V1__Request dr = FASA__V1__REQUEST__INIT;
    Fasa__V1__DropSession drop = FASA__V1__DROP_SESSION__INIT;
    drop.session_id = "bad";
    dr.body_case = FASA__V1__REQUEST__BODY_DROP_SESSION;
    dr.drop_session = &drop;
    r = wire_send(&dr);
    ck_assert_int_eq(r->status, 0);
    fasa__v1__response__free_unpacked(r, NULL);
    r = s_stats_of(NULL);
    ck_assert_ptr_null(r->stats->session);
    for (int k = 0; k < 3; k++) {
        const Fasa__V1__RankStats *rk = r->stats->rank_stats[k];
        ck_assert_uint_eq(rk->sessions + rk->tokens + rk->rows + rk->v_bytes + rk->alloc_bytes, 0);
    }
    fasa__v1__response__free_unpacked(r, NULL);
    wire_expect_error(wire_send(&dr), FASA__V1__STATUS__NOT_FOUND, "bad");
    r = s_stats_of(NULL);
    ck_assert_uint_eq(s_count_of(r->stats, "drop_session"), 3); /* with wire_make_session's */
    ck_assert_uint_eq(s_errors_of(r->stats, FASA__V1__STATUS__NOT_FOUND), 2);
    fasa__v1__response__free_unpacked(r, NULL);
    Fasa__V1__Request bad = FASA__V1__REQUEST__INIT;
    Fasa__V1__Stats sb = FASA__V1__STATS__INIT;
    sb.session_id = "gone";
    bad.body_case = FASA__V1__REQUEST__BODY_STATS;
    bad.stats = &sb;
    wire_expect_error(wire_send(&bad), FASA__V1__STATUS__NOT_FOUND, "stats.session_id");
}
END_TEST

/* Deadlines: a request that waited in the queue past its deadline_ms (or the server's
 * default) is answered UNAVAILABLE without running and changes nothing; Shutdown always runs. */
START_TEST(test_deadline)
{
    wire_make_session();
    Fasa__V1__Request pr = FASA__V1__REQUEST__INIT;
    Fasa__V1__Ping ping = FASA__V1__PING__INIT;
    pr.body_case = FASA__V1__REQUEST__BODY_PING;
    pr.ping = &ping;
    pr.has_deadline_ms = 1;
    pr.deadline_ms = 100;
    fasa_service_set_wait(s_svc, 250);
    wire_expect_error(wire_send(&pr), FASA__V1__STATUS__UNAVAILABLE, "deadline_ms");
    fasa_service_set_wait(s_svc, 50);
    Fasa__V1__Response *r = wire_send(&pr);
    ck_assert_int_eq(r->status, 0);
    fasa__v1__response__free_unpacked(r, NULL);
    /* The wait is used once: the next request has waited 0 ms. */
    r = wire_send(&pr);
    ck_assert_int_eq(r->status, 0);
    fasa__v1__response__free_unpacked(r, NULL);
    /* No deadline anywhere: any wait is fine. */
    pr.has_deadline_ms = 0;
    fasa_service_set_wait(s_svc, 1e7);
    r = wire_send(&pr);
    ck_assert_int_eq(r->status, 0);
    fasa__v1__response__free_unpacked(r, NULL);

    /* A late Attend with k_new does not append. */
    float q[WIRE_H * WIRE_D] = {0}, kv[WIRE_HKV * WIRE_D] = {0};
    uint64_t qs[2] = {WIRE_H, WIRE_D}, ks[2] = {WIRE_HKV, WIRE_D};
    Fasa__V1__Tensor tq, tk, tv;
    wire_tensor(&tq, qs, 2, q, WIRE_H * WIRE_D);
    wire_tensor(&tk, ks, 2, kv, WIRE_HKV * WIRE_D);
    wire_tensor(&tv, ks, 2, kv, WIRE_HKV * WIRE_D);
    Fasa__V1__Attend a = FASA__V1__ATTEND__INIT;
    a.session_id = "bad";
    a.layer = 1;
    a.q = &tq;
    a.k_new = &tk;
    a.v_new = &tv;
    Fasa__V1__Request ar = FASA__V1__REQUEST__INIT;
    ar.body_case = FASA__V1__REQUEST__BODY_ATTEND;
    ar.attend = &a;
    ar.has_deadline_ms = 1;
    ar.deadline_ms = 5;
    fasa_service_set_wait(s_svc, 6);
    wire_expect_error(wire_send(&ar), FASA__V1__STATUS__UNAVAILABLE, "deadline_ms");
    wire_check_unchanged();

    /* The server's default (--deadline) applies to requests that give none. */
    fasa_engine_t *e = fasa_engine_new(1, 16);
    const fasa_service_opts o = {.n_ranks = 1, .max_message = 1 << 20, .deadline_ms = 100};
    fasa_service *keep = s_svc;
    s_svc = fasa_service_new(&e, 1, &o);
    pr.has_deadline_ms = 0;
    fasa_service_set_wait(s_svc, 150);
    wire_expect_error(wire_send(&pr), FASA__V1__STATUS__UNAVAILABLE, "deadline of 100 ms");
    pr.has_deadline_ms = 1;
    pr.deadline_ms = 1000;
    fasa_service_set_wait(s_svc, 150);
    r = wire_send(&pr);
    ck_assert_int_eq(r->status, 0);
    fasa__v1__response__free_unpacked(r, NULL);
    Fasa__V1__Request sr = FASA__V1__REQUEST__INIT;
    Fasa__V1__Shutdown sd = FASA__V1__SHUTDOWN__INIT;
    sr.body_case = FASA__V1__REQUEST__BODY_SHUTDOWN;
    sr.shutdown = &sd;
    fasa_service_set_wait(s_svc, 1e6);
    r = wire_send(&sr);
    ck_assert_int_eq(r->status, 0);
    ck_assert_int_eq(s_shutdown, 1);
    fasa__v1__response__free_unpacked(r, NULL);
    fasa_service_destroy(&s_svc);
    s_svc = keep;
}
END_TEST

/* Snapshot requests: refused without --state-dir, with a bad body; with a state dir the
 * sessions and named profiles written come back in a restarted service, and a dropped
 * session's snapshot is gone. */
static Fasa__V1__Response *s_snapshot_req(const char *id, int all)
{
    Fasa__V1__Request req = FASA__V1__REQUEST__INIT;
    Fasa__V1__Snapshot sn = FASA__V1__SNAPSHOT__INIT;
    sn.session_id = (char *)id;
    sn.has_all = all >= 0;
    sn.all = all > 0;
    req.body_case = FASA__V1__REQUEST__BODY_SNAPSHOT;
    req.snapshot = &sn;
    return wire_send(&req);
}

static void s_service_with(const char *dir, int n_shards)
{
    fasa_service_destroy(&s_svc);
    fasa_engine_t *e = fasa_engine_new(n_shards, 16);
    ck_assert_ptr_nonnull(e);
    const fasa_service_opts o = {.n_ranks = 1, .max_message = 1 << 20, .state_dir = dir};
    s_svc = fasa_service_new(&e, n_shards, &o);
    ck_assert_ptr_nonnull(s_svc);
}

START_TEST(test_snapshot_requests)
{
    wire_make_session();
    Fasa__V1__Response *r = s_snapshot_req("bad", -1);
    wire_expect_error(r, FASA__V1__STATUS__FAILED_PRECONDITION, "--state-dir");
    wire_expect_error(s_snapshot_req(NULL, -1), FASA__V1__STATUS__INVALID_ARGUMENT,
                      "snapshot: give exactly one");
    wire_expect_error(s_snapshot_req("bad", 1), FASA__V1__STATUS__INVALID_ARGUMENT,
                      "snapshot: give exactly one");
    wire_expect_error(s_snapshot_req(NULL, 0), FASA__V1__STATUS__INVALID_ARGUMENT,
                      "snapshot: give exactly one");
    wire_expect_error(s_snapshot_req("a b", -1), FASA__V1__STATUS__INVALID_ARGUMENT,
                      "snapshot.session_id");

    char dir[] = "/tmp/fasa-svcsnap-XXXXXX";
    ck_assert_ptr_nonnull(mkdtemp(dir));
    s_service_with(dir, 2);
    wire_make_session();
    wire_expect_error(s_snapshot_req("nope", -1), FASA__V1__STATUS__NOT_FOUND,
                      "snapshot.session_id");
    r = s_snapshot_req("bad", -1);
    ck_assert_msg(r->status == 0, "%s", r->message);
    ck_assert_int_eq(r->body_case, FASA__V1__RESPONSE__BODY_SNAPSHOT);
    ck_assert_uint_eq(r->snapshot->n_sessions, 1);
    ck_assert_str_eq(r->snapshot->sessions[0]->session_id, "bad");
    ck_assert_uint_eq(r->snapshot->sessions[0]->length, WIRE_N);
    /* Two shard files: headers plus WIRE_L x WIRE_N rows of pos, K and V. */
    const uint64_t body = (uint64_t)WIRE_L * WIRE_N * (4 + 2 * WIRE_HKV * WIRE_D * 4);
    ck_assert_uint_gt(r->snapshot->sessions[0]->bytes, body);
    ck_assert_uint_lt(r->snapshot->sessions[0]->bytes, body + 2 * 256);
    fasa__v1__response__free_unpacked(r, NULL);
    /* A named profile, saved with all. */
    enum { L = WIRE_L, T = 64, H = WIRE_H, HKV = WIRE_HKV, D = WIRE_D };
    test_rng rng = {9};
    float *q = test_alloc(sizeof(float) * L * T * H * D);
    float *k = test_alloc(sizeof(float) * L * T * HKV * D);
    test_fill(&rng, (size_t)L * T * H * D, q, 1.0f);
    test_fill(&rng, (size_t)L * T * HKV * D, k, 1.0f);
    Fasa__V1__Request req = FASA__V1__REQUEST__INIT;
    Fasa__V1__Calibrate c = FASA__V1__CALIBRATE__INIT;
    Fasa__V1__Tensor tq, tk;
    uint64_t qs[4] = {L, T, H, D}, ks[4] = {L, T, HKV, D};
    wire_tensor(&tq, qs, 4, q, (size_t)L * T * H * D);
    wire_tensor(&tk, ks, 4, k, (size_t)L * T * HKV * D);
    c.q = &tq;
    c.k = &tk;
    c.profile_name = "p1";
    req.body_case = FASA__V1__REQUEST__BODY_CALIBRATE;
    req.calibrate = &c;
    r = wire_send(&req);
    ck_assert_msg(r->status == 0, "%s", r->message);
    char *text = strdup(r->calibrate->profile_text);
    fasa__v1__response__free_unpacked(r, NULL);
    r = s_snapshot_req(NULL, 1);
    ck_assert_msg(r->status == 0, "%s", r->message);
    ck_assert_uint_eq(r->snapshot->n_sessions, 1);
    ck_assert_uint_eq(r->snapshot->n_profiles, 1);
    fasa__v1__response__free_unpacked(r, NULL);

    /* A fresh service restores both; with as many shards, "bad" answers bit for bit. */
    s_service_with(dir, 2);
    int failed = -1;
    ck_assert_int_eq(fasa_service_restore(s_svc, &failed), 1);
    ck_assert_int_eq(failed, 0);
    wire_check_unchanged();
    Fasa__V1__SetProfile sp = FASA__V1__SET_PROFILE__INIT;
    Fasa__V1__Request spr = FASA__V1__REQUEST__INIT;
    Fasa__V1__CreateSession cs;
    wire_create_init(&spr, &cs, "fresh");
    fasa__v1__response__free_unpacked(wire_send(&spr), NULL);
    spr = (Fasa__V1__Request)FASA__V1__REQUEST__INIT;
    sp.session_id = "fresh";
    sp.profile_name = "p1";
    spr.body_case = FASA__V1__REQUEST__BODY_SET_PROFILE;
    spr.set_profile = &sp;
    r = wire_send(&spr);
    ck_assert_msg(r->status == 0, "the restored profile p1: %s", r->message);
    fasa__v1__response__free_unpacked(r, NULL);
    /* Nothing changed since: the interval writes nothing of "bad" but the new "fresh". */
    ck_assert_int_eq(fasa_service_snapshot_changed(s_svc), 1);
    ck_assert_int_eq(fasa_service_snapshot_changed(s_svc), 0);
    /* Dropped sessions leave no snapshot behind. */
    Fasa__V1__DropSession drop = FASA__V1__DROP_SESSION__INIT;
    Fasa__V1__Request dr = FASA__V1__REQUEST__INIT;
    dr.body_case = FASA__V1__REQUEST__BODY_DROP_SESSION;
    dr.drop_session = &drop;
    drop.session_id = "fresh";
    fasa__v1__response__free_unpacked(wire_send(&dr), NULL);
    /* A damaged manifest: "bad" is refused, and requests for it say why until a session of
     * that id is created again. */
    char stem[64], mpath[128];
    fasa_snapshot_stem("bad", stem, sizeof(stem));
    snprintf(mpath, sizeof(mpath), "%s/%s.manifest", dir, stem);
    ck_assert_int_eq(truncate(mpath, 40), 0);
    s_service_with(dir, 1);
    ck_assert_int_eq(fasa_service_restore(s_svc, &failed), 0);
    ck_assert_int_eq(failed, 1);
    Fasa__V1__Request sr = FASA__V1__REQUEST__INIT;
    Fasa__V1__Stats sb = FASA__V1__STATS__INIT;
    sb.session_id = "bad";
    sr.body_case = FASA__V1__REQUEST__BODY_STATS;
    sr.stats = &sb;
    wire_expect_error(wire_send(&sr), FASA__V1__STATUS__FAILED_PRECONDITION,
                      "stats.session_id: session 'bad' could not be restored: ");
    sb.session_id = "other";
    wire_expect_error(wire_send(&sr), FASA__V1__STATUS__NOT_FOUND, "'other' not found");
    wire_make_session(); /* creates "bad" afresh */
    drop.session_id = "bad";
    r = wire_send(&dr);
    ck_assert_int_eq(r->status, 0);
    fasa__v1__response__free_unpacked(r, NULL);
    r = wire_send(&dr);
    wire_expect_error(r, FASA__V1__STATUS__NOT_FOUND, "'bad' not found");
    s_service_with(dir, 1);
    ck_assert_int_eq(fasa_service_restore(s_svc, &failed), 0);
    ck_assert_int_eq(failed, 0);
    char cmd[64];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
    ck_assert_int_eq(system(cmd), 0);
    free(text);
    free(q);
    free(k);
}
END_TEST

/* An Attend of h x d floats for session "arena", packed (test_alloc'd) into *len_p bytes. */
static uint8_t *s_pack_attend(int h, int d, float *q, float *kv, size_t *len_p)
{
    Fasa__V1__Request req;
    Fasa__V1__Attend at;
    Fasa__V1__Tensor tq, tk, tv;
    uint64_t sq[2] = {(uint64_t)h, (uint64_t)d}, skv[2] = {1, (uint64_t)d};
    fasa__v1__request__init(&req);
    fasa__v1__attend__init(&at);
    Fasa__V1__Tensor *ts[3] = {&tq, &tk, &tv};
    for (int i = 0; i < 3; i++) {
        fasa__v1__tensor__init(ts[i]);
        ts[i]->dtype = FASA__V1__DTYPE__F32;
        ts[i]->n_shape = 2;
        ts[i]->shape = i ? skv : sq;
        ts[i]->data.data = (uint8_t *)(i ? kv + (i - 1) * d : q);
        ts[i]->data.len = (size_t)(i ? 1 : h) * d * sizeof(float);
    }
    at.session_id = "arena";
    at.layer = 1;
    at.q = &tq;
    at.k_new = &tk;
    at.v_new = &tv;
    req.protocol_version = 1;
    req.request_id = 77;
    req.body_case = FASA__V1__REQUEST__BODY_ATTEND;
    req.attend = &at;
    *len_p = fasa__v1__request__get_packed_size(&req);
    uint8_t *buf = test_alloc(*len_p);
    fasa__v1__request__pack(&req, buf);
    return buf;
}

static void s_check_attend(const edge_request *r, int h, int d, const float *q, const float *kv)
{
    ck_assert_int_eq(r->kind, EDGE_ATTEND);
    ck_assert_uint_eq(r->request_id, 77);
    ck_assert_str_eq(r->u.attend.session_id, "arena");
    ck_assert_int_eq(r->u.attend.layer, 1);
    ck_assert_int_eq(r->u.attend.q.shape[0], h);
    ck_assert_uint_eq(r->u.attend.q.n, (size_t)h * d);
    ck_assert_int_eq(memcmp(r->u.attend.q.data, q, (size_t)h * d * sizeof(float)), 0);
    ck_assert_int_eq(memcmp(r->u.attend.k_new.data, kv, (size_t)d * sizeof(float)), 0);
    ck_assert_int_eq(memcmp(r->u.attend.v_new.data, kv + d, (size_t)d * sizeof(float)), 0);
}

/* edge_decode_in (the service's reused arena) decodes what edge_decode decodes, to the
 * same bits: a first request (the arena empty), the same again (from the arena), one while
 * another still holds the arena (malloc), one larger than EDGE_ARENA_MAX (malloc past the
 * arena) and again after it, a smaller one, and a truncated one, refused with the same
 * message. */
START_TEST(test_edge_arena)
{
    edge_arena *ar = edge_arena_new();
    ck_assert_ptr_nonnull(ar);
    const int d = 64, sizes[] = {32, 32, 32, 20000, 20000, 4};
    for (int k = 0; k < 6; k++) {
        const int h = sizes[k];
        float *q = test_alloc((size_t)h * d * sizeof(float)), kv[2 * 64];
        for (int i = 0; i < h * d; i++)
            q[i] = (float)(((unsigned)i * 7919u + (unsigned)k) % 1000u) / 7.0f;
        for (int i = 0; i < 2 * d; i++) kv[i] = (float)(i - k);
        size_t len;
        uint8_t *buf = s_pack_attend(h, d, q, kv, &len);
        edge_request plain, in, other;
        uint64_t rid;
        char m1[256], m2[256];
        ck_assert_int_eq(edge_decode(buf, len, (size_t)64 << 20, &plain, &rid, m1, sizeof(m1)), 0);
        ck_assert_int_eq(edge_decode_in(ar, buf, len, (size_t)64 << 20, &in, &rid, m2, sizeof(m2)),
                         0);
        s_check_attend(&plain, h, d, q, kv);
        s_check_attend(&in, h, d, q, kv);
        if (k == 2) { /* the arena is held by `in`: this one mallocs, and both stay intact */
            ck_assert_int_eq(
                edge_decode_in(ar, buf, len, (size_t)64 << 20, &other, &rid, m2, sizeof(m2)), 0);
            s_check_attend(&other, h, d, q, kv);
            s_check_attend(&in, h, d, q, kv);
            edge_request_free(&other);
        }
        edge_request_free(&in);
        edge_request_free(&plain);
        /* Truncated: the same refusal either way, and nothing left held. */
        const int c1 = edge_decode(buf, len / 2, (size_t)64 << 20, &plain, &rid, m1, sizeof(m1));
        const int c2 =
            edge_decode_in(ar, buf, len / 2, (size_t)64 << 20, &in, &rid, m2, sizeof(m2));
        ck_assert_int_ne(c1, 0);
        ck_assert_int_eq(c1, c2);
        ck_assert_str_eq(m1, m2);
        free(buf);
        free(q);
    }
    edge_arena_destroy(&ar);
    ck_assert_ptr_null(ar);
}
END_TEST

/* Ownership in the signature (house style rule 6): fasa_service_new takes the engine over
 * and nulls the caller's pointer, and serves over that engine; the destructor nulls the
 * pointer and accepts NULL. */
START_TEST(test_service_owns_engine)
{
    fasa_service_destroy(&s_svc);
    ck_assert_ptr_null(s_svc);
    fasa_service_destroy(&s_svc);
    fasa_service_destroy(NULL);
    fasa_engine_t *e = fasa_engine_new(3, 16);
    ck_assert_ptr_nonnull(e);
    const fasa_service_opts o = {.n_ranks = 1, .max_message = 1 << 20};
    s_svc = fasa_service_new(&e, 3, &o);
    ck_assert_ptr_nonnull(s_svc);
    ck_assert_ptr_null(e);
    Fasa__V1__Request pr = FASA__V1__REQUEST__INIT;
    Fasa__V1__Ping ping = FASA__V1__PING__INIT;
    pr.body_case = FASA__V1__REQUEST__BODY_PING;
    pr.ping = &ping;
    Fasa__V1__Response *r = wire_send(&pr);
    ck_assert_int_eq(r->status, 0);
    ck_assert_uint_eq(r->ping->n_shards, 3); /* this service, not the fixture's 2 */
    fasa__v1__response__free_unpacked(r, NULL);
}
END_TEST

/* Raw data frames store what inline data stores: two services (each over its own 2-shard
 * engine) get the same appends to an F16 session, one with k and v inline, one with them as
 * raw data frames (an append of every layer in F16, then one of layer 0 in F32 widened and
 * rounded on the way, its k frame off its alignment so that the edge copies it); every
 * shard's snapshot file (the stored bytes) has the same checksum and size. And a Request
 * whose frames together exceed max_message is refused, naming the limit. */
START_TEST(test_raw_frames_same_bytes)
{
    enum { L = WIRE_L, HKV = WIRE_HKV, D = WIRE_D, T = 40, T2 = 24 };
    const size_t n1 = (size_t)L * T * HKV * D, n2 = (size_t)T2 * HKV * D;
    test_rng rng = {11};
    float *kf = test_alloc(n1 * 4), *vf = test_alloc(n1 * 4);
    test_fill(&rng, n1, kf, 2.0f);
    test_fill(&rng, n1, vf, 2.0f);
    uint16_t *kh = test_alloc(n1 * 2), *vh = test_alloc(n1 * 2);
    dtype_from_f32(SIMD_AUTO, FASA_DTYPE_F16, n1, kf, kh);
    dtype_from_f32(SIMD_AUTO, FASA_DTYPE_F16, n1, vf, vh);
    uint8_t *k2 = test_alloc(n2 * 4 + 8);
    memcpy(k2 + 2, kf, n2 * 4); /* 2 bytes off: not aligned for f32 */
    char dir[] = "/tmp/fasa-frames-XXXXXX";
    ck_assert_ptr_nonnull(mkdtemp(dir));
    shard_snap_info info[2][2];
    for (int way = 0; way < 2; way++) {
        fasa_engine_t *e = fasa_engine_new(2, 16), *engine = e;
        ck_assert_ptr_nonnull(e);
        const fasa_service_opts o = {.n_ranks = 1, .max_message = 1 << 20};
        fasa_service_destroy(&s_svc);
        s_svc = fasa_service_new(&e, 2, &o);
        ck_assert_ptr_nonnull(s_svc);
        Fasa__V1__Request cr;
        Fasa__V1__CreateSession c;
        wire_create_init(&cr, &c, "h");
        c.has_dtype = 1;
        c.dtype = FASA__V1__DTYPE__F16;
        Fasa__V1__Response *r = wire_send(&cr);
        ck_assert_msg(r->status == 0, "create: %s", r->message);
        fasa__v1__response__free_unpacked(r, NULL);
        for (int step = 0; step < 2; step++) {
            Fasa__V1__Request req = FASA__V1__REQUEST__INIT;
            Fasa__V1__Append a = FASA__V1__APPEND__INIT;
            Fasa__V1__Tensor tk = FASA__V1__TENSOR__INIT, tv = FASA__V1__TENSOR__INIT;
            uint64_t all[4] = {L, T, HKV, D}, one[3] = {T2, HKV, D};
            edge_frame fr[2];
            if (step == 0) {
                tk.dtype = tv.dtype = FASA__V1__DTYPE__F16;
                tk.shape = tv.shape = all;
                tk.n_shape = tv.n_shape = 4;
                fr[0] = (edge_frame){kh, n1 * 2};
                fr[1] = (edge_frame){vh, n1 * 2};
            } else {
                tk.dtype = tv.dtype = FASA__V1__DTYPE__F32;
                tk.shape = tv.shape = one;
                tk.n_shape = tv.n_shape = 3;
                a.has_layer = 1;
                a.layer = 0;
                a.start_pos = T;
                fr[0] = (edge_frame){way ? k2 + 2 : (const void *)kf, n2 * 4};
                fr[1] = (edge_frame){vf, n2 * 4};
            }
            if (way == 0) {
                tk.data = (ProtobufCBinaryData){fr[0].len, (uint8_t *)(uintptr_t)fr[0].data};
                tv.data = (ProtobufCBinaryData){fr[1].len, (uint8_t *)(uintptr_t)fr[1].data};
            } else {
                tk.has_data_frame = tv.has_data_frame = 1;
                tk.data_frame = 1;
                tv.data_frame = 2;
            }
            a.session_id = "h";
            a.k = &tk;
            a.v = &tv;
            req.body_case = FASA__V1__REQUEST__BODY_APPEND;
            req.append = &a;
            req.protocol_version = 1;
            req.request_id = 7;
            const size_t len = fasa__v1__request__get_packed_size(&req);
            uint8_t *buf = test_alloc(len);
            fasa__v1__request__pack(&req, buf);
            r = way ? s_rt_frames(buf, len, fr, 2) : s_rt(buf, len);
            free(buf);
            ck_assert_msg(r->status == 0, "append %d way %d: %s", step, way, r->message);
            ck_assert_uint_eq(r->append->length, step ? T + T2 : T);
            fasa__v1__response__free_unpacked(r, NULL);
        }
        ck_assert_int_eq(fasa_engine_length(engine, "h", 0), T + T2);
        ck_assert_int_eq(fasa_engine_length(engine, "h", 1), T);
        char prefix[64];
        snprintf(prefix, sizeof(prefix), "%s/w%d", dir, way);
        fasa_error fe;
        ck_assert_msg(fasa_engine_write_shards(engine, "h", prefix, info[way], &fe) == FASA_OK,
                      "write_shards: %s", fe.msg);
        for (int i = 0; i < 2; i++) {
            char path[96];
            snprintf(path, sizeof(path), "%s.s%d.shard", prefix, i);
            unlink(path);
        }
        if (way == 1) {
            /* Frames whose bytes with the Request's exceed max_message (1 MiB here). */
            static uint8_t big[600 << 10];
            const edge_frame two[2] = {{big, sizeof(big)}, {big, sizeof(big)}};
            wire_expect_error(s_rt_frames("x", 1, two, 2), FASA__V1__STATUS__INVALID_ARGUMENT,
                              "over the 1048576-byte limit");
            ck_assert_int_eq(fasa_engine_length(engine, "h", 0), T + T2);
        }
    }
    rmdir(dir);
    for (int i = 0; i < 2; i++) {
        ck_assert_int_gt(info[0][i].rows, 0);
        ck_assert_int_eq(info[0][i].rows, info[1][i].rows);
        ck_assert_int_eq(info[0][i].file_bytes, info[1][i].file_bytes);
        ck_assert_msg(info[0][i].checksum == info[1][i].checksum,
                      "shard %d: raw frames stored other bytes than inline data", i);
    }
    free(kf), free(vf), free(kh), free(vh), free(k2);
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
    tcase_add_test(tc, test_deadline);
    tcase_add_test(tc, test_stats_counts);
    tcase_add_test(tc, test_stats_ranks);
    tcase_add_test(tc, test_snapshot_requests);
    tcase_add_test(tc, test_edge_arena);
    tcase_add_test(tc, test_service_owns_engine);
    tcase_add_test(tc, test_raw_frames_same_bytes);
    suite_add_tcase(s, tc);
    return s;
}

/* libfasa against a fake server in this process (a ROUTER socket on a thread that answers
 * pings): what a client sees when its server dies. A runner of its own (ctest client).
 *
 * - the server dies while the reply is awaited: the request fails at once;
 * - the server dies while the client is idle, then the client sends: the request fails at
 *   once (it must not sit in ZeroMQ's queue until the timeout);
 * - the server comes back on the same endpoint while the client is idle: the request
 *   goes through;
 * - an append of 64 KiB or more arrives as the Request and two raw data frames holding the
 *   caller's k and v bytes (data empty, data_frame 1 and 2), a small one inline, both by
 *   the synchronous call and the window; with no server there the call gives up after its
 *   timeout and the caller's memory is its own again. */
#include <check.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <zmq.h>

#include "fasa.pb-c.h"
#include "fasa_client.h"

static void *s_ctx;

struct fake {
    void *sock;
    char endpoint[64];
    int n_answer; /* pings answered before the thread closes the socket */
    int n_drop;   /* requests then read and left unanswered */
    pthread_t thread;
};

/* Binds a ROUTER on endpoint (NULL: a free loopback port). */
static void s_fake_bind(struct fake *f, const char *endpoint)
{
    f->sock = zmq_socket(s_ctx, ZMQ_ROUTER);
    ck_assert_ptr_nonnull(f->sock);
    const int linger = 0;
    zmq_setsockopt(f->sock, ZMQ_LINGER, &linger, sizeof(linger));
    ck_assert_int_eq(zmq_bind(f->sock, endpoint ? endpoint : "tcp://127.0.0.1:*"), 0);
    size_t len = sizeof(f->endpoint);
    ck_assert_int_eq(zmq_getsockopt(f->sock, ZMQ_LAST_ENDPOINT, f->endpoint, &len), 0);
}

/* Reads one request: its routing id frame into id, the Request unpacked (caller frees). */
static Fasa__V1__Request *s_fake_read(struct fake *f, zmq_msg_t *id)
{
    zmq_msg_init(id);
    if (zmq_msg_recv(id, f->sock, 0) < 0) return NULL;
    zmq_msg_t body;
    zmq_msg_init(&body);
    if (zmq_msg_recv(&body, f->sock, 0) < 0) {
        zmq_msg_close(&body);
        return NULL;
    }
    Fasa__V1__Request *req =
        fasa__v1__request__unpack(NULL, zmq_msg_size(&body), zmq_msg_data(&body));
    zmq_msg_close(&body);
    return req;
}

static void *s_fake_main(void *arg)
{
    struct fake *f = arg;
    for (int i = 0; i < f->n_answer + f->n_drop; i++) {
        zmq_msg_t id;
        Fasa__V1__Request *req = s_fake_read(f, &id);
        if (!req) {
            zmq_msg_close(&id);
            break;
        }
        if (i < f->n_answer && req->body_case == FASA__V1__REQUEST__BODY_PING) {
            Fasa__V1__PingResult pr = FASA__V1__PING_RESULT__INIT;
            pr.has_payload = req->ping->has_payload;
            pr.payload = req->ping->payload;
            pr.n_ranks = pr.n_shards = 1;
            pr.version = "fake";
            Fasa__V1__Response resp = FASA__V1__RESPONSE__INIT;
            resp.protocol_version = 1;
            resp.request_id = req->request_id;
            resp.status = FASA__V1__STATUS__OK;
            resp.body_case = FASA__V1__RESPONSE__BODY_PING;
            resp.ping = &pr;
            uint8_t buf[256];
            const size_t n = fasa__v1__response__pack(&resp, buf);
            zmq_msg_send(&id, f->sock, ZMQ_SNDMORE);
            zmq_send(f->sock, buf, n, 0);
        }
        zmq_msg_close(&id);
        fasa__v1__request__free_unpacked(req, NULL);
    }
    zmq_close(f->sock); /* the server's death: its listener and connections close */
    return NULL;
}

static void s_fake_start(struct fake *f, const char *endpoint, int n_answer, int n_drop)
{
    f->n_answer = n_answer;
    f->n_drop = n_drop;
    s_fake_bind(f, endpoint);
    ck_assert_int_eq(pthread_create(&f->thread, NULL, s_fake_main, f), 0);
}

static double s_now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static void s_sleep_ms(int ms)
{
    const struct timespec t = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&t, NULL);
}

static void s_setup(void)
{
    s_ctx = zmq_ctx_new();
}

static void s_teardown(void)
{
    zmq_ctx_term(s_ctx);
}

/* The client's timeout: far above what any case below may take. */
#define TIMEOUT_MS 20000

/* A client of f that got one ping answered (the version checked). */
static fasa_client *s_client_pinged(const struct fake *f)
{
    fasa_client *c;
    fasa_client_error err;
    fasa_client_server_info info;
    ck_assert_int_eq(fasa_client_connect(f->endpoint, TIMEOUT_MS, &c, &err), FASA_CLIENT_OK);
    ck_assert_int_eq(fasa_client_ping(c, &info, &err), FASA_CLIENT_OK);
    ck_assert_str_eq(info.version, "fake");
    return c;
}

/* The next ping fails with UNAVAILABLE, an error naming why, long before the timeout. */
static void s_ping_fails_fast(fasa_client *c, const char *why)
{
    fasa_client_error err;
    fasa_client_server_info info;
    const double t0 = s_now();
    const fasa_client_status st = fasa_client_ping(c, &info, &err);
    const double took = s_now() - t0;
    ck_assert_int_eq(st, FASA_CLIENT_UNAVAILABLE);
    ck_assert_msg(strstr(err.msg, why), "%s", err.msg);
    ck_assert_msg(took < 5.0, "the error came after %.3f s (timeout %d ms)", took, TIMEOUT_MS);
}

START_TEST(test_dies_while_waiting)
{
    struct fake f;
    s_fake_start(&f, NULL, 1, 1);
    fasa_client *c = s_client_pinged(&f);
    s_ping_fails_fast(c, "was lost while waiting for the ping reply");
    pthread_join(f.thread, NULL);
    fasa_client_close(&c);
}
END_TEST

START_TEST(test_dies_while_idle)
{
    struct fake f;
    s_fake_start(&f, NULL, 1, 0);
    fasa_client *c = s_client_pinged(&f);
    pthread_join(f.thread, NULL); /* dead after its one answer */
    s_sleep_ms(300);              /* the client notices the drop while idle */
    s_ping_fails_fast(c, "dropped before the request was sent");
    fasa_client_close(&c);
}
END_TEST

START_TEST(test_comes_back)
{
    struct fake f, g;
    s_fake_start(&f, NULL, 1, 0);
    fasa_client *c = s_client_pinged(&f);
    pthread_join(f.thread, NULL);
    s_sleep_ms(300); /* down long enough for refused reconnects */
    s_fake_start(&g, f.endpoint, 1, 0);
    s_sleep_ms(300); /* back */
    fasa_client_error err;
    fasa_client_server_info info;
    ck_assert_msg(fasa_client_ping(c, &info, &err) == FASA_CLIENT_OK, "%s", err.msg);
    pthread_join(g.thread, NULL);
    fasa_client_close(&c);
}
END_TEST

/* The fake's side of test_append_frames: reads n appends (all frames), checks each against
 * the caller's bytes, answers its length. */
struct fake_append {
    struct fake f;
    int n, ok;
    const uint8_t *k, *v;
    size_t big, small; /* bytes of k of the big and the small appends */
};

static void *s_fake_append_main(void *arg)
{
    struct fake_append *fa = arg;
    fa->ok = 1;
    for (int i = 0; i < fa->n; i++) {
        zmq_msg_t part[4];
        int np = 0, more = 1;
        while (more && np < 4) {
            zmq_msg_init(&part[np]);
            if (zmq_msg_recv(&part[np], fa->f.sock, 0) < 0) {
                fa->ok = 0;
                break;
            }
            more = zmq_msg_more(&part[np++]);
        }
        Fasa__V1__Request *req = np >= 2 ? fasa__v1__request__unpack(NULL, zmq_msg_size(&part[1]),
                                                                     zmq_msg_data(&part[1]))
                                         : NULL;
        const Fasa__V1__Append *a = req ? req->append : NULL;
        const int big = i % 2 == 0; /* big, small, big, ... */
        if (!a || more)
            fa->ok = 0;
        else if (big) {
            const size_t b = fa->big;
            fa->ok &= np == 4 && a->k->data.len == 0 && a->v->data.len == 0 &&
                      a->k->has_data_frame && a->k->data_frame == 1 && a->v->has_data_frame &&
                      a->v->data_frame == 2 && zmq_msg_size(&part[2]) == b &&
                      zmq_msg_size(&part[3]) == b && !memcmp(zmq_msg_data(&part[2]), fa->k, b) &&
                      !memcmp(zmq_msg_data(&part[3]), fa->v, b);
        } else {
            const size_t b = fa->small;
            fa->ok &= np == 2 && !a->k->has_data_frame && !a->v->has_data_frame &&
                      a->k->data.len == b && !memcmp(a->k->data.data, fa->k, b) &&
                      a->v->data.len == b && !memcmp(a->v->data.data, fa->v, b);
        }
        if (req) {
            Fasa__V1__AppendResult ar = FASA__V1__APPEND_RESULT__INIT;
            ar.length = a ? a->start_pos + a->k->shape[0] : 0;
            Fasa__V1__Response resp = FASA__V1__RESPONSE__INIT;
            resp.protocol_version = 1;
            resp.request_id = req->request_id;
            resp.status = FASA__V1__STATUS__OK;
            resp.body_case = FASA__V1__RESPONSE__BODY_APPEND;
            resp.append = &ar;
            uint8_t buf[64];
            const size_t n = fasa__v1__response__pack(&resp, buf);
            zmq_send(fa->f.sock, zmq_msg_data(&part[0]), zmq_msg_size(&part[0]), ZMQ_SNDMORE);
            zmq_send(fa->f.sock, buf, n, 0);
            fasa__v1__request__free_unpacked(req, NULL);
        }
        for (int j = 0; j < np; j++) zmq_msg_close(&part[j]);
    }
    zmq_close(fa->f.sock);
    return NULL;
}

START_TEST(test_append_frames)
{
    const fasa_client_geometry g = {1, 4, 2, 128};
    const uint64_t big_n = 256, small_n = 2; /* 128 KiB and 1 KiB of f16 per tensor */
    const size_t row = 2 * 128 * 2;
    uint8_t *k = malloc(big_n * row), *v = malloc(big_n * row);
    ck_assert_ptr_nonnull(k);
    ck_assert_ptr_nonnull(v);
    for (size_t i = 0; i < big_n * row; i++) k[i] = (uint8_t)(i * 7 + 1), v[i] = (uint8_t)(i * 13);
    struct fake_append fa = {.n = 6, .k = k, .v = v, .big = big_n * row, .small = small_n * row};
    s_fake_bind(&fa.f, NULL);
    ck_assert_int_eq(pthread_create(&fa.f.thread, NULL, s_fake_append_main, &fa), 0);
    fasa_client *c;
    fasa_client_error err;
    ck_assert_int_eq(fasa_client_connect(fa.f.endpoint, TIMEOUT_MS, &c, &err), FASA_CLIENT_OK);
    uint64_t len = 0, pos = 0;
    for (int i = 0; i < 2; i++) {
        ck_assert_msg(fasa_client_append_dt(c, "s", &g, 0, pos, big_n, FASA_CLIENT_DTYPE_F16, k, v,
                                            &len, &err) == FASA_CLIENT_OK,
                      "%s", err.msg);
        ck_assert_uint_eq(len, pos += big_n);
        ck_assert_msg(fasa_client_append_dt(c, "s", &g, 0, pos, small_n, FASA_CLIENT_DTYPE_F16, k,
                                            v, &len, &err) == FASA_CLIENT_OK,
                      "%s", err.msg);
        ck_assert_uint_eq(len, pos += small_n);
    }
    /* The window: sent, the caller's buffers reusable at once, then the replies. */
    ck_assert_int_eq(
        fasa_client_append_send(c, "s", &g, 0, pos, big_n, FASA_CLIENT_DTYPE_F16, k, v, &err),
        FASA_CLIENT_OK);
    ck_assert_int_eq(fasa_client_append_send(c, "s", &g, 0, pos + big_n, small_n,
                                             FASA_CLIENT_DTYPE_F16, k, v, &err),
                     FASA_CLIENT_OK);
    ck_assert_int_eq(fasa_client_append_recv(c, &len, &err), FASA_CLIENT_OK);
    ck_assert_int_eq(fasa_client_append_recv(c, &len, &err), FASA_CLIENT_OK);
    ck_assert_uint_eq(len, pos + big_n + small_n);
    pthread_join(fa.f.thread, NULL);
    ck_assert_msg(fa.ok, "the fake server did not get the appends as sent");
    fasa_client_close(&c);

    /* Nobody there: the frames never leave; the call fails after its timeout, and k and v
     * are free to go (ASan would see ZeroMQ reading them later). */
    ck_assert_int_eq(fasa_client_connect("tcp://127.0.0.1:1", 1000, &c, &err), FASA_CLIENT_OK);
    const fasa_client_status st =
        fasa_client_append_dt(c, "s", &g, 0, 0, big_n, FASA_CLIENT_DTYPE_F16, k, v, NULL, &err);
    ck_assert_int_eq(st, FASA_CLIENT_UNAVAILABLE);
    memset(k, 0, big_n * row);
    free(k);
    free(v);
    fasa_client_close(&c);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("client");
    TCase *tc = tcase_create("server death");
    tcase_add_checked_fixture(tc, s_setup, s_teardown);
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_dies_while_waiting);
    tcase_add_test(tc, test_dies_while_idle);
    tcase_add_test(tc, test_comes_back);
    tcase_add_test(tc, test_append_frames);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    const int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}

/* Against a live fasa-server (FASA_ENDPOINT): the protocol-level bad-input cases of
 * wire_cases.c over the socket, plus what only a socket has: pipelined DEALER requests
 * matched by id, a REQ peer, extra frames, and a message over --max-message (the peer is
 * disconnected; nobody else notices). The server must keep serving throughout and the
 * session's state must stay unchanged.
 *
 * Raw ZeroMQ and the generated protobuf-c code, not libfasa, so the bytes can be wrong. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

#include "fasa.pb-c.h"
#include "test_util.h"
#include "wire_cases.h"

static void *s_ctx, *s_sock;
static const char *s_endpoint;

static void *s_connect(int type)
{
    void *sock = zmq_socket(s_ctx, type);
    ck_assert_ptr_nonnull(sock);
    const int linger = 0, timeout = 20000;
    zmq_setsockopt(sock, ZMQ_LINGER, &linger, sizeof(linger));
    zmq_setsockopt(sock, ZMQ_RCVTIMEO, &timeout, sizeof(timeout));
    ck_assert_int_eq(zmq_connect(sock, s_endpoint), 0);
    return sock;
}

/* Sends raw bytes, returns the decoded Response (caller frees) or NULL on timeout. */
static Fasa__V1__Response *s_roundtrip_on(void *sock, const void *buf, size_t len)
{
    ck_assert_int_ge(zmq_send(sock, buf, len, 0), 0);
    zmq_msg_t m;
    zmq_msg_init(&m);
    if (zmq_msg_recv(&m, sock, 0) < 0) {
        zmq_msg_close(&m);
        return NULL;
    }
    Fasa__V1__Response *r = fasa__v1__response__unpack(NULL, zmq_msg_size(&m), zmq_msg_data(&m));
    zmq_msg_close(&m);
    ck_assert_msg(r != NULL, "the server's reply is not a Response");
    return r;
}

static Fasa__V1__Response *s_rt(const void *buf, size_t len)
{
    return s_roundtrip_on(s_sock, buf, len);
}

/* A Request and its raw data frames as one multipart message; the reply's last frame. */
static Fasa__V1__Response *s_rt_frames(const void *buf, size_t len, const edge_frame *frames, int n)
{
    ck_assert_int_ge(zmq_send(s_sock, buf, len, n ? ZMQ_SNDMORE : 0), 0);
    for (int i = 0; i < n; i++)
        ck_assert_int_ge(
            zmq_send(s_sock, frames[i].data, frames[i].len, i + 1 < n ? ZMQ_SNDMORE : 0), 0);
    zmq_msg_t m;
    zmq_msg_init(&m);
    do {
        zmq_msg_close(&m);
        zmq_msg_init(&m);
        if (zmq_msg_recv(&m, s_sock, 0) < 0) {
            zmq_msg_close(&m);
            return NULL;
        }
    } while (zmq_msg_more(&m));
    Fasa__V1__Response *r = fasa__v1__response__unpack(NULL, zmq_msg_size(&m), zmq_msg_data(&m));
    zmq_msg_close(&m);
    ck_assert_msg(r != NULL, "the server's reply is not a Response");
    return r;
}

static void s_setup(void)
{
    s_endpoint = getenv("FASA_ENDPOINT");
    ck_assert_msg(s_endpoint && *s_endpoint, "set FASA_ENDPOINT");
    s_ctx = zmq_ctx_new();
    s_sock = s_connect(ZMQ_DEALER);
    wire_set_roundtrip(s_rt);
    wire_set_roundtrip_frames(s_rt_frames);
}

static void s_teardown(void)
{
    zmq_close(s_sock);
    zmq_ctx_term(s_ctx);
}

START_TEST(test_ping_and_pipelining)
{
    /* Ten pipelined pings on a DEALER come back with their ids and payloads. */
    for (int i = 0; i < 10; i++) {
        Fasa__V1__Request req = FASA__V1__REQUEST__INIT;
        Fasa__V1__Ping p = FASA__V1__PING__INIT;
        char payload[16];
        snprintf(payload, sizeof(payload), "ping-%d", i);
        p.has_payload = 1;
        p.payload.data = (uint8_t *)payload;
        p.payload.len = strlen(payload);
        req.protocol_version = 1;
        req.request_id = 1000 + (uint64_t)i;
        req.body_case = FASA__V1__REQUEST__BODY_PING;
        req.ping = &p;
        uint8_t buf[128];
        const size_t n = fasa__v1__request__pack(&req, buf);
        ck_assert_int_ge(zmq_send(s_sock, buf, n, 0), 0);
    }
    for (int i = 0; i < 10; i++) {
        zmq_msg_t m;
        zmq_msg_init(&m);
        ck_assert_int_ge(zmq_msg_recv(&m, s_sock, 0), 0);
        Fasa__V1__Response *r =
            fasa__v1__response__unpack(NULL, zmq_msg_size(&m), zmq_msg_data(&m));
        zmq_msg_close(&m);
        ck_assert_ptr_nonnull(r);
        ck_assert_int_eq(r->status, 0);
        ck_assert_uint_eq(r->request_id, 1000 + (uint64_t)i);
        char want[16];
        snprintf(want, sizeof(want), "ping-%d", i);
        ck_assert_uint_eq(r->ping->payload.len, strlen(want));
        ck_assert_int_eq(memcmp(r->ping->payload.data, want, strlen(want)), 0);
        ck_assert_uint_ge(r->ping->n_ranks, 1);
        fasa__v1__response__free_unpacked(r, NULL);
    }
    /* A REQ peer (with its empty delimiter frame) is answered too. */
    void *req_sock = s_connect(ZMQ_REQ);
    Fasa__V1__Request req = FASA__V1__REQUEST__INIT;
    Fasa__V1__Ping p = FASA__V1__PING__INIT;
    req.protocol_version = 1;
    req.request_id = 77;
    req.body_case = FASA__V1__REQUEST__BODY_PING;
    req.ping = &p;
    uint8_t buf[64];
    const size_t n = fasa__v1__request__pack(&req, buf);
    Fasa__V1__Response *r = s_roundtrip_on(req_sock, buf, n);
    ck_assert_ptr_nonnull(r);
    ck_assert_uint_eq(r->request_id, 77);
    ck_assert_int_eq(r->status, 0);
    fasa__v1__response__free_unpacked(r, NULL);
    zmq_close(req_sock);
}
END_TEST

/* The server's counters: requests, errors, undecodable requests, INVALID_ARGUMENT errors. */
static void s_counters(uint64_t out[4])
{
    Fasa__V1__Request req = FASA__V1__REQUEST__INIT;
    Fasa__V1__Stats sb = FASA__V1__STATS__INIT;
    req.body_case = FASA__V1__REQUEST__BODY_STATS;
    req.stats = &sb;
    Fasa__V1__Response *r = wire_send(&req);
    ck_assert_int_eq(r->status, 0);
    out[0] = r->stats->requests;
    out[1] = r->stats->errors;
    out[2] = out[3] = UINT64_MAX;
    for (size_t i = 0; i < r->stats->n_requests_by_type; i++)
        if (!strcmp(r->stats->requests_by_type[i]->type, "undecodable"))
            out[2] = r->stats->requests_by_type[i]->count;
    for (size_t i = 0; i < r->stats->n_errors_by_code; i++)
        if (r->stats->errors_by_code[i]->code == FASA__V1__STATUS__INVALID_ARGUMENT)
            out[3] = r->stats->errors_by_code[i]->count;
    fasa__v1__response__free_unpacked(r, NULL);
}

START_TEST(test_frames)
{
    wire_make_session();
    uint64_t before[4], after[4];
    s_counters(before);
    /* Two payload frames. */
    ck_assert_int_ge(zmq_send(s_sock, "a", 1, ZMQ_SNDMORE), 0);
    ck_assert_int_ge(zmq_send(s_sock, "b", 1, 0), 0);
    zmq_msg_t m;
    zmq_msg_init(&m);
    ck_assert_int_ge(zmq_msg_recv(&m, s_sock, 0), 0);
    Fasa__V1__Response *r = fasa__v1__response__unpack(NULL, zmq_msg_size(&m), zmq_msg_data(&m));
    zmq_msg_close(&m);
    ck_assert_ptr_nonnull(r);
    wire_expect_error(r, FASA__V1__STATUS__INVALID_ARGUMENT, "frame");
    /* Counted as a request (undecodable) and an INVALID_ARGUMENT error; the second Stats
     * counts itself. */
    s_counters(after);
    ck_assert_uint_eq(after[0], before[0] + 2);
    ck_assert_uint_eq(after[1], before[1] + 1);
    ck_assert_uint_eq(after[2], before[2] + 1);
    ck_assert_uint_eq(after[3], before[3] + 1);
    wire_check_unchanged();
}
END_TEST

START_TEST(test_oversized)
{
    /* Over --max-message (FASA_MAX_MESSAGE says the limit): answered at once with
     * RESOURCE_EXHAUSTED naming the limit (issue 19; it used to be dropped in silence, and
     * the client waited out its timeout); nothing else changes. */
    const char *lim = getenv("FASA_MAX_MESSAGE");
    if (!lim) return;
    wire_make_session();
    const size_t n = (size_t)atol(lim) + 1;
    uint8_t *big = test_alloc(n);
    memset(big, 0x0a, n);
    void *other = s_connect(ZMQ_DEALER);
    const int short_timeout = 1500;
    zmq_setsockopt(other, ZMQ_RCVTIMEO, &short_timeout, sizeof(short_timeout));
    Fasa__V1__Response *r = s_roundtrip_on(other, big, n);
    ck_assert_msg(r != NULL, "an oversized message got no reply");
    wire_expect_error(r, FASA__V1__STATUS__RESOURCE_EXHAUSTED, "--max-message");
    zmq_close(other);
    free(big);
    wire_check_unchanged();
}
END_TEST

START_TEST(test_shutdown_drains)
{
    /* A Shutdown with three pings pipelined behind it: the Shutdown is answered OK, and
     * every ping still queued when the server stops gets UNAVAILABLE, never OK and never
     * a crash. (A ping that reaches the socket after it closed gets no reply at all.) */
    for (int i = 0; i < 4; i++) {
        Fasa__V1__Request req = FASA__V1__REQUEST__INIT;
        Fasa__V1__Shutdown sd = FASA__V1__SHUTDOWN__INIT;
        Fasa__V1__Ping p = FASA__V1__PING__INIT;
        req.protocol_version = 1;
        req.request_id = 500 + (uint64_t)i;
        if (i == 0) {
            req.body_case = FASA__V1__REQUEST__BODY_SHUTDOWN;
            req.shutdown = &sd;
        } else {
            req.body_case = FASA__V1__REQUEST__BODY_PING;
            req.ping = &p;
        }
        uint8_t buf[64];
        const size_t n = fasa__v1__request__pack(&req, buf);
        ck_assert_int_ge(zmq_send(s_sock, buf, n, 0), 0);
    }
    const int timeout = 3000;
    zmq_setsockopt(s_sock, ZMQ_RCVTIMEO, &timeout, sizeof(timeout));
    int got = 0;
    for (int i = 0; i < 4; i++) {
        zmq_msg_t m;
        zmq_msg_init(&m);
        if (zmq_msg_recv(&m, s_sock, 0) < 0) {
            zmq_msg_close(&m);
            break;
        }
        Fasa__V1__Response *r =
            fasa__v1__response__unpack(NULL, zmq_msg_size(&m), zmq_msg_data(&m));
        zmq_msg_close(&m);
        ck_assert_ptr_nonnull(r);
        ck_assert_uint_eq(r->request_id, 500 + (uint64_t)i);
        ck_assert_int_eq(r->status, i == 0 ? FASA__V1__STATUS__OK : FASA__V1__STATUS__UNAVAILABLE);
        fasa__v1__response__free_unpacked(r, NULL);
        got++;
    }
    ck_assert_int_ge(got, 1);
    printf("shutdown: %d of 3 queued pings answered UNAVAILABLE\n", got - 1);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("socket");
    TCase *tc = tcase_create("socket");
    tcase_add_checked_fixture(tc, s_setup, s_teardown);
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_ping_and_pipelining);
    if (getenv("FASA_SOCKET_SHUTDOWN")) {
        /* Only the shutdown case: it stops the server. */
        tcase_add_test(tc, test_shutdown_drains);
        suite_add_tcase(s, tc);
        SRunner *sr1 = srunner_create(s);
        srunner_set_fork_status(sr1, CK_NOFORK);
        srunner_run_all(sr1, CK_NORMAL);
        const int failed1 = srunner_ntests_failed(sr1);
        srunner_free(sr1);
        return failed1 ? EXIT_FAILURE : EXIT_SUCCESS;
    }
    wire_cases_add(tc);
    tcase_add_test(tc, test_frames);
    tcase_add_test(tc, test_oversized);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_set_fork_status(sr, CK_NOFORK);
    srunner_run_all(sr, CK_NORMAL);
    const int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}

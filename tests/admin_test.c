/* The requests an operator uses to look at and tidy a server, through fasa_service_handle:
 * ListSessions and DeleteProfile (with and without a state dir), what SessionInfo reports
 * of a session's settings (pairing, GQA, dense layers), and the counting of requests the
 * service refuses before they decode (not one payload frame, no request_id). The reference
 * values are the requests' own inputs: the geometry and lengths sent, and K+V bytes as
 * layers x tokens x kv_heads x head_dim x 2 x the dtype's size. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "service.h"
#include "snapshot.h"
#include "test_util.h"
#include "wire_cases.h"

enum { AL = 2, AT = 64, AH = 4, AHKV = 2, AD = 8 };

static fasa_service *s_svc;
static int s_shutdown;
static char s_dir[64];

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

static void s_new_service(void)
{
    fasa_service_destroy(&s_svc);
    fasa_engine_t *e = fasa_engine_new(2, 16);
    ck_assert_ptr_nonnull(e);
    const fasa_service_opts o = {.n_ranks = 1, .max_message = 1 << 22, .state_dir = s_dir};
    s_svc = fasa_service_new(&e, 2, &o);
    ck_assert_ptr_nonnull(s_svc);
}

static void s_setup(void)
{
    snprintf(s_dir, sizeof(s_dir), "/tmp/fasa-admin-XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(s_dir));
    s_new_service();
    wire_set_roundtrip(s_rt);
}

static void s_teardown(void)
{
    fasa_service_destroy(&s_svc);
    char cmd[128];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", s_dir);
    ck_assert_int_eq(system(cmd), 0);
}

/* Calibrates random activations into the stored profile name (pairing as given). */
static void s_calibrate(const char *name, Fasa__V1__Pairing pairing)
{
    test_rng rng = {11};
    float *q = test_alloc(sizeof(float) * AL * AT * AH * AD);
    float *k = test_alloc(sizeof(float) * AL * AT * AHKV * AD);
    test_fill(&rng, (size_t)AL * AT * AH * AD, q, 1.0f);
    test_fill(&rng, (size_t)AL * AT * AHKV * AD, k, 1.0f);
    Fasa__V1__Request req = FASA__V1__REQUEST__INIT;
    Fasa__V1__Calibrate c = FASA__V1__CALIBRATE__INIT;
    Fasa__V1__Tensor tq, tk;
    uint64_t qs[4] = {AL, AT, AH, AD}, ks[4] = {AL, AT, AHKV, AD};
    wire_tensor(&tq, qs, 4, q, (size_t)AL * AT * AH * AD);
    wire_tensor(&tk, ks, 4, k, (size_t)AL * AT * AHKV * AD);
    c.q = &tq;
    c.k = &tk;
    c.has_pairing = 1;
    c.pairing = pairing;
    c.has_window = 1;
    c.window = 8;
    c.profile_name = (char *)name;
    req.body_case = FASA__V1__REQUEST__BODY_CALIBRATE;
    req.calibrate = &c;
    Fasa__V1__Response *r = wire_send(&req);
    ck_assert_msg(r->status == 0, "calibrate: %s", r->message);
    fasa__v1__response__free_unpacked(r, NULL);
    free(q);
    free(k);
}

static Fasa__V1__Response *s_create(const char *id, int dtype, int pairing, int gqa,
                                    const char *profile_name, const uint32_t *dense, int n_dense)
{
    Fasa__V1__Request req;
    Fasa__V1__CreateSession c;
    wire_create_init(&req, &c, id);
    c.has_dtype = dtype != 0;
    c.dtype = (Fasa__V1__DType)dtype;
    c.has_pairing = pairing != 0;
    c.pairing = (Fasa__V1__Pairing)pairing;
    c.has_gqa = gqa != 0;
    c.gqa = (Fasa__V1__Gqa)gqa;
    c.profile_name = (char *)profile_name;
    Fasa__V1__DenseLayers dl = FASA__V1__DENSE_LAYERS__INIT;
    if (dense) {
        dl.n_layers = (size_t)n_dense;
        dl.layers = (uint32_t *)dense;
        c.dense_layers = &dl;
    }
    return wire_send(&req);
}

static void s_append(const char *id, int n)
{
    test_rng rng = {3};
    const size_t count = (size_t)WIRE_L * n * WIRE_HKV * WIRE_D;
    float *k = test_alloc(count * sizeof(float)), *v = test_alloc(count * sizeof(float));
    test_fill(&rng, count, k, 1.0f);
    test_fill(&rng, count, v, 1.0f);
    Fasa__V1__Request req = FASA__V1__REQUEST__INIT;
    Fasa__V1__Append a = FASA__V1__APPEND__INIT;
    Fasa__V1__Tensor tk, tv;
    uint64_t sh[4] = {WIRE_L, (uint64_t)n, WIRE_HKV, WIRE_D};
    wire_tensor(&tk, sh, 4, k, count);
    wire_tensor(&tv, sh, 4, v, count);
    a.session_id = (char *)id;
    a.k = &tk;
    a.v = &tv;
    req.body_case = FASA__V1__REQUEST__BODY_APPEND;
    req.append = &a;
    Fasa__V1__Response *r = wire_send(&req);
    ck_assert_msg(r->status == 0, "append: %s", r->message);
    fasa__v1__response__free_unpacked(r, NULL);
    free(k);
    free(v);
}

static Fasa__V1__Response *s_list(void)
{
    Fasa__V1__Request req = FASA__V1__REQUEST__INIT;
    Fasa__V1__ListSessions ls = FASA__V1__LIST_SESSIONS__INIT;
    req.body_case = FASA__V1__REQUEST__BODY_LIST_SESSIONS;
    req.list_sessions = &ls;
    Fasa__V1__Response *r = wire_send(&req);
    ck_assert_msg(r->status == 0, "list_sessions: %s", r->message);
    ck_assert_int_eq(r->body_case, FASA__V1__RESPONSE__BODY_LIST_SESSIONS);
    return r;
}

static Fasa__V1__Response *s_delete(const char *name)
{
    Fasa__V1__Request req = FASA__V1__REQUEST__INIT;
    Fasa__V1__DeleteProfile dp = FASA__V1__DELETE_PROFILE__INIT;
    dp.profile_name = (char *)name;
    req.body_case = FASA__V1__REQUEST__BODY_DELETE_PROFILE;
    req.delete_profile = &dp;
    return wire_send(&req);
}

static Fasa__V1__Response *s_stats(const char *id)
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
    ck_abort_msg("no errors_by_code entry %d", (int)code);
    return 0;
}

static int s_profile_file_exists(const char *name)
{
    char stem[64], path[256];
    fasa_snapshot_stem(name, stem, sizeof(stem));
    snprintf(path, sizeof(path), "%s/%s.profile", s_dir, stem);
    struct stat st;
    return stat(path, &st) == 0;
}

START_TEST(test_list_and_delete)
{
    Fasa__V1__Response *r = s_list();
    ck_assert_uint_eq(r->list_sessions->n_sessions, 0);
    ck_assert_uint_eq(r->list_sessions->n_profile_names, 0);
    fasa__v1__response__free_unpacked(r, NULL);

    /* Made out of order: the list is ordered by id. */
    fasa__v1__response__free_unpacked(s_create("b", FASA__V1__DTYPE__F16, 0, 0, NULL, NULL, 0),
                                      NULL);
    fasa__v1__response__free_unpacked(s_create("a", 0, 0, 0, NULL, NULL, 0), NULL);
    s_append("a", 5);
    s_append("b", 7);
    s_calibrate("p2", FASA__V1__PAIRING__INTERLEAVED);
    s_calibrate("p1", FASA__V1__PAIRING__INTERLEAVED);
    r = s_list();
    const Fasa__V1__ListSessionsResult *l = r->list_sessions;
    ck_assert_uint_eq(l->n_sessions, 2);
    const char *ids[2] = {"a", "b"};
    const uint64_t len[2] = {5, 7}, elem[2] = {4, 2};
    for (int i = 0; i < 2; i++) {
        const Fasa__V1__SessionSummary *m = l->sessions[i];
        ck_assert_str_eq(m->session_id, ids[i]);
        ck_assert_uint_eq(m->n_layers, WIRE_L);
        ck_assert_uint_eq(m->n_heads, WIRE_H);
        ck_assert_uint_eq(m->n_kv_heads, WIRE_HKV);
        ck_assert_uint_eq(m->head_dim, WIRE_D);
        ck_assert_uint_eq(m->length, len[i]);
        ck_assert_uint_eq(m->kv_bytes, WIRE_L * len[i] * WIRE_HKV * WIRE_D * 2 * elem[i]);
        ck_assert(!m->has_profile);
    }
    ck_assert_int_eq(l->sessions[0]->dtype, FASA__V1__DTYPE__F32);
    ck_assert_int_eq(l->sessions[1]->dtype, FASA__V1__DTYPE__F16);
    ck_assert_uint_eq(l->n_profile_names, 2);
    ck_assert_str_eq(l->profile_names[0], "p1");
    ck_assert_str_eq(l->profile_names[1], "p2");
    fasa__v1__response__free_unpacked(r, NULL);
    /* Nothing was written by listing. */
    ck_assert(!s_profile_file_exists("p1"));

    /* Saved, then deleted: gone from the store and from the state dir. */
    ck_assert_int_ge(fasa_service_snapshot_changed(s_svc), 0);
    ck_assert(s_profile_file_exists("p1") && s_profile_file_exists("p2"));
    r = s_delete("p1");
    ck_assert_msg(r->status == 0, "delete_profile: %s", r->message);
    fasa__v1__response__free_unpacked(r, NULL);
    ck_assert(!s_profile_file_exists("p1"));
    ck_assert(s_profile_file_exists("p2"));
    wire_expect_error(s_delete("p1"), FASA__V1__STATUS__NOT_FOUND, "delete_profile.profile_name");
    wire_expect_error(s_delete("no such"), FASA__V1__STATUS__INVALID_ARGUMENT,
                      "delete_profile.profile_name");
    /* A session made from a profile, before it was deleted, keeps its own copy. */
    r = s_create("c", 0, 0, 0, "p2", NULL, 0);
    ck_assert_msg(r->status == 0, "create from p2: %s", r->message);
    fasa__v1__response__free_unpacked(r, NULL);
    r = s_delete("p2");
    ck_assert_int_eq(r->status, 0);
    fasa__v1__response__free_unpacked(r, NULL);
    wire_expect_error(s_create("d", 0, 0, 0, "p2", NULL, 0), FASA__V1__STATUS__NOT_FOUND,
                      "profile_name");
    r = s_stats("c");
    ck_assert(r->stats->session->has_profile);
    ck_assert_uint_eq(r->stats->n_profiles, 0);
    ck_assert_uint_eq(s_count_of(r->stats, "list_sessions"), 2);
    ck_assert_uint_eq(s_count_of(r->stats, "delete_profile"), 4);
    fasa__v1__response__free_unpacked(r, NULL);
    r = s_list();
    ck_assert_uint_eq(r->list_sessions->n_sessions, 3);
    ck_assert_str_eq(r->list_sessions->sessions[2]->session_id, "c");
    ck_assert(r->list_sessions->sessions[2]->has_profile);
    ck_assert_uint_eq(r->list_sessions->n_profile_names, 0);
    fasa__v1__response__free_unpacked(r, NULL);

    /* A restart restores no deleted profile. */
    s_new_service();
    int failed = -1;
    ck_assert_int_ge(fasa_service_restore(s_svc, &failed), 0);
    ck_assert_int_eq(failed, 0);
    r = s_list();
    ck_assert_uint_eq(r->list_sessions->n_profile_names, 0);
    fasa__v1__response__free_unpacked(r, NULL);
}
END_TEST

START_TEST(test_session_info_settings)
{
    const uint32_t dense1[1] = {1};
    Fasa__V1__Response *r =
        s_create("x", 0, FASA__V1__PAIRING__HALF, FASA__V1__GQA__SHARED, NULL, dense1, 1);
    ck_assert_msg(r->status == 0, "create: %s", r->message);
    fasa__v1__response__free_unpacked(r, NULL);
    r = s_stats("x");
    const Fasa__V1__SessionInfo *in = r->stats->session;
    ck_assert(in->has_pairing && in->has_gqa && in->dense_layers);
    ck_assert_int_eq(in->pairing, FASA__V1__PAIRING__HALF);
    ck_assert_int_eq(in->gqa, FASA__V1__GQA__SHARED);
    ck_assert_uint_eq(in->dense_layers->n_layers, 1);
    ck_assert_uint_eq(in->dense_layers->layers[0], 1);
    fasa__v1__response__free_unpacked(r, NULL);

    /* The defaults: interleaved, per-head, layer 0 dense; an empty list: none dense. */
    fasa__v1__response__free_unpacked(s_create("y", 0, 0, 0, NULL, NULL, 0), NULL);
    r = s_stats("y");
    in = r->stats->session;
    ck_assert_int_eq(in->pairing, FASA__V1__PAIRING__INTERLEAVED);
    ck_assert_int_eq(in->gqa, FASA__V1__GQA__PER_HEAD);
    ck_assert_uint_eq(in->dense_layers->n_layers, 1);
    ck_assert_uint_eq(in->dense_layers->layers[0], 0);
    fasa__v1__response__free_unpacked(r, NULL);
    fasa__v1__response__free_unpacked(s_create("z", 0, 0, 0, NULL, dense1, 0), NULL);
    r = s_stats("z");
    ck_assert_uint_eq(r->stats->session->dense_layers->n_layers, 0);
    fasa__v1__response__free_unpacked(r, NULL);

    /* A profile's pairing is the session's; an explicit different one is refused. */
    s_calibrate("half", FASA__V1__PAIRING__HALF);
    r = s_create("h", 0, 0, 0, "half", NULL, 0);
    ck_assert_msg(r->status == 0, "create with the half profile: %s", r->message);
    fasa__v1__response__free_unpacked(r, NULL);
    r = s_stats("h");
    ck_assert_int_eq(r->stats->session->pairing, FASA__V1__PAIRING__HALF);
    fasa__v1__response__free_unpacked(r, NULL);
    wire_expect_error(s_create("h2", 0, FASA__V1__PAIRING__INTERLEAVED, 0, "half", NULL, 0),
                      FASA__V1__STATUS__INVALID_ARGUMENT, "pairing");
}
END_TEST

START_TEST(test_refused_requests_counted)
{
    /* Not one payload frame (what fasa-server hands to fasa_service_refuse). */
    uint8_t *reply = NULL;
    size_t n = 0;
    ck_assert_int_eq(fasa_service_refuse(s_svc, 9, FASA_INVALID_ARGUMENT,
                                         "request: expected exactly one payload frame", 12, &reply,
                                         &n),
                     0);
    Fasa__V1__Response *r = fasa__v1__response__unpack(NULL, n, reply);
    free(reply);
    ck_assert_ptr_nonnull(r);
    ck_assert_int_eq(r->status, FASA__V1__STATUS__INVALID_ARGUMENT);
    ck_assert_uint_eq(r->request_id, 9);
    fasa__v1__response__free_unpacked(r, NULL);
    const fasa_service_event *ev = fasa_service_last_event(s_svc);
    ck_assert_str_eq(ev->kind, "undecodable");
    ck_assert_uint_eq(ev->seq, 1);
    ck_assert_uint_eq(ev->bytes_in, 12);
    /* A Ping without request_id (a required field): protocol_version 1, ping {}. */
    const uint8_t no_id[] = {0x08, 0x01, 0x52, 0x00};
    wire_expect_error(s_rt(no_id, sizeof(no_id)), FASA__V1__STATUS__INVALID_ARGUMENT, "request");
    ck_assert_str_eq(fasa_service_last_event(s_svc)->kind, "undecodable");
    ck_assert_uint_eq(fasa_service_last_event(s_svc)->seq, 2);
    /* A Ping that parses but is refused (payload too long) counts as a ping. */
    Fasa__V1__Request pr = FASA__V1__REQUEST__INIT;
    Fasa__V1__Ping ping = FASA__V1__PING__INIT;
    static uint8_t big[5000];
    ping.has_payload = 1;
    ping.payload.data = big;
    ping.payload.len = sizeof(big);
    pr.body_case = FASA__V1__REQUEST__BODY_PING;
    pr.ping = &ping;
    wire_expect_error(wire_send(&pr), FASA__V1__STATUS__INVALID_ARGUMENT, "ping.payload");
    ck_assert_str_eq(fasa_service_last_event(s_svc)->kind, "ping");

    /* The metrics' stats reply counts nothing. */
    ck_assert_int_eq(fasa_service_stats_reply(s_svc, &reply, &n), 0);
    r = fasa__v1__response__unpack(NULL, n, reply);
    free(reply);
    ck_assert_ptr_nonnull(r);
    ck_assert_int_eq(r->body_case, FASA__V1__RESPONSE__BODY_STATS);
    ck_assert_uint_eq(r->stats->requests, 3);
    fasa__v1__response__free_unpacked(r, NULL);

    r = s_stats(NULL);
    const Fasa__V1__StatsResult *st = r->stats;
    ck_assert_uint_eq(st->requests, 4);
    ck_assert_uint_eq(s_count_of(st, "undecodable"), 2);
    ck_assert_uint_eq(s_count_of(st, "ping"), 1);
    ck_assert_uint_eq(s_count_of(st, "stats"), 1);
    ck_assert_uint_eq(st->errors, 3);
    ck_assert_uint_eq(s_errors_of(st, FASA__V1__STATUS__INVALID_ARGUMENT), 3);
    uint64_t total = 0;
    for (size_t i = 0; i < st->n_requests_by_type; i++) total += st->requests_by_type[i]->count;
    ck_assert_uint_eq(total, st->requests);
    fasa__v1__response__free_unpacked(r, NULL);
}
END_TEST

Suite *admin_suite(void)
{
    const TTest *tests[] = {test_list_and_delete, test_session_info_settings,
                            test_refused_requests_counted, NULL};
    Suite *s = suite_create("admin");
    tcase_add_checked_fixture(test_add_case(s, "admin", 120, tests), s_setup, s_teardown);
    return s;
}

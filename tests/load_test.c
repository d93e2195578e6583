/* Bulk load (coord/load.h, worker/load_rows.h) on the embedded engine and through the
 * service: a load gives the same steps, bit for bit, as appends of the same rows; bad files
 * are refused with the file and field named and leave nothing stored; paths outside the
 * load root are refused. The MPI transport's load: tests/load_mpi_test.c. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fasa.pb-c.h"
#include "load.h"
#include "load_util.h"
#include "qkv.h"
#include "scan.h"
#include "service.h"

#define LT_L 3
#define LT_T 300
#define LT_NH 4
#define LT_NKV 2
#define LT_D 8
#define LT_BLOCK 32

static char s_root[256];

static void s_setup(void)
{
    snprintf(s_root, sizeof(s_root), "/tmp/fasa_load_test.%d", (int)getpid());
    mkdir(s_root, 0755);
}

static void s_teardown(void)
{
    char cmd[300];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", s_root);
    ck_assert_int_eq(system(cmd), 0);
}

static fasa_session_config s_cfg(int dtype)
{
    return (fasa_session_config){.n_layers = LT_L,
                                 .n_heads = LT_NH,
                                 .n_kv_heads = LT_NKV,
                                 .head_dim = LT_D,
                                 .pairing = FC_PAIRING_INTERLEAVED,
                                 .method = FASA_METHOD_DENSE,
                                 .budget = 24,
                                 .dtype = dtype};
}

static fasa_status s_load(fasa_engine_t *e, const char *id, const char *path, int check_only,
                          fasa_load_result *res, fasa_error *err)
{
    fasa_load_plan plan;
    fasa_status st = fasa_load_plan_open(path, s_root, LT_L, LT_NKV, LT_D, &plan, err);
    if (st) return st;
    st = fasa_engine_load(e, id, &plan, check_only, NULL, NULL, res, NULL, err);
    fasa_load_plan_free(&plan);
    return st;
}

/* Nothing stored: every layer empty, no bytes held or accounted on any shard. */
static void s_assert_empty(fasa_engine_t *e, const char *id, int n_shards)
{
    for (int l = 0; l < LT_L; l++) ck_assert_int_eq(fasa_engine_length(e, id, l), 0);
    ck_assert_int_eq(fasa_engine_kv_bytes(e, id), 0);
    fasa_shard_stats st[4];
    fasa_error err;
    ck_assert_int_eq(fasa_engine_shard_stats(e, id, st, &err), FASA_OK);
    for (int i = 0; i < n_shards; i++) {
        ck_assert_int_eq(st[i].rows, 0);
        ck_assert_int_eq(fasa_engine_shard_bytes(e, i), 0);
    }
}

/* Load vs append, at 1, 2 and 3 shards, f32 and f16 files into f32 and f16 sessions. */
START_TEST(test_load_equals_append)
{
    const size_t n = (size_t)LT_L * LT_T * LT_NKV * LT_D;
    float *k = test_alloc(n * 4), *v = test_alloc(n * 4);
    for (int f16 = 0; f16 < 2; f16++) {
        char dir[300];
        snprintf(dir, sizeof(dir), "%s/layers%d", s_root, f16);
        lt_make_layers(dir, LT_L, LT_T, LT_NKV, LT_D, f16, 11 + f16, k, v);
        for (int dtype = 0; dtype < 2; dtype++)
            for (int ns = 1; ns <= 3; ns++) {
                fasa_engine_t *a = fasa_engine_new(ns, LT_BLOCK),
                              *b = fasa_engine_new(ns, LT_BLOCK);
                const fasa_session_config c = s_cfg(dtype);
                fasa_error err;
                ck_assert_int_eq(fasa_engine_create(a, "s", &c, &err), FASA_OK);
                ck_assert_int_eq(fasa_engine_create(b, "s", &c, &err), FASA_OK);
                ck_assert_int_eq(fasa_engine_append(a, "s", -1, 0, LT_T, k, v, &err), FASA_OK);
                fasa_load_result res;
                ck_assert_msg(s_load(b, "s", dir, 0, &res, &err) == FASA_OK, "%s", err.msg);
                ck_assert_int_eq(res.length, LT_T);
                ck_assert_int_eq(res.file_bytes, (int64_t)n * 2 * (f16 ? 2 : 4));
                ck_assert_int_eq(res.stored_bytes, fasa_engine_kv_bytes(a, "s"));
                for (int l = 0; l < LT_L; l++)
                    ck_assert_int_eq(fasa_engine_length(b, "s", l), LT_T);
                for (int i = 0; i < ns; i++)
                    ck_assert_int_eq(fasa_engine_shard_bytes(a, i), fasa_engine_shard_bytes(b, i));
                fasa_shard_stats sa[3], sb[3];
                ck_assert_int_eq(fasa_engine_shard_stats(a, "s", sa, &err), FASA_OK);
                ck_assert_int_eq(fasa_engine_shard_stats(b, "s", sb, &err), FASA_OK);
                for (int i = 0; i < ns; i++) {
                    ck_assert_int_eq(sa[i].rows, sb[i].rows);
                    ck_assert_int_eq(sa[i].alloc_bytes, sb[i].alloc_bytes);
                }
                ck_assert_int_gt(lt_same_steps(a, b, "s", LT_L, LT_T, LT_NH, LT_D, 5), 0);
                /* A step with k_new after the load continues where appends would. */
                fasa_engine_destroy(&a);
                fasa_engine_destroy(&b);
            }
    }
    free(k);
    free(v);
}
END_TEST

/* k.npy, v.npy of shape (L, T, H, D): the same as per-layer files. */
START_TEST(test_load_stacked)
{
    const size_t n = (size_t)LT_L * LT_T * LT_NKV * LT_D;
    float *k = test_alloc(n * 4), *v = test_alloc(n * 4);
    char dir[300], p[400];
    snprintf(dir, sizeof(dir), "%s/layers", s_root);
    lt_make_layers(dir, LT_L, LT_T, LT_NKV, LT_D, 0, 21, k, v);
    snprintf(dir, sizeof(dir), "%s/stacked", s_root);
    mkdir(dir, 0755);
    const int64_t shape[4] = {LT_L, LT_T, LT_NKV, LT_D};
    snprintf(p, sizeof(p), "%s/k.npy", dir);
    lt_write_npy(p, 0, 4, shape, k);
    snprintf(p, sizeof(p), "%s/v.npy", dir);
    lt_write_npy(p, 0, 4, shape, v);
    fasa_engine_t *a = fasa_engine_new(2, LT_BLOCK), *b = fasa_engine_new(2, LT_BLOCK);
    const fasa_session_config c = s_cfg(0);
    fasa_error err;
    fasa_load_result res;
    ck_assert_int_eq(fasa_engine_create(a, "s", &c, &err), FASA_OK);
    ck_assert_int_eq(fasa_engine_create(b, "s", &c, &err), FASA_OK);
    ck_assert_int_eq(fasa_engine_append(a, "s", -1, 0, LT_T, k, v, &err), FASA_OK);
    ck_assert_msg(s_load(b, "s", dir, 0, &res, &err) == FASA_OK, "%s", err.msg);
    lt_same_steps(a, b, "s", LT_L, LT_T, LT_NH, LT_D, 6);
    fasa_engine_destroy(&a);
    fasa_engine_destroy(&b);
    free(k);
    free(v);
}
END_TEST

/* The recorded QKV1 dump, loaded, against its k and v appended (client/qkv.c reads it). */
START_TEST(test_load_qkv1)
{
    char path[512], err_text[256];
    snprintf(path, sizeof(path), "%s/data/models/stories260K/golden/tinystories_T2048.qkv",
             test_shared_dir());
    fasa_qkv x;
    ck_assert_msg(fasa_qkv_load(path, &x, err_text, sizeof(err_text)) == 0, "%s", err_text);
    const fasa_activations *a = &x.act;
    const fasa_session_config c = {.n_layers = a->n_layers,
                                   .n_heads = a->n_heads,
                                   .n_kv_heads = a->n_kv_heads,
                                   .head_dim = a->head_dim,
                                   .method = FASA_METHOD_DENSE,
                                   .budget = 24};
    fasa_engine_t *e1 = fasa_engine_new(2, 256), *e2 = fasa_engine_new(2, 256);
    fasa_error err;
    ck_assert_int_eq(fasa_engine_create(e1, "g", &c, &err), FASA_OK);
    ck_assert_int_eq(fasa_engine_create(e2, "g", &c, &err), FASA_OK);
    for (int l = 0; l < a->n_layers; l++)
        ck_assert_int_eq(fasa_engine_append(e1, "g", l, 0, a->n_tokens, a->k[l], a->v[l], &err),
                         FASA_OK);
    fasa_load_plan plan;
    /* No root restriction here: the data lies outside this test's root. */
    ck_assert_msg(fasa_load_plan_open(path, NULL, a->n_layers, a->n_kv_heads, a->head_dim, &plan,
                                      &err) == FASA_OK,
                  "%s", err.msg);
    ck_assert_str_eq(plan.format, "qkv1");
    ck_assert_int_eq(plan.T, a->n_tokens);
    ck_assert_int_eq(fasa_engine_load(e2, "g", &plan, 0, NULL, NULL, NULL, NULL, &err), FASA_OK);
    fasa_load_plan_free(&plan);
    lt_same_steps(e1, e2, "g", a->n_layers, a->n_tokens, a->n_heads, a->head_dim, 7);
    /* A dump whose geometry is not the session's is refused, naming the field. */
    ck_assert_int_eq(
        fasa_load_plan_open(path, NULL, a->n_layers, a->n_kv_heads + 1, a->head_dim, &plan, &err),
        FASA_INVALID_ARGUMENT);
    ck_assert_msg(strstr(err.msg, "tinystories_T2048.qkv") && strstr(err.msg, "n_kv_heads"), "%s",
                  err.msg);
    fasa_engine_destroy(&e1);
    fasa_engine_destroy(&e2);
    fasa_qkv_cleanup(&x);
}
END_TEST

/* Expects a load of dir into a fresh 2-shard session to fail with code and a message
 * holding want1 and want2, storing nothing; then a good load works and equals appends. */
static void s_expect_bad(const char *dir, int dtype, fasa_status code, const char *want1,
                         const char *want2, const float *k, const float *v, const char *good)
{
    fasa_engine_t *e = fasa_engine_new(2, LT_BLOCK);
    const fasa_session_config c = s_cfg(dtype);
    fasa_error err;
    ck_assert_int_eq(fasa_engine_create(e, "s", &c, &err), FASA_OK);
    const fasa_status st = s_load(e, "s", dir, 0, NULL, &err);
    ck_assert_msg(st == code, "%s: status %d (want %d): %s", dir, st, code, err.msg);
    ck_assert_msg(strstr(err.msg, want1) && (!want2 || strstr(err.msg, want2)),
                  "message '%s' lacks '%s' / '%s'", err.msg, want1, want2 ? want2 : "");
    s_assert_empty(e, "s", 2);
    if (good) {
        fasa_engine_t *a = fasa_engine_new(2, LT_BLOCK);
        ck_assert_int_eq(fasa_engine_create(a, "s", &c, &err), FASA_OK);
        ck_assert_int_eq(fasa_engine_append(a, "s", -1, 0, LT_T, k, v, &err), FASA_OK);
        ck_assert_msg(s_load(e, "s", good, 0, NULL, &err) == FASA_OK, "%s", err.msg);
        lt_same_steps(a, e, "s", LT_L, LT_T, LT_NH, LT_D, 8);
        fasa_engine_destroy(&a);
    }
    fasa_engine_destroy(&e);
}

START_TEST(test_load_bad_files)
{
    const size_t n = (size_t)LT_L * LT_T * LT_NKV * LT_D, per = (size_t)LT_T * LT_NKV * LT_D;
    float *k = test_alloc(n * 4), *v = test_alloc(n * 4);
    char good[300], bad[300], p[400], cmd[1000];
    snprintf(good, sizeof(good), "%s/good", s_root);
    lt_make_layers(good, LT_L, LT_T, LT_NKV, LT_D, 0, 31, k, v);
    snprintf(bad, sizeof(bad), "%s/bad", s_root);
#define FRESH()                                                                                    \
    do {                                                                                           \
        snprintf(cmd, sizeof(cmd), "rm -rf '%s' && cp -r '%s' '%s'", bad, good, bad);              \
        ck_assert_int_eq(system(cmd), 0);                                                          \
    } while (0)
    const int64_t wrong[3] = {LT_T, LT_NKV + 1, LT_D};
    /* A shape that is not (T, n_kv_heads, head_dim). */
    FRESH();
    snprintf(p, sizeof(p), "%s/k_1.npy", bad);
    float *big = test_alloc((size_t)LT_T * (LT_NKV + 1) * LT_D * 4);
    lt_write_npy(p, 0, 3, wrong, big);
    s_expect_bad(bad, 0, FASA_INVALID_ARGUMENT, "k_1.npy", "shape", k, v, good);
    /* A dtype other than <f4 / <f2. */
    FRESH();
    snprintf(p, sizeof(p), "%s/v_0.npy", bad);
    lt_write_raw_npy(p, "{'descr': '<f8', 'fortran_order': False, 'shape': (300, 2, 8), }", v,
                     per * 8 > n * 4 ? n * 4 : per * 8);
    s_expect_bad(bad, 0, FASA_INVALID_ARGUMENT, "v_0.npy", "descr", k, v, NULL);
    /* Fortran order. */
    FRESH();
    snprintf(p, sizeof(p), "%s/v_2.npy", bad);
    lt_write_raw_npy(p, "{'descr': '<f4', 'fortran_order': True, 'shape': (300, 2, 8), }", v,
                     per * 4);
    s_expect_bad(bad, 0, FASA_INVALID_ARGUMENT, "v_2.npy", "fortran_order", k, v, NULL);
    /* A file shorter than its header says. */
    FRESH();
    snprintf(p, sizeof(p), "%s/k_2.npy", bad);
    lt_write_raw_npy(p, "{'descr': '<f4', 'fortran_order': False, 'shape': (300, 2, 8), }",
                     k + 2 * per, per * 4 - 64);
    s_expect_bad(bad, 0, FASA_INVALID_ARGUMENT, "k_2.npy", "promises", k, v, NULL);
    /* T differs between files. */
    FRESH();
    snprintf(p, sizeof(p), "%s/v_1.npy", bad);
    const int64_t shorter[3] = {LT_T - 1, LT_NKV, LT_D};
    lt_write_npy(p, 0, 3, shorter, v + per);
    s_expect_bad(bad, 0, FASA_INVALID_ARGUMENT, "v_1.npy", "same T", k, v, NULL);
    /* A missing file, and a layer too many. */
    FRESH();
    snprintf(p, sizeof(p), "%s/v_1.npy", bad);
    unlink(p);
    s_expect_bad(bad, 0, FASA_NOT_FOUND, "v_1.npy", NULL, k, v, NULL);
    FRESH();
    snprintf(cmd, sizeof(cmd), "cp '%s/k_0.npy' '%s/k_3.npy'", bad, bad);
    ck_assert_int_eq(system(cmd), 0);
    s_expect_bad(bad, 0, FASA_INVALID_ARGUMENT, "k_3.npy", "3 layers", k, v, NULL);
    /* Bad values, found by the shard reading them: the layers and shards already loaded
     * are undone. Row 250 of layer 2 lies in block 7, on shard 1 of 2. */
    float *bv = test_alloc(per * 4);
    const int64_t shape[3] = {LT_T, LT_NKV, LT_D};
    FRESH();
    memcpy(bv, v + 2 * per, per * 4);
    bv[250 * LT_NKV * LT_D + 5] = NAN;
    snprintf(p, sizeof(p), "%s/v_2.npy", bad);
    lt_write_npy(p, 0, 3, shape, bv);
    s_expect_bad(bad, 0, FASA_INVALID_ARGUMENT, "v_2.npy", "row 250 element 5", k, v, good);
    FRESH();
    memcpy(bv, k + per, per * 4);
    bv[3 * LT_NKV * LT_D] = 1e20f;
    snprintf(p, sizeof(p), "%s/k_1.npy", bad);
    lt_write_npy(p, 0, 3, shape, bv);
    s_expect_bad(bad, 0, FASA_INVALID_ARGUMENT, "k_1.npy", "below 2^50", k, v, NULL);
    /* A value that overflows an f16 session (but is fine for f32). */
    FRESH();
    memcpy(bv, k, per * 4);
    bv[299 * LT_NKV * LT_D + 15] = 70000.0f;
    snprintf(p, sizeof(p), "%s/k_0.npy", bad);
    lt_write_npy(p, 0, 3, shape, bv);
    s_expect_bad(bad, 1, FASA_INVALID_ARGUMENT, "k_0.npy", "overflows f16", k, v, NULL);
    {
        /* check_only finds the same, and stores nothing when the files are good. */
        fasa_engine_t *e = fasa_engine_new(2, LT_BLOCK);
        const fasa_session_config c = s_cfg(1);
        fasa_error err;
        fasa_load_result res;
        ck_assert_int_eq(fasa_engine_create(e, "s", &c, &err), FASA_OK);
        ck_assert_int_eq(s_load(e, "s", bad, 1, &res, &err), FASA_INVALID_ARGUMENT);
        ck_assert_msg(strstr(err.msg, "row 299 element 15"), "%s", err.msg);
        ck_assert_int_eq(s_load(e, "s", good, 1, &res, &err), FASA_OK);
        ck_assert_int_eq(res.length, LT_T);
        ck_assert_int_eq(res.stored_bytes, 0);
        ck_assert_int_eq(res.file_bytes, (int64_t)n * 8);
        s_assert_empty(e, "s", 2);
        /* A session holding tokens is refused; so is a load over the memory limit. */
        ck_assert_int_eq(fasa_engine_append(e, "s", -1, 0, 1, k, v, &err), FASA_OK);
        ck_assert_int_eq(s_load(e, "s", good, 0, NULL, &err), FASA_FAILED_PRECONDITION);
        ck_assert_msg(strstr(err.msg, "already holds tokens"), "%s", err.msg);
        ck_assert_int_eq(fasa_engine_drop(e, "s", &err), FASA_OK);
        ck_assert_int_eq(fasa_engine_create(e, "s", &c, &err), FASA_OK);
        fasa_engine_set_memory_limit(e, 4096);
        ck_assert_int_eq(s_load(e, "s", good, 0, NULL, &err), FASA_RESOURCE_EXHAUSTED);
        ck_assert_msg(strstr(err.msg, "memory limit"), "%s", err.msg);
        s_assert_empty(e, "s", 2);
        fasa_engine_destroy(&e);
    }
#undef FRESH
    free(bv);
    free(big);
    free(k);
    free(v);
}
END_TEST

/* Paths: relative ones under the root; anything that leads outside it refused. */
START_TEST(test_load_resolve)
{
    char out[LOAD_MAX_PATH], dir[300], p[600];
    fasa_error err;
    snprintf(dir, sizeof(dir), "%s/d", s_root);
    mkdir(dir, 0755);
    ck_assert_int_eq(fasa_load_resolve(s_root, "d", out, sizeof(out), &err), FASA_OK);
    ck_assert_str_eq(out, dir);
    ck_assert_int_eq(fasa_load_resolve(s_root, dir, out, sizeof(out), &err), FASA_OK);
    ck_assert_int_eq(fasa_load_resolve(s_root, "../", out, sizeof(out), &err),
                     FASA_INVALID_ARGUMENT);
    ck_assert_msg(strstr(err.msg, "outside the server's --load-root"), "%s", err.msg);
    ck_assert_int_eq(fasa_load_resolve(s_root, "/etc", out, sizeof(out), &err),
                     FASA_INVALID_ARGUMENT);
    ck_assert_int_eq(fasa_load_resolve(s_root, "/etc/nonexistent-x", out, sizeof(out), &err),
                     FASA_INVALID_ARGUMENT);
    ck_assert_int_eq(fasa_load_resolve(s_root, "nope", out, sizeof(out), &err), FASA_NOT_FOUND);
    ck_assert_int_eq(fasa_load_resolve(NULL, "d", out, sizeof(out), &err),
                     FASA_FAILED_PRECONDITION);
    ck_assert_msg(strstr(err.msg, "--load-root"), "%s", err.msg);
    /* A link inside the root to a directory outside it. */
    snprintf(p, sizeof(p), "%s/escape", s_root);
    ck_assert_int_eq(symlink("/tmp", p), 0);
    ck_assert_int_eq(fasa_load_resolve(s_root, "escape", out, sizeof(out), &err),
                     FASA_INVALID_ARGUMENT);
    /* A file in a good directory that links outside the root. */
    const size_t n = (size_t)LT_L * LT_T * LT_NKV * LT_D;
    float *k = test_alloc(n * 4), *v = test_alloc(n * 4);
    char outside[300];
    snprintf(outside, sizeof(outside), "%s.outside", s_root);
    lt_make_layers(outside, LT_L, LT_T, LT_NKV, LT_D, 0, 41, k, v);
    lt_make_layers(dir, LT_L, LT_T, LT_NKV, LT_D, 0, 41, k, v);
    snprintf(p, sizeof(p), "%s/v_1.npy", dir);
    unlink(p);
    char target[400];
    snprintf(target, sizeof(target), "%s/v_1.npy", outside);
    ck_assert_int_eq(symlink(target, p), 0);
    fasa_load_plan plan;
    ck_assert_int_eq(fasa_load_plan_open(dir, s_root, LT_L, LT_NKV, LT_D, &plan, &err),
                     FASA_INVALID_ARGUMENT);
    ck_assert_msg(strstr(err.msg, "v_1.npy") && strstr(err.msg, "outside"), "%s", err.msg);
    snprintf(p, sizeof(p), "rm -rf '%s'", outside);
    ck_assert_int_eq(system(p), 0);
    free(k);
    free(v);
}
END_TEST

static Fasa__V1__Response *s_handle(fasa_service *svc, Fasa__V1__Request *req)
{
    req->protocol_version = 1;
    req->request_id = 7;
    const size_t len = fasa__v1__request__get_packed_size(req);
    uint8_t *buf = test_alloc(len), *reply = NULL;
    fasa__v1__request__pack(req, buf);
    size_t n = 0;
    int shutdown = 0;
    ck_assert_int_eq(fasa_service_handle(svc, buf, len, &reply, &n, &shutdown), 0);
    free(buf);
    Fasa__V1__Response *r = fasa__v1__response__unpack(NULL, n, reply);
    free(reply);
    ck_assert_ptr_nonnull(r);
    return r;
}

static Fasa__V1__Response *s_load_req(fasa_service *svc, const char *id, const char *path)
{
    Fasa__V1__LoadSession ls = FASA__V1__LOAD_SESSION__INIT;
    ls.session_id = (char *)id;
    ls.path = (char *)path;
    Fasa__V1__Request req = FASA__V1__REQUEST__INIT;
    req.body_case = FASA__V1__REQUEST__BODY_LOAD_SESSION;
    req.load_session = &ls;
    return s_handle(svc, &req);
}

/* LoadSession through the service: the result's figures, the load root, the errors. */
START_TEST(test_load_service)
{
    const size_t n = (size_t)LT_L * LT_T * LT_NKV * LT_D;
    float *k = test_alloc(n * 4), *v = test_alloc(n * 4);
    char dir[300];
    snprintf(dir, sizeof(dir), "%s/svc", s_root);
    lt_make_layers(dir, LT_L, LT_T, LT_NKV, LT_D, 1, 51, k, v);
    for (int with_root = 0; with_root < 2; with_root++) {
        const fasa_service_opts o = {
            .n_ranks = 1, .max_message = 1 << 20, .load_root = with_root ? s_root : NULL};
        fasa_engine_t *e = fasa_engine_new(2, LT_BLOCK);
        fasa_service *svc = fasa_service_new(&e, 2, &o);
        ck_assert_ptr_nonnull(svc);
        Fasa__V1__CreateSession cs = FASA__V1__CREATE_SESSION__INIT;
        cs.session_id = "s";
        cs.n_layers = LT_L, cs.n_heads = LT_NH, cs.n_kv_heads = LT_NKV, cs.head_dim = LT_D;
        cs.has_dtype = 1, cs.dtype = FASA__V1__DTYPE__F16;
        Fasa__V1__Request req = FASA__V1__REQUEST__INIT;
        req.body_case = FASA__V1__REQUEST__BODY_CREATE_SESSION;
        req.create_session = &cs;
        Fasa__V1__Response *r = s_handle(svc, &req);
        ck_assert_int_eq(r->status, 0);
        fasa__v1__response__free_unpacked(r, NULL);
        r = s_load_req(svc, "s", "svc");
        if (!with_root) {
            ck_assert_int_eq(r->status, FASA__V1__STATUS__FAILED_PRECONDITION);
            ck_assert_msg(strstr(r->message, "--load-root"), "%s", r->message);
        } else {
            ck_assert_msg(r->status == 0, "%s", r->message);
            ck_assert_int_eq(r->body_case, FASA__V1__RESPONSE__BODY_LOAD_SESSION);
            const Fasa__V1__LoadSessionResult *lr = r->load_session;
            ck_assert_uint_eq(lr->length, LT_T);
            ck_assert_uint_eq(lr->stored_bytes, n * 2 * 2);
            ck_assert_uint_eq(lr->file_bytes, n * 2 * 2);
            ck_assert_str_eq(lr->format, "npy");
            ck_assert_uint_eq(lr->n_shards, 2);
            ck_assert_uint_eq(lr->shards[0]->rows + lr->shards[1]->rows, (uint64_t)LT_T * LT_L);
            /* Blocks of 32: shard 0 holds blocks 0, 2, .., 8 (5 x 32 rows) of each layer. */
            ck_assert_uint_eq(lr->shards[0]->rows, 5 * 32 * LT_L);
            ck_assert_uint_eq(lr->shards[0]->file_bytes + lr->shards[1]->file_bytes,
                              lr->file_bytes);
        }
        fasa__v1__response__free_unpacked(r, NULL);
        if (with_root) {
            /* Outside the root, an unknown session, a non-empty session. */
            r = s_load_req(svc, "s", "/etc");
            ck_assert_int_eq(r->status, FASA__V1__STATUS__INVALID_ARGUMENT);
            ck_assert_msg(strstr(r->message, "outside"), "%s", r->message);
            fasa__v1__response__free_unpacked(r, NULL);
            r = s_load_req(svc, "nope", "svc");
            ck_assert_int_eq(r->status, FASA__V1__STATUS__NOT_FOUND);
            fasa__v1__response__free_unpacked(r, NULL);
            r = s_load_req(svc, "s", "svc");
            ck_assert_int_eq(r->status, FASA__V1__STATUS__FAILED_PRECONDITION);
            fasa__v1__response__free_unpacked(r, NULL);
        }
        fasa_service_destroy(&svc);
    }
    free(k);
    free(v);
}
END_TEST

/* ---- shard_load_layer against its reference, shard by shard ---- */

/* Writes n elements of x to path raw, as f32 or (f16 nonzero) f16, and the source. */
static load_src s_raw_src(const char *path, int f16, size_t n, size_t row, const float *x)
{
    uint16_t *h = f16 ? test_alloc(n * 2 + 2) : NULL;
    for (size_t i = 0; f16 && i < n; i++) h[i] = fasa_f32_to_f16(x[i]);
    FILE *f = fopen(path, "wb");
    ck_assert_ptr_nonnull(f);
    ck_assert_uint_eq(fwrite(f16 ? (const void *)h : (const void *)x, f16 ? 2 : 4, n, f), n);
    ck_assert_int_eq(fclose(f), 0);
    free(h);
    load_src src = {.offset = 0,
                    .stride = (int64_t)row * (f16 ? 2 : 4),
                    .dtype = f16 ? FASA_DTYPE_F16 : FASA_DTYPE_F32};
    snprintf(src.path, sizeof(src.path), "%s", path);
    return src;
}

/* A layout of L layers, H KV heads (one query head each), head_dim D in dtype dt: plain,
 * or (packed) each KV head's dims reversed with the first 5 dominant, and a scoring copy
 * of score_dtype sd. */
static void s_layout(shard_layout *lay, int L, int H, int D, int dt, int packed, int sd)
{
    ck_assert_int_eq(shard_layout_plain(lay, L, H, H, D), 0);
    lay->dtype = dt;
    lay->score_dtype = sd;
    if (!packed) return;
    for (int i = 0; i < L * H; i++) {
        lay->n_dom[i] = 5;
        for (int p = 0; p < D; p++) lay->perm[(size_t)i * D + p] = D - 1 - p;
    }
    for (size_t i = 0; i < (size_t)L * H * D; i++) lay->qmask[i] = (i % D) < 5;
}

/* Runs job on two fresh shards of lay, fast and naive: both succeed or both fail the same
 * way, with the same store and the same figures. */
static void s_fast_vs_naive(const shard_layout *lay, const load_job *job, int want_err)
{
    shard_t *a = shard_new(lay), *b = shard_new(lay);
    ck_assert_ptr_nonnull(a);
    ck_assert_ptr_nonnull(b);
    load_report ra, rb;
    const int rca = shard_load_layer(a, job, &ra), rcb = shard_load_layer_naive(b, job, &rb);
    ck_assert_int_eq(rca, rcb);
    ck_assert_int_eq(ra.err, want_err);
    ck_assert_int_eq(ra.err, rb.err);
    if (want_err == LOAD_OK) {
        ck_assert_int_eq(ra.rows, rb.rows);
        ck_assert_int_eq(ra.file_bytes, rb.file_bytes);
        ck_assert_int_eq(shard_rows(a, job->layer), job->check_only ? 0 : (int)ra.rows);
        ck_assert_msg(shard_store_equal(a, b), "fast and naive loads stored different bits");
    } else {
        ck_assert_int_eq(ra.which, rb.which);
        ck_assert_int_eq(ra.row, rb.row);
        if (want_err == LOAD_EVALUE) {
            ck_assert_int_eq(ra.elem, rb.elem);
            ck_assert_int_eq(isnan(ra.value), isnan(rb.value));
            if (!isnan(ra.value)) ck_assert_float_eq(ra.value, rb.value);
        }
    }
    shard_destroy(&a);
    shard_destroy(&b);
}

/* Every file dtype pair into every store dtype, plain and packed layouts (with an int8
 * scoring copy), 1 and 3 shards; blocks read in several chunks; then bad values, short
 * files and a missing file, reported alike. */
START_TEST(test_load_fast_vs_naive)
{
    enum { L = 2, H = 3, D = 16, T = 1500, B = 160 };
    const size_t row = (size_t)H * D, n = (size_t)T * row;
    float *k = test_alloc(n * 4), *v = test_alloc(n * 4);
    test_rng rng = {77};
    test_fill(&rng, n, k, 2.0f);
    test_fill(&rng, n, v, 2.0f);
    char pk[320], pv[320];
    for (int kf = 0; kf < 2; kf++)
        for (int vf = 0; vf < 2; vf++) {
            snprintf(pk, sizeof(pk), "%s/fk%d", s_root, kf);
            snprintf(pv, sizeof(pv), "%s/fv%d", s_root, vf);
            const load_src ks = s_raw_src(pk, kf, n, row, k), vs = s_raw_src(pv, vf, n, row, v);
            for (int dt = 0; dt <= FASA_DTYPE_LAST; dt++)
                for (int packed = 0; packed < 2; packed++) {
                    shard_layout lay;
                    s_layout(&lay, L, H, D, dt, packed, packed ? SCAN_I8 : SCAN_AUTO);
                    for (int S = 1; S <= 3; S += 2)
                        for (int sh = 0; sh < S; sh++)
                            for (int co = 0; co < 2; co++) {
                                const load_job job = {.layer = 1,
                                                      .block = B,
                                                      .n_shards = S,
                                                      .shard = sh,
                                                      .T = T,
                                                      .check_only = co,
                                                      .k = ks,
                                                      .v = vs};
                                s_fast_vs_naive(&lay, &job, LOAD_OK);
                            }
                    shard_layout_cleanup(&lay);
                }
        }
    /* Bad values: nan in the keys, inf in the values, 2^51, and 70000 (overflows f16, not
     * bf16 or f32), in rows of the second shard of 3. */
    const struct {
        int which;
        size_t at;
        float x;
    } bad[] = {{0, 700 * row + 7, NAN},
               {1, 650 * row + 3, INFINITY},
               {0, 1200 * row + 40, 0x1p51f},
               {1, 170 * row + 1, 70000.0f}};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        for (int f16 = 0; f16 < 2; f16++) {
            float *x = bad[i].which ? v : k, keep = x[bad[i].at];
            x[bad[i].at] = bad[i].x;
            snprintf(pk, sizeof(pk), "%s/bk", s_root);
            snprintf(pv, sizeof(pv), "%s/bv", s_root);
            const load_src ks = s_raw_src(pk, f16, n, row, k), vs = s_raw_src(pv, f16, n, row, v);
            x[bad[i].at] = keep;
            for (int dt = 0; dt <= FASA_DTYPE_LAST; dt++) {
                shard_layout lay;
                s_layout(&lay, L, H, D, dt, 0, SCAN_AUTO);
                /* The value the file holds, and the rule (finite, below 2^50, no overflow
                 * of the store) applied to it. */
                const float fv = f16 ? fasa_f16_to_f32(fasa_f32_to_f16(bad[i].x)) : bad[i].x;
                const int refused = !isfinite(fv) || fabsf(fv) >= 0x1p50f ||
                                    (dt == FASA_DTYPE_F16 && fabsf(fv) >= 65520.0f);
                for (int co = 0; co < 2; co++) {
                    const load_job job = {.layer = 0,
                                          .block = B,
                                          .n_shards = 3,
                                          .shard = 1,
                                          .T = T,
                                          .check_only = co,
                                          .k = ks,
                                          .v = vs};
                    s_fast_vs_naive(&lay, &job, refused ? LOAD_EVALUE : LOAD_OK);
                }
                shard_layout_cleanup(&lay);
            }
        }
    /* Rows of 1 KB (f32) and 512 B (f16): chunks of 512 and 1024 rows, so blocks of 1200
     * are read in several chunks, the last one short. */
    {
        enum { H2 = 2, D2 = 128, T2 = 3000, B2 = 1200 };
        const size_t row2 = (size_t)H2 * D2, n2 = (size_t)T2 * row2;
        float *k2 = test_alloc(n2 * 4), *v2 = test_alloc(n2 * 4);
        test_fill(&rng, n2, k2, 2.0f);
        test_fill(&rng, n2, v2, 2.0f);
        for (int f16 = 0; f16 < 2; f16++) {
            snprintf(pk, sizeof(pk), "%s/wk", s_root);
            snprintf(pv, sizeof(pv), "%s/wv", s_root);
            const load_src ks = s_raw_src(pk, f16, n2, row2, k2),
                           vs = s_raw_src(pv, f16, n2, row2, v2);
            for (int packed = 0; packed < 2; packed++) {
                shard_layout lay;
                s_layout(&lay, 1, H2, D2, FASA_DTYPE_F16, packed, SCAN_AUTO);
                for (int S = 1; S <= 3; S += 2)
                    for (int sh = 0; sh < S; sh++) {
                        const load_job job = {.layer = 0,
                                              .block = B2,
                                              .n_shards = S,
                                              .shard = sh,
                                              .T = T2,
                                              .k = ks,
                                              .v = vs};
                        s_fast_vs_naive(&lay, &job, LOAD_OK);
                    }
                shard_layout_cleanup(&lay);
            }
        }
        free(k2);
        free(v2);
    }
    /* A file shorter than T rows, and one that is not there. */
    snprintf(pk, sizeof(pk), "%s/sk", s_root);
    snprintf(pv, sizeof(pv), "%s/sv", s_root);
    const load_src ks = s_raw_src(pk, 1, n, row, k),
                   vs = s_raw_src(pv, 1, n - 900 * row + 5, row, v);
    shard_layout lay;
    s_layout(&lay, L, H, D, FASA_DTYPE_F16, 0, SCAN_AUTO);
    load_job job = {.layer = 0, .block = B, .n_shards = 2, .shard = 1, .T = T, .k = ks, .v = vs};
    s_fast_vs_naive(&lay, &job, LOAD_ESHORT);
    snprintf(job.k.path, sizeof(job.k.path), "%s/none", s_root);
    s_fast_vs_naive(&lay, &job, LOAD_EIO);
    shard_layout_cleanup(&lay);
    free(k);
    free(v);
}
END_TEST

Suite *load_suite(void)
{
    Suite *s = suite_create("load");
    TCase *tc = tcase_create("load");
    tcase_add_checked_fixture(tc, s_setup, s_teardown);
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, test_load_equals_append);
    tcase_add_test(tc, test_load_stacked);
    tcase_add_test(tc, test_load_qkv1);
    tcase_add_test(tc, test_load_bad_files);
    tcase_add_test(tc, test_load_resolve);
    tcase_add_test(tc, test_load_service);
    tcase_add_test(tc, test_load_fast_vs_naive);
    suite_add_tcase(s, tc);
    return s;
}

/* Bulk load over the MPI transport (mpiexec with 2 and 3 ranks: 1 and 2 workers): each
 * worker reads its own blocks from the files, and the steps equal, bit for bit, those of
 * the in-process engine with the same shards fed by appends; a bad value found by one
 * worker leaves every worker's shard empty, and a good load afterwards works. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <mpi.h>

#include "load.h"
#include "load_util.h"
#include "transport_mpi.h"
#include "worker_mpi.h"

#define L 3
#define T 333
#define NH 4
#define NKV 2
#define D 8
#define BLOCK 32

static MPI_Comm s_comm;
/* One MPI engine for every test: destroying it stops the workers. */
static fasa_engine_t *s_mpi;

static fasa_engine_t *s_mpi_engine(void)
{
    if (!s_mpi) {
        fasa_transport t;
        ck_assert_int_eq(fasa_transport_mpi(&t, s_comm), 0);
        s_mpi = fasa_engine_new_with(&t, BLOCK);
        ck_assert_ptr_nonnull(s_mpi);
    }
    return s_mpi;
}
static int s_n_workers;
static char s_dir[256];

static fasa_status s_load(fasa_engine_t *e, const char *dir, load_report *per_shard,
                          fasa_error *err)
{
    fasa_load_plan plan;
    fasa_status st = fasa_load_plan_open(dir, NULL, L, NKV, D, &plan, err);
    if (st) return st;
    fasa_load_result res;
    st = fasa_engine_load(e, "s", &plan, 0, NULL, NULL, &res, per_shard, err);
    if (!st) ck_assert_int_eq(res.length, T);
    fasa_load_plan_free(&plan);
    return st;
}

START_TEST(test_mpi_load)
{
    const size_t n = (size_t)L * T * NKV * D, per = (size_t)T * NKV * D;
    float *k = test_alloc(n * 4), *v = test_alloc(n * 4);
    char good[300], bad[300], p[400];
    snprintf(good, sizeof(good), "%s/good", s_dir);
    snprintf(bad, sizeof(bad), "%s/bad", s_dir);
    lt_make_layers(good, L, T, NKV, D, 1, 61, k, v);
    lt_make_layers(bad, L, T, NKV, D, 1, 61, k, v);
    /* A NaN in the last block of layer 1 (on the last worker). */
    float *bk = test_alloc(per * 4);
    memcpy(bk, k + per, per * 4);
    bk[(T - 1) * NKV * D + 3] = NAN;
    const int64_t shape[3] = {T, NKV, D};
    snprintf(p, sizeof(p), "%s/k_1.npy", bad);
    lt_write_npy(p, 1, 3, shape, bk);
    free(bk);

    fasa_engine_t *m = s_mpi_engine(), *a = fasa_engine_new(s_n_workers, BLOCK);
    const fasa_session_config c = {.n_layers = L,
                                   .n_heads = NH,
                                   .n_kv_heads = NKV,
                                   .head_dim = D,
                                   .method = FASA_METHOD_DENSE,
                                   .budget = 24,
                                   .dtype = 1};
    fasa_error err;
    ck_assert_int_eq(fasa_engine_create(m, "s", &c, &err), FASA_OK);
    ck_assert_int_eq(fasa_engine_create(a, "s", &c, &err), FASA_OK);
    ck_assert_int_eq(fasa_engine_append(a, "s", -1, 0, T, k, v, &err), FASA_OK);

    load_report rep[8];
    ck_assert_int_eq(s_load(m, bad, rep, &err), FASA_INVALID_ARGUMENT);
    ck_assert_msg(strstr(err.msg, "k_1.npy") && strstr(err.msg, "row 332 element 3"), "%s",
                  err.msg);
    fasa_shard_stats st[8];
    ck_assert_int_eq(fasa_engine_shard_stats(m, "s", st, &err), FASA_OK);
    for (int i = 0; i < s_n_workers; i++) ck_assert_int_eq(st[i].rows, 0);
    for (int l = 0; l < L; l++) ck_assert_int_eq(fasa_engine_length(m, "s", l), 0);

    ck_assert_msg(s_load(m, good, rep, &err) == FASA_OK, "%s", err.msg);
    int64_t rows = 0;
    for (int i = 0; i < s_n_workers; i++) {
        ck_assert_int_gt(rep[i].rows, 0);
        ck_assert_int_eq(rep[i].file_bytes, rep[i].rows * NKV * D * 2 * 2);
        rows += rep[i].rows;
    }
    ck_assert_int_eq(rows, (int64_t)L * T);
    ck_assert_int_eq(fasa_engine_shard_stats(m, "s", st, &err), FASA_OK);
    fasa_shard_stats sa[8];
    ck_assert_int_eq(fasa_engine_shard_stats(a, "s", sa, &err), FASA_OK);
    for (int i = 0; i < s_n_workers; i++) {
        ck_assert_int_eq(st[i].rows, sa[i].rows);
        ck_assert_int_eq(st[i].alloc_bytes, sa[i].alloc_bytes);
    }
    ck_assert_int_gt(lt_same_steps(a, m, "s", L, T, NH, D, 9), 0);
    ck_assert_int_eq(fasa_engine_drop(m, "s", &err), FASA_OK);
    fasa_engine_destroy(&a);
    free(k);
    free(v);
}
END_TEST

/* Local merge over MPI (one ATTEND_LOCAL per worker) equals the in-process engine's. */
START_TEST(test_mpi_local_merge)
{
    const size_t n = (size_t)T * NKV * D;
    float *k = test_alloc(n * 4), *v = test_alloc(n * 4), q[NH * D], om[NH * D], oa[NH * D];
    test_rng r = {71};
    test_fill(&r, n, k, 2.0f);
    test_fill(&r, n, v, 1.0f);
    fasa_engine_t *m = s_mpi_engine(), *a = fasa_engine_new(s_n_workers, BLOCK);
    const fasa_session_config c = {.n_layers = 1,
                                   .n_heads = NH,
                                   .n_kv_heads = NKV,
                                   .head_dim = D,
                                   .method = FASA_METHOD_ORACLE,
                                   .budget = 24,
                                   .merge = FASA_MERGE_LOCAL};
    fasa_error err;
    ck_assert_int_eq(fasa_engine_create(m, "s", &c, &err), FASA_OK);
    ck_assert_int_eq(fasa_engine_create(a, "s", &c, &err), FASA_OK);
    ck_assert_int_eq(fasa_engine_append(m, "s", 0, 0, T, k, v, &err), FASA_OK);
    ck_assert_int_eq(fasa_engine_append(a, "s", 0, 0, T, k, v, &err), FASA_OK);
    for (int it = 0; it < 8; it++) {
        test_fill(&r, NH * D, q, 1.5f);
        const fasa_attend_req req = {
            .q = q, .method = -1, .gqa = it % 2, .max_pos = -1, .merge = -1};
        fasa_step_stats sm, sa;
        ck_assert_msg(fasa_engine_attend(m, "s", &req, om, NULL, &sm, &err) == FASA_OK, "%s",
                      err.msg);
        ck_assert_int_eq(fasa_engine_attend(a, "s", &req, oa, NULL, &sa, &err), FASA_OK);
        ck_assert(!memcmp(om, oa, sizeof(om)));
        ck_assert_int_eq(sm.merge_used, FASA_MERGE_LOCAL);
        ck_assert_int_eq(sm.bytes_read, sa.bytes_read);
    }
    ck_assert_int_eq(fasa_engine_drop(m, "s", &err), FASA_OK);
    fasa_engine_destroy(&a);
    free(k);
    free(v);
}
END_TEST

int main(int argc, char **argv)
{
    int provided = 0, rank = 0, size = 0;
    MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    if (size < 2) {
        fprintf(stderr, "fasa_load_mpi_tests needs at least 2 ranks\n");
        MPI_Finalize();
        return EXIT_FAILURE;
    }
    s_n_workers = size - 1;
    MPI_Comm_dup(MPI_COMM_WORLD, &s_comm);
    int failed = 0;
    if (rank == 0) {
        snprintf(s_dir, sizeof(s_dir), "/tmp/fasa_load_mpi.%d", (int)getpid());
        mkdir(s_dir, 0755);
        Suite *s = suite_create("load_mpi");
        TCase *tc = tcase_create("load_mpi");
        tcase_set_timeout(tc, 300);
        tcase_add_test(tc, test_mpi_load);
        tcase_add_test(tc, test_mpi_local_merge);
        suite_add_tcase(s, tc);
        SRunner *sr = srunner_create(s);
        srunner_set_fork_status(sr, CK_NOFORK);
        srunner_run_all(sr, CK_NORMAL);
        failed = srunner_ntests_failed(sr) != 0;
        srunner_free(sr);
        /* Stops the workers; when no test made the engine, stop them by hand. */
        if (s_mpi) {
            fasa_engine_destroy(&s_mpi);
        } else {
            fasa_transport t;
            if (fasa_transport_mpi(&t, s_comm)) MPI_Abort(MPI_COMM_WORLD, 1);
            t.destroy(t.ctx);
        }
        char cmd[300];
        snprintf(cmd, sizeof(cmd), "rm -rf '%s'", s_dir);
        if (system(cmd)) failed = 1;
    } else if (worker_mpi_loop_threads(s_comm, 1)) {
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    MPI_Allreduce(MPI_IN_PLACE, &failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    MPI_Comm_free(&s_comm);
    MPI_Finalize();
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}

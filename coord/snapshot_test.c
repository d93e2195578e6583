/* Snapshots: a session written by an engine of one shard count and restored into engines
 * of other shard counts answers exactly as a fresh engine of that count fed the same rows
 * (bit for bit), and as the original to float rounding; damaged files are refused. */
#include <dirent.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ca.h"
#include "engine.h"
#include "shard.h"
#include "shard_snap.h"
#include "snapshot.h"
#include "scan.h"
#include "test_util.h"
#include "wal.h"

#define NL 3
#define NH 4
#define NKV 2
#define D 16
#define T0 500 /* tokens appended to every layer at once */
#define T1 37  /* then to layer 1 alone, so the layers' lengths differ */
#define BLOCK 64

static float s_k[NL][T0 + T1][NKV * D], s_v[NL][T0 + T1][NKV * D];

static fasa_profile *s_profile(void)
{
    fasa_profile *p = fasa_profile_new(NL, NH, NKV, D, 2);
    ck_assert_ptr_nonnull(p);
    test_rng r = {7};
    for (int l = 0; l < NL; l++)
        for (int h = 0; h < NH; h++) {
            double *ca = p->ca + ((size_t)l * NH + h) * (D / 2);
            for (int i = 0; i < D / 2; i++) ca[i] = (double)(test_next(&r) % 1000) / 1000.0;
            ca_select(D / 2, 2, ca, p->fcs + ((size_t)l * NH + h) * 2);
        }
    p->window = 32;
    return p;
}

/* The score dtype of session "a/b:c" (scan.h; 0 auto). */
static int s_score_dtype;

/* A 2-shard engine holding one empty dense session, id (budget 40, the tests' geometry). */
static fasa_engine_t *s_dense_engine(const char *id)
{
    fasa_engine_t *e = fasa_engine_new(2, BLOCK);
    ck_assert_ptr_nonnull(e);
    const fasa_session_config c = {.n_layers = NL,
                                   .n_heads = NH,
                                   .n_kv_heads = NKV,
                                   .head_dim = D,
                                   .method = FASA_METHOD_DENSE,
                                   .budget = 40};
    fasa_error err;
    ck_assert_int_eq(fasa_engine_create(e, id, &c, &err), FASA_OK);
    return e;
}

/* Sessions "a/b:c" (fasa with a profile) and "plain" (dense, no profile), the same rows. */
static fasa_engine_t *s_fed_engine(int n_shards, const fasa_profile *p)
{
    test_rng r = {42};
    for (int l = 0; l < NL; l++) {
        test_fill(&r, (size_t)(T0 + T1) * NKV * D, &s_k[l][0][0], 1.0f);
        test_fill(&r, (size_t)(T0 + T1) * NKV * D, &s_v[l][0][0], 1.0f);
    }
    fasa_engine_t *e = fasa_engine_new(n_shards, BLOCK);
    ck_assert_ptr_nonnull(e);
    fasa_session_config c = {.n_layers = NL,
                             .n_heads = NH,
                             .n_kv_heads = NKV,
                             .head_dim = D,
                             .profile = p,
                             .method = FASA_METHOD_FASA,
                             .budget = 40,
                             .score_dtype = s_score_dtype};
    fasa_error err;
    ck_assert_int_eq(fasa_engine_create(e, "a/b:c", &c, &err), FASA_OK);
    c.profile = NULL;
    c.method = FASA_METHOD_DENSE;
    c.score_dtype = 0;
    ck_assert_int_eq(fasa_engine_create(e, "plain", &c, &err), FASA_OK);
    static float k[NL][T0][NKV * D], v[NL][T0][NKV * D];
    for (int l = 0; l < NL; l++) {
        memcpy(k[l], s_k[l], sizeof(k[l]));
        memcpy(v[l], s_v[l], sizeof(v[l]));
    }
    for (int i = 0; i < 2; i++) {
        const char *id = i ? "plain" : "a/b:c";
        ck_assert_int_eq(fasa_engine_append(e, id, -1, 0, T0, &k[0][0][0], &v[0][0][0], &err),
                         FASA_OK);
        ck_assert_int_eq(fasa_engine_append(e, id, 1, T0, T1, &s_k[1][T0][0], &s_v[1][T0][0], &err),
                         FASA_OK);
    }
    return e;
}

/* out (n_methods, NL, NH, D) and sel (n_methods, NL, NH, 40) of every method and layer. */
static const fasa_method s_methods[] = {FASA_METHOD_FASA, FASA_METHOD_DENSE, FASA_METHOD_ORACLE,
                                        FASA_METHOD_QUEST, FASA_METHOD_STREAM};
#define N_METHODS 5
static void s_attend_all(fasa_engine_t *e, const char *id, float *out, int32_t *sel)
{
    test_rng r = {99};
    float q[NH * D];
    for (int m = 0; m < N_METHODS; m++)
        for (int l = 0; l < NL; l++) {
            test_fill(&r, NH * D, q, 1.0f);
            const int method = !strcmp(id, "plain") && m == 0 ? FASA_METHOD_DENSE : s_methods[m];
            fasa_attend_req req = {.layer = l, .q = q, .method = method, .gqa = -1, .max_pos = -1};
            fasa_error err;
            const size_t at = (size_t)m * NL + l;
            ck_assert_msg(fasa_engine_attend(e, id, &req, out + at * NH * D, sel + at * NH * 40,
                                             NULL, &err) == FASA_OK,
                          "%s", err.msg);
        }
}

static char s_dir[64];

static void s_mkdir(void)
{
    snprintf(s_dir, sizeof(s_dir), "/tmp/fasa-snap-XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(s_dir));
}

static void s_rmdir(void)
{
    DIR *d = opendir(s_dir);
    struct dirent *de;
    while (d && (de = readdir(d))) {
        char p[400];
        snprintf(p, sizeof(p), "%s/%s", s_dir, de->d_name);
        if (de->d_name[0] != '.') unlink(p);
    }
    if (d) closedir(d);
    rmdir(s_dir);
}

static int s_count_files(const char *suffix)
{
    DIR *d = opendir(s_dir);
    struct dirent *de;
    int n = 0;
    while ((de = readdir(d))) {
        const size_t a = strlen(de->d_name), b = strlen(suffix);
        n += a > b && !strcmp(de->d_name + a - b, suffix);
    }
    closedir(d);
    return n;
}

/* Snapshot, restore onto 1..4 shards: the same bits as a fresh engine fed the same rows on
 * that shard count, and to rounding the same as the snapshotted one. */
static void s_reshard(int score_dtype)
{
    s_score_dtype = score_dtype;
    static float out_a[N_METHODS * NL * NH * D], out_b[N_METHODS * NL * NH * D],
        out_c[N_METHODS * NL * NH * D];
    static int32_t sel_a[N_METHODS * NL * NH * 40], sel_b[N_METHODS * NL * NH * 40],
        sel_c[N_METHODS * NL * NH * 40];
    fasa_profile *p = s_profile();
    s_mkdir();
    fasa_engine_t *a = s_fed_engine(3, p);
    fasa_error err;
    fasa_snapshot_result res;
    ck_assert_msg(fasa_snapshot_session(a, s_dir, "a/b:c", &res, &err) == FASA_OK, "%s", err.msg);
    ck_assert_int_eq(res.length, T0);
    /* Written twice: the second generation replaces the first, whose files are gone. */
    ck_assert_int_eq(fasa_snapshot_session(a, s_dir, "plain", NULL, &err), FASA_OK);
    ck_assert_int_eq(fasa_snapshot_session(a, s_dir, "a/b:c", &res, &err), FASA_OK);
    ck_assert_int_eq(s_count_files(".manifest"), 2);
    ck_assert_int_eq(s_count_files(".shard"), 2 * 3);
    ck_assert_int_eq(s_count_files(".tmp"), 0);
    /* File bytes: header + rows x (pos + K + V). */
    const int64_t rows = NL * T0 + T1, row_bytes = 4 + 2 * NKV * D * 4;
    ck_assert_int_gt(res.bytes, rows * row_bytes);
    ck_assert_int_lt(res.bytes, rows * row_bytes + 3 * 512);

    for (int s = 0; s < 2; s++) {
        const char *id = s ? "plain" : "a/b:c";
        s_attend_all(a, id, out_a, sel_a);
        for (int ns = 1; ns <= 4; ns++) {
            fasa_engine_t *b = fasa_engine_new(ns, BLOCK), *c = s_fed_engine(ns, p);
            int failed = -1;
            ck_assert_int_eq(fasa_snapshot_restore_all(b, s_dir, &failed), 2);
            ck_assert_int_eq(failed, 0);
            for (int l = 0; l < NL; l++)
                ck_assert_int_eq(fasa_engine_length(b, id, l), l == 1 ? T0 + T1 : T0);
            const fasa_session_config *cb = fasa_engine_config(b, id);
            ck_assert_int_eq(cb->method, s ? FASA_METHOD_DENSE : FASA_METHOD_FASA);
            ck_assert_int_eq(cb->budget, 40);
            ck_assert_int_eq(cb->score_dtype, s ? 0 : score_dtype);
            ck_assert_int_eq(cb->dense_layers[0], 1);
            ck_assert_int_eq(cb->dense_layers[1], 0);
            ck_assert(s ? !cb->profile
                        : cb->profile &&
                              !memcmp(cb->profile->fcs, p->fcs, NL * NH * 2 * sizeof(int)));
            s_attend_all(b, id, out_b, sel_b);
            s_attend_all(c, id, out_c, sel_c);
            /* Same shard count, same rows: the same bits. */
            ck_assert_msg(!memcmp(out_b, out_c, sizeof(out_b)), "%s on %d shards differs", id, ns);
            ck_assert(!memcmp(sel_b, sel_c, sizeof(sel_b)));
            /* Another shard count: the merge order differs, so only to rounding. */
            const double diff = test_max_abs_diff(N_METHODS * NL * NH * D, out_b, out_a);
            ck_assert_msg(diff <= 1e-6, "%s: %d shards vs 3: %g", id, ns, diff);
            if (ns == 3) ck_assert(!memcmp(out_b, out_a, sizeof(out_a)));
            fasa_engine_destroy(&b);
            fasa_engine_destroy(&c);
        }
    }
    fasa_engine_destroy(&a);
    fasa_profile_destroy(&p);
    s_rmdir();
    s_score_dtype = 0;
}

START_TEST(test_snapshot_reshard)
{
    s_reshard(SCAN_AUTO);
}
END_TEST

/* An int8 scoring store: the manifest keeps the score dtype and the restore rebuilds the
 * store from the keys (the selections match a fresh engine's bit for bit). */
START_TEST(test_snapshot_score_dtype)
{
    s_reshard(SCAN_I8);
    s_reshard(SCAN_BF16);
}
END_TEST

/* The manifest's name of shard file i of a session. */
static void s_shard_path(const char *id, int i, char *path, size_t len)
{
    char stem[64];
    fasa_snapshot_stem(id, stem, sizeof(stem));
    DIR *d = opendir(s_dir);
    struct dirent *de;
    char want[80];
    snprintf(want, sizeof(want), ".s%d.shard", i);
    while ((de = readdir(d)))
        if (!strncmp(de->d_name, stem, strlen(stem)) && strstr(de->d_name, want))
            snprintf(path, len, "%s/%s", s_dir, de->d_name);
    closedir(d);
}

START_TEST(test_snapshot_damage)
{
    fasa_profile *p = s_profile();
    s_mkdir();
    fasa_engine_t *a = s_fed_engine(2, p);
    fasa_error err;
    ck_assert_int_eq(fasa_snapshot_session(a, s_dir, "a/b:c", NULL, &err), FASA_OK);
    ck_assert_int_eq(fasa_snapshot_session(a, s_dir, "plain", NULL, &err), FASA_OK);
    char path[400] = "", mpath[400];
    char stem[64];

    /* One flipped byte in the body of a shard file of "a/b:c". */
    s_shard_path("a/b:c", 1, path, sizeof(path));
    ck_assert(*path);
    FILE *f = fopen(path, "r+b");
    ck_assert_ptr_nonnull(f);
    fseek(f, 5000, SEEK_SET);
    int ch = fgetc(f);
    fseek(f, 5000, SEEK_SET);
    fputc(ch ^ 0x10, f);
    fclose(f);
    fasa_engine_t *b = fasa_engine_new(3, BLOCK);
    fasa_snapshot_stem("a/b:c", stem, sizeof(stem));
    snprintf(mpath, sizeof(mpath), "%s/%s.manifest", s_dir, stem);
    char id[FASA_ID_MAX + 1];
    ck_assert_int_eq(fasa_snapshot_restore(b, mpath, id, &err), FASA_FAILED_PRECONDITION);
    ck_assert_str_eq(id, "a/b:c");
    ck_assert_msg(strstr(err.msg, "checksum mismatch") && strstr(err.msg, path), "%s", err.msg);
    ck_assert_ptr_null(fasa_engine_config(b, "a/b:c"));
    int failed = -1;
    ck_assert_int_eq(fasa_snapshot_restore_all(b, s_dir, &failed), 1); /* plain only */
    ck_assert_int_eq(failed, 1);
    ck_assert_ptr_null(fasa_engine_config(b, "a/b:c"));
    ck_assert_int_eq(fasa_engine_length(b, "plain", 1), T0 + T1);
    fasa_engine_destroy(&b);

    /* A truncated shard file of "plain". */
    s_shard_path("plain", 0, path, sizeof(path));
    ck_assert_int_eq(truncate(path, 3000), 0);
    fasa_snapshot_stem("plain", stem, sizeof(stem));
    snprintf(mpath, sizeof(mpath), "%s/%s.manifest", s_dir, stem);
    b = fasa_engine_new(1, BLOCK);
    ck_assert_int_eq(fasa_snapshot_restore(b, mpath, id, &err), FASA_FAILED_PRECONDITION);
    ck_assert_msg(strstr(err.msg, "truncated") && strstr(err.msg, path), "%s", err.msg);
    ck_assert_int_eq(fasa_engine_count(b), 0);
    /* A damaged manifest: one changed digit. */
    f = fopen(mpath, "r+b");
    fseek(f, 30, SEEK_SET);
    ch = fgetc(f);
    fseek(f, 30, SEEK_SET);
    fputc(ch ^ 1, f);
    fclose(f);
    ck_assert_int_eq(fasa_snapshot_restore(b, mpath, id, &err), FASA_FAILED_PRECONDITION);
    ck_assert_msg(strstr(err.msg, "checksum mismatch"), "%s", err.msg);
    /* A missing shard file. */
    unlink(path);
    ck_assert_int_eq(fasa_snapshot_restore_all(b, s_dir, &failed), 0);
    ck_assert_int_eq(failed, 2);
    ck_assert_int_eq(fasa_engine_count(b), 0);
    /* A session that exists already is refused, the one there untouched. */
    fasa_snapshot_stem("a/b:c", stem, sizeof(stem));
    ck_assert_int_eq(fasa_snapshot_session(a, s_dir, "a/b:c", NULL, &err), FASA_OK);
    snprintf(mpath, sizeof(mpath), "%s/%s.manifest", s_dir, stem);
    ck_assert_int_eq(fasa_snapshot_restore(a, mpath, id, &err), FASA_ALREADY_EXISTS);
    ck_assert_int_eq(fasa_engine_length(a, "a/b:c", 1), T0 + T1);
    /* A directory that cannot be written: the error names the file and errno. */
    ck_assert_int_eq(fasa_snapshot_session(a, "/nonexistent-fasa-dir", "plain", NULL, &err),
                     FASA_INTERNAL);
    ck_assert_msg(strstr(err.msg, "could not write /nonexistent-fasa-dir/plain-") &&
                      strstr(err.msg, "No such file or directory"),
                  "%s", err.msg);
    /* And an unknown session cannot be snapshotted. */
    ck_assert_int_eq(fasa_snapshot_session(a, s_dir, "nope", NULL, &err), FASA_NOT_FOUND);
    fasa_engine_destroy(&b);
    fasa_engine_destroy(&a);
    fasa_profile_destroy(&p);
    s_rmdir();
}
END_TEST

/* shard_read_rows gives back what was appended: positions, and K in the original dim order
 * whatever the packing (dominant dims tiled, the rest row-major), across chunk boundaries. */
START_TEST(test_shard_read_rows)
{
    enum { L = 2, HQ = 4, HK = 2, DD = 16, N = SHARD_CHUNK + 700 };
    shard_layout lay;
    ck_assert_int_eq(shard_layout_plain(&lay, L, HQ, HK, DD), 0);
    /* Layer 1: KV head 0 packs dims 3, 4, 9, 12 first, KV head 1 packs none. */
    const int dom[4] = {3, 4, 9, 12};
    int *perm = lay.perm + (size_t)(1 * HK + 0) * DD, r = 4;
    for (int i = 0; i < 4; i++) perm[i] = dom[i];
    for (int x = 0; x < DD; x++)
        if (x != 3 && x != 4 && x != 9 && x != 12) perm[r++] = x;
    lay.n_dom[1 * HK + 0] = 4;
    shard_t *sh = shard_new(&lay);
    ck_assert_ptr_nonnull(sh);
    float *k = test_alloc((size_t)N * HK * DD * 4), *v = test_alloc((size_t)N * HK * DD * 4);
    float *k2 = test_alloc((size_t)N * HK * DD * 4), *v2 = test_alloc((size_t)N * HK * DD * 4);
    int32_t *pos = test_alloc((size_t)N * 4), *pos2 = test_alloc((size_t)N * 4);
    test_rng rng = {3};
    test_fill(&rng, (size_t)N * HK * DD, k, 1.0f);
    test_fill(&rng, (size_t)N * HK * DD, v, 1.0f);
    for (int i = 0; i < N; i++) pos[i] = 3 * i + i / 64;
    for (int l = 0; l < L; l++) {
        ck_assert_int_eq(shard_append(sh, l, 1000, pos, k, v), 0);
        ck_assert_int_eq(shard_append(sh, l, N - 1000, pos + 1000, k + (size_t)1000 * HK * DD,
                                      v + (size_t)1000 * HK * DD),
                         0);
        memset(k2, 0, (size_t)N * HK * DD * 4);
        ck_assert_int_eq(shard_read_rows(sh, l, 0, N, pos2, k2, v2), 0);
        ck_assert_mem_eq(pos2, pos, (size_t)N * 4);
        ck_assert_mem_eq(k2, k, (size_t)N * HK * DD * 4);
        ck_assert_mem_eq(v2, v, (size_t)N * HK * DD * 4);
        /* A window inside, one part at a time. */
        ck_assert_int_eq(shard_read_rows(sh, l, 4090, 10, NULL, k2, NULL), 0);
        ck_assert_mem_eq(k2, k + (size_t)4090 * HK * DD, (size_t)10 * HK * DD * 4);
        ck_assert_int_eq(shard_read_rows(sh, l, N - 5, 6, pos2, NULL, NULL), -1);
        ck_assert_int_eq(shard_read_rows(sh, l, -1, 1, pos2, NULL, NULL), -1);
    }
    shard_destroy(&sh);
    shard_layout_cleanup(&lay);
    free(k), free(v), free(k2), free(v2), free(pos), free(pos2);
}
END_TEST

/* Rows [p0, p0 + n) of every layer, packed (NL, n, row) as an append of every layer. */
static void s_pack(int p0, int n, float *k, float *v)
{
    for (int l = 0; l < NL; l++) {
        memcpy(k + (size_t)l * n * NKV * D, &s_k[l][p0][0], (size_t)n * NKV * D * sizeof(float));
        memcpy(v + (size_t)l * n * NKV * D, &s_v[l][p0][0], (size_t)n * NKV * D * sizeof(float));
    }
}

/* Appends to e and logs it, as the service does. */
static void s_logged(fasa_engine_t *e, int layer, int p0, int n, const float *k, const float *v)
{
    fasa_error err;
    ck_assert_msg(fasa_engine_append(e, "plain", layer, p0, n, k, v, &err) == FASA_OK, "%s",
                  err.msg);
    ck_assert_int_eq(
        fasa_wal_append(s_dir, FASA_WAL_WRITE, "plain", layer, NL, p0, n, NKV * D, k, v), 0);
}

static long long s_size(const char *path)
{
    struct stat st;
    return stat(path, &st) ? -1 : (long long)st.st_size;
}

START_TEST(test_wal_replay)
{
    /* Engine A: session "plain" snapshotted after 200 rows of every layer; then, logged only:
     * 100 more rows of every layer, 37 of layer 1 alone, 5 single rows of layer 0 (as an
     * Attend's k_new logs them) and a record the log already holds (replay skips it). An
     * engine restored from the snapshot and then the log holds the same rows and answers
     * every method bit for bit as A; a torn tail is cut off and the rest replays. */
    test_rng r = {17};
    for (int l = 0; l < NL; l++) {
        test_fill(&r, (size_t)(T0 + T1) * NKV * D, &s_k[l][0][0], 1.0f);
        test_fill(&r, (size_t)(T0 + T1) * NKV * D, &s_v[l][0][0], 1.0f);
    }
    s_mkdir();
    fasa_engine_t *a = s_dense_engine("plain");
    fasa_error err;
    float *k = malloc((size_t)NL * 200 * NKV * D * sizeof(float));
    float *v = malloc((size_t)NL * 200 * NKV * D * sizeof(float));
    ck_assert_ptr_nonnull(k);
    ck_assert_ptr_nonnull(v);
    s_pack(0, 200, k, v);
    s_logged(a, -1, 0, 200, k, v);
    ck_assert_int_eq(fasa_snapshot_session(a, s_dir, "plain", NULL, &err), FASA_OK);
    char stem[64], wal[200];
    fasa_snapshot_stem("plain", stem, sizeof(stem));
    snprintf(wal, sizeof(wal), "%s/%s.wal", s_dir, stem);
    ck_assert_int_eq(s_size(wal), 8 + 4 + 5); /* the snapshot truncated it to its header */
    s_pack(200, 100, k, v);
    s_logged(a, -1, 200, 100, k, v);
    s_logged(a, 1, 300, T1, &s_k[1][300][0], &s_v[1][300][0]);
    for (int i = 0; i < 5; i++)
        s_logged(a, 0, 300 + i, 1, &s_k[0][300 + i][0], &s_v[0][300 + i][0]);
    s_pack(200, 100, k, v);
    ck_assert_int_eq(
        fasa_wal_append(s_dir, FASA_WAL_FSYNC, "plain", -1, NL, 200, 100, NKV * D, k, v), 0);
    const long long good = s_size(wal);

    const size_t n_out = (size_t)N_METHODS * NL * NH * D, n_sel = (size_t)N_METHODS * NL * NH * 40;
    float *oa = malloc(n_out * sizeof(float)), *ob = malloc(n_out * sizeof(float));
    int32_t *sa = malloc(n_sel * sizeof(int32_t)), *sb = malloc(n_sel * sizeof(int32_t));
    ck_assert(oa && ob && sa && sb);
    s_attend_all(a, "plain", oa, sa);
    for (int torn = 0; torn < 2; torn++) {
        if (torn) { /* a record cut short by a kill: its header and part of its rows */
            FILE *f = fopen(wal, "ab");
            ck_assert_ptr_nonnull(f);
            fwrite(k, 1, 40, f);
            fclose(f);
            ck_assert_int_eq(s_size(wal), good + 40);
        }
        fasa_engine_t *b = fasa_engine_new(torn ? 3 : 2, BLOCK);
        int failed = 0;
        ck_assert_int_eq(fasa_snapshot_restore_all(b, s_dir, &failed), 1);
        ck_assert_int_eq(fasa_engine_length(b, "plain", 0), 200);
        long long rows = 0;
        ck_assert_int_eq(fasa_wal_replay_all(b, s_dir, &rows), 8);
        ck_assert_int_eq(rows, 3 * 100 + T1 + 5);
        ck_assert_int_eq(fasa_engine_length(b, "plain", 0), 305);
        ck_assert_int_eq(fasa_engine_length(b, "plain", 1), 300 + T1);
        ck_assert_int_eq(fasa_engine_length(b, "plain", 2), 300);
        ck_assert_int_eq(s_size(wal), good); /* the torn tail is cut off */
        s_attend_all(b, "plain", ob, sb);
        if (!torn) { /* the same shard count: bit for bit */
            ck_assert_int_eq(memcmp(oa, ob, n_out * sizeof(float)), 0);
            ck_assert_int_eq(memcmp(sa, sb, n_sel * sizeof(int32_t)), 0);
        } else { /* another shard count: to float rounding (the merge order follows it) */
            for (size_t i = 0; i < n_out; i++) ck_assert_float_eq_tol(ob[i], oa[i], 1e-6f);
        }
        fasa_engine_destroy(&b);
    }
    /* A log for a session the engine does not hold is left alone. */
    fasa_engine_t *e = fasa_engine_new(1, BLOCK);
    ck_assert_int_eq(fasa_wal_replay_all(e, s_dir, NULL), 0);
    ck_assert_int_eq(s_size(wal), good);
    fasa_engine_destroy(&e);
    fasa_snapshot_remove(s_dir, "plain");
    ck_assert_int_eq(s_size(wal), -1); /* a drop removes the log with the snapshot */
    fasa_engine_destroy(&a);
    free(k), free(v), free(oa), free(ob), free(sa), free(sb);
    s_rmdir();
}
END_TEST

START_TEST(test_snapshot_clean)
{
    /* What a snapshot killed half way leaves goes; the live generation and other files stay. */
    s_mkdir();
    fasa_engine_t *a = s_dense_engine("s");
    fasa_error err;
    ck_assert_int_eq(fasa_snapshot_session(a, s_dir, "s", NULL, &err), FASA_OK);
    char stem[64];
    fasa_snapshot_stem("s", stem, sizeof(stem));
    const char *stray[] = {".manifest.tmp", ".g1.s0.shard", ".g1.s1.shard.tmp", ".profile.tmp"};
    char p[300];
    for (int i = 0; i < 4; i++) {
        snprintf(p, sizeof(p), "%s/%s%s", s_dir, stem, stray[i]);
        FILE *f = fopen(p, "w");
        ck_assert_ptr_nonnull(f);
        fputs("x", f);
        fclose(f);
    }
    const char *other[] = {"zz-0123456789abcdef.g2.s0.shard", "zz-0123456789abcdef.wal",
                           "notes.txt", "zz.g1.s0.shard"};
    for (int i = 0; i < 4; i++) {
        snprintf(p, sizeof(p), "%s/%s", s_dir, other[i]);
        FILE *f = fopen(p, "w");
        ck_assert_ptr_nonnull(f);
        fputs("yy", f);
        fclose(f);
    }
    long long bytes = 0;
    ck_assert_int_eq(fasa_snapshot_clean(s_dir, NULL, &bytes), 6);
    ck_assert_int_eq(bytes, 4 + 2 * 2);
    snprintf(p, sizeof(p), "%s/notes.txt", s_dir);
    ck_assert_int_eq(access(p, F_OK), 0); /* not one of ours */
    snprintf(p, sizeof(p), "%s/zz.g1.s0.shard", s_dir);
    ck_assert_int_eq(access(p, F_OK), 0); /* not a stem of ours */
    /* The live generation is kept: the session restores. */
    fasa_engine_t *b = fasa_engine_new(2, BLOCK);
    int failed = 0;
    ck_assert_int_eq(fasa_snapshot_restore_all(b, s_dir, &failed), 1);
    ck_assert_int_eq(failed, 0);
    ck_assert_int_eq(fasa_snapshot_clean(s_dir, NULL, NULL), 0);
    fasa_engine_destroy(&a);
    fasa_engine_destroy(&b);
    s_rmdir();
}
END_TEST

Suite *snapshot_suite(void)
{
    const TTest *tests[] = {test_shard_read_rows,
                            test_snapshot_reshard,
                            test_snapshot_score_dtype,
                            test_snapshot_damage,
                            test_wal_replay,
                            test_snapshot_clean,
                            NULL};
    return test_suite("snapshot", "snapshot", 300, tests);
}

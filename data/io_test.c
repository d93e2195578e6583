/* .npy and QKV1 readers: round trips, the real dump's header, and broken files. */
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "npy.h"
#include "qkv.h"
#include "test_util.h"

START_TEST(test_npy_roundtrip)
{
    char dir[] = "/tmp/fasa_io_XXXXXX", path[256], err[256];
    ck_assert_ptr_nonnull(mkdtemp(dir));
    snprintf(path, sizeof(path), "%s/a.npy", dir);
    float x[2 * 3 * 4];
    for (int i = 0; i < 24; i++) x[i] = (float)i * 0.5f - 3.0f;
    const int64_t shape[3] = {2, 3, 4};
    ck_assert_int_eq(npy_write(path, "<f4", 3, shape, x, err, sizeof(err)), 0);
    struct stat st;
    ck_assert_int_eq(stat(path, &st), 0);
    ck_assert_int_eq((st.st_size - 24 * 4) % 64, 0); /* header padded to 64 bytes */
    float *y;
    int nd;
    int64_t sh[NPY_MAX_DIMS];
    ck_assert_int_eq(npy_read_f32(path, &y, &nd, sh, err, sizeof(err)), 0);
    ck_assert_int_eq(nd, 3);
    ck_assert(sh[0] == 2 && sh[1] == 3 && sh[2] == 4);
    ck_assert_mem_eq(x, y, sizeof(x));
    free(y);
    /* int32 files are refused by the float reader with the dtype named. */
    ck_assert_int_eq(npy_write(path, "<i4", 3, shape, x, err, sizeof(err)), 0);
    ck_assert_int_eq(npy_read_f32(path, &y, &nd, sh, err, sizeof(err)), -1);
    ck_assert_ptr_nonnull(strstr(err, "dtype"));
    /* Truncated data. */
    ck_assert_int_eq(npy_write(path, "<f4", 3, shape, x, err, sizeof(err)), 0);
    ck_assert_int_eq(truncate(path, st.st_size - 5), 0);
    ck_assert_int_eq(npy_read_f32(path, &y, &nd, sh, err, sizeof(err)), -1);
    ck_assert_ptr_nonnull(strstr(err, "truncated"));
    unlink(path);

    /* A q/k/v .npy directory loads as activations with the right views. */
    const int64_t qs[4] = {1, 3, 2, 4}, ks[4] = {1, 3, 1, 4};
    float q[24], k[12], v[12];
    for (int i = 0; i < 24; i++) q[i] = (float)i;
    for (int i = 0; i < 12; i++) k[i] = (float)-i, v[i] = (float)(100 + i);
    const char *names[3] = {"q.npy", "k.npy", "v.npy"};
    const float *data[3] = {q, k, v};
    for (int i = 0; i < 3; i++) {
        snprintf(path, sizeof(path), "%s/%s", dir, names[i]);
        ck_assert_int_eq(npy_write(path, "<f4", 4, i ? ks : qs, data[i], err, sizeof(err)), 0);
    }
    fasa_qkv x2;
    ck_assert_msg(fasa_qkv_load(dir, &x2, err, sizeof(err)) == 0, "%s", err);
    ck_assert_int_eq(x2.act.n_tokens, 3);
    ck_assert_int_eq(x2.act.n_heads, 2);
    ck_assert_int_eq(x2.act.n_kv_heads, 1);
    ck_assert_float_eq(x2.act.q[0][23], 23.0f);
    ck_assert_float_eq(x2.act.v[0][11], 111.0f);
    fasa_qkv_cleanup(&x2);
    for (int i = 0; i < 3; i++) {
        snprintf(path, sizeof(path), "%s/%s", dir, names[i]);
        unlink(path);
    }
    rmdir(dir);
}
END_TEST

START_TEST(test_qkv_dump)
{
    char path[1024], err[512];
    snprintf(path, sizeof(path), "%s/data/models/stories260K/golden/tinystories_T2048.qkv",
             test_shared_dir());
    fasa_qkv x;
    ck_assert_msg(fasa_qkv_load(path, &x, err, sizeof(err)) == 0, "%s", err);
    ck_assert_int_eq(x.act.n_tokens, 2048);
    ck_assert_int_eq(x.act.n_layers, 5);
    ck_assert_int_eq(x.act.n_heads, 8);
    ck_assert_int_eq(x.act.n_kv_heads, 4);
    ck_assert_int_eq(x.act.head_dim, 8);
    ck_assert_int_eq(x.vocab, 512);
    ck_assert_int_eq(x.tokens[0], 1); /* BOS */
    /* RoPE leaves position 0 unrotated and every norm intact; check the last layer's v is
     * not the k block (the per-layer q, k, v order of the file). */
    ck_assert(memcmp(x.act.k[4], x.act.v[4], 32) != 0);

    /* A truncated copy and a copy with the wrong magic are refused. */
    char tmp[] = "/tmp/fasa_qkv_XXXXXX";
    const int fd = mkstemp(tmp);
    ck_assert_int_ge(fd, 0);
    FILE *in = fopen(path, "rb");
    char buf[65536];
    size_t n, total = 0;
    while ((n = fread(buf, 1, sizeof(buf), in)) > 0 && total < 1000000) {
        ck_assert_int_eq(write(fd, buf, n), (ssize_t)n);
        total += n;
    }
    fclose(in);
    close(fd);
    fasa_qkv y;
    ck_assert_int_eq(fasa_qkv_load(tmp, &y, err, sizeof(err)), -1);
    ck_assert_ptr_nonnull(strstr(err, "truncated"));
    FILE *f = fopen(tmp, "r+b");
    fwrite("QKV2", 1, 4, f);
    fclose(f);
    ck_assert_int_eq(fasa_qkv_load(tmp, &y, err, sizeof(err)), -1);
    ck_assert_ptr_nonnull(strstr(err, "magic"));
    /* A whole copy whose header says one token fewer than the file holds: the layers would
     * be read from the wrong offsets, so it is refused, naming n_tokens. */
    in = fopen(path, "rb");
    f = fopen(tmp, "wb");
    while ((n = fread(buf, 1, sizeof(buf), in)) > 0) ck_assert_uint_eq(fwrite(buf, 1, n, f), n);
    fclose(in);
    fclose(f);
    f = fopen(tmp, "r+b");
    int32_t t_less = x.act.n_tokens - 1;
    ck_assert_int_eq(fseek(f, 8, SEEK_SET), 0);
    ck_assert_uint_eq(fwrite(&t_less, 4, 1, f), 1);
    fclose(f);
    ck_assert_int_eq(fasa_qkv_load(tmp, &y, err, sizeof(err)), -1);
    ck_assert_msg(strstr(err, "n_tokens") != NULL, "%s", err);
    unlink(tmp);
    ck_assert_int_eq(fasa_qkv_load("/nonexistent/x.qkv", &y, err, sizeof(err)), -1);
    ck_assert_ptr_nonnull(strstr(err, "cannot open"));
    fasa_qkv_cleanup(&x);
}
END_TEST

Suite *io_suite(void)
{
    const TTest *tests[] = {test_npy_roundtrip, test_qkv_dump, NULL};
    return test_suite("io", "files", 0, tests);
}

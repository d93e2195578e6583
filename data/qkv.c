#include "qkv.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "npy.h"

void fasa_qkv_cleanup(fasa_qkv *x)
{
    if (!x) return;
    for (int i = 0; i < 3; i++) free(x->buf[i]);
    free(x->tokens);
    free(x->ptrs);
    memset(x, 0, sizeof(*x));
}

static int s_geometry(const char *path, fasa_activations *a, char *err, size_t err_len)
{
    if (a->n_layers < 1 || a->n_layers > 1024 || a->n_tokens < 1 || a->n_heads < 1 ||
        a->n_heads > 1024 || a->n_kv_heads < 1 || a->n_heads % a->n_kv_heads) {
        snprintf(err, err_len, "%s: bad geometry (n_layers %d, T %d, n_heads %d, n_kv_heads %d)",
                 path, a->n_layers, a->n_tokens, a->n_heads, a->n_kv_heads);
        return -1;
    }
    if (a->head_dim < 2 || a->head_dim > 1024 || a->head_dim % 2) {
        snprintf(err, err_len, "%s: head_dim %d must be even and in [2, 1024]", path, a->head_dim);
        return -1;
    }
    return 0;
}

static int s_views(fasa_qkv *x, char *err, size_t err_len)
{
    const fasa_activations *a = &x->act;
    x->ptrs = malloc(3 * (size_t)a->n_layers * sizeof(*x->ptrs));
    if (!x->ptrs) {
        snprintf(err, err_len, "out of memory");
        return -1;
    }
    const size_t per[3] = {(size_t)a->n_tokens * a->n_heads * a->head_dim,
                           (size_t)a->n_tokens * a->n_kv_heads * a->head_dim,
                           (size_t)a->n_tokens * a->n_kv_heads * a->head_dim};
    for (int i = 0; i < 3; i++)
        for (int l = 0; l < a->n_layers; l++) x->ptrs[i * a->n_layers + l] = x->buf[i] + per[i] * l;
    x->act.q = x->ptrs;
    x->act.k = x->ptrs + a->n_layers;
    x->act.v = x->ptrs + 2 * a->n_layers;
    return 0;
}

static int s_load_dump(const char *path, fasa_qkv *x, char *err, size_t err_len)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        snprintf(err, err_len, "cannot open %s: %s", path, strerror(errno));
        return -1;
    }
    char magic[4];
    int32_t h[9];
    fasa_activations *a = &x->act;
    if (fread(magic, 1, 4, f) != 4 || memcmp(magic, "QKV1", 4) != 0) {
        snprintf(err, err_len, "%s: not a QKV1 dump (wrong magic)", path);
        goto fail;
    }
    if (fread(h, 4, 9, f) != 9) goto truncated;
    if (h[0] != 1) {
        snprintf(err, err_len, "%s: QKV1 version %d is not supported (want 1)", path, h[0]);
        goto fail;
    }
    a->n_tokens = h[1];
    a->n_layers = h[2];
    a->n_heads = h[3];
    a->n_kv_heads = h[4];
    a->head_dim = h[5];
    x->vocab = h[6];
    if (s_geometry(path, a, err, err_len)) goto fail;
    if (x->vocab < 0 || x->vocab > (1 << 24)) {
        snprintf(err, err_len, "%s: bad vocab %d", path, x->vocab);
        goto fail;
    }
    const size_t T = (size_t)a->n_tokens, d = (size_t)a->head_dim;
    const size_t nq = T * a->n_heads * d, nk = T * a->n_kv_heads * d;
    /* Check the size before allocating anything the header claims. */
    struct stat stt;
    const size_t want = 40 + 4 * (T + (size_t)x->vocab) + 4 * (nq + 2 * nk) * a->n_layers;
    if (fstat(fileno(f), &stt) == 0 && (size_t)stt.st_size < want) goto truncated;
    /* A file longer than its header says would be read from the wrong offsets (the layers
     * follow the tokens): refuse it rather than read garbage. */
    if (fstat(fileno(f), &stt) == 0 && S_ISREG(stt.st_mode) && (size_t)stt.st_size != want) {
        snprintf(err, err_len,
                 "%s: the header's n_tokens %d, vocab %d and geometry make %zu bytes, but the "
                 "file has %lld (a wrong n_tokens in the header?)",
                 path, a->n_tokens, x->vocab, want, (long long)stt.st_size);
        goto fail;
    }
    x->tokens = malloc(T * sizeof(int32_t));
    x->buf[0] = malloc(nq * a->n_layers * sizeof(float));
    x->buf[1] = malloc(nk * a->n_layers * sizeof(float));
    x->buf[2] = malloc(nk * a->n_layers * sizeof(float));
    if (!x->tokens || !x->buf[0] || !x->buf[1] || !x->buf[2]) {
        snprintf(err, err_len, "%s: out of memory", path);
        goto fail;
    }
    if (fread(x->tokens, 4, T, f) != T || fseek(f, 4L * x->vocab, SEEK_CUR) != 0) goto truncated;
    for (int l = 0; l < a->n_layers; l++)
        if (fread(x->buf[0] + nq * l, 4, nq, f) != nq ||
            fread(x->buf[1] + nk * l, 4, nk, f) != nk || fread(x->buf[2] + nk * l, 4, nk, f) != nk)
            goto truncated;
    fclose(f);
    return s_views(x, err, err_len);
truncated:
    snprintf(err, err_len, "%s: dump is truncated", path);
fail:
    fclose(f);
    return -1;
}

static int s_load_dir(const char *path, fasa_qkv *x, char *err, size_t err_len)
{
    static const char *const names[3] = {"q.npy", "k.npy", "v.npy"};
    int64_t shape[3][NPY_MAX_DIMS];
    int nd[3];
    for (int i = 0; i < 3; i++) {
        char file[4096];
        snprintf(file, sizeof(file), "%s/%s", path, names[i]);
        if (npy_read_f32(file, &x->buf[i], &nd[i], shape[i], err, err_len)) return -1;
        if (nd[i] != 4) {
            snprintf(err, err_len, "%s: shape must be (n_layers, T, heads, head_dim)", file);
            return -1;
        }
    }
    fasa_activations *a = &x->act;
    a->n_layers = (int)shape[0][0];
    a->n_tokens = (int)shape[0][1];
    a->n_heads = (int)shape[0][2];
    a->head_dim = (int)shape[0][3];
    a->n_kv_heads = (int)shape[1][2];
    for (int i = 1; i < 3; i++)
        if (shape[i][0] != a->n_layers || shape[i][1] != a->n_tokens ||
            shape[i][2] != a->n_kv_heads || shape[i][3] != a->head_dim) {
            snprintf(err, err_len, "%s/%s: shape does not match q.npy and k.npy", path, names[i]);
            return -1;
        }
    if (s_geometry(path, a, err, err_len)) return -1;
    return s_views(x, err, err_len);
}

int fasa_qkv_load(const char *path, fasa_qkv *out, char *err, size_t err_len)
{
    memset(out, 0, sizeof(*out));
    struct stat st;
    if (stat(path, &st) != 0) {
        snprintf(err, err_len, "cannot open %s: %s", path, strerror(errno));
        return -1;
    }
    const int rc = S_ISDIR(st.st_mode) ? s_load_dir(path, out, err, err_len)
                                       : s_load_dump(path, out, err, err_len);
    if (rc) fasa_qkv_cleanup(out);
    return rc;
}

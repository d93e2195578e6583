/* Bulk load: the load directory's layout and its checks. See load.h. */
#define _GNU_SOURCE
#include "load.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "dtype.h"

/* Longest .npy header read (numpy writes at most a few hundred bytes). */
#define NPY_MAX_HEADER 65536

static const char *s_base(const char *path)
{
    const char *b = strrchr(path, '/');
    return b && b[1] ? b + 1 : path;
}

/* 1 when the resolved path p is root or inside it. */
static int s_inside(const char *root, const char *p)
{
    const size_t n = strlen(root);
    if (n == 1 && root[0] == '/') return 1;
    return strncmp(root, p, n) == 0 && (p[n] == 0 || p[n] == '/');
}

fasa_status fasa_load_resolve(const char *root, const char *path, char *out, size_t out_len,
                              fasa_error *err)
{
    if (!root || !*root)
        return fasa_error_set(err, FASA_FAILED_PRECONDITION,
                              "load_session: this server loads no files (start it with "
                              "--load-root DIR to allow loads from DIR)");
    if (!path || !*path)
        return fasa_error_set(err, FASA_INVALID_ARGUMENT, "load_session.path is empty");
    char root_real[PATH_MAX], joined[PATH_MAX + 8], real[PATH_MAX];
    if (!realpath(root, root_real))
        return fasa_error_set(err, FASA_INTERNAL, "--load-root %s: %s", root, strerror(errno));
    if (path[0] == '/') {
        if (snprintf(joined, sizeof(joined), "%s", path) >= (int)sizeof(joined))
            return fasa_error_set(err, FASA_INVALID_ARGUMENT, "load_session.path is too long");
    } else if (snprintf(joined, sizeof(joined), "%s/%s", root_real, path) >= (int)sizeof(joined)) {
        return fasa_error_set(err, FASA_INVALID_ARGUMENT, "load_session.path is too long");
    }
    if (!realpath(joined, real)) {
        const int e = errno;
        /* Say nothing of what lies outside the root: only whether the name is allowed. */
        if (path[0] == '/' && !s_inside(root_real, joined))
            return fasa_error_set(err, FASA_INVALID_ARGUMENT,
                                  "load_session.path '%s' is outside the server's --load-root",
                                  path);
        return fasa_error_set(err, e == ENOENT ? FASA_NOT_FOUND : FASA_INVALID_ARGUMENT,
                              "load_session.path '%s': %s", path, strerror(e));
    }
    if (!s_inside(root_real, real))
        return fasa_error_set(err, FASA_INVALID_ARGUMENT,
                              "load_session.path '%s' is outside the server's --load-root", path);
    if (strlen(real) + 1 > out_len || strlen(real) + 16 > LOAD_MAX_PATH)
        return fasa_error_set(err, FASA_INVALID_ARGUMENT, "load_session.path is too long");
    memcpy(out, real, strlen(real) + 1);
    return FASA_OK;
}

void fasa_load_plan_free(fasa_load_plan *plan)
{
    if (!plan) return;
    free(plan->k);
    free(plan->v);
    memset(plan, 0, sizeof(*plan));
}

/* An opened source file: its size, and whether it lies under root. */
static fasa_status s_stat_file(const char *path, const char *root, int64_t *size_p, fasa_error *err)
{
    char real[PATH_MAX];
    struct stat sb;
    if (!realpath(path, real) || stat(real, &sb))
        return fasa_error_set(err, errno == ENOENT ? FASA_NOT_FOUND : FASA_INVALID_ARGUMENT,
                              "%s: %s", s_base(path), strerror(errno));
    if (root && *root) {
        char root_real[PATH_MAX];
        if (!realpath(root, root_real) || !s_inside(root_real, real))
            return fasa_error_set(err, FASA_INVALID_ARGUMENT,
                                  "%s: a link to outside the server's --load-root", s_base(path));
    }
    if (!S_ISREG(sb.st_mode))
        return fasa_error_set(err, FASA_INVALID_ARGUMENT, "%s: not a regular file", s_base(path));
    *size_p = (int64_t)sb.st_size;
    return FASA_OK;
}

/* The value text after 'key': in an npy header dict, or NULL. */
static const char *s_dict_value(const char *h, const char *key)
{
    char pat[32];
    snprintf(pat, sizeof(pat), "'%s'", key);
    const char *p = strstr(h, pat);
    if (!p) {
        snprintf(pat, sizeof(pat), "\"%s\"", key);
        if (!(p = strstr(h, pat))) return NULL;
    }
    p += strlen(pat);
    while (*p == ' ') p++;
    if (*p != ':') return NULL;
    p++;
    while (*p == ' ') p++;
    return p;
}

/* Reads an .npy header: dtype (f32 or f16), shape (rank, dims), the data offset. */
static fasa_status s_npy_header(const char *path, int *dtype_p, int *rank_p, int64_t *shape,
                                int64_t *offset_p, fasa_error *err)
{
    const char *name = s_base(path);
    const int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return fasa_error_set(err, errno == ENOENT ? FASA_NOT_FOUND : FASA_INVALID_ARGUMENT,
                              "%s: %s", name, strerror(errno));
    uint8_t pre[12];
    char *h = NULL;
    fasa_status st = FASA_OK;
    const ssize_t got = pread(fd, pre, sizeof(pre), 0);
    if (got < 10 || memcmp(pre, "\x93NUMPY", 6)) {
        st = fasa_error_set(err, FASA_INVALID_ARGUMENT, "%s: not an .npy file (bad magic)", name);
        goto out;
    }
    const int major = pre[6];
    int64_t hlen, hoff;
    if (major == 1) {
        hlen = pre[8] | pre[9] << 8;
        hoff = 10;
    } else if ((major == 2 || major == 3) && got >= 12) {
        hlen = (int64_t)pre[8] | (int64_t)pre[9] << 8 | (int64_t)pre[10] << 16 |
               (int64_t)pre[11] << 24;
        hoff = 12;
    } else {
        st = fasa_error_set(err, FASA_INVALID_ARGUMENT, "%s: .npy version %d is not 1, 2 or 3",
                            name, major);
        goto out;
    }
    if (hlen < 1 || hlen > NPY_MAX_HEADER || !(h = malloc((size_t)hlen + 1)) ||
        pread(fd, h, (size_t)hlen, hoff) != hlen) {
        st = fasa_error_set(err, FASA_INVALID_ARGUMENT, "%s: header of %lld bytes is truncated",
                            name, (long long)hlen);
        goto out;
    }
    h[hlen] = 0;
    const char *d = s_dict_value(h, "descr"), *fo = s_dict_value(h, "fortran_order"),
               *sh = s_dict_value(h, "shape");
    if (!d || !fo || !sh) {
        st = fasa_error_set(err, FASA_INVALID_ARGUMENT, "%s: header lacks %s", name,
                            !d    ? "descr"
                            : !fo ? "fortran_order"
                                  : "shape");
        goto out;
    }
    if (!strncmp(d, "'<f4'", 5) || !strncmp(d, "\"<f4\"", 5))
        *dtype_p = FASA_DTYPE_F32;
    else if (!strncmp(d, "'<f2'", 5) || !strncmp(d, "\"<f2\"", 5))
        *dtype_p = FASA_DTYPE_F16;
    else {
        int n = 0;
        while (d[n] && d[n] != ',' && n < 12) n++;
        st =
            fasa_error_set(err, FASA_INVALID_ARGUMENT,
                           "%s: descr %.*s must be '<f4' (float32) or '<f2' (float16)", name, n, d);
        goto out;
    }
    if (strncmp(fo, "False", 5)) {
        st = fasa_error_set(err, FASA_INVALID_ARGUMENT, "%s: fortran_order must be False (C order)",
                            name);
        goto out;
    }
    if (*sh != '(') {
        st = fasa_error_set(err, FASA_INVALID_ARGUMENT, "%s: shape is not a tuple", name);
        goto out;
    }
    int rank = 0;
    const char *p = sh + 1;
    for (;;) {
        while (*p == ' ') p++;
        if (*p == ')') break;
        char *end;
        errno = 0;
        const long long v = strtoll(p, &end, 10);
        if (end == p || v < 0 || errno || rank == 4) {
            st = fasa_error_set(err, FASA_INVALID_ARGUMENT, "%s: shape %.40s is not up to 4 sizes",
                                name, sh);
            goto out;
        }
        shape[rank++] = v;
        p = end;
        while (*p == ' ') p++;
        if (*p == ',') p++;
    }
    *rank_p = rank;
    *offset_p = hoff + hlen;
out:
    free(h);
    close(fd);
    return st;
}

static void s_shape_text(char *buf, size_t len, int rank, const int64_t *shape)
{
    size_t n = (size_t)snprintf(buf, len, "(");
    for (int i = 0; i < rank && n < len; i++)
        n += (size_t)snprintf(buf + n, len - n, "%s%lld", i ? ", " : "", (long long)shape[i]);
    if (n < len) snprintf(buf + n, len - n, ")");
}

/* One .npy file of the load: header checked against (lead dims.., n_kv_heads, head_dim),
 * its size against the header. lead: 1 (T) or 2 (n_layers, T); lead0 is n_layers then. */
static fasa_status s_npy_src(const char *path, const char *root, int lead, int n_layers, int n_kv,
                             int d, int64_t *T_p, load_src *src, fasa_error *err)
{
    int dtype = 0, rank = 0;
    int64_t shape[4] = {0}, off = 0, size = 0;
    fasa_status st = s_npy_header(path, &dtype, &rank, shape, &off, err);
    if (st || (st = s_stat_file(path, root, &size, err))) return st;
    char got[96];
    s_shape_text(got, sizeof(got), rank, shape);
    if (rank != lead + 2 || shape[lead] != n_kv || shape[lead + 1] != d ||
        (lead == 2 && shape[0] != n_layers))
        return lead == 1 ? fasa_error_set(err, FASA_INVALID_ARGUMENT,
                                          "%s: shape %s must be (T, n_kv_heads %d, head_dim %d)",
                                          s_base(path), got, n_kv, d)
                         : fasa_error_set(err, FASA_INVALID_ARGUMENT,
                                          "%s: shape %s must be (n_layers %d, T, n_kv_heads %d, "
                                          "head_dim %d)",
                                          s_base(path), got, n_layers, n_kv, d);
    const int64_t T = shape[lead - 1];
    if (T < 1 || T > INT32_MAX)
        return fasa_error_set(err, FASA_INVALID_ARGUMENT, "%s: T = %lld must be in [1, %d]",
                              s_base(path), (long long)T, INT32_MAX);
    const int64_t row = (int64_t)n_kv * d * (int64_t)fasa_dtype_size(dtype);
    const int64_t need = off + (lead == 2 ? n_layers : 1) * T * row;
    if (size < need)
        return fasa_error_set(err, FASA_INVALID_ARGUMENT,
                              "%s: the file holds %lld bytes; its header %s promises %lld",
                              s_base(path), (long long)size, got, (long long)need);
    *T_p = T;
    memset(src, 0, sizeof(*src));
    src->offset = off;
    src->stride = row;
    src->dtype = dtype;
    if (snprintf(src->path, sizeof(src->path), "%s", path) >= (int)sizeof(src->path))
        return fasa_error_set(err, FASA_INVALID_ARGUMENT, "%s: path too long", s_base(path));
    return FASA_OK;
}

static fasa_status s_same_T(const char *path, int64_t T, const char *first, int64_t T0,
                            fasa_error *err)
{
    if (T == T0) return FASA_OK;
    return fasa_error_set(err, FASA_INVALID_ARGUMENT,
                          "%s: T = %lld rows, but %s holds %lld (every file must hold the same T)",
                          s_base(path), (long long)T, s_base(first), (long long)T0);
}

static fasa_status s_qkv1(const char *path, const char *root, int n_layers, int n_kv, int d,
                          fasa_load_plan *plan, fasa_error *err)
{
    const char *name = s_base(path);
    int64_t size;
    fasa_status st = s_stat_file(path, root, &size, err);
    if (st) return st;
    const int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return fasa_error_set(err, FASA_INVALID_ARGUMENT, "%s: %s", name, strerror(errno));
    uint8_t hb[40];
    const ssize_t got = pread(fd, hb, sizeof(hb), 0);
    close(fd);
    if (got != 40 || memcmp(hb, "QKV1", 4))
        return fasa_error_set(err, FASA_INVALID_ARGUMENT,
                              "%s: not a QKV1 dump (magic) nor a load directory", name);
    int32_t h[9];
    memcpy(h, hb + 4, sizeof(h));
    const int32_t version = h[0], T = h[1], L = h[2], nh = h[3], nkv = h[4], hd = h[5],
                  vocab = h[6];
    if (version != 1)
        return fasa_error_set(err, FASA_INVALID_ARGUMENT, "%s: version %d is not 1", name, version);
    if (T < 1 || nh < 1 || vocab < 0)
        return fasa_error_set(err, FASA_INVALID_ARGUMENT,
                              "%s: T %d, n_heads %d or vocab %d out of range", name, T, nh, vocab);
    if (L != n_layers)
        return fasa_error_set(err, FASA_INVALID_ARGUMENT,
                              "%s: n_layers %d differs from the session's %d", name, L, n_layers);
    if (nkv != n_kv)
        return fasa_error_set(err, FASA_INVALID_ARGUMENT,
                              "%s: n_kv_heads %d differs from the session's %d", name, nkv, n_kv);
    if (hd != d)
        return fasa_error_set(err, FASA_INVALID_ARGUMENT,
                              "%s: head_dim %d differs from the session's %d", name, hd, d);
    const int64_t q_bytes = (int64_t)T * nh * d * 4, kv_bytes = (int64_t)T * nkv * d * 4;
    const int64_t base = 40 + 4 * (int64_t)T + 4 * (int64_t)vocab;
    const int64_t need = base + (int64_t)L * (q_bytes + 2 * kv_bytes);
    if (size < need)
        return fasa_error_set(err, FASA_INVALID_ARGUMENT,
                              "%s: the file holds %lld bytes; its header (T %d, %d layers) "
                              "promises %lld",
                              name, (long long)size, T, L, (long long)need);
    plan->T = T;
    for (int l = 0; l < L; l++) {
        const int64_t lo = base + (int64_t)l * (q_bytes + 2 * kv_bytes);
        plan->k[l] = (load_src){.offset = lo + q_bytes, .stride = (int64_t)nkv * d * 4};
        plan->v[l] = (load_src){.offset = lo + q_bytes + kv_bytes, .stride = (int64_t)nkv * d * 4};
        snprintf(plan->k[l].path, sizeof(plan->k[l].path), "%s", path);
        snprintf(plan->v[l].path, sizeof(plan->v[l].path), "%s", path);
    }
    plan->format = "qkv1";
    return FASA_OK;
}

fasa_status fasa_load_plan_open(const char *path, const char *root, int n_layers, int n_kv_heads,
                                int head_dim, fasa_load_plan *plan, fasa_error *err)
{
    memset(plan, 0, sizeof(*plan));
    struct stat sb;
    if (stat(path, &sb))
        return fasa_error_set(err, errno == ENOENT ? FASA_NOT_FOUND : FASA_INVALID_ARGUMENT,
                              "load_session.path %s: %s", s_base(path), strerror(errno));
    plan->n_layers = n_layers;
    plan->k = calloc((size_t)n_layers, sizeof(load_src));
    plan->v = calloc((size_t)n_layers, sizeof(load_src));
    if (!plan->k || !plan->v) {
        fasa_load_plan_free(plan);
        return fasa_error_set(err, FASA_RESOURCE_EXHAUSTED, "load: out of memory");
    }
    fasa_status st = FASA_OK;
    char f[LOAD_MAX_PATH + 32], first[LOAD_MAX_PATH + 32] = "";
    if (S_ISREG(sb.st_mode)) {
        st = s_qkv1(path, root, n_layers, n_kv_heads, head_dim, plan, err);
    } else if (!S_ISDIR(sb.st_mode)) {
        st = fasa_error_set(err, FASA_INVALID_ARGUMENT,
                            "load_session.path %s is neither a directory nor a QKV1 file",
                            s_base(path));
    } else {
        snprintf(f, sizeof(f), "%s/k_0.npy", path);
        const int per_layer = access(f, F_OK) == 0;
        snprintf(f, sizeof(f), "%s/k.npy", path);
        const int stacked = access(f, F_OK) == 0;
        if (per_layer == stacked) {
            st = fasa_error_set(err, FASA_INVALID_ARGUMENT,
                                per_layer ? "%s: holds both k_0.npy and k.npy; keep one layout"
                                          : "%s: holds neither k_0.npy, v_0.npy ... (one file per "
                                            "layer) nor k.npy, v.npy (all layers)",
                                s_base(path));
        } else if (per_layer) {
            plan->format = "npy";
            for (int l = 0; l < n_layers && !st; l++)
                for (int kv = 0; kv < 2 && !st; kv++) {
                    int64_t T = 0;
                    snprintf(f, sizeof(f), "%s/%c_%d.npy", path, kv ? 'v' : 'k', l);
                    st = s_npy_src(f, root, 1, n_layers, n_kv_heads, head_dim, &T,
                                   kv ? &plan->v[l] : &plan->k[l], err);
                    if (!st && !*first) {
                        snprintf(first, sizeof(first), "%s", f);
                        plan->T = T;
                    } else if (!st) {
                        st = s_same_T(f, T, first, plan->T, err);
                    }
                }
            snprintf(f, sizeof(f), "%s/k_%d.npy", path, n_layers);
            if (!st && access(f, F_OK) == 0)
                st = fasa_error_set(err, FASA_INVALID_ARGUMENT,
                                    "k_%d.npy: the session has %d layers (0 .. %d); the directory "
                                    "holds more",
                                    n_layers, n_layers, n_layers - 1);
        } else {
            plan->format = "stacked";
            load_src s[2];
            int64_t T[2] = {0, 0};
            for (int kv = 0; kv < 2 && !st; kv++) {
                snprintf(f, sizeof(f), "%s/%c.npy", path, kv ? 'v' : 'k');
                st = s_npy_src(f, root, 2, n_layers, n_kv_heads, head_dim, &T[kv], &s[kv], err);
                if (!st && kv) {
                    snprintf(first, sizeof(first), "%s/k.npy", path);
                    st = s_same_T(f, T[1], first, T[0], err);
                }
            }
            plan->T = T[0];
            for (int l = 0; l < n_layers && !st; l++)
                for (int kv = 0; kv < 2; kv++) {
                    load_src *d = kv ? &plan->v[l] : &plan->k[l];
                    *d = s[kv];
                    d->offset += (int64_t)l * T[0] * s[kv].stride;
                }
        }
    }
    if (st) {
        fasa_load_plan_free(plan);
        return st;
    }
    for (int l = 0; l < n_layers; l++)
        plan->file_bytes += plan->T * (plan->k[l].stride + plan->v[l].stride);
    return FASA_OK;
}

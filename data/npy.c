#include "npy.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int npy_write(const char *path, const char *dtype, int n_dims, const int64_t *shape,
              const void *data, char *err, size_t err_len)
{
    char hdr[512];
    int len =
        snprintf(hdr, sizeof(hdr), "{'descr': '%s', 'fortran_order': False, 'shape': (", dtype);
    size_t n = 1;
    for (int i = 0; i < n_dims; i++) {
        len += snprintf(hdr + len, sizeof(hdr) - len, "%lld,%s", (long long)shape[i],
                        i + 1 < n_dims ? " " : "");
        n *= (size_t)shape[i];
    }
    len += snprintf(hdr + len, sizeof(hdr) - len, "), }");
    /* Pad with spaces so that magic + lengths + header is a multiple of 64, ending in \n. */
    const int total = ((10 + len + 1 + 63) / 64) * 64;
    while (10 + len + 1 < total) hdr[len++] = ' ';
    hdr[len++] = '\n';
    FILE *f = fopen(path, "wb");
    if (!f) {
        snprintf(err, err_len, "cannot write %s: %s", path, strerror(errno));
        return -1;
    }
    const unsigned char pre[10] = {0x93,
                                   'N',
                                   'U',
                                   'M',
                                   'P',
                                   'Y',
                                   1,
                                   0,
                                   (unsigned char)(len & 0xff),
                                   (unsigned char)(len >> 8)};
    int ok = fwrite(pre, 1, 10, f) == 10 && fwrite(hdr, 1, (size_t)len, f) == (size_t)len &&
             fwrite(data, 4, n, f) == n;
    if (fclose(f) != 0) ok = 0;
    if (!ok) {
        snprintf(err, err_len, "cannot write %s: %s", path, strerror(errno));
        return -1;
    }
    return 0;
}

/* npy_read_f32, or with f16_ok also "<f2" (*f16_p says which). */
static int s_read(const char *path, int f16_ok, void **data_p, int *f16_p, int *n_dims_p,
                  int64_t *shape_p, char *err, size_t err_len);

int npy_read_f32(const char *path, float **data_p, int *n_dims_p, int64_t *shape_p, char *err,
                 size_t err_len)
{
    int f16 = 0;
    void *d = NULL;
    const int rc = s_read(path, 0, &d, &f16, n_dims_p, shape_p, err, err_len);
    *data_p = d;
    return rc;
}

int npy_read_f32_f16(const char *path, void **data_p, int *f16_p, int *n_dims_p, int64_t *shape_p,
                     char *err, size_t err_len)
{
    return s_read(path, 1, data_p, f16_p, n_dims_p, shape_p, err, err_len);
}

static int s_read(const char *path, int f16_ok, void **data_p, int *f16_p, int *n_dims_p,
                  int64_t *shape_p, char *err, size_t err_len)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        snprintf(err, err_len, "cannot open %s: %s", path, strerror(errno));
        return -1;
    }
    unsigned char pre[12];
    char *hdr = NULL;
    void *data = NULL;
    if (fread(pre, 1, 10, f) != 10 || memcmp(pre, "\x93NUMPY", 6) != 0) {
        snprintf(err, err_len, "%s: not a .npy file (bad magic)", path);
        goto fail;
    }
    size_t hlen = pre[8] | (size_t)pre[9] << 8;
    if (pre[6] >= 2) {
        if (fread(pre + 10, 1, 2, f) != 2) goto truncated;
        hlen |= (size_t)pre[10] << 16 | (size_t)pre[11] << 24;
    }
    if (hlen > 65536) {
        snprintf(err, err_len, "%s: header of %zu bytes is too long", path, hlen);
        goto fail;
    }
    hdr = calloc(hlen + 1, 1);
    if (!hdr || fread(hdr, 1, hlen, f) != hlen) goto truncated;
    const int f16 = f16_ok && strstr(hdr, "'descr': '<f2'") != NULL;
    const size_t esz = f16 ? 2 : sizeof(float);
    if (!f16 && !strstr(hdr, "'descr': '<f4'")) {
        snprintf(err, err_len, "%s: dtype must be little-endian float32 ('<f4')%s", path,
                 f16_ok ? " or float16 ('<f2')" : "");
        goto fail;
    }
    if (strstr(hdr, "'fortran_order': True")) {
        snprintf(err, err_len, "%s: Fortran-order arrays are not supported", path);
        goto fail;
    }
    const char *s = strstr(hdr, "'shape': (");
    if (!s) {
        snprintf(err, err_len, "%s: header has no shape", path);
        goto fail;
    }
    s += 10;
    int nd = 0;
    size_t n = 1;
    while (*s && *s != ')') {
        char *end;
        const long long v = strtoll(s, &end, 10);
        if (end == s) break;
        if (nd == NPY_MAX_DIMS || v < 0 || v > (1LL << 40)) {
            snprintf(err, err_len, "%s: unsupported shape", path);
            goto fail;
        }
        shape_p[nd++] = v;
        n *= (size_t)v;
        s = end;
        while (*s == ',' || *s == ' ') s++;
    }
    data = malloc(n ? n * esz : 1);
    if (!data) {
        snprintf(err, err_len, "%s: out of memory for %zu elements", path, n);
        goto fail;
    }
    if (fread(data, esz, n, f) != n) goto truncated;
    free(hdr);
    fclose(f);
    *data_p = data;
    *f16_p = f16;
    *n_dims_p = nd;
    return 0;
truncated:
    snprintf(err, err_len, "%s: file is truncated", path);
fail:
    free(hdr);
    free(data);
    fclose(f);
    return -1;
}

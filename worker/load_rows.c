/* Bulk load on one shard. See load_rows.h. */
#define _GNU_SOURCE
#include "load_rows.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "dtype.h"
#include "simd.h"

/* Rows read, checked and appended at a time: bounded buffers, and appends large enough
 * to run at the store's speed. */
#define LOAD_CHUNK 1024
/* Values must be finite and below 2^50 in magnitude (the engine's rule for appends). */
#define LOAD_MAX_ABS_EXP (127 + 50)

static double s_now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static int s_open(const load_src *src, int which, load_report *rep)
{
    const int fd = open(src->path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        rep->err = LOAD_EIO, rep->err_no = errno, rep->which = which;
        return -1;
    }
    return fd;
}

/* Reads n rows from row r0 of src into buf (n * row_bytes bytes). */
static int s_read_rows(int fd, const load_src *src, int64_t r0, int n, size_t row_bytes,
                       uint8_t *buf, int which, load_report *rep)
{
    const double t0 = s_now();
    const int contiguous = src->stride == (int64_t)row_bytes;
    const int pieces = contiguous ? 1 : n;
    const size_t piece = contiguous ? (size_t)n * row_bytes : row_bytes;
    for (int i = 0; i < pieces; i++) {
        const int64_t off = src->offset + (r0 + i) * src->stride;
        uint8_t *dst = buf + (size_t)i * piece;
        size_t got = 0;
        while (got < piece) {
            const ssize_t r = pread(fd, dst + got, piece - got, (off_t)(off + (int64_t)got));
            if (r < 0 && errno == EINTR) continue;
            if (r <= 0) {
                rep->err = r < 0 ? LOAD_EIO : LOAD_ESHORT;
                rep->err_no = r < 0 ? errno : 0;
                rep->which = which;
                rep->row = r0 + i + (int64_t)(got / row_bytes);
                return -1;
            }
            got += (size_t)r;
        }
    }
    rep->read_s += s_now() - t0;
    rep->file_bytes += (int64_t)n * (int64_t)row_bytes;
    return 0;
}

/* The first element of n that is not finite, is 2^50 or more in magnitude, or overflows
 * the storage dtype; -1 when all are good. One pass over exponent bits in the common case. */
static long s_bad_value(int store_dtype, size_t n, const float *x)
{
    uint32_t bad = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t b;
        memcpy(&b, x + i, sizeof(b));
        bad |= (b & 0x7f800000u) >= ((uint32_t)LOAD_MAX_ABS_EXP << 23);
    }
    if (store_dtype == FASA_DTYPE_F16)
        for (size_t i = 0; i < n; i++) bad |= fabsf(x[i]) >= 65520.0f;
    if (!bad) return -1;
    for (size_t i = 0; i < n; i++) {
        uint32_t b;
        memcpy(&b, x + i, sizeof(b));
        if ((b & 0x7f800000u) >= ((uint32_t)LOAD_MAX_ABS_EXP << 23) ||
            fasa_dtype_overflows(store_dtype, x[i]))
            return (long)i;
    }
    return -1;
}

static int s_job_ok(const load_job *job, const shard_layout *lay)
{
    const load_src *s[2] = {&job->k, &job->v};
    if (job->layer < 0 || job->layer >= lay->n_layers || job->block < 1 || job->n_shards < 1 ||
        job->shard < 0 || job->shard >= job->n_shards || job->T < 0 || job->T > INT32_MAX)
        return 0;
    for (int i = 0; i < 2; i++)
        if ((s[i]->dtype != FASA_DTYPE_F32 && s[i]->dtype != FASA_DTYPE_F16) || s[i]->offset < 0 ||
            s[i]->stride < 1 || !memchr(s[i]->path, 0, sizeof(s[i]->path)) || !s[i]->path[0])
            return 0;
    return 1;
}

int shard_load_layer(shard_t *shard, const load_job *job, load_report *rep)
{
    const double t_start = s_now();
    memset(rep, 0, sizeof(*rep));
    const shard_layout *lay = shard_layout_of(shard);
    if (!s_job_ok(job, lay)) {
        rep->err = LOAD_EJOB;
        return -1;
    }
    const size_t row = (size_t)lay->n_kv_heads * lay->head_dim;
    const load_src *src[2] = {&job->k, &job->v};
    size_t row_bytes[2];
    int fd[2] = {-1, -1};
    for (int i = 0; i < 2; i++) row_bytes[i] = row * fasa_dtype_size(src[i]->dtype);
    float *f[2] = {malloc(LOAD_CHUNK * row * sizeof(float)),
                   malloc(LOAD_CHUNK * row * sizeof(float))};
    uint8_t *raw = malloc(LOAD_CHUNK * row * sizeof(float));
    int32_t *pos = malloc(LOAD_CHUNK * sizeof(int32_t));
    int rc = -1;
    if (!f[0] || !f[1] || !raw || !pos) {
        rep->err = LOAD_ENOMEM;
        goto done;
    }
    for (int i = 0; i < 2; i++)
        if ((fd[i] = s_open(src[i], i, rep)) < 0) goto done;
    const int64_t T = job->T, B = job->block, S = job->n_shards;
    for (int64_t b0 = (int64_t)job->shard * B; b0 < T; b0 += S * B) {
        const int64_t b1 = b0 + B < T ? b0 + B : T;
        /* The next block of this shard: ask the kernel to read it ahead while this one is
         * converted and stored (sequential readahead stops at the gap between blocks). */
        const int64_t nb0 = b0 + S * B;
        if (nb0 < T)
            for (int i = 0; i < 2; i++) {
                const int64_t nb1 = nb0 + B < T ? nb0 + B : T;
                (void)posix_fadvise(fd[i], (off_t)(src[i]->offset + nb0 * src[i]->stride),
                                    (off_t)((nb1 - nb0) * src[i]->stride), POSIX_FADV_WILLNEED);
            }
        for (int64_t r0 = b0; r0 < b1; r0 += LOAD_CHUNK) {
            const int n = (int)(b1 - r0 < LOAD_CHUNK ? b1 - r0 : LOAD_CHUNK);
            for (int i = 0; i < 2; i++) {
                uint8_t *dst = src[i]->dtype == FASA_DTYPE_F32 ? (uint8_t *)f[i] : raw;
                if (s_read_rows(fd[i], src[i], r0, n, row_bytes[i], dst, i, rep)) goto done;
                if (src[i]->dtype != FASA_DTYPE_F32)
                    dtype_to_f32(SIMD_AUTO, src[i]->dtype, (size_t)n * row, raw, f[i]);
                const long bad = s_bad_value(lay->dtype, (size_t)n * row, f[i]);
                if (bad >= 0) {
                    rep->err = LOAD_EVALUE, rep->which = i;
                    rep->row = r0 + bad / (long)row;
                    rep->elem = (int32_t)(bad % (long)row);
                    rep->value = f[i][bad];
                    goto done;
                }
            }
            if (!job->check_only) {
                for (int j = 0; j < n; j++) pos[j] = (int32_t)(r0 + j);
                if (shard_append(shard, job->layer, n, pos, f[0], f[1])) {
                    rep->err = LOAD_ENOMEM, rep->row = r0;
                    goto done;
                }
            }
            rep->rows += n;
        }
    }
    rc = 0;
done:
    for (int i = 0; i < 2; i++)
        if (fd[i] >= 0) close(fd[i]);
    free(f[0]);
    free(f[1]);
    free(raw);
    free(pos);
    rep->total_s = s_now() - t_start;
    return rc;
}

void load_report_text(const load_job *job, const load_report *rep, int store_dtype, char *buf,
                      size_t len)
{
    const load_src *src = rep->which ? &job->v : &job->k;
    const char *name = strrchr(src->path, '/');
    name = name ? name + 1 : src->path;
    const char *what = rep->which ? "v" : "k";
    switch (rep->err) {
    case LOAD_EIO:
        snprintf(buf, len, "%s (layer %d %s): %s", name, job->layer, what, strerror(rep->err_no));
        break;
    case LOAD_ESHORT:
        snprintf(buf, len, "%s (layer %d %s): the file ends before row %lld", name, job->layer,
                 what, (long long)rep->row);
        break;
    case LOAD_EVALUE:
        if (isfinite(rep->value) && fasa_dtype_overflows(store_dtype, rep->value))
            snprintf(buf, len, "%s (layer %d %s): row %lld element %d = %g overflows %s", name,
                     job->layer, what, (long long)rep->row, rep->elem, (double)rep->value,
                     fasa_dtype_name(store_dtype));
        else
            snprintf(buf, len,
                     "%s (layer %d %s): row %lld element %d = %g: values must be finite and "
                     "below 2^50 (1.1e15)",
                     name, job->layer, what, (long long)rep->row, rep->elem, (double)rep->value);
        break;
    case LOAD_ENOMEM:
        snprintf(buf, len, "layer %d: out of memory storing rows from %lld", job->layer,
                 (long long)rep->row);
        break;
    default:
        snprintf(buf, len, "layer %d: a malformed load job (a server bug)", job->layer);
        break;
    }
}

/* Bulk load on one shard. See load_rows.h. */
#define _GNU_SOURCE
#include "load_rows.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
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

int shard_load_layer_naive(shard_t *shard, const load_job *job, load_report *rep)
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

/* ---- the fast path: whole-chunk reads, checks on the file's own bits, one conversion
 * per chunk, a reader thread ahead of the store ---- */

/* Bytes of one tensor read at a time: large reads, and chunks that stay in the cache
 * between their check and their store. */
#define LOAD_READ_BYTES (512 << 10)
/* Chunks read ahead of the one being stored, plus the one being stored. */
#define LOAD_SLOTS 3

/* The first of n f16 values that is not finite (a finite f16 is below 65520, so it passes
 * every other rule and overflows no storage dtype); -1 when all are. */
static long s_bad_f16(size_t n, const uint16_t *h)
{
    unsigned bad = 0;
    for (size_t i = 0; i < n; i++) bad |= (h[i] & 0x7c00u) == 0x7c00u;
    if (!bad) return -1;
    for (size_t i = 0; i < n; i++)
        if ((h[i] & 0x7c00u) == 0x7c00u) return (long)i;
    return -1;
}

/* s_bad_value in one pass over the bits in the common case: |x| at or above the least
 * magnitude the rules refuse, 2^50, or for an f16 store 65520 (the least value that rounds
 * to infinity; a bf16 store overflows only far above 2^50). The element is then found by
 * s_bad_value's own rule. */
static long s_bad_f32(int store_dtype, size_t n, const float *x)
{
    const uint32_t lim =
        store_dtype == FASA_DTYPE_F16 ? 0x477ff000u : (uint32_t)LOAD_MAX_ABS_EXP << 23;
    uint32_t bad = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t b;
        memcpy(&b, x + i, sizeof(b));
        bad |= (b & 0x7fffffffu) >= lim;
    }
    return bad ? s_bad_value(store_dtype, n, x) : -1;
}

enum { SLOT_FREE, SLOT_READY, SLOT_FAILED, SLOT_END };

typedef struct load_slot {
    int state; /* SLOT_* */
    int64_t r0;
    int n;
    void *raw[2];         /* the file's rows of the keys and the values */
    void *conv[2];        /* their conversion, where the file's dtype is not the store's */
    const void *store[2]; /* the rows in the storage dtype: raw or conv */
} load_slot;

typedef struct load_pipe {
    const load_job *job;
    int store_dtype;
    int fd[2];
    size_t row, row_bytes[2];
    int chunk; /* rows read at a time */
    load_slot slot[LOAD_SLOTS];
    load_report rd; /* the reader's: file_bytes, read_s, and where it failed */
    int stop;       /* set by the store when it fails: the reader ends */
    int threaded;
    pthread_mutex_t mu;
    pthread_cond_t cv;
} load_pipe;

/* Reads, checks and converts the n rows at r0 into sl. 0, or -1 with p->rd saying why. */
static int s_fill(load_pipe *p, load_slot *sl, int64_t r0, int n)
{
    const load_job *job = p->job;
    const load_src *src[2] = {&job->k, &job->v};
    const int64_t B = job->block, nb0 = r0 + (int64_t)job->n_shards * B;
    if (r0 % B == 0 && nb0 < job->T) /* a block starts: the kernel reads the next one ahead */
        for (int w = 0; w < 2; w++) {
            const int64_t nb1 = nb0 + B < job->T ? nb0 + B : job->T;
            (void)posix_fadvise(p->fd[w], (off_t)(src[w]->offset + nb0 * src[w]->stride),
                                (off_t)((nb1 - nb0) * src[w]->stride), POSIX_FADV_WILLNEED);
        }
    const int dt = p->store_dtype;
    const size_t elems = (size_t)n * p->row;
    for (int w = 0; w < 2; w++) {
        const int fdt = src[w]->dtype;
        if (s_read_rows(p->fd[w], src[w], r0, n, p->row_bytes[w], sl->raw[w], w, &p->rd)) return -1;
        const long bad =
            fdt == FASA_DTYPE_F16 ? s_bad_f16(elems, sl->raw[w]) : s_bad_f32(dt, elems, sl->raw[w]);
        if (bad >= 0) {
            p->rd.err = LOAD_EVALUE, p->rd.which = w;
            p->rd.row = r0 + bad / (long)p->row;
            p->rd.elem = (int32_t)(bad % (long)p->row);
            p->rd.value = fdt == FASA_DTYPE_F16 ? fasa_f16_to_f32(((uint16_t *)sl->raw[w])[bad])
                                                : ((float *)sl->raw[w])[bad];
            return -1;
        }
        /* One conversion of the chunk into the storage dtype, the bits of an f32 append of
         * the values (shard_append_dt); the store then copies. */
        sl->store[w] = sl->raw[w];
        if (job->check_only || fdt == dt) continue;
        if (fdt == FASA_DTYPE_F32) {
            dtype_from_f32(SIMD_AUTO, dt, elems, sl->raw[w], sl->conv[w]);
        } else {
            dtype_to_f32(SIMD_AUTO, fdt, elems, sl->raw[w], sl->conv[w]);
            if (dt != FASA_DTYPE_F32) /* f16 to bf16: rounded once from the exact widening */
                dtype_from_f32(SIMD_AUTO, dt, elems, sl->conv[w], sl->raw[w]);
        }
        if (dt == FASA_DTYPE_F32 || fdt == FASA_DTYPE_F32) sl->store[w] = sl->conv[w];
    }
    sl->r0 = r0, sl->n = n;
    return 0;
}

/* The chunks of the shard's rows, in order: (*r0, *n) after (r0, n); 0 at the end. Start
 * with *n = 0 and *r0 = the shard's first row. Chunks stay inside a placement block. */
static int s_next_chunk(const load_job *job, int chunk, int64_t *r0, int *n)
{
    const int64_t B = job->block, S = job->n_shards, T = job->T;
    int64_t r = *r0 + *n;
    if (*n && r % B == 0) r += (S - 1) * B; /* the block ended: this shard's next one */
    if (r >= T) return 0;
    const int64_t b1 = (r / B + 1) * B < T ? (r / B + 1) * B : T;
    *r0 = r;
    *n = (int)(b1 - r < chunk ? b1 - r : chunk);
    return 1;
}

/* The reader: fills the slots in turn, each once the store has freed it, until the end,
 * a failure, or the store's stop. */
static void *s_reader(void *arg)
{
    load_pipe *p = arg;
    int64_t r0 = (int64_t)p->job->shard * p->job->block;
    int n = 0;
    for (int i = 0;; i = (i + 1) % LOAD_SLOTS) {
        load_slot *sl = &p->slot[i];
        pthread_mutex_lock(&p->mu);
        while (sl->state != SLOT_FREE && !p->stop) pthread_cond_wait(&p->cv, &p->mu);
        const int stop = p->stop;
        pthread_mutex_unlock(&p->mu);
        if (stop) break;
        const int more = s_next_chunk(p->job, p->chunk, &r0, &n);
        const int state = !more ? SLOT_END : s_fill(p, sl, r0, n) ? SLOT_FAILED : SLOT_READY;
        pthread_mutex_lock(&p->mu);
        sl->state = state;
        pthread_cond_broadcast(&p->cv);
        pthread_mutex_unlock(&p->mu);
        if (state != SLOT_READY) break;
    }
    return NULL;
}

static void s_pipe_free(load_pipe *p)
{
    for (int i = 0; i < 2; i++)
        if (p->fd[i] >= 0) close(p->fd[i]);
    for (int s = 0; s < LOAD_SLOTS; s++)
        for (int w = 0; w < 2; w++) {
            free(p->slot[s].raw[w]);
            free(p->slot[s].conv[w]);
        }
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
    load_pipe p = {.job = job, .store_dtype = lay->dtype, .fd = {-1, -1}};
    p.row = (size_t)lay->n_kv_heads * lay->head_dim;
    const load_src *src[2] = {&job->k, &job->v};
    for (int w = 0; w < 2; w++) p.row_bytes[w] = p.row * fasa_dtype_size(src[w]->dtype);
    const size_t widest = p.row_bytes[0] > p.row_bytes[1] ? p.row_bytes[0] : p.row_bytes[1];
    p.chunk = (int)(LOAD_READ_BYTES / widest) < 1 ? 1 : (int)(LOAD_READ_BYTES / widest);
    if (p.chunk > job->block) p.chunk = job->block;
    int32_t *pos = NULL;
    int rc = -1, ok = 1;
    /* Buffers of chunk rows of f32 (the widest element), aligned for whole-page reads. */
    const size_t bytes = ((size_t)p.chunk * p.row * sizeof(float) + 4095) & ~(size_t)4095;
    for (int s = 0; s < LOAD_SLOTS; s++)
        for (int w = 0; w < 2; w++) {
            ok &= !posix_memalign(&p.slot[s].raw[w], 4096, bytes);
            ok &= !posix_memalign(&p.slot[s].conv[w], 4096, bytes);
        }
    if (!ok || !(pos = malloc((size_t)p.chunk * sizeof(*pos)))) {
        rep->err = LOAD_ENOMEM;
        goto done;
    }
    for (int w = 0; w < 2; w++)
        if ((p.fd[w] = s_open(src[w], w, rep)) < 0) goto done;
    if (!job->check_only) { /* the shard's rows of the layer: chunks made at their size */
        const int64_t B = job->block, S = job->n_shards, T = job->T, I = job->shard;
        const int64_t full = T / (S * B), rest = T - full * S * B - I * B;
        const int64_t mine = full * B + (rest < 0 ? 0 : rest < B ? rest : B);
        shard_expect_rows(shard, job->layer, (int)(shard_rows(shard, job->layer) + mine));
    }
    pthread_t th;
    pthread_mutex_init(&p.mu, NULL);
    pthread_cond_init(&p.cv, NULL);
    /* Without a thread (none could start) the reader runs inline, one chunk at a time. */
    p.threaded = pthread_create(&th, NULL, s_reader, &p) == 0;
    int64_t r0 = (int64_t)job->shard * job->block;
    int n = 0, failed = 0;
    for (int i = 0;; i = (i + 1) % LOAD_SLOTS) {
        load_slot *sl = &p.slot[i];
        if (p.threaded) {
            pthread_mutex_lock(&p.mu);
            while (sl->state == SLOT_FREE) pthread_cond_wait(&p.cv, &p.mu);
            pthread_mutex_unlock(&p.mu);
        } else {
            sl->state = !s_next_chunk(job, p.chunk, &r0, &n) ? SLOT_END
                        : s_fill(&p, sl, r0, n)              ? SLOT_FAILED
                                                             : SLOT_READY;
        }
        if (sl->state != SLOT_READY) {
            failed = sl->state == SLOT_FAILED;
            break;
        }
        if (!job->check_only) {
            for (int j = 0; j < sl->n; j++) pos[j] = (int32_t)(sl->r0 + j);
            if (shard_append_dt(shard, job->layer, sl->n, pos, lay->dtype, sl->store[0],
                                sl->store[1])) {
                rep->err = LOAD_ENOMEM, rep->row = sl->r0;
                break;
            }
        }
        rep->rows += sl->n;
        pthread_mutex_lock(&p.mu);
        sl->state = SLOT_FREE;
        pthread_cond_broadcast(&p.cv);
        pthread_mutex_unlock(&p.mu);
    }
    if (p.threaded) {
        pthread_mutex_lock(&p.mu);
        p.stop = 1;
        pthread_cond_broadcast(&p.cv);
        pthread_mutex_unlock(&p.mu);
        pthread_join(th, NULL);
    }
    pthread_cond_destroy(&p.cv);
    pthread_mutex_destroy(&p.mu);
    shard_expect_rows(shard, job->layer, 0);
    rep->file_bytes = p.rd.file_bytes, rep->read_s = p.rd.read_s;
    if (failed) {
        rep->err = p.rd.err, rep->err_no = p.rd.err_no, rep->which = p.rd.which;
        rep->row = p.rd.row, rep->elem = p.rd.elem, rep->value = p.rd.value;
    }
    rc = failed || rep->err ? -1 : 0;
done:
    s_pipe_free(&p);
    free(pos);
    rep->total_s = s_now() - t_start;
    return rc;
}

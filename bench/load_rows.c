/* load_rows: one worker's bulk load, in process, against its parts (README "Bulk load").
 * For shard I of S of a load directory (bench/gen_load) it times, each the median of
 * --reps runs over every layer:
 *   read    the shard's rows read from the files into a buffer, 512 KB preads (the file
 *           read bandwidth: from the page cache after the first run);
 *   append  shard_append_dt of those rows, already in memory, into a fresh shard;
 *   check   shard_load_layer with check_only (read and check, nothing stored);
 *   load    shard_load_layer into a fresh shard, and shard_load_layer_naive (the reference);
 * and prints GB/s of file bytes for each with load/read (the target is >= 0.7) and
 * load/min(read, append), and whether the two loads stored the same bits. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "dtype.h"
#include "load.h"
#include "load_rows.h"
#include "shard.h"

static const char usage[] =
    "usage: load_rows --from DIR --layers L --kv-heads K --head-dim D [--dtype f32|f16|bf16]\n"
    "                 [--shards S] [--shard I] [--block B] [--reps R] [--no-naive]\n"
    "\n"
    "Times shard I of S (default 0 of 1, block 2048, 5 reps) loading DIR (k_L.npy, v_L.npy,\n"
    "see bench/gen_load) into a store of --dtype (default f16): file reads alone, the store\n"
    "alone (shard_append_dt from memory), the check-only pass, the load and its naive\n"
    "reference; GB/s of file bytes, medians, and the ratios load/read (target >= 0.7) and\n"
    "load/min(read, append). --no-naive skips the reference and the comparison.\n";

static double s_now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static int s_cmp(const void *a, const void *b)
{
    const double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double s_median(double *x, int n)
{
    qsort(x, (size_t)n, sizeof(*x), s_cmp);
    return n % 2 ? x[n / 2] : 0.5 * (x[n / 2 - 1] + x[n / 2]);
}

typedef struct bench {
    fasa_load_plan plan;
    shard_layout lay;
    int S, I, B;
    size_t row;
} bench;

/* The rows of shard I in layer l: count, and for each tensor the bytes read into buf. */
static int64_t s_rows(const bench *b)
{
    int64_t n = 0;
    for (int64_t p = 0; p < b->plan.T; p++) n += (p / b->B) % b->S == b->I;
    return n;
}

/* Reads the shard's rows of tensor src into buf (contiguous), 512 KB at a time. */
static int s_read(const load_src *src, const bench *b, uint8_t *buf)
{
    const int fd = open(src->path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    const size_t rb = b->row * fasa_dtype_size(src->dtype), piece = 512 << 10;
    size_t at = 0;
    for (int64_t b0 = (int64_t)b->I * b->B; b0 < b->plan.T; b0 += (int64_t)b->S * b->B) {
        const int64_t b1 = b0 + b->B < b->plan.T ? b0 + b->B : b->plan.T;
        const size_t len = (size_t)(b1 - b0) * rb;
        for (size_t got = 0; got < len;) {
            const size_t want = len - got < piece ? len - got : piece;
            const ssize_t r = pread(fd, buf + at + got, want,
                                    (off_t)(src->offset + b0 * (int64_t)rb + (int64_t)got));
            if (r <= 0) {
                close(fd);
                return -1;
            }
            got += (size_t)r;
        }
        at += len;
    }
    close(fd);
    return 0;
}

static int s_load(const bench *b, int naive, int check_only, shard_t **keep, double *sec)
{
    shard_t *sh = shard_new(&b->lay);
    if (!sh) return -1;
    const double t0 = s_now();
    for (int l = 0; l < b->plan.n_layers; l++) {
        const load_job job = {.layer = l,
                              .block = b->B,
                              .n_shards = b->S,
                              .shard = b->I,
                              .T = b->plan.T,
                              .check_only = check_only,
                              .k = b->plan.k[l],
                              .v = b->plan.v[l]};
        load_report rep;
        const int rc =
            naive ? shard_load_layer_naive(sh, &job, &rep) : shard_load_layer(sh, &job, &rep);
        if (rc) {
            char why[400];
            load_report_text(&job, &rep, b->lay.dtype, why, sizeof(why));
            fprintf(stderr, "load_rows: %s\n", why);
            shard_destroy(&sh);
            return -1;
        }
    }
    *sec = s_now() - t0;
    if (keep)
        *keep = sh;
    else
        shard_destroy(&sh);
    return 0;
}

int main(int argc, char **argv)
{
    const char *from = NULL, *dtn = "f16";
    int L = 0, K = 0, D = 0, reps = 5, naive = 1;
    bench b = {.S = 1, .I = 0, .B = 2048};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            fputs(usage, stdout);
            return 0;
        }
        if (!strcmp(a, "--no-naive")) {
            naive = 0;
            continue;
        }
        if (!v) {
            fprintf(stderr, "load_rows: %s needs a value\n%s", a, usage);
            return 2;
        }
        i++;
        if (!strcmp(a, "--from"))
            from = v;
        else if (!strcmp(a, "--layers"))
            L = atoi(v);
        else if (!strcmp(a, "--kv-heads"))
            K = atoi(v);
        else if (!strcmp(a, "--head-dim"))
            D = atoi(v);
        else if (!strcmp(a, "--dtype"))
            dtn = v;
        else if (!strcmp(a, "--shards"))
            b.S = atoi(v);
        else if (!strcmp(a, "--shard"))
            b.I = atoi(v);
        else if (!strcmp(a, "--block"))
            b.B = atoi(v);
        else if (!strcmp(a, "--reps"))
            reps = atoi(v);
        else {
            fprintf(stderr, "load_rows: unknown option %s\n%s", a, usage);
            return 2;
        }
    }
    fasa_dtype dt;
    if (!from || L < 1 || K < 1 || D < 1 || b.S < 1 || b.I < 0 || b.I >= b.S || b.B < 1 ||
        reps < 1 || reps > 99 || fasa_dtype_parse(dtn, &dt)) {
        fprintf(stderr, "load_rows: bad or missing options\n%s", usage);
        return 2;
    }
    fasa_error err;
    if (fasa_load_plan_open(from, NULL, L, K, D, &b.plan, &err)) {
        fprintf(stderr, "load_rows: %s\n", err.msg);
        return 1;
    }
    if (shard_layout_plain(&b.lay, L, K, K, D)) return 1;
    b.lay.dtype = dt;
    b.row = (size_t)K * D;
    const int64_t rows = s_rows(&b);
    const size_t kb = b.row * fasa_dtype_size(b.plan.k[0].dtype),
                 vb = b.row * fasa_dtype_size(b.plan.v[0].dtype);
    const double bytes = (double)rows * (double)(kb + vb) * L;
    uint8_t **kbuf = calloc((size_t)L, sizeof(*kbuf)), **vbuf = calloc((size_t)L, sizeof(*vbuf));
    int32_t *pos = malloc((size_t)(rows ? rows : 1) * sizeof(*pos));
    for (int l = 0; l < L; l++) {
        kbuf[l] = malloc((size_t)rows * kb);
        vbuf[l] = malloc((size_t)rows * vb);
        if (!kbuf[l] || !vbuf[l] || !pos) return 1;
    }
    for (int64_t p = 0, j = 0; p < b.plan.T; p++)
        if ((p / b.B) % b.S == b.I) pos[j++] = (int32_t)p;
    double t_read[99], t_app[99], t_chk[99], t_load[99], t_naive[99];
    int same = 1;
    for (int r = 0; r < reps + 1; r++) { /* the first run warms the page cache */
        const int at = r ? r - 1 : 0;
        double t0 = s_now();
        for (int l = 0; l < L; l++)
            if (s_read(&b.plan.k[l], &b, kbuf[l]) || s_read(&b.plan.v[l], &b, vbuf[l])) {
                fprintf(stderr, "load_rows: reading %s failed\n", b.plan.k[l].path);
                return 1;
            }
        t_read[at] = s_now() - t0;
        shard_t *sh = shard_new(&b.lay);
        if (!sh) return 1;
        t0 = s_now();
        for (int l = 0; l < L && b.plan.k[l].dtype == b.plan.v[l].dtype; l++)
            if (shard_expect_rows(sh, l, (int)rows),
                shard_append_dt(sh, l, (int)rows, pos, b.plan.k[l].dtype, kbuf[l], vbuf[l]))
                return 1;
        t_app[at] = s_now() - t0;
        shard_destroy(&sh);
        shard_t *a = NULL, *c = NULL;
        if (s_load(&b, 0, 1, NULL, &t_chk[at]) || s_load(&b, 0, 0, &a, &t_load[at]) ||
            (naive && s_load(&b, 1, 0, &c, &t_naive[at])))
            return 1;
        if (!naive) t_naive[at] = 1e30;
        same &= !naive || shard_store_equal(a, c);
        shard_destroy(&a);
        shard_destroy(&c);
    }
    const double gb = bytes / 1e9, rd = gb / s_median(t_read, reps),
                 ap = gb / s_median(t_app, reps), ck = gb / s_median(t_chk, reps),
                 ld = gb / s_median(t_load, reps), nv = gb / s_median(t_naive, reps);
    const double slower = rd < ap ? rd : ap;
    printf("shard %d of %d (block %d): %lld rows x %d layers, %.1f MB of %s/%s files into %s, "
           "median of %d\n",
           b.I, b.S, b.B, (long long)rows, L, bytes / 1e6, fasa_dtype_name(b.plan.k[0].dtype),
           fasa_dtype_name(b.plan.v[0].dtype), fasa_dtype_name(dt), reps);
    printf("  file read %.3f GB/s, append from memory %.3f GB/s, check-only %.3f GB/s\n", rd, ap,
           ck);
    printf("  load %.3f GB/s: load/read %.2f (target >= 0.7: %s), load/min(read, append) %.2f\n",
           ld, ld / rd, ld / rd >= 0.7 ? "met" : "not met", ld / slower);
    if (naive)
        printf("  naive load %.3f GB/s: load/naive %.2f; stores equal: %s\n", nv, ld / nv,
               same ? "yes" : "NO");
    for (int l = 0; l < L; l++) free(kbuf[l]), free(vbuf[l]);
    free(kbuf);
    free(vbuf);
    free(pos);
    shard_layout_cleanup(&b.lay);
    fasa_load_plan_free(&b.plan);
    return same ? 0 : 1;
}

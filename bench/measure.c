/* fasa bench: the figures the project is judged by, printed with their targets
 * (shared/docs/targets.md) in one run on this machine.
 *
 *   scan    the scoring scan of a real shard (shard_score, method fasa, ntip 16 of 64 FCs)
 *           against the read bandwidth of the same number of bytes: the faster of a SIMD
 *           streaming sum with independent accumulators (bench/readbw.h) and OpenBLAS
 *           cblas_sasum, one thread;
 *   attend  decode step time per method (dense, fasa, oracle) through the embedded engine or
 *           fasa-servers, for one or more context lengths; the ratio dense/fasa, the bytes
 *           each step reads, the RAM per token each storage tier holds, and (with a 1- and a
 *           2-worker server) the dense scaling from 1 to 2 workers. CSV and a gnuplot PNG.
 *
 * Both run on data/synth.h data (32 query heads, 8 KV heads, head_dim 128, 16 signal FCs
 * per KV head); the fasa profile names the generator's true signal FCs. `attend` checks its
 * own work before timing it: every output finite, and dense equal to a naive attention in
 * double on a few heads. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cblas.h>

#include "backend.h"
#include "cli.h"
#include "dense.h"
#include "dtype.h"
#include "scan.h"
#include "simd.h"
#include "engine.h"
#include "fasa_client.h"
#include "progress.h"
#include "phase.h"
#include "pool.h"
#include "readbw.h"
#include "roofline.h"
#include "shard.h"
#include "simd.h"
#include "synth.h"
#include "measure.h"
#include "timing.h"

#define BENCH_1M 1048576L
#define BENCH_N_PHASES 6
#define BENCH_MAX_THREADS 64 /* read bandwidth measured on 1 .. this many threads */

/* Targets of issue 13 (the roofline). */
#define TARGET_SCAN_ROOFLINE 0.85
#define TARGET_DENSE_ROOFLINE 0.80
#define TARGET_FASA_OVER_READ 1.3

static const char *const s_phase_names[BENCH_N_PHASES] = {"scan",   "select", "gather",
                                                          "attend", "merge",  "other"};

/* Targets (shared/docs/targets.md). */
#define TARGET_SCAN_OVER_READ 0.85
#define TARGET_DENSE_OVER_FASA 5.0
#define TARGET_TWO_OVER_ONE 1.7
#define TARGET_DISK_OVER_F16 0.30

const char *const bench_method_names[BENCH_N_METHODS] = {"dense", "fasa", "oracle"};
static const fasa_method s_method_ids[BENCH_N_METHODS] = {FASA_METHOD_DENSE, FASA_METHOD_FASA,
                                                          FASA_METHOD_ORACLE};

static const char *s_dtype(const bench_opts *o)
{
    const char *name = fasa_dtype_name(o->dtype);
    return name ? name : "?";
}

static FILE *s_open_csv(const char *cmd, const char *path, const char *header)
{
    FILE *f = fopen(path, "w");
    if (!f) {
        cli_fail(cmd, "--csv '%s': cannot open for writing", path);
        return NULL;
    }
    fprintf(f, "%s\n", header);
    return f;
}

static const char *s_met(double value, double target)
{
    return value >= target ? "met" : "not met";
}

/* ---- scan ---------------------------------------------------------------------------- */

/* The key layout a fasa profile of the generator's signal FCs gives (what the engine
 * derives from synth_true_profile): per KV head, the dims of its signal FCs packed first;
 * every query head of the group uses all of them (the generator's heads share their FCs). */
static int s_signal_layout(const synth_t *sy, shard_layout *lay)
{
    const synth_cfg *c = &sy->cfg;
    const int d = c->head_dim, grp = c->n_heads / c->n_kv_heads;
    if (shard_layout_plain(lay, 1, c->n_heads, c->n_kv_heads, d)) return -1;
    uint8_t dom[1024];
    for (int g = 0; g < c->n_kv_heads; g++) {
        memset(dom, 0, (size_t)d);
        for (int i = 0; i < d / 2; i++) {
            int d0, d1;
            fc_dims(c->pairing, d, i, &d0, &d1);
            dom[d0] = dom[d1] = (uint8_t)synth_is_signal(sy, g, i);
        }
        int *perm = lay->perm + (size_t)g * d, u = 0;
        for (int x = 0; x < d; x++)
            if (dom[x]) perm[u++] = x;
        lay->n_dom[g] = u;
        for (int x = 0, r = u; x < d; x++)
            if (!dom[x]) perm[r++] = x;
        for (int i = 0; i < grp; i++) memset(lay->qmask + (size_t)(g * grp + i) * d, 1, (size_t)u);
    }
    return 0;
}

int bench_scan(const bench_opts *o)
{
    static const char *const cmd = "bench scan";
    const int T = (int)o->sizes[0], B = 256;
    char err[256];
    synth_cfg sc = synth_cfg_default(T);
    sc.seed = (uint64_t)o->seed;
    synth_t sy;
    if (synth_init(&sy, &sc, err, sizeof(err))) return cli_fail(cmd, "%s", err);
    const int H = sc.n_heads, G = sc.n_kv_heads, d = sc.head_dim;
    const size_t row = (size_t)G * d;
    shard_layout lay = {0};
    shard_t *sh = NULL;
    float *k = malloc(SHARD_CHUNK * row * sizeof(float));
    float *v = malloc(SHARD_CHUNK * row * sizeof(float));
    float *q = malloc((size_t)H * d * sizeof(float));
    int32_t *pos = malloc(SHARD_CHUNK * sizeof(int32_t));
    topk_cand *cands = malloc((size_t)H * B * sizeof(topk_cand));
    int *n_cands = malloc((size_t)H * sizeof(int));
    double *t_simd = malloc((size_t)o->reps * sizeof(double));
    double *t_blas = malloc((size_t)o->reps * sizeof(double));
    double *t_scan = malloc((size_t)o->reps * sizeof(double));
    float *buf = NULL;
    FILE *csv = NULL;
    int rc = 1;
    float *fsc = NULL;
    topk_cand *fall = NULL, *fref = NULL;
    uint8_t *mark = NULL;
    if (!k || !v || !q || !pos || !cands || !n_cands || !t_simd || !t_blas || !t_scan ||
        s_signal_layout(&sy, &lay)) {
        cli_fail(cmd, "out of memory");
        goto done;
    }
    lay.dtype = o->dtype;
    lay.score_dtype = o->score_dtype;
    if (!(sh = shard_new(&lay))) {
        cli_fail(cmd, "out of memory");
        goto done;
    }
    const double t_build = timing_now();
    progress pr;
    progress_init(&pr, "building the shard", T);
    for (int p0 = 0; p0 < T; p0 += SHARD_CHUNK) {
        const int n = T - p0 < SHARD_CHUNK ? T - p0 : SHARD_CHUNK;
        synth_kv(&sy, p0, n, k, v);
        for (int i = 0; i < n; i++) pos[i] = p0 + i;
        if (shard_append(sh, 0, n, pos, k, v)) {
            cli_fail(cmd, "out of memory for %d tokens (about %.1f GiB)", T,
                     (double)T * row * 8 / (1u << 30));
            goto done;
        }
        progress_update(&pr, p0 + n);
    }
    progress_done(&pr);
    synth_query(&sy, T - 1, q);
    const shard_step st = {.layer = 0,
                           .method = SHARD_FASA,
                           .gqa = SHARD_GQA_PER_HEAD,
                           .budget = B,
                           .max_pos = T - 1,
                           .scale = 1.0f / sqrtf((float)d),
                           .q = q};
    if (shard_score(sh, &st, cands, n_cands)) { /* warm-up; also sizes the bytes */
        cli_fail(cmd, "out of memory in shard_score");
        goto done;
    }
    const int64_t bytes = shard_bytes_read(sh);
    const size_t n = (size_t)bytes / sizeof(float);
    if (!(buf = aligned_alloc(64, (n * sizeof(float) + 63) / 64 * 64))) {
        cli_fail(cmd, "out of memory for the %.1f MiB reference buffer", bytes / 1048576.0);
        goto done;
    }
    /* Positive values, so that sasum (a sum of |x|) is the same sum; checked in double. */
    uint64_t x = 0x9e3779b97f4a7c15ULL ^ (uint64_t)o->seed;
    double ref = 0;
    for (size_t i = 0; i < n; i++) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        buf[i] = 0.5f + (float)(x >> 40) * (1.0f / 16777216.0f);
        ref += buf[i];
    }
    /* Also a length that is no multiple of any vector width (the tail loops). */
    const size_t n_odd = n - 37;
    double ref_odd = ref;
    for (size_t i = n_odd; i < n; i++) ref_odd -= buf[i];
    const double sums[4] = {readbw_sum(n, buf), readbw_sum_portable(n, buf),
                            cblas_sasum((blasint)n, buf, 1), readbw_sum(n_odd, buf)};
    static const char *const sum_names[4] = {"SIMD sum", "portable sum", "cblas_sasum",
                                             "SIMD sum of all but the last 37"};
    for (int i = 0; i < 4; i++) {
        const double want = i == 3 ? ref_odd : ref;
        if (fabs(sums[i] - want) > 1e-3 * want) {
            cli_fail(cmd, "%s of the reference buffer is %.6g, a sum in double %.6g: wrong",
                     sum_names[i], sums[i], want);
            goto done;
        }
    }

    volatile float sink = 0.0f;
    for (long r = 0; r < o->reps; r++) { /* interleaved: drift hits all three alike */
        double t0 = timing_now();
        sink += readbw_sum(n, buf);
        t_simd[r] = timing_now() - t0;
        t0 = timing_now();
        sink += cblas_sasum((blasint)n, buf, 1);
        t_blas[r] = timing_now() - t0;
        t0 = timing_now();
        if (shard_score(sh, &st, cands, n_cands)) {
            cli_fail(cmd, "out of memory in shard_score");
            goto done;
        }
        t_scan[r] = timing_now() - t0;
    }
    (void)sink;
    /* Recall of the f32 selection: each head's top-B by f32 scores (double sums) of the
     * stored keys' dominant dims (as the scan reads them at score dtype f32), against the
     * scan's selection. */
    const int u0 = lay.n_dom[0];
    fsc = malloc((size_t)H * T * sizeof(float));
    fall = malloc((size_t)T * sizeof(topk_cand));
    fref = malloc((size_t)B * sizeof(topk_cand));
    mark = calloc((size_t)T, 1);
    if (!fsc || !fall || !fref || !mark) {
        cli_fail(cmd, "out of memory for the recall reference");
        goto done;
    }
    for (int r0 = 0; r0 < T; r0 += SHARD_CHUNK) {
        const int nr = T - r0 < SHARD_CHUNK ? T - r0 : SHARD_CHUNK;
        shard_read_rows(sh, 0, r0, nr, NULL, k, NULL);
        for (int h = 0; h < H; h++) {
            const int g = h / (H / G);
            const int *perm = lay.perm + (size_t)g * d;
            for (int j = 0; j < nr; j++) {
                double s = 0;
                for (int p = 0; p < lay.n_dom[g]; p++)
                    s += (double)q[(size_t)h * d + perm[p]] * k[((size_t)j * G + g) * d + perm[p]];
                fsc[(size_t)h * T + r0 + j] = (float)s;
            }
        }
    }
    double recall = 0, recall_min = 1;
    for (int h = 0; h < H; h++) {
        for (int j = 0; j < T; j++) fall[j] = (topk_cand){fsc[(size_t)h * T + j], j};
        const int m = topk_ref(T, B, fall, fref);
        for (int i = 0; i < m; i++) mark[fref[i].pos] = 1;
        int hit = 0;
        for (int i = 0; i < n_cands[h]; i++) hit += mark[cands[(size_t)h * B + i].pos];
        for (int i = 0; i < m; i++) mark[fref[i].pos] = 0;
        const double rc_h = m ? (double)hit / m : 1.0;
        recall += rc_h / H;
        recall_min = fmin(recall_min, rc_h);
    }
    const int R = (int)o->reps;
    const double p_simd = timing_median(R, t_simd), p_blas = timing_median(R, t_blas);
    const double p_scan = timing_median(R, t_scan);
    const double gb = (double)bytes / 1e9, gb_simd = gb / p_simd, gb_blas = gb / p_blas;
    const double gb_read = gb_simd > gb_blas ? gb_simd : gb_blas, gb_scan = gb / p_scan;
    double m_simd = t_simd[0], m_blas = t_blas[0], m_scan = t_scan[0];
    for (int r = 1; r < R; r++) {
        m_simd = fmin(m_simd, t_simd[r]);
        m_blas = fmin(m_blas, t_blas[r]);
        m_scan = fmin(m_scan, t_scan[r]);
    }
    printf("bench scan: %d tokens, %d KV heads x %d of %d key dims (ntip %d of %d FCs), %d query "
           "heads per KV head, B %d; %.1f MiB scanned per step; 1 thread, p50 of %d (+1 warm-up); "
           "shard built in %.1f s\n",
           T, G, u0, d, u0 / 2, d / 2, H / G, B, bytes / 1048576.0, R, timing_now() - t_build);
    printf(
        "dtype %s, score dtype %s (%s); cpu features: %s; simd path %s\n",
        fasa_dtype_name(o->dtype), scan_dtype_name(scan_dtype_effective(o->score_dtype, o->dtype)),
        o->score_dtype == SCAN_AUTO ? "the key store's own dominant dims" : "a packed copy of them",
        simd_cpu_features(), simd_path_name(simd_path_default()));
    if (bytes < 64L << 20)
        printf("note: %.1f MiB may fit in the last-level cache; use --tokens >= 64K for a "
               "memory bandwidth\n",
               bytes / 1048576.0);
    printf("read bandwidth, SIMD sum (%s): p50 %7.2f GB/s (%.3f ms, min %.3f ms)\n",
           readbw_sum_name(), gb_simd, 1e3 * p_simd, 1e3 * m_simd);
    printf("read bandwidth, OpenBLAS cblas_sasum: p50 %7.2f GB/s (%.3f ms, min %.3f ms)\n", gb_blas,
           1e3 * p_blas, 1e3 * m_blas);
    printf("read bandwidth (the faster): %.2f GB/s\n", gb_read);
    printf("scoring scan (shard_score, fasa): p50 %7.2f GB/s (%.3f ms, min %.3f ms, %.2f ns per "
           "token; the fused scan + top-%d selection)\n",
           gb_scan, 1e3 * p_scan, 1e3 * m_scan, 1e9 * p_scan / T, B);
    printf("recall of the f32 selection: mean %.4f, worst head %.4f (over %d query heads)\n",
           recall, recall_min, H);
    printf("scan/read = %.2f (target >= %.2f: %s)\n", gb_scan / gb_read, TARGET_SCAN_OVER_READ,
           s_met(gb_scan / gb_read, TARGET_SCAN_OVER_READ));
    if (o->csv) {
        if (!(csv = s_open_csv(cmd, o->csv, "figure,tokens,bytes,reps,p50_ms,min_ms,gb_s")))
            goto done;
        const struct {
            const char *name;
            double p50, min;
        } rows[4] = {
            {"read_simd", p_simd, m_simd},
            {"read_sasum", p_blas, m_blas},
            {"read", gb_simd > gb_blas ? p_simd : p_blas, gb_simd > gb_blas ? m_simd : m_blas},
            {"scan", p_scan, m_scan}};
        for (int i = 0; i < 4; i++)
            fprintf(csv, "%s,%d,%lld,%d,%.4f,%.4f,%.3f\n", rows[i].name, T, (long long)bytes, R,
                    1e3 * rows[i].p50, 1e3 * rows[i].min, gb / rows[i].p50);
        if (fclose(csv)) {
            csv = NULL;
            cli_fail(cmd, "--csv '%s': write failed", o->csv);
            goto done;
        }
        csv = NULL;
    }
    rc = 0;
done:
    if (csv) fclose(csv);
    shard_destroy(&sh);
    shard_layout_cleanup(&lay);
    synth_free(&sy);
    free(k);
    free(v);
    free(q);
    free(pos);
    free(cands);
    free(n_cands);
    free(t_simd);
    free(t_blas);
    free(t_scan);
    free(buf);
    free(fsc);
    free(fall);
    free(fref);
    free(mark);
    return rc;
}

/* ---- attend -------------------------------------------------------------------------- */

#define BENCH_N_CHECK 3 /* query heads checked against the naive reference */

/* One row of the results. */
typedef struct bench_row {
    long tokens;
    int target; /* index into the targets */
    int method; /* index into bench_method_names */
    double p50_ms, min_ms, max_err;
    int64_t bytes_read;
    double kv_per_token;
    double phase_ms[BENCH_N_PHASES]; /* embedded engine: mean per step (s_phase_names) */
    double mean_ms;                  /* mean step time (the phases' whole) */
    double roofline;                 /* the step's GB/s over its ceiling (scan for fasa) */
    int64_t scan_bytes;              /* fasa: the bytes phase 1 read */
} bench_row;

/* The machine's ceilings, measured once per run (bench/roofline.h). */
typedef struct bench_roof {
    char model[160], simd[160];
    int threads;
    double read[BENCH_MAX_THREADS + 1]; /* read[t]: GB/s on t threads, 1 .. threads */
    double cvt, fma;                    /* conversions/s of the dtype, FMA/s, one core */
    int scan_path;                      /* the fused scan's SIMD path (scan_path) */
    double scan_cvt, scan_fma;          /* the same two on the scan's path */
    int dense_path;                     /* the dense kernel's SIMD path (dense_path) */
    double dense_cvt, dense_fma;        /* the same two on the dense kernel's path */
} bench_roof;

typedef struct bench_target {
    const char *server; /* NULL: embedded */
    int workers;        /* shards the session spans */
    char label[64];     /* "embedded" or "server" */
} bench_target;

/* The naive reference: softmax(q k / sqrt(d)) v of a few query heads over every token, in
 * double, accumulated chunk by chunk with a running maximum. */
typedef struct naive_ref {
    int heads[BENCH_N_CHECK];
    double m[BENCH_N_CHECK], l[BENCH_N_CHECK];
    double *o; /* (BENCH_N_CHECK, head_dim) */
} naive_ref;

static void s_naive_add(naive_ref *nr, const synth_cfg *c, const float *q, int n, const float *k,
                        const float *v)
{
    const int d = c->head_dim, grp = c->n_heads / c->n_kv_heads;
    const double scale = 1.0 / sqrt((double)d);
    for (int i = 0; i < BENCH_N_CHECK; i++) {
        const int h = nr->heads[i], g = h / grp;
        const float *qh = q + (size_t)h * d;
        double *o = nr->o + (size_t)i * d;
        for (int j = 0; j < n; j++) {
            const float *kj = k + ((size_t)j * c->n_kv_heads + g) * d;
            const float *vj = v + ((size_t)j * c->n_kv_heads + g) * d;
            double s = 0;
            for (int x = 0; x < d; x++) s += (double)qh[x] * kj[x];
            s *= scale;
            if (s > nr->m[i]) {
                const double f = exp(nr->m[i] - s);
                nr->l[i] *= f;
                for (int x = 0; x < d; x++) o[x] *= f;
                nr->m[i] = s;
            }
            const double w = exp(s - nr->m[i]);
            nr->l[i] += w;
            for (int x = 0; x < d; x++) o[x] += w * vj[x];
        }
    }
}

/* Appends the synthetic context to a session in chunks; feeds the naive reference too when
 * nr is not NULL. */
static fasa_status s_fill(backend *b, const char *id, const synth_t *sy, int chunk, float *k,
                          float *v, naive_ref *nr, const float *q0, fasa_error *fe)
{
    const int T = sy->cfg.n_tokens;
    progress pr;
    progress_init(&pr, "appending", T);
    for (int p0 = 0; p0 < T; p0 += chunk) {
        const int n = T - p0 < chunk ? T - p0 : chunk;
        synth_kv(sy, p0, n, k, v);
        if (nr) s_naive_add(nr, &sy->cfg, q0, n, k, v);
        fasa_status st = backend_append(b, id, 0, p0, n, k, v, fe);
        if (st) return st;
        progress_update(&pr, p0 + n);
    }
    progress_done(&pr);
    return FASA_OK;
}

static double s_max_abs_diff(size_t n, const float *a, const float *b)
{
    double w = 0;
    for (size_t i = 0; i < n; i++) w = fmax(w, fabs((double)a[i] - b[i]));
    return w;
}

/* One decode step of method m over the whole context of session "bench"; 0, or 1 with the
 * error printed. */
static int s_step(backend *b, const char *where, int m, const float *q, float *out,
                  fasa_step_stats *st)
{
    const fasa_attend_req req = {
        .layer = 0, .q = q, .method = (int)s_method_ids[m], .budget = 0, .gqa = -1, .max_pos = -1};
    fasa_error fe;
    if (!backend_attend(b, "bench", &req, out, NULL, st, &fe)) return 0;
    return cli_fail("bench attend", "attend %s (%s): %s: %s", bench_method_names[m], where,
                    fasa_status_name(fe.code), fe.msg);
}

/* The read bandwidth at the threads the steps use. */
static double s_read_gbs(const bench_roof *rf)
{
    return rf->read[rf->threads];
}

/* A method's phases (sum over R steps in ph, seconds; step times ms[R]) into row and
 * printed in ms and GB/s against the roofline; row->roofline gets the figure its target
 * reads: dense over the dense ceiling, fasa's scan over the scan ceiling. */
static void s_phases(const bench_opts *o, const bench_roof *rf, const synth_cfg *c, bench_row *row,
                     const double *ph, const double *ms, int R)
{
    const int G = c->n_kv_heads, grp = c->n_heads / G, u = 32; /* ntip 16: 32 packed dims */
    const size_t esz = fasa_dtype_size(o->dtype);
    const double read = s_read_gbs(rf), thr = rf->threads;
    double mean = 0;
    for (int r = 0; r < R; r++) mean += ms[r] / R;
    /* gather and attend split phase 2's wall time by the shards' own sums of the two. */
    const double inner = ph[FASA_PHASE_GATHER] + ph[FASA_PHASE_KERNEL];
    const double gshare = inner > 0 ? ph[FASA_PHASE_GATHER] / inner : 0;
    double *p = row->phase_ms;
    p[0] = 1e3 * ph[FASA_PHASE_SCAN] / R;
    p[1] = 1e3 * ph[FASA_PHASE_SELECT] / R;
    p[2] = 1e3 * ph[FASA_PHASE_ATTEND] * gshare / R;
    p[3] = 1e3 * ph[FASA_PHASE_ATTEND] * (1 - gshare) / R;
    p[4] = 1e3 * ph[FASA_PHASE_MERGE] / R;
    p[5] = fmax(0, mean - (p[0] + p[1] + p[2] + p[3] + p[4]));
    row->mean_ms = mean;
    const int dense = row->method == 0;
    /* Bytes per phase: the scan reads the packed dims of every token, phase 2 the rest. */
    const int64_t scan_b = dense ? 0 : (int64_t)row->tokens * G * u * (int64_t)esz;
    const int64_t p2_b = row->bytes_read - scan_b;
    row->scan_bytes = scan_b;
    /* Compute ceilings (GB/s, T threads): the scan converts each packed element once for
     * grp heads (per-head GQA: grp FMA each); dense converts K and V once for grp heads;
     * phase 2 of a sparse step gathers rows for one head each. */
    const double c_scan = thr * roofline_compute_gbs(esz, grp, rf->scan_cvt, rf->scan_fma);
    const double c_p2 = thr * (dense ? roofline_compute_gbs(esz, grp, rf->dense_cvt, rf->dense_fma)
                                     : roofline_compute_gbs(esz, 1, rf->cvt, rf->fma));
    const double roof_scan = fmin(read, c_scan), roof_p2 = fmin(read, c_p2);
    for (int i = 0; i < BENCH_N_PHASES; i++) {
        if (dense && i < 3) continue; /* no scan, select or gather */
        /* Bytes per phase for fasa and dense (oracle's scan reads whole rows: ms only). */
        const int64_t by = row->method > 1 ? 0 : i == 0 ? scan_b : i == 2 || i == 3 ? p2_b : 0;
        /* gather and attend are one pass over the rows phase 2 reads: both get its GB/s. */
        const double t_ms = i == 2 || i == 3 ? p[2] + p[3] : p[i];
        if (by > 0 && t_ms > 0) {
            const double gbs = by / (t_ms * 1e6), roof = i == 0 ? roof_scan : roof_p2;
            printf("phase %-6s %-6s %9.3f ms  %6.2f GB/s  %.2f of roofline %.2f GB/s (%s)\n",
                   bench_method_names[row->method], s_phase_names[i], p[i], gbs, gbs / roof, roof,
                   roof == read ? "read" : "compute");
        } else {
            printf("phase %-6s %-6s %9.3f ms\n", bench_method_names[row->method], s_phase_names[i],
                   p[i]);
        }
    }
    const double t_scan = p[0], t_p2 = p[2] + p[3];
    if (dense) {
        row->roofline = t_p2 > 0 ? p2_b / (t_p2 * 1e6) / roof_p2 : 0;
        const double step = row->bytes_read / (mean * 1e6) / roof_p2;
        printf("dense: kernel %.2f of its roofline (%.2f GB/s), whole step %.2f (target >= %.2f "
               "%s: %s)\n",
               row->roofline, roof_p2, step, TARGET_DENSE_ROOFLINE,
               row->tokens >= BENCH_1M && o->dtype == FASA_DTYPE_F16 ? "at 1M f16"
                                                                     : "applies at 1M f16",
               s_met(step, TARGET_DENSE_ROOFLINE));
    } else if (row->method == 1) {
        row->roofline = t_scan > 0 ? scan_b / (t_scan * 1e6) / roof_scan : 0;
        const double over = mean / (row->bytes_read / (read * 1e6));
        printf("fasa: scan %.2f of its roofline (target >= %.2f); step = %.2fx the time its %.1f "
               "MiB take at the read bandwidth (target <= %.1f); %s at 1M f16\n",
               row->roofline, TARGET_SCAN_ROOFLINE, over, row->bytes_read / 1048576.0,
               TARGET_FASA_OVER_READ,
               row->tokens >= BENCH_1M && o->dtype == FASA_DTYPE_F16
                   ? (row->roofline >= TARGET_SCAN_ROOFLINE && over <= TARGET_FASA_OVER_READ
                          ? "met"
                          : "not met")
                   : "targets apply");
    }
}

/* Runs one context length on one target: appends rows (one per timed method) to rows. */
static int s_attend_one(const bench_opts *o, const bench_roof *rf, const bench_target *tg, int ti,
                        const synth_t *sy, const fasa_profile *prof, naive_ref *nr, int fill_ref,
                        bench_row *rows, int *n_rows)
{
    static const char *const cmd = "bench attend";
    const synth_cfg *c = &sy->cfg;
    const int T = c->n_tokens, H = c->n_heads, G = c->n_kv_heads, d = c->head_dim;
    const size_t row = (size_t)G * d, qn = (size_t)H * d;
    const int R = (int)o->reps;
    fasa_error fe = {0};
    backend *b = backend_open(tg->server, (int)o->shards, FASA_DEFAULT_BLOCK, &fe);
    if (!b) return cli_fail(cmd, "%s: %s", tg->server ? tg->server : "embedded engine", fe.msg);
    const char *where = backend_describe(b);
    float *k = malloc((size_t)o->chunk * row * sizeof(float));
    float *v = malloc((size_t)o->chunk * row * sizeof(float));
    float *q = malloc(qn * sizeof(float));
    float *out = malloc(BENCH_N_METHODS * qn * sizeof(float));
    double *ms = malloc((size_t)BENCH_N_METHODS * R * sizeof(double));
    int64_t bytes[BENCH_N_METHODS] = {0};
    double err[BENCH_N_METHODS] = {0};
    int rc = 1;
    if (!k || !v || !q || !out || !ms) {
        cli_fail(cmd, "out of memory");
        goto done;
    }
    const uint8_t no_dense = 0;
    const fasa_session_config cfg = {.n_layers = 1,
                                     .n_heads = H,
                                     .n_kv_heads = G,
                                     .head_dim = d,
                                     .pairing = c->pairing,
                                     .profile = prof,
                                     .method = FASA_METHOD_FASA,
                                     .budget = (int)o->budget,
                                     .gqa = FASA_GQA_PER_HEAD,
                                     .dense_layers = &no_dense,
                                     .dtype = o->dtype,
                                     .score_dtype = o->score_dtype,
                                     .tier = o->tier,
                                     .tier_dir = o->tier ? o->state_dir : NULL};
    if (backend_create(b, "bench", &cfg, &fe)) {
        cli_fail(cmd, "cannot create the session (%s, dtype %s): %s: %s", where, s_dtype(o),
                 fasa_status_name(fe.code), fe.msg);
        goto done;
    }
    const double t_fill = timing_now();
    synth_query(sy, T - 1, q);
    if (s_fill(b, "bench", sy, (int)o->chunk, k, v, fill_ref ? nr : NULL, q, &fe)) {
        cli_fail(cmd, "append (%s, %ld tokens per request; see --chunk): %s: %s", where, o->chunk,
                 fasa_status_name(fe.code), fe.msg);
        goto done;
    }
    const double fill_s = timing_now() - t_fill;
    int64_t kv = backend_kv_bytes(b, "bench", &fe);
    if (kv < 0) {
        cli_fail(cmd, "KV bytes held (%s): %s", where, fe.msg);
        goto done;
    }
    /* The disk tier's figure is what the shards allocate in RAM (the rest is file-backed). */
    if (o->tier && backend_ram_bytes(b, "bench", &kv)) {
        cli_fail(cmd, "RAM held (%s): not available", where);
        goto done;
    }

    /* Warm-up and check: query of position T - 1, every method (dense always). */
    for (int m = 0; m < BENCH_N_METHODS; m++) {
        if (s_step(b, where, m, q, out + m * qn, NULL)) goto done;
        for (size_t i = 0; i < qn; i++)
            if (!isfinite(out[m * qn + i])) {
                cli_fail(cmd, "attend %s (%s): output %zu is not finite", bench_method_names[m],
                         where, i);
                goto done;
            }
    }
    for (int i = 0; i < BENCH_N_CHECK; i++)
        for (int x = 0; x < d; x++) {
            const double want = nr->o[(size_t)i * d + x] / nr->l[i];
            err[0] = fmax(err[0], fabs(out[(size_t)nr->heads[i] * d + x] - want));
        }
    for (int m = 1; m < BENCH_N_METHODS; m++) err[m] = s_max_abs_diff(qn, out + m * qn, out);
    const double tol = o->dtype == FASA_DTYPE_F32 ? 1e-4 : o->dtype == FASA_DTYPE_F16 ? 2e-3 : 2e-2;
    printf("\nattend: %d tokens on %s%s, dtype %s, %d query / %d KV heads, head_dim %d, ntip 16, "
           "B %ld; p50 of %d (+1 warm-up); context appended in %.1f s\n",
           T, tg->server ? "" : "the embedded engine, ", where, s_dtype(o), H, G, d, o->budget, R,
           fill_s);
    printf("check: outputs finite; max |dense - naive| on heads %d, %d, %d = %.2e (tolerance "
           "%.0e: %s); max |fasa - dense| = %.3g, max |oracle - dense| = %.3g\n",
           nr->heads[0], nr->heads[1], nr->heads[2], err[0], tol, err[0] <= tol ? "ok" : "FAILED",
           err[1], err[2]);
    if (!(err[0] <= tol)) {
        cli_fail(cmd,
                 "dense output differs from the naive reference by %.3g (> %.0e): the "
                 "benchmark would time wrong work",
                 err[0], tol);
        goto done;
    }

    /* Timed steps: rep r uses the query of position T - 2 - r, over the whole context.
     * On the embedded engine each step's phases are timed too (worker/phase.h: a few
     * timestamps per step): ph[m] sums them per method. */
    double ph[BENCH_N_METHODS][FASA_PHASE_N] = {{0}};
    fasa_phase_enable(!tg->server);
    for (int r = 0; r < R; r++) {
        synth_query(sy, T - 2 - r, q);
        for (int m = 0; m < BENCH_N_METHODS; m++) {
            if (!o->timed[m]) continue;
            fasa_step_stats st;
            double p0[FASA_PHASE_N], p1[FASA_PHASE_N];
            fasa_phase_get(p0);
            const double t0 = timing_now();
            if (s_step(b, where, m, q, out, &st)) goto done;
            ms[m * R + r] = 1e3 * (timing_now() - t0);
            fasa_phase_get(p1);
            for (int i = 0; i < FASA_PHASE_N; i++) ph[m][i] += p1[i] - p0[i];
            bytes[m] = st.bytes_read;
        }
    }
    fasa_phase_enable(0);
    double p50[BENCH_N_METHODS] = {0};
    for (int m = 0; m < BENCH_N_METHODS; m++) {
        if (!o->timed[m]) continue;
        double mn = ms[m * R];
        for (int r = 1; r < R; r++) mn = fmin(mn, ms[m * R + r]);
        p50[m] = timing_median(R, ms + m * R);
        rows[*n_rows] = (bench_row){.tokens = T,
                                    .target = ti,
                                    .method = m,
                                    .p50_ms = p50[m],
                                    .min_ms = mn,
                                    .max_err = err[m],
                                    .bytes_read = bytes[m],
                                    .kv_per_token = (double)kv / T};
        printf("tier %-4s %-6s  p50 %10.3f ms  min %10.3f ms  read %9.1f MiB  %6.2f GB/s\n",
               o->tier ? "disk" : "ram", bench_method_names[m], p50[m], mn, bytes[m] / 1048576.0,
               bytes[m] / (p50[m] * 1e6));
        if (!tg->server) s_phases(o, rf, c, &rows[*n_rows], ph[m], ms + m * R, R);
        (*n_rows)++;
    }
    if (o->timed[0] && o->timed[1]) {
        const double ratio = p50[0] / p50[1];
        if (T >= BENCH_1M)
            printf("dense/fasa = %.2f (target >= %.1f at 1M tokens: %s); bytes ratio %.2f\n", ratio,
                   TARGET_DENSE_OVER_FASA, s_met(ratio, TARGET_DENSE_OVER_FASA),
                   (double)bytes[0] / (double)bytes[1]);
        else
            printf("dense/fasa = %.2f (target >= %.1f applies at 1M tokens); bytes ratio %.2f\n",
                   ratio, TARGET_DENSE_OVER_FASA, (double)bytes[0] / (double)bytes[1]);
    }
    const double f16_kv = (double)row * 2 * 2;
    if (o->tier)
        printf("RAM per token: tier disk %.0f B (%s; %.1f%% of f16 K+V = %.0f B; target <= %.0f%%: "
               "%s)\n",
               (double)kv / T, s_dtype(o), 100 * (double)kv / T / f16_kv, f16_kv,
               100 * TARGET_DISK_OVER_F16,
               (double)kv / T <= TARGET_DISK_OVER_F16 * f16_kv ? "met" : "not met");
    else
        printf("RAM per token: tier ram %.0f B (%s K+V, %.2f of f16 K+V = %.0f B); tier disk: "
               "run with --tier disk (target <= %.0f%% of f16 K+V = %.0f B)\n",
               (double)kv / T, s_dtype(o), (double)kv / T / f16_kv, f16_kv,
               100 * TARGET_DISK_OVER_F16, TARGET_DISK_OVER_F16 * f16_kv);
    fflush(stdout);
    rc = 0;
done:
    backend_close(&b); /* drops the server session */
    free(k);
    free(v);
    free(q);
    free(out);
    free(ms);
    return rc;
}

/* A context length as an axis label: 4096 -> "4K", 1048576 -> "1M". */
static void s_tokens_label(long n, char *buf, size_t len)
{
    if (n >= 1048576 && n % 1048576 == 0)
        snprintf(buf, len, "%ldM", n / 1048576);
    else if (n >= 1024 && n % 1024 == 0)
        snprintf(buf, len, "%ldK", n / 1024);
    else
        snprintf(buf, len, "%ld", n);
}

/* p50 step time against context length, one line per (target, method), log-log, the x
 * axis spanning just the lengths measured (a tic at each). 0, or 1 after a one-line error:
 * a plot asked for and not made is a failure. */
static int s_plot(const bench_opts *o, const bench_target *tg, int n_targets, const bench_row *rows,
                  int n_rows)
{
    FILE *gp = popen("gnuplot", "w");
    if (!gp) return cli_fail("bench attend", "--png %s: cannot run gnuplot", o->png);
    long lo = 0, hi = 0;
    for (int i = 0; i < n_rows; i++) {
        if (!lo || rows[i].tokens < lo) lo = rows[i].tokens;
        if (rows[i].tokens > hi) hi = rows[i].tokens;
    }
    fprintf(gp, "set terminal pngcairo size 900,600 noenhanced\nset output '%s'\n", o->png);
    fprintf(gp, "set logscale xy\nset grid\nset key top left\nset xlabel 'context length "
                "(tokens)'\nset ylabel 'p50 step time (ms)'\nset rmargin 4\n");
    fprintf(gp, "set xrange [%g:%g]\nset xtics (", lo / 1.3, hi * 1.3);
    for (int si = 0; si < o->n_sizes; si++) {
        char label[32];
        s_tokens_label(o->sizes[si], label, sizeof(label));
        fprintf(gp, "%s'%s' %ld", si ? ", " : "", label, o->sizes[si]);
    }
    fprintf(gp, ")\n");
    fprintf(gp,
            "set title 'fasa bench attend: one decode step, 32 query / 8 KV heads, "
            "head_dim 128, B %ld, dtype %s'\n",
            o->budget, s_dtype(o));
    int first = 1;
    for (int t = 0; t < n_targets; t++)
        for (int m = 0; m < BENCH_N_METHODS; m++) {
            if (!o->timed[m]) continue;
            fprintf(gp, "%s'-' using 1:2 with linespoints title '%s, %s (%d shard%s)'",
                    first ? "plot " : ", ", bench_method_names[m], tg[t].label, tg[t].workers,
                    tg[t].workers == 1 ? "" : "s");
            first = 0;
        }
    fprintf(gp, "\n");
    for (int t = 0; t < n_targets; t++)
        for (int m = 0; m < BENCH_N_METHODS; m++) {
            if (!o->timed[m]) continue;
            for (int i = 0; i < n_rows; i++)
                if (rows[i].target == t && rows[i].method == m)
                    fprintf(gp, "%ld %.4f\n", rows[i].tokens, rows[i].p50_ms);
            fprintf(gp, "e\n");
        }
    if (pclose(gp) != 0)
        return cli_fail("bench attend", "--png %s: gnuplot failed (its message is above)", o->png);
    printf("png: %s\n", o->png);
    return 0;
}

/* Measures the ceilings (bench/roofline.h) and prints them with the CPU and its SIMD. The
 * read buffer is 128 MiB, far above any last-level cache. 0, or -1 out of memory. */
static int s_roofline(const bench_opts *o, bench_roof *rf)
{
    memset(rf, 0, sizeof(*rf));
    roofline_cpu(rf->model, sizeof(rf->model), rf->simd, sizeof(rf->simd));
    rf->threads = backend_threads() > BENCH_MAX_THREADS ? BENCH_MAX_THREADS : backend_threads();
    const size_t n = (size_t)32 << 20;
    float *buf = aligned_alloc(64, n * sizeof(float));
    if (!buf) return -1;
    for (size_t i = 0; i < n; i++) buf[i] = 1.0f + (float)(i & 7);
    for (int t = 1; t <= rf->threads; t++) rf->read[t] = roofline_read_gbs(buf, n, t, 3);
    free(buf);
    rf->cvt = roofline_cvt_per_s(o->dtype);
    rf->fma = roofline_fma_per_s();
    rf->scan_path = scan_path();
    rf->scan_cvt = roofline_cvt_per_s_on(o->dtype, rf->scan_path);
    rf->scan_fma = roofline_fma_per_s_on(rf->scan_path);
    rf->dense_path = dense_path();
    rf->dense_cvt = roofline_cvt_per_s_on(o->dtype, rf->dense_path);
    rf->dense_fma = roofline_fma_per_s_on(rf->dense_path);
    printf("cpu: %s; simd: %s; kernels' path %s; threads %d (--threads, FASA_THREADS)\n", rf->model,
           rf->simd, simd_path_name(simd_path_default()), rf->threads);
    printf("roofline: read");
    for (int t = 1; t <= rf->threads; t++)
        printf("%s %d thread%s %.2f GB/s", t > 1 ? "," : "", t, t > 1 ? "s" : "", rf->read[t]);
    printf("; compute (one core, L1): %s to f32 %.3g conversions/s, f32 FMA %.3g/s", s_dtype(o),
           rf->cvt, rf->fma);
    printf("; the scan's path %s: %.3g conversions/s, FMA %.3g/s", simd_path_name(rf->scan_path),
           rf->scan_cvt, rf->scan_fma);
    printf("; dense's path %s: %.3g conversions/s, FMA %.3g/s\n", simd_path_name(rf->dense_path),
           rf->dense_cvt, rf->dense_fma);
    return 0;
}

/* Writes every figure under stable names (see usage_attend). 0, or 1 with the error. */
static int s_json(const bench_opts *o, const bench_roof *rf, const bench_row *rows, int n_rows)
{
    FILE *f = fopen(o->json, "w");
    if (!f) return cli_fail("bench attend", "--json '%s': cannot open for writing", o->json);
    char model[sizeof(rf->model)];
    size_t k = 0;
    for (const char *c = rf->model; *c && k + 1 < sizeof(model); c++)
        if (*c != '"' && *c != '\\') model[k++] = *c;
    model[k] = '\0';
    fprintf(f, "{\n  \"cpu\": \"%s\",\n  \"simd\": \"%s\",\n  \"simd_path\": \"%s\",\n", model,
            rf->simd, simd_path_name(simd_path_default()));
    fprintf(f, "  \"threads\": %d,\n  \"dtype\": \"%s\",\n  \"read_gbs\": %.4f,\n", rf->threads,
            s_dtype(o), s_read_gbs(rf));
    fprintf(f, "  \"read_gbs_by_threads\": [");
    for (int t = 1; t <= rf->threads; t++) fprintf(f, "%s%.4f", t > 1 ? ", " : "", rf->read[t]);
    fprintf(f, "],\n  \"cvt_per_s\": %.6g,\n  \"fma_per_s\": %.6g,\n", rf->cvt, rf->fma);
    fprintf(
        f,
        "  \"scan_simd_path\": \"%s\",\n  \"scan_cvt_per_s\": %.6g,\n  \"scan_fma_per_s\": %.6g,\n",
        simd_path_name(rf->scan_path), rf->scan_cvt, rf->scan_fma);
    fprintf(f,
            "  \"dense_simd_path\": \"%s\",\n  \"dense_cvt_per_s\": %.6g,\n  \"dense_fma_per_s\": "
            "%.6g,\n",
            simd_path_name(rf->dense_path), rf->dense_cvt, rf->dense_fma);
    /* One run per (context length, target), embedded targets first; the last is also at the
     * top level. */
    char last[2048] = "";
    fprintf(f, "  \"runs\": [");
    int first = 1;
    for (int i = 0; i < n_rows;) {
        int j = i;
        char one[2048];
        size_t at = (size_t)snprintf(one, sizeof(one), "\"tokens\": %ld", rows[i].tokens);
        for (; j < n_rows && rows[j].tokens == rows[i].tokens && rows[j].target == rows[i].target;
             j++) {
            const bench_row *r = &rows[j];
            const char *m = bench_method_names[r->method];
            at += (size_t)snprintf(one + at, sizeof(one) - at,
                                   ", \"%s_ms\": %.4f, \"%s_min_ms\": %.4f, \"%s_bytes\": %lld", m,
                                   r->p50_ms, m, r->min_ms, m, (long long)r->bytes_read);
            if (r->method == 1 || r->method == 0) {
                at += (size_t)snprintf(one + at, sizeof(one) - at, ", \"%s_phases_ms\": {", m);
                for (int p = 0; p < BENCH_N_PHASES; p++)
                    at += (size_t)snprintf(one + at, sizeof(one) - at, "%s\"%s\": %.4f",
                                           p ? ", " : "", s_phase_names[p], r->phase_ms[p]);
                at += (size_t)snprintf(one + at, sizeof(one) - at, "}");
            }
            if (r->method == 1) {
                at += (size_t)snprintf(
                    one + at, sizeof(one) - at,
                    ", \"scan_roofline\": %.4f, \"scan_bytes\": %lld, \"fasa_over_read\": %.4f",
                    r->roofline, (long long)r->scan_bytes,
                    r->mean_ms > 0 ? r->mean_ms / (r->bytes_read / (s_read_gbs(rf) * 1e6)) : 0);
                at += (size_t)snprintf(one + at, sizeof(one) - at, ", \"phases_ms\": {");
                for (int p = 0; p < BENCH_N_PHASES; p++)
                    at += (size_t)snprintf(one + at, sizeof(one) - at, "%s\"%s\": %.4f",
                                           p ? ", " : "", s_phase_names[p], r->phase_ms[p]);
                at += (size_t)snprintf(one + at, sizeof(one) - at, "}");
            }
            if (r->method == 0)
                at += (size_t)snprintf(one + at, sizeof(one) - at, ", \"dense_roofline\": %.4f",
                                       r->roofline);
            if (at >= sizeof(one)) at = sizeof(one) - 1;
        }
        fprintf(f, "%s\n    {%s}", first ? "" : ",", one);
        snprintf(last, sizeof(last), "%s", one);
        first = 0;
        i = j;
    }
    fprintf(f, "\n  ]%s%s\n}\n", last[0] ? ",\n  " : "", last);
    if (fclose(f)) return cli_fail("bench attend", "--json '%s': write failed", o->json);
    printf("json: %s\n", o->json);
    return 0;
}

int bench_attend(const bench_opts *o)
{
    static const char *const cmd = "bench attend";
    /* A plot that cannot be made fails now, not after the measurements. */
    if (o->png && system("command -v gnuplot >/dev/null 2>&1") != 0)
        return cli_fail(cmd,
                        "--png %s: gnuplot is not installed (deploy/install-deps.sh "
                        "installs gnuplot-nox)",
                        o->png);
    if (o->png) {
        FILE *f = fopen(o->png, "w");
        if (!f) return cli_fail(cmd, "--png %s: cannot write it: %s", o->png, strerror(errno));
        fclose(f);
    }
    bench_target tg[BENCH_MAX_SERVERS];
    int n_targets = 0;
    if (o->n_servers == 0) {
        tg[n_targets++] = (bench_target){.server = NULL, .workers = (int)o->shards};
        snprintf(tg[0].label, sizeof(tg[0].label), "embedded");
    }
    for (int i = 0; i < o->n_servers; i++) {
        fasa_client_server_info info;
        char msg[256];
        fasa_client *cl =
            backend_connect(o->servers[i], BACKEND_PING_TIMEOUT_MS, &info, msg, sizeof(msg));
        if (!cl) return cli_fail(cmd, "--server %s: %s", o->servers[i], msg);
        fasa_client_close(&cl);
        tg[n_targets] = (bench_target){.server = o->servers[i], .workers = (int)info.n_shards};
        snprintf(tg[n_targets].label, sizeof(tg[n_targets].label), "server");
        n_targets++;
    }
    bench_row *rows = calloc((size_t)o->n_sizes * n_targets * BENCH_N_METHODS, sizeof(*rows));
    FILE *csv = NULL;
    int rc = 1, n_rows = 0;
    if (!rows) return cli_fail(cmd, "out of memory");
    bench_roof roof, *rf = &roof;
    if (s_roofline(o, rf)) {
        free(rows);
        return cli_fail(cmd, "out of memory for the read-bandwidth buffer");
    }
    for (int si = 0; si < o->n_sizes; si++) {
        char err[256];
        synth_cfg sc = synth_cfg_default((int)o->sizes[si]);
        sc.seed = (uint64_t)o->seed;
        synth_t sy;
        if (synth_init(&sy, &sc, err, sizeof(err))) {
            cli_fail(cmd, "%s", err);
            goto done;
        }
        fasa_profile *prof = synth_true_profile(&sy, (int)o->budget);
        naive_ref nr = {.heads = {0, sc.n_heads / 2 + 1, sc.n_heads - 1}};
        nr.o = calloc((size_t)BENCH_N_CHECK * sc.head_dim, sizeof(double));
        for (int i = 0; i < BENCH_N_CHECK; i++) nr.m[i] = -INFINITY;
        int fail = !prof || !nr.o;
        if (fail) cli_fail(cmd, "out of memory");
        for (int t = 0; t < n_targets && !fail; t++)
            fail = s_attend_one(o, rf, &tg[t], t, &sy, prof, &nr, t == 0, rows, &n_rows);
        free(nr.o);
        fasa_profile_destroy(&prof);
        synth_free(&sy);
        if (fail) goto done;
    }

    /* The dense step from 1 to 2 workers, where both were measured. */
    for (int si = 0; si < o->n_sizes && o->timed[0]; si++) {
        double one = 0, two = 0;
        for (int i = 0; i < n_rows; i++)
            if (rows[i].tokens == o->sizes[si] && rows[i].method == 0 &&
                tg[rows[i].target].server) {
                if (tg[rows[i].target].workers == 1) one = rows[i].p50_ms;
                if (tg[rows[i].target].workers == 2) two = rows[i].p50_ms;
            }
        if (one > 0 && two > 0) {
            const double s = one / two;
            if (o->sizes[si] >= BENCH_1M)
                printf("dense step, 2 workers against 1 at %ld tokens = %.2f (target >= %.1f: "
                       "%s)\n",
                       o->sizes[si], s, TARGET_TWO_OVER_ONE, s_met(s, TARGET_TWO_OVER_ONE));
            else
                printf("dense step, 2 workers against 1 at %ld tokens = %.2f (target >= %.1f "
                       "applies at 1M tokens)\n",
                       o->sizes[si], s, TARGET_TWO_OVER_ONE);
        }
    }
    if (o->csv) {
        if (!(csv = s_open_csv(cmd, o->csv,
                               "tokens,backend,workers,dtype,tier,method,reps,p50_ms,min_ms,"
                               "bytes_read,gb_s,kv_bytes_per_token,max_err")))
            goto done;
        for (int i = 0; i < n_rows; i++) {
            const bench_row *r = &rows[i];
            fprintf(csv, "%ld,%s,%d,%s,%s,%s,%ld,%.4f,%.4f,%lld,%.3f,%.1f,%.3g\n", r->tokens,
                    tg[r->target].label, tg[r->target].workers, s_dtype(o),
                    o->tier ? "disk" : "ram", bench_method_names[r->method], o->reps, r->p50_ms,
                    r->min_ms, (long long)r->bytes_read, r->bytes_read / (r->p50_ms * 1e6),
                    r->kv_per_token, r->max_err);
        }
        const int bad = fclose(csv);
        csv = NULL;
        if (bad) {
            cli_fail(cmd, "--csv '%s': write failed", o->csv);
            goto done;
        }
        printf("csv: %s\n", o->csv);
    }
    if (o->png && s_plot(o, tg, n_targets, rows, n_rows)) goto done;
    if (o->json && s_json(o, rf, rows, n_rows)) goto done;
    rc = 0;
done:
    if (csv) fclose(csv);
    free(rows);
    return rc;
}

/* fasa bench ingest: how fast a server stores keys and values sent to it (issue 14's
 * target), and, in the same run, the figures it is measured against: the machine's read
 * bandwidth and the in-process shard_append rate (fast path and its naive reference).
 *
 * The load: one session (32 query heads, 8 KV heads, head_dim 128, --layers layers, storage
 * dtype = --dtype), --tokens tokens sent in Append requests of --chunk tokens of one layer
 * (layer after layer), the tensors on the wire in --dtype. ingest_gbs = stored bytes (K and V of
 * every token and layer in the session's dtype) / the wall time of the whole load, from the
 * first request sent to the last reply. */
#define _GNU_SOURCE
#include "ingest.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "dtype.h"
#include "fasa_client.h"
#include "readbw.h"
#include "shard.h"
#include "simd.h"

#define INGEST_TARGET_GBS 1.0

static double s_now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* Best-of-3 read bandwidth of a 64 MiB buffer (bench/readbw.h), GB/s. */
static double s_read_gbs(void)
{
    const size_t n = (size_t)16 << 20;
    float *x = malloc(n * sizeof(float));
    if (!x) return 0;
    for (size_t i = 0; i < n; i++) x[i] = (float)(i % 7);
    double best = 1e30;
    volatile float sink = 0;
    for (int r = 0; r < 4; r++) {
        const double t0 = s_now();
        sink += readbw_sum(n, x);
        const double t = s_now() - t0;
        if (r && t < best) best = t;
    }
    (void)sink;
    free(x);
    return (double)n * sizeof(float) / best / 1e9;
}

/* shard_append in process, GB/s of stored bytes: f32 rows through the naive reference and
 * the fast path, and rows already in the storage dtype (best of 3, 8192 tokens, 1 layer). */
static void s_shard_gbs(int dtype, double *naive_p, double *fast_p, double *same_p)
{
    const int nkv = 8, d = 128, n = 8192;
    const size_t row = (size_t)nkv * d;
    float *k = malloc((size_t)n * row * 4), *v = malloc((size_t)n * row * 4);
    uint16_t *kh = malloc((size_t)n * row * 2), *vh = malloc((size_t)n * row * 2);
    int32_t *pos = malloc((size_t)n * 4);
    *naive_p = *fast_p = *same_p = 0;
    shard_layout lay;
    if (!k || !v || !kh || !vh || !pos || shard_layout_plain(&lay, 1, 32, nkv, d)) goto done;
    for (size_t i = 0; i < (size_t)n * row; i++) {
        k[i] = (float)((i * 2654435761u) % 2001) / 1000.0f - 1.0f;
        v[i] = (float)((i * 40503u) % 1999) / 1000.0f - 1.0f;
    }
    if (dtype != FASA_DTYPE_F32) {
        dtype_from_f32(SIMD_AUTO, dtype, (size_t)n * row, k, kh);
        dtype_from_f32(SIMD_AUTO, dtype, (size_t)n * row, v, vh);
    }
    for (int g = 0; g < nkv; g++) lay.n_dom[g] = 32; /* FASA's packing of 16 of 64 FCs */
    lay.dtype = dtype;
    for (int i = 0; i < n; i++) pos[i] = i;
    const double bytes = 2.0 * n * row * fasa_dtype_size(dtype);
    for (int path = 0; path < 3; path++) {
        double best = 1e30;
        for (int r = 0; r < 3; r++) {
            shard_t *s = shard_new(&lay);
            if (!s) break;
            const double t0 = s_now();
            for (int i = 0; i < n; i += 2048) {
                const size_t o = (size_t)i * row;
                if (path == 0) shard_append_naive(s, 0, 2048, pos + i, k + o, v + o);
                if (path == 1) shard_append(s, 0, 2048, pos + i, k + o, v + o);
                if (path == 2)
                    shard_append_dt(
                        s, 0, 2048, pos + i, dtype,
                        dtype == FASA_DTYPE_F32 ? (const void *)(k + o) : (const void *)(kh + o),
                        dtype == FASA_DTYPE_F32 ? (const void *)(v + o) : (const void *)(vh + o));
            }
            const double t = s_now() - t0;
            if (t < best) best = t;
            shard_destroy(&s);
        }
        *(path == 0 ? naive_p : path == 1 ? fast_p : same_p) = bytes / best / 1e9;
    }
    shard_layout_cleanup(&lay);
done:
    free(k), free(v), free(kh), free(vh), free(pos);
}

int bench_ingest(const bench_ingest_opts *o)
{
    const char *server = o->server && *o->server ? o->server : getenv("FASA_SERVER");
    const char *json = o->json, *dname = o->dtype ? o->dtype : "f16";
    const long tokens = o->tokens, chunk = o->chunk, layers = o->layers, window = o->window;
    fasa_dtype dt;
    if (!strcmp(dname, "f16"))
        dt = FASA_DTYPE_F16;
    else if (!strcmp(dname, "bf16"))
        dt = FASA_DTYPE_BF16;
    else if (!strcmp(dname, "f32"))
        dt = FASA_DTYPE_F32;
    else {
        fprintf(stderr, "fasa bench ingest: --dtype '%s' is not f16, bf16 or f32\n", dname);
        return 2;
    }
    if (!server || !*server) {
        fprintf(stderr, "fasa bench ingest: --server ENDPOINT is required\n");
        return 2;
    }
    if (tokens < 1 || tokens > (1L << 24) || chunk < 1 || chunk > tokens || layers < 1 ||
        layers > 64 || window < 1 || window > FASA_CLIENT_APPEND_WINDOW) {
        fprintf(stderr,
                "fasa bench ingest: --tokens 1..2^24, --chunk 1..tokens, --layers 1..64, "
                "--window 1..%d\n",
                FASA_CLIENT_APPEND_WINDOW);
        return 2;
    }
    const fasa_client_geometry geom = {(uint32_t)layers, 32, 8, 128};
    const size_t row = 8 * 128, esz = fasa_dtype_size(dt);
    const size_t per_req = (size_t)layers * chunk * row; /* elements of k (and of v) */
    void *k = malloc(per_req * esz), *v = malloc(per_req * esz);
    float *f = malloc(per_req * sizeof(float));
    if (!k || !v || !f) {
        fprintf(stderr, "fasa bench ingest: out of memory for %zu-byte requests\n",
                2 * per_req * esz);
        return 1;
    }
    for (int t = 0; t < 2; t++) {
        for (size_t i = 0; i < per_req; i++)
            f[i] = (float)(((i + (size_t)t * 7919) * 2654435761u) % 2001) / 1000.0f - 1.0f;
        dtype_from_f32(SIMD_AUTO, dt, per_req, f, t ? v : k);
    }
    free(f);
    fasa_client *c = NULL;
    fasa_client_error err = {0};
    fasa_client_server_info info = {0};
    char id[64];
    snprintf(id, sizeof(id), "bench-ingest-%ld", (long)getpid());
    fasa_client_session_config cfg = {.geom = geom,
                                      .dtype = dt == FASA_DTYPE_F16    ? FASA_CLIENT_DTYPE_F16
                                               : dt == FASA_DTYPE_BF16 ? FASA_CLIENT_DTYPE_BF16
                                                                       : FASA_CLIENT_DTYPE_F32};
    if (fasa_client_connect(server, 60000, &c, &err) || fasa_client_ping(c, &info, &err) ||
        fasa_client_create_session(c, id, &cfg, NULL, &err)) {
        fprintf(stderr, "fasa bench ingest: %s: %s\n", server, err.msg);
        fasa_client_close(&c);
        free(k), free(v);
        return 1;
    }
    /* Up to window appends in flight: the client packs the next while the server stores. */
    const double t0 = s_now();
    int rc = 0;
    long n_req = 0;
    for (long p = 0; p < tokens && !rc; p += chunk) {
        const long m = tokens - p < chunk ? tokens - p : chunk;
        for (int l = 0; l < layers && !rc; l++, n_req++) {
            const size_t o = (size_t)l * chunk * row * esz;
            if ((fasa_client_append_pending(c) >= window &&
                 fasa_client_append_recv(c, NULL, &err)) ||
                fasa_client_append_send(c, id, &geom, l, (uint64_t)p, (uint64_t)m, cfg.dtype,
                                        (const char *)k + o, (const char *)v + o, &err)) {
                fprintf(stderr, "fasa bench ingest: append at %ld, layer %d: %s\n", p, l, err.msg);
                rc = 1;
            }
        }
    }
    while (!rc && fasa_client_append_pending(c))
        if (fasa_client_append_recv(c, NULL, &err)) {
            fprintf(stderr, "fasa bench ingest: append: %s\n", err.msg);
            rc = 1;
        }
    const double wall = s_now() - t0;
    fasa_client_drop_session(c, id, &err);
    fasa_client_close(&c);
    free(k), free(v);
    if (rc) return rc;
    const double stored = 2.0 * (double)tokens * (double)layers * (double)row * (double)esz;
    const double gbs = stored / wall / 1e9;
    const double rbw = s_read_gbs();
    double naive, fast, same;
    s_shard_gbs(dt, &naive, &fast, &same);
    const int workers = info.n_ranks > 1 ? (int)info.n_ranks - 1 : 1;
    const int met = gbs >= INGEST_TARGET_GBS;
    printf("fasa bench ingest: %ld tokens x %ld layers (8 KV heads, d 128), %s on the wire and "
           "stored, requests of %ld tokens, %d worker(s) (%u ranks), %.1f MB stored in %.3f s\n",
           tokens, layers, dname, chunk, workers, info.n_ranks, stored / 1e6, wall);
    printf("  ingest_gbs        %7.3f GB/s of stored bytes (target >= %.1f with f16 and 2 "
           "workers): %s%s\n",
           gbs, INGEST_TARGET_GBS, met ? "met" : "NOT met",
           dt == FASA_DTYPE_F16 && workers == 2 ? "" : " (not the target's setup)");
    printf("  requests          %ld of %.1f MB (one layer each), up to %ld in flight, %.1f ms "
           "each on average\n",
           n_req, 2.0 * per_req * esz / 1e6 / (double)layers, window, 1e3 * wall / (double)n_req);
    printf("  read bandwidth    %7.2f GB/s (%s, 64 MiB, this process); ingest/read %.3f\n", rbw,
           readbw_sum_name(), rbw > 0 ? gbs / rbw : 0);
    printf("  shard_append      %7.2f GB/s from f32 (naive reference %.2f, x%.2f), %.2f GB/s from "
           "%s rows (in process, 1 thread)\n",
           fast, naive, naive > 0 ? fast / naive : 0, same, dname);
    printf("  cpu features      %s\n", simd_cpu_features());
    if (json) {
        FILE *jf = fopen(json, "w");
        if (!jf) {
            fprintf(stderr, "fasa bench ingest: cannot write %s\n", json);
            return 1;
        }
        fprintf(jf,
                "{\"bench\": \"ingest\", \"dtype\": \"%s\", \"tokens\": %ld, \"layers\": %ld, "
                "\"chunk\": %ld, \"n_kv_heads\": 8, \"head_dim\": 128, \"workers\": %d, "
                "\"ranks\": %u, \"stored_bytes\": %.0f, \"wall_s\": %.6f, \"ingest_gbs\": %.4f, "
                "\"target_gbs\": %.1f, \"met\": %s, \"window\": %ld, \"requests\": %ld, "
                "\"read_gbs\": %.3f, \"shard_append_gbs\": %.3f, \"shard_append_naive_gbs\": "
                "%.3f, \"shard_append_same_dtype_gbs\": %.3f, \"cpu_features\": \"%s\"}\n",
                dname, tokens, layers, chunk, workers, info.n_ranks, stored, wall, gbs,
                INGEST_TARGET_GBS, met ? "true" : "false", window, n_req, rbw, fast, naive, same,
                simd_cpu_features());
        fclose(jf);
    }
    return 0;
}

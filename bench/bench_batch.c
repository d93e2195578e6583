/* bench_batch: what a BatchAttend saves over one Attend per session, through libfasa
 * against a running fasa-server. K sessions (default 8) of T tokens each (default 64K;
 * head_dim 128, 8 KV heads, 32 query heads, one layer, the generator's true profile) take
 * one decode step each, R times (default 20):
 *   one by one  K Attend round trips;
 *   batched     one BatchAttend of K items, which the engine pipelines across the workers
 *               (fasa_engine_attend_batch: rank 0 merges one session's candidates while
 *               the workers score the next).
 * It prints the median time per step of each and their ratio, and checks that both give
 * the same outputs bit for bit. Run the server with FASA_PIPELINE=0 to see the batch
 * without the pipelining (one round trip from the client, the steps one by one inside).
 *
 *   bench/bench_batch --server E [--sessions K] [--tokens T] [--reps R] [--budget B]
 *                     [--method fasa|dense] */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "env.h"
#include "fasa_client.h"
#include "synth.h"
#include "timing.h"

static void s_die(const char *what, const fasa_client_error *e)
{
    fprintf(stderr, "bench_batch: %s: %s\n", what, e->msg);
    exit(1);
}

int main(int argc, char **argv)
{
    fasa_env_init(NULL, 0); /* FASA_SIMD, read once at start-up */
    const char *server = "tcp://127.0.0.1:5555", *method = "fasa";
    long K = 8, T = 65536, R = 20, budget = 256;
    static const struct option opts[] = {
        {"server", required_argument, 0, 's'}, {"sessions", required_argument, 0, 'k'},
        {"tokens", required_argument, 0, 'n'}, {"reps", required_argument, 0, 'r'},
        {"budget", required_argument, 0, 'b'}, {"method", required_argument, 0, 'm'},
        {"help", no_argument, 0, 'h'},         {0, 0, 0, 0}};
    int ch;
    while ((ch = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (ch) {
        case 's':
            server = optarg;
            break;
        case 'k':
            K = atol(optarg);
            break;
        case 'n':
            T = atol(optarg);
            break;
        case 'r':
            R = atol(optarg);
            break;
        case 'b':
            budget = atol(optarg);
            break;
        case 'm':
            method = optarg;
            break;
        case 'h':
            puts("usage: bench_batch [--server E] [--sessions K (8)] [--tokens T (65536)]\n"
                 "                   [--reps R (20)] [--budget B (256)] [--method fasa|dense]");
            return 0;
        default:
            return 2;
        }
    }
    const int dense = !strcmp(method, "dense");
    if (K < 1 || K > 4096 || T < 2 * budget || R < 1 || budget < 1 ||
        (!dense && strcmp(method, "fasa"))) {
        fprintf(stderr, "bench_batch: need 1 <= sessions <= 4096, tokens >= 2 budget, reps >= 1, "
                        "method fasa or dense\n");
        return 2;
    }
    fasa_client *c;
    fasa_client_error e;
    fasa_client_server_info info;
    if (fasa_client_connect(server, 600000, &c, &e) || fasa_client_ping(c, &info, &e))
        s_die("connect", &e);
    char err[256];
    synth_t sy;
    synth_cfg scfg = synth_cfg_default((int)T);
    if (synth_init(&sy, &scfg, err, sizeof(err))) {
        fprintf(stderr, "bench_batch: %s\n", err);
        return 1;
    }
    fasa_profile *prof = synth_true_profile(&sy, 32);
    char *text = NULL;
    size_t text_len = 0;
    FILE *f = open_memstream(&text, &text_len);
    if (!f || fasa_profile_write(prof, f) || fclose(f)) abort();
    const fasa_client_geometry g = {1, (uint32_t)scfg.n_heads, (uint32_t)scfg.n_kv_heads,
                                    (uint32_t)scfg.head_dim};
    const fasa_client_session_config cfg = {.geom = g,
                                            .profile_text = text,
                                            .method = FASA_CLIENT_METHOD_FASA,
                                            .budget = (uint32_t)budget,
                                            .dense_layers_set = 1};
    const size_t row = (size_t)g.n_kv_heads * g.head_dim, qn = (size_t)g.n_heads * g.head_dim;
    const long chunk = 4096;
    float *k = malloc((size_t)chunk * row * sizeof(float));
    float *v = malloc((size_t)chunk * row * sizeof(float));
    char(*ids)[32] = calloc((size_t)K, sizeof(*ids));
    float *q = malloc((size_t)K * qn * sizeof(float));
    float *o1 = malloc((size_t)K * qn * sizeof(float)),
          *o2 = malloc((size_t)K * qn * sizeof(float));
    fasa_client_attend_req *items = calloc((size_t)K, sizeof(*items));
    fasa_client_error *item_errs = calloc((size_t)K, sizeof(*item_errs));
    double *t_one = malloc((size_t)R * sizeof(double)),
           *t_batch = malloc((size_t)R * sizeof(double));
    if (!k || !v || !ids || !q || !o1 || !o2 || !items || !item_errs || !t_one || !t_batch) abort();
    for (long s = 0; s < K; s++) {
        snprintf(ids[s], sizeof(ids[s]), "bench-batch-%ld", s);
        fasa_client_drop_session(c, ids[s], NULL);
        if (fasa_client_create_session(c, ids[s], &cfg, NULL, &e)) s_die("create", &e);
        for (long p = 0; p < T; p += chunk) {
            const long n = T - p < chunk ? T - p : chunk;
            synth_kv(&sy, (int)p, (int)n, k, v);
            if (fasa_client_append(c, ids[s], &g, 0, (uint64_t)p, (uint64_t)n, k, v, NULL, &e))
                s_die("append", &e);
        }
        synth_query(&sy, (int)(T - 1 - s), q + (size_t)s * qn);
        fprintf(stderr, "\rsessions ready: %ld / %ld", s + 1, K);
    }
    fprintf(stderr, "\n");
    for (long s = 0; s < K; s++) {
        fasa_client_attend_req r = FASA_CLIENT_ATTEND_REQ_INIT;
        r.session_id = ids[s];
        r.geom = g;
        r.layer = 0;
        r.q = q + (size_t)s * qn;
        r.method = dense ? FASA_CLIENT_METHOD_DENSE : FASA_CLIENT_METHOD_FASA;
        items[s] = r;
    }
    for (long i = 0; i < R; i++) {
        double t0 = timing_now();
        for (long s = 0; s < K; s++) {
            items[s].out = o1 + (size_t)s * qn;
            if (fasa_client_attend(c, &items[s], &e)) s_die("attend", &e);
        }
        t_one[i] = 1e3 * (timing_now() - t0) / (double)K;
        for (long s = 0; s < K; s++) items[s].out = o2 + (size_t)s * qn;
        t0 = timing_now();
        if (fasa_client_batch_attend(c, (size_t)K, items, item_errs, &e)) s_die("batch_attend", &e);
        t_batch[i] = 1e3 * (timing_now() - t0) / (double)K;
        for (long s = 0; s < K; s++)
            if (item_errs[s].code) s_die("batch item", &item_errs[s]);
    }
    const int same = !memcmp(o1, o2, (size_t)K * qn * sizeof(float));
    const double m1 = timing_median((int)R, t_one), m2 = timing_median((int)R, t_batch);
    printf("server %s: %u ranks, %u shards; %ld sessions x %ld tokens, %s, B %ld, %ld reps\n",
           server, info.n_ranks, info.n_shards, K, T, method, budget, R);
    printf("one by one: %.3f ms per step (median)\n", m1);
    printf("batched:    %.3f ms per step (median)\n", m2);
    printf("one by one / batched: %.2fx; outputs identical: %s\n", m1 / m2, same ? "yes" : "NO");
    for (long s = 0; s < K; s++) fasa_client_drop_session(c, ids[s], NULL);
    fasa_client_close(&c);
    return same ? 0 : 1;
}

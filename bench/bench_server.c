/* bench_server: the service end to end, through libfasa, against a running fasa-server.
 *
 *   1. A synthetic long session (default 1M tokens, head_dim 128, 8 KV heads, 32 query
 *      heads, one layer, the generator's true profile): append throughput over the socket.
 *   2. Attend round trips on it, fasa and dense: p50 and p99, and the server's own time.
 *   3. The service overhead per Attend at 4K tokens: the same steps on the server and on an
 *      embedded engine in this process with as many in-process shards as the server has
 *      workers; overhead = server round trip minus embedded call (medians).
 *
 * Start the server first, e.g. `deploy/run-local.sh 3` (2 workers), then
 *   build/bench/bench_server --server tcp://127.0.0.1:5555 [--tokens N] [--steps S]
 * or run bench/server_bench.sh, which does both. */
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "env.h"
#include "engine.h"
#include "fasa_client.h"
#include "synth.h"
#include "timing.h"

typedef struct bench_opts {
    const char *server;
    long tokens, steps, dense_steps, small, small_steps, budget, chunk;
} bench_opts;

static void s_die(const char *what, const fasa_client_error *e)
{
    fprintf(stderr, "bench_server: %s: %s\n", what, e->msg);
    exit(1);
}

static char *s_profile_text(const fasa_profile *p)
{
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    if (!f || fasa_profile_write(p, f) || fclose(f)) {
        fprintf(stderr, "bench_server: out of memory\n");
        exit(1);
    }
    return text;
}

/* Times `steps` Attend round trips of one method; ms into rt, server ms into sv. */
static void s_attend_series(fasa_client *c, const char *id, const synth_t *sy,
                            const fasa_client_geometry *g, fasa_client_method m, int steps,
                            double *rt, double *sv, float *out_keep)
{
    const int t_end = sy->cfg.n_tokens - 1;
    float *q = malloc((size_t)g->n_heads * g->head_dim * sizeof(float));
    float *out = malloc((size_t)g->n_heads * g->head_dim * sizeof(float));
    if (!q || !out) abort();
    fasa_client_error e;
    for (int i = 0; i < steps; i++) {
        synth_query(sy, t_end - i, q);
        fasa_client_step_stats st;
        fasa_client_attend_req r = FASA_CLIENT_ATTEND_REQ_INIT;
        r.session_id = id;
        r.geom = *g;
        r.layer = 0;
        r.q = q;
        r.method = m;
        r.out = out;
        r.stats = &st;
        const double t0 = timing_now();
        if (fasa_client_attend(c, &r, &e)) s_die("attend", &e);
        rt[i] = 1e3 * (timing_now() - t0);
        sv[i] = 1e-3 * (double)st.server_us;
        if (out_keep && i == 0)
            memcpy(out_keep, out, (size_t)g->n_heads * g->head_dim * sizeof(float));
    }
    free(q);
    free(out);
}

int main(int argc, char **argv)
{
    fasa_env_init(NULL, 0); /* FASA_SIMD, read once at start-up */
    bench_opts o = {.server = "tcp://127.0.0.1:5555",
                    .tokens = 1L << 20,
                    .steps = 50,
                    .dense_steps = 8,
                    .small = 4096,
                    .small_steps = 300,
                    .budget = 256,
                    .chunk = 2048};
    static const struct option opts[] = {{"server", required_argument, 0, 's'},
                                         {"tokens", required_argument, 0, 'n'},
                                         {"steps", required_argument, 0, 'S'},
                                         {"dense-steps", required_argument, 0, 'D'},
                                         {"small", required_argument, 0, 'm'},
                                         {"small-steps", required_argument, 0, 'M'},
                                         {"budget", required_argument, 0, 'b'},
                                         {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};
    int ch;
    while ((ch = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (ch) {
        case 's':
            o.server = optarg;
            break;
        case 'n':
            o.tokens = atol(optarg);
            break;
        case 'S':
            o.steps = atol(optarg);
            break;
        case 'D':
            o.dense_steps = atol(optarg);
            break;
        case 'm':
            o.small = atol(optarg);
            break;
        case 'M':
            o.small_steps = atol(optarg);
            break;
        case 'b':
            o.budget = atol(optarg);
            break;
        case 'h':
            puts("usage: bench_server [--server E] [--tokens N (1048576)] [--steps S (50)]\n"
                 "                    [--dense-steps S (8)] [--small N (4096)]\n"
                 "                    [--small-steps S (300)] [--budget B (256)]");
            return 0;
        default:
            return 2;
        }
    }
    if (o.tokens < o.small || o.small < 2 * o.budget || o.steps < 1 || o.dense_steps < 1 ||
        o.small_steps < 1 || o.budget < 1) {
        fprintf(stderr, "bench_server: need tokens >= small >= 2 * budget and steps >= 1\n");
        return 2;
    }

    fasa_client *c;
    fasa_client_error e;
    fasa_client_server_info info;
    if (fasa_client_connect(o.server, 600000, &c, &e) || fasa_client_ping(c, &info, &e))
        s_die("connect", &e);
    printf("server %s: %s, %u ranks, %u shards\n", o.server, info.version, info.n_ranks,
           info.n_shards);

    /* 1. The long session. */
    char err[256];
    synth_t sy;
    synth_cfg scfg = synth_cfg_default((int)o.tokens);
    if (synth_init(&sy, &scfg, err, sizeof(err))) {
        fprintf(stderr, "bench_server: %s\n", err);
        return 1;
    }
    fasa_profile *prof = synth_true_profile(&sy, 32);
    char *text = s_profile_text(prof);
    const fasa_client_geometry g = {1, (uint32_t)scfg.n_heads, (uint32_t)scfg.n_kv_heads,
                                    (uint32_t)scfg.head_dim};
    fasa_client_session_config cfg = {.geom = g,
                                      .profile_text = text,
                                      .method = FASA_CLIENT_METHOD_FASA,
                                      .budget = (uint32_t)o.budget,
                                      .dense_layers_set = 1};
    fasa_client_drop_session(c, "bench-long", NULL);
    fasa_client_drop_session(c, "bench-small", NULL);
    if (fasa_client_create_session(c, "bench-long", &cfg, NULL, &e)) s_die("create", &e);
    const size_t row = (size_t)g.n_kv_heads * g.head_dim;
    float *k = malloc((size_t)o.chunk * row * sizeof(float));
    float *v = malloc((size_t)o.chunk * row * sizeof(float));
    if (!k || !v) abort();
    double t_send = 0;
    const double t_all = timing_now();
    for (long p = 0; p < o.tokens; p += o.chunk) {
        const long n = o.tokens - p < o.chunk ? o.tokens - p : o.chunk;
        synth_kv(&sy, (int)p, (int)n, k, v);
        const double t0 = timing_now();
        if (fasa_client_append(c, "bench-long", &g, 0, (uint64_t)p, (uint64_t)n, k, v, NULL, &e))
            s_die("append", &e);
        t_send += timing_now() - t0;
        if ((p / o.chunk) % 16 == 15)
            fprintf(stderr, "\rappending: %ld / %ld tokens", p + n, o.tokens);
    }
    fprintf(stderr, "\n");
    const double kv_gb = (double)o.tokens * row * 2 * sizeof(float) / 1e9;
    printf("append: %ld tokens (%.2f GB of K and V) in %.2f s of round trips "
           "(%.2f s with generation): %.0f tokens/s, %.2f GB/s\n",
           o.tokens, kv_gb, t_send, timing_now() - t_all, (double)o.tokens / t_send,
           kv_gb / t_send);

    /* 2. Attend on the long session. */
    const int ns = (int)(o.steps > o.small_steps ? o.steps : o.small_steps);
    double *rt = malloc((size_t)ns * sizeof(double)), *sv = malloc((size_t)ns * sizeof(double));
    double *rt2 = malloc((size_t)ns * sizeof(double)), *emb = malloc((size_t)ns * sizeof(double));
    if (!rt || !sv || !rt2 || !emb) abort();
    s_attend_series(c, "bench-long", &sy, &g, FASA_CLIENT_METHOD_FASA, (int)o.steps, rt, sv, NULL);
    const double f50 = timing_median((int)o.steps, rt);
    printf("attend fasa  @%ld: p50 %.2f ms, p99 %.2f ms (server p50 %.2f ms), %ld steps\n",
           o.tokens, f50, timing_pct((int)o.steps, rt, 0.99), timing_median((int)o.steps, sv),
           o.steps);
    s_attend_series(c, "bench-long", &sy, &g, FASA_CLIENT_METHOD_DENSE, (int)o.dense_steps, rt, sv,
                    NULL);
    const double d50 = timing_median((int)o.dense_steps, rt);
    printf("attend dense @%ld: p50 %.2f ms, p99 %.2f ms (server p50 %.2f ms), %ld steps\n",
           o.tokens, d50, timing_pct((int)o.dense_steps, rt, 0.99),
           timing_median((int)o.dense_steps, sv), o.dense_steps);
    printf("dense / fasa at %ld tokens: %.1fx\n", o.tokens, d50 / f50);
    fasa_client_drop_session(c, "bench-long", NULL);

    /* 3. Overhead at `small` tokens: the server against an embedded engine. */
    synth_t sm;
    synth_cfg mcfg = synth_cfg_default((int)o.small);
    if (synth_init(&sm, &mcfg, err, sizeof(err))) {
        fprintf(stderr, "bench_server: %s\n", err);
        return 1;
    }
    fasa_profile *mprof = synth_true_profile(&sm, 32);
    char *mtext = s_profile_text(mprof);
    cfg.profile_text = mtext;
    if (fasa_client_create_session(c, "bench-small", &cfg, NULL, &e)) s_die("create", &e);
    float *mk = malloc((size_t)o.small * row * sizeof(float));
    float *mv = malloc((size_t)o.small * row * sizeof(float));
    if (!mk || !mv) abort();
    synth_kv(&sm, 0, (int)o.small, mk, mv);
    if (fasa_client_append(c, "bench-small", &g, 0, 0, (uint64_t)o.small, mk, mv, NULL, &e))
        s_die("append", &e);
    fasa_engine_t *eng = fasa_engine_new((int)info.n_shards, FASA_DEFAULT_BLOCK);
    const uint8_t no_dense = 0;
    fasa_session_config ec = {.n_layers = 1,
                              .n_heads = (int)g.n_heads,
                              .n_kv_heads = (int)g.n_kv_heads,
                              .head_dim = (int)g.head_dim,
                              .pairing = mprof->pairing,
                              .profile = mprof,
                              .method = FASA_METHOD_FASA,
                              .budget = (int)o.budget,
                              .gqa = FASA_GQA_PER_HEAD,
                              .dense_layers = &no_dense};
    fasa_error fe;
    if (!eng || fasa_engine_create(eng, "small", &ec, &fe) ||
        fasa_engine_append(eng, "small", 0, 0, (int)o.small, mk, mv, &fe)) {
        fprintf(stderr, "bench_server: embedded engine: %s\n", eng ? fe.msg : "out of memory");
        return 1;
    }
    float *q = malloc((size_t)g.n_heads * g.head_dim * sizeof(float));
    float *oe = malloc((size_t)g.n_heads * g.head_dim * sizeof(float));
    float *os = malloc((size_t)g.n_heads * g.head_dim * sizeof(float));
    if (!q || !oe || !os) abort();
    static const struct {
        const char *name;
        fasa_client_method cm;
        fasa_method em;
    } methods[2] = {{"fasa", FASA_CLIENT_METHOD_FASA, FASA_METHOD_FASA},
                    {"dense", FASA_CLIENT_METHOD_DENSE, FASA_METHOD_DENSE}};
    for (int mi = 0; mi < 2; mi++) {
        double worst = 0;
        for (int i = 0; i < (int)o.small_steps; i++) {
            synth_query(&sm, (int)o.small - 1 - (i % 64), q);
            fasa_attend_req er = {.layer = 0,
                                  .q = q,
                                  .method = methods[mi].em,
                                  .budget = 0,
                                  .gqa = -1,
                                  .max_pos = -1};
            double t0 = timing_now();
            if (fasa_engine_attend(eng, "small", &er, oe, NULL, NULL, &fe)) {
                fprintf(stderr, "bench_server: embedded attend: %s\n", fe.msg);
                return 1;
            }
            emb[i] = 1e3 * (timing_now() - t0);
            fasa_client_step_stats st;
            fasa_client_attend_req r = FASA_CLIENT_ATTEND_REQ_INIT;
            r.session_id = "bench-small";
            r.geom = g;
            r.q = q;
            r.method = methods[mi].cm;
            r.out = os;
            r.stats = &st;
            t0 = timing_now();
            if (fasa_client_attend(c, &r, &e)) s_die("attend", &e);
            rt2[i] = 1e3 * (timing_now() - t0);
            sv[i] = 1e-3 * (double)st.server_us;
            for (size_t j = 0; j < (size_t)g.n_heads * g.head_dim; j++) {
                const double dd = fabs((double)oe[j] - os[j]);
                if (dd > worst) worst = dd;
            }
        }
        const int n = (int)o.small_steps;
        const double e50 = timing_median(n, emb), s50 = timing_median(n, rt2);
        const double v50 = timing_median(n, sv);
        printf("overhead %-5s @%ld: server round trip p50 %.3f ms (p99 %.3f), server engine "
               "p50 %.3f ms, embedded p50 %.3f ms -> overhead %.3f ms per Attend "
               "(%.3f ms of it outside the engine); max |server - embedded| %.2g\n",
               methods[mi].name, o.small, s50, timing_pct(n, rt2, 0.99), v50, e50, s50 - e50,
               s50 - v50, worst);
    }
    fasa_client_drop_session(c, "bench-small", NULL);
    fasa_engine_destroy(&eng);
    fasa_client_close(&c);
    free(k);
    free(v);
    free(mk);
    free(mv);
    free(q);
    free(oe);
    free(os);
    free(rt);
    free(sv);
    free(rt2);
    free(emb);
    free(text);
    free(mtext);
    fasa_profile_destroy(&prof);
    fasa_profile_destroy(&mprof);
    synth_free(&sy);
    synth_free(&sm);
    return 0;
}

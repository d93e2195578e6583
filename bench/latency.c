/* `fasa bench latency`: see latency.h. */
#include "latency.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backend.h"
#include "engine.h"
#include "fasa_client.h"
#include "roofline.h"
#include "simd.h"
#include "synth.h"
#include "timing.h"

/* Issue 20's targets, at 4K tokens. */
#define TARGET_TOKENS 4096
#define TARGET_P50_1W 150.0
#define TARGET_P99_1W 400.0
#define TARGET_P50_2W 200.0

/* Per-Attend components, microseconds: what libfasa and the server report, and the
 * embedded engine's own phases for the same step. */
enum {
    C_EMB, /* embedded fasa_engine_attend, wall */
    C_RT,  /* server fasa_client_attend, wall */
    C_ENC, /* client encode */
    C_DEC, /* client decode */
    C_ZMQ, /* ZeroMQ both ways and the reply's packing: wait - (queue + decode + server) */
    C_QUEUE,
    C_SDEC,
    C_SCORE, /* server score phase minus embedded */
    C_MERGE, /* server merges minus embedded */
    C_ATT,   /* server attend phase minus embedded */
    C_REST,  /* the rest of the server's engine call minus the embedded one's rest */
    C_N
};
static const char *const s_comp_names[C_N] = {
    "embedded",         "server",           "client encode",
    "client decode",    "ZeroMQ and reply", "I/O thread hand-over",
    "rank 0 decode",    "MPI score phase",  "merges",
    "MPI attend phase", "rest of the step"};

typedef struct lat_row {
    char server[160];
    int workers;
    long tokens;
    const char *method;
    int n;
    double emb[3], srv[3], ovh[3]; /* p50, p90, p99 */
    double comp[C_N];              /* medians */
    double max_diff;
} lat_row;

static const char *const s_methods[2] = {"fasa", "dense"};

void bench_latency_defaults(bench_latency_opts *o)
{
    memset(o, 0, sizeof(*o));
    o->tokens[0] = 1024, o->tokens[1] = 4096, o->tokens[2] = 16384;
    o->n_tokens = 3;
    o->layers = 2;
    o->steps = 64;
    o->budget = 256;
    o->methods = 3;
}

/* The generator's true profile (1 layer) for every layer. */
static fasa_profile *s_profile(const synth_t *sy, int layers)
{
    fasa_profile *one = synth_true_profile(sy, 32);
    if (!one) return NULL;
    fasa_profile *p =
        fasa_profile_new(layers, one->n_heads, one->n_kv_heads, one->head_dim, one->ntip);
    if (p) {
        p->pairing = one->pairing;
        p->gqa_shared = one->gqa_shared;
        p->window = one->window;
        memcpy(p->samples, one->samples, sizeof(p->samples));
        const size_t nf = (size_t)one->n_heads * one->ntip,
                     nc = (size_t)one->n_heads * one->head_dim / 2;
        for (int l = 0; l < layers; l++) {
            memcpy(p->fcs + l * nf, one->fcs, nf * sizeof(int));
            memcpy(p->ca + l * nc, one->ca, nc * sizeof(double));
        }
    }
    fasa_profile_destroy(&one);
    return p;
}

static char *s_profile_text(const fasa_profile *p)
{
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    if (!f) return NULL;
    const int bad = fasa_profile_write(p, f);
    if (fclose(f) || bad) {
        free(text);
        return NULL;
    }
    return text;
}

typedef struct lat_ctx {
    const bench_latency_opts *o;
    synth_t sy;
    fasa_profile *prof;
    char *prof_text;
    float *k, *v, *q, *kn, *vn, *oe, *os;
} lat_ctx;

/* One (server, context, method): fills row. 0, or 1 after printing why not. */
static int s_run_one(lat_ctx *x, fasa_client *c, int workers, long tokens, int mi, lat_row *row)
{
    const bench_latency_opts *o = x->o;
    const synth_cfg *sc = &x->sy.cfg;
    const int L = o->layers, nh = sc->n_heads, nkv = sc->n_kv_heads, d = sc->head_dim;
    const fasa_method method = mi == 0 ? FASA_METHOD_FASA : FASA_METHOD_DENSE;
    char sid[64];
    snprintf(sid, sizeof(sid), "bench-latency-%d", (int)getpid());
    fasa_error fe;
    fasa_client_error ce;

    /* The embedded engine with as many shards as the server, on as many threads. */
    const int shards = workers > 0 ? workers : 1;
    fasa_transport tr;
    if (fasa_transport_local_threads(&tr, shards, shards)) {
        fprintf(stderr, "fasa bench latency: cannot start %d threads\n", shards);
        return 1;
    }
    fasa_engine_t *eng = fasa_engine_new_with(&tr, 0);
    uint8_t *dense_layers = calloc((size_t)L, 1);
    if (!eng || !dense_layers) {
        fprintf(stderr, "fasa bench latency: out of memory\n");
        if (!eng) tr.destroy(tr.ctx);
        fasa_engine_destroy(&eng);
        free(dense_layers);
        return 1;
    }
    const fasa_session_config ec = {.n_layers = L,
                                    .n_heads = nh,
                                    .n_kv_heads = nkv,
                                    .head_dim = d,
                                    .pairing = sc->pairing,
                                    .profile = x->prof,
                                    .method = method,
                                    .budget = o->budget,
                                    .dense_layers = dense_layers};
    const fasa_client_geometry g = {(uint32_t)L, (uint32_t)nh, (uint32_t)nkv, (uint32_t)d};
    const fasa_client_session_config cc = {.geom = g,
                                           .profile_text = x->prof_text,
                                           .method = mi == 0 ? FASA_CLIENT_METHOD_FASA
                                                             : FASA_CLIENT_METHOD_DENSE,
                                           .budget = (uint32_t)o->budget,
                                           .dense_layers_set = 1};
    int rc = 1;
    const int n = o->steps * L;
    double *t[C_N];
    for (int i = 0; i < C_N; i++) t[i] = calloc((size_t)n, sizeof(double));
    for (int i = 0; i < C_N; i++)
        if (!t[i]) goto done;
    if (fasa_engine_create(eng, "s", &ec, &fe)) {
        fprintf(stderr, "fasa bench latency: embedded create: %s\n", fe.msg);
        goto done;
    }
    if (fasa_client_create_session(c, sid, &cc, NULL, &ce)) {
        fprintf(stderr, "fasa bench latency: create on the server: %s\n", ce.msg);
        goto done;
    }
    /* Prefill, chunk by chunk, every layer the same keys. */
    const int chunk = 2048;
    for (long p = 0; p < tokens; p += chunk) {
        const int m = (int)(tokens - p < chunk ? tokens - p : chunk);
        synth_kv(&x->sy, (int)p, m, x->k, x->v);
        for (int l = 0; l < L; l++) {
            if (fasa_engine_append(eng, "s", l, (int32_t)p, m, x->k, x->v, &fe)) {
                fprintf(stderr, "fasa bench latency: embedded append: %s\n", fe.msg);
                goto drop;
            }
            if (fasa_client_append(c, sid, &g, l, (uint64_t)p, (uint64_t)m, x->k, x->v, NULL,
                                   &ce)) {
                fprintf(stderr, "fasa bench latency: append: %s\n", ce.msg);
                goto drop;
            }
        }
    }
    /* The decode loop: token by token, layer by layer, embedded then server. */
    double max_diff = 0;
    int i = 0;
    for (int s = 0; s < o->steps; s++) {
        const int pos = (int)tokens + s;
        synth_kv(&x->sy, pos, 1, x->kn, x->vn);
        synth_query(&x->sy, pos, x->q);
        for (int l = 0; l < L; l++, i++) {
            const fasa_attend_req er = {.layer = l,
                                        .q = x->q,
                                        .k_new = x->kn,
                                        .v_new = x->vn,
                                        .method = -1,
                                        .gqa = -1,
                                        .max_pos = -1};
            fasa_step_stats est;
            const double t0 = timing_now();
            if (fasa_engine_attend(eng, "s", &er, x->oe, NULL, &est, &fe)) {
                fprintf(stderr, "fasa bench latency: embedded attend: %s\n", fe.msg);
                goto drop;
            }
            const double t1 = timing_now();
            fasa_client_attend_req r = FASA_CLIENT_ATTEND_REQ_INIT;
            r.session_id = sid;
            r.geom = g;
            r.layer = (uint32_t)l;
            r.q = x->q;
            r.k_new = x->kn;
            r.v_new = x->vn;
            r.out = x->os;
            if (fasa_client_attend(c, &r, &ce)) {
                fprintf(stderr, "fasa bench latency: attend: %s\n", ce.msg);
                goto drop;
            }
            const double t2 = timing_now();
            fasa_client_timing tm;
            fasa_client_last_timing(c, &tm);
            t[C_EMB][i] = 1e6 * (t1 - t0);
            t[C_RT][i] = 1e6 * (t2 - t1);
            t[C_ENC][i] = tm.encode_us;
            t[C_DEC][i] = tm.decode_us;
            t[C_ZMQ][i] = tm.wait_us - tm.queue_us - tm.server_decode_us - tm.server_us;
            t[C_QUEUE][i] = tm.queue_us;
            t[C_SDEC][i] = tm.server_decode_us;
            /* A server step run in one exchange (coord/engine.h fasa_engine_set_one_exchange:
             * score 0, both phases timed as attend) against both embedded phases. */
            const int one = tm.score_us == 0 && est.score_us > 0;
            t[C_SCORE][i] = one ? 0 : tm.score_us - est.score_us;
            t[C_MERGE][i] = tm.merge_us - est.merge_us;
            t[C_ATT][i] = tm.attend_us - est.attend_us - (one ? est.score_us : 0);
            t[C_REST][i] = (tm.server_us - tm.score_us - tm.merge_us - tm.attend_us) -
                           (t[C_EMB][i] - est.score_us - est.merge_us - est.attend_us);
            for (size_t j = 0; j < (size_t)nh * d; j++) {
                const double df = fabs((double)x->oe[j] - (double)x->os[j]);
                if (df > max_diff || isnan(df)) max_diff = isnan(df) ? INFINITY : df;
            }
        }
    }
    static const double ps[3] = {0.5, 0.9, 0.99};
    for (int k = 0; k < 3; k++) {
        row->emb[k] = timing_pct(n, t[C_EMB], ps[k]);
        row->srv[k] = timing_pct(n, t[C_RT], ps[k]);
        row->ovh[k] = row->srv[k] - row->emb[k];
    }
    for (int k = 0; k < C_N; k++) row->comp[k] = timing_median(n, t[k]);
    row->n = n;
    row->workers = workers;
    row->tokens = tokens;
    row->method = s_methods[mi];
    row->max_diff = max_diff;
    rc = 0;
drop:
    fasa_client_drop_session(c, sid, NULL);
done:
    for (int k = 0; k < C_N; k++) free(t[k]);
    fasa_engine_destroy(&eng);
    free(dense_layers);
    return rc;
}

static void s_print_row(const lat_row *r)
{
    printf("  %-5s %6ld tokens, %d Attends: embedded p50/p90/p99 %.0f / %.0f / %.0f us, "
           "server %.0f / %.0f / %.0f us\n",
           r->method, r->tokens, r->n, r->emb[0], r->emb[1], r->emb[2], r->srv[0], r->srv[1],
           r->srv[2]);
    printf("        overhead (server - embedded) p50 %.0f us, p90 %.0f us, p99 %.0f us; "
           "max |server - embedded| %.3g\n",
           r->ovh[0], r->ovh[1], r->ovh[2], r->max_diff);
    printf("        where it goes (medians, us):");
    for (int k = C_ENC; k < C_N; k++)
        printf("%s %s %.0f", k == C_ENC ? "" : ",", s_comp_names[k], r->comp[k]);
    printf("\n");
}

static const char *s_met(double v, double target)
{
    return v <= target ? "met" : "NOT met";
}

/* The targets, for the rows at 4K tokens. Returns the number printed. */
static int s_targets(const lat_row *rows, int n_rows)
{
    int printed = 0, negative = 0;
    for (int i = 0; i < n_rows; i++) negative |= rows[i].ovh[0] < 0 || rows[i].ovh[2] < 0;
    if (negative)
        printf("note: a negative overhead means the embedded and server calls' own times varied "
               "more than the overhead (a loaded machine): rerun on a quiet one\n");
    for (int i = 0; i < n_rows; i++) {
        const lat_row *r = &rows[i];
        if (r->tokens != TARGET_TOKENS) continue;
        if (r->workers == 1) {
            printf("target: %s, 1 worker, 4K tokens: overhead p50 %.0f us (target <= %.0f: %s), "
                   "p99 %.0f us (target <= %.0f: %s)\n",
                   r->method, r->ovh[0], TARGET_P50_1W, s_met(r->ovh[0], TARGET_P50_1W), r->ovh[2],
                   TARGET_P99_1W, s_met(r->ovh[2], TARGET_P99_1W));
            printed++;
        } else if (r->workers == 2) {
            printf("target: %s, 2 workers, 4K tokens: overhead p50 %.0f us (target <= %.0f: %s)\n",
                   r->method, r->ovh[0], TARGET_P50_2W, s_met(r->ovh[0], TARGET_P50_2W));
            printed++;
        }
    }
    return printed;
}

static int s_json(const bench_latency_opts *o, const lat_row *rows, int n_rows, const char *model,
                  const char *simd)
{
    FILE *f = fopen(o->json, "w");
    if (!f) {
        fprintf(stderr, "fasa bench latency: --json %s: cannot write\n", o->json);
        return 1;
    }
    /* The headline: the first row at 4K tokens (else the first row). */
    int h = 0;
    for (int i = 0; i < n_rows; i++)
        if (rows[i].tokens == TARGET_TOKENS) {
            h = i;
            break;
        }
    fprintf(f, "{\n  \"cpu\": \"%s\",\n  \"simd\": \"%s\",\n  \"simd_path\": \"%s\",\n", model,
            simd, simd_path_name(simd_path_default()));
    if (n_rows)
        fprintf(f,
                "  \"attend_us_p50\": %.1f,\n  \"embedded_us_p50\": %.1f,\n"
                "  \"overhead_us_p50\": %.1f,\n  \"overhead_us_p99\": %.1f,\n",
                rows[h].srv[0], rows[h].emb[0], rows[h].ovh[0], rows[h].ovh[2]);
    fprintf(f, "  \"rows\": [\n");
    for (int i = 0; i < n_rows; i++) {
        const lat_row *r = &rows[i];
        fprintf(
            f,
            "    {\"server\": \"%s\", \"workers\": %d, \"tokens\": %ld, \"method\": \"%s\", "
            "\"attends\": %d, \"layers\": %d,\n     \"embedded_us\": [%.1f, %.1f, %.1f], "
            "\"attend_us\": [%.1f, %.1f, %.1f], \"overhead_us\": [%.1f, %.1f, %.1f],\n"
            "     \"attend_us_p50\": %.1f, \"overhead_us_p50\": %.1f, \"overhead_us_p99\": %.1f, "
            "\"max_abs_diff\": %.3g,\n     \"breakdown_us\": {",
            r->server, r->workers, r->tokens, r->method, r->n, o->layers, r->emb[0], r->emb[1],
            r->emb[2], r->srv[0], r->srv[1], r->srv[2], r->ovh[0], r->ovh[1], r->ovh[2], r->srv[0],
            r->ovh[0], r->ovh[2], r->max_diff);
        for (int k = C_ENC; k < C_N; k++)
            fprintf(f, "%s\"%s\": %.1f", k == C_ENC ? "" : ", ", s_comp_names[k], r->comp[k]);
        fprintf(f, "}}%s\n", i + 1 < n_rows ? "," : "");
    }
    fprintf(f, "  ]\n}\n");
    return fclose(f) ? 1 : 0;
}

int bench_latency_run(const bench_latency_opts *o)
{
    char model[256], simd[256];
    roofline_cpu(model, sizeof(model), simd, sizeof(simd));
    printf("cpu: %s; simd: %s; kernels' path %s\n", model, simd,
           simd_path_name(simd_path_default()));
    long max_tokens = 0;
    for (int i = 0; i < o->n_tokens; i++)
        if (o->tokens[i] > max_tokens) max_tokens = o->tokens[i];
    lat_ctx x = {.o = o};
    char err[256];
    const synth_cfg sc = synth_cfg_default((int)(max_tokens + o->steps));
    if (synth_init(&x.sy, &sc, err, sizeof(err))) {
        fprintf(stderr, "fasa bench latency: %s\n", err);
        return 1;
    }
    const size_t kv_row = (size_t)sc.n_kv_heads * sc.head_dim,
                 q_row = (size_t)sc.n_heads * sc.head_dim;
    x.prof = s_profile(&x.sy, o->layers);
    x.prof_text = x.prof ? s_profile_text(x.prof) : NULL;
    x.k = malloc(2048 * kv_row * sizeof(float));
    x.v = malloc(2048 * kv_row * sizeof(float));
    x.kn = malloc(kv_row * sizeof(float));
    x.vn = malloc(kv_row * sizeof(float));
    x.q = malloc(q_row * sizeof(float));
    x.oe = malloc(q_row * sizeof(float));
    x.os = malloc(q_row * sizeof(float));
    const int max_rows = BENCH_LATENCY_MAX * BENCH_LATENCY_MAX * 2;
    lat_row *rows = calloc((size_t)max_rows, sizeof(*rows));
    int rc = 1, n_rows = 0;
    if (!x.prof_text || !x.k || !x.v || !x.kn || !x.vn || !x.q || !x.oe || !x.os || !rows) {
        fprintf(stderr, "fasa bench latency: out of memory\n");
        goto done;
    }
    printf("decode loop: %d layers x %d tokens per context, 32 query / 8 KV heads, head_dim 128, "
           "f32, fasa budget %d (no dense layer); each Attend carries k_new and v_new\n",
           o->layers, o->steps, o->budget);
    if (!o->n_servers) printf("no --server given: nothing to compare the embedded engine with\n");
    for (int si = 0; si < o->n_servers; si++) {
        fasa_client_server_info info;
        char msg[512];
        fasa_client *c =
            backend_connect(o->servers[si], BACKEND_TIMEOUT_MS, &info, msg, sizeof(msg));
        if (!c) {
            fprintf(stderr, "fasa bench latency: %s\n", msg);
            goto done;
        }
        const int workers = info.n_ranks > 1 ? (int)info.n_ranks - 1 : 1;
        printf("server %s: %s, %u rank%s (%d worker%s)\n", o->servers[si], info.version,
               info.n_ranks, info.n_ranks == 1 ? "" : "s", info.n_ranks > 1 ? workers : 0,
               workers == 1 && info.n_ranks > 1 ? "" : "s");
        for (int ti = 0; ti < o->n_tokens; ti++)
            for (int mi = 0; mi < 2; mi++) {
                if (!(o->methods & (1 << mi))) continue;
                lat_row *r = &rows[n_rows];
                snprintf(r->server, sizeof(r->server), "%s", o->servers[si]);
                if (s_run_one(&x, c, info.n_ranks > 1 ? workers : 0, o->tokens[ti], mi, r)) {
                    fasa_client_close(&c);
                    goto done;
                }
                if (info.n_ranks == 1) r->workers = 0;
                s_print_row(r);
                fflush(stdout);
                n_rows++;
            }
        fasa_client_close(&c);
    }
    if (!s_targets(rows, n_rows) && o->n_servers)
        printf("targets: none measured (they are at 4096 tokens with a 1- and a 2-worker "
               "server)\n");
    rc = o->json ? s_json(o, rows, n_rows, model, simd) : 0;
done:
    free(rows);
    free(x.k), free(x.v), free(x.kn), free(x.vn), free(x.q), free(x.oe), free(x.os);
    free(x.prof_text);
    fasa_profile_destroy(&x.prof);
    synth_free(&x.sy);
    return rc;
}

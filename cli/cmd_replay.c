/* fasa replay: the real decode loop over recorded activations. For each position t in the
 * range, in every layer, append k[t], v[t] and attend with q[t] over keys 0..t. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "cli.h"
#include "dtype.h"
#include "scan.h"
#include "engine.h"
#include "npy.h"
#include "opts.h"
#include "progress.h"
#include "qkv.h"

static const char usage[] =
    "usage: fasa replay --qkv FILE --method M --budget B --out OUT.npy [options]\n"
    "\n"
    "Creates a session with the dump's geometry, appends the keys and values of the positions\n"
    "below A in one bulk append, then for each position t in A:B:S appends position t (and the\n"
    "positions skipped by S) and attends with q[t] over keys 0..t in every layer.\n"
    "OUT.npy is float32 (n_positions, n_layers, n_heads, head_dim).\n"
    "\n";

typedef struct replay_opts {
    const char *qkv, *out, *profile, *selected, *dense_layers, *positions, *server;
    fasa_method method;
    int have_method, compare;
    long budget, shards, block;
    fasa_gqa gqa;
    fc_pairing pairing;
    fasa_dtype dtype;
    int score_dtype; /* scan_dtype, 0 auto */
} replay_opts;

static int s_parse(int argc, char **argv, replay_opts *o)
{
    char err[600];
    memset(o, 0, sizeof(*o));
    o->shards = 1;
    o->block = FASA_DEFAULT_BLOCK;
    const cli_opt opts[] = {
        CLI_STR("qkv", &o->qkv, "FILE", NULL, "a QKV1 dump or a directory with q.npy k.npy v.npy"),
        CLI_KEY("method", 'm', "M", NULL,
                "fasa (needs --profile), dense, oracle (exact top-B), or the\n"
                "baselines stream (8 sinks + recent), quest (pages of 16;\n"
                "--block must be a multiple of 16) and sparq (r = 2 ntip\n"
                "dims with --profile, else head_dim/4; per-head gqa only), or\n"
                "ours, fasa-plus (needs --profile; per-head gqa only: fasa's\n"
                "scan plus a sink and a recent window of B/(2 ntip) - 1 tokens,\n"
                "and the unselected tokens' mass estimated from their scores)"),
        CLI_INT("budget", &o->budget, 1, 1 << 20, "B", NULL,
                "tokens kept per query head (per KV head with --gqa shared); when\n"
                "t+1 <= B every token is used (not needed with --method dense)"),
        CLI_STR("out", &o->out, "OUT.npy", NULL, "attention outputs"),
        CLI_STR("profile", &o->profile, "PROFILE", NULL,
                "calibration profile from 'fasa calibrate'"),
        CLI_STR("dense-layers", &o->dense_layers, "LIST", "0",
                "comma-separated layers kept dense under fasa and fasa-plus, or\nnone"),
        CLI_STR("positions", &o->positions, "A:B[:S]", NULL,
                "decode positions (default: the last quarter of the dump)"),
        CLI_KEY("gqa", 'g', "G", NULL, "per-head (default) or shared: one token set per KV head"),
        CLI_KEY("pairing", 'P', "P", NULL,
                "interleaved (default) or half; taken from the profile if given"),
        CLI_KEY("dtype", 'T', "T", NULL,
                "key/value storage: f32 (default), f16 or bf16 (--compare's dense\n"
                "and oracle sessions use it too)"),
        CLI_KEY("score-dtype", 'Z', "T", NULL,
                "the FASA scan's scoring store: f32, f16, bf16 or int8 (one scale\n"
                "per row; default: the --dtype's own key dims)"),
        CLI_STR("selected", &o->selected, "SEL.npy", NULL,
                "int32 (n_positions, n_layers, n_heads, B): chosen positions,\n"
                "best first, -1 padded; all -1 where a layer ran dense"),
        CLI_FLAG("compare", &o->compare,
                 "also print per layer the recall of the exact top-B, the\n"
                 "relative error of the output against dense attention and the\n"
                 "KV bytes the method read per step (the engine's bytes_read)"),
        CLI_INT("shards", &o->shards, 1, 1024, "N", NULL,
                "in-process shards (default 1; outputs do not depend on it)"),
        CLI_INT("block", &o->block, 1, 1 << 30, "N", "2048", "tokens per placement block"),
        CLI_STR("server", &o->server, "ENDPOINT", NULL,
                "run the sessions on a fasa-server (e.g. tcp://127.0.0.1:5555)\n"
                "instead of the embedded engine: the same numbers, over the wire;\n"
                "the sessions are named cli-<pid>-... and dropped at exit\n"
                "(FASA_TIMEOUT_MS: the wait for each reply, default 120000)"),
        CLI_END};
    cli_parser p;
    cli_begin(&p, "replay", usage, opts, argc, argv);
    int c;
    while ((c = cli_next(&p)) > 0) {
        switch (c) {
        case 'm':
            if (fasa_method_parse(p.arg, &o->method))
                return cli_usage_error(
                    "replay",
                    "--method '%s' is not fasa, dense, oracle, stream, quest, sparq or fasa-plus",
                    p.arg);
            o->have_method = 1;
            break;
        case 'g':
            if (fasa_gqa_parse(p.arg, &o->gqa))
                return cli_usage_error("replay", "--gqa '%s' is not per-head or shared", p.arg);
            break;
        case 'P':
            if (fc_pairing_parse(p.arg, &o->pairing))
                return cli_usage_error("replay", "--pairing '%s' is not interleaved or half",
                                       p.arg);
            break;
        case 'T':
            if (fasa_dtype_parse(p.arg, &o->dtype))
                return cli_usage_error("replay", "--dtype '%s' is not f32, f16 or bf16", p.arg);
            break;
        case 'Z':
            if (scan_dtype_parse(p.arg, &o->score_dtype))
                return cli_usage_error("replay", "--score-dtype '%s' is not f32, f16, bf16 or int8",
                                       p.arg);
            break;
        }
    }
    if (c < 0) return cli_status(c);
    if (!o->qkv) return cli_usage_error("replay", "--qkv FILE is required");
    if (!o->have_method) return cli_usage_error("replay", "--method is required");
    /* Dense attends to every token: its budget only sizes --selected (all -1). */
    if (!o->budget && o->method == FASA_METHOD_DENSE) o->budget = 256;
    if (!o->budget) return cli_usage_error("replay", "--budget B is required (B >= 1)");
    if (!o->out) return cli_usage_error("replay", "--out OUT.npy is required");
    if (cli_check_writable(o->out, err, sizeof(err)) ||
        (o->selected && cli_check_writable(o->selected, err, sizeof(err))))
        return cli_usage_error("replay", "%s", err);
    if ((o->method == FASA_METHOD_FASA || o->method == FASA_METHOD_FASA_PLUS) && !o->profile)
        return cli_usage_error("replay", "--method fasa needs --profile (see 'fasa calibrate')");
    return 0;
}

/* Appends positions [from, to) of every layer, in calls of at most 64 MiB of keys and
 * values (one call for small ranges; a server refuses over-large messages). */
static fasa_status s_append_range(backend *be, const char *id, const fasa_activations *a, int from,
                                  int to, float *kbuf, float *vbuf, fasa_error *err)
{
    const size_t row = (size_t)a->n_kv_heads * a->head_dim;
    size_t chunk = ((size_t)64 << 20) / (2 * sizeof(float) * row * (size_t)a->n_layers);
    if (chunk < 1) chunk = 1;
    while (from < to) {
        const size_t n = (size_t)(to - from) < chunk ? (size_t)(to - from) : chunk;
        for (int l = 0; l < a->n_layers; l++) {
            memcpy(kbuf + l * n * row, a->k[l] + from * row, n * row * sizeof(float));
            memcpy(vbuf + l * n * row, a->v[l] + from * row, n * row * sizeof(float));
        }
        const fasa_status st = backend_append(be, id, -1, from, (int)n, kbuf, vbuf, err);
        if (st) return st;
        from += (int)n;
    }
    return FASA_OK;
}

typedef struct layer_cmp {
    double recall_sum, err_sum, err_max, bytes_sum;
    long steps;
    long n;
} layer_cmp;

int cmd_replay(int argc, char **argv)
{
    replay_opts o;
    int rc = s_parse(argc, argv, &o);
    if (rc) return rc < 0 ? 0 : rc;

    char err[512];
    fasa_qkv x;
    if (fasa_qkv_load(o.qkv, &x, err, sizeof(err))) return cli_fail("replay", "%s", err);
    const fasa_activations *a = &x.act;
    const int L = a->n_layers, H = a->n_heads, d = a->head_dim, T = a->n_tokens;
    const int B = (int)o.budget;
    fasa_profile *prof = NULL;
    backend *eng = NULL;
    float *out = NULL, *ref = NULL, *kbuf = NULL, *vbuf = NULL;
    int32_t *sel = NULL, *osel = NULL, *stepsel = NULL;
    uint8_t *dense = NULL, *mark = NULL;
    layer_cmp *cmp = NULL;
    rc = 1;

    long pa = T - T / 4, pb = T, ps = 1;
    if (pa >= pb) pa = 0;
    if (o.positions && (cli_parse_range(o.positions, &pa, &pb, &ps) || pb > T)) {
        rc = cli_usage_error("replay", "--positions '%s' must be A:B[:S] with 0 <= A < B <= %d",
                             o.positions, T);
        goto done;
    }
    if (o.profile) {
        if (!(prof = fasa_profile_load(o.profile, err, sizeof(err)))) {
            cli_fail("replay", "%s", err);
            goto done;
        }
        if (fasa_profile_check(prof, L, H, a->n_kv_heads, d, prof->pairing, err, sizeof(err))) {
            cli_fail("replay", "%s (dump %s)", err, o.qkv);
            goto done;
        }
        o.pairing = prof->pairing;
    }
    dense = malloc((size_t)L);
    if (!dense || cli_parse_dense_layers(o.dense_layers, L, dense)) {
        rc = cli_usage_error("replay", "--dense-layers '%s' must be none or layers in [0, %d)",
                             o.dense_layers, L);
        goto done;
    }

    const long n_pos = (pb - pa + ps - 1) / ps;
    const size_t out_n = (size_t)n_pos * L * H * d, sel_n = (size_t)n_pos * L * H * B;
    const size_t row = (size_t)a->n_kv_heads * d;
    out = malloc(out_n * sizeof(float));
    kbuf = malloc((size_t)L * (pa > ps ? pa : ps) * row * sizeof(float));
    vbuf = malloc((size_t)L * (pa > ps ? pa : ps) * row * sizeof(float));
    stepsel = malloc((size_t)H * B * sizeof(int32_t));
    if (o.selected || o.compare) sel = malloc(sel_n * sizeof(int32_t));
    if (o.compare) {
        ref = malloc(2 * (size_t)H * d * sizeof(float)); /* dense, then oracle */
        osel = malloc((size_t)H * B * sizeof(int32_t));
        mark = calloc((size_t)T, 1);
        cmp = calloc((size_t)L, sizeof(*cmp));
    }
    if (!out || !kbuf || !vbuf || !stepsel || ((o.selected || o.compare) && !sel) ||
        (o.compare && (!ref || !osel || !mark || !cmp))) {
        cli_fail("replay", "out of memory for %ld positions", n_pos);
        goto done;
    }
    fasa_error fe;
    if (!(eng = backend_open(o.server, (int)o.shards, (int)o.block, &fe))) {
        cli_fail("replay", "%s", fe.msg);
        goto done;
    }

    fasa_session_config cfg = {.n_layers = L,
                               .n_heads = H,
                               .n_kv_heads = a->n_kv_heads,
                               .head_dim = d,
                               .pairing = o.pairing,
                               .profile = prof,
                               .method = o.method,
                               .budget = B,
                               .gqa = o.gqa,
                               .dense_layers = dense,
                               .dtype = o.dtype,
                               .score_dtype = o.score_dtype};
    static const char *const ids[3] = {"replay", "dense", "oracle"};
    const int n_sessions = o.compare ? 3 : 1;
    for (int i = 0; i < n_sessions; i++) {
        fasa_session_config c = cfg;
        if (i > 0) c.method = i == 1 ? FASA_METHOD_DENSE : FASA_METHOD_ORACLE;
        if (backend_create(eng, ids[i], &c, &fe) ||
            s_append_range(eng, ids[i], a, 0, (int)pa, kbuf, vbuf, &fe)) {
            cli_fail("replay", "%s", fe.msg);
            goto done;
        }
    }

    progress bar;
    progress_init(&bar, "replay", n_pos);
    long k = 0;
    for (long t = pa; t < pb; t += ps, k++) {
        for (int i = 0; i < n_sessions; i++) {
            /* Positions the step skipped over still belong to the context. */
            const int32_t have = backend_length(eng, ids[i], 0);
            if (s_append_range(eng, ids[i], a, have, (int)t, kbuf, vbuf, &fe)) {
                cli_fail("replay", "%s", fe.msg);
                goto done;
            }
        }
        for (int l = 0; l < L; l++) {
            fasa_attend_req req = {.layer = l,
                                   .q = a->q[l] + (size_t)t * H * d,
                                   .k_new = a->k[l] + (size_t)t * row,
                                   .v_new = a->v[l] + (size_t)t * row,
                                   .method = -1,
                                   .budget = 0,
                                   .gqa = -1,
                                   .max_pos = -1};
            float *o_t = out + ((size_t)k * L + l) * H * d;
            int32_t *s_t = sel ? sel + ((size_t)k * L + l) * H * B : stepsel;
            fasa_step_stats sst = {0};
            if (backend_attend(eng, ids[0], &req, o_t, s_t, &sst, &fe)) {
                cli_fail("replay", "position %ld layer %d: %s", t, l, fe.msg);
                goto done;
            }
            if (!o.compare) continue;
            cmp[l].bytes_sum += (double)sst.bytes_read;
            cmp[l].steps++;
            if (backend_attend(eng, ids[1], &req, ref, NULL, NULL, &fe) ||
                backend_attend(eng, ids[2], &req, ref + (size_t)H * d, osel, NULL, &fe)) {
                cli_fail("replay", "position %ld layer %d: %s", t, l, fe.msg);
                goto done;
            }
            for (int h = 0; h < H; h++) {
                double num = 0, den = 0;
                for (int c = 0; c < d; c++) {
                    const double diff = o_t[h * d + c] - ref[h * d + c];
                    num += diff * diff;
                    den += (double)ref[h * d + c] * ref[h * d + c];
                }
                const double rel = den > 0 ? sqrt(num / den) : sqrt(num);
                cmp[l].err_sum += rel;
                if (rel > cmp[l].err_max) cmp[l].err_max = rel;
                /* Recall of the exact top-B: a step that used every token recalls all. */
                const int32_t *mine = s_t + (size_t)h * B, *best = osel + (size_t)h * B;
                double recall = 1.0;
                if (mine[0] >= 0 && best[0] >= 0) {
                    int n_best = 0, hit = 0;
                    for (int i = 0; i < B && mine[i] >= 0; i++) mark[mine[i]] = 1;
                    for (int i = 0; i < B && best[i] >= 0; i++) n_best++, hit += mark[best[i]];
                    for (int i = 0; i < B && mine[i] >= 0; i++) mark[mine[i]] = 0;
                    recall = n_best ? (double)hit / n_best : 1.0;
                }
                cmp[l].recall_sum += recall;
                cmp[l].n++;
            }
        }
        progress_update(&bar, k + 1);
    }
    progress_done(&bar);

    int64_t shape[4] = {n_pos, L, H, d};
    if (npy_write(o.out, "<f4", 4, shape, out, err, sizeof(err))) {
        cli_fail("replay", "%s", err);
        goto done;
    }
    if (o.selected) {
        shape[3] = B;
        if (npy_write(o.selected, "<i4", 4, shape, sel, err, sizeof(err))) {
            cli_fail("replay", "%s", err);
            goto done;
        }
    }
    printf("replayed %ld positions (%ld:%ld:%ld) x %d layers, method %s, budget %d, gqa %s, "
           "%s: wrote %s\n",
           n_pos, pa, pb, ps, L, fasa_method_name(o.method), B,
           o.gqa == FASA_GQA_SHARED ? "shared" : "per-head", backend_describe(eng), o.out);
    if (o.compare) {
        printf("%-6s %-8s %-10s %-14s %-14s %s\n", "layer", "mode", "recall", "rel_err_mean",
               "rel_err_max", "bytes_per_step");
        for (int l = 0; l < L; l++) {
            const int is_dense =
                o.method == FASA_METHOD_DENSE ||
                ((o.method == FASA_METHOD_FASA || o.method == FASA_METHOD_FASA_PLUS) && dense[l]);
            printf("%-6d %-8s %-10.4f %-14.3e %-14.3e %.0f\n", l, is_dense ? "dense" : "sparse",
                   cmp[l].recall_sum / cmp[l].n, cmp[l].err_sum / cmp[l].n, cmp[l].err_max,
                   cmp[l].bytes_sum / (double)cmp[l].steps);
        }
    }
    rc = 0;
done:
    backend_close(&eng);
    fasa_profile_destroy(&prof);
    fasa_qkv_cleanup(&x);
    free(out);
    free(ref);
    free(kbuf);
    free(vbuf);
    free(sel);
    free(osel);
    free(stepsel);
    free(dense);
    free(mark);
    free(cmp);
    return rc;
}

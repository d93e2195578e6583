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
    int merge;       /* fasa_merge of the method's session */
    double merge_eps;
    int have_eps;
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
        CLI_KEY("merge", 'M', "M", NULL,
                "exact (default) or local: each shard attends over its own top\n"
                "ceil(B (1 + eps) / S) in one round trip (fasa and oracle only;\n"
                "--selected all -1; --compare's sessions stay exact)"),
        CLI_KEY("merge-eps", 'E', "EPS", NULL,
                "the local merge's eps, 0..64 (default 0.25); in process only: a\n"
                "server uses its own (fasa-server --merge-eps)"),
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
        case 'M':
            if (strcmp(p.arg, "exact") && strcmp(p.arg, "local"))
                return cli_usage_error("replay", "--merge '%s' is not exact or local", p.arg);
            o->merge = p.arg[0] == 'l' ? FASA_MERGE_LOCAL : FASA_MERGE_EXACT;
            break;
        case 'E': {
            char *end = NULL;
            o->merge_eps = strtod(p.arg, &end);
            if (!*p.arg || *end || !(o->merge_eps >= 0 && o->merge_eps <= 64))
                return cli_usage_error("replay", "--merge-eps '%s' must be a number in [0, 64]",
                                       p.arg);
            o->have_eps = 1;
            break;
        }
        }
    }
    if (c < 0) return cli_status(c);
    if (!o->qkv) return cli_usage_error("replay", "--qkv FILE is required");
    if (o->have_eps && o->server)
        return cli_usage_error("replay", "--merge-eps is in process only: a server uses its own "
                                         "(fasa-server --merge-eps)");
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

/* One replay: the options, the dump, the sessions and the outputs. */
typedef struct replay_run {
    replay_opts o;
    fasa_qkv x;
    const fasa_activations *a; /* &x.act */
    int L, H, d, T, B;
    long pa, pb, ps, n_pos; /* the positions pa:pb:ps, n_pos of them */
    size_t row;             /* n_kv_heads * d */
    fasa_profile *prof;     /* owned; NULL without --profile */
    backend *eng;           /* owned */
    int n_sessions;         /* 1, or 3 with --compare (the method, dense, oracle) */
    float *out;             /* (n_pos, L, H, d) */
    int32_t *sel;           /* (n_pos, L, H, B) with --selected or --compare, else NULL */
    int32_t *stepsel;       /* (H, B) one step's selection when sel is NULL */
    float *kbuf, *vbuf;     /* (L, max(pa, ps), row) appends */
    float *ref;             /* (2, H, d) --compare: dense, then oracle outputs */
    int32_t *osel;          /* (H, B) --compare: the oracle's selection */
    uint8_t *dense;         /* (L) layers kept dense */
    uint8_t *mark;          /* (T) recall scratch */
    layer_cmp *cmp;         /* (L) --compare figures */
} replay_run;

static const char *const s_ids[3] = {"replay", "dense", "oracle"};

static void s_run_cleanup(replay_run *r)
{
    backend_close(&r->eng);
    fasa_profile_destroy(&r->prof);
    if (r->a) fasa_qkv_cleanup(&r->x);
    free(r->out);
    free(r->ref);
    free(r->kbuf);
    free(r->vbuf);
    free(r->sel);
    free(r->osel);
    free(r->stepsel);
    free(r->dense);
    free(r->mark);
    free(r->cmp);
}

/* The dump, the positions, the profile and the dense layers. 0, or the exit status after
 * printing why. */
static int s_run_load(replay_run *r)
{
    char err[512];
    replay_opts *o = &r->o;
    if (fasa_qkv_load(o->qkv, &r->x, err, sizeof(err))) return cli_fail("replay", "%s", err);
    const fasa_activations *a = r->a = &r->x.act;
    r->L = a->n_layers;
    r->H = a->n_heads;
    r->d = a->head_dim;
    r->T = a->n_tokens;
    r->B = (int)o->budget;
    r->row = (size_t)a->n_kv_heads * r->d;
    r->pa = r->T - r->T / 4;
    r->pb = r->T;
    r->ps = 1;
    if (r->pa >= r->pb) r->pa = 0;
    if (o->positions && (cli_parse_range(o->positions, &r->pa, &r->pb, &r->ps) || r->pb > r->T))
        return cli_usage_error("replay", "--positions '%s' must be A:B[:S] with 0 <= A < B <= %d",
                               o->positions, r->T);
    r->n_pos = (r->pb - r->pa + r->ps - 1) / r->ps;
    if (o->profile) {
        if (!(r->prof = fasa_profile_load(o->profile, err, sizeof(err))))
            return cli_fail("replay", "%s", err);
        if (fasa_profile_check(r->prof, r->L, r->H, a->n_kv_heads, r->d, r->prof->pairing, err,
                               sizeof(err)))
            return cli_fail("replay", "%s (dump %s)", err, o->qkv);
        o->pairing = r->prof->pairing;
    }
    r->dense = malloc((size_t)r->L);
    if (!r->dense || cli_parse_dense_layers(o->dense_layers, r->L, r->dense))
        return cli_usage_error("replay", "--dense-layers '%s' must be none or layers in [0, %d)",
                               o->dense_layers, r->L);
    return 0;
}

/* The output and scratch buffers. 0, or 1 after printing why. */
static int s_run_alloc(replay_run *r)
{
    const replay_opts *o = &r->o;
    const int L = r->L, H = r->H, d = r->d, B = r->B;
    const size_t out_n = (size_t)r->n_pos * L * H * d, sel_n = (size_t)r->n_pos * L * H * B;
    const long chunk = r->pa > r->ps ? r->pa : r->ps;
    r->out = malloc(out_n * sizeof(float));
    r->kbuf = malloc((size_t)L * chunk * r->row * sizeof(float));
    r->vbuf = malloc((size_t)L * chunk * r->row * sizeof(float));
    r->stepsel = malloc((size_t)H * B * sizeof(int32_t));
    if (o->selected || o->compare) r->sel = malloc(sel_n * sizeof(int32_t));
    if (o->compare) {
        r->ref = malloc(2 * (size_t)H * d * sizeof(float)); /* dense, then oracle */
        r->osel = malloc((size_t)H * B * sizeof(int32_t));
        r->mark = calloc((size_t)r->T, 1);
        r->cmp = calloc((size_t)L, sizeof(*r->cmp));
    }
    if (!r->out || !r->kbuf || !r->vbuf || !r->stepsel ||
        ((o->selected || o->compare) && !r->sel) ||
        (o->compare && (!r->ref || !r->osel || !r->mark || !r->cmp)))
        return cli_fail("replay", "out of memory for %ld positions", r->n_pos);
    return 0;
}

/* The backend and the sessions (the method's; with --compare also dense and oracle), each
 * holding the positions below pa. 0, or 1 after printing why. */
static int s_run_sessions(replay_run *r)
{
    const replay_opts *o = &r->o;
    fasa_error fe;
    if (!(r->eng = backend_open(o->server, (int)o->shards, (int)o->block, &fe)))
        return cli_fail("replay", "%s", fe.msg);
    if (o->have_eps && backend_set_merge_eps(r->eng, o->merge_eps))
        return cli_fail("replay", "--merge-eps %g: not in [0, 64]", o->merge_eps);
    const fasa_session_config cfg = {.n_layers = r->L,
                                     .n_heads = r->H,
                                     .n_kv_heads = r->a->n_kv_heads,
                                     .head_dim = r->d,
                                     .pairing = o->pairing,
                                     .profile = r->prof,
                                     .method = o->method,
                                     .budget = r->B,
                                     .gqa = o->gqa,
                                     .dense_layers = r->dense,
                                     .dtype = o->dtype,
                                     .score_dtype = o->score_dtype,
                                     .merge = o->merge};
    r->n_sessions = o->compare ? 3 : 1;
    for (int i = 0; i < r->n_sessions; i++) {
        fasa_session_config c = cfg;
        if (i > 0) c.method = i == 1 ? FASA_METHOD_DENSE : FASA_METHOD_ORACLE;
        if (i > 0) c.merge = FASA_MERGE_EXACT;
        if (backend_create(r->eng, s_ids[i], &c, &fe) ||
            s_append_range(r->eng, s_ids[i], r->a, 0, (int)r->pa, r->kbuf, r->vbuf, &fe))
            return cli_fail("replay", "%s", fe.msg);
    }
    return 0;
}

/* --compare for one step of layer l: the output's error against dense (ref) and the
 * selection's recall of the oracle's exact top-B (osel), per head. */
static void s_compare(replay_run *r, int l, const float *o_t, const int32_t *s_t)
{
    const int H = r->H, d = r->d, B = r->B;
    layer_cmp *cmp = &r->cmp[l];
    for (int h = 0; h < H; h++) {
        double num = 0, den = 0;
        for (int c = 0; c < d; c++) {
            const double diff = o_t[h * d + c] - r->ref[h * d + c];
            num += diff * diff;
            den += (double)r->ref[h * d + c] * r->ref[h * d + c];
        }
        const double rel = den > 0 ? sqrt(num / den) : sqrt(num);
        cmp->err_sum += rel;
        if (rel > cmp->err_max) cmp->err_max = rel;
        /* Recall of the exact top-B: a step that used every token recalls all. */
        const int32_t *mine = s_t + (size_t)h * B, *best = r->osel + (size_t)h * B;
        double recall = 1.0;
        if (mine[0] >= 0 && best[0] >= 0) {
            int n_best = 0, hit = 0;
            for (int i = 0; i < B && mine[i] >= 0; i++) r->mark[mine[i]] = 1;
            for (int i = 0; i < B && best[i] >= 0; i++) n_best++, hit += r->mark[best[i]];
            for (int i = 0; i < B && mine[i] >= 0; i++) r->mark[mine[i]] = 0;
            recall = n_best ? (double)hit / n_best : 1.0;
        }
        cmp->recall_sum += recall;
        cmp->n++;
    }
}

/* The decode loop: for each position t, append what the sessions lack below t, then attend
 * with q[t] in every layer (and, with --compare, in dense and oracle too). 0, or 1. */
static int s_run_steps(replay_run *r)
{
    const fasa_activations *a = r->a;
    const int L = r->L, H = r->H, d = r->d, B = r->B;
    fasa_error fe;
    progress bar;
    progress_init(&bar, "replay", r->n_pos);
    long k = 0;
    for (long t = r->pa; t < r->pb; t += r->ps, k++) {
        for (int i = 0; i < r->n_sessions; i++) {
            /* Positions the step skipped over still belong to the context. */
            const int32_t have = backend_length(r->eng, s_ids[i], 0);
            if (s_append_range(r->eng, s_ids[i], a, have, (int)t, r->kbuf, r->vbuf, &fe))
                return cli_fail("replay", "%s", fe.msg);
        }
        for (int l = 0; l < L; l++) {
            fasa_attend_req req = {.layer = l,
                                   .q = a->q[l] + (size_t)t * H * d,
                                   .k_new = a->k[l] + (size_t)t * r->row,
                                   .v_new = a->v[l] + (size_t)t * r->row,
                                   .method = -1,
                                   .budget = 0,
                                   .gqa = -1,
                                   .max_pos = -1,
                                   .merge = -1};
            float *o_t = r->out + ((size_t)k * L + l) * H * d;
            int32_t *s_t = r->sel ? r->sel + ((size_t)k * L + l) * H * B : r->stepsel;
            fasa_step_stats sst = {0};
            if (backend_attend(r->eng, s_ids[0], &req, o_t, s_t, &sst, &fe))
                return cli_fail("replay", "position %ld layer %d: %s", t, l, fe.msg);
            if (!r->o.compare) continue;
            r->cmp[l].bytes_sum += (double)sst.bytes_read;
            r->cmp[l].steps++;
            if (backend_attend(r->eng, s_ids[1], &req, r->ref, NULL, NULL, &fe) ||
                backend_attend(r->eng, s_ids[2], &req, r->ref + (size_t)H * d, r->osel, NULL, &fe))
                return cli_fail("replay", "position %ld layer %d: %s", t, l, fe.msg);
            s_compare(r, l, o_t, s_t);
        }
        progress_update(&bar, k + 1);
    }
    progress_done(&bar);
    return 0;
}

/* Writes --out (and --selected) and prints the summary (and the --compare table). */
static int s_run_report(replay_run *r)
{
    const replay_opts *o = &r->o;
    char err[512];
    int64_t shape[4] = {r->n_pos, r->L, r->H, r->d};
    if (npy_write(o->out, "<f4", 4, shape, r->out, err, sizeof(err)))
        return cli_fail("replay", "%s", err);
    if (o->selected) {
        shape[3] = r->B;
        if (npy_write(o->selected, "<i4", 4, shape, r->sel, err, sizeof(err)))
            return cli_fail("replay", "%s", err);
    }
    printf("replayed %ld positions (%ld:%ld:%ld) x %d layers, method %s, budget %d, gqa %s, "
           "%s: wrote %s\n",
           r->n_pos, r->pa, r->pb, r->ps, r->L, fasa_method_name(o->method), r->B,
           o->gqa == FASA_GQA_SHARED ? "shared" : "per-head", backend_describe(r->eng), o->out);
    if (!o->compare) return 0;
    printf("%-6s %-8s %-10s %-14s %-14s %s\n", "layer", "mode", "recall", "rel_err_mean",
           "rel_err_max", "bytes_per_step");
    for (int l = 0; l < r->L; l++) {
        const layer_cmp *c = &r->cmp[l];
        const int is_dense =
            o->method == FASA_METHOD_DENSE ||
            ((o->method == FASA_METHOD_FASA || o->method == FASA_METHOD_FASA_PLUS) && r->dense[l]);
        printf("%-6d %-8s %-10.4f %-14.3e %-14.3e %.0f\n", l, is_dense ? "dense" : "sparse",
               c->recall_sum / c->n, c->err_sum / c->n, c->err_max,
               c->bytes_sum / (double)c->steps);
    }
    return 0;
}

int cmd_replay(int argc, char **argv)
{
    replay_run r;
    memset(&r, 0, sizeof(r));
    int rc = s_parse(argc, argv, &r.o);
    if (rc) return rc < 0 ? 0 : rc;
    rc = s_run_load(&r);
    if (!rc) rc = s_run_alloc(&r) || s_run_sessions(&r) || s_run_steps(&r) || s_run_report(&r);
    s_run_cleanup(&r);
    return rc;
}

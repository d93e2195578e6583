/* fasa demo: a synthetic long-context decode, end to end and without files.
 *
 * 1. calibrate on a short synthetic sample (the first tokens of the same stream);
 * 2. stream the long context into three sessions of one engine: fasa (the profile, no
 *    dense layer), dense, and oracle (the exact top-B by the full dot product, used only
 *    to measure recall and the error any top-B selection would have);
 * 3. decode: each step appends its own token and attends with fasa, dense and oracle, and
 *    prints step times, bytes read, recall of the exact top-B and output errors. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "backend.h"
#include "calib.h"
#include "cli.h"
#include "dtype.h"
#include "scan.h"
#include "engine.h"
#include "opts.h"
#include "progress.h"
#include "score.h"
#include "synth.h"
#include "topk.h"
#include "timing.h"

static const char usage[] =
    "usage: fasa demo [options]\n"
    "\n"
    "Synthetic long-context decode with no files needed. Generates a RoPE'd context in which\n"
    "a few low-frequency chunks per KV head carry the signal, calibrates on a short sample,\n"
    "streams the context into a fasa, a dense and an oracle (exact top-B) session, then runs\n"
    "decode steps and prints per step: fasa and dense step time, speedup, KV bytes read,\n"
    "recall of the exact top-B and the relative L2 error of the output against dense.\n"
    "Memory: 3 sessions of tokens x kv-heads x head-dim x 8 bytes of f32 keys and values (6.0\n"
    "GiB at the defaults; half with --dtype f16 or bf16) plus working buffers: a peak RSS of\n"
    "about 6.5 GiB (7 GB) at the defaults, from 0.84 GiB at --tokens 32768 and 1.65 GiB at\n"
    "65536.\n"
    "\n";

typedef struct demo_opts {
    long tokens, steps, heads, kv_heads, head_dim, ntip, budget, shards, seed;
    const char *server, *state_dir;
    fasa_dtype dtype;
    int tier; /* 0 ram, 1 disk */
    /* scan_dtype of the fasa session, 0 auto */
    int score_dtype;
} demo_opts;

static int s_parse(int argc, char **argv, demo_opts *o)
{
    *o = (demo_opts){.tokens = 262144,
                     .steps = 8,
                     .heads = 32,
                     .kv_heads = 8,
                     .head_dim = 128,
                     .ntip = 16,
                     .budget = 256,
                     .shards = 1,
                     .seed = 1};
    const cli_opt opts[] = {
        CLI_INT_KEY("tokens", 't', &o->tokens, 1024, 1L << 24, "N",
                    "262144, or 32768 with --server", "context length (1024 .. 16777216)"),
        CLI_INT("steps", &o->steps, 1, 4096, "S", "8", "decode steps"),
        CLI_INT("heads", &o->heads, 1, 1024, "H", "32", "query heads"),
        CLI_INT("kv-heads", &o->kv_heads, 1, 1024, "G", "8", "KV heads (must divide --heads)"),
        CLI_INT_KEY("head-dim", 'D', &o->head_dim, 8, 1024, "D", "128",
                    "head dim (a multiple of 8)"),
        CLI_INT("ntip", &o->ntip, 1, 512, "N", "16", "dominant chunks per head to calibrate"),
        CLI_INT("budget", &o->budget, 1, 1 << 20, "B", "256",
                "tokens attended per query head; also the CA window"),
        CLI_INT("shards", &o->shards, 1, 64, "N", "1", "in-process shards"),
        CLI_INT("seed", &o->seed, 0, 0x7fffffffL, "S", "1", "generator seed"),
        CLI_KEY("dtype", 'T', "T", NULL,
                "key/value storage of the three sessions: f32 (default), f16 or bf16\n"
                "(f16/bf16 halve their memory and the KV bytes read)"),
        CLI_KEY("score-dtype", 'Z', "T", NULL,
                "the fasa session's scoring store: f32, f16, bf16 or int8 (default: the\n"
                "--dtype's own key dims)"),
        CLI_KEY("tier", 'R', "T", NULL,
                "where the fasa session keeps K and V: ram (default) or disk: only the\n"
                "dominant key dims in RAM, the rest of K and V in unlinked files under\n"
                "--state-dir, of which a step reads only the selected rows (the dense\n"
                "and oracle sessions stay in RAM; embedded engine only)"),
        CLI_STR("state-dir", &o->state_dir, "D", NULL, "directory for --tier disk's files"),
        CLI_STR("server", &o->server, "E", NULL,
                "run the three sessions on a fasa-server at endpoint E instead of the\n"
                "embedded engine (calibration stays local; the profile travels with\n"
                "the session). Step times then include the round trip, and the context\n"
                "crosses the socket (3 x tokens x kv-heads x head-dim x 8 bytes), hence\n"
                "the smaller default --tokens. Sessions are named cli-<pid>-fasa etc.\n"
                "and dropped at exit (FASA_TIMEOUT_MS: the wait per reply, default\n"
                "120000)"),
        CLI_END};
    cli_parser p;
    cli_begin(&p, "demo", usage, opts, argc, argv);
    int c, have_tokens = 0;
    while ((c = cli_next(&p)) > 0) {
        switch (c) {
        case 't':
            have_tokens = 1;
            break;
        case 'T':
            if (fasa_dtype_parse(p.arg, &o->dtype))
                return cli_usage_error("demo", "--dtype '%s' is not f32, f16 or bf16", p.arg);
            break;
        case 'Z':
            if (scan_dtype_parse(p.arg, &o->score_dtype))
                return cli_usage_error("demo", "--score-dtype '%s' is not f32, f16, bf16 or int8",
                                       p.arg);
            break;
        case 'R':
            if (strcmp(p.arg, "ram") && strcmp(p.arg, "disk"))
                return cli_usage_error("demo", "--tier '%s' is not ram or disk", p.arg);
            o->tier = p.arg[0] == 'd';
            break;
        case 'D':
            if (o->head_dim % 8)
                return cli_usage_error(
                    "demo", "--head-dim '%s' must be a multiple of 8 in [8, 1024]", p.arg);
            break;
        }
    }
    if (c < 0) return cli_status(c);
    if (o->server && !have_tokens) o->tokens = 32768;
    if (o->tier && o->server)
        return cli_usage_error("demo",
                               "--tier disk runs on the embedded engine only, not --server");
    if (o->tier && !o->state_dir)
        return cli_usage_error("demo", "--tier disk needs --state-dir DIR");
    if (o->heads % o->kv_heads)
        return cli_usage_error("demo", "--heads %ld must be a multiple of --kv-heads %ld", o->heads,
                               o->kv_heads);
    if (o->ntip > o->head_dim / 2)
        return cli_usage_error("demo", "--ntip %ld must be at most head-dim/2 = %ld", o->ntip,
                               o->head_dim / 2);
    if (o->steps > o->tokens / 2)
        return cli_usage_error("demo", "--steps %ld must be at most half of --tokens %ld", o->steps,
                               o->tokens);
    return 0;
}

/* Relative L2 error of a against reference r over H heads of d dims, mean over heads. */
static double s_rel_err(int H, int d, const float *a, const float *r)
{
    double sum = 0.0;
    for (int h = 0; h < H; h++) {
        double num = 0.0, den = 0.0;
        for (int c = 0; c < d; c++) {
            const double diff = (double)a[h * d + c] - r[h * d + c];
            num += diff * diff;
            den += (double)r[h * d + c] * r[h * d + c];
        }
        sum += den > 0 ? sqrt(num / den) : sqrt(num);
    }
    return sum / H;
}

/* Mean over heads of |mine ∩ best| / |best| (each (H, B), -1 padded); mark is a zeroed
 * scratch of one byte per position. A head whose selection is empty (dense) counts 1. */
static double s_recall(int H, int B, const int32_t *mine, const int32_t *best, uint8_t *mark)
{
    double sum = 0.0;
    for (int h = 0; h < H; h++) {
        const int32_t *m = mine + (size_t)h * B, *b = best + (size_t)h * B;
        if (m[0] < 0 || b[0] < 0) {
            sum += 1.0;
            continue;
        }
        int n_best = 0, hit = 0;
        for (int i = 0; i < B && m[i] >= 0; i++) mark[m[i]] = 1;
        for (int i = 0; i < B && b[i] >= 0; i++) n_best++, hit += mark[b[i]];
        for (int i = 0; i < B && m[i] >= 0; i++) mark[m[i]] = 0;
        sum += n_best ? (double)hit / n_best : 1.0;
    }
    return sum / H;
}

/* Softmax mass held by the B largest of n logits (already scaled). cand: n scratch. */
static double s_top_mass(int n, int B, const float *logit, topk_cand *cand)
{
    float mx = -INFINITY;
    for (int j = 0; j < n; j++) {
        cand[j] = (topk_cand){logit[j], j};
        if (logit[j] > mx) mx = logit[j];
    }
    double z = 0.0;
    for (int j = 0; j < n; j++) z += exp((double)logit[j] - mx);
    const int k = topk_select(n, B, cand);
    double top = 0.0;
    for (int i = 0; i < k; i++) top += exp((double)cand[i].score - mx);
    return top / z;
}

#define GEN_CHUNK 4096

int cmd_demo(int argc, char **argv)
{
    demo_opts o;
    int rc = s_parse(argc, argv, &o);
    if (rc) return rc < 0 ? 0 : rc;

    const int T = (int)o.tokens, S = (int)o.steps, H = (int)o.heads, G = (int)o.kv_heads;
    const int d = (int)o.head_dim, B = (int)o.budget, grp = H / G, n_fc = d / 2;
    const int n_ctx = T - S; /* appended in bulk; each step appends one more */
    char err[512];
    synth_t syn;
    synth_sample sample;
    memset(&sample, 0, sizeof(sample));
    fasa_profile *prof = NULL;
    backend *eng = NULL;
    float *kbuf = NULL, *vbuf = NULL, *q = NULL, *out_f = NULL, *out_d = NULL, *out_o = NULL;
    float *logit = NULL;
    int32_t *sel_f = NULL, *sel_o = NULL;
    uint8_t *mark = NULL, *dense_layers = NULL;
    topk_cand *cand = NULL;
    double *st = NULL;
    rc = 1;

    synth_cfg sc = synth_cfg_default(T);
    sc.n_heads = H;
    sc.n_kv_heads = G;
    sc.head_dim = d;
    sc.seed = (uint64_t)o.seed;
    sc.n_signal = d / 8; /* a quarter of the FCs: 16 of 64 at head_dim 128 */
    if (synth_init(&syn, &sc, err, sizeof(err))) return cli_fail("demo", "%s", err);
    fasa_error fe;
    if (!(eng = backend_open(o.server, (int)o.shards, FASA_DEFAULT_BLOCK, &fe))) {
        synth_free(&syn);
        return cli_fail("demo", "%s", fe.msg);
    }

    const double gib = 1024.0 * 1024.0 * 1024.0;
    const double sess_bytes = (double)T * G * d * 2 * (double)fasa_dtype_size(o.dtype);
    printf("fasa demo: %d tokens, %d query heads / %d KV heads, head_dim %d, ntip %ld, budget %d, "
           "%s, seed %ld\n",
           T, H, G, d, o.ntip, B, backend_describe(eng), o.seed);
    printf("synthetic context: RoPE base 10000, interleaved pairs; %d of %d FCs per KV head carry "
           "the signal (low-frequency half), ~1 needle per 2048 tokens per KV head\n",
           sc.n_signal, n_fc);
    printf("sessions: fasa + dense + oracle (exact top-B, for recall), %s K+V: %.2f GiB each, "
           "%.2f GiB in all\n",
           fasa_dtype_name(o.dtype), sess_bytes / gib, 3 * sess_bytes / gib);

    /* 1. Calibration on a short sample of the same stream. */
    int n_sample = 16 * B > 4096 ? 16 * B : 4096;
    if (n_sample > n_ctx) n_sample = n_ctx;
    double t0 = timing_now();
    if (synth_sample_make(&syn, n_sample, 16, &sample, err, sizeof(err))) {
        cli_fail("demo", "%s", err);
        goto done;
    }
    const double t_sample = timing_now() - t0;
    progress bar;
    progress_init(&bar, "calibrate", 16);
    fasa_calib_opts co = {.ntip = (int)o.ntip,
                          .window = B,
                          .pos_begin = sample.pos_begin,
                          .pos_end = sample.pos_end,
                          .pos_step = sample.pos_step,
                          .pairing = sc.pairing,
                          .gqa_shared = 0,
                          .progress = progress_callback,
                          .progress_arg = &bar};
    t0 = timing_now();
    prof = fasa_calibrate(&sample.act, &co, err, sizeof(err));
    progress_done(&bar);
    if (!prof) {
        cli_fail("demo", "calibration: %s", err);
        goto done;
    }
    const double t_calib = timing_now() - t0;
    synth_sample_free(&sample);
    printf("calibrate: sample of %d tokens, positions %s, window %d: generated in %.2f s, "
           "calibrated in %.2f s\n",
           n_sample, prof->samples, B, t_sample, t_calib);
    {
        int hits = 0, exact = 0;
        for (int h = 0; h < H; h++) {
            int hh = 0;
            for (int i = 0; i < prof->ntip; i++)
                hh += synth_is_signal(&syn, h / grp, prof->fcs[(size_t)h * prof->ntip + i]);
            hits += hh;
            exact += hh == (prof->ntip < sc.n_signal ? prof->ntip : sc.n_signal);
        }
        printf("  head 0 found FCs:");
        for (int i = 0; i < prof->ntip; i++) {
            const int fc = prof->fcs[i];
            printf(" %d%s", fc, synth_is_signal(&syn, 0, fc) ? "" : "(x)");
        }
        printf("\n  head 0 true FCs: ");
        for (int i = 0; i < sc.n_signal; i++) printf(" %d", syn.signal[i]);
        printf("\n  all heads: %d of %d chosen FCs are true signal FCs (%.1f%%); %d of %d heads "
               "fully right ((x) = not a signal FC)\n",
               hits, H * prof->ntip, 100.0 * hits / (H * prof->ntip), exact, H);
        if (4 * B > n_sample)
            printf("  note: the window (budget %d) covers over a quarter of the %d-token sample, "
                   "so agreement cannot tell FCs apart well; use a longer --tokens or a smaller "
                   "--budget\n",
                   B, n_sample);
    }

    /* 2. Three sessions; stream the context into all of them. */
    dense_layers = calloc(1, 1);
    const size_t kv_row = (size_t)G * d;
    kbuf = malloc(GEN_CHUNK * kv_row * sizeof(float));
    vbuf = malloc(GEN_CHUNK * kv_row * sizeof(float));
    q = malloc((size_t)H * d * sizeof(float));
    out_f = malloc((size_t)H * d * sizeof(float));
    out_d = malloc((size_t)H * d * sizeof(float));
    out_o = malloc((size_t)H * d * sizeof(float));
    sel_f = malloc((size_t)H * B * sizeof(int32_t));
    sel_o = malloc((size_t)H * B * sizeof(int32_t));
    mark = calloc((size_t)T, 1);
    logit = malloc((size_t)H * (n_ctx + 1) * sizeof(float));
    cand = malloc((size_t)(n_ctx + 1) * sizeof(topk_cand));
    st = malloc((size_t)8 * S * sizeof(double));
    if (!dense_layers || !kbuf || !vbuf || !q || !out_f || !out_d || !out_o || !sel_f || !sel_o ||
        !mark || !logit || !cand || !st) {
        cli_fail("demo", "out of memory");
        goto done;
    }
    static const char *const ids[3] = {"fasa", "dense", "oracle"};
    for (int i = 0; i < 3; i++) {
        fasa_session_config cfg = {.n_layers = 1,
                                   .n_heads = H,
                                   .n_kv_heads = G,
                                   .head_dim = d,
                                   .pairing = sc.pairing,
                                   .profile = i == 0 ? prof : NULL,
                                   .method = (fasa_method)i,
                                   .budget = B,
                                   .gqa = FASA_GQA_PER_HEAD,
                                   .dense_layers = dense_layers,
                                   .dtype = o.dtype,
                                   .score_dtype = i == 0 ? o.score_dtype : 0,
                                   .tier = i == 0 ? o.tier : 0,
                                   .tier_dir = i == 0 && o.tier ? o.state_dir : NULL};
        if (backend_create(eng, ids[i], &cfg, &fe)) {
            cli_fail("demo", "%s", fe.msg);
            goto done;
        }
    }
    /* The first step's exact logits, computed while the keys stream past, give the softmax
     * mass that the exact top-B holds (how peaky the synthetic attention is). */
    const float scale = 1.0f / sqrtf((float)d);
    synth_query(&syn, n_ctx, q);
    double t_gen = 0.0, t_app = 0.0, t_log = 0.0;
    progress_init(&bar, "context", n_ctx + 1);
    for (int p0 = 0; p0 <= n_ctx; p0 += GEN_CHUNK) {
        const int n = n_ctx + 1 - p0 < GEN_CHUNK ? n_ctx + 1 - p0 : GEN_CHUNK;
        t0 = timing_now();
        synth_kv(&syn, p0, n, kbuf, vbuf);
        const double t1 = timing_now();
        for (int g = 0; g < G; g++)
            score_rows(n, d, grp, logit + (size_t)g * grp * (n_ctx + 1) + p0, n_ctx + 1,
                       q + (size_t)g * grp * d, kbuf + (size_t)g * d, (int)kv_row, 0);
        const double t2 = timing_now();
        const int n_app = p0 + n > n_ctx ? n_ctx - p0 : n; /* position n_ctx is step 0's */
        for (int i = 0; i < 3 && n_app > 0; i++)
            if (backend_append(eng, ids[i], 0, p0, n_app, kbuf, vbuf, &fe)) {
                progress_done(&bar);
                cli_fail("demo", "appending to '%s': %s", ids[i], fe.msg);
                goto done;
            }
        t_gen += t1 - t0;
        t_log += t2 - t1;
        t_app += timing_now() - t2;
        progress_update(&bar, p0 + n);
    }
    progress_done(&bar);
    printf("context: %d tokens generated in %.2f s, appended to 3 sessions in %.2f s (exact "
           "logits of step 1 in %.2f s)\n",
           n_ctx, t_gen, t_app, t_log);
    int64_t ram = 0;
    if (!backend_ram_bytes(eng, ids[0], &ram)) {
        const double per_tok = (double)ram / n_ctx, f16_kv = (double)G * d * 2 * 2;
        printf("fasa session (%s, %s tier): %.1f bytes of RAM per token = %.1f%% of f16 K+V "
               "(%.0f bytes per token)%s\n",
               fasa_dtype_name(o.dtype), o.tier ? "disk" : "ram", per_tok, 100.0 * per_tok / f16_kv,
               f16_kv, o.tier ? "; the rest of K and V is in files under --state-dir" : "");
    }
    double mass_sum = 0.0, mass_min = 1.0;
    for (int h = 0; h < H; h++) {
        float *lh = logit + (size_t)h * (n_ctx + 1);
        for (int j = 0; j <= n_ctx; j++) lh[j] *= scale;
        const double m = s_top_mass(n_ctx + 1, B, lh, cand);
        mass_sum += m;
        if (m < mass_min) mass_min = m;
    }
    printf("exact attention at step 1: the top-%d of %d tokens hold %.3f of the softmax mass "
           "(mean over heads; min %.3f)\n",
           B, n_ctx + 1, mass_sum / H, mass_min);
    free(logit);
    logit = NULL;
    free(cand);
    cand = NULL;

    /* 3. Decode steps. */
    double *ms_f = st, *ms_d = st + S, *ms_o = st + 2 * S, *mb_f = st + 3 * S, *mb_d = st + 4 * S;
    double *rec = st + 5 * S, *err_f = st + 6 * S, *err_o = st + 7 * S;
    printf("\n%-5s %-8s %9s %9s %8s %10s %10s %7s %9s %10s %9s\n", "step", "pos", "fasa_ms",
           "dense_ms", "speedup", "fasa_MiB", "dense_MiB", "recall", "err_fasa", "err_oracle",
           "oracle_ms");
    for (int s = 0; s < S; s++) {
        const int t = n_ctx + s;
        synth_query(&syn, t, q);
        synth_kv(&syn, t, 1, kbuf, vbuf);
        fasa_attend_req req = {.layer = 0,
                               .q = q,
                               .k_new = kbuf,
                               .v_new = vbuf,
                               .method = -1,
                               .budget = 0,
                               .gqa = -1,
                               .max_pos = -1};
        fasa_step_stats sf, sd, so;
        float *outs[3] = {out_f, out_d, out_o};
        int32_t *sels[3] = {sel_f, NULL, sel_o};
        fasa_step_stats *sts[3] = {&sf, &sd, &so};
        double ms[3];
        for (int i = 0; i < 3; i++) {
            t0 = timing_now();
            if (backend_attend(eng, ids[i], &req, outs[i], sels[i], sts[i], &fe)) {
                cli_fail("demo", "step %d (%s): %s", s + 1, ids[i], fe.msg);
                goto done;
            }
            ms[i] = 1e3 * (timing_now() - t0);
        }
        ms_f[s] = ms[0];
        ms_d[s] = ms[1];
        ms_o[s] = ms[2];
        mb_f[s] = (double)sf.bytes_read / (1024.0 * 1024.0);
        mb_d[s] = (double)sd.bytes_read / (1024.0 * 1024.0);
        rec[s] = s_recall(H, B, sel_f, sel_o, mark);
        err_f[s] = s_rel_err(H, d, out_f, out_d);
        err_o[s] = s_rel_err(H, d, out_o, out_d);
        printf("%-5d %-8d %9.2f %9.2f %7.1fx %10.1f %10.1f %7.4f %9.2e %10.2e %9.2f\n", s + 1, t,
               ms_f[s], ms_d[s], ms_d[s] / ms_f[s], mb_f[s], mb_d[s], rec[s], err_f[s], err_o[s],
               ms_o[s]);
        if (sf.method_used != FASA_METHOD_FASA)
            printf("      (fasa ran %s: every visible token fits the budget)\n",
                   fasa_method_name((fasa_method)sf.method_used));
        fflush(stdout);
    }
    const double mf = timing_median(S, ms_f), md = timing_median(S, ms_d);
    printf("%-5s %-8s %9.2f %9.2f %7.1fx %10.1f %10.1f %7.4f %9.2e %10.2e %9.2f\n", "median", "",
           mf, md, md / mf, timing_median(S, mb_f), timing_median(S, mb_d), timing_median(S, rec),
           timing_median(S, err_f), timing_median(S, err_o), timing_median(S, ms_o));
    printf("\nrecall: share of the exact top-%d (oracle session) that fasa selected, mean over "
           "heads; err_*: relative L2 error of the output against dense, mean over heads "
           "(err_oracle is what the exact top-%d itself loses).\n",
           B, B);
    rc = 0;
done:
    backend_close(&eng);
    fasa_profile_destroy(&prof);
    synth_sample_free(&sample);
    synth_free(&syn);
    free(kbuf);
    free(vbuf);
    free(q);
    free(out_f);
    free(out_d);
    free(out_o);
    free(sel_f);
    free(sel_o);
    free(mark);
    free(dense_layers);
    free(logit);
    free(cand);
    free(st);
    return rc;
}

/* fasa ppl and fasa generate: a llama2.c-format model (model/llama.h) decoding token by
 * token with its attention done by fasa, on the embedded engine or a server: one attend
 * per layer per token, carrying that token's key and value. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "calib.h"
#include "cli.h"
#include "scan.h"
#include "engine.h"
#include "llama.h"
#include "opts.h"
#include "progress.h"

static const char ppl_usage[] =
    "usage: fasa ppl --model CKPT --tokenizer TOK --text FILE [options]\n"
    "\n"
    "Perplexity of a llama2.c-format model over the first N tokens of a text (BOS included;\n"
    "tokens 1..N-1 are predicted), decoding one token at a time: every layer of every token\n"
    "is one fasa attend carrying that token's key and value. Prints the overall perplexity\n"
    "and one line per 512-position bucket (by the position of the predicted token).\n"
    "\n";
static const char gen_usage[] =
    "usage: fasa generate --model CKPT --tokenizer TOK --steps N [options]\n"
    "\n"
    "Generates N tokens with a llama2.c-format model after BOS and the prompt, one token at a\n"
    "time with fasa doing the attention (one attend per layer per token), and prints the\n"
    "text. Stops early at BOS or EOS.\n"
    "\n";

typedef struct model_opts {
    const char *model, *tokenizer, *text, *prompt, *profile, *calib_text, *save_profile;
    const char *dense_layers, *server;
    long offset, tokens, steps, budget, calib_tokens, ntip, window, shards, block, seed;
    double temperature;
    fasa_method method;
    fasa_gqa gqa;
    fc_pairing pairing;
    int reference, vs_dense, have_pairing;
    int score_dtype; /* scan_dtype, 0 auto */
} model_opts;

static int s_parse(const char *cmd, int argc, char **argv, model_opts *o)
{
    const int gen = strcmp(cmd, "generate") == 0;
    memset(o, 0, sizeof(*o));
    o->method = FASA_METHOD_DENSE;
    o->tokens = 512;
    o->calib_tokens = 512;
    o->ntip = 2;
    o->window = 32;
    o->shards = 1;
    o->block = FASA_DEFAULT_BLOCK;
    o->seed = 1;
    /* The other command's options are known, hidden, and refused (key 1). */
    const cli_opt ppl_opts[] = {
        CLI_STR("text", &o->text, "FILE", NULL, "UTF-8 text (fewer than N tokens: all of it)"),
        CLI_INT("offset", &o->offset, 0, 1L << 30, "BYTES", NULL,
                "start the text at this byte (moved on to a character start),\n"
                "e.g. 573 to skip the Gutenberg header and contents of Alice"),
        CLI_INT("tokens", &o->tokens, 2, 1 << 24, "N", NULL,
                "tokens to decode, BOS included (default 512; RoPE runs past the\n"
                "model's seq_len, as extrapolation)"),
        CLI_FLAG("reference", &o->reference,
                 "use the runner's built-in full attention instead of fasa\n"
                 "(the independent reference for --method dense)"),
        CLI_FLAG("vs-dense", &o->vs_dense,
                 "also decode with the built-in full attention in lockstep and\n"
                 "print the mean KL divergence KL(dense || method) of the\n"
                 "next-token distributions and how often both argmaxes agree\n"
                 "(perplexity alone misleads: past the model's training length\n"
                 "a sparse method can score below dense)")};
    const cli_opt gen_opts[] = {
        CLI_STR("prompt", &o->prompt, "TEXT", NULL, "text to start from (default: none, BOS only)"),
        CLI_INT("steps", &o->steps, 1, 1 << 24, "N", NULL, "tokens to generate"),
        CLI_KEY("temperature", 't', "T", NULL,
                "0 (default): greedy; else sample softmax(logits / T)"),
        CLI_INT("seed", &o->seed, 0, 0x7fffffffL, "S", "1", "seed for sampling"),
        CLI_FLAG("reference", &o->reference,
                 "use the runner's built-in full attention instead of fasa")};
    const cli_opt common[] = {
        CLI_STR("model", &o->model, "CKPT", NULL,
                gen ? "llama2.c legacy (version 0) checkpoint"
                    : "llama2.c legacy (version 0) checkpoint, e.g. stories260K.bin"),
        CLI_STR("tokenizer", &o->tokenizer, "TOK", NULL,
                gen ? "llama2.c tokenizer.bin" : "llama2.c tokenizer.bin, e.g. tok512.bin"),
        CLI_KEY("method", 'm', "M", NULL,
                "fasa (needs --profile or --calibrate-on), dense (default), oracle\n"
                "(exact top-B), stream, quest, sparq or fasa-plus (see 'fasa replay --help')"),
        CLI_INT("budget", &o->budget, 1, 1 << 20, "B", NULL,
                "tokens kept per query head (per KV head with --gqa shared);\n"
                "required unless the method is dense"),
        CLI_STR("profile", &o->profile, "PROFILE", NULL,
                "calibration profile from 'fasa calibrate' (either pairing)"),
        CLI_KEY("pairing", 'A', "P", NULL,
                "FC pairing: interleaved (dims 2i, 2i+1, the model's RoPE pairs;\n"
                "the default) or half (dims i, i + head_dim/2: the grouping of\n"
                "FASA's reference code); taken from --profile if given, and\n"
                "what --calibrate-on calibrates with"),
        CLI_STR("calibrate-on", &o->calib_text, "FILE", NULL,
                "calibrate a profile first: run the model with full attention over\n"
                "the first --calib-tokens tokens of FILE, record q and k, and\n"
                "choose each head's dominant FCs"),
        CLI_INT("calib-tokens", &o->calib_tokens, 2, 1 << 24, "N", "512",
                "tokens for --calibrate-on"),
        CLI_INT("ntip", &o->ntip, 1, 1 << 20, "N", "2", "dominant FCs per head for --calibrate-on"),
        CLI_INT("window", &o->window, 1, 1 << 30, "K", "32", "agreement window for --calibrate-on"),
        CLI_STR("save-profile", &o->save_profile, "FILE", NULL,
                "also write the calibrated profile"),
        CLI_STR("dense-layers", &o->dense_layers, "LIST", "0",
                "comma-separated layers kept dense under fasa, or none"),
        CLI_KEY("gqa", 'g', "G", NULL, "per-head (default) or shared"),
        CLI_KEY("score-dtype", 'Z', "T", NULL,
                "fasa's scoring store: f32, f16, bf16 or int8 (one scale per row;\n"
                "default: the keys' own dims, f32)"),
        CLI_INT("shards", &o->shards, 1, 1024, "N", NULL,
                "in-process shards (default 1; outputs do not depend on it)"),
        CLI_INT("block", &o->block, 1, 1 << 30, "N", "2048", "tokens per placement block"),
        CLI_STR("server", &o->server, "ENDPOINT", NULL,
                "attend on a fasa-server (e.g. tcp://127.0.0.1:5555) instead of the\n"
                "embedded engine: the same numbers; the session is named\n"
                "cli-<pid>-... and dropped at exit (FASA_TIMEOUT_MS: the wait for\n"
                "each reply, default 120000)")};
    /* This command's rows (shown), then the other's (hidden, refused). */
    cli_opt opts[48];
    size_t n = 0;
    const cli_opt *mine = gen ? gen_opts : ppl_opts, *other = gen ? ppl_opts : gen_opts;
    const size_t n_mine = gen ? sizeof(gen_opts) / sizeof(*gen_opts)
                              : sizeof(ppl_opts) / sizeof(*ppl_opts),
                 n_other = gen ? sizeof(ppl_opts) / sizeof(*ppl_opts)
                               : sizeof(gen_opts) / sizeof(*gen_opts);
    opts[n++] = common[0];
    opts[n++] = common[1];
    for (size_t i = 0; i < n_mine; i++) opts[n++] = mine[i];
    for (size_t i = 2; i < sizeof(common) / sizeof(*common); i++) opts[n++] = common[i];
    for (size_t i = 0; i < n_other; i++) {
        if (!strcmp(other[i].name, "reference")) continue;
        opts[n] = (cli_opt)CLI_KEY(other[i].name, 1, other[i].meta, NULL, NULL);
        if (other[i].type == CLI_T_FLAG) opts[n].type = CLI_T_FLAG;
        n++;
    }
    opts[n] = (cli_opt)CLI_END;
    cli_parser p;
    cli_begin(&p, cmd, gen ? gen_usage : ppl_usage, opts, argc, argv);
    int c;
    while ((c = cli_next(&p)) > 0) {
        switch (c) {
        case 1:
            return cli_usage_error(cmd, "option '--%s' does not apply to %s", p.opt->name, cmd);
        case 'A':
            if (fc_pairing_parse(p.arg, &o->pairing))
                return cli_usage_error(cmd, "--pairing '%s' is not interleaved or half", p.arg);
            o->have_pairing = 1;
            break;
        case 't': {
            char *end;
            errno = 0;
            o->temperature = strtod(p.arg, &end);
            if (!*p.arg || *end || errno || !(o->temperature >= 0) || o->temperature > 1e6)
                return cli_usage_error(cmd, "--temperature '%s' must be a number >= 0", p.arg);
            break;
        }
        case 'm':
            if (fasa_method_parse(p.arg, &o->method))
                return cli_usage_error(
                    cmd,
                    "--method '%s' is not fasa, dense, oracle, stream, quest, sparq or fasa-plus",
                    p.arg);
            break;
        case 'g':
            if (fasa_gqa_parse(p.arg, &o->gqa))
                return cli_usage_error(cmd, "--gqa '%s' is not per-head or shared", p.arg);
            break;
        case 'Z':
            if (scan_dtype_parse(p.arg, &o->score_dtype))
                return cli_usage_error(cmd, "--score-dtype '%s' is not f32, f16, bf16 or int8",
                                       p.arg);
            break;
        }
    }
    if (c < 0) return cli_status(c);
    if (!o->model) return cli_usage_error(cmd, "--model CKPT is required");
    if (!o->tokenizer) return cli_usage_error(cmd, "--tokenizer TOK is required");
    if (!gen && !o->text) return cli_usage_error(cmd, "--text FILE is required");
    if (gen && !o->steps) return cli_usage_error(cmd, "--steps N is required");
    if (o->profile && o->calib_text)
        return cli_usage_error(cmd, "--profile and --calibrate-on are alternatives; give one");
    if (o->save_profile && !o->calib_text)
        return cli_usage_error(cmd, "--save-profile needs --calibrate-on");
    if (o->reference &&
        (o->server || o->profile || o->calib_text || o->budget || o->method != FASA_METHOD_DENSE))
        return cli_usage_error(cmd, "--reference runs the built-in full attention; it takes "
                                    "no --method, --budget, --profile, --calibrate-on or --server");
    if (o->method != FASA_METHOD_DENSE && !o->budget)
        return cli_usage_error(cmd, "--method %s needs --budget B (B >= 1)",
                               fasa_method_name(o->method));
    if ((o->method == FASA_METHOD_FASA || o->method == FASA_METHOD_FASA_PLUS) && !o->profile &&
        !o->calib_text)
        return cli_usage_error(cmd, "--method %s needs --profile or --calibrate-on FILE",
                               fasa_method_name(o->method));
    if (!o->budget) o->budget = 1; /* dense: unused */
    return 0;
}

/* The first (up to) max_tokens tokens of a text file from byte offset, BOS first
 * (llama_encode_prefix). */
static int s_encode_file(const llama_tokenizer *tok, const char *path, long offset, long max_tokens,
                         int **tokens_p, int *n_p, char *err, size_t err_len)
{
    size_t len;
    char *buf = llama_read_text(path, &len, err, err_len);
    if (!buf) return -1;
    if ((size_t)offset > len) {
        snprintf(err, err_len, "--offset %ld is past the end of %s (%zu bytes)", offset, path, len);
        free(buf);
        return -1;
    }
    const char *text = buf + offset;
    len -= (size_t)offset;
    while (len > 0 && ((unsigned char)*text & 0xC0) == 0x80) text++, len--;
    if (llama_encode_prefix(tok, text, len, max_tokens, tokens_p, n_p)) {
        snprintf(err, err_len, "out of memory encoding %s", path);
        free(buf);
        return -1;
    }
    free(buf);
    return 0;
}

/* ---- attention through the backend --------------------------------------------- */

typedef struct fasa_attn {
    backend *be;
    const char *id;
    fasa_error fe;
    int failed_layer, failed_pos;
} fasa_attn;

static int s_fasa_attend(void *ctx, int layer, int pos, const float *q, const float *k,
                         const float *v, float *out)
{
    fasa_attn *a = ctx;
    const fasa_attend_req req = fasa_attend_step(layer, q, k, v);
    if (backend_attend(a->be, a->id, &req, out, NULL, NULL, &a->fe)) {
        a->failed_layer = layer, a->failed_pos = pos;
        return -1;
    }
    return 0;
}

/* Runs the model with full attention over the first calib_tokens tokens of o->calib_text
 * and calibrates a profile on the recorded q and k. NULL with err on failure. */
static fasa_profile *s_calibrate(const model_opts *o, const llama_model *m,
                                 const llama_tokenizer *tok, char *err, size_t err_len)
{
    const llama_config *c = &m->cfg;
    int *tokens = NULL, n = 0;
    fasa_profile *p = NULL;
    llama_rec_attn r = {0};
    llama_ppl ppl = {0};
    if (o->ntip > c->head_dim / 2) {
        snprintf(err, err_len, "--ntip %ld exceeds the %d FCs of head_dim %d", o->ntip,
                 c->head_dim / 2, c->head_dim);
        return NULL;
    }
    if (s_encode_file(tok, o->calib_text, 0, o->calib_tokens, &tokens, &n, err, err_len))
        return NULL;
    if (n <= o->window + 1) {
        snprintf(err, err_len,
                 "--calibrate-on %s: %d tokens, not more than the window %ld + 1 (every FC would "
                 "agree fully)",
                 o->calib_text, n, o->window);
        goto done;
    }
    if (llama_rec_attn_init(&r, c, n)) {
        snprintf(err, err_len, "out of memory recording %d tokens for calibration", n);
        goto done;
    }
    progress bar;
    progress_init(&bar, "calib-run", n);
    if (llama_perplexity(m, tokens, n, llama_rec_attend, &r, progress_callback, &bar, &ppl)) {
        progress_done(&bar);
        snprintf(err, err_len, "calibration run failed (out of memory)");
        goto done;
    }
    progress_done(&bar);
    const fasa_activations act = {.n_layers = c->n_layers,
                                  .n_tokens = n,
                                  .n_heads = c->n_heads,
                                  .n_kv_heads = c->n_kv_heads,
                                  .head_dim = c->head_dim,
                                  .q = (const float *const *)r.q,
                                  .k = (const float *const *)r.k,
                                  .v = (const float *const *)r.v};
    fasa_calib_opts co = {.ntip = (int)o->ntip,
                          .window = (int)o->window,
                          .pos_begin = (int)o->window,
                          .pos_end = n,
                          .pos_step = 1,
                          .pairing = o->pairing,
                          .gqa_shared = o->gqa == FASA_GQA_SHARED};
    progress_init(&bar, "calibrate", n - o->window);
    co.progress = progress_callback;
    co.progress_arg = &bar;
    p = fasa_calibrate(&act, &co, err, err_len);
    progress_done(&bar);
    if (p)
        fprintf(stderr,
                "calibrated on %d tokens of %s (perplexity %.4f): ntip %ld, window %ld, "
                "positions %s\n",
                n, o->calib_text, exp(ppl.total / (double)ppl.n), o->ntip, o->window, p->samples);
    if (p && o->save_profile && fasa_profile_save(p, o->save_profile, err, err_len))
        fasa_profile_destroy(&p);
done:
    llama_ppl_free(&ppl);
    llama_rec_attn_free(&r);
    free(tokens);
    return p;
}

/* What a command runs on: the model, its tokenizer, and the attention. */
typedef struct model_run {
    llama_model m;
    llama_tokenizer tok;
    fasa_profile *prof;
    uint8_t *dense;
    backend *be;
    fasa_attn fa;
    llama_ref_attn ref;
    llama_attn_fn attn;
    void *ctx;
} model_run;

static void s_run_free(model_run *r)
{
    backend_close(&r->be);
    fasa_profile_destroy(&r->prof);
    free(r->dense);
    llama_ref_attn_free(&r->ref);
    llama_tokenizer_free(&r->tok);
    llama_model_free(&r->m);
}

/* Loads the model and tokenizer, the profile (or calibrates one), and opens the attention:
 * the reference, or a backend session named id. Returns 0, or the exit status. */
static int s_run_open(const char *cmd, const model_opts *o, const char *id, model_run *r)
{
    char err[512];
    memset(r, 0, sizeof(*r));
    if (llama_model_load(o->model, &r->m, err, sizeof(err))) return cli_fail(cmd, "%s", err);
    const llama_config *c = &r->m.cfg;
    if (llama_tokenizer_load(o->tokenizer, c->vocab_size, &r->tok, err, sizeof(err)))
        return cli_fail(cmd, "%s", err);
    if (o->reference) {
        if (llama_ref_attn_init(&r->ref, c)) return cli_fail(cmd, "out of memory");
        r->attn = llama_ref_attend, r->ctx = &r->ref;
        return 0;
    }
    if (!(r->dense = malloc((size_t)c->n_layers))) return cli_fail(cmd, "out of memory");
    if (cli_parse_dense_layers(o->dense_layers, c->n_layers, r->dense))
        return cli_usage_error(cmd, "--dense-layers '%s' must be none or layers in [0, %d)",
                               o->dense_layers, c->n_layers);
    if (o->profile) {
        if (!(r->prof = fasa_profile_load(o->profile, err, sizeof(err))))
            return cli_fail(cmd, "%s", err);
        const fc_pairing want = o->have_pairing ? o->pairing : r->prof->pairing;
        if (fasa_profile_check(r->prof, c->n_layers, c->n_heads, c->n_kv_heads, c->head_dim, want,
                               err, sizeof(err)))
            return cli_fail(cmd, "%s (model %s, --pairing %s)", err, o->model,
                            fc_pairing_name(want));
    } else if (o->calib_text && !(r->prof = s_calibrate(o, &r->m, &r->tok, err, sizeof(err))))
        return cli_fail(cmd, "%s", err);
    fasa_error fe;
    if (!(r->be = backend_open(o->server, (int)o->shards, (int)o->block, &fe)))
        return cli_fail(cmd, "%s", fe.msg);
    const fasa_session_config cfg = {.n_layers = c->n_layers,
                                     .n_heads = c->n_heads,
                                     .n_kv_heads = c->n_kv_heads,
                                     .head_dim = c->head_dim,
                                     .pairing = r->prof ? r->prof->pairing : o->pairing,
                                     .profile = r->prof,
                                     .method = o->method,
                                     .budget = (int)o->budget,
                                     .gqa = o->gqa,
                                     .dense_layers = r->dense,
                                     .score_dtype = o->score_dtype};
    if (backend_create(r->be, id, &cfg, &fe)) return cli_fail(cmd, "%s", fe.msg);
    r->fa.be = r->be, r->fa.id = id;
    r->attn = s_fasa_attend, r->ctx = &r->fa;
    return 0;
}

/* One line naming what did the attention. */
static void s_describe(const model_opts *o, const model_run *r, char *buf, size_t len)
{
    if (o->reference) {
        snprintf(buf, len, "built-in full attention (reference)");
        return;
    }
    char b[32] = "", dl[160] = "";
    if (o->method != FASA_METHOD_DENSE) snprintf(b, sizeof(b), ", budget %ld", o->budget);
    if (o->method == FASA_METHOD_FASA || o->method == FASA_METHOD_FASA_PLUS) {
        size_t n = (size_t)snprintf(dl, sizeof(dl), ", dense layers:");
        for (int l = 0; l < r->m.cfg.n_layers && n < sizeof(dl); l++)
            if (r->dense[l]) n += (size_t)snprintf(dl + n, sizeof(dl) - n, " %d", l);
        if (n < sizeof(dl) - 6 && strcmp(dl, ", dense layers:") == 0) strcat(dl, " none");
    }
    snprintf(buf, len, "fasa, method %s%s%s%s, on %s%s", fasa_method_name(o->method), b, dl,
             o->gqa == FASA_GQA_SHARED ? ", gqa shared" : "",
             backend_is_remote(r->be) ? "" : "the embedded engine, ", backend_describe(r->be));
}

/* Reports a failed attend (the backend's reason) or another failure. */
static int s_attn_fail(const char *cmd, const model_opts *o, const model_run *r)
{
    if (o->reference) return cli_fail(cmd, "out of memory in the reference attention");
    return cli_fail(cmd, "position %d layer %d: %s", r->fa.failed_pos, r->fa.failed_layer,
                    r->fa.fe.msg);
}

int cmd_ppl(int argc, char **argv)
{
    model_opts o;
    int rc = s_parse("ppl", argc, argv, &o);
    if (rc) return rc < 0 ? 0 : rc;
    model_run r;
    int *tokens = NULL, n = 0;
    llama_ppl ppl = {0};
    char err[512];
    if ((rc = s_run_open("ppl", &o, "ppl", &r))) goto done;
    rc = 1;
    if (s_encode_file(&r.tok, o.text, o.offset, o.tokens, &tokens, &n, err, sizeof(err))) {
        cli_fail("ppl", "%s", err);
        goto done;
    }
    if (n < 2) {
        cli_fail("ppl", "text %s holds no tokens to predict", o.text);
        goto done;
    }
    progress bar;
    progress_init(&bar, "ppl", n);
    llama_vs vs = {0};
    llama_ref_attn dense = {0};
    if (o.vs_dense && llama_ref_attn_init(&dense, &r.m.cfg)) {
        cli_fail("ppl", "out of memory");
        goto done;
    }
    const int prc =
        o.vs_dense
            ? llama_perplexity_vs(&r.m, tokens, n, r.attn, r.ctx, llama_ref_attend, &dense,
                                  progress_callback, &bar, &ppl, &vs)
            : llama_perplexity(&r.m, tokens, n, r.attn, r.ctx, progress_callback, &bar, &ppl);
    llama_ref_attn_free(&dense);
    progress_done(&bar);
    if (prc) {
        if (ppl.n_buckets == 0)
            cli_fail("ppl", "out of memory");
        else
            s_attn_fail("ppl", &o, &r);
        goto done;
    }
    char what[256];
    s_describe(&o, &r, what, sizeof(what));
    const llama_config *c = &r.m.cfg;
    printf("model %s: dim %d, %d layers, %d heads (%d kv), head_dim %d, vocab %d, seq_len %d\n",
           o.model, c->dim, c->n_layers, c->n_heads, c->n_kv_heads, c->head_dim, c->vocab_size,
           c->seq_len);
    char from[48] = "";
    if (o.offset) snprintf(from, sizeof(from), " from byte %ld", o.offset);
    printf("text %s%s: %d tokens (BOS + %ld predicted)%s\n", o.text, from, n, ppl.n,
           n < o.tokens ? ", all of the text" : "");
    printf("attention: %s\n", what);
    printf("perplexity %.6f (mean nll %.6f nats/token over %ld tokens)\n",
           exp(ppl.total / (double)ppl.n), ppl.total / (double)ppl.n, ppl.n);
    if (o.vs_dense) {
        printf("dense perplexity %.6f (built-in full attention, the same tokens)\n",
               exp(vs.nll_ref / (double)vs.n));
        printf("vs dense: mean KL %.6f nats/token, top-1 agreement %.4f (%ld of %ld)\n",
               vs.kl / (double)vs.n, (double)vs.agree / (double)vs.n, vs.agree, vs.n);
    }
    for (int b = 0; b < ppl.n_buckets; b++)
        if (ppl.count[b])
            printf("positions %d-%d: perplexity %.6f over %ld tokens\n", b * LLAMA_PPL_BUCKET,
                   (b + 1) * LLAMA_PPL_BUCKET - 1, exp(ppl.nll[b] / (double)ppl.count[b]),
                   ppl.count[b]);
    rc = 0;
done:
    llama_ppl_free(&ppl);
    free(tokens);
    s_run_free(&r);
    return rc;
}

int cmd_generate(int argc, char **argv)
{
    model_opts o;
    int rc = s_parse("generate", argc, argv, &o);
    if (rc) return rc < 0 ? 0 : rc;
    model_run r;
    llama_state st = {0};
    int *prompt = NULL, n_prompt = 0;
    if ((rc = s_run_open("generate", &o, "generate", &r))) goto done;
    rc = 1;
    const char *ptext = o.prompt ? o.prompt : "";
    if (llama_encode(&r.tok, ptext, strlen(ptext), 1, &prompt, &n_prompt) ||
        llama_state_init(&st, &r.m)) {
        cli_fail("generate", "out of memory");
        goto done;
    }
    unsigned long long rng = (unsigned long long)o.seed * 0x9E3779B97F4A7C15ULL + 1;
    int token = prompt[0];
    long generated = 0;
    for (int pos = 0; generated < o.steps; pos++) {
        if (llama_forward(&st, token, pos, r.attn, r.ctx)) {
            s_attn_fail("generate", &o, &r);
            goto done;
        }
        const int forced = pos + 1 < n_prompt;
        const int next =
            forced ? prompt[pos + 1]
                   : llama_sample(st.logits, r.m.cfg.vocab_size, (float)o.temperature, &rng);
        if (!forced) {
            if (next == LLAMA_TOKEN_BOS || next == LLAMA_TOKEN_EOS) break;
            generated++;
        }
        size_t len;
        const char *piece = llama_decode(&r.tok, token, next, &len);
        fwrite(piece, 1, len, stdout);
        fflush(stdout);
        token = next;
    }
    fputc('\n', stdout);
    rc = 0;
done:
    llama_state_free(&st);
    free(prompt);
    s_run_free(&r);
    return rc;
}

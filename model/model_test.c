/* The llama2.c-format model runner (model/llama.h) on the real stories260K model: the
 * tokenizer, the forward pass against the golden dump, perplexity with fasa's dense
 * attention (embedded engine) against the runner's built-in full attention, greedy
 * decoding, and fasa with a calibrated profile. Skips when the shared data is missing.
 *
 * The runner is compiled into this suite directly (it is a source of the fasa CLI, not of
 * a library the test runner links). */
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "calib.h"
#include "engine.h"
#include "llama.h"
#include "qkv.h"
#include "test_util.h"

static int s_path(char *buf, size_t len, const char *rel)
{
    snprintf(buf, len, "%s/data/%s", test_shared_dir(), rel);
    if (access(buf, R_OK) == 0) return 1;
    fprintf(stderr, "model suite: %s missing, test skipped\n", buf);
    return 0;
}

/* Loads the model and tokenizer; 0 when the data is missing (skip). */
static int s_load(llama_model *m, llama_tokenizer *t)
{
    char mp[1024], tp[1024], err[512];
    if (!s_path(mp, sizeof(mp), "models/stories260K/stories260K.bin") ||
        !s_path(tp, sizeof(tp), "models/stories260K/tok512.bin"))
        return 0;
    ck_assert_msg(llama_model_load(mp, m, err, sizeof(err)) == 0, "%s", err);
    ck_assert_msg(llama_tokenizer_load(tp, m->cfg.vocab_size, t, err, sizeof(err)) == 0, "%s", err);
    return 1;
}

/* The first max_tokens tokens of a text file (BOS first), from an 8-bytes-a-token prefix
 * cut after whitespace; NULL when the file is missing. */
static int *s_text_tokens(const llama_tokenizer *t, const char *rel, int max_tokens, int *n_p)
{
    char path[1024];
    if (!s_path(path, sizeof(path), rel)) return NULL;
    FILE *f = fopen(path, "rb");
    ck_assert_ptr_nonnull(f);
    const size_t want = (size_t)max_tokens * 8 + 64;
    char *buf = test_alloc(want + 1);
    size_t len = fread(buf, 1, want, f);
    fclose(f);
    if (len == want)
        while (len > 0 && buf[len - 1] != ' ' && buf[len - 1] != '\n') len--;
    int *tok, n;
    ck_assert_int_eq(llama_encode(t, buf, len, 1, &tok, &n), 0);
    free(buf);
    ck_assert_int_ge(n, max_tokens);
    *n_p = max_tokens;
    return tok;
}

/* fasa attention through the embedded engine, one session. */
typedef struct engine_attn {
    fasa_engine_t *e;
    fasa_error fe;
} engine_attn;

static int s_engine_attend(void *ctx, int layer, int pos, const float *q, const float *k,
                           const float *v, float *out)
{
    engine_attn *a = ctx;
    (void)pos;
    const fasa_attend_req req = fasa_attend_step(layer, q, k, v);
    return fasa_engine_attend(a->e, "m", &req, out, NULL, NULL, &a->fe) ? -1 : 0;
}

static void s_engine_open(engine_attn *a, const llama_config *c, fasa_method method, int budget,
                          const fasa_profile *prof)
{
    a->e = fasa_engine_new(2, 64);
    ck_assert_ptr_nonnull(a->e);
    const fasa_session_config cfg = {.n_layers = c->n_layers,
                                     .n_heads = c->n_heads,
                                     .n_kv_heads = c->n_kv_heads,
                                     .head_dim = c->head_dim,
                                     .pairing = FC_PAIRING_INTERLEAVED,
                                     .profile = prof,
                                     .method = method,
                                     .budget = budget};
    ck_assert_msg(fasa_engine_create(a->e, "m", &cfg, &a->fe) == FASA_OK, "%s", a->fe.msg);
}

static double s_ppl(const llama_model *m, const int *tok, int n, llama_attn_fn fn, void *ctx,
                    const char *what)
{
    llama_ppl p;
    const int rc = llama_perplexity(m, tok, n, fn, ctx, NULL, NULL, &p);
    ck_assert_msg(rc == 0, "%s: perplexity run failed", what);
    ck_assert_int_eq(p.n, n - 1);
    ck_assert_int_eq(p.n_buckets, (n - 1) / LLAMA_PPL_BUCKET + 1);
    const double ppl = exp(p.total / (double)p.n);
    llama_ppl_free(&p);
    return ppl;
}

START_TEST(test_tokenizer)
{
    llama_model m;
    llama_tokenizer t;
    if (!s_load(&m, &t)) return;
    ck_assert_int_eq(m.cfg.dim, 64);
    ck_assert_int_eq(m.cfg.n_layers, 5);
    ck_assert_int_eq(m.cfg.n_heads, 8);
    ck_assert_int_eq(m.cfg.n_kv_heads, 4);
    ck_assert_int_eq(m.cfg.head_dim, 8);
    ck_assert_int_eq(m.cfg.shared_classifier, 1);
    /* A known string: BOS, " Once" (the dummy prefix merged in), ... */
    const char *s = "Once upon a time, there was a little girl named Lily.";
    static const int want[] = {1,   403, 407, 261, 378, 432, 383, 286,
                               261, 376, 298, 315, 421, 395, 317, 426};
    int *tok, n;
    ck_assert_int_eq(llama_encode(&t, s, strlen(s), 1, &tok, &n), 0);
    ck_assert_int_eq(n, (int)(sizeof(want) / sizeof(*want)));
    for (int i = 0; i < n; i++) ck_assert_int_eq(tok[i], want[i]);
    free(tok);
    /* Empty text: BOS only; no BOS asked: none. */
    ck_assert_int_eq(llama_encode(&t, "", 0, 1, &tok, &n), 0);
    ck_assert_int_eq(n, 1);
    ck_assert_int_eq(tok[0], LLAMA_TOKEN_BOS);
    free(tok);

    /* Round trips, curly quotes, accents, control bytes and a 4-byte code point included. */
    const char *texts[] = {s, "\xe2\x80\x9cHi!\xe2\x80\x9d she said, caf\xc3\xa9 \xf0\x9f\x98\x80",
                           "tab\there\nnew line  two spaces\x01 <0x41> end"};
    for (size_t k = 0; k < sizeof(texts) / sizeof(*texts); k++) {
        ck_assert_int_eq(llama_encode(&t, texts[k], strlen(texts[k]), 1, &tok, &n), 0);
        char out[512];
        size_t len = 0;
        for (int i = 1; i < n; i++) {
            size_t l;
            const char *p = llama_decode(&t, tok[i - 1], tok[i], &l);
            ck_assert_uint_lt(len + l, sizeof(out));
            memcpy(out + len, p, l);
            len += l;
        }
        ck_assert_uint_eq(len, strlen(texts[k]));
        ck_assert_msg(memcmp(out, texts[k], len) == 0, "round trip of text %zu", k);
        free(tok);
    }

    /* The first 2048 tokens of the TinyStories text as the golden dump's independent
     * tokenizer gave them. */
    char gp[1024], err[512];
    int *ts = s_text_tokens(&t, "text/tinystories_train_head.txt", 2048, &n);
    if (ts && s_path(gp, sizeof(gp), "models/stories260K/golden/tinystories_T2048.qkv")) {
        fasa_qkv x;
        ck_assert_msg(fasa_qkv_load(gp, &x, err, sizeof(err)) == 0, "%s", err);
        for (int i = 0; i < 2048; i++)
            ck_assert_msg(ts[i] == x.tokens[i], "token %d: %d, golden %d", i, ts[i], x.tokens[i]);
        fasa_qkv_cleanup(&x);
    }
    free(ts);
    llama_tokenizer_free(&t);
    llama_model_free(&m);
}
END_TEST

START_TEST(test_forward_golden)
{
    llama_model m;
    llama_tokenizer t;
    if (!s_load(&m, &t)) return;
    char gp[1024], err[512];
    if (!s_path(gp, sizeof(gp), "models/stories260K/golden/tinystories_T2048.qkv")) goto out;
    fasa_qkv x;
    ck_assert_msg(fasa_qkv_load(gp, &x, err, sizeof(err)) == 0, "%s", err);
    /* q, k, v of every layer at positions 0..T-1 against the independent numpy pass. */
    const int T = 128;
    llama_rec_attn r;
    ck_assert_int_eq(llama_rec_attn_init(&r, &m.cfg, T), 0);
    llama_ppl p;
    ck_assert_int_eq(llama_perplexity(&m, x.tokens, T, llama_rec_attend, &r, NULL, NULL, &p), 0);
    llama_ppl_free(&p);
    for (int l = 0; l < m.cfg.n_layers; l++) {
        const double eq = test_rel_err((size_t)T * r.qrow, r.q[l], x.act.q[l]);
        const double ek = test_rel_err((size_t)T * r.kvrow, r.k[l], x.act.k[l]);
        const double ev = test_rel_err((size_t)T * r.kvrow, r.v[l], x.act.v[l]);
        ck_assert_msg(eq < 1e-4 && ek < 1e-4 && ev < 1e-4, "layer %d: rel err q %g k %g v %g", l,
                      eq, ek, ev);
    }
    llama_rec_attn_free(&r);
    fasa_qkv_cleanup(&x);
out:
    llama_tokenizer_free(&t);
    llama_model_free(&m);
}
END_TEST

START_TEST(test_ppl_dense_equals_reference)
{
    llama_model m;
    llama_tokenizer t;
    if (!s_load(&m, &t)) return;
    int n;
    int *tok = s_text_tokens(&t, "text/tinystories_train_head.txt", 256, &n);
    if (tok) {
        llama_ref_attn ref;
        ck_assert_int_eq(llama_ref_attn_init(&ref, &m.cfg), 0);
        const double p_ref = s_ppl(&m, tok, n, llama_ref_attend, &ref, "reference");
        llama_ref_attn_free(&ref);
        engine_attn a;
        s_engine_open(&a, &m.cfg, FASA_METHOD_DENSE, 1, NULL);
        const double p_dense = s_ppl(&m, tok, n, s_engine_attend, &a, "fasa dense");
        ck_assert_int_eq(fasa_engine_length(a.e, "m", 4), n);
        fasa_engine_destroy(&a.e);
        ck_assert_msg(fabs(p_dense - p_ref) <= 1e-4 * p_ref, "dense %.8f, reference %.8f", p_dense,
                      p_ref);
        /* README: about 4.3 on held-in TinyStories text (512 for random weights). */
        ck_assert_msg(p_ref > 3.0 && p_ref < 6.0, "perplexity %.4f out of the sane range", p_ref);
    }
    free(tok);
    llama_tokenizer_free(&t);
    llama_model_free(&m);
}
END_TEST

/* Greedy decode from BOS: the text Karpathy printed in llama2.c doc/stories260K.md. */
static void s_greedy(const llama_model *m, const llama_tokenizer *t, llama_attn_fn fn, void *ctx,
                     char *out, size_t out_len)
{
    llama_state s;
    ck_assert_int_eq(llama_state_init(&s, m), 0);
    size_t len = 0;
    int token = LLAMA_TOKEN_BOS;
    for (int pos = 0; pos < 40; pos++) {
        ck_assert_int_eq(llama_forward(&s, token, pos, fn, ctx), 0);
        const int next = llama_sample(s.logits, m->cfg.vocab_size, 0.0f, NULL);
        size_t l;
        const char *p = llama_decode(t, token, next, &l);
        ck_assert_uint_lt(len + l, out_len);
        memcpy(out + len, p, l);
        len += l;
        token = next;
    }
    out[len] = 0;
    llama_state_free(&s);
}

START_TEST(test_greedy_generation)
{
    llama_model m;
    llama_tokenizer t;
    if (!s_load(&m, &t)) return;
    const char *want = "Once upon a time, there was a little girl named Lily.";
    char text[1024];
    engine_attn a;
    s_engine_open(&a, &m.cfg, FASA_METHOD_DENSE, 1, NULL);
    s_greedy(&m, &t, s_engine_attend, &a, text, sizeof(text));
    fasa_engine_destroy(&a.e);
    ck_assert_msg(strncmp(text, want, strlen(want)) == 0, "fasa dense generated '%s'", text);
    llama_ref_attn ref;
    ck_assert_int_eq(llama_ref_attn_init(&ref, &m.cfg), 0);
    s_greedy(&m, &t, llama_ref_attend, &ref, text, sizeof(text));
    llama_ref_attn_free(&ref);
    ck_assert_msg(strncmp(text, want, strlen(want)) == 0, "reference generated '%s'", text);
    llama_tokenizer_free(&t);
    llama_model_free(&m);
}
END_TEST

START_TEST(test_fasa_calibrated)
{
    llama_model m;
    llama_tokenizer t;
    if (!s_load(&m, &t)) return;
    const llama_config *c = &m.cfg;
    int n;
    int *tok = s_text_tokens(&t, "text/tinystories_train_head.txt", 256, &n);
    if (!tok) goto out;
    /* Calibrate on the first 256 tokens with full attention, as `fasa ppl --calibrate-on`. */
    llama_rec_attn r;
    ck_assert_int_eq(llama_rec_attn_init(&r, c, n), 0);
    const double p_ref = s_ppl(&m, tok, n, llama_rec_attend, &r, "calibration run");
    const fasa_activations act = {.n_layers = c->n_layers,
                                  .n_tokens = n,
                                  .n_heads = c->n_heads,
                                  .n_kv_heads = c->n_kv_heads,
                                  .head_dim = c->head_dim,
                                  .q = (const float *const *)r.q,
                                  .k = (const float *const *)r.k,
                                  .v = (const float *const *)r.v};
    const fasa_calib_opts co = {.ntip = 2,
                                .window = 32,
                                .pos_begin = 32,
                                .pos_end = n,
                                .pos_step = 1,
                                .pairing = FC_PAIRING_INTERLEAVED};
    char err[256];
    fasa_profile *prof = fasa_calibrate(&act, &co, err, sizeof(err));
    ck_assert_msg(prof != NULL, "%s", err);
    llama_rec_attn_free(&r);

    /* A budget that holds every token: fasa is dense. */
    engine_attn a;
    s_engine_open(&a, c, FASA_METHOD_FASA, n, prof);
    const double p_all = s_ppl(&m, tok, n, s_engine_attend, &a, "fasa B=n");
    fasa_engine_destroy(&a.e);
    ck_assert_msg(fabs(p_all - p_ref) <= 1e-4 * p_ref, "fasa B=%d %.8f, reference %.8f", n, p_all,
                  p_ref);
    /* A real sparse budget runs, and stays near dense on this in-domain text. */
    s_engine_open(&a, c, FASA_METHOD_FASA, 32, prof);
    const double p_32 = s_ppl(&m, tok, n, s_engine_attend, &a, "fasa B=32");
    fasa_engine_destroy(&a.e);
    ck_assert_msg(isfinite(p_32) && p_32 < 1.5 * p_ref, "fasa B=32 %.6f, reference %.6f", p_32,
                  p_ref);
    fasa_profile_destroy(&prof);
    free(tok);
out:
    llama_tokenizer_free(&t);
    llama_model_free(&m);
}
END_TEST

START_TEST(test_bad_files)
{
    char dir[] = "/tmp/fasa_model_XXXXXX", path[256], err[512];
    ck_assert_ptr_nonnull(mkdtemp(dir));
    snprintf(path, sizeof(path), "%s/m.bin", dir);
    llama_model m;
    llama_tokenizer t;
    ck_assert_int_eq(llama_model_load(path, &m, err, sizeof(err)), -1);
    ck_assert_ptr_nonnull(strstr(err, "cannot open"));
    /* A valid header with too few weights: the size is named. */
    const int32_t h[7] = {64, 172, 5, 8, 4, 512, 512};
    FILE *f = fopen(path, "wb");
    fwrite(h, sizeof(h), 1, f);
    fwrite(h, sizeof(h), 1, f);
    fclose(f);
    ck_assert_int_eq(llama_model_load(path, &m, err, sizeof(err)), -1);
    ck_assert_msg(strstr(err, "56 bytes") && strstr(err, "needs 1056540"), "%s", err);
    /* A bad geometry. */
    const int32_t h2[7] = {64, 172, 5, 7, 4, 512, 512};
    f = fopen(path, "wb");
    fwrite(h2, sizeof(h2), 1, f);
    fclose(f);
    ck_assert_int_eq(llama_model_load(path, &m, err, sizeof(err)), -1);
    ck_assert_msg(strstr(err, "n_heads") != NULL, "%s", err);
    /* A vocabulary too small for the byte tokens, and one of INT32_MIN (no negation). */
    const int32_t h3[7] = {64, 172, 5, 8, 4, 100, 512};
    f = fopen(path, "wb");
    fwrite(h3, sizeof(h3), 1, f);
    fclose(f);
    ck_assert_int_eq(llama_model_load(path, &m, err, sizeof(err)), -1);
    ck_assert_msg(strstr(err, "vocab_size") != NULL, "%s", err);
    const int32_t h4[7] = {64, 172, 5, 8, 4, INT32_MIN, 512};
    f = fopen(path, "wb");
    fwrite(h4, sizeof(h4), 1, f);
    fclose(f);
    ck_assert_int_eq(llama_model_load(path, &m, err, sizeof(err)), -1);
    ck_assert_msg(strstr(err, "vocab_size") != NULL, "%s", err);
    /* A truncated tokenizer. */
    const int32_t tk[3] = {7, 0, 3};
    f = fopen(path, "wb");
    fwrite(tk, sizeof(tk), 1, f);
    fclose(f);
    ck_assert_int_eq(llama_tokenizer_load(path, 512, &t, err, sizeof(err)), -1);
    ck_assert_msg(strstr(err, "truncated") != NULL, "%s", err);
    unlink(path);
    rmdir(dir);
}
END_TEST

Suite *model_suite(void)
{
    const TTest *tests[] = {test_tokenizer,
                            test_forward_golden,
                            test_ppl_dense_equals_reference,
                            test_greedy_generation,
                            test_fasa_calibrated,
                            test_bad_files,
                            NULL};
    return test_suite("model", "stories260K", 300, tests);
}

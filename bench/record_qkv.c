/* record_qkv: runs a llama2.c-format model (model/llama.h) with its built-in full
 * attention over the first N tokens of a text and writes the post-RoPE q, k and v of
 * every layer and token as a QKV1 dump (format in
 * shared/data/models/stories260K/README.md), readable by 'fasa calibrate' and
 * 'fasa replay'. The text is encoded as 'fasa ppl' encodes it (BOS, then a prefix of the
 * file cut after whitespace), so the dump and a 'fasa ppl --tokens N' run see the same
 * tokens. */
#include <errno.h>
#include <getopt.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "llama.h"

static const char usage[] =
    "usage: record_qkv --model CKPT --tokenizer TOK --text FILE --tokens N --out DUMP.qkv\n"
    "\n"
    "Decodes the first N tokens of FILE (BOS first; fewer if the text is shorter) with the\n"
    "runner's built-in full attention and writes q (post-RoPE, unscaled), k (post-RoPE) and\n"
    "v of every layer and position, the tokens and the logits at the last position as a\n"
    "QKV1 dump.\n";

int main(int argc, char **argv)
{
    static const struct option opts[] = {{"model", required_argument, 0, 'm'},
                                         {"tokenizer", required_argument, 0, 't'},
                                         {"text", required_argument, 0, 'x'},
                                         {"tokens", required_argument, 0, 'n'},
                                         {"out", required_argument, 0, 'o'},
                                         {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};
    const char *model = NULL, *tokp = NULL, *textp = NULL, *outp = NULL;
    long n_tokens = 0;
    int c;
    opterr = 0;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case 'm':
            model = optarg;
            break;
        case 't':
            tokp = optarg;
            break;
        case 'x':
            textp = optarg;
            break;
        case 'o':
            outp = optarg;
            break;
        case 'n': {
            char *end;
            errno = 0;
            n_tokens = strtol(optarg, &end, 10);
            if (errno || *end || n_tokens < 2 || n_tokens > (1 << 24)) {
                fprintf(stderr, "record_qkv: --tokens '%s' must be an integer in [2, 2^24]\n",
                        optarg);
                return 2;
            }
            break;
        }
        case 'h':
            fputs(usage, stdout);
            return 0;
        default:
            fprintf(stderr, "record_qkv: unknown or incomplete option '%s'\n%s", argv[optind - 1],
                    usage);
            return 2;
        }
    }
    if (optind < argc || !model || !tokp || !textp || !outp || !n_tokens) {
        fprintf(stderr,
                "record_qkv: --model, --tokenizer, --text, --tokens and --out are "
                "required\n%s",
                usage);
        return 2;
    }

    char err[512];
    int rc = 1;
    llama_model m = {0};
    llama_tokenizer tok = {0};
    llama_state st = {0};
    llama_rec_attn r = {0};
    char *text = NULL;
    int *tokens = NULL, n = 0;
    FILE *f = NULL;
    if (llama_model_load(model, &m, err, sizeof(err))) {
        fprintf(stderr, "record_qkv: %s\n", err);
        goto done;
    }
    const llama_config *cfg = &m.cfg;
    if (llama_tokenizer_load(tokp, cfg->vocab_size, &tok, err, sizeof(err))) {
        fprintf(stderr, "record_qkv: %s\n", err);
        goto done;
    }
    size_t len;
    if (!(text = llama_read_text(textp, &len, err, sizeof(err)))) {
        fprintf(stderr, "record_qkv: %s\n", err);
        goto done;
    }
    if (llama_encode_prefix(&tok, text, len, n_tokens, &tokens, &n)) {
        fprintf(stderr, "record_qkv: out of memory encoding %s\n", textp);
        goto done;
    }
    const int L = cfg->n_layers;
    int oom = llama_rec_attn_init(&r, cfg, n) || llama_state_init(&st, &m);
    if (oom) {
        fprintf(stderr, "record_qkv: out of memory for %d tokens\n", n);
        goto done;
    }
    for (int pos = 0; pos < n; pos++)
        if (llama_forward(&st, tokens[pos], pos, llama_rec_attend, &r)) {
            fprintf(stderr, "record_qkv: forward failed at position %d\n", pos);
            goto done;
        }

    if (!(f = fopen(outp, "wb"))) {
        fprintf(stderr, "record_qkv: cannot create %s: %s\n", outp, strerror(errno));
        goto done;
    }
    const int32_t hdr[10] = {1, n, L, cfg->n_heads, cfg->n_kv_heads, cfg->head_dim, cfg->vocab_size,
                             0, 0, 0};
    int ok = fwrite("QKV1", 1, 4, f) == 4 && fwrite(hdr, sizeof(int32_t), 9, f) == 9;
    for (int i = 0; ok && i < n; i++) {
        const int32_t t = tokens[i];
        ok = fwrite(&t, sizeof(t), 1, f) == 1;
    }
    ok = ok &&
         fwrite(st.logits, sizeof(float), (size_t)cfg->vocab_size, f) == (size_t)cfg->vocab_size;
    for (int l = 0; ok && l < L; l++) {
        const size_t nq = (size_t)n * r.qrow, nkv = (size_t)n * r.kvrow;
        ok = fwrite(r.q[l], sizeof(float), nq, f) == nq &&
             fwrite(r.k[l], sizeof(float), nkv, f) == nkv &&
             fwrite(r.v[l], sizeof(float), nkv, f) == nkv;
    }
    if (fclose(f) || !ok) {
        f = NULL;
        fprintf(stderr, "record_qkv: write error on %s\n", outp);
        goto done;
    }
    f = NULL;
    printf("record_qkv: %d tokens of %s, %d layers x %d heads (%d kv) x %d dims: wrote %s\n", n,
           textp, L, cfg->n_heads, cfg->n_kv_heads, cfg->head_dim, outp);
    rc = 0;
done:
    if (f) fclose(f);
    llama_rec_attn_free(&r);
    llama_state_free(&st);
    free(tokens);
    free(text);
    llama_tokenizer_free(&tok);
    llama_model_free(&m);
    return rc;
}

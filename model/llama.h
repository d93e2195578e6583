/* A small llama2.c-format model runner: a client of fasa, not part of the service.
 *
 * Loads a llama2.c "legacy" (version 0) checkpoint and a llama2.c tokenizer, encodes and
 * decodes text as llama2.c run.c does, and runs the decoder one token at a time: RMSNorm,
 * q/k/v projections, RoPE with interleaved pairs (2i, 2i+1) computed here (the legacy
 * freq_cis tables are skipped), attention through a callback, wo, SwiGLU FFN, final
 * RMSNorm and the classifier (the token embedding when the checkpoint shares it).
 *
 * The attention callback gets, per layer and token, that token's post-RoPE queries (not
 * scaled), key and value, and returns the attention output over positions 0..pos; it
 * owns the KV cache. llama_ref_attn is a plain built-in full attention (double
 * accumulation) used as the independent reference; fasa (embedded or a server) is the
 * other implementation, in the commands. Only libc and libm are used here. */
#ifndef FASA_CLIENT_LLAMA_H
#define FASA_CLIENT_LLAMA_H

#include <stddef.h>

#define LLAMA_TOKEN_BOS 1
#define LLAMA_TOKEN_EOS 2

typedef struct llama_config {
    int dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len;
    int head_dim;          /* dim / n_heads */
    int kv_dim;            /* n_kv_heads * head_dim */
    int shared_classifier; /* 1: logits use the token embedding (vocab_size > 0 in the file) */
} llama_config;

typedef struct llama_model {
    llama_config cfg;
    float *data; /* every weight (owned) */
    const float *tok_emb, *rms_att, *wq, *wk, *wv, *wo, *rms_ffn, *w1, *w2, *w3, *rms_final, *wcls;
} llama_model;

/* Loads a checkpoint. The file size must match the header exactly. 0, or -1 with a
 * one-line reason in err. The caller owns m's weights (free with llama_model_free). */
int llama_model_load(const char *path, llama_model *m, char *err, size_t err_len);
/* Frees m's weights (the struct is the caller's, zeroed after); NULL is a no-op. */
void llama_model_free(llama_model *m);

typedef struct llama_tokenizer {
    int vocab_size, max_token_length;
    char **vocab; /* NUL-terminated pieces */
    float *scores;
    int *sorted;  /* token ids sorted by piece, for lookups */
    char *buffer; /* scratch for merges: 2 * max_token_length + 1 */
} llama_tokenizer;

/* Loads a tokenizer with vocab_size tokens (the model's). 0, or -1 with err. The caller
 * owns t's arrays (free with llama_tokenizer_free). */
int llama_tokenizer_load(const char *path, int vocab_size, llama_tokenizer *t, char *err,
                         size_t err_len);
/* Frees t's arrays (the struct is the caller's); NULL is a no-op. */
void llama_tokenizer_free(llama_tokenizer *t);

/* Encodes len bytes of text as run.c: BOS (if bos), the " " dummy prefix when the text is
 * not empty, one token per UTF-8 code point (byte tokens for unknown ones), then merges of
 * the best-scoring adjacent pair until none merges. *tokens_p gets *n_p tokens (caller owns
 * them: free with free()). 0, or -1 when out of memory. */
int llama_encode(const llama_tokenizer *t, const char *text, size_t len, int bos, int **tokens_p,
                 int *n_p);

/* The bytes of token as text, given the token before it (prev, or -1): a leading space is
 * dropped after BOS and "<0xNN>" becomes the byte NN. *len_p gets the length (the byte
 * may be 0). Returns a pointer into the tokenizer (borrowed: valid while t lives). */
const char *llama_decode(const llama_tokenizer *t, int prev, int token, size_t *len_p);

/* Reads a whole text file (at most 1 GiB of it) into a NUL-terminated string, its length in
 * *len_p; caller owns it (free with free()). NULL with one line in err ("cannot open text PATH:
 * why"). */
char *llama_read_text(const char *path, size_t *len_p, char *err, size_t err_len);

/* The first (up to) max_tokens tokens of text, BOS first. Encodes a prefix only (a piece
 * covers at most max_token_length bytes), cut after a whitespace byte so that no merge
 * straddles the cut, and doubles it while it comes out short. *tokens_p gets *n_p tokens
 * (caller owns them: free with free()). 0, or -1 when out of memory. */
int llama_encode_prefix(const llama_tokenizer *t, const char *text, size_t len, long max_tokens,
                        int **tokens_p, int *n_p);

/* Attention for one layer at position pos: q (n_heads, head_dim) post-RoPE and unscaled,
 * k and v (n_kv_heads, head_dim) of this token, which the callee appends at pos;
 * out (n_heads, head_dim) gets softmax(q.K^T / sqrt(head_dim)) V over positions 0..pos,
 * query head h using KV head h / (n_heads / n_kv_heads). 0, or -1 (the callee keeps the
 * reason). */
typedef int (*llama_attn_fn)(void *ctx, int layer, int pos, const float *q, const float *k,
                             const float *v, float *out);

/* The built-in reference: full causal attention over its own KV cache, in double. */
typedef struct llama_ref_attn {
    int n_layers, n_heads, n_kv_heads, head_dim, cap;
    float **k, **v; /* (n_layers) -> (cap, n_kv_heads, head_dim) */
    double *scores; /* (cap) */
} llama_ref_attn;

/* 0, and the caller owns r's cache (free with llama_ref_attn_free), or -1 when out of
 * memory. c is borrowed. */
int llama_ref_attn_init(llama_ref_attn *r, const llama_config *c);
/* Frees r's cache (the struct is the caller's); NULL is a no-op. */
void llama_ref_attn_free(llama_ref_attn *r);
/* A llama_attn_fn; ctx is a llama_ref_attn. pos must be the next position of the layer. */
int llama_ref_attend(void *ctx, int layer, int pos, const float *q, const float *k, const float *v,
                     float *out);

/* The reference attention that also keeps the post-RoPE q, k and v of positions below T
 * (for calibration and activation dumps). */
typedef struct llama_rec_attn {
    llama_ref_attn ref;
    int n_layers, T, qrow, kvrow;
    float **q, **k, **v; /* (n_layers) -> (T, n_heads or n_kv_heads, head_dim) */
} llama_rec_attn;

/* 0, and the caller owns r's arrays (free with llama_rec_attn_free), or -1 when out of
 * memory (nothing left to free). */
int llama_rec_attn_init(llama_rec_attn *r, const llama_config *c, int T);
/* Frees r's arrays (the struct is the caller's); NULL is a no-op. */
void llama_rec_attn_free(llama_rec_attn *r);
/* A llama_attn_fn; ctx is a llama_rec_attn. */
int llama_rec_attend(void *ctx, int layer, int pos, const float *q, const float *k, const float *v,
                     float *out);

typedef struct llama_state {
    const llama_model *m;
    float *x, *xb, *xb2, *hb, *hb2, *q, *k, *v, *att, *logits;
    double *rope_freq; /* (head_dim / 2) */
} llama_state;

/* 0, and the caller owns s's buffers (free with llama_state_free), or -1 when out of memory.
 * m is borrowed and must outlive s. */
int llama_state_init(llama_state *s, const llama_model *m);
/* Frees s's buffers (the struct is the caller's); NULL is a no-op. */
void llama_state_free(llama_state *s);

/* Runs token at position pos through the model with attention by attn(ctx, ...); on
 * success s->logits holds the vocab_size logits. 0, or -1 when attn failed. */
int llama_forward(llama_state *s, int token, int pos, llama_attn_fn attn, void *ctx);

/* Per-bucket negative log-likelihood of a token-by-token decode. */
#define LLAMA_PPL_BUCKET 512
typedef struct llama_ppl {
    int n_buckets;
    double *nll;  /* (n_buckets) summed -ln p of the tokens predicted at positions in bucket */
    long *count;  /* (n_buckets) tokens predicted in bucket */
    double total; /* summed over all */
    long n;       /* tokens predicted: n_tokens - 1 */
} llama_ppl;

/* Decodes tokens[0..n-1] one at a time (positions 0..n-1) and scores each next token
 * tokens[t+1] (bucket (t+1) / LLAMA_PPL_BUCKET). progress, if not NULL, is called after
 * each position with (done, n). 0, or -1 (attn failed, or out of memory: out->n_buckets
 * is 0 then). The caller owns out's arrays (free with llama_ppl_free). */
int llama_perplexity(const llama_model *m, const int *tokens, int n, llama_attn_fn attn, void *ctx,
                     void (*progress)(void *arg, long done, long total), void *progress_arg,
                     llama_ppl *out);
/* Frees p's arrays (the struct is the caller's); NULL is a no-op. */
void llama_ppl_free(llama_ppl *p);

/* How a decode's next-token distributions compare with a reference decode's. */
typedef struct llama_vs {
    double kl;         /* summed KL(reference || method) in nats */
    long agree;        /* positions where both argmaxes (first index of the largest) agree */
    double nll_method; /* summed -ln p of the next token, method and reference */
    double nll_ref;
    long n; /* positions compared: n_tokens - 1 */
} llama_vs;

/* Decodes tokens[0..n-1] twice in lockstep, with attn (the method) and with ref_attn (the
 * reference, e.g. llama_ref_attend), and compares the next-token distributions at each
 * position t < n - 1 (the last token is not run); out gets the method's perplexity as
 * llama_perplexity gives it (the caller owns out's arrays: free with llama_ppl_free). 0, or
 * -1 (an attention failed, or out of memory: out->n_buckets is 0 then). */
int llama_perplexity_vs(const llama_model *m, const int *tokens, int n, llama_attn_fn attn,
                        void *ctx, llama_attn_fn ref_attn, void *ref_ctx,
                        void (*progress)(void *arg, long done, long total), void *progress_arg,
                        llama_ppl *out, llama_vs *vs);

/* Picks the next token from logits (vocab_size): the argmax when temperature <= 0 (the
 * lowest id on ties), else a sample of softmax(logits / temperature) drawn with *rng
 * (xorshift64*, any nonzero seed). logits is overwritten. */
int llama_sample(float *logits, int vocab_size, float temperature, unsigned long long *rng);

#endif

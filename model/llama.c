/* The llama2.c-format model runner (see llama.h). */
#include "llama.h"

#include <errno.h>
#include <ctype.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- checkpoint ---------------------------------------------------------------- */

#define LLAMA_MAX_DIM (1 << 16)
#define LLAMA_HEADER_BYTES 28

int llama_model_load(const char *path, llama_model *m, char *err, size_t err_len)
{
    memset(m, 0, sizeof(*m));
    FILE *f = fopen(path, "rb");
    if (!f) {
        snprintf(err, err_len, "cannot open model %s: %s", path, strerror(errno));
        return -1;
    }
    int32_t h[7];
    if (fread(h, sizeof(int32_t), 7, f) != 7) {
        snprintf(err, err_len, "model %s: truncated header (need 28 bytes)", path);
        fclose(f);
        return -1;
    }
    if (h[0] == 0x616b3432) { /* "ak42": llama2.c version >= 1 exports */
        snprintf(err, err_len,
                 "model %s: a llama2.c version-1+ export (magic ak42); only the legacy "
                 "(version 0) format is supported",
                 path);
        fclose(f);
        return -1;
    }
    llama_config *c = &m->cfg;
    c->dim = h[0], c->hidden_dim = h[1], c->n_layers = h[2], c->n_heads = h[3];
    /* (A vocab_size of INT32_MIN has no positive counterpart: leave it to the check below.) */
    c->n_kv_heads = h[4], c->vocab_size = h[5] == INT32_MIN ? 0 : h[5] < 0 ? -h[5] : h[5];
    c->seq_len = h[6];
    c->shared_classifier = h[5] > 0;
    const char *bad = NULL;
    if (c->dim < 1 || c->dim > LLAMA_MAX_DIM)
        bad = "dim";
    else if (c->hidden_dim < 1 || c->hidden_dim > 4 * LLAMA_MAX_DIM)
        bad = "hidden_dim";
    else if (c->n_layers < 1 || c->n_layers > 1024)
        bad = "n_layers";
    else if (c->n_heads < 1 || c->dim % c->n_heads || (c->dim / c->n_heads) % 2)
        bad = "n_heads";
    else if (c->n_kv_heads < 1 || c->n_heads % c->n_kv_heads)
        bad = "n_kv_heads";
    else if (c->vocab_size < 259 || c->vocab_size > (1 << 24))
        bad = "vocab_size"; /* at least <unk>, BOS, EOS and the 256 byte tokens */
    else if (c->seq_len < 1 || c->seq_len > (1 << 24))
        bad = "seq_len";
    if (bad) {
        snprintf(err, err_len,
                 "model %s: bad header field %s (dim %d, hidden_dim %d, n_layers %d, n_heads "
                 "%d, n_kv_heads %d, vocab_size %d, seq_len %d)",
                 path, bad, h[0], h[1], h[2], h[3], h[4], h[5], h[6]);
        fclose(f);
        return -1;
    }
    c->head_dim = c->dim / c->n_heads;
    c->kv_dim = c->n_kv_heads * c->head_dim;
    const size_t L = (size_t)c->n_layers, D = (size_t)c->dim, KV = (size_t)c->kv_dim,
                 HD = (size_t)c->hidden_dim, V = (size_t)c->vocab_size;
    const size_t n_weights =
        V * D + L * D + L * D * D + 2 * L * KV * D + L * D * D + L * D + 3 * L * HD * D + D;
    const size_t n_rope = (size_t)c->seq_len * (size_t)c->head_dim; /* real + imag tables */
    const size_t n_floats = n_weights + n_rope + (c->shared_classifier ? 0 : V * D);
    const long long want = LLAMA_HEADER_BYTES + (long long)n_floats * 4;
    if (fseek(f, 0, SEEK_END) != 0) {
        snprintf(err, err_len, "model %s: cannot seek: %s", path, strerror(errno));
        fclose(f);
        return -1;
    }
    const long long have = ftell(f);
    if (have != want) {
        snprintf(err, err_len,
                 "model %s: %lld bytes, but its header (dim %d, %d layers, vocab %d, seq_len "
                 "%d%s) needs %lld",
                 path, have, c->dim, c->n_layers, c->vocab_size, c->seq_len,
                 c->shared_classifier ? "" : ", own classifier", want);
        fclose(f);
        return -1;
    }
    m->data = malloc(n_floats * sizeof(float));
    if (!m->data) {
        snprintf(err, err_len, "model %s: out of memory for %zu weights", path, n_floats);
        fclose(f);
        return -1;
    }
    if (fseek(f, LLAMA_HEADER_BYTES, SEEK_SET) != 0 ||
        fread(m->data, sizeof(float), n_floats, f) != n_floats) {
        snprintf(err, err_len, "model %s: read error", path);
        fclose(f);
        llama_model_free(m);
        return -1;
    }
    fclose(f);
    const float *p = m->data;
    m->tok_emb = p, p += V * D;
    m->rms_att = p, p += L * D;
    m->wq = p, p += L * D * D;
    m->wk = p, p += L * KV * D;
    m->wv = p, p += L * KV * D;
    m->wo = p, p += L * D * D;
    m->rms_ffn = p, p += L * D;
    m->w1 = p, p += L * HD * D;
    m->w2 = p, p += L * D * HD;
    m->w3 = p, p += L * HD * D;
    m->rms_final = p, p += D;
    p += n_rope; /* freq_cis_real, freq_cis_imag: RoPE is computed instead */
    m->wcls = c->shared_classifier ? m->tok_emb : p;
    return 0;
}

void llama_model_free(llama_model *m)
{
    if (!m) return;
    free(m->data);
    memset(m, 0, sizeof(*m));
}

/* ---- tokenizer ------------------------------------------------------------------ */

static const llama_tokenizer *s_sort_tok; /* for qsort (set only while sorting) */

static int s_cmp_sorted(const void *a, const void *b)
{
    return strcmp(s_sort_tok->vocab[*(const int *)a], s_sort_tok->vocab[*(const int *)b]);
}

int llama_tokenizer_load(const char *path, int vocab_size, llama_tokenizer *t, char *err,
                         size_t err_len)
{
    memset(t, 0, sizeof(*t));
    FILE *f = fopen(path, "rb");
    if (!f) {
        snprintf(err, err_len, "cannot open tokenizer %s: %s", path, strerror(errno));
        return -1;
    }
    int32_t maxlen;
    if (fread(&maxlen, 4, 1, f) != 1 || maxlen < 1 || maxlen > 4096) {
        snprintf(err, err_len, "tokenizer %s: bad or missing max_token_length", path);
        fclose(f);
        return -1;
    }
    t->vocab_size = vocab_size;
    t->max_token_length = maxlen;
    t->vocab = calloc((size_t)vocab_size, sizeof(char *));
    t->scores = malloc((size_t)vocab_size * sizeof(float));
    t->sorted = malloc((size_t)vocab_size * sizeof(int));
    t->buffer = malloc(2 * (size_t)maxlen + 8);
    if (!t->vocab || !t->scores || !t->sorted || !t->buffer) {
        snprintf(err, err_len, "tokenizer %s: out of memory", path);
        goto fail;
    }
    for (int i = 0; i < vocab_size; i++) {
        int32_t len;
        if (fread(&t->scores[i], 4, 1, f) != 1 || fread(&len, 4, 1, f) != 1) {
            snprintf(err, err_len, "tokenizer %s: truncated at token %d of %d (the model's vocab)",
                     path, i, vocab_size);
            goto fail;
        }
        if (len < 0 || len > maxlen) {
            snprintf(err, err_len, "tokenizer %s: token %d has length %d (max_token_length %d)",
                     path, i, len, maxlen);
            goto fail;
        }
        if (!(t->vocab[i] = malloc((size_t)len + 1))) {
            snprintf(err, err_len, "tokenizer %s: out of memory", path);
            goto fail;
        }
        if (fread(t->vocab[i], 1, (size_t)len, f) != (size_t)len) {
            snprintf(err, err_len, "tokenizer %s: truncated in token %d", path, i);
            goto fail;
        }
        t->vocab[i][len] = 0;
        t->sorted[i] = i;
    }
    if (fgetc(f) != EOF) {
        snprintf(err, err_len, "tokenizer %s: more than the model's %d tokens", path, vocab_size);
        goto fail;
    }
    fclose(f);
    s_sort_tok = t;
    qsort(t->sorted, (size_t)vocab_size, sizeof(int), s_cmp_sorted);
    s_sort_tok = NULL;
    return 0;
fail:
    fclose(f);
    llama_tokenizer_free(t);
    return -1;
}

void llama_tokenizer_free(llama_tokenizer *t)
{
    if (!t) return;
    if (t->vocab)
        for (int i = 0; i < t->vocab_size; i++) free(t->vocab[i]);
    free(t->vocab);
    free(t->scores);
    free(t->sorted);
    free(t->buffer);
    memset(t, 0, sizeof(*t));
}

/* The id of piece str, or -1 (binary search over the sorted pieces, as run.c). */
static int s_lookup(const llama_tokenizer *t, const char *str)
{
    int lo = 0, hi = t->vocab_size - 1;
    while (lo <= hi) {
        const int mid = lo + (hi - lo) / 2;
        const int c = strcmp(str, t->vocab[t->sorted[mid]]);
        if (c == 0) return t->sorted[mid];
        if (c < 0)
            hi = mid - 1;
        else
            lo = mid + 1;
    }
    return -1;
}

/* Score of merging a and b, or -INFINITY when their concatenation is not a piece; *id_p
 * gets the merged id. */
static float s_pair(const llama_tokenizer *t, int a, int b, int *id_p)
{
    const size_t la = strlen(t->vocab[a]), lb = strlen(t->vocab[b]);
    *id_p = -1;
    if (la + lb > (size_t)t->max_token_length) return -INFINITY;
    memcpy(t->buffer, t->vocab[a], la);
    memcpy(t->buffer + la, t->vocab[b], lb);
    t->buffer[la + lb] = 0;
    const int id = s_lookup(t, t->buffer);
    if (id < 0) return -INFINITY;
    *id_p = id;
    return t->scores[id];
}

int llama_encode(const llama_tokenizer *t, const char *text, size_t len, int bos, int **tokens_p,
                 int *n_p)
{
    *tokens_p = NULL;
    *n_p = 0;
    int *tok = malloc((len + 3) * sizeof(int));
    if (!tok) return -1;
    int n = 0;
    if (bos) tok[n++] = LLAMA_TOKEN_BOS;
    if (len > 0) {
        const int sp = s_lookup(t, " ");
        if (sp >= 0) tok[n++] = sp;
    }
    /* One token per UTF-8 code point (at most 4 bytes), else its bytes. */
    char cp[8];
    size_t cl = 0;
    for (size_t i = 0; i < len; i++) {
        const unsigned char c = (unsigned char)text[i];
        if ((c & 0xC0) != 0x80) cl = 0;
        cp[cl++] = (char)c;
        cp[cl] = 0;
        if (i + 1 < len && ((unsigned char)text[i + 1] & 0xC0) == 0x80 && cl < 4) continue;
        const int id = c ? s_lookup(t, cp) : -1;
        if (id >= 0)
            tok[n++] = id;
        else
            for (size_t j = 0; j < cl; j++) tok[n++] = (unsigned char)cp[j] + 3;
        cl = 0;
    }
    /* Merges over a linked list with cached pair scores: after a merge only the pairs
     * next to it change. The best pair is the leftmost with the highest score. */
    int *next = malloc((size_t)(n + 1) * sizeof(int)),
        *prev = malloc((size_t)(n + 1) * sizeof(int));
    int *pid = malloc((size_t)(n + 1) * sizeof(int));
    float *ps = malloc((size_t)(n + 1) * sizeof(float));
    if (!next || !prev || !pid || !ps) {
        free(next), free(prev), free(pid), free(ps), free(tok);
        return -1;
    }
    for (int i = 0; i < n; i++) {
        next[i] = i + 1 < n ? i + 1 : -1;
        prev[i] = i - 1;
        ps[i] = next[i] >= 0 ? s_pair(t, tok[i], tok[i + 1], &pid[i]) : -INFINITY;
    }
    const int head = n > 0 ? 0 : -1;
    for (;;) {
        int best = -1;
        float best_score = -INFINITY;
        for (int i = head; i >= 0; i = next[i])
            if (pid[i] >= 0 && next[i] >= 0 && ps[i] > best_score) best_score = ps[i], best = i;
        if (best < 0) break;
        const int j = next[best];
        tok[best] = pid[best];
        next[best] = next[j];
        if (next[j] >= 0) prev[next[j]] = best;
        ps[best] = next[best] >= 0 ? s_pair(t, tok[best], tok[next[best]], &pid[best])
                                   : (pid[best] = -1, -INFINITY);
        if (prev[best] >= 0) {
            const int p = prev[best];
            ps[p] = s_pair(t, tok[p], tok[best], &pid[p]);
        }
    }
    int m = 0;
    for (int i = head; i >= 0; i = next[i]) tok[m++] = tok[i];
    free(next), free(prev), free(pid), free(ps);
    *tokens_p = tok;
    *n_p = m;
    return 0;
}

int llama_encode_prefix(const llama_tokenizer *t, const char *text, size_t len, long max_tokens,
                        int **tokens_p, int *n_p)
{
    size_t want = (size_t)max_tokens * ((size_t)t->max_token_length + 1) + 64;
    for (;;) {
        size_t cut = want < len ? want : len;
        if (cut < len) {
            size_t c = cut;
            while (c > cut / 2 && !strchr(" \n\t\r", text[c - 1])) c--;
            if (c > cut / 2) cut = c;
            while (cut < len && ((unsigned char)text[cut] & 0xC0) == 0x80) cut++;
        }
        if (llama_encode(t, text, cut, 1, tokens_p, n_p)) return -1;
        if (*n_p >= max_tokens || cut == len) break;
        free(*tokens_p);
        want *= 2;
    }
    if (*n_p > max_tokens) *n_p = (int)max_tokens;
    return 0;
}

const char *llama_decode(const llama_tokenizer *t, int prev, int token, size_t *len_p)
{
    static char bytes[256]; /* byte b at bytes[b] */
    if (token < 0 || token >= t->vocab_size) {
        *len_p = 0;
        return "";
    }
    const char *piece = t->vocab[token];
    if (prev == LLAMA_TOKEN_BOS && piece[0] == ' ') piece++;
    unsigned int b;
    char tail;
    if (strlen(piece) == 6 && isxdigit((unsigned char)piece[3]) &&
        isxdigit((unsigned char)piece[4]) && sscanf(piece, "<0x%2X%c", &b, &tail) == 2 &&
        tail == '>' && b < 256) {
        for (int i = 0; i < 256; i++) bytes[i] = (char)i;
        *len_p = 1;
        return bytes + b;
    }
    *len_p = strlen(piece);
    return piece;
}

/* ---- reference attention -------------------------------------------------------- */

int llama_ref_attn_init(llama_ref_attn *r, const llama_config *c)
{
    memset(r, 0, sizeof(*r));
    r->n_layers = c->n_layers, r->n_heads = c->n_heads, r->n_kv_heads = c->n_kv_heads;
    r->head_dim = c->head_dim;
    r->k = calloc((size_t)c->n_layers, sizeof(float *));
    r->v = calloc((size_t)c->n_layers, sizeof(float *));
    if (!r->k || !r->v) {
        llama_ref_attn_free(r);
        return -1;
    }
    return 0;
}

void llama_ref_attn_free(llama_ref_attn *r)
{
    if (!r) return;
    for (int l = 0; l < r->n_layers && r->k; l++) free(r->k[l]);
    for (int l = 0; l < r->n_layers && r->v; l++) free(r->v[l]);
    free(r->k);
    free(r->v);
    free(r->scores);
    memset(r, 0, sizeof(*r));
}

static int s_ref_grow(llama_ref_attn *r, int need)
{
    if (need <= r->cap) return 0;
    int cap = r->cap ? r->cap : 256;
    while (cap < need) cap *= 2;
    const size_t row = (size_t)r->n_kv_heads * r->head_dim;
    for (int l = 0; l < r->n_layers; l++) {
        float *k = realloc(r->k[l], (size_t)cap * row * sizeof(float));
        if (!k) return -1;
        r->k[l] = k;
        float *v = realloc(r->v[l], (size_t)cap * row * sizeof(float));
        if (!v) return -1;
        r->v[l] = v;
    }
    double *s = realloc(r->scores, (size_t)cap * sizeof(double));
    if (!s) return -1;
    r->scores = s;
    r->cap = cap;
    return 0;
}

int llama_ref_attend(void *ctx, int layer, int pos, const float *q, const float *k, const float *v,
                     float *out)
{
    llama_ref_attn *r = ctx;
    if (layer < 0 || layer >= r->n_layers || pos < 0 || s_ref_grow(r, pos + 1)) return -1;
    const int d = r->head_dim, group = r->n_heads / r->n_kv_heads;
    const size_t row = (size_t)r->n_kv_heads * d;
    memcpy(r->k[layer] + (size_t)pos * row, k, row * sizeof(float));
    memcpy(r->v[layer] + (size_t)pos * row, v, row * sizeof(float));
    const double scale = 1.0 / sqrt((double)d);
    for (int h = 0; h < r->n_heads; h++) {
        const float *qh = q + (size_t)h * d;
        const int kvh = h / group;
        double mx = -INFINITY;
        for (int s = 0; s <= pos; s++) {
            const float *ks = r->k[layer] + (size_t)s * row + (size_t)kvh * d;
            double dot = 0;
            for (int c = 0; c < d; c++) dot += (double)qh[c] * ks[c];
            r->scores[s] = dot * scale;
            if (r->scores[s] > mx) mx = r->scores[s];
        }
        double sum = 0;
        for (int s = 0; s <= pos; s++) sum += r->scores[s] = exp(r->scores[s] - mx);
        for (int c = 0; c < d; c++) {
            double acc = 0;
            for (int s = 0; s <= pos; s++)
                acc += r->scores[s] * r->v[layer][(size_t)s * row + (size_t)kvh * d + c];
            out[(size_t)h * d + c] = (float)(acc / sum);
        }
    }
    return 0;
}

int llama_rec_attn_init(llama_rec_attn *r, const llama_config *c, int T)
{
    memset(r, 0, sizeof(*r));
    r->n_layers = c->n_layers, r->T = T, r->qrow = c->dim, r->kvrow = c->kv_dim;
    r->q = calloc((size_t)c->n_layers, sizeof(float *));
    r->k = calloc((size_t)c->n_layers, sizeof(float *));
    r->v = calloc((size_t)c->n_layers, sizeof(float *));
    int oom = !r->q || !r->k || !r->v || llama_ref_attn_init(&r->ref, c);
    for (int l = 0; !oom && l < c->n_layers; l++) {
        r->q[l] = malloc((size_t)T * r->qrow * sizeof(float));
        r->k[l] = malloc((size_t)T * r->kvrow * sizeof(float));
        r->v[l] = malloc((size_t)T * r->kvrow * sizeof(float));
        oom = !r->q[l] || !r->k[l] || !r->v[l];
    }
    if (oom) llama_rec_attn_free(r);
    return oom ? -1 : 0;
}

void llama_rec_attn_free(llama_rec_attn *r)
{
    if (!r) return;
    for (int l = 0; l < r->n_layers; l++) {
        if (r->q) free(r->q[l]);
        if (r->k) free(r->k[l]);
        if (r->v) free(r->v[l]);
    }
    free(r->q), free(r->k), free(r->v);
    llama_ref_attn_free(&r->ref);
    memset(r, 0, sizeof(*r));
}

int llama_rec_attend(void *ctx, int layer, int pos, const float *q, const float *k, const float *v,
                     float *out)
{
    llama_rec_attn *r = ctx;
    if (pos < r->T) {
        memcpy(r->q[layer] + (size_t)pos * r->qrow, q, (size_t)r->qrow * sizeof(float));
        memcpy(r->k[layer] + (size_t)pos * r->kvrow, k, (size_t)r->kvrow * sizeof(float));
        memcpy(r->v[layer] + (size_t)pos * r->kvrow, v, (size_t)r->kvrow * sizeof(float));
    }
    return llama_ref_attend(&r->ref, layer, pos, q, k, v, out);
}

/* ---- forward pass --------------------------------------------------------------- */

int llama_state_init(llama_state *s, const llama_model *m)
{
    memset(s, 0, sizeof(*s));
    s->m = m;
    const llama_config *c = &m->cfg;
    const size_t D = (size_t)c->dim, HD = (size_t)c->hidden_dim;
    s->x = calloc(D, sizeof(float));
    s->xb = calloc(D, sizeof(float));
    s->xb2 = calloc(D, sizeof(float));
    s->hb = calloc(HD, sizeof(float));
    s->hb2 = calloc(HD, sizeof(float));
    s->q = calloc(D, sizeof(float));
    s->k = calloc((size_t)c->kv_dim, sizeof(float));
    s->v = calloc((size_t)c->kv_dim, sizeof(float));
    s->att = calloc(D, sizeof(float));
    s->logits = calloc((size_t)c->vocab_size, sizeof(float));
    s->rope_freq = calloc((size_t)c->head_dim / 2, sizeof(double));
    if (!s->x || !s->xb || !s->xb2 || !s->hb || !s->hb2 || !s->q || !s->k || !s->v || !s->att ||
        !s->logits || !s->rope_freq) {
        llama_state_free(s);
        return -1;
    }
    for (int i = 0; i < c->head_dim / 2; i++)
        s->rope_freq[i] = pow(10000.0, -2.0 * i / (double)c->head_dim);
    return 0;
}

void llama_state_free(llama_state *s)
{
    if (!s) return;
    free(s->x), free(s->xb), free(s->xb2), free(s->hb), free(s->hb2);
    free(s->q), free(s->k), free(s->v), free(s->att), free(s->logits), free(s->rope_freq);
    memset(s, 0, sizeof(*s));
}

static void s_rmsnorm(float *o, const float *x, const float *w, int n)
{
    float ss = 0;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    ss = 1.0f / sqrtf(ss / (float)n + 1e-5f);
    for (int i = 0; i < n; i++) o[i] = w[i] * (ss * x[i]);
}

/* o (rows) = W (rows, cols) x (cols). */
static void s_matmul(float *o, const float *x, const float *w, int rows, int cols)
{
    for (int r = 0; r < rows; r++) {
        const float *wr = w + (size_t)r * cols;
        float acc = 0;
        for (int c = 0; c < cols; c++) acc += wr[c] * x[c];
        o[r] = acc;
    }
}

/* Rotates the interleaved pairs (2i, 2i+1) of every head of x by pos * freq_i. */
static void s_rope(float *x, int n_heads, int head_dim, int pos, const double *freq)
{
    for (int i = 0; i < head_dim / 2; i++) {
        const double a = pos * freq[i];
        const float fc = (float)cos(a), fs = (float)sin(a);
        for (int h = 0; h < n_heads; h++) {
            float *p = x + (size_t)h * head_dim + 2 * i;
            const float x0 = p[0], x1 = p[1];
            p[0] = x0 * fc - x1 * fs;
            p[1] = x0 * fs + x1 * fc;
        }
    }
}

int llama_forward(llama_state *s, int token, int pos, llama_attn_fn attn, void *ctx)
{
    const llama_model *m = s->m;
    const llama_config *c = &m->cfg;
    const int D = c->dim, KV = c->kv_dim, HD = c->hidden_dim;
    if (token < 0 || token >= c->vocab_size || pos < 0) return -1;
    memcpy(s->x, m->tok_emb + (size_t)token * D, (size_t)D * sizeof(float));
    for (int l = 0; l < c->n_layers; l++) {
        s_rmsnorm(s->xb, s->x, m->rms_att + (size_t)l * D, D);
        s_matmul(s->q, s->xb, m->wq + (size_t)l * D * D, D, D);
        s_matmul(s->k, s->xb, m->wk + (size_t)l * KV * D, KV, D);
        s_matmul(s->v, s->xb, m->wv + (size_t)l * KV * D, KV, D);
        s_rope(s->q, c->n_heads, c->head_dim, pos, s->rope_freq);
        s_rope(s->k, c->n_kv_heads, c->head_dim, pos, s->rope_freq);
        if (attn(ctx, l, pos, s->q, s->k, s->v, s->att)) return -1;
        s_matmul(s->xb2, s->att, m->wo + (size_t)l * D * D, D, D);
        for (int i = 0; i < D; i++) s->x[i] += s->xb2[i];
        s_rmsnorm(s->xb, s->x, m->rms_ffn + (size_t)l * D, D);
        s_matmul(s->hb, s->xb, m->w1 + (size_t)l * HD * D, HD, D);
        s_matmul(s->hb2, s->xb, m->w3 + (size_t)l * HD * D, HD, D);
        for (int i = 0; i < HD; i++) {
            const float g = s->hb[i];
            s->hb[i] = g / (1.0f + expf(-g)) * s->hb2[i];
        }
        s_matmul(s->xb2, s->hb, m->w2 + (size_t)l * D * HD, D, HD);
        for (int i = 0; i < D; i++) s->x[i] += s->xb2[i];
    }
    s_rmsnorm(s->x, s->x, m->rms_final, D);
    s_matmul(s->logits, s->x, m->wcls, c->vocab_size, D);
    return 0;
}

/* ---- perplexity and sampling ---------------------------------------------------- */

/* ln sum_i exp(logits[i]) in double. */
static double s_logsumexp(int V, const float *logits)
{
    double mx = -INFINITY, sum = 0;
    for (int i = 0; i < V; i++)
        if (logits[i] > mx) mx = logits[i];
    for (int i = 0; i < V; i++) sum += exp((double)logits[i] - mx);
    return log(sum) + mx;
}

/* The first index of the largest logit. */
static int s_argmax(int V, const float *logits)
{
    int best = 0;
    for (int i = 1; i < V; i++)
        if (logits[i] > logits[best]) best = i;
    return best;
}

/* Zeroes *out and gives it the buckets of n tokens. 0, or -1 out of memory (nothing held). */
static int s_ppl_alloc(llama_ppl *out, int n)
{
    memset(out, 0, sizeof(*out));
    const int nb = (n - 1) / LLAMA_PPL_BUCKET + 1;
    out->nll = calloc((size_t)nb, sizeof(double));
    out->count = calloc((size_t)nb, sizeof(long));
    if (!out->nll || !out->count) {
        llama_ppl_free(out);
        return -1;
    }
    out->n_buckets = nb;
    return 0;
}

/* Adds the negative log-likelihood of token t (t >= 1) to *out. */
static void s_ppl_add(llama_ppl *out, int t, double nll)
{
    const int b = t / LLAMA_PPL_BUCKET;
    out->nll[b] += nll;
    out->count[b]++;
    out->total += nll;
    out->n++;
}

int llama_perplexity_vs(const llama_model *m, const int *tokens, int n, llama_attn_fn attn,
                        void *ctx, llama_attn_fn ref_attn, void *ref_ctx,
                        void (*progress)(void *arg, long done, long total), void *progress_arg,
                        llama_ppl *out, llama_vs *vs)
{
    memset(vs, 0, sizeof(*vs));
    llama_state s, r;
    if (n < 1 || llama_state_init(&r, m)) return -1;
    if (llama_state_init(&s, m)) {
        llama_state_free(&r);
        return -1;
    }
    if (s_ppl_alloc(out, n)) {
        llama_state_free(&s);
        llama_state_free(&r);
        return -1;
    }
    const int V = m->cfg.vocab_size;
    int rc = 0;
    for (int t = 0; t + 1 < n; t++) { /* the last token predicts nothing */
        if (llama_forward(&s, tokens[t], t, attn, ctx) ||
            llama_forward(&r, tokens[t], t, ref_attn, ref_ctx)) {
            rc = -1;
            break;
        }
        /* KL(dense || method) = sum_i p_i (ln p_i - ln q_i), p the reference's softmax. */
        const double zs = s_logsumexp(V, s.logits), zr = s_logsumexp(V, r.logits);
        double kl = 0;
        for (int i = 0; i < V; i++) {
            const double lp = r.logits[i] - zr, lq = s.logits[i] - zs;
            kl += exp(lp) * (lp - lq);
        }
        vs->kl += kl;
        vs->agree += s_argmax(V, s.logits) == s_argmax(V, r.logits);
        const double nll = zs - s.logits[tokens[t + 1]];
        s_ppl_add(out, t + 1, nll);
        vs->nll_method += nll;
        vs->nll_ref += zr - r.logits[tokens[t + 1]];
        vs->n++;
        if (progress) progress(progress_arg, t + 1, n);
    }
    llama_state_free(&s);
    llama_state_free(&r);
    return rc;
}

int llama_perplexity(const llama_model *m, const int *tokens, int n, llama_attn_fn attn, void *ctx,
                     void (*progress)(void *arg, long done, long total), void *progress_arg,
                     llama_ppl *out)
{
    memset(out, 0, sizeof(*out));
    llama_state s;
    if (n < 1 || llama_state_init(&s, m)) return -1;
    if (s_ppl_alloc(out, n)) {
        llama_state_free(&s);
        return -1;
    }
    const int V = m->cfg.vocab_size;
    int rc = 0;
    for (int t = 0; t < n; t++) {
        /* The last token predicts nothing, but still goes through (as a decode would). */
        if (llama_forward(&s, tokens[t], t, attn, ctx)) {
            rc = -1;
            break;
        }
        if (t + 1 < n) s_ppl_add(out, t + 1, s_logsumexp(V, s.logits) - s.logits[tokens[t + 1]]);
        if (progress) progress(progress_arg, t + 1, n);
    }
    llama_state_free(&s);
    return rc;
}

void llama_ppl_free(llama_ppl *p)
{
    if (!p) return;
    free(p->nll);
    free(p->count);
    memset(p, 0, sizeof(*p));
}

int llama_sample(float *logits, int vocab_size, float temperature, unsigned long long *rng)
{
    int best = 0;
    for (int i = 1; i < vocab_size; i++)
        if (logits[i] > logits[best]) best = i;
    if (temperature <= 0) return best;
    double sum = 0;
    const float mx = logits[best];
    for (int i = 0; i < vocab_size; i++) sum += logits[i] = expf((logits[i] - mx) / temperature);
    /* xorshift64* as llama2.c run.c, 24 bits to a float in [0, 1) */
    unsigned long long x = *rng ? *rng : 0x9E3779B97F4A7C15ULL;
    x ^= x >> 12, x ^= x << 25, x ^= x >> 27;
    *rng = x;
    const double u = (double)((x * 0x2545F4914F6CDD1DULL) >> 40) / 16777216.0 * sum;
    double cdf = 0;
    for (int i = 0; i < vocab_size; i++) {
        cdf += logits[i];
        if (u < cdf) return i;
    }
    return best;
}

char *llama_read_text(const char *path, size_t *len_p, char *err, size_t err_len)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        snprintf(err, err_len, "cannot open text %s: %s", path, strerror(errno));
        return NULL;
    }
    size_t cap = 1 << 16, len = 0;
    char *buf = malloc(cap + 1);
    while (buf) {
        len += fread(buf + len, 1, cap - len, f);
        if (len < cap) break;
        if (cap >= ((size_t)1 << 30)) break; /* 1 GiB is plenty */
        char *nb = realloc(buf, 2 * cap + 1);
        if (!nb) free(buf);
        buf = nb, cap *= 2;
    }
    const int bad = ferror(f);
    fclose(f);
    if (!buf || bad) {
        snprintf(err, err_len, "cannot read text %s: %s", path, buf ? "read error" : "no memory");
        free(buf);
        return NULL;
    }
    buf[len] = 0;
    *len_p = len;
    return buf;
}

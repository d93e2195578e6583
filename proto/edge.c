/* Decoding untrusted Request bytes. See edge.h. */
#include "edge.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fasa.pb-c.h"

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the wire carries little-endian tensors; this edge assumes a little-endian host"
#endif

enum { ST_OK = 0, ST_INVALID = 1, ST_EXHAUSTED = 4, ST_INTERNAL = 7 };

/* A protobuf-c allocator that refuses to hand out more than budget bytes in total, so a
 * message cannot make unpacking allocate far more than it weighs. */
typedef struct bounded_alloc {
    ProtobufCAllocator base;
    size_t used, budget;
    int exceeded;
    struct edge_arena *arena; /* where the memory comes from first (NULL: malloc) */
} bounded_alloc;

/* edge.h: a block carved in order, 16-byte aligned pieces; the allocator a decode in it
 * uses lives here too. */
struct edge_arena {
    bounded_alloc a;
    uint8_t *buf;
    size_t cap, off, want; /* want: what the decode in hand asked for, in pieces */
    int busy;
};

static void *s_alloc(void *data, size_t size)
{
    bounded_alloc *a = data;
    if (size > a->budget - a->used) {
        a->exceeded = 1;
        return NULL;
    }
    a->used += size;
    edge_arena *ar = a->arena;
    if (ar) {
        const size_t piece = size ? (size + 15) & ~(size_t)15 : 16;
        ar->want += piece;
        if (ar->buf && piece <= ar->cap - ar->off) {
            void *p = ar->buf + ar->off;
            ar->off += piece;
            return p;
        }
    }
    return malloc(size ? size : 1);
}

static void s_free(void *data, void *p)
{
    const bounded_alloc *a = data;
    const edge_arena *ar = a->arena;
    if (ar && ar->buf && (const uint8_t *)p >= ar->buf && (const uint8_t *)p < ar->buf + ar->cap)
        return;
    free(p);
}

edge_arena *edge_arena_new(void)
{
    return calloc(1, sizeof(edge_arena));
}

void edge_arena_destroy(edge_arena **arena_p)
{
    edge_arena *ar = arena_p ? *arena_p : NULL;
    if (!ar) return;
    free(ar->buf);
    free(ar);
    *arena_p = NULL;
}

/* After a decode's memory came back: the arena is free again, and grown (when it may) to
 * what that decode wanted, so that the next one like it needs no malloc. */
static void s_arena_release(edge_arena *ar)
{
    ar->busy = 0;
    ar->off = 0;
    if (ar->want > ar->cap && ar->want <= EDGE_ARENA_MAX) {
        const size_t cap = ar->want < 4096 ? 4096 : ar->want;
        uint8_t *p = malloc(cap);
        if (p) {
            free(ar->buf);
            ar->buf = p;
            ar->cap = cap;
        }
    }
    ar->want = 0;
}

static int s_err(char *msg, size_t len, int code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static int s_err(char *msg, size_t len, int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, len, fmt, ap);
    va_end(ap);
    return code;
}

/* Reads a varint at *p (below end); 0, or -1 when it runs past end or is too long. */
static int s_varint(const uint8_t **p, const uint8_t *end, uint64_t *v)
{
    uint64_t x = 0;
    for (int shift = 0; shift < 64; shift += 7) {
        if (*p >= end) return -1;
        const uint8_t b = *(*p)++;
        x |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) {
            *v = x;
            return 0;
        }
    }
    return -1;
}

/* The request id of a message that may not unpack: scans the top level for field 2. */
uint64_t edge_scan_request_id(const void *buf, size_t len)
{
    const uint8_t *p = buf;
    const uint8_t *end = p + len;
    uint64_t key, v, id = 0;
    while (p < end && s_varint(&p, end, &key) == 0) {
        switch (key & 7) {
        case 0:
            if (s_varint(&p, end, &v)) return id;
            if (key >> 3 == 2) id = v;
            break;
        case 1:
            if (end - p < 8) return id;
            p += 8;
            break;
        case 2:
            if (s_varint(&p, end, &v) || v > (uint64_t)(end - p)) return id;
            p += v;
            break;
        case 5:
            if (end - p < 4) return id;
            p += 4;
            break;
        default:
            return id;
        }
    }
    return id;
}

static int s_id(const char *id, const char *field, char *msg, size_t len)
{
    if (!id) return s_err(msg, len, ST_INVALID, "%s is missing", field);
    const size_t n = strlen(id);
    if (n == 0 || n > EDGE_MAX_ID)
        return s_err(msg, len, ST_INVALID, "%s must be 1..%d bytes (got %zu)", field, EDGE_MAX_ID,
                     n);
    for (size_t i = 0; i < n; i++)
        if (id[i] < 0x21 || id[i] > 0x7e)
            return s_err(msg, len, ST_INVALID, "%s must be printable ASCII without spaces", field);
    return ST_OK;
}

static int s_range(int64_t v, int64_t lo, int64_t hi, const char *field, char *msg, size_t len)
{
    if (v < lo || v > hi)
        return s_err(msg, len, ST_INVALID, "%s %lld out of range [%lld, %lld]", field, (long long)v,
                     (long long)lo, (long long)hi);
    return ST_OK;
}

static int s_enum(int has, int v, int hi, const char *field, int *out, char *msg, size_t len)
{
    *out = 0;
    if (!has) return ST_OK;
    if (v < 0 || v > hi) return s_err(msg, len, ST_INVALID, "%s %d is not a known value", field, v);
    *out = v;
    return ST_OK;
}

static const char *s_dtype_name(int dt)
{
    switch (dt) {
    case FASA__V1__DTYPE__F32:
        return "F32";
    case FASA__V1__DTYPE__F16:
        return "F16";
    case FASA__V1__DTYPE__BF16:
        return "BF16";
    case FASA__V1__DTYPE__I32:
        return "I32";
    case FASA__V1__DTYPE__I8:
        return "I8";
    default:
        return "unknown";
    }
}

/* 1 when every value is finite: a vectorisable pass over the exponent bits (all ones for
 * NaN and infinity), so checking a large append costs about one read of it. */
static int s_all_finite(const float *x, uint64_t n)
{
    uint32_t bad = 0;
    for (uint64_t i = 0; i < n; i++) {
        uint32_t b;
        memcpy(&b, x + i, sizeof(b));
        bad |= (b & 0x7f800000u) == 0x7f800000u;
    }
    return !bad;
}

/* Checks a tensor: F32, rank in [rank_lo, rank_hi], a shape whose size matches the data
 * exactly (without overflow), finite values. t == NULL gives rank 0 (absent). */
/* 1 when every f16 (exponent all ones: NaN or inf) or bf16 value is finite: one
 * vectorisable pass over the bits. */
static int s_all_finite_half(const uint16_t *x, uint64_t n, uint16_t exp_mask)
{
    uint16_t bad = 0;
    for (uint64_t i = 0; i < n; i++) bad |= (uint16_t)((x[i] & exp_mask) == exp_mask);
    return !bad;
}

/* The raw data frames of a request (edge_decode_frames): which are taken, and the aligned
 * copies of those that were not aligned for their elements. NULL: none came. */
typedef struct frames_ctx {
    const edge_frame *f;
    int n;
    uint8_t used[EDGE_MAX_FRAMES];
    void *copy[EDGE_MAX_FRAMES];
} frames_ctx;

static void s_frames_free(frames_ctx *fr)
{
    if (!fr) return;
    for (int i = 0; i < fr->n; i++) free(fr->copy[i]);
    free(fr);
}

/* Where a tensor's elements are: its data, or the raw frame it names (then *data_p and
 * *len_p are the frame's, taken so that no other tensor names it). src gets "data" or
 * "data frame N", for messages. */
static int s_tensor_bytes(const Fasa__V1__Tensor *t, const char *field, frames_ctx *fr,
                          const uint8_t **data_p, size_t *len_p, char *src, size_t src_len,
                          char *msg, size_t len)
{
    *data_p = t->data.data;
    *len_p = t->data.len;
    snprintf(src, src_len, "data");
    if (!t->has_data_frame || t->data_frame == 0) return ST_OK;
    const uint32_t i = t->data_frame;
    if (!fr || fr->n == 0)
        return s_err(msg, len, ST_INVALID,
                     "%s.data_frame %u: the message has no data frames after the Request (send "
                     "the elements in data, or as frame %u of the same message)",
                     field, i, i);
    if (i > (uint32_t)fr->n)
        return s_err(msg, len, ST_INVALID,
                     "%s.data_frame %u: the message has only %d data frame%s after the Request",
                     field, i, fr->n, fr->n == 1 ? "" : "s");
    if (t->data.len)
        return s_err(msg, len, ST_INVALID,
                     "%s: data (%zu bytes) and data_frame %u are both given: send one or the "
                     "other",
                     field, t->data.len, i);
    if (fr->used[i - 1])
        return s_err(msg, len, ST_INVALID,
                     "%s.data_frame %u is already the data of another tensor: each frame is "
                     "one tensor's",
                     field, i);
    fr->used[i - 1] = 1;
    *data_p = fr->f[i - 1].data;
    *len_p = fr->f[i - 1].len;
    snprintf(src, src_len, "data frame %u", i);
    return ST_OK;
}

static int s_tensor_dt(const Fasa__V1__Tensor *t, const char *field, int rank_lo, int rank_hi,
                       int half_ok, frames_ctx *fr, edge_tensor *out, char *msg, size_t len);
#define EDGE_VALUES_LATER 2

/* A BatchAttend item refused before its tensors were read still names its frames: they
 * are its own (it fails alone), not frames that no tensor names. */
static void s_claim_frames(frames_ctx *fr, const Fasa__V1__Attend *a)
{
    const Fasa__V1__Tensor *t[3] = {a->q, a->k_new, a->v_new};
    for (int i = 0; fr && i < 3; i++)
        if (t[i] && t[i]->has_data_frame && t[i]->data_frame >= 1 &&
            t[i]->data_frame <= (uint32_t)fr->n)
            fr->used[t[i]->data_frame - 1] = 1;
}

static int s_tensor(const Fasa__V1__Tensor *t, const char *field, int rank_lo, int rank_hi,
                    frames_ctx *fr, edge_tensor *out, char *msg, size_t len)
{
    return s_tensor_dt(t, field, rank_lo, rank_hi, 0, fr, out, msg, len);
}

/* s_tensor that also takes F16 and BF16 when half_ok (append k and v, attend k_new and
 * v_new): out->dtype and out->raw say which; out->data is then NULL. half_ok
 * EDGE_VALUES_LATER (append k and v): the values are not looked at here; the service
 * checks them in its one pass (finite, below 2^50, within the session's dtype) before
 * anything is stored. */
static int s_tensor_dt(const Fasa__V1__Tensor *t, const char *field, int rank_lo, int rank_hi,
                       int half_ok, frames_ctx *fr, edge_tensor *out, char *msg, size_t len)
{
    memset(out, 0, sizeof(*out));
    if (!t) return s_err(msg, len, ST_INVALID, "%s is missing", field);
    const uint8_t *data;
    size_t dlen;
    char src[32];
    const int sb = s_tensor_bytes(t, field, fr, &data, &dlen, src, sizeof(src), msg, len);
    if (sb) return sb;
    const int half =
        half_ok && (t->dtype == FASA__V1__DTYPE__F16 || t->dtype == FASA__V1__DTYPE__BF16);
    if (t->dtype != FASA__V1__DTYPE__F32 && !half)
        return s_err(msg, len, ST_INVALID, "%s.dtype %s (%d) is not supported: send F32%s", field,
                     s_dtype_name(t->dtype), (int)t->dtype, half_ok ? ", F16 or BF16" : "");
    const size_t esz = half ? 2 : sizeof(float);
    if (t->n_shape < (size_t)rank_lo || t->n_shape > (size_t)rank_hi)
        return s_err(msg, len, ST_INVALID, "%s.shape has %zu dims, expected %d%s%.0d", field,
                     t->n_shape, rank_lo, rank_hi > rank_lo ? " or " : "",
                     rank_hi > rank_lo ? rank_hi : 0);
    /* Every dim at least 1; the product, in bytes, must equal data.len. Dims are checked
     * one at a time against what the data could hold, so the product cannot overflow. */
    uint64_t elems = 1;
    const uint64_t have = dlen / esz;
    /* A 0 anywhere first: otherwise a dim before it would "claim more than 0 bytes". */
    for (size_t i = 0; i < t->n_shape; i++)
        if (t->shape[i] == 0)
            return s_err(msg, len, ST_INVALID,
                         "%s.shape[%zu] is 0 (nothing to send: every dim must be at least 1)",
                         field, i);
    for (size_t i = 0; i < t->n_shape; i++) {
        const uint64_t dim = t->shape[i];
        if (dim > have || elems > have / dim) {
            char dims[160];
            size_t o = 0;
            for (size_t j = 0; j < t->n_shape && o < sizeof(dims) - 24; j++)
                o += (size_t)snprintf(dims + o, sizeof(dims) - o, "%s%llu", j ? ", " : "",
                                      (unsigned long long)t->shape[j]);
            return s_err(msg, len, ST_INVALID, "%s.shape [%s] claims more than the %zu bytes of %s",
                         field, dims, dlen, src);
        }
        elems *= dim;
        out->shape[i] = (int64_t)dim;
    }
    if (elems * esz != dlen)
        return s_err(msg, len, ST_INVALID, "%s.shape holds %llu %s but %s has %zu bytes", field,
                     (unsigned long long)elems, half ? "elements of 2 bytes" : "floats", src, dlen);
    if ((uintptr_t)data % esz) {
        /* A frame lands where ZeroMQ put it (small ones inside its receive buffer): one
         * not aligned for its elements is copied. protobuf-c's bytes always are. */
        const uint32_t i = t->has_data_frame ? t->data_frame : 0;
        if (!i) return s_err(msg, len, ST_INTERNAL, "%s.data is not aligned", field);
        void *c = malloc(dlen);
        if (!c)
            return s_err(msg, len, ST_EXHAUSTED, "%s: out of memory for %zu bytes", field, dlen);
        memcpy(c, data, dlen);
        fr->copy[i - 1] = c;
        data = c;
    }
    const int later = half_ok == EDGE_VALUES_LATER;
    if (half) {
        const uint16_t *h = (const uint16_t *)(const void *)data;
        const uint16_t em = t->dtype == FASA__V1__DTYPE__F16 ? 0x7c00u : 0x7f80u;
        if (!later && !s_all_finite_half(h, elems, em))
            for (uint64_t i = 0; i < elems; i++)
                if ((h[i] & em) == em)
                    return s_err(msg, len, ST_INVALID, "%s[%llu] is %s", field,
                                 (unsigned long long)i,
                                 (h[i] & (em ^ 0x7fffu)) ? "NaN" : "infinite");
        out->rank = (int)t->n_shape;
        out->dtype = t->dtype == FASA__V1__DTYPE__F16 ? 1 : 2;
        out->raw = h;
        out->n = (size_t)elems;
        return ST_OK;
    }
    const float *x = (const float *)(const void *)data;
    if (!later && !s_all_finite(x, elems))
        for (uint64_t i = 0; i < elems; i++)
            if (!isfinite(x[i]))
                return s_err(msg, len, ST_INVALID, "%s[%llu] is %s", field, (unsigned long long)i,
                             isnan(x[i]) ? "NaN" : "infinite");
    out->rank = (int)t->n_shape;
    out->data = x;
    out->raw = x;
    out->n = (size_t)elems;
    return ST_OK;
}

static int s_profile_source(const char *text, const char *name, const char *field, int need_one,
                            char *msg, size_t len)
{
    char f[64];
    if (text && name)
        return s_err(msg, len, ST_INVALID, "%s: give profile_text or profile_name, not both",
                     field);
    if (need_one && !text && !name)
        return s_err(msg, len, ST_INVALID, "%s: profile_text or profile_name is required", field);
    if (text && strlen(text) > EDGE_MAX_PROFILE_TEXT)
        return s_err(msg, len, ST_INVALID, "%s.profile_text is longer than %zu bytes", field,
                     EDGE_MAX_PROFILE_TEXT);
    snprintf(f, sizeof(f), "%s.profile_name", field);
    return name ? s_id(name, f, msg, len) : ST_OK;
}

static int s_create(const Fasa__V1__CreateSession *c, edge_create *o, char *msg, size_t len)
{
    int st;
    if ((st = s_id(c->session_id, "create_session.session_id", msg, len)) ||
        (st = s_range(c->n_layers, 1, EDGE_MAX_LAYERS, "create_session.n_layers", msg, len)) ||
        (st = s_range(c->n_heads, 1, EDGE_MAX_HEADS, "create_session.n_heads", msg, len)) ||
        (st = s_range(c->n_kv_heads, 1, c->n_heads, "create_session.n_kv_heads", msg, len)) ||
        (st = s_range(c->head_dim, 2, EDGE_MAX_HEAD_DIM, "create_session.head_dim", msg, len)))
        return st;
    if (c->n_heads % c->n_kv_heads)
        return s_err(msg, len, ST_INVALID,
                     "create_session.n_heads %u is not a multiple of n_kv_heads %u", c->n_heads,
                     c->n_kv_heads);
    if (c->head_dim % 2)
        return s_err(msg, len, ST_INVALID, "create_session.head_dim %u must be even", c->head_dim);
    o->dtype = 0;
    if (c->has_dtype && c->dtype != FASA__V1__DTYPE__DTYPE_UNSPECIFIED) {
        if (c->dtype != FASA__V1__DTYPE__F32 && c->dtype != FASA__V1__DTYPE__F16 &&
            c->dtype != FASA__V1__DTYPE__BF16)
            return s_err(msg, len, ST_INVALID,
                         "create_session.dtype %s (%d) is not a storage dtype: send F32, F16 "
                         "or BF16",
                         s_dtype_name(c->dtype), (int)c->dtype);
        /* The proto numbers F32, F16, BF16 = 1, 2, 3; fasa_dtype numbers them 0, 1, 2. */
        o->dtype = (int)c->dtype - FASA__V1__DTYPE__F32;
    }
    o->score_dtype = 0;
    if (c->has_score_dtype && c->score_dtype != FASA__V1__DTYPE__DTYPE_UNSPECIFIED) {
        if (c->score_dtype != FASA__V1__DTYPE__F32 && c->score_dtype != FASA__V1__DTYPE__F16 &&
            c->score_dtype != FASA__V1__DTYPE__BF16 && c->score_dtype != FASA__V1__DTYPE__I8)
            return s_err(msg, len, ST_INVALID,
                         "create_session.score_dtype %s (%d) is not a score dtype: send F32, "
                         "F16, BF16 or I8",
                         s_dtype_name(c->score_dtype), (int)c->score_dtype);
        o->score_dtype = (int)c->score_dtype; /* scan_dtype uses the proto's numbers */
    }
    if ((st = s_enum(c->has_pairing, c->pairing, 2, "create_session.pairing", &o->pairing, msg,
                     len)) ||
        (st = s_enum(c->has_tier, c->tier, FASA__V1__TIER__DISK, "create_session.tier", &o->tier,
                     msg, len)) ||
        (st = s_enum(c->has_method, c->method, FASA__V1__METHOD__FASA_PLUS, "create_session.method",
                     &o->method, msg, len)) ||
        (st = s_enum(c->has_gqa, c->gqa, 2, "create_session.gqa", &o->gqa, msg, len)) ||
        (st = s_enum(c->has_merge, c->merge, FASA__V1__MERGE__LOCAL, "create_session.merge",
                     &o->merge, msg, len)) ||
        (st = s_profile_source(c->profile_text, c->profile_name, "create_session", 0, msg, len)))
        return st;
    if (c->has_budget &&
        (st = s_range(c->budget, 1, EDGE_MAX_BUDGET, "create_session.budget", msg, len)))
        return st;
    o->session_id = c->session_id;
    o->n_layers = (int)c->n_layers;
    o->n_heads = (int)c->n_heads;
    o->n_kv_heads = (int)c->n_kv_heads;
    o->head_dim = (int)c->head_dim;
    o->profile_text = c->profile_text;
    o->profile_name = c->profile_name;
    o->budget = c->has_budget ? (int)c->budget : 0;
    o->has_dense_layers = c->dense_layers != NULL;
    if (c->dense_layers) {
        if (c->dense_layers->n_layers > c->n_layers)
            return s_err(msg, len, ST_INVALID, "create_session.dense_layers lists %zu layers of %u",
                         c->dense_layers->n_layers, c->n_layers);
        for (size_t i = 0; i < c->dense_layers->n_layers; i++)
            if (c->dense_layers->layers[i] >= c->n_layers)
                return s_err(msg, len, ST_INVALID,
                             "create_session.dense_layers[%zu] %u out of range [0, %u)", i,
                             c->dense_layers->layers[i], c->n_layers);
        o->n_dense_layers = (int)c->dense_layers->n_layers;
        o->dense_layers = c->dense_layers->layers;
    }
    return ST_OK;
}

static int s_append(const Fasa__V1__Append *a, frames_ctx *fr, edge_append *o, char *msg,
                    size_t len)
{
    int st;
    if ((st = s_id(a->session_id, "append.session_id", msg, len)) ||
        (st = s_range(a->layer, -1, EDGE_MAX_LAYERS - 1, "append.layer", msg, len)))
        return st;
    if (a->start_pos > INT32_MAX)
        return s_err(msg, len, ST_INVALID, "append.start_pos %llu out of range [0, %d]",
                     (unsigned long long)a->start_pos, INT32_MAX);
    const int rank = a->layer < 0 ? 4 : 3;
    if ((st = s_tensor_dt(a->k, "append.k", rank, rank, EDGE_VALUES_LATER, fr, &o->k, msg, len)) ||
        (st = s_tensor_dt(a->v, "append.v", rank, rank, EDGE_VALUES_LATER, fr, &o->v, msg, len)))
        return st;
    if (o->k.dtype != o->v.dtype)
        return s_err(msg, len, ST_INVALID, "append.v.dtype %s differs from k's %s",
                     s_dtype_name(a->v->dtype), s_dtype_name(a->k->dtype));
    for (int i = 0; i < rank; i++)
        if (o->k.shape[i] != o->v.shape[i])
            return s_err(msg, len, ST_INVALID, "append.v.shape[%d] %lld differs from k's %lld", i,
                         (long long)o->v.shape[i], (long long)o->k.shape[i]);
    if (o->k.shape[rank - 3] > INT32_MAX)
        return s_err(msg, len, ST_INVALID, "append.k: %lld tokens in one append is too many",
                     (long long)o->k.shape[rank - 3]);
    o->session_id = a->session_id;
    o->layer = a->layer;
    o->start_pos = (int64_t)a->start_pos;
    return ST_OK;
}

static int s_attend(const Fasa__V1__Attend *a, const char *field, frames_ctx *fr, edge_attend *o,
                    char *msg, size_t len)
{
    char f[96];
    int st;
    snprintf(f, sizeof(f), "%s.session_id", field);
    if ((st = s_id(a->session_id, f, msg, len))) return st;
    snprintf(f, sizeof(f), "%s.layer", field);
    if ((st = s_range(a->layer, 0, EDGE_MAX_LAYERS - 1, f, msg, len))) return st;
    snprintf(f, sizeof(f), "%s.q", field);
    if ((st = s_tensor(a->q, f, 2, 2, fr, &o->q, msg, len))) return st;
    if (!a->k_new != !a->v_new)
        return s_err(msg, len, ST_INVALID, "%s.k_new and %s.v_new come together", field, field);
    if (a->k_new) {
        snprintf(f, sizeof(f), "%s.k_new", field);
        if ((st = s_tensor_dt(a->k_new, f, 2, 2, 1, fr, &o->k_new, msg, len))) return st;
        snprintf(f, sizeof(f), "%s.v_new", field);
        if ((st = s_tensor_dt(a->v_new, f, 2, 2, 1, fr, &o->v_new, msg, len))) return st;
        if (o->k_new.dtype != o->v_new.dtype)
            return s_err(msg, len, ST_INVALID, "%s.v_new.dtype %s differs from k_new's %s", field,
                         s_dtype_name(a->v_new->dtype), s_dtype_name(a->k_new->dtype));
        if (o->k_new.shape[0] != o->v_new.shape[0] || o->k_new.shape[1] != o->v_new.shape[1])
            return s_err(msg, len, ST_INVALID, "%s.v_new.shape differs from k_new's", field);
    }
    snprintf(f, sizeof(f), "%s.method", field);
    if ((st = s_enum(a->has_method, a->method, FASA__V1__METHOD__FASA_PLUS, f, &o->method, msg,
                     len)))
        return st;
    snprintf(f, sizeof(f), "%s.gqa", field);
    if ((st = s_enum(a->has_gqa, a->gqa, 2, f, &o->gqa, msg, len))) return st;
    snprintf(f, sizeof(f), "%s.merge", field);
    if ((st = s_enum(a->has_merge, a->merge, FASA__V1__MERGE__LOCAL, f, &o->merge, msg, len)))
        return st;
    if (a->has_budget) {
        snprintf(f, sizeof(f), "%s.budget", field);
        if ((st = s_range(a->budget, 1, EDGE_MAX_BUDGET, f, msg, len))) return st;
    }
    snprintf(f, sizeof(f), "%s.max_pos", field);
    if ((st = s_range(a->max_pos, -1, INT32_MAX, f, msg, len))) return st;
    o->session_id = a->session_id;
    o->layer = (int)a->layer;
    o->budget = a->has_budget ? (int)a->budget : 0;
    o->max_pos = a->max_pos;
    o->return_selected = a->has_return_selected && a->return_selected;
    return ST_OK;
}

static int s_calibrate(const Fasa__V1__Calibrate *c, frames_ctx *fr, edge_calibrate *o, char *msg,
                       size_t len)
{
    int st;
    if ((st = s_tensor(c->q, "calibrate.q", 4, 4, fr, &o->q, msg, len)) ||
        (st = s_tensor(c->k, "calibrate.k", 4, 4, fr, &o->k, msg, len)))
        return st;
    if (o->q.shape[0] != o->k.shape[0] || o->q.shape[1] != o->k.shape[1] ||
        o->q.shape[3] != o->k.shape[3])
        return s_err(msg, len, ST_INVALID,
                     "calibrate.k.shape must be [n_layers, T, n_kv_heads, head_dim] with q's "
                     "n_layers, T and head_dim");
    if ((st = s_range(o->q.shape[0], 1, EDGE_MAX_LAYERS, "calibrate.q.shape[0] (layers)", msg,
                      len)) ||
        (st = s_range(o->q.shape[1], 2, INT32_MAX, "calibrate.q.shape[1] (tokens)", msg, len)) ||
        (st =
             s_range(o->q.shape[2], 1, EDGE_MAX_HEADS, "calibrate.q.shape[2] (heads)", msg, len)) ||
        (st = s_range(o->k.shape[2], 1, o->q.shape[2], "calibrate.k.shape[2] (kv heads)", msg,
                      len)) ||
        (st = s_range(o->q.shape[3], 2, EDGE_MAX_HEAD_DIM, "calibrate.q.shape[3] (head_dim)", msg,
                      len)))
        return st;
    if (o->q.shape[2] % o->k.shape[2] || o->q.shape[3] % 2)
        return s_err(msg, len, ST_INVALID,
                     "calibrate: heads must be a multiple of kv heads and head_dim even");
    if ((st = s_enum(c->has_pairing, c->pairing, 2, "calibrate.pairing", &o->pairing, msg, len)) ||
        (st = s_enum(c->has_gqa, c->gqa, 2, "calibrate.gqa", &o->gqa, msg, len)))
        return st;
    const int64_t T = o->q.shape[1], half = o->q.shape[3] / 2;
    if ((c->has_ntip && (st = s_range(c->ntip, 1, half, "calibrate.ntip", msg, len))) ||
        (c->has_window && (st = s_range(c->window, 1, T, "calibrate.window", msg, len))) ||
        (c->has_pos_begin &&
         (st = s_range(c->pos_begin, 0, T - 1, "calibrate.pos_begin", msg, len))) ||
        (c->has_pos_end && (st = s_range(c->pos_end, 1, T, "calibrate.pos_end", msg, len))) ||
        (c->has_pos_step && (st = s_range(c->pos_step, 1, T, "calibrate.pos_step", msg, len))))
        return st;
    if (c->profile_name && (st = s_id(c->profile_name, "calibrate.profile_name", msg, len)))
        return st;
    o->ntip = c->has_ntip ? (int)c->ntip : 0;
    o->window = c->has_window ? (int)c->window : 0;
    o->pos_begin = c->has_pos_begin ? (int)c->pos_begin : -1;
    o->pos_end = c->has_pos_end ? (int)c->pos_end : 0;
    o->pos_step = c->has_pos_step ? (int)c->pos_step : 0;
    o->profile_name = c->profile_name;
    return ST_OK;
}

static int s_body(const Fasa__V1__Request *m, frames_ctx *fr, edge_request *r, char *msg,
                  size_t len)
{
    switch (m->body_case) {
    case FASA__V1__REQUEST__BODY_PING:
        r->kind = EDGE_PING;
        if (m->ping->has_payload) {
            if (m->ping->payload.len > EDGE_MAX_PAYLOAD)
                return s_err(msg, len, ST_INVALID, "ping.payload is longer than %d bytes",
                             EDGE_MAX_PAYLOAD);
            r->u.ping.payload = m->ping->payload.data;
            r->u.ping.len = m->ping->payload.len;
        }
        return ST_OK;
    case FASA__V1__REQUEST__BODY_CREATE_SESSION:
        r->kind = EDGE_CREATE;
        return s_create(m->create_session, &r->u.create, msg, len);
    case FASA__V1__REQUEST__BODY_APPEND:
        r->kind = EDGE_APPEND;
        return s_append(m->append, fr, &r->u.append, msg, len);
    case FASA__V1__REQUEST__BODY_ATTEND:
        r->kind = EDGE_ATTEND;
        return s_attend(m->attend, "attend", fr, &r->u.attend, msg, len);
    case FASA__V1__REQUEST__BODY_BATCH_ATTEND: {
        r->kind = EDGE_BATCH_ATTEND;
        const size_t n = m->batch_attend->n_items;
        if (n < 1 || n > EDGE_MAX_BATCH)
            return s_err(msg, len, ST_INVALID, "batch_attend.items has %zu items, allowed 1..%d", n,
                         EDGE_MAX_BATCH);
        r->u.batch.items = calloc(n, sizeof(edge_attend));
        if (!r->u.batch.items)
            return s_err(msg, len, ST_EXHAUSTED, "batch_attend: out of memory for %zu items", n);
        r->u.batch.n = (int)n;
        for (size_t i = 0; i < n; i++) {
            char f[48];
            snprintf(f, sizeof(f), "batch_attend.items[%zu]", i);
            /* A bad item gets its own status and the others still run ("each item gets its
             * own status", fasa.proto). */
            edge_attend *it = &r->u.batch.items[i];
            it->item_status =
                s_attend(m->batch_attend->items[i], f, fr, it, it->item_msg, sizeof(it->item_msg));
            if (it->item_status) s_claim_frames(fr, m->batch_attend->items[i]);
        }
        return ST_OK;
    }
    case FASA__V1__REQUEST__BODY_CALIBRATE:
        r->kind = EDGE_CALIBRATE;
        return s_calibrate(m->calibrate, fr, &r->u.calibrate, msg, len);
    case FASA__V1__REQUEST__BODY_SET_PROFILE: {
        r->kind = EDGE_SET_PROFILE;
        const Fasa__V1__SetProfile *p = m->set_profile;
        int st;
        if ((st = s_id(p->session_id, "set_profile.session_id", msg, len)) ||
            (st = s_profile_source(p->profile_text, p->profile_name, "set_profile", 1, msg, len)))
            return st;
        r->u.set_profile = (edge_set_profile){p->session_id, p->profile_text, p->profile_name};
        return ST_OK;
    }
    case FASA__V1__REQUEST__BODY_DROP_SESSION:
        r->kind = EDGE_DROP;
        r->u.session_id = m->drop_session->session_id;
        return s_id(r->u.session_id, "drop_session.session_id", msg, len);
    case FASA__V1__REQUEST__BODY_STATS:
        r->kind = EDGE_STATS;
        r->u.session_id = m->stats->session_id;
        return r->u.session_id ? s_id(r->u.session_id, "stats.session_id", msg, len) : ST_OK;
    case FASA__V1__REQUEST__BODY_SHUTDOWN:
        r->kind = EDGE_SHUTDOWN;
        return ST_OK;
    case FASA__V1__REQUEST__BODY_SNAPSHOT: {
        r->kind = EDGE_SNAPSHOT;
        const Fasa__V1__Snapshot *p = m->snapshot;
        const int all = p->has_all && p->all;
        if (!p->session_id == !all)
            return s_err(msg, len, ST_INVALID,
                         "snapshot: give exactly one of session_id and all (got %s)",
                         all ? "both" : "neither");
        r->u.snapshot.session_id = p->session_id;
        r->u.snapshot.all = all;
        return p->session_id ? s_id(p->session_id, "snapshot.session_id", msg, len) : ST_OK;
    }
    case FASA__V1__REQUEST__BODY_LIST_SESSIONS:
        r->kind = EDGE_LIST_SESSIONS;
        return ST_OK;
    case FASA__V1__REQUEST__BODY_DELETE_PROFILE:
        r->kind = EDGE_DELETE_PROFILE;
        r->u.profile_name = m->delete_profile->profile_name;
        return s_id(r->u.profile_name, "delete_profile.profile_name", msg, len);
    case FASA__V1__REQUEST__BODY_LOAD_SESSION: {
        r->kind = EDGE_LOAD_SESSION;
        const Fasa__V1__LoadSession *p = m->load_session;
        r->u.load.session_id = p->session_id;
        r->u.load.path = p->path;
        r->u.load.check_only = p->has_check_only && p->check_only;
        const int st = s_id(p->session_id, "load_session.session_id", msg, len);
        if (st) return st;
        const size_t n = strlen(p->path);
        int ctl = 0;
        for (size_t i = 0; i < n; i++) ctl |= (unsigned char)p->path[i] < 0x20;
        if (n < 1 || n > 1000 || ctl)
            return s_err(msg, len, ST_INVALID,
                         "load_session.path must be 1..1000 bytes without control characters "
                         "(got %zu bytes)",
                         n);
        return ST_OK;
    }
    default:
        return s_err(msg, len, ST_INVALID, "request.body is missing or of an unknown kind (%d)",
                     (int)m->body_case);
    }
}

int edge_decode(const void *buf, size_t len, size_t max_message, edge_request *req,
                uint64_t *request_id_p, char *msg, size_t msg_len)
{
    return edge_decode_in(NULL, buf, len, max_message, req, request_id_p, msg, msg_len);
}

int edge_decode_in(edge_arena *arena, const void *buf, size_t len, size_t max_message,
                   edge_request *req, uint64_t *request_id_p, char *msg, size_t msg_len)
{
    return edge_decode_frames(arena, buf, len, NULL, 0, max_message, req, request_id_p, msg,
                              msg_len);
}

int edge_decode_frames(edge_arena *arena, const void *buf, size_t len, const edge_frame *frames,
                       int n_frames, size_t max_message, edge_request *req, uint64_t *request_id_p,
                       char *msg, size_t msg_len)
{
    memset(req, 0, sizeof(*req));
    *request_id_p = 0;
    if (len > max_message)
        return s_err(msg, msg_len, ST_INVALID, "request: %zu bytes is over the %zu-byte limit", len,
                     max_message);
    if (!buf || len == 0)
        return s_err(msg, msg_len, ST_INVALID,
                     n_frames ? "request: the first frame is empty (the Request comes first, "
                                "then its data frames)"
                              : "request: empty message");
    *request_id_p = edge_scan_request_id(buf, len);
    if (n_frames < 0 || n_frames > EDGE_MAX_FRAMES || (n_frames && !frames))
        return s_err(msg, msg_len, ST_INVALID,
                     "request: %d data frames after the Request, at most %d (send the other "
                     "tensors' elements in Tensor.data)",
                     n_frames, EDGE_MAX_FRAMES);
    size_t total = len;
    for (int i = 0; i < n_frames; i++) {
        if (frames[i].len > max_message - total)
            return s_err(msg, msg_len, ST_INVALID,
                         "request: the Request and its %d data frames are over the %zu-byte "
                         "limit",
                         n_frames, max_message);
        total += frames[i].len;
    }
    frames_ctx *fr = NULL;
    if (n_frames) {
        fr = calloc(1, sizeof(*fr));
        if (!fr) return s_err(msg, msg_len, ST_EXHAUSTED, "request: out of memory");
        fr->f = frames;
        fr->n = n_frames;
    }

    if (arena && arena->busy) arena = NULL; /* one request at a time: the other mallocs */
    bounded_alloc *a = arena ? &arena->a : calloc(1, sizeof(*a));
    if (!a) {
        s_frames_free(fr);
        return s_err(msg, msg_len, ST_EXHAUSTED, "request: out of memory");
    }
    memset(a, 0, sizeof(*a));
    if (arena) {
        a->arena = arena;
        arena->busy = 1;
        arena->off = arena->want = 0;
    }
    const size_t small = len < ((size_t)8 << 20) ? len : ((size_t)8 << 20);
    a->base = (ProtobufCAllocator){s_alloc, s_free, a};
    a->budget = 2 * len + 128 * small + ((size_t)1 << 20);
    Fasa__V1__Request *m = fasa__v1__request__unpack(&a->base, len, buf);
    if (!m) {
        const int exceeded = a->exceeded;
        if (arena)
            s_arena_release(arena);
        else
            free(a);
        s_frames_free(fr);
        if (exceeded)
            return s_err(msg, msg_len, ST_EXHAUSTED,
                         "request: decoding it would take more memory than allowed");
        if (n_frames)
            return s_err(msg, msg_len, ST_INVALID,
                         "request: the first frame is not a valid fasa.v1.Request (malformed or "
                         "truncated protobuf, or a required field missing; %d data frame%s "
                         "followed it)",
                         n_frames, n_frames == 1 ? "" : "s");
        return s_err(msg, msg_len, ST_INVALID,
                     "request: not a valid fasa.v1.Request (malformed or truncated protobuf, or "
                     "a required field missing)");
    }
    req->msg_ = m;
    req->alloc_ = a;
    req->frames_ = fr;
    req->request_id = m->request_id;
    req->deadline_ms = m->has_deadline_ms ? m->deadline_ms : 0;
    *request_id_p = m->request_id;
    int st = ST_OK;
    if (!protobuf_c_message_check(&m->base))
        st = s_err(msg, msg_len, ST_INVALID, "request: a required field is missing");
    else if (m->protocol_version != EDGE_PROTOCOL_VERSION)
        st = s_err(msg, msg_len, ST_INVALID,
                   "protocol_version %u is not supported (this server speaks %d)",
                   m->protocol_version, EDGE_PROTOCOL_VERSION);
    else
        st = s_body(m, fr, req, msg, msg_len);
    for (int i = 0; !st && i < n_frames; i++)
        if (!fr->used[i])
            st = s_err(msg, msg_len, ST_INVALID,
                       "request: data frame %d (%zu bytes) is named by no tensor's data_frame "
                       "(every frame after the Request must be one tensor's elements)",
                       i + 1, frames[i].len);
    if (st) {
        const edge_kind kind = req->kind; /* set once the bytes parsed as a Request */
        edge_request_free(req);
        req->kind = kind;
    }
    return st;
}

void edge_request_free(edge_request *req)
{
    if (!req) return;
    if (req->kind == EDGE_BATCH_ATTEND) free(req->u.batch.items);
    if (req->msg_) fasa__v1__request__free_unpacked(req->msg_, req->alloc_);
    s_frames_free(req->frames_);
    bounded_alloc *a = req->alloc_;
    if (a && a->arena)
        s_arena_release(a->arena);
    else
        free(a);
    memset(req, 0, sizeof(*req));
}

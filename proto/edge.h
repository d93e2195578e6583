/* The edge: decodes the untrusted bytes of a Request (fasa.proto) into plain structs.
 *
 * Every client-controlled size is bounded before anything is allocated: the message length
 * (checked before unpacking), the memory protobuf-c may use while unpacking (a bounded
 * allocator), and after decoding every count, dimension and string. Tensors must be F32
 * (append k and v and attend k_new and v_new may also be F16 or BF16; I32 never comes from
 * clients), with a shape whose element count matches the bytes, and
 * finite values (but append k and v, whose values the service checks in one pass against
 * the session's dtype). Checks that need a session's geometry (shapes against the session, the
 * next position of an append) belong to the service, which has the session.
 *
 * Status codes are the proto's Status numbers (0 OK, 1 INVALID_ARGUMENT, ...), which are
 * also the engine's fasa_status values. */
#ifndef FASA_PROTO_EDGE_H
#define FASA_PROTO_EDGE_H

#include <stddef.h>
#include <stdint.h>

#define EDGE_PROTOCOL_VERSION 1
#define EDGE_DEFAULT_MAX_MESSAGE ((size_t)256 << 20)
#define EDGE_MAX_LAYERS 1024
#define EDGE_MAX_HEADS 1024
#define EDGE_MAX_HEAD_DIM 1024
#define EDGE_MAX_ID 128
#define EDGE_MAX_BATCH 4096
#define EDGE_MAX_BUDGET (1 << 20)
#define EDGE_MAX_PAYLOAD 4096
#define EDGE_MAX_PROFILE_TEXT ((size_t)4 << 20)

typedef enum edge_kind {
    EDGE_PING = 1,
    EDGE_CREATE,
    EDGE_APPEND,
    EDGE_ATTEND,
    EDGE_BATCH_ATTEND,
    EDGE_CALIBRATE,
    EDGE_SET_PROFILE,
    EDGE_DROP,
    EDGE_STATS,
    EDGE_SHUTDOWN,
    EDGE_SNAPSHOT,
    EDGE_LIST_SESSIONS, /* Request body 21 (edge kinds are the body's field number - 9) */
    EDGE_DELETE_PROFILE,
    EDGE_LOAD_SESSION /* Request body 23 */
} edge_kind;
#define EDGE_KIND_LAST EDGE_LOAD_SESSION

/* A decoded F32 tensor: data points into the request (4-byte aligned), valid until
 * edge_request_free. rank 0 means absent. */
typedef struct edge_tensor {
    int rank;
    int64_t shape[4];
    const float *data; /* F32 only (NULL for F16 and BF16) */
    size_t n;          /* elements */
    /* Where a tensor may also be F16 or BF16 (append k and v, attend k_new and v_new):
     * its fasa_dtype (0 f32, 1 f16, 2 bf16) and elements (aligned for it, finite; append
     * k and v: not checked here, the service checks them in one pass with the session's
     * dtype before anything is stored). */
    int dtype;
    const void *raw;
} edge_tensor;

/* Options use the proto's enum numbers; 0 = unspecified (the session's default). */
typedef struct edge_create {
    const char *session_id;
    int n_layers, n_heads, n_kv_heads, head_dim;
    int pairing;                             /* 0 unspecified, 1 interleaved, 2 half */
    const char *profile_text, *profile_name; /* each NULL when absent */
    int method, gqa;
    int budget; /* 0: unspecified */
    int dtype;  /* fasa_dtype (kernels/dtype.h): 0 f32 (also when unspecified), 1 f16, 2 bf16 */
    int score_dtype; /* scan_dtype (kernels/scan.h, the proto's numbers): 0 unspecified */
    int tier;        /* 0 unspecified (the server's --tier), 1 ram, 2 disk */
    int merge;       /* 0 unspecified, 1 exact, 2 local */
    int has_dense_layers;
    int n_dense_layers;
    const uint32_t *dense_layers; /* each < n_layers */
} edge_create;

typedef struct edge_append {
    const char *session_id;
    int layer; /* -1: every layer */
    int64_t start_pos;
    edge_tensor k, v; /* same shape: rank 3 (n, Hkv, d) or rank 4 (L, n, Hkv, d) */
} edge_append;

typedef struct edge_attend {
    const char *session_id;
    int layer;
    edge_tensor q;            /* rank 2 (H, d) */
    edge_tensor k_new, v_new; /* rank 2 (Hkv, d) or both absent */
    int method, gqa;
    int budget;      /* 0: unspecified */
    int64_t max_pos; /* -1: all appended */
    int return_selected;
    int merge; /* 0 unspecified (the session's), 1 exact, 2 local */
    /* A BatchAttend item that failed the edge's checks: its own status (the other items
     * run) and message; 0 for a good item (and always for a plain Attend, which fails the
     * request instead). */
    int item_status;
    char item_msg[200];
} edge_attend;

typedef struct edge_calibrate {
    edge_tensor q, k; /* rank 4: (L, T, H, d) and (L, T, Hkv, d) */
    int pairing, gqa;
    int ntip, window;                 /* 0: default */
    int pos_begin, pos_end, pos_step; /* -1, 0, 0: default */
    const char *profile_name;         /* NULL: not stored */
} edge_calibrate;

typedef struct edge_set_profile {
    const char *session_id;
    const char *profile_text, *profile_name; /* exactly one */
} edge_set_profile;

typedef struct edge_load {
    const char *session_id, *path; /* path: 1..1000 bytes, no control characters */
    int check_only;
} edge_load;

typedef struct edge_request {
    uint64_t request_id;
    uint32_t deadline_ms; /* 0: none given */
    edge_kind kind;
    union {
        struct {
            const uint8_t *payload;
            size_t len;
        } ping;
        edge_create create;
        edge_append append;
        edge_attend attend;
        struct {
            int n;
            edge_attend *items;
        } batch;
        edge_calibrate calibrate;
        edge_set_profile set_profile;
        const char *session_id;   /* drop; stats (NULL: server-wide) */
        const char *profile_name; /* delete_profile */
        edge_load load;           /* load_session */
        struct {
            const char *session_id; /* NULL with all */
            int all;
        } snapshot;
    } u;
    void *msg_;    /* the unpacked message, owner of every pointer above */
    void *alloc_;  /* its bounded allocator */
    void *frames_; /* the raw data frames' bookkeeping (and aligned copies), or NULL */
} edge_request;

/* Decodes len bytes (buf borrowed, read only during the call: req's tensors point into
 * the unpacked message it holds). Returns 0 and fills req, whose memory the caller then owns
 * (free with edge_request_free), or a Status number with a one-line message naming the field at
 * fault in msg; *request_id_p gets the request id whenever it could be read (else 0), so the error
 * response can carry it. On failure nothing needs freeing, and req->kind is the request's body when
 * the bytes parsed as a Request with every required field (a field was refused), else 0
 * (undecodable). */
int edge_decode(const void *buf, size_t len, size_t max_message, edge_request *req,
                uint64_t *request_id_p, char *msg, size_t msg_len);
/* Frees what a decode unpacked into req (the struct itself is the caller's); NULL is a
 * no-op. */
void edge_request_free(edge_request *req);

/* A reusable arena for edge_decode_in: a decode takes what it unpacks from one block
 * carved in order (no malloc once the block is large enough), and edge_request_free
 * hands it back. The block grows, at most to EDGE_ARENA_MAX bytes, to what the largest
 * request decoded so far needed; anything beyond comes from malloc as in edge_decode. One
 * request at a time per arena. */
#define EDGE_ARENA_MAX ((size_t)4 << 20)
typedef struct edge_arena edge_arena;
/* Caller owns the arena (free with edge_arena_destroy, after the last request decoded in it
 * is freed); NULL when out of memory. */
edge_arena *edge_arena_new(void);
/* Frees the arena; *arena_p becomes NULL. NULL is a no-op. */
void edge_arena_destroy(edge_arena **arena_p);
/* edge_decode with its memory from arena (borrowed; NULL: edge_decode itself); the same
 * limits, results and messages. */
int edge_decode_in(edge_arena *arena, const void *buf, size_t len, size_t max_message,
                   edge_request *req, uint64_t *request_id_p, char *msg, size_t msg_len);

/* Raw data frames (fasa.proto Tensor.data_frame, docs/protocol.md): the frames of a
 * multipart message after the Request's own, each the elements of exactly one Tensor
 * that names it (1 for the first). At most EDGE_MAX_FRAMES of them. */
#define EDGE_MAX_FRAMES 64
#define EDGE_MAX_FRAMES_TEXT "64"
typedef struct edge_frame {
    const void *data;
    size_t len;
} edge_frame;
/* edge_decode_in of a Request (buf, len) followed by n_frames raw data frames (frames
 * borrowed, and so is their memory, which the decoded tensors point into: it must outlive
 * req; a frame not aligned for its tensor's elements is copied, into memory req owns). The
 * same checks as inline data, on the frame's bytes: its size must be exactly the shape's,
 * finite values; a tensor naming a frame must have empty data; every frame must be named by
 * exactly one tensor; len plus the frames' bytes at most max_message. n_frames 0 is
 * edge_decode_in. */
int edge_decode_frames(edge_arena *arena, const void *buf, size_t len, const edge_frame *frames,
                       int n_frames, size_t max_message, edge_request *req, uint64_t *request_id_p,
                       char *msg, size_t msg_len);

/* The request id (field 2) of bytes that may not decode as a whole; 0 when not found. */
uint64_t edge_scan_request_id(const void *buf, size_t len);

#endif

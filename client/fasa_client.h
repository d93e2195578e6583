/* libfasa: the C client of a fasa-server (the wire protocol is proto/fasa.proto, v1).
 *
 * An inference engine creates a session per sequence, appends the post-RoPE keys and
 * values of its prompt, and at every decode step sends each layer's queries (optionally
 * with the step's new key and value) and gets the attention outputs back.
 *
 *   fasa_client *c;
 *   fasa_client_error err;
 *   if (fasa_client_connect("tcp://127.0.0.1:5555", 30000, &c, &err)) die(err.msg);
 *   (a server with --curve-secret: fasa_client_set_curve(c, server_pub, my_secret, NULL, &err))
 *   fasa_client_session_config cfg = {.geom = {32, 32, 8, 128}, .profile_text = text};
 *   fasa_client_create_session(c, "seq-1", &cfg, NULL, &err);
 *   fasa_client_append(c, "seq-1", &cfg.geom, -1, 0, n_prompt, k, v, NULL, &err);
 *   fasa_client_attend_req r = FASA_CLIENT_ATTEND_REQ_INIT;
 *   r.session_id = "seq-1"; r.geom = cfg.geom; r.layer = l; r.q = q; r.out = out;
 *   fasa_client_attend(c, &r, &err);
 *   fasa_client_close(&c);
 *
 * Every call returns a fasa_client_status (the values of the protocol's Status) and, when
 * it is not FASA_CLIENT_OK and err is not NULL, fills err with the code and a one-line
 * message (the server's message, or the client's own for local and transport failures).
 *
 * Tensors are float32 (selected positions int32) in the host's byte order, row-major;
 * the library supports little-endian hosts only (as the wire format).
 *
 * Thread safety: a fasa_client handle must be used by one thread at a time; give each
 * thread its own handle (handles share nothing). Requests on one handle are synchronous:
 * one request in flight, answered before the call returns. */
#ifndef FASA_CLIENT_H
#define FASA_CLIENT_H

#include <signal.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Status codes, equal to the protocol's Status values. */
typedef enum fasa_client_status {
    FASA_CLIENT_OK = 0,
    FASA_CLIENT_INVALID_ARGUMENT = 1,    /* a field is malformed or disagrees with the session */
    FASA_CLIENT_NOT_FOUND = 2,           /* no such session or profile */
    FASA_CLIENT_ALREADY_EXISTS = 3,      /* a session with this id exists */
    FASA_CLIENT_RESOURCE_EXHAUSTED = 4,  /* out of memory or a limit (here or on the server) */
    FASA_CLIENT_UNAUTHENTICATED = 5,     /* the client is not allowed in */
    FASA_CLIENT_FAILED_PRECONDITION = 6, /* valid, but not in this state */
    FASA_CLIENT_INTERNAL = 7,            /* a server bug, or a reply this client cannot use */
    FASA_CLIENT_UNAVAILABLE = 8,         /* no reply in time, or the server is shutting down */
} fasa_client_status;

#define FASA_CLIENT_MSG_MAX 512

/* The code and one-line message of a failed call. */
typedef struct fasa_client_error {
    fasa_client_status code;
    char msg[FASA_CLIENT_MSG_MAX];
} fasa_client_error;

/* Attention methods; DEFAULT means the session's default (or the server's, at create). */
typedef enum fasa_client_method {
    FASA_CLIENT_METHOD_DEFAULT = 0,
    FASA_CLIENT_METHOD_FASA = 1,      /* dominant-FC scoring, top-B, exact attention */
    FASA_CLIENT_METHOD_DENSE = 2,     /* exact attention over every visible key */
    FASA_CLIENT_METHOD_ORACLE = 3,    /* exact top-B by the full score */
    FASA_CLIENT_METHOD_STREAM = 4,    /* baseline: 8 sink tokens + the B - 8 most recent */
    FASA_CLIENT_METHOD_QUEST = 5,     /* baseline: top ceil(B/16) pages of 16 by key min/max */
    FASA_CLIENT_METHOD_SPARQ = 6,     /* baseline: top-B by the r largest |q| dims, mean value */
    FASA_CLIENT_METHOD_FASA_PLUS = 7, /* ours: fasa + sink, recent window, unselected mass */
} fasa_client_method;
#define FASA_CLIENT_METHOD_LAST FASA_CLIENT_METHOD_FASA_PLUS

/* Token selection under GQA; DEFAULT means the session's (per-head at create). */
typedef enum fasa_client_gqa {
    FASA_CLIENT_GQA_DEFAULT = 0,
    FASA_CLIENT_GQA_PER_HEAD = 1, /* each query head its own top-B */
    FASA_CLIENT_GQA_SHARED = 2,   /* one token set per KV head */
} fasa_client_gqa;

/* How a sparse step's shards combine (README "Local merge"). DEFAULT: an attend takes the
 * session's, a session EXACT. */
typedef enum fasa_client_merge {
    FASA_CLIENT_MERGE_DEFAULT = 0,
    /* Two round trips to the shards: the exact global top-B of each selection unit. */
    FASA_CLIENT_MERGE_EXACT = 1,
    /* One round trip: each of the S shards attends over its own top ceil(B (1 + eps) / S)
     * (eps: the server's --merge-eps, default 0.25) and the partial outputs are merged
     * exactly by their log-sum-exp. Methods FASA and ORACLE only (other methods run as
     * EXACT); selected positions are not returned (all -1). With 1 shard the same as EXACT. */
    FASA_CLIENT_MERGE_LOCAL = 2,
} fasa_client_merge;

/* RoPE pairing of a head's dims into frequency chunks; DEFAULT is INTERLEAVED. */
typedef enum fasa_client_pairing {
    FASA_CLIENT_PAIRING_DEFAULT = 0,
    FASA_CLIENT_PAIRING_INTERLEAVED = 1, /* FC i = dims (2i, 2i+1) */
    FASA_CLIENT_PAIRING_HALF = 2,        /* FC i = dims (i, i + head_dim/2) */
} fasa_client_pairing;

/* Storage dtype of a session's keys and values; DEFAULT is F32. F16 and BF16 halve the
 * memory held and the bytes read per step; tensors still travel as float and are rounded on
 * append (a value that would overflow F16, |x| >= 65520, is refused: INVALID_ARGUMENT). */
typedef enum fasa_client_dtype {
    FASA_CLIENT_DTYPE_DEFAULT = 0,
    FASA_CLIENT_DTYPE_F32 = 1,
    FASA_CLIENT_DTYPE_F16 = 2,
    FASA_CLIENT_DTYPE_BF16 = 3,
    FASA_CLIENT_DTYPE_I8 = 5, /* score_dtype only: int8 with one scale per row */
} fasa_client_dtype;

/* A session's geometry: it sizes every tensor the client sends or receives. */
typedef struct fasa_client_geometry {
    uint32_t n_layers, n_heads, n_kv_heads, head_dim;
} fasa_client_geometry;

typedef struct fasa_client fasa_client;

/* "OK", "INVALID_ARGUMENT", ... for a status; "UNKNOWN" for anything else (static strings,
 * borrowed). */
const char *fasa_client_status_name(fasa_client_status status);

/* Connects a DEALER socket to endpoint (e.g. "tcp://127.0.0.1:5555"; INVALID_ARGUMENT without
 * the transport). timeout_ms bounds the wait for each reply (<= 0: wait forever); a request
 * unanswered in time fails with UNAVAILABLE "no reply from ENDPOINT within N ms" and the socket
 * is reconnected (by the next request), so a late reply is never taken for the next one. A
 * request whose first connection attempt is refused (no server listens there) fails at once
 * with UNAVAILABLE "no server answered at ENDPOINT: the connection was refused ...".
 * Connecting does not contact the server (use fasa_client_ping). On success *client_p is a new
 * handle: caller owns it (free with fasa_client_close). endpoint is borrowed (copied). */
fasa_client_status fasa_client_connect(const char *endpoint, int timeout_ms, fasa_client **client_p,
                                       fasa_client_error *err);

/* A deadline sent with every later request (0: none, the default): a request that has
 * waited longer than deadline_ms in the server's queue is answered UNAVAILABLE without
 * running (the server's --deadline applies to requests without one). Useful with a reply
 * timeout: the server then skips work whose caller has given up. */
void fasa_client_set_deadline(fasa_client *c, uint32_t deadline_ms);

/* Turns on CURVE encryption and authentication for this handle, as a fasa-server started
 * with --curve-secret and --authorized-keys requires; call it right after
 * fasa_client_connect, before the first request. Keys are 40-character Z85 strings (the
 * one line of a `fasa keygen` file): server_key is the server's public key (its NAME.pub),
 * client_secret this client's secret key (its NAME.key) and client_public this client's
 * public key, or NULL to derive it from client_secret. The server admits the client when
 * its public key is one of the server's authorised keys.
 *
 * A server that refuses the handshake gets no request through: a call then fails with
 * UNAUTHENTICATED and a message saying why (key not authorised, CURVE on one side only, a
 * failed handshake), or, when the handshake just never completes (e.g. a wrong server_key),
 * with UNAVAILABLE "no reply ... the security handshake did not complete". A handle
 * without CURVE talking to a CURVE server fails the same way. INVALID_ARGUMENT when a key
 * is not Z85. */
fasa_client_status fasa_client_set_curve(fasa_client *c, const char *server_key,
                                         const char *client_secret, const char *client_public,
                                         fasa_client_error *err);

/* Changes the wait for each reply from now on (<= 0: wait forever). */
void fasa_client_set_timeout(fasa_client *c, int timeout_ms);

/* Closes the connection and frees the handle; sets *client_p to NULL. NULL is a no-op. */
void fasa_client_close(fasa_client **client_p);

/* Lets a signal handler abort a wait: when a signal interrupts the wait for a reply and
 * *flag is then non-zero, the call fails with UNAVAILABLE "interrupted" (and the socket is
 * reconnected). Without a flag (NULL, the default) interrupted waits simply go on. */
void fasa_client_set_interrupt_flag(fasa_client *c, volatile sig_atomic_t *flag);

/* The endpoint the handle was connected to (borrowed: valid while the handle lives). */
const char *fasa_client_endpoint(const fasa_client *c);

/* What a server says about itself. */
typedef struct fasa_client_server_info {
    uint32_t n_ranks;  /* MPI ranks in the job (1: the coordinator holds the shard) */
    uint32_t n_shards; /* shards each session is spread over */
    char version[64];  /* e.g. "fasa-server 0.1.0" (truncated to fit) */
} fasa_client_server_info;

/* Liveness check: a Ping whose payload the server must echo. info may be NULL. */
fasa_client_status fasa_client_ping(fasa_client *c, fasa_client_server_info *info,
                                    fasa_client_error *err);

/* Everything CreateSession takes. Zero-initialise, then set geom and what you need. */
typedef struct fasa_client_session_config {
    fasa_client_geometry geom;    /* n_layers 1..1024; n_heads a multiple of n_kv_heads */
    fasa_client_pairing pairing;  /* DEFAULT: interleaved */
    const char *profile_text;     /* the text of a profile file, or NULL */
    const char *profile_name;     /* a profile stored on the server, or NULL (not both) */
    fasa_client_method method;    /* DEFAULT: fasa with a profile, else dense */
    uint32_t budget;              /* default tokens kept per selection unit; 0: server's (256) */
    fasa_client_gqa gqa;          /* DEFAULT: per-head */
    int dense_layers_set;         /* 0: the server's default dense layers (layer 0 only) */
    const uint32_t *dense_layers; /* with dense_layers_set: n_dense_layers layer indices */
    size_t n_dense_layers;        /* (0 with dense_layers_set: no layer stays dense) */
    fasa_client_dtype dtype;      /* DEFAULT: f32 */
    /* The FASA scan's scoring store: F32, F16, BF16 or I8; DEFAULT: the dtype's key dims. */
    fasa_client_dtype score_dtype;
    int tier; /* 0: the server's --tier, 1: ram, 2: disk (proto Tier) */
    /* The merge of the session's sparse steps (an attend may ask for another); DEFAULT:
     * EXACT. Added after tier: a zeroed struct keeps the old behaviour. */
    fasa_client_merge merge;
} fasa_client_session_config;

/* Creates session session_id (1..128 printable ASCII bytes). n_shards_p, if not NULL, gets
 * the number of shards the session spans. */
fasa_client_status fasa_client_create_session(fasa_client *c, const char *session_id,
                                              const fasa_client_session_config *cfg,
                                              uint32_t *n_shards_p, fasa_client_error *err);

/* Drops a session and frees its keys and values on the server. */
fasa_client_status fasa_client_drop_session(fasa_client *c, const char *session_id,
                                            fasa_client_error *err);

/* Appends the keys and values of positions start_pos .. start_pos + n - 1 (start_pos must
 * be the layer's current length). layer >= 0: k and v are [n, n_kv_heads, head_dim];
 * layer -1: [n_layers, n, n_kv_heads, head_dim] for every layer (geom sizes them).
 * length_p, if not NULL, gets the layer's (layer 0's for -1) length afterwards. */
fasa_client_status fasa_client_append(fasa_client *c, const char *session_id,
                                      const fasa_client_geometry *geom, int32_t layer,
                                      uint64_t start_pos, uint64_t n, const float *k,
                                      const float *v, uint64_t *length_p, fasa_client_error *err);
/* The same with k and v of dtype F32, F16 or BF16 (uint16_t elements, IEEE binary16 or
 * bfloat16, little-endian): half the bytes on the wire, and rows of the session's own
 * dtype are stored as sent (bit for bit what an F32 append of the same values stores).
 * Every append's k and v of 64 KiB or more go as raw data frames (fasa.proto
 * Tensor.data_frame, which a server of this version or later takes): ZeroMQ sends them from
 * the caller's memory, without a copy, and the call returns only once ZeroMQ has let go of
 * them (or, past the timeout, after dropping the connection), so k and v are the caller's
 * again as soon as it returns. */
fasa_client_status fasa_client_append_dt(fasa_client *c, const char *session_id,
                                         const fasa_client_geometry *geom, int32_t layer,
                                         uint64_t start_pos, uint64_t n, fasa_client_dtype dtype,
                                         const void *k, const void *v, uint64_t *length_p,
                                         fasa_client_error *err);

/* Appends in flight: fasa_client_append_send sends an append and returns without waiting
 * for its reply, so the client prepares the next request while the server stores this one;
 * fasa_client_append_recv waits for the oldest one's reply (length_p: the layer's length
 * after it, may be NULL). At most FASA_CLIENT_APPEND_WINDOW may be in flight (send refuses
 * more with RESOURCE_EXHAUSTED), the caller's k and v are read before send returns, and
 * every other call is refused (INVALID_ARGUMENT) until they are all received. Each append
 * is acknowledged only once every worker holds its rows, and all or nothing: when one
 * fails, recv returns its error; the appends sent after it still get their replies
 * (appends are in order, so they fail on start_pos). fasa_client_append_pending says how
 * many are in flight. A lost connection abandons them all (the failing call says so; then
 * none is pending). */
#define FASA_CLIENT_APPEND_WINDOW 16
fasa_client_status fasa_client_append_send(fasa_client *c, const char *session_id,
                                           const fasa_client_geometry *geom, int32_t layer,
                                           uint64_t start_pos, uint64_t n, fasa_client_dtype dtype,
                                           const void *k, const void *v, fasa_client_error *err);
fasa_client_status fasa_client_append_recv(fasa_client *c, uint64_t *length_p,
                                           fasa_client_error *err);
int fasa_client_append_pending(const fasa_client *c);

/* Statistics of one attention step. */
typedef struct fasa_client_step_stats {
    fasa_client_method method_used; /* DENSE when every visible token fits the budget */
    uint32_t n_visible;             /* tokens visible to the step */
    uint64_t bytes_read;            /* KV bytes read on all shards */
    uint64_t server_us;             /* microseconds the server spent on the step */
} fasa_client_step_stats;

/* One decode step of one layer: inputs, then where the results go. Start from
 * FASA_CLIENT_ATTEND_REQ_INIT (all defaults, max_pos -1). */
typedef struct fasa_client_attend_req {
    const char *session_id;
    fasa_client_geometry geom; /* the session's (n_heads, n_kv_heads, head_dim are used) */
    uint32_t layer;
    const float *q;                /* [n_heads, head_dim] post-RoPE queries of position t */
    const float *k_new;            /* [n_kv_heads, head_dim] appended first, or NULL */
    const float *v_new;            /* [n_kv_heads, head_dim], with k_new */
    fasa_client_method method;     /* DEFAULT: the session's */
    uint32_t budget;               /* 0: the session's */
    fasa_client_gqa gqa;           /* DEFAULT: the session's */
    int64_t max_pos;               /* highest visible position; -1: every appended one */
    float *out;                    /* [n_heads, head_dim]: the attention outputs (required) */
    int32_t *selected;             /* NULL, or [n_heads, selected_budget]: chosen positions */
    uint32_t selected_budget;      /* columns of selected; 0: budget (then budget must be set) */
    fasa_client_step_stats *stats; /* NULL, or the step's statistics */
    fasa_client_merge merge;       /* DEFAULT: the session's (added last) */
} fasa_client_attend_req;

#define FASA_CLIENT_ATTEND_REQ_INIT                                                                \
    {                                                                                              \
        NULL, {0, 0, 0, 0}, 0, NULL, NULL, NULL, FASA_CLIENT_METHOD_DEFAULT, 0,                    \
            FASA_CLIENT_GQA_DEFAULT, -1, NULL, NULL, 0, NULL, FASA_CLIENT_MERGE_DEFAULT            \
    }

/* Runs one step (see fasa_client_attend_req). selected gets each head's positions best
 * first (every visible position ascending when they fit the budget), -1 padded; all -1
 * when the step ran dense. */
fasa_client_status fasa_client_attend(fasa_client *c, const fasa_client_attend_req *req,
                                      fasa_client_error *err);

/* The same step in two halves, so that an engine can do its own work while the service
 * runs it: fasa_client_attend_send checks and sends the request and returns at once;
 * fasa_client_attend_wait (with the same req, whose buffers must stay valid until then)
 * waits for the reply and writes the outputs into req->out (and selected, stats). Until the
 * wait returns, no other call may be made on this client (they fail with
 * FAILED_PRECONDITION); a failed send needs no wait. fasa_client_attend is send then wait.
 *
 * The hot path allocates nothing in libfasa once warm (ZeroMQ's own message buffers
 * aside): the request is packed into one of two buffers the client reuses, which ZeroMQ
 * sends without copying, and the reply is unpacked into an arena the client reuses; the
 * outputs are copied from there into req->out once. On a failed wait the outputs are not
 * written. */
fasa_client_status fasa_client_attend_send(fasa_client *c, const fasa_client_attend_req *req,
                                           fasa_client_error *err);
fasa_client_status fasa_client_attend_wait(fasa_client *c, const fasa_client_attend_req *req,
                                           fasa_client_error *err);

/* Where the last successful attend's time went, in microseconds: this client packing and
 * packing it (encode_us), waiting for the reply from handing it to ZeroMQ (wait_us: the network,
 * ZeroMQ and the whole server), and unpacking and checking it and copying the outputs (decode_us);
 * then the server's own figures (0 from a server that does not send them): queue_us (its I/O thread
 * to its main thread), server_decode_us (decoding and checking the request), server_us (the
 * engine's step), and inside it score_us (phase 1 on the shards, with k_new), merge_us (the
 * merges on rank 0) and attend_us (phase 2; a dense step's only phase, then with k_new). */
typedef struct fasa_client_timing {
    double encode_us, wait_us, decode_us;
    double queue_us, server_decode_us, server_us, score_us, merge_us, attend_us;
} fasa_client_timing;
void fasa_client_last_timing(const fasa_client *c, fasa_client_timing *out);

/* Runs n_items steps (1..4096, e.g. the layers of one step) in one round trip, in order.
 * Returns the status of the round trip; each item's own status and message go to
 * item_errs[i] (code FASA_CLIENT_OK and an empty message on success). A failed item writes
 * nothing to its buffers and changes nothing on the server. */
fasa_client_status fasa_client_batch_attend(fasa_client *c, size_t n_items,
                                            const fasa_client_attend_req *items,
                                            fasa_client_error *item_errs, fasa_client_error *err);

/* Calibration options. Zero-initialise; zero fields take the server's defaults. */
typedef struct fasa_client_calib_opts {
    fasa_client_pairing pairing; /* DEFAULT: interleaved */
    uint32_t ntip;               /* dominant FCs per head; 0: head_dim / 8 (at least 1) */
    uint32_t window;             /* CA window K; 0: 32 */
    uint32_t pos_begin;          /* sample positions [pos_begin, pos_end) by pos_step; */
    uint32_t pos_end;            /* pos_end 0: the last half of the tokens, step 1 */
    uint32_t pos_step;           /* 0: 1 */
    fasa_client_gqa gqa;         /* SHARED: one FC set per KV head; DEFAULT: per-head */
    const char *profile_name;    /* also store the profile on the server by this name */
} fasa_client_calib_opts;

/* Computes a profile from sample activations: q [n_layers, n_tokens, n_heads, head_dim]
 * and k [n_layers, n_tokens, n_kv_heads, head_dim]. On success *profile_text_p is the
 * profile file's text, NUL-terminated: caller owns it (free with free()). opts may be NULL. */
fasa_client_status fasa_client_calibrate(fasa_client *c, const fasa_client_geometry *geom,
                                         uint32_t n_tokens, const float *q, const float *k,
                                         const fasa_client_calib_opts *opts, char **profile_text_p,
                                         fasa_client_error *err);

/* Gives a session that holds no tokens yet a profile: exactly one of profile_text and
 * profile_name (a profile stored on the server) is not NULL. */
fasa_client_status fasa_client_set_profile(fasa_client *c, const char *session_id,
                                           const char *profile_text, const char *profile_name,
                                           fasa_client_error *err);

/* What one server rank holds (of every session, or of one: fasa_client_stats). Shard i of
 * every session lives on rank i + 1 of a multi-rank server, whose rank 0 (the coordinator)
 * holds no shard; a one-rank server is rank 0 holding the shard. Bytes count the rows
 * stored, by part: kdom_bytes + krest_bytes = v_bytes = rows x n_kv_heads x head_dim x the
 * storage dtype's size (4 for f32, 2 for f16 and bf16),
 * and summed over the ranks they equal kv_bytes. */
typedef struct fasa_client_rank_stats {
    uint32_t rank;
    uint32_t shards;      /* shards the rank holds: 1 on a worker, 0 on a coordinator */
    uint32_t sessions;    /* sessions with a shard on the rank */
    uint64_t tokens;      /* rows (token positions) of layer 0 held */
    uint64_t rows;        /* rows held, every layer */
    uint64_t kdom_bytes;  /* the profile's dominant key dims (what a fasa step scans) */
    uint64_t krest_bytes; /* the other key dims (all of K without a profile) */
    uint64_t v_bytes;     /* the values */
    uint64_t alloc_bytes; /* memory allocated for them (what --memory-limit counts) */
    uint64_t rss_bytes;   /* the rank's resident memory (0: not reported) */
} fasa_client_rank_stats;

/* Server-side times of the attend steps that ran one method (the method actually run, as
 * fasa_client_step_stats.method_used), in microseconds, as fasa_client_step_stats.server_us
 * measures them. p50/p90/p99 are nearest-rank estimates from a log-bucket histogram (about
 * 2% relative error); sum and max are exact. All 0 while count is 0. */
typedef struct fasa_client_latency {
    uint64_t count; /* steps timed */
    double sum_us, p50_us, p90_us, p99_us, max_us;
} fasa_client_latency;

/* Requests answered since start of one type: "ping", "create_session", "append", "attend",
 * "batch_attend", "calibrate", "set_profile", "drop_session", "stats", "shutdown", "snapshot",
 * "list_sessions", "delete_profile", or "undecodable" (bytes that are not a Request, or not
 * one payload frame). Failed requests count too; a
 * batch counts once as "batch_attend" (its items: fasa_client_stats.batch_items). */
typedef struct fasa_client_request_count {
    char type[32]; /* NUL-terminated */
    uint64_t count;
} fasa_client_request_count;

#define FASA_CLIENT_STATS_MAX_TYPES 32 /* request types kept (the server sends 14) */
#define FASA_CLIENT_STATS_MAX_CODES 16 /* status codes counted (the protocol has 0..8) */

/* One session as the server holds it. */
typedef struct fasa_client_session_info {
    char session_id[129];
    uint32_t n_layers, n_heads, n_kv_heads, head_dim;
    uint64_t length;   /* tokens held by layer 0 */
    uint64_t kv_bytes; /* bytes of keys and values, all layers */
    int has_profile;
    fasa_client_method method;          /* default method */
    uint32_t budget;                    /* default budget */
    size_t n_rank_stats;                /* entries of rank_stats */
    fasa_client_rank_stats *rank_stats; /* what each rank holds of the session, by rank
                                           (malloc'd: fasa_client_stats_free) */
    fasa_client_dtype dtype;            /* storage dtype of keys and values */
    fasa_client_pairing pairing;        /* the pairing it got (a profile's, if given) */
    fasa_client_gqa gqa;                /* default token selection */
    size_t n_dense_layers;              /* layers always dense under fasa (ascending): */
    uint32_t dense_layers[64];          /* the first 64 of them */
    fasa_client_dtype score_dtype;      /* the scan's score dtype (DEFAULT: not reported) */
    int tier;                           /* 1 ram, 2 disk (0: not reported) */
} fasa_client_session_info;

/* Server-wide statistics, and one session's when asked for. */
typedef struct fasa_client_stats {
    uint32_t n_ranks, n_shards, n_sessions, n_profiles;
    uint64_t requests;     /* answered since start */
    uint64_t errors;       /* of which not OK (failed batch items count one each) */
    uint64_t attend_steps; /* steps run; batch items count one each */
    uint64_t batch_items;  /* batch attend items received (run or failed) */
    uint64_t kv_bytes;     /* keys and values held, all sessions */
    double uptime_s;
    /* Requests by type (n_request_types entries, in the server's order). */
    size_t n_request_types;
    fasa_client_request_count requests_by_type[FASA_CLIENT_STATS_MAX_TYPES];
    /* Errors by status, indexed by fasa_client_status ([FASA_CLIENT_OK] is 0); they add up
     * to errors. */
    uint64_t errors_by_code[FASA_CLIENT_STATS_MAX_CODES];
    /* Step times, indexed by fasa_client_method: [FASA_CLIENT_METHOD_FASA] ..
     * [FASA_CLIENT_METHOD_LAST] ([FASA_CLIENT_METHOD_DEFAULT] stays 0). */
    fasa_client_latency latency[FASA_CLIENT_METHOD_LAST + 1];
    /* What each rank holds, every session: n_rank_stats entries by rank (n_ranks on a
     * multi-rank server, 1 on a one-rank server), malloc'd: fasa_client_stats_free. */
    size_t n_rank_stats;
    fasa_client_rank_stats *rank_stats;
    int has_session; /* 1 when session below is filled */
    fasa_client_session_info session;
} fasa_client_stats;

/* Server statistics into *stats; with session_id (or NULL), also that session's geometry,
 * length and holdings per rank (NOT_FOUND when there is no such session). The per-rank
 * arrays are allocated: caller owns them (free with fasa_client_stats_free once done, whatever
 * the call returned: stats is zeroed first, so that is always safe). */
fasa_client_status fasa_client_get_stats(fasa_client *c, const char *session_id,
                                         fasa_client_stats *stats, fasa_client_error *err);

/* Frees the arrays fasa_client_get_stats allocated in stats and zeroes their counts; stats
 * stays usable otherwise. NULL, a zeroed stats or one already freed is a no-op. */
void fasa_client_stats_free(fasa_client_stats *stats);

/* Decodes a serialised fasa.v1 Response carrying a StatsResult (bytes as the server sends
 * them) into *stats, as fasa_client_get_stats would: caller owns its arrays (free with
 * fasa_client_stats_free). For
 * programs that get the bytes another way (fasa-server's metrics endpoint). */
fasa_client_status fasa_client_stats_decode(const void *response, size_t len,
                                            fasa_client_stats *stats, fasa_client_error *err);

/* One session as fasa_client_list_sessions reports it. */
typedef struct fasa_client_session_summary {
    char session_id[129];
    fasa_client_geometry geom;
    uint64_t length;   /* tokens held by layer 0 */
    uint64_t kv_bytes; /* bytes of keys and values, all layers */
    fasa_client_dtype dtype;
    int has_profile;
} fasa_client_session_summary;

/* Every session the server holds (ordered by id) and the names of its stored profiles,
 * without asking the shards or writing anything. *sessions_p (n_sessions_p entries) and
 * *profile_names_p (n_profiles_p strings) are malloc'd, or NULL when empty: caller owns them
 * (free with fasa_client_list_free). profile_names_p and n_profiles_p may be NULL. */
fasa_client_status fasa_client_list_sessions(fasa_client *c,
                                             fasa_client_session_summary **sessions_p,
                                             size_t *n_sessions_p, char ***profile_names_p,
                                             size_t *n_profiles_p, fasa_client_error *err);
/* Frees what fasa_client_list_sessions returned; either array may be NULL. */
void fasa_client_list_free(fasa_client_session_summary *sessions, char **profile_names,
                           size_t n_profiles);

/* Deletes a profile stored on the server (fasa_client_calib_opts.profile_name), and its
 * saved file under the server's --state-dir; NOT_FOUND when there is none by that name. */
fasa_client_status fasa_client_delete_profile(fasa_client *c, const char *profile_name,
                                              fasa_client_error *err);

/* Asks the server to stop cleanly (every rank) once it has answered. */
fasa_client_status fasa_client_shutdown(fasa_client *c, fasa_client_error *err);

/* One session written by fasa_client_snapshot. */
typedef struct fasa_client_snapshot_info {
    char session_id[129]; /* the session */
    uint64_t length;      /* tokens of layer 0 in the snapshot */
    uint64_t bytes;       /* bytes of its shard files */
    char manifest[96];    /* the manifest's file name in the server's --state-dir */
} fasa_client_snapshot_info;

/* Asks the server to snapshot session_id, or with session_id NULL every session and the
 * named profiles, into its --state-dir (FAILED_PRECONDITION when it runs without one). The
 * first min(n, cap) sessions written go to infos (may be NULL with cap 0); *n_p gets n and
 * *n_profiles_p (may be NULL) the named profiles saved. */
fasa_client_status fasa_client_snapshot(fasa_client *c, const char *session_id,
                                        fasa_client_snapshot_info *infos, size_t cap, size_t *n_p,
                                        uint32_t *n_profiles_p, fasa_client_error *err);

/* What one worker (shard) did in fasa_client_load_session. */
typedef struct fasa_client_shard_load {
    uint32_t shard;
    uint64_t rows;       /* rows it stored (or checked), summed over layers */
    uint64_t file_bytes; /* bytes it read from the files */
    double read_s;       /* seconds it spent in file reads */
    double total_s;      /* seconds its part took */
} fasa_client_shard_load;

typedef struct fasa_client_load_result {
    uint64_t length;       /* tokens every layer holds now */
    uint64_t stored_bytes; /* K and V bytes stored (0 with check_only) */
    uint64_t file_bytes;   /* bytes read from the files, all workers */
    double seconds;        /* the load's wall time at the server's coordinator */
    char format[16];       /* "npy", "stacked" or "qkv1" */
    size_t n_shards;       /* shards reported (the first min(n, cap) are in shards[]) */
} fasa_client_load_result;

/* Fills the empty session session_id from files the server's workers read themselves
 * (LoadSession, README "Bulk load"): path is a directory (k_L.npy, v_L.npy per layer, or
 * k.npy, v.npy) or a QKV1 dump inside the server's --load-root, relative paths taken under
 * it. With check_only the files are read and checked and nothing is stored. shards (cap
 * entries, may be NULL with cap 0) gets each worker's figures. A failure stores nothing. */
fasa_client_status fasa_client_load_session(fasa_client *c, const char *session_id,
                                            const char *path, int check_only,
                                            fasa_client_load_result *res,
                                            fasa_client_shard_load *shards, size_t cap,
                                            fasa_client_error *err);

#ifdef __cplusplus
}
#endif

#endif

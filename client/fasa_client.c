/* libfasa: requests over a ZeroMQ DEALER socket, one in flight at a time, replies matched
 * by request_id and checked (status, body, tensor dtype/shape/size) before anything is
 * copied out to the caller. */
#include "fasa_client.h"

#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <zmq.h>

#include "fasa.pb-c.h"
#include "names.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "libfasa sends tensors in host byte order and supports little-endian hosts only"
#endif

#define PROTOCOL_VERSION 1
#define CLIENT_MAX_BYTES ((uint64_t)2 << 30) /* refuse requests over 2 GiB locally */
#define SERVER_DEFAULT_MAX ((uint64_t)256 << 20)

#define KEY_Z85_LEN 40 /* a Z85-encoded CURVE key */
/* Tensors of at least this many bytes travel as raw data frames (fasa.proto
 * Tensor.data_frame): sent from the caller's memory without a copy. Smaller ones are packed
 * into the Request, which costs less than waiting for ZeroMQ to let go of a frame. */
#define CLIENT_FRAME_MIN ((size_t)64 << 10)

struct fasa_client {
    void *ctx, *sock;
    void *mon; /* PAIR receiving sock's connection and handshake events, or NULL */
    char *endpoint;
    int timeout_ms;
    uint32_t deadline_ms; /* sent with every request; 0: none */
    uint64_t next_id;
    volatile sig_atomic_t *interrupt;
    int curve;                        /* 1: CURVE keys below are set */
    char server_key[KEY_Z85_LEN + 1]; /* the server's public key */
    char public_key[KEY_Z85_LEN + 1]; /* this client's */
    char secret_key[KEY_Z85_LEN + 1]; /* this client's */
    int connected, handshaken;        /* seen on the current socket (monitor events) */
    int up;                           /* connected now: no drop since the last connect */
    int lost;                         /* the connection dropped since the request was sent */
    unsigned serial;                  /* numbers the monitor endpoints */
    /* The attend hot path: reused buffers, so a decode loop allocates nothing here. */
    struct tx_slot {
        uint8_t *buf;
        size_t cap;
        atomic_int busy; /* 1 while ZeroMQ still holds buf (it clears it when sent) */
    } tx[2];
    struct arena {
        uint8_t *buf;
        size_t cap, used, spill; /* spill: bytes malloc'd past cap during one unpack */
    } arena;
    int pending;               /* an attend sent (fasa_client_attend_send) awaits its wait */
    uint64_t pending_rid;      /* its request_id */
    size_t pending_size;       /* its bytes */
    double t_sent;             /* when the last request went to ZeroMQ (us, monotonic) */
    fasa_client_timing timing; /* of the last attend */
    /* fasa_client_append_send: the appends in flight, oldest first (a ring). */
    uint64_t pend_id[FASA_CLIENT_APPEND_WINDOW];
    size_t pend_size[FASA_CLIENT_APPEND_WINDOW];
    int pend_head, n_pend;
    /* Raw data frames ZeroMQ still holds (the caller's memory, sent without a copy): a
     * request that sent some returns only once ZeroMQ let go of them all (s_frames_wait). */
    pthread_mutex_t held_mu;
    pthread_cond_t held_cv; /* on CLOCK_MONOTONIC */
    int held;
};

/* A raw data frame to send after the Request: the caller's bytes, borrowed. */
typedef struct raw_frame {
    const void *data;
    size_t len;
} raw_frame;

const char *fasa_client_status_name(fasa_client_status status)
{
    return fasa_names_status((int)status);
}

__attribute__((format(printf, 3, 4))) static fasa_client_status
s_fail(fasa_client_error *err, fasa_client_status code, const char *fmt, ...)
{
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        err->code = code;
        vsnprintf(err->msg, sizeof(err->msg), fmt, ap);
        va_end(ap);
        /* One line, whatever the text was made of. */
        for (char *p = err->msg; *p; p++)
            if (*p == '\n' || *p == '\r') *p = ' ';
    }
    return code;
}

static void s_ok(fasa_client_error *err)
{
    if (err) {
        err->code = FASA_CLIENT_OK;
        err->msg[0] = '\0';
    }
}

/* ---------------------------------------------------------------- connection ---- */

static void s_close_socket(fasa_client *c);

/* The events the client watches: whether a connection was made and how its security
 * handshake went, to tell "no server" from "the server does not let us in"; and whether
 * it dropped while a reply was awaited (a server that stopped or died), to say so at once
 * instead of waiting out the timeout. */
#define MON_EVENTS                                                                                 \
    (ZMQ_EVENT_CONNECTED | ZMQ_EVENT_HANDSHAKE_SUCCEEDED | ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL |  \
     ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL | ZMQ_EVENT_HANDSHAKE_FAILED_AUTH |                       \
     ZMQ_EVENT_DISCONNECTED | ZMQ_EVENT_CONNECT_RETRIED)

/* Starts the monitor of c->sock on a PAIR socket (before the socket connects, so that no
 * event is missed). Without it the client still works, with plainer messages. */
static void s_open_monitor(fasa_client *c)
{
    char addr[64];
    snprintf(addr, sizeof(addr), "inproc://fasa-client-monitor-%u", c->serial++);
    if (zmq_socket_monitor(c->sock, addr, MON_EVENTS)) return;
    c->mon = zmq_socket(c->ctx, ZMQ_PAIR);
    const int linger = 0;
    if (!c->mon || zmq_setsockopt(c->mon, ZMQ_LINGER, &linger, sizeof(linger)) ||
        zmq_connect(c->mon, addr)) {
        if (c->mon) zmq_close(c->mon);
        c->mon = NULL;
        zmq_socket_monitor(c->sock, NULL, 0);
    }
}

static int s_open_socket(fasa_client *c)
{
    c->sock = zmq_socket(c->ctx, ZMQ_DEALER);
    if (!c->sock) return -1;
    c->connected = c->handshaken = c->up = 0;
    const int linger = 0;
    const int rcvtimeo = c->timeout_ms > 0 ? c->timeout_ms : -1;
    const int sndtimeo = c->timeout_ms > 0 ? c->timeout_ms : -1;
    if (zmq_setsockopt(c->sock, ZMQ_LINGER, &linger, sizeof(linger)) ||
        zmq_setsockopt(c->sock, ZMQ_RCVTIMEO, &rcvtimeo, sizeof(rcvtimeo)) ||
        zmq_setsockopt(c->sock, ZMQ_SNDTIMEO, &sndtimeo, sizeof(sndtimeo)) ||
        (c->curve &&
         (zmq_setsockopt(c->sock, ZMQ_CURVE_SERVERKEY, c->server_key, KEY_Z85_LEN + 1) ||
          zmq_setsockopt(c->sock, ZMQ_CURVE_PUBLICKEY, c->public_key, KEY_Z85_LEN + 1) ||
          zmq_setsockopt(c->sock, ZMQ_CURVE_SECRETKEY, c->secret_key, KEY_Z85_LEN + 1)))) {
        const int e = errno;
        zmq_close(c->sock);
        c->sock = NULL;
        errno = e;
        return -1;
    }
    s_open_monitor(c);
    if (zmq_connect(c->sock, c->endpoint)) {
        const int e = errno;
        s_close_socket(c);
        errno = e;
        return -1;
    }
    return 0;
}

/* Reads one monitor event, never blocking: 1 with *event_p and *value_p, 0 when none. */
static int s_read_event(fasa_client *c, uint16_t *event_p, uint32_t *value_p)
{
    if (!c->mon) return 0;
    zmq_msg_t m;
    zmq_msg_init(&m);
    if (zmq_msg_recv(&m, c->mon, ZMQ_DONTWAIT) < 0) {
        zmq_msg_close(&m);
        return 0;
    }
    int ok = zmq_msg_size(&m) >= 6;
    if (ok) {
        memcpy(event_p, zmq_msg_data(&m), 2);
        memcpy(value_p, (const uint8_t *)zmq_msg_data(&m) + 2, 4);
    }
    while (zmq_msg_more(&m)) { /* the endpoint frame */
        zmq_msg_close(&m);
        zmq_msg_init(&m);
        if (zmq_msg_recv(&m, c->mon, ZMQ_DONTWAIT) < 0) break;
    }
    zmq_msg_close(&m);
    return ok;
}

/* Closes the socket and its monitor. The monitor is drained and stopped first: libzmq's
 * I/O thread would otherwise block on a full monitor queue. */
static void s_close_socket(fasa_client *c)
{
    uint16_t ev;
    uint32_t val;
    while (s_read_event(c, &ev, &val)) {
    }
    if (c->mon) {
        zmq_socket_monitor(c->sock, NULL, 0);
        zmq_close(c->mon);
        c->mon = NULL;
    }
    if (c->sock) zmq_close(c->sock);
    c->sock = NULL;
}

/* Drops the socket (and any reply still on its way to it); the next request connects a
 * fresh one. Nothing stays connected in between, so a server that refuses this client is
 * not retried while the caller does something else. */
static void s_reconnect(fasa_client *c)
{
    s_close_socket(c);
    c->n_pend = 0; /* the replies of appends in flight are lost with the socket */
}

fasa_client_status fasa_client_connect(const char *endpoint, int timeout_ms, fasa_client **client_p,
                                       fasa_client_error *err)
{
    if (!client_p) return s_fail(err, FASA_CLIENT_INVALID_ARGUMENT, "client_p: NULL");
    *client_p = NULL;
    if (!endpoint || !*endpoint)
        return s_fail(err, FASA_CLIENT_INVALID_ARGUMENT, "endpoint: empty");
    if (!strstr(endpoint, "://"))
        return s_fail(err, FASA_CLIENT_INVALID_ARGUMENT,
                      "endpoint '%s' names no transport: write tcp://%s (or ipc://PATH)", endpoint,
                      endpoint);
    fasa_client *c = calloc(1, sizeof(*c));
    if (!c || !(c->endpoint = strdup(endpoint)) || !(c->ctx = zmq_ctx_new())) {
        if (c) free(c->endpoint);
        free(c);
        return s_fail(err, FASA_CLIENT_RESOURCE_EXHAUSTED, "out of memory connecting to %s",
                      endpoint);
    }
    c->timeout_ms = timeout_ms > 0 ? timeout_ms : 0;
    c->next_id = 1;
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_mutex_init(&c->held_mu, NULL);
    pthread_cond_init(&c->held_cv, &ca);
    pthread_condattr_destroy(&ca);
    if (s_open_socket(c)) {
        const int e = errno;
        zmq_ctx_term(c->ctx);
        pthread_cond_destroy(&c->held_cv);
        pthread_mutex_destroy(&c->held_mu);
        free(c->endpoint);
        free(c);
        return s_fail(err, FASA_CLIENT_INVALID_ARGUMENT, "cannot connect to '%s': %s", endpoint,
                      zmq_strerror(e));
    }
    *client_p = c;
    s_ok(err);
    return FASA_CLIENT_OK;
}

void fasa_client_close(fasa_client **client_p)
{
    if (!client_p || !*client_p) return;
    fasa_client *c = *client_p;
    s_close_socket(c);
    zmq_ctx_term(c->ctx); /* after it, ZeroMQ holds none of the tx buffers */
    pthread_cond_destroy(&c->held_cv);
    pthread_mutex_destroy(&c->held_mu);
    memset(c->secret_key, 0, sizeof(c->secret_key));
    free(c->endpoint);
    for (int i = 0; i < 2; i++) free(c->tx[i].buf);
    free(c->arena.buf);
    free(c);
    *client_p = NULL;
}

static int s_key_ok(const char *k)
{
    static const char z85[] = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                              ".-:+=^!/*?&<>()[]{}@%$#";
    if (!k || strlen(k) != KEY_Z85_LEN) return 0;
    for (const char *p = k; *p; p++)
        if (!strchr(z85, *p)) return 0;
    return 1;
}

fasa_client_status fasa_client_set_curve(fasa_client *c, const char *server_key,
                                         const char *client_secret, const char *client_public,
                                         fasa_client_error *err)
{
    if (!c) return s_fail(err, FASA_CLIENT_INVALID_ARGUMENT, "client: NULL");
    const char *bad = !s_key_ok(server_key)                       ? "server_key"
                      : !s_key_ok(client_secret)                  ? "client_secret"
                      : client_public && !s_key_ok(client_public) ? "client_public"
                                                                  : NULL;
    if (bad)
        return s_fail(err, FASA_CLIENT_INVALID_ARGUMENT,
                      "%s: not a CURVE key (40 Z85 characters, as 'fasa keygen' writes)", bad);
    char derived[KEY_Z85_LEN + 1];
    if (!client_public) {
        if (zmq_curve_public(derived, client_secret))
            return s_fail(err, FASA_CLIENT_INVALID_ARGUMENT,
                          "client_secret: cannot derive the public key: %s", zmq_strerror(errno));
        client_public = derived;
    }
    memcpy(c->server_key, server_key, KEY_Z85_LEN + 1);
    memcpy(c->secret_key, client_secret, KEY_Z85_LEN + 1);
    memcpy(c->public_key, client_public, KEY_Z85_LEN + 1);
    c->curve = 1;
    /* The socket made by fasa_client_connect is plain: the next request opens a CURVE one. */
    s_reconnect(c);
    s_ok(err);
    return FASA_CLIENT_OK;
}

void fasa_client_set_deadline(fasa_client *c, uint32_t deadline_ms)
{
    if (c) c->deadline_ms = deadline_ms;
}

void fasa_client_set_timeout(fasa_client *c, int timeout_ms)
{
    if (!c) return;
    c->timeout_ms = timeout_ms > 0 ? timeout_ms : 0;
    const int t = c->timeout_ms > 0 ? c->timeout_ms : -1;
    if (c->sock) {
        zmq_setsockopt(c->sock, ZMQ_RCVTIMEO, &t, sizeof(t));
        zmq_setsockopt(c->sock, ZMQ_SNDTIMEO, &t, sizeof(t));
    }
}

void fasa_client_set_interrupt_flag(fasa_client *c, volatile sig_atomic_t *flag)
{
    if (c) c->interrupt = flag;
}

const char *fasa_client_endpoint(const fasa_client *c)
{
    return c ? c->endpoint : "";
}

static int64_t s_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void s_free_buf(void *data, void *hint)
{
    (void)hint;
    free(data);
}

/* The name of a request body, for messages. */
static const char *s_body_name(Fasa__V1__Request__BodyCase body)
{
    switch (body) {
    case FASA__V1__REQUEST__BODY_PING:
        return "ping";
    case FASA__V1__REQUEST__BODY_CREATE_SESSION:
        return "create_session";
    case FASA__V1__REQUEST__BODY_APPEND:
        return "append";
    case FASA__V1__REQUEST__BODY_ATTEND:
        return "attend";
    case FASA__V1__REQUEST__BODY_BATCH_ATTEND:
        return "batch_attend";
    case FASA__V1__REQUEST__BODY_CALIBRATE:
        return "calibrate";
    case FASA__V1__REQUEST__BODY_SET_PROFILE:
        return "set_profile";
    case FASA__V1__REQUEST__BODY_DROP_SESSION:
        return "drop_session";
    case FASA__V1__REQUEST__BODY_STATS:
        return "stats";
    case FASA__V1__REQUEST__BODY_SHUTDOWN:
        return "shutdown";
    case FASA__V1__REQUEST__BODY_SNAPSHOT:
        return "snapshot";
    case FASA__V1__REQUEST__BODY_LIST_SESSIONS:
        return "list_sessions";
    case FASA__V1__REQUEST__BODY_DELETE_PROFILE:
        return "delete_profile";
    case FASA__V1__REQUEST__BODY_LOAD_SESSION:
        return "load_session";
    default:
        return "request";
    }
}

/* Reads the monitor's events; a handshake the server refused (or one between a CURVE and
 * a plain peer) fails the request at once, with UNAUTHENTICATED, instead of waiting out
 * the timeout while ZeroMQ retries; so does a server gone before the request reached it.
 * sent: 0 for the events from before the request is sent, 1 while its reply is awaited. */
static fasa_client_status s_check_events(fasa_client *c, int sent, fasa_client_error *err)
{
    uint16_t ev;
    uint32_t val;
    while (s_read_event(c, &ev, &val)) {
        if (ev == ZMQ_EVENT_CONNECTED) c->connected = c->up = 1;
        /* The first connection attempt failed (nothing listens there: refused, or no such
         * ipc path): say so now rather than wait out the timeout. */
        if (ev == ZMQ_EVENT_CONNECT_RETRIED && !c->connected)
            return s_fail(err, FASA_CLIENT_UNAVAILABLE,
                          "no server answered at %s: the connection was refused (is fasa-server "
                          "running there?)",
                          c->endpoint);
        /* The connection dropped before this request was sent (an idle client whose server
         * died) and the attempt to connect again failed: the request waits in ZeroMQ's
         * queue for a server that is gone. Before the send (sent 0) the drop is only
         * noted: a server that came back takes the request. */
        if (ev == ZMQ_EVENT_CONNECT_RETRIED && !c->up && sent && !c->lost)
            return s_fail(err, FASA_CLIENT_UNAVAILABLE,
                          "the connection to %s dropped before the request was sent and the "
                          "server does not answer again (the connection was refused): it "
                          "stopped or died; the request did not run",
                          c->endpoint);
        if (ev == ZMQ_EVENT_HANDSHAKE_SUCCEEDED) c->handshaken = 1;
        /* After a handshake that worked: the server went away (a refusal mid-handshake is
         * told apart below). */
        if (ev == ZMQ_EVENT_DISCONNECTED) c->up = 0;
        if (ev == ZMQ_EVENT_DISCONNECTED && c->handshaken) c->lost = 1;
        if (ev == ZMQ_EVENT_HANDSHAKE_FAILED_AUTH)
            return s_fail(err, FASA_CLIENT_UNAUTHENTICATED,
                          "%s refused this client (ZAP status %u): %s", c->endpoint, (unsigned)val,
                          c->curve ? "its public key is not in the server's --authorized-keys"
                                   : "the server requires CURVE keys (--curve-server-key, "
                                     "--curve-secret)");
        if (ev == ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL &&
            val == ZMQ_PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH)
            return s_fail(err, FASA_CLIENT_UNAUTHENTICATED, "%s: %s", c->endpoint,
                          c->curve ? "the server does not use CURVE; connect without "
                                     "--curve-server-key/--curve-secret"
                                   : "the server requires CURVE: give --curve-server-key FILE "
                                     "(the server's public key) and --curve-secret FILE (this "
                                     "client's authorised key)");
        if (ev == ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL)
            return s_fail(err, FASA_CLIENT_UNAUTHENTICATED,
                          "%s: the security handshake failed (protocol error 0x%x)%s", c->endpoint,
                          (unsigned)val,
                          c->curve ? "; check --curve-server-key: it must be the server's "
                                     "public key"
                                   : "");
        /* NO_DETAIL: the server dropped the connection mid-handshake. It does that to a
         * plain client (it requires CURVE) and to a CURVE client whose server key is
         * wrong (it cannot decrypt the hello). After a handshake that worked on this
         * socket it is rather a server going away: the wait goes on (ZeroMQ retries). */
        if (ev == ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL && !c->handshaken)
            return s_fail(err, FASA_CLIENT_UNAUTHENTICATED,
                          "%s closed the connection during the security handshake (%s): %s",
                          c->endpoint, zmq_strerror((int)val),
                          c->curve ? "check --curve-server-key: it must be the server's public "
                                     "key (its 'fasa keygen' NAME.pub)"
                                   : "the server probably requires CURVE: give "
                                     "--curve-server-key FILE and --curve-secret FILE");
    }
    return FASA_CLIENT_OK;
}

static double s_now_us(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return 1e6 * (double)t.tv_sec + 1e-3 * (double)t.tv_nsec;
}

/* ZeroMQ is done with a tx buffer (it may call this from its I/O thread). */
static void s_tx_done(void *data, void *hint)
{
    (void)data;
    atomic_store((atomic_int *)hint, 0);
}

/* ZeroMQ is done with a raw data frame (from its I/O thread, or from the send's own close). */
static void s_frame_done(void *data, void *hint)
{
    (void)data;
    fasa_client *c = hint;
    pthread_mutex_lock(&c->held_mu);
    c->held--;
    pthread_cond_broadcast(&c->held_cv);
    pthread_mutex_unlock(&c->held_mu);
}

/* Waits until ZeroMQ holds none of the caller's frames (it lets go of a frame once its
 * last byte is written to the connection). 0, or -1 when that took longer than the
 * client's timeout, or the caller interrupted it: then the socket was closed, which makes
 * ZeroMQ drop what it still held, and this waited until it had (so the caller's memory is
 * its own again either way). */
static int s_frames_wait(fasa_client *c)
{
    int rc = 0, closed = 0;
    const int64_t deadline = c->timeout_ms > 0 ? s_now_ms() + c->timeout_ms : 0;
    pthread_mutex_lock(&c->held_mu);
    while (c->held > 0) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        ts.tv_nsec += 100 * 1000000L; /* in slices, to see an interrupt */
        if (ts.tv_nsec >= 1000000000L) ts.tv_sec++, ts.tv_nsec -= 1000000000L;
        pthread_cond_timedwait(&c->held_cv, &c->held_mu, &ts);
        if (c->held > 0 && !closed &&
            ((deadline && s_now_ms() > deadline) || (c->interrupt && *c->interrupt))) {
            pthread_mutex_unlock(&c->held_mu);
            s_reconnect(c); /* linger 0: ZeroMQ discards the frames, and lets go of them */
            pthread_mutex_lock(&c->held_mu);
            closed = 1;
            rc = -1;
        }
    }
    pthread_mutex_unlock(&c->held_mu);
    return rc;
}

/* A reused buffer of at least size bytes that ZeroMQ does not hold, or NULL (then the
 * caller mallocs). Grown only while free. */
static struct tx_slot *s_tx_slot(fasa_client *c, size_t size)
{
    for (int i = 0; i < 2; i++) {
        struct tx_slot *t = &c->tx[i];
        if (atomic_load(&t->busy)) continue;
        if (t->cap < size) {
            uint8_t *b = realloc(t->buf, size);
            if (!b) return NULL;
            t->buf = b;
            t->cap = size;
        }
        return t;
    }
    return NULL;
}

/* The unpack allocator of the attend path: a bump arena reset per reply; what does not fit
 * is malloc'd and counted, and the arena grows by that much for the next reply. */
static void *s_arena_alloc(void *data, size_t size)
{
    struct arena *a = data;
    const size_t n = (size + 15) & ~(size_t)15;
    if (a->used + n <= a->cap) {
        void *p = a->buf + a->used;
        a->used += n;
        return p;
    }
    a->spill += n;
    return malloc(size ? size : 1);
}

static void s_arena_free(void *data, void *p)
{
    const struct arena *a = data;
    if (p && !((uint8_t *)p >= a->buf && (uint8_t *)p < a->buf + a->cap)) free(p);
}

/* After a reply unpacked into the arena is freed: room for a bigger one next time. */
static void s_arena_reset(struct arena *a)
{
    if (a->spill) {
        const size_t cap = a->cap + a->spill + 1024;
        uint8_t *b = realloc(a->buf, cap);
        if (b) a->buf = b, a->cap = cap;
    }
    a->used = a->spill = 0;
}

/* Sends req (version and id filled here), then the n_frames raw data frames its tensors
 * name (borrowed: sent from where they are, and ZeroMQ has let go of them when this
 * returns); *size_p gets the bytes of all. With reuse, the request is packed into one of the
 * client's buffers that ZeroMQ sends without a copy. */
static fasa_client_status s_send_req(fasa_client *c, Fasa__V1__Request *req, int reuse,
                                     const raw_frame *frames, int n_frames, size_t *size_p,
                                     fasa_client_error *err)
{
    const char *what = s_body_name(req->body_case);
    if (!c) return s_fail(err, FASA_CLIENT_INVALID_ARGUMENT, "client: NULL");
    if (c->pending)
        return s_fail(err, FASA_CLIENT_FAILED_PRECONDITION,
                      "%s: an attend sent with fasa_client_attend_send awaits "
                      "fasa_client_attend_wait",
                      what);
    if (c->n_pend && req->body_case != FASA__V1__REQUEST__BODY_APPEND)
        return s_fail(err, FASA_CLIENT_FAILED_PRECONDITION,
                      "%s: %d appends are in flight: collect them with fasa_client_append_recv "
                      "first",
                      what, c->n_pend);
    if (!c->sock && s_open_socket(c))
        return s_fail(err, FASA_CLIENT_UNAVAILABLE, "cannot reconnect to %s: %s", c->endpoint,
                      zmq_strerror(errno));
    /* Events from before this request (an idle connection that dropped and came back)
     * say nothing about it: only a drop after the send loses its reply. */
    const fasa_client_status stale = s_check_events(c, 0, err);
    if (stale != FASA_CLIENT_OK) {
        s_reconnect(c);
        return stale;
    }
    c->lost = 0;
    req->protocol_version = PROTOCOL_VERSION;
    req->request_id = c->next_id++;
    req->has_deadline_ms = c->deadline_ms > 0;
    req->deadline_ms = c->deadline_ms;
    const size_t size = fasa__v1__request__get_packed_size(req);
    uint64_t total = size;
    for (int i = 0; i < n_frames; i++) total += frames[i].len;
    *size_p = (size_t)total;
    if (total > CLIENT_MAX_BYTES)
        return s_fail(err, FASA_CLIENT_RESOURCE_EXHAUSTED,
                      "%s: request of %llu bytes exceeds the client limit of 2 GiB; send less "
                      "per request",
                      what, (unsigned long long)total);
    struct tx_slot *slot = reuse ? s_tx_slot(c, size ? size : 1) : NULL;
    uint8_t *buf = slot ? slot->buf : malloc(size ? size : 1);
    if (!buf)
        return s_fail(err, FASA_CLIENT_RESOURCE_EXHAUSTED, "%s: out of memory for %zu bytes", what,
                      size);
    fasa__v1__request__pack(req, buf);
    zmq_msg_t msg;
    if (slot) atomic_store(&slot->busy, 1);
    if (slot ? zmq_msg_init_data(&msg, buf, size, s_tx_done, &slot->busy)
             : zmq_msg_init_data(&msg, buf, size, s_free_buf, NULL)) {
        if (slot)
            atomic_store(&slot->busy, 0);
        else
            free(buf);
        return s_fail(err, FASA_CLIENT_RESOURCE_EXHAUSTED, "%s: out of memory for %zu bytes", what,
                      size);
    }
    c->t_sent = s_now_us(); /* the wait counts from here: the server cannot answer earlier */
    int e = 0;
    if (zmq_msg_send(&msg, c->sock, n_frames ? ZMQ_SNDMORE : 0) < 0) {
        e = errno;
        zmq_msg_close(&msg);
    }
    /* The frames after it, each from the caller's memory; a frame that cannot be sent is
     * closed (ZeroMQ lets go of it at once) and the socket with the rest of the message. */
    for (int i = 0; i < n_frames && !e; i++) {
        zmq_msg_t f;
        pthread_mutex_lock(&c->held_mu);
        c->held++;
        pthread_mutex_unlock(&c->held_mu);
        if (zmq_msg_init_data(&f, (void *)(uintptr_t)frames[i].data, frames[i].len, s_frame_done,
                              c)) {
            e = errno ? errno : ENOMEM;
            s_frame_done(NULL, c);
            break;
        }
        if (zmq_msg_send(&f, c->sock, i + 1 < n_frames ? ZMQ_SNDMORE : 0) < 0) {
            e = errno;
            zmq_msg_close(&f);
        }
    }
    if (e) s_reconnect(c);
    const int stuck = n_frames ? s_frames_wait(c) : 0;
    if (e)
        return s_fail(err, FASA_CLIENT_UNAVAILABLE, "cannot send to %s: %s", c->endpoint,
                      zmq_strerror(e));
    if (stuck)
        return s_fail(err, FASA_CLIENT_UNAVAILABLE,
                      "%s: the %llu bytes of the request could not be sent to %s within %d ms "
                      "(or the wait was interrupted); the connection was dropped",
                      what, (unsigned long long)total, c->endpoint, c->timeout_ms);
    return FASA_CLIENT_OK;
}

/* Waits for the reply to request rid (what: its body's name; size: its bytes). On OK,
 * *resp_p is the unpacked Response (status OK, body == want; want NOT_SET accepts any
 * body), unpacked with alloc (NULL: malloc) and to be freed with
 * fasa__v1__response__free_unpacked(resp, alloc). */
static fasa_client_status s_recv_resp(fasa_client *c, uint64_t rid, const char *what, size_t size,
                                      Fasa__V1__Response__BodyCase want, ProtobufCAllocator *alloc,
                                      Fasa__V1__Response **resp_p, fasa_client_error *err)
{
    *resp_p = NULL;
    const int64_t deadline = c->timeout_ms > 0 ? s_now_ms() + c->timeout_ms : 0;
    for (;;) {
        long wait = -1;
        if (c->timeout_ms > 0) {
            wait = (long)(deadline - s_now_ms());
            if (wait < 0) wait = 0;
        }
        zmq_pollitem_t items[2] = {{c->sock, 0, ZMQ_POLLIN, 0}, {c->mon, 0, ZMQ_POLLIN, 0}};
        const int rc = zmq_poll(items, c->mon ? 2 : 1, wait);
        if (rc < 0 && errno == EINTR) {
            if (c->interrupt && *c->interrupt) {
                s_reconnect(c);
                return s_fail(err, FASA_CLIENT_UNAVAILABLE,
                              "interrupted while waiting for a reply from %s", c->endpoint);
            }
            continue;
        }
        if (rc < 0) {
            const int e = errno;
            s_reconnect(c);
            return s_fail(err, FASA_CLIENT_UNAVAILABLE, "waiting for %s: %s", c->endpoint,
                          zmq_strerror(e));
        }
        if (c->mon && (items[1].revents & ZMQ_POLLIN)) {
            const fasa_client_status st = s_check_events(c, 1, err);
            if (st != FASA_CLIENT_OK) {
                s_reconnect(c);
                return st;
            }
            /* A reply that came in before the drop is still read. */
            if (c->lost && !(items[0].revents & ZMQ_POLLIN)) {
                zmq_pollitem_t again = {c->sock, 0, ZMQ_POLLIN, 0};
                if (zmq_poll(&again, 1, 0) <= 0) {
                    s_reconnect(c);
                    return s_fail(err, FASA_CLIENT_UNAVAILABLE,
                                  "the connection to %s was lost while waiting for the %s reply "
                                  "(the server stopped or died; the request may or may not "
                                  "have run)",
                                  c->endpoint, what);
                }
                items[0].revents = ZMQ_POLLIN;
            }
            if (!(items[0].revents & ZMQ_POLLIN)) continue;
        }
        if (rc == 0) {
            if (c->connected && !c->handshaken) {
                s_reconnect(c);
                return s_fail(err, FASA_CLIENT_UNAVAILABLE,
                              "no reply from %s within %d ms: connected, but the security "
                              "handshake did not complete (if the server requires CURVE, check "
                              "--curve-server-key/--curve-secret: the server's public key)",
                              c->endpoint, c->timeout_ms);
            }
            s_reconnect(c);
            if ((uint64_t)size > SERVER_DEFAULT_MAX)
                return s_fail(err, FASA_CLIENT_UNAVAILABLE,
                              "no reply from %s within %d ms (the %s request was %zu bytes; a "
                              "server drops messages over its --max-message, 256 MiB by default)",
                              c->endpoint, c->timeout_ms, what, size);
            return s_fail(err, FASA_CLIENT_UNAVAILABLE, "no reply from %s within %d ms",
                          c->endpoint, c->timeout_ms);
        }
        /* Read every frame of the message; the last one is the Response (a REQ-shaped
         * reply would carry an empty delimiter first). */
        zmq_msg_t part;
        zmq_msg_init(&part);
        int more = 1, failed = 0;
        while (more) {
            zmq_msg_close(&part);
            zmq_msg_init(&part);
            if (zmq_msg_recv(&part, c->sock, ZMQ_DONTWAIT) < 0) {
                failed = errno;
                break;
            }
            more = zmq_msg_more(&part);
        }
        if (failed) {
            zmq_msg_close(&part);
            if (failed == EAGAIN || failed == EINTR) continue;
            s_reconnect(c);
            return s_fail(err, FASA_CLIENT_UNAVAILABLE, "receiving from %s: %s", c->endpoint,
                          zmq_strerror(failed));
        }
        Fasa__V1__Response *resp =
            fasa__v1__response__unpack(alloc, zmq_msg_size(&part), zmq_msg_data(&part));
        const size_t got = zmq_msg_size(&part);
        zmq_msg_close(&part);
        if (!resp) {
            s_reconnect(c);
            return s_fail(err, FASA_CLIENT_INTERNAL,
                          "bad reply from %s: %zu bytes that do not decode as a Response",
                          c->endpoint, got);
        }
        /* A reply to an earlier request (given up on, then answered late): drop it. Id 0
         * is the server's answer to bytes it could not read, and only ours are in flight. */
        if (resp->request_id != rid &&
            !(resp->request_id == 0 && resp->status != FASA__V1__STATUS__OK)) {
            fasa__v1__response__free_unpacked(resp, alloc);
            continue;
        }
        if (resp->protocol_version != PROTOCOL_VERSION) {
            const unsigned v = resp->protocol_version;
            fasa__v1__response__free_unpacked(resp, alloc);
            return s_fail(err, FASA_CLIENT_INTERNAL,
                          "bad reply from %s: protocol_version %u, expected %d", c->endpoint, v,
                          PROTOCOL_VERSION);
        }
        if (resp->status != FASA__V1__STATUS__OK) {
            const unsigned st = (unsigned)resp->status;
            fasa_client_status code =
                st <= FASA_CLIENT_UNAVAILABLE ? (fasa_client_status)st : FASA_CLIENT_INTERNAL;
            if (resp->message && *resp->message)
                s_fail(err, code, "%s%s",
                       st == (unsigned)code ? "" : "unknown status: ", resp->message);
            else
                s_fail(err, code, "%s from %s (no message)",
                       fasa_client_status_name((fasa_client_status)st), c->endpoint);
            fasa__v1__response__free_unpacked(resp, alloc);
            return code;
        }
        if (want != FASA__V1__RESPONSE__BODY__NOT_SET && resp->body_case != want) {
            const int bc = (int)resp->body_case;
            fasa__v1__response__free_unpacked(resp, alloc);
            return s_fail(err, FASA_CLIENT_INTERNAL,
                          "bad reply from %s: body %d answers the %s request (expected %d)",
                          c->endpoint, bc, what, (int)want);
        }
        *resp_p = resp;
        s_ok(err);
        return FASA_CLIENT_OK;
    }
}

/* Sends req (version and id filled here) and waits for its reply. On OK, *resp_p is the
 * unpacked Response (status OK, body == want; want NOT_SET accepts any body), to be freed
 * with fasa__v1__response__free_unpacked. */
static fasa_client_status s_call_frames(fasa_client *c, Fasa__V1__Request *req,
                                        const raw_frame *frames, int n_frames,
                                        Fasa__V1__Response__BodyCase want,
                                        Fasa__V1__Response **resp_p, fasa_client_error *err);
static fasa_client_status s_call(fasa_client *c, Fasa__V1__Request *req,
                                 Fasa__V1__Response__BodyCase want, Fasa__V1__Response **resp_p,
                                 fasa_client_error *err)
{
    return s_call_frames(c, req, NULL, 0, want, resp_p, err);
}

/* s_call of a request followed by raw data frames (s_send_req). */
static fasa_client_status s_call_frames(fasa_client *c, Fasa__V1__Request *req,
                                        const raw_frame *frames, int n_frames,
                                        Fasa__V1__Response__BodyCase want,
                                        Fasa__V1__Response **resp_p, fasa_client_error *err)
{
    *resp_p = NULL;
    if (c && c->n_pend)
        return s_fail(err, FASA_CLIENT_INVALID_ARGUMENT,
                      "%s: %d appends are in flight: collect them with fasa_client_append_recv "
                      "first",
                      s_body_name(req->body_case), c->n_pend);
    size_t size = 0;
    const fasa_client_status st = s_send_req(c, req, 0, frames, n_frames, &size, err);
    if (st) return st;
    return s_recv_resp(c, req->request_id, s_body_name(req->body_case), size, want, NULL, resp_p,
                       err);
}

/* A request whose OK response carries no body (DropSession, SetProfile, Shutdown). */
static fasa_client_status s_call_no_body(fasa_client *c, Fasa__V1__Request *req,
                                         fasa_client_error *err)
{
    Fasa__V1__Response *resp;
    const fasa_client_status st = s_call(c, req, FASA__V1__RESPONSE__BODY__NOT_SET, &resp, err);
    if (st) return st;
    fasa__v1__response__free_unpacked(resp, NULL);
    return FASA_CLIENT_OK;
}

/* ---------------------------------------------------------------- tensors ---- */

typedef struct tensor_buf {
    Fasa__V1__Tensor t;
    uint64_t shape[4];
} tensor_buf;

/* Fills tb as a tensor viewing data (not copied; it is only read while packing). */
static fasa_client_status s_tensor(tensor_buf *tb, Fasa__V1__DType dtype, int n_dims,
                                   const uint64_t *shape, const void *data, const char *field,
                                   fasa_client_error *err)
{
    fasa__v1__tensor__init(&tb->t);
    uint64_t bytes = dtype == FASA__V1__DTYPE__F16 || dtype == FASA__V1__DTYPE__BF16 ? 2 : 4;
    for (int i = 0; i < n_dims; i++) {
        tb->shape[i] = shape[i];
        if (shape[i] && bytes > CLIENT_MAX_BYTES / shape[i])
            return s_fail(err, FASA_CLIENT_RESOURCE_EXHAUSTED,
                          "%s: tensor over 2 GiB, the client limit; send less per request", field);
        bytes *= shape[i];
    }
    if (bytes > CLIENT_MAX_BYTES)
        return s_fail(err, FASA_CLIENT_RESOURCE_EXHAUSTED,
                      "%s: tensor of %llu bytes exceeds the client limit of 2 GiB", field,
                      (unsigned long long)bytes);
    if (bytes && !data) return s_fail(err, FASA_CLIENT_INVALID_ARGUMENT, "%s: NULL", field);
    tb->t.dtype = dtype;
    tb->t.n_shape = (size_t)n_dims;
    tb->t.shape = tb->shape;
    tb->t.data.len = (size_t)bytes;
    tb->t.data.data = (uint8_t *)(uintptr_t)data; /* packing only reads it */
    return FASA_CLIENT_OK;
}

static void s_shape_text(char *buf, size_t len, size_t n, const uint64_t *shape)
{
    size_t k = (size_t)snprintf(buf, len, "[");
    for (size_t i = 0; i < n && k < len; i++)
        k += (size_t)snprintf(buf + k, len - k, "%s%llu", i ? ", " : "",
                              (unsigned long long)shape[i]);
    if (k < len) snprintf(buf + k, len - k, "]");
}

/* Checks a reply tensor: present, dtype, shape and data size as expected. */
static fasa_client_status s_check_tensor(const fasa_client *c, const Fasa__V1__Tensor *t,
                                         Fasa__V1__DType dtype, int n_dims, const uint64_t *shape,
                                         const char *field, fasa_client_error *err)
{
    char want[96], got[96];
    s_shape_text(want, sizeof(want), (size_t)n_dims, shape);
    if (!t)
        return s_fail(err, FASA_CLIENT_INTERNAL, "bad reply from %s: no %s", c->endpoint, field);
    if (t->dtype != dtype)
        return s_fail(err, FASA_CLIENT_INTERNAL, "bad reply from %s: %s has dtype %d, expected %s",
                      c->endpoint, field, (int)t->dtype,
                      dtype == FASA__V1__DTYPE__F32 ? "F32" : "I32");
    int same = t->n_shape == (size_t)n_dims;
    for (int i = 0; same && i < n_dims; i++) same = t->shape[i] == shape[i];
    if (!same) {
        s_shape_text(got, sizeof(got), t->n_shape < 8 ? t->n_shape : 8, t->shape);
        return s_fail(err, FASA_CLIENT_INTERNAL, "bad reply from %s: %s has shape %s, expected %s",
                      c->endpoint, field, got, want);
    }
    uint64_t bytes = 4;
    for (int i = 0; i < n_dims; i++) bytes *= shape[i];
    if (t->data.len != bytes || (bytes && !t->data.data))
        return s_fail(err, FASA_CLIENT_INTERNAL,
                      "bad reply from %s: %s %s holds %zu bytes, expected %llu", c->endpoint, field,
                      want, t->data.len, (unsigned long long)bytes);
    return FASA_CLIENT_OK;
}

static fasa_client_status s_check_id(const char *id, const char *field, fasa_client_error *err)
{
    if (!id) return s_fail(err, FASA_CLIENT_INVALID_ARGUMENT, "%s: NULL", field);
    return FASA_CLIENT_OK;
}

static int s_method_ok(fasa_client_method m)
{
    return (unsigned)m <= FASA_CLIENT_METHOD_LAST;
}
static int s_gqa_ok(fasa_client_gqa g)
{
    return (unsigned)g <= FASA_CLIENT_GQA_SHARED;
}
static int s_merge_ok(fasa_client_merge m)
{
    return (unsigned)m <= FASA_CLIENT_MERGE_LOCAL;
}
static int s_pairing_ok(fasa_client_pairing p)
{
    return (unsigned)p <= FASA_CLIENT_PAIRING_HALF;
}

/* ---------------------------------------------------------------- requests ---- */

fasa_client_status fasa_client_ping(fasa_client *c, fasa_client_server_info *info,
                                    fasa_client_error *err)
{
    Fasa__V1__Ping ping = FASA__V1__PING__INIT;
    Fasa__V1__Request req = FASA__V1__REQUEST__INIT;
    uint8_t payload[16];
    const uint64_t nonce = c ? c->next_id : 0;
    snprintf((char *)payload, sizeof(payload), "%015llx", (unsigned long long)nonce);
    ping.has_payload = 1;
    ping.payload.len = 15;
    ping.payload.data = payload;
    req.body_case = FASA__V1__REQUEST__BODY_PING;
    req.ping = &ping;
    Fasa__V1__Response *resp;
    fasa_client_status st = s_call(c, &req, FASA__V1__RESPONSE__BODY_PING, &resp, err);
    if (st) return st;
    const Fasa__V1__PingResult *r = resp->ping;
    if (!r->has_payload || r->payload.len != 15 || memcmp(r->payload.data, payload, 15) != 0)
        st = s_fail(err, FASA_CLIENT_INTERNAL, "bad reply from %s: ping payload not echoed",
                    c->endpoint);
    else if (info) {
        info->n_ranks = r->n_ranks;
        info->n_shards = r->n_shards;
        snprintf(info->version, sizeof(info->version), "%s", r->version ? r->version : "");
    }
    fasa__v1__response__free_unpacked(resp, NULL);
    return st;
}

fasa_client_status fasa_client_create_session(fasa_client *c, const char *session_id,
                                              const fasa_client_session_config *cfg,
                                              uint32_t *n_shards_p, fasa_client_error *err)
{
    const fasa_client_status st0 = s_check_id(session_id, "create_session.session_id", err);
    if (st0) return st0;
    if (!cfg) return s_fail(err, FASA_CLIENT_INVALID_ARGUMENT, "create_session: config NULL");
    if (!s_pairing_ok(cfg->pairing))
        return s_fail(err, FASA_CLIENT_INVALID_ARGUMENT, "create_session.pairing: %d unknown",
                      (int)cfg->pairing);
    if (!s_method_ok(cfg->method))
        return s_fail(err, FASA_CLIENT_INVALID_ARGUMENT, "create_session.method: %d unknown",
                      (int)cfg->method);
    if (!s_gqa_ok(cfg->gqa))
        return s_fail(err, FASA_CLIENT_INVALID_ARGUMENT, "create_session.gqa: %d unknown",
                      (int)cfg->gqa);
    if (cfg->dense_layers_set && cfg->n_dense_layers && !cfg->dense_layers)
        return s_fail(err, FASA_CLIENT_INVALID_ARGUMENT, "create_session.dense_layers: NULL");
    if ((unsigned)cfg->dtype > FASA_CLIENT_DTYPE_BF16)
        return s_fail(err, FASA_CLIENT_INVALID_ARGUMENT, "create_session.dtype: %d unknown",
                      (int)cfg->dtype);
    if (cfg->score_dtype != FASA_CLIENT_DTYPE_DEFAULT &&
        cfg->score_dtype != FASA_CLIENT_DTYPE_F32 && cfg->score_dtype != FASA_CLIENT_DTYPE_F16 &&
        cfg->score_dtype != FASA_CLIENT_DTYPE_BF16 && cfg->score_dtype != FASA_CLIENT_DTYPE_I8)
        return s_fail(err, FASA_CLIENT_INVALID_ARGUMENT, "create_session.score_dtype: %d unknown",
                      (int)cfg->score_dtype);
    if (cfg->tier < 0 || cfg->tier > FASA__V1__TIER__DISK)
        return s_fail(err, FASA_CLIENT_INVALID_ARGUMENT, "create_session.tier: %d unknown",
                      cfg->tier);
    if (!s_merge_ok(cfg->merge))
        return s_fail(err, FASA_CLIENT_INVALID_ARGUMENT, "create_session.merge: %d unknown",
                      (int)cfg->merge);
    Fasa__V1__CreateSession cs = FASA__V1__CREATE_SESSION__INIT;
    Fasa__V1__DenseLayers dl = FASA__V1__DENSE_LAYERS__INIT;
    if (cfg->merge) {
        cs.has_merge = 1;
        cs.merge = (Fasa__V1__Merge)cfg->merge;
    }
    if (cfg->tier) {
        cs.has_tier = 1;
        cs.tier = (Fasa__V1__Tier)cfg->tier;
    }
    cs.session_id = (char *)(uintptr_t)session_id;
    cs.n_layers = cfg->geom.n_layers;
    cs.n_heads = cfg->geom.n_heads;
    cs.n_kv_heads = cfg->geom.n_kv_heads;
    cs.head_dim = cfg->geom.head_dim;
    if (cfg->pairing) {
        cs.has_pairing = 1;
        cs.pairing = (Fasa__V1__Pairing)cfg->pairing;
    }
    cs.has_dtype = 1;
    cs.dtype = cfg->dtype ? (Fasa__V1__DType)cfg->dtype : FASA__V1__DTYPE__F32;
    if (cfg->score_dtype) {
        cs.has_score_dtype = 1;
        cs.score_dtype = (Fasa__V1__DType)cfg->score_dtype;
    }
    cs.profile_text = (char *)(uintptr_t)cfg->profile_text;
    cs.profile_name = (char *)(uintptr_t)cfg->profile_name;
    if (cfg->method) {
        cs.has_method = 1;
        cs.method = (Fasa__V1__Method)cfg->method;
    }
    if (cfg->budget) {
        cs.has_budget = 1;
        cs.budget = cfg->budget;
    }
    if (cfg->gqa) {
        cs.has_gqa = 1;
        cs.gqa = (Fasa__V1__Gqa)cfg->gqa;
    }
    if (cfg->dense_layers_set) {
        dl.n_layers = cfg->n_dense_layers;
        dl.layers = (uint32_t *)(uintptr_t)cfg->dense_layers;
        cs.dense_layers = &dl;
    }
    Fasa__V1__Request req = FASA__V1__REQUEST__INIT;
    req.body_case = FASA__V1__REQUEST__BODY_CREATE_SESSION;
    req.create_session = &cs;
    Fasa__V1__Response *resp;
    const fasa_client_status st =
        s_call(c, &req, FASA__V1__RESPONSE__BODY_CREATE_SESSION, &resp, err);
    if (st) return st;
    if (n_shards_p) *n_shards_p = resp->create_session->n_shards;
    fasa__v1__response__free_unpacked(resp, NULL);
    return FASA_CLIENT_OK;
}

fasa_client_status fasa_client_drop_session(fasa_client *c, const char *session_id,
                                            fasa_client_error *err)
{
    const fasa_client_status st0 = s_check_id(session_id, "drop_session.session_id", err);
    if (st0) return st0;
    Fasa__V1__DropSession ds = FASA__V1__DROP_SESSION__INIT;
    ds.session_id = (char *)(uintptr_t)session_id;
    Fasa__V1__Request req = FASA__V1__REQUEST__INIT;
    req.body_case = FASA__V1__REQUEST__BODY_DROP_SESSION;
    req.drop_session = &ds;
    return s_call_no_body(c, &req, err);
}

fasa_client_status fasa_client_append(fasa_client *c, const char *session_id,
                                      const fasa_client_geometry *geom, int32_t layer,
                                      uint64_t start_pos, uint64_t n, const float *k,
                                      const float *v, uint64_t *length_p, fasa_client_error *err)
{
    return fasa_client_append_dt(c, session_id, geom, layer, start_pos, n, FASA_CLIENT_DTYPE_F32, k,
                                 v, length_p, err);
}

/* The Append request of fasa_client_append_dt, sent (async) or sent and answered. */
static fasa_client_status s_append(fasa_client *c, const char *session_id,
                                   const fasa_client_geometry *geom, int32_t layer,
                                   uint64_t start_pos, uint64_t n, fasa_client_dtype dtype,
                                   const void *k, const void *v, uint64_t *length_p, int async,
                                   fasa_client_error *err);

fasa_client_status fasa_client_append_dt(fasa_client *c, const char *session_id,
                                         const fasa_client_geometry *geom, int32_t layer,
                                         uint64_t start_pos, uint64_t n, fasa_client_dtype dtype,
                                         const void *k, const void *v, uint64_t *length_p,
                                         fasa_client_error *err)
{
    return s_append(c, session_id, geom, layer, start_pos, n, dtype, k, v, length_p, 0, err);
}

fasa_client_status fasa_client_append_send(fasa_client *c, const char *session_id,
                                           const fasa_client_geometry *geom, int32_t layer,
                                           uint64_t start_pos, uint64_t n, fasa_client_dtype dtype,
                                           const void *k, const void *v, fasa_client_error *err)
{
    if (!c) return s_fail(err, FASA_CLIENT_INVALID_ARGUMENT, "client: NULL");
    if (c->n_pend == FASA_CLIENT_APPEND_WINDOW)
        return s_fail(err, FASA_CLIENT_RESOURCE_EXHAUSTED,
                      "append: %d appends in flight already (FASA_CLIENT_APPEND_WINDOW): receive "
                      "one first",
                      c->n_pend);
    return s_append(c, session_id, geom, layer, start_pos, n, dtype, k, v, NULL, 1, err);
}

fasa_client_status fasa_client_append_recv(fasa_client *c, uint64_t *length_p,
                                           fasa_client_error *err)
{
    if (!c) return s_fail(err, FASA_CLIENT_INVALID_ARGUMENT, "client: NULL");
    if (!c->n_pend) return s_fail(err, FASA_CLIENT_INVALID_ARGUMENT, "append: none in flight");
    const uint64_t id = c->pend_id[c->pend_head];
    const size_t size = c->pend_size[c->pend_head];
    c->pend_head = (c->pend_head + 1) % FASA_CLIENT_APPEND_WINDOW;
    c->n_pend--;
    Fasa__V1__Response *resp;
    const fasa_client_status st =
        s_recv_resp(c, id, "append", size, FASA__V1__RESPONSE__BODY_APPEND, NULL, &resp, err);
    if (st) return st;
    if (length_p) *length_p = resp->append->length;
    fasa__v1__response__free_unpacked(resp, NULL);
    return FASA_CLIENT_OK;
}

int fasa_client_append_pending(const fasa_client *c)
{
    return c ? c->n_pend : 0;
}

static fasa_client_status s_append(fasa_client *c, const char *session_id,
                                   const fasa_client_geometry *geom, int32_t layer,
                                   uint64_t start_pos, uint64_t n, fasa_client_dtype dtype,
                                   const void *k, const void *v, uint64_t *length_p, int async,
                                   fasa_client_error *err)
{
    if (dtype == FASA_CLIENT_DTYPE_DEFAULT) dtype = FASA_CLIENT_DTYPE_F32;
    if (dtype != FASA_CLIENT_DTYPE_F32 && dtype != FASA_CLIENT_DTYPE_F16 &&
        dtype != FASA_CLIENT_DTYPE_BF16)
        return s_fail(err, FASA_CLIENT_INVALID_ARGUMENT, "append: dtype %d is not F32, F16 or BF16",
                      (int)dtype);
    const fasa_client_status st0 = s_check_id(session_id, "append.session_id", err);
    if (st0) return st0;
    if (!geom) return s_fail(err, FASA_CLIENT_INVALID_ARGUMENT, "append: geometry NULL");
    if (layer < -1) return s_fail(err, FASA_CLIENT_INVALID_ARGUMENT, "append.layer: %d", layer);
    uint64_t shape[4];
    int nd = 0;
    if (layer < 0) shape[nd++] = geom->n_layers;
    shape[nd++] = n;
    shape[nd++] = geom->n_kv_heads;
    shape[nd++] = geom->head_dim;
    tensor_buf tk, tv;
    fasa_client_status st;
    if ((st = s_tensor(&tk, (Fasa__V1__DType)dtype, nd, shape, k, "append.k", err)) ||
        (st = s_tensor(&tv, (Fasa__V1__DType)dtype, nd, shape, v, "append.v", err)))
        return st;
    Fasa__V1__Append ap = FASA__V1__APPEND__INIT;
    ap.session_id = (char *)(uintptr_t)session_id;
    ap.has_layer = 1;
    ap.layer = layer;
    ap.start_pos = start_pos;
    ap.k = &tk.t;
    ap.v = &tv.t;
    Fasa__V1__Request req = FASA__V1__REQUEST__INIT;
    req.body_case = FASA__V1__REQUEST__BODY_APPEND;
    req.append = &ap;
    /* Large k and v go as raw data frames 1 and 2, straight from the caller's memory. */
    raw_frame fr[2];
    int n_fr = 0;
    if (tk.t.data.len >= CLIENT_FRAME_MIN) {
        tensor_buf *t[2] = {&tk, &tv};
        for (int i = 0; i < 2; i++) {
            fr[n_fr] = (raw_frame){t[i]->t.data.data, t[i]->t.data.len};
            t[i]->t.has_data_frame = 1;
            t[i]->t.data_frame = (uint32_t)++n_fr;
            t[i]->t.data.data = NULL;
            t[i]->t.data.len = 0;
        }
    }
    if (async) {
        size_t size = 0;
        if ((st = s_send_req(c, &req, 1, fr, n_fr, &size, err))) return st;
        const int slot = (c->pend_head + c->n_pend) % FASA_CLIENT_APPEND_WINDOW;
        c->pend_id[slot] = req.request_id;
        c->pend_size[slot] = size;
        c->n_pend++;
        s_ok(err);
        return FASA_CLIENT_OK;
    }
    Fasa__V1__Response *resp;
    if ((st = s_call_frames(c, &req, fr, n_fr, FASA__V1__RESPONSE__BODY_APPEND, &resp, err)))
        return st;
    if (length_p) *length_p = resp->append->length;
    fasa__v1__response__free_unpacked(resp, NULL);
    return FASA_CLIENT_OK;
}

/* Fills the Attend message of one request (tensors in tq, tk, tv). */
static fasa_client_status s_attend_msg(const fasa_client_attend_req *r, Fasa__V1__Attend *m,
                                       tensor_buf *tq, tensor_buf *tk, tensor_buf *tv,
                                       const char *field, fasa_client_error *err)
{
    char f[64];
    fasa__v1__attend__init(m);
    if (!r) return s_fail(err, FASA_CLIENT_INVALID_ARGUMENT, "%s: NULL", field);
    snprintf(f, sizeof(f), "%s.session_id", field);
    const fasa_client_status st0 = s_check_id(r->session_id, f, err);
    if (st0) return st0;
    if (!r->out) return s_fail(err, FASA_CLIENT_INVALID_ARGUMENT, "%s.out: NULL", field);
    if (!r->k_new != !r->v_new)
        return s_fail(err, FASA_CLIENT_INVALID_ARGUMENT, "%s.k_new, %s.v_new: give both or neither",
                      field, field);
    if (!s_method_ok(r->method))
        return s_fail(err, FASA_CLIENT_INVALID_ARGUMENT, "%s.method: %d unknown", field,
                      (int)r->method);
    if (!s_gqa_ok(r->gqa))
        return s_fail(err, FASA_CLIENT_INVALID_ARGUMENT, "%s.gqa: %d unknown", field, (int)r->gqa);
    if (!s_merge_ok(r->merge))
        return s_fail(err, FASA_CLIENT_INVALID_ARGUMENT, "%s.merge: %d unknown", field,
                      (int)r->merge);
    if (r->max_pos < -1)
        return s_fail(err, FASA_CLIENT_INVALID_ARGUMENT, "%s.max_pos: %lld (-1 for all)", field,
                      (long long)r->max_pos);
    if (r->selected && !r->selected_budget && !r->budget)
        return s_fail(err, FASA_CLIENT_INVALID_ARGUMENT,
                      "%s.selected_budget: 0 with the session's default budget; set the "
                      "columns of selected",
                      field);
    const uint64_t qs[2] = {r->geom.n_heads, r->geom.head_dim};
    const uint64_t ks[2] = {r->geom.n_kv_heads, r->geom.head_dim};
    fasa_client_status st;
    snprintf(f, sizeof(f), "%s.q", field);
    if ((st = s_tensor(tq, FASA__V1__DTYPE__F32, 2, qs, r->q, f, err))) return st;
    if (!r->q) return s_fail(err, FASA_CLIENT_INVALID_ARGUMENT, "%s: NULL", f);
    m->session_id = (char *)(uintptr_t)r->session_id;
    m->layer = r->layer;
    m->q = &tq->t;
    if (r->k_new) {
        snprintf(f, sizeof(f), "%s.k_new", field);
        if ((st = s_tensor(tk, FASA__V1__DTYPE__F32, 2, ks, r->k_new, f, err))) return st;
        snprintf(f, sizeof(f), "%s.v_new", field);
        if ((st = s_tensor(tv, FASA__V1__DTYPE__F32, 2, ks, r->v_new, f, err))) return st;
        m->k_new = &tk->t;
        m->v_new = &tv->t;
    }
    if (r->method) {
        m->has_method = 1;
        m->method = (Fasa__V1__Method)r->method;
    }
    if (r->budget) {
        m->has_budget = 1;
        m->budget = r->budget;
    }
    if (r->gqa) {
        m->has_gqa = 1;
        m->gqa = (Fasa__V1__Gqa)r->gqa;
    }
    if (r->merge) {
        m->has_merge = 1;
        m->merge = (Fasa__V1__Merge)r->merge;
    }
    if (r->max_pos != -1) {
        m->has_max_pos = 1;
        m->max_pos = r->max_pos;
    }
    if (r->selected) {
        m->has_return_selected = 1;
        m->return_selected = 1;
    }
    return FASA_CLIENT_OK;
}

/* Checks one AttendResult against its request and copies it out. */
static fasa_client_status s_attend_out(const fasa_client *c, const fasa_client_attend_req *r,
                                       const Fasa__V1__AttendResult *res, const char *field,
                                       fasa_client_error *err)
{
    char f[64];
    if (!res)
        return s_fail(err, FASA_CLIENT_INTERNAL, "bad reply from %s: no %s result", c->endpoint,
                      field);
    const uint64_t os[2] = {r->geom.n_heads, r->geom.head_dim};
    const uint64_t cols = r->selected_budget ? r->selected_budget : r->budget;
    const uint64_t ss[2] = {r->geom.n_heads, cols};
    fasa_client_status st;
    snprintf(f, sizeof(f), "%s.out", field);
    if ((st = s_check_tensor(c, res->out, FASA__V1__DTYPE__F32, 2, os, f, err))) return st;
    if (r->selected) {
        snprintf(f, sizeof(f), "%s.selected", field);
        if ((st = s_check_tensor(c, res->selected, FASA__V1__DTYPE__I32, 2, ss, f, err))) return st;
    }
    if (!res->stats)
        return s_fail(err, FASA_CLIENT_INTERNAL, "bad reply from %s: no %s.stats", c->endpoint,
                      field);
    memcpy(r->out, res->out->data.data, res->out->data.len);
    if (r->selected) memcpy(r->selected, res->selected->data.data, res->selected->data.len);
    if (r->stats) {
        r->stats->method_used = (fasa_client_method)res->stats->method_used;
        r->stats->n_visible = res->stats->n_visible;
        r->stats->bytes_read = res->stats->bytes_read;
        r->stats->server_us = res->stats->server_us;
    }
    return FASA_CLIENT_OK;
}

fasa_client_status fasa_client_attend_send(fasa_client *c, const fasa_client_attend_req *r,
                                           fasa_client_error *err)
{
    const double t0 = s_now_us();
    Fasa__V1__Attend m;
    tensor_buf tq, tk, tv;
    fasa_client_status st = s_attend_msg(r, &m, &tq, &tk, &tv, "attend", err);
    if (st) return st;
    Fasa__V1__Request req = FASA__V1__REQUEST__INIT;
    req.body_case = FASA__V1__REQUEST__BODY_ATTEND;
    req.attend = &m;
    size_t size = 0;
    if ((st = s_send_req(c, &req, 1, NULL, 0, &size, err))) return st;
    c->pending = 1;
    c->pending_rid = req.request_id;
    c->pending_size = size;
    c->timing.encode_us = c->t_sent - t0;
    s_ok(err);
    return FASA_CLIENT_OK;
}

fasa_client_status fasa_client_attend_wait(fasa_client *c, const fasa_client_attend_req *r,
                                           fasa_client_error *err)
{
    if (!c) return s_fail(err, FASA_CLIENT_INVALID_ARGUMENT, "client: NULL");
    if (!c->pending)
        return s_fail(err, FASA_CLIENT_FAILED_PRECONDITION,
                      "attend_wait: no attend was sent (fasa_client_attend_send)");
    if (!r || !r->out) {
        /* The reply still has to be taken off the socket: wait with nowhere to write. */
        return s_fail(err, FASA_CLIENT_INVALID_ARGUMENT, "attend_wait: req or req->out NULL");
    }
    c->pending = 0;
    ProtobufCAllocator alloc = {s_arena_alloc, s_arena_free, &c->arena};
    Fasa__V1__Response *resp;
    fasa_client_status st = s_recv_resp(c, c->pending_rid, "attend", c->pending_size,
                                        FASA__V1__RESPONSE__BODY_ATTEND, &alloc, &resp, err);
    const double t1 = s_now_us();
    if (st) {
        s_arena_reset(&c->arena);
        return st;
    }
    st = s_attend_out(c, r, resp->attend, "attend", err);
    if (st == FASA_CLIENT_OK) {
        fasa_client_timing *t = &c->timing;
        const Fasa__V1__StepStats *ss = resp->attend->stats;
        t->wait_us = t1 - c->t_sent;
        t->queue_us = resp->has_queue_us ? (double)resp->queue_us : 0;
        t->server_decode_us = resp->has_decode_us ? (double)resp->decode_us : 0;
        t->server_us = (double)ss->server_us;
        t->score_us = ss->has_score_us ? (double)ss->score_us : 0;
        t->merge_us = ss->has_merge_us ? (double)ss->merge_us : 0;
        t->attend_us = ss->has_attend_us ? (double)ss->attend_us : 0;
    }
    fasa__v1__response__free_unpacked(resp, &alloc);
    s_arena_reset(&c->arena);
    if (st == FASA_CLIENT_OK) c->timing.decode_us = s_now_us() - t1;
    return st;
}

fasa_client_status fasa_client_attend(fasa_client *c, const fasa_client_attend_req *r,
                                      fasa_client_error *err)
{
    const fasa_client_status st = fasa_client_attend_send(c, r, err);
    return st ? st : fasa_client_attend_wait(c, r, err);
}

void fasa_client_last_timing(const fasa_client *c, fasa_client_timing *out)
{
    if (c && out) *out = c->timing;
}

fasa_client_status fasa_client_batch_attend(fasa_client *c, size_t n_items,
                                            const fasa_client_attend_req *items,
                                            fasa_client_error *item_errs, fasa_client_error *err)
{
    if (n_items < 1 || n_items > 4096)
        return s_fail(err, FASA_CLIENT_INVALID_ARGUMENT,
                      "batch_attend.items: %zu items, expected 1..4096", n_items);
    if (!items || !item_errs)
        return s_fail(err, FASA_CLIENT_INVALID_ARGUMENT, "batch_attend: items or item_errs NULL");
    Fasa__V1__Attend *msgs = malloc(n_items * sizeof(*msgs));
    Fasa__V1__Attend **ptrs = malloc(n_items * sizeof(*ptrs));
    tensor_buf *tb = malloc(3 * n_items * sizeof(*tb));
    fasa_client_status st = FASA_CLIENT_OK;
    Fasa__V1__Response *resp = NULL;
    if (!msgs || !ptrs || !tb) {
        st = s_fail(err, FASA_CLIENT_RESOURCE_EXHAUSTED, "batch_attend: out of memory");
        goto done;
    }
    for (size_t i = 0; i < n_items; i++) {
        char field[48];
        snprintf(field, sizeof(field), "batch_attend.items[%zu]", i);
        if ((st = s_attend_msg(&items[i], &msgs[i], &tb[3 * i], &tb[3 * i + 1], &tb[3 * i + 2],
                               field, err)))
            goto done;
        ptrs[i] = &msgs[i];
        s_ok(&item_errs[i]);
    }
    Fasa__V1__BatchAttend ba = FASA__V1__BATCH_ATTEND__INIT;
    ba.n_items = n_items;
    ba.items = ptrs;
    Fasa__V1__Request req = FASA__V1__REQUEST__INIT;
    req.body_case = FASA__V1__REQUEST__BODY_BATCH_ATTEND;
    req.batch_attend = &ba;
    if ((st = s_call(c, &req, FASA__V1__RESPONSE__BODY_BATCH_ATTEND, &resp, err))) goto done;
    const Fasa__V1__BatchAttendResult *br = resp->batch_attend;
    if (br->n_items != n_items) {
        st = s_fail(err, FASA_CLIENT_INTERNAL,
                    "bad reply from %s: %zu batch items answer %zu requested", c->endpoint,
                    br->n_items, n_items);
        goto done;
    }
    for (size_t i = 0; i < n_items; i++) {
        char field[48];
        snprintf(field, sizeof(field), "batch_attend.items[%zu]", i);
        const Fasa__V1__BatchAttendItem *it = br->items[i];
        const unsigned code = (unsigned)it->status;
        if (code != FASA__V1__STATUS__OK) {
            s_fail(&item_errs[i],
                   code <= FASA_CLIENT_UNAVAILABLE ? (fasa_client_status)code
                                                   : FASA_CLIENT_INTERNAL,
                   "%s", it->message && *it->message ? it->message : fasa_client_status_name(code));
            continue;
        }
        if (s_attend_out(c, &items[i], it->result, field, &item_errs[i])) {
            /* The item's reply is unusable: the batch as a whole is a bad reply. */
            st = s_fail(err, FASA_CLIENT_INTERNAL, "%s", item_errs[i].msg);
        }
    }
done:
    if (resp) fasa__v1__response__free_unpacked(resp, NULL);
    free(msgs);
    free(ptrs);
    free(tb);
    return st;
}

fasa_client_status fasa_client_calibrate(fasa_client *c, const fasa_client_geometry *geom,
                                         uint32_t n_tokens, const float *q, const float *k,
                                         const fasa_client_calib_opts *opts, char **profile_text_p,
                                         fasa_client_error *err)
{
    if (!profile_text_p)
        return s_fail(err, FASA_CLIENT_INVALID_ARGUMENT, "calibrate: profile_text_p NULL");
    *profile_text_p = NULL;
    if (!geom) return s_fail(err, FASA_CLIENT_INVALID_ARGUMENT, "calibrate: geometry NULL");
    const fasa_client_calib_opts none = {0};
    if (!opts) opts = &none;
    if (!s_pairing_ok(opts->pairing))
        return s_fail(err, FASA_CLIENT_INVALID_ARGUMENT, "calibrate.pairing: %d unknown",
                      (int)opts->pairing);
    if (!s_gqa_ok(opts->gqa))
        return s_fail(err, FASA_CLIENT_INVALID_ARGUMENT, "calibrate.gqa: %d unknown",
                      (int)opts->gqa);
    const uint64_t qs[4] = {geom->n_layers, n_tokens, geom->n_heads, geom->head_dim};
    const uint64_t ks[4] = {geom->n_layers, n_tokens, geom->n_kv_heads, geom->head_dim};
    tensor_buf tq, tk;
    fasa_client_status st;
    if ((st = s_tensor(&tq, FASA__V1__DTYPE__F32, 4, qs, q, "calibrate.q", err)) ||
        (st = s_tensor(&tk, FASA__V1__DTYPE__F32, 4, ks, k, "calibrate.k", err)))
        return st;
    Fasa__V1__Calibrate cm = FASA__V1__CALIBRATE__INIT;
    cm.q = &tq.t;
    cm.k = &tk.t;
    if (opts->pairing) {
        cm.has_pairing = 1;
        cm.pairing = (Fasa__V1__Pairing)opts->pairing;
    }
    if (opts->ntip) {
        cm.has_ntip = 1;
        cm.ntip = opts->ntip;
    }
    if (opts->window) {
        cm.has_window = 1;
        cm.window = opts->window;
    }
    if (opts->pos_end) {
        cm.has_pos_begin = cm.has_pos_end = cm.has_pos_step = 1;
        cm.pos_begin = opts->pos_begin;
        cm.pos_end = opts->pos_end;
        cm.pos_step = opts->pos_step ? opts->pos_step : 1;
    }
    if (opts->gqa) {
        cm.has_gqa = 1;
        cm.gqa = (Fasa__V1__Gqa)opts->gqa;
    }
    cm.profile_name = (char *)(uintptr_t)opts->profile_name;
    Fasa__V1__Request req = FASA__V1__REQUEST__INIT;
    req.body_case = FASA__V1__REQUEST__BODY_CALIBRATE;
    req.calibrate = &cm;
    Fasa__V1__Response *resp;
    if ((st = s_call(c, &req, FASA__V1__RESPONSE__BODY_CALIBRATE, &resp, err))) return st;
    const char *text = resp->calibrate->profile_text;
    if (!text || !*text)
        st =
            s_fail(err, FASA_CLIENT_INTERNAL, "bad reply from %s: empty profile_text", c->endpoint);
    else if (!(*profile_text_p = strdup(text)))
        st = s_fail(err, FASA_CLIENT_RESOURCE_EXHAUSTED, "calibrate: out of memory");
    fasa__v1__response__free_unpacked(resp, NULL);
    return st;
}

fasa_client_status fasa_client_set_profile(fasa_client *c, const char *session_id,
                                           const char *profile_text, const char *profile_name,
                                           fasa_client_error *err)
{
    const fasa_client_status st0 = s_check_id(session_id, "set_profile.session_id", err);
    if (st0) return st0;
    if (!profile_text == !profile_name)
        return s_fail(err, FASA_CLIENT_INVALID_ARGUMENT,
                      "set_profile: give exactly one of profile_text and profile_name");
    Fasa__V1__SetProfile sp = FASA__V1__SET_PROFILE__INIT;
    sp.session_id = (char *)(uintptr_t)session_id;
    sp.profile_text = (char *)(uintptr_t)profile_text;
    sp.profile_name = (char *)(uintptr_t)profile_name;
    Fasa__V1__Request req = FASA__V1__REQUEST__INIT;
    req.body_case = FASA__V1__REQUEST__BODY_SET_PROFILE;
    req.set_profile = &sp;
    return s_call_no_body(c, &req, err);
}

/* Copies a reply's per-rank holdings into a new array; -1 when out of memory. */
static int s_rank_stats(size_t n, Fasa__V1__RankStats *const *in, size_t *n_p,
                        fasa_client_rank_stats **out_p)
{
    *n_p = 0;
    *out_p = NULL;
    if (!n) return 0;
    fasa_client_rank_stats *o = calloc(n, sizeof(*o));
    if (!o) return -1;
    for (size_t i = 0; i < n; i++)
        o[i] = (fasa_client_rank_stats){.rank = in[i]->rank,
                                        .shards = in[i]->shards,
                                        .sessions = in[i]->sessions,
                                        .tokens = in[i]->tokens,
                                        .rows = in[i]->rows,
                                        .kdom_bytes = in[i]->kdom_bytes,
                                        .krest_bytes = in[i]->krest_bytes,
                                        .v_bytes = in[i]->v_bytes,
                                        .alloc_bytes = in[i]->alloc_bytes,
                                        .rss_bytes = in[i]->rss_bytes};
    *n_p = n;
    *out_p = o;
    return 0;
}

/* A StatsResult into *stats (zeroed by the caller); session_id: the session asked for. */
static fasa_client_status s_stats_from(const Fasa__V1__StatsResult *r, const char *session_id,
                                       const char *from, fasa_client_stats *stats,
                                       fasa_client_error *err)
{
    fasa_client_status st = FASA_CLIENT_OK;
    stats->n_ranks = r->n_ranks;
    stats->n_shards = r->n_shards;
    stats->n_sessions = r->n_sessions;
    stats->n_profiles = r->n_profiles;
    stats->requests = r->requests;
    stats->errors = r->errors;
    stats->attend_steps = r->attend_steps;
    stats->batch_items = r->batch_items;
    stats->kv_bytes = r->kv_bytes;
    stats->uptime_s = r->uptime_s;
    for (size_t i = 0; i < r->n_requests_by_type && i < FASA_CLIENT_STATS_MAX_TYPES; i++) {
        fasa_client_request_count *o = &stats->requests_by_type[i];
        snprintf(o->type, sizeof(o->type), "%s",
                 r->requests_by_type[i]->type ? r->requests_by_type[i]->type : "");
        o->count = r->requests_by_type[i]->count;
        stats->n_request_types = i + 1;
    }
    for (size_t i = 0; i < r->n_errors_by_code; i++)
        if ((unsigned)r->errors_by_code[i]->code < FASA_CLIENT_STATS_MAX_CODES)
            stats->errors_by_code[r->errors_by_code[i]->code] = r->errors_by_code[i]->count;
    for (size_t i = 0; i < r->n_latency; i++) {
        const Fasa__V1__LatencySummary *l = r->latency[i];
        if (l->method < FASA__V1__METHOD__FASA || (int)l->method > (int)FASA_CLIENT_METHOD_LAST)
            continue;
        stats->latency[l->method] = (fasa_client_latency){.count = l->count,
                                                          .sum_us = l->sum_us,
                                                          .p50_us = l->p50_us,
                                                          .p90_us = l->p90_us,
                                                          .p99_us = l->p99_us,
                                                          .max_us = l->max_us};
    }
    if (s_rank_stats(r->n_rank_stats, r->rank_stats, &stats->n_rank_stats, &stats->rank_stats))
        st = s_fail(err, FASA_CLIENT_RESOURCE_EXHAUSTED, "stats: out of memory");
    else if (session_id && !r->session)
        st = s_fail(err, FASA_CLIENT_INTERNAL, "bad reply from %s: no stats.session for '%s'", from,
                    session_id);
    else if (r->session) {
        const Fasa__V1__SessionInfo *s = r->session;
        fasa_client_session_info *o = &stats->session;
        stats->has_session = 1;
        snprintf(o->session_id, sizeof(o->session_id), "%s", s->session_id ? s->session_id : "");
        o->n_layers = s->n_layers;
        o->n_heads = s->n_heads;
        o->n_kv_heads = s->n_kv_heads;
        o->head_dim = s->head_dim;
        o->length = s->length;
        o->kv_bytes = s->kv_bytes;
        o->has_profile = s->has_profile != 0;
        o->method = (fasa_client_method)s->method;
        o->budget = s->budget;
        o->dtype = s->has_dtype ? (fasa_client_dtype)s->dtype : FASA_CLIENT_DTYPE_F32;
        o->pairing = s->has_pairing ? (fasa_client_pairing)s->pairing : FASA_CLIENT_PAIRING_DEFAULT;
        o->gqa = s->has_gqa ? (fasa_client_gqa)s->gqa : FASA_CLIENT_GQA_DEFAULT;
        if (s->dense_layers) {
            o->n_dense_layers = s->dense_layers->n_layers;
            for (size_t i = 0; i < o->n_dense_layers && i < 64; i++)
                o->dense_layers[i] = s->dense_layers->layers[i];
        }
        o->score_dtype =
            s->has_score_dtype ? (fasa_client_dtype)s->score_dtype : FASA_CLIENT_DTYPE_DEFAULT;
        o->tier = s->has_tier ? (int)s->tier : 0;
        if (s_rank_stats(s->n_rank_stats, s->rank_stats, &o->n_rank_stats, &o->rank_stats))
            st = s_fail(err, FASA_CLIENT_RESOURCE_EXHAUSTED, "stats: out of memory");
    }
    if (st) fasa_client_stats_free(stats);
    return st;
}

fasa_client_status fasa_client_get_stats(fasa_client *c, const char *session_id,
                                         fasa_client_stats *stats, fasa_client_error *err)
{
    if (!stats) return s_fail(err, FASA_CLIENT_INVALID_ARGUMENT, "stats: NULL");
    memset(stats, 0, sizeof(*stats));
    Fasa__V1__Stats sm = FASA__V1__STATS__INIT;
    sm.session_id = (char *)(uintptr_t)session_id;
    Fasa__V1__Request req = FASA__V1__REQUEST__INIT;
    req.body_case = FASA__V1__REQUEST__BODY_STATS;
    req.stats = &sm;
    Fasa__V1__Response *resp;
    fasa_client_status st = s_call(c, &req, FASA__V1__RESPONSE__BODY_STATS, &resp, err);
    if (st) return st;
    st = s_stats_from(resp->stats, session_id, c->endpoint, stats, err);
    fasa__v1__response__free_unpacked(resp, NULL);
    return st;
}

fasa_client_status fasa_client_stats_decode(const void *response, size_t len,
                                            fasa_client_stats *stats, fasa_client_error *err)
{
    if (!stats) return s_fail(err, FASA_CLIENT_INVALID_ARGUMENT, "stats: NULL");
    memset(stats, 0, sizeof(*stats));
    Fasa__V1__Response *resp = fasa__v1__response__unpack(NULL, len, response);
    if (!resp)
        return s_fail(err, FASA_CLIENT_INTERNAL, "%zu bytes that do not decode as a Response", len);
    fasa_client_status st;
    if (resp->status != FASA__V1__STATUS__OK || resp->body_case != FASA__V1__RESPONSE__BODY_STATS)
        st = s_fail(err, FASA_CLIENT_INTERNAL, "a Response with status %u and body %d, not stats",
                    (unsigned)resp->status, (int)resp->body_case);
    else
        st = s_stats_from(resp->stats, NULL, "the server", stats, err);
    fasa__v1__response__free_unpacked(resp, NULL);
    if (!st) s_ok(err);
    return st;
}

void fasa_client_stats_free(fasa_client_stats *stats)
{
    if (!stats) return;
    free(stats->rank_stats);
    free(stats->session.rank_stats);
    stats->rank_stats = stats->session.rank_stats = NULL;
    stats->n_rank_stats = stats->session.n_rank_stats = 0;
}

fasa_client_status fasa_client_shutdown(fasa_client *c, fasa_client_error *err)
{
    Fasa__V1__Shutdown sd = FASA__V1__SHUTDOWN__INIT;
    Fasa__V1__Request req = FASA__V1__REQUEST__INIT;
    req.body_case = FASA__V1__REQUEST__BODY_SHUTDOWN;
    req.shutdown = &sd;
    return s_call_no_body(c, &req, err);
}

fasa_client_status fasa_client_snapshot(fasa_client *c, const char *session_id,
                                        fasa_client_snapshot_info *infos, size_t cap, size_t *n_p,
                                        uint32_t *n_profiles_p, fasa_client_error *err)
{
    Fasa__V1__Snapshot sn = FASA__V1__SNAPSHOT__INIT;
    sn.session_id = (char *)(uintptr_t)session_id;
    sn.has_all = !session_id;
    sn.all = !session_id;
    Fasa__V1__Request req = FASA__V1__REQUEST__INIT;
    req.body_case = FASA__V1__REQUEST__BODY_SNAPSHOT;
    req.snapshot = &sn;
    Fasa__V1__Response *resp;
    const fasa_client_status st = s_call(c, &req, FASA__V1__RESPONSE__BODY_SNAPSHOT, &resp, err);
    if (st) return st;
    const Fasa__V1__SnapshotResult *r = resp->snapshot;
    for (size_t i = 0; i < r->n_sessions && i < cap; i++) {
        fasa_client_snapshot_info *o = &infos[i];
        snprintf(o->session_id, sizeof(o->session_id), "%s", r->sessions[i]->session_id);
        o->length = r->sessions[i]->length;
        o->bytes = r->sessions[i]->bytes;
        snprintf(o->manifest, sizeof(o->manifest), "%s", r->sessions[i]->manifest);
    }
    *n_p = r->n_sessions;
    if (n_profiles_p) *n_profiles_p = r->n_profiles;
    fasa__v1__response__free_unpacked(resp, NULL);
    return FASA_CLIENT_OK;
}

void fasa_client_list_free(fasa_client_session_summary *sessions, char **profile_names,
                           size_t n_profiles)
{
    free(sessions);
    for (size_t i = 0; profile_names && i < n_profiles; i++) free(profile_names[i]);
    free(profile_names);
}

fasa_client_status fasa_client_list_sessions(fasa_client *c,
                                             fasa_client_session_summary **sessions_p,
                                             size_t *n_sessions_p, char ***profile_names_p,
                                             size_t *n_profiles_p, fasa_client_error *err)
{
    if (!sessions_p || !n_sessions_p || !profile_names_p != !n_profiles_p)
        return s_fail(err, FASA_CLIENT_INVALID_ARGUMENT,
                      "sessions_p and n_sessions_p: NULL (or only one of the profile outputs)");
    *sessions_p = NULL;
    *n_sessions_p = 0;
    if (profile_names_p) *profile_names_p = NULL, *n_profiles_p = 0;
    Fasa__V1__ListSessions ls = FASA__V1__LIST_SESSIONS__INIT;
    Fasa__V1__Request req = FASA__V1__REQUEST__INIT;
    req.body_case = FASA__V1__REQUEST__BODY_LIST_SESSIONS;
    req.list_sessions = &ls;
    Fasa__V1__Response *resp;
    fasa_client_status st = s_call(c, &req, FASA__V1__RESPONSE__BODY_LIST_SESSIONS, &resp, err);
    if (st) return st;
    const Fasa__V1__ListSessionsResult *r = resp->list_sessions;
    const size_t n = r->n_sessions, np = profile_names_p ? r->n_profile_names : 0;
    fasa_client_session_summary *out = n ? calloc(n, sizeof(*out)) : NULL;
    char **names = np ? calloc(np, sizeof(*names)) : NULL;
    int oom = (n && !out) || (np && !names);
    for (size_t i = 0; !oom && i < n; i++) {
        const Fasa__V1__SessionSummary *m = r->sessions[i];
        fasa_client_session_summary *o = &out[i];
        snprintf(o->session_id, sizeof(o->session_id), "%s", m->session_id);
        o->geom = (fasa_client_geometry){m->n_layers, m->n_heads, m->n_kv_heads, m->head_dim};
        o->length = m->length;
        o->kv_bytes = m->kv_bytes;
        o->dtype = m->has_dtype ? (fasa_client_dtype)m->dtype : FASA_CLIENT_DTYPE_F32;
        o->has_profile = m->has_profile != 0;
    }
    for (size_t i = 0; !oom && i < np; i++)
        if (!(names[i] = strdup(r->profile_names[i]))) oom = 1;
    fasa__v1__response__free_unpacked(resp, NULL);
    if (oom) {
        fasa_client_list_free(out, names, np);
        return s_fail(err, FASA_CLIENT_RESOURCE_EXHAUSTED, "list_sessions: out of memory");
    }
    *sessions_p = out;
    *n_sessions_p = n;
    if (profile_names_p) *profile_names_p = names, *n_profiles_p = np;
    return FASA_CLIENT_OK;
}

fasa_client_status fasa_client_delete_profile(fasa_client *c, const char *profile_name,
                                              fasa_client_error *err)
{
    fasa_client_status st = s_check_id(profile_name, "profile_name", err);
    if (st) return st;
    Fasa__V1__DeleteProfile dp = FASA__V1__DELETE_PROFILE__INIT;
    dp.profile_name = (char *)(uintptr_t)profile_name;
    Fasa__V1__Request req = FASA__V1__REQUEST__INIT;
    req.body_case = FASA__V1__REQUEST__BODY_DELETE_PROFILE;
    req.delete_profile = &dp;
    return s_call_no_body(c, &req, err);
}

fasa_client_status fasa_client_load_session(fasa_client *c, const char *session_id,
                                            const char *path, int check_only,
                                            fasa_client_load_result *res,
                                            fasa_client_shard_load *shards, size_t cap,
                                            fasa_client_error *err)
{
    const fasa_client_status st0 = s_check_id(session_id, "load_session.session_id", err);
    if (st0) return st0;
    if (!path || !*path)
        return s_fail(err, FASA_CLIENT_INVALID_ARGUMENT, "load_session.path: empty");
    if (!res) return s_fail(err, FASA_CLIENT_INVALID_ARGUMENT, "load_session: res NULL");
    Fasa__V1__LoadSession ls = FASA__V1__LOAD_SESSION__INIT;
    ls.session_id = (char *)(uintptr_t)session_id;
    ls.path = (char *)(uintptr_t)path;
    ls.has_check_only = check_only != 0;
    ls.check_only = check_only != 0;
    Fasa__V1__Request req = FASA__V1__REQUEST__INIT;
    req.body_case = FASA__V1__REQUEST__BODY_LOAD_SESSION;
    req.load_session = &ls;
    Fasa__V1__Response *resp;
    const fasa_client_status st =
        s_call(c, &req, FASA__V1__RESPONSE__BODY_LOAD_SESSION, &resp, err);
    if (st) return st;
    const Fasa__V1__LoadSessionResult *r = resp->load_session;
    memset(res, 0, sizeof(*res));
    res->length = r->length;
    res->stored_bytes = r->stored_bytes;
    res->file_bytes = r->file_bytes;
    res->seconds = r->seconds;
    snprintf(res->format, sizeof(res->format), "%s", r->format ? r->format : "");
    res->n_shards = r->n_shards;
    for (size_t i = 0; i < r->n_shards && i < cap; i++)
        shards[i] = (fasa_client_shard_load){.shard = r->shards[i]->shard,
                                             .rows = r->shards[i]->rows,
                                             .file_bytes = r->shards[i]->file_bytes,
                                             .read_s = r->shards[i]->read_s,
                                             .total_s = r->shards[i]->total_s};
    fasa__v1__response__free_unpacked(resp, NULL);
    return FASA_CLIENT_OK;
}

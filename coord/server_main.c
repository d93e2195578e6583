/* fasa-server: rank 0 serves fasa.v1 requests on a ZeroMQ ROUTER socket and drives the
 * worker ranks over MPI; ranks 1..N-1 hold the shards. Started without a launcher (one
 * rank), the coordinator holds the only shard itself.
 *
 * Every MPI call happens on the main thread of each rank (MPI_THREAD_FUNNELED). Rank 0
 * handles one request at a time, in arrival order; clients match replies by request id.
 * A second thread of rank 0 owns the ROUTER socket (and the ZAP handler): it reads every
 * request as it arrives, stamps it with the time, and hands it to the main thread over an
 * inproc PAIR, so that a request's wait for its deadline_ms counts from its arrival even
 * while the main thread is busy with a long step, and clients are admitted meanwhile.
 * SIGTERM, SIGINT and a Shutdown request all stop every rank cleanly. */
#include <errno.h>
#include <limits.h>
#include <malloc.h>
#include <pthread.h>
#include <mpi.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

#include "conn_guard.h"
#include "edge.h"
#include "keyfile.h"
#include "liveness.h"
#include "log.h"
#include "metrics_http.h"
#include "pool.h"
#include "server_config.h"
#include "service.h"
#include "shard.h"
#include "snapshot.h"
#include "transport_mpi.h"
#include "worker_mpi.h"
#include "zap.h"

static volatile sig_atomic_t s_stop;

static void s_on_signal(int sig)
{
    (void)sig;
    s_stop = 1;
}

static int s_write_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    if (!f) return -1;
    const int bad = fputs(text, f) < 0 || fputc('\n', f) == EOF;
    return fclose(f) || bad ? -1 : 0;
}

/* Receives one request from the I/O thread (all its frames): [arrival time, 8 bytes, then
 * who sent it][routing id][empty delimiter, REQ peers only][payload: the Request][raw data
 * frames its tensors name, at most EDGE_MAX_FRAMES]. Returns 0 with the parts filled (payload
 * may be NULL when the shape is wrong: bad_shape is then 1), or -1 when nothing could be
 * read. */
#define WHO_MAX 160
typedef struct inbound {
    zmq_msg_t id, payload;
    zmq_msg_t data[EDGE_MAX_FRAMES]; /* (n_data) */
    int n_data;
    int has_id, has_payload, has_delim, bad_shape;
    double at_ms;      /* when the I/O thread read it (CLOCK_MONOTONIC) */
    char who[WHO_MAX]; /* the client, for the log: "key=NAME" (CURVE) or "peer=ADDRESS" */
} inbound;

static int s_recv(void *sock, inbound *in)
{
    memset(in, 0, sizeof(*in));
    char stamp[sizeof(double) + WHO_MAX];
    const int got = zmq_recv(sock, stamp, sizeof(stamp), ZMQ_DONTWAIT);
    if (got < (int)sizeof(double)) return -1;
    memcpy(&in->at_ms, stamp, sizeof(double));
    const int who_len = (got < (int)sizeof(stamp) ? got : (int)sizeof(stamp)) - (int)sizeof(double);
    snprintf(in->who, sizeof(in->who), "%.*s", who_len, stamp + sizeof(double));
    int frame = 0, more = 1;
    while (more) {
        zmq_msg_t m;
        zmq_msg_init(&m);
        if (zmq_msg_recv(&m, sock, 0) < 0) {
            zmq_msg_close(&m);
            in->bad_shape = 1;
            break;
        }
        more = zmq_msg_more(&m);
        if (frame == 0) {
            in->id = m;
            in->has_id = 1;
        } else if (frame == 1 && more && zmq_msg_size(&m) == 0) {
            in->has_delim = 1;
            zmq_msg_close(&m);
        } else if (!in->has_payload) {
            in->payload = m;
            in->has_payload = 1;
        } else if (in->n_data < EDGE_MAX_FRAMES) {
            in->data[in->n_data++] = m;
        } else {
            in->bad_shape = 1; /* too many frames: drained and refused */
            zmq_msg_close(&m);
        }
        frame++;
    }
    if (!in->has_payload) in->bad_shape = 1;
    return 0;
}

static void s_inbound_close(inbound *in)
{
    if (in->has_id) zmq_msg_close(&in->id);
    if (in->has_payload) zmq_msg_close(&in->payload);
    for (int i = 0; i < in->n_data; i++) zmq_msg_close(&in->data[i]);
}

/* Sends a reply in the envelope the request came in. A peer that has gone away
 * (EHOSTUNREACH) or cannot take more (EAGAIN) loses its reply; the server goes on. */
static void s_send(void *sock, inbound *in, const uint8_t *buf, size_t len)
{
    if (zmq_send(sock, zmq_msg_data(&in->id), zmq_msg_size(&in->id), ZMQ_SNDMORE | ZMQ_DONTWAIT) <
        0)
        return;
    if (in->has_delim && zmq_send(sock, "", 0, ZMQ_SNDMORE | ZMQ_DONTWAIT) < 0) return;
    zmq_send(sock, buf, len, ZMQ_DONTWAIT);
}

static void s_free_reply(void *data, void *hint)
{
    (void)hint;
    free(data);
}

/* s_send that hands buf (malloc'd) to ZeroMQ instead of copying it: ZeroMQ frees it once
 * the reply is on its way, and *buf_p is then NULL; still the caller's to free otherwise. */
static void s_send_take(void *sock, inbound *in, uint8_t **buf_p, size_t len)
{
    if (zmq_send(sock, zmq_msg_data(&in->id), zmq_msg_size(&in->id), ZMQ_SNDMORE | ZMQ_DONTWAIT) <
        0)
        return;
    if (in->has_delim && zmq_send(sock, "", 0, ZMQ_SNDMORE | ZMQ_DONTWAIT) < 0) return;
    zmq_msg_t m;
    if (zmq_msg_init_data(&m, *buf_p, len, s_free_reply, NULL)) {
        zmq_send(sock, *buf_p, len, ZMQ_DONTWAIT);
        return;
    }
    *buf_p = NULL; /* ZeroMQ's now, sent or not */
    if (zmq_msg_send(&m, sock, ZMQ_DONTWAIT) < 0) zmq_msg_close(&m);
}

/* Requests that change stored state: logged at info when they succeed. */
static int s_changes_state(const char *kind)
{
    /* An attend with k_new appends too, but stays at debug: a line per decode step and
     * layer would flood the log. */
    static const char *const kinds[] = {"create_session", "append",    "drop_session",
                                        "set_profile",    "calibrate", "delete_profile"};
    for (int i = 0; i < (int)(sizeof(kinds) / sizeof(*kinds)); i++)
        if (strcmp(kind, kinds[i]) == 0) return 1;
    return 0;
}

/* One line per request, naming the client (who), the server's request number and the
 * client's request id: info when it changed stored state (create, append, drop, a profile)
 * or when the client's request was refused, warn when the server could not do it, debug
 * for the other requests that went well. */
static void s_log_event(const fasa_service_event *ev, const char *who)
{
    const fasa_log_level level =
        ev->status == FASA_OK ? (s_changes_state(ev->kind) ? FASA_LOG_INFO : FASA_LOG_DEBUG)
        : ev->status == FASA_RESOURCE_EXHAUSTED || ev->status == FASA_INTERNAL ||
                ev->status == FASA_UNAVAILABLE
            ? FASA_LOG_WARN
            : FASA_LOG_INFO;
    if (!fasa_log_enabled(level)) return;
    fasa_log(level, ev->request_id, "n=%llu %s %s%s%s %s %.3f ms in=%zu out=%zu%s%s",
             (unsigned long long)ev->seq, *who ? who : "client=?", ev->kind,
             *ev->session_id ? (strcmp(ev->kind, "delete_profile") ? " session=" : " profile=")
                             : "",
             ev->session_id, fasa_status_name(ev->status), ev->ms, ev->bytes_in, ev->bytes_out,
             *ev->msg ? ": " : "", ev->msg);
}

static double s_now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return 1e3 * (double)t.tv_sec + 1e-6 * (double)t.tv_nsec;
}

/* The I/O thread: the ROUTER (clients), its end of the PAIR to the main thread, and the
 * ZAP handler. Requests go to the main thread only while the PAIR can take them (its
 * high-water mark, IO_HWM, bounds what waits there; beyond it ZeroMQ's own queue on the
 * ROUTER does, and then TCP backpressure), so memory stays bounded.
 *
 * It also remembers every request handed over and not yet answered (the peer and the
 * request id), so that it can answer them itself when the main thread cannot:
 *   - stopping (SIGTERM/SIGINT, or after a Shutdown): every new request gets UNAVAILABLE
 *     at once, while the main thread finishes its request, answers those already handed
 *     over (UNAVAILABLE, in order) and writes the final snapshot; should it make no
 *     progress for IO_STUCK_MS (stuck in an exchange with a rank that died on another
 *     host: mpirun sends SIGTERM then), every waiting request but the one it runs gets
 *     UNAVAILABLE here; past --stop-grace the job is given up as failed;
 *   - failed (a dead or hung rank, an MPI error: liveness.h): every waiting request and
 *     every new one gets UNAVAILABLE with the reason, and IO_FAIL_EXIT_MS later the
 *     process exits 1 (the main thread may be stuck in an exchange with the dead rank;
 *     mpirun then ends the other ranks, and the scheduler restarts the job: --restore). */
#define IO_ENDPOINT "inproc://fasa-io"
#define IO_HWM 16
#define IO_PENDING_MAX 4096
#define IO_FAIL_EXIT_MS 500
#define IO_STUCK_MS 1000
#define IO_ID_MAX 255
typedef struct io_pending {
    uint64_t rid;
    unsigned char id[IO_ID_MAX];
    size_t id_len;
    int delim;
} io_pending;
enum { IO_NORMAL, IO_STOPPING, IO_FAILED };
typedef struct io_thread {
    void *router, *pair;
    fasa_zap *zap;
    fasa_guard *guard;     /* the cap on unfinished requests (conn_guard.h) */
    long long max_message; /* larger requests are refused here (s_io_refuse) */
    pthread_t th;
    io_pending *pend; /* (IO_PENDING_MAX) in arrival order */
    int n_pend, mode;
    double mode_since_ms, progress_ms; /* when the mode began; the main thread's last reply */
    long stop_grace_s;
} io_thread;

/* Set by the main thread once its loop ends (a signal or a Shutdown). */
static atomic_int s_stopping;

/* Answers one peer with UNAVAILABLE msg, without the main thread. */
static void s_io_refuse(io_thread *io, const unsigned char *id, size_t id_len, int delim,
                        uint64_t rid, const char *msg)
{
    uint8_t *reply = NULL;
    size_t len = 0;
    if (fasa_service_error(rid, FASA_UNAVAILABLE, msg, &reply, &len)) return;
    if (zmq_send(io->router, id, id_len, ZMQ_SNDMORE | ZMQ_DONTWAIT) >= 0 &&
        (!delim || zmq_send(io->router, "", 0, ZMQ_SNDMORE | ZMQ_DONTWAIT) >= 0))
        zmq_send(io->router, reply, len, ZMQ_DONTWAIT);
    free(reply);
}

/* The reason given to clients in the current mode. */
static void s_io_reason(const io_thread *io, char *buf, size_t len)
{
    if (io->mode == IO_FAILED)
        snprintf(buf, len,
                 "the server cannot go on: %s; it exits so that its job is restarted (with "
                 "--restore from its state dir)",
                 fasa_liveness_failure() ? fasa_liveness_failure() : "a rank failed");
    else
        snprintf(buf, len, "the server is shutting down");
}

/* Answers the pending requests from index `from` on, and forgets them. */
static void s_io_refuse_pending(io_thread *io, int from)
{
    char why[700];
    s_io_reason(io, why, sizeof(why));
    for (int i = from; i < io->n_pend; i++) {
        const io_pending *p = &io->pend[i];
        s_io_refuse(io, p->id, p->id_len, p->delim, p->rid, why);
    }
    if (from < io->n_pend) io->n_pend = from;
}

/* Enters a mode (once), answering what it says to answer. */
static void s_io_mode(io_thread *io, int mode)
{
    if (mode <= io->mode) return;
    io->mode = mode;
    io->mode_since_ms = s_now_ms();
    if (mode == IO_FAILED) s_io_refuse_pending(io, 0);
}

/* A request over --max-message (which ZeroMQ still reads whole: its ZMQ_MAXMSGSIZE is
 * --max-message + --max-pending, and the guard bounds what all of them hold) is answered
 * here, RESOURCE_EXHAUSTED naming the limit, and logged; it never reaches the main thread.
 * f: the routing id, [the empty delimiter,] the payload (f[h]) [, its data frames]; len: the
 * payload's bytes and its data frames'. */
static void s_io_refuse_oversized(io_thread *io, zmq_msg_t *f, int h, size_t len)
{
    zmq_msg_t *payload = &f[h];
    const uint64_t rid = edge_scan_request_id(zmq_msg_data(payload), zmq_msg_size(payload));
    const char *peer = zmq_msg_gets(payload, "Peer-Address");
    char msg[200];
    snprintf(msg, sizeof(msg),
             "request: %zu bytes is over this server's --max-message of %lld bytes (split it, "
             "or raise the server's --max-message)",
             len, io->max_message);
    fasa_log(FASA_LOG_WARN, rid, "refused a request of %zu bytes from %s: over --max-message %lld",
             len, peer ? peer : "?", io->max_message);
    uint8_t *buf = NULL;
    size_t buf_len = 0;
    if (fasa_service_error(rid, FASA_RESOURCE_EXHAUSTED, msg, &buf, &buf_len)) return;
    if (zmq_send(io->router, zmq_msg_data(&f[0]), zmq_msg_size(&f[0]),
                 ZMQ_SNDMORE | ZMQ_DONTWAIT) >= 0 &&
        (h == 1 || zmq_send(io->router, "", 0, ZMQ_SNDMORE | ZMQ_DONTWAIT) >= 0))
        zmq_send(io->router, buf, buf_len, ZMQ_DONTWAIT);
    free(buf);
}

/* One request from the ROUTER to the main thread, stamped with its arrival time and its
 * sender (or, when stopping or failed, answered UNAVAILABLE here); -1 when none is waiting.
 * Its frames are read whole first (a well-formed one has 2 or 3, and its raw data frames),
 * so that the guard learns it was taken and an oversized one is refused here. */
#define IO_MAX_FRAMES (3 + EDGE_MAX_FRAMES)
static int s_io_request(io_thread *io)
{
    zmq_msg_t f[IO_MAX_FRAMES];
    zmq_msg_init(&f[0]);
    if (zmq_msg_recv(&f[0], io->router, ZMQ_DONTWAIT) < 0) {
        zmq_msg_close(&f[0]);
        return -1;
    }
    const double at = s_now_ms();
    int n = 1, extra = 0, broken = 0, more = zmq_msg_more(&f[0]);
    int64_t bytes = (int64_t)zmq_msg_size(&f[0]);
    while (more) {
        zmq_msg_t m;
        zmq_msg_init(&m);
        if (zmq_msg_recv(&m, io->router, 0) < 0) {
            zmq_msg_close(&m);
            broken = 1;
            break;
        }
        more = zmq_msg_more(&m);
        bytes += (int64_t)zmq_msg_size(&m);
        if (n < IO_MAX_FRAMES)
            f[n++] = m;
        else
            zmq_msg_close(&m), extra++;
    }
    fasa_guard_seen(io->guard, zmq_msg_get(&f[n - 1], ZMQ_SRCFD), bytes, n + extra);
    /* f[h]: the Request (after the REQ delimiter, if any), then its data frames. */
    const int h = n >= 3 && zmq_msg_size(&f[1]) == 0 ? 2 : 1;
    size_t payload_bytes = 0;
    for (int i = h; i < n; i++) payload_bytes += zmq_msg_size(&f[i]);
    if (!broken && !extra && n > h && (long long)payload_bytes > io->max_message) {
        s_io_refuse_oversized(io, f, h, payload_bytes);
        for (int i = 0; i < n; i++) zmq_msg_close(&f[i]);
        return 0;
    }
    /* Who waits for the reply (routing id, delimiter, request id), so that a stop or a dead
     * rank can answer every request in flight. */
    io_pending p = {0};
    const int tracked = zmq_msg_size(&f[0]) <= IO_ID_MAX;
    if (tracked) memcpy(p.id, zmq_msg_data(&f[0]), p.id_len = zmq_msg_size(&f[0]));
    p.delim = h == 2;
    if (n > h) p.rid = fasa_service_request_id(zmq_msg_data(&f[h]), zmq_msg_size(&f[h]));
    if (io->mode != IO_NORMAL) {
        for (int i = 0; i < n; i++) zmq_msg_close(&f[i]);
        if (tracked) {
            char why[700];
            s_io_reason(io, why, sizeof(why));
            s_io_refuse(io, p.id, p.id_len, p.delim, p.rid, why);
        }
        return 0;
    }
    /* The stamp: the arrival time, then who sent it (the ZAP user id is the client key's
     * name under CURVE; otherwise the peer's address). ZeroMQ attaches them to the frames
     * the peer sent, not to the routing id the ROUTER adds. */
    zmq_msg_t *src = n >= 2 ? &f[1] : &f[0];
    const char *user = zmq_msg_gets(src, "User-Id");
    const char *peer = zmq_msg_gets(src, "Peer-Address");
    char stamp[sizeof(double) + WHO_MAX];
    memcpy(stamp, &at, sizeof(at));
    const int who =
        snprintf(stamp + sizeof(at), WHO_MAX, "%s%.120s", user && *user ? "key=" : "peer=",
                 user && *user ? user
                 : peer        ? peer
                               : "?");
    zmq_send(io->pair, stamp, sizeof(at) + (size_t)(who < WHO_MAX ? who : WHO_MAX - 1),
             ZMQ_SNDMORE);
    for (int i = 0; i < n; i++) {
        const int last = i == n - 1 && !extra && !broken;
        zmq_msg_send(&f[i], io->pair, last ? 0 : ZMQ_SNDMORE);
        zmq_msg_close(&f[i]);
    }
    /* Frames beyond IO_MAX_FRAMES were dropped: one more ends the message, so the main
     * thread still sees too many and refuses it. */
    if (extra || broken) zmq_send(io->pair, "", 0, 0);
    if (tracked && io->n_pend < IO_PENDING_MAX) io->pend[io->n_pend++] = p;
    return 0;
}

/* Forgets the pending request a reply answers: 1 when it was pending. */
static int s_io_answered(io_thread *io, const void *id, size_t id_len, uint64_t rid)
{
    for (int i = 0; i < io->n_pend; i++) {
        io_pending *p = &io->pend[i];
        if (p->rid == rid && p->id_len == id_len && memcmp(p->id, id, id_len) == 0) {
            memmove(p, p + 1, (size_t)(io->n_pend - i - 1) * sizeof(*p));
            io->n_pend--;
            return 1;
        }
    }
    return 0;
}

/* One reply from the main thread to the ROUTER: 0; 1 for the stop message (one empty
 * frame); -1 when none is waiting. A peer gone away or too slow loses its reply; so does
 * one already answered here (stopping or failed). The main thread's replies are [routing
 * id][empty delimiter, REQ peers only][payload]. */
#define IO_REPLY_FRAMES 3
static int s_io_reply(io_thread *io)
{
    zmq_msg_t f[IO_REPLY_FRAMES];
    zmq_msg_init(&f[0]);
    if (zmq_msg_recv(&f[0], io->pair, ZMQ_DONTWAIT) < 0) {
        zmq_msg_close(&f[0]);
        return -1;
    }
    if (!zmq_msg_more(&f[0]) && zmq_msg_size(&f[0]) == 0) {
        zmq_msg_close(&f[0]);
        return 1;
    }
    int n = 1, extra = 0, more = zmq_msg_more(&f[0]);
    while (more) {
        zmq_msg_t m;
        zmq_msg_init(&m);
        if (zmq_msg_recv(&m, io->pair, 0) < 0) {
            zmq_msg_close(&m);
            break;
        }
        more = zmq_msg_more(&m);
        if (n < IO_REPLY_FRAMES) {
            f[n++] = m;
        } else {
            zmq_msg_close(&m);
            extra = 1;
        }
    }
    const uint64_t rid = fasa_service_request_id(zmq_msg_data(&f[n - 1]), zmq_msg_size(&f[n - 1]));
    const int was_pending = s_io_answered(io, zmq_msg_data(&f[0]), zmq_msg_size(&f[0]), rid);
    io->progress_ms = s_now_ms();
    int ok = !extra && (io->mode == IO_NORMAL || was_pending);
    for (int i = 0; i < n; i++) {
        if (ok && zmq_msg_send(&f[i], io->router, (i + 1 < n ? ZMQ_SNDMORE : 0) | ZMQ_DONTWAIT) < 0)
            ok = 0;
        zmq_msg_close(&f[i]);
    }
    return 0;
}

static void *s_io_main(void *arg)
{
    io_thread *io = arg;
    int blocked = 0; /* the PAIR was full: wait until it can take a request */
    double next_check = 0;
    for (;;) {
        zmq_pollitem_t it[5] = {{io->router, 0, blocked ? 0 : ZMQ_POLLIN, 0},
                                {io->pair, 0, ZMQ_POLLIN | (blocked ? ZMQ_POLLOUT : 0), 0},
                                {fasa_guard_socket(io->guard), 0, ZMQ_POLLIN, 0},
                                {fasa_zap_socket(io->zap), 0, ZMQ_POLLIN, 0},
                                {fasa_zap_watch_socket(io->zap), 0, ZMQ_POLLIN, 0}};
        const int n_items = io->zap && fasa_zap_watch_socket(io->zap) ? 5 : io->zap ? 4 : 3;
        const int wait_ms = fasa_guard_interval_ms(io->guard) < LIVENESS_POLL_MS
                                ? fasa_guard_interval_ms(io->guard)
                                : LIVENESS_POLL_MS;
        if (zmq_poll(it, n_items, wait_ms) < 0) {
            if (errno == EINTR) continue;
            fasa_log(FASA_LOG_ERROR, 0, "I/O thread: zmq_poll: %s", zmq_strerror(errno));
            return NULL;
        }
        if (it[2].revents & ZMQ_POLLIN) {
            /* An accept makes checks frequent at once (fasa_guard_interval_ms), not after the
             * quiet interval the last check chose. */
            fasa_guard_events(io->guard);
            const double soon = s_now_ms() + fasa_guard_interval_ms(io->guard);
            if (soon < next_check) next_check = soon;
        }
        if (io->zap && ((it[3].revents | (n_items > 4 ? it[4].revents : 0)) & ZMQ_POLLIN))
            fasa_zap_serve(io->zap);
        double now = s_now_ms();
        if (now >= next_check) {
            fasa_guard_check(io->guard);
            next_check = now + fasa_guard_interval_ms(io->guard);
        }
        /* Replies first: one the main thread sent before a stop still goes out in order. */
        for (int r; (r = s_io_reply(io)) >= 0;)
            if (r == 1) return NULL;
        if (fasa_liveness_failure()) s_io_mode(io, IO_FAILED);
        if (s_stop || atomic_load(&s_stopping)) s_io_mode(io, IO_STOPPING);
        now = s_now_ms();
        if (io->mode == IO_STOPPING) {
            const double since =
                io->progress_ms > io->mode_since_ms ? io->progress_ms : io->mode_since_ms;
            if (io->n_pend > 1 && now - since > IO_STUCK_MS) s_io_refuse_pending(io, 1);
            if (now - io->mode_since_ms > 1e3 * io->stop_grace_s)
                fasa_liveness_fail("the stop did not finish within --stop-grace %ld s",
                                   io->stop_grace_s);
            if (fasa_liveness_failure()) s_io_mode(io, IO_FAILED);
        }
        if (io->mode == IO_FAILED && now - io->mode_since_ms > IO_FAIL_EXIT_MS) {
            fasa_log(FASA_LOG_ERROR, 0, "fasa-server: exiting with status 1: %s",
                     fasa_liveness_failure());
            _exit(1);
        }
        blocked = 0;
        for (;;) {
            int ev = 0;
            size_t ev_len = sizeof(ev);
            zmq_getsockopt(io->pair, ZMQ_EVENTS, &ev, &ev_len);
            if (io->mode == IO_NORMAL && !(ev & ZMQ_POLLOUT)) {
                blocked = 1;
                break;
            }
            if (s_io_request(io)) break;
        }
    }
}

/* --snapshot-interval: between requests (rank 0 drives MPI from this one thread), every
 * session changed since its last snapshot is written once the interval has passed. */
static void s_snapshot_due(fasa_service *svc, const server_config *o, struct timespec *last)
{
    if (o->snapshot_interval <= 0) return;
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    if (now.tv_sec - last->tv_sec < o->snapshot_interval) return;
    *last = now;
    const int n = fasa_service_snapshot_changed(svc);
    if (n > 0)
        fasa_log(FASA_LOG_INFO, 0, "snapshot: %d changed session%s written", n, n > 1 ? "s" : "");
}

/* A stop with --state-dir writes every session changed since its last snapshot (all of
 * them without --snapshot-interval) and the named profiles, so that a restart with
 * --restore finds what was acknowledged. The I/O thread gives up on it past --stop-grace.
 * 0, or -1 when a snapshot failed (logged) or a rank is gone (nothing can be written). */
static int s_final_snapshot(fasa_service *svc, const server_config *o)
{
    if (!*o->state_dir) return 0;
    if (fasa_liveness_failure()) {
        fasa_log(FASA_LOG_ERROR, 0, "stop: no final snapshot: %s", fasa_liveness_failure());
        return -1;
    }
    const double t0 = s_now_ms();
    const int n = fasa_service_snapshot_changed(svc);
    fasa_log(n < 0 ? FASA_LOG_ERROR : FASA_LOG_INFO, 0,
             "stop: final snapshot %s: %d session%s written in %.3f s (--stop-grace %ld s)",
             n < 0 ? "FAILED" : "done", n < 0 ? 0 : n, n == 1 ? "" : "s", 1e-3 * (s_now_ms() - t0),
             o->stop_grace);
    return n < 0 ? -1 : 0;
}

/* Reads the secret key and the allow-list, starts the ZAP handler and makes sock a CURVE
 * server (the connection guard, which owns the socket's monitor, passes the failed
 * handshakes on to it). 0, or -1 after logging why. */
static int s_curve_setup(void *ctx, void *sock, const server_config *o, fasa_zap **zap_p)
{
    char err[1200], secret[FASA_KEY_Z85_LEN + 1];
    fasa_zap *zap = NULL;
    if (fasa_keyfile_read(o->curve_secret, 1, secret, err, sizeof(err)) ||
        !(zap = fasa_zap_load(o->authorized_keys, err, sizeof(err))) ||
        fasa_zap_bind(zap, ctx, err, sizeof(err)) ||
        fasa_zap_curve_server(sock, secret, err, sizeof(err))) {
        fasa_log(FASA_LOG_ERROR, 0, "%s", err);
        fasa_zap_destroy(&zap);
        memset(secret, 0, sizeof(secret));
        return -1;
    }
    memset(secret, 0, sizeof(secret));
    fasa_log(FASA_LOG_INFO, 0, "curve: on; %zu authorized client key%s from %s",
             fasa_zap_n_keys(zap), fasa_zap_n_keys(zap) == 1 ? "" : "s", o->authorized_keys);
    *zap_p = zap;
    return 0;
}

/* Stops the I/O thread and closes both ends of the PAIR. */
static void s_stop_io(void *pair, io_thread *io)
{
    zmq_send(pair, "", 0, 0); /* stop */
    pthread_join(io->th, NULL);
    zmq_close(pair);
    zmq_close(io->pair);
    free(io->pend);
    io->pend = NULL;
}

static int s_serve(fasa_service *svc, const server_config *o, int n_ranks)
{
    void *ctx = zmq_ctx_new();
    void *sock = ctx ? zmq_socket(ctx, ZMQ_ROUTER) : NULL;
    if (!sock) {
        fasa_log(FASA_LOG_ERROR, 0, "cannot create a ZeroMQ socket: %s", zmq_strerror(errno));
        if (ctx) zmq_ctx_term(ctx);
        return 1;
    }
    /* Frames up to --max-message + --max-pending are read, so that one over --max-message
     * still gets an answer (s_io_refuse); the guard caps what all of them hold together. */
    const int64_t maxmsg = o->max_message + o->max_pending;
    /* A bounded queue: 64 requests of up to --max-message bytes wait at most; beyond that
     * ZeroMQ stops reading from the peers (backpressure) instead of buffering. */
    const int one = 1, linger = 1000, hwm = 64;
    zmq_setsockopt(sock, ZMQ_MAXMSGSIZE, &maxmsg, sizeof(maxmsg));
    if (o->peer_timeout > 0) {
        /* A PING every half timeout; a peer that then finishes no message (a PONG, a
         * request) within the other half is dropped: a stalled or trickling partial frame
         * cannot be held longer than --peer-timeout. TTL tells clients the same. */
        const int half = (int)(o->peer_timeout * 500), full = (int)(o->peer_timeout * 1000);
        zmq_setsockopt(sock, ZMQ_HEARTBEAT_IVL, &half, sizeof(half));
        zmq_setsockopt(sock, ZMQ_HEARTBEAT_TIMEOUT, &half, sizeof(half));
        zmq_setsockopt(sock, ZMQ_HEARTBEAT_TTL, &full, sizeof(full));
        zmq_setsockopt(sock, ZMQ_HANDSHAKE_IVL, &full, sizeof(full));
    }
    zmq_setsockopt(sock, ZMQ_ROUTER_MANDATORY, &one, sizeof(one));
    zmq_setsockopt(sock, ZMQ_LINGER, &linger, sizeof(linger));
    zmq_setsockopt(sock, ZMQ_RCVHWM, &hwm, sizeof(hwm));
    zmq_setsockopt(sock, ZMQ_SNDHWM, &hwm, sizeof(hwm));
    int rc = 0;
    /* CURVE: the ZAP handler binds before the ROUTER, so no client slips in unchecked. */
    fasa_zap *zap = NULL;
    fasa_guard *guard = NULL;
    if (*o->curve_secret && s_curve_setup(ctx, sock, o, &zap)) {
        rc = 1;
        goto done;
    }
    /* The guard's monitor starts before the bind, so it sees every connection. */
    guard = fasa_guard_new(ctx, sock, o->max_pending, zap);
    if (!guard) {
        fasa_log(FASA_LOG_ERROR, 0, "cannot watch the connections: %s", zmq_strerror(errno));
        rc = 1;
        goto done;
    }
    if (zmq_bind(sock, o->bind) != 0) {
        fasa_log(FASA_LOG_ERROR, 0, "cannot bind %s: %s", o->bind, zmq_strerror(errno));
        rc = 1;
        goto done;
    }
    char endpoint[256] = "";
    size_t ep_len = sizeof(endpoint);
    zmq_getsockopt(sock, ZMQ_LAST_ENDPOINT, endpoint, &ep_len);
    char pid[32];
    snprintf(pid, sizeof(pid), "%ld", (long)getpid());
    if ((*o->endpoint_file && s_write_file(o->endpoint_file, endpoint)) ||
        (*o->pid_file && s_write_file(o->pid_file, pid))) {
        fasa_log(FASA_LOG_ERROR, 0, "cannot write %s: %s",
                 *o->endpoint_file ? o->endpoint_file : o->pid_file, strerror(errno));
        rc = 1;
        goto done;
    }
    char settings[1600];
    server_config_describe(o, settings, sizeof(settings));
    fasa_log(FASA_LOG_INFO, 0, "fasa-server: listening on %s (%d rank%s: %s, pid %s; %s)", endpoint,
             n_ranks, n_ranks > 1 ? "s" : "",
             n_ranks > 1 ? "coordinator + workers" : "one rank holds the shard", pid, settings);

    /* The I/O thread takes the ROUTER and the ZAP handler from here on; it never sees
     * SIGTERM or SIGINT (they stop this thread's loop). */
    io_thread io = {.router = sock,
                    .zap = zap,
                    .guard = guard,
                    .max_message = o->max_message,
                    .pend = calloc(IO_PENDING_MAX, sizeof(io_pending)),
                    .stop_grace_s = o->stop_grace};
    void *pair = zmq_socket(ctx, ZMQ_PAIR);
    io.pair = zmq_socket(ctx, ZMQ_PAIR);
    const int io_hwm = IO_HWM, zero = 0;
    if (pair) zmq_setsockopt(pair, ZMQ_RCVHWM, &io_hwm, sizeof(io_hwm));
    if (io.pair) zmq_setsockopt(io.pair, ZMQ_SNDHWM, &io_hwm, sizeof(io_hwm));
    if (pair) zmq_setsockopt(pair, ZMQ_LINGER, &zero, sizeof(zero));
    if (io.pair) zmq_setsockopt(io.pair, ZMQ_LINGER, &zero, sizeof(zero));
    sigset_t block, old;
    sigemptyset(&block);
    sigaddset(&block, SIGTERM);
    sigaddset(&block, SIGINT);
    pthread_sigmask(SIG_BLOCK, &block, &old);
    const int started = io.pend && pair && io.pair && zmq_bind(pair, IO_ENDPOINT) == 0 &&
                        zmq_connect(io.pair, IO_ENDPOINT) == 0 &&
                        pthread_create(&io.th, NULL, s_io_main, &io) == 0;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (!started) {
        fasa_log(FASA_LOG_ERROR, 0, "cannot start the I/O thread: %s", zmq_strerror(errno));
        if (pair) zmq_close(pair);
        if (io.pair) zmq_close(io.pair);
        rc = 1;
        goto done;
    }

    /* --metrics-bind: the HTTP thread asks this one for the numbers (metrics_http.h). */
    fasa_metrics *metrics = NULL;
    if (*o->metrics_bind) {
        char err[600];
        if (!(metrics = fasa_metrics_start(ctx, o->metrics_bind, err, sizeof(err)))) {
            fasa_log(FASA_LOG_ERROR, 0, "%s", err);
            s_stop_io(pair, &io);
            rc = 1;
            goto done;
        }
        fasa_log(FASA_LOG_INFO, 0, "metrics: http://%.*s:%d/metrics",
                 (int)(strrchr(o->metrics_bind, ':') - o->metrics_bind), o->metrics_bind,
                 fasa_metrics_port(metrics));
    }
    int shutdown = 0;
    struct timespec last_snap;
    clock_gettime(CLOCK_MONOTONIC, &last_snap);
    while (!shutdown && !s_stop) {
        s_snapshot_due(svc, o, &last_snap);
        zmq_pollitem_t items[2] = {
            {pair, 0, ZMQ_POLLIN, 0},
            {metrics ? fasa_metrics_socket(metrics) : NULL, 0, ZMQ_POLLIN, 0}};
        /* Blocks (no spinning) until a request, a scrape or a signal arrives. */
        if (zmq_poll(items, metrics ? 2 : 1, 1000) < 0) {
            if (errno == EINTR) continue;
            fasa_log(FASA_LOG_ERROR, 0, "zmq_poll: %s", zmq_strerror(errno));
            rc = 1;
            break;
        }
        if (metrics && (items[1].revents & ZMQ_POLLIN)) fasa_metrics_answer(metrics, svc);
        inbound in;
        if (!(items[0].revents & ZMQ_POLLIN) || s_recv(pair, &in)) continue;
        fasa_service_set_wait(svc, s_now_ms() - in.at_ms);
        uint8_t *reply = NULL;
        size_t reply_len = 0;
        int failed;
        if (in.bad_shape) {
            failed = fasa_service_refuse(
                svc,
                in.has_payload
                    ? fasa_service_request_id(zmq_msg_data(&in.payload), zmq_msg_size(&in.payload))
                    : 0,
                FASA_INVALID_ARGUMENT,
                in.has_payload ? "request: more than " EDGE_MAX_FRAMES_TEXT
                                 " data frames after the Request"
                               : "request: expected a payload frame (the Request)",
                in.has_payload ? zmq_msg_size(&in.payload) : 0, &reply, &reply_len);
        } else {
            edge_frame fr[EDGE_MAX_FRAMES];
            for (int i = 0; i < in.n_data; i++)
                fr[i] = (edge_frame){zmq_msg_data(&in.data[i]), zmq_msg_size(&in.data[i])};
            failed = fasa_service_handle_frames(svc, zmq_msg_data(&in.payload),
                                                zmq_msg_size(&in.payload), fr, in.n_data, &reply,
                                                &reply_len, &shutdown);
        }
        if (!failed) s_send_take(pair, &in, &reply, reply_len);
        free(reply);
        s_inbound_close(&in);
        s_log_event(fasa_service_last_event(svc), in.who);
    }
    fasa_log(FASA_LOG_INFO, 0, "fasa-server: stopping (%s)",
             s_stop ? "signal" : "shutdown request");
    atomic_store(&s_stopping, 1); /* the I/O thread answers new requests from now on */
    /* Requests already queued get UNAVAILABLE rather than silence, so clients retry
     * elsewhere instead of waiting out their timeout: whatever the I/O thread hands over
     * until none has come for 100 ms. */
    for (int drained = 0; drained < 1000; drained++) {
        zmq_pollitem_t item = {pair, 0, ZMQ_POLLIN, 0};
        inbound in;
        if (zmq_poll(&item, 1, 100) <= 0 || s_recv(pair, &in)) break;
        uint8_t *reply = NULL;
        size_t reply_len = 0;
        uint64_t rid = 0;
        if (!in.bad_shape)
            rid = fasa_service_request_id(zmq_msg_data(&in.payload), zmq_msg_size(&in.payload));
        if (!fasa_service_error(rid, FASA_UNAVAILABLE, "the server is shutting down", &reply,
                                &reply_len))
            s_send(pair, &in, reply, reply_len);
        free(reply);
        s_inbound_close(&in);
    }
    fasa_metrics_stop(&metrics);
    if (s_final_snapshot(svc, o)) rc = 1;
    s_stop_io(pair, &io);
done:
    fasa_guard_destroy(&guard);
    zmq_close(sock);
    fasa_zap_destroy(&zap);
    zmq_ctx_term(ctx);
    if (*o->pid_file) unlink(o->pid_file);
    if (*o->endpoint_file) unlink(o->endpoint_file);
    return rc;
}

int main(int argc, char **argv)
{
    int provided, rank, size;
    if (MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS) {
        fprintf(stderr, "fasa-server: MPI_Init_thread failed\n");
        return 1;
    }
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    if (provided < MPI_THREAD_FUNNELED) {
        if (!rank) fprintf(stderr, "fasa-server: MPI gives no MPI_THREAD_FUNNELED support\n");
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    /* Rank 0 reads the settings and tells the workers whether to run. */
    server_config o;
    int go[2] = {0, FASA_LOG_INFO};
    if (rank == 0) {
        char err[600];
        go[0] = server_config_load(&o, argc, argv, stdout, err, sizeof(err));
        if (go[0] == 2) fprintf(stderr, "fasa-server: %s\n", err);
        go[1] = (int)o.log_level;
    }
    MPI_Bcast(go, 2, MPI_INT, 0, MPI_COMM_WORLD);
    if (go[0]) {
        MPI_Finalize();
        return go[0] == 1 ? 0 : 2;
    }
    fasa_log_setup(rank, (fasa_log_level)go[1]);
    /* Every rank tells rank 0 where it runs, for the watchdog (liveness.h). */
    if (size > 1 && fasa_liveness_gather(MPI_COMM_WORLD) && rank == 0)
        fasa_log(FASA_LOG_WARN, 0,
                 "liveness: cannot gather the ranks' PIDs; dead ranks are "
                 "seen only through MPI errors");
    /* Threads per rank for the shards' steps, read once here (worker/pool.h): FASA_THREADS,
     * else SLURM_CPUS_PER_TASK, else the CPUs this rank may run on. */
    char why[128];
    const int n_threads = fasa_threads_from_env(why, sizeof(why));
    if (n_threads < 1) {
        fasa_log(FASA_LOG_ERROR, 0, "%s", why);
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    /* --reserve: the ranks that hold shards (every worker, or rank 0 alone) map and fault in
     * their KV memory now, on their threads, before the server answers (shard_reserve). */
    long long reserve = rank == 0 ? o.reserve : 0;
    if (size > 1) MPI_Bcast(&reserve, 1, MPI_LONG_LONG, 0, MPI_COMM_WORLD);
    if (reserve > 0 && (rank != 0 || size == 1)) {
        double sec = 0;
        if (shard_reserve((size_t)reserve, n_threads, &sec)) {
            fasa_log(FASA_LOG_ERROR, 0, "--reserve %lld: cannot map and fault in that much memory",
                     reserve);
            MPI_Abort(MPI_COMM_WORLD, 1);
        }
        fasa_log(FASA_LOG_INFO, 0,
                 "reserve: %.1f MiB mapped and faulted in %.3f s on %d thread%s (%.2f GB/s)",
                 (double)reserve / 1048576.0, sec, n_threads, n_threads > 1 ? "s" : "",
                 sec > 0 ? (double)reserve / sec / 1e9 : 0.0);
    }

    if (rank != 0) {
        /* Workers leave signals to rank 0, which stops them in order. */
        signal(SIGTERM, SIG_IGN);
        signal(SIGINT, SIG_IGN);
        fasa_log(FASA_LOG_DEBUG, 0, "worker up");
        fasa_log(FASA_LOG_DEBUG, 0, "worker: %d thread(s)", n_threads);
        const int rc = worker_mpi_loop_threads(MPI_COMM_WORLD, n_threads);
        if (rc) {
            fasa_log(FASA_LOG_ERROR, 0, "worker protocol failure; aborting the job");
            MPI_Abort(MPI_COMM_WORLD, 1);
        }
        fasa_log(FASA_LOG_DEBUG, 0, "worker stopped");
        MPI_Finalize();
        return 0;
    }

    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = s_on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    /* Requests of up to tens of MB are allocated and freed all the time (the ZeroMQ frame,
     * the decoded copy, the reply). Serving them from the heap instead of fresh mmaps saves
     * the page faults and munmaps that otherwise dominate an append's cost. */
    mallopt(M_MMAP_THRESHOLD, 32 << 20);
    mallopt(M_TRIM_THRESHOLD, 512 << 20);

    fasa_engine_t *engine = NULL;
    if (size == 1) {
        fasa_transport t;
        if (fasa_transport_local_threads(&t, 1, n_threads) == 0) {
            engine = fasa_engine_new_with(&t, (int)o.block);
            if (!engine) t.destroy(t.ctx);
        }
    } else {
        fasa_transport t;
        if (fasa_transport_mpi(&t, MPI_COMM_WORLD) == 0) {
            engine = fasa_engine_new_with(&t, (int)o.block);
            if (!engine) t.destroy(t.ctx);
        }
    }
    if (!engine) {
        fasa_log(FASA_LOG_ERROR, 0, "out of memory starting the engine");
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    fasa_engine_set_memory_limit(engine, o.memory_limit);
    fasa_engine_set_max_sessions(engine, o.max_sessions); /* a restore's too */
    /* Workers open the files by the path rank 0 gives them: make it absolute, so a rank
     * started in another directory (srun, a remote host) finds the same place. */
    char cwd[PATH_MAX], abs_dir[sizeof(o.state_dir)];
    if (*o.state_dir && o.state_dir[0] != '/' && getcwd(cwd, sizeof(cwd)) &&
        snprintf(abs_dir, sizeof(abs_dir), "%s/%s", cwd, o.state_dir) < (int)sizeof(abs_dir))
        memcpy(o.state_dir, abs_dir, sizeof(abs_dir));
    if (*o.tier_dir && o.tier_dir[0] != '/' && getcwd(cwd, sizeof(cwd)) &&
        snprintf(abs_dir, sizeof(abs_dir), "%s/%s", cwd, o.tier_dir) < (int)sizeof(o.tier_dir))
        memcpy(o.tier_dir, abs_dir, sizeof(o.tier_dir));
    fasa_engine_set_merge_eps(engine, o.merge_eps);
    if (fasa_engine_set_tier_dir(engine, o.tier_dir)) {
        fasa_log(FASA_LOG_ERROR, 0, "out of memory starting the engine");
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    const fasa_service_opts so = {.tier = o.tier,
                                  .has_tier_dir = *o.tier_dir != 0,
                                  .n_ranks = size,
                                  .max_message = (size_t)o.max_message,
                                  .max_sessions = o.max_sessions,
                                  .deadline_ms = (uint32_t)o.deadline_ms,
                                  .state_dir = o.state_dir,
                                  .load_root = o.load_root,
                                  .wal = o.wal};
    fasa_service *svc = fasa_service_new(&engine, size == 1 ? 1 : size - 1, &so);
    if (!svc) {
        fasa_log(FASA_LOG_ERROR, 0, "out of memory starting the service");
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    struct stat sd;
    if (*o.state_dir && (stat(o.state_dir, &sd) || !S_ISDIR(sd.st_mode))) {
        fasa_log(FASA_LOG_ERROR, 0, "--state-dir %s: not a directory (create it first)",
                 o.state_dir);
        fasa_service_destroy(&svc);
        MPI_Finalize();
        return 2;
    }
    if (*o.state_dir) {
        long long bytes = 0;
        const int gone = fasa_snapshot_clean(o.state_dir, NULL, &bytes);
        if (gone > 0)
            fasa_log(FASA_LOG_INFO, 0,
                     "state dir: removed %d file%s (%lld bytes) left by an unfinished snapshot",
                     gone, gone == 1 ? "" : "s", bytes);
    }
    if (*o.tier_dir &&
        (stat(o.tier_dir, &sd) || !S_ISDIR(sd.st_mode) || access(o.tier_dir, W_OK))) {
        fasa_log(FASA_LOG_ERROR, 0, "--tier-dir %s: not a writable directory (create it first)",
                 o.tier_dir);
        fasa_service_destroy(&svc);
        MPI_Finalize();
        return 2;
    }
    if (*o.load_root && (stat(o.load_root, &sd) || !S_ISDIR(sd.st_mode))) {
        fasa_log(FASA_LOG_ERROR, 0, "--load-root %s: not a directory", o.load_root);
        fasa_service_destroy(&svc);
        MPI_Finalize();
        return 2;
    }
    if (o.restore) {
        int failed = 0;
        const int n = fasa_service_restore(svc, &failed);
        fasa_log(failed ? FASA_LOG_WARN : FASA_LOG_INFO, 0,
                 "restore: %d session%s from %s onto %d shard%s, %d refused", n < 0 ? 0 : n,
                 n == 1 ? "" : "s", o.state_dir, size == 1 ? 1 : size - 1, size <= 2 ? "" : "s",
                 failed);
    }
    if (size > 1 && fasa_liveness_start())
        fasa_log(FASA_LOG_WARN, 0, "liveness: cannot start the watchdog thread");
    const int rc = s_serve(svc, &o, size);
    fasa_service_destroy(&svc); /* the engine's transport tells the workers to stop */
    fasa_liveness_stop();
    MPI_Finalize();
    return rc;
}

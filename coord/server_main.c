/* fasa-server: rank 0 serves fasa.v1 requests on a ZeroMQ ROUTER socket and drives the
 * worker ranks over MPI; ranks 1..N-1 hold the shards. Started without a launcher (one
 * rank), the coordinator holds the only shard itself.
 *
 * Every MPI call happens on the main thread of each rank (MPI_THREAD_FUNNELED). Rank 0
 * handles one request at a time, in arrival order; clients match replies by request id.
 * SIGTERM, SIGINT and a Shutdown request all stop every rank cleanly. */
#include <errno.h>
#include <malloc.h>
#include <mpi.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zmq.h>

#include "edge.h"
#include "keyfile.h"
#include "log.h"
#include "server_config.h"
#include "service.h"
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

/* Receives one message (all its frames). Frames: [routing id][empty delimiter, REQ
 * peers only][payload]. Returns 0 with the parts filled (payload may be NULL when the
 * shape is wrong: *bad_shape_p is then 1), or -1 when nothing could be read. */
typedef struct inbound {
    zmq_msg_t id, payload;
    int has_id, has_payload, has_delim, bad_shape;
} inbound;

static int s_recv(void *sock, inbound *in)
{
    memset(in, 0, sizeof(*in));
    int frame = 0, more = 1;
    while (more) {
        zmq_msg_t m;
        zmq_msg_init(&m);
        if (zmq_msg_recv(&m, sock, frame ? 0 : ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&m);
            if (frame == 0) return -1;
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
        } else if (!in->has_payload && !more) {
            in->payload = m;
            in->has_payload = 1;
        } else {
            in->bad_shape = 1; /* extra frames: drained and refused */
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

/* One line per request: debug when it went well, info when the client's request was
 * refused, warn when the server could not do it. */
static void s_log_event(const fasa_service_event *ev)
{
    const fasa_log_level level = ev->status == FASA_OK ? FASA_LOG_DEBUG
                                 : ev->status == FASA_RESOURCE_EXHAUSTED ||
                                         ev->status == FASA_INTERNAL ||
                                         ev->status == FASA_UNAVAILABLE
                                     ? FASA_LOG_WARN
                                     : FASA_LOG_INFO;
    if (!fasa_log_enabled(level)) return;
    fasa_log(level, ev->request_id, "%s%s%s %s %.3f ms in=%zu out=%zu%s%s", ev->kind,
             *ev->session_id ? " session=" : "", ev->session_id, fasa_status_name(ev->status),
             ev->ms, ev->bytes_in, ev->bytes_out, *ev->msg ? ": " : "", ev->msg);
}

/* Reads the secret key and the allow-list, starts the ZAP handler and makes sock a CURVE
 * server. 0, or -1 after logging why. */
static int s_curve_setup(void *ctx, void *sock, const server_config *o, fasa_zap **zap_p)
{
    char err[1200], secret[FASA_KEY_Z85_LEN + 1];
    fasa_zap *zap = NULL;
    if (fasa_keyfile_read(o->curve_secret, 1, secret, err, sizeof(err)) ||
        !(zap = fasa_zap_load(o->authorized_keys, err, sizeof(err))) ||
        fasa_zap_bind(zap, ctx, err, sizeof(err)) ||
        fasa_zap_curve_server(sock, secret, err, sizeof(err)) ||
        fasa_zap_watch(zap, ctx, sock, err, sizeof(err))) {
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

static int s_serve(fasa_service *svc, const server_config *o, int n_ranks)
{
    void *ctx = zmq_ctx_new();
    void *sock = ctx ? zmq_socket(ctx, ZMQ_ROUTER) : NULL;
    if (!sock) {
        fasa_log(FASA_LOG_ERROR, 0, "cannot create a ZeroMQ socket: %s", zmq_strerror(errno));
        if (ctx) zmq_ctx_term(ctx);
        return 1;
    }
    const int64_t maxmsg = o->max_message;
    /* A bounded queue: 64 requests of up to --max-message bytes wait at most; beyond that
     * ZeroMQ stops reading from the peers (backpressure) instead of buffering. */
    const int one = 1, linger = 1000, hwm = 64;
    zmq_setsockopt(sock, ZMQ_MAXMSGSIZE, &maxmsg, sizeof(maxmsg));
    zmq_setsockopt(sock, ZMQ_ROUTER_MANDATORY, &one, sizeof(one));
    zmq_setsockopt(sock, ZMQ_LINGER, &linger, sizeof(linger));
    zmq_setsockopt(sock, ZMQ_RCVHWM, &hwm, sizeof(hwm));
    zmq_setsockopt(sock, ZMQ_SNDHWM, &hwm, sizeof(hwm));
    int rc = 0;
    /* CURVE: the ZAP handler binds before the ROUTER, so no client slips in unchecked. */
    fasa_zap *zap = NULL;
    if (*o->curve_secret && s_curve_setup(ctx, sock, o, &zap)) {
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

    int shutdown = 0;
    while (!shutdown && !s_stop) {
        zmq_pollitem_t items[3] = {{sock, 0, ZMQ_POLLIN, 0},
                                   {fasa_zap_socket(zap), 0, ZMQ_POLLIN, 0},
                                   {fasa_zap_watch_socket(zap), 0, ZMQ_POLLIN, 0}};
        /* Blocks (no spinning) until a request, a ZAP request or a signal arrives. */
        if (zmq_poll(items, zap ? 3 : 1, 1000) < 0) {
            if (errno == EINTR) continue;
            fasa_log(FASA_LOG_ERROR, 0, "zmq_poll: %s", zmq_strerror(errno));
            rc = 1;
            break;
        }
        if (zap && ((items[1].revents | items[2].revents) & ZMQ_POLLIN)) fasa_zap_serve(zap);
        if (!(items[0].revents & ZMQ_POLLIN)) continue;
        inbound in;
        if (s_recv(sock, &in)) continue;
        uint8_t *reply = NULL;
        size_t reply_len = 0;
        int failed;
        if (in.bad_shape)
            failed = fasa_service_error(0, FASA_INVALID_ARGUMENT,
                                        "request: expected exactly one payload frame", &reply,
                                        &reply_len);
        else
            failed = fasa_service_handle(svc, zmq_msg_data(&in.payload), zmq_msg_size(&in.payload),
                                         &reply, &reply_len, &shutdown);
        if (!failed) s_send(sock, &in, reply, reply_len);
        free(reply);
        s_inbound_close(&in);
        if (in.bad_shape)
            fasa_log(FASA_LOG_INFO, 0, "refused a message that is not one payload frame");
        else
            s_log_event(fasa_service_last_event(svc));
    }
    fasa_log(FASA_LOG_INFO, 0, "fasa-server: stopping (%s)",
             s_stop ? "signal" : "shutdown request");
    /* Requests already queued get UNAVAILABLE rather than silence, so clients retry
     * elsewhere instead of waiting out their timeout. */
    for (int drained = 0; drained < 1000; drained++) {
        inbound in;
        if (s_recv(sock, &in)) break;
        uint8_t *reply = NULL;
        size_t reply_len = 0;
        uint64_t rid = 0;
        if (!in.bad_shape)
            rid = fasa_service_request_id(zmq_msg_data(&in.payload), zmq_msg_size(&in.payload));
        if (!fasa_service_error(rid, FASA_UNAVAILABLE, "the server is shutting down", &reply,
                                &reply_len))
            s_send(sock, &in, reply, reply_len);
        free(reply);
        s_inbound_close(&in);
    }
done:
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

    if (rank != 0) {
        /* Workers leave signals to rank 0, which stops them in order. */
        signal(SIGTERM, SIG_IGN);
        signal(SIGINT, SIG_IGN);
        fasa_log(FASA_LOG_DEBUG, 0, "worker up");
        const int rc = worker_mpi_loop(MPI_COMM_WORLD);
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
        engine = fasa_engine_new(1, (int)o.block);
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
    const fasa_service_opts so = {.n_ranks = size, .max_message = (size_t)o.max_message};
    fasa_service *svc = fasa_service_new(engine, size == 1 ? 1 : size - 1, &so);
    if (!svc) {
        fasa_log(FASA_LOG_ERROR, 0, "out of memory starting the service");
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    const int rc = s_serve(svc, &o, size);
    fasa_service_destroy(&svc); /* the engine's transport tells the workers to stop */
    MPI_Finalize();
    return rc;
}

/* See metrics_http.h. */
#include "metrics_http.h"

#include <arpa/inet.h>
#include <errno.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <zmq.h>

#include "fasa_client.h"
#include "log.h"
#include "prom.h"

#define ASK_ENDPOINT "inproc://fasa-metrics"
#define ASK_TIMEOUT_MS 10000

struct fasa_metrics {
    void *ctx;
    void *rep; /* the main thread's end */
    void *req; /* the HTTP thread's end (created there, on the first scrape) */
    struct MHD_Daemon *daemon;
    int port;
    volatile int stopping; /* set by fasa_metrics_stop: scrapes get 503 without asking */
};

static void *s_req_socket(fasa_metrics *m)
{
    if (m->req) return m->req;
    m->req = zmq_socket(m->ctx, ZMQ_REQ);
    const int zero = 0, timeo = ASK_TIMEOUT_MS;
    if (m->req && (zmq_setsockopt(m->req, ZMQ_LINGER, &zero, sizeof(zero)) ||
                   zmq_setsockopt(m->req, ZMQ_RCVTIMEO, &timeo, sizeof(timeo)) ||
                   zmq_connect(m->req, ASK_ENDPOINT))) {
        zmq_close(m->req);
        m->req = NULL;
    }
    return m->req;
}

/* The metrics text (malloc'd, *len_p bytes), or NULL with *status_p the HTTP status. */
static char *s_scrape(fasa_metrics *m, size_t *len_p, unsigned *status_p)
{
    *status_p = MHD_HTTP_SERVICE_UNAVAILABLE;
    if (__atomic_load_n(&m->stopping, __ATOMIC_ACQUIRE)) return NULL;
    void *req = s_req_socket(m);
    if (!req || zmq_send(req, "stats", 5, 0) != 5) return NULL;
    zmq_msg_t msg;
    zmq_msg_init(&msg);
    if (zmq_msg_recv(&msg, req, 0) < 0) {
        /* The main thread is busy past the timeout: a fresh socket for the next scrape (a
         * REQ socket cannot send again before it has its reply). */
        zmq_msg_close(&msg);
        zmq_close(m->req);
        m->req = NULL;
        fasa_log(FASA_LOG_WARN, 0, "metrics: no stats from the main thread within %d ms",
                 ASK_TIMEOUT_MS);
        return NULL;
    }
    fasa_client_stats st;
    fasa_client_error ce;
    char *text = NULL;
    size_t len = 0;
    if (zmq_msg_size(&msg) == 0 ||
        fasa_client_stats_decode(zmq_msg_data(&msg), zmq_msg_size(&msg), &st, &ce)) {
        zmq_msg_close(&msg);
        *status_p = MHD_HTTP_INTERNAL_SERVER_ERROR;
        return NULL;
    }
    zmq_msg_close(&msg);
    FILE *f = open_memstream(&text, &len);
    if (f) {
        fasa_prom_write(f, &st);
        if (fclose(f)) {
            free(text);
            text = NULL;
        }
    }
    fasa_client_stats_free(&st);
    *status_p = text ? MHD_HTTP_OK : MHD_HTTP_INTERNAL_SERVER_ERROR;
    *len_p = len;
    return text;
}

static enum MHD_Result s_reply(struct MHD_Connection *conn, unsigned status, const char *type,
                               char *body, size_t len, int owned)
{
    struct MHD_Response *r = MHD_create_response_from_buffer(
        len, body, owned ? MHD_RESPMEM_MUST_FREE : MHD_RESPMEM_PERSISTENT);
    if (!r) {
        if (owned) free(body);
        return MHD_NO;
    }
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, type);
    const enum MHD_Result rc = MHD_queue_response(conn, status, r);
    MHD_destroy_response(r);
    return rc;
}

static enum MHD_Result s_handle(void *cls, struct MHD_Connection *conn, const char *url,
                                const char *method, const char *version, const char *upload,
                                size_t *upload_len, void **state)
{
    (void)version, (void)upload;
    fasa_metrics *m = cls;
    if (!*state) { /* the headers: answer once the (empty) body has been read */
        *state = m;
        return MHD_YES;
    }
    if (*upload_len) {
        *upload_len = 0; /* a body is read and ignored */
        return MHD_YES;
    }
    static char not_found[] = "not found: the metrics are at /metrics\n";
    static char not_get[] = "only GET (and HEAD) /metrics\n";
    static char busy[] = "the server did not report its statistics in time\n";
    const char *plain = "text/plain; charset=utf-8";
    if (strcmp(method, MHD_HTTP_METHOD_GET) && strcmp(method, MHD_HTTP_METHOD_HEAD))
        return s_reply(conn, MHD_HTTP_METHOD_NOT_ALLOWED, plain, not_get, strlen(not_get), 0);
    if (strcmp(url, "/metrics"))
        return s_reply(conn, MHD_HTTP_NOT_FOUND, plain, not_found, strlen(not_found), 0);
    size_t len = 0;
    unsigned status;
    char *text = s_scrape(m, &len, &status);
    if (!text) return s_reply(conn, status, plain, busy, strlen(busy), 0);
    return s_reply(conn, MHD_HTTP_OK, "text/plain; version=0.0.4; charset=utf-8", text, len, 1);
}

/* "ADDR:PORT" (ADDR an IPv4 address, localhost, or [IPv6]) into a socket address. */
static int s_addr(const char *bind, struct sockaddr_storage *sa, socklen_t *sa_len, char *err,
                  size_t err_len)
{
    const char *colon = strrchr(bind, ':');
    char host[128];
    if (!colon || colon == bind || (size_t)(colon - bind) >= sizeof(host)) {
        snprintf(err, err_len, "--metrics-bind %s: expected ADDR:PORT", bind);
        return -1;
    }
    snprintf(host, sizeof(host), "%.*s", (int)(colon - bind), bind);
    const int port = atoi(colon + 1);
    memset(sa, 0, sizeof(*sa));
    if (strcmp(host, "localhost") == 0) snprintf(host, sizeof(host), "127.0.0.1");
    const size_t hl = strlen(host);
    if (host[0] == '[' && hl > 2 && host[hl - 1] == ']') {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)sa;
        host[hl - 1] = 0;
        a->sin6_family = AF_INET6;
        a->sin6_port = htons((uint16_t)port);
        if (inet_pton(AF_INET6, host + 1, &a->sin6_addr) == 1) {
            *sa_len = sizeof(*a);
            return 0;
        }
    } else {
        struct sockaddr_in *a = (struct sockaddr_in *)sa;
        a->sin_family = AF_INET;
        a->sin_port = htons((uint16_t)port);
        if (inet_pton(AF_INET, host, &a->sin_addr) == 1) {
            *sa_len = sizeof(*a);
            return 0;
        }
    }
    snprintf(err, err_len, "--metrics-bind %s: '%s' is not an IP address (or localhost)", bind,
             host);
    return -1;
}

fasa_metrics *fasa_metrics_start(void *zmq_ctx, const char *bind, char *err, size_t err_len)
{
    struct sockaddr_storage sa;
    socklen_t sa_len = 0;
    if (s_addr(bind, &sa, &sa_len, err, err_len)) return NULL;
    fasa_metrics *m = calloc(1, sizeof(*m));
    if (!m) {
        snprintf(err, err_len, "metrics: out of memory");
        return NULL;
    }
    m->ctx = zmq_ctx;
    m->rep = zmq_socket(zmq_ctx, ZMQ_REP);
    const int zero = 0;
    if (!m->rep || zmq_setsockopt(m->rep, ZMQ_LINGER, &zero, sizeof(zero)) ||
        zmq_bind(m->rep, ASK_ENDPOINT)) {
        snprintf(err, err_len, "metrics: cannot bind %s: %s", ASK_ENDPOINT, zmq_strerror(errno));
        fasa_metrics_stop(&m);
        return NULL;
    }
    const unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_ITC | MHD_USE_ERROR_LOG |
                           (sa.ss_family == AF_INET6 ? MHD_USE_IPv6 : 0);
    m->daemon = MHD_start_daemon(flags, 0, NULL, NULL, s_handle, m, MHD_OPTION_SOCK_ADDR,
                                 (struct sockaddr *)&sa, MHD_OPTION_CONNECTION_LIMIT, 16u,
                                 MHD_OPTION_CONNECTION_TIMEOUT, 30u, MHD_OPTION_END);
    if (!m->daemon) {
        snprintf(err, err_len, "--metrics-bind %s: cannot listen there (%s)", bind,
                 errno ? strerror(errno) : "address in use or not this host's");
        fasa_metrics_stop(&m);
        return NULL;
    }
    const union MHD_DaemonInfo *info = MHD_get_daemon_info(m->daemon, MHD_DAEMON_INFO_BIND_PORT);
    m->port = info ? (int)info->port : 0;
    return m;
}

int fasa_metrics_port(const fasa_metrics *m)
{
    return m->port;
}

void *fasa_metrics_socket(const fasa_metrics *m)
{
    return m->rep;
}

void fasa_metrics_answer(fasa_metrics *m, fasa_service *svc)
{
    char ask[16];
    if (zmq_recv(m->rep, ask, sizeof(ask), ZMQ_DONTWAIT) < 0) return;
    uint8_t *buf = NULL;
    size_t len = 0;
    if (fasa_service_stats_reply(svc, &buf, &len)) {
        free(buf);
        buf = NULL;
        len = 0; /* an empty reply: the scrape gets 500 */
    }
    zmq_send(m->rep, buf ? (const void *)buf : "", len, 0);
    free(buf);
}

void fasa_metrics_stop(fasa_metrics **m_p)
{
    fasa_metrics *m = m_p ? *m_p : NULL;
    if (!m) return;
    if (m->daemon) {
        /* A scrape waiting for the main thread (which is here now) gets an empty answer, so
         * that stopping the daemon does not wait out its timeout. */
        __atomic_store_n(&m->stopping, 1, __ATOMIC_RELEASE);
        const int fd = MHD_quiesce_daemon(m->daemon);
        for (int i = 0; i < 5; i++) {
            zmq_pollitem_t it = {m->rep, 0, ZMQ_POLLIN, 0};
            if (zmq_poll(&it, 1, 20) > 0 && zmq_recv(m->rep, (char[16]){0}, 16, 0) >= 0)
                zmq_send(m->rep, "", 0, 0);
        }
        MHD_stop_daemon(m->daemon); /* joins the HTTP thread */
        if (fd >= 0) close(fd);
    }
    if (m->req) zmq_close(m->req);
    if (m->rep) zmq_close(m->rep);
    free(m);
    *m_p = NULL;
}

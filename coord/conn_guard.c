/* See conn_guard.h. */
#include "conn_guard.h"

#include <arpa/inet.h>
#include <errno.h>
#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include <netinet/in.h>
/* linux/tcp.h, not netinet/tcp.h: glibc's struct tcp_info lacks tcpi_bytes_received. */
#include <linux/tcp.h>

#include <zmq.h>

#include "log.h"

#define GUARD_ENDPOINT "inproc://fasa-conn-guard"
/* The framing a whole request is allowed beyond its frames' bytes, per frame (a frame
 * header is at most 9 bytes; CURVE's MESSAGE box adds about 33). */
#define GUARD_FRAME_SLACK 64
/* A quiet connection's few bytes not taken as requests (heartbeat PONGs) are forgiven. */
#define GUARD_QUIET_BYTES 512

typedef struct conn {
    int fd;
    int closed;    /* shut down by the guard: waits for ZeroMQ's disconnect event */
    uint64_t base; /* tcpi_bytes_received that the I/O thread has accounted for */
    uint64_t last; /* tcpi_bytes_received at the last check */
    char peer[64]; /* "address:port" for the log */
} conn;

struct fasa_guard {
    void *mon; /* PAIR connected to the ROUTER's monitor */
    void *router;
    fasa_zap *zap;
    int64_t cap;
    conn *c;
    int n, cap_c;
    uint64_t n_closed;
    double trim_at;    /* when to give freed buffers back to the system (0: nothing to) */
    int64_t held;      /* over every connection at the last check */
    double fast_until; /* checks every 2 ms until then: a connection was just accepted */
};

/* A new peer usually sends at once, and over loopback a burst of new connections moves tens
 * of MB in one quiet-time interval (20 ms and more) before the first check sees it: for a
 * while after each accept the guard checks as often as while something is held. */
#define GUARD_FAST_AFTER_ACCEPT_MS 500

static double s_now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return 1e3 * (double)t.tv_sec + 1e-6 * (double)t.tv_nsec;
}

static int s_received(int fd, uint64_t *out)
{
    struct tcp_info ti;
    socklen_t len = sizeof(ti);
    memset(&ti, 0, sizeof(ti));
    if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &ti, &len) != 0 ||
        len < offsetof(struct tcp_info, tcpi_bytes_received) + sizeof(ti.tcpi_bytes_received))
        return -1;
    *out = ti.tcpi_bytes_received;
    return 0;
}

static conn *s_find(fasa_guard *g, int fd)
{
    for (int i = 0; i < g->n; i++)
        if (g->c[i].fd == fd) return &g->c[i];
    return NULL;
}

static void s_add(fasa_guard *g, int fd)
{
    uint64_t rx;
    if (s_received(fd, &rx)) return; /* not TCP: not guarded */
    g->fast_until = s_now_ms() + GUARD_FAST_AFTER_ACCEPT_MS;
    conn *old = s_find(g, fd); /* the fd of a connection whose end is still queued */
    if (old) *old = g->c[--g->n];
    if (g->n == g->cap_c) {
        const int cap = g->cap_c ? 2 * g->cap_c : 64;
        conn *p = realloc(g->c, (size_t)cap * sizeof(*p));
        if (!p) {
            fasa_log(FASA_LOG_WARN, 0, "connection guard: out of memory; fd %d not watched", fd);
            return;
        }
        g->c = p;
        g->cap_c = cap;
    }
    conn *c = &g->c[g->n++];
    memset(c, 0, sizeof(*c));
    c->fd = fd;
    c->base = c->last = rx;
    struct sockaddr_storage sa;
    socklen_t sl = sizeof(sa);
    char host[INET6_ADDRSTRLEN] = "?";
    int port = 0;
    if (getpeername(fd, (struct sockaddr *)&sa, &sl) == 0) {
        if (sa.ss_family == AF_INET) {
            const struct sockaddr_in *a = (const struct sockaddr_in *)&sa;
            inet_ntop(AF_INET, &a->sin_addr, host, sizeof(host));
            port = ntohs(a->sin_port);
        } else if (sa.ss_family == AF_INET6) {
            const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)&sa;
            inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof(host));
            port = ntohs(a->sin6_port);
        }
    }
    snprintf(c->peer, sizeof(c->peer), "%s:%d", host, port);
}

/* A connection that held much has gone: ZeroMQ frees its buffers as it tears it down,
 * but freed heap pages stay resident, so the next check trims the heap (malloc_trim also
 * releases free pages inside it), once ZeroMQ has had a moment to free them. */
#define GUARD_TRIM_BYTES (1 << 20)
#define GUARD_TRIM_DELAY_MS 2

static void s_remove(fasa_guard *g, int fd)
{
    conn *c = s_find(g, fd);
    if (!c) return;
    if ((c->closed || c->last - c->base > GUARD_TRIM_BYTES) && g->trim_at == 0)
        g->trim_at = s_now_ms() + GUARD_TRIM_DELAY_MS;
    *c = g->c[--g->n];
}

fasa_guard *fasa_guard_new(void *ctx, void *router, int64_t cap_bytes, fasa_zap *zap)
{
    fasa_guard *g = calloc(1, sizeof(*g));
    if (!g) return NULL;
    g->router = router;
    g->zap = zap;
    g->cap = cap_bytes > 0 ? cap_bytes : INT64_MAX;
    const int linger = 0;
    if (zmq_socket_monitor(router, GUARD_ENDPOINT,
                           ZMQ_EVENT_ACCEPTED | ZMQ_EVENT_DISCONNECTED | ZMQ_EVENT_CLOSED |
                               ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL |
                               ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL) ||
        !(g->mon = zmq_socket(ctx, ZMQ_PAIR)) ||
        zmq_setsockopt(g->mon, ZMQ_LINGER, &linger, sizeof(linger)) ||
        zmq_connect(g->mon, GUARD_ENDPOINT)) {
        const int e = errno;
        if (g->mon) zmq_close(g->mon);
        free(g);
        errno = e;
        return NULL;
    }
    return g;
}

void fasa_guard_destroy(fasa_guard **g_p)
{
    fasa_guard *g = g_p ? *g_p : NULL;
    if (!g) return;
    zmq_socket_monitor(g->router, NULL, 0);
    zmq_close(g->mon);
    free(g->c);
    free(g);
    *g_p = NULL;
}

void *fasa_guard_socket(const fasa_guard *g)
{
    return g ? g->mon : NULL;
}

void fasa_guard_events(fasa_guard *g)
{
    uint16_t ev;
    uint32_t val;
    for (int i = 0; g && i < 4096 && !fasa_monitor_next(g->mon, &ev, &val); i++) {
        if (ev == ZMQ_EVENT_ACCEPTED)
            s_add(g, (int)val);
        else if (ev == ZMQ_EVENT_DISCONNECTED || ev == ZMQ_EVENT_CLOSED)
            s_remove(g, (int)val);
        else if (g->zap)
            fasa_zap_note_failed(g->zap, ev, val);
    }
}

void fasa_guard_seen(fasa_guard *g, int fd, int64_t bytes, int frames)
{
    conn *c = g && fd >= 0 ? s_find(g, fd) : NULL;
    uint64_t rx;
    if (!c || s_received(fd, &rx)) return;
    /* What this request took off the stream, at most; never past what has arrived (a
     * request seen late may have more behind it already: that stays counted). */
    const uint64_t took = c->base + (uint64_t)bytes + (uint64_t)frames * GUARD_FRAME_SLACK;
    c->base = took < rx ? took : rx;
}

static int64_t s_held(const conn *c, uint64_t rx)
{
    return c->closed || rx <= c->base ? 0 : (int64_t)(rx - c->base);
}

int64_t fasa_guard_check(fasa_guard *g)
{
    if (!g) return 0;
    if (g->trim_at > 0 && s_now_ms() >= g->trim_at) {
        g->trim_at = 0;
        malloc_trim(0);
    }
    int64_t total = 0;
    for (int i = 0; i < g->n; i++) {
        conn *c = &g->c[i];
        uint64_t rx;
        if (c->closed || s_received(c->fd, &rx)) continue;
        /* A connection that has gone quiet with a few bytes over (heartbeats): forgiven. */
        if (rx == c->last && rx - c->base <= GUARD_QUIET_BYTES) c->base = rx;
        c->last = rx;
        total += s_held(c, rx);
    }
    /* Closing starts at half the cap: the other half is for what arrives before the next
     * check and for a closed connection's buffers until they are freed and trimmed (one
     * large partial frame). What the guard counts stays within the cap; rank 0's RSS can
     * pass it for a moment when a burst closes several connections at once (their buffers
     * are freed, and the heap trimmed, a little later). */
    const int64_t trigger = g->cap / 2;
    while (total > trigger) {
        conn *worst = NULL;
        int64_t most = 0;
        for (int i = 0; i < g->n; i++) {
            const int64_t h = s_held(&g->c[i], g->c[i].last);
            if (h > most) most = h, worst = &g->c[i];
        }
        if (!worst) break;
        fasa_log(FASA_LOG_WARN, 0,
                 "closed the connection from %s: it held %lld bytes of unfinished requests, and "
                 "unfinished requests held %lld bytes in all, over half of --max-pending %lld",
                 worst->peer, (long long)most, (long long)total, (long long)g->cap);
        shutdown(worst->fd, SHUT_RDWR);
        worst->closed = 1;
        g->n_closed++;
        total -= most;
    }
    g->held = total;
    return total;
}

int fasa_guard_interval_ms(const fasa_guard *g)
{
    /* While requests are arriving, often: a burst over loopback moves GB/s, and what
     * arrives between two checks is what the cap can be overrun by. While all is quiet,
     * rarely when thousands of connections are open (a check is one getsockopt each). */
    if (!g) return 250;
    if (g->held > 0 || g->trim_at > 0 || s_now_ms() < g->fast_until) return 2;
    const int ms = g->n / 8;
    return ms < 20 ? 20 : ms > 250 ? 250 : ms;
}

int fasa_guard_n_conns(const fasa_guard *g)
{
    return g ? g->n : 0;
}

uint64_t fasa_guard_n_closed(const fasa_guard *g)
{
    return g ? g->n_closed : 0;
}

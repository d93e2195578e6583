/* zmq_hops: the bare ZeroMQ round trip that fasa-server's request path rides on, without
 * fasa (README "Decode latency"): a DEALER client sends a BYTES-long message over
 * loopback TCP to a ROUTER and waits for it to come back; with --pair the ROUTER lives in
 * an I/O thread that hands each message over an inproc PAIR to a second thread and the
 * reply back the same way (fasa-server's shape), without it the ROUTER's thread echoes
 * at once. --busy US makes the client compute US microseconds before each call, as a
 * decode loop does between Attends, so that the server's threads are asleep when it
 * comes.
 *
 *   bench/zmq_hops [--pair] [--busy US] [--bytes N] [--reps R]
 *
 * Prints the round trip's p50 and p90 (us) over R calls after 50 warm-up calls. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <zmq.h>

#define PORT_ENDPOINT "tcp://127.0.0.1:*"
#define PAIR_ENDPOINT "inproc://zmq-hops"

static void *s_ctx;
static char s_endpoint[256];
static int s_pair;

static double s_now_us(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return 1e6 * (double)t.tv_sec + 1e-3 * (double)t.tv_nsec;
}

/* Moves one whole message from one socket to the other. */
static void s_forward(void *from, void *to)
{
    for (int more = 1; more;) {
        zmq_msg_t m;
        zmq_msg_init(&m);
        if (zmq_msg_recv(&m, from, 0) < 0) {
            zmq_msg_close(&m);
            return;
        }
        more = zmq_msg_more(&m);
        if (zmq_msg_send(&m, to, more ? ZMQ_SNDMORE : 0) < 0) zmq_msg_close(&m);
    }
}

/* The I/O thread of --pair: the ROUTER both ways, the PAIR to the main thread. */
static void *s_io(void *router)
{
    void *pair = zmq_socket(s_ctx, ZMQ_PAIR);
    zmq_connect(pair, PAIR_ENDPOINT);
    for (;;) {
        zmq_pollitem_t it[2] = {{router, 0, ZMQ_POLLIN, 0}, {pair, 0, ZMQ_POLLIN, 0}};
        if (zmq_poll(it, 2, 100) < 0) break;
        if (it[0].revents & ZMQ_POLLIN) s_forward(router, pair);
        if (it[1].revents & ZMQ_POLLIN) s_forward(pair, router);
    }
    return NULL;
}

/* The server: the ROUTER (and with --pair the PAIR's other end), echoing every message. */
static void *s_server(void *ready)
{
    void *router = zmq_socket(s_ctx, ZMQ_ROUTER), *sock = router;
    zmq_bind(router, PORT_ENDPOINT);
    size_t len = sizeof(s_endpoint);
    zmq_getsockopt(router, ZMQ_LAST_ENDPOINT, s_endpoint, &len);
    if (s_pair) {
        sock = zmq_socket(s_ctx, ZMQ_PAIR);
        zmq_bind(sock, PAIR_ENDPOINT);
        pthread_t th;
        pthread_create(&th, NULL, s_io, router);
    }
    *(volatile int *)ready = 1;
    for (;;) {
        zmq_msg_t id, body;
        zmq_msg_init(&id);
        zmq_msg_init(&body);
        if (zmq_msg_recv(&id, sock, 0) < 0 || zmq_msg_recv(&body, sock, 0) < 0) break;
        zmq_msg_send(&id, sock, ZMQ_SNDMORE);
        zmq_msg_send(&body, sock, 0);
    }
    return NULL;
}

static int s_cmp(const void *a, const void *b)
{
    const double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv)
{
    double busy = 0;
    size_t bytes = 24576;
    int reps = 400;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--pair"))
            s_pair = 1;
        else if (!strcmp(argv[i], "--busy") && i + 1 < argc)
            busy = atof(argv[++i]);
        else if (!strcmp(argv[i], "--bytes") && i + 1 < argc)
            bytes = (size_t)atol(argv[++i]);
        else if (!strcmp(argv[i], "--reps") && i + 1 < argc)
            reps = atoi(argv[++i]);
        else {
            printf("usage: zmq_hops [--pair] [--busy US] [--bytes N] [--reps R]\n\n"
                   "The bare ZeroMQ round trip of fasa-server's request path over loopback "
                   "TCP:\n--pair hands each message from the ROUTER's thread to another over "
                   "an inproc\nPAIR and back (fasa-server's shape); --busy US computes US "
                   "microseconds before\neach call (default 0); --bytes N per message (default "
                   "24576, a 4K-token Attend\nof 32 heads x d128 with k_new); --reps R calls "
                   "(default 400). Prints p50, p90.\n");
            return strcmp(argv[i], "-h") && strcmp(argv[i], "--help") ? 2 : 0;
        }
    }
    if (reps < 1 || bytes < 1) return 2;
    s_ctx = zmq_ctx_new();
    volatile int ready = 0;
    pthread_t th;
    pthread_create(&th, NULL, s_server, (void *)&ready);
    while (!ready) {
        const struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
    }
    void *cctx = zmq_ctx_new(), *d = zmq_socket(cctx, ZMQ_DEALER);
    zmq_connect(d, s_endpoint);
    char *out = calloc(1, bytes), *in = malloc(bytes);
    double *t = malloc((size_t)reps * sizeof(*t));
    if (!out || !in || !t) return 1;
    for (int i = -50; i < reps; i++) {
        for (const double b = s_now_us(); s_now_us() - b < busy;) {
        }
        const double t0 = s_now_us();
        zmq_send(d, out, bytes, 0);
        zmq_recv(d, in, bytes, 0);
        if (i >= 0) t[i] = s_now_us() - t0;
    }
    qsort(t, (size_t)reps, sizeof(*t), s_cmp);
    printf("zmq_hops: %s, %zu bytes, client busy %.0f us before each call: round trip p50 %.0f "
           "us, p90 %.0f us\n",
           s_pair ? "ROUTER thread + inproc PAIR" : "ROUTER echoes", bytes, busy, t[reps / 2],
           t[(int)(0.9 * reps)]);
    return 0;
}

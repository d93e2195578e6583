/* fasa-server's metrics endpoint (--metrics-bind ADDR:PORT): an HTTP server (libmicrohttpd,
 * one thread of its own) answering GET /metrics with the Prometheus text of
 * coord/prom.h, the same text as `fasa stats --format prometheus`.
 *
 * The HTTP thread never touches the service: for each scrape it asks the main thread over
 * an inproc REQ/REP pair, and the main thread (which owns the service and drives MPI)
 * answers between requests with a serialised StatsResult (fasa_service_stats_reply). A
 * scrape waiting longer than 10 s (the main thread is in a long step) gets 503. */
#ifndef FASA_COORD_METRICS_HTTP_H
#define FASA_COORD_METRICS_HTTP_H

#include <stddef.h>

#include "service.h"

typedef struct fasa_metrics fasa_metrics;

/* Binds the REP end in ctx and starts the HTTP server on bind ("ADDR:PORT", port 0: any
 * free one). NULL with err filled when it cannot (bad address, port taken). Caller owns it
 * (free with fasa_metrics_stop). */
fasa_metrics *fasa_metrics_start(void *zmq_ctx, const char *bind, char *err, size_t err_len);

/* The port the HTTP server listens on. */
int fasa_metrics_port(const fasa_metrics *m);

/* The main thread's socket: poll it for ZMQ_POLLIN and then call fasa_metrics_answer. */
void *fasa_metrics_socket(const fasa_metrics *m);

/* Answers the scrape waiting on the socket, if any, from svc (borrowed). */
void fasa_metrics_answer(fasa_metrics *m, fasa_service *svc);

/* Stops the HTTP server, closes both sockets and frees m; *m_p becomes NULL. NULL is a
 * no-op. */
void fasa_metrics_stop(fasa_metrics **m_p);

#endif

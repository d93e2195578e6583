/* The connection guard of fasa-server's I/O thread: a cap on the bytes that clients'
 * unfinished requests hold in rank 0 (--max-pending), across every connection.
 *
 * ZeroMQ reads a frame into memory as it arrives and hands it over only when it is whole,
 * so a peer that sends most of a large frame and then waits holds that memory for as long
 * as it likes. The guard watches the ROUTER's connections (its socket monitor: a TCP
 * connection's fd when accepted, until it goes away) and, for each, the bytes the kernel
 * has delivered from it (TCP_INFO tcpi_bytes_received) beyond what the I/O thread has
 * taken from it as whole requests (fasa_guard_seen, by the request's ZMQ_SRCFD). That
 * difference is what ZeroMQ holds for the connection: a partial frame, or whole requests
 * it has queued (an over-estimate only by the framing bytes). When the sum over every
 * connection passes half the cap (the other half is for what arrives before the next
 * check, and for a closed connection's buffers until they are freed and trimmed), the connection
 * holding most is shut down (shutdown(2) on its fd: ZeroMQ sees the end of the stream, drops the
 * connection and frees its buffers), and so on until the sum is under it again; each closure is
 * logged, and the heap is trimmed (malloc_trim) once ZeroMQ has freed the connection's buffers.
 * fasa_guard_check runs every fasa_guard_interval_ms (2 ms while anything is held, and for
 * half a second after a connection is accepted).
 *
 * The guard owns the ROUTER's socket monitor (ZeroMQ allows one): the CURVE handshake
 * failures it sees go on to the ZAP handler (fasa_zap_note_failed). Connections that are
 * not TCP (ipc://) are not guarded. */
#ifndef FASA_COORD_CONN_GUARD_H
#define FASA_COORD_CONN_GUARD_H

#include <stdint.h>

#include "zap.h"

typedef struct fasa_guard fasa_guard;

/* Starts watching router (a bound or about-to-bind ROUTER of ctx); cap_bytes > 0. zap, when
 * not NULL, is told of failed CURVE handshakes: it is borrowed (never freed here) and must
 * outlive the guard, as must ctx and router. NULL (errno set) on failure. Caller owns the
 * guard (free with fasa_guard_destroy). */
fasa_guard *fasa_guard_new(void *ctx, void *router, int64_t cap_bytes, fasa_zap *zap);
/* Closes the monitor and frees the guard; *g_p becomes NULL. NULL is a no-op. */
void fasa_guard_destroy(fasa_guard **g_p);

/* The monitor's socket, for zmq_poll (ZMQ_POLLIN), and what to call when it is readable. */
void *fasa_guard_socket(const fasa_guard *g);
void fasa_guard_events(fasa_guard *g);

/* A whole request of bytes (its frames' sizes summed, frames of them) came from the
 * connection fd (the payload frame's ZMQ_SRCFD; < 0: unknown, ignored). */
void fasa_guard_seen(fasa_guard *g, int fd, int64_t bytes, int frames);

/* Measures every connection and shuts down the largest holders while the sum is over the
 * cap. Returns the bytes held after it (for tests and logs). */
int64_t fasa_guard_check(fasa_guard *g);

/* How long the I/O thread may wait before the next fasa_guard_check. */
int fasa_guard_interval_ms(const fasa_guard *g);

/* Connections watched now, and connections shut down so far. */
int fasa_guard_n_conns(const fasa_guard *g);
uint64_t fasa_guard_n_closed(const fasa_guard *g);

#endif

/* Who may talk to fasa-server: CURVE on the ROUTER socket plus a ZAP handler (ZeroMQ's
 * authentication protocol, RFC 27) that admits only the public keys of an allow-list
 * directory, one `fasa keygen` NAME.pub per client.
 *
 * Without a ZAP handler CURVE only checks that a client knows the server's public key
 * (ecosystem-notes.md 1.5), so the handler is bound to inproc://zeromq.zap.01 before the
 * CURVE socket binds and answers in the poll loop of rank 0's I/O thread, which owns the
 * ROUTER (server_main.c), so clients are admitted while the main thread runs a step. A refused
 * client's handshake fails; it never gets a reply (libfasa reports UNAUTHENTICATED). */
#ifndef FASA_COORD_ZAP_H
#define FASA_COORD_ZAP_H

#include <stddef.h>
#include <stdint.h>

#define FASA_ZAP_DOMAIN "fasa"

typedef struct fasa_zap fasa_zap;

/* Reads every `*.pub` file in dir (each one Z85 key, keyfile.h) as an allowed client; the
 * file name without .pub names the client in the log. Fails, naming the file, on a bad
 * key file, and when dir holds no key at all. Returns NULL with one line in err on failure.
 * The keys are read once: restart the server to change them. Caller owns the handler
 * (free with fasa_zap_destroy). */
fasa_zap *fasa_zap_load(const char *dir, char *err, size_t err_len);

/* Binds the handler's REP socket to inproc://zeromq.zap.01 in the ZeroMQ context ctx. Call
 * before any CURVE socket of ctx binds. 0, or -1 with one line in err. */
int fasa_zap_bind(fasa_zap *z, void *ctx, char *err, size_t err_len);

/* Watches the CURVE server socket sock for handshakes that fail before ZAP is asked (a
 * plain client, a client with the wrong server key) so that fasa_zap_serve logs them too.
 * Call before sock binds. 0, or -1 with one line in err. */
int fasa_zap_watch(fasa_zap *z, void *ctx, void *sock, char *err, size_t err_len);
/* Logs one failed handshake (a monitor event and its value) as the watch would: for a
 * caller that owns the socket's monitor itself (conn_guard.h). */
void fasa_zap_note_failed(fasa_zap *z, uint16_t ev, uint32_t val);
/* Reads the next event queued on a socket monitor's PAIR socket mon without waiting: its
 * event number and value (both frames consumed). 0, or -1 when none is queued. */
int fasa_monitor_next(void *mon, uint16_t *ev_p, uint32_t *val_p);

/* The REP socket and the watch socket, to poll for ZMQ_POLLIN (NULL before fasa_zap_bind
 * and fasa_zap_watch); either one ready: call fasa_zap_serve. */
void *fasa_zap_socket(const fasa_zap *z);
void *fasa_zap_watch_socket(const fasa_zap *z);

/* Keys loaded. */
size_t fasa_zap_n_keys(const fasa_zap *z);

/* The name of the client with this 32-byte public key, or NULL when it is not allowed. */
const char *fasa_zap_lookup(const fasa_zap *z, const uint8_t key[32]);

/* Answers every ZAP request waiting on the socket (never blocks): 200 for a CURVE client
 * whose key is allowed, 400 otherwise; refusals are logged (info, repeats of the same key
 * within a minute at debug level), admissions at debug level. Then logs the failed
 * handshakes the watch saw (info, then at most one a minute; the rest at debug level). */
void fasa_zap_serve(fasa_zap *z);

/* Closes the socket and frees the handler; *z_p becomes NULL. NULL is a no-op. */
void fasa_zap_destroy(fasa_zap **z_p);

/* Makes sock a CURVE server with this Z85 secret key (NUL-terminated) and the ZAP domain. 0, or -1
 * with one line in err. */
int fasa_zap_curve_server(void *sock, const char *secret_z85, char *err, size_t err_len);

#endif

/* Where a `fasa` command runs its sessions: the embedded in-process engine (coord/engine.h)
 * or a fasa-server reached through libfasa. Both take the engine's types and give the
 * same numbers (the server runs the same engine code).
 *
 * With a server, session ids are made unique per process ("cli-<pid>-ID"), the sessions
 * a command created are dropped by backend_close (also after an error), and SIGINT or
 * SIGTERM abort a wait for the server so that the cleanup still runs. */
#ifndef FASA_CLIENT_BACKEND_H
#define FASA_CLIENT_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "engine.h"

typedef struct backend backend;

/* Default wait for each server reply, unless FASA_TIMEOUT_MS says otherwise; the first
 * request (a ping: is anyone there?) waits BACKEND_PING_TIMEOUT_MS. */
#define BACKEND_TIMEOUT_MS 120000
#define BACKEND_PING_TIMEOUT_MS 5000

/* The reply timeout to use: FASA_TIMEOUT_MS from the environment (milliseconds, > 0) or
 * dflt. */
int backend_timeout_ms(int dflt);

struct fasa_client;
struct fasa_client_server_info;
/* Connects a libfasa client to server (with CURVE keys: backend_client_curve) and checks that it
 * answers a ping within backend_timeout_ms(BACKEND_PING_TIMEOUT_MS) (info, if not NULL, gets its
 * answer); then sets the reply timeout to backend_timeout_ms(timeout_ms). NULL with a one-line
 * reason in msg on failure. */
struct fasa_client *backend_connect(const char *server, int timeout_ms,
                                    struct fasa_client_server_info *info, char *msg,
                                    size_t msg_len);

/* CURVE (a fasa-server with --curve-secret): every command that talks to a server takes
 * --curve-server-key FILE (the server's public key, a `fasa keygen` NAME.pub) and
 * --curve-secret FILE (this client's secret key, NAME.key, mode 0600; its public key is
 * derived from it), or the same files from these environment variables. The variables
 * are not FASA_CURVE_SECRET: that one is fasa-server's own secret key setting. */
#define BACKEND_ENV_SERVER_KEY "FASA_CURVE_SERVER_KEY"
#define BACKEND_ENV_SECRET "FASA_CURVE_CLIENT_SECRET"

/* Takes --curve-server-key FILE and --curve-secret FILE (or --opt=FILE) out of argv
 * (argv[0] stays; *argc_p shrinks) and puts them in the environment variables above, so
 * that every command takes them. 0, or 2 after printing a usage error. */
int backend_take_curve_args(int *argc_p, char **argv);

/* Gives c the CURVE keys named by the environment variables above (nothing when neither is
 * set), and the deadline of FASA_DEADLINE_MS when set (fasa_client_set_deadline): every
 * connection of the CLI passes here. 0, or -1 with one line naming the file or flag at
 * fault in msg. */
int backend_client_curve(struct fasa_client *c, char *msg, size_t msg_len);

/* Threads of every embedded engine opened after this (1 .. FASA_POOL_MAX, worker/pool.h;
 * default 1): the program's settings, set once at start-up; returns the count in force. */
int backend_set_threads(int n_threads);
int backend_threads(void);
/* A command's exit status: 128 + the signal (130 for SIGINT, 143 for SIGTERM, as a shell
 * reports them) when one interrupted a wait for the server, else rc. */
int backend_exit_status(int rc);

/* Opens a backend: server == NULL runs an embedded engine over shards in-process shards
 * and block-token placement blocks; otherwise connects to server (a ZeroMQ endpoint) and
 * checks that it answers a ping. NULL with err filled on failure. */
backend *backend_open(const char *server, int shards, int block, fasa_error *err);

/* The local merge's eps of the embedded engine (fasa_engine_set_merge_eps): 0, or -1 for an
 * eps outside [0, 64] or a backend on a server (whose eps is its own --merge-eps). */
int backend_set_merge_eps(backend *b, double eps);

/* Drops every session this backend created on a server, then frees it. NULL is a no-op. */
void backend_close(backend **b_p);

/* 1 when the sessions live on a server. */
int backend_is_remote(const backend *b);

/* "N in-process shard(s)" or "server ENDPOINT (N rank(s), M shard(s))", for reports. */
const char *backend_describe(const backend *b);

/* As fasa_engine_create / drop / append / attend / length (engine.h), for the backend's
 * engine or server. stats->bytes_read etc. as the engine's. */
fasa_status backend_create(backend *b, const char *id, const fasa_session_config *cfg,
                           fasa_error *err);
fasa_status backend_drop(backend *b, const char *id, fasa_error *err);
fasa_status backend_append(backend *b, const char *id, int layer, int32_t pos0, int n,
                           const float *k, const float *v, fasa_error *err);
fasa_status backend_attend(backend *b, const char *id, const fasa_attend_req *req, float *out,
                           int32_t *selected, fasa_step_stats *stats, fasa_error *err);
int32_t backend_length(const backend *b, const char *id, int layer);
/* Bytes of keys and values a session holds, all layers (fasa_engine_kv_bytes; on a server
 * its Stats), or -1 with err filled. */
int64_t backend_kv_bytes(backend *b, const char *id, fasa_error *err);
/* Bytes session id's shards hold in RAM (transport.h alloc_bytes, summed over the shards,
 * or a server's ranks): 0 with *out set, or -1. */
int backend_ram_bytes(backend *b, const char *id, int64_t *out);

#endif

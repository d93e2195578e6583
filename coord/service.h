/* The request handler of fasa-server: one serialised fasa.v1.Request in, one serialised
 * Response out, over an engine (in-process shards, or MPI workers). It knows nothing of
 * ZeroMQ or MPI, so tests drive it directly with bytes.
 *
 * Every request is decoded at the edge (proto/edge.h), then checked against the session it
 * names (shapes, layer, next position) before the engine runs; a request that fails changes
 * no stored state and gets a status with a message naming the field. */
#ifndef FASA_COORD_SERVICE_H
#define FASA_COORD_SERVICE_H

#include <stddef.h>
#include <stdint.h>

#include "edge.h"
#include "engine.h"

#define FASA_SERVICE_MAX_SESSIONS 1024
#define FASA_SERVICE_MAX_PROFILES 256

typedef struct fasa_service fasa_service;

typedef struct fasa_service_opts {
    int n_ranks;           /* MPI ranks of the job, for Ping and Stats */
    size_t max_message;    /* largest request accepted, bytes */
    int max_sessions;      /* sessions held at once, 1..FASA_SERVICE_MAX_SESSIONS; 0 = the most */
    uint32_t deadline_ms;  /* queue deadline of requests that give none; 0 = none */
    const char *state_dir; /* where Snapshot writes and restore reads; NULL or "": none */
    int wal;               /* fasa_wal_mode (wal.h) of the appends' log, with a state dir */
    int tier;              /* sessions that ask for no tier: 0 ram, 1 disk (--tier) */
    int has_tier_dir;      /* the engine has a disk-tier directory (--tier-dir) */
    const char *load_root; /* LoadSession reads only inside it (--load-root); NULL or "": none */
} fasa_service_opts;

/* A service over *engine_p. On success the service takes the engine over (it is destroyed
 * with the service) and *engine_p becomes NULL; on NULL (out of memory) *engine_p is left
 * as it was and is still the caller's. o is borrowed. Caller owns the service (free with
 * fasa_service_destroy). */
fasa_service *fasa_service_new(fasa_engine_t **engine_p, int n_shards, const fasa_service_opts *o);
/* Frees the service and its engine; *service_p becomes NULL. NULL (or *service_p NULL) is a
 * no-op. */
void fasa_service_destroy(fasa_service **service_p);

/* Handles one request of len bytes (req borrowed). Caller owns *reply_p: a malloc'd
 * serialised Response of *reply_len_p bytes (free with free()). *shutdown_p is set to 1 when the
 * request was a Shutdown. Returns 0, or -1 when not even an error response could be built (out of
 * memory). */
int fasa_service_handle(fasa_service *s, const void *req, size_t len, uint8_t **reply_p,
                        size_t *reply_len_p, int *shutdown_p);

/* fasa_service_handle of a Request (req, len) followed by n_frames raw data frames (its
 * tensors' elements: fasa.proto Tensor.data_frame), all borrowed for the call and used where
 * they are; n_frames 0 is fasa_service_handle. At most EDGE_MAX_FRAMES (proto/edge.h). */
int fasa_service_handle_frames(fasa_service *s, const void *req, size_t len,
                               const edge_frame *frames, int n_frames, uint8_t **reply_p,
                               size_t *reply_len_p, int *shutdown_p);

/* How long the next request handled has waited in the server's queue, in milliseconds
 * (the server measures it from when it read the request off the socket). The request's
 * deadline_ms (or the server's default) is checked against it: past it, the request is
 * answered UNAVAILABLE without running. The next fasa_service_handle consumes it. */
void fasa_service_set_wait(fasa_service *s, double waited_ms);

/* What the last fasa_service_handle did, for the server's log. */
typedef struct fasa_service_event {
    uint64_t request_id;    /* the client's (per connection) */
    uint64_t seq;           /* the server's: 1 for the first request handled since start */
    const char *kind;       /* "ping", "create_session", ..., or "undecodable" */
    const char *session_id; /* the request's session, "" when none (valid until the next call) */
    fasa_status status;
    char msg[320]; /* the error message, "" on OK */
    double ms;     /* time spent handling it */
    size_t bytes_in, bytes_out;
} fasa_service_event;

const fasa_service_event *fasa_service_last_event(const fasa_service *s);

/* The request id in a request's bytes, if it can be read without decoding the rest (else 0). */
uint64_t fasa_service_request_id(const void *req, size_t len);

/* A serialised error Response (for a request the caller refused before decoding it, e.g.
 * a malformed envelope). Caller owns *reply_p (free with free()), as above; -1 when out of memory.
 * It counts nothing: fasa_service_refuse does. */
int fasa_service_error(uint64_t request_id, fasa_status code, const char *msg, uint8_t **reply_p,
                       size_t *reply_len_p);

/* Refuses a request the caller could not hand over whole (e.g. not one payload frame): the
 * error Response as fasa_service_error, counted like a request the edge could not decode
 * (requests, "undecodable", errors, errors_by_code) and recorded as the last event. */
int fasa_service_refuse(fasa_service *s, uint64_t request_id, fasa_status code, const char *msg,
                        size_t bytes_in, uint8_t **reply_p, size_t *reply_len_p);

/* A serialised Response holding the server-wide StatsResult, as a Stats request without a
 * session would get, but not counted as a request (for the metrics endpoint). Caller owns
 * *reply_p (free with free()). -1 when out
 * of memory or the engine failed to report. */
int fasa_service_stats_reply(fasa_service *s, uint8_t **reply_p, size_t *reply_len_p);

/* Snapshots (coord/snapshot.h) in the state dir. fasa_service_restore loads the saved
 * named profiles and every snapshotted session, logging each one refused (a damaged or
 * missing file); returns the sessions restored (*n_failed_p: sessions and profiles
 * refused), or -1 without a state dir or when it cannot be read. fasa_service_snapshot_changed
 * writes every session changed since its last snapshot (and the named profiles), for
 * --snapshot-interval; returns the sessions written, or -1 when one failed (logged). */
int fasa_service_restore(fasa_service *s, int *n_failed_p);
int fasa_service_snapshot_changed(fasa_service *s);

#endif

/* One line per event on stderr, for every rank of fasa-server:
 *   2026-11-28T14:30:00.123Z INFO rank=0 req=42 attend session=s1 OK 1.234 ms
 * time (UTC, milliseconds), level, MPI rank, request id ("-" when none), then the event.
 * The one logger of every room (base/: no dependencies).
 * Lines below the configured level are dropped. Process-wide; set up once per rank. */
#ifndef FASA_BASE_LOG_H
#define FASA_BASE_LOG_H

#include <stdint.h>

typedef enum fasa_log_level {
    FASA_LOG_ERROR = 0,
    FASA_LOG_WARN,
    FASA_LOG_INFO,
    FASA_LOG_DEBUG
} fasa_log_level;

void fasa_log_setup(int rank, fasa_log_level level);
/* "error", "warn", "info", "debug"; 0, or -1 for anything else. */
int fasa_log_level_parse(const char *name, fasa_log_level *out_p);
/* The level's name: a static string (borrowed, never freed). */
const char *fasa_log_level_name(fasa_log_level level);
int fasa_log_enabled(fasa_log_level level);
/* Logs one line. request_id 0: the calling thread's current request (fasa_log_set_request),
 * "-" when it has none. */
void fasa_log(fasa_log_level level, uint64_t request_id, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* The request the calling thread works on from now (0: none): rank 0's service sets it for
 * each request it handles, and it travels to the workers with every command of that request
 * (worker/worker_mpi_wire.h), so their lines name it too. */
void fasa_log_set_request(uint64_t request_id);
uint64_t fasa_log_request(void);

#endif

/* Whether every rank of fasa-server is still there, seen from rank 0.
 *
 * Open MPI 4.1 has no fault tolerance: when a rank dies, mpirun tears the job down (measured
 * with 4.1.4: SIGTERM to the survivors about 1 s after the death, SIGKILL about 1 s later),
 * and a blocking exchange with the dead rank never returns (shared memory or TCP alike, even
 * under MPI_ERRORS_RETURN). So rank 0 watches the ranks itself: at start every rank sends it
 * its host name and PID (a collective); a watchdog thread then reads /proc/<pid>/stat of each
 * rank on rank 0's host every LIVENESS_POLL_MS: a PID gone or a zombie is a dead rank, one
 * stopped (SIGSTOP, a debugger) for LIVENESS_STOPPED_MS a hung one. A failed MPI call on rank
 * 0 (MPI_ERRORS_RETURN) counts too (fasa_liveness_fail). Ranks on other hosts are seen only
 * through such errors and mpirun's SIGTERM.
 *
 * Once a failure is recorded it stays: fasa_liveness_failure() returns the reason ("rank 2
 * (pid 1234 on host n1) died"), which the server logs and sends to every client. */
#ifndef FASA_COORD_LIVENESS_H
#define FASA_COORD_LIVENESS_H

#include <mpi.h>

#define LIVENESS_POLL_MS 100
#define LIVENESS_STOPPED_MS 2000

/* Collective over comm: every rank calls it once at start. 0, or -1 (out of memory, an
 * MPI error) after which rank 0 watches nothing. */
int fasa_liveness_gather(MPI_Comm comm);

/* Rank 0: starts the watchdog thread (with every signal blocked). 0, or -1. */
int fasa_liveness_start(void);
void fasa_liveness_stop(void);

/* Records a failure (the first one wins) and logs it as an error. Thread-safe. */
void fasa_liveness_fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* NULL while no failure is known; else the reason (stays valid). Thread-safe. */
const char *fasa_liveness_failure(void);

/* One pass of the watchdog's check, for tests: 1 when it found a failure. */
int fasa_liveness_check(void);

#endif

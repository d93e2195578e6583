/* The worker side of the MPI transport (coord/transport_mpi.h): the command loop of ranks
 * 1..N-1 around their shard store. */
#ifndef FASA_WORKER_WORKER_MPI_H
#define FASA_WORKER_WORKER_MPI_H

#include <mpi.h>

/* Serves rank 0's shard commands until it says stop. While idle it polls with
 * MPI_Iprobe and short sleeps, so an idle worker does not spin a core. Returns 0 after a
 * clean stop, -1 on a protocol error (the caller should MPI_Abort). */
int worker_mpi_loop(MPI_Comm comm);
/* The same with a pool of n_threads threads (worker/pool.h) made once here: each step of a
 * shard splits its KV groups over them (outputs the same bits for any n_threads). The
 * caller reads the count from its settings at start-up (fasa_threads_from_env). */
int worker_mpi_loop_threads(MPI_Comm comm, int n_threads);

#endif

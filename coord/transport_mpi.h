/* The MPI transport of fasa-server: shard i of every session lives on worker rank i + 1 of
 * the communicator, and rank 0 (the coordinator) drives them with point-to-point messages,
 * all from one thread. Workers run worker_mpi_loop (worker_mpi.h). */
#ifndef FASA_COORD_TRANSPORT_MPI_H
#define FASA_COORD_TRANSPORT_MPI_H

#include <mpi.h>

#include "transport.h"

/* At rank 0 of comm (size >= 2): a transport over the comm's size - 1 worker ranks.
 * destroy() tells every worker to stop. Returns 0, or -1 when out of memory. On 0 the caller
 * owns *t, as with fasa_transport_local (transport.h). */
int fasa_transport_mpi(fasa_transport *t, MPI_Comm comm);

/* Tests only (a fault hook): the worker of shard makes the nth APPEND_RUNS section it gets
 * from now fail as out of memory (nth 0: never); ctx is the transport's. 0, or -1. */
int fasa_transport_mpi_test_fault(void *ctx, int shard, int nth);

#endif

/* Wake-ups between the ranks of one node, so that a rank waiting for an MPI message can
 * sleep in the kernel instead of polling (Open MPI's shared-memory transport has no blocking
 * wait: its blocking calls spin, which on a box with fewer cores than ranks takes the CPU
 * from the rank doing the work).
 *
 * Each rank binds an abstract Unix datagram socket named after the job and its rank; after
 * sending an MPI message, the sender also sends one byte to the receiver's socket. A waiting
 * rank polls MPI, and when nothing is there sleeps in poll(2) on its socket up to a timeout:
 * the byte wakes it at once, so the wait costs no CPU and adds only a kernel wake-up. A
 * wake-up is only a hint: the MPI message is what counts, spurious or missing ones change
 * nothing but latency. Between nodes the byte finds no socket (sendto fails) and the
 * waiting rank falls back on its timeout, i.e. on polling with sleeps.
 *
 * The job's name comes from PMIX_NAMESPACE (Open MPI's mpirun), else SLURM_JOB_ID and
 * SLURM_STEP_ID (srun), else the parent's pid (ranks forked by one launcher). */
#ifndef FASA_WORKER_KICK_H
#define FASA_WORKER_KICK_H

typedef struct wmpi_kick {
    int fd;       /* this rank's socket, or -1 (then waits are plain sleeps) */
    char job[96]; /* the job's name, for the peers' socket names */
    long kicks;   /* wake-ups received (for tests and reports) */
} wmpi_kick;

/* Binds rank's socket (-1 fd when it cannot: waits then sleep). Always returns 0. */
int wmpi_kick_open(wmpi_kick *k, int rank);
void wmpi_kick_close(wmpi_kick *k);
/* Wakes rank peer if it waits on this node (best effort, never blocks). */
void wmpi_kick_send(const wmpi_kick *k, int peer);
/* Sleeps until a wake-up comes or timeout_ns passes; drains the socket. Returns 1 when woken
 * by a peer, else 0. */
int wmpi_kick_wait(wmpi_kick *k, long timeout_ns);

#endif

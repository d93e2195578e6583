/* A small persistent thread pool for the decode step (issue 13, item 5).
 *
 * fasa_pool_new(T) starts T - 1 worker threads once; fasa_pool_run then hands n_tasks
 * tasks to the caller (thread id 0) and the workers (ids 1 .. T - 1), each task to exactly
 * one of them, and returns when all are done. Tasks are claimed in order from a shared
 * counter, so which thread runs a task varies from run to run: a task must write only its
 * own outputs and use scratch indexed by the thread id it is given. Then results do not
 * depend on T or on the schedule, bit for bit.
 *
 * A run from inside a task (a shard step nested in the parallel shards of the in-process
 * transport) runs its tasks inline, one after another, on the calling thread with that
 * thread's id. Runs from two outside threads at once take turns. A NULL pool is one thread:
 * fasa_pool_run(NULL, ...) runs every task inline with thread id 0. */
#ifndef FASA_WORKER_POOL_H
#define FASA_WORKER_POOL_H

typedef struct fasa_pool fasa_pool_t;

/* Most threads a pool may have. */
#define FASA_POOL_MAX 256

/* A pool of n_threads (1 .. FASA_POOL_MAX) threads, the caller's included; NULL when a
 * thread cannot be started or out of memory. Caller owns it (free with fasa_pool_destroy). */
fasa_pool_t *fasa_pool_new(int n_threads);
/* Stops and joins the threads and frees the pool; *pool_p becomes NULL. NULL is a no-op. */
void fasa_pool_destroy(fasa_pool_t **pool_p);

/* Threads of the pool (1 for NULL). */
int fasa_pool_threads(const fasa_pool_t *pool);
/* Threads a run started here would use: 1 for NULL or inside a task of a pool (a nested
 * run is inline), else fasa_pool_threads. */
int fasa_pool_width(const fasa_pool_t *pool);

typedef void (*fasa_pool_fn)(void *ctx, int task, int tid);

/* Runs fn(ctx, task, tid) for task = 0 .. n_tasks - 1 and waits for all of them. */
void fasa_pool_run(fasa_pool_t *pool, int n_tasks, fasa_pool_fn fn, void *ctx);

/* The default thread count of a rank, from the environment and the CPU mask, read once at
 * start-up by a program's main (never by a kernel): FASA_THREADS when set (1 ..
 * FASA_POOL_MAX), else SLURM_CPUS_PER_TASK when set (a worker under Slurm), else the CPUs
 * this process may run on (sched_getaffinity), at most FASA_POOL_MAX. A set but invalid
 * value gives -1 and a one-line message naming the variable in why[why_len]. */
int fasa_threads_from_env(char *why, int why_len);

#endif

/* See liveness.h. */
#include "liveness.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "log.h"

#define HOST_MAX 64

typedef struct rank_id {
    char host[HOST_MAX];
    long long pid;
} rank_id;

static rank_id *s_ranks; /* (s_n) rank 0 only */
static int s_n;
static double *s_stopped_since; /* (s_n) ms, 0 while not stopped */
static char s_reason[512];
static atomic_int s_failed;
static pthread_mutex_t s_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_t s_th;
static atomic_int s_running, s_quit;

static double s_now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return 1e3 * (double)t.tv_sec + 1e-6 * (double)t.tv_nsec;
}

int fasa_liveness_gather(MPI_Comm comm)
{
    int rank, size;
    MPI_Comm_rank(comm, &rank);
    MPI_Comm_size(comm, &size);
    rank_id me;
    memset(&me, 0, sizeof(me));
    if (gethostname(me.host, sizeof(me.host) - 1)) snprintf(me.host, sizeof(me.host), "?");
    me.pid = (long long)getpid();
    rank_id *all = rank == 0 ? calloc((size_t)size, sizeof(*all)) : NULL;
    /* Every rank takes part even when rank 0 is out of memory (it then gathers into me). */
    const int rc = MPI_Gather(&me, (int)sizeof(me), MPI_BYTE, all ? (void *)all : (void *)&me,
                              all ? (int)sizeof(me) : 0, MPI_BYTE, 0, comm);
    if (rank != 0) return rc == MPI_SUCCESS ? 0 : -1;
    if (rc != MPI_SUCCESS || !all) {
        free(all);
        return -1;
    }
    s_stopped_since = calloc((size_t)size, sizeof(double));
    if (!s_stopped_since) {
        free(all);
        return -1;
    }
    s_ranks = all;
    s_n = size;
    return 0;
}

void fasa_liveness_fail(const char *fmt, ...)
{
    pthread_mutex_lock(&s_mu);
    if (!atomic_load(&s_failed)) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(s_reason, sizeof(s_reason), fmt, ap);
        va_end(ap);
        atomic_store(&s_failed, 1);
        fasa_log(FASA_LOG_ERROR, 0, "%s", s_reason);
    }
    pthread_mutex_unlock(&s_mu);
}

const char *fasa_liveness_failure(void)
{
    return atomic_load(&s_failed) ? s_reason : NULL;
}

/* The state letter of /proc/<pid>/stat ('R', 'S', 'Z', 'T', ...), or 0 when there is none. */
static char s_proc_state(long long pid)
{
    char path[64], buf[512];
    snprintf(path, sizeof(path), "/proc/%lld/stat", pid);
    FILE *f = fopen(path, "r");
    if (!f) return 0;
    const size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = 0;
    const char *paren = strrchr(buf, ')'); /* the command name may hold spaces or ')' */
    return paren && paren[1] == ' ' ? paren[2] : 0;
}

int fasa_liveness_check(void)
{
    if (atomic_load(&s_failed)) return 1;
    char host[HOST_MAX] = "";
    if (gethostname(host, sizeof(host) - 1)) return 0;
    for (int r = 1; r < s_n; r++) {
        const rank_id *id = &s_ranks[r];
        if (strcmp(id->host, host)) continue; /* another host: not visible from here */
        const char st = s_proc_state(id->pid);
        if (st == 0 || st == 'Z' || st == 'X') {
            fasa_liveness_fail("rank %d (pid %lld on host %s) died%s", r, id->pid, id->host,
                               st ? " (exited: zombie)" : "");
            return 1;
        }
        if (st == 'T' || st == 't') {
            const double now = s_now_ms();
            if (!s_stopped_since[r]) s_stopped_since[r] = now;
            if (now - s_stopped_since[r] >= LIVENESS_STOPPED_MS) {
                fasa_liveness_fail("rank %d (pid %lld on host %s) hangs: stopped for %d ms", r,
                                   id->pid, id->host, LIVENESS_STOPPED_MS);
                return 1;
            }
        } else {
            s_stopped_since[r] = 0;
        }
    }
    return 0;
}

static void *s_watch(void *arg)
{
    (void)arg;
    while (!atomic_load(&s_quit)) {
        if (fasa_liveness_check()) break;
        const struct timespec ts = {0, LIVENESS_POLL_MS * 1000000L};
        nanosleep(&ts, NULL);
    }
    return NULL;
}

int fasa_liveness_start(void)
{
    if (!s_ranks || s_n < 2) return 0; /* one rank: nothing to watch */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    const int rc = pthread_create(&s_th, NULL, s_watch, NULL);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc) return -1;
    atomic_store(&s_running, 1);
    return 0;
}

void fasa_liveness_stop(void)
{
    if (atomic_load(&s_running)) {
        atomic_store(&s_quit, 1);
        pthread_join(s_th, NULL);
        atomic_store(&s_running, 0);
    }
    free(s_ranks);
    free(s_stopped_since);
    s_ranks = NULL;
    s_stopped_since = NULL;
    s_n = 0;
}

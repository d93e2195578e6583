/* The step's thread pool. See pool.h. */
#define _GNU_SOURCE /* sched_getaffinity, CPU_COUNT */
#include "pool.h"

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>

struct fasa_pool {
    int n_threads;
    pthread_t *threads;  /* (n_threads - 1) workers */
    pthread_mutex_t run; /* one outside run at a time */
    pthread_mutex_t mu;
    pthread_cond_t go, done;
    /* The current run, guarded by mu; tasks are claimed with atomics on next. */
    unsigned long gen; /* bumped per run (and for stop) */
    int stop;
    fasa_pool_fn fn;
    void *ctx;
    int n_tasks;
    int next;    /* next task to claim */
    int running; /* workers still in the current run */
};

/* The id of the pool thread running the current task, or -1 outside any task. */
static _Thread_local int s_tid = -1;

static void s_work(fasa_pool_t *p, int tid)
{
    const int saved = s_tid;
    s_tid = tid;
    for (;;) {
        const int t = __atomic_fetch_add(&p->next, 1, __ATOMIC_RELAXED);
        if (t >= p->n_tasks) break;
        p->fn(p->ctx, t, tid);
    }
    s_tid = saved;
}

typedef struct s_arg {
    fasa_pool_t *p;
    int tid;
} s_arg;

static void *s_main(void *arg)
{
    s_arg a = *(s_arg *)arg;
    free(arg);
    fasa_pool_t *p = a.p;
    unsigned long seen = 0;
    pthread_mutex_lock(&p->mu);
    for (;;) {
        while (p->gen == seen) pthread_cond_wait(&p->go, &p->mu);
        seen = p->gen;
        if (p->stop) break;
        pthread_mutex_unlock(&p->mu);
        s_work(p, a.tid);
        pthread_mutex_lock(&p->mu);
        if (--p->running == 0) pthread_cond_signal(&p->done);
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

fasa_pool_t *fasa_pool_new(int n_threads)
{
    if (n_threads < 1 || n_threads > FASA_POOL_MAX) return NULL;
    fasa_pool_t *p = calloc(1, sizeof(*p));
    if (!p) return NULL;
    p->threads = calloc((size_t)n_threads, sizeof(*p->threads));
    if (!p->threads) {
        free(p);
        return NULL;
    }
    pthread_mutex_init(&p->run, NULL);
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->go, NULL);
    pthread_cond_init(&p->done, NULL);
    for (int i = 1; i < n_threads; i++) {
        s_arg *a = malloc(sizeof(*a));
        if (a) *a = (s_arg){p, i};
        if (!a || pthread_create(&p->threads[i - 1], NULL, s_main, a)) {
            free(a);
            p->n_threads = i;
            fasa_pool_destroy(&p);
            return NULL;
        }
    }
    p->n_threads = n_threads;
    return p;
}

void fasa_pool_destroy(fasa_pool_t **pool_p)
{
    fasa_pool_t *p = pool_p ? *pool_p : NULL;
    if (!p) return;
    pthread_mutex_lock(&p->mu);
    p->stop = 1;
    p->gen++;
    pthread_cond_broadcast(&p->go);
    pthread_mutex_unlock(&p->mu);
    for (int i = 1; i < p->n_threads; i++) pthread_join(p->threads[i - 1], NULL);
    pthread_cond_destroy(&p->go);
    pthread_cond_destroy(&p->done);
    pthread_mutex_destroy(&p->mu);
    pthread_mutex_destroy(&p->run);
    free(p->threads);
    free(p);
    *pool_p = NULL;
}

int fasa_pool_threads(const fasa_pool_t *p)
{
    return p ? p->n_threads : 1;
}

int fasa_pool_width(const fasa_pool_t *p)
{
    return s_tid >= 0 ? 1 : fasa_pool_threads(p);
}

void fasa_pool_run(fasa_pool_t *p, int n_tasks, fasa_pool_fn fn, void *ctx)
{
    if (n_tasks <= 0) return;
    if (!p || p->n_threads == 1 || n_tasks == 1 || s_tid >= 0) {
        /* Inline: one thread, one task, or nested inside a task of a pool. */
        const int tid = s_tid >= 0 ? s_tid : 0;
        for (int t = 0; t < n_tasks; t++) fn(ctx, t, tid);
        return;
    }
    pthread_mutex_lock(&p->run);
    pthread_mutex_lock(&p->mu);
    p->fn = fn;
    p->ctx = ctx;
    p->n_tasks = n_tasks;
    __atomic_store_n(&p->next, 0, __ATOMIC_RELAXED);
    p->running = p->n_threads - 1;
    p->gen++;
    pthread_cond_broadcast(&p->go);
    pthread_mutex_unlock(&p->mu);
    s_work(p, 0);
    pthread_mutex_lock(&p->mu);
    while (p->running > 0) pthread_cond_wait(&p->done, &p->mu);
    pthread_mutex_unlock(&p->mu);
    pthread_mutex_unlock(&p->run);
}

/* 0 and *out_p for an integer in [1, FASA_POOL_MAX], else -1. */
static int s_count(const char *text, int *out_p)
{
    char *end;
    errno = 0;
    const long v = strtol(text, &end, 10);
    if (errno || end == text || *end || v < 1 || v > FASA_POOL_MAX) return -1;
    *out_p = (int)v;
    return 0;
}

int fasa_threads_from_env(char *why, int why_len)
{
    static const char *const vars[] = {"FASA_THREADS", "SLURM_CPUS_PER_TASK"};
    for (int i = 0; i < 2; i++) {
        const char *v = getenv(vars[i]);
        if (!v || !*v) continue;
        int n;
        if (!s_count(v, &n)) return n;
        if (why)
            snprintf(why, (size_t)why_len, "%s '%s' must be a thread count in [1, %d]", vars[i], v,
                     FASA_POOL_MAX);
        return -1;
    }
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set)) return 1;
    const int n = CPU_COUNT(&set);
    return n < 1 ? 1 : n > FASA_POOL_MAX ? FASA_POOL_MAX : n;
}

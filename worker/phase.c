/* Phase timers. See phase.h. */
#include "phase.h"

#include <stdint.h>
#include <time.h>

static int s_on;
static int64_t s_ns[FASA_PHASE_N];

void fasa_phase_enable(int on)
{
    __atomic_store_n(&s_on, on, __ATOMIC_RELAXED);
}

double fasa_phase_now(void)
{
    if (!__atomic_load_n(&s_on, __ATOMIC_RELAXED)) return 0;
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

double fasa_phase_add(fasa_phase ph, double t0)
{
    if (!__atomic_load_n(&s_on, __ATOMIC_RELAXED) || ph < 0 || ph >= FASA_PHASE_N) return 0;
    const double now = fasa_phase_now();
    if (t0 > 0) __atomic_fetch_add(&s_ns[ph], (int64_t)((now - t0) * 1e9), __ATOMIC_RELAXED);
    return now;
}

void fasa_phase_get(double out[FASA_PHASE_N])
{
    for (int i = 0; i < FASA_PHASE_N; i++)
        out[i] = 1e-9 * (double)__atomic_load_n(&s_ns[i], __ATOMIC_RELAXED);
}

void fasa_phase_reset(void)
{
    for (int i = 0; i < FASA_PHASE_N; i++) __atomic_store_n(&s_ns[i], 0, __ATOMIC_RELAXED);
}

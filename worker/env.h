/* The environment, read once at start-up into settings: no room reads getenv later, and the
 * kernels never do. FASA_SIMD (portable, avx2 or avx512) is the kernels' default SIMD path
 * (kernels/simd.h simd_path_choose); FASA_PIPELINE=0 turns off the engine's overlap of a
 * step's phases (coord/engine.c); FASA_ONE_EXCHANGE=0 makes a one-shard sparse step take two
 * exchanges (coord/engine.h fasa_engine_set_one_exchange). FASA_THREADS is read by worker/pool.h
 * fasa_threads_from_env. */
#ifndef FASA_WORKER_ENV_H
#define FASA_WORKER_ENV_H

#include <stddef.h>

typedef struct fasa_env {
    int simd_path;    /* the kernels' default path (simd_path) after FASA_SIMD */
    int pipeline;     /* 1 unless FASA_PIPELINE=0 */
    int one_exchange; /* 1 unless FASA_ONE_EXCHANGE=0 */
} fasa_env;

/* Reads the variables and applies FASA_SIMD. 0; -1 with one line in why (naming the
 * variable) when FASA_SIMD is not a path's name. A path this CPU lacks is a warning on
 * stderr, and the best path is used. Later calls return the first call's result. */
int fasa_env_init(char *why, size_t why_len);
/* The settings (read on first use when fasa_env_init was not called). Borrowed, static. */
const fasa_env *fasa_env_get(void);

#endif

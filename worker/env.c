/* See env.h. */
#include "env.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

static fasa_env s_env;
static int s_done, s_rc;
static char s_why[160];

int fasa_env_init(char *why, size_t why_len)
{
    if (!s_done) {
        s_done = 1;
        const char *pipe = getenv("FASA_PIPELINE");
        s_env.pipeline = !(pipe && !strcmp(pipe, "0"));
        const char *one = getenv("FASA_ONE_EXCHANGE");
        s_env.one_exchange = !(one && !strcmp(one, "0"));
        const char *simd = getenv("FASA_SIMD");
        const int rc = simd_path_choose(simd);
        s_env.simd_path = (int)simd_path_default();
        if (rc == -1) {
            snprintf(s_why, sizeof(s_why), "FASA_SIMD='%s' is not portable, avx2 or avx512", simd);
            s_rc = -1;
        } else if (rc == -2) {
            fprintf(stderr, "fasa: FASA_SIMD=%s: this CPU lacks it; using %s\n", simd,
                    simd_path_name(s_env.simd_path));
        }
    }
    if (s_rc && why) snprintf(why, why_len, "%s", s_why);
    return s_rc;
}

const fasa_env *fasa_env_get(void)
{
    if (!s_done) fasa_env_init(NULL, 0);
    return &s_env;
}

/* The Check runner: one binary, one ctest per suite (CK_RUN_SUITE picks it). */
#include <stdio.h>
#include <stdlib.h>

#include "env.h"
#include "test_util.h"

#ifndef FASA_SHARED_DIR
#define FASA_SHARED_DIR "../shared"
#endif

const char *test_shared_dir(void)
{
    const char *env = getenv("FASA_SHARED_DIR");
    return env && *env ? env : FASA_SHARED_DIR;
}

int main(void)
{
    fasa_env_init(NULL, 0); /* FASA_SIMD, read once at start-up */
    Suite *(*const suites[])(void) = {kernels_suite,  shard_suite,   engine_suite, golden_suite,
                                      io_suite,       service_suite, config_suite, model_suite,
                                      snapshot_suite, threads_suite, admin_suite,  base_suite,
                                      load_suite,     merge_suite};
    SRunner *sr = srunner_create(NULL);
    for (size_t i = 0; i < sizeof(suites) / sizeof(*suites); i++)
        srunner_add_suite(sr, suites[i]());
    srunner_run_all(sr, CK_NORMAL);
    const int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}

/* fasa-server's settings: defaults < config file < environment < command line, and every
 * bad value refused with where it came from. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "server_config.h"
#include "test_util.h"

static int s_load(server_config *c, char **argv, char *err)
{
    int argc = 0;
    while (argv[argc]) argc++;
    FILE *out = fopen("/dev/null", "w");
    const int rc = server_config_load(c, argc, argv, out, err, 600);
    fclose(out);
    return rc;
}

static void s_clear_env(void)
{
    const char *vars[] = {"FASA_BIND",         "FASA_ENDPOINT_FILE", "FASA_PID_FILE", "FASA_BLOCK",
                          "FASA_MAX_MESSAGE",  "FASA_LOG_LEVEL",     "FASA_QUIET",    "FASA_CONFIG",
                          "FASA_MEMORY_LIMIT", "FASA_MAX_SESSIONS",  "FASA_RESERVE"};
    for (size_t i = 0; i < sizeof(vars) / sizeof(*vars); i++) unsetenv(vars[i]);
}

START_TEST(test_precedence)
{
    s_clear_env();
    server_config c;
    char err[600];
    char *plain[] = {"fasa-server", NULL};
    ck_assert_int_eq(s_load(&c, plain, err), 0);
    ck_assert_str_eq(c.bind, "tcp://127.0.0.1:5555");
    ck_assert_int_eq(c.block, 2048);
    ck_assert_int_eq(c.max_message, 268435456);
    ck_assert_int_eq(c.log_level, FASA_LOG_INFO);
    ck_assert_str_eq(c.pid_file, "");

    char path[] = "/tmp/fasa-config-XXXXXX";
    const int fd = mkstemp(path);
    ck_assert_int_ge(fd, 0);
    FILE *f = fdopen(fd, "w");
    fputs("# a comment\n  bind = tcp://127.0.0.1:6000  \nblock=64 # tokens\n"
          "max_message = 4096\nlog-level = debug\n\n",
          f);
    fclose(f);
    char *with_file[] = {"fasa-server", "--config", path, NULL};
    ck_assert_int_eq(s_load(&c, with_file, err), 0);
    ck_assert_str_eq(c.bind, "tcp://127.0.0.1:6000");
    ck_assert_int_eq(c.block, 64);
    ck_assert_int_eq(c.max_message, 4096);
    ck_assert_int_eq(c.log_level, FASA_LOG_DEBUG);
    ck_assert_str_eq(c.config, path);

    /* The environment beats the file, the command line beats both. */
    setenv("FASA_BLOCK", "128", 1);
    setenv("FASA_CONFIG", path, 1);
    char *cli[] = {"fasa-server", "--max-message=8192", "--quiet", NULL};
    ck_assert_int_eq(s_load(&c, cli, err), 0);
    ck_assert_int_eq(c.block, 128);
    ck_assert_int_eq(c.max_message, 8192);
    ck_assert_int_eq(c.log_level, FASA_LOG_WARN);
    ck_assert_str_eq(c.bind, "tcp://127.0.0.1:6000");
    char *cli2[] = {"fasa-server", "--block", "7", NULL};
    ck_assert_int_eq(s_load(&c, cli2, err), 0);
    ck_assert_int_eq(c.block, 7);
    s_clear_env();

    /* Errors name their source. */
    f = fopen(path, "w");
    fputs("block = 64\nblok = 3\n", f);
    fclose(f);
    ck_assert_int_eq(s_load(&c, with_file, err), 2);
    ck_assert_ptr_nonnull(strstr(err, "line 2"));
    ck_assert_ptr_nonnull(strstr(err, "blok"));
    f = fopen(path, "w");
    fputs("max-message = 12\n", f);
    fclose(f);
    ck_assert_int_eq(s_load(&c, with_file, err), 2);
    ck_assert_ptr_nonnull(strstr(err, "line 1"));
    unlink(path);
    ck_assert_int_eq(s_load(&c, with_file, err), 2);
    ck_assert_ptr_nonnull(strstr(err, path));

    char *dir[] = {"fasa-server", "--config", "/tmp", NULL};
    ck_assert_int_eq(s_load(&c, dir, err), 2);
    ck_assert_ptr_nonnull(strstr(err, "/tmp"));

    setenv("FASA_LOG_LEVEL", "chatty", 1);
    ck_assert_int_eq(s_load(&c, plain, err), 2);
    ck_assert_ptr_nonnull(strstr(err, "FASA_LOG_LEVEL"));
    s_clear_env();
    char *bad_int[] = {"fasa-server", "--block", "12x", NULL};
    ck_assert_int_eq(s_load(&c, bad_int, err), 2);
    ck_assert_ptr_nonnull(strstr(err, "--block"));
    char *unknown[] = {"fasa-server", "--blocks", "3", NULL};
    ck_assert_int_eq(s_load(&c, unknown, err), 2);
    ck_assert_ptr_nonnull(strstr(err, "--blocks"));
    char *missing[] = {"fasa-server", "--bind", NULL};
    ck_assert_int_eq(s_load(&c, missing, err), 2);
    /* Byte sizes take K, M, G and T (powers of 1024); other suffixes and overflows fail. */
    ck_assert_int_eq(c.memory_limit, 0);
    char *lim[] = {"fasa-server", "--memory-limit", "3G", "--max-sessions", "5", NULL};
    ck_assert_int_eq(s_load(&c, lim, err), 0);
    ck_assert_int_eq(c.memory_limit, 3LL << 30);
    ck_assert_int_eq(c.max_sessions, 5);
    setenv("FASA_MEMORY_LIMIT", "1536k", 1);
    ck_assert_int_eq(s_load(&c, plain, err), 0);
    ck_assert_int_eq(c.memory_limit, 1536 << 10);
    ck_assert_int_eq(c.max_sessions, 1024);
    setenv("FASA_MEMORY_LIMIT", "2X", 1);
    ck_assert_int_eq(s_load(&c, plain, err), 2);
    ck_assert_ptr_nonnull(strstr(err, "FASA_MEMORY_LIMIT"));
    setenv("FASA_MEMORY_LIMIT", "9000T", 1);
    ck_assert_int_eq(s_load(&c, plain, err), 2);
    s_clear_env();
    /* --reserve (FASA_RESERVE): bytes, default 0 (none). */
    ck_assert_int_eq(s_load(&c, plain, err), 0);
    ck_assert_int_eq(c.reserve, 0);
    char *res[] = {"fasa-server", "--reserve", "1200M", NULL};
    ck_assert_int_eq(s_load(&c, res, err), 0);
    ck_assert_int_eq(c.reserve, 1200LL << 20);
    setenv("FASA_RESERVE", "2G", 1);
    ck_assert_int_eq(s_load(&c, plain, err), 0);
    ck_assert_int_eq(c.reserve, 2LL << 30);
    setenv("FASA_RESERVE", "-1", 1);
    ck_assert_int_eq(s_load(&c, plain, err), 2);
    ck_assert_ptr_nonnull(strstr(err, "FASA_RESERVE"));
    s_clear_env();
    char *lim0[] = {"fasa-server", "--max-sessions", "0", NULL};
    ck_assert_int_eq(s_load(&c, lim0, err), 2);
    ck_assert_ptr_nonnull(strstr(err, "--max-sessions"));
    /* --max-pending: by default the larger of 1G and 2 x --max-message; below 2 x
     * --max-message refused; --peer-timeout in [0, 86400]. */
    ck_assert_int_eq(s_load(&c, plain, err), 0);
    ck_assert_int_eq(c.max_pending, 1LL << 30);
    ck_assert_int_eq(c.peer_timeout, 60);
    char *pend[] = {"fasa-server", "--max-message", "1G", NULL};
    ck_assert_int_eq(s_load(&c, pend, err), 0);
    ck_assert_int_eq(c.max_pending, 2LL << 30);
    char *pend_low[] = {"fasa-server", "--max-message", "16M", "--max-pending", "20M", NULL};
    ck_assert_int_eq(s_load(&c, pend_low, err), 2);
    ck_assert_ptr_nonnull(strstr(err, "--max-pending"));
    char *pend_ok[] = {"fasa-server", "--max-message",  "16M", "--max-pending",
                       "32M",         "--peer-timeout", "0",   NULL};
    ck_assert_int_eq(s_load(&c, pend_ok, err), 0);
    ck_assert_int_eq(c.max_pending, 32LL << 20);
    ck_assert_int_eq(c.peer_timeout, 0);
    char *pt_bad[] = {"fasa-server", "--peer-timeout", "-1", NULL};
    ck_assert_int_eq(s_load(&c, pt_bad, err), 2);
    ck_assert_ptr_nonnull(strstr(err, "--peer-timeout"));
    /* --tier disk needs --tier-dir; the tier is ram or disk. */
    char *tier_nodir[] = {"fasa-server", "--tier", "disk", NULL};
    ck_assert_int_eq(s_load(&c, tier_nodir, err), 2);
    ck_assert_ptr_nonnull(strstr(err, "--tier-dir"));
    char *tier_bad[] = {"fasa-server", "--tier", "tape", NULL};
    ck_assert_int_eq(s_load(&c, tier_bad, err), 2);
    ck_assert_ptr_nonnull(strstr(err, "--tier"));
    char *tier_ok[] = {"fasa-server", "--tier", "disk", "--tier-dir", "/tmp", NULL};
    ck_assert_int_eq(s_load(&c, tier_ok, err), 0);
    ck_assert_int_eq(c.tier, 1);
    ck_assert_str_eq(c.tier_dir, "/tmp");
    char *help[] = {"fasa-server", "--block", "3", "--help", NULL};
    ck_assert_int_eq(s_load(&c, help, err), 1);
}
END_TEST

Suite *config_suite(void)
{
    const TTest *tests[] = {test_precedence, NULL};
    return test_suite("config", "config", 0, tests);
}

/* base/: the one logger (the request id a thread works on reaches lines logged with id 0,
 * the way worker lines get it) and the one table of status and method names, against the
 * wire's numbering (proto/fasa.proto) and the engine's and libfasa's names of them. */
#include <check.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "engine.h"
#include "fasa.pb-c.h"
#include "log.h"
#include "names.h"
#include "test_util.h"

/* Runs fasa_log(level INFO, id, "event x") with stderr going to a file; the line. */
static void s_log_line(uint64_t id, char *line, size_t len)
{
    char path[] = "/tmp/fasa-log-XXXXXX";
    const int fd = mkstemp(path);
    ck_assert_int_ge(fd, 0);
    fflush(stderr);
    const int saved = dup(2);
    dup2(fd, 2);
    fasa_log_setup(3, FASA_LOG_INFO);
    fasa_log(FASA_LOG_INFO, id, "event x");
    fflush(stderr);
    dup2(saved, 2);
    close(saved);
    FILE *f = fopen(path, "r");
    ck_assert_ptr_nonnull(f);
    ck_assert_ptr_nonnull(fgets(line, (int)len, f));
    fclose(f);
    close(fd);
    unlink(path);
}

START_TEST(test_log_request_id)
{
    char line[512];
    fasa_log_set_request(0);
    s_log_line(0, line, sizeof(line));
    ck_assert_ptr_nonnull(strstr(line, " INFO rank=3 req=- event x\n"));
    /* The thread's current request names lines that pass 0 ... */
    fasa_log_set_request(4242);
    ck_assert_uint_eq(fasa_log_request(), 4242);
    s_log_line(0, line, sizeof(line));
    ck_assert_ptr_nonnull(strstr(line, " INFO rank=3 req=4242 event x\n"));
    /* ... and an explicit id wins. */
    s_log_line(7, line, sizeof(line));
    ck_assert_ptr_nonnull(strstr(line, " req=7 event x\n"));
    fasa_log_set_request(0);
    s_log_line(0, line, sizeof(line));
    ck_assert_ptr_nonnull(strstr(line, " req=- event x\n"));
}
END_TEST

START_TEST(test_names_match_the_wire)
{
    /* Every status of the wire's enum has the enum's own name. */
    const ProtobufCEnumDescriptor *st = &fasa__v1__status__descriptor;
    for (unsigned i = 0; i < st->n_values; i++) {
        ck_assert_str_eq(fasa_names_status(st->values[i].value), st->values[i].name);
        ck_assert_str_eq(fasa_status_name((fasa_status)st->values[i].value), st->values[i].name);
    }
    ck_assert_str_eq(fasa_names_status(99), "UNKNOWN");
    ck_assert_str_eq(fasa_names_status(-1), "UNKNOWN");
    /* Methods: the wire's value v is the engine's v - 1; names round-trip. */
    const ProtobufCEnumDescriptor *m = &fasa__v1__method__descriptor;
    ck_assert_int_eq((int)m->n_values, FASA_NAMES_N_METHODS + 1);
    ck_assert_str_eq(fasa_names_wire_method(0), "default");
    for (int i = 0; i < FASA_NAMES_N_METHODS; i++) {
        ck_assert_str_eq(fasa_names_wire_method(i + 1), fasa_names_method(i));
        ck_assert_int_eq(fasa_names_method_parse(fasa_names_method(i)), i);
        fasa_method e;
        ck_assert_int_eq(fasa_method_parse(fasa_names_method(i), &e), 0);
        ck_assert_int_eq((int)e, i);
    }
    ck_assert_str_eq(fasa_names_method(FASA_METHOD_FASA_PLUS), "fasa-plus");
    ck_assert_str_eq(fasa_names_method(FASA_METHOD_ORACLE), "oracle");
    ck_assert_int_eq(fasa_names_method_parse("magic"), -1);
    ck_assert_str_eq(fasa_names_method(FASA_NAMES_N_METHODS), "unknown");
}
END_TEST

Suite *base_suite(void)
{
    const TTest *tests[] = {test_log_request_id, test_names_match_the_wire, NULL};
    return test_suite("base", "base", 0, tests);
}

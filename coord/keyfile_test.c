/* Authentication pieces without a server: the key-file parser and writer (length, charset,
 * modes, O_EXCL), the ZAP allow-list loader, and fasa-server's bind rule (loopback only
 * without CURVE; both CURVE settings together). A runner of its own (ctest auth_unit). */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zmq.h>

#include "fasa_client.h"
#include "keyfile.h"
#include "server_config.h"
#include "zap.h"

static char s_dir[64];

static void s_setup(void)
{
    snprintf(s_dir, sizeof(s_dir), "/tmp/fasa-auth-test-XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(s_dir));
}

static void s_teardown(void)
{
    char cmd[128];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", s_dir);
    ck_assert_int_eq(system(cmd), 0);
}

/* Writes text to DIR/name with mode; returns the path (static buffer). */
static const char *s_file(const char *name, const char *text, mode_t mode)
{
    static char path[256];
    snprintf(path, sizeof(path), "%s/%s", s_dir, name);
    FILE *f = fopen(path, "w");
    ck_assert_ptr_nonnull(f);
    fputs(text, f);
    fclose(f);
    ck_assert_int_eq(chmod(path, mode), 0);
    return path;
}

static mode_t s_mode(const char *path)
{
    struct stat st;
    ck_assert_int_eq(stat(path, &st), 0);
    return st.st_mode & 07777;
}

START_TEST(test_keyfile_roundtrip)
{
    char pub[41], secret[41], got[41], err[600], path[256];
    ck_assert_int_eq(zmq_curve_keypair(pub, secret), 0);
    const mode_t old = umask(0);
    snprintf(path, sizeof(path), "%s/k.key", s_dir);
    ck_assert_int_eq(fasa_keyfile_write(path, secret, 1, 0, err, sizeof(err)), 0);
    ck_assert_int_eq(s_mode(path), 0600);
    /* O_EXCL: an existing file is refused, --force replaces it. */
    ck_assert_int_eq(fasa_keyfile_write(path, secret, 1, 0, err, sizeof(err)), -1);
    ck_assert_ptr_nonnull(strstr(err, "already exists"));
    ck_assert_int_eq(fasa_keyfile_write(path, secret, 1, 1, err, sizeof(err)), 0);
    ck_assert_int_eq(fasa_keyfile_read(path, 1, got, err, sizeof(err)), 0);
    ck_assert_str_eq(got, secret);
    umask(077); /* the public key gets exactly 0644 whatever the umask */
    snprintf(path, sizeof(path), "%s/k.pub", s_dir);
    ck_assert_int_eq(fasa_keyfile_write(path, pub, 0, 0, err, sizeof(err)), 0);
    umask(old);
    ck_assert_int_eq(s_mode(path), 0644);
    ck_assert_int_eq(fasa_keyfile_read(path, 0, got, err, sizeof(err)), 0);
    ck_assert_str_eq(got, pub);
    /* The file is the key and a newline: 41 bytes. */
    struct stat st;
    ck_assert_int_eq(stat(path, &st), 0);
    ck_assert_int_eq(st.st_size, 41);
}
END_TEST

START_TEST(test_keyfile_bad)
{
    const char *key = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"; /* 40 Z85 characters */
    ck_assert_int_eq(fasa_key_z85_valid(key, strlen(key)), 1);
    char got[41], err[600];
    /* Accepted: no newline, \n, \r\n. */
    ck_assert_int_eq(fasa_keyfile_read(s_file("a.pub", key, 0644), 0, got, err, 600), 0);
    ck_assert_str_eq(got, key);
    char text[64];
    snprintf(text, sizeof(text), "%s\r\n", key);
    ck_assert_int_eq(fasa_keyfile_read(s_file("b.pub", text, 0644), 0, got, err, 600), 0);
    ck_assert_str_eq(got, key);
    /* Bad length: 39 characters, 41 characters, two lines, empty. */
    const char *bad_len[] = {"rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf\n",
                             "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7x\n",
                             "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7\nrq:rM>}U\n", ""};
    for (int i = 0; i < 4; i++) {
        const char *p = s_file("c.pub", bad_len[i], 0644);
        strcpy(got, "unchanged");
        ck_assert_int_eq(fasa_keyfile_read(p, 0, got, err, sizeof(err)), -1);
        ck_assert_ptr_nonnull(strstr(err, p));
        ck_assert_ptr_nonnull(strstr(err, "expected one line of 40 Z85 characters"));
        ck_assert_str_eq(got, "unchanged");
    }
    /* Bad characters: a space, a quote, a tilde, a NUL are not Z85. */
    const char bad_chars[] = {' ', '"', '~', ',', '\''};
    for (size_t i = 0; i < sizeof(bad_chars); i++) {
        snprintf(text, sizeof(text), "%s\n", key);
        text[7] = bad_chars[i];
        const char *p = s_file("d.pub", text, 0644);
        ck_assert_int_eq(fasa_keyfile_read(p, 0, got, err, sizeof(err)), -1);
        ck_assert_ptr_nonnull(strstr(err, "outside the Z85 alphabet"));
    }
    ck_assert_int_eq(fasa_key_z85_valid("abc\0defghijklmnopqrstuvwxyzABCDEFGHIJKLM", 40), 0);
    /* A secret key open to group or other is refused, naming the mode; 0600 and 0400 pass. */
    const mode_t open_modes[] = {0640, 0604, 0660, 0644, 0620};
    for (size_t i = 0; i < 5; i++) {
        const char *p = s_file("e.key", key, open_modes[i]);
        ck_assert_int_eq(fasa_keyfile_read(p, 1, got, err, sizeof(err)), -1);
        ck_assert_ptr_nonnull(strstr(err, "too open"));
        ck_assert_ptr_nonnull(strstr(err, p));
        /* A public key with the same mode is fine. */
        ck_assert_int_eq(fasa_keyfile_read(p, 0, got, err, sizeof(err)), 0);
    }
    ck_assert_int_eq(fasa_keyfile_read(s_file("f.key", key, 0600), 1, got, err, 600), 0);
    ck_assert_int_eq(fasa_keyfile_read(s_file("g.key", key, 0400), 1, got, err, 600), 0);
    /* Missing file, a directory. */
    ck_assert_int_eq(fasa_keyfile_read("/nonexistent/x.key", 1, got, err, 600), -1);
    ck_assert_ptr_nonnull(strstr(err, "No such file"));
    ck_assert_int_eq(fasa_keyfile_read(s_dir, 0, got, err, 600), -1);
    ck_assert_ptr_nonnull(strstr(err, "not a regular file"));
}
END_TEST

START_TEST(test_zap_allow_list)
{
    char pub[3][41], secret[41], err[1200];
    for (int i = 0; i < 3; i++) ck_assert_int_eq(zmq_curve_keypair(pub[i], secret), 0);
    char text[64];
    /* Empty directory: refused (nobody could connect). */
    ck_assert_ptr_null(fasa_zap_load(s_dir, err, sizeof(err)));
    ck_assert_ptr_nonnull(strstr(err, "no *.pub key files"));
    snprintf(text, sizeof(text), "%s\n", pub[0]);
    s_file("alice.pub", text, 0644);
    snprintf(text, sizeof(text), "%s\n", pub[1]);
    s_file("bob.pub", text, 0644);
    s_file("README", "not a key\n", 0644);
    s_file("carol.key", "not read either\n", 0600);
    fasa_zap *z = fasa_zap_load(s_dir, err, sizeof(err));
    ck_assert_msg(z != NULL, "%s", err);
    ck_assert_uint_eq(fasa_zap_n_keys(z), 2);
    uint8_t bin[32];
    ck_assert_ptr_nonnull(zmq_z85_decode(bin, pub[0]));
    ck_assert_str_eq(fasa_zap_lookup(z, bin), "alice");
    ck_assert_ptr_nonnull(zmq_z85_decode(bin, pub[1]));
    ck_assert_str_eq(fasa_zap_lookup(z, bin), "bob");
    ck_assert_ptr_nonnull(zmq_z85_decode(bin, pub[2]));
    ck_assert_ptr_null(fasa_zap_lookup(z, bin));
    fasa_zap_destroy(&z);
    ck_assert_ptr_null(z);
    /* One bad .pub file fails the load, naming it. */
    const char *bad = s_file("mallory.pub", "short\n", 0644);
    ck_assert_ptr_null(fasa_zap_load(s_dir, err, sizeof(err)));
    ck_assert_ptr_nonnull(strstr(err, bad));
    ck_assert_ptr_null(fasa_zap_load("/nonexistent-dir", err, sizeof(err)));
    ck_assert_ptr_nonnull(strstr(err, "/nonexistent-dir"));
}
END_TEST

START_TEST(test_bind_rule)
{
    const char *loop[] = {"tcp://127.0.0.1:5555", "tcp://127.0.0.1:*", "tcp://127.1.2.3:1",
                          "tcp://localhost:5555", "tcp://[::1]:5555",  "ipc:///tmp/fasa.sock",
                          "inproc://fasa"};
    for (size_t i = 0; i < sizeof(loop) / sizeof(*loop); i++)
        ck_assert_msg(server_config_bind_is_loopback(loop[i]), "%s", loop[i]);
    const char *open_[] = {"tcp://0.0.0.0:5555",  "tcp://*:5555",          "tcp://[::]:5555",
                           "tcp://10.0.0.1:5555", "tcp://eth0:5555",       "tcp://node1:5555",
                           "tcp://127.0.0.1.x:1", "tcp://127.0.0.256:1",   "tcp://127.0.0:1",
                           "tcp://127.0.0.1",     "udp://127.0.0.1:5555",  "tcp://localhost.x:1",
                           "tcp://127..0.1:5555", "tcp://1270.0.0.1:5555", "pgm://127.0.0.1:5"};
    for (size_t i = 0; i < sizeof(open_) / sizeof(*open_); i++)
        ck_assert_msg(!server_config_bind_is_loopback(open_[i]), "%s", open_[i]);

    const char *vars[] = {"FASA_BIND", "FASA_CURVE_SECRET", "FASA_AUTHORIZED_KEYS", "FASA_CONFIG"};
    for (size_t i = 0; i < 4; i++) unsetenv(vars[i]);
    server_config c;
    char err[600];
    FILE *out = fopen("/dev/null", "w");
    char *open_bind[] = {"fasa-server", "--bind", "tcp://0.0.0.0:*", NULL};
    ck_assert_int_eq(server_config_load(&c, 3, open_bind, out, err, sizeof(err)), 2);
    ck_assert_ptr_nonnull(strstr(err, "--bind tcp://0.0.0.0:* is not loopback"));
    ck_assert_ptr_nonnull(strstr(err, "--curve-secret"));
    ck_assert_ptr_nonnull(strstr(err, "--authorized-keys"));
    char *half[] = {"fasa-server", "--curve-secret", "s.key", NULL};
    ck_assert_int_eq(server_config_load(&c, 3, half, out, err, sizeof(err)), 2);
    ck_assert_str_eq(err, "--curve-secret needs --authorized-keys too (CURVE encrypts, the "
                          "allow-list admits)");
    char *full[] = {"fasa-server",    "--bind", "tcp://0.0.0.0:*",
                    "--curve-secret", "s.key",  "--authorized-keys",
                    "keys",           NULL};
    ck_assert_int_eq(server_config_load(&c, 7, full, out, err, sizeof(err)), 0);
    ck_assert_str_eq(c.curve_secret, "s.key");
    ck_assert_str_eq(c.authorized_keys, "keys");
    /* The environment gives them too; the command line wins. */
    setenv("FASA_CURVE_SECRET", "env.key", 1);
    setenv("FASA_AUTHORIZED_KEYS", "envkeys", 1);
    char *plain[] = {"fasa-server", "--bind", "tcp://0.0.0.0:*", NULL};
    ck_assert_int_eq(server_config_load(&c, 3, plain, out, err, sizeof(err)), 0);
    ck_assert_str_eq(c.curve_secret, "env.key");
    ck_assert_int_eq(server_config_load(&c, 7, full, out, err, sizeof(err)), 0);
    ck_assert_str_eq(c.curve_secret, "s.key");
    unsetenv("FASA_AUTHORIZED_KEYS");
    ck_assert_int_eq(server_config_load(&c, 3, plain, out, err, sizeof(err)), 2);
    ck_assert_ptr_nonnull(strstr(err, "--curve-secret needs --authorized-keys"));
    unsetenv("FASA_CURVE_SECRET");
    /* And the config file (names as the long options). */
    const char *conf = s_file("fasa.conf",
                              "bind = tcp://0.0.0.0:5555\ncurve-secret = /k/s.key\n"
                              "authorized_keys = /k/allowed\n",
                              0644);
    char *with_conf[] = {"fasa-server", "--config", (char *)conf, NULL};
    ck_assert_int_eq(server_config_load(&c, 3, with_conf, out, err, sizeof(err)), 0);
    ck_assert_str_eq(c.curve_secret, "/k/s.key");
    ck_assert_str_eq(c.authorized_keys, "/k/allowed");
    fclose(out);
}
END_TEST

/* libfasa's fasa_client_set_curve takes only Z85 keys, naming the bad argument (that the
 * derived public key is the right one, auth_test.sh shows: its clients give only .key). */
START_TEST(test_client_set_curve)
{
    char server_pub[41], server_secret[41], pub[41], secret[41];
    ck_assert_int_eq(zmq_curve_keypair(server_pub, server_secret), 0);
    ck_assert_int_eq(zmq_curve_keypair(pub, secret), 0);
    fasa_client *c = NULL;
    fasa_client_error e;
    ck_assert_int_eq(fasa_client_connect("tcp://127.0.0.1:1", 1000, &c, &e), FASA_CLIENT_OK);
    char short_key[41];
    memcpy(short_key, server_pub, 39);
    short_key[39] = 0;
    ck_assert_int_eq(fasa_client_set_curve(c, short_key, secret, NULL, &e),
                     FASA_CLIENT_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(e.msg, "server_key: not a CURVE key"));
    char bad_char[41];
    memcpy(bad_char, secret, 41);
    bad_char[3] = ' ';
    ck_assert_int_eq(fasa_client_set_curve(c, server_pub, bad_char, NULL, &e),
                     FASA_CLIENT_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(e.msg, "client_secret: not a CURVE key"));
    ck_assert_int_eq(fasa_client_set_curve(c, server_pub, secret, "x", &e),
                     FASA_CLIENT_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(e.msg, "client_public"));
    ck_assert_int_eq(fasa_client_set_curve(NULL, server_pub, secret, NULL, &e),
                     FASA_CLIENT_INVALID_ARGUMENT);
    ck_assert_int_eq(fasa_client_set_curve(c, server_pub, secret, NULL, &e), FASA_CLIENT_OK);
    ck_assert_int_eq(fasa_client_set_curve(c, server_pub, secret, pub, &e), FASA_CLIENT_OK);
    fasa_client_close(&c);
    ck_assert_ptr_null(c);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("auth");
    TCase *tc = tcase_create("auth");
    tcase_add_checked_fixture(tc, s_setup, s_teardown);
    tcase_add_test(tc, test_keyfile_roundtrip);
    tcase_add_test(tc, test_keyfile_bad);
    tcase_add_test(tc, test_zap_allow_list);
    tcase_add_test(tc, test_bind_rule);
    tcase_add_test(tc, test_client_set_curve);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    const int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}

/* A client built against an installed libfasa only (`cc $(pkg-config --cflags --libs fasa)`,
 * tests/install_test.sh): the library's error paths, then against a server at argv[1] a
 * session "m" of 2 layers, 4 query heads, 2 KV heads, head_dim 8 with 10 tokens appended to
 * every layer, 3 attends, and one attend on a session that does not exist. It checks the
 * attend output of a 1-token session against the value it appended (attention over one key
 * is that key's value) and prints "ok" lines; any failure exits 1. */
#include <fasa_client.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define L 2
#define H 4
#define HKV 2
#define D 8
#define N 10

static int s_fail(const char *what, const fasa_client_error *e)
{
    fprintf(stderr, "install_client: %s: %s\n", what, e->msg);
    return 1;
}

int main(int argc, char **argv)
{
    fasa_client *c = NULL;
    fasa_client_error e;
    /* Error paths: no endpoint, an endpoint without a transport. */
    if (fasa_client_connect("", 1000, &c, &e) != FASA_CLIENT_INVALID_ARGUMENT || c) return 1;
    if (strcmp(fasa_client_status_name(FASA_CLIENT_NOT_FOUND), "NOT_FOUND")) return 1;
    puts("ok: error paths");
    if (argc < 2) return 0;
    if (fasa_client_connect(argv[1], 10000, &c, &e)) return s_fail("connect", &e);
    fasa_client_server_info info;
    if (fasa_client_ping(c, &info, &e)) return s_fail("ping", &e);
    printf("ok: ping %s, %u ranks\n", info.version, info.n_ranks);
    fasa_client_session_config cfg = {.geom = {L, H, HKV, D}};
    if (fasa_client_create_session(c, "m", &cfg, NULL, &e)) return s_fail("create m", &e);
    static float k[L * N * HKV * D], v[L * N * HKV * D], q[H * D], out[H * D];
    for (int i = 0; i < L * N * HKV * D; i++) {
        k[i] = (float)((i * 37) % 17) / 17.0f - 0.5f;
        v[i] = (float)((i * 11) % 13) / 13.0f - 0.5f;
    }
    for (int i = 0; i < H * D; i++) q[i] = (float)(i % 5) / 5.0f;
    uint64_t len = 0;
    if (fasa_client_append(c, "m", &cfg.geom, -1, 0, N, k, v, &len, &e) || len != N)
        return s_fail("append m", &e);
    fasa_client_attend_req r = FASA_CLIENT_ATTEND_REQ_INIT;
    r.session_id = "m";
    r.geom = cfg.geom;
    r.q = q;
    r.out = out;
    for (int i = 0; i < 3; i++)
        if (fasa_client_attend(c, &r, &e)) return s_fail("attend m", &e);
    /* One key: the output of every query head is the value of its KV head. */
    if (fasa_client_create_session(c, "one", &cfg, NULL, &e)) return s_fail("create one", &e);
    if (fasa_client_append(c, "one", &cfg.geom, 0, 0, 1, k, v, NULL, &e))
        return s_fail("append one", &e);
    r.session_id = "one";
    if (fasa_client_attend(c, &r, &e)) return s_fail("attend one", &e);
    for (int h = 0; h < H; h++)
        for (int d = 0; d < D; d++)
            if (out[h * D + d] != v[(h / (H / HKV)) * D + d]) {
                fprintf(stderr, "install_client: head %d dim %d: %g, expected %g\n", h, d,
                        out[h * D + d], v[(h / (H / HKV)) * D + d]);
                return 1;
            }
    if (fasa_client_drop_session(c, "one", &e)) return s_fail("drop one", &e);
    r.session_id = "missing";
    if (fasa_client_attend(c, &r, &e) != FASA_CLIENT_NOT_FOUND) return 1;
    puts("ok: session m (10 tokens, 3 attends), one-key attention exact, NOT_FOUND for missing");
    fasa_client_close(&c);
    return 0;
}

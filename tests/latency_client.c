/* libfasa's attend halves against a live fasa-server (argv[1]): fasa_client_attend_send then
 * other work then fasa_client_attend_wait gives the same bits as fasa_client_attend and as an
 * embedded engine with as many shards as the server (argv[2]) on the same steps, every step
 * carrying k_new; a call between the halves is refused without disturbing them; a wait
 * without a send is refused; fasa_client_last_timing reports the server's step. Prints
 * "latency_client: ok" and exits 0 on success. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine.h"
#include "fasa_client.h"

#define CLIENT_PROG "latency_client"
#include "client_util.h"

#define NL 2
#define NH 8
#define NKV 2
#define D 16
#define T0 300
#define STEPS 20

int main(int argc, char **argv)
{
    if (argc != 3) return s_fail("usage: latency_client ENDPOINT N_SHARDS", NULL);
    const int shards = atoi(argv[2]);
    fasa_client *c;
    fasa_client_error ce;
    if (fasa_client_connect(argv[1], 20000, &c, &ce)) return s_fail("connect", ce.msg);
    fasa_engine_t *e = fasa_engine_new(shards, 0);
    if (!e) return s_fail("embedded engine", NULL);
    const int T = T0 + STEPS;
    const size_t row = (size_t)NKV * D;
    float *k = malloc((size_t)T * row * sizeof(float)),
          *v = malloc((size_t)T * row * sizeof(float));
    float *q = malloc((size_t)T * NH * D * sizeof(float));
    unsigned st = 7;
    for (size_t i = 0; i < (size_t)T * row; i++) k[i] = s_rand(&st), v[i] = s_rand(&st);
    for (size_t i = 0; i < (size_t)T * NH * D; i++) q[i] = 2 * s_rand(&st);
    const fasa_client_geometry g = {NL, NH, NKV, D};
    const fasa_client_session_config cc = {
        .geom = g, .method = FASA_CLIENT_METHOD_ORACLE, .budget = 32};
    const fasa_session_config ec = {.n_layers = NL,
                                    .n_heads = NH,
                                    .n_kv_heads = NKV,
                                    .head_dim = D,
                                    .method = FASA_METHOD_ORACLE,
                                    .budget = 32};
    fasa_error fe;
    fasa_client_drop_session(c, "lat-a", NULL);
    fasa_client_drop_session(c, "lat-b", NULL);
    if (fasa_client_create_session(c, "lat-a", &cc, NULL, &ce) ||
        fasa_client_create_session(c, "lat-b", &cc, NULL, &ce))
        return s_fail("create", ce.msg);
    if (fasa_engine_create(e, "e", &ec, &fe)) return s_fail("embedded create", fe.msg);
    for (int l = 0; l < NL; l++) {
        if (fasa_client_append(c, "lat-a", &g, l, 0, T0, k, v, NULL, &ce) ||
            fasa_client_append(c, "lat-b", &g, l, 0, T0, k, v, NULL, &ce))
            return s_fail("append", ce.msg);
        if (fasa_engine_append(e, "e", l, 0, T0, k, v, &fe))
            return s_fail("embedded append", fe.msg);
    }
    fasa_client_attend_req r0 = FASA_CLIENT_ATTEND_REQ_INIT;
    r0.geom = g;
    float oa[NH * D], ob[NH * D], oe[NH * D];
    /* A wait with nothing sent is refused. */
    fasa_client_attend_req r = r0;
    r.out = oa;
    if (fasa_client_attend_wait(c, &r, &ce) != FASA_CLIENT_FAILED_PRECONDITION)
        return s_fail("a wait without a send was not refused", NULL);
    double mag = 0;
    for (int t = T0; t < T; t++)
        for (int l = 0; l < NL; l++) {
            fasa_client_attend_req ra = r0, rb = r0;
            ra.session_id = "lat-a", rb.session_id = "lat-b";
            ra.layer = rb.layer = (uint32_t)l;
            ra.q = rb.q = q + (size_t)t * NH * D;
            ra.k_new = rb.k_new = k + (size_t)t * row;
            ra.v_new = rb.v_new = v + (size_t)t * row;
            ra.out = oa, rb.out = ob;
            memset(oa, 0, sizeof(oa));
            if (fasa_client_attend_send(c, &ra, &ce)) return s_fail("attend_send", ce.msg);
            /* Meanwhile: the embedded step, and a call on the busy client, which is refused. */
            const fasa_attend_req er = {.layer = l,
                                        .q = ra.q,
                                        .k_new = ra.k_new,
                                        .v_new = ra.v_new,
                                        .method = -1,
                                        .gqa = -1,
                                        .max_pos = -1};
            if (fasa_engine_attend(e, "e", &er, oe, NULL, NULL, &fe))
                return s_fail("embedded attend", fe.msg);
            if (fasa_client_attend(c, &rb, &ce) != FASA_CLIENT_FAILED_PRECONDITION)
                return s_fail("a call between send and wait was not refused", ce.msg);
            if (fasa_client_attend_wait(c, &ra, &ce)) return s_fail("attend_wait", ce.msg);
            if (fasa_client_attend(c, &rb, &ce)) return s_fail("attend", ce.msg);
            if (memcmp(oa, ob, sizeof(oa))) return s_fail("send/wait and attend differ", NULL);
            if (memcmp(oa, oe, sizeof(oa)))
                return s_fail("the server and the embedded engine differ", NULL);
            for (int i = 0; i < NH * D; i++) mag = fmax(mag, fabs(oa[i]));
            fasa_client_timing tm;
            fasa_client_last_timing(c, &tm);
            /* Every visible row is in the first placement block, so on one shard: each step
             * scores and attends in one exchange, timed as attend (score 0). */
            if (!(tm.server_us >= 0 && tm.wait_us >= tm.server_us && tm.attend_us > 0 &&
                  tm.score_us == 0 && tm.server_us >= tm.attend_us)) {
                char why[256];
                snprintf(why, sizeof(why), "wait %.0f server %.0f score %.0f attend %.0f us",
                         tm.wait_us, tm.server_us, tm.score_us, tm.attend_us);
                return s_fail("implausible timing", why);
            }
        }
    if (!(mag > 1e-3)) return s_fail("the outputs carry no signal", NULL);
    fasa_client_drop_session(c, "lat-a", NULL);
    fasa_client_drop_session(c, "lat-b", NULL);
    fasa_engine_destroy(&e);
    fasa_client_close(&c);
    free(k), free(v), free(q);
    printf("latency_client: ok (%d steps x %d layers, %d shard%s)\n", STEPS, NL, shards,
           shards == 1 ? "" : "s");
    return 0;
}

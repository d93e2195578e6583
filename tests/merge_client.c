/* libfasa's merge options against a live fasa-server (argv[1], N_SHARDS shards, placement
 * block BLOCK): a session created with FASA_CLIENT_MERGE_LOCAL, and per-attend LOCAL and
 * EXACT on sessions of the other default, give the embedded engine's outputs with the same
 * merge, bit for bit; LOCAL returns no selected positions (all -1); with 2 or more shards
 * LOCAL differs from EXACT (the option reached the server); unknown merges are refused by
 * the client naming the field. Prints one ok line, or FAIL lines and exits 1.
 *   merge_client ENDPOINT N_SHARDS BLOCK */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine.h"
#include "fasa_client.h"

#define CLIENT_PROG "merge_client"
#include "client_util.h"

#define NL 2
#define NH 8
#define NKV 2
#define D 16
#define T 600
#define BUDGET 32

int main(int argc, char **argv)
{
    if (argc != 4) return s_fail("usage: merge_client ENDPOINT N_SHARDS BLOCK", NULL);
    const int shards = atoi(argv[2]), block = atoi(argv[3]);
    fasa_client *c;
    fasa_client_error ce;
    if (fasa_client_connect(argv[1], 20000, &c, &ce)) return s_fail("connect", ce.msg);
    fasa_engine_t *e = fasa_engine_new(shards, block);
    if (!e) return s_fail("embedded engine", NULL);
    const size_t row = (size_t)NKV * D;
    float *k = malloc((size_t)T * row * sizeof(float)),
          *v = malloc((size_t)T * row * sizeof(float)), *q = malloc((size_t)NH * D * sizeof(float));
    unsigned st = 11;
    for (size_t i = 0; i < (size_t)T * row; i++) k[i] = s_rand(&st), v[i] = s_rand(&st);
    for (size_t i = 0; i < (size_t)NH * D; i++) q[i] = 3 * s_rand(&st);
    const fasa_client_geometry g = {NL, NH, NKV, D};
    /* Sessions: "mc-exact" (the default merge) and "mc-local" (LOCAL), both on the server
     * and in the embedded engine. */
    const char *ids[2] = {"mc-exact", "mc-local"};
    for (int s = 0; s < 2; s++) {
        const fasa_client_session_config cc = {.geom = g,
                                               .method = FASA_CLIENT_METHOD_ORACLE,
                                               .budget = BUDGET,
                                               .merge = s ? FASA_CLIENT_MERGE_LOCAL
                                                          : FASA_CLIENT_MERGE_DEFAULT};
        const fasa_session_config ec = {.n_layers = NL,
                                        .n_heads = NH,
                                        .n_kv_heads = NKV,
                                        .head_dim = D,
                                        .method = FASA_METHOD_ORACLE,
                                        .budget = BUDGET,
                                        .merge = s ? FASA_MERGE_LOCAL : FASA_MERGE_EXACT};
        fasa_error fe;
        fasa_client_drop_session(c, ids[s], NULL);
        if (fasa_client_create_session(c, ids[s], &cc, NULL, &ce)) return s_fail("create", ce.msg);
        if (fasa_engine_create(e, ids[s], &ec, &fe)) return s_fail("embedded create", fe.msg);
        for (int l = 0; l < NL; l++) {
            if (fasa_client_append(c, ids[s], &g, l, 0, T, k, v, NULL, &ce))
                return s_fail("append", ce.msg);
            if (fasa_engine_append(e, ids[s], l, 0, T, k, v, &fe))
                return s_fail("embedded append", fe.msg);
        }
    }
    /* Each session with each merge (DEFAULT, EXACT, LOCAL), each layer, two visible lengths. */
    int differ = 0, steps = 0;
    for (int s = 0; s < 2; s++)
        for (int m = 0; m < 3; m++)
            for (int l = 0; l < NL; l++)
                for (int mp = 0; mp < 2; mp++) {
                    const int64_t max_pos = mp ? 400 : -1;
                    float out[NH * D], ref[NH * D], exact[NH * D];
                    int32_t sel[NH * BUDGET];
                    fasa_client_attend_req r = FASA_CLIENT_ATTEND_REQ_INIT;
                    r.session_id = ids[s];
                    r.geom = g;
                    r.layer = (uint32_t)l;
                    r.q = q;
                    r.max_pos = max_pos;
                    r.merge = (fasa_client_merge)m;
                    r.out = out;
                    r.selected = sel;
                    r.selected_budget = BUDGET;
                    if (fasa_client_attend(c, &r, &ce)) return s_fail("attend", ce.msg);
                    const int local = m == 2 || (m == 0 && s == 1);
                    fasa_attend_req er = {.layer = l,
                                          .q = q,
                                          .method = -1,
                                          .gqa = -1,
                                          .max_pos = (int32_t)max_pos,
                                          .merge = m == 0   ? -1
                                                   : m == 2 ? FASA_MERGE_LOCAL
                                                            : FASA_MERGE_EXACT};
                    fasa_error fe;
                    if (fasa_engine_attend(e, ids[s], &er, ref, NULL, NULL, &fe))
                        return s_fail("embedded attend", fe.msg);
                    if (memcmp(out, ref, sizeof(out))) {
                        char why[128];
                        snprintf(why, sizeof(why), "session %s, merge %d, layer %d, max_pos %lld",
                                 ids[s], m, l, (long long)max_pos);
                        return s_fail("the server and the embedded engine differ", why);
                    }
                    for (int i = 0; i < NH * BUDGET; i++)
                        if (local && sel[i] != -1)
                            return s_fail("a local merge returned selected positions", NULL);
                    er.merge = FASA_MERGE_EXACT;
                    if (fasa_engine_attend(e, ids[s], &er, exact, NULL, NULL, &fe))
                        return s_fail("embedded exact attend", fe.msg);
                    if (local && memcmp(out, exact, sizeof(out))) differ++;
                    steps++;
                }
    if (shards >= 2 && !differ)
        return s_fail("LOCAL gave EXACT's outputs on every step with 2 or more shards", NULL);
    if (shards == 1 && differ) return s_fail("LOCAL differs from EXACT with one shard", NULL);
    /* Unknown merges: refused by the client, naming the field. */
    fasa_client_session_config bad = {.geom = g, .merge = (fasa_client_merge)9};
    if (fasa_client_create_session(c, "mc-bad", &bad, NULL, &ce) != FASA_CLIENT_INVALID_ARGUMENT ||
        !strstr(ce.msg, "create_session.merge: 9 unknown"))
        return s_fail("create_session.merge 9 was not refused by name", ce.msg);
    float out[NH * D];
    fasa_client_attend_req r = FASA_CLIENT_ATTEND_REQ_INIT;
    r.session_id = ids[0];
    r.geom = g;
    r.q = q;
    r.out = out;
    r.merge = (fasa_client_merge)-1;
    if (fasa_client_attend(c, &r, &ce) != FASA_CLIENT_INVALID_ARGUMENT ||
        !strstr(ce.msg, ".merge: -1 unknown"))
        return s_fail("attend.merge -1 was not refused by name", ce.msg);
    for (int s = 0; s < 2; s++) fasa_client_drop_session(c, ids[s], NULL);
    fasa_engine_destroy(&e);
    fasa_client_close(&c);
    free(k), free(v), free(q);
    printf("merge_client: ok (%d steps, %d shard%s, local differs from exact on %d)\n", steps,
           shards, shards == 1 ? "" : "s", differ);
    return 0;
}

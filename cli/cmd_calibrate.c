/* fasa calibrate: dominant FCs per head from recorded activations (FASA Eq. 4-5). */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "calib.h"
#include "backend.h"
#include "cli.h"
#include "fasa_client.h"
#include "opts.h"
#include "progress.h"
#include "qkv.h"

static const char usage[] =
    "usage: fasa calibrate --qkv FILE --ntip N --out PROFILE [options]\n"
    "\n"
    "Scores every sample decode position t of the recorded activations against keys 0..t and\n"
    "measures, per (layer, query head, frequency chunk), the contextual agreement: the share of\n"
    "the head's top-K keys that the chunk alone also ranks in its top K. Keeps the N chunks with\n"
    "the highest mean agreement per head and writes them as a text profile.\n"
    "\n";

/* Sends the activations of tokens [0, co->pos_end) to a server, writes the profile text it
 * returns to out. Returns 0, or -1 with the reason in err. */
static int s_calibrate_remote(const char *server, const char *name, const fasa_activations *a,
                              const fasa_calib_opts *co, const char *out, char *err, size_t err_len)
{
    const size_t T = (size_t)co->pos_end, L = (size_t)a->n_layers;
    const size_t qrow = (size_t)a->n_heads * a->head_dim,
                 krow = (size_t)a->n_kv_heads * a->head_dim;
    float *q = malloc(L * T * qrow * sizeof(float)), *k = malloc(L * T * krow * sizeof(float));
    char *text = NULL;
    fasa_client *c = NULL;
    fasa_client_error ce;
    int rc = -1;
    if (!q || !k) {
        snprintf(err, err_len, "out of memory for %zu tokens of %zu layers", T, L);
        goto done;
    }
    for (size_t l = 0; l < L; l++) {
        memcpy(q + l * T * qrow, a->q[l], T * qrow * sizeof(float));
        memcpy(k + l * T * krow, a->k[l], T * krow * sizeof(float));
    }
    const fasa_client_geometry g = {(uint32_t)a->n_layers, (uint32_t)a->n_heads,
                                    (uint32_t)a->n_kv_heads, (uint32_t)a->head_dim};
    const fasa_client_calib_opts o = {
        .pairing = co->pairing == FC_PAIRING_HALF ? FASA_CLIENT_PAIRING_HALF
                                                  : FASA_CLIENT_PAIRING_INTERLEAVED,
        .ntip = (uint32_t)co->ntip,
        .window = (uint32_t)co->window,
        .pos_begin = (uint32_t)co->pos_begin,
        .pos_end = (uint32_t)co->pos_end,
        .pos_step = (uint32_t)co->pos_step,
        .gqa = co->gqa_shared ? FASA_CLIENT_GQA_SHARED : FASA_CLIENT_GQA_PER_HEAD,
        .profile_name = name};
    if (!(c = backend_connect(server, BACKEND_TIMEOUT_MS, NULL, err, err_len))) goto done;
    if (fasa_client_calibrate(c, &g, (uint32_t)T, q, k, &o, &text, &ce)) {
        snprintf(err, err_len, "%s", ce.msg);
        goto done;
    }
    FILE *f = fopen(out, "w");
    if (!f || fputs(text, f) == EOF || fclose(f) != 0) {
        snprintf(err, err_len, "cannot write profile %s: %s", out, strerror(errno));
        goto done;
    }
    rc = 0;
done:
    fasa_client_close(&c);
    free(text);
    free(q);
    free(k);
    return rc;
}

int cmd_calibrate(int argc, char **argv)
{
    const char *qkv_path = NULL, *out = NULL, *positions = NULL, *server = NULL, *name = NULL;
    long ntip = 0, window = 256;
    fasa_calib_opts co = {.pairing = FC_PAIRING_INTERLEAVED};
    const cli_opt opts[] = {
        CLI_STR("qkv", &qkv_path, "FILE", NULL,
                "a QKV1 dump, or a directory with q.npy k.npy v.npy\n"
                "(float32, shape (n_layers, T, heads, head_dim))"),
        CLI_INT("ntip", &ntip, 1, 1 << 20, "N", NULL, "dominant chunks per head (1 .. head_dim/2)"),
        CLI_STR("out", &out, "PROFILE", NULL, "where to write the profile"),
        CLI_INT("window", &window, 1, 1 << 30, "K", NULL,
                "agreement window K (default 256; K_eff = min(K, t+1))"),
        CLI_STR("positions", &positions, "A:B[:S]", NULL,
                "sample positions t in [A, B) by S (default: every position)"),
        CLI_KEY("pairing", 'P', "P", NULL,
                "interleaved (dims 2i,2i+1; default) or half (dims i, i+d/2)"),
        CLI_KEY("gqa", 'g', "G", NULL,
                "per-head (default: each query head its own chunks) or shared\n"
                "(one set per KV head, by the mean agreement of its query heads)"),
        CLI_STR("server", &server, "ENDPOINT", NULL,
                "calibrate on a fasa-server instead of in-process: sends the q and\n"
                "k of every layer for tokens [0, B) and writes the profile it returns\n"
                "(FASA_TIMEOUT_MS: the wait for the reply, default 120000)"),
        CLI_STR("profile-name", &name, "NAME", NULL,
                "with --server: also store the profile on the server by this name\n"
                "(for 'fasa create --profile-name NAME')"),
        CLI_END};
    cli_parser ap;
    cli_begin(&ap, "calibrate", usage, opts, argc, argv);
    int c;
    while ((c = cli_next(&ap)) > 0) {
        switch (c) {
        case 'P':
            if (fc_pairing_parse(ap.arg, &co.pairing))
                return cli_usage_error("calibrate", "--pairing '%s' is not interleaved or half",
                                       ap.arg);
            break;
        case 'g':
            if (strcmp(ap.arg, "per-head") && strcmp(ap.arg, "shared"))
                return cli_usage_error("calibrate", "--gqa '%s' is not per-head or shared", ap.arg);
            co.gqa_shared = strcmp(ap.arg, "shared") == 0;
            break;
        }
    }
    if (c == CLI_HELP) return 0;
    if (c < 0) return cli_status(c);
    if (!qkv_path) return cli_usage_error("calibrate", "--qkv FILE is required");
    if (!ntip) return cli_usage_error("calibrate", "--ntip N is required");
    if (!out) return cli_usage_error("calibrate", "--out PROFILE is required");
    if (name && !server)
        return cli_usage_error("calibrate", "--profile-name stores the profile on a server; it "
                                            "needs --server");

    char err[512];
    fasa_qkv x;
    if (fasa_qkv_load(qkv_path, &x, err, sizeof(err))) return cli_fail("calibrate", "%s", err);
    long a = 0, b = x.act.n_tokens, s = 1;
    if (positions && (cli_parse_range(positions, &a, &b, &s) || b > x.act.n_tokens)) {
        fasa_qkv_cleanup(&x);
        return cli_usage_error("calibrate",
                               "--positions '%s' must be A:B[:S] with 0 <= A < B <= %d", positions,
                               x.act.n_tokens);
    }
    if (ntip > x.act.head_dim / 2) {
        const int d = x.act.head_dim;
        fasa_qkv_cleanup(&x);
        return cli_usage_error("calibrate", "--ntip %ld exceeds the %d FCs of head_dim %d", ntip,
                               d / 2, d);
    }
    if (b <= window)
        fprintf(stderr,
                "fasa calibrate: warning: every sample position t has t+1 <= window %ld, so every "
                "FC agrees fully and the choice falls to the lowest FC indices; use later "
                "--positions or a smaller --window\n",
                window);
    co.ntip = (int)ntip;
    co.window = (int)window;
    co.pos_begin = (int)a;
    co.pos_end = (int)b;
    co.pos_step = (int)s;
    if (server) {
        const int rrc = s_calibrate_remote(server, name, &x.act, &co, out, err, sizeof(err));
        fasa_qkv_cleanup(&x);
        if (rrc) return cli_fail("calibrate", "%s", err);
        fasa_profile *p = fasa_profile_load(out, err, sizeof(err));
        if (!p) return cli_fail("calibrate", "the server's profile: %s", err);
        printf("wrote %s: %d layers x %d heads, ntip %d of %d FCs, window %d, positions %s, %s "
               "(calibrated on %s)\n",
               out, p->n_layers, p->n_heads, p->ntip, p->head_dim / 2, p->window, p->samples,
               p->gqa_shared ? "shared per KV head" : "per query head", server);
        fasa_profile_destroy(&p);
        return 0;
    }
    progress bar;
    progress_init(&bar, "calibrate", (b - a + s - 1) / s);
    co.progress = progress_callback;
    co.progress_arg = &bar;
    fasa_profile *p = fasa_calibrate(&x.act, &co, err, sizeof(err));
    progress_done(&bar);
    fasa_qkv_cleanup(&x);
    if (!p) return cli_fail("calibrate", "%s", err);
    const int rc = fasa_profile_save(p, out, err, sizeof(err));
    if (rc == 0)
        printf("wrote %s: %d layers x %d heads, ntip %d of %d FCs, window %d, positions %s, %s\n",
               out, p->n_layers, p->n_heads, p->ntip, p->head_dim / 2, p->window, p->samples,
               p->gqa_shared ? "shared per KV head" : "per query head");
    fasa_profile_destroy(&p);
    return rc ? cli_fail("calibrate", "%s", err) : 0;
}

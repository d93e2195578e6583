/* fasa calibrate: dominant FCs per head from recorded activations (FASA Eq. 4-5). */
#include <getopt.h>
#include <stdio.h>
#include <string.h>

#include "calib.h"
#include "cli.h"
#include "progress.h"
#include "qkv.h"

static const char usage[] =
    "usage: fasa calibrate --qkv FILE --ntip N --out PROFILE [options]\n"
    "\n"
    "Scores every sample decode position t of the recorded activations against keys 0..t and\n"
    "measures, per (layer, query head, frequency chunk), the contextual agreement: the share of\n"
    "the head's top-K keys that the chunk alone also ranks in its top K. Keeps the N chunks with\n"
    "the highest mean agreement per head and writes them as a text profile.\n"
    "\n"
    "  --qkv FILE          a QKV1 dump, or a directory with q.npy k.npy v.npy\n"
    "                      (float32, shape (n_layers, T, heads, head_dim))\n"
    "  --ntip N            dominant chunks per head (1 .. head_dim/2)\n"
    "  --out PROFILE       where to write the profile\n"
    "  --window K          agreement window K (default 256; K_eff = min(K, t+1))\n"
    "  --positions A:B[:S] sample positions t in [A, B) by S (default: every position)\n"
    "  --pairing P         interleaved (dims 2i,2i+1; default) or half (dims i, i+d/2)\n"
    "  --gqa G             per-head (default: each query head its own chunks) or shared\n"
    "                      (one set per KV head, by the mean agreement of its query heads)\n"
    "  --help              this text\n";

int cmd_calibrate(int argc, char **argv)
{
    static const struct option opts[] = {{"qkv", required_argument, 0, 'q'},
                                         {"ntip", required_argument, 0, 'n'},
                                         {"out", required_argument, 0, 'o'},
                                         {"window", required_argument, 0, 'w'},
                                         {"positions", required_argument, 0, 'p'},
                                         {"pairing", required_argument, 0, 'P'},
                                         {"gqa", required_argument, 0, 'g'},
                                         {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};
    const char *qkv_path = NULL, *out = NULL, *positions = NULL;
    long ntip = 0, window = 256;
    fasa_calib_opts co = {.pairing = FC_PAIRING_INTERLEAVED};
    optind = 1;
    opterr = 0;
    int c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case 'q':
            qkv_path = optarg;
            break;
        case 'o':
            out = optarg;
            break;
        case 'p':
            positions = optarg;
            break;
        case 'n':
            if (cli_parse_int(optarg, 1, 1 << 20, &ntip))
                return cli_usage_error("calibrate", "--ntip '%s' is not a positive integer",
                                       optarg);
            break;
        case 'w':
            if (cli_parse_int(optarg, 1, 1 << 30, &window))
                return cli_usage_error("calibrate", "--window '%s' is not a positive integer",
                                       optarg);
            break;
        case 'P':
            if (fc_pairing_parse(optarg, &co.pairing))
                return cli_usage_error("calibrate", "--pairing '%s' is not interleaved or half",
                                       optarg);
            break;
        case 'g':
            if (strcmp(optarg, "per-head") && strcmp(optarg, "shared"))
                return cli_usage_error("calibrate", "--gqa '%s' is not per-head or shared", optarg);
            co.gqa_shared = strcmp(optarg, "shared") == 0;
            break;
        case 'h':
            fputs(usage, stdout);
            return 0;
        default:
            return cli_usage_error("calibrate", "unknown or incomplete option '%s'",
                                   argv[optind - 1]);
        }
    }
    if (optind < argc)
        return cli_usage_error("calibrate", "unexpected argument '%s'", argv[optind]);
    if (!qkv_path) return cli_usage_error("calibrate", "--qkv FILE is required");
    if (!ntip) return cli_usage_error("calibrate", "--ntip N is required");
    if (!out) return cli_usage_error("calibrate", "--out PROFILE is required");

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

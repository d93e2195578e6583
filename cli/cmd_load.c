/* fasa load: fills an empty session on a server from files its workers read themselves
 * (LoadSession; README "Bulk load"). The logic is load_run; cmd_load only parses options. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "cli.h"
#include "fasa_client.h"
#include "opts.h"

/* Loads (or with check_only reads and checks) path into session on server and prints the
 * figures: the whole load, then each worker's file bytes, its read bandwidth (bytes over
 * the seconds it spent in file reads) and its load bandwidth (bytes over the load's wall
 * time). 0, or 1 after printing the server's one-line error. */
static int load_run(const char *server, const char *session, const char *path, int check_only)
{
    char msg[FASA_CLIENT_MSG_MAX];
    /* A load of a long context takes minutes: wait an hour unless FASA_TIMEOUT_MS says. */
    fasa_client *c = backend_connect(server, 3600000, NULL, msg, sizeof(msg));
    if (!c) return cli_fail("load", "%s", msg);
    enum { CAP = 1024 };
    fasa_client_shard_load *sh = calloc(CAP, sizeof(*sh));
    fasa_client_load_result r;
    fasa_client_error ce;
    int rc = 0;
    if (!sh) {
        rc = cli_fail("load", "out of memory");
    } else if (fasa_client_load_session(c, session, path, check_only, &r, sh, CAP, &ce)) {
        rc = cli_fail("load", "%s", ce.msg);
    } else {
        const double gb = 1e9, s = r.seconds > 0 ? r.seconds : 1e-9;
        printf("%s session %s: %llu tokens per layer from %s (%s), %.1f MB read, %.1f MB "
               "stored, %.3f s: %.3f GB/s read, %.3f GB/s stored\n",
               check_only ? "checked" : "loaded", session, (unsigned long long)r.length, path,
               r.format, (double)r.file_bytes / 1e6, (double)r.stored_bytes / 1e6, r.seconds,
               (double)r.file_bytes / gb / s, (double)r.stored_bytes / gb / s);
        for (size_t i = 0; i < r.n_shards && i < CAP; i++) {
            const double rs = sh[i].read_s > 0 ? sh[i].read_s : 1e-9;
            printf("  shard %u: %llu rows, %.1f MB read, file reads %.3f s (%.3f GB/s), its part "
                   "%.3f s, %.3f GB/s over the load\n",
                   sh[i].shard, (unsigned long long)sh[i].rows, (double)sh[i].file_bytes / 1e6,
                   sh[i].read_s, (double)sh[i].file_bytes / gb / rs, sh[i].total_s,
                   (double)sh[i].file_bytes / gb / s);
        }
    }
    free(sh);
    fasa_client_close(&c);
    return rc;
}

static const char load_usage[] =
    "usage: fasa load --session ID --from PATH --server ENDPOINT [--check-only]\n"
    "\n"
    "Fills the empty session ID with keys and values read from files by the server's workers\n"
    "themselves, each reading only its own placement blocks (so load bandwidth grows with the\n"
    "workers). PATH is on a filesystem every rank sees, inside the server's --load-root\n"
    "(a relative PATH is taken under it), and is one of:\n"
    "  a directory holding k_L.npy and v_L.npy for every layer L, each (T, n_kv_heads,\n"
    "    head_dim), float32 or float16, C order;\n"
    "  a directory holding k.npy and v.npy, each (n_layers, T, n_kv_heads, head_dim);\n"
    "  a QKV1 dump file (its k and v; see shared/data/models/stories260K/README.md).\n"
    "Shapes, dtypes and sizes are checked before anything is stored and values as they are\n"
    "read; a bad file stores nothing and the error names the file and the field or row. The\n"
    "rows land where appends would have put them. The server logs progress per layer. Prints\n"
    "the load's figures and, per worker, its file bytes, read bandwidth (over its time in\n"
    "file reads) and load bandwidth (over the whole load).\n"
    "\n";

int cmd_load(int argc, char **argv)
{
    const char *server = NULL, *session = NULL, *from = NULL;
    int check_only = 0;
    const cli_opt opts[] = {
        CLI_STR("session", &session, "ID", NULL,
                "the session (created with 'fasa create', holding no tokens)"),
        CLI_STR("from", &from, "PATH", NULL, "the directory or QKV1 file"),
        CLI_FLAG("check-only", &check_only, "read and check every worker's rows, store nothing"),
        CLI_STR("server", &server, "ENDPOINT", NULL,
                "the server, e.g. tcp://127.0.0.1:5555 (default: $FASA_SERVER)"),
        /* Taken out of argv by main for every command (backend_take_curve_args). */
        CLI_STR("curve-server-key", NULL, "FILE", NULL,
                "with --curve-secret FILE: a server with CURVE (see 'fasa --help')"),
        CLI_END};
    cli_parser p;
    cli_begin(&p, "load", load_usage, opts, argc, argv);
    const int rc = cli_parse_all(&p);
    if (rc) return cli_status(rc) < 0 ? 0 : cli_status(rc);
    if (!server) server = getenv("FASA_SERVER");
    if (!server || !*server)
        return cli_usage_error("load", "'fasa load' talks to a server: give --server ENDPOINT");
    if (!session) return cli_usage_error("load", "--session ID is required");
    if (!from) return cli_usage_error("load", "--from PATH is required");
    return load_run(server, session, from, check_only);
}

/* fasa sessions and fasa profile delete: what a server holds, and removing a stored
 * profile (ListSessions and DeleteProfile requests). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "cli.h"
#include "fasa_client.h"
#include "opts.h"

static const char sessions_usage[] =
    "usage: fasa sessions --server ENDPOINT\n"
    "\n"
    "Lists the sessions a server holds, one line each, ordered by id:\n"
    "  ID layers L heads H kv_heads K head_dim D dtype T tokens N kv_bytes B profile yes|no\n"
    "(tokens: held by layer 0; kv_bytes: keys and values, every layer), then one line\n"
    "'profiles N: NAME...' naming the profiles stored on the server. Asks no shard and writes\n"
    "nothing (unlike 'fasa snapshot').\n"
    "\n";

static const char profile_usage[] =
    "usage: fasa profile delete NAME --server ENDPOINT\n"
    "\n"
    "Deletes the profile stored on the server as NAME ('fasa calibrate --profile-name NAME'),\n"
    "and its saved file in the server's --state-dir, so that a restart with --restore does\n"
    "not bring it back. Sessions created from it keep their own copy. A server stores at most\n"
    "256 profiles; 'fasa sessions' lists them.\n"
    "\n";

/* --server and --help (after the positional arguments have been taken out). 0, -1 after
 * --help, or 2. */
static int s_parse(const char *cmd, const char *usage, int argc, char **argv, const char **server)
{
    *server = NULL;
    const cli_opt opts[] = {
        CLI_STR("server", server, "ENDPOINT", NULL,
                "the server, e.g. tcp://127.0.0.1:5555 (default: $FASA_SERVER)"),
        /* Taken out of argv by main for every command (backend_take_curve_args). */
        CLI_STR("curve-server-key", NULL, "FILE", NULL,
                "with --curve-secret FILE: a server with CURVE (see 'fasa --help')"),
        CLI_END};
    cli_parser p;
    cli_begin(&p, cmd, usage, opts, argc, argv);
    const int rc = cli_parse_all(&p);
    if (rc) return cli_status(rc);
    if (!*server) *server = getenv("FASA_SERVER");
    if (!*server || !**server)
        return cli_usage_error(
            cmd, "'fasa %s' talks to a server: give --server ENDPOINT (or set FASA_SERVER)", cmd);
    return 0;
}

static const char *s_dtype(fasa_client_dtype d)
{
    return d == FASA_CLIENT_DTYPE_F16 ? "f16" : d == FASA_CLIENT_DTYPE_BF16 ? "bf16" : "f32";
}

int cmd_sessions(int argc, char **argv)
{
    const char *server;
    int rc = s_parse("sessions", sessions_usage, argc, argv, &server);
    if (rc) return rc < 0 ? 0 : rc;
    char msg[FASA_CLIENT_MSG_MAX];
    fasa_client *c = backend_connect(server, BACKEND_TIMEOUT_MS, NULL, msg, sizeof(msg));
    if (!c) return cli_fail("sessions", "%s", msg);
    fasa_client_session_summary *ss = NULL;
    char **names = NULL;
    size_t n = 0, np = 0;
    fasa_client_error ce;
    if (fasa_client_list_sessions(c, &ss, &n, &names, &np, &ce)) {
        fasa_client_close(&c);
        return cli_fail("sessions", "%s", ce.msg);
    }
    fasa_client_close(&c);
    for (size_t i = 0; i < n; i++)
        printf("%s layers %u heads %u kv_heads %u head_dim %u dtype %s tokens %llu kv_bytes %llu "
               "profile %s\n",
               ss[i].session_id, ss[i].geom.n_layers, ss[i].geom.n_heads, ss[i].geom.n_kv_heads,
               ss[i].geom.head_dim, s_dtype(ss[i].dtype), (unsigned long long)ss[i].length,
               (unsigned long long)ss[i].kv_bytes, ss[i].has_profile ? "yes" : "no");
    printf("profiles %zu:", np);
    for (size_t i = 0; i < np; i++) printf(" %s", names[i]);
    putchar('\n');
    fasa_client_list_free(ss, names, np);
    return 0;
}

int cmd_profile(int argc, char **argv)
{
    if (argc >= 2 && (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h"))) {
        const char *server;
        return s_parse("profile", profile_usage, argc, argv, &server) < 0 ? 0 : 2;
    }
    if (argc < 2 || strcmp(argv[1], "delete"))
        return cli_usage_error("profile", "expected 'fasa profile delete NAME'");
    /* fasa profile delete NAME [options]: NAME is the first argument not an option. */
    const char *name = NULL;
    int out = 1;
    for (int i = 2; i < argc; i++) {
        if (!name && argv[i][0] != '-' && !(i > 2 && !strcmp(argv[i - 1], "--server")))
            name = argv[i];
        else
            argv[out++] = argv[i];
    }
    argv[out] = NULL;
    const char *server;
    int rc = s_parse("profile delete", profile_usage, out, argv, &server);
    if (rc) return rc < 0 ? 0 : rc;
    if (!name) return cli_usage_error("profile delete", "NAME (the stored profile) is required");
    char msg[FASA_CLIENT_MSG_MAX];
    fasa_client *c = backend_connect(server, BACKEND_TIMEOUT_MS, NULL, msg, sizeof(msg));
    if (!c) return cli_fail("profile delete", "%s", msg);
    fasa_client_error ce;
    if (fasa_client_delete_profile(c, name, &ce))
        rc = cli_fail("profile delete", "%s", ce.msg);
    else
        printf("deleted profile %s\n", name);
    fasa_client_close(&c);
    return rc;
}

/* fasa keygen: a new CURVE key pair for fasa-server (--curve-secret, --authorized-keys) and
 * its clients (--curve-server-key, --curve-secret), from libzmq's zmq_curve_keypair. */
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include <zmq.h>

#include "cli.h"
#include "keyfile.h"
#include "opts.h"

static const char keygen_usage[] =
    "usage: fasa keygen [--force] NAME\n"
    "\n"
    "Writes a new CURVE key pair as one line of Z85 text each: NAME.key, the secret key\n"
    "(mode 0600, created so that it is never readable by others), and NAME.pub, the public\n"
    "key (mode 0644). Existing files are left alone unless --force.\n"
    "\n"
    "For the server: fasa-server --curve-secret SERVER.key --authorized-keys DIR, where DIR\n"
    "holds a copy of each client's NAME.pub. For a client: --curve-server-key SERVER.pub\n"
    "--curve-secret NAME.key (its public key is derived from the secret one).\n"
    "\n";

int cmd_keygen(int argc, char **argv)
{
    int force = 0;
    const cli_opt opts[] = {
        CLI_FLAG("force", &force, "overwrite NAME.key and NAME.pub if they exist"), CLI_END};
    cli_parser p;
    cli_begin(&p, "keygen", keygen_usage, opts, argc, argv);
    p.max_pos = 1;
    const int prc = cli_parse_all(&p);
    if (prc == CLI_HELP) return 0;
    if (prc) return cli_status(prc);
    if (p.n_pos != 1)
        return cli_usage_error("keygen", "give one NAME (the files are NAME.key and NAME.pub)");
    const char *name = p.pos[0];
    char pub_path[4096], key_path[4096], err[4400];
    if (!*name || (size_t)snprintf(pub_path, sizeof(pub_path), "%s.pub", name) >= sizeof(pub_path))
        return cli_usage_error("keygen", "NAME: empty or too long");
    snprintf(key_path, sizeof(key_path), "%s.key", name);
    if (!force)
        for (int i = 0; i < 2; i++) {
            const char *p = i ? pub_path : key_path;
            if (access(p, F_OK) == 0)
                return cli_fail("keygen", "%s already exists (use --force to overwrite it)", p);
        }
    char pub[FASA_KEY_Z85_LEN + 1], secret[FASA_KEY_Z85_LEN + 1];
    if (zmq_curve_keypair(pub, secret))
        return cli_fail("keygen", "zmq_curve_keypair: %s (libzmq built without CURVE?)",
                        zmq_strerror(zmq_errno()));
    int rc = 0;
    if (fasa_keyfile_write(key_path, secret, 1, force, err, sizeof(err))) {
        rc = cli_fail("keygen", "%s", err);
    } else if (fasa_keyfile_write(pub_path, pub, 0, force, err, sizeof(err))) {
        rc = cli_fail("keygen", "%s", err);
        unlink(key_path); /* no half pair */
    } else {
        printf("wrote %s (secret key, mode 0600) and %s (public key, mode 0644)\n", key_path,
               pub_path);
    }
    memset(secret, 0, sizeof(secret));
    return rc;
}

/* See server_config.h. */
#include "server_config.h"

#include <errno.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "edge.h"
#include "service.h"
#include "wal.h"
#include "env.h"

typedef enum { K_STRING, K_INT, K_LEVEL, K_FLAG } key_kind;

typedef struct key {
    const char *name, *env, *def, *arg, *help;
    key_kind kind;
    long long lo, hi;
} key;

static const key s_keys[] = {
    {"bind", "FASA_BIND", "tcp://127.0.0.1:5555", "ENDPOINT",
     "where to listen (port * = any free one; beyond loopback: CURVE only)", K_STRING, 0, 0},
    {"endpoint-file", "FASA_ENDPOINT_FILE", "", "FILE",
     "write the bound endpoint to FILE once listening", K_STRING, 0, 0},
    {"pid-file", "FASA_PID_FILE", "", "FILE", "write the coordinator's PID to FILE once listening",
     K_STRING, 0, 0},
    {"block", "FASA_BLOCK", "2048", "N", "tokens per placement block (dealt to workers in turn)",
     K_INT, 1, 1 << 24},
    {"max-message", "FASA_MAX_MESSAGE", "268435456", "BYTES", "largest request and reply, in bytes",
     K_INT, 1024, 1LL << 31},
    {"memory-limit", "FASA_MEMORY_LIMIT", "0", "BYTES",
     "KV store bytes per rank (suffix K, M, G, T: powers of 1024); 0 = no limit", K_INT, 0,
     1LL << 50},
    {"reserve", "FASA_RESERVE", "0", "BYTES",
     "memory each shard-holding rank maps and faults in at start for KV chunks (suffix K, M, G, "
     "T), reused as sessions come and go; growth past it works as without; 0 = none",
     K_INT, 0, 1LL << 50},
    {"max-pending", "FASA_MAX_PENDING", "0", "BYTES",
     "bytes that unfinished requests (partial frames, queued requests) may hold in rank 0, over "
     "every connection; past half of it the connection holding most is closed (at least 2 x "
     "--max-message; 0 = the larger of 1G and 2 x --max-message)",
     K_INT, 0, 1LL << 50},
    {"peer-timeout", "FASA_PEER_TIMEOUT", "60", "SECONDS",
     "close a connection that finishes no message (request or heartbeat) for this long, or "
     "whose handshake takes longer; 0 = never",
     K_INT, 0, 86400},
    {"max-sessions", "FASA_MAX_SESSIONS", "1024", "N", "sessions held at once", K_INT, 1,
     FASA_SERVICE_MAX_SESSIONS},
    {"deadline", "FASA_DEADLINE", "0", "MS",
     "requests that give no deadline_ms may wait this long in the queue; 0 = no deadline", K_INT, 0,
     86400000},
    {"log-level", "FASA_LOG_LEVEL", "info", "LEVEL",
     "error, warn, info (+ start, stop, refusals), debug (+ all)", K_LEVEL, 0, 0},
    {"curve-secret", "FASA_CURVE_SECRET", "", "FILE",
     "CURVE: the server's secret key ('fasa keygen' NAME.key, mode 0600)", K_STRING, 0, 0},
    {"authorized-keys", "FASA_AUTHORIZED_KEYS", "", "DIR",
     "CURVE: admit only the clients whose NAME.pub is in DIR", K_STRING, 0, 0},
    {"quiet", "FASA_QUIET", "", "", "the same as --log-level warn", K_FLAG, 0, 0},
    {"tier", "FASA_TIER", "ram", "TIER",
     "where sessions that ask for no tier keep K and V: ram, or disk (only the scoring data in "
     "RAM, the rest in files under --tier-dir)",
     K_STRING, 0, 0},
    {"tier-dir", "FASA_TIER_DIR", "", "DIR",
     "directory of the disk tier's files on every rank's node (node-local; files are unlinked "
     "at once); needed for disk-tier sessions",
     K_STRING, 0, 0},
    {"merge-eps", "FASA_MERGE_EPS", "0.25", "EPS",
     "local merge (merge LOCAL): each of S shards keeps its top ceil(B (1 + EPS) / S), "
     "EPS in [0, 64]",
     K_STRING, 0, 0},
    {"load-root", "FASA_LOAD_ROOT", "", "DIR",
     "LoadSession (fasa load) may read files only inside DIR, a filesystem every rank sees; "
     "without it the server loads no files",
     K_STRING, 0, 0},
    {"state-dir", "FASA_STATE_DIR", "", "DIR",
     "where snapshots go (fasa snapshot, --snapshot-interval); every rank must reach it", K_STRING,
     0, 0},
    {"restore", "FASA_RESTORE", "", "",
     "at start, reload every session snapshotted in --state-dir (any rank count)", K_FLAG, 0, 0},
    {"metrics-bind", "FASA_METRICS_BIND", "", "ADDR:PORT",
     "serve Prometheus metrics at http://ADDR:PORT/metrics (port 0: any free one; beyond "
     "loopback: CURVE only); off by default",
     K_STRING, 0, 0},
    {"snapshot-interval", "FASA_SNAPSHOT_INTERVAL", "0", "SECONDS",
     "snapshot every changed session this often (0: only on request); needs --state-dir", K_INT, 0,
     1 << 30},
    {"stop-grace", "FASA_STOP_GRACE", "60", "SECONDS",
     "on SIGTERM or Shutdown, with --state-dir: the final snapshot must finish within this "
     "(else exit 1)",
     K_INT, 1, 86400},
    {"wal", "FASA_WAL", "write", "MODE",
     "with --state-dir, log every append before its reply: write (survives kill -9), fsync "
     "(+ node crash), off",
     K_STRING, 0, 0},
};
#define N_KEYS (sizeof(s_keys) / sizeof(*s_keys))

static int s_err(char *err, size_t len, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int s_err(char *err, size_t len, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, len, fmt, ap);
    va_end(ap);
    return 2;
}

static const key *s_find(const char *name)
{
    for (size_t i = 0; i < N_KEYS; i++) {
        const char *a = s_keys[i].name, *b = name;
        while (*a && (*a == *b || (*a == '-' && *b == '_'))) a++, b++;
        if (!*a && !*b) return &s_keys[i];
    }
    return NULL;
}

static int s_copy(char *dst, size_t cap, const char *value, const char *where, char *err,
                  size_t len)
{
    if (strlen(value) >= cap)
        return s_err(err, len, "%s: value is longer than %zu bytes", where, cap - 1);
    memcpy(dst, value, strlen(value) + 1);
    return 0;
}

/* Applies one setting; where says where it came from ("--block", "FASA_BLOCK", "f:3"). */
static int s_set(server_config *c, const key *k, const char *value, const char *where, char *err,
                 size_t len)
{
    if (k->kind == K_INT) {
        char *end;
        errno = 0;
        long long v = strtoll(value, &end, 10);
        /* A BYTES setting may end in K, M, G or T (KiB, MiB, GiB, TiB). */
        const char *units = "KMGT", *u = *end && !end[1] && !strcmp(k->arg, "BYTES")
                                             ? strchr(units, end[0] & ~0x20)
                                             : NULL;
        if (u && *u && v >= 0 && v <= (k->hi >> (10 * (u - units + 1)))) {
            v <<= 10 * (u - units + 1);
            end++;
        }
        if (!*value || *end || errno || v < k->lo || v > k->hi)
            return s_err(err, len, "%s: '%s' must be an integer in [%lld, %lld]", where, value,
                         k->lo, k->hi);
        if (strcmp(k->name, "block") == 0)
            c->block = (long)v;
        else if (strcmp(k->name, "memory-limit") == 0)
            c->memory_limit = v;
        else if (strcmp(k->name, "reserve") == 0)
            c->reserve = v;
        else if (strcmp(k->name, "max-sessions") == 0)
            c->max_sessions = (int)v;
        else if (strcmp(k->name, "deadline") == 0)
            c->deadline_ms = (long)v;
        else if (strcmp(k->name, "snapshot-interval") == 0)
            c->snapshot_interval = (long)v;
        else if (strcmp(k->name, "stop-grace") == 0)
            c->stop_grace = (long)v;
        else if (strcmp(k->name, "max-pending") == 0)
            c->max_pending = v;
        else if (strcmp(k->name, "peer-timeout") == 0)
            c->peer_timeout = (long)v;
        else
            c->max_message = v;
        return 0;
    }
    if (k->kind == K_LEVEL) {
        if (fasa_log_level_parse(value, &c->log_level))
            return s_err(err, len, "%s: '%s' is not error, warn, info or debug", where, value);
        return 0;
    }
    if (k->kind == K_FLAG) {
        const int on = !strcmp(value, "1") || !strcmp(value, "true") || !strcmp(value, "yes");
        if (!on && *value && strcmp(value, "0") && strcmp(value, "false") && strcmp(value, "no"))
            return s_err(err, len, "%s: '%s' is not true or false", where, value);
        if (strcmp(k->name, "restore") == 0)
            c->restore = on;
        else if (on)
            c->log_level = FASA_LOG_WARN;
        return 0;
    }
    if (strcmp(k->name, "bind") == 0) {
        if (!*value) return s_err(err, len, "%s: the endpoint is empty", where);
        return s_copy(c->bind, sizeof(c->bind), value, where, err, len);
    }
    if (strcmp(k->name, "wal") == 0) {
        fasa_wal_mode m;
        if (fasa_wal_mode_parse(value, &m))
            return s_err(err, len, "%s: '%s' is not write, fsync or off", where, value);
        c->wal = (int)m;
        return 0;
    }
    if (strcmp(k->name, "metrics-bind") == 0) {
        int port = -1, n = -1;
        const char *colon = strrchr(value, ':');
        if (*value && (!colon || colon == value || sscanf(colon + 1, "%d%n", &port, &n) != 1 ||
                       colon[1 + n] || port < 0 || port > 65535))
            return s_err(err, len, "%s: '%s' must be ADDR:PORT (e.g. 127.0.0.1:9464)", where,
                         value);
        return s_copy(c->metrics_bind, sizeof(c->metrics_bind), value, where, err, len);
    }
    if (strcmp(k->name, "tier") == 0) {
        if (strcmp(value, "ram") && strcmp(value, "disk"))
            return s_err(err, len, "%s: '%s' is not ram or disk", where, value);
        c->tier = value[0] == 'd';
        return 0;
    }
    if (strcmp(k->name, "tier-dir") == 0)
        return s_copy(c->tier_dir, sizeof(c->tier_dir), value, where, err, len);
    if (strcmp(k->name, "merge-eps") == 0) {
        char *end;
        const double x = strtod(value, &end);
        if (end == value || *end || !(x >= 0 && x <= 64))
            return s_err(err, len, "%s: '%s' must be a number in [0, 64]", where, value);
        c->merge_eps = x;
        return 0;
    }
    if (strcmp(k->name, "load-root") == 0)
        return s_copy(c->load_root, sizeof(c->load_root), value, where, err, len);
    if (strcmp(k->name, "curve-secret") == 0)
        return s_copy(c->curve_secret, sizeof(c->curve_secret), value, where, err, len);
    if (strcmp(k->name, "authorized-keys") == 0)
        return s_copy(c->authorized_keys, sizeof(c->authorized_keys), value, where, err, len);
    if (strcmp(k->name, "endpoint-file") == 0)
        return s_copy(c->endpoint_file, sizeof(c->endpoint_file), value, where, err, len);
    if (strcmp(k->name, "state-dir") == 0)
        return s_copy(c->state_dir, sizeof(c->state_dir), value, where, err, len);
    return s_copy(c->pid_file, sizeof(c->pid_file), value, where, err, len);
}

static char *s_trim(char *s)
{
    while (*s == ' ' || *s == '\t') s++;
    char *e = s + strlen(s);
    while (e > s && (e[-1] == ' ' || e[-1] == '\t' || e[-1] == '\n' || e[-1] == '\r')) *--e = 0;
    return s;
}

static int s_read_file(server_config *c, const char *path, char *err, size_t len)
{
    FILE *f = fopen(path, "r");
    if (!f) return s_err(err, len, "config %s: %s", path, strerror(errno));
    char line[1024], where[600];
    int lineno = 0, rc = 0;
    while (!rc && fgets(line, sizeof(line), f)) {
        lineno++;
        snprintf(where, sizeof(where), "config %s line %d", path, lineno);
        if (!strchr(line, '\n') && !feof(f)) {
            rc = s_err(err, len, "%s: line too long", where);
            break;
        }
        char *hash = strchr(line, '#');
        if (hash) *hash = 0;
        char *t = s_trim(line);
        if (!*t) continue;
        char *eq = strchr(t, '=');
        if (!eq) {
            rc = s_err(err, len, "%s: expected 'name = value'", where);
            break;
        }
        *eq = 0;
        const char *name = s_trim(t), *value = s_trim(eq + 1);
        const key *k = s_find(name);
        if (!k || strcmp(k->name, "config") == 0)
            rc = s_err(err, len, "%s: unknown setting '%s' (see fasa-server --help)", where, name);
        else
            rc = s_set(c, k, value, where, err, len);
    }
    if (!rc && ferror(f)) rc = s_err(err, len, "config %s: cannot read it", path);
    fclose(f);
    return rc;
}

static void s_usage(FILE *out)
{
    fputs("usage: fasa-server [options]\n"
          "       mpirun -n N fasa-server [options]   (rank 0 coordinates, ranks 1..N-1 hold "
          "shards)\n"
          "\n"
          "Serves the fasa.v1 protocol (proto/fasa.proto) on a ZeroMQ ROUTER socket. Started\n"
          "without a launcher it runs as one rank that also holds the KV cache.\n"
          "\n"
          "Each setting: --name VALUE, or FASA_<NAME> in the environment, or 'name = value' in\n"
          "the --config file; the command line wins over the environment, which wins over the\n"
          "file.\n\n",
          out);
    for (size_t i = 0; i < N_KEYS; i++) {
        const key *k = &s_keys[i];
        char opt[64];
        snprintf(opt, sizeof(opt), "--%s%s%s", k->name, *k->arg ? " " : "", k->arg);
        fprintf(out, "  %-26s %s\n  %-26s (env %s; default %s)\n", opt, k->help, "", k->env,
                *k->def ? k->def : "none");
    }
    fputs("  --config FILE              read settings from FILE (env FASA_CONFIG)\n"
          "  --version                  print the version\n"
          "  --help                     this text\n"
          "\n"
          "Stop it with SIGTERM (deploy/stop-local.sh) or a Shutdown request (fasa shutdown).\n",
          out);
}

int server_config_bind_is_loopback(const char *ep)
{
    if (strncmp(ep, "ipc://", 6) == 0 || strncmp(ep, "inproc://", 9) == 0) return 1;
    if (strncmp(ep, "tcp://", 6) != 0) return 0;
    const char *host = ep + 6, *colon = strrchr(host, ':');
    if (!colon) return 0;
    const size_t n = (size_t)(colon - host);
    if ((n == 9 && strncmp(host, "localhost", 9) == 0) ||
        (n == 5 && strncmp(host, "[::1]", 5) == 0))
        return 1;
    /* 127.a.b.c: four decimal parts of at most three digits, each <= 255. */
    if (n < 9 || strncmp(host, "127.", 4) != 0) return 0;
    int parts = 1, digits = 0, value = 0;
    for (const char *p = host + 4; p < colon; p++) {
        if (*p == '.') {
            if (!digits) return 0;
            parts++, digits = 0, value = 0;
        } else if (*p >= '0' && *p <= '9' && digits < 3) {
            value = value * 10 + (*p - '0');
            digits++;
            if (value > 255) return 0;
        } else {
            return 0;
        }
    }
    return parts == 3 && digits > 0; /* three parts after "127." */
}

/* CURVE needs both settings; without it only loopback is served. */
static int s_check_auth(const server_config *c, char *err, size_t len)
{
    const int secret = *c->curve_secret != 0, keys = *c->authorized_keys != 0;
    if (secret != keys)
        return s_err(err, len, "--%s needs --%s too (CURVE encrypts, the allow-list admits)",
                     secret ? "curve-secret" : "authorized-keys",
                     secret ? "authorized-keys" : "curve-secret");
    if (!secret && !server_config_bind_is_loopback(c->bind))
        return s_err(err, len,
                     "--bind %s is not loopback: to serve other hosts give --curve-secret FILE "
                     "and --authorized-keys DIR (see 'fasa keygen'), or bind tcp://127.0.0.1",
                     c->bind);
    char ep[300];
    snprintf(ep, sizeof(ep), "tcp://%s", c->metrics_bind);
    if (!secret && *c->metrics_bind && !server_config_bind_is_loopback(ep))
        return s_err(err, len,
                     "--metrics-bind %s is not loopback: metrics beyond this host need CURVE on "
                     "(--curve-secret, --authorized-keys), or bind 127.0.0.1:PORT",
                     c->metrics_bind);
    return 0;
}

int server_config_load(server_config *c, int argc, char **argv, FILE *out, char *err,
                       size_t err_len)
{
    memset(c, 0, sizeof(*c));
    for (size_t i = 0; i < N_KEYS; i++)
        if (s_keys[i].kind != K_FLAG &&
            s_set(c, &s_keys[i], s_keys[i].def, "default", err, err_len))
            return 2;

    /* The command line is read twice: first for --help, --version and --config, at the
     * end for everything else, so that it wins. */
    const char *config = getenv("FASA_CONFIG");
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            s_usage(out);
            return 1;
        }
        if (strcmp(a, "--version") == 0) {
            fputs("fasa-server 0.1.0\n", out);
            return 1;
        }
        if (strcmp(a, "--config") == 0) {
            if (i + 1 >= argc) return s_err(err, err_len, "--config needs a FILE");
            config = argv[++i];
        } else if (strncmp(a, "--config=", 9) == 0) {
            config = a + 9;
        }
    }
    int rc;
    if (config && *config) {
        if ((rc = s_copy(c->config, sizeof(c->config), config, "--config", err, err_len)) ||
            (rc = s_read_file(c, config, err, err_len)))
            return rc;
    }
    for (size_t i = 0; i < N_KEYS; i++) {
        const char *v = getenv(s_keys[i].env);
        if (v && (rc = s_set(c, &s_keys[i], v, s_keys[i].env, err, err_len))) return rc;
    }
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strncmp(a, "--", 2) != 0)
            return s_err(err, err_len, "unexpected argument '%s' (see --help)", a);
        char name[64];
        const char *eq = strchr(a + 2, '='), *value;
        const size_t n = eq ? (size_t)(eq - a - 2) : strlen(a + 2);
        if (n >= sizeof(name)) return s_err(err, err_len, "unknown option '%s'", a);
        memcpy(name, a + 2, n);
        name[n] = 0;
        if (strcmp(name, "config") == 0) {
            if (!eq) i++;
            continue;
        }
        const key *k = s_find(name);
        if (!k) return s_err(err, err_len, "unknown option '%s' (see --help)", a);
        if (k->kind == K_FLAG) {
            value = eq ? eq + 1 : "1";
        } else if (eq) {
            value = eq + 1;
        } else {
            if (i + 1 >= argc) return s_err(err, err_len, "--%s needs a %s", k->name, k->arg);
            value = argv[++i];
        }
        char where[80];
        snprintf(where, sizeof(where), "--%s", k->name);
        if ((rc = s_set(c, k, value, where, err, err_len))) return rc;
    }
    if (c->tier && !*c->tier_dir) return s_err(err, err_len, "--tier disk needs --tier-dir DIR");
    if (c->max_pending == 0)
        c->max_pending = 2 * c->max_message > (1LL << 30) ? 2 * c->max_message : 1LL << 30;
    if (c->max_pending / 2 < c->max_message)
        return s_err(err, err_len,
                     "--max-pending %lld is below 2 x --max-message %lld: a request of the "
                     "largest size could never arrive (connections are closed at half of it)",
                     c->max_pending, c->max_message);
    if ((c->restore || c->snapshot_interval) && !*c->state_dir)
        return s_err(err, err_len, "%s needs --state-dir DIR",
                     c->restore ? "--restore" : "--snapshot-interval");
    /* The environment, read once (FASA_SIMD sets the kernels' path): a SIMD path name
     * they do not know is an error now. */
    char why[200];
    if (fasa_env_init(why, sizeof(why))) return s_err(err, err_len, "%s", why);
    return s_check_auth(c, err, err_len);
}

void server_config_describe(const server_config *c, char *buf, size_t len)
{
    int n = snprintf(buf, len,
                     "bind=%s block=%ld max-message=%lld max-pending=%lld peer-timeout=%ld "
                     "memory-limit=%lld reserve=%lld max-sessions=%d "
                     "deadline=%ld log-level=%s%s%s%s%s%s%s%s%s%s%s",
                     c->bind, c->block, c->max_message, c->max_pending, c->peer_timeout,
                     c->memory_limit, c->reserve, c->max_sessions, c->deadline_ms,
                     fasa_log_level_name(c->log_level), *c->endpoint_file ? " endpoint-file=" : "",
                     c->endpoint_file, *c->pid_file ? " pid-file=" : "", c->pid_file,
                     *c->config ? " config=" : "", c->config,
                     *c->curve_secret ? " curve-secret=" : "", c->curve_secret,
                     *c->authorized_keys ? " authorized-keys=" : "", c->authorized_keys);
    if (*c->metrics_bind && n >= 0 && (size_t)n < len)
        n += snprintf(buf + n, len - (size_t)n, " metrics-bind=%s", c->metrics_bind);
    if (*c->state_dir && n >= 0 && (size_t)n < len)
        n += snprintf(buf + n, len - (size_t)n,
                      " state-dir=%s restore=%d snapshot-interval=%ld stop-grace=%ld wal=%s",
                      c->state_dir, c->restore, c->snapshot_interval, c->stop_grace,
                      fasa_wal_mode_name((fasa_wal_mode)c->wal));
    if (*c->load_root && n >= 0 && (size_t)n < len)
        n += snprintf(buf + n, len - (size_t)n, " load-root=%s", c->load_root);
    if ((c->tier || *c->tier_dir) && n >= 0 && (size_t)n < len)
        snprintf(buf + n, len - (size_t)n, " tier=%s tier-dir=%s", c->tier ? "disk" : "ram",
                 c->tier_dir);
}

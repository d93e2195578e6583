/* See zap.h. The allow-list is small (a few clients per deployment), so a lookup is a
 * linear scan; a request is handled when a client connects, not per message. */
#include "zap.h"

#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <zmq.h>

#include "keyfile.h"
#include "log.h"

#define ZAP_ENDPOINT "inproc://zeromq.zap.01"
#define ZAP_FRAMES 16     /* a request has 7 frames for CURVE; more are drained */
#define ZAP_FRAME_MAX 256 /* bytes kept of each frame */
#define ZAP_REPEAT_S 60   /* a refused key logged again at info level after this long */

typedef struct zap_key {
    uint8_t key[32];
    char name[256];
} zap_key;

struct fasa_zap {
    void *sock;
    void *watch; /* PAIR receiving the CURVE socket's failed-handshake events */
    char dir[512];
    zap_key *keys;
    size_t n_keys;
    uint8_t last_refused[32]; /* the last refused key, and when it was logged */
    time_t last_refused_at;
    time_t last_failed_at;  /* when a failed handshake was last logged at info level */
    unsigned long n_failed; /* failed handshakes seen */
};

static int s_is_pub(const char *name)
{
    const size_t n = strlen(name);
    return n > 4 && name[0] != '.' && strcmp(name + n - 4, ".pub") == 0;
}

static int s_cmp_name(const void *a, const void *b)
{
    return strcmp(((const zap_key *)a)->name, ((const zap_key *)b)->name);
}

fasa_zap *fasa_zap_load(const char *dir, char *err, size_t err_len)
{
    fasa_zap *z = calloc(1, sizeof(*z));
    if (!z) {
        snprintf(err, err_len, "out of memory");
        return NULL;
    }
    snprintf(z->dir, sizeof(z->dir), "%s", dir);
    DIR *d = opendir(dir);
    if (!d) {
        snprintf(err, err_len, "authorized-keys %s: %s", dir, strerror(errno));
        free(z);
        return NULL;
    }
    size_t cap = 0;
    int rc = 0;
    for (struct dirent *e; !rc && (e = readdir(d));) {
        if (!s_is_pub(e->d_name)) continue;
        char path[1024], z85[FASA_KEY_Z85_LEN + 1];
        if ((size_t)snprintf(path, sizeof(path), "%s/%s", dir, e->d_name) >= sizeof(path)) {
            snprintf(err, err_len, "authorized-keys %s: the path of %s is too long", dir,
                     e->d_name);
            rc = -1;
            break;
        }
        if (fasa_keyfile_read(path, 0, z85, err, err_len)) {
            rc = -1;
            break;
        }
        if (z->n_keys == cap) {
            cap = cap ? 2 * cap : 8;
            zap_key *k = realloc(z->keys, cap * sizeof(*k));
            if (!k) {
                snprintf(err, err_len, "out of memory");
                rc = -1;
                break;
            }
            z->keys = k;
        }
        zap_key *k = &z->keys[z->n_keys++];
        zmq_z85_decode(k->key, z85);
        snprintf(k->name, sizeof(k->name), "%.*s", (int)(strlen(e->d_name) - 4), e->d_name);
    }
    closedir(d);
    if (!rc && z->n_keys == 0) {
        snprintf(err, err_len,
                 "authorized-keys %s: no *.pub key files, so no client could connect (copy "
                 "each client's 'fasa keygen' NAME.pub there)",
                 dir);
        rc = -1;
    }
    if (rc) {
        free(z->keys);
        free(z);
        return NULL;
    }
    qsort(z->keys, z->n_keys, sizeof(*z->keys), s_cmp_name); /* a stable order for the log */
    return z;
}

int fasa_zap_bind(fasa_zap *z, void *ctx, char *err, size_t err_len)
{
    z->sock = zmq_socket(ctx, ZMQ_REP);
    const int linger = 0;
    if (!z->sock || zmq_setsockopt(z->sock, ZMQ_LINGER, &linger, sizeof(linger)) ||
        zmq_bind(z->sock, ZAP_ENDPOINT)) {
        snprintf(err, err_len, "cannot start the ZAP handler on %s: %s", ZAP_ENDPOINT,
                 zmq_strerror(errno));
        if (z->sock) zmq_close(z->sock);
        z->sock = NULL;
        return -1;
    }
    return 0;
}

int fasa_zap_watch(fasa_zap *z, void *ctx, void *sock, char *err, size_t err_len)
{
    static const char addr[] = "inproc://fasa-zap-watch";
    const int linger = 0;
    if (zmq_socket_monitor(sock, addr,
                           ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL |
                               ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL) ||
        !(z->watch = zmq_socket(ctx, ZMQ_PAIR)) ||
        zmq_setsockopt(z->watch, ZMQ_LINGER, &linger, sizeof(linger)) ||
        zmq_connect(z->watch, addr)) {
        snprintf(err, err_len, "cannot watch the CURVE handshakes: %s", zmq_strerror(errno));
        if (z->watch) zmq_close(z->watch);
        z->watch = NULL;
        return -1;
    }
    return 0;
}

void *fasa_zap_socket(const fasa_zap *z)
{
    return z ? z->sock : NULL;
}

void *fasa_zap_watch_socket(const fasa_zap *z)
{
    return z ? z->watch : NULL;
}

void fasa_zap_note_failed(fasa_zap *z, uint16_t ev, uint32_t val)
{
    z->n_failed++;
    const time_t now = time(NULL);
    const int quiet = z->last_failed_at && now - z->last_failed_at < ZAP_REPEAT_S;
    if (!quiet) z->last_failed_at = now;
    const char *why = ev == ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL &&
                              val == ZMQ_PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH
                          ? "it does not use CURVE"
                      : ev == ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL
                          ? "a CURVE protocol error (a wrong server key?)"
                          : "it closed the connection or sent what CURVE could not decrypt "
                            "(no keys, or a wrong server key)";
    fasa_log(quiet ? FASA_LOG_DEBUG : FASA_LOG_INFO, 0,
             "refused a client in the security handshake: %s (event 0x%x value 0x%x; %lu "
             "such so far)",
             why, (unsigned)ev, (unsigned)val, z->n_failed);
}

int fasa_monitor_next(void *mon, uint16_t *ev_p, uint32_t *val_p)
{
    zmq_msg_t m;
    zmq_msg_init(&m);
    if (zmq_msg_recv(&m, mon, ZMQ_DONTWAIT) < 0) {
        zmq_msg_close(&m);
        return -1;
    }
    uint16_t ev = 0;
    uint32_t val = 0;
    if (zmq_msg_size(&m) >= 6) {
        memcpy(&ev, zmq_msg_data(&m), 2);
        memcpy(&val, (const uint8_t *)zmq_msg_data(&m) + 2, 4);
    }
    while (zmq_msg_more(&m)) { /* the endpoint frame */
        zmq_msg_close(&m);
        zmq_msg_init(&m);
        if (zmq_msg_recv(&m, mon, ZMQ_DONTWAIT) < 0) break;
    }
    zmq_msg_close(&m);
    *ev_p = ev;
    *val_p = val;
    return 0;
}

/* Logs the failed handshakes the watch has queued: the client never reached ZAP. */
static void s_log_failed(fasa_zap *z)
{
    uint16_t ev;
    uint32_t val;
    while (z->watch && !fasa_monitor_next(z->watch, &ev, &val)) fasa_zap_note_failed(z, ev, val);
}

size_t fasa_zap_n_keys(const fasa_zap *z)
{
    return z ? z->n_keys : 0;
}

const char *fasa_zap_lookup(const fasa_zap *z, const uint8_t key[32])
{
    for (size_t i = 0; i < z->n_keys; i++)
        if (memcmp(z->keys[i].key, key, 32) == 0) return z->keys[i].name;
    return NULL;
}

typedef struct zap_frame {
    size_t len; /* the frame's full length (data keeps at most ZAP_FRAME_MAX bytes) */
    char data[ZAP_FRAME_MAX];
} zap_frame;

/* Reads one request (every frame); returns the frame count, 0 when none was waiting. */
static int s_recv_request(void *sock, zap_frame *f)
{
    int n = 0, more = 1;
    while (more) {
        zmq_msg_t m;
        zmq_msg_init(&m);
        if (zmq_msg_recv(&m, sock, n ? 0 : ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&m);
            return n;
        }
        more = zmq_msg_more(&m);
        if (n < ZAP_FRAMES) {
            const size_t len = zmq_msg_size(&m);
            f[n].len = len;
            memcpy(f[n].data, zmq_msg_data(&m), len < ZAP_FRAME_MAX ? len : ZAP_FRAME_MAX);
        }
        zmq_msg_close(&m);
        n++;
    }
    return n;
}

static void s_send_reply(void *sock, const zap_frame *request_id, const char *code,
                         const char *text, const char *user)
{
    const size_t id_len = request_id->len < ZAP_FRAME_MAX ? request_id->len : ZAP_FRAME_MAX;
    zmq_send(sock, "1.0", 3, ZMQ_SNDMORE);
    zmq_send(sock, request_id->data, id_len, ZMQ_SNDMORE);
    zmq_send(sock, code, strlen(code), ZMQ_SNDMORE);
    zmq_send(sock, text, strlen(text), ZMQ_SNDMORE);
    zmq_send(sock, user, strlen(user), ZMQ_SNDMORE);
    zmq_send(sock, "", 0, 0);
}

static void s_log_refusal(fasa_zap *z, const char *addr, const uint8_t *key, const char *why)
{
    char z85[FASA_KEY_Z85_LEN + 1] = "-";
    if (key) zmq_z85_encode(z85, key, 32);
    const time_t now = time(NULL);
    const int repeat =
        key && memcmp(key, z->last_refused, 32) == 0 && now - z->last_refused_at < ZAP_REPEAT_S;
    if (key && !repeat) {
        memcpy(z->last_refused, key, 32);
        z->last_refused_at = now;
    }
    fasa_log(repeat ? FASA_LOG_DEBUG : FASA_LOG_INFO, 0,
             "refused a client from %s: %s (public key %s)", *addr ? addr : "?", why, z85);
}

void fasa_zap_serve(fasa_zap *z)
{
    s_log_failed(z);
    for (;;) {
        zap_frame f[ZAP_FRAMES];
        const int n = s_recv_request(z->sock, f);
        if (n == 0) return;
        /* version, request id, domain, address, routing id, mechanism, credentials... */
        char addr[64] = "";
        if (n > 3) snprintf(addr, sizeof(addr), "%.*s", (int)f[3].len, f[3].data);
        const int curve =
            n == 7 && f[5].len == 5 && memcmp(f[5].data, "CURVE", 5) == 0 && f[6].len == 32;
        if (n < 2 || f[0].len != 3 || memcmp(f[0].data, "1.0", 3) != 0) {
            /* Not a ZAP 1.0 request: nothing sensible to answer, but REP must reply. */
            fasa_log(FASA_LOG_WARN, 0, "zap: malformed request of %d frames refused", n);
            const zap_frame none = {0, ""};
            s_send_reply(z->sock, n >= 2 ? &f[1] : &none, "500", "malformed request", "");
            continue;
        }
        const uint8_t *key = curve ? (const uint8_t *)f[6].data : NULL;
        const char *name = key ? fasa_zap_lookup(z, key) : NULL;
        if (name) {
            fasa_log(FASA_LOG_DEBUG, 0, "admitted client %s from %s", name, addr);
            s_send_reply(z->sock, &f[1], "200", "OK", name);
        } else {
            char why[700];
            if (key)
                snprintf(why, sizeof(why), "its key is not in --authorized-keys %s", z->dir);
            else
                snprintf(why, sizeof(why), "not a CURVE client");
            s_log_refusal(z, addr, key, why);
            s_send_reply(z->sock, &f[1], "400", "client key not authorised", "");
        }
    }
}

void fasa_zap_destroy(fasa_zap **z_p)
{
    if (!z_p || !*z_p) return;
    fasa_zap *z = *z_p;
    if (z->watch) zmq_close(z->watch);
    if (z->sock) zmq_close(z->sock);
    free(z->keys);
    free(z);
    *z_p = NULL;
}

int fasa_zap_curve_server(void *sock, const char *secret_z85, char *err, size_t err_len)
{
    const int one = 1;
    if (zmq_setsockopt(sock, ZMQ_CURVE_SERVER, &one, sizeof(one)) ||
        zmq_setsockopt(sock, ZMQ_CURVE_SECRETKEY, secret_z85, FASA_KEY_Z85_LEN + 1) ||
        zmq_setsockopt(sock, ZMQ_ZAP_DOMAIN, FASA_ZAP_DOMAIN, strlen(FASA_ZAP_DOMAIN))) {
        snprintf(err, err_len, "cannot enable CURVE: %s", zmq_strerror(errno));
        return -1;
    }
    return 0;
}

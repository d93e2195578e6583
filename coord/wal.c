/* See wal.h. */
#include "wal.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "log.h"
#include "shard_snap.h"
#include "snapshot.h"

#define WAL_MAGIC "FASAWAL1"
#define REC_MAGIC 0x4c415746u
#define ID_MAX 4096

typedef struct rec_hdr {
    uint32_t magic;
    int32_t layer;
    int64_t pos0;
    int32_t n, row;
    uint64_t payload;
} rec_hdr;

int fasa_wal_mode_parse(const char *s, fasa_wal_mode *out)
{
    static const char *const names[] = {"off", "write", "fsync"};
    for (int i = 0; i < 3; i++)
        if (strcmp(s, names[i]) == 0) {
            *out = (fasa_wal_mode)i;
            return 0;
        }
    return -1;
}

const char *fasa_wal_mode_name(fasa_wal_mode m)
{
    return m == FASA_WAL_OFF ? "off" : m == FASA_WAL_FSYNC ? "fsync" : "write";
}

/* The records' checksum: FNV-1a over 64-bit words (then the last bytes one by one), eight
 * times faster than byte-wise FNV-1a, which would cost an append more than its write. */
static uint64_t s_sum(uint64_t h, const void *data, size_t n)
{
    const unsigned char *p = data;
    for (; n >= 8; p += 8, n -= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        h = (h ^ w) * 0x100000001b3ull;
    }
    for (; n; p++, n--) h = (h ^ *p) * 0x100000001b3ull;
    return h;
}

static int s_path(const char *dir, const char *id, char *path, size_t len)
{
    char stem[64];
    fasa_snapshot_stem(id, stem, sizeof(stem));
    return snprintf(path, len, "%s/%s.wal", dir, stem) >= (int)len ? -1 : 0;
}

static int s_write_all(int fd, const void *buf, size_t len)
{
    const char *p = buf;
    while (len) {
        const ssize_t w = write(fd, p, len);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return -1;
        p += w;
        len -= (size_t)w;
    }
    return 0;
}

static size_t s_header_len(const char *id)
{
    return 8 + 4 + strlen(id);
}

int fasa_wal_append(const char *dir, fasa_wal_mode mode, const char *id, int layer, int n_layers,
                    int32_t pos0, int n, int row, const float *k, const float *v)
{
    if (mode == FASA_WAL_OFF) return 0;
    char path[4400];
    if (s_path(dir, id, path, sizeof(path))) return errno = ENAMETOOLONG, -1;
    const int fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (fd < 0) return -1;
    struct stat st;
    if (fstat(fd, &st)) {
        const int e = errno;
        close(fd);
        return errno = e, -1;
    }
    const off_t was = st.st_size;
    int bad = 0;
    if (was == 0) { /* a new log: its header first */
        const uint32_t idl = (uint32_t)strlen(id);
        bad = s_write_all(fd, WAL_MAGIC, 8) || s_write_all(fd, &idl, 4) || s_write_all(fd, id, idl);
    }
    const size_t half = (size_t)(layer < 0 ? n_layers : 1) * (size_t)n * (size_t)row * 4;
    const rec_hdr h = {REC_MAGIC, layer, pos0, n, row, 2 * (uint64_t)half};
    uint64_t sum = s_sum(SHARD_SNAP_FNV0, &h, sizeof(h));
    sum = s_sum(sum, k, half);
    sum = s_sum(sum, v, half);
    bad = bad || s_write_all(fd, &h, sizeof(h)) || s_write_all(fd, k, half) ||
          s_write_all(fd, v, half) || s_write_all(fd, &sum, sizeof(sum)) ||
          (mode == FASA_WAL_FSYNC && fdatasync(fd));
    const int e = errno;
    if (bad && ftruncate(fd, was)) { /* a torn record would hide the ones after it */
    }
    close(fd);
    return bad ? (errno = e, -1) : 0;
}

void fasa_wal_truncate(const char *dir, const char *id)
{
    char path[4400];
    struct stat st;
    if (s_path(dir, id, path, sizeof(path)) || stat(path, &st)) return;
    if (truncate(path, (off_t)s_header_len(id)))
        fasa_log(FASA_LOG_WARN, 0, "wal: cannot truncate %s: %s", path, strerror(errno));
}

void fasa_wal_remove(const char *dir, const char *id)
{
    char path[4400];
    if (!s_path(dir, id, path, sizeof(path))) unlink(path);
}

/* Appends rows [skip, n) of layer l of a record whose k, v are (layers, n, row). */
static fasa_status s_apply(fasa_engine_t *e, const char *id, int l, int li, const rec_hdr *h,
                           int skip, const float *k, const float *v, fasa_error *err)
{
    const size_t off = ((size_t)li * (size_t)h->n + (size_t)skip) * (size_t)h->row;
    return fasa_engine_append(e, id, l, (int32_t)(h->pos0 + skip), h->n - skip, k + off, v + off,
                              err);
}

/* Replays one log; returns the records replayed or -1 (logged). */
static int s_replay(fasa_engine_t *e, const char *path, long long *rows_p)
{
    FILE *f = fopen(path, "rb");
    if (!f) return -1;
    char magic[8];
    uint32_t idl = 0;
    char id[ID_MAX + 1];
    if (fread(magic, 1, 8, f) != 8 || memcmp(magic, WAL_MAGIC, 8) || fread(&idl, 4, 1, f) != 1 ||
        idl == 0 || idl > ID_MAX || fread(id, 1, idl, f) != idl) {
        fasa_log(FASA_LOG_ERROR, 0, "wal: %s: not a fasa write-ahead log; left alone", path);
        fclose(f);
        return -1;
    }
    id[idl] = 0;
    const fasa_session_config *c = fasa_engine_config(e, id);
    if (!c) {
        fasa_log(FASA_LOG_WARN, 0, "wal: %s: session %s was not restored; its log is left alone",
                 path, id);
        fclose(f);
        return -1;
    }
    const int row = c->n_kv_heads * c->head_dim, L = c->n_layers;
    long good_end = ftell(f);
    int n_rec = 0;
    float *buf = NULL;
    size_t cap = 0;
    const char *stop = NULL;
    for (;;) {
        rec_hdr h;
        const size_t got = fread(&h, 1, sizeof(h), f);
        if (got == 0 && feof(f)) break;
        const int nl = h.layer < 0 ? L : 1;
        if (got != sizeof(h) || h.magic != REC_MAGIC || h.layer < -1 || h.layer >= L || h.n <= 0 ||
            h.row != row || h.pos0 < 0 ||
            h.payload != 2ull * (uint64_t)nl * (uint64_t)h.n * (uint64_t)row * 4) {
            stop = "a torn or damaged record header";
            break;
        }
        if (h.payload > cap) {
            float *p = realloc(buf, h.payload);
            if (!p) {
                stop = "out of memory";
                break;
            }
            buf = p;
            cap = h.payload;
        }
        uint64_t sum = 0;
        if (fread(buf, 1, h.payload, f) != h.payload || fread(&sum, 8, 1, f) != 1 ||
            s_sum(s_sum(SHARD_SNAP_FNV0, &h, sizeof(h)), buf, h.payload) != sum) {
            stop = "a torn or damaged record (checksum)";
            break;
        }
        const float *k = buf, *v = buf + h.payload / 8;
        fasa_error fe = {0};
        fasa_status st = FASA_OK;
        for (int li = 0; li < nl && !st; li++) {
            const int l = h.layer < 0 ? li : h.layer;
            const int32_t have = fasa_engine_length(e, id, l);
            if (h.pos0 + h.n <= have) continue; /* the snapshot holds it */
            if (h.pos0 > have) {
                st = fasa_error_set(&fe, FASA_FAILED_PRECONDITION,
                                    "layer %d: the record starts at %lld, the session holds %d", l,
                                    (long long)h.pos0, (int)have);
                break;
            }
            const int skip = (int)(have - h.pos0);
            st = s_apply(e, id, l, li, &h, skip, k, v, &fe);
            if (!st && rows_p) *rows_p += h.n - skip;
        }
        if (st) {
            fasa_log(FASA_LOG_ERROR, 0, "wal: %s: record %d not replayed: %s", path, n_rec + 1,
                     fe.msg);
            stop = "a record that does not follow the session";
            break;
        }
        n_rec++;
        good_end = ftell(f);
    }
    free(buf);
    fclose(f);
    if (stop) {
        struct stat st;
        const long long size = stat(path, &st) == 0 ? (long long)st.st_size : -1;
        fasa_log(FASA_LOG_WARN, 0,
                 "wal: %s: stopped after %d records at %s; cut at byte %ld of %lld (a record "
                 "being written when the server died was never acknowledged)",
                 path, n_rec, stop, good_end, size);
        if (truncate(path, (off_t)good_end))
            fasa_log(FASA_LOG_WARN, 0, "wal: cannot cut %s: %s", path, strerror(errno));
    }
    fasa_log(FASA_LOG_INFO, 0, "wal: session %s: %d record%s replayed, %d tokens now", id, n_rec,
             n_rec == 1 ? "" : "s", (int)fasa_engine_length(e, id, 0));
    return n_rec;
}

int fasa_wal_replay_all(fasa_engine_t *e, const char *dir, long long *rows_p)
{
    if (rows_p) *rows_p = 0;
    DIR *d = opendir(dir);
    if (!d) return -1;
    int n = 0;
    struct dirent *de;
    while ((de = readdir(d))) {
        const size_t len = strlen(de->d_name);
        if (len < 5 || strcmp(de->d_name + len - 4, ".wal")) continue;
        char path[4400];
        snprintf(path, sizeof(path), "%.3000s/%s", dir, de->d_name);
        const int r = s_replay(e, path, rows_p);
        if (r > 0) n += r;
    }
    closedir(d);
    return n;
}

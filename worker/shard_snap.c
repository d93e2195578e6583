/* Shard snapshot files. See shard_snap.h for the format.
 *
 * A snapshot of a long session is gigabytes, so rows are streamed: read out of the shard a
 * batch at a time (shard_read_rows), hashed and written, and read back the same way. */
#include "shard_snap.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define SNAP_MAGIC "FASASHRD"
#define SNAP_FIXED 64   /* bytes of the fixed header */
#define SNAP_SUM_OFF 16 /* offset of the checksum */
#define SNAP_BATCH 256  /* rows per read-out batch */
#define SNAP_MAX_LAYERS 1024
#define SNAP_MAX_HEADS 1024
#define SNAP_MAX_HEAD_DIM 1024

_Static_assert(sizeof(shard_snap_info) == 32, "shard_snap_info travels as raw bytes");

uint64_t shard_snap_fnv(uint64_t h, const void *data, size_t n)
{
    const uint8_t *p = data;
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 0x100000001b3ull;
    }
    return h;
}

static int s_why(char *why, size_t len, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int s_why(char *why, size_t len, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, len, fmt, ap);
    va_end(ap);
    return -1;
}

static void s_put32(uint8_t *p, uint32_t v)
{
    memcpy(p, &v, 4);
}

static void s_put64(uint8_t *p, uint64_t v)
{
    memcpy(p, &v, 8);
}

static uint32_t s_get32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

static uint64_t s_get64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

/* Writing: bytes go to the file and into the running checksum. */
typedef struct writer {
    FILE *f;
    uint64_t sum;
    int64_t bytes;
} writer;

static int s_put(writer *w, const void *data, size_t n)
{
    w->sum = shard_snap_fnv(w->sum, data, n);
    w->bytes += (int64_t)n;
    return fwrite(data, 1, n, w->f) == n ? 0 : -1;
}

/* The header up to the layer bodies (the checksum field zero): caller frees. */
static uint8_t *s_header(const shard_t *sh, const char *id, int shard_index, int n_shards,
                         size_t *len_p, int64_t *file_bytes_p, int64_t *rows_p)
{
    const shard_layout *lay = shard_layout_of(sh);
    const size_t id_len = strlen(id), id_pad = (id_len + 7) / 8 * 8;
    const size_t len = SNAP_FIXED + id_pad + 8 * (size_t)lay->n_layers;
    uint8_t *h = calloc(1, len);
    if (!h) return NULL;
    const int64_t row_bytes = 4 + 2 * (int64_t)lay->n_kv_heads * lay->head_dim * 4;
    int64_t body = 0, rows = 0;
    for (int l = 0; l < lay->n_layers; l++) {
        const int64_t n = shard_rows(sh, l);
        s_put64(h + SNAP_FIXED + id_pad + 8 * (size_t)l, (uint64_t)n);
        body += n * row_bytes;
        rows += n;
    }
    memcpy(h, SNAP_MAGIC, 8);
    s_put32(h + 8, SHARD_SNAP_VERSION);
    s_put32(h + 12, (uint32_t)len);
    s_put64(h + 24, (uint64_t)((int64_t)len + body));
    const int32_t f[] = {0,
                         shard_index,
                         n_shards,
                         lay->n_layers,
                         lay->n_heads,
                         lay->n_kv_heads,
                         lay->head_dim,
                         (int32_t)id_len};
    for (int i = 0; i < 8; i++) s_put32(h + 32 + 4 * i, (uint32_t)f[i]);
    memcpy(h + SNAP_FIXED, id, id_len);
    *len_p = len;
    *file_bytes_p = (int64_t)len + body;
    *rows_p = rows;
    return h;
}

/* Streams one layer's pos, then k, then v sections. */
static int s_put_layer(writer *w, const shard_t *sh, int layer, float *buf, int32_t *pos)
{
    const shard_layout *lay = shard_layout_of(sh);
    const size_t row = (size_t)lay->n_kv_heads * lay->head_dim;
    const int n = shard_rows(sh, layer);
    for (int part = 0; part < 3; part++)
        for (int r = 0; r < n; r += SNAP_BATCH) {
            const int m = n - r < SNAP_BATCH ? n - r : SNAP_BATCH;
            if (part == 0) {
                shard_read_rows(sh, layer, r, m, pos, NULL, NULL);
                if (s_put(w, pos, (size_t)m * 4)) return -1;
            } else {
                shard_read_rows(sh, layer, r, m, NULL, part == 1 ? buf : NULL,
                                part == 2 ? buf : NULL);
                if (s_put(w, buf, (size_t)m * row * 4)) return -1;
            }
        }
    return 0;
}

/* fsync of the directory holding path, so the rename is durable. */
static int s_sync_dir(const char *path)
{
    char dir[4096];
    const char *slash = strrchr(path, '/');
    if (!slash) {
        strcpy(dir, ".");
    } else {
        const size_t n = slash == path ? 1 : (size_t)(slash - path);
        if (n >= sizeof(dir)) return -1;
        memcpy(dir, path, n);
        dir[n] = 0;
    }
    const int fd = open(dir, O_RDONLY);
    if (fd < 0) return -1;
    const int rc = fsync(fd);
    close(fd);
    return rc;
}

int shard_snap_write(const shard_t *sh, const char *path, const char *id, int shard_index,
                     int n_shards, int dtype, shard_snap_info *info, char *why, size_t why_len)
{
    *info = (shard_snap_info){0};
    /* The body holds f32 whatever the session stores (shard_read_rows converts, exactly:
     * every f16/bf16 value is an f32), so the header's dtype, that of the body, is f32; the
     * session's own storage dtype is in the manifest, and restore appends the values again
     * into a session of that dtype, which rounds them back to the same bits. */
    (void)dtype;
    dtype = 0;
    char tmp[4200];
    if (snprintf(tmp, sizeof(tmp), "%s.tmp", path) >= (int)sizeof(tmp)) {
        info->err_no = ENAMETOOLONG;
        return s_why(why, why_len, "%s: path too long", path);
    }
    const shard_layout *lay = shard_layout_of(sh);
    size_t hlen;
    int64_t file_bytes, rows;
    uint8_t *hdr = s_header(sh, id, shard_index, n_shards, &hlen, &file_bytes, &rows);
    float *buf = malloc((size_t)SNAP_BATCH * lay->n_kv_heads * lay->head_dim * 4);
    int32_t *pos = malloc(SNAP_BATCH * 4);
    writer w = {.sum = SHARD_SNAP_FNV0};
    int rc = -1;
    if (!hdr || !buf || !pos) {
        info->err_no = ENOMEM;
        s_why(why, why_len, "%s: out of memory", path);
        goto out_free;
    }
    if (!(w.f = fopen(tmp, "wb"))) goto out_errno;
    if (s_put(&w, hdr, hlen)) goto out_errno;
    for (int l = 0; l < lay->n_layers; l++)
        if (s_put_layer(&w, sh, l, buf, pos)) goto out_errno;
    uint8_t sum[8];
    s_put64(sum, w.sum);
    if (w.bytes != file_bytes || fseek(w.f, SNAP_SUM_OFF, SEEK_SET) ||
        fwrite(sum, 1, 8, w.f) != 8 || fflush(w.f) || fsync(fileno(w.f)))
        goto out_errno;
    const int closed = fclose(w.f);
    w.f = NULL;
    if (closed || rename(tmp, path) || s_sync_dir(path)) goto out_errno;
    *info = (shard_snap_info){.checksum = w.sum, .file_bytes = file_bytes, .rows = rows};
    rc = 0;
    goto out_free;
out_errno:
    info->err_no = errno ? errno : EIO;
    s_why(why, why_len, "cannot write %s: %s", tmp, strerror(info->err_no));
    if (w.f) fclose(w.f);
    unlink(tmp);
out_free:
    free(hdr);
    free(buf);
    free(pos);
    return rc;
}

/* Reading. */

static int s_check_sum(shard_snap_file *sf, const char *path, char *why, size_t why_len)
{
    uint8_t *buf = malloc(1 << 20);
    if (!buf) return s_why(why, why_len, "%s: out of memory", path);
    uint64_t h = SHARD_SNAP_FNV0;
    int64_t off = 0;
    rewind(sf->f);
    size_t got;
    while ((got = fread(buf, 1, 1 << 20, sf->f)) > 0) {
        /* The checksum field counts as zeros. */
        for (int64_t i = SNAP_SUM_OFF; i < SNAP_SUM_OFF + 8; i++)
            if (i >= off && i < off + (int64_t)got) buf[i - off] = 0;
        h = shard_snap_fnv(h, buf, got);
        off += (int64_t)got;
    }
    const int bad = ferror(sf->f);
    free(buf);
    if (bad) return s_why(why, why_len, "%s: read error", path);
    if (off != sf->file_bytes)
        return s_why(why, why_len, "%s: %lld bytes, the header says %lld (truncated?)", path,
                     (long long)off, (long long)sf->file_bytes);
    if (h != sf->checksum)
        return s_why(why, why_len, "%s: checksum mismatch (file %016llx, header %016llx): damaged",
                     path, (unsigned long long)h, (unsigned long long)sf->checksum);
    return 0;
}

static int s_parse_header(shard_snap_file *sf, const char *path, int64_t size, char *why,
                          size_t why_len)
{
    uint8_t h[SNAP_FIXED];
    if (size < SNAP_FIXED || fread(h, 1, SNAP_FIXED, sf->f) != SNAP_FIXED)
        return s_why(why, why_len, "%s: shorter than a header (%lld bytes)", path, (long long)size);
    if (memcmp(h, SNAP_MAGIC, 8))
        return s_why(why, why_len, "%s: not a fasa shard snapshot (bad magic)", path);
    if (s_get32(h + 8) != SHARD_SNAP_VERSION)
        return s_why(why, why_len, "%s: format version %u, this build reads %d", path,
                     s_get32(h + 8), SHARD_SNAP_VERSION);
    const uint32_t hlen = s_get32(h + 12);
    sf->checksum = s_get64(h + SNAP_SUM_OFF);
    sf->file_bytes = (int64_t)s_get64(h + 24);
    int32_t f[8];
    for (int i = 0; i < 8; i++) f[i] = (int32_t)s_get32(h + 32 + 4 * i);
    sf->dtype = f[0];
    sf->shard_index = f[1];
    sf->n_shards = f[2];
    sf->n_layers = f[3];
    sf->n_heads = f[4];
    sf->n_kv_heads = f[5];
    sf->head_dim = f[6];
    const int id_len = f[7];
    if (sf->file_bytes != size)
        return s_why(why, why_len, "%s: %lld bytes, the header says %lld (truncated?)", path,
                     (long long)size, (long long)sf->file_bytes);
    if (sf->dtype != 0)
        return s_why(why, why_len, "%s: dtype %d is not supported by this build (f32 only)", path,
                     sf->dtype);
    if (sf->n_layers < 1 || sf->n_layers > SNAP_MAX_LAYERS || sf->n_kv_heads < 1 ||
        sf->n_heads < sf->n_kv_heads || sf->n_heads > SNAP_MAX_HEADS ||
        sf->n_heads % sf->n_kv_heads || sf->head_dim < 2 || sf->head_dim > SNAP_MAX_HEAD_DIM ||
        sf->n_shards < 1 || sf->shard_index < 0 || sf->shard_index >= sf->n_shards || id_len < 1 ||
        id_len > SHARD_SNAP_MAX_ID)
        return s_why(why, why_len, "%s: header fields out of range", path);
    const size_t id_pad = ((size_t)id_len + 7) / 8 * 8;
    if (hlen != SNAP_FIXED + id_pad + 8 * (size_t)sf->n_layers || (int64_t)hlen > size)
        return s_why(why, why_len, "%s: header_bytes %u does not match the geometry", path, hlen);
    uint8_t idb[SHARD_SNAP_MAX_ID + 8];
    if (fread(idb, 1, id_pad, sf->f) != id_pad)
        return s_why(why, why_len, "%s: cannot read the session id", path);
    memcpy(sf->id, idb, (size_t)id_len);
    sf->id[id_len] = 0;
    sf->n_rows = calloc((size_t)sf->n_layers, sizeof(int64_t));
    sf->layer_off = calloc((size_t)sf->n_layers, sizeof(int64_t));
    if (!sf->n_rows || !sf->layer_off) return s_why(why, why_len, "%s: out of memory", path);
    const int64_t row_bytes = 4 + 2 * (int64_t)sf->n_kv_heads * sf->head_dim * 4;
    int64_t off = hlen;
    for (int l = 0; l < sf->n_layers; l++) {
        uint8_t b[8];
        if (fread(b, 1, 8, sf->f) != 8)
            return s_why(why, why_len, "%s: cannot read the row counts", path);
        const int64_t n = (int64_t)s_get64(b);
        if (n < 0 || n > INT32_MAX || n > (size - off) / row_bytes)
            return s_why(why, why_len, "%s: layer %d row count %lld does not fit the file", path, l,
                         (long long)n);
        sf->n_rows[l] = n;
        sf->layer_off[l] = off;
        off += n * row_bytes;
    }
    if (off != size)
        return s_why(why, why_len, "%s: %lld bytes, the row counts say %lld", path, (long long)size,
                     (long long)off);
    return 0;
}

int shard_snap_open(shard_snap_file *sf, const char *path, char *why, size_t why_len)
{
    memset(sf, 0, sizeof(*sf));
    if (!(sf->f = fopen(path, "rb")))
        return s_why(why, why_len, "cannot open %s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fileno(sf->f), &st)) {
        s_why(why, why_len, "cannot stat %s: %s", path, strerror(errno));
        shard_snap_close(sf);
        return -1;
    }
    if (s_parse_header(sf, path, (int64_t)st.st_size, why, why_len) ||
        s_check_sum(sf, path, why, why_len)) {
        shard_snap_close(sf);
        return -1;
    }
    return 0;
}

int shard_snap_read(shard_snap_file *sf, int layer, int64_t row0, int n, int32_t *pos, float *k,
                    float *v)
{
    const int64_t nr = sf->n_rows[layer];
    if (row0 < 0 || n < 0 || row0 + n > nr) return -1;
    const size_t row = (size_t)sf->n_kv_heads * sf->head_dim * 4;
    const int64_t base = sf->layer_off[layer];
    if (pos &&
        (fseeko(sf->f, base + row0 * 4, SEEK_SET) || fread(pos, 4, (size_t)n, sf->f) != (size_t)n))
        return -1;
    if (k && (fseeko(sf->f, base + nr * 4 + row0 * (int64_t)row, SEEK_SET) ||
              fread(k, row, (size_t)n, sf->f) != (size_t)n))
        return -1;
    if (v && (fseeko(sf->f, base + nr * 4 + nr * (int64_t)row + row0 * (int64_t)row, SEEK_SET) ||
              fread(v, row, (size_t)n, sf->f) != (size_t)n))
        return -1;
    return 0;
}

void shard_snap_close(shard_snap_file *sf)
{
    if (!sf) return;
    if (sf->f) fclose(sf->f);
    free(sf->n_rows);
    free(sf->layer_off);
    memset(sf, 0, sizeof(*sf));
}

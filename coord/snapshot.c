/* Snapshots and restore. See snapshot.h for the files and the protocol.
 *
 * The coordinator never holds a whole session in memory: shards stream their own files,
 * and a restore reads the files back a run of rows at a time (at most RESTORE_RUN rows of
 * one layer from one file) and appends each run through the engine. */
#include "snapshot.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "dtype.h"
#include "scan.h"
#include "log.h"
#include "shard_snap.h"
#include "wal.h"

#define MANIFEST_MAX_BYTES ((size_t)64 << 20)
#define MAX_SHARDS 4096
#define RESTORE_RUN 1024
#define PROGRESS_ROWS (1 << 20) /* a restore logs its progress every this many rows */

void fasa_snapshot_stem(const char *id, char *stem, size_t len)
{
    char safe[41];
    size_t n = 0;
    for (; id[n] && n < 40; n++) {
        const char c = id[n];
        const int ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                       c == '_' || c == '-';
        safe[n] = ok ? c : '_';
    }
    safe[n] = 0;
    snprintf(stem, len, "%s-%016llx", safe,
             (unsigned long long)shard_snap_fnv(SHARD_SNAP_FNV0, id, strlen(id)));
}

/* A parsed manifest. */
typedef struct manifest {
    char id[FASA_ID_MAX + 1];
    fasa_session_config cfg; /* profile and dense_layers point at the fields below */
    fasa_profile *profile;
    uint8_t *dense;   /* (n_layers) */
    int32_t *lengths; /* (n_layers) */
    int block, n_shards;
    unsigned long long generation;
    char (*files)[256];       /* (n_shards) file names, relative to the manifest's directory */
    int64_t *bytes;           /* (n_shards) */
    unsigned long long *sums; /* (n_shards) */
} manifest;

static void s_manifest_cleanup(manifest *m)
{
    fasa_profile_destroy(&m->profile);
    free(m->dense);
    free(m->lengths);
    free(m->files);
    free(m->bytes);
    free(m->sums);
    memset(m, 0, sizeof(*m));
}

/* Reads a whole small file; caller frees. NULL with errno set on failure. */
static char *s_slurp(const char *path, size_t max, size_t *len_p)
{
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    char *buf = malloc(max + 1);
    size_t n = buf ? fread(buf, 1, max + 1, f) : 0;
    const int bad = !buf || ferror(f) || n > max;
    fclose(f);
    if (bad) {
        free(buf);
        errno = buf ? EFBIG : ENOMEM;
        return NULL;
    }
    buf[n] = 0;
    *len_p = n;
    return buf;
}

/* The next line of a manifest (NUL-terminated in place), or NULL at the end. */
static char *s_next_line(char **cur, char *end)
{
    if (*cur >= end) return NULL;
    char *line = *cur, *nl = memchr(line, '\n', (size_t)(end - line));
    if (!nl) return NULL;
    *nl = 0;
    *cur = nl + 1;
    return line;
}

/* "key value..." with the given key: the value part, or NULL. */
static char *s_expect(char **cur, char *end, const char *key)
{
    char *line = s_next_line(cur, end);
    const size_t k = strlen(key);
    if (!line || strncmp(line, key, k) || line[k] != ' ') return NULL;
    return line + k + 1;
}

static int s_int(const char *s, long lo, long hi, long *out)
{
    char *e;
    errno = 0;
    const long v = strtol(s, &e, 10);
    if (e == s || *e || errno || v < lo || v > hi) return -1;
    *out = v;
    return 0;
}

/* n integers in [lo, hi] separated by single spaces. */
static int s_ints(char *s, int n, long lo, long hi, int32_t *out)
{
    for (int i = 0; i < n; i++) {
        char *e;
        errno = 0;
        const long v = strtol(s, &e, 10);
        if (e == s || errno || v < lo || v > hi) return -1;
        out[i] = (int32_t)v;
        s = e;
        if (i + 1 < n && *s++ != ' ') return -1;
    }
    return *s ? -1 : 0;
}

/* Parses and checks a manifest; on failure why names the line at fault. */
static int s_manifest_parse(manifest *m, char *buf, size_t len, char *why, size_t why_len)
{
    memset(m, 0, sizeof(*m));
    /* The checksum line covers everything before it. */
    if (len < 2 || buf[len - 1] != '\n') return snprintf(why, why_len, "truncated"), -1;
    char *last = buf + len - 1;
    while (last > buf && last[-1] != '\n') last--;
    unsigned long long sum;
    char tail[40];
    if (sscanf(last, "checksum %16llx%39s", &sum, tail) != 1 || strlen(last) != 9 + 16 + 1)
        return snprintf(why, why_len, "no checksum line at the end (truncated?)"), -1;
    if (shard_snap_fnv(SHARD_SNAP_FNV0, buf, (size_t)(last - buf)) != sum)
        return snprintf(why, why_len, "checksum mismatch: damaged"), -1;
    char *cur = buf, *end = last, *v;
    long x;
    fasa_session_config *c = &m->cfg;
#define EXPECT(key)                                                                                \
    if (!(v = s_expect(&cur, end, key))) {                                                         \
        snprintf(why, why_len, "expected the '%s' line", key);                                     \
        goto bad;                                                                                  \
    }
#define INT_FIELD(key, lo, hi, dst)                                                                \
    EXPECT(key);                                                                                   \
    if (s_int(v, lo, hi, &x)) {                                                                    \
        snprintf(why, why_len, "%s '%s' out of range", key, v);                                    \
        goto bad;                                                                                  \
    }                                                                                              \
    dst = (int)x;
    v = s_next_line(&cur, end);
    if (!v || strcmp(v, "fasa-snapshot 1")) {
        snprintf(why, why_len, "not a version %d fasa snapshot manifest", FASA_SNAPSHOT_VERSION);
        goto bad;
    }
    EXPECT("session");
    if (!*v || strlen(v) > FASA_ID_MAX) {
        snprintf(why, why_len, "bad session id");
        goto bad;
    }
    strcpy(m->id, v);
    INT_FIELD("n_layers", 1, 1024, c->n_layers);
    INT_FIELD("n_heads", 1, 1024, c->n_heads);
    INT_FIELD("n_kv_heads", 1, 1024, c->n_kv_heads);
    INT_FIELD("head_dim", 2, 1024, c->head_dim);
    EXPECT("pairing");
    if (fc_pairing_parse(v, &c->pairing)) {
        snprintf(why, why_len, "pairing '%s' unknown", v);
        goto bad;
    }
    EXPECT("dtype");
    fasa_dtype dt;
    if (fasa_dtype_parse(v, &dt)) {
        snprintf(why, why_len, "dtype '%s' unknown", v);
        goto bad;
    }
    c->dtype = dt;
    /* Optional (manifests before score dtypes lack it: auto). The scoring store is derived
     * from the keys, so a restore rebuilds it on append. */
    c->score_dtype = 0;
    if (end - cur > 12 && !strncmp(cur, "score_dtype ", 12)) {
        EXPECT("score_dtype");
        if (scan_dtype_parse(v, &c->score_dtype)) {
            snprintf(why, why_len, "score_dtype '%s' unknown", v);
            goto bad;
        }
    }
    EXPECT("method");
    if (fasa_method_parse(v, &c->method)) {
        snprintf(why, why_len, "method '%s' unknown", v);
        goto bad;
    }
    INT_FIELD("budget", 1, 1 << 20, c->budget);
    EXPECT("gqa");
    if (fasa_gqa_parse(v, &c->gqa)) {
        snprintf(why, why_len, "gqa '%s' unknown", v);
        goto bad;
    }
    const int L = c->n_layers;
    int32_t *tmp = calloc((size_t)L, sizeof(int32_t));
    m->dense = calloc((size_t)L, 1);
    m->lengths = calloc((size_t)L, sizeof(int32_t));
    if (!tmp || !m->dense || !m->lengths) {
        free(tmp);
        snprintf(why, why_len, "out of memory");
        goto bad;
    }
    EXPECT("dense_layers");
    const int bad_dense = s_ints(v, L, 0, 1, tmp);
    for (int l = 0; l < L; l++) m->dense[l] = (uint8_t)tmp[l];
    free(tmp);
    if (bad_dense) {
        snprintf(why, why_len, "dense_layers: expected %d values 0 or 1", L);
        goto bad;
    }
    if (end - cur > 5 && strncmp(cur, "tier ", 5) == 0) {
        EXPECT("tier"); /* a disk-tier session comes back in the restoring server's tier dir */
        if (strcmp(v, "disk")) {
            snprintf(why, why_len, "tier '%s' unknown", v);
            goto bad;
        }
        c->tier = SHARD_TIER_DISK;
    }
    EXPECT("lengths");
    if (s_ints(v, L, 0, INT32_MAX, m->lengths)) {
        snprintf(why, why_len, "lengths: expected %d token counts", L);
        goto bad;
    }
    INT_FIELD("block", 1, 1 << 24, m->block);
    EXPECT("generation");
    if (sscanf(v, "%llu", &m->generation) != 1) {
        snprintf(why, why_len, "bad generation");
        goto bad;
    }
    INT_FIELD("n_shards", 1, MAX_SHARDS, m->n_shards);
    m->files = calloc((size_t)m->n_shards, sizeof(*m->files));
    m->bytes = calloc((size_t)m->n_shards, sizeof(*m->bytes));
    m->sums = calloc((size_t)m->n_shards, sizeof(*m->sums));
    if (!m->files || !m->bytes || !m->sums) {
        snprintf(why, why_len, "out of memory");
        goto bad;
    }
    for (int i = 0; i < m->n_shards; i++) {
        EXPECT("shard");
        int idx, used = 0;
        long long bytes;
        if (sscanf(v, "%d %255s %lld %16llx%n", &idx, m->files[i], &bytes, &m->sums[i], &used) !=
                4 ||
            v[used] || idx != i || bytes < 0 || strchr(m->files[i], '/')) {
            snprintf(why, why_len, "shard line %d is malformed", i);
            goto bad;
        }
        m->bytes[i] = bytes;
    }
    EXPECT("profile");
    if (strcmp(v, "none") != 0) {
        if (s_int(v, 1, (long)(end - cur), &x)) {
            snprintf(why, why_len, "profile size '%s' out of range", v);
            goto bad;
        }
        FILE *pf = fmemopen(cur, (size_t)x, "r");
        char pwhy[200];
        if (!pf) {
            snprintf(why, why_len, "out of memory");
            goto bad;
        }
        m->profile = fasa_profile_read(pf, "the manifest's profile", (size_t)x, pwhy, sizeof(pwhy));
        fclose(pf);
        if (!m->profile) {
            snprintf(why, why_len, "%s", pwhy);
            goto bad;
        }
        cur += x;
    }
    if (cur != end) {
        snprintf(why, why_len, "unexpected text before the checksum line");
        goto bad;
    }
#undef EXPECT
#undef INT_FIELD
    c->profile = m->profile;
    c->dense_layers = m->dense;
    return 0;
bad:
    s_manifest_cleanup(m);
    return -1;
}

/* The manifest text of a session (caller frees), without its checksum line. */
static char *s_manifest_text(const fasa_engine_t *e, const char *id, unsigned long long gen,
                             const char (*files)[256], const shard_snap_info *info, int n_shards,
                             size_t *len_p)
{
    const fasa_session_config *c = fasa_engine_config(e, id);
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    if (!f) return NULL;
    fprintf(f,
            "fasa-snapshot %d\nsession %s\nn_layers %d\nn_heads %d\nn_kv_heads %d\nhead_dim "
            "%d\npairing %s\ndtype %s\nscore_dtype %s\nmethod %s\nbudget %d\ngqa "
            "%s\ndense_layers",
            FASA_SNAPSHOT_VERSION, id, c->n_layers, c->n_heads, c->n_kv_heads, c->head_dim,
            fc_pairing_name(c->pairing), fasa_dtype_name(c->dtype), scan_dtype_name(c->score_dtype),
            fasa_method_name(c->method), c->budget,
            c->gqa == FASA_GQA_SHARED ? "shared" : "per-head");
    for (int l = 0; l < c->n_layers; l++) fprintf(f, " %d", c->dense_layers[l]);
    if (c->tier == SHARD_TIER_DISK) fputs("\ntier disk", f); /* RAM: no line, as before */
    fputs("\nlengths", f);
    for (int l = 0; l < c->n_layers; l++) fprintf(f, " %d", (int)fasa_engine_length(e, id, l));
    fprintf(f, "\nblock %d\ngeneration %llu\nn_shards %d\n", fasa_engine_block(e), gen, n_shards);
    for (int i = 0; i < n_shards; i++)
        fprintf(f, "shard %d %s %lld %016llx\n", i, files[i], (long long)info[i].file_bytes,
                (unsigned long long)info[i].checksum);
    int bad = 0;
    if (c->profile) {
        char *pt = NULL;
        size_t pl = 0;
        FILE *pf = open_memstream(&pt, &pl);
        bad = !pf || fasa_profile_write(c->profile, pf);
        if (pf) bad |= fclose(pf) != 0;
        if (!bad) {
            fprintf(f, "profile %zu\n", pl);
            fwrite(pt, 1, pl, f);
        }
        free(pt);
    } else {
        fputs("profile none\n", f);
    }
    bad |= ferror(f);
    if (fclose(f) || bad) {
        free(buf);
        return NULL;
    }
    *len_p = len;
    return buf;
}

static int s_sync_dir(const char *dir)
{
    const int fd = open(dir, O_RDONLY);
    if (fd < 0) return -1;
    const int rc = fsync(fd);
    close(fd);
    return rc;
}

/* Writes text + its checksum line to path atomically (temp, fsync, rename, fsync dir). */
static int s_write_atomic(const char *dir, const char *path, const char *text, size_t len)
{
    char tmp[4400], line[40];
    snprintf(tmp, sizeof(tmp), "%s.tmp", path);
    const int n = snprintf(line, sizeof(line), "checksum %016llx\n",
                           (unsigned long long)shard_snap_fnv(SHARD_SNAP_FNV0, text, len));
    FILE *f = fopen(tmp, "wb");
    if (!f) return -1;
    int bad = fwrite(text, 1, len, f) != len || fwrite(line, 1, (size_t)n, f) != (size_t)n ||
              fflush(f) || fsync(fileno(f));
    bad |= fclose(f) != 0;
    if (bad || rename(tmp, path) || s_sync_dir(dir)) {
        const int keep = errno;
        unlink(tmp);
        errno = keep;
        return -1;
    }
    return 0;
}

fasa_status fasa_snapshot_session(fasa_engine_t *e, const char *dir, const char *id,
                                  fasa_snapshot_result *res, fasa_error *err)
{
    if (!id || !fasa_engine_config(e, id))
        return fasa_error_set(err, FASA_NOT_FOUND, "session '%s' not found", id ? id : "");
    if (strlen(dir) > 3000)
        return fasa_error_set(err, FASA_INVALID_ARGUMENT, "state dir path too long");
    char stem[64], prefix[4096], mpath[4200];
    fasa_snapshot_stem(id, stem, sizeof(stem));
    snprintf(mpath, sizeof(mpath), "%s/%s.manifest", dir, stem);
    /* The previous generation, whose files go once the new manifest is in place. */
    manifest old = {0};
    int have_old = 0;
    size_t olen;
    char *otext = s_slurp(mpath, MANIFEST_MAX_BYTES, &olen), owhy[200];
    if (otext) have_old = s_manifest_parse(&old, otext, olen, owhy, sizeof(owhy)) == 0;
    free(otext);
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    unsigned long long gen =
        (unsigned long long)now.tv_sec * 1000000000ull + (unsigned long long)now.tv_nsec;
    if (have_old && gen <= old.generation) gen = old.generation + 1;
    if (snprintf(prefix, sizeof(prefix), "%s/%s.g%llu", dir, stem, gen) >= (int)sizeof(prefix)) {
        s_manifest_cleanup(&old);
        return fasa_error_set(err, FASA_INVALID_ARGUMENT, "state dir path too long");
    }

    const int ns = fasa_engine_n_shards(e);
    shard_snap_info *info = calloc((size_t)ns, sizeof(*info));
    char(*files)[256] = calloc((size_t)ns, sizeof(*files));
    char *text = NULL;
    fasa_status st = FASA_OK;
    if (!info || !files) {
        st = fasa_error_set(err, FASA_RESOURCE_EXHAUSTED, "out of memory for a snapshot of '%s'",
                            id);
        goto out;
    }
    for (int i = 0; i < ns; i++)
        snprintf(files[i], sizeof(files[i]), "%s.g%llu.s%d.shard", stem, gen, i);
    if ((st = fasa_engine_write_shards(e, id, prefix, info, err))) goto out_unlink;
    size_t len;
    if (!(text = s_manifest_text(e, id, gen, (const char(*)[256])files, info, ns, &len))) {
        st = fasa_error_set(err, FASA_RESOURCE_EXHAUSTED,
                            "out of memory writing the manifest of '%s'", id);
        goto out_unlink;
    }
    if (s_write_atomic(dir, mpath, text, len)) {
        st = fasa_error_set(err, FASA_INTERNAL, "cannot write %s: %s", mpath, strerror(errno));
        goto out_unlink;
    }
    /* The new snapshot is in place: the old generation's files can go, and any other
     * file of this session's that no manifest lists (a snapshot killed half way). */
    for (int i = 0; have_old && i < old.n_shards; i++) {
        char p[4400];
        snprintf(p, sizeof(p), "%s/%s", dir, old.files[i]);
        unlink(p);
    }
    fasa_snapshot_clean(dir, stem, NULL);
    fasa_wal_truncate(dir, id); /* the snapshot holds every append logged so far */
    if (res) {
        res->length = fasa_engine_length(e, id, 0);
        res->bytes = 0;
        for (int i = 0; i < ns; i++) res->bytes += info[i].file_bytes;
        snprintf(res->manifest, sizeof(res->manifest), "%s.manifest", stem);
    }
    goto out;
out_unlink:
    for (int i = 0; i < ns; i++) {
        char p[4400];
        snprintf(p, sizeof(p), "%s/%s", dir, files[i]);
        unlink(p);
    }
out:
    free(text);
    free(info);
    free(files);
    s_manifest_cleanup(&old);
    return st;
}

/* Restore. */

typedef struct restore {
    const manifest *m;
    shard_snap_file *sf; /* (n_shards) */
    int n_open;
    int32_t *pos;     /* (n_shards) cursors' position tables of the current layer */
    int64_t *pos_off; /* (n_shards) offset of each shard's table in pos */
    int64_t *next;    /* (n_shards) next row of each shard */
    float *k, *v;     /* (RESTORE_RUN, n_kv_heads, head_dim) */
} restore;

static void s_restore_cleanup(restore *r)
{
    for (int i = 0; i < r->n_open; i++) shard_snap_close(&r->sf[i]);
    free(r->sf);
    free(r->pos);
    free(r->pos_off);
    free(r->next);
    free(r->k);
    free(r->v);
}

/* Opens and checks every shard file of the manifest. */
static fasa_status s_open_shards(restore *r, const char *dir, fasa_error *err)
{
    const manifest *m = r->m;
    const fasa_session_config *c = &m->cfg;
    for (int i = 0; i < m->n_shards; i++) {
        char path[4400], why[300];
        snprintf(path, sizeof(path), "%s/%s", dir, m->files[i]);
        shard_snap_file *f = &r->sf[i];
        if (shard_snap_open(f, path, why, sizeof(why)))
            return fasa_error_set(err, FASA_FAILED_PRECONDITION, "%s", why);
        r->n_open++;
        if (f->file_bytes != m->bytes[i] || f->checksum != m->sums[i])
            return fasa_error_set(
                err, FASA_FAILED_PRECONDITION,
                "%s: size or checksum differs from the manifest's (another generation?)", path);
        if (strcmp(f->id, m->id) || f->shard_index != i || f->n_shards != m->n_shards ||
            f->n_layers != c->n_layers || f->n_heads != c->n_heads ||
            f->n_kv_heads != c->n_kv_heads || f->head_dim != c->head_dim)
            return fasa_error_set(
                err, FASA_FAILED_PRECONDITION,
                "%s: header (session, shard, geometry) disagrees with the manifest", path);
    }
    for (int l = 0; l < c->n_layers; l++) {
        int64_t total = 0;
        for (int i = 0; i < m->n_shards; i++) total += r->sf[i].n_rows[l];
        if (total != m->lengths[l])
            return fasa_error_set(err, FASA_FAILED_PRECONDITION,
                                  "layer %d: the shard files hold %lld rows, the manifest says %d",
                                  l, (long long)total, (int)m->lengths[l]);
    }
    return FASA_OK;
}

/* Appends layer l's rows again in position order, a run of one file's rows at a time. */
static fasa_status s_restore_layer(fasa_engine_t *e, restore *r, int l, int64_t *done_p,
                                   fasa_error *err)
{
    const manifest *m = r->m;
    const int ns = m->n_shards;
    int64_t total = 0;
    for (int i = 0; i < ns; i++) {
        r->pos_off[i] = total;
        r->next[i] = 0;
        total += r->sf[i].n_rows[l];
    }
    free(r->pos);
    r->pos = malloc((size_t)(total ? total : 1) * sizeof(int32_t));
    if (!r->pos)
        return fasa_error_set(err, FASA_RESOURCE_EXHAUSTED, "out of memory restoring layer %d", l);
    for (int i = 0; i < ns; i++)
        if (shard_snap_read(&r->sf[i], l, 0, (int)r->sf[i].n_rows[l], r->pos + r->pos_off[i], NULL,
                            NULL))
            return fasa_error_set(err, FASA_FAILED_PRECONDITION, "%s: read error", m->files[i]);
    for (int32_t p = 0; p < m->lengths[l];) {
        int i = 0;
        while (i < ns &&
               !(r->next[i] < r->sf[i].n_rows[l] && r->pos[r->pos_off[i] + r->next[i]] == p))
            i++;
        if (i == ns)
            return fasa_error_set(err, FASA_FAILED_PRECONDITION,
                                  "layer %d: no shard file holds position %d", l, (int)p);
        const int32_t *pp = r->pos + r->pos_off[i];
        int n = 1;
        while (n < RESTORE_RUN && r->next[i] + n < r->sf[i].n_rows[l] &&
               pp[r->next[i] + n] == p + n)
            n++;
        if (shard_snap_read(&r->sf[i], l, r->next[i], n, NULL, r->k, r->v))
            return fasa_error_set(err, FASA_FAILED_PRECONDITION, "%s: read error", m->files[i]);
        fasa_error ae;
        const fasa_status st = fasa_engine_append(e, m->id, l, p, n, r->k, r->v, &ae);
        if (st) return fasa_error_set(err, st, "layer %d position %d: %s", l, (int)p, ae.msg);
        r->next[i] += n;
        p += n;
        if ((*done_p + n) / PROGRESS_ROWS != *done_p / PROGRESS_ROWS)
            fasa_log(FASA_LOG_INFO, 0, "restore: session %s layer %d: %d of %d rows", m->id, l,
                     (int)p, (int)m->lengths[l]);
        *done_p += n;
    }
    return FASA_OK;
}

fasa_status fasa_snapshot_restore(fasa_engine_t *e, const char *path, char *id_out, fasa_error *err)
{
    char dir[4096];
    const char *slash = strrchr(path, '/');
    snprintf(dir, sizeof(dir), "%.*s", slash ? (int)(slash - path) : 1, slash ? path : ".");
    if (id_out) *id_out = 0;
    size_t len;
    char *text = s_slurp(path, MANIFEST_MAX_BYTES, &len), why[256];
    if (!text)
        return fasa_error_set(err, FASA_FAILED_PRECONDITION, "cannot read %s: %s", path,
                              strerror(errno));
    /* The id for messages, even from a manifest that turns out damaged. */
    const char *sl = strstr(text, "\nsession ");
    if (id_out && sl) snprintf(id_out, FASA_ID_MAX + 1, "%.*s", (int)strcspn(sl + 9, "\n"), sl + 9);
    manifest m;
    const int bad = s_manifest_parse(&m, text, len, why, sizeof(why));
    free(text);
    if (bad) return fasa_error_set(err, FASA_FAILED_PRECONDITION, "%s: %s", path, why);
    if (id_out) strcpy(id_out, m.id);
    restore r = {.m = &m};
    const fasa_session_config *c = &m.cfg;
    const size_t row = (size_t)c->n_kv_heads * c->head_dim;
    r.sf = calloc((size_t)m.n_shards, sizeof(*r.sf));
    r.pos_off = calloc((size_t)m.n_shards, sizeof(int64_t));
    r.next = calloc((size_t)m.n_shards, sizeof(int64_t));
    r.k = malloc(RESTORE_RUN * row * sizeof(float));
    r.v = malloc(RESTORE_RUN * row * sizeof(float));
    fasa_status st;
    if (!r.sf || !r.pos_off || !r.next || !r.k || !r.v) {
        st = fasa_error_set(err, FASA_RESOURCE_EXHAUSTED, "out of memory restoring '%s'", m.id);
        goto out;
    }
    if ((st = s_open_shards(&r, dir, err))) goto out;
    if ((st = fasa_engine_create(e, m.id, c, err))) goto out;
    int64_t done = 0;
    for (int l = 0; l < c->n_layers && !st; l++) st = s_restore_layer(e, &r, l, &done, err);
    if (st) fasa_engine_drop(e, m.id, NULL);
out:
    s_restore_cleanup(&r);
    s_manifest_cleanup(&m);
    return st;
}

static int s_has_suffix(const char *s, const char *suffix)
{
    const size_t n = strlen(s), k = strlen(suffix);
    return n > k && strcmp(s + n - k, suffix) == 0;
}

int fasa_snapshot_restore_all(fasa_engine_t *e, const char *dir, int *n_failed_p)
{
    return fasa_snapshot_restore_all_cb(e, dir, n_failed_p, NULL, NULL);
}

int fasa_snapshot_restore_all_cb(fasa_engine_t *e, const char *dir, int *n_failed_p,
                                 void (*refused)(void *ctx, const char *id, const char *why),
                                 void *ctx)
{
    *n_failed_p = 0;
    DIR *d = opendir(dir);
    if (!d) {
        fasa_log(FASA_LOG_ERROR, 0, "restore: cannot read %s: %s", dir, strerror(errno));
        return -1;
    }
    int n_ok = 0;
    struct dirent *de;
    while ((de = readdir(d))) {
        if (!s_has_suffix(de->d_name, ".manifest")) continue;
        char path[4400], id[FASA_ID_MAX + 1];
        snprintf(path, sizeof(path), "%s/%s", dir, de->d_name);
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        fasa_error fe;
        if (fasa_snapshot_restore(e, path, id, &fe)) {
            fasa_log(FASA_LOG_ERROR, 0, "restore: session %s refused: %s",
                     *id ? id : "(unreadable)", fe.msg);
            (*n_failed_p)++;
            if (refused && *id) refused(ctx, id, fe.msg);
            continue;
        }
        clock_gettime(CLOCK_MONOTONIC, &t1);
        fasa_log(FASA_LOG_INFO, 0, "restore: session %s: %d tokens over %d shards in %.3f s", id,
                 (int)fasa_engine_length(e, id, 0), fasa_engine_n_shards(e),
                 (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec));
        n_ok++;
    }
    closedir(d);
    return n_ok;
}

/* The stem of one of our file names (see snapshot.h): its length, or 0 when name is not
 * <stem>.<something>. */
static size_t s_stem_len(const char *name)
{
    const char *dot = strchr(name, '.');
    const size_t n = dot ? (size_t)(dot - name) : 0;
    if (n < 17 || n > 57 || name[n - 17] != '-') return 0;
    for (size_t i = 0; i < n; i++) {
        const char c = name[i];
        const int hex = (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
        if (i >= n - 16 ? !hex
                        : !((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || hex ||
                            (c >= '0' && c <= '9') || c == '_' || c == '-'))
            return 0;
    }
    return n;
}

/* Whether the shard file `name` (of stem[0..stem_len)) is one its session's manifest lists;
 * also 1 when the manifest exists but cannot be read or parsed (its files are left for
 * the operator to look at: a restore names them). */
static int s_listed(const char *dir, const char *name, size_t stem_len)
{
    char mpath[4400], why[200];
    snprintf(mpath, sizeof(mpath), "%.3000s/%.*s.manifest", dir, (int)stem_len, name);
    size_t len;
    char *text = s_slurp(mpath, MANIFEST_MAX_BYTES, &len);
    if (!text) return errno != ENOENT;
    manifest m;
    const int bad = s_manifest_parse(&m, text, len, why, sizeof(why));
    free(text);
    if (bad) return 1;
    int listed = 0;
    for (int i = 0; i < m.n_shards && !listed; i++) listed = strcmp(m.files[i], name) == 0;
    s_manifest_cleanup(&m);
    return listed;
}

int fasa_snapshot_clean(const char *dir, const char *only_stem, long long *bytes_p)
{
    if (bytes_p) *bytes_p = 0;
    DIR *d = opendir(dir);
    if (!d) return -1;
    int n = 0;
    struct dirent *de;
    while ((de = readdir(d))) {
        const char *name = de->d_name;
        const size_t sl = s_stem_len(name);
        if (!sl || (only_stem && (strlen(only_stem) != sl || strncmp(name, only_stem, sl))))
            continue;
        const int tmp = s_has_suffix(name, ".manifest.tmp") || s_has_suffix(name, ".shard.tmp") ||
                        s_has_suffix(name, ".profile.tmp");
        const int shard = s_has_suffix(name, ".shard");
        /* A log whose session has no manifest belongs to no session a restore can load. */
        char mp[4400];
        snprintf(mp, sizeof(mp), "%.3000s/%.*s.manifest", dir, (int)sl, name);
        const int orphan_wal = s_has_suffix(name, ".wal") && access(mp, F_OK) != 0;
        if (!tmp && !orphan_wal && !(shard && !s_listed(dir, name, sl))) continue;
        char path[4400];
        struct stat st;
        snprintf(path, sizeof(path), "%.3000s/%s", dir, name);
        const long long bytes = stat(path, &st) == 0 ? (long long)st.st_size : 0;
        if (unlink(path) == 0) {
            n++;
            if (bytes_p) *bytes_p += bytes;
        }
    }
    closedir(d);
    return n;
}

void fasa_snapshot_remove(const char *dir, const char *id)
{
    fasa_wal_remove(dir, id);
    char stem[64], mpath[4200];
    fasa_snapshot_stem(id, stem, sizeof(stem));
    snprintf(mpath, sizeof(mpath), "%.3000s/%s.manifest", dir, stem);
    size_t len;
    char *text = s_slurp(mpath, MANIFEST_MAX_BYTES, &len), why[200];
    if (!text) return;
    manifest m;
    /* The manifest goes first: a restore never finds it listing files that are gone. */
    const int ok = s_manifest_parse(&m, text, len, why, sizeof(why)) == 0;
    free(text);
    unlink(mpath);
    s_sync_dir(dir);
    for (int i = 0; ok && i < m.n_shards; i++) {
        char p[4400];
        snprintf(p, sizeof(p), "%.3000s/%s", dir, m.files[i]);
        unlink(p);
    }
    if (ok) s_manifest_cleanup(&m);
}

fasa_status fasa_snapshot_remove_profile(const char *dir, const char *name, fasa_error *err)
{
    char stem[64], path[4200];
    fasa_snapshot_stem(name, stem, sizeof(stem));
    snprintf(path, sizeof(path), "%.3000s/%s.profile", dir, stem);
    if (unlink(path) && errno != ENOENT)
        return fasa_error_set(err, FASA_INTERNAL, "cannot remove %s: %s", path, strerror(errno));
    s_sync_dir(dir);
    return FASA_OK;
}

fasa_status fasa_snapshot_save_profile(const char *dir, const char *name, const fasa_profile *p,
                                       fasa_error *err)
{
    char stem[64], path[4200];
    fasa_snapshot_stem(name, stem, sizeof(stem));
    snprintf(path, sizeof(path), "%.3000s/%s.profile", dir, stem);
    char *pt = NULL, *buf = NULL;
    size_t pl = 0, bl = 0;
    FILE *pf = open_memstream(&pt, &pl);
    int bad = !pf || fasa_profile_write(p, pf);
    if (pf) bad |= fclose(pf) != 0;
    FILE *f = bad ? NULL : open_memstream(&buf, &bl);
    if (f) {
        fprintf(f, "fasa-profile-snapshot 1\nname %s\nprofile %zu\n", name, pl);
        fwrite(pt, 1, pl, f);
        bad |= fclose(f) != 0;
    }
    free(pt);
    fasa_status st = FASA_OK;
    if (bad || !f)
        st =
            fasa_error_set(err, FASA_RESOURCE_EXHAUSTED, "out of memory saving profile '%s'", name);
    else if (s_write_atomic(dir, path, buf, bl))
        st = fasa_error_set(err, FASA_INTERNAL, "cannot write %s: %s", path, strerror(errno));
    free(buf);
    return st;
}

/* Reads one saved profile; NULL with why on failure. name gets its name. */
static fasa_profile *s_read_profile(const char *path, char *name, char *why, size_t why_len)
{
    size_t len;
    char *text = s_slurp(path, MANIFEST_MAX_BYTES, &len);
    if (!text) return snprintf(why, why_len, "cannot read it: %s", strerror(errno)), NULL;
    fasa_profile *p = NULL;
    char *last = text + len, *cur = text, *v;
    long x;
    unsigned long long sum;
    if (len < 2 || text[len - 1] != '\n') {
        snprintf(why, why_len, "truncated");
        goto out;
    }
    last--;
    while (last > text && last[-1] != '\n') last--;
    if (sscanf(last, "checksum %16llx", &sum) != 1 || strlen(last) != 26 ||
        shard_snap_fnv(SHARD_SNAP_FNV0, text, (size_t)(last - text)) != sum) {
        snprintf(why, why_len, "checksum mismatch or missing: damaged");
        goto out;
    }
    v = s_next_line(&cur, last);
    if (!v || strcmp(v, "fasa-profile-snapshot 1") || !(v = s_expect(&cur, last, "name")) || !*v ||
        strlen(v) > FASA_ID_MAX) {
        snprintf(why, why_len, "not a profile snapshot");
        goto out;
    }
    strcpy(name, v);
    if (!(v = s_expect(&cur, last, "profile")) || s_int(v, 1, (long)(last - cur), &x) ||
        cur + x != last) {
        snprintf(why, why_len, "bad profile size");
        goto out;
    }
    FILE *pf = fmemopen(cur, (size_t)x, "r");
    if (!pf) {
        snprintf(why, why_len, "out of memory");
        goto out;
    }
    p = fasa_profile_read(pf, path, (size_t)x, why, why_len);
    fclose(pf);
out:
    free(text);
    return p;
}

int fasa_snapshot_load_profiles(const char *dir,
                                int (*add)(void *ctx, const char *name, fasa_profile **profile_p),
                                void *ctx, int *n_failed_p)
{
    *n_failed_p = 0;
    DIR *d = opendir(dir);
    if (!d) {
        fasa_log(FASA_LOG_ERROR, 0, "restore: cannot read %s: %s", dir, strerror(errno));
        return -1;
    }
    int n = 0;
    struct dirent *de;
    while ((de = readdir(d))) {
        if (!s_has_suffix(de->d_name, ".profile")) continue;
        char path[4400], name[FASA_ID_MAX + 1] = "", why[256];
        snprintf(path, sizeof(path), "%.3000s/%s", dir, de->d_name);
        fasa_profile *p = s_read_profile(path, name, why, sizeof(why));
        if (!p) {
            fasa_log(FASA_LOG_ERROR, 0, "restore: profile file %s refused: %s", path, why);
            (*n_failed_p)++;
            continue;
        }
        if (add(ctx, name, &p)) {
            fasa_profile_destroy(&p);
            fasa_log(FASA_LOG_ERROR, 0, "restore: profile %s (%s) not added", name, path);
            (*n_failed_p)++;
            continue;
        }
        fasa_log(FASA_LOG_INFO, 0, "restore: profile %s", name);
        n++;
    }
    closedir(d);
    return n;
}

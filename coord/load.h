/* Bulk load, the coordinator's half: what a load directory (or QKV dump) holds, checked
 * before anything is stored, and where each layer's keys and values lie in its files.
 *
 * Layouts accepted (README "Bulk load"), all little-endian and row-major:
 *   npy      a directory holding k_L.npy and v_L.npy for every layer L = 0 .. n_layers - 1
 *            (and no k_L.npy beyond), each of shape (T, n_kv_heads, head_dim), dtype float32
 *            ('<f4') or float16 ('<f2'), C order, the same T everywhere;
 *   stacked  a directory holding k.npy and v.npy of shape (n_layers, T, n_kv_heads,
 *            head_dim) (what 'fasa record' and client/qkv.c read), same dtypes;
 *   qkv1     a QKV1 dump file (shared/data/models/stories260K/README.md: a 40-byte header,
 *            tokens, logits, then per layer q, k, v float32 [T][heads][head_dim]).
 * The geometry must match the session's (n_layers, n_kv_heads, head_dim); every file must
 * be at least as long as its header promises. Errors name the file and the field. */
#ifndef FASA_COORD_LOAD_H
#define FASA_COORD_LOAD_H

#include <stddef.h>
#include <stdint.h>

#include "engine.h"
#include "load_rows.h"

typedef struct fasa_load_plan {
    int n_layers;
    int64_t T;          /* rows (positions) of every layer */
    const char *format; /* "npy", "stacked" or "qkv1" */
    load_src *k, *v;    /* (n_layers) where each layer's keys and values lie */
    int64_t file_bytes; /* bytes of K and V the load reads, all layers */
} fasa_load_plan;

/* Resolves a client's path: relative paths are taken under root; the result (realpath, in
 * out) must be root itself or inside it. root NULL or "": no load is allowed (a client must
 * not make the server read its files). 0, or a status with the message in err. */
fasa_status fasa_load_resolve(const char *root, const char *path, char *out, size_t out_len,
                              fasa_error *err);

/* Reads the headers at path (a directory or a QKV1 file, resolved) and checks them against
 * the geometry; with root, every file (symbolic links resolved) must lie inside it. Fills
 * plan; the caller owns its arrays (free with fasa_load_plan_free, which accepts a NULL or
 * zeroed plan). 0, or INVALID_ARGUMENT / NOT_FOUND with one line
 * naming the file and the field. */
fasa_status fasa_load_plan_open(const char *path, const char *root, int n_layers, int n_kv_heads,
                                int head_dim, fasa_load_plan *plan, fasa_error *err);
void fasa_load_plan_free(fasa_load_plan *plan);

/* What a load did, summed over layers, for one shard (load_report fields rows, file_bytes,
 * read_s, total_s) and in all. */
typedef struct fasa_load_result {
    int64_t length;       /* tokens every layer holds now (checked, with check_only) */
    int64_t stored_bytes; /* K and V bytes stored, storage dtype */
    int64_t file_bytes;   /* bytes read from the files, all shards */
    double seconds;       /* wall time of the load */
} fasa_load_result;

/* Called after each layer: layers done, of n_layers, and file bytes read so far. */
typedef void (*fasa_load_progress)(void *ctx, int done, int n_layers, int64_t file_bytes);

/* Loads plan into session id, every shard reading its own blocks (transport load): the rows
 * land at the positions, on the shards, that appends would give them. The session must hold
 * no tokens. A failure (a bad value, a read error, out of memory, or the memory limit)
 * leaves the session empty, as it was, with a message naming the file and the row. With
 * check_only the files are read and checked and nothing is stored. per_shard (n_shards, may
 * be NULL) gets each shard's summed report. */
fasa_status fasa_engine_load(fasa_engine_t *e, const char *id, const fasa_load_plan *plan,
                             int check_only, fasa_load_progress progress, void *progress_ctx,
                             fasa_load_result *res, load_report *per_shard, fasa_error *err);

#endif

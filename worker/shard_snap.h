/* Shard snapshot files: one shard's rows of one session, every layer, written by the rank
 * that holds the shard and read back by the coordinator on restore (coord/snapshot.h).
 *
 * File format, version 1 (all integers little-endian; written and read on little-endian
 * hosts only, as the MPI wire is):
 *   offset  0  magic "FASASHRD" (8 bytes)
 *           8  uint32 version (1)
 *          12  uint32 header_bytes: from offset 0 up to the first layer's body
 *          16  uint64 checksum: 64-bit FNV-1a of the whole file with these 8 bytes as zeros
 *          24  uint64 file_bytes: the size of the whole file
 *          32  int32 dtype (kernels/dtype.h: 0 f32, 1 f16, 2 bf16) of the K and V below
 *          36  int32 shard_index, int32 n_shards (of the engine that wrote it)
 *          44  int32 n_layers, n_heads, n_kv_heads, head_dim
 *          60  int32 id_len (1..128)
 *          64  the session id (id_len bytes, no NUL), zero-padded to a multiple of 8
 *              int64 n_rows[n_layers]: rows this shard holds per layer
 *   then per layer l, in order:
 *              int32 pos[n_rows[l]] (ascending)
 *              k (n_rows[l], n_kv_heads, head_dim) of dtype, the ORIGINAL dim order
 *              v (n_rows[l], n_kv_heads, head_dim) of dtype
 * Keys go out in the original dim order (not the packed order of the profile's layout), so a
 * file does not depend on the layout and can be re-sharded on load.
 *
 * A file is written under path + ".tmp", fsync'ed, renamed to path and the directory
 * fsync'ed, so path is either absent, or a complete file. */
#ifndef FASA_WORKER_SHARD_SNAP_H
#define FASA_WORKER_SHARD_SNAP_H

#include <stdint.h>
#include <stdio.h>

#include "shard.h"

#define SHARD_SNAP_VERSION 1
#define SHARD_SNAP_MAX_ID 128

/* What writing a file produced (travels over MPI as raw bytes: keep it 8-byte sized). */
typedef struct shard_snap_info {
    uint64_t checksum;  /* the header's checksum */
    int64_t file_bytes; /* size of the file */
    int64_t rows;       /* rows written, all layers */
    int32_t err_no;     /* 0, or the errno of the failed write */
    int32_t pad_;
} shard_snap_info;

/* 64-bit FNV-1a over n bytes, continuing from h (start with SHARD_SNAP_FNV0). */
#define SHARD_SNAP_FNV0 0xcbf29ce484222325ull
uint64_t shard_snap_fnv(uint64_t h, const void *data, size_t n);

/* Writes shard's rows to path atomically (see above). The body is written as f32 (dtype 0)
 * whatever the session's storage dtype (passed for the record; the manifest keeps it):
 * f16/bf16 values convert to f32 exactly and back to the same bits on restore. Returns 0 and fills
 * *info_p, or -1 with a one-line reason in why naming the file and info_p->err_no set (a partial
 * temp file is removed). */
int shard_snap_write(const shard_t *shard, const char *path, const char *session_id,
                     int shard_index, int n_shards, int dtype, shard_snap_info *info_p, char *why,
                     size_t why_len);

/* An open snapshot file being read. */
typedef struct shard_snap_file {
    FILE *f;
    int dtype, shard_index, n_shards;
    int n_layers, n_heads, n_kv_heads, head_dim;
    char id[SHARD_SNAP_MAX_ID + 1];
    uint64_t checksum;
    int64_t file_bytes;
    int64_t *n_rows;    /* (n_layers) */
    int64_t *layer_off; /* (n_layers) byte offset of each layer's pos section */
} shard_snap_file;

/* Opens path, checks the header (magic, version, bounds, sizes against the file's size) and
 * the checksum over the whole file. Returns 0 (the caller owns what sf holds: free it with
 * shard_snap_close), or -1 with a one-line reason in why (nothing to close). */
int shard_snap_open(shard_snap_file *sf, const char *path, char *why, size_t why_len);

/* Reads rows row0 .. row0 + n - 1 of a layer: pos[n], k and v (n, n_kv_heads, head_dim) as
 * f32 in the original dim order (any may be NULL). Returns 0, or -1 on a read error. */
int shard_snap_read(shard_snap_file *sf, int layer, int64_t row0, int n, int32_t *pos, float *k,
                    float *v);
/* Closes the file and frees the arrays shard_snap_open made (sf is the caller's, zeroed
 * after); NULL is a no-op. */
void shard_snap_close(shard_snap_file *sf);

#endif

/* Snapshots of sessions in a state directory, and restoring them on start-up.
 *
 * A session's snapshot is one manifest written by the coordinator plus one shard file per
 * shard (worker/shard_snap.h) written by the rank holding the shard. The directory must be
 * reachable under the same path from every rank (on a cluster: a shared filesystem).
 *
 * Names: a session id may hold any printable ASCII, so files are named by a filesystem-safe
 * stem: the id's first 40 characters from [A-Za-z0-9_-] (others as '_') then '-' and the
 * 64-bit FNV-1a of the whole id in hex. <stem>.manifest is the manifest; the shard files are
 * <stem>.g<generation>.s<i>.shard.
 *
 * Manifest, a text file (version 1):
 *   fasa-snapshot 1
 *   session <id>
 *   n_layers <L> / n_heads <H> / n_kv_heads <Hkv> / head_dim <d>   (one per line)
 *   pairing interleaved|half
 *   dtype f32|f16|bf16          the session's storage dtype
 *   method <name> / budget <B> / gqa per-head|shared
 *   dense_layers <L values 0|1>
 *   lengths <L values>          tokens appended per layer
 *   block <tokens>              placement block of the engine that wrote it
 *   generation <g>
 *   n_shards <n>
 *   shard <i> <file name> <bytes> <checksum, 16 hex digits>     (n lines, i = 0..n-1)
 *   profile none | profile <bytes>, then exactly that many bytes of profile text
 *     (coord/profile.h)
 *   checksum <16 hex digits>    64-bit FNV-1a of every byte before this line
 *
 * Writing a snapshot: the shards write new files under a new generation, then the manifest
 * is written to a temporary name, fsync'ed and renamed over the old one, and only then are
 * the previous generation's files removed (and any stray file of the session:
 * fasa_snapshot_clean). A crash at any point leaves the previous snapshot whole, and the
 * next start (or the session's next snapshot) removes what the crash left. Restoring: the
 * manifest's checksum, every shard file's header, size and checksum (against the file and the
 * manifest) are checked before the session is created; then every row is appended again in position
 * order through the engine, so the placement follows the restoring engine's shard count (re-shard
 * on load). */
#ifndef FASA_COORD_SNAPSHOT_H
#define FASA_COORD_SNAPSHOT_H

#include <stdint.h>

#include "engine.h"

#define FASA_SNAPSHOT_VERSION 1

typedef struct fasa_snapshot_result {
    int64_t length;    /* tokens of layer 0 */
    int64_t bytes;     /* bytes of the shard files */
    char manifest[80]; /* file name of the manifest written (in the state dir) */
} fasa_snapshot_result;

/* Writes a snapshot of session id into dir (which must exist). res may be NULL. NOT_FOUND
 * for an unknown id; INTERNAL naming the file when a write failed (the previous snapshot
 * stays valid). */
fasa_status fasa_snapshot_session(fasa_engine_t *e, const char *dir, const char *id,
                                  fasa_snapshot_result *res, fasa_error *err);

/* Restores one session from the manifest at path into e. A damaged or missing file, or a
 * session that exists already, leaves e unchanged: the status and err name the file and the
 * session. id_out (FASA_ID_MAX + 1 bytes, may be NULL) gets the session id when it could be
 * read. */
fasa_status fasa_snapshot_restore(fasa_engine_t *e, const char *manifest_path, char *id_out,
                                  fasa_error *err);

/* Restores every *.manifest in dir, logging one line per session (and progress for long
 * ones) and an error line for each one refused. *n_failed_p gets the count refused.
 * Returns the count restored, or -1 when dir cannot be read. */
int fasa_snapshot_restore_all(fasa_engine_t *e, const char *dir, int *n_failed_p);
/* The same, also calling refused(ctx, id, why) for each session refused whose id could be
 * read (refused may be NULL). */
int fasa_snapshot_restore_all_cb(fasa_engine_t *e, const char *dir, int *n_failed_p,
                                 void (*refused)(void *ctx, const char *id, const char *why),
                                 void *ctx);

/* The stem of a session id's files (see above): stem gets at most 60 bytes. */
void fasa_snapshot_stem(const char *id, char *stem, size_t len);

/* Removes the snapshot of session id from dir (its manifest and the shard files it lists);
 * nothing to remove is not an error. */
void fasa_snapshot_remove(const char *dir, const char *id);

/* Removes the files a killed snapshot leaves behind: every <stem>.*.tmp (manifest, shard
 * or profile), and every shard file that its session's manifest does not list (another
 * generation, or no manifest at all). A manifest that exists but is damaged keeps its
 * files (a restore names them). Only names of the form above are touched. only_stem
 * (NULL: every session) limits it to one session's files, as after each snapshot of it.
 * Returns the count of files removed (*bytes_p their bytes; may be NULL), -1 when dir
 * cannot be read. */
int fasa_snapshot_clean(const char *dir, const char *only_stem, long long *bytes_p);

/* Named calibration profiles, one file each: <dir>/<stem of the name>.profile holding
 *   fasa-profile-snapshot 1
 *   name <name>
 *   profile <bytes>, then exactly that many bytes of profile text (coord/profile.h)
 *   checksum <16 hex digits>    64-bit FNV-1a of every byte before this line
 * written atomically like a manifest. */
fasa_status fasa_snapshot_save_profile(const char *dir, const char *name, const fasa_profile *p,
                                       fasa_error *err);
/* Removes the saved file of profile name from dir; none there is not an error. */
fasa_status fasa_snapshot_remove_profile(const char *dir, const char *name, fasa_error *err);
/* Loads every *.profile in dir, handing each to add: add takes *profile_p over (setting it
 * NULL) and returns 0, or returns -1 to refuse it, leaving it to be freed here. A damaged
 * file is logged and skipped. Returns the count loaded (*n_failed_p the count skipped), or
 * -1 when dir cannot be read. */
int fasa_snapshot_load_profiles(const char *dir,
                                int (*add)(void *ctx, const char *name, fasa_profile **profile_p),
                                void *ctx, int *n_failed_p);

#endif

/* The write-ahead log of appends: what a session was sent since its last snapshot, so that
 * every acknowledged append survives a kill -9 of any rank (rank 0 included).
 *
 * Rank 0 writes it (the one place that sees every append in order, and the place a restore
 * reads from): one file per session beside its manifest, <stem>.wal (stem as in
 * snapshot.h), holding
 *   header:  "FASAWAL1", uint32 id length, the session id
 *   records: uint32 magic 0x4c415746 ("FWAL"), int32 layer (-1: every layer), int64 first
 *            position, int32 n rows, int32 row floats (n_kv_heads * head_dim), uint64
 *            payload bytes; then k and v as float32, (layers, n, row) each, exactly as
 *            appended (an Attend's k_new is a one-row record); then a uint64 checksum of
 *            the record's header and payload (FNV-1a over 64-bit words)
 * (host byte order: the file is read back by a server of the same build and machine kind).
 *
 * A record is written (write(2), whole) after the engine applied the append and before the
 * reply: the acknowledgement follows the write. Sync policy (--wal):
 *   write   the default: the record is in the kernel's page cache before the reply, so a
 *           process killed (kill -9, OOM, mpirun's teardown) loses nothing acknowledged; a
 *           power loss or kernel crash of the node may lose the last few seconds;
 *   fsync   fdatasync(2) before the reply: survives a node crash too, at the price of one
 *           disk flush per append (see README: Durability, for the measured cost);
 *   off     no log: what a kill loses is everything since the last snapshot.
 * Each snapshot of the session truncates its log to the header (the snapshot holds it all);
 * a restore replays the log after the snapshot (records or rows the snapshot already holds
 * are skipped), stops at the first damaged or torn record (one never acknowledged: it was
 * being written when the process died) and cuts the file there, so later records follow
 * good ones. */
#ifndef FASA_COORD_WAL_H
#define FASA_COORD_WAL_H

#include <stdint.h>

#include "engine.h"

typedef enum fasa_wal_mode { FASA_WAL_OFF = 0, FASA_WAL_WRITE, FASA_WAL_FSYNC } fasa_wal_mode;

/* "off", "write", "fsync": 0, or -1 for anything else. */
int fasa_wal_mode_parse(const char *s, fasa_wal_mode *out);
const char *fasa_wal_mode_name(fasa_wal_mode m);

/* Logs one append of session id (as fasa_engine_append: layer -1 = every layer of
 * n_layers, k and v (layers, n, row)). 0, or -1 with errno (the file is left as it was). */
int fasa_wal_append(const char *dir, fasa_wal_mode mode, const char *id, int layer, int n_layers,
                    int32_t pos0, int n, int row, const float *k, const float *v);

/* Truncates session id's log to its header (after a snapshot of it); no log is fine. */
void fasa_wal_truncate(const char *dir, const char *id);
/* Removes session id's log (the session was dropped). */
void fasa_wal_remove(const char *dir, const char *id);

/* Replays every <stem>.wal in dir whose session e holds (restored from its snapshot),
 * logging what it did; a log of a session e does not hold is left alone. Returns the
 * records replayed (*rows_p the rows appended, may be NULL), or -1 when dir cannot be read. */
int fasa_wal_replay_all(fasa_engine_t *e, const char *dir, long long *rows_p);

#endif

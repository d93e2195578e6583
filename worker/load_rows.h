/* Bulk load, the shard's half: one shard reads the rows of its own placement blocks of one
 * layer straight from the files (a filesystem every node sees) and appends them, so load
 * bandwidth grows with the workers. The coordinator (coord/load.h) has checked the files'
 * headers, shapes and sizes; the values are checked here, as they are read, with the rule
 * the engine applies to appends (finite, |x| below 2^50, and no overflow of the storage
 * dtype). A shard that finds a bad value stops and reports where; the engine then drops
 * every shard of the session and starts them afresh, so a failed load stores nothing.
 *
 * shard_load_layer reads each placement block in chunks of about 512 KB per tensor (one
 * pread each), checks the file's own bits, converts a chunk once where the file's dtype is
 * not the store's, and stores it with shard_append_dt; a reader thread keeps up to two
 * chunks ahead of the store, so file reads overlap the store where a core is free.
 *
 * The job and the report are fixed-size structs of plain fields, so they travel over MPI
 * as raw bytes (worker_mpi_wire.h WMPI_LOAD). */
#ifndef FASA_WORKER_LOAD_ROWS_H
#define FASA_WORKER_LOAD_ROWS_H

#include <stddef.h>
#include <stdint.h>

#include "shard.h"

#define LOAD_MAX_PATH 1024 /* bytes of a file's path, NUL included */

/* One tensor (the keys or the values) of one layer in a file: row t (t = 0 .. T - 1), the
 * n_kv_heads x head_dim elements of position t, lies at byte offset + t * stride. */
typedef struct load_src {
    int64_t offset, stride;
    int32_t dtype; /* of the file's elements: FASA_DTYPE_F32 or FASA_DTYPE_F16, little-endian */
    int32_t pad_;
    char path[LOAD_MAX_PATH]; /* NUL-terminated */
} load_src;

/* One layer for one shard: the rows p in [0, T) with (p / block) % n_shards == shard, the
 * rows that appends with this placement put on it, at the same positions. */
typedef struct load_job {
    int32_t layer;
    int32_t block;      /* placement block, tokens */
    int32_t n_shards;   /* of the engine */
    int32_t shard;      /* this shard's index */
    int64_t T;          /* rows of the layer in the files */
    int32_t check_only; /* 1: read and check every row, store nothing */
    int32_t pad_;
    load_src k, v;
} load_job;

typedef enum load_err {
    LOAD_OK = 0,
    LOAD_EIO = 1,    /* open or read failed: err_no */
    LOAD_ESHORT = 2, /* the file ended before the row */
    LOAD_EVALUE = 3, /* a value is not finite, too large, or overflows the storage dtype */
    LOAD_ENOMEM = 4, /* out of memory reading or storing */
    LOAD_EJOB = 5,   /* a malformed job (a coordinator bug) */
} load_err;

/* What one shard did with one job. */
typedef struct load_report {
    int64_t rows;       /* rows stored (checked, with check_only) */
    int64_t file_bytes; /* bytes read from the files */
    double read_s;      /* seconds spent in file reads */
    double total_s;     /* seconds the job took on the shard */
    int32_t err;        /* load_err */
    int32_t err_no;     /* LOAD_EIO: errno */
    int32_t which;      /* the tensor at fault: 0 the keys, 1 the values */
    int32_t elem;       /* LOAD_EVALUE: the element within the row */
    int64_t row;        /* the row (position) at fault */
    float value;        /* LOAD_EVALUE: the value */
    int32_t pad_;
} load_report;

_Static_assert(sizeof(load_src) == 24 + LOAD_MAX_PATH, "load_src travels as raw bytes");
_Static_assert(sizeof(load_job) == 32 + 2 * sizeof(load_src), "load_job travels as raw bytes");
_Static_assert(sizeof(load_report) == 64, "load_report travels as raw bytes");

/* Runs job on shard (whose layout gives the geometry and the storage dtype): reads the
 * shard's rows of the layer from job->k and job->v, checks them and appends them (unless
 * check_only). Returns 0, or -1 with rep->err saying what and where. On failure the rows
 * already appended stay (the engine drops the shard). */
int shard_load_layer(shard_t *shard, const load_job *job, load_report *rep);
/* The reference of shard_load_layer, kept for tests: chunks read, widened to f32 and
 * checked there, and appended as f32 one after the other (no reader thread); the same
 * store, bit for bit, and the same report (rows, file_bytes, and a failure's err, which,
 * row, elem and value). */
int shard_load_layer_naive(shard_t *shard, const load_job *job, load_report *rep);

/* One line describing a failed report of job, e.g. "k_3.npy: row 517 element 12 = nan: values
 * must be finite and below 2^50 (1.1e15)" (the path as the job names it). */
void load_report_text(const load_job *job, const load_report *rep, int store_dtype, char *buf,
                      size_t len);

#endif

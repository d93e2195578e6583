/* Recorded post-RoPE activations: a QKV1 dump (format in
 * shared/data/models/stories260K/README.md) or a directory holding q.npy, k.npy, v.npy
 * (float32, shapes (n_layers, T, heads, head_dim)). */
#ifndef FASA_CLIENT_QKV_H
#define FASA_CLIENT_QKV_H

#include <stddef.h>
#include <stdint.h>

#include "calib.h"

typedef struct fasa_qkv {
    fasa_activations act; /* views into the buffers below */
    int vocab;            /* 0 for .npy directories */
    int32_t *tokens;      /* (n_tokens) or NULL */
    float *buf[3];        /* owned storage of q, k, v */
    const float **ptrs;   /* (3, n_layers) layer pointers behind act.q, act.k, act.v */
} fasa_qkv;

/* Loads path (a QKV1 file or an .npy directory). Returns 0, and the caller owns out's buffers
 * (free with fasa_qkv_cleanup), or -1 with one line naming the problem in err (missing file,
 * wrong magic, truncated data, odd head_dim, bad geometry). */
int fasa_qkv_load(const char *path, fasa_qkv *out, char *err, size_t err_len);
/* Frees qkv's buffers (the struct is the caller's); NULL is a no-op. */
void fasa_qkv_cleanup(fasa_qkv *qkv);

#endif

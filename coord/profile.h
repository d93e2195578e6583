/* Calibration profiles: the dominant FCs of every (layer, query head) and the mean
 * contextual agreement they were chosen by, in a small human-readable text file.
 *
 *   fasa-profile 1
 *   n_layers 5
 *   n_heads 8
 *   n_kv_heads 4
 *   head_dim 8
 *   pairing interleaved
 *   gqa per-head
 *   ntip 2
 *   window 32
 *   samples 1024:2048:64
 *   # layer head : dominant FCs : mean CA of FC 0 .. d/2-1
 *   0 0 : 1 3 : 0.250000 0.531250 0.187500 0.718750
 *   ...
 * Lines starting with '#' are comments. With gqa shared, every query head of a KV group
 * carries the same FCs (chosen by the group's mean CA). */
#ifndef FASA_COORD_PROFILE_H
#define FASA_COORD_PROFILE_H

#include <stdio.h>

#include "fc.h"

typedef struct fasa_profile {
    int n_layers, n_heads, n_kv_heads, head_dim;
    fc_pairing pairing;
    int gqa_shared;   /* 1: one FC set per KV head */
    int ntip;         /* dominant FCs per head */
    int window;       /* CA window K */
    char samples[64]; /* the positions calibrated on, as A:B:S */
    int *fcs;         /* (n_layers, n_heads, ntip) ascending FC indices */
    double *ca;       /* (n_layers, n_heads, head_dim / 2) mean CA */
} fasa_profile;

/* Allocates the arrays of a profile with the given geometry (fields set, fcs and ca
 * zeroed). Returns NULL when out of memory. Caller owns it (free with fasa_profile_destroy). */
fasa_profile *fasa_profile_new(int n_layers, int n_heads, int n_kv_heads, int head_dim, int ntip);
/* Frees the profile; *profile_p becomes NULL. NULL (or *profile_p NULL) is a no-op. */
void fasa_profile_destroy(fasa_profile **profile_p);
/* A deep copy of src (borrowed), or NULL when out of memory. Caller owns it (free with
 * fasa_profile_destroy). */
fasa_profile *fasa_profile_clone(const fasa_profile *src);

/* Writes a profile as text. Returns 0, or -1 on a write error. */
int fasa_profile_write(const fasa_profile *p, FILE *f);
int fasa_profile_save(const fasa_profile *p, const char *path, char *err, size_t err_len);

/* Reads a profile file; NULL with a one-line reason in err (naming the line) on failure.
 * Caller owns the profile (free with fasa_profile_destroy), as with fasa_profile_read. */
fasa_profile *fasa_profile_load(const char *path, char *err, size_t err_len);
/* Reads a profile from a stream; name is for messages. A profile whose header claims more
 * than max_cells FC and CA values is refused before anything is allocated (a text of n
 * bytes cannot hold more than n / 2 of them). */
fasa_profile *fasa_profile_read(FILE *f, const char *name, size_t max_cells, char *err,
                                size_t err_len);

/* 0 when the profile fits this geometry, else -1 with a reason in err naming the field. */
int fasa_profile_check(const fasa_profile *p, int n_layers, int n_heads, int n_kv_heads,
                       int head_dim, fc_pairing pairing, char *err, size_t err_len);

#endif

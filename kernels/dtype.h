/* Storage dtypes of a session's keys and values. Queries, scores and outputs are always
 * f32; f16 and bf16 halve the bytes held and read, and kernels convert on the fly. */
#ifndef FASA_KERNELS_DTYPE_H
#define FASA_KERNELS_DTYPE_H

#include <stddef.h>
#include <string.h>

typedef enum fasa_dtype { FASA_DTYPE_F32 = 0, FASA_DTYPE_F16 = 1, FASA_DTYPE_BF16 = 2 } fasa_dtype;
#define FASA_DTYPE_LAST FASA_DTYPE_BF16

/* "f32", "f16", "bf16", or NULL for a value out of range. */
static inline const char *fasa_dtype_name(int dtype)
{
    static const char *const names[] = {"f32", "f16", "bf16"};
    return dtype >= 0 && dtype <= FASA_DTYPE_LAST ? names[dtype] : NULL;
}

/* Bytes per stored element, 0 for a value out of range. */
static inline size_t fasa_dtype_size(int dtype)
{
    return dtype == FASA_DTYPE_F32                               ? 4
           : dtype == FASA_DTYPE_F16 || dtype == FASA_DTYPE_BF16 ? 2
                                                                 : 0;
}

/* 0 and *out_p set for a known name, -1 otherwise. */
static inline int fasa_dtype_parse(const char *name, fasa_dtype *out_p)
{
    for (int d = 0; d <= FASA_DTYPE_LAST; d++)
        if (name && !strcmp(name, fasa_dtype_name(d))) {
            *out_p = (fasa_dtype)d;
            return 0;
        }
    return -1;
}

#endif

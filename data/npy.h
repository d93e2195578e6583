/* Minimal NumPy .npy files: little-endian float32 and int32 arrays in C order. */
#ifndef FASA_CLIENT_NPY_H
#define FASA_CLIENT_NPY_H

#include <stddef.h>
#include <stdint.h>

#define NPY_MAX_DIMS 8

/* Writes an array of n_dims dims; dtype "<f4" (float) or "<i4" (int32_t). Returns 0, or -1
 * with a reason in err. */
int npy_write(const char *path, const char *dtype, int n_dims, const int64_t *shape,
              const void *data, char *err, size_t err_len);

/* Reads a "<f4" array. On success *data_p holds the values (caller owns them: free with
 * free()), shape_p[0..*n_dims_p) the shape. Returns 0, or -1 with a reason in err (missing file,
 * bad magic, dtype, order, truncated data). */
int npy_read_f32(const char *path, float **data_p, int *n_dims_p, int64_t *shape_p, char *err,
                 size_t err_len);
/* The same for a "<f4" or "<f2" (IEEE float16) array: *f16_p is 1 for float16, whose
 * elements (uint16_t) *data_p then holds; caller owns *data_p (free with free()). */
int npy_read_f32_f16(const char *path, void **data_p, int *f16_p, int *n_dims_p, int64_t *shape_p,
                     char *err, size_t err_len);

#endif

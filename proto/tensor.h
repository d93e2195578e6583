/* A Tensor message over caller-owned f32 values, for code that builds requests by hand
 * (the tests' wire cases, the fuzz fixture and its corpus). */
#ifndef FASA_PROTO_TENSOR_H
#define FASA_PROTO_TENSOR_H

#include <stddef.h>
#include <stdint.h>

#include "fasa.pb-c.h"

/* Fills *t: dtype F32, the rank dims of shape (borrowed) and n values of data (borrowed,
 * not copied: both must outlive t). */
static inline void edge_tensor_f32(Fasa__V1__Tensor *t, uint64_t *shape, int rank,
                                   const float *data, size_t n)
{
    fasa__v1__tensor__init(t);
    t->dtype = FASA__V1__DTYPE__F32;
    t->n_shape = (size_t)rank;
    t->shape = shape;
    t->data.data = (uint8_t *)data;
    t->data.len = n * sizeof(float);
}

#endif

/* Frequency chunks (FCs): RoPE rotates a head's dims in 2-D pairs, one frequency per
 * pair. An FC is such a pair of dims. Two layouts exist in the wild (fasa-algorithm.md
 * §1.1): `interleaved` pairs dims (2i, 2i+1) (Meta / llama2.c); `half` pairs dims
 * (i, i + d/2) (HF rotate_half / NeoX). A head of dim d has d/2 FCs. */
#ifndef FASA_KERNELS_FC_H
#define FASA_KERNELS_FC_H

typedef enum fc_pairing { FC_PAIRING_INTERLEAVED = 0, FC_PAIRING_HALF = 1 } fc_pairing;

/* The two dims of FC i of a head of (even) dim d, in ascending order. */
static inline void fc_dims(fc_pairing pairing, int d, int i, int *d0_p, int *d1_p)
{
    if (pairing == FC_PAIRING_HALF) {
        *d0_p = i;
        *d1_p = i + d / 2;
    } else {
        *d0_p = 2 * i;
        *d1_p = 2 * i + 1;
    }
}

/* "interleaved" / "half" for FC_PAIRING_*; NULL for anything else. */
const char *fc_pairing_name(int pairing);
/* Parses a pairing name; returns 0 and sets *out_p, or -1 when the name is unknown. */
int fc_pairing_parse(const char *name, fc_pairing *out_p);

#endif

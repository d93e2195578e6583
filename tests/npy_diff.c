/* npy_diff A.npy B.npy TOL: prints the largest absolute difference between two float32
 * .npy arrays of the same shape; exits 0 when it is at most TOL, 1 otherwise (or when the
 * files cannot be read or their shapes differ). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "npy.h"

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: npy_diff A.npy B.npy TOL\n");
        return 2;
    }
    float *a = NULL, *b = NULL;
    int na, nb;
    int64_t sa[NPY_MAX_DIMS], sb[NPY_MAX_DIMS];
    char err[256];
    if (npy_read_f32(argv[1], &a, &na, sa, err, sizeof(err)) ||
        npy_read_f32(argv[2], &b, &nb, sb, err, sizeof(err))) {
        fprintf(stderr, "npy_diff: %s\n", err);
        free(a);
        return 1;
    }
    size_t n = 1;
    int same = na == nb;
    for (int i = 0; same && i < na; i++) {
        same = sa[i] == sb[i];
        n *= (size_t)sa[i];
    }
    if (!same) {
        fprintf(stderr, "npy_diff: %s and %s differ in shape\n", argv[1], argv[2]);
        free(a);
        free(b);
        return 1;
    }
    double worst = 0;
    for (size_t i = 0; i < n; i++) {
        const double d = fabs((double)a[i] - (double)b[i]);
        if (!(d <= worst)) worst = d; /* NaN counts as worst */
    }
    printf("max |diff| %.3g over %zu values\n", worst, n);
    free(a);
    free(b);
    return worst <= atof(argv[3]) ? 0 : 1;
}

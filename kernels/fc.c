#include "fc.h"

#include <string.h>

const char *fc_pairing_name(int pairing)
{
    switch (pairing) {
    case FC_PAIRING_INTERLEAVED:
        return "interleaved";
    case FC_PAIRING_HALF:
        return "half";
    default:
        return NULL;
    }
}

int fc_pairing_parse(const char *name, fc_pairing *out_p)
{
    if (strcmp(name, "interleaved") == 0) {
        *out_p = FC_PAIRING_INTERLEAVED;
        return 0;
    }
    if (strcmp(name, "half") == 0) {
        *out_p = FC_PAIRING_HALF;
        return 0;
    }
    return -1;
}

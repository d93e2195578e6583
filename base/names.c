/* See names.h. */
#include "names.h"

#include <string.h>

static const char *const s_status[] = {"OK",
                                       "INVALID_ARGUMENT",
                                       "NOT_FOUND",
                                       "ALREADY_EXISTS",
                                       "RESOURCE_EXHAUSTED",
                                       "UNAUTHENTICATED",
                                       "FAILED_PRECONDITION",
                                       "INTERNAL",
                                       "UNAVAILABLE"};

static const char *const s_method[FASA_NAMES_N_METHODS] = {"fasa",  "dense", "oracle",   "stream",
                                                           "quest", "sparq", "fasa-plus"};

const char *fasa_names_status(int code)
{
    return (unsigned)code < sizeof(s_status) / sizeof(*s_status) ? s_status[code] : "UNKNOWN";
}

const char *fasa_names_method(int method)
{
    return (unsigned)method < FASA_NAMES_N_METHODS ? s_method[method] : "unknown";
}

const char *fasa_names_wire_method(int wire_method)
{
    return wire_method == 0 ? "default" : fasa_names_method(wire_method - 1);
}

int fasa_names_method_parse(const char *name)
{
    for (int i = 0; i < FASA_NAMES_N_METHODS; i++)
        if (strcmp(name, s_method[i]) == 0) return i;
    return -1;
}

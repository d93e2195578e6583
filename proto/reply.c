/* See reply.h. */
#include "reply.h"

#include <stdlib.h>

#include "edge.h"

int edge_reply_pack(const Fasa__V1__Response *resp, uint8_t **reply_p, size_t *reply_len_p)
{
    const size_t n = fasa__v1__response__get_packed_size(resp);
    uint8_t *buf = malloc(n ? n : 1);
    if (!buf) return -1;
    fasa__v1__response__pack(resp, buf);
    *reply_p = buf;
    *reply_len_p = n;
    return 0;
}

int edge_reply_error(uint64_t request_id, int code, const char *msg, uint8_t **reply_p,
                     size_t *reply_len_p)
{
    Fasa__V1__Response resp;
    fasa__v1__response__init(&resp);
    resp.protocol_version = EDGE_PROTOCOL_VERSION;
    resp.request_id = request_id;
    resp.status = (Fasa__V1__Status)code;
    resp.message = (char *)msg;
    return edge_reply_pack(&resp, reply_p, reply_len_p);
}

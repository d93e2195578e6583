/* The other way of the edge: replies to wire bytes. The service fills a Response (or gives
 * a status and message) and these pack it; nothing outside proto/ calls protobuf-c's pack. */
#ifndef FASA_PROTO_REPLY_H
#define FASA_PROTO_REPLY_H

#include <stddef.h>
#include <stdint.h>

#include "fasa.pb-c.h"

/* Packs resp (borrowed) into a new buffer: caller owns *reply_p (free with free()).
 * 0, or -1 when memory is short (nothing allocated). */
int edge_reply_pack(const Fasa__V1__Response *resp, uint8_t **reply_p, size_t *reply_len_p);
/* An error reply: request_id, status code (a Status number) and msg (borrowed), no body.
 * As edge_reply_pack. */
int edge_reply_error(uint64_t request_id, int code, const char *msg, uint8_t **reply_p,
                     size_t *reply_len_p);

#endif

/* Protocol-level bad-input cases (wire_cases.c), run over any way of delivering bytes. */
#ifndef FASA_TESTS_WIRE_CASES_H
#define FASA_TESTS_WIRE_CASES_H

#include <stddef.h>

#include <check.h>

#include "edge.h"
#include "fasa.pb-c.h"

/* The session the cases use: "bad", dense, WIRE_N tokens in each of WIRE_L layers. */
#define WIRE_L 2
#define WIRE_H 4
#define WIRE_HKV 2
#define WIRE_D 8
#define WIRE_N 40

/* Delivers one request's bytes; returns the decoded Response (caller frees it with
 * fasa__v1__response__free_unpacked) or NULL when no reply came. */
typedef Fasa__V1__Response *(*wire_rt_fn)(const void *buf, size_t len);

void wire_set_roundtrip(wire_rt_fn rt);
/* Delivers a Request's bytes followed by n raw data frames (fasa.proto Tensor.data_frame) as
 * one multipart message; without one set, the raw-frame cases are skipped. */
typedef Fasa__V1__Response *(*wire_rt_frames_fn)(const void *buf, size_t len,
                                                 const edge_frame *frames, int n);
void wire_set_roundtrip_frames(wire_rt_frames_fn rt);
/* An F32 tensor of n floats at data with shape[rank] (borrowed). */
void wire_tensor(Fasa__V1__Tensor *t, uint64_t *shape, int rank, const float *data, size_t n);
/* A CreateSession request for id with the geometry above (no profile: dense). */
void wire_create_init(Fasa__V1__Request *req, Fasa__V1__CreateSession *c, const char *id);
/* Packs and sends req (request id and version filled in when 0); asserts a reply. */
Fasa__V1__Response *wire_send(Fasa__V1__Request *req);
/* Asserts an error status whose message names field, then frees r. */
void wire_expect_error(Fasa__V1__Response *r, Fasa__V1__Status code, const char *field);
/* (Re)creates session "bad" and checks its attend output against exact attention. */
void wire_make_session(void);
/* Asserts the session is as wire_make_session left it. */
void wire_check_unchanged(void);
/* Adds the shared cases (bad bytes, bad fields) to tc. */
void wire_cases_add(TCase *tc);

#endif

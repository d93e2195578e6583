/* The state the fuzz target starts from, shared by the target (fuzz_request.c) and the seed
 * corpus generator (gen_corpus.c): a service over an embedded engine of FUZZ_SHARDS
 * in-process shards with a small placement block (so a few dozen tokens already span both
 * shards), with the service's default limits, and a few sessions and a profile put there
 * through the same request path a client uses:
 *
 *   profile "p"   stored by a Calibrate of FUZZ_L x FUZZ_T random activations;
 *   session "d"   dense (no profile), FUZZ_N tokens in every layer;
 *   session "f"   with profile "p" (method fasa), FUZZ_N tokens in every layer;
 *   session "e"   no profile and no tokens (SetProfile is allowed on it);
 *   session "g"   the smallest geometry: 1 layer, 2 query heads each with its own KV head,
 *                 head_dim 2 (one FC), HALF pairing, dense, FUZZ_N_G tokens.
 *
 * "d", "f" and "e" have FUZZ_L layers, FUZZ_H query heads, FUZZ_HKV KV heads, head_dim
 * FUZZ_D. Seeds name these ids so that a single request already reaches the engine. */
#ifndef FASA_FUZZ_FIXTURE_H
#define FASA_FUZZ_FIXTURE_H

#include <stddef.h>
#include <stdint.h>

#include "fasa.pb-c.h"
#include "service.h"

#define FUZZ_SHARDS 2
#define FUZZ_BLOCK 16 /* tokens per placement block: a multiple of 16 so quest runs */
#define FUZZ_L 2
#define FUZZ_H 4
#define FUZZ_HKV 2
#define FUZZ_D 8
#define FUZZ_N 40      /* tokens of "d" and "f": blocks of 16 on shards 0, 1, 0 */
#define FUZZ_T 48      /* tokens of the calibration sample of profile "p" */
#define FUZZ_N_G 24    /* tokens of "g" */
#define FUZZ_LOAD_T 24 /* tokens of the load directories under the fixture's load root */

typedef struct fuzz_fixture {
    fasa_service *svc;     /* owns engine */
    fasa_engine_t *engine; /* borrowed from svc, for the target's state checks */
    char *profile_text;    /* (malloc'd) the text of profile "p", as Calibrate returned it */
    /* The service's --load-root, a fresh temporary directory holding "kv" (k_L.npy, v_L.npy
     * of FUZZ_LOAD_T tokens in the geometry of "d": a good LoadSession for "e") and "bad"
     * (the same with a NaN in v_1.npy): removed with the fixture. */
    char load_root[64];
} fuzz_fixture;

/* A fixture as described above. Aborts with a message when any step fails (the service is
 * broken, not the input). */
fuzz_fixture *fuzz_fixture_new(void);
void fuzz_fixture_destroy(fuzz_fixture **fx_p);

/* Packs req (malloc'd bytes, caller frees) into *len_p. Aborts when out of memory. */
uint8_t *fuzz_pack(const Fasa__V1__Request *req, size_t *len_p);

/* Sends len bytes (one input: fuzz_split) through the service; returns the decoded Response (caller
 * frees it with fasa__v1__response__free_unpacked). Aborts when no decodable response comes back.
 */
Fasa__V1__Response *fuzz_roundtrip(fuzz_fixture *fx, const void *buf, size_t len);

/* Multipart inputs (a Request followed by raw data frames, fasa.proto Tensor.data_frame):
 * an input that starts with the 3 bytes "FRM" is byte 3 = n (0..255 data frames), n
 * little-endian uint32 frame lengths, then the Request's bytes, then the frames' bytes in
 * order; the lengths are clipped, first to last, to the bytes there are, and what they leave
 * first is the Request. Any other input is one frame (the Request). fuzz_split reads one
 * (frames: FUZZ_MAX_FRAMES entries; all pointers into data); fuzz_join writes one (caller
 * frees; aborts when out of memory). */
#define FUZZ_MAX_FRAMES 255
void fuzz_split(const uint8_t *data, size_t size, const uint8_t **req_p, size_t *len_p,
                edge_frame *frames, int *n_frames_p);
uint8_t *fuzz_join(const uint8_t *req, size_t len, const edge_frame *frames, int n_frames,
                   size_t *out_len_p);

/* Fills n floats with deterministic values in [-scale, scale) from *state. */
void fuzz_fill(uint64_t *state, size_t n, float *x, float scale);

#endif

/* A shard of one session's KV cache: the rows (token positions) that placement gave this
 * shard, for every layer and KV head, and the two local halves of a FASA step.
 *
 * Layout per (layer, KV head), in chunks of SHARD_CHUNK rows so that growth copies at most
 * one chunk (a chunk's arrays start at SHARD_CHUNK_MIN rows and double as it fills):
 *   kdom  the dominant key dims (the union of the FCs the group's query heads use), packed
 *         in row tiles of SCORE_TILE rows, dim-major (score.h): the only bytes the TIP scan
 *         reads;
 *   krest the other key dims, row-major;
 *   v     the values, row-major, in the original dim order.
 * Key dims are stored in a permuted order: perm[0..n_dom) are the dominant dims and
 * perm[n_dom..d) the rest, each ascending. Queries are permuted the same way.
 * kdom, krest and v hold elements of the layout's dtype (f32, f16 or bf16, kernels/simd.h):
 * append rounds to it (nearest even; the caller rejects values that would overflow it), and
 * every read converts back to f32 on the fly; the QUEST page bounds and the SPARQ value sums
 * are f32 of the rounded values (made from the stored rows by the first step that reads
 * them, so an append only stores rows). So a shard of any dtype answers as an f32 shard fed the
 * rounded keys and values would (selection scores and sparse attention bit for bit; the
 * dense path's f16/bf16 logits run as sgemm over converted blocks, equal to f32 rounding),
 * with half the bytes at f16/bf16.
 *
 * A step runs in two phases, as it does across ranks (DESIGN.md "One decode step"):
 * shard_score returns each selection unit's local top-B candidates and keeps them;
 * shard_attend then attends over the kept candidates that are not worse than the
 * coordinator's global threshold, returning exact partials (attn.h). A unit is one query
 * head (GQA per-head) or one KV head whose query heads share a token set (GQA shared).
 * Not thread-safe: one caller at a time (a step may use a pool's threads: shard_set_pool). */
#ifndef FASA_WORKER_SHARD_H
#define FASA_WORKER_SHARD_H

#include <stddef.h>
#include <stdint.h>

#include "topk.h"

#define SHARD_CHUNK 4096
/* A chunk's arrays start at SHARD_CHUNK_MIN rows and double as rows arrive, up to
 * SHARD_CHUNK: memory follows the rows held (shard_layer_bytes counts exactly that). */
#define SHARD_CHUNK_MIN 64

/* Methods (fasa-algorithm.md §6 for the baselines):
 *   FASA    dominant-FC partial scores, top-B tokens, exact attention over them;
 *   DENSE   exact attention over every visible token;
 *   ORACLE  exact top-B tokens by the full score;
 *   STREAM  the SHARD_STREAM_SINKS first positions (sinks) and the most recent visible ones.
 *           Scores are position-based: a sink scores +1 (ties: lower position first),
 *           another token -(max_pos - pos), so the global top-B under the usual total order
 *           is the sinks plus the B - SHARD_STREAM_SINKS most recent tokens (with B <= 8:
 *           the B first sinks only). No key is read to score. Distances up to 2^24 are
 *           exact in a float, far beyond any budget, so the window is always exact.
 *   QUEST   pages of SHARD_QUEST_PAGE tokens aligned to absolute positions (page p holds
 *           positions 16p .. 16p + 15); the shard keeps per (layer, KV head, page) the
 *           per-channel min m and max M of the page's keys, updated on append. A page's
 *           score is U = sum_c max(q_c m_c, q_c M_c) per query head (shared GQA: the sum
 *           of U over the group's heads). The selection unit is the page: a candidate is
 *           (U, first position of the page), the step's budget counts pages, and
 *           shard_attend attends over every visible token of each selected page. A page
 *           only partly visible (max_pos inside it) gets its bounds from its visible rows.
 *           Pages must not straddle shards (the engine's placement block is a multiple of
 *           SHARD_QUEST_PAGE).
 *   SPARQ   per query head (per-head GQA only): i1 = the step's sparq_r dims of largest |q_c|
 *           (ties: the lower dim), approximate logits z_j = q[i1].k_j[i1] / tau with
 *           tau = sqrt(head_dim * |q[i1]|_1 / |q|_1) (tau = 1 for q = 0), top-B tokens by z,
 *           exact attention over them. The mean-value reallocation needs global sums, which
 *           shard_sparq_aux gives after shard_score: the softmax normaliser of z over the
 *           visible rows (max and sum of exponentials) and the sum and count of the visible
 *           values; the coordinator combines y = alpha * attn + (1 - alpha) * mean(v) with
 *           alpha = the softmax(z) mass of the selected tokens. The store keeps a running
 *           sum of each layer's values per KV head for this. i1 is found by counting, per
 *           dim, the dims ranking before it (O(head_dim^2) per head and step). This store
 *           keeps keys by rows, so scoring reads (and shard_bytes_read counts) whole key
 *           rows, as oracle does; SparQ's column-major copy would read r dims of each.
 *   FASA_PLUS (per-head GQA only) FASA's scan, scored with every packed dominant dim of the
 *           KV head (the union of its query heads' FCs, the bytes FASA's scan reads
 *           anyway), where the SHARD_PLUS_SINKS first positions and the step's
 *           sparq_r most recent visible positions (max_pos - sparq_r < pos) score
 *           +inf (ties: lower position first), so they are always selected. In phase 2
 *           every head with a selection attends the union of its KV group's selections
 *           (the rows gathered once for the group; shard_set_gather_per_head's reference
 *           gathers that union for each head). The scan also
 *           folds z_j = scale * score_j of every visible row into a softmax normaliser (max
 *           and sum of exponentials). shard_sparq_aux after shard_attend gives per query
 *           head that normaliser less the rows the head attended (z recomputed from their
 *           gathered keys), q_rest . (sum of the visible keys) over the dims not packed, and
 *           the sum of the values of the visible rows not attended; and, for the value
 *           estimate, the not-attended rows' sums of z, z^2, exp(z - max) z and v z, and
 *           the attended rows' exp(z - max) and exp(scale * full score - max). The
 *           coordinator estimates the unselected tokens' softmax mass and mean value from
 *           them (coord/engine.h). The store keeps a running sum of each layer's keys per
 *           KV head for this, and, per KV head, the sum of v kdom^T over its rows (head_dim
 *           x u, in double; append work like the key and value sums: the rows appended
 *           since the last FASA_PLUS step are folded in, in row order, before its scan, and
 *           not counted). The step reads the three sums' f32 roundings (the engine counts
 *           2 head_dim - u + head_dim x u floats per KV head and shard); shard_bytes_read
 *           counts the rows past max_pos taken out of them. */
typedef enum shard_method {
    SHARD_FASA = 0,
    SHARD_DENSE = 1,
    SHARD_ORACLE = 2,
    SHARD_STREAM = 3,
    SHARD_QUEST = 4,
    SHARD_SPARQ = 5,
    SHARD_FASA_PLUS = 6
} shard_method;
#define SHARD_METHOD_LAST SHARD_FASA_PLUS
#define SHARD_PLUS_SINKS 1 /* FASA_PLUS: positions below this are always selected */
/* Doubles per query head that shard_sparq_aux writes: z max, sum of exp(z - max) over the
 * visible rows, their count, then the sum of their values (head_dim), then zeros.
 * FASA_PLUS: z max, the sum of exp(z - max) over the visible rows the head did not
 * attend, q_rest . sum of the visible keys, the sum of the values of the rows not attended
 * (head_dim); then SHARD_PLUS_* below: over the attended rows the sums of exp(z - max) and
 * of exp(scale * full score - max); over the rows not attended the sums of z, z^2 and
 * exp(z - max) z, and of v z (head_dim); and the count of rows the head attended.
 * z = scale * partial score. */
#define SHARD_SPARQ_AUX(head_dim) (9 + 2 * (head_dim))
#define SHARD_PLUS_E1(head_dim) (3 + (head_dim))
#define SHARD_PLUS_E2(head_dim) (4 + (head_dim))
#define SHARD_PLUS_Z1(head_dim) (5 + (head_dim))
#define SHARD_PLUS_Z2(head_dim) (6 + (head_dim))
#define SHARD_PLUS_ZW(head_dim) (7 + (head_dim))
#define SHARD_PLUS_NA(head_dim) (8 + 2 * (head_dim)) /* rows attended (after the v z sums) */
#define SHARD_PLUS_VZ(head_dim) (8 + (head_dim))
#define SHARD_STREAM_SINKS 8
#define SHARD_QUEST_PAGE 16
typedef enum shard_gqa { SHARD_GQA_PER_HEAD = 0, SHARD_GQA_SHARED = 1 } shard_gqa;

/* How a session's keys are packed; derived from its calibration profile. Plain value type. */
typedef struct shard_layout {
    int n_layers, n_heads, n_kv_heads, head_dim;
    int *n_dom;      /* (n_layers, n_kv_heads) dominant dims packed per KV head; 0 = none */
    int *perm;       /* (n_layers, n_kv_heads, head_dim) stored dim order, see above */
    uint8_t *qmask;  /* (n_layers, n_heads, head_dim) 1 where packed dim p < n_dom of the
                        head's KV head belongs to one of the head's own FCs */
    int dtype;       /* fasa_dtype (dtype.h) kdom, krest and v are stored in; 0 = f32 */
    int score_dtype; /* scan_dtype (scan.h) of the scoring store the FASA scan reads: a
                        packed copy of the dominant dims, derived from the stored keys on
                        append (so a restore rebuilds it); SCAN_AUTO (0): kdom itself */
    int tier;        /* SHARD_TIER_RAM (0) or SHARD_TIER_DISK */
    char *tier_dir;  /* SHARD_TIER_DISK: directory of the backing files (owned, freed by
                        shard_layout_cleanup); NULL otherwise */
} shard_layout;

/* Where krest and v live (the CPU analogue of FASA-M). RAM: heap chunks. DISK: kdom, the
 * positions and the QUEST bounds stay in RAM; krest and v of each chunk live in a shared
 * mapping of a file created in tier_dir and unlinked at once (nothing is left behind, even
 * on a crash). Appended rows are handed back to the page cache (madvise DONTNEED), so they
 * stay out of the process's resident set until read: the FASA step reads only the
 * selected rows' pages; dense, oracle, quest and sparq steps read them all. The kernel may
 * keep the written pages in its (reclaimable) page cache. */
#define SHARD_TIER_RAM 0
#define SHARD_TIER_DISK 1

/* One step as the shard sees it. */
typedef struct shard_step {
    int layer;
    shard_method method;
    shard_gqa gqa;
    int budget;      /* B: tokens per unit, >= 1 (QUEST: pages per unit) */
    int32_t max_pos; /* highest visible position (inclusive) */
    float scale;     /* logit scale, 1/sqrt(head_dim) */
    const float *q;  /* (n_heads, head_dim) queries, original dim order */
    int sparq_r;     /* SPARQ: query dims kept per head, 1..head_dim; FASA_PLUS: the most
                        recent visible positions always selected, 0..budget - 1 (its
                        "plus_recent"); 0 otherwise */
} shard_step;

typedef struct shard shard_t;

/* Deep-copies a layout (src borrowed) into freshly allocated arrays: caller owns dst's arrays
 * (free with shard_layout_cleanup). Returns 0, or -1 when out of memory. */
int shard_layout_copy(shard_layout *dst, const shard_layout *src);
/* Frees a layout's arrays and nulls them (the struct is the caller's); NULL is a no-op. */
void shard_layout_cleanup(shard_layout *layout);
/* The layout that packs nothing (no profile yet): every dim in the rest part; dtype f32.
 * Caller owns dst's arrays (free with shard_layout_cleanup). */
int shard_layout_plain(shard_layout *dst, int n_layers, int n_heads, int n_kv_heads, int head_dim);

/* A new empty shard with its own copy of layout (borrowed); NULL when out of memory. Caller
 * owns the shard (free with shard_destroy). */
shard_t *shard_new(const shard_layout *layout);
/* Frees the shard and every row it holds; *shard_p becomes NULL. NULL is a no-op. */
void shard_destroy(shard_t **shard_p);

/* The process's memory reserve, as serving systems preallocate their KV cache: bytes
 * (rounded up to 2 MiB) of anonymous memory mapped and faulted in now, from which the full
 * chunks of every shard in this process are taken before any fresh mapping (growth past it
 * works as without it), and to which a destroyed shard's chunks return, zeroed, while the
 * free memory stays within bytes (past it they are unmapped). Calling it again resizes the
 * free part; 0 unmaps the free memory and ends the reserve (the default: no reserve, chunks
 * of destroyed shards unmapped). What shards hold and account (shard_bytes_held,
 * shard_layer_bytes) does not change with it; the stored bits and every step's output do
 * not either. The pages are faulted in on up to threads threads at once. *seconds_p (if not
 * NULL): the time it took. Returns 0, or -1 when the memory cannot be mapped or the kernel
 * cannot back its pages (MADV_POPULATE_WRITE fails other than EINVAL; the pages are then
 * not touched one by one, which would call the OOM killer; the reserve unchanged).
 * Thread-safe. */
int shard_reserve(size_t bytes, int threads, double *seconds_p);
/* The reserve's size (shard_reserve's bytes, rounded) and the bytes of it free now. */
void shard_reserve_stats(size_t *size_p, size_t *free_p);

/* Appends n rows to a layer: positions pos[n] (ascending, above every row held),
 * k and v (n, n_kv_heads, head_dim). Returns 0, or -1 when out of memory (nothing added). */
int shard_append(shard_t *shard, int layer, int n, const int32_t *pos, const float *k,
                 const float *v);
/* The same with k and v of in_dtype (fasa_dtype: f32, f16 or bf16) elements. The stored
 * bits equal those of shard_append fed the values widened to f32 (so rows whose dtype is
 * the session's are copied as they are, without a round trip through f32). -1 also for an
 * unknown in_dtype (nothing added). */
int shard_append_dt(shard_t *shard, int layer, int n, const int32_t *pos, int in_dtype,
                    const void *k, const void *v);
/* A hint: appends to come bring layer to about rows rows (a bulk load knows its count), so
 * its chunks are made at their final size at once instead of grown and copied. The stored
 * rows are the same; the capacity is that of rows rows (0: no hint). */
void shard_expect_rows(shard_t *shard, int layer, int rows);
/* Appends that can be taken back. After shard_txn_begin(shard, txn) (txn != 0) the first
 * append to each layer saves what the layer holds; shard_txn_undo(shard, txn) puts every
 * layer appended to since back as it was, bit for bit (rows, key tiles and their padding,
 * page bounds, sums; the capacity grown stays allocated). shard_txn_begin(shard, 0) ends
 * the transaction (appends save nothing). A mark costs a copy of 2 sums and one page's
 * bounds per layer touched. */
void shard_txn_begin(shard_t *shard, uint32_t txn);
void shard_txn_undo(shard_t *shard, uint32_t txn);
/* The reference of shard_append (one row at a time, every row converted per use, the
 * page bounds by scalar compares), kept for tests: the same store, bit for bit. */
int shard_append_naive(shard_t *shard, int layer, int n, const int32_t *pos, const float *k,
                       const float *v);
/* 1 when two shards of the same layout hold bitwise the same store: rows, positions, key
 * tiles, krest, values, scoring copy, QUEST page bounds and the SPARQ/FASA_PLUS sums (both
 * brought up to date first: appends leave the bounds and sums to the first QUEST, SPARQ or
 * FASA_PLUS step, which computes them from the stored rows in row order, the same bits as
 * the reference's per-append updates). */
int shard_store_equal(shard_t *a, shard_t *b);

/* Runs the shard's steps (shard_score, shard_attend) on a thread pool (pool.h), the KV
 * groups as tasks, each thread with scratch of its own: outputs are the same bits for any
 * pool. The pool is borrowed and must outlive the shard's steps; NULL (the default) is one
 * thread. Appends, reads and snapshots stay on the calling thread. */
typedef struct fasa_pool fasa_pool_t;
void shard_set_pool(shard_t *shard, fasa_pool_t *pool);

/* Per-head GQA's phase 2 gathers the union of each KV group's selections once (each row
 * read once however many of its heads select it). on != 0 makes it gather head by head
 * instead: the reference the union is tested against (the same output bits, more bytes
 * read). Default 0. */
void shard_set_gather_per_head(shard_t *shard, int on);

/* The shard's key layout (borrowed, valid while the shard lives). */
const shard_layout *shard_layout_of(const shard_t *shard);

/* Rows held for a layer, and how many of them are at or below max_pos. */
int shard_rows(const shard_t *shard, int layer);
int shard_visible(const shard_t *shard, int layer, int32_t max_pos);

/* Selection units of a step: n_heads for per-head GQA, n_kv_heads for shared. */
int shard_units(const shard_t *shard, shard_gqa gqa);

/* Phase 1 (every method but dense): for each unit u, the local best min(budget, visible) candidates
 * are written to cands[u * budget ..], best first, and their count to n_cands[u]. They are
 * also kept for shard_attend. Returns 0, or -1 when out of memory. */
int shard_score(shard_t *shard, const shard_step *step, topk_cand *cands, int *n_cands);

/* Phase 2: exact partials per query head: m[n_heads], l[n_heads], o[n_heads][head_dim]
 * (unnormalised, original dim order). For dense every visible row counts; otherwise the
 * rows kept by the last shard_score of this step that are not worse than thr[u] (the
 * global k-th best of unit u; a unit with have_thr[u] = 0 selects nothing here).
 * Returns 0, or -1 when out of memory. */
int shard_attend(shard_t *shard, const shard_step *step, const topk_cand *thr,
                 const uint8_t *have_thr, float *m, double *l, double *o);

/* After shard_score of a SPARQ step (or shard_attend of a FASA_PLUS step): aux (n_heads,
 * SHARD_SPARQ_AUX(head_dim)) for the visible rows of this shard (an empty shard gives max
 * -inf and zero sums). */
void shard_sparq_aux(const shard_t *shard, const shard_step *step, double *aux);

/* Reads rows row0 .. row0 + n - 1 of a layer back as appended: pos[n] their positions,
 * k and v (n, n_kv_heads, head_dim) as f32 in the original dim order (each of pos, k, v may
 * be NULL to skip it). The one reader of stored rows for snapshots (shard_snap.h): a
 * storage dtype other than f32 converts here. Returns 0, or -1 when the range is out of
 * the rows held. */
int shard_read_rows(const shard_t *shard, int layer, int row0, int n, int32_t *pos, float *k,
                    float *v);

/* Bytes the last shard_score + shard_attend read from the KV store (for stats); for QUEST
 * the page bounds read count too. */
int64_t shard_bytes_read(const shard_t *shard);
/* What shards hold (for Stats): sessions with a shard here, tokens (rows of layer 0) and
 * rows (all layers) held, the bytes of those rows by part (kdom the dominant key dims, krest
 * the other key dims, v the values; stored elements, so kdom + krest = v), and the bytes
 * allocated for them (shard_bytes_held). The in-process transport reports it as
 * fasa_shard_stats and an MPI worker sends it as its STATS reply. */
typedef struct shard_holdings {
    int64_t sessions, tokens, rows;
    int64_t kdom_bytes, krest_bytes, v_bytes;
    int64_t alloc_bytes;
    int64_t rss_bytes; /* a worker's STATS reply: its resident memory (transport shard_rss);
                          0 everywhere else, so holdings compare equal across transports */
} shard_holdings;

/* This process's resident memory in bytes (/proc/self/statm), 0 when unknown. */
int64_t fasa_rss_bytes(void);

/* Adds what one session's shard holds to *h (one more session). */
void shard_holdings_add(shard_holdings *h, const shard_t *shard);

/* Bytes held in the KV store in RAM (chunks, position tables and the QUEST page bounds;
 * with SHARD_TIER_DISK not the mapped krest and v, which shard_bytes_mapped counts). */
size_t shard_bytes_held(const shard_t *shard);
/* What layer `layer`'s store allocates in RAM once it holds `rows` rows on `pages` distinct
 * QUEST pages (pages of SHARD_QUEST_PAGE aligned positions); shard_bytes_held is its sum over
 * the layers. It reads only the layout's geometry, dtype, tier and n_dom, so the coordinator
 * can account a shard's memory before it sends rows there (the engine's --memory-limit). */
size_t shard_layer_bytes(const shard_layout *layout, int layer, int64_t rows, int64_t pages);
/* The KV store bytes s has allocated, counted from its arrays' actual capacities (chunks,
 * position table, page bounds): what shard_bytes_held computes from the rows alone. */
size_t shard_bytes_allocated(const shard_t *s);
/* Bytes of file-backed mappings (SHARD_TIER_DISK), 0 in RAM. */
size_t shard_bytes_mapped(const shard_t *shard);
/* Bytes of the rows held, all layers, by part (the layout above): kdom (the dominant key
 * dims), krest (the other key dims) and v (the values). They count stored elements, not
 * chunk capacity, so kdom + krest = v = rows x n_kv_heads x head_dim x the dtype's size. */
void shard_bytes_by_kind(const shard_t *shard, int64_t *kdom_p, int64_t *krest_p, int64_t *v_p);

#endif

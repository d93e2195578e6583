/* Shard store and the two local phases of a step. See shard.h for the layout. */
#define _DEFAULT_SOURCE /* madvise */
#include "shard.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "attn.h"
#include "dense.h"
#include "phase.h"
#include "pool.h"
#include "scan.h"
#include "score.h"
#include "simd.h"

/* Elements of the layout's dtype (see the esz helpers below). */
typedef struct kv_chunk {
    void *kdom;  /* (SHARD_CHUNK / SCORE_TILE, n_dom, SCORE_TILE) */
    void *krest; /* (SHARD_CHUNK, head_dim - n_dom) */
    void *v;     /* (SHARD_CHUNK, head_dim) */
    /* The scoring store when it is not kdom itself (s_sep): SHARD_CHUNK rows of the
     * dominant dims in the layout's score dtype (scan.h), and for int8 one scale per row. */
    void *ksc;
    float *kscale; /* (SHARD_CHUNK) */
    /* SHARD_TIER_DISK, in the chunk's first KV head only: the one mapping that holds every
     * KV head's krest and v, and its size. NULL in RAM. */
    void *map;
    size_t map_bytes;
    int cap;    /* rows allocated in kdom, krest and v (s_chunk_cap): a chunk grows as it fills */
    int pooled; /* its arrays live in the shard's arena (s_chunk_full): not freed one by one */
} kv_chunk;

/* A shard's arena of full chunks: 2 MiB-aligned anonymous mappings asked for transparent
 * huge pages, carved front to back and unmapped with the shard. On a machine where a fresh
 * 4 KiB page costs microseconds to fault in, that is most of what storing a row costs. */
typedef struct s_arena {
    struct s_arena *next;
    size_t size, used; /* bytes mapped (the header included) and handed out */
} s_arena;
#define SHARD_ARENA_BYTES ((size_t)32 << 20)
#define SHARD_HUGE_PAGE ((size_t)2 << 20)
static void s_arena_release(s_arena *a);

typedef struct layer_store {
    int n_rows;        /* rows held */
    int n_chunks;      /* chunks allocated */
    int cap_chunks;    /* capacity of chunks */
    kv_chunk **chunks; /* (cap_chunks) each an array of n_kv_heads */
    int32_t *pos;      /* (pos_cap) position of each row, ascending */
    int pos_cap;
    /* QUEST page bounds, one entry per page (SHARD_QUEST_PAGE aligned positions) with a
     * row here, in row order. */
    int n_pages, page_cap;
    int32_t *page_pos; /* (page_cap) first position of the page (a multiple of the page) */
    int *page_row0;    /* (page_cap) first row of the page here */
    float *pbound;     /* (page_cap, n_kv_heads, 2, head_dim) min then max, original dims */
    double *vsum;      /* (n_kv_heads, head_dim) SPARQ: sum of every row's value */
    double *ksum;      /* (n_kv_heads, head_dim) FASA_PLUS: sum of every row's key */
    /* FASA_PLUS: per KV head g the sum of v kdom^T (head_dim, n_dom[g]; packed order) over
     * its first vk_rows[g] rows, at offset head_dim * (n_dom of the KV heads before g), in
     * double, and what a step reads: its f32 rounding vkf (same layout) and sumf (n_kv_heads,
     * 2, head_dim), the f32 roundings of vsum then ksum at those rows. Append work, like the
     * sums: brought up to the rows by s_plus_catch_up before a plus step's scan (the same
     * bits as if every append had folded its rows), allocated by the first plus step. */
    double *vk;
    float *vkf, *sumf;
    int *vk_rows; /* (n_kv_heads) */
    /* The page bounds and the two sums are brought up to date lazily (s_sums_catch_up, by
     * the first step that reads them): they hold rows 0 .. sums_rows - 1, the last of them
     * on page sums_page. Appends only store rows and list their pages. */
    int sums_rows, sums_page;
    /* shard_txn_begin: the layer as it was before the transaction's first append to it
     * (mark_txn): its rows, pages, the last page's bounds and the two sums. */
    uint32_t mark_txn;
    int mark_rows, mark_pages, mark_sums_rows, mark_sums_page;
    float *mark_bound; /* (n_kv_heads, 2, head_dim) */
    double *mark_sum;  /* (2, n_kv_heads, head_dim) vsum then ksum */
    int expect_rows;   /* shard_expect_rows: chunks are sized for this many rows at once */
} layer_store;

struct shard {
    shard_layout lay;
    uint32_t txn;        /* shard_txn_begin's transaction, 0: none */
    s_arena *arena;      /* newest first */
    layer_store *layers; /* (n_layers) */
    /* Per-step state and grow-only scratch; the hot path allocates only on growth. */
    topk_cand *kept; /* (units, kept_budget) candidates of the last shard_score */
    int *n_kept;     /* (units) */
    int kept_budget;
    size_t kept_cap;
    topk_cand *acc_buf; /* (n_q, 2 * budget + SHARD_CHUNK) running top-k buffers */
    size_t acc_cap;
    float *gather; /* (2 * budget * head_dim) gathered K and V rows, permuted K order */
    size_t gather_cap;
    double *aux; /* (n_heads, SHARD_SPARQ_AUX(head_dim)) of the last SPARQ score */
    size_t aux_cap;
    double *plus_aux; /* the same for the last FASA_PLUS attend (aux less its rows) */
    size_t plus_aux_cap;
    float *conv; /* f16/bf16: (2, ATTN_BLOCK, head_dim) rows converted to f32 for a kernel */
    /* On the heap, not the stack: with the largest geometry (1024 query heads on one KV
     * head of 1024 dims) each is 2 to 4 MiB. */
    float *qf;       /* (n_heads / n_kv_heads, head_dim) a group's queries, permuted */
    float *rowf;     /* (n_kv_heads, head_dim) an appended key row rounded to the dtype */
    uint16_t *rowh;  /* (n_kv_heads, head_dim) the same in f16/bf16 (those dtypes only) */
    uint16_t *stage; /* f16/bf16: (2, rows, head_dim) gathered K and V rows before conversion */
    size_t stage_cap;
    int64_t bytes_read_last; /* KV bytes read by the last score + attend */
    float *dscr;             /* (DENSE_SCRATCH(group, head_dim)) the dense kernel's scratch */
    size_t dscr_cap;
    /* Threads (pool.h): a step runs its KV groups as tasks of the pool; a task on thread t
     * >= 1 works in views[t - 1], a shallow copy of this shard with scratch of its own that
     * shares the store and the per-step results (kept, n_kept, aux). Thread 0 uses the
     * shard itself. A view owns only its grow-only scratch and bytes_read_last (freed by
     * s_view_destroy); everything else it borrows. */
    fasa_pool_t *pool; /* borrowed; NULL: one thread */
    shard_t **views;   /* (n_views) */
    int n_views;
    scan_q sq; /* the fused scan's prepared queries */
    /* A FASA scan split into row parts (s_score_parts): each part's best budget per unit,
     * (units, parts, budget), and their counts (units, parts). Grow-only, shard only. */
    topk_cand *part_buf;
    size_t part_cap;
    int *part_n;
    size_t part_n_cap;
    /* Phase 2 per KV group: per row a stamp (the group being gathered) and its slot in the
     * union; per head its members (slots). Grow-only. */
    uint32_t *stamp;
    int *slot;
    size_t stamp_cap; /* rows */
    uint32_t stamp_gen;
    int *members; /* (group, budget) */
    int *urows;   /* (group * budget) rows of the union */
    int *slot_id; /* (group * budget) 0, 1, ...: FASA_PLUS heads attend every union slot */
    size_t members_cap;
    int gather_per_head; /* shard_set_gather_per_head: the reference phase 2, head by head */
    float scores[];      /* flexible tail: see shard_new */
};

/* The per-step query scratch that lives in the flexible tail of struct shard:
 * scores (group, SHARD_CHUNK), qd (group, head_dim), qr (group, head_dim),
 * logits (group, max(ATTN_BLOCK, SHARD_CHUNK)). */
static size_t s_tail_floats(const shard_layout *lay)
{
    const int g = lay->n_heads / lay->n_kv_heads;
    return (size_t)g * SHARD_CHUNK + 2 * (size_t)g * lay->head_dim + (size_t)g * SHARD_CHUNK;
}

static void *s_xrealloc(void *p, size_t bytes)
{
    return realloc(p, bytes ? bytes : 1);
}

/* Bytes per stored element, and element e of a stored array. */
static size_t s_esz(const shard_t *s)
{
    return fasa_dtype_size(s->lay.dtype);
}

static void *s_at(const shard_t *s, const void *base, size_t e)
{
    return (char *)base + e * s_esz(s);
}

/* One stored element as f32 (the gather of kdom lanes). */
static float s_get(int dtype, const void *base, size_t e)
{
    if (dtype == FASA_DTYPE_F32) return ((const float *)base)[e];
    const uint16_t h = ((const uint16_t *)base)[e];
    return dtype == FASA_DTYPE_F16 ? fasa_f16_to_f32(h) : fasa_bf16_to_f32(h);
}

/* n rows of ld elements from stored base + e0 as f32: the stored f32 rows themselves, or
 * a conversion into buf. */
static const float *s_rows_f32(const shard_t *s, const void *base, size_t e0, size_t n_elems,
                               float *buf)
{
    if (s->lay.dtype == FASA_DTYPE_F32) return (const float *)base + e0;
    dtype_to_f32(SIMD_AUTO, s->lay.dtype, n_elems, s_at(s, base, e0), buf);
    return buf;
}

/* The score dtype the FASA scan reads, and whether its store is a copy next to kdom. */
static int s_sd(const shard_layout *lay)
{
    return scan_dtype_effective(lay->score_dtype, lay->dtype);
}

static int s_sep(const shard_layout *lay)
{
    return s_sd(lay) != scan_dtype_effective(SCAN_AUTO, lay->dtype);
}

/* Bytes of the scoring store copy of rows rows (a multiple of SCORE_TILE) of n_dom dims,
 * tiles and (int8) row scales; 0 without a copy. */
static size_t s_ksc_bytes(const shard_layout *lay, int n_dom, size_t rows)
{
    if (!s_sep(lay)) return 0;
    return rows / SCORE_TILE * scan_tile_bytes(s_sd(lay), n_dom ? n_dom : 1) +
           (s_sd(lay) == SCAN_I8 ? rows * sizeof(float) : 0);
}

void shard_layout_cleanup(shard_layout *lay)
{
    if (!lay) return;
    free(lay->n_dom);
    free(lay->perm);
    free(lay->qmask);
    free(lay->tier_dir);
    lay->tier_dir = NULL;
    lay->n_dom = NULL;
    lay->perm = NULL;
    lay->qmask = NULL;
}

static int s_layout_alloc(shard_layout *dst, int n_layers, int n_heads, int n_kv_heads,
                          int head_dim)
{
    dst->n_layers = n_layers;
    dst->n_heads = n_heads;
    dst->n_kv_heads = n_kv_heads;
    dst->head_dim = head_dim;
    dst->dtype = FASA_DTYPE_F32;
    dst->score_dtype = SCAN_AUTO;
    dst->tier = SHARD_TIER_RAM;
    dst->tier_dir = NULL;
    dst->n_dom = calloc((size_t)n_layers * n_kv_heads, sizeof(int));
    dst->perm = calloc((size_t)n_layers * n_kv_heads * head_dim, sizeof(int));
    dst->qmask = calloc((size_t)n_layers * n_heads * head_dim, 1);
    if (!dst->n_dom || !dst->perm || !dst->qmask) {
        shard_layout_cleanup(dst);
        return -1;
    }
    return 0;
}

int shard_layout_copy(shard_layout *dst, const shard_layout *src)
{
    if (s_layout_alloc(dst, src->n_layers, src->n_heads, src->n_kv_heads, src->head_dim)) return -1;
    const size_t lk = (size_t)src->n_layers * src->n_kv_heads;
    memcpy(dst->n_dom, src->n_dom, lk * sizeof(int));
    memcpy(dst->perm, src->perm, lk * src->head_dim * sizeof(int));
    memcpy(dst->qmask, src->qmask, (size_t)src->n_layers * src->n_heads * src->head_dim);
    dst->dtype = src->dtype;
    dst->score_dtype = src->score_dtype;
    dst->tier = src->tier;
    if (src->tier_dir && !(dst->tier_dir = strdup(src->tier_dir))) {
        shard_layout_cleanup(dst);
        return -1;
    }
    return 0;
}

int shard_layout_plain(shard_layout *dst, int n_layers, int n_heads, int n_kv_heads, int head_dim)
{
    if (s_layout_alloc(dst, n_layers, n_heads, n_kv_heads, head_dim)) return -1;
    for (size_t i = 0; i < (size_t)n_layers * n_kv_heads; i++)
        for (int c = 0; c < head_dim; c++) dst->perm[i * head_dim + c] = c;
    return 0;
}

shard_t *shard_new(const shard_layout *layout)
{
    if (!fasa_dtype_size(layout->dtype) || !scan_dtype_valid(layout->score_dtype)) return NULL;
    if (layout->tier == SHARD_TIER_DISK ? !layout->tier_dir : layout->tier != SHARD_TIER_RAM)
        return NULL;
    shard_t *s = calloc(1, sizeof(*s) + s_tail_floats(layout) * sizeof(float));
    if (!s) return NULL;
    if (shard_layout_copy(&s->lay, layout)) goto err_free;
    s->layers = calloc((size_t)layout->n_layers, sizeof(*s->layers));
    s->n_kept = calloc((size_t)layout->n_heads, sizeof(int));
    if (layout->dtype != FASA_DTYPE_F32)
        s->conv = malloc((size_t)2 * ATTN_BLOCK * layout->head_dim * sizeof(float));
    const size_t gd = (size_t)(layout->n_heads / layout->n_kv_heads) * layout->head_dim;
    const size_t kd = (size_t)layout->n_kv_heads * layout->head_dim;
    s->qf = malloc(gd * sizeof(float));
    s->rowf = malloc(kd * sizeof(float));
    if (layout->dtype != FASA_DTYPE_F32) s->rowh = malloc(kd * sizeof(uint16_t));
    if (!s->layers || !s->n_kept || !s->qf || !s->rowf ||
        (layout->dtype != FASA_DTYPE_F32 && (!s->conv || !s->rowh)))
        goto err_layout;
    return s;
err_layout:
    free(s->layers);
    free(s->n_kept);
    free(s->conv);
    free(s->qf);
    free(s->rowf);
    free(s->rowh);
    shard_layout_cleanup(&s->lay);
err_free:
    free(s);
    return NULL;
}

/* Frees a view: its own scratch only. */
static void s_view_destroy(shard_t *v)
{
    free(v->acc_buf);
    free(v->gather);
    free(v->conv);
    free(v->qf);
    free(v->stage);
    free(v->dscr);
    free(v->stamp);
    free(v->slot);
    free(v->members);
    free(v->urows);
    free(v->slot_id);
    scan_q_free(&v->sq);
    free(v);
}

void shard_destroy(shard_t **shard_p)
{
    shard_t *s = shard_p ? *shard_p : NULL;
    if (!s) return;
    for (int i = 0; i < s->n_views; i++) s_view_destroy(s->views[i]);
    free(s->views);
    for (int l = 0; l < s->lay.n_layers; l++) {
        layer_store *ls = &s->layers[l];
        for (int c = 0; c < ls->n_chunks; c++) {
            for (int g = 0; g < s->lay.n_kv_heads && !ls->chunks[c][0].pooled; g++) {
                free(ls->chunks[c][g].kdom);
                free(ls->chunks[c][g].ksc);
                free(ls->chunks[c][g].kscale);
                if (ls->chunks[c][0].map) continue;
                free(ls->chunks[c][g].krest);
                free(ls->chunks[c][g].v);
            }
            if (ls->chunks[c][0].map) munmap(ls->chunks[c][0].map, ls->chunks[c][0].map_bytes);
            free(ls->chunks[c]);
        }
        free(ls->chunks);
        free(ls->pos);
        free(ls->page_pos);
        free(ls->page_row0);
        free(ls->pbound);
        free(ls->vsum);
        free(ls->ksum);
        free(ls->vk);
        free(ls->vkf);
        free(ls->sumf);
        free(ls->vk_rows);
        free(ls->mark_bound);
        free(ls->mark_sum);
    }
    while (s->arena) {
        s_arena *next = s->arena->next;
        s_arena_release(s->arena);
        s->arena = next;
    }
    free(s->layers);
    free(s->kept);
    free(s->n_kept);
    free(s->part_buf);
    free(s->part_n);
    free(s->acc_buf);
    free(s->gather);
    free(s->aux);
    free(s->plus_aux);
    free(s->conv);
    free(s->qf);
    free(s->rowf);
    free(s->rowh);
    free(s->stage);
    free(s->dscr);
    free(s->stamp);
    free(s->slot);
    free(s->members);
    free(s->urows);
    free(s->slot_id);
    scan_q_free(&s->sq);
    shard_layout_cleanup(&s->lay);
    free(s);
    *shard_p = NULL;
}

/* SHARD_TIER_DISK: a zero-filled shared mapping of bytes backed by a fresh file in dir,
 * unlinked at once (the mapping keeps it alive). NULL on failure. */
static void *s_map_file(const char *dir, size_t bytes)
{
    char path[4096];
    if (snprintf(path, sizeof(path), "%s/fasa-kv-XXXXXX", dir) >= (int)sizeof(path)) return NULL;
    const int fd = mkstemp(path);
    if (fd < 0) return NULL;
    unlink(path);
    void *p = ftruncate(fd, (off_t)bytes)
                  ? MAP_FAILED
                  : mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    return p == MAP_FAILED ? NULL : p;
}

/* The rows a chunk holding rows rows allocates: SHARD_CHUNK_MIN doubled until they fit, at
 * most SHARD_CHUNK (a multiple of SCORE_TILE, so partial tiles stay inside). So a small
 * session pays for what it holds, not for a whole chunk. */
static int s_chunk_cap(int64_t rows)
{
    int cap = SHARD_CHUNK_MIN;
    while (cap < rows && cap < SHARD_CHUNK) cap *= 2;
    return cap < SHARD_CHUNK ? cap : SHARD_CHUNK;
}

/* Grows one KV head's array of cap rows of width elements to new_cap rows; the new rows are
 * zeroed when zero (calloc's promise: padding rows of a partial tile score as zeros). */
static int s_grow_rows(void **p, size_t width, size_t esz, int cap, int new_cap, int zero)
{
    void *q = realloc(*p, (size_t)new_cap * width * esz);
    if (!q) return -1;
    if (zero)
        memset((char *)q + (size_t)cap * width * esz, 0, (size_t)(new_cap - cap) * width * esz);
    *p = q;
    return 0;
}

/* Grows a chunk's RAM arrays to new_cap rows (a disk-tier chunk's krest and v are mapped
 * whole from the start). On failure the chunk keeps its rows and its cap. */
static int s_chunk_grow(const shard_layout *lay, int layer, kv_chunk *ch, int new_cap)
{
    const int d = lay->head_dim, hkv = lay->n_kv_heads, cap = ch[0].cap;
    const size_t esz = fasa_dtype_size(lay->dtype);
    if (new_cap <= cap) return 0;
    for (int g = 0; g < hkv; g++) {
        const int u = lay->n_dom[layer * hkv + g];
        /* kdom tiles are laid out tile after tile, so growing keeps every tile in place. */
        if (s_grow_rows(&ch[g].kdom, (size_t)(u ? u : 1), esz, cap, new_cap, 1)) return -1;
        /* The scoring store's copy: tile after tile too, and one scale per row (int8). */
        if (ch[g].ksc && s_grow_rows(&ch[g].ksc, scan_tile_bytes(s_sd(lay), u ? u : 1), 1,
                                     cap / SCORE_TILE, new_cap / SCORE_TILE, 1))
            return -1;
        if (ch[g].kscale && s_grow_rows((void **)&ch[g].kscale, 1, sizeof(float), cap, new_cap, 1))
            return -1;
        if (ch[0].map) continue;
        if (s_grow_rows(&ch[g].krest, (size_t)(d - u ? d - u : 1), esz, cap, new_cap, 1) ||
            s_grow_rows(&ch[g].v, (size_t)d, esz, cap, new_cap, 0))
            return -1;
    }
    for (int g = 0; g < hkv; g++) ch[g].cap = new_cap;
    return 0;
}

static kv_chunk *s_chunk_new(const shard_layout *lay, int layer, int cap)
{
    const int d = lay->head_dim, hkv = lay->n_kv_heads;
    const size_t esz = fasa_dtype_size(lay->dtype);
    kv_chunk *ch = calloc((size_t)hkv, sizeof(*ch));
    if (!ch) return NULL;
    if (lay->tier == SHARD_TIER_DISK) {
        /* krest and v of every KV head in one mapping: hkv x (krest, v), each page-aligned. */
        const size_t pg = (size_t)sysconf(_SC_PAGESIZE);
        size_t off[2 * 1024 + 1], total = 0; /* n_kv_heads <= 1024 (engine limits) */
        if (hkv > 1024) goto fail;
        for (int g = 0; g < hkv; g++) {
            const int u = lay->n_dom[layer * hkv + g];
            off[2 * g] = total;
            total += ((size_t)SHARD_CHUNK * (d - u ? d - u : 1) * esz + pg - 1) / pg * pg;
            off[2 * g + 1] = total;
            total += ((size_t)SHARD_CHUNK * d * esz + pg - 1) / pg * pg;
        }
        char *m = s_map_file(lay->tier_dir, total);
        if (!m) goto fail;
        ch[0].map = m;
        ch[0].map_bytes = total;
        for (int g = 0; g < hkv; g++) {
            ch[g].krest = m + off[2 * g];
            ch[g].v = m + off[2 * g + 1];
        }
    }
    for (int g = 0; g < hkv; g++) {
        const int u = lay->n_dom[layer * hkv + g];
        ch[g].cap = cap;
        /* calloc: padding rows of a partial tile must score as zeros, not garbage (all-zero
         * bits are +0 in every dtype). */
        ch[g].kdom = calloc((size_t)cap * (u ? u : 1), esz);
        if (!ch[0].map) {
            ch[g].krest = calloc((size_t)cap * (d - u ? d - u : 1), esz);
            ch[g].v = malloc((size_t)cap * d * esz);
        }
        int sc_ok = 1;
        if (s_sep(lay)) {
            ch[g].ksc = calloc((size_t)cap / SCORE_TILE, scan_tile_bytes(s_sd(lay), u ? u : 1));
            if (s_sd(lay) == SCAN_I8) ch[g].kscale = calloc((size_t)cap, sizeof(float));
            sc_ok = ch[g].ksc && (s_sd(lay) != SCAN_I8 || ch[g].kscale);
        }
        if (!ch[g].kdom || !ch[g].krest || !ch[g].v || !sc_ok) {
            for (int i = 0; i <= g; i++) {
                free(ch[i].kdom);
                free(ch[i].ksc);
                free(ch[i].kscale);
                if (ch[0].map) continue;
                free(ch[i].krest);
                free(ch[i].v);
            }
            if (ch[0].map) munmap(ch[0].map, ch[0].map_bytes);
            goto fail;
        }
    }
    return ch;
fail:
    free(ch);
    return NULL;
}

/* The process's reserve (shard_reserve): free ranges of zeroed, already faulted anonymous
 * memory, 2 MiB-aligned and sorted by address, that arenas are taken from before fresh
 * mappings; a destroyed shard's arenas come back (zeroed again) while the free ranges stay
 * within the reserve's size, and are unmapped past it. */
typedef struct s_range {
    char *p;
    size_t size;
} s_range;
static struct {
    pthread_mutex_t mu;
    size_t cap;  /* shard_reserve's bytes: free memory kept at most (0: no reserve) */
    size_t free; /* bytes in r */
    int n, n_cap;
    s_range *r; /* (n_cap) */
} s_res = {.mu = PTHREAD_MUTEX_INITIALIZER};

/* A fresh 2 MiB-aligned anonymous mapping of size bytes (a multiple of 2 MiB) asked for
 * huge pages; NULL when out of memory. */
static char *s_map_aligned(size_t size)
{
    char *m = mmap(NULL, size + SHARD_HUGE_PAGE, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) return NULL;
    char *b = (char *)(((uintptr_t)m + SHARD_HUGE_PAGE - 1) & ~(SHARD_HUGE_PAGE - 1));
    if (b > m) munmap(m, (size_t)(b - m));
    if (b + size < m + size + SHARD_HUGE_PAGE)
        munmap(b + size, (size_t)(m + size + SHARD_HUGE_PAGE - (b + size)));
    madvise(b, size, MADV_HUGEPAGE);
    return b;
}

/* Takes size bytes from the front of a free range that holds them, or when none does as many
 * whole min blocks as the largest range that holds min has (*got_p: the bytes taken); NULL: no
 * range holds min. So a reserve smaller than an arena still serves one. Called with s_res.mu held.
 */
static char *s_res_take(size_t size, size_t min, size_t *got_p)
{
    int best = -1; /* a range that holds size, else the largest that holds min */
    for (int i = 0; i < s_res.n && (best < 0 || s_res.r[best].size < size); i++)
        if (s_res.r[i].size >= min && (best < 0 || s_res.r[i].size > s_res.r[best].size)) best = i;
    if (best < 0) return NULL;
    if (s_res.r[best].size < size) size = s_res.r[best].size / min * min; /* whole blocks */
    *got_p = size;
    s_range *r = &s_res.r[best];
    char *p = r->p;
    r->p += size;
    r->size -= size;
    s_res.free -= size;
    if (!r->size) {
        memmove(r, r + 1, (size_t)(s_res.n - best - 1) * sizeof(*r));
        s_res.n--;
    }
    return p;
}

/* Puts a zeroed range back among the free ones, merged with its neighbours; -1 (nothing
 * changed) when the list cannot grow. Called with s_res.mu held. */
static int s_res_put(char *p, size_t size)
{
    int i = 0;
    while (i < s_res.n && s_res.r[i].p < p) i++;
    const int left = i > 0 && s_res.r[i - 1].p + s_res.r[i - 1].size == p;
    const int right = i < s_res.n && p + size == s_res.r[i].p;
    if (left && right) {
        s_res.r[i - 1].size += size + s_res.r[i].size;
        memmove(s_res.r + i, s_res.r + i + 1, (size_t)(s_res.n - i - 1) * sizeof(*s_res.r));
        s_res.n--;
    } else if (left) {
        s_res.r[i - 1].size += size;
    } else if (right) {
        s_res.r[i].p = p;
        s_res.r[i].size += size;
    } else {
        if (s_res.n == s_res.n_cap) {
            const int cap = s_res.n_cap ? 2 * s_res.n_cap : 64;
            s_range *r = realloc(s_res.r, (size_t)cap * sizeof(*r));
            if (!r) return -1;
            s_res.r = r;
            s_res.n_cap = cap;
        }
        memmove(s_res.r + i + 1, s_res.r + i, (size_t)(s_res.n - i) * sizeof(*s_res.r));
        s_res.r[i] = (s_range){p, size};
        s_res.n++;
    }
    s_res.free += size;
    return 0;
}

/* A destroyed shard's arena: back to the reserve (its used bytes zeroed) while the free
 * ranges stay within the reserve's size, else unmapped. */
static void s_arena_release(s_arena *a)
{
    const size_t size = a->size, used = a->used;
    pthread_mutex_lock(&s_res.mu);
    const int keep = s_res.cap && s_res.free + size <= s_res.cap;
    pthread_mutex_unlock(&s_res.mu);
    if (!keep) {
        munmap(a, size);
        return;
    }
    memset(a, 0, used); /* beyond used the arena was never written: still zero */
    pthread_mutex_lock(&s_res.mu);
    const int put = s_res.free + size <= s_res.cap && s_res_put((char *)a, size) == 0;
    pthread_mutex_unlock(&s_res.mu);
    if (!put) munmap(a, size);
}

/* Faults in bytes at p for writing: MADV_POPULATE_WRITE where the kernel has it (5.14+),
 * else (EINVAL: the kernel lacks the advice) a write to every page. -1: the kernel could not
 * back the pages (ENOMEM, EFAULT...): touching them would only call the OOM killer. */
static int s_prefault(char *p, size_t bytes)
{
#ifdef MADV_POPULATE_WRITE
    if (madvise(p, bytes, MADV_POPULATE_WRITE) == 0) return 0;
    if (errno != EINVAL) return -1;
#endif
    const size_t pg = (size_t)sysconf(_SC_PAGESIZE);
    for (size_t o = 0; o < bytes; o += pg) ((volatile char *)p)[o] = 0;
    return 0;
}

typedef struct s_fault_job {
    char *p;
    size_t bytes;
    int rc;
} s_fault_job;

static void *s_prefault_main(void *arg)
{
    s_fault_job *j = arg;
    j->rc = s_prefault(j->p, j->bytes);
    return NULL;
}

/* s_prefault on up to threads threads at once, each a 2 MiB-aligned slice (a node's cores
 * fault pages in parallel; the calling thread takes the first slice). */
static int s_prefault_threads(char *p, size_t bytes, int threads)
{
    enum { MAX_T = 256 };
    if (threads > MAX_T) threads = MAX_T;
    const size_t slices = bytes / SHARD_HUGE_PAGE;
    if (threads > (int)slices) threads = (int)slices;
    if (threads <= 1) return s_prefault(p, bytes);
    s_fault_job job[MAX_T];
    pthread_t tid[MAX_T];
    int started[MAX_T] = {0};
    size_t off = 0;
    for (int t = 0; t < threads; t++) {
        const size_t n = (slices * (size_t)(t + 1) / (size_t)threads) * SHARD_HUGE_PAGE - off;
        job[t] = (s_fault_job){p + off, t == threads - 1 ? bytes - off : n, 0};
        off += job[t].bytes;
    }
    for (int t = 1; t < threads; t++)
        started[t] = pthread_create(&tid[t], NULL, s_prefault_main, &job[t]) == 0;
    int rc = s_prefault(job[0].p, job[0].bytes);
    for (int t = 1; t < threads; t++) {
        if (started[t])
            pthread_join(tid[t], NULL);
        else
            job[t].rc = s_prefault(job[t].p, job[t].bytes); /* no thread: this one does it */
        if (job[t].rc) rc = -1;
    }
    return rc;
}

int shard_reserve(size_t bytes, int threads, double *seconds_p)
{
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    bytes = (bytes + SHARD_HUGE_PAGE - 1) / SHARD_HUGE_PAGE * SHARD_HUGE_PAGE;
    pthread_mutex_lock(&s_res.mu);
    int rc = 0;
    if (bytes > s_res.free) {
        /* Grow: one more mapping for what is missing, faulted in now. */
        const size_t more = bytes - s_res.free;
        char *m = s_map_aligned(more);
        if (!m || s_prefault_threads(m, more, threads) || s_res_put(m, more)) {
            if (m) munmap(m, more);
            rc = -1;
        }
    } else {
        /* Shrink: unmap free ranges (from the highest address) down to bytes. */
        while (s_res.n && s_res.free > bytes) {
            s_range *r = &s_res.r[s_res.n - 1];
            const size_t cut = s_res.free - bytes < r->size ? s_res.free - bytes : r->size;
            munmap(r->p + r->size - cut, cut);
            r->size -= cut;
            s_res.free -= cut;
            if (!r->size) s_res.n--;
        }
    }
    if (!rc) s_res.cap = bytes;
    pthread_mutex_unlock(&s_res.mu);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    if (seconds_p)
        *seconds_p = (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
    return rc;
}

void shard_reserve_stats(size_t *size_p, size_t *free_p)
{
    pthread_mutex_lock(&s_res.mu);
    if (size_p) *size_p = s_res.cap;
    if (free_p) *free_p = s_res.free;
    pthread_mutex_unlock(&s_res.mu);
}

/* bytes (a multiple of 64) of zeroed memory from the shard's arena; NULL when out of
 * memory. A new arena comes from the reserve when it has room, else from a fresh mapping. */
static void *s_pool_get(shard_t *s, size_t bytes)
{
    s_arena *a = s->arena;
    if (!a || a->size - a->used < bytes) {
        const size_t min = (bytes + 64 + SHARD_HUGE_PAGE - 1) / SHARD_HUGE_PAGE * SHARD_HUGE_PAGE;
        size_t size = min > SHARD_ARENA_BYTES ? min : SHARD_ARENA_BYTES;
        /* From the reserve, whole blocks of this size only: its memory is faulted in, so a
         * tail no block of this size fits in would be idle RSS (an f16 chunk of ~18 MiB in a
         * 32 MiB arena). min is 2 MiB-aligned, so is any multiple. */
        size_t want = min * (min < SHARD_ARENA_BYTES ? SHARD_ARENA_BYTES / min : 1);
        pthread_mutex_lock(&s_res.mu);
        char *b = s_res_take(want, min, &size);
        pthread_mutex_unlock(&s_res.mu);
        if (!b) b = s_map_aligned(size);
        if (!b) return NULL;
        a = (s_arena *)(void *)b;
        a->next = s->arena;
        a->size = size;
        a->used = 64;
        s->arena = a;
    }
    void *p = (char *)a + a->used;
    a->used += bytes;
    return p;
}

static size_t s_up64(size_t x)
{
    return (x + 63) / 64 * 64;
}

/* A RAM chunk at its full SHARD_CHUNK rows, its arrays in the arena: a new one (old NULL)
 * or old grown, its rows copied and its heap arrays freed. NULL (old unchanged) when out
 * of memory. */
static kv_chunk *s_chunk_full(shard_t *s, int layer, kv_chunk *old)
{
    const shard_layout *lay = &s->lay;
    const int d = lay->head_dim, hkv = lay->n_kv_heads;
    const size_t C = SHARD_CHUNK, esz = s_esz(s);
    kv_chunk *ch = old ? old : calloc((size_t)hkv, sizeof(*ch));
    if (!ch) return NULL;
    size_t total = 0;
    for (int g = 0; g < hkv; g++) {
        const size_t u = (size_t)lay->n_dom[layer * hkv + g];
        total += s_up64(C * (u ? u : 1) * esz) + s_up64(C * (d - u ? d - u : 1) * esz) +
                 s_up64(C * d * esz) + s_up64(s_ksc_bytes(lay, (int)u, C));
    }
    char *m = s_pool_get(s, total);
    if (!m) {
        if (!old) free(ch);
        return NULL;
    }
    for (int g = 0; g < hkv; g++) {
        const size_t u = (size_t)lay->n_dom[layer * hkv + g], cap = old ? (size_t)ch[g].cap : 0;
        const size_t wk = (u ? u : 1) * esz, wr = (d - u ? d - u : 1) * esz, wv = (size_t)d * esz;
        char *kd = m, *kr = kd + s_up64(C * wk), *vv = kr + s_up64(C * wr);
        char *sc = vv + s_up64(C * wv);
        m = sc + s_up64(s_ksc_bytes(lay, (int)u, C));
        const size_t tb = s_sep(lay) ? scan_tile_bytes(s_sd(lay), u ? (int)u : 1) : 0;
        float *ks =
            s_sep(lay) && s_sd(lay) == SCAN_I8 ? (float *)(void *)(sc + C / SCORE_TILE * tb) : NULL;
        if (old) {
            memcpy(kd, ch[g].kdom, cap * wk);
            memcpy(kr, ch[g].krest, cap * wr);
            memcpy(vv, ch[g].v, cap * wv);
            if (ch[g].ksc) memcpy(sc, ch[g].ksc, cap / SCORE_TILE * tb);
            if (ch[g].kscale) memcpy(ks, ch[g].kscale, cap * sizeof(float));
            free(ch[g].kdom);
            free(ch[g].krest);
            free(ch[g].v);
            free(ch[g].ksc);
            free(ch[g].kscale);
        }
        ch[g].kdom = kd;
        ch[g].krest = kr;
        ch[g].v = vv;
        ch[g].ksc = s_sep(lay) ? sc : NULL;
        ch[g].kscale = ks;
        ch[g].cap = (int)C;
        ch[g].pooled = 1;
    }
    return ch;
}

static void s_sums_catch_up(shard_t *s, int layer);

/* Pages that n new rows at pos[n] (ascending) would start in a layer. */
static int s_new_pages(const layer_store *ls, int n, const int32_t *pos)
{
    int32_t last = ls->n_pages ? ls->page_pos[ls->n_pages - 1] : -1;
    int count = 0;
    for (int i = 0; i < n; i++) {
        const int32_t pp = pos[i] - pos[i] % SHARD_QUEST_PAGE;
        if (pp != last) count++, last = pp;
    }
    return count;
}

/* Makes room for n more rows at pos[n] in a layer; all or nothing. */
static int s_reserve(shard_t *s, int layer, int n, const int32_t *pos)
{
    layer_store *ls = &s->layers[layer];
    if (!ls->vsum &&
        !(ls->vsum = calloc((size_t)s->lay.n_kv_heads * s->lay.head_dim, sizeof(double))))
        return -1;
    if (!ls->ksum &&
        !(ls->ksum = calloc((size_t)s->lay.n_kv_heads * s->lay.head_dim, sizeof(double))))
        return -1;
    const int need_pages = ls->n_pages + s_new_pages(ls, n, pos);
    if (need_pages > ls->page_cap) {
        int cap = ls->page_cap ? ls->page_cap : 64;
        while (cap < need_pages) cap *= 2;
        const size_t bound = (size_t)s->lay.n_kv_heads * 2 * s->lay.head_dim;
        int32_t *pp = s_xrealloc(ls->page_pos, (size_t)cap * sizeof(*pp));
        if (!pp) return -1;
        ls->page_pos = pp;
        int *pr = s_xrealloc(ls->page_row0, (size_t)cap * sizeof(*pr));
        if (!pr) return -1;
        ls->page_row0 = pr;
        float *pb = s_xrealloc(ls->pbound, (size_t)cap * bound * sizeof(*pb));
        if (!pb) return -1;
        ls->pbound = pb;
        ls->page_cap = cap;
    }
    const int need_rows = ls->n_rows + n;
    if (need_rows > ls->pos_cap) {
        int cap = ls->pos_cap ? ls->pos_cap : 1024;
        while (cap < need_rows) cap *= 2;
        int32_t *p = s_xrealloc(ls->pos, (size_t)cap * sizeof(*p));
        if (!p) return -1;
        ls->pos = p;
        ls->pos_cap = cap;
    }
    const int need_chunks = (need_rows + SHARD_CHUNK - 1) / SHARD_CHUNK;
    if (need_chunks > ls->cap_chunks) {
        int cap = ls->cap_chunks ? ls->cap_chunks * 2 : 4;
        while (cap < need_chunks) cap *= 2;
        kv_chunk **c = s_xrealloc(ls->chunks, (size_t)cap * sizeof(*c));
        if (!c) return -1;
        ls->chunks = c;
        ls->cap_chunks = cap;
    }
    /* The chunks the new rows land in: the last one grown, new ones made, each to the
     * capacity its rows need. What was made or grown so far stays for later appends. */
    const int64_t sized = need_rows > ls->expect_rows ? need_rows : ls->expect_rows;
    for (int c = ls->n_rows / SHARD_CHUNK; c < need_chunks; c++) {
        const int64_t in_chunk = sized - (int64_t)c * SHARD_CHUNK;
        const int want = s_chunk_cap(in_chunk < SHARD_CHUNK ? in_chunk : SHARD_CHUNK);
        const int full = want == SHARD_CHUNK && s->lay.tier == SHARD_TIER_RAM;
        if (c < ls->n_chunks) {
            if (full && ls->chunks[c][0].cap < SHARD_CHUNK) {
                if (!s_chunk_full(s, layer, ls->chunks[c])) return -1;
            } else if (s_chunk_grow(&s->lay, layer, ls->chunks[c], want)) {
                return -1;
            }
            continue;
        }
        kv_chunk *ch = full ? s_chunk_full(s, layer, NULL) : s_chunk_new(&s->lay, layer, want);
        if (!ch) return -1;
        ls->chunks[ls->n_chunks++] = ch;
    }
    return 0;
}

int shard_append_naive(shard_t *s, int layer, int n, const int32_t *pos, const float *k,
                       const float *v)
{
    if (n <= 0) return 0;
    if (s_reserve(s, layer, n, pos)) return -1;
    s_sums_catch_up(s, layer); /* the reference keeps them up to date on every append */
    const shard_layout *lay = &s->lay;
    const int d = lay->head_dim, hkv = lay->n_kv_heads, dt = lay->dtype;
    layer_store *ls = &s->layers[layer];
    /* Rows rounded to the dtype (f32: copies), so the page bounds and value sums below see
     * exactly what is stored. */
    float *kq = s->rowf, kp[d], vq[d];
    uint16_t tmp[d];
    for (int i = 0; i < n; i++) {
        const int r = ls->n_rows + i;
        kv_chunk *ch = ls->chunks[r / SHARD_CHUNK];
        const int rr = r % SHARD_CHUNK, tile = rr / SCORE_TILE, lane = rr % SCORE_TILE;
        const float *krow = k + (size_t)i * hkv * d;
        if (dt != FASA_DTYPE_F32) {
            uint16_t *kt = s->rowh;
            dtype_from_f32(SIMD_AUTO, dt, (size_t)hkv * d, krow, kt);
            dtype_to_f32(SIMD_AUTO, dt, (size_t)hkv * d, kt, kq);
            krow = kq;
        }
        for (int g = 0; g < hkv; g++) {
            const int u = lay->n_dom[layer * hkv + g];
            const int *perm = lay->perm + ((size_t)layer * hkv + g) * d;
            const float *kr = krow + (size_t)g * d;
            for (int p = 0; p < d; p++) kp[p] = kr[perm[p]];
            const size_t kd0 = (size_t)tile * u * SCORE_TILE + lane;
            if (ch[g].ksc) scan_pack_row(s_sd(lay), u, kp, ch[g].ksc, ch[g].kscale, rr);
            if (dt == FASA_DTYPE_F32) {
                float *kd = (float *)ch[g].kdom + kd0;
                for (int p = 0; p < u; p++) kd[(size_t)p * SCORE_TILE] = kp[p];
            } else {
                dtype_from_f32(SIMD_AUTO, dt, (size_t)d, kp, tmp);
                uint16_t *kd = (uint16_t *)ch[g].kdom + kd0;
                for (int p = 0; p < u; p++) kd[(size_t)p * SCORE_TILE] = tmp[p];
            }
            dtype_from_f32(SIMD_AUTO, dt, (size_t)(d - u), kp + u,
                           s_at(s, ch[g].krest, (size_t)rr * (d - u)));
            void *vdst = s_at(s, ch[g].v, (size_t)rr * d);
            dtype_from_f32(SIMD_AUTO, dt, (size_t)d, v + ((size_t)i * hkv + g) * d, vdst);
            dtype_to_f32(SIMD_AUTO, dt, (size_t)d, vdst, vq);
            for (int c = 0; c < d; c++) ls->vsum[(size_t)g * d + c] += vq[c];
            for (int c = 0; c < d; c++) ls->ksum[(size_t)g * d + c] += kr[c];
        }
        ls->pos[r] = pos[i];
        /* QUEST page bounds: a new page starts at its first row here. */
        const int32_t pp = pos[i] - pos[i] % SHARD_QUEST_PAGE;
        const int fresh = ls->n_pages == 0 || ls->page_pos[ls->n_pages - 1] != pp;
        if (fresh) {
            ls->page_pos[ls->n_pages] = pp;
            ls->page_row0[ls->n_pages] = r;
            ls->n_pages++;
        }
        float *pb = ls->pbound + (size_t)(ls->n_pages - 1) * hkv * 2 * d;
        for (int g = 0; g < hkv; g++) {
            const float *kr = krow + (size_t)g * d;
            float *mn = pb + (size_t)g * 2 * d, *mx = mn + d;
            for (int c = 0; c < d; c++) {
                if (fresh || kr[c] < mn[c]) mn[c] = kr[c];
                if (fresh || kr[c] > mx[c]) mx[c] = kr[c];
            }
        }
    }
    /* Disk tier: hand the chunks just written back to the page cache (their pages stay in
     * the file; only the rows a step selects come back into memory). */
    for (int c = ls->n_rows / SHARD_CHUNK;
         c <= (ls->n_rows + n - 1) / SHARD_CHUNK && ls->chunks[c][0].map; c++)
        madvise(ls->chunks[c][0].map, ls->chunks[c][0].map_bytes, MADV_DONTNEED);
    ls->n_rows += n;
    ls->sums_rows = ls->n_rows;
    ls->sums_page = ls->n_pages - 1;
    return 0;
}

/* Under a transaction, the layer's state before its first append in it (shard_txn_begin). */
static int s_mark(shard_t *s, int layer)
{
    layer_store *ls = &s->layers[layer];
    if (!s->txn || ls->mark_txn == s->txn) return 0;
    const size_t kd = (size_t)s->lay.n_kv_heads * s->lay.head_dim;
    if (!ls->mark_bound && !(ls->mark_bound = malloc(2 * kd * sizeof(float)))) return -1;
    if (!ls->mark_sum && !(ls->mark_sum = malloc(2 * kd * sizeof(double)))) return -1;
    ls->mark_txn = s->txn;
    ls->mark_rows = ls->n_rows;
    ls->mark_pages = ls->n_pages;
    ls->mark_sums_rows = ls->sums_rows;
    ls->mark_sums_page = ls->sums_page;
    if (ls->n_pages)
        memcpy(ls->mark_bound, ls->pbound + (size_t)(ls->n_pages - 1) * 2 * kd,
               2 * kd * sizeof(float));
    memcpy(ls->mark_sum, ls->vsum, kd * sizeof(double));
    memcpy(ls->mark_sum + kd, ls->ksum, kd * sizeof(double));
    return 0;
}

void shard_txn_begin(shard_t *s, uint32_t txn)
{
    s->txn = txn;
}

/* Rows [row0, row1) of a layer back to what a fresh store holds there: zero key tiles,
 * scoring copy and krest (the padding of a partial tile must score as zeros). */
static void s_rows_clear(shard_t *s, int layer, int row0, int row1)
{
    const shard_layout *lay = &s->lay;
    const int d = lay->head_dim, hkv = lay->n_kv_heads;
    const size_t esz = s_esz(s);
    layer_store *ls = &s->layers[layer];
    float zero[d];
    memset(zero, 0, sizeof(zero));
    for (int r = row0; r < row1; r++) {
        kv_chunk *ch = ls->chunks[r / SHARD_CHUNK];
        const int rr = r % SHARD_CHUNK, tile = rr / SCORE_TILE, lane = rr % SCORE_TILE;
        for (int g = 0; g < hkv; g++) {
            const int u = lay->n_dom[layer * hkv + g];
            char *kd = (char *)ch[g].kdom + ((size_t)tile * u * SCORE_TILE + lane) * esz;
            for (int p = 0; p < u; p++) memset(kd + (size_t)p * SCORE_TILE * esz, 0, esz);
            if (ch[g].ksc) {
                scan_pack_row(s_sd(lay), u, zero, ch[g].ksc, ch[g].kscale, rr);
                if (ch[g].kscale) ch[g].kscale[rr] = 0.0f;
            }
            if (!ch[0].map) memset(s_at(s, ch[g].krest, (size_t)rr * (d - u)), 0, (d - u) * esz);
        }
    }
}

void shard_txn_undo(shard_t *s, uint32_t txn)
{
    const size_t kd = (size_t)s->lay.n_kv_heads * s->lay.head_dim;
    for (int l = 0; txn && l < s->lay.n_layers; l++) {
        layer_store *ls = &s->layers[l];
        if (ls->mark_txn != txn) continue;
        s_rows_clear(s, l, ls->mark_rows, ls->n_rows);
        ls->n_rows = ls->mark_rows;
        ls->n_pages = ls->mark_pages;
        ls->sums_rows = ls->mark_sums_rows;
        ls->sums_page = ls->mark_sums_page;
        if (ls->n_pages)
            memcpy(ls->pbound + (size_t)(ls->n_pages - 1) * 2 * kd, ls->mark_bound,
                   2 * kd * sizeof(float));
        memcpy(ls->vsum, ls->mark_sum, kd * sizeof(double));
        memcpy(ls->ksum, ls->mark_sum + kd, kd * sizeof(double));
        /* FASA_PLUS: a v kdom^T sum holding rows taken back starts again from row 0 (the
         * next plus step folds the rows in again, in row order: the same bits). */
        for (int g = 0; ls->vk && g < s->lay.n_kv_heads; g++)
            if (ls->vk_rows[g] > ls->n_rows) {
                const int d = s->lay.head_dim, hkv = s->lay.n_kv_heads;
                size_t off = 0;
                for (int x = 0; x < g; x++) off += (size_t)d * s->lay.n_dom[l * hkv + x];
                const size_t n = (size_t)d * s->lay.n_dom[l * hkv + g];
                memset(ls->vk + off, 0, n * sizeof(double));
                ls->vk_rows[g] = 0;
            }
        ls->mark_txn = 0;
    }
}

/* Converts n elements of dtype from to dtype to (f16 <-> bf16 through an exact f32
 * widening, then one rounding, as an f32 append of the widened values would). */
static void s_convert(int from, int to, size_t n, const void *src, void *dst, float *tmp)
{
    if (from == to)
        memcpy(dst, src, n * fasa_dtype_size(to));
    else if (from == FASA_DTYPE_F32)
        dtype_from_f32(SIMD_AUTO, to, n, src, dst);
    else if (to == FASA_DTYPE_F32)
        dtype_to_f32(SIMD_AUTO, from, n, src, dst);
    else {
        dtype_to_f32(SIMD_AUTO, from, n, src, tmp);
        dtype_from_f32(SIMD_AUTO, to, n, tmp, dst);
    }
}

/* sum[c] += x[c] in double, and the running page bounds: vectorisable loops. */
static void s_sum(int n, double *restrict sum, const float *restrict x)
{
    for (int c = 0; c < n; c++) sum[c] += x[c];
}

static void s_bounds(int n, float *restrict mn, float *restrict mx, const float *restrict x)
{
    /* x < m ? x : m keeps m on ties (+0 against -0), as the reference's strict compares. */
    for (int c = 0; c < n; c++) mn[c] = x[c] < mn[c] ? x[c] : mn[c];
    for (int c = 0; c < n; c++) mx[c] = x[c] > mx[c] ? x[c] : mx[c];
}

void shard_expect_rows(shard_t *s, int layer, int rows)
{
    if (layer >= 0 && layer < s->lay.n_layers) s->layers[layer].expect_rows = rows > 0 ? rows : 0;
}

int shard_append_dt(shard_t *s, int layer, int n, const int32_t *pos, int in_dt, const void *k,
                    const void *v)
{
    if (n <= 0) return 0;
    if (!fasa_dtype_size(in_dt)) return -1;
    if (s_reserve(s, layer, n, pos) || s_mark(s, layer)) return -1;
    const shard_layout *lay = &s->lay;
    const int d = lay->head_dim, hkv = lay->n_kv_heads, dt = lay->dtype;
    const size_t row = (size_t)hkv * d, ein = fasa_dtype_size(in_dt);
    layer_store *ls = &s->layers[layer];
    /* Per row: the key row in the stored dtype (the input itself when the dtypes match, else
     * converted once), as f32 only where an f32 store or a scoring copy needs it; per KV
     * head the permuted stored elements, copied into the tiles and krest. The page bounds
     * and sums wait for the first step that reads them (s_sums_catch_up). */
    float kpf[d], tmpf[d];
    uint16_t kp16[d];
    /* KV heads whose packing order is the original one (no profile): rows copied whole. */
    unsigned char ident[hkv];
    for (int g = 0; g < hkv; g++) {
        const int *perm = lay->perm + ((size_t)layer * hkv + g) * d;
        ident[g] = 1;
        for (int p = 0; p < d; p++) ident[g] &= perm[p] == p;
    }
    for (int i = 0; i < n; i++) {
        const int r = ls->n_rows + i;
        kv_chunk *ch = ls->chunks[r / SHARD_CHUNK];
        const int rr = r % SHARD_CHUNK, tile = rr / SCORE_TILE, lane = rr % SCORE_TILE;
        const char *kin = (const char *)k + (size_t)i * row * ein;
        const char *vin = (const char *)v + (size_t)i * row * ein;
        const void *ks; /* row elements of dt */
        const float *kf = s->rowf;
        if (dt == FASA_DTYPE_F32) {
            if (in_dt == FASA_DTYPE_F32)
                kf = (const float *)kin;
            else
                dtype_to_f32(SIMD_AUTO, in_dt, row, kin, s->rowf);
            ks = kf;
        } else {
            if (in_dt == dt)
                ks = kin;
            else
                s_convert(in_dt, dt, row, kin, s->rowh, s->rowf), ks = s->rowh;
            if (s_sep(lay)) dtype_to_f32(SIMD_AUTO, dt, row, ks, s->rowf);
        }
        for (int g = 0; g < hkv; g++) {
            const int u = lay->n_dom[layer * hkv + g];
            const int *perm = lay->perm + ((size_t)layer * hkv + g) * d;
            const float *kr = kf + (size_t)g * d;
            const size_t kd0 = (size_t)tile * u * SCORE_TILE + lane;
            const float *kpp = kr; /* the row in packing order, as f32 */
            if (!ident[g] && (dt == FASA_DTYPE_F32 || ch[g].ksc)) {
                for (int p = 0; p < d; p++) kpf[p] = kr[perm[p]];
                kpp = kpf;
            }
            if (ch[g].ksc) scan_pack_row(s_sd(lay), u, kpp, ch[g].ksc, ch[g].kscale, rr);
            if (dt == FASA_DTYPE_F32) {
                float *kd = (float *)ch[g].kdom + kd0;
                for (int p = 0; p < u; p++) kd[(size_t)p * SCORE_TILE] = kpp[p];
                memcpy((float *)ch[g].krest + (size_t)rr * (d - u), kpp + u,
                       (size_t)(d - u) * sizeof(float));
            } else {
                const uint16_t *kh = (const uint16_t *)ks + (size_t)g * d, *kph = kh;
                if (!ident[g]) {
                    for (int p = 0; p < d; p++) kp16[p] = kh[perm[p]];
                    kph = kp16;
                }
                uint16_t *kd = (uint16_t *)ch[g].kdom + kd0;
                for (int p = 0; p < u; p++) kd[(size_t)p * SCORE_TILE] = kph[p];
                memcpy((uint16_t *)ch[g].krest + (size_t)rr * (d - u), kph + u,
                       (size_t)(d - u) * sizeof(uint16_t));
            }
            void *vdst = s_at(s, ch[g].v, (size_t)rr * d);
            s_convert(in_dt, dt, (size_t)d, vin + (size_t)g * d * ein, vdst, tmpf);
        }
        ls->pos[r] = pos[i];
        const int32_t pp = pos[i] - pos[i] % SHARD_QUEST_PAGE;
        if (ls->n_pages == 0 || ls->page_pos[ls->n_pages - 1] != pp) {
            ls->page_pos[ls->n_pages] = pp;
            ls->page_row0[ls->n_pages] = r;
            ls->n_pages++;
        }
    }
    for (int c = ls->n_rows / SHARD_CHUNK;
         c <= (ls->n_rows + n - 1) / SHARD_CHUNK && ls->chunks[c][0].map; c++)
        madvise(ls->chunks[c][0].map, ls->chunks[c][0].map_bytes, MADV_DONTNEED);
    ls->n_rows += n;
    return 0;
}

int shard_append(shard_t *s, int layer, int n, const int32_t *pos, const float *k, const float *v)
{
    return shard_append_dt(s, layer, n, pos, FASA_DTYPE_F32, k, v);
}

/* 1 when bytes bytes at a and b are equal (none are always). */
static int s_mem_eq(const void *a, const void *b, size_t bytes)
{
    return bytes == 0 || (a && b && memcmp(a, b, bytes) == 0);
}

int shard_store_equal(shard_t *a, shard_t *b)
{
    for (int l = 0; l < a->lay.n_layers && l < b->lay.n_layers; l++) {
        s_sums_catch_up(a, l);
        s_sums_catch_up(b, l);
    }
    const shard_layout *la = &a->lay, *lb = &b->lay;
    if (la->n_layers != lb->n_layers || la->n_kv_heads != lb->n_kv_heads ||
        la->head_dim != lb->head_dim || la->dtype != lb->dtype ||
        la->score_dtype != lb->score_dtype)
        return 0;
    const int d = la->head_dim, hkv = la->n_kv_heads;
    const size_t esz = s_esz(a);
    for (int l = 0; l < la->n_layers; l++) {
        const layer_store *x = &a->layers[l], *y = &b->layers[l];
        if (x->n_rows != y->n_rows || x->n_pages != y->n_pages) return 0;
        if (!s_mem_eq(x->pos, y->pos, (size_t)x->n_rows * sizeof(int32_t)) ||
            !s_mem_eq(x->page_pos, y->page_pos, (size_t)x->n_pages * sizeof(int32_t)) ||
            !s_mem_eq(x->page_row0, y->page_row0, (size_t)x->n_pages * sizeof(int)) ||
            !s_mem_eq(x->pbound, y->pbound, (size_t)x->n_pages * hkv * 2 * d * sizeof(float)))
            return 0;
        if (x->n_rows && (!s_mem_eq(x->vsum, y->vsum, (size_t)hkv * d * sizeof(double)) ||
                          !s_mem_eq(x->ksum, y->ksum, (size_t)hkv * d * sizeof(double))))
            return 0;
        for (int c = 0; c * SHARD_CHUNK < x->n_rows; c++) {
            const int rows = x->n_rows - c * SHARD_CHUNK < SHARD_CHUNK ? x->n_rows - c * SHARD_CHUNK
                                                                       : SHARD_CHUNK;
            const size_t tiles = ((size_t)rows + SCORE_TILE - 1) / SCORE_TILE;
            for (int g = 0; g < hkv; g++) {
                const kv_chunk *p = &x->chunks[c][g], *q = &y->chunks[c][g];
                const int u = la->n_dom[l * hkv + g];
                if (u != lb->n_dom[l * hkv + g] ||
                    memcmp(la->perm + ((size_t)l * hkv + g) * d,
                           lb->perm + ((size_t)l * hkv + g) * d, (size_t)d * sizeof(int)))
                    return 0;
                if (!s_mem_eq(p->kdom, q->kdom, tiles * SCORE_TILE * u * esz) ||
                    !s_mem_eq(p->krest, q->krest, (size_t)rows * (d - u) * esz) ||
                    !s_mem_eq(p->v, q->v, (size_t)rows * d * esz) ||
                    !s_mem_eq(p->ksc, q->ksc,
                              s_ksc_bytes(la, u, tiles * SCORE_TILE) -
                                  (s_sd(la) == SCAN_I8 ? tiles * SCORE_TILE * 4 : 0)) ||
                    !s_mem_eq(p->kscale, q->kscale, p->kscale ? (size_t)rows * sizeof(float) : 0))
                    return 0;
            }
        }
    }
    return 1;
}

const shard_layout *shard_layout_of(const shard_t *s)
{
    return &s->lay;
}

int shard_rows(const shard_t *s, int layer)
{
    return s->layers[layer].n_rows;
}

int shard_visible(const shard_t *s, int layer, int32_t max_pos)
{
    const layer_store *ls = &s->layers[layer];
    int lo = 0, hi = ls->n_rows; /* first row with pos > max_pos */
    while (lo < hi) {
        const int mid = lo + (hi - lo) / 2;
        if (ls->pos[mid] <= max_pos)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

int shard_units(const shard_t *s, shard_gqa gqa)
{
    return gqa == SHARD_GQA_SHARED ? s->lay.n_kv_heads : s->lay.n_heads;
}

/* Packs the queries of KV head g's group into permuted order: qd (n_q, u) the dominant
 * part, qr (n_q, d - u) the rest. FASA masks each head to its own FCs; shared GQA sums
 * the group into one query (scores are linear in q). Returns n_q. */
static int s_pack_queries(const shard_t *s, const shard_step *st, int g, float *qd, float *qr)
{
    const shard_layout *lay = &s->lay;
    const int d = lay->head_dim, grp = lay->n_heads / lay->n_kv_heads;
    const int u = lay->n_dom[st->layer * lay->n_kv_heads + g];
    const int *perm = lay->perm + ((size_t)st->layer * lay->n_kv_heads + g) * d;
    const int shared = st->gqa == SHARD_GQA_SHARED;
    const int n_q = shared ? 1 : grp;
    memset(qd, 0, (size_t)n_q * d * sizeof(float));
    memset(qr, 0, (size_t)n_q * d * sizeof(float));
    for (int i = 0; i < grp; i++) {
        const int h = g * grp + i;
        const float *qh = st->q + (size_t)h * d;
        const uint8_t *mask = lay->qmask + ((size_t)st->layer * lay->n_heads + h) * d;
        float *qdi = qd + (size_t)(shared ? 0 : i) * u;
        float *qri = qr + (size_t)(shared ? 0 : i) * (d - u);
        for (int p = 0; p < u; p++)
            if (st->method != SHARD_FASA || mask[p]) qdi[p] += qh[perm[p]];
        for (int p = u; p < d; p++) qri[p - u] += qh[perm[p]];
    }
    return n_q;
}

static int s_grow(void **buf, size_t *cap, size_t bytes)
{
    if (bytes <= *cap) return 0;
    void *p = realloc(*buf, bytes);
    if (!p) return -1;
    *buf = p;
    *cap = bytes;
    return 0;
}

void shard_set_pool(shard_t *s, fasa_pool_t *pool)
{
    s->pool = pool;
}

void shard_set_gather_per_head(shard_t *s, int on)
{
    s->gather_per_head = on != 0;
}

/* A view of s for one more thread (see struct shard); NULL when out of memory. */
static shard_t *s_view_new(const shard_t *s)
{
    shard_t *v = calloc(1, sizeof(*v) + s_tail_floats(&s->lay) * sizeof(float));
    if (!v) return NULL;
    v->lay = s->lay; /* borrowed arrays */
    v->layers = s->layers;
    const size_t gd = (size_t)(s->lay.n_heads / s->lay.n_kv_heads) * s->lay.head_dim;
    if (s->lay.dtype != FASA_DTYPE_F32)
        v->conv = malloc((size_t)2 * ATTN_BLOCK * s->lay.head_dim * sizeof(float));
    v->qf = malloc(gd * sizeof(float));
    if ((s->lay.dtype != FASA_DTYPE_F32 && !v->conv) || !v->qf) {
        s_view_destroy(v);
        return NULL;
    }
    return v;
}

/* Makes the views a step on the pool needs and points their shared fields at the shard's
 * (after the shard grew them); resets their byte counts. 0, or -1 out of memory. */
static int s_views_ready(shard_t *s)
{
    const int need = fasa_pool_threads(s->pool) - 1;
    if (need > s->n_views) {
        shard_t **p = realloc(s->views, (size_t)need * sizeof(*p));
        if (!p) return -1;
        s->views = p;
        while (s->n_views < need) {
            if (!(p[s->n_views] = s_view_new(s))) return -1;
            s->n_views++;
        }
    }
    for (int i = 0; i < s->n_views; i++) {
        shard_t *v = s->views[i];
        v->kept = s->kept;
        v->n_kept = s->n_kept;
        v->kept_budget = s->kept_budget;
        v->aux = s->aux;
        v->plus_aux = s->plus_aux;
        v->gather_per_head = s->gather_per_head;
        v->bytes_read_last = 0;
    }
    return 0;
}

/* The shard a task on thread tid works in. */
static shard_t *s_view(shard_t *s, int tid)
{
    return tid == 0 ? s : s->views[tid - 1];
}

/* Key row r of KV head g of a layer in the original dim order. */
static void s_row_key(const shard_t *s, int layer, int g, int r, float *out)
{
    const shard_layout *lay = &s->lay;
    const int d = lay->head_dim, u = lay->n_dom[layer * lay->n_kv_heads + g];
    const int *perm = lay->perm + ((size_t)layer * lay->n_kv_heads + g) * d;
    const layer_store *ls = &s->layers[layer];
    const kv_chunk *ch = &ls->chunks[r / SHARD_CHUNK][g];
    const int rr = r % SHARD_CHUNK, dt = lay->dtype;
    const size_t kd0 = (size_t)(rr / SCORE_TILE) * u * SCORE_TILE + rr % SCORE_TILE;
    const size_t kx0 = (size_t)rr * (d - u);
    for (int p = 0; p < u; p++) out[perm[p]] = s_get(dt, ch->kdom, kd0 + (size_t)p * SCORE_TILE);
    for (int p = u; p < d; p++) out[perm[p]] = s_get(dt, ch->krest, kx0 + (size_t)(p - u));
}

/* Brings a layer's page bounds and value and key sums up to its rows, from the stored rows
 * in row order: the same additions and compares, so the same bits, as if every append had
 * made them. */
static void s_sums_catch_up(shard_t *s, int layer)
{
    layer_store *ls = &s->layers[layer];
    if (ls->sums_rows >= ls->n_rows) return;
    const shard_layout *lay = &s->lay;
    const int d = lay->head_dim, hkv = lay->n_kv_heads;
    float kr[d], vq[d];
    int p = ls->sums_page;
    for (int r = ls->sums_rows; r < ls->n_rows; r++) {
        while (p + 1 < ls->n_pages && ls->page_row0[p + 1] <= r) p++;
        const int fresh = ls->page_row0[p] == r;
        float *pb = ls->pbound + (size_t)p * hkv * 2 * d;
        const int rr = r % SHARD_CHUNK;
        for (int g = 0; g < hkv; g++) {
            s_row_key(s, layer, g, r, kr);
            const kv_chunk *ch = &ls->chunks[r / SHARD_CHUNK][g];
            const float *vf = s_rows_f32(s, ch->v, (size_t)rr * d, (size_t)d, vq);
            s_sum(d, ls->vsum + (size_t)g * d, vf);
            s_sum(d, ls->ksum + (size_t)g * d, kr);
            float *mn = pb + (size_t)g * 2 * d, *mx = mn + d;
            if (fresh) {
                memcpy(mn, kr, (size_t)d * sizeof(float));
                memcpy(mx, kr, (size_t)d * sizeof(float));
            } else {
                s_bounds(d, mn, mx, kr);
            }
        }
    }
    ls->sums_rows = ls->n_rows;
    ls->sums_page = p;
}

/* STREAM phase 1: the sinks and the last B visible rows are the only rows that can make a
 * unit's local top-B (any other row has B rows here that rank before it); every unit gets
 * the same candidates. */
static void s_score_stream(shard_t *s, const shard_step *st, int units, int n_vis, topk_cand *cands,
                           int *n_cands)
{
    const layer_store *ls = &s->layers[st->layer];
    const int b = st->budget;
    topk_cand *buf = s->acc_buf;
    int n = 0;
    const int w0 = n_vis > b ? n_vis - b : 0;
    /* Candidates by row (kept rows are row indices; rows ascend with positions, so the
     * order is the same), positions in what is returned. */
    for (int r = 0; r < w0 && ls->pos[r] < SHARD_STREAM_SINKS; r++) buf[n++] = (topk_cand){1.0f, r};
    for (int r = w0; r < n_vis; r++)
        buf[n++] = (topk_cand){
            ls->pos[r] < SHARD_STREAM_SINKS ? 1.0f : -(float)(st->max_pos - ls->pos[r]), r};
    n = topk_select(n, b, buf);
    for (int unit = 0; unit < units; unit++) {
        memcpy(s->kept + (size_t)unit * b, buf, (size_t)n * sizeof(topk_cand));
        s->n_kept[unit] = n;
        for (int i = 0; cands && i < n; i++)
            cands[(size_t)unit * b + i] = (topk_cand){buf[i].score, ls->pos[buf[i].pos]};
        if (cands) topk_sort(n, cands + (size_t)unit * b);
        if (n_cands) n_cands[unit] = n;
    }
    s->bytes_read_last = 0;
}

/* QUEST phase 1 for KV head g: page scores of the visible pages into the n_q running
 * top-k accumulators. Returns the bound bytes read. */
static int64_t s_score_quest(shard_t *s, const shard_step *st, int g, int n_vis, float *sc,
                             topk_acc *acc)
{
    const shard_layout *lay = &s->lay;
    const int d = lay->head_dim, hkv = lay->n_kv_heads, grp = lay->n_heads / hkv;
    const layer_store *ls = &s->layers[st->layer];
    const int shared = st->gqa == SHARD_GQA_SHARED, n_q = shared ? 1 : grp;
    int n_pages = 0; /* pages with a visible row */
    while (n_pages < ls->n_pages && ls->page_row0[n_pages] < n_vis) n_pages++;
    float part[2 * d], krow[d];
    for (int p0 = 0; p0 < n_pages; p0 += SHARD_CHUNK) {
        const int np = n_pages - p0 < SHARD_CHUNK ? n_pages - p0 : SHARD_CHUNK;
        for (int j = 0; j < np; j++) {
            const int pi = p0 + j;
            const int end = pi + 1 < ls->n_pages ? ls->page_row0[pi + 1] : ls->n_rows;
            const float *mn = ls->pbound + ((size_t)pi * hkv + g) * 2 * d;
            if (end > n_vis) { /* max_pos falls inside: bounds of the visible rows only */
                for (int r = ls->page_row0[pi]; r < n_vis; r++) {
                    s_row_key(s, st->layer, g, r, krow);
                    for (int c = 0; c < d; c++) {
                        const int first = r == ls->page_row0[pi];
                        if (first || krow[c] < part[c]) part[c] = krow[c];
                        if (first || krow[c] > part[d + c]) part[d + c] = krow[c];
                    }
                }
                mn = part;
            }
            const float *mx = mn + d;
            double tot = 0;
            for (int i = 0; i < grp; i++) {
                const float *q = st->q + (size_t)(g * grp + i) * d;
                double u = 0;
                for (int c = 0; c < d; c++) {
                    const double a = (double)q[c] * mn[c], b = (double)q[c] * mx[c];
                    u += a > b ? a : b;
                }
                if (shared)
                    tot += u;
                else
                    sc[(size_t)i * SHARD_CHUNK + j] = (float)u;
            }
            if (shared) sc[j] = (float)tot;
        }
        for (int i = 0; i < n_q; i++)
            topk_acc_push(&acc[i], np, sc + (size_t)i * SHARD_CHUNK, ls->page_pos + p0, 0);
    }
    return (int64_t)n_pages * 2 * d * (int64_t)sizeof(float);
}

typedef struct s_mag {
    float a;
    int dim;
} s_mag;

static int s_mag_cmp(const void *x, const void *y)
{
    const s_mag *a = x, *b = y;
    if (a->a != b->a) return a->a > b->a ? -1 : 1;
    return (a->dim > b->dim) - (a->dim < b->dim);
}

/* SPARQ (per-head GQA): keeps in the packed queries qd, qr of KV head g's grp heads only
 * each head's r dims of largest |q_c| (ties: the lower dim) and sets its 1 / tau; starts
 * the running normaliser of z. */
static void s_sparq_queries(const shard_t *s, const shard_step *st, int g, float *qd, float *qr,
                            float *inv_tau, float *zm, double *zs)
{
    const shard_layout *lay = &s->lay;
    const int d = lay->head_dim, hkv = lay->n_kv_heads, grp = lay->n_heads / hkv;
    const int u = lay->n_dom[st->layer * hkv + g];
    const int *perm = lay->perm + ((size_t)st->layer * hkv + g) * d;
    uint8_t keep[d];
    for (int i = 0; i < grp; i++) {
        const float *q = st->q + (size_t)(g * grp + i) * d;
        /* Rank the dims by |q| (larger first, ties to the lower dim) with one sort, and
         * keep the first r. */
        s_mag mag[d];
        double l1 = 0, l1_sel = 0;
        for (int c = 0; c < d; c++) {
            mag[c] = (s_mag){fabsf(q[c]), c};
            l1 += mag[c].a;
            keep[c] = 0;
        }
        qsort(mag, (size_t)d, sizeof(*mag), s_mag_cmp);
        for (int k = 0; k < st->sparq_r && k < d; k++) {
            keep[mag[k].dim] = 1;
            l1_sel += mag[k].a;
        }
        for (int p = 0; p < d; p++)
            if (!keep[perm[p]]) {
                if (p < u)
                    qd[(size_t)i * u + p] = 0;
                else
                    qr[(size_t)i * (d - u) + p - u] = 0;
            }
        inv_tau[i] = l1 > 0 ? (float)(1.0 / sqrt(d * l1_sel / l1)) : 1.0f;
        zm[i] = -INFINITY;
        zs[i] = 0;
    }
}

/* SPARQ: scales n rows of raw partial scores into z (in place) and folds them into each
 * head's running max zm and sum of exp(z - zm). */
static void s_sparq_fold(int n_q, int n, float *sc, const float *inv_tau, float *zm, double *zs)
{
    for (int i = 0; i < n_q; i++) {
        float *z = sc + (size_t)i * SHARD_CHUNK, cm = -INFINITY;
        for (int j = 0; j < n; j++) {
            z[j] *= inv_tau[i];
            if (z[j] > cm) cm = z[j];
        }
        if (cm > zm[i]) {
            zs[i] *= exp((double)zm[i] - cm);
            zm[i] = cm;
        }
        for (int j = 0; j < n; j++) zs[i] += exp((double)z[j] - zm[i]);
    }
}

/* SPARQ: the aux entries of KV head g's heads: the normaliser, and the visible values'
 * count and sum (the running sum less the rows past max_pos). */
static void s_sparq_aux_of(shard_t *s, const shard_step *st, int g, int n_vis, const float *zm,
                           const double *zs)
{
    const shard_layout *lay = &s->lay;
    const int d = lay->head_dim, hkv = lay->n_kv_heads, grp = lay->n_heads / hkv;
    const layer_store *ls = &s->layers[st->layer];
    for (int i = 0; i < grp; i++) {
        double *a = s->aux + (size_t)(g * grp + i) * SHARD_SPARQ_AUX(d);
        a[0] = zm[i];
        a[1] = zs[i];
        a[2] = n_vis;
        for (int c = 0; c < d; c++) a[3 + c] = ls->vsum ? ls->vsum[(size_t)g * d + c] : 0;
        for (int c = 3 + d; c < SHARD_SPARQ_AUX(d); c++) a[c] = 0;
        for (int r = n_vis; r < ls->n_rows; r++) {
            const void *v = ls->chunks[r / SHARD_CHUNK][g].v;
            const size_t e0 = (size_t)(r % SHARD_CHUNK) * d;
            for (int c = 0; c < d; c++) a[3 + c] -= s_get(lay->dtype, v, e0 + (size_t)c);
        }
    }
}

/* FASA_PLUS (per-head GQA; shard.h): starts each head's running sums of z: zs[0] the
 * normaliser (with the max zm), zs[1] and zs[2] of z and z^2, zs[3] of exp(z - zm) z. */
static void s_plus_begin(int n_q, float *zm, double *zs)
{
    for (int i = 0; i < n_q; i++) {
        zm[i] = -INFINITY;
        for (int c = 0; c < 4; c++) zs[4 * i + c] = 0;
    }
}

/* FASA_PLUS: folds n rows of raw partial scores (positions pos) into each head's running
 * max zm and sums zs (s_plus_begin), z = scale * score, then gives the forced rows (the
 * sinks and the recent window) the score +inf, so that they rank before every scored row. */
static void s_plus_fold(const shard_step *st, int n_q, int n, const int32_t *pos, float *sc,
                        float *zm, double *zs)
{
    const int32_t recent0 = st->max_pos - st->sparq_r + 1; /* first forced recent pos */
    for (int i = 0; i < n_q; i++) {
        float *z = sc + (size_t)i * SHARD_CHUNK, cm = -INFINITY;
        double *a = zs + 4 * i;
        for (int j = 0; j < n; j++)
            if (z[j] * st->scale > cm) cm = z[j] * st->scale;
        if (cm > zm[i]) {
            const double r = exp((double)zm[i] - cm);
            a[0] *= r;
            a[3] *= r;
            zm[i] = cm;
        }
        for (int j = 0; j < n; j++) {
            const double x = (double)(z[j] * st->scale), w = exp(x - zm[i]);
            a[0] += w;
            a[1] += x;
            a[2] += x * x;
            a[3] += w * x;
            if (pos[j] < SHARD_PLUS_SINKS || pos[j] >= recent0) z[j] = INFINITY;
        }
    }
}

/* Offset of KV head g's block in a layer's v kdom^T sums (layer_store.vk). */
static size_t s_plus_vk_off(const shard_layout *lay, int layer, int g)
{
    size_t off = 0;
    for (int x = 0; x < g; x++)
        off += (size_t)lay->head_dim * lay->n_dom[layer * lay->n_kv_heads + x];
    return off;
}

/* FASA_PLUS: brings KV head g's sum of v kdom^T (layer_store.vk) up to the layer's rows, in
 * row order, and its f32 copies vkf and sumf (the key and value sums caught up first, by
 * s_sums_catch_up). Append work, as for the key and value sums: a decode step finds one
 * new row per layer here (each append's rows, folded by the next step rather than by the
 * append, so that sessions that never run fasa-plus do not pay for it); not counted in the
 * step's bytes_read. */
static void s_plus_catch_up(shard_t *s, int layer, int g)
{
    const shard_layout *lay = &s->lay;
    const int d = lay->head_dim, hkv = lay->n_kv_heads, u = lay->n_dom[layer * hkv + g];
    const int *perm = lay->perm + ((size_t)layer * hkv + g) * d;
    layer_store *ls = &s->layers[layer];
    const size_t off = s_plus_vk_off(lay, layer, g);
    double *m = ls->vk + off;
    float krow[d];
    const int r0 = ls->vk_rows[g];
    if (r0 == ls->n_rows) return;
    for (int r = r0; r < ls->n_rows; r++) {
        s_row_key(s, layer, g, r, krow);
        const void *v = ls->chunks[r / SHARD_CHUNK][g].v;
        const size_t e0 = (size_t)(r % SHARD_CHUNK) * d;
        for (int c = 0; c < d; c++) {
            const double vc = s_get(lay->dtype, v, e0 + (size_t)c);
            for (int p = 0; p < u; p++) m[(size_t)c * u + p] += vc * krow[perm[p]];
        }
    }
    ls->vk_rows[g] = ls->n_rows;
    for (size_t i = 0; i < (size_t)d * u; i++) ls->vkf[off + i] = (float)m[i];
    float *sf = ls->sumf + (size_t)g * 2 * d;
    for (int c = 0; c < d; c++) {
        sf[c] = ls->vsum ? (float)ls->vsum[(size_t)g * d + c] : 0.0f;
        sf[d + c] = ls->ksum ? (float)ls->ksum[(size_t)g * d + c] : 0.0f;
    }
}

typedef struct s_plus_task {
    shard_t *s;
    int layer;
} s_plus_task;

static void s_plus_catch_up_run(void *ctx, int g, int tid)
{
    s_plus_task *t = ctx;
    s_plus_catch_up(s_view(t->s, tid), t->layer, g);
}

/* FASA_PLUS: the aux entries of KV head g's heads after the scan (shard_attend then takes
 * the selected rows out): the normaliser of z over the visible rows, q_rest . (sum of the
 * visible keys) over the dims not packed in kdom (qr, packed order), the visible values'
 * sum, the sums of z, z^2 and exp(z - max) z (zs), and the sum of v z from the sum of
 * v kdom^T and the packed queries qd; the three sums read in f32 (vkf and sumf, caught up
 * by s_plus_catch_up). Returns the KV bytes read: the rows past max_pos (taken out of them);
 * the engine counts the f32 sums (head_dim x (n_dom + 2) - n_dom floats per KV head and
 * shard). */
static int64_t s_plus_aux_of(shard_t *s, const shard_step *st, int g, int n_vis, const float *qd,
                             const float *qr, const float *zm, const double *zs)
{
    const shard_layout *lay = &s->lay;
    const int d = lay->head_dim, hkv = lay->n_kv_heads, grp = lay->n_heads / hkv;
    const int u = lay->n_dom[st->layer * hkv + g];
    const int *perm = lay->perm + ((size_t)st->layer * hkv + g) * d;
    const layer_store *ls = &s->layers[st->layer];
    const float *vkf = ls->vkf + s_plus_vk_off(lay, st->layer, g);
    const float *sf = ls->sumf + (size_t)g * 2 * d;
    double ks[d], vs[d];
    float krow[d];
    for (int c = 0; c < d; c++) ks[c] = sf[d + c], vs[c] = sf[c];
    /* Rows past max_pos: out of the sums (their v kdom^T in double, as the reference's
     * difference of the two sums; none in a decode). */
    double *dvk = NULL;
    if (n_vis < ls->n_rows && u > 0) {
        dvk = calloc((size_t)d * u, sizeof(double));
        if (!dvk) return -1;
    }
    for (int r = n_vis; r < ls->n_rows; r++) {
        s_row_key(s, st->layer, g, r, krow);
        const void *v = ls->chunks[r / SHARD_CHUNK][g].v;
        const size_t e0 = (size_t)(r % SHARD_CHUNK) * d;
        for (int c = 0; c < d; c++) {
            const double vc = s_get(lay->dtype, v, e0 + (size_t)c);
            ks[c] -= krow[c];
            vs[c] -= vc;
            for (int p = 0; dvk && p < u; p++) dvk[(size_t)c * u + p] += vc * krow[perm[p]];
        }
    }
    for (int i = 0; i < grp; i++) {
        double *a = s->aux + (size_t)(g * grp + i) * SHARD_SPARQ_AUX(d);
        const double *z = zs + 4 * i;
        const float *qdi = qd + (size_t)i * u;
        a[0] = zm[i];
        a[1] = z[0];
        a[2] = 0;
        for (int p = u; p < d; p++) a[2] += (double)qr[(size_t)i * (d - u) + p - u] * ks[perm[p]];
        for (int c = 0; c < d; c++) a[3 + c] = vs[c];
        a[SHARD_PLUS_E1(d)] = a[SHARD_PLUS_E2(d)] = 0;
        a[SHARD_PLUS_Z1(d)] = z[1];
        a[SHARD_PLUS_Z2(d)] = z[2];
        a[SHARD_PLUS_ZW(d)] = z[3];
        a[SHARD_PLUS_NA(d)] = 0;
        for (int c = 0; c < d; c++) { /* sum of v z = scale * (sum v kdom^T) qdom */
            double x = 0;
            for (int p = 0; p < u; p++)
                x += ((double)vkf[(size_t)c * u + p] - (dvk ? dvk[(size_t)c * u + p] : 0)) * qdi[p];
            a[SHARD_PLUS_VZ(d) + c] = x * st->scale;
        }
    }
    free(dvk);
    return (int64_t)(ls->n_rows - n_vis) * 2 * d * (int64_t)s_esz(s);
}

/* FASA_PLUS phase 2: takes the n gathered rows (kg permuted keys, vg values) that head h
 * attends out of its aux: their exp(z - zm) from the normaliser and their values from the
 * sum, so that the aux covers the unselected rows only (the normaliser floored at 0
 * against rounding). qf is the head's query in permuted order. mem: the rows' slots in kg
 * and vg, in the head's kept order (the union gather, s_attend_union), or NULL for slots
 * 0 .. n - 1 (the reference, head by head): the same arithmetic in the same order. */
static void s_plus_take(shard_t *s, const shard_step *st, int h, int u, int n, const int *mem,
                        const float *qf, const float *kg, const float *vg)
{
    const int d = s->lay.head_dim;
    double *a = s->plus_aux + (size_t)h * SHARD_SPARQ_AUX(d);
    for (int j = 0; j < n; j++) {
        const size_t r = (size_t)(mem ? mem[j] : j) * d;
        float z = 0;
        for (int p = 0; p < u; p++) z += qf[p] * kg[r + p];
        float zf = z; /* the full score */
        for (int p = u; p < d; p++) zf += qf[p] * kg[r + p];
        const double x = (double)(z * st->scale), w = exp(x - a[0]);
        a[1] -= w;
        for (int c = 0; c < d; c++) a[3 + c] -= vg[r + c];
        a[SHARD_PLUS_E1(d)] += w;
        a[SHARD_PLUS_E2(d)] += exp((double)(zf * st->scale) - a[0]);
        a[SHARD_PLUS_Z1(d)] -= x;
        a[SHARD_PLUS_Z2(d)] -= x * x;
        a[SHARD_PLUS_ZW(d)] -= w * x;
        for (int c = 0; c < d; c++) a[SHARD_PLUS_VZ(d) + c] -= x * vg[r + c];
    }
    a[SHARD_PLUS_NA(d)] += n;
    if (a[1] < 0) a[1] = 0;
}

void shard_sparq_aux(const shard_t *s, const shard_step *st, double *aux)
{
    memcpy(aux, st->method == SHARD_FASA_PLUS ? s->plus_aux : s->aux,
           (size_t)s->lay.n_heads * SHARD_SPARQ_AUX(s->lay.head_dim) * sizeof(double));
}

/* The fused scan's hint for chunk c of KV head g, scanned next (each chunk is its own
 * allocation: scan.h scan_prefetch): its first 8 KiB of the scoring store (and int8's
 * scales). */
static void s_scan_prefetch(const layer_store *ls, int c, int g, int sd, int u)
{
    const kv_chunk *ch = &ls->chunks[c][g];
    const size_t tb = scan_tile_bytes(sd, u ? u : 1);
    const size_t bytes =
        8192 < (size_t)SHARD_CHUNK / SCORE_TILE * tb ? 8192 : SHARD_CHUNK / SCORE_TILE * tb;
    scan_prefetch(ch->ksc ? ch->ksc : ch->kdom, bytes);
    if (ch->kscale) scan_prefetch(ch->kscale, 256);
}

/* Phase 1 for KV heads g0 .. g1 - 1 in s (the shard or a view; its acc_buf grown for the
 * step); returns the KV bytes read. */
static int64_t s_score_groups(shard_t *s, const shard_step *st, int g0, int g1, topk_cand *cands,
                              int *n_cands)
{
    const shard_layout *lay = &s->lay;
    const int d = lay->head_dim, hkv = lay->n_kv_heads, grp = lay->n_heads / hkv;
    const int b = st->budget;
    const layer_store *ls = &s->layers[st->layer];
    const int n_vis = shard_visible(s, st->layer, st->max_pos);
    const size_t acc_one = 2 * (size_t)b + SHARD_CHUNK;
    const int sparq = st->method == SHARD_SPARQ, plus = st->method == SHARD_FASA_PLUS;
    float *sc = s->scores, *qd = sc + (size_t)grp * SHARD_CHUNK, *qr = qd + (size_t)grp * d;
    int64_t bytes = 0;
    for (int g = g0; g < g1; g++) {
        const int u = lay->n_dom[st->layer * hkv + g];
        const int n_q = s_pack_queries(s, st, g, qd, qr);
        const int oracle = st->method == SHARD_ORACLE || sparq;
        float inv_tau[n_q], zm[n_q];
        double zs[4 * n_q]; /* SPARQ: the normaliser; FASA_PLUS: s_plus_begin */
        if (sparq) s_sparq_queries(s, st, g, qd, qr, inv_tau, zm, zs);
        if (plus) s_plus_begin(n_q, zm, zs);
        topk_acc acc[n_q];
        for (int i = 0; i < n_q; i++)
            topk_acc_init(&acc[i], b, s->acc_buf + i * acc_one, (int)acc_one);
        if (st->method == SHARD_QUEST) bytes += s_score_quest(s, st, g, n_vis, sc, acc);
        if (st->method == SHARD_FASA) {
            /* The fused scan + top-k over the scoring store (scan.h), by row index. */
            const int sd = s_sd(lay);
            if (scan_q_prep(&s->sq, sd, n_q, u, qd)) return -1;
            for (int r0 = 0; r0 < n_vis; r0 += SHARD_CHUNK) {
                const int nr = n_vis - r0 < SHARD_CHUNK ? n_vis - r0 : SHARD_CHUNK;
                const kv_chunk *ch = &ls->chunks[r0 / SHARD_CHUNK][g];
                if (r0 + SHARD_CHUNK < n_vis) s_scan_prefetch(ls, r0 / SHARD_CHUNK + 1, g, sd, u);
                scan_topk(SIMD_AUTO, &s->sq, nr, ch->ksc ? ch->ksc : ch->kdom, ch->kscale, r0, acc);
            }
            bytes += (int64_t)n_vis * (int64_t)(scan_tile_bytes(sd, u) / SCORE_TILE +
                                                (sd == SCAN_I8 ? sizeof(float) : 0));
        }
        for (int r0 = 0; st->method != SHARD_QUEST && st->method != SHARD_FASA && r0 < n_vis;
             r0 += SHARD_CHUNK) {
            const int nr = n_vis - r0 < SHARD_CHUNK ? n_vis - r0 : SHARD_CHUNK;
            const kv_chunk *ch = &ls->chunks[r0 / SHARD_CHUNK][g];
            score_tiles_dt(SIMD_AUTO, lay->dtype, (nr + SCORE_TILE - 1) / SCORE_TILE, u, n_q, sc,
                           SHARD_CHUNK, qd, ch->kdom);
            for (int j0 = 0; oracle && j0 < nr; j0 += ATTN_BLOCK) {
                const int nj = nr - j0 < ATTN_BLOCK ? nr - j0 : ATTN_BLOCK;
                const float *kx =
                    s_rows_f32(s, ch->krest, (size_t)j0 * (d - u), (size_t)nj * (d - u), s->conv);
                score_rows(nj, d - u, n_q, sc + j0, SHARD_CHUNK, qr, kx, d - u, 1);
            }
            if (sparq) s_sparq_fold(n_q, nr, sc, inv_tau, zm, zs);
            if (plus) s_plus_fold(st, n_q, nr, ls->pos + r0, sc, zm, zs);
            for (int i = 0; i < n_q; i++)
                topk_acc_push(&acc[i], nr, sc + (size_t)i * SHARD_CHUNK, NULL, r0);
        }
        if (st->method != SHARD_QUEST && st->method != SHARD_FASA)
            bytes += (int64_t)n_vis * (oracle ? d : u) * (int64_t)s_esz(s);
        if (sparq) s_sparq_aux_of(s, st, g, n_vis, zm, zs);
        if (plus) {
            const int64_t x = s_plus_aux_of(s, st, g, n_vis, qd, qr, zm, zs);
            if (x < 0) return -1;
            bytes += x;
        }
        for (int i = 0; i < n_q; i++) {
            const int unit = st->gqa == SHARD_GQA_SHARED ? g : g * grp + i;
            /* Unsorted: the merge needs the candidates and its threshold, not an order. */
            const int n = topk_acc_finish_unsorted(&acc[i]);
            topk_cand *it = acc[i].items;
            /* FASA keeps its rows best first: phase 2 sums in kept order, and this order is
             * the same however the rows were split over tasks (s_score_parts). */
            if (st->method == SHARD_FASA) topk_sort(n, it);
            memcpy(s->kept + (size_t)unit * b, it, (size_t)n * sizeof(topk_cand));
            s->n_kept[unit] = n;
            /* Kept rows are row indices (QUEST: page positions); what is returned has
             * positions. */
            for (int j = 0; cands && j < n; j++)
                cands[(size_t)unit * b + j] = (topk_cand){
                    it[j].score, st->method == SHARD_QUEST ? it[j].pos : ls->pos[it[j].pos]};
            if (cands && st->method != SHARD_FASA) /* best first (shard.h) */
                topk_sort(n, cands + (size_t)unit * b);
            if (n_cands) n_cands[unit] = n;
        }
    }
    return bytes;
}

typedef struct s_score_task {
    shard_t *s;
    const shard_step *st;
    topk_cand *cands;
    int *n_cands;
    int64_t *bytes; /* (n_kv_heads) */
} s_score_task;

static void s_score_run(void *ctx, int g, int tid)
{
    s_score_task *t = ctx;
    t->bytes[g] = s_score_groups(s_view(t->s, tid), t->st, g, g + 1, t->cands, t->n_cands);
}

/* The FASA scan split into tasks of (KV head, part of the rows), so that T threads share
 * the work evenly whatever the number of KV heads (and a thread that is held up leaves
 * less of it undone): part p of n_parts scans whole chunks [p * C / n_parts, (p + 1) * C /
 * n_parts) of the C visible ones into its own best budget per unit; a second run merges
 * each unit's parts into its best budget (the total order of topk.h: the same set as one
 * scan of all the rows) and keeps them best first, as s_score_groups does, so the kept
 * rows, the candidates and phase 2 are the same bits for any split and any T. */
typedef struct s_parts_task {
    shard_t *s;
    const shard_step *st;
    topk_cand *cands;
    int *n_cands;
    int n_parts, n_vis;
    int64_t *bytes; /* (n_kv_heads * n_parts), -1 out of memory */
} s_parts_task;

static void s_part_run(void *ctx, int task, int tid)
{
    const s_parts_task *t = ctx;
    shard_t *s = t->s, *v = s_view(s, tid);
    const shard_layout *lay = &s->lay;
    const shard_step *st = t->st;
    const int hkv = lay->n_kv_heads, grp = lay->n_heads / hkv, b = st->budget;
    const int g = task / t->n_parts, p = task % t->n_parts, P = t->n_parts;
    const int u = lay->n_dom[st->layer * hkv + g], sd = s_sd(lay);
    const int n_ch = (t->n_vis + SHARD_CHUNK - 1) / SHARD_CHUNK;
    const int r_lo = (int)((int64_t)p * n_ch / P) * SHARD_CHUNK;
    const int r_hi_c = (int)((int64_t)(p + 1) * n_ch / P) * SHARD_CHUNK;
    const int r_hi = r_hi_c < t->n_vis ? r_hi_c : t->n_vis;
    const layer_store *ls = &s->layers[st->layer];
    float *qd = v->scores + (size_t)grp * SHARD_CHUNK, *qr = qd + (size_t)grp * lay->head_dim;
    const int n_q = s_pack_queries(v, st, g, qd, qr);
    if (scan_q_prep(&v->sq, sd, n_q, u, qd)) {
        t->bytes[task] = -1;
        return;
    }
    const size_t acc_one = 2 * (size_t)b + SHARD_CHUNK;
    topk_acc acc[n_q];
    for (int i = 0; i < n_q; i++) topk_acc_init(&acc[i], b, v->acc_buf + i * acc_one, (int)acc_one);
    for (int r0 = r_lo; r0 < r_hi; r0 += SHARD_CHUNK) {
        const int nr = r_hi - r0 < SHARD_CHUNK ? r_hi - r0 : SHARD_CHUNK;
        const kv_chunk *ch = &ls->chunks[r0 / SHARD_CHUNK][g];
        if (r0 + SHARD_CHUNK < r_hi) s_scan_prefetch(ls, r0 / SHARD_CHUNK + 1, g, sd, u);
        scan_topk(SIMD_AUTO, &v->sq, nr, ch->ksc ? ch->ksc : ch->kdom, ch->kscale, r0, acc);
    }
    for (int i = 0; i < n_q; i++) {
        const int unit = st->gqa == SHARD_GQA_SHARED ? g : g * grp + i;
        const int n = topk_acc_finish_unsorted(&acc[i]);
        memcpy(s->part_buf + ((size_t)unit * P + p) * b, acc[i].items,
               (size_t)n * sizeof(topk_cand));
        s->part_n[(size_t)unit * P + p] = n;
    }
    t->bytes[task] =
        (int64_t)(r_hi > r_lo ? r_hi - r_lo : 0) *
        (int64_t)(scan_tile_bytes(sd, u) / SCORE_TILE + (sd == SCAN_I8 ? sizeof(float) : 0));
}

static void s_part_merge_run(void *ctx, int g, int tid)
{
    (void)tid;
    const s_parts_task *t = ctx;
    shard_t *s = t->s;
    const shard_step *st = t->st;
    const int hkv = s->lay.n_kv_heads, grp = s->lay.n_heads / hkv, b = st->budget, P = t->n_parts;
    const layer_store *ls = &s->layers[st->layer];
    const int n_q = st->gqa == SHARD_GQA_SHARED ? 1 : grp; /* as s_pack_queries */
    for (int i = 0; i < n_q; i++) {
        const int unit = st->gqa == SHARD_GQA_SHARED ? g : g * grp + i;
        topk_cand *all = s->part_buf + (size_t)unit * P * b;
        int n = 0;
        for (int p = 0; p < P; p++) {
            const int np = s->part_n[(size_t)unit * P + p];
            memmove(all + n, all + (size_t)p * b, (size_t)np * sizeof(topk_cand));
            n += np;
        }
        n = topk_select(n, b, all);
        topk_sort(n, all);
        memcpy(s->kept + (size_t)unit * b, all, (size_t)n * sizeof(topk_cand));
        s->n_kept[unit] = n;
        for (int j = 0; t->cands && j < n; j++)
            t->cands[(size_t)unit * b + j] = (topk_cand){all[j].score, ls->pos[all[j].pos]};
        if (t->n_cands) t->n_cands[unit] = n;
    }
}

/* Parts per KV head for a FASA scan of n_vis rows on T threads: 1 (the scan by KV head
 * alone, s_score_groups) unless more parts cut the rounds of work (in units of one KV
 * head's scan: ceil(hkv P / T) / P) by a fifth or more; each part pays its own running
 * top-k's warm-up (about 10% of a step at 2 parts per KV head in `fasa bench attend`), so
 * 2 threads over 8 KV heads stay at 1 and 16 threads over 8 take 2. */
static int s_score_n_parts(int hkv, int T, int n_vis)
{
    const int n_ch = (n_vis + SHARD_CHUNK - 1) / SHARD_CHUNK;
    int best = 1;
    double best_t = (double)((hkv + T - 1) / T);
    for (int P = 2; P <= n_ch && P <= 8 && T > 1; P++) {
        const double t = (double)((hkv * P + T - 1) / T) / P;
        if (t <= 0.8 * best_t) best = P, best_t = t;
    }
    return best;
}

static int s_score_parts(shard_t *s, const shard_step *st, int n_parts, int n_vis, topk_cand *cands,
                         int *n_cands)
{
    const shard_layout *lay = &s->lay;
    const int hkv = lay->n_kv_heads, units = shard_units(s, st->gqa), b = st->budget;
    if (s_grow((void **)&s->part_buf, &s->part_cap,
               (size_t)units * n_parts * b * sizeof(topk_cand)) ||
        s_grow((void **)&s->part_n, &s->part_n_cap, (size_t)units * n_parts * sizeof(int)))
        return -1;
    int64_t bytes_t[hkv * n_parts], bytes = 0;
    s_parts_task task = {s, st, cands, n_cands, n_parts, n_vis, bytes_t};
    fasa_pool_run(s->pool, hkv * n_parts, s_part_run, &task);
    for (int i = 0; i < hkv * n_parts; i++) {
        if (bytes_t[i] < 0) return -1; /* out of memory in a task */
        bytes += bytes_t[i];
    }
    fasa_pool_run(s->pool, hkv, s_part_merge_run, &task);
    s->bytes_read_last = bytes;
    return 0;
}

int shard_score(shard_t *s, const shard_step *st, topk_cand *cands, int *n_cands)
{
    const shard_layout *lay = &s->lay;
    const int d = lay->head_dim, hkv = lay->n_kv_heads, grp = lay->n_heads / hkv;
    const int units = shard_units(s, st->gqa), b = st->budget;
    const int n_vis = shard_visible(s, st->layer, st->max_pos);
    const size_t acc_one = 2 * (size_t)b + SHARD_CHUNK;
    if (s_grow((void **)&s->kept, &s->kept_cap, (size_t)units * b * sizeof(topk_cand)) ||
        s_grow((void **)&s->acc_buf, &s->acc_cap, (size_t)grp * acc_one * sizeof(topk_cand)))
        return -1;
    s->kept_budget = b;
    const int sparq = st->method == SHARD_SPARQ, plus = st->method == SHARD_FASA_PLUS;
    if (sparq || plus || st->method == SHARD_QUEST) s_sums_catch_up(s, st->layer);
    if ((sparq || plus) && s_grow((void **)&s->aux, &s->aux_cap,
                                  (size_t)lay->n_heads * SHARD_SPARQ_AUX(d) * sizeof(double)))
        return -1;
    layer_store *ls = &s->layers[st->layer];
    if (plus && !ls->vk) { /* the sums of v kdom^T (s_plus_catch_up), at the first plus step */
        size_t n = 0;
        for (int g = 0; g < hkv; g++) n += (size_t)d * lay->n_dom[st->layer * hkv + g];
        ls->vk_rows = calloc((size_t)hkv, sizeof(int));
        ls->vk = calloc(n ? n : 1, sizeof(double));
        ls->vkf = calloc(n ? n : 1, sizeof(float));
        ls->sumf = calloc((size_t)hkv * 2 * d, sizeof(float));
        if (!ls->vk || !ls->vk_rows || !ls->vkf || !ls->sumf) {
            free(ls->vk), free(ls->vk_rows), free(ls->vkf), free(ls->sumf);
            ls->vk = NULL, ls->vk_rows = NULL, ls->vkf = NULL, ls->sumf = NULL;
            return -1;
        }
    }

    if (st->method == SHARD_STREAM) {
        s_score_stream(s, st, units, n_vis, cands, n_cands);
        return 0;
    }

    /* Every thread's accumulators (views: pool.h); the KV groups as tasks. */
    if (s_views_ready(s)) return -1;
    for (int i = 0; i < s->n_views; i++)
        if (s_grow((void **)&s->views[i]->acc_buf, &s->views[i]->acc_cap,
                   (size_t)grp * acc_one * sizeof(topk_cand)))
            return -1;
    if (plus) { /* the rows appended since the last plus step into the v kdom^T sums */
        s_plus_task pt = {s, st->layer};
        fasa_pool_run(s->pool, hkv, s_plus_catch_up_run, &pt);
    }
    const int n_parts =
        st->method == SHARD_FASA ? s_score_n_parts(hkv, fasa_pool_width(s->pool), n_vis) : 1;
    if (n_parts > 1) return s_score_parts(s, st, n_parts, n_vis, cands, n_cands);
    int64_t bytes_g[hkv], bytes = 0;
    s_score_task task = {s, st, cands, n_cands, bytes_g};
    fasa_pool_run(s->pool, hkv, s_score_run, &task);
    for (int g = 0; g < hkv; g++) {
        if (bytes_g[g] < 0) return -1; /* out of memory in a task */
        bytes += bytes_g[g];
    }
    s->bytes_read_last = bytes;
    return 0;
}

/* Dense phase 2 for KV head g: every visible row, in blocks of DENSE_BLOCK rows, each
 * folded into the group's partials by the fused kernel (kernels/dense.h: one pass over the
 * block's K and V, converting as it reads; faster than the earlier convert + sgemm blocks
 * in bench_kernels and `fasa bench attend`). */
static void s_attend_dense(shard_t *s, const shard_step *st, int g, int n_vis, const float *qf,
                           float *m, double *l, double *o)
{
    const shard_layout *lay = &s->lay;
    const int d = lay->head_dim, hkv = lay->n_kv_heads, grp = lay->n_heads / hkv;
    const int u = lay->n_dom[st->layer * hkv + g];
    const layer_store *ls = &s->layers[st->layer];
    float *scr = s->dscr;
    const double t = fasa_phase_now();
    for (int r0 = 0; r0 < n_vis; r0 += DENSE_BLOCK) {
        const int nb = n_vis - r0 < DENSE_BLOCK ? n_vis - r0 : DENSE_BLOCK;
        const kv_chunk *ch = &ls->chunks[r0 / SHARD_CHUNK][g];
        const int rr = r0 % SHARD_CHUNK;
        dense_block(SIMD_AUTO, lay->dtype, nb, d, u, grp, st->scale, qf,
                    s_at(s, ch->kdom, (size_t)(rr / SCORE_TILE) * u * SCORE_TILE),
                    s_at(s, ch->krest, (size_t)rr * (d - u)), s_at(s, ch->v, (size_t)rr * d), m, l,
                    o, scr);
    }
    fasa_phase_add(FASA_PHASE_KERNEL, t);
    s->bytes_read_last += (int64_t)n_vis * 2 * d * (int64_t)s_esz(s);
}

/* Rows a sparse step may attend per kept candidate (a QUEST candidate is a page). */
static int s_rows_per_cand(const shard_step *st)
{
    return st->method == SHARD_QUEST ? SHARD_QUEST_PAGE : 1;
}

/* Index of the page starting at position pp (binary search; the caller knows it is here). */
static int s_page_of(const layer_store *ls, int32_t pp)
{
    int lo = 0, hi = ls->n_pages - 1;
    while (lo < hi) {
        const int mid = lo + (hi - lo) / 2;
        if (ls->page_pos[mid] < pp)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* Copies row r of KV head g (key in permuted order, value) into slot n of the gather
 * buffers: f32 straight into s->gather, f16/bf16 raw into s->stage (s_gather_convert
 * converts them all at once). cap: the rows the buffers hold. */
static void s_gather_row(shard_t *s, int layer, int g, int r, int n, size_t cap)
{
    const shard_layout *lay = &s->lay;
    const int d = lay->head_dim, u = lay->n_dom[layer * lay->n_kv_heads + g];
    const kv_chunk *ch = &s->layers[layer].chunks[r / SHARD_CHUNK][g];
    const int rr = r % SHARD_CHUNK;
    const size_t kd0 = (size_t)(rr / SCORE_TILE) * u * SCORE_TILE + rr % SCORE_TILE;
    float *kg = s->gather, *vg = kg + cap * d;
    if (lay->dtype == FASA_DTYPE_F32) {
        float *krow = kg + (size_t)n * d;
        const float *kd = (const float *)ch->kdom + kd0;
        for (int p = 0; p < u; p++) krow[p] = kd[(size_t)p * SCORE_TILE];
        memcpy(krow + u, (const float *)ch->krest + (size_t)rr * (d - u),
               (size_t)(d - u) * sizeof(float));
        memcpy(vg + (size_t)n * d, (const float *)ch->v + (size_t)rr * d,
               (size_t)d * sizeof(float));
    } else {
        uint16_t *krow = s->stage + (size_t)n * d;
        const uint16_t *kd = (const uint16_t *)ch->kdom + kd0;
        for (int p = 0; p < u; p++) krow[p] = kd[(size_t)p * SCORE_TILE];
        memcpy(krow + u, (const uint16_t *)ch->krest + (size_t)rr * (d - u), (size_t)(d - u) * 2);
        memcpy(s->stage + (cap + n) * d, (const uint16_t *)ch->v + (size_t)rr * d, (size_t)d * 2);
    }
}

/* Prefetches what s_gather_row of row r reads (its dims in the dim-major tile, the rest of
 * its key and its value): rows are gathered a few ahead of their copy, so that their cache
 * misses overlap instead of coming one row at a time. */
static void s_gather_prefetch(const shard_t *s, int layer, int g, int r)
{
    const shard_layout *lay = &s->lay;
    const int d = lay->head_dim, u = lay->n_dom[layer * lay->n_kv_heads + g];
    const kv_chunk *ch = &s->layers[layer].chunks[r / SHARD_CHUNK][g];
    const int rr = r % SHARD_CHUNK;
    const size_t esz = (size_t)s_esz(s);
    const char *kd = (const char *)ch->kdom +
                     ((size_t)(rr / SCORE_TILE) * u * SCORE_TILE + rr % SCORE_TILE) * esz;
    for (size_t b = 0; b < (size_t)u * SCORE_TILE * esz; b += 64) __builtin_prefetch(kd + b);
    const char *kr = (const char *)ch->krest + (size_t)rr * (d - u) * esz;
    for (size_t b = 0; b < (size_t)(d - u) * esz; b += 64) __builtin_prefetch(kr + b);
    const char *v = (const char *)ch->v + (size_t)rr * d * esz;
    for (size_t b = 0; b < (size_t)d * esz; b += 64) __builtin_prefetch(v + b);
}

#define S_GATHER_AHEAD 4

static void s_gather_convert(shard_t *s, int n, size_t cap)
{
    const int d = s->lay.head_dim;
    if (s->lay.dtype == FASA_DTYPE_F32) return;
    dtype_to_f32(SIMD_AUTO, s->lay.dtype, (size_t)n * d, s->stage, s->gather);
    dtype_to_f32(SIMD_AUTO, s->lay.dtype, (size_t)n * d, s->stage + cap * d, s->gather + cap * d);
}

/* Sparse phase 2 for one unit: gathers the kept rows not worse than thr (QUEST: the visible
 * rows of the kept pages not worse than thr) and attends the unit's n_q heads (queries
 * qf (n_q, d), permuted order) over them. */
static void s_attend_rows(shard_t *s, const shard_step *st, int g, int unit, topk_cand thr, int n_q,
                          int n_vis, const float *qf, float *m, double *l, double *o)
{
    const int d = s->lay.head_dim;
    const layer_store *ls = &s->layers[st->layer];
    const topk_cand *kept = s->kept + (size_t)unit * s->kept_budget;
    const size_t cap = (size_t)s->kept_budget * s_rows_per_cand(st);
    float *kg = s->gather, *vg = kg + cap * d;
    float *lg = vg + cap * d;
    double t = fasa_phase_now(); /* phase.h: 0 unless a benchmark times phases */
    int n = 0;
    for (int i = 0; i < s->n_kept[unit]; i++) {
        int r0, r1;
        if (st->method == SHARD_QUEST) {
            if (topk_better(thr, kept[i])) continue;
            const int pi = s_page_of(ls, kept[i].pos);
            r0 = ls->page_row0[pi];
            r1 = pi + 1 < ls->n_pages ? ls->page_row0[pi + 1] : ls->n_rows;
            if (r1 > n_vis) r1 = n_vis;
        } else { /* a kept row index: its position is one load away */
            r0 = kept[i].pos;
            r1 = r0 + 1;
            if (topk_better(thr, (topk_cand){kept[i].score, ls->pos[r0]})) continue;
        }
        for (int r = r0; r < r1; r++) s_gather_row(s, st->layer, g, r, n++, cap);
    }
    if (n == 0) {
        fasa_phase_add(FASA_PHASE_GATHER, t);
        return;
    }
    s_gather_convert(s, n, cap);
    if (st->method == SHARD_FASA_PLUS)
        s_plus_take(s, st, unit, s->lay.n_dom[st->layer * s->lay.n_kv_heads + g], n, NULL, qf, kg,
                    vg);
    t = fasa_phase_add(FASA_PHASE_GATHER, t);
    score_rows(n, d, n_q, lg, (int)cap, qf, kg, d, 0);
    for (int i = 0; i < n_q; i++)
        for (int j = 0; j < n; j++) lg[(size_t)i * cap + j] *= st->scale;
    attn_accum(n, d, n_q, lg, (int)cap, vg, d, m, l, o);
    fasa_phase_add(FASA_PHASE_KERNEL, t);
    s->bytes_read_last += (int64_t)n * 2 * d * (int64_t)s_esz(s);
}

/* Sparse phase 2 of per-head GQA for KV group g (every method but QUEST): gathers the union
 * of the group's heads' selections once (each row of KV head g read once, however many of
 * its heads selected it), scores it against the group's queries, and attends each head
 * over its own rows only, in its kept order (FASA_PLUS: each head with a selection over the
 * whole union, in union order): the same arithmetic, row by row, as attending each head
 * alone (score_rows and one head of attn_accum). */
static void s_attend_union(shard_t *s, const shard_step *st, int g, const topk_cand *thr,
                           const uint8_t *have_thr, const float *qf, float *m, double *l, double *o)
{
    const shard_layout *lay = &s->lay;
    const int d = lay->head_dim, grp = lay->n_heads / lay->n_kv_heads, b = s->kept_budget;
    const layer_store *ls = &s->layers[st->layer];
    const size_t cap = (size_t)grp * b;
    if (++s->stamp_gen == 0) { /* wrapped: no stale stamp may match */
        memset(s->stamp, 0, s->stamp_cap * sizeof(*s->stamp));
        s->stamp_gen = 1;
    }
    const uint32_t gen = s->stamp_gen;
    double t = fasa_phase_now(); /* phase.h: 0 unless a benchmark times phases */
    int n = 0, n_mem[grp];
    for (int i = 0; i < grp; i++) {
        const int h = g * grp + i;
        const topk_cand *kept = s->kept + (size_t)h * b;
        int *mem = s->members + (size_t)i * b;
        n_mem[i] = 0;
        if (!have_thr[h]) continue;
        for (int j = 0; j < s->n_kept[h]; j++) {
            const int r = kept[j].pos;
            if (topk_better(thr[h], (topk_cand){kept[j].score, ls->pos[r]})) continue;
            if (s->stamp[r] != gen) {
                s->stamp[r] = gen;
                s->slot[r] = n;
                s->urows[n++] = r;
            }
            mem[n_mem[i]++] = s->slot[r];
        }
    }
    if (n == 0) {
        fasa_phase_add(FASA_PHASE_GATHER, t);
        return;
    }
    for (int j = 0; j < n && j < S_GATHER_AHEAD; j++)
        s_gather_prefetch(s, st->layer, g, s->urows[j]);
    for (int j = 0; j < n; j++) {
        if (j + S_GATHER_AHEAD < n)
            s_gather_prefetch(s, st->layer, g, s->urows[j + S_GATHER_AHEAD]);
        s_gather_row(s, st->layer, g, s->urows[j], j, cap);
    }
    s_gather_convert(s, n, cap);
    const float *kg = s->gather, *vg = kg + cap * d;
    /* FASA_PLUS: each head with a selection attends every row of the union, in union
     * order (the rows were read for the group anyway), and takes them out of its aux. */
    const int plus = st->method == SHARD_FASA_PLUS;
    const int *memp[grp];
    for (int i = 0; i < grp; i++) {
        memp[i] = plus ? s->slot_id : s->members + (size_t)i * b;
        if (plus && have_thr[g * grp + i]) n_mem[i] = n;
    }
    for (int i = 0; plus && i < grp; i++)
        if (n_mem[i] > 0)
            s_plus_take(s, st, g * grp + i, lay->n_dom[st->layer * lay->n_kv_heads + g], n, memp[i],
                        qf + (size_t)i * d, kg, vg);
    t = fasa_phase_add(FASA_PHASE_GATHER, t);
    float *lg = s->gather + 2 * cap * d;
    score_rows(n, d, grp, lg, (int)cap, qf, kg, d, 0);
    for (int i = 0; i < grp; i++) {
        if (n_mem[i] == 0) continue;
        const int *mem = memp[i];
        const float *lh = lg + (size_t)i * cap;
        double *oh = o + (size_t)i * d;
        /* attn_accum for one head over the member rows, in member order. */
        float mb = lh[mem[0]] * st->scale;
        for (int j = 1; j < n_mem[i]; j++) {
            const float z = lh[mem[j]] * st->scale;
            mb = z > mb ? z : mb;
        }
        if (mb > m[i]) {
            const double r = m[i] == -INFINITY ? 0.0 : exp((double)m[i] - mb);
            l[i] *= r;
            for (int c = 0; c < d; c++) oh[c] *= r;
            m[i] = mb;
        }
        for (int j = 0; j < n_mem[i]; j++) {
            const double p = expf(lh[mem[j]] * st->scale - m[i]);
            l[i] += p;
            const float *vj = vg + (size_t)mem[j] * d;
            for (int c = 0; c < d; c++) oh[c] += p * vj[c];
        }
    }
    s->bytes_read_last += (int64_t)n * 2 * d * (int64_t)s_esz(s);
    fasa_phase_add(FASA_PHASE_KERNEL, t);
}

/* Per-head GQA gathers per KV group (s_attend_union) where its buffers stay modest (the
 * union of grp selections); QUEST, very large groups and the reference
 * (shard_set_gather_per_head) go a head at a time. */
static int s_by_group(const shard_t *s, const shard_step *st)
{
    const int d = s->lay.head_dim, grp = s->lay.n_heads / s->lay.n_kv_heads;
    if (st->method == SHARD_FASA_PLUS) return !s->gather_per_head && grp > 1; /* the union */
    return st->method != SHARD_DENSE && st->method != SHARD_QUEST && !s->gather_per_head &&
           st->gqa == SHARD_GQA_PER_HEAD && grp > 1 &&
           (size_t)grp * s->kept_budget * (2 * (size_t)d + grp) <= ((size_t)1 << 24);
}

/* FASA_PLUS's reference phase 2 (shard_set_gather_per_head) for head i of KV group g: the
 * group's union of selections (s_attend_union's rows, in its order) gathered for this head
 * alone, taken out of its aux and attended by score_rows and attn_accum. */
static void s_attend_plus_ref(shard_t *s, const shard_step *st, int g, int i, const topk_cand *thr,
                              const uint8_t *have_thr, const float *qf, float *m, double *l,
                              double *o)
{
    const shard_layout *lay = &s->lay;
    const int d = lay->head_dim, grp = lay->n_heads / lay->n_kv_heads, b = s->kept_budget;
    const layer_store *ls = &s->layers[st->layer];
    const size_t cap = (size_t)grp * b;
    if (!have_thr[g * grp + i]) return;
    if (++s->stamp_gen == 0) {
        memset(s->stamp, 0, s->stamp_cap * sizeof(*s->stamp));
        s->stamp_gen = 1;
    }
    const uint32_t gen = s->stamp_gen;
    int n = 0;
    for (int x = 0; x < grp; x++) {
        const int h = g * grp + x;
        const topk_cand *kept = s->kept + (size_t)h * b;
        for (int j = 0; have_thr[h] && j < s->n_kept[h]; j++) {
            const int r = kept[j].pos;
            if (topk_better(thr[h], (topk_cand){kept[j].score, ls->pos[r]})) continue;
            if (s->stamp[r] != gen) s->stamp[r] = gen, s->urows[n++] = r;
        }
    }
    if (n == 0) return;
    for (int j = 0; j < n; j++) s_gather_row(s, st->layer, g, s->urows[j], j, cap);
    s_gather_convert(s, n, cap);
    float *kg = s->gather, *vg = kg + cap * d, *lg = vg + cap * d;
    s_plus_take(s, st, g * grp + i, lay->n_dom[st->layer * lay->n_kv_heads + g], n, NULL, qf, kg,
                vg);
    score_rows(n, d, 1, lg, (int)cap, qf, kg, d, 0);
    for (int j = 0; j < n; j++) lg[j] *= st->scale;
    attn_accum(n, d, 1, lg, (int)cap, vg, d, m, l, o);
    s->bytes_read_last += (int64_t)n * 2 * d * (int64_t)s_esz(s);
}

/* Phase 2 for KV head g in s (the shard or a view, its gather and stage grown). */
static void s_attend_group(shard_t *s, const shard_step *st, int g, int n_vis, const topk_cand *thr,
                           const uint8_t *have_thr, float *m, double *l, double *o)
{
    const shard_layout *lay = &s->lay;
    const int d = lay->head_dim, hkv = lay->n_kv_heads, grp = lay->n_heads / hkv;
    float *qf = s->qf;
    const int *perm = lay->perm + ((size_t)st->layer * hkv + g) * d;
    for (int i = 0; i < grp; i++)
        for (int p = 0; p < d; p++) qf[i * d + p] = st->q[(size_t)(g * grp + i) * d + perm[p]];
    float *mg = m + g * grp;
    double *lgp = l + g * grp, *og = o + (size_t)g * grp * d;
    if (st->method == SHARD_DENSE) {
        s_attend_dense(s, st, g, n_vis, qf, mg, lgp, og);
    } else if (s_by_group(s, st)) {
        s_attend_union(s, st, g, thr, have_thr, qf, mg, lgp, og);
    } else if (st->gqa == SHARD_GQA_SHARED) {
        if (have_thr[g]) s_attend_rows(s, st, g, g, thr[g], grp, n_vis, qf, mg, lgp, og);
    } else if (st->method == SHARD_FASA_PLUS && grp > 1) {
        for (int i = 0; i < grp; i++)
            s_attend_plus_ref(s, st, g, i, thr, have_thr, qf + (size_t)i * d, mg + i, lgp + i,
                              og + (size_t)i * d);
    } else {
        for (int i = 0; i < grp; i++) {
            const int h = g * grp + i;
            if (have_thr[h])
                s_attend_rows(s, st, g, h, thr[h], 1, n_vis, qf + (size_t)i * d, mg + i, lgp + i,
                              og + (size_t)i * d);
        }
    }
}

typedef struct s_attend_task {
    shard_t *s;
    const shard_step *st;
    int n_vis;
    const topk_cand *thr;
    const uint8_t *have_thr;
    float *m;
    double *l, *o;
} s_attend_task;

static void s_attend_run(void *ctx, int g, int tid)
{
    s_attend_task *t = ctx;
    s_attend_group(s_view(t->s, tid), t->st, g, t->n_vis, t->thr, t->have_thr, t->m, t->l, t->o);
}

/* Grows the gather and stage buffers of a sparse step in s (the shard or a view) to
 * rows_cap rows, and with by_group the union's arrays (s_attend_union) for n_rows rows. */
static int s_attend_grow(shard_t *s, size_t rows_cap, int by_group, int n_rows)
{
    const shard_layout *lay = &s->lay;
    const int d = lay->head_dim, grp = lay->n_heads / lay->n_kv_heads;
    if (s_grow((void **)&s->gather, &s->gather_cap,
               ((size_t)2 * d + grp) * rows_cap * sizeof(float)) ||
        (lay->dtype != FASA_DTYPE_F32 &&
         s_grow((void **)&s->stage, &s->stage_cap, (size_t)2 * d * rows_cap * sizeof(uint16_t))))
        return -1;
    if (!by_group) return 0;
    if ((size_t)n_rows > s->stamp_cap) {
        size_t cap = s->stamp_cap ? s->stamp_cap : 4096;
        while (cap < (size_t)n_rows) cap *= 2;
        uint32_t *stamp = s_xrealloc(s->stamp, cap * sizeof(*stamp));
        if (!stamp) return -1;
        memset(stamp + s->stamp_cap, 0, (cap - s->stamp_cap) * sizeof(*stamp));
        s->stamp = stamp;
        int *slot = s_xrealloc(s->slot, cap * sizeof(*slot));
        if (!slot) return -1;
        s->slot = slot;
        s->stamp_cap = cap;
    }
    if ((size_t)grp * s->kept_budget > s->members_cap) {
        const size_t cap = (size_t)grp * s->kept_budget;
        int *mem = s_xrealloc(s->members, cap * sizeof(int));
        if (!mem) return -1;
        s->members = mem;
        int *ur = s_xrealloc(s->urows, cap * sizeof(int));
        if (!ur) return -1;
        s->urows = ur;
        int *id = s_xrealloc(s->slot_id, cap * sizeof(int));
        if (!id) return -1;
        s->slot_id = id;
        for (size_t i = 0; i < cap; i++) id[i] = (int)i;
        s->members_cap = cap;
    }
    return 0;
}

int shard_attend(shard_t *s, const shard_step *st, const topk_cand *thr, const uint8_t *have_thr,
                 float *m, double *l, double *o)
{
    const shard_layout *lay = &s->lay;
    const int d = lay->head_dim, hkv = lay->n_kv_heads;
    attn_state_init(lay->n_heads, d, m, l, o);
    if (st->method == SHARD_SPARQ || st->method == SHARD_FASA_PLUS || st->method == SHARD_QUEST)
        s_sums_catch_up(s, st->layer);
    if (st->method == SHARD_FASA_PLUS) { /* the score's aux, less the rows attended below */
        const size_t na = (size_t)lay->n_heads * SHARD_SPARQ_AUX(d) * sizeof(double);
        if (s_grow((void **)&s->plus_aux, &s->plus_aux_cap, na)) return -1;
        memcpy(s->plus_aux, s->aux, na);
    }
    if (s_views_ready(s)) return -1;
    if (st->method == SHARD_DENSE) {
        const size_t need = DENSE_SCRATCH(lay->n_heads / hkv, d) * sizeof(float);
        if (s_grow((void **)&s->dscr, &s->dscr_cap, need)) return -1;
        for (int i = 0; i < s->n_views; i++)
            if (s_grow((void **)&s->views[i]->dscr, &s->views[i]->dscr_cap, need)) return -1;
        s->bytes_read_last = 0;
    } else {
        const int n_rows = s->layers[st->layer].n_rows;
        const int by_group = s_by_group(s, st) || st->method == SHARD_FASA_PLUS;
        const size_t rows_cap = by_group ? (size_t)(lay->n_heads / hkv) * s->kept_budget
                                         : (size_t)s->kept_budget * s_rows_per_cand(st);
        if (s_attend_grow(s, rows_cap, by_group, n_rows)) return -1;
        for (int i = 0; i < s->n_views; i++)
            if (s_attend_grow(s->views[i], rows_cap, by_group, n_rows)) return -1;
    }
    s_attend_task task = {s, st, shard_visible(s, st->layer, st->max_pos), thr, have_thr, m, l, o};
    fasa_pool_run(s->pool, hkv, s_attend_run, &task);
    for (int i = 0; i < s->n_views; i++) s->bytes_read_last += s->views[i]->bytes_read_last;
    return 0;
}

int64_t shard_bytes_read(const shard_t *s)
{
    return s->bytes_read_last;
}

/* The growth rule of s_reserve: capacity first0, doubled until it holds need (0 for none). */
static int64_t s_cap(int64_t need, int64_t first)
{
    if (need <= 0) return 0;
    int64_t cap = first;
    while (cap < need) cap *= 2;
    return cap;
}

size_t shard_layer_bytes(const shard_layout *lay, int layer, int64_t rows, int64_t pages)
{
    /* Full chunks, and the last one at the capacity its rows need (s_chunk_cap). */
    const int64_t full = rows / SHARD_CHUNK, rest = rows % SHARD_CHUNK;
    const int64_t esz = (int64_t)fasa_dtype_size(lay->dtype), d = lay->head_dim;
    int64_t per_row = 0; /* bytes of one row over every KV head */
    for (int g = 0; g < lay->n_kv_heads; g++) {
        const int64_t u = lay->n_dom[layer * lay->n_kv_heads + g];
        per_row += (u ? u : 1) * esz;
        /* Disk tier: kdom only in RAM; krest and v are file-backed. */
        if (lay->tier != SHARD_TIER_DISK) per_row += ((d - u ? d - u : 1) + d) * esz;
    }
    const int64_t chunk_rows = full * SHARD_CHUNK + (rest ? s_chunk_cap(rest) : 0);
    int64_t ksc = 0; /* the scoring store's copy, linear in the rows allocated */
    for (int g = 0; g < lay->n_kv_heads; g++)
        ksc +=
            (int64_t)s_ksc_bytes(lay, lay->n_dom[layer * lay->n_kv_heads + g], (size_t)chunk_rows);
    const int64_t bound = (int64_t)lay->n_kv_heads * 2 * lay->head_dim * (int64_t)sizeof(float);
    return (size_t)(chunk_rows * per_row + ksc + s_cap(rows, 1024) * (int64_t)sizeof(int32_t) +
                    s_cap(pages, 64) * ((int64_t)sizeof(int32_t) + (int64_t)sizeof(int) + bound));
}

size_t shard_bytes_held(const shard_t *s)
{
    size_t total = 0;
    for (int l = 0; l < s->lay.n_layers; l++)
        total += shard_layer_bytes(&s->lay, l, s->layers[l].n_rows, s->layers[l].n_pages);
    return total;
}

void shard_holdings_add(shard_holdings *h, const shard_t *s)
{
    int64_t kdom, krest, v;
    shard_bytes_by_kind(s, &kdom, &krest, &v);
    h->sessions++;
    h->tokens += shard_rows(s, 0);
    for (int l = 0; l < s->lay.n_layers; l++) h->rows += shard_rows(s, l);
    h->kdom_bytes += kdom;
    h->krest_bytes += krest;
    h->v_bytes += v;
    h->alloc_bytes += (int64_t)shard_bytes_held(s);
}

int64_t fasa_rss_bytes(void)
{
    FILE *f = fopen("/proc/self/statm", "r");
    long long size = 0, rss = 0;
    const int got = f ? fscanf(f, "%lld %lld", &size, &rss) : 0;
    if (f) fclose(f);
    return got == 2 ? (int64_t)rss * sysconf(_SC_PAGESIZE) : 0;
}

size_t shard_bytes_allocated(const shard_t *s)
{
    const int hkv = s->lay.n_kv_heads, d = s->lay.head_dim;
    const size_t esz = s_esz(s), bound = (size_t)hkv * 2 * d * sizeof(float);
    size_t total = 0;
    for (int l = 0; l < s->lay.n_layers; l++) {
        const layer_store *ls = &s->layers[l];
        for (int c = 0; c < ls->n_chunks; c++)
            for (int g = 0; g < hkv; g++) {
                const size_t u = (size_t)s->lay.n_dom[l * hkv + g],
                             cap = (size_t)ls->chunks[c][g].cap;
                total += cap * (u ? u : 1) * esz + s_ksc_bytes(&s->lay, (int)u, cap);
                if (!ls->chunks[c][0].map) total += cap * ((d - u ? d - u : 1) + (size_t)d) * esz;
            }
        total += (size_t)ls->pos_cap * sizeof(int32_t) +
                 (size_t)ls->page_cap * (sizeof(int32_t) + sizeof(int) + bound);
    }
    return total;
}

size_t shard_bytes_mapped(const shard_t *s)
{
    size_t total = 0;
    for (int l = 0; l < s->lay.n_layers; l++)
        for (int c = 0; c < s->layers[l].n_chunks; c++)
            total += s->layers[l].chunks[c][0].map_bytes;
    return total;
}

void shard_bytes_by_kind(const shard_t *s, int64_t *kdom_p, int64_t *krest_p, int64_t *v_p)
{
    const int hkv = s->lay.n_kv_heads, d = s->lay.head_dim;
    int64_t dom = 0, all = 0; /* dims held: dominant ones, and all of them */
    for (int l = 0; l < s->lay.n_layers; l++) {
        const int64_t rows = s->layers[l].n_rows;
        for (int g = 0; g < hkv; g++) dom += rows * s->lay.n_dom[l * hkv + g];
        all += rows * hkv * d;
    }
    const int64_t esz = (int64_t)s_esz(s);
    *kdom_p = dom * esz;
    *krest_p = (all - dom) * esz;
    *v_p = all * esz;
}

int shard_read_rows(const shard_t *s, int layer, int row0, int n, int32_t *pos, float *k, float *v)
{
    const layer_store *ls = &s->layers[layer];
    if (row0 < 0 || n < 0 || row0 > ls->n_rows || n > ls->n_rows - row0) return -1;
    const shard_layout *lay = &s->lay;
    const int d = lay->head_dim, hkv = lay->n_kv_heads, dt = lay->dtype;
    for (int i = 0; i < n; i++) {
        const int r = row0 + i;
        const kv_chunk *ch = ls->chunks[r / SHARD_CHUNK];
        const int rr = r % SHARD_CHUNK, tile = rr / SCORE_TILE, lane = rr % SCORE_TILE;
        if (pos) pos[i] = ls->pos[r];
        for (int g = 0; k && g < hkv; g++) {
            /* Undo the packing of shard_append: dims perm[p] back to their places, as f32
             * (exact: every stored f16/bf16 value is an f32). */
            const int u = lay->n_dom[layer * hkv + g];
            const int *perm = lay->perm + ((size_t)layer * hkv + g) * d;
            float *kr = k + ((size_t)i * hkv + g) * d;
            const size_t kd0 = (size_t)tile * u * SCORE_TILE + lane;
            for (int p = 0; p < u; p++)
                kr[perm[p]] = s_get(dt, ch[g].kdom, kd0 + (size_t)p * SCORE_TILE);
            for (int p = u; p < d; p++)
                kr[perm[p]] = s_get(dt, ch[g].krest, (size_t)rr * (d - u) + (size_t)(p - u));
        }
        for (int g = 0; v && g < hkv; g++)
            for (int c = 0; c < d; c++)
                v[((size_t)i * hkv + g) * d + c] = s_get(dt, ch[g].v, (size_t)rr * d + c);
    }
    return 0;
}

#include "topk.h"

#include <stdlib.h>
#include <string.h>

static inline void s_swap(topk_cand *a, topk_cand *b)
{
    topk_cand t = *a;
    *a = *b;
    *b = t;
}

static int s_cmp_best_first(const void *pa, const void *pb)
{
    const topk_cand a = *(const topk_cand *)pa, b = *(const topk_cand *)pb;
    if (topk_better(a, b)) return -1;
    if (topk_better(b, a)) return 1;
    return 0;
}

static void s_qsort(int n, topk_cand *items)
{
    if (n > 1) qsort(items, (size_t)n, sizeof(*items), s_cmp_best_first);
}

/* A key whose ascending order is the best-first order: the score mapped to an unsigned
 * that grows with the score (-0 as +0, every NaN below -inf), inverted, then the position
 * with its sign bit flipped. */
static uint64_t s_key(topk_cand c)
{
    uint32_t b;
    float x = c.score + 0.0f; /* -0 -> +0 */
    memcpy(&b, &x, 4);
    uint32_t ord;
    if (c.score != c.score)
        ord = 0;
    else
        ord = (b & 0x80000000u) ? ~b : b | 0x80000000u;
    return (uint64_t)(~ord) << 32 | (uint32_t)((uint32_t)c.pos ^ 0x80000000u);
}

typedef struct s_keyed {
    uint64_t key;
    topk_cand c;
} s_keyed;

void topk_sort(int n, topk_cand *items)
{
    if (n <= 1) return;
    if (n <= 16) { /* insertion sort */
        for (int i = 1; i < n; i++) {
            const topk_cand c = items[i];
            int j = i;
            for (; j > 0 && topk_better(c, items[j - 1]); j--) items[j] = items[j - 1];
            items[j] = c;
        }
        return;
    }
    s_keyed stack[2 * 1024], *a = stack;
    if (n > 1024 && !(a = malloc(2 * (size_t)n * sizeof(*a)))) abort();
    s_keyed *b = a + n;
    size_t count[8][256];
    memset(count, 0, sizeof(count));
    for (int i = 0; i < n; i++) {
        const uint64_t k = s_key(items[i]);
        a[i] = (s_keyed){k, items[i]};
        for (int d = 0; d < 8; d++) count[d][(k >> (8 * d)) & 0xff]++;
    }
    for (int d = 0; d < 8; d++) {
        size_t *cd = count[d];
        if (cd[(a[0].key >> (8 * d)) & 0xff] == (size_t)n) continue; /* one digit value */
        size_t sum = 0;
        for (int v = 0; v < 256; v++) {
            const size_t c = cd[v];
            cd[v] = sum;
            sum += c;
        }
        for (int i = 0; i < n; i++) b[cd[(a[i].key >> (8 * d)) & 0xff]++] = a[i];
        s_keyed *t = a;
        a = b, b = t;
    }
    for (int i = 0; i < n; i++) items[i] = a[i].c;
    if (n > 1024) free(a < b ? a : b);
}

/* Lomuto-free Hoare-style partition around the median of three: afterwards
 * items[lo..p) rank before items[p] and items(p..hi] after it. Returns p. */
static int s_partition(topk_cand *items, int lo, int hi)
{
    const int mid = lo + (hi - lo) / 2;
    if (topk_better(items[mid], items[lo])) s_swap(&items[mid], &items[lo]);
    if (topk_better(items[hi], items[lo])) s_swap(&items[hi], &items[lo]);
    if (topk_better(items[hi], items[mid])) s_swap(&items[hi], &items[mid]);
    /* items[mid] is the median: park it at hi - 1 (hi holds something worse). */
    if (hi - lo < 3) return mid;
    s_swap(&items[mid], &items[hi - 1]);
    const topk_cand pivot = items[hi - 1];
    int i = lo, j = hi - 1;
    for (;;) {
        while (topk_better(items[++i], pivot)) {
        }
        while (topk_better(pivot, items[--j])) {
        }
        if (i >= j) break;
        s_swap(&items[i], &items[j]);
    }
    s_swap(&items[i], &items[hi - 1]);
    return i;
}

int topk_select(int n, int k, topk_cand *items)
{
    if (k <= 0 || n <= 0) return 0;
    if (k >= n) return n;
    int lo = 0, hi = n - 1;
    /* Each round should at least shrink the range by a quarter on average; give up on
     * quickselect after that many rounds have failed and sort the rest instead. */
    int budget = 64;
    while (hi > lo) {
        if (--budget == 0) {
            topk_sort(hi - lo + 1, items + lo);
            break;
        }
        const int p = s_partition(items, lo, hi);
        if (p == k || p == k - 1) break;
        if (p < k)
            lo = p + 1;
        else
            hi = p - 1;
    }
    return k;
}

int topk_ref(int n, int k, const topk_cand *in, topk_cand *out)
{
    if (k <= 0 || n <= 0) return 0;
    topk_cand *all = malloc((size_t)n * sizeof(*all));
    if (!all) abort();
    for (int i = 0; i < n; i++) all[i] = in[i];
    s_qsort(n, all);
    const int m = k < n ? k : n;
    for (int i = 0; i < m; i++) out[i] = all[i];
    free(all);
    return m;
}

void topk_acc_init(topk_acc *acc, int k, topk_cand *buf, int cap)
{
    acc->items = buf;
    acc->n = 0;
    acc->cap = cap;
    acc->k = k;
    acc->have_thr = 0;
}

/* Cuts the held candidates back to the best k and records the k-th as the threshold. */
void topk_acc_compact(topk_acc *acc)
{
    topk_select(acc->n, acc->k, acc->items);
    acc->n = acc->k;
    topk_cand worst = acc->items[0];
    for (int i = 1; i < acc->n; i++)
        if (topk_better(worst, acc->items[i])) worst = acc->items[i];
    acc->thr = worst;
    acc->have_thr = 1;
}

void topk_acc_push(topk_acc *acc, int n, const float *scores, const int32_t *pos, int32_t pos0)
{
    if (acc->k <= 0) return;
    /* Compacting only when full keeps the cost amortised O(1) per stored candidate: after a
     * compaction k are held, and at least cap - k - n >= k more fit before the next. */
    if (acc->n + n > acc->cap) topk_acc_compact(acc);
    topk_cand *it = acc->items;
    int m = acc->n;
    if (acc->have_thr) {
        const topk_cand thr = acc->thr;
        for (int i = 0; i < n; i++) {
            const topk_cand c = {scores[i], pos ? pos[i] : pos0 + i};
            if (topk_better(c, thr)) it[m++] = c;
        }
    } else {
        for (int i = 0; i < n; i++) it[m++] = (topk_cand){scores[i], pos ? pos[i] : pos0 + i};
    }
    acc->n = m;
}

int topk_acc_finish_unsorted(topk_acc *acc)
{
    if (acc->n > acc->k) topk_acc_compact(acc);
    return acc->n;
}

int topk_acc_finish(topk_acc *acc)
{
    if (acc->n > acc->k) topk_acc_compact(acc);
    topk_sort(acc->n, acc->items);
    return acc->n;
}

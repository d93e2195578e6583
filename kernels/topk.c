#include "topk.h"

#include "simd.h"

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
    /* The digits to sort by: only bytes that differ between keys; none of the position's
     * when the items are in ascending position already (the passes are stable, so ties of
     * the score stay in that order, the order of the key); nothing when sorted already. */
    uint64_t k_or = 0, k_and = ~(uint64_t)0;
    int pos_up = 1, sorted = 1;
    for (int i = 0; i < n; i++) {
        const uint64_t k = s_key(items[i]);
        a[i] = (s_keyed){k, items[i]};
        k_or |= k, k_and &= k;
        if (i) {
            pos_up &= items[i - 1].pos < items[i].pos;
            sorted &= a[i - 1].key < k;
        }
    }
    uint64_t vary = k_or ^ k_and;
    if (pos_up) vary &= ~(uint64_t)0xffffffffu;
    for (int d = 0; d < 8 && !sorted; d++) {
        if (!((vary >> (8 * d)) & 0xff)) continue; /* one digit value */
        size_t cd[256];
        memset(cd, 0, sizeof(cd));
        for (int i = 0; i < n; i++) cd[(a[i].key >> (8 * d)) & 0xff]++;
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
    if (!sorted)
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

/* The quickselect the threshold selection replaced, kept for inputs too large for its key
 * scratch (and as a second implementation the tests compare with). */
int topk_select_qs(int n, int k, topk_cand *items)
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

/* ---- selection by threshold ----
 * The k best of n candidates are found without comparisons of candidates: each score maps
 * to a 32-bit key whose unsigned order is the score order (s_ord: NaN lowest, -0 as +0),
 * the k-th largest key T is found bit by bit from the top (a bit is set when at least k keys
 * are >= the prefix with it set: a count, branch-free and vectorised), and the keys equal to
 * T, when more of them than needed, are cut by position the same way (a lower position is a
 * larger key). Every candidate above T, and the chosen ones at T, are then moved to the front
 * in their original order (a stable partition), so a buffer filled in ascending position
 * stays in ascending position. */

/* The score's key: unsigned order = score order; NaN 0 (no number maps to 0). */
static inline uint32_t s_ord(float score)
{
    const float x = score + 0.0f; /* -0 -> +0 */
    uint32_t b;
    memcpy(&b, &x, 4);
    const uint32_t o = b ^ ((uint32_t)((int32_t)b >> 31) | 0x80000000u);
    return score != score ? 0u : o;
}

/* The position's key: a lower position is a larger key. */
static inline uint32_t s_pkey(int32_t pos)
{
    return ~((uint32_t)pos ^ 0x80000000u);
}

/* A candidate's 64-bit key: score key above, position key below (the total order). */
static inline uint64_t s_key64(uint32_t ord, int32_t pos)
{
    return (uint64_t)ord << 32 | s_pkey(pos);
}

/* The candidate of a 64-bit key, equal to the one it came from under the total order. */
static inline topk_cand s_of_key64(uint64_t k)
{
    const uint32_t o = (uint32_t)(k >> 32);
    const uint32_t b = o == 0 ? 0xffffffffu : (o & 0x80000000u) ? o ^ 0x80000000u : ~o;
    topk_cand c;
    memcpy(&c.score, &b, 4);
    c.pos = (int32_t)(~(uint32_t)k ^ 0x80000000u);
    return c;
}

/* ---- the passes, portable and AVX-512 (the same integers on both) ---- */

static void s_keys_port(const topk_cand *items, int n, uint32_t *key)
{
    for (int i = 0; i < n; i++) key[i] = s_ord(items[i].score);
}

static int s_count_ge_port(const uint32_t *key, int n, uint32_t c)
{
    int cnt = 0;
    for (int i = 0; i < n; i++) cnt += key[i] >= c;
    return cnt;
}

/* Copies the keys of in[0..n) within [lo, hi) to out (which may be in), in order; returns
 * how many, *up the count at or above hi. */
static int s_narrow_port(const uint32_t *in, int n, uint32_t *out, uint32_t lo, uint64_t hi,
                         int *up)
{
    int m = 0, u = 0;
    for (int i = 0; i < n; i++) {
        const uint32_t x = in[i];
        out[m] = x;
        m += x >= lo && (uint64_t)x < hi;
        u += (uint64_t)x >= hi;
    }
    *up = u;
    return m;
}

/* Moves the candidates whose 64-bit key is >= cut to the front in order (the rest are
 * lost); returns how many, *worst the least key among them. */
static int s_filter_port(topk_cand *items, const uint32_t *key, int n, uint64_t cut,
                         uint64_t *worst)
{
    int w = 0;
    uint64_t wk = UINT64_MAX;
    for (int i = 0; i < n; i++) {
        const topk_cand c = items[i];
        const uint64_t kk = s_key64(key[i], c.pos);
        const int keep = kk >= cut;
        wk = keep && kk < wk ? kk : wk;
        items[w] = c;
        w += keep;
    }
    *worst = wk;
    return w;
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define T_512 __attribute__((target("avx512f,avx512vl,avx2")))

/* Score keys of 8 candidates (AoS: the score is each 64-bit lane's low half). */
T_512 static inline __m256i s_keys8_512(__m512i v)
{
    const __m256 x = _mm256_add_ps(_mm256_castsi256_ps(_mm512_cvtepi64_epi32(v)),
                                   _mm256_setzero_ps()); /* -0 -> +0 */
    const __m256i b = _mm256_castps_si256(x);
    const __m256i o = _mm256_xor_si256(
        b, _mm256_or_si256(_mm256_srai_epi32(b, 31), _mm256_set1_epi32((int)0x80000000u)));
    return _mm256_andnot_si256(_mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)), o);
}

T_512 static void s_keys_512(const topk_cand *items, int n, uint32_t *key)
{
    int i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_si256((__m256i *)(key + i),
                            s_keys8_512(_mm512_loadu_si512((const void *)(items + i))));
    for (; i < n; i++) key[i] = s_ord(items[i].score);
}

T_512 static int s_count_ge_512(const uint32_t *key, int n, uint32_t c)
{
    const __m512i cv = _mm512_set1_epi32((int)c), one = _mm512_set1_epi32(1);
    __m512i acc0 = _mm512_setzero_si512(), acc1 = _mm512_setzero_si512();
    int i = 0;
    for (; i + 32 <= n; i += 32) {
        const __mmask16 m0 = _mm512_cmpge_epu32_mask(_mm512_loadu_si512(key + i), cv);
        const __mmask16 m1 = _mm512_cmpge_epu32_mask(_mm512_loadu_si512(key + i + 16), cv);
        acc0 = _mm512_mask_add_epi32(acc0, m0, acc0, one);
        acc1 = _mm512_mask_add_epi32(acc1, m1, acc1, one);
    }
    for (; i < n; i += 16) {
        const int r = n - i < 16 ? n - i : 16;
        const __mmask16 lm = (__mmask16)((1u << r) - 1u);
        const __mmask16 m0 =
            _mm512_mask_cmpge_epu32_mask(lm, _mm512_maskz_loadu_epi32(lm, key + i), cv);
        acc0 = _mm512_mask_add_epi32(acc0, m0, acc0, one);
    }
    return _mm512_reduce_add_epi32(_mm512_add_epi32(acc0, acc1));
}

T_512 static int s_narrow_512(const uint32_t *in, int n, uint32_t *out, uint32_t lo, uint64_t hi,
                              int *up)
{
    const __m512i lv = _mm512_set1_epi32((int)lo);
    const int top = hi > 0xffffffffu; /* the bucket reaches the top: nothing above it */
    const __m512i hv = _mm512_set1_epi32((int)(uint32_t)(top ? 0xffffffffu : hi));
    int m = 0, u = 0;
    for (int i = 0; i < n; i += 16) {
        const int r = n - i < 16 ? n - i : 16;
        const __mmask16 lm = (__mmask16)((1u << r) - 1u);
        const __m512i x = _mm512_maskz_loadu_epi32(lm, in + i);
        const __mmask16 ge = _mm512_mask_cmpge_epu32_mask(lm, x, lv);
        const __mmask16 above = top ? 0 : _mm512_mask_cmpge_epu32_mask(lm, x, hv);
        const __mmask16 in_b = ge & (__mmask16)~above;
        const int c = __builtin_popcount(in_b);
        _mm512_mask_storeu_epi32(out + m, (__mmask16)((1u << c) - 1u),
                                 _mm512_maskz_compress_epi32(in_b, x));
        m += c;
        u += __builtin_popcount(above);
    }
    *up = u;
    return m;
}

T_512 static int s_filter_512(topk_cand *items, const uint32_t *key, int n, uint64_t cut,
                              uint64_t *worst)
{
    const __m512i cv = _mm512_set1_epi64((long long)cut), px = _mm512_set1_epi64(0x7fffffff);
    __m512i wv = _mm512_set1_epi64(-1);
    int w = 0;
    for (int i = 0; i < n; i += 8) {
        const int r = n - i < 8 ? n - i : 8;
        const __mmask8 lm = (__mmask8)((1u << r) - 1u);
        const __m512i v = _mm512_maskz_loadu_epi64(lm, (const void *)(items + i));
        const __m512i kv =
            _mm512_slli_epi64(_mm512_cvtepu32_epi64(_mm256_maskz_loadu_epi32(lm, key + i)), 32);
        const __m512i kk = _mm512_or_si512(kv, _mm512_xor_si512(_mm512_srli_epi64(v, 32), px));
        const __mmask8 keep = _mm512_mask_cmpge_epu64_mask(lm, kk, cv);
        wv = _mm512_mask_min_epu64(wv, keep, wv, kk);
        const int c = __builtin_popcount(keep);
        _mm512_mask_storeu_epi64((void *)(items + w), (__mmask8)((1u << c) - 1u),
                                 _mm512_maskz_compress_epi64(keep, v));
        w += c;
    }
    *worst = (uint64_t)_mm512_reduce_min_epu64(wv);
    return w;
}

static int s_has_512(void)
{
    static int have = -1;
    int h = __atomic_load_n(&have, __ATOMIC_RELAXED);
    if (h < 0) {
        __builtin_cpu_init();
        h = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") ? 1 : 0;
        __atomic_store_n(&have, h, __ATOMIC_RELAXED);
    }
    return h;
}
#endif

/* 1 for the AVX-512 passes: where the CPU has them, unless FASA_SIMD named another path
 * (simd_path_named; the tests run both). */
static int s_use_512(void)
{
#if defined(__x86_64__) && defined(__GNUC__)
    const int named = simd_path_named();
    return (named < 0 || named == SIMD_AVX512) && s_has_512();
#else
    return 0;
#endif
}

#if defined(__x86_64__) && defined(__GNUC__)
#define S_PASS(USE, NAME, ...) ((USE) ? NAME##_512(__VA_ARGS__) : NAME##_port(__VA_ARGS__))
#else
#define S_PASS(USE, NAME, ...) NAME##_port(__VA_ARGS__)
#endif

/* The k-th largest of key[0..n) (1 <= k <= n) with its bits below stop left 0, when the keys
 * >= it are then at most keep_max; otherwise (or with stop 0) exactly the k-th largest.
 * *n_ge gets the count of keys >= the result (>= k). Every 8 bits the keys still in play
 * (the bucket of the prefix so far) are copied to scratch (room for n), the rest counted. */
static uint32_t s_kth(int use512, const uint32_t *key, int n, int k, int stop, int keep_max,
                      uint32_t *scratch, int *n_ge)
{
    uint32_t prefix = 0;
    int above = 0, cnt_prefix = n; /* keys past the bucket; the count >= prefix */
    const uint32_t *kp = key;
    for (int bit = 31; bit >= 0; bit--) {
        const uint32_t c = prefix | (1u << bit);
        const int cnt = S_PASS(use512 && n >= 64, s_count_ge, kp, n, c);
        if (cnt >= k) {
            prefix = c;
            cnt_prefix = above + cnt;
        }
        if (bit <= stop && cnt_prefix <= keep_max) break;
        if ((bit & 7) == 0 && bit > 0 && n > 32) {
            int up;
            n = S_PASS(use512, s_narrow, kp, n, scratch, prefix,
                       (uint64_t)prefix + ((uint64_t)1 << bit), &up);
            kp = scratch;
            k -= up;
            above += up;
        }
    }
    *n_ge = cnt_prefix;
    return prefix;
}

/* Scratch keys: 2 n of them, in the caller's spare room or on the stack (S_STACK_KEYS
 * candidates at most). */
#define S_STACK_KEYS 4096

/* The cut of the selection: the least 64-bit key kept. The best k of items[0..n) (k < n),
 * or with stop > 0 every candidate whose score key is >= a threshold the k best all reach,
 * when those are at most keep_max (the running top-k's trim); key: room for 2 n keys. */
static uint64_t s_cut(int use512, int n, int k, const topk_cand *items, uint32_t *key, int stop,
                      int keep_max)
{
    S_PASS(use512, s_keys, items, n, key);
    int n_ge;
    const uint32_t t = s_kth(use512, key, n, k, stop, stop > 0 ? keep_max : k, key + n, &n_ge);
    if (n_ge <= (stop > 0 ? keep_max : k)) return (uint64_t)t << 32;
    /* Too many at t (then t is exact): the ties with the lowest positions make up the k. */
    int gt = 0, m = 0;
    uint32_t *pk = key + n;
    for (int i = 0; i < n; i++) {
        gt += key[i] > t;
        pk[m] = s_pkey(items[i].pos);
        m += key[i] == t;
    }
    const uint32_t pk_min = s_kth(use512, pk, m, k - gt, 0, k - gt, pk, &n_ge);
    return (uint64_t)t << 32 | pk_min;
}

/* Moves the best k of items[0..n) (k < n) to the front in their order and the others after
 * them (a permutation); *worst the worst kept. */
static void s_select_perm(int n, int k, topk_cand *items, uint32_t *key, topk_cand *worst)
{
    const int use512 = s_use_512();
    const uint64_t cut = s_cut(use512, n, k, items, key, 0, k);
    int w = 0;
    uint64_t wk = UINT64_MAX;
    for (int i = 0; i < n; i++) {
        const topk_cand c = items[i];
        const uint64_t kk = s_key64(key[i], c.pos);
        const int keep = kk >= cut;
        wk = keep && kk < wk ? kk : wk;
        items[i] = items[w];
        items[w] = c;
        w += keep;
    }
    *worst = s_of_key64(wk);
}

int topk_select(int n, int k, topk_cand *items)
{
    if (k <= 0 || n <= 0) return 0;
    if (k >= n) return n;
    if (n > S_STACK_KEYS) return topk_select_qs(n, k, items);
    uint32_t stack[2 * S_STACK_KEYS];
    topk_cand worst;
    s_select_perm(n, k, items, stack, &worst);
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
    /* The fused scan compacts at lim held (scan.c s_insert): 4 k, within the buffer and
     * leaving room for the keys of a compaction (half of cap, less the 16 rows of a tile
     * that the AVX-512 kernel may insert past lim). */
    const int l4 = 4 * k, l2 = (cap - 32) / 2;
    acc->lim = l4 < l2 ? l4 : l2;
    if (acc->lim <= k) acc->lim = cap;
}

/* Cuts the held candidates back: exact != 0 to the best k, else to those at or above a
 * threshold the best k all reach, when they are at most k + half the slack lim - k (the next
 * compaction is then at least that far off; else to the best k); records the worst kept as
 * the threshold. The keys go in the buffer's spare room or on the stack; where neither has
 * room, the quickselect does it. */
static void s_compact(topk_acc *acc, int exact)
{
    const int n = acc->n, k = acc->k;
    if (n <= k) return;
    uint32_t stack[2 * S_STACK_KEYS];
    uint32_t *key = (size_t)(acc->cap - n) >= (size_t)n ? (uint32_t *)(void *)(acc->items + n)
                    : n <= S_STACK_KEYS                 ? stack
                                                        : NULL;
    if (!key) {
        const int m = topk_select_qs(n, k, acc->items);
        topk_cand worst = acc->items[0];
        for (int i = 1; i < m; i++)
            if (topk_better(worst, acc->items[i])) worst = acc->items[i];
        acc->n = m;
        acc->thr = worst;
        acc->have_thr = 1;
        return;
    }
    const int lim = acc->lim > k ? acc->lim : k;
    const int use512 = s_use_512();
    const uint64_t cut =
        s_cut(use512, n, k, acc->items, key, exact ? 0 : 16, exact ? k : k + (lim - k) / 2);
    uint64_t wk;
    acc->n = S_PASS(use512, s_filter, acc->items, key, n, cut, &wk);
    acc->thr = s_of_key64(wk);
    acc->have_thr = 1;
}

void topk_acc_compact(topk_acc *acc)
{
    s_compact(acc, 1);
}

void topk_acc_trim(topk_acc *acc)
{
    s_compact(acc, 0);
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
    if (acc->n > acc->k) s_compact(acc, 1);
    return acc->n;
}

int topk_acc_finish(topk_acc *acc)
{
    if (acc->n > acc->k) s_compact(acc, 1);
    topk_sort(acc->n, acc->items);
    return acc->n;
}

/* tok_bpe.c: rank lookup by token bytes (open-addressing hash) and the
 * byte-pair merge of one pre-tokenised piece.
 *
 * The merge must give tiktoken's ids exactly: repeatedly merge the adjacent pair
 * whose concatenation has the lowest rank, the leftmost one on ties, until no
 * adjacent pair is a token. Short pieces use tiktoken's own scheme (scan for the
 * minimum, O(n^2) but tiny n). Long pieces (one 100k-letter "word") would make
 * that quadratic, so they keep the pairs in a min-heap keyed by (rank, start)
 * over a linked list of parts, with stale entries skipped on pop: the same
 * choice at every step (lowest rank, then leftmost start), in O(n log n). */
#include "data/tok_bpe.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/log.h"

/* Pieces longer than this take the heap path (measured: the scan wins below). */
#define BPE_SCAN_MAX 64

static inline uint64_t bytes_hash(const uint8_t *s, size_t n) {
  uint64_t h = 0x9E3779B97F4A7C15ull ^ (n * 0xff51afd7ed558ccdull);
  while (n >= 8) {
    uint64_t w;
    memcpy(&w, s, 8);
    h = (h ^ w) * 0xbf58476d1ce4e5b9ull;
    h ^= h >> 31;
    s += 8, n -= 8;
  }
  if (n) {
    uint64_t w = 0;
    memcpy(&w, s, n);
    h = (h ^ w) * 0x94d049bb133111ebull;
  }
  h ^= h >> 29;
  h *= 0xbf58476d1ce4e5b9ull;
  return h ^ (h >> 32);
}

static inline uint32_t rank_lookup(const RankTable *rt, const uint8_t *s, size_t n) {
  if (n > rt->max_len) return TOK_NO_RANK;
  uint64_t h = bytes_hash(s, n), tag = h >> 32 << 32;
  for (uint32_t i = (uint32_t)h & rt->mask;; i = (i + 1) & rt->mask) {
    uint64_t e = rt->slots[i];
    if (!e) return TOK_NO_RANK;
    if ((e & 0xFFFFFFFF00000000ull) == tag) {
      uint32_t r = (uint32_t)e - 1;
      if (rt->off[r + 1] - rt->off[r] == n && !memcmp(rt->bytes + rt->off[r], s, n)) return r;
    }
  }
}

int rank_table_build(RankTable *rt, uint8_t *bytes, uint32_t *off, uint32_t n_ranks, char *err,
                     size_t errlen) {
  rt->bytes = bytes, rt->off = off, rt->n_ranks = n_ranks, rt->max_len = 0;
  uint32_t size = 1024;
  while (size < 2u * n_ranks) size *= 2;
  rt->mask = size - 1;
  rt->slots = xcalloc(size, sizeof *rt->slots);
  for (uint32_t r = 0; r < n_ranks; r++) {
    uint32_t n = off[r + 1] - off[r];
    if (!n) continue;
    if (n > rt->max_len) rt->max_len = n;
  }
  for (uint32_t r = 0; r < n_ranks; r++) {
    uint32_t n = off[r + 1] - off[r];
    if (!n) continue;
    const uint8_t *s = bytes + off[r];
    uint64_t h = bytes_hash(s, n), tag = h >> 32 << 32;
    uint32_t i = (uint32_t)h & rt->mask;
    for (; rt->slots[i]; i = (i + 1) & rt->mask) {
      uint64_t e = rt->slots[i];
      uint32_t q = (uint32_t)e - 1;
      if ((e & 0xFFFFFFFF00000000ull) == tag && off[q + 1] - off[q] == n && !memcmp(bytes + off[q], s, n)) {
        snprintf(err, errlen, "vocabulary has two ranks (%u, %u) for the same bytes", q, r);
        return -1;
      }
    }
    rt->slots[i] = tag | (uint64_t)(r + 1);
  }
  /* The merge starts from single bytes: byte-level BPE has a rank for each. */
  for (int b = 0; b < 256; b++) {
    uint8_t c = (uint8_t)b;
    if (rank_lookup(rt, &c, 1) == TOK_NO_RANK) {
      snprintf(err, errlen, "vocabulary has no token for byte 0x%02x", b);
      return -1;
    }
  }
  return 0;
}

void rank_table_free(RankTable *rt) {
  free(rt->bytes);
  free(rt->off);
  free(rt->slots);
  memset(rt, 0, sizeof *rt);
}

static void scratch_reserve(BpeScratch *sc, size_t n) {
  if (n <= sc->cap) return;
  size_t cap = sc->cap ? sc->cap : 256;
  while (cap < n) cap *= 2;
  sc->a = xrealloc(sc->a, cap * sizeof *sc->a);
  sc->b = xrealloc(sc->b, cap * sizeof *sc->b);
  sc->c = xrealloc(sc->c, cap * sizeof *sc->c);
  sc->d = xrealloc(sc->d, cap * sizeof *sc->d);
  sc->heap = xrealloc(sc->heap, 3 * cap * sizeof *sc->heap);
  sc->cap = cap;
}

void bpe_scratch_free(BpeScratch *sc) {
  free(sc->a), free(sc->b), free(sc->c), free(sc->d), free(sc->heap);
  memset(sc, 0, sizeof *sc);
}

/* tiktoken's scheme: parts st[0..m) (st[m] = n), pair ranks pr[i] of parts i, i+1,
 * token ranks tr[i] of each part. */
static size_t merge_scan(const RankTable *rt, const uint8_t *p, size_t n, uint32_t *out,
                         BpeScratch *sc) {
  uint32_t *st = sc->a, *pr = sc->b, *tr = out;
  size_t m = n;
  for (size_t i = 0; i <= n; i++) st[i] = (uint32_t)i;
  for (size_t i = 0; i < n; i++) tr[i] = rank_lookup(rt, p + i, 1);
  for (size_t i = 0; i + 1 < n; i++) pr[i] = rank_lookup(rt, p + i, 2);
  while (m > 1) {
    size_t best = 0;
    for (size_t i = 1; i + 1 < m; i++)
      if (pr[i] < pr[best]) best = i;
    uint32_t r = pr[best];
    if (r == TOK_NO_RANK) break;
    tr[best] = r;
    /* Drop part best+1. */
    memmove(st + best + 1, st + best + 2, (m - best - 1) * sizeof *st);
    memmove(tr + best + 1, tr + best + 2, (m - best - 2) * sizeof *tr);
    memmove(pr + best + 1, pr + best + 2, (m >= best + 3 ? m - best - 3 : 0) * sizeof *pr);
    m--;
    if (best + 1 < m) pr[best] = rank_lookup(rt, p + st[best], st[best + 2] - st[best]);
    if (best > 0) pr[best - 1] = rank_lookup(rt, p + st[best - 1], st[best + 1] - st[best - 1]);
  }
  return m;
}

static inline void heap_push(uint64_t *h, size_t *len, uint64_t key) {
  size_t i = (*len)++;
  while (i > 0) {
    size_t up = (i - 1) / 2;
    if (h[up] <= key) break;
    h[i] = h[up];
    i = up;
  }
  h[i] = key;
}

static inline uint64_t heap_pop(uint64_t *h, size_t *len) {
  uint64_t top = h[0], key = h[--(*len)];
  size_t i = 0, n = *len;
  for (;;) {
    size_t c = 2 * i + 1;
    if (c >= n) break;
    if (c + 1 < n && h[c + 1] < h[c]) c++;
    if (key <= h[c]) break;
    h[i] = h[c];
    i = c;
  }
  if (n) h[i] = key;
  return top;
}

/* Heap scheme: a part is named by its start byte; nx/pv link live parts (nx of
 * the last is n), pr[i] is the rank of part i joined with its successor, tr[i]
 * the rank of part i itself. */
static size_t merge_heap(const RankTable *rt, const uint8_t *p, size_t n, uint32_t *out,
                         BpeScratch *sc) {
  uint32_t *nx = sc->a, *pv = sc->b, *pr = sc->c, *tr = sc->d;
  uint64_t *heap = sc->heap;
  size_t hl = 0;
  for (size_t i = 0; i < n; i++) {
    nx[i] = (uint32_t)i + 1, pv[i] = (uint32_t)i - 1; /* pv[0] wraps: unused */
    tr[i] = rank_lookup(rt, p + i, 1);
    pr[i] = i + 1 < n ? rank_lookup(rt, p + i, 2) : TOK_NO_RANK;
    if (pr[i] != TOK_NO_RANK) heap_push(heap, &hl, (uint64_t)pr[i] << 32 | i);
  }
  while (hl) {
    uint64_t key = heap_pop(heap, &hl);
    uint32_t r = (uint32_t)(key >> 32), i = (uint32_t)key;
    /* Stale: part i was absorbed (tr = NO_RANK) or its pair changed; a pair's
     * span only grows, so a changed pair never shows its old rank again. */
    if (tr[i] == TOK_NO_RANK || pr[i] != r) continue;
    uint32_t j = nx[i], k = nx[j];
    tr[i] = r, tr[j] = TOK_NO_RANK;
    nx[i] = k;
    if (k < n) pv[k] = i;
    pr[i] = k < n ? rank_lookup(rt, p + i, nx[k] - i) : TOK_NO_RANK;
    if (pr[i] != TOK_NO_RANK) heap_push(heap, &hl, (uint64_t)pr[i] << 32 | i);
    if (i > 0) {
      uint32_t h = pv[i];
      pr[h] = rank_lookup(rt, p + h, k - h);
      if (pr[h] != TOK_NO_RANK) heap_push(heap, &hl, (uint64_t)pr[h] << 32 | h);
    }
  }
  size_t m = 0;
  for (uint32_t i = 0; i < n; i = nx[i]) out[m++] = tr[i];
  return m;
}

size_t bpe_encode_piece(const RankTable *rt, const uint8_t *piece, size_t n, uint32_t *out,
                        BpeScratch *sc) {
  if (!n) return 0;
  uint32_t r = rank_lookup(rt, piece, n);
  if (r != TOK_NO_RANK) {
    out[0] = r;
    return 1;
  }
  NMOE_ASSERT(n < UINT32_MAX);
  scratch_reserve(sc, n + 1);
  return n <= BPE_SCAN_MAX ? merge_scan(rt, piece, n, out, sc) : merge_heap(rt, piece, n, out, sc);
}

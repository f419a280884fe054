/* tok_bpe.h: the rank table (token bytes <-> rank) and tiktoken's byte-pair
 * merge; internal to src/data (tokenizer.c is the public face). */
#ifndef NMOE_DATA_TOK_BPE_H
#define NMOE_DATA_TOK_BPE_H

#include <stddef.h>
#include <stdint.h>

#define TOK_NO_RANK UINT32_MAX

typedef struct {
  uint8_t *bytes;   // all token bytes, concatenated by rank
  uint32_t *off;    // (n_ranks + 1) offsets into bytes; a rank with no token has length 0
  uint32_t n_ranks; // one past the largest rank
  uint32_t max_len; // longest token in bytes: longer spans need no lookup
  uint64_t *slots;  // (mask + 1) open addressing: (hash >> 32) << 32 | (rank + 1); 0 = empty
  uint32_t mask;
} RankTable;

/* Growable per-thread work arrays for the merge. */
typedef struct {
  uint32_t *a, *b, *c, *d; // (cap) each: part starts / links / ranks
  uint64_t *heap;          // (3 * cap) (rank << 32 | part) keys
  size_t cap;
} BpeScratch;

/* Takes ownership of bytes/off (xmalloc'd) and builds the hash index.
 * -1 with err when two ranks hold the same bytes. */
int rank_table_build(RankTable *rt, uint8_t *bytes, uint32_t *off, uint32_t n_ranks, char *err,
                     size_t errlen);
void rank_table_free(RankTable *rt);

/* Ranks of piece[0..n) merged exactly as tiktoken's byte_pair_encode; writes at
 * most n ids to out, returns the count. Every byte must have a rank. */
size_t bpe_encode_piece(const RankTable *rt, const uint8_t *piece, size_t n, uint32_t *out,
                        BpeScratch *sc);
void bpe_scratch_free(BpeScratch *sc);

#endif

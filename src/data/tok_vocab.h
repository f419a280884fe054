/* tok_vocab.h: reads one tiktoken npm encoder file (encoders/<name>.json:
 * pat_str, special_tokens, bpe_ranks, optional explicit_n_vocab); internal to
 * src/data. */
#ifndef NMOE_DATA_TOK_VOCAB_H
#define NMOE_DATA_TOK_VOCAB_H

#include <stddef.h>
#include <stdint.h>

#include "data/tok_bpe.h"

typedef struct {
  char *text; // e.g. "<|endoftext|>"
  uint32_t id;
} TokSpecial;

typedef struct {
  char *pat_str;         // the pre-tokenisation regex, as tiktoken (fancy-regex) reads it
  TokSpecial *specials;  // (n_specials)
  size_t n_specials;
  int64_t explicit_n_vocab; // -1 when the file has none
  RankTable ranks;
} TokVocab;

/* 0, or -1 with a message naming path in err. */
int tok_vocab_load(const char *path, TokVocab *v, char *err, size_t errlen);
void tok_vocab_free(TokVocab *v);

#endif

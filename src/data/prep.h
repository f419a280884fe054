/* prep.h: `nmoe data prep`: raw text -> tokenized, bucketed .npy/.idx shards.
 *
 * Pipeline: one reader thread (lines of jsonl / jsonl.zst, or whole text
 * files) -> N worker threads (parse JSON, NFC-normalise and strip, tokenise,
 * min/max token filter) -> the calling thread writes results strictly in
 * input order, so the output is byte-identical for any number of workers.
 *
 * Semantics follow the original: blank lines are ignored; a record whose text
 * is empty or null is skipped without taking a document index; doc_id is the
 * id field (strings as-is, numbers as Python's str()), else
 * "{stem of the input file}:{global index}" (the original JSONL sources); for
 * --source text each file is one document with doc_id = its relative path.
 * Documents shorter than min_tokens are dropped, longer than max_tokens
 * truncated; each is written followed by one EOS, and prep stops after the
 * document that takes the total (EOS included) to max_tokens_total. */
#ifndef NMOE_DATA_PREP_H
#define NMOE_DATA_PREP_H

#include <stddef.h>
#include <stdint.h>

typedef enum { PREP_JSONL, PREP_JSONL_ZST, PREP_TEXT } PrepSource;

typedef struct PrepOptions {
  PrepSource source;
  char **paths;             /* files, globs (and directories for text) */
  int n_paths;
  const char *text_field;   /* "text" */
  const char *id_field;     /* "id"; NULL or "" = none */
  const char *output;
  const char *name;         /* NULL = stem of the first input file */
  const char *version;      /* "v1" */
  const char *tokenizer;    /* "o200k_harmony" */
  int64_t vocab_size;       /* -1 = the tokenizer's */
  int64_t eos_token_id;     /* -1 = the tokenizer's */
  int num_shards;           /* bucket directories: 64 */
  int64_t tokens_per_shard; /* 500000000 */
  int64_t min_tokens;       /* 10 */
  int64_t max_tokens;       /* 1000000 */
  int64_t max_tokens_total; /* 0 = no limit */
  int workers;              /* 0 = number of cores */
  int skip_errors;          /* --on-error skip: count malformed records and go on */
  int progress;             /* -1 = when stderr is a terminal, 0 off, 1 on */
} PrepOptions;

typedef struct PrepStats {
  int64_t records;      /* non-blank lines / files read */
  int64_t docs_in;      /* records with non-empty text (these take a document index) */
  int64_t kept;
  int64_t skipped;      /* empty text, empty after normalising, or < min_tokens */
  int64_t errored;      /* malformed records skipped under --on-error skip */
  int64_t truncated;    /* kept documents cut to max_tokens */
  int64_t invalid_utf8; /* documents whose invalid UTF-8 was replaced by U+FFFD */
  int64_t tokens;       /* written, EOS included */
  int shards, bucket_dirs;
  int hit_token_limit;
  double seconds;
  char name[256];       /* dataset name used (--name or the input's stem) */
} PrepStats;

void prep_defaults(PrepOptions *o);

/* Runs the pipeline. On any fatal problem returns -1 with one line in err and
 * leaves no shard, index or manifest of this run behind. */
int prep_run(const PrepOptions *o, PrepStats *st, char *err, size_t errlen);

/* Parses counts like "100M", "1B", "2.5K", "500000000" (K, M, B/G, T are
 * powers of 1000). 0, or -1 when malformed. */
int prep_parse_count(const char *s, int64_t *out);

#endif

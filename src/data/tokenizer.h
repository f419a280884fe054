/* tokenizer.h: byte-level BPE tokenizers that give exactly tiktoken's ids
 * (gpt2, cl100k_base, o200k_base, o200k_harmony), and the text normaliser the
 * data pipeline applies before tokenising (NFC + strip).
 *
 * Vocabularies come from the tiktoken npm package (tools/node_modules/tiktoken/
 * encoders/<name>.json, installed by `make setup`). Encoding follows tiktoken's
 * encode_ordinary: special-token text such as "<|endoftext|>" is ordinary text.
 *
 * Threads: a Tokenizer is read-only after tok_open; tok_encode/tok_decode may be
 * called on one Tokenizer from many threads at once (scratch is per thread).
 *
 * Invalid UTF-8 input (to tok_encode and text_normalize_nfc) is never an error:
 * each maximal invalid subsequence becomes U+FFFD, exactly as Python's
 * bytes.decode("utf-8", errors="replace") does, which is how the original
 * pipeline's text reaches tiktoken. */
#ifndef NMOE_DATA_TOKENIZER_H
#define NMOE_DATA_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

typedef struct Tokenizer Tokenizer;

/* Loads encoding `name` (gpt2 | cl100k_base | o200k_base | o200k_harmony).
 * Vocabulary directory: $NMOE_TOKENIZER_DIR, else <dir of the running
 * binary>/../tools/node_modules/tiktoken/encoders, else
 * ./tools/node_modules/tiktoken/encoders. NULL with a message in err on failure. */
Tokenizer *tok_open(const char *name, char *err, size_t errlen);
void tok_close(Tokenizer *t);

/* Encodes len bytes of text (encode_ordinary semantics) into *ids, growing
 * *ids / *cap (elements) with xrealloc as needed; returns the number of ids.
 * *ids may start NULL with *cap 0. */
size_t tok_encode(const Tokenizer *t, const char *text, size_t len, uint32_t **ids, size_t *cap);

/* Bytes of the ids (special tokens decode to their text), NUL-terminated for
 * convenience, length in *out_len; caller frees. NULL (and *out_len 0) if any id
 * is not a token of this encoding. */
char *tok_decode(const Tokenizer *t, const uint32_t *ids, size_t n, size_t *out_len);

/* tiktoken's n_vocab: one past the largest token id (o200k_harmony: 201088). */
int tok_vocab_size(const Tokenizer *t);
/* Id of <|endoftext|> (o200k_harmony: 199999). */
uint32_t tok_eos_id(const Tokenizer *t);
const char *tok_name(const Tokenizer *t);

/* The original's normalize_text: Unicode NFC, then strip leading/trailing
 * whitespace as Python's str.strip() does (str.isspace characters). Invalid
 * UTF-8 becomes U+FFFD first (see above). Returns a NUL-terminated malloc'd
 * string, length in *out_len. */
char *text_normalize_nfc(const char *text, size_t len, size_t *out_len);

/* Copy of text with each maximal invalid UTF-8 subsequence replaced by U+FFFD
 * (Python's errors="replace"); NULL when text is already valid (nothing to
 * copy). Length of the copy in *out_len. */
char *utf8_sanitize(const char *text, size_t len, size_t *out_len);

/* `nmoe bench tokenizer` (tok_bench.c): argv holds the arguments after
 * `nmoe bench tokenizer` (a leading "tokenizer" is skipped too). Returns the
 * exit status. */
int tok_bench_main(int argc, char **argv);

#endif

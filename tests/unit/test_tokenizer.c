/* test_tokenizer.c: our tokenizers against tiktoken itself.
 *
 * tools/tiktoken_ref.js (Node + the tiktoken npm package, both installed by
 * `make setup`) encodes tests/data/tokenizer_corpus.jsonl with every encoding;
 * each of our ids must equal its ids. Also: decode round trips, vocabulary
 * sizes and EOS ids, special-token decoding, invalid UTF-8 handling, the NFC
 * normaliser, and OpenMP encoding equal to single-threaded. Run from the repo
 * root (tests/run_all.sh does). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <cmocka.h>

#include "data/tokenizer.h"

#define N_ENC 4
static const char *const ENC_NAMES[N_ENC] = {"gpt2", "cl100k_base", "o200k_base", "o200k_harmony"};
static Tokenizer *enc[N_ENC];

/* The corpus as tiktoken saw it: UTF-8 bytes of each text, and per encoding
 * the reference ids. */
typedef struct {
  char *text;
  size_t len;
  uint32_t *ref[N_ENC];
  size_t n_ref[N_ENC];
} Case;
static Case *cases;
static size_t n_cases;

static int enc_index(const char *name) {
  for (int i = 0; i < N_ENC; i++)
    if (!strcmp(name, ENC_NAMES[i])) return i;
  return -1;
}

static int hexval(char c) { return c <= '9' ? c - '0' : c - 'a' + 10; }

/* Runs the reference script once for all encodings; -1 if it cannot. */
static int load_reference(void) {
  FILE *f = popen("node tools/tiktoken_ref.js gpt2,cl100k_base,o200k_base,o200k_harmony --hex "
                  "< tests/data/tokenizer_corpus.jsonl",
                  "r");
  if (!f) return -1;
  char *line = NULL;
  size_t lcap = 0, k = 0;
  ssize_t n;
  while ((n = getline(&line, &lcap, f)) > 0) {
    if (line[n - 1] == '\n') line[--n] = 0;
    char *hex = strchr(line, '\t'), *ids;
    if (!hex || !(ids = strchr(hex + 1, '\t'))) break;
    *hex++ = 0, *ids++ = 0;
    int e = enc_index(line);
    if (e < 0) break;
    size_t i = k++ / N_ENC;
    if (i >= n_cases) {
      cases = realloc(cases, (i + 1) * sizeof *cases);
      memset(&cases[i], 0, sizeof *cases);
      n_cases = i + 1;
      size_t hl = strlen(hex) / 2;
      cases[i].text = malloc(hl + 1);
      for (size_t j = 0; j < hl; j++) cases[i].text[j] = (char)(hexval(hex[2 * j]) << 4 | hexval(hex[2 * j + 1]));
      cases[i].text[hl] = 0;
      cases[i].len = hl;
    }
    Case *c = &cases[i];
    c->ref[e] = malloc((strlen(ids) / 2 + 1) * sizeof *c->ref[e]);
    for (char *p = ids; *p;) {
      char *end;
      c->ref[e][c->n_ref[e]++] = (uint32_t)strtoul(p, &end, 10);
      p = *end ? end + 1 : end;
    }
  }
  free(line);
  int rc = pclose(f);
  return rc == 0 && n_cases > 0 && k == n_cases * N_ENC ? 0 : -1;
}

static int setup(void **state) {
  char err[1024];
  for (int i = 0; i < N_ENC; i++) {
    enc[i] = tok_open(ENC_NAMES[i], err, sizeof err);
    if (!enc[i]) {
      fprintf(stderr, "tok_open(%s): %s\n", ENC_NAMES[i], err);
      return -1;
    }
  }
  if (load_reference()) {
    fprintf(stderr, "tools/tiktoken_ref.js failed: node and tools/node_modules/tiktoken are needed (make setup)\n");
    return -1;
  }
  return 0;
}

static int teardown(void **state) {
  for (int i = 0; i < N_ENC; i++) tok_close(enc[i]);
  for (size_t i = 0; i < n_cases; i++) {
    free(cases[i].text);
    for (int e = 0; e < N_ENC; e++) free(cases[i].ref[e]);
  }
  free(cases);
  return 0;
}

static void test_ids_match_tiktoken(void **state) {
  uint32_t *ids = NULL;
  size_t cap = 0, bad = 0;
  assert_true(n_cases >= 100);
  for (size_t i = 0; i < n_cases; i++)
    for (int e = 0; e < N_ENC; e++) {
      size_t n = tok_encode(enc[e], cases[i].text, cases[i].len, &ids, &cap);
      if (n != cases[i].n_ref[e] || memcmp(ids, cases[i].ref[e], n * sizeof *ids)) {
        if (bad++ < 5)
          fprintf(stderr, "%s: case %zu (%.60s): %zu ids, tiktoken %zu\n", ENC_NAMES[e], i, cases[i].text, n,
                  cases[i].n_ref[e]);
      }
    }
  free(ids);
  assert_int_equal(bad, 0);
}

static void test_decode_round_trip(void **state) {
  uint32_t *ids = NULL;
  size_t cap = 0;
  for (size_t i = 0; i < n_cases; i++)
    for (int e = 0; e < N_ENC; e++) {
      size_t n = tok_encode(enc[e], cases[i].text, cases[i].len, &ids, &cap), len;
      char *back = tok_decode(enc[e], ids, n, &len);
      assert_non_null(back);
      assert_int_equal(len, cases[i].len);
      assert_memory_equal(back, cases[i].text, len);
      free(back);
    }
  free(ids);
}

static void test_vocab_and_specials(void **state) {
  static const int vocab[N_ENC] = {50257, 100277, 200019, 201088};
  static const uint32_t eos[N_ENC] = {50256, 100257, 199999, 199999};
  for (int e = 0; e < N_ENC; e++) {
    assert_string_equal(tok_name(enc[e]), ENC_NAMES[e]);
    assert_int_equal(tok_vocab_size(enc[e]), vocab[e]);
    assert_int_equal(tok_eos_id(enc[e]), eos[e]);
    size_t len;
    char *s = tok_decode(enc[e], &eos[e], 1, &len);
    assert_string_equal(s, "<|endoftext|>");
    free(s);
    /* "<|endoftext|>" in text is ordinary text, never the EOS id. */
    uint32_t *ids = NULL;
    size_t cap = 0, n = tok_encode(enc[e], "<|endoftext|>", 13, &ids, &cap);
    assert_true(n > 1);
    for (size_t i = 0; i < n; i++) assert_int_not_equal(ids[i], eos[e]);
    free(ids);
  }
  const Tokenizer *h = enc[3];
  static const struct { uint32_t id; const char *text; } harmony[] = {
      {199998, "<|startoftext|>"}, {200000, "<|reserved_200000|>"}, {200002, "<|return|>"},
      {200003, "<|constrain|>"},   {200005, "<|channel|>"},         {200006, "<|start|>"},
      {200007, "<|end|>"},         {200008, "<|message|>"},         {200012, "<|call|>"},
      {200018, "<|endofprompt|>"}, {201087, "<|reserved_201087|>"},
  };
  for (size_t i = 0; i < sizeof harmony / sizeof *harmony; i++) {
    size_t len;
    char *s = tok_decode(h, &harmony[i].id, 1, &len);
    assert_non_null(s);
    assert_string_equal(s, harmony[i].text);
    free(s);
  }
  /* Ids that are no token: past the vocabulary, and holes below it. */
  uint32_t bad_ids[][2] = {{3, 201088}, {3, UINT32_MAX}, {1, 100256}, {1, 100261}, {2, 199998}, {0, 50257}};
  for (size_t i = 0; i < sizeof bad_ids / sizeof *bad_ids; i++) {
    uint32_t ids[3] = {0, bad_ids[i][1], 1};
    size_t len = 123;
    assert_null(tok_decode(enc[bad_ids[i][0]], ids, 3, &len));
    assert_int_equal(len, 0);
  }
  size_t len;
  char *empty = tok_decode(h, NULL, 0, &len);
  assert_non_null(empty);
  assert_int_equal(len, 0);
  free(empty);
}

/* Python's bytes.decode("utf-8", errors="replace") results. */
static const struct { const char *in, *out; } INVALID[] = {
    {"a\xff" "b\xe2\x82", "a\xef\xbf\xbd" "b\xef\xbf\xbd"},
    {"\xe0\x80", "\xef\xbf\xbd\xef\xbf\xbd"},
    {"\xf0\x9f\x98" "A", "\xef\xbf\xbd" "A"},
    {"\xed\xa0\x80", "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd"},
    {"\xc0\xaf", "\xef\xbf\xbd\xef\xbf\xbd"},
    {"\xf4\x90\x80\x80", "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd"},
    {"\xf8", "\xef\xbf\xbd"},
    {"\xe2\x82\xac\x80", "\xe2\x82\xac\xef\xbf\xbd"},
};

static void test_invalid_utf8(void **state) {
  size_t n;
  assert_null(utf8_sanitize("valid \xf0\x9f\x98\x80 text", 15, &n));
  uint32_t *a = NULL, *b = NULL;
  size_t ca = 0, cb = 0;
  for (size_t i = 0; i < sizeof INVALID / sizeof *INVALID; i++) {
    char *fixed = utf8_sanitize(INVALID[i].in, strlen(INVALID[i].in), &n);
    assert_non_null(fixed);
    assert_int_equal(n, strlen(INVALID[i].out));
    assert_memory_equal(fixed, INVALID[i].out, n);
    free(fixed);
    /* Encoding invalid bytes = encoding their repaired text, for every encoding. */
    for (int e = 0; e < N_ENC; e++) {
      size_t na = tok_encode(enc[e], INVALID[i].in, strlen(INVALID[i].in), &a, &ca);
      size_t nb = tok_encode(enc[e], INVALID[i].out, strlen(INVALID[i].out), &b, &cb);
      assert_int_equal(na, nb);
      assert_memory_equal(a, b, na * sizeof *a);
    }
  }
  /* Arbitrary bytes never crash. */
  char junk[4096];
  uint64_t x = 88172645463325252ull;
  for (size_t i = 0; i < sizeof junk; i++) x ^= x << 13, x ^= x >> 7, x ^= x << 17, junk[i] = (char)x;
  for (int e = 0; e < N_ENC; e++) assert_true(tok_encode(enc[e], junk, sizeof junk, &a, &ca) > 0);
  assert_int_equal(tok_encode(enc[0], "", 0, &a, &ca), 0);
  free(a);
  free(b);
}

static void test_normalize(void **state) {
  static const struct { const char *in, *out; } cases_[] = {
      {"e\xcc\x81", "\xc3\xa9"},                             /* e + acute -> é */
      {"A\xcc\x8a", "\xc3\x85"},                             /* A + ring -> Å */
      {"\xe2\x84\xab", "\xc3\x85"},                          /* Angstrom sign -> Å */
      {"e\xcc\x81\xcc\xa7", "\xc8\xa9\xcc\x81"},             /* marks reordered, composed */
      {"\xe1\x84\x80\xe1\x85\xa1", "\xea\xb0\x80"},          /* Hangul jamo -> syllable */
      {"\xef\xac\x81", "\xef\xac\x81"},                      /* ﬁ: NFC keeps compatibility chars */
      {"  \xc2\xa0x y\xe3\x80\x80 \n\t", "x y"},             /* NBSP, ideographic space stripped */
      {"\x1c x \x1f", "x"},                                  /* str.isspace includes U+001C..1F */
      {" \xcc\x81", "\xcc\x81"},
      {"\xe2\x80\x8bx\xe2\x80\x8b", "\xe2\x80\x8bx\xe2\x80\x8b"}, /* ZWSP is not whitespace */
      {"\xe1\xa0\x8e" "x", "\xe1\xa0\x8e" "x"},              /* U+180E is not (Unicode >= 6.3) */
      {"\xc2\x85" "x\xe2\x80\xa8", "x"},                     /* NEL, LINE SEPARATOR are */
      {"   ", ""},
      {"", ""},
      {" \xff ", "\xef\xbf\xbd"},                            /* invalid byte -> U+FFFD */
  };
  for (size_t i = 0; i < sizeof cases_ / sizeof *cases_; i++) {
    size_t n;
    char *out = text_normalize_nfc(cases_[i].in, strlen(cases_[i].in), &n);
    assert_int_equal(n, strlen(cases_[i].out));
    assert_string_equal(out, cases_[i].out);
    free(out);
  }
  /* Embedded NUL bytes are text too. */
  size_t n;
  char *out = text_normalize_nfc(" a\0b ", 5, &n);
  assert_int_equal(n, 3);
  assert_memory_equal(out, "a\0b", 3);
  free(out);
}

static void test_parallel_equals_serial(void **state) {
  enum { REPS = 8 };
  const Tokenizer *t = enc[3];
  size_t total = n_cases * REPS;
  uint32_t **ids = calloc(total, sizeof *ids);
  size_t *cnt = calloc(total, sizeof *cnt);
#pragma omp parallel for schedule(dynamic) num_threads(4)
  for (size_t k = 0; k < total; k++) {
    size_t cap = 0;
    cnt[k] = tok_encode(t, cases[k % n_cases].text, cases[k % n_cases].len, &ids[k], &cap);
  }
  uint32_t *one = NULL;
  size_t cap = 0;
  for (size_t k = 0; k < total; k++) {
    size_t n = tok_encode(t, cases[k % n_cases].text, cases[k % n_cases].len, &one, &cap);
    assert_int_equal(cnt[k], n);
    assert_memory_equal(ids[k], one, n * sizeof *one);
    free(ids[k]);
  }
  free(one);
  free(ids);
  free(cnt);
}

/* One 100k-letter word must stay fast (the heap merge) and decode back. */
static void test_long_word(void **state) {
  size_t n = 100000;
  char *w = malloc(n);
  uint64_t x = 2463534242ull;
  for (size_t i = 0; i < n; i++) x ^= x << 13, x ^= x >> 7, x ^= x << 17, w[i] = (char)('a' + x % 26);
  for (int e = 0; e < N_ENC; e++) {
    uint32_t *ids = NULL;
    size_t cap = 0, m = tok_encode(enc[e], w, n, &ids, &cap), len;
    assert_true(m > n / 8 && m < n);
    char *back = tok_decode(enc[e], ids, m, &len);
    assert_int_equal(len, n);
    assert_memory_equal(back, w, n);
    free(back);
    free(ids);
  }
  free(w);
}

static void test_open_errors(void **state) {
  char err[1024];
  assert_null(tok_open("p50k_base", err, sizeof err));
  assert_non_null(strstr(err, "unknown tokenizer"));
  /* A corrupt vocabulary in NMOE_TOKENIZER_DIR is reported, not crashed on. */
  char dir[] = "/tmp/nmoe_tok_XXXXXX", path[64];
  assert_non_null(mkdtemp(dir));
  snprintf(path, sizeof path, "%s/gpt2.json", dir);
  FILE *f = fopen(path, "w");
  assert_non_null(f);
  fputs("{\"pat_str\": \"x\", \"bpe_ranks\": \"! 0 ***\"}", f);
  fclose(f);
  setenv("NMOE_TOKENIZER_DIR", dir, 1);
  assert_null(tok_open("gpt2", err, sizeof err));
  assert_non_null(strstr(err, "bpe_ranks"));
  assert_non_null(strstr(err, dir));
  unsetenv("NMOE_TOKENIZER_DIR");
  unlink(path);
  rmdir(dir);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_ids_match_tiktoken), cmocka_unit_test(test_decode_round_trip),
      cmocka_unit_test(test_vocab_and_specials), cmocka_unit_test(test_invalid_utf8),
      cmocka_unit_test(test_normalize),          cmocka_unit_test(test_parallel_equals_serial),
      cmocka_unit_test(test_long_word),          cmocka_unit_test(test_open_errors),
  };
  return cmocka_run_group_tests(tests, setup, teardown);
}

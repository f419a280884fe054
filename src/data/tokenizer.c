/* tokenizer.c: tiktoken-identical encoders (see tokenizer.h).
 *
 * encode = pre-tokenise with the encoding's regex (PCRE2, JIT), then byte-pair
 * merge each piece (tok_bpe.c). tiktoken runs the same regex on Rust's
 * fancy-regex, a backtracking engine like PCRE2 (same leftmost-first
 * alternation, greedy backtracking into \s+(?!\S), Unicode simple case folding
 * for (?i:'s|...)), with one difference we translate away: fancy-regex's \s is
 * Unicode White_Space, PCRE2's UCP \s is not quite (it differs on U+0085 and,
 * by version, U+180E), so \s and \S are rewritten as explicit classes. */
#include "data/tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/log.h"
#include "data/tok_bpe.h"
#include "data/tok_unicode.h"
#include "data/tok_vocab.h"

struct Tokenizer {
  char name[32];
  RankTable ranks;
  pcre2_code *re;      // the pattern for PCRE2's own Unicode tables
  pcre2_code *re_ext;  // the same with tok_unicode.c's code points: slower, only for text that needs it
  char **special;      // (n_special) text of ids special_base.., NULL where none
  uint32_t special_base, n_special;
  uint32_t n_vocab, eos;
};

/* ---- per-thread scratch: PCRE2 match state and merge arrays ---- */

typedef struct {
  pcre2_match_data *md; // one ovector pair: the patterns have no captures
  pcre2_match_context *mctx;
  pcre2_jit_stack *jit_stack;
  BpeScratch bpe;
} TokScratch;

static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;

static void scratch_free(void *p) {
  TokScratch *s = p;
  pcre2_match_data_free(s->md);
  pcre2_match_context_free(s->mctx);
  pcre2_jit_stack_free(s->jit_stack);
  bpe_scratch_free(&s->bpe);
  free(s);
}

static void scratch_key_create(void) {
  if (pthread_key_create(&scratch_key, scratch_free)) nmoe_fatal("tokenizer: pthread_key_create failed");
}

static TokScratch *scratch_get(void) {
  pthread_once(&scratch_once, scratch_key_create);
  TokScratch *s = pthread_getspecific(scratch_key);
  if (s) return s;
  s = xcalloc(1, sizeof *s);
  s->md = pcre2_match_data_create(1, NULL);
  s->mctx = pcre2_match_context_create(NULL);
  /* Long runs (100k letters, 10k spaces) must not hit the 32 KiB default. */
  s->jit_stack = pcre2_jit_stack_create(32 * 1024, 8 * 1024 * 1024, NULL);
  if (!s->md || !s->mctx || !s->jit_stack) nmoe_fatal("tokenizer: out of memory for PCRE2 match state");
  pcre2_jit_stack_assign(s->mctx, NULL, s->jit_stack);
  if (pthread_setspecific(scratch_key, s)) nmoe_fatal("tokenizer: pthread_setspecific failed");
  return s;
}

/* ---- opening ---- */

/* Unicode White_Space (what \s means in Rust's regex), as PCRE2 class items. */
#define WHITE_SPACE_ITEMS \
  "\\t\\n\\x0B\\f\\r \\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}\\x{202F}\\x{205F}\\x{3000}"

typedef struct {
  char *s;
  size_t len, cap;
} StrBuf;

static void sb_put(StrBuf *b, const char *s, size_t n) {
  if (b->len + n + 1 > b->cap) {
    while (b->len + n + 1 > b->cap) b->cap = b->cap ? 2 * b->cap : 1024;
    b->s = xrealloc(b->s, b->cap);
  }
  memcpy(b->s + b->len, s, n);
  b->len += n;
  b->s[b->len] = 0;
}

static void sb_puts(StrBuf *b, const char *s) { sb_put(b, s, strlen(s)); }

/* Rewrites a fancy-regex pattern for PCRE2 with the same meaning: \s and \S
 * become explicit White_Space classes, and with ext \p{X} gains the code
 * points of tok_unicode.c. NULL if \S sits inside a class (no tiktoken
 * pattern does). */
static char *pattern_for_pcre2(const char *pat, int ext) {
  StrBuf b = {0};
  int in_class = 0;
  for (const char *p = pat; *p; p++) {
    const char *close;
    if (*p == '\\' && (p[1] == 's' || p[1] == 'S')) {
      if (in_class && p[1] == 'S') {
        free(b.s);
        return NULL;
      }
      if (!in_class) sb_puts(&b, p[1] == 's' ? "[" : "[^");
      sb_puts(&b, WHITE_SPACE_ITEMS);
      if (!in_class) sb_puts(&b, "]");
      p++;
    } else if (*p == '\\' && p[1] == 'p' && p[2] == '{' && (close = strchr(p, '}'))) {
      const char *extra = ext ? tok_unicode_extra(p + 3, (size_t)(close - p - 3)) : "";
      if (!in_class && *extra) sb_puts(&b, "[");
      sb_put(&b, p, (size_t)(close + 1 - p));
      sb_puts(&b, extra);
      if (!in_class && *extra) sb_puts(&b, "]");
      p = close;
    } else if (*p == '\\' && p[1]) {
      sb_put(&b, p++, 2);
    } else if (*p == '[' && !in_class) {
      in_class = 1;
      sb_put(&b, p, 1);
      if (p[1] == '^') sb_put(&b, ++p, 1);
      if (p[1] == ']') sb_put(&b, ++p, 1); /* a leading ] is literal */
    } else {
      if (*p == ']') in_class = 0;
      sb_put(&b, p, 1);
    }
  }
  return b.s ? b.s : xstrdup("");
}

/* gpt-oss's o200k_harmony: o200k_base plus these, and <|reserved_N|> for every
 * other id in 200000..201087 (tiktoken's definition). Its id 200018 is both
 * <|endofprompt|> and <|reserved_200018|>; it decodes as <|endofprompt|>. */
static const struct { const char *text; uint32_t id; } HARMONY_SPECIALS[] = {
    {"<|startoftext|>", 199998}, {"<|endoftext|>", 199999}, {"<|return|>", 200002},
    {"<|constrain|>", 200003},   {"<|channel|>", 200005},   {"<|start|>", 200006},
    {"<|end|>", 200007},         {"<|message|>", 200008},   {"<|call|>", 200012},
};
#define HARMONY_RESERVED_BEGIN 200000u
#define HARMONY_N_VOCAB 201088u

static void special_set(Tokenizer *t, uint32_t id, const char *text) {
  if (id < t->special_base || id - t->special_base >= t->n_special) {
    uint32_t lo = t->n_special ? t->special_base : id, hi = t->n_special ? t->special_base + t->n_special : id + 1;
    if (id < lo) lo = id;
    if (id >= hi) hi = id + 1;
    char **sp = xcalloc(hi - lo, sizeof *sp);
    for (uint32_t i = 0; i < t->n_special; i++) sp[t->special_base + i - lo] = t->special[i];
    free(t->special);
    t->special = sp, t->special_base = lo, t->n_special = hi - lo;
  }
  char **slot = &t->special[id - t->special_base];
  if (!*slot) *slot = xstrdup(text); /* first definition wins */
}

static const char *special_get(const Tokenizer *t, uint32_t id) {
  if (id < t->special_base || id - t->special_base >= t->n_special) return NULL;
  return t->special[id - t->special_base];
}

/* Tries the vocabulary directories in order; fills path or lists what was tried. */
static int find_vocab(const char *file, char *path, size_t pathlen, char *err, size_t errlen) {
  char dirs[3][4096];
  int nd = 0;
  const char *env = getenv("NMOE_TOKENIZER_DIR");
  if (env && *env) snprintf(dirs[nd++], sizeof dirs[0], "%s", env);
  char exe[3900];
  ssize_t k = readlink("/proc/self/exe", exe, sizeof exe - 1);
  if (k > 0) {
    exe[k] = 0;
    char *slash = strrchr(exe, '/');
    if (slash) {
      *slash = 0;
      snprintf(dirs[nd++], sizeof dirs[0], "%s/../tools/node_modules/tiktoken/encoders", exe);
    }
  }
  snprintf(dirs[nd++], sizeof dirs[0], "./tools/node_modules/tiktoken/encoders");
  char tried[3 * 4200] = "";
  for (int i = 0; i < nd; i++) {
    snprintf(path, pathlen, "%s/%s", dirs[i], file);
    if (!access(path, R_OK)) return 0;
    size_t used = strlen(tried);
    snprintf(tried + used, sizeof tried - used, "%s%s", i ? ", " : "", path);
  }
  snprintf(err, errlen, "tokenizer vocabulary %s not found (tried %s); run `make setup` or set NMOE_TOKENIZER_DIR",
           file, tried);
  return -1;
}

Tokenizer *tok_open(const char *name, char *err, size_t errlen) {
  static const char *const NAMES[] = {"gpt2", "cl100k_base", "o200k_base", "o200k_harmony"};
  int known = 0;
  for (size_t i = 0; i < sizeof NAMES / sizeof *NAMES; i++) known |= !strcmp(name, NAMES[i]);
  if (!known) {
    snprintf(err, errlen, "unknown tokenizer '%s' (gpt2, cl100k_base, o200k_base or o200k_harmony)", name);
    return NULL;
  }
  int harmony = !strcmp(name, "o200k_harmony");
  char file[64], path[4400];
  snprintf(file, sizeof file, "%s.json", harmony ? "o200k_base" : name);
  if (find_vocab(file, path, sizeof path, err, errlen)) return NULL;
  TokVocab v;
  if (tok_vocab_load(path, &v, err, errlen)) return NULL;

  Tokenizer *t = xcalloc(1, sizeof *t);
  snprintf(t->name, sizeof t->name, "%s", name);
  t->ranks = v.ranks;
  memset(&v.ranks, 0, sizeof v.ranks); /* now owned by t */
  uint32_t max_id = t->ranks.n_ranks - 1;
  if (harmony)
    for (size_t i = 0; i < sizeof HARMONY_SPECIALS / sizeof *HARMONY_SPECIALS; i++)
      special_set(t, HARMONY_SPECIALS[i].id, HARMONY_SPECIALS[i].text);
  for (size_t i = 0; i < v.n_specials; i++) {
    special_set(t, v.specials[i].id, v.specials[i].text);
    if (v.specials[i].id > max_id) max_id = v.specials[i].id;
  }
  if (harmony) {
    char text[32];
    for (uint32_t id = HARMONY_RESERVED_BEGIN; id < HARMONY_N_VOCAB; id++) {
      snprintf(text, sizeof text, "<|reserved_%u|>", id);
      special_set(t, id, text);
    }
    max_id = HARMONY_N_VOCAB - 1;
  }
  t->n_vocab = v.explicit_n_vocab > 0 ? (uint32_t)v.explicit_n_vocab : max_id + 1;
  t->eos = UINT32_MAX;
  for (uint32_t i = 0; i < t->n_special; i++)
    if (t->special[i] && !strcmp(t->special[i], "<|endoftext|>")) t->eos = t->special_base + i;

  int failed = 0;
  for (int ext = 0; ext < 2 && !failed; ext++) {
    char *pat = pattern_for_pcre2(v.pat_str, ext);
    int ec = 0;
    PCRE2_SIZE eo = 0;
    pcre2_code *re = NULL;
    char msg[256] = "\\S inside a character class";
    if (pat) {
      re = pcre2_compile((PCRE2_SPTR)pat, PCRE2_ZERO_TERMINATED, PCRE2_UTF | PCRE2_UCP, &ec, &eo, NULL);
      if (!re) pcre2_get_error_message(ec, (PCRE2_UCHAR *)msg, sizeof msg);
      free(pat);
    }
    if (!re) {
      snprintf(err, errlen, "%s: pat_str does not compile (%s at offset %zu)", path, msg, (size_t)eo);
      failed = 1;
      break;
    }
    /* JIT is a speed-up only; pcre2_match falls back to the interpreter. */
    (void)pcre2_jit_compile(re, PCRE2_JIT_COMPLETE);
    *(ext ? &t->re_ext : &t->re) = re;
  }
  if (!failed && t->eos == UINT32_MAX) {
    snprintf(err, errlen, "%s: no <|endoftext|> special token", path);
    failed = 1;
  }
  tok_vocab_free(&v);
  if (failed) {
    tok_close(t);
    return NULL;
  }
  return t;
}

void tok_close(Tokenizer *t) {
  if (!t) return;
  pcre2_code_free(t->re);
  pcre2_code_free(t->re_ext);
  rank_table_free(&t->ranks);
  for (uint32_t i = 0; i < t->n_special; i++) free(t->special[i]);
  free(t->special);
  free(t);
}

/* ---- encode / decode ---- */

size_t tok_encode(const Tokenizer *t, const char *text, size_t len, uint32_t **ids, size_t *cap) {
  size_t fixed_len;
  char *fixed = utf8_sanitize(text, len, &fixed_len);
  const uint8_t *s = (const uint8_t *)(fixed ? fixed : text);
  size_t n = fixed ? fixed_len : len, count = 0, pos = 0;
  TokScratch *sc = scratch_get();
  const pcre2_code *re = tok_unicode_has_extra(s, n) ? t->re_ext : t->re;
  PCRE2_SIZE *ov = pcre2_get_ovector_pointer(sc->md);
  while (pos < n) {
    /* Valid UTF-8 is guaranteed above; PCRE2's own check would rescan the whole
     * subject on every call. */
    int rc = pcre2_match(re, s, n, pos, PCRE2_NO_UTF_CHECK, sc->md, sc->mctx);
    if (rc == PCRE2_ERROR_NOMATCH) break;
    if (rc < 0) {
      char msg[256];
      pcre2_get_error_message(rc, (PCRE2_UCHAR *)msg, sizeof msg);
      nmoe_fatal("tokenizer %s: regex match failed at byte %zu: %s", t->name, pos, msg);
    }
    size_t a = ov[0], b = ov[1];
    if (b == a) { /* no tiktoken pattern matches empty; step one character if one did */
      pos = a + 1;
      while (pos < n && (s[pos] & 0xC0) == 0x80) pos++;
      continue;
    }
    if (count + (b - a) > *cap) {
      size_t c = *cap ? *cap * 2 : 1024;
      while (c < count + (b - a)) c *= 2;
      *ids = xrealloc(*ids, c * sizeof **ids);
      *cap = c;
    }
    count += bpe_encode_piece(&t->ranks, s + a, b - a, *ids + count, &sc->bpe);
    pos = b;
  }
  free(fixed);
  return count;
}

/* Bytes of one id, or NULL if it is no token. */
static const uint8_t *token_bytes(const Tokenizer *t, uint32_t id, size_t *n) {
  if (id < t->ranks.n_ranks && (*n = t->ranks.off[id + 1] - t->ranks.off[id]) > 0)
    return t->ranks.bytes + t->ranks.off[id];
  const char *sp = special_get(t, id);
  if (!sp) return NULL;
  *n = strlen(sp);
  return (const uint8_t *)sp;
}

char *tok_decode(const Tokenizer *t, const uint32_t *ids, size_t n, size_t *out_len) {
  size_t total = 0, k;
  *out_len = 0;
  for (size_t i = 0; i < n; i++) {
    if (!token_bytes(t, ids[i], &k)) return NULL;
    total += k;
  }
  char *out = xmalloc(total + 1), *o = out;
  for (size_t i = 0; i < n; i++) {
    const uint8_t *b = token_bytes(t, ids[i], &k);
    memcpy(o, b, k);
    o += k;
  }
  *o = 0;
  *out_len = total;
  return out;
}

int tok_vocab_size(const Tokenizer *t) { return (int)t->n_vocab; }
uint32_t tok_eos_id(const Tokenizer *t) { return t->eos; }
const char *tok_name(const Tokenizer *t) { return t->name; }

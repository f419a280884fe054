/* tok_normalize.c: UTF-8 repair (invalid bytes -> U+FFFD, Python's
 * errors="replace") and the pipeline's text normaliser (NFC via utf8proc, then
 * Python str.strip()). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

#include "core/log.h"
#include "data/tokenizer.h"

/* Length of the valid UTF-8 sequence at s (n bytes left), or 0 when invalid;
 * then *bad is the length of its maximal invalid subpart (>= 1), the bytes one
 * U+FFFD replaces under the Unicode "maximal subpart" practice Python follows. */
static size_t utf8_valid_len(const uint8_t *s, size_t n, size_t *bad) {
  uint8_t b = s[0], lo = 0x80, hi = 0xBF;
  size_t need;
  if (b < 0x80) return 1;
  if (b >= 0xC2 && b <= 0xDF) need = 1;
  else if (b == 0xE0) need = 2, lo = 0xA0;
  else if (b == 0xED) need = 2, hi = 0x9F; /* excludes UTF-16 surrogates */
  else if (b >= 0xE1 && b <= 0xEF) need = 2;
  else if (b == 0xF0) need = 3, lo = 0x90;
  else if (b == 0xF4) need = 3, hi = 0x8F; /* nothing above U+10FFFF */
  else if (b >= 0xF1 && b <= 0xF3) need = 3;
  else {
    *bad = 1;
    return 0;
  }
  for (size_t k = 1; k <= need; k++) {
    if (k >= n || s[k] < lo || s[k] > hi) {
      *bad = k;
      return 0;
    }
    lo = 0x80, hi = 0xBF;
  }
  return need + 1;
}

/* Offset of the first invalid sequence, or len when text is valid UTF-8. */
static size_t utf8_first_invalid(const uint8_t *s, size_t len) {
  size_t i = 0, bad;
  while (i < len) {
    if (i + 8 <= len) { /* ASCII fast path */
      uint64_t w;
      memcpy(&w, s + i, 8);
      if (!(w & 0x8080808080808080ull)) {
        i += 8;
        continue;
      }
    }
    size_t k = utf8_valid_len(s + i, len - i, &bad);
    if (!k) return i;
    i += k;
  }
  return len;
}

char *utf8_sanitize(const char *text, size_t len, size_t *out_len) {
  const uint8_t *s = (const uint8_t *)text;
  size_t i = utf8_first_invalid(s, len);
  if (i == len) return NULL;
  /* Each replaced subpart (>= 1 byte) grows to at most 3 bytes. */
  uint8_t *out = xmalloc(3 * len + 1);
  memcpy(out, s, i);
  size_t o = i, bad;
  while (i < len) {
    size_t k = utf8_valid_len(s + i, len - i, &bad);
    if (k) {
      memcpy(out + o, s + i, k);
      o += k, i += k;
    } else {
      memcpy(out + o, "\xEF\xBF\xBD", 3);
      o += 3, i += bad;
    }
  }
  out[o] = 0;
  *out_len = o;
  return (char *)out;
}

/* Python's str.isspace(): bidi class WS/B/S or category Zs. */
static int py_isspace(int32_t c) {
  return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 ||
         c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 ||
         c == 0x202F || c == 0x205F || c == 0x3000;
}

char *text_normalize_nfc(const char *text, size_t len, size_t *out_len) {
  size_t fixed_len;
  char *fixed = utf8_sanitize(text, len, &fixed_len);
  const char *src = fixed ? fixed : text;
  size_t n = fixed ? fixed_len : len;
  utf8proc_uint8_t *nfc = NULL;
  utf8proc_ssize_t m = 0;
  if (n) m = utf8proc_map((const utf8proc_uint8_t *)src, (utf8proc_ssize_t)n, &nfc,
                          UTF8PROC_STABLE | UTF8PROC_COMPOSE);
  free(fixed);
  if (m < 0) /* cannot happen on repaired input except out of memory */
    nmoe_fatal("text_normalize_nfc: utf8proc: %s", utf8proc_errmsg(m));
  /* Strip: skip whitespace code points at the front, then at the back. */
  utf8proc_ssize_t a = 0, b = m;
  while (a < b) {
    utf8proc_int32_t c;
    utf8proc_ssize_t k = utf8proc_iterate(nfc + a, b - a, &c);
    if (!py_isspace(c)) break;
    a += k;
  }
  while (b > a) {
    utf8proc_ssize_t s = b - 1;
    while (s > a && (nfc[s] & 0xC0) == 0x80) s--;
    utf8proc_int32_t c;
    utf8proc_iterate(nfc + s, b - s, &c);
    if (!py_isspace(c)) break;
    b = s;
  }
  char *out = xmalloc((size_t)(b - a) + 1);
  if (b > a) memcpy(out, nfc + a, (size_t)(b - a));
  out[b - a] = 0;
  free(nfc);
  *out_len = (size_t)(b - a);
  return out;
}

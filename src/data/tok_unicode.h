/* tok_unicode.h: code points tiktoken's regex engine (Unicode 16) assigns to a
 * general category that PCRE2 (Unicode 14) does not know; internal to src/data. */
#ifndef NMOE_DATA_TOK_UNICODE_H
#define NMOE_DATA_TOK_UNICODE_H

#include <stddef.h>
#include <stdint.h>

/* PCRE2 class items (e.g. "\\x{1C89}-\\x{1C8A}...") to add to \p{prop}, where
 * prop is prop[0..len) such as "L", "Lu", "N"; "" when none. */
const char *tok_unicode_extra(const char *prop, size_t len);

/* Whether valid UTF-8 s[0..n) holds any of those code points. */
int tok_unicode_has_extra(const uint8_t *s, size_t n);

#endif

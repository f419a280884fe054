/* hash.h: SHA-256 and MD5 through OpenSSL (EVP), as lowercase hex. */
#ifndef NMOE_HASH_H
#define NMOE_HASH_H

#include <stddef.h>
#include <stdint.h>

/* Streaming SHA-256. */
typedef struct Sha256 { void *ctx; } Sha256;
void sha256_init(Sha256 *h);
void sha256_update(Sha256 *h, const void *data, size_t n);
void sha256_final_hex(Sha256 *h, char out[65]);

void sha256_hex(const void *data, size_t n, char out[65]);
/* SHA-256 of a file's bytes; -1 with err on I/O error. */
int sha256_file_hex(const char *path, char out[65], char *err, size_t errlen);
/* MD5 of data as 32 hex chars (doc-id bucketing, as the original). */
void md5_hex(const void *data, size_t n, char out[33]);

#endif

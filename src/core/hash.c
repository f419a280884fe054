/* hash.c: SHA-256 / MD5 wrappers over OpenSSL EVP. */
#include "core/hash.h"

#include <errno.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <string.h>

#include "core/log.h"

static void to_hex(const unsigned char *d, unsigned n, char *out) {
  static const char hx[] = "0123456789abcdef";
  for (unsigned i = 0; i < n; i++) {
    out[2 * i] = hx[d[i] >> 4];
    out[2 * i + 1] = hx[d[i] & 15];
  }
  out[2 * n] = 0;
}

void sha256_init(Sha256 *h) {
  EVP_MD_CTX *c = EVP_MD_CTX_new();
  if (!c || EVP_DigestInit_ex(c, EVP_sha256(), NULL) != 1) nmoe_fatal("OpenSSL SHA-256 init failed");
  h->ctx = c;
}

void sha256_update(Sha256 *h, const void *data, size_t n) {
  if (EVP_DigestUpdate((EVP_MD_CTX *)h->ctx, data, n) != 1) nmoe_fatal("OpenSSL SHA-256 update failed");
}

void sha256_final_hex(Sha256 *h, char out[65]) {
  unsigned char d[EVP_MAX_MD_SIZE];
  unsigned n = 0;
  if (EVP_DigestFinal_ex((EVP_MD_CTX *)h->ctx, d, &n) != 1) nmoe_fatal("OpenSSL SHA-256 final failed");
  EVP_MD_CTX_free((EVP_MD_CTX *)h->ctx);
  h->ctx = NULL;
  to_hex(d, n, out);
}

void sha256_hex(const void *data, size_t n, char out[65]) {
  Sha256 h;
  sha256_init(&h);
  sha256_update(&h, data, n);
  sha256_final_hex(&h, out);
}

int sha256_file_hex(const char *path, char out[65], char *err, size_t errlen) {
  FILE *f = fopen(path, "rb");
  if (!f) {
    snprintf(err, errlen, "%s: cannot open: %s", path, strerror(errno));
    return -1;
  }
  Sha256 h;
  sha256_init(&h);
  static __thread unsigned char buf[1 << 16];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, f)) > 0) sha256_update(&h, buf, n);
  int bad = ferror(f);
  fclose(f);
  sha256_final_hex(&h, out);
  if (bad) {
    snprintf(err, errlen, "%s: read error", path);
    return -1;
  }
  return 0;
}

void md5_hex(const void *data, size_t n, char out[33]) {
  unsigned char d[EVP_MAX_MD_SIZE];
  unsigned len = 0;
  if (EVP_Digest(data, n, d, &len, EVP_md5(), NULL) != 1) nmoe_fatal("OpenSSL MD5 failed");
  to_hex(d, len, out);
}

/* manifest.c: reading, writing and verifying dataset manifests (manifest.json). */
#include "data/manifest.h"

#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "core/fsutil.h"
#include "core/hash.h"
#include "core/json.h"
#include "core/log.h"
#include "data/npy.h"
#include "data/shard_index.h"

int manifest_write(const char *path, const Manifest *m, char *err, size_t errlen) {
  JsonW w;
  jw_init(&w, 2);
  jw_obj(&w, NULL);
  jw_str(&w, "dataset", m->dataset);
  jw_str(&w, "version", m->version);
  jw_str(&w, "tokenizer", m->tokenizer);
  jw_int(&w, "vocab_size", m->vocab_size);
  jw_int(&w, "eos_token_id", m->eos_token_id);
  jw_str(&w, "dtype", m->dtype);
  jw_str(&w, "created_at", m->created_at);
  jw_int(&w, "total_tokens", m->total_tokens);
  jw_int(&w, "total_documents", m->total_documents);
  jw_int(&w, "num_shards", m->num_shards);
  jw_arr(&w, "shards");
  for (int i = 0; i < m->n_shards; i++) {
    const ManifestShard *s = &m->shards[i];
    jw_obj(&w, NULL);
    jw_str(&w, "path", s->path);
    jw_str(&w, "index_path", s->index_path);
    jw_int(&w, "num_tokens", s->num_tokens);
    jw_int(&w, "num_documents", s->num_documents);
    jw_str(&w, "checksum", s->checksum);
    jw_obj_end(&w);
  }
  jw_arr_end(&w);
  jw_obj(&w, "source_info");
  if (m->source) jw_str(&w, "source", m->source);
  if (m->num_shard_dirs >= 0) jw_int(&w, "num_shard_dirs", m->num_shard_dirs);
  jw_obj_end(&w);
  jw_obj_end(&w);
  char *doc = jw_finish(&w);
  size_t n = strlen(doc);
  doc[n] = '\n'; /* jw_finish's buffer always has room for the NUL we overwrite */
  int rc = fs_write_atomic(path, doc, n + 1, err, errlen);
  free(doc);
  return rc;
}

/* Field getters that name the file and field on a missing or mistyped value. */
static int need_str(const Json *o, const char *key, char **out, const char *path, char *err,
                    size_t errlen) {
  const Json *v = json_get(o, key);
  if (!v || v->type != JSON_STR) {
    snprintf(err, errlen, "%s: manifest field '%s' %s", path, key,
             v ? "is not a string" : "is missing");
    return -1;
  }
  *out = xstrdup(v->str);
  return 0;
}

static int need_int(const Json *o, const char *key, int64_t *out, const char *path, char *err,
                    size_t errlen) {
  const Json *v = json_get(o, key);
  if (!v || v->type != JSON_NUM || !v->is_int || v->i < 0) {
    snprintf(err, errlen, "%s: manifest field '%s' %s", path, key,
             v ? "is not a non-negative integer" : "is missing");
    return -1;
  }
  *out = v->i;
  return 0;
}

int manifest_read(const char *path, Manifest *m, char *err, size_t errlen) {
  memset(m, 0, sizeof *m);
  m->num_shard_dirs = -1;
  Json *j = json_parse_file(path, err, errlen);
  if (!j) return -1;
  int rc = -1;
  if (j->type != JSON_OBJ) {
    snprintf(err, errlen, "%s: manifest is not a JSON object", path);
    goto out;
  }
  if (need_str(j, "dataset", &m->dataset, path, err, errlen) ||
      need_str(j, "version", &m->version, path, err, errlen) ||
      need_str(j, "tokenizer", &m->tokenizer, path, err, errlen) ||
      need_int(j, "vocab_size", &m->vocab_size, path, err, errlen) ||
      need_int(j, "eos_token_id", &m->eos_token_id, path, err, errlen) ||
      need_str(j, "dtype", &m->dtype, path, err, errlen) ||
      need_str(j, "created_at", &m->created_at, path, err, errlen) ||
      need_int(j, "total_tokens", &m->total_tokens, path, err, errlen) ||
      need_int(j, "total_documents", &m->total_documents, path, err, errlen) ||
      need_int(j, "num_shards", &m->num_shards, path, err, errlen))
    goto out;
  const Json *sh = json_get(j, "shards");
  if (!sh || sh->type != JSON_ARR) {
    snprintf(err, errlen, "%s: manifest field 'shards' %s", path,
             sh ? "is not an array" : "is missing");
    goto out;
  }
  m->shards = xcalloc((size_t)sh->n + 1, sizeof *m->shards);
  for (int i = 0; i < sh->n; i++) {
    const Json *e = sh->items[i];
    ManifestShard *s = &m->shards[i];
    m->n_shards = i + 1;
    char where[1100], *ck = NULL;
    snprintf(where, sizeof where, "%s: shards[%d]", path, i);
    if (e->type != JSON_OBJ) {
      snprintf(err, errlen, "%s is not an object", where);
      goto out;
    }
    if (need_str(e, "path", &s->path, where, err, errlen) ||
        need_str(e, "index_path", &s->index_path, where, err, errlen) ||
        need_int(e, "num_tokens", &s->num_tokens, where, err, errlen) ||
        need_int(e, "num_documents", &s->num_documents, where, err, errlen) ||
        need_str(e, "checksum", &ck, where, err, errlen))
      goto out;
    snprintf(s->checksum, sizeof s->checksum, "%s", ck);
    free(ck);
  }
  const Json *si = json_get(j, "source_info");
  if (si && si->type == JSON_OBJ) {
    const char *src = json_get_str(si, "source", NULL);
    if (src) m->source = xstrdup(src);
    m->num_shard_dirs = (int)json_get_int(si, "num_shard_dirs", -1);
  }
  rc = 0;
out:
  json_free(j);
  if (rc) manifest_free(m);
  return rc;
}

void manifest_free(Manifest *m) {
  for (int i = 0; i < m->n_shards; i++) {
    free(m->shards[i].path);
    free(m->shards[i].index_path);
  }
  free(m->shards);
  free(m->dataset);
  free(m->version);
  free(m->tokenizer);
  free(m->dtype);
  free(m->created_at);
  free(m->source);
  memset(m, 0, sizeof *m);
  m->num_shard_dirs = -1;
}

void manifest_resolve(const char *path, char *out, size_t outlen) {
  if (fs_is_dir(path)) snprintf(out, outlen, "%s/manifest.json", path);
  else snprintf(out, outlen, "%s", path);
}

/* ------------------------------------------------------------ verification */

typedef struct VerifyCtx {
  FILE *out;
  int problems;
  char **listed; /* full paths of listed .npy/.idx files */
  int n_listed;
} VerifyCtx;

static void problem(VerifyCtx *v, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void problem(VerifyCtx *v, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fputs("PROBLEM: ", v->out);
  vfprintf(v->out, fmt, ap);
  fputc('\n', v->out);
  va_end(ap);
  v->problems++;
}

static int name_has_tmp(const char *name) {
  const char *t = strstr(name, ".tmp");
  return t && (t[4] == 0 || t[4] == '.');
}

static int ends_with(const char *s, const char *suf) {
  size_t a = strlen(s), b = strlen(suf);
  return a >= b && strcmp(s + a - b, suf) == 0;
}

/* Walks dir recursively, flagging leftovers of an interrupted write and
 * shard files no manifest lists. */
static void scan_strays(VerifyCtx *v, const char *dir, int depth) {
  DIR *d = opendir(dir);
  if (!d) return;
  struct dirent *e;
  while ((e = readdir(d))) {
    if (e->d_name[0] == '.' && (!e->d_name[1] || (e->d_name[1] == '.' && !e->d_name[2]))) continue;
    char p[4096];
    snprintf(p, sizeof p, "%s/%s", dir, e->d_name);
    if (fs_is_dir(p)) {
      if (depth < 4) scan_strays(v, p, depth + 1);
      continue;
    }
    if (name_has_tmp(e->d_name)) {
      problem(v, "%s: leftover temporary file from an interrupted write", p);
    } else if (ends_with(e->d_name, ".npy") || ends_with(e->d_name, ".idx")) {
      int found = 0;
      for (int i = 0; i < v->n_listed && !found; i++) found = strcmp(v->listed[i], p) == 0;
      if (!found) problem(v, "%s: not listed in the manifest (incomplete or stale shard)", p);
    }
  }
  closedir(d);
}

/* Checks one shard's npy, idx, token range and EOS placement. */
static void verify_shard(VerifyCtx *v, const Manifest *m, const ManifestShard *s, const char *npy,
                         const char *idx, int checksums) {
  char err[1400];
  TokenShard sh;
  if (shard_map(npy, &sh, err, sizeof err)) {
    problem(v, "%s", err);
    return;
  }
  if (sh.n != s->num_tokens)
    problem(v, "%s: has %" PRId64 " tokens, manifest says %" PRId64, npy, sh.n, s->num_tokens);
  int64_t bad_ids = 0, first_bad = -1;
  for (int64_t i = 0; i < sh.n; i++) {
    if ((int64_t)sh.tokens[i] >= m->vocab_size) {
      if (!bad_ids++) first_bad = i;
    }
  }
  if (bad_ids)
    problem(v, "%s: %" PRId64 " token ids >= vocab_size %" PRId64 " (first at offset %" PRId64
            ": %u)", npy, bad_ids, m->vocab_size, first_bad, sh.tokens[first_bad]);
  uint64_t *pairs, nd;
  if (idx_read(idx, &pairs, &nd, err, sizeof err)) {
    problem(v, "%s", err);
  } else {
    if ((int64_t)nd != s->num_documents)
      problem(v, "%s: has %" PRIu64 " documents, manifest says %" PRId64, idx, nd,
              s->num_documents);
    uint64_t prev_end = 0;
    int ranges_ok = 1;
    for (uint64_t i = 0; i < nd && ranges_ok; i++) {
      uint64_t a = pairs[2 * i], b = pairs[2 * i + 1];
      if (a != prev_end || b <= a) {
        problem(v, "%s: document %" PRIu64 " range [%" PRIu64 ", %" PRIu64
                ") is not contiguous and increasing (previous ended at %" PRIu64 ")",
                idx, i, a, b, prev_end);
        ranges_ok = 0;
        continue;
      }
      if (b > (uint64_t)sh.n) {
        problem(v, "%s: document %" PRIu64 " ends at %" PRIu64 ", past the shard's %" PRId64
                " tokens", idx, i, b, sh.n);
        ranges_ok = 0;
        continue;
      }
      if (sh.tokens[b - 1] != (uint32_t)m->eos_token_id) {
        problem(v, "%s: document %" PRIu64 " does not end with EOS %" PRId64 " (found %u)", npy, i,
                m->eos_token_id, sh.tokens[b - 1]);
        ranges_ok = 0;
        continue;
      }
      prev_end = b;
    }
    if (ranges_ok && prev_end != (uint64_t)sh.n)
      problem(v, "%s: %" PRId64 " tokens after the last indexed document", npy,
              sh.n - (int64_t)prev_end);
    free(pairs);
  }
  shard_unmap(&sh);
  if (checksums) {
    char hex[65];
    if (sha256_file_hex(npy, hex, err, sizeof err)) problem(v, "%s", err);
    else if (strcmp(hex, s->checksum) != 0)
      problem(v, "%s: SHA-256 mismatch (manifest %s, file %s)", npy, s->checksum, hex);
  }
}

int manifest_verify(const char *path, int checksums, FILE *out, char *err, size_t errlen) {
  char mpath[4096], dir[4096];
  manifest_resolve(path, mpath, sizeof mpath);
  fs_dirname(mpath, dir, sizeof dir);
  VerifyCtx v = {out, 0, NULL, 0};
  Manifest m;
  if (!fs_exists(mpath)) {
    snprintf(err, errlen, "%s: no manifest (incomplete or interrupted prep?)", mpath);
    if (fs_is_dir(dir)) scan_strays(&v, dir, 0);
    return -1;
  }
  if (manifest_read(mpath, &m, err, errlen)) return -1;
  if (strcmp(m.dtype, "uint32") != 0) problem(&v, "%s: dtype '%s', expected 'uint32'", mpath, m.dtype);
  if (m.eos_token_id >= m.vocab_size)
    problem(&v, "%s: eos_token_id %" PRId64 " >= vocab_size %" PRId64, mpath, m.eos_token_id,
            m.vocab_size);
  if (m.num_shards != m.n_shards)
    problem(&v, "%s: num_shards %" PRId64 " but %d shards listed", mpath, m.num_shards, m.n_shards);
  int64_t tok = 0, docs = 0;
  v.listed = xcalloc((size_t)m.n_shards * 2 + 1, sizeof *v.listed);
  for (int i = 0; i < m.n_shards; i++) {
    const ManifestShard *s = &m.shards[i];
    tok += s->num_tokens;
    docs += s->num_documents;
    char npy[8192], idx[8192];
    snprintf(npy, sizeof npy, "%s/%s", dir, s->path);
    snprintf(idx, sizeof idx, "%s/%s", dir, s->index_path);
    v.listed[v.n_listed++] = xstrdup(npy);
    v.listed[v.n_listed++] = xstrdup(idx);
    if (!fs_exists(npy)) {
      problem(&v, "%s: missing shard", npy);
      continue;
    }
    if (!fs_exists(idx)) problem(&v, "%s: missing index", idx);
    verify_shard(&v, &m, s, npy, idx, checksums);
  }
  if (tok != m.total_tokens)
    problem(&v, "%s: total_tokens %" PRId64 " but shards sum to %" PRId64, mpath, m.total_tokens, tok);
  if (docs != m.total_documents)
    problem(&v, "%s: total_documents %" PRId64 " but shards sum to %" PRId64, mpath,
            m.total_documents, docs);
  scan_strays(&v, dir, 0);
  for (int i = 0; i < v.n_listed; i++) free(v.listed[i]);
  free(v.listed);
  manifest_free(&m);
  return v.problems;
}

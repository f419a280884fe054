/* shard_writer.c: bucketed, rotating, crash-safe writer of .npy/.idx token
 * shards and their manifests (see shard_writer.h for the layout). */
#include "data/shard_writer.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "core/fsutil.h"
#include "core/hash.h"
#include "core/log.h"
#include "data/manifest.h"
#include "data/npy.h"
#include "data/shard_index.h"

/* stdio buffer per open shard: 16 MiB over all buckets, 16..256 KiB each */
static size_t file_buf_size(int num_buckets) {
  size_t b = ((size_t)16 << 20) / (size_t)num_buckets;
  return b < (16 << 10) ? (16 << 10) : b > (256 << 10) ? (256 << 10) : b;
}

/* One bucket directory: its open shard and the shards it has completed. */
typedef struct Bucket {
  int id;
  char dir[4096];
  FILE *f;               /* open shard, streaming to tmp */
  char *fbuf;            /* stdio buffer of f */
  char tmp[8192];
  int shard_n;           /* index of the open (or next) shard */
  int64_t ntok;          /* tokens in the open shard */
  uint64_t *pairs;       /* (ndocs, 2) boundaries of the open shard */
  size_t ndocs, cap;
  ManifestShard *done;   /* completed shards; paths relative to dir */
  int ndone, cap_done;
  int manifest_written;
} Bucket;

struct ShardWriter {
  ShardWriterConfig cfg;
  char *output, *name, *version, *tokenizer, *source;
  Bucket **buckets; /* (num_buckets) lazily created */
  int64_t tokens, documents;
  int slow_write;   /* NMOE_TEST_SLOW_WRITE: lets tests kill a prep mid-write */
  int root_written;
  int lock_fd;      /* flock on the output directory: one writer per output */
};

int shard_bucket(const char *doc_id, size_t len, int num_buckets) {
  char hex[33];
  md5_hex(doc_id, len, hex);
  uint64_t v = 0;
  for (int i = 0; i < 16; i++) {
    char c = hex[i];
    v = v << 4 | (uint64_t)(c <= '9' ? c - '0' : c - 'a' + 10);
  }
  return (int)(v % (uint64_t)num_buckets);
}

static void shard_name(const ShardWriter *w, int n, const char *ext, char *out, size_t outlen) {
  snprintf(out, outlen, "%s-%s-shard-%06d.%s", w->name, w->version, n, ext);
}

static int is_bucket_dir_name(const char *s) {
  if (strncmp(s, "shard_", 6) != 0) return 0;
  const char *d = s + 6;
  int n = 0;
  while (d[n] >= '0' && d[n] <= '9') n++;
  return n >= 4 && d[n] == 0;
}

static int name_is_tmp(const char *s) {
  const char *t = strstr(s, ".tmp");
  return t && (t[4] == 0 || t[4] == '.');
}

/* Removes temporary leftovers and this dataset's previous shards and manifest
 * from dir (a bucket directory or the root). */
static int clean_dir(const ShardWriter *w, const char *dir, int is_bucket, char *err,
                     size_t errlen) {
  DIR *d = opendir(dir);
  if (!d) return 0;
  char prefix[600];
  snprintf(prefix, sizeof prefix, "%s-%s-shard-", w->name, w->version);
  struct dirent *e;
  int rc = 0;
  while ((e = readdir(d))) {
    const char *s = e->d_name;
    int ours = name_is_tmp(s) || (is_bucket && strcmp(s, "manifest.json") == 0) ||
               (is_bucket && strncmp(s, prefix, strlen(prefix)) == 0);
    if (!ours) continue;
    char p[8192];
    snprintf(p, sizeof p, "%s/%s", dir, s);
    if (fs_is_dir(p)) continue;
    if (unlink(p) && errno != ENOENT) {
      snprintf(err, errlen, "cannot remove stale %s: %s", p, strerror(errno));
      rc = -1;
      break;
    }
  }
  closedir(d);
  return rc;
}

static int prepare_output(ShardWriter *w, char *err, size_t errlen) {
  if (fs_mkdirs(w->output, err, errlen)) return -1;
  if (access(w->output, W_OK | X_OK)) {
    snprintf(err, errlen, "output directory %s is not writable: %s", w->output, strerror(errno));
    return -1;
  }
  /* Two preps into one directory would delete each other's shards: the second
   * one stops before touching anything. The lock is on the directory itself (no
   * file left behind), and the kernel drops it on any exit. */
  w->lock_fd = open(w->output, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (w->lock_fd < 0) {
    snprintf(err, errlen, "cannot open output directory %s: %s", w->output, strerror(errno));
    return -1;
  }
  if (flock(w->lock_fd, LOCK_EX | LOCK_NB)) {
    snprintf(err, errlen, "output directory %s is being written by another prep", w->output);
    return -1;
  }
  char p[4200];
  /* The root manifest goes first: from here on the output reads as incomplete. */
  snprintf(p, sizeof p, "%s/manifest.json", w->output);
  if (unlink(p) && errno != ENOENT) {
    snprintf(err, errlen, "cannot remove old %s: %s", p, strerror(errno));
    return -1;
  }
  if (fs_fsync_dir(w->output, err, errlen)) return -1;
  if (clean_dir(w, w->output, 0, err, errlen)) return -1;
  DIR *d = opendir(w->output);
  if (!d) {
    snprintf(err, errlen, "cannot read output directory %s: %s", w->output, strerror(errno));
    return -1;
  }
  struct dirent *e;
  int rc = 0;
  while (!rc && (e = readdir(d))) {
    if (!is_bucket_dir_name(e->d_name)) continue;
    char sub[8192];
    snprintf(sub, sizeof sub, "%s/%s", w->output, e->d_name);
    if (fs_is_dir(sub)) rc = clean_dir(w, sub, 1, err, errlen);
  }
  closedir(d);
  return rc;
}

ShardWriter *shard_writer_open(const ShardWriterConfig *cfg, char *err, size_t errlen) {
  if (cfg->num_buckets < 1 || cfg->num_buckets > 100000) {
    snprintf(err, errlen, "number of shard buckets must be in 1..100000 (got %d)", cfg->num_buckets);
    return NULL;
  }
  if (cfg->tokens_per_shard < 1) {
    snprintf(err, errlen, "tokens per shard must be positive");
    return NULL;
  }
  if (strchr(cfg->name, '/') || strchr(cfg->version, '/') || !cfg->name[0] || !cfg->version[0]) {
    snprintf(err, errlen, "dataset name and version must be non-empty and contain no '/'");
    return NULL;
  }
  ShardWriter *w = xcalloc(1, sizeof *w);
  w->output = xstrdup(cfg->output);
  w->name = xstrdup(cfg->name);
  w->version = xstrdup(cfg->version);
  w->tokenizer = xstrdup(cfg->tokenizer);
  w->source = xstrdup(cfg->source ? cfg->source : "");
  w->cfg = *cfg;
  w->lock_fd = -1;
  w->buckets = xcalloc((size_t)cfg->num_buckets, sizeof *w->buckets);
  /* one open shard per bucket: lift the soft open-file limit (1024 buckets) */
  struct rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max &&
      rl.rlim_cur < (rlim_t)cfg->num_buckets + 64) {
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl); /* best effort: fopen reports the failure if still short */
  }
  const char *slow = getenv("NMOE_TEST_SLOW_WRITE");
  w->slow_write = slow && slow[0] && strcmp(slow, "0") != 0;
  if (prepare_output(w, err, errlen)) {
    shard_writer_abort(w);
    return NULL;
  }
  return w;
}

static int bucket_open_shard(ShardWriter *w, Bucket *b, char *err, size_t errlen) {
  char name[700];
  shard_name(w, b->shard_n, "npy", name, sizeof name);
  snprintf(b->tmp, sizeof b->tmp, "%s/%s.tmp", b->dir, name);
  b->f = fopen(b->tmp, "wb");
  if (!b->f) {
    snprintf(err, errlen, "cannot create %s: %s", b->tmp, strerror(errno));
    return -1;
  }
  size_t bs = file_buf_size(w->cfg.num_buckets);
  b->fbuf = xmalloc(bs);
  setvbuf(b->f, b->fbuf, _IOFBF, bs);
  int64_t zero = 0; /* placeholder; numpy's header padding keeps its size fixed */
  if (npy_write_header(b->f, "<u4", &zero, 1, err, errlen)) return -1;
  b->ntok = 0;
  b->ndocs = 0;
  return 0;
}

/* Header rewrite, fsync, checksum, rename, then the .idx. */
static int bucket_close_shard(ShardWriter *w, Bucket *b, char *err, size_t errlen) {
  FILE *f = b->f;
  b->f = NULL;
  int64_t n = b->ntok;
  int ok = fflush(f) == 0 && fseek(f, 0, SEEK_SET) == 0;
  if (ok && npy_write_header(f, "<u4", &n, 1, err, errlen)) {
    fclose(f);
    free(b->fbuf);
    b->fbuf = NULL;
    return -1;
  }
  ok = ok && fflush(f) == 0 && fsync(fileno(f)) == 0;
  int eno = errno;
  ok = (fclose(f) == 0) && ok;
  free(b->fbuf);
  b->fbuf = NULL;
  if (!ok) {
    snprintf(err, errlen, "cannot write %s: %s", b->tmp, strerror(eno ? eno : errno));
    return -1;
  }
  char name[700], idxname[700], final[8192], idx[8192];
  shard_name(w, b->shard_n, "npy", name, sizeof name);
  shard_name(w, b->shard_n, "idx", idxname, sizeof idxname);
  snprintf(final, sizeof final, "%s/%s", b->dir, name);
  snprintf(idx, sizeof idx, "%s/%s", b->dir, idxname);
  char hex[65];
  if (sha256_file_hex(b->tmp, hex, err, errlen)) return -1;
  if (fs_commit_rename(b->tmp, final, err, errlen)) return -1;
  b->tmp[0] = 0;
  if (b->ndone == b->cap_done) {
    b->cap_done = b->cap_done ? 2 * b->cap_done : 4;
    b->done = xrealloc(b->done, (size_t)b->cap_done * sizeof *b->done);
  }
  ManifestShard *s = &b->done[b->ndone++];
  s->path = xstrdup(name);
  s->index_path = xstrdup(idxname);
  s->num_tokens = n;
  s->num_documents = (int64_t)b->ndocs;
  memcpy(s->checksum, hex, sizeof hex);
  if (idx_write(idx, b->pairs, b->ndocs, err, errlen)) return -1;
  b->shard_n++;
  return 0;
}

int shard_writer_add(ShardWriter *w, const char *doc_id, size_t id_len, const uint32_t *ids,
                     size_t n, char *err, size_t errlen) {
  int bi = shard_bucket(doc_id, id_len, w->cfg.num_buckets);
  Bucket *b = w->buckets[bi];
  if (!b) {
    b = w->buckets[bi] = xcalloc(1, sizeof *b);
    b->id = bi;
    snprintf(b->dir, sizeof b->dir, "%s/shard_%04d", w->output, bi);
    if (fs_mkdirs(b->dir, err, errlen)) return -1;
  }
  int64_t len = (int64_t)n + 1;
  if (b->f && b->ndocs > 0 && b->ntok + len > w->cfg.tokens_per_shard &&
      bucket_close_shard(w, b, err, errlen))
    return -1;
  if (!b->f && bucket_open_shard(w, b, err, errlen)) return -1;
  uint32_t eos = w->cfg.eos_id;
  if (fwrite(ids, sizeof *ids, n, b->f) != n || fwrite(&eos, sizeof eos, 1, b->f) != 1) {
    snprintf(err, errlen, "cannot write %s: %s", b->tmp, strerror(errno));
    return -1;
  }
  if (b->ndocs == b->cap) {
    b->cap = b->cap ? 2 * b->cap : 256;
    b->pairs = xrealloc(b->pairs, b->cap * 2 * sizeof *b->pairs);
  }
  b->pairs[2 * b->ndocs] = (uint64_t)b->ntok;
  b->pairs[2 * b->ndocs + 1] = (uint64_t)(b->ntok + len);
  b->ndocs++;
  b->ntok += len;
  w->tokens += len;
  w->documents++;
  if (w->slow_write) {
    fflush(b->f);
    usleep(2000);
  }
  return 0;
}

void shard_writer_stats(const ShardWriter *w, ShardWriterStats *st) {
  memset(st, 0, sizeof *st);
  st->tokens = w->tokens;
  st->documents = w->documents;
  for (int i = 0; i < w->cfg.num_buckets; i++) {
    const Bucket *b = w->buckets[i];
    if (!b) continue;
    st->bucket_dirs++;
    st->shards += b->ndone + (b->f ? 1 : 0);
  }
}

/* ISO-8601 UTC like Python's datetime.utcnow().isoformat() + "Z";
 * SOURCE_DATE_EPOCH pins it for reproducible outputs. */
static void created_at_now(char *out, size_t outlen) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  const char *sde = getenv("SOURCE_DATE_EPOCH");
  if (sde && *sde) {
    ts.tv_sec = (time_t)strtoll(sde, NULL, 10);
    ts.tv_nsec = 0;
  }
  struct tm tm;
  gmtime_r(&ts.tv_sec, &tm);
  char base[40];
  strftime(base, sizeof base, "%Y-%m-%dT%H:%M:%S", &tm);
  long us = ts.tv_nsec / 1000;
  if (us) snprintf(out, outlen, "%s.%06ldZ", base, us);
  else snprintf(out, outlen, "%sZ", base);
}

static Manifest manifest_base(const ShardWriter *w, const char *created_at) {
  Manifest m;
  memset(&m, 0, sizeof m);
  m.dataset = w->name;
  m.version = w->version;
  m.tokenizer = w->tokenizer;
  m.dtype = "uint32";
  m.created_at = (char *)created_at;
  m.vocab_size = w->cfg.vocab_size;
  m.eos_token_id = w->cfg.eos_id;
  m.source = w->source;
  m.num_shard_dirs = -1;
  return m;
}

static void free_writer(ShardWriter *w) {
  for (int i = 0; i < w->cfg.num_buckets; i++) {
    Bucket *b = w->buckets[i];
    if (!b) continue;
    if (b->f) fclose(b->f);
    free(b->fbuf);
    for (int k = 0; k < b->ndone; k++) {
      free(b->done[k].path);
      free(b->done[k].index_path);
    }
    free(b->done);
    free(b->pairs);
    free(b);
  }
  free(w->buckets);
  if (w->lock_fd >= 0) close(w->lock_fd);
  free(w->output);
  free(w->name);
  free(w->version);
  free(w->tokenizer);
  free(w->source);
  free(w);
}

int shard_writer_finish(ShardWriter *w, ShardWriterStats *st, char *err, size_t errlen) {
  char created[96];
  created_at_now(created, sizeof created);
  int total_shards = 0, dirs = 0;
  for (int i = 0; i < w->cfg.num_buckets; i++) {
    Bucket *b = w->buckets[i];
    if (!b) continue;
    if (b->f && bucket_close_shard(w, b, err, errlen)) goto fail;
    Manifest m = manifest_base(w, created);
    m.shards = b->done;
    m.n_shards = m.num_shards = b->ndone;
    for (int k = 0; k < b->ndone; k++) {
      m.total_tokens += b->done[k].num_tokens;
      m.total_documents += b->done[k].num_documents;
    }
    char p[4200];
    snprintf(p, sizeof p, "%s/manifest.json", b->dir);
    if (manifest_write(p, &m, err, errlen)) goto fail;
    b->manifest_written = 1;
    total_shards += b->ndone;
    dirs++;
  }
  Manifest root = manifest_base(w, created);
  root.shards = xcalloc((size_t)total_shards + 1, sizeof *root.shards);
  for (int i = 0; i < w->cfg.num_buckets; i++) {
    Bucket *b = w->buckets[i];
    if (!b) continue;
    for (int k = 0; k < b->ndone; k++) {
      ManifestShard *s = &root.shards[root.n_shards++];
      *s = b->done[k];
      char rel[1024];
      snprintf(rel, sizeof rel, "shard_%04d/%s", b->id, b->done[k].path);
      s->path = xstrdup(rel);
      snprintf(rel, sizeof rel, "shard_%04d/%s", b->id, b->done[k].index_path);
      s->index_path = xstrdup(rel);
      root.total_tokens += s->num_tokens;
      root.total_documents += s->num_documents;
    }
  }
  root.num_shards = root.n_shards;
  root.num_shard_dirs = dirs;
  char p[4200];
  snprintf(p, sizeof p, "%s/manifest.json", w->output);
  int rc = manifest_write(p, &root, err, errlen);
  for (int i = 0; i < root.n_shards; i++) {
    free(root.shards[i].path);
    free(root.shards[i].index_path);
  }
  free(root.shards);
  if (rc) goto fail;
  if (st) {
    memset(st, 0, sizeof *st);
    st->tokens = w->tokens;
    st->documents = w->documents;
    st->shards = total_shards;
    st->bucket_dirs = dirs;
  }
  free_writer(w);
  return 0;
fail:
  shard_writer_abort(w);
  return -1;
}

void shard_writer_abort(ShardWriter *w) {
  if (!w) return;
  char p[8192];
  for (int i = 0; i < w->cfg.num_buckets; i++) {
    Bucket *b = w->buckets[i];
    if (!b) continue;
    if (b->f) {
      fclose(b->f);
      b->f = NULL;
    }
    if (b->tmp[0]) unlink(b->tmp);
    for (int k = 0; k < b->ndone; k++) {
      snprintf(p, sizeof p, "%s/%s", b->dir, b->done[k].path);
      unlink(p);
      snprintf(p, sizeof p, "%s/%s", b->dir, b->done[k].index_path);
      unlink(p);
    }
    if (b->manifest_written) {
      snprintf(p, sizeof p, "%s/manifest.json", b->dir);
      unlink(p);
    }
    rmdir(b->dir); /* only succeeds when nothing else lives there */
  }
  free_writer(w);
}

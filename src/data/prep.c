/* prep.c: the `nmoe data prep` pipeline (see prep.h): reader thread -> worker
 * threads -> in-order writer on the calling thread, bounded by a ring of
 * in-flight batches so memory stays flat on any input size. */
#include "data/prep.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "core/fsutil.h"
#include "core/hash.h"
#include "core/json.h"
#include "core/log.h"
#include "data/prep_input.h"
#include "data/shard_writer.h"
#include "data/tokenizer.h"

#define BATCH_DOCS 64
#define BATCH_BYTES (1u << 20)
#define MAX_WARNINGS 10

enum { DOC_EMPTY, DOC_FILTERED, DOC_OK, DOC_ERROR };
enum { SLOT_FREE, SLOT_READY, SLOT_BUSY, SLOT_DONE };

/* One record: raw bytes in its batch's arena, then the worker's result. */
typedef struct PDoc {
  size_t off, len;  /* record (jsonl line or whole text file) in the arena */
  int file;
  int64_t line;     /* 1-based line in the file (0 for text files) */
  int64_t in_bytes; /* input bytes consumed when it was read (progress) */
  int status;
  int invalid_utf8, truncated;
  char *id;         /* doc id from the record, NULL = derive from the index */
  size_t id_len;
  char *msg;        /* DOC_ERROR: "file:line: what" */
  uint32_t *ids;    /* (n,) tokens, EOS not included */
  size_t n;
} PDoc;

typedef struct Batch {
  char *arena;
  size_t alen, acap;
  PDoc *docs;
  int n, cap;
} Batch;

typedef struct Pipe {
  const PrepOptions *o;
  const Tokenizer *tok;
  InputFile *files;
  int nfiles;
  int64_t total_bytes;
  pthread_mutex_t mu;
  pthread_cond_t cv_work, cv_done, cv_space;
  int W;             /* ring size: batches in flight */
  Batch **ring;      /* (W) batch of seq s lives at s % W */
  int *state;        /* (W) SLOT_* */
  int64_t n_read, n_work, n_written;
  int reader_done, stop;
  char reader_err[1200]; /* non-empty: the reader failed after n_read batches */
  int64_t records;
} Pipe;

/* ------------------------------------------------------------------ reader */

static Batch *batch_new(void) {
  Batch *b = xcalloc(1, sizeof *b);
  b->acap = 1 << 16;
  b->arena = xmalloc(b->acap);
  b->cap = 64;
  b->docs = xcalloc((size_t)b->cap, sizeof *b->docs);
  return b;
}

static void batch_free(Batch *b) {
  if (!b) return;
  for (int i = 0; i < b->n; i++) {
    free(b->docs[i].id);
    free(b->docs[i].msg);
    free(b->docs[i].ids);
  }
  free(b->docs);
  free(b->arena);
  free(b);
}

static void batch_add(Batch *b, const char *rec, size_t len, int file, int64_t line, int64_t in_bytes) {
  if (b->alen + len + 1 > b->acap) {
    while (b->alen + len + 1 > b->acap) b->acap *= 2;
    b->arena = xrealloc(b->arena, b->acap);
  }
  if (b->n == b->cap) {
    b->cap *= 2;
    b->docs = xrealloc(b->docs, (size_t)b->cap * sizeof *b->docs);
  }
  PDoc *d = &b->docs[b->n++];
  memset(d, 0, sizeof *d);
  d->off = b->alen;
  d->len = len;
  d->file = file;
  d->line = line;
  d->in_bytes = in_bytes;
  memcpy(b->arena + b->alen, rec, len);
  b->arena[b->alen + len] = 0;
  b->alen += len + 1;
}

/* Hands a full batch to the workers; 0, or -1 when the pipeline is stopping. */
static int submit(Pipe *p, Batch *b) {
  pthread_mutex_lock(&p->mu);
  while (!p->stop && p->n_read - p->n_written >= p->W) pthread_cond_wait(&p->cv_space, &p->mu);
  if (p->stop) {
    pthread_mutex_unlock(&p->mu);
    batch_free(b);
    return -1;
  }
  int slot = (int)(p->n_read % p->W);
  p->ring[slot] = b;
  p->state[slot] = SLOT_READY;
  p->n_read++;
  pthread_cond_signal(&p->cv_work);
  pthread_mutex_unlock(&p->mu);
  return 0;
}

static int is_ws(char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n' || c == '\f' || c == '\v'; }

static void *reader_main(void *arg) {
  Pipe *p = arg;
  const PrepOptions *o = p->o;
  char err[1200] = "";
  Batch *b = batch_new();
  int64_t base = 0; /* bytes of the files before this one */
  for (int fi = 0; fi < p->nfiles && !err[0]; fi++) {
    const InputFile *f = &p->files[fi];
    if (o->source == PREP_TEXT) {
      size_t n;
      char *text = fs_read_all(f->path, &n, err, sizeof err);
      if (!text) break;
      batch_add(b, text, n, fi, 0, base + (int64_t)n);
      free(text);
      p->records++;
    } else {
      LineReader r;
      if (line_reader_open(&r, f->path, o->source == PREP_JSONL_ZST, err, sizeof err)) break;
      const char *line;
      size_t len;
      int rc;
      while ((rc = line_reader_next(&r, &line, &len, err, sizeof err)) == 1) {
        while (len && is_ws(*line)) line++, len--;
        while (len && is_ws(line[len - 1])) len--;
        if (!len) continue; /* blank lines are not records */
        batch_add(b, line, len, fi, r.line, base + r.bytes_read);
        p->records++;
        if (b->n >= BATCH_DOCS || b->alen >= BATCH_BYTES) {
          if (submit(p, b)) {
            b = NULL;
            break;
          }
          b = batch_new();
        }
      }
      line_reader_close(&r);
      if (!b) break;
    }
    if (b && (b->n >= BATCH_DOCS || b->alen >= BATCH_BYTES)) {
      if (submit(p, b)) b = NULL;
      else b = batch_new();
    }
    if (!b) break;
    base += f->size;
  }
  if (b && b->n > 0 && !err[0]) {
    submit(p, b);
    b = NULL;
  }
  batch_free(b);
  pthread_mutex_lock(&p->mu);
  if (err[0]) snprintf(p->reader_err, sizeof p->reader_err, "%s", err);
  p->reader_done = 1;
  pthread_cond_broadcast(&p->cv_work);
  pthread_cond_broadcast(&p->cv_done);
  pthread_mutex_unlock(&p->mu);
  return NULL;
}

/* ------------------------------------------------------------------ worker */

static void doc_error(PDoc *d, const Pipe *p, const char *fmt, const char *a, const char *b) {
  char what[1024], msg[2400];
  snprintf(what, sizeof what, fmt, a, b);
  snprintf(msg, sizeof msg, "%s:%lld: %s", p->files[d->file].path, (long long)d->line, what);
  d->msg = xstrdup(msg);
  d->status = DOC_ERROR;
}

/* Python's str() of a JSON scalar used as an id; NULL for objects/arrays. */
static char *id_from_json(const Json *v) {
  char buf[64];
  switch (v->type) {
    case JSON_STR: return xstrdup(v->str);
    case JSON_NULL: return xstrdup("None");
    case JSON_BOOL: return xstrdup(v->b ? "True" : "False");
    case JSON_NUM:
      if (v->is_int) {
        snprintf(buf, sizeof buf, "%lld", (long long)v->i);
      } else { /* shortest repr that round-trips, with Python's ".0" */
        for (int prec = 1; prec <= 17; prec++) {
          snprintf(buf, sizeof buf, "%.*g", prec, v->num);
          if (strtod(buf, NULL) == v->num) break;
        }
        if (!strpbrk(buf, ".eni")) strcat(buf, ".0");
      }
      return xstrdup(buf);
    default: return NULL;
  }
}

/* Parses a jsonl record into (text, id); returns text (malloc'd) or NULL when
 * the record is empty or an error (d->status set). */
static char *record_text(const Pipe *p, const char *rec, PDoc *d, size_t *tlen) {
  const PrepOptions *o = p->o;
  char err[512];
  Json *j = json_parse(rec, d->len, err, sizeof err);
  if (!j) {
    doc_error(d, p, "malformed JSON (%s)%s", err, "");
    return NULL;
  }
  char *text = NULL;
  const Json *t = j->type == JSON_OBJ ? json_get(j, o->text_field) : NULL;
  if (j->type != JSON_OBJ) {
    doc_error(d, p, "expected a JSON object%s%s", "", "");
  } else if (!t) {
    doc_error(d, p, "no \"%s\" field%s", o->text_field, "");
  } else if (t->type == JSON_NULL || (t->type == JSON_STR && t->str_len == 0)) {
    d->status = DOC_EMPTY;
  } else if (t->type != JSON_STR) {
    doc_error(d, p, "field \"%s\" is not a string%s", o->text_field, "");
  } else {
    const Json *idv = o->id_field && o->id_field[0] ? json_get(j, o->id_field) : NULL;
    if (idv) {
      d->id = id_from_json(idv);
      if (!d->id) doc_error(d, p, "id field \"%s\" is not a string or number%s", o->id_field, "");
    }
    if (d->status != DOC_ERROR) {
      text = xmalloc(t->str_len + 1);
      memcpy(text, t->str, t->str_len + 1);
      *tlen = t->str_len;
    }
  }
  json_free(j);
  return text;
}

static void process_doc(const Pipe *p, Batch *b, PDoc *d) {
  const PrepOptions *o = p->o;
  const char *rec = b->arena + d->off;
  size_t tlen = d->len;
  char *owned = NULL;
  const char *text = rec;
  if (o->source == PREP_TEXT) {
    d->id = xstrdup(p->files[d->file].rel);
  } else {
    owned = record_text(p, rec, d, &tlen);
    if (!owned) return;
    text = owned;
  }
  if (d->id && !d->id[0]) { /* an empty id falls back to md5(text)[:16], as the original */
    char hex[33];
    md5_hex(text, tlen, hex);
    hex[16] = 0;
    free(d->id);
    d->id = xstrdup(hex);
  }
  if (d->id) d->id_len = strlen(d->id);
  size_t slen;
  char *san = utf8_sanitize(text, tlen, &slen);
  if (san) {
    d->invalid_utf8 = 1;
    free(owned);
    owned = san;
    text = san;
    tlen = slen;
  }
  size_t nlen;
  char *norm = text_normalize_nfc(text, tlen, &nlen);
  free(owned);
  d->status = DOC_FILTERED;
  if (nlen > 0) {
    size_t cap = 0;
    d->n = tok_encode(p->tok, norm, nlen, &d->ids, &cap);
    if ((int64_t)d->n >= o->min_tokens) {
      d->status = DOC_OK;
      if ((int64_t)d->n > o->max_tokens) {
        d->n = (size_t)o->max_tokens;
        d->truncated = 1;
      }
    } else {
      free(d->ids);
      d->ids = NULL;
    }
  }
  free(norm);
}

static void *worker_main(void *arg) {
  Pipe *p = arg;
  pthread_mutex_lock(&p->mu);
  for (;;) {
    while (!p->stop && p->n_work == p->n_read && !p->reader_done) pthread_cond_wait(&p->cv_work, &p->mu);
    if (p->stop || p->n_work == p->n_read) break;
    int slot = (int)(p->n_work++ % p->W);
    p->state[slot] = SLOT_BUSY;
    Batch *b = p->ring[slot];
    pthread_mutex_unlock(&p->mu);
    for (int i = 0; i < b->n; i++) process_doc(p, b, &b->docs[i]);
    pthread_mutex_lock(&p->mu);
    p->state[slot] = SLOT_DONE;
    pthread_cond_broadcast(&p->cv_done);
  }
  pthread_mutex_unlock(&p->mu);
  return NULL;
}

/* ------------------------------------------------------------------ writer */

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void human(double v, char *out, size_t n) {
  const char *u[] = {"", "K", "M", "B", "T"};
  int k = 0;
  while (fabs(v) >= 1000 && k < 4) v /= 1000, k++;
  snprintf(out, n, k ? "%.2f%s" : "%.0f%s", v, u[k]);
}

static void progress_line(const Pipe *p, const PrepStats *st, int64_t in_bytes, double t0) {
  double dt = now_s() - t0;
  if (dt <= 0) return;
  char docs[32], dps[32], tok[32], tps[32], eta[64] = "";
  human((double)st->kept, docs, sizeof docs);
  human((double)st->kept / dt, dps, sizeof dps);
  human((double)st->tokens, tok, sizeof tok);
  human((double)st->tokens / dt, tps, sizeof tps);
  if (p->total_bytes > 0 && in_bytes > 0) {
    double frac = (double)in_bytes / (double)p->total_bytes;
    if (frac > 1) frac = 1;
    long rem = (long)(dt / frac - dt);
    snprintf(eta, sizeof eta, "  %5.1f%%  ETA %ld:%02ld:%02ld", 100 * frac, rem / 3600,
             rem / 60 % 60, rem % 60);
  }
  fprintf(stderr, "\r  %s docs (%s/s)  %s tokens (%s/s)%s\x1b[K", docs, dps, tok, tps, eta);
  fflush(stderr);
}

/* Python's Path(path).stem: file name without its last suffix. */
static char *path_stem(const char *path) {
  const char *base = strrchr(path, '/');
  base = base ? base + 1 : path;
  const char *dot = strrchr(base, '.');
  size_t n = dot && dot != base ? (size_t)(dot - base) : strlen(base);
  char *s = xmalloc(n + 1);
  memcpy(s, base, n);
  s[n] = 0;
  return s;
}

/* Checks the output's nearest existing ancestor is a writable directory. */
static int check_output_writable(const char *output, char *err, size_t errlen) {
  char p[4096];
  snprintf(p, sizeof p, "%s", output);
  for (;;) {
    struct stat st;
    if (stat(p, &st) == 0) {
      if (!S_ISDIR(st.st_mode)) {
        snprintf(err, errlen, "cannot write output %s: %s is not a directory", output, p);
        return -1;
      }
      if (access(p, W_OK | X_OK)) {
        snprintf(err, errlen, "cannot write output %s: %s is not writable", output, p);
        return -1;
      }
      return 0;
    }
    char *slash = strrchr(p, '/');
    if (!slash) {
      snprintf(p, sizeof p, ".");
    } else if (slash == p) {
      p[1] = 0;
    } else {
      *slash = 0;
    }
  }
}

void prep_defaults(PrepOptions *o) {
  memset(o, 0, sizeof *o);
  o->source = PREP_JSONL;
  o->text_field = "text";
  o->id_field = "id";
  o->version = "v1";
  o->tokenizer = "o200k_harmony";
  o->vocab_size = -1;
  o->eos_token_id = -1;
  o->num_shards = 64;
  o->tokens_per_shard = 500000000;
  o->min_tokens = 10;
  o->max_tokens = 1000000;
  o->progress = -1;
}

int prep_parse_count(const char *s, int64_t *out) {
  char *end;
  errno = 0;
  double v = strtod(s, &end);
  if (end == s || errno || v < 0) return -1;
  double mul = 1;
  switch (*end) {
    case 0: break;
    case 'k': case 'K': mul = 1e3; end++; break;
    case 'm': case 'M': mul = 1e6; end++; break;
    case 'b': case 'B': case 'g': case 'G': mul = 1e9; end++; break;
    case 't': case 'T': mul = 1e12; end++; break;
    default: return -1;
  }
  if (*end || v * mul > 9e18) return -1;
  *out = (int64_t)llround(v * mul);
  return 0;
}

static int check_options(const PrepOptions *o, char *err, size_t errlen) {
  if (!o->output || !o->output[0]) {
    snprintf(err, errlen, "no output directory (--output)");
    return -1;
  }
  if (o->n_paths < 1) {
    snprintf(err, errlen, "no input files given (--paths)");
    return -1;
  }
  if (o->num_shards < 1 || o->tokens_per_shard < 1 || o->min_tokens < 0 || o->max_tokens < 1 ||
      o->max_tokens_total < 0 || o->workers < 0) {
    snprintf(err, errlen,
             "--num-shards, --tokens-per-shard and --max-tokens must be positive; --min-tokens, "
             "--max-tokens-total and --workers non-negative");
    return -1;
  }
  if (!o->text_field || !o->text_field[0]) {
    snprintf(err, errlen, "--text-field must not be empty");
    return -1;
  }
  return 0;
}

/* Consumes one finished batch in order; -1 on a fatal error, 1 to stop at the
 * token limit, else 0. */
static int write_batch(Pipe *p, Batch *b, ShardWriter **w, const ShardWriterConfig *wc,
                       char **stems, int64_t *gidx, PrepStats *st, char *err, size_t errlen) {
  const PrepOptions *o = p->o;
  for (int i = 0; i < b->n; i++) {
    PDoc *d = &b->docs[i];
    if (d->status == DOC_ERROR) {
      if (!o->skip_errors) {
        snprintf(err, errlen, "%s", d->msg);
        return -1;
      }
      if (st->errored++ < MAX_WARNINGS) log_warn("%s (skipped)", d->msg);
      continue;
    }
    if (d->status == DOC_EMPTY) {
      st->skipped++;
      continue;
    }
    st->docs_in++;
    int64_t idx = (*gidx)++;
    st->invalid_utf8 += d->invalid_utf8;
    if (d->status == DOC_FILTERED) {
      st->skipped++;
      continue;
    }
    char idbuf[1200];
    const char *id = d->id;
    size_t id_len = d->id_len;
    if (!id) {
      id_len = (size_t)snprintf(idbuf, sizeof idbuf, "%s:%lld", stems[d->file], (long long)idx);
      id = idbuf;
    }
    if (!*w && !(*w = shard_writer_open(wc, err, errlen))) return -1;
    if (shard_writer_add(*w, id, id_len, d->ids, d->n, err, errlen)) return -1;
    st->kept++;
    st->truncated += d->truncated;
    st->tokens += (int64_t)d->n + 1;
    if (o->max_tokens_total && st->tokens >= o->max_tokens_total) {
      st->hit_token_limit = 1;
      return 1;
    }
  }
  return 0;
}

int prep_run(const PrepOptions *o, PrepStats *st, char *err, size_t errlen) {
  memset(st, 0, sizeof *st);
  double t0 = now_s();
  if (check_options(o, err, errlen)) return -1;
  InputFile *files;
  int nfiles;
  if (input_expand(o->paths, o->n_paths, o->source == PREP_TEXT, &files, &nfiles, err, errlen))
    return -1;
  if (check_output_writable(o->output, err, errlen)) {
    input_files_free(files, nfiles);
    return -1;
  }
  Tokenizer *tok = tok_open(o->tokenizer, err, errlen);
  if (!tok) {
    input_files_free(files, nfiles);
    return -1;
  }
  int64_t vocab = o->vocab_size >= 0 ? o->vocab_size : tok_vocab_size(tok);
  int64_t eos = o->eos_token_id >= 0 ? o->eos_token_id : (int64_t)tok_eos_id(tok);
  int rc = -1;
  char **stems = xcalloc((size_t)nfiles, sizeof *stems);
  for (int i = 0; i < nfiles; i++) stems[i] = path_stem(files[i].path);
  char *name = xstrdup(o->name && o->name[0] ? o->name : stems[0]);
  snprintf(st->name, sizeof st->name, "%s", name);
  /* source_info.source as the original names its local sources */
  char source[1024];
  const char *kind = o->source == PREP_JSONL ? "jsonl" : o->source == PREP_JSONL_ZST ? "jsonl_zst" : "text";
  if (nfiles == 1) snprintf(source, sizeof source, "%s", stems[0]);
  else snprintf(source, sizeof source, "%s:%d_files", kind, nfiles);
  if (vocab < tok_vocab_size(tok) || eos >= vocab || eos > UINT32_MAX) {
    snprintf(err, errlen,
             "vocab size %lld must be >= the tokenizer's %d and exceed the EOS id %lld",
             (long long)vocab, tok_vocab_size(tok), (long long)eos);
    goto done;
  }
  ShardWriterConfig wc = {.output = o->output, .name = name, .version = o->version,
                          .tokenizer = o->tokenizer, .source = source, .vocab_size = vocab,
                          .eos_id = (uint32_t)eos, .num_buckets = o->num_shards,
                          .tokens_per_shard = o->tokens_per_shard};
  if (strchr(name, '/') || !o->version[0] || strchr(o->version, '/')) {
    snprintf(err, errlen, "dataset name '%s' and version '%s' must be non-empty without '/'", name,
             o->version);
    goto done;
  }

  Pipe p;
  memset(&p, 0, sizeof p);
  p.o = o;
  p.tok = tok;
  p.files = files;
  p.nfiles = nfiles;
  for (int i = 0; i < nfiles; i++) p.total_bytes += files[i].size;
  int workers = o->workers > 0 ? o->workers : (int)sysconf(_SC_NPROCESSORS_ONLN);
  if (workers < 1) workers = 1;
  if (workers > 256) workers = 256;
  p.W = 2 * workers + 2;
  p.ring = xcalloc((size_t)p.W, sizeof *p.ring);
  p.state = xcalloc((size_t)p.W, sizeof *p.state);
  pthread_mutex_init(&p.mu, NULL);
  pthread_cond_init(&p.cv_work, NULL);
  pthread_cond_init(&p.cv_done, NULL);
  pthread_cond_init(&p.cv_space, NULL);
  pthread_t reader, *wt = xcalloc((size_t)workers, sizeof *wt);
  if (pthread_create(&reader, NULL, reader_main, &p)) nmoe_fatal("cannot start reader thread");
  for (int i = 0; i < workers; i++)
    if (pthread_create(&wt[i], NULL, worker_main, &p)) nmoe_fatal("cannot start worker thread");

  int show = o->progress < 0 ? isatty(2) : o->progress;
  double last = 0;
  int64_t gidx = 0, in_bytes = 0;
  ShardWriter *w = NULL;
  int status = 0; /* -1 fatal, 1 token limit */
  for (;;) {
    pthread_mutex_lock(&p.mu);
    int slot = (int)(p.n_written % p.W);
    while (!(p.n_written < p.n_read && p.state[slot] == SLOT_DONE) &&
           !(p.reader_done && p.n_written == p.n_read)) {
      struct timespec ts;
      clock_gettime(CLOCK_REALTIME, &ts);
      ts.tv_nsec += 250000000;
      if (ts.tv_nsec >= 1000000000) ts.tv_sec++, ts.tv_nsec -= 1000000000;
      pthread_cond_timedwait(&p.cv_done, &p.mu, &ts);
      if (show && now_s() - last > 0.25) {
        last = now_s();
        progress_line(&p, st, in_bytes, t0);
      }
    }
    if (p.n_written == p.n_read) { /* reader finished and everything is written */
      pthread_mutex_unlock(&p.mu);
      break;
    }
    Batch *b = p.ring[slot];
    pthread_mutex_unlock(&p.mu);
    status = write_batch(&p, b, &w, &wc, stems, &gidx, st, err, errlen);
    if (b->n) in_bytes = b->docs[b->n - 1].in_bytes;
    batch_free(b);
    pthread_mutex_lock(&p.mu);
    p.ring[slot] = NULL;
    p.state[slot] = SLOT_FREE;
    p.n_written++;
    pthread_cond_signal(&p.cv_space);
    pthread_mutex_unlock(&p.mu);
    if (show && now_s() - last > 0.25) {
      last = now_s();
      progress_line(&p, st, in_bytes, t0);
    }
    if (status) break;
  }
  pthread_mutex_lock(&p.mu);
  p.stop = 1;
  pthread_cond_broadcast(&p.cv_work);
  pthread_cond_broadcast(&p.cv_space);
  pthread_mutex_unlock(&p.mu);
  pthread_join(reader, NULL);
  for (int i = 0; i < workers; i++) pthread_join(wt[i], NULL);
  for (int i = 0; i < p.W; i++) batch_free(p.ring[i]);
  if (show) {
    progress_line(&p, st, in_bytes, t0);
    fputc('\n', stderr);
  }
  st->records = p.records;
  if (status >= 0 && p.reader_err[0] && !st->hit_token_limit) {
    snprintf(err, errlen, "%s", p.reader_err);
    status = -1;
  }
  if (status >= 0 && st->kept == 0) {
    snprintf(err, errlen,
             "no documents to write: %lld records read, %lld skipped (empty or < %lld tokens), "
             "%lld malformed; nothing written",
             (long long)st->records, (long long)st->skipped, (long long)o->min_tokens,
             (long long)st->errored);
    status = -1;
  }
  if (status < 0) {
    shard_writer_abort(w);
  } else {
    ShardWriterStats ws;
    if (shard_writer_finish(w, &ws, err, errlen) == 0) {
      st->shards = ws.shards;
      st->bucket_dirs = ws.bucket_dirs;
      rc = 0;
    }
  }
  free(wt);
  free(p.ring);
  free(p.state);
  pthread_mutex_destroy(&p.mu);
  pthread_cond_destroy(&p.cv_work);
  pthread_cond_destroy(&p.cv_done);
  pthread_cond_destroy(&p.cv_space);
done:
  st->seconds = now_s() - t0;
  for (int i = 0; i < nfiles; i++) free(stems[i]);
  free(stems);
  free(name);
  tok_close(tok);
  input_files_free(files, nfiles);
  return rc;
}

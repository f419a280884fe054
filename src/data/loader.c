/* loader.c: deterministic loader over memory-mapped .npy token shards.
 *
 * State per source: a cursor (file_idx, pos_in_file, wrap_count) into its
 * sorted shard list, the sequences emitted in the current stage, and
 * `pending`: windows other ranks take, skipped lazily in one cursor walk
 * before this rank next reads the source (or at the end of the step), so a
 * skip costs O(files crossed), never O(tokens). The walk is the original's
 * NumpyFSLDataset stepping: it leaves a shard only when more tokens are
 * needed, and wraps (wrap_count++) when it runs off the last shard, so reading
 * k windows and skipping k windows leave the same cursor. */
#include "data/loader.h"

#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "core/fsutil.h"
#include "core/json.h"
#include "core/log.h"
#include "data/mixture.h"
#include "data/npy.h"

#define CURSOR_VERSION 1

typedef struct Cursor {
  int64_t file_idx, pos, wrap;
} Cursor;

typedef struct Source {
  char *id;
  char *dir;           /* where its shards were found */
  int n_files;
  TokenShard *shards;  /* (n_files,) sorted by path */
  int64_t tokens;      /* sum of shard lengths */
  Cursor cur;
  int64_t emitted;     /* sequences taken in the current stage (all ranks) */
  int64_t quota;       /* sequences allowed in the stage; -1 = unlimited (direct) */
  int64_t pending;     /* windows to skip before the next read */
} Source;

typedef struct Stage {
  const char *id;
  int n;
  Source *src;     /* (n,) */
  int64_t *weight; /* (n,) SWRR weights */
} Stage;

struct Loader {
  bool flow;
  MixturePlan plan;  /* flow mode only */
  char *data_path;   /* direct mode only */
  int n_stages;
  Stage *stages;     /* (n_stages,) */
  int stage;         /* current stage index */
  int64_t *acc;      /* (max sources,) SWRR accumulators of the current stage */
  bool *active;      /* (max sources,) scratch: quota left */
  int64_t gseq;      /* global sequence index (sequences taken by all ranks) */
  int64_t seq_len, batch, local, rank, vocab;
  uint32_t *window;  /* (seq_len+1,) */
};

/* ------------------------------------------------------------ shard files */

typedef struct PathList {
  char **p;
  int n, cap;
} PathList;

static int cmp_path(const void *a, const void *b) {
  return strcmp(*(char *const *)a, *(char *const *)b);
}

static char *path_join(const char *a, const char *b) {
  size_t la = strlen(a), lb = strlen(b);
  char *s = xmalloc(la + lb + 2);
  memcpy(s, a, la);
  size_t o = la;
  if (la && a[la - 1] != '/') s[o++] = '/';
  memcpy(s + o, b, lb + 1);
  return s;
}

/* Appends every *.npy under dir (recursively, following links, skipping
 * hidden names as glob's ** does). depth bounds link cycles. */
static int scan_npy(const char *dir, PathList *out, int depth, char *err, size_t errlen) {
  if (depth > 32) {
    snprintf(err, errlen, "%s: directories nested too deeply (link cycle?)", dir);
    return -1;
  }
  DIR *d = opendir(dir);
  if (!d) {
    snprintf(err, errlen, "%s: cannot open directory: %s", dir, strerror(errno));
    return -1;
  }
  int rc = 0;
  struct dirent *e;
  while (rc == 0 && (e = readdir(d))) {
    if (e->d_name[0] == '.') continue;
    char *p = path_join(dir, e->d_name);
    struct stat st;
    if (stat(p, &st)) {
      snprintf(err, errlen, "%s: cannot stat: %s", p, strerror(errno));
      rc = -1;
    } else if (S_ISDIR(st.st_mode)) {
      rc = scan_npy(p, out, depth + 1, err, errlen);
    } else {
      size_t n = strlen(e->d_name);
      if (n > 4 && !strcmp(e->d_name + n - 4, ".npy")) {
        if (out->n == out->cap) {
          out->cap = out->cap ? 2 * out->cap : 16;
          out->p = xrealloc(out->p, (size_t)out->cap * sizeof *out->p);
        }
        out->p[out->n++] = p;
        p = NULL;
      }
    }
    free(p);
  }
  closedir(d);
  return rc;
}

/* Lists and maps the shards of a source. Missing or empty directories are an
 * error only when `required`. */
static int source_open(Source *s, const char *dir, bool required, char *err, size_t errlen) {
  s->dir = xstrdup(dir);
  if (!fs_is_dir(dir)) {
    if (!required) return 0;
    snprintf(err, errlen, "no .npy shards under %s (directory does not exist)", dir);
    return -1;
  }
  PathList pl = {0};
  int rc = scan_npy(dir, &pl, 0, err, errlen);
  if (rc == 0 && pl.n == 0 && required) {
    snprintf(err, errlen, "no .npy shards under %s", dir);
    rc = -1;
  }
  if (rc == 0 && pl.n) {
    qsort(pl.p, (size_t)pl.n, sizeof *pl.p, cmp_path);
    s->shards = xcalloc((size_t)pl.n, sizeof *s->shards);
    for (int i = 0; i < pl.n && rc == 0; i++) {
      if (shard_map(pl.p[i], &s->shards[i], err, errlen)) {
        rc = -1;
        break;
      }
      s->n_files++;
      s->tokens += s->shards[i].n;
    }
  }
  for (int i = 0; i < pl.n; i++) free(pl.p[i]);
  free(pl.p);
  return rc;
}

static void source_close(Source *s) {
  for (int i = 0; i < s->n_files; i++) shard_unmap(&s->shards[i]);
  free(s->shards);
  free(s->dir);
  free(s->id);
}

/* --------------------------------------------------------------- cursor */

/* Moves the cursor over ntok tokens, copying them to out (checking each
 * against vocab) when out != NULL. Needs s->tokens > 0. */
static int source_walk(Source *s, int64_t ntok, uint32_t *out, int64_t vocab, char *err,
                       size_t errlen) {
  Cursor *c = &s->cur;
  while (ntok > 0) {
    if (c->file_idx >= s->n_files) {
      c->file_idx = 0;
      c->pos = 0;
      c->wrap++;
    }
    const TokenShard *sh = &s->shards[c->file_idx];
    int64_t take = sh->n - c->pos < ntok ? sh->n - c->pos : ntok;
    if (take <= 0) {
      c->file_idx++;
      c->pos = 0;
      continue;
    }
    if (out) {
      const uint32_t *t = sh->tokens + c->pos;
      for (int64_t j = 0; j < take; j++) {
        if ((int64_t)t[j] >= vocab) {
          snprintf(err, errlen, "%s: token %u at index %" PRId64 " is >= vocab_size %" PRId64
                   " (shard made with another tokenizer?)",
                   sh->path, t[j], c->pos + j, vocab);
          return -1;
        }
      }
      memcpy(out, t, (size_t)take * sizeof *out);
      out += take;
    }
    c->pos += take;
    ntok -= take;
  }
  return 0;
}

static void source_flush(Source *s, int64_t window) {
  if (s->pending) source_walk(s, s->pending * window, NULL, 0, NULL, 0);
  s->pending = 0;
}

static void stage_flush(Stage *st, int64_t window) {
  for (int i = 0; i < st->n; i++) source_flush(&st->src[i], window);
}

/* ----------------------------------------------------------------- stream */

/* Source of the next global sequence. Flow mode: SWRR among the sources with
 * quota left; when none has, the next stage starts (fresh accumulators). */
static Source *loader_pick(Loader *L, char *err, size_t errlen) {
  if (!L->flow) return &L->stages[0].src[0];
  for (;;) {
    Stage *st = &L->stages[L->stage];
    for (int i = 0; i < st->n; i++) L->active[i] = st->src[i].emitted < st->src[i].quota;
    int k = mixture_swrr_pick(st->n, st->weight, L->acc, L->active);
    if (k >= 0) return &st->src[k];
    if (L->stage + 1 == L->n_stages) {
      snprintf(err, errlen,
               "flow '%s' is exhausted: all %" PRId64 " planned sequences were emitted (steps x "
               "batch_size exceeds the plan; set steps=0 to derive steps from the flow)",
               L->plan.flow, mixture_plan_sequences(&L->plan));
      return NULL;
    }
    stage_flush(st, L->seq_len + 1);
    L->stage++;
    memset(L->acc, 0, (size_t)L->stages[L->stage].n * sizeof *L->acc);
  }
}

int loader_next(Loader *L, int32_t *inputs, int32_t *targets, char *err, size_t errlen) {
  int64_t T = L->seq_len, lo = L->rank * L->local, hi = lo + L->local;
  for (int64_t i = 0; i < L->batch; i++) {
    Source *s = loader_pick(L, err, errlen);
    if (!s) return -1;
    s->emitted++;
    L->gseq++;
    if (i < lo || i >= hi) { /* another rank's sequence */
      s->pending++;
      continue;
    }
    source_flush(s, T + 1);
    if (source_walk(s, T + 1, L->window, L->vocab, err, errlen)) return -1;
    int32_t *in = inputs + (i - lo) * T, *tg = targets + (i - lo) * T;
    for (int64_t j = 0; j < T; j++) {
      in[j] = (int32_t)L->window[j];
      tg[j] = (int32_t)L->window[j + 1];
    }
  }
  stage_flush(&L->stages[L->stage], T + 1);
  return 0;
}

/* ------------------------------------------------------------------- open */

static bool str_set(const char *s) { return s && s[0]; }

static Loader *loader_alloc(const Config *cfg, int rank, int world, int n_stages) {
  Loader *L = xcalloc(1, sizeof *L);
  L->seq_len = cfg->seq_len;
  L->batch = cfg->batch_size;
  L->local = cfg->batch_size / world;
  L->rank = rank;
  L->vocab = cfg->vocab_size > 0 ? cfg->vocab_size : INT64_MAX;
  L->window = xmalloc((size_t)(cfg->seq_len + 1) * sizeof *L->window);
  L->n_stages = n_stages;
  L->stages = xcalloc((size_t)n_stages, sizeof *L->stages);
  return L;
}

static void stage_alloc(Stage *st, const char *id, int n) {
  st->id = id;
  st->n = n;
  st->src = xcalloc((size_t)n, sizeof *st->src);
  st->weight = xcalloc((size_t)n, sizeof *st->weight);
}

static int open_direct(Loader *L, const Config *cfg, const char *dir, bool training, char *err,
                       size_t errlen) {
  L->data_path = xstrdup(dir);
  Stage *st = &L->stages[0];
  stage_alloc(st, "pretrain", 1);
  Source *s = &st->src[0];
  s->id = xstrdup("data_path");
  s->quota = -1;
  st->weight[0] = 1;
  if (source_open(s, dir, true, err, errlen)) return -1;
  if (s->tokens == 0) {
    snprintf(err, errlen, "the %d .npy shards under %s hold no tokens", s->n_files, dir);
    return -1;
  }
  int64_t need = cfg->steps * cfg->batch_size * cfg->seq_len;
  if (training && L->rank == 0 && s->tokens < need)
    log_warn("%s holds %" PRId64 " tokens but steps x batch_size x seq_len = %" PRId64
             ": the data will repeat",
             dir, s->tokens, need);
  return 0;
}

static int open_flow(Loader *L, const Config *cfg, char *err, size_t errlen) {
  L->flow = true;
  MixturePlan *p = &L->plan;
  for (int s = 0; s < p->n_stages; s++) {
    const PlanStage *ps = &p->stages[s];
    Stage *st = &L->stages[s];
    stage_alloc(st, ps->id, ps->n_sources);
    for (int i = 0; i < ps->n_sources; i++) {
      Source *src = &st->src[i];
      src->id = xstrdup(ps->sources[i].id);
      src->quota = ps->sources[i].quota_sequences;
      st->weight[i] = ps->sources[i].weight_fp;
      char *dir = xmalloc(strlen(cfg->data_root) + strlen(p->flow) + strlen(ps->id) +
                          strlen(src->id) + 32);
      sprintf(dir, "%s/flows/%s/%s/%s/train", cfg->data_root, p->flow, ps->id, src->id);
      int rc = source_open(src, dir, false, err, errlen);
      free(dir);
      if (rc) return -1;
      /* Preflight. A window reads seq_len+1 tokens, so a source prepared to
       * exactly quota x seq_len tokens repeats its first `quota` tokens. */
      int64_t need = src->quota * cfg->seq_len;
      if (src->tokens < need) {
        snprintf(err, errlen,
                 "source %s in stage %s needs %" PRId64 " tokens, has %" PRId64
                 " (%d .npy shards under %s; prepare more data or shrink the flow)",
                 src->id, ps->id, need, src->tokens, src->n_files, src->dir);
        return -1;
      }
    }
  }
  int64_t planned = mixture_plan_sequences(p);
  if (cfg->steps > 0 && cfg->steps * cfg->batch_size > planned) {
    snprintf(err, errlen,
             "flow '%s' plans %" PRId64 " sequences but steps=%" PRId64 " x batch_size=%" PRId64
             " needs %" PRId64 "; lower steps or set steps=0 to derive them from the flow",
             p->flow, planned, cfg->steps, cfg->batch_size, cfg->steps * cfg->batch_size);
    return -1;
  }
  return 0;
}

Loader *loader_open(const Config *cfg, const char *path_override, int rank, int world, char *err,
                    size_t errlen) {
  if (world < 1 || rank < 0 || rank >= world || cfg->batch_size <= 0 ||
      cfg->batch_size % world) {
    snprintf(err, errlen, "batch_size %" PRId64 " must be a positive multiple of the world size %d",
             cfg->batch_size, world);
    return NULL;
  }
  if (cfg->seq_len <= 0) {
    snprintf(err, errlen, "seq_len must be > 0 (got %" PRId64 ")", cfg->seq_len);
    return NULL;
  }
  const char *dir = path_override ? path_override
                    : str_set(cfg->flow_mode) ? NULL
                                              : cfg->data_path;
  Loader *L = NULL;
  int rc;
  if (dir) {
    if (!str_set(dir)) {
      snprintf(err, errlen,
               "no training data: set data_path (a directory of .npy shards) or flow_mode with "
               "mixture_toml and flow_profiles_toml");
      return NULL;
    }
    L = loader_alloc(cfg, rank, world, 1);
    rc = open_direct(L, cfg, dir, path_override == NULL, err, errlen);
  } else {
    if (!str_set(cfg->mixture_toml) || !str_set(cfg->flow_profiles_toml)) {
      snprintf(err, errlen, "flow_mode '%s' needs mixture_toml and flow_profiles_toml",
               cfg->flow_mode);
      return NULL;
    }
    MixturePlan plan;
    if (mixture_resolve(cfg->mixture_toml, cfg->flow_profiles_toml, cfg->flow_mode, cfg->seq_len,
                        cfg->active_params_b, &plan, err, errlen))
      return NULL;
    if (rank == 0 && str_set(cfg->data_path))
      log_warn("data_path %s is ignored: flow_mode '%s' reads %s/flows/%s", cfg->data_path,
               cfg->flow_mode, cfg->data_root, cfg->flow_mode);
    L = loader_alloc(cfg, rank, world, plan.n_stages);
    L->plan = plan;
    rc = open_flow(L, cfg, err, errlen);
  }
  int max_n = 1;
  for (int s = 0; s < L->n_stages; s++)
    if (L->stages[s].n > max_n) max_n = L->stages[s].n;
  L->acc = xcalloc((size_t)max_n, sizeof *L->acc);
  L->active = xcalloc((size_t)max_n, sizeof *L->active);
  if (rc) {
    loader_close(L);
    return NULL;
  }
  return L;
}

void loader_close(Loader *L) {
  if (!L) return;
  for (int s = 0; s < L->n_stages; s++) {
    for (int i = 0; i < L->stages[s].n; i++) source_close(&L->stages[s].src[i]);
    free(L->stages[s].src);
    free(L->stages[s].weight);
  }
  free(L->stages);
  if (L->flow) mixture_plan_free(&L->plan);
  free(L->data_path);
  free(L->acc);
  free(L->active);
  free(L->window);
  free(L);
}

/* ------------------------------------------------------------ accessors */

const char *loader_plan_hash(const Loader *L) { return L->flow ? L->plan.hash : "0"; }

const char *loader_stage_name(const Loader *L) { return L->stages[L->stage].id; }

int64_t loader_total_tokens(const Loader *L) {
  return L->flow ? mixture_plan_sequences(&L->plan) * L->seq_len : L->stages[0].src[0].tokens;
}

char *loader_plan_json(const Loader *L) {
  if (L->flow) return mixture_plan_json(&L->plan);
  const Source *s = &L->stages[0].src[0];
  JsonW w;
  jw_init(&w, 0);
  jw_obj(&w, NULL);
  jw_str(&w, "data_path", L->data_path);
  jw_str(&w, "mode", "direct");
  jw_int(&w, "num_files", s->n_files);
  jw_int(&w, "total_tokens", s->tokens);
  jw_obj_end(&w);
  return jw_finish(&w);
}

/* ------------------------------------------------------------ cursor JSON */

char *loader_state_json(const Loader *L) {
  const Stage *st = &L->stages[L->stage];
  JsonW w;
  jw_init(&w, 0);
  jw_obj(&w, NULL);
  jw_int(&w, "version", CURSOR_VERSION);
  jw_str(&w, "mode", L->flow ? "flow" : "direct");
  jw_str(&w, "plan_hash", loader_plan_hash(L));
  jw_str(&w, "current_stage", st->id);
  jw_int(&w, "stage_index", L->stage);
  jw_int(&w, "global_sequence_index", L->gseq);
  jw_arr(&w, "accumulators");
  for (int i = 0; i < st->n; i++) jw_int(&w, NULL, L->acc[i]);
  jw_arr_end(&w);
  jw_obj(&w, "emitted_sequences");
  for (int i = 0; i < st->n; i++) jw_int(&w, st->src[i].id, st->src[i].emitted);
  jw_obj_end(&w);
  jw_obj(&w, "cursors");
  for (int i = 0; i < st->n; i++) {
    const Source *s = &st->src[i];
    jw_obj(&w, s->id);
    jw_int(&w, "file_idx", s->cur.file_idx);
    jw_int(&w, "pos_in_file", s->cur.pos);
    jw_int(&w, "wrap_count", s->cur.wrap);
    jw_int(&w, "num_files", s->n_files);
    jw_obj_end(&w);
  }
  jw_obj_end(&w);
  jw_obj_end(&w);
  return jw_finish(&w);
}

/* Integer member `key` of obj, >= 0. 0, or -1 with err. */
static int json_count(const Json *obj, const char *key, const char *where, int64_t *out,
                      char *err, size_t errlen) {
  const Json *v = json_get(obj, key);
  if (!v || v->type != JSON_NUM || !v->is_int || v->i < 0) {
    snprintf(err, errlen, "loader cursor: %s%s%s must be an integer >= 0", where,
             where[0] ? "." : "", key);
    return -1;
  }
  *out = v->i;
  return 0;
}

/* Validates j against L; on success fills stage index, global index,
 * accumulators (acc), emitted counts and cursors (cur) of that stage. */
static int cursor_check(const Loader *L, const Json *j, int64_t *stage, int64_t *gseq,
                        int64_t *acc, int64_t *emitted, Cursor *cur, char *err, size_t errlen) {
  int64_t version;
  if (json_count(j, "version", "", &version, err, errlen)) return -1;
  if (version != CURSOR_VERSION) {
    snprintf(err, errlen, "loader cursor version %" PRId64 " is not supported (expected %d)",
             version, CURSOR_VERSION);
    return -1;
  }
  const char *mode = json_get_str(j, "mode", "");
  const char *want_mode = L->flow ? "flow" : "direct";
  if (strcmp(mode, want_mode)) {
    snprintf(err, errlen, "loader cursor was saved by a %s-mode loader, this run is %s mode",
             mode[0] ? mode : "(unknown)", want_mode);
    return -1;
  }
  const char *hash = json_get_str(j, "plan_hash", "");
  if (strcmp(hash, loader_plan_hash(L))) {
    snprintf(err, errlen,
             "loader cursor plan hash %.16s does not match this run's plan %.16s (the flow, "
             "mixture or seq_len changed since the checkpoint)",
             hash[0] ? hash : "(none)", loader_plan_hash(L));
    return -1;
  }
  if (json_count(j, "stage_index", "", stage, err, errlen) ||
      json_count(j, "global_sequence_index", "", gseq, err, errlen))
    return -1;
  if (*stage >= L->n_stages) {
    snprintf(err, errlen, "loader cursor stage_index %" PRId64 " is past the plan's %d stages",
             *stage, L->n_stages);
    return -1;
  }
  const Stage *st = &L->stages[*stage];
  const char *sname = json_get_str(j, "current_stage", "");
  if (strcmp(sname, st->id)) {
    snprintf(err, errlen, "loader cursor stage '%s' does not match stage %" PRId64 " '%s' of this run",
             sname, *stage, st->id);
    return -1;
  }
  const Json *a = json_get(j, "accumulators");
  if (!a || a->type != JSON_ARR || a->n != st->n) {
    snprintf(err, errlen, "loader cursor: accumulators must be an array of %d integers", st->n);
    return -1;
  }
  for (int i = 0; i < st->n; i++) {
    if (a->items[i]->type != JSON_NUM || !a->items[i]->is_int) {
      snprintf(err, errlen, "loader cursor: accumulators must be an array of %d integers", st->n);
      return -1;
    }
    acc[i] = a->items[i]->i;
  }
  const Json *em = json_get(j, "emitted_sequences"), *cs = json_get(j, "cursors");
  if (!em || em->type != JSON_OBJ || !cs || cs->type != JSON_OBJ || em->n != st->n ||
      cs->n != st->n) {
    snprintf(err, errlen,
             "loader cursor: emitted_sequences and cursors must each name the %d sources of stage '%s'",
             st->n, st->id);
    return -1;
  }
  for (int i = 0; i < st->n; i++) {
    const Source *s = &st->src[i];
    const Json *c = json_get(cs, s->id);
    if (!json_get(em, s->id) || !c || c->type != JSON_OBJ) {
      snprintf(err, errlen, "loader cursor has no entry for source '%s' of stage '%s'", s->id,
               st->id);
      return -1;
    }
    char where[300];
    snprintf(where, sizeof where, "cursors.%s", s->id);
    int64_t nf;
    Cursor *k = &cur[i];
    if (json_count(em, s->id, "emitted_sequences", &emitted[i], err, errlen) ||
        json_count(c, "file_idx", where, &k->file_idx, err, errlen) ||
        json_count(c, "pos_in_file", where, &k->pos, err, errlen) ||
        json_count(c, "wrap_count", where, &k->wrap, err, errlen) ||
        json_count(c, "num_files", where, &nf, err, errlen))
      return -1;
    if (nf != s->n_files) {
      snprintf(err, errlen,
               "loader cursor: source '%s' had %" PRId64 " shard files, %s now has %d (the data "
               "changed since the checkpoint)",
               s->id, nf, s->dir, s->n_files);
      return -1;
    }
    if (s->quota >= 0 && emitted[i] > s->quota) {
      snprintf(err, errlen, "loader cursor: source '%s' emitted %" PRId64 " sequences, over its quota %" PRId64,
               s->id, emitted[i], s->quota);
      return -1;
    }
    int64_t len = k->file_idx < s->n_files ? s->shards[k->file_idx].n : 0;
    if (k->file_idx > s->n_files || k->pos > len) {
      snprintf(err, errlen,
               "loader cursor: source '%s' position (file %" PRId64 ", token %" PRId64
               ") is outside its %d shards (the data changed since the checkpoint)",
               s->id, k->file_idx, k->pos, s->n_files);
      return -1;
    }
  }
  return 0;
}

int loader_restore_json(Loader *L, const char *json, char *err, size_t errlen) {
  char perr[256];
  Json *j = json_parse(json, strlen(json), perr, sizeof perr);
  if (!j || j->type != JSON_OBJ) {
    snprintf(err, errlen, "loader cursor is not a JSON object%s%s", j ? "" : ": ", j ? "" : perr);
    json_free(j);
    return -1;
  }
  int max_n = 1;
  for (int s = 0; s < L->n_stages; s++)
    if (L->stages[s].n > max_n) max_n = L->stages[s].n;
  int64_t stage, gseq, *acc = xcalloc((size_t)max_n, sizeof *acc),
                       *emitted = xcalloc((size_t)max_n, sizeof *emitted);
  Cursor *cur = xcalloc((size_t)max_n, sizeof *cur);
  int rc = cursor_check(L, j, &stage, &gseq, acc, emitted, cur, err, errlen);
  if (rc == 0) {
    L->stage = (int)stage;
    L->gseq = gseq;
    for (int s = 0; s < L->n_stages; s++) /* later stages start fresh */
      for (int i = 0; i < L->stages[s].n; i++) {
        Source *src = &L->stages[s].src[i];
        src->cur = s == stage ? cur[i] : (Cursor){0, 0, 0};
        src->emitted = s == stage ? emitted[i] : 0;
        src->pending = 0;
      }
    memcpy(L->acc, acc, (size_t)L->stages[stage].n * sizeof *acc);
  }
  free(acc);
  free(emitted);
  free(cur);
  json_free(j);
  return rc;
}

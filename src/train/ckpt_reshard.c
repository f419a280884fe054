/* ckpt_reshard.c: `nmoe ckpt reshard`: rewrites one finalised checkpoint step
 * for another number of ranks (elastic resume).
 *
 * What depends on the world size W (train_state.c, model.c):
 *   - routed experts: rank r holds rows [r E/W, (r+1) E/W) of every expert
 *     tensor and of its optimizer state (optim.exp_avg.<name>, ...);
 *   - the dense optimizer state: per tensor with W == 1, else one flat
 *     <prefix>.dense_shard per rank covering [shard_lo, shard_hi) of the dense
 *     range of the parameter table, whose end is padded to 16 W elements;
 *   - the rank json's rank and world (and the hash of its rank file).
 * Dense weights, router biases, step, tokens and the loader cursor are the
 * same on every rank and for every W, so they are copied unchanged.
 *
 * The parameter tables of both layouts come from the config stored in the
 * rank json (model_table), so a table offset means what the trainer meant.
 * The source is read whole (every rank file in memory, the dense state
 * assembled once); destination ranks are written one at a time, rank 0 last,
 * since its save finalises the step (manifest, then tracker) as ckpt.c does. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/config.h"
#include "core/fsutil.h"
#include "core/json.h"
#include "core/log.h"
#include "model/model.h"
#include "train/ckpt.h"
#include "train/ckpt_dir.h"
#include "train/safetensors.h"

/* Paths are bounded by ckpt_dir_ok; error messages may be cut to errlen. */
#pragma GCC diagnostic ignored "-Wformat-truncation"

/* Optimizer state kinds, as train_state.c names them. */
static const char *const PREFIX[3] = {"optim.exp_avg", "optim.exp_avg_sq", "master"};
enum { NPREFIX = 3 };

typedef struct Reshard {
  int W, N;                /* source and destination worlds */
  int64_t E;               /* routed experts */
  CkptLoaded **src;        /* [W]: rank r's tensors (rank 0 also the dense file) */
  ParamTable ts, td;       /* tables of the source and destination layouts (rank 0) */
  int has[NPREFIX];        /* state kind present in the source */
  char dtype[NPREFIX][8];  /* its dtype and element size */
  size_t esz[NPREFIX];
  char *full[NPREFIX];     /* [td dense end] the whole dense state in the destination layout */
} Reshard;

/* The run's config from the rank json's "config" object (config_to_json). */
static void config_from_json(const Json *j, Config *c) {
  config_defaults(c);
#define GET_INT(n) c->n = json_get_int(j, #n, c->n);
#define GET_FLOAT(n) c->n = json_get_num(j, #n, c->n);
#define GET_BOOL(n) c->n = json_get_bool(j, #n, c->n);
#define GET_STR(n)                          \
  if (json_get_str(j, #n, NULL)) {          \
    free(c->n);                             \
    c->n = xstrdup(json_get_str(j, #n, "")); \
  }
#define X(kind, name, def, flags, doc) GET_##kind(name)
#include "core/config_fields.h"
#undef X
#undef GET_INT
#undef GET_FLOAT
#undef GET_BOOL
#undef GET_STR
}

/* Tensor name of state kind k of parameter name. */
static void state_name(char *out, size_t n, int k, const char *name) {
  snprintf(out, n, "%s.%s", PREFIX[k], name);
}

/* t exists with exactly the shape of p (dim 0 replaced by rows0 when >= 0)
 * and a known dtype, else -1 with err naming source rank r. */
static int check_shape(const CkptTensor *t, const char *name, const ParamInfo *p, int64_t rows0, int r,
                       char *err, size_t errlen) {
  if (!t) {
    snprintf(err, errlen, "source rank %d has no tensor %s (not a checkpoint of its config?)", r, name);
    return -1;
  }
  int same = t->ndim == p->ndim && st_dtype_size(t->dtype);
  for (int d = 0; same && d < p->ndim; d++) same = t->shape[d] == (d == 0 && rows0 >= 0 ? rows0 : p->shape[d]);
  size_t numel = 1;
  for (int d = 0; same && d < t->ndim; d++) numel *= (size_t)t->shape[d];
  if (!same || t->nbytes != numel * st_dtype_size(t->dtype)) {
    snprintf(err, errlen, "source rank %d: tensor %s has another shape or size than its config gives", r, name);
    return -1;
  }
  return 0;
}

/* Every expert tensor (weights and state) of every source rank has the shape
 * [E/W, ...] and one dtype over ranks; the dense weights are in rank 0's
 * dense file. Checked before anything is written. */
static int check_sources(const Reshard *R, char *err, size_t errlen) {
  char name[160];
  for (int i = 0; i < R->ts.n; i++) {
    const ParamInfo *p = &R->ts.p[i];
    if (p->owner == OWN_DENSE) {
      if (check_shape(ckpt_find(R->src[0], p->name), p->name, p, -1, 0, err, errlen)) return -1;
      continue;
    }
    for (int k = -1; k < NPREFIX; k++) {
      if (k >= 0 && !R->has[k]) continue;
      if (k < 0) snprintf(name, sizeof name, "%s", p->name);
      else state_name(name, sizeof name, k, p->name);
      const CkptTensor *t0 = ckpt_find(R->src[0], name);
      for (int r = 0; r < R->W; r++) {
        const CkptTensor *t = ckpt_find(R->src[r], name);
        if (check_shape(t, name, p, -1, r, err, errlen)) return -1;
        if (strcmp(t->dtype, t0->dtype)) {
          snprintf(err, errlen, "tensor %s is %s on source rank 0 but %s on rank %d", name, t0->dtype,
                   t->dtype, r);
          return -1;
        }
      }
    }
  }
  return 0;
}

/* The whole dense state of kind k in the destination layout: the source's
 * flat shards (W > 1) or per-tensor state (W == 1) give each dense row's
 * values at its source offset; they go to its destination offset. Padding
 * stays zero, as it is in training (its gradient is zero). */
static int assemble_dense(Reshard *R, int k, char *err, size_t errlen) {
  const size_t end_s = R->ts.group_off[GROUP_EXPERT], end_d = R->td.group_off[GROUP_EXPERT];
  char name[160];
  char *full_s = NULL;
  if (R->W > 1) {
    for (int r = 0; r < R->W; r++) {
      snprintf(name, sizeof name, "%s.dense_shard", PREFIX[k]);
      const CkptTensor *t = ckpt_find(R->src[r], name);
      size_t lo, hi;
      model_shard_bounds(&R->ts, r, R->W, &lo, &hi);
      if (!t || t->ndim != 1 || (size_t)t->shape[0] != hi - lo || strcmp(t->dtype, R->dtype[k]) ||
          t->nbytes != (hi - lo) * R->esz[k]) {
        snprintf(err, errlen, "source rank %d: %s is missing or not %s [%zu] (not a checkpoint of its config?)",
                 r, name, R->dtype[k], hi - lo);
        free(full_s);
        return -1;
      }
      if (!full_s) full_s = xcalloc(end_s ? end_s : 1, R->esz[k]);
      memcpy(full_s + lo * R->esz[k], t->data, t->nbytes);
    }
  }
  R->full[k] = xcalloc(end_d ? end_d : 1, R->esz[k]);
  for (int i = 0; i < R->ts.n; i++) {
    const ParamInfo *ps = &R->ts.p[i], *pd = &R->td.p[i]; /* same config: same rows */
    if (ps->owner != OWN_DENSE) continue;
    NMOE_ASSERT(!strcmp(ps->name, pd->name) && ps->numel == pd->numel);
    const char *from = full_s ? full_s + ps->offset * R->esz[k] : NULL;
    if (!full_s) { /* W == 1: per tensor */
      state_name(name, sizeof name, k, ps->name);
      const CkptTensor *t = ckpt_find(R->src[0], name);
      if (check_shape(t, name, ps, -1, 0, err, errlen)) return -1;
      if (strcmp(t->dtype, R->dtype[k])) {
        snprintf(err, errlen, "source: tensor %s is %s, other %s tensors are %s", name, t->dtype, PREFIX[k],
                 R->dtype[k]);
        return -1;
      }
      from = t->data;
    }
    memcpy(R->full[k] + pd->offset * R->esz[k], from, ps->numel * R->esz[k]);
  }
  free(full_s);
  return 0;
}

static void add(CkptSnapshot *s, int *cap, const char *name, const char *dtype, int ndim, const int64_t *shape,
                void *data, size_t nbytes) {
  if (s->n_rank == *cap) {
    *cap = *cap ? 2 * *cap : 64;
    s->rank_t = xrealloc(s->rank_t, (size_t)*cap * sizeof *s->rank_t);
  }
  CkptTensor *t = &s->rank_t[s->n_rank++];
  memset(t, 0, sizeof *t);
  snprintf(t->name, sizeof t->name, "%s", name);
  snprintf(t->dtype, sizeof t->dtype, "%s", dtype);
  t->ndim = ndim;
  memcpy(t->shape, shape, (size_t)ndim * sizeof *shape);
  t->data = data;
  t->nbytes = nbytes;
}

/* Destination rank d's rows [d E/N, (d+1) E/N) of expert tensor name: the
 * source shards concatenated along dim 0 (checked by check_sources). */
static void add_expert(CkptSnapshot *s, int *cap, const Reshard *R, const char *name, const ParamInfo *pd, int d) {
  const CkptTensor *t0 = ckpt_find(R->src[0], name);
  const int64_t rs = R->E / R->W, rd = R->E / R->N; /* rows per source / destination rank */
  const size_t row = t0->nbytes / (size_t)rs;
  char *out = xmalloc((size_t)rd * row);
  for (int64_t i = 0; i < rd; i++) {
    const int64_t e = (int64_t)d * rd + i;
    const CkptTensor *t = ckpt_find(R->src[e / rs], name);
    memcpy(out + (size_t)i * row, (const char *)t->data + (size_t)(e % rs) * row, row);
  }
  add(s, cap, name, t0->dtype, pd->ndim, pd->shape, out, (size_t)rd * row);
}

/* Source rank json with rank and world rewritten (the saver adds the new
 * rank file's hash). */
static char *meta_for(const Json *meta, int rank, int world) {
  JsonW w;
  jw_init(&w, 2);
  jw_obj(&w, NULL);
  for (int i = 0; i < meta->n; i++) {
    const char *key = meta->keys[i];
    if (!strcmp(key, "rank_file_sha256")) continue;
    if (!strcmp(key, "rank")) jw_int(&w, key, rank);
    else if (!strcmp(key, "world")) jw_int(&w, key, world);
    else {
      char *v = json_dump(meta->items[i]);
      jw_raw(&w, key, v);
      free(v);
    }
  }
  jw_obj_end(&w);
  return jw_finish(&w);
}

/* Destination rank d's snapshot, in the order train_state_snapshot uses.
 * Rank 0 takes the dense tensors over from source rank 0 (it is built last). */
static CkptSnapshot *build_rank(Reshard *R, int d, int64_t step) {
  CkptSnapshot *s = xcalloc(1, sizeof *s);
  s->step = step;
  int cap = 0;
  char name[160];
  if (d == 0) {
    CkptLoaded *l0 = R->src[0];
    s->n_dense = l0->n_dense;
    s->dense = xcalloc((size_t)l0->n_dense + 1, sizeof *s->dense);
    for (int i = 0; i < l0->n_dense; i++) {
      s->dense[i] = l0->t[i];
      l0->t[i].data = NULL; /* moved */
    }
  }
  size_t lo, hi;
  model_shard_bounds(&R->td, d, R->N, &lo, &hi);
  for (int i = 0; i < R->td.n; i++) {
    const ParamInfo *p = &R->td.p[i];
    if (p->owner == OWN_EXPERT) add_expert(s, &cap, R, p->name, p, d);
    if (p->owner == OWN_DENSE && R->N > 1) continue;
    for (int k = 0; k < NPREFIX; k++) {
      if (!R->has[k]) continue;
      state_name(name, sizeof name, k, p->name);
      if (p->owner == OWN_EXPERT) {
        add_expert(s, &cap, R, name, p, d);
      } else {
        char *v = xmalloc(p->numel * R->esz[k]);
        memcpy(v, R->full[k] + p->offset * R->esz[k], p->numel * R->esz[k]);
        add(s, &cap, name, R->dtype[k], p->ndim, p->shape, v, p->numel * R->esz[k]);
      }
    }
  }
  for (int k = 0; k < NPREFIX && R->N > 1; k++) {
    if (!R->has[k]) continue;
    int64_t shape[1] = {(int64_t)(hi - lo)};
    char *v = xmalloc((hi - lo) * R->esz[k] + 1);
    memcpy(v, R->full[k] + lo * R->esz[k], (hi - lo) * R->esz[k]);
    snprintf(name, sizeof name, "%s.dense_shard", PREFIX[k]);
    add(s, &cap, name, R->dtype[k], 1, shape, v, (hi - lo) * R->esz[k]);
  }
  s->meta_json = meta_for(R->src[0]->meta, d, R->N);
  return s;
}

/* Which state kinds the source holds, with their dtype (from rank 0). */
static int find_kinds(Reshard *R, char *err, size_t errlen) {
  const CkptLoaded *l0 = R->src[0];
  for (int k = 0; k < NPREFIX; k++) {
    const size_t pl = strlen(PREFIX[k]);
    for (int i = l0->n_dense; i < l0->n && !R->has[k]; i++) {
      if (strncmp(l0->t[i].name, PREFIX[k], pl) || l0->t[i].name[pl] != '.') continue;
      R->has[k] = 1;
      snprintf(R->dtype[k], sizeof R->dtype[k], "%s", l0->t[i].dtype);
      R->esz[k] = st_dtype_size(l0->t[i].dtype);
    }
  }
  if (!R->has[0] || !R->has[1] || !R->esz[0] || !R->esz[1] || (R->has[2] && !R->esz[2])) {
    snprintf(err, errlen, "source rank 0 has no readable optimizer state (optim.exp_avg.*, optim.exp_avg_sq.*)");
    return -1;
  }
  return 0;
}

int ckpt_reshard(const char *src, const char *dst, int world, int64_t step, char *err, size_t errlen) {
  char it[CKPT_PATHN], e2[1024];
  if (!ckpt_dir_ok(src, err, errlen) || !ckpt_dir_ok(dst, err, errlen)) return -1;
  if (world < 1) {
    snprintf(err, errlen, "reshard: --world must be at least 1 (got %d)", world);
    return -1;
  }
  ckpt_iter_path(it, dst, step);
  char man[CKPT_PATHN + 16];
  snprintf(man, sizeof man, "%s/manifest.json", it);
  if (fs_exists(man)) {
    snprintf(err, errlen, "%s already exists: reshard writes a new step (remove it or pick another DST)", it);
    return -1;
  }
  /* No manifest: debris of an interrupted reshard (or save), never a valid step. */
  if (fs_exists(it) && fs_remove_tree(it)) {
    snprintf(err, errlen, "cannot remove the unfinished %s: %s", it, strerror(errno));
    return -1;
  }
  if (ckpt_verify_step(src, step, e2, sizeof e2)) {
    snprintf(err, errlen, "the source step %lld does not verify: %s", (long long)step, e2);
    return -1;
  }
  ckpt_iter_path(it, src, step);
  Json *m = ckpt_manifest_read(it, step, 1, err, errlen);
  if (!m) return -1;
  Reshard R;
  memset(&R, 0, sizeof R);
  R.W = (int)json_get_int(m, "world", 0);
  R.N = world;
  json_free(m);
  R.src = xcalloc((size_t)R.W, sizeof *R.src);
  Config cfg;
  config_defaults(&cfg);
  int rc = -1;
  for (int r = 0; r < R.W; r++) {
    if (!(R.src[r] = ckpt_load(src, step, r, R.W, err, errlen))) goto done;
    /* only rank 0's copy of the dense file is kept */
    for (int i = 0; r > 0 && i < R.src[r]->n_dense; i++) {
      free(R.src[r]->t[i].data);
      R.src[r]->t[i].data = NULL;
    }
    if (r > 0) continue;
    const Json *cj = json_get(R.src[0]->meta, "config");
    if (!cj || cj->type != JSON_OBJ) {
      snprintf(err, errlen, "%s/rank_000.json has no config object", it);
      goto done;
    }
    config_free(&cfg);
    config_from_json(cj, &cfg);
    ModelDims dm = model_dims(&cfg);
    R.E = dm.L > dm.n_dense && dm.E > 0 ? dm.E : 0;
    if (R.E > 0 && R.E % world) {
      snprintf(err, errlen, "n_routed_experts (%lld) is not divisible by --world %d: each rank owns the same "
               "number of experts", (long long)R.E, world);
      goto done;
    }
    if (cfg.batch_size % world) {
      snprintf(err, errlen, "batch_size (%lld) is not divisible by --world %d: each rank takes the same number "
               "of sequences", (long long)cfg.batch_size, world);
      goto done;
    }
    if (R.E > 0 && R.E % R.W) {
      snprintf(err, errlen, "%s: n_routed_experts (%lld) is not divisible by its world (%d)", it,
               (long long)R.E, R.W);
      goto done;
    }
  }
  model_table(&cfg, 0, R.W, &R.ts);
  model_table(&cfg, 0, R.N, &R.td);
  if (find_kinds(&R, err, errlen) || check_sources(&R, err, errlen)) goto done;
  for (int k = 0; k < NPREFIX; k++)
    if (R.has[k] && assemble_dense(&R, k, err, errlen)) goto done;
  /* rank 0 last: its save finds every other file and finalises the step */
  for (int d = R.N - 1; d >= 0; d--) {
    CkptSnapshot *s = build_rank(&R, d, step);
    int src_rc = ckpt_save(dst, d, R.N, s, err, errlen);
    ckpt_snapshot_free(s);
    if (src_rc) goto done;
  }
  rc = 0;
done:
  for (int r = 0; r < R.W; r++) ckpt_loaded_free(R.src[r]);
  free(R.src);
  for (int k = 0; k < NPREFIX; k++) free(R.full[k]);
  params_free(&R.ts);
  params_free(&R.td);
  config_free(&cfg);
  return rc;
}

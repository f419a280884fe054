/* train_state.c: checkpoint snapshot and restore of a training run. */
#include "train/train_state.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/json.h"
#include "core/log.h"

static const char *dtype_of(size_t elem_size) {
  return elem_size == 2 ? "BF16" : elem_size == 4 ? "F32" : "F64";
}

static void add_tensor(CkptTensor **arr, int *n, int *cap, const char *name, const char *dtype,
                       int ndim, const int64_t *shape, void *data, size_t nbytes) {
  if (*n == *cap) {
    *cap = *cap ? *cap * 2 : 64;
    *arr = xrealloc(*arr, (size_t)*cap * sizeof **arr);
  }
  CkptTensor *t = &(*arr)[(*n)++];
  memset(t, 0, sizeof *t);
  snprintf(t->name, sizeof t->name, "%s", name);
  snprintf(t->dtype, sizeof t->dtype, "%s", dtype);
  t->ndim = ndim;
  for (int i = 0; i < ndim; i++) t->shape[i] = shape[i];
  t->data = data;
  t->nbytes = nbytes;
}

static void *download_range(Backend *be, const void *base, size_t off_elems, size_t n, size_t esz) {
  void *host = xmalloc(n * esz);
  be->download(be, host, (const char *)base + off_elems * esz, n * esz);
  return host;
}

/* Optimizer state of parameter row p lives in the per-parameter tensors unless
 * it is dense in a multi-rank run: then it is part of this rank's ZeRO shard,
 * saved whole as "<kind>.dense_shard" (F32 [shard_hi - shard_lo]). */
static int state_per_param(const Model *m, const ParamInfo *p) {
  return m->ep_world == 1 || p->owner != OWN_DENSE;
}

/* The state buffers of a snapshot/restore: name prefix and buffer. */
typedef struct StateBuf { const char *prefix; void *buf; } StateBuf;

static int state_bufs(const Model *m, StateBuf out[3]) {
  int n = 0;
  out[n++] = (StateBuf){"optim.exp_avg", m->adam_m};
  out[n++] = (StateBuf){"optim.exp_avg_sq", m->adam_v};
  if (m->master) out[n++] = (StateBuf){"master", m->master};
  return n;
}

static void router_bias_name(const Model *m, int li, char *out, size_t n) {
  snprintf(out, n, "layers.%d.ffn.router.bias", m->d.n_dense + li);
}

CkptSnapshot *train_state_snapshot(Model *m, const Loader *loader, const Config *cfg,
                                   const DistInfo *di, const TrainProgress *prog,
                                   const char *git_hash) {
  Backend *be = m->be;
  const size_t sa = be->size[BUF_ACT], sf = be->size[BUF_F32];
  CkptSnapshot *s = xcalloc(1, sizeof *s);
  s->step = prog->step;
  int cap_d = 0, cap_r = 0;
  char name[160];
  StateBuf sb[3];
  const int ns = state_bufs(m, sb);
  for (int i = 0; i < m->pt.n; i++) {
    const ParamInfo *p = &m->pt.p[i];
    /* dense weights are the same on every rank: only rank 0 writes them */
    if (p->owner == OWN_DENSE && di->rank == 0)
      add_tensor(&s->dense, &s->n_dense, &cap_d, p->name, dtype_of(sa), p->ndim, p->shape,
                 download_range(be, m->params, p->offset, p->numel, sa), p->numel * sa);
    else if (p->owner != OWN_DENSE)
      add_tensor(&s->rank_t, &s->n_rank, &cap_r, p->name, dtype_of(sa), p->ndim, p->shape,
                 download_range(be, m->params, p->offset, p->numel, sa), p->numel * sa);
    if (!state_per_param(m, p)) continue;
    for (int k = 0; k < ns; k++) {
      snprintf(name, sizeof name, "%s.%s", sb[k].prefix, p->name);
      add_tensor(&s->rank_t, &s->n_rank, &cap_r, name, dtype_of(sf), p->ndim, p->shape,
                 download_range(be, sb[k].buf, model_state_offset(m, p->offset), p->numel, sf),
                 p->numel * sf);
    }
  }
  if (m->ep_world > 1) {
    const size_t len = m->shard_hi - m->shard_lo;
    int64_t shape[1] = {(int64_t)len};
    for (int k = 0; k < ns; k++) {
      snprintf(name, sizeof name, "%s.dense_shard", sb[k].prefix);
      add_tensor(&s->rank_t, &s->n_rank, &cap_r, name, dtype_of(sf), 1, shape,
                 download_range(be, sb[k].buf, 0, len, sf), len * sf);
    }
  }
  for (int li = 0; di->rank == 0 && li < m->n_moe; li++) {
    int64_t shape[1] = {m->d.E};
    float *b = xmalloc((size_t)m->d.E * sizeof(float));
    memcpy(b, m->router_bias_host + (size_t)li * m->d.E, (size_t)m->d.E * sizeof(float));
    router_bias_name(m, li, name, sizeof name);
    add_tensor(&s->dense, &s->n_dense, &cap_d, name, "F32", 1, shape, b, (size_t)m->d.E * sizeof(float));
  }
  char fp[65];
  config_fingerprint(cfg, fp);
  JsonW w;
  jw_init(&w, 2);
  jw_obj(&w, NULL);
  jw_int(&w, "step", prog->step);
  jw_num(&w, "tokens_seen", prog->tokens_seen);
  jw_int(&w, "rank", di->rank);
  jw_int(&w, "world", di->world);
  jw_int(&w, "seed", cfg->seed);
  jw_str(&w, "backend", be->name);
  jw_str(&w, "fingerprint", fp);
  jw_str(&w, "plan_hash", loader_plan_hash(loader));
  jw_str(&w, "git_commit", git_hash);
  char *cursor = loader_state_json(loader);
  jw_raw(&w, "loader", cursor);
  free(cursor);
  char *cj = config_to_json(cfg);
  jw_raw(&w, "config", cj);
  free(cj);
  jw_obj_end(&w);
  s->meta_json = jw_finish(&w);
  return s;
}

/* ---------------------------------------------------------------- restore */

static float bf16_to_f32(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

/* Puts tensor t into buffer dst of kind k (n elements), converting dtypes
 * when the checkpoint came from another backend. */
static void put_tensor(Backend *be, void *dst, BufKind k, const CkptTensor *t, size_t n,
                       const char *what) {
  const size_t esz = be->size[k];
  const char *want = dtype_of(esz);
  if (!strcmp(t->dtype, want)) {
    if (t->nbytes != n * esz) nmoe_fatal("checkpoint tensor %s has %zu bytes, expected %zu", what, t->nbytes, n * esz);
    be->upload(be, dst, t->data, t->nbytes);
    return;
  }
  size_t src_esz = !strcmp(t->dtype, "BF16") ? 2 : !strcmp(t->dtype, "F32") ? 4 : !strcmp(t->dtype, "F64") ? 8 : 0;
  if (!src_esz || t->nbytes != n * src_esz)
    nmoe_fatal("checkpoint tensor %s: dtype %s / %zu bytes does not match %zu elements", what,
               t->dtype, t->nbytes, n);
  float *tmp = xmalloc(n * sizeof(float));
  for (size_t i = 0; i < n; i++) {
    const char *p = (const char *)t->data + i * src_esz;
    if (src_esz == 2) { uint16_t h; memcpy(&h, p, 2); tmp[i] = bf16_to_f32(h); }
    else if (src_esz == 4) memcpy(&tmp[i], p, 4);
    else { double v; memcpy(&v, p, 8); tmp[i] = (float)v; }
  }
  be->put(be, dst, k, tmp, n);
  free(tmp);
}

static const CkptTensor *need(const CkptLoaded *l, const char *name, const ParamInfo *p,
                              const char *dir, int64_t step) {
  const CkptTensor *t = ckpt_find(l, name);
  if (!t) nmoe_fatal("checkpoint %s/iter_%07lld has no tensor %s", dir, (long long)step, name);
  if (p) {
    int same = t->ndim == p->ndim;
    for (int i = 0; same && i < p->ndim; i++) same = t->shape[i] == p->shape[i];
    if (!same) nmoe_fatal("checkpoint tensor %s has another shape than the model's", name);
  }
  return t;
}

/* One clear line naming every fingerprint field that differs. */
static void check_fingerprint(const Json *meta, const Config *cfg, const char *where) {
  char fp[65];
  config_fingerprint(cfg, fp);
  const char *saved = json_get_str(meta, "fingerprint", "");
  if (!strcmp(saved, fp)) return;
  char diffs[1024] = "";
  const Json *old_cfg = json_get(meta, "config");
  char *cur_text = config_to_json(cfg);
  char perr[128];
  Json *cur = json_parse(cur_text, strlen(cur_text), perr, sizeof perr);
  free(cur_text);
  static const struct { const char *name; int flags; } fields[] = {
#define X(kind, name, def, flags, doc) {#name, flags},
#include "core/config_fields.h"
#undef X
  };
  for (size_t i = 0; i < sizeof fields / sizeof fields[0]; i++) {
    if (!(fields[i].flags & CF_FP)) continue;
    const Json *a = json_get(old_cfg, fields[i].name), *b = json_get(cur, fields[i].name);
    int differ = !a || !b || a->type != b->type ||
                 (a->type == JSON_NUM && a->num != b->num) ||
                 (a->type == JSON_STR && strcmp(a->str, b->str)) ||
                 (a->type == JSON_BOOL && a->b != b->b);
    if (differ && strlen(diffs) + strlen(fields[i].name) + 3 < sizeof diffs) {
      if (diffs[0]) strcat(diffs, ", ");
      strcat(diffs, fields[i].name);
    }
  }
  json_free(cur);
  nmoe_fatal("cannot resume from %s: it was made with a different model/data config (%s "
             "differ); use another checkpoint_dir or --no-resume",
             where, diffs[0] ? diffs : "fingerprint");
}

void train_state_restore(Model *m, Loader *loader, const Config *cfg, const DistInfo *di,
                         int64_t step, TrainProgress *prog) {
  char err[1024], where[1200];
  snprintf(where, sizeof where, "%s/iter_%07lld", cfg->checkpoint_dir, (long long)step);
  CkptLoaded *l = ckpt_load(cfg->checkpoint_dir, step, di->rank, di->world, err, sizeof err);
  if (!l) nmoe_fatal("cannot resume: %s", err);
  check_fingerprint(l->meta, cfg, where);
  const char *plan = json_get_str(l->meta, "plan_hash", "");
  if (loader && strcmp(plan, loader_plan_hash(loader)))
    nmoe_fatal("cannot resume from %s: the data plan changed (plan hash %.12s, now %.12s)", where,
               plan, loader_plan_hash(loader));
  Backend *be = m->be;
  char name[160];
  StateBuf sb[3];
  const int ns = state_bufs(m, sb);
  for (int i = 0; i < m->pt.n; i++) {
    const ParamInfo *p = &m->pt.p[i];
    void *pp = (char *)m->params + p->offset * be->size[BUF_ACT];
    put_tensor(be, pp, BUF_ACT, need(l, p->name, p, cfg->checkpoint_dir, step), p->numel, p->name);
    if (!state_per_param(m, p)) continue;
    for (int k = 0; k < ns; k++) {
      snprintf(name, sizeof name, "%s.%s", sb[k].prefix, p->name);
      const CkptTensor *t = ckpt_find(l, name);
      /* No master in the checkpoint (saved by a backend without one): start
       * the master from the restored weights. */
      if (!t && sb[k].buf == m->master) t = need(l, p->name, p, cfg->checkpoint_dir, step);
      put_tensor(be, (char *)sb[k].buf + model_state_offset(m, p->offset) * be->size[BUF_F32],
                 BUF_F32, t ? t : need(l, name, p, cfg->checkpoint_dir, step), p->numel, name);
    }
  }
  if (m->ep_world > 1) {
    const size_t len = m->shard_hi - m->shard_lo;
    ParamInfo shard = {.ndim = 1, .shape = {(int64_t)len}};
    for (int k = 0; k < ns; k++) {
      snprintf(name, sizeof name, "%s.dense_shard", sb[k].prefix);
      const CkptTensor *t = ckpt_find(l, name);
      if (!t && sb[k].buf == m->master) { /* as above: the master from the weights */
        float *w = xmalloc(len * sizeof(float));
        be->get(be, w, BUF_ACT, (char *)m->params + m->shard_lo * be->size[BUF_ACT], len);
        be->put(be, m->master, BUF_F32, w, len);
        free(w);
        continue;
      }
      put_tensor(be, sb[k].buf, BUF_F32, t ? t : need(l, name, &shard, cfg->checkpoint_dir, step),
                 len, name);
    }
  }
  for (int li = 0; li < m->n_moe; li++) {
    snprintf(name, sizeof name, "layers.%d.ffn.router.bias", m->d.n_dense + li);
    const CkptTensor *t = need(l, name, NULL, cfg->checkpoint_dir, step);
    if (strcmp(t->dtype, "F32") || t->nbytes != (size_t)m->d.E * sizeof(float))
      nmoe_fatal("checkpoint tensor %s: expected F32 [%d]", name, m->d.E);
    memcpy(m->router_bias_host + (size_t)li * m->d.E, t->data, t->nbytes);
  }
  if (m->n_moe)
    be->put(be, m->router_bias, BUF_F32, m->router_bias_host, (size_t)m->n_moe * m->d.E);
  model_quant_refresh(m); /* the fp8/nvfp4 expert cache follows the restored weights */
  const Json *cursor = json_get(l->meta, "loader");
  if (!cursor) nmoe_fatal("checkpoint %s has no loader cursor", where);
  char *cursor_text = json_dump(cursor);
  if (loader && loader_restore_json(loader, cursor_text, err, sizeof err))
    nmoe_fatal("cannot resume from %s: loader cursor: %s", where, err);
  free(cursor_text);
  prog->step = json_get_int(l->meta, "step", -1);
  prog->tokens_seen = json_get_num(l->meta, "tokens_seen", 0);
  if (prog->step != step) nmoe_fatal("checkpoint %s: metadata says step %lld", where, (long long)prog->step);
  ckpt_loaded_free(l);
}

/* mixture.c: resolves flow profiles + mixture TOMLs into a MixturePlan
 * (largest-remainder quotas, fixed-point SWRR weights, plan hash) and runs the
 * SWRR pick. Quotas and weights use exact integer arithmetic on weights in
 * units of 1 token (tokens_b x 1e9), so a plan never depends on float summation
 * order and its hash is stable across machines. */
#include "data/mixture.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/hash.h"
#include "core/json.h"
#include "core/log.h"
#include "core/toml.h"

/* ------------------------------------------------------------ arithmetic */

void mixture_quotas(int64_t total, const int64_t *w, int n, int64_t *out) {
  __int128 W = 0;
  for (int i = 0; i < n; i++) W += w[i];
  __int128 *rem = xcalloc((size_t)(n ? n : 1), sizeof *rem);
  int64_t given = 0;
  for (int i = 0; i < n; i++) {
    __int128 p = (__int128)total * w[i];
    out[i] = (int64_t)(p / W);
    rem[i] = p % W;
    given += out[i];
  }
  /* total - given < n; each round bumps the largest remainder left (ties ->
   * lower index, as a stable descending sort would order them). */
  bool *bumped = xcalloc((size_t)(n ? n : 1), sizeof *bumped);
  for (int64_t k = given; k < total; k++) {
    int best = -1;
    for (int i = 0; i < n; i++)
      if (!bumped[i] && (best < 0 || rem[i] > rem[best])) best = i;
    bumped[best] = true;
    out[best]++;
  }
  free(bumped);
  free(rem);
}

void mixture_weights_fp(const int64_t *w, int n, int64_t *out) {
  __int128 W = 0;
  for (int i = 0; i < n; i++) W += w[i];
  for (int i = 0; i < n; i++) {
    __int128 p = (__int128)w[i] * MIXTURE_FP_SCALE;
    int64_t q = (int64_t)(p / W);
    __int128 r2 = 2 * (p % W);
    if (r2 > W || (r2 == W && (q & 1))) q++; /* round half to even */
    out[i] = q < 1 ? 1 : q;
  }
}

int mixture_swrr_pick(int n, const int64_t *w, int64_t *acc, const bool *active) {
  int best = -1;
  int64_t sum = 0;
  for (int i = 0; i < n; i++) {
    if (!active[i]) continue;
    acc[i] += w[i];
    sum += w[i];
    if (best < 0 || acc[i] > acc[best]) best = i;
  }
  if (best >= 0) acc[best] -= sum;
  return best;
}

/* ------------------------------------------------------------ TOML access */

/* Reads an optional number (integer or float) key of table t. 1 when present,
 * 0 when absent, -1 (with err) when of another type. */
static int toml_number(const TomlValue *t, const char *key, double *out, const char *file,
                       const char *where, char *err, size_t errlen) {
  const TomlValue *v = toml_get(t, key);
  if (!v) return 0;
  if (v->type == TOML_INT) *out = (double)v->u.i;
  else if (v->type == TOML_FLOAT) *out = v->u.f;
  else {
    snprintf(err, errlen, "%s:%d:%d: %s.%s must be a number, found %s", file, v->line, v->col,
             where, key, toml_type_name(v->type));
    return -1;
  }
  if (!isfinite(*out) || *out < 0) {
    snprintf(err, errlen, "%s:%d:%d: %s.%s must be a finite number >= 0", file, v->line, v->col,
             where, key);
    return -1;
  }
  return 1;
}

/* Optional string key; NULL when absent, error when of another type. */
static int toml_string(const TomlValue *t, const char *key, const char **out, const char *file,
                       const char *where, char *err, size_t errlen) {
  const TomlValue *v = toml_get(t, key);
  *out = NULL;
  if (!v) return 0;
  if (v->type != TOML_STRING) {
    snprintf(err, errlen, "%s:%d:%d: %s.%s must be a string, found %s", file, v->line, v->col,
             where, key, toml_type_name(v->type));
    return -1;
  }
  *out = v->u.s;
  return 1;
}

/* "a, b, c" of a table's keys, for "not found" messages. */
static void list_keys(const TomlValue *t, char *out, size_t outlen) {
  size_t len = 0;
  out[0] = '\0';
  for (int i = 0; t && t->type == TOML_TABLE && i < t->n && len + 1 < outlen; i++)
    len += (size_t)snprintf(out + len, outlen - len, "%s%s", i ? ", " : "", t->keys[i]);
  if (!out[0]) snprintf(out, outlen, "none");
}

static int64_t tokens_of_b(double b) { return (int64_t)llround(b * 1e9); }

/* --------------------------------------------------------------- resolve */

/* Fills stage st from mixture table `mt` (id `mix_id`): sources and their
 * nominal weights; *total_b gets the mixture total. */
static int read_mixture(const TomlValue *mt, const char *mix_id, const char *file, PlanStage *st,
                        double *total_b, char *err, size_t errlen) {
  char where[256];
  snprintf(where, sizeof where, "mixtures.%s", mix_id);
  const TomlValue *srcs = toml_get(mt, "sources");
  if (!srcs || srcs->type != TOML_ARRAY || srcs->n == 0) {
    snprintf(err, errlen, "%s:%d:%d: mixture '%s' needs at least one [[%s.sources]] entry", file,
             mt->line, mt->col, mix_id, where);
    return -1;
  }
  st->n_sources = srcs->n;
  st->sources = xcalloc((size_t)srcs->n, sizeof *st->sources);
  double sum_b = 0;
  bool all_tokens_b = true;
  for (int i = 0; i < srcs->n; i++) {
    const TomlValue *s = srcs->items[i];
    PlanSource *ps = &st->sources[i];
    char swhere[300];
    snprintf(swhere, sizeof swhere, "%s.sources[%d]", where, i);
    if (s->type != TOML_TABLE) {
      snprintf(err, errlen, "%s:%d:%d: %s must be a table", file, s->line, s->col, swhere);
      return -1;
    }
    const char *id;
    if (toml_string(s, "id", &id, file, swhere, err, errlen) < 0) return -1;
    if (!id || !id[0] || strchr(id, '/') || !strcmp(id, ".") || !strcmp(id, "..")) {
      snprintf(err, errlen, "%s:%d:%d: %s needs an id that is a plain directory name", file,
               s->line, s->col, swhere);
      return -1;
    }
    for (int j = 0; j < i; j++)
      if (!strcmp(st->sources[j].id, id)) {
        snprintf(err, errlen, "%s:%d:%d: mixture '%s' lists source '%s' twice", file, s->line,
                 s->col, mix_id, id);
        return -1;
      }
    ps->id = xstrdup(id);
    double tb = 0, pct = 0;
    int has_tb = toml_number(s, "tokens_b", &tb, file, swhere, err, errlen);
    int has_pct = toml_number(s, "percent", &pct, file, swhere, err, errlen);
    if (has_tb < 0 || has_pct < 0) return -1;
    if (!has_tb && !has_pct) {
      snprintf(err, errlen, "%s:%d:%d: source '%s' of mixture '%s' needs tokens_b (or percent)",
               file, s->line, s->col, id, mix_id);
      return -1;
    }
    ps->tokens_b = has_tb ? tb : pct;
    all_tokens_b &= has_tb > 0;
    sum_b += tb;
  }
  double total = 0;
  int has_total = toml_number(mt, "total_tokens_b", &total, file, where, err, errlen);
  if (has_total < 0) return -1;
  if (!has_total && !all_tokens_b) {
    snprintf(err, errlen, "%s:%d:%d: mixture '%s' weights sources by percent: set total_tokens_b",
             file, mt->line, mt->col, mix_id);
    return -1;
  }
  *total_b = has_total ? total : sum_b;
  return 0;
}

/* Fills quotas and fixed-point weights of a stage whose target is known. */
static int plan_stage_quotas(PlanStage *st, int64_t seq_len, const char *file, char *err,
                             size_t errlen) {
  int n = st->n_sources;
  int64_t *w = xcalloc((size_t)n, sizeof *w), *q = xcalloc((size_t)n, sizeof *q),
          *fp = xcalloc((size_t)n, sizeof *fp);
  int64_t W = 0;
  for (int i = 0; i < n; i++) W += (w[i] = tokens_of_b(st->sources[i].tokens_b));
  int rc = 0;
  if (W <= 0) {
    snprintf(err, errlen, "%s: mixture '%s' has no weight (every source's tokens_b is 0)", file,
             st->mixture);
    rc = -1;
  } else {
    mixture_quotas(st->target_tokens / seq_len, w, n, q);
    mixture_weights_fp(w, n, fp);
    for (int i = 0; i < n; i++) {
      st->sources[i].quota_sequences = q[i];
      st->sources[i].weight_fp = fp[i];
    }
  }
  free(w);
  free(q);
  free(fp);
  return rc;
}

static const char *base_name(const char *path) {
  const char *s = strrchr(path, '/');
  return s ? s + 1 : path;
}

static int resolve(const TomlValue *mix, const TomlValue *prof, const char *mixture_path,
                   const char *profiles_path, const char *flow, int64_t seq_len,
                   double active_params_b, MixturePlan *p, char *err, size_t errlen) {
  char names[1024], where[256];
  const TomlValue *flows = toml_get(prof, "flow");
  const TomlValue *node = toml_get(flows, flow);
  if (!node || node->type != TOML_TABLE) {
    list_keys(flows, names, sizeof names);
    snprintf(err, errlen, "%s: flow '%s' is not defined (flows: %s)", profiles_path, flow, names);
    return -1;
  }
  snprintf(where, sizeof where, "flow.%s", flow);
  const char *mode;
  if (toml_string(node, "mode", &mode, profiles_path, where, err, errlen) < 0) return -1;
  p->mode = xstrdup(mode ? mode : flow);
  p->sample_temperature = 1.0;
  if (toml_number(node, "sample_temperature", &p->sample_temperature, profiles_path, where, err,
                  errlen) < 0)
    return -1;

  double tokens_b = 0, ratio = 0, scale = 1.0;
  int has_tb = toml_number(node, "tokens_b", &tokens_b, profiles_path, where, err, errlen);
  int has_ratio = toml_number(node, "tokens_b_ratio", &ratio, profiles_path, where, err, errlen);
  int has_scale = toml_number(node, "scale", &scale, profiles_path, where, err, errlen);
  if (has_tb < 0 || has_ratio < 0 || has_scale < 0) return -1;
  if (has_tb + has_ratio + has_scale > 1) {
    snprintf(err, errlen, "%s:%d:%d: flow '%s' sets more than one of tokens_b, tokens_b_ratio, scale",
             profiles_path, node->line, node->col, flow);
    return -1;
  }
  if (has_ratio) {
    if (!(active_params_b > 0)) {
      snprintf(err, errlen,
               "flow '%s' sizes its budget as tokens_b_ratio x active_params_b: set active_params_b "
               "(billions of active parameters) in the config",
               flow);
      return -1;
    }
    tokens_b = ratio * active_params_b;
    has_tb = 1;
  }

  const TomlValue *mixref = toml_get(node, "mixture");
  if (!mixref || mixref->type != TOML_TABLE || mixref->n == 0) {
    snprintf(err, errlen, "%s:%d:%d: flow '%s' needs a [flow.%s.mixture] table (stage = \"mixture id\")",
             profiles_path, node->line, node->col, flow, flow);
    return -1;
  }
  const TomlValue *stages = toml_get(node, "stages");
  if (stages && (stages->type != TOML_ARRAY || stages->n == 0)) {
    snprintf(err, errlen, "%s:%d:%d: flow.%s.stages must be a non-empty array of stage names",
             profiles_path, stages->line, stages->col, flow);
    return -1;
  }
  p->n_stages = stages ? stages->n : mixref->n;
  p->stages = xcalloc((size_t)p->n_stages, sizeof *p->stages);

  const TomlValue *mixtures = toml_get(mix, "mixtures");
  double totals[64];
  if (p->n_stages > 64) {
    snprintf(err, errlen, "%s: flow '%s' has more than 64 stages", profiles_path, flow);
    return -1;
  }
  double sum_totals = 0;
  for (int s = 0; s < p->n_stages; s++) {
    PlanStage *st = &p->stages[s];
    const char *sid;
    if (stages) {
      const TomlValue *v = stages->items[s];
      if (v->type != TOML_STRING) {
        snprintf(err, errlen, "%s:%d:%d: flow.%s.stages must hold strings", profiles_path, v->line,
                 v->col, flow);
        return -1;
      }
      sid = v->u.s;
    } else {
      sid = mixref->keys[s];
    }
    for (int j = 0; j < s; j++)
      if (!strcmp(p->stages[j].id, sid)) {
        snprintf(err, errlen, "%s: flow '%s' lists stage '%s' twice", profiles_path, flow, sid);
        return -1;
      }
    st->id = xstrdup(sid);
    if (!sid[0] || strchr(sid, '/')) {
      snprintf(err, errlen, "%s: flow '%s' stage name '%s' must be a plain directory name",
               profiles_path, flow, sid);
      return -1;
    }
    const TomlValue *m = toml_get(mixref, sid);
    if (!m || m->type != TOML_STRING) {
      snprintf(err, errlen, "%s: flow '%s' stage '%s' has no mixture (set [flow.%s.mixture] %s = \"...\")",
               profiles_path, flow, sid, flow, sid);
      return -1;
    }
    st->mixture = xstrdup(m->u.s);
    const TomlValue *mt = toml_get(mixtures, m->u.s);
    if (!mt || mt->type != TOML_TABLE) {
      list_keys(mixtures, names, sizeof names);
      snprintf(err, errlen, "%s: flow '%s' stage '%s' uses mixture '%s', which %s does not define (mixtures: %s)",
               profiles_path, flow, sid, m->u.s, mixture_path, names);
      return -1;
    }
    if (read_mixture(mt, m->u.s, mixture_path, st, &totals[s], err, errlen)) return -1;
    sum_totals += totals[s];
  }
  if (has_tb) {
    if (!(sum_totals > 0)) {
      snprintf(err, errlen, "%s: flow '%s' sets a token budget but its mixtures total 0 tokens",
               mixture_path, flow);
      return -1;
    }
    scale = tokens_b / sum_totals;
  }

  const TomlValue *ovr = toml_get(node, "tokens_b_override");
  for (int s = 0; s < p->n_stages; s++) {
    PlanStage *st = &p->stages[s];
    double o;
    int has_o = toml_number(ovr, st->id, &o, profiles_path, "tokens_b_override", err, errlen);
    if (has_o < 0) return -1;
    st->tokens_b = has_o ? o : totals[s] * scale;
    st->target_tokens = tokens_of_b(st->tokens_b);
    if (plan_stage_quotas(st, seq_len, mixture_path, err, errlen)) return -1;
  }

  char mixture_id[256];
  snprintf(mixture_id, sizeof mixture_id, "%s", base_name(mixture_path));
  char *dot = strrchr(mixture_id, '.');
  if (dot && !strcmp(dot, ".toml")) *dot = '\0';
  p->mixture_id = xstrdup(mixture_id);
  char *json = mixture_plan_json(p);
  sha256_hex(json, strlen(json), p->hash);
  free(json);
  return 0;
}

int mixture_resolve(const char *mixture_path, const char *profiles_path, const char *flow,
                    int64_t seq_len, double active_params_b, MixturePlan *plan, char *err,
                    size_t errlen) {
  memset(plan, 0, sizeof *plan);
  if (seq_len <= 0) {
    snprintf(err, errlen, "seq_len must be > 0 to resolve flow '%s'", flow);
    return -1;
  }
  TomlValue *prof = toml_parse_file(profiles_path, 1, err, errlen);
  if (!prof) return -1;
  TomlValue *mix = toml_parse_file(mixture_path, 1, err, errlen);
  if (!mix) {
    toml_free(prof);
    return -1;
  }
  plan->flow = xstrdup(flow);
  plan->seq_len = seq_len;
  int rc = resolve(mix, prof, mixture_path, profiles_path, flow, seq_len, active_params_b, plan,
                   err, errlen);
  toml_free(mix);
  toml_free(prof);
  if (rc) mixture_plan_free(plan);
  return rc;
}

char *mixture_plan_json(const MixturePlan *p) {
  JsonW w;
  jw_init(&w, 0);
  jw_obj(&w, NULL); /* keys in sorted order: this text is hashed */
  jw_str(&w, "flow", p->flow);
  jw_str(&w, "mixture_id", p->mixture_id);
  jw_str(&w, "mode", p->mode);
  jw_num(&w, "sample_temperature", p->sample_temperature);
  jw_int(&w, "seq_len", p->seq_len);
  jw_arr(&w, "stages");
  for (int s = 0; s < p->n_stages; s++) {
    const PlanStage *st = &p->stages[s];
    jw_obj(&w, NULL);
    jw_str(&w, "mixture", st->mixture);
    jw_arr(&w, "sources");
    for (int i = 0; i < st->n_sources; i++) {
      const PlanSource *ps = &st->sources[i];
      jw_obj(&w, NULL);
      jw_str(&w, "id", ps->id);
      jw_int(&w, "quota_sequences", ps->quota_sequences);
      jw_num(&w, "tokens_b", ps->tokens_b);
      jw_int(&w, "weight_fp", ps->weight_fp);
      jw_obj_end(&w);
    }
    jw_arr_end(&w);
    jw_str(&w, "stage_id", st->id);
    jw_int(&w, "target_tokens", st->target_tokens);
    jw_num(&w, "tokens_b", st->tokens_b);
    jw_obj_end(&w);
  }
  jw_arr_end(&w);
  jw_int(&w, "version", 1);
  jw_obj_end(&w);
  return jw_finish(&w);
}

int64_t mixture_plan_sequences(const MixturePlan *p) {
  int64_t n = 0;
  for (int s = 0; s < p->n_stages; s++)
    for (int i = 0; i < p->stages[s].n_sources; i++) n += p->stages[s].sources[i].quota_sequences;
  return n;
}

void mixture_plan_free(MixturePlan *p) {
  for (int s = 0; s < p->n_stages; s++) {
    PlanStage *st = &p->stages[s];
    for (int i = 0; i < st->n_sources; i++) free(st->sources[i].id);
    free(st->sources);
    free(st->id);
    free(st->mixture);
  }
  free(p->stages);
  free(p->flow);
  free(p->mode);
  free(p->mixture_id);
  memset(p, 0, sizeof *p);
}

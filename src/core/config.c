/* config.c: load, override, validate and serialise the training config.
 *
 * The schema is the X-macro table in config_fields.h, turned here into one
 * static array (name, kind, flags, doc, offset) that every pass walks: TOML keys,
 * NMOE_<KEY> environment overrides, --key=value arguments, required-field
 * checks, printing, JSON and the fingerprint. Values are converted by the
 * field's declared kind, never guessed from the text. */
#include "core/config.h"

#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "core/hash.h"
#include "core/json.h"
#include "core/log.h"
#include "core/toml.h"

typedef enum { K_INT, K_FLOAT, K_BOOL, K_STR } FieldKind;

typedef struct {
  const char *name;
  FieldKind kind;
  int flags;
  const char *doc;
  size_t off; /* offset in Config */
} Field;

static const Field FIELDS[] = {
#define X(kind, name, def, flags, doc) {#name, K_##kind, flags, doc, offsetof(Config, name)},
#include "core/config_fields.h"
#undef X
};
#define NFIELDS ((int)(sizeof FIELDS / sizeof FIELDS[0]))

#define F_INT(c, f) ((int64_t *)((char *)(c) + (f)->off))
#define F_FLOAT(c, f) ((double *)((char *)(c) + (f)->off))
#define F_BOOL(c, f) ((bool *)((char *)(c) + (f)->off))
#define F_STR(c, f) ((char **)((char *)(c) + (f)->off))

static int fail(char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int fail(char *err, size_t errlen, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(err, errlen, fmt, ap);
  va_end(ap);
  return -1;
}

void config_defaults(Config *c) {
  memset(c, 0, sizeof *c);
#define D_INT(f, d) c->f = (d);
#define D_FLOAT(f, d) c->f = (d);
#define D_BOOL(f, d) c->f = (d);
#define D_STR(f, d) c->f = xstrdup(d);
#define X(kind, name, def, flags, doc) D_##kind(name, def)
#include "core/config_fields.h"
#undef X
#undef D_INT
#undef D_FLOAT
#undef D_BOOL
#undef D_STR
}

void config_free(Config *c) {
  for (int i = 0; i < NFIELDS; i++)
    if (FIELDS[i].kind == K_STR) {
      free(*F_STR(c, &FIELDS[i]));
      *F_STR(c, &FIELDS[i]) = NULL;
    }
}

/* ---- schema lookups ---- */

static const Field *field_find(const char *name) {
  for (int i = 0; i < NFIELDS; i++)
    if (strcmp(FIELDS[i].name, name) == 0) return &FIELDS[i];
  return NULL;
}

static const char *kind_name(FieldKind k) {
  static const char *names[] = {"an integer", "a float", "a boolean (true/false)", "a string"};
  return names[k];
}

static int edit_distance(const char *a, const char *b) {
  enum { MAXL = 128 };
  size_t la = strlen(a), lb = strlen(b);
  if (la >= MAXL || lb >= MAXL) return MAXL;
  int row[MAXL + 1];
  for (size_t j = 0; j <= lb; j++) row[j] = (int)j;
  for (size_t i = 1; i <= la; i++) {
    int diag = row[0];
    row[0] = (int)i;
    for (size_t j = 1; j <= lb; j++) {
      int up = row[j];
      int best = diag + (a[i - 1] != b[j - 1]);
      if (up + 1 < best) best = up + 1;
      if (row[j - 1] + 1 < best) best = row[j - 1] + 1;
      row[j] = best;
      diag = up;
    }
  }
  return row[lb];
}

/* " (did you mean 'X'?)" for the closest field name, or "" when none is close. */
static const char *suggest(const char *name, char *buf, size_t n) {
  int best = 1 << 30;
  const char *pick = NULL;
  for (int i = 0; i < NFIELDS; i++) {
    int d = edit_distance(name, FIELDS[i].name);
    if (d < best) { best = d; pick = FIELDS[i].name; }
  }
  int limit = (int)strlen(name) / 3;
  if (!pick || best > (limit > 2 ? limit : 2)) return "";
  snprintf(buf, n, " (did you mean '%s'?)", pick);
  return buf;
}

static int unsupported(const Field *f, const char *where, char *err, size_t errlen) {
  return fail(err, errlen, "%s: %s is not supported yet (%s)", where, f->name, f->doc);
}

/* ---- setting values ---- */

static void set_str(Config *c, const Field *f, const char *s) {
  free(*F_STR(c, f));
  *F_STR(c, f) = xstrdup(s);
}

static int set_from_toml(Config *c, const Field *f, const TomlValue *v, const char *path, char *err, size_t errlen) {
  TomlType want[] = {TOML_INT, TOML_FLOAT, TOML_BOOL, TOML_STRING};
  if (v->type != want[f->kind] && !(f->kind == K_FLOAT && v->type == TOML_INT))
    return fail(err, errlen, "%s:%d:%d: key '%s' expects %s, found %s %s", path, v->line, v->col, f->name,
                kind_name(f->kind), v->type == TOML_INT || v->type == TOML_ARRAY ? "an" : "a", toml_type_name(v->type));
  switch (f->kind) {
  case K_INT: *F_INT(c, f) = v->u.i; break;
  case K_FLOAT: *F_FLOAT(c, f) = v->type == TOML_INT ? (double)v->u.i : v->u.f; break;
  case K_BOOL: *F_BOOL(c, f) = v->u.b; break;
  case K_STR: set_str(c, f, v->u.s); break;
  }
  return 0;
}

/* Decimal integer with optional sign and '_' between digits (1_000). */
static int text_to_int(const char *s, int64_t *out) {
  char digits[64];
  size_t n = 0;
  const char *p = s;
  if (*p == '+' || *p == '-') digits[n++] = *p++;
  if (!isdigit((unsigned char)*p)) return -1;
  for (; *p; p++) {
    if (*p == '_' && isdigit((unsigned char)p[-1]) && isdigit((unsigned char)p[1])) continue;
    if (!isdigit((unsigned char)*p) || n + 1 >= sizeof digits) return -1;
    digits[n++] = *p;
  }
  digits[n] = 0;
  errno = 0;
  long long v = strtoll(digits, NULL, 10);
  if (errno == ERANGE) return -1;
  *out = v;
  return 0;
}

/* Any C float syntax (strtod), the whole text. */
static int text_to_float(const char *s, double *out) {
  char *end;
  if (!*s || isspace((unsigned char)*s)) return -1;
  errno = 0;
  double v = strtod(s, &end);
  if (*end || (errno == ERANGE && fabs(v) > 1)) return -1;
  *out = v;
  return 0;
}

static int text_to_bool(const char *s, bool *out) {
  if (!strcmp(s, "true") || !strcmp(s, "1")) *out = true;
  else if (!strcmp(s, "false") || !strcmp(s, "0")) *out = false;
  else return -1;
  return 0;
}

/* An override value from the environment or the command line; src names it. */
static int set_from_text(Config *c, const Field *f, const char *text, const char *src, char *err, size_t errlen) {
  int rc = 0;
  switch (f->kind) {
  case K_INT: rc = text_to_int(text, F_INT(c, f)); break;
  case K_FLOAT: rc = text_to_float(text, F_FLOAT(c, f)); break;
  case K_BOOL: rc = text_to_bool(text, F_BOOL(c, f)); break;
  case K_STR: set_str(c, f, text); break;
  }
  if (rc) return fail(err, errlen, "%s: %s expects %s, got '%s'", src, f->name, kind_name(f->kind), text);
  return 0;
}

/* ---- loading ---- */

static int load_toml(Config *c, const char *path, bool *set, char *err, size_t errlen) {
  TomlValue *root = toml_parse_file(path, 0, err, errlen);
  if (!root) return -1;
  int rc = 0;
  char sug[128];
  for (int i = 0; i < root->n && !rc; i++) {
    const char *key = root->keys[i];
    const TomlValue *v = root->items[i];
    const Field *f = field_find(key);
    char where[1100];
    snprintf(where, sizeof where, "%s:%d:%d", path, v->line, v->col);
    if (!f)
      rc = fail(err, errlen, "%s: unknown key '%s'%s%s", where, key, suggest(key, sug, sizeof sug),
                v->type == TOML_TABLE ? " (a training config has top-level keys only, no tables)" : "");
    else if (f->flags & CF_UNSUP)
      rc = unsupported(f, where, err, errlen);
    else if (!(rc = set_from_toml(c, f, v, path, err, errlen)))
      set[f - FIELDS] = true;
  }
  toml_free(root);
  return rc;
}

/* var = NMOE_<FIELD> (upper case) of field f. */
static void env_name(const Field *f, char var[128]) {
  memset(var, 0, 128);
  memcpy(var, "NMOE_", 5);
  for (size_t j = 0; f->name[j] && j + 6 < 128; j++) var[5 + j] = (char)toupper((unsigned char)f->name[j]);
}

int config_env_is_override(const char *entry) {
  char var[128];
  for (int i = 0; i < NFIELDS; i++) {
    env_name(&FIELDS[i], var);
    size_t n = strlen(var);
    if (!strncmp(entry, var, n) && entry[n] == '=') return 1;
  }
  return 0;
}

/* NMOE_<FIELD> for every known field; other NMOE_* variables are not config. */
static int load_env(Config *c, bool *set, char *err, size_t errlen) {
  for (int i = 0; i < NFIELDS; i++) {
    const Field *f = &FIELDS[i];
    char var[128];
    env_name(f, var);
    const char *val = getenv(var);
    if (!val) continue;
    char src[160];
    snprintf(src, sizeof src, "environment %s", var);
    if (f->flags & CF_UNSUP) return unsupported(f, src, err, errlen);
    if (set_from_text(c, f, val, src, err, errlen)) return -1;
    set[i] = true;
  }
  return 0;
}

static int load_args(Config *c, int argc, char **argv, bool *set, char *err, size_t errlen) {
  char sug[128];
  for (int i = 0; i < argc; i++) {
    const char *a = argv[i];
    if (!strcmp(a, "--resume") || !strcmp(a, "--no-resume")) {
      c->resume = a[2] == 'r';
      set[field_find("resume") - FIELDS] = true;
      continue;
    }
    const char *eq = strchr(a, '=');
    if (strncmp(a, "--", 2) != 0 || !eq)
      return fail(err, errlen, "argument '%s': expected --key=value, --resume or --no-resume", a);
    char key[128];
    size_t klen = (size_t)(eq - a - 2);
    if (klen == 0 || klen >= sizeof key) return fail(err, errlen, "argument '%s': bad key", a);
    memcpy(key, a + 2, klen);
    key[klen] = 0;
    const Field *f = field_find(key);
    char src[160];
    snprintf(src, sizeof src, "argument --%s", key);
    if (!f) return fail(err, errlen, "%s: unknown key '%s'%s", src, key, suggest(key, sug, sizeof sug));
    if (f->flags & CF_UNSUP) return unsupported(f, src, err, errlen);
    if (set_from_text(c, f, eq + 1, src, err, errlen)) return -1;
    set[f - FIELDS] = true;
  }
  return 0;
}

int config_load(Config *c, const char *path, int argc, char **argv, char *err, size_t errlen) {
  bool set[NFIELDS];
  memset(set, 0, sizeof set);
  config_defaults(c);
  snprintf(c->source_path, sizeof c->source_path, "%s", path);
  if (load_toml(c, path, set, err, errlen) || load_env(c, set, err, errlen) ||
      load_args(c, argc, argv, set, err, errlen))
    return -1;
  for (int i = 0; i < NFIELDS; i++)
    if ((FIELDS[i].flags & CF_REQ) && !set[i])
      return fail(err, errlen, "%s: missing required key '%s' (%s)", path, FIELDS[i].name, FIELDS[i].doc);
  return config_validate(c, err, errlen);
}

/* ---- validation ---- */

static bool is_one_of(const char *s, const char *const *list) {
  for (; *list; list++)
    if (!strcmp(s, *list)) return true;
  return false;
}

#define BAD(...) return fail(err, errlen, "config: " __VA_ARGS__)
#define NEED_INT(f, cond, what) \
  if (!(c->f cond)) BAD("%s must be %s (got %lld)", #f, what, (long long)c->f)
#define NEED_FLOAT(f, cond, what) \
  if (!(c->f cond)) BAD("%s must be %s (got %g)", #f, what, c->f)

int config_validate(const Config *c, char *err, size_t errlen) {
  for (int i = 0; i < NFIELDS; i++) {
    const Field *f = &FIELDS[i];
    if (f->kind == K_FLOAT && !isfinite(*F_FLOAT(c, f))) BAD("%s must be a finite number", f->name);
    if (f->kind == K_STR && !*F_STR(c, f)) BAD("%s is not set", f->name);
  }
  /* Model shapes and the per-step batch are int downstream (model.c, train.c):
   * a larger value would wrap silently (dim = 2^32 + 32 trains a dim-32 model). */
  static const char *const narrow[] = {
      "vocab_size", "eos_token_id", "dim", "n_layers", "n_heads", "inter_dim", "moe_inter_dim",
      "n_routed_experts", "n_activated_experts", "n_shared_experts", "n_dense_layers", "attn_global_every",
      "attn_local_window", "swa_kv_heads", "n_kv_heads", "head_dim", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
      "qk_rope_head_dim", "v_head_dim", "dsa_idx_heads", "dsa_idx_dim", "dsa_top_k",
      "max_position_embeddings", "batch_size", "seq_len",
      "checkpoint_keep_last_n", NULL};
  for (int i = 0; i < NFIELDS; i++)
    if (FIELDS[i].kind == K_INT && is_one_of(FIELDS[i].name, narrow) && *F_INT(c, &FIELDS[i]) > INT_MAX)
      BAD("%s must be <= %d (got %lld)", FIELDS[i].name, INT_MAX, (long long)*F_INT(c, &FIELDS[i]));

  /* model shape */
  NEED_INT(dim, > 0, "> 0");
  NEED_INT(n_layers, > 0, "> 0");
  NEED_INT(n_heads, > 0, "> 0");
  NEED_INT(inter_dim, > 0, "> 0");
  NEED_INT(moe_inter_dim, > 0, "> 0");
  NEED_INT(n_routed_experts, > 0, "> 0");
  NEED_INT(n_activated_experts, > 0, "> 0");
  NEED_INT(n_shared_experts, >= 0, ">= 0");
  NEED_INT(vocab_size, > 0, "> 0");
  NEED_INT(max_position_embeddings, > 0, "> 0");
  if (c->n_activated_experts > c->n_routed_experts)
    BAD("n_activated_experts (%lld) must be <= n_routed_experts (%lld)", (long long)c->n_activated_experts,
        (long long)c->n_routed_experts);
  if (c->n_dense_layers < 0 || c->n_dense_layers > c->n_layers)
    BAD("n_dense_layers must be in [0, n_layers=%lld] (got %lld)", (long long)c->n_layers, (long long)c->n_dense_layers);

  /* tokenizer */
  static const char *const toks[] = {"gpt2", "cl100k_base", "o200k_base", "o200k_harmony", NULL};
  static const int64_t tok_vocab[] = {50257, 100277, 200019, 201088};
  int t = 0;
  while (toks[t] && strcmp(toks[t], c->tokenizer)) t++;
  if (!toks[t]) BAD("tokenizer must be gpt2, cl100k_base, o200k_base or o200k_harmony (got '%s')", c->tokenizer);
  if (c->vocab_size < tok_vocab[t])
    BAD("vocab_size (%lld) is smaller than the %s vocabulary (%lld tokens)", (long long)c->vocab_size, c->tokenizer,
        (long long)tok_vocab[t]);
  if (c->eos_token_id < 0 || c->eos_token_id >= c->vocab_size)
    BAD("eos_token_id must be in [0, vocab_size=%lld) (got %lld)", (long long)c->vocab_size, (long long)c->eos_token_id);

  /* attention */
  static const char *const later_attn[] = {"nsa", "kda", "swa", NULL};
  if (is_one_of(c->attn, later_attn))
    BAD("attn='%s' as global attention is not supported yet (use mla, mha or dsa)", c->attn);
  static const char *const attns[] = {"mla", "mha", "dsa", NULL};
  if (!is_one_of(c->attn, attns)) BAD("attn must be 'mla', 'mha' or 'dsa' (got '%s')", c->attn);
  if (!strcmp(c->attn, "dsa")) {
    /* MLA plus the lightning indexer; its query reads MLA's q latent, its rope
     * covers the last qk_rope_head_dim of its idx_dim dims. The backend check
     * (CPU only for now) is in model_create. */
    NEED_INT(dsa_idx_heads, > 0, "> 0");
    NEED_INT(dsa_top_k, > 0, "> 0");
    if (c->dsa_idx_dim <= 0 || c->dsa_idx_dim < c->qk_rope_head_dim)
      BAD("dsa_idx_dim must be >= qk_rope_head_dim (%lld): rope covers its last dims (got %lld)",
          (long long)c->qk_rope_head_dim, (long long)c->dsa_idx_dim);
    if (c->q_lora_rank <= 0)
      BAD("attn = dsa needs q_lora_rank > 0 (the indexer's query reads the q latent)");
    static const char *const modes[] = {"sparse", "dense_warmup", NULL};
    if (!is_one_of(c->dsa_training_mode, modes))
      BAD("dsa_training_mode must be sparse or dense_warmup (got '%s')", c->dsa_training_mode);
  }
  if (!strcmp(c->attn, "mha")) {
    NEED_INT(n_kv_heads, >= 0, ">= 0");
    NEED_INT(head_dim, >= 0, ">= 0");
    if (c->n_kv_heads > 0 && c->n_heads % c->n_kv_heads)
      BAD("n_heads (%lld) must be a multiple of n_kv_heads (%lld)", (long long)c->n_heads, (long long)c->n_kv_heads);
    if (c->head_dim == 0 && c->dim % c->n_heads)
      BAD("dim (%lld) must be a multiple of n_heads (%lld) when head_dim is 0", (long long)c->dim, (long long)c->n_heads);
    int64_t hd = c->head_dim ? c->head_dim : c->dim / c->n_heads;
    if (c->qk_rope_head_dim <= 0 || c->qk_rope_head_dim > hd || c->qk_rope_head_dim % 2)
      BAD("qk_rope_head_dim must be even and in (0, head size %lld] for mha (got %lld)", (long long)hd,
          (long long)c->qk_rope_head_dim);
  } else {
    NEED_INT(q_lora_rank, >= 0, ">= 0");
    NEED_INT(kv_lora_rank, > 0, "> 0");
    NEED_INT(qk_nope_head_dim, >= 0, ">= 0");
    NEED_INT(v_head_dim, > 0, "> 0");
    if (c->qk_rope_head_dim <= 0 || c->qk_rope_head_dim % 2)
      BAD("qk_rope_head_dim must be even and > 0 (got %lld)", (long long)c->qk_rope_head_dim);
  }
  NEED_INT(attn_global_every, >= 1, ">= 1");
  NEED_INT(swa_kv_heads, >= 0, ">= 0");
  if (c->attn_global_every > 1) {
    if (strcmp(c->attn_local, "swa"))
      BAD("attn_local='%s' is not supported yet (only swa, with attn_global_every > 1)", c->attn_local);
    NEED_INT(attn_local_window, > 0, "> 0");
    /* the SWA block: head size v_head_dim, rope on its last qk_rope_head_dim dims */
    if (c->swa_kv_heads > 0 && c->n_heads % c->swa_kv_heads)
      BAD("swa_kv_heads (%lld) must divide n_heads (%lld)", (long long)c->swa_kv_heads,
          (long long)c->n_heads);
    static const int64_t swa_hd[] = {16, 32, 64, 128, 256};
    int hd_ok = 0;
    for (int i = 0; i < 5; i++) hd_ok |= c->v_head_dim == swa_hd[i];
    if (!hd_ok)
      BAD("v_head_dim (the swa head size) must be 16, 32, 64, 128 or 256 (got %lld)",
          (long long)c->v_head_dim);
    if (c->qk_rope_head_dim > c->v_head_dim)
      BAD("qk_rope_head_dim (%lld) must be <= v_head_dim (%lld), the swa head size",
          (long long)c->qk_rope_head_dim, (long long)c->v_head_dim);
  }

  /* rope, norm, routing */
  NEED_FLOAT(rope_theta, > 0, "> 0");
  NEED_FLOAT(rope_scaling_factor, >= 1, ">= 1");
  if (c->seq_len > 2 * c->max_position_embeddings)
    BAD("seq_len (%lld) must be <= 2 * max_position_embeddings (%lld)", (long long)c->seq_len,
        (long long)c->max_position_embeddings);
  NEED_FLOAT(rms_norm_eps, > 0, "> 0");
  NEED_FLOAT(router_bias_update_rate, >= 0, ">= 0");
  NEED_FLOAT(aux_loss_alpha, >= 0, ">= 0");
  NEED_FLOAT(route_scale, > 0, "> 0");
  if (!c->norm_topk_prob) BAD("norm_topk_prob=false is not supported yet (top-k weights are always normalised)");

  /* precision, device */
  static const char *const dtypes[] = {"bf16", "fp8", "nvfp4", NULL};
  if (!is_one_of(c->dtype, dtypes)) BAD("dtype must be bf16, fp8 or nvfp4 (got '%s')", c->dtype);
  if (strcmp(c->dtype, "bf16") && (c->dim % 32 || c->moe_inter_dim % 32))
    BAD("dtype=%s needs dim (%lld) and moe_inter_dim (%lld) divisible by 32 (one scale per 32 "
        "elements along each expert GEMM's K)", c->dtype, (long long)c->dim,
        (long long)c->moe_inter_dim);
  static const char *const devices[] = {"auto", "cuda", "cpu", NULL};
  if (!is_one_of(c->device, devices)) BAD("device must be auto, cuda or cpu (got '%s')", c->device);
  static const char *const masters[] = {"fp32", "stochastic", NULL};
  if (!is_one_of(c->master_weights, masters)) BAD("master_weights must be fp32 or stochastic (got '%s')", c->master_weights);

  /* optimizer and schedule */
  NEED_FLOAT(lr_dense, > 0, "> 0");
  NEED_FLOAT(lr_expert, > 0, "> 0");
  NEED_FLOAT(lr_router, >= 0, ">= 0");
  NEED_FLOAT(weight_decay, >= 0, ">= 0");
  NEED_FLOAT(adam_beta1, >= 0 && c->adam_beta1 < 1, "in [0, 1)");
  NEED_FLOAT(adam_beta2, >= 0 && c->adam_beta2 < 1, "in [0, 1)");
  NEED_FLOAT(adam_beta2_expert, >= 0 && c->adam_beta2_expert < 1, "in [0, 1)");
  NEED_FLOAT(adam_eps, > 0, "> 0");
  NEED_FLOAT(grad_clip, >= 0, ">= 0");
  NEED_INT(warmup_steps, >= 0, ">= 0");
  NEED_FLOAT(hold_tokens, >= 0, ">= 0");
  NEED_FLOAT(decay_tokens, >= 0, ">= 0");
  if (!(c->decay_floor > 0 && c->decay_floor <= c->lr_dense && c->decay_floor <= c->lr_expert))
    BAD("decay_floor (%g) must be > 0 and <= lr_dense (%g) and <= lr_expert (%g)", c->decay_floor, c->lr_dense,
        c->lr_expert);

  /* training loop */
  NEED_INT(batch_size, > 0, "> 0");
  NEED_INT(seq_len, > 0, "> 0");
  if (c->batch_size > INT_MAX / c->seq_len)
    BAD("batch_size x seq_len (%lld x %lld) must be <= %d tokens per step", (long long)c->batch_size,
        (long long)c->seq_len, INT_MAX);
  if (!*c->flow_mode) NEED_INT(steps, > 0, "> 0 (steps <= 0 derives steps from the token budget in flow mode only)");
  NEED_INT(log_every, > 0, "> 0");
  NEED_INT(checkpoint_every, >= 0, ">= 0");
  NEED_INT(checkpoint_keep_last_n, >= 0, ">= 0");

  /* data */
  if (*c->flow_mode && (!*c->mixture_toml || !*c->flow_profiles_toml))
    BAD("flow_mode='%s' needs mixture_toml and flow_profiles_toml", c->flow_mode);
  if (!*c->data_path && !*c->flow_mode)
    BAD("no data source: set data_path (direct mode) or flow_mode with mixture_toml and flow_profiles_toml");
  NEED_FLOAT(active_params_b, >= 0, ">= 0");
  NEED_FLOAT(target_loss, >= 0, ">= 0 (0 = off)");
  NEED_INT(eval_every, >= 0, ">= 0 (0 = off)");
  NEED_INT(eval_budget_max_examples, > 0, "> 0");
  NEED_FLOAT(eval_budget_max_time_s, >= 0, ">= 0 (0 = no limit)");
  if (c->target_loss > 0 && !c->validation_enabled)
    BAD("target_loss needs validation (validation_enabled = true): it stops on the validation loss");
  if (c->validation_enabled) {
    if (!*c->validation_data_path) BAD("validation_enabled needs validation_data_path");
    NEED_INT(validation_every, > 0, "> 0");
    NEED_INT(validation_steps, > 0, "> 0");
  }
  return 0;
}

/* ---- serialisation ---- */

/* Shortest %g form that reads back to the same double, always a TOML float;
 * whole numbers below 1e6 print plainly (50000.0, not 5e+04). */
static void float_text(double v, char *buf, size_t n) {
  if (v == floor(v) && fabs(v) < 1e6) {
    snprintf(buf, n, "%.1f", v);
    return;
  }
  for (int prec = 1; prec <= 17; prec++) {
    snprintf(buf, n, "%.*g", prec, v);
    if (strtod(buf, NULL) == v || isnan(v)) break;
  }
  if (!strpbrk(buf, ".eni")) strncat(buf, ".0", n - strlen(buf) - 1);
}

static void toml_quote(FILE *f, const char *s) {
  fputc('"', f);
  for (; *s; s++) {
    unsigned char ch = (unsigned char)*s;
    if (ch == '"' || ch == '\\') fprintf(f, "\\%c", ch);
    else if (ch == '\n') fputs("\\n", f);
    else if (ch == '\t') fputs("\\t", f);
    else if (ch == '\r') fputs("\\r", f);
    else if (ch < 0x20 || ch == 0x7F) fprintf(f, "\\u%04X", ch);
    else fputc(ch, f);
  }
  fputc('"', f);
}

void config_print(const Config *c, FILE *f) {
  fprintf(f, "# nmoe resolved config%s%s\n", *c->source_path ? " from " : "", c->source_path);
  for (int i = 0; i < NFIELDS; i++) {
    const Field *fd = &FIELDS[i];
    if (fd->flags & CF_UNSUP) continue; /* cannot be set, so not printed */
    char num[64];
    fprintf(f, "%s = ", fd->name);
    switch (fd->kind) {
    case K_INT: fprintf(f, "%lld", (long long)*F_INT(c, fd)); break;
    case K_FLOAT: float_text(*F_FLOAT(c, fd), num, sizeof num); fputs(num, f); break;
    case K_BOOL: fputs(*F_BOOL(c, fd) ? "true" : "false", f); break;
    case K_STR: toml_quote(f, *F_STR(c, fd) ? *F_STR(c, fd) : ""); break;
    }
    fprintf(f, "  # %s\n", fd->doc);
  }
}

static int field_cmp(const void *a, const void *b) {
  return strcmp((*(const Field *const *)a)->name, (*(const Field *const *)b)->name);
}

/* Canonical JSON (sorted keys, compact) of the fields whose flags include mask (0: all). */
static char *json_of(const Config *c, int mask) {
  const Field *sorted[NFIELDS];
  int n = 0;
  for (int i = 0; i < NFIELDS; i++)
    if (!mask || (FIELDS[i].flags & mask)) sorted[n++] = &FIELDS[i];
  qsort(sorted, (size_t)n, sizeof *sorted, field_cmp);
  JsonW w;
  jw_init(&w, 0);
  jw_obj(&w, NULL);
  for (int i = 0; i < n; i++) {
    const Field *f = sorted[i];
    switch (f->kind) {
    case K_INT: jw_int(&w, f->name, *F_INT(c, f)); break;
    case K_FLOAT: jw_num(&w, f->name, *F_FLOAT(c, f)); break;
    case K_BOOL: jw_bool(&w, f->name, *F_BOOL(c, f)); break;
    case K_STR: jw_str(&w, f->name, *F_STR(c, f) ? *F_STR(c, f) : ""); break;
    }
  }
  jw_obj_end(&w);
  return jw_finish(&w);
}

char *config_to_json(const Config *c) { return json_of(c, 0); }

void config_fingerprint(const Config *c, char out_hex[65]) {
  char *j = json_of(c, CF_FP);
  sha256_hex(j, strlen(j), out_hex);
  free(j);
}

/* eval_tasks.c: task list TOML + JSONL examples -> prompts and tokens (see
 * eval_tasks.h for the formats). */
#include "eval/eval_tasks.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/fsutil.h"
#include "core/json.h"
#include "core/log.h"
#include "core/toml.h"

static int fail(char *err, size_t errlen, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(err, errlen, fmt, ap);
  va_end(ap);
  return -1;
}

static void example_free(EvalExample *e) {
  free(e->prompt);
  for (int c = 0; c < e->n_choices; c++) {
    free(e->choices[c]);
    if (e->choice_ids) free(e->choice_ids[c]);
  }
  free(e->choices);
  free(e->choice_ids);
  free(e->n_choice_ids);
  free(e->prompt_ids);
}

static void task_free(EvalTask *t) {
  for (int i = 0; i < t->n; i++) example_free(&t->ex[i]);
  free(t->ex);
  free(t->name);
  free(t->path);
}

void eval_suite_free(EvalSuite *s) {
  if (!s) return;
  for (int i = 0; i < s->n; i++) task_free(&s->task[i]);
  free(s->task);
  free(s);
}

/* One JSONL line into e (prompt = the bare context). A span task's line
 * holds "answer" instead of choices/label: it becomes the only choice. */
static int parse_example(const char *text, size_t len, const char *path, int line, int span,
                         EvalExample *e, char *err, size_t errlen) {
  char jerr[256];
  Json *j = json_parse(text, len, jerr, sizeof jerr);
  if (!j) return fail(err, errlen, "%s:%d: bad JSON (%s)", path, line, jerr);
  int rc = -1;
  const Json *ctx = json_get(j, "context"), *ch = json_get(j, "choices"), *lb = json_get(j, "label");
  const Json *ans = json_get(j, "answer");
  memset(e, 0, sizeof *e);
  e->line = line;
  if (j->type != JSON_OBJ) fail(err, errlen, "%s:%d: expected an object", path, line);
  else if (!ctx || ctx->type != JSON_STR || !ctx->str[0])
    fail(err, errlen, "%s:%d: \"context\" must be a non-empty string", path, line);
  else if (span) {
    if (!ans || ans->type != JSON_STR || !ans->str[0])
      fail(err, errlen, "%s:%d: \"answer\" must be a non-empty string (span task)", path, line);
    else {
      e->prompt = xstrdup(ctx->str);
      e->n_choices = 1;
      e->choices = xcalloc(1, sizeof *e->choices);
      e->choices[0] = xstrdup(ans->str);
      rc = 0;
    }
  } else if (!ch || ch->type != JSON_ARR || ch->n < 2)
    fail(err, errlen, "%s:%d: \"choices\" must be an array of at least 2 strings", path, line);
  else if (!lb || lb->type != JSON_NUM || !lb->is_int || lb->i < 0 || lb->i >= ch->n)
    fail(err, errlen, "%s:%d: \"label\" must be an integer in [0, %d)", path, line, ch->n);
  else {
    rc = 0;
    for (int c = 0; c < ch->n && !rc; c++)
      if (ch->items[c]->type != JSON_STR || !ch->items[c]->str[0])
        rc = fail(err, errlen, "%s:%d: choice %d must be a non-empty string", path, line, c);
  }
  if (!rc && !span) {
    e->prompt = xstrdup(ctx->str);
    e->n_choices = ch->n;
    e->choices = xcalloc((size_t)ch->n, sizeof *e->choices);
    for (int c = 0; c < ch->n; c++) e->choices[c] = xstrdup(ch->items[c]->str);
    e->label = (int)lb->i;
  }
  json_free(j);
  return rc;
}

/* Reads the JSONL file of t: fewshot prefix from the first t->fewshot
 * examples, then up to max_examples scored ones. */
static int task_read(EvalTask *t, int64_t max_examples, char *err, size_t errlen) {
  size_t n;
  char ferr[512];
  char *text = fs_read_all(t->path, &n, ferr, sizeof ferr);
  if (!text) return fail(err, errlen, "task %s: %s", t->name, ferr);
  EvalExample *all = NULL;
  int n_all = 0, cap = 0, rc = 0, line = 0;
  for (char *p = text; p < text + n && !rc;) {
    char *nl = memchr(p, '\n', (size_t)(text + n - p));
    size_t len = nl ? (size_t)(nl - p) : (size_t)(text + n - p);
    line++;
    size_t k = 0;
    while (k < len && (p[k] == ' ' || p[k] == '\t' || p[k] == '\r')) k++;
    if (k < len) {
      if (max_examples > 0 && n_all >= t->fewshot + max_examples) break;
      if (n_all == cap) {
        cap = cap ? 2 * cap : 64;
        all = xrealloc(all, (size_t)cap * sizeof *all);
      }
      rc = parse_example(p, len, t->path, line, t->span, &all[n_all], err, errlen);
      if (!rc) n_all++;
    }
    p += len + 1;
  }
  free(text);
  if (!rc && n_all <= t->fewshot)
    rc = fail(err, errlen, "task %s: %s has %d example%s, fewshot %d leaves none to score", t->name,
              t->path, n_all, n_all == 1 ? "" : "s", t->fewshot);
  if (!rc) {
    if (t->baseline < 0) t->baseline = t->span ? 0 : 1.0 / all[0].n_choices;
    /* prefix: "ctx + correct choice\n\n" per fewshot example */
    size_t plen = 0;
    for (int i = 0; i < t->fewshot; i++)
      plen += strlen(all[i].prompt) + strlen(all[i].choices[all[i].label]) + 2;
    char *prefix = xmalloc(plen + 1);
    size_t o = 0;
    for (int i = 0; i < t->fewshot; i++)
      o += (size_t)sprintf(prefix + o, "%s%s\n\n", all[i].prompt, all[i].choices[all[i].label]);
    prefix[o] = 0;
    t->n = n_all - t->fewshot;
    t->ex = xcalloc((size_t)t->n, sizeof *t->ex);
    for (int i = 0; i < t->n; i++) {
      EvalExample *e = &all[t->fewshot + i];
      char *p = xmalloc(o + strlen(e->prompt) + 1);
      memcpy(p, prefix, o);
      strcpy(p + o, e->prompt);
      free(e->prompt);
      e->prompt = p;
      t->ex[i] = *e;
    }
    free(prefix);
    for (int i = 0; i < t->fewshot; i++) example_free(&all[i]);
  } else {
    for (int i = 0; i < n_all; i++) example_free(&all[i]);
  }
  free(all);
  return rc;
}

/* Is name in the comma list sel? */
/* The next name of a comma list at *p, spaces trimmed on both sides: returns
 * its start and sets *len (0 for an empty item); advances *p past its comma.
 * NULL at the end of the list. */
static const char *list_next(const char **p, size_t *len) {
  if (!**p) return NULL;
  const char *s = *p;
  while (*s == ' ') s++;
  const char *e = strchr(s, ',');
  size_t n = e ? (size_t)(e - s) : strlen(s);
  *p = e ? e + 1 : s + n;
  while (n > 0 && s[n - 1] == ' ') n--;
  *len = n;
  return s;
}

static int in_list(const char *sel, const char *name) {
  size_t len, n = strlen(name);
  for (const char *p = sel, *s; (s = list_next(&p, &len));)
    if (len == n && !strncmp(s, name, n)) return 1;
  return 0;
}

static const char *str_key(const TomlValue *t, const char *key) {
  const TomlValue *v = toml_get(t, key);
  return v && v->type == TOML_STRING ? v->u.s : NULL;
}

/* Fills t from one [[task]] table (name, source, fewshot, baseline; the
 * scorer is checked by the caller for selected tasks only). */
static int task_parse(const TomlValue *tv, const char *file, const char *dir, EvalTask *t,
                      char *err, size_t errlen) {
  static const char *const keys[] = {"name", "source", "fewshot", "scorer", "baseline", NULL};
  for (int k = 0; k < tv->n; k++) {
    int ok = 0;
    for (int i = 0; keys[i]; i++) ok |= !strcmp(tv->keys[k], keys[i]);
    if (!ok)
      return fail(err, errlen, "%s:%d:%d: unknown task key '%s' (name, source, fewshot, scorer, baseline)",
                  file, tv->items[k]->line, tv->items[k]->col, tv->keys[k]);
  }
  const char *name = str_key(tv, "name"), *src = str_key(tv, "source");
  if (!name || !name[0] || strchr(name, ','))
    return fail(err, errlen, "%s:%d: a task needs a string name without commas", file, tv->line);
  if (!src) return fail(err, errlen, "%s:%d: task %s needs a string source", file, tv->line, name);
  if (strncmp(src, "jsonl:", 6) || !src[6])
    return fail(err, errlen, "%s:%d: task %s: source '%s' is not supported yet (only jsonl:PATH; "
                "nothing is downloaded)", file, tv->line, name, src);
  const TomlValue *fs = toml_get(tv, "fewshot"), *bl = toml_get(tv, "baseline");
  if (fs && (fs->type != TOML_INT || fs->u.i < 0 || fs->u.i > 64))
    return fail(err, errlen, "%s:%d: task %s: fewshot must be an integer in [0, 64]", file, fs->line, name);
  double base = -1;
  if (bl) {
    base = bl->type == TOML_FLOAT ? bl->u.f : bl->type == TOML_INT ? (double)bl->u.i : -1;
    if (!(base >= 0 && base < 1))
      return fail(err, errlen, "%s:%d: task %s: baseline must be a number in [0, 1)", file, bl->line, name);
  }
  const char *p = src + 6;
  size_t n = strlen(dir) + strlen(p) + 2;
  t->path = xmalloc(n);
  if (p[0] == '/' || !dir[0]) snprintf(t->path, n, "%s", p);
  else snprintf(t->path, n, "%s/%s", dir, p);
  t->name = xstrdup(name);
  t->fewshot = fs ? (int)fs->u.i : 0;
  t->baseline = base;
  return 0;
}

EvalSuite *eval_suite_load(const char *tasks_file, const char *select, int64_t max_examples,
                           char *err, size_t errlen) {
  char terr[1024];
  TomlValue *root = toml_parse_file(tasks_file, 1, terr, sizeof terr);
  if (!root) {
    fail(err, errlen, "eval tasks: %s", terr);
    return NULL;
  }
  const TomlValue *arr = toml_get(root, "task");
  int all = !strcmp(select, "all") || !strcmp(select, "core");
  EvalSuite *s = xcalloc(1, sizeof *s);
  int rc = 0;
  if (!arr || arr->type != TOML_ARRAY || arr->n == 0)
    rc = fail(err, errlen, "%s: no [[task]] entries", tasks_file);
  char dir[4096];
  fs_dirname(tasks_file, dir, sizeof dir);
  if (!strcmp(dir, ".")) dir[0] = 0;
  if (!rc) s->task = xcalloc((size_t)arr->n, sizeof *s->task);
  for (int i = 0; !rc && i < arr->n; i++) {
    const TomlValue *tv = arr->items[i];
    if (tv->type != TOML_TABLE) {
      rc = fail(err, errlen, "%s:%d: task must be a table ([[task]])", tasks_file, tv->line);
      break;
    }
    EvalTask t = {0};
    if ((rc = task_parse(tv, tasks_file, dir, &t, err, errlen))) break;
    for (int k = 0; k < s->n && !rc; k++)
      if (!strcmp(s->task[k].name, t.name))
        rc = fail(err, errlen, "%s:%d: task name '%s' used twice", tasks_file, tv->line, t.name);
    const char *scorer = str_key(tv, "scorer");
    t.span = scorer && !strcmp(scorer, "span");
    if (!rc && (all || in_list(select, t.name)) && scorer && strcmp(scorer, "choices") && !t.span)
      rc = fail(err, errlen, "%s:%d: task %s: scorer '%s' is not supported yet (choices, span)",
                tasks_file, tv->line, t.name, scorer);
    if (rc || !(all || in_list(select, t.name))) {
      task_free(&t);
      continue;
    }
    s->task[s->n++] = t;
  }
  /* every selected name must exist */
  size_t len;
  for (const char *p = select, *nm; !rc && !all && (nm = list_next(&p, &len));) {
    int found = 0;
    for (int k = 0; k < s->n; k++) found |= strlen(s->task[k].name) == len && !strncmp(s->task[k].name, nm, len);
    if (!found && len)
      rc = fail(err, errlen, "eval_tasks names '%.*s', which %s does not define", (int)len, nm, tasks_file);
  }
  if (!rc && s->n == 0) rc = fail(err, errlen, "eval_tasks '%s' selects no task", select);
  for (int i = 0; !rc && i < s->n; i++) rc = task_read(&s->task[i], max_examples, err, errlen);
  toml_free(root);
  if (rc) {
    eval_suite_free(s);
    return NULL;
  }
  return s;
}

/* Token ids of text as int32, checked against the vocabulary. */
static int encode(const Tokenizer *tok, const char *text, int vocab_size, int32_t **out, int *n,
                  uint32_t **buf, size_t *cap) {
  size_t k = tok_encode(tok, text, strlen(text), buf, cap);
  *out = xmalloc((k ? k : 1) * sizeof **out);
  for (size_t i = 0; i < k; i++) {
    if ((*buf)[i] >= (uint32_t)vocab_size) return -1;
    (*out)[i] = (int32_t)(*buf)[i];
  }
  *n = (int)k;
  return 0;
}

int eval_suite_tokenize(EvalSuite *s, const Tokenizer *tok, int vocab_size, int seq_len, char *err,
                        size_t errlen) {
  uint32_t *buf = NULL;
  size_t cap = 0;
  int rc = 0;
  for (int t = 0; t < s->n && !rc; t++) {
    EvalTask *task = &s->task[t];
    for (int i = 0; i < task->n && !rc; i++) {
      EvalExample *e = &task->ex[i];
      const char *bad = NULL;
      if (encode(tok, e->prompt, vocab_size, &e->prompt_ids, &e->n_prompt, &buf, &cap)) bad = "context";
      e->choice_ids = xcalloc((size_t)e->n_choices, sizeof *e->choice_ids);
      e->n_choice_ids = xcalloc((size_t)e->n_choices, sizeof *e->n_choice_ids);
      for (int c = 0; c < e->n_choices && !bad && !rc; c++) {
        if (encode(tok, e->choices[c], vocab_size, &e->choice_ids[c], &e->n_choice_ids[c], &buf, &cap))
          bad = "choice";
        else if (e->n_choice_ids[c] > seq_len)
          rc = fail(err, errlen, "task %s: %s:%d: choice %d is %d tokens, more than seq_len %d",
                    task->name, task->path, e->line, c, e->n_choice_ids[c], seq_len);
      }
      if (bad)
        rc = fail(err, errlen, "task %s: %s:%d: a %s token is outside the vocabulary (%d) of %s",
                  task->name, task->path, e->line, bad, vocab_size, tok_name(tok));
    }
  }
  free(buf);
  return rc;
}

EvalSuite *eval_suite_open(const Config *cfg) {
  char err[1024];
  EvalSuite *s = eval_suite_load(cfg->eval_tasks_file, cfg->eval_tasks, cfg->eval_budget_max_examples,
                                 err, sizeof err);
  if (!s) nmoe_fatal("%s", err);
  Tokenizer *tok = tok_open(cfg->tokenizer, err, sizeof err);
  if (!tok) nmoe_fatal("eval: %s", err);
  if (eval_suite_tokenize(s, tok, (int)cfg->vocab_size, (int)cfg->seq_len, err, sizeof err))
    nmoe_fatal("eval: %s", err);
  tok_close(tok);
  return s;
}

/* test_eval.c: multiple-choice eval: task files (good, bad line, fewshot,
 * budget, missing files, unsupported scorer/source), tokenization, row layout,
 * model_score_rows against model_eval_loss, and scoring on a model whose
 * answers are forced (all weights zero: every token costs log V). */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "backend/backend.h"
#include "core/config.h"
#include "core/rng.h"
#include "eval/eval_score.h"
#include "eval/eval_tasks.h"
#include "model/model.h"
#include "model_test_util.h"
#include "tmpdir_fixture.h"

static void write_file(const char *path, const char *text) {
  FILE *f = fopen(path, "w");
  assert_non_null(f);
  fputs(text, f);
  fclose(f);
}

static const char *TASKS =
    "[[task]]\n"
    "name = \"a\"\n"
    "source = \"jsonl:a.jsonl\"\n"
    "fewshot = 2\n"
    "scorer = \"choices\"\n"
    "\n"
    "[[task]]\n"
    "name = \"b\"\n"
    "source = \"jsonl:sub/b.jsonl\"\n"
    "baseline = 0.5\n";

static const char *A_JSONL =
    "{\"context\": \"c0\", \"choices\": [\" x\", \" y\", \" z\"], \"label\": 1}\n"
    "{\"context\": \"c1\", \"choices\": [\" x\", \" y\", \" z\"], \"label\": 2}\n"
    "\n"
    "{\"context\": \"c2\", \"choices\": [\" x\", \" y\", \" z\"], \"label\": 0}\n"
    "{\"context\": \"c3\", \"choices\": [\" x\", \" y\", \" z\"], \"label\": 0}\n"
    "{\"context\": \"c4\", \"choices\": [\" x\", \" y\", \" z\"], \"label\": 0}\n";

static void write_suite(const char *dir) {
  write_file(at(dir, "tasks.toml"), TASKS);
  write_file(at(dir, "a.jsonl"), A_JSONL);
  char sub[512];
  snprintf(sub, sizeof sub, "%s/sub", dir);
  char err[256];
  assert_int_equal(fs_mkdirs(sub, err, sizeof err), 0);
  write_file(at(dir, "sub/b.jsonl"),
             "{\"context\": \"q\", \"choices\": [\" yes\", \" no\"], \"label\": 1}\n");
}

/* Loads dir/tasks.toml expecting failure; err must contain want. */
static void load_fails(const char *dir, const char *select, const char *want) {
  char err[1024] = "";
  EvalSuite *s = eval_suite_load(at(dir, "tasks.toml"), select, 0, err, sizeof err);
  if (s || !strstr(err, want)) fail_msg("expected an error containing '%s', got '%s'", want, err);
}

static void test_tasks_good(void **state) {
  Fixture *f = *state;
  write_suite(f->dir);
  char err[1024];
  EvalSuite *s = eval_suite_load(at(f->dir, "tasks.toml"), "all", 0, err, sizeof err);
  assert_non_null(s);
  assert_int_equal(s->n, 2);
  EvalTask *a = &s->task[0], *b = &s->task[1];
  assert_string_equal(a->name, "a");
  assert_int_equal(a->fewshot, 2);
  assert_int_equal(a->n, 3); /* 5 examples, the first 2 are the prompt prefix */
  assert_string_equal(a->ex[0].prompt, "c0 y\n\nc1 z\n\nc2");
  assert_string_equal(a->ex[2].prompt, "c0 y\n\nc1 z\n\nc4");
  assert_int_equal(a->ex[0].line, 4); /* the blank line still counts */
  assert_int_equal(a->ex[0].n_choices, 3);
  assert_string_equal(a->ex[0].choices[2], " z");
  assert_true(fabs(a->baseline - 1.0 / 3) < 1e-12); /* 1 / choices of line 1 */
  assert_string_equal(b->name, "b");
  assert_true(strstr(b->path, "sub/b.jsonl") != NULL);
  assert_int_equal(b->n, 1);
  assert_string_equal(b->ex[0].prompt, "q");
  assert_int_equal(b->ex[0].label, 1);
  assert_true(b->baseline == 0.5);
  eval_suite_free(s);

  /* a selection and a budget (scored examples after the fewshot ones) */
  s = eval_suite_load(at(f->dir, "tasks.toml"), "b, a", 2, err, sizeof err);
  assert_non_null(s);
  assert_int_equal(s->n, 2);
  assert_int_equal(s->task[0].n, 2);
  assert_string_equal(s->task[0].ex[1].prompt, "c0 y\n\nc1 z\n\nc3");
  eval_suite_free(s);
  s = eval_suite_load(at(f->dir, "tasks.toml"), "b", 0, err, sizeof err);
  assert_non_null(s);
  assert_int_equal(s->n, 1);
  assert_string_equal(s->task[0].name, "b");
  eval_suite_free(s);
}

static void test_tasks_bad_lines(void **state) {
  Fixture *f = *state;
  write_suite(f->dir);
  char want[600];
  snprintf(want, sizeof want, "%s:3: bad JSON", at(f->dir, "a.jsonl"));
  write_file(at(f->dir, "a.jsonl"),
             "{\"context\": \"c0\", \"choices\": [\" x\", \" y\"], \"label\": 1}\n\n{\"context\": \n");
  load_fails(f->dir, "all", want);
  write_file(at(f->dir, "a.jsonl"), "{\"context\": \"c0\", \"choices\": [\" x\", \" y\"], \"label\": 2}\n");
  snprintf(want, sizeof want, "%s:1: \"label\" must be an integer in [0, 2)", at(f->dir, "a.jsonl"));
  load_fails(f->dir, "all", want);
  write_file(at(f->dir, "a.jsonl"), "{\"context\": \"c0\", \"choices\": [\" x\"], \"label\": 0}\n");
  load_fails(f->dir, "all", "a.jsonl:1: \"choices\" must be an array of at least 2 strings");
  write_file(at(f->dir, "a.jsonl"), "{\"context\": \"\", \"choices\": [\" x\", \" y\"], \"label\": 0}\n");
  load_fails(f->dir, "all", "a.jsonl:1: \"context\" must be a non-empty string");
  /* fewshot 2 needs at least 3 examples */
  write_file(at(f->dir, "a.jsonl"),
             "{\"context\": \"c0\", \"choices\": [\" x\", \" y\"], \"label\": 1}\n"
             "{\"context\": \"c1\", \"choices\": [\" x\", \" y\"], \"label\": 1}\n");
  load_fails(f->dir, "a", "task a: ");
  load_fails(f->dir, "a", "fewshot 2 leaves none to score");
  /* task b alone does not read a.jsonl */
  char err[1024];
  EvalSuite *s = eval_suite_load(at(f->dir, "tasks.toml"), "b", 0, err, sizeof err);
  assert_non_null(s);
  eval_suite_free(s);
}

static void test_tasks_missing_and_unsupported(void **state) {
  Fixture *f = *state;
  char err[1024] = "";
  assert_null(eval_suite_load(at(f->dir, "nope.toml"), "all", 0, err, sizeof err));
  assert_non_null(strstr(err, "nope.toml"));
  write_suite(f->dir);
  remove(at(f->dir, "sub/b.jsonl"));
  load_fails(f->dir, "all", "task b: ");
  load_fails(f->dir, "all", "sub/b.jsonl");
  load_fails(f->dir, "a,c", "eval_tasks names 'c'");
  write_file(at(f->dir, "tasks.toml"), "[[task]]\nname = \"g\"\nsource = \"jsonl:a.jsonl\"\nscorer = \"judge\"\n");
  load_fails(f->dir, "all", "task g: scorer 'judge' is not supported yet (choices, span)");
  /* a span task reads "answer" lines: a choices line is an error there */
  write_file(at(f->dir, "tasks.toml"), "[[task]]\nname = \"g\"\nsource = \"jsonl:a.jsonl\"\nscorer = \"span\"\n");
  load_fails(f->dir, "all", "a.jsonl:1: \"answer\" must be a non-empty string (span task)");
  write_file(at(f->dir, "s.jsonl"), "{\"context\": \"1 + 1 =\", \"answer\": \" 2\"}\n"
                                     "{\"context\": \"2 + 2 =\", \"answer\": \" 4\"}\n");
  write_file(at(f->dir, "tasks.toml"),
             "[[task]]\nname = \"s\"\nsource = \"jsonl:s.jsonl\"\nscorer = \"span\"\nfewshot = 1\n");
  EvalSuite *sp = eval_suite_load(at(f->dir, "tasks.toml"), "all", 0, err, sizeof err);
  assert_non_null(sp);
  assert_int_equal(sp->task[0].span, 1);
  assert_true(sp->task[0].baseline == 0);
  assert_int_equal(sp->task[0].n, 1);
  assert_int_equal(sp->task[0].ex[0].n_choices, 1);
  assert_string_equal(sp->task[0].ex[0].prompt, "1 + 1 = 2\n\n2 + 2 =");
  assert_string_equal(sp->task[0].ex[0].choices[0], " 4");
  eval_suite_free(sp);
  write_file(at(f->dir, "tasks.toml"), "[[task]]\nname = \"g\"\nsource = \"hf:cais/mmlu:all:dev\"\n");
  load_fails(f->dir, "all", "source 'hf:cais/mmlu:all:dev' is not supported yet");
  write_file(at(f->dir, "tasks.toml"), "[[task]]\nname = \"g\"\nsource = \"jsonl:a.jsonl\"\nshots = 1\n");
  load_fails(f->dir, "all", "tasks.toml:4:9: unknown task key 'shots'");
  write_file(at(f->dir, "tasks.toml"), "[[task]]\nname = \"g\"\nsource = \"jsonl:a.jsonl\"\nbaseline = 1\n");
  load_fails(f->dir, "all", "baseline must be a number in [0, 1)");
  write_file(at(f->dir, "tasks.toml"), "x = 1\n");
  load_fails(f->dir, "all", "no [[task]] entries");
}

static void test_tokenize(void **state) {
  Fixture *f = *state;
  write_suite(f->dir);
  char err[1024];
  EvalSuite *s = eval_suite_load(at(f->dir, "tasks.toml"), "all", 0, err, sizeof err);
  assert_non_null(s);
  Tokenizer *tok = tok_open("gpt2", err, sizeof err);
  if (!tok) fail_msg("%s", err);
  assert_int_equal(eval_suite_tokenize(s, tok, 50304, 8, err, sizeof err), 0);
  const EvalExample *e = &s->task[0].ex[0];
  uint32_t ids[64];
  for (int i = 0; i < e->n_prompt; i++) ids[i] = (uint32_t)e->prompt_ids[i];
  size_t n;
  char *text = tok_decode(tok, ids, (size_t)e->n_prompt, &n);
  assert_string_equal(text, e->prompt);
  free(text);
  assert_int_equal(e->n_choice_ids[1], 1); /* " y" is one gpt2 token */
  eval_suite_free(s);
  /* a choice longer than seq_len, and a vocabulary too small */
  s = eval_suite_load(at(f->dir, "tasks.toml"), "b", 0, err, sizeof err);
  assert_int_equal(eval_suite_tokenize(s, tok, 50304, 0, err, sizeof err), -1);
  if (!strstr(err, "b.jsonl:1: choice 0 is 1 tokens, more than seq_len 0")) fail_msg("%s", err);
  eval_suite_free(s);
  s = eval_suite_load(at(f->dir, "tasks.toml"), "b", 0, err, sizeof err);
  assert_int_equal(eval_suite_tokenize(s, tok, 10, 8, err, sizeof err), -1);
  assert_non_null(strstr(err, "outside the vocabulary (10) of gpt2"));
  eval_suite_free(s);
  tok_close(tok);
}

/* ---- rows and scoring ---- */

/* An example with the given prompt ids and choices (ids as a flat list with
 * lengths), owned by the caller through example_clear. */
static EvalExample make_example(const int32_t *prompt, int np, int nch, const int *lens,
                                const int32_t *ids, int label) {
  EvalExample e = {0};
  e.prompt_ids = xmalloc((size_t)np * sizeof(int32_t));
  memcpy(e.prompt_ids, prompt, (size_t)np * sizeof(int32_t));
  e.n_prompt = np;
  e.n_choices = nch;
  e.label = label;
  e.choice_ids = xcalloc((size_t)nch, sizeof *e.choice_ids);
  e.n_choice_ids = xcalloc((size_t)nch, sizeof(int));
  for (int c = 0, o = 0; c < nch; o += lens[c], c++) {
    e.choice_ids[c] = xmalloc((size_t)lens[c] * sizeof(int32_t));
    memcpy(e.choice_ids[c], ids + o, (size_t)lens[c] * sizeof(int32_t));
    e.n_choice_ids[c] = lens[c];
  }
  return e;
}

static void example_clear(EvalExample *e) {
  for (int c = 0; c < e->n_choices; c++) free(e->choice_ids[c]);
  free(e->choice_ids);
  free(e->n_choice_ids);
  free(e->prompt_ids);
}

static void test_fill_row(void **state) {
  (void)state;
  const int32_t I = 99;
  int32_t prompt[10] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10}, ch[] = {20, 21, 30};
  int lens[] = {2, 1};
  EvalExample e = make_example(prompt, 10, 2, lens, ch, 0);
  int32_t in[6], tg[6];
  /* too long: the prompt is cut from the left so prompt + choice = T + 1 */
  eval_fill_row(&e, 0, 6, I, in, tg);
  int32_t in0[] = {6, 7, 8, 9, 10, 20}, tg0[] = {I, I, I, I, 20, 21};
  assert_memory_equal(in, in0, sizeof in0);
  assert_memory_equal(tg, tg0, sizeof tg0);
  eval_fill_row(&e, 1, 6, I, in, tg);
  int32_t in1[] = {5, 6, 7, 8, 9, 10}, tg1[] = {I, I, I, I, I, 30};
  assert_memory_equal(in, in1, sizeof in1);
  assert_memory_equal(tg, tg1, sizeof tg1);
  example_clear(&e);
  /* short: padding after the choice */
  e = make_example(prompt, 2, 2, lens, ch, 0);
  eval_fill_row(&e, 0, 6, I, in, tg);
  int32_t in2[] = {1, 2, 20, 0, 0, 0}, tg2[] = {I, 20, 21, I, I, I};
  assert_memory_equal(in, in2, sizeof in2);
  assert_memory_equal(tg, tg2, sizeof tg2);
  example_clear(&e);
}

static void tiny_config(Config *c) {
  tiny_model_config(c);
  c->vocab_size = 41;
  c->eos_token_id = 3;
  c->loss_mask_eos = false;
  c->batch_size = 3;
  c->seed = 77;
}

static void assert_close(double a, double b) {
  if (fabs(a - b) > 1e-4 * fmax(1.0, fabs(b))) fail_msg("%.9g != %.9g", a, b);
}

/* Per-row sums of model_score_rows equal model_eval_loss over the same rows
 * (the other rows masked), with and without ignored positions. */
static void test_score_rows_match_eval_loss(void **state) {
  (void)state;
  Config c;
  tiny_config(&c);
  Backend *be = backend_cpu();
  Model *m = model_create(&c, be, NULL);
  const int B = 3, T = 7, N = B * T, V = 41;
  int32_t in[N], tg[N], tg_row[N];
  for (int i = 0; i < N; i++) {
    in[i] = (int32_t)(rng_u64(5, 1, (uint64_t)i, 0) % V);
    tg[i] = (int32_t)(rng_u64(5, 2, (uint64_t)i, 0) % V);
    if (tg[i] == 3) tg[i] = 4;
  }
  double row[B];
  int64_t nv;
  /* nothing ignored (ignore id V): the rows sum to the whole loss */
  model_score_rows(m, in, tg, B, T, V, row);
  double all = model_eval_loss(m, in, tg, B, T, &nv);
  assert_int_equal(nv, N);
  assert_close(row[0] + row[1] + row[2], all);
  /* positions holding the ignore id (3 = eos, which model_eval_loss masks) */
  m->cfg.loss_mask_eos = true;
  for (int i = 0; i < N; i += 3) tg[i] = 3;
  model_score_rows(m, in, tg, B, T, 3, row);
  for (int b = 0; b < B; b++) {
    for (int i = 0; i < N; i++) tg_row[i] = i / T == b ? tg[i] : 3;
    double one = model_eval_loss(m, in, tg_row, B, T, &nv);
    assert_close(row[b], one);
    assert_true(row[b] > 0);
  }
  /* an all-ignored row scores 0 */
  for (int i = 0; i < T; i++) tg[T + i] = 3;
  model_score_rows(m, in, tg, B, T, 3, row);
  assert_true(row[1] == 0);
  model_free(m);
  be->destroy(be);
  config_free(&c);
}

/* All weights zero: every logit is 0, each choice token costs log V, so the
 * shortest choice wins and equal lengths tie to the lowest index. */
static void test_score_forced(void **state) {
  (void)state;
  Config c;
  tiny_config(&c);
  c.batch_size = 2;
  Backend *be = backend_cpu();
  Model *m = model_create(&c, be, NULL);
  be->zero(be, m->params, m->pt.total * be->size[BUF_ACT]);
  int32_t p[] = {5, 6, 7, 8}, ids[] = {1, 2, 3, 4, 5, 6, 7, 8, 9};
  int l0[] = {2, 1, 3}, l1[] = {1, 1}, l2[] = {1, 2};
  EvalExample ex[3] = {make_example(p, 4, 3, l0, ids, 1),  /* shortest = label: right */
                       make_example(p, 2, 2, l1, ids, 0),  /* tie -> 0 = label: right */
                       make_example(p, 3, 2, l2, ids, 1)}; /* shortest is 0: wrong */
  EvalTask t = {.name = "forced", .baseline = 0.5, .n = 3, .ex = ex};
  EvalSuite s = {.n = 1, .task = &t};
  EvalResult r;
  eval_suite_score(m, &s, 2, 7, 0, &r); /* 7 rows in 4 forward calls (one padded row) */
  assert_string_equal(r.name, "forced");
  assert_int_equal(r.n, 3);
  assert_close(r.acc, 2.0 / 3);
  assert_close(r.centered_acc, (2.0 / 3 - 0.5) / 0.5);
  /* the summary document */
  char *json = eval_summary_json("core", 12, &r, 1, 5.0);
  assert_non_null(strstr(json, "\"suite\": \"core\""));
  assert_non_null(strstr(json, "\"name\": \"forced\""));
  assert_non_null(strstr(json, "\"n\": 3"));
  free(json);
  for (int i = 0; i < 3; i++) example_clear(&ex[i]);
  model_free(m);
  be->destroy(be);
  config_free(&c);
}

/* model_rows_exact agrees with the losses: at a position, the argmax token is
 * the one whose cross-entropy is smallest. Found by scanning every token, it
 * is "exact"; any other token is not; two positions must both hold. */
static int argmin_token(Model *m, int32_t *in, int B, int T, int pos, int V) {
  int32_t tg[B * T];
  double row[B];
  int best = -1;
  double best_loss = 0;
  for (int v0 = 0; v0 < V; v0 += B) {
    for (int i = 0; i < B * T; i++) tg[i] = V;
    for (int b = 0; b < B; b++) {
      memcpy(in + (size_t)b * T, in, (size_t)T * sizeof *in);
      tg[b * T + pos] = v0 + b < V ? v0 + b : V;
    }
    model_score_rows(m, in, tg, B, T, V, row);
    for (int b = 0; b < B && v0 + b < V; b++)
      if (best < 0 || row[b] < best_loss) best = v0 + b, best_loss = row[b];
  }
  return best;
}

static void test_rows_exact(void **state) {
  (void)state;
  Config c;
  tiny_config(&c);
  Backend *be = backend_cpu();
  Model *m = model_create(&c, be, NULL);
  const int B = 3, T = 7, V = 41;
  int32_t in[B * T], tg[B * T];
  for (int i = 0; i < T; i++) in[i] = (int32_t)(rng_u64(9, 1, (uint64_t)i, 0) % V);
  const int a1 = argmin_token(m, in, B, T, 5, V);
  in[6] = a1; /* teacher forcing: the answer's first token is the next input */
  const int a2 = argmin_token(m, in, B, T, 6, V);
  for (int b = 1; b < B; b++) memcpy(in + (size_t)b * T, in, (size_t)T * sizeof *in);
  for (int i = 0; i < B * T; i++) tg[i] = V;
  tg[0 * T + 5] = a1, tg[0 * T + 6] = a2;           /* the greedy answer */
  tg[1 * T + 5] = a1, tg[1 * T + 6] = (a2 + 1) % V; /* second token wrong */
  tg[2 * T + 5] = (a1 + 1) % V;                     /* one token, wrong */
  double row[B];
  int exact[B];
  model_score_rows(m, in, tg, B, T, V, row);
  model_rows_exact(m, tg, B, T, V, exact);
  assert_int_equal(exact[0], 1);
  assert_int_equal(exact[1], 0);
  assert_int_equal(exact[2], 0);
  model_free(m);
  be->destroy(be);
  config_free(&c);
}

/* A span task on a model with all weights zero: every logit is 0, so greedy
 * decoding gives token 0 (ties to the lower id) at every position: answers
 * made of 0s are exact, others not. Baseline 0 (acc = centered acc). */
static void test_score_span_forced(void **state) {
  (void)state;
  Config c;
  tiny_config(&c);
  c.batch_size = 2;
  Backend *be = backend_cpu();
  Model *m = model_create(&c, be, NULL);
  be->zero(be, m->params, m->pt.total * be->size[BUF_ACT]);
  int32_t p[] = {5, 6, 7, 8}, ids[] = {0, 0, 0, 1, 0};
  int l0[] = {1}, l1[] = {2}, l2[] = {2};
  EvalExample ex[3] = {make_example(p, 4, 1, l0, ids, 0),      /* [0]: exact */
                       make_example(p, 3, 1, l1, ids + 1, 0),  /* [0 0]: exact */
                       make_example(p, 2, 1, l2, ids + 3, 0)}; /* [1 0]: not */
  EvalTask t = {.name = "span", .baseline = 0, .span = 1, .n = 3, .ex = ex};
  EvalSuite s = {.n = 1, .task = &t};
  EvalResult r;
  eval_suite_score(m, &s, 2, 7, 0, &r);
  assert_int_equal(r.n, 3);
  assert_close(r.acc, 2.0 / 3);
  assert_close(r.centered_acc, 2.0 / 3);
  for (int i = 0; i < 3; i++) example_clear(&ex[i]);
  model_free(m);
  be->destroy(be);
  config_free(&c);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test_setup_teardown(test_tasks_good, tmpdir_setup, tmpdir_teardown),
      cmocka_unit_test_setup_teardown(test_tasks_bad_lines, tmpdir_setup, tmpdir_teardown),
      cmocka_unit_test_setup_teardown(test_tasks_missing_and_unsupported, tmpdir_setup, tmpdir_teardown),
      cmocka_unit_test_setup_teardown(test_tokenize, tmpdir_setup, tmpdir_teardown),
      cmocka_unit_test(test_fill_row),
      cmocka_unit_test(test_score_rows_match_eval_loss),
      cmocka_unit_test(test_score_forced),
      cmocka_unit_test(test_rows_exact),
      cmocka_unit_test(test_score_span_forced),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}

/* eval_score.c: multiple-choice scoring in the model's training shape, and
 * reporting of the results (see eval_score.h). */
#include "eval/eval_score.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/json.h"
#include "core/log.h"
#include "dist/comm.h"

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

void eval_fill_row(const EvalExample *e, int c, int T, int32_t ignore_id, int32_t *inputs,
                   int32_t *targets) {
  const int nc = e->n_choice_ids[c];
  /* prompt tokens kept: the last np, so that np + nc tokens give T inputs */
  int np = e->n_prompt < T + 1 - nc ? e->n_prompt : T + 1 - nc;
  const int32_t *pr = e->prompt_ids + (e->n_prompt - np), *ch = e->choice_ids[c];
  const int total = np + nc; /* tokens of the row's sequence (<= T + 1) */
  for (int i = 0; i < T; i++) {
    inputs[i] = i < total - 1 ? (i < np ? pr[i] : ch[i - np]) : 0;
    int j = i + 1; /* the token position i predicts */
    targets[i] = j >= np && j < total ? ch[j - np] : ignore_id;
  }
}

/* One (example, choice) row this rank scores. */
typedef struct RowRef {
  int ex, choice;
} RowRef;

/* Scores task t; returns 1 when the time budget ran out during it. */
static int score_task(Model *m, const EvalTask *t, int B, int T, double deadline, EvalResult *r,
                      int32_t *in, int32_t *tg, double *loss, int *exact) {
  const int rank = m->comm ? m->comm->rank : 0, world = m->comm ? m->comm->world : 1;
  const int32_t ignore = (int32_t)m->d.V;
  /* rows of every rank (all ranks know the suite): forward calls = the most */
  int64_t max_rows = 0, n_rows = 0;
  for (int q = 0; q < world; q++) {
    int64_t rows = 0;
    for (int e = q; e < t->n; e += world) rows += t->ex[e].n_choices;
    if (rows > max_rows) max_rows = rows;
    if (q == rank) n_rows = rows;
  }
  RowRef *rows = xmalloc((size_t)(n_rows ? n_rows : 1) * sizeof *rows);
  double *row_loss = xmalloc((size_t)(n_rows ? n_rows : 1) * sizeof *row_loss);
  int64_t k = 0;
  for (int e = rank; e < t->n; e += world)
    for (int c = 0; c < t->ex[e].n_choices; c++) rows[k++] = (RowRef){e, c};
  const int64_t calls = (max_rows + B - 1) / B;
  int64_t done = 0; /* rows of this rank scored */
  int out_of_time = 0;
  for (int64_t call = 0; call < calls && !out_of_time; call++) {
    for (int b = 0; b < B; b++) {
      int64_t i = call * B + b;
      if (i < n_rows) {
        eval_fill_row(&t->ex[rows[i].ex], rows[i].choice, T, ignore, in + (size_t)b * T,
                      tg + (size_t)b * T);
      } else {
        memset(in + (size_t)b * T, 0, (size_t)T * sizeof *in);
        for (int j = 0; j < T; j++) tg[(size_t)b * T + j] = ignore;
      }
    }
    model_score_rows(m, in, tg, B, T, ignore, loss);
    if (t->span) model_rows_exact(m, tg, B, T, ignore, exact);
    /* span: a row's "loss" is 0 when greedy decoding yields the answer, else 1 */
    for (int b = 0; b < B && call * B + b < n_rows; b++)
      row_loss[call * B + b] = t->span ? !exact[b] : loss[b];
    done = (call + 1) * B < n_rows ? (call + 1) * B : n_rows;
    if (deadline > 0) {
      int64_t late = now_s() > deadline;
      out_of_time = (m->comm ? comm_sum_i64(m->comm, late) : late) > 0;
    }
  }
  /* predictions of the examples whose rows were all scored */
  int64_t correct = 0, n = 0;
  for (int64_t i = 0; i < done;) {
    const EvalExample *e = &t->ex[rows[i].ex];
    if (i + e->n_choices > done) break;
    int best = 0;
    for (int c = 1; c < e->n_choices; c++)
      if (row_loss[i + c] < row_loss[i + best]) best = c;
    correct += t->span ? row_loss[i] == 0 : best == e->label;
    n++;
    i += e->n_choices;
  }
  if (m->comm) {
    correct = comm_sum_i64(m->comm, correct);
    n = comm_sum_i64(m->comm, n);
  }
  r->name = t->name;
  r->n = n;
  r->acc = n > 0 ? (double)correct / n : 0;
  r->centered_acc = n > 0 ? (r->acc - t->baseline) / (1 - t->baseline) : 0;
  free(rows);
  free(row_loss);
  return out_of_time;
}

double eval_suite_score(Model *m, const EvalSuite *s, int B, int T, double max_time_s,
                        EvalResult *res) {
  const double t0 = now_s(), deadline = max_time_s > 0 ? t0 + max_time_s : 0;
  int32_t *in = xmalloc((size_t)B * T * sizeof *in), *tg = xmalloc((size_t)B * T * sizeof *tg);
  double *loss = xmalloc((size_t)B * sizeof *loss);
  int *exact = xmalloc((size_t)B * sizeof *exact);
  int out_of_time = 0;
  for (int i = 0; i < s->n; i++) {
    if (out_of_time) {
      res[i] = (EvalResult){.name = s->task[i].name};
      continue;
    }
    out_of_time = score_task(m, &s->task[i], B, T, deadline, &res[i], in, tg, loss, exact);
    if (out_of_time)
      log_warn("eval: time budget of %.0f s spent during task %s (%lld examples scored; later "
               "tasks skipped)", max_time_s, s->task[i].name, (long long)res[i].n);
  }
  free(in);
  free(tg);
  free(loss);
  free(exact);
  return 1000 * (now_s() - t0);
}

/* Mean centered accuracy over the tasks that were scored (n > 0): a task the
 * time budget never reached is not a zero. */
double eval_core(const EvalResult *res, int n) {
  double sum = 0;
  int scored = 0;
  for (int i = 0; i < n; i++)
    if (res[i].n > 0) {
      sum += res[i].centered_acc;
      scored++;
    }
  return scored > 0 ? sum / scored : 0;
}

void eval_report(Metrics *mx, int64_t step, const EvalResult *res, int n) {
  char line[2048], tag[256];
  size_t o = (size_t)snprintf(line, sizeof line, "eval        step %lld | CORE %.4f", (long long)step,
                              eval_core(res, n));
  for (int i = 0; i < n; i++) {
    if (o < sizeof line)
      o += (size_t)snprintf(line + o, sizeof line - o, " | %s acc %.4f (centered %.4f, n %lld)",
                            res[i].name, res[i].acc, res[i].centered_acc, (long long)res[i].n);
    if (!mx) continue;
    if (res[i].n > 0) { /* a task the budget did not reach has no accuracy */
      snprintf(tag, sizeof tag, "eval_choices/%s/acc", res[i].name);
      metrics_log(mx, tag, step, res[i].acc);
      snprintf(tag, sizeof tag, "eval_choices/%s/centered_acc", res[i].name);
      metrics_log(mx, tag, step, res[i].centered_acc);
    }
    snprintf(tag, sizeof tag, "eval_choices/%s/n", res[i].name);
    metrics_log(mx, tag, step, (double)res[i].n);
  }
  log_info("%s", line);
}

char *eval_summary_json(const char *suite, int64_t step, const EvalResult *res, int n,
                        double elapsed_ms) {
  JsonW w;
  jw_init(&w, 2);
  jw_obj(&w, NULL);
  jw_str(&w, "suite", suite);
  jw_int(&w, "step", step);
  jw_num(&w, "CORE", eval_core(res, n));
  jw_arr(&w, "tasks");
  for (int i = 0; i < n; i++) {
    jw_obj(&w, NULL);
    jw_str(&w, "name", res[i].name);
    jw_num(&w, "acc", res[i].acc);
    jw_num(&w, "centered_acc", res[i].centered_acc);
    jw_int(&w, "n", res[i].n);
    jw_obj_end(&w);
  }
  jw_arr_end(&w);
  jw_num(&w, "elapsed_ms", elapsed_ms);
  jw_obj_end(&w);
  return jw_finish(&w);
}

/* eval_score.h: multiple-choice scoring of an EvalSuite on a Model, and its
 * reporting (metrics rows, one log line, summary.json).
 *
 * Each (example, choice) is one row of the model's training shape (B rows of
 * T tokens per rank): the prompt (left-truncated to fit) then the choice;
 * only the choice tokens are targets, every other position (prompt, padding)
 * holds the ignore id V, outside the vocabulary. The prediction is the choice
 * with the smallest summed cross-entropy (ties: the lowest index), as the
 * reference's summed option log-probability. A span task's one row holds its
 * answer; it is right when every answer token is the argmax (greedy decoding
 * from the prompt produces the answer exactly: model_rows_exact).
 *
 * Several ranks: example e is scored by rank e % world; every rank runs the
 * same number of forward calls (short ranks pad with all-ignored rows) and the
 * correct counts are summed over ranks. */
#ifndef NMOE_EVAL_SCORE_H
#define NMOE_EVAL_SCORE_H

#include <stdint.h>

#include "eval/eval_tasks.h"
#include "model/model.h"
#include "train/metrics.h"

typedef struct EvalResult {
  const char *name;    /* the task's (borrowed from the suite) */
  double acc;          /* correct / n (0 when n is 0) */
  double centered_acc; /* (acc - baseline) / (1 - baseline) */
  int64_t n;           /* examples scored */
} EvalResult;

/* Fills one row: inputs/targets [T] for choice c of e (ignore_id elsewhere). */
void eval_fill_row(const EvalExample *e, int c, int T, int32_t ignore_id, int32_t *inputs,
                   int32_t *targets);

/* Scores every task of s (res[s->n]) with B rows of T tokens per forward.
 * max_time_s > 0 stops the pass (on every rank alike) once that much time has
 * gone; examples not reached are not counted in n. Returns the elapsed ms.
 * Collective. */
double eval_suite_score(Model *m, const EvalSuite *s, int B, int T, double max_time_s,
                        EvalResult *res);

/* Mean centered accuracy (the reference's CORE aggregate). */
double eval_core(const EvalResult *res, int n);

/* Logs eval_choices/{task}/{acc,centered_acc,n} at step into mx (when not
 * NULL) and one info line. */
void eval_report(Metrics *mx, int64_t step, const EvalResult *res, int n);

/* summary.json: {"suite","step","CORE","tasks":[{name,acc,centered_acc,n}],
 * "elapsed_ms"} (caller frees). */
char *eval_summary_json(const char *suite, int64_t step, const EvalResult *res, int n,
                        double elapsed_ms);

#endif

/* eval_tasks.h: multiple-choice eval tasks (reference section 10): the task
 * list TOML, the JSONL examples it points at, fewshot prompts and tokens.
 *
 * Task file (eval_tasks_file):
 *   [[task]]
 *   name = "arith"                 # unique; no commas (eval_tasks lists names)
 *   source = "jsonl:sample/arith.jsonl"  # relative to the task file's directory
 *   fewshot = 0                    # the first k examples become the prompt prefix
 *   scorer = "choices"             # or "span": greedy exact match of an answer
 *   baseline = 0.25                # optional; default 1 / choices of line 1
 * JSONL, one example per line (blank lines skipped):
 *   {"context": "2 + 3 =", "choices": [" 5", " 6"], "label": 0}
 *   {"context": "2 + 3 =", "answer": " 5"}            (span tasks)
 *
 * A scored example's prompt is the fewshot prefix (each of the first k
 * examples as context + correct choice, joined and ended by "\n\n") followed by
 * its own context; each choice is tokenized on its own and appended. */
#ifndef NMOE_EVAL_TASKS_H
#define NMOE_EVAL_TASKS_H

#include <stddef.h>
#include <stdint.h>

#include "core/config.h"
#include "data/tokenizer.h"

typedef struct EvalExample {
  char *prompt;         /* fewshot prefix + context */
  int n_choices;
  char **choices;       /* [n_choices] */
  int label;
  int line;             /* 1-based line in the JSONL file */
  /* Filled by eval_suite_tokenize: */
  int32_t *prompt_ids;  /* [n_prompt] */
  int n_prompt;
  int32_t **choice_ids; /* [n_choices][n_choice_ids[c]] */
  int *n_choice_ids;
} EvalExample;

typedef struct EvalTask {
  char *name;
  char *path;           /* the JSONL file, resolved */
  int fewshot;
  double baseline;      /* default: 1 / choices; 0 for span tasks */
  int span;             /* scorer "span": the answer is the only choice, scored by
                           greedy exact match (every answer token is the argmax) */
  int n;                /* scored examples (after the fewshot ones, within the budget) */
  EvalExample *ex;      /* [n] */
} EvalTask;

typedef struct EvalSuite {
  int n;
  EvalTask *task;       /* [n], in task-file order */
} EvalSuite;

/* Reads tasks_file and the JSONL files of the tasks named by select ("all" or
 * "core": every task; else a comma list of names), keeping at most
 * max_examples scored examples per task (<= 0: all). NULL with one line in err
 * (file:line for a bad JSONL line). */
EvalSuite *eval_suite_load(const char *tasks_file, const char *select, int64_t max_examples,
                           char *err, size_t errlen);
/* Tokenizes every prompt and choice with tok; each id must be < vocab_size and
 * each choice at most seq_len tokens (a row holds the choice and at least one
 * prompt token). 0, or -1 with err naming task and line. */
int eval_suite_tokenize(EvalSuite *s, const Tokenizer *tok, int vocab_size, int seq_len, char *err,
                        size_t errlen);
void eval_suite_free(EvalSuite *s);

/* eval_suite_load + eval_suite_tokenize for a run's config (eval_tasks_file,
 * eval_tasks, eval_budget_max_examples, tokenizer, vocab_size, seq_len);
 * fatal with one line on any problem. */
EvalSuite *eval_suite_open(const Config *cfg);

#endif

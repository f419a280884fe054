/* main.c: `nmoe <command> [args]`: one binary, one dispatch table. Each
 * command lives in its own module and takes argv with argv[0] = command. */
#include <stdio.h>
#include <string.h>

#include "core/log.h"
#include "data/data_cli.h"
#include "data/tokenizer.h"
#include "dist/bench_rdep.h"
#include "dist/launch.h"
#include "eval/eval.h"
#include "train/ckpt.h"
#include "train/train.h"
#include "viz/viz.h"


#define NMOE_VERSION "0.1.0"

static int version_main(int argc, char **argv) {
  (void)argc;
  (void)argv;
  printf("nmoe %s (%s backend%s)\n", NMOE_VERSION, "cpu",
#ifdef NMOE_CUDA
         " + cuda sm_90a"
#else
         ""
#endif
  );
  return 0;
}

static int bench_main(int argc, char **argv) {
  if (argc >= 2 && !strcmp(argv[1], "tokenizer")) return tok_bench_main(argc - 1, argv + 1);
  if (argc >= 2 && !strcmp(argv[1], "train")) return bench_train_main(argc - 1, argv + 1);
  if (argc >= 2 && !strcmp(argv[1], "rdep")) return bench_rdep_main(argc - 1, argv + 1);
  fprintf(stderr, "usage: nmoe bench tokenizer [FILE] [--encoding NAME]\n"
                  "       nmoe bench train CONFIG [--steps N] [--warmup W] [--key=value ...]\n"
                  "       nmoe launch -n N -- nmoe bench rdep [--device cuda|cpu] [--tokens LIST] ...\n");
  return 2;
}

typedef struct Command {
  const char *name;
  int (*fn)(int argc, char **argv);
  const char *help;
} Command;

static const Command COMMANDS[] = {
    {"train", train_main, "train a model: nmoe train CONFIG [--key=value ...]"},
    {"data", data_main, "prepare, verify and inspect token shards (prep|verify|info|inspect|regenerate-index)"},
    {"eval", eval_main, "score multiple-choice tasks on a checkpoint: nmoe eval CONFIG [--checkpoint-dir DIR] [--step N]"},
    {"ckpt", ckpt_main, "inspect checkpoints and move them to another rank count (list|info|verify|reshard)"},
    {"bench", bench_main, "benchmarks printing one JSON line per measurement (tokenizer, train, rdep)"},
    {"launch", launch_main, "run N ranks of a command on this host: nmoe launch -n N [--] CMD [ARGS...]"},
    {"viz", viz_main, "metrics dashboard over HTTP: nmoe viz [--metrics-dir DIR] [--port N]"},
    {"version", version_main, "print the version and compiled backends"},
};

static int usage(FILE *f) {
  fprintf(f, "usage: nmoe <command> [args]   (nmoe <command> --help for details)\n\ncommands:\n");
  for (size_t i = 0; i < sizeof COMMANDS / sizeof COMMANDS[0]; i++)
    fprintf(f, "  %-8s %s\n", COMMANDS[i].name, COMMANDS[i].help);
  return f == stdout ? 0 : 2;
}

int main(int argc, char **argv) {
  if (argc < 2) return usage(stderr);
  if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help"))
    return usage(stdout);
  if (!strcmp(argv[1], "--version")) return version_main(0, NULL);
  for (size_t i = 0; i < sizeof COMMANDS / sizeof COMMANDS[0]; i++)
    if (!strcmp(argv[1], COMMANDS[i].name)) return COMMANDS[i].fn(argc - 1, argv + 1);
  nmoe_fatal("unknown command '%s' (try: nmoe --help)", argv[1]);
}

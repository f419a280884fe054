/* main.c: `nmoe <command>`: dispatches to the command modules. */
#include <stdio.h>
#include <string.h>

#include "core/log.h"

static int usage(void) {
  fprintf(stderr,
          "usage: nmoe <command> [args]\n"
          "commands:\n"
          "  train CONFIG [--key=value ...]   train a model\n"
          "  version                          print the version\n");
  return 2;
}

int main(int argc, char **argv) {
  if (argc < 2) return usage();
  if (!strcmp(argv[1], "version")) {
    printf("nmoe 0.1.0\n");
    return 0;
  }
  return usage();
}

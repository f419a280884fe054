/* data_test_util.h: helpers shared by the data pipeline tests: temporary
 * directories, files, running Debian's python3 (with numpy) on a script, and
 * running `nmoe data ...` (data_main) in a child process to see its exit
 * status and output. Header-only: each test binary is one translation unit. */
#ifndef NMOE_DATA_TEST_UTIL_H
#define NMOE_DATA_TEST_UTIL_H

#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "core/fsutil.h"
#include "data/data_cli.h"

/* A fresh directory under /tmp (removed by rm_tree at the end of a test). */
static char *tmpdir_make(void) {
  char *d = strdup("/tmp/nmoe_data_test_XXXXXX");
  assert_non_null(mkdtemp(d));
  return d;
}

static void rm_tree(char *d) {
  fs_remove_tree(d);
  free(d);
}

static void write_file(const char *path, const void *data, size_t n) {
  FILE *f = fopen(path, "wb");
  assert_non_null(f);
  assert_int_equal(fwrite(data, 1, n, f), n);
  assert_int_equal(fclose(f), 0);
}

/* Runs a python3 (with numpy) script; returns its exit status. */
static int run_python(const char *fmt, ...) {
  char path[] = "/tmp/nmoe_py_XXXXXX";
  int fd = mkstemp(path);
  assert_true(fd >= 0);
  FILE *f = fdopen(fd, "w");
  va_list ap;
  va_start(ap, fmt);
  vfprintf(f, fmt, ap);
  va_end(ap);
  fclose(f);
  char cmd[256];
  snprintf(cmd, sizeof cmd, "/usr/bin/python3 %s", path);
  int st = system(cmd);
  unlink(path);
  return WIFEXITED(st) ? WEXITSTATUS(st) : 128;
}

/* Runs data_main(argv) in a child; its stdout+stderr land in out. */
typedef struct CliResult {
  int status; /* exit status */
  char out[32768];
} CliResult;

static void run_cli(CliResult *r, char **argv) {
  char path[] = "/tmp/nmoe_cli_XXXXXX";
  int fd = mkstemp(path);
  assert_true(fd >= 0);
  fflush(stdout);
  fflush(stderr);
  pid_t pid = fork();
  assert_true(pid >= 0);
  if (pid == 0) {
    dup2(fd, 1);
    dup2(fd, 2);
    int argc = 0;
    while (argv[argc]) argc++;
    int rc = data_main(argc, argv);
    fflush(stdout);
    fflush(stderr);
    _exit(rc);
  }
  int st;
  waitpid(pid, &st, 0);
  r->status = WIFEXITED(st) ? WEXITSTATUS(st) : 128;
  lseek(fd, 0, SEEK_SET);
  ssize_t n = read(fd, r->out, sizeof r->out - 1);
  r->out[n > 0 ? n : 0] = 0;
  close(fd);
  unlink(path);
}

#define CLI(r, ...)                                  \
  do {                                               \
    char *argv_[] = {__VA_ARGS__, NULL};             \
    run_cli((r), argv_);                             \
  } while (0)

/* Points the tokenizer at the repository's vocabularies (tests run from the root). */
static inline void use_repo_tokenizers(void) {
  setenv("NMOE_TOKENIZER_DIR", "tools/node_modules/tiktoken/encoders", 0);
}

#endif

/* log.c: console logging, fatal errors with cleanup hooks, checked allocation. */
#include "core/log.h"

#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MAX_HOOKS 8
typedef struct { FatalHook fn; void *ctx; } Hook;
static Hook hooks[MAX_HOOKS];
static int n_hooks;
static int g_rank = -1;   /* -1: a single process (no rank in messages) */
static int g_info = 1;    /* this process prints info lines */

void log_set_rank(int rank, int world) {
  if (world <= 1) return;
  g_rank = rank;
  const char *all = getenv("NMOE_LOG_ALL_RANKS");
  g_info = rank == 0 || (all && !strcmp(all, "1"));
}

/* "rank R: " in a multi-process run */
static void rank_prefix(FILE *f) {
  if (g_rank >= 0) fprintf(f, "rank %d: ", g_rank);
}

void log_info(const char *fmt, ...) {
  if (!g_info) return;
  va_list ap;
  va_start(ap, fmt);
  vfprintf(stdout, fmt, ap);
  va_end(ap);
  fputc('\n', stdout);
  fflush(stdout);
}

void log_warn(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fputs("nmoe: warning: ", stderr);
  rank_prefix(stderr);
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  fputc('\n', stderr);
}

void nmoe_on_fatal(FatalHook hook, void *ctx) {
  if (n_hooks < MAX_HOOKS) hooks[n_hooks++] = (Hook){hook, ctx};
}

void nmoe_on_fatal_remove(FatalHook hook, void *ctx) {
  for (int i = 0; i < n_hooks; i++)
    if (hooks[i].fn == hook && hooks[i].ctx == ctx) {
      memmove(&hooks[i], &hooks[i + 1], (size_t)(n_hooks - i - 1) * sizeof(Hook));
      n_hooks--;
      return;
    }
}

void nmoe_fatal(const char *fmt, ...) {
  /* One fatal error per process: a second thread failing meanwhile (say a
   * watchdog and the main thread) waits here for the first one's exit. */
  static atomic_flag taken = ATOMIC_FLAG_INIT;
  static _Thread_local int ours; /* a hook of ours failing in turn goes on */
  if (!ours) {
    if (atomic_flag_test_and_set(&taken))
      for (;;) pause();
    ours = 1;
  }
  char msg[2048];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  fflush(stdout);
  fputs("nmoe: error: ", stderr);
  rank_prefix(stderr);
  fprintf(stderr, "%s\n", msg);
  /* Hooks may call nmoe_fatal themselves; take them off the list first. */
  int n = n_hooks;
  n_hooks = 0;
  for (int i = n - 1; i >= 0; i--) hooks[i].fn(msg, hooks[i].ctx);
  exit(1);
}

void *xmalloc(size_t n) {
  void *p = malloc(n ? n : 1);
  if (!p) nmoe_fatal("out of host memory allocating %zu bytes", n);
  return p;
}

void *xcalloc(size_t count, size_t size) {
  void *p = calloc(count ? count : 1, size ? size : 1);
  if (!p) nmoe_fatal("out of host memory allocating %zu x %zu bytes", count, size);
  return p;
}

void *xrealloc(void *p, size_t n) {
  void *q = realloc(p, n ? n : 1);
  if (!q) nmoe_fatal("out of host memory reallocating %zu bytes", n);
  return q;
}

char *xstrdup(const char *s) {
  size_t n = strlen(s) + 1;
  return memcpy(xmalloc(n), s, n);
}

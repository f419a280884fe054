/* log.h: console logging and the error-exit convention.
 *
 * Errors a user can cause (bad config, missing data, corrupt shard, wrong world
 * size) end the process with one clear line through nmoe_fatal(): "nmoe: error:
 * <what>" and exit status 1. Programming errors use NMOE_ASSERT, which names the
 * file and line. Library calls are wrapped by CHECK macros in their modules
 * (CUDA_CHECK, SQL_CHECK, ...) that call nmoe_fatal with a hint. */
#ifndef NMOE_LOG_H
#define NMOE_LOG_H

#include <stdarg.h>
#include <stdio.h>

/* Log to stderr with a "nmoe: " prefix; info goes to stdout. */
void log_info(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* In a multi-process run: info lines come from rank 0 only (every rank with
 * NMOE_LOG_ALL_RANKS=1), warnings and errors from every rank, named. */
void log_set_rank(int rank, int world);
void log_warn(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* One clear line on stderr, then exit(1). Runs registered cleanup hooks first
 * (e.g. marking the run failed in experiments.db). */
void nmoe_fatal(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));

/* Hooks run by nmoe_fatal before exiting, most recent first; at most 8. */
typedef void (*FatalHook)(const char *msg, void *ctx);
void nmoe_on_fatal(FatalHook hook, void *ctx);
void nmoe_on_fatal_remove(FatalHook hook, void *ctx);

#define NMOE_ASSERT(cond)                                                            \
  do {                                                                               \
    if (!(cond)) nmoe_fatal("internal error at %s:%d: assertion '%s' failed",        \
                            __FILE__, __LINE__, #cond);                              \
  } while (0)

/* malloc/calloc/realloc that never return NULL (fatal on exhaustion). */
#include <stddef.h>
void *xmalloc(size_t n);
void *xcalloc(size_t count, size_t size);
void *xrealloc(void *p, size_t n);
char *xstrdup(const char *s);

#endif

/* launch.c: `nmoe launch -n N [--port P] [--] CMD [ARGS...]` (launch.h).
 *
 * Each rank runs in its own process group, so stopping a rank also stops
 * whatever it started (a shell's children), and a terminal's Ctrl-C reaches
 * the ranks once, through the launcher. The launcher blocks SIGCHLD, SIGINT
 * and SIGTERM and takes them with sigtimedwait(): no handler races. A rank
 * whose launcher dies (even by SIGKILL) gets SIGTERM (PR_SET_PDEATHSIG). */
#include "dist/launch.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "dist/store.h"

#define LAUNCH_USAGE "usage: nmoe launch -n N [--port P] [--] CMD [ARGS...]"
#define LAUNCH_MAX_RANKS 1024
#define LAUNCH_GRACE_S 10 /* SIGTERM to SIGKILL */

/* Commands of nmoe itself: `nmoe launch -n 2 train cfg.toml` runs this binary. */
static const char *const NMOE_COMMANDS[] = {"train", "bench", "data", "ckpt", "viz", "version"};

static int usage_error(const char *what, const char *arg) {
  fprintf(stderr, "nmoe launch: %s%s%s (%s)\n", what, arg ? ": " : "", arg ? arg : "", LAUNCH_USAGE);
  return 2;
}

static int parse_count(const char *s, int lo, int hi) {
  char *end;
  long v = strtol(s, &end, 10);
  return (*s && !*end && v >= lo && v <= hi) ? (int)v : -1;
}

static int is_nmoe_command(const char *cmd) {
  if (strchr(cmd, '/')) return 0;
  for (size_t i = 0; i < sizeof NMOE_COMMANDS / sizeof NMOE_COMMANDS[0]; i++)
    if (!strcmp(cmd, NMOE_COMMANDS[i])) return 1;
  return 0;
}

static void set_env_int(const char *name, int v) {
  char s[16];
  snprintf(s, sizeof s, "%d", v);
  setenv(name, s, 1);
}

/* In the child: the rank's environment, then exec; never returns. */
static void exec_rank(int rank, int n, int port, const char *self, char **cmd, pid_t parent,
                      const sigset_t *mask) {
  setpgid(0, 0);
  prctl(PR_SET_PDEATHSIG, SIGTERM);
  if (getppid() != parent) _exit(1); /* the launcher is already gone */
  sigprocmask(SIG_SETMASK, mask, NULL);
  set_env_int("RANK", rank);
  set_env_int("LOCAL_RANK", rank);
  set_env_int("WORLD_SIZE", n);
  set_env_int("LOCAL_WORLD_SIZE", n);
  set_env_int("MASTER_PORT", port);
  setenv("MASTER_ADDR", "127.0.0.1", 0);
  if (self) {
    cmd[-1] = (char *)self; /* argv[0] of nmoe, then the command and its args */
    execv(self, cmd - 1);
  } else {
    execvp(cmd[0], cmd);
  }
  fprintf(stderr, "nmoe launch: rank %d: cannot run %s: %s\n", rank, self ? self : cmd[0],
          strerror(errno));
  _exit(127);
}

/* Signals every rank still running (its whole process group). */
static void signal_ranks(const pid_t *pids, int n, int sig) {
  for (int i = 0; i < n; i++)
    if (pids[i] > 0 && kill(-pids[i], sig) && errno == ESRCH) kill(pids[i], sig);
}

int launch_main(int argc, char **argv) {
  int n = 0, port = 0, i = 1;
  for (; i < argc; i++) {
    const char *a = argv[i];
    if (!strcmp(a, "--")) {
      i++;
      break;
    }
    if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
      printf("%s\nRuns CMD as ranks 0..N-1 of one job on this host (RANK, LOCAL_RANK, WORLD_SIZE,\n"
             "LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT). CMD may be an nmoe command (train ...).\n",
             LAUNCH_USAGE);
      return 0;
    }
    if (!strcmp(a, "-n") || !strcmp(a, "--port")) {
      if (i + 1 >= argc) return usage_error("missing value after", a);
      int v = parse_count(argv[++i], 1, a[1] == 'n' ? LAUNCH_MAX_RANKS : 65534);
      if (v < 0) return usage_error(a[1] == 'n' ? "-n wants a rank count from 1 to 1024"
                                                : "--port wants a port number",
                                    argv[i]);
      *(a[1] == 'n' ? &n : &port) = v;
      continue;
    }
    if (a[0] == '-') return usage_error("unknown option", a);
    break;
  }
  if (n == 0) return usage_error("missing -n N", NULL);
  if (i >= argc) return usage_error("missing the command to run", NULL);
  char **cmd = argv + i; /* argv[i - 1] exists (at least "-n"), so cmd[-1] is ours to reuse */

  char self_buf[4096], *self = NULL;
  if (is_nmoe_command(cmd[0])) {
    ssize_t k = readlink("/proc/self/exe", self_buf, sizeof self_buf - 1);
    if (k <= 0) {
      fprintf(stderr, "nmoe launch: cannot find the nmoe binary: %s\n", strerror(errno));
      return 1;
    }
    self_buf[k] = 0;
    self = self_buf;
  }
  if (!port && (port = store_pick_port(2)) < 0) {
    fprintf(stderr, "nmoe launch: found no free pair of ports for the rendezvous\n");
    return 1;
  }

  sigset_t set, old;
  sigemptyset(&set);
  sigaddset(&set, SIGCHLD);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  sigprocmask(SIG_BLOCK, &set, &old);
  fflush(NULL);
  pid_t *pids = calloc((size_t)n, sizeof *pids), me = getpid();
  if (!pids) {
    fprintf(stderr, "nmoe launch: out of memory\n");
    return 1;
  }
  int live = 0, status = 0, stopping = 0;
  struct timespec kill_at = {0};
  for (int r = 0; r < n; r++) {
    pid_t p = fork();
    if (p == 0) exec_rank(r, n, port, self, cmd, me, &old);
    if (p < 0) {
      fprintf(stderr, "nmoe launch: cannot start rank %d: %s\n", r, strerror(errno));
      status = 1;
      break;
    }
    setpgid(p, p); /* also here: no window where a signal to the group misses it */
    pids[r] = p;
    live++;
  }
  if (status) {
    stopping = 1;
    signal_ranks(pids, n, SIGTERM);
    clock_gettime(CLOCK_MONOTONIC, &kill_at);
    kill_at.tv_sec += LAUNCH_GRACE_S;
  }

  while (live > 0) {
    int ws;
    pid_t p;
    while ((p = waitpid(-1, &ws, WNOHANG)) > 0) {
      int r = 0;
      while (r < n && pids[r] != p) r++;
      if (r == n) continue;
      pids[r] = 0;
      live--;
      int code = WIFEXITED(ws) ? WEXITSTATUS(ws) : 128 + WTERMSIG(ws);
      if (code == 0 || stopping) continue;
      if (WIFSIGNALED(ws))
        fprintf(stderr, "nmoe launch: rank %d exited with status %d (signal %d)\n", r, code,
                WTERMSIG(ws));
      else
        fprintf(stderr, "nmoe launch: rank %d exited with status %d\n", r, code);
      status = code;
      stopping = 1;
      signal_ranks(pids, n, SIGTERM);
      clock_gettime(CLOCK_MONOTONIC, &kill_at);
      kill_at.tv_sec += LAUNCH_GRACE_S;
    }
    if (live == 0) break;
    struct timespec now, wait = {1, 0};
    if (stopping) {
      clock_gettime(CLOCK_MONOTONIC, &now);
      long long left_ns = (kill_at.tv_sec - now.tv_sec) * 1000000000LL + (kill_at.tv_nsec - now.tv_nsec);
      if (left_ns <= 0) {
        signal_ranks(pids, n, SIGKILL);
        left_ns = 1000000000LL;
      }
      if (left_ns < 1000000000LL) wait = (struct timespec){0, (long)left_ns};
    }
    int sig = sigtimedwait(&set, NULL, &wait);
    if (sig == SIGINT || sig == SIGTERM) signal_ranks(pids, n, sig);
  }
  free(pids);
  sigprocmask(SIG_SETMASK, &old, NULL);
  return status;
}

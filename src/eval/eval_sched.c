/* eval_sched.c: scheduled eval of finalised checkpoints (eval_enabled): the
 * training process (rank 0) hands each step to `nmoe eval`, run inline, on a
 * reserved GPU, or queued as a ticket for a Kubernetes Job (see eval.h). */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "core/fsutil.h"
#include "core/json.h"
#include "core/log.h"
#include "eval/eval.h"

extern char **environ;

void eval_check_mode(const Config *cfg) {
  const char *m = cfg->eval_mode;
  if (strcmp(m, "inline") && strcmp(m, "reserved_gpu") && strcmp(m, "k8s_job"))
    nmoe_fatal("eval_mode must be inline, reserved_gpu or k8s_job (got '%s')", m);
  if (!strcmp(m, "reserved_gpu") && cfg->eval_reserved_gpu_id < 0)
    nmoe_fatal("eval_reserved_gpu_id must be a GPU index >= 0 for eval_mode = reserved_gpu (got %lld)",
               (long long)cfg->eval_reserved_gpu_id);
}

/* Reaps finished detached evals: the trainer may be init (PID 1 of a
 * container), which inherits them. */
static void reap_evals(void) {
  while (waitpid(-1, NULL, WNOHANG) > 0) {}
}

/* Absolute form of an existing path (the path itself if that fails). */
static void abs_path(const char *p, char *out, size_t n) {
  char buf[PATH_MAX];
  snprintf(out, n, "%s", realpath(p, buf) ? buf : p);
}

/* The resolved config as TOML text (caller frees). */
static char *config_text(const Config *cfg, size_t *len) {
  char *text = NULL;
  FILE *f = open_memstream(&text, len);
  if (!f) nmoe_fatal("eval: open_memstream: %s", strerror(errno));
  config_print(cfg, f);
  fclose(f);
  return text;
}

/* Starts `nmoe eval` on step with output to log_path; cuda_dev >= 0 sets
 * CUDA_VISIBLE_DEVICES and detaches the process (a grandchild that init
 * reaps). Returns the child's pid (detached: 0) or -1. Everything the child
 * needs is built before fork: only exec-safe calls run after it. */
static pid_t spawn_eval(const Config *cfg, const char *cfg_path, int64_t step, const char *out,
                        const char *log_path, int cuda_dev) {
  char stepbuf[32], dev[64], exe[PATH_MAX];
  snprintf(stepbuf, sizeof stepbuf, "%lld", (long long)step);
  /* The binary's real path, so the process shows as nmoe (not "exe"). */
  ssize_t el = readlink("/proc/self/exe", exe, sizeof exe - 1);
  if (el <= 0) snprintf(exe, sizeof exe, "/proc/self/exe");
  else exe[el] = 0;
  char *argv[] = {"nmoe", "eval", (char *)cfg_path, "--checkpoint-dir", cfg->checkpoint_dir,
                  "--step", stepbuf, "--tasks", cfg->eval_tasks, "--out", (char *)out, NULL};
  size_t ne = 0;
  while (environ[ne]) ne++;
  char **envp = xcalloc(ne + 2, sizeof *envp);
  size_t k = 0;
  /* NMOE_<FIELD> overrides are left out: the config snapshot holds the
   * values this run resolved, and must not be overridden again. */
  for (size_t i = 0; i < ne; i++)
    if ((cuda_dev < 0 || strncmp(environ[i], "CUDA_VISIBLE_DEVICES=", 21)) &&
        !config_env_is_override(environ[i]))
      envp[k++] = environ[i];
  if (cuda_dev >= 0) {
    snprintf(dev, sizeof dev, "CUDA_VISIBLE_DEVICES=%d", cuda_dev);
    envp[k++] = dev;
  }
  int fd = open(log_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) {
    log_warn("eval: cannot open %s: %s", log_path, strerror(errno));
    free(envp);
    return -1;
  }
  fflush(NULL);
  pid_t pid = fork();
  if (pid == 0) {
    if (cuda_dev >= 0) {
      setsid(); /* out of the trainer's process group: its signals are not the eval's */
      if (fork() != 0) _exit(0);
    }
    if (dup2(fd, 1) < 0 || dup2(fd, 2) < 0) _exit(127);
    execve(exe, argv, envp);
    _exit(127);
  }
  close(fd);
  free(envp);
  if (pid < 0) {
    log_warn("eval: fork: %s", strerror(errno));
    return -1;
  }
  if (cuda_dev >= 0) { /* the intermediate child exits at once */
    int st;
    while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {}
    return 0;
  }
  return pid;
}

static void run_inline(const Config *cfg, const char *cfg_path, int64_t step, const char *out,
                       const char *log_path) {
  pid_t pid = spawn_eval(cfg, cfg_path, step, out, log_path, -1);
  if (pid < 0) return;
  int st = 0;
  while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {}
  if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
    log_warn("eval of step %lld failed (%s %d): see %s", (long long)step,
             WIFEXITED(st) ? "exit status" : "signal", WIFEXITED(st) ? WEXITSTATUS(st) : WTERMSIG(st),
             log_path);
    return;
  }
  char err[512];
  Json *j = json_parse_file(out, err, sizeof err);
  if (!j) {
    log_warn("eval of step %lld: %s", (long long)step, err);
    return;
  }
  log_info("eval of step %lld: CORE %.4f (%s)", (long long)step, json_get_num(j, "CORE", 0), out);
  json_free(j);
}

static void write_ticket(const Config *cfg, const char *root, const char *cfg_path, int64_t step,
                         const char *out) {
  char dir[PATH_MAX + 16], path[PATH_MAX + 64], ck[PATH_MAX], err[512];
  snprintf(dir, sizeof dir, "%s/queue", root);
  if (fs_mkdirs(dir, err, sizeof err)) {
    log_warn("eval: %s", err);
    return;
  }
  abs_path(cfg->checkpoint_dir, ck, sizeof ck);
  JsonW w;
  jw_init(&w, 2);
  jw_obj(&w, NULL);
  char cwd[PATH_MAX];
  jw_str(&w, "config", cfg_path);
  /* relative paths inside the config (tasks file, data) are the trainer's */
  jw_str(&w, "cwd", getcwd(cwd, sizeof cwd) ? cwd : ".");
  jw_str(&w, "checkpoint_dir", ck);
  jw_int(&w, "step", step);
  jw_str(&w, "tasks", cfg->eval_tasks);
  jw_str(&w, "out", out);
  jw_obj_end(&w);
  char *json = jw_finish(&w);
  snprintf(path, sizeof path, "%s/ticket_%lld.json", dir, (long long)step);
  if (fs_write_atomic(path, json, strlen(json), err, sizeof err)) log_warn("eval: %s", err);
  else log_info("eval of step %lld queued: %s", (long long)step, path);
  free(json);
}

void eval_schedule(const Config *cfg, const char *run_id, int64_t step) {
  reap_evals();
  char rel[PATH_MAX - 32], root[PATH_MAX], dir[PATH_MAX], sdir[PATH_MAX], err[512];
  snprintf(rel, sizeof rel, "%s/eval/%s", cfg->metrics_dir, run_id);
  snprintf(sdir, sizeof sdir, "%s/step_%07lld", rel, (long long)step);
  if (fs_mkdirs(sdir, err, sizeof err)) {
    log_warn("eval: %s", err);
    return;
  }
  abs_path(sdir, dir, sizeof dir);
  abs_path(rel, root, sizeof root);
  char cfg_path[PATH_MAX + 32], out[PATH_MAX + 32], log_path[PATH_MAX + 32];
  snprintf(cfg_path, sizeof cfg_path, "%s/config.toml", dir);
  snprintf(out, sizeof out, "%s/summary.json", dir);
  snprintf(log_path, sizeof log_path, "%s/eval.log", dir);
  size_t len;
  char *text = config_text(cfg, &len);
  int rc = fs_write_atomic(cfg_path, text, len, err, sizeof err);
  free(text);
  if (rc) {
    log_warn("eval: %s", err);
    return;
  }
  if (!strcmp(cfg->eval_mode, "inline")) run_inline(cfg, cfg_path, step, out, log_path);
  else if (!strcmp(cfg->eval_mode, "reserved_gpu")) {
    if (spawn_eval(cfg, cfg_path, step, out, log_path, (int)cfg->eval_reserved_gpu_id) == 0)
      log_info("eval of step %lld started on GPU %lld: %s", (long long)step,
               (long long)cfg->eval_reserved_gpu_id, out);
  } else write_ticket(cfg, root, cfg_path, step, out);
}

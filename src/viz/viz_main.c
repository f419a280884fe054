/* viz_main.c: `nmoe viz`: options, start-up checks, signals, then the HTTP
 * server over viz_handle (see viz.h).
 *
 * Where the files are: --metrics-dir / --experiments-db, else the
 * metrics_dir / experiments_db of --config TOML, else NVIZ_METRICS_DIR /
 * NVIZ_EXPERIMENTS_DB, else the training defaults (/data/metrics,
 * /data/experiments.db). The server listens on loopback unless --bind says
 * otherwise, and stops cleanly on SIGINT or SIGTERM. */
#include <signal.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/config.h"
#include "core/fsutil.h"
#include "core/log.h"
#include "viz/viz.h"

static HttpServer *g_server; // for the signal handler

static void on_signal(int sig) {
  (void)sig;
  if (g_server) http_stop(g_server);
}

static void usage(FILE *f) {
  fprintf(f,
          "usage: nmoe viz [--config TOML] [--metrics-dir DIR] [--experiments-db PATH]\n"
          "                [--bind ADDR] [--port N] [--once-port-file PATH]\n"
          "  Serves the metrics dashboard at http://ADDR:N/ (default 127.0.0.1:8080).\n"
          "  --port 0 picks a free port; --once-port-file writes the port to PATH.\n");
}

/* The value of option name at argv[*i] ("--name VALUE" or "--name=VALUE"),
 * advancing *i; NULL when argv[*i] is another option. */
static const char *opt_value(int argc, char **argv, int *i, const char *name) {
  size_t n = strlen(name);
  if (strncmp(argv[*i], name, n)) return NULL;
  if (argv[*i][n] == '=') return argv[*i] + n + 1;
  if (argv[*i][n]) return NULL;
  if (*i + 1 >= argc) nmoe_fatal("viz: %s needs a value (see nmoe viz --help)", name);
  return argv[++*i];
}

/* A readable experiments database has a runs table; a missing one is fine
 * (the trainer creates it when a run starts). */
static void check_experiments_db(const char *path) {
  if (!fs_exists(path)) {
    log_warn("viz: experiments database %s does not exist yet; runs are listed from the metrics directory",
             path);
    return;
  }
  sqlite3 *db = NULL;
  int rc = sqlite3_open_v2(path, &db, SQLITE_OPEN_READONLY, NULL);
  if (rc == SQLITE_OK) rc = sqlite3_busy_timeout(db, 2000);
  if (rc == SQLITE_OK) rc = sqlite3_exec(db, "SELECT count(*) FROM runs", NULL, NULL, NULL);
  if (rc != SQLITE_OK) {
    char msg[512];
    snprintf(msg, sizeof msg, "%s", db ? sqlite3_errmsg(db) : sqlite3_errstr(rc));
    sqlite3_close(db);
    nmoe_fatal("viz: %s is not a readable experiments database: %s", path, msg);
  }
  sqlite3_close(db);
}

int viz_main(int argc, char **argv) {
  const char *metrics_dir = NULL, *experiments_db = NULL, *config = NULL, *bind = "127.0.0.1";
  const char *port_s = "8080", *port_file = NULL, *v;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
      usage(stdout);
      return 0;
    }
    if ((v = opt_value(argc, argv, &i, "--metrics-dir"))) metrics_dir = v;
    else if ((v = opt_value(argc, argv, &i, "--experiments-db"))) experiments_db = v;
    else if ((v = opt_value(argc, argv, &i, "--config"))) config = v;
    else if ((v = opt_value(argc, argv, &i, "--bind"))) bind = v;
    else if ((v = opt_value(argc, argv, &i, "--port"))) port_s = v;
    else if ((v = opt_value(argc, argv, &i, "--once-port-file"))) port_file = v;
    else nmoe_fatal("viz: unknown argument '%s' (see nmoe viz --help)", argv[i]);
  }
  char *end;
  long port = strtol(port_s, &end, 10);
  if (!*port_s || *end || port < 0 || port > 65535)
    nmoe_fatal("viz: invalid port '%s' (0..65535; 0 picks a free one)", port_s);

  char err[1024];
  Config cfg;
  config_defaults(&cfg);
  if (config && config_load(&cfg, config, 0, NULL, err, sizeof err)) nmoe_fatal("%s", err);
  const char *env_m = getenv("NVIZ_METRICS_DIR"), *env_x = getenv("NVIZ_EXPERIMENTS_DB");
  if (!metrics_dir) metrics_dir = config || !env_m || !*env_m ? cfg.metrics_dir : env_m;
  if (!experiments_db) experiments_db = config || !env_x || !*env_x ? cfg.experiments_db : env_x;
  if (!fs_is_dir(metrics_dir))
    nmoe_fatal("viz: metrics directory '%s' does not exist or is not a directory (see --metrics-dir)",
               metrics_dir);
  check_experiments_db(experiments_db);

  VizConfig vc = {metrics_dir, experiments_db};
  HttpServer *s = http_listen(bind, (int)port, err, sizeof err);
  if (!s) nmoe_fatal("viz: %s", err);
  char line[32];
  int n = snprintf(line, sizeof line, "%d\n", http_port(s));
  if (port_file && fs_write_atomic(port_file, line, (size_t)n, err, sizeof err)) nmoe_fatal("viz: %s", err);

  g_server = s;
  struct sigaction sa = {.sa_handler = on_signal};
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, NULL);
  sigaction(SIGTERM, &sa, NULL);
  signal(SIGPIPE, SIG_IGN);
  const char *fmt = strchr(bind, ':') ? "viz: serving http://[%s]:%d/ (metrics %s, experiments %s)"
                                      : "viz: serving http://%s:%d/ (metrics %s, experiments %s)";
  log_info(fmt, bind, http_port(s), metrics_dir, experiments_db);
  int rc = http_serve(s, viz_handle, &vc, err, sizeof err);
  g_server = NULL;
  http_close(s);
  if (rc) nmoe_fatal("viz: %s", err);
  log_info("viz: stopped");
  config_free(&cfg);
  return 0;
}

/* test_viz.c: the `nmoe viz` dashboard.
 *
 * LTTB on known series (ends kept, extremes picked, exact counts); the API
 * handlers called directly on a fixture written with the real metrics.c
 * writer (two ranks, an experiments.db, a metrics-only run): runs list,
 * tags, series merging and downsampling, summary, router table, experiment
 * rows and every error status; and raw HTTP round trips against the server
 * on a free loopback port (health, 404, "..", oversized, malformed, POST,
 * HEAD). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <arpa/inet.h>
#include <cmocka.h>
#include <math.h>
#include <pthread.h>
#include <sys/socket.h>
#include <unistd.h>

#include "core/fsutil.h"
#include "core/json.h"
#include "core/log.h"
#include "train/metrics.h"
#include "viz/lttb.h"
#include "viz/viz.h"

/* ------------------------------------------------------------------- LTTB */

static void check_selection(const int *idx, int k, int n, int m) {
  assert_int_equal(k, n < m ? n : m);
  assert_int_equal(idx[0], 0);
  if (m >= 2) assert_int_equal(idx[k - 1], n - 1);
  for (int i = 1; i < k; i++) assert_true(idx[i] > idx[i - 1]);
}

static void test_lttb_counts_and_ends(void **state) {
  const int ns[] = {1, 2, 5, 11, 100, 1001, 4099}, ms[] = {2, 3, 7, 10, 50, 5000};
  double x[4099], y[4099];
  int idx[4099];
  for (int i = 0; i < 4099; i++) x[i] = i, y[i] = sin(i * 0.37) + 0.01 * i;
  for (size_t a = 0; a < sizeof ns / sizeof *ns; a++)
    for (size_t b = 0; b < sizeof ms / sizeof *ms; b++)
      check_selection(idx, lttb_select(x, y, ns[a], ms[b], idx), ns[a], ms[b]);
  assert_int_equal(lttb_select(x, y, 0, 10, idx), 0);
}

static void test_lttb_picks_extremes(void **state) {
  // Flat with one spike and one dip: both must survive 100 -> 10.
  double x[100], y[100];
  int idx[10];
  for (int i = 0; i < 100; i++) x[i] = i, y[i] = 0;
  y[37] = 10;
  y[70] = -10;
  int k = lttb_select(x, y, 100, 10, idx);
  check_selection(idx, k, 100, 10);
  int spike = 0, dip = 0;
  for (int i = 0; i < k; i++) spike |= idx[i] == 37, dip |= idx[i] == 70;
  assert_true(spike && dip);
  // One bucket (n = 5, m = 3): the point farthest from the line to the last point.
  double x5[] = {0, 1, 2, 3, 4}, y5[] = {0, 1, 0, 5, 0};
  int i5[3];
  assert_int_equal(lttb_select(x5, y5, 5, 3, i5), 3);
  assert_int_equal(i5[0], 0);
  assert_int_equal(i5[1], 3);
  assert_int_equal(i5[2], 4);
}

/* ---------------------------------------------------------------- fixture */

static char g_dir[64];
static char g_metrics[128], g_db[128];
static VizConfig g_cfg;

static double loss_at(int rank, int step) { return step == 777 ? 50.0 : 10.0 / (1 + step * 0.01) + rank; }

static void write_rank(const char *run, int rank, int steps) {
  char err[1024];
  Metrics *m = metrics_open(g_metrics, run, rank, err, sizeof err);
  if (!m) fail_msg("%s", err);
  for (int s = 1; s <= steps; s++) {
    metrics_log(m, "train/loss", s, loss_at(rank, s));
    metrics_log(m, "optimizer/lr", s, 1e-3 * s / steps);
    char tag[64];
    snprintf(tag, sizeof tag, "throughput/r%d/tokens_per_s", rank);
    metrics_log(m, tag, s, 1000.0 * (rank + 1) + s);
    if (s % 10 == 0) {
      metrics_log(m, "throughput/tokens_per_s_gpu", s, 5000 + s);
      for (int layer = 1; layer <= 2; layer++) {
        const char *names[] = {"cv", "entropy", "max_load", "bias_range", "experts_active"};
        for (int k = 0; k < 5; k++) {
          snprintf(tag, sizeof tag, "router/layer_%02d/%s", layer, names[k]);
          metrics_log(m, tag, s, 100 * layer + k + s / 1000.0);
        }
      }
      metrics_log(m, "router_agg/mean_cv", s, 42 + s);
    }
    if (s % 100 == 0) metrics_log(m, "validation/loss", s, 3.0 + 1.0 / s);
  }
  if (metrics_flush(m, err, sizeof err)) fail_msg("%s", err);
  metrics_close(m);
}

/* alpha: completed, 2 ranks x 2000 steps; beta: running, no metrics yet;
 * gamma: a metrics directory with no experiments row. */
static int fixture_setup(void **state) {
  strcpy(g_dir, "/tmp/nmoe_viz_XXXXXX");
  if (!mkdtemp(g_dir)) return -1;
  snprintf(g_metrics, sizeof g_metrics, "%s/metrics", g_dir);
  snprintf(g_db, sizeof g_db, "%s/experiments.db", g_dir);
  g_cfg = (VizConfig){g_metrics, g_db};
  char err[1024];
  Experiments *x = experiments_open(g_db, err, sizeof err);
  if (!x || experiments_run_start(x, "alpha", "exp1", "{\"dim\":8,\"name\":\"a\"}", "abc", 0, err, sizeof err) ||
      experiments_run_end(x, "alpha", "completed", "{\"final_loss\":1.5}", err, sizeof err) ||
      experiments_run_start(x, "beta", "exp1", "{}", "abc", 1, err, sizeof err)) {
    fprintf(stderr, "%s\n", err);
    return -1;
  }
  experiments_close(x);
  write_rank("alpha", 0, 2000);
  write_rank("alpha", 1, 2000);
  write_rank("gamma", 0, 5);
  return 0;
}

static int fixture_teardown(void **state) {
  fs_remove_tree(g_dir);
  return 0;
}

/* Calls the handler; checks the status and that the body is JSON. */
static Json *call(const char *method, const char *target, int want) {
  HttpResponse r = {0};
  viz_handle(&g_cfg, method, target, &r);
  if (r.status != want) fail_msg("%s %s -> %d, expected %d: %.300s", method, target, r.status, want, r.body);
  assert_string_equal(r.content_type, "application/json");
  char err[256];
  Json *j = json_parse(r.body, r.len, err, sizeof err);
  if (!j) fail_msg("%s: %s", target, err);
  if (want != 200) assert_non_null(json_get_str(j, "error", NULL));
  free(r.body);
  return j;
}

static const Json *find_run(const Json *runs, const char *id) {
  for (int i = 0; i < runs->n; i++)
    if (!strcmp(json_get_str(runs->items[i], "run", ""), id)) return runs->items[i];
  fail_msg("run %s not listed", id);
  return NULL;
}

static void test_api_runs(void **state) {
  Json *j = call("GET", "/api/runs", 200);
  const Json *runs = json_get(j, "runs");
  assert_int_equal(runs->n, 3);
  const Json *a = find_run(runs, "alpha"), *b = find_run(runs, "beta"), *g = find_run(runs, "gamma");
  assert_string_equal(json_get_str(a, "status", ""), "completed");
  assert_string_equal(json_get_str(a, "experiment_id", ""), "exp1");
  assert_non_null(json_get_str(a, "ended_at", NULL));
  assert_int_equal(json_get_int(a, "last_step", -1), 2000);
  assert_true(json_get_int(a, "last_ts", 0) > 1600000000000LL);
  assert_int_equal(json_get_int(a, "ranks", 0), 2);
  assert_string_equal(json_get_str(b, "status", ""), "running");
  assert_int_equal(json_get(b, "last_step")->type, JSON_NULL);
  assert_int_equal(json_get_int(b, "ranks", -1), 0);
  assert_int_equal(json_get(g, "status")->type, JSON_NULL);
  assert_int_equal(json_get_int(g, "last_step", -1), 5);
  json_free(j);
  j = call("GET", "/api/health", 200);
  assert_true(json_get_bool(j, "ok", false));
  assert_true(json_get_bool(j, "experiments_db_present", false));
  json_free(j);
}

static void test_api_tags(void **state) {
  Json *j = call("GET", "/api/tags?run=alpha", 200);
  const Json *tags = json_get(j, "tags");
  // 3 shared + 2 per-rank + tokens_per_s_gpu + 10 router + router_agg + validation, each once.
  assert_int_equal(tags->n, 3 + 1 + 10 + 1 + 1 + 1);
  int r0 = 0, r1 = 0;
  for (int i = 0; i < tags->n; i++) {
    if (i) assert_true(strcmp(tags->items[i - 1]->str, tags->items[i]->str) < 0);
    r0 |= !strcmp(tags->items[i]->str, "throughput/r0/tokens_per_s");
    r1 |= !strcmp(tags->items[i]->str, "throughput/r1/tokens_per_s");
  }
  assert_true(r0 && r1);
  json_free(j);
}

static void test_api_series(void **state) {
  Json *j = call("GET", "/api/series?run=alpha&tag=train%2Floss&points=100", 200);
  assert_int_equal(json_get_int(j, "total", 0), 2000);
  assert_int_equal(json_get_int(j, "rank", -1), 0);
  const Json *pts = json_get(j, "points");
  assert_int_equal(pts->n, 100);
  assert_int_equal(pts->items[0]->items[0]->i, 1);
  assert_int_equal(pts->items[99]->items[0]->i, 2000);
  int spike = 0;
  for (int i = 0; i < pts->n; i++) {
    int64_t step = pts->items[i]->items[0]->i;
    // Non-per-rank tags come from rank 0 (rank 1's losses are 1 higher).
    assert_true(fabs(pts->items[i]->items[1]->num - loss_at(0, (int)step)) < 1e-12);
    spike |= step == 777;
  }
  assert_true(spike);
  json_free(j);
  // Per-rank tags come from their own rank's file; short series are not thinned.
  j = call("GET", "/api/series?run=alpha&tag=throughput/r1/tokens_per_s&points=5000", 200);
  assert_int_equal(json_get_int(j, "rank", -1), 1);
  pts = json_get(j, "points");
  assert_int_equal(pts->n, 2000);
  assert_true(pts->items[0]->items[1]->num == 2001.0);
  json_free(j);
  // A tag not (yet) logged: an empty series, not an error.
  j = call("GET", "/api/series?run=alpha&tag=nope/never", 200);
  assert_int_equal(json_get(j, "points")->n, 0);
  json_free(j);
  // A run known only from experiments.db has no points yet.
  j = call("GET", "/api/series?run=beta&tag=train/loss", 200);
  assert_int_equal(json_get_int(j, "total", -1), 0);
  json_free(j);
}

static void test_api_summary_and_router(void **state) {
  Json *j = call("GET", "/api/summary?run=al%70ha", 200);
  assert_int_equal(json_get_int(j, "step", 0), 2000);
  assert_true(json_get_num(j, "loss", 0) == loss_at(0, 2000));
  assert_true(fabs(json_get_num(j, "lr", 0) - 1e-3) < 1e-15);
  assert_true(json_get_num(j, "tokens_per_s", 0) == 7000);
  assert_int_equal(json_get_int(j, "val_step", 0), 2000);
  assert_true(json_get_num(j, "val_loss", 0) == 3.0 + 1.0 / 2000);
  assert_int_equal(json_get(j, "mfu")->type, JSON_NULL);
  json_free(j);
  j = call("GET", "/api/router?run=alpha", 200);
  assert_int_equal(json_get_int(j, "step", 0), 2000);
  const Json *layers = json_get(j, "layers"), *metrics = json_get(j, "metrics");
  assert_int_equal(metrics->n, 5);
  assert_int_equal(layers->n, 2);
  for (int l = 0; l < 2; l++) {
    assert_int_equal(json_get_int(layers->items[l], "layer", 0), l + 1);
    const char *names[] = {"cv", "entropy", "max_load", "bias_range", "experts_active"};
    for (int k = 0; k < 5; k++)
      assert_true(json_get_num(layers->items[l], names[k], -1) == 100 * (l + 1) + k + 2.0);
  }
  assert_true(json_get_num(json_get(j, "agg"), "mean_cv", 0) == 2042);
  json_free(j);
  // A run without router metrics: an empty table.
  j = call("GET", "/api/router?run=gamma", 200);
  assert_int_equal(json_get(j, "layers")->n, 0);
  assert_int_equal(json_get(j, "step")->type, JSON_NULL);
  json_free(j);
}

static void test_api_experiments(void **state) {
  Json *j = call("GET", "/api/experiments", 200);
  const Json *e = json_get(j, "experiments");
  assert_int_equal(e->n, 1);
  assert_string_equal(json_get_str(e->items[0], "id", ""), "exp1");
  assert_int_equal(json_get_int(e->items[0], "runs", 0), 2);
  json_free(j);
  j = call("GET", "/api/experiments/run?run=alpha", 200);
  const Json *run = json_get(j, "run");
  assert_int_equal(json_get_int(json_get(run, "config_json"), "dim", 0), 8);
  assert_true(json_get_num(json_get(run, "results_json"), "final_loss", 0) == 1.5);
  assert_string_equal(json_get_str(run, "git_hash", ""), "abc");
  json_free(j);
  json_free(call("GET", "/api/experiments/run?run=gamma", 404));
}

static void test_api_errors(void **state) {
  const char *bad[] = {
      "/api/series?run=alpha&tag=train/loss&points=9",    "/api/series?run=alpha&tag=train/loss&points=5001",
      "/api/series?run=alpha&tag=train/loss&points=abc",  "/api/series?run=alpha&tag=train/loss&points=",
      "/api/series?run=alpha",                            "/api/summary",
      "/api/summary?run=../alpha",                        "/api/summary?run=.hidden",
      "/api/summary?run=a%2Fb",                           "/api/tags?run=bad%zz",
      "/../etc/passwd",                                   "/api/%2e%2e/x",
  };
  for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) json_free(call("GET", bad[i], 400));
  json_free(call("GET", "/api/summary?run=unknown", 404));
  json_free(call("GET", "/api/series?run=unknown&tag=train/loss", 404));
  json_free(call("GET", "/api/nope", 404));
  json_free(call("GET", "/index.php", 404));
  json_free(call("POST", "/api/runs", 405));
  HttpResponse r = {0};
  viz_handle(&g_cfg, "GET", "/", &r);
  assert_int_equal(r.status, 200);
  assert_string_equal(r.content_type, "text/html; charset=utf-8");
  assert_true(r.body_static && r.len == strlen(VIZ_PAGE));
  assert_non_null(strstr(VIZ_PAGE, "visibilityState"));
}

/* A missing experiments.db is not an error: runs come from the metrics dir. */
static void test_api_without_experiments_db(void **state) {
  char missing[160];
  snprintf(missing, sizeof missing, "%s/none.db", g_dir);
  VizConfig saved = g_cfg;
  g_cfg.experiments_db = missing;
  Json *j = call("GET", "/api/runs", 200);
  assert_int_equal(json_get(j, "runs")->n, 2);
  json_free(j);
  j = call("GET", "/api/experiments", 200);
  assert_int_equal(json_get(j, "experiments")->n, 0);
  json_free(j);
  json_free(call("GET", "/api/summary?run=beta", 404));
  g_cfg = saved;
}

/* ------------------------------------------------------------ HTTP server */

typedef struct Served {
  HttpServer *s;
  int rc;
} Served;

static void *serve_thread(void *arg) {
  Served *sv = arg;
  char err[256];
  sv->rc = http_serve(sv->s, viz_handle, &g_cfg, err, sizeof err);
  return NULL;
}

/* Sends req raw to the port and returns everything read until close. */
static char *roundtrip(int port, const char *req, size_t reqlen) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  assert_true(fd >= 0);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
  inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
  assert_int_equal(connect(fd, (struct sockaddr *)&a, sizeof a), 0);
  // The server may answer (and stop reading) before an oversized request is all sent.
  for (size_t off = 0; off < reqlen;) {
    ssize_t k = send(fd, req + off, reqlen - off, MSG_NOSIGNAL);
    if (k <= 0) break;
    off += (size_t)k;
  }
  size_t n = 0, cap = 1 << 16;
  char *buf = xmalloc(cap + 1);
  for (ssize_t k; (k = recv(fd, buf + n, cap - n, 0)) > 0;) {
    n += (size_t)k;
    if (n == cap) buf = xrealloc(buf, (cap *= 2) + 1);
  }
  buf[n] = 0;
  close(fd);
  return buf;
}

/* Checks the status line and Content-Length against the body; returns the body. */
static const char *expect_status(const char *resp, const char *status_line) {
  if (strncmp(resp, status_line, strlen(status_line))) fail_msg("got '%.80s', expected '%s'", resp, status_line);
  const char *body = strstr(resp, "\r\n\r\n");
  const char *cl = strstr(resp, "Content-Length: ");
  assert_non_null(body);
  assert_non_null(cl);
  body += 4;
  if (*body) assert_int_equal(strtoul(cl + 16, NULL, 10), strlen(body)); // HEAD has none
  return body;
}

static void test_http_roundtrip(void **state) {
  char err[256];
  HttpServer *s = http_listen("127.0.0.1", 0, err, sizeof err);
  if (!s) fail_msg("%s", err);
  int port = http_port(s);
  assert_true(port > 0);
  Served sv = {s, -1};
  pthread_t t;
  assert_int_equal(pthread_create(&t, NULL, serve_thread, &sv), 0);

  const char *req = "GET /api/health HTTP/1.1\r\nHost: localhost\r\nUser-Agent: test\r\n\r\n";
  char *resp = roundtrip(port, req, strlen(req));
  const char *body = expect_status(resp, "HTTP/1.1 200 OK\r\n");
  assert_non_null(strstr(resp, "Content-Type: application/json\r\n"));
  assert_non_null(strstr(body, "\"ok\":true"));
  free(resp);

  struct {
    const char *req, *status, *body_has;
  } cases[] = {
      {"GET /missing HTTP/1.1\r\n\r\n", "HTTP/1.1 404 Not Found\r\n", "{\"error\":\"not found\"}"},
      {"GET /../../etc/passwd HTTP/1.1\r\n\r\n", "HTTP/1.1 400 Bad Request\r\n", "invalid path"},
      {"GET /api/../api/health HTTP/1.0\r\n\r\n", "HTTP/1.1 400 Bad Request\r\n", "invalid path"},
      {"garbage\r\n\r\n", "HTTP/1.1 400 Bad Request\r\n", "malformed request line"},
      {"GET /api/health HTTP/2.0\r\n\r\n", "HTTP/1.1 505 HTTP Version Not Supported\r\n", "error"},
      {"GET api/health HTTP/1.1\r\n\r\n", "HTTP/1.1 400 Bad Request\r\n", "error"},
      {"POST /api/health HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc", "HTTP/1.1 405 Method Not Allowed\r\n",
       "error"},
      {"GET /api/health HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc", "HTTP/1.1 400 Bad Request\r\n",
       "request bodies"},
      {"GET /api/series?run=alpha&tag=train/loss&points=10 HTTP/1.1\r\n\r\n", "HTTP/1.1 200 OK\r\n",
       "[2000,"},
      {"GET / HTTP/1.1\r\n\r\n", "HTTP/1.1 200 OK\r\n", "<canvas"},
  };
  for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
    resp = roundtrip(port, cases[i].req, strlen(cases[i].req));
    body = expect_status(resp, cases[i].status);
    if (!strstr(body, cases[i].body_has)) fail_msg("%s: body '%.200s' lacks '%s'", cases[i].req, body,
                                                   cases[i].body_has);
    free(resp);
  }

  // HEAD: the headers of GET, no body.
  req = "HEAD /api/health HTTP/1.1\r\n\r\n";
  resp = roundtrip(port, req, strlen(req));
  body = expect_status(resp, "HTTP/1.1 200 OK\r\n");
  assert_string_equal(body, "");
  assert_null(strstr(resp, "Content-Length: 0\r\n"));
  free(resp);

  // Oversized request headers: refused before any handler runs.
  size_t big = 3 * HTTP_MAX_REQUEST;
  char *huge = xmalloc(big + 1);
  memset(huge, 'a', big);
  memcpy(huge, "GET /", 5);
  huge[big] = 0;
  resp = roundtrip(port, huge, big);
  body = expect_status(resp, "HTTP/1.1 431 Request Header Fields Too Large\r\n");
  assert_non_null(strstr(body, "request too large"));
  free(resp);
  free(huge);

  http_stop(s);
  assert_int_equal(pthread_join(t, NULL), 0);
  assert_int_equal(sv.rc, 0);
  http_close(s);
}

static void test_http_listen_errors(void **state) {
  char err[256];
  assert_null(http_listen("not-an-address", 0, err, sizeof err));
  assert_non_null(strstr(err, "invalid bind address"));
  assert_null(http_listen("127.0.0.1", 70000, err, sizeof err));
  assert_non_null(strstr(err, "invalid port"));
  HttpServer *s = http_listen("127.0.0.1", 0, err, sizeof err);
  assert_non_null(s);
  assert_null(http_listen("127.0.0.1", http_port(s), err, sizeof err)); // taken
  assert_non_null(strstr(err, "cannot listen"));
  http_close(s);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_lttb_counts_and_ends),
      cmocka_unit_test(test_lttb_picks_extremes),
      cmocka_unit_test(test_api_runs),
      cmocka_unit_test(test_api_tags),
      cmocka_unit_test(test_api_series),
      cmocka_unit_test(test_api_summary_and_router),
      cmocka_unit_test(test_api_experiments),
      cmocka_unit_test(test_api_errors),
      cmocka_unit_test(test_api_without_experiments_db),
      cmocka_unit_test(test_http_roundtrip),
      cmocka_unit_test(test_http_listen_errors),
  };
  return cmocka_run_group_tests(tests, fixture_setup, fixture_teardown);
}

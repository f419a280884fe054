/* test_hardening.c: regressions for defects found by reviewing the host
 * modules against hostile or malformed input (one test per defect).
 *
 * - viz HTTP server: a NUL byte in the request head used to crash the
 *   server (NULL line end in parse_request); now answered 400.
 * - metrics: a NaN value (SQLite binds it as NULL into a NOT NULL column)
 *   made every later flush fail, and train.c dies on a failed flush.
 * - config: int64 shape fields above INT_MAX wrapped when narrowed to int
 *   (dim = 2^32 + 32 trained a dim-32 model); batch_size x seq_len too.
 * - viz: a runs row whose config_json nests deeper than the JSON writer's
 *   63 levels ended the server through an assertion; now sent as a string. */
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
#include <sys/time.h>
#include <unistd.h>

#include "core/config.h"
#include "core/json.h"
#include "core/log.h"
#include "train/metrics.h"
#include "viz/http.h"
#include "viz/viz.h"

#include "tmpdir_fixture.h"

/* ------------------------------------------------------------ HTTP server */

static void ok_handler(void *ud, const char *method, const char *target, HttpResponse *r) {
  r->status = 200;
  r->content_type = "text/plain";
  r->body = "ok";
  r->len = 2;
  r->body_static = 1;
}

static void *serve_thread(void *arg) {
  char err[256];
  http_serve(arg, ok_handler, NULL, err, sizeof err);
  return NULL;
}

/* Sends the parts with a pause between (so the server reads them apart) and
 * returns the response read until close (empty when none within 5 s). */
static char *send_parts(int port, const char *const *parts, const size_t *lens, int nparts) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  assert_true(fd >= 0);
  struct timeval tv = {5, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
  inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
  assert_int_equal(connect(fd, (struct sockaddr *)&a, sizeof a), 0);
  for (int i = 0; i < nparts; i++) {
    if (i) usleep(200000);
    send(fd, parts[i], lens[i], MSG_NOSIGNAL);
  }
  size_t n = 0, cap = 4096;
  char *buf = xmalloc(cap + 1);
  for (ssize_t k; n < cap && (k = recv(fd, buf + n, cap - n, 0)) > 0;) n += (size_t)k;
  buf[n] = 0;
  close(fd);
  return buf;
}

static void test_http_nul_in_request(void **state) {
  char err[256];
  HttpServer *s = http_listen("127.0.0.1", 0, err, sizeof err);
  if (!s) fail_msg("%s", err);
  pthread_t t;
  assert_int_equal(pthread_create(&t, NULL, serve_thread, s), 0);

  // The blank line arrives after the NUL (in a later read): the request
  // line then has no "\r\n" as a C string.
  const char *p1 = "GET /\0x HTTP/1.1\r\n", *p2 = "Host: a\r\n\r\n";
  const char *parts[] = {p1, p2};
  size_t lens[] = {18, strlen(p2)};
  char *resp = send_parts(http_port(s), parts, lens, 2);
  if (strncmp(resp, "HTTP/1.1 400 ", 13)) fail_msg("got '%.80s'", resp);
  free(resp);

  // All in one read: answered at once rather than waiting for a timeout.
  const char *whole = "GET / HTTP/1.1\r\nX: a\0b\r\n\r\n";
  size_t wl = 26;
  resp = send_parts(http_port(s), &whole, &wl, 1);
  if (strncmp(resp, "HTTP/1.1 400 ", 13)) fail_msg("got '%.80s'", resp);
  free(resp);

  // The server still serves.
  const char *good = "GET /x HTTP/1.1\r\n\r\n";
  size_t gl = strlen(good);
  resp = send_parts(http_port(s), &good, &gl, 1);
  if (strncmp(resp, "HTTP/1.1 200 ", 13)) fail_msg("got '%.80s'", resp);
  free(resp);

  http_stop(s);
  assert_int_equal(pthread_join(t, NULL), 0);
  http_close(s);
}

/* ---------------------------------------------------------------- metrics */

static void test_metrics_nan_does_not_poison_flush(void **state) {
  Fixture *f = *state;
  char err[1024];
  assert_int_equal(fs_mkdirs(at(f->dir, "run"), err, sizeof err), 0);
  Metrics *m = metrics_open(f->dir, "run", 0, err, sizeof err);
  if (!m) fail_msg("%s", err);
  metrics_log(m, "validation/loss", 5, NAN);
  metrics_log(m, "validation/ppl", 5, INFINITY);
  metrics_log(m, "train/loss", 5, 2.5);
  if (metrics_flush(m, err, sizeof err)) fail_msg("flush: %s", err);
  metrics_log(m, "train/loss", 6, 2.25);
  if (metrics_flush(m, err, sizeof err)) fail_msg("second flush: %s", err);
  metrics_close(m);
}

/* ----------------------------------------------------------------- config */

static void config_refuses(const char *arg, const char *want) {
  Config c;
  char err[512] = "", *argv[] = {(char *)arg};
  int rc = config_load(&c, "configs/tiny.toml", 1, argv, err, sizeof err);
  config_free(&c);
  if (rc == 0 || !strstr(err, want)) fail_msg("%s: expected '%s', got '%s'", arg, want, rc ? err : "(loaded)");
}

static void test_config_int_narrowing(void **state) {
  config_refuses("--dim=4294967328", "dim must be <= 2147483647 (got 4294967328)");
  config_refuses("--n_routed_experts=4294967304", "n_routed_experts must be <= 2147483647");
  config_refuses("--vocab_size=4294967296", "vocab_size must be <= 2147483647");
  config_refuses("--batch_size=4611686018427387904", "batch_size must be <= 2147483647");
  config_refuses("--batch_size=1073741824", "batch_size x seq_len");
  Config c;
  char err[512];
  if (config_load(&c, "configs/tiny.toml", 0, NULL, err, sizeof err)) fail_msg("tiny.toml: %s", err);
  config_free(&c);
}

/* -------------------------------------------------------------------- viz */

/* Stored JSON is embedded in the response when the writer can nest it (the
 * reader's 200 levels fit), and sent as a string when it is not valid JSON to
 * us (here: deeper than the reader accepts). Neither may stop the server. */
static void test_viz_deep_config_json(void **state) {
  Fixture *f = *state;
  char err[1024], deep70[141], deep250[501];
  memset(deep70, '[', 70);
  memset(deep70 + 70, ']', 70);
  deep70[140] = 0;
  memset(deep250, '[', 250);
  memset(deep250 + 250, ']', 250);
  deep250[500] = 0;
  const char *db = at(f->dir, "experiments.db");
  Experiments *x = experiments_open(db, err, sizeof err);
  if (!x || experiments_run_start(x, "deep70", "e", deep70, "abc", 0, err, sizeof err) ||
      experiments_run_start(x, "deep250", "e", deep250, "abc", 0, err, sizeof err))
    fail_msg("%s", err);
  experiments_close(x);
  VizConfig cfg = {f->dir, db};
  const char *runs[] = {"deep70", "deep250"};
  for (int k = 0; k < 2; k++) {
    char target[64];
    snprintf(target, sizeof target, "/api/experiments/run?run=%s", runs[k]);
    HttpResponse r = {0};
    viz_handle(&cfg, "GET", target, &r);
    assert_int_equal(r.status, 200);
    Json *j = json_parse(r.body, r.len, err, sizeof err);
    if (!j) fail_msg("%s", err);
    const Json *c = json_get(json_get(j, "run"), "config_json");
    assert_non_null(c);
    if (k == 0) assert_int_equal(c->type, JSON_ARR);
    else assert_string_equal(json_get_str(json_get(j, "run"), "config_json", ""), deep250);
    json_free(j);
    if (!r.body_static) free(r.body);
  }
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_http_nul_in_request),
      cmocka_unit_test(test_config_int_narrowing),
      cmocka_unit_test_setup_teardown(test_viz_deep_config_json, tmpdir_setup, tmpdir_teardown),
      cmocka_unit_test_setup_teardown(test_metrics_nan_does_not_poison_flush, tmpdir_setup, tmpdir_teardown),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}

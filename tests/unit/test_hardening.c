/* test_hardening.c: regressions for defects found by reviewing the host
 * modules against hostile or malformed input (one test per defect).
 *
 * - viz HTTP server: a NUL byte in the request head used to crash the
 *   server (NULL line end in parse_request); now answered 400.
 * - metrics: a NaN value (SQLite binds it as NULL into a NOT NULL column)
 *   made every later flush fail, and train.c dies on a failed flush. */
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

#include "core/log.h"
#include "train/metrics.h"
#include "viz/http.h"

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

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_http_nul_in_request),
      cmocka_unit_test_setup_teardown(test_metrics_nan_does_not_poison_flush, tmpdir_setup, tmpdir_teardown),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}

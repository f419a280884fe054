/* http.h: a small HTTP/1.1 server for the dashboard: one thread per
 * connection (at most HTTP_MAX_CONN at once), one request per connection
 * (Connection: close), GET/HEAD only, no request bodies, bounded request
 * size and socket timeouts, so a slow or hostile client cannot hold it.
 *
 * Protocol errors (malformed request, too large, body sent) are answered
 * here with a JSON {"error": ...} body; everything else goes to the
 * handler, which fills an HttpResponse. */
#ifndef NMOE_HTTP_H
#define NMOE_HTTP_H

#include <stddef.h>

enum {
  HTTP_MAX_REQUEST = 8192, /* request line + headers, bytes */
  HTTP_MAX_CONN = 32,      /* concurrent connections; more get 503 */
  HTTP_TIMEOUT_S = 10,     /* per read/write on a connection */
};

typedef struct HttpResponse {
  int status;
  const char *content_type; /* static string */
  char *body;               /* owned: freed by the server after sending */
  size_t len;
  int body_static;          /* body is not freed (e.g. the embedded page) */
} HttpResponse;

/* method: "GET" or another token; target: the raw request target ("/a?b=c").
 * Called concurrently from connection threads. */
typedef void (*HttpHandler)(void *ud, const char *method, const char *target, HttpResponse *r);

typedef struct HttpServer HttpServer;

/* Binds host:port (numeric IPv4/IPv6 address; port 0 picks a free one) and
 * listens. NULL with err on failure. */
HttpServer *http_listen(const char *host, int port, char *err, size_t errlen);
/* The bound port (the chosen one when 0 was asked). */
int http_port(const HttpServer *s);
/* Accepts and serves until http_stop; then waits for open connections to
 * finish and returns 0 (-1 with err when accepting fails for good). */
int http_serve(HttpServer *s, HttpHandler handler, void *ud, char *err, size_t errlen);
/* Asks http_serve to return; async-signal-safe (callable from a handler). */
void http_stop(HttpServer *s);
void http_close(HttpServer *s);

/* Sets r to a JSON error {"error": msg} with status. */
void http_error(HttpResponse *r, int status, const char *msg);
const char *http_reason(int status);

#endif

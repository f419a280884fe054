/* http.c: the dashboard's HTTP/1.1 server (see http.h).
 *
 * The accept loop polls with a short timeout so http_stop (from a signal
 * handler or a test) ends it promptly; each accepted socket gets read and
 * write timeouts and its own detached thread, counted so that http_serve
 * returns only once every connection thread has finished. */
#include "viz/http.h"

#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include "core/json.h"
#include "core/log.h"

struct HttpServer {
  int fd, port;
  atomic_int stop;
  pthread_mutex_t mu;
  pthread_cond_t idle; // signalled when active drops to 0
  int active;          // connection threads running
};

typedef struct Conn {
  HttpServer *s;
  int fd;
  HttpHandler handler;
  void *ud;
} Conn;

const char *http_reason(int status) {
  switch (status) {
    case 200: return "OK";
    case 400: return "Bad Request";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 503: return "Service Unavailable";
    case 505: return "HTTP Version Not Supported";
    default: return "Unknown";
  }
}

void http_error(HttpResponse *r, int status, const char *msg) {
  JsonW w;
  jw_init(&w, 0);
  jw_obj(&w, NULL);
  jw_str(&w, "error", msg);
  jw_obj_end(&w);
  if (r->body && !r->body_static) free(r->body);
  r->status = status;
  r->content_type = "application/json";
  r->body = jw_finish(&w);
  r->len = strlen(r->body);
  r->body_static = 0;
}

HttpServer *http_listen(const char *host, int port, char *err, size_t errlen) {
  if (port < 0 || port > 65535) {
    snprintf(err, errlen, "invalid port %d (0..65535; 0 picks a free one)", port);
    return NULL;
  }
  char ps[16];
  snprintf(ps, sizeof ps, "%d", port);
  struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
                           .ai_flags = AI_PASSIVE | AI_NUMERICHOST | AI_NUMERICSERV};
  struct addrinfo *ai = NULL;
  if (getaddrinfo(host, ps, &hints, &ai) || !ai) {
    snprintf(err, errlen, "invalid bind address '%s' (a numeric IPv4 or IPv6 address, e.g. 127.0.0.1)", host);
    return NULL;
  }
  int fd = socket(ai->ai_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0), one = 1;
  if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) ||
      bind(fd, ai->ai_addr, ai->ai_addrlen) || listen(fd, 64)) {
    snprintf(err, errlen, "cannot listen on %s port %d: %s", host, port, strerror(errno));
    if (fd >= 0) close(fd);
    freeaddrinfo(ai);
    return NULL;
  }
  freeaddrinfo(ai);
  struct sockaddr_storage sa;
  socklen_t sl = sizeof sa;
  if (getsockname(fd, (struct sockaddr *)&sa, &sl)) {
    snprintf(err, errlen, "getsockname: %s", strerror(errno));
    close(fd);
    return NULL;
  }
  HttpServer *s = xcalloc(1, sizeof *s);
  s->fd = fd;
  s->port = ntohs(sa.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&sa)->sin6_port
                                           : ((struct sockaddr_in *)&sa)->sin_port);
  atomic_init(&s->stop, 0);
  pthread_mutex_init(&s->mu, NULL);
  pthread_cond_init(&s->idle, NULL);
  return s;
}

int http_port(const HttpServer *s) { return s->port; }

void http_stop(HttpServer *s) { atomic_store(&s->stop, 1); }

void http_close(HttpServer *s) {
  if (!s) return;
  close(s->fd);
  pthread_mutex_destroy(&s->mu);
  pthread_cond_destroy(&s->idle);
  free(s);
}

static int send_all(int fd, const char *p, size_t n) {
  while (n) {
    ssize_t k = send(fd, p, n, MSG_NOSIGNAL);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) return -1;
    p += k;
    n -= (size_t)k;
  }
  return 0;
}

/* Sends r (headers only for HEAD) and frees its body. */
static void send_response(int fd, HttpResponse *r, int head_only) {
  char h[512];
  int n = snprintf(h, sizeof h,
                   "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n"
                   "Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n%sConnection: close\r\n\r\n",
                   r->status, http_reason(r->status), r->content_type, r->len,
                   r->status == 405 ? "Allow: GET, HEAD\r\n" : "");
  if (send_all(fd, h, (size_t)n) == 0 && !head_only) send_all(fd, r->body, r->len);
  if (!r->body_static) free(r->body);
  r->body = NULL;
}

/* Seconds a client gets to send its whole request head: the socket timeout
 * bounds each read, this bounds their sum (a byte every few seconds cannot
 * hold a connection). */
#define HEAD_DEADLINE_S 20

/* Reads until the blank line ending the headers; buf gets them
 * NUL-terminated. 0 ok, 1 too large, 2 a NUL byte (the string parsing
 * below would stop short of the line ends), -1 closed or timed out. */
static int read_head(int fd, char *buf, size_t cap) {
  size_t n = 0;
  struct timespec t0, now;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  for (;;) {
    clock_gettime(CLOCK_MONOTONIC, &now);
    if (now.tv_sec - t0.tv_sec >= HEAD_DEADLINE_S) return -1;
    if (n == cap - 1) return 1;
    ssize_t k = recv(fd, buf + n, cap - 1 - n, 0);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) return -1;
    if (memchr(buf + n, 0, (size_t)k)) return 2;
    size_t from = n > 3 ? n - 3 : 0;
    n += (size_t)k;
    buf[n] = 0;
    if (strstr(buf + from, "\r\n\r\n")) return 0;
  }
}

/* Checks the request in head (NUL-terminated headers); on success points
 * method and target into it and returns 0, else fills r with the error. */
static int parse_request(char *head, char **method, char **target, int *head_only, HttpResponse *r) {
  char *eol = strstr(head, "\r\n");
  *eol = 0;
  char *sp1 = strchr(head, ' '), *sp2 = sp1 ? strchr(sp1 + 1, ' ') : NULL;
  if (!sp1 || !sp2 || strchr(sp2 + 1, ' ') || sp1 == head || sp2 == sp1 + 1) {
    http_error(r, 400, "malformed request line");
    return -1;
  }
  *sp1 = *sp2 = 0;
  *method = head;
  *target = sp1 + 1;
  const char *version = sp2 + 1;
  if (strncmp(version, "HTTP/1.", 7) || (strcmp(version + 7, "0") && strcmp(version + 7, "1"))) {
    http_error(r, strncmp(version, "HTTP/", 5) ? 400 : 505, "only HTTP/1.0 and HTTP/1.1 are served");
    return -1;
  }
  for (const unsigned char *t = (const unsigned char *)*target; *t; t++)
    if (*t <= 0x20 || *t >= 0x7f) {
      http_error(r, 400, "invalid character in the request target");
      return -1;
    }
  if (**target != '/') {
    http_error(r, 400, "the request target must be a path starting with /");
    return -1;
  }
  int has_body = 0;
  for (char *line = eol + 2; *line && strncmp(line, "\r\n", 2); ) {
    char *end = strstr(line, "\r\n");
    *end = 0;
    char *colon = strchr(line, ':');
    if (!colon || colon == line) {
      http_error(r, 400, "malformed header line");
      return -1;
    }
    *colon = 0;
    const char *v = colon + 1 + strspn(colon + 1, " \t");
    if (!strcasecmp(line, "transfer-encoding") || (!strcasecmp(line, "content-length") && strcmp(v, "0")))
      has_body = 1;
    line = end + 2;
  }
  *head_only = !strcmp(*method, "HEAD");
  if (strcmp(*method, "GET") && !*head_only) {
    http_error(r, 405, "only GET and HEAD are allowed");
    return -1;
  }
  if (has_body) {
    http_error(r, 400, "request bodies are not accepted");
    return -1;
  }
  return 0;
}

static void *conn_main(void *arg) {
  Conn *c = arg;
  char *head = xmalloc(HTTP_MAX_REQUEST + 1);
  HttpResponse r = {0};
  int rc = read_head(c->fd, head, HTTP_MAX_REQUEST + 1), head_only = 0;
  if (rc == 1) http_error(&r, 431, "request too large");
  if (rc == 2) http_error(&r, 400, "NUL byte in the request");
  if (rc >= 0) {
    char *method, *target;
    if (rc == 0 && parse_request(head, &method, &target, &head_only, &r) == 0) {
      c->handler(c->ud, method, target, &r);
      if (!r.content_type) http_error(&r, 500, "handler gave no response");
    }
    send_response(c->fd, &r, head_only);
  }
  // Half-close and drain briefly, so unread request bytes do not turn the
  // close into a reset that could discard the response in flight.
  shutdown(c->fd, SHUT_WR);
  struct timeval tv = {1, 0};
  setsockopt(c->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  for (size_t drained = 0; drained < (1u << 16);) {
    ssize_t k = recv(c->fd, head, HTTP_MAX_REQUEST, 0);
    if (k <= 0) break;
    drained += (size_t)k;
  }
  close(c->fd);
  free(head);
  HttpServer *s = c->s;
  free(c);
  pthread_mutex_lock(&s->mu);
  if (--s->active == 0) pthread_cond_broadcast(&s->idle);
  pthread_mutex_unlock(&s->mu);
  return NULL;
}

/* Answers 503 on the accept thread (a small response never blocks). */
static void refuse(int fd) {
  HttpResponse r = {0};
  http_error(&r, 503, "too many connections");
  send_response(fd, &r, 0);
  close(fd);
}

int http_serve(HttpServer *s, HttpHandler handler, void *ud, char *err, size_t errlen) {
  int rc = 0;
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
  while (!atomic_load(&s->stop)) {
    struct pollfd p = {.fd = s->fd, .events = POLLIN};
    int n = poll(&p, 1, 200);
    if (n < 0 && errno != EINTR) {
      snprintf(err, errlen, "poll: %s", strerror(errno));
      rc = -1;
      break;
    }
    if (n <= 0) continue;
    int fd = accept4(s->fd, NULL, NULL, SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) usleep(100000);
      continue; // the client went away, or a transient shortage
    }
    struct timeval tv = {HTTP_TIMEOUT_S, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    pthread_mutex_lock(&s->mu);
    int ok = s->active < HTTP_MAX_CONN;
    if (ok) s->active++;
    pthread_mutex_unlock(&s->mu);
    if (!ok) {
      refuse(fd);
      continue;
    }
    Conn *c = xmalloc(sizeof *c);
    *c = (Conn){s, fd, handler, ud};
    pthread_t t;
    if (pthread_create(&t, &attr, conn_main, c)) {
      free(c);
      pthread_mutex_lock(&s->mu);
      s->active--;
      pthread_mutex_unlock(&s->mu);
      refuse(fd);
    }
  }
  pthread_attr_destroy(&attr);
  pthread_mutex_lock(&s->mu);
  while (s->active > 0) pthread_cond_wait(&s->idle, &s->mu);
  pthread_mutex_unlock(&s->mu);
  return rc;
}

/* store.c: the TCP control plane (store.h). Rank 0 accepts one connection per
 * peer; every message is a frame (u64 length, then the bytes). All sockets
 * are non-blocking and every wait is a poll() bounded by the timeout, so a
 * peer that dies shows up as "rank R closed the connection" and one that goes
 * silent as "no message from rank R in N s", never as a hang. */
#include "dist/store.h"

#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "core/log.h"

#define STORE_MAGIC 0x6e6d6f65u /* "nmoe" */
#define STORE_MAX_REPLY 512     /* rank 0's verdict on a hello: empty (ok) or why not */

struct Store {
  int rank, world, timeout_s;
  int *fd;               /* rank 0: fd[r] talks to rank r (r >= 1); others: fd[0] talks to rank 0 */
  unsigned char *bar;    /* (world) scratch for store_barrier */
};

typedef struct Hello {
  uint32_t magic;
  int32_t rank, world;
} Hello;

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* poll() one fd for ev until timeout_ms; 1 ready, 0 timed out, -1 error. EINTR
 * resumes with the time that is left. */
static int wait_fd(int fd, short ev, int timeout_ms) {
  double end = now_s() + timeout_ms * 1e-3;
  for (;;) {
    struct pollfd p = {.fd = fd, .events = ev};
    int left = (int)((end - now_s()) * 1e3);
    int r = poll(&p, 1, left > 0 ? left : 0);
    if (r >= 0) return r;
    if (errno != EINTR) return -1;
  }
}

/* Moves all n bytes to (sending) or from rank peer, through partial transfers
 * and EINTR, waiting at most the store's timeout for each bit of progress. */
static int io_full(Store *s, int peer, void *buf, size_t n, int sending, int more, char *err,
                   size_t errlen) {
  int fd = s->fd[s->rank == 0 ? peer : 0];
  unsigned char *p = buf;
  while (n > 0) {
    int w = wait_fd(fd, sending ? POLLOUT : POLLIN, s->timeout_s * 1000);
    if (w == 0) {
      if (sending)
        snprintf(err, errlen, "rank %d did not take a message for %d s", peer, s->timeout_s);
      else
        snprintf(err, errlen, "no message from rank %d in %d s", peer, s->timeout_s);
      return -1;
    }
    ssize_t k = w < 0 ? -1
                : sending ? send(fd, p, n, MSG_NOSIGNAL | (more ? MSG_MORE : 0))
                          : recv(fd, p, n, 0);
    if (k == 0 && !sending) {
      snprintf(err, errlen, "rank %d closed the connection", peer);
      return -1;
    }
    if (k < 0) {
      if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK) continue;
      if (errno == EPIPE || errno == ECONNRESET)
        snprintf(err, errlen, "rank %d closed the connection", peer);
      else
        snprintf(err, errlen, "connection to rank %d: %s", peer, strerror(errno));
      return -1;
    }
    p += k;
    n -= (size_t)k;
  }
  return 0;
}

static int send_frame(Store *s, int peer, const void *data, size_t n, char *err, size_t errlen) {
  uint64_t len = n;
  if (io_full(s, peer, &len, sizeof len, 1, n > 0, err, errlen)) return -1;
  return io_full(s, peer, (void *)data, n, 1, 0, err, errlen);
}

/* Reads one frame into buf (cap bytes). got == NULL: the frame must be exactly
 * cap bytes (a collective whose ranks disagree on the size is out of step). */
static int recv_frame(Store *s, int peer, void *buf, size_t cap, size_t *got, char *err,
                      size_t errlen) {
  uint64_t len;
  if (io_full(s, peer, &len, sizeof len, 0, 0, err, errlen)) return -1;
  if (got ? len > cap : len != cap) {
    snprintf(err, errlen,
             "rank %d sent a message of %llu bytes where %zu were expected (the ranks' calls are "
             "out of step)",
             peer, (unsigned long long)len, cap);
    return -1;
  }
  if (got) *got = (size_t)len;
  return io_full(s, peer, buf, (size_t)len, 0, 0, err, errlen);
}

static void set_socket_options(int fd) {
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one); /* small frames go out at once */
  fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
}

/* A listening socket on all interfaces: IPv6 dual-stack when available, else IPv4. */
static int listen_any(int port, int backlog, char *err, size_t errlen) {
  int one = 1, zero = 0;
  int fd = socket(AF_INET6, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd >= 0) {
    struct sockaddr_in6 a = {.sin6_family = AF_INET6, .sin6_port = htons((uint16_t)port),
                             .sin6_addr = in6addr_any};
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero);
    if (bind(fd, (struct sockaddr *)&a, sizeof a) == 0 && listen(fd, backlog) == 0) return fd;
    if (errno == EADDRINUSE) goto fail;
    close(fd);
  }
  fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) goto fail;
  struct sockaddr_in a4 = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                           .sin_addr.s_addr = htonl(INADDR_ANY)};
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (bind(fd, (struct sockaddr *)&a4, sizeof a4) == 0 && listen(fd, backlog) == 0) return fd;
fail:
  snprintf(err, errlen, "cannot listen on port %d: %s", port, strerror(errno));
  if (fd >= 0) close(fd);
  return -1;
}

/* Rank 0 tells every connected peer why the rendezvous failed, then fails itself. */
static int refuse_all(Store *s, const char *why, char *err, size_t errlen) {
  char ignored[64];
  for (int r = 1; r < s->world; r++)
    if (s->fd[r] >= 0) send_frame(s, r, why, strlen(why), ignored, sizeof ignored);
  snprintf(err, errlen, "%s", why);
  return -1;
}

static int rendezvous_host(Store *s, int port, char *err, size_t errlen) {
  int lfd = listen_any(port, s->world, err, errlen);
  if (lfd < 0) return -1;
  double end = now_s() + s->timeout_s;
  int arrived = 1, rc = -1;
  char why[STORE_MAX_REPLY];
  while (arrived < s->world) {
    int left = (int)((end - now_s()) * 1e3);
    int w = left > 0 ? wait_fd(lfd, POLLIN, left) : 0;
    if (w <= 0) {
      int n = snprintf(why, sizeof why, "only %d of %d ranks arrived within %d s (missing:",
                       arrived, s->world, s->timeout_s);
      for (int r = 1; r < s->world && n < (int)sizeof why - 16; r++)
        if (s->fd[r] < 0) n += snprintf(why + n, sizeof why - n, " %d", r);
      snprintf(why + n, sizeof why - n, ")");
      if (w < 0) snprintf(why, sizeof why, "waiting for ranks: %s", strerror(errno));
      refuse_all(s, why, err, errlen);
      goto out;
    }
    int cfd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
    if (cfd < 0) continue; /* the connection went away before we took it */
    set_socket_options(cfd);
    /* Read its hello through a temporary slot: its rank is not known yet. */
    Store probe = {.rank = 0, .world = 2, .timeout_s = s->timeout_s, .fd = (int[2]){-1, cfd}};
    Hello h;
    char perr[256];
    if (recv_frame(&probe, 1, &h, sizeof h, NULL, perr, sizeof perr) || h.magic != STORE_MAGIC) {
      close(cfd); /* not an nmoe rank (a port scan, a stale client): ignore it */
      continue;
    }
    why[0] = 0;
    if (h.world != s->world)
      snprintf(why, sizeof why,
               "world size mismatch: rank %d was started with world %d, rank 0 with world %d",
               h.rank, h.world, s->world);
    else if (h.rank < 1 || h.rank >= s->world)
      snprintf(why, sizeof why, "a process claims rank %d, outside 1..%d", h.rank, s->world - 1);
    else if (s->fd[h.rank] >= 0)
      snprintf(why, sizeof why, "two processes claim rank %d", h.rank);
    if (why[0]) {
      send_frame(&probe, 1, why, strlen(why), perr, sizeof perr);
      close(cfd);
      refuse_all(s, why, err, errlen);
      goto out;
    }
    s->fd[h.rank] = cfd;
    arrived++;
  }
  for (int r = 1; r < s->world; r++)
    if (send_frame(s, r, "", 0, err, errlen)) goto out;
  rc = 0;
out:
  close(lfd);
  return rc;
}

/* Connects to rank 0, retrying every 50 ms until the deadline (rank 0 may
 * not be listening yet, or its name may not resolve yet). */
static int connect_retry(const char *addr, int port, int timeout_s, char *err, size_t errlen) {
  char ps[16], last[256] = "timed out";
  snprintf(ps, sizeof ps, "%d", port);
  double end = now_s() + timeout_s;
  for (;;) {
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *ai = NULL;
    int g = getaddrinfo(addr, ps, &hints, &ai);
    if (g) snprintf(last, sizeof last, "%s", gai_strerror(g));
    for (struct addrinfo *a = g ? NULL : ai; a; a = a->ai_next) {
      int fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, a->ai_protocol);
      if (fd < 0) continue;
      int ok = connect(fd, a->ai_addr, a->ai_addrlen) == 0;
      if (!ok && errno == EINPROGRESS) {
        int left = (int)((end - now_s()) * 1e3), soerr = 0;
        socklen_t sl = sizeof soerr;
        if (wait_fd(fd, POLLOUT, left > 0 ? left : 0) > 0 &&
            getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl) == 0) {
          ok = soerr == 0;
          errno = soerr;
        } else if (errno == 0 || errno == EINPROGRESS) {
          errno = ETIMEDOUT;
        }
      }
      if (ok) {
        freeaddrinfo(ai);
        set_socket_options(fd);
        return fd;
      }
      snprintf(last, sizeof last, "%s", strerror(errno));
      close(fd);
    }
    if (ai) freeaddrinfo(ai);
    if (now_s() + 0.05 > end) break;
    nanosleep(&(struct timespec){0, 50 * 1000 * 1000}, NULL);
  }
  snprintf(err, errlen, "could not reach rank 0 at %s:%d within %d s: %s", addr, port, timeout_s,
           last);
  return -1;
}

static int rendezvous_peer(Store *s, const char *addr, int port, char *err, size_t errlen) {
  s->fd[0] = connect_retry(addr, port, s->timeout_s, err, errlen);
  if (s->fd[0] < 0) return -1;
  Hello h = {STORE_MAGIC, s->rank, s->world};
  char why[STORE_MAX_REPLY + 1];
  size_t n;
  if (send_frame(s, 0, &h, sizeof h, err, errlen)) return -1;
  /* Rank 0 was listening before we connected, so it decides within timeout_s
   * from now; wait longer than that to hear its verdict rather than our own
   * timeout. */
  s->timeout_s *= 2;
  int rc = recv_frame(s, 0, why, STORE_MAX_REPLY, &n, err, errlen);
  s->timeout_s /= 2;
  if (rc) return -1;
  if (n == 0) return 0;
  why[n] = 0;
  snprintf(err, errlen, "%s", why);
  return -1;
}

int store_set_timeout(Store *s, int timeout_s) {
  int old = s->timeout_s;
  s->timeout_s = timeout_s < 1 ? 1 : timeout_s > 1000000 ? 1000000 : timeout_s;
  return old;
}

Store *store_open(int rank, int world, const char *addr, int port, int timeout_s, char *err,
                  size_t errlen) {
  if (world < 1 || rank < 0 || rank >= world || port <= 0 || port > 65535 || timeout_s <= 0) {
    snprintf(err, errlen, "bad store arguments: rank %d, world %d, port %d, timeout %d s", rank,
             world, port, timeout_s);
    return NULL;
  }
  Store *s = xcalloc(1, sizeof *s);
  s->rank = rank;
  s->world = world;
  s->timeout_s = timeout_s > 1000000 ? 1000000 : timeout_s;
  s->fd = xmalloc(sizeof *s->fd * (size_t)world);
  for (int r = 0; r < world; r++) s->fd[r] = -1;
  s->bar = xcalloc((size_t)world, 1);
  if (world > 1 && (rank == 0 ? rendezvous_host(s, port, err, errlen)
                              : rendezvous_peer(s, addr, port, err, errlen))) {
    store_close(s);
    return NULL;
  }
  return s;
}

int store_all_gather(Store *s, void *out, const void *in, size_t bytes, char *err, size_t errlen) {
  unsigned char *o = out;
  size_t total = bytes * (size_t)s->world;
  if (s->rank != 0)
    return send_frame(s, 0, in, bytes, err, errlen) || recv_frame(s, 0, o, total, NULL, err, errlen)
               ? -1
               : 0;
  memmove(o, in, bytes);
  for (int r = 1; r < s->world; r++)
    if (recv_frame(s, r, o + (size_t)r * bytes, bytes, NULL, err, errlen)) return -1;
  for (int r = 1; r < s->world; r++)
    if (send_frame(s, r, o, total, err, errlen)) return -1;
  return 0;
}

int store_barrier(Store *s, char *err, size_t errlen) {
  unsigned char one = 1;
  return store_all_gather(s, s->bar, &one, 1, err, errlen);
}

int store_pick_port(int span) {
  if (span < 1 || span > 8) return -1;
  for (int attempt = 0; attempt < 64; attempt++) {
    int fds[8], n, port = 0, ok = 1;
    for (n = 0; n < span && ok; n++) {
      struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)(n ? port + n : 0)),
                              .sin_addr.s_addr = htonl(INADDR_ANY)};
      socklen_t al = sizeof a;
      fds[n] = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
      ok = fds[n] >= 0 && bind(fds[n], (struct sockaddr *)&a, sizeof a) == 0;
      if (ok && n == 0) {
        ok = getsockname(fds[0], (struct sockaddr *)&a, &al) == 0;
        port = ntohs(a.sin_port);
        ok = ok && port + span <= 65536;
      }
    }
    while (n > 0)
      if (fds[--n] >= 0) close(fds[n]);
    if (ok) return port;
  }
  return -1;
}

void store_close(Store *s) {
  if (!s) return;
  for (int r = 0; r < s->world; r++)
    if (s->fd[r] >= 0) close(s->fd[r]);
  free(s->fd);
  free(s->bar);
  free(s);
}

/* store.h: the control plane of a multi-process run. Rank 0 listens on a TCP
 * port; every other rank connects to it. All calls are collective (every rank
 * makes the same sequence of calls) and blocking. A peer that dies or never
 * arrives is an error (returned, never a hang past the timeout). */
#ifndef NMOE_STORE_H
#define NMOE_STORE_H

#include <stddef.h>

typedef struct Store Store;

/* Rank 0 binds addr:port (addr is where the others connect; rank 0 listens on
 * all interfaces), the others retry connecting until timeout_s. NULL with a
 * message in err on failure (port in use, timeout, world mismatch). */
Store *store_open(int rank, int world, const char *addr, int port, int timeout_s, char *err,
                  size_t errlen);
/* out (world * bytes) = every rank's in (bytes), in rank order. */
int store_all_gather(Store *s, void *out, const void *in, size_t bytes, char *err, size_t errlen);
int store_barrier(Store *s, char *err, size_t errlen);
/* The limit on each wait from now on (a peer that closes its connection is
 * still an error at once); returns the previous limit. */
int store_set_timeout(Store *s, int timeout_s);
void store_close(Store *s);

/* A port p such that p .. p+span-1 (span <= 8) can be bound right now (the
 * launcher's MASTER_PORT and the store's port next to it; tests); -1 when
 * none is found. */
int store_pick_port(int span);

#endif

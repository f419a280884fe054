/* tmpdir_fixture.h: a cmocka fixture owning a fresh temporary directory per
 * test (removed afterwards), and at() for paths inside a directory. */
#ifndef NMOE_TMPDIR_FIXTURE_H
#define NMOE_TMPDIR_FIXTURE_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/fsutil.h"
#include "core/log.h"

typedef struct Fixture {
  char dir[64];
} Fixture;

static int tmpdir_setup(void **state) {
  Fixture *f = xcalloc(1, sizeof *f);
  strcpy(f->dir, "/tmp/nmoe_test_XXXXXX");
  if (!mkdtemp(f->dir)) return -1;
  *state = f;
  return 0;
}

static int tmpdir_teardown(void **state) {
  Fixture *f = *state;
  fs_remove_tree(f->dir);
  free(f);
  return 0;
}

/* "dir/rel" in one of four rotating static buffers (enough for one call's args). */
static const char *at(const char *dir, const char *rel) {
  static char buf[4][512];
  static int k;
  k = (k + 1) % 4;
  snprintf(buf[k], sizeof buf[k], "%s/%s", dir, rel);
  return buf[k];
}

#endif

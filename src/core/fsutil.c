/* fsutil.c: durable writes (tmp + fsync + rename + dir fsync), mkdir -p, reads. */
#include "core/fsutil.h"

#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/log.h"

int fs_mkdirs(const char *path, char *err, size_t errlen) {
  char buf[4096];
  if (strlen(path) >= sizeof buf) {
    snprintf(err, errlen, "%s: path too long", path);
    return -1;
  }
  strcpy(buf, path);
  for (char *p = buf + 1; *p; p++) {
    if (*p != '/') continue;
    *p = 0;
    if (mkdir(buf, 0755) && errno != EEXIST) {
      snprintf(err, errlen, "cannot create directory %s: %s", buf, strerror(errno));
      return -1;
    }
    *p = '/';
  }
  if (mkdir(buf, 0755) && errno != EEXIST) {
    snprintf(err, errlen, "cannot create directory %s: %s", buf, strerror(errno));
    return -1;
  }
  if (!fs_is_dir(buf)) {
    snprintf(err, errlen, "%s exists and is not a directory", buf);
    return -1;
  }
  return 0;
}

void fs_dirname(const char *path, char *out, size_t outlen) {
  const char *slash = strrchr(path, '/');
  if (!slash) {
    snprintf(out, outlen, ".");
  } else if (slash == path) {
    snprintf(out, outlen, "/");
  } else {
    snprintf(out, outlen, "%.*s", (int)(slash - path), path);
  }
}

int fs_fsync_dir(const char *dir, char *err, size_t errlen) {
  int fd = open(dir, O_RDONLY | O_DIRECTORY);
  if (fd < 0) {
    snprintf(err, errlen, "cannot open directory %s: %s", dir, strerror(errno));
    return -1;
  }
  int rc = fsync(fd);
  close(fd);
  if (rc) {
    snprintf(err, errlen, "fsync of directory %s failed: %s", dir, strerror(errno));
    return -1;
  }
  return 0;
}

int fs_commit_rename(const char *tmp, const char *path, char *err, size_t errlen) {
  if (rename(tmp, path)) {
    snprintf(err, errlen, "cannot rename %s to %s: %s", tmp, path, strerror(errno));
    unlink(tmp);
    return -1;
  }
  char dir[4096];
  fs_dirname(path, dir, sizeof dir);
  return fs_fsync_dir(dir, err, errlen);
}

int fs_write_atomic(const char *path, const void *data, size_t n, char *err, size_t errlen) {
  char tmp[4200];
  snprintf(tmp, sizeof tmp, "%s.tmp.%d", path, (int)getpid());
  int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) {
    snprintf(err, errlen, "cannot write %s: %s", tmp, strerror(errno));
    return -1;
  }
  const char *p = data;
  size_t left = n;
  while (left) {
    ssize_t w = write(fd, p, left);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) {
      snprintf(err, errlen, "write to %s failed: %s", tmp, strerror(errno));
      close(fd);
      unlink(tmp);
      return -1;
    }
    p += w;
    left -= (size_t)w;
  }
  if (fsync(fd) || close(fd)) {
    snprintf(err, errlen, "fsync of %s failed: %s", tmp, strerror(errno));
    unlink(tmp);
    return -1;
  }
  return fs_commit_rename(tmp, path, err, errlen);
}

char *fs_read_all(const char *path, size_t *n, char *err, size_t errlen) {
  FILE *f = fopen(path, "rb");
  if (!f) {
    snprintf(err, errlen, "%s: cannot open: %s", path, strerror(errno));
    return NULL;
  }
  size_t cap = 4096, len = 0;
  char *buf = xmalloc(cap);
  size_t got;
  while ((got = fread(buf + len, 1, cap - len - 1, f)) > 0) {
    len += got;
    if (cap - len - 1 == 0) buf = xrealloc(buf, cap *= 2);
  }
  int bad = ferror(f);
  fclose(f);
  if (bad) {
    snprintf(err, errlen, "%s: read error", path);
    free(buf);
    return NULL;
  }
  buf[len] = 0;
  if (n) *n = len;
  return buf;
}

int fs_exists(const char *path) {
  struct stat st;
  return stat(path, &st) == 0;
}

int fs_is_dir(const char *path) {
  struct stat st;
  return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

int64_t fs_size(const char *path) {
  struct stat st;
  return stat(path, &st) == 0 ? (int64_t)st.st_size : -1;
}

static int rm_entry(const char *p, const struct stat *sb, int flag, struct FTW *ftw) {
  (void)sb; (void)flag; (void)ftw;
  return remove(p);
}

int fs_remove_tree(const char *path) {
  if (!fs_exists(path)) return 0;
  return nftw(path, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
}

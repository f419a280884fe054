/* prep_input.c: --paths expansion and plain/zstd line reading for data prep. */
#include "data/prep_input.h"

#include <dirent.h>
#include <errno.h>
#include <glob.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <zstd.h>

#include "core/log.h"

typedef struct FileList {
  InputFile *v;
  int n, cap;
} FileList;

static void list_add(FileList *l, const char *path, const char *rel, int64_t size) {
  if (l->n == l->cap) {
    l->cap = l->cap ? 2 * l->cap : 16;
    l->v = xrealloc(l->v, (size_t)l->cap * sizeof *l->v);
  }
  l->v[l->n].path = xstrdup(path);
  l->v[l->n].rel = xstrdup(rel);
  l->v[l->n].size = size;
  l->n++;
}

static int cmp_str(const void *a, const void *b) {
  return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Every regular file under dir (sorted at each level), rel to root. */
static int walk_dir(FileList *l, const char *dir, size_t root_len, char *err, size_t errlen) {
  DIR *d = opendir(dir);
  if (!d) {
    snprintf(err, errlen, "cannot read directory %s: %s", dir, strerror(errno));
    return -1;
  }
  char **names = NULL;
  int n = 0, cap = 0;
  struct dirent *e;
  while ((e = readdir(d))) {
    if (e->d_name[0] == '.') continue; /* hidden files and . / .. */
    if (n == cap) {
      cap = cap ? 2 * cap : 64;
      names = xrealloc(names, (size_t)cap * sizeof *names);
    }
    names[n++] = xstrdup(e->d_name);
  }
  closedir(d);
  qsort(names, (size_t)n, sizeof *names, cmp_str);
  int rc = 0;
  for (int i = 0; i < n; i++) {
    char p[8192];
    snprintf(p, sizeof p, "%s/%s", dir, names[i]);
    struct stat st;
    if (!rc && stat(p, &st) == 0) {
      if (S_ISDIR(st.st_mode)) rc = walk_dir(l, p, root_len, err, errlen);
      else if (S_ISREG(st.st_mode)) list_add(l, p, p + root_len, st.st_size);
    }
    free(names[i]);
  }
  free(names);
  return rc;
}

/* Adds one concrete path (from the command line or a glob match). */
static int add_path(FileList *l, const char *p, int dirs_ok, char *err, size_t errlen) {
  struct stat st;
  if (stat(p, &st)) {
    snprintf(err, errlen, "input file not found: %s", p);
    return -1;
  }
  if (S_ISDIR(st.st_mode)) {
    if (!dirs_ok) {
      snprintf(err, errlen, "input %s is a directory (give files or a glob such as '%s/*.jsonl')",
               p, p);
      return -1;
    }
    size_t root = strlen(p);
    while (root > 1 && p[root - 1] == '/') root--;
    char dir[4096];
    snprintf(dir, sizeof dir, "%.*s", (int)root, p);
    return walk_dir(l, dir, strlen(dir) + 1, err, errlen);
  }
  if (!S_ISREG(st.st_mode)) {
    snprintf(err, errlen, "input %s is not a regular file", p);
    return -1;
  }
  const char *rel = strncmp(p, "./", 2) == 0 ? p + 2 : p;
  list_add(l, p, rel, st.st_size);
  return 0;
}

int input_expand(char *const *patterns, int n, int dirs_ok, InputFile **files, int *nfiles,
                 char *err, size_t errlen) {
  FileList l = {0};
  int rc = 0;
  for (int i = 0; i < n && !rc; i++) {
    const char *pat = patterns[i];
    if (!strpbrk(pat, "*?[")) {
      rc = add_path(&l, pat, dirs_ok, err, errlen);
      continue;
    }
    glob_t g;
    int gr = glob(pat, 0, NULL, &g); /* sorted */
    if (gr == GLOB_NOMATCH) {
      snprintf(err, errlen, "no input files match '%s'", pat);
      rc = -1;
    } else if (gr) {
      snprintf(err, errlen, "cannot expand '%s'", pat);
      rc = -1;
    } else {
      for (size_t k = 0; k < g.gl_pathc && !rc; k++) rc = add_path(&l, g.gl_pathv[k], dirs_ok, err, errlen);
    }
    if (gr != GLOB_NOMATCH) globfree(&g);
  }
  if (!rc && l.n == 0) {
    snprintf(err, errlen, "no input files given (--paths)");
    rc = -1;
  }
  if (rc) {
    input_files_free(l.v, l.n);
    return -1;
  }
  *files = l.v;
  *nfiles = l.n;
  return 0;
}

void input_files_free(InputFile *files, int n) {
  for (int i = 0; i < n; i++) {
    free(files[i].path);
    free(files[i].rel);
  }
  free(files);
}

int line_reader_open(LineReader *r, const char *path, int zstd, char *err, size_t errlen) {
  memset(r, 0, sizeof *r);
  r->path = path;
  r->f = fopen(path, "rb");
  if (!r->f) {
    snprintf(err, errlen, "cannot open %s: %s", path, strerror(errno));
    return -1;
  }
  r->cap = 1 << 20;
  r->buf = xmalloc(r->cap);
  if (zstd) {
    r->zs = ZSTD_createDStream();
    if (!r->zs || ZSTD_isError(ZSTD_initDStream(r->zs))) {
      snprintf(err, errlen, "%s: cannot initialise zstd decoder", path);
      line_reader_close(r);
      return -1;
    }
    r->in_cap = ZSTD_DStreamInSize();
    r->in = xmalloc(r->in_cap);
  }
  return 0;
}

/* Appends decoded bytes at buf[len..cap); sets eof when the input ends. */
static int reader_fill(LineReader *r, char *err, size_t errlen) {
  if (!r->zs) {
    size_t got = fread(r->buf + r->len, 1, r->cap - r->len, r->f);
    r->len += got;
    r->bytes_read += (int64_t)got;
    if (got == 0) {
      if (ferror(r->f)) {
        snprintf(err, errlen, "read error on %s: %s", r->path, strerror(errno));
        return -1;
      }
      r->eof = 1;
    }
    return 0;
  }
  for (;;) {
    if (r->in_pos == r->in_len) {
      r->in_len = fread(r->in, 1, r->in_cap, r->f);
      r->in_pos = 0;
      r->bytes_read += (int64_t)r->in_len;
      if (r->in_len == 0) {
        if (ferror(r->f)) {
          snprintf(err, errlen, "read error on %s: %s", r->path, strerror(errno));
          return -1;
        }
        if (r->zret != 0) {
          snprintf(err, errlen, "%s: truncated zstd stream", r->path);
          return -1;
        }
        r->eof = 1;
        return 0;
      }
    }
    ZSTD_inBuffer zin = {r->in, r->in_len, r->in_pos};
    ZSTD_outBuffer zout = {r->buf + r->len, r->cap - r->len, 0};
    size_t ret = ZSTD_decompressStream(r->zs, &zout, &zin);
    if (ZSTD_isError(ret)) {
      snprintf(err, errlen, "%s: corrupt zstd stream: %s", r->path, ZSTD_getErrorName(ret));
      return -1;
    }
    r->zret = ret;
    r->in_pos = zin.pos;
    r->len += zout.pos;
    if (zout.pos > 0) return 0;
  }
}

int line_reader_next(LineReader *r, const char **line, size_t *len, char *err, size_t errlen) {
  size_t scan = r->pos;
  for (;;) {
    char *nl = memchr(r->buf + scan, '\n', r->len - scan);
    if (nl) {
      *line = r->buf + r->pos;
      *len = (size_t)(nl - (r->buf + r->pos));
      r->pos = (size_t)(nl - r->buf) + 1;
      r->line++;
      return 1;
    }
    if (r->eof) {
      if (r->pos == r->len) return 0;
      *line = r->buf + r->pos;
      *len = r->len - r->pos;
      r->pos = r->len;
      r->line++;
      return 1;
    }
    /* keep the partial line at the front, grow when one line fills the buffer */
    scan = r->len - r->pos;
    if (r->pos > 0) {
      memmove(r->buf, r->buf + r->pos, r->len - r->pos);
      r->len -= r->pos;
      r->pos = 0;
    }
    if (r->len == r->cap) {
      r->cap *= 2;
      r->buf = xrealloc(r->buf, r->cap);
    }
    if (reader_fill(r, err, errlen)) return -1;
  }
}

void line_reader_close(LineReader *r) {
  if (r->f) fclose(r->f);
  if (r->zs) ZSTD_freeDStream(r->zs);
  free(r->in);
  free(r->buf);
  memset(r, 0, sizeof *r);
}

/* prep_input.h: input side of `nmoe data prep`: expanding --paths (files,
 * globs, directories) and reading lines from plain or zstd-compressed files. */
#ifndef NMOE_DATA_PREP_INPUT_H
#define NMOE_DATA_PREP_INPUT_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

typedef struct InputFile {
  char *path;   /* as opened */
  char *rel;    /* relative to the directory it was found under, else the path as given */
  int64_t size; /* bytes on disk */
} InputFile;

/* Expands patterns in order: a glob expands to its sorted matches (none is an
 * error), a directory (when dirs_ok) to every regular file under it sorted by
 * path, anything else must be an existing regular file. 0, or -1 with err. */
int input_expand(char *const *patterns, int n, int dirs_ok, InputFile **files, int *nfiles,
                 char *err, size_t errlen);
void input_files_free(InputFile *files, int n);

/* Line-by-line reader over a plain or zstd stream. */
typedef struct LineReader {
  FILE *f;
  const char *path;
  void *zs;          /* ZSTD_DStream, NULL for plain files */
  char *in;          /* compressed input buffer */
  size_t in_cap, in_len, in_pos;
  size_t zret;       /* last ZSTD_decompressStream result (0 = frame complete) */
  char *buf;         /* decoded bytes [pos, len) not yet returned */
  size_t len, pos, cap;
  int eof;
  int64_t line;      /* 1-based number of the last line returned */
  int64_t bytes_read; /* bytes read from the file so far (compressed for zstd) */
} LineReader;

int line_reader_open(LineReader *r, const char *path, int zstd, char *err, size_t errlen);
/* Next line without its '\n': 1 (line valid until the next call), 0 at end,
 * -1 with err on I/O error or a corrupt/truncated zstd stream. */
int line_reader_next(LineReader *r, const char **line, size_t *len, char *err, size_t errlen);
void line_reader_close(LineReader *r);

#endif

/* fsutil.h: durable file writes and small filesystem helpers.
 *
 * Atomic write protocol (checkpoints, shards, manifests): write to
 * "<path>.tmp.<pid>", fsync the file, rename over path, fsync the directory.
 * A reader therefore sees either the old complete file or the new complete
 * one, never a partial file under the final name. */
#ifndef NMOE_FSUTIL_H
#define NMOE_FSUTIL_H

#include <stddef.h>
#include <stdint.h>

/* mkdir -p; 0 or -1 with err. */
int fs_mkdirs(const char *path, char *err, size_t errlen);
/* Writes data to path atomically (see above). */
int fs_write_atomic(const char *path, const void *data, size_t n, char *err, size_t errlen);
/* Renames tmp over path and fsyncs the containing directory. */
int fs_commit_rename(const char *tmp, const char *path, char *err, size_t errlen);
/* fsync a directory (after creating/renaming entries in it). */
int fs_fsync_dir(const char *dir, char *err, size_t errlen);
/* Reads a whole file (NUL-terminated; *n gets the size). NULL with err. */
char *fs_read_all(const char *path, size_t *n, char *err, size_t errlen);
int fs_exists(const char *path);
int fs_is_dir(const char *path);
/* Size in bytes, or -1. */
int64_t fs_size(const char *path);
/* rm -rf (for purging old checkpoints); 0 or -1. */
int fs_remove_tree(const char *path);
/* Directory part of path into out (like dirname, without modifying path). */
void fs_dirname(const char *path, char *out, size_t outlen);

#endif

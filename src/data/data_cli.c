/* data_cli.c: `nmoe data <prep|verify|info|inspect|regenerate-index>`:
 * argument parsing, help text and reports over the data library. */
#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "core/fsutil.h"
#include "core/log.h"
#include "data/data_cli.h"
#include "data/manifest.h"
#include "data/npy.h"
#include "data/prep.h"
#include "data/shard_index.h"
#include "data/tokenizer.h"

static const char *USAGE_DATA =
    "usage: nmoe data <command> [args]   (nmoe data <command> --help for details)\n"
    "commands:\n"
    "  prep              tokenize jsonl / jsonl.zst / text into bucketed .npy/.idx shards\n"
    "  verify            check a prepared dataset against its manifest\n"
    "  info              summarise a manifest\n"
    "  inspect           token statistics of shards, decode sample documents\n"
    "  regenerate-index  rebuild a shard's .idx from its EOS positions\n";

static const char *USAGE_PREP =
    "usage: nmoe data prep --paths FILE|GLOB... --output DIR [options]\n"
    "  --source jsonl|jsonl_zst|text  input kind (default jsonl; text: one document per file,\n"
    "                                 doc id = relative path; directories are walked)\n"
    "  --paths P...                   input files or globs (several, or repeat the flag)\n"
    "  --text-field F                 JSON field with the text (default text)\n"
    "  --id-field F                   JSON field with the document id (default id; else\n"
    "                                 \"{file stem}:{index}\")\n"
    "  --output, -o DIR               output directory\n"
    "  --name NAME                    dataset name (default: stem of the first input)\n"
    "  --version V                    dataset version (default v1)\n"
    "  --tokenizer T                  gpt2|cl100k_base|o200k_base|o200k_harmony (default o200k_harmony)\n"
    "  --vocab-size N                 recorded vocabulary size (default: the tokenizer's)\n"
    "  --eos-token-id N               EOS appended to each document (default: the tokenizer's)\n"
    "  --num-shards N                 bucket directories, by md5(doc id) (default 64)\n"
    "  --tokens-per-shard N           rotate shard files at this many tokens (default 500000000)\n"
    "  --min-tokens N                 drop shorter documents (default 10)\n"
    "  --max-tokens N                 truncate longer documents (default 1000000)\n"
    "  --max-tokens-total N           stop after N tokens (accepts 2.5K, 100M, 1B)\n"
    "  --workers, -j N                tokenizer threads (default: number of cores)\n"
    "  --on-error fail|skip           malformed record: stop (default) or skip and count\n"
    "  --progress / --no-progress     force the progress line on/off (default: on a terminal)\n";

static const char *USAGE_VERIFY =
    "usage: nmoe data verify <manifest.json|DIR> [--checksums]\n"
    "  checks manifest fields and totals, every shard's .npy header and size, its .idx\n"
    "  (offsets contiguous, in bounds, each document ending in EOS), token ids < vocab_size,\n"
    "  leftover .tmp files and shards the manifest does not list; --checksums adds SHA-256.\n"
    "  Exit status 0 when clean, 1 otherwise.\n";

static const char *USAGE_INFO = "usage: nmoe data info <manifest.json|DIR>\n";

static const char *USAGE_INSPECT =
    "usage: nmoe data inspect <shard.npy|DIR> [--sample N] [--tokenizer T] [--eos-token-id ID]\n"
    "  token count, documents, mean/max document length, top tokens, double-EOS count;\n"
    "  --sample N decodes the first N documents of each shard (tokenizer and EOS default\n"
    "  to the nearest manifest's, else o200k_harmony).\n";

static const char *USAGE_REGEN =
    "usage: nmoe data regenerate-index <shard.npy> --eos-token-id ID\n"
    "  rewrites the shard's .idx (atomically) with one document ending at each EOS.\n";

static int is_help(const char *a) { return !strcmp(a, "--help") || !strcmp(a, "-h"); }

/* "--key=value" or "--key value": returns the value and advances *i, or NULL. */
static const char *opt_value(int argc, char **argv, int *i, const char *key) {
  const char *a = argv[*i];
  size_t n = strlen(key);
  if (strncmp(a, key, n) != 0) return NULL;
  if (a[n] == '=') return a + n + 1;
  if (a[n] != 0) return NULL;
  if (*i + 1 >= argc) nmoe_fatal("%s needs a value", key);
  return argv[++*i];
}

static int64_t parse_int(const char *flag, const char *v) {
  char *end;
  errno = 0;
  long long x = strtoll(v, &end, 10);
  if (errno || end == v || *end || x < 0) nmoe_fatal("%s: expected a non-negative integer, got '%s'", flag, v);
  return x;
}

static int64_t parse_count(const char *flag, const char *v) {
  int64_t x;
  if (prep_parse_count(v, &x)) nmoe_fatal("%s: expected a count like 1000, 2.5K, 100M or 1B, got '%s'", flag, v);
  return x;
}

static void commas(int64_t v, char *out, size_t n) {
  char tmp[32];
  snprintf(tmp, sizeof tmp, "%lld", (long long)(v < 0 ? -v : v));
  size_t len = strlen(tmp), k = 0;
  if (v < 0 && k + 1 < n) out[k++] = '-';
  for (size_t i = 0; i < len && k + 1 < n; i++) {
    if (i && (len - i) % 3 == 0) out[k++] = ',';
    out[k++] = tmp[i];
  }
  out[k] = 0;
}

static int cmd_prep(int argc, char **argv) {
  PrepOptions o;
  prep_defaults(&o);
  char **paths = xcalloc((size_t)argc + 1, sizeof *paths);
  o.paths = paths;
  const char *v;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    if (is_help(a)) {
      fputs(USAGE_PREP, stdout);
      free(paths);
      return 0;
    }
    if ((v = opt_value(argc, argv, &i, "--source"))) {
      if (!strcmp(v, "jsonl")) o.source = PREP_JSONL;
      else if (!strcmp(v, "jsonl_zst")) o.source = PREP_JSONL_ZST;
      else if (!strcmp(v, "text")) o.source = PREP_TEXT;
      else nmoe_fatal("--source: expected jsonl, jsonl_zst or text, got '%s' (huggingface, arrow and "
                      "parquet sources are not supported; convert to jsonl first)", v);
    } else if (!strcmp(a, "--paths")) {
      while (i + 1 < argc && argv[i + 1][0] != '-') paths[o.n_paths++] = argv[++i];
    } else if ((v = opt_value(argc, argv, &i, "--paths"))) {
      paths[o.n_paths++] = (char *)v;
    } else if ((v = opt_value(argc, argv, &i, "--text-field"))) {
      o.text_field = v;
    } else if ((v = opt_value(argc, argv, &i, "--id-field"))) {
      o.id_field = v;
    } else if ((v = opt_value(argc, argv, &i, "--output")) || (v = opt_value(argc, argv, &i, "-o"))) {
      o.output = v;
    } else if ((v = opt_value(argc, argv, &i, "--name"))) {
      o.name = v;
    } else if ((v = opt_value(argc, argv, &i, "--version"))) {
      o.version = v;
    } else if ((v = opt_value(argc, argv, &i, "--tokenizer"))) {
      o.tokenizer = v;
    } else if ((v = opt_value(argc, argv, &i, "--vocab-size"))) {
      o.vocab_size = parse_int("--vocab-size", v);
    } else if ((v = opt_value(argc, argv, &i, "--eos-token-id"))) {
      o.eos_token_id = parse_int("--eos-token-id", v);
    } else if ((v = opt_value(argc, argv, &i, "--num-shards"))) {
      int64_t n = parse_int("--num-shards", v);
      if (n < 1 || n > 100000) nmoe_fatal("--num-shards must be in 1..100000");
      o.num_shards = (int)n;
    } else if ((v = opt_value(argc, argv, &i, "--tokens-per-shard"))) {
      o.tokens_per_shard = parse_count("--tokens-per-shard", v);
    } else if ((v = opt_value(argc, argv, &i, "--min-tokens"))) {
      o.min_tokens = parse_count("--min-tokens", v);
    } else if ((v = opt_value(argc, argv, &i, "--max-tokens-total"))) {
      o.max_tokens_total = parse_count("--max-tokens-total", v);
    } else if ((v = opt_value(argc, argv, &i, "--max-tokens"))) {
      o.max_tokens = parse_count("--max-tokens", v);
    } else if ((v = opt_value(argc, argv, &i, "--workers")) || (v = opt_value(argc, argv, &i, "-j"))) {
      int64_t n = parse_int("--workers", v);
      if (n > 256) nmoe_fatal("--workers must be at most 256");
      o.workers = (int)n;
    } else if ((v = opt_value(argc, argv, &i, "--on-error"))) {
      if (!strcmp(v, "fail")) o.skip_errors = 0;
      else if (!strcmp(v, "skip")) o.skip_errors = 1;
      else nmoe_fatal("--on-error: expected fail or skip, got '%s'", v);
    } else if (!strcmp(a, "--progress")) {
      o.progress = 1;
    } else if (!strcmp(a, "--no-progress")) {
      o.progress = 0;
    } else {
      fputs(USAGE_PREP, stderr);
      nmoe_fatal("data prep: unknown argument '%s'", a);
    }
  }
  if (!o.output) {
    fputs(USAGE_PREP, stderr);
    nmoe_fatal("data prep: --output is required");
  }
  if (!o.n_paths) {
    fputs(USAGE_PREP, stderr);
    nmoe_fatal("data prep: --paths is required");
  }
  PrepStats st;
  char err[2048];
  int rc = prep_run(&o, &st, err, sizeof err);
  free(paths);
  if (rc) nmoe_fatal("data prep: %s", err);
  char a[32], b[32];
  commas(st.tokens, a, sizeof a);
  commas(st.kept, b, sizeof b);
  printf("prep: %s: %s documents, %s tokens in %d shards (%d bucket dirs) under %s\n",
         st.name, b, a, st.shards, st.bucket_dirs, o.output);
  printf("prep: records %lld, documents in %lld, kept %lld, skipped %lld, errored %lld, "
         "truncated %lld, invalid UTF-8 replaced %lld%s; %.2f s (%.0f tokens/s)\n",
         (long long)st.records, (long long)st.docs_in, (long long)st.kept, (long long)st.skipped,
         (long long)st.errored, (long long)st.truncated, (long long)st.invalid_utf8,
         st.hit_token_limit ? "; stopped at --max-tokens-total" : "", st.seconds,
         st.seconds > 0 ? (double)st.tokens / st.seconds : 0.0);
  return 0;
}

static int cmd_verify(int argc, char **argv) {
  const char *path = NULL;
  int checksums = 0;
  for (int i = 1; i < argc; i++) {
    if (is_help(argv[i])) {
      fputs(USAGE_VERIFY, stdout);
      return 0;
    } else if (!strcmp(argv[i], "--checksums")) {
      checksums = 1;
    } else if (argv[i][0] != '-' && !path) {
      path = argv[i];
    } else {
      fputs(USAGE_VERIFY, stderr);
      nmoe_fatal("data verify: unexpected argument '%s'", argv[i]);
    }
  }
  if (!path) {
    fputs(USAGE_VERIFY, stderr);
    nmoe_fatal("data verify: give a manifest.json or a dataset directory");
  }
  char err[2048];
  int n = manifest_verify(path, checksums, stdout, err, sizeof err);
  fflush(stdout);
  if (n < 0) nmoe_fatal("data verify: %s", err);
  char mpath[4096];
  manifest_resolve(path, mpath, sizeof mpath);
  if (n > 0) {
    printf("FAILED: %s: %d problem%s\n", mpath, n, n == 1 ? "" : "s");
    return 1;
  }
  Manifest m;
  if (manifest_read(mpath, &m, err, sizeof err)) nmoe_fatal("data verify: %s", err);
  char t[32], d[32];
  commas(m.total_tokens, t, sizeof t);
  commas(m.total_documents, d, sizeof d);
  printf("OK: %s: %d shards, %s tokens, %s documents%s\n", mpath, m.n_shards, t, d,
         checksums ? ", checksums match" : "");
  manifest_free(&m);
  return 0;
}

static int cmd_info(int argc, char **argv) {
  if (argc != 2 || argv[1][0] == '-') {
    if (argc == 2 && is_help(argv[1])) {
      fputs(USAGE_INFO, stdout);
      return 0;
    }
    fputs(USAGE_INFO, stderr);
    nmoe_fatal("data info: give one manifest.json or dataset directory");
  }
  char mpath[4096], err[2048];
  manifest_resolve(argv[1], mpath, sizeof mpath);
  Manifest m;
  if (manifest_read(mpath, &m, err, sizeof err)) nmoe_fatal("data info: %s", err);
  char t[32], d[32];
  commas(m.total_tokens, t, sizeof t);
  commas(m.total_documents, d, sizeof d);
  printf("manifest:     %s\n", mpath);
  printf("dataset:      %s (version %s)\n", m.dataset, m.version);
  printf("tokenizer:    %s (vocab_size %lld, eos_token_id %lld, dtype %s)\n", m.tokenizer,
         (long long)m.vocab_size, (long long)m.eos_token_id, m.dtype);
  printf("created_at:   %s\n", m.created_at);
  printf("source:       %s\n", m.source ? m.source : "-");
  printf("tokens:       %s (%.1f MB of shard data)\n", t, (double)m.total_tokens * 4 / 1e6);
  printf("documents:    %s (mean %.1f tokens incl. EOS)\n", d,
         m.total_documents ? (double)m.total_tokens / (double)m.total_documents : 0.0);
  printf("shards:       %lld", (long long)m.num_shards);
  if (m.num_shard_dirs >= 0) printf(" in %d bucket dirs", m.num_shard_dirs);
  printf("\n");
  int show = m.n_shards <= 20 ? m.n_shards : 10;
  for (int i = 0; i < show; i++)
    printf("  %-48s %12lld tokens %9lld docs\n", m.shards[i].path,
           (long long)m.shards[i].num_tokens, (long long)m.shards[i].num_documents);
  if (show < m.n_shards) printf("  ... %d more\n", m.n_shards - show);
  manifest_free(&m);
  return 0;
}

/* ---------------------------------------------------------------- inspect */

static int cmp_cstr(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

static void collect_npy(const char *dir, char ***out, int *n, int *cap) {
  DIR *d = opendir(dir);
  if (!d) return;
  struct dirent *e;
  while ((e = readdir(d))) {
    if (e->d_name[0] == '.') continue;
    char p[8192];
    snprintf(p, sizeof p, "%s/%s", dir, e->d_name);
    size_t len = strlen(e->d_name);
    if (fs_is_dir(p)) {
      collect_npy(p, out, n, cap);
    } else if (len > 4 && !strcmp(e->d_name + len - 4, ".npy")) {
      if (*n == *cap) {
        *cap = *cap ? 2 * *cap : 16;
        *out = xrealloc(*out, (size_t)*cap * sizeof **out);
      }
      (*out)[(*n)++] = xstrdup(p);
    }
  }
  closedir(d);
}

/* The manifest next to a shard (its dir, then the parent's), if any. */
static int nearest_manifest(const char *shard, Manifest *m) {
  char dir[4096], p[4200], err[1024];
  fs_dirname(shard, dir, sizeof dir);
  for (int up = 0; up < 2; up++) {
    snprintf(p, sizeof p, "%s/manifest.json", dir);
    if (fs_exists(p) && manifest_read(p, m, err, sizeof err) == 0) return 0;
    char parent[4096];
    fs_dirname(dir, parent, sizeof parent);
    snprintf(dir, sizeof dir, "%s", parent);
  }
  return -1;
}

typedef struct TokCount { uint32_t id; int64_t n; } TokCount;
#define INSPECT_MAX_IDS ((uint64_t)1 << 22) /* ids ranked by `data inspect`; vocabularies are far smaller */

static int cmp_count(const void *a, const void *b) {
  const TokCount *x = a, *y = b;
  if (x->n != y->n) return x->n < y->n ? 1 : -1;
  return x->id < y->id ? -1 : x->id > y->id;
}

static void inspect_shard(const char *path, int sample, const char *tok_name, int64_t eos_opt) {
  char err[2048];
  TokenShard s;
  if (shard_map(path, &s, err, sizeof err)) nmoe_fatal("data inspect: %s", err);
  Manifest m;
  int have_m = nearest_manifest(path, &m) == 0;
  int64_t eos = eos_opt >= 0 ? eos_opt : have_m ? m.eos_token_id : 199999;
  const char *tname = tok_name ? tok_name : have_m ? m.tokenizer : "o200k_harmony";
  uint32_t maxid = 0;
  int64_t n_eos = 0, double_eos = 0;
  for (int64_t i = 0; i < s.n; i++) {
    uint32_t t = s.tokens[i];
    if (t > maxid) maxid = t;
    if (t == (uint32_t)eos) {
      n_eos++;
      if (i > 0 && s.tokens[i - 1] == (uint32_t)eos) double_eos++;
    }
  }
  /* documents: from the .idx when it reads, else EOS-delimited */
  char idxp[4200];
  idx_path_for(path, idxp, sizeof idxp);
  uint64_t *pairs = NULL, nd = 0;
  const char *doc_src = "idx";
  if (!fs_exists(idxp) || idx_read(idxp, &pairs, &nd, err, sizeof err)) {
    if (fs_exists(idxp)) printf("  warning: %s\n", err);
    nd = idx_from_eos(s.tokens, s.n, (uint32_t)eos, &pairs);
    doc_src = "EOS positions";
  }
  uint64_t maxlen = 0, sumlen = 0;
  for (uint64_t i = 0; i < nd; i++) {
    uint64_t len = pairs[2 * i + 1] - pairs[2 * i];
    sumlen += len;
    if (len > maxlen) maxlen = len;
  }
  char a[32], b[32];
  commas(s.n, a, sizeof a);
  commas((int64_t)nd, b, sizeof b);
  printf("%s\n  tokens %s, documents %s (from %s), mean length %.1f, max %llu (incl. EOS)\n", path,
         a, b, doc_src, nd ? (double)sumlen / (double)nd : 0.0, (unsigned long long)maxlen);
  printf("  max token id %u, EOS %lld: %lld, double EOS: %lld%s\n", maxid, (long long)eos,
         (long long)n_eos, (long long)double_eos, double_eos ? " (empty documents?)" : "");
  if (s.n > 0) {
    /* Ranks ids below INSPECT_MAX_IDS only: a corrupt shard's ids (up to
     * 2^32-1) would size the table at 64 GB, and the shard being inspected
     * is often the corrupt one. */
    uint64_t nid = (uint64_t)maxid + 1 < INSPECT_MAX_IDS ? (uint64_t)maxid + 1 : INSPECT_MAX_IDS;
    int64_t beyond = 0;
    TokCount *c = xcalloc(nid, sizeof *c);
    for (uint64_t i = 0; i < nid; i++) c[i].id = (uint32_t)i;
    for (int64_t i = 0; i < s.n; i++) {
      if (s.tokens[i] < nid) c[s.tokens[i]].n++;
      else beyond++;
    }
    qsort(c, nid, sizeof *c, cmp_count);
    printf("  top tokens:");
    for (uint64_t i = 0; i < 10 && i < nid && c[i].n; i++)
      printf(" %u(%.2f%%)", c[i].id, 100.0 * (double)c[i].n / (double)s.n);
    if (beyond)
      printf(" (%lld tokens with ids >= %llu not ranked: corrupt shard?)", (long long)beyond,
             (unsigned long long)INSPECT_MAX_IDS);
    printf("\n");
    free(c);
  }
  if (sample > 0 && nd > 0) {
    Tokenizer *t = tok_open(tname, err, sizeof err);
    if (!t) {
      printf("  (cannot decode samples: %s)\n", err);
    } else {
      for (uint64_t i = 0; i < nd && i < (uint64_t)sample; i++) {
        uint64_t lo = pairs[2 * i], hi = pairs[2 * i + 1];
        if (hi > (uint64_t)s.n || lo >= hi) break;
        size_t outlen;
        char *text = tok_decode(t, s.tokens + lo, (size_t)(hi - lo), &outlen);
        printf("  --- document %llu (%llu tokens) ---\n", (unsigned long long)i,
               (unsigned long long)(hi - lo));
        if (!text) printf("  (ids outside the %s vocabulary)\n", tname);
        else printf("%.*s%s\n", outlen > 600 ? 600 : (int)outlen, text, outlen > 600 ? " [...]" : "");
        free(text);
      }
      tok_close(t);
    }
  }
  free(pairs);
  if (have_m) manifest_free(&m);
  shard_unmap(&s);
}

static int cmd_inspect(int argc, char **argv) {
  const char *path = NULL, *tok = NULL, *v;
  int sample = 0;
  int64_t eos = -1;
  for (int i = 1; i < argc; i++) {
    if (is_help(argv[i])) {
      fputs(USAGE_INSPECT, stdout);
      return 0;
    } else if ((v = opt_value(argc, argv, &i, "--sample"))) {
      sample = (int)parse_int("--sample", v);
    } else if ((v = opt_value(argc, argv, &i, "--tokenizer"))) {
      tok = v;
    } else if ((v = opt_value(argc, argv, &i, "--eos-token-id"))) {
      eos = parse_int("--eos-token-id", v);
    } else if (argv[i][0] != '-' && !path) {
      path = argv[i];
    } else {
      fputs(USAGE_INSPECT, stderr);
      nmoe_fatal("data inspect: unexpected argument '%s'", argv[i]);
    }
  }
  if (!path) {
    fputs(USAGE_INSPECT, stderr);
    nmoe_fatal("data inspect: give a shard .npy or a directory");
  }
  if (!fs_is_dir(path)) {
    if (!fs_exists(path)) nmoe_fatal("data inspect: %s: no such file", path);
    inspect_shard(path, sample, tok, eos);
    return 0;
  }
  char **files = NULL;
  int n = 0, cap = 0;
  collect_npy(path, &files, &n, &cap);
  if (!n) nmoe_fatal("data inspect: no .npy shards under %s", path);
  qsort(files, (size_t)n, sizeof *files, cmp_cstr);
  for (int i = 0; i < n; i++) {
    inspect_shard(files[i], sample, tok, eos);
    free(files[i]);
  }
  free(files);
  return 0;
}

static int cmd_regenerate_index(int argc, char **argv) {
  const char *path = NULL, *v;
  int64_t eos = -1;
  for (int i = 1; i < argc; i++) {
    if (is_help(argv[i])) {
      fputs(USAGE_REGEN, stdout);
      return 0;
    } else if ((v = opt_value(argc, argv, &i, "--eos-token-id"))) {
      eos = parse_int("--eos-token-id", v);
    } else if (argv[i][0] != '-' && !path) {
      path = argv[i];
    } else {
      fputs(USAGE_REGEN, stderr);
      nmoe_fatal("data regenerate-index: unexpected argument '%s'", argv[i]);
    }
  }
  if (!path || eos < 0 || eos > UINT32_MAX) {
    fputs(USAGE_REGEN, stderr);
    nmoe_fatal("data regenerate-index: give a shard .npy and --eos-token-id");
  }
  char err[2048], idxp[4200];
  TokenShard s;
  if (shard_map(path, &s, err, sizeof err)) nmoe_fatal("data regenerate-index: %s", err);
  uint64_t *pairs;
  uint64_t nd = idx_from_eos(s.tokens, s.n, (uint32_t)eos, &pairs);
  uint64_t tail = (uint64_t)s.n - (nd ? pairs[2 * nd - 1] : 0);
  idx_path_for(path, idxp, sizeof idxp);
  int rc = idx_write(idxp, pairs, nd, err, sizeof err);
  free(pairs);
  shard_unmap(&s);
  if (rc) nmoe_fatal("data regenerate-index: %s", err);
  printf("wrote %s: %llu documents\n", idxp, (unsigned long long)nd);
  if (tail) log_warn("%s: %llu tokens after the last EOS belong to no document", path,
                     (unsigned long long)tail);
  return 0;
}

int data_main(int argc, char **argv) {
  if (argc < 2 || is_help(argv[1])) {
    fputs(USAGE_DATA, argc < 2 ? stderr : stdout);
    return argc < 2 ? 2 : 0;
  }
  const char *cmd = argv[1];
  if (!strcmp(cmd, "prep")) return cmd_prep(argc - 1, argv + 1);
  if (!strcmp(cmd, "verify")) return cmd_verify(argc - 1, argv + 1);
  if (!strcmp(cmd, "info")) return cmd_info(argc - 1, argv + 1);
  if (!strcmp(cmd, "inspect")) return cmd_inspect(argc - 1, argv + 1);
  if (!strcmp(cmd, "regenerate-index")) return cmd_regenerate_index(argc - 1, argv + 1);
  fputs(USAGE_DATA, stderr);
  nmoe_fatal("data: unknown command '%s'", cmd);
}

/* test_prep.c: `nmoe data prep`: determinism across worker counts, filters,
 * doc ids and buckets, jsonl.zst, every bad-input path (one clear message,
 * nothing left that looks valid), and a prep killed mid-write. */
#include "data_test_util.h"

#include <signal.h>
#include <zstd.h>

#include "core/log.h"
#include "data/manifest.h"
#include "data/npy.h"
#include "data/prep.h"
#include "data/shard_index.h"
#include "data/shard_writer.h"
#include "data/tokenizer.h"

/* n jsonl records; every third has no id; lengths vary from 1 to ~60 words. */
static void write_corpus(const char *path, int n) {
  FILE *f = fopen(path, "w");
  assert_non_null(f);
  const char *words[] = {"alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"};
  for (int i = 0; i < n; i++) {
    if (i % 3) fprintf(f, "{\"id\": \"d%d\", \"text\": \"", i);
    else fprintf(f, "{\"text\": \"");
    for (int k = 0; k < (i * 13) % 60 + 1; k++) fprintf(f, "%s%s", k ? " " : "", words[(i + k * k) % 8]);
    fprintf(f, " number %d.\\n\"}\n", i);
    if (i % 50 == 7) fprintf(f, "\n"); /* blank lines are not records */
  }
  fclose(f);
}

static PrepOptions opts(char **paths, int n, const char *out) {
  PrepOptions o;
  prep_defaults(&o);
  o.paths = paths;
  o.n_paths = n;
  o.output = out;
  o.name = "t";
  o.tokenizer = "gpt2";
  o.num_shards = 4;
  o.min_tokens = 1;
  o.progress = 0;
  o.workers = 2;
  return o;
}

/* True when nothing under dir looks like shard output (no .npy/.idx/manifest). */
static int no_output(const char *dir) {
  char cmd[2400];
  snprintf(cmd, sizeof cmd,
           "test -z \"$(find %s \\( -name '*.npy' -o -name '*.idx' -o -name 'manifest.json' -o -name '*.tmp*' \\) 2>/dev/null)\"",
           dir);
  return system(cmd) == 0;
}

static int verify_count(const char *dir) {
  char err[1024];
  FILE *devnull = fopen("/dev/null", "w");
  int n = manifest_verify(dir, 1, devnull, err, sizeof err);
  fclose(devnull);
  return n;
}

static void test_deterministic_across_workers(void **state) {
  use_repo_tokenizers();
  char *d = tmpdir_make();
  char in[512], out1[512], out3[512], err[1024], cmd[1600];
  snprintf(in, sizeof in, "%s/in.jsonl", d);
  snprintf(out1, sizeof out1, "%s/o1", d);
  snprintf(out3, sizeof out3, "%s/o3", d);
  write_corpus(in, 700);
  char *paths[] = {in};
  setenv("SOURCE_DATE_EPOCH", "1700000000", 1);
  PrepOptions o = opts(paths, 1, out1);
  o.workers = 1;
  o.tokens_per_shard = 3000;
  PrepStats s1, s3;
  assert_int_equal(prep_run(&o, &s1, err, sizeof err), 0);
  o.output = out3;
  o.workers = 3;
  assert_int_equal(prep_run(&o, &s3, err, sizeof err), 0);
  unsetenv("SOURCE_DATE_EPOCH");
  assert_int_equal(s1.kept, 700);
  assert_int_equal(s1.records, 700);
  assert_int_equal(s1.tokens, s3.tokens);
  assert_true(s1.shards > 4); /* rotation happened */
  snprintf(cmd, sizeof cmd, "diff -r %s %s", out1, out3);
  assert_int_equal(system(cmd), 0);
  assert_int_equal(verify_count(out1), 0);
  /* numpy reads every shard, and documents end with EOS */
  assert_int_equal(run_python("import json, numpy as np\n"
                              "m = json.load(open('%s/manifest.json'))\n"
                              "n = 0\n"
                              "for s in m['shards']:\n"
                              "    a = np.load('%s/' + s['path'])\n"
                              "    assert a.dtype == np.uint32 and len(a) == s['num_tokens']\n"
                              "    n += int((a == 50256).sum())\n"
                              "assert n == 700 == m['total_documents']\n",
                              out1, out1), 0);
  rm_tree(d);
}

static void test_filters_and_truncation(void **state) {
  use_repo_tokenizers();
  char *d = tmpdir_make();
  char in[512], out[512], err[1024];
  snprintf(in, sizeof in, "%s/in.jsonl", d);
  snprintf(out, sizeof out, "%s/o", d);
  const char *data =
      "{\"id\": \"short\", \"text\": \"hi\"}\n"
      "{\"id\": \"empty\", \"text\": \"\"}\n"
      "{\"id\": \"spaces\", \"text\": \"   \\n\\t \"}\n"
      "{\"id\": \"long\", \"text\": \"one two three four five six seven eight nine ten eleven twelve\"}\n"
      "{\"id\": \"mid\", \"text\": \"one two three four\"}\n";
  write_file(in, data, strlen(data));
  char *paths[] = {in};
  PrepOptions o = opts(paths, 1, out);
  o.num_shards = 1;
  o.min_tokens = 3;
  o.max_tokens = 5;
  PrepStats st;
  assert_int_equal(prep_run(&o, &st, err, sizeof err), 0);
  assert_int_equal(st.kept, 2);
  assert_int_equal(st.truncated, 1);
  assert_int_equal(st.skipped, 3); /* short (1 token), empty text, whitespace only */
  assert_int_equal(st.docs_in, 4); /* the empty text takes no document index */
  char idx[600];
  snprintf(idx, sizeof idx, "%s/shard_0000/t-v1-shard-000000.idx", out);
  uint64_t *pairs, nd;
  assert_int_equal(idx_read(idx, &pairs, &nd, err, sizeof err), 0);
  assert_int_equal(nd, 2);
  assert_int_equal(pairs[1] - pairs[0], 6); /* "long" cut to 5 tokens + EOS */
  assert_int_equal(pairs[3] - pairs[2], 5); /* "mid": 4 tokens + EOS */
  free(pairs);
  rm_tree(d);
}

/* The first document of bucket b's first shard, without its EOS. */
static void first_doc(const char *out, int b, uint32_t **ids, size_t *n) {
  char npy[600], idx[600], err[1024];
  snprintf(npy, sizeof npy, "%s/shard_%04d/t-v1-shard-000000.npy", out, b);
  idx_path_for(npy, idx, sizeof idx);
  TokenShard s;
  assert_int_equal(shard_map(npy, &s, err, sizeof err), 0);
  uint64_t *pairs, nd;
  assert_int_equal(idx_read(idx, &pairs, &nd, err, sizeof err), 0);
  *n = (size_t)(pairs[1] - pairs[0] - 1);
  *ids = malloc(*n * 4 + 4);
  memcpy(*ids, s.tokens + pairs[0], *n * 4);
  free(pairs);
  shard_unmap(&s);
}

static void expect_doc_in_bucket(const char *out, const char *doc_id, int buckets, const char *text) {
  char err[512];
  Tokenizer *t = tok_open("gpt2", err, sizeof err);
  assert_non_null(t);
  uint32_t *want = NULL, *got;
  size_t cap = 0, ng;
  size_t nw = tok_encode(t, text, strlen(text), &want, &cap);
  first_doc(out, shard_bucket(doc_id, strlen(doc_id), buckets), &got, &ng);
  assert_int_equal(ng, nw);
  assert_memory_equal(got, want, nw * 4);
  free(want);
  free(got);
  tok_close(t);
}

static void test_doc_ids_and_buckets(void **state) {
  use_repo_tokenizers();
  char *d = tmpdir_make();
  char in[512], out[512], err[1024];
  snprintf(in, sizeof in, "%s/docs.jsonl", d);
  snprintf(out, sizeof out, "%s/o", d);
  /* no id field: "{file stem}:{index}"; integer ids become decimal strings */
  const char *data = "{\"text\": \"The first document.\"}\n"
                     "{\"text\": \"\"}\n"
                     "{\"text\": \"  The second document.  \"}\n"
                     "{\"id\": 12345, \"text\": \"Numbered.\"}\n";
  write_file(in, data, strlen(data));
  char *paths[] = {in};
  PrepOptions o = opts(paths, 1, out);
  o.num_shards = 1024; /* ids land in distinct buckets */
  PrepStats st;
  assert_int_equal(prep_run(&o, &st, err, sizeof err), 0);
  expect_doc_in_bucket(out, "docs:0", 1024, "The first document.");
  expect_doc_in_bucket(out, "docs:1", 1024, "The second document.");
  expect_doc_in_bucket(out, "12345", 1024, "Numbered.");
  /* text source: one document per file, id = path relative to the directory given */
  char dir[600], p[700], out2[600];
  snprintf(dir, sizeof dir, "%s/txt", d);
  snprintf(p, sizeof p, "%s/txt/sub", d);
  assert_int_equal(fs_mkdirs(p, err, sizeof err), 0);
  snprintf(p, sizeof p, "%s/txt/a.txt", d);
  write_file(p, "\n  File A text.\n", 16);
  snprintf(p, sizeof p, "%s/txt/sub/b.txt", d);
  write_file(p, "File B text.", 12);
  snprintf(out2, sizeof out2, "%s/o2", d);
  char *tpaths[] = {dir};
  o = opts(tpaths, 1, out2);
  o.source = PREP_TEXT;
  o.num_shards = 1024;
  assert_int_equal(prep_run(&o, &st, err, sizeof err), 0);
  assert_int_equal(st.kept, 2);
  expect_doc_in_bucket(out2, "a.txt", 1024, "File A text.");
  expect_doc_in_bucket(out2, "sub/b.txt", 1024, "File B text.");
  rm_tree(d);
}

static void test_malformed_lines(void **state) {
  use_repo_tokenizers();
  char *d = tmpdir_make();
  char in[512], out[512], err[1024];
  snprintf(in, sizeof in, "%s/in.jsonl", d);
  snprintf(out, sizeof out, "%s/o", d);
  /* enough good documents before the bad line that shards rotate first */
  FILE *f = fopen(in, "w");
  for (int i = 0; i < 300; i++) fprintf(f, "{\"id\": \"%d\", \"text\": \"document %d is fine\"}\n", i, i);
  fprintf(f, "{\"id\": \"bad\", \"text\": \"unterminated}\n");
  fprintf(f, "{\"id\": \"after\", \"text\": \"still fine\"}\n");
  fclose(f);
  char *paths[] = {in};
  PrepOptions o = opts(paths, 1, out);
  o.tokens_per_shard = 100;
  PrepStats st;
  assert_int_equal(prep_run(&o, &st, err, sizeof err), -1);
  char where[600];
  snprintf(where, sizeof where, "%s:301: malformed JSON", in);
  if (!strstr(err, where)) fail_msg("error '%s' lacks '%s'", err, where);
  assert_true(no_output(out));
  o.skip_errors = 1;
  assert_int_equal(prep_run(&o, &st, err, sizeof err), 0);
  assert_int_equal(st.errored, 1);
  assert_int_equal(st.kept, 301);
  assert_int_equal(verify_count(out), 0);
  /* through the CLI: fatal exit status, one line naming file:line */
  char out2[600];
  snprintf(out2, sizeof out2, "%s/o2", d);
  CliResult r;
  CLI(&r, "data", "prep", "--paths", in, "-o", out2, "--tokenizer", "gpt2", "--no-progress");
  assert_int_equal(r.status, 1);
  if (!strstr(r.out, "nmoe: error: data prep: ") || !strstr(r.out, where)) fail_msg("output: %s", r.out);
  assert_true(no_output(out2));
  CLI(&r, "data", "prep", "--paths", in, "-o", out2, "--tokenizer", "gpt2", "--on-error", "skip",
      "--min-tokens", "1");
  assert_int_equal(r.status, 0);
  assert_non_null(strstr(r.out, "errored 1"));
  assert_non_null(strstr(r.out, "(skipped)"));
  rm_tree(d);
}

static void test_missing_text_field(void **state) {
  use_repo_tokenizers();
  char *d = tmpdir_make();
  char in[512], out[512], err[1024], want[700];
  snprintf(in, sizeof in, "%s/in.jsonl", d);
  snprintf(out, sizeof out, "%s/o", d);
  const char *data = "{\"text\": \"a fine document here\"}\n\n{\"body\": \"wrong field\"}\n";
  write_file(in, data, strlen(data));
  char *paths[] = {in};
  PrepOptions o = opts(paths, 1, out);
  PrepStats st;
  assert_int_equal(prep_run(&o, &st, err, sizeof err), -1);
  snprintf(want, sizeof want, "%s:3: no \"text\" field", in);
  if (!strstr(err, want)) fail_msg("error '%s' lacks '%s'", err, want);
  assert_true(no_output(out));
  /* a JSON value that is not an object */
  write_file(in, "[1, 2]\n", 7);
  assert_int_equal(prep_run(&o, &st, err, sizeof err), -1);
  assert_non_null(strstr(err, ":1: expected a JSON object"));
  rm_tree(d);
}

static void test_empty_input(void **state) {
  use_repo_tokenizers();
  char *d = tmpdir_make();
  char in[512], out[512], err[1024];
  snprintf(in, sizeof in, "%s/in.jsonl", d);
  snprintf(out, sizeof out, "%s/o", d);
  char *paths[] = {in};
  PrepOptions o = opts(paths, 1, out);
  PrepStats st;
  write_file(in, "", 0);
  assert_int_equal(prep_run(&o, &st, err, sizeof err), -1);
  assert_non_null(strstr(err, "no documents"));
  assert_false(fs_exists(out));
  write_file(in, "\n  \n\n", 5);
  assert_int_equal(prep_run(&o, &st, err, sizeof err), -1);
  assert_non_null(strstr(err, "no documents"));
  /* every document filtered out is the same: nothing written */
  write_file(in, "{\"text\": \"hi\"}\n", 15);
  o.min_tokens = 10;
  assert_int_equal(prep_run(&o, &st, err, sizeof err), -1);
  assert_non_null(strstr(err, "no documents"));
  assert_false(fs_exists(out));
  rm_tree(d);
}

static void test_invalid_utf8_replaced(void **state) {
  use_repo_tokenizers();
  char *d = tmpdir_make();
  char in[512], out[512], err[1024];
  snprintf(in, sizeof in, "%s/in.jsonl", d);
  snprintf(out, sizeof out, "%s/o", d);
  const char *data = "{\"id\": \"x\", \"text\": \"caf\xff\xfe ok\"}\n{\"id\": \"y\", \"text\": \"fine\"}\n";
  write_file(in, data, strlen(data));
  char *paths[] = {in};
  PrepOptions o = opts(paths, 1, out);
  o.num_shards = 1024;
  PrepStats st;
  assert_int_equal(prep_run(&o, &st, err, sizeof err), 0);
  assert_int_equal(st.invalid_utf8, 1);
  assert_int_equal(st.kept, 2);
  expect_doc_in_bucket(out, "x", 1024, "caf\xef\xbf\xbd\xef\xbf\xbd ok");
  rm_tree(d);
}

static void test_bad_paths(void **state) {
  use_repo_tokenizers();
  char *d = tmpdir_make();
  char in[512], out[600], err[1024], file[512];
  snprintf(in, sizeof in, "%s/in.jsonl", d);
  write_corpus(in, 20);
  snprintf(file, sizeof file, "%s/plainfile", d);
  write_file(file, "x", 1);
  /* output under a regular file */
  snprintf(out, sizeof out, "%s/plainfile/out", d);
  char *paths[] = {in};
  PrepOptions o = opts(paths, 1, out);
  PrepStats st;
  assert_int_equal(prep_run(&o, &st, err, sizeof err), -1);
  assert_non_null(strstr(err, "not a directory"));
  /* missing input file, glob with no match, a directory for jsonl */
  snprintf(out, sizeof out, "%s/o", d);
  char missing[600], glob[600];
  snprintf(missing, sizeof missing, "%s/nope.jsonl", d);
  snprintf(glob, sizeof glob, "%s/*.nothing", d);
  char *p1[] = {in, missing};
  o = opts(p1, 2, out);
  assert_int_equal(prep_run(&o, &st, err, sizeof err), -1);
  assert_non_null(strstr(err, "input file not found"));
  assert_non_null(strstr(err, missing));
  char *p2[] = {glob};
  o = opts(p2, 1, out);
  assert_int_equal(prep_run(&o, &st, err, sizeof err), -1);
  assert_non_null(strstr(err, "no input files match"));
  char *p3[] = {d};
  o = opts(p3, 1, out);
  assert_int_equal(prep_run(&o, &st, err, sizeof err), -1);
  assert_non_null(strstr(err, "is a directory"));
  assert_true(no_output(d));
  /* unknown tokenizer */
  o = opts(paths, 1, out);
  o.tokenizer = "no_such_tokenizer";
  assert_int_equal(prep_run(&o, &st, err, sizeof err), -1);
  assert_true(no_output(d));
  /* CLI: unknown flag and a missing file exit non-zero with one message */
  CliResult r;
  CLI(&r, "data", "prep", "--paths", missing, "-o", out, "--tokenizer", "gpt2");
  assert_int_equal(r.status, 1);
  assert_non_null(strstr(r.out, "nmoe: error: data prep: input file not found"));
  CLI(&r, "data", "prep", "--bogus");
  assert_int_not_equal(r.status, 0);
  assert_non_null(strstr(r.out, "unknown argument '--bogus'"));
  CLI(&r, "data", "prep", "--help");
  assert_int_equal(r.status, 0);
  assert_non_null(strstr(r.out, "--tokens-per-shard"));
  rm_tree(d);
}

static void test_jsonl_zst_and_glob(void **state) {
  use_repo_tokenizers();
  char *d = tmpdir_make();
  char in[512], zin[512], out1[512], out2[512], err[1024], cmd[1600];
  snprintf(in, sizeof in, "%s/in.jsonl", d);
  snprintf(zin, sizeof zin, "%s/in.jsonl.zst", d);
  snprintf(out1, sizeof out1, "%s/o1", d);
  snprintf(out2, sizeof out2, "%s/o2", d);
  write_corpus(in, 200);
  size_t n;
  char *raw = fs_read_all(in, &n, err, sizeof err);
  size_t cap = ZSTD_compressBound(n);
  char *z = malloc(cap);
  size_t zn = ZSTD_compress(z, cap, raw, n, 3);
  assert_false(ZSTD_isError(zn));
  write_file(zin, z, zn);
  /* with ids for every record the bucket layout is the same from either file */
  char *p1[] = {in};
  PrepOptions o = opts(p1, 1, out1);
  o.id_field = "";
  o.name = "t";
  PrepStats s1, s2;
  assert_int_equal(prep_run(&o, &s1, err, sizeof err), 0);
  char pat[600];
  snprintf(pat, sizeof pat, "%s/*.zst", d);
  char *p2[] = {pat};
  o = opts(p2, 1, out2);
  o.source = PREP_JSONL_ZST;
  o.id_field = "";
  assert_int_equal(prep_run(&o, &s2, err, sizeof err), 0);
  assert_int_equal(s1.tokens, s2.tokens);
  /* stems differ ("in" vs "in.jsonl"), so doc ids and buckets differ: compare token multisets */
  assert_int_equal(run_python("import json, numpy as np\n"
                              "def toks(r):\n"
                              "    m = json.load(open(r + '/manifest.json'))\n"
                              "    return np.sort(np.concatenate([np.load(r + '/' + s['path']) for s in m['shards']]))\n"
                              "assert (toks('%s') == toks('%s')).all()\n", out1, out2), 0);
  /* a truncated stream is an error naming the file; failing before any
   * document is written leaves the earlier dataset there untouched, and a
   * fresh output empty */
  write_file(zin, z, zn / 2);
  assert_int_equal(prep_run(&o, &s2, err, sizeof err), -1);
  assert_non_null(strstr(err, "zstd"));
  assert_non_null(strstr(err, zin));
  assert_int_equal(verify_count(out2), 0);
  snprintf(cmd, sizeof cmd, "%s/o3", d);
  o.output = cmd;
  assert_int_equal(prep_run(&o, &s2, err, sizeof err), -1);
  assert_true(no_output(cmd));
  free(raw);
  free(z);
  rm_tree(d);
}

static void test_max_tokens_total(void **state) {
  use_repo_tokenizers();
  char *d = tmpdir_make();
  char in[512], out[512], err[1024];
  snprintf(in, sizeof in, "%s/in.jsonl", d);
  snprintf(out, sizeof out, "%s/o", d);
  write_corpus(in, 500);
  char *paths[] = {in};
  PrepOptions o = opts(paths, 1, out);
  int64_t lim;
  assert_int_equal(prep_parse_count("2.5K", &lim), 0);
  assert_int_equal(lim, 2500);
  o.max_tokens_total = lim;
  PrepStats st;
  assert_int_equal(prep_run(&o, &st, err, sizeof err), 0);
  assert_true(st.hit_token_limit);
  assert_true(st.tokens >= 2500 && st.tokens < 2500 + 200);
  assert_true(st.kept < 500);
  assert_int_equal(verify_count(out), 0);
  int64_t v;
  assert_int_equal(prep_parse_count("100M", &v), 0);
  assert_int_equal(v, 100000000);
  assert_int_equal(prep_parse_count("1B", &v), 0);
  assert_int_equal(v, 1000000000);
  assert_int_equal(prep_parse_count("12", &v), 0);
  assert_int_equal(v, 12);
  assert_int_equal(prep_parse_count("1X", &v), -1);
  assert_int_equal(prep_parse_count("", &v), -1);
  assert_int_equal(prep_parse_count("-5", &v), -1);
  rm_tree(d);
}

/* kill -9 in the middle of writing: nothing may look complete; the next prep
 * to the same output cleans up and succeeds. */
static void test_killed_prep(void **state) {
  use_repo_tokenizers();
  char *d = tmpdir_make();
  char in[512], out[512], err[1024], cmd[1400];
  snprintf(in, sizeof in, "%s/in.jsonl", d);
  snprintf(out, sizeof out, "%s/o", d);
  write_corpus(in, 3000);
  char *paths[] = {in};
  PrepOptions o = opts(paths, 1, out);
  o.num_shards = 2;
  o.tokens_per_shard = 500;
  pid_t pid = fork();
  assert_true(pid >= 0);
  if (pid == 0) {
    setenv("NMOE_TEST_SLOW_WRITE", "1", 1);
    PrepStats st;
    _exit(prep_run(&o, &st, err, sizeof err) == 0 ? 0 : 1);
  }
  /* wait until at least one shard has been completed and renamed */
  snprintf(cmd, sizeof cmd, "test -n \"$(find %s -name '*-shard-000001.npy' 2>/dev/null)\"", out);
  int seen = 0;
  for (int i = 0; i < 400 && !seen; i++) {
    usleep(25000);
    seen = system(cmd) == 0;
  }
  kill(pid, SIGKILL);
  int ws;
  waitpid(pid, &ws, 0);
  assert_true(seen);
  assert_true(WIFSIGNALED(ws));
  char mp[600];
  snprintf(mp, sizeof mp, "%s/manifest.json", out);
  assert_false(fs_exists(mp));
  CliResult r;
  CLI(&r, "data", "verify", out);
  assert_int_equal(r.status, 1);
  assert_non_null(strstr(r.out, "no manifest"));
  assert_non_null(strstr(r.out, "not listed"));
  /* rerun: stale shards and .tmp files go, and the result verifies */
  PrepStats st;
  assert_int_equal(prep_run(&o, &st, err, sizeof err), 0);
  assert_int_equal(verify_count(out), 0);
  snprintf(cmd, sizeof cmd, "test -z \"$(find %s -name '*.tmp*')\"", out);
  assert_int_equal(system(cmd), 0);
  rm_tree(d);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_deterministic_across_workers),
      cmocka_unit_test(test_filters_and_truncation),
      cmocka_unit_test(test_doc_ids_and_buckets),
      cmocka_unit_test(test_malformed_lines),
      cmocka_unit_test(test_missing_text_field),
      cmocka_unit_test(test_empty_input),
      cmocka_unit_test(test_invalid_utf8_replaced),
      cmocka_unit_test(test_bad_paths),
      cmocka_unit_test(test_jsonl_zst_and_glob),
      cmocka_unit_test(test_max_tokens_total),
      cmocka_unit_test(test_killed_prep),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}

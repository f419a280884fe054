/* test_shards.c: token shard formats: .npy headers (interchange with numpy
 * both ways, rejected edge cases), .idx round trips, the shard writer's
 * bucketing, rotation and manifests, and what `data verify` and
 * `data regenerate-index` find and fix. */
#include "data_test_util.h"

#include "core/hash.h"
#include "data/manifest.h"
#include "data/npy.h"
#include "data/shard_index.h"
#include "data/shard_writer.h"

static ShardWriterConfig cfg_for(const char *out, int buckets, int64_t per_shard) {
  ShardWriterConfig c = {.output = out, .name = "t", .version = "v1", .tokenizer = "gpt2",
                         .source = "unit", .vocab_size = 1000, .eos_id = 999,
                         .num_buckets = buckets, .tokens_per_shard = per_shard};
  return c;
}

/* Document i: (i % 40) + 1 tokens, ids (i*7 + k) % 900. */
static size_t doc_tokens(int i, uint32_t *ids) {
  size_t n = (size_t)(i % 40) + 1;
  for (size_t k = 0; k < n; k++) ids[k] = (uint32_t)((i * 7 + (int)k) % 900);
  return n;
}

/* Writes ndocs documents ("doc-<i>") and finishes. */
static void write_dataset(const char *out, int buckets, int64_t per_shard, int ndocs) {
  char err[1024];
  ShardWriterConfig c = cfg_for(out, buckets, per_shard);
  ShardWriter *w = shard_writer_open(&c, err, sizeof err);
  assert_non_null(w);
  uint32_t ids[64];
  for (int i = 0; i < ndocs; i++) {
    char id[32];
    int n = snprintf(id, sizeof id, "doc-%d", i);
    size_t len = doc_tokens(i, ids);
    assert_int_equal(shard_writer_add(w, id, (size_t)n, ids, len, err, sizeof err), 0);
  }
  ShardWriterStats st;
  assert_int_equal(shard_writer_finish(w, &st, err, sizeof err), 0);
}

static void test_npy_header_matches_numpy(void **state) {
  char *d = tmpdir_make();
  char p[512], err[512];
  snprintf(p, sizeof p, "%s/a.npy", d);
  for (int64_t n = 0; n < 200000; n = n * 10 + 7) {
    FILE *f = fopen(p, "wb");
    assert_int_equal(npy_write_header(f, "<u4", &n, 1, err, sizeof err), 0);
    for (int64_t i = 0; i < n; i++) {
      uint32_t v = (uint32_t)(i * 2654435761u);
      fwrite(&v, 4, 1, f);
    }
    fclose(f);
    /* numpy reads it and writes the very same bytes back */
    assert_int_equal(run_python("import numpy as np\n"
                                "a = np.load('%s')\n"
                                "assert a.dtype == np.uint32 and a.shape == (%lld,)\n"
                                "assert (a == (np.arange(%lld, dtype=np.uint64) * 2654435761 %% 2**32)).all()\n"
                                "np.save('%s/b.npy', a)\n"
                                "assert open('%s','rb').read() == open('%s/b.npy','rb').read()\n",
                                p, (long long)n, (long long)n, d, p, d),
                     0);
  }
  rm_tree(d);
}

static void test_numpy_shard_maps(void **state) {
  char *d = tmpdir_make();
  char p[512], err[1024];
  snprintf(p, sizeof p, "%s/np.npy", d);
  assert_int_equal(run_python("import numpy as np\n"
                              "np.save('%s', (np.arange(1000, dtype=np.uint32) * 7) %% 50257)\n"
                              "np.save('%s/empty.npy', np.zeros(0, dtype=np.uint32))\n", p, d), 0);
  TokenShard s;
  assert_int_equal(shard_map(p, &s, err, sizeof err), 0);
  assert_int_equal(s.n, 1000);
  for (int i = 0; i < 1000; i++) assert_int_equal(s.tokens[i], (uint32_t)(i * 7 % 50257));
  shard_unmap(&s);
  snprintf(p, sizeof p, "%s/empty.npy", d);
  assert_int_equal(shard_map(p, &s, err, sizeof err), 0);
  assert_int_equal(s.n, 0);
  shard_unmap(&s);
  rm_tree(d);
}

/* shard_map fails with a message naming the file and containing `what`. */
static void expect_map_error(const char *path, const char *what) {
  char err[1024];
  TokenShard s;
  assert_int_equal(shard_map(path, &s, err, sizeof err), -1);
  if (!strstr(err, path) || !strstr(err, what)) fail_msg("error '%s' lacks '%s' or the path", err, what);
}

static void test_npy_bad_headers(void **state) {
  char *d = tmpdir_make();
  char p[512];
  assert_int_equal(run_python("import numpy as np\n"
                              "np.save('%s/f4.npy', np.zeros(10, dtype=np.float32))\n"
                              "np.save('%s/u2.npy', np.zeros(10, dtype=np.uint16))\n"
                              "np.save('%s/be.npy', np.zeros(10, dtype='>u4'))\n"
                              "np.save('%s/2d.npy', np.zeros((2, 3), dtype=np.uint32))\n"
                              "np.save('%s/trunc.npy', np.zeros(100, dtype=np.uint32))\n"
                              "np.save('%s/long.npy', np.zeros(100, dtype=np.uint32))\n",
                              d, d, d, d, d, d), 0);
  snprintf(p, sizeof p, "%s/f4.npy", d);
  expect_map_error(p, "<f4");
  snprintf(p, sizeof p, "%s/u2.npy", d);
  expect_map_error(p, "dtype");
  snprintf(p, sizeof p, "%s/be.npy", d);
  expect_map_error(p, ">u4");
  snprintf(p, sizeof p, "%s/2d.npy", d);
  expect_map_error(p, "1-D");
  snprintf(p, sizeof p, "%s/trunc.npy", d);
  assert_int_equal(truncate(p, fs_size(p) - 6), 0);
  expect_map_error(p, "truncated");
  snprintf(p, sizeof p, "%s/long.npy", d);
  FILE *f = fopen(p, "ab");
  fputs("junk", f);
  fclose(f);
  expect_map_error(p, "does not match header shape");
  /* Fortran order: same bytes as a C-order header with the flag flipped */
  snprintf(p, sizeof p, "%s/fortran.npy", d);
  char err[256];
  f = fopen(p, "wb");
  int64_t n = 4;
  assert_int_equal(npy_write_header(f, "<u4", &n, 1, err, sizeof err), 0);
  uint32_t z[4] = {0};
  fwrite(z, 4, 4, f);
  fclose(f);
  size_t len;
  char *buf = fs_read_all(p, &len, err, sizeof err);
  char *fo = strstr(buf + 10, "False");
  assert_non_null(fo);
  memcpy(fo, "True ", 5);
  write_file(p, buf, len);
  free(buf);
  expect_map_error(p, "Fortran");
  snprintf(p, sizeof p, "%s/magic.npy", d);
  write_file(p, "hello, this is not numpy at all", 31);
  expect_map_error(p, "bad magic");
  snprintf(p, sizeof p, "%s/short.npy", d);
  write_file(p, "\x93NUMPY\x01\x00\x76\x00{'descr'", 17);
  expect_map_error(p, "truncated");
  snprintf(p, sizeof p, "%s/zero.npy", d);
  write_file(p, "", 0);
  expect_map_error(p, "empty");
  snprintf(p, sizeof p, "%s/missing.npy", d);
  expect_map_error(p, "cannot open");
  rm_tree(d);
}

static void test_idx_roundtrip(void **state) {
  char *d = tmpdir_make();
  char p[512], err[1024];
  snprintf(p, sizeof p, "%s/x.idx", d);
  uint64_t pairs[6] = {0, 5, 5, 9, 9, 1ull << 40};
  assert_int_equal(idx_write(p, pairs, 3, err, sizeof err), 0);
  assert_int_equal(run_python("import struct, numpy as np\n"
                              "b = open('%s','rb').read()\n"
                              "assert struct.unpack('<8sQQQ', b[:32]) == (b'NMOEIDX\\x00', 1, 3, 0)\n"
                              "assert np.frombuffer(b[32:], dtype='<u8').tolist() == [0,5,5,9,9,2**40]\n",
                              p), 0);
  uint64_t *got, nd;
  assert_int_equal(idx_read(p, &got, &nd, err, sizeof err), 0);
  assert_int_equal(nd, 3);
  assert_memory_equal(got, pairs, sizeof pairs);
  free(got);
  assert_int_equal(truncate(p, 40), 0);
  assert_int_equal(idx_read(p, &got, &nd, err, sizeof err), -1);
  assert_non_null(strstr(err, p));
  write_file(p, "NOTANIDX", 8);
  assert_int_equal(idx_read(p, &got, &nd, err, sizeof err), -1);
  /* boundaries from EOS: trailing tokens after the last EOS are no document */
  uint32_t toks[] = {1, 2, 7, 3, 7, 7, 4};
  uint64_t *eb;
  assert_int_equal(idx_from_eos(toks, 7, 7, &eb), 3);
  uint64_t want[] = {0, 3, 3, 5, 5, 6};
  assert_memory_equal(eb, want, sizeof want);
  free(eb);
  rm_tree(d);
}

static void test_bucket_matches_python(void **state) {
  const char *ids[] = {"doc-42", "brown:0", "ca01", "", "\xc3\xa9t\xc3\xa9"};
  for (int i = 0; i < 5; i++) {
    int b64 = shard_bucket(ids[i], strlen(ids[i]), 64), b1024 = shard_bucket(ids[i], strlen(ids[i]), 1024);
    assert_true(b64 >= 0 && b64 < 64);
    assert_int_equal(run_python("import hashlib\n"
                                "h = int(hashlib.md5('%s'.encode('utf-8')).hexdigest()[:16], 16)\n"
                                "assert h %% 64 == %d and h %% 1024 == %d\n",
                                ids[i], b64, b1024), 0);
  }
}

static void test_writer_manifests(void **state) {
  char *d = tmpdir_make();
  setenv("SOURCE_DATE_EPOCH", "1700000000", 1);
  write_dataset(d, 8, 400, 300);
  unsetenv("SOURCE_DATE_EPOCH");
  /* every field, relative paths, checksums, per-bucket manifests, contents */
  assert_int_equal(run_python(
      "import json, hashlib, os, numpy as np\n"
      "root = '%s'\n"
      "m = json.load(open(root + '/manifest.json'))\n"
      "keys = ['dataset','version','tokenizer','vocab_size','eos_token_id','dtype','created_at',\n"
      "        'total_tokens','total_documents','num_shards','shards','source_info']\n"
      "assert list(m.keys()) == keys, m.keys()\n"
      "assert (m['dataset'], m['version'], m['tokenizer'], m['vocab_size'], m['eos_token_id'], m['dtype']) == ('t','v1','gpt2',1000,999,'uint32')\n"
      "assert m['created_at'] == '2023-11-14T22:13:20Z', m['created_at']\n"
      "assert m['source_info'] == {'source': 'unit', 'num_shard_dirs': len({s['path'].split('/')[0] for s in m['shards']})}\n"
      "assert m['num_shards'] == len(m['shards']) and m['total_documents'] == 300\n"
      "assert m['total_tokens'] == sum(s['num_tokens'] for s in m['shards'])\n"
      "assert m['total_tokens'] == sum((i %% 40) + 2 for i in range(300))\n"
      "docs = {}\n"
      "for s in m['shards']:\n"
      "    assert list(s.keys()) == ['path','index_path','num_tokens','num_documents','checksum']\n"
      "    b, name = s['path'].split('/')\n"
      "    assert b.startswith('shard_') and len(b) == 10 and name.startswith('t-v1-shard-') and name.endswith('.npy')\n"
      "    assert s['index_path'] == s['path'][:-4] + '.idx'\n"
      "    raw = open(root + '/' + s['path'], 'rb').read()\n"
      "    assert hashlib.sha256(raw).hexdigest() == s['checksum']\n"
      "    a = np.load(root + '/' + s['path'])\n"
      "    assert a.dtype == np.uint32 and len(a) == s['num_tokens'] <= 400\n"
      "    bm = json.load(open(root + '/' + b + '/manifest.json'))\n"
      "    assert [x['path'] for x in bm['shards']] == sorted(os.path.basename(x['path']) for x in m['shards'] if x['path'].startswith(b + '/'))\n"
      "    assert bm['source_info'] == {'source': 'unit'}\n"
      "    idx = np.frombuffer(open(root + '/' + s['index_path'], 'rb').read()[32:], dtype='<u8').reshape(-1, 2)\n"
      "    assert len(idx) == s['num_documents']\n"
      "    for lo, hi in idx.tolist():\n"
      "        assert a[hi - 1] == 999\n"
      "        docs.setdefault(int(b[6:]), []).append(a[lo:hi - 1].tolist())\n"
      "# each bucket holds its documents in input order\n"
      "for i in range(300):\n"
      "    b = int(hashlib.md5(('doc-%%d' %% i).encode()).hexdigest()[:16], 16) %% 8\n"
      "    want = [(i * 7 + k) %% 900 for k in range(i %% 40 + 1)]\n"
      "    assert docs[b].pop(0) == want, (i, b)\n"
      "assert all(not v for v in docs.values())\n",
      d), 0);
  rm_tree(d);
}

static void test_rotation(void **state) {
  char *d = tmpdir_make();
  char err[1024];
  ShardWriterConfig c = cfg_for(d, 1, 100);
  ShardWriter *w = shard_writer_open(&c, err, sizeof err);
  uint32_t ids[300] = {0};
  for (int i = 0; i < 7; i++) assert_int_equal(shard_writer_add(w, "x", 1, ids, 30, err, sizeof err), 0);
  assert_int_equal(shard_writer_add(w, "x", 1, ids, 250, err, sizeof err), 0); /* longer than a shard */
  assert_int_equal(shard_writer_add(w, "x", 1, ids, 99, err, sizeof err), 0);  /* exactly 100 with EOS */
  assert_int_equal(shard_writer_finish(w, NULL, err, sizeof err), 0);
  char mp[512];
  snprintf(mp, sizeof mp, "%s/manifest.json", d);
  Manifest m;
  assert_int_equal(manifest_read(mp, &m, err, sizeof err), 0);
  int64_t want_tok[] = {93, 93, 31, 251, 100}, want_docs[] = {3, 3, 1, 1, 1};
  assert_int_equal(m.n_shards, 5);
  for (int i = 0; i < 5; i++) {
    char name[64];
    snprintf(name, sizeof name, "shard_0000/t-v1-shard-%06d.npy", i);
    assert_string_equal(m.shards[i].path, name);
    assert_int_equal(m.shards[i].num_tokens, want_tok[i]);
    assert_int_equal(m.shards[i].num_documents, want_docs[i]);
  }
  manifest_free(&m);
  assert_int_equal(manifest_verify(d, 1, stdout, err, sizeof err), 0);
  rm_tree(d);
}

static void test_writer_abort_leaves_nothing(void **state) {
  char *d = tmpdir_make();
  char err[1024], p[600];
  ShardWriterConfig c = cfg_for(d, 2, 50);
  ShardWriter *w = shard_writer_open(&c, err, sizeof err);
  uint32_t ids[40] = {0};
  for (int i = 0; i < 10; i++) {
    char id[16];
    snprintf(id, sizeof id, "%d", i);
    assert_int_equal(shard_writer_add(w, id, strlen(id), ids, 40, err, sizeof err), 0);
  }
  shard_writer_abort(w);
  snprintf(p, sizeof p, "test -z \"$(find %s -mindepth 1)\"", d);
  assert_int_equal(system(p), 0);
  rm_tree(d);
}

/* Problem count of verify (output discarded). */
static int verify_count(const char *dir, int checksums) {
  char err[1024];
  FILE *devnull = fopen("/dev/null", "w");
  int n = manifest_verify(dir, checksums, devnull, err, sizeof err);
  fclose(devnull);
  return n;
}

static void test_verify_finds_damage(void **state) {
  char *d = tmpdir_make();
  write_dataset(d, 2, 300, 60);
  assert_int_equal(verify_count(d, 1), 0);
  char mp[512], err[1024];
  snprintf(mp, sizeof mp, "%s/manifest.json", d);
  Manifest m;
  assert_int_equal(manifest_read(mp, &m, err, sizeof err), 0);
  char npy[1024], idx[1024];
  snprintf(npy, sizeof npy, "%s/%s", d, m.shards[0].path);
  snprintf(idx, sizeof idx, "%s/%s", d, m.shards[0].index_path);
  size_t n;
  char *orig = fs_read_all(npy, &n, err, sizeof err);
  size_t idx_n;
  char *orig_idx = fs_read_all(idx, &idx_n, err, sizeof err);

  /* a flipped bit in a token: only the checksum sees it */
  char *bad = malloc(n);
  memcpy(bad, orig, n);
  bad[200] ^= 0x01;
  write_file(npy, bad, n);
  assert_int_equal(verify_count(d, 0), 0);
  assert_true(verify_count(d, 1) >= 1);
  /* a token id >= vocab_size */
  memcpy(bad, orig, n);
  bad[n - 8 + 2] = 0x7f;
  write_file(npy, bad, n);
  assert_true(verify_count(d, 0) >= 1);
  /* truncated shard */
  write_file(npy, orig, n - 4);
  assert_true(verify_count(d, 0) >= 1);
  write_file(npy, orig, n);
  /* an index pointing past the end */
  uint64_t *pairs, nd;
  assert_int_equal(idx_read(idx, &pairs, &nd, err, sizeof err), 0);
  pairs[2 * nd - 1] += 5;
  assert_int_equal(idx_write(idx, pairs, nd, err, sizeof err), 0);
  free(pairs);
  CliResult r;
  CLI(&r, "data", "verify", d);
  assert_int_equal(r.status, 1);
  assert_non_null(strstr(r.out, "past the shard"));
  write_file(idx, orig_idx, idx_n);
  /* leftovers: a .tmp file and a shard no manifest lists */
  char stray[1200];
  snprintf(stray, sizeof stray, "%s.tmp", npy);
  write_file(stray, "x", 1);
  CLI(&r, "data", "verify", d);
  assert_int_equal(r.status, 1);
  assert_non_null(strstr(r.out, "temporary"));
  unlink(stray);
  snprintf(stray, sizeof stray, "%s/shard_0000/t-v1-shard-000099.npy", d);
  write_file(stray, orig, n);
  assert_int_equal(verify_count(d, 0), 1);
  unlink(stray);
  CLI(&r, "data", "verify", "--checksums", mp);
  assert_int_equal(r.status, 0);
  assert_non_null(strstr(r.out, "OK"));
  /* no manifest: incomplete */
  unlink(mp);
  CLI(&r, "data", "verify", d);
  assert_int_equal(r.status, 1);
  assert_non_null(strstr(r.out, "no manifest"));
  assert_non_null(strstr(r.out, "not listed"));
  free(bad);
  free(orig);
  free(orig_idx);
  manifest_free(&m);
  rm_tree(d);
}

static void test_regenerate_index(void **state) {
  char *d = tmpdir_make();
  write_dataset(d, 1, 100000, 50);
  char npy[600], idx[600], err[1024];
  snprintf(npy, sizeof npy, "%s/shard_0000/t-v1-shard-000000.npy", d);
  snprintf(idx, sizeof idx, "%s/shard_0000/t-v1-shard-000000.idx", d);
  size_t n1, n2;
  char *orig = fs_read_all(idx, &n1, err, sizeof err);
  assert_non_null(orig);
  unlink(idx);
  CliResult r;
  CLI(&r, "data", "regenerate-index", npy, "--eos-token-id", "999");
  assert_int_equal(r.status, 0);
  char *again = fs_read_all(idx, &n2, err, sizeof err);
  assert_non_null(again);
  assert_int_equal(n1, n2);
  assert_memory_equal(orig, again, n1);
  CLI(&r, "data", "regenerate-index", npy);
  assert_int_not_equal(r.status, 0);
  assert_non_null(strstr(r.out, "--eos-token-id"));
  /* inspect and info run on it */
  CLI(&r, "data", "inspect", d, "--eos-token-id", "999");
  assert_int_equal(r.status, 0);
  assert_non_null(strstr(r.out, "documents 50"));
  assert_non_null(strstr(r.out, "double EOS: 0"));
  CLI(&r, "data", "info", d);
  assert_int_equal(r.status, 0);
  assert_non_null(strstr(r.out, "dataset:      t"));
  free(orig);
  free(again);
  rm_tree(d);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_npy_header_matches_numpy),
      cmocka_unit_test(test_numpy_shard_maps),
      cmocka_unit_test(test_npy_bad_headers),
      cmocka_unit_test(test_idx_roundtrip),
      cmocka_unit_test(test_bucket_matches_python),
      cmocka_unit_test(test_writer_manifests),
      cmocka_unit_test(test_rotation),
      cmocka_unit_test(test_writer_abort_leaves_nothing),
      cmocka_unit_test(test_verify_finds_damage),
      cmocka_unit_test(test_regenerate_index),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}

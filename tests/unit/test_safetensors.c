/* test_safetensors.c: the safetensors writer and reader.
 *
 * Round trip of F32/BF16/F64/I32/I64/U8 tensors (scalars and empty tensors
 * included) with metadata, alignment and the streamed SHA-256; an
 * independent reader (/usr/bin/python3 + numpy: json header, np.frombuffer)
 * reads our file and its values must equal ours; malformed files are
 * rejected with one message naming the file and the problem; the writer
 * refuses what the format cannot hold. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>
#include <math.h>

#include "core/fsutil.h"
#include "core/hash.h"
#include "core/json.h"
#include "core/log.h"
#include "train/safetensors.h"

#include "tmpdir_fixture.h"

/* The sample tensors: every width, a scalar, an empty tensor. */
static float f32[6] = {1.5f, -2.25f, 3.0f, 1e-30f, -0.0f, 65504.0f};
static uint16_t bf16[5] = {0x3f80, 0xc000, 0x4049, 0x0000, 0x7f80}; /* 1, -2, 3.140625, 0, inf */
static double f64[3] = {3.141592653589793, -1e300, 2.5e-310};
static int32_t i32[4] = {-2147483647 - 1, -1, 0, 2147483647};
static int64_t i64[1] = {-1234567890123LL};
static uint8_t u8[3] = {0, 127, 255};
static float empty[1];
static const int64_t S_F32[] = {2, 3}, S_BF16[] = {5}, S_F64[] = {3, 1}, S_I32[] = {2, 2}, S_U8[] = {3},
                     S_EMPTY[] = {0, 4};

static const StTensor SAMPLE[] = {
    {"u8.bytes", "U8", 1, S_U8, u8, sizeof u8},
    {"model.w", "F32", 2, S_F32, f32, sizeof f32},
    {"model.norm", "BF16", 1, S_BF16, bf16, sizeof bf16},
    {"opt.f64", "F64", 2, S_F64, f64, sizeof f64},
    {"opt.count", "I32", 2, S_I32, i32, sizeof i32},
    {"step", "I64", 0, NULL, i64, sizeof i64},
    {"empty", "F32", 2, S_EMPTY, empty, 0},
};
#define N_SAMPLE ((int)(sizeof SAMPLE / sizeof SAMPLE[0]))

static void write_sample(const char *path) {
  char err[512], sha[65], fsha[65];
  const char *meta[] = {"format", "pt", "note", "quote \" and\nnewline"};
  assert_int_equal(st_write(path, SAMPLE, N_SAMPLE, meta, 2, sha, err, sizeof err), 0);
  assert_int_equal(sha256_file_hex(path, fsha, err, sizeof err), 0);
  assert_string_equal(sha, fsha);
}

static void test_round_trip(void **state) {
  Fixture *f = *state;
  const char *p = at(f->dir, "a.safetensors");
  write_sample(p);
  char err[512];
  StFile *s = st_open(p, err, sizeof err);
  if (!s) fail_msg("%s", err);
  assert_int_equal(s->n, N_SAMPLE);
  assert_string_equal(st_meta(s, "format"), "pt");
  assert_string_equal(st_meta(s, "note"), "quote \" and\nnewline");
  assert_null(st_meta(s, "missing"));
  /* Header length is a multiple of 8, so data starts 8-aligned. */
  uint64_t hlen = 0;
  for (int b = 7; b >= 0; b--) hlen = hlen << 8 | ((const uint8_t *)s->map)[b];
  assert_int_equal(hlen % 8, 0);
  for (int i = 0; i < N_SAMPLE; i++) {
    const StEntry *e = st_get(s, SAMPLE[i].name);
    assert_non_null(e);
    assert_string_equal(e->dtype, SAMPLE[i].dtype);
    assert_int_equal(e->ndim, SAMPLE[i].ndim);
    for (int d = 0; d < e->ndim; d++) assert_int_equal(e->shape[d], SAMPLE[i].shape[d]);
    assert_int_equal(e->nbytes, SAMPLE[i].nbytes);
    assert_memory_equal(e->data, SAMPLE[i].data, SAMPLE[i].nbytes ? SAMPLE[i].nbytes : 0);
    /* Every tensor is aligned to its element size inside the file. */
    size_t off = (size_t)((const uint8_t *)e->data - (const uint8_t *)s->map);
    assert_int_equal(off % st_dtype_size(e->dtype), 0);
  }
  assert_null(st_get(s, "nope"));
  st_close(s);
  /* No temporary file is left beside the result. */
  char tmp[600];
  snprintf(tmp, sizeof tmp, "%s.tmp.%d", p, (int)getpid());
  assert_false(fs_exists(tmp));
}

static void test_zero_tensors(void **state) {
  Fixture *f = *state;
  char err[512];
  assert_int_equal(st_write(at(f->dir, "z.safetensors"), NULL, 0, NULL, 0, NULL, err, sizeof err), 0);
  StFile *s = st_open(at(f->dir, "z.safetensors"), err, sizeof err);
  if (!s) fail_msg("%s", err);
  assert_int_equal(s->n, 0);
  st_close(s);
}

/* An independent reader: header via json, values via np.frombuffer (BF16
 * widened through uint32 << 16), no holes/overlaps, printed as JSON. */
static const char *PY_READER =
    "import json, struct, sys\n"
    "import numpy as np\n"
    "raw = open(sys.argv[1], 'rb').read()\n"
    "(n,) = struct.unpack('<Q', raw[:8])\n"
    "assert (8 + n) % 8 == 0, 'data not 8-aligned'\n"
    "hdr = json.loads(raw[8:8 + n].decode('utf-8'))\n"
    "data = raw[8 + n:]\n"
    "meta = hdr.pop('__metadata__', {})\n"
    "assert all(isinstance(v, str) for v in meta.values())\n"
    "dt = {'F32': '<f4', 'F64': '<f8', 'I32': '<i4', 'I64': '<i8', 'U8': 'u1', 'BF16': '<u2'}\n"
    "spans = sorted(tuple(v['data_offsets']) for v in hdr.values())\n"
    "pos = 0\n"
    "for b, e in spans:\n"
    "    assert b == pos, 'hole or overlap'\n"
    "    pos = e\n"
    "assert pos == len(data), 'trailing bytes'\n"
    "out = {'__metadata__': meta}\n"
    "for name, v in hdr.items():\n"
    "    b, e = v['data_offsets']\n"
    "    a = np.frombuffer(data[b:e], dtype=dt[v['dtype']]).reshape(v['shape'])\n"
    "    if v['dtype'] == 'BF16':\n"
    "        a = (a.astype(np.uint32) << 16).view(np.float32)\n"
    "    vals = [repr(float(x)) if a.dtype.kind == 'f' else str(int(x)) for x in a.ravel()]\n"
    "    out[name] = {'dtype': v['dtype'], 'shape': list(a.shape), 'values': vals}\n"
    "print(json.dumps(out))\n";

static float bf16_to_f32(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float x;
  memcpy(&x, &u, 4);
  return x;
}

/* Our value i of tensor t as the python reader prints it. */
static void expected_value(const StTensor *t, int i, char *out, size_t n) {
  const char *d = t->dtype;
  double v;
  if (!strcmp(d, "I32")) { snprintf(out, n, "%d", ((const int32_t *)t->data)[i]); return; }
  if (!strcmp(d, "I64")) { snprintf(out, n, "%lld", (long long)((const int64_t *)t->data)[i]); return; }
  if (!strcmp(d, "U8")) { snprintf(out, n, "%u", ((const uint8_t *)t->data)[i]); return; }
  if (!strcmp(d, "F32")) v = ((const float *)t->data)[i];
  else if (!strcmp(d, "BF16")) v = bf16_to_f32(((const uint16_t *)t->data)[i]);
  else v = ((const double *)t->data)[i];
  snprintf(out, n, "%.17g", v);
}

static void test_numpy_reader_agrees(void **state) {
  Fixture *f = *state;
  if (access("/usr/bin/python3", X_OK)) skip();
  const char *p = at(f->dir, "np.safetensors"), *py = at(f->dir, "reader.py");
  write_sample(p);
  char err[512];
  assert_int_equal(fs_write_atomic(py, PY_READER, strlen(PY_READER), err, sizeof err), 0);
  char cmd[1200];
  snprintf(cmd, sizeof cmd, "/usr/bin/python3 %s %s", py, p);
  FILE *pp = popen(cmd, "r");
  assert_non_null(pp);
  static char out[1 << 16];
  size_t got = fread(out, 1, sizeof out - 1, pp);
  out[got] = 0;
  assert_int_equal(pclose(pp), 0);
  Json *j = json_parse(out, got, err, sizeof err);
  if (!j) fail_msg("python output: %s (%s)", err, out);
  assert_string_equal(json_get_str(json_get(j, "__metadata__"), "format", ""), "pt");
  assert_int_equal(j->n, N_SAMPLE + 1);
  for (int i = 0; i < N_SAMPLE; i++) {
    const StTensor *t = &SAMPLE[i];
    const Json *e = json_get(j, t->name);
    assert_non_null(e);
    assert_string_equal(json_get_str(e, "dtype", ""), t->dtype);
    const Json *shape = json_get(e, "shape"), *vals = json_get(e, "values");
    assert_int_equal(shape->n, t->ndim);
    for (int d = 0; d < t->ndim; d++) assert_int_equal(shape->items[d]->i, t->shape[d]);
    assert_int_equal((size_t)vals->n, t->nbytes / st_dtype_size(t->dtype));
    for (int k = 0; k < vals->n; k++) {
      char want[64];
      expected_value(t, k, want, sizeof want);
      const char *s = vals->items[k]->str;
      if (t->dtype[0] == 'F' || t->dtype[0] == 'B') {
        /* Python prints floats with repr: compare as doubles (inf included). */
        double got_v = !strcmp(s, "inf") ? INFINITY : strtod(s, NULL);
        double want_v = strtod(want, NULL);
        if (got_v != want_v || signbit(got_v) != signbit(want_v))
          fail_msg("%s[%d]: numpy %s, ours %s", t->name, k, s, want);
      } else {
        assert_string_equal(s, want);
      }
    }
  }
  json_free(j);
}

/* Writes an 8-byte length, header (as given) and ndata zero bytes. */
static void craft(const char *path, const char *header, size_t ndata) {
  FILE *fp = fopen(path, "wb");
  assert_non_null(fp);
  uint64_t n = strlen(header);
  uint8_t len8[8];
  for (int b = 0; b < 8; b++) len8[b] = (uint8_t)(n >> (8 * b));
  assert_int_equal(fwrite(len8, 1, 8, fp), 8);
  assert_int_equal(fwrite(header, 1, n, fp), n);
  for (size_t i = 0; i < ndata; i++) fputc(0, fp);
  assert_int_equal(fclose(fp), 0);
}

static void expect_open_error(const char *path, const char *what) {
  char err[512] = "";
  StFile *s = st_open(path, err, sizeof err);
  if (s) fail_msg("%s: expected an error containing '%s'", path, what);
  if (!strstr(err, path) || !strstr(err, what)) fail_msg("error '%s' lacks the path or '%s'", err, what);
}

static void test_malformed_rejected(void **state) {
  Fixture *f = *state;
  static const struct {
    const char *header;
    size_t ndata;
    const char *what;
  } CASES[] = {
      {"not json", 0, "does not start with '{'"},
      {"{\"a\": ", 0, "invalid header JSON"},
      {"[1, 2]", 0, "does not start with '{'"},
      {"{\"a\": {\"dtype\": \"F17\", \"shape\": [1], \"data_offsets\": [0, 4]}}", 4, "unknown dtype 'F17'"},
      {"{\"a\": {\"dtype\": \"F32\", \"shape\": [2, 3], \"data_offsets\": [0, 20]}}", 20,
       "needs 24 bytes but data_offsets span 20"},
      {"{\"a\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8]}}", 4, "file truncated"},
      {"{\"a\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8]},"
       " \"b\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [4, 8]}}",
       8, "overlap"},
      {"{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [4, 8]}}", 8, "unused bytes"},
      {"{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4]}}", 12, "trailing bytes"},
      {"{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [4, 0]}}", 4, "data_offsets must be"},
      {"{\"a\": {\"dtype\": \"F32\", \"shape\": [-1], \"data_offsets\": [0, 4]}}", 4, "shape[0]"},
      {"{\"a\": {\"dtype\": \"F32\", \"shape\": [1]}}", 4, "lacks dtype, shape or data_offsets"},
      {"{\"a\": 5}", 0, "is not an object"},
      {"{\"__metadata__\": {\"k\": 1}}", 0, "value of 'k' is not a string"},
      {"{\"a\": {\"dtype\": \"U8\", \"shape\": [1], \"data_offsets\": [0, 1]},"
       " \"a\": {\"dtype\": \"U8\", \"shape\": [1], \"data_offsets\": [1, 2]}}",
       2, "duplicate header key 'a'"},
  };
  for (size_t i = 0; i < sizeof CASES / sizeof CASES[0]; i++) {
    char name[32];
    snprintf(name, sizeof name, "bad%zu.safetensors", i);
    const char *p = at(f->dir, name);
    craft(p, CASES[i].header, CASES[i].ndata);
    expect_open_error(p, CASES[i].what);
  }
  /* Too short for the length field; a length past the end of the file. */
  const char *p = at(f->dir, "short.safetensors");
  assert_int_equal(fs_write_atomic(p, "abc", 3, (char[256]){0}, 256), 0);
  expect_open_error(p, "shorter than the 8-byte header length");
  uint8_t big[16] = {0xff, 0xff, 0, 0, 0, 0, 0, 0, '{', '}'};
  p = at(f->dir, "long.safetensors");
  assert_int_equal(fs_write_atomic(p, big, sizeof big, (char[256]){0}, 256), 0);
  expect_open_error(p, "exceeds the file size");
  expect_open_error(at(f->dir, "absent.safetensors"), "cannot open");
}

static void test_writer_refuses(void **state) {
  Fixture *f = *state;
  char err[512];
  const char *p = at(f->dir, "w.safetensors");
  StTensor t = {"x", "F32", 2, S_F32, f32, sizeof f32 - 4};
  assert_int_equal(st_write(p, &t, 1, NULL, 0, NULL, err, sizeof err), -1);
  assert_non_null(strstr(err, "do not match dtype F32"));
  t.nbytes = sizeof f32;
  t.dtype = "Q8";
  assert_int_equal(st_write(p, &t, 1, NULL, 0, NULL, err, sizeof err), -1);
  assert_non_null(strstr(err, "unknown dtype 'Q8'"));
  StTensor two[2] = {{"x", "U8", 1, S_U8, u8, 3}, {"x", "U8", 1, S_U8, u8, 3}};
  assert_int_equal(st_write(p, two, 2, NULL, 0, NULL, err, sizeof err), -1);
  assert_non_null(strstr(err, "duplicate tensor name 'x'"));
  assert_false(fs_exists(p));
  /* Unwritable destination: the error names the file. */
  assert_int_equal(st_write("/nonexistent_dir/x.safetensors", SAMPLE, 1, NULL, 0, NULL, err, sizeof err), -1);
  assert_non_null(strstr(err, "/nonexistent_dir/x.safetensors"));
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test_setup_teardown(test_round_trip, tmpdir_setup, tmpdir_teardown),
      cmocka_unit_test_setup_teardown(test_zero_tensors, tmpdir_setup, tmpdir_teardown),
      cmocka_unit_test_setup_teardown(test_numpy_reader_agrees, tmpdir_setup, tmpdir_teardown),
      cmocka_unit_test_setup_teardown(test_malformed_rejected, tmpdir_setup, tmpdir_teardown),
      cmocka_unit_test_setup_teardown(test_writer_refuses, tmpdir_setup, tmpdir_teardown),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}

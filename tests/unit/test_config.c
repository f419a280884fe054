/* test_config.c: the TOML parser (every construct, every error class, env
 * expansion) and the config layer (schema, overrides, validation, printing,
 * JSON, fingerprint), plus every shipped file under configs/. */
#include <glob.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "core/config.h"
#include "core/json.h"
#include "core/toml.h"

extern char **environ;

/* ---- helpers ---- */

/* Writes text to a fresh /tmp file; path receives its name. */
static void write_tmp(char path[64], const char *text) {
  strcpy(path, "/tmp/nmoe_cfg_XXXXXX");
  int fd = mkstemp(path);
  assert_true(fd >= 0);
  size_t n = strlen(text);
  assert_int_equal(write(fd, text, n), (ssize_t)n);
  close(fd);
}

/* Removes every NMOE_* variable so the caller's environment cannot leak in. */
static int clear_nmoe_env(void **state) {
  for (;;) {
    char name[256] = {0};
    for (char **e = environ; *e; e++)
      if (!strncmp(*e, "NMOE_", 5)) {
        size_t n = strcspn(*e, "=");
        memcpy(name, *e, n < 255 ? n : 255);
        break;
      }
    if (!name[0]) return 0;
    unsetenv(name);
  }
}

static TomlValue *parse(const char *text, int expand, char *err, size_t n) {
  return toml_parse_string(text, "t.toml", expand, err, n);
}

/* Asserts text fails to parse with a message containing want. */
static void toml_fails(const char *text, const char *want) {
  char err[512];
  TomlValue *v = parse(text, 0, err, sizeof err);
  if (v || !strstr(err, want)) {
    print_error("document:\n%s\nexpected error containing '%s', got '%s'\n", text, want, v ? "(parsed)" : err);
    toml_free(v);
    fail();
  }
}

static const char *MIN_CFG =
    "dim = 64\nn_layers = 3\nn_heads = 4\ninter_dim = 192\nmoe_inter_dim = 32\n"
    "n_routed_experts = 8\nn_activated_experts = 2\nseq_len = 64\nmax_position_embeddings = 256\n"
    "q_lora_rank = 32\nkv_lora_rank = 32\nqk_nope_head_dim = 16\nqk_rope_head_dim = 8\nv_head_dim = 16\n"
    "data_path = \"data/x\"\n";

/* Loads text (+ args) into c; returns config_load's result, err filled. */
static int load_text(Config *c, const char *text, int argc, char **argv, char *err, size_t n) {
  char path[64];
  write_tmp(path, text);
  int rc = config_load(c, path, argc, argv, err, n);
  unlink(path);
  return rc;
}

/* MIN_CFG + extra lines + args must fail with want in the message. */
static void config_fails(const char *extra, int argc, char **argv, const char *want) {
  char text[4096], err[512] = "";
  snprintf(text, sizeof text, "%s%s", MIN_CFG, extra);
  Config c;
  int rc = load_text(&c, text, argc, argv, err, sizeof err);
  config_free(&c);
  if (rc == 0 || !strstr(err, want)) {
    print_error("extra '%s' argv[0] '%s': expected error containing '%s', got '%s'\n", extra,
                argc ? argv[0] : "", want, rc ? err : "(loaded)");
    fail();
  }
}

static void config_ok(const char *extra, int argc, char **argv, Config *c) {
  char text[4096], err[512] = "";
  snprintf(text, sizeof text, "%s%s", MIN_CFG, extra);
  int rc = load_text(c, text, argc, argv, err, sizeof err);
  if (rc) print_error("unexpected error: %s\n", err);
  assert_int_equal(rc, 0);
}

/* ---- TOML: valid documents ---- */

static void test_toml_constructs(void **state) {
  const char *doc =
      "# leading comment\n"
      "bare_key-1 = 1  # trailing comment\n"
      "\"quoted key\" = 'lit'\n"
      "'lit key' = \"v\"\n"
      "a.b.c = 2\n"
      "a . b . d = 3\n"
      "esc = \"q\\\" b\\\\ n\\n t\\t r\\r u\\u00e9 U\\U0001F600\"\n"
      "lit = 'C:\\path\\no\\escapes'\n"
      "ml = \"\"\"\nfirst\n  second \\\n    joined\"\"\"\n"
      "ml_quotes = \"\"\"x\"\"\"\"\"\n"
      "ml_lit = '''\nraw \\n\nline'''\n"
      "ints = [1_000, -5, +7, 0, 0xff_ff, 0o17, 0b101]\n"
      "floats = [1e-4, 3.4e-4, 10e9, 1.5, -0.5, 1E3, 6.02e+23, 1_000.5]\n"
      "specials = [inf, -inf, nan]\n"
      "bools = [true, false]\n"
      "nested = [ [1, 2], [\"a\", 'b'], ]\n"
      "multi = [\n  1, # one\n  2,\n\n  3,\n]\n"
      "empty = []\n"
      "inline = { x = 1, y.z = \"w\", arr = [ { k = 1 } ] }\n"
      "empty_inline = {}\n"
      "\n"
      "[table.sub]\n"
      "k = \"v\"\n"
      "[table]\n"
      "top = true\n"
      "[[points]]\n"
      "x = 1\n"
      "[[points]]\n"
      "x = 2\n"
      "[points.meta]\n"
      "tag = \"second\"\n"
      "[[points]]\n"
      "\r\n"
      "x = 3\r\n";
  char err[512];
  TomlValue *v = parse(doc, 0, err, sizeof err);
  if (!v) print_error("%s\n", err);
  assert_non_null(v);
  assert_int_equal(v->type, TOML_TABLE);
  assert_string_equal(v->keys[0], "bare_key-1"); /* file order */
  assert_int_equal(toml_get(v, "bare_key-1")->u.i, 1);
  assert_string_equal(toml_get(v, "quoted key")->u.s, "lit");
  assert_string_equal(toml_get(v, "lit key")->u.s, "v");
  assert_int_equal(toml_get_path(v, "a.b.c")->u.i, 2);
  assert_int_equal(toml_get_path(v, "a.b.d")->u.i, 3);
  assert_string_equal(toml_get(v, "esc")->u.s, "q\" b\\ n\n t\t r\r u\xc3\xa9 U\xf0\x9f\x98\x80");
  assert_string_equal(toml_get(v, "lit")->u.s, "C:\\path\\no\\escapes");
  assert_string_equal(toml_get(v, "ml")->u.s, "first\n  second joined");
  assert_string_equal(toml_get(v, "ml_quotes")->u.s, "x\"\"");
  assert_string_equal(toml_get(v, "ml_lit")->u.s, "raw \\n\nline");

  const TomlValue *ints = toml_get(v, "ints");
  assert_int_equal(ints->type, TOML_ARRAY);
  assert_null(ints->keys);
  int64_t want_i[] = {1000, -5, 7, 0, 0xffff, 15, 5};
  assert_int_equal(ints->n, 7);
  for (int i = 0; i < 7; i++) {
    assert_int_equal(ints->items[i]->type, TOML_INT);
    assert_int_equal(ints->items[i]->u.i, want_i[i]);
  }
  const TomlValue *fl = toml_get(v, "floats");
  double want_f[] = {1e-4, 3.4e-4, 10e9, 1.5, -0.5, 1e3, 6.02e23, 1000.5};
  assert_int_equal(fl->n, 8);
  for (int i = 0; i < 8; i++) {
    assert_int_equal(fl->items[i]->type, TOML_FLOAT);
    assert_true(fl->items[i]->u.f == want_f[i]);
  }
  const TomlValue *sp = toml_get(v, "specials");
  assert_true(sp->items[0]->u.f > 1e308 && sp->items[1]->u.f < -1e308 && sp->items[2]->u.f != sp->items[2]->u.f);
  assert_true(toml_get(v, "bools")->items[0]->u.b);
  assert_false(toml_get(v, "bools")->items[1]->u.b);
  const TomlValue *nested = toml_get(v, "nested");
  assert_int_equal(nested->n, 2);
  assert_int_equal(nested->items[1]->items[1]->type, TOML_STRING);
  assert_int_equal(toml_get(v, "multi")->n, 3);
  assert_int_equal(toml_get(v, "multi")->items[2]->u.i, 3);
  assert_int_equal(toml_get(v, "empty")->n, 0);
  assert_int_equal(toml_get_path(v, "inline.x")->u.i, 1);
  assert_string_equal(toml_get_path(v, "inline.y.z")->u.s, "w");
  assert_int_equal(toml_get_path(v, "inline.arr")->items[0]->type, TOML_TABLE);
  assert_int_equal(toml_get(v, "empty_inline")->n, 0);
  assert_string_equal(toml_get_path(v, "table.sub.k")->u.s, "v");
  assert_true(toml_get_path(v, "table.top")->u.b);
  const TomlValue *pts = toml_get(v, "points");
  assert_int_equal(pts->type, TOML_ARRAY);
  assert_int_equal(pts->n, 3);
  assert_int_equal(toml_get(pts->items[2], "x")->u.i, 3);
  assert_string_equal(toml_get_path(pts->items[1], "meta.tag")->u.s, "second");
  assert_null(toml_get(v, "missing"));
  assert_null(toml_get_path(v, "a.b.missing"));
  assert_null(toml_get_path(v, "a.b.c.d"));
  /* positions */
  assert_int_equal(toml_get(v, "bare_key-1")->line, 2);
  assert_int_equal(toml_get(v, "bare_key-1")->col, 14);
  toml_free(v);
}

static void test_toml_header_rules(void **state) {
  char err[512];
  /* an implicitly created parent may be defined once later; dotted tables may get sub-tables */
  TomlValue *v = parse("[a.b]\nx = 1\n[a]\ny = 2\n[c]\nd.e = 1\n[c.d.f]\ng = 3\n", 0, err, sizeof err);
  if (!v) print_error("%s\n", err);
  assert_non_null(v);
  assert_int_equal(toml_get_path(v, "a.y")->u.i, 2);
  assert_int_equal(toml_get_path(v, "c.d.f.g")->u.i, 3);
  toml_free(v);
  /* empty document, only comments, BOM */
  v = parse("", 0, err, sizeof err);
  assert_non_null(v);
  assert_int_equal(v->n, 0);
  toml_free(v);
  v = parse("\xEF\xBB\xBF# c\n\n  # d\n", 0, err, sizeof err);
  assert_non_null(v);
  toml_free(v);
}

/* ---- TOML: errors ---- */

static void test_toml_errors(void **state) {
  toml_fails("a = 1\na = 2\n", "t.toml:2:1: duplicate key 'a' (first defined at line 1)");
  toml_fails("x = 1\n[t]\nk = 1\nk = 2\n", "t.toml:4:1: duplicate key 't.k'");
  toml_fails("a.b = 1\na.b = 2\n", "t.toml:2:1: duplicate key 'a.b'");
  toml_fails("a = \"\\q\"\n", "t.toml:1:6: bad escape '\\q'");
  toml_fails("a = \"\\u12\"\n", "t.toml:1:6: bad escape: \\u needs 4 hex digits");
  toml_fails("a = \"\\uD800\"\n", "t.toml:1:6: bad escape: U+D800 is not a Unicode scalar value");
  toml_fails("a = \"abc\n", "t.toml:1:5: unterminated string");
  toml_fails("\n\na = 'abc", "t.toml:3:5: unterminated string");
  toml_fails("a = \"\"\"abc\n\n", "t.toml:1:5: unterminated string");
  toml_fails("a = '''abc", "t.toml:1:5: unterminated string");
  toml_fails("a = \"x\x01\"\n", "t.toml:1:7: control character 0x01 in string");
  toml_fails("a = 01\n", "t.toml:1:5: invalid number '01' (leading zeros");
  toml_fails("a = 1__0\n", "t.toml:1:5: invalid number '1__0'");
  toml_fails("a = _1\n", "t.toml:1:5: expected a value");
  toml_fails("a = 1_\n", "t.toml:1:5: invalid number '1_'");
  toml_fails("a = 1.\n", "t.toml:1:5: invalid number '1.' (digits expected after '.')");
  toml_fails("a = 1e\n", "t.toml:1:5: invalid number '1e' (exponent digits expected)");
  toml_fails("a = 0xZZ\n", "t.toml:1:5: invalid number '0xZZ'");
  toml_fails("a = -0x1\n", "sign not allowed");
  toml_fails("a = 9223372036854775808\n", "t.toml:1:5: integer '9223372036854775808' out of range");
  toml_fails("a = 1979-05-27\n", "t.toml:1:5: dates and times are not supported");
  toml_fails("a = 07:32:00\n", "dates and times are not supported");
  toml_fails("a = yes\n", "t.toml:1:5: expected a value");
  toml_fails("a = \n", "t.toml:1:5: expected a value");
  toml_fails("a 1\n", "t.toml:1:3: expected '=' after key 'a', found '1'");
  toml_fails("= 1\n", "t.toml:1:1: expected a key, found '='");
  toml_fails("a = 1 b = 2\n", "t.toml:1:7: expected end of line, found 'b'");
  toml_fails("a = [1, 2\n", "t.toml:2:1: expected ',' or ']' in array, found end of file");
  toml_fails("a = [1 2]\n", "t.toml:1:8: expected ',' or ']' in array, found '2'");
  toml_fails("a = { x = 1, }\n", "t.toml:1:14: trailing comma is not allowed in an inline table");
  toml_fails("a = { x = 1\n}\n", "t.toml:1:12: expected ',' or '}' in inline table, found end of line");
  toml_fails("a = { x = 1, x = 2 }\n", "t.toml:1:14: duplicate key 'x'");
  toml_fails("[a]\nb = 1\n[a]\n", "t.toml:3:1: table 'a' is already defined (line 1)");
  toml_fails("[a]\nb.c = 1\n[a.b]\n", "t.toml:3:1: table 'a.b' is already defined");
  toml_fails("a = { x = 1 }\na.y = 2\n", "t.toml:2:1: cannot add keys to table 'a'");
  toml_fails("a = { x = 1 }\n[a.b]\n", "t.toml:2:1: cannot define a table under 'a'");
  toml_fails("a = 1\n[a]\n", "t.toml:2:1: table 'a' is already defined");
  toml_fails("a = 1\na.b = 2\n", "t.toml:2:1: cannot add keys to 'a' (integer defined at line 1)");
  toml_fails("a = [1]\n[[a]]\n", "t.toml:2:1: cannot append to 'a' (array defined at line 1)");
  toml_fails("[[a]]\n[a]\n", "t.toml:2:1: table 'a' is already defined");
  toml_fails("[x.y]\n[x]\ny.z = 1\n", "t.toml:3:1: cannot add keys to table 'x.y'");
  toml_fails("[a\n", "t.toml:1:3: expected ']' to close the table header, found end of line");
  toml_fails("[[a]\n", "t.toml:1:4: expected ']]' to close the table header");
  toml_fails("[a] x = 1\n", "t.toml:1:5: expected end of line, found 'x'");
  toml_fails("a = 1\rb = 2\n", "t.toml:1:6: bare carriage return");
  toml_fails("a = 1 # c\x02\n", "t.toml:1:10: control character 0x02 in comment");
  toml_fails("a = \"\xff\"\n", "t.toml:1:6: invalid UTF-8");
  toml_fails("\"a\nb\" = 1\n", "t.toml:1:1: unterminated string");
  toml_fails("\"\"\"a\"\"\" = 1\n", "multi-line strings are not allowed as keys");
}

static void test_toml_file(void **state) {
  char err[512], path[64];
  assert_null(toml_parse_file("/nonexistent/x.toml", 0, err, sizeof err));
  assert_non_null(strstr(err, "/nonexistent/x.toml: cannot open"));
  write_tmp(path, "ok = true\nbad = [\n");
  assert_null(toml_parse_file(path, 0, err, sizeof err));
  char want[128];
  snprintf(want, sizeof want, "%s:3:1: expected a value", path);
  assert_non_null(strstr(err, want));
  unlink(path);
  write_tmp(path, "k = 'v'\n");
  TomlValue *v = toml_parse_file(path, 0, err, sizeof err);
  assert_non_null(v);
  assert_string_equal(toml_get(v, "k")->u.s, "v");
  toml_free(v);
  unlink(path);
}

static void test_toml_env_expansion(void **state) {
  char err[512];
  setenv("NMOE_TEST_ROOT", "/data/x", 1);
  setenv("HYDRA_TEST_M", "judge", 1);
  TomlValue *v = parse("a = \"${NMOE_TEST_ROOT}/shards\"\n"
                       "b = '${NMOE_TEST_UNSET:-fallback}-${HYDRA_TEST_M}'\n"
                       "c = \"${NMOE_TEST_ROOT:-unused}\"\n"
                       "d = \"$NMOE_TEST_ROOT and $ sign\"\n"
                       "arr = [\"${NMOE_TEST_ROOT}\"]\n",
                       1, err, sizeof err);
  if (!v) print_error("%s\n", err);
  assert_non_null(v);
  assert_string_equal(toml_get(v, "a")->u.s, "/data/x/shards");
  assert_string_equal(toml_get(v, "b")->u.s, "fallback-judge");
  assert_string_equal(toml_get(v, "c")->u.s, "/data/x");
  assert_string_equal(toml_get(v, "d")->u.s, "$NMOE_TEST_ROOT and $ sign");
  assert_string_equal(toml_get(v, "arr")->items[0]->u.s, "/data/x");
  toml_free(v);
  /* without expand_env the text is kept */
  v = parse("a = \"${HOME}\"\n", 0, err, sizeof err);
  assert_non_null(v);
  assert_string_equal(toml_get(v, "a")->u.s, "${HOME}");
  toml_free(v);

  assert_null(parse("x = 1\na = \"${HOME}\"\n", 1, err, sizeof err));
  assert_non_null(strstr(err, "t.toml:2:5: environment variable 'HOME' is not allowed"));
  assert_null(parse("a = \"${NMOE_TEST_UNSET}\"\n", 1, err, sizeof err));
  assert_non_null(strstr(err, "t.toml:1:5: environment variable NMOE_TEST_UNSET is not set"));
  assert_null(parse("a = \"${NMOE_TEST_ROOT\"\n", 1, err, sizeof err));
  assert_non_null(strstr(err, "t.toml:1:5: unterminated ${"));
  assert_null(parse("a = \"${}\"\n", 1, err, sizeof err));
  assert_non_null(strstr(err, "bad ${...}"));
  unsetenv("NMOE_TEST_ROOT");
  unsetenv("HYDRA_TEST_M");
}

/* ---- config: schema ---- */

static void test_config_minimal_and_defaults(void **state) {
  Config c;
  config_ok("", 0, NULL, &c);
  assert_int_equal(c.dim, 64);
  assert_int_equal(c.n_shared_experts, 2); /* default */
  assert_int_equal(c.steps, 10000);
  assert_true(c.resume);
  assert_true(c.lr_dense == 3.4e-4);
  assert_true(c.hold_tokens == 10e9);
  assert_string_equal(c.tokenizer, "o200k_harmony");
  assert_string_equal(c.data_path, "data/x");
  assert_non_null(strstr(c.source_path, "/tmp/nmoe_cfg_"));
  config_free(&c);
  assert_null(c.tokenizer);
}

static void test_config_unknown_key(void **state) {
  config_fails("lr_dens = 1e-3\n", 0, NULL, ":16:11: unknown key 'lr_dens' (did you mean 'lr_dense'?)");
  config_fails("nlayers = 2\n", 0, NULL, "unknown key 'nlayers' (did you mean 'n_layers'?)");
  config_fails("completely_unrelated_name = 2\n", 0, NULL, "unknown key 'completely_unrelated_name'");
  char err[512];
  Config c;
  char text[4096];
  snprintf(text, sizeof text, "%s[model]\nx = 1\n", MIN_CFG);
  assert_int_equal(load_text(&c, text, 0, NULL, err, sizeof err), -1);
  config_free(&c);
  assert_non_null(strstr(err, "unknown key 'model'"));
  assert_non_null(strstr(err, "top-level keys only"));
  /* no suggestion for a name far from every field */
  config_fails("zzzzzzzzzzzzzzzz = 1\n", 0, NULL, "unknown key 'zzzzzzzzzzzzzzzz'");
  snprintf(text, sizeof text, "%szzzzzzzzzzzzzzzz = 1\n", MIN_CFG);
  assert_int_equal(load_text(&c, text, 0, NULL, err, sizeof err), -1);
  config_free(&c);
  assert_null(strstr(err, "did you mean"));
}

static void test_config_wrong_type(void **state) {
  config_fails("steps = \"ten\"\n", 0, NULL, ":16:9: key 'steps' expects an integer, found a string");
  config_fails("steps = 1.5\n", 0, NULL, "key 'steps' expects an integer, found a float");
  config_fails("resume = 1\n", 0, NULL, "key 'resume' expects a boolean (true/false), found an integer");
  config_fails("data_root = 5\n", 0, NULL, "key 'data_root' expects a string, found an integer");
  config_fails("lr_dense = \"1e-3\"\n", 0, NULL, "key 'lr_dense' expects a float, found a string");
  config_fails("dtype = [\"bf16\"]\n", 0, NULL, "key 'dtype' expects a string, found an array");
  /* an integer is accepted for a float field */
  Config c;
  config_ok("lr_dense = 1\nrope_theta = 10000\nhold_tokens = 1_000\n", 0, NULL, &c);
  config_free(&c);
}

static void test_config_missing_required(void **state) {
  char err[512];
  Config c;
  int rc = load_text(&c, "dim = 64\nn_layers = 2\ndata_path = 'x'\n", 0, NULL, err, sizeof err);
  config_free(&c);
  assert_int_equal(rc, -1);
  assert_non_null(strstr(err, "missing required key 'n_heads' (attention heads)"));
  /* a required key may come from an override */
  char *argv[] = {"--n_heads=4"};
  rc = load_text(&c,
                 "dim = 64\nn_layers = 3\ninter_dim = 192\nmoe_inter_dim = 32\nn_routed_experts = 8\n"
                 "n_activated_experts = 2\nseq_len = 64\nq_lora_rank = 0\nkv_lora_rank = 32\n"
                 "qk_rope_head_dim = 8\ndata_path = 'x'\n",
                 1, argv, err, sizeof err);
  if (rc) print_error("%s\n", err);
  assert_int_equal(rc, 0);
  assert_int_equal(c.n_heads, 4);
  config_free(&c);
}

static void test_config_unsupported(void **state) {
  config_fails("sft_enabled = false\n", 0, NULL, "sft_enabled is not supported yet (SFT)");
  config_fails("muon_momentum = 0.9\n", 0, NULL, ":16:17: muon_momentum is not supported yet (Muon momentum");
  char *argv[] = {"--profiling_enabled=true"};
  config_fails("", 1, argv, "argument --profiling_enabled: profiling_enabled is not supported yet (profiling)");
  setenv("NMOE_HF_DATASET", "x", 1);
  config_fails("", 0, NULL, "environment NMOE_HF_DATASET: hf_dataset is not supported yet");
  unsetenv("NMOE_HF_DATASET");
}

/* ---- config: overrides ---- */

static void test_config_override_precedence(void **state) {
  Config c;
  config_ok("steps = 5\n", 0, NULL, &c);
  assert_int_equal(c.steps, 5);
  config_free(&c);

  setenv("NMOE_STEPS", "6", 1);
  setenv("NMOE_LR_DENSE", "1e-3", 1);
  setenv("NMOE_RESUME", "false", 1);
  setenv("NMOE_DATA_PATH", "/env/path", 1);
  setenv("NMOE_RUN", "not-a-field", 1);     /* not config: ignored */
  setenv("NMOE_TIMERS", "banana", 1);       /* not config: ignored */
  config_ok("steps = 5\nlr_dense = 2e-3\n", 0, NULL, &c);
  assert_int_equal(c.steps, 6);
  assert_true(c.lr_dense == 1e-3);
  assert_false(c.resume);
  assert_string_equal(c.data_path, "/env/path");
  config_free(&c);

  char *argv[] = {"--steps=7", "--lr_dense=0.5e-3", "--data_path=/cli/path", "--resume", "--seed=-3"};
  config_ok("steps = 5\n", 5, argv, &c);
  assert_int_equal(c.steps, 7);
  assert_true(c.lr_dense == 0.5e-3);
  assert_string_equal(c.data_path, "/cli/path");
  assert_true(c.resume);
  assert_int_equal(c.seed, -3);
  config_free(&c);

  unsetenv("NMOE_STEPS");
  unsetenv("NMOE_LR_DENSE");
  unsetenv("NMOE_RESUME");
  unsetenv("NMOE_DATA_PATH");
  unsetenv("NMOE_RUN");
  unsetenv("NMOE_TIMERS");
}

static void test_config_resume_flags(void **state) {
  Config c;
  char *a1[] = {"--no-resume"};
  config_ok("resume = true\n", 1, a1, &c);
  assert_false(c.resume);
  config_free(&c);
  char *a2[] = {"--no-resume", "--resume"};
  config_ok("resume = false\n", 2, a2, &c);
  assert_true(c.resume);
  config_free(&c);
  char *a3[] = {"--resume", "--resume=0"};
  config_ok("", 2, a3, &c);
  assert_false(c.resume);
  config_free(&c);
  char *a4[] = {"--steps=1_000", "--validation_enabled=1", "--validation_data_path=v", "--tokenizer=gpt2",
                "--eos_token_id=50256"};
  config_ok("", 5, a4, &c);
  assert_int_equal(c.steps, 1000);
  assert_true(c.validation_enabled);
  assert_string_equal(c.tokenizer, "gpt2");
  config_free(&c);
}

static void test_config_override_errors(void **state) {
  char *a1[] = {"--steps=abc"};
  config_fails("", 1, a1, "argument --steps: steps expects an integer, got 'abc'");
  char *a2[] = {"--steps=1.5"};
  config_fails("", 1, a2, "argument --steps: steps expects an integer, got '1.5'");
  char *a3[] = {"--lr_dense=fast"};
  config_fails("", 1, a3, "argument --lr_dense: lr_dense expects a float, got 'fast'");
  char *a4[] = {"--resume=maybe"};
  config_fails("", 1, a4, "argument --resume: resume expects a boolean (true/false), got 'maybe'");
  char *a5[] = {"--stepz=5"};
  config_fails("", 1, a5, "argument --stepz: unknown key 'stepz' (did you mean 'steps'?)");
  char *a6[] = {"steps=5"};
  config_fails("", 1, a6, "argument 'steps=5': expected --key=value");
  char *a7[] = {"--steps"};
  config_fails("", 1, a7, "argument '--steps': expected --key=value");
  char *a8[] = {"--steps=1__0"};
  config_fails("", 1, a8, "steps expects an integer, got '1__0'");
  char *a9[] = {"--steps=99999999999999999999"};
  config_fails("", 1, a9, "steps expects an integer");
  char *a10[] = {"--lr-dense=1"};
  config_fails("", 1, a10, "unknown key 'lr-dense' (did you mean 'lr_dense'?)");
  setenv("NMOE_STEPS", "ten", 1);
  config_fails("", 0, NULL, "environment NMOE_STEPS: steps expects an integer, got 'ten'");
  unsetenv("NMOE_STEPS");
  setenv("NMOE_RESUME", "yes", 1);
  config_fails("", 0, NULL, "environment NMOE_RESUME: resume expects a boolean");
  unsetenv("NMOE_RESUME");
}

/* ---- config: validation ---- */

static void test_config_validate(void **state) {
  struct {
    const char *arg, *want;
  } cases[] = {
      {"--dim=0", "config: dim must be > 0 (got 0)"},
      {"--n_layers=-1", "n_layers must be > 0"},
      {"--n_activated_experts=9", "n_activated_experts (9) must be <= n_routed_experts (8)"},
      {"--n_dense_layers=4", "n_dense_layers must be in [0, n_layers=3] (got 4)"},
      {"--batch_size=0", "batch_size must be > 0"},
      {"--seq_len=0", "seq_len must be > 0"},
      {"--seq_len=1024", "seq_len (1024) must be <= 2 * max_position_embeddings (256)"},
      {"--attn=swa", "attn='swa' as global attention is not supported yet"},
      {"--attn=gqa", "attn must be 'mla', 'mha' or 'dsa' (got 'gqa')"},
      {"--attn_global_every=0", "attn_global_every must be >= 1"},
      {"--dtype=fp16", "dtype must be bf16, fp8 or nvfp4 (got 'fp16')"},
      {"--device=tpu", "device must be auto, cuda or cpu (got 'tpu')"},
      {"--master_weights=bf16", "master_weights must be fp32 or stochastic"},
      {"--norm_topk_prob=false", "norm_topk_prob=false is not supported yet"},
      {"--tokenizer=llama", "tokenizer must be gpt2, cl100k_base, o200k_base or o200k_harmony"},
      {"--vocab_size=163840", "vocab_size (163840) is smaller than the o200k_harmony vocabulary (201088 tokens)"},
      {"--eos_token_id=201088", "eos_token_id must be in [0, vocab_size=201088)"},
      {"--decay_floor=0", "decay_floor (0) must be > 0"},
      {"--decay_floor=1e-3", "decay_floor (0.001) must be > 0 and <= lr_dense (0.00034)"},
      {"--flow_mode=dev", "flow_mode='dev' needs mixture_toml and flow_profiles_toml"},
      {"--data_path=", "no data source: set data_path"},
      {"--steps=0", "steps must be > 0"},
      {"--validation_enabled=true", "validation_enabled needs validation_data_path"},
      {"--lr_dense=inf", "lr_dense must be a finite number"},
      {"--adam_beta2=1", "adam_beta2 must be in [0, 1)"},
      {"--log_every=0", "log_every must be > 0"},
      {"--qk_rope_head_dim=7", "qk_rope_head_dim must be even"},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    char *argv[] = {(char *)cases[i].arg};
    config_fails("", 1, argv, cases[i].want);
  }
  char *q8[] = {"--dtype=nvfp4", "--moe_inter_dim=48"};
  config_fails("", 2, q8, "dtype=nvfp4 needs dim (64) and moe_inter_dim (48) divisible by 32");
  char *g[] = {"--attn_global_every=2", "--attn_local=nsa"};
  config_fails("", 2, g, "attn_local='nsa' is not supported yet");
  char *m[] = {"--attn=mha", "--n_kv_heads=3"};
  config_fails("", 2, m, "n_heads (4) must be a multiple of n_kv_heads (3)");
  char *m2[] = {"--attn=mha", "--dim=66"};
  config_fails("", 2, m2, "dim (66) must be a multiple of n_heads (4)");
  char *d1[] = {"--attn=dsa", "--dsa_training_mode=dense"};
  config_fails("", 2, d1, "dsa_training_mode must be sparse or dense_warmup (got 'dense')");
  char *d2[] = {"--attn=dsa", "--dsa_idx_dim=6"};
  config_fails("", 2, d2, "dsa_idx_dim must be >= qk_rope_head_dim (8)");
  char *d3[] = {"--attn=dsa", "--q_lora_rank=0"};
  config_fails("", 2, d3, "attn = dsa needs q_lora_rank > 0");

  Config c;
  char *ok1[] = {"--attn_global_every=2", "--attn_local=swa", "--attn_local_window=16"};
  config_ok("", 3, ok1, &c);
  config_free(&c);
  char *ok_dsa[] = {"--attn=dsa", "--dsa_training_mode=dense_warmup", "--dsa_top_k=16"};
  config_ok("", 3, ok_dsa, &c);
  config_free(&c);
  char *ok2[] = {"--attn=mha", "--n_kv_heads=2"};
  config_ok("", 2, ok2, &c);
  assert_int_equal(config_validate(&c, (char[8]){0}, 8), 0);
  config_free(&c);
  char *ok3[] = {"--flow_mode=dev", "--mixture_toml=m.toml", "--flow_profiles_toml=f.toml", "--data_path=",
                 "--steps=0"};
  config_ok("", 5, ok3, &c);
  config_free(&c);
}

/* ---- config: serialisation and fingerprint ---- */

static void test_config_json(void **state) {
  Config c;
  config_ok("experiment_id = \"q\\\"uote\\n\"\n", 0, NULL, &c);
  char *j = config_to_json(&c);
  assert_null(strstr(j, "\": ")); /* compact */
  assert_null(strstr(j, ", \""));
  assert_non_null(strstr(j, "\"dim\":64,"));
  assert_non_null(strstr(j, "\"lr_dense\":0.00034000000000000002,"));
  assert_non_null(strstr(j, "\"resume\":true"));
  assert_non_null(strstr(j, "\"experiment_id\":\"q\\\"uote\\n\""));
  char err[256];
  Json *doc = json_parse(j, strlen(j), err, sizeof err);
  assert_non_null(doc);
  assert_int_equal(doc->type, JSON_OBJ);
  assert_true(doc->n > 80);
  for (int i = 1; i < doc->n; i++) assert_true(strcmp(doc->keys[i - 1], doc->keys[i]) < 0);
  assert_int_equal(json_get_int(doc, "dim", 0), 64);
  assert_true(json_get_num(doc, "lr_dense", 0) == 3.4e-4); /* %.17g round-trips */
  assert_string_equal(json_get_str(doc, "experiment_id", ""), "q\"uote\n");
  assert_non_null(json_get(doc, "sft_enabled")); /* all fields, supported or not */
  json_free(doc);
  free(j);
  config_free(&c);
}

static void fp_of(const char *extra, int argc, char **argv, char out[65]) {
  Config c;
  config_ok(extra, argc, argv, &c);
  config_fingerprint(&c, out);
  config_free(&c);
}

static void test_config_fingerprint(void **state) {
  char base[65], other[65], again[65];
  fp_of("", 0, NULL, base);
  assert_int_equal(strlen(base), 64);
  assert_int_equal(strspn(base, "0123456789abcdef"), 64);
  fp_of("", 0, NULL, again);
  assert_string_equal(base, again);

  const char *same[] = {"--steps=123",        "--data_path=/elsewhere", "--checkpoint_dir=/c",
                        "--metrics_dir=/m",   "--log_every=1",          "--lr_dense=1e-3",
                        "--lr_expert=1e-2",   "--warmup_steps=7",       "--resume=false",
                        "--experiment_id=zz", "--device=cpu",           "--checkpoint_every=3"};
  for (size_t i = 0; i < sizeof same / sizeof same[0]; i++) {
    char *argv[] = {(char *)same[i]};
    fp_of("", 1, argv, other);
    if (strcmp(base, other)) print_error("%s changed the fingerprint\n", same[i]);
    assert_string_equal(base, other);
  }
  const char *diff[] = {"--dim=128", "--seed=43", "--n_layers=2", "--tokenizer=gpt2", "--batch_size=4",
                        "--route_scale=2.5", "--loss_mask_eos=false"};
  for (size_t i = 0; i < sizeof diff / sizeof diff[0]; i++) {
    char *argv[] = {(char *)diff[i], "--eos_token_id=100"};
    fp_of("", 2, argv, other);
    char *argv0[] = {"--eos_token_id=100"};
    fp_of("", 1, argv0, again);
    if (!strcmp(again, other)) print_error("%s did not change the fingerprint\n", diff[i]);
    assert_string_not_equal(again, other);
  }
}

static void test_config_print_roundtrip(void **state) {
  Config c, d;
  char *argv[] = {"--experiment_id=we\"ird\\name\ttab", "--hold_tokens=1.5e9", "--lr_dense=3e-4",
                  "--rope_theta=10000", "--resume=false", "--decay_floor=1e-5"};
  config_ok("", 6, argv, &c);
  char path[64];
  strcpy(path, "/tmp/nmoe_cfg_XXXXXX");
  int fd = mkstemp(path);
  assert_true(fd >= 0);
  FILE *f = fdopen(fd, "w");
  assert_non_null(f);
  config_print(&c, f);
  fclose(f);
  char err[512];
  int rc = config_load(&d, path, 0, NULL, err, sizeof err);
  if (rc) print_error("%s\n", err);
  assert_int_equal(rc, 0);
  char *jc = config_to_json(&c), *jd = config_to_json(&d);
  assert_string_equal(jc, jd);
  char fc[65], fd2[65];
  config_fingerprint(&c, fc);
  config_fingerprint(&d, fd2);
  assert_string_equal(fc, fd2);
  assert_string_equal(d.experiment_id, "we\"ird\\name\ttab");
  assert_true(d.rope_theta == 10000.0);
  free(jc);
  free(jd);
  /* the printed file is readable as TOML with a float for every float field */
  TomlValue *v = toml_parse_file(path, 0, err, sizeof err);
  assert_non_null(v);
  assert_int_equal(toml_get(v, "rope_theta")->type, TOML_FLOAT);
  assert_int_equal(toml_get(v, "hold_tokens")->type, TOML_FLOAT);
  assert_null(toml_get(v, "sft_enabled")); /* unsupported fields are not printed */
  toml_free(v);
  unlink(path);
  config_free(&c);
  config_free(&d);
}

/* ---- shipped configs ---- */

/* Training configs are the files under configs/ and configs/speedrun/ that set
 * preset (others there, like flow_profiles.toml, belong to the data layer). */
static void test_shipped_configs(void **state) {
  glob_t g;
  int n = 0;
  const char *pats[] = {"configs/*.toml", "configs/speedrun/*.toml"};
  for (int p = 0; p < 2; p++) {
    assert_int_equal(glob(pats[p], 0, NULL, &g), 0);
    for (size_t i = 0; i < g.gl_pathc; i++) {
      Config c;
      char err[512];
      TomlValue *t = toml_parse_file(g.gl_pathv[i], 0, err, sizeof err);
      int training = t && toml_get(t, "preset");
      toml_free(t);
      if (!training) continue;
      int rc = config_load(&c, g.gl_pathv[i], 0, NULL, err, sizeof err);
      if (rc) print_error("%s: %s\n", g.gl_pathv[i], err);
      assert_int_equal(rc, 0);
      assert_int_equal(config_validate(&c, err, sizeof err), 0);
      assert_string_equal(c.dtype, "bf16");
      config_free(&c);
      n++;
    }
    globfree(&g);
  }
  assert_true(n >= 8);
  const char *named[] = {"configs/tiny.toml", "configs/moonlet.toml", "configs/moonlight.toml", "configs/dsv2.toml",
                         "configs/dsv3.toml", "configs/speedrun/super.toml", "configs/speedrun/moe.toml",
                         "configs/speedrun/dense.toml"};
  for (int i = 0; i < 8; i++) assert_int_equal(access(named[i], R_OK), 0);
  Config c;
  char err[512];
  assert_int_equal(config_load(&c, "configs/tiny.toml", 0, NULL, err, sizeof err), 0);
  assert_int_equal(c.dim, 64);
  assert_int_equal(c.n_routed_experts, 8);
  assert_string_equal(c.device, "cpu");
  assert_string_equal(c.data_path, "data/brown");
  assert_false(c.resume);
  assert_true(c.hold_tokens == 1e12);
  config_free(&c);
  assert_int_equal(config_load(&c, "configs/dsv3.toml", 0, NULL, err, sizeof err), 0);
  assert_int_equal(c.vocab_size, 201088);
  assert_int_equal(c.n_routed_experts, 256);
  config_free(&c);
  assert_int_equal(config_load(&c, "configs/speedrun/super.toml", 0, NULL, err, sizeof err), 0);
  assert_false(c.loss_mask_eos);
  assert_string_equal(c.attn, "mha");
  assert_int_equal(c.n_activated_experts, 7);
  config_free(&c);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_toml_constructs),
      cmocka_unit_test(test_toml_header_rules),
      cmocka_unit_test(test_toml_errors),
      cmocka_unit_test(test_toml_file),
      cmocka_unit_test(test_toml_env_expansion),
      cmocka_unit_test(test_config_minimal_and_defaults),
      cmocka_unit_test(test_config_unknown_key),
      cmocka_unit_test(test_config_wrong_type),
      cmocka_unit_test(test_config_missing_required),
      cmocka_unit_test(test_config_unsupported),
      cmocka_unit_test(test_config_override_precedence),
      cmocka_unit_test(test_config_resume_flags),
      cmocka_unit_test(test_config_override_errors),
      cmocka_unit_test(test_config_validate),
      cmocka_unit_test(test_config_json),
      cmocka_unit_test(test_config_fingerprint),
      cmocka_unit_test(test_config_print_roundtrip),
      cmocka_unit_test(test_shipped_configs),
  };
  return cmocka_run_group_tests(tests, clear_nmoe_env, NULL);
}

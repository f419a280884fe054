/* test_quant.c: the block-scaled FP8 (E4M3) / FP4 (E2M1) codec of
 * backend/cpu/quant.h and the CPU quantize_blocks op: hand values of the
 * element encoders (max, subnormals, ties to even, saturation, negative zero,
 * NaN), every code round-trips, the E8M0 scale rule, block edge cases (amax 0,
 * NaN/Inf blocks, the smallest scale), the column-blocked view against a
 * transpose, aliasing, the packed form decoding to the fake-quant output, and
 * the finite range. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "backend/cpu/quant.h"
#include "core/rng.h"

enum { F8 = QFMT_FP8_E4M3, F4 = QFMT_FP4_E2M1 };

static void test_e4m3_hand_values(void **state) {
  (void)state;
  const struct { double v; unsigned code; } cases[] = {
      {448, 0x7E},          {1.5, 0x3C},           {1.0, 0x38},        {-1.5, 0xBC},
      {0x1p-9, 0x01},       {0x1p-7, 0x04},        {7 * 0x1p-9, 0x07}, {0x1p-6, 0x08},
      {0x1p-10, 0x00},      /* half the smallest subnormal: tie to even (0) */
      {3 * 0x1p-10, 0x02},  /* tie between subnormals 1 and 2: even */
      {5 * 0x1p-10, 0x02},  /* tie between 2 and 3: even */
      {1 + 1.0 / 16, 0x38}, /* tie between 1.0 and 1.125: even mantissa */
      {1 + 3.0 / 16, 0x3A}, /* tie between 1.125 and 1.25: even */
      {1 + 15.0 / 16, 0x40},/* tie between 1.875 and 2.0: up into the next binade */
      {240, 0x77},          {232, 0x76},           /* 232 ties 224 | 240: even = 224 */
      {500, 0x7E},          {464, 0x7E},           {1e30, 0x7E}, {INFINITY, 0x7E},
      {-INFINITY, 0xFE},    {0.0, 0x00},           {-0.0, 0x80},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    unsigned got = quant_encode(cases[i].v, F8);
    if (got != cases[i].code) fail_msg("e4m3(%a) = 0x%02x, want 0x%02x", cases[i].v, got, cases[i].code);
  }
  assert_int_equal(quant_encode(NAN, F8) & 0x7F, 0x7F);
  assert_true(quant_decode(0x7E, F8) == 448);
  assert_true(quant_decode(0x01, F8) == 0x1p-9);
  assert_true(quant_decode(0x76, F8) == 224);
  assert_true(isnan(quant_decode(0x7F, F8)) && isnan(quant_decode(0xFF, F8)));
  assert_true(quant_decode(0x80, F8) == 0 && signbit(quant_decode(0x80, F8)));
  for (unsigned c = 0; c < 256; c++) /* every finite code round-trips */
    if ((c & 0x7F) != 0x7F) assert_int_equal(quant_encode(quant_decode(c, F8), F8), c);
}

static void test_e2m1_hand_values(void **state) {
  (void)state;
  const double grid[8] = {0, 0.5, 1, 1.5, 2, 3, 4, 6};
  for (unsigned c = 0; c < 16; c++) {
    double want = (c & 8) ? -grid[c & 7] : grid[c & 7];
    double got = quant_decode(c, F4);
    assert_true(got == want && !!signbit(got) == !!(c & 8));
    assert_int_equal(quant_encode(got, F4), c);
  }
  const struct { double v; unsigned code; } cases[] = {
      {0.25, 0}, {0.75, 2}, {1.25, 2}, {1.75, 4}, {2.5, 4}, {3.5, 6}, {5, 6},
      {0.3, 1},  {2.6, 5},  {7, 7},    {100, 7},  {INFINITY, 7}, {-5.5, 0xF}, {-0.0, 8},
      {-0.2, 8}, /* rounds to -0: the sign stays */
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    unsigned got = quant_encode(cases[i].v, F4);
    if (got != cases[i].code) fail_msg("e2m1(%g) = 0x%x, want 0x%x", cases[i].v, got, cases[i].code);
  }
  assert_int_equal(quant_encode(NAN, F4), 0); /* no NaN code: blocks carry NaN in the scale */
}

static void test_scale_rule(void **state) {
  (void)state;
  assert_int_equal(quant_scale_byte(448, 1, F8), 127);       /* fits exactly at 2^0 */
  assert_int_equal(quant_scale_byte(448.5, 1, F8), 128);     /* just over: next power */
  assert_int_equal(quant_scale_byte(224, 1, F8), 126);
  assert_int_equal(quant_scale_byte(1, 1, F8), 127 - 8);     /* 448 / 256 >= 1 > 448 / 512 */
  assert_int_equal(quant_scale_byte(6, 1, F4), 127);
  assert_int_equal(quant_scale_byte(6.01, 1, F4), 128);
  assert_int_equal(quant_scale_byte(1, 1, F4), 125);         /* 6 / 4 >= 1 > 6 / 8 */
  assert_int_equal(quant_scale_byte(0, 1, F8), QUANT_EMIN + 127);
  assert_int_equal(quant_scale_byte(1e-40, 1, F4), QUANT_EMIN + 127);
  assert_int_equal(quant_scale_byte(1e300, 1, F8), 254);     /* clamped at 2^127 */
  assert_int_equal(quant_scale_byte(1, 0, F8), QUANT_SCALE_NAN);
  /* the rule: the smallest power 2^e with amax <= Q * 2^e, for many amax */
  for (int i = 0; i < 2000; i++) {
    double amax = ldexp(1 + (double)(rng_u64(3, (uint64_t)i, 0, 0) % 1000) / 1000, i % 200 - 100);
    for (int f = F8; f <= F4; f++) {
      int e = (int)quant_scale_byte(amax, 1, f) - 127;
      assert_true(amax <= ldexp(quant_max(f), e));
      assert_true(e == QUANT_EMIN || amax > ldexp(quant_max(f), e - 1));
    }
  }
}

/* Fake quantization of host floats through the CPU op. */
static void fake(Backend *be, float *q, const float *x, int outer, int K, int inner, int fmt) {
  const size_t n = (size_t)outer * K * inner;
  void *d = be->alloc(be, n * sizeof(float));
  be->put(be, d, BUF_ACT, x, n);
  be->quantize_blocks(be, d, d, outer, K, inner, fmt); /* in place: q aliases x */
  be->get(be, q, BUF_ACT, d, n);
  be->free(be, d);
}

static float randf(uint64_t s, size_t i) {
  double u = (double)(rng_u64(s, i, 0, 0) >> 11) * 0x1p-53;
  double w = (double)(rng_u64(s, i, 1, 0) >> 11) * 0x1p-53;
  return (float)((u - 0.5) * exp2(12 * w - 6)); /* wide dynamic range within a block */
}

static void test_block_edges(void **state) {
  (void)state;
  Backend *be = backend_cpu();
  enum { K = 64 };
  float x[4 * K], q[4 * K];
  for (int i = 0; i < 4 * K; i++) x[i] = randf(5, (size_t)i);
  for (int i = 0; i < 32; i++) x[i] = (i % 2) ? -0.0f : 0.0f; /* block 0: all zeros */
  x[40] = NAN;                    /* block 1: a NaN */
  x[64 + 3] = INFINITY;           /* block 2: an infinity */
  for (int i = 96; i < 128; i++) x[i] = 1e-38f * (float)(i - 100); /* block 3: tiny */
  x[128] = 448.0f * 8;            /* block 4: amax exactly 448 * 2^3 */
  x[129] = 3.0f;
  for (int f = F8; f <= F4; f++) {
    fake(be, q, x, 4, K, 1, f);
    for (int i = 0; i < 32; i++) assert_true(q[i] == 0 && !!signbit(q[i]) == (i % 2));
    for (int i = 32; i < 96; i++) assert_true(isnan(q[i])); /* whole NaN and Inf blocks */
    for (int i = 96; i < 128; i++) {
      double steps = ldexp((double)q[i], 124 + (f == F8 ? 9 : 1)); /* multiples of the finest step */
      assert_true(steps == rint(steps));
      assert_true(fabsf(q[i]) <= fabsf(x[i]) * 2 + 1e-40f);
    }
    if (f == F8) assert_true(q[128] == 448.0f * 8 && q[129] == 3.0f); /* 3 = 0.375 * 8 is exact */
    for (int b = 4; b < 8; b++) { /* ordinary blocks: error within half a step of the format */
      float amax = 0;
      for (int i = 0; i < 32; i++) amax = fmaxf(amax, fabsf(x[b * 32 + i]));
      int e = (int)quant_scale_byte(amax, 1, f) - 127;
      for (int i = 0; i < 32; i++) {
        double v = x[b * 32 + i], a = fabs(v), sc = ldexp(1, e);
        int mb = f == F8 ? 3 : 1, emin = f == F8 ? -6 : 0;
        int E = a > 0 ? ilogb(a / sc) : emin;
        double half_step = sc * ldexp(1, (E > emin ? E : emin) - mb - 1);
        assert_true(fabs(q[b * 32 + i] - v) <= half_step);
        assert_true(fabs(q[b * 32 + i]) <= quant_max(f) * sc); /* never saturates */
      }
    }
  }
  be->destroy(be);
}

/* Finite inputs below the documented limit (2.9e38) decode finite, in both
 * formats, for blocks whose amax sweeps the top of the float range; and the
 * limit is real: bf16's largest value overflows in FP8. */
static void test_range(void **state) {
  (void)state;
  Backend *be = backend_cpu();
  enum { K = 32 };
  float x[K], q[K];
  for (int f = F8; f <= F4; f++) {
    for (double top = 1e30; top < 2.9e38; top *= 1.0007) {
      for (int i = 0; i < K; i++) x[i] = (float)(top * (1.0 - i / 64.0)) * (i % 2 ? -1 : 1);
      fake(be, q, x, 1, K, 1, f);
      for (int i = 0; i < K; i++) assert_true(isfinite(q[i]));
    }
  }
  for (int i = 0; i < K; i++) x[i] = 3.3895314e38f; /* bf16 max (0x7F7F) */
  fake(be, q, x, 1, K, 1, F8);
  assert_true(isinf(q[0]));
  be->destroy(be);
}

/* [E, K, N] blocked down the columns equals transposing, blocking rows, and
 * transposing back. */
static void test_column_blocks(void **state) {
  (void)state;
  Backend *be = backend_cpu();
  enum { E = 3, K = 64, N = 5 };
  float *x = malloc(sizeof(float) * E * K * N), *xt = malloc(sizeof(float) * E * K * N);
  float *q = malloc(sizeof(float) * E * K * N), *qt = malloc(sizeof(float) * E * K * N);
  for (int i = 0; i < E * K * N; i++) x[i] = randf(6, (size_t)i);
  for (int e = 0; e < E; e++)
    for (int k = 0; k < K; k++)
      for (int n = 0; n < N; n++) xt[(e * N + n) * K + k] = x[(e * K + k) * N + n];
  for (int f = F8; f <= F4; f++) {
    fake(be, q, x, E, K, N, f);
    fake(be, qt, xt, E * N, K, 1, f);
    for (int e = 0; e < E; e++)
      for (int k = 0; k < K; k++)
        for (int n = 0; n < N; n++) assert_true(q[(e * K + k) * N + n] == qt[(e * N + n) * K + k]);
  }
  free(x), free(xt), free(q), free(qt);
  be->destroy(be);
}

/* pack -> unpack equals the fake-quant op, in both views; packed sizes and
 * nibble order. */
static void test_packed_form(void **state) {
  (void)state;
  Backend *be = backend_cpu();
  enum { O = 4, K = 96, N = 3, T = O * K * N };
  float *x = malloc(sizeof(float) * T), *q = malloc(sizeof(float) * T), *u = malloc(sizeof(float) * T);
  uint8_t *codes = malloc(T), *scales = malloc(T / 32);
  for (int i = 0; i < T; i++) x[i] = randf(7, (size_t)i);
  x[5] = NAN; /* a NaN block survives packing through its scale byte */
  for (int f = F8; f <= F4; f++)
    for (int inner = 1; inner <= N; inner += N - 1) {
      const int outer = T / (K * inner);
      fake(be, q, x, outer, K, inner, f);
      memset(codes, 0xAA, T);
      quant_pack(codes, scales, x, outer, K, inner, f);
      quant_unpack(u, codes, scales, outer, K, inner, f);
      for (int i = 0; i < T; i++) assert_true(memcmp(&u[i], &q[i], sizeof(float)) == 0 || (isnan(u[i]) && isnan(q[i])));
      if (f == F4) for (int i = T / 2; i < T; i++) assert_int_equal(codes[i], 0xAA); /* K/2 bytes a row */
    }
  /* nibble order: element 2j in the low nibble of byte j */
  float y[32] = {6, 1, -3, 0.5f};
  quant_pack(codes, scales, y, 1, 32, 1, F4);
  assert_int_equal(scales[0], 127);
  assert_int_equal(codes[0], 0x27); /* 6 -> 7 low, 1 -> 2 high */
  assert_int_equal(codes[1], 0x1D); /* -3 -> 0xD low, 0.5 -> 1 high */
  free(x), free(q), free(u), free(codes), free(scales);
  be->destroy(be);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_e4m3_hand_values), cmocka_unit_test(test_e2m1_hand_values),
      cmocka_unit_test(test_scale_rule),       cmocka_unit_test(test_block_edges),
      cmocka_unit_test(test_column_blocks),    cmocka_unit_test(test_packed_form),
      cmocka_unit_test(test_range),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}

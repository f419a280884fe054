/* test_quant.c: the CUDA quantize_blocks (FP8 E4M3 / FP4 E2M1 with E8M0
 * scales per 32 along K) against the CPU reference, BIT FOR BIT, on the GPU
 * machine. Inputs are bf16-exact floats, random and adversarial per block:
 * values at the midpoints between codes (ties to even), amax exactly Q * 2^e
 * and one bf16 step above it, all-zero blocks with negative zeros, NaN and
 * infinity blocks, bf16 subnormals (the smallest scale), values near the bf16
 * maximum, and wide per-element exponents. Both views are checked: rows
 * (inner = 1, one warp per block) and weight columns (inner > 1), out of place
 * and in place. Prints PASS/FAIL lines and "N passed, M failed"; exits 1 on
 * any failure, 2 when no GPU is usable. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "backend/cpu/quant.h"
#include "core/log.h"

static Backend *cpu, *gpu;
static int npass, nfail;
static uint64_t rng_state = 0x243f6a8885a308d3ull;

static uint64_t next_u64(void) { /* splitmix64 */
  uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
static double urand(void) { return (double)(next_u64() >> 11) / 9007199254740992.0; }
static int irand(int n) { return (int)(next_u64() % (uint64_t)n); }

/* Nearest bf16, ties to even (NaN and infinities kept). */
static float bf16_round(float x) {
  uint32_t u;
  memcpy(&u, &x, 4);
  if ((u & 0x7F800000u) != 0x7F800000u) u = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
  memcpy(&x, &u, 4);
  return x;
}

/* The next bf16 above a positive finite bf16 value. */
static float bf16_up(float x) {
  uint32_t u;
  memcpy(&u, &x, 4);
  u += 0x10000u;
  memcpy(&x, &u, 4);
  return x;
}

/* Fills the 32 values of one block at x[i * stride] with pattern kind. */
static void fill_block(float *x, size_t stride, int kind, int fmt) {
  const int ncodes = fmt == QFMT_FP8_E4M3 ? 126 : 7; /* positive finite codes below the max */
  const int e = irand(60) - 30;
  for (int i = 0; i < QUANT_BLOCK; i++) {
    double v;
    switch (kind) {
    case 0: v = (urand() - 0.5) * ldexp(1, e); break;            /* plain random */
    case 1: {                                                     /* midpoints: ties */
      int c = irand(ncodes);
      v = 0.5 * (quant_decode((unsigned)c, fmt) + quant_decode((unsigned)c + 1, fmt)) * ldexp(1, e);
      if (irand(2)) v = -v;
      break;
    }
    case 2: v = (urand() - 0.5) * ldexp(1, e); break;            /* + amax at Q*2^e (below) */
    case 3: v = irand(2) ? -0.0 : 0.0; break;                     /* zeros */
    case 4: v = (urand() - 0.5) * ldexp(1, e); break;            /* + a NaN or an infinity */
    case 5: v = (urand() - 0.5) * ldexp(1, -120 - irand(13)); break; /* bf16 subnormals */
    case 6: v = (urand() - 0.5) * 6.7e38; break;                  /* near the bf16 max */
    default: v = (urand() - 0.5) * ldexp(1, irand(250) - 126); break; /* wide exponents */
    }
    x[(size_t)i * stride] = bf16_round((float)v);
  }
  const int j = irand(QUANT_BLOCK);
  if (kind == 1 || kind == 2) { /* amax exactly Q * 2^e, or one bf16 step above */
    float a = (float)ldexp(quant_max(fmt), e);
    x[(size_t)j * stride] = (kind == 2 && irand(2)) ? bf16_up(a) : (irand(2) ? -a : a);
  }
  if (kind == 4) x[(size_t)j * stride] = irand(2) ? NAN : (irand(2) ? INFINITY : -INFINITY);
}

static int same(float a, float b) { return (isnan(a) && isnan(b)) || memcmp(&a, &b, 4) == 0; }

/* One case: x [outer, K, inner] of mixed block kinds, quantized on both
 * backends (on the GPU out of place and in place), compared bit for bit. */
static void check(int outer, int K, int inner, int fmt) {
  const size_t n = (size_t)outer * K * inner, nk = (size_t)K / QUANT_BLOCK;
  float *x = xmalloc(n * sizeof(float)), *ref = xmalloc(n * sizeof(float));
  float *got = xmalloc(n * sizeof(float)), *got2 = xmalloc(n * sizeof(float));
  for (size_t b = 0; b < (size_t)outer * nk * inner; b++) {
    const size_t o = b / (nk * inner), r = b % (nk * inner);
    const size_t base = (o * K + (r / inner) * QUANT_BLOCK) * inner + r % inner;
    fill_block(x + base, (size_t)inner, irand(8), fmt);
  }
  void *c = cpu->alloc(cpu, n * cpu->size[BUF_ACT]);
  void *gx = gpu->alloc(gpu, n * gpu->size[BUF_ACT]), *gq = gpu->alloc(gpu, n * gpu->size[BUF_ACT]);
  cpu->put(cpu, c, BUF_ACT, x, n);
  cpu->quantize_blocks(cpu, c, c, outer, K, inner, fmt);
  cpu->get(cpu, ref, BUF_ACT, c, n);
  gpu->put(gpu, gx, BUF_ACT, x, n);
  gpu->quantize_blocks(gpu, gq, gx, outer, K, inner, fmt);
  gpu->get(gpu, got, BUF_ACT, gq, n);
  gpu->quantize_blocks(gpu, gx, gx, outer, K, inner, fmt); /* in place */
  gpu->get(gpu, got2, BUF_ACT, gx, n);
  size_t bad = 0, first = 0;
  for (size_t i = 0; i < n; i++)
    if (!same(got[i], ref[i]) || !same(got2[i], ref[i])) {
      if (!bad++) first = i;
    }
  const char *fn = fmt == QFMT_FP8_E4M3 ? "fp8" : "fp4";
  if (bad) {
    nfail++;
    printf("FAIL quantize_blocks %s [%d, %d, %d]: %zu of %zu differ; first at %zu: x=%a cpu=%a "
           "gpu=%a in-place=%a\n", fn, outer, K, inner, bad, n, first, x[first], ref[first],
           got[first], got2[first]);
  } else {
    npass++;
    printf("PASS quantize_blocks %s [%d, %d, %d] bit-identical (%zu values)\n", fn, outer, K, inner, n);
  }
  cpu->free(cpu, c);
  gpu->free(gpu, gx);
  gpu->free(gpu, gq);
  free(x), free(ref), free(got), free(got2);
}

int main(void) {
  char err[256];
  cpu = backend_cpu();
  gpu = backend_cuda(0, err, sizeof err);
  if (!gpu) {
    fprintf(stderr, "test_quant: no usable GPU: %s\n", err);
    return 2;
  }
  for (int fmt = QFMT_FP8_E4M3; fmt <= QFMT_FP4_E2M1; fmt++) {
    check(4096, 256, 1, fmt);  /* activation rows */
    check(333, 96, 1, fmt);
    check(1, 32, 1, fmt);
    check(8, 256, 384, fmt);   /* W13 [E, D, 2Fm]: blocks down the columns */
    check(8, 192, 256, fmt);   /* W2 [E, Fm, D] */
    check(3, 32, 7, fmt);
    check(8192, 160, 1, fmt);  /* more blocks than one grid: the grid-stride loop repeats */
  }
  printf("%d passed, %d failed\n", npass, nfail);
  gpu->destroy(gpu);
  cpu->destroy(cpu);
  return nfail ? 1 : 0;
}

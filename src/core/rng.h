/* rng.h: counter-based random numbers. A value is a pure function of
 * (seed, stream, index, attempt), so results do not depend on thread count,
 * order of generation or backend, and "RNG state" is just the seed plus the
 * step counter (nothing hidden to checkpoint). */
#ifndef NMOE_RNG_H
#define NMOE_RNG_H

#include <math.h>
#include <stdint.h>

static inline uint64_t rng_mix64(uint64_t z) {
  /* splitmix64 finaliser: a bijection with good avalanche */
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

static inline uint64_t rng_u64(uint64_t seed, uint64_t stream, uint64_t index, uint32_t attempt) {
  uint64_t h = rng_mix64(seed ^ rng_mix64(stream + 0x632BE59BD9B4E019ull));
  h = rng_mix64(h ^ index);
  return rng_mix64(h ^ ((uint64_t)attempt << 32 | 0x5bd1e995u));
}

/* Uniform in (0, 1]. */
static inline double rng_uniform(uint64_t seed, uint64_t stream, uint64_t index, uint32_t attempt) {
  return ((rng_u64(seed, stream, index, attempt) >> 11) + 1) * (1.0 / 9007199254740992.0);
}

/* Standard normal (Box-Muller on two independent uniforms, computed in double
 * so CPU builds agree bit for bit). */
static inline float rng_normal(uint64_t seed, uint64_t stream, uint64_t index, uint32_t attempt) {
  double u1 = rng_uniform(seed, stream, 2 * index, attempt);
  double u2 = rng_uniform(seed, stream, 2 * index + 1, attempt);
  return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

#endif

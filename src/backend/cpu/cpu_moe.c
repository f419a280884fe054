/* cpu_moe.c: the MoE router (sigmoid scores, biased top-k, normalised
 * weights, optional switch-style aux term) and the single-device token
 * permutation (stable counting sort, gather, weighted combine), forward and
 * backward. */
#include <stdlib.h>

#include "backend/cpu/cpu.h"
#include "core/log.h"

void cpu_router_fwd(Backend *be, void *scores, int32_t *idx, void *w, int32_t *counts, void *imp,
                    const void *x, const void *wg, const void *bias, int N, int D, int E, int K,
                    float route_scale) {
  real_t *S = scores, *W = w, *Im = imp;
  const real_t *Bs = bias;
  NMOE_ASSERT(K >= 1 && K <= E);
  /* logits = route_scale * x @ wg^T, then sigmoid in place. */
  cpu_gemm_strided(S, E, x, D, wg, D, N, E, D, 0, 1, route_scale, 0);
#pragma omp parallel for schedule(static)
  for (int t = 0; t < N; t++) {
    real_t *s = S + (size_t)t * E;
    int32_t *id = idx + (size_t)t * K;
    for (int e = 0; e < E; e++) s[e] = 1 / (1 + exp(-s[e]));
    /* Top-k on s + bias: repeated argmax over the unchosen experts; scanning in
     * id order with a strict '>' sends ties to the lower id. */
    real_t sum = 0;
    for (int k = 0; k < K; k++) {
      int best = -1;
      real_t bv = 0;
      for (int e = 0; e < E; e++) {
        int taken = 0;
        for (int j = 0; j < k; j++) taken |= id[j] == e;
        if (taken) continue;
        real_t v = s[e] + Bs[e];
        if (best < 0 || v > bv) best = e, bv = v;
      }
      id[k] = best;
      sum += s[best];
    }
    for (int k = 0; k < K; k++) W[(size_t)t * K + k] = s[id[k]] / sum;
  }
  for (int e = 0; e < E; e++) counts[e] = 0;
  for (size_t p = 0; p < (size_t)N * K; p++) counts[idx[p]]++;
  if (Im) {
    for (int e = 0; e < E; e++) Im[e] = 0;
    for (int t = 0; t < N; t++) { /* tokens in order */
      const real_t *s = S + (size_t)t * E;
      real_t row = 0;
      for (int e = 0; e < E; e++) row += s[e];
      for (int e = 0; e < E; e++) Im[e] += s[e] / row;
    }
  }
}

/* With s = sigmoid(z_scaled), z_scaled = route_scale * z, z = x @ wg^T, chosen set
 * C of token t, S = sum_{i in C} s_i, w_i = s_i / S and g = dw[t]:
 *   dL/ds_j = (g_j - sum_{i in C} g_i w_i) / S          (j in C, else 0)
 *           + aux_coef (f_j - sum_k f_k s_k / R) / R     (aux term; R = sum over all E of s)
 *   dz_j    = route_scale * s_j (1 - s_j) dL/ds_j
 * then dx += dz @ wg and dwg += dz^T @ x: the contract's "dlogits * route_scale"
 * with dlogits taken with respect to the scaled logits. */
void cpu_router_bwd(Backend *be, void *dx, void *dwg, const void *dw, const void *scores,
                    const int32_t *idx, const void *x, const void *wg, int N, int D, int E, int K,
                    float route_scale, float aux_coef, const void *load_frac) {
  const real_t *dW = dw, *S = scores, *F = load_frac;
  real_t *dz = xmalloc((size_t)(N > 0 ? N : 1) * E * sizeof(real_t)); /* [N, E] */
#pragma omp parallel for schedule(static)
  for (int t = 0; t < N; t++) {
    const real_t *s = S + (size_t)t * E, *g = dW + (size_t)t * K;
    const int32_t *id = idx + (size_t)t * K;
    real_t *ds = dz + (size_t)t * E;
    real_t sum = 0, gw = 0;
    for (int k = 0; k < K; k++) sum += s[id[k]];
    for (int k = 0; k < K; k++) gw += g[k] * (s[id[k]] / sum);
    for (int e = 0; e < E; e++) ds[e] = 0;
    for (int k = 0; k < K; k++) ds[id[k]] = (g[k] - gw) / sum;
    if (aux_coef != 0) {
      real_t R = 0, fs = 0;
      for (int e = 0; e < E; e++) R += s[e];
      for (int e = 0; e < E; e++) fs += F[e] * s[e];
      for (int e = 0; e < E; e++) ds[e] += (real_t)aux_coef * (F[e] - fs / R) / R;
    }
    for (int e = 0; e < E; e++) ds[e] *= (real_t)route_scale * s[e] * (1 - s[e]);
  }
  cpu_gemm_strided(dx, D, dz, E, wg, D, N, D, E, 0, 0, 1, 1);  /* dx += dz @ wg */
  cpu_gemm_strided(dwg, D, dz, E, x, D, E, D, N, 1, 0, 1, 1);  /* dwg += dz^T @ x */
  free(dz);
}

void cpu_moe_sort(Backend *be, int32_t *off, int32_t *row_of, int32_t *pair_of,
                  const int32_t *idx, int N, int K, int E) {
  size_t P = (size_t)N * K;
  for (int e = 0; e <= E; e++) off[e] = 0;
  for (size_t p = 0; p < P; p++) {
    NMOE_ASSERT(idx[p] >= 0 && idx[p] < E);
    off[idx[p] + 1]++;
  }
  for (int e = 0; e < E; e++) off[e + 1] += off[e];
  int32_t *next = xmalloc((size_t)(E > 0 ? E : 1) * sizeof(int32_t));
  for (int e = 0; e < E; e++) next[e] = off[e];
  for (size_t p = 0; p < P; p++) { /* pairs in increasing order: stable */
    int32_t r = next[idx[p]]++;
    row_of[p] = r;
    pair_of[r] = (int32_t)p;
  }
  free(next);
}

void cpu_moe_gather(Backend *be, void *xe, const void *x, const int32_t *pair_of, int N, int K,
                    int D) {
  real_t *XE = xe;
  const real_t *X = x;
  long M = (long)N * K;
#pragma omp parallel for schedule(static)
  for (long m = 0; m < M; m++) {
    const real_t *src = X + (size_t)(pair_of[m] / K) * D;
    for (int d = 0; d < D; d++) XE[(size_t)m * D + d] = src[d];
  }
}

void cpu_moe_combine(Backend *be, void *y, const void *ye, const void *w, const int32_t *row_of,
                     int N, int K, int D, int accumulate) {
  real_t *Y = y;
  const real_t *YE = ye, *W = w;
#pragma omp parallel for schedule(static)
  for (int t = 0; t < N; t++) {
    real_t *yt = Y + (size_t)t * D;
    for (int d = 0; d < D; d++) {
      real_t acc = 0;
      for (int k = 0; k < K; k++)
        acc += W[(size_t)t * K + k] * YE[(size_t)row_of[(size_t)t * K + k] * D + d];
      yt[d] = accumulate ? yt[d] + acc : acc;
    }
  }
}

void cpu_moe_combine_bwd(Backend *be, void *dye, void *dw, const void *dy, const void *ye,
                         const void *w, const int32_t *row_of, int N, int K, int D) {
  real_t *dYE = dye, *dWt = dw;
  const real_t *dY = dy, *YE = ye, *W = w;
#pragma omp parallel for schedule(static)
  for (int t = 0; t < N; t++) {
    const real_t *g = dY + (size_t)t * D;
    for (int k = 0; k < K; k++) {
      size_t p = (size_t)t * K + k, r = (size_t)row_of[p];
      real_t *o = dYE + r * D;
      for (int d = 0; d < D; d++) o[d] = W[p] * g[d];
      dWt[p] = cpu_dot(g, YE + r * D, D);
    }
  }
}

void cpu_moe_gather_bwd(Backend *be, void *dx, const void *dxe, const int32_t *row_of, int N,
                        int K, int D, int accumulate) {
  real_t *dX = dx;
  const real_t *dXE = dxe;
#pragma omp parallel for schedule(static)
  for (int t = 0; t < N; t++) {
    real_t *o = dX + (size_t)t * D;
    for (int d = 0; d < D; d++) {
      real_t acc = 0;
      for (int k = 0; k < K; k++) acc += dXE[(size_t)row_of[(size_t)t * K + k] * D + d];
      o[d] = accumulate ? o[d] + acc : acc;
    }
  }
}

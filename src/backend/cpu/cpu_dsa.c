/* cpu_dsa.c: the DSA lightning indexer ops (contracts in backend.h): index
 * scores and their backward, top-k key selection, the main attention's
 * head-averaged distribution (the indexer's target) and the KL loss.
 *
 * Layout: row n = b*T + t; score matrices I, p, dI are F32 [B, T, T] with row
 * (b, t) at (b*T + t)*T, entries s > t unused. Every op owns its outputs by
 * row (query rows, or key rows for dk) and sums in a fixed order, so results
 * do not depend on the thread count. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cpu/cpu.h"
#include "core/log.h"

void cpu_dsa_index_fwd(Backend *be, void *score, const void *q, const void *k, const void *w, int B,
                       int T, int Hi, int di) {
  real_t *S = score;
  const real_t *Q = q, *Kk = k, *Wt = w;
  const long rows = (long)B * T;
#pragma omp parallel for schedule(dynamic, 8)
  for (long n = 0; n < rows; n++) {
    const int t = (int)(n % T);
    const size_t base = (size_t)(n - t); /* first row of the sequence */
    real_t *row = S + (size_t)n * T;
    for (int s = 0; s <= t; s++) {
      const real_t *ks = Kk + (base + s) * di;
      real_t acc = 0;
      for (int j = 0; j < Hi; j++) {
        real_t d = cpu_dot(Q + (size_t)n * Hi * di + (size_t)j * di, ks, di);
        if (d > 0) acc += Wt[(size_t)n * Hi + j] * d;
      }
      row[s] = acc;
    }
    for (int s = t + 1; s < T; s++) row[s] = 0;
  }
}

void cpu_dsa_index_bwd(Backend *be, void *dq, void *dk, void *dw, const void *dscore, const void *q,
                       const void *k, const void *w, int B, int T, int Hi, int di) {
  real_t *dQ = dq, *dK = dk, *dW = dw;
  const real_t *G = dscore, *Q = q, *Kk = k, *Wt = w;
  const long rows = (long)B * T;
  /* dq, dw: one task per query row; keys in order. */
#pragma omp parallel for schedule(dynamic, 8)
  for (long n = 0; n < rows; n++) {
    const int t = (int)(n % T);
    const size_t base = (size_t)(n - t);
    const real_t *g = G + (size_t)n * T;
    for (int j = 0; j < Hi; j++) {
      const real_t *qj = Q + (size_t)n * Hi * di + (size_t)j * di;
      real_t *dqj = dQ + (size_t)n * Hi * di + (size_t)j * di;
      real_t acc_w = 0;
      for (int c = 0; c < di; c++) dqj[c] = 0;
      for (int s = 0; s <= t; s++) {
        if (g[s] == 0) continue; /* outside the candidate set (or no signal) */
        const real_t *ks = Kk + (base + s) * di;
        real_t d = cpu_dot(qj, ks, di);
        if (d <= 0) continue;
        acc_w += g[s] * d;
        for (int c = 0; c < di; c++) dqj[c] += g[s] * ks[c];
      }
      const real_t wj = Wt[(size_t)n * Hi + j];
      for (int c = 0; c < di; c++) dqj[c] *= wj;
      dW[(size_t)n * Hi + j] = acc_w;
    }
  }
  /* dk: one task per key row; later queries, then heads, in order. */
#pragma omp parallel for schedule(dynamic, 8)
  for (long m = 0; m < rows; m++) {
    const int s = (int)(m % T);
    const size_t base = (size_t)(m - s);
    const real_t *ks = Kk + (size_t)m * di;
    real_t *dks = dK + (size_t)m * di;
    for (int c = 0; c < di; c++) dks[c] = 0;
    for (int t = s; t < T; t++) {
      const size_t n = base + t;
      const real_t gs = G[n * T + s];
      if (gs == 0) continue;
      for (int j = 0; j < Hi; j++) {
        const real_t *qj = Q + n * Hi * di + (size_t)j * di;
        if (cpu_dot(qj, ks, di) <= 0) continue;
        const real_t f = gs * Wt[n * Hi + j];
        for (int c = 0; c < di; c++) dks[c] += f * qj[c];
      }
    }
  }
}

void cpu_dsa_topk(Backend *be, int32_t *sel, const void *score, int B, int T, int K) {
  const real_t *S = score;
  const long rows = (long)B * T;
#pragma omp parallel
  {
    int32_t *cand = xmalloc((size_t)T * sizeof(int32_t));
    char *pick = xmalloc((size_t)T);
#pragma omp for schedule(dynamic, 8)
    for (long n = 0; n < rows; n++) {
      const int t = (int)(n % T);
      const real_t *row = S + (size_t)n * T;
      int32_t *out = sel + (size_t)n * K;
      int c = 0;
      if (t + 1 <= K) {
        for (int s = 0; s <= t; s++) out[c++] = s;
      } else {
        /* K rounds of selection would be O(K T); instead keep the K best in
         * cand[0..K) as a sorted array (score desc, key asc) with insertion:
         * O(T K) worst, O(T) typical. Ties keep the earlier key first. */
        int nc = 0;
        for (int s = 0; s <= t; s++) {
          const real_t v = row[s];
          if (nc == K && !(v > row[cand[K - 1]])) continue; /* not better than the K-th */
          int pos = nc < K ? nc++ : K - 1;
          while (pos > 0 && v > row[cand[pos - 1]]) {
            cand[pos] = cand[pos - 1];
            pos--;
          }
          cand[pos] = s;
        }
        memset(pick, 0, (size_t)t + 1);
        for (int i = 0; i < K; i++) pick[cand[i]] = 1;
        for (int s = 0; s <= t; s++)
          if (pick[s]) out[c++] = s;
      }
      while (c < K) out[c++] = -1;
    }
    free(cand);
    free(pick);
  }
}

/* Candidate keys of row n into key[] (ascending); returns their count. */
static int cands(const int32_t *sel, int K, long n, int t, int *key) {
  int nk = 0;
  if (sel) {
    for (int c = 0; c < K; c++)
      if (sel[(size_t)n * K + c] >= 0) key[nk++] = sel[(size_t)n * K + c];
  } else {
    for (int s = 0; s <= t; s++) key[nk++] = s;
  }
  return nk;
}

void cpu_dsa_attn_dist(Backend *be, void *p, const void *q, const void *k, const void *lse,
                       const int32_t *sel, int K, const AttnShape *sh) {
  real_t *P = p;
  const real_t *Q = q, *Kk = k, *L = lse;
  const int T = sh->T, Hq = sh->Hq, grp = sh->Hq / sh->Hkv, dqk = sh->dqk;
  const long rows = (long)sh->B * T;
  const real_t scale = sh->scale, inv_h = (real_t)1 / Hq;
#pragma omp parallel
  {
    int *key = xmalloc((size_t)T * sizeof(int));
#pragma omp for schedule(dynamic, 8)
    for (long n = 0; n < rows; n++) {
      const int t = (int)(n % T), b = (int)(n / T);
      const size_t base = (size_t)(n - t);
      real_t *row = P + (size_t)n * T;
      for (int s = 0; s < T; s++) row[s] = 0;
      const int nk = cands(sel, K, n, t, key);
      for (int c = 0; c < nk; c++) {
        real_t acc = 0;
        for (int h = 0; h < Hq; h++) {
          const real_t *qh = Q + (size_t)n * sh->ldq + (size_t)h * dqk;
          const real_t *ks = Kk + (base + key[c]) * sh->ldk + (size_t)(h / grp) * dqk;
          acc += exp(scale * cpu_dot(qh, ks, dqk) - L[((size_t)b * Hq + h) * T + t]);
        }
        row[key[c]] = acc * inv_h;
      }
    }
    free(key);
  }
}

double cpu_dsa_kl(Backend *be, void *dscore, const void *score, const void *p, const int32_t *sel, int K,
                  int B, int T, float grad_scale) {
  real_t *G = dscore;
  const real_t *S = score, *P = p;
  const long rows = (long)B * T;
  double *kl = xmalloc((size_t)(rows > 0 ? rows : 1) * sizeof(double));
#pragma omp parallel
  {
    int *key = xmalloc((size_t)T * sizeof(int));
    real_t *r = xmalloc((size_t)T * sizeof(real_t));
#pragma omp for schedule(dynamic, 8)
    for (long n = 0; n < rows; n++) {
      const int t = (int)(n % T);
      const real_t *srow = S + (size_t)n * T, *prow = P + (size_t)n * T;
      const int nk = cands(sel, K, n, t, key);
      real_t mx = -INFINITY, z = 0;
      for (int c = 0; c < nk; c++) mx = srow[key[c]] > mx ? srow[key[c]] : mx;
      for (int c = 0; c < nk; c++) z += r[c] = exp(srow[key[c]] - mx);
      const real_t logz = mx + log(z);
      double acc = 0;
      for (int c = 0; c < nk; c++) {
        const real_t ps = prow[key[c]];
        if (ps > 0) acc += (double)ps * ((double)log(ps) - (double)(srow[key[c]] - logz));
        r[c] /= z;
      }
      kl[n] = acc;
      /* written last: dI may alias I */
      real_t *grow = G + (size_t)n * T;
      for (int s = 0; s < T; s++) grow[s] = 0;
      for (int c = 0; c < nk; c++) grow[key[c]] = grad_scale * (r[c] - prow[key[c]]);
    }
    free(key);
    free(r);
  }
  double sum = 0;
  for (long n = 0; n < rows; n++) sum += kl[n];
  free(kl);
  return sum;
}

/* cpu_loss.c: fused lm_head + cross-entropy on the CPU.
 *
 * Rows are processed in chunks of XENT_ROWS so only [XENT_ROWS, V] logits are
 * held at once. Per chunk: logits = scale * h W^T (gemm), a max-subtracted
 * log-sum-exp per row (summed in double; the exponentials are kept), then the
 * buffer is turned into dlogits in place and pushed through two gemms:
 * dh = scale * dlogits W and dW += scale * dlogits^T h. Chunks run in order, so every dW element sums
 * its rows in row order. */
#include <stdlib.h>

#include "backend/cpu/cpu.h"
#include "core/log.h"

enum { XENT_ROWS = 64 };

double cpu_xent(Backend *be, void *dh, void *dW, const void *h, const void *W,
                const int32_t *targets, int N, int D, int V, float scale, int mask_id,
                float grad_scale) {
  const real_t *H = h, *Wt = W;
  real_t *lg = xmalloc((size_t)XENT_ROWS * V * sizeof(real_t)); /* [XENT_ROWS, V] */
  double loss[XENT_ROWS], total = 0;
  for (int n = 0; n < N; n++)
    if ((mask_id < 0 || targets[n] != mask_id) && (targets[n] < 0 || targets[n] >= V))
      nmoe_fatal("target id %d outside the vocabulary (%d)", targets[n], V);
  for (int r0 = 0; r0 < N; r0 += XENT_ROWS) {
    int nr = N - r0 < XENT_ROWS ? N - r0 : XENT_ROWS;
    const real_t *Hc = H + (size_t)r0 * D;
    cpu_gemm_strided(lg, V, Hc, D, Wt, D, nr, V, D, 0, 1, scale, 0);
#pragma omp parallel for schedule(static)
    for (int r = 0; r < nr; r++) {
      real_t *l = lg + (size_t)r * V;
      int tg = targets[r0 + r];
      int keep = mask_id < 0 || tg != mask_id;
      loss[r] = 0;
      if (!keep) {
        if (dh) for (int v = 0; v < V; v++) l[v] = 0;
        continue;
      }
      real_t mx = l[0], lt = l[tg];
      for (int v = 1; v < V; v++) mx = l[v] > mx ? l[v] : mx;
      double se = 0;
      for (int v = 0; v < V; v++) {
        real_t e = exp(l[v] - mx);
        se += e;
        l[v] = e; /* kept for the softmax: one exp per logit */
      }
      loss[r] = (double)mx + log(se) - (double)lt;
      if (dh) {
        real_t f = (real_t)(grad_scale / se);
        for (int v = 0; v < V; v++) l[v] *= f;
        l[tg] -= (real_t)grad_scale;
      }
    }
    for (int r = 0; r < nr; r++) total += loss[r];
    if (dh) {
      cpu_gemm_strided((real_t *)dh + (size_t)r0 * D, D, lg, V, Wt, D, nr, D, V, 0, 0, scale, 0);
      cpu_gemm_strided(dW, D, lg, V, Hc, D, V, D, nr, 1, 0, scale, 1);
    }
  }
  free(lg);
  return total;
}

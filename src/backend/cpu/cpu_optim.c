/* cpu_optim.c: the AdamW update of the CPU backend, elementwise in real_t.
 *
 * With a master copy the update runs on the master and p receives a copy: on
 * the CPU both are real_t, so the copy is exact. stochastic_seed is ignored for
 * the same reason: there is no narrower storage type to round into. */
#include "backend/cpu/cpu.h"

void cpu_adamw(Backend *be, void *p, void *master, const void *g, void *m, void *v, size_t n,
               const AdamParams *ap) {
  real_t *P = p, *Ms = master, *Mo = m, *Vo = v;
  const real_t *G = g;
  real_t lr = ap->lr, b1 = ap->b1, b2 = ap->b2, eps = ap->eps, wd = ap->wd, bc1 = ap->bc1,
         bc2 = ap->bc2, gs = ap->grad_scale;
  real_t *X = Ms ? Ms : P; /* the copy being updated */
#pragma omp parallel for schedule(static) if (n > 65536)
  for (size_t i = 0; i < n; i++) {
    real_t gi = G[i] * gs, x = X[i];
    x -= lr * wd * x;
    Mo[i] = b1 * Mo[i] + (1 - b1) * gi;
    Vo[i] = b2 * Vo[i] + (1 - b2) * gi * gi;
    x -= lr * (Mo[i] / bc1) / (sqrt(Vo[i] / bc2) + eps);
    X[i] = x;
    if (Ms) P[i] = x;
  }
}

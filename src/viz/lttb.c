/* lttb.c: Largest-Triangle-Three-Buckets (Steinarsson, 2013).
 *
 * The inner n-2 points are split into m-2 equal buckets. Walking left to
 * right, each bucket keeps the point forming the largest triangle with the
 * point kept from the previous bucket and the mean of the next bucket. */
#include "viz/lttb.h"

#include <math.h>
#include <stdint.h>

/* First index of bucket b of nb over the inner points 1..n-2 (integer
 * arithmetic, so bucket nb starts exactly at n-1). */
static int bucket_start(int b, int n, int nb) { return 1 + (int)((int64_t)b * (n - 2) / nb); }

int lttb_select(const double *x, const double *y, int n, int m, int *out) {
  if (n <= 0 || m <= 0) return 0;
  if (m >= n) {
    for (int i = 0; i < n; i++) out[i] = i;
    return n;
  }
  if (m < 3) {
    out[0] = 0;
    if (m == 2) out[1] = n - 1;
    return m;
  }
  int nb = m - 2, k = 0, a = 0; // a: index kept last
  out[k++] = 0;
  for (int b = 0; b < nb; b++) {
    int lo = bucket_start(b, n, nb), hi = bucket_start(b + 1, n, nb); // this bucket [lo, hi)
    int nlo = hi, nhi = b + 1 < nb ? bucket_start(b + 2, n, nb) : n;  // next bucket, or the last point
    double mx = 0, my = 0;
    for (int i = nlo; i < nhi; i++) mx += x[i], my += y[i];
    mx /= nhi - nlo;
    my /= nhi - nlo;
    int best = lo;
    double best_area = -1;
    for (int i = lo; i < hi; i++) {
      // Twice the triangle area; the factor does not change the choice.
      double area = fabs((x[a] - mx) * (y[i] - y[a]) - (x[a] - x[i]) * (my - y[a]));
      if (area > best_area) best_area = area, best = i;
    }
    out[k++] = a = best;
  }
  out[k++] = n - 1;
  return k;
}

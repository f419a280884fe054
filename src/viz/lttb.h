/* lttb.h: Largest-Triangle-Three-Buckets downsampling of a line series, so a
 * chart of a million steps draws from a few thousand points that keep its
 * shape (spikes and dips survive, flat stretches thin out). */
#ifndef NMOE_LTTB_H
#define NMOE_LTTB_H

/* Chooses min(n, m) of the n points (x ascending) and writes their indices,
 * ascending, to out (room for min(n, m)); returns how many. The first and
 * last points are always kept; m < 3 with n > m keeps only the ends (m = 2)
 * or the first point (m = 1). */
int lttb_select(const double *x, const double *y, int n, int m, int *out);

#endif

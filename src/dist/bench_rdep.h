/* bench_rdep.h: `nmoe bench rdep` (RDEP dispatch + combine; see bench_rdep.c). */
#ifndef NMOE_BENCH_RDEP_H
#define NMOE_BENCH_RDEP_H

int bench_rdep_main(int argc, char **argv);

#endif

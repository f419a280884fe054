/* dist.h: this process's place in a multi-process run, read from the
 * launcher's environment: torchrun (RANK, WORLD_SIZE, LOCAL_RANK,
 * LOCAL_WORLD_SIZE), Open MPI (OMPI_COMM_WORLD_*), MPICH/PMI (PMI_RANK,
 * PMI_SIZE, MPI_LOCALRANKID), Slurm (SLURM_PROCID, SLURM_NTASKS,
 * SLURM_LOCALID). No launcher: a single process, rank 0 of 1. */
#ifndef NMOE_DIST_H
#define NMOE_DIST_H

typedef struct DistInfo {
  int rank, world, local_rank, local_world;
  const char *launcher; /* "none", "torchrun", "openmpi", "pmi", "slurm" */
} DistInfo;

/* Fatal with one clear line on inconsistent values (rank >= world, ...). */
DistInfo dist_from_env(void);

#endif

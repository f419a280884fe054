/* dist.c: rank discovery from launcher environment variables. */
#include "dist/dist.h"

#include <stdlib.h>

#include "core/log.h"

static int env_int(const char *name, int def) {
  const char *v = getenv(name);
  if (!v || !*v) return def;
  char *end;
  long x = strtol(v, &end, 10);
  if (*end || x < 0 || x > 1 << 20) nmoe_fatal("environment variable %s=%s is not a valid count", name, v);
  return (int)x;
}

DistInfo dist_from_env(void) {
  static const struct { const char *launcher, *rank, *world, *local_rank, *local_world; } schemes[] = {
      {"torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"},
      {"openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
       "OMPI_COMM_WORLD_LOCAL_SIZE"},
      {"pmi", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"},
      {"slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE"},
  };
  DistInfo d = {0, 1, 0, 1, "none"};
  for (size_t i = 0; i < sizeof schemes / sizeof schemes[0]; i++) {
    if (!getenv(schemes[i].rank) || !getenv(schemes[i].world)) continue;
    d.launcher = schemes[i].launcher;
    d.rank = env_int(schemes[i].rank, 0);
    d.world = env_int(schemes[i].world, 1);
    d.local_rank = env_int(schemes[i].local_rank, d.rank);
    d.local_world = env_int(schemes[i].local_world, d.world);
    break;
  }
  if (d.world < 1 || d.rank >= d.world || d.local_rank >= d.local_world)
    nmoe_fatal("inconsistent launcher environment (%s): rank %d of world %d, local rank %d of %d",
               d.launcher, d.rank, d.world, d.local_rank, d.local_world);
  return d;
}

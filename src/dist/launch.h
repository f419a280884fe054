/* launch.h: `nmoe launch`: runs N copies of a command on this host as the
 * ranks of one job (torchrun's environment: RANK, WORLD_SIZE, LOCAL_RANK,
 * LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT). When one rank fails, the
 * others are stopped and the launcher exits with the first failure's status. */
#ifndef NMOE_LAUNCH_H
#define NMOE_LAUNCH_H

int launch_main(int argc, char **argv);

#endif

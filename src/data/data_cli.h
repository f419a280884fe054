/* data_cli.h: entry point of `nmoe data ...` (argv[0] = "data"). */
#ifndef NMOE_DATA_CLI_H
#define NMOE_DATA_CLI_H

/* Runs a data subcommand; returns the process exit status (user errors exit
 * through nmoe_fatal). */
int data_main(int argc, char **argv);

#endif

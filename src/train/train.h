/* train.h: the training commands: `nmoe train` and `nmoe bench train`
 * (argv[0] is the command name). */
#ifndef NMOE_TRAIN_H
#define NMOE_TRAIN_H

int train_main(int argc, char **argv);
int bench_train_main(int argc, char **argv);

#endif

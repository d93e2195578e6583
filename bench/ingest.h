/* fasa bench ingest (bench/ingest.c): append bandwidth of a server, with the machine's read
 * bandwidth and the in-process shard_append rate from the same run. */
#ifndef FASA_BENCH_INGEST_H
#define FASA_BENCH_INGEST_H

/* argv[0] is "ingest"; returns the exit status (0, 1 on failure, 2 on bad usage). */
int bench_ingest_main(int argc, char **argv);

#endif
